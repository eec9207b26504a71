//! The daemon's loop: one channel of `Event`s in, reconcile, hand the due actions to
//! the executor and book their outcomes when they come back as events, write the state
//! file. No libvirt call but the connect runs on the loop's thread: a stuck libvirtd or
//! QEMU holds up its own calls, never the loop, its other VMs or the watchdog. It
//! sleeps in a blocking receive while idle and sets a timeout only while a retry, a
//! reconnect, a detach under way, a call's deadline or the watchdog is due. Each of its
//! parts has a file: `connection`, `retries`, `pending_detaches`, `executor`,
//! `in_flight`, `decision` (the log line), `status`, `clock`.

mod calls;
pub mod clock;
mod connection;
pub mod control;
mod decision;
mod definitions;
pub mod executor;
mod follow;
pub mod groups;
mod host_drivers;
mod in_flight;
mod live_domains;
pub mod lock;
pub mod notify;
mod pending_detaches;
mod reload;
mod retries;
pub mod state;
mod status;
pub mod watch;

use crate::daemon::clock::{Clock, MonotonicClock};
use crate::daemon::connection::{Connection, Link};
use crate::daemon::decision::DecisionTiming;
use crate::daemon::executor::{ActionOutcome, CallCounts, CallFinished, CallOutcome, Executor};
use crate::daemon::in_flight::{CallKind, InFlight, CALL_DEADLINE};
use crate::daemon::live_domains::LiveDomains;
use crate::daemon::notify::Watchdog;
use crate::daemon::pending_detaches::PendingDetaches;
use crate::daemon::retries::RetryBook;
use crate::daemon::state::VmNotAnswering;
use crate::daemon::status::Status;
use crate::event::{DeviceDescription, DomainChange, Event, EventSender};
use crate::host::interfaces::InterfaceGate;
use crate::host::{DeviceSource, HostError};
use crate::hypervisor::{Connector, FailureKind, HostdevSpec, HypervisorError, RunningDomains};
use crate::model::alias::HostdevAlias;
use crate::model::UsbDevice;
use crate::reconcile::{self, Action, LoopFacts};
use crate::rules::{Config, ConfigError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot enumerate usb devices: {source}")]
    EnumerateDevices {
        #[source]
        source: HostError,
    },
    #[error("the {source_name} watcher stopped: {message}")]
    WatchSource {
        source_name: &'static str,
        message: String,
    },
    #[error("the event channel closed: every event source is gone")]
    EventsClosed,
}

pub struct DaemonOptions {
    pub config_path: PathBuf,
    pub state_path: PathBuf,
    /// Ping interval when systemd's watchdog is on.
    pub watchdog: Option<Duration>,
}

pub struct Daemon<C: Connector, S: DeviceSource, K: Clock = MonotonicClock> {
    connection: Connection<C>,
    device_source: S,
    options: DaemonOptions,
    events: Receiver<Event>,
    clock: K,
    config: Config,
    /// Set while a broken rules file is refused and the previous rules stay in force.
    config_error: Option<String>,
    /// The present devices by sysfs path, kept current by the kernel's events.
    devices: BTreeMap<String, UsbDevice>,
    /// The running domains' hostdevs, a copy of their live XML.
    live: LiveDomains,
    pending_detaches: PendingDetaches,
    /// Set when a persistent definition may hold a hostdev usbpass made: after a
    /// connect and after a VM is defined. See `definitions`.
    definitions_unchecked: bool,
    definitions: definitions::DefinitionsChore,
    /// SIGHUP: send READY=1 once the reload's reconcile has run.
    ready_after_converge: bool,
    /// The STATUS line systemd was last given.
    status_sent: Option<String>,
    retries: RetryBook,
    /// VMs that refused an attach for want of a free USB port: passed over for devices
    /// not in them, until something in that VM changes.
    facts: LoopFacts,
    /// Ports a followed rule's device left from, by port path (see `follow`).
    departures: BTreeMap<String, follow::Departure>,
    /// `usbpass switch` requests waiting for their devices (see `groups`).
    pending_switches: Vec<groups::PendingSwitch>,
    /// `keep_off_host`: the host's drivers kept off devices bound for a VM.
    host_drivers: host_drivers::HostDrivers,
    timing: DecisionTiming,
    watchdog: Watchdog,
    status: Status,
    /// Runs the libvirt calls off this thread.
    executor: Executor,
    /// The calls out, and their deadlines.
    in_flight: InFlight,
    call_deadline: Duration,
    /// When the last reconcile began: a deadline at or before it was considered then and
    /// could not be acted on (its VM busy, the copy being read); the answer that frees
    /// it wakes the loop, so waiting for it again would only spin.
    converged_at: Option<Instant>,
}

