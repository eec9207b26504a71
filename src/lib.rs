//! usbpass: keeps named USB devices inside the right running libvirt VM.
//!
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod device;
pub mod event;
pub mod hostdev_xml;
pub mod hypervisor;
pub mod libvirt;
