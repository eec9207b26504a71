//! `HostAccess`: who may use a device's interfaces, the host's drivers or a VM. Decided
//! by `reconcile::host_access`, carried out by `host::interfaces`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Who may use a device's interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostAccess {
    /// Authorized and probed: the host's drivers bind, as without `keep_off_host`.
    Host,
    /// Authorized, not probed: for QEMU's claim, with no host driver bound.
    Vm,
    /// Unauthorized: no driver at all, host or usbfs.
    Off,
}

impl HostAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            HostAccess::Host => "host",
            HostAccess::Vm => "vm",
            HostAccess::Off => "off",
        }
    }
}

impl fmt::Display for HostAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
