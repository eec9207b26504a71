//! Shared helpers for tests against the real libvirtd (qemu:///system): virsh, starting
//! libvirtd when it does not answer (failing under `CI`, skipping otherwise), and
//! firmware-only test domains that are destroyed and undefined on drop whatever the
//! test did; this process's client connections as libvirtd's admin side lists them,
//! and a bounded wait. Included with `#[path = "support/libvirt_env.rs"] mod libvirt_env;`.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const URI: &str = "qemu:///system";

/// How long `wait_until` waits for something libvirt does in well under a second
/// here: only a deadline for declaring failure, never a measurement.
const WAIT_DEADLINE: Duration = Duration::from_secs(30);

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

pub fn virsh_ok(args: &[&str]) -> String {
    let output = virsh(args);
    assert!(
        output.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether libvirtd answers, starting it if needed. Fails under CI when it cannot.
pub fn libvirtd_ready() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        if virsh(&["version"]).status.success() {
            return Ok(());
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/start-libvirtd");
        let started = Command::new(script)
            .output()
            .map_err(|error| format!("cannot run {script}: {error}"))?;
        if virsh(&["version"]).status.success() {
            return Ok(());
        }
        Err(format!(
            "libvirtd at {URI} does not answer and {script} could not start it: {}",
            String::from_utf8_lossy(&started.stderr).trim()
        ))
    });
    match ready {
        Ok(()) => true,
        Err(reason) if std::env::var_os("CI").is_some() => panic!("CI is set: {reason}"),
        Err(reason) => {
            eprintln!("skipping: {reason}");
            false
        }
    }
}

#[macro_export]
macro_rules! usbpass_require_libvirtd {
    () => {
        if !libvirt_env::libvirtd_ready() {
            return;
        }
    };
}

/// A firmware-only domain, destroyed and undefined on drop, whatever the test did.
pub struct TestDomain {
    pub name: String,
}

impl TestDomain {
    /// `top` goes after `<name>`, `controller` into the xHCI controller's attributes,
    /// `devices` after the controller.
    pub fn define(tag: &str, top: &str, controller: &str, devices: &str) -> TestDomain {
        let domain = TestDomain {
            name: format!("usbpass-test-lv-{tag}-{}", std::process::id()),
        };
        domain.remove();
        let xml = format!(
            "<domain type='kvm'>
  <name>{}</name>
  {top}
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <controller type='usb' model='qemu-xhci'{controller}/>
    {devices}
  </devices>
</domain>",
            domain.name
        );
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        file.write_all(xml.as_bytes()).expect("write domain xml");
        virsh_ok(&["define", file.path().to_str().unwrap()]);
        domain
    }

    pub fn plain(tag: &str) -> TestDomain {
        TestDomain::define(tag, "", "", "")
    }

    pub fn start(&self) {
        virsh_ok(&["start", &self.name]);
    }

    pub fn destroy(&self) {
        virsh_ok(&["destroy", &self.name]);
    }

    fn remove(&self) {
        // Either may fail because the domain is not running or not defined: fine.
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Client ids of this process's connections to libvirtd, from libvirtd's admin side.
pub fn our_clients() -> Option<Vec<String>> {
    let list = Command::new("virt-admin")
        .args(["srv-clients-list", "libvirtd"])
        .output()
        .ok()?;
    if !list.status.success() {
        return None;
    }
    let pid = format!("unix_process_id: {}", std::process::id());
    let mut ours = Vec::new();
    for id in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
    {
        let info = Command::new("virt-admin")
            .args(["client-info", "libvirtd", id])
            .output()
            .ok()?;
        let info = String::from_utf8_lossy(&info.stdout);
        if info
            .lines()
            .any(|line| line.replace(' ', "") == pid.replace(' ', ""))
        {
            ours.push(id.to_string());
        }
    }
    Some(ours)
}

pub fn require_virt_admin() -> bool {
    if our_clients().is_some() {
        return true;
    }
    let reason = "virt-admin cannot list libvirtd's clients";
    if std::env::var_os("CI").is_some() {
        panic!("CI is set: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

pub fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT_DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {WAIT_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's state file at `path`, once `condition` holds (at most 60 s).
pub fn wait_for_state(
    path: &std::path::Path,
    what: &str,
    condition: impl Fn(&usbpass::daemon::state::DaemonState) -> bool,
) -> usbpass::daemon::state::DaemonState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(state) = usbpass::daemon::state::DaemonState::read(path) {
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
