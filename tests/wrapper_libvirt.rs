//! usbpass-qemu as the `<emulator>` of domains started by the real libvirtd: capability
//! probing with a fresh cache matches the real QEMU's, the domain starts, the running
//! QEMU's /proc/PID/cmdline holds the rewritten usb-host arguments and every other word of
//! libvirt's command line unchanged, and `info qtree` shows the new selectors.
//!
//! This machine has no USB: `<qemu:commandline>` puts real usb-host arguments on
//! libvirt's command line, a fake sysfs (USBPASS_SYSFS_ROOT) names the devices, and
//! QEMU accepts vendorid/productid or hostbus/hostport for a device that is absent.

mod wrapper_common;

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use wrapper_common::*;

const URI: &str = "qemu:///system";
const CAPS_CACHE: &str = "/var/cache/libvirt/qemu/capabilities";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    let output = virsh(args);
    assert!(
        output.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Destroys and undefines the domain, and drops the capability cache entry of the test's
/// emulator copy, whatever way the test ends.
struct Cleanup {
    domain: String,
    emulator: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.domain]);
        let _ = virsh(&["undefine", &self.domain]);
        let needle = format!("<emulator>{}</emulator>", self.emulator.display());
        if let Ok(entries) = fs::read_dir(CAPS_CACHE) {
            for entry in entries.flatten() {
                if fs::read_to_string(entry.path()).is_ok_and(|t| t.contains(&needle)) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Splits one logged line into shell words, undoing libvirt's quoting (`'a b'`,
/// `'it'\''s'`).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
            }
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                for inner in chars.by_ref() {
                    if inner == '\'' {
                        break;
                    }
                    current.push(inner);
                }
            }
            '\\' => {
                if let Some(next) = chars.next() {
                    word.get_or_insert_with(String::new).push(next);
                }
            }
            other => word.get_or_insert_with(String::new).push(other),
        }
    }
    words.extend(word);
    words
}

/// The last command line libvirt logged for the domain: an option and its value per line,
/// each line but the last ending in ` \`, environment assignments first.
fn logged_command_line(log: &str, emulator: &Path) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("LC_ALL=C"))
        .expect("a logged command line");
    let mut words = Vec::new();
    for line in &lines[start..] {
        match line.strip_suffix(" \\") {
            Some(part) => words.extend(shell_words(part)),
            None => {
                words.extend(shell_words(line));
                break;
            }
        }
    }
    let first = words
        .iter()
        .position(|w| Path::new(w) == emulator)
        .expect("the emulator in the logged command line");
    words.split_off(first)
}

fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    require(root, "needs root to use qemu:///system")
        && require(Path::new("/dev/kvm").exists(), "no /dev/kvm")
        && require(
            Path::new("/usr/bin/qemu-system-x86_64").exists(),
            "no /usr/bin/qemu-system-x86_64",
        )
        && require(
            virsh(&["version"]).status.success(),
            "libvirtd does not answer on qemu:///system (tests/support/start-libvirtd)",
        )
}

