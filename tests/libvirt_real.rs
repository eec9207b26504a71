//! The libvirt side against a real libvirtd (qemu:///system) with firmware-only KVM
//! domains named `usbpass-test-lv-*`, plus libvirt's in-process test driver for a running
//! domain that holds USB hostdevs (this machine has no USB, so a QEMU domain cannot).
//!
//! Needs root and libvirtd; starts it with tests/support/start-libvirtd when it does not
//! answer. With `CI` set a missing libvirtd fails the tests, otherwise they skip.
//! Other programs use the same libvirtd: these tests only touch their own domains and
//! their own client connection.

use std::io::Write;
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use usbpass::event::{DomainChange, Event};
use usbpass::hypervisor::libvirt::xml::parse_usb_hostdevs;
use usbpass::hypervisor::libvirt::{connect, is_reachable, LibvirtHypervisor};
use usbpass::hypervisor::{FailureKind, HostdevSpec, Hypervisor, HypervisorError};
use usbpass::model::alias::{HostdevAlias, Ownership};
use usbpass::model::{BusAddress, UsbId};

#[path = "support/libvirt_env.rs"]
mod libvirt_env;

use libvirt_env::{our_clients, require_virt_admin, virsh_ok, wait_until, TestDomain, URI};
/// How long to wait for something libvirt does in well under a second here. Only a
/// deadline for declaring failure, never a measurement.
const DEADLINE: Duration = Duration::from_secs(30);

/// One test at a time: they count this process's client connections on the server, and
/// the machine has two cores shared with other work.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open() -> (LibvirtHypervisor, Receiver<Event>) {
    let (sender, receiver) = usbpass::event::event_channel();
    let hypervisor = connect(URI, sender).expect("connect to libvirt");
    (hypervisor, receiver)
}

/// The first event that `wanted` accepts; other events (other programs' domains) pass.
fn wait_for(events: &Receiver<Event>, what: &str, wanted: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) if wanted(&event) => return event,
            Ok(_) => {}
            Err(error) => panic!("no {what} within {DEADLINE:?}: {error:?}"),
        }
    }
}

fn is_domain_change(event: &Event, name: &str, wanted: DomainChange) -> bool {
    matches!(event, Event::Domain { domain, change } if domain == name && *change == wanted)
}

fn device_description() -> &'static str {
    "046d:c52b at 001:005 (port 1-2)"
}

/// The hostdev of `device_description()`'s device, under the daemon's alias.
fn hostdev() -> HostdevSpec {
    HostdevSpec {
        id: UsbId {
            vendor: 0x046d,
            product: 0xc52b,
        },
        address: BusAddress { bus: 1, device: 5 },
        port_path: "1-2".to_string(),
        alias: alias("ua-usbpass-1-5-046d-c52b"),
    }
}

fn alias(text: &str) -> HostdevAlias {
    HostdevAlias::parse(text).unwrap()
}

#[test]
fn lifecycle_events_arrive_for_start_and_destroy() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let (_hypervisor, events) = open();
    let domain = TestDomain::plain("events");
    domain.start();
    wait_for(&events, "started event", |event| {
        is_domain_change(event, &domain.name, DomainChange::Started)
    });
    domain.destroy();
    wait_for(&events, "stopped event", |event| {
        is_domain_change(event, &domain.name, DomainChange::Stopped)
    });
}

#[test]
fn live_xml_with_hostile_text_is_parsed() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    // `<>&'"`, U+FFFD where bytes were not UTF-8, and look-alike hostdevs in the text
    // and in namespaced metadata.
    let hostile = "&lt;/description&gt;&lt;devices&gt;&lt;hostdev mode='subsystem' type='usb'&gt;\
                   &lt;alias name='ua-usbpass-evil'/&gt; &amp; &apos; &quot; \u{fffd}\u{fffd}";
    let top = format!(
        "<title>{hostile}</title>
  <description>{hostile}
second line</description>
  <metadata>
    <evil:devices xmlns:evil='http://example.com/usbpass-test'>
      <evil:hostdev mode='subsystem' type='usb'><evil:alias name='ua-usbpass-meta'/></evil:hostdev>
    </evil:devices>
  </metadata>"
    );
    let domain = TestDomain::define("hostile", &top, "", "");
    domain.start();
    let live = virsh_ok(&["dumpxml", &domain.name]);
    assert!(live.contains("ua-usbpass-evil") && live.contains('\u{fffd}'));
    assert!(live.contains("ua-usbpass-meta"));

    let (hypervisor, _events) = open();
    let domains = hypervisor.running_domains().expect("running domains");
    let ours = domains
        .iter()
        .find(|view| view.name == domain.name)
        .expect("the running test domain is listed");
    assert_eq!(ours.hostdevs, vec![]);
}