impl<C: Connector, S: DeviceSource> Daemon<C, S> {
    /// `events_sender` and `events` are the two ends of the loop's one channel; the
    /// caller hands clones of the sender to every event source before calling `run`.
    pub fn new(
        connector: C,
        device_source: S,
        config: Config,
        options: DaemonOptions,
        events_sender: EventSender,
        events: Receiver<Event>,
    ) -> Self {
        Daemon::with_clock(
            connector,
            device_source,
            config,
            options,
            events_sender,
            events,
            MonotonicClock,
        )
    }
}

impl<C: Connector, S: DeviceSource, K: Clock> Daemon<C, S, K> {
    /// `new` with the loop's schedule on `clock`.
    pub fn with_clock(
        connector: C,
        device_source: S,
        config: Config,
        options: DaemonOptions,
        events_sender: EventSender,
        events: Receiver<Event>,
        clock: K,
    ) -> Self {
        let executor = Executor::new(events_sender.clone());
        let connection = Connection::new(connector, events_sender, clock.now(), CALL_DEADLINE);
        let watchdog = Watchdog::new(options.watchdog);
        // A switch holds across restarts until changed.
        let group_targets = groups::load_group_targets(&groups::groups_path(&options.state_path));
        Daemon {
            connection,
            device_source,
            options,
            events,
            clock,
            config,
            config_error: None,
            devices: BTreeMap::new(),
            live: LiveDomains::new(),
            ready_after_converge: false,
            status_sent: None,
            definitions_unchecked: true,
            definitions: definitions::DefinitionsChore::default(),
            pending_detaches: PendingDetaches::default(),
            retries: RetryBook::default(),
            facts: LoopFacts {
                group_targets,
                ..LoopFacts::default()
            },
            departures: BTreeMap::new(),
            pending_switches: Vec::new(),
            host_drivers: host_drivers::HostDrivers::new(),
            timing: DecisionTiming::new(),
            watchdog,
            status: Status::new(),
            executor,
            in_flight: InFlight::default(),
            call_deadline: CALL_DEADLINE,
            converged_at: None,
        }
    }

    /// How long a connect, an attach, a detach or a listing may take before the loop
    /// gives up waiting for it (`CALL_DEADLINE` unless set).
    pub fn with_call_deadline(mut self, deadline: Duration) -> Self {
        self.call_deadline = deadline;
        self.connection.set_connect_deadline(deadline);
        self
    }

    /// Keeps host drivers off the devices of `keep_off_host` rules through `gate`.
    /// Without one (devices from libvirt's node devices), the setting is warned about
    /// and has no effect.
    pub fn with_interface_gate(mut self, gate: Box<dyn InterfaceGate>) -> Self {
        self.host_drivers.set_gate(gate);
        self
    }

    /// The executor's count of calls issued and answered, for tests that wait for the
    /// loop to have heard back from every call that can answer.
    pub fn call_counts(&self) -> Arc<CallCounts> {
        self.executor.counts()
    }

    /// Runs until `Event::Terminate`. Errors only when it can no longer see devices.
    /// On the way out, root hubs get their default interface authorization back.
    pub fn run(&mut self) -> Result<(), DaemonError> {
        let result = self.run_loop();
        self.host_drivers.restore();
        result
    }

