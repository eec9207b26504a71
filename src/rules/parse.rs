//! Reading the rules file: strict TOML (unknown keys refused) into `Config`, with every
//! error pointing at its file:line:column, and the validation of each rule's keys.

use super::{
    ClassPattern, Config, ConfigError, DeviceSourceSetting, GiveBack, Matcher, ReconnectMode, Rule,
    DEFAULT_URI,
};
use crate::model::port::{is_port_path, is_usb_device_name};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use toml::Spanned;

impl Config {
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
        let device_source = match raw
            .device_source
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s))
        {
            None | Some(("auto", _)) => DeviceSourceSetting::Auto,
            Some(("udev", _)) => DeviceSourceSetting::Udev,
            Some(("libvirt", _)) => DeviceSourceSetting::Libvirt,
            Some((other, spanned)) => {
                return Err(invalid(
                    spanned.span(),
                    format!(
                        "device_source must be \"auto\", \"udev\" or \"libvirt\", not {other:?}"
                    ),
                ))
            }
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
            let give_back = match raw_rule.give_back.as_ref().map(|r| r.get_ref().as_str()) {
                None | Some("at-once") => GiveBack::AtOnce,
                Some("when-free") => GiveBack::WhenFree,
                Some(other) => {
                    return Err(invalid(
                        raw_rule
                            .give_back
                            .as_ref()
                            .map_or(rule_span.clone(), |r| r.span()),
                        format!(
                        "rule {name:?}: return must be \"at-once\" or \"when-free\", not {other:?}"
                    ),
                    ))
                }
            };
            let follow_seconds = match &raw_rule.follow {
                None => None,
                Some(follow) => Some(parse_follow(follow.get_ref()).ok_or_else(|| {
                    invalid(
                        follow.span(),
                        format!(
                            "rule {name:?}: follow must be a time from 1s to 1h, like \"15s\" or \"2m\", not {:?}",
                            follow.get_ref()
                        ),
                    )
                })?),
            };
            let group = match &raw_rule.group {
                None => None,
                Some(group) => {
                    let text = group.get_ref();
                    if text.trim().is_empty()
                        || text.chars().any(|c| c.is_control() || c.is_whitespace())
                        || matches!(text.as_str(), "host" | "next")
                    {
                        return Err(invalid(
                            group.span(),
                            format!(
                                "rule {name:?}: group {text:?} must be one word, not \"host\" or \"next\""
                            ),
                        ));
                    }
                    Some(text.clone())
                }
            };
            rules.push(Rule {
                name,
                group,
                matcher,
                vms,
                reconnect,
                give_back,
                follow_seconds,
                keep_off_host: raw_rule.keep_off_host,
                line: line_and_column(text, rule_span.start).0,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            uri,
            device_source,
            keep_off_host: raw.keep_off_host.unwrap_or(false),
            rules,
        })
    }
}

/// `follow = "15s"` or `"2m"`: seconds, from 1 s to an hour.
fn parse_follow(text: &str) -> Option<u32> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let number: u32 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60)?,
        _ => return None,
    };
    (1..=3600).contains(&seconds).then_some(seconds)
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
    device_source: Option<Spanned<String>>,
    keep_off_host: Option<bool>,
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
    #[serde(rename = "return")]
    give_back: Option<Spanned<String>>,
    follow: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    keep_off_host: Option<bool>,
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
    use crate::rules::DEFAULT_CONFIG_TEXT;

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

    #[test]
    fn follow_takes_seconds_or_minutes_up_to_an_hour() {
        let rule = |follow: &str| {
            parse(&format!(
                "[[rule]]\nname = \"b\"\nid = \"0483:df11\"\nvm = \"lab\"\nfollow = \"{follow}\"\n"
            ))
        };
        assert_eq!(rule("15s").unwrap().rules[0].follow_seconds, Some(15));
        assert_eq!(rule("2m").unwrap().rules[0].follow_seconds, Some(120));
        for bad in ["0s", "2h", "61m", "15", "s", "1.5s", "-1s"] {
            let error = rule(bad).unwrap_err().to_string();
            assert_eq!(
                error,
                format!(
                    "test.toml:5:10: rule \"b\": follow must be a time from 1s to 1h, like \"15s\" or \"2m\", not {bad:?}"
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn keep_off_host_per_rule_overrides_the_file() {
        let config = parse(
            "keep_off_host = true\n\
             [[rule]]\nname = \"a\"\nid = \"1:1\"\nvm = \"v\"\n\
             [[rule]]\nname = \"b\"\nid = \"1:2\"\nvm = \"v\"\nkeep_off_host = false\n",
        )
        .unwrap();
        assert!(config.keeps_off_host(&config.rules[0]));
        assert!(!config.keeps_off_host(&config.rules[1]));
        assert!(config.keeps_any_off_host());

        let config = parse(
            "[[rule]]\nname = \"a\"\nid = \"1:1\"\nvm = \"v\"\n\
             [[rule]]\nname = \"b\"\nid = \"1:2\"\nvm = \"v\"\nkeep_off_host = true\n",
        )
        .unwrap();
        assert!(!config.keeps_off_host(&config.rules[0]));
        assert!(config.keeps_off_host(&config.rules[1]));
        assert!(!parse("[[rule]]\nname = \"a\"\nid = \"1:1\"\nvm = \"v\"\n")
            .unwrap()
            .keeps_any_off_host());
        let error = parse("keep_off_host = \"yes\"\n").unwrap_err().to_string();
        assert!(error.starts_with("test.toml:1:17:"), "{error}");
    }
}
