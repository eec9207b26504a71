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
mod tests;
