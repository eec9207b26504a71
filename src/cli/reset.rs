//! `usbpass reset DEVICE`: a USB port reset of a device on this machine, through
//! libusb (`host::usbfs`), refused for a device a running VM holds unless `--force`.

use super::{connect, load_config_for_reading, resolve_device, CliError};
use crate::host::select::{self, SourceKind};
use crate::host::usbfs::{self, ResetOutcome};
use crate::hypervisor::Hypervisor;
use crate::model::UsbDevice;
use crate::reconcile;
use std::path::Path;
use std::process::ExitCode;

/// What `--json` prints.
#[derive(serde::Serialize)]
struct Done<'a> {
    action: &'static str,
    device: &'a UsbDevice,
    /// The device came back under a new device number.
    reenumerated: bool,
}

pub fn reset(
    config_path: &Path,
    spec: &str,
    force: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let config = load_config_for_reading(config_path)?;
    if select::choose(config.device_source, &config.uri) != SourceKind::Udev {
        return Err(CliError::ResetRemoteDevice { uri: config.uri });
    }
    let (device, devices) = resolve_device(&config, spec)?;
    if device.is_hub() && !force {
        return Err(CliError::ResetHub {
            device: Box::new(device),
        });
    }
    if !force {
        let domains = connect(&config.uri)
            .and_then(|hypervisor| Ok(hypervisor.running_domains()?))
            .map_err(|error| CliError::ResetWithoutVms {
                device: Box::new(device.clone()),
                message: error.to_string(),
            })?;
        let plan = reconcile::plan(&config, &devices, &domains);
        if let Some(holder) = plan
            .placements
            .iter()
            .find(|p| p.device.syspath == device.syspath)
            .and_then(|p| p.holders.first())
        {
            return Err(CliError::ResetHeldDevice {
                device: Box::new(device.clone()),
                vm: holder.domain.clone(),
            });
        }
    }
    let outcome = usbfs::reset(device.address())?;
    let reenumerated = outcome == ResetOutcome::Reenumerated;
    if json {
        let done = Done {
            action: "reset",
            device: &device,
            reenumerated,
        };
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else if reenumerated {
        println!("reset {device}: it comes back under a new device number");
    } else {
        println!("reset {device}");
    }
    Ok(ExitCode::SUCCESS)
}
