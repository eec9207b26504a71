//! Edits the rules file for `usbpass assign` and `unassign` with `toml_edit`, keeping
//! comments, formatting and rule order, and validating the result before it is written.

use crate::model::UsbDevice;
use crate::rules::{Config, ConfigError};
use std::path::Path;
use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table, Value};

#[derive(Debug, thiserror::Error)]
pub enum RulesEditError {
    #[error("{path}:{line}:{column}: cannot edit: {message}")]
    ParseDocument {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: `rule` must be an array of tables ([[rule]])")]
    RuleKeyShape { path: String },
    #[error("device {device} has no serial; assign it --by id or --by port")]
    NoSerial { device: String },
    #[error("no rule is named {name:?} in {path}")]
    NoSuchRule { name: String, path: String },
    #[error("no rule in {path} matches device {device}")]
    NoMatchingRule { device: String, path: String },
    #[error(
        "rule {rule:?} also matches {others}; name the rule to remove it: usbpass unassign {rule}"
    )]
    RuleIsShared { rule: String, others: String },
    #[error(transparent)]
    LoadCurrent { source: ConfigError },
    #[error("the edited rules would not load: {source}")]
    ValidateEdit {
        #[source]
        source: ConfigError,
    },
}

/// Which of a device's properties a new rule matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AssignBy {
    /// vendor:product: any device of this model.
    Id,
    /// vendor:product and serial: this one device.
    Serial,
    /// The physical port: whatever is plugged there.
    Port,
}

/// The result of an edit: the new file text and what changed, for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub text: String,
    pub rule: String,
    pub summary: String,
}

fn parse_document(text: &str, path: &Path) -> Result<DocumentMut, RulesEditError> {
    text.parse::<DocumentMut>().map_err(|error| {
        let (line, column) = error.span().map_or((1, 1), |span| {
            crate::rules::line_and_column(text, span.start)
        });
        RulesEditError::ParseDocument {
            path: path.display().to_string(),
            line,
            column,
            message: error
                .message()
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        }
    })
}

/// The `[[rule]]` array, created when the file has none.
fn rules_mut<'a>(
    document: &'a mut DocumentMut,
    path: &Path,
) -> Result<&'a mut ArrayOfTables, RulesEditError> {
    let item = document
        .entry("rule")
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    item.as_array_of_tables_mut()
        .ok_or_else(|| RulesEditError::RuleKeyShape {
            path: path.display().to_string(),
        })
}

fn matcher_keys(
    device: &UsbDevice,
    by: AssignBy,
) -> Result<Vec<(&'static str, String)>, RulesEditError> {
    let id = format!("{:04x}:{:04x}", device.vendor_id, device.product_id);
    Ok(match by {
        AssignBy::Id => vec![("id", id)],
        AssignBy::Serial => {
            let serial = device
                .serial
                .clone()
                .filter(|serial| !serial.is_empty())
                .ok_or_else(|| RulesEditError::NoSerial {
                    device: device.to_string(),
                })?;
            vec![("id", id), ("serial", serial)]
        }
        AssignBy::Port => vec![("port", device.port_path.clone())],
    })
}

const MATCH_KEYS: [&str; 8] = [
    "id",
    "vendor",
    "product",
    "serial",
    "port",
    "hub",
    "class",
    "reconnect",
];

/// True when the table's match keys are exactly `keys`.
fn has_exactly(table: &Table, keys: &[(&str, String)]) -> bool {
    let present: Vec<&str> = MATCH_KEYS
        .iter()
        .copied()
        .filter(|key| *key != "reconnect" && table.contains_key(key))
        .collect();
    present.len() == keys.len()
        && keys
            .iter()
            .all(|(key, wanted)| table.get(key).and_then(Item::as_str) == Some(wanted.as_str()))
}

