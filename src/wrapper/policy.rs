//! The per-device decision: whether and how to rewrite each usb-host argument, from the
//! rules for this guest and the settings' default mode.

use super::qemu_args::{Decision, HostDeviceFacts, Selector};
use super::settings::WrapperMode;
use crate::host::sysfs::SysfsUsb;
use crate::model::port::hostport_of;
use crate::model::UsbDevice;
use crate::rules::{Config, ConfigError, ReconnectMode};
use std::path::{Path, PathBuf};

/// The rules file, read only when an argument needs a decision.
enum Rules {
    NotRead(PathBuf),
    Absent,
    Broken,
    Loaded(Config),
}

/// Decides, per usb-host argument, whether and how to rewrite it.
pub(super) struct Policy {
    sysfs: SysfsUsb,
    rules: Rules,
    explicit_mode: Option<WrapperMode>,
    /// This guest's name from `-name`; `None` when the command line has none.
    guest: Option<String>,
    /// The guest's name for messages.
    vm: String,
    /// Lines for the log that belong to no one argument (a broken rules file).
    pub(super) warnings: Vec<String>,
    /// What each decision was based on, by argument, for the info line.
    pub(super) notes: Vec<String>,
}

impl Policy {
    /// Reads nothing yet: sysfs and the rules file are read only when an argument needs
    /// a decision, so that libvirt's probing runs stay silent.
    pub(super) fn new(
        sysfs_root: PathBuf,
        rules_path: PathBuf,
        explicit_mode: Option<WrapperMode>,
        guest: Option<String>,
        vm: String,
    ) -> Policy {
        Policy {
            sysfs: SysfsUsb::new(sysfs_root),
            rules: Rules::NotRead(rules_path),
            explicit_mode,
            guest,
            vm,
            warnings: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn rules(&mut self) -> Option<&Config> {
        if let Rules::NotRead(path) = &self.rules {
            let path = path.clone();
            self.rules = match Config::load(&path) {
                Ok(config) => Rules::Loaded(config),
                Err(ConfigError::ReadFile { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Rules::Absent
                }
                Err(error) => {
                    self.warnings.push(format!(
                        "vm {}: ignoring rules file, using defaults: {error}",
                        self.vm
                    ));
                    Rules::Broken
                }
            };
        }
        match &self.rules {
            Rules::Loaded(config) => Some(config),
            _ => None,
        }
    }

    /// The mode for a device no rule names: the explicit setting, else `id` unless the
    /// rules file names devices, in which case only those are the wrapper's business.
    fn default_mode(&mut self) -> WrapperMode {
        if let Some(mode) = self.explicit_mode {
            return mode;
        }
        match self.rules() {
            Some(config) if !config.rules.is_empty() => WrapperMode::Keep,
            _ => WrapperMode::Reconnect(ReconnectMode::Id),
        }
    }

    /// The first rule naming both this device and this guest decides; a rule for another
    /// VM must not set this guest's mode. Without a guest name every rule counts (as the
    /// daemon's first-match would), and the note says so.
    fn mode_for(&mut self, device: Option<&UsbDevice>) -> (WrapperMode, String) {
        let guest = self.guest.clone();
        let unfiltered = match (&guest, self.rules()) {
            (None, Some(_)) => " (no guest name on the command line: rules for every vm count)",
            _ => "",
        };
        if let Some(device) = device {
            let rule = self.rules().and_then(|config| {
                config.rules.iter().find(|rule| {
                    guest
                        .as_ref()
                        .is_none_or(|guest| rule.vms.iter().any(|vm| vm == guest))
                        && rule.matches(device)
                })
            });
            if let Some(rule) = rule {
                return (
                    WrapperMode::Reconnect(rule.reconnect),
                    format!("rule={}{unfiltered}", rule.name),
                );
            }
        }
        let mode = self.default_mode();
        let source = if self.explicit_mode.is_some() {
            "settings"
        } else {
            "default"
        };
        (mode, format!("rule=none from={source}{unfiltered}"))
    }

    /// The answer `qemu_args::rewrite_args` asks for, for one selector; leaves one note
    /// per call.
    pub(super) fn decide(&mut self, selector: &Selector) -> Decision {
        let device = match selector {
            Selector::BusAddress { bus, address } => {
                self.sysfs.find_by_bus_address(*bus, *address).map(Some)
            }
            Selector::HostDevice(path) => self.sysfs.find_by_node(Path::new(path)).map(Some),
            // Already an ID; a present device only lends its port and serial to rules.
            Selector::VendorProduct {
                vendor_id,
                product_id,
            } => Ok(self
                .sysfs
                .find_by_vendor_product(*vendor_id, *product_id)
                .ok()
                .and_then(|found| found.into_iter().next())),
        };
        let device = match device {
            Ok(device) => device,
            Err(error) => {
                self.notes.push(String::new());
                return Decision::Warn(error.to_string());
            }
        };
        let (mode, source) = self.mode_for(device.as_ref());
        let facts = match (&device, selector) {
            (Some(device), _) => facts_of(device),
            (
                None,
                Selector::VendorProduct {
                    vendor_id,
                    product_id,
                },
            ) => HostDeviceFacts {
                vendor_id: *vendor_id,
                product_id: *product_id,
                bus: 0,
                hostport: None,
            },
            (None, _) => unreachable!("only a vendor:product selector resolves to no device"),
        };
        let described = match &device {
            Some(device) => device.to_string(),
            None => format!(
                "{:04x}:{:04x} (not present)",
                facts.vendor_id, facts.product_id
            ),
        };
        let mode = match mode {
            WrapperMode::Keep => {
                self.notes.push(String::new());
                return Decision::Keep;
            }
            // A device that is not present has neither port nor bus to name.
            WrapperMode::Reconnect(ReconnectMode::Port)
                if facts.hostport.is_none() && facts.bus == 0 =>
            {
                ReconnectMode::Id
            }
            WrapperMode::Reconnect(mode) => mode,
        };
        self.notes.push(format!(
            "device={described} {source} mode={}",
            mode.as_str()
        ));
        Decision::Rewrite { facts, mode }
    }
}

/// The facts `qemu_args` needs, from a device read in sysfs.
fn facts_of(device: &UsbDevice) -> HostDeviceFacts {
    HostDeviceFacts {
        vendor_id: device.vendor_id,
        product_id: device.product_id,
        bus: u32::from(device.bus),
        hostport: hostport_of(&device.port_path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices;

    #[test]
    fn facts_of_a_device_behind_a_hub() {
        let device = devices::device(1, 5, 0x046d, 0xc52b, "1-2.3");
        let facts = facts_of(&device);
        assert_eq!(facts.hostport.as_deref(), Some("2.3"));
        assert_eq!(facts.bus, 1);
    }
}
