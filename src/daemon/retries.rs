//! The retry book: the failed actions still wanted, keyed by (VM, alias), when each is
//! due again (`retry_delay`), forgetting them when an event makes them worth trying at
//! once, and the recent failures `usbpass status` shows.

use crate::daemon::decision::{action_name, device_description};
use crate::daemon::state::{unix_now, ActionFailure};
use crate::hypervisor::{FailureKind, HypervisorError};
use crate::model::alias::HostdevAlias;
use crate::model::BusAddress;
use crate::reconcile::Action;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How many past failures the state file keeps for `usbpass status`.
const RECENT_FAILURES: usize = 20;

/// How long to wait before the next attempt of a failed action, or `None` to wait for
/// an event about that device or VM. The add/bind race (libvirt cannot find a device
/// that udev just announced) is retried quickly a few times; conditions that only a
/// change elsewhere can fix (a full controller, a device in use) are retried slowly
/// and then left until something happens.
pub fn retry_delay(kind: FailureKind, attempts: u32) -> Option<Duration> {
    const NOT_FOUND: [u64; 5] = [100, 250, 500, 1000, 2000];
    const SLOW: [u64; 2] = [5_000, 30_000];
    let schedule: &[u64] = match kind {
        FailureKind::DeviceNotFound => &NOT_FOUND,
        FailureKind::DeviceInUse | FailureKind::NoFreePort | FailureKind::Other => &SLOW,
        // A lifecycle event follows a vanished domain; a broken connection is healed
        // by reconnecting, after which everything is due again; a call past its
        // deadline is retried once its real answer is in (it holds its VM until then).
        FailureKind::DomainGone | FailureKind::ConnectionLost | FailureKind::TimedOut => &[],
    };
    let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    schedule.get(index).map(|ms| Duration::from_millis(*ms))
}

/// The action a failure belongs to: the VM and the hostdev alias.
type ActionKey = (String, HostdevAlias);

fn key_of(action: &Action) -> ActionKey {
    (action.domain().to_string(), action.alias().clone())
}

struct Failure {
    record: ActionFailure,
    /// `None`: wait for an event about that device or VM.
    next_attempt: Option<Instant>,
}

/// A failure just booked: what the log line says about its retry.
pub struct Booked {
    pub attempts: u32,
    pub delay: Option<Duration>,
}

#[derive(Default)]
pub struct RetryBook {
    failures: HashMap<ActionKey, Failure>,
    /// The last failures, kept after their action is no longer wanted (a fallback, a
    /// stopped VM): newest last, at most `RECENT_FAILURES`.
    recent: VecDeque<ActionFailure>,
}

impl RetryBook {
    /// True unless `action` failed before and its retry is not due yet.
    pub fn is_due(&self, action: &Action, now: Instant) -> bool {
        self.failures
            .get(&key_of(action))
            .is_none_or(|failure| failure.next_attempt.is_some_and(|at| at <= now))
    }

    /// The earliest retry scheduled.
    pub fn next_attempt(&self) -> Option<Instant> {
        self.failures.values().filter_map(|f| f.next_attempt).min()
    }

    pub fn succeeded(&mut self, action: &Action) {
        self.failures.remove(&key_of(action));
    }

    pub fn failed(&mut self, action: &Action, error: &HypervisorError, now: Instant) -> Booked {
        let key = key_of(action);
        let kind = error.kind();
        let attempts = self.failures.get(&key).map_or(0, |f| f.record.attempts) + 1;
        let delay = retry_delay(kind, attempts);
        let record = ActionFailure {
            action: action_name(action).into(),
            domain: key.0.clone(),
            alias: key.1.to_string(),
            device: device_description(action),
            kind,
            message: error.to_string(),
            attempts,
            last_attempt: unix_now(),
            retry_in_ms: delay.map(|d| d.as_millis() as u64),
        };
        self.recent.push_back(record.clone());
        if self.recent.len() > RECENT_FAILURES {
            self.recent.pop_front();
        }
        self.failures.insert(
            key,
            Failure {
                record,
                next_attempt: delay.map(|d| now + d),
            },
        );
        Booked { attempts, delay }
    }

    /// A failure that says nothing about the next attempt (it broke a connection that
    /// has been replaced since): the action is due at `now`, its record kept.
    pub fn due_at_once(&mut self, action: &Action, now: Instant) {
        if let Some(failure) = self.failures.get_mut(&key_of(action)) {
            failure.next_attempt = Some(now);
        }
    }

    /// A failure whose action the rules no longer want is forgotten.
    pub fn keep_wanted(&mut self, wanted: &[Action]) {
        self.failures.retain(|(domain, alias), _| {
            wanted
                .iter()
                .any(|action| action.domain() == domain && action.alias() == alias)
        });
    }

