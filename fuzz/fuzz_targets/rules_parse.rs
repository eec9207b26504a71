//! Fuzz target: the rules file parser (`Config::parse`), TOML text to a `Config` or an
//! error. It must never panic, and an error must keep the contract the CLI prints it
//! under: one line, pointing at a line and column inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use usbpass::rules::Config;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the file with `read_to_string`, so non-UTF-8 never reaches the
    // parser; lossy conversion keeps such inputs useful instead of discarding them.
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new("/fuzz/usbpass.toml")) {
        Ok(config) => {
            // Matching must not panic on what the parser accepted either.
            let device = usbpass::testing::devices::device(1, 2, 0x046d, 0xc52b, "1-2");
            let _ = config.decide(&device);
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains('\n'), "multi-line error: {message:?}");
            if let Some((line, column)) = error.location() {
                let lines = text.split('\n').count();
                assert!(
                    line >= 1 && line <= lines,
                    "line {line} of {lines}: {message}"
                );
                assert!(column >= 1, "column {column}: {message}");
            }
        }
    }
});
