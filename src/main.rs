//! The `usbpass` binary: the command line (clap), its subcommands, and the wiring of
//! the daemon to udev, libvirt, signals and the rules file. The only place `anyhow`
//! is used.

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use usbpass::cli::device_spec;
use usbpass::daemon::state::{DaemonState, DEFAULT_STATE_PATH};
use usbpass::daemon::{notify, watch};
use usbpass::daemon::{Daemon, DaemonError, DaemonOptions, DeviceSource};
use usbpass::host::udev as usb;
use usbpass::hypervisor::libvirt;
use usbpass::hypervisor::{DomainView, HostdevSpec, Hypervisor};
use usbpass::model::alias::{HostdevAlias, Ownership, ALIAS_PREFIX};
use usbpass::model::UsbDevice;
use usbpass::reconcile::{self, Placement};
use usbpass::rules::edit::{self as rules_edit, AssignBy, UnassignTarget};
use usbpass::rules::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use usbpass::util::atomic_file;

#[derive(Parser)]
#[command(
    name = "usbpass",
    version,
    about = "Keeps named USB devices attached to the right running libvirt VM",
    long_about = "usbpass matches USB devices against rules and hot-attaches them to the first \
                  running VM each rule names, across replugs, VM restarts and libvirtd restarts.\n\n\
                  DEVICE may be vid:pid (046d:c52b), bus:dev (1:5 or 001:005), a port path (1-2.3) \
                  or a serial."
)]
struct Cli {
    /// The rules file.
    #[arg(long, global = true, value_name = "PATH", env = "USBPASS_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// The daemon's state file.
    #[arg(long, global = true, value_name = "PATH", env = "USBPASS_STATE", default_value = DEFAULT_STATE_PATH)]
    state: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground; logs go to stderr.
    Daemon,
    /// Present USB devices, their matching rule, and where each one is now.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Each rule and the devices it matches now.
    Rules {
        #[arg(long)]
        json: bool,
    },
    /// The daemon's state and whether libvirt answers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Validate the rules file; exits non-zero on error.
    Check,
    /// Add or update a rule so DEVICE goes to VM; the daemon picks it up.
    Assign {
        device: String,
        vm: String,
        /// What the rule matches on.
        #[arg(long, value_enum, default_value = "id")]
        by: AssignBy,
    },
    /// Remove the rule named TARGET, or the rule that matches the device TARGET.
    Unassign { target: String },
    /// Attach DEVICE to VM now, once (not a rule; the daemon leaves it in place).
    Attach { device: String, vm: String },
    /// Detach DEVICE (or the hostdev with alias ua-usbpass-...) from whichever VM holds it
    /// through usbpass.
    Detach { device: String },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or with --dir write one page per subcommand there.
    Man {
        /// Write usbpass.1 and usbpass-SUBCOMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print udev rules that let QEMU reopen the devices the rules name (for usbpass-qemu).
    UdevRules {
        /// The group QEMU runs as (`group =` in /etc/libvirt/qemu.conf).
        #[arg(long, default_value = usbpass::wrapper::udev_rules::DEFAULT_QEMU_GROUP)]
        group: String,
        /// Also make this user the owner of the device nodes.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Print the default rules file.
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("usbpass: {error}");
            ExitCode::FAILURE
        }
    }
}

