//! Resolving what a QEMU usb-host argument names (bus and address, or a device node) to
//! the device's IDs, port path and serial, by reading sysfs directly.
//!
//! The wrapper reads sysfs instead of asking libudev so that it links nothing and starts
//! fast; the root is a parameter so that tests can point it at a folder of their own. A
//! device folder goes through the same conversion as a udev device (`host::attributes`),
//! so the wrapper and the daemon read the same identity.

use crate::host::attributes::{
    interface_class_from, parse_decimal_u16, usb_device_from_attributes, DeviceAttributes,
};
use crate::model::port::parent_hub_of;
use crate::model::{InterfaceClass, UsbDevice};
use std::ffi::OsStr;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The kernel's major number for USB device nodes (`/dev/bus/usb/BBB/DDD`).
pub const USB_DEVICE_MAJOR: u32 = 189;

#[derive(Debug, thiserror::Error)]
pub enum SysfsUsbError {
    #[error("cannot list usb devices in {path}: {source}")]
    ListDevices {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    ReadAttribute {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the {field} of usb device {path}")]
    ReadDevice { path: PathBuf, field: &'static str },
    #[error("no usb device at bus {bus} address {address} under {root}")]
    FindBusAddress {
        root: PathBuf,
        bus: u32,
        address: u32,
    },
    #[error("cannot resolve device node {path}: {reason}")]
    ResolveNode { path: PathBuf, reason: String },
}

/// A sysfs tree to read USB devices from: `/sys` on a host.
#[derive(Debug, Clone)]
pub struct SysfsUsb {
    root: PathBuf,
}

impl SysfsUsb {
    pub fn new(root: impl Into<PathBuf>) -> SysfsUsb {
        SysfsUsb { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/usb/devices")
    }

    /// The kernel drivers bound to the device's interfaces, as (interface, driver), by
    /// interface name: `usbhid`, `usb-storage`, or `usbfs` when a program (QEMU) has
    /// claimed it through its device node. An interface with no driver is left out.
    pub fn interface_drivers(&self, port_path: &str) -> Vec<(String, String)> {
        let prefix = format!("{port_path}:");
        let Ok(entries) = fs::read_dir(self.devices_dir()) else {
            return Vec::new();
        };
        let mut drivers: Vec<(String, String)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_string();
                if !name.starts_with(&prefix) {
                    return None;
                }
                let driver = fs::read_link(entry.path().join("driver")).ok()?;
                Some((name, driver.file_name()?.to_str()?.to_string()))
            })
            .collect();
        drivers.sort();
        drivers
    }

    /// Every USB device (not interface) in the tree, in directory order.
    pub fn devices(&self) -> Result<Vec<UsbDevice>, SysfsUsbError> {
        let dir = self.devices_dir();
        let entries = fs::read_dir(&dir).map_err(|source| SysfsUsbError::ListDevices {
            path: dir.clone(),
            source,
        })?;
        let mut devices = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SysfsUsbError::ListDevices {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            // Interfaces are named `1-2:1.0`; devices `1-2.3` or `usb1`.
            if name.as_bytes().contains(&b':') {
                continue;
            }
            devices.push(read_device(&entry.path())?);
        }
        Ok(devices)
    }

    /// The device plugged in as `bus`/`address` (lsusb's `Bus 001 Device 005`).
    pub fn find_by_bus_address(&self, bus: u32, address: u32) -> Result<UsbDevice, SysfsUsbError> {
        let dir = self.devices_dir();
        let entries = fs::read_dir(&dir).map_err(|source| SysfsUsbError::ListDevices {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().as_bytes().contains(&b':') {
                continue;
            }
            // Read the two numbers first: a full read of every device would be wasted.
            let number = |name| read_attribute(&path, name).and_then(|v| parse_decimal_u16(&v));
            let (Some(entry_bus), Some(entry_address)) = (number("busnum"), number("devnum"))
            else {
                continue;
            };
            if u32::from(entry_bus) == bus && u32::from(entry_address) == address {
                return read_device(&path);
            }
        }
        Err(SysfsUsbError::FindBusAddress {
            root: self.root.clone(),
            bus,
            address,
        })
    }

    /// The device behind a character device number, through `/sys/dev/char/MAJ:MIN`.
    pub fn find_by_char_device(&self, major: u32, minor: u32) -> Result<UsbDevice, SysfsUsbError> {
        let link = self.root.join(format!("dev/char/{major}:{minor}"));
        let path = fs::canonicalize(&link).map_err(|source| SysfsUsbError::ReadAttribute {
            path: link.clone(),
            source,
        })?;
        read_device(&path)
    }

    /// The device a `hostdevice=` path names. A present character node is followed by its
    /// device number (so udev symlinks work); otherwise the path must be the
    /// `/dev/bus/usb/BBB/DDD` that libvirt writes.
    pub fn find_by_node(&self, node: &Path) -> Result<UsbDevice, SysfsUsbError> {
        if let Ok(metadata) = fs::metadata(node) {
            if metadata.file_type().is_char_device() {
                let rdev = metadata.rdev();
                let (major, minor) = (libc::major(rdev), libc::minor(rdev));
                if major != USB_DEVICE_MAJOR {
                    return Err(SysfsUsbError::ResolveNode {
                        path: node.to_path_buf(),
                        reason: format!("character device {major}:{minor} is no usb device"),
                    });
                }
                return self.find_by_char_device(major, minor);
            }
        }
        match parse_bus_usb_path(node.as_os_str()) {
            Some((bus, address)) => self.find_by_bus_address(bus, address),
            None => Err(SysfsUsbError::ResolveNode {
                path: node.to_path_buf(),
                reason: "not a /dev/bus/usb/BUS/DEVICE path and no character device".to_string(),
            }),
        }
    }

    /// Every present device with these IDs, in directory order.
    pub fn find_by_vendor_product(
        &self,
        vendor_id: u16,
        product_id: u16,
    ) -> Result<Vec<UsbDevice>, SysfsUsbError> {
        Ok(self
            .devices()?
            .into_iter()
            .filter(|d| d.vendor_id == vendor_id && d.product_id == product_id)
            .collect())
    }
}

/// `/dev/bus/usb/001/005` → (1, 5), decimal as libvirt and udev write it.
pub fn parse_bus_usb_path(path: &OsStr) -> Option<(u32, u32)> {
    let rest = path.as_bytes().strip_prefix(b"/dev/bus/usb/")?;
    let text = std::str::from_utf8(rest).ok()?;
    let (bus, address) = text.split_once('/')?;
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u32>().ok().filter(|n| *n != 0)
    };
    Some((number(bus)?, number(address)?))
}

/// A device folder read straight from sysfs: the attributes the udev reader sees, and no
/// udev properties.
struct SysfsDevice {
    /// The real folder, e.g. `/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.3`.
    folder: PathBuf,
    /// Its name, the kernel's, e.g. `1-2.3`.
    name: String,
}

impl DeviceAttributes for SysfsDevice {
    fn syspath(&self) -> String {
        self.folder.to_string_lossy().into_owned()
    }
    fn sysname(&self) -> String {
        self.name.clone()
    }
    fn property(&self, _name: &str) -> Option<OsString> {
        None
    }
    fn attribute(&self, name: &str) -> Option<OsString> {
        read_attribute(&self.folder, name)
    }
    fn parent_hub(&self) -> Option<String> {
        parent_hub_of(&self.name)
    }
    fn interface_children(&self) -> Vec<InterfaceClass> {
        interface_classes_in(&self.folder, &self.name)
    }
}

/// The class triples of the interfaces in a device's sysfs folder (`1-2:1.0`, ...), in
/// interface order. Plain file reads: neither the folder listing nor these attributes
/// wait for the device's lock, so the kernel's monitor may call this while the kernel
/// is still configuring the device (libudev's enumerator reads `uevent` files, which
/// can wait).
pub(super) fn interface_classes_in(folder: &Path, name: &str) -> Vec<InterfaceClass> {
    let Ok(entries) = fs::read_dir(folder) else {
        return Vec::new();
    };
    // A root hub `usb2` names its interface `2-0:1.0`.
    let prefix = match name.strip_prefix("usb") {
        Some(bus) => format!("{bus}-0:"),
        None => format!("{name}:"),
    };
    let mut names: Vec<_> = entries
        .flatten()
        .map(|entry| entry.file_name())
        .filter(|name| name.as_bytes().starts_with(prefix.as_bytes()))
        .collect();
    // Interface names (`1-2:1.0`, `1-2:1.1`) sort in interface order.
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let interface = folder.join(name);
            interface_class_from(|attribute| read_attribute(&interface, attribute))
        })
        .collect()
}

