//! Small helpers with no knowledge of USB, libvirt or the rules: atomic file
//! replacement and C's number parsing.

pub mod atomic_file;
pub mod c_number;
