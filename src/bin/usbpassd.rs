//! The `usbpassd` binary: the daemon alone, which `usbpass daemon` and the systemd unit
//! start. It is its own program so that the resident daemon maps only its own code,
//! not the command line's parser, help texts, generators and wrapper logic (about a
//! third less text; BENCHMARKS.md, idle memory).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use usbpass::cli::daemon_arguments::{parse_daemon_arguments, DaemonArguments, USAGE};

fn main() -> ExitCode {
    one_malloc_arena();
    let arguments = match parse_daemon_arguments(std::env::args_os().skip(1), environment) {
        Ok(DaemonArguments::Run { config, state }) => (config, state),
        Ok(DaemonArguments::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(DaemonArguments::Version) => {
            println!("usbpassd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("usbpassd: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    usbpass::cli::logging::init_logging();
    match run(arguments) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("usbpassd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn environment(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

fn run((config, state): (PathBuf, PathBuf)) -> anyhow::Result<ExitCode> {
    Ok(usbpass::cli::run_daemon(&config, &state)?)
}

/// glibc gives each thread that allocates an arena of its own; the daemon's eight
/// threads allocate little and rarely, so one shared arena serves them, and an idle
/// daemon keeps no half-used arena per thread (about 80 KB; BENCHMARKS.md).
fn one_malloc_arena() {
    // SAFETY: mallopt only sets a tunable of glibc's allocator. It runs first in main,
    // before any other thread exists, so no allocation races with the change.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
