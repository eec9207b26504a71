//! Properties of the hostdev XML builder and the live XML reader
//! (`hypervisor::libvirt::xml`): what we write parses back to the same values, for every
//! alias libvirt keeps and every number; and XML-significant characters anywhere in a
//! domain's XML are escaped text, never structure.

use proptest::prelude::*;
use usbpass::hypervisor::libvirt::xml::{build_usb_hostdev, parse_usb_hostdevs};
use usbpass::hypervisor::{HostdevSpec, UsbHostdev};
use usbpass::model::alias::HostdevAlias;
use usbpass::model::{BusAddress, UsbId};
use usbpass::testing::devices::device;

/// Every alias a `HostdevAlias` can hold: the ones the daemon and `usbpass attach` make
/// for any numbers, and any name libvirt keeps after `ua-usbpass-`.
fn alias() -> impl Strategy<Value = HostdevAlias> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            any::<bool>()
        )
            .prop_map(|(bus, devnum, vendor, product, manual)| {
                let device = device(bus, devnum, vendor, product, "1-1");
                if manual {
                    HostdevAlias::for_manual(&device)
                } else {
                    HostdevAlias::for_rules(&device)
                }
            }),
        "ua-usbpass-[A-Za-z0-9_-]{1,48}".prop_map(|a| HostdevAlias::parse(&a).unwrap()),
    ]
}

/// `text` as an XML attribute value or text node: markup characters as entities, and
/// (when `numeric`) every non-ASCII character as a character reference.
fn escape(text: &str, numeric: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if numeric && !c.is_ascii() => out.push_str(&format!("&#x{:x};", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `n` as libvirt (C `strtoul`, base 0) reads it: decimal, `0x` hex or leading-0 octal.
fn spelled(n: u16) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(n.to_string()),
        Just(format!("0x{n:04x}")),
        Just(format!("0X{n:X}")),
        Just(format!("0{n:o}")),
    ]
}

fn domain(devices: &str, description: &str) -> String {
    format!(
        "<domain type='kvm' id='1'><name>guest</name>\
         <description>{description}</description><devices>{devices}</devices></domain>"
    )
}

proptest! {
    #![proptest_config(crate::config(512))]

    /// What the builder writes for any alias, IDs and address, the reader reads back as
    /// the same values, wherever it sits among other hostdevs and whatever text (escaped)
    /// the domain's description holds.
    #[test]
    fn built_hostdev_parses_back(
        alias in alias(),
        vendor in any::<u16>(),
        product in any::<u16>(),
        bus in any::<u16>(),
        devnum in any::<u16>(),
        description in any::<String>(),
        before in 0usize..3,
    ) {
        let spec = HostdevSpec {
            id: UsbId { vendor, product },
            address: BusAddress { bus, device: devnum },
            port_path: "1-1".to_string(),
            alias: alias.clone(),
        };
        let built = build_usb_hostdev(&spec).unwrap();
        let other = "<hostdev mode='subsystem' type='usb'><alias name='hostdev9'/></hostdev>";
        let xml = domain(
            &format!("{}{built}{other}", other.repeat(before)),
            &escape(&description, false),
        );
        let parsed = parse_usb_hostdevs(&xml).unwrap();
        prop_assert_eq!(parsed.len(), before + 2);
        prop_assert_eq!(
            &parsed[before],
            &UsbHostdev {
                alias: Some(alias.as_str().to_string()),
                id: Some(spec.id),
                address: Some(spec.address),
            }
        );
        // And the alias it reads is one usbpass owns, with the same ownership.
        let owned = parsed[before].owned_alias().unwrap();
        prop_assert_eq!(owned.ownership(), alias.ownership());
    }

    /// Any string in an alias (libvirt's own `hostdev0`, or anything a hand-edited domain
    /// holds), escaped as XML, reads back as the same string; any number in any base
    /// `strtoul` reads, as the same number; escaped markup in text never adds a hostdev.
    #[test]
    fn escaped_strings_and_spelled_numbers_read_back(
        alias in any::<String>(),
        numeric in any::<bool>(),
        (vendor, vendor_text) in any::<u16>().prop_flat_map(|n| (Just(n), spelled(n))),
        (product, product_text) in any::<u16>().prop_flat_map(|n| (Just(n), spelled(n))),
        (bus, bus_text) in any::<u16>().prop_flat_map(|n| (Just(n), spelled(n))),
        (devnum, devnum_text) in any::<u16>().prop_flat_map(|n| (Just(n), spelled(n))),
        double_quotes in any::<bool>(),
    ) {
        let q = if double_quotes { '"' } else { '\'' };
        let hostdev = format!(
            "<hostdev mode={q}subsystem{q} type={q}usb{q}><source>\
             <vendor id={q}{vendor_text}{q}/><product id={q}{product_text}{q}/>\
             <address bus={q}{bus_text}{q} device={q}{devnum_text}{q}/></source>\
             <alias name={q}{}{q}/></hostdev>",
            escape(&alias, numeric)
        );
        // The same markup as text: must stay text.
        let xml = domain(&hostdev, &escape(&hostdev, numeric));
        let parsed = parse_usb_hostdevs(&xml).unwrap();
        prop_assert_eq!(
            parsed,
            vec![UsbHostdev {
                alias: Some(alias),
                id: Some(UsbId { vendor, product }),
                address: Some(BusAddress { bus, device: devnum }),
            }]
        );
    }
}
