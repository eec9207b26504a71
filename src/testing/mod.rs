//! Test doubles shared by the unit tests, the integration tests and the benchmarks.

pub mod fake_hypervisor;
