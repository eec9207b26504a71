//! The rules file: strict TOML parsing with file:line:column errors, and matching of
//! devices against rules.

pub mod edit;
pub mod explain;
mod parse;

pub use parse::line_and_column;

use crate::model::{InterfaceClass, UsbDevice};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/usbpass/usbpass.toml";
pub const DEFAULT_URI: &str = "qemu:///system";
/// The configuration `install.sh` writes when none exists: no rules, so nothing moves
/// until the user writes some.
pub const DEFAULT_CONFIG_TEXT: &str = include_str!("default-config.toml");

/// A rules file that cannot be used. Every variant names the file; parse and
/// validation errors also name the line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read rules file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    ParseToml {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}:{column}: {message}")]
    ValidateRule {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigError {
    /// The (line, column) the error points at, when it has one.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::ReadFile { .. } => None,
            ConfigError::ParseToml { line, column, .. }
            | ConfigError::ValidateRule { line, column, .. } => Some((*line, *column)),
        }
    }
}

/// How `usbpass-qemu` rewrites a usb-host argument for devices this rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconnectMode {
    /// `vendorid`+`productid`: QEMU reattaches the same kind of device wherever it appears.
    #[default]
    Id,
    /// `hostbus`+`hostport`: QEMU reattaches whatever appears on that physical port, for
    /// boards that change their ID when they reset.
    Port,
}

impl ReconnectMode {
    /// The word for it in the rules file (`reconnect = "port"`) and in the wrapper's log.
    pub fn as_str(self) -> &'static str {
        match self {
            ReconnectMode::Id => "id",
            ReconnectMode::Port => "port",
        }
    }
}

/// A class pattern: class, subclass and protocol, each `None` for "any".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassPattern {
    pub class: Option<u8>,
    pub subclass: Option<u8>,
    pub protocol: Option<u8>,
}

impl ClassPattern {
    fn matches_interface(&self, interface: &InterfaceClass) -> bool {
        self.class.is_none_or(|c| c == interface.class)
            && self.subclass.is_none_or(|s| s == interface.subclass)
            && self.protocol.is_none_or(|p| p == interface.protocol)
    }

    /// True when the device class or any interface class fits. Most devices say
    /// "class 00, see interfaces", so a HID keyboard is found through its interface.
    pub fn matches(&self, device: &UsbDevice) -> bool {
        let device_level = device.device_class != 0
            && self.subclass.is_none()
            && self.protocol.is_none()
            && self.class.is_none_or(|c| c == device.device_class);
        device_level
            || device
                .interface_classes
                .iter()
                .any(|interface| self.matches_interface(interface))
    }
}

impl fmt::Display for ClassPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |value: Option<u8>| value.map_or("*".to_string(), |v| format!("{v:02x}"));
        write!(
            f,
            "{}:{}:{}",
            part(self.class),
            part(self.subclass),
            part(self.protocol)
        )
    }
}

/// What a rule matches on. Every key that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matcher {
    pub vendor_id: Option<u16>,
    pub product_id: Option<u16>,
    pub serial: Option<String>,
    pub port: Option<String>,
    pub hub: Option<String>,
    pub class: Option<ClassPattern>,
}

impl Matcher {
    pub fn matches(&self, device: &UsbDevice) -> bool {
        self.vendor_id.is_none_or(|v| v == device.vendor_id)
            && self.product_id.is_none_or(|p| p == device.product_id)
            && self
                .serial
                .as_deref()
                .is_none_or(|s| device.serial.as_deref() == Some(s))
            && self.port.as_deref().is_none_or(|p| p == device.port_path)
            && self
                .hub
                .as_deref()
                .is_none_or(|hub| is_below_hub(device, hub))
            && self.class.is_none_or(|c| c.matches(device))
    }
}

impl Matcher {
    /// Whether this matcher reads the device's strings, which a hotplugged device may
    /// not have yet (`UsbDevice::strings_pending`).
    pub fn needs_strings(&self) -> bool {
        self.serial.is_some()
    }

    /// Whether it matches on everything but the strings.
    fn matches_without_strings(&self, device: &UsbDevice) -> bool {
        Matcher {
            serial: None,
            ..self.clone()
        }
        .matches(device)
    }
}

