//! Properties of `reconcile::plan` over random worlds: rules with every matcher and
//! ordered VM lists, present devices (hubs, devices whose strings are still being read),
//! and running VMs holding owned, hand-placed, stale, odd-shaped, duplicate and foreign
//! hostdevs.

use proptest::prelude::*;
use proptest::sample::{subsequence, Index};
use std::collections::{HashMap, HashSet};
use usbpass::hypervisor::{DomainView, UsbHostdev};
use usbpass::model::alias::{HostdevAlias, Ownership};
use usbpass::model::{InterfaceClass, UsbDevice, HUB_CLASS};
use usbpass::reconcile::{plan, Action, DetachReason, Plan};
use usbpass::rules::{ClassPattern, Config, GiveBack, Matcher, ReconnectMode, Rule, RuleChoice};
use usbpass::testing::devices::device;

// Small pools, so that rules, devices and hostdevs collide often.
const VMS: &[&str] = &["a", "b", "c", "d"];
const IDS: &[(u16, u16)] = &[(0x046d, 0xc52b), (0x0403, 0x6001), (0x0627, 0x0001)];
const SERIALS: &[&str] = &["A", "B"];
/// Port paths below the bus number: root ports, and ports behind hubs `2` and `2.3`.
const PORTS: &[&str] = &["1", "2", "2.1", "2.3", "2.3.1", "4"];
const HUBS: &[&str] = &["usb1", "usb2", "1-2", "1-2.3", "2-2"];
const CLASSES: &[u8] = &[0x03, 0x08, 0xff];

fn pick<T: Clone + std::fmt::Debug + 'static>(pool: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(pool)
}

/// A device on bus 1 or 2 with a small device number (so that stale and fresh plugs
/// share numbers), sometimes a hub, sometimes with its strings not read yet.
fn usb_device() -> impl Strategy<Value = UsbDevice> {
    (
        (1u16..=2, 1u16..=6, pick(IDS), pick(PORTS)),
        (
            proptest::option::of(pick(SERIALS)),
            prop_oneof![4 => Just(0u8), 1 => Just(HUB_CLASS), 1 => pick(CLASSES)],
            proptest::collection::vec((pick(CLASSES), 0u8..2, 0u8..2), 0..3),
            proptest::bool::weighted(0.15),
        ),
    )
        .prop_map(
            |((bus, devnum, (vendor, product), port), (serial, class, interfaces, pending))| {
                let mut device = device(bus, devnum, vendor, product, &format!("{bus}-{port}"));
                // A device whose strings are pending has none yet.
                device.serial = if pending {
                    None
                } else {
                    serial.map(str::to_string)
                };
                device.strings_pending = pending;
                device.device_class = class;
                device.interface_classes = interfaces
                    .into_iter()
                    .map(|(class, subclass, protocol)| InterfaceClass {
                        class,
                        subclass,
                        protocol,
                    })
                    .collect();
                device
            },
        )
}

fn matcher() -> impl Strategy<Value = Matcher> {
    use proptest::option::weighted as maybe;
    (
        maybe(0.4, pick(IDS)),
        any::<bool>(),
        maybe(0.3, pick(SERIALS)),
        maybe(0.2, (1u16..=2, pick(PORTS))),
        maybe(0.2, pick(HUBS)),
        maybe(
            0.2,
            (
                proptest::option::of(pick(CLASSES)),
                proptest::option::of(0u8..2),
                proptest::option::of(0u8..2),
            ),
        ),
    )
        .prop_map(|(id, vendor_only, serial, port, hub, class)| Matcher {
            vendor_id: id.map(|(vendor, _)| vendor),
            product_id: id.filter(|_| !vendor_only).map(|(_, product)| product),
            serial: serial.map(str::to_string),
            port: port.map(|(bus, port)| format!("{bus}-{port}")),
            hub: hub.map(str::to_string),
            class: class.map(|(class, subclass, protocol)| ClassPattern {
                class,
                subclass,
                protocol,
            }),
        })
}

