//! Shared helpers for tests against the real libvirtd (qemu:///system): start it when
//! it does not answer (failing under `CI`, skipping otherwise), and firmware-only test
//! domains that are destroyed and undefined on drop whatever the test did.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const URI: &str = "qemu:///system";

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

/// Whether libvirtd answers, starting it if needed. Panics under CI when it cannot.
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

/// A firmware-only KVM domain (64 MiB, a qemu-xhci controller, no disks, no graphics).
pub struct TestDomain {
    pub name: String,
}

impl TestDomain {
    pub fn define(name: String) -> TestDomain {
        let domain = TestDomain { name };
        domain.remove();
        let xml = format!(
            "<domain type='kvm'><name>{}</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os>\
             <devices><controller type='usb' model='qemu-xhci'/></devices></domain>",
            domain.name
        );
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        file.write_all(xml.as_bytes()).expect("write domain xml");
        virsh_ok(&["define", file.path().to_str().unwrap()]);
        domain
    }

    pub fn start(&self) {
        virsh_ok(&["start", &self.name]);
    }

    pub fn destroy(&self) {
        virsh_ok(&["destroy", &self.name]);
    }

    fn remove(&self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        self.remove();
    }
}
