//! The node-device source against the real libvirtd (qemu:///system), and the choice of
//! source in the CLI.
//!
//! This machine's kernel has no USB, so libvirt lists no `usb_device` node here and no
//! plug can be made: these tests prove that the listing works (empty, as libvirt's own
//! listing), that the node-device and close callbacks register, that a broken connection
//! reaches the daemon's channel, and that dropping the source deregisters everything
//! (the worker ends and the connection closes on the server). The plug and unplug
//! events themselves need a host with USB (the e2e VM).
//!
//! Needs root and libvirtd (started with tests/support/start-libvirtd when it does not
//! answer); skips without them, fails under `CI`.

use std::process::{Command, Output};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use usbpass::event::Event;
use usbpass::host::DeviceSource;
use usbpass::hypervisor::libvirt::node_device_source::{list_usb_devices, LibvirtDeviceSource};

#[path = "support/libvirt_env.rs"]
mod libvirt_env;

use libvirt_env::{our_clients, require_virt_admin, virsh_ok, wait_until, URI};

/// Only a deadline for declaring failure, never a measurement.
const DEADLINE: Duration = Duration::from_secs(30);

/// One test at a time: they count this process's client connections on the server.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The usb_device nodes libvirt itself lists, by virsh.
fn virsh_usb_devices() -> usize {
    virsh_ok(&["nodedev-list", "--cap", "usb_device"])
        .lines()
        .filter(|line| !line.trim().is_empty())
        .count()
}

#[test]
fn the_source_lists_what_libvirt_lists_and_its_watcher_goes_with_it() {
    usbpass_require_libvirtd!();
    if !require_virt_admin() {
        return;
    }
    let _serial = serial();
    wait_until("earlier connections closing", || {
        our_clients().unwrap().is_empty()
    });
    let (sender, events) = usbpass::event::event_channel();
    let mut source = LibvirtDeviceSource::open(URI, sender).expect("open the node device source");
    assert!(
        source.is_watching(),
        "the node device callback is registered"
    );
    assert_eq!(source.uri(), URI);
    assert_eq!(our_clients().unwrap().len(), 1, "one connection of our own");

    let devices = source.enumerate().expect("enumerate through libvirt");
    eprintln!("libvirt's usb devices here: {devices:?}");
    // Every usb_device node with an interface is listed; here (no USB) that is none.
    assert!(devices.len() <= virsh_usb_devices());
    for device in &devices {
        assert!(device.syspath.starts_with("/sys/"), "{device:?}");
        assert_eq!(device.serial, None, "libvirt reports no serial");
    }
    // A second listing (SIGHUP) works on the same connection.
    assert_eq!(source.enumerate().expect("enumerate again"), devices);
    // The one-shot listing of the CLI agrees.
    assert_eq!(list_usb_devices(URI).expect("list for the cli"), devices);

    // Nothing arrives unasked.
    match events.recv_timeout(Duration::from_millis(200)) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("unexpected event: {other:?}"),
    }

    // Dropping the source deregisters its callbacks: libvirt frees their senders, the
    // worker sees its channel closed and lets go of its reference on the connection,
    // and the connection closes on the server. A callback left registered would keep
    // the worker, and so the connection, alive.
    drop(source);
    wait_until("the source's connection closing", || {
        our_clients().unwrap().is_empty()
    });
    // The daemon's channel is not held by anything of the source any more.
    assert_eq!(events.recv(), Err(mpsc::RecvError));
}

#[test]
fn a_broken_connection_stops_the_daemon_through_its_channel() {
    usbpass_require_libvirtd!();
    if !require_virt_admin() {
        return;
    }
    let _serial = serial();
    wait_until("earlier connections closing", || {
        our_clients().unwrap().is_empty()
    });
    let (sender, events) = usbpass::event::event_channel();
    let source = LibvirtDeviceSource::open(URI, sender).expect("open the node device source");
    let clients = our_clients().unwrap();
    assert_eq!(clients.len(), 1, "{clients:?}");
    let output = Command::new("virt-admin")
        .args(["client-disconnect", "libvirtd", &clients[0]])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    match events.recv_timeout(DEADLINE) {
        Ok(Event::SourceFailed { source, message }) => {
            assert_eq!(source, "libvirt node devices");
            assert!(
                message.starts_with("connection to qemu:///system lost: "),
                "{message}"
            );
        }
        other => panic!("expected SourceFailed, got {other:?}"),
    }
    drop(source);
    wait_until("the source's connection closing", || {
        our_clients().unwrap().is_empty()
    });
}

