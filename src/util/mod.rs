//! Small helpers with no knowledge of USB, libvirt or the rules: atomic file
//! replacement, C's number parsing, and a work queue whose thread exists only while it
//! has work.

pub mod atomic_file;
pub mod c_number;
pub mod on_demand;
