//! A device's usbfs node through libusb (`rusb`): `usbpass reset`, the USB port reset
//! of a device on the host (`USBDEVFS_RESET`), the usual remedy for a wedged one. The
//! only module that opens a device node.

use crate::model::BusAddress;

/// What a reset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOutcome {
    /// Reset, and the device kept its address and descriptors.
    Reset,
    /// Reset, and the kernel enumerates it again (libusb's `NOT_FOUND` after a reset):
    /// its descriptors changed or its state could not be restored, and it comes back
    /// under a new device number.
    Reenumerated,
}

/// A failed reset, naming the device.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot list usb devices through libusb: {source}")]
    ListDevices {
        #[source]
        source: rusb::Error,
    },
    #[error("no usb device at {address} in libusb's list")]
    FindDevice { address: BusAddress },
    #[error("cannot open usb device {address} through usbfs: {source}")]
    OpenDevice {
        address: BusAddress,
        #[source]
        source: rusb::Error,
    },
    #[error("cannot reset usb device {address}: {source}")]
    ResetDevice {
        address: BusAddress,
        #[source]
        source: rusb::Error,
    },
}

/// Resets the device at `address` (bus and device number, as `usbpass list` shows).
pub fn reset(address: BusAddress) -> Result<ResetOutcome, ResetError> {
    let devices = rusb::devices().map_err(|source| ResetError::ListDevices { source })?;
    let device = devices
        .iter()
        .find(|device| {
            u16::from(device.bus_number()) == address.bus
                && u16::from(device.address()) == address.device
        })
        .ok_or(ResetError::FindDevice { address })?;
    let handle = device
        .open()
        .map_err(|source| ResetError::OpenDevice { address, source })?;
    match handle.reset() {
        Ok(()) => Ok(ResetOutcome::Reset),
        Err(rusb::Error::NotFound) => Ok(ResetOutcome::Reenumerated),
        Err(source) => Err(ResetError::ResetDevice { address, source }),
    }
}
