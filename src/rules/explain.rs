//! Why a rule does or does not match a device, key by key, for `usbpass why`. Pure: the
//! same matching as `Matcher::matches`, told as the first key that did not fit.

use super::{ClassPattern, Config, Matcher, Rule};
use crate::model::UsbDevice;
use serde::Serialize;

/// One rule's answer for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum RuleVerdict {
    /// The first rule that matches: it decides.
    Decides,
    /// It matches too, but an earlier rule decided.
    MatchesButNotReached,
    /// This key did not fit.
    Mismatch {
        key: &'static str,
        wanted: String,
        found: String,
    },
    /// It would match once the device's strings are read (a plug just announced).
    WaitsForStrings,
    /// Hubs never match any rule.
    Hub,
}

/// Each rule of `config` in order, with its verdict for `device`.
pub fn explain<'a>(config: &'a Config, device: &UsbDevice) -> Vec<(&'a Rule, RuleVerdict)> {
    let mut decided = false;
    config
        .rules
        .iter()
        .map(|rule| {
            let verdict = if device.is_hub() {
                RuleVerdict::Hub
            } else if let Some(mismatch) = first_mismatch(&rule.matcher, device) {
                mismatch
            } else if decided {
                RuleVerdict::MatchesButNotReached
            } else {
                decided = true;
                RuleVerdict::Decides
            };
            (rule, verdict)
        })
        .collect()
}

fn hex4_or_any(value: Option<u16>) -> String {
    value.map_or("*".to_string(), |value| format!("{value:04x}"))
}

/// The first key of `matcher` that `device` does not fit, in the order the rules file
/// documents them.
fn first_mismatch(matcher: &Matcher, device: &UsbDevice) -> Option<RuleVerdict> {
    let mismatch =
        |key, wanted: String, found: String| Some(RuleVerdict::Mismatch { key, wanted, found });
    if matcher.vendor_id.is_some_and(|v| v != device.vendor_id)
        || matcher.product_id.is_some_and(|p| p != device.product_id)
    {
        return mismatch(
            "id",
            format!(
                "{}:{}",
                hex4_or_any(matcher.vendor_id),
                hex4_or_any(matcher.product_id)
            ),
            device.id().to_string(),
        );
    }
    if let Some(serial) = &matcher.serial {
        if device.strings_pending {
            return Some(RuleVerdict::WaitsForStrings);
        }
        if device.serial.as_deref() != Some(serial.as_str()) {
            return mismatch(
                "serial",
                serial.clone(),
                device
                    .serial
                    .clone()
                    .unwrap_or_else(|| "(the device has none)".to_string()),
            );
        }
    }
    if let Some(port) = &matcher.port {
        if *port != device.port_path {
            return mismatch("port", port.clone(), device.port_path.clone());
        }
    }
    if let Some(hub) = &matcher.hub {
        if !super::is_below_hub(device, hub) {
            return mismatch(
                "hub",
                format!("below {hub}"),
                format!(
                    "port {} on bus {}, below {}",
                    device.port_path,
                    device.bus,
                    device.parent_hub.as_deref().unwrap_or("(unknown)")
                ),
            );
        }
    }
    if let Some(class) = &matcher.class {
        if !class.matches(device) {
            return mismatch("class", class.to_string(), classes_of(device));
        }
    }
    None
}

