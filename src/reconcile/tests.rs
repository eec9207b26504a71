//! Tests of `reconcile::plan`.

use super::*;
use crate::testing::devices::device;
use std::path::Path;

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("rules.toml")).unwrap()
}

const RULES: &str = r#"
[[rule]]
name = "receiver"
id = "046d:c52b"
vm = ["win11", "fedora"]

[[rule]]
name = "front-port"
port = "1-4"
vm = "lab"

[[rule]]
name = "stick-a"
id = "0403:6001"
serial = "A"
vm = "lab"

[[rule]]
name = "stick-b"
id = "0403:6001"
serial = "B"
vm = "fedora"
"#;

fn receiver(devnum: u16) -> UsbDevice {
    device(1, devnum, 0x046d, 0xc52b, "1-2")
}

fn stick(devnum: u16, serial: &str, port: &str) -> UsbDevice {
    let mut stick = device(1, devnum, 0x0403, 0x6001, port);
    stick.serial = Some(serial.to_string());
    stick
}

fn vm(name: &str, hostdevs: Vec<UsbHostdev>) -> DomainView {
    DomainView {
        name: name.to_string(),
        hostdevs,
    }
}

/// The hostdev libvirt shows after the daemon attached `device`.
fn owned(device: &UsbDevice) -> UsbHostdev {
    UsbHostdev {
        alias: Some(HostdevAlias::for_rules(device).to_string()),
        id: Some(device.id()),
        address: Some(device.address()),
    }
}

fn foreign(device: &UsbDevice) -> UsbHostdev {
    UsbHostdev {
        alias: Some("hostdev0".into()),
        id: Some(device.id()),
        address: Some(device.address()),
    }
}

/// Apply actions the way libvirt would, for the convergence check.
fn apply(domains: &mut [DomainView], actions: &[Action]) {
    for action in actions {
        let domain = domains
            .iter_mut()
            .find(|d| d.name == action.domain())
            .expect("actions only name running domains");
        match action {
            Action::Detach { alias, .. } => {
                let before = domain.hostdevs.len();
                domain
                    .hostdevs
                    .retain(|h| h.alias.as_deref() != Some(alias.as_str()));
                assert_eq!(before, domain.hostdevs.len() + 1, "detach of {alias}");
            }
            Action::Attach { device, .. } => domain.hostdevs.push(owned(device)),
        }
    }
}

/// Short, readable form of an action list.
fn summary(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|action| match action {
            Action::Detach {
                domain,
                alias,
                reason,
                ..
            } => format!("detach {alias} from {domain} ({reason})"),
            Action::Attach {
                domain,
                alias,
                rule,
                ..
            } => format!("attach {alias} to {domain} by {rule}"),
        })
        .collect()
}

