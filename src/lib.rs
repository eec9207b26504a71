//! usbpass: keeps named USB devices inside the right running libvirt VM.
//!
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod cli;
pub mod daemon;
pub mod event;
pub mod host;
pub mod hypervisor;
pub mod model;
pub mod reconcile;
pub mod rules;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod util;
pub mod wrapper;
