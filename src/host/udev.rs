//! The host's USB view through udev: enumeration of present `usb_device`s and the hotplug
//! monitor thread. The only module that imports the `udev` crate.
//!
//! Everything is read from udev and sysfs; nothing here opens a device node. udev's
//! `usb_id` builtin already parsed the descriptors into `ID_USB_INTERFACES`, and sysfs has
//! every identity field the rules match on, so `rusb` would add a second view of the same
//! facts plus the permission problems of opening `/dev/bus/usb` nodes.

use crate::event::Event;
use crate::host::{DeviceSource, HostError};
use crate::model::{InterfaceClass, UsbDevice};
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};

/// The name this source has in `Event::SourceFailed`.
pub const SOURCE_NAME: &str = "udev";

/// This many receive errors in a row, with no event between them, mean the socket is
/// broken rather than one message being bad; without the bound a socket that stays readable
/// but fails every read would spin the thread.
const CONSECUTIVE_RECEIVE_ERRORS_LIMIT: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    #[error("cannot enumerate usb devices through udev: {source}")]
    EnumerateDevices {
        #[source]
        source: io::Error,
    },
    #[error("cannot open the udev monitor for usb devices: {source}")]
    OpenMonitor {
        #[source]
        source: io::Error,
    },
    #[error("cannot start the udev monitor thread: {source}")]
    SpawnMonitorThread {
        #[source]
        source: io::Error,
    },
    #[error("the udev monitor thread ended before it was ready")]
    StartMonitorThread,
    #[error("cannot wait for udev events: {source}")]
    WaitForEvents {
        #[source]
        source: io::Error,
    },
    #[error("cannot receive udev events: {source}")]
    ReceiveEvents {
        #[source]
        source: io::Error,
    },
}

/// Every present USB device (udev subsystem `usb`, devtype `usb_device`, root hubs
/// included), sorted by bus and device number. Devices whose identity cannot be read, for
/// example because they vanished during the scan, are left out with a debug log.
pub fn enumerate() -> Result<Vec<UsbDevice>, UsbError> {
    let scan = || -> io::Result<Vec<UsbDevice>> {
        let mut enumerator = udev::Enumerator::new()?;
        enumerator.match_subsystem("usb")?;
        let mut devices: Vec<UsbDevice> = enumerator
            .scan_devices()?
            .filter(is_usb_device)
            .filter_map(|device| usb_device_from_udev(&device))
            .collect();
        devices.sort_by_key(|device| (device.bus, device.devnum));
        Ok(devices)
    };
    scan().map_err(|source| UsbError::EnumerateDevices { source })
}

/// The daemon's `DeviceSource` on a real host: `enumerate()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdevDeviceSource;

impl DeviceSource for UdevDeviceSource {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError> {
        enumerate().map_err(|source| HostError::EnumerateThroughUdev { source })
    }
}

fn is_usb_device(device: &udev::Device) -> bool {
    device.devtype() == Some(OsStr::new("usb_device"))
}

/// Starts the hotplug monitor on its own thread and returns once it listens, so that no
/// event between this call and a following `enumerate()` is lost.
///
/// The thread sends `Event::DeviceAdded` for `add`, `bind` and `change` of a
/// `usb_device` and `Event::DeviceRemoved` for `remove`; `unbind` is only logged, since
/// the device is still present (a `remove` follows when it leaves). It blocks in `poll`
/// with no timeout, so an idle daemon is never woken by it. If the socket fails it sends
/// `Event::SourceFailed` and ends. It also ends when the receiving side is gone, which it
/// notices at the next event it tries to send: waking up just to look would cost the
/// idle wake-ups this design avoids.
///
/// It listens to udev's netlink source, not the kernel's. A kernel event arrives before
/// udevd has run its rules: the `/dev/bus/usb/BBB/DDD` node may not exist yet, or still
/// have its default owner, mode and security label, which udevd then resets, undoing
/// what libvirt's security drivers set for QEMU. That is the "failed to find host usb
/// device" race of attach-on-add scripts. The udev event is sent after the rules ran, so
/// the node exists and is labelled, and it carries udev's properties (`ID_USB_INTERFACES`,
/// the hwdb names). The cost: without a running udevd no events arrive at all.
pub fn spawn_monitor(events: Sender<Event>) -> Result<JoinHandle<()>, UsbError> {
    // udev's handles are not Send, so the monitor is opened on the thread that uses it,
    // and the outcome of opening it comes back over this channel.
    let (ready_sender, ready_receiver) = mpsc::sync_channel::<Result<(), io::Error>>(1);
    let handle = thread::Builder::new()
        .name("usbpass-udev".to_string())
        .spawn(move || {
            let socket = match open_monitor() {
                Ok(socket) => socket,
                Err(source) => {
                    let _ = ready_sender.send(Err(source));
                    return;
                }
            };
            // Seeded after the socket listens: a device added from here on is seen twice
            // at worst, never missed.
            let known = match enumerate() {
                Ok(devices) => devices.into_iter().map(|device| device.syspath).collect(),
                Err(error) => {
                    log::warn!("{error}; starting the udev monitor without a device list");
                    BTreeSet::new()
                }
            };
            if ready_sender.send(Ok(())).is_err() {
                return;
            }
            let mut monitor = MonitorState { known, events };
            if let Err(error) = monitor.run(&socket) {
                log::error!("{error}");
                let _ = monitor.events.send(Event::SourceFailed {
                    source: SOURCE_NAME,
                    message: error.to_string(),
                });
            }
        })
        .map_err(|source| UsbError::SpawnMonitorThread { source })?;
    match ready_receiver.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(source)) => {
            let _ = handle.join();
            Err(UsbError::OpenMonitor { source })
        }
        Err(_) => {
            let _ = handle.join();
            Err(UsbError::StartMonitorThread)
        }
    }
}