struct Case {
    name: &'static str,
    devices: Vec<UsbDevice>,
    domains: Vec<DomainView>,
    expected: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    let hub = {
        let mut hub = device(1, 9, 0x05e3, 0x0610, "1-4");
        hub.device_class = crate::model::HUB_CLASS;
        hub
    };
    vec![
        Case {
            name: "plug while the vm runs",
            devices: vec![receiver(5)],
            domains: vec![vm("win11", vec![])],
            expected: &["attach ua-usbpass-1-5-046d-c52b to win11 by receiver"],
        },
        Case {
            name: "plug while no target vm runs",
            devices: vec![receiver(5)],
            domains: vec![vm("other", vec![])],
            expected: &[],
        },
        Case {
            name: "unplug leaves a stale hostdev",
            devices: vec![],
            domains: vec![vm("win11", vec![owned(&receiver(5))])],
            expected: &["detach ua-usbpass-1-5-046d-c52b from win11 (device-gone)"],
        },
        Case {
            name: "replug with a new device number",
            devices: vec![receiver(6)],
            domains: vec![vm("win11", vec![owned(&receiver(5))])],
            expected: &[
                "detach ua-usbpass-1-5-046d-c52b from win11 (device-gone)",
                "attach ua-usbpass-1-6-046d-c52b to win11 by receiver",
            ],
        },
        Case {
            name: "stale hostdev without address is found by its alias",
            devices: vec![receiver(6)],
            domains: vec![vm(
                "win11",
                vec![UsbHostdev {
                    address: None,
                    id: None,
                    ..owned(&receiver(5))
                }],
            )],
            expected: &[
                "detach ua-usbpass-1-5-046d-c52b from win11 (device-gone)",
                "attach ua-usbpass-1-6-046d-c52b to win11 by receiver",
            ],
        },
        Case {
            name: "another device now sits at the old address",
            devices: vec![device(1, 5, 0x1234, 0x5678, "1-3")],
            domains: vec![vm("win11", vec![owned(&receiver(5))])],
            expected: &["detach ua-usbpass-1-5-046d-c52b from win11 (device-gone)"],
        },
        Case {
            name: "first-choice vm stopped: fall back to the next running one",
            devices: vec![receiver(5)],
            domains: vec![vm("fedora", vec![])],
            expected: &["attach ua-usbpass-1-5-046d-c52b to fedora by receiver"],
        },
        Case {
            name: "first-choice vm started again: move back",
            devices: vec![receiver(5)],
            domains: vec![vm("win11", vec![]), vm("fedora", vec![owned(&receiver(5))])],
            expected: &[
                "detach ua-usbpass-1-5-046d-c52b from fedora (moving-to-win11)",
                "attach ua-usbpass-1-5-046d-c52b to win11 by receiver",
            ],
        },
        Case {
            name: "daemon or libvirtd restart: state already right, no duplicates",
            devices: vec![receiver(5), stick(7, "A", "1-3"), stick(8, "B", "1-5")],
            domains: vec![
                vm("win11", vec![owned(&receiver(5))]),
                vm("lab", vec![owned(&stick(7, "A", "1-3"))]),
                vm("fedora", vec![owned(&stick(8, "B", "1-5"))]),
            ],
            expected: &[],
        },
        Case {
            name: "identical devices told apart by serial",
            devices: vec![stick(7, "A", "1-3"), stick(8, "B", "1-5")],
            domains: vec![vm("lab", vec![]), vm("fedora", vec![])],
            expected: &[
                "attach ua-usbpass-1-7-0403-6001 to lab by stick-a",
                "attach ua-usbpass-1-8-0403-6001 to fedora by stick-b",
            ],
        },
        Case {
            name: "port rule takes whatever is plugged there",
            devices: vec![device(1, 11, 0xdead, 0xbeef, "1-4")],
            domains: vec![vm("lab", vec![])],
            expected: &["attach ua-usbpass-1-11-dead-beef to lab by front-port"],
        },
        Case {
            name: "hubs are never passed through",
            devices: vec![hub],
            domains: vec![vm("lab", vec![])],
            expected: &[],
        },
        Case {
            name: "unmatched device stays on the host",
            devices: vec![device(1, 12, 0x1111, 0x2222, "1-6")],
            domains: vec![vm("lab", vec![])],
            expected: &[],
        },
        Case {
            name: "owned hostdev whose rule is gone is released",
            devices: vec![device(1, 12, 0x1111, 0x2222, "1-6")],
            domains: vec![vm(
                "lab",
                vec![owned(&device(1, 12, 0x1111, 0x2222, "1-6"))],
            )],
            expected: &["detach ua-usbpass-1-12-1111-2222 from lab (no-rule)"],
        },
        Case {
            name: "a device held by a foreign hostdev is never taken",
            devices: vec![receiver(5)],
            domains: vec![
                vm("win11", vec![]),
                vm("fedora", vec![foreign(&receiver(5))]),
            ],
            expected: &[],
        },
        Case {
            name: "a foreign hostdev by id alone holds every device with that id",
            devices: vec![receiver(5)],
            domains: vec![vm(
                "win11",
                vec![UsbHostdev {
                    alias: None,
                    id: Some(receiver(5).id()),
                    address: None,
                }],
            )],
            expected: &[],
        },
        Case {
            name: "stale foreign hostdevs are left alone",
            devices: vec![],
            domains: vec![vm("win11", vec![foreign(&receiver(5))])],
            expected: &[],
        },
        Case {
            name: "a hand-placed hostdev stays while its device is present",
            devices: vec![receiver(5)],
            domains: vec![
                vm("win11", vec![]),
                vm(
                    "other",
                    vec![UsbHostdev {
                        alias: Some(HostdevAlias::for_manual(&receiver(5)).to_string()),
                        ..owned(&receiver(5))
                    }],
                ),
            ],
            expected: &[],
        },
        Case {
            name: "a hand-placed hostdev goes when its device does",
            devices: vec![],
            domains: vec![vm(
                "other",
                vec![UsbHostdev {
                    alias: Some(HostdevAlias::for_manual(&receiver(5)).to_string()),
                    ..owned(&receiver(5))
                }],
            )],
            expected: &["detach ua-usbpass-manual-1-5-046d-c52b from other (device-gone)"],
        },
        Case {
            name: "duplicate owned hostdevs: keep one",
            devices: vec![receiver(5)],
            domains: vec![vm(
                "win11",
                vec![
                    owned(&receiver(5)),
                    UsbHostdev {
                        alias: Some("ua-usbpass-old-name".into()),
                        ..owned(&receiver(5))
                    },
                ],
            )],
            expected: &["detach ua-usbpass-old-name from win11 (duplicate)"],
        },
    ]
}

