//! The host's USB devices: the `DeviceSource` seam through which the daemon lists the
//! present ones (`udev::UdevDeviceSource` on a host), and the two readers, udev (`udev`,
//! for the daemon and the CLI) and sysfs (`sysfs`, for the wrapper), which turn a device
//! into a `UsbDevice` through one conversion (`attributes`).

mod attributes;
pub mod sysfs;
pub mod udev;

use crate::model::UsbDevice;

/// Lists the USB devices present now. Events keep the list current between calls.
pub trait DeviceSource {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError>;
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
}
