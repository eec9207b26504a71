//! The loop's status: the snapshot it writes to the state file after every reconcile,
//! for `usbpass status`, and the one-line STATUS it gives systemd; and the loop's side of
//! both.

use crate::daemon::clock::Clock;
use crate::daemon::retries::RetryBook;
use crate::daemon::state::{unix_now, DaemonState, LibvirtStatus, VmNotAnswering, STATE_FORMAT};
use crate::daemon::Daemon;
use crate::host::DeviceSource;
use crate::hypervisor::{Connector, DomainView};
use crate::reconcile::{GroupTarget, Placement};
use crate::rules::Config;
use std::collections::BTreeMap;
use std::path::Path;

/// What the status keeps of its own: what the last round saw.
pub struct Status {
    /// Unix time in seconds.
    started_at: u64,
    running_vms: Vec<String>,
    placements: Vec<Placement>,
    /// The state file could not be written last time: warn once, not every reconcile.
    write_failed: bool,
}

impl Status {
    /// Each present device's placement as the last round saw it.
    pub fn placements(&self) -> &[Placement] {
        &self.placements
    }
}

/// The rest of the loop's view, lent for one snapshot.
pub struct LoopView<'a> {
    pub config: &'a Config,
    pub config_path: &'a Path,
    pub config_error: Option<&'a str>,
    pub device_count: usize,
    pub connected: bool,
    pub libvirt_error: Option<&'a str>,
    pub retries: &'a RetryBook,
    pub vms_not_answering: Vec<VmNotAnswering>,
    /// Groups switched with `usbpass switch`, and where to.
    pub group_targets: &'a BTreeMap<String, GroupTarget>,
}

impl Status {
    pub fn new() -> Status {
        Status {
            started_at: unix_now(),
            running_vms: Vec::new(),
            placements: Vec::new(),
            write_failed: false,
        }
    }

    /// A round listed these VMs and placed the devices so.
    pub fn saw(&mut self, domains: &[DomainView], placements: Vec<Placement>) {
        self.running_vms = domains.iter().map(|d| d.name.clone()).collect();
        self.placements = placements;
    }

    /// Without a connection no VM is known to run.
    pub fn disconnected(&mut self) {
        self.running_vms.clear();
    }

    /// systemd's STATUS: `3 rules, 4 devices, 2 passed through, libvirt connected`.
    pub fn line(&self, view: &LoopView) -> String {
        let held = self
            .placements
            .iter()
            .filter(|p| !p.holders.is_empty())
            .count();
        let mut line = format!(
            "{} rules, {} devices, {} passed through, libvirt {}",
            view.config.rules.len(),
            view.device_count,
            held,
            if view.connected {
                "connected"
            } else {
                "disconnected"
            }
        );
        if !view.vms_not_answering.is_empty() {
            let names: Vec<&str> = view
                .vms_not_answering
                .iter()
                .map(|vm| vm.name.as_str())
                .collect();
            line.push_str(&format!(", not answering: {}", names.join(" ")));
        }
        line
    }

    pub fn snapshot(&self, view: &LoopView) -> DaemonState {
        DaemonState {
            format: STATE_FORMAT,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.started_at,
            updated_at: unix_now(),
            config_path: view.config_path.to_path_buf(),
            config_error: view.config_error.map(str::to_string),
            rule_count: view.config.rules.len(),
            libvirt: LibvirtStatus {
                uri: view.config.uri.clone(),
                connected: view.connected,
                last_error: view.libvirt_error.map(str::to_string),
            },
            running_vms: self.running_vms.clone(),
            vms_not_answering: view.vms_not_answering.clone(),
            devices: self.placements.clone(),
            failures: view.retries.current(),
            recent_failures: view.retries.recent(),
            groups: view
                .group_targets
                .iter()
                .map(|(group, target)| (group.clone(), target.to_string()))
                .collect(),
        }
    }

