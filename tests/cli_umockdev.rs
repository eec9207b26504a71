//! The `usbpass` command line against a recorded USB tree: the binary runs under
//! `umockdev-run` with `tests/umockdev/usb-tree.umockdev`, so udev and sysfs show two
//! controllers, a hub and seven devices. libvirt is its in-process test driver
//! (`test:///default`, one running domain named `test`), so no libvirtd is needed,
//! except for `why` against the real libvirtd (its own firmware-only domain).
//! With `CI` set a missing umockdev-run fails the tests; otherwise they skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use usbpass::rules::Config;

fn umockdev_available() -> bool {
    let found = Command::new("umockdev-run").arg("--help").output().is_ok();
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set and umockdev-run is missing (apt-get install umockdev)");
        }
        eprintln!("skipping: umockdev-run is not installed");
    }
    found
}

struct Cli {
    directory: tempfile::TempDir,
}

impl Cli {
    fn new(rules: &str) -> Cli {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("usbpass.toml"), rules).unwrap();
        Cli { directory }
    }

    fn config(&self) -> PathBuf {
        self.directory.path().join("usbpass.toml")
    }

    fn run(&self, args: &[&str]) -> Output {
        let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/umockdev/usb-tree.umockdev");
        Command::new("umockdev-run")
            .arg("-d")
            .arg(tree)
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_usbpass"))
            .arg("--config")
            .arg(self.config())
            .arg("--state")
            .arg(self.directory.path().join("state.json"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "usbpass {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Fails with exactly one line on stderr; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(!output.status.success(), "usbpass {args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "usbpass {args:?}: {stderr}");
        stderr.trim_end().to_string()
    }

    fn rules_text(&self) -> String {
        std::fs::read_to_string(self.config()).unwrap()
    }
}

const START: &str = "# my host\nuri = \"test:///default\"\n";

#[test]
fn list_shows_every_device_with_rule_and_place() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(&format!(
        "{START}[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = [\"win11\", \"test\"]\n"
    ));
    let table = cli.ok(&["list"]);
    let receiver = table.lines().find(|l| l.contains("046d:c52b")).unwrap();
    assert!(receiver.contains("1-2.3"), "{receiver}");
    assert!(receiver.contains("receiver -> test"), "{receiver}");
    assert!(receiver.trim_end().ends_with("host"), "{receiver}");
    assert!(table
        .lines()
        .find(|l| l.contains("05e3:0610"))
        .unwrap()
        .contains("(hub)"));

    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["list", "--json"])).unwrap();
    assert_eq!(json["libvirt_reachable"], true);
    let devices = json["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 9);
    let receiver = devices
        .iter()
        .find(|d| d["device"]["port_path"] == "1-2.3")
        .unwrap();
    assert_eq!(receiver["rule"], "receiver");
    assert_eq!(receiver["wanted_vm"], "test");
    // IDs the way users type them, and hubs marked.
    assert_eq!(receiver["device"]["id"], "046d:c52b");
    assert_eq!(receiver["device"]["hub"], false);
    assert!(devices
        .iter()
        .any(|d| d["device"]["hub"] == true && d["device"]["class"] == "09"));
}

#[test]
fn assign_and_unassign_edit_the_file_and_keep_comments() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(START);
    // Two identical adapters: the ID alone is ambiguous, and nothing is written.
    let error = cli.fails(&["assign", "0403:6001", "lab"]);
    assert!(
        error.starts_with("usbpass: device \"0403:6001\" is ambiguous, 2 devices match:"),
        "{error}"
    );
    assert!(
        error.contains("A10KZP4Q") && error.contains("A10KZP4R"),
        "{error}"
    );
    assert_eq!(cli.rules_text(), START);

    cli.ok(&["assign", "A10KZP4Q", "lab", "--by", "serial"]);
    cli.ok(&["assign", "1-2.3", "test", "--by", "port"]);
    let text = cli.rules_text();
    assert!(text.starts_with("# my host\n"), "{text}");
    let config = Config::load(&cli.config()).unwrap();
    assert_eq!(config.rules.len(), 2);
    assert_eq!(config.rules[0].matcher.serial.as_deref(), Some("A10KZP4Q"));
    assert_eq!(config.rules[1].matcher.port.as_deref(), Some("1-2.3"));

    let rules: serde_json::Value = serde_json::from_str(&cli.ok(&["rules", "--json"])).unwrap();
    assert_eq!(rules[0]["devices"][0]["serial"], "A10KZP4Q");
    assert_eq!(rules[1]["devices"][0]["port_path"], "1-2.3");

    // Assigning the same device again moves its existing rule's first choice.
    cli.ok(&["assign", "A10KZP4Q", "test", "--by", "serial"]);
    let config = Config::load(&cli.config()).unwrap();
    assert_eq!(config.rules.len(), 2);
    assert_eq!(config.rules[0].vms, ["test", "lab"]);

    cli.ok(&["unassign", "1-2.3"]);
    cli.ok(&["unassign", &config.rules[0].name]);
    assert!(Config::load(&cli.config()).unwrap().rules.is_empty());
    assert!(cli.rules_text().starts_with("# my host\n"));
}