#[test]
fn wrapper_as_libvirt_emulator() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("usbpass-test-wrapper-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // A copy at a new path: libvirt has no cached capabilities for it and must probe.
    let emulator = dir.path().join("usbpass-qemu");
    fs::copy(WRAPPER, &emulator).unwrap();
    let sysfs = dir.path().join("sys");
    fake_sysfs(&sysfs, &[&RECEIVER, &KEYBOARD]);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let domain = format!("usbpass-test-wrapper-{}-{nanos}", std::process::id());
    // The rules are for this domain; a rule for another VM comes first and names the
    // keyboard too, with another mode: it must not count for this guest.
    let rules = dir.path().join("usbpass.toml");
    fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"kbd-other\"\nid = \"0627:0001\"\nvm = \"other\"\nreconnect = \"id\"\n\n\
             [[rule]]\nname = \"kbd\"\nid = \"0627:0001\"\nvm = [\"other\", \"{domain}\"]\nreconnect = \"port\"\n\n\
             [[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"{domain}\"\n"
        ),
    )
    .unwrap();
    let _cleanup = Cleanup {
        domain: domain.clone(),
        emulator: emulator.clone(),
    };

    // Capability probing through the wrapper, with a fresh cache, gives what the real
    // QEMU gives: only the emulator path differs.
    let caps = |bin: &Path| {
        virsh_ok(&[
            "domcapabilities",
            "--emulatorbin",
            bin.to_str().unwrap(),
            "--virttype",
            "kvm",
            "--machine",
            "pc",
        ])
        .lines()
        .filter(|l| !l.trim_start().starts_with("<path>"))
        .map(str::to_string)
        .collect::<Vec<_>>()
    };
    let wrapped_caps = caps(&emulator);
    assert_eq!(wrapped_caps, caps(Path::new("/usr/bin/qemu-system-x86_64")));
    assert!(wrapped_caps.iter().any(|l| l.contains("usb")));
    assert!(virsh_ok(&["capabilities"]).contains("<capabilities>"));

    let hostile = r#"name=opt/usbpass/hostile,string=-device usb-host,,hostbus=1,,hostaddr=5 -usbdevice host:1.5 'q' "dq""#;
    let keyval = "usb-host,hostbus=1,hostaddr=5,id=ua-kv,bus=kvxhci.0,port=1,guest-reset=off";
    let json = r#"{"driver":"usb-host","hostdevice":"/dev/bus/usb/001/006","id":"ua-json","bus":"usb.0","port":"4","bootindex":2}"#;
    let xml_attr = |s: &str| {
        s.replace('&', "&amp;")
            .replace('\'', "&apos;")
            .replace('"', "&quot;")
            .replace('<', "&lt;")
    };
    let xml = format!(
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{domain}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='qemu-xhci'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='qemu-xhci,id=kvxhci,bus=pci.0,addr=0x9'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='{keyval}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='{json}'/>
    <qemu:arg value='-fw_cfg'/>
    <qemu:arg value='{hostile}'/>
    <qemu:env name='USBPASS_SYSFS_ROOT' value='{sysfs}'/>
    <qemu:env name='USBPASS_CONFIG' value='{rules}'/>
    <qemu:env name='USBPASS_WRAPPER_CONFIG' value='/nonexistent/usbpass-qemu.conf'/>
  </qemu:commandline>
</domain>
",
        emulator = emulator.display(),
        keyval = xml_attr(keyval),
        json = xml_attr(json),
        hostile = xml_attr(hostile),
        sysfs = sysfs.display(),
        rules = rules.display(),
    );
    let xml_path = dir.path().join("domain.xml");
    fs::write(&xml_path, xml).unwrap();
    virsh_ok(&["define", xml_path.to_str().unwrap()]);
    virsh_ok(&["start", &domain]);

    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).unwrap();
    let cmdline = fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    let running: Vec<OsString> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| OsString::from_vec(w.to_vec()))
        .collect();
    let log = fs::read_to_string(format!("/var/log/libvirt/qemu/{domain}.log")).unwrap();
    let passed = logged_command_line(&log, &emulator);

    // Word by word: the two usb-host values rewritten, everything else as libvirt wrote
    // it; argv[0] is the real QEMU the wrapper exec'd.
    assert_eq!(running.len(), passed.len(), "{running:?}\n{passed:?}");
    assert_eq!(running[0], OsString::from("/usr/bin/qemu-system-x86_64"));
    let mut rewritten = 0;
    for (index, (now, before)) in running.iter().zip(&passed).enumerate().skip(1) {
        if before == keyval {
            assert_eq!(
                now,
                "usb-host,vendorid=0x046d,productid=0xc52b,id=ua-kv,bus=kvxhci.0,port=1,guest-reset=off"
            );
            rewritten += 1;
        } else if before == json {
            assert_eq!(
                now,
                r#"{"driver":"usb-host","hostbus":1,"hostport":"3","id":"ua-json","bus":"usb.0","port":"4","bootindex":2}"#
            );
            rewritten += 1;
        } else {
            assert_eq!(now, &OsString::from(before), "word {index}");
        }
    }
    assert_eq!(rewritten, 2);
    assert!(passed.iter().any(|w| w == hostile));

    // The wrapper's info lines land in the domain log, one per rewrite.
    assert_eq!(log.matches("usbpass-qemu: info: ").count(), 2, "{log}");
    assert!(log.contains("rule=receiver mode=id"), "{log}");
    assert!(log.contains("rule=kbd mode=port"), "{log}");

    let qtree = virsh_ok(&["qemu-monitor-command", &domain, "--hmp", "info qtree"]);
    let device_block = |id: &str| {
        let start = qtree
            .find(&format!("dev: usb-host, id \"{id}\""))
            .unwrap_or_else(|| panic!("{id} in qtree:\n{qtree}"));
        qtree[start..]
            .lines()
            .take(16)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let kv = device_block("ua-kv");
    assert!(kv.contains("vendorid = 1133 (0x46d)"), "{kv}");
    assert!(kv.contains("productid = 50475 (0xc52b)"), "{kv}");
    assert!(kv.contains("hostaddr = 0 (0x0)"), "{kv}");
    let js = device_block("ua-json");
    assert!(js.contains("hostbus = 1 (0x1)"), "{js}");
    assert!(js.contains("hostport = \"3\""), "{js}");
    assert!(js.contains("hostdevice = \"\""), "{js}");
}
