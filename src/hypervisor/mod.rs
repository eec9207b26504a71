//! The seam between the daemon and libvirt: the `Hypervisor` trait, the domain view
//! it returns, and the hostdev ownership rules. `libvirt` implements it for real;
//! tests implement it with fakes.

pub mod libvirt;

use crate::event::EventSender;
use crate::model::alias::{HostdevAlias, Ownership};
use crate::model::{BusAddress, UsbDevice, UsbId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One `<hostdev type='usb'>` in a running domain's live XML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbHostdev {
    pub alias: Option<String>,
    pub id: Option<UsbId>,
    /// `<address bus device>`: libvirt fills it in on attach.
    pub address: Option<BusAddress>,
}

impl UsbHostdev {
    pub fn ownership(&self) -> Ownership {
        Ownership::of_alias(self.alias.as_deref())
    }

    /// The alias, when usbpass made this hostdev.
    pub fn owned_alias(&self) -> Option<HostdevAlias> {
        HostdevAlias::parse(self.alias.as_deref()?).ok()
    }
}

/// What to hot-plug: one plug of one USB device, under usbpass's alias. The libvirt
/// adapter turns it into hostdev XML; nothing outside it knows that XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostdevSpec {
    pub id: UsbId,
    /// Bus and device number: tells identical devices apart, and goes stale on replug.
    pub address: BusAddress,
    /// The kernel's port path, for messages only: libvirt's USB source has no port.
    pub port_path: String,
    pub alias: HostdevAlias,
}

impl HostdevSpec {
    pub fn new(device: &UsbDevice, alias: HostdevAlias) -> HostdevSpec {
        HostdevSpec {
            id: device.id(),
            address: device.address(),
            port_path: device.port_path.clone(),
            alias,
        }
    }
}

impl fmt::Display for HostdevSpec {
    /// The device as `UsbDevice` prints it: `046d:c52b at 001:005 (port 1-2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {} (port {})",
            self.id, self.address, self.port_path
        )
    }
}

/// A domain whose persistent definition holds hostdevs usbpass made. usbpass attaches
/// live only; such a hostdev got there by someone defining the VM from XML dumped while
/// a device was attached (`virsh dumpxml`, an edit, `virsh define`), and it keeps the VM
/// from starting once that device is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinedHostdevs {
    pub domain: String,
    pub aliases: Vec<HostdevAlias>,
}

/// A running domain whose live XML could not be read: nothing is known of its
/// hostdevs, so nothing may be attached to it or detached from it until it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableDomain {
    pub name: String,
    pub error: HypervisorError,
}

/// One listing of the running domains: those whose live XML was read, sorted by name,
/// and those whose XML could not be read. One VM that does not answer does not hide
/// the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunningDomains {
    pub readable: Vec<DomainView>,
    pub unreadable: Vec<UnreadableDomain>,
}

/// A running domain and its USB hostdevs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainView {
    pub name: String,
    pub hostdevs: Vec<UsbHostdev>,
}

/// Why a libvirt call failed, sorted into the cases the daemon treats differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// libvirt or QEMU cannot find the host device yet (the add/bind race) or any more.
    DeviceNotFound,
    /// Another domain or program holds the device.
    DeviceInUse,
    /// The guest's USB controller has no free port.
    NoFreePort,
    /// The domain stopped or was undefined between listing and the call.
    DomainGone,
    /// The connection to libvirt broke.
    ConnectionLost,
    /// No answer within the call's deadline: libvirtd or the VM's QEMU is stuck. The
    /// call cannot be cancelled; its real answer is booked when it comes.
    TimedOut,
    Other,
}

