//! Logging for both binaries: stderr lines, with journald priorities under systemd.

use std::io::Write;

/// stderr logging at the level in `USBPASS_LOG` (default info). Under journald
/// (JOURNAL_STREAM set) lines carry `<N>` priority prefixes and no timestamp, since
/// journald adds its own.
pub fn init_logging() {
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