#[test]
fn device_errors_are_one_line() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(START);
    assert_eq!(
        cli.fails(&["assign", "dead:beef", "lab", "--by", "serial"]),
        "usbpass: no present usb device matches \"dead:beef\""
    );
    let error = cli.fails(&["attach", "1-2", "test"]);
    assert!(error.contains("is a hub"), "{error}");
    let error = cli.fails(&["attach", "046d:c52b", "nosuchvm"]);
    assert_eq!(
        error,
        "usbpass: vm nosuchvm is not running on test:///default"
    );
    // The test driver cannot hot-plug: the error names the device and the vm.
    let error = cli.fails(&["attach", "046d:c52b", "test"]);
    assert!(
        error.starts_with("usbpass: cannot attach 046d:c52b at 001:006 (port 1-2.3) to vm test: "),
        "{error}"
    );
    let error = cli.fails(&["detach", "046d:c52b"]);
    assert_eq!(
        error,
        "usbpass: device 046d:c52b at 001:006 (port 1-2.3) is on the host, not in any running vm"
    );
}

#[test]
fn assign_ahead_of_the_plug_and_to_an_unknown_vm_says_so() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(START);
    // No rules yet: `rules` says so and how to add one, instead of printing nothing.
    let empty = cli.ok(&["rules"]);
    assert!(empty.contains("no rules yet"), "{empty}");
    assert!(empty.contains("usbpass assign DEVICE VM"), "{empty}");

    // A model that is not plugged in: the rule is written, and the user is told that
    // nothing matches yet. The VM is the test driver's own, so no warning.
    let output = cli.run(&["assign", "1234:5678", "test"]);
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8(output.stdout).unwrap();
    assert!(
        said.contains("sends any 1234:5678 device to test"),
        "{said}"
    );
    assert!(
        said.contains("nothing plugged in matches 1234:5678 yet"),
        "{said}"
    );
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(cli.rules_text().contains("id = \"1234:5678\""));

    // One device by address must be present to be told apart.
    assert_eq!(
        cli.fails(&["assign", "9:99", "test"]),
        "usbpass: no present usb device matches \"9:99\""
    );

    // A VM libvirt does not know: written (it may be defined later), with a warning
    // naming the VMs that are defined.
    let output = cli.run(&["assign", "046d:c52b", "tset"]);
    assert!(output.status.success());
    let warning = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        warning.trim_end(),
        "usbpass: warning: no vm named \"tset\" is defined at test:///default; defined vms: test"
    );
}

