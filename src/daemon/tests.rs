//! The loop's tests: a `Daemon` on its own thread against the fake hypervisor, driven
//! by events the way udev, libvirt and signals drive it.

use super::*;
use crate::daemon::clock::manual::{ManualClock, PATIENCE};
use crate::daemon::executor::CallCounts;
use crate::daemon::state::DaemonState;
use crate::event::DomainChange;
use crate::testing::devices::device;
use crate::testing::fake_hypervisor::{Call, FakeConnector, FakeWorld, FixedDevices, SharedWorld};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

const RULES: &str = r#"
[[rule]]
name = "receiver"
id = "046d:c52b"
vm = ["win11", "fedora"]
"#;

struct Harness {
    world: SharedWorld,
    clock: ManualClock,
    /// What the device source lists on the next enumeration.
    present: Arc<Mutex<Vec<UsbDevice>>>,
    sender: EventSender,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
    directory: tempfile::TempDir,
    /// The executor's calls issued and answered.
    calls: Arc<CallCounts>,
}

impl Harness {
    fn start(rules: &str, world: FakeWorld, present: Vec<UsbDevice>) -> Harness {
        Harness::start_with(rules, world, present, None)
    }

    /// `start`, with a recording `InterfaceGate` whose log it returns.
    fn start_gated(
        rules: &str,
        world: FakeWorld,
        present: Vec<UsbDevice>,
    ) -> (Harness, Arc<Mutex<crate::testing::fake_gate::GateLog>>) {
        let world = SharedWorld::new(world);
        let gate = crate::testing::fake_gate::RecordingGate::new(Some(world.clone()));
        let log = gate.log.clone();
        let harness = Harness::start_shared(rules, world, present, None, Some(Box::new(gate)));
        (harness, log)
    }

    /// `start`, with systemd's watchdog asking for a ping every `watchdog`.
    fn start_with(
        rules: &str,
        world: FakeWorld,
        present: Vec<UsbDevice>,
        watchdog: Option<Duration>,
    ) -> Harness {
        Harness::start_shared(rules, SharedWorld::new(world), present, watchdog, None)
    }

    fn start_shared(
        rules: &str,
        world: SharedWorld,
        present: Vec<UsbDevice>,
        watchdog: Option<Duration>,
        gate: Option<Box<dyn crate::host::interfaces::InterfaceGate>>,
    ) -> Harness {
        let directory = tempfile::tempdir().unwrap();
        let config_path = directory.path().join("usbpass.toml");
        std::fs::write(&config_path, rules).unwrap();
        let config = Config::load(&config_path).unwrap();
        let present = Arc::new(Mutex::new(present));
        let (sender, receiver) = crate::event::event_channel();
        let options = DaemonOptions {
            config_path,
            state_path: directory.path().join("state.json"),
            watchdog,
        };
        let clock = ManualClock::new();
        let mut daemon = Daemon::with_clock(
            FakeConnector {
                world: world.clone(),
            },
            FixedDevices(present.clone()),
            config,
            options,
            sender.clone(),
            receiver,
            clock.clone(),
        );
        if let Some(gate) = gate {
            daemon = daemon.with_interface_gate(gate);
        }
        let calls = daemon.call_counts();
        let thread = Some(std::thread::spawn(move || daemon.run()));
        let harness = Harness {
            world,
            clock,
            present,
            sender,
            thread,
            directory,
            calls,
        };
        // The first reconcile and its state file.
        harness.settle();
        harness
    }

