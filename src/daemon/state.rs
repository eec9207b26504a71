//! The daemon's state file under `/run/usbpass/`: what it holds where and its last
//! errors, written atomically after each reconcile and read by `usbpass status`.

use crate::hypervisor::FailureKind;
use crate::reconcile::Placement;
use crate::util::atomic_file::{self, AtomicWriteError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_PATH: &str = "/run/usbpass/state.json";
/// Bumped when a field changes meaning, so an old CLI can say so instead of misreading.
pub const STATE_FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode state file {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} has format {found}, this usbpass reads format {STATE_FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

/// A failed action the daemon is waiting to retry, or has given up on until the next
/// event for that device or VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionFailure {
    pub action: String,
    pub domain: String,
    pub alias: String,
    pub device: String,
    pub kind: FailureKind,
    pub message: String,
    pub attempts: u32,
    /// Unix time of the last attempt, in seconds.
    pub last_attempt: u64,
    /// Milliseconds until the next attempt, or `None` once the daemon waits for an event.
    pub retry_in_ms: Option<u64>,
}

/// A running VM the daemon leaves alone for now: a call to it is past its deadline
/// and has not returned (`timed-out`), or its live XML could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNotAnswering {
    pub name: String,
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtStatus {
    pub uri: String,
    pub connected: bool,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonState {
    pub format: u32,
    pub pid: u32,
    pub version: String,
    /// Unix times in seconds.
    pub started_at: u64,
    pub updated_at: u64,
    /// For people to read: a path that is not UTF-8 is written with its odd bytes
    /// replaced (JSON holds only text), not refused.
    #[serde(serialize_with = "serialize_path_lossily")]
    pub config_path: PathBuf,
    /// Set while a broken rules file is refused and the previous rules stay in force.
    pub config_error: Option<String>,
    pub rule_count: usize,
    pub libvirt: LibvirtStatus,
    pub running_vms: Vec<String>,
    /// Running VMs that get no call until they answer; absent in files from before it.
    #[serde(default)]
    pub vms_not_answering: Vec<VmNotAnswering>,
    pub devices: Vec<Placement>,
    /// Failed actions still wanted, waiting for a retry or an event.
    pub failures: Vec<ActionFailure>,
    /// The last failures, newest last, including those no longer wanted.
    pub recent_failures: Vec<ActionFailure>,
    /// Device groups switched with `usbpass switch`: group to `win11` or `host`.
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, String>,
}

impl DaemonState {
    pub fn write(&self, path: &Path) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|source| StateError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        bytes.push(b'\n');
        atomic_file::write(path, &bytes, 0o644, atomic_file::Durability::Volatile)?;
        Ok(())
    }

    pub fn read(path: &Path) -> Result<DaemonState, StateError> {
        let bytes = std::fs::read(path).map_err(|source| StateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u32,
        }
        let format = serde_json::from_slice::<FormatOnly>(&bytes)
            .map_err(|source| StateError::Decode {
                path: path.to_path_buf(),
                source,
            })?
            .format;
        if format != STATE_FORMAT {
            return Err(StateError::Format {
                path: path.to_path_buf(),
                found: format,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| StateError::Decode {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn serialize_path_lossily<S: serde::Serializer>(
    path: &Path,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_rules_path_that_is_not_utf8_is_written_not_a_panic() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("state.json");
        let state = DaemonState {
            format: STATE_FORMAT,
            pid: 1,
            version: "0".into(),
            started_at: 0,
            updated_at: 0,
            config_path: PathBuf::from(std::ffi::OsStr::from_bytes(b"/etc/usb\xffpass.toml")),
            config_error: None,
            rule_count: 0,
            libvirt: LibvirtStatus {
                uri: "qemu:///system".into(),
                connected: false,
                last_error: None,
            },
            running_vms: vec![],
            devices: vec![],
            failures: vec![],
            recent_failures: vec![],
            vms_not_answering: vec![],
            groups: Default::default(),
        };
        state.write(&path).unwrap();
        let read = DaemonState::read(&path).unwrap();
        assert_eq!(read.config_path, PathBuf::from("/etc/usb\u{fffd}pass.toml"));
    }
}
