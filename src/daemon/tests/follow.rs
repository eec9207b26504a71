//! The loop's tests of `follow`: a device that re-enumerates with other IDs on the same
//! port within the window goes to the same VM; after the window, or when a rule claims
//! it, it does not.

use super::*;

const FOLLOW_RULES: &str = r#"
[[rule]]
name = "board"
id = "0483:df11"
vm = ["lab", "win11"]
follow = "15s"

[[rule]]
name = "stick"
id = "0781:5581"
vm = "win11"
"#;

fn board(devnum: u16) -> UsbDevice {
    device(1, devnum, 0x0483, 0xdf11, "1-4")
}

fn firmware(devnum: u16) -> UsbDevice {
    device(1, devnum, 0x1209, 0x0001, "1-4")
}

#[test]
fn a_device_that_comes_back_with_other_ids_within_the_window_follows_both_ways() {
    let harness = Harness::start(
        FOLLOW_RULES,
        FakeWorld::with_domains(&["lab", "win11"]),
        vec![board(5)],
    );
    assert_eq!(
        harness.world.lock().aliases_in("lab"),
        ["ua-usbpass-1-5-0483-df11"]
    );
    // The board leaves its bootloader: gone, and back as its firmware 3 s later.
    harness.unplug(&board(5));
    harness.advance(Duration::from_secs(3));
    harness.plug(firmware(6));
    assert_eq!(
        harness.world.lock().aliases_in("lab"),
        ["ua-usbpass-1-6-1209-0001"]
    );
    let state = harness.state();
    assert_eq!(state.devices[0].rule.as_deref(), Some("board"));
    // And back into its bootloader: followed again.
    harness.unplug(&firmware(6));
    harness.advance(Duration::from_secs(5));
    harness.plug(board(7));
    assert_eq!(
        harness.world.lock().aliases_in("lab"),
        ["ua-usbpass-1-7-0483-df11"]
    );
    harness.stop().unwrap();
}

#[test]
fn after_the_window_or_when_a_rule_claims_it_the_newcomer_does_not_follow() {
    let harness = Harness::start(
        FOLLOW_RULES,
        FakeWorld::with_domains(&["lab", "win11"]),
        vec![board(5)],
    );
    harness.unplug(&board(5));
    harness.advance(Duration::from_secs(16));
    harness.plug(firmware(6));
    assert!(harness.world.lock().aliases_in("lab").is_empty());
    assert_eq!(harness.state().devices[0].rule, None);
    harness.unplug(&firmware(6));

    // Within the window, but a rule names the newcomer: its rule decides.
    harness.plug(board(7));
    harness.unplug(&board(7));
    let mut stick = device(1, 8, 0x0781, 0x5581, "1-4");
    stick.port_path = "1-4".into();
    harness.plug(stick);
    assert_eq!(
        harness.world.lock().aliases_in("win11"),
        ["ua-usbpass-1-8-0781-5581"]
    );
    assert!(harness.world.lock().aliases_in("lab").is_empty());
    harness.stop().unwrap();
}

#[test]
fn a_rule_without_follow_leaves_the_port_alone() {
    let rules = FOLLOW_RULES.replace("follow = \"15s\"\n", "");
    let harness = Harness::start(&rules, FakeWorld::with_domains(&["lab"]), vec![board(5)]);
    harness.unplug(&board(5));
    harness.plug(firmware(6));
    assert!(harness.world.lock().aliases_in("lab").is_empty());
    harness.stop().unwrap();
}
