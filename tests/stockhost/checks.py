# tests/stockhost/checks.py: the numbered checks of the stock-host test VM, shared by the
# outer driver (tests/stockhost/run, one PASS/FAIL line per entry) and the inner one
# (tests/stockhost/in_vm.py, which runs them), so the two cannot disagree on numbering.
# `e2e` names the tests/e2e scenario a check runs unchanged, against the daemon as the
# packaged service instead of a child process.

from collections import namedtuple

Check = namedtuple("Check", "number name e2e", defaults=(None,))

CHECKS = [
    Check(1, "stock-host-apparmor-confines-libvirtd-and-guests-debian-qemu-conf"),
    Check(2, "deb-install-enables-and-starts-service-ready-via-sd-notify"),
    Check(3, "service-plug-by-id-reaches-running-vm", e2e=1),
    Check(4, "service-unplug-leaves-guest-no-stale-hostdev", e2e=2),
    Check(5, "service-replug-10x-new-devnum-no-port-leak", e2e=3),
    Check(6, "service-plug-while-vm-off-then-start", e2e=4),
    Check(7, "service-two-vm-rule-fallback-and-back", e2e=7),
    Check(8, "journal-decision-lines-carry-priorities"),
    Check(9, "systemctl-reload-and-rules-edit-reload-broken-edit-refused"),
    Check(10, "systemctl-stop-in-time-leaves-devices-attached"),
    Check(11, "wrapper-replug-fails-with-stock-defaults-works-with-documented-settings"),
    Check(12, "deb-upgrade-keeps-edited-rules-remove-and-purge-clean"),
]
