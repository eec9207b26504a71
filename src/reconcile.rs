//! The level-triggered core: compares what the rules want (rules × present devices ×
//! running VMs) with what the live XML shows, and returns the actions that close the
//! gap. Pure: no I/O, no clock. Applying its actions and calling it again yields none.

use crate::hypervisor::{DomainView, UsbHostdev};
use crate::model::alias::{HostdevAlias, Ownership};
use crate::model::{BusAddress, UsbDevice, UsbId};
use crate::rules::{Config, GiveBack, RuleChoice};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// Why an owned hostdev is being removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "vm")]
pub enum DetachReason {
    /// The device it points at is unplugged (or replugged under a new number).
    DeviceGone,
    /// No rule matches the device any more.
    NoRule,
    /// The rules now want the device in another VM (or the first-choice VM started).
    Moving(String),
    /// A second owned hostdev for the same device.
    Duplicate,
    /// `usbpass switch GROUP host`, or the group's VM is not running.
    SentToHost,
}

impl fmt::Display for DetachReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetachReason::DeviceGone => f.write_str("device-gone"),
            DetachReason::NoRule => f.write_str("no-rule"),
            DetachReason::Moving(vm) => write!(f, "moving-to-{vm}"),
            DetachReason::Duplicate => f.write_str("duplicate"),
            DetachReason::SentToHost => f.write_str("sent-to-host"),
        }
    }
}

/// One change to make through the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "action")]
pub enum Action {
    Detach {
        domain: String,
        alias: HostdevAlias,
        /// What the hostdev pointed at, for messages.
        id: Option<UsbId>,
        address: Option<BusAddress>,
        reason: DetachReason,
    },
    Attach {
        domain: String,
        device: Box<UsbDevice>,
        alias: HostdevAlias,
        rule: String,
    },
}

impl Action {
    pub fn domain(&self) -> &str {
        match self {
            Action::Detach { domain, .. } | Action::Attach { domain, .. } => domain,
        }
    }

    pub fn alias(&self) -> &HostdevAlias {
        match self {
            Action::Detach { alias, .. } | Action::Attach { alias, .. } => alias,
        }
    }
}

/// Where one present device is and where the rules want it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub device: UsbDevice,
    /// The first matching rule.
    pub rule: Option<String>,
    /// The VM the rules want it in now: the rule's first running VM.
    pub wanted_vm: Option<String>,
    /// Every hostdev that points at it.
    pub holders: Vec<Holder>,
    /// Running VMs of its rule, before `wanted_vm`, that it could not go to, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed_over: Vec<PassedOver>,
}

/// A running VM of a rule that a device skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedOver {
    pub vm: String,
    pub reason: PassReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PassReason {
    /// Its last attach failed: every USB port of the VM is taken.
    NoFreePort,
}

impl PassReason {
    /// For people: the status line says "win11 passed over: no free usb port".
    pub fn describe(self) -> &'static str {
        match self {
            PassReason::NoFreePort => "no free usb port",
        }
    }
}

/// What the daemon knows beyond the rules, the devices and the live XML, learned from
/// what happened before: VMs that cannot take one more device now, and devices that
/// follow an earlier one through re-enumeration. As plain data it keeps `plan` pure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopFacts {
    /// VMs whose last attach failed for want of a free USB port. A device already in
    /// one stays; another goes to its rule's next running VM. Forgotten when something
    /// in that VM changes.
    pub no_free_port: BTreeSet<String>,
    /// Devices no rule matches that appeared on a port within the `follow` window of a
    /// rule whose device left a VM from there: each goes to that VM, for as long as it
    /// stays plugged.
    pub followed: BTreeMap<BusAddress, Followed>,
    /// Where `usbpass switch` sent each group: its devices go there instead of where
    /// their rules say, until the group is handed back to its rules.
    pub group_targets: BTreeMap<String, GroupTarget>,
}

/// Where a switched group's devices go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupTarget {
    Vm(String),
    Host,
}

impl fmt::Display for GroupTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupTarget::Vm(vm) => f.write_str(vm),
            GroupTarget::Host => f.write_str("host"),
        }
    }
}

/// The rule and VM a device follows its predecessor on the same port into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub rule: String,
    pub vm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub domain: String,
    pub alias: Option<String>,
    pub ownership: Ownership,
}

/// The result of one comparison.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Detaches first, then attaches, so a device moving between VMs is free before
    /// it is claimed.
    pub actions: Vec<Action>,
    pub placements: Vec<Placement>,
}

