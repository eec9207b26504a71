//! Devices for tests and benchmarks: a `UsbDevice` with only the fields a test cares
//! about set, and the rest as a plain device behind a root port would have them.

use crate::model::port::parent_hub_of;
use crate::model::UsbDevice;

/// A device at `bus`:`devnum` with these IDs on the kernel port `port` (e.g. `1-2.3`).
pub fn device(bus: u16, devnum: u16, vendor_id: u16, product_id: u16, port: &str) -> UsbDevice {
    UsbDevice {
        syspath: format!("/sys/devices/pci0000:00/0000:00:14.0/usb{bus}/{port}"),
        bus,
        devnum,
        vendor_id,
        product_id,
        serial: None,
        port_path: port.to_string(),
        parent_hub: parent_hub_of(port),
        device_class: 0,
        interface_classes: Vec::new(),
        manufacturer: None,
        product: None,
        vendor_from_database: None,
        model_from_database: None,
        strings_pending: false,
    }
}

/// QEMU's emulated keyboard, as udev would describe it on a host that had one.
pub fn qemu_keyboard() -> UsbDevice {
    UsbDevice {
        syspath: "/sys/devices/pci0000:00/0000:00:02.0/usb1/1-1".into(),
        bus: 1,
        devnum: 2,
        vendor_id: 0x0627,
        product_id: 0x0001,
        serial: Some("42".into()),
        port_path: "1-1".into(),
        parent_hub: Some("usb1".into()),
        device_class: 0,
        interface_classes: Vec::new(),
        manufacturer: Some("QEMU".into()),
        product: Some("QEMU USB Keyboard".into()),
        vendor_from_database: None,
        model_from_database: None,
        strings_pending: false,
    }
}
