//! One device's sysfs attributes and udev properties turned into a `UsbDevice`: the one
//! conversion and the one set of attribute value parsers that the udev reader (`udev`)
//! and the sysfs reader (`sysfs`) share, so that the daemon and the wrapper see the
//! same identity for the same device.

use crate::model::{InterfaceClass, UsbDevice};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// What the conversion reads of one device. udev devices and sysfs device folders
/// implement it; the unit tests implement it over maps.
pub(super) trait DeviceAttributes {
    fn syspath(&self) -> String;
    /// The kernel name, e.g. `1-2.3` or `usb1`.
    fn sysname(&self) -> String;
    /// A udev property: from the uevent, udev's database, or the event itself. None for
    /// a reader without udev.
    fn property(&self, name: &str) -> Option<OsString>;
    /// A sysfs attribute, read from the device's directory now, without the newline
    /// the kernel ends it with (as libudev returns it).
    fn attribute(&self, name: &str) -> Option<OsString>;
    /// The kernel name of the parent `usb_device`: a hub or root hub.
    fn parent_hub(&self) -> Option<String>;
    /// The class triples of the interfaces below the device in sysfs.
    fn interface_children(&self) -> Vec<InterfaceClass>;
}

/// The one conversion from a device's attributes and properties to a `UsbDevice`.
///
/// Identity comes from raw sysfs first: it is what the kernel and QEMU see, while udev's
/// copies are sanitised (`ID_SERIAL_SHORT` turns spaces and odd bytes into `_`). udev's
/// properties are the fallback, for a device whose sysfs went away under us; they come
/// from the uevent (`BUSNUM`, `DEVNUM`, `PRODUCT`, `TYPE`) or from udev's builtins. The
/// hwdb names and `ID_USB_INTERFACES` exist only in udev. A reader without udev has no
/// properties, so for it sysfs is all there is. Errs with the name of the first
/// missing mandatory field: vendor, product, bus, device number and device class (without
/// the class a hub could not be told apart, and hubs are never passed through).
pub(super) fn usb_device_from_attributes(
    device: &dyn DeviceAttributes,
) -> Result<UsbDevice, &'static str> {
    convert(device, Reading::Whole)
}

/// A device as its own uevent names it, for the hotplug monitor: the identity from
/// the event's properties (`PRODUCT`, `BUSNUM`, `DEVNUM`, `TYPE`: this plug, even when
/// sysfs already holds the next one on the same port), sysfs only where the event is
/// silent, and no string read at all. Reading `serial`, `manufacturer` or `product`
/// waits for the device's lock, which the kernel holds while it configures the device
/// and while it tears it down; the strings follow (`strings_pending`). Errs like
/// `usb_device_from_attributes`, and on device number 0, which the kernel reports
/// while it resets a device (when QEMU claims it), not for a plug.
pub(super) fn usb_device_from_event(
    device: &dyn DeviceAttributes,
) -> Result<UsbDevice, &'static str> {
    convert(device, Reading::Announce)
}

/// Which of the two conversions above: where identity comes from first, and whether
/// the strings are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// sysfs first, then udev's and the uevent's properties; the strings too.
    Whole,
    /// The uevent's properties first, then sysfs; no strings.
    Announce,
}

impl Reading {
    /// One field from sysfs or from the properties, in the order this reading asks for.
    fn first<T>(
        self,
        from_sysfs: impl FnOnce() -> Option<T>,
        from_properties: impl FnOnce() -> Option<T>,
    ) -> Option<T> {
        match self {
            Reading::Whole => from_sysfs().or_else(from_properties),
            Reading::Announce => from_properties().or_else(from_sysfs),
        }
    }
}

