//! libvirt's node devices as `UsbDevice`s: the XML of a `usb_device` node and of its
//! `usb` (interface) nodes, and the one conversion to the identity rules match on. What
//! libvirt does not report stays unknown here; the source that uses this module
//! (`node_device_source`) and the rules check (`host::select`) refuse what needs it.
//!
//! What libvirt 9 reports, from its udev backend (`node_device_udev.c`,
//! `udevProcessUSBDevice` and `udevProcessUSBInterface`) and its formatter
//! (`node_device_conf.c`):
//! - the node: `<name>` (`usb_` and the kernel name with every non-alphanumeric byte
//!   made `_`, e.g. `usb_1_2_3`, `usb_usb1`), `<path>` (the sysfs path), `<parent>`;
//! - `usb_device`: `<bus>` and `<device>` in decimal (udev's `BUSNUM`, `DEVNUM`),
//!   `<vendor id='0x%04x'>` and `<product id='0x%04x'>` (`ID_VENDOR_ID`, `ID_MODEL_ID`)
//!   with a text that is udev's hwdb name, or the device's own `manufacturer`/`product`
//!   string when hwdb has none;
//! - `usb` (one interface): `<number>`, `<class>`, `<subclass>`, `<protocol>`, decimal.
//!
//! Not reported: the serial number, the device's own class (`bDeviceClass`), and which
//! of the two the vendor and product texts are. The port path and the parent hub are
//! the kernel name, the last component of `<path>`, and its prefix; that a device is a
//! hub follows from its interface (the USB specification gives a hub's interface class
//! 09, and no other device's).

use crate::model::port::{is_usb_device_name, parent_hub_of};
use crate::model::{InterfaceClass, UsbDevice, HUB_CLASS};
use crate::util::c_number;
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;

#[derive(Debug, thiserror::Error)]
pub enum NodeDeviceXmlError {
    #[error("cannot parse node device xml at byte {position}: {source}")]
    ParseNodeDeviceXml {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("cannot parse node device xml: the root element is <{root}>, not <device>")]
    NotNodeDeviceXml { root: String },
    #[error("cannot parse node device xml: it ends before the <device> element does")]
    TruncatedNodeDeviceXml,
    #[error("bad node device {name}: <{element}> is missing")]
    MissingElement { name: String, element: &'static str },
    #[error("bad node device {name}: <{element}> {value:?} is not an unsigned {bits}-bit number")]
    InvalidNumber {
        name: String,
        element: &'static str,
        value: String,
        bits: u32,
    },
}

/// One node device, as far as USB cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeDevice {
    UsbDevice(UsbDeviceNode),
    UsbInterface(UsbInterfaceNode),
    /// Any other capability (PCI, net, storage, ...).
    Other {
        name: String,
    },
}

/// A `usb_device` node: one plug of one USB device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDeviceNode {
    pub name: String,
    /// `<path>`, the sysfs path on the host libvirt runs on.
    pub sysfs_path: Option<String>,
    pub parent: Option<String>,
    pub bus: u16,
    pub device: u16,
    pub vendor_id: u16,
    pub product_id: u16,
    /// hwdb's name, or the device's `manufacturer` string when hwdb has none.
    pub vendor_name: Option<String>,
    /// hwdb's name, or the device's `product` string when hwdb has none.
    pub product_name: Option<String>,
}

/// A `usb` node: one interface of the `usb_device` node named by `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbInterfaceNode {
    pub name: String,
    pub parent: Option<String>,
    pub class: InterfaceClass,
}

impl NodeDevice {
    pub fn name(&self) -> &str {
        match self {
            NodeDevice::UsbDevice(node) => &node.name,
            NodeDevice::UsbInterface(node) => &node.name,
            NodeDevice::Other { name } => name,
        }
    }
}

/// The text of the elements that matter, collected while reading.
#[derive(Default)]
struct Collected {
    name: Option<String>,
    path: Option<String>,
    parent: Option<String>,
    /// The first `<capability type=...>` directly under `<device>`.
    capability: Option<String>,
    bus: Option<String>,
    device: Option<String>,
    vendor_id: Option<String>,
    vendor_name: Option<String>,
    product_id: Option<String>,
    product_name: Option<String>,
    number: Option<String>,
    class: Option<String>,
    subclass: Option<String>,
    protocol: Option<String>,
}

