//! Hostdev XML: builds the `<hostdev>` that usbpass hot-plugs and reads the USB hostdevs
//! back out of a domain's live XML. The only module that imports `quick-xml`.
//!
//! Numbers follow libvirt 9's own rules, checked on the real libvirtd: libvirt parses
//! `<vendor id>`, `<product id>` and `<address bus device>` as C `strtoul` with base 0, so
//! `010` is octal 8, `0x10` is 16 and `10` is decimal; it writes the IDs as `0x%04x` and
//! the address in plain decimal. So we write plain decimal (never udev's zero-padded
//! `008`) and read with the same base-0 rule.

use crate::hypervisor::{HostdevSpec, UsbHostdev};
use crate::model::{BusAddress, UsbId};
use crate::util::c_number;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::Writer;

#[derive(Debug, thiserror::Error)]
pub enum HostdevXmlError {
    #[error("cannot write hostdev xml for {id} at {address}: {source}")]
    WriteHostdev {
        id: UsbId,
        address: BusAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse domain xml at byte {position}: {source}")]
    ParseDomainXml {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("cannot parse domain xml: the root element is <{root}>, not <domain>")]
    NotDomainXml { root: String },
    #[error("cannot parse domain xml: it ends before the <domain> element does")]
    TruncatedDomainXml,
    #[error("bad usb hostdev in domain xml at byte {position}: <{element} {attribute}={value:?}> is not a {bits}-bit number")]
    InvalidNumber {
        position: u64,
        element: &'static str,
        attribute: &'static str,
        value: String,
        bits: u32,
    },
}

/// The `<hostdev>` for one plug of one USB device. Vendor and product make libvirt check
/// that the device at the address is still the one meant; the address tells identical
/// devices apart. The device's serial never goes in: libvirt's USB source has no serial.
pub fn build_usb_hostdev(hostdev: &HostdevSpec) -> Result<String, HostdevXmlError> {
    let (id, address) = (hostdev.id, hostdev.address);
    let vendor = format!("0x{:04x}", id.vendor);
    let product = format!("0x{:04x}", id.product);
    // Plain decimal: libvirt reads a leading zero as octal.
    let bus = address.bus.to_string();
    let device = address.device.to_string();

    let mut writer = Writer::new(Vec::new());
    writer
        .create_element("hostdev")
        .with_attributes([("mode", "subsystem"), ("type", "usb"), ("managed", "yes")])
        .write_inner_content(|writer| {
            writer
                .create_element("source")
                .write_inner_content(|writer| {
                    writer
                        .create_element("vendor")
                        .with_attribute(("id", vendor.as_str()))
                        .write_empty()?;
                    writer
                        .create_element("product")
                        .with_attribute(("id", product.as_str()))
                        .write_empty()?;
                    writer
                        .create_element("address")
                        .with_attributes([("bus", bus.as_str()), ("device", device.as_str())])
                        .write_empty()?;
                    Ok(())
                })?;
            writer
                .create_element("alias")
                .with_attribute(("name", hostdev.alias.as_str()))
                .write_empty()?;
            Ok(())
        })
        .map_err(|source| HostdevXmlError::WriteHostdev {
            id,
            address,
            source,
        })?;
    // The writer only ever received `&str`s, so its bytes are UTF-8.
    Ok(String::from_utf8(writer.into_inner()).expect("quick-xml wrote UTF-8 from UTF-8 input"))
}

/// Where the reader is inside the domain XML. Only `/domain/devices/hostdev` elements in
/// no namespace count, so look-alikes inside `<metadata>` (which libvirt requires to be
/// namespaced, but which may use any element names) or `<qemu:commandline>` never do.
#[derive(Debug)]
struct HostdevInProgress {
    hostdev: UsbHostdev,
    /// Whether the reader is inside this hostdev's `<source>`.
    in_source: bool,
}

impl HostdevInProgress {
    fn new() -> Self {
        HostdevInProgress {
            hostdev: UsbHostdev {
                alias: None,
                id: None,
                address: None,
            },
            in_source: false,
        }
    }
}

/// Every USB hostdev (`<devices><hostdev mode='subsystem' type='usb'>`) of a domain's
/// XML, in document order. PCI, SCSI and mdev hostdevs, `<redirdev>`s and everything
/// else are ignored; unknown elements and attributes are tolerated.
pub fn parse_usb_hostdevs(domain_xml: &str) -> Result<Vec<UsbHostdev>, HostdevXmlError> {
    let mut reader = NsReader::from_str(domain_xml);
    let mut found = Vec::new();
    // Depth of the element we are in: 0 outside the root, 1 inside <domain>, ...
    let mut depth: usize = 0;
    let mut in_devices = false;
    let mut current: Option<HostdevInProgress> = None;
    let mut saw_root = false;

    loop {
        let position = reader.buffer_position();
        let (namespace, event) = match reader.read_resolved_event() {
            Ok(resolved) => resolved,
            Err(source) => {
                return Err(HostdevXmlError::ParseDomainXml {
                    position: reader.error_position(),
                    source,
                })
            }
        };
        let unqualified = matches!(namespace, ResolveResult::Unbound);
        if matches!(event, Event::Start(_) | Event::Empty(_)) && depth == 0 {
            saw_root = true;
        }
        match event {
            Event::Start(element) => {
                visit_element(
                    &element,
                    unqualified,
                    depth,
                    position,
                    &mut in_devices,
                    &mut current,
                    true,
                )?;
                depth += 1;
            }
            Event::Empty(element) => {
                visit_element(
                    &element,
                    unqualified,
                    depth,
                    position,
                    &mut in_devices,
                    &mut current,
                    false,
                )?;
                // An empty <hostdev/> or <devices/> opens and closes at once.
                leave_element(depth, &mut in_devices, &mut current, &mut found);
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                leave_element(depth, &mut in_devices, &mut current, &mut found);
            }
            Event::Eof => {
                if depth != 0 || !saw_root {
                    return Err(HostdevXmlError::TruncatedDomainXml);
                }
                return Ok(found);
            }
            // Text, CDATA, comments, processing instructions and the DOCTYPE carry no
            // hostdevs. Text is never unescaped, so hostile descriptions cost nothing.
            _ => {}
        }
    }
}

/// Handles an element that opens at `depth` (0 for the root).
fn visit_element(
    element: &BytesStart<'_>,
    unqualified: bool,
    depth: usize,
    position: u64,
    in_devices: &mut bool,
    current: &mut Option<HostdevInProgress>,
    has_children: bool,
) -> Result<(), HostdevXmlError> {
    let name = element.local_name();
    let name = name.as_ref();
    if depth == 0 {
        if name != b"domain" {
            return Err(HostdevXmlError::NotDomainXml {
                root: String::from_utf8_lossy(element.name().as_ref()).into_owned(),
            });
        }
        return Ok(());
    }
    if !unqualified {
        return Ok(());
    }
    match (depth, name) {
        (1, b"devices") => *in_devices = has_children,
        (2, b"hostdev") if *in_devices => {
            let mode = attribute(element, b"mode", position)?;
            let kind = attribute(element, b"type", position)?;
            if mode.as_deref() == Some("subsystem") && kind.as_deref() == Some("usb") {
                *current = Some(HostdevInProgress::new());
            }
        }
        (3, b"source") => {
            if let Some(hostdev) = current.as_mut() {
                hostdev.in_source = has_children;
            }
        }
        (3, b"alias") => {
            if let Some(hostdev) = current.as_mut() {
                hostdev.hostdev.alias = attribute(element, b"name", position)?;
            }
        }
        (4, b"vendor" | b"product" | b"address") => {
            let Some(hostdev) = current.as_mut().filter(|h| h.in_source) else {
                return Ok(());
            };
            read_source_child(element, name, position, &mut hostdev.hostdev)?;
        }
        _ => {}
    }
    Ok(())
}

/// Handles the end of the element that was open at `depth`.
fn leave_element(
    depth: usize,
    in_devices: &mut bool,
    current: &mut Option<HostdevInProgress>,
    found: &mut Vec<UsbHostdev>,
) {
    match depth {
        1 => *in_devices = false,
        2 => {
            if let Some(done) = current.take() {
                found.push(done.hostdev);
            }
        }
        3 => {
            if let Some(hostdev) = current.as_mut() {
                hostdev.in_source = false;
            }
        }
        _ => {}
    }
}

/// `<vendor id>`, `<product id>` or `<address bus device>` inside a USB hostdev's source.
fn read_source_child(
    element: &BytesStart<'_>,
    name: &[u8],
    position: u64,
    hostdev: &mut UsbHostdev,
) -> Result<(), HostdevXmlError> {
    match name {
        b"vendor" | b"product" => {
            let element_name = if name == b"vendor" {
                "vendor"
            } else {
                "product"
            };
            let Some(value) = attribute(element, b"id", position)? else {
                return Ok(());
            };
            let number = parse_u16(&value, position, element_name, "id")?;
            let id = hostdev.id.get_or_insert(UsbId {
                vendor: 0,
                product: 0,
            });
            if name == b"vendor" {
                id.vendor = number;
            } else {
                id.product = number;
            }
        }
        _ => {
            let bus = attribute(element, b"bus", position)?;
            let device = attribute(element, b"device", position)?;
            if let (Some(bus), Some(device)) = (bus, device) {
                hostdev.address = Some(BusAddress {
                    bus: parse_u16(&bus, position, "address", "bus")?,
                    device: parse_u16(&device, position, "address", "device")?,
                });
            }
        }
    }
    Ok(())
}

/// The unescaped value of the unprefixed attribute `key`, if present.
fn attribute(
    element: &BytesStart<'_>,
    key: &[u8],
    position: u64,
) -> Result<Option<String>, HostdevXmlError> {
    for attribute in element.attributes() {
        let attribute = attribute.map_err(|source| HostdevXmlError::ParseDomainXml {
            position,
            source: source.into(),
        })?;
        if attribute.key.as_ref() == key {
            let value = attribute
                .unescape_value()
                .map_err(|source| HostdevXmlError::ParseDomainXml { position, source })?;
            return Ok(Some(value.into_owned()));
        }
    }
    Ok(None)
}

fn parse_u16(
    value: &str,
    position: u64,
    element: &'static str,
    attribute: &'static str,
) -> Result<u16, HostdevXmlError> {
    c_number::parse_whole(value.as_bytes(), 0)
        .and_then(|number| u16::try_from(number).ok())
        .ok_or_else(|| HostdevXmlError::InvalidNumber {
            position,
            element,
            attribute,
            value: value.to_string(),
            bits: 16,
        })
}

#[cfg(test)]
mod tests {
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
        let xml =
            build_usb_hostdev(&spec(hostile.id(), hostile.address(), "ua-usbpass-1-5")).unwrap();
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
}