/// `hub` is a kernel name: a port path (`1-2`) or a root hub (`usb1`).
fn is_below_hub(device: &UsbDevice, hub: &str) -> bool {
    if let Some(bus) = hub.strip_prefix("usb") {
        return bus.parse::<u16>().is_ok_and(|bus| bus == device.bus);
    }
    device
        .port_path
        .strip_prefix(hub)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// One named rule: a matcher and the VMs it sends matching devices to, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    /// `group = "desk"`: the rules of a group are switched together between VMs with
    /// `usbpass switch` (a USB "KVM switch").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub matcher: Matcher,
    /// Never empty. The first running VM wins.
    pub vms: Vec<String>,
    pub reconnect: ReconnectMode,
    /// When an earlier VM of the list starts while the device is in a later one.
    #[serde(default)]
    pub give_back: GiveBack,
    /// `follow = "15s"`: a device that appears on the same port within this many
    /// seconds after this rule's device left a VM goes to that VM too, whatever its IDs,
    /// unless a rule claims it (a board in its bootloader, a phone switching modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_seconds: Option<u32>,
    /// `keep_off_host = true` or `false`: whether the host's own drivers stay off the
    /// interfaces of a device this rule sends to a VM (see `Config::keeps_off_host`).
    /// `None` follows the file's top-level `keep_off_host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_off_host: Option<bool>,
    /// 1-based line of the rule's table in the file, for messages.
    pub line: usize,
}

/// The rule's `return` key: what happens to a device in a fallback VM when a VM earlier
/// in the rule's list starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GiveBack {
    /// `return = "at-once"`, the default: the device moves to the earlier VM as soon as
    /// it runs. The list is a strict order of preference.
    #[default]
    AtOnce,
    /// `return = "when-free"`: the device stays in the fallback VM while it runs and the
    /// device stays plugged; a disk in use is never pulled out from under it. It goes
    /// to the first running VM of the list when it is plugged again or the fallback VM
    /// stops.
    WhenFree,
}

impl GiveBack {
    /// The spelling in the rules file.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveBack::AtOnce => "at-once",
            GiveBack::WhenFree => "when-free",
        }
    }
}

impl Rule {
    /// Hubs never match: passing one through would take every device behind it away
    /// from the host.
    pub fn matches(&self, device: &UsbDevice) -> bool {
        !device.is_hub() && self.matcher.matches(device)
    }
}

/// What the rules say about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleChoice<'a> {
    Rule(&'a Rule),
    NoRule,
    /// Its strings are not read yet and a rule that needs them could still match.
    Undecided,
}

/// Where the daemon and the CLI read the host's USB devices from: the rules file's
/// `device_source` key. `host::select` turns it and the uri into the one source used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSourceSetting {
    /// udev when the uri reaches the libvirtd of this machine, libvirt's node devices
    /// otherwise.
    #[default]
    Auto,
    Udev,
    Libvirt,
}

impl DeviceSourceSetting {
    /// The word for it in the rules file.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceSourceSetting::Auto => "auto",
            DeviceSourceSetting::Udev => "udev",
            DeviceSourceSetting::Libvirt => "libvirt",
        }
    }
}

/// A parsed, validated rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub uri: String,
    pub device_source: DeviceSourceSetting,
    /// The top-level `keep_off_host`: the default of every rule that does not say.
    pub keep_off_host: bool,
    pub rules: Vec<Rule>,
}

