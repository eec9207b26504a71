//! Table tests of the usbpass-qemu binary over QEMU command lines recorded from the real
//! libvirtd (tests/wrapper-data, made by tests/wrapper-data/generate): each case runs the
//! wrapper with a recording emulator and checks the argv it exec'd, word by word.

mod wrapper_common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use wrapper_common::*;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    argv: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    rules: Option<String>,
    sysfs: Option<String>,
    /// Words of the recorded argv replaced before the run (e.g. another `-name` form).
    #[serde(default)]
    argv_edits: BTreeMap<usize, String>,
    /// Texts the wrapper's stderr must hold.
    #[serde(default)]
    stderr_contains: Vec<String>,
    rewrites: BTreeMap<usize, String>,
    warnings: usize,
}

fn count_lines(stderr: &[u8], level: &str) -> usize {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with(&format!("usbpass-qemu: {level}: ")))
        .count()
}

#[test]
fn recorded_libvirt_command_lines() {
    let cases: Vec<Case> =
        serde_json::from_slice(&std::fs::read(data_dir().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("sys");
        match case.sysfs.as_deref() {
            None | Some("both") => fake_sysfs(&sysfs, &[&RECEIVER, &KEYBOARD]),
            Some("receiver-only") => fake_sysfs(&sysfs, &[&RECEIVER]),
            Some(other) => panic!("unknown sysfs {other}"),
        }
        let out = dir.path().join("argv");
        let recorder = recording_emulator(dir.path(), &out);
        let mut input = read_argv(&data_dir().join(&case.argv));
        for (index, value) in &case.argv_edits {
            input[*index] = value.into();
        }
        let mut env: Vec<(&str, OsString)> = vec![
            ("USBPASS_QEMU", recorder.clone().into()),
            ("USBPASS_SYSFS_ROOT", sysfs.into()),
        ];
        if let Some(rules) = &case.rules {
            env.push(("USBPASS_CONFIG", data_dir().join(rules).into()));
        }
        for (key, value) in &case.env {
            env.push((key.as_str(), value.into()));
        }
        let output = run_wrapper(&input, &env);
        assert!(output.status.success(), "{}: {output:?}", case.name);
        assert!(output.stdout.is_empty(), "{}: wrote to stdout", case.name);

        let mut expected = input.clone();
        expected[0] = recorder.into();
        for (index, value) in &case.rewrites {
            assert_ne!(
                expected[*index],
                OsString::from(value),
                "{}: no-op rewrite",
                case.name
            );
            expected[*index] = value.into();
        }
        let got = read_argv(&out);
        assert_eq!(got.len(), expected.len(), "{}", case.name);
        for (index, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(got, want, "{}: word {index}", case.name);
        }
        assert_eq!(
            count_lines(&output.stderr, "info"),
            case.rewrites.len(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            count_lines(&output.stderr, "warning"),
            case.warnings,
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        for text in &case.stderr_contains {
            assert!(stderr.contains(text.as_str()), "{}: {stderr}", case.name);
        }
    }
}

/// Words libvirt cannot write (XML carries no invalid UTF-8) but a hand-made command line
/// can: every byte must survive, and legacy specs must be rewritten as old QEMU read them.
#[test]
fn hostile_and_legacy_words() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = dir.path().join("sys");
    fake_sysfs(&sysfs, &[&RECEIVER, &KEYBOARD]);
    let out = dir.path().join("argv");
    let recorder = recording_emulator(dir.path(), &out);
    let mut input = read_argv(&data_dir().join("libvirt-commandline.argv"));
    let base = input.len();
    let extra: Vec<Vec<u8>> = vec![
        b"-fw_cfg".to_vec(),
        b"name=opt/x,string=\xff\xfe -device usb-host,hostbus=1,hostaddr=5".to_vec(),
        b"-name".to_vec(),
        b"-usbdevice".to_vec(),
        b"host:1.5".to_vec(),
        b"-usbdevice".to_vec(),
        b"host:001.006".to_vec(),
        b"-usbdevice".to_vec(),
        b"host:0627:0001".to_vec(),
        b"-usbdevice".to_vec(),
        b"host:auto:1.*:046d:*".to_vec(),
        b"-usbdevice".to_vec(),
        b"host:014.006".to_vec(),
        b"-device".to_vec(),
        b"usb-host,hostbus=1,hostaddr=5,id=\xc3\x28 \"quoted\" 'x',,y".to_vec(),
        b"disk image with spaces.img".to_vec(),
    ];
    input.extend(extra.into_iter().map(OsString::from_vec));
    let output = run_wrapper(
        &input,
        &[
            ("USBPASS_QEMU", recorder.clone().into()),
            ("USBPASS_SYSFS_ROOT", sysfs.into()),
        ],
    );
    assert!(output.status.success());
    let got = read_argv(&out);
    let mut expected = input.clone();
    expected[0] = recorder.into();
    // From the recorded libvirt part: the keyval and JSON usb-host devices.
    expected[45] =
        "usb-host,vendorid=0x046d,productid=0xc52b,id=ua-kv,bus=kvxhci.0,port=1,guest-reset=off"
            .into();
    expected[47] = r#"{"driver":"usb-host","vendorid":1575,"productid":1,"id":"ua-json","bus":"usb.0","port":"4","bootindex":2}"#.into();
    // `-name -usbdevice` makes "-usbdevice" a name: "host:1.5" is then a disk image.
    expected[base + 6] = "host:auto:*.*:0627:0001".into(); // 001.006: octal 1 and 6
    expected[base + 8] = "host:auto:*.*:0627:0001".into();
    // host:auto:... stays; host:014.006 is bus 12 (octal), absent: warned, unchanged.
    expected[base + 14] = OsString::from_vec(
        b"usb-host,vendorid=0x046d,productid=0xc52b,id=\xc3\x28 \"quoted\" 'x',,y".to_vec(),
    );
    assert_eq!(got.len(), expected.len());
    for (index, (got, want)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            got.as_bytes(),
            want.as_bytes(),
            "word {index}: {got:?} != {want:?}"
        );
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(count_lines(&output.stderr, "info"), 5, "{stderr}");
    assert_eq!(count_lines(&output.stderr, "warning"), 1, "{stderr}");
    assert!(
        stderr.contains("no usb device at bus 12 address 6"),
        "{stderr}"
    );
}
