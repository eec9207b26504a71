//! Tests of `hypervisor::libvirt::xml`.

use super::*;
use crate::model::alias::{HostdevAlias, Ownership};
use crate::testing::devices::device;

fn id(vendor: u16, product: u16) -> UsbId {
    UsbId { vendor, product }
}

fn address(bus: u16, device: u16) -> BusAddress {
    BusAddress { bus, device }
}

fn spec(id: UsbId, address: BusAddress, alias: &str) -> HostdevSpec {
    HostdevSpec {
        id,
        address,
        port_path: "1-2".to_string(),
        alias: HostdevAlias::parse(alias).unwrap(),
    }
}

fn domain_with_devices(devices: &str) -> String {
    format!(
            "<domain type='kvm' id='3'>\n  <name>guest</name>\n  <devices>\n{devices}\n  </devices>\n</domain>\n"
        )
}

/// What libvirt 9.0 printed for a running domain's hot-plugged hostdev (from the
/// test-environment notes) and for defined hostdevs (`virsh dumpxml --inactive` here).
const LIBVIRT_USB_HOSTDEV: &str = "    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source>
        <vendor id='0x0627'/>
        <product id='0x0001'/>
        <address bus='1' device='2'/>
      </source>
      <alias name='ua-usbpass-test'/>
      <address type='usb' bus='0' port='1'/>
    </hostdev>";

#[test]
fn builds_the_hostdev_libvirt_expects() {
    let xml =
        build_usb_hostdev(&spec(id(0x046d, 0xc52b), address(1, 5), "ua-usbpass-1-5")).unwrap();
    assert_eq!(
        xml,
        "<hostdev mode=\"subsystem\" type=\"usb\" managed=\"yes\"><source>\
             <vendor id=\"0x046d\"/><product id=\"0xc52b\"/>\
             <address bus=\"1\" device=\"5\"/></source>\
             <alias name=\"ua-usbpass-1-5\"/></hostdev>"
    );
}

#[test]
fn writes_bus_and_device_in_plain_decimal_never_zero_padded() {
    // udev says 008 and 010; libvirt would read 010 as octal 8.
    let xml = build_usb_hostdev(&spec(id(1, 2), address(8, 10), "ua-usbpass-x")).unwrap();
    assert!(xml.contains("<address bus=\"8\" device=\"10\"/>"), "{xml}");
    let xml = build_usb_hostdev(&spec(id(1, 2), address(0, 0), "ua-usbpass-x")).unwrap();
    assert!(xml.contains("<address bus=\"0\" device=\"0\"/>"), "{xml}");
}

#[test]
fn build_then_parse_round_trips() {
    for (vendor, product, bus, dev) in [
        (0x046d, 0xc52b, 1, 5),
        (0, 0, 0, 0),
        (0xffff, 0xffff, 65535, 65535),
        (0x0627, 0x0001, 8, 10),
    ] {
        let alias = format!("ua-usbpass-{bus}-{dev}-{vendor:04x}-{product:04x}");
        let hostdev =
            build_usb_hostdev(&spec(id(vendor, product), address(bus, dev), &alias)).unwrap();
        let parsed = parse_usb_hostdevs(&domain_with_devices(&hostdev)).unwrap();
        assert_eq!(
            parsed,
            vec![UsbHostdev {
                alias: Some(alias.clone()),
                id: Some(id(vendor, product)),
                address: Some(address(bus, dev)),
            }]
        );
        assert_eq!(parsed[0].ownership(), Ownership::Rules);
    }
}

#[test]
fn a_hostile_serial_cannot_reach_the_xml_or_the_alias() {
    let mut hostile = device(1, 5, 0x046d, 0xc52b, "1-2");
    let serial = "</source><alias name='ua-usbpass-evil'/>&amp;'\"\u{fffd}\u{0}";
    hostile.serial = Some(serial.to_string());
    // The hostdev is built from the ID and address alone.
    let xml = build_usb_hostdev(&spec(hostile.id(), hostile.address(), "ua-usbpass-1-5")).unwrap();
    assert!(!xml.contains("evil"), "{xml}");
    assert!(!xml.contains('\u{fffd}'), "{xml}");
    let parsed = parse_usb_hostdevs(&domain_with_devices(&xml)).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].alias.as_deref(), Some("ua-usbpass-1-5"));
    // An alias that carried the serial is refused before any XML can be written.
    let alias = format!("ua-usbpass-{serial}");
    assert!(HostdevAlias::parse(&alias).is_err());
}

