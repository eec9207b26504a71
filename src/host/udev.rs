//! The host's USB view through udev: enumeration of present `usb_device`s, the hotplug
//! monitor (polled by the daemon's watch thread), and a udev device's
//! `DeviceAttributes` for the shared conversion in `host::attributes`. The only module
//! that imports the `udev` crate.
//!
//! Everything is read from udev and sysfs; nothing here opens a device node. udev's
//! `usb_id` builtin already parsed the descriptors into `ID_USB_INTERFACES`, and sysfs has
//! every identity field the rules match on, so `rusb` would add a second view of the same
//! facts plus the permission problems of opening `/dev/bus/usb` nodes.

use crate::event::{DeviceDescription, Event, EventSender, PolledSource, SourceState};
use crate::host::attributes::{
    lossy_text, parse_decimal_u16, usb_device_from_attributes, usb_device_from_event,
    DeviceAttributes,
};
use crate::host::sysfs::{interface_classes_in, read_attribute};
use crate::host::{DeviceSource, HostError};
use crate::model::port::parent_hub_of;
use crate::model::{BusAddress, InterfaceClass, UsbDevice};
use crate::util::on_demand::{Continue, OnDemandQueue};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// The name this source has in `Event::SourceFailed`.
pub const SOURCE_NAME: &str = "udev";

/// This many receive errors in a row, with no event between them, mean the socket is
/// broken rather than one message being bad; without the bound a socket that stays readable
/// but fails every read would spin its poller.
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

    fn accepts(&self, config: &crate::rules::Config) -> Result<(), super::select::SourceRefusal> {
        super::select::accepts(config, super::select::SourceKind::Udev, &config.uri)
    }
}

fn is_usb_device(device: &udev::Device) -> bool {
    device.devtype() == Some(OsStr::new("usb_device"))
}

/// Opens the kernel's hotplug monitor and returns it listening, so that no event
/// between this call and a following `enumerate()` is lost. The daemon's watch thread
/// polls it beside its other sources (`PolledSource`).
///
/// It sends `Event::DeviceAdded` for `add`, `bind` and `change` of a `usb_device` and
/// `Event::DeviceRemoved` for `remove`; `unbind` is only logged, since the device is
/// still present (a `remove` follows when it leaves). Whoever polls it blocks with no
/// timeout, so an idle daemon is never woken by it.
///
/// It listens to the kernel's netlink source, not udev's, and reads each device from
/// sysfs at once. libvirt needs only sysfs and the device node to attach a device, and
/// devtmpfs creates the node before the kernel sends `add`. udev's copy of the same
/// event comes after udevd has run its rules: 0.16-0.21 s later in the test VM, and
/// seconds later during a burst of plugs, by when a short plug is long gone and a
/// `remove` names an instance the daemon no longer holds. The kernel's events also come
/// in the order things happened, so a `remove` is never overtaken by the next `add` on
/// the same port. What only udev knows (the hwdb names, `ID_USB_INTERFACES`) is left
/// out of hotplugged devices (interfaces are read from sysfs instead; the hwdb names
/// come from udev's hardware database file). Where security labels matter, udevd may
/// relabel the node after an attach; see docs/usbpass-qemu.md for the udev rules that
/// keep QEMU's access.
pub fn open_monitor(events: EventSender) -> Result<KernelMonitor, UsbError> {
    let socket = open_monitor_socket().map_err(|source| UsbError::OpenMonitor { source })?;
    // Seeded after the socket listens: a device added from here on is seen twice at
    // worst, never missed.
    let known = match enumerate() {
        Ok(devices) => known_devices(&devices),
        Err(error) => {
            log::warn!("{error}; starting the udev monitor without a device list");
            BTreeMap::new()
        }
    };
    // The reads that wait for a device's lock run on a thread of their own, so that
    // the monitor forwards every uevent (a `remove` above all) the moment it comes.
    // That thread lives only while it has plugs to read: an idle daemon keeps no stack
    // for it.
    let described_events = events.clone();
    let describer = OnDemandQueue::new(
        "usbpass-describe",
        move |DescribeRequest {
                  syspath,
                  address,
                  ids,
              }| {
            if describe(syspath, address, ids, &described_events) {
                Continue::Yes
            } else {
                Continue::Never
            }
        },
    );
    Ok(KernelMonitor {
        socket,
        consecutive_errors: 0,
        state: MonitorState {
            described: known.clone(),
            known,
            events,
            describer,
        },
    })
}

/// The kernel's hotplug monitor, listening: its socket, and what it knows of the
/// devices present.
pub struct KernelMonitor {
    socket: udev::MonitorSocket,
    /// Receive errors since the last event read.
    consecutive_errors: u32,
    state: MonitorState,
}

// SAFETY: a `udev::MonitorSocket` holds raw pointers to the libudev monitor and its
// udev context, which makes it !Send. libudev objects are not safe to use from two
// threads at once, but nothing here shares them: the monitor and every object it
// refers to move together, are used only through `&mut self` or `&self` of the one
// owner, and libudev keeps no thread-local state for them.
unsafe impl Send for KernelMonitor {}

