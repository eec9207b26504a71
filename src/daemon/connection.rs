//! The libvirt connection state machine: connected, or waiting to reconnect. One
//! backoff counts the failures in a row, refused connects and rounds that lost the
//! connection alike (0.5 s doubling to 30 s), and a round that completes resets it.
//! Keeps the last error for `usbpass status`.

use crate::event::Event;
use crate::hypervisor::Connector;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The wait before the next connect after `failures` in a row: 0.5 s doubling to 30 s.
fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1 << failures.clamp(1, 7).saturating_sub(1))
        .min(BACKOFF_MAX)
}

/// What `ensure_connected` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Connected already.
    Up,
    /// Connected just now: anything that failed against the old connection is worth
    /// trying again.
    Opened,
    /// Not connected, and not due to try yet, or refused.
    Down,
}

pub struct Connection<C: Connector> {
    connector: C,
    /// Where each connection delivers libvirt's events: the loop's channel.
    events: Sender<Event>,
    /// Shared with the calls under way on it: a connection given up on lives until
    /// its last stuck call returns.
    hypervisor: Option<Arc<C::Hypervisor>>,
    /// Counts the connections opened: tells an answer on this one from a late answer
    /// on one given up on.
    generation: u64,
    /// Refused connects and rounds that lost the connection, in a row.
    failures_in_a_row: u32,
    /// When to connect next; `None` while connected.
    next_attempt: Option<Instant>,
    last_error: Option<String>,
}

impl<C: Connector> Connection<C> {
    /// Disconnected, with the first connect due at `now`.
    pub fn new(connector: C, events: Sender<Event>, now: Instant) -> Connection<C> {
        Connection {
            connector,
            events,
            hypervisor: None,
            generation: 0,
            failures_in_a_row: 0,
            next_attempt: Some(now),
            last_error: None,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.hypervisor.is_some()
    }

    pub fn hypervisor(&self) -> Option<Arc<C::Hypervisor>> {
        self.hypervisor.clone()
    }

    /// The number of the current (or last) connection.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the next connect is due; `None` while connected.
    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }

    /// Why the connection is down, or the last reason it went down.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Connects to `uri` when disconnected and the backoff allows it.
    pub fn ensure_connected(&mut self, uri: &str, now: Instant) -> Link {
        if self.hypervisor.is_some() {
            return Link::Up;
        }
        if self.next_attempt.is_some_and(|at| at > now) {
            return Link::Down;
        }
        match self.connector.connect(uri, self.events.clone()) {
            Ok(hypervisor) => {
                log::info!("connected to libvirt at {uri}");
                self.hypervisor = Some(Arc::new(hypervisor));
                self.generation += 1;
                self.last_error = None;
                self.next_attempt = None;
                Link::Opened
            }
            Err(error) => {
                self.failures_in_a_row += 1;
                let delay = backoff(self.failures_in_a_row);
                let message = error.to_string();
                // Once per new error, not once per attempt: a libvirtd down for an hour
                // would fill the journal.
                if self.last_error.as_deref() != Some(message.as_str()) {
                    log::warn!("{error}; retrying in {} ms", delay.as_millis());
                }
                self.last_error = Some(message);
                self.next_attempt = Some(now + delay);
                Link::Down
            }
        }
    }

    /// The connection broke or is given up. The next connect is due at once, unless a
    /// backoff already holds it.
    pub fn drop_connection(&mut self, reason: String, now: Instant) {
        self.hypervisor = None;
        self.last_error = Some(reason);
        if self.next_attempt.is_none() {
            self.next_attempt = Some(now);
        }
    }

    /// A new URI: the next connect is due at once, with the backoff started afresh.
    pub fn connect_at_once(&mut self, now: Instant) {
        self.next_attempt = Some(now);
        self.failures_in_a_row = 0;
    }

    /// A round ended without its connection. The next connect waits, growing with each
    /// failure in a row: a libvirtd that accepts connections but fails every call (a
    /// permission problem, a broken driver) must not make the loop spin.
    pub fn round_lost_connection(&mut self, now: Instant) {
        if self.hypervisor.is_some() {
            return;
        }
        self.failures_in_a_row += 1;
        let delay = backoff(self.failures_in_a_row);
        let at = now + delay;
        if self.next_attempt.is_none_or(|next| next < at) {
            log::info!("reconnecting to libvirt in {} ms", delay.as_millis());
            self.next_attempt = Some(at);
        }
    }