fn convert(device: &dyn DeviceAttributes, reading: Reading) -> Result<UsbDevice, &'static str> {
    let attribute = |name: &str, parse: fn(&OsStr) -> Option<u16>| {
        device.attribute(name).and_then(|value| parse(&value))
    };
    let property = |name: &str, parse: fn(&OsStr) -> Option<u16>| {
        device.property(name).and_then(|value| parse(&value))
    };
    let product_triple = device.property("PRODUCT");
    let product_part = |index: usize| -> Option<u16> {
        let text = product_triple.as_deref()?.to_str()?;
        parse_hex_u16(OsStr::new(text.split('/').nth(index)?))
    };
    let vendor_id = reading
        .first(
            || attribute("idVendor", parse_hex_u16),
            || property("ID_VENDOR_ID", parse_hex_u16).or_else(|| product_part(0)),
        )
        .ok_or("vendor id")?;
    let product_id = reading
        .first(
            || attribute("idProduct", parse_hex_u16),
            || property("ID_MODEL_ID", parse_hex_u16).or_else(|| product_part(1)),
        )
        .ok_or("product id")?;
    let bus = reading
        .first(
            || attribute("busnum", parse_decimal_u16),
            || property("BUSNUM", parse_decimal_u16),
        )
        .ok_or("bus number")?;
    let devnum = reading
        .first(
            || attribute("devnum", parse_decimal_u16),
            || property("DEVNUM", parse_decimal_u16),
        )
        .filter(|devnum| reading == Reading::Whole || *devnum != 0)
        .ok_or("device number")?;
    let device_class = reading
        .first(
            || {
                device
                    .attribute("bDeviceClass")
                    .and_then(|value| parse_hex_u8(&value))
            },
            // The kernel's TYPE is class/subclass/protocol in decimal.
            || {
                let kind = device.property("TYPE")?;
                kind.to_str()?.split('/').next()?.parse().ok()
            },
        )
        .ok_or("device class")?;
    let interface_classes = match device
        .property("ID_USB_INTERFACES")
        .and_then(|value| parse_usb_interfaces(&value))
    {
        Some(classes) => classes,
        None => device.interface_children(),
    };
    let text = |value: Option<OsString>| value.and_then(|value| lossy_text(&value));
    let whole = reading == Reading::Whole;
    let string = |name: &str| whole.then(|| text(device.attribute(name))).flatten();
    let serial = whole
        .then(|| {
            text(
                device
                    .attribute("serial")
                    .or_else(|| device.property("ID_SERIAL_SHORT")),
            )
        })
        .flatten();
    Ok(UsbDevice {
        syspath: device.syspath(),
        bus,
        devnum,
        vendor_id,
        product_id,
        serial,
        port_path: device.sysname(),
        parent_hub: device.parent_hub(),
        device_class,
        interface_classes,
        manufacturer: string("manufacturer"),
        product: string("product"),
        vendor_from_database: text(device.property("ID_VENDOR_FROM_DATABASE")),
        model_from_database: text(device.property("ID_MODEL_FROM_DATABASE")),
        strings_pending: !whole,
    })
}

/// One interface's class triple from its `bInterfaceClass`, `bInterfaceSubClass` and
/// `bInterfaceProtocol` attributes; None when one is missing or no hex byte.
pub(super) fn interface_class_from(
    attribute: impl Fn(&str) -> Option<OsString>,
) -> Option<InterfaceClass> {
    let byte = |name: &str| attribute(name).and_then(|value| parse_hex_u8(&value));
    Some(InterfaceClass {
        class: byte("bInterfaceClass")?,
        subclass: byte("bInterfaceSubClass")?,
        protocol: byte("bInterfaceProtocol")?,
    })
}

/// USB strings are bytes: decode lossily, and treat an empty string as absent.
pub(super) fn lossy_text(value: &OsStr) -> Option<String> {
    if value.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    }
}

/// A number's text without surrounding whitespace (a sysfs read ends in a newline);
/// None when it is no UTF-8.
fn ascii_trimmed(value: &OsStr) -> Option<&str> {
    value.to_str().map(str::trim)
}