/// The address and ID a hostdev points at: the live XML's `<address>` first (libvirt
/// fills it in on attach), then the numbers in our own alias.
pub fn hostdev_target(hostdev: &UsbHostdev) -> (Option<BusAddress>, Option<UsbId>) {
    let from_alias = hostdev.owned_alias().and_then(|alias| alias.target());
    let address = hostdev.address.or(from_alias.map(|(address, _)| address));
    let id = hostdev.id.or(from_alias.map(|(_, id)| id));
    (address, id)
}

/// Which present devices a hostdev points at. With an address, at most one; a foreign
/// hostdev named only by vendor/product holds every device with that ID, to be safe.
fn resolve_hostdev<'a>(
    hostdev: &UsbHostdev,
    by_address: &HashMap<BusAddress, &'a UsbDevice>,
    devices: &'a [UsbDevice],
) -> Vec<&'a UsbDevice> {
    match hostdev_target(hostdev) {
        (Some(address), id) => by_address
            .get(&address)
            .filter(|device| id.is_none_or(|id| id == device.id()))
            .map(|device| vec![*device])
            .unwrap_or_default(),
        (None, Some(id)) => devices.iter().filter(|d| d.id() == id).collect(),
        (None, None) => Vec::new(),
    }
}

/// Compare and decide, with every running VM able to take a device. See the module doc.
pub fn plan(config: &Config, devices: &[UsbDevice], domains: &[DomainView]) -> Plan {
    plan_with(config, devices, domains, &LoopFacts::default())
}