    /// Waits until every call that can answer has answered (all but those the fake
    /// holds on purpose) and the loop has handled every answer and is idle. Returns
    /// what the idle loop waits for: how long until its next deadline, `None` for an
    /// event only.
    fn settle(&self) -> Option<Duration> {
        let give_up = Instant::now() + PATIENCE;
        loop {
            let before = self.calls.get();
            let parked = self.world.lock().parked() as u64;
            // Every answer that will come is on the channel before this idle poll.
            let all_answered = before.0 - before.1 == parked;
            let wake = self.clock.settle();
            if all_answered && self.calls.get() == before {
                return wake;
            }
            assert!(Instant::now() < give_up, "the calls did not settle");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn send(&self, event: Event) {
        self.sender.send(event).unwrap();
    }

    /// Send an event and wait until the loop has handled it and is idle again.
    fn send_and_settle(&self, event: Event) {
        self.send(event);
        self.settle();
    }

    /// A plug of `device`, handled.
    fn plug(&self, device: UsbDevice) {
        self.send_and_settle(Event::DeviceAdded {
            device: Box::new(device),
            received: Instant::now(),
        });
    }

    /// The unplug of exactly this instance of `device`, handled.
    fn unplug(&self, device: &UsbDevice) {
        self.send_and_settle(Event::DeviceRemoved {
            syspath: device.syspath.clone(),
            address: Some(device.address()),
        });
    }

    /// Move the loop's clock on and wait until it has done what came due.
    fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.settle();
    }

    /// How long the idle loop waits before it acts on its own: the retry, reconnect
    /// or detach grace it scheduled. `None`: it waits for an event.
    fn next_wake(&self) -> Option<Duration> {
        self.settle()
    }

    fn count(&self, predicate: impl Fn(&Call) -> bool) -> usize {
        self.world
            .lock()
            .calls
            .iter()
            .filter(|c| predicate(c))
            .count()
    }

    fn wait_until(&self, what: &str, condition: impl Fn(&FakeWorld) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !condition(&self.world.lock()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:#?}",
                self.world.lock().calls
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn state(&self) -> DaemonState {
        DaemonState::read(&self.directory.path().join("state.json")).unwrap()
    }

    fn stop(mut self) -> Result<(), DaemonError> {
        self.send(Event::Terminate);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn receiver(devnum: u16) -> UsbDevice {
    device(1, devnum, 0x046d, 0xc52b, "1-2")
}

#[test]
fn plug_attaches_once_and_unplug_detaches() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    assert_eq!(
        harness.world.lock().aliases_in("win11"),
        ["ua-usbpass-1-5-046d-c52b"]
    );
    // More hints change nothing: the world already matches the rules.
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    assert_eq!(harness.world.lock().attaches().len(), 1);
    let state = harness.state();
    assert_eq!(state.devices[0].holders[0].domain, "win11");
    assert!(state.libvirt.connected);

    harness.send_and_settle(Event::DeviceRemoved {
        syspath: receiver(5).syspath,
        address: Some(receiver(5).address()),
    });
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    assert_eq!(harness.world.lock().detaches().len(), 1);
    harness.stop().unwrap();
}

#[test]
fn replug_replaces_the_stale_hostdev() {
    let harness = Harness::start(
        RULES,
        FakeWorld::with_domains(&["win11"]),
        vec![receiver(5)],
    );
    harness.wait_until("the first attach", |w| w.attaches().len() == 1);
    // The kernel reuses the sysfs path (same port) with a new device number, and
    // the remove event was missed.
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(6)),
        received: Instant::now(),
    });
    assert_eq!(
        harness.world.lock().aliases_in("win11"),
        ["ua-usbpass-1-6-046d-c52b"]
    );
    harness.stop().unwrap();
}

#[test]
fn a_stopped_vm_makes_the_device_fall_back_and_return() {
    let harness = Harness::start(
        RULES,
        FakeWorld::with_domains(&["win11", "fedora"]),
        vec![receiver(5)],
    );
    harness.wait_until("the first attach", |w| w.aliases_in("win11").len() == 1);
    harness.world.lock().stop_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Stopped,
    });
    assert_eq!(harness.world.lock().aliases_in("fedora").len(), 1);
    harness.world.lock().start_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Started,
    });
    let world = harness.world.lock();
    assert_eq!(world.aliases_in("win11").len(), 1);
    assert!(world.aliases_in("fedora").is_empty());
    drop(world);
    harness.stop().unwrap();
}

#[test]
fn the_add_race_is_retried_quickly_and_then_succeeds() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.failing_attaches = [FailureKind::DeviceNotFound; 2].into();
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    assert_eq!(harness.next_wake(), Some(Duration::from_millis(100)));
    harness.advance(Duration::from_millis(100));
    assert_eq!(harness.next_wake(), Some(Duration::from_millis(250)));
    harness.advance(Duration::from_millis(250));
    harness.wait_until("the attach to succeed", |w| {
        w.aliases_in("win11").len() == 1
    });
    assert_eq!(harness.world.lock().attaches().len(), 3);
    assert!(harness.state().failures.is_empty());
    harness.stop().unwrap();
}

