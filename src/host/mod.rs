//! The host's USB devices: the `DeviceSource` seam through which the daemon lists the
//! present ones (`udev::UdevDeviceSource` on this machine; libvirt's node devices, in
//! `hypervisor::libvirt::node_device_source`, for the host a remote uri reaches), the
//! choice between the two (`select`), and the two readers, udev (`udev`, for the daemon
//! and the CLI) and sysfs (`sysfs`, for the wrapper), which turn a device into a
//! `UsbDevice` through one conversion (`attributes`). For `keep_off_host`, the
//! `InterfaceGate` seam to the kernel's interface authorization (`interfaces`); for
//! `usbpass reset`, usbfs through libusb (`usbfs`).

mod attributes;
pub mod interfaces;
pub mod select;
pub mod sysfs;
pub mod udev;
pub mod usbfs;

use crate::model::UsbDevice;
use crate::rules::Config;

/// Lists the USB devices present now. Events keep the list current between calls.
pub trait DeviceSource {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError>;

    /// Whether this source can serve a (re)loaded rules file: refused when the file
    /// selects another source (`select::choose`) or has a rule that needs what this one
    /// cannot tell (`select::check_rules`). The default, for fakes, accepts everything.
    fn accepts(&self, _config: &Config) -> Result<(), select::SourceRefusal> {
        Ok(())
    }
}

/// Why a `DeviceSource` could not list the devices. The message is the reader's own:
/// the daemon puts `cannot enumerate usb devices: ` before it.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{source}")]
    EnumerateThroughUdev {
        #[source]
        source: self::udev::UsbError,
    },
    #[error("cannot list libvirt's node devices at {uri}: {message}")]
    EnumerateThroughLibvirt { uri: String, message: String },
}
