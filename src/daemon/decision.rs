//! The decision log line, one per action carried out, and its timing: `decision_us`
//! counts from the receipt of the event the decision answers to the libvirt call. The
//! e2e harness and the README parse and quote these lines: the field names and their
//! order are an interface.

use crate::daemon::executor::ActionOutcome;
use crate::hypervisor::HypervisorError;
use crate::model::BusAddress;
use crate::reconcile::Action;
use std::collections::HashMap;
use std::fmt::Display;
use std::time::{Duration, Instant};

/// When the loop received what it is acting on. On the system's monotonic clock, not
/// the loop's: udev's receipt times are on it, and this measures, it schedules nothing.
pub struct DecisionTiming {
    /// When the loop received the event it is acting on: decision times count from here,
    woke_at: Instant,
    /// or, for a device whose udev event is in this wake's batch, from when the monitor
    /// received that event. Cleared at every wake: a device plugged while its VM was
    /// off is attached because the VM started, and counts from that event.
    device_events: HashMap<BusAddress, Instant>,
}

impl DecisionTiming {
    pub fn new() -> DecisionTiming {
        DecisionTiming {
            woke_at: Instant::now(),
            device_events: HashMap::new(),
        }
    }

    /// The loop woke, for an event or a deadline.
    pub fn woke(&mut self) {
        self.woke_at = Instant::now();
        self.device_events.clear();
    }

    /// A udev event about the device at `address`, read off the socket at `received`.
    pub fn device_event(&mut self, address: BusAddress, received: Instant) {
        self.device_events.insert(address, received);
    }

    /// When the event that `action` answers was received.
    pub fn cause(&self, action: &Action) -> Instant {
        match action {
            Action::Attach { device, .. } => self.device_events.get(&device.address()).copied(),
            Action::Detach { .. } => None,
        }
        .unwrap_or(self.woke_at)
    }
}

/// `attach` or `detach`: the first word of the log line and the state file's name.
pub fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Attach { .. } => "attach",
        Action::Detach { .. } => "detach",
    }
}

/// The device an action is about, as `usbpass status` shows it.
pub fn device_description(action: &Action) -> String {
    match action {
        Action::Attach { device, .. } => device.to_string(),
        Action::Detach { id, address, .. } => {
            format!("{} at {}", or_unknown(*id), or_unknown(*address))
        }
    }
}

/// The line for a call libvirt accepted, logged at info.
pub fn success_line(outcome: &ActionOutcome, cause: Instant) -> String {
    format!(
        "{} result=ok call_ms={}",
        subject(outcome, cause),
        outcome.call_time.as_millis()
    )
}

/// The line for a failed call, logged at warn, with the retry the book scheduled for
/// it: after `delay`, or on the next event about that device or VM.
pub fn failure_line(
    outcome: &ActionOutcome,
    cause: Instant,
    error: &HypervisorError,
    attempts: u32,
    delay: Option<Duration>,
) -> String {
    let retry = delay.map_or("on-next-event".to_string(), |delay| {
        format!("{}ms", delay.as_millis())
    });
    format!(
        "{} result=error kind={} attempts={attempts} retry={retry} call_ms={} error=\"{error}\"",
        subject(outcome, cause),
        error.kind().as_str(),
        outcome.call_time.as_millis()
    )
}

/// What was decided, before the result: the same for success and failure.
fn subject(outcome: &ActionOutcome, cause: Instant) -> String {
    match &outcome.action {
        Action::Attach {
            domain,
            device,
            alias,
            rule,
        } => format!(
            "attach device={} addr={} port={} rule={rule} vm={domain} alias={alias} decision_us={}",
            device.id(),
            device.address(),
            device.port_path,
            outcome.started.saturating_duration_since(cause).as_micros()
        ),
        Action::Detach {
            domain,
            alias,
            id,
            address,
            reason,
        } => format!(
            "detach device={} addr={} vm={domain} alias={alias} reason={reason}",
            or_unknown(*id),
            or_unknown(*address)
        ),
    }
}

fn or_unknown(value: Option<impl Display>) -> String {
    value.map_or("unknown".to_string(), |value| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::FailureKind;
    use crate::model::alias::HostdevAlias;
    use crate::reconcile::DetachReason;
    use crate::testing::devices::device;

    fn attach_outcome(result: Result<(), HypervisorError>) -> ActionOutcome {
        let receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        ActionOutcome {
            action: Action::Attach {
                domain: "win11".into(),
                alias: HostdevAlias::for_rules(&receiver),
                device: Box::new(receiver),
                rule: "receiver".into(),
            },
            started: Instant::now(),
            call_time: Duration::from_millis(84),
            result,
        }
    }

    #[test]
    fn an_attach_line_has_every_field_in_order() {
        let outcome = attach_outcome(Ok(()));
        let cause = outcome.started - Duration::from_micros(210);
        assert_eq!(
            success_line(&outcome, cause),
            "attach device=046d:c52b addr=001:005 port=1-2 rule=receiver vm=win11 alias=ua-usbpass-1-5-046d-c52b decision_us=210 result=ok call_ms=84"
        );
    }

    #[test]
    fn a_failed_attach_line_names_the_kind_and_the_retry() {
        let error = HypervisorError::Attach {
            domain: "win11".into(),
            device: "046d:c52b at 001:005 (port 1-2)".into(),
            kind: FailureKind::NoFreePort,
            message: "no port".into(),
        };
        let outcome = attach_outcome(Err(error.clone()));
        let line = failure_line(
            &outcome,
            outcome.started,
            &error,
            1,
            Some(Duration::from_secs(5)),
        );
        assert_eq!(
            line,
            "attach device=046d:c52b addr=001:005 port=1-2 rule=receiver vm=win11 alias=ua-usbpass-1-5-046d-c52b decision_us=0 result=error kind=no-free-port attempts=1 retry=5000ms call_ms=84 error=\"cannot attach 046d:c52b at 001:005 (port 1-2) to vm win11: no port\""
        );
        let line = failure_line(&outcome, outcome.started, &error, 3, None);
        assert!(
            line.contains(" attempts=3 retry=on-next-event call_ms=84 "),
            "{line}"
        );
    }

    #[test]
    fn a_detach_line_says_unknown_for_what_the_xml_did_not_say() {
        let outcome = ActionOutcome {
            action: Action::Detach {
                domain: "win11".into(),
                alias: HostdevAlias::parse("ua-usbpass-1-5-046d-c52b").unwrap(),
                id: None,
                address: None,
                reason: DetachReason::DeviceGone,
            },
            started: Instant::now(),
            call_time: Duration::from_millis(3),
            result: Ok(()),
        };
        assert_eq!(
            success_line(&outcome, outcome.started),
            "detach device=unknown addr=unknown vm=win11 alias=ua-usbpass-1-5-046d-c52b reason=device-gone result=ok call_ms=3"
        );
        assert_eq!(device_description(&outcome.action), "unknown at unknown");
    }

    #[test]
    fn an_attach_counts_from_its_device_event_else_from_the_wake() {
        let mut timing = DecisionTiming::new();
        let outcome = attach_outcome(Ok(()));
        assert_eq!(timing.cause(&outcome.action), timing.woke_at);
        let received = timing.woke_at - Duration::from_millis(2);
        timing.device_event(BusAddress { bus: 1, device: 5 }, received);
        assert_eq!(timing.cause(&outcome.action), received);
        timing.woke();
        assert_eq!(timing.cause(&outcome.action), timing.woke_at);
    }
}
