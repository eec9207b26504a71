//! The one closed `Event` enum: everything that can wake the daemon's loop.

use crate::daemon::control::ControlRequest;
use crate::daemon::executor::CallFinished;
use crate::model::{BusAddress, UsbDevice};
use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

/// How many events may wait for the loop. The loop never waits for libvirt, so it
/// drains the queue as fast as events come; a source that finds it full waits (the
/// kernel buffers what the monitor has not read), so what the daemon holds stays
/// bounded whatever a device or a VM does. The channel allocates and touches every
/// slot up front, so slots times `size_of::<Event>()` is resident for the daemon's
/// life: large payloads are boxed, and the loop drains a storm of 40 plugs (about 200
/// uevents) as they come.
pub const EVENT_QUEUE_CAPACITY: usize = 256;

/// The sending end of the loop's one channel, held by every event source.
pub type EventSender = SyncSender<Event>;

/// The loop's one channel, bounded at `EVENT_QUEUE_CAPACITY`.
pub fn event_channel() -> (EventSender, Receiver<Event>) {
    std::sync::mpsc::sync_channel(EVENT_QUEUE_CAPACITY)
}

/// A source of events that the daemon's watch thread polls beside its own (the kernel's
/// hotplug monitor): one thread waits on every descriptor, so a source costs no thread
/// of its own.
pub trait PolledSource: Send {
    /// Its name in `Event::SourceFailed`.
    fn name(&self) -> &'static str;
    /// The descriptor that becomes readable when there is something to read.
    fn descriptor(&self) -> RawFd;
    /// Reads everything ready now (the descriptor is non-blocking) and sends its events.
    fn read_ready(&mut self) -> SourceState;
}

/// What a `PolledSource` is after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceState {
    /// Poll it again.
    Open,
    /// The loop's receiver is gone: nobody wants events any more.
    ReceiverGone,
    /// Broken for good, with the one-line reason.
    Failed(String),
}

/// What happened to a domain, as far as placement cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainChange {
    Started,
    Stopped,
    /// Defined or redefined: its persistent definition may now hold a hostdev usbpass
    /// made (see `daemon::definitions`).
    Defined,
    /// Undefined, suspended, resumed and the rest: re-read, nothing more.
    Other,
}

/// The strings of a plug announced without them (`DeviceAdded` with `strings_pending`),
/// read once the kernel let go of the device. Only for the instance at `address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescription {
    pub syspath: String,
    pub address: BusAddress,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    /// udev's hardware database names, which follow in a second description (None in
    /// the first).
    pub vendor_from_database: Option<String>,
    pub model_from_database: Option<String>,
}

/// Events are hints: each one only makes the loop reconcile again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The kernel's `add`, `bind` or `change` of a `usb_device`, read from sysfs at once.
    /// `received` is when the monitor read it off its socket: decision times count from
    /// there, so that time spent queued behind other work is not hidden.
    DeviceAdded {
        device: Box<UsbDevice>,
        received: Instant,
    },
    /// The strings of a device that `DeviceAdded` announced with `strings_pending`.
    DeviceDescribed(Box<DeviceDescription>),
    /// The kernel bound a host driver (not usbfs) to a USB interface: `keep_off_host`
    /// undoes it at once on a device a VM holds (QEMU hands interfaces back to the
    /// host's drivers when it lets go, before libvirt says that the VM stopped).
    InterfaceDriverBound {
        interface_syspath: String,
        driver: String,
    },
    /// The kernel's `remove` of a `usb_device`. sysfs is gone by now; the event names
    /// the path and the instance that left (bus and device number, from its `BUSNUM`
    /// and `DEVNUM`). A removal removes only that instance: a newer plug on the same
    /// port has the same path and must stay. `None` when the event did not say.
    DeviceRemoved {
        syspath: String,
        address: Option<BusAddress>,
    },
    /// A domain lifecycle event.
    Domain {
        domain: String,
        change: DomainChange,
    },
    /// libvirt's DEVICE_REMOVED: a hot-unplug finished.
    DomainDeviceRemoved { domain: String, alias: String },
    /// libvirt's DEVICE_ADDED: a device was hot-plugged into a running domain, by
    /// usbpass or by anyone else.
    DomainDeviceAdded { domain: String, alias: String },
    /// A libvirt call the loop started off its thread returned (an attach, a detach,
    /// a listing), however late.
    CallFinished(Box<CallFinished>),
    /// `usbpass switch`, through the control socket: move a device group.
    Control(Box<ControlRequest>),
    /// A libvirt daemon's socket appeared: libvirtd (re)started, reconnect now.
    LibvirtSocketAppeared,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel keeps `EVENT_QUEUE_CAPACITY` slots of this size resident: a plain
    /// `UsbDevice` in a variant made it 248 bytes, a megabyte of an idle daemon.
    #[test]
    fn an_event_stays_small() {
        assert!(
            std::mem::size_of::<Event>() <= 64,
            "Event is {} bytes: box the large variant",
            std::mem::size_of::<Event>()
        );
    }
}
