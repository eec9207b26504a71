//! Fuzz target: the live domain XML reader (`parse_usb_hostdevs`). It must never panic
//! on any text libvirt (or anyone able to edit a domain) could hand it; and every
//! hostdev it returns must survive the builder: what we would write for it parses back
//! to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbpass::hypervisor::libvirt::xml::{build_usb_hostdev, parse_usb_hostdevs};
use usbpass::hypervisor::{HostdevSpec, UsbHostdev};

fuzz_target!(|data: &[u8]| {
    // libvirt hands the XML over as a C string, which `virt` turns into a `String`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(hostdevs) = parse_usb_hostdevs(text) else {
        return;
    };
    for hostdev in hostdevs {
        let (Some(alias), Some(id), Some(address)) =
            (hostdev.owned_alias(), hostdev.id, hostdev.address)
        else {
            continue;
        };
        let spec = HostdevSpec {
            id,
            address,
            port_path: "1-1".to_string(),
            alias: alias.clone(),
        };
        let xml = build_usb_hostdev(&spec).expect("build");
        let domain = format!("<domain><devices>{xml}</devices></domain>");
        let parsed = parse_usb_hostdevs(&domain).expect("parse what we built");
        assert_eq!(
            parsed,
            vec![UsbHostdev {
                alias: Some(alias.as_str().to_string()),
                id: Some(id),
                address: Some(address),
            }]
        );
    }
});
