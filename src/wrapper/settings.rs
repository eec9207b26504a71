//! The wrapper's settings: its own small file (`/etc/usbpass/usbpass-qemu.conf`) and the
//! environment variables over it.

use crate::rules::ReconnectMode;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The wrapper's own small settings file, for hosts that run no usbpass daemon.
pub(super) const DEFAULT_SETTINGS_PATH: &str = "/etc/usbpass/usbpass-qemu.conf";

/// Environment variables, each overriding the settings file line of the same meaning.
pub(super) const ENV_EMULATOR: &str = "USBPASS_QEMU";
pub(super) const ENV_MODE: &str = "USBPASS_WRAPPER_MODE";
pub(super) const ENV_RULES: &str = "USBPASS_CONFIG";
pub(super) const ENV_SETTINGS: &str = "USBPASS_WRAPPER_CONFIG";
pub(super) const ENV_SYSFS: &str = "USBPASS_SYSFS_ROOT";

/// What the settings say to do with a device no rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WrapperMode {
    /// Rewrite the argument so that QEMU reconnects the device by ID or by port, as a
    /// rule's `reconnect` key would.
    Reconnect(ReconnectMode),
    /// Leave the argument as libvirt wrote it.
    Keep,
}

impl WrapperMode {
    fn parse(text: &str) -> Option<WrapperMode> {
        match text.trim() {
            "id" => Some(WrapperMode::Reconnect(ReconnectMode::Id)),
            "port" => Some(WrapperMode::Reconnect(ReconnectMode::Port)),
            "keep" | "off" => Some(WrapperMode::Keep),
            _ => None,
        }
    }
}

/// The wrapper's settings after the environment and the settings file are merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    pub(super) emulator: Option<PathBuf>,
    pub(super) mode: Option<WrapperMode>,
    pub(super) rules_path: Option<PathBuf>,
    pub(super) sysfs_root: Option<PathBuf>,
}

/// Reads `key = value` lines; `#` starts a comment. Unknown keys and bad values are
/// reported and skipped: a typo must not stop a VM from starting.
fn parse_settings(text: &str, path: &Path, warnings: &mut Vec<String>) -> Settings {
    let mut settings = Settings::default();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            warnings.push(format!(
                "{}:{}:1: expected key = value, ignoring the line",
                path.display(),
                number + 1
            ));
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "emulator" => settings.emulator = Some(PathBuf::from(value)),
            "rules" => settings.rules_path = Some(PathBuf::from(value)),
            "mode" => match WrapperMode::parse(value) {
                Some(mode) => settings.mode = Some(mode),
                None => warnings.push(format!(
                    "{}:{}:1: mode must be id, port or keep, not {value:?}",
                    path.display(),
                    number + 1
                )),
            },
            other => warnings.push(format!(
                "{}:{}:1: unknown key {other:?}, ignoring the line",
                path.display(),
                number + 1
            )),
        }
    }
    settings
}

/// The environment over the settings file.
pub(super) fn load_settings(
    env: &dyn Fn(&str) -> Option<OsString>,
    warnings: &mut Vec<String>,
) -> Settings {
    let settings_path = env(ENV_SETTINGS)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SETTINGS_PATH), PathBuf::from);
    let mut settings = match std::fs::read(&settings_path) {
        Ok(bytes) => parse_settings(&String::from_utf8_lossy(&bytes), &settings_path, warnings),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Settings::default(),
        Err(error) => {
            warnings.push(format!(
                "cannot read settings file {}: {error}",
                settings_path.display()
            ));
            Settings::default()
        }
    };
    if let Some(emulator) = env(ENV_EMULATOR).filter(|v| !v.is_empty()) {
        settings.emulator = Some(PathBuf::from(emulator));
    }
    if let Some(mode) = env(ENV_MODE).filter(|v| !v.is_empty()) {
        match WrapperMode::parse(&mode.to_string_lossy()) {
            Some(mode) => settings.mode = Some(mode),
            None => warnings.push(format!(
                "{ENV_MODE} must be id, port or keep, not {:?}",
                mode.to_string_lossy()
            )),
        }
    }
    if let Some(rules) = env(ENV_RULES).filter(|v| !v.is_empty()) {
        settings.rules_path = Some(PathBuf::from(rules));
    }
    if let Some(root) = env(ENV_SYSFS).filter(|v| !v.is_empty()) {
        settings.sysfs_root = Some(PathBuf::from(root));
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wrapper::tests::env_of;
    use std::fs;

    #[test]
    fn settings_lines_and_warnings() {
        let mut warnings = Vec::new();
        let settings = parse_settings(
            "# comment\nemulator = /opt/qemu # trailing\nmode=port\nrules = /x.toml\nbogus = 1\nmode = sideways\nno equals\n",
            Path::new("/etc/s.conf"),
            &mut warnings,
        );
        assert_eq!(settings.emulator, Some(PathBuf::from("/opt/qemu")));
        assert_eq!(
            settings.mode,
            Some(WrapperMode::Reconnect(ReconnectMode::Port))
        );
        assert_eq!(settings.rules_path, Some(PathBuf::from("/x.toml")));
        assert_eq!(warnings.len(), 3);
        assert!(warnings[0].starts_with("/etc/s.conf:5:1: unknown key"));
    }

    #[test]
    fn environment_overrides_settings_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.conf");
        fs::write(&file, "emulator = /from/file\nmode = port\n").unwrap();
        let mut warnings = Vec::new();
        let settings = load_settings(
            &env_of(&[
                (ENV_SETTINGS, file.to_str().unwrap()),
                (ENV_EMULATOR, "/from/env"),
                (ENV_MODE, "keep"),
            ]),
            &mut warnings,
        );
        assert_eq!(settings.emulator, Some(PathBuf::from("/from/env")));
        assert_eq!(settings.mode, Some(WrapperMode::Keep));
        assert!(warnings.is_empty());
    }
}
