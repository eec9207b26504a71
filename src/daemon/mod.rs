//! The daemon's loop: one channel of `Event`s in, reconcile, hand the due actions to
//! the executor and book their outcomes, write the state file. It sleeps in a blocking
//! receive while idle and sets a timeout only while a retry, a reconnect, a detach
//! under way or the watchdog is due. Each of its parts has a file: `connection`,
//! `retries`, `pending_detaches`, `executor`, `decision` (the log line), `status`,
//! `clock`.

pub mod clock;
mod connection;
mod decision;
mod definitions;
mod executor;
mod live_domains;
pub mod lock;
pub mod notify;
mod pending_detaches;
mod retries;
pub mod state;
mod status;
pub mod watch;

use crate::daemon::clock::{Clock, MonotonicClock};
use crate::daemon::connection::{Connection, Link};
use crate::daemon::decision::DecisionTiming;
use crate::daemon::executor::ActionOutcome;
use crate::daemon::live_domains::LiveDomains;
use crate::daemon::notify::Watchdog;
use crate::daemon::pending_detaches::PendingDetaches;
use crate::daemon::retries::RetryBook;
use crate::daemon::state::DaemonState;
use crate::daemon::status::{LoopView, Status};
use crate::event::{DomainChange, Event};
use crate::host::{DeviceSource, HostError};
use crate::hypervisor::{Connector, DomainView, FailureKind, HostdevSpec, Hypervisor};
use crate::model::alias::HostdevAlias;
use crate::model::UsbDevice;
use crate::reconcile::{self, Action, Unavailable};
use crate::rules::{Config, ConfigError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
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

/// After this many rounds of act-then-verify in one wake-up, the loop waits for the
/// next event or retry: a guard against two actions undoing each other forever.
const MAX_ROUNDS_PER_WAKE: usize = 3;

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
    /// SIGHUP: send READY=1 once the reload's reconcile has run.
    ready_after_converge: bool,
    retries: RetryBook,
    /// VMs that refused an attach for want of a free USB port: passed over for devices
    /// not in them, until something in that VM changes.
    unavailable: Unavailable,
    timing: DecisionTiming,
    watchdog: Watchdog,
    status: Status,
}

