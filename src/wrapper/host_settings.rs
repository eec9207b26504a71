//! Which of the host settings that `usbpass-qemu`'s replug needs this host has, for
//! `usbpass why`: libvirt's private /dev, its cgroup device controller, AppArmor, and
//! the device node's permissions (docs/usbpass-qemu.md explains each). Pure: the caller
//! reads the files and passes their text.

use serde::Serialize;

/// One setting: what the replug needs, what the host has, and whether that suffices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingCheck {
    pub setting: &'static str,
    pub needed: &'static str,
    pub found: String,
    /// `None` when it cannot be told from here.
    pub ok: Option<bool>,
}

/// What `check` reads besides qemu.conf.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// `/etc/apparmor.d/local/abstractions/libvirt-qemu`, when it exists.
    pub apparmor_local: Option<String>,
    /// Whether the kernel runs SELinux (`/sys/fs/selinux` exists).
    pub selinux: bool,
    /// The device node's group name and mode bits, when it exists.
    pub node: Option<(String, u32)>,
}

/// The value of `key` in qemu.conf text, comments removed and a list joined onto one
/// line; `None` when the key is not set (libvirt's default applies).
pub fn qemu_conf_value(text: &str, key: &str) -> Option<String> {
    let uncommented: Vec<&str> = text
        .lines()
        .map(|line| {
            // qemu.conf values are simple strings; a '#' inside quotes is not a comment.
            let mut quoted = false;
            for (index, character) in line.char_indices() {
                match character {
                    '"' => quoted = !quoted,
                    '#' if !quoted => return &line[..index],
                    _ => {}
                }
            }
            line
        })
        .collect();
    let mut found = None;
    let mut lines = uncommented.iter();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if name.trim() != key {
            continue;
        }
        let mut value = value.trim().to_string();
        // A list may span lines until its closing bracket.
        if value.starts_with('[') {
            while !value.contains(']') {
                match lines.next() {
                    Some(more) => value.push_str(more.trim()),
                    None => break,
                }
            }
        }
        // The last assignment wins, as in libvirt's parser.
        found = Some(value);
    }
    found
}

