//! The one closed `Event` enum: everything that can wake the daemon's loop.

use crate::model::UsbDevice;
use std::time::Instant;

/// What happened to a domain, as far as placement cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainChange {
    Started,
    Stopped,
    /// Defined, undefined, suspended, resumed and the rest: re-read, nothing more.
    Other,
}

/// Events are hints: each one only makes the loop reconcile again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// udev `add`, `bind` or `change` of a `usb_device`. `received` is when the monitor
    /// read it off udev's socket: decision times count from there, so that time spent
    /// queued behind other work is not hidden.
    DeviceAdded {
        device: UsbDevice,
        received: Instant,
    },
    /// udev `remove`. sysfs is gone by now, so only the path and numbers are known.
    DeviceRemoved { syspath: String },
    /// A domain lifecycle event.
    Domain {
        domain: String,
        change: DomainChange,
    },
    /// libvirt's DEVICE_REMOVED: a hot-unplug finished.
    DomainDeviceRemoved { domain: String, alias: String },
    /// The libvirt connection closed or broke.
    HypervisorDisconnected { reason: String },
    /// The rules file changed on disk.
    ConfigChanged,
    /// SIGHUP.
    Reload,
    /// SIGTERM or SIGINT.
    Terminate,
    /// A watcher thread failed; the daemon cannot see that source any more.
    SourceFailed {
        source: &'static str,
        message: String,
    },
}
