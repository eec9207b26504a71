//! The loop's tests of `keep_off_host`: the order of authorization and libvirt calls,
//! the devices no rule keeps off, the hubs' default, and a gate that fails.

use super::*;
use crate::model::access::HostAccess;
use crate::testing::fake_gate::GateCall;

const KEPT_OFF: &str = r#"
[[rule]]
name = "stick"
id = "46f4:0001"
vm = "lab"
keep_off_host = true

[[rule]]
name = "receiver"
id = "046d:c52b"
vm = "lab"
"#;

fn stick(devnum: u16) -> UsbDevice {
    device(2, devnum, 0x46f4, 0x0001, "2-1")
}

fn stray() -> UsbDevice {
    device(1, 9, 0x1234, 0x5678, "1-4")
}

#[test]
fn a_kept_off_device_waits_off_and_is_authorized_just_before_its_attach() {
    // The VM is off: the stick's interfaces stay unauthorized, the stray is the host's.
    let (harness, gate) = Harness::start_gated(KEPT_OFF, FakeWorld::with_domains(&[]), vec![]);
    assert_eq!(
        gate.lock().unwrap().calls[0].0,
        GateCall::HubDefault { off: true }
    );
    harness.plug(stick(3));
    harness.plug(stray());
    {
        let log = gate.lock().unwrap();
        assert_eq!(log.access[&stick(3).address()], HostAccess::Off);
        assert_eq!(log.access[&stray().address()], HostAccess::Host);
    }
    assert!(harness.world.lock().attaches().is_empty());

    harness.world.lock().start_domain("lab");
    harness.send_and_settle(Event::Domain {
        domain: "lab".into(),
        change: DomainChange::Started,
    });
    let world = harness.world.lock();
    let attach = world
        .calls
        .iter()
        .position(|call| matches!(call, Call::Attach { .. }))
        .expect("the stick is attached once the vm runs");
    drop(world);
    let log = gate.lock().unwrap();
    let authorized = log
        .applied_before_call(stick(3).address(), HostAccess::Vm)
        .expect("its interfaces are authorized for the vm");
    assert!(
        authorized <= attach,
        "authorized after the attach: {:#?}",
        log.calls
    );
    assert_eq!(log.access[&stick(3).address()], HostAccess::Vm);
    // The stray was never touched again: what the kernel did at plug stands.
    assert_eq!(log.applied(stray().address()), [HostAccess::Host]);
    drop(log);
    harness.stop().unwrap();
    assert_eq!(
        gate.lock().unwrap().calls.last().unwrap().0,
        GateCall::HubDefault { off: false },
        "the hubs' default comes back on the way out"
    );
}

#[test]
fn a_kept_off_device_is_deauthorized_before_its_detach_and_when_its_vm_stops() {
    let (harness, gate) =
        Harness::start_gated(KEPT_OFF, FakeWorld::with_domains(&["lab"]), vec![stick(3)]);
    harness.wait_until("the attach", |w| w.aliases_in("lab").len() == 1);
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Vm
    );

    // The rule goes: the stick comes back to the host, deauthorized before the detach
    // so that QEMU's reattach of kernel drivers finds nothing it may bind...
    let directory = harness.directory.path().to_path_buf();
    let moved = KEPT_OFF.replace(
        "vm = \"lab\"\nkeep_off_host",
        "vm = \"other\"\nkeep_off_host",
    );
    std::fs::write(directory.join("usbpass.toml"), moved).unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    let world = harness.world.lock();
    let detach = world
        .calls
        .iter()
        .position(|call| matches!(call, Call::Detach { .. }))
        .expect("detached from lab");
    drop(world);
    let off = gate
        .lock()
        .unwrap()
        .applied_before_call(stick(3).address(), HostAccess::Off)
        .expect("deauthorized");
    assert!(off <= detach);

    // ...and a stopped VM's device is deauthorized at once (QEMU has let it go).
    std::fs::write(directory.join("usbpass.toml"), KEPT_OFF).unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    harness.wait_until("back in lab", |w| w.aliases_in("lab").len() == 1);
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Vm
    );
    harness.world.lock().stop_domain("lab");
    harness.send_and_settle(Event::Domain {
        domain: "lab".into(),
        change: DomainChange::Stopped,
    });
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Off
    );
    harness.stop().unwrap();
}

/// The kernel's word that `driver` took the first interface of `device`.
fn bound(device: &UsbDevice, driver: &str) -> Event {
    Event::InterfaceDriverBound {
        interface_syspath: format!("{}/{}:1.0", device.syspath, device.port_path),
        driver: driver.into(),
    }
}

