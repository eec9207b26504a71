//! Event sources that are neither udev nor libvirt: signals (SIGHUP, SIGTERM, SIGINT)
//! and the rules file changing on disk. Each runs on a thread that blocks until
//! something happens, so an idle daemon is never woken.

use crate::event::{Event, EventSender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot install signal handlers: {source}")]
    InstallSignalHandlers {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch directory {path} for rules changes: {source}")]
    WatchConfigDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the {name} thread: {source}")]
    SpawnThread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// SIGHUP becomes `Event::Reload`; SIGTERM and SIGINT become `Event::Terminate`.
pub fn spawn_signal_thread(events: EventSender) -> Result<JoinHandle<()>, WatchError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])
        .map_err(|source| WatchError::InstallSignalHandlers { source })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let event = if signal == SIGHUP {
                    Event::Reload
                } else {
                    Event::Terminate
                };
                if events.send(event).is_err() {
                    return;
                }
            }
        })
        .map_err(|source| WatchError::SpawnThread {
            name: "signals",
            source,
        })
}

/// Sends `Event::ConfigChanged` when a writer of the rules file is done with it: on
/// close after writing (`cp`, `cat >`, an editor that writes in place) and on a rename
/// into place (`usbpass assign`, `sed -i`, vim's default). Never on create, delete or
/// rename away: those come first in every way of saving a file, and the file they
/// leave is missing, empty or cut off, which is valid TOML with zero rules; applying it
/// would detach every device. It watches the directory, not the file: a watch on the
/// old inode would miss a rename over it. When the rules file is a symlink, the
/// target's directory is watched too, so that an edit of the target is seen.
pub fn spawn_config_watcher(
    config_path: &Path,
    events: EventSender,
) -> Result<JoinHandle<()>, WatchError> {
    use inotify::{Inotify, WatchMask};
    let mut watched: Vec<(PathBuf, OsString)> = vec![split(config_path)];
    if let Ok(target) = std::fs::canonicalize(config_path) {
        let target = split(&target);
        if target != watched[0] {
            watched.push(target);
        }
    }
    let inotify = Inotify::init().map_err(|source| WatchError::WatchConfigDirectory {
        path: watched[0].0.clone(),
        source,
    })?;
    let mut names = Vec::new();
    for (directory, file_name) in watched {
        let descriptor = inotify
            .watches()
            .add(&directory, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)
            .map_err(|source| WatchError::WatchConfigDirectory {
                path: directory.clone(),
                source,
            })?;
        names.push((descriptor, file_name));
    }
    let mut inotify = inotify;
    std::thread::Builder::new()
        .name("rules-watch".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                let events_read = match inotify.read_events_blocking(&mut buffer) {
                    Ok(read) => read,
                    Err(error) => {
                        let _ = events.send(Event::SourceFailed {
                            source: "rules file",
                            message: error.to_string(),
                        });
                        return;
                    }
                };
                let touched = events_read.into_iter().any(|event| {
                    names.iter().any(|(descriptor, name)| {
                        event.wd == *descriptor && event.name == Some(name.as_os_str())
                    })
                });
                if touched && events.send(Event::ConfigChanged).is_err() {
                    return;
                }
            }
        })
        .map_err(|source| WatchError::SpawnThread {
            name: "rules-watch",
            source,
        })
}

/// A file's directory and name.
fn split(path: &Path) -> (PathBuf, OsString) {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(OsString::from).unwrap_or_default();
    (directory, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_replaced_rules_file_is_noticed_and_others_are_not() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("usbpass.toml");
        let (sender, receiver) = crate::event::event_channel();
        spawn_config_watcher(&path, sender).unwrap();
        std::fs::write(directory.path().join("unrelated"), "x").unwrap();
        assert!(receiver.recv_timeout(Duration::from_millis(300)).is_err());
        crate::util::atomic_file::write(
            &path,
            b"uri = \"test:///default\"\n",
            0o644,
            crate::util::atomic_file::Durability::Synced,
        )
        .unwrap();
        // The temporary file's own events are filtered out; the rename is seen.
        let event = receiver.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(event, Event::ConfigChanged);
        while let Ok(event) = receiver.recv_timeout(Duration::from_millis(200)) {
            assert_eq!(event, Event::ConfigChanged);
        }
    }

    #[test]
    fn an_edit_of_a_symlinked_rules_file_target_is_noticed() {
        let etc = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let target = store.path().join("real.toml");
        std::fs::write(&target, "").unwrap();
        let link = etc.path().join("usbpass.toml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (sender, receiver) = crate::event::event_channel();
        spawn_config_watcher(&link, sender).unwrap();
        std::fs::write(store.path().join("other.toml"), "x").unwrap();
        assert!(receiver.recv_timeout(Duration::from_millis(300)).is_err());
        std::fs::write(&target, "uri = \"test:///default\"\n").unwrap();
        let event = receiver.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(event, Event::ConfigChanged);
    }
}
