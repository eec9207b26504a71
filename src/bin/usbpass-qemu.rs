//! The `usbpass-qemu` emulator wrapper: rewrites QEMU's usb-host arguments so that QEMU
//! reconnects replugged devices by itself, then execs the real emulator in place.
//!
//! It never spawns a child: the PID, every inherited file descriptor (libvirt's monitor
//! socket), the environment and the signal state all reach QEMU as libvirt left them.
//! `no_main` keeps Rust's runtime from ignoring SIGPIPE before we exec (a QEMU started
//! by a shell that does not ignore it must not inherit an ignored SIGPIPE from us).
#![cfg_attr(not(test), no_main)]

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use usbpass::host::sysfs::{self, SysfsUsb};
use usbpass::model::UsbDevice;
use usbpass::rules::{Config, ReconnectMode, DEFAULT_CONFIG_PATH};
use usbpass::wrapper::qemu_args::{self, ArgForm, Decision, DeviceFacts, Mode, Outcome, Selector};

/// Where the real emulator is when nothing else says.
const DEFAULT_EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
/// The wrapper's own small settings file, for hosts that run no usbpass daemon.
const DEFAULT_SETTINGS_PATH: &str = "/etc/usbpass/usbpass-qemu.conf";
const WRAPPER_NAME: &str = "usbpass-qemu";

/// Environment variables, each overriding the settings file line of the same meaning.
const ENV_EMULATOR: &str = "USBPASS_QEMU";
const ENV_MODE: &str = "USBPASS_WRAPPER_MODE";
const ENV_RULES: &str = "USBPASS_CONFIG";
const ENV_SETTINGS: &str = "USBPASS_WRAPPER_CONFIG";
const ENV_SYSFS: &str = "USBPASS_SYSFS_ROOT";

/// What the settings say to do with a device no rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DefaultMode {
    Id,
    Port,
    /// Leave the argument as libvirt wrote it.
    Keep,
}

impl DefaultMode {
    fn parse(text: &str) -> Option<DefaultMode> {
        match text.trim() {
            "id" => Some(DefaultMode::Id),
            "port" => Some(DefaultMode::Port),
            "keep" | "off" => Some(DefaultMode::Keep),
            _ => None,
        }
    }
}

