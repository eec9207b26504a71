//! The daemon's control socket (`control.sock` beside the state file, root only): the
//! way `usbpass switch` asks the running daemon to move a device group, and waits for
//! the answer. One JSON line in, one JSON line out per connection. The watch thread
//! (`daemon::watch`) accepts; each connection is served on a short-lived thread that
//! hands the request to the loop as an `Event::Control` and writes back what the loop
//! replies.

use crate::event::{Event, EventSender};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::Duration;

/// The socket's file name, in the state file's directory.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";
/// A request line longer than this is refused: nothing a client sends needs more.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket {path}: {source}")]
    BindSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where `usbpass switch` sends a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchTo {
    Vm(String),
    Host,
    /// The group's next VM, in the order its rules name them.
    Next,
    /// Back to what the group's rules say.
    Rules,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchRequest {
    pub group: String,
    pub to: SwitchTo,
    /// How long the daemon waits for every device to be in place before it answers.
    pub timeout_ms: u64,
}

/// One device of a switched group: where it ended up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceResult {
    pub device: String,
    pub name: String,
    /// `win11` or `host`.
    pub place: String,
    pub in_place: bool,
    /// The last libvirt error about it, when it is not in place.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReply {
    pub ok: bool,
    pub group: String,
    /// `win11`, `host`, or `rules`.
    pub target: String,
    /// From the request's arrival to the last device in place (or the timeout).
    pub milliseconds: u64,
    pub devices: Vec<DeviceResult>,
    pub error: Option<String>,
}

impl SwitchReply {
    pub fn refused(group: &str, error: String) -> SwitchReply {
        SwitchReply {
            ok: false,
            group: group.to_string(),
            target: String::new(),
            milliseconds: 0,
            devices: Vec::new(),
            error: Some(error),
        }
    }
}

/// A request and the way back to its client. Two are equal when they are the same
/// request (`id`), so that `Event` can stay comparable.
#[derive(Debug, Clone)]
pub struct ControlRequest {
    pub id: u64,
    pub request: SwitchRequest,
    pub reply: SyncSender<SwitchReply>,
}

impl PartialEq for ControlRequest {
    fn eq(&self, other: &ControlRequest) -> bool {
        self.id == other.id
    }
}

impl Eq for ControlRequest {}

/// Creates the socket (replacing a stale one a killed daemon left: the caller holds the
/// daemon lock, so no other daemon uses it). The watch thread serves it
/// (`Watches::serve_control`).
pub fn bind_control_socket(state_directory: &Path) -> Result<UnixListener, ControlError> {
    let path = state_directory.join(CONTROL_SOCKET_NAME);
    let bind_error = |source| ControlError::BindSocket {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_directory).map_err(bind_error)?;
    if std::fs::symlink_metadata(&path).is_ok_and(|metadata| metadata.file_type().is_socket()) {
        std::fs::remove_file(&path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(&path).map_err(bind_error)?;
    // Root only: a switch moves keyboards and disks between VMs.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Takes every client waiting on the (non-blocking) listener and serves each on a
/// short-lived thread: a client that sends nothing holds up only its own thread.
pub fn accept_clients(listener: &UnixListener, next_id: &mut u64, events: &EventSender) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                // ECONNABORTED, EMFILE and the like: this client is lost, not the socket.
                log::warn!("cannot accept a control client: {error}");
                return;
            }
        };
        let id = *next_id;
        *next_id += 1;
        let events = events.clone();
        let served = std::thread::Builder::new()
            .name("usbpass-control-client".into())
            .spawn(move || {
                // The listener's non-blocking mode is not the client's.
                if stream.set_nonblocking(false).is_ok() {
                    serve(stream, id, &events);
                }
            });
        if let Err(error) = served {
            log::warn!("cannot serve a control client: {error}");
        }
    }
}

