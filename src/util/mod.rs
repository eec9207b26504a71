//! Small helpers with no knowledge of USB, libvirt or the rules: atomic file
//! replacement, C's number parsing, a work queue whose thread exists only while it
//! has work, and the release of a parked thread's unused stack.

pub mod atomic_file;
pub mod c_number;
pub mod on_demand;
pub mod stack;
