//! The running domains and their USB hostdevs as the loop knows them: read from
//! libvirt's live XML at start, after a reconnect, on SIGHUP and whenever an event or a
//! failed call says the loop's picture may be wrong; kept current in between from the
//! loop's own successful calls and from libvirt's device events. A plug then costs one
//! attach call, not a listing of every domain's XML first.
//!
//! The picture is only ever a copy of the live XML: anything that could make the two
//! differ (a lifecycle event, a device someone else added, a call that failed, a detach
//! that did not finish in time) marks it stale, and the next round reads it afresh.
//!
//! The listing runs off the loop's thread; whatever changes the copy while it is under
//! way leaves the copy stale once the listing lands (it may have been read before the
//! change). A running VM whose XML could not be read is kept with what was last known
//! of it and marked unreadable: nothing is attached to it or detached from it until a
//! later read succeeds, and the other VMs go on.

use crate::hypervisor::{DomainView, HostdevSpec, RunningDomains, UnreadableDomain, UsbHostdev};
use std::time::{Duration, Instant};

/// How long after a listing that left a VM unreadable the loop reads again: 5 s,
/// doubling with each such listing in a row up to 5 min, so that a VM whose XML never
/// reads does not keep the daemon awake.
pub const UNREADABLE_REREAD: Duration = Duration::from_secs(5);
const UNREADABLE_REREAD_MAX: Duration = Duration::from_secs(300);

fn reread_delay(listings_in_a_row: u32) -> Duration {
    UNREADABLE_REREAD
        .saturating_mul(1 << listings_in_a_row.clamp(1, 7).saturating_sub(1))
        .min(UNREADABLE_REREAD_MAX)
}

#[derive(Debug, Default)]
pub struct LiveDomains {
    domains: Vec<DomainView>,
    /// Read the live XML again before the next plan.
    stale: bool,
    /// Domains that started since the last read: taken as running with no hostdevs, so
    /// that a device waiting for one goes in at once, and read once the loop has acted.
    unverified: bool,
    /// Counts the changes to the copy: a listing issued before one is outdated.
    changes: u64,
    /// Running VMs whose live XML the last listing could not read, by name.
    unreadable: Vec<UnreadableDomain>,
    /// When to read again because a VM was unreadable.
    reread_at: Option<Instant>,
    /// Listings in a row that left a VM unreadable.
    unreadable_listings: u32,
}

impl LiveDomains {
    /// Nothing known yet: the first round reads the live XML.
    pub fn new() -> LiveDomains {
        LiveDomains {
            stale: true,
            ..LiveDomains::default()
        }
    }

    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// The next round reads the live XML again.
    pub fn invalidate(&mut self) {
        self.stale = true;
        self.changes += 1;
    }

    /// What a listing issued now hands back to `refreshed`.
    pub fn listing_token(&self) -> u64 {
        self.changes
    }

    /// A fresh listing, issued when `listing_token` was `token`. The copy is stale still
    /// when anything changed it since. Unreadable VMs keep their last known hostdevs.
    pub fn refreshed(&mut self, listing: RunningDomains, token: u64, now: Instant) {
        let RunningDomains {
            readable: mut domains,
            unreadable,
        } = listing;
        for domain in &unreadable {
            let known = self
                .domains
                .iter()
                .find(|view| view.name == domain.name)
                .cloned()
                .unwrap_or_else(|| DomainView {
                    name: domain.name.clone(),
                    hostdevs: Vec::new(),
                });
            domains.push(known);
        }
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        self.domains = domains;
        self.stale = token != self.changes;
        self.unverified = false;
        self.unreadable_listings = if unreadable.is_empty() {
            0
        } else {
            self.unreadable_listings + 1
        };
        self.reread_at =
            (!unreadable.is_empty()).then(|| now + reread_delay(self.unreadable_listings));
        self.unreadable = unreadable;
    }

    /// The VMs the last listing could not read.
    pub fn unreadable(&self) -> &[UnreadableDomain] {
        &self.unreadable
    }

    pub fn is_unreadable(&self, domain: &str) -> bool {
        self.unreadable.iter().any(|known| known.name == domain)
    }

    /// When an unreadable VM is to be read again.
    pub fn reread_at(&self) -> Option<Instant> {
        self.reread_at
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
        self.changes += 1;
    }

    /// A domain stopped: it runs no more and holds nothing.
    pub fn domain_stopped(&mut self, domain: &str) {
        self.domains.retain(|view| view.name != domain);
        self.unreadable.retain(|known| known.name != domain);
        self.changes += 1;
    }

    /// Whether a started domain's live XML is still to be read.
    pub fn is_unverified(&self) -> bool {
        self.unverified
    }

    /// Whether `domain` runs, as far as the copy knows.
    pub fn is_running(&self, domain: &str) -> bool {
        self.domains.iter().any(|view| view.name == domain)
    }

    pub fn domains(&self) -> &[DomainView] {
        &self.domains
    }