    /// Writes the state file; a failure is logged, once until a write succeeds again.
    pub fn write(&mut self, state: &DaemonState, path: &Path) {
        match state.write(path) {
            Ok(()) => self.write_failed = false,
            Err(error) => {
                if !self.write_failed {
                    log::warn!("{error}");
                }
                self.write_failed = true;
            }
        }
    }
}

/// The loop's side: what it shows of itself, to the state file and to systemd.
impl<C: Connector, S: DeviceSource, K: Clock> Daemon<C, S, K> {
    pub(super) fn loop_view(&self) -> LoopView<'_> {
        LoopView {
            config: &self.config,
            config_path: &self.options.config_path,
            config_error: self.config_error.as_deref(),
            device_count: self.devices.len(),
            connected: self.connection.is_connected(),
            libvirt_error: self.connection.last_error(),
            retries: &self.retries,
            vms_not_answering: self.vms_not_answering(),
            group_targets: &self.facts.group_targets,
        }
    }

    pub(super) fn status_line(&self) -> String {
        self.status.line(&self.loop_view())
    }

    /// The state the CLI reads. Public for tests.
    pub fn state(&self) -> DaemonState {
        self.status.snapshot(&self.loop_view())
    }

    pub(super) fn write_state(&mut self) {
        let state = self.state();
        self.status.write(&state, &self.options.state_path);
        // systemd's STATUS follows the line whenever it changes (connected, rules
        // reloaded), not only at READY.
        let line = self.status_line();
        if self.status_sent.as_deref() != Some(line.as_str()) {
            crate::daemon::notify::status(&line);
            self.status_sent = Some(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{FailureKind, HypervisorError};
    use crate::model::alias::{HostdevAlias, Ownership};
    use crate::reconcile::{Action, Holder};
    use crate::testing::devices::device;
    use std::time::Instant;

    #[test]
    fn the_snapshot_and_the_status_line_say_what_the_last_round_saw() {
        let directory = tempfile::tempdir().unwrap();
        let config_path = directory.path().join("usbpass.toml");
        std::fs::write(
            &config_path,
            "[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"win11\"\n",
        )
        .unwrap();
        let config = Config::load(&config_path).unwrap();
        let receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        let alias = HostdevAlias::for_rules(&receiver);
        let mut retries = RetryBook::default();
        let attach = Action::Attach {
            domain: "win11".into(),
            device: Box::new(receiver.clone()),
            alias: alias.clone(),
            rule: "receiver".into(),
        };
        let error = HypervisorError::Attach {
            domain: "win11".into(),
            device: receiver.to_string(),
            kind: FailureKind::NoFreePort,
            message: "no port".into(),
        };
        retries.failed(&attach, &error, Instant::now());
        let mut status = Status::new();
        let win11 = DomainView {
            name: "win11".into(),
            hostdevs: Vec::new(),
        };
        let placement = Placement {
            device: receiver,
            rule: Some("receiver".into()),
            wanted_vm: Some("win11".into()),
            holders: vec![Holder {
                domain: "win11".into(),
                alias: Some(alias.to_string()),
                ownership: Ownership::Rules,
            }],
            passed_over: Vec::new(),
        };
        status.saw(&[win11], vec![placement]);
        let view = LoopView {
            config: &config,
            config_path: &config_path,
            config_error: None,
            device_count: 1,
            connected: true,
            libvirt_error: None,
            retries: &retries,
            vms_not_answering: Vec::new(),
            group_targets: &BTreeMap::new(),
        };
        assert_eq!(
            status.line(&view),
            "1 rules, 1 devices, 1 passed through, libvirt connected"
        );
        let state = status.snapshot(&view);
        assert_eq!(state.running_vms, ["win11"]);
        assert_eq!(state.devices[0].wanted_vm.as_deref(), Some("win11"));
        assert_eq!(state.failures[0].kind, FailureKind::NoFreePort);
        assert_eq!(state.recent_failures.len(), 1);
        assert!(state.libvirt.connected);

        status.disconnected();
        let state_path = directory.path().join("state.json");
        status.write(&status.snapshot(&view), &state_path);
        assert!(DaemonState::read(&state_path)
            .unwrap()
            .running_vms
            .is_empty());
    }
}
