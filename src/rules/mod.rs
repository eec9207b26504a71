//! The rules file: strict TOML parsing with file:line:column errors, and matching of
//! devices against rules.

pub mod edit;

use crate::model::port::{is_port_path, is_usb_device_name};
use crate::model::{InterfaceClass, UsbDevice};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

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
    pub matcher: Matcher,
    /// Never empty. The first running VM wins.
    pub vms: Vec<String>,
    pub reconnect: ReconnectMode,
    /// 1-based line of the rule's table in the file, for messages.
    pub line: usize,
}

impl Rule {
    /// Hubs never match: passing one through would take every device behind it away
    /// from the host.
    pub fn matches(&self, device: &UsbDevice) -> bool {
        !device.is_hub() && self.matcher.matches(device)
    }
}

/// A parsed, validated rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub uri: String,
    pub rules: Vec<Rule>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse `text` as the contents of `path` (used only in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            let (line, column) = error
                .span()
                .map_or((1, 1), |span| line_and_column(text, span.start));
            ConfigError::ParseToml {
                path: path.to_path_buf(),
                line,
                column,
                message: friendlier(first_line(error.message())),
            }
        })?;
        let invalid = |span: Range<usize>, message: String| {
            let (line, column) = line_and_column(text, span.start);
            ConfigError::ValidateRule {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };

        let uri = match raw.uri {
            Some(uri) if uri.get_ref().trim().is_empty() => {
                return Err(invalid(uri.span(), "uri is empty".to_string()))
            }
            Some(uri) => uri.into_inner(),
            None => DEFAULT_URI.to_string(),
        };

        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for raw_rule in raw.rules {
            let rule_span = raw_rule.span();
            let raw_rule = raw_rule.into_inner();
            let name = raw_rule.name.get_ref().clone();
            if name.trim().is_empty() || name.chars().any(char::is_control) {
                return Err(invalid(
                    raw_rule.name.span(),
                    format!("rule name {name:?} must be non-empty printable text"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(
                    raw_rule.name.span(),
                    format!("duplicate rule name {name:?}"),
                ));
            }
            let matcher = build_matcher(&raw_rule, &name).map_err(|(span, m)| invalid(span, m))?;
            let vms = raw_rule.vm.get_ref().0.clone();
            if vms.is_empty() {
                return Err(invalid(
                    raw_rule.vm.span(),
                    format!("rule {name:?} has an empty vm list"),
                ));
            }
            let mut seen_vms = HashSet::new();
            for vm in &vms {
                if vm.trim().is_empty() {
                    return Err(invalid(
                        raw_rule.vm.span(),
                        format!("rule {name:?} names an empty vm"),
                    ));
                }
                if !seen_vms.insert(vm) {
                    return Err(invalid(
                        raw_rule.vm.span(),
                        format!("rule {name:?} names vm {vm:?} twice"),
                    ));
                }
            }
            let reconnect = match raw_rule.reconnect.as_ref().map(|r| r.get_ref().as_str()) {
                None | Some("id") => ReconnectMode::Id,
                Some("port") => ReconnectMode::Port,
                Some(other) => {
                    return Err(invalid(
                        raw_rule
                            .reconnect
                            .as_ref()
                            .map_or(rule_span.clone(), |r| r.span()),
                        format!(
                            "rule {name:?}: reconnect must be \"id\" or \"port\", not {other:?}"
                        ),
                    ))
                }
            };
            rules.push(Rule {
                name,
                matcher,
                vms,
                reconnect,
                line: line_and_column(text, rule_span.start).0,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            uri,
            rules,
        })
    }

    /// The first rule that matches, as in USBGuard: order in the file is priority.
    pub fn first_match(&self, device: &UsbDevice) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(device))
    }

    /// A config with these rules and no file, for tests and benchmarks.
    pub fn from_rules(rules: Vec<Rule>) -> Config {
        Config {
            path: PathBuf::from("<memory>"),
            uri: DEFAULT_URI.to_string(),
            rules,
        }
    }
}

type SpannedError = (Range<usize>, String);

