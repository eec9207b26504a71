//! The `DeviceSource` for a host the daemon reaches through libvirt: its USB devices as
//! libvirt's node devices list them, kept current by node-device lifecycle events. A
//! hostdev names a bus and device number on the host libvirt runs on, so for a remote
//! uri these, not this machine's udev, are the devices.
//!
//! A device is listed once libvirt knows at least one of its interfaces: its own class
//! is not reported, and only its interface tells a hub (never passed through) from the
//! rest. The kernel adds the interfaces right after the device, and libvirt reports each
//! as a node of its own: the notices that queue up while the worker reads one batch, so
//! a device and its interfaces usually make one `DeviceAdded`; an interface that comes
//! later announces the device again, complete. When the connection breaks the worker reports `SourceFailed`: the daemon
//! cannot see that host's plugs any more, and stops (systemd restarts it, and the fresh
//! daemon lists the devices again).

use super::events::ensure_event_loop;
use super::node_device_events::{self, NodeDeviceRegistrations, NodeNotice};
use super::node_devices::{
    parse_node_device, usb_device_from_node, NodeDevice, UsbDeviceNode, UsbInterfaceNode,
};
use super::{is_local_uri, KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_SECONDS};
use crate::event::{Event, EventSender};
use crate::host::select::{self, SourceKind, SourceRefusal};
use crate::host::{DeviceSource, HostError};
use crate::model::{BusAddress, UsbDevice};
use crate::rules::Config;
use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use virt::connect::Connect;
use virt::sys;

/// The name the daemon's `SourceFailed` gives this source.
const SOURCE_NAME: &str = "libvirt node devices";

/// The USB node devices known so far, by node name.
#[derive(Debug, Default)]
struct Known {
    devices: BTreeMap<String, UsbDeviceNode>,
    interfaces: BTreeMap<String, UsbInterfaceNode>,
}

impl Known {
    fn insert(&mut self, node: NodeDevice) {
        match node {
            NodeDevice::UsbDevice(device) => {
                self.devices.insert(device.name.clone(), device);
            }
            NodeDevice::UsbInterface(interface) => {
                self.interfaces.insert(interface.name.clone(), interface);
            }
            NodeDevice::Other { .. } => {}
        }
    }

    /// The device of node `name` as a `UsbDevice`, when it can be one yet.
    fn usb_device(&self, name: &str) -> Option<UsbDevice> {
        let node = self.devices.get(name)?;
        let classes: Vec<_> = self
            .interfaces
            .values()
            .filter(|interface| interface.parent.as_deref() == Some(name))
            .map(|interface| interface.class)
            .collect();
        match usb_device_from_node(node, &classes) {
            Ok(device) => Some(device),
            Err(why) => {
                log::debug!("node device {name} is not listed yet: {why:?}");
                None
            }
        }
    }

    /// A node appeared: remembered; returns the name of the `usb_device` node it
    /// concerns (itself, or an interface's parent), whose announcement is due.
    fn created(&mut self, node: NodeDevice) -> Option<String> {
        let device = match &node {
            NodeDevice::UsbDevice(device) => device.name.clone(),
            NodeDevice::UsbInterface(interface) => interface.parent.clone()?,
            NodeDevice::Other { .. } => return None,
        };
        self.insert(node);
        Some(device)
    }

    /// A node went: forgotten; the daemon's `DeviceRemoved` when it was a device.
    ///
    /// The kernel removes a device's interfaces before the device, so by then its
    /// interface nodes are usually gone: the device's node alone names the instance (its
    /// sysfs path and its bus and device number). A device never announced (no
    /// interface yet) is unknown to the daemon, which ignores its removal.
    fn deleted(&mut self, name: &str) -> Option<Event> {
        let Some(node) = self.devices.remove(name) else {
            self.interfaces.remove(name);
            return None;
        };
        self.interfaces
            .retain(|_, interface| interface.parent.as_deref() != Some(name));
        Some(Event::DeviceRemoved {
            syspath: node.sysfs_path?,
            address: Some(BusAddress {
                bus: node.bus,
                device: node.device,
            }),
        })
    }

    fn all(&self) -> Vec<UsbDevice> {
        self.devices
            .keys()
            .filter_map(|name| self.usb_device(name))
            .collect()
    }
}

fn lock(known: &Mutex<Known>) -> MutexGuard<'_, Known> {
    known
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// libvirt's node devices at one uri, with a watcher that turns their arrival and
/// removal into the daemon's `DeviceAdded` and `DeviceRemoved`.
pub struct LibvirtDeviceSource {
    uri: String,
    known: Arc<Mutex<Known>>,
    // Field order is drop order: the callbacks are deregistered (libvirt frees their
    // senders, and the worker, seeing its channel closed, ends) before our reference on
    // the connection goes.
    registrations: NodeDeviceRegistrations,
    connection: Connect,
}

