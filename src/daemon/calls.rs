//! The loop's side of its libvirt calls: starting a listing, booking what a call
//! came back with (however late), giving up on calls past their deadline, and the VMs
//! that do not answer as `usbpass status` shows them. The calls themselves run in
//! `executor`; what is out is kept in `in_flight`.

use super::*;

impl<C: Connector, S: DeviceSource, K: Clock> Daemon<C, S, K> {
    /// Lists the running domains off the loop, unless a listing on this connection is
    /// under way already.
    pub(super) fn start_listing(&mut self) {
        let generation = self.connection.generation();
        if self.in_flight.listing(generation) {
            return;
        }
        let Some(hypervisor) = self.connection.hypervisor() else {
            return;
        };
        let token = self.live.listing_token();
        let call = self.executor.start_listing(hypervisor);
        self.in_flight.started(
            call,
            CallKind::Listing { token },
            generation,
            self.clock.now(),
            self.call_deadline,
        );
    }

    /// A call came back, however late: book what it did.
    pub(super) fn call_finished(&mut self, finished: CallFinished) {
        if self.connection.is_connect(finished.call) {
            let now = self.clock.now();
            if self.connection.connect_finished(finished.call, now) == Link::Opened {
                // Anything that failed against the old connection is due again, and
                // what the new one shows is read before anything is done.
                self.retries.clear();
                self.live.invalidate();
                self.definitions_unchecked = true;
            }
            return;
        }
        let Some(call) = self.in_flight.finished(finished.call) else {
            log::debug!("ignoring the answer of an unknown call {:?}", finished.call);
            return;
        };
        let current =
            self.connection.is_connected() && call.connection == self.connection.generation();
        let late = call
            .timed_out
            .then(|| self.clock.now().saturating_duration_since(call.issued));
        match (call.kind, finished.outcome) {
            (CallKind::Listing { token }, CallOutcome::Listing(result)) => {
                if let Some(late) = late {
                    log::info!(
                        "libvirt at {} answered a listing after {} ms",
                        self.config.uri,
                        late.as_millis()
                    );
                }
                // A connection given up on: its successor reads afresh.
                if current {
                    self.listed(result, token);
                }
            }
            (CallKind::Action { action, cause, .. }, CallOutcome::Action(outcome)) => {
                if let Some(late) = late {
                    log::info!(
                        "vm {} answered after {} ms: booking its {} of {}",
                        action.domain(),
                        late.as_millis(),
                        decision::action_name(&action),
                        action.alias()
                    );
                }
                self.book(outcome, cause, current);
            }
            (kind, outcome) => {
                log::error!(
                    "call {:?} ({kind:?}) answered with {outcome:?}",
                    finished.call
                )
            }
        }
    }

    fn listed(&mut self, result: Result<RunningDomains, HypervisorError>, token: u64) {
        let lost = match &result {
            Err(error) => Some(error.to_string()),
            Ok(listing) => listing
                .unreadable
                .iter()
                .find(|vm| vm.error.kind() == FailureKind::ConnectionLost)
                .map(|vm| vm.error.to_string()),
        };
        if let Some(error) = lost {
            // Without the domain list nothing can be decided: start over with a fresh
            // connection (after a backoff, see `round_lost_connection`).
            log::warn!("{error}");
            self.drop_connection(error);
            self.connection.round_lost_connection(self.clock.now());
            return;
        }
        let Ok(listing) = result else { return };
        for vm in &listing.unreadable {
            if !self.live.is_unreadable(&vm.name) {
                log::warn!(
                    "{}; leaving vm {} alone until it is read",
                    vm.error,
                    vm.name
                );
            }
        }
        self.live.refreshed(listing, token, self.clock.now());
    }

