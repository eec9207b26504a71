//! The daemon loop against the real libvirtd when libvirtd stops answering. The daemon
//! talks to libvirtd through a unix-socket relay that the test can pause: a paused relay
//! is, for this client alone, a SIGSTOPped libvirtd (requests and replies sit unread),
//! without stopping the libvirtd other tests on this machine share. While paused, the
//! listing and then the reconnect pass their deadlines, the state file says libvirt
//! does not answer, and the loop still handles events (a rules change); once resumed,
//! the daemon converges through a new connection. The relay passes whole reads, so the
//! libvirt protocol is the real one end to end.

#[path = "support/libvirt_env.rs"]
mod libvirt_env;

use libvirt_env::{wait_for_state, TestDomain};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usbpass::daemon::{Daemon, DaemonOptions};
use usbpass::event::Event;
use usbpass::hypervisor::libvirt::LibvirtConnector;
use usbpass::hypervisor::FailureKind;
use usbpass::rules::Config;
use usbpass::testing::devices::qemu_keyboard;
use usbpass::testing::fake_hypervisor::FixedDevices;

const LIBVIRT_SOCKET: &str = "/run/libvirt/libvirt-sock";

/// Relays every connection made to `socket` to libvirtd's socket, byte for byte, unless
/// paused: then what is read waits, in both directions.
struct Relay {
    socket: PathBuf,
    paused: Arc<AtomicBool>,
}

impl Relay {
    fn start(directory: &Path) -> Relay {
        let socket = directory.join("relay-sock");
        let listener = UnixListener::bind(&socket).expect("bind the relay socket");
        let paused = Arc::new(AtomicBool::new(false));
        let relay_paused = paused.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let upstream = UnixStream::connect(LIBVIRT_SOCKET).expect("reach libvirtd");
                for (from, to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let paused = relay_paused.clone();
                    std::thread::spawn(move || pump(from, to, &paused));
                }
            }
        });
        Relay { socket, paused }
    }

    fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.socket.display())
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

fn pump(mut from: UnixStream, mut to: UnixStream, paused: &AtomicBool) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        while paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
fn a_libvirtd_that_stops_answering_does_not_stop_the_loop_and_is_reconnected() {
    usbpass_require_libvirtd!();
    // RUST_LOG=info shows the daemon's own account of it.
    let _ = env_logger::builder().is_test(true).try_init();
    let domain = TestDomain::plain("stuck");
    domain.start();
    let directory = tempfile::tempdir().unwrap();
    let relay = Relay::start(directory.path());
    let config_path = directory.path().join("usbpass.toml");
    let rules = |extra: &str| {
        format!(
            "uri = \"{}\"\n[[rule]]\nname = \"keyboard\"\nid = \"0627:0001\"\nvm = \"{}\"\n{extra}",
            relay.uri(),
            domain.name
        )
    };
    std::fs::write(&config_path, rules("")).unwrap();
    let state_path = directory.path().join("state.json");
    let (sender, receiver) = usbpass::event::event_channel();
    let deadline = Duration::from_secs(1);
    let mut daemon = Daemon::new(
        LibvirtConnector,
        FixedDevices(Arc::new(Mutex::new(vec![qemu_keyboard()]))),
        Config::load(&config_path).unwrap(),
        DaemonOptions {
            config_path: config_path.clone(),
            state_path: state_path.clone(),
            watchdog: None,
        },
        sender.clone(),
        receiver,
    )
    .with_call_deadline(deadline);
    let loop_thread = std::thread::spawn(move || daemon.run());

    // Through the relay, libvirtd answers: the attach is tried and fails (no USB here).
    wait_for_state(&state_path, "an attach failure", |state| {
        state.libvirt.connected
            && state
                .failures
                .iter()
                .any(|f| f.domain == domain.name && f.kind == FailureKind::DeviceNotFound)
    });

    // libvirtd stops answering this client; SIGHUP makes the daemon read everything.
    relay.pause(true);
    let paused_at = Instant::now();
    sender.send(Event::Reload).unwrap();
    let state = wait_for_state(&state_path, "libvirt shown as not answering", |state| {
        !state.libvirt.connected
            && state
                .libvirt
                .last_error
                .as_deref()
                .is_some_and(|error| error.contains("does not answer"))
    });
    eprintln!(
        "not answering shown after {} ms: {:?}",
        paused_at.elapsed().as_millis(),
        state.libvirt.last_error
    );
    // The new connection's connect hangs too, and is given up on at its deadline.
    let state = wait_for_state(&state_path, "the reconnect given up on", |state| {
        state
            .libvirt
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("no connection within 1000 ms"))
    });
    assert!(!state.libvirt.connected);
    // The loop is not stuck: it takes a rules change while libvirt hangs.
    std::fs::write(
        &config_path,
        rules("[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"lab\"\n"),
    )
    .unwrap();
    sender.send(Event::ConfigChanged).unwrap();
    wait_for_state(&state_path, "the new rules while libvirt hangs", |state| {
        state.rule_count == 2 && !state.libvirt.connected
    });

    // libvirtd answers again: a new connection, the live XML read, the attach tried.
    relay.pause(false);
    let resumed_at = Instant::now();
    let state = wait_for_state(&state_path, "recovery through a new connection", |state| {
        state.libvirt.connected
            && state.running_vms.contains(&domain.name)
            && state.failures.iter().any(|f| f.domain == domain.name)
    });
    eprintln!(
        "connected again {} ms after libvirtd answered",
        resumed_at.elapsed().as_millis()
    );
    assert!(state.vms_not_answering.is_empty(), "{state:#?}");

    sender.send(Event::Terminate).unwrap();
    loop_thread.join().unwrap().expect("the loop ends cleanly");
}