impl PolledSource for KernelMonitor {
    fn name(&self) -> &'static str {
        SOURCE_NAME
    }

    fn descriptor(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// The socket is non-blocking: take every queued event, then let the poller wait
    /// again.
    fn read_ready(&mut self) -> SourceState {
        loop {
            match self.socket.iter().next() {
                Some(event) => {
                    self.consecutive_errors = 0;
                    if self.state.handle(&event).is_err() {
                        log::debug!("udev monitor ends: nobody receives its events");
                        return SourceState::ReceiverGone;
                    }
                }
                None => {
                    // libudev returns NULL with errno set: EAGAIN when drained.
                    let error = io::Error::last_os_error();
                    match error.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(0) | None => {
                            return SourceState::Open
                        }
                        Some(libc::ENOBUFS) => {
                            self.consecutive_errors = 0;
                            log::warn!("usb uevents were lost (socket buffer full); rescanning usb devices");
                            if self.state.resync().is_err() {
                                return SourceState::ReceiverGone;
                            }
                        }
                        Some(_) => {
                            self.consecutive_errors += 1;
                            log::debug!("skipping a udev message that cannot be read: {error}");
                            if self.consecutive_errors >= CONSECUTIVE_RECEIVE_ERRORS_LIMIT {
                                // The poller logs it and sends `SourceFailed`.
                                let error = UsbError::ReceiveEvents { source: error };
                                return SourceState::Failed(error.to_string());
                            }
                        }
                    }
                }
            }
        }
    }
}

fn known_devices(devices: &[UsbDevice]) -> BTreeMap<String, BusAddress> {
    devices
        .iter()
        .map(|device| (device.syspath.clone(), device.address()))
        .collect()
}

fn open_monitor_socket() -> io::Result<udev::MonitorSocket> {
    udev::MonitorBuilder::new_kernel()?
        .match_subsystem_devtype("usb", "usb_device")?
        // Only for the drivers the kernel binds to them (`keep_off_host`).
        .match_subsystem_devtype("usb", "usb_interface")?
        .listen()
}

/// The daemon dropped its receiver.
struct ReceiverGone;

struct MonitorState {
    /// The devices present as far as the monitor knows, by sysfs path, to tell what was
    /// removed while events were lost.
    known: BTreeMap<String, BusAddress>,
    /// The plugs whose strings were read (enumerated ones included), by sysfs path.
    described: BTreeMap<String, BusAddress>,
    /// Reads a plug's strings off the monitor's thread.
    describer: OnDemandQueue<DescribeRequest>,
    events: EventSender,
}

