//! The hostdev alias, usbpass's mark of ownership: how it is formatted, parsed back,
//! checked against libvirt's rules for user aliases, and what it says about who
//! attached a hostdev. The one home of the `ua-usbpass-` prefix.
//!
//! A `HostdevAlias` can only hold an alias usbpass made (or could have made): the type
//! is what keeps the daemon and the CLI from ever detaching a hostdev they did not
//! create, since detach takes nothing else.

use crate::model::{BusAddress, UsbDevice, UsbId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// libvirt keeps an alias set by the user only with this prefix.
const LIBVIRT_USER_ALIAS_PREFIX: &str = "ua-";
/// Prefix of every user alias usbpass gives a hostdev.
pub const ALIAS_PREFIX: &str = "ua-usbpass-";
/// Prefix of hostdevs that `usbpass attach` placed by hand: the daemon keeps them where
/// they are and only removes them once their device is gone.
pub const MANUAL_ALIAS_PREFIX: &str = "ua-usbpass-manual-";

/// Who created a hostdev, read from its alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ownership {
    /// Attached by the daemon following the rules.
    Rules,
    /// Attached by `usbpass attach`.
    Manual,
    /// Anything else: never touched.
    Foreign,
}

impl Ownership {
    /// Who made the hostdev with this alias (`None`: a hostdev without one).
    pub fn of_alias(alias: Option<&str>) -> Ownership {
        alias
            .and_then(|alias| HostdevAlias::parse(alias).ok())
            .map_or(Ownership::Foreign, |alias| alias.ownership())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    #[error("invalid hostdev alias {alias:?}: {reason}")]
    Parse { alias: String, reason: &'static str },
}

/// An alias usbpass owns: `ua-usbpass-<bus>-<dev>-<vid>-<pid>` (daemon) or
/// `ua-usbpass-manual-...` (`usbpass attach`), or any other `ua-usbpass-` name libvirt
/// would keep. It carries the bus address and ID so that a stale hostdev is recognised
/// even when libvirt's XML lacks `<address>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostdevAlias(String);

impl HostdevAlias {
    /// The alias the daemon gives a device's hostdev when a rule sends it to a VM.
    pub fn for_rules(device: &UsbDevice) -> HostdevAlias {
        HostdevAlias(format!("{ALIAS_PREFIX}{}", Self::suffix(device)))
    }

    /// The alias `usbpass attach` gives a hand-placed hostdev.
    pub fn for_manual(device: &UsbDevice) -> HostdevAlias {
        HostdevAlias(format!("{MANUAL_ALIAS_PREFIX}{}", Self::suffix(device)))
    }

    fn suffix(device: &UsbDevice) -> String {
        format!(
            "{}-{}-{:04x}-{:04x}",
            device.bus, device.devnum, device.vendor_id, device.product_id
        )
    }

    /// Accepts an alias that is usbpass's (the prefix and a name after it) and that
    /// libvirt keeps as a user alias (`ua-` then only `[A-Za-z0-9_-]`).
    pub fn parse(alias: &str) -> Result<HostdevAlias, AliasError> {
        let invalid = |reason| {
            Err(AliasError::Parse {
                alias: alias.to_string(),
                reason,
            })
        };
        let Some(rest) = alias.strip_prefix(LIBVIRT_USER_ALIAS_PREFIX) else {
            return invalid("libvirt keeps only user aliases that start with ua-");
        };
        if alias.len() <= ALIAS_PREFIX.len() || !alias.starts_with(ALIAS_PREFIX) {
            return invalid("usbpass aliases are ua-usbpass- followed by a name");
        }
        if !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return invalid("libvirt allows only letters, digits, _ and - after ua-");
        }
        Ok(HostdevAlias(alias.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn ownership(&self) -> Ownership {
        if self.0.starts_with(MANUAL_ALIAS_PREFIX) {
            Ownership::Manual
        } else {
            Ownership::Rules
        }
    }

    /// The bus address and ID that `for_rules` or `for_manual` wrote into the alias;
    /// `None` for an owned alias of another shape.
    pub fn target(&self) -> Option<(BusAddress, UsbId)> {
        let rest = self
            .0
            .strip_prefix(MANUAL_ALIAS_PREFIX)
            .or_else(|| self.0.strip_prefix(ALIAS_PREFIX))?;
        let mut parts = rest.split('-');
        let bus = parts.next()?.parse().ok()?;
        let device = parts.next()?.parse().ok()?;
        let vendor = u16::from_str_radix(parts.next()?, 16).ok()?;
        let product = u16::from_str_radix(parts.next()?, 16).ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some((BusAddress { bus, device }, UsbId { vendor, product }))
    }
}

impl fmt::Display for HostdevAlias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for HostdevAlias {
    type Error = AliasError;

    fn try_from(alias: String) -> Result<Self, Self::Error> {
        HostdevAlias::parse(&alias)
    }
}

impl From<HostdevAlias> for String {
    fn from(alias: HostdevAlias) -> String {
        alias.0
    }
}

impl PartialEq<str> for HostdevAlias {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for HostdevAlias {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices::device;

    #[test]
    fn aliases_round_trip_and_reject_foreign_shapes() {
        let device = device(3, 127, 0x046d, 0xc52b, "3-1");
        let expected = (device.address(), device.id());
        assert_eq!(HostdevAlias::for_rules(&device).target(), Some(expected));
        assert_eq!(HostdevAlias::for_manual(&device).target(), Some(expected));
        for alias in [
            "hostdev0",
            "ua-usbpass-",
            "ua-usbpass-1-2-3",
            "ua-usbpass-1-2-zz-1",
            "ua-usbpass-1-2-3-4-5",
        ] {
            assert_eq!(
                HostdevAlias::parse(alias).ok().and_then(|a| a.target()),
                None,
                "{alias}"
            );
        }
        // libvirt user aliases allow only these characters.
        assert!(HostdevAlias::for_rules(&device)
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn rejects_aliases_libvirt_would_not_keep_or_that_are_not_ours() {
        for alias in [
            "",
            "ua-",
            "ua-usbpass-",
            "hostdev0",
            "usb-usbpass-1",
            "ua-other-1",
            "ua-usbpass-a b",
            "ua-usbpass-a.b",
            "ua-usbpass-a:b",
            "ua-usbpass-'\"<>&",
            "ua-usbpass-\u{fffd}",
            "ua-usbpass-é",
            "ua-usbpass-a\n",
        ] {
            let result = HostdevAlias::parse(alias);
            assert!(
                matches!(result, Err(AliasError::Parse { .. })),
                "{alias:?} gave {result:?}"
            );
        }
        for alias in ["ua-usbpass-1", "ua-usbpass-manual-1-5", "ua-usbpass-A_z-09"] {
            HostdevAlias::parse(alias).unwrap();
        }
    }

    #[test]
    fn invalid_alias_error_is_one_line_and_names_the_alias() {
        let message = HostdevAlias::parse("ua-usbpass-a\nb")
            .unwrap_err()
            .to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("ua-usbpass-a\\nb"), "{message}");
    }

    #[test]
    fn ownership_comes_from_the_prefix() {
        assert_eq!(
            Ownership::of_alias(Some("ua-usbpass-1-5-046d-c52b")),
            Ownership::Rules
        );
        assert_eq!(
            Ownership::of_alias(Some("ua-usbpass-manual-1-5-046d-c52b")),
            Ownership::Manual
        );
        for foreign in [Some("hostdev0"), Some("usb"), Some("ua-other"), None] {
            assert_eq!(Ownership::of_alias(foreign), Ownership::Foreign);
        }
    }

    #[test]
    fn serializes_as_the_plain_string_and_refuses_foreign_ones() {
        let alias = HostdevAlias::parse("ua-usbpass-1-5-046d-c52b").unwrap();
        let json = serde_json::to_string(&alias).unwrap();
        assert_eq!(json, "\"ua-usbpass-1-5-046d-c52b\"");
        assert_eq!(serde_json::from_str::<HostdevAlias>(&json).unwrap(), alias);
        assert!(serde_json::from_str::<HostdevAlias>("\"hostdev0\"").is_err());
    }
}