#[test]
fn a_full_vm_is_passed_over_for_the_rules_next_vm_and_gets_the_device_back_when_a_port_frees() {
    let mut world = FakeWorld::with_domains(&["win11", "fedora"]);
    world.ports_in.insert("win11".into(), 0);
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    harness.wait_until("the fallback", |w| w.aliases_in("fedora").len() == 1);
    let state = harness.state();
    assert_eq!(state.devices[0].wanted_vm.as_deref(), Some("fedora"));
    assert_eq!(state.devices[0].passed_over[0].vm, "win11");
    assert_eq!(harness.world.lock().attaches().len(), 2);
    // A port frees in win11: the first choice gets it (the rule's default return).
    harness.world.lock().ports_in.clear();
    harness.send_and_settle(Event::DomainDeviceRemoved {
        domain: "win11".into(),
        alias: "ua-other".into(),
    });
    harness.wait_until("the move back", |w| w.aliases_in("win11").len() == 1);
    assert!(harness.state().devices[0].passed_over.is_empty());
    harness.stop().unwrap();
}

#[test]
fn a_full_controller_is_reported_and_not_retried_in_a_tight_loop() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.ports_per_domain = Some(0);
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    harness.wait_until("the attach attempt", |w| w.attaches().len() == 1);
    // Several unrelated hints within the retry delay: no new attempt.
    for _ in 0..3 {
        harness.send_and_settle(Event::Domain {
            domain: "other".into(),
            change: DomainChange::Other,
        });
    }
    assert_eq!(harness.world.lock().attaches().len(), 1);
    // The only VM of the rule is full: the device waits on the host, and says why.
    let state = harness.state();
    assert!(state.failures.is_empty(), "{:?}", state.failures);
    assert_eq!(state.devices[0].wanted_vm, None);
    assert_eq!(state.devices[0].passed_over[0].vm, "win11");
    let failure = &state.recent_failures[0];
    assert_eq!(failure.kind, FailureKind::NoFreePort);
    assert_eq!(failure.domain, "win11");
    assert!(failure.message.contains("win11"), "{}", failure.message);
    assert!(failure.message.contains("046d:c52b"), "{}", failure.message);
    // An event about that vm (a port freed) makes it due again.
    harness.world.lock().ports_per_domain = None;
    harness.send_and_settle(Event::DomainDeviceRemoved {
        domain: "win11".into(),
        alias: "ua-other".into(),
    });
    assert_eq!(harness.world.lock().aliases_in("win11").len(), 1);
    assert!(harness.state().failures.is_empty());
    harness.stop().unwrap();
}

#[test]
fn a_lost_connection_is_reopened_and_state_healed() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    harness.world.lock().refuse_connections = true;
    harness.send_and_settle(Event::HypervisorDisconnected {
        reason: "end of file from libvirtd".into(),
    });
    // One reconnect at once, refused; each next one waits longer.
    assert_eq!(harness.count(|c| *c == Call::Connect), 2);
    assert_eq!(harness.next_wake(), Some(Duration::from_millis(500)));
    harness.advance(Duration::from_millis(500));
    assert_eq!(harness.count(|c| *c == Call::Connect), 3);
    assert_eq!(harness.next_wake(), Some(Duration::from_secs(1)));
    // While disconnected, a plug is remembered; it does not hurry the reconnect.
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    assert_eq!(harness.count(|c| *c == Call::Connect), 3);
    harness.world.lock().refuse_connections = false;
    harness.advance(Duration::from_secs(1));
    harness.wait_until("reconnect and attach", |w| w.aliases_in("win11").len() == 1);
    assert_eq!(harness.count(|c| *c == Call::Connect), 4);
    harness.stop().unwrap();
}

