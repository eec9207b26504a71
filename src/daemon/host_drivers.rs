//! The loop's side of `keep_off_host`: carries out `reconcile::host_access`'s decision
//! through the `host::interfaces::InterfaceGate`, remembering what it applied so that a
//! round costs no sysfs access for devices whose access did not change. Any word about
//! a device (its plug, the kernel's `bind` once its interfaces exist) makes it be
//! applied again. While no rule keeps anything off and nothing is left to undo, it does
//! nothing at all: devices behave exactly as without the setting.

use crate::host::interfaces::{InterfaceError, InterfaceGate};
use crate::hypervisor::DomainView;
use crate::model::access::HostAccess;
use crate::model::{BusAddress, UsbDevice};
use crate::reconcile::host_access::{host_access, HostAccessPlan};
use crate::reconcile::{self, LoopFacts, Plan};
use crate::rules::Config;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub(super) struct HostDrivers {
    gate: Option<Box<dyn InterfaceGate>>,
    /// What each present device's interfaces were last set to.
    applied: BTreeMap<BusAddress, HostAccess>,
    /// The root hubs' default is 0 through this gate.
    hubs_off: bool,
    /// Something may differ from what the kernel does without the setting: the hubs,
    /// or a device not yet handed back to the host.
    engaged: bool,
    warned_without_gate: bool,
    /// Devices a VM that stopped held, until a plan has decided where they go.
    released: BTreeSet<BusAddress>,
}

impl HostDrivers {
    pub(super) fn new() -> HostDrivers {
        HostDrivers {
            gate: None,
            applied: BTreeMap::new(),
            hubs_off: false,
            engaged: false,
            warned_without_gate: false,
            released: BTreeSet::new(),
        }
    }

    pub(super) fn set_gate(&mut self, gate: Box<dyn InterfaceGate>) {
        self.gate = Some(gate);
    }

    /// A word about this device: what its interfaces are may have changed.
    pub(super) fn forget(&mut self, address: BusAddress) {
        self.applied.remove(&address);
    }

    /// The kernel bound host driver `driver` to an interface of `device`. A device
    /// handed to a VM (access `vm`) must have none: QEMU gives the interfaces back to the
    /// host's drivers when it lets go, which for a VM that stops is before libvirt says
    /// so. Undone at once: deauthorizing unbinds the driver, and authorizing again does
    /// not probe, so the device is as its VM needs it if it comes back.
    pub(super) fn driver_bound(&mut self, device: &UsbDevice, driver: &str) {
        let address = device.address();
        // usbfs is a claim (QEMU's), not a host driver.
        if driver == "usbfs" || self.applied.get(&address) != Some(&HostAccess::Vm) {
            return;
        }
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        let result = gate
            .apply(device, HostAccess::Off)
            .and_then(|unbound| gate.apply(device, HostAccess::Vm).map(|_| unbound));
        match result {
            Ok(unbound) => log::info!(
                "host-access device={} addr={} port={} access=vm interfaces={} driver={driver} reason=host-driver-bound apply_us={}",
                device.id(),
                address,
                device.port_path,
                unbound.join(","),
                started.elapsed().as_micros()
            ),
            Err(error) => {
                // Applied afresh at the next round.
                self.applied.remove(&address);
                warn(&error);
            }
        }
    }

    /// `domain` stopped: its QEMU has given the devices it held (`domains`, the copy of
    /// the live XML before the stop) back to the host. Kept-off ones are turned off at
    /// once, before any listing.
    pub(super) fn vm_stopped(&mut self, domains: &[DomainView], domain: &str) {
        let held = domains
            .iter()
            .filter(|view| view.name == domain)
            .flat_map(|view| &view.hostdevs)
            .filter_map(|hostdev| reconcile::hostdev_target(hostdev).0);
        self.released.extend(held);
    }

    /// Decides (`reconcile::host_access`) and applies, for the round's `plan`, or with
    /// `None` when what the VMs hold is not known.
    pub(super) fn apply_plan(
        &mut self,
        config: &Config,
        devices: &[UsbDevice],
        facts: &LoopFacts,
        plan: Option<&Plan>,
    ) {
        let access = host_access(config, devices, facts, plan, &self.released);
        self.apply(&access, devices);
        if plan.is_some() {
            // The plan decided every device, the released ones too.
            self.released.clear();
        }
    }

    /// Makes the hubs and each device's interfaces what `plan` says.
    fn apply<'a>(
        &mut self,
        plan: &HostAccessPlan,
        devices: impl IntoIterator<Item = &'a UsbDevice>,
    ) {
        let Some(gate) = self.gate.as_mut() else {
            if plan.hubs_default_off && !self.warned_without_gate {
                self.warned_without_gate = true;
                log::warn!(
                    "keep_off_host is set, but this daemon reads its devices from libvirt's node devices and cannot reach that host's interface authorization: host drivers are not kept off"
                );
            }
            return;
        };
        if !plan.hubs_default_off && !self.engaged {
            return;
        }
        self.engaged = true;
        // First the hubs, so that no device plugged from now on is bound before its
        // turn; when the setting goes, the hubs come back before the devices.
        if plan.hubs_default_off != self.hubs_off {
            match gate.set_hub_default(plan.hubs_default_off) {
                Ok(hubs) => {
                    self.hubs_off = plan.hubs_default_off;
                    if !hubs.is_empty() {
                        log::info!(
                            "interface_authorized_default={} on {}: {}",
                            u8::from(!plan.hubs_default_off),
                            hubs.join(","),
                            if plan.hubs_default_off {
                                "host drivers bind a new device only once usbpass authorized it"
                            } else {
                                "no rule keeps devices off the host any more"
                            }
                        );
                    }
                }
                Err(error) => warn(&error),
            }
        }
        let by_address: HashMap<BusAddress, &UsbDevice> = devices
            .into_iter()
            .map(|device| (device.address(), device))
            .collect();
        self.applied
            .retain(|address, _| by_address.contains_key(address));
        let mut all_settled = true;
        for (address, access) in &plan.devices {
            if self.applied.get(address) == Some(access) {
                continue;
            }
            let Some(device) = by_address.get(address) else {
                continue;
            };
            let started = std::time::Instant::now();
            match gate.apply(device, *access) {
                Ok(changed) => {
                    self.applied.insert(*address, *access);
                    if !changed.is_empty() {
                        log::info!(
                            "host-access device={} addr={} port={} access={access} interfaces={} apply_us={}",
                            device.id(),
                            address,
                            device.port_path,
                            changed.join(","),
                            started.elapsed().as_micros()
                        );
                    }
                }
                Err(error) => {
                    all_settled = false;
                    warn(&error);
                }
            }
        }
        if !plan.hubs_default_off && all_settled && !self.hubs_off {
            self.engaged = false;
        }
    }

    /// On the way out: the hubs back to the kernel's default, so that devices plugged
    /// while no daemon runs reach their host drivers. Devices kept off stay off.
    pub(super) fn restore(&mut self) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        if self.hubs_off {
            match gate.set_hub_default(false) {
                Ok(hubs) if !hubs.is_empty() => {
                    log::info!("interface_authorized_default=1 on {} again", hubs.join(","))
                }
                Ok(_) => {}
                Err(error) => warn(&error),
            }
            self.hubs_off = false;
        }
    }
}

/// The error, and the remedy when sysfs is read-only.
fn warn(error: &InterfaceError) {
    if error.is_read_only_sysfs() {
        log::warn!(
            "{error}; keep_off_host needs a writable /sys: set ProtectKernelTunables=no for usbpass.service (README, keep_off_host)"
        );
    } else {
        log::warn!("{error}");
    }
}
