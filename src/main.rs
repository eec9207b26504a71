//! The `usbpass` binary: parses the command line, sets up logging and hands over to
//! `usbpass::cli`. The only place `anyhow` is used.

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use usbpass::cli::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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

/// stderr logging. Under journald (JOURNAL_STREAM set) lines carry `<N>` priority
/// prefixes and no timestamp, since journald adds its own.
fn init_logging() {
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("USBPASS_LOG", "info"))
        .format(move |buffer, record| {
            if under_journald {
                let priority = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                writeln!(buffer, "<{priority}>{}", record.args())
            } else {
                writeln!(
                    buffer,
                    "{} {:5} {}",
                    buffer.timestamp_millis(),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}
