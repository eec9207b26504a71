//! The seam between the daemon and libvirt: the `Hypervisor` trait, the domain view
//! it returns, and the hostdev ownership rules. `libvirt` implements it for real;
//! tests implement it with fakes.

pub mod libvirt;

use crate::model::{BusAddress, UsbId};
use serde::{Deserialize, Serialize};

/// Prefix of every user alias usbpass gives a hostdev. libvirt keeps `ua-` aliases.
pub const ALIAS_PREFIX: &str = "ua-usbpass-";
/// Prefix of hostdevs that `usbpass attach` placed by hand: the daemon keeps them where
/// they are and only removes them once their device is gone.
pub const MANUAL_ALIAS_PREFIX: &str = "ua-usbpass-manual-";

/// Who created a hostdev, read from its alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ownership {
    /// Attached by the daemon following the rules.
    Rules,
    /// Attached by `usbpass attach`.
    Manual,
    /// Anything else: never touched.
    Foreign,
}

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
        match self.alias.as_deref() {
            Some(alias) if alias.starts_with(MANUAL_ALIAS_PREFIX) => Ownership::Manual,
            Some(alias) if alias.starts_with(ALIAS_PREFIX) => Ownership::Rules,
            _ => Ownership::Foreign,
        }
    }
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
    Other,
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
}

impl HypervisorError {
    pub fn kind(&self) -> FailureKind {
        match self {
            HypervisorError::Connect { .. } => FailureKind::ConnectionLost,
            HypervisorError::ListDomains { kind, .. }
            | HypervisorError::ReadDomainXml { kind, .. }
            | HypervisorError::Attach { kind, .. }
            | HypervisorError::Detach { kind, .. } => *kind,
        }
    }
}

/// What the daemon needs from libvirt. Calls are synchronous; events arrive separately
/// as `Event`s.
pub trait Hypervisor {
    /// Every running domain with the USB hostdevs of its live XML.
    fn running_domains(&mut self) -> Result<Vec<DomainView>, HypervisorError>;
    /// Hot-plug a hostdev, live only, so the persistent config never names a device
    /// that may be absent at the next boot. `device` names the device in messages.
    fn attach(
        &mut self,
        domain: &str,
        device: &str,
        hostdev_xml: &str,
    ) -> Result<(), HypervisorError>;
    /// Hot-unplug the hostdev with this alias, live only.
    fn detach(&mut self, domain: &str, alias: &str) -> Result<(), HypervisorError>;
}