fn serve(stream: UnixStream, id: u64, events: &EventSender) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = BufReader::new((&stream).take_bytes(MAX_REQUEST_BYTES)).read_line(&mut line);
    let reply = match read.map_err(|error| error.to_string()).and_then(|_| {
        serde_json::from_str::<SwitchRequest>(&line).map_err(|error| error.to_string())
    }) {
        Err(error) => SwitchReply::refused("", format!("cannot read the request: {error}")),
        Ok(request) => {
            let wait = Duration::from_millis(request.timeout_ms) + Duration::from_secs(5);
            let group = request.group.clone();
            let (sender, receiver) = sync_channel(1);
            let message = ControlRequest {
                id,
                request,
                reply: sender,
            };
            if events.send(Event::Control(Box::new(message))).is_err() {
                SwitchReply::refused(&group, "the daemon is stopping".to_string())
            } else {
                receiver.recv_timeout(wait).unwrap_or_else(|_| {
                    SwitchReply::refused(&group, "the daemon did not answer in time".to_string())
                })
            }
        }
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".to_string());
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
}

/// `Read::take` for a `&UnixStream`, named for what it does here.
trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, limit: u64) -> std::io::Take<Self> {
        self.take(limit)
    }
}

impl TakeBytes for &UnixStream {}

/// The client side, for `usbpass switch`: sends one request and waits for the reply.
pub fn request_switch(
    state_directory: &Path,
    request: &SwitchRequest,
) -> Result<SwitchReply, std::io::Error> {
    let path = state_directory.join(CONTROL_SOCKET_NAME);
    let stream = UnixStream::connect(&path)?;
    stream.set_read_timeout(Some(
        Duration::from_millis(request.timeout_ms) + Duration::from_secs(10),
    ))?;
    let mut text = serde_json::to_string(request).map_err(std::io::Error::other)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::watch::Watches;

    /// The socket served by a watch thread of its own, as the daemon serves it.
    fn spawn_control_socket(state_directory: &Path, events: EventSender) {
        let mut watches = Watches::new(events).unwrap();
        watches.serve_control(bind_control_socket(state_directory).unwrap());
        watches.spawn().unwrap();
    }

    #[test]
    fn a_request_reaches_the_loop_and_its_reply_the_client() {
        let directory = tempfile::tempdir().unwrap();
        let (sender, events) = crate::event::event_channel();
        spawn_control_socket(directory.path(), sender);
        let path = directory.path().join(CONTROL_SOCKET_NAME);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "root only");
        // The loop's side: answer the one request.
        let loop_thread = std::thread::spawn(move || {
            let Ok(Event::Control(request)) = events.recv_timeout(Duration::from_secs(10)) else {
                panic!("no control event");
            };
            assert_eq!(request.request.to, SwitchTo::Next);
            let mut reply = SwitchReply::refused("desk", "test".into());
            reply.ok = true;
            reply.error = None;
            reply.target = "win11".into();
            request.reply.send(reply).unwrap();
        });
        let reply = request_switch(
            directory.path(),
            &SwitchRequest {
                group: "desk".into(),
                to: SwitchTo::Next,
                timeout_ms: 1000,
            },
        )
        .unwrap();
        loop_thread.join().unwrap();
        assert!(reply.ok);
        assert_eq!(reply.target, "win11");
    }

    #[test]
    fn garbage_is_answered_with_an_error_and_no_daemon_is_a_clear_error() {
        let directory = tempfile::tempdir().unwrap();
        let missing = request_switch(
            directory.path(),
            &SwitchRequest {
                group: "desk".into(),
                to: SwitchTo::Host,
                timeout_ms: 1000,
            },
        );
        assert!(missing.is_err());
        let (sender, _events) = crate::event::event_channel();
        spawn_control_socket(directory.path(), sender);
        let stream = UnixStream::connect(directory.path().join(CONTROL_SOCKET_NAME)).unwrap();
        (&stream).write_all(b"{\"group\": 3}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        let reply: SwitchReply = serde_json::from_str(&line).unwrap();
        assert!(!reply.ok);
        assert!(reply
            .error
            .is_some_and(|error| error.starts_with("cannot read the request")));
    }
}
