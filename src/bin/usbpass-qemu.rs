//! The `usbpass-qemu` emulator wrapper binary.

fn main() {}
