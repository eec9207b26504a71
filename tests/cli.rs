//! The `usbpass` command line where no USB tree is needed: generated man page and
//! completions, the embedded default rules file, and status without a daemon.

use std::process::{Command, Output};

fn usbpass(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_usbpass"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn man_page_and_completions_come_from_the_clap_definition() {
    let man = usbpass(&["man"]);
    assert!(man.status.success());
    let man = stdout(&man);
    assert!(man.contains(".TH usbpass"), "{man}");
    for subcommand in [
        "daemon", "list", "assign", "unassign", "attach", "detach", "status", "check",
    ] {
        assert!(man.contains(subcommand), "man page lacks {subcommand}");
    }
    let directory = tempfile::tempdir().unwrap();
    let pages = directory.path().join("man1");
    assert!(usbpass(&["man", "--dir", pages.to_str().unwrap()])
        .status
        .success());
    for page in [
        "usbpass.1",
        "usbpass-assign.1",
        "usbpass-daemon.1",
        "usbpass-udev-rules.1",
    ] {
        let text = std::fs::read_to_string(pages.join(page)).unwrap();
        assert!(
            text.starts_with(".ie"),
            "{page}: {}",
            &text[..40.min(text.len())]
        );
    }
    for (shell, marker) in [
        ("bash", "_usbpass()"),
        ("zsh", "#compdef usbpass"),
        ("fish", "complete -c usbpass"),
    ] {
        let output = usbpass(&["completions", shell]);
        assert!(output.status.success(), "{shell}");
        assert!(
            stdout(&output).contains(marker),
            "{shell} completions lack {marker}"
        );
    }
}

#[test]
fn the_default_config_passes_check() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("usbpass.toml");
    let output = usbpass(&["default-config"]);
    assert!(output.status.success());
    std::fs::write(&path, &output.stdout).unwrap();
    let check = usbpass(&["--config", path.to_str().unwrap(), "check"]);
    assert!(check.status.success(), "{check:?}");
    assert!(stdout(&check).contains("ok, 0 rules"));
}

#[test]
fn status_without_a_daemon_says_so_and_fails() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("usbpass.toml");
    // An unreachable libvirt: a unix socket that does not exist.
    std::fs::write(
        &config,
        "uri = \"qemu+unix:///system?socket=/nonexistent/sock\"\n",
    )
    .unwrap();
    let state = directory.path().join("state.json");
    let output = usbpass(&[
        "--config",
        config.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "status",
        "--json",
    ]);
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["daemon_running"], false);
    assert_eq!(report["libvirt_reachable"], false);
    assert!(report["state_error"]
        .as_str()
        .unwrap()
        .contains("state.json"));
    assert!(report["libvirt_error"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/sock"));
}

#[test]
fn a_broken_state_file_is_reported_not_trusted() {
    let directory = tempfile::tempdir().unwrap();
    let state = directory.path().join("state.json");
    std::fs::write(&state, "{\"format\": 99}").unwrap();
    let output = usbpass(&[
        "--config",
        "/nonexistent.toml",
        "--state",
        state.to_str().unwrap(),
        "status",
    ]);
    assert!(!output.status.success());
    let text = stdout(&output);
    assert!(
        text.contains("has format 99, this usbpass reads format 2"),
        "{text}"
    );
}
