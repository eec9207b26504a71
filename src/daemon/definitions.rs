//! Keeps usbpass's hostdevs out of persistent VM definitions. usbpass attaches live
//! only, but `virsh dumpxml vm > vm.xml`, an edit and `virsh define vm.xml` while a
//! device is attached copy its hostdev into the definition, and the VM then refuses to
//! start without that device. The loop runs this chore after it connects and after a
//! VM is defined; it removes such hostdevs from the definition (config only, by alias,
//! never a hostdev usbpass did not make) and logs each one.

use crate::hypervisor::Hypervisor;

/// Removes every hostdev usbpass made from every persistent definition. Returns how many
/// it removed; failures are logged and left for the next define or reconnect.
pub fn remove_owned_hostdevs_from_definitions<H: Hypervisor>(hypervisor: &mut H) -> usize {
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