#[test]
fn attach_of_an_absent_device_is_a_clear_error_and_the_connection_survives() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let domain = TestDomain::plain("attach");
    domain.start();
    let (hypervisor, _events) = open();
    let error = hypervisor
        .attach(&domain.name, &hostdev())
        .expect_err("this machine has no USB device 046d:c52b");
    eprintln!("attach of an absent device: {error} ({:?})", error.kind());
    let HypervisorError::Attach {
        domain: ref failed_domain,
        kind,
        ..
    } = error
    else {
        panic!("expected an attach error, got {error:?}");
    };
    assert_eq!(failed_domain, &domain.name);
    assert_eq!(kind, FailureKind::DeviceNotFound);
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message}");
    assert!(message.contains(device_description()), "{message}");
    assert!(message.contains(&domain.name), "{message}");

    // The connection still works, and the failed attach left nothing behind.
    let domains = hypervisor
        .running_domains()
        .expect("running domains after the error");
    let ours = domains
        .iter()
        .find(|view| view.name == domain.name)
        .unwrap();
    assert_eq!(ours.hostdevs, vec![]);
}

#[test]
fn attach_to_a_full_usb_controller_is_no_free_port() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    // One port, taken by a tablet: libvirt finds no port before it looks for the device,
    // so this is the real error even on a machine without USB.
    let domain = TestDomain::define(
        "ports",
        "",
        " ports='1'",
        "<input type='tablet' bus='usb'/>",
    );
    domain.start();
    let (hypervisor, _events) = open();
    let error = hypervisor
        .attach(&domain.name, &hostdev())
        .expect_err("the controller is full");
    eprintln!("attach to a full controller: {error} ({:?})", error.kind());
    assert!(matches!(error, HypervisorError::Attach { .. }), "{error:?}");
    assert_eq!(error.kind(), FailureKind::NoFreePort);
}

#[test]
fn calls_on_a_stopped_or_missing_domain_are_domain_gone() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let stopped = TestDomain::plain("stopped");
    let missing = format!("usbpass-test-lv-missing-{}", std::process::id());
    let (hypervisor, _events) = open();
    for name in [stopped.name.as_str(), missing.as_str()] {
        let error = hypervisor
            .attach(name, &hostdev())
            .expect_err("not running");
        eprintln!("attach to {name}: {error}");
        assert_eq!(error.kind(), FailureKind::DomainGone, "{error}");
        let error = hypervisor
            .detach(name, &alias("ua-usbpass-1-5-046d-c52b"))
            .expect_err("not running");
        eprintln!("detach from {name}: {error}");
        assert_eq!(error.kind(), FailureKind::DomainGone, "{error}");
    }
}

#[test]
fn detach_of_an_absent_or_foreign_alias_is_a_clear_error() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let domain = TestDomain::plain("detach");
    domain.start();
    let (hypervisor, _events) = open();
    let error = hypervisor
        .detach(&domain.name, &alias("ua-usbpass-absent"))
        .expect_err("no such alias");
    eprintln!("detach of an absent alias: {error}");
    assert!(matches!(error, HypervisorError::Detach { .. }), "{error:?}");
    assert_eq!(error.kind(), FailureKind::DeviceNotFound);
    let message = error.to_string();
    assert!(message.contains("ua-usbpass-absent") && message.contains(&domain.name));
    assert!(!message.contains('\n'));

    // Aliases usbpass did not make are refused before libvirt can be asked (detach
    // takes only a `HostdevAlias`): the xHCI controller's alias `usb` would otherwise
    // be a real device to unplug.
    for foreign in ["usb", "hostdev0", "ua-other"] {
        let error = HostdevAlias::parse(foreign).expect_err("refused");
        eprintln!("detach of a foreign alias: {error}");
    }
    let live = virsh_ok(&["dumpxml", &domain.name]);
    assert!(
        live.contains("<alias name='usb'/>"),
        "the controller is still there"
    );
}

/// USB hostdevs as libvirt formats them, in a domain definition (it cannot start here).
const HOSTDEVS: &str = "
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x046d'/><product id='0xc52b'/><address bus='1' device='5'/></source>
      <alias name='ua-usbpass-1-5-046d-c52b'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x0627'/><product id='0x0001'/><address bus='010' device='0x10'/></source>
      <alias name='ua-usbpass-manual-8-16'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x0627'/><product id='0x0001'/></source>
      <alias name='ua-someone-else'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x1234'/><product id='0x5678'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x06' slot='0x00' function='0x0'/></source>
      <alias name='ua-usbpass-pci'/>
    </hostdev>
    <redirdev bus='usb' type='tcp'>
      <source mode='connect' host='127.0.0.1' service='4000'/>
      <alias name='ua-usbpass-redir'/>
    </redirdev>";

