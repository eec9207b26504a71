//! The daemon loop against the real libvirtd and QEMU: lifecycle events reach the loop,
//! a destroyed first-choice VM makes the device fall back to the next one, and attach
//! errors (this machine has no USB, so every attach fails) become status entries that
//! name the device and the VM, without crashing the loop.

#[path = "support/libvirt_env.rs"]
mod libvirt_env;

use libvirt_env::{wait_for_state, TestDomain, URI};
use std::sync::{Arc, Mutex};
use usbpass::daemon::{Daemon, DaemonOptions};
use usbpass::event::Event;
use usbpass::hypervisor::libvirt::LibvirtConnector;
use usbpass::hypervisor::FailureKind;
use usbpass::rules::Config;
use usbpass::testing::devices::qemu_keyboard;
use usbpass::testing::fake_hypervisor::FixedDevices;

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
        FixedDevices(Arc::new(Mutex::new(vec![qemu_keyboard()]))),
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
