//! The loop's tests of calls that do not answer: a VM whose QEMU is stuck, a libvirtd
//! that does not answer, a VM whose XML cannot be read. The fake holds a VM's calls (or
//! the listing) until the test lets them go, and the manual clock brings deadlines
//! round, so nothing here depends on how fast the machine is.

use super::*;
use crate::daemon::in_flight::CALL_DEADLINE;
use crate::daemon::live_domains::UNREADABLE_REREAD;

/// The receiver goes to win11 (else fedora), the keyboard to fedora.
const TWO_VMS: &str = r#"
[[rule]]
name = "receiver"
id = "046d:c52b"
vm = ["win11", "fedora"]

[[rule]]
name = "keyboard"
id = "0627:0001"
vm = "fedora"
"#;

const RECEIVER: &str = "ua-usbpass-1-5-046d-c52b";
const KEYBOARD: &str = "ua-usbpass-1-7-0627-0001";

fn keyboard() -> UsbDevice {
    device(1, 7, 0x0627, 0x0001, "1-3")
}

fn plugged(device: UsbDevice) -> Event {
    Event::DeviceAdded {
        device: Box::new(device),
        received: Instant::now(),
    }
}

fn attaches_to(harness: &Harness, domain: &str) -> usize {
    harness.count(|call| matches!(call, Call::Attach { domain: to, .. } if to == domain))
}

#[test]
fn a_vm_that_does_not_answer_does_not_delay_another_vms_attach() {
    let harness = Harness::start(
        TWO_VMS,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![],
    );
    harness.world.lock().block("win11");
    harness.send_and_settle(plugged(receiver(5)));
    assert_eq!(attaches_to(&harness, "win11"), 1);
    assert_eq!(harness.world.lock().parked(), 1, "win11's attach hangs");
    // The loop is free: the keyboard goes to fedora while win11's call hangs.
    harness.send_and_settle(plugged(keyboard()));
    assert_eq!(harness.world.lock().aliases_in("fedora"), [KEYBOARD]);
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    harness.world.release("win11");
    harness.settle();
    assert_eq!(harness.world.lock().aliases_in("win11"), [RECEIVER]);
    harness.stop().unwrap();
}

#[test]
fn a_call_past_its_deadline_is_booked_timed_out_then_its_late_answer() {
    let harness = Harness::start(
        TWO_VMS,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![],
    );
    harness.world.lock().block("win11");
    harness.send_and_settle(plugged(receiver(5)));
    assert_eq!(harness.next_wake(), Some(CALL_DEADLINE));
    // Hints about the device and the VM while the call is out: nothing is issued twice.
    harness.send_and_settle(plugged(receiver(5)));
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Other,
    });
    assert_eq!(attaches_to(&harness, "win11"), 1);

    harness.advance(CALL_DEADLINE);
    let state = harness.state();
    let failure = &state.failures[0];
    assert_eq!(
        (failure.kind, failure.domain.as_str(), failure.retry_in_ms),
        (FailureKind::TimedOut, "win11", None)
    );
    assert!(
        failure.message.starts_with(
            "cannot attach 046d:c52b at 001:005 (port 1-2) to vm win11: no answer within 10000 ms"
        ),
        "{}",
        failure.message
    );
    let stuck: Vec<(&str, FailureKind)> = state
        .vms_not_answering
        .iter()
        .map(|vm| (vm.name.as_str(), vm.kind))
        .collect();
    assert_eq!(stuck, [("win11", FailureKind::TimedOut)]);
    // Given up on, the call is still out: no second attach, however many hints come,
    // and the loop waits for an event, not a deadline it cannot act on.
    for _ in 0..3 {
        harness.send_and_settle(Event::Domain {
            domain: "win11".into(),
            change: DomainChange::Other,
        });
    }
    assert_eq!(attaches_to(&harness, "win11"), 1);
    assert_eq!(harness.next_wake(), None);
    // The other VM is served meanwhile.
    harness.send_and_settle(plugged(keyboard()));
    assert_eq!(harness.world.lock().aliases_in("fedora"), [KEYBOARD]);

    // QEMU wakes up: the attach went through, and is booked so.
    harness.world.release("win11");
    harness.settle();
    let state = harness.state();
    assert!(state.vms_not_answering.is_empty());
    assert!(state.failures.is_empty());
    assert_eq!(state.recent_failures[0].kind, FailureKind::TimedOut);
    assert_eq!(harness.world.lock().aliases_in("win11"), [RECEIVER]);
    assert_eq!(attaches_to(&harness, "win11"), 1, "never issued twice");
    harness.stop().unwrap();
}

