//! The libvirt connection state machine: connected, connecting, or waiting to
//! reconnect. The connect runs on the executor, with a deadline: a libvirtd that
//! accepts the socket and then does not answer cannot hold up the loop. One backoff
//! counts the failures in a row, refused or unanswered connects and rounds that lost
//! the connection alike (0.5 s doubling to 30 s), and a round that completes resets it.
//! Keeps the last error for `usbpass status`.

use crate::daemon::executor::{lock, CallId, Executor, Opened};
use crate::event::EventSender;
use crate::hypervisor::Connector;
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

/// What `ensure_connected` or `connect_finished` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Connected already.
    Up,
    /// Connected just now: anything that failed against the old connection is worth
    /// trying again.
    Opened,
    /// Not connected: a connect is under way, or not due yet, or was refused.
    Down,
}

/// A connect under way on the executor.
struct Connecting {
    call: CallId,
    uri: String,
    deadline: Instant,
}

pub struct Connection<C: Connector> {
    connector: Arc<C>,
    /// Where each connection delivers libvirt's events: the loop's channel.
    events: EventSender,
    /// Shared with the calls under way on it: a connection given up on lives until
    /// its last stuck call returns.
    hypervisor: Option<Arc<C::Hypervisor>>,
    /// Counts the connections opened: tells an answer on this one from a late answer
    /// on one given up on.
    generation: u64,
    connecting: Option<Connecting>,
    /// Where the connect threads leave their connections.
    opened: Opened<C::Hypervisor>,
    /// How long a connect may take before it is given up on.
    connect_deadline: Duration,
    /// Refused connects and rounds that lost the connection, in a row.
    failures_in_a_row: u32,
    /// When to connect next; `None` while connected.
    next_attempt: Option<Instant>,
    last_error: Option<String>,
}

impl<C: Connector> Connection<C> {
    /// Disconnected, with the first connect due at `now`; a connect may take up to
    /// `connect_deadline`.
    pub fn new(
        connector: C,
        events: EventSender,
        now: Instant,
        connect_deadline: Duration,
    ) -> Connection<C> {
        Connection {
            connector: Arc::new(connector),
            events,
            hypervisor: None,
            generation: 0,
            connecting: None,
            opened: Opened::default(),
            connect_deadline,
            failures_in_a_row: 0,
            next_attempt: Some(now),
            last_error: None,
        }
    }

