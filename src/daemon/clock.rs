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
            None => {
                // Nothing is due: hand the pages that the last burst of work freed
                // back to the kernel before sleeping (glibc keeps them otherwise).
                // One call per idle, microseconds for this heap.
                // SAFETY: malloc_trim only walks glibc's own free lists under its
                // arena locks; it is safe to call from any thread at any time.
                unsafe {
                    libc::malloc_trim(0);
                }
                events.recv().map_err(|_| RecvTimeoutError::Disconnected)
            }
            Some(deadline) => {
                events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
        }
    }
}

/// The clock of the loop's tests.
#[cfg(test)]
pub(crate) mod manual {
    use super::Clock;
    use crate::event::Event;
    use std::sync::mpsc::{Receiver, RecvTimeoutError};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    /// How long one poll of the loop's channel lasts, in real time.
    const POLL: Duration = Duration::from_millis(1);
    /// How long a test waits for the loop before it fails, in real time.
    pub const PATIENCE: Duration = Duration::from_secs(10);

    /// A clock that moves only when the test moves it, so that no retry, reconnect
    /// or grace time comes due because the machine is slow, and the test can read
    /// the schedule the loop chose instead of counting calls in a time window. The
    /// loop waits on it in short real polls of its channel; a poll that finds the
    /// channel empty is the loop idle, which is how the test knows the loop has
    /// handled everything sent to it. A loop that spun, waking again and again for a
    /// deadline already past, would never be idle: the test waiting for it would fail.
    #[derive(Clone)]
    pub struct ManualClock(Arc<SharedClock>);

    struct SharedClock {
        state: Mutex<ClockState>,
        /// Signalled whenever a poll finds the channel empty.
        idle: Condvar,
    }

    struct ClockState {
        now: Instant,
        /// Polls of the channel begun so far, numbered from 1.
        polls_begun: u64,
        /// The last poll that found the channel empty, and the deadline the loop was
        /// waiting for then.
        idle: Option<(u64, Option<Instant>)>,
    }

    impl ManualClock {
        pub fn new() -> ManualClock {
            let state = ClockState {
                now: Instant::now(),
                polls_begun: 0,
                idle: None,
            };
            ManualClock(Arc::new(SharedClock {
                state: Mutex::new(state),
                idle: Condvar::new(),
            }))
        }

        fn lock(&self) -> MutexGuard<'_, ClockState> {
            self.0
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }

        pub fn advance(&self, by: Duration) {
            self.lock().now += by;
        }

        /// Waits until the loop is idle in a poll begun after this call, that is, after
        /// everything sent and every move of the clock before it. Returns what the loop
        /// waits for then: how long until its next deadline, `None` for an event only.
        pub fn settle(&self) -> Option<Duration> {
            let mut state = self.lock();
            let begun = state.polls_begun;
            let give_up = Instant::now() + PATIENCE;
            loop {
                if let Some((poll, deadline)) = state.idle {
                    if poll > begun {
                        return deadline.map(|at| at.saturating_duration_since(state.now));
                    }
                }
                let left = give_up.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "the loop did not become idle");
                state = self
                    .0
                    .idle
                    .wait_timeout(state, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            self.lock().now
        }

        fn next_event(
            &self,
            events: &Receiver<Event>,
            deadline: Option<Instant>,
        ) -> Result<Event, RecvTimeoutError> {
            loop {
                let poll = {
                    let mut state = self.lock();
                    if deadline.is_some_and(|at| at <= state.now) {
                        return Err(RecvTimeoutError::Timeout);
                    }
                    state.polls_begun += 1;
                    state.polls_begun
                };
                match events.recv_timeout(POLL) {
                    Err(RecvTimeoutError::Timeout) => {
                        self.lock().idle = Some((poll, deadline));
                        self.0.idle.notify_all();
                    }
                    received => return received,
                }
            }
        }
    }
}