#[test]
fn heals_every_case_and_converges() {
    let config = config(RULES);
    let mut failures = Vec::new();
    for case in cases() {
        let actions = reconcile(&config, &case.devices, &case.domains);
        let got = summary(&actions);
        if got != case.expected {
            failures.push(format!(
                "{}:\n  expected {:?}\n  got      {:?}",
                case.name, case.expected, got
            ));
            continue;
        }
        let mut domains = case.domains.clone();
        apply(&mut domains, &actions);
        let again = summary(&reconcile(&config, &case.devices, &domains));
        if !again.is_empty() {
            failures.push(format!("{}: second call not empty: {again:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn vm_start_after_plug_heals_across_steps() {
    let config = config(RULES);
    let devices = vec![receiver(5)];
    // Plugged while nothing runs: nothing to do.
    assert!(reconcile(&config, &devices, &[]).is_empty());
    // fedora starts: it is the only running target.
    let mut domains = vec![vm("fedora", vec![])];
    let actions = reconcile(&config, &devices, &domains);
    apply(&mut domains, &actions);
    assert_eq!(domains[0].hostdevs, vec![owned(&receiver(5))]);
    // win11 starts: the device moves to the first choice.
    domains.push(vm("win11", vec![]));
    let actions = reconcile(&config, &devices, &domains);
    apply(&mut domains, &actions);
    assert!(domains[0].hostdevs.is_empty());
    assert_eq!(domains[1].hostdevs, vec![owned(&receiver(5))]);
    // win11 stops: its hostdevs vanish with it; back to fedora.
    domains.pop();
    let actions = reconcile(&config, &devices, &domains);
    apply(&mut domains, &actions);
    assert_eq!(domains[0].hostdevs, vec![owned(&receiver(5))]);
    assert!(reconcile(&config, &devices, &domains).is_empty());
}

#[test]
fn placements_report_rule_target_and_holders() {
    let config = config(RULES);
    let devices = vec![receiver(5), device(1, 12, 0x1111, 0x2222, "1-6")];
    let domains = vec![vm("fedora", vec![owned(&receiver(5))])];
    let plan = plan(&config, &devices, &domains);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.placements[0].rule.as_deref(), Some("receiver"));
    assert_eq!(plan.placements[0].wanted_vm.as_deref(), Some("fedora"));
    assert_eq!(plan.placements[0].holders[0].domain, "fedora");
    assert_eq!(plan.placements[1].rule, None);
    assert!(plan.placements[1].holders.is_empty());
}

#[test]
fn a_device_whose_strings_are_not_read_yet_is_left_as_it_is() {
    let config = config(RULES);
    // stick-a (serial A) goes to lab; before its serial is read no rule can be chosen.
    let mut pending = stick(9, "A", "1-3");
    pending.serial = None;
    pending.strings_pending = true;
    let domains = [vm("lab", vec![owned(&pending)]), vm("fedora", vec![])];
    let plan = plan(&config, std::slice::from_ref(&pending), &domains);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.placements[0].rule, None);
    // Nor is it attached anywhere while undecided.
    let domains = [vm("lab", vec![]), vm("fedora", vec![])];
    assert!(reconcile(&config, &[pending.clone()], &domains).is_empty());
    // Once read, the rule decides.
    pending.serial = Some("A".into());
    pending.strings_pending = false;
    assert_eq!(
        summary(&reconcile(&config, &[pending], &domains)),
        ["attach ua-usbpass-1-9-0403-6001 to lab by stick-a"]
    );
}

mod fallback;
