//! usbpassd as systemd runs it: the sd_notify messages it sends on a real
//! NOTIFY_SOCKET, against libvirt's in-process test driver (`test:///default`, no
//! libvirtd needed). `systemctl status` shows the last STATUS line, so it must follow
//! the daemon's state, not stay at what READY said.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ONE_RULE: &str =
    "uri = \"test:///default\"\n[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"test\"\n";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next message whose text contains `wanted`, or a failure naming what came.
fn wait_for(socket: &UnixDatagram, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
            .unwrap();
        match socket.recv(&mut buffer) {
            Ok(length) => {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                if message.contains(wanted) {
                    return message;
                }
                seen.push(message);
            }
            Err(_) => break,
        }
    }
    panic!("no sd_notify message with {wanted:?}; got {seen:?}");
}

#[test]
fn status_follows_the_daemon_after_ready() {
    let directory = tempfile::tempdir().unwrap();
    let rules = directory.path().join("usbpass.toml");
    std::fs::write(&rules, ONE_RULE).unwrap();
    let socket_path = directory.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_usbpassd"))
            .arg("--config")
            .arg(&rules)
            .arg("--state")
            .arg(directory.path().join("state.json"))
            .env("NOTIFY_SOCKET", &socket_path)
            .env("USBPASS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&socket, "READY=1");
    // The connection comes after READY (it runs off the loop): STATUS must say so.
    wait_for(
        &socket,
        "STATUS=1 rules, 0 devices, 0 passed through, libvirt connected",
    );

    // An edit of the rules file: the new count shows without a restart or a reload.
    let two_rules =
        format!("{ONE_RULE}[[rule]]\nname = \"stick\"\nid = \"0781:5581\"\nvm = \"test\"\n");
    let temporary = directory.path().join("usbpass.toml.new");
    std::fs::write(&temporary, two_rules).unwrap();
    std::fs::rename(&temporary, &rules).unwrap();
    wait_for(&socket, "STATUS=2 rules");
}