fn build_matcher(raw: &RawRule, name: &str) -> Result<Matcher, SpannedError> {
    let mut matcher = Matcher::default();
    if let Some(id) = &raw.id {
        if raw.vendor.is_some() || raw.product.is_some() {
            return Err((
                id.span(),
                format!("rule {name:?}: use either id or vendor/product, not both"),
            ));
        }
        let (vendor, product) = id.get_ref().split_once(':').ok_or_else(|| {
            (
                id.span(),
                format!(
                    "rule {name:?}: id {:?} must be vendor:product, e.g. \"046d:c52b\"",
                    id.get_ref()
                ),
            )
        })?;
        matcher.vendor_id = parse_hex16(vendor).map_err(|m| (id.span(), rule_message(name, m)))?;
        matcher.product_id =
            parse_hex16(product).map_err(|m| (id.span(), rule_message(name, m)))?;
    }
    if let Some(vendor) = &raw.vendor {
        matcher.vendor_id =
            parse_hex16(vendor.get_ref()).map_err(|m| (vendor.span(), rule_message(name, m)))?;
    }
    if let Some(product) = &raw.product {
        matcher.product_id =
            parse_hex16(product.get_ref()).map_err(|m| (product.span(), rule_message(name, m)))?;
    }
    if let Some(serial) = &raw.serial {
        if serial.get_ref().is_empty() {
            return Err((serial.span(), format!("rule {name:?}: serial is empty")));
        }
        matcher.serial = Some(serial.get_ref().clone());
    }
    if let Some(port) = &raw.port {
        if !is_port_path(port.get_ref()) {
            return Err((
                port.span(),
                format!(
                    "rule {name:?}: port {:?} is not a kernel port path such as \"1-2.3\"",
                    port.get_ref()
                ),
            ));
        }
        matcher.port = Some(port.get_ref().clone());
    }
    if let Some(hub) = &raw.hub {
        let hub_name = hub.get_ref();
        if !is_usb_device_name(hub_name) {
            return Err((
                hub.span(),
                format!(
                    "rule {name:?}: hub {hub_name:?} is not a hub's kernel name such as \"1-2\" or \"usb1\""
                ),
            ));
        }
        matcher.hub = Some(hub_name.clone());
    }
    if let Some(class) = &raw.class {
        matcher.class =
            Some(parse_class(class.get_ref()).map_err(|m| (class.span(), rule_message(name, m)))?);
    }
    let has_key = raw.id.is_some()
        || raw.vendor.is_some()
        || raw.product.is_some()
        || raw.serial.is_some()
        || raw.port.is_some()
        || raw.hub.is_some()
        || raw.class.is_some();
    if !has_key {
        return Err((
            raw.name.span(),
            format!(
                "rule {name:?} matches nothing: give it id, vendor, product, serial, port, hub or class"
            ),
        ));
    }
    Ok(matcher)
}

fn rule_message(name: &str, message: String) -> String {
    format!("rule {name:?}: {message}")
}

/// A 16-bit hex ID (`046d`, `0x046d`, `46d`), or `*` for any.
fn parse_hex16(text: &str) -> Result<Option<u16>, String> {
    if text == "*" {
        return Ok(None);
    }
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not a hex USB ID (1 to 4 hex digits, or *)"
        ));
    }
    u16::from_str_radix(digits, 16)
        .map(Some)
        .map_err(|_| format!("{text:?} is not a hex USB ID"))
}

/// `03`, `03:01`, `03:01:01`, with `*` for any part.
fn parse_class(text: &str) -> Result<ClassPattern, String> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() > 3 {
        return Err(format!(
            "class {text:?} has more than class:subclass:protocol"
        ));
    }
    let mut values = [None; 3];
    for (index, part) in parts.iter().enumerate() {
        values[index] = if *part == "*" {
            None
        } else if !part.is_empty() && part.len() <= 2 && part.bytes().all(|b| b.is_ascii_hexdigit())
        {
            Some(u8::from_str_radix(part, 16).map_err(|_| format!("class {text:?} is not hex"))?)
        } else {
            return Err(format!(
                "class {text:?} must be hex bytes such as \"03\" or \"03:01:01\", with * for any"
            ));
        };
    }
    Ok(ClassPattern {
        class: values[0],
        subclass: values[1],
        protocol: values[2],
    })
}

