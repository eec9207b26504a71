//! A test double for `host::interfaces::InterfaceGate`: records every call (with how
//! many hypervisor calls the fake world had seen by then, so a test can tell an
//! authorization came before its attach) and fails on demand.

use crate::host::interfaces::{InterfaceError, InterfaceGate};
use crate::model::access::HostAccess;
use crate::model::{BusAddress, UsbDevice};
use crate::testing::fake_hypervisor::SharedWorld;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateCall {
    HubDefault {
        off: bool,
    },
    Apply {
        address: BusAddress,
        access: HostAccess,
    },
}

/// What the gate saw, shared between the test and the daemon under test.
#[derive(Debug, Default)]
pub struct GateLog {
    /// Each call, with the number of hypervisor calls recorded before it.
    pub calls: Vec<(GateCall, usize)>,
    /// Devices whose `apply` fails (until removed).
    pub failing: BTreeSet<BusAddress>,
    /// What each device's interfaces are now, as the fake's kernel would have them.
    pub access: BTreeMap<BusAddress, HostAccess>,
    pub hubs_off: bool,
}

impl GateLog {
    /// The accesses applied to one device, in order.
    pub fn applied(&self, address: BusAddress) -> Vec<HostAccess> {
        self.calls
            .iter()
            .filter_map(|(call, _)| match call {
                GateCall::Apply { address: a, access } if *a == address => Some(*access),
                _ => None,
            })
            .collect()
    }

    /// Where in the hypervisor's call list the last `apply` of `access` to `address` came.
    pub fn applied_before_call(&self, address: BusAddress, access: HostAccess) -> Option<usize> {
        self.calls
            .iter()
            .rev()
            .find_map(|(call, before)| match call {
                GateCall::Apply {
                    address: a,
                    access: x,
                } if *a == address && *x == access => Some(*before),
                _ => None,
            })
    }
}

/// The recording gate. Clone the `log` handle before handing the gate to the daemon.
pub struct RecordingGate {
    pub log: Arc<Mutex<GateLog>>,
    world: Option<SharedWorld>,
}

impl RecordingGate {
    pub fn new(world: Option<SharedWorld>) -> RecordingGate {
        RecordingGate {
            log: Arc::new(Mutex::new(GateLog::default())),
            world,
        }
    }

    fn hypervisor_calls(&self) -> usize {
        self.world
            .as_ref()
            .map_or(0, |world| world.lock().calls.len())
    }

    fn log(&self) -> MutexGuard<'_, GateLog> {
        self.log.lock().unwrap()
    }
}

impl InterfaceGate for RecordingGate {
    fn set_hub_default(&mut self, off: bool) -> Result<Vec<String>, InterfaceError> {
        let before = self.hypervisor_calls();
        let mut log = self.log();
        log.calls.push((GateCall::HubDefault { off }, before));
        let changed = log.hubs_off != off;
        log.hubs_off = off;
        Ok(if changed {
            vec!["usb1".to_string()]
        } else {
            Vec::new()
        })
    }

    fn apply(
        &mut self,
        device: &UsbDevice,
        access: HostAccess,
    ) -> Result<Vec<String>, InterfaceError> {
        let before = self.hypervisor_calls();
        let mut log = self.log();
        let address = device.address();
        log.calls
            .push((GateCall::Apply { address, access }, before));
        if log.failing.contains(&address) {
            let interface = format!("{}:1.0", device.port_path);
            return Err(InterfaceError::WriteAuthorized {
                device: device.to_string(),
                path: format!("{}/{interface}/authorized", device.syspath).into(),
                interface,
                value: u8::from(access != HostAccess::Off),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let changed = log.access.insert(address, access) != Some(access);
        Ok(if changed {
            vec![format!("{}:1.0", device.port_path)]
        } else {
            Vec::new()
        })
    }
}
