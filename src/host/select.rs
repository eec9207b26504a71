//! Whose USB devices the daemon and the CLI read: this machine's, through udev, or the
//! libvirt host's, through libvirt's node devices. A hostdev names a bus and device
//! number on the host libvirt runs on, so when the uri reaches another machine, local
//! udev would name the wrong device. Pure: the rules file's `device_source` and its uri
//! decide, and what the chosen source cannot tell refuses the rules that need it.

use crate::rules::{Config, DeviceSourceSetting};
use std::fmt;

/// Where devices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// This machine's udev and sysfs.
    Udev,
    /// libvirt's node devices at the rules file's uri.
    Libvirt,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Udev => "udev",
            SourceKind::Libvirt => "libvirt's node devices",
        })
    }
}

/// The source for a rules file: `udev` and `libvirt` as the file says; `auto` (the
/// default) picks udev only when `devices_are_local(uri)`.
pub fn choose(setting: DeviceSourceSetting, uri: &str) -> SourceKind {
    match setting {
        DeviceSourceSetting::Udev => SourceKind::Udev,
        DeviceSourceSetting::Libvirt => SourceKind::Libvirt,
        DeviceSourceSetting::Auto if devices_are_local(uri) => SourceKind::Udev,
        DeviceSourceSetting::Auto => SourceKind::Libvirt,
    }
}

/// Whether libvirt at `uri` runs on this machine, so that its bus and device numbers
/// are this machine's. A libvirt uri is `driver[+transport]://[user@][host][:port]/path[?query]`.
/// Local: the transport is none or `unix`, and the host is empty, `localhost`,
/// `127.0.0.1` or `[::1]` (without a transport a host means TLS to it, and these name
/// this machine). Everything else is not: `ssh`, `libssh`, `libssh2`, `tcp`, `tls`
/// (even to localhost: a tunnel or a forwarded port can lead anywhere) and `ext` (a
/// command of the user's choosing), any other host, and whatever does not parse.
pub fn devices_are_local(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let (driver, transport) = match scheme.split_once('+') {
        Some((driver, transport)) => (driver, Some(transport)),
        None => (scheme, None),
    };
    if driver.is_empty() || !matches!(transport, None | Some("unix")) {
        return false;
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_and_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host_and_port.strip_prefix('[') {
        // An IPv6 literal, `[::1]:port`.
        Some(bracketed) => match bracketed.split_once(']') {
            Some((address, _port)) => return address == "::1",
            None => return false,
        },
        None => host_and_port
            .split_once(':')
            .map_or(host_and_port, |(host, _port)| host),
    };
    matches!(host, "" | "localhost" | "127.0.0.1")
}

/// Why a rules file cannot be served by the chosen source: one line naming the file,
/// the rule and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path}:{line}: rule {rule:?} matches by {key}, which {source_name} do not report for {uri}"
)]
pub struct RuleNeedsWhatSourceLacks {
    pub path: String,
    pub line: usize,
    pub rule: String,
    pub key: &'static str,
    pub source_name: &'static str,
    pub uri: String,
}

/// The rules `kind` cannot serve. libvirt's node devices carry no serial number, so a
/// rule that matches by serial could never match there (or, worse, a rule after it would
/// take the device): refused, the first such rule named. Everything else a rule can say
/// (IDs, port, hub, interface class) they report.
pub fn check_rules(config: &Config, kind: SourceKind) -> Result<(), RuleNeedsWhatSourceLacks> {
    if kind == SourceKind::Udev {
        return Ok(());
    }
    match config
        .rules
        .iter()
        .find(|rule| rule.matcher.serial.is_some())
    {
        Some(rule) => Err(RuleNeedsWhatSourceLacks {
            path: config.path.display().to_string(),
            line: rule.line,
            rule: rule.name.clone(),
            key: "serial",
            source_name: "libvirt's node devices",
            uri: config.uri.clone(),
        }),
        None => Ok(()),
    }
}

/// Why a running source refuses a rules file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceRefusal {
    #[error(transparent)]
    RuleNeedsWhatSourceLacks(#[from] RuleNeedsWhatSourceLacks),
    /// The file now selects another source, or libvirt at another uri: the running
    /// source and its watcher cannot become another one in place.
    #[error("{path}: these rules read usb devices from {wanted}, but the daemon reads them from {running}; restart usbpass to switch")]
    SourceChanged {
        path: String,
        wanted: String,
        running: String,
    },
}