fn open_monitor() -> io::Result<udev::MonitorSocket> {
    udev::MonitorBuilder::new()?
        .match_subsystem_devtype("usb", "usb_device")?
        .listen()
}

/// Why the monitor loop ended.
enum Stop {
    /// The receiver is gone: the daemon no longer wants events.
    ReceiverGone,
    Failed(UsbError),
}

/// The daemon dropped its receiver.
struct ReceiverGone;

struct MonitorState {
    /// The syspaths of the devices present as far as this thread knows, to tell what was
    /// removed while events were lost.
    known: BTreeSet<String>,
    events: Sender<Event>,
}

impl MonitorState {
    fn run(&mut self, socket: &udev::MonitorSocket) -> Result<(), UsbError> {
        match self.receive_forever(socket) {
            Stop::ReceiverGone => {
                log::debug!("udev monitor ends: nobody receives its events");
                Ok(())
            }
            Stop::Failed(error) => Err(error),
        }
    }

    fn receive_forever(&mut self, socket: &udev::MonitorSocket) -> Stop {
        let mut consecutive_errors = 0;
        loop {
            if let Err(source) = wait_readable(socket.as_raw_fd()) {
                return Stop::Failed(UsbError::WaitForEvents { source });
            }
            // The socket is non-blocking: take every queued event, then wait again.
            loop {
                match socket.iter().next() {
                    Some(event) => {
                        consecutive_errors = 0;
                        if self.handle(&event).is_err() {
                            return Stop::ReceiverGone;
                        }
                    }
                    None => {
                        // libudev returns NULL with errno set: EAGAIN when drained.
                        let error = io::Error::last_os_error();
                        match error.raw_os_error() {
                            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(0) | None => break,
                            Some(libc::ENOBUFS) => {
                                consecutive_errors = 0;
                                log::warn!("udev events were lost (socket buffer full); rescanning usb devices");
                                if self.resync().is_err() {
                                    return Stop::ReceiverGone;
                                }
                            }
                            Some(_) => {
                                consecutive_errors += 1;
                                log::debug!("skipping a udev message that cannot be read: {error}");
                                if consecutive_errors >= CONSECUTIVE_RECEIVE_ERRORS_LIMIT {
                                    return Stop::Failed(UsbError::ReceiveEvents { source: error });
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Turns one udev event into a daemon event. Errs only when the receiver is gone.
    fn handle(&mut self, event: &udev::Event) -> Result<(), ReceiverGone> {
        let syspath = event.syspath().to_string_lossy().into_owned();
        match event.event_type() {
            udev::EventType::Add | udev::EventType::Bind | udev::EventType::Change => {
                if !is_usb_device(event) {
                    return Ok(());
                }
                match usb_device_from_udev(event) {
                    Some(device) => {
                        self.known.insert(device.syspath.clone());
                        self.send(Event::DeviceAdded {
                            device,
                            received: std::time::Instant::now(),
                        })
                    }
                    None => Ok(()),
                }
            }
            udev::EventType::Remove => {
                self.known.remove(&syspath);
                self.send(Event::DeviceRemoved { syspath })
            }
            other => {
                log::debug!("ignoring udev {other} of {syspath}");
                Ok(())
            }
        }
    }

    fn send(&self, event: Event) -> Result<(), ReceiverGone> {
        self.events.send(event).map_err(|_| ReceiverGone)
    }

    /// After lost events: announce every present device again, and the removal of every
    /// known one that is gone.
    fn resync(&mut self) -> Result<(), ReceiverGone> {
        let present = match enumerate() {
            Ok(present) => present,
            Err(error) => {
                log::warn!("{error}; the device list may be stale until the next event");
                return Ok(());
            }
        };
        let present_paths: BTreeSet<String> = present
            .iter()
            .map(|device| device.syspath.clone())
            .collect();
        for gone in self.known.difference(&present_paths) {
            self.send(Event::DeviceRemoved {
                syspath: gone.clone(),
            })?;
        }
        for device in present {
            self.send(Event::DeviceAdded {
                device,
                received: std::time::Instant::now(),
            })?;
        }
        self.known = present_paths;
        Ok(())
    }
}

/// Blocks until the descriptor is readable, with no timeout.
fn wait_readable(fd: std::os::fd::RawFd) -> io::Result<()> {
    let mut poll_fd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: poll_fd is a valid, initialised pollfd that lives across the call, and
        // the count of 1 matches it.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if poll_fd.revents & libc::POLLIN != 0 {
            return Ok(());
        }
        if poll_fd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other(format!(
                "the netlink socket reported poll events {:#x}",
                poll_fd.revents
            )));
        }
    }
}

/// What the conversion reads of one device. udev devices implement it; the unit tests
/// implement it over maps.
trait DeviceFacts {
    fn syspath(&self) -> String;
    /// The kernel name, e.g. `1-2.3` or `usb1`.
    fn sysname(&self) -> String;
    /// A udev property: from the uevent, udev's database, or the event itself.
    fn property(&self, name: &str) -> Option<OsString>;
    /// A sysfs attribute, read from the device's directory now.
    fn attribute(&self, name: &str) -> Option<OsString>;
    /// The kernel name of the parent `usb_device`: a hub or root hub.
    fn parent_hub(&self) -> Option<String>;
    /// The class triples of the interfaces below the device in sysfs.
    fn interface_children(&self) -> Vec<InterfaceClass>;
}

impl DeviceFacts for udev::Device {
    fn syspath(&self) -> String {
        udev::Device::syspath(self).to_string_lossy().into_owned()
    }
    fn sysname(&self) -> String {
        udev::Device::sysname(self).to_string_lossy().into_owned()
    }
    fn property(&self, name: &str) -> Option<OsString> {
        self.property_value(name).map(OsStr::to_os_string)
    }
    fn attribute(&self, name: &str) -> Option<OsString> {
        self.attribute_value(name).map(OsStr::to_os_string)
    }
    fn parent_hub(&self) -> Option<String> {
        match self.parent_with_subsystem_devtype("usb", "usb_device") {
            Ok(Some(parent)) => Some(parent.sysname().to_string_lossy().into_owned()),
            Ok(None) => None,
            Err(error) => {
                log::debug!(
                    "cannot read the parent hub of {}: {error}",
                    udev::Device::syspath(self).display()
                );
                None
            }
        }
    }
    fn interface_children(&self) -> Vec<InterfaceClass> {
        let scan = || -> io::Result<Vec<InterfaceClass>> {
            let mut enumerator = udev::Enumerator::new()?;
            enumerator.match_parent(self)?;
            enumerator.match_subsystem("usb")?;
            let own_path = udev::Device::syspath(self);
            let mut children: Vec<(OsString, InterfaceClass)> = enumerator
                .scan_devices()?
                // match_parent also yields the device itself and everything below its
                // interfaces, hubs' children included: keep the direct interfaces.
                .filter(|child| child.devtype() == Some(OsStr::new("usb_interface")))
                .filter(|child| {
                    child.syspath().parent().map(Path::as_os_str) == Some(own_path.as_os_str())
                })
                .filter_map(|child| {
                    let byte = |name: &str| child.attribute_value(name).and_then(parse_hex_u8);
                    let class = InterfaceClass {
                        class: byte("bInterfaceClass")?,
                        subclass: byte("bInterfaceSubClass")?,
                        protocol: byte("bInterfaceProtocol")?,
                    };
                    Some((child.sysname().to_os_string(), class))
                })
                .collect();
            // Interface names (`1-2:1.0`, `1-2:1.1`) sort in interface order.
            children.sort_by(|left, right| left.0.cmp(&right.0));
            Ok(children.into_iter().map(|(_, class)| class).collect())
        };
        scan().unwrap_or_else(|error| {
            log::debug!(
                "cannot list the interfaces of {}: {error}",
                udev::Device::syspath(self).display()
            );
            Vec::new()
        })
    }
}

fn usb_device_from_udev(device: &udev::Device) -> Option<UsbDevice> {
    match usb_device_from_facts(device) {
        Ok(usb_device) => Some(usb_device),
        Err(missing) => {
            log::debug!(
                "skipping usb device {}: no readable {missing}",
                device.syspath().display()
            );
            None
        }
    }
}

/// The one conversion from udev's view to a `UsbDevice`.
///
/// Identity comes from raw sysfs first: it is what the kernel and QEMU see, while udev's
/// copies are sanitised (`ID_SERIAL_SHORT` turns spaces and odd bytes into `_`). udev's
/// properties are the fallback, for a device whose sysfs went away under us; they come
/// from the uevent (`BUSNUM`, `DEVNUM`, `PRODUCT`, `TYPE`) or from udev's builtins. The
/// hwdb names and `ID_USB_INTERFACES` exist only in udev. Errs with the name of the first
/// missing mandatory field: vendor, product, bus, device number and device class (without
/// the class a hub could not be told apart, and hubs are never passed through).
fn usb_device_from_facts(facts: &dyn DeviceFacts) -> Result<UsbDevice, &'static str> {
    let product_triple = facts.property("PRODUCT");
    let product_part = |index: usize| -> Option<u16> {
        let text = product_triple.as_deref()?.to_str()?;
        parse_hex_u16(OsStr::new(text.split('/').nth(index)?))
    };
    let vendor_id = facts
        .attribute("idVendor")
        .and_then(|value| parse_hex_u16(&value))
        .or_else(|| {
            facts
                .property("ID_VENDOR_ID")
                .and_then(|v| parse_hex_u16(&v))
        })
        .or_else(|| product_part(0))
        .ok_or("vendor id")?;
    let product_id = facts
        .attribute("idProduct")
        .and_then(|value| parse_hex_u16(&value))
        .or_else(|| {
            facts
                .property("ID_MODEL_ID")
                .and_then(|v| parse_hex_u16(&v))
        })
        .or_else(|| product_part(1))
        .ok_or("product id")?;
    let bus = facts
        .attribute("busnum")
        .and_then(|value| parse_decimal_u16(&value))
        .or_else(|| facts.property("BUSNUM").and_then(|v| parse_decimal_u16(&v)))
        .ok_or("bus number")?;
    let devnum = facts
        .attribute("devnum")
        .and_then(|value| parse_decimal_u16(&value))
        .or_else(|| facts.property("DEVNUM").and_then(|v| parse_decimal_u16(&v)))
        .ok_or("device number")?;
    let device_class = facts
        .attribute("bDeviceClass")
        .and_then(|value| parse_hex_u8(&value))
        .or_else(|| {
            // The kernel's TYPE is class/subclass/protocol in decimal.
            let kind = facts.property("TYPE")?;
            kind.to_str()?.split('/').next()?.parse().ok()
        })
        .ok_or("device class")?;
    let serial = facts
        .attribute("serial")
        .or_else(|| facts.property("ID_SERIAL_SHORT"))
        .and_then(|value| lossy_text(&value));
    let interface_classes = match facts
        .property("ID_USB_INTERFACES")
        .and_then(|value| parse_usb_interfaces(&value))
    {
        Some(classes) => classes,
        None => facts.interface_children(),
    };
    let text = |value: Option<OsString>| value.and_then(|value| lossy_text(&value));
    Ok(UsbDevice {
        syspath: facts.syspath(),
        bus,
        devnum,
        vendor_id,
        product_id,
        serial,
        port_path: facts.sysname(),
        parent_hub: facts.parent_hub(),
        device_class,
        interface_classes,
        manufacturer: text(facts.attribute("manufacturer")),
        product: text(facts.attribute("product")),
        vendor_from_database: text(facts.property("ID_VENDOR_FROM_DATABASE")),
        model_from_database: text(facts.property("ID_MODEL_FROM_DATABASE")),
    })
}

/// USB strings are bytes: decode lossily, and treat an empty string as absent.
fn lossy_text(value: &OsStr) -> Option<String> {
    if value.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    }
}

fn ascii_trimmed(value: &OsStr) -> Option<&str> {
    value.to_str().map(str::trim)
}

fn parse_hex_u16(value: &OsStr) -> Option<u16> {
    let text = ascii_trimmed(value)?;
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

fn parse_hex_u8(value: &OsStr) -> Option<u8> {
    let text = ascii_trimmed(value)?;
    if text.is_empty() || text.len() > 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(text, 16).ok()
}

fn parse_decimal_u16(value: &OsStr) -> Option<u16> {
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
    struct FakeFacts {
        properties: HashMap<&'static str, OsString>,
        attributes: HashMap<&'static str, OsString>,
        children: Vec<InterfaceClass>,
    }

    impl FakeFacts {
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

    impl DeviceFacts for FakeFacts {
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

    fn sysfs_only() -> FakeFacts {
        FakeFacts::default()
            .attribute("idVendor", b"046d")
            .attribute("idProduct", b"c52b")
            .attribute("busnum", b"1")
            .attribute("devnum", b"5")
            .attribute("bDeviceClass", b"00")
    }

    #[test]
    fn sysfs_alone_gives_the_identity() {
        let device = usb_device_from_facts(&sysfs_only()).unwrap();
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
            }
        );
    }

    #[test]
    fn raw_sysfs_wins_over_udev_copies() {
        let facts = sysfs_only()
            .attribute("serial", b"AB C\xff")
            .property("ID_SERIAL_SHORT", "AB_C_")
            .property("ID_VENDOR_ID", "1111")
            .property("ID_MODEL_ID", "2222")
            .property("BUSNUM", "009")
            .property("DEVNUM", "099")
            .property("TYPE", "9/0/0")
            .property("PRODUCT", "3333/4444/100");
        let device = usb_device_from_facts(&facts).unwrap();
        assert_eq!(device.serial.as_deref(), Some("AB C\u{fffd}"));
        assert_eq!(device.id().to_string(), "046d:c52b");
        assert_eq!(device.address().to_string(), "001:005");
        assert_eq!(device.device_class, 0);
    }

    #[test]
    fn udev_properties_stand_in_for_missing_sysfs() {
        let facts = FakeFacts::default()
            .property("ID_VENDOR_ID", "0403")
            .property("ID_MODEL_ID", "6001")
            .property("BUSNUM", "002")
            .property("DEVNUM", "010")
            .property("TYPE", "9/0/1")
            .property("ID_SERIAL_SHORT", "FT0001");
        let device = usb_device_from_facts(&facts).unwrap();
        assert_eq!(device.id().to_string(), "0403:6001");
        assert_eq!(device.address().to_string(), "002:010");
        assert_eq!(device.device_class, 9);
        assert!(device.is_hub());
        assert_eq!(device.serial.as_deref(), Some("FT0001"));
        // The kernel's PRODUCT is the last resort for the IDs, unpadded hex.
        let facts = FakeFacts::default()
            .property("PRODUCT", "46d/c52b/1201")
            .property("BUSNUM", "1")
            .property("DEVNUM", "2")
            .property("TYPE", "0/0/0");
        assert_eq!(
            usb_device_from_facts(&facts).unwrap().id().to_string(),
            "046d:c52b"
        );
    }

    #[test]
    fn missing_identity_is_named_not_guessed() {
        let without = |name| {
            let mut facts = sysfs_only();
            facts.attributes.remove(name);
            usb_device_from_facts(&facts).unwrap_err()
        };
        assert_eq!(without("idVendor"), "vendor id");
        assert_eq!(without("idProduct"), "product id");
        assert_eq!(without("busnum"), "bus number");
        assert_eq!(without("devnum"), "device number");
        assert_eq!(without("bDeviceClass"), "device class");
        let garbage = sysfs_only().attribute("idVendor", b"xyz");
        assert_eq!(usb_device_from_facts(&garbage).unwrap_err(), "vendor id");
        let too_long = sysfs_only().attribute("idVendor", b"12345");
        assert_eq!(usb_device_from_facts(&too_long).unwrap_err(), "vendor id");
    }

    #[test]
    fn strings_decode_lossily_and_empty_is_absent() {
        let facts = sysfs_only()
            .attribute("serial", b"")
            .attribute("manufacturer", b"Logi\xe9tech <&>")
            .attribute("product", b"USB Receiver")
            .property("ID_VENDOR_FROM_DATABASE", "Logitech, Inc.")
            .property("ID_MODEL_FROM_DATABASE", "Unifying Receiver");
        let device = usb_device_from_facts(&facts).unwrap();
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
        let mut facts = sysfs_only().property("ID_USB_INTERFACES", ":030101:030102:030101:");
        facts.children = vec![class(0xff, 0, 0)];
        let device = usb_device_from_facts(&facts).unwrap();
        assert_eq!(
            device.interface_classes,
            vec![class(3, 1, 1), class(3, 1, 2)]
        );
        // Malformed property: the children decide.
        let facts = FakeFacts {
            children: vec![class(0xff, 0xff, 0xff), class(8, 6, 0x50)],
            ..sysfs_only().property("ID_USB_INTERFACES", ":03010:")
        };
        let device = usb_device_from_facts(&facts).unwrap();
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
