//! The JSON shape of the model types (`usbpass list --json`, `status --json`, the state
//! file): USB IDs and classes as the hex text users type and lsusb prints (`"046d:c52b"`,
//! `"03:01:01"`), never as decimal numbers, and a device's hub flag spelled out.

use super::{InterfaceClass, UsbDevice, UsbId};
use serde::{Deserialize, Serialize};

// Every variant is a parse that failed, named after it as crosvm names errors.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{text:?} is not a usb id (vvvv:pppp, hex)")]
    ParseUsbId { text: String },
    #[error("{text:?} is not an interface class (cc:ss:pp, hex)")]
    ParseInterfaceClass { text: String },
    #[error("{text:?} is not a device class (two hex digits)")]
    ParseDeviceClass { text: String },
}

fn hex_fields<const N: usize>(text: &str) -> Option<[u16; N]> {
    let mut fields = [0u16; N];
    let mut parts = text.split(':');
    for field in &mut fields {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 4 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *field = u16::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(fields)
}

impl From<UsbId> for String {
    fn from(id: UsbId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for UsbId {
    type Error = WireError;
    fn try_from(text: String) -> Result<UsbId, WireError> {
        let [vendor, product] =
            hex_fields::<2>(&text).ok_or(WireError::ParseUsbId { text: text.clone() })?;
        Ok(UsbId { vendor, product })
    }
}

impl From<InterfaceClass> for String {
    fn from(class: InterfaceClass) -> String {
        format!(
            "{:02x}:{:02x}:{:02x}",
            class.class, class.subclass, class.protocol
        )
    }
}

impl TryFrom<String> for InterfaceClass {
    type Error = WireError;
    fn try_from(text: String) -> Result<InterfaceClass, WireError> {
        let error = || WireError::ParseInterfaceClass { text: text.clone() };
        let fields = hex_fields::<3>(&text).ok_or_else(error)?;
        let [class, subclass, protocol] = fields.map(|field| u8::try_from(field).ok());
        Ok(InterfaceClass {
            class: class.ok_or_else(error)?,
            subclass: subclass.ok_or_else(error)?,
            protocol: protocol.ok_or_else(error)?,
        })
    }
}

/// `UsbDevice` as JSON. `id` and `class` are hex text; `hub` is written for readers
/// and ignored when read back (it follows from the class).
#[derive(Serialize, Deserialize)]
pub struct UsbDeviceJson {
    syspath: String,
    bus: u16,
    devnum: u16,
    id: UsbId,
    hub: bool,
    serial: Option<String>,
    port_path: String,
    parent_hub: Option<String>,
    /// `bDeviceClass`, two hex digits.
    class: String,
    interface_classes: Vec<InterfaceClass>,
    manufacturer: Option<String>,
    product: Option<String>,
    vendor_from_database: Option<String>,
    model_from_database: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    strings_pending: bool,
}

impl From<UsbDevice> for UsbDeviceJson {
    fn from(device: UsbDevice) -> UsbDeviceJson {
        UsbDeviceJson {
            id: device.id(),
            hub: device.is_hub(),
            class: format!("{:02x}", device.device_class),
            syspath: device.syspath,
            bus: device.bus,
            devnum: device.devnum,
            serial: device.serial,
            port_path: device.port_path,
            parent_hub: device.parent_hub,
            interface_classes: device.interface_classes,
            manufacturer: device.manufacturer,
            product: device.product,
            vendor_from_database: device.vendor_from_database,
            model_from_database: device.model_from_database,
            strings_pending: device.strings_pending,
        }
    }
}

impl TryFrom<UsbDeviceJson> for UsbDevice {
    type Error = WireError;
    fn try_from(json: UsbDeviceJson) -> Result<UsbDevice, WireError> {
        let device_class = (json.class.len() == 2)
            .then(|| u8::from_str_radix(&json.class, 16).ok())
            .flatten()
            .ok_or(WireError::ParseDeviceClass {
                text: json.class.clone(),
            })?;
        Ok(UsbDevice {
            syspath: json.syspath,
            bus: json.bus,
            devnum: json.devnum,
            vendor_id: json.id.vendor,
            product_id: json.id.product,
            serial: json.serial,
            port_path: json.port_path,
            parent_hub: json.parent_hub,
            device_class,
            interface_classes: json.interface_classes,
            manufacturer: json.manufacturer,
            product: json.product,
            vendor_from_database: json.vendor_from_database,
            model_from_database: json.model_from_database,
            strings_pending: json.strings_pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::devices::device;

    #[test]
    fn ids_and_classes_are_hex_text_and_hubs_are_marked() {
        let mut receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        receiver.interface_classes = vec![super::InterfaceClass {
            class: 3,
            subclass: 1,
            protocol: 2,
        }];
        let json = serde_json::to_value(&receiver).unwrap();
        assert_eq!(json["id"], "046d:c52b");
        assert_eq!(json["hub"], false);
        assert_eq!(json["class"], "00");
        assert_eq!(json["interface_classes"][0], "03:01:02");
        assert!(json.get("vendor_id").is_none());
        let back: crate::model::UsbDevice = serde_json::from_value(json).unwrap();
        assert_eq!(back, receiver);

        let mut hub = device(1, 2, 0x05e3, 0x0610, "1-1");
        hub.device_class = 9;
        let json = serde_json::to_value(&hub).unwrap();
        assert_eq!(
            (json["hub"].clone(), json["class"].clone()),
            (true.into(), "09".into())
        );
    }

    #[test]
    fn malformed_ids_are_refused_when_read_back() {
        for text in ["046d", "046d:c52b:1", "46d:xyz", "12345:0001", ":0001"] {
            assert!(
                serde_json::from_value::<crate::model::UsbId>(text.into()).is_err(),
                "{text}"
            );
        }
        assert_eq!(
            serde_json::from_value::<crate::model::UsbId>("46d:c52b".into()).unwrap(),
            crate::model::UsbId {
                vendor: 0x046d,
                product: 0xc52b
            }
        );
    }
}
