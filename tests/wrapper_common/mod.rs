//! Shared helpers for the usbpass-qemu tests: a fake sysfs tree, a recording emulator,
//! and running the wrapper binary the way libvirt does.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::RwLock;

pub const WRAPPER: &str = env!("CARGO_BIN_EXE_usbpass-qemu");

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wrapper-data")
}

/// One USB device in the fake sysfs.
pub struct FakeDevice {
    pub port: &'static str,
    pub bus: u32,
    pub devnum: u32,
    pub vendor: &'static str,
    pub product: &'static str,
    pub serial: Option<&'static str>,
}

pub const RECEIVER: FakeDevice = FakeDevice {
    port: "1-2",
    bus: 1,
    devnum: 5,
    vendor: "046d",
    product: "c52b",
    serial: None,
};
pub const KEYBOARD: FakeDevice = FakeDevice {
    port: "1-3",
    bus: 1,
    devnum: 6,
    vendor: "0627",
    product: "0001",
    serial: Some("KBD 1"),
};

/// Lays the devices out as the kernel does: real folders under `devices/`, links in
/// `bus/usb/devices/` and `dev/char/`.
pub fn fake_sysfs(root: &Path, devices: &[&FakeDevice]) {
    fs::create_dir_all(root.join("bus/usb/devices")).unwrap();
    fs::create_dir_all(root.join("dev/char")).unwrap();
    for device in devices {
        let dir = root
            .join("devices/pci0000:00/0000:00:14.0")
            .join(format!("usb{}", device.bus))
            .join(device.port);
        fs::create_dir_all(&dir).unwrap();
        let write =
            |file: &str, text: &str| fs::write(dir.join(file), format!("{text}\n")).unwrap();
        write("busnum", &device.bus.to_string());
        write("devnum", &device.devnum.to_string());
        write("idVendor", device.vendor);
        write("idProduct", device.product);
        write("bDeviceClass", "00");
        if let Some(serial) = device.serial {
            write("serial", serial);
        }
        symlink(&dir, root.join("bus/usb/devices").join(device.port)).unwrap();
        let minor = (device.bus - 1) * 128 + device.devnum - 1;
        symlink(&dir, root.join(format!("dev/char/189:{minor}"))).unwrap();
    }
}

/// Script writes and forks must not overlap. A child forked by another test thread
/// while a new script is still open for writing keeps that descriptor until it execs,
/// and exec'ing the script in that window fails with ETXTBSY ("Text file busy").
/// Writers take the lock exclusively; spawns share it until the child has exec'd
/// (`Command::spawn` returns only then).
static FORK_GUARD: RwLock<()> = RwLock::new(());

/// Writes an executable script with no child being forked meanwhile.
pub fn write_executable(path: &Path, text: &str) {
    let _guard = FORK_GUARD
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// `Command::spawn`, never while a script is being written.
pub fn spawn(command: &mut Command) -> Child {
    let _guard = FORK_GUARD
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    command.spawn().unwrap()
}

/// `Command::output`, never forking while a script is being written.
pub fn run_output(command: &mut Command) -> Output {
    // As `Command::output` does: no stdin, both outputs captured.
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn(command).wait_with_output().unwrap()
}

/// A stand-in emulator that writes its argv, NUL-separated, to `out` and exits 0.
pub fn recording_emulator(dir: &Path, out: &Path) -> PathBuf {
    let path = dir.join("recorder");
    write_executable(
        &path,
        &format!(
            "#!/bin/sh\nprintf '%s\\0' \"$0\" \"$@\" > '{}'\n",
            out.display()
        ),
    );
    path
}

pub fn read_argv(path: &Path) -> Vec<OsString> {
    let bytes = fs::read(path).unwrap();
    let mut words: Vec<OsString> = bytes
        .split(|&b| b == 0)
        .map(|w| OsString::from_vec(w.to_vec()))
        .collect();
    // The file ends with a NUL, which leaves one empty word at the end.
    assert_eq!(words.pop(), Some(OsString::new()));
    words
}

/// Runs the wrapper with a clean environment plus `env`, as libvirt would (libvirt
/// builds QEMU's environment from scratch).
pub fn run_wrapper(argv: &[OsString], env: &[(&str, OsString)]) -> Output {
    let mut command = Command::new(WRAPPER);
    command.args(&argv[1..]);
    command.env_clear();
    command.env("PATH", "/usr/bin:/bin");
    command.env("USBPASS_WRAPPER_CONFIG", "/nonexistent/usbpass-qemu.conf");
    command.env("USBPASS_CONFIG", "/nonexistent/usbpass.toml");
    for (key, value) in env {
        command.env(key, value);
    }
    run_output(&mut command)
}

/// True when `CI` is set: tests whose prerequisite is missing must fail, not skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Skips (returns false) or, under CI, fails with the reason.
pub fn require(condition: bool, reason: &str) -> bool {
    if condition {
        return true;
    }
    if in_ci() {
        panic!("prerequisite missing under CI: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}
