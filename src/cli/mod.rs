//! The `usbpass` command line.

pub mod device_spec;