impl std::fmt::Debug for LibvirtDeviceSource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LibvirtDeviceSource")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl LibvirtDeviceSource {
    /// Opens its own connection to `uri` (keepalive for remote uris, as the daemon's
    /// connection), starts the worker and registers for node-device events, in that
    /// order, so that no plug after this returns is missed by the `enumerate()` that
    /// follows. The watcher's events go to `events`.
    pub fn open(uri: &str, events: EventSender) -> Result<LibvirtDeviceSource, HostError> {
        let failed = |message: String| HostError::EnumerateThroughLibvirt {
            uri: uri.to_string(),
            message,
        };
        virt::error::clear_error_callback();
        ensure_event_loop().map_err(|message| failed(format!("no event loop: {message}")))?;
        let connection =
            Connect::open(Some(uri)).map_err(|error| failed(error.message().to_string()))?;
        if !is_local_uri(uri) {
            connection
                .set_keep_alive(KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_COUNT)
                .map_err(|error| failed(format!("cannot enable keepalive: {}", error.message())))?;
        }
        let known = Arc::new(Mutex::new(Known::default()));
        let (notices, receiver) = mpsc::channel();
        let worker = Worker {
            uri: uri.to_string(),
            connection: connection.clone(),
            known: Arc::clone(&known),
            events,
        };
        std::thread::Builder::new()
            .name("libvirt-nodedev".into())
            .spawn(move || worker.run(receiver))
            .map_err(|error| failed(format!("cannot start the watcher thread: {error}")))?;
        // The worker ends when the last sender goes: ours now, libvirt's copies when
        // the registrations drop.
        let registrations =
            node_device_events::register(&connection, &notices).map_err(|error| {
                failed(format!(
                    "cannot register for {} events: {}",
                    error.callback,
                    error.source.message()
                ))
            })?;
        Ok(LibvirtDeviceSource {
            uri: uri.to_string(),
            known,
            registrations,
            connection,
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the node-device event callback is registered (for the tests).
    pub fn is_watching(&self) -> bool {
        self.registrations.is_registered()
    }
}

impl DeviceSource for LibvirtDeviceSource {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError> {
        // Held while listing, so that the worker's events apply after the listing.
        let mut known = lock(&self.known);
        *known =
            list_known(&self.connection).map_err(|message| HostError::EnumerateThroughLibvirt {
                uri: self.uri.clone(),
                message,
            })?;
        Ok(known.all())
    }

    fn accepts(&self, config: &Config) -> Result<(), SourceRefusal> {
        select::accepts(config, SourceKind::Libvirt, &self.uri)
    }
}

/// The USB devices of libvirt at `uri` now, for the CLI: a read-only connection of its
/// own, no events.
pub fn list_usb_devices(uri: &str) -> Result<Vec<UsbDevice>, HostError> {
    let failed = |message: String| HostError::EnumerateThroughLibvirt {
        uri: uri.to_string(),
        message,
    };
    virt::error::clear_error_callback();
    let connection =
        Connect::open_read_only(Some(uri)).map_err(|error| failed(error.message().to_string()))?;
    Ok(list_known(&connection).map_err(failed)?.all())
}

/// Every USB device and interface node and its XML.
fn list_known(connection: &Connect) -> Result<Known, String> {
    let nodes = connection
        .list_all_node_devices(
            sys::VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
                | sys::VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_INTERFACE,
        )
        .map_err(|error| error.message().to_string())?;
    let mut known = Known::default();
    for node in &nodes {
        match node.xml_desc(0) {
            Ok(xml) => match parse_node_device(&xml) {
                Ok(parsed) => known.insert(parsed),
                Err(error) => log::warn!("{error}; leaving it out"),
            },
            // Gone between the listing and now: its DELETED event is on the way.
            Err(error) => log::debug!("cannot read a node device's xml: {}", error.message()),
        }
    }
    Ok(known)
}

/// The thread that turns node-device notices into the daemon's events: it reads a new
/// node's XML (a round trip that must not run on libvirt's event thread) and remembers
/// each node's device, so that a DELETED, which names only the node, removes exactly the
/// instance it was.
struct Worker {
    uri: String,
    connection: Connect,
    known: Arc<Mutex<Known>>,
    events: EventSender,
}

impl Worker {
    fn run(self, notices: Receiver<NodeNotice>) {
        let connection = self.connection;
        let read = move |name: &str| read_node(&connection, name);
        handle_notices(&notices, read, &self.known, &self.events, &self.uri);
    }
}

/// A node's XML, parsed; None when it is gone already or unreadable.
fn read_node(connection: &Connect, name: &str) -> Option<NodeDevice> {
    let xml = match connection
        .lookup_node_device_by_name(name)
        .and_then(|node| node.xml_desc(0))
    {
        Ok(xml) => xml,
        Err(error) => {
            log::debug!("cannot read node device {name}: {}", error.message());
            return None;
        }
    };
    match parse_node_device(&xml) {
        Ok(node) => Some(node),
        Err(error) => {
            log::warn!("{error}; ignoring node device {name}");
            None
        }
    }
}

/// The worker's loop, until the notices end (the source is dropped) or the connection
/// closes. What queues up while it works (a device and then its interfaces, each read
/// with a round trip) is one batch: the daemon hears of each new device once, with the
/// interfaces known by then, and removals in the order they came.
fn handle_notices(
    notices: &Receiver<NodeNotice>,
    read: impl Fn(&str) -> Option<NodeDevice>,
    known: &Mutex<Known>,
    events: &EventSender,
    uri: &str,
) {
    while let Ok(first) = notices.recv() {
        let mut due: Vec<(String, Instant)> = Vec::new();
        let mut next = Some(first);
        while let Some(notice) = next.take() {
            match notice {
                NodeNotice::Created { name, received } => {
                    if let Some(device) = read(&name).and_then(|node| lock(known).created(node)) {
                        if !due.iter().any(|(due_name, _)| *due_name == device) {
                            due.push((device, received));
                        }
                    }
                }
                NodeNotice::Deleted { name } => {
                    due.retain(|(device, _)| *device != name);
                    let removed = lock(known).deleted(&name);
                    if let Some(event) = removed {
                        let _ = events.send(event);
                    }
                }
                NodeNotice::Closed { reason } => {
                    let _ = events.send(Event::SourceFailed {
                        source: SOURCE_NAME,
                        message: format!("connection to {uri} lost: {reason}"),
                    });
                    return;
                }
            }
            next = notices.try_recv().ok();
        }
        let known = lock(known);
        for (name, received) in due {
            if let Some(device) = known.usb_device(&name) {
                let _ = events.send(Event::DeviceAdded {
                    device: Box::new(device),
                    received,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
