//! A test double for the libvirt seam: an in-memory set of running domains that
//! records every call, fails on demand, after cloud-hypervisor's
//! `MockVfio::failing_at`, and hangs on demand (a VM's calls, or the listing, wait
//! until the test releases them, as they do with a stuck QEMU or libvirtd). Used by
//! the daemon's unit tests and by the benchmarks.

use crate::event::{Event, EventSender};
use crate::host::{DeviceSource, HostError};
use crate::hypervisor::{
    Connector, DefinedHostdevs, DomainView, FailureKind, HostdevSpec, Hypervisor, HypervisorError,
    RunningDomains, UnreadableDomain, UsbHostdev,
};
use crate::model::alias::HostdevAlias;
use crate::model::UsbDevice;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Connect,
    ListDomains,
    Attach {
        domain: String,
        alias: String,
    },
    Detach {
        domain: String,
        alias: String,
    },
    /// A removal from a persistent definition. (Reads of the definitions are not
    /// recorded: they change nothing, and the call indices that `failing_at` counts
    /// stay those of the calls the loop's tests are about.)
    RemoveFromDefinition {
        domain: String,
        alias: String,
    },
}

/// The fake's world, shared between the test and the daemon under test.
#[derive(Debug, Default)]
pub struct FakeWorld {
    pub domains: Vec<DomainView>,
    pub calls: Vec<Call>,
    /// When each attach call arrived, for decision-time benchmarks.
    pub attach_times: Vec<Instant>,
    /// Calls (0-based, counted over every call including connects) that fail once.
    failing_at: BTreeMap<usize, FailureKind>,
    /// The next attaches fail with these kinds, one each, in order.
    pub failing_attaches: std::collections::VecDeque<FailureKind>,
    /// Fail every call from now on with this kind, until cleared.
    failing_always: Option<FailureKind>,
    /// USB ports per domain: an attach beyond this fails like a full qemu-xhci.
    pub ports_per_domain: Option<usize>,
    /// USB ports of one domain, over `ports_per_domain`.
    pub ports_in: BTreeMap<String, usize>,
    /// Detach like libvirt's `virDomainDetachDeviceAlias`: accept the request and leave
    /// the hostdev in place until the test calls `finish_detaches`.
    pub asynchronous_detach: bool,
    /// Detaches accepted but not finished, when `asynchronous_detach` is set.
    pub detaches_under_way: Vec<(String, String)>,
    /// Aliases in each domain's persistent definition, running or not.
    pub definitions: BTreeMap<String, Vec<String>>,
    /// Connection attempts fail while this is set.
    pub refuse_connections: bool,
    /// Where the current connection's events go, so a test can post libvirt events.
    pub events: Option<EventSender>,
    /// Domains whose live XML cannot be read: the listing reports them unreadable.
    pub unreadable: BTreeSet<String>,
    /// Attaches and detaches for these domains hang (recorded, then parked) until
    /// `SharedWorld::release` lets them go.
    blocked_domains: BTreeSet<String>,
    /// Listings hang until `SharedWorld::release_listing`.
    listing_blocked: bool,
    /// Connects hang until `SharedWorld::release_connect`.
    connect_blocked: bool,
    /// What each call parked right now waits on.
    parked: Vec<Hold>,
}

impl FakeWorld {
    pub fn with_domains(names: &[&str]) -> FakeWorld {
        FakeWorld {
            domains: names
                .iter()
                .map(|name| DomainView {
                    name: name.to_string(),
                    hostdevs: Vec::new(),
                })
                .collect(),
            ..FakeWorld::default()
        }
    }

    /// The call with this index (see `calls`) fails once with `kind`.
    pub fn failing_at(mut self, call: usize, kind: FailureKind) -> FakeWorld {
        self.failing_at.insert(call, kind);
        self
    }

    /// The calls for `domain` hang from now on until released.
    pub fn block(&mut self, domain: &str) {
        self.blocked_domains.insert(domain.to_string());
    }

    /// Listings hang from now on until released.
    pub fn block_listing(&mut self) {
        self.listing_blocked = true;
    }

