//! Tests of the fallback choices: `return = "when-free"` and VMs passed over for want of
//! a free USB port.

use super::*;

const WHEN_FREE: &str = r#"
[[rule]]
name = "disk"
id = "0781:5581"
vm = ["win11", "fedora"]
return = "when-free"
"#;

fn disk(devnum: u16) -> UsbDevice {
    device(1, devnum, 0x0781, 0x5581, "1-3")
}

fn full(vms: &[&str]) -> LoopFacts {
    LoopFacts {
        no_free_port: vms.iter().map(|vm| vm.to_string()).collect(),
        ..LoopFacts::default()
    }
}

#[test]
fn when_free_keeps_a_device_in_the_fallback_vm_when_the_first_choice_starts() {
    let config = config(WHEN_FREE);
    let devices = [disk(7)];
    // In fedora while win11 was off; now win11 runs again.
    let domains = [vm("win11", vec![]), vm("fedora", vec![owned(&disk(7))])];
    let plan = plan(&config, &devices, &domains);
    assert!(plan.actions.is_empty(), "{:?}", summary(&plan.actions));
    assert_eq!(plan.placements[0].wanted_vm.as_deref(), Some("fedora"));
}

#[test]
fn when_free_gives_the_device_to_the_first_choice_once_the_fallback_stops_or_on_replug() {
    let config = config(WHEN_FREE);
    // fedora stopped: the device is nowhere, win11 gets it.
    let plan_after_stop = plan(&config, &[disk(7)], &[vm("win11", vec![])]);
    assert_eq!(
        summary(&plan_after_stop.actions),
        ["attach ua-usbpass-1-7-0781-5581 to win11 by disk"]
    );
    // Replugged while in fedora: the old hostdev is stale, the new plug goes to win11.
    let domains = [vm("win11", vec![]), vm("fedora", vec![owned(&disk(7))])];
    let plan_after_replug = plan(&config, &[disk(8)], &domains);
    assert_eq!(
        summary(&plan_after_replug.actions),
        [
            "detach ua-usbpass-1-7-0781-5581 from fedora (device-gone)",
            "attach ua-usbpass-1-8-0781-5581 to win11 by disk"
        ]
    );
}

#[test]
fn at_once_is_the_default_and_moves_the_device_back() {
    let config = config(&WHEN_FREE.replace("return = \"when-free\"\n", ""));
    assert_eq!(config.rules[0].give_back, GiveBack::AtOnce);
    let domains = [vm("win11", vec![]), vm("fedora", vec![owned(&disk(7))])];
    let plan = plan(&config, &[disk(7)], &domains);
    assert_eq!(
        summary(&plan.actions),
        [
            "detach ua-usbpass-1-7-0781-5581 from fedora (moving-to-win11)",
            "attach ua-usbpass-1-7-0781-5581 to win11 by disk"
        ]
    );
}

#[test]
fn a_bad_return_value_names_the_rule_and_the_place() {
    let text = WHEN_FREE.replace("when-free", "later");
    let error = Config::parse(&text, Path::new("rules.toml")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "rules.toml:6:10: rule \"disk\": return must be \"at-once\" or \"when-free\", not \"later\""
    );
}

#[test]
fn a_vm_without_a_free_port_is_passed_over_for_the_next_running_one() {
    let config = config(RULES);
    let domains = [vm("win11", vec![]), vm("fedora", vec![])];
    let plan = plan_with(&config, &[receiver(5)], &domains, &full(&["win11"]));
    assert_eq!(
        summary(&plan.actions),
        ["attach ua-usbpass-1-5-046d-c52b to fedora by receiver"]
    );
    assert_eq!(
        plan.placements[0].passed_over,
        [PassedOver {
            vm: "win11".into(),
            reason: PassReason::NoFreePort
        }]
    );
    // Converges.
    let mut domains = domains;
    apply(&mut domains, &plan.actions);
    assert!(
        plan_with(&config, &[receiver(5)], &domains, &full(&["win11"]))
            .actions
            .is_empty()
    );
}

#[test]
fn a_device_already_in_a_full_vm_stays_there() {
    let config = config(RULES);
    let domains = [vm("win11", vec![owned(&receiver(5))]), vm("fedora", vec![])];
    let plan = plan_with(&config, &[receiver(5)], &domains, &full(&["win11"]));
    assert!(plan.actions.is_empty(), "{:?}", summary(&plan.actions));
    assert!(plan.placements[0].passed_over.is_empty());
}

#[test]
fn when_every_vm_is_full_the_device_waits_on_the_host_and_says_why() {
    let config = config(RULES);
    let domains = [vm("win11", vec![]), vm("fedora", vec![])];
    let plan = plan_with(
        &config,
        &[receiver(5)],
        &domains,
        &full(&["win11", "fedora"]),
    );
    assert!(plan.actions.is_empty());
    assert_eq!(plan.placements[0].wanted_vm, None);
    assert_eq!(plan.placements[0].passed_over.len(), 2);
}