/// Rules as the parser would accept them: unique names, a non-empty list of distinct
/// VMs (in any order, some of which may not run).
fn rules() -> impl Strategy<Value = Config> {
    proptest::collection::vec((matcher(), subsequence(VMS, 1..=3).prop_shuffle()), 0..5).prop_map(
        |rules| {
            Config::from_rules(
                rules
                    .into_iter()
                    .enumerate()
                    .map(|(index, (matcher, vms))| Rule {
                        name: format!("rule{index}"),
                        matcher,
                        vms: vms.into_iter().map(str::to_string).collect(),
                        reconnect: ReconnectMode::Id,
                        give_back: GiveBack::AtOnce,
                        follow_seconds: None,
                        keep_off_host: None,
                        group: None,
                        line: index + 1,
                    })
                    .collect(),
            )
        },
    )
}

/// A hostdev in a VM, pointing (or not) at one of the world's devices, present or not.
#[derive(Debug, Clone)]
enum HostdevShape {
    /// What the daemon (`manual == false`) or `usbpass attach` made for that device,
    /// with or without the `<address>` and IDs libvirt normally shows.
    Owned {
        manual: bool,
        target: Index,
        address: bool,
        id: bool,
        /// The `<address>` and IDs of another device than the alias names: a second
        /// hostdev for one device in the same VM, or a stale alias number.
        other_source: Option<Index>,
    },
    /// Any alias as a string: `HostdevAlias::parse` decides whose it is.
    Named {
        alias: Option<String>,
        target: Option<Index>,
        address: bool,
        id: bool,
    },
}

fn alias_string() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some("hostdev0".to_string())),
        1 => "ua-[a-z]{1,6}-[0-9]".prop_map(Some),
        // Owned by the prefix, but of no shape usbpass writes (no target inside): with
        // an address, a second owned hostdev for a device in the same VM.
        3 => "ua-usbpass-[A-Za-z0-9_-]{1,8}".prop_map(Some),
        // Mostly foreign: characters libvirt refuses after `ua-`.
        1 => "ua-usbpass-[ -~]{0,8}".prop_map(Some),
        1 => ".{0,16}".prop_map(Some),
    ]
}

fn hostdev_shape() -> impl Strategy<Value = HostdevShape> {
    prop_oneof![
        3 => (
            any::<bool>(),
            any::<Index>(),
            proptest::bool::weighted(0.8),
            any::<bool>(),
            proptest::option::weighted(0.2, any::<Index>())
        )
            .prop_map(|(manual, target, address, id, other_source)| HostdevShape::Owned {
                manual,
                target,
                address,
                id,
                other_source
            }),
        2 => (
            alias_string(),
            proptest::option::weighted(0.8, any::<Index>()),
            proptest::bool::weighted(0.7),
            any::<bool>()
        )
            .prop_map(|(alias, target, address, id)| HostdevShape::Named {
                alias,
                target,
                address,
                id
            }),
    ]
}

#[derive(Debug, Clone)]
struct World {
    config: Config,
    devices: Vec<UsbDevice>,
    domains: Vec<DomainView>,
}