    /// Our attach succeeded: the live XML now has the hostdev, with the address libvirt
    /// was given.
    pub fn attached(&mut self, domain: &str, hostdev: &HostdevSpec) {
        self.changes += 1;
        match self.domains.iter_mut().find(|view| view.name == domain) {
            Some(view) => view.hostdevs.push(UsbHostdev {
                alias: Some(hostdev.alias.to_string()),
                id: Some(hostdev.id),
                address: Some(hostdev.address),
            }),
            None => self.invalidate(),
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
            self.invalidate();
        }
    }

    /// libvirt's DEVICE_REMOVED: the hostdev is gone from the live XML.
    pub fn device_removed(&mut self, domain: &str, alias: &str) {
        self.changes += 1;
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

    fn win11() -> RunningDomains {
        RunningDomains {
            readable: vec![DomainView {
                name: "win11".into(),
                hostdevs: Vec::new(),
            }],
            unreadable: Vec::new(),
        }
    }

    /// A listing issued and landed with nothing in between.
    fn read(live: &mut LiveDomains, listing: RunningDomains) {
        let token = live.listing_token();
        live.refreshed(listing, token, Instant::now());
    }

    fn receiver() -> HostdevSpec {
        let device = device(1, 5, 0x046d, 0xc52b, "1-2");
        HostdevSpec::new(&device, HostdevAlias::for_rules(&device))
    }

    #[test]
    fn stale_until_read_and_after_an_invalidation() {
        let mut live = LiveDomains::new();
        assert!(live.is_stale());
        read(&mut live, win11());
        assert!(!live.is_stale());
        live.invalidate();
        assert!(live.is_stale());
    }

    #[test]
    fn own_attach_and_its_events_keep_the_picture_without_a_read() {
        let mut live = LiveDomains::new();
        read(&mut live, win11());
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
        read(&mut live, win11());
        live.domain_started("fedora");
        assert!(!live.is_stale());
        assert!(live.is_unverified());
        let names: Vec<&str> = live.domains().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["fedora", "win11"]);
        read(&mut live, win11());
        assert!(!live.is_unverified());
        live.domain_stopped("win11");
        assert!(live.domains().is_empty());
        assert!(!live.is_stale());
    }

    #[test]
    fn someone_elses_device_or_an_unknown_domain_needs_a_read() {
        let mut live = LiveDomains::new();
        read(&mut live, win11());
        live.device_added("win11", "hostdev0");
        assert!(live.is_stale());

        read(&mut live, win11());
        live.attached("fedora", &receiver());
        assert!(live.is_stale());
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;
    use crate::hypervisor::{FailureKind, HypervisorError};

    fn view(name: &str, aliases: &[&str]) -> DomainView {
        DomainView {
            name: name.into(),
            hostdevs: aliases
                .iter()
                .map(|alias| UsbHostdev {
                    alias: Some(alias.to_string()),
                    id: None,
                    address: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_change_while_a_listing_is_under_way_leaves_the_copy_stale() {
        let mut live = LiveDomains::new();
        let token = live.listing_token();
        live.device_removed("win11", "ua-usbpass-1-5-046d-c52b");
        let listing = RunningDomains {
            readable: vec![view("win11", &["ua-usbpass-1-5-046d-c52b"])],
            unreadable: Vec::new(),
        };
        live.refreshed(listing.clone(), token, Instant::now());
        assert!(live.is_stale(), "read before the removal: read again");
        let token = live.listing_token();
        live.refreshed(listing, token, Instant::now());
        assert!(!live.is_stale());
    }

    #[test]
    fn an_unreadable_vm_keeps_what_was_known_and_is_read_again() {
        let mut live = LiveDomains::new();
        let now = Instant::now();
        let token = live.listing_token();
        let both = RunningDomains {
            readable: vec![
                view("fedora", &[]),
                view("win11", &["ua-usbpass-1-5-046d-c52b"]),
            ],
            unreadable: Vec::new(),
        };
        live.refreshed(both, token, now);
        let listing = RunningDomains {
            readable: vec![view("fedora", &[])],
            unreadable: vec![UnreadableDomain {
                name: "win11".into(),
                error: HypervisorError::ReadDomainXml {
                    domain: "win11".into(),
                    kind: FailureKind::TimedOut,
                    message: "cannot acquire state change lock".into(),
                },
            }],
        };
        live.refreshed(listing, live.listing_token(), now);
        assert!(live.is_unreadable("win11"));
        assert!(!live.is_unreadable("fedora"));
        assert_eq!(
            live.domains(),
            [
                view("fedora", &[]),
                view("win11", &["ua-usbpass-1-5-046d-c52b"])
            ]
        );
        assert_eq!(live.reread_at(), Some(now + UNREADABLE_REREAD));
        let unreadable = live.unreadable().to_vec();
        let again = |live: &mut LiveDomains| {
            let listing = RunningDomains {
                readable: vec![view("fedora", &[])],
                unreadable: unreadable.clone(),
            };
            live.refreshed(listing, live.listing_token(), now);
            live.reread_at().map(|at| (at - now).as_secs())
        };
        let waits: Vec<_> = (0..8).map(|_| again(&mut live)).collect();
        assert_eq!(
            waits,
            [10, 20, 40, 80, 160, 300, 300, 300].map(Some),
            "backs off to five minutes"
        );
        live.domain_stopped("win11");
        assert!(!live.is_unreadable("win11"));
    }
}
