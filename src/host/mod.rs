//! The host's USB devices: the `DeviceSource` seam through which the daemon lists the
//! present ones, read through udev (`udev`) or straight from sysfs (`sysfs`).

mod attributes;
pub mod sysfs;
pub mod udev;

use crate::model::UsbDevice;

/// Lists the USB devices present now. Events keep the list current between calls.
pub trait DeviceSource {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError>;
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{source}")]
    EnumerateThroughUdev {
        #[source]
        source: udev::UsbError,
    },
}
