//! The usbpass-qemu binary as a process: it execs in place (same PID, every fd, the
//! environment and the signal state kept), finds the real emulator without ever running
//! itself, behaves exactly like QEMU for libvirt's probes, and links no libvirt or libudev.

mod wrapper_common;

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use wrapper_common::*;

const REAL_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// An emulator that reports what it inherited: its PID, what fd 5 is, its ignored and
/// blocked signals, and its environment.
fn inspecting_emulator(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("inspect");
    // The signal state is read first and with builtins only: dash blocks every signal
    // around each fork, so a child reading /proc/$$/status would see that mask instead.
    write_executable(
        &path,
        "#!/bin/sh\n\
         echo \"pid $$\"\n\
         while IFS= read -r line; do\n\
           case $line in SigIgn:*|SigBlk:*) echo \"$line\";; esac\n\
         done < /proc/$$/status\n\
         echo \"fd5 $(readlink /proc/$$/fd/5)\"\n\
         echo env; tr '\\0' '\\n' < /proc/$$/environ | sort\n",
    );
    path
}

/// Runs `program` with fd 5 open on `fd_target`, SIGPIPE ignored or not, a non-UTF-8
/// environment value, and returns (child pid, stdout).
fn run_inspected(
    program: &Path,
    emulator: &Path,
    fd_target: &Path,
    ignore_sigpipe: bool,
) -> (u32, String) {
    let file = fs::File::open(fd_target).unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("USBPASS_QEMU", emulator)
        .env("USBPASS_WRAPPER_CONFIG", "/nonexistent")
        .env("ODD", OsString::from_vec(b"a b\xff'\"".to_vec()))
        .stdout(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (dup2, signal, sigemptyset, sigaddset,
    // pthread_sigmask) on values computed before the fork or on its own stack.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(raw, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if ignore_sigpipe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            // A known mask with SIGUSR1 blocked: the spawning thread's own mask is
            // whatever the test harness left, so set one the emulator must inherit.
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut mask);
            libc::sigaddset(&mut mask, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = spawn(&mut command);
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    (pid, String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn exec_keeps_pid_fds_environment_and_signal_state() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = inspecting_emulator(dir.path());
    let marker = dir.path().join("monitor-socket-stand-in");
    fs::write(&marker, "").unwrap();
    for ignore_sigpipe in [false, true] {
        let (direct_pid, direct) = run_inspected(&emulator, &emulator, &marker, ignore_sigpipe);
        let (wrapped_pid, wrapped) =
            run_inspected(Path::new(WRAPPER), &emulator, &marker, ignore_sigpipe);
        // Same PID: the wrapper exec'd, it did not spawn a child.
        assert!(
            direct.starts_with(&format!("pid {direct_pid}\n")),
            "{direct}"
        );
        assert!(
            wrapped.starts_with(&format!("pid {wrapped_pid}\n")),
            "{wrapped}"
        );
        // Everything after the PID line is identical: fd 5, signals, environment.
        let rest = |s: &str| s.split_once('\n').unwrap().1.to_string();
        assert_eq!(rest(&direct), rest(&wrapped));
        assert!(wrapped.contains(&format!("fd5 {}", marker.display())));
        assert!(wrapped.contains("ODD=a b"));
        let ignored = wrapped
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
            .unwrap();
        let sigpipe_bit = 1u64 << (libc::SIGPIPE - 1);
        assert_eq!(ignored & sigpipe_bit != 0, ignore_sigpipe, "{wrapped}");
        let blocked = wrapped
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(blocked, 1u64 << (libc::SIGUSR1 - 1), "{wrapped}");
    }
}

fn qemu_present() -> bool {
    require(
        Path::new(REAL_QEMU).exists(),
        "no /usr/bin/qemu-system-x86_64",
    )
}

fn run(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("USBPASS_WRAPPER_CONFIG", "/nonexistent")
        .env("LC_ALL", "C");
    for (key, value) in env {
        command.env(key, value);
    }
    run_output(&mut command)
}

#[test]
fn probes_behave_exactly_like_qemu() {
    if !qemu_present() {
        return;
    }
    for args in [
        &["-help"][..],
        &["-version"],
        &["-device", "usb-host,help"],
        &["-machine", "help"],
        &["-no-such-option"],
    ] {
        let direct = run(Path::new(REAL_QEMU), args, &[]);
        let wrapped = run(Path::new(WRAPPER), args, &[]);
        assert_eq!(direct.status.code(), wrapped.status.code(), "{args:?}");
        assert_eq!(direct.stdout, wrapped.stdout, "{args:?}");
        assert_eq!(direct.stderr, wrapped.stderr, "{args:?}");
    }
}

#[test]
fn finds_the_real_emulator_and_never_itself() {
    if !qemu_present() {
        return;
    }
    let version = run(Path::new(REAL_QEMU), &["-version"], &[]).stdout;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let link = bin.join("qemu-system-x86_64");
    symlink(WRAPPER, &link).unwrap();

    // argv[0] named like the real binary: found on PATH past the wrapper's own entry.
    let mut command = Command::new(&link);
    command
        .arg("-version")
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("USBPASS_WRAPPER_CONFIG", "/nonexistent");
    let output = run_output(&mut command);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, version);
    assert!(output.stderr.is_empty());

    // A binary of that name before the wrapper's entry never runs, even when nothing
    // comes after the wrapper: the default (the real QEMU) does.
    let early = dir.path().join("early");
    fs::create_dir(&early).unwrap();
    let early_out = dir.path().join("early-argv");
    let early_recorder = recording_emulator(&early, &early_out);
    fs::rename(&early_recorder, early.join("qemu-system-x86_64")).unwrap();
    let mut command = Command::new(&link);
    command
        .arg("-version")
        .env_clear()
        .env("PATH", format!("{}:{}", early.display(), bin.display()))
        .env("USBPASS_WRAPPER_CONFIG", "/nonexistent");
    let output = run_output(&mut command);
    assert!(output.status.success(), "{output:?}");
    assert!(!early_out.exists(), "the emulator before the wrapper ran");
    assert_eq!(output.stdout, version);
    assert!(output.stderr.is_empty(), "{output:?}");

    // USBPASS_QEMU naming the wrapper (through a symlink) is refused with a warning,
    // and the search goes on instead of looping.
    let output = run(
        Path::new(WRAPPER),
        &["-version"],
        &[("USBPASS_QEMU", &link)],
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, version);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is usbpass-qemu itself"), "{stderr}");

    // The settings file's emulator line is used when the environment says nothing.
    let out = dir.path().join("argv");
    let recorder = recording_emulator(dir.path(), &out);
    let settings = dir.path().join("usbpass-qemu.conf");
    fs::write(&settings, format!("emulator = {}\n", recorder.display())).unwrap();
    let output = run(
        Path::new(WRAPPER),
        &["-S", "a b"],
        &[("USBPASS_WRAPPER_CONFIG", &settings)],
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        read_argv(&out),
        vec![OsString::from(&recorder), "-S".into(), "a b".into()]
    );
}

/// ELF `NEEDED` entries of the wrapper: no libvirt, no libudev, whatever the library
/// crate links for the daemon.
#[test]
fn links_neither_libvirt_nor_libudev() {
    let have_readelf = Command::new("readelf").arg("--version").output().is_ok();
    if !require(have_readelf, "no readelf (binutils)") {
        return;
    }
    let output = Command::new("readelf")
        .args(["-d", WRAPPER])
        .output()
        .unwrap();
    assert!(output.status.success());
    let dynamic = String::from_utf8_lossy(&output.stdout);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(!needed.is_empty(), "{dynamic}");
    for line in needed {
        assert!(
            !line.contains("libvirt") && !line.contains("libudev"),
            "{line}"
        );
    }
}
