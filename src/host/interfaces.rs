//! The kernel's USB interface authorization, for `keep_off_host`: the `InterfaceGate`
//! seam the daemon keeps host drivers off devices through, and its one implementation
//! on sysfs (`SysfsInterfaceGate`).
//!
//! What the kernel does (drivers/usb/core): a root hub's `interface_authorized_default`
//! sets a flag of its host controller, read by `usb_set_configuration` for every
//! interface it creates on that bus, behind any hub; an unauthorized interface is
//! refused by `usb_probe_interface` (no host driver) and by
//! `usb_driver_claim_interface` (no usbfs claim, so QEMU cannot take it either);
//! writing 1 to an interface's `authorized` only sets the flag, it does not probe;
//! writing 0 unbinds whatever driver has it. `/sys/bus/usb/drivers_probe` probes one
//! interface by name, as the kernel would at plug.

use crate::model::access::HostAccess;
use crate::model::UsbDevice;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Sets who may use a device's interfaces. `Send`: the daemon's loop owns it.
pub trait InterfaceGate: Send {
    /// `off`: every root hub's `interface_authorized_default` becomes 0, so new devices'
    /// interfaces are born unauthorized. `!off`: the hubs this gate turned off are
    /// turned back on. Returns the hubs it changed.
    fn set_hub_default(&mut self, off: bool) -> Result<Vec<String>, InterfaceError>;

    /// Makes the device's interfaces what `access` says (`HostAccess`); returns the
    /// interfaces it changed. A device already gone is no error: nothing changed.
    fn apply(
        &mut self,
        device: &UsbDevice,
        access: HostAccess,
    ) -> Result<Vec<String>, InterfaceError>;
}

