//! `usbpass daemon`: the wiring of the daemon's loop to the real event sources (udev,
//! libvirt, signals, the rules file) and to systemd.

use super::CliError;
use crate::daemon::lock::{remove_leftover_temporaries, DaemonLock};
use crate::daemon::{notify, watch};
use crate::daemon::{Daemon, DaemonOptions};
use crate::host::udev as usb;
use crate::hypervisor::libvirt;
use crate::rules::Config;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

pub fn run_daemon(config_path: &Path, state_path: &Path) -> Result<ExitCode, CliError> {
    // At start there are no previous rules to fall back on: a bad file is fatal.
    let config = Config::load(config_path)?;
    // Before anything is watched or written: a second daemon must leave the first one's
    // hostdevs and state file alone.
    let _lock = DaemonLock::acquire(state_path, &config.uri)?;
    if let Some(state_directory) = state_path.parent() {
        // A write younger than this may be a CLI command's, in progress.
        remove_leftover_temporaries(state_directory, Duration::from_secs(60));
    }
    log::info!(
        "usbpass {} starting: {} rules from {}, libvirt {}",
        env!("CARGO_PKG_VERSION"),
        config.rules.len(),
        config_path.display(),
        config.uri
    );
    let (sender, receiver) = mpsc::channel();
    // The monitor starts before the first enumeration so that no plug falls between.
    usb::spawn_monitor(sender.clone())?;
    watch::spawn_signal_thread(sender.clone())?;
    watch::spawn_config_watcher(config_path, sender.clone())?;
    let options = DaemonOptions {
        config_path: config_path.to_path_buf(),
        state_path: state_path.to_path_buf(),
        watchdog: notify::watchdog_interval(),
    };
    let mut daemon = Daemon::new(
        libvirt::LibvirtConnector,
        usb::UdevDeviceSource,
        config,
        options,
        sender,
        receiver,
    );
    daemon.run()?;
    Ok(ExitCode::SUCCESS)
}