/// Compare and decide with what the loop learned (`facts`): VMs without a free port are
/// passed over for devices not yet in them, and followed devices go where their
/// predecessor was.
pub fn plan_with(
    config: &Config,
    devices: &[UsbDevice],
    domains: &[DomainView],
    facts: &LoopFacts,
) -> Plan {
    let by_address: HashMap<BusAddress, &UsbDevice> =
        devices.iter().map(|d| (d.address(), d)).collect();
    let running: HashSet<&str> = domains.iter().map(|d| d.name.as_str()).collect();

    // Where each device sits now through a hostdev the rules made.
    let mut held_in: HashMap<BusAddress, HashSet<&str>> = HashMap::new();
    for domain in domains {
        for hostdev in &domain.hostdevs {
            if hostdev.ownership() != Ownership::Rules {
                continue;
            }
            for device in resolve_hostdev(hostdev, &by_address, devices) {
                held_in
                    .entry(device.address())
                    .or_default()
                    .insert(domain.name.as_str());
            }
        }
    }

    // What the rules want, per present device; and the devices the rules cannot
    // decide yet (strings still being read), which stay exactly as they are.
    let mut wanted: HashMap<BusAddress, (&str, Option<&str>)> = HashMap::new();
    let mut passed_over: HashMap<BusAddress, Vec<PassedOver>> = HashMap::new();
    let mut undecided: HashSet<BusAddress> = HashSet::new();
    let mut sent_to_host: HashSet<BusAddress> = HashSet::new();
    for device in devices {
        match config.decide(device) {
            RuleChoice::Rule(rule)
                if rule
                    .group
                    .as_ref()
                    .is_some_and(|group| facts.group_targets.contains_key(group)) =>
            {
                // Switched: the group's target, if it runs; the host otherwise.
                let target = rule
                    .group
                    .as_ref()
                    .and_then(|group| facts.group_targets.get(group));
                let vm = match target {
                    Some(GroupTarget::Vm(vm)) if running.contains(vm.as_str()) => Some(vm.as_str()),
                    _ => None,
                };
                if vm.is_none() {
                    sent_to_host.insert(device.address());
                }
                wanted.insert(device.address(), (rule.name.as_str(), vm));
            }
            RuleChoice::Rule(rule) => {
                let now_in = held_in.get(&device.address());
                let is_in = |vm: &str| now_in.is_some_and(|vms| vms.contains(vm));
                // when-free: a VM of the list that holds it keeps it.
                let kept = (rule.give_back == GiveBack::WhenFree)
                    .then(|| rule.vms.iter().map(String::as_str).find(|vm| is_in(vm)))
                    .flatten();
                let mut skipped = Vec::new();
                let vm = kept.or_else(|| {
                    rule.vms.iter().map(String::as_str).find(|vm| {
                        if !running.contains(vm) {
                            return false;
                        }
                        if !is_in(vm) && facts.no_free_port.contains(*vm) {
                            skipped.push(PassedOver {
                                vm: vm.to_string(),
                                reason: PassReason::NoFreePort,
                            });
                            return false;
                        }
                        true
                    })
                });
                wanted.insert(device.address(), (rule.name.as_str(), vm));
                if !skipped.is_empty() {
                    passed_over.insert(device.address(), skipped);
                }
            }
            // A device no rule claims, which appeared where a followed rule's device
            // left a VM: it goes to that VM, if it runs.
            RuleChoice::NoRule => {
                if let Some(followed) = facts.followed.get(&device.address()) {
                    let vm = running
                        .contains(followed.vm.as_str())
                        .then_some(followed.vm.as_str());
                    wanted.insert(device.address(), (followed.rule.as_str(), vm));
                }
            }
            RuleChoice::Undecided => {
                undecided.insert(device.address());
            }
        }
    }

    let mut holders: HashMap<BusAddress, Vec<Holder>> = HashMap::new();
    let mut detaches = Vec::new();
    // Owned hostdevs that already sit where the rules want them, per device.
    let mut settled: HashSet<BusAddress> = HashSet::new();

    for domain in domains {
        for hostdev in &domain.hostdevs {
            let ownership = hostdev.ownership();
            let targets = resolve_hostdev(hostdev, &by_address, devices);
            for device in &targets {
                holders.entry(device.address()).or_default().push(Holder {
                    domain: domain.name.clone(),
                    alias: hostdev.alias.clone(),
                    ownership,
                });
            }
            if ownership == Ownership::Foreign {
                continue;
            }
            let Some(alias) = hostdev.owned_alias() else {
                continue;
            };
            let (address, id) = hostdev_target(hostdev);
            let detach = |reason| Action::Detach {
                domain: domain.name.clone(),
                alias: alias.clone(),
                id,
                address,
                reason,
            };
            let Some(device) = targets.first() else {
                detaches.push(detach(DetachReason::DeviceGone));
                continue;
            };
            if ownership == Ownership::Rules
                && alias
                    .target()
                    .is_some_and(|(named, _)| hostdev.address.is_some_and(|held| held != named))
            {
                // Its alias names another plug than the one it holds (usbpass never writes
                // such a hostdev): it would block that plug's attach under the same alias.
                // It goes, and the plug it holds is attached again under its own alias.
                detaches.push(detach(DetachReason::Duplicate));
                continue;
            }
            if ownership == Ownership::Manual || undecided.contains(&device.address()) {
                // Hand-placed: stays until its device goes away. Undecided: stays until
                // the rules can say.
                continue;
            }
            match wanted.get(&device.address()) {
                None => detaches.push(detach(DetachReason::NoRule)),
                Some((_, Some(vm))) if *vm == domain.name => {
                    if !settled.insert(device.address()) {
                        detaches.push(detach(DetachReason::Duplicate));
                    }
                }
                Some((_, Some(vm))) => detaches.push(detach(DetachReason::Moving(vm.to_string()))),
                Some((_, None)) if sent_to_host.contains(&device.address()) => {
                    detaches.push(detach(DetachReason::SentToHost))
                }
                // The rule names no running VM that can take it (this one is not in its
                // list, and those that are run out of ports).
                Some((_, None)) => detaches.push(detach(DetachReason::NoRule)),
            }
        }
    }

    let detached: HashSet<(&str, &str)> = detaches
        .iter()
        .map(|action| (action.domain(), action.alias().as_str()))
        .collect();

    let mut attaches = Vec::new();
    let mut placements = Vec::with_capacity(devices.len());
    for device in devices {
        let address = device.address();
        let device_holders = holders.remove(&address).unwrap_or_default();
        let (rule, wanted_vm) = match wanted.get(&address) {
            Some((rule, vm)) => (Some(rule.to_string()), vm.map(str::to_string)),
            None => (None, None),
        };
        if let (Some(rule), Some(vm)) = (&rule, &wanted_vm) {
            // Held by someone we must not disturb, or already where it belongs.
            let blocked = device_holders
                .iter()
                .any(|holder| holder.ownership != Ownership::Rules);
            let remaining_owned = device_holders.iter().any(|holder| {
                holder.ownership == Ownership::Rules
                    && holder.domain == *vm
                    && !holder
                        .alias
                        .as_deref()
                        .is_some_and(|alias| detached.contains(&(holder.domain.as_str(), alias)))
            });
            if !blocked && !remaining_owned {
                attaches.push(Action::Attach {
                    domain: vm.clone(),
                    device: Box::new(device.clone()),
                    alias: HostdevAlias::for_rules(device),
                    rule: rule.clone(),
                });
            }
        }
        placements.push(Placement {
            device: device.clone(),
            rule,
            wanted_vm,
            holders: device_holders,
            passed_over: passed_over.remove(&address).unwrap_or_default(),
        });
    }

    detaches.extend(attaches);
    Plan {
        actions: detaches,
        placements,
    }
}

/// The actions alone.
pub fn reconcile(config: &Config, devices: &[UsbDevice], domains: &[DomainView]) -> Vec<Action> {
    plan(config, devices, domains).actions
}

pub mod host_access;

#[cfg(test)]
mod tests;