/// The wrapper's settings after the environment and the settings file are merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Settings {
    emulator: Option<PathBuf>,
    mode: Option<DefaultMode>,
    rules_path: Option<PathBuf>,
    sysfs_root: Option<PathBuf>,
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
            "mode" => match DefaultMode::parse(value) {
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
fn load_settings(env: &dyn Fn(&str) -> Option<OsString>, warnings: &mut Vec<String>) -> Settings {
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
        match DefaultMode::parse(&mode.to_string_lossy()) {
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

/// A file's identity, so that the wrapper can tell itself apart from a real emulator
/// however many symlinks lead to either.
fn identity(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the real emulator: `USBPASS_QEMU`, then the settings file, then a binary named
/// like argv[0] further along PATH than the wrapper, then the default. A candidate that
/// is the wrapper itself is skipped with a warning: execing it would loop forever.
fn find_emulator(
    settings: &Settings,
    argv0: &OsStr,
    path_var: Option<&OsStr>,
    self_identity: Option<(u64, u64)>,
    default: &Path,
    warnings: &mut Vec<String>,
) -> Option<PathBuf> {
    let is_self =
        |candidate: &Path| self_identity.is_some() && identity(candidate) == self_identity;
    if let Some(configured) = &settings.emulator {
        if is_self(configured) {
            warnings.push(format!(
                "emulator {} is usbpass-qemu itself, ignoring it",
                configured.display()
            ));
        } else if is_executable_file(configured) {
            return Some(configured.clone());
        } else {
            warnings.push(format!(
                "emulator {} is no executable file, ignoring it",
                configured.display()
            ));
        }
    }
    let name = Path::new(argv0).file_name();
    if let (Some(name), Some(path_var)) = (name, path_var) {
        if name != OsStr::new(WRAPPER_NAME) {
            let folders: Vec<PathBuf> = std::env::split_paths(path_var)
                .filter(|folder| folder.is_absolute())
                .collect();
            // The wrapper's own entry: the first folder where argv[0]'s name is the
            // wrapper, or argv[0]'s own folder when the wrapper cannot know itself.
            let own_folder = Path::new(argv0)
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .and_then(identity);
            let own_entry = folders.iter().position(|folder| {
                is_self(&folder.join(name))
                    || own_folder.is_some_and(|own| identity(folder) == Some(own))
            });
            // "Past the wrapper" only: an entry before it would shadow the wrapper for
            // anyone looking the name up, so it is not the binary the wrapper stands in
            // for, and wrapping around to it could pick another wrapper.
            match own_entry {
                Some(position) => {
                    for folder in &folders[position + 1..] {
                        let candidate = folder.join(name);
                        if !is_self(&candidate) && is_executable_file(&candidate) {
                            return Some(candidate);
                        }
                    }
                }
                None => warnings.push(format!(
                    "{} is not on PATH, so no PATH entry is past it; falling back to the default emulator",
                    Path::new(argv0).display()
                )),
            }
        }
    }
    if is_self(default) {
        warnings.push(format!(
            "default emulator {} is usbpass-qemu itself; set {ENV_EMULATOR} or emulator= in {DEFAULT_SETTINGS_PATH}",
            default.display()
        ));
        return None;
    }
    Some(default.to_path_buf())
}

/// The rules file, read only when an argument needs a decision.
enum Rules {
    NotRead(PathBuf),
    Absent,
    Broken,
    Loaded(Config),
}

/// Decides, per usb-host argument, whether and how to rewrite it.
struct Policy {
    sysfs: SysfsUsb,
    rules: Rules,
    explicit_mode: Option<DefaultMode>,
    /// This guest's name from `-name`; `None` when the command line has none.
    guest: Option<String>,
    /// The guest's name for messages.
    vm: String,
    warnings: Vec<String>,
    /// What each decision was based on, by argument, for the info line.
    notes: Vec<String>,
}

impl Policy {
    fn rules(&mut self) -> Option<&Config> {
        if let Rules::NotRead(path) = &self.rules {
            let path = path.clone();
            self.rules = match Config::load(&path) {
                Ok(config) => Rules::Loaded(config),
                Err(usbpass::rules::ConfigError::ReadFile { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Rules::Absent
                }
                Err(error) => {
                    self.warnings.push(format!(
                        "vm {}: ignoring rules file, using defaults: {error}",
                        self.vm
                    ));
                    Rules::Broken
                }
            };
        }
        match &self.rules {
            Rules::Loaded(config) => Some(config),
            _ => None,
        }
    }

    /// The mode for a device no rule names: the explicit setting, else `id` unless the
    /// rules file names devices, in which case only those are the wrapper's business.
    fn default_mode(&mut self) -> DefaultMode {
        if let Some(mode) = self.explicit_mode {
            return mode;
        }
        match self.rules() {
            Some(config) if !config.rules.is_empty() => DefaultMode::Keep,
            _ => DefaultMode::Id,
        }
    }

    /// The first rule naming both this device and this guest decides; a rule for another
    /// VM must not set this guest's mode. Without a guest name every rule counts (as the
    /// daemon's first-match would), and the note says so.
    fn mode_for(&mut self, device: Option<&UsbDevice>) -> (DefaultMode, String) {
        let guest = self.guest.clone();
        let unfiltered = match (&guest, self.rules()) {
            (None, Some(_)) => " (no guest name on the command line: rules for every vm count)",
            _ => "",
        };
        if let Some(device) = device {
            let rule = self.rules().and_then(|config| {
                config.rules.iter().find(|rule| {
                    guest
                        .as_ref()
                        .is_none_or(|guest| rule.vms.iter().any(|vm| vm == guest))
                        && rule.matches(device)
                })
            });
            if let Some(rule) = rule {
                let mode = match rule.reconnect {
                    ReconnectMode::Id => DefaultMode::Id,
                    ReconnectMode::Port => DefaultMode::Port,
                };
                return (mode, format!("rule={}{unfiltered}", rule.name));
            }
        }
        let mode = self.default_mode();
        let source = if self.explicit_mode.is_some() {
            "settings"
        } else {
            "default"
        };
        (mode, format!("rule=none from={source}{unfiltered}"))
    }

    fn decide(&mut self, selector: &Selector) -> Decision {
        let device = match selector {
            Selector::BusAddress { bus, address } => {
                self.sysfs.find_by_bus_address(*bus, *address).map(Some)
            }
            Selector::HostDevice(path) => self.sysfs.find_by_node(Path::new(path)).map(Some),
            // Already an ID; a present device only lends its port and serial to rules.
            Selector::VendorProduct {
                vendor_id,
                product_id,
            } => Ok(self
                .sysfs
                .find_by_vendor_product(*vendor_id, *product_id)
                .ok()
                .and_then(|found| found.into_iter().next())),
        };
        let device = match device {
            Ok(device) => device,
            Err(error) => {
                self.notes.push(String::new());
                return Decision::Warn(error.to_string());
            }
        };
        let (mode, source) = self.mode_for(device.as_ref());
        let facts = match (&device, selector) {
            (Some(device), _) => sysfs::facts_of(device),
            (
                None,
                Selector::VendorProduct {
                    vendor_id,
                    product_id,
                },
            ) => DeviceFacts {
                vendor_id: *vendor_id,
                product_id: *product_id,
                bus: 0,
                hostport: None,
            },
            (None, _) => unreachable!("only a vendor:product selector resolves to no device"),
        };
        let described = match &device {
            Some(device) => device.to_string(),
            None => format!(
                "{:04x}:{:04x} (not present)",
                facts.vendor_id, facts.product_id
            ),
        };
        let mode = match mode {
            DefaultMode::Keep => {
                self.notes.push(String::new());
                return Decision::Keep;
            }
            DefaultMode::Id => Mode::Id,
            DefaultMode::Port if facts.hostport.is_some() || facts.bus != 0 => Mode::Port,
            DefaultMode::Port => Mode::Id,
        };
        let mode_name = match mode {
            Mode::Id => "id",
            Mode::Port => "port",
        };
        self.notes
            .push(format!("device={described} {source} mode={mode_name}"));
        Decision::Rewrite { facts, mode }
    }
}

fn option_for(form: ArgForm) -> &'static str {
    match form {
        ArgForm::Legacy => "-usbdevice",
        ArgForm::Keyval | ArgForm::Json => "-device",
    }
}

// Unit tests run `plan` with their own log and never exec.
#[cfg_attr(test, allow(dead_code))]
fn log_line(level: &str, message: &str) {
    use std::io::Write;
    // One write per line, so that lines from QEMU's threads later cannot interleave.
    let line = format!("{WRAPPER_NAME}: {level}: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Everything but the exec: returns the emulator and the argument list (argv[0] first).
fn plan(
    args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    self_identity: Option<(u64, u64)>,
    log: &mut dyn FnMut(&str, &str),
) -> Option<(PathBuf, Vec<OsString>)> {
    let mut warnings = Vec::new();
    let settings = load_settings(env, &mut warnings);
    let argv0 = args.first().cloned().unwrap_or_default();
    let rest = args.get(1..).unwrap_or(&[]).to_vec();
    let emulator = find_emulator(
        &settings,
        &argv0,
        env("PATH").as_deref(),
        self_identity,
        Path::new(DEFAULT_EMULATOR),
        &mut warnings,
    );
    let guest = qemu_args::guest_name(&rest);
    let vm = guest.clone().unwrap_or_else(|| "<unnamed>".to_string());
    for warning in warnings.drain(..) {
        log("warning", &format!("vm {vm}: {warning}"));
    }
    let emulator = emulator?;

    let mut policy = Policy {
        sysfs: SysfsUsb::new(settings.sysfs_root.unwrap_or_else(|| PathBuf::from("/sys"))),
        rules: Rules::NotRead(
            settings
                .rules_path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        ),
        explicit_mode: settings.mode,
        guest,
        vm: vm.clone(),
        warnings: Vec::new(),
        notes: Vec::new(),
    };
    let (rewritten, outcomes) = qemu_args::rewrite_args(&rest, |s| policy.decide(s));
    for warning in policy.warnings.drain(..) {
        log("warning", &warning);
    }
    let mut notes = policy.notes.into_iter();
    for outcome in outcomes {
        match outcome {
            Outcome::Rewritten {
                index,
                form,
                before,
                after,
            } => {
                let note = notes.next().unwrap_or_default();
                log(
                    "info",
                    &format!(
                        "vm {vm}: rewrote {} argument {} {note}: {} -> {}",
                        option_for(form),
                        index + 1,
                        before.to_string_lossy(),
                        after.to_string_lossy()
                    ),
                );
            }
            Outcome::Kept { .. } => {
                notes.next();
            }
            Outcome::Warned { index, message } => {
                notes.next();
                log(
                    "warning",
                    &format!(
                        "vm {vm}: passing argument {} through unchanged: {message}",
                        index + 1
                    ),
                );
            }
            Outcome::Unparsed { index, error } => log(
                "warning",
                &format!(
                    "vm {vm}: passing argument {} through unchanged: {error}",
                    index + 1
                ),
            ),
        }
    }
    // argv[0] becomes the real path so that QEMU names itself as it would if run
    // directly (its `-help` usage line and error prefixes use argv[0]).
    let mut argv = Vec::with_capacity(rewritten.len() + 1);
    argv.push(emulator.clone().into_os_string());
    argv.extend(rewritten);
    Some((emulator, argv))
}

/// Replaces this process with the emulator; returns only on failure.
#[cfg_attr(test, allow(dead_code))]
fn exec(emulator: &Path, argv: Vec<OsString>) -> std::io::Error {
    let to_c = |s: OsString| CString::new(s.into_vec());
    let Ok(path) = to_c(emulator.as_os_str().to_os_string()) else {
        return std::io::Error::from(std::io::ErrorKind::InvalidInput);
    };
    let Ok(argv) = argv.into_iter().map(to_c).collect::<Result<Vec<_>, _>>() else {
        return std::io::Error::from(std::io::ErrorKind::InvalidInput);
    };
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: `path` and every element of `pointers` point into CStrings that live until
    // after the call; the array ends with a null pointer, as execv requires. execv keeps
    // `environ`, every descriptor without FD_CLOEXEC, the signal mask and ignored signals.
    unsafe { libc::execv(path.as_ptr(), pointers.as_ptr()) };
    std::io::Error::last_os_error()
}

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let args: Vec<OsString> = std::env::args_os().collect();
    let env = |name: &str| std::env::var_os(name);
    let self_identity = identity(Path::new("/proc/self/exe"));
    let mut log = |level: &str, message: &str| log_line(level, message);
    let Some((emulator, argv)) = plan(args, &env, self_identity, &mut log) else {
        log_line("error", "no real emulator to run");
        return 127;
    };
    let error = exec(&emulator, argv);
    log_line(
        "error",
        &format!("cannot exec {}: {error}", emulator.display()),
    );
    127
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    fn executable(path: &Path) {
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn settings_lines_and_warnings() {
        let mut warnings = Vec::new();
        let settings = parse_settings(
            "# comment\nemulator = /opt/qemu # trailing\nmode=port\nrules = /x.toml\nbogus = 1\nmode = sideways\nno equals\n",
            Path::new("/etc/s.conf"),
            &mut warnings,
        );
        assert_eq!(settings.emulator, Some(PathBuf::from("/opt/qemu")));
        assert_eq!(settings.mode, Some(DefaultMode::Port));
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
        assert_eq!(settings.mode, Some(DefaultMode::Keep));
        assert!(warnings.is_empty());
    }

    #[test]
    fn emulator_order_and_never_self() {
        let dir = tempfile::tempdir().unwrap();
        let (first, wrapper_dir, later) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&first, &wrapper_dir, &later] {
            fs::create_dir(d).unwrap();
        }
        let wrapper = wrapper_dir.join("usbpass-qemu");
        executable(&wrapper);
        std::os::unix::fs::symlink(&wrapper, wrapper_dir.join("qemu-kvm")).unwrap();
        executable(&first.join("qemu-kvm"));
        executable(&later.join("qemu-kvm"));
        let me = identity(&wrapper);
        let path_var = std::env::join_paths([&first, &wrapper_dir, &later]).unwrap();
        let argv0 = wrapper_dir.join("qemu-kvm");
        let default = Path::new("/nonexistent/qemu");
        let mut warnings = Vec::new();
        let search = |settings: &Settings,
                      argv0: &OsStr,
                      path_var: Option<&OsStr>,
                      warnings: &mut Vec<String>| {
            find_emulator(settings, argv0, path_var, me, default, warnings)
        };

        // PATH: the entry past the wrapper wins over the one before it.
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&path_var),
            &mut warnings,
        );
        assert_eq!(found, Some(later.join("qemu-kvm")));

        // USBPASS_QEMU (or the settings file) first, unless it is the wrapper itself.
        let configured = Settings {
            emulator: Some(first.join("qemu-kvm")),
            ..Settings::default()
        };
        let found = search(
            &configured,
            argv0.as_os_str(),
            Some(&path_var),
            &mut warnings,
        );
        assert_eq!(found, Some(first.join("qemu-kvm")));
        let looping = Settings {
            emulator: Some(wrapper_dir.join("qemu-kvm")),
            ..Settings::default()
        };
        let found = search(&looping, argv0.as_os_str(), Some(&path_var), &mut warnings);
        assert_eq!(found, Some(later.join("qemu-kvm")));
        assert!(warnings
            .iter()
            .any(|w| w.contains("is usbpass-qemu itself")));

        // Called by its own name: no PATH search, the default.
        let found = search(
            &Settings::default(),
            wrapper.as_os_str(),
            Some(&path_var),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));

        // Nothing past the wrapper's entry: the entry before it does not count (no
        // wrap-around); the default runs.
        let wrapper_last = std::env::join_paths([&first, &wrapper_dir]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&wrapper_last),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));

        // Another symlink to the wrapper past its entry is skipped, never exec'd.
        let second_link = dir.path().join("d");
        fs::create_dir(&second_link).unwrap();
        std::os::unix::fs::symlink(&wrapper, second_link.join("qemu-kvm")).unwrap();
        let twice = std::env::join_paths([&first, &wrapper_dir, &second_link, &later]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&twice),
            &mut warnings,
        );
        assert_eq!(found, Some(later.join("qemu-kvm")));
        let twice_last = std::env::join_paths([&first, &wrapper_dir, &second_link]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&twice_last),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));

        // The wrapper's folder is not on PATH: nothing is past it, so no PATH entry
        // counts; the default runs and a warning says why.
        warnings.clear();
        let elsewhere = std::env::join_paths([&first, &later]).unwrap();
        let found = search(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&elsewhere),
            &mut warnings,
        );
        assert_eq!(found.as_deref(), Some(default));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("not on PATH"), "{warnings:?}");

        // Without the wrapper's identity (no /proc/self/exe), argv[0]'s folder still
        // marks its entry.
        let found = find_emulator(
            &Settings::default(),
            argv0.as_os_str(),
            Some(&path_var),
            None,
            default,
            &mut warnings,
        );
        assert_eq!(found, Some(later.join("qemu-kvm")));

        // The default is the wrapper: nothing to run.
        let found = find_emulator(
            &Settings::default(),
            wrapper.as_os_str(),
            None,
            me,
            &wrapper,
            &mut warnings,
        );
        assert_eq!(found, None);
    }

    fn sysfs_with_receiver(root: &Path) {
        let dir = root.join("devices/usb1/1-2");
        fs::create_dir_all(&dir).unwrap();
        for (file, text) in [
            ("busnum", "1"),
            ("devnum", "5"),
            ("idVendor", "046d"),
            ("idProduct", "c52b"),
            ("bDeviceClass", "00"),
        ] {
            fs::write(dir.join(file), format!("{text}\n")).unwrap();
        }
        fs::create_dir_all(root.join("bus/usb/devices")).unwrap();
        std::os::unix::fs::symlink(&dir, root.join("bus/usb/devices/1-2")).unwrap();
    }

    fn run_plan(env: &[(&str, &str)], args: &[&str]) -> (Vec<OsString>, Vec<(String, String)>) {
        let mut lines = Vec::new();
        let mut log =
            |level: &str, message: &str| lines.push((level.to_string(), message.to_string()));
        let mut env = env.to_vec();
        env.push((ENV_SETTINGS, "/nonexistent/settings"));
        env.push((ENV_EMULATOR, "/bin/true"));
        let mut argv = vec!["usbpass-qemu".to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let (_, out) = plan(
            argv.into_iter().map(OsString::from).collect(),
            &env_of(&env),
            None,
            &mut log,
        )
        .unwrap();
        (out, lines)
    }

    #[test]
    fn rules_file_picks_mode_per_device() {
        let dir = tempfile::tempdir().unwrap();
        sysfs_with_receiver(dir.path());
        let rules = dir.path().join("usbpass.toml");
        fs::write(
            &rules,
            "[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"g\"\nreconnect = \"port\"\n",
        )
        .unwrap();
        let root = dir.path().to_str().unwrap();
        let args = [
            "-name",
            "guest=g",
            "-device",
            "usb-host,hostbus=1,hostaddr=5,id=h",
        ];
        let (out, lines) = run_plan(
            &[(ENV_SYSFS, root), (ENV_RULES, rules.to_str().unwrap())],
            &args,
        );
        assert_eq!(out[4], "usb-host,hostbus=1,hostport=2,id=h");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].0, "info");
        assert!(lines[0].1.contains("rule=receiver"), "{}", lines[0].1);
        assert!(lines[0].1.starts_with("vm g: rewrote -device argument 4"));

        // A rules file naming other devices: this one is left as libvirt wrote it.
        fs::write(
            &rules,
            "[[rule]]\nname = \"other\"\nid = \"1234:*\"\nvm = \"g\"\n",
        )
        .unwrap();
        let (out, lines) = run_plan(
            &[(ENV_SYSFS, root), (ENV_RULES, rules.to_str().unwrap())],
            &args,
        );
        assert_eq!(out[4], args[3]);
        assert!(lines.is_empty());
        // ...unless the settings ask for every device.
        let (out, _) = run_plan(
            &[
                (ENV_SYSFS, root),
                (ENV_RULES, rules.to_str().unwrap()),
                (ENV_MODE, "id"),
            ],
            &args,
        );
        assert_eq!(out[4], "usb-host,vendorid=0x046d,productid=0xc52b,id=h");
    }

    #[test]
    fn broken_rules_file_warns_once_and_uses_defaults() {
        let dir = tempfile::tempdir().unwrap();
        sysfs_with_receiver(dir.path());
        let rules = dir.path().join("usbpass.toml");
        fs::write(&rules, "[[rule]]\nname = 3\n").unwrap();
        let root = dir.path().to_str().unwrap();
        let args = [
            "-name",
            "guest=g",
            "-device",
            "usb-host,hostbus=1,hostaddr=5",
            "-device",
            r#"{"driver":"usb-host","hostdevice":"/dev/bus/usb/001/005"}"#,
        ];
        let (out, lines) = run_plan(
            &[(ENV_SYSFS, root), (ENV_RULES, rules.to_str().unwrap())],
            &args,
        );
        assert_eq!(out[4], "usb-host,vendorid=0x046d,productid=0xc52b");
        assert_eq!(
            out[6],
            r#"{"driver":"usb-host","vendorid":1133,"productid":50475}"#
        );
        let warnings: Vec<_> = lines
            .iter()
            .filter(|(level, _)| level == "warning")
            .collect();
        assert_eq!(warnings.len(), 1, "{lines:?}");
        assert!(
            warnings[0].1.contains("usbpass.toml:2:"),
            "{}",
            warnings[0].1
        );
    }

    #[test]
    fn gone_device_passes_through_with_one_warning() {
        let dir = tempfile::tempdir().unwrap();
        sysfs_with_receiver(dir.path());
        let root = dir.path().to_str().unwrap();
        let args = [
            "-name",
            "guest=g",
            "-device",
            "usb-host,hostbus=1,hostaddr=9",
        ];
        let (out, lines) = run_plan(
            &[(ENV_SYSFS, root), (ENV_RULES, "/nonexistent.toml")],
            &args,
        );
        assert_eq!(out[4], args[3]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].0, "warning");
        assert!(lines[0].1.contains("no usb device at bus 1 address 9"));
    }

    #[test]
    fn probing_runs_read_nothing_and_log_nothing() {
        // A sysfs root and rules file that do not exist would warn if they were read.
        for args in [
            &["-version"][..],
            &["-help"],
            &["-S", "-no-user-config", "-qmp", "unix:/x,server=on"],
        ] {
            let (out, lines) = run_plan(
                &[
                    (ENV_SYSFS, "/nonexistent"),
                    (ENV_RULES, "/nonexistent/dir/x.toml"),
                ],
                args,
            );
            assert_eq!(out[0], "/bin/true");
            assert_eq!(
                &out[1..],
                &args.iter().map(OsString::from).collect::<Vec<_>>()[..]
            );
            assert!(lines.is_empty());
        }
    }
}