/// 1 to 4 hex digits, as sysfs writes `idVendor` (`046d`): no sign, no `0x`.
fn parse_hex_u16(value: &OsStr) -> Option<u16> {
    let text = ascii_trimmed(value)?;
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

/// 1 or 2 hex digits, as sysfs writes `bDeviceClass` (`09`): no sign, no `0x`.
fn parse_hex_u8(value: &OsStr) -> Option<u8> {
    let text = ascii_trimmed(value)?;
    if text.is_empty() || text.len() > 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(text, 16).ok()
}

/// Decimal digits only, as sysfs writes `busnum` (`1`) and udev `BUSNUM` (`001`).
pub(super) fn parse_decimal_u16(value: &OsStr) -> Option<u16> {
    let text = ascii_trimmed(value)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// udev's `ID_USB_INTERFACES`, e.g. `:030101:030102:`: six hex digits per interface.
/// None when the value is malformed, so that the interface children are read instead.
fn parse_usb_interfaces(value: &OsStr) -> Option<Vec<InterfaceClass>> {
    let text = value.to_str()?;
    let mut classes = Vec::new();
    for part in text.split(':').filter(|part| !part.is_empty()) {
        if part.len() != 6 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let byte = |at: usize| u8::from_str_radix(&part[at..at + 2], 16).ok();
        let class = InterfaceClass {
            class: byte(0)?,
            subclass: byte(2)?,
            protocol: byte(4)?,
        };
        if !classes.contains(&class) {
            classes.push(class);
        }
    }
    Some(classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStringExt;

    #[derive(Default)]
    struct FakeAttributes {
        properties: HashMap<&'static str, OsString>,
        attributes: HashMap<&'static str, OsString>,
        children: Vec<InterfaceClass>,
    }

    impl FakeAttributes {
        fn property(mut self, name: &'static str, value: &str) -> Self {
            self.properties.insert(name, value.into());
            self
        }
        fn attribute(mut self, name: &'static str, value: &[u8]) -> Self {
            self.attributes
                .insert(name, OsString::from_vec(value.to_vec()));
            self
        }
    }

    impl DeviceAttributes for FakeAttributes {
        fn syspath(&self) -> String {
            "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.3".into()
        }
        fn sysname(&self) -> String {
            "1-2.3".into()
        }
        fn property(&self, name: &str) -> Option<OsString> {
            self.properties.get(name).cloned()
        }
        fn attribute(&self, name: &str) -> Option<OsString> {
            self.attributes.get(name).cloned()
        }
        fn parent_hub(&self) -> Option<String> {
            Some("1-2".into())
        }
        fn interface_children(&self) -> Vec<InterfaceClass> {
            self.children.clone()
        }
    }

    fn class(class: u8, subclass: u8, protocol: u8) -> InterfaceClass {
        InterfaceClass {
            class,
            subclass,
            protocol,
        }
    }

    fn sysfs_only() -> FakeAttributes {
        FakeAttributes::default()
            .attribute("idVendor", b"046d")
            .attribute("idProduct", b"c52b")
            .attribute("busnum", b"1")
            .attribute("devnum", b"5")
            .attribute("bDeviceClass", b"00")
    }

    #[test]
    fn sysfs_alone_gives_the_identity() {
        let device = usb_device_from_attributes(&sysfs_only()).unwrap();
        assert_eq!(
            device,
            UsbDevice {
                syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.3".into(),
                bus: 1,
                devnum: 5,
                vendor_id: 0x046d,
                product_id: 0xc52b,
                serial: None,
                port_path: "1-2.3".into(),
                parent_hub: Some("1-2".into()),
                device_class: 0,
                interface_classes: Vec::new(),
                manufacturer: None,
                product: None,
                vendor_from_database: None,
                model_from_database: None,
                strings_pending: false,
            }
        );
    }

    #[test]
    fn raw_sysfs_wins_over_udev_copies() {
        let attributes = sysfs_only()
            .attribute("serial", b"AB C\xff")
            .property("ID_SERIAL_SHORT", "AB_C_")
            .property("ID_VENDOR_ID", "1111")
            .property("ID_MODEL_ID", "2222")
            .property("BUSNUM", "009")
            .property("DEVNUM", "099")
            .property("TYPE", "9/0/0")
            .property("PRODUCT", "3333/4444/100");
        let device = usb_device_from_attributes(&attributes).unwrap();
        assert_eq!(device.serial.as_deref(), Some("AB C\u{fffd}"));
        assert_eq!(device.id().to_string(), "046d:c52b");
        assert_eq!(device.address().to_string(), "001:005");
        assert_eq!(device.device_class, 0);
    }

    #[test]
    fn udev_properties_stand_in_for_missing_sysfs() {
        let attributes = FakeAttributes::default()
            .property("ID_VENDOR_ID", "0403")
            .property("ID_MODEL_ID", "6001")
            .property("BUSNUM", "002")
            .property("DEVNUM", "010")
            .property("TYPE", "9/0/1")
            .property("ID_SERIAL_SHORT", "FT0001");
        let device = usb_device_from_attributes(&attributes).unwrap();
        assert_eq!(device.id().to_string(), "0403:6001");
        assert_eq!(device.address().to_string(), "002:010");
        assert_eq!(device.device_class, 9);
        assert!(device.is_hub());
        assert_eq!(device.serial.as_deref(), Some("FT0001"));
        // The kernel's PRODUCT is the last resort for the IDs, unpadded hex.
        let attributes = FakeAttributes::default()
            .property("PRODUCT", "46d/c52b/1201")
            .property("BUSNUM", "1")
            .property("DEVNUM", "2")
            .property("TYPE", "0/0/0");
        assert_eq!(
            usb_device_from_attributes(&attributes)
                .unwrap()
                .id()
                .to_string(),
            "046d:c52b"
        );
    }

    #[test]
    fn missing_identity_is_named_not_guessed() {
        let without = |name| {
            let mut attributes = sysfs_only();
            attributes.attributes.remove(name);
            usb_device_from_attributes(&attributes).unwrap_err()
        };
        assert_eq!(without("idVendor"), "vendor id");
        assert_eq!(without("idProduct"), "product id");
        assert_eq!(without("busnum"), "bus number");
        assert_eq!(without("devnum"), "device number");
        assert_eq!(without("bDeviceClass"), "device class");
        let garbage = sysfs_only().attribute("idVendor", b"xyz");
        assert_eq!(
            usb_device_from_attributes(&garbage).unwrap_err(),
            "vendor id"
        );
        let too_long = sysfs_only().attribute("idVendor", b"12345");
        assert_eq!(
            usb_device_from_attributes(&too_long).unwrap_err(),
            "vendor id"
        );
    }

    #[test]
    fn strings_decode_lossily_and_empty_is_absent() {
        let attributes = sysfs_only()
            .attribute("serial", b"")
            .attribute("manufacturer", b"Logi\xe9tech <&>")
            .attribute("product", b"USB Receiver")
            .property("ID_VENDOR_FROM_DATABASE", "Logitech, Inc.")
            .property("ID_MODEL_FROM_DATABASE", "Unifying Receiver");
        let device = usb_device_from_attributes(&attributes).unwrap();
        assert_eq!(device.serial, None);
        assert_eq!(device.manufacturer.as_deref(), Some("Logi\u{fffd}tech <&>"));
        assert_eq!(device.product.as_deref(), Some("USB Receiver"));
        assert_eq!(
            device.vendor_from_database.as_deref(),
            Some("Logitech, Inc.")
        );
        assert_eq!(
            device.model_from_database.as_deref(),
            Some("Unifying Receiver")
        );
    }

    #[test]
    fn interfaces_come_from_udev_then_from_children() {
        let mut attributes = sysfs_only().property("ID_USB_INTERFACES", ":030101:030102:030101:");
        attributes.children = vec![class(0xff, 0, 0)];
        let device = usb_device_from_attributes(&attributes).unwrap();
        assert_eq!(
            device.interface_classes,
            vec![class(3, 1, 1), class(3, 1, 2)]
        );
        // Malformed property: the children decide.
        let attributes = FakeAttributes {
            children: vec![class(0xff, 0xff, 0xff), class(8, 6, 0x50)],
            ..sysfs_only().property("ID_USB_INTERFACES", ":03010:")
        };
        let device = usb_device_from_attributes(&attributes).unwrap();
        assert_eq!(
            device.interface_classes,
            vec![class(0xff, 0xff, 0xff), class(8, 6, 0x50)]
        );
    }

    #[test]
    fn usb_interfaces_parsing() {
        let parse = |text: &str| parse_usb_interfaces(OsStr::new(text));
        assert_eq!(parse(":"), Some(vec![]));
        assert_eq!(parse(""), Some(vec![]));
        assert_eq!(parse(":ffffff:"), Some(vec![class(0xff, 0xff, 0xff)]));
        assert_eq!(parse(":0a0000:e00101:").unwrap().len(), 2);
        assert_eq!(parse(":03010g:"), None);
        assert_eq!(parse(":0301011:"), None);
    }

    #[test]
    fn number_parsing() {
        assert_eq!(parse_decimal_u16(OsStr::new("008")), Some(8));
        assert_eq!(parse_decimal_u16(OsStr::new(" 12\n")), Some(12));
        assert_eq!(parse_decimal_u16(OsStr::new("-1")), None);
        assert_eq!(parse_decimal_u16(OsStr::new("70000")), None);
        assert_eq!(parse_hex_u8(OsStr::new("ef")), Some(0xef));
        assert_eq!(parse_hex_u8(OsStr::new("100")), None);
        assert_eq!(parse_hex_u16(OsStr::new("+46d")), None);
    }
}
