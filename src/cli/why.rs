//! `usbpass why DEVICE`: for one device, in plain lines (or `--json`), each rule in
//! order and the first key that did not fit, the target VMs and their states and free
//! USB ports, who holds the device now, the daemon's last libvirt error about it and
//! what it means, the host drivers bound to it, and the host settings that usbpass-qemu
//! needs and this host lacks.

use super::table::{printable, where_is};
use super::{load_config_for_reading, resolve_device, running_domains, CliError};
use crate::daemon::state::{ActionFailure, DaemonState};
use crate::host::select::{self, SourceKind};
use crate::host::sysfs::SysfsUsb;
use crate::hypervisor::libvirt::{self, DomainSummary};
use crate::model::UsbDevice;
use crate::reconcile::{self, Placement};
use crate::rules::explain::{self, RuleVerdict};
use crate::wrapper::host_settings::{self, HostFacts, SettingCheck};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

#[derive(Serialize)]
struct RuleLine {
    rule: String,
    line: usize,
    vms: Vec<String>,
    #[serde(flatten)]
    verdict: RuleVerdict,
}

#[derive(Serialize)]
struct TargetVm {
    vm: String,
    /// "running", "shut off" or "not defined".
    state: &'static str,
    usb_ports: Option<libvirt::usb_ports::UsbPortUsage>,
}

#[derive(Serialize)]
struct Failure<'a> {
    #[serde(flatten)]
    failure: &'a ActionFailure,
    meaning: &'static str,
}

#[derive(Serialize)]
struct WhyReport<'a> {
    device: &'a UsbDevice,
    device_source: String,
    rules: Vec<RuleLine>,
    targets: Vec<TargetVm>,
    libvirt_error: Option<String>,
    placement: Option<&'a Placement>,
    daemon_running: bool,
    failures: Vec<Failure<'a>>,
    /// (interface, driver); `None` when the device source cannot tell (a remote host).
    host_drivers: Option<Vec<(String, String)>>,
    wrapper_settings: Vec<SettingCheck>,
}

pub fn why(
    config_path: &Path,
    state_path: &Path,
    spec: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
    let config = load_config_for_reading(config_path)?;
    let source = select::choose(config.device_source, &config.uri);
    let (device, devices) = resolve_device(&config, spec)?;

    let rules: Vec<RuleLine> = explain::explain(&config, &device)
        .into_iter()
        .map(|(rule, verdict)| RuleLine {
            rule: rule.name.clone(),
            line: rule.line,
            vms: rule.vms.clone(),
            verdict,
        })
        .collect();
    let decided = rules
        .iter()
        .find(|line| line.verdict == RuleVerdict::Decides);

    let summaries = libvirt::domain_summaries(&config.uri);
    let targets: Vec<TargetVm> = decided
        .map(|line| {
            line.vms
                .iter()
                .map(|vm| target(vm, summaries.as_ref().ok()))
                .collect()
        })
        .unwrap_or_default();
    let libvirt_error = summaries.as_ref().err().map(ToString::to_string);

    let domains = running_domains(&config.uri);
    let plan = reconcile::plan_with(
        &config,
        &devices,
        domains.as_deref().unwrap_or(&[]),
        &super::inspect::switched_groups(state_path),
    );
    let placement = plan
        .placements
        .iter()
        .find(|placement| placement.device.address() == device.address());

    let state = DaemonState::read(state_path).ok();
    let daemon_running = state
        .as_ref()
        .is_some_and(|state| super::inspect::process_alive(state.pid));
    let here = format!("at {}", device.address());
    let mut failures: Vec<Failure> = Vec::new();
    if let Some(state) = &state {
        for failure in state.failures.iter().chain(&state.recent_failures) {
            if failure.device.contains(&here)
                && !failures.iter().any(|known| known.failure == failure)
            {
                failures.push(Failure {
                    failure,
                    meaning: failure.kind.meaning(),
                });
            }
        }
    }

    let host_drivers = (source == SourceKind::Udev)
        .then(|| SysfsUsb::new("/sys").interface_drivers(&device.port_path));
    let wrapper_settings = host_settings::check(
        &std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default(),
        &HostFacts {
            apparmor_local: std::fs::read_to_string(
                "/etc/apparmor.d/local/abstractions/libvirt-qemu",
            )
            .ok(),
            selinux: Path::new("/sys/fs/selinux/enforce").exists(),
            node: node_access(&device),
        },
    );

    let report = WhyReport {
        device: &device,
        device_source: source.to_string(),
        rules,
        targets,
        libvirt_error,
        placement,
        daemon_running,
        failures,
        host_drivers,
        wrapper_settings,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, domains.is_some());
    }
    Ok(ExitCode::SUCCESS)
}

