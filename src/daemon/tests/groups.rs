//! The loop's tests of `usbpass switch`: a group moves at once, cycles, goes to the
//! host and back to its rules; the client gets each device's result.

use super::*;
use crate::daemon::control::{ControlRequest, SwitchReply, SwitchRequest, SwitchTo};
use std::sync::mpsc::Receiver;

const DESK: &str = r#"
[[rule]]
name = "receiver"
id = "046d:c52b"
vm = ["win11", "fedora"]
group = "desk"

[[rule]]
name = "headset"
id = "1395:0025"
vm = ["win11", "fedora"]
group = "desk"

[[rule]]
name = "zigbee"
id = "10c4:ea60"
vm = "fedora"
"#;

fn headset() -> UsbDevice {
    device(1, 7, 0x1395, 0x0025, "1-3")
}

fn zigbee() -> UsbDevice {
    device(1, 8, 0x10c4, 0xea60, "1-4")
}

fn switch(harness: &Harness, id: u64, group: &str, to: SwitchTo) -> Receiver<SwitchReply> {
    let (reply, replies) = std::sync::mpsc::sync_channel(1);
    harness.send_and_settle(Event::Control(Box::new(ControlRequest {
        id,
        request: SwitchRequest {
            group: group.to_string(),
            to,
            timeout_ms: 30_000,
        },
        reply,
    })));
    replies
}

fn answered(replies: &Receiver<SwitchReply>) -> SwitchReply {
    replies
        .recv_timeout(PATIENCE)
        .expect("the switch is answered")
}

#[test]
fn a_group_moves_at_once_cycles_goes_to_the_host_and_back_to_its_rules() {
    let harness = Harness::start(
        DESK,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![receiver(5), headset(), zigbee()],
    );
    harness.wait_until("the rules' placement", |w| w.aliases_in("win11").len() == 2);

    let reply = answered(&switch(&harness, 1, "desk", SwitchTo::Vm("fedora".into())));
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.target, "fedora");
    assert_eq!(reply.devices.len(), 2);
    assert!(reply
        .devices
        .iter()
        .all(|d| d.in_place && d.place == "fedora"));
    {
        let world = harness.world.lock();
        assert!(world.aliases_in("win11").is_empty());
        // The zigbee stick is in no group: untouched.
        assert_eq!(world.aliases_in("fedora").len(), 3);
    }
    assert_eq!(harness.state().groups["desk"], "fedora");

    // next: fedora is the last of the group's vms, so back to win11.
    let reply = answered(&switch(&harness, 2, "desk", SwitchTo::Next));
    assert_eq!((reply.ok, reply.target.as_str()), (true, "win11"));
    assert_eq!(harness.world.lock().aliases_in("win11").len(), 2);

    let reply = answered(&switch(&harness, 3, "desk", SwitchTo::Host));
    assert!(
        reply.ok && reply.devices.iter().all(|d| d.place == "host"),
        "{reply:?}"
    );
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    // A replug keeps the choice.
    harness.unplug(&receiver(5));
    harness.plug(receiver(6));
    assert!(harness.world.lock().aliases_in("win11").is_empty());

    let reply = answered(&switch(&harness, 4, "desk", SwitchTo::Rules));
    assert_eq!((reply.ok, reply.target.as_str()), (true, "rules"));
    assert_eq!(harness.world.lock().aliases_in("win11").len(), 2);
    assert!(harness.state().groups.is_empty());
    harness.stop().unwrap();
}

#[test]
fn an_unknown_group_or_a_vm_outside_the_group_is_refused_and_nothing_moves() {
    let harness = Harness::start(
        DESK,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![receiver(5)],
    );
    harness.wait_until("the rules' placement", |w| w.aliases_in("win11").len() == 1);
    let calls = harness.world.lock().calls.len();
    let reply = answered(&switch(&harness, 1, "couch", SwitchTo::Host));
    assert_eq!(
        reply.error.as_deref(),
        Some("no rule is in group \"couch\" (groups: desk)")
    );
    let reply = answered(&switch(&harness, 2, "desk", SwitchTo::Vm("lab".into())));
    assert_eq!(
        reply.error.as_deref(),
        Some("vm \"lab\" is not one of group desk's vms (win11, fedora)")
    );
    assert!(!reply.ok);
    assert_eq!(harness.world.lock().calls.len(), calls);
    harness.stop().unwrap();
}

#[test]
fn a_switch_to_a_vm_that_is_not_running_says_so_and_the_group_waits_on_the_host() {
    let harness = Harness::start(DESK, FakeWorld::with_domains(&["win11"]), vec![receiver(5)]);
    harness.wait_until("the rules' placement", |w| w.aliases_in("win11").len() == 1);
    let reply = answered(&switch(&harness, 1, "desk", SwitchTo::Vm("fedora".into())));
    assert!(!reply.ok);
    assert!(
        reply
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("vm fedora is not running")),
        "{reply:?}"
    );
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    harness.world.lock().start_domain("fedora");
    harness.send_and_settle(Event::Domain {
        domain: "fedora".into(),
        change: DomainChange::Started,
    });
    harness.wait_until("the group in fedora", |w| w.aliases_in("fedora").len() == 1);
    harness.stop().unwrap();
}
