//! The `usbpass-qemu` emulator wrapper's logic.

pub mod qemu_args;
pub mod udev_rules;