fn world() -> impl Strategy<Value = World> {
    (
        rules(),
        // Each device is plugged in or gone (stale hostdevs may still point at it).
        proptest::collection::vec((usb_device(), proptest::bool::weighted(0.7)), 1..8),
        subsequence(VMS, 0..=VMS.len()),
        proptest::collection::vec(proptest::collection::vec(hostdev_shape(), 0..4), 4),
    )
        .prop_map(|(config, pool, running, shapes)| {
            let mut devices: Vec<UsbDevice> = Vec::new();
            let (mut addresses, mut ports) = (HashSet::new(), HashSet::new());
            for (device, present) in &pool {
                // One plug per bus address and per port, as on a real host. A device
                // that is gone may share either with a present one (a replug).
                if *present
                    && !addresses.contains(&device.address())
                    && ports.insert(device.port_path.clone())
                {
                    addresses.insert(device.address());
                    devices.push(device.clone());
                }
            }
            let all: Vec<&UsbDevice> = pool.iter().map(|(device, _)| device).collect();
            let domains = running
                .iter()
                .zip(shapes)
                .map(|(name, shapes)| {
                    let mut hostdevs: Vec<UsbHostdev> = shapes
                        .into_iter()
                        .map(|shape| hostdev(shape, &all))
                        .collect();
                    // libvirt refuses a second device with an alias already in use in
                    // the domain; the same alias in two domains is allowed.
                    let mut aliases = HashSet::new();
                    hostdevs.retain(|h| h.alias.as_ref().is_none_or(|a| aliases.insert(a.clone())));
                    DomainView {
                        name: name.to_string(),
                        hostdevs,
                    }
                })
                .collect();
            World {
                config,
                devices,
                domains,
            }
        })
}

fn hostdev(shape: HostdevShape, pool: &[&UsbDevice]) -> UsbHostdev {
    match shape {
        HostdevShape::Owned {
            manual,
            target,
            address,
            id,
            other_source,
        } => {
            let named = target.get(pool);
            let alias = if manual {
                HostdevAlias::for_manual(named)
            } else {
                HostdevAlias::for_rules(named)
            };
            let device = other_source.map_or(named, |source| source.get(pool));
            UsbHostdev {
                alias: Some(alias.to_string()),
                id: id.then(|| device.id()),
                address: address.then(|| device.address()),
            }
        }
        HostdevShape::Named {
            alias,
            target,
            address,
            id,
        } => {
            let device = target.map(|target| *target.get(pool));
            UsbHostdev {
                alias,
                id: device.filter(|_| id).map(UsbDevice::id),
                address: device.filter(|_| address).map(UsbDevice::address),
            }
        }
    }
}

/// Carries out `actions` as libvirt would, checking each is one libvirt accepts: a
/// detach names an alias usbpass owns that is in that VM, an attach an alias not
/// already in it.
fn apply(domains: &mut [DomainView], actions: &[Action]) -> Result<(), TestCaseError> {
    for action in actions {
        let domain = domains
            .iter_mut()
            .find(|d| d.name == action.domain())
            .ok_or_else(|| TestCaseError::fail(format!("{action:?} names no running vm")))?;
        match action {
            Action::Detach { alias, .. } => {
                prop_assert!(HostdevAlias::parse(alias.as_str()).is_ok());
                let before = domain.hostdevs.len();
                domain
                    .hostdevs
                    .retain(|h| h.alias.as_deref() != Some(alias.as_str()));
                prop_assert_eq!(before, domain.hostdevs.len() + 1, "detach of {}", alias);
            }
            Action::Attach { device, alias, .. } => {
                prop_assert!(
                    !domain
                        .hostdevs
                        .iter()
                        .any(|h| h.alias.as_deref() == Some(alias.as_str())),
                    "attach of {} into {} where that alias is in use",
                    alias,
                    domain.name
                );
                // libvirt fills in the source address and keeps the IDs it was given.
                domain.hostdevs.push(UsbHostdev {
                    alias: Some(alias.to_string()),
                    id: Some(device.id()),
                    address: Some(device.address()),
                });
            }
        }
    }
    Ok(())
}

/// Every hostdev whose alias usbpass does not own, per VM, in order.
fn foreign_hostdevs(domains: &[DomainView]) -> Vec<(String, Vec<UsbHostdev>)> {
    domains
        .iter()
        .map(|domain| {
            let foreign = domain
                .hostdevs
                .iter()
                .filter(|h| h.ownership() == Ownership::Foreign)
                .cloned()
                .collect();
            (domain.name.clone(), foreign)
        })
        .collect()
}

