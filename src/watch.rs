//! Event sources that are neither udev nor libvirt: signals (SIGHUP, SIGTERM, SIGINT)
//! and the rules file changing on disk. Each runs on a thread that blocks until
//! something happens, so an idle daemon is never woken.

use crate::event::Event;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
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
pub fn spawn_signal_thread(events: Sender<Event>) -> Result<JoinHandle<()>, WatchError> {
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

/// Sends `Event::ConfigChanged` whenever the rules file is written, replaced, created
/// or removed. It watches the directory, not the file: editors and `usbpass assign`
/// replace the file by renaming a new one over it, which a watch on the old inode
/// would miss.
pub fn spawn_config_watcher(
    config_path: &Path,
    events: Sender<Event>,
) -> Result<JoinHandle<()>, WatchError> {
    use inotify::{Inotify, WatchMask};
    let directory = match config_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name: OsString = config_path
        .file_name()
        .map(OsString::from)
        .unwrap_or_default();
    let watch_error = |source| WatchError::WatchConfigDirectory {
        path: directory.clone(),
        source,
    };
    let inotify = Inotify::init().map_err(watch_error)?;
    inotify
        .watches()
        .add(
            &directory,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM,
        )
        .map_err(watch_error)?;
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
                let touched = events_read
                    .into_iter()
                    .any(|event| event.name == Some(file_name.as_os_str()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_replaced_rules_file_is_noticed_and_others_are_not() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("usbpass.toml");
        let (sender, receiver) = mpsc::channel();
        spawn_config_watcher(&path, sender).unwrap();
        std::fs::write(directory.path().join("unrelated"), "x").unwrap();
        assert!(receiver.recv_timeout(Duration::from_millis(300)).is_err());
        crate::atomic_file::write(
            &path,
            b"uri = \"test:///default\"\n",
            0o644,
            crate::atomic_file::Durability::Synced,
        )
        .unwrap();
        // The temporary file's own events are filtered out; the rename is seen.
        let event = receiver.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(event, Event::ConfigChanged);
        while let Ok(event) = receiver.recv_timeout(Duration::from_millis(200)) {
            assert_eq!(event, Event::ConfigChanged);
        }
    }
}