    /// Books as timed out each call past its deadline. A stuck action leaves its VM
    /// alone until it returns; a stuck listing means libvirtd itself does not answer,
    /// and the connection is replaced.
    pub(super) fn expire_calls(&mut self) {
        let now = self.clock.now();
        self.connection.expire(now);
        let deadline_ms = self.call_deadline.as_millis();
        for (_, call) in self.in_flight.expire(now) {
            match call.kind {
                CallKind::Listing { .. } => {
                    if call.connection != self.connection.generation()
                        || !self.connection.is_connected()
                    {
                        continue;
                    }
                    log::warn!(
                        "libvirt at {} does not answer: no list of running vms within {deadline_ms} ms, opening a new connection",
                        self.config.uri
                    );
                    self.drop_connection(format!(
                        "libvirt does not answer: no list of running vms within {deadline_ms} ms"
                    ));
                }
                CallKind::Action {
                    action,
                    cause,
                    started,
                } => {
                    let message = format!(
                        "no answer within {deadline_ms} ms; no more calls to this vm until it answers"
                    );
                    let error = timed_out(&action, message);
                    let outcome = ActionOutcome {
                        action,
                        started,
                        call_time: Instant::now().saturating_duration_since(started),
                        result: Err(error),
                    };
                    // The call may or may not have been carried out: read the copy
                    // again, which also tells whether libvirtd itself still answers.
                    self.book(outcome, cause, false);
                }
            }
        }
    }

    /// Logs the decision and books its outcome. `current`: the call went out on the
    /// connection in use, so a broken connection is this one.
    fn book(&mut self, outcome: ActionOutcome, cause: Instant, current: bool) {
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
                if current {
                    self.connection.round_completed();
                }
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
                    self.facts.no_free_port.insert(domain.clone());
                }
                let booked = self.retries.failed(&outcome.action, error, now);
                log::warn!(
                    "{}",
                    decision::failure_line(&outcome, cause, error, booked.attempts, booked.delay)
                );
                // An answer that came after its VM stopped: nothing is wanted there any
                // more (the stop forgot the VM's failures; this one came late).
                if !self.live.is_running(outcome.action.domain()) {
                    self.retries.forget_domain(outcome.action.domain());
                }
                if error.kind() == FailureKind::ConnectionLost {
                    if current {
                        self.drop_connection(error.to_string());
                        self.connection.round_lost_connection(now);
                    } else {
                        // A connection given up on broke; the one in use is fresh, and
                        // the action is due through it.
                        self.retries.due_at_once(&outcome.action, now);
                    }
                }
            }
        }
    }

    /// VMs with a call past its deadline, then VMs whose XML could not be read.
    pub(super) fn vms_not_answering(&self) -> Vec<VmNotAnswering> {
        let deadline_ms = self.call_deadline.as_millis();
        let mut vms: Vec<VmNotAnswering> = self
            .in_flight
            .not_answering()
            .into_iter()
            .map(|(name, since)| VmNotAnswering {
                message: format!(
                    "vm {name} has not answered a call for {} ms (deadline {deadline_ms} ms)",
                    self.clock
                        .now()
                        .saturating_duration_since(since)
                        .as_millis()
                ),
                name,
                kind: FailureKind::TimedOut,
            })
            .collect();
        for vm in self.live.unreadable() {
            if !vms.iter().any(|known| known.name == vm.name) {
                vms.push(VmNotAnswering {
                    name: vm.name.clone(),
                    kind: vm.error.kind(),
                    message: vm.error.to_string(),
                });
            }
        }
        vms
    }
}

/// What a call past its deadline is booked as: the failure of its action, kind
/// `TimedOut`.
fn timed_out(action: &Action, message: String) -> HypervisorError {
    match action {
        Action::Attach {
            domain,
            device,
            alias,
            ..
        } => HypervisorError::Attach {
            domain: domain.clone(),
            device: HostdevSpec::new(device, alias.clone()).to_string(),
            kind: FailureKind::TimedOut,
            message,
        },
        Action::Detach { domain, alias, .. } => HypervisorError::Detach {
            domain: domain.clone(),
            alias: alias.to_string(),
            kind: FailureKind::TimedOut,
            message,
        },
    }
}