#[test]
fn why_explains_each_rule_the_vms_and_where_the_device_is() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(&format!(
        "{START}\
[[rule]]\nname = \"zigbee\"\nid = \"10c4:ea60\"\nvm = \"ha\"\n\n\
[[rule]]\nname = \"on-port\"\nport = \"1-4\"\nvm = \"lab\"\n\n\
[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = [\"win11\", \"test\"]\n\n\
[[rule]]\nname = \"logitech\"\nvendor = \"046d\"\nvm = \"test\"\n"
    ));
    let text = cli.ok(&["why", "046d:c52b"]);
    let line = |start: &str| {
        text.lines()
            .find(|line| line.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{text}"))
            .trim()
            .to_string()
    };
    assert!(text.starts_with("device 046d:c52b at "), "{text}");
    assert_eq!(
        line("zigbee"),
        "zigbee (line 3): id does not match: wants 10c4:ea60, the device has 046d:c52b"
    );
    assert_eq!(
        line("on-port"),
        "on-port (line 8): port does not match: wants 1-4, the device has 1-2.3"
    );
    assert_eq!(
        line("receiver"),
        "receiver (line 13): matches and decides: win11, then test"
    );
    assert_eq!(
        line("logitech"),
        "logitech (line 18): matches, but an earlier rule decided"
    );
    // libvirt's test driver defines one running domain, "test".
    assert_eq!(line("vm win11"), "vm win11: not defined");
    assert!(line("vm test").starts_with("vm test: running"), "{text}");
    assert_eq!(line("the rules want"), "the rules want it in test");
    assert_eq!(line("now:"), "now: host");
    assert!(
        text.contains("usbpass-qemu (the emulator wrapper) needs"),
        "{text}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&cli.ok(&["why", "046d:c52b", "--json"])).unwrap();
    assert_eq!(json["device"]["id"], "046d:c52b");
    assert_eq!(json["rules"][0]["verdict"], "mismatch");
    assert_eq!(json["rules"][0]["key"], "id");
    assert_eq!(json["rules"][2]["verdict"], "decides");
    assert_eq!(json["targets"][1]["state"], "running");
    assert_eq!(json["placement"]["wanted_vm"], "test");
    // A hub: every rule says hubs are never passed through.
    let hub = cli.ok(&["why", "1-2"]);
    assert!(hub.contains("never: hubs are not passed through"), "{hub}");
}

#[test]
fn list_and_why_show_a_switched_group_as_the_daemon_places_it() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(&format!(
        "{START}[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = [\"win11\", \"test\"]\ngroup = \"desk\"\n"
    ));
    // What `usbpass switch desk host` leaves beside the state file.
    std::fs::write(
        cli.directory.path().join("groups.json"),
        r#"{"desk": "host"}"#,
    )
    .unwrap();
    let table = cli.ok(&["list"]);
    let receiver = table.lines().find(|l| l.contains("046d:c52b")).unwrap();
    assert!(
        receiver.contains("receiver -> host (group desk switched)"),
        "{receiver}"
    );
    // No daemon runs here: switch says so in one line.
    let error = cli.fails(&["switch", "desk", "test"]);
    assert!(
        error.starts_with("usbpass: no usbpass daemon answers at "),
        "{error}"
    );
    assert!(
        error.ends_with("start it (systemctl start usbpass)"),
        "{error}"
    );
}

#[path = "support/libvirt_env.rs"]
mod libvirt_env;

#[test]
fn why_reads_vm_states_and_usb_ports_from_the_real_libvirtd() {
    if !umockdev_available() {
        return;
    }
    usbpass_require_libvirtd!();
    let domain = libvirt_env::TestDomain::define("why", "", " ports='4'", "");
    let cli = Cli::new(&format!(
        "uri = \"{}\"\n[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = [\"{}\", \"usbpass-no-such-vm\"]\n",
        libvirt_env::URI,
        domain.name
    ));
    let text = cli.ok(&["why", "046d:c52b"]);
    assert!(
        text.contains(&format!("vm {}: shut off", domain.name)),
        "{text}"
    );
    assert!(
        text.contains("vm usbpass-no-such-vm: not defined"),
        "{text}"
    );
    assert!(
        text.contains("the rules want it in a vm, but no vm of rule receiver runs"),
        "{text}"
    );
    domain.start();
    let text = cli.ok(&["why", "046d:c52b"]);
    assert!(
        text.contains(&format!(
            "vm {}: running, usb ports: 0 of 4 taken, 4 free",
            domain.name
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("the rules want it in {}", domain.name)),
        "{text}"
    );
    domain.destroy();
}

#[test]
fn check_reports_in_json_too() {
    if !umockdev_available() {
        return;
    }
    let cli = Cli::new(&format!(
        "{START}[[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"test\"\ngroup = \"desk\"\n"
    ));
    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["check", "--json"])).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["rules"], 1);
    assert_eq!(json["groups"][0], "desk");
    assert_eq!(json["uri"], "test:///default");
}