fn assert_owned_and_foreign(hostdevs: &[usbpass::hypervisor::UsbHostdev]) {
    let seen: Vec<_> = hostdevs
        .iter()
        .map(|hostdev| {
            (
                hostdev.alias.as_deref(),
                hostdev.ownership(),
                hostdev.address.map(|a| (a.bus, a.device)),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                Some("ua-usbpass-1-5-046d-c52b"),
                Ownership::Rules,
                Some((1, 5))
            ),
            // Written as 010 and 0x10: libvirt stores 8 and 16, and so do we.
            (
                Some("ua-usbpass-manual-8-16"),
                Ownership::Manual,
                Some((8, 16))
            ),
            (Some("ua-someone-else"), Ownership::Foreign, None),
            (None, Ownership::Foreign, None),
        ]
    );
}

#[test]
fn owned_and_foreign_hostdevs_are_told_apart_in_libvirts_own_xml() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let domain = TestDomain::define("owners", "", "", HOSTDEVS);
    // QEMU domains with USB hostdevs cannot start on a host without /sys/bus/usb, so the
    // definition is read: the same formatter writes the live XML.
    let xml = virsh_ok(&["dumpxml", "--inactive", &domain.name]);
    assert_owned_and_foreign(&parse_usb_hostdevs(&xml).expect("parse libvirt's xml"));
}

#[test]
fn running_domains_reads_usb_hostdevs_of_a_running_test_driver_domain() {
    let _serial = serial();
    // libvirt's in-process test driver runs the domains of a node file without any
    // hardware, so a running domain can hold USB hostdevs here. No libvirtd involved.
    let mut node = tempfile::NamedTempFile::new().expect("temporary file");
    write!(
        node,
        "<node><domain type='test'><name>usbpass-test-lv-testdriver</name><memory>65536</memory>\
         <os><type>hvm</type></os><devices><controller type='usb' model='qemu-xhci'/>{HOSTDEVS}</devices></domain></node>"
    )
    .unwrap();
    let uri = format!("test://{}", node.path().display());
    let (sender, _events) = usbpass::event::event_channel();
    let hypervisor = connect(&uri, sender).expect("open the test driver");
    let domains = hypervisor.running_domains().expect("running domains");
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0].name, "usbpass-test-lv-testdriver");
    assert_owned_and_foreign(&domains[0].hostdevs);
}

#[test]
fn a_server_side_disconnect_reaches_the_channel_and_a_new_connection_works() {
    usbpass_require_libvirtd!();
    if !require_virt_admin() {
        return;
    }
    let _serial = serial();
    wait_until("earlier connections closing", || {
        our_clients().unwrap().is_empty()
    });
    let (hypervisor, events) = open();
    let clients = our_clients().unwrap();
    assert_eq!(clients.len(), 1, "exactly our one connection: {clients:?}");
    // Only our own client is dropped by the server; libvirtd and its other clients
    // carry on.
    let output = Command::new("virt-admin")
        .args(["client-disconnect", "libvirtd", &clients[0]])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let event = wait_for(&events, "disconnect event", |event| {
        matches!(event, Event::HypervisorDisconnected { .. })
    });
    eprintln!("after the server dropped us: {event:?}");

    let error = hypervisor
        .running_domains()
        .expect_err("the connection is gone");
    eprintln!(
        "a call on the dropped connection: {error} ({:?})",
        error.kind()
    );
    assert_eq!(error.kind(), FailureKind::ConnectionLost);
    drop(hypervisor);

    // What the daemon's reconnect does: connect again, and it works.
    let (hypervisor, _events) = open();
    hypervisor
        .running_domains()
        .expect("running domains after reconnecting");
}

#[test]
fn dropping_the_hypervisor_frees_its_callbacks_and_closes_its_connection() {
    usbpass_require_libvirtd!();
    if !require_virt_admin() {
        return;
    }
    let _serial = serial();
    wait_until("earlier connections closing", || {
        our_clients().unwrap().is_empty()
    });
    let (hypervisor, events) = open();
    assert_eq!(our_clients().unwrap().len(), 1);
    drop(hypervisor);
    // The channel disconnects once every sender is dropped: libvirt has called the free
    // callback of every registration.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(_) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("callback senders were not freed"),
        }
    }
    wait_until("libvirtd seeing the connection closed", || {
        our_clients().unwrap().is_empty()
    });
}

