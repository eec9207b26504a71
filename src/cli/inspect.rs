//! The read-only commands: `usbpass list`, `usbpass rules` and `usbpass status`.

use super::table::{print_table, printable, where_is};
use super::{load_config_for_reading, present_devices, running_domains, CliError};
use crate::daemon::state::DaemonState;
use crate::hypervisor::libvirt;
use crate::model::UsbDevice;
use crate::reconcile::{self, Placement};
use crate::rules::Config;
use std::path::Path;
use std::process::ExitCode;

pub fn list(config_path: &Path, state_path: &Path, json: bool) -> Result<ExitCode, CliError> {
    let config = load_config_for_reading(config_path)?;
    let devices = present_devices(&config)?;
    let domains = running_domains(&config.uri);
    let known = domains.is_some();
    let facts = switched_groups(state_path);
    let plan = reconcile::plan_with(&config, &devices, domains.as_deref().unwrap_or(&[]), &facts);
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
            let switched = placement
                .rule
                .as_ref()
                .and_then(|name| config.rules.iter().find(|rule| rule.name == *name))
                .and_then(|rule| rule.group.as_ref())
                .filter(|group| facts.group_targets.contains_key(*group));
            let rule = match (&placement.rule, &placement.wanted_vm) {
                (Some(rule), vm) if switched.is_some() => format!(
                    "{rule} -> {} (group {} switched)",
                    vm.as_deref().unwrap_or("host"),
                    switched.map_or("", String::as_str)
                ),
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

/// The groups `usbpass switch` sent somewhere, as the daemon keeps them, so that the
/// CLI shows what the daemon does.
pub(super) fn switched_groups(state_path: &Path) -> reconcile::LoopFacts {
    reconcile::LoopFacts {
        group_targets: crate::daemon::groups::load_group_targets(
            &crate::daemon::groups::groups_path(state_path),
        ),
        ..reconcile::LoopFacts::default()
    }
}

pub fn rules(config_path: &Path, json: bool) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    let devices = present_devices(&config)?;
    #[derive(serde::Serialize)]
    struct RuleNow<'a> {
        rule: &'a crate::rules::Rule,
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
    if report.is_empty() {
        println!(
            "{}: no rules yet, so usbpass moves nothing; add one with `usbpass assign DEVICE VM` \
             (`usbpass list` shows the devices), or see `usbpass default-config` for examples",
            config_path.display()
        );
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

pub fn status(config_path: &Path, state_path: &Path, json: bool) -> Result<ExitCode, CliError> {
    let config = load_config_for_reading(config_path);
    let uri = config
        .as_ref()
        .map(|c| c.uri.clone())
        .unwrap_or_else(|_| crate::rules::DEFAULT_URI.to_string());
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
                for (group, target) in &state.groups {
                    println!("group {group}: switched to {target} (usbpass switch {group} --rules hands it back)");
                }
                for vm in &state.vms_not_answering {
                    println!(
                        "  not answering: vm {} ({}): {}",
                        vm.name, vm.kind, vm.message
                    );
                }
                for placement in state.devices.iter().filter(|p| !p.holders.is_empty()) {
                    println!(
                        "  {}  {} in {}",
                        placement.device,
                        printable(&placement.device.display_name()),
                        where_is(placement, true)
                    );
                }
                for placement in state.devices.iter().filter(|p| !p.passed_over.is_empty()) {
                    let skipped: Vec<String> = placement
                        .passed_over
                        .iter()
                        .map(|passed| format!("{} ({})", passed.vm, passed.reason.describe()))
                        .collect();
                    println!(
                        "  {}  {}: passed over {}; {}",
                        placement.device,
                        printable(&placement.device.display_name()),
                        skipped.join(", "),
                        match &placement.wanted_vm {
                            Some(vm) => format!("goes to {vm} instead"),
                            None => "waits on the host".to_string(),
                        }
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

pub(super) fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
