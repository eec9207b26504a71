//! The daemon loop against the real libvirtd and QEMU: lifecycle events reach the loop,
//! a destroyed first-choice VM makes the device fall back to the next one, and attach
//! errors (this machine has no USB, so every attach fails) become status entries that
//! name the device and the VM, without crashing the loop.

#[path = "support/libvirt_env.rs"]
mod libvirt_env;

use libvirt_env::{TestDomain, URI};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usbpass::daemon::state::DaemonState;
use usbpass::daemon::{Daemon, DaemonOptions};
use usbpass::event::Event;
use usbpass::hypervisor::libvirt::LibvirtConnector;
use usbpass::hypervisor::FailureKind;
use usbpass::model::UsbDevice;
use usbpass::rules::Config;
use usbpass::testing::fake_hypervisor::FixedDevices;

/// QEMU's emulated keyboard, as udev would describe it on a host that had one.
fn keyboard() -> UsbDevice {
    UsbDevice {
        syspath: "/sys/devices/pci0000:00/0000:00:02.0/usb1/1-1".into(),
        bus: 1,
        devnum: 2,
        vendor_id: 0x0627,
        product_id: 0x0001,
        serial: Some("42".into()),
        port_path: "1-1".into(),
        parent_hub: Some("usb1".into()),
        device_class: 0,
        interface_classes: Vec::new(),
        manufacturer: Some("QEMU".into()),
        product: Some("QEMU USB Keyboard".into()),
        vendor_from_database: None,
        model_from_database: None,
        strings_pending: false,
    }
}

fn wait_for_state(
    path: &std::path::Path,
    what: &str,
    condition: impl Fn(&DaemonState) -> bool,
) -> DaemonState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(state) = DaemonState::read(path) {
            if condition(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {state:#?}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: no state file"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fallback_on_destroy_and_attach_errors_as_status_entries() {
    usbpass_require_libvirtd!();
    let first = TestDomain::plain("daemon-first");
    let second = TestDomain::plain("daemon-second");
    first.start();
    second.start();

    let directory = tempfile::tempdir().unwrap();
    let config_path = directory.path().join("usbpass.toml");
    std::fs::write(
        &config_path,
        format!(
            "uri = \"{URI}\"\n[[rule]]\nname = \"keyboard\"\nid = \"0627:0001\"\nvm = [\"{}\", \"{}\"]\n",
            first.name, second.name
        ),
    )
    .unwrap();
    let state_path = directory.path().join("state.json");
    let (sender, receiver) = usbpass::event::event_channel();
    let mut daemon = Daemon::new(
        LibvirtConnector,
        FixedDevices(Arc::new(Mutex::new(vec![keyboard()]))),
        Config::load(&config_path).unwrap(),
        DaemonOptions {
            config_path,
            state_path: state_path.clone(),
            watchdog: None,
        },
        sender.clone(),
        receiver,
    );
    let loop_thread = std::thread::spawn(move || daemon.run());

    // The first choice runs: the attach is tried there and fails (no USB here).
    let state = wait_for_state(&state_path, "an attach failure on the first vm", |state| {
        state.failures.iter().any(|f| f.domain == first.name)
    });
    let failure = &state.failures[0];
    assert_eq!(failure.action, "attach");
    assert_eq!(failure.kind, FailureKind::DeviceNotFound);
    assert!(failure.message.contains(&first.name), "{}", failure.message);
    assert!(failure.message.contains("0627:0001"), "{}", failure.message);
    assert!(!failure.message.contains('\n'));
    assert!(state.libvirt.connected);
    assert_eq!(
        state.devices[0].wanted_vm.as_deref(),
        Some(first.name.as_str())
    );

    // Wait until the quick retries are spent: from then on the loop sleeps until an
    // event arrives, so what follows is driven by libvirt's lifecycle event alone.
    wait_for_state(&state_path, "the retries to be spent", |state| {
        state
            .failures
            .iter()
            .any(|f| f.domain == first.name && f.retry_in_ms.is_none())
    });
    // Destroying the first vm makes the device fall back to the second.
    first.destroy();
    let state = wait_for_state(&state_path, "the fallback to the second vm", |state| {
        state.devices[0].wanted_vm.as_deref() == Some(second.name.as_str())
            && state.failures.iter().any(|f| f.domain == second.name)
    });
    assert!(!state.running_vms.contains(&first.name));
    assert!(state.failures.iter().all(|f| f.domain != first.name));

    // Starting the first again brings the wish back to it.
    first.start();
    wait_for_state(&state_path, "the return to the first vm", |state| {
        state.devices[0].wanted_vm.as_deref() == Some(first.name.as_str())
    });

    sender.send(Event::Terminate).unwrap();
    loop_thread.join().unwrap().expect("the loop ends cleanly");
}
