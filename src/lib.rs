//! usbpass: keeps named USB devices inside the right running libvirt VM.
//!
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod atomic_file;
pub mod config;
pub mod device;
pub mod event;
pub mod hypervisor;
pub mod notify;
pub mod qemu_args;
pub mod reconcile;
pub mod rules_edit;
pub mod state;
pub mod sysfs_usb;
pub mod udev_rules;
pub mod watch;
