//! The loop's clock: the time its schedule reads (retries, reconnects, detaches under
//! way, the watchdog) and its wait for the next event until the next thing is due.
//! The daemon runs on the system's monotonic clock; the loop's tests run it on a clock
//! they move by hand, so that what they check does not depend on how loaded the
//! machine is.

use crate::event::Event;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

pub trait Clock {
    fn now(&self) -> Instant;

    /// The next event, waiting at most until `deadline` (without one, until an event
    /// comes). `Timeout` once the deadline has come first, `Disconnected` once every
    /// sender is gone.
    fn next_event(
        &self,
        events: &Receiver<Event>,
        deadline: Option<Instant>,
    ) -> Result<Event, RecvTimeoutError>;
}

/// `Instant::now()` and the channel's own blocking receive.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn next_event(
        &self,
        events: &Receiver<Event>,
        deadline: Option<Instant>,
    ) -> Result<Event, RecvTimeoutError> {
        match deadline {
            // Idle: block without a timeout, so that nothing wakes the process.
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => {
                events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
        }
    }
}
