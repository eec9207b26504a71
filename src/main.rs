//! The `usbpass` binary: the command line, and the only place `anyhow` is used.

fn main() -> anyhow::Result<()> {
    Ok(())
}