fn list_items(value: &str) -> Vec<String> {
    value
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|item| item.trim().trim_matches('"').to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

/// Checks the settings; `qemu_conf` is the text of `/etc/libvirt/qemu.conf`.
pub fn check(qemu_conf: &str, facts: &HostFacts) -> Vec<SettingCheck> {
    let mut checks = Vec::new();
    let namespaces = qemu_conf_value(qemu_conf, "namespaces");
    checks.push(SettingCheck {
        setting: "namespaces",
        needed: "namespaces = [ ] in qemu.conf: a replugged device's new node must exist in QEMU's /dev",
        ok: Some(namespaces.as_deref().is_some_and(|value| list_items(value).is_empty())),
        found: namespaces.unwrap_or_else(|| "not set (libvirt's default: a private /dev)".into()),
    });
    let controllers = qemu_conf_value(qemu_conf, "cgroup_controllers");
    checks.push(SettingCheck {
        setting: "cgroup_controllers",
        needed: "no \"devices\" in cgroup_controllers: the device controller admits only the nodes QEMU started with",
        ok: Some(
            controllers
                .as_deref()
                .is_some_and(|value| !list_items(value).iter().any(|c| c == "devices")),
        ),
        found: controllers.unwrap_or_else(|| "not set (libvirt's default includes devices)".into()),
    });
    let security = qemu_conf_value(qemu_conf, "security_driver")
        .map(|value| value.trim_matches('"').to_string());
    let (ok, found) = match security.as_deref() {
        Some("none") => (Some(true), "none".to_string()),
        Some("selinux") => (
            None,
            "selinux: allow svirt_t to open usb_device_t (setsebool -P virt_use_usb 1)".into(),
        ),
        _ if facts.selinux => (
            None,
            "selinux (detected): allow svirt_t to open usb_device_t (setsebool -P virt_use_usb 1)"
                .into(),
        ),
        other => {
            let local = facts.apparmor_local.as_deref().unwrap_or("");
            // The guest profile executes only qemu-system-* and opens no new USB node:
            // both lines must be in the local abstraction (docs/usbpass-qemu.md).
            let missing: Vec<&str> = [
                ("usbpass-qemu", "usbpass-qemu rmix"),
                ("/dev/bus/usb/", "/dev/bus/usb/** rw"),
            ]
            .into_iter()
            .filter(|(needle, _)| !local.contains(needle))
            .map(|(_, rule)| rule)
            .collect();
            (
                Some(missing.is_empty()),
                format!(
                    "{} with {}",
                    other.unwrap_or("not set (apparmor where it runs)"),
                    if missing.is_empty() {
                        "the wrapper and /dev/bus/usb/ in the local libvirt-qemu abstraction"
                            .to_string()
                    } else {
                        format!(
                            "no {} rule in /etc/apparmor.d/local/abstractions/libvirt-qemu",
                            missing.join(" or ")
                        )
                    }
                ),
            )
        }
    };
    checks.push(SettingCheck {
        setting: "security_driver",
        needed: "the confinement lets QEMU run usbpass-qemu and open new /dev/bus/usb nodes",
        found,
        ok,
    });
    let user = qemu_conf_value(qemu_conf, "user").map(|value| value.trim_matches('"').to_string());
    let group = qemu_conf_value(qemu_conf, "group")
        .map(|value| value.trim_matches('"').to_string())
        .unwrap_or_else(|| "libvirt-qemu".to_string());
    let (ok, found) = match (&user, &facts.node) {
        (Some(user), _) if user == "root" || user == "+0" => {
            (Some(true), "qemu runs as root".to_string())
        }
        (_, None) => (None, "the device node does not exist".to_string()),
        (_, Some((node_group, mode))) => (
            Some(*node_group == group && mode & 0o060 == 0o060),
            format!("node group {node_group}, mode {mode:04o}; qemu's group {group}"),
        ),
    };
    checks.push(SettingCheck {
        setting: "device node",
        needed: "QEMU's group may read and write the device node (usbpass udev-rules)",
        found,
        ok,
    });
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_DEFAULT: &str = "# Master configuration file for the QEMU driver.\n\
        #user = \"root\"\n#namespaces = [ \"mount\" ]\n#cgroup_controllers = [ \"cpu\", \"devices\" ]\n";

    const READY: &str = "user = \"libvirt-qemu\"\ngroup = \"kvm\"\nnamespaces = [ ]\n\
        cgroup_controllers = [ \"cpu\",\n  \"memory\" ] # no devices\nsecurity_driver = \"none\"\n";

    #[test]
    fn debians_default_lacks_everything_the_replug_needs() {
        let facts = HostFacts {
            node: Some(("root".into(), 0o664)),
            ..HostFacts::default()
        };
        let checks = check(DEBIAN_DEFAULT, &facts);
        let verdicts: Vec<(&str, Option<bool>)> = checks
            .iter()
            .map(|check| (check.setting, check.ok))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("namespaces", Some(false)),
                ("cgroup_controllers", Some(false)),
                ("security_driver", Some(false)),
                ("device node", Some(false)),
            ]
        );
    }

    #[test]
    fn a_host_set_up_as_the_docs_say_has_all_of_it() {
        let facts = HostFacts {
            node: Some(("kvm".into(), 0o664)),
            ..HostFacts::default()
        };
        assert!(check(READY, &facts)
            .iter()
            .all(|check| check.ok == Some(true)));
        assert_eq!(
            qemu_conf_value(READY, "cgroup_controllers").as_deref(),
            Some("[ \"cpu\",\"memory\" ]")
        );
    }

    #[test]
    fn apparmor_is_enough_with_the_local_rule_and_selinux_is_unknown() {
        let facts = HostFacts {
            apparmor_local: Some("/usr/bin/usbpass-qemu rmix,\n/dev/bus/usb/** rw,\n".into()),
            ..HostFacts::default()
        };
        let only_the_node = HostFacts {
            apparmor_local: Some("/dev/bus/usb/** rw,\n".into()),
            ..HostFacts::default()
        };
        let security = |text: &str, facts: &HostFacts| {
            check(text, facts)
                .into_iter()
                .find(|check| check.setting == "security_driver")
                .unwrap()
                .ok
        };
        assert_eq!(security("", &facts), Some(true));
        assert_eq!(security("security_driver = \"selinux\"\n", &facts), None);
        assert_eq!(security("", &HostFacts::default()), Some(false));
        // Without the exec rule the wrapped guest does not even start.
        assert_eq!(security("", &only_the_node), Some(false));
    }
}
