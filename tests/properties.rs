//! Property tests (proptest) of the pure parts: `reconcile::plan` converges and spares
//! foreign hostdevs, the QEMU argv rewriter keeps what it does not own, and the hostdev
//! XML builder and reader round-trip. What each property states, and the case counts,
//! are in RELIABILITY.md; run with `cargo test --test properties`.
//!
//! Case counts are set per property so that the whole file stays well under 30 s in a
//! debug build on a slow two-core machine; `PROPTEST_CASES=10000` runs more.

use proptest::test_runner::Config;

/// `cases` cases, unless `PROPTEST_CASES` asks for another number.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Shrunk failures are reported in the test output and kept as plain unit
        // tests, not as files under tests/.
        failure_persistence: None,
        ..Config::default()
    }
}

mod properties {
    pub mod hostdev_xml;
    pub mod qemu_args;
    pub mod reconcile;
}