/// Parses the XML of one node device (`virNodeDeviceGetXMLDesc`). Unknown elements and
/// attributes are tolerated; a `usb_device` or `usb` node without its numbers is an
/// error that names the node.
pub fn parse_node_device(xml: &str) -> Result<NodeDevice, NodeDeviceXmlError> {
    let mut reader = Reader::from_str(xml);
    let mut collected = Collected::default();
    // The open elements' local names, root first.
    let mut stack: Vec<String> = Vec::new();
    // Text of the innermost open element, when it is one we keep.
    let mut text = String::new();
    let mut saw_root = false;
    // Only the first capability of the device counts; nested ones (a `usb_device` has
    // none, but PCI nodes nest capabilities) are skipped.
    let mut capability_seen = false;
    loop {
        let position = reader.buffer_position();
        let parse_error = |source| NodeDeviceXmlError::ParseNodeDeviceXml { position, source };
        let event = reader.read_event().map_err(parse_error)?;
        match event {
            Event::Start(element) | Event::Empty(element) if stack.is_empty() && saw_root => {
                // A second root element: the first one has ended.
                return Err(NodeDeviceXmlError::NotNodeDeviceXml {
                    root: local_name(&element),
                });
            }
            Event::Start(element) => {
                let local = local_name(&element);
                if stack.is_empty() {
                    saw_root = true;
                    if local != "device" {
                        return Err(NodeDeviceXmlError::NotNodeDeviceXml { root: local });
                    }
                }
                visit(
                    &element,
                    &stack,
                    &mut collected,
                    &mut capability_seen,
                    position,
                )?;
                stack.push(local);
                text.clear();
            }
            Event::Empty(element) => {
                let local = local_name(&element);
                if stack.is_empty() {
                    saw_root = true;
                    if local != "device" {
                        return Err(NodeDeviceXmlError::NotNodeDeviceXml { root: local });
                    }
                }
                visit(
                    &element,
                    &stack,
                    &mut collected,
                    &mut capability_seen,
                    position,
                )?;
            }
            Event::Text(content) => {
                let unescaped = content.unescape().map_err(parse_error)?;
                text.push_str(&unescaped);
            }
            Event::CData(content) => {
                text.push_str(&String::from_utf8_lossy(&content));
            }
            Event::End(_) => {
                let path: Vec<&str> = stack.iter().map(String::as_str).collect();
                let value = Some(text.trim().to_string());
                match path.as_slice() {
                    ["device", "name"] => collected.name = value,
                    ["device", "path"] => collected.path = value,
                    ["device", "parent"] => collected.parent = value,
                    ["device", "capability", field] if capability_seen => {
                        let slot = match *field {
                            "bus" => &mut collected.bus,
                            "device" => &mut collected.device,
                            "vendor" => &mut collected.vendor_name,
                            "product" => &mut collected.product_name,
                            "number" => &mut collected.number,
                            "class" => &mut collected.class,
                            "subclass" => &mut collected.subclass,
                            "protocol" => &mut collected.protocol,
                            _ => &mut None,
                        };
                        if slot.is_none() {
                            *slot = value;
                        }
                    }
                    _ => {}
                }
                stack.pop();
                text.clear();
            }
            Event::Eof => {
                if !stack.is_empty() || !saw_root {
                    return Err(NodeDeviceXmlError::TruncatedNodeDeviceXml);
                }
                return finish(collected);
            }
            _ => {}
        }
    }
}

fn local_name(element: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(element.local_name().as_ref()).into_owned()
}

/// Notes what an opening element's attributes say: the capability's type and the IDs.
fn visit(
    element: &BytesStart<'_>,
    stack: &[String],
    collected: &mut Collected,
    capability_seen: &mut bool,
    position: u64,
) -> Result<(), NodeDeviceXmlError> {
    let path: Vec<&str> = stack.iter().map(String::as_str).collect();
    let local = local_name(element);
    match (path.as_slice(), local.as_str()) {
        (["device"], "capability") if !*capability_seen => {
            *capability_seen = true;
            collected.capability = attribute(element, b"type", position)?;
        }
        (["device", "capability"], "vendor") if collected.vendor_id.is_none() => {
            collected.vendor_id = attribute(element, b"id", position)?;
        }
        (["device", "capability"], "product") if collected.product_id.is_none() => {
            collected.product_id = attribute(element, b"id", position)?;
        }
        _ => {}
    }
    Ok(())
}

fn attribute(
    element: &BytesStart<'_>,
    key: &[u8],
    position: u64,
) -> Result<Option<String>, NodeDeviceXmlError> {
    for attribute in element.attributes() {
        let attribute = attribute.map_err(|source| NodeDeviceXmlError::ParseNodeDeviceXml {
            position,
            source: source.into(),
        })?;
        if attribute.key.local_name().as_ref() == key {
            let value = attribute
                .unescape_value()
                .map_err(|source| NodeDeviceXmlError::ParseNodeDeviceXml { position, source })?;
            return Ok(Some(value.into_owned()));
        }
    }
    Ok(None)
}