/// The checks on one plan that need no second round.
fn check_actions(world: &World, first: &Plan) -> Result<(), TestCaseError> {
    let actions = &first.actions;
    let present: HashMap<_, _> = world.devices.iter().map(|d| (d.address(), d)).collect();
    let mut attached = HashSet::new();
    let mut seen_attach = false;
    for action in actions {
        match action {
            Action::Detach { alias, reason, .. } => {
                // Detaches come first.
                prop_assert!(!seen_attach, "detach after an attach: {:?}", actions);
                // A hand-placed hostdev leaves only with its device.
                if alias.ownership() == Ownership::Manual {
                    prop_assert_eq!(reason, &DetachReason::DeviceGone);
                }
            }
            Action::Attach {
                device,
                alias,
                domain,
                rule,
            } => {
                seen_attach = true;
                prop_assert_eq!(present.get(&device.address()), Some(&device.as_ref()));
                prop_assert!(!device.is_hub(), "hub attached: {:?}", device);
                prop_assert!(attached.insert(device.address()), "attached twice");
                // Never next to a hostdev usbpass does not own or that was placed by
                // hand: a device any such hostdev points at is theirs.
                let placement = first
                    .placements
                    .iter()
                    .find(|p| p.device.address() == device.address())
                    .expect("a placement per present device");
                prop_assert!(
                    placement
                        .holders
                        .iter()
                        .all(|h| h.ownership == Ownership::Rules),
                    "attach of a device held by {:?}",
                    placement.holders
                );
                prop_assert_eq!(alias, &HostdevAlias::for_rules(device));
                // To the rule's first running VM, and only by the rule that decides.
                let RuleChoice::Rule(chosen) = world.config.decide(device) else {
                    return Err(TestCaseError::fail("attach without a deciding rule"));
                };
                prop_assert_eq!(&chosen.name, rule);
                let first_running = chosen
                    .vms
                    .iter()
                    .find(|vm| world.domains.iter().any(|d| &&d.name == vm));
                prop_assert_eq!(first_running, Some(domain));
            }
        }
    }
    Ok(())
}

/// The VMs whose daemon-made hostdevs point at `device` by bus address (the live XML's
/// `<address>`, else the one in the alias) with a matching or unknown ID.
fn rules_hostdevs_at<'a>(domains: &'a [DomainView], device: &UsbDevice) -> Vec<&'a str> {
    let mut found = Vec::new();
    for domain in domains {
        for hostdev in &domain.hostdevs {
            let Some(alias) = hostdev.owned_alias() else {
                continue;
            };
            if alias.ownership() != Ownership::Rules {
                continue;
            }
            let target = alias.target();
            let address = hostdev.address.or(target.map(|(address, _)| address));
            let id = hostdev.id.or(target.map(|(_, id)| id));
            if address == Some(device.address()) && id.is_none_or(|id| id == device.id()) {
                found.push(domain.name.as_str());
            }
        }
    }
    found
}

