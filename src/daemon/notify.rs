//! sd_notify messages to systemd: READY, RELOADING, STOPPING, STATUS and the watchdog,
//! with the watchdog's ping schedule. Without `NOTIFY_SOCKET` (not started by systemd)
//! every call does nothing.

use sd_notify::NotifyState;
use std::time::{Duration, Instant};

fn send(states: &[NotifyState]) {
    // Failing to reach systemd must not stop the daemon; systemd notices on its own.
    if let Err(error) = sd_notify::notify(false, states) {
        log::debug!("sd_notify failed: {error}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload expects.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed
    // `now`; CLOCK_MONOTONIC is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    send(&[
        NotifyState::Reloading,
        NotifyState::Custom(&format!("MONOTONIC_USEC={usec}")),
    ]);
}

/// STATUS alone: the line `systemctl status` shows, whenever it changes.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Half of `WATCHDOG_USEC` when systemd asks for pings from this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

/// The watchdog's ping schedule: a ping every interval once the loop runs, none when
/// systemd does not ask for them.
pub struct Watchdog {
    interval: Option<Duration>,
    next_ping: Option<Instant>,
}

impl Watchdog {
    pub fn new(interval: Option<Duration>) -> Watchdog {
        Watchdog {
            interval,
            next_ping: None,
        }
    }

    /// The next ping is one interval from `now`.
    pub fn start(&mut self, now: Instant) {
        self.next_ping = self.interval.map(|interval| now + interval);
    }

    pub fn ping_if_due(&mut self, now: Instant) {
        if self.next_ping.is_some_and(|at| at <= now) {
            watchdog();
            self.start(now);
        }
    }

    pub fn next_ping(&self) -> Option<Instant> {
        self.next_ping
    }
}
