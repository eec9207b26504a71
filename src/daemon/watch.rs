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
    #[error("cannot watch directory {path} for libvirt's sockets: {source}")]
    WatchLibvirtSockets {
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

/// Where the system libvirtd and its modular daemons put their sockets.
pub const LIBVIRT_RUN_DIRECTORY: &str = "/run/libvirt";

/// Sends `Event::LibvirtSocketAppeared` whenever a libvirt daemon's socket is created
/// in `directory` (`libvirt-sock`, `virtqemud-sock`, ...): libvirtd has (re)started, and
/// a connect would now succeed. With it the loop reconnects at once after a restart,
/// instead of at its next backoff attempt (up to 30 s later), and nothing polls. Only
/// for a system URI of this machine; for others it returns `Ok(None)`, as it does when
/// the directory does not exist (no libvirt here yet: the backoff covers that).
pub fn spawn_libvirt_socket_watcher(
    uri: &str,
    directory: &Path,
    events: EventSender,
) -> Result<Option<JoinHandle<()>>, WatchError> {
    use inotify::{Inotify, WatchMask};
    let system = uri.split_once("://").is_some_and(|(_, rest)| {
        rest.split('?')
            .next()
            .is_some_and(|path| path.ends_with("/system"))
    });
    if !system || !crate::host::select::devices_are_local(uri) || !directory.is_dir() {
        return Ok(None);
    }
    let watch_error = |source| WatchError::WatchLibvirtSockets {
        path: directory.to_path_buf(),
        source,
    };
    let mut inotify = Inotify::init().map_err(watch_error)?;
    inotify
        .watches()
        .add(directory, WatchMask::CREATE | WatchMask::MOVED_TO)
        .map_err(watch_error)?;
    let thread = std::thread::Builder::new()
        .name("libvirt-sockets".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                // A failed read only costs the quick reconnect; the backoff remains.
                let Ok(events_read) = inotify.read_events_blocking(&mut buffer) else {
                    return;
                };
                let appeared = events_read.into_iter().any(|event| {
                    event
                        .name
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.ends_with("-sock"))
                });
                if appeared && events.send(Event::LibvirtSocketAppeared).is_err() {
                    return;
                }
            }
        })
        .map_err(|source| WatchError::SpawnThread {
            name: "libvirt-sockets",
            source,
        })?;
    Ok(Some(thread))
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

    #[test]
    fn a_new_libvirt_socket_is_noticed_and_other_files_are_not() {
        let directory = tempfile::tempdir().unwrap();
        let (sender, receiver) = crate::event::event_channel();
        let started =
            spawn_libvirt_socket_watcher("qemu:///system", directory.path(), sender.clone())
                .unwrap();
        assert!(started.is_some());
        std::fs::write(directory.path().join("qemu.pid"), "1").unwrap();
        assert!(receiver.recv_timeout(Duration::from_millis(300)).is_err());
        let socket =
            std::os::unix::net::UnixListener::bind(directory.path().join("virtqemud-sock"));
        assert!(socket.is_ok());
        let event = receiver.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(event, Event::LibvirtSocketAppeared);
        // Remote and session URIs have nothing to watch here.
        for uri in [
            "qemu+ssh://other/system",
            "qemu:///session",
            "test:///default",
        ] {
            assert!(
                spawn_libvirt_socket_watcher(uri, directory.path(), sender.clone())
                    .unwrap()
                    .is_none()
            );
        }
    }
}
