//! `usbpass daemon`: the wiring of the daemon's loop to the real event sources (udev or
//! libvirt's node devices, libvirt, signals, the rules file) and to systemd.

use super::CliError;
use crate::daemon::lock::{remove_leftover_temporaries, DaemonLock};
use crate::daemon::{control, notify, watch};
use crate::daemon::{Daemon, DaemonOptions};
use crate::event::{event_channel, Event, EventSender};
use crate::host::interfaces::SysfsInterfaceGate;
use crate::host::select::{self, SourceKind, SourceRefusal};
use crate::host::udev as usb;
use crate::host::{DeviceSource, HostError};
use crate::hypervisor::libvirt;
use crate::hypervisor::libvirt::node_device_source::LibvirtDeviceSource;
use crate::model::UsbDevice;
use crate::rules::Config;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `usbpass daemon`: becomes `usbpassd` (same process, same pid), found beside this
/// program, with the same rules and state files.
pub fn exec_daemon(config_path: &Path, state_path: &Path) -> Result<ExitCode, CliError> {
    use std::os::unix::process::CommandExt;
    let path = std::env::current_exe()
        .ok()
        .and_then(|program| program.parent().map(|folder| folder.join("usbpassd")))
        .unwrap_or_else(|| std::path::PathBuf::from("/usr/bin/usbpassd"));
    let source = std::process::Command::new(&path)
        .arg("--config")
        .arg(config_path)
        .arg("--state")
        .arg(state_path)
        .exec();
    Err(CliError::StartDaemon { path, source })
}

/// The daemon itself, as `usbpassd` runs it.
pub fn run_daemon(config_path: &Path, state_path: &Path) -> Result<ExitCode, CliError> {
    // At start there are no previous rules to fall back on: a bad file is fatal.
    let config = Config::load(config_path)?;
    let kind = select::choose(config.device_source, &config.uri);
    select::check_rules(&config, kind)?;
    // Before anything is watched or written: a second daemon must leave the first one's
    // hostdevs and state file alone.
    let _lock = DaemonLock::acquire(state_path, &config.uri)?;
    if let Some(state_directory) = state_path.parent() {
        // A write younger than this may be a CLI command's, in progress.
        remove_leftover_temporaries(state_directory, Duration::from_secs(60));
    }
    log::info!(
        "usbpass {} starting: {} rules from {}, libvirt {}, usb devices from {}",
        env!("CARGO_PKG_VERSION"),
        config.rules.len(),
        config_path.display(),
        config.uri,
        kind
    );
    let (sender, receiver) = event_channel();
    // Signals, the rules file, libvirt's sockets, the control socket and the kernel's
    // hotplug monitor share one thread, started before a remote host's devices are
    // opened: SIGTERM must end a wait for a host that does not answer.
    let mut watches = watch::Watches::new(sender.clone())?;
    watches.catch_signals()?;
    watches.watch_rules_file(config_path)?;
    watches.watch_libvirt_sockets(&config.uri, Path::new(watch::LIBVIRT_RUN_DIRECTORY))?;
    // `usbpass switch` talks to the daemon here, beside the state file it locked. Without
    // it the daemon still does its main job; only switching is unavailable.
    match control::bind_control_socket(state_path.parent().unwrap_or(Path::new("."))) {
        Ok(listener) => watches.serve_control(listener),
        Err(error) => log::warn!("{error}; usbpass switch is unavailable"),
    }
    // The monitor listens before the first enumeration so that no plug falls between.
    if matches!(kind, SourceKind::Udev) {
        watches.poll_source(Box::new(usb::open_monitor(sender.clone())?));
    }
    watches.spawn()?;
    let (devices, waited) = match kind {
        SourceKind::Udev => (HostDevices::Udev(usb::UdevDeviceSource), false),
        SourceKind::Libvirt => match open_node_devices(&config.uri, &sender, &receiver) {
            Some((source, waited)) => (HostDevices::Libvirt(Box::new(source)), waited),
            // SIGTERM while the host did not answer.
            None => return Ok(ExitCode::SUCCESS),
        },
    };
    // The file may have changed while we waited for the host: the wait dropped the
    // watch's events.
    let config = if waited {
        let config = Config::load(config_path)?;
        devices.accepts(&config)?;
        config
    } else {
        config
    };
    let options = DaemonOptions {
        config_path: config_path.to_path_buf(),
        state_path: state_path.to_path_buf(),
        watchdog: notify::watchdog_interval(),
    };
    let local = matches!(devices, HostDevices::Udev(_));
    let mut daemon = Daemon::new(
        libvirt::LibvirtConnector,
        devices,
        config,
        options,
        sender,
        receiver,
    );
    if local {
        // `keep_off_host`: this machine's interface authorization. The node devices of
        // a remote host have no such seam.
        daemon = daemon.with_interface_gate(Box::new(SysfsInterfaceGate::new("/sys")));
    }
    daemon.run()?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's device source, as `host::select` chose it at start.
enum HostDevices {
    Udev(usb::UdevDeviceSource),
    Libvirt(Box<LibvirtDeviceSource>),
}

/// The first and the longest wait between attempts to reach a host's node devices: the
/// daemon's reconnect backoff.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// libvirt's node devices at `uri`, tried again with backoff while the host does not
/// answer: a remote host that is down when the daemon starts must not make it exit, or
/// systemd would give up after a few quick restarts. Also returns whether it had to
/// wait. None on SIGTERM or SIGINT meanwhile; SIGHUP has nothing to reload yet.
fn open_node_devices(
    uri: &str,
    events: &EventSender,
    signals: &Receiver<Event>,
) -> Option<(LibvirtDeviceSource, bool)> {
    let mut delay = FIRST_RETRY;
    let mut waited = false;
    loop {
        match LibvirtDeviceSource::open(uri, events.clone()) {
            Ok(source) => return Some((source, waited)),
            Err(error) => log::warn!("{error}; trying again in {:.1} s", delay.as_secs_f64()),
        }
        waited = true;
        let deadline = Instant::now() + delay;
        loop {
            match signals.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Terminate) => return None,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => break,
                // We hold a sender ourselves: never.
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
        delay = (delay * 2).min(LONGEST_RETRY);
    }
}

impl DeviceSource for HostDevices {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError> {
        match self {
            HostDevices::Udev(source) => source.enumerate(),
            HostDevices::Libvirt(source) => source.enumerate(),
        }
    }

    fn accepts(&self, config: &Config) -> Result<(), SourceRefusal> {
        match self {
            HostDevices::Udev(source) => source.accepts(config),
            HostDevices::Libvirt(source) => source.accepts(config),
        }
    }
}
