//! One daemon per state file and per libvirt URI: the lock files beside the state file
//! that a second `usbpass daemon` finds taken, and the cleanup of what a killed daemon
//! left there.
//!
//! Two daemons on one host would each take the other's `ua-usbpass-` hostdevs for its
//! own and, with different rules, move devices back and forth without end; and they
//! would overwrite each other's state file. The locks are `flock`s: the kernel lets go
//! of them when the process dies however it dies, so a stale lock file never blocks a
//! restart.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another usbpass daemon (pid {pid}) is running with lock {path}{for_uri}: {hint}")]
    HeldByAnotherDaemon {
        path: PathBuf,
        pid: String,
        for_uri: String,
        hint: &'static str,
    },
    #[error("cannot open lock file {path}: {source}")]
    OpenLockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    TakeLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the pid into lock file {path}: {source}")]
    WritePid {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's locks, held until it is dropped (the process's end).
#[derive(Debug)]
pub struct DaemonLock {
    _files: Vec<File>,
}

impl DaemonLock {
    /// Takes the lock of the state file (`state.json.lock`) and the lock of the URI in
    /// the same directory. Fails at once, naming the holder's pid, when either is held.
    pub fn acquire(state_path: &Path, uri: &str) -> Result<DaemonLock, LockError> {
        let directory = directory_of(state_path);
        std::fs::create_dir_all(&directory).map_err(|source| LockError::OpenLockFile {
            path: directory.clone(),
            source,
        })?;
        let mut state_lock_name = state_path.file_name().unwrap_or_default().to_os_string();
        state_lock_name.push(".lock");
        let files = vec![
            take(
                &directory.join(state_lock_name),
                uri,
                "stop it first, or give this one its own --state",
            )?,
            take(
                &directory.join(uri_lock_name(uri)),
                uri,
                "stop it first: one daemon serves each libvirt uri",
            )?,
        ];
        Ok(DaemonLock { _files: files })
    }
}

fn take(path: &Path, uri: &str, hint: &'static str) -> Result<File, LockError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| LockError::OpenLockFile {
            path: path.to_path_buf(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let mut lines = holder.lines();
            let pid = lines.next().unwrap_or("").trim();
            let holder_uri = lines.next().unwrap_or("").trim();
            return Err(LockError::HeldByAnotherDaemon {
                path: path.to_path_buf(),
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                for_uri: if holder_uri.is_empty() {
                    String::new()
                } else {
                    format!(" for {holder_uri}")
                },
                hint,
            });
        }
        Err(TryLockError::Error(source)) => {
            return Err(LockError::TakeLock {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    // Only the holder writes, so a reader never sees a half-written pid from a live
    // daemon; a daemon killed mid-write leaves a lock anyone may take.
    let write = |file: &mut File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}\n{}\n", std::process::id(), uri)?;
        file.flush()
    };
    write(&mut file).map_err(|source| LockError::WritePid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(file)
}

/// `daemon-qemu____system.lock` for `qemu:///system`: the URI with everything but
/// letters, digits, `-` and `.` replaced, so that it is one safe file name.
fn uri_lock_name(uri: &str) -> String {
    let escaped: String = uri
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("daemon-{escaped}.lock")
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes the temporary files a daemon killed in the middle of an atomic write left
/// in the state directory (`.usbpass-*`, see `util::atomic_file`). Call it holding the
/// lock: then no other daemon writes there. Temporary files younger than `grace` are
/// left alone, as a CLI command may be writing one right now. Returns how many went.
pub fn remove_leftover_temporaries(directory: &Path, grace: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let is_temporary = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(crate::util::atomic_file::TEMPORARY_PREFIX));
        let old_enough = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age >= grace);
        if is_temporary && old_enough && std::fs::remove_file(entry.path()).is_ok() {
            log::info!(
                "removed {}, left by an interrupted write",
                entry.path().display()
            );
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_on_the_same_state_file_is_refused_with_the_first_ones_pid() {
        let directory = tempfile::tempdir().unwrap();
        let state = directory.path().join("state.json");
        let first = DaemonLock::acquire(&state, "qemu:///system").unwrap();
        // A second lock in this process: flock locks belong to the open file, so a
        // second open of the same file conflicts just as another process's would.
        let error = DaemonLock::acquire(&state, "qemu:///session").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "another usbpass daemon (pid {}) is running with lock {}: stop it first, or \
                 give this one its own --state",
                std::process::id(),
                directory.path().join("state.json.lock").display()
            )
            .replace(": stop", " for qemu:///system: stop")
        );
        drop(first);
        // The first one gone (killed or stopped), the lock is free again.
        DaemonLock::acquire(&state, "qemu:///session").unwrap();
    }

    #[test]
    fn a_second_daemon_for_the_same_uri_is_refused_even_with_its_own_state_file() {
        let directory = tempfile::tempdir().unwrap();
        let _first =
            DaemonLock::acquire(&directory.path().join("state.json"), "qemu:///system").unwrap();
        let error =
            DaemonLock::acquire(&directory.path().join("test.json"), "qemu:///system").unwrap_err();
        assert!(
            matches!(&error, LockError::HeldByAnotherDaemon { path, .. }
                if path.ends_with("daemon-qemu____system.lock")),
            "{error}"
        );
        // Another URI with another state file is another daemon's business.
        DaemonLock::acquire(&directory.path().join("session.json"), "qemu:///session").unwrap();
    }

    #[test]
    fn leftover_temporaries_are_removed_and_nothing_else() {
        let directory = tempfile::tempdir().unwrap();
        let leftover = directory.path().join(".usbpass-AbC123");
        std::fs::write(&leftover, "{").unwrap();
        std::fs::write(directory.path().join("state.json"), "{}").unwrap();
        assert_eq!(
            remove_leftover_temporaries(directory.path(), Duration::from_secs(3600)),
            0,
            "a fresh one may be in use"
        );
        assert_eq!(
            remove_leftover_temporaries(directory.path(), Duration::ZERO),
            1
        );
        assert!(!leftover.exists());
        assert!(directory.path().join("state.json").exists());
    }
}