#[test]
fn a_vms_calls_go_one_at_a_time_in_the_plans_order() {
    // fedora holds the receiver (win11 was off); win11 starts: the plan detaches it
    // from fedora, and attaches the keyboard there.
    let harness = Harness::start(
        TWO_VMS,
        FakeWorld::with_domains(&["fedora"]),
        vec![receiver(5)],
    );
    assert_eq!(harness.world.lock().aliases_in("fedora"), [RECEIVER]);
    harness.world.lock().block("fedora");
    harness.world.lock().start_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Started,
    });
    harness.send_and_settle(plugged(keyboard()));
    // fedora's first call hangs; its next one waits behind it.
    let fedora_calls = |harness: &Harness| {
        harness.count(|call| {
            matches!(call, Call::Attach { domain, .. } | Call::Detach { domain, .. } if domain == "fedora")
        })
    };
    assert_eq!(
        fedora_calls(&harness),
        2,
        "{:#?}",
        harness.world.lock().calls
    );
    harness.world.release("fedora");
    harness.settle();
    assert_eq!(harness.world.lock().aliases_in("fedora"), [KEYBOARD]);
    assert_eq!(harness.world.lock().aliases_in("win11"), [RECEIVER]);
    harness.stop().unwrap();
}

#[test]
fn a_vm_whose_xml_cannot_be_read_is_left_alone_and_the_others_served() {
    let mut world = FakeWorld::with_domains(&["win11", "fedora"]);
    world.unreadable.insert("win11".into());
    let harness = Harness::start(TWO_VMS, world, vec![receiver(5), keyboard()]);
    // The keyboard goes to fedora; the receiver waits for win11, whose XML is unknown:
    // it is neither attached there nor moved to fedora.
    assert_eq!(harness.world.lock().aliases_in("fedora"), [KEYBOARD]);
    assert_eq!(attaches_to(&harness, "win11"), 0);
    let state = harness.state();
    assert_eq!(state.vms_not_answering.len(), 1);
    assert_eq!(state.vms_not_answering[0].name, "win11");
    assert!(
        state.vms_not_answering[0]
            .message
            .starts_with("cannot read the live xml of vm win11: "),
        "{}",
        state.vms_not_answering[0].message
    );
    assert!(
        state.libvirt.connected,
        "one vm does not drop the connection"
    );
    // Read again a while later, and placed once readable.
    assert_eq!(harness.next_wake(), Some(UNREADABLE_REREAD));
    harness.world.lock().unreadable.clear();
    harness.advance(UNREADABLE_REREAD);
    assert_eq!(harness.world.lock().aliases_in("win11"), [RECEIVER]);
    assert!(harness.state().vms_not_answering.is_empty());
    harness.stop().unwrap();
}

#[test]
fn the_watchdog_and_events_go_on_while_a_call_hangs() {
    let ping = Duration::from_secs(3);
    let harness = Harness::start_with(
        TWO_VMS,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![],
        Some(ping),
    );
    harness.world.lock().block("win11");
    harness.send_and_settle(plugged(receiver(5)));
    assert_eq!(harness.world.lock().parked(), 1);
    // Pinged every 3 s while the call hangs, woken once more at its deadline (10 s),
    // and pinged on after it.
    let mut waits = Vec::new();
    for _ in 0..7 {
        let wait = harness.next_wake().expect("a ping is due");
        waits.push(wait.as_secs());
        harness.advance(wait);
    }
    assert_eq!(waits, [3, 3, 3, 1, 2, 3, 3]);
    assert_eq!(harness.state().vms_not_answering[0].name, "win11");
    // Events are handled meanwhile: a plug, a rules change.
    harness.send_and_settle(plugged(keyboard()));
    assert_eq!(harness.world.lock().aliases_in("fedora"), [KEYBOARD]);
    let path = harness.directory.path().join("usbpass.toml");
    std::fs::write(
        &path,
        "[[rule]]\nname = \"keyboard\"\nid = \"0627:0001\"\nvm = \"fedora\"\n",
    )
    .unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    assert_eq!(harness.state().rule_count, 1);
    harness.world.release("win11");
    harness.settle();
    // The late attach is booked, and undone: the rules no longer want it there.
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    harness.stop().unwrap();
}