/// Whether a source of `kind`, reading from libvirt at `source_uri` when it is
/// libvirt's, can serve `config`: the same choice, and no rule it cannot serve.
pub fn accepts(config: &Config, kind: SourceKind, source_uri: &str) -> Result<(), SourceRefusal> {
    let wanted = choose(config.device_source, &config.uri);
    let describe = |kind: SourceKind, uri: &str| match kind {
        SourceKind::Udev => "this machine's udev".to_string(),
        SourceKind::Libvirt => format!("libvirt's node devices at {uri}"),
    };
    if wanted != kind || (kind == SourceKind::Libvirt && config.uri != source_uri) {
        return Err(SourceRefusal::SourceChanged {
            path: config.path.display().to_string(),
            wanted: describe(wanted, &config.uri),
            running: describe(kind, source_uri),
        });
    }
    Ok(check_rules(config, kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn which_uris_reach_this_machines_devices() {
        for local in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///system",
            "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
            "qemu://localhost/system",
            "qemu://127.0.0.1/system",
            "qemu://[::1]/system",
            "qemu://localhost:16514/system",
            "qemu://root@localhost/system",
            "test:///default",
            "lxc:///",
        ] {
            assert!(devices_are_local(local), "{local} should be local");
        }
        for remote in [
            "qemu+ssh://other/system",
            "qemu+ssh://root@other/system",
            "qemu+ssh://localhost/system",
            "qemu+libssh://other/system",
            "qemu+libssh2://user@other/system?known_hosts=/x",
            "qemu+tcp://other:16509/system",
            "qemu+tcp://localhost/system",
            "qemu+tls://other/system",
            "qemu://other/system",
            "qemu://other.example.org:16514/system",
            "qemu://[2001:db8::1]/system",
            "qemu://[::1/system",
            "qemu://localhost.evil.example/system",
            "qemu+ext:///system?command=/opt/x",
            "qemu+unix://other/system",
            "://x/",
            "",
            "nonsense",
        ] {
            assert!(!devices_are_local(remote), "{remote} should be remote");
        }
    }

    #[test]
    fn the_setting_wins_and_auto_follows_the_uri() {
        use DeviceSourceSetting::*;
        let remote = "qemu+ssh://other/system";
        let local = "qemu:///system";
        assert_eq!(choose(Auto, local), SourceKind::Udev);
        assert_eq!(choose(Auto, remote), SourceKind::Libvirt);
        assert_eq!(choose(Libvirt, local), SourceKind::Libvirt);
        assert_eq!(choose(Udev, remote), SourceKind::Udev);
        assert_eq!(choose(Udev, local), SourceKind::Udev);
        assert_eq!(choose(Libvirt, remote), SourceKind::Libvirt);
    }

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("usbpass.toml")).unwrap()
    }

    #[test]
    fn a_serial_rule_is_refused_where_libvirt_supplies_the_devices() {
        let config = config(
            "uri = \"qemu+ssh://other/system\"\n\n\
             [[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"win11\"\n\n\
             # the stick\n\
             [[rule]]\nname = \"zigbee\"\nid = \"10c4:ea60\"\nserial = \"Z1\"\nvm = \"ha\"\n\n\
             [[rule]]\nname = \"other\"\nserial = \"Z2\"\nvm = \"ha\"\n",
        );
        let kind = choose(config.device_source, &config.uri);
        assert_eq!(kind, SourceKind::Libvirt);
        assert_eq!(
            check_rules(&config, kind).unwrap_err().to_string(),
            "usbpass.toml:9: rule \"zigbee\" matches by serial, which libvirt's node devices \
             do not report for qemu+ssh://other/system"
        );
        // udev reads serials: the same rules are fine there.
        assert_eq!(check_rules(&config, SourceKind::Udev), Ok(()));
    }

    #[test]
    fn rules_without_serial_pass_and_the_setting_selects_libvirt_locally() {
        let config = config(
            "device_source = \"libvirt\"\n\
             [[rule]]\nname = \"r\"\nid = \"046d:c52b\"\nport = \"1-2\"\nhub = \"usb1\"\nclass = \"03\"\nvm = \"v\"\n",
        );
        assert_eq!(config.device_source, DeviceSourceSetting::Libvirt);
        let kind = choose(config.device_source, &config.uri);
        assert_eq!(kind, SourceKind::Libvirt);
        assert_eq!(check_rules(&config, kind), Ok(()));
        let serial = Config::parse(
            "device_source = \"libvirt\"\n[[rule]]\nname = \"s\"\nserial = \"A\"\nvm = \"v\"\n",
            Path::new("/etc/usbpass/usbpass.toml"),
        )
        .unwrap();
        assert_eq!(
            check_rules(&serial, choose(serial.device_source, &serial.uri))
                .unwrap_err()
                .to_string(),
            "/etc/usbpass/usbpass.toml:2: rule \"s\" matches by serial, which libvirt's node \
             devices do not report for qemu:///system"
        );
    }

    #[test]
    fn a_running_source_refuses_a_file_that_wants_another() {
        let remote = config("uri = \"qemu+ssh://a/system\"\n");
        assert_eq!(
            accepts(&remote, SourceKind::Libvirt, "qemu+ssh://a/system"),
            Ok(())
        );
        assert_eq!(
            accepts(&remote, SourceKind::Libvirt, "qemu+ssh://b/system")
                .unwrap_err()
                .to_string(),
            "usbpass.toml: these rules read usb devices from libvirt's node devices at \
             qemu+ssh://a/system, but the daemon reads them from libvirt's node devices at \
             qemu+ssh://b/system; restart usbpass to switch"
        );
        assert_eq!(
            accepts(&remote, SourceKind::Udev, "qemu:///system")
                .unwrap_err()
                .to_string(),
            "usbpass.toml: these rules read usb devices from libvirt's node devices at \
             qemu+ssh://a/system, but the daemon reads them from this machine's udev; \
             restart usbpass to switch"
        );
        // Between local uris udev stays: only the libvirt connection changes.
        let session = config("uri = \"qemu:///session\"\n");
        assert_eq!(
            accepts(&session, SourceKind::Udev, "qemu:///system"),
            Ok(())
        );
        let serial = config(
            "uri = \"qemu+ssh://a/system\"\n[[rule]]\nname = \"s\"\nserial = \"A\"\nvm = \"v\"\n",
        );
        assert!(matches!(
            accepts(&serial, SourceKind::Libvirt, "qemu+ssh://a/system"),
            Err(SourceRefusal::RuleNeedsWhatSourceLacks(_))
        ));
    }

    #[test]
    fn device_source_values() {
        assert_eq!(config("").device_source, DeviceSourceSetting::Auto);
        assert_eq!(
            config("device_source = \"auto\"").device_source,
            DeviceSourceSetting::Auto
        );
        assert_eq!(
            config("device_source = \"udev\"").device_source,
            DeviceSourceSetting::Udev
        );
        let error = Config::parse("device_source = \"hal\"\n", Path::new("u.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "u.toml:1:17: device_source must be \"auto\", \"udev\" or \"libvirt\", not \"hal\""
        );
    }
}