/// One attribute file of a sysfs folder without the newline the kernel ends it with,
/// as libudev returns it, so that both readers see the same value (a serial keeps its
/// trailing spaces). None when it cannot be read.
pub(super) fn read_attribute(folder: &Path, name: &str) -> Option<OsString> {
    let mut bytes = fs::read(folder.join(name)).ok()?;
    while bytes
        .last()
        .is_some_and(|byte| matches!(byte, b'\n' | b'\r'))
    {
        bytes.pop();
    }
    Some(OsString::from_vec(bytes))
}

/// Reads one device directory (a `usb_device`, e.g. `/sys/bus/usb/devices/1-2.3`).
pub fn read_device(path: &Path) -> Result<UsbDevice, SysfsUsbError> {
    let folder = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = folder
        .file_name()
        .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
        .unwrap_or_default();
    let device = SysfsDevice { folder, name };
    usb_device_from_attributes(&device).map_err(|field| SysfsUsbError::ReadDevice {
        path: device.folder,
        field,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Writes a device the way the kernel lays it out: the real directory under
    /// `devices/`, a link in `bus/usb/devices/` and one in `dev/char/`.
    fn add_device(
        root: &Path,
        port: &str,
        bus: u32,
        devnum: u32,
        ids: (&str, &str),
        serial: Option<&str>,
    ) {
        let parent = parent_hub_of(port).unwrap();
        let parent_dir = if parent.starts_with("usb") {
            format!("devices/pci0000:00/0000:00:14.0/{parent}")
        } else {
            format!("devices/pci0000:00/0000:00:14.0/usb{bus}/{parent}")
        };
        let dir = root.join(&parent_dir).join(port);
        fs::create_dir_all(&dir).unwrap();
        let write =
            |file: &str, text: &str| fs::write(dir.join(file), format!("{text}\n")).unwrap();
        write("busnum", &bus.to_string());
        write("devnum", &devnum.to_string());
        write("idVendor", ids.0);
        write("idProduct", ids.1);
        write("bDeviceClass", "00");
        if let Some(serial) = serial {
            write("serial", serial);
        }
        let interface = dir.join(format!("{port}:1.0"));
        fs::create_dir_all(&interface).unwrap();
        fs::write(interface.join("bInterfaceClass"), "03\n").unwrap();
        fs::write(interface.join("bInterfaceSubClass"), "01\n").unwrap();
        fs::write(interface.join("bInterfaceProtocol"), "02\n").unwrap();
        let links = root.join("bus/usb/devices");
        fs::create_dir_all(&links).unwrap();
        symlink(&dir, links.join(port)).unwrap();
        symlink(&interface, links.join(format!("{port}:1.0"))).unwrap();
        let chars = root.join("dev/char");
        fs::create_dir_all(&chars).unwrap();
        let minor = (bus - 1) * 128 + devnum - 1;
        symlink(&dir, chars.join(format!("189:{minor}"))).unwrap();
    }

    fn tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        add_device(root.path(), "1-2", 1, 3, ("05e3", "0608"), None);
        add_device(
            root.path(),
            "1-2.3",
            1,
            5,
            ("046d", "c52b"),
            Some("ABC 123"),
        );
        add_device(root.path(), "2-1", 2, 17, ("0627", "0001"), None);
        root
    }

    #[test]
    fn bus_address_resolves_ids_port_and_serial() {
        let root = tree();
        let sysfs = SysfsUsb::new(root.path());
        let device = sysfs.find_by_bus_address(1, 5).unwrap();
        assert_eq!((device.vendor_id, device.product_id), (0x046d, 0xc52b));
        assert_eq!(device.port_path, "1-2.3");
        assert_eq!(device.parent_hub.as_deref(), Some("1-2"));
        assert_eq!(device.serial.as_deref(), Some("ABC 123"));
        assert_eq!(device.interface_classes.len(), 1);
        assert_eq!(device.interface_classes[0].class, 3);
    }

    #[test]
    fn missing_device_names_bus_and_address() {
        let root = tree();
        let error = SysfsUsb::new(root.path())
            .find_by_bus_address(1, 9)
            .unwrap_err();
        assert!(error
            .to_string()
            .starts_with("no usb device at bus 1 address 9"));
    }

    #[test]
    fn libvirt_node_paths_and_char_numbers() {
        let root = tree();
        let sysfs = SysfsUsb::new(root.path());
        let device = sysfs
            .find_by_node(Path::new("/dev/bus/usb/002/017"))
            .unwrap();
        assert_eq!(device.port_path, "2-1");
        let device = sysfs.find_by_char_device(189, 4).unwrap();
        assert_eq!(device.port_path, "1-2.3");
        assert!(sysfs.find_by_node(Path::new("/dev/null")).is_err());
        assert!(sysfs.find_by_node(Path::new("/dev/fdset/3")).is_err());
        assert_eq!(parse_bus_usb_path(OsStr::new("/dev/bus/usb/001/0x5")), None);
        assert_eq!(parse_bus_usb_path(OsStr::new("/dev/bus/usb/000/005")), None);
    }

    #[test]
    fn vendor_product_lookup_skips_interfaces() {
        let root = tree();
        let sysfs = SysfsUsb::new(root.path());
        assert_eq!(sysfs.devices().unwrap().len(), 3);
        let found = sysfs.find_by_vendor_product(0x0627, 0x0001).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].bus, 2);
    }

    #[test]
    fn unreadable_identity_is_an_error_naming_the_field_and_device() {
        let root = tree();
        let sysfs = SysfsUsb::new(root.path());
        let folder = fs::canonicalize(root.path().join("bus/usb/devices/2-1")).unwrap();
        fs::remove_file(folder.join("bDeviceClass")).unwrap();
        let error = sysfs.find_by_bus_address(2, 17).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "cannot read the device class of usb device {}",
                folder.display()
            )
        );
        fs::write(folder.join("bDeviceClass"), "+9\n").unwrap();
        assert!(matches!(
            sysfs.find_by_bus_address(2, 17).unwrap_err(),
            SysfsUsbError::ReadDevice {
                field: "device class",
                ..
            }
        ));
    }

    #[test]
    fn text_loses_only_the_kernels_newline() {
        let root = tree();
        let folder = root.path().join("bus/usb/devices/2-1");
        fs::write(folder.join("serial"), "KBD 1 \n").unwrap();
        fs::write(folder.join("product"), "\n").unwrap();
        let device = read_device(&folder).unwrap();
        assert_eq!(device.serial.as_deref(), Some("KBD 1 "));
        assert_eq!(device.product, None);
    }

    #[test]
    fn interfaces_are_read_in_order_for_devices_and_root_hubs() {
        let root = tempfile::tempdir().unwrap();
        let write_interface = |folder: &Path, name: &str, class: &str| {
            let interface = folder.join(name);
            fs::create_dir_all(&interface).unwrap();
            for (attribute, value) in [
                ("bInterfaceClass", class),
                ("bInterfaceSubClass", "00"),
                ("bInterfaceProtocol", "00"),
            ] {
                fs::write(interface.join(attribute), format!("{value}\n")).unwrap();
            }
        };
        let hub = root.path().join("usb2");
        write_interface(&hub, "2-0:1.0", "09");
        // A device behind it: its folder sits inside the hub's and must not count.
        let device = hub.join("2-1");
        write_interface(&device, "2-1:1.1", "0a");
        write_interface(&device, "2-1:1.0", "02");
        write_interface(&device, "2-1.4", "ff");
        let classes = |folder: &Path, name: &str| -> Vec<u8> {
            interface_classes_in(folder, name)
                .iter()
                .map(|interface| interface.class)
                .collect()
        };
        assert_eq!(classes(&hub, "usb2"), vec![0x09]);
        assert_eq!(classes(&device, "2-1"), vec![0x02, 0x0a]);
        assert_eq!(classes(&root.path().join("gone"), "2-3"), Vec::<u8>::new());
    }

    #[test]
    fn absent_tree_is_an_error_naming_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let error = SysfsUsb::new(root.path())
            .find_by_bus_address(1, 1)
            .unwrap_err();
        assert!(matches!(error, SysfsUsbError::ListDevices { .. }));
        assert!(error.to_string().contains("bus/usb/devices"));
    }
}