impl Config {
    /// The VMs of a group, in the order its rules name them, each once.
    pub fn group_vms(&self, group: &str) -> Vec<String> {
        let mut vms: Vec<String> = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|rule| rule.group.as_deref() == Some(group))
        {
            for vm in &rule.vms {
                if !vms.contains(vm) {
                    vms.push(vm.clone());
                }
            }
        }
        vms
    }

    /// The groups the rules name, sorted.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self
            .rules
            .iter()
            .filter_map(|rule| rule.group.clone())
            .collect();
        groups.sort();
        groups.dedup();
        groups
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Whether the host's drivers stay off the interfaces of the devices `rule` sends to
    /// a VM: the rule's own `keep_off_host`, else the file's.
    pub fn keeps_off_host(&self, rule: &Rule) -> bool {
        rule.keep_off_host.unwrap_or(self.keep_off_host)
    }

    /// Whether any rule keeps the host's drivers off its devices: only then does the
    /// daemon touch the kernel's interface authorization at all.
    pub fn keeps_any_off_host(&self) -> bool {
        self.rules.iter().any(|rule| self.keeps_off_host(rule))
    }

    /// The first rule that matches, as in USBGuard: order in the file is priority.
    pub fn first_match(&self, device: &UsbDevice) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(device))
    }

    /// `first_match` for a device whose strings may not be read yet: the first rule
    /// that matches, unless a rule before it could match once the strings are known.
    pub fn decide(&self, device: &UsbDevice) -> RuleChoice<'_> {
        for rule in &self.rules {
            if device.strings_pending
                && rule.matcher.needs_strings()
                && !device.is_hub()
                && rule.matcher.matches_without_strings(device)
            {
                return RuleChoice::Undecided;
            }
            if rule.matches(device) {
                return RuleChoice::Rule(rule);
            }
        }
        RuleChoice::NoRule
    }

    /// A config with these rules and no file, for tests and benchmarks.
    pub fn from_rules(rules: Vec<Rule>) -> Config {
        Config {
            path: PathBuf::from("<memory>"),
            uri: DEFAULT_URI.to_string(),
            device_source: DeviceSourceSetting::Auto,
            keep_off_host: false,
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices::device;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn matching() {
        let mut keyboard = device(1, 5, 0x046d, 0xc52b, "1-2.3");
        keyboard.serial = Some("S1".into());
        keyboard.interface_classes = vec![InterfaceClass {
            class: 3,
            subclass: 1,
            protocol: 1,
        }];
        let rule = |body: &str| {
            parse(&format!("[[rule]]\nname = \"r\"\n{body}\nvm = \"v\"\n"))
                .unwrap()
                .rules
                .remove(0)
        };
        assert!(rule("id = \"046d:c52b\"").matches(&keyboard));
        assert!(rule("id = \"046d:*\"").matches(&keyboard));
        assert!(rule("id = \"*:c52b\"").matches(&keyboard));
        assert!(!rule("id = \"046d:c52c\"").matches(&keyboard));
        assert!(rule("serial = \"S1\"").matches(&keyboard));
        assert!(!rule("serial = \"S2\"").matches(&keyboard));
        assert!(rule("port = \"1-2.3\"").matches(&keyboard));
        assert!(!rule("port = \"1-2\"").matches(&keyboard));
        assert!(rule("hub = \"1-2\"").matches(&keyboard));
        assert!(rule("hub = \"usb1\"").matches(&keyboard));
        assert!(!rule("hub = \"usb2\"").matches(&keyboard));
        assert!(!rule("hub = \"1-2.3\"").matches(&keyboard));
        assert!(rule("class = \"03:01:01\"").matches(&keyboard));
        assert!(rule("class = \"03\"").matches(&keyboard));
        assert!(!rule("class = \"03:01:02\"").matches(&keyboard));
        assert!(!rule("class = \"08\"").matches(&keyboard));
        assert!(rule("id = \"046d:c52b\"\nserial = \"S1\"").matches(&keyboard));
        assert!(!rule("id = \"046d:c52b\"\nserial = \"S2\"").matches(&keyboard));

        let mut hub = device(1, 2, 0x05e3, 0x0610, "1-2");
        hub.device_class = crate::model::HUB_CLASS;
        assert!(!rule("id = \"*:*\"").matches(&hub), "hubs never match");

        let mut storage = device(1, 7, 0x0781, 0x5567, "1-4");
        storage.device_class = 0x08;
        assert!(
            rule("class = \"08\"").matches(&storage),
            "device-level class"
        );
    }

    #[test]
    fn a_device_without_its_strings_waits_for_a_rule_that_needs_them() {
        let config = parse(
            "[[rule]]\nname = \"stick-a\"\nid = \"0403:6001\"\nserial = \"A\"\nvm = \"lab\"\n\n\
             [[rule]]\nname = \"any-stick\"\nid = \"0403:6001\"\nvm = \"fedora\"\n\n\
             [[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"win11\"\n",
        )
        .unwrap();
        let mut stick = device(1, 5, 0x0403, 0x6001, "1-2");
        stick.strings_pending = true;
        assert_eq!(config.decide(&stick), RuleChoice::Undecided);
        stick.strings_pending = false;
        stick.serial = Some("A".into());
        assert!(matches!(config.decide(&stick), RuleChoice::Rule(rule) if rule.name == "stick-a"));
        stick.serial = Some("B".into());
        assert!(
            matches!(config.decide(&stick), RuleChoice::Rule(rule) if rule.name == "any-stick")
        );
        // A rule that needs no strings decides at once.
        let mut receiver = device(1, 6, 0x046d, 0xc52b, "1-3");
        receiver.strings_pending = true;
        assert!(
            matches!(config.decide(&receiver), RuleChoice::Rule(rule) if rule.name == "receiver")
        );
        let mut other = device(1, 7, 0x1234, 0x5678, "1-4");
        other.strings_pending = true;
        assert_eq!(config.decide(&other), RuleChoice::NoRule);
    }

    #[test]
    fn first_match_wins() {
        let config = parse(
            "[[rule]]\nname = \"specific\"\nid = \"046d:c52b\"\nvm = \"a\"\n[[rule]]\nname = \"any\"\nid = \"046d:*\"\nvm = \"b\"\n",
        )
        .unwrap();
        let receiver = device(1, 5, 0x046d, 0xc52b, "1-1");
        let mouse = device(1, 6, 0x046d, 0xc077, "1-3");
        assert_eq!(config.first_match(&receiver).unwrap().name, "specific");
        assert_eq!(config.first_match(&mouse).unwrap().name, "any");
        assert!(config
            .first_match(&device(1, 7, 0x1234, 1, "1-4"))
            .is_none());
    }
}