#[test]
fn libvirtds_socket_appearing_reconnects_at_once_instead_of_at_the_backoff() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    harness.world.lock().refuse_connections = true;
    harness.send_and_settle(Event::HypervisorDisconnected {
        reason: "end of file from libvirtd".into(),
    });
    for wait in [500, 1000, 2000, 4000] {
        harness.advance(Duration::from_millis(wait));
    }
    assert_eq!(harness.count(|c| *c == Call::Connect), 6);
    assert_eq!(harness.next_wake(), Some(Duration::from_secs(8)));
    // libvirtd is back: its socket appears, and the loop connects without waiting 8 s.
    harness.world.lock().refuse_connections = false;
    harness.send(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    harness.send_and_settle(Event::LibvirtSocketAppeared);
    harness.wait_until("reconnect and attach", |w| w.aliases_in("win11").len() == 1);
    assert_eq!(harness.count(|c| *c == Call::Connect), 7);
    // While connected it changes nothing.
    harness.send_and_settle(Event::LibvirtSocketAppeared);
    assert_eq!(harness.count(|c| *c == Call::Connect), 7);
    harness.stop().unwrap();
}

#[test]
fn a_broken_rules_edit_is_refused_and_the_old_rules_stay() {
    let harness = Harness::start(
        RULES,
        FakeWorld::with_domains(&["win11", "lab"]),
        vec![receiver(5)],
    );
    harness.wait_until("the first attach", |w| w.aliases_in("win11").len() == 1);
    let path = harness.directory.path().join("usbpass.toml");
    std::fs::write(
        &path,
        "[[rule]]\nname = \"receiver\"\nid = \"046d:zzzz\"\nvm = \"lab\"\n",
    )
    .unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    let state = harness.state();
    let error = state.config_error.expect("the error is reported");
    assert!(error.ends_with("usbpass.toml:3:6: rule \"receiver\": \"zzzz\" is not a hex USB ID (1 to 4 hex digits, or *)"), "{error}");
    assert_eq!(harness.world.lock().aliases_in("win11").len(), 1);

    std::fs::write(
        &path,
        "[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"lab\"\n",
    )
    .unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    assert!(harness.state().config_error.is_none());
    let world = harness.world.lock();
    assert!(world.aliases_in("win11").is_empty());
    assert_eq!(world.aliases_in("lab").len(), 1);
    drop(world);
    harness.stop().unwrap();
}

#[test]
fn a_failed_watcher_stops_the_daemon_with_an_error() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&[]), vec![]);
    harness.send(Event::SourceFailed {
        source: "udev",
        message: "netlink socket closed".into(),
    });
    let mut harness = harness;
    let result = harness.thread.take().unwrap().join().unwrap();
    assert_eq!(
        result.unwrap_err().to_string(),
        "the udev watcher stopped: netlink socket closed"
    );
}

#[test]
fn a_failing_listing_backs_off_instead_of_spinning() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    harness
        .world
        .lock()
        .fail_every_call(Some(FailureKind::Other));
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    // Each failed listing drops the connection, and the next connect waits 0.5 s,
    // 1 s, ...: one connect and one listing per wait, none in between, not even when
    // hinted.
    let mut waits = Vec::new();
    for _ in 0..4 {
        let calls = harness.world.lock().calls.len();
        harness.send_and_settle(Event::Domain {
            domain: "win11".into(),
            change: DomainChange::Other,
        });
        assert_eq!(harness.world.lock().calls.len(), calls);
        let wait = harness.next_wake().expect("a reconnect is scheduled");
        waits.push(wait.as_millis());
        harness.advance(wait);
        assert_eq!(
            harness.world.lock().calls[calls..],
            [Call::Connect, Call::ListDomains]
        );
    }
    assert_eq!(waits, [500, 1_000, 2_000, 4_000]);
    harness.world.lock().fail_every_call(None);
    harness.advance(Duration::from_secs(8));
    harness.wait_until("recovery", |w| w.aliases_in("win11").len() == 1);
    harness.stop().unwrap();
}

