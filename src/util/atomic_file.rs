//! Whole-file replacement that never leaves a half-written file: write a temporary file
//! beside the target, sync it, then rename it over the target.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    #[error("cannot create directory {path}: {source}")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a temporary file beside {path}: {source}")]
    WriteTemporary {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot replace {path}: {source}")]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The name every temporary file starts with: the daemon removes leftovers of writes
/// that a kill interrupted (`daemon::lock::remove_leftover_temporaries`).
pub const TEMPORARY_PREFIX: &str = ".usbpass-";

/// Whether the new contents must reach the disk before the rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync first: the user's rules file survives a crash as old or new, never empty.
    Synced,
    /// No fsync: for the state file on tmpfs, rewritten after every reconcile and
    /// worthless after a reboot anyway.
    Volatile,
}

/// Replace `path` with `contents`. An existing file keeps its permission bits; a new
/// one gets `new_mode`. Readers see the old or the new contents, never a mix.
pub fn write(
    path: &Path,
    contents: &[u8],
    new_mode: u32,
    durability: Durability,
) -> Result<(), AtomicWriteError> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&directory).map_err(|source| AtomicWriteError::CreateDirectory {
        path: directory.clone(),
        source,
    })?;
    let write_error = |source| AtomicWriteError::WriteTemporary {
        path: path.to_path_buf(),
        source,
    };
    let mode = fs::metadata(path)
        .map(|metadata| metadata.permissions().mode() & 0o7777)
        .unwrap_or(new_mode);
    let mut temporary = tempfile::Builder::new()
        .prefix(TEMPORARY_PREFIX)
        .tempfile_in(&directory)
        .map_err(write_error)?;
    temporary.write_all(contents).map_err(write_error)?;
    temporary
        .as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    if durability == Durability::Synced {
        temporary.as_file().sync_all().map_err(write_error)?;
    }
    temporary
        .persist(path)
        .map_err(|error| AtomicWriteError::Replace {
            path: path.to_path_buf(),
            source: error.error,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_keeps_permissions() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("sub/file.toml");
        write(&path, b"one", 0o640, Durability::Synced).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        write(&path, b"two", 0o644, Durability::Synced).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file.toml")]);
    }

    #[test]
    fn failure_leaves_the_target_alone() {
        let directory = tempfile::tempdir().unwrap();
        // The target is a directory: the rename must fail, and nothing else changes.
        let path = directory.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        let error = write(&path, b"new", 0o644, Durability::Synced).unwrap_err();
        assert!(error.to_string().starts_with("cannot replace"), "{error}");
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"x");
        assert_eq!(fs::read_dir(directory.path()).unwrap().count(), 1);
    }
}
