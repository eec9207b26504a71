//! The commands that change the rules file: `usbpass assign` and `usbpass unassign`
//! (edits kept with comments and order, validated, then written atomically), and
//! `usbpass check`.

use super::device_spec::{self, ResolveError, SpecKind};
use super::{present_devices, resolve_device, CliError};
use crate::host::select;
use crate::hypervisor::libvirt;
use crate::model::{UsbDevice, UsbId};
use crate::rules::edit::{self as rules_edit, AssignBy, UnassignTarget};
use crate::rules::{Config, ConfigError};
use crate::util::atomic_file;
use std::path::Path;
use std::process::ExitCode;

/// `usbpass check`: the rules file parses and validates, and the device source it
/// selects can serve every rule (the daemon refuses the same file the same way).
pub fn check(config_path: &Path, json: bool) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    let source = select::choose(config.device_source, &config.uri);
    select::check_rules(&config, source)?;
    if json {
        let report = serde_json::json!({
            "path": config_path.to_string_lossy(),
            "ok": true,
            "rules": config.rules.len(),
            "groups": config.groups(),
            "uri": config.uri,
            "device_source": source.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: ok, {} rules, libvirt uri {}, usb devices from {}",
        config_path.display(),
        config.rules.len(),
        config.uri,
        source
    );
    Ok(ExitCode::SUCCESS)
}

/// The rules file's text; a missing file reads as empty when `missing_is_empty`.
fn read_rules_text(config_path: &Path, missing_is_empty: bool) -> Result<String, CliError> {
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
fn write_rules_edit(config_path: &Path, edit: rules_edit::Edit) -> Result<ExitCode, CliError> {
    atomic_file::write(
        config_path,
        edit.text.as_bytes(),
        0o644,
        atomic_file::Durability::Synced,
    )?;
    println!("{}: {}", config_path.display(), edit.summary);
    Ok(ExitCode::SUCCESS)
}

pub fn assign(
    config_path: &Path,
    spec: &str,
    vm: &str,
    by: AssignBy,
) -> Result<ExitCode, CliError> {
    let text = read_rules_text(config_path, true)?;
    let config = Config::parse(&text, config_path)?;
    let spec = device_spec::parse_device_spec(spec)?;
    let devices = present_devices(&config)?;
    // A model or a port can be given a VM before anything is plugged in; one device
    // (a bus address, a serial) has to be present to be told apart.
    let (device, absent) = match device_spec::resolve(&spec, &devices) {
        Ok(device) => (device.clone(), false),
        Err(ResolveError::FindDevice { .. }) => match (&spec.kind, by) {
            (SpecKind::Id(id), AssignBy::Id) => (UsbDevice::not_plugged_in(*id, ""), true),
            (SpecKind::Port(port), AssignBy::Port) => {
                (UsbDevice::not_plugged_in(UsbId::default(), port), true)
            }
            _ => return Err(device_spec::resolve(&spec, &devices).unwrap_err().into()),
        },
        Err(error) => return Err(error.into()),
    };
    let edit = rules_edit::assign(&text, config_path, &device, vm, by)?;
    // A rule the daemon's device source cannot serve is not written.
    let edited = Config::parse(&edit.text, config_path)?;
    select::check_rules(&edited, select::choose(edited.device_source, &edited.uri))?;
    let uri = edited.uri.clone();
    let code = write_rules_edit(config_path, edit)?;
    if absent {
        println!("nothing plugged in matches {spec} yet: the rule applies when it is");
    }
    warn_if_vm_unknown(&uri, vm);
    Ok(code)
}

/// A VM name libvirt does not know is most likely a typo that would never match: say
/// so, with the names it does know. The rule is written all the same (the VM may be
/// defined later).
fn warn_if_vm_unknown(uri: &str, vm: &str) {
    match libvirt::defined_domain_names(uri) {
        Ok(names) if names.iter().any(|name| name == vm) => {}
        Ok(names) => eprintln!(
            "usbpass: warning: no vm named {vm:?} is defined at {uri}; defined vms: {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ),
        Err(error) => eprintln!("usbpass: warning: cannot check that vm {vm:?} exists: {error}"),
    }
}

pub fn unassign(config_path: &Path, target: &str) -> Result<ExitCode, CliError> {
    let text = read_rules_text(config_path, false)?;
    let config = Config::parse(&text, config_path)?;
    let edit = if config.rules.iter().any(|rule| rule.name == target) {
        rules_edit::unassign(&text, config_path, UnassignTarget::Rule(target))?
    } else {
        let (device, devices) = resolve_device(&config, target)?;
        rules_edit::unassign(
            &text,
            config_path,
            UnassignTarget::Device(&device, &devices),
        )?
    };
    write_rules_edit(config_path, edit)
}
