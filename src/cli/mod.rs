//! The `usbpass` command line: its subcommands, one file per family, and the one error
//! type they share. `main.rs` parses the arguments, sets up logging and calls `run`.

pub mod args;
mod daemon;
pub mod daemon_arguments;
pub mod logging;
pub use daemon::run_daemon;
pub mod device_spec;
mod generate;
mod hotplug;
mod inspect;
mod reset;
mod rules_file;
mod switch;
mod table;
mod why;

use crate::daemon::watch::WatchError;
use crate::daemon::DaemonError;
use crate::host::select::{self, RuleNeedsWhatSourceLacks, SourceKind, SourceRefusal};
use crate::host::udev::{self as usb, UsbError};
use crate::host::HostError;
use crate::hypervisor::libvirt::{self, LibvirtError};
use crate::hypervisor::{DomainView, Hypervisor, HypervisorError};
use crate::model::alias::{AliasError, HostdevAlias};
use crate::model::UsbDevice;
use crate::rules::edit::RulesEditError;
use crate::rules::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::util::atomic_file::AtomicWriteError;
use crate::wrapper::udev_rules::UdevRulesError;
use args::{Cli, Command};
use device_spec::ResolveError;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Why a command failed. Errors of the modules the commands use pass through with their
/// own message; the rest name the device, the VM or the path.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot start the daemon {}: {source} (usbpassd belongs beside usbpass)", path.display())]
    StartDaemon {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    LoadRules(#[from] ConfigError),
    #[error(transparent)]
    EditRules(#[from] RulesEditError),
    #[error(transparent)]
    WriteRules(#[from] AtomicWriteError),
    #[error(transparent)]
    ListDevices(#[from] UsbError),
    #[error(transparent)]
    ListHostDevices(#[from] HostError),
    #[error(transparent)]
    RefuseRules(#[from] RuleNeedsWhatSourceLacks),
    #[error(transparent)]
    RefuseSource(#[from] SourceRefusal),
    #[error(transparent)]
    ResolveDevice(#[from] ResolveError),
    #[error(transparent)]
    ParseAlias(#[from] AliasError),
    #[error(transparent)]
    ConnectLibvirt(#[from] LibvirtError),
    #[error(transparent)]
    CallLibvirt(#[from] HypervisorError),
    #[error(transparent)]
    RenderUdevRules(#[from] UdevRulesError),
    #[error(transparent)]
    StartWatcher(#[from] WatchError),
    #[error(transparent)]
    RunDaemon(#[from] DaemonError),
    #[error(transparent)]
    LockDaemon(#[from] crate::daemon::lock::LockError),
    #[error("no usbpass daemon answers at {socket}: {source}; start it (systemctl start usbpass)")]
    ReachDaemon {
        socket: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device {device} is a hub; usbpass never passes hubs through")]
    AttachHub { device: Box<UsbDevice> },
    #[error("vm {vm} is not running on {uri}")]
    VmNotRunning { vm: String, uri: String },
    #[error("device {device} is already held by vm {holders}")]
    AlreadyHeld {
        device: Box<UsbDevice>,
        holders: String,
    },
    #[error("no running vm on {uri} has a hostdev with alias {alias}")]
    NoHostdevWithAlias { alias: HostdevAlias, uri: String },
    #[error("device {device} is on the host, not in any running vm")]
    DeviceOnHost { device: Box<UsbDevice> },
    #[error("device {device} is held by vm {vm} through {hostdev}, which usbpass did not attach; use virsh detach-device")]
    HeldByForeignHostdev {
        device: Box<UsbDevice>,
        vm: String,
        hostdev: String,
    },
    #[error(transparent)]
    ResetDevice(#[from] crate::host::usbfs::ResetError),
    #[error("device {device} is attached to running vm {vm}: a reset on the host pulls it from under the guest's driver; detach it first, or pass --force")]
    ResetHeldDevice { device: Box<UsbDevice>, vm: String },
    #[error("cannot tell whether a running vm holds device {device}: {message}; pass --force to reset it anyway")]
    ResetWithoutVms {
        device: Box<UsbDevice>,
        message: String,
    },
    #[error("device {device} is a hub: a reset re-enumerates every device behind it; pass --force to reset it anyway")]
    ResetHub { device: Box<UsbDevice> },
    #[error("usbpass reset works on this machine's usb devices, and {uri} reads another host's")]
    ResetRemoteDevice { uri: String },
    #[error("cannot create directory {}: {source}", dir.display())]
    CreateManDirectory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write man pages to {}: {source}", dir.display())]
    WriteManPages {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot format the json output: {source}")]
    FormatJson {
        #[from]
        source: serde_json::Error,
    },
    #[error("cannot write to standard output: {source}")]
    WriteOutput {
        #[source]
        source: std::io::Error,
    },
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let config = &cli.config;
    match cli.command {
        Command::Daemon => daemon::exec_daemon(config, &cli.state),
        Command::List { json } => inspect::list(config, &cli.state, json),
        Command::Rules { json } => inspect::rules(config, json),
        Command::Status { json } => inspect::status(config, &cli.state, json),
        Command::Why { device, json } => why::why(config, &cli.state, &device, json),
        Command::Switch {
            group,
            target,
            rules,
            timeout,
            json,
        } => switch::switch(&cli.state, &group, target.as_deref(), rules, timeout, json),
        Command::Check { json } => rules_file::check(config, json),
        Command::Assign { device, vm, by } => rules_file::assign(config, &device, &vm, by),
        Command::Unassign { target } => rules_file::unassign(config, &target),
        Command::Attach { device, vm, json } => hotplug::attach(config, &device, &vm, json),
        Command::Detach { device, json } => hotplug::detach(config, &device, json),
        Command::Reset {
            device,
            force,
            json,
        } => reset::reset(config, &device, force, json),
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { dir } => generate::man(dir),
        Command::UdevRules { group, owner } => generate::udev_rules(config, group, owner),
        Command::DefaultConfig => generate::default_config(),
    }
}

/// The rules file, or no rules when the default file does not exist yet: `list` is
/// useful before any rule is written.
fn load_config_for_reading(path: &Path) -> Result<Config, CliError> {
    match Config::load(path) {
        Ok(config) => Ok(config),
        Err(ConfigError::ReadFile { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
                && path == Path::new(DEFAULT_CONFIG_PATH) =>
        {
            Ok(Config::from_rules(Vec::new()))
        }
        Err(error) => Err(error.into()),
    }
}

/// Running domains, or `None` with a warning when libvirt does not answer: read
/// commands still show what they can.
fn running_domains(uri: &str) -> Option<Vec<DomainView>> {
    let result = connect(uri)
        .map_err(|error| error.to_string())
        .and_then(|hypervisor| hypervisor.running_domains().map_err(|e| e.to_string()));
    match result {
        Ok(domains) => Some(domains),
        Err(message) => {
            eprintln!("usbpass: warning: libvirt at {uri} is not reachable, vm placement unknown: {message}");
            None
        }
    }
}

fn connect(uri: &str) -> Result<libvirt::LibvirtHypervisor, CliError> {
    let (sender, _receiver) = crate::event::event_channel();
    Ok(libvirt::connect(uri, sender)?)
}

/// The USB devices present now, read where the daemon reads them for these rules
/// (`host::select`): this machine's udev, or libvirt's node devices on the host the uri
/// reaches. What the CLI shows and resolves is what the daemon sees.
fn present_devices(config: &Config) -> Result<Vec<UsbDevice>, CliError> {
    match select::choose(config.device_source, &config.uri) {
        SourceKind::Udev => Ok(usb::enumerate()?),
        SourceKind::Libvirt => Ok(libvirt::node_device_source::list_usb_devices(&config.uri)?),
    }
}

fn resolve_device(config: &Config, spec: &str) -> Result<(UsbDevice, Vec<UsbDevice>), CliError> {
    let devices = present_devices(config)?;
    let device = device_spec::resolve(&device_spec::parse_device_spec(spec)?, &devices)?.clone();
    Ok((device, devices))
}
