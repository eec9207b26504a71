//! Build script: lays out usbpassd's code so that the functions an idle daemon has run
//! sit together at the front (src/bin/usbpassd.order, written by
//! benches/usbpassd-symbol-order), through lld's `--symbol-ordering-file`.
//!
//! A page of code that ran once stays mapped, with up to 64 KiB of its neighbours
//! (the kernel's fault-around). In the compiler's order the daemon's start-up touches
//! most of the program's 64 KiB windows, and an idle daemon keeps all of them; packed
//! together they fill a few (BENCHMARKS.md, idle memory). Nothing else changes: the
//! same functions, in another order.
//!
//! Only where the linker is known to be lld: Rust 1.90 and later link
//! x86_64-unknown-linux-gnu with its own lld unless told otherwise. GNU ld has no such
//! option and would fail the link, so any other target, an older compiler, a linker of
//! the user's choice (`RUSTC_LINKER`, `-C linker...` in the flags) or
//! `USBPASS_NO_SYMBOL_ORDER=1` builds without it.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER_FILE: &str = "src/bin/usbpassd.order";
/// The first line of the order file: the compiler whose symbol names it lists.
const MADE_WITH: &str = "# made with: ";

fn main() {
    println!("cargo::rerun-if-changed={ORDER_FILE}");
    println!("cargo::rerun-if-env-changed=USBPASS_NO_SYMBOL_ORDER");
    // Debug builds have other symbols: the list is for the release build.
    if env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let compiler = compiler_version();
    if let Some(reason) = why_not_ordered(&compiler) {
        println!("cargo::warning=usbpassd is linked without its symbol order: {reason}");
        return;
    }
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(ORDER_FILE);
    // Symbol names carry a hash that changes with the compiler: a list made with another
    // one names almost nothing in this build. Say so, rather than link a daemon that
    // quietly keeps twice the pages.
    let made_with = std::fs::read_to_string(&order)
        .ok()
        .and_then(|text| {
            text.lines()
                .next()
                .and_then(|line| line.strip_prefix(MADE_WITH))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    if made_with.trim() != compiler.trim() {
        println!(
            "cargo::warning={ORDER_FILE} was made with {made_with:?}, this build uses {compiler:?}: \
             run benches/usbpassd-symbol-order to lay usbpassd out for this compiler"
        );
    }
    println!(
        "cargo::rustc-link-arg-bin=usbpassd=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // A function the list names but this build does not have (renamed, inlined, another
    // compiler's symbol hash) is laid out where the compiler put it; not worth a warning.
    println!("cargo::rustc-link-arg-bin=usbpassd=-Wl,--no-warn-symbol-ordering");
}

/// Why this build cannot hand the order to the linker, if it cannot.
fn why_not_ordered(compiler: &str) -> Option<String> {
    if env::var_os("USBPASS_NO_SYMBOL_ORDER").is_some_and(|value| value != "0") {
        return Some("USBPASS_NO_SYMBOL_ORDER is set".into());
    }
    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" {
        return Some(format!("target {target} may not link with lld"));
    }
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        return Some(format!(
            "the linker {linker} was chosen in cargo's configuration"
        ));
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return Some("RUSTFLAGS choose the linker".into());
    }
    let minor = compiler
        .split_whitespace()
        .nth(1)
        .and_then(|number| number.split('.').nth(1))
        .and_then(|minor| minor.parse::<u32>().ok());
    match minor {
        Some(minor) if minor >= 90 => None,
        _ => Some(format!("{compiler} links with the system linker")),
    }
}

/// `rustc --version` of the compiler cargo runs, e.g. "rustc 1.95.0 (59807616e 2026-04-14)".
fn compiler_version() -> String {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|version| version.trim().to_owned())
        .unwrap_or_default()
}
