//! Test doubles and fixtures shared by the unit tests, the integration tests and the
//! benchmarks. Compiled only for tests and with the `testing` feature, never into the
//! shipped binaries.

pub mod devices;
pub mod fake_gate;
pub mod fake_hypervisor;