fn vm_names(table: &Table) -> Vec<String> {
    match table.get("vm") {
        Some(item) if item.is_str() => vec![item.as_str().unwrap_or_default().to_string()],
        Some(item) => item
            .as_array()
            .map(|array| {
                array
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    }
}

fn vm_item(names: &[String]) -> Item {
    if names.len() == 1 {
        value(names[0].as_str())
    } else {
        let mut array = Array::new();
        for name in names {
            array.push(name.as_str());
        }
        Item::Value(Value::Array(array))
    }
}

/// A rule name from the device: its model name, else its ID, made unique.
fn new_rule_name(device: &UsbDevice, by: AssignBy, taken: &[String]) -> String {
    let base: String = {
        let name = device.display_name();
        let source = if name.is_empty() {
            format!("{:04x}-{:04x}", device.vendor_id, device.product_id)
        } else {
            name
        };
        let mut slug = String::new();
        for character in source.chars() {
            if character.is_ascii_alphanumeric() {
                slug.push(character.to_ascii_lowercase());
            } else if !slug.ends_with('-') {
                slug.push('-');
            }
        }
        let slug = slug.trim_matches('-').chars().take(40).collect::<String>();
        let slug = if slug.is_empty() {
            "device".to_string()
        } else {
            slug
        };
        match by {
            AssignBy::Id => slug,
            AssignBy::Serial => format!("{slug}-serial"),
            AssignBy::Port => format!("port-{}", device.port_path),
        }
    };
    if !taken.contains(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|candidate| !taken.contains(candidate))
        .expect("an unused name exists")
}

fn validate(text: &str, path: &Path) -> Result<Config, RulesEditError> {
    Config::parse(text, path).map_err(|source| RulesEditError::ValidateEdit { source })
}

/// Send `device` to `vm`. A rule with exactly the same match keys gets `vm` as its
/// first choice (its other VMs stay as fallbacks); otherwise a new rule is inserted
/// just before the first rule that matches the device today, so that it takes effect.
pub fn assign(
    text: &str,
    path: &Path,
    device: &UsbDevice,
    vm: &str,
    by: AssignBy,
) -> Result<Edit, RulesEditError> {
    let current =
        Config::parse(text, path).map_err(|source| RulesEditError::LoadCurrent { source })?;
    let keys = matcher_keys(device, by)?;
    // What the message calls the device: one that is not plugged in is only its ID or
    // its port.
    let device_text = match (device.syspath.is_empty(), by) {
        (false, _) => device.to_string(),
        (true, AssignBy::Port) => format!("whatever is plugged into port {}", device.port_path),
        (true, _) => format!("any {} device", device.id()),
    };
    let mut document = parse_document(text, path)?;
    let rules = rules_mut(&mut document, path)?;

    let existing = rules.iter().position(|table| has_exactly(table, &keys));
    let (rule, summary) = if let Some(index) = existing {
        let table = rules.get_mut(index).expect("index from position");
        let mut names = vm_names(table);
        names.retain(|name| name != vm);
        names.insert(0, vm.to_string());
        table.insert("vm", vm_item(&names));
        let rule = table
            .get("name")
            .and_then(Item::as_str)
            .unwrap_or_default()
            .to_string();
        let summary = format!(
            "rule {rule:?} now sends {device_text} to {}",
            names.join(", then ")
        );
        (rule, summary)
    } else {
        let taken: Vec<String> = current.rules.iter().map(|r| r.name.clone()).collect();
        let rule = new_rule_name(device, by, &taken);
        let mut table = Table::new();
        table.insert("name", value(rule.as_str()));
        for (key, text) in &keys {
            table.insert(key, value(text.as_str()));
        }
        table.insert("vm", value(vm));
        let insert_at = current.rules.iter().position(|r| r.matches(device));
        let mut tables: Vec<Table> = rules.iter().cloned().collect();
        tables.insert(insert_at.unwrap_or(tables.len()), table);
        rules.clear();
        for table in tables {
            rules.push(table);
        }
        let summary = format!("new rule {rule:?} sends {device_text} to {vm}");
        (rule, summary)
    };
    let text = document.to_string();
    validate(&text, path)?;
    Ok(Edit {
        text,
        rule,
        summary,
    })
}

/// What `unassign` removes: a rule by name, or the rule that matches a device.
pub enum UnassignTarget<'a> {
    Rule(&'a str),
    /// The device, and every present device (to refuse removing a shared rule).
    Device(&'a UsbDevice, &'a [UsbDevice]),
}

pub fn unassign(text: &str, path: &Path, target: UnassignTarget) -> Result<Edit, RulesEditError> {
    let current =
        Config::parse(text, path).map_err(|source| RulesEditError::LoadCurrent { source })?;
    let (name, summary) = match target {
        UnassignTarget::Rule(name) => {
            if !current.rules.iter().any(|r| r.name == name) {
                return Err(RulesEditError::NoSuchRule {
                    name: name.to_string(),
                    path: path.display().to_string(),
                });
            }
            (name.to_string(), format!("removed rule {name:?}"))
        }
        UnassignTarget::Device(device, present) => {
            let rule =
                current
                    .first_match(device)
                    .ok_or_else(|| RulesEditError::NoMatchingRule {
                        device: device.to_string(),
                        path: path.display().to_string(),
                    })?;
            let others: Vec<String> = present
                .iter()
                .filter(|other| other.syspath != device.syspath && rule.matches(other))
                .map(|other| other.to_string())
                .collect();
            if !others.is_empty() {
                return Err(RulesEditError::RuleIsShared {
                    rule: rule.name.clone(),
                    others: others.join(", "),
                });
            }
            (
                rule.name.clone(),
                format!("removed rule {:?}; {device} stays on the host", rule.name),
            )
        }
    };
    let mut document = parse_document(text, path)?;
    let rules = rules_mut(&mut document, path)?;
    rules.retain(|table| table.get("name").and_then(Item::as_str) != Some(name.as_str()));
    if rules.is_empty() {
        document.remove("rule");
    }
    let text = document.to_string();
    validate(&text, path)?;
    Ok(Edit {
        text,
        rule: name,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices::device;

    const FILE: &str = r#"# my rules
uri = "qemu:///system"

# the gaming receiver
[[rule]]
name = "receiver"   # keep this comment
id = "046d:c52b"
vm = ["win11", "fedora"]

# everything logitech
[[rule]]
name = "logitech"
id = "046d:*"
vm = "fedora"
"#;

    fn path() -> &'static Path {
        Path::new("/etc/usbpass/usbpass.toml")
    }

    fn receiver() -> UsbDevice {
        let mut receiver = device(1, 5, 0x046d, 0xc52b, "1-2");
        receiver.serial = Some("R1".into());
        receiver.product = Some("USB Receiver".into());
        receiver
    }

    #[test]
    fn assign_to_an_existing_rule_reorders_its_vms_and_keeps_comments() {
        let edit = assign(FILE, path(), &receiver(), "fedora", AssignBy::Id).unwrap();
        assert_eq!(edit.rule, "receiver");
        assert!(edit.text.contains("# the gaming receiver"));
        assert!(edit.text.contains("# keep this comment"));
        assert!(edit.text.contains("# everything logitech"));
        let config = Config::parse(&edit.text, path()).unwrap();
        assert_eq!(config.rules[0].vms, ["fedora", "win11"]);
        assert_eq!(config.rules.len(), 2);
    }

    #[test]
    fn assign_inserts_before_the_rule_that_matches_today() {
        let mouse = {
            let mut mouse = device(1, 6, 0x046d, 0xc077, "1-3");
            mouse.product = Some("M105 Optical Mouse".into());
            mouse
        };
        let edit = assign(FILE, path(), &mouse, "lab", AssignBy::Id).unwrap();
        assert_eq!(edit.rule, "m105-optical-mouse");
        let config = Config::parse(&edit.text, path()).unwrap();
        let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["receiver", "m105-optical-mouse", "logitech"]);
        assert_eq!(config.first_match(&mouse).unwrap().vms, ["lab"]);
        assert!(edit.text.contains("# everything logitech"));
    }

    #[test]
    fn assign_by_serial_and_port() {
        let edit = assign(FILE, path(), &receiver(), "lab", AssignBy::Serial).unwrap();
        let config = Config::parse(&edit.text, path()).unwrap();
        assert_eq!(config.rules[0].name, "usb-receiver-serial");
        assert_eq!(config.rules[0].matcher.serial.as_deref(), Some("R1"));
        let edit = assign("", path(), &receiver(), "lab", AssignBy::Port).unwrap();
        let config = Config::parse(&edit.text, path()).unwrap();
        assert_eq!(config.rules[0].name, "port-1-2");
        assert_eq!(config.rules[0].matcher.port.as_deref(), Some("1-2"));

        let mut no_serial = receiver();
        no_serial.serial = None;
        let error = assign(FILE, path(), &no_serial, "lab", AssignBy::Serial).unwrap_err();
        assert!(error.to_string().contains("has no serial"), "{error}");
    }

    #[test]
    fn new_names_are_unique() {
        let mut other = receiver();
        other.product = Some("receiver".into());
        other.manufacturer = None;
        other.vendor_id = 0x1234;
        let edit = assign(FILE, path(), &other, "lab", AssignBy::Id).unwrap();
        assert_eq!(edit.rule, "receiver-2");
    }

    #[test]
    fn a_hostile_serial_is_quoted_not_injected() {
        let mut hostile = receiver();
        hostile.serial = Some("x\"\nvm = \"evil\"\n[[rule]]\u{fffd}".into());
        let edit = assign(FILE, path(), &hostile, "lab", AssignBy::Serial).unwrap();
        let config = Config::parse(&edit.text, path()).unwrap();
        assert_eq!(config.rules.len(), 3);
        assert_eq!(config.rules[0].matcher.serial, hostile.serial);
        assert_eq!(config.rules[0].vms, ["lab"]);
    }

    #[test]
    fn unassign_by_name_and_by_device() {
        let edit = unassign(FILE, path(), UnassignTarget::Rule("receiver")).unwrap();
        let config = Config::parse(&edit.text, path()).unwrap();
        assert_eq!(config.rules.len(), 1);
        assert!(edit.text.contains("# everything logitech"));

        let error = unassign(FILE, path(), UnassignTarget::Rule("nope")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no rule is named \"nope\" in /etc/usbpass/usbpass.toml"
        );

        let devices = [receiver()];
        let edit = unassign(FILE, path(), UnassignTarget::Device(&devices[0], &devices)).unwrap();
        assert_eq!(edit.rule, "receiver");

        // The broad rule also holds the mouse: refuse, and say how.
        let mouse = device(1, 6, 0x046d, 0xc077, "1-3");
        let devices = [mouse.clone(), device(1, 7, 0x046d, 0xc078, "1-4")];
        let error = unassign(FILE, path(), UnassignTarget::Device(&mouse, &devices)).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("rule \"logitech\" also matches 046d:c078"),
            "{error}"
        );
        let edit = unassign(&edit.text, path(), UnassignTarget::Rule("logitech")).unwrap();
        assert!(Config::parse(&edit.text, path()).unwrap().rules.is_empty());
        assert!(!edit.text.contains("[[rule]]"));
    }

    #[test]
    fn a_broken_file_is_refused_before_any_edit() {
        let error = assign(
            "[[rule]]\nname = 1\n",
            path(),
            &receiver(),
            "x",
            AssignBy::Id,
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/etc/usbpass/usbpass.toml:2:8"),
            "{error}"
        );
    }
}
