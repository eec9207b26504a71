//! The host's view of one USB device: the identity that rules match on and that
//! hostdevs point at.

pub mod access;
pub mod alias;
pub mod port;
mod wire;

use serde::{Deserialize, Serialize};
use std::fmt;

/// USB device class of a hub. Hubs are never passed through.
pub const HUB_CLASS: u8 = 0x09;

/// One interface's class triple, as in `bInterfaceClass:bInterfaceSubClass:bInterfaceProtocol`.
/// In JSON it is written the way rules and lsusb spell it: `"03:01:01"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct InterfaceClass {
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
}

/// A present USB device (udev's `usb_device`, not its interfaces). In JSON (`--json`,
/// the state file) its IDs and classes are hex text the way users type them, and it
/// says whether it is a hub; see `wire`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "wire::UsbDeviceJson", try_from = "wire::UsbDeviceJson")]
pub struct UsbDevice {
    /// The sysfs path, the key that `remove` events carry.
    pub syspath: String,
    /// Bus number, decimal.
    pub bus: u16,
    /// Device number on the bus, decimal. Changes on every replug.
    pub devnum: u16,
    pub vendor_id: u16,
    pub product_id: u16,
    /// `serial` from sysfs, decoded lossily: USB serials are bytes, not text.
    pub serial: Option<String>,
    /// The kernel's name for the physical port, e.g. `1-2.3`; stable across replugs.
    pub port_path: String,
    /// The kernel name of the parent hub, e.g. `1-2` or the root hub `usb1`.
    pub parent_hub: Option<String>,
    pub device_class: u8,
    pub interface_classes: Vec<InterfaceClass>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    /// udev hwdb names (`ID_VENDOR_FROM_DATABASE`, `ID_MODEL_FROM_DATABASE`), as lsusb shows them.
    pub vendor_from_database: Option<String>,
    pub model_from_database: Option<String>,
    /// The device's strings (`serial`, `manufacturer`, `product`) are not read yet. The
    /// kernel holds a device's lock while it sets it up, and reading a string waits for
    /// that; a hotplugged device is known from its uevent at once and its strings
    /// follow. Until then a rule that needs the serial can neither match it nor be
    /// passed over.
    pub strings_pending: bool,
}

impl UsbDevice {
    /// A device that is not plugged in, known only by its ID or its port: what `usbpass
    /// assign` writes a rule for ahead of the plug.
    pub fn not_plugged_in(id: UsbId, port_path: &str) -> UsbDevice {
        UsbDevice {
            syspath: String::new(),
            bus: 0,
            devnum: 0,
            vendor_id: id.vendor,
            product_id: id.product,
            serial: None,
            port_path: port_path.to_string(),
            parent_hub: None,
            device_class: 0,
            interface_classes: Vec::new(),
            manufacturer: None,
            product: None,
            vendor_from_database: None,
            model_from_database: None,
            strings_pending: false,
        }
    }

    pub fn is_hub(&self) -> bool {
        self.device_class == HUB_CLASS
    }

    /// A human name: the device's own strings first, then the hwdb names.
    pub fn display_name(&self) -> String {
        let vendor = self
            .manufacturer
            .as_deref()
            .or(self.vendor_from_database.as_deref());
        let model = self
            .product
            .as_deref()
            .or(self.model_from_database.as_deref());
        match (vendor, model) {
            // "Dell" + "Dell KB216 Wired Keyboard" must not read "Dell Dell KB216 ...".
            (Some(v), Some(m)) if m.starts_with(v) => m.to_string(),
            (Some(v), Some(m)) => format!("{v} {m}"),
            (None, Some(m)) => m.to_string(),
            (Some(v), None) => v.to_string(),
            (None, None) => String::new(),
        }
    }

    pub fn address(&self) -> BusAddress {
        BusAddress {
            bus: self.bus,
            device: self.devnum,
        }
    }

    pub fn id(&self) -> UsbId {
        UsbId {
            vendor: self.vendor_id,
            product: self.product_id,
        }
    }
}

/// `bus:device`, both decimal. Identifies one plug of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BusAddress {
    pub bus: u16,
    pub device: u16,
}

impl fmt::Display for BusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03}:{:03}", self.bus, self.device)
    }
}

/// `vendor:product`, printed as four hex digits each; in JSON too (`"046d:c52b"`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct UsbId {
    pub vendor: u16,
    pub product: u16,
}

impl fmt::Display for UsbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)
    }
}

impl fmt::Display for UsbDevice {
    /// `046d:c52b at 001:005 (port 1-2)`: what log lines and errors call a device.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {} (port {})",
            self.id(),
            self.address(),
            self.port_path
        )
    }
}
