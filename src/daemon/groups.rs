//! Device groups switched in one command (`usbpass switch desk win11`): the loop's side.
//! A switch sets the group's target in `LoopFacts::group_targets` (so `reconcile` moves
//! every device of the group at once, each VM's calls on its own worker), keeps it in
//! `groups.json` beside the state file (it holds across replugs and restarts until
//! changed), and answers the client once every present device of the group is in place
//! or the request's time is up.

use super::*;
use crate::daemon::control::{ControlRequest, DeviceResult, SwitchReply, SwitchTo};
use crate::reconcile::GroupTarget;
use crate::rules::RuleChoice;
use crate::util::atomic_file;
use std::path::Path;

/// The file the switched groups are kept in, in the state file's directory.
pub const GROUPS_FILE_NAME: &str = "groups.json";

/// A switch waiting for its devices.
#[derive(Debug)]
pub(super) struct PendingSwitch {
    request: ControlRequest,
    /// `None`: handed back to the rules.
    target: Option<GroupTarget>,
    arrived: Instant,
    deadline: Instant,
}

impl PendingSwitch {
    /// The daemon stops before the devices are in place: say so to the client.
    pub(super) fn stopping(self) {
        let _ = self.request.reply.try_send(SwitchReply::refused(
            &self.request.request.group,
            "the daemon is stopping".to_string(),
        ));
    }
}

/// The groups file's path for a state file.
pub fn groups_path(state_path: &Path) -> PathBuf {
    state_path.parent().map_or_else(
        || PathBuf::from(GROUPS_FILE_NAME),
        |dir| dir.join(GROUPS_FILE_NAME),
    )
}