impl<C: Connector, S: DeviceSource> Daemon<C, S> {
    /// `events_sender` and `events` are the two ends of the loop's one channel; the
    /// caller hands clones of the sender to every event source before calling `run`.
    pub fn new(
        connector: C,
        device_source: S,
        config: Config,
        options: DaemonOptions,
        events_sender: Sender<Event>,
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
        events_sender: Sender<Event>,
        events: Receiver<Event>,
        clock: K,
    ) -> Self {
        let connection = Connection::new(connector, events_sender, clock.now());
        let watchdog = Watchdog::new(options.watchdog);
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
            definitions_unchecked: true,
            pending_detaches: PendingDetaches::default(),
            retries: RetryBook::default(),
            unavailable: Unavailable::default(),
            timing: DecisionTiming::new(),
            watchdog,
            status: Status::new(),
        }
    }

    /// Runs until `Event::Terminate`. Errors only when it can no longer see devices.
    pub fn run(&mut self) -> Result<(), DaemonError> {
        self.rescan_devices()?;
        self.converge();
        notify::ready(&self.status_line());
        self.watchdog.start(self.clock.now());
        loop {
            let event = match self.clock.next_event(&self.events, self.next_deadline()) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    self.on_timeout();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Err(DaemonError::EventsClosed),
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
            [
                self.retries.next_attempt(),
                self.pending_detaches.next_deadline(),
            ]
            .into_iter()
            .flatten()
            .min()
        } else {
            self.connection.next_attempt()
        };
        work.into_iter().chain(self.watchdog.next_ping()).min()
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
                // A later word about a plug whose strings are known keeps them.
                if let Some(known) = self
                    .devices
                    .get(&device.syspath)
                    .filter(|known| known.address() == address && !known.strings_pending)
                {
                    if device.strings_pending {
                        device.serial = known.serial.clone();
                        device.manufacturer = known.manufacturer.clone();
                        device.product = known.product.clone();
                        device.strings_pending = false;
                    }
                }
                let previous = self.devices.insert(device.syspath.clone(), device);
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
            Event::DeviceDescribed {
                syspath,
                address,
                serial,
                manufacturer,
                product,
            } => {
                if let Some(device) = self
                    .devices
                    .get_mut(&syspath)
                    .filter(|device| device.address() == address)
                {
                    device.serial = serial;
                    device.manufacturer = manufacturer;
                    device.product = product;
                    device.strings_pending = false;
                }
            }
            Event::DeviceRemoved { syspath, address } => {
                // Only the instance the event names leaves: a late `remove` of an
                // earlier plug on this port must not drop the device plugged there now.
                let named = |device: &UsbDevice| address.is_none_or(|a| a == device.address());
                if self.devices.get(&syspath).is_some_and(named) {
                    if let Some(device) = self.devices.remove(&syspath) {
                        self.retries.forget_device(device.address());
                    }
                } else {
                    log::debug!(
                        "ignoring the removal of {syspath}: not the instance present there now"
                    );
                }
            }
            Event::Domain { domain, change } => {
                self.retries.forget_domain(&domain);
                self.unavailable.no_free_port.remove(&domain);
                match change {
                    DomainChange::Started => self.live.domain_started(&domain),
                    DomainChange::Stopped => self.live.domain_stopped(&domain),
                    DomainChange::Defined => {
                        self.definitions_unchecked = true;
                        self.live.invalidate();
                    }
                    DomainChange::Other => self.live.invalidate(),
                }
            }
            Event::DomainDeviceAdded { domain, alias } => {
                self.live.device_added(&domain, &alias);
            }
            Event::DomainDeviceRemoved { domain, alias } => {
                self.pending_detaches.finished(&domain, &alias);
                self.live.device_removed(&domain, &alias);
                self.unavailable.no_free_port.remove(&domain);
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
                self.unavailable = Unavailable::default();
                self.live.invalidate();
                self.ready_after_converge = true;
            }
            Event::Terminate => return Ok(true),
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

    fn reload_config(&mut self, forced: bool) {
        // An empty file is a writer caught between create (or truncate) and its first
        // write: `rm` then `cat >`, `touch` then an edit. It parses as zero rules, and
        // applying it would detach every device only to attach them again a moment
        // later. The previous rules stay until the file has content; a file meant to
        // hold no rules says so with a comment.
        if std::fs::metadata(&self.options.config_path).is_ok_and(|file| file.len() == 0) {
            let message = format!(
                "rules file {} is empty: keeping the previous {} rules until it has content",
                self.options.config_path.display(),
                self.config.rules.len()
            );
            if self.config_error.as_deref() != Some(message.as_str()) {
                log::warn!("{message}");
            }
            self.config_error = Some(message);
            return;
        }
        match Config::load(&self.options.config_path) {
            Ok(config) => {
                // Rules the device source cannot serve are refused like a broken file.
                if let Err(refusal) = self.device_source.accepts(&config) {
                    self.refuse_config(refusal.to_string());
                    return;
                }
                if forced || config != self.config {
                    log::info!(
                        "rules reloaded from {}: {} rules",
                        config.path.display(),
                        config.rules.len()
                    );
                }
                if config.uri != self.config.uri {
                    log::info!("libvirt uri changed to {}: reconnecting", config.uri);
                    self.drop_connection("uri changed".to_string());
                    self.connection.connect_at_once(self.clock.now());
                }
                self.config = config;
                self.config_error = None;
                self.retries.clear();
            }
            // A file mid-save can be briefly absent; the final write brings another event.
            Err(ConfigError::ReadFile { source, .. })
                if !forced && source.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => self.refuse_config(error.to_string()),
        }
    }

    /// Keeps the previous rules in force and says why, once per distinct reason.
    fn refuse_config(&mut self, message: String) {
        if self.config_error.as_deref() != Some(message.as_str()) {
            log::error!("{message}; keeping the previous rules");
        }
        self.config_error = Some(message);
    }

    fn drop_connection(&mut self, reason: String) {
        self.connection.drop_connection(reason, self.clock.now());
        self.pending_detaches.clear();
        self.unavailable = Unavailable::default();
        self.live.invalidate();
        self.status.disconnected();
    }

    /// Reconcile until nothing is due, at most `MAX_ROUNDS_PER_WAKE` times, then write
    /// the state file.
    fn converge(&mut self) {
        for _ in 0..MAX_ROUNDS_PER_WAKE {
            match self
                .connection
                .ensure_connected(&self.config.uri, self.clock.now())
            {
                Link::Up => {}
                // Anything that failed against the old connection is due again.
                Link::Opened => {
                    self.retries.clear();
                    self.definitions_unchecked = true;
                }
                Link::Down => break,
            }
            if std::mem::take(&mut self.definitions_unchecked) {
                if let Some(hypervisor) = self.connection.hypervisor() {
                    definitions::remove_owned_hostdevs_from_definitions(hypervisor);
                }
            }
            if self.live.is_stale() {
                let Some(domains) = self.list_domains() else {
                    self.connection.round_lost_connection(self.clock.now());
                    break;
                };
                self.live.refreshed(domains);
            }
            let mut domains = self.live.domains().to_vec();
            if self.pending_detaches.hide(&mut domains, self.clock.now()) {
                // A detach that did not finish in time: what libvirt shows now, only a
                // fresh read tells.
                self.live.invalidate();
                continue;
            }
            let devices: Vec<UsbDevice> = self.devices.values().cloned().collect();
            let mut plan =
                reconcile::plan_with(&self.config, &devices, &domains, &self.unavailable);
            // An attach under the alias of a detach still under way would be refused
            // as a duplicate alias: it waits for DEVICE_REMOVED.
            plan.actions.retain(|action| {
                !matches!(action, Action::Attach { domain, alias, .. }
                    if self.pending_detaches.contains(domain, alias))
            });
            self.retries.keep_wanted(&plan.actions);
            let now = self.clock.now();
            let due: Vec<Action> = plan
                .actions
                .iter()
                .filter(|action| self.retries.is_due(action, now))
                .cloned()
                .collect();
            self.status.saw(&domains, plan.placements);
            if due.is_empty() && !self.live.is_unverified() {
                self.connection.round_completed();
                break;
            }
            if !self.carry_out(due) {
                self.connection.round_lost_connection(self.clock.now());
                break;
            }
            if self.live.is_unverified() {
                // A domain started: now that what it waited for is on its way, read
                // what its live XML really holds.
                self.live.invalidate();
            }
            self.connection.round_completed();
        }
        self.write_state();
    }

    fn list_domains(&mut self) -> Option<Vec<DomainView>> {
        let hypervisor = self.connection.hypervisor()?;
        match hypervisor.running_domains() {
            Ok(domains) => Some(domains),
            Err(error) => {
                // Without the domain list nothing can be decided: start over with a
                // fresh connection (after a backoff, see `round_lost_connection`).
                log::warn!("{error}");
                self.drop_connection(error.to_string());
                None
            }
        }
    }

    /// Carries out the due actions in order. Returns false when one broke the
    /// connection and the round must end.
    fn carry_out(&mut self, due: Vec<Action>) -> bool {
        for action in due {
            let Some(hypervisor) = self.connection.hypervisor() else {
                return false;
            };
            let cause = self.timing.cause(&action);
            let outcome = executor::execute(hypervisor, action);
            if !self.book(outcome, cause) {
                return false;
            }
        }
        true
    }

    /// Logs the decision and books its outcome. Returns false when the call broke the
    /// connection.
    fn book(&mut self, outcome: ActionOutcome, cause: Instant) -> bool {
        let now = self.clock.now();
        match &outcome.result {
            Ok(()) => {
                log::info!("{}", decision::success_line(&outcome, cause));
                match &outcome.action {
                    Action::Detach { domain, alias, .. } => {
                        self.pending_detaches.requested(domain, alias, now)
                    }
                    Action::Attach {
                        domain,
                        device,
                        alias,
                        ..
                    } => self
                        .live
                        .attached(domain, &HostdevSpec::new(device, alias.clone())),
                }
                self.retries.succeeded(&outcome.action);
                true
            }
            Err(error) => {
                // The live XML is not what the loop believed (a vm gone, a duplicate,
                // a device already taken): read it again before the next plan.
                self.live.invalidate();
                if let (FailureKind::NoFreePort, Action::Attach { domain, .. }) =
                    (error.kind(), &outcome.action)
                {
                    // The rule's next running VM gets the device meanwhile; the status
                    // says why this one was passed over.
                    self.unavailable.no_free_port.insert(domain.clone());
                }
                let booked = self.retries.failed(&outcome.action, error, now);
                log::warn!(
                    "{}",
                    decision::failure_line(&outcome, cause, error, booked.attempts, booked.delay)
                );
                if error.kind() == FailureKind::ConnectionLost {
                    self.drop_connection(error.to_string());
                    return false;
                }
                true
            }
        }
    }

    fn loop_view(&self) -> LoopView<'_> {
        LoopView {
            config: &self.config,
            config_path: &self.options.config_path,
            config_error: self.config_error.as_deref(),
            device_count: self.devices.len(),
            connected: self.connection.is_connected(),
            libvirt_error: self.connection.last_error(),
            retries: &self.retries,
        }
    }

    fn status_line(&self) -> String {
        self.status.line(&self.loop_view())
    }

    /// The state the CLI reads. Public for tests.
    pub fn state(&self) -> DaemonState {
        self.status.snapshot(&self.loop_view())
    }

    fn write_state(&mut self) {
        let state = self.state();
        self.status.write(&state, &self.options.state_path);
    }
}

#[cfg(test)]
mod tests;