    fn run_loop(&mut self) -> Result<(), DaemonError> {
        self.rescan_devices()?;
        self.converge();
        notify::ready(&self.status_line());
        self.watchdog.start(self.clock.now());
        loop {
            let event = match self.executor.take_refused() {
                // A call no thread could be started for: its answer is in, and it never
                // goes through the channel.
                Some(refused) => Event::CallFinished(Box::new(refused)),
                None => {
                    let deadline = self.next_deadline();
                    match self.clock.next_event(&self.events, deadline) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => {
                            self.on_timeout();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(DaemonError::EventsClosed)
                        }
                    }
                }
            };
            self.timing.woke();
            let mut stop = self.handle(event)?;
            // Coalesce a burst (a hub full of devices, an editor's several writes)
            // into one reconcile.
            while !stop {
                match self.events.try_recv() {
                    Ok(event) => stop = self.handle(event)?,
                    Err(_) => break,
                }
            }
            if stop {
                notify::stopping();
                log::info!("stopping on request");
                return Ok(());
            }
            self.converge();
            if std::mem::take(&mut self.ready_after_converge) {
                notify::ready(&self.status_line());
            }
            self.watchdog.ping_if_due(self.clock.now());
        }
    }

    fn on_timeout(&mut self) {
        self.timing.woke();
        self.watchdog.ping_if_due(self.clock.now());
        if self
            .next_deadline()
            .is_some_and(|at| at <= self.clock.now())
        {
            self.converge();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        // While disconnected only the reconnect matters: retries wait for a connection.
        let work = if self.connection.is_connected() {
            vec![
                self.retries.next_attempt(),
                self.pending_detaches.next_deadline(),
                self.live.reread_at(),
            ]
        } else {
            vec![self.connection.next_attempt()]
        };
        // A call's deadline counts whatever the connection: a stuck VM is shown as such.
        work.into_iter()
            .chain([self.in_flight.next_deadline(), self.next_switch_deadline()])
            .flatten()
            .filter(|at| self.converged_at.is_none_or(|converged| *at > converged))
            .chain(self.watchdog.next_ping())
            .min()
    }

    /// Updates the loop's view; returns true to stop.
    fn handle(&mut self, event: Event) -> Result<bool, DaemonError> {
        log::debug!("event {event:?}");
        match event {
            Event::DeviceAdded {
                mut device,
                received,
            } => {
                let address = device.address();
                // A later word about a plug keeps what was read of it before: its
                // strings and its hardware database names.
                if let Some(known) = self
                    .devices
                    .get(&device.syspath)
                    .filter(|known| known.address() == address)
                {
                    if device.strings_pending && !known.strings_pending {
                        device.serial = known.serial.clone();
                        device.manufacturer = known.manufacturer.clone();
                        device.product = known.product.clone();
                        device.strings_pending = false;
                    }
                    if device.vendor_from_database.is_none() && device.model_from_database.is_none()
                    {
                        device.vendor_from_database = known.vendor_from_database.clone();
                        device.model_from_database = known.model_from_database.clone();
                    }
                }
                self.host_drivers.forget(address);
                let previous = self.devices.insert(device.syspath.clone(), *device);
                // A new plug is due at once. More words about the same plug (the
                // kernel's `change` and `bind` after `add`) leave a failed attach on
                // its retry schedule: resetting it on each would call libvirt again
                // and again for a device that is still being set up.
                if previous.as_ref().is_none_or(|old| old.address() != address) {
                    self.timing.device_event(address, received);
                    self.retries.forget_device(address);
                    if let Some(old) = previous {
                        self.retries.forget_device(old.address());
                    }
                }
            }
            Event::DeviceDescribed(description) => {
                let DeviceDescription {
                    syspath,
                    address,
                    serial,
                    manufacturer,
                    product,
                    vendor_from_database,
                    model_from_database,
                } = *description;
                if let Some(device) = self
                    .devices
                    .get_mut(&syspath)
                    .filter(|device| device.address() == address)
                {
                    device.serial = serial;
                    device.manufacturer = manufacturer;
                    device.product = product;
                    device.strings_pending = false;
                    if vendor_from_database.is_some() || model_from_database.is_some() {
                        device.vendor_from_database = vendor_from_database;
                        device.model_from_database = model_from_database;
                    }
                }
            }
            Event::InterfaceDriverBound {
                interface_syspath,
                driver,
            } => {
                // An interface lives in its device's folder.
                let device = std::path::Path::new(&interface_syspath)
                    .parent()
                    .and_then(|folder| self.devices.get(folder.to_str()?));
                if let Some(device) = device {
                    self.host_drivers.driver_bound(device, &driver);
                }
            }
            Event::DeviceRemoved { syspath, address } => {
                // Only the instance the event names leaves: a late `remove` of an
                // earlier plug on this port must not drop the device plugged there now.
                let named = |device: &UsbDevice| address.is_none_or(|a| a == device.address());
                if self.devices.get(&syspath).is_some_and(named) {
                    if let Some(device) = self.devices.remove(&syspath) {
                        self.retries.forget_device(device.address());
                        self.host_drivers.forget(device.address());
                        self.note_departure(&device);
                    }
                } else {
                    log::debug!(
                        "ignoring the removal of {syspath}: not the instance present there now"
                    );
                }
            }
            Event::Domain { domain, change } => {
                self.retries.forget_domain(&domain);
                self.facts.no_free_port.remove(&domain);
                match change {
                    DomainChange::Started => self.live.domain_started(&domain),
                    DomainChange::Stopped => {
                        self.host_drivers.vm_stopped(self.live.domains(), &domain);
                        self.live.domain_stopped(&domain);
                        self.executor.forget_vm(&domain);
                    }
                    DomainChange::Defined => {
                        self.definitions_unchecked = true;
                        self.live.invalidate();
                    }
                    DomainChange::Other => self.live.invalidate(),
                }
            }
            Event::DomainDeviceAdded { domain, alias } => {
                // Our own attach, announced before its call returned: booking the
                // answer puts it in the copy.
                if !self.in_flight.attaching(&domain, &alias) {
                    self.live.device_added(&domain, &alias);
                }
            }
            Event::DomainDeviceRemoved { domain, alias } => {
                self.pending_detaches.finished(&domain, &alias);
                self.live.device_removed(&domain, &alias);
                self.facts.no_free_port.remove(&domain);
                // A port freed in this VM, and the device that left it may now be free
                // to go where the rules want it (a move between VMs).
                self.retries.forget_domain(&domain);
                if let Some((address, _)) = HostdevAlias::parse(&alias)
                    .ok()
                    .and_then(|alias| alias.target())
                {
                    self.retries.forget_device(address);
                }
            }
            Event::CallFinished(finished) => self.call_finished(*finished),
            Event::Control(request) => self.switch_requested(*request),
            Event::LibvirtSocketAppeared => self.connection.libvirt_came_back(self.clock.now()),
            Event::HypervisorDisconnected { reason } => {
                log::warn!("libvirt connection lost: {reason}");
                self.drop_connection(reason);
            }
            Event::ConfigChanged => self.reload_config(false),
            Event::Reload => {
                notify::reloading();
                self.reload_config(true);
                // A failed rescan keeps the list the events built: better than exiting.
                if let Err(error) = self.rescan_devices() {
                    log::warn!("{error}; keeping the previous device list");
                }
                self.retries.clear();
                self.facts.no_free_port.clear();
                self.live.invalidate();
                self.ready_after_converge = true;
            }
            Event::Terminate => {
                for switch in std::mem::take(&mut self.pending_switches) {
                    switch.stopping();
                }
                return Ok(true);
            }
            Event::SourceFailed { source, message } => {
                return Err(DaemonError::WatchSource {
                    source_name: source,
                    message,
                })
            }
        }
        Ok(false)
    }

    fn rescan_devices(&mut self) -> Result<(), DaemonError> {
        let devices = self
            .device_source
            .enumerate()
            .map_err(|source| DaemonError::EnumerateDevices { source })?;
        self.devices = devices
            .into_iter()
            .map(|device| (device.syspath.clone(), device))
            .collect();
        Ok(())
    }

    fn drop_connection(&mut self, reason: String) {
        self.connection.drop_connection(reason, self.clock.now());
        self.pending_detaches.clear();
        self.facts.no_free_port.clear();
        self.live.invalidate();
        self.status.disconnected();
    }

    /// Reconciles once: reads the live XML if the copy is stale (off the loop; the
    /// listing's answer is the next wake), else plans and hands what is due to the
    /// executor. Then writes the state file. Each answer wakes the loop for the next
    /// round, so a round never waits for a call.
    fn converge(&mut self) {
        self.converged_at = Some(self.clock.now());
        self.expire_calls();
        if !self.round() {
            // What the VMs hold is not known: only the devices that do not depend on it.
            let devices: Vec<UsbDevice> = self.devices.values().cloned().collect();
            self.host_drivers
                .apply_plan(&self.config, &devices, &self.facts, None);
        }
        self.answer_switches();
        self.write_state();
    }

    /// Returns whether it planned (and so applied `keep_off_host`'s decision).
    fn round(&mut self) -> bool {
        let now = self.clock.now();
        // A connect runs on the executor: its answer is the next wake.
        if self
            .connection
            .ensure_connected(&self.config.uri, now, &mut self.executor)
            != Link::Up
        {
            return false;
        }
        if self.live.reread_at().is_some_and(|at| at <= now) {
            self.live.invalidate();
        }
        if self.live.is_stale() {
            self.start_listing();
            return false;
        }
        // After the listing, which the chore must not hold up: both run on the
        // executor's general worker.
        if std::mem::take(&mut self.definitions_unchecked) {
            if let Some(hypervisor) = self.connection.hypervisor() {
                self.definitions.request(hypervisor, &mut self.executor);
            }
        }
        let mut domains = self.live.domains().to_vec();
        if self.pending_detaches.hide(&mut domains, now) {
            // A detach that did not finish in time: what libvirt shows now, only a
            // fresh read tells.
            self.live.invalidate();
            self.start_listing();
            return false;
        }
        self.adopt_followers();
        let devices: Vec<UsbDevice> = self.devices.values().cloned().collect();
        let mut plan = reconcile::plan_with(&self.config, &devices, &domains, &self.facts);
        // An attach under the alias of a detach still under way would be refused
        // as a duplicate alias: it waits for DEVICE_REMOVED.
        // And a device moving between VMs is free for its new VM only once the old one
        // let go of it: the two VMs' calls run side by side, and an attach that races
        // its own detach is refused ("in use by domain ..."). The alias names the
        // device, so a detach of the same alias anywhere holds the attach back.
        let detaching_now: BTreeSet<HostdevAlias> = plan
            .actions
            .iter()
            .filter(|action| matches!(action, Action::Detach { .. }))
            .map(|action| action.alias().clone())
            .collect();
        plan.actions.retain(|action| match action {
            Action::Attach { alias, .. } => {
                !(detaching_now.contains(alias)
                    || self.pending_detaches.contains_alias(alias)
                    || self.in_flight.detaching(alias))
            }
            Action::Detach { .. } => true,
        });
        self.retries.keep_wanted(&plan.actions);
        // One call per VM at a time, in the plan's order (detaches first); none to a VM
        // that has not answered a call yet or whose XML could not be read: what it
        // holds is unknown, so nothing is attached to it or detached from it.
        let mut issued: BTreeSet<String> = BTreeSet::new();
        let due: Vec<Action> = plan
            .actions
            .iter()
            .filter(|action| self.retries.is_due(action, now))
            .filter(|action| {
                let domain = action.domain();
                !self.in_flight.busy(domain)
                    && !self.live.is_unreadable(domain)
                    && issued.insert(domain.to_string())
            })
            .cloned()
            .collect();
        // Interfaces authorized before their attach, unauthorized before their detach.
        self.host_drivers
            .apply_plan(&self.config, &devices, &self.facts, Some(&plan));
        self.status.saw(&domains, plan.placements);
        if due.is_empty() {
            if self.live.is_unverified() {
                if !self.in_flight.any_action_waited_for() {
                    // A domain started and what it waited for is in: read what its live
                    // XML really holds.
                    self.live.invalidate();
                    self.start_listing();
                }
            } else {
                self.connection.round_completed();
            }
            return true;
        }
        let Some(hypervisor) = self.connection.hypervisor() else {
            return true;
        };
        for action in due {
            let cause = self.timing.cause(&action);
            let call = self
                .executor
                .start_action(hypervisor.clone(), action.clone());
            let kind = CallKind::Action {
                action,
                cause,
                started: Instant::now(),
            };
            self.in_flight.started(
                call,
                kind,
                self.connection.generation(),
                now,
                self.call_deadline,
            );
        }
        true
    }
}

#[cfg(test)]
mod tests;