fn finish(collected: Collected) -> Result<NodeDevice, NodeDeviceXmlError> {
    let name = collected
        .name
        .clone()
        .ok_or(NodeDeviceXmlError::MissingElement {
            name: "without a name".to_string(),
            element: "name",
        })?;
    let non_empty = |value: Option<String>| value.filter(|text| !text.is_empty());
    let required = |value: &Option<String>, element: &'static str| {
        value
            .clone()
            .ok_or_else(|| NodeDeviceXmlError::MissingElement {
                name: name.clone(),
                element,
            })
    };
    // libvirt writes these with %d (decimal) and the IDs with 0x%04x; read both as its
    // own parser does, C strtoul with base 0.
    let number = |value: &Option<String>, element: &'static str, bits: u32| {
        let text = required(value, element)?;
        c_number::parse_whole(text.as_bytes(), 0)
            .filter(|number| *number < (1u64 << bits))
            .ok_or(NodeDeviceXmlError::InvalidNumber {
                name: name.clone(),
                element,
                value: text,
                bits,
            })
    };
    match collected.capability.as_deref() {
        Some("usb_device") => Ok(NodeDevice::UsbDevice(UsbDeviceNode {
            bus: number(&collected.bus, "bus", 16)? as u16,
            device: number(&collected.device, "device", 16)? as u16,
            vendor_id: number(&collected.vendor_id, "vendor id", 16)? as u16,
            product_id: number(&collected.product_id, "product id", 16)? as u16,
            vendor_name: non_empty(collected.vendor_name),
            product_name: non_empty(collected.product_name),
            sysfs_path: non_empty(collected.path),
            parent: non_empty(collected.parent),
            name,
        })),
        Some("usb") => Ok(NodeDevice::UsbInterface(UsbInterfaceNode {
            class: InterfaceClass {
                class: number(&collected.class, "class", 8)? as u8,
                subclass: number(&collected.subclass, "subclass", 8)? as u8,
                protocol: number(&collected.protocol, "protocol", 8)? as u8,
            },
            parent: non_empty(collected.parent),
            name,
        })),
        _ => Ok(NodeDevice::Other { name }),
    }
}

/// Why a `usb_device` node cannot be a `UsbDevice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// No `<path>`, or one whose last component is no USB kernel name: without it the
    /// daemon cannot key the device, nor match `port` and `hub`.
    NoSysfsPath,
    /// None of its interfaces is known (yet): it cannot be told from a hub.
    NoInterfaces,
}

/// The one conversion from a `usb_device` node and the classes of its interfaces to a
/// `UsbDevice`. The serial is None (libvirt has none), the strings are not read
/// (`manufacturer`, `product` None; libvirt's names go to the hwdb fields, whose role
/// they play), and the device class is 09 when an interface is a hub's and 00 ("see the
/// interfaces") otherwise: libvirt does not report the device's own class.
pub fn usb_device_from_node(
    node: &UsbDeviceNode,
    interfaces: &[InterfaceClass],
) -> Result<UsbDevice, Unusable> {
    let syspath = node.sysfs_path.as_deref().ok_or(Unusable::NoSysfsPath)?;
    let kernel_name = syspath
        .rsplit('/')
        .next()
        .filter(|name| is_usb_device_name(name))
        .ok_or(Unusable::NoSysfsPath)?;
    if interfaces.is_empty() {
        return Err(Unusable::NoInterfaces);
    }
    let mut interface_classes: Vec<InterfaceClass> = Vec::new();
    for class in interfaces {
        if !interface_classes.contains(class) {
            interface_classes.push(*class);
        }
    }
    let is_hub = interface_classes.iter().any(|i| i.class == HUB_CLASS);
    Ok(UsbDevice {
        syspath: syspath.to_string(),
        bus: node.bus,
        devnum: node.device,
        vendor_id: node.vendor_id,
        product_id: node.product_id,
        serial: None,
        port_path: kernel_name.to_string(),
        parent_hub: parent_hub_of(kernel_name),
        device_class: if is_hub { HUB_CLASS } else { 0 },
        interface_classes,
        manufacturer: None,
        product: None,
        vendor_from_database: node.vendor_name.clone(),
        model_from_database: node.product_name.clone(),
        strings_pending: false,
    })
}

#[cfg(test)]
mod tests;
