//! The `DeviceSource` for a host the daemon reaches through libvirt: its USB devices as
//! libvirt's node devices list them, kept current by node-device lifecycle events. A
//! hostdev names a bus and device number on the host libvirt runs on, so for a remote
//! uri these, not this machine's udev, are the devices.
//!
//! A device is listed once libvirt knows at least one of its interfaces: its own class
//! is not reported, and only its interface tells a hub (never passed through) from the
//! rest. The kernel adds the interfaces right after the device, and libvirt reports each
//! as a node of its own; each one that arrives announces the device again with what is
//! known. When the connection breaks the worker reports `SourceFailed`: the daemon
//! cannot see that host's plugs any more, and stops (systemd restarts it, and the fresh
//! daemon lists the devices again).

use super::events::ensure_event_loop;
use super::node_device_events::{self, NodeDeviceRegistrations, NodeNotice};
use super::node_devices::{
    parse_node_device, usb_device_from_node, NodeDevice, UsbDeviceNode, UsbInterfaceNode,
};
use super::{is_local_uri, KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_SECONDS};
use crate::event::Event;
use crate::host::select::{self, SourceKind, SourceRefusal};
use crate::host::{DeviceSource, HostError};
use crate::model::{BusAddress, UsbDevice};
use crate::rules::Config;
use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, Sender};
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
    pub fn open(uri: &str, events: Sender<Event>) -> Result<LibvirtDeviceSource, HostError> {
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
    events: Sender<Event>,
}

impl Worker {
    fn run(self, notices: Receiver<NodeNotice>) {
        for notice in notices {
            match notice {
                NodeNotice::Created { name, received } => self.created(&name, received),
                NodeNotice::Deleted { name } => self.deleted(&name),
                NodeNotice::Closed { reason } => {
                    let _ = self.events.send(Event::SourceFailed {
                        source: SOURCE_NAME,
                        message: format!("connection to {} lost: {reason}", self.uri),
                    });
                    return;
                }
            }
        }
    }

    fn created(&self, name: &str, received: Instant) {
        let xml = match self
            .connection
            .lookup_node_device_by_name(name)
            .and_then(|node| node.xml_desc(0))
        {
            Ok(xml) => xml,
            Err(error) => {
                log::debug!("cannot read node device {name}: {}", error.message());
                return;
            }
        };
        let node = match parse_node_device(&xml) {
            Ok(node) => node,
            Err(error) => {
                log::warn!("{error}; ignoring node device {name}");
                return;
            }
        };
        let device_name = match &node {
            NodeDevice::UsbDevice(device) => device.name.clone(),
            NodeDevice::UsbInterface(interface) => match &interface.parent {
                Some(parent) => parent.clone(),
                None => return,
            },
            NodeDevice::Other { .. } => return,
        };
        let device = {
            let mut known = lock(&self.known);
            known.insert(node);
            known.usb_device(&device_name)
        };
        if let Some(device) = device {
            let _ = self.events.send(Event::DeviceAdded { device, received });
        }
    }

    fn deleted(&self, name: &str) {
        let removed = {
            let mut known = lock(&self.known);
            // The kernel removes a device's interfaces before the device, so by now its
            // interface nodes are usually gone: the node alone names the instance.
            let removed = known.devices.remove(name);
            if removed.is_some() {
                known
                    .interfaces
                    .retain(|_, interface| interface.parent.as_deref() != Some(name));
            } else {
                known.interfaces.remove(name);
            }
            removed
        };
        // A device never announced (no interface yet) is unknown to the daemon, which
        // ignores its removal.
        if let Some(node) = removed {
            if let Some(syspath) = node.sysfs_path {
                let _ = self.events.send(Event::DeviceRemoved {
                    syspath,
                    address: Some(BusAddress {
                        bus: node.bus,
                        device: node.device,
                    }),
                });
            }
        }
    }
}
