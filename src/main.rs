//! The `usbpass` binary: parses the command line, sets up logging and hands over to
//! `usbpass::cli`. With `usbpassd` the only place `anyhow` is used.

use clap::Parser;
use std::process::ExitCode;
use usbpass::cli::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    usbpass::cli::logging::init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("usbpass: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    Ok(usbpass::cli::run(cli)?)
}
