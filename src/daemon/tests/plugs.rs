//! The loop's tests of plugs and vm starts: exact instances, the copy of the live XML
//! and a plug announced before its strings are read.

use super::*;
use crate::event::DeviceDescription;

#[test]
fn a_late_removal_of_an_earlier_plug_leaves_the_present_one_alone() {
    let harness = Harness::start(
        RULES,
        FakeWorld::with_domains(&["win11"]),
        vec![receiver(5)],
    );
    // Replugged on the same port: the same sysfs path, a new device number.
    harness.send_and_settle(Event::DeviceRemoved {
        syspath: receiver(5).syspath,
        address: Some(receiver(5).address()),
    });
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(6)),
        received: Instant::now(),
    });
    assert_eq!(
        harness.world.lock().aliases_in("win11"),
        ["ua-usbpass-1-6-046d-c52b"]
    );
    let calls = harness.world.lock().calls.len();
    // A second word of the first plug's removal, late (udev running behind delivered
    // such removals): the device plugged there now stays where it is.
    harness.send_and_settle(Event::DeviceRemoved {
        syspath: receiver(5).syspath,
        address: Some(receiver(5).address()),
    });
    let world = harness.world.lock();
    assert_eq!(world.aliases_in("win11"), ["ua-usbpass-1-6-046d-c52b"]);
    assert_eq!(world.calls.len(), calls, "{:#?}", world.calls);
    drop(world);
    assert_eq!(harness.state().devices.len(), 1);
    harness.stop().unwrap();
}

#[test]
fn a_plug_and_an_unplug_cost_one_call_each_and_no_listing() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    let before = harness.world.lock().calls.len();
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    harness.send_and_settle(Event::DeviceRemoved {
        syspath: receiver(5).syspath,
        address: Some(receiver(5).address()),
    });
    let world = harness.world.lock();
    let alias = "ua-usbpass-1-5-046d-c52b".to_string();
    assert_eq!(
        world.calls[before..],
        [
            Call::Attach {
                domain: "win11".into(),
                alias: alias.clone(),
            },
            Call::Detach {
                domain: "win11".into(),
                alias,
            },
        ]
    );
    assert!(world.aliases_in("win11").is_empty());
    drop(world);
    harness.stop().unwrap();
}

#[test]
fn a_device_someone_else_added_is_read_from_the_live_xml() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    // Someone attached the receiver by hand (virsh attach-device) before it was plugged.
    harness.world.lock().domains[0]
        .hostdevs
        .push(crate::hypervisor::UsbHostdev {
            alias: Some("hostdev0".into()),
            id: Some(receiver(5).id()),
            address: Some(receiver(5).address()),
        });
    let lists = harness.count(|call| *call == Call::ListDomains);
    harness.send_and_settle(Event::DomainDeviceAdded {
        domain: "win11".into(),
        alias: "hostdev0".into(),
    });
    assert_eq!(harness.count(|call| *call == Call::ListDomains), lists + 1);
    // The plug finds the device taken and leaves it there.
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(receiver(5)),
        received: Instant::now(),
    });
    assert!(harness.world.lock().attaches().is_empty());
    harness.stop().unwrap();
}

#[test]
fn no_attach_under_the_alias_of_a_detach_still_under_way() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.asynchronous_detach = true;
    let harness = Harness::start(RULES, world, vec![receiver(5)]);
    harness.wait_until("the attach", |w| w.aliases_in("win11").len() == 1);
    let path = harness.directory.path().join("usbpass.toml");
    // The rule goes away (a detach QEMU has not finished yet) and comes back.
    std::fs::write(
        &path,
        "[[rule]]\nname = \"other\"\nid = \"1234:5678\"\nvm = \"win11\"\n",
    )
    .unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    assert_eq!(harness.world.lock().detaches().len(), 1);
    std::fs::write(&path, RULES).unwrap();
    harness.send_and_settle(Event::ConfigChanged);
    // libvirt would refuse a second hostdev with that alias while the first is there.
    assert_eq!(harness.world.lock().attaches().len(), 1);
    harness.world.lock().finish_detaches();
    harness.settle();
    let world = harness.world.lock();
    assert_eq!(world.attaches().len(), 2);
    assert_eq!(world.aliases_in("win11"), ["ua-usbpass-1-5-046d-c52b"]);
    drop(world);
    harness.stop().unwrap();
}

