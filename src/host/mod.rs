//! The host's USB devices.

pub mod sysfs;
pub mod udev;
