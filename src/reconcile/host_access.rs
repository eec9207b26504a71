//! `keep_off_host`: who may use each present device's interfaces, the host's drivers or
//! a VM, decided from the rules and a plan. Pure, like the rest of `reconcile`: the
//! daemon carries the decision out through `host::interfaces`.
//!
//! The kernel's interface authorization does the work. While any rule keeps devices off
//! the host, every root hub's `interface_authorized_default` is 0, so the interfaces of
//! every new device are born unauthorized and no host driver can bind them (the check
//! is in `usb_probe_interface`). Then, per device:
//! - `Host`: authorized and probed, as the kernel would have done at plug (a device no
//!   such rule names, every hub, a group sent to the host).
//! - `Vm`: authorized but not probed, so QEMU's usbfs claim is allowed
//!   (`usb_driver_claim_interface` refuses an unauthorized interface) and no host
//!   driver binds (authorizing does not probe): while an attach is planned or the
//!   device is in a VM.
//! - `Off`: unauthorized (the kernel unbinds whatever is bound): a kept-off device that
//!   waits for its VM, and one about to be detached, so that QEMU's reattach of kernel
//!   drivers when it lets go (`USBDEVFS_CONNECT`) finds nothing it may bind.

use super::{Action, DetachReason, GroupTarget, LoopFacts, Plan};
pub use crate::model::access::HostAccess;
use crate::model::{BusAddress, UsbDevice};
use crate::rules::{Config, RuleChoice};
use std::collections::{BTreeMap, BTreeSet};

/// What the host's interface authorization should be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostAccessPlan {
    /// Root hubs' `interface_authorized_default` is 0: some rule keeps devices off.
    pub hubs_default_off: bool,
    /// Per present device. A device missing here is left as it is (its rule cannot be
    /// told yet, or what the VMs hold is not known).
    pub devices: BTreeMap<BusAddress, HostAccess>,
}