#[test]
fn a_vm_that_starts_gets_its_device_before_anything_is_read() {
    let harness = Harness::start(RULES, FakeWorld::with_domains(&[]), vec![receiver(5)]);
    let before = harness.world.lock().calls.len();
    harness.world.lock().start_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Started,
    });
    let world = harness.world.lock();
    // The attach first; the listing that checks what the new domain's XML holds after.
    assert_eq!(
        world.calls[before..],
        [
            Call::Attach {
                domain: "win11".into(),
                alias: "ua-usbpass-1-5-046d-c52b".into(),
            },
            Call::ListDomains,
        ]
    );
    assert_eq!(world.aliases_in("win11"), ["ua-usbpass-1-5-046d-c52b"]);
    drop(world);
    // A vm that stops holds nothing: the device falls back without a listing.
    harness.world.lock().start_domain("fedora");
    harness.send_and_settle(Event::Domain {
        domain: "fedora".into(),
        change: DomainChange::Started,
    });
    let before = harness.world.lock().calls.len();
    harness.world.lock().stop_domain("win11");
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Stopped,
    });
    let world = harness.world.lock();
    assert_eq!(
        world.calls[before..],
        [Call::Attach {
            domain: "fedora".into(),
            alias: "ua-usbpass-1-5-046d-c52b".into(),
        }]
    );
    drop(world);
    harness.stop().unwrap();
}

#[test]
fn a_plug_whose_serial_a_rule_needs_waits_for_its_strings_and_keeps_them() {
    const SERIAL_RULES: &str = r#"
[[rule]]
name = "stick-a"
id = "0403:6001"
serial = "A"
vm = "win11"
"#;
    let harness = Harness::start(SERIAL_RULES, FakeWorld::with_domains(&["win11"]), vec![]);
    let mut stick = device(1, 9, 0x0403, 0x6001, "1-3");
    stick.strings_pending = true;
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(stick.clone()),
        received: Instant::now(),
    });
    assert!(harness.world.lock().attaches().is_empty());
    harness.send_and_settle(Event::DeviceDescribed(Box::new(DeviceDescription {
        syspath: stick.syspath.clone(),
        address: stick.address(),
        serial: Some("A".into()),
        manufacturer: None,
        product: None,
        vendor_from_database: None,
        model_from_database: None,
    })));
    assert_eq!(
        harness.world.lock().aliases_in("win11"),
        ["ua-usbpass-1-9-0403-6001"]
    );
    // The hardware database's names follow in a second description.
    harness.send_and_settle(Event::DeviceDescribed(Box::new(DeviceDescription {
        syspath: stick.syspath.clone(),
        address: stick.address(),
        serial: Some("A".into()),
        manufacturer: None,
        product: None,
        vendor_from_database: Some("Future Technology Devices International, Ltd".into()),
        model_from_database: Some("FT232 Serial (UART) IC".into()),
    })));
    // The kernel's `bind` of the same plug, announced without strings or names again:
    // what was read before still counts, so nothing moves.
    let calls = harness.world.lock().calls.len();
    harness.send_and_settle(Event::DeviceAdded {
        device: Box::new(stick),
        received: Instant::now(),
    });
    assert_eq!(harness.world.lock().calls.len(), calls);
    let state = harness.state();
    assert_eq!(state.devices[0].device.serial.as_deref(), Some("A"));
    assert_eq!(
        state.devices[0].device.model_from_database.as_deref(),
        Some("FT232 Serial (UART) IC")
    );
    harness.stop().unwrap();
}

#[test]
fn owned_hostdevs_in_definitions_are_removed_at_start_and_after_a_define() {
    let mut world = FakeWorld::with_domains(&["win11"]);
    world.definitions.insert(
        "win11".into(),
        vec!["ua-usbpass-1-5-046d-c52b".into(), "ua-mine".into()],
    );
    world
        .definitions
        .insert("lab".into(), vec!["hostdev0".into()]);
    let harness = Harness::start(RULES, world, vec![]);
    let removals = |harness: &Harness| {
        harness
            .world
            .lock()
            .calls
            .iter()
            .filter(|call| matches!(call, Call::RemoveFromDefinition { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    // The chore runs on a thread of its own.
    harness.wait_until("the removal from win11's definition", |world| {
        world.definitions["win11"] == ["ua-mine"]
    });
    assert_eq!(
        removals(&harness),
        [Call::RemoveFromDefinition {
            domain: "win11".into(),
            alias: "ua-usbpass-1-5-046d-c52b".into()
        }]
    );
    assert_eq!(harness.world.lock().definitions["win11"], ["ua-mine"]);
    assert_eq!(harness.world.lock().definitions["lab"], ["hostdev0"]);
    // Nothing to do on unrelated events.
    harness.send_and_settle(Event::Domain {
        domain: "win11".into(),
        change: DomainChange::Other,
    });
    assert_eq!(removals(&harness).len(), 1);
    // `virsh define` from a dump taken while a device was attached.
    harness
        .world
        .lock()
        .definitions
        .insert("lab".into(), vec!["ua-usbpass-1-9-0403-6001".into()]);
    harness.send_and_settle(Event::Domain {
        domain: "lab".into(),
        change: DomainChange::Defined,
    });
    harness.wait_until("the removal from lab's definition", |world| {
        world.definitions["lab"].is_empty()
    });
    assert_eq!(removals(&harness).len(), 2);
    harness.stop().unwrap();
}