    /// Connects hang from now on until released.
    pub fn block_connect(&mut self) {
        self.connect_blocked = true;
    }

    /// How many calls are hanging right now.
    /// Calls parked and not released yet: a released call counts no more, even before
    /// its thread runs on.
    pub fn parked(&self) -> usize {
        self.parked.iter().filter(|hold| self.holds(hold)).count()
    }

    fn holds(&self, hold: &Hold) -> bool {
        match hold {
            Hold::Domain(domain) => self.blocked_domains.contains(domain),
            Hold::Listing => self.listing_blocked,
            Hold::Connect => self.connect_blocked,
        }
    }

    pub fn fail_every_call(&mut self, kind: Option<FailureKind>) {
        self.failing_always = kind;
    }

    pub fn attaches(&self) -> Vec<(String, String)> {
        self.calls
            .iter()
            .filter_map(|call| match call {
                Call::Attach { domain, alias } => Some((domain.clone(), alias.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn detaches(&self) -> Vec<(String, String)> {
        self.calls
            .iter()
            .filter_map(|call| match call {
                Call::Detach { domain, alias } => Some((domain.clone(), alias.clone())),
                _ => None,
            })
            .collect()
    }

    /// Aliases of the USB hostdevs in a domain's "live XML".
    pub fn aliases_in(&self, domain: &str) -> Vec<String> {
        self.domains
            .iter()
            .filter(|d| d.name == domain)
            .flat_map(|d| d.hostdevs.iter().filter_map(|h| h.alias.clone()))
            .collect()
    }

    /// Records the call and returns the failure it is set up to have, if any.
    fn record(&mut self, call: Call) -> Option<FailureKind> {
        let index = self.calls.len();
        self.calls.push(call);
        self.failing_at.remove(&index).or(self.failing_always)
    }

    /// Finish every detach under way and post DEVICE_REMOVED for each, as libvirt does
    /// when QEMU reports the unplug done.
    pub fn finish_detaches(&mut self) {
        for (domain, alias) in std::mem::take(&mut self.detaches_under_way) {
            if let Some(target) = self.domains.iter_mut().find(|d| d.name == domain) {
                target
                    .hostdevs
                    .retain(|h| h.alias.as_deref() != Some(alias.as_str()));
            }
            if let Some(events) = &self.events {
                let _ = events.send(Event::DomainDeviceRemoved { domain, alias });
            }
        }
    }

    /// A domain stops: it and its hostdevs are gone.
    pub fn stop_domain(&mut self, name: &str) {
        self.domains.retain(|d| d.name != name);
    }

    pub fn start_domain(&mut self, name: &str) {
        self.domains.push(DomainView {
            name: name.to_string(),
            hostdevs: Vec::new(),
        });
    }
}

/// What a parked call waits to be released from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    Domain(String),
    Listing,
    Connect,
}

/// A shareable handle on a `FakeWorld`, and the signal its parked calls wait on.
#[derive(Debug, Clone, Default)]
pub struct SharedWorld(Arc<(Mutex<FakeWorld>, Condvar)>);

impl SharedWorld {
    pub fn new(world: FakeWorld) -> SharedWorld {
        SharedWorld(Arc::new((Mutex::new(world), Condvar::new())))
    }

    pub fn lock(&self) -> MutexGuard<'_, FakeWorld> {
        // A panicking test thread must not hide the world from the others.
        self.0
             .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The calls for `domain` parked now, and those to come, go on.
    pub fn release(&self, domain: &str) {
        self.lock().blocked_domains.remove(domain);
        self.0 .1.notify_all();
    }

    /// The listings parked now, and those to come, go on.
    pub fn release_listing(&self) {
        self.lock().listing_blocked = false;
        self.0 .1.notify_all();
    }

    /// The connects parked now, and those to come, go on.
    pub fn release_connect(&self) {
        self.lock().connect_blocked = false;
        self.0 .1.notify_all();
    }

    /// Parks the calling thread, with the world unlocked, while `hold` holds.
    fn park_while<'a>(
        &'a self,
        mut world: MutexGuard<'a, FakeWorld>,
        hold: Hold,
    ) -> MutexGuard<'a, FakeWorld> {
        if !world.holds(&hold) {
            return world;
        }
        world.parked.push(hold.clone());
        while world.holds(&hold) {
            world = self
                .0
                 .1
                .wait(world)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if let Some(index) = world.parked.iter().position(|parked| *parked == hold) {
            world.parked.remove(index);
        }
        world
    }
}

pub struct FakeHypervisor {
    world: SharedWorld,
}

fn message(kind: FailureKind) -> String {
    match kind {
        FailureKind::DeviceNotFound => "Did not find USB device 46d:c52b bus:1 device:5".into(),
        FailureKind::DeviceInUse => "Requested operation is not valid: USB device 001:005 is in use by driver QEMU, domain other".into(),
        FailureKind::NoFreePort => "internal error: unable to execute QEMU command 'device_add': Bus 'usb.0' does not have an available port".into(),
        FailureKind::DomainGone => "Requested operation is not valid: domain is not running".into(),
        FailureKind::ConnectionLost => "Cannot write data: Broken pipe".into(),
        FailureKind::TimedOut => "Timed out during operation: cannot acquire state change lock".into(),
        FailureKind::Other => "internal error: the fake was told to fail".into(),
    }
}

impl Hypervisor for FakeHypervisor {
    fn list_running(&self) -> Result<RunningDomains, HypervisorError> {
        let mut world = self.world.lock();
        let failure = world.record(Call::ListDomains);
        let world = self.world.park_while(world, Hold::Listing);
        if let Some(kind) = failure {
            return Err(HypervisorError::ListDomains {
                kind,
                message: message(kind),
            });
        }
        let (unreadable, readable) = world
            .domains
            .iter()
            .cloned()
            .partition(|view| world.unreadable.contains(&view.name));
        Ok(RunningDomains {
            readable,
            unreadable: unreadable
                .into_iter()
                .map(|view: DomainView| UnreadableDomain {
                    error: HypervisorError::ReadDomainXml {
                        domain: view.name.clone(),
                        kind: FailureKind::TimedOut,
                        message: message(FailureKind::TimedOut),
                    },
                    name: view.name,
                })
                .collect(),
        })
    }

    fn attach(&self, domain: &str, spec: &HostdevSpec) -> Result<(), HypervisorError> {
        let mut world = self.world.lock();
        world.attach_times.push(Instant::now());
        // What libvirt's live XML shows after the attach: the address filled in.
        let hostdev = UsbHostdev {
            alias: Some(spec.alias.to_string()),
            id: Some(spec.id),
            address: Some(spec.address),
        };
        let alias = spec.alias.to_string();
        let fail = |kind| HypervisorError::Attach {
            domain: domain.to_string(),
            device: spec.to_string(),
            kind,
            message: message(kind),
        };
        let failure = world.record(Call::Attach {
            domain: domain.to_string(),
            alias: alias.clone(),
        });
        let mut world = self
            .world
            .park_while(world, Hold::Domain(domain.to_string()));
        if let Some(kind) = failure {
            return Err(fail(kind));
        }
        if let Some(kind) = world.failing_attaches.pop_front() {
            return Err(fail(kind));
        }
        let ports = world
            .ports_in
            .get(domain)
            .copied()
            .or(world.ports_per_domain);
        let Some(target) = world.domains.iter_mut().find(|d| d.name == domain) else {
            return Err(fail(FailureKind::DomainGone));
        };
        if ports.is_some_and(|ports| target.hostdevs.len() >= ports) {
            return Err(fail(FailureKind::NoFreePort));
        }
        target.hostdevs.push(hostdev);
        // libvirt tells every client, the one that attached included.
        if let Some(events) = &world.events {
            let _ = events.send(Event::DomainDeviceAdded {
                domain: domain.to_string(),
                alias,
            });
        }
        Ok(())
    }

    fn detach(&self, domain: &str, alias: &HostdevAlias) -> Result<(), HypervisorError> {
        let alias = alias.as_str();
        let mut world = self.world.lock();
        let fail = |kind| HypervisorError::Detach {
            domain: domain.to_string(),
            alias: alias.to_string(),
            kind,
            message: message(kind),
        };
        let failure = world.record(Call::Detach {
            domain: domain.to_string(),
            alias: alias.to_string(),
        });
        let mut world = self
            .world
            .park_while(world, Hold::Domain(domain.to_string()));
        if let Some(kind) = failure {
            return Err(fail(kind));
        }
        let asynchronous = world.asynchronous_detach;
        let Some(target) = world.domains.iter_mut().find(|d| d.name == domain) else {
            return Err(fail(FailureKind::DomainGone));
        };
        if !target
            .hostdevs
            .iter()
            .any(|h| h.alias.as_deref() == Some(alias))
        {
            return Err(fail(FailureKind::DeviceNotFound));
        }
        if asynchronous {
            world
                .detaches_under_way
                .push((domain.to_string(), alias.to_string()));
            return Ok(());
        }
        let target = world
            .domains
            .iter_mut()
            .find(|d| d.name == domain)
            .expect("found above");
        let before = target.hostdevs.len();
        target
            .hostdevs
            .retain(|h| h.alias.as_deref() != Some(alias));
        if target.hostdevs.len() == before {
            return Err(fail(FailureKind::Other));
        }
        // QEMU finished at once: libvirt still reports it, as it does for every unplug.
        if let Some(events) = &world.events {
            let _ = events.send(Event::DomainDeviceRemoved {
                domain: domain.to_string(),
                alias: alias.to_string(),
            });
        }
        Ok(())
    }

    fn owned_hostdevs_in_definitions(&self) -> Result<Vec<DefinedHostdevs>, HypervisorError> {
        let world = self.world.lock();
        Ok(world
            .definitions
            .iter()
            .map(|(domain, aliases)| DefinedHostdevs {
                domain: domain.clone(),
                aliases: aliases
                    .iter()
                    .filter_map(|alias| HostdevAlias::parse(alias).ok())
                    .collect(),
            })
            .filter(|defined| !defined.aliases.is_empty())
            .collect())
    }

    fn remove_from_definition(
        &self,
        domain: &str,
        alias: &HostdevAlias,
    ) -> Result<(), HypervisorError> {
        let mut world = self.world.lock();
        if let Some(kind) = world.record(Call::RemoveFromDefinition {
            domain: domain.to_string(),
            alias: alias.to_string(),
        }) {
            return Err(HypervisorError::RemoveFromDefinition {
                domain: domain.to_string(),
                alias: alias.to_string(),
                kind,
                message: message(kind),
            });
        }
        if let Some(aliases) = world.definitions.get_mut(domain) {
            aliases.retain(|known| known != alias.as_str());
        }
        Ok(())
    }
}

/// Hands out `FakeHypervisor`s on one shared world.
#[derive(Clone)]
pub struct FakeConnector {
    pub world: SharedWorld,
}

impl Connector for FakeConnector {
    type Hypervisor = FakeHypervisor;

    fn connect(&self, uri: &str, events: EventSender) -> Result<FakeHypervisor, HypervisorError> {
        let mut world = self.world.lock();
        world.calls.push(Call::Connect);
        let mut world = self.world.park_while(world, Hold::Connect);
        if world.refuse_connections {
            return Err(HypervisorError::Connect {
                uri: uri.to_string(),
                message: "Failed to connect socket to '/var/run/libvirt/libvirt-sock': Connection refused".into(),
            });
        }
        world.events = Some(events);
        Ok(FakeHypervisor {
            world: self.world.clone(),
        })
    }
}

/// A device source that lists whatever the test put in it.
#[derive(Debug, Clone, Default)]
pub struct FixedDevices(pub Arc<Mutex<Vec<UsbDevice>>>);

impl DeviceSource for FixedDevices {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, HostError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone())
    }
}
