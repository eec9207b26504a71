//! Detaches libvirt accepted but QEMU has not finished. `virDomainDetachDeviceAlias`
//! returns once the unplug is requested, and the hostdev stays in the live XML until
//! DEVICE_REMOVED. Until then the loop treats it as gone instead of asking again; after
//! `DETACH_GRACE` it asks again.

use crate::hypervisor::DomainView;
use crate::model::alias::HostdevAlias;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a requested detach may take before the loop asks again. QEMU answers a
/// usb-host unplug at once; a guest that ignores it should not hold the loop forever.
pub const DETACH_GRACE: Duration = Duration::from_secs(10);

/// When each detach under way was requested, by (VM, alias as the XML spells it).
#[derive(Default)]
pub struct PendingDetaches(HashMap<(String, String), Instant>);

impl PendingDetaches {
    pub fn requested(&mut self, domain: &str, alias: &HostdevAlias, now: Instant) {
        self.0.insert((domain.to_string(), alias.to_string()), now);
    }

    /// libvirt's DEVICE_REMOVED.
    pub fn finished(&mut self, domain: &str, alias: &str) {
        self.0.remove(&(domain.to_string(), alias.to_string()));
    }

    /// A new connection lists afresh; what is still in the XML is still there.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// When the first grace runs out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.0.values().map(|at| *at + DETACH_GRACE).min()
    }

    /// Whether a detach of a hostdev with this alias is under way in any VM: the device
    /// it points at is not free for another VM until it finishes.
    pub fn contains_alias(&self, alias: &HostdevAlias) -> bool {
        self.0.keys().any(|(_, pending)| pending == alias.as_str())
    }

    /// Drops from the listing the hostdevs whose detach is under way, and forgets
    /// pending detaches that have finished (gone from the XML) or taken too long.
    /// Returns whether one took too long: the hostdev is still listed past its grace.
    pub fn hide(&mut self, domains: &mut [DomainView], now: Instant) -> bool {
        let mut overdue = false;
        self.0.retain(|(domain, alias), requested| {
            let still_listed = domains.iter().any(|d| {
                d.name == *domain
                    && d.hostdevs
                        .iter()
                        .any(|h| h.alias.as_deref() == Some(alias.as_str()))
            });
            let in_time = now < *requested + DETACH_GRACE;
            overdue |= still_listed && !in_time;
            still_listed && in_time
        });
        for domain in domains.iter_mut() {
            let name = domain.name.clone();
            domain.hostdevs.retain(|hostdev| {
                hostdev
                    .alias
                    .as_ref()
                    .is_none_or(|alias| !self.0.contains_key(&(name.clone(), alias.clone())))
            });
        }
        overdue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::UsbHostdev;

    const ALIAS: &str = "ua-usbpass-1-5-046d-c52b";

    fn win11_holding_the_receiver() -> Vec<DomainView> {
        vec![DomainView {
            name: "win11".into(),
            hostdevs: vec![UsbHostdev {
                alias: Some(ALIAS.into()),
                id: None,
                address: None,
            }],
        }]
    }

    fn requested_at(now: Instant) -> PendingDetaches {
        let mut pending = PendingDetaches::default();
        pending.requested("win11", &HostdevAlias::parse(ALIAS).unwrap(), now);
        pending
    }

    #[test]
    fn a_detach_under_way_is_hidden_until_the_grace_runs_out() {
        let now = Instant::now();
        let mut pending = requested_at(now);
        assert_eq!(pending.next_deadline(), Some(now + DETACH_GRACE));
        let mut domains = win11_holding_the_receiver();
        pending.hide(&mut domains, now + DETACH_GRACE - Duration::from_millis(1));
        assert!(domains[0].hostdevs.is_empty());

        let mut domains = win11_holding_the_receiver();
        pending.hide(&mut domains, now + DETACH_GRACE);
        assert_eq!(domains[0].hostdevs.len(), 1, "asked again after the grace");
        assert_eq!(pending.next_deadline(), None);
    }

    #[test]
    fn a_finished_detach_is_forgotten() {
        let now = Instant::now();
        let mut pending = requested_at(now);
        pending.finished("win11", ALIAS);
        assert_eq!(pending.next_deadline(), None);

        // Gone from the XML without DEVICE_REMOVED (an event lost with a reconnect):
        // forgotten too, so that a new hostdev under the same alias is not hidden.
        let mut pending = requested_at(now);
        pending.hide(&mut [], now);
        assert_eq!(pending.next_deadline(), None);
    }
}