/// stderr logging. Under journald (JOURNAL_STREAM set) lines carry `<N>` priority
/// prefixes and no timestamp, since journald adds its own.
fn init_logging() {
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("USBPASS_LOG", "info"))
        .format(move |buffer, record| {
            if under_journald {
                let priority = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                writeln!(buffer, "<{priority}>{}", record.args())
            } else {
                writeln!(
                    buffer,
                    "{} {:5} {}",
                    buffer.timestamp_millis(),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Daemon => run_daemon(&cli.config, &cli.state),
        Command::List { json } => list(&cli.config, json),
        Command::Rules { json } => rules(&cli.config, json),
        Command::Status { json } => status(&cli.config, &cli.state, json),
        Command::Check => {
            let config = Config::load(&cli.config)?;
            println!(
                "{}: ok, {} rules, libvirt uri {}",
                cli.config.display(),
                config.rules.len(),
                config.uri
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Assign { device, vm, by } => assign(&cli.config, &device, &vm, by),
        Command::Unassign { target } => unassign(&cli.config, &target),
        Command::Attach { device, vm } => attach(&cli.config, &device, &vm),
        Command::Detach { device } => detach(&cli.config, &device),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "usbpass",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).map_err(|error| {
                anyhow::anyhow!("cannot create directory {}: {error}", dir.display())
            })?;
            clap_mangen::generate_to(Cli::command(), &dir).map_err(|error| {
                anyhow::anyhow!("cannot write man pages to {}: {error}", dir.display())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::UdevRules { group, owner } => {
            let config = Config::load(&cli.config)?;
            let access = usbpass::wrapper::udev_rules::QemuAccess { group, owner };
            print!(
                "{}",
                usbpass::wrapper::udev_rules::render_udev_rules(&config, &access)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::DefaultConfig => {
            print!("{}", usbpass::rules::DEFAULT_CONFIG_TEXT);
            Ok(ExitCode::SUCCESS)
        }
    }
}

struct UdevDevices;

impl DeviceSource for UdevDevices {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, DaemonError> {
        usb::enumerate().map_err(|error| DaemonError::EnumerateDevices {
            message: error.to_string(),
        })
    }
}

fn run_daemon(config_path: &Path, state_path: &Path) -> Result<ExitCode> {
    // At start there are no previous rules to fall back on: a bad file is fatal.
    let config = Config::load(config_path)?;
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
        UdevDevices,
        config,
        options,
        sender,
        receiver,
    );
    daemon.run()?;
    Ok(ExitCode::SUCCESS)
}

/// The rules file, or no rules when the default file does not exist yet: `list` is
/// useful before any rule is written.
fn load_config_for_reading(path: &Path) -> Result<Config> {
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
        .and_then(|mut hypervisor| hypervisor.running_domains().map_err(|e| e.to_string()));
    match result {
        Ok(domains) => Some(domains),
        Err(message) => {
            eprintln!("usbpass: warning: libvirt at {uri} is not reachable, vm placement unknown: {message}");
            None
        }
    }
}

fn connect(uri: &str) -> Result<libvirt::LibvirtHypervisor> {
    let (sender, _receiver) = mpsc::channel();
    Ok(libvirt::connect(uri, sender)?)
}

fn where_is(placement: &Placement, known: bool) -> String {
    if !known {
        return "?".to_string();
    }
    if placement.holders.is_empty() {
        return "host".to_string();
    }
    placement
        .holders
        .iter()
        .map(|holder| {
            let alias = holder.alias.as_deref().unwrap_or("-");
            match holder.ownership {
                Ownership::Foreign => format!("{} ({alias}, not usbpass)", holder.domain),
                _ => format!("{} ({alias})", holder.domain),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Device strings come from the device: a control character in a serial must not reach
/// the terminal as an escape sequence.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        text.to_string()
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    cell
                } else {
                    format!("{cell:<width$}", width = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn list(config_path: &Path, json: bool) -> Result<ExitCode> {
    let config = load_config_for_reading(config_path)?;
    let devices = usb::enumerate()?;
    let domains = running_domains(&config.uri);
    let known = domains.is_some();
    let plan = reconcile::plan(&config, &devices, domains.as_deref().unwrap_or(&[]));
    if json {
        #[derive(serde::Serialize)]
        struct Listing<'a> {
            libvirt_reachable: bool,
            devices: &'a [Placement],
        }
        let listing = Listing {
            libvirt_reachable: known,
            devices: &plan.placements,
        };
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = plan
        .placements
        .iter()
        .map(|placement| {
            let device = &placement.device;
            let rule = match (&placement.rule, &placement.wanted_vm) {
                (Some(rule), Some(vm)) => format!("{rule} -> {vm}"),
                (Some(rule), None) => format!("{rule} (no vm running)"),
                (None, _) if device.is_hub() => "(hub)".to_string(),
                (None, _) => "-".to_string(),
            };
            vec![
                device.address().to_string(),
                device.id().to_string(),
                device.port_path.clone(),
                device.serial.clone().unwrap_or_else(|| "-".into()),
                device.display_name(),
                rule,
                where_is(placement, known),
            ]
        })
        .collect();
    print_table(
        &["BUS:DEV", "ID", "PORT", "SERIAL", "NAME", "RULE", "WHERE"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn rules(config_path: &Path, json: bool) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    let devices = usb::enumerate()?;
    #[derive(serde::Serialize)]
    struct RuleNow<'a> {
        rule: &'a usbpass::rules::Rule,
        /// Devices for which this is the first matching rule.
        devices: Vec<&'a UsbDevice>,
    }
    let report: Vec<RuleNow> = config
        .rules
        .iter()
        .map(|rule| RuleNow {
            rule,
            devices: devices
                .iter()
                .filter(|d| config.first_match(d).is_some_and(|r| r.name == rule.name))
                .collect(),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for entry in &report {
        let rule = entry.rule;
        println!(
            "{} (line {}) -> {}",
            rule.name,
            rule.line,
            rule.vms.join(", then ")
        );
        if entry.devices.is_empty() {
            println!("    matches nothing present");
        }
        for device in &entry.devices {
            println!("    {device}  {}", printable(&device.display_name()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(config_path: &Path, state_path: &Path, json: bool) -> Result<ExitCode> {
    let config = load_config_for_reading(config_path);
    let uri = config
        .as_ref()
        .map(|c| c.uri.clone())
        .unwrap_or_else(|_| usbpass::rules::DEFAULT_URI.to_string());
    let reachable = libvirt::is_reachable(&uri).map_err(|e| e.to_string());
    let state = DaemonState::read(state_path);
    let daemon_alive = state.as_ref().is_ok_and(|state| process_alive(state.pid));
    if json {
        #[derive(serde::Serialize)]
        struct Status<'a> {
            daemon_running: bool,
            state: Option<&'a DaemonState>,
            state_error: Option<String>,
            libvirt_uri: &'a str,
            libvirt_reachable: bool,
            libvirt_error: Option<&'a str>,
        }
        let report = Status {
            daemon_running: daemon_alive,
            state: state.as_ref().ok(),
            state_error: state.as_ref().err().map(|e| e.to_string()),
            libvirt_uri: &uri,
            libvirt_reachable: reachable.is_ok(),
            libvirt_error: reachable.as_ref().err().map(String::as_str),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match &reachable {
            Ok(()) => println!("libvirt: {uri} reachable"),
            Err(message) => println!("libvirt: {uri} not reachable: {message}"),
        }
        match &state {
            Err(error) => println!("daemon: no state: {error}"),
            Ok(state) => {
                println!(
                    "daemon: pid {} {}, {} rules, libvirt {}",
                    state.pid,
                    if daemon_alive {
                        "running"
                    } else {
                        "not running (stale state file)"
                    },
                    state.rule_count,
                    if state.libvirt.connected {
                        "connected"
                    } else {
                        "disconnected"
                    }
                );
                if let Some(error) = &state.config_error {
                    println!("rules: refused, previous rules in force: {error}");
                }
                println!("running vms: {}", state.running_vms.join(", "));
                for placement in state.devices.iter().filter(|p| !p.holders.is_empty()) {
                    println!(
                        "  {}  {} in {}",
                        placement.device,
                        printable(&placement.device.display_name()),
                        where_is(placement, true)
                    );
                }
                let older: Vec<_> = state
                    .recent_failures
                    .iter()
                    .filter(|recent| !state.failures.contains(recent))
                    .collect();
                for failure in older.iter().rev().take(5) {
                    println!(
                        "  earlier: {} {} on vm {}: {}",
                        failure.action, failure.device, failure.domain, failure.message
                    );
                }
                for failure in &state.failures {
                    println!(
                        "  failed: {} {} on vm {}: {} ({} attempts{})",
                        failure.action,
                        failure.device,
                        failure.domain,
                        failure.message,
                        failure.attempts,
                        failure
                            .retry_in_ms
                            .map_or(", waiting for an event".to_string(), |ms| format!(
                                ", retry in {ms} ms"
                            ))
                    );
                }
            }
        }
    }
    Ok(if daemon_alive && reachable.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn resolve_device(spec: &str) -> Result<(UsbDevice, Vec<UsbDevice>)> {
    let devices = usb::enumerate()?;
    let device = device_spec::resolve(&device_spec::parse_device_spec(spec)?, &devices)?.clone();
    Ok((device, devices))
}

/// The rules file's text; a missing file reads as empty when `missing_is_empty`.
fn read_rules_text(config_path: &Path, missing_is_empty: bool) -> Result<String> {
    match std::fs::read_to_string(config_path) {
        Ok(text) => Ok(text),
        Err(error) if missing_is_empty && error.kind() == std::io::ErrorKind::NotFound => {
            Ok(String::new())
        }
        Err(source) => Err(ConfigError::ReadFile {
            path: config_path.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// Replaces the rules file with an edit's text (already validated) and says what changed.
fn write_rules_edit(config_path: &Path, edit: rules_edit::Edit) -> Result<ExitCode> {
    atomic_file::write(
        config_path,
        edit.text.as_bytes(),
        0o644,
        atomic_file::Durability::Synced,
    )?;
    println!("{}: {}", config_path.display(), edit.summary);
    Ok(ExitCode::SUCCESS)
}

fn assign(config_path: &Path, spec: &str, vm: &str, by: AssignBy) -> Result<ExitCode> {
    let (device, _) = resolve_device(spec)?;
    let text = read_rules_text(config_path, true)?;
    let edit = rules_edit::assign(&text, config_path, &device, vm, by)?;
    write_rules_edit(config_path, edit)
}

fn unassign(config_path: &Path, target: &str) -> Result<ExitCode> {
    let text = read_rules_text(config_path, false)?;
    let config = Config::parse(&text, config_path)?;
    let edit = if config.rules.iter().any(|rule| rule.name == target) {
        rules_edit::unassign(&text, config_path, UnassignTarget::Rule(target))?
    } else {
        let (device, devices) = resolve_device(target)?;
        rules_edit::unassign(
            &text,
            config_path,
            UnassignTarget::Device(&device, &devices),
        )?
    };
    write_rules_edit(config_path, edit)
}

fn attach(config_path: &Path, spec: &str, vm: &str) -> Result<ExitCode> {
    let config = load_config_for_reading(config_path)?;
    let (device, devices) = resolve_device(spec)?;
    if device.is_hub() {
        bail!("device {device} is a hub; usbpass never passes hubs through");
    }
    let mut hypervisor = connect(&config.uri)?;
    let domains = hypervisor.running_domains()?;
    if !domains.iter().any(|domain| domain.name == vm) {
        bail!("vm {vm} is not running on {}", config.uri);
    }
    let plan = reconcile::plan(&config, &devices, &domains);
    if let Some(placement) = plan
        .placements
        .iter()
        .find(|p| p.device.syspath == device.syspath)
    {
        if !placement.holders.is_empty() {
            bail!(
                "device {device} is already held by vm {}",
                where_is(placement, true)
            );
        }
    }
    let alias = HostdevAlias::for_manual(&device);
    hypervisor.attach(vm, &HostdevSpec::new(&device, alias.clone()))?;
    println!("attached {device} to vm {vm} as {alias}");
    Ok(ExitCode::SUCCESS)
}

fn detach(config_path: &Path, spec: &str) -> Result<ExitCode> {
    let config = load_config_for_reading(config_path)?;
    let mut hypervisor = connect(&config.uri)?;
    let domains = hypervisor.running_domains()?;
    // An alias names one hostdev directly, even one whose device is gone.
    if spec.starts_with(ALIAS_PREFIX) {
        let alias = HostdevAlias::parse(spec)?;
        let holders: Vec<&str> = domains
            .iter()
            .filter(|d| d.hostdevs.iter().any(|h| h.alias.as_deref() == Some(spec)))
            .map(|d| d.name.as_str())
            .collect();
        if holders.is_empty() {
            bail!(
                "no running vm on {} has a hostdev with alias {spec}",
                config.uri
            );
        }
        for domain in holders {
            hypervisor.detach(domain, &alias)?;
            println!("detached {spec} from vm {domain}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (device, devices) = resolve_device(spec)?;
    let plan = reconcile::plan(&config, &devices, &domains);
    let placement = plan
        .placements
        .iter()
        .find(|p| p.device.syspath == device.syspath)
        .expect("every present device has a placement");
    if placement.holders.is_empty() {
        bail!("device {device} is on the host, not in any running vm");
    }
    if placement
        .holders
        .iter()
        .all(|holder| holder.ownership == Ownership::Foreign)
    {
        let holder = &placement.holders[0];
        bail!(
            "device {device} is held by vm {} through {}, which usbpass did not attach; use virsh detach-device",
            holder.domain,
            holder.alias.as_deref().unwrap_or("a hostdev without alias")
        );
    }
    for holder in &placement.holders {
        let alias = holder.alias.as_deref().unwrap_or("-");
        // Ownership comes from the alias: an owned holder's alias parses.
        let Some(owned) = holder
            .alias
            .as_deref()
            .and_then(|alias| HostdevAlias::parse(alias).ok())
        else {
            eprintln!(
                "usbpass: warning: device {device} is also held by vm {} through {alias}, which usbpass did not attach; left alone",
                holder.domain
            );
            continue;
        };
        hypervisor.detach(&holder.domain, &owned)?;
        println!("detached {device} from vm {} ({alias})", holder.domain);
        if holder.ownership == Ownership::Rules {
            if let Some(rule) = &placement.rule {
                eprintln!(
                    "usbpass: warning: rule {rule:?} sends {device} to vm {}; while the daemon runs it will attach it again (use usbpass unassign)",
                    holder.domain
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
