//! The daemon's reload against a device source that reads libvirt's node devices:
//! rules it cannot serve, and a file that would need another source, are refused and
//! the previous rules stay in force. The daemon runs on its own thread against the fake
//! hypervisor; only the source's `accepts` is the real one (`host::select`).

use std::path::Path;
use std::time::{Duration, Instant};
use usbpass::daemon::state::DaemonState;
use usbpass::daemon::{Daemon, DaemonOptions};
use usbpass::event::Event;
use usbpass::host::select::{self, SourceKind, SourceRefusal};
use usbpass::host::{DeviceSource, HostError};
use usbpass::model::UsbDevice;
use usbpass::rules::Config;
use usbpass::testing::devices::device;
use usbpass::testing::fake_hypervisor::{FakeConnector, FakeWorld, FixedDevices, SharedWorld};

const DEADLINE: Duration = Duration::from_secs(30);
const URI: &str = "qemu+ssh://other/system";

/// Fixed devices that accept rules as libvirt's node devices at `URI` do.
struct NodeDevicesAtUri(FixedDevices);

impl DeviceSource for NodeDevicesAtUri {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError> {
        self.0.enumerate()
    }

    fn accepts(&self, config: &Config) -> Result<(), SourceRefusal> {
        select::accepts(config, SourceKind::Libvirt, URI)
    }
}

fn rules(vm: &str, extra: &str) -> String {
    format!("uri = \"{URI}\"\n{extra}\n[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"{vm}\"\n")
}

fn wait_for_state(path: &Path, what: &str, condition: impl Fn(&DaemonState) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(state) = DaemonState::read(path) {
            if condition(&state) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no {what} within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_world(world: &SharedWorld, what: &str, condition: impl Fn(&FakeWorld) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition(&world.lock()) {
        assert!(Instant::now() < deadline, "no {what} within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reload_the_node_device_source_cannot_serve_keeps_the_previous_rules() {
    let directory = tempfile::tempdir().unwrap();
    let config_path = directory.path().join("usbpass.toml");
    let state_path = directory.path().join("state.json");
    std::fs::write(&config_path, rules("win11", "")).unwrap();
    let config = Config::load(&config_path).unwrap();
    let world = SharedWorld::new(FakeWorld::with_domains(&["win11", "lab"]));
    let present = std::sync::Arc::new(std::sync::Mutex::new(vec![device(
        1, 5, 0x046d, 0xc52b, "1-2",
    )]));
    let (sender, receiver) = usbpass::event::event_channel();
    let mut daemon = Daemon::new(
        FakeConnector {
            world: world.clone(),
        },
        NodeDevicesAtUri(FixedDevices(present)),
        config,
        DaemonOptions {
            config_path: config_path.clone(),
            state_path: state_path.clone(),
            watchdog: None,
        },
        sender.clone(),
        receiver,
    );
    let thread = std::thread::spawn(move || daemon.run());
    wait_for_world(&world, "the first attach", |w| {
        w.aliases_in("win11").len() == 1
    });

    // A serial rule: libvirt's node devices have no serial.
    std::fs::write(
        &config_path,
        rules(
            "lab",
            "\n[[rule]]\nname = \"zigbee\"\nserial = \"Z1\"\nvm = \"ha\"\n",
        ),
    )
    .unwrap();
    sender.send(Event::ConfigChanged).unwrap();
    let expected = format!(
        "{}:3: rule \"zigbee\" matches by serial, which libvirt's node devices do not \
         report for {URI}",
        config_path.display()
    );
    wait_for_state(&state_path, "the serial refusal", |state| {
        state.config_error.as_deref() == Some(expected.as_str())
    });
    // The previous rules stay: the receiver is still in win11, not moved to lab.
    assert_eq!(world.lock().aliases_in("win11").len(), 1);
    assert!(world.lock().aliases_in("lab").is_empty());

    // A local uri would need this machine's udev: refused too, not half-switched.
    std::fs::write(
        &config_path,
        "[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"lab\"\n",
    )
    .unwrap();
    sender.send(Event::ConfigChanged).unwrap();
    wait_for_state(&state_path, "the source change refusal", |state| {
        state
            .config_error
            .as_deref()
            .is_some_and(|error| error.ends_with("restart usbpass to switch"))
    });
    assert_eq!(world.lock().aliases_in("win11").len(), 1);

    // Rules it can serve are taken: the receiver moves to lab.
    std::fs::write(&config_path, rules("lab", "")).unwrap();
    sender.send(Event::ConfigChanged).unwrap();
    wait_for_state(&state_path, "the accepted reload", |state| {
        state.config_error.is_none()
    });
    wait_for_world(&world, "the move to lab", |w| {
        w.aliases_in("lab").len() == 1 && w.aliases_in("win11").is_empty()
    });

    sender.send(Event::Terminate).unwrap();
    thread.join().unwrap().unwrap();
}
