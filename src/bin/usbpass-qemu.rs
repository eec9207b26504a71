//! The `usbpass-qemu` emulator wrapper: rewrites QEMU's usb-host arguments so that QEMU
//! reconnects replugged devices by itself, then execs the real emulator in place.
//!
//! It never spawns a child: the PID, every inherited file descriptor (libvirt's monitor
//! socket), the environment and the signal state all reach QEMU as libvirt left them.
//! `no_main` keeps Rust's runtime from ignoring SIGPIPE before we exec (a QEMU started
//! by a shell that does not ignore it must not inherit an ignored SIGPIPE from us).
#![cfg_attr(not(test), no_main)]

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use usbpass::wrapper::WRAPPER_NAME;

// A test build of this binary has no `main` of ours (the harness brings its own), so
// nothing calls `log_line` or `exec` there.
#[cfg_attr(test, allow(dead_code))]
fn log_line(level: &str, message: &str) {
    use std::io::Write;
    // One write per line, so that lines from QEMU's threads later cannot interleave.
    let line = format!("{WRAPPER_NAME}: {level}: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Replaces this process with the emulator; returns only on failure.
#[cfg_attr(test, allow(dead_code))]
fn exec(emulator: &Path, argv: Vec<OsString>) -> std::io::Error {
    let to_c = |s: OsString| CString::new(s.into_vec());
    let Ok(path) = to_c(emulator.as_os_str().to_os_string()) else {
        return std::io::Error::from(std::io::ErrorKind::InvalidInput);
    };
    let Ok(argv) = argv.into_iter().map(to_c).collect::<Result<Vec<_>, _>>() else {
        return std::io::Error::from(std::io::ErrorKind::InvalidInput);
    };
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: `path` and every element of `pointers` point into CStrings that live until
    // after the call; the array ends with a null pointer, as execv requires. execv keeps
    // `environ`, every descriptor without FD_CLOEXEC, the signal mask and ignored signals.
    unsafe { libc::execv(path.as_ptr(), pointers.as_ptr()) };
    std::io::Error::last_os_error()
}

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let args: Vec<OsString> = std::env::args_os().collect();
    let env = |name: &str| std::env::var_os(name);
    let self_identity = usbpass::wrapper::emulator::identity(Path::new("/proc/self/exe"));
    let mut log = |level: &str, message: &str| log_line(level, message);
    let prepared = usbpass::wrapper::prepare_exec(args, &env, self_identity, &mut log);
    let Some(usbpass::wrapper::PreparedExec { emulator, argv }) = prepared else {
        log_line("error", "no real emulator to run");
        return 127;
    };
    let error = exec(&emulator, argv);
    log_line(
        "error",
        &format!("cannot exec {}: {error}", emulator.display()),
    );
    127
}
