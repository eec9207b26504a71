//! Carries out one `Action` through the `Hypervisor` and hands back what happened as
//! plain data. The loop decides and books the outcome; the executor only calls. It
//! reads and changes none of the loop's state, so that its calls can later run on a
//! thread of their own and their outcomes come back over a channel.

use crate::hypervisor::{HostdevSpec, Hypervisor, HypervisorError};
use crate::reconcile::Action;
use std::time::{Duration, Instant};

/// One action carried out: the action, when its call began and how long it took, and
/// libvirt's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionOutcome {
    pub action: Action,
    /// Decision times end here.
    pub started: Instant,
    pub call_time: Duration,
    pub result: Result<(), HypervisorError>,
}

/// The times are the system's monotonic clock, not the loop's: they measure a call,
/// they schedule nothing.
pub fn execute<H: Hypervisor>(hypervisor: &mut H, action: Action) -> ActionOutcome {
    let started = Instant::now();
    let result = match &action {
        Action::Attach {
            domain,
            device,
            alias,
            ..
        } => hypervisor.attach(domain, &HostdevSpec::new(device, alias.clone())),
        Action::Detach { domain, alias, .. } => hypervisor.detach(domain, alias),
    };
    ActionOutcome {
        action,
        started,
        call_time: started.elapsed(),
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Connector, FailureKind};
    use crate::model::alias::HostdevAlias;
    use crate::reconcile::DetachReason;
    use crate::testing::devices::device;
    use crate::testing::fake_hypervisor::{Call, FakeConnector, FakeWorld, SharedWorld};

    #[test]
    fn an_action_becomes_one_call_and_its_answer() {
        let world = SharedWorld::new(FakeWorld::with_domains(&["win11"]));
        let mut hypervisor = FakeConnector {
            world: world.clone(),
        }
        .connect("test:///default", std::sync::mpsc::channel().0)
        .unwrap();
        let receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        let alias = HostdevAlias::for_rules(&receiver);
        let attach = Action::Attach {
            domain: "win11".into(),
            device: Box::new(receiver),
            alias: alias.clone(),
            rule: "receiver".into(),
        };
        let outcome = execute(&mut hypervisor, attach.clone());
        assert_eq!(outcome.action, attach);
        assert_eq!(outcome.result, Ok(()));
        assert_eq!(world.lock().aliases_in("win11"), [alias.to_string()]);

        let detach = Action::Detach {
            domain: "fedora".into(),
            alias: alias.clone(),
            id: None,
            address: None,
            reason: DetachReason::DeviceGone,
        };
        let outcome = execute(&mut hypervisor, detach);
        let error = outcome.result.unwrap_err();
        assert_eq!(error.kind(), FailureKind::DomainGone);
        assert_eq!(
            world.lock().calls.last(),
            Some(&Call::Detach {
                domain: "fedora".into(),
                alias: alias.to_string(),
            })
        );
    }
}