#[test]
fn a_host_driver_that_takes_a_vms_device_is_unbound_at_once() {
    let (harness, gate) = Harness::start_gated(
        KEPT_OFF,
        FakeWorld::with_domains(&["lab"]),
        vec![stick(3), stray()],
    );
    harness.wait_until("the attach", |w| w.aliases_in("lab").len() == 1);
    let before = gate.lock().unwrap().applied(stick(3).address());
    assert_eq!(before.last(), Some(&HostAccess::Vm));

    // QEMU let go (its VM is stopping; libvirt has not said so yet) and the kernel
    // bound usb-storage: unbound by deauthorizing, then authorized again, unprobed.
    harness.send_and_settle(bound(&stick(3), "usb-storage"));
    let log = gate.lock().unwrap();
    assert_eq!(
        log.applied(stick(3).address())[before.len()..],
        [HostAccess::Off, HostAccess::Vm]
    );
    assert_eq!(log.access[&stick(3).address()], HostAccess::Vm);
    let calls = log.calls.len();
    drop(log);

    // The host's own devices, usbfs claims and interfaces of unknown devices are left
    // as the kernel has them.
    harness.send_and_settle(bound(&stray(), "usbhid"));
    harness.send_and_settle(bound(&stick(3), "usbfs"));
    harness.send_and_settle(bound(&device(3, 4, 0x46f4, 0x0001, "3-2"), "usb-storage"));
    let log = gate.lock().unwrap();
    assert_eq!(log.calls.len(), calls, "{:#?}", &log.calls[calls..]);
    drop(log);
    assert_eq!(harness.world.lock().aliases_in("lab").len(), 1);
    harness.stop().unwrap();
}

#[test]
fn without_the_setting_the_gate_is_never_called() {
    let (harness, gate) = Harness::start_gated(
        RULES,
        FakeWorld::with_domains(&["win11"]),
        vec![receiver(5), stray()],
    );
    harness.plug(stick(3));
    assert!(
        gate.lock().unwrap().calls.is_empty(),
        "{:#?}",
        gate.lock().unwrap().calls
    );
    harness.stop().unwrap();
    assert!(gate.lock().unwrap().calls.is_empty());
}

#[test]
fn when_the_setting_goes_the_hubs_come_back_and_every_device_is_the_hosts() {
    let (harness, gate) = Harness::start_gated(
        KEPT_OFF,
        FakeWorld::with_domains(&[]),
        vec![stick(3), stray()],
    );
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Off
    );
    std::fs::write(harness.directory.path().join("usbpass.toml"), RULES).unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    let log = gate.lock().unwrap();
    assert!(!log.hubs_off);
    assert_eq!(log.access[&stick(3).address()], HostAccess::Host);
    let count = log.calls.len();
    drop(log);
    // Settled: nothing more to undo, so no more calls.
    harness.plug(device(1, 11, 0x0627, 0x0001, "1-1"));
    assert_eq!(gate.lock().unwrap().calls.len(), count);
    harness.stop().unwrap();
}

#[test]
fn a_failing_gate_is_tried_again_at_the_next_word_and_the_attach_still_goes() {
    let world = SharedWorld::new(FakeWorld::with_domains(&["lab"]));
    let gate = crate::testing::fake_gate::RecordingGate::new(Some(world.clone()));
    let log = gate.log.clone();
    log.lock().unwrap().failing.insert(stick(3).address());
    let harness = Harness::start_shared(KEPT_OFF, world, vec![], None, Some(Box::new(gate)));
    harness.plug(stick(3));
    // The write failed (the warning names the interface and path): the loop carries on.
    harness.wait_until("the attach", |w| w.aliases_in("lab").len() == 1);
    assert!(!log.lock().unwrap().access.contains_key(&stick(3).address()));
    log.lock().unwrap().failing.clear();
    // The kernel's bind after the add: applied again, now with success.
    harness.plug(stick(3));
    assert_eq!(
        log.lock().unwrap().access[&stick(3).address()],
        HostAccess::Vm
    );
    harness.stop().unwrap();
}

#[test]
fn a_stopped_vms_device_is_turned_off_before_the_vms_are_read_again() {
    let (harness, gate) =
        Harness::start_gated(KEPT_OFF, FakeWorld::with_domains(&["lab"]), vec![stick(3)]);
    harness.wait_until("the attach", |w| w.aliases_in("lab").len() == 1);
    // libvirt's listing hangs: what the vms hold now is not known...
    harness.world.lock().block_listing();
    harness.send_and_settle(Event::Domain {
        domain: "lab".into(),
        change: DomainChange::Other,
    });
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Vm
    );
    // ...but a vm that stopped gave its devices back: off at once.
    harness.world.lock().stop_domain("lab");
    harness.send_and_settle(Event::Domain {
        domain: "lab".into(),
        change: DomainChange::Stopped,
    });
    assert_eq!(harness.world.lock().parked(), 1, "the listing still hangs");
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Off
    );
    harness.world.release_listing();
    harness.settle();
    assert_eq!(
        gate.lock().unwrap().access[&stick(3).address()],
        HostAccess::Off
    );
    harness.stop().unwrap();
}