#[cfg(test)]
mod driver_tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn interface_drivers_are_read_from_the_driver_links_of_that_device_only() {
        let root = tempfile::tempdir().unwrap();
        let links = root.path().join("bus/usb/devices");
        fs::create_dir_all(&links).unwrap();
        let drivers = root.path().join("bus/usb/drivers");
        for (interface, driver) in [
            ("1-2:1.0", Some("usbhid")),
            ("1-2:1.1", Some("usbfs")),
            ("1-2:1.2", None),
            ("1-2.3:1.0", Some("usb-storage")),
        ] {
            let directory = root.path().join("devices").join(interface);
            fs::create_dir_all(&directory).unwrap();
            if let Some(driver) = driver {
                fs::create_dir_all(drivers.join(driver)).unwrap();
                symlink(drivers.join(driver), directory.join("driver")).unwrap();
            }
            symlink(&directory, links.join(interface)).unwrap();
        }
        let sysfs = SysfsUsb::new(root.path());
        assert_eq!(
            sysfs.interface_drivers("1-2"),
            [
                ("1-2:1.0".to_string(), "usbhid".to_string()),
                ("1-2:1.1".to_string(), "usbfs".to_string())
            ]
        );
        assert!(sysfs.interface_drivers("1-9").is_empty());
    }
}
