//! Following a device through re-enumeration (a rule's `follow = "15s"`): when the
//! rule's device leaves a VM, its port is remembered for the window; a device that no
//! rule claims and that appears on that port within it is adopted, and `reconcile`
//! sends it to the same VM (`LoopFacts::followed`) for as long as it stays plugged. When
//! it leaves in turn, its port is remembered again, so a board that goes from its
//! bootloader back to its firmware is followed both ways.

use super::*;
use crate::model::alias::Ownership;
use crate::reconcile::Followed;
use crate::rules::RuleChoice;

/// A port a followed rule's device left from, and until when a newcomer there follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Departure {
    rule: String,
    vm: String,
    until: Instant,
}

impl<C: Connector, S: DeviceSource, K: Clock> Daemon<C, S, K> {
    /// Remembers the port of a device that is leaving, if its rule (or the rule it
    /// followed) asks for it and a VM held it.
    pub(super) fn note_departure(&mut self, device: &UsbDevice) {
        let address = device.address();
        let (rule, vm) = match self.facts.followed.remove(&address) {
            Some(followed) => (followed.rule, followed.vm),
            None => {
                let RuleChoice::Rule(rule) = self.config.decide(device) else {
                    return;
                };
                if rule.follow_seconds.is_none() {
                    return;
                }
                let holder = self.live.domains().iter().find(|domain| {
                    domain.hostdevs.iter().any(|hostdev| {
                        hostdev.ownership() == Ownership::Rules
                            && reconcile::hostdev_target(hostdev).0 == Some(address)
                    })
                });
                let Some(holder) = holder else { return };
                (rule.name.clone(), holder.name.clone())
            }
        };
        let Some(window) = self
            .config
            .rules
            .iter()
            .find(|known| known.name == rule)
            .and_then(|known| known.follow_seconds)
        else {
            return;
        };
        self.departures.insert(
            device.port_path.clone(),
            Departure {
                rule,
                vm,
                until: self.clock.now() + Duration::from_secs(u64::from(window)),
            },
        );
    }

    /// Adopts each present device that no rule claims and that sits on a port a
    /// followed device left within its window. Windows that passed are forgotten.
    pub(super) fn adopt_followers(&mut self) {
        let now = self.clock.now();
        self.departures.retain(|_, departure| departure.until > now);
        if self.departures.is_empty() {
            return;
        }
        for device in self.devices.values() {
            let address = device.address();
            if self.facts.followed.contains_key(&address) {
                continue;
            }
            // A device a rule claims goes where its rule says; one whose serial is not
            // read yet waits until a serial rule can be ruled out.
            if !matches!(self.config.decide(device), RuleChoice::NoRule) {
                continue;
            }
            let Some(departure) = self.departures.remove(&device.port_path) else {
                continue;
            };
            log::info!(
                "follow device={} addr={address} port={} rule={} vm={}: it appeared within the rule's follow window after the rule's device left that port",
                device.id(),
                device.port_path,
                departure.rule,
                departure.vm
            );
            self.facts.followed.insert(
                address,
                Followed {
                    rule: departure.rule,
                    vm: departure.vm,
                },
            );
        }
    }

    /// After a reload: a followed device whose rule is gone, or no longer follows, is
    /// an unclaimed device again.
    pub(super) fn forget_unfollowed_rules(&mut self) {
        let rules = &self.config.rules;
        let follows = |name: &str| {
            rules
                .iter()
                .any(|rule| rule.name == name && rule.follow_seconds.is_some())
        };
        self.facts
            .followed
            .retain(|_, followed| follows(&followed.rule));
        self.departures
            .retain(|_, departure| follows(&departure.rule));
    }
}
