//! Generating udev rules that give the QEMU user access to the USB device nodes the rules
//! file names, so that a QEMU started through `usbpass-qemu` can reopen a device that was
//! replugged (libvirt labels only the node that existed when the VM started).

use crate::rules::{ClassPattern, Config, Rule};

/// Where `usbpass udev-rules` output is meant to be installed.
pub const DEFAULT_RULES_PATH: &str = "/etc/udev/rules.d/70-usbpass.rules";
/// The group QEMU runs as under Debian's and Ubuntu's libvirt.
pub const DEFAULT_QEMU_GROUP: &str = "libvirt-qemu";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UdevRulesError {
    #[error("invalid qemu group {group:?}: must be a plain group name")]
    CheckGroup { group: String },
    #[error("invalid qemu user {user:?}: must be a plain user name")]
    CheckOwner { user: String },
}

/// Whom the generated rules give access to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuAccess {
    /// The group of the node; QEMU's group (`group =` in /etc/libvirt/qemu.conf).
    pub group: String,
    /// Also make this user the owner, when QEMU's user is in no group of its own.
    pub owner: Option<String>,
}

impl Default for QemuAccess {
    fn default() -> Self {
        QemuAccess {
            group: DEFAULT_QEMU_GROUP.to_string(),
            owner: None,
        }
    }
}