impl MonitorState {
    /// Turns one udev event into a daemon event. Errs only when the receiver is gone.
    fn handle(&mut self, event: &udev::Event) -> Result<(), ReceiverGone> {
        // Decision times count from here, the event off the socket, so that they
        // include reading the device.
        let received = std::time::Instant::now();
        let syspath = event.syspath().to_string_lossy().into_owned();
        if event.devtype() == Some(OsStr::new("usb_interface")) {
            let driver = event.property_value("DRIVER").map(OsStr::to_string_lossy);
            return match (event.event_type(), driver) {
                (udev::EventType::Bind, Some(driver)) => self.send(Event::InterfaceDriverBound {
                    interface_syspath: syspath,
                    driver: driver.into_owned(),
                }),
                _ => Ok(()),
            };
        }
        match event.event_type() {
            udev::EventType::Add | udev::EventType::Bind | udev::EventType::Change => {
                if !is_usb_device(event) {
                    return Ok(());
                }
                match usb_device_from_kernel_event(event) {
                    Some(device) => {
                        let address = device.address();
                        let ids = (device.vendor_id, device.product_id);
                        let syspath = device.syspath.clone();
                        self.known.insert(syspath.clone(), address);
                        self.send(Event::DeviceAdded {
                            device: Box::new(device),
                            received,
                        })?;
                        // Only after the plug is announced: its strings must not reach
                        // the daemon before the plug they belong to.
                        if self.described.get(&syspath) != Some(&address) {
                            self.described.insert(syspath.clone(), address);
                            self.describer.push(DescribeRequest {
                                syspath,
                                address,
                                ids,
                            });
                        }
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
            udev::EventType::Remove => {
                if !is_usb_device(event) {
                    return Ok(());
                }
                let known = self.known.remove(&syspath);
                self.described.remove(&syspath);
                // The instance that left, as the event names it: by now sysfs may hold
                // the next plug on the same port.
                let number = |name: &str| event.property_value(name).and_then(parse_decimal_u16);
                let address = match (number("BUSNUM"), number("DEVNUM")) {
                    (Some(bus), Some(device)) => Some(BusAddress { bus, device }),
                    _ => known,
                };
                self.send(Event::DeviceRemoved { syspath, address })
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
        let present_now = known_devices(&present);
        for (syspath, address) in &self.known {
            if present_now.get(syspath) != Some(address) {
                self.send(Event::DeviceRemoved {
                    syspath: syspath.clone(),
                    address: Some(*address),
                })?;
            }
        }
        for device in present {
            self.send(Event::DeviceAdded {
                device: Box::new(device),
                received: std::time::Instant::now(),
            })?;
        }
        self.described = present_now.clone();
        self.known = present_now;
        Ok(())
    }
}

impl DeviceAttributes for udev::Device {
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
    // Neither of these two goes through libudev: its parent and enumerator objects
    // read `uevent` files, which can wait while the kernel configures the device (or
    // its hub), and the monitor must pass each uevent on the moment it comes.
    fn parent_hub(&self) -> Option<String> {
        parent_hub_of(&udev::Device::sysname(self).to_string_lossy())
    }
    fn interface_children(&self) -> Vec<InterfaceClass> {
        interface_classes_in(
            udev::Device::syspath(self),
            &udev::Device::sysname(self).to_string_lossy(),
        )
    }
}

/// A device from its kernel uevent, without waiting for its strings
/// (`usb_device_from_event`).
fn usb_device_from_kernel_event(device: &udev::Device) -> Option<UsbDevice> {
    match usb_device_from_event(device) {
        Ok(usb_device) => Some(usb_device),
        Err(missing) => {
            log::debug!(
                "skipping a uevent of usb device {}: no {missing}",
                device.syspath().display()
            );
            None
        }
    }
}

/// A plug whose strings the describing thread is to read: the instance, and the IDs
/// its uevent announced (the hardware database's key).
struct DescribeRequest {
    syspath: String,
    address: BusAddress,
    ids: (u16, u16),
}

/// Reads the strings of a plug announced without them, and sends `DeviceDescribed`
/// if the plug is still the one at its path before and after the reads; then, when
/// udev's hardware database has names for it, a second `DeviceDescribed` with them. A
/// read waits while the kernel holds the device (configuring it, or tearing it down
/// after an unplug). Whether the events could be sent (false: the receiver is gone).
fn describe(syspath: String, address: BusAddress, ids: (u16, u16), events: &EventSender) -> bool {
    let still_there = || sysfs_address(&syspath) == Some(address);
    if !still_there() {
        return true;
    }
    let text =
        |name: &str| read_attribute(Path::new(&syspath), name).and_then(|value| lossy_text(&value));
    let (serial, manufacturer, product) = (text("serial"), text("manufacturer"), text("product"));
    // The reads may have waited through an unplug and the next plug.
    if !still_there() {
        return true;
    }
    let mut description = DeviceDescription {
        syspath,
        address,
        serial,
        manufacturer,
        product,
        vendor_from_database: None,
        model_from_database: None,
    };
    // The strings first: a rule on the serial waits for them, not for the names.
    if events
        .send(Event::DeviceDescribed(Box::new(description.clone())))
        .is_err()
    {
        return false;
    }
    let (vendor, model) = database_names(ids, description.product.as_deref());
    if vendor.is_none() && model.is_none() {
        return true;
    }
    description.vendor_from_database = vendor;
    description.model_from_database = model;
    events
        .send(Event::DeviceDescribed(Box::new(description)))
        .is_ok()
}

thread_local! {
    /// udev's hardware database, opened by the describing thread's first lookup and
    /// closed when that thread ends (its queue is empty): a burst of plugs maps it
    /// once, and an idle daemon keeps none of its pages.
    static HARDWARE_DATABASE: std::cell::OnceCell<Option<udev::Hwdb>> =
        const { std::cell::OnceCell::new() };
}

/// The vendor and model names of udev's hardware database, as udev's `hwdb` builtin
/// gives them for a device: the lookup key is `usb:vVVVVpPPPP:` and the product
/// string. The file needs no udevd. A lookup walks a trie in a file mapping: off the
/// plug's path, since in the test VM, whose /usr is a 9p share, each walk on a fresh
/// mapping took about 40 ms.
fn database_names(
    (vendor_id, product_id): (u16, u16),
    product: Option<&str>,
) -> (Option<String>, Option<String>) {
    let modalias = format!(
        "usb:v{vendor_id:04X}p{product_id:04X}:{}",
        product.unwrap_or("n/a")
    );
    if modalias.contains('\0') {
        return (None, None);
    }
    HARDWARE_DATABASE.with(|database| {
        let database = database.get_or_init(|| {
            udev::Hwdb::new()
                .map_err(|error| log::debug!("no udev hardware database: {error}"))
                .ok()
        });
        let Some(hwdb) = database else {
            return (None, None);
        };
        let lookup = |name: &str| {
            hwdb.query_one(modalias.as_str(), name)
                .map(|value| value.to_string_lossy().into_owned())
                .filter(|value| !value.is_empty())
        };
        (
            lookup("ID_VENDOR_FROM_DATABASE"),
            lookup("ID_MODEL_FROM_DATABASE"),
        )
    })
}

/// The bus and device number at a sysfs path now. These attributes never wait.
fn sysfs_address(syspath: &str) -> Option<BusAddress> {
    let number = |name: &str| {
        read_attribute(Path::new(syspath), name).and_then(|value| parse_decimal_u16(&value))
    };
    Some(BusAddress {
        bus: number("busnum")?,
        device: number("devnum")?,
    })
}

fn usb_device_from_udev(device: &udev::Device) -> Option<UsbDevice> {
    match usb_device_from_attributes(device) {
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
