//! `usbpass attach` and `usbpass detach`: place or remove one device now, by hand,
//! under the `ua-usbpass-manual-` alias the daemon leaves alone.

use super::table::where_is;
use super::{connect, load_config_for_reading, resolve_device, CliError};
use crate::host::interfaces::{InterfaceGate, SysfsInterfaceGate};
use crate::host::select::{self, SourceKind};
use crate::hypervisor::{HostdevSpec, Hypervisor};
use crate::model::access::HostAccess;
use crate::model::alias::{HostdevAlias, Ownership, ALIAS_PREFIX};
use crate::model::UsbDevice;
use crate::reconcile;
use crate::rules::{Config, RuleChoice};
use std::path::Path;
use std::process::ExitCode;

/// What `--json` prints for one hostdev attached or detached.
#[derive(serde::Serialize)]
struct Done<'a> {
    action: &'static str,
    device: Option<&'a UsbDevice>,
    vm: &'a str,
    alias: &'a str,
}

fn report(json: bool, done: &[Done], text: impl FnOnce()) -> Result<(), CliError> {
    if json {
        println!("{}", serde_json::to_string_pretty(done)?);
    } else {
        text();
    }
    Ok(())
}

/// `keep_off_host`: a device whose rule keeps it off the host gets its interfaces
/// authorized for QEMU before a hand-made attach (the daemon would, but only once it
/// hears of the hostdev) and unauthorized before a detach, as the daemon does.
fn set_access(config: &Config, device: &UsbDevice, access: HostAccess) {
    let kept_off = match config.decide(device) {
        RuleChoice::Rule(rule) => config.keeps_off_host(rule),
        _ => false,
    };
    if !kept_off || select::choose(config.device_source, &config.uri) != SourceKind::Udev {
        return;
    }
    if let Err(error) = SysfsInterfaceGate::new("/sys").apply(device, access) {
        eprintln!("usbpass: warning: {error}");
    }
}

pub fn attach(config_path: &Path, spec: &str, vm: &str, json: bool) -> Result<ExitCode, CliError> {
    let config = load_config_for_reading(config_path)?;
    let (device, devices) = resolve_device(&config, spec)?;
    if device.is_hub() {
        return Err(CliError::AttachHub {
            device: Box::new(device),
        });
    }
    let hypervisor = connect(&config.uri)?;
    let domains = hypervisor.running_domains()?;
    if !domains.iter().any(|domain| domain.name == vm) {
        return Err(CliError::VmNotRunning {
            vm: vm.to_string(),
            uri: config.uri,
        });
    }
    let plan = reconcile::plan(&config, &devices, &domains);
    if let Some(placement) = plan
        .placements
        .iter()
        .find(|p| p.device.syspath == device.syspath)
    {
        if !placement.holders.is_empty() {
            return Err(CliError::AlreadyHeld {
                holders: where_is(placement, true),
                device: Box::new(device),
            });
        }
    }
    let alias = HostdevAlias::for_manual(&device);
    set_access(&config, &device, HostAccess::Vm);
    hypervisor.attach(vm, &HostdevSpec::new(&device, alias.clone()))?;
    let done = [Done {
        action: "attach",
        device: Some(&device),
        vm,
        alias: alias.as_str(),
    }];
    report(json, &done, || {
        println!("attached {device} to vm {vm} as {alias}")
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn detach(config_path: &Path, spec: &str, json: bool) -> Result<ExitCode, CliError> {
    let config = load_config_for_reading(config_path)?;
    let hypervisor = connect(&config.uri)?;
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
            return Err(CliError::NoHostdevWithAlias {
                alias,
                uri: config.uri,
            });
        }
        let mut done = Vec::new();
        for domain in holders {
            hypervisor.detach(domain, &alias)?;
            if !json {
                println!("detached {spec} from vm {domain}");
            }
            done.push(Done {
                action: "detach",
                device: None,
                vm: domain,
                alias: alias.as_str(),
            });
        }
        report(json, &done, || {})?;
        return Ok(ExitCode::SUCCESS);
    }
    let (device, devices) = resolve_device(&config, spec)?;
    let plan = reconcile::plan(&config, &devices, &domains);
    let placement = plan
        .placements
        .iter()
        .find(|p| p.device.syspath == device.syspath)
        .expect("every present device has a placement");
    if placement.holders.is_empty() {
        return Err(CliError::DeviceOnHost {
            device: Box::new(device),
        });
    }
    if placement
        .holders
        .iter()
        .all(|holder| holder.ownership == Ownership::Foreign)
    {
        let holder = &placement.holders[0];
        return Err(CliError::HeldByForeignHostdev {
            device: Box::new(device),
            vm: holder.domain.clone(),
            hostdev: holder
                .alias
                .clone()
                .unwrap_or_else(|| "a hostdev without alias".to_string()),
        });
    }
    let mut done = Vec::new();
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
        set_access(&config, &device, HostAccess::Off);
        hypervisor.detach(&holder.domain, &owned)?;
        if !json {
            println!("detached {device} from vm {} ({alias})", holder.domain);
        }
        done.push(Done {
            action: "detach",
            device: Some(&device),
            vm: &holder.domain,
            alias,
        });
        if holder.ownership == Ownership::Rules {
            if let Some(rule) = &placement.rule {
                eprintln!(
                    "usbpass: warning: rule {rule:?} sends {device} to vm {}; while the daemon runs it will attach it again (use usbpass unassign)",
                    holder.domain
                );
            }
        }
    }
    report(json, &done, || {})?;
    Ok(ExitCode::SUCCESS)
}