/// Decides each device's access. `plan` is the round's plan (its placements and every
/// action it wants, due or not), or `None` when the VMs' side is not known (libvirt
/// unreachable, live XML being read): then only devices whose access does not depend on
/// the VMs are decided, and the kept-off devices in `released`, which a VM that stopped
/// held (its QEMU has let them go, so no VM holds them): off at once, without waiting
/// for the listing that will tell where they go next.
pub fn host_access(
    config: &Config,
    devices: &[UsbDevice],
    facts: &LoopFacts,
    plan: Option<&Plan>,
    released: &BTreeSet<BusAddress>,
) -> HostAccessPlan {
    let hubs_default_off = config.keeps_any_off_host();
    let mut access = BTreeMap::new();
    if !hubs_default_off {
        // Nothing is kept off: every device is the host's, as without the setting.
        for device in devices {
            access.insert(device.address(), HostAccess::Host);
        }
        return HostAccessPlan {
            hubs_default_off,
            devices: access,
        };
    }
    let mut held = BTreeSet::new();
    let mut attaching = BTreeSet::new();
    let mut detaching = BTreeSet::new();
    if let Some(plan) = plan {
        for placement in &plan.placements {
            if !placement.holders.is_empty() {
                held.insert(placement.device.address());
            }
        }
        for action in &plan.actions {
            match action {
                Action::Attach { device, .. } => {
                    attaching.insert(device.address());
                }
                // A duplicate goes while its twin stays: the device remains in use.
                Action::Detach {
                    reason: DetachReason::Duplicate,
                    ..
                } => {}
                Action::Detach {
                    address: Some(address),
                    ..
                } => {
                    detaching.insert(*address);
                }
                Action::Detach { address: None, .. } => {}
            }
        }
    }
    // A followed device goes where its predecessor's rule sends it.
    let followed_rule = |device: &UsbDevice| {
        facts
            .followed
            .get(&device.address())
            .and_then(|followed| config.rules.iter().find(|rule| rule.name == followed.rule))
    };
    for device in devices {
        let address = device.address();
        let rule = match config.decide(device) {
            RuleChoice::Rule(rule) => Some(rule),
            RuleChoice::NoRule => followed_rule(device),
            // A rule that keeps it off may yet match: its interfaces stay as they were
            // born (unauthorized) until the strings are read.
            RuleChoice::Undecided => continue,
        };
        let sent_to_host = rule
            .and_then(|rule| rule.group.as_ref())
            .and_then(|group| facts.group_targets.get(group))
            .is_some_and(|target| *target == GroupTarget::Host);
        let kept_off = rule.is_some_and(|rule| config.keeps_off_host(rule)) && !sent_to_host;
        if !kept_off {
            access.insert(address, HostAccess::Host);
            continue;
        }
        if plan.is_none() {
            if released.contains(&address) {
                access.insert(address, HostAccess::Off);
            }
            continue;
        }
        let decided = if detaching.contains(&address) {
            HostAccess::Off
        } else if attaching.contains(&address) || held.contains(&address) {
            HostAccess::Vm
        } else {
            HostAccess::Off
        };
        access.insert(address, decided);
    }
    HostAccessPlan {
        hubs_default_off,
        devices: access,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{DomainView, UsbHostdev};
    use crate::model::alias::HostdevAlias;
    use crate::reconcile::plan_with;
    use crate::rules::Config;
    use crate::testing::devices::device;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).unwrap()
    }

    const RULES: &str =
        "[[rule]]\nname = \"stick\"\nid = \"46f4:0001\"\nvm = \"lab\"\nkeep_off_host = true\n\
                         [[rule]]\nname = \"kbd\"\nid = \"0627:0001\"\nvm = \"lab\"\n";

    fn stick() -> UsbDevice {
        device(2, 3, 0x46f4, 0x0001, "2-1")
    }

    fn decide(config: &Config, devices: &[UsbDevice], domains: &[DomainView]) -> HostAccessPlan {
        let facts = LoopFacts::default();
        let plan = plan_with(config, devices, domains, &facts);
        host_access(config, devices, &facts, Some(&plan), &BTreeSet::new())
    }

    fn running(name: &str, hostdevs: Vec<UsbHostdev>) -> DomainView {
        DomainView {
            name: name.to_string(),
            hostdevs,
        }
    }

    fn held(device: &UsbDevice) -> UsbHostdev {
        UsbHostdev {
            alias: Some(HostdevAlias::for_rules(device).as_str().to_string()),
            address: Some(device.address()),
            id: Some(device.id()),
        }
    }

    #[test]
    fn a_kept_off_device_is_off_while_its_vm_is_off_and_authorized_for_the_attach() {
        let config = config(RULES);
        let stick = stick();
        let keyboard = device(1, 2, 0x0627, 0x0001, "1-1");
        let stray = device(1, 4, 0x1234, 0x5678, "1-2");
        let devices = [stick.clone(), keyboard.clone(), stray.clone()];

        let off = decide(&config, &devices, &[]);
        assert!(off.hubs_default_off);
        assert_eq!(off.devices[&stick.address()], HostAccess::Off);
        // A rule that does not keep it off, and no rule at all: the host's, as today.
        assert_eq!(off.devices[&keyboard.address()], HostAccess::Host);
        assert_eq!(off.devices[&stray.address()], HostAccess::Host);

        // The VM runs: the attach is planned, so QEMU may claim.
        let starting = decide(&config, &devices, &[running("lab", vec![])]);
        assert_eq!(starting.devices[&stick.address()], HostAccess::Vm);
        // In the VM: stays authorized.
        let inside = decide(&config, &devices, &[running("lab", vec![held(&stick)])]);
        assert_eq!(inside.devices[&stick.address()], HostAccess::Vm);
    }

    #[test]
    fn a_kept_off_device_is_off_before_it_is_detached() {
        // The rule now sends it elsewhere: detach from lab first, deauthorized.
        let config = config(
            "[[rule]]\nname = \"stick\"\nid = \"46f4:0001\"\nvm = \"other\"\nkeep_off_host = true\n",
        );
        let stick = stick();
        let domains = [running("lab", vec![held(&stick)]), running("other", vec![])];
        let facts = LoopFacts::default();
        let plan = plan_with(&config, std::slice::from_ref(&stick), &domains, &facts);
        assert!(plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Detach { .. })));
        let access = host_access(
            &config,
            std::slice::from_ref(&stick),
            &facts,
            Some(&plan),
            &BTreeSet::new(),
        );
        assert_eq!(access.devices[&stick.address()], HostAccess::Off);
    }

    #[test]
    fn unknown_vms_leave_kept_off_devices_alone() {
        let config = config(RULES);
        let stick = stick();
        let stray = device(1, 4, 0x1234, 0x5678, "1-2");
        let access = host_access(
            &config,
            &[stick.clone(), stray.clone()],
            &LoopFacts::default(),
            None,
            &BTreeSet::new(),
        );
        assert!(!access.devices.contains_key(&stick.address()));
        assert_eq!(access.devices[&stray.address()], HostAccess::Host);
        // Its vm stopped: off at once, before the vms are read again.
        let released = BTreeSet::from([stick.address(), stray.address()]);
        let access = host_access(
            &config,
            &[stick.clone(), stray.clone()],
            &LoopFacts::default(),
            None,
            &released,
        );
        assert_eq!(access.devices[&stick.address()], HostAccess::Off);
        assert_eq!(access.devices[&stray.address()], HostAccess::Host);
    }

    #[test]
    fn without_the_setting_everything_is_the_hosts() {
        let config = config("[[rule]]\nname = \"stick\"\nid = \"46f4:0001\"\nvm = \"lab\"\n");
        let stick = stick();
        let access = decide(&config, std::slice::from_ref(&stick), &[]);
        assert!(!access.hubs_default_off);
        assert_eq!(access.devices[&stick.address()], HostAccess::Host);
    }

    #[test]
    fn hubs_and_undecided_devices() {
        let config = config(
            "keep_off_host = true\n[[rule]]\nname = \"a\"\nid = \"0403:6001\"\nserial = \"A\"\nvm = \"lab\"\n",
        );
        let mut hub = device(1, 2, 0x05e3, 0x0610, "1-1");
        hub.device_class = crate::model::HUB_CLASS;
        let mut pending = device(1, 3, 0x0403, 0x6001, "1-2");
        pending.strings_pending = true;
        let access = decide(&config, &[hub.clone(), pending.clone()], &[]);
        assert_eq!(access.devices[&hub.address()], HostAccess::Host);
        assert!(!access.devices.contains_key(&pending.address()));
    }

    #[test]
    fn a_group_sent_to_the_host_is_the_hosts() {
        let config = config(
            "[[rule]]\nname = \"stick\"\nid = \"46f4:0001\"\nvm = \"lab\"\ngroup = \"desk\"\nkeep_off_host = true\n",
        );
        let stick = stick();
        let facts = LoopFacts {
            group_targets: [("desk".to_string(), GroupTarget::Host)].into(),
            ..LoopFacts::default()
        };
        let plan = plan_with(&config, std::slice::from_ref(&stick), &[], &facts);
        let access = host_access(
            &config,
            std::slice::from_ref(&stick),
            &facts,
            Some(&plan),
            &BTreeSet::new(),
        );
        assert_eq!(access.devices[&stick.address()], HostAccess::Host);
    }
}
