//! The libvirt calls the loop has started and not yet seen answered: what each is
//! (an action, or a listing), on which connection, and its deadline. The loop issues
//! at most one call per VM at a time and never an action whose VM and alias already
//! have one out. A call past its deadline is given up on, not forgotten: it cannot be
//! cancelled, so its VM counts as not answering, and gets no other call, until it
//! returns.

use crate::daemon::executor::CallId;
use crate::model::alias::HostdevAlias;
use crate::reconcile::Action;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long an attach, a detach or a listing may take before the loop gives up
/// waiting. QEMU answers a usb-host hot-plug within milliseconds, libvirt's own
/// state-change lock gives up after 30 s: 10 s is far past any healthy call and well
/// inside systemd's patience.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// What a call is for.
#[derive(Debug, Clone)]
pub enum CallKind {
    Action {
        action: Action,
        /// When the event the action answers was received, for the decision line.
        cause: Instant,
        /// When it was issued, on the system's clock: what the decision line measures.
        started: Instant,
    },
    Listing {
        /// `LiveDomains::listing_token` when it was issued.
        token: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Call {
    pub kind: CallKind,
    /// The connection it went out on (`Connection::generation`).
    pub connection: u64,
    /// On the loop's clock.
    pub issued: Instant,
    pub deadline: Instant,
    /// Past its deadline and booked as timed out.
    pub timed_out: bool,
}

impl Call {
    fn domain(&self) -> Option<&str> {
        match &self.kind {
            CallKind::Action { action, .. } => Some(action.domain()),
            CallKind::Listing { .. } => None,
        }
    }
}

#[derive(Debug, Default)]
pub struct InFlight {
    calls: HashMap<CallId, Call>,
}

impl InFlight {
    /// A call went out on `connection` at `now` (the loop's clock), due back by
    /// `now + deadline`.
    pub fn started(
        &mut self,
        id: CallId,
        kind: CallKind,
        connection: u64,
        now: Instant,
        deadline: Duration,
    ) {
        self.calls.insert(
            id,
            Call {
                kind,
                connection,
                issued: now,
                deadline: now + deadline,
                timed_out: false,
            },
        );
    }

    /// The call answered: it is no longer out.
    pub fn finished(&mut self, id: CallId) -> Option<Call> {
        self.calls.remove(&id)
    }

    /// Whether a call for this VM is out: its next call waits, so that a VM's calls run
    /// one after another, in the order the loop decided them.
    pub fn busy(&self, domain: &str) -> bool {
        self.calls
            .values()
            .any(|call| call.domain() == Some(domain))
    }

    /// Whether an attach of this alias to this VM is out: libvirt's DEVICE_ADDED for it
    /// may come before the call returns.
    pub fn attaching(&self, domain: &str, alias: &str) -> bool {
        self.calls.values().any(|call| {
            matches!(&call.kind, CallKind::Action { action: Action::Attach { domain: to, alias: attached, .. }, .. }
                if to == domain && attached.as_str() == alias)
        })
    }

    /// Whether a detach of a hostdev with this alias is out, in any VM.
    pub fn detaching(&self, alias: &HostdevAlias) -> bool {
        self.calls.values().any(|call| {
            matches!(&call.kind, CallKind::Action { action: Action::Detach { alias: detached, .. }, .. }
                if detached == alias)
        })
    }

    /// Whether a listing on this connection is out and not given up on.
    pub fn listing(&self, connection: u64) -> bool {
        self.calls.values().any(|call| {
            matches!(call.kind, CallKind::Listing { .. })
                && call.connection == connection
                && !call.timed_out
        })
    }

    /// Whether an action call is out that is not given up on.
    pub fn any_action_waited_for(&self) -> bool {
        self.calls
            .values()
            .any(|call| matches!(call.kind, CallKind::Action { .. }) && !call.timed_out)
    }

    /// The VMs with a call out past its deadline, sorted, with when the oldest such
    /// call was issued: they do not answer.
    pub fn not_answering(&self) -> Vec<(String, Instant)> {
        let mut stuck: HashMap<&str, Instant> = HashMap::new();
        for call in self.calls.values().filter(|call| call.timed_out) {
            if let Some(domain) = call.domain() {
                let since = stuck.entry(domain).or_insert(call.issued);
                *since = (*since).min(call.issued);
            }
        }
        let mut stuck: Vec<(String, Instant)> = stuck
            .into_iter()
            .map(|(domain, since)| (domain.to_string(), since))
            .collect();
        stuck.sort();
        stuck
    }

    /// The earliest deadline of a call still waited for.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.calls
            .values()
            .filter(|call| !call.timed_out)
            .map(|call| call.deadline)
            .min()
    }

    /// Marks the calls whose deadline has come as timed out and returns them, oldest
    /// first.
    pub fn expire(&mut self, now: Instant) -> Vec<(CallId, Call)> {
        let mut expired: Vec<(CallId, Call)> = self
            .calls
            .iter_mut()
            .filter(|(_, call)| !call.timed_out && call.deadline <= now)
            .map(|(id, call)| {
                call.timed_out = true;
                (*id, call.clone())
            })
            .collect();
        expired.sort_by_key(|(id, _)| *id);
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::alias::HostdevAlias;
    use crate::testing::devices::device;

    fn attach(domain: &str) -> Action {
        let receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        Action::Attach {
            domain: domain.into(),
            alias: HostdevAlias::for_rules(&receiver),
            device: Box::new(receiver),
            rule: "receiver".into(),
        }
    }

    #[test]
    fn a_call_past_its_deadline_marks_its_vm_until_it_returns() {
        let now = Instant::now();
        let mut calls = InFlight::default();
        let action = CallKind::Action {
            action: attach("win11"),
            cause: now,
            started: now,
        };
        calls.started(CallId(1), action, 1, now, CALL_DEADLINE);
        calls.started(
            CallId(2),
            CallKind::Listing { token: 0 },
            1,
            now,
            CALL_DEADLINE,
        );
        assert!(calls.busy("win11"));
        assert!(!calls.busy("fedora"));
        assert!(calls.listing(1));
        assert!(!calls.listing(2), "another connection's listing");
        assert_eq!(calls.next_deadline(), Some(now + CALL_DEADLINE));
        assert!(calls
            .expire(now + CALL_DEADLINE - Duration::from_millis(1))
            .is_empty());

        let expired = calls.expire(now + CALL_DEADLINE);
        assert_eq!(
            expired.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [CallId(1), CallId(2)]
        );
        assert!(calls.expire(now + CALL_DEADLINE).is_empty(), "expired once");
        assert_eq!(calls.next_deadline(), None);
        assert_eq!(calls.not_answering(), [("win11".to_string(), now)]);
        assert!(calls.busy("win11"), "no other call while it is stuck");
        assert!(!calls.listing(1));
        assert!(!calls.any_action_waited_for());

        assert!(calls.finished(CallId(1)).is_some());
        assert!(calls.not_answering().is_empty());
        assert!(!calls.busy("win11"));
    }
}
