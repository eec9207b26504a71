//! usbpass: keeps named USB devices inside the right running libvirt VM.
//!
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod atomic_file;
pub mod config;
pub mod daemon;
pub mod device;
pub mod device_spec;
pub mod event;
pub mod fake_hypervisor;
pub mod hostdev_xml;
pub mod hypervisor;
pub mod libvirt;
pub mod notify;
pub mod qemu_args;
pub mod reconcile;
pub mod rules_edit;
pub mod state;
pub mod sysfs_usb;
pub mod udev_rules;
pub mod usb;
pub mod watch;