#[test]
fn a_call_that_breaks_the_connection_every_time_backs_off() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.failing_attaches = [FailureKind::ConnectionLost; 100].into();
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    // Connect, list, attach (breaks), then reconnects 0.5 s doubling to 30 s apart,
    // each one attempt.
    let mut waits = Vec::new();
    for _ in 0..8 {
        let wait = harness.next_wake().expect("a reconnect is scheduled");
        waits.push(wait.as_millis());
        harness.advance(wait);
    }
    assert_eq!(
        waits,
        [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
    );
    assert_eq!(harness.count(|c| *c == Call::Connect), 9);
    assert_eq!(harness.world.lock().attaches().len(), 9);
    harness.world.lock().failing_attaches.clear();
    harness.advance(Duration::from_secs(30));
    harness.wait_until("recovery", |w| w.aliases_in("win11").len() == 1);
    let state = harness.state();
    assert!(state.failures.is_empty());
    assert_eq!(state.recent_failures[0].kind, FailureKind::ConnectionLost);
    // The round that completed reset the backoff: the next loss waits 0.5 s again.
    harness
        .world
        .lock()
        .fail_every_call(Some(FailureKind::ConnectionLost));
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Other,
    });
    assert_eq!(harness.next_wake(), Some(Duration::from_millis(500)));
    harness.stop().unwrap();
}

#[test]
fn a_device_moving_between_vms_waits_for_the_old_vm_to_let_go() {
    // QEMU finishes the unplug from fedora later, as it does for a real guest.
    let mut world = FakeWorld::with_domains(&["fedora"]);
    world.asynchronous_detach = true;
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    harness.wait_until("attach to fedora", |w| w.aliases_in("fedora").len() == 1);
    // win11 starts: the device moves there. The two VMs' calls run side by side, but
    // the attach to win11 waits until fedora let go: libvirt would refuse it with
    // "in use by domain fedora" before that.
    harness.world.lock().start_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Started,
    });
    assert_eq!(harness.world.lock().detaches().len(), 1);
    assert_eq!(
        harness.count(|call| matches!(call, Call::Attach { domain, .. } if domain == "win11")),
        0
    );
    // libvirt reports the detach from fedora: the attach goes out at once, once.
    harness.world.lock().finish_detaches();
    harness.settle();
    harness.wait_until("attach to win11", |w| w.aliases_in("win11").len() == 1);
    assert_eq!(
        harness.count(|call| matches!(call, Call::Attach { domain, .. } if domain == "win11")),
        1
    );
    assert!(harness.state().failures.is_empty());
    harness.stop().unwrap();
}

#[test]
fn an_unplug_under_way_is_not_requested_twice() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.asynchronous_detach = true;
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    harness.wait_until("the attach", |w| w.aliases_in("win11").len() == 1);
    harness.send_and_settle(Event::DeviceRemoved {
        syspath: receiver(5).syspath,
        address: Some(receiver(5).address()),
    });
    // QEMU has not finished: the hostdev is still listed, and more hints come in.
    for _ in 0..3 {
        harness.send_and_settle(Event::Domain {
            domain: "win11".into(),
            change: DomainChange::Other,
        });
    }
    assert_eq!(harness.world.lock().detaches().len(), 1);
    harness.world.lock().finish_detaches();
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Other,
    });
    assert!(harness.world.lock().aliases_in("win11").is_empty());
    assert_eq!(harness.world.lock().detaches().len(), 1);
    harness.stop().unwrap();
}

#[test]
fn an_unplug_the_guest_ignores_is_requested_again_after_the_grace() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.asynchronous_detach = true;
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    harness.send_and_settle(Event::DeviceRemoved {
        syspath: receiver(5).syspath,
        address: Some(receiver(5).address()),
    });
    assert_eq!(harness.next_wake(), Some(pending_detaches::DETACH_GRACE));
    harness.advance(pending_detaches::DETACH_GRACE);
    assert_eq!(harness.world.lock().detaches().len(), 2);
    harness.stop().unwrap();
}

#[test]
fn sighup_rescans_devices_and_heals_missed_events() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    // The plug's udev event was lost (a full socket buffer, say).
    harness.present.lock().unwrap().push(receiver(5));
    harness.send_and_settle(Event::Domain {
        domain: "other".into(),
        change: DomainChange::Other,
    });
    assert!(harness.world.lock().attaches().is_empty());
    harness.send_and_settle(Event::Reload);
    assert_eq!(harness.world.lock().aliases_in("win11").len(), 1);
    harness.stop().unwrap();
}

mod follow;
mod groups;
mod host_drivers;
mod plugs;
mod rules_file;
mod stuck;
