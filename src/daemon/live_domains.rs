//! The running domains and their USB hostdevs as the loop knows them: read from
//! libvirt's live XML at start, after a reconnect, on SIGHUP and whenever an event or a
//! failed call says the loop's picture may be wrong; kept current in between from the
//! loop's own successful calls and from libvirt's device events. A plug then costs one
//! attach call, not a listing of every domain's XML first.
//!
//! The picture is only ever a copy of the live XML: anything that could make the two
//! differ (a lifecycle event, a device someone else added, a call that failed, a detach
//! that did not finish in time) marks it stale, and the next round reads it afresh.

use crate::hypervisor::{DomainView, HostdevSpec, UsbHostdev};

#[derive(Debug, Default)]
pub struct LiveDomains {
    domains: Vec<DomainView>,
    /// Read the live XML again before the next plan.
    stale: bool,
    /// Domains that started since the last read: taken as running with no hostdevs, so
    /// that a device waiting for one goes in at once, and read once the loop has acted.
    unverified: bool,
}

impl LiveDomains {
    /// Nothing known yet: the first round reads the live XML.
    pub fn new() -> LiveDomains {
        LiveDomains {
            domains: Vec::new(),
            stale: true,
            unverified: false,
        }
    }

    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// The next round reads the live XML again.
    pub fn invalidate(&mut self) {
        self.stale = true;
    }

    /// A fresh listing of every running domain.
    pub fn refreshed(&mut self, domains: Vec<DomainView>) {
        self.domains = domains;
        self.stale = false;
        self.unverified = false;
    }

    /// A domain started. Its live XML holds what its definition names, which is almost
    /// always no USB hostdev; the loop plans as if it held none, so that a plugged
    /// device reaches it with one call, and reads the truth after acting. An attach the
    /// definition makes impossible (the device already named there) fails, which makes
    /// the picture stale at once.
    pub fn domain_started(&mut self, domain: &str) {
        if !self.domains.iter().any(|view| view.name == domain) {
            self.domains.push(DomainView {
                name: domain.to_string(),
                hostdevs: Vec::new(),
            });
            self.domains.sort_by(|a, b| a.name.cmp(&b.name));
        }
        self.unverified = true;
    }

    /// A domain stopped: it runs no more and holds nothing.
    pub fn domain_stopped(&mut self, domain: &str) {
        self.domains.retain(|view| view.name != domain);
    }

    /// Whether a started domain's live XML is still to be read.
    pub fn is_unverified(&self) -> bool {
        self.unverified
    }

    pub fn domains(&self) -> &[DomainView] {
        &self.domains
    }

    /// Our attach succeeded: the live XML now has the hostdev, with the address libvirt
    /// was given.
    pub fn attached(&mut self, domain: &str, hostdev: &HostdevSpec) {
        match self.domains.iter_mut().find(|view| view.name == domain) {
            Some(view) => view.hostdevs.push(UsbHostdev {
                alias: Some(hostdev.alias.to_string()),
                id: Some(hostdev.id),
                address: Some(hostdev.address),
            }),
            None => self.stale = true,
        }
    }

    /// libvirt's DEVICE_ADDED. Our own attaches are already here; anything else is
    /// someone else's device, whose XML only a fresh read shows.
    pub fn device_added(&mut self, domain: &str, alias: &str) {
        let known = self.domains.iter().any(|view| {
            view.name == domain
                && view
                    .hostdevs
                    .iter()
                    .any(|hostdev| hostdev.alias.as_deref() == Some(alias))
        });
        if !known {
            self.stale = true;
        }
    }

    /// libvirt's DEVICE_REMOVED: the hostdev is gone from the live XML.
    pub fn device_removed(&mut self, domain: &str, alias: &str) {
        if let Some(view) = self.domains.iter_mut().find(|view| view.name == domain) {
            view.hostdevs
                .retain(|hostdev| hostdev.alias.as_deref() != Some(alias));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::alias::HostdevAlias;
    use crate::testing::devices::device;

    fn win11() -> Vec<DomainView> {
        vec![DomainView {
            name: "win11".into(),
            hostdevs: Vec::new(),
        }]
    }

    fn receiver() -> HostdevSpec {
        let device = device(1, 5, 0x046d, 0xc52b, "1-2");
        HostdevSpec::new(&device, HostdevAlias::for_rules(&device))
    }

    #[test]
    fn stale_until_read_and_after_an_invalidation() {
        let mut live = LiveDomains::new();
        assert!(live.is_stale());
        live.refreshed(win11());
        assert!(!live.is_stale());
        live.invalidate();
        assert!(live.is_stale());
    }

    #[test]
    fn own_attach_and_its_events_keep_the_picture_without_a_read() {
        let mut live = LiveDomains::new();
        live.refreshed(win11());
        let hostdev = receiver();
        live.attached("win11", &hostdev);
        live.device_added("win11", hostdev.alias.as_str());
        assert!(!live.is_stale());
        assert_eq!(
            live.domains()[0].hostdevs,
            [UsbHostdev {
                alias: Some(hostdev.alias.to_string()),
                id: Some(hostdev.id),
                address: Some(hostdev.address),
            }]
        );
        live.device_removed("win11", hostdev.alias.as_str());
        assert!(live.domains()[0].hostdevs.is_empty());
        assert!(!live.is_stale());
    }

    #[test]
    fn a_started_domain_is_planned_for_at_once_and_read_later() {
        let mut live = LiveDomains::new();
        live.refreshed(win11());
        live.domain_started("fedora");
        assert!(!live.is_stale());
        assert!(live.is_unverified());
        let names: Vec<&str> = live.domains().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["fedora", "win11"]);
        live.refreshed(win11());
        assert!(!live.is_unverified());
        live.domain_stopped("win11");
        assert!(live.domains().is_empty());
        assert!(!live.is_stale());
    }

    #[test]
    fn someone_elses_device_or_an_unknown_domain_needs_a_read() {
        let mut live = LiveDomains::new();
        live.refreshed(win11());
        live.device_added("win11", "hostdev0");
        assert!(live.is_stale());

        live.refreshed(win11());
        live.attached("fedora", &receiver());
        assert!(live.is_stale());
    }
}