#[test]
fn a_closed_uri_is_an_error_naming_it() {
    let (sender, _events) = usbpass::event::event_channel();
    let uri = "qemu+unix:///system?socket=/nonexistent/usbpass-test-sock";
    let error = LibvirtDeviceSource::open(uri, sender).expect_err("no libvirtd there");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("cannot list libvirt's node devices at {uri}: ")),
        "{message}"
    );
    assert!(list_usb_devices(uri).is_err());
}

fn usbpass(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_usbpass"))
        .args(args)
        .output()
        .unwrap()
}

fn rules_file(text: &str) -> (tempfile::TempDir, String) {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("usbpass.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_string();
    (directory, path)
}

#[test]
fn check_refuses_a_serial_rule_for_a_remote_host_in_one_line() {
    let (_directory, path) = rules_file(
        "uri = \"qemu+ssh://other/system\"\n\n\
         [[rule]]\nname = \"receiver\"\nid = \"046d:c52b\"\nvm = \"win11\"\n\n\
         [[rule]]\nname = \"zigbee\"\nid = \"10c4:ea60\"\nserial = \"Z1\"\nvm = \"ha\"\n",
    );
    let output = usbpass(&["--config", &path, "check"]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{path}:8: rule \"zigbee\" matches by serial, which libvirt's node devices do not \
         report for qemu+ssh://other/system"
    );
    assert!(
        stderr.lines().any(|line| line.ends_with(&expected)),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The daemon refuses the same file at start, before it opens anything.
    let state = format!("{path}.state");
    let output = usbpass(&["--config", &path, "--state", &state, "daemon"]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.lines().any(|line| line.ends_with(&expected)),
        "{stderr}"
    );

    // The same rules on this machine's libvirt are fine, and say where devices come from.
    let (_directory, path) = rules_file(
        "[[rule]]\nname = \"zigbee\"\nid = \"10c4:ea60\"\nserial = \"Z1\"\nvm = \"ha\"\n",
    );
    let output = usbpass(&["--config", &path, "check"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.ends_with("usb devices from udev\n"), "{stdout}");
    // A remote uri without serial rules passes, reading libvirt's node devices.
    let (_directory, path) = rules_file(
        "uri = \"qemu+ssh://other/system\"\n[[rule]]\nname = \"r\"\nid = \"046d:c52b\"\nvm = \"v\"\n",
    );
    let output = usbpass(&["--config", &path, "check"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.ends_with("usb devices from libvirt's node devices\n"),
        "{stdout}"
    );
}

#[test]
fn list_reads_libvirts_node_devices_when_the_file_says_so() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let (_directory, path) = rules_file(&format!(
        "uri = \"{URI}\"\ndevice_source = \"libvirt\"\n[[rule]]\nname = \"r\"\nid = \"046d:c52b\"\nvm = \"v\"\n"
    ));
    let output = usbpass(&["--config", &path, "list", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let devices = listing["devices"].as_array().unwrap();
    assert!(devices.len() <= virsh_usb_devices(), "{listing}");
    // Through a socket where no libvirtd answers, list fails naming the source.
    let (_directory, path) = rules_file(
        "uri = \"qemu+unix:///system?socket=/nonexistent/usbpass-test-sock\"\ndevice_source = \"libvirt\"\n",
    );
    let output = usbpass(&["--config", &path, "list"]);
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot list libvirt's node devices at qemu+unix:///system"),
        "{stderr}"
    );
}

/// A host for libvirt's in-process test driver: a root hub with its hub interface, a
/// receiver behind it with its HID interface, and a device whose interfaces libvirt has
/// not reported (yet).
const TEST_DRIVER_NODE: &str = "<node>
  <device>
    <name>usb_usb1</name>
    <path>/sys/devices/pci0000:00/0000:00:14.0/usb1</path>
    <parent>computer</parent>
    <capability type='usb_device'>
      <bus>1</bus>
      <device>1</device>
      <product id='0x0002'>2.0 root hub</product>
      <vendor id='0x1d6b'>Linux Foundation</vendor>
    </capability>
  </device>
  <device>
    <name>usb_1_0_1_0</name>
    <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/1-0:1.0</path>
    <parent>usb_usb1</parent>
    <capability type='usb'>
      <number>0</number>
      <class>9</class>
      <subclass>0</subclass>
      <protocol>0</protocol>
    </capability>
  </device>
  <device>
    <name>usb_1_2</name>
    <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2</path>
    <parent>usb_usb1</parent>
    <capability type='usb_device'>
      <bus>1</bus>
      <device>5</device>
      <product id='0xc52b'>Unifying Receiver</product>
      <vendor id='0x046d'>Logitech, Inc.</vendor>
    </capability>
  </device>
  <device>
    <name>usb_1_2_1_0</name>
    <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0</path>
    <parent>usb_1_2</parent>
    <capability type='usb'>
      <number>0</number>
      <class>3</class>
      <subclass>1</subclass>
      <protocol>1</protocol>
    </capability>
  </device>
  <device>
    <name>usb_1_3</name>
    <path>/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3</path>
    <parent>usb_usb1</parent>
    <capability type='usb_device'>
      <bus>1</bus>
      <device>6</device>
      <product id='0x6001'/>
      <vendor id='0x0403'/>
    </capability>
  </device>
</node>
";

#[test]
fn the_test_drivers_usb_node_devices_become_usb_devices() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("node.xml");
    std::fs::write(&path, TEST_DRIVER_NODE).unwrap();
    let uri = format!("test://{}", path.display());

    let devices = list_usb_devices(&uri).expect("list the test driver's node devices");
    let summary: Vec<String> = devices
        .iter()
        .map(|d| {
            format!(
                "{} hub={} parent={:?} interfaces={:?} name={}",
                d,
                d.is_hub(),
                d.parent_hub,
                d.interface_classes
                    .iter()
                    .map(|i| format!("{:02x}{:02x}{:02x}", i.class, i.subclass, i.protocol))
                    .collect::<Vec<_>>(),
                d.display_name()
            )
        })
        .collect();
    // usb_1_3 has no interface node: it cannot be told from a hub, so it is left out.
    assert_eq!(
        summary,
        [
            "046d:c52b at 001:005 (port 1-2) hub=false parent=Some(\"usb1\") \
             interfaces=[\"030101\"] name=Logitech, Inc. Unifying Receiver",
            "1d6b:0002 at 001:001 (port usb1) hub=true parent=None \
             interfaces=[\"090000\"] name=Linux Foundation 2.0 root hub",
        ]
    );
    assert!(devices.iter().all(|device| device.serial.is_none()));
    assert_eq!(
        devices[0].syspath,
        "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2"
    );

    // The daemon's source on the same driver: the watcher registers, and it lists the
    // same devices.
    let (sender, _events) = usbpass::event::event_channel();
    let mut source = LibvirtDeviceSource::open(&uri, sender).expect("open the test driver");
    assert!(source.is_watching());
    assert_eq!(source.enumerate().expect("enumerate"), devices);
}

#[test]
fn the_daemon_waits_for_a_host_that_does_not_answer_and_stops_on_sigterm() {
    let (directory, path) = rules_file(
        "uri = \"qemu+unix:///system?socket=/nonexistent/usbpass-test-sock\"\n\
         device_source = \"libvirt\"\n",
    );
    let state = directory.path().join("state.json");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_usbpass"))
        .args([
            "--config",
            &path,
            "--state",
            state.to_str().unwrap(),
            "daemon",
        ])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Two attempts (0.5 s apart): it is still running, not exiting for systemd to
    // restart in a tight loop.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
    let kill = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = daemon.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(
        stderr.contains(
            "cannot list libvirt's node devices at \
             qemu+unix:///system?socket=/nonexistent/usbpass-test-sock: "
        ) && stderr.contains("; trying again in 0.5 s"),
        "{stderr}"
    );
}
