//! The daemon's one watch thread: signals (SIGHUP, SIGTERM, SIGINT), the rules file
//! changing on disk, libvirt's sockets appearing, the control socket's clients, and the
//! sources handed to it (`PolledSource`: the kernel's hotplug monitor). One thread
//! waits in poll(2) on all of them: an idle daemon is never woken, and pays for one
//! thread's stack, not five.

use crate::daemon::control;
use crate::event::{Event, EventSender, PolledSource, SourceState};
use inotify::{Inotify, WatchDescriptor, WatchMask};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot install signal handlers: {source}")]
    InstallSignalHandlers {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start watching files: {source}")]
    StartInotify {
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

/// Where the system libvirtd and its modular daemons put their sockets.
pub const LIBVIRT_RUN_DIRECTORY: &str = "/run/libvirt";

/// The read ends the signal handlers write one byte into (signal-hook's self-pipe):
/// one for SIGHUP, one for SIGTERM and SIGINT, so the byte says which it was.
#[derive(Debug)]
struct SignalPipes {
    hangup: UnixStream,
    terminate: UnixStream,
}

/// Everything the watch thread waits on, gathered before it starts.
#[derive(Debug)]
pub struct Watches {
    events: EventSender,
    signals: Option<SignalPipes>,
    inotify: Inotify,
    /// The rules file's directory watches, and the file name in each.
    rules: Vec<(WatchDescriptor, OsString)>,
    libvirt_sockets: Option<WatchDescriptor>,
    control: Option<UnixListener>,
    /// Polled beside the rest; each sends its own events.
    sources: Vec<Box<dyn PolledSource>>,
}

impl std::fmt::Debug for dyn PolledSource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

impl Watches {
    pub fn new(events: EventSender) -> Result<Watches, WatchError> {
        let inotify = Inotify::init().map_err(|source| WatchError::StartInotify { source })?;
        Ok(Watches {
            events,
            signals: None,
            inotify,
            rules: Vec::new(),
            libvirt_sockets: None,
            control: None,
            sources: Vec::new(),
        })
    }

    /// SIGHUP becomes `Event::Reload`; SIGTERM and SIGINT become `Event::Terminate`.
    /// From here on they no longer stop the process by themselves: a signal that comes
    /// before the thread runs waits in its pipe.
    pub fn catch_signals(&mut self) -> Result<(), WatchError> {
        let install_error = |source| WatchError::InstallSignalHandlers { source };
        let (hangup, hangup_writer) = UnixStream::pair().map_err(install_error)?;
        let (terminate, terminate_writer) = UnixStream::pair().map_err(install_error)?;
        let interrupt_writer = terminate_writer.try_clone().map_err(install_error)?;
        for stream in [&hangup, &terminate] {
            stream.set_nonblocking(true).map_err(install_error)?;
        }
        signal_hook::low_level::pipe::register(SIGHUP, hangup_writer).map_err(install_error)?;
        signal_hook::low_level::pipe::register(SIGTERM, terminate_writer).map_err(install_error)?;
        signal_hook::low_level::pipe::register(SIGINT, interrupt_writer).map_err(install_error)?;
        self.signals = Some(SignalPipes { hangup, terminate });
        Ok(())
    }

    /// Sends `Event::ConfigChanged` when a writer of the rules file is done with it: on
    /// close after writing (`cp`, `cat >`, an editor that writes in place) and on a
    /// rename into place (`usbpass assign`, `sed -i`, vim's default). Never on create,
    /// delete or rename away: those come first in every way of saving a file, and the
    /// file they leave is missing, empty or cut off, which is valid TOML with zero
    /// rules; applying it would detach every device. It watches the directory, not the
    /// file: a watch on the old inode would miss a rename over it. When the rules file
    /// is a symlink, the target's directory is watched too, so that an edit of the
    /// target is seen.
    pub fn watch_rules_file(&mut self, config_path: &Path) -> Result<(), WatchError> {
        let mut watched: Vec<(PathBuf, OsString)> = vec![split(config_path)];
        if let Ok(target) = std::fs::canonicalize(config_path) {
            let target = split(&target);
            if target != watched[0] {
                watched.push(target);
            }
        }
        for (directory, file_name) in watched {
            let descriptor = self
                .inotify
                .watches()
                .add(&directory, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)
                .map_err(|source| WatchError::WatchConfigDirectory {
                    path: directory.clone(),
                    source,
                })?;
            self.rules.push((descriptor, file_name));
        }
        Ok(())
    }

    /// Sends `Event::LibvirtSocketAppeared` whenever a libvirt daemon's socket is
    /// created in `directory` (`libvirt-sock`, `virtqemud-sock`, ...): libvirtd has
    /// (re)started, and a connect would now succeed. With it the loop reconnects at once
    /// after a restart, instead of at its next backoff attempt (up to 30 s later), and
    /// nothing polls. Only for a system URI of this machine; for others it returns
    /// `Ok(false)`, as it does when the directory does not exist (no libvirt here yet:
    /// the backoff covers that).
    pub fn watch_libvirt_sockets(
        &mut self,
        uri: &str,
        directory: &Path,
    ) -> Result<bool, WatchError> {
        let system = uri.split_once("://").is_some_and(|(_, rest)| {
            rest.split('?')
                .next()
                .is_some_and(|path| path.ends_with("/system"))
        });
        if !system || !crate::host::select::devices_are_local(uri) || !directory.is_dir() {
            return Ok(false);
        }
        let descriptor = self
            .inotify
            .watches()
            .add(directory, WatchMask::CREATE | WatchMask::MOVED_TO)
            .map_err(|source| WatchError::WatchLibvirtSockets {
                path: directory.to_path_buf(),
                source,
            })?;
        self.libvirt_sockets = Some(descriptor);
        Ok(true)
    }

    /// Serves the control socket's clients, each on a short-lived thread of its own.
    pub fn serve_control(&mut self, listener: UnixListener) {
        self.control = Some(listener);
    }

    /// Polls `source` too (the kernel's hotplug monitor). A source that fails stops the
    /// thread after its `Event::SourceFailed`, as the rules-file watch does: the loop
    /// stops the daemon on it.
    pub fn poll_source(&mut self, source: Box<dyn PolledSource>) {
        self.sources.push(source);
    }

    /// Starts the one thread that waits on everything gathered. It ends when the loop
    /// is gone.
    pub fn spawn(self) -> Result<JoinHandle<()>, WatchError> {
        std::thread::Builder::new()
            .name("usbpass-watch".into())
            .spawn(move || self.run())
            .map_err(|source| WatchError::SpawnThread {
                name: "usbpass-watch",
                source,
            })
    }

    fn run(mut self) {
        // Each fd is non-blocking: poll says which are ready, the reads drain them.
        if let Some(listener) = &self.control {
            if let Err(error) = listener.set_nonblocking(true) {
                log::warn!("{error}; usbpass switch is unavailable");
                self.control = None;
            }
        }
        let mut buffer = [0u8; 4096];
        let mut client_ids = 1u64;
        loop {
            // A negative fd is skipped by poll(2): a source that is absent.
            let own = [
                self.signals.as_ref().map_or(-1, |s| s.hangup.as_raw_fd()),
                self.signals
                    .as_ref()
                    .map_or(-1, |s| s.terminate.as_raw_fd()),
                self.inotify.as_raw_fd(),
                self.control.as_ref().map_or(-1, |l| l.as_raw_fd()),
            ];
            let mut fds: Vec<libc::pollfd> = own
                .into_iter()
                .chain(self.sources.iter().map(|source| source.descriptor()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a live, writable array of `fds.len()` pollfd structs
            // for the whole call; poll only writes their `revents`.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let _ = self.events.send(Event::SourceFailed {
                    source: "signals and rules file",
                    message: format!("cannot wait for events: {error}"),
                });
                return;
            }
            // Sources first: a `remove` already queued goes to the loop before a
            // SIGTERM read in the same wake, as it would have from a thread of its own.
            for (source, polled) in self.sources.iter_mut().zip(&fds[own.len()..]) {
                if polled.revents == 0 {
                    continue;
                }
                let name = source.name();
                let broken = || {
                    SourceState::Failed(format!(
                        "cannot wait for {name} events: its socket reported poll events {:#x}",
                        polled.revents
                    ))
                };
                // POLLERR, POLLHUP or POLLNVAL with nothing to read, or a hang-up after
                // the last read: it would be reported ready again at once, for ever.
                // (A netlink overrun is POLLERR with POLLIN: the read sees ENOBUFS.)
                let state = if polled.revents & libc::POLLIN != 0 {
                    match source.read_ready() {
                        SourceState::Open if polled.revents & libc::POLLHUP != 0 => broken(),
                        state => state,
                    }
                } else {
                    broken()
                };
                match state {
                    SourceState::Open => {}
                    SourceState::ReceiverGone => return,
                    SourceState::Failed(message) => {
                        log::error!("{message}");
                        let _ = self.events.send(Event::SourceFailed {
                            source: name,
                            message,
                        });
                        return;
                    }
                }
            }
            let [hangup, terminate, files, clients] =
                [0, 1, 2, 3].map(|index| fds[index].revents != 0);
            let mut sent = Vec::new();
            if let Some(signals) = &mut self.signals {
                if hangup && drain(&mut signals.hangup) {
                    sent.push(Event::Reload);
                }
                if terminate && drain(&mut signals.terminate) {
                    sent.push(Event::Terminate);
                }
            }
            if files {
                match self.inotify.read_events(&mut buffer) {
                    Ok(read) => {
                        let (mut rules, mut sockets) = (false, false);
                        for event in read {
                            rules |= self.rules.iter().any(|(descriptor, name)| {
                                event.wd == *descriptor && event.name == Some(name.as_os_str())
                            });
                            sockets |= self.libvirt_sockets.as_ref() == Some(&event.wd)
                                && event
                                    .name
                                    .and_then(|name| name.to_str())
                                    .is_some_and(|name| name.ends_with("-sock"));
                        }
                        if rules {
                            sent.push(Event::ConfigChanged);
                        }
                        if sockets {
                            sent.push(Event::LibvirtSocketAppeared);
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => {
                        // The loop stops the daemon on it (its supervisor restarts
                        // it): a daemon deaf to rules edits must not look healthy.
                        sent.push(Event::SourceFailed {
                            source: "rules file",
                            message: error.to_string(),
                        });
                    }
                }
            }
            if clients {
                if let Some(listener) = &self.control {
                    control::accept_clients(listener, &mut client_ids, &self.events);
                }
            }
            for event in sent {
                let failed = matches!(event, Event::SourceFailed { .. });
                if self.events.send(event).is_err() || failed {
                    return;
                }
            }
        }
    }
}

/// Empties a signal pipe; whether it held anything.
fn drain(pipe: &mut UnixStream) -> bool {
    let mut bytes = [0u8; 64];
    let mut any = false;
    while let Ok(read) = pipe.read(&mut bytes) {
        if read == 0 {
            break;
        }
        any = true;
    }
    any
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

/// The rules-file watch alone on a thread of its own, as the tests use it.
#[cfg(test)]
pub fn spawn_config_watcher(
    config_path: &Path,
    events: EventSender,
) -> Result<JoinHandle<()>, WatchError> {
    let mut watches = Watches::new(events)?;
    watches.watch_rules_file(config_path)?;
    watches.spawn()
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
        let mut watches = Watches::new(sender.clone()).unwrap();
        assert!(watches
            .watch_libvirt_sockets("qemu:///system", directory.path())
            .unwrap());
        watches.spawn().unwrap();
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
            let mut watches = Watches::new(sender.clone()).unwrap();
            assert!(!watches
                .watch_libvirt_sockets(uri, directory.path())
                .unwrap());
        }
    }

    #[test]
    fn one_thread_tells_signals_rules_edits_and_libvirt_sockets_apart() {
        let rules_directory = tempfile::tempdir().unwrap();
        let run_directory = tempfile::tempdir().unwrap();
        let rules = rules_directory.path().join("usbpass.toml");
        let (sender, receiver) = crate::event::event_channel();
        let mut watches = Watches::new(sender).unwrap();
        watches.catch_signals().unwrap();
        watches.watch_rules_file(&rules).unwrap();
        assert!(watches
            .watch_libvirt_sockets("qemu:///system", run_directory.path())
            .unwrap());
        // Caught before the thread runs: the signal waits in its pipe.
        signal_hook::low_level::raise(SIGHUP).unwrap();
        watches.spawn().unwrap();
        let next = || receiver.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(next(), Event::Reload);
        std::fs::write(&rules, "").unwrap();
        assert_eq!(next(), Event::ConfigChanged);
        let _socket = UnixListener::bind(run_directory.path().join("libvirt-sock")).unwrap();
        assert_eq!(next(), Event::LibvirtSocketAppeared);
        signal_hook::low_level::raise(SIGTERM).unwrap();
        assert_eq!(next(), Event::Terminate);
        signal_hook::low_level::raise(SIGINT).unwrap();
        assert_eq!(next(), Event::Terminate);
        assert!(receiver.recv_timeout(Duration::from_millis(300)).is_err());
    }

    /// A source over a socket pair: each byte written to the other end is one word;
    /// `b'x'` makes the source fail.
    struct PairSource {
        stream: UnixStream,
        events: EventSender,
    }

    impl PolledSource for PairSource {
        fn name(&self) -> &'static str {
            "pair"
        }
        fn descriptor(&self) -> std::os::fd::RawFd {
            self.stream.as_raw_fd()
        }
        fn read_ready(&mut self) -> SourceState {
            let mut bytes = [0u8; 16];
            while let Ok(read) = self.stream.read(&mut bytes) {
                if read == 0 {
                    break;
                }
                for byte in &bytes[..read] {
                    if *byte == b'x' {
                        return SourceState::Failed("the pair broke".into());
                    }
                    if self.events.send(Event::ConfigChanged).is_err() {
                        return SourceState::ReceiverGone;
                    }
                }
            }
            SourceState::Open
        }
    }

    #[test]
    fn a_polled_source_is_read_when_ready_and_its_failure_ends_the_thread() {
        let (sender, receiver) = crate::event::event_channel();
        let (stream, mut writer) = UnixStream::pair().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut watches = Watches::new(sender.clone()).unwrap();
        watches.poll_source(Box::new(PairSource {
            stream,
            events: sender,
        }));
        let thread = watches.spawn().unwrap();
        assert!(receiver.recv_timeout(Duration::from_millis(200)).is_err());
        std::io::Write::write_all(&mut writer, b"ab").unwrap();
        for _ in 0..2 {
            assert_eq!(
                receiver.recv_timeout(Duration::from_secs(10)).unwrap(),
                Event::ConfigChanged
            );
        }
        std::io::Write::write_all(&mut writer, b"x").unwrap();
        assert_eq!(
            receiver.recv_timeout(Duration::from_secs(10)).unwrap(),
            Event::SourceFailed {
                source: "pair",
                message: "the pair broke".into()
            }
        );
        thread.join().unwrap();
    }

    #[test]
    fn a_polled_source_that_hangs_up_is_a_failure_not_a_spin() {
        let (sender, receiver) = crate::event::event_channel();
        let (stream, writer) = UnixStream::pair().unwrap();
        stream.set_nonblocking(true).unwrap();
        // Readable at end of file for ever: a source that reads nothing there must not
        // keep the thread polling; its end is reported once.
        struct Deaf(UnixStream);
        impl PolledSource for Deaf {
            fn name(&self) -> &'static str {
                "deaf"
            }
            fn descriptor(&self) -> std::os::fd::RawFd {
                self.0.as_raw_fd()
            }
            fn read_ready(&mut self) -> SourceState {
                SourceState::Open
            }
        }
        let mut watches = Watches::new(sender).unwrap();
        watches.poll_source(Box::new(Deaf(stream)));
        let _thread = watches.spawn().unwrap();
        drop(writer);
        match receiver.recv_timeout(Duration::from_secs(10)).unwrap() {
            Event::SourceFailed { source, message } => {
                assert_eq!(source, "deaf");
                assert!(message.contains("poll events"), "{message}");
            }
            other => panic!("expected SourceFailed, got {other:?}"),
        }
    }
}