fn classes_of(device: &UsbDevice) -> String {
    let interfaces: Vec<String> = device
        .interface_classes
        .iter()
        .map(|interface| {
            ClassPattern {
                class: Some(interface.class),
                subclass: Some(interface.subclass),
                protocol: Some(interface.protocol),
            }
            .to_string()
        })
        .collect();
    format!(
        "device class {:02x}, interfaces {}",
        device.device_class,
        if interfaces.is_empty() {
            "(none known)".to_string()
        } else {
            interfaces.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InterfaceClass;
    use crate::testing::devices::device;
    use std::path::Path;

    const RULES: &str = r#"
[[rule]]
name = "zigbee"
id = "10c4:ea60"
vm = "ha"

[[rule]]
name = "stick"
id = "046d:c52b"
serial = "A1"
vm = "lab"

[[rule]]
name = "front"
port = "1-4"
vm = "lab"

[[rule]]
name = "second-hub"
hub = "1-3"
vm = "lab"

[[rule]]
name = "keyboards"
class = "03:01:01"
vm = "win11"

[[rule]]
name = "any-logitech"
id = "046d:*"
vm = "win11"

[[rule]]
name = "also-logitech"
vendor = "046d"
vm = "fedora"
"#;

    fn verdicts(device: &UsbDevice) -> Vec<(String, RuleVerdict)> {
        let config = Config::parse(RULES, Path::new("rules.toml")).unwrap();
        explain(&config, device)
            .into_iter()
            .map(|(rule, verdict)| (rule.name.clone(), verdict))
            .collect()
    }

    #[test]
    fn each_rule_says_its_first_key_that_did_not_fit_and_the_first_match_decides() {
        let mut receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        receiver.serial = Some("B2".into());
        receiver.interface_classes = vec![InterfaceClass {
            class: 3,
            subclass: 1,
            protocol: 2,
        }];
        let verdicts = verdicts(&receiver);
        let mismatch = |key, wanted: &str, found: &str| RuleVerdict::Mismatch {
            key,
            wanted: wanted.into(),
            found: found.into(),
        };
        assert_eq!(verdicts[0].1, mismatch("id", "10c4:ea60", "046d:c52b"));
        assert_eq!(verdicts[1].1, mismatch("serial", "A1", "B2"));
        assert_eq!(verdicts[2].1, mismatch("port", "1-4", "1-2"));
        assert_eq!(
            verdicts[3].1,
            mismatch("hub", "below 1-3", "port 1-2 on bus 1, below usb1")
        );
        assert_eq!(
            verdicts[4].1,
            mismatch("class", "03:01:01", "device class 00, interfaces 03:01:02")
        );
        assert_eq!(verdicts[5].1, RuleVerdict::Decides);
        assert_eq!(verdicts[6].1, RuleVerdict::MatchesButNotReached);
    }

    #[test]
    fn the_verdicts_agree_with_first_match_for_every_rule() {
        let config = Config::parse(RULES, Path::new("rules.toml")).unwrap();
        let mut devices = vec![
            device(1, 2, 0x10c4, 0xea60, "1-4"),
            device(1, 3, 0x046d, 0xc52b, "1-3.2"),
            device(2, 3, 0x1234, 0x5678, "2-1"),
        ];
        devices[1].serial = Some("A1".into());
        for device in &devices {
            let decided: Vec<&str> = explain(&config, device)
                .into_iter()
                .filter(|(_, verdict)| *verdict == RuleVerdict::Decides)
                .map(|(rule, _)| rule.name.as_str())
                .collect();
            assert_eq!(
                decided,
                config
                    .first_match(device)
                    .map(|rule| rule.name.as_str())
                    .into_iter()
                    .collect::<Vec<_>>(),
                "{device}"
            );
            for (rule, verdict) in explain(&config, device) {
                let matches = matches!(
                    verdict,
                    RuleVerdict::Decides | RuleVerdict::MatchesButNotReached
                );
                assert_eq!(matches, rule.matches(device), "{} on {device}", rule.name);
            }
        }
    }

    #[test]
    fn hubs_and_unread_strings_are_said_as_such() {
        let mut hub = device(1, 2, 0x05e3, 0x0610, "1-3");
        hub.device_class = 9;
        assert!(verdicts(&hub)
            .iter()
            .all(|(_, verdict)| *verdict == RuleVerdict::Hub));
        let mut pending = device(1, 5, 0x046d, 0xc52b, "1-2");
        pending.strings_pending = true;
        assert_eq!(verdicts(&pending)[1].1, RuleVerdict::WaitsForStrings);
    }
}