impl FailureKind {
    /// The one name of each kind: the daemon's log lines (`kind=`) and the state file
    /// (through serde's kebab-case, which a test holds equal to this) both use it.
    /// What the failure means for the user, and what to do: `usbpass why` says it
    /// next to libvirt's own message.
    pub fn meaning(self) -> &'static str {
        match self {
            FailureKind::DeviceNotFound => {
                "libvirt or QEMU could not find the device on the host: it was still being set up (the daemon retries) or it is gone"
            }
            FailureKind::DeviceInUse => {
                "another vm or program holds the device: usbpass never takes it from them"
            }
            FailureKind::NoFreePort => {
                "the vm's usb controller has no free port: give it more (ports='15' on its qemu-xhci controller) or free one; meanwhile the rule's next running vm gets the device"
            }
            FailureKind::DomainGone => "the vm stopped or was undefined during the call",
            FailureKind::ConnectionLost => {
                "the connection to libvirt broke; the daemon reconnects and tries again"
            }
            FailureKind::TimedOut => {
                "the vm (its qemu) or libvirtd did not answer in time; the daemon waits for that call and serves the other vms meanwhile"
            }
            FailureKind::Other => "libvirt's message says why",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::DeviceNotFound => "device-not-found",
            FailureKind::DeviceInUse => "device-in-use",
            FailureKind::NoFreePort => "no-free-port",
            FailureKind::DomainGone => "domain-gone",
            FailureKind::ConnectionLost => "connection-lost",
            FailureKind::TimedOut => "timed-out",
            FailureKind::Other => "other",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed hypervisor call, with libvirt's own message kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("cannot list running vms: {message}")]
    ListDomains { kind: FailureKind, message: String },
    #[error("cannot read the live xml of vm {domain}: {message}")]
    ReadDomainXml {
        domain: String,
        kind: FailureKind,
        message: String,
    },
    #[error("cannot attach {device} to vm {domain}: {message}")]
    Attach {
        domain: String,
        device: String,
        kind: FailureKind,
        message: String,
    },
    #[error("cannot detach {alias} from vm {domain}: {message}")]
    Detach {
        domain: String,
        alias: String,
        kind: FailureKind,
        message: String,
    },
    #[error("cannot read the persistent definitions of the vms: {message}")]
    ListDefinitions { kind: FailureKind, message: String },
    #[error("cannot remove {alias} from the persistent definition of vm {domain}: {message}")]
    RemoveFromDefinition {
        domain: String,
        alias: String,
        kind: FailureKind,
        message: String,
    },
}

impl HypervisorError {
    pub fn kind(&self) -> FailureKind {
        match self {
            HypervisorError::Connect { .. } => FailureKind::ConnectionLost,
            HypervisorError::ListDomains { kind, .. }
            | HypervisorError::ReadDomainXml { kind, .. }
            | HypervisorError::Attach { kind, .. }
            | HypervisorError::Detach { kind, .. }
            | HypervisorError::ListDefinitions { kind, .. }
            | HypervisorError::RemoveFromDefinition { kind, .. } => *kind,
        }
    }
}

/// What the daemon and the CLI need from libvirt. Calls are synchronous; events arrive
/// separately as `Event`s. One connection is shared by several threads at once (the
/// daemon runs each VM's calls on a thread of its own, libvirt's client allows
/// concurrent calls on one connection), hence `&self`, `Send` and `Sync`.
pub trait Hypervisor: Send + Sync + 'static {
    /// Every running domain, each with the USB hostdevs of its live XML or the error
    /// that kept it from being read. Fails as a whole only when the list itself cannot
    /// be had.
    fn list_running(&self) -> Result<RunningDomains, HypervisorError>;
    /// Hot-plug a hostdev, live only, so the persistent config never names a device
    /// that may be absent at the next boot.
    fn attach(&self, domain: &str, hostdev: &HostdevSpec) -> Result<(), HypervisorError>;
    /// Hot-unplug the hostdev with this alias, live only. The alias type admits only
    /// hostdevs usbpass made.
    fn detach(&self, domain: &str, alias: &HostdevAlias) -> Result<(), HypervisorError>;

    /// Every running domain with the USB hostdevs of its live XML; fails on the first
    /// domain whose XML cannot be read (the CLI's all-or-nothing view).
    fn running_domains(&self) -> Result<Vec<DomainView>, HypervisorError> {
        let listing = self.list_running()?;
        match listing.unreadable.into_iter().next() {
            Some(unreadable) => Err(unreadable.error),
            None => Ok(listing.readable),
        }
    }

    /// Every persistent domain, running or not, whose definition (the inactive XML, not
    /// the live one) holds hostdevs usbpass made.
    fn owned_hostdevs_in_definitions(&self) -> Result<Vec<DefinedHostdevs>, HypervisorError>;
    /// Remove the hostdev with this alias from the domain's persistent definition only;
    /// a running domain keeps it live.
    fn remove_from_definition(
        &self,
        domain: &str,
        alias: &HostdevAlias,
    ) -> Result<(), HypervisorError>;
}

/// Opens hypervisor connections; the daemon calls it again after a disconnect. The
/// daemon connects on a thread of its own, so that a libvirtd that does not answer
/// cannot hold up its loop: hence `&self`, `Send` and `Sync`.
pub trait Connector: Send + Sync + 'static {
    type Hypervisor: Hypervisor;
    /// Connect and start delivering domain events into `events`.
    fn connect(&self, uri: &str, events: EventSender) -> Result<Self::Hypervisor, HypervisorError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_have_one_name_in_logs_and_the_state_file() {
        for kind in [
            FailureKind::DeviceNotFound,
            FailureKind::DeviceInUse,
            FailureKind::NoFreePort,
            FailureKind::DomainGone,
            FailureKind::ConnectionLost,
            FailureKind::TimedOut,
            FailureKind::Other,
        ] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
    }
}