    /// An event about this device: its actions are due at once.
    pub fn forget_device(&mut self, address: BusAddress) {
        self.failures
            .retain(|(_, alias), _| alias.target().is_none_or(|(failed, _)| failed != address));
    }

    /// An event about this VM: its actions are due at once.
    pub fn forget_domain(&mut self, domain: &str) {
        self.failures.retain(|(failed, _), _| failed != domain);
    }

    /// New rules, a rescan or a new connection: everything is due again.
    pub fn clear(&mut self) {
        self.failures.clear();
    }

    /// The failures still wanted, in (VM, alias) order.
    pub fn current(&self) -> Vec<ActionFailure> {
        let mut failures: Vec<ActionFailure> =
            self.failures.values().map(|f| f.record.clone()).collect();
        failures.sort_by(|a, b| (&a.domain, &a.alias).cmp(&(&b.domain, &b.alias)));
        failures
    }

    /// The last failures, newest last, including those no longer wanted.
    pub fn recent(&self) -> Vec<ActionFailure> {
        self.recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UsbDevice;
    use crate::testing::devices::device;

    #[test]
    fn retry_schedule_is_bounded() {
        let delays: Vec<_> = (1..=6)
            .map(|attempt| retry_delay(FailureKind::DeviceNotFound, attempt))
            .collect();
        assert_eq!(delays[0], Some(Duration::from_millis(100)));
        assert_eq!(delays[5], None, "gives up after five retries");
        assert_eq!(retry_delay(FailureKind::NoFreePort, 3), None);
        assert_eq!(retry_delay(FailureKind::DomainGone, 1), None);
    }

    fn attach(domain: &str, device: UsbDevice) -> Action {
        Action::Attach {
            domain: domain.into(),
            alias: HostdevAlias::for_rules(&device),
            device: Box::new(device),
            rule: "receiver".into(),
        }
    }

    fn not_found(action: &Action) -> HypervisorError {
        HypervisorError::Attach {
            domain: action.domain().into(),
            device: "046d:c52b".into(),
            kind: FailureKind::DeviceNotFound,
            message: "not found".into(),
        }
    }

    #[test]
    fn a_failure_waits_its_delay_and_counts_its_attempts() {
        let mut book = RetryBook::default();
        let action = attach("win11", device(1, 5, 0x046d, 0xc52b, "1-2"));
        let now = Instant::now();
        let first = book.failed(&action, &not_found(&action), now);
        assert_eq!(
            (first.attempts, first.delay),
            (1, Some(Duration::from_millis(100)))
        );
        assert!(!book.is_due(&action, now + Duration::from_millis(99)));
        assert!(book.is_due(&action, now + Duration::from_millis(100)));
        assert_eq!(book.next_attempt(), Some(now + Duration::from_millis(100)));
        let second = book.failed(&action, &not_found(&action), now);
        assert_eq!(second.attempts, 2);
        assert_eq!(book.current()[0].retry_in_ms, Some(250));
        book.succeeded(&action);
        assert!(book.current().is_empty());
        assert_eq!(book.recent().len(), 2, "the history stays");
    }

    #[test]
    fn events_about_a_device_or_a_vm_make_its_failures_due() {
        let mut book = RetryBook::default();
        let receiver = attach("win11", device(1, 5, 0x046d, 0xc52b, "1-2"));
        let keyboard = attach("fedora", device(1, 7, 0x0627, 0x0001, "1-3"));
        let now = Instant::now();
        for action in [&receiver, &keyboard] {
            book.failed(action, &not_found(action), now);
        }
        book.forget_device(BusAddress { bus: 1, device: 5 });
        assert!(book.is_due(&receiver, now));
        assert!(!book.is_due(&keyboard, now));
        book.forget_domain("fedora");
        assert!(book.is_due(&keyboard, now));
    }

    #[test]
    fn only_wanted_failures_stay_and_the_history_is_bounded() {
        let mut book = RetryBook::default();
        let now = Instant::now();
        let actions: Vec<Action> = (1..=RECENT_FAILURES as u16 + 5)
            .map(|devnum| attach("win11", device(1, devnum, 0x046d, 0xc52b, "1-2")))
            .collect();
        for action in &actions {
            book.failed(action, &not_found(action), now);
        }
        book.keep_wanted(&actions[..1]);
        assert_eq!(book.current().len(), 1);
        let recent = book.recent();
        assert_eq!(recent.len(), RECENT_FAILURES);
        assert_eq!(
            recent.last().unwrap().alias,
            actions.last().unwrap().alias().to_string()
        );
    }
}