    pub fn set_connect_deadline(&mut self, deadline: Duration) {
        self.connect_deadline = deadline;
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

    /// When the next connect is due, or the one under way is given up on; `None`
    /// while connected.
    pub fn next_attempt(&self) -> Option<Instant> {
        match &self.connecting {
            Some(connecting) => Some(connecting.deadline),
            None => self.next_attempt,
        }
    }

    /// Why the connection is down, or the last reason it went down.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Starts a connect to `uri` on the executor when disconnected, no connect is under
    /// way and the backoff allows it. Its answer comes back as a `CallFinished` for
    /// `connect_finished`.
    pub fn ensure_connected(&mut self, uri: &str, now: Instant, executor: &mut Executor) -> Link {
        if self.hypervisor.is_some() {
            return Link::Up;
        }
        if self.connecting.is_some() || self.next_attempt.is_some_and(|at| at > now) {
            return Link::Down;
        }
        let call = executor.start_connect(
            self.connector.clone(),
            uri,
            self.events.clone(),
            self.opened.clone(),
        );
        self.connecting = Some(Connecting {
            call,
            uri: uri.to_string(),
            deadline: now + self.connect_deadline,
        });
        Link::Down
    }

    /// Whether `call` is a connect (under way, or given up on).
    pub fn is_connect(&self, call: CallId) -> bool {
        lock(&self.opened).contains_key(&call)
    }

    /// A connect returned. A connect given up on is closed (dropped) here.
    pub fn connect_finished(&mut self, call: CallId, now: Instant) -> Link {
        let Some(result) = lock(&self.opened).remove(&call) else {
            return Link::Down;
        };
        if self.connecting.as_ref().is_none_or(|c| c.call != call) {
            log::info!("closing a libvirt connection that opened after it was given up on");
            return Link::Down;
        }
        let Some(Connecting { uri, .. }) = self.connecting.take() else {
            return Link::Down;
        };
        match result {
            Ok(hypervisor) => {
                log::info!("connected to libvirt at {uri}");
                self.hypervisor = Some(Arc::new(hypervisor));
                self.generation += 1;
                self.last_error = None;
                self.next_attempt = None;
                Link::Opened
            }
            Err(error) => {
                self.refused(error.to_string(), now);
                Link::Down
            }
        }
    }

    /// Gives up on a connect past its deadline; the next waits its backoff. The
    /// connect's thread runs on until libvirt answers, and what it opens is closed.
    pub fn expire(&mut self, now: Instant) {
        let Some(connecting) = self.connecting.take_if(|c| c.deadline <= now) else {
            return;
        };
        self.refused(
            format!(
                "libvirt at {} does not answer: no connection within {} ms",
                connecting.uri,
                self.connect_deadline.as_millis()
            ),
            now,
        );
    }

    fn refused(&mut self, message: String, now: Instant) {
        self.failures_in_a_row += 1;
        let delay = backoff(self.failures_in_a_row);
        // Once per new error, not once per attempt: a libvirtd down for an hour
        // would fill the journal.
        if self.last_error.as_deref() != Some(message.as_str()) {
            log::warn!("{message}; retrying in {} ms", delay.as_millis());
        }
        self.last_error = Some(message);
        self.next_attempt = Some(now + delay);
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

    /// A new URI: the next connect is due at once, with the backoff started afresh; a
    /// connect under way to the old one is given up on.
    pub fn connect_at_once(&mut self, now: Instant) {
        self.connecting = None;
        self.next_attempt = Some(now);
        self.failures_in_a_row = 0;
    }

    /// libvirtd's socket appeared: while disconnected and not connecting, the next
    /// connect is due now, and a failure backs off from the start again.
    pub fn libvirt_came_back(&mut self, now: Instant) {
        if self.hypervisor.is_none() && self.connecting.is_none() {
            self.next_attempt = Some(now);
            self.failures_in_a_row = 0;
        }
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
    use crate::event::Event;
    use crate::testing::fake_hypervisor::{Call, FakeConnector, FakeWorld, SharedWorld};

    const URI: &str = "qemu:///system";
    const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

    /// A connection with the executor its connects run on, and the channel their
    /// answers come back on.
    struct Rig {
        connection: Connection<FakeConnector>,
        executor: Executor,
        answers: std::sync::mpsc::Receiver<Event>,
    }

    impl std::ops::Deref for Rig {
        type Target = Connection<FakeConnector>;
        fn deref(&self) -> &Self::Target {
            &self.connection
        }
    }

    impl std::ops::DerefMut for Rig {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.connection
        }
    }

    impl Rig {
        /// `Connection::ensure_connected`, and the answer of the connect it started
        /// handed to `connect_finished`, as the loop does.
        fn ensure_connected(&mut self, uri: &str, now: Instant) -> Link {
            let link = self
                .connection
                .ensure_connected(uri, now, &mut self.executor);
            if self.connection.connecting.is_none() {
                return link;
            }
            self.answer(now)
        }

        /// Waits for the next answer and hands it to `connect_finished`.
        fn answer(&mut self, now: Instant) -> Link {
            match self.answers.recv_timeout(Duration::from_secs(10)) {
                Ok(Event::CallFinished(finished)) => {
                    assert!(self.connection.is_connect(finished.call));
                    self.connection.connect_finished(finished.call, now)
                }
                other => panic!("expected a connect's answer, got {other:?}"),
            }
        }
    }

    fn connection(world: &SharedWorld, now: Instant) -> Rig {
        let connector = FakeConnector {
            world: world.clone(),
        };
        let (sender, answers) = crate::event::event_channel();
        Rig {
            connection: Connection::new(connector, sender.clone(), now, CONNECT_DEADLINE),
            executor: Executor::new(sender),
            answers,
        }
    }

    /// A connection whose first connect, at `now`, was refused.
    fn refused_once(now: Instant) -> (SharedWorld, Rig) {
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
    fn lose_a_round(connection: &mut Rig, now: Instant) {
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

    #[test]
    fn a_connect_that_gets_no_answer_is_given_up_on_and_closed_when_it_opens() {
        let world = SharedWorld::new(FakeWorld::default());
        world.lock().block_connect();
        let start = Instant::now();
        let mut rig = connection(&world, start);
        let link = rig
            .connection
            .ensure_connected(URI, start, &mut rig.executor);
        assert_eq!(link, Link::Down);
        assert_eq!(rig.next_attempt(), Some(start + CONNECT_DEADLINE));
        let patience = Instant::now() + Duration::from_secs(10);
        while world.lock().parked() == 0 {
            assert!(Instant::now() < patience, "the connect did not start");
            std::thread::sleep(ms(1));
        }
        // Not tried again while under way.
        let link = rig
            .connection
            .ensure_connected(URI, start, &mut rig.executor);
        assert_eq!((link, connects(&world)), (Link::Down, 1));

        let deadline = start + CONNECT_DEADLINE;
        rig.expire(deadline);
        assert_eq!(
            rig.last_error(),
            Some("libvirt at qemu:///system does not answer: no connection within 10000 ms")
        );
        assert_eq!(rig.next_attempt(), Some(deadline + ms(500)));
        // libvirtd answers late: that connection is closed, not used.
        world.release_connect();
        assert_eq!(rig.answer(deadline), Link::Down);
        assert!(!rig.is_connected());
        assert_eq!(rig.ensure_connected(URI, deadline + ms(500)), Link::Opened);
        assert_eq!(connects(&world), 2);
    }
}