/// serde's wording for the one structural mistake people make most.
fn friendlier(message: String) -> String {
    if message == "invalid type: map, expected a sequence" {
        "rules are written [[rule]] (one table per rule), not [rule]".to_string()
    } else {
        message
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or("").trim().to_string()
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    uri: Option<Spanned<String>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    id: Option<Spanned<String>>,
    vendor: Option<Spanned<String>>,
    product: Option<Spanned<String>>,
    serial: Option<Spanned<String>>,
    port: Option<Spanned<String>>,
    hub: Option<Spanned<String>>,
    class: Option<Spanned<String>>,
    vm: Spanned<VmList>,
    reconnect: Option<Spanned<String>>,
}

/// `vm = "a"` or `vm = ["a", "b"]`.
struct VmList(Vec<String>);

impl<'de> Deserialize<'de> for VmList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VmListVisitor;
        impl<'de> Visitor<'de> for VmListVisitor {
            type Value = VmList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a vm name or a list of vm names")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<VmList, E> {
                Ok(VmList(vec![value.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<VmList, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(VmList(names))
            }
        }
        deserializer.deserialize_any(VmListVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices::device;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn error_at(text: &str) -> (usize, usize, String) {
        let error = parse(text).expect_err("must fail");
        let (line, column) = error.location().expect("has a location");
        (line, column, error.to_string())
    }

    #[test]
    fn parses_every_key() {
        let config = parse(
            r#"
uri = "qemu+ssh://host/system"
[[rule]]
name = "receiver"
id = "046d:c52b"
serial = "ABC"
port = "1-2.3"
hub = "1-2"
class = "03:*:01"
vm = ["win11", "fedora"]
reconnect = "port"
"#,
        )
        .unwrap();
        assert_eq!(config.uri, "qemu+ssh://host/system");
        let rule = &config.rules[0];
        assert_eq!(rule.matcher.vendor_id, Some(0x046d));
        assert_eq!(rule.matcher.product_id, Some(0xc52b));
        assert_eq!(rule.vms, ["win11", "fedora"]);
        assert_eq!(rule.reconnect, ReconnectMode::Port);
        assert_eq!(rule.line, 3);
        assert_eq!(
            rule.matcher.class,
            Some(ClassPattern {
                class: Some(3),
                subclass: None,
                protocol: Some(1)
            })
        );
    }

    #[test]
    fn default_uri_and_single_vm() {
        let config = parse("[[rule]]\nname = \"a\"\nvendor = \"0x46D\"\nvm = \"x\"\n").unwrap();
        assert_eq!(config.uri, DEFAULT_URI);
        assert_eq!(config.rules[0].vms, ["x"]);
        assert_eq!(config.rules[0].matcher.vendor_id, Some(0x046d));
        assert_eq!(config.rules[0].matcher.product_id, None);
    }

    #[test]
    fn errors_point_at_the_offending_value() {
        let (line, column, message) =
            error_at("[[rule]]\nname = \"a\"\nid = \"046d:zz\"\nvm = \"x\"\n");
        assert_eq!((line, column), (3, 6));
        assert!(
            message.starts_with("test.toml:3:6: rule \"a\""),
            "{message}"
        );

        let (line, _, message) =
            error_at("[[rule]]\nname = \"a\"\nid = \"046d:1\"\nbogus = 1\nvm = \"x\"\n");
        assert_eq!(line, 4);
        assert!(message.contains("unknown field `bogus`"), "{message}");

        let (line, column, message) = error_at(
            "[[rule]]\nname = \"a\"\nid = \"1:1\"\nvm = \"x\"\n[[rule]]\nname = \"a\"\nid = \"1:2\"\nvm = \"y\"\n",
        );
        assert_eq!((line, column), (6, 8));
        assert!(message.contains("duplicate rule name"), "{message}");

        let (line, _, message) = error_at("[[rule]]\nname = \"a\"\nid = \"1:1\"\nvm = []\n");
        assert_eq!(line, 4);
        assert!(message.contains("empty vm list"), "{message}");
    }

    #[test]
    fn error_messages_have_no_trailing_period_or_newline() {
        for text in [
            "[[rule]]\nname = \"a\"\nid = \"1:1\"\n",
            "[[rule]]\nname = \"a\"\nport = \"x\"\nvm = \"v\"\n",
            "uri = 3\n",
            "[[rule]\n",
        ] {
            let message = parse(text).unwrap_err().to_string();
            assert!(!message.ends_with('.'), "{message}");
            assert!(!message.contains('\n'), "{message}");
        }
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
        hub.device_class = HUB_CLASS_FOR_TEST;
        assert!(!rule("id = \"*:*\"").matches(&hub), "hubs never match");

        let mut storage = device(1, 7, 0x0781, 0x5567, "1-4");
        storage.device_class = 0x08;
        assert!(
            rule("class = \"08\"").matches(&storage),
            "device-level class"
        );
    }

    const HUB_CLASS_FOR_TEST: u8 = crate::model::HUB_CLASS;

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

    #[test]
    fn default_config_text_is_valid() {
        let config = parse(DEFAULT_CONFIG_TEXT).unwrap();
        assert!(config.rules.is_empty());
    }

    #[test]
    fn line_and_column_counts_characters() {
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_and_column("é\nx", 3), (2, 1));
        assert_eq!(line_and_column("éx", 2), (1, 2));
    }
}
