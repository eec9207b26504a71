//! The `usbpass-qemu` emulator wrapper's logic: everything but the exec, which stays in
//! `src/bin/usbpass-qemu.rs`. [`prepare_exec`] reads the settings, finds the real
//! emulator, decides per usb-host argument (`policy`) and rewrites the arguments
//! (`qemu_args`), logging each outcome.
//!
//! The wrapper binary links this library, so nothing on this path may call into `virt` or
//! `udev` (the wrapper must link neither): sysfs and the rules file are read directly.

pub mod emulator;
pub mod host_settings;
mod policy;
pub mod qemu_args;
mod settings;
pub mod udev_rules;

use emulator::{find_emulator, FileIdentity, DEFAULT_EMULATOR};
use policy::Policy;
use qemu_args::{ArgForm, Outcome};
use settings::load_settings;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::rules::DEFAULT_CONFIG_PATH;

/// The wrapper's name in log lines, and the `argv[0]` name that means "no emulator to
/// stand in for".
pub const WRAPPER_NAME: &str = "usbpass-qemu";

/// What to exec: the real emulator and its argument list, `argv[0]` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedExec {
    pub emulator: PathBuf,
    pub argv: Vec<OsString>,
}

/// Everything but the exec. `None` when there is no real emulator to run (the warnings
/// logged say why).
pub fn prepare_exec(
    args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    self_identity: Option<FileIdentity>,
    log: &mut dyn FnMut(&str, &str),
) -> Option<PreparedExec> {
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

    let mut policy = Policy::new(
        settings.sysfs_root.unwrap_or_else(|| PathBuf::from("/sys")),
        settings
            .rules_path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        settings.mode,
        guest,
        vm.clone(),
    );
    let (rewritten, outcomes) = qemu_args::rewrite_args(&rest, |s| policy.decide(s));
    for warning in policy.warnings.drain(..) {
        log("warning", &warning);
    }
    log_outcomes(&vm, outcomes, policy.notes, log);
    // argv[0] becomes the real path so that QEMU names itself as it would if run
    // directly (its `-help` usage line and error prefixes use argv[0]).
    let mut argv = Vec::with_capacity(rewritten.len() + 1);
    argv.push(emulator.clone().into_os_string());
    argv.extend(rewritten);
    Some(PreparedExec { emulator, argv })
}

/// Logs one line per usb-host argument rewritten (info, with what the decision was based
/// on) or passed through for a reason worth a warning; a kept argument logs nothing.
/// `notes` has one entry per decision, in order: an unparsed argument had no decision.
fn log_outcomes(
    vm: &str,
    outcomes: Vec<Outcome>,
    notes: Vec<String>,
    log: &mut dyn FnMut(&str, &str),
) {
    let mut notes = notes.into_iter();
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
}

fn option_for(form: ArgForm) -> &'static str {
    match form {
        ArgForm::Legacy => "-usbdevice",
        ArgForm::Keyval | ArgForm::Json => "-device",
    }
}

#[cfg(test)]
mod tests {
    use super::settings::{ENV_EMULATOR, ENV_MODE, ENV_RULES, ENV_SETTINGS, ENV_SYSFS};
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    // `pub(super)` for the tests of the wrapper's other modules.
    pub(super) fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name: &str| map.get(name).cloned()
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

    fn run_prepare_exec(
        env: &[(&str, &str)],
        args: &[&str],
    ) -> (Vec<OsString>, Vec<(String, String)>) {
        let mut lines = Vec::new();
        let mut log =
            |level: &str, message: &str| lines.push((level.to_string(), message.to_string()));
        let mut env = env.to_vec();
        env.push((ENV_SETTINGS, "/nonexistent/settings"));
        env.push((ENV_EMULATOR, "/bin/true"));
        let mut argv = vec!["usbpass-qemu".to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let prepared = prepare_exec(
            argv.into_iter().map(OsString::from).collect(),
            &env_of(&env),
            None,
            &mut log,
        )
        .unwrap();
        (prepared.argv, lines)
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
        let (out, lines) = run_prepare_exec(
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
        let (out, lines) = run_prepare_exec(
            &[(ENV_SYSFS, root), (ENV_RULES, rules.to_str().unwrap())],
            &args,
        );
        assert_eq!(out[4], args[3]);
        assert!(lines.is_empty());
        // ...unless the settings ask for every device.
        let (out, _) = run_prepare_exec(
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
        let (out, lines) = run_prepare_exec(
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
        let (out, lines) = run_prepare_exec(
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
            let (out, lines) = run_prepare_exec(
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
