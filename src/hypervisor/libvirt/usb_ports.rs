//! How many USB ports a domain's controllers have and how many its USB devices take,
//! read from its live XML, for `usbpass why`. Only the counting lives here; libvirt's
//! XML is read with quick-xml like the rest of this folder.

use quick_xml::events::Event;
use quick_xml::reader::Reader;

/// The USB ports of one domain: `total` is `None` when a USB controller does not say
/// how many ports it has (`<controller type='usb'>` without `ports=`, where QEMU's
/// default for the model applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UsbPortUsage {
    pub total: Option<u32>,
    /// Devices with a USB address: hostdevs, inputs, redirdevs, hubs.
    pub used: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UsbPortsError {
    #[error("cannot parse domain xml at byte {position}: {source}")]
    ParseDomainXml {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
}

/// Counts the USB ports in a domain's XML. A controller with `model='none'` has none.
pub fn usb_port_usage(domain_xml: &str) -> Result<UsbPortUsage, UsbPortsError> {
    let mut reader = Reader::from_str(domain_xml);
    let mut total = Some(0u32);
    let mut used = 0u32;
    let mut depth = 0usize;
    // Depth of the <devices> element's children.
    let mut devices_depth: Option<usize> = None;
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|source| UsbPortsError::ParseDomainXml { position, source })?;
        let (element, empty) = match &event {
            Event::Start(element) => (Some(element.clone()), false),
            Event::Empty(element) => (Some(element.clone()), true),
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if devices_depth.is_some_and(|d| depth < d) {
                    devices_depth = None;
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let Some(element) = element else { continue };
        let attribute = |name: &[u8]| {
            element
                .attributes()
                .flatten()
                .find(|attribute| attribute.key.as_ref() == name)
                .map(|attribute| String::from_utf8_lossy(&attribute.value).into_owned())
        };
        match element.name().as_ref() {
            b"devices" if depth == 1 => devices_depth = Some(depth + 1),
            b"controller"
                if devices_depth == Some(depth)
                    && attribute(b"type").as_deref() == Some("usb")
                    && attribute(b"model").as_deref() != Some("none") =>
            {
                match attribute(b"ports").and_then(|ports| ports.parse::<u32>().ok()) {
                    Some(ports) => total = total.map(|sum| sum + ports),
                    None => total = None,
                }
            }
            b"address"
                if devices_depth.is_some_and(|d| depth > d)
                    && attribute(b"type").as_deref() == Some("usb") =>
            {
                used += 1;
            }
            _ => {}
        }
        if !empty {
            depth += 1;
        }
    }
    Ok(UsbPortUsage { total, used })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_summed_and_usb_addresses_counted() {
        let xml = "<domain type='kvm'><name>vm</name><devices>
            <controller type='usb' index='0' model='qemu-xhci' ports='15'>
              <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
            </controller>
            <controller type='pci' index='0' model='pcie-root'/>
            <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>
            <hostdev mode='subsystem' type='usb'>
              <source><vendor id='0x046d'/><product id='0xc52b'/><address bus='1' device='5'/></source>
              <alias name='ua-usbpass-1-5-046d-c52b'/>
              <address type='usb' bus='0' port='2'/>
            </hostdev>
          </devices></domain>";
        assert_eq!(
            usb_port_usage(xml).unwrap(),
            UsbPortUsage {
                total: Some(15),
                used: 2
            }
        );
    }

    #[test]
    fn a_controller_without_ports_leaves_the_total_unknown_and_none_has_none() {
        let xml = "<domain><devices><controller type='usb' model='qemu-xhci'/></devices></domain>";
        assert_eq!(usb_port_usage(xml).unwrap().total, None);
        let xml = "<domain><devices><controller type='usb' model='none'/></devices></domain>";
        assert_eq!(usb_port_usage(xml).unwrap().total, Some(0));
    }

    #[test]
    fn odd_ports_leave_the_total_unknown_and_broken_xml_is_an_error() {
        let xml = "<domain><devices><controller type='usb' ports='x'/></devices></domain>";
        assert_eq!(usb_port_usage(xml).unwrap().total, None);
        assert!(usb_port_usage("<domain></devices>").is_err());
    }
}
