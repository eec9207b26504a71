//! `usbpass daemon`: the wiring of the daemon's loop to the real event sources (udev or
//! libvirt's node devices, libvirt, signals, the rules file) and to systemd.

use super::CliError;
use crate::daemon::{notify, watch};
use crate::daemon::{Daemon, DaemonOptions};
use crate::event::Event;
use crate::host::select::{self, SourceKind, SourceRefusal};
use crate::host::udev as usb;
use crate::host::{DeviceSource, HostError};
use crate::hypervisor::libvirt;
use crate::hypervisor::libvirt::node_device_source::LibvirtDeviceSource;
use crate::model::UsbDevice;
use crate::rules::Config;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc::{self, Sender};

pub fn run_daemon(config_path: &Path, state_path: &Path) -> Result<ExitCode, CliError> {
    // At start there are no previous rules to fall back on: a bad file is fatal.
    let config = Config::load(config_path)?;
    let kind = select::choose(config.device_source, &config.uri);
    select::check_rules(&config, kind)?;
    log::info!(
        "usbpass {} starting: {} rules from {}, libvirt {}, usb devices from {}",
        env!("CARGO_PKG_VERSION"),
        config.rules.len(),
        config_path.display(),
        config.uri,
        kind
    );
    let (sender, receiver) = mpsc::channel();
    // The watcher starts before the first enumeration so that no plug falls between.
    let devices = HostDevices::start(kind, &config.uri, sender.clone())?;
    watch::spawn_signal_thread(sender.clone())?;
    watch::spawn_config_watcher(config_path, sender.clone())?;
    let options = DaemonOptions {
        config_path: config_path.to_path_buf(),
        state_path: state_path.to_path_buf(),
        watchdog: notify::watchdog_interval(),
    };
    let mut daemon = Daemon::new(
        libvirt::LibvirtConnector,
        devices,
        config,
        options,
        sender,
        receiver,
    );
    daemon.run()?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's device source, as `host::select` chose it at start.
enum HostDevices {
    Udev(usb::UdevDeviceSource),
    Libvirt(Box<LibvirtDeviceSource>),
}

impl HostDevices {
    /// Starts the chosen source's watcher, which sends into `events`.
    fn start(kind: SourceKind, uri: &str, events: Sender<Event>) -> Result<Self, CliError> {
        Ok(match kind {
            SourceKind::Udev => {
                usb::spawn_monitor(events)?;
                HostDevices::Udev(usb::UdevDeviceSource)
            }
            SourceKind::Libvirt => {
                HostDevices::Libvirt(Box::new(LibvirtDeviceSource::open(uri, events)?))
            }
        })
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