#[test]
fn a_libvirtd_that_does_not_answer_is_given_up_on_and_a_new_connection_converges() {
    let harness = Harness::start(
        TWO_VMS,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![],
    );
    assert_eq!(harness.count(|c| *c == Call::Connect), 1);
    // libvirtd stops answering (SIGSTOP): listings and connects hang.
    harness.world.lock().block_listing();
    harness.world.lock().block_connect();
    // SIGHUP reads everything again; libvirtd does not answer the listing.
    harness.send_and_settle(Event::Reload);
    assert_eq!(harness.world.lock().parked(), 1);
    // The loop goes on: a plug is noted (and waits for the listing).
    harness.send_and_settle(plugged(keyboard()));
    assert_eq!(
        harness.state().devices.len(),
        0,
        "nothing planned without a listing"
    );
    assert_eq!(harness.next_wake(), Some(CALL_DEADLINE));
    harness.advance(CALL_DEADLINE);
    // The listing is given up on, and so is the connection: a new one is under way,
    // and hangs too.
    assert_eq!(harness.count(|c| *c == Call::Connect), 2);
    assert_eq!(harness.world.lock().parked(), 2);
    let state = harness.state();
    assert!(!state.libvirt.connected);
    assert_eq!(
        state.libvirt.last_error.as_deref(),
        Some("libvirt does not answer: no list of running vms within 10000 ms")
    );
    // The connect has its deadline too; then the next one waits its backoff.
    assert_eq!(harness.next_wake(), Some(CALL_DEADLINE));
    harness.advance(CALL_DEADLINE);
    assert_eq!(
        harness.state().libvirt.last_error.as_deref(),
        Some("libvirt at qemu:///system does not answer: no connection within 10000 ms")
    );
    assert_eq!(harness.next_wake(), Some(Duration::from_millis(500)));
    harness.advance(Duration::from_millis(500));
    assert_eq!(harness.count(|c| *c == Call::Connect), 3);
    // libvirtd answers again: the old listing and the connect given up on return and
    // are dropped; the new connection reads the live XML, then attaches the keyboard,
    // once.
    harness.world.release_listing();
    harness.world.release_connect();
    harness.settle();
    assert_eq!(harness.world.lock().aliases_in("fedora"), [KEYBOARD]);
    assert_eq!(attaches_to(&harness, "fedora"), 1);
    let calls = harness.world.lock().calls.clone();
    let last_connect = calls.iter().rposition(|c| *c == Call::Connect).unwrap();
    assert_eq!(
        calls[last_connect + 1..],
        [
            Call::ListDomains,
            Call::Attach {
                domain: "fedora".into(),
                alias: KEYBOARD.into(),
            },
        ],
        "read before acting"
    );
    let state = harness.state();
    assert!(state.libvirt.connected);
    assert_eq!(state.devices.len(), 1);
    harness.stop().unwrap();
}

#[test]
fn a_late_broken_call_on_a_replaced_connection_leaves_the_new_one_alone() {
    let harness = Harness::start(
        TWO_VMS,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![],
    );
    harness.world.lock().block("win11");
    harness.send_and_settle(plugged(receiver(5)));
    // The connection breaks while win11's attach hangs; a new one opens at once.
    harness.send_and_settle(Event::HypervisorDisconnected {
        reason: "end of file from libvirtd".into(),
    });
    assert_eq!(harness.count(|c| *c == Call::Connect), 2);
    assert_eq!(attaches_to(&harness, "win11"), 1, "not issued twice");
    // The stuck attach comes back broken, on the old connection: the new connection
    // stays, and the attach is made through it at once.
    harness.world.lock().failing_attaches = [FailureKind::ConnectionLost].into();
    harness.world.release("win11");
    harness.settle();
    assert_eq!(harness.count(|c| *c == Call::Connect), 2);
    assert!(harness.state().libvirt.connected);
    assert_eq!(attaches_to(&harness, "win11"), 2);
    assert_eq!(harness.world.lock().aliases_in("win11"), [RECEIVER]);
    harness.stop().unwrap();
}

#[test]
fn an_answer_that_comes_after_its_vm_stopped_leaves_no_failure_behind() {
    let harness = Harness::start(
        TWO_VMS,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![],
    );
    harness.world.lock().block("win11");
    harness.send_and_settle(plugged(receiver(5)));
    // win11 stops while its attach hangs: the receiver goes to fedora.
    harness.world.lock().stop_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Stopped,
    });
    assert_eq!(harness.world.lock().aliases_in("fedora"), [RECEIVER]);
    // The stuck attach comes back, domain gone. (The listing that follows hangs, so
    // the state file shows what the answer alone left behind.)
    harness.world.lock().block_listing();
    harness.world.release("win11");
    harness.settle();
    let state = harness.state();
    assert!(
        state.failures.iter().all(|f| f.domain != "win11"),
        "{:#?}",
        state.failures
    );
    assert_eq!(
        state.recent_failures.last().unwrap().kind,
        FailureKind::DomainGone
    );
    harness.world.release_listing();
    harness.settle();
    harness.stop().unwrap();
}
