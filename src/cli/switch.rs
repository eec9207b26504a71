//! `usbpass switch GROUP TARGET`: asks the running daemon, over its control socket, to
//! move a device group, and prints each device's result. Exits non-zero when any
//! device did not get where it should.

use super::CliError;
use crate::daemon::control::{self, SwitchReply, SwitchRequest, SwitchTo};
use std::path::Path;
use std::process::ExitCode;

pub fn switch(
    state_path: &Path,
    group: &str,
    target: Option<&str>,
    rules: bool,
    timeout_seconds: u64,
    json: bool,
) -> Result<ExitCode, CliError> {
    let to = match (rules, target) {
        (true, _) => SwitchTo::Rules,
        (false, Some("host")) => SwitchTo::Host,
        (false, Some("next")) => SwitchTo::Next,
        (false, Some(vm)) => SwitchTo::Vm(vm.to_string()),
        // clap requires a target unless --rules.
        (false, None) => SwitchTo::Rules,
    };
    let request = SwitchRequest {
        group: group.to_string(),
        to,
        timeout_ms: timeout_seconds.saturating_mul(1000),
    };
    let directory = state_path.parent().unwrap_or(Path::new("."));
    let reply =
        control::request_switch(directory, &request).map_err(|source| CliError::ReachDaemon {
            socket: directory.join(control::CONTROL_SOCKET_NAME),
            source,
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print_reply(&reply);
    }
    if reply.ok {
        Ok(ExitCode::SUCCESS)
    } else {
        if !json {
            if let Some(error) = &reply.error {
                eprintln!("usbpass: switch of group {}: {error}", reply.group);
            }
        }
        Ok(ExitCode::FAILURE)
    }
}

fn print_reply(reply: &SwitchReply) {
    if reply.target.is_empty() {
        return;
    }
    println!(
        "group {} -> {}: {} devices, {} in place after {} ms",
        reply.group,
        reply.target,
        reply.devices.len(),
        reply
            .devices
            .iter()
            .filter(|device| device.in_place)
            .count(),
        reply.milliseconds
    );
    for device in &reply.devices {
        println!(
            "  {}  {}: {}{}",
            device.device,
            super::table::printable(&device.name),
            if device.in_place {
                format!("in {}", device.place)
            } else {
                format!("NOT in place, in {}", device.place)
            },
            device
                .error
                .as_deref()
                .map_or_else(String::new, |error| format!(" ({error})"))
        );
    }
}
