//! Keeps usbpass's hostdevs out of persistent VM definitions. usbpass attaches live
//! only, but `virsh dumpxml vm > vm.xml`, an edit and `virsh define vm.xml` while a
//! device is attached copy its hostdev into the definition, and the VM then refuses to
//! start without that device. The loop asks for this chore after it connects and after
//! a VM is defined; it removes such hostdevs from the definition (config only, by
//! alias, never a hostdev usbpass did not make) and logs each one. It runs on the
//! executor's general worker, off the loop: it only logs, and a libvirtd that does not
//! answer must not hold up the loop.

use super::executor::Executor;
use crate::hypervisor::Hypervisor;
use std::sync::{Arc, Mutex};

/// Runs the chore off the loop, one run at a time; a request while one is queued or
/// runs makes it run once more afterwards, so a define during a run is not missed.
#[derive(Debug, Default)]
pub struct DefinitionsChore {
    /// (running, asked again while running)
    state: Arc<Mutex<(bool, bool)>>,
}

impl DefinitionsChore {
    pub fn request<H: Hypervisor>(&self, hypervisor: Arc<H>, executor: &mut Executor) {
        {
            let mut state = lock(&self.state);
            if state.0 {
                state.1 = true;
                return;
            }
            state.0 = true;
        }
        let state = self.state.clone();
        let queued = executor.queue_chore(move || loop {
            remove_owned_hostdevs_from_definitions(&*hypervisor);
            let mut state = lock(&state);
            if std::mem::take(&mut state.1) {
                continue;
            }
            state.0 = false;
            return;
        });
        if let Err(error) = queued {
            log::warn!("cannot start the thread that checks vm definitions: {error}");
            *lock(&self.state) = (false, false);
        }
    }
}

fn lock(state: &Mutex<(bool, bool)>) -> std::sync::MutexGuard<'_, (bool, bool)> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes every hostdev usbpass made from every persistent definition. Returns how many
/// it removed; failures are logged and left for the next define or reconnect.
pub fn remove_owned_hostdevs_from_definitions<H: Hypervisor + ?Sized>(hypervisor: &H) -> usize {
    let defined = match hypervisor.owned_hostdevs_in_definitions() {
        Ok(defined) => defined,
        Err(error) => {
            log::warn!("{error}");
            return 0;
        }
    };
    let mut removed = 0;
    for domain in defined {
        for alias in domain.aliases {
            match hypervisor.remove_from_definition(&domain.domain, &alias) {
                Ok(()) => {
                    log::warn!(
                        "removed hostdev {alias} from the persistent definition of vm {}: \
                         usbpass attaches live only, and a device named there keeps the vm \
                         from starting once it is unplugged",
                        domain.domain
                    );
                    removed += 1;
                }
                Err(error) => log::warn!("{error}"),
            }
        }
    }
    removed
}