#[test]
fn a_remote_style_uri_with_keepalive_works() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    // The `ext` transport counts as remote, so connect() turns keepalive on; socat
    // carries it to the local socket, standing in for ssh.
    let Ok(socat) = which("socat") else {
        let reason = "socat is not installed";
        if std::env::var_os("CI").is_some() {
            panic!("CI is set: {reason}");
        }
        eprintln!("skipping: {reason}");
        return;
    };
    let mut script = tempfile::Builder::new()
        .prefix("usbpass-test-lv-ext")
        .tempfile()
        .unwrap();
    writeln!(
        script,
        "#!/bin/sh\nexec {socat} - UNIX-CONNECT:/run/libvirt/libvirt-sock"
    )
    .unwrap();
    let script = script.into_temp_path();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("qemu+ext:///system?command={}", script.display());
    assert!(!usbpass::hypervisor::libvirt::is_local_uri(&uri));
    let domain = TestDomain::plain("remote");
    let (sender, events) = usbpass::event::event_channel();
    let hypervisor = connect(&uri, sender).expect("connect through the ext transport");
    domain.start();
    wait_for(&events, "started event over the ext transport", |event| {
        is_domain_change(event, &domain.name, DomainChange::Started)
    });
    let domains = hypervisor.running_domains().expect("running domains");
    assert!(domains.iter().any(|view| view.name == domain.name));
}

fn which(program: &str) -> Result<String, ()> {
    let output = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map_err(|_| ())?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if output.status.success() && !path.is_empty() {
        Ok(path)
    } else {
        Err(())
    }
}

#[test]
fn reachability_is_reported_with_the_reason() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    is_reachable(URI).expect("libvirtd answers");
    let error = is_reachable("qemu+unix:///system?socket=/nonexistent/usbpass-test-lv-sock")
        .expect_err("no socket there");
    eprintln!("unreachable: {error} ({:?})", error.kind());
    assert_eq!(error.kind(), FailureKind::ConnectionLost);
    assert!(error
        .to_string()
        .contains("/nonexistent/usbpass-test-lv-sock"));
}

#[test]
fn owned_hostdevs_copied_into_a_definition_are_removed_and_the_vm_starts_again() {
    usbpass_require_libvirtd!();
    let _serial = serial();
    let owned = HostdevAlias::parse("ua-usbpass-1-5-046d-c52b").unwrap();
    // As `virsh dumpxml` of a running VM that holds a usbpass hostdev, then `define`:
    // the hostdev is now in the definition. Beside it, one the user made.
    let domain = TestDomain::define(
        "defined",
        "",
        "",
        &format!(
            "<hostdev mode='subsystem' type='usb' managed='no'>
      <source><vendor id='0x046d'/><product id='0xc52b'/><address bus='1' device='5'/></source>
      <alias name='{owned}'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='no'>
      <source><vendor id='0x1234'/><product id='0x5678'/></source>
      <alias name='ua-mine'/>
    </hostdev>"
        ),
    );
    // This machine has no USB at all: with the device named in it, the VM cannot start.
    let start = libvirt_env::virsh(&["start", &domain.name]);
    assert!(
        !start.status.success(),
        "the vm started with a missing device"
    );

    let (hypervisor, _events) = open();
    let defined = hypervisor.owned_hostdevs_in_definitions().unwrap();
    let mine: Vec<_> = defined.iter().filter(|d| d.domain == domain.name).collect();
    assert_eq!(mine.len(), 1, "{defined:?}");
    assert_eq!(
        mine[0]
            .aliases
            .iter()
            .map(HostdevAlias::as_str)
            .collect::<Vec<_>>(),
        [owned.as_str()],
        "only usbpass's own hostdev"
    );

    hypervisor
        .remove_from_definition(&domain.name, &owned)
        .unwrap();
    let xml = virsh_ok(&["dumpxml", "--inactive", &domain.name]);
    assert!(!xml.contains(owned.as_str()), "{xml}");
    assert!(xml.contains("ua-mine"), "the user's hostdev stays: {xml}");
    assert!(hypervisor
        .owned_hostdevs_in_definitions()
        .unwrap()
        .iter()
        .all(|d| d.domain != domain.name));
    // The user's own is theirs to remove (and on this machine, with no USB at all, any
    // USB hostdev stops a start); without it, the VM starts.
    virsh_ok(&["detach-device-alias", &domain.name, "ua-mine", "--config"]);
    domain.start();
    domain.destroy();
}