/// udev has no escape for `"` in a value, and control bytes have no place in a name.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A value udev can hold between double quotes. udev matches are shell globs, so glob
/// characters in a serial are written as one-character classes to match literally.
fn udev_literal(value: &str) -> Option<String> {
    if value
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return None;
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' | '?' | '[' | ']' | '|' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// `ID_USB_INTERFACES` holds `:CCSSPP:` per interface; `*` parts become `??`.
fn interface_glob(class: &ClassPattern) -> String {
    let part = |value: Option<u8>| value.map_or("??".to_string(), |v| format!("{v:02x}"));
    format!(
        "*:{}{}{}:*",
        part(class.class),
        part(class.subclass),
        part(class.protocol)
    )
}

/// The match keys for one rule, or why it cannot be expressed.
fn match_keys(rule: &Rule) -> Result<Vec<String>, String> {
    let matcher = &rule.matcher;
    let mut keys = vec![
        "ACTION!=\"remove\"".to_string(),
        "SUBSYSTEM==\"usb\"".to_string(),
        "ENV{DEVTYPE}==\"usb_device\"".to_string(),
        // Hubs are never passed through, so they never need QEMU's group.
        "ATTR{bDeviceClass}!=\"09\"".to_string(),
    ];
    if let Some(vendor) = matcher.vendor_id {
        keys.push(format!("ATTR{{idVendor}}==\"{vendor:04x}\""));
    }
    if let Some(product) = matcher.product_id {
        keys.push(format!("ATTR{{idProduct}}==\"{product:04x}\""));
    }
    if let Some(serial) = &matcher.serial {
        let literal = udev_literal(serial)
            .ok_or_else(|| format!("serial {serial:?} holds a quote, backslash or control byte"))?;
        keys.push(format!("ATTR{{serial}}==\"{literal}\""));
    }
    if let Some(port) = &matcher.port {
        let literal = udev_literal(port).ok_or_else(|| format!("port {port:?} is not plain"))?;
        keys.push(format!("KERNEL==\"{literal}\""));
    }
    if let Some(hub) = &matcher.hub {
        match hub.strip_prefix("usb") {
            Some(bus) if bus.parse::<u16>().is_ok() => {
                keys.push(format!("ATTR{{busnum}}==\"{bus}\""));
            }
            _ => {
                let literal =
                    udev_literal(hub).ok_or_else(|| format!("hub {hub:?} is not plain"))?;
                keys.push(format!("KERNEL==\"{literal}.*\""));
            }
        }
    }
    if let Some(class) = &matcher.class {
        // Most devices say "class 00, see interfaces": match the interface list, which
        // udev's usb_id builtin has put on the device by the time rules.d/70 runs.
        keys.push(format!(
            "ENV{{ID_USB_INTERFACES}}==\"{}\"",
            interface_glob(class)
        ));
    }
    Ok(keys)
}

/// The rules file text: one udev rule per usbpass rule, in order, each preceded by a
/// comment naming it. A rule udev cannot express is written as a comment saying why.
pub fn render_udev_rules(config: &Config, access: &QemuAccess) -> Result<String, UdevRulesError> {
    if !is_plain_name(&access.group) {
        return Err(UdevRulesError::CheckGroup {
            group: access.group.clone(),
        });
    }
    if let Some(owner) = &access.owner {
        if !is_plain_name(owner) {
            return Err(UdevRulesError::CheckOwner {
                user: owner.clone(),
            });
        }
    }
    let mut text = String::new();
    text.push_str("# Generated by `usbpass udev-rules`; regenerate instead of editing.\n");
    text.push_str(&format!(
        "# Gives group {} read-write access to the USB devices that {} names,\n",
        access.group,
        config.path.display()
    ));
    text.push_str("# so that QEMU can reopen such a device after it is replugged.\n");
    text.push_str(&format!(
        "# Install as {DEFAULT_RULES_PATH}, then run `udevadm control --reload` and\n"
    ));
    text.push_str("# `udevadm trigger --subsystem-match=usb`.\n");
    let mut assignments = format!("GROUP=\"{}\", MODE=\"0664\"", access.group);
    if let Some(owner) = &access.owner {
        assignments = format!("OWNER=\"{owner}\", {assignments}");
    }
    for rule in &config.rules {
        text.push('\n');
        text.push_str(&format!(
            "# rule {:?} ({}:{})\n",
            rule.name,
            config.path.display(),
            rule.line
        ));
        match match_keys(rule) {
            Ok(keys) => {
                text.push_str(&keys.join(", "));
                text.push_str(", ");
                text.push_str(&assignments);
                text.push('\n');
            }
            Err(reason) => {
                text.push_str(&format!("# skipped: {reason}\n"));
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/usbpass/usbpass.toml")).unwrap()
    }

    fn rule_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect()
    }

    #[test]
    fn one_line_per_rule_with_every_match_key() {
        let config = config(
            r#"
[[rule]]
name = "receiver"
id = "046d:c52b"
serial = "AB*1"
vm = "win11"

[[rule]]
name = "front-left"
port = "1-2.3"
vm = "lab"

[[rule]]
name = "keyboards"
class = "03:*:01"
hub = "usb2"
vm = "lab"

[[rule]]
name = "behind-hub"
hub = "1-4"
vendor = "0627"
vm = "lab"
"#,
        );
        let text = render_udev_rules(&config, &QemuAccess::default()).unwrap();
        let lines = rule_lines(&text);
        assert_eq!(lines.len(), 4);
        let common = r#"ACTION!="remove", SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ATTR{bDeviceClass}!="09", "#;
        let tail = r#", GROUP="libvirt-qemu", MODE="0664""#;
        assert_eq!(
            lines[0],
            format!(
                r#"{common}ATTR{{idVendor}}=="046d", ATTR{{idProduct}}=="c52b", ATTR{{serial}}=="AB[*]1"{tail}"#
            )
        );
        assert_eq!(lines[1], format!(r#"{common}KERNEL=="1-2.3"{tail}"#));
        assert_eq!(
            lines[2],
            format!(r#"{common}ATTR{{busnum}}=="2", ENV{{ID_USB_INTERFACES}}=="*:03??01:*"{tail}"#)
        );
        assert_eq!(
            lines[3],
            format!(r#"{common}ATTR{{idVendor}}=="0627", KERNEL=="1-4.*"{tail}"#)
        );
        assert!(text.contains("# rule \"front-left\" (/etc/usbpass/usbpass.toml:"));
    }

    #[test]
    fn unexpressible_serial_becomes_a_comment() {
        let config = config("[[rule]]\nname = \"q\"\nserial = 'a\"b'\nvm = \"x\"\n");
        let text = render_udev_rules(&config, &QemuAccess::default()).unwrap();
        assert!(rule_lines(&text).is_empty());
        assert!(text.contains("# skipped: serial \"a\\\"b\" holds a quote"));
    }

    #[test]
    fn owner_and_group_are_checked() {
        let config = config("[[rule]]\nname = \"r\"\nid = \"046d:*\"\nvm = \"x\"\n");
        let access = QemuAccess {
            group: "kvm".into(),
            owner: Some("qemu".into()),
        };
        let text = render_udev_rules(&config, &access).unwrap();
        assert!(rule_lines(&text)[0].ends_with(r#"OWNER="qemu", GROUP="kvm", MODE="0664""#));
        assert!(!rule_lines(&text)[0].contains("idProduct"));
        let bad = QemuAccess {
            group: "a\" , RUN+=\"x".into(),
            owner: None,
        };
        assert!(matches!(
            render_udev_rules(&config, &bad),
            Err(UdevRulesError::CheckGroup { .. })
        ));
    }

    #[test]
    fn every_rule_line_is_well_formed_udev() {
        let config = config(
            "[[rule]]\nname = \"a\"\nid = \"*:c52b\"\nvm = \"x\"\n[[rule]]\nname = \"b\"\nclass = \"09\"\nvm = \"x\"\n",
        );
        let text = render_udev_rules(&config, &QemuAccess::default()).unwrap();
        for line in rule_lines(&text) {
            for pair in line.split(", ") {
                let (key, value) = pair
                    .split_once("==")
                    .or_else(|| pair.split_once("!="))
                    .or_else(|| pair.split_once('='))
                    .unwrap();
                assert!(
                    key.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "{}_".contains(c)),
                    "{pair}"
                );
                assert!(
                    value.starts_with('"') && value.ends_with('"') && value.len() >= 2,
                    "{pair}"
                );
                assert!(!value[1..value.len() - 1].contains('"'), "{pair}");
            }
        }
    }
}