    /// A round listed, planned and carried out its actions without losing the
    /// connection.
    pub fn round_completed(&mut self) {
        self.failures_in_a_row = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fake_hypervisor::{Call, FakeConnector, FakeWorld, SharedWorld};

    const URI: &str = "qemu:///system";

    fn connection(world: &SharedWorld, now: Instant) -> Connection<FakeConnector> {
        let connector = FakeConnector {
            world: world.clone(),
        };
        Connection::new(connector, std::sync::mpsc::channel().0, now)
    }

    /// A connection whose first connect, at `now`, was refused.
    fn refused_once(now: Instant) -> (SharedWorld, Connection<FakeConnector>) {
        let world = SharedWorld::new(FakeWorld::default());
        world.lock().refuse_connections = true;
        let mut connection = connection(&world, now);
        assert_eq!(connection.ensure_connected(URI, now), Link::Down);
        (world, connection)
    }

    fn connects(world: &SharedWorld) -> usize {
        world
            .lock()
            .calls
            .iter()
            .filter(|call| **call == Call::Connect)
            .count()
    }

    /// A round that connects and then loses the connection: a call broke it.
    fn lose_a_round(connection: &mut Connection<FakeConnector>, now: Instant) {
        assert_eq!(connection.ensure_connected(URI, now), Link::Opened);
        connection.drop_connection("Cannot write data: Broken pipe".into(), now);
        connection.round_lost_connection(now);
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn the_backoff_doubles_from_half_a_second_to_thirty() {
        let waits: Vec<u128> = (1..=9).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(
            waits,
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
    }

    #[test]
    fn a_refused_connect_backs_off_and_is_not_tried_early() {
        let start = Instant::now();
        let (world, mut connection) = refused_once(start);
        assert_eq!(connection.next_attempt(), Some(start + ms(500)));
        assert!(connection
            .last_error()
            .unwrap()
            .contains("Connection refused"));
        assert_eq!(
            connection.ensure_connected(URI, start + ms(499)),
            Link::Down
        );
        assert_eq!(connects(&world), 1, "not tried before its time");
        // A disconnect event while waiting does not bring the attempt forward.
        connection.drop_connection("end of file from libvirtd".into(), start);
        assert_eq!(connection.next_attempt(), Some(start + ms(500)));
        assert_eq!(
            connection.ensure_connected(URI, start + ms(500)),
            Link::Down
        );
        assert_eq!(connection.next_attempt(), Some(start + ms(1_500)));

        world.lock().refuse_connections = false;
        let later = start + ms(1_500);
        assert_eq!(connection.ensure_connected(URI, later), Link::Opened);
        assert_eq!(connection.ensure_connected(URI, later), Link::Up);
        assert_eq!(
            (connection.next_attempt(), connection.last_error()),
            (None, None)
        );
        assert_eq!(connects(&world), 3);
    }

    #[test]
    fn rounds_that_lose_the_connection_back_off_until_one_completes() {
        let world = SharedWorld::new(FakeWorld::default());
        let mut now = Instant::now();
        let mut connection = connection(&world, now);
        let mut waits = Vec::new();
        for _ in 0..3 {
            lose_a_round(&mut connection, now);
            let next = connection.next_attempt().unwrap();
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits, [ms(500), ms(1_000), ms(2_000)]);
        assert_eq!(connection.ensure_connected(URI, now), Link::Opened);
        connection.round_completed();
        // libvirtd restarts: the reconnect is due at once, and the next loss waits
        // the first delay again.
        connection.drop_connection("end of file from libvirtd".into(), now);
        assert_eq!(connection.next_attempt(), Some(now));
        lose_a_round(&mut connection, now);
        assert_eq!(connection.next_attempt(), Some(now + ms(500)));
    }

    #[test]
    fn refused_connects_and_lost_rounds_count_as_one_run_of_failures() {
        let now = Instant::now();
        let (world, mut connection) = refused_once(now);
        world.lock().refuse_connections = false;
        let now = now + ms(500);
        lose_a_round(&mut connection, now);
        assert_eq!(connection.next_attempt(), Some(now + ms(1_000)));
        // A new URI starts afresh.
        connection.connect_at_once(now);
        lose_a_round(&mut connection, now);
        assert_eq!(connection.next_attempt(), Some(now + ms(500)));
    }
}