/// The switched groups kept at `path`; none when it is missing, and none (with a
/// warning) when it cannot be read.
pub fn load_group_targets(path: &Path) -> BTreeMap<String, GroupTarget> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            log::warn!(
                "ignoring {}: {error}; every group follows its rules",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

impl<C: Connector, S: DeviceSource, K: Clock> Daemon<C, S, K> {
    /// A switch request from the control socket.
    pub(super) fn switch_requested(&mut self, request: ControlRequest) {
        let group = request.request.group.clone();
        let refuse = |request: &ControlRequest, message: String| {
            let _ = request
                .reply
                .try_send(SwitchReply::refused(&request.request.group, message));
        };
        let groups = self.config.groups();
        if !groups.contains(&group) {
            refuse(
                &request,
                format!(
                    "no rule is in group {group:?} (groups: {})",
                    if groups.is_empty() {
                        "none; give rules a group = \"NAME\" key".to_string()
                    } else {
                        groups.join(", ")
                    }
                ),
            );
            return;
        }
        let vms = self.config.group_vms(&group);
        let current = self.facts.group_targets.get(&group).cloned();
        let target = match &request.request.to {
            SwitchTo::Vm(vm) if !vms.contains(vm) => {
                refuse(
                    &request,
                    format!(
                        "vm {vm:?} is not one of group {group}'s vms ({})",
                        vms.join(", ")
                    ),
                );
                return;
            }
            SwitchTo::Vm(vm) => Some(GroupTarget::Vm(vm.clone())),
            SwitchTo::Host => Some(GroupTarget::Host),
            SwitchTo::Rules => None,
            SwitchTo::Next => {
                let next = match &current {
                    Some(GroupTarget::Vm(vm)) => vms
                        .iter()
                        .position(|known| known == vm)
                        .map_or(0, |index| (index + 1) % vms.len()),
                    _ => 0,
                };
                Some(GroupTarget::Vm(vms[next].clone()))
            }
        };
        match &target {
            Some(target) => {
                self.facts
                    .group_targets
                    .insert(group.clone(), target.clone());
            }
            None => {
                self.facts.group_targets.remove(&group);
            }
        }
        log::info!(
            "switch group={group} to={}",
            target
                .as_ref()
                .map_or_else(|| "rules".to_string(), ToString::to_string)
        );
        self.save_group_targets();
        let now = self.clock.now();
        self.pending_switches.push(PendingSwitch {
            target,
            arrived: now,
            deadline: now + Duration::from_millis(request.request.timeout_ms),
            request,
        });
    }

    fn save_group_targets(&self) {
        let path = groups_path(&self.options.state_path);
        let result = serde_json::to_vec_pretty(&self.facts.group_targets)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                atomic_file::write(&path, &bytes, 0o644, atomic_file::Durability::Synced)
                    .map_err(std::io::Error::other)
            });
        if let Err(error) = result {
            log::warn!(
                "cannot keep the switched groups in {}: {error}; they hold until the daemon stops",
                path.display()
            );
        }
    }

    /// The soonest time a waiting switch gives up.
    pub(super) fn next_switch_deadline(&self) -> Option<Instant> {
        self.pending_switches
            .iter()
            .map(|pending| pending.deadline)
            .min()
    }

    /// After a round: answers each switch whose devices are all in place, or whose
    /// time is up.
    pub(super) fn answer_switches(&mut self) {
        if self.pending_switches.is_empty() {
            return;
        }
        let now = self.clock.now();
        let failures = self.retries.current();
        let pending = std::mem::take(&mut self.pending_switches);
        for switch in pending {
            let group = &switch.request.request.group;
            let devices: Vec<DeviceResult> = self
                .status
                .placements()
                .iter()
                .filter(|placement| {
                    matches!(self.config.decide(&placement.device),
                        RuleChoice::Rule(rule) if rule.group.as_deref() == Some(group.as_str()))
                })
                .map(|placement| {
                    let place = placement
                        .holders
                        .iter()
                        .map(|holder| holder.domain.clone())
                        .collect::<Vec<_>>();
                    let wanted = match &switch.target {
                        Some(GroupTarget::Vm(vm)) => Some(vm.clone()),
                        Some(GroupTarget::Host) => None,
                        None => placement.wanted_vm.clone(),
                    };
                    let in_place = match &wanted {
                        Some(vm) => place.len() == 1 && place[0] == *vm,
                        None => place.is_empty(),
                    };
                    let device_text = placement.device.to_string();
                    DeviceResult {
                        device: device_text.clone(),
                        name: placement.device.display_name(),
                        place: if place.is_empty() {
                            "host".to_string()
                        } else {
                            place.join(", ")
                        },
                        in_place,
                        error: (!in_place)
                            .then(|| {
                                failures
                                    .iter()
                                    .find(|failure| failure.device == device_text)
                                    .map(|failure| failure.message.clone())
                            })
                            .flatten(),
                    }
                })
                .collect();
            let all_in_place = devices.iter().all(|device| device.in_place);
            let target_vm_down = match &switch.target {
                Some(GroupTarget::Vm(vm)) if !self.live.is_running(vm) => Some(vm.clone()),
                _ => None,
            };
            if !all_in_place && now < switch.deadline && target_vm_down.is_none() {
                self.pending_switches.push(switch);
                continue;
            }
            let error = if let Some(vm) = target_vm_down {
                Some(format!(
                    "vm {vm} is not running: the group's devices stay on the host and go to {vm} when it starts"
                ))
            } else if all_in_place {
                None
            } else {
                Some(format!(
                    "not every device was in place within {} ms",
                    switch.request.request.timeout_ms
                ))
            };
            let reply = SwitchReply {
                ok: error.is_none(),
                group: group.clone(),
                target: switch
                    .target
                    .as_ref()
                    .map_or_else(|| "rules".to_string(), ToString::to_string),
                milliseconds: now.saturating_duration_since(switch.arrived).as_millis() as u64,
                devices,
                error,
            };
            let _ = switch.request.reply.try_send(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switched_groups_are_read_back_and_a_broken_file_is_ignored() {
        let directory = tempfile::tempdir().unwrap();
        let path = groups_path(&directory.path().join("state.json"));
        assert!(load_group_targets(&path).is_empty());
        std::fs::write(&path, r#"{"desk": {"vm": "win11"}, "couch": "host"}"#).unwrap();
        let targets = load_group_targets(&path);
        assert_eq!(targets["desk"], GroupTarget::Vm("win11".into()));
        assert_eq!(targets["couch"], GroupTarget::Host);
        std::fs::write(&path, "{").unwrap();
        assert!(load_group_targets(&path).is_empty());
    }
}