/// A failed read or write of the kernel's authorization attributes.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("cannot list the root hubs in {}: {source}", path.display())]
    ListRootHubs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set interface_authorized_default of root hub {hub} at {}: {source}", path.display())]
    SetHubDefault {
        hub: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the interfaces of device {device} in {}: {source}", path.display())]
    ListInterfaces {
        device: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read authorized of interface {interface} of device {device} at {}: {source}", path.display())]
    ReadAuthorized {
        device: String,
        interface: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value} to authorized of interface {interface} of device {device} at {}: {source}", path.display())]
    WriteAuthorized {
        device: String,
        interface: String,
        value: u8,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot probe host drivers for interface {interface} of device {device} through {}: {source}", path.display())]
    ProbeDrivers {
        device: String,
        interface: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl InterfaceError {
    /// sysfs is mounted read-only here, as systemd's `ProtectKernelTunables=yes` does.
    pub fn is_read_only_sysfs(&self) -> bool {
        let source = match self {
            InterfaceError::ListRootHubs { source, .. }
            | InterfaceError::SetHubDefault { source, .. }
            | InterfaceError::ListInterfaces { source, .. }
            | InterfaceError::ReadAuthorized { source, .. }
            | InterfaceError::WriteAuthorized { source, .. }
            | InterfaceError::ProbeDrivers { source, .. } => source,
        };
        source.raw_os_error() == Some(libc::EROFS)
    }
}

/// The gate on sysfs. `sys` is where sysfs is mounted (`/sys`; a folder of files in
/// tests); a device's interfaces are found under its own `syspath`.
#[derive(Debug)]
pub struct SysfsInterfaceGate {
    sys: PathBuf,
    /// Root hubs this gate set to 0, by their `interface_authorized_default` path.
    turned_off: BTreeSet<PathBuf>,
}

impl SysfsInterfaceGate {
    pub fn new(sys: impl Into<PathBuf>) -> SysfsInterfaceGate {
        SysfsInterfaceGate {
            sys: sys.into(),
            turned_off: BTreeSet::new(),
        }
    }

    fn root_hubs(&self) -> Result<Vec<(String, PathBuf)>, InterfaceError> {
        let devices = self.sys.join("bus/usb/devices");
        let entries =
            std::fs::read_dir(&devices).map_err(|source| InterfaceError::ListRootHubs {
                path: devices.clone(),
                source,
            })?;
        let mut hubs: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| {
                name.strip_prefix("usb")
                    .is_some_and(|bus| !bus.is_empty() && bus.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|name| {
                let path = devices.join(&name).join("interface_authorized_default");
                (name, path)
            })
            .collect();
        hubs.sort();
        Ok(hubs)
    }
}

/// `0` or `1`, as the kernel writes it.
fn read_flag(path: &Path) -> std::io::Result<bool> {
    Ok(std::fs::read_to_string(path)?.trim() == "1")
}

/// Writes an existing attribute (sysfs files are never created).
fn write_attribute(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// The interfaces of the device in `dir`: its children named `<device>:<config>.<n>`.
fn interfaces_of(dir: &Path) -> std::io::Result<Vec<String>> {
    let name = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!("{name}:");
    let mut interfaces: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|child| child.starts_with(&prefix))
        .collect();
    interfaces.sort();
    Ok(interfaces)
}

impl InterfaceGate for SysfsInterfaceGate {
    fn set_hub_default(&mut self, off: bool) -> Result<Vec<String>, InterfaceError> {
        let mut changed = Vec::new();
        for (hub, path) in self.root_hubs()? {
            let failed = |source| InterfaceError::SetHubDefault {
                hub: hub.clone(),
                path: path.clone(),
                source,
            };
            if off {
                if read_flag(&path).map_err(failed)? {
                    write_attribute(&path, "0").map_err(failed)?;
                    self.turned_off.insert(path.clone());
                    changed.push(hub);
                }
            } else if self.turned_off.contains(&path) {
                write_attribute(&path, "1").map_err(failed)?;
                self.turned_off.remove(&path);
                changed.push(hub);
            }
        }
        if !off {
            // Hubs gone since (a controller unbound) are nothing to restore.
            self.turned_off.clear();
        }
        Ok(changed)
    }

    fn apply(
        &mut self,
        device: &UsbDevice,
        access: HostAccess,
    ) -> Result<Vec<String>, InterfaceError> {
        let dir = Path::new(&device.syspath);
        let name = device.to_string();
        let interfaces = match interfaces_of(dir) {
            Ok(interfaces) => interfaces,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(InterfaceError::ListInterfaces {
                    device: name,
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let wanted = access != HostAccess::Off;
        let mut changed = Vec::new();
        for interface in interfaces {
            let path = dir.join(&interface).join("authorized");
            let authorized = match read_flag(&path) {
                Ok(authorized) => authorized,
                // Gone with its device, or a configuration change under way.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(InterfaceError::ReadAuthorized {
                        device: name,
                        interface,
                        path,
                        source,
                    })
                }
            };
            if authorized == wanted {
                continue;
            }
            let value = u8::from(wanted);
            write_attribute(&path, if wanted { "1" } else { "0" }).map_err(|source| {
                InterfaceError::WriteAuthorized {
                    device: name.clone(),
                    interface: interface.clone(),
                    value,
                    path: path.clone(),
                    source,
                }
            })?;
            if access == HostAccess::Host {
                let probe = self.sys.join("bus/usb/drivers_probe");
                write_attribute(&probe, &interface).map_err(|source| {
                    InterfaceError::ProbeDrivers {
                        device: name.clone(),
                        interface: interface.clone(),
                        path: probe.clone(),
                        source,
                    }
                })?;
            }
            changed.push(interface);
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices::device;

    /// A sysfs of files: two root hubs and one device with two interfaces.
    struct FakeSys {
        dir: tempfile::TempDir,
        device: UsbDevice,
    }

    impl FakeSys {
        fn new() -> FakeSys {
            let dir = tempfile::tempdir().unwrap();
            let sys = dir.path();
            for hub in ["usb1", "usb2"] {
                let path = sys.join("bus/usb/devices").join(hub);
                std::fs::create_dir_all(&path).unwrap();
                std::fs::write(path.join("interface_authorized_default"), "1\n").unwrap();
            }
            std::fs::create_dir_all(sys.join("bus/usb/devices/2-1")).unwrap();
            std::fs::write(sys.join("bus/usb/drivers_probe"), "").unwrap();
            let mut device = device(2, 3, 0x46f4, 0x0001, "2-1");
            device.syspath = sys.join("bus/usb/devices/2-1").display().to_string();
            for interface in ["2-1:1.0", "2-1:1.1"] {
                let path = sys.join("bus/usb/devices/2-1").join(interface);
                std::fs::create_dir_all(&path).unwrap();
                std::fs::write(path.join("authorized"), "0\n").unwrap();
            }
            FakeSys { dir, device }
        }

        fn read(&self, relative: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(relative))
                .unwrap()
                .trim()
                .to_string()
        }

        fn gate(&self) -> SysfsInterfaceGate {
            SysfsInterfaceGate::new(self.dir.path())
        }
    }

    #[test]
    fn hub_defaults_are_turned_off_and_only_those_back_on() {
        let sys = FakeSys::new();
        // Someone else (a USBGuard-like policy) keeps usb2 at 0: not ours to restore.
        std::fs::write(
            sys.dir
                .path()
                .join("bus/usb/devices/usb2/interface_authorized_default"),
            "0",
        )
        .unwrap();
        let mut gate = sys.gate();
        assert_eq!(gate.set_hub_default(true).unwrap(), ["usb1"]);
        assert_eq!(
            sys.read("bus/usb/devices/usb1/interface_authorized_default"),
            "0"
        );
        assert!(gate.set_hub_default(true).unwrap().is_empty(), "idempotent");
        assert_eq!(gate.set_hub_default(false).unwrap(), ["usb1"]);
        assert_eq!(
            sys.read("bus/usb/devices/usb1/interface_authorized_default"),
            "1"
        );
        assert_eq!(
            sys.read("bus/usb/devices/usb2/interface_authorized_default"),
            "0"
        );
    }

    #[test]
    fn vm_authorizes_without_probing_and_host_probes() {
        let sys = FakeSys::new();
        let mut gate = sys.gate();
        assert_eq!(
            gate.apply(&sys.device, HostAccess::Vm).unwrap(),
            ["2-1:1.0", "2-1:1.1"]
        );
        assert_eq!(sys.read("bus/usb/devices/2-1/2-1:1.0/authorized"), "1");
        assert_eq!(sys.read("bus/usb/drivers_probe"), "", "no probe for a vm");
        assert!(gate.apply(&sys.device, HostAccess::Vm).unwrap().is_empty());

        assert_eq!(gate.apply(&sys.device, HostAccess::Off).unwrap().len(), 2);
        assert_eq!(sys.read("bus/usb/devices/2-1/2-1:1.1/authorized"), "0");

        assert_eq!(gate.apply(&sys.device, HostAccess::Host).unwrap().len(), 2);
        assert_eq!(sys.read("bus/usb/devices/2-1/2-1:1.1/authorized"), "1");
        // The last interface probed is what the file holds now.
        assert_eq!(sys.read("bus/usb/drivers_probe"), "2-1:1.1");
    }

    #[test]
    fn a_device_gone_is_no_error_and_a_failed_write_names_the_path() {
        let sys = FakeSys::new();
        let mut gate = sys.gate();
        let mut gone = sys.device.clone();
        gone.syspath = sys.dir.path().join("nowhere/2-9").display().to_string();
        assert!(gate.apply(&gone, HostAccess::Off).unwrap().is_empty());

        // An attribute that is a folder cannot be written.
        let attribute = sys
            .dir
            .path()
            .join("bus/usb/devices/2-1/2-1:1.0/authorized");
        std::fs::remove_file(&attribute).unwrap();
        std::fs::create_dir(&attribute).unwrap();
        let error = gate
            .apply(&sys.device, HostAccess::Vm)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cannot read authorized of interface 2-1:1.0 of device"),
            "{error}"
        );
        assert!(error.contains(&attribute.display().to_string()), "{error}");
    }
}