proptest! {
    #![proptest_config(crate::config(2048))]

    /// Applying a plan and planning again gives nothing to do; no plan ever removes or
    /// changes a hostdev usbpass does not own; each action is one libvirt would accept.
    #[test]
    fn plan_converges_and_spares_foreign_hostdevs(world in world()) {
        let first = plan(&world.config, &world.devices, &world.domains);
        check_actions(&world, &first)?;
        let mut domains = world.domains.clone();
        apply(&mut domains, &first.actions)?;
        prop_assert_eq!(foreign_hostdevs(&domains), foreign_hostdevs(&world.domains));

        let second = plan(&world.config, &world.devices, &domains);
        prop_assert!(
            second.actions.is_empty(),
            "not converged after {:?}: {:?}",
            first.actions,
            second.actions
        );

        // And the converged world is what the rules say: a decided device a rule
        // wants in a running VM, that no foreign or hand-placed hostdev holds, is in that
        // VM; the daemon's hostdevs that name a device by its address hold it once at
        // most, and only in the VM the rules want it in.
        for placement in &second.placements {
            let device = &placement.device;
            if world.config.decide(device) == RuleChoice::Undecided {
                continue;
            }
            let blocked = placement.holders.iter().any(|h| h.ownership != Ownership::Rules);
            let owned_in: Vec<&str> = placement
                .holders
                .iter()
                .filter(|h| h.ownership == Ownership::Rules)
                .map(|h| h.domain.as_str())
                .collect();
            if let (Some(vm), false) = (&placement.wanted_vm, blocked) {
                prop_assert!(
                    owned_in.contains(&vm.as_str()),
                    "{} wanted in {} but held by {:?}",
                    device.address(),
                    vm,
                    placement.holders
                );
            }
            let exact = rules_hostdevs_at(&domains, device);
            prop_assert!(exact.len() <= 1, "{} held twice: {:?}", device.address(), exact);
            if let Some(vm) = exact.first() {
                prop_assert_eq!(Some(*vm), placement.wanted_vm.as_deref());
            }
        }
    }
}

/// Found by the property above (shrunk): a daemon-shaped alias naming plug 1:3 on a
/// hostdev whose live `<address>` is plug 1:1. The plan used to keep it (it holds 1:1
/// where the rules want 1:1) and attach 1:3 under that same alias, which libvirt refuses
/// as a duplicate alias, on every round. Now the misnamed hostdev goes and both plugs are
/// attached under their own aliases.
#[test]
fn a_hostdev_whose_alias_names_another_plug_does_not_block_that_plug() {
    let rule = |name: &str, serial: Option<&str>| Rule {
        name: name.to_string(),
        matcher: Matcher {
            serial: serial.map(str::to_string),
            ..Matcher::default()
        },
        vms: vec!["d".to_string()],
        reconnect: ReconnectMode::Id,
        give_back: GiveBack::AtOnce,
        follow_seconds: None,
        keep_off_host: None,
        group: None,
        line: 1,
    };
    // A device whose strings are pending is undecided under the first rule.
    let config = Config::from_rules(vec![rule("stick", Some("A")), rule("all", None)]);
    for pending in [false, true] {
        let named = device(1, 3, 0x046d, 0xc52b, "1-1");
        let mut held = device(1, 1, 0x046d, 0xc52b, "1-2");
        // Also when the plug it holds cannot be decided yet (its strings are pending).
        held.strings_pending = pending;
        let misnamed = HostdevAlias::for_rules(&named);
        let domains = vec![
            DomainView {
                name: "b".to_string(),
                hostdevs: Vec::new(),
            },
            DomainView {
                name: "d".to_string(),
                hostdevs: vec![UsbHostdev {
                    alias: Some(misnamed.to_string()),
                    id: None,
                    address: Some(held.address()),
                }],
            },
        ];
        let world = World {
            config: config.clone(),
            devices: vec![named.clone(), held.clone()],
            domains,
        };
        let first = plan(&world.config, &world.devices, &world.domains);
        let summary: Vec<(String, &str)> = first
            .actions
            .iter()
            .map(|action| match action {
                Action::Detach { .. } => ("detach".to_string(), action.alias().as_str()),
                Action::Attach { .. } => ("attach".to_string(), action.alias().as_str()),
            })
            .collect();
        let mut expected = vec![
            ("detach".to_string(), misnamed.as_str()),
            ("attach".to_string(), misnamed.as_str()),
        ];
        let held_alias = HostdevAlias::for_rules(&held);
        if !pending {
            expected.push(("attach".to_string(), held_alias.as_str()));
        }
        assert_eq!(summary, expected, "pending={pending}");
        check_actions(&world, &first).unwrap();
        let mut domains = world.domains.clone();
        apply(&mut domains, &first.actions).unwrap();
        assert_eq!(
            plan(&world.config, &world.devices, &domains).actions,
            vec![]
        );
    }
}