#[test]
fn parses_what_libvirt_writes() {
    let parsed = parse_usb_hostdevs(&domain_with_devices(LIBVIRT_USB_HOSTDEV)).unwrap();
    assert_eq!(
        parsed,
        vec![UsbHostdev {
            alias: Some("ua-usbpass-test".into()),
            id: Some(id(0x0627, 0x0001)),
            // The guest-side <address type='usb' port='1'/> is not the host address.
            address: Some(address(1, 2)),
        }]
    );
}

#[test]
fn reads_numbers_as_libvirt_does_with_base_zero() {
    // Checked on libvirt 9.0: bus='010' device='0x10' came back as bus='8'
    // device='16', and vendor id='1133' as 0x046d; id='046d' was refused.
    let xml = domain_with_devices(
        "<hostdev mode='subsystem' type='usb'><source><vendor id='1133'/>\
             <product id='0XC52B'/><address bus='010' device='0x10'/></source></hostdev>",
    );
    let parsed = parse_usb_hostdevs(&xml).unwrap();
    assert_eq!(parsed[0].id, Some(id(0x046d, 0xc52b)));
    assert_eq!(parsed[0].address, Some(address(8, 16)));

    for bad in [
        "046d", "", "0x", "-1", "1 ", "0x1_0", "08", "65536", "0x10000",
    ] {
        let xml = domain_with_devices(&format!(
            "<hostdev mode='subsystem' type='usb'><source><vendor id='{bad}'/></source></hostdev>"
        ));
        assert!(
            matches!(
                parse_usb_hostdevs(&xml),
                Err(HostdevXmlError::InvalidNumber { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn tells_owned_manual_and_foreign_hostdevs_apart() {
    let xml = domain_with_devices(
            "<hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x1'/><product id='0x2'/><address bus='1' device='3'/></source><alias name='ua-usbpass-1-3'/></hostdev>
             <hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x1'/><product id='0x2'/><address bus='1' device='4'/></source><alias name='ua-usbpass-manual-1-4'/></hostdev>
             <hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x1'/><product id='0x2'/><address bus='1' device='6'/></source><alias name='hostdev0'/></hostdev>
             <hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x1'/><product id='0x2'/><address bus='1' device='7'/></source><alias name='ua-usbpassx'/></hostdev>
             <hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x1'/><product id='0x2'/></source></hostdev>",
        );
    let parsed = parse_usb_hostdevs(&xml).unwrap();
    let ownership: Vec<_> = parsed.iter().map(UsbHostdev::ownership).collect();
    assert_eq!(
        ownership,
        [
            Ownership::Rules,
            Ownership::Manual,
            Ownership::Foreign,
            Ownership::Foreign,
            Ownership::Foreign
        ]
    );
    // A hostdev libvirt has not given an address (not yet attached, or matched by
    // vendor and product alone) is kept with no address.
    assert_eq!(parsed[4].alias, None);
    assert_eq!(parsed[4].address, None);
    assert_eq!(parsed[4].id, Some(id(1, 2)));
}

#[test]
fn ignores_pci_scsi_mdev_hostdevs_and_redirdevs() {
    let xml = domain_with_devices(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source><alias name='ua-usbpass-pci'/></hostdev>
             <hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/><address bus='0' target='0' unit='0'/></source><alias name='ua-usbpass-scsi'/></hostdev>
             <hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>
             <hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source></hostdev>
             <redirdev bus='usb' type='spicevmc'><alias name='ua-usbpass-redir'/><address type='usb' bus='0' port='3'/></redirdev>
             <controller type='usb' index='0' model='qemu-xhci'><alias name='usb'/><address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></controller>",
        );
    assert_eq!(parse_usb_hostdevs(&xml).unwrap(), vec![]);
}

#[test]
fn tolerates_unknown_attributes_and_elements() {
    let xml = domain_with_devices(
        "<hostdev mode='subsystem' type='usb' managed='no' future='x'>
               <source startupPolicy='optional' guestReset='off' other='1'>
                 <vendor id='0x0627' extra='y'/><product id='0x0001'/>
                 <address bus='1' device='2' port='9'/>
                 <unknown><vendor id='zzz'/><address bus='zz'/></unknown>
               </source>
               <boot order='1'/>
               <unknown><alias name='ua-usbpass-nested'/></unknown>
               <alias name='ua-usbpass-real'/>
               <address type='usb' bus='0' port='1'/>
             </hostdev>",
    );
    let parsed = parse_usb_hostdevs(&xml).unwrap();
    assert_eq!(
        parsed,
        vec![UsbHostdev {
            alias: Some("ua-usbpass-real".into()),
            id: Some(id(0x0627, 0x0001)),
            address: Some(address(1, 2)),
        }]
    );
}

#[test]
fn hostile_description_title_and_metadata_cannot_fake_a_hostdev() {
    // What libvirt would print for a <description> and <title> holding `<>&'"`,
    // bytes that were not UTF-8 (turned into U+FFFD on the way out of libvirt), and
    // look-alike hostdevs in namespaced <metadata> and <qemu:commandline>.
    let xml = format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>guest&lt;&gt;&amp;&apos;&quot;\u{fffd}</name>
  <title>&lt;devices&gt;&lt;hostdev mode='subsystem' type='usb'&gt;&lt;alias name='ua-usbpass-title'/&gt;&lt;/hostdev&gt;</title>
  <description>&lt;/description&gt;&lt;devices&gt;&lt;hostdev mode=&quot;subsystem&quot; type=&quot;usb&quot;&gt; \u{fffd}\u{fffd} &amp;unknown; ]]&gt; {}</description>
  <metadata>
    <evil:devices xmlns:evil='http://example.com/evil'>
      <evil:hostdev mode='subsystem' type='usb'><evil:alias name='ua-usbpass-meta'/></evil:hostdev>
    </evil:devices>
    <devices xmlns='http://example.com/default-ns'>
      <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source><alias name='ua-usbpass-default-ns'/></hostdev>
    </devices>
  </metadata>
  <devices>
    {LIBVIRT_USB_HOSTDEV}
    <devices><hostdev mode='subsystem' type='usb'><alias name='ua-usbpass-deeper'/></hostdev></devices>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='usb-host,vendorid=0x046d,productid=0xc52b,id=ua-usbpass-cmdline'/>
  </qemu:commandline>
</domain>",
            "\u{1F600}\u{7f}"
        );
    let parsed = parse_usb_hostdevs(&xml).unwrap();
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    assert_eq!(parsed[0].alias.as_deref(), Some("ua-usbpass-test"));
}

#[test]
fn escaped_alias_values_are_unescaped() {
    let xml = domain_with_devices(
            "<hostdev mode='subsystem' type='usb'><source/><alias name='ua-&lt;&amp;&quot;x'/></hostdev>",
        );
    let parsed = parse_usb_hostdevs(&xml).unwrap();
    assert_eq!(parsed[0].alias.as_deref(), Some("ua-<&\"x"));
    assert_eq!(parsed[0].ownership(), Ownership::Foreign);
}

#[test]
fn empty_and_self_closing_elements_are_fine() {
    assert_eq!(parse_usb_hostdevs("<domain/>").unwrap(), vec![]);
    assert_eq!(
        parse_usb_hostdevs("<domain><devices/></domain>").unwrap(),
        vec![]
    );
    let parsed = parse_usb_hostdevs(&domain_with_devices(
        "<hostdev mode='subsystem' type='usb'/>",
    ))
    .unwrap();
    assert_eq!(
        parsed,
        vec![UsbHostdev {
            alias: None,
            id: None,
            address: None
        }]
    );
}

#[test]
fn malformed_xml_is_an_error_not_an_empty_list() {
    for bad in [
        "",
        "<domain><devices><hostdev mode='subsystem' type='usb'>",
        "<domain><devices></domain>",
        "<domain><name>a & b</name></domain",
        "<network/>",
    ] {
        let result = parse_usb_hostdevs(bad);
        assert!(result.is_err(), "{bad:?} gave {result:?}");
        assert!(!result.unwrap_err().to_string().contains('\n'));
    }
}