fn target(vm: &str, summaries: Option<&Vec<DomainSummary>>) -> TargetVm {
    let summary = summaries.and_then(|all| all.iter().find(|summary| summary.name == vm));
    TargetVm {
        vm: vm.to_string(),
        state: match (summaries, summary) {
            (None, _) => "unknown (libvirt not reachable)",
            (Some(_), None) => "not defined",
            (Some(_), Some(summary)) if summary.running => "running",
            (Some(_), Some(_)) => "shut off",
        },
        usb_ports: summary.and_then(|summary| summary.usb_ports),
    }
}

/// The device node's group name and permission bits, for the wrapper's settings.
fn node_access(device: &UsbDevice) -> Option<(String, u32)> {
    let node = format!("/dev/bus/usb/{:03}/{:03}", device.bus, device.devnum);
    let metadata = std::fs::metadata(node).ok()?;
    let gid = metadata.gid();
    let group = std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|groups| {
            groups.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id: u32 = fields.nth(1)?.parse().ok()?;
                (id == gid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| gid.to_string());
    Some((group, metadata.mode() & 0o7777))
}

fn print_report(report: &WhyReport, placement_known: bool) {
    let device = report.device;
    println!(
        "device {device}, {} (usb devices from {})",
        printable(&device.display_name()),
        report.device_source
    );
    println!("rules, in order (the first that matches decides):");
    if report.rules.is_empty() {
        println!("  (none: the rules file has no rules)");
    }
    for line in &report.rules {
        let said = match &line.verdict {
            RuleVerdict::Decides => format!("matches and decides: {}", line.vms.join(", then ")),
            RuleVerdict::MatchesButNotReached => "matches, but an earlier rule decided".into(),
            RuleVerdict::Mismatch { key, wanted, found } => {
                format!(
                    "{key} does not match: wants {wanted}, the device has {}",
                    printable(found)
                )
            }
            RuleVerdict::WaitsForStrings => {
                "waits: the device's serial is not read yet".to_string()
            }
            RuleVerdict::Hub => "never: hubs are not passed through".to_string(),
        };
        println!("  {} (line {}): {said}", line.rule, line.line);
    }
    if let Some(error) = &report.libvirt_error {
        println!("libvirt: not reachable: {error}");
    }
    if let Some(decided) = report
        .rules
        .iter()
        .find(|line| line.verdict == RuleVerdict::Decides)
    {
        println!("the vms of rule {}, in order:", decided.rule);
    }
    for target in &report.targets {
        let ports = match target.usb_ports {
            Some(ports) => match ports.total {
                Some(total) => format!(
                    ", usb ports: {} of {total} taken, {} free",
                    ports.used,
                    total.saturating_sub(ports.used)
                ),
                None => format!(
                    ", usb ports: {} taken (the controller does not say how many it has)",
                    ports.used
                ),
            },
            None => String::new(),
        };
        println!("  vm {}: {}{ports}", target.vm, target.state);
    }
    match report.placement {
        Some(placement) => {
            println!("now: {}", where_is(placement, placement_known));
            match (&placement.rule, &placement.wanted_vm) {
                (Some(_), Some(vm)) => println!("the rules want it in {vm}"),
                (Some(rule), None) => {
                    println!("the rules want it in a vm, but no vm of rule {rule} runs")
                }
                (None, _) => println!("the rules leave it on the host"),
            }
            for passed in &placement.passed_over {
                println!("  {} passed over: {}", passed.vm, passed.reason.describe());
            }
        }
        None => println!("now: unknown"),
    }
    println!(
        "daemon: {}",
        if report.daemon_running {
            "running"
        } else {
            "not running (no live state file)"
        }
    );
    if report.failures.is_empty() {
        println!("  no libvirt error about this device");
    }
    for failure in &report.failures {
        println!(
            "  {} to {} failed ({}, {} attempts): {}",
            failure.failure.action,
            failure.failure.domain,
            failure.failure.kind,
            failure.failure.attempts,
            failure.failure.message
        );
        println!("    meaning: {}", failure.meaning);
    }
    match &report.host_drivers {
        None => println!("host drivers: unknown (the device is on another host)"),
        Some(drivers) if drivers.is_empty() => println!("host drivers: none bound"),
        Some(drivers) => {
            let listed: Vec<String> = drivers
                .iter()
                .map(|(interface, driver)| {
                    if driver == "usbfs" {
                        format!("{interface} usbfs (claimed by a program, such as a vm's qemu)")
                    } else {
                        format!("{interface} {driver}")
                    }
                })
                .collect();
            println!("host drivers: {}", listed.join(", "));
        }
    }
    println!("usbpass-qemu (the emulator wrapper) needs, for its replug:");
    for check in &report.wrapper_settings {
        let verdict = match check.ok {
            Some(true) => "ok",
            Some(false) => "lacking",
            None => "check by hand",
        };
        println!("  {}: {verdict}: {}", check.setting, check.found);
        if check.ok != Some(true) {
            println!("    needs {}", check.needed);
        }
    }
}
