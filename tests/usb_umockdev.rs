//! The udev layer under umockdev: `udev::enumerate` against a recorded-style device tree
//! (tests/umockdev/usb-tree.umockdev) run by `umockdev-run`, and `udev::open_monitor` polled
//! by the daemon's watch thread (as `usbpassd` runs it) against uevents that libumockdev's testbed sends inside a process running under
//! `umockdev-wrapper`.
//!
//! Each outer test re-runs this test executable under the umockdev tool, asking for one
//! `#[ignore]`d inner test by exact name, with `INNER_RUN_VARIABLE` set. The inner test
//! prints a marker line that the outer test looks for, so a renamed inner test cannot
//! pass by running nothing. Without umockdev the outer tests skip with a printed reason,
//! and fail when `CI` is set.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use usbpass::cli::device_spec::{parse_device_spec, resolve, ResolveError};
use usbpass::event::Event;
use usbpass::host::udev;
use usbpass::model::{BusAddress, InterfaceClass, UsbDevice};

const INNER_RUN_VARIABLE: &str = "USBPASS_UMOCKDEV_INNER_TEST";
const DEVICE_TREE: &str = "tests/umockdev/usb-tree.umockdev";
/// A guard against a hang, not a timing assertion: events arrive in milliseconds.
const EVENT_DEADLINE: Duration = Duration::from_secs(30);

fn device_tree_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(DEVICE_TREE)
}

/// True when `program probe_args` runs and succeeds. Without it: fail under CI,
/// otherwise print why and skip.
fn require_program(program: &str, probe_args: &[&str], test: &str) -> bool {
    let found = Command::new(program)
        .args(probe_args)
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    if !found {
        let reason = format!("{test}: {program} is not installed (Debian package umockdev)");
        if std::env::var_os("CI").is_some() {
            panic!("{reason}, and CI is set");
        }
        eprintln!("skipping {reason}");
    }
    found
}

/// Runs `inner_test` of this executable as the last argument of `tool_args`, and checks
/// that it ran and passed.
fn run_inner_test(tool_args: &[&str], inner_test: &str) {
    let executable = std::env::current_exe().expect("the test executable's path");
    let output = Command::new(tool_args[0])
        .args(&tool_args[1..])
        .arg(&executable)
        .args([inner_test, "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(INNER_RUN_VARIABLE, "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("umockdev runs the test executable");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "inner test {inner_test} failed under {tool_args:?}:\n{stdout}\n{stderr}"
    );
    let marker = format!("inner test ran: {inner_test}");
    assert!(
        stdout.contains(&marker) && stdout.contains("1 passed"),
        "inner test {inner_test} did not run:\n{stdout}\n{stderr}"
    );
}

/// Inner tests run only when an outer test asks for them.
fn is_inner_run(test: &str) -> bool {
    let inner = std::env::var_os(INNER_RUN_VARIABLE).is_some();
    if !inner {
        eprintln!("{test} needs umockdev; run it through its outer test");
    }
    inner
}

fn class(class: u8, subclass: u8, protocol: u8) -> InterfaceClass {
    InterfaceClass {
        class,
        subclass,
        protocol,
    }
}

fn text(value: &str) -> Option<String> {
    Some(value.to_string())
}

/// The devices of usb-tree.umockdev, in enumeration order (bus, then device number). The
/// broken `1-3`, which has no IDs and no class, is absent.
fn expected_devices() -> Vec<UsbDevice> {
    let xhci = "/sys/devices/pci0000:00/0000:00:14.0";
    let ehci = "/sys/devices/pci0000:00/0000:00:1d.0";
    let ftdi = |devnum: u16, port: &str, serial: &str| UsbDevice {
        syspath: format!("{xhci}/usb1/1-2/{port}"),
        bus: 1,
        devnum,
        vendor_id: 0x0403,
        product_id: 0x6001,
        serial: text(serial),
        port_path: port.to_string(),
        parent_hub: text("1-2"),
        device_class: 0,
        interface_classes: vec![class(0xff, 0xff, 0xff)],
        manufacturer: text("FTDI"),
        product: text("FT232R USB UART"),
        vendor_from_database: text("Future Technology Devices International, Ltd"),
        model_from_database: text("FT232 Serial (UART) IC"),
        strings_pending: false,
    };
    vec![
        UsbDevice {
            syspath: format!("{xhci}/usb1"),
            bus: 1,
            devnum: 1,
            vendor_id: 0x1d6b,
            product_id: 0x0002,
            serial: text("0000:00:14.0"),
            port_path: "usb1".into(),
            parent_hub: None,
            device_class: 9,
            interface_classes: vec![class(9, 0, 0)],
            manufacturer: text("Linux 6.1.0-13-amd64 xhci-hcd"),
            product: text("xHCI Host Controller"),
            vendor_from_database: text("Linux Foundation"),
            model_from_database: text("2.0 root hub"),
            strings_pending: false,
        },
        UsbDevice {
            syspath: format!("{xhci}/usb1/1-2"),
            bus: 1,
            devnum: 2,
            vendor_id: 0x05e3,
            product_id: 0x0610,
            serial: None,
            port_path: "1-2".into(),
            parent_hub: text("usb1"),
            device_class: 9,
            interface_classes: vec![class(9, 0, 1), class(9, 0, 2)],
            manufacturer: text("GenesysLogic"),
            product: text("USB2.1 Hub"),
            vendor_from_database: text("Genesys Logic, Inc."),
            model_from_database: text("Hub"),
            strings_pending: false,
        },
        // No ID_USB_INTERFACES: the classes come from the interface children.
        UsbDevice {
            syspath: format!("{xhci}/usb1/1-1"),
            bus: 1,
            devnum: 3,
            vendor_id: 0x413c,
            product_id: 0x2113,
            serial: None,
            port_path: "1-1".into(),
            parent_hub: text("usb1"),
            device_class: 0,
            interface_classes: vec![class(3, 1, 1), class(3, 0, 0)],
            manufacturer: text("Dell"),
            product: text("Dell KB216 Wired Keyboard"),
            vendor_from_database: text("Dell Computer Corp."),
            model_from_database: text("KB216 Wired Keyboard"),
            strings_pending: false,
        },
        ftdi(4, "1-2.1", "A10KZP4Q"),
        ftdi(5, "1-2.2", "A10KZP4R"),
        UsbDevice {
            syspath: format!("{xhci}/usb1/1-2/1-2.3"),
            bus: 1,
            devnum: 6,
            vendor_id: 0x046d,
            product_id: 0xc52b,
            serial: None,
            port_path: "1-2.3".into(),
            parent_hub: text("1-2"),
            device_class: 0,
            interface_classes: vec![class(3, 1, 1), class(3, 1, 2), class(3, 0, 0)],
            manufacturer: text("Logitech"),
            product: text("USB Receiver"),
            vendor_from_database: text("Logitech, Inc."),
            model_from_database: text("Unifying Receiver"),
            strings_pending: false,
        },
        // The raw sysfs serial, not udev's sanitised ID_SERIAL_SHORT=ST_______1.
        UsbDevice {
            syspath: format!("{xhci}/usb1/1-2/1-2.4"),
            bus: 1,
            devnum: 7,
            vendor_id: 0x0483,
            product_id: 0x5740,
            serial: text("ST<>&'\"\u{fffd}\u{fffd}1"),
            port_path: "1-2.4".into(),
            parent_hub: text("1-2"),
            device_class: 0xef,
            interface_classes: vec![class(2, 2, 1), class(0x0a, 0, 0)],
            manufacturer: text("STMicroelectronics"),
            product: text("<Evil> & 'Co' \"Port\""),
            vendor_from_database: text("STMicroelectronics"),
            model_from_database: text("Virtual COM Port"),
            strings_pending: false,
        },
        // No udev properties beyond the kernel's, no hwdb names, interfaces from sysfs.
        UsbDevice {
            syspath: format!("{ehci}/usb2"),
            bus: 2,
            devnum: 1,
            vendor_id: 0x1d6b,
            product_id: 0x0002,
            serial: text("0000:00:1d.0"),
            port_path: "usb2".into(),
            parent_hub: None,
            device_class: 9,
            interface_classes: vec![class(9, 0, 0)],
            manufacturer: text("Linux 6.1.0-13-amd64 ehci_hcd"),
            product: text("EHCI Host Controller"),
            vendor_from_database: None,
            model_from_database: None,
            strings_pending: false,
        },
        UsbDevice {
            syspath: format!("{ehci}/usb2/2-1"),
            bus: 2,
            devnum: 2,
            vendor_id: 0x1a86,
            product_id: 0x7523,
            serial: None,
            port_path: "2-1".into(),
            parent_hub: text("usb2"),
            device_class: 0xff,
            interface_classes: vec![class(0xff, 1, 2)],
            manufacturer: None,
            product: text("USB Serial"),
            vendor_from_database: text("QinHeng Electronics"),
            model_from_database: text("CH340 serial converter"),
            strings_pending: false,
        },
    ]
}

#[test]
fn enumeration_reads_every_field_of_a_recorded_tree() {
    if !require_program(
        "umockdev-run",
        &["--help"],
        "enumeration_reads_every_field_of_a_recorded_tree",
    ) {
        return;
    }
    let tree = device_tree_path();
    run_inner_test(
        &[
            "umockdev-run",
            "-d",
            tree.to_str().expect("a UTF-8 path"),
            "--",
        ],
        "inner_enumeration_reads_every_field",
    );
}

#[test]
#[ignore = "runs under umockdev-run, started by enumeration_reads_every_field_of_a_recorded_tree"]
fn inner_enumeration_reads_every_field() {
    if !is_inner_run("inner_enumeration_reads_every_field") {
        return;
    }
    let devices = udev::enumerate().expect("enumeration under umockdev");
    let expected = expected_devices();
    // Field by field first, for a readable failure; then the whole list.
    for (found, wanted) in devices.iter().zip(&expected) {
        assert_eq!(found, wanted, "device {}", wanted.port_path);
    }
    assert_eq!(devices, expected);

    // The DEVICE argument against the same tree.
    let resolve_port = |spec: &str| {
        resolve(&parse_device_spec(spec).unwrap(), &devices).map(|device| device.port_path.clone())
    };
    assert_eq!(resolve_port("046d:c52b").unwrap(), "1-2.3");
    assert_eq!(resolve_port("A10KZP4R").unwrap(), "1-2.2");
    assert_eq!(resolve_port("1:4").unwrap(), "1-2.1");
    assert_eq!(resolve_port("2-1").unwrap(), "2-1");
    assert_eq!(resolve_port("ST<>&'\"\u{fffd}\u{fffd}1").unwrap(), "1-2.4");
    assert!(matches!(
        resolve(&parse_device_spec("0403:6001").unwrap(), &devices),
        Err(ResolveError::ChooseDevice { count: 2, .. })
    ));
    // Two root hubs share 1d6b:0002.
    assert!(matches!(
        resolve(&parse_device_spec("1d6b:0002").unwrap(), &devices),
        Err(ResolveError::ChooseDevice { count: 2, .. })
    ));
    println!("inner test ran: inner_enumeration_reads_every_field");
}

/// libumockdev's C API, loaded at run time so that the test executable builds and the
/// other tests run on machines without umockdev.
struct Testbed {
    testbed: *mut c_void,
    uevent: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char),
    remove_device: unsafe extern "C" fn(*mut c_void, *const c_char),
}

impl Testbed {
    fn new(tree: &Path) -> Testbed {
        let library = CString::new("libumockdev.so.0").unwrap();
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is never closed, so
        // the function pointers taken from it stay valid for the process's life.
        let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_NOW) };
        assert!(!handle.is_null(), "cannot load libumockdev.so.0");
        let symbol = |name: &str| -> *mut c_void {
            let name_c = CString::new(name).unwrap();
            // SAFETY: handle is a live dlopen handle and name_c is NUL-terminated.
            let address = unsafe { libc::dlsym(handle, name_c.as_ptr()) };
            assert!(!address.is_null(), "libumockdev has no {name}");
            address
        };
        type NewFn = unsafe extern "C" fn() -> *mut c_void;
        type AddFromFileFn =
            unsafe extern "C" fn(*mut c_void, *const c_char, *mut *mut GError) -> c_int;
        // SAFETY: the symbols have these C signatures in umockdev.h (0.17):
        // UMockdevTestbed *umockdev_testbed_new(void);
        // gboolean umockdev_testbed_add_from_file(UMockdevTestbed*, const gchar*, GError**);
        // void umockdev_testbed_uevent(UMockdevTestbed*, const gchar*, const gchar*);
        // void umockdev_testbed_remove_device(UMockdevTestbed*, const gchar*);
        let (new, add_from_file, uevent, remove_device) = unsafe {
            (
                std::mem::transmute::<*mut c_void, NewFn>(symbol("umockdev_testbed_new")),
                std::mem::transmute::<*mut c_void, AddFromFileFn>(symbol(
                    "umockdev_testbed_add_from_file",
                )),
                std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char),
                >(symbol("umockdev_testbed_uevent")),
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void, *const c_char)>(
                    symbol("umockdev_testbed_remove_device"),
                ),
            )
        };
        // SAFETY: no arguments; it returns a new testbed and points UMOCKDEV_DIR at it.
        let testbed = unsafe { new() };
        assert!(!testbed.is_null(), "umockdev_testbed_new failed");
        let path = CString::new(tree.to_str().expect("a UTF-8 path")).unwrap();
        let mut error: *mut GError = std::ptr::null_mut();
        // SAFETY: testbed is live, path is NUL-terminated, error is a valid out pointer.
        let added = unsafe { add_from_file(testbed, path.as_ptr(), &mut error) };
        if added == 0 {
            let message = if error.is_null() {
                "unknown error".to_string()
            } else {
                // SAFETY: on failure libumockdev sets error to a GError with a C message.
                unsafe { CStr::from_ptr((*error).message) }
                    .to_string_lossy()
                    .into_owned()
            };
            panic!(
                "umockdev_testbed_add_from_file({}): {message}",
                tree.display()
            );
        }
        Testbed {
            testbed,
            uevent,
            remove_device,
        }
    }

    fn uevent(&self, syspath: &str, action: &str) {
        let syspath = CString::new(syspath).unwrap();
        let action = CString::new(action).unwrap();
        // SAFETY: the testbed lives as long as self; both strings are NUL-terminated.
        unsafe { (self.uevent)(self.testbed, syspath.as_ptr(), action.as_ptr()) }
    }

    /// Removes the device and its children from the testbed's sysfs.
    fn remove_device(&self, syspath: &str) {
        let syspath = CString::new(syspath).unwrap();
        // SAFETY: the testbed lives as long as self; the string is NUL-terminated.
        unsafe { (self.remove_device)(self.testbed, syspath.as_ptr()) }
    }
}

/// GLib's GError, as far as this test reads it.
#[repr(C)]
struct GError {
    domain: u32,
    code: c_int,
    message: *const c_char,
}

fn libumockdev_present() -> bool {
    let library = CString::new("libumockdev.so.0").unwrap();
    // SAFETY: dlopen with a valid name; RTLD_NOLOAD is not used, so this loads and keeps
    // the library, which is harmless in a test process.
    let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_LAZY) };
    !handle.is_null()
}

#[test]
fn monitor_turns_uevents_into_events() {
    // The wrapper is `env LD_PRELOAD=... "$@"`: it has no --help, so run `true` under it.
    if !require_program(
        "umockdev-wrapper",
        &["true"],
        "monitor_turns_uevents_into_events",
    ) {
        return;
    }
    if !libumockdev_present() {
        let reason = "monitor_turns_uevents_into_events: libumockdev.so.0 is not installed \
                      (Debian package libumockdev0)";
        if std::env::var_os("CI").is_some() {
            panic!("{reason}, and CI is set");
        }
        eprintln!("skipping {reason}");
        return;
    }
    run_inner_test(
        &["umockdev-wrapper"],
        "inner_monitor_turns_uevents_into_events",
    );
}

/// The next event, with the time a `DeviceAdded` was received zeroed out of the way:
/// the tests compare what was seen, not when.
fn next_event(events: &mpsc::Receiver<Event>, waiting_for: &str) -> Event {
    let event = events
        .recv_timeout(EVENT_DEADLINE)
        .unwrap_or_else(|error| panic!("no event while waiting for {waiting_for}: {error}"));
    match event {
        Event::DeviceAdded { device, received } => {
            assert!(received <= std::time::Instant::now());
            Event::DeviceAdded {
                device,
                received: *EPOCH,
            }
        }
        other => other,
    }
}

static EPOCH: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

fn added(device: UsbDevice) -> Event {
    Event::DeviceAdded {
        device: Box::new(device),
        received: *EPOCH,
    }
}

/// A device as the hotplug monitor announces it: from its uevent, before its strings
/// are read (the daemon already has them for a plug it enumerated).
fn announced(device: UsbDevice) -> UsbDevice {
    UsbDevice {
        serial: None,
        manufacturer: None,
        product: None,
        strings_pending: true,
        ..device
    }
}

#[test]
#[ignore = "runs under umockdev-wrapper, started by monitor_turns_uevents_into_events"]
fn inner_monitor_turns_uevents_into_events() {
    if !is_inner_run("inner_monitor_turns_uevents_into_events") {
        return;
    }
    let testbed = Testbed::new(&device_tree_path());
    let expected = expected_devices();
    let by_port = |port: &str| {
        expected
            .iter()
            .find(|device| device.port_path == port)
            .unwrap()
            .clone()
    };
    let (sender, events) = usbpass::event::event_channel();
    // As the daemon runs it: polled by the watch thread.
    let mut watches = usbpass::daemon::watch::Watches::new(sender.clone()).unwrap();
    watches.poll_source(Box::new(
        udev::open_monitor(sender).expect("the monitor opens under umockdev"),
    ));
    let monitor = watches.spawn().expect("the watch thread starts");
    let xhci = "/sys/devices/pci0000:00/0000:00:14.0";

    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.3"), "add");
    assert_eq!(
        next_event(&events, "add of the receiver"),
        added(announced(by_port("1-2.3")))
    );

    // Interfaces, the controller, unbind and a device without identity are not
    // forwarded: the bind after them is the next event.
    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.1/1-2.1:1.0"), "add");
    testbed.uevent(xhci, "add");
    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.2"), "unbind");
    testbed.uevent(&format!("{xhci}/usb1/1-3"), "add");
    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.2"), "bind");
    assert_eq!(
        next_event(&events, "bind of the second serial adapter"),
        added(announced(by_port("1-2.2")))
    );

    // The keyboard has no ID_USB_INTERFACES: the monitor reads its interface children too.
    testbed.uevent(&format!("{xhci}/usb1/1-1"), "change");
    assert_eq!(
        next_event(&events, "change of the keyboard"),
        added(announced(by_port("1-1")))
    );

    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.4"), "add");
    assert_eq!(
        next_event(&events, "add of the hostile device"),
        added(announced(by_port("1-2.4")))
    );

    // umockdev 0.17 (Debian 12) sends no uevent from remove_device, 0.18.4 and later do:
    // send it by hand, as the kernel would, while sysfs still has the device. On newer
    // versions the second remove arrives later, when nobody checks.
    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.4"), "remove");
    testbed.remove_device(&format!("{xhci}/usb1/1-2/1-2.4"));
    assert_eq!(
        next_event(&events, "remove of the hostile device"),
        Event::DeviceRemoved {
            syspath: format!("{xhci}/usb1/1-2/1-2.4"),
            // The instance that left, from the event's BUSNUM and DEVNUM.
            address: Some(BusAddress { bus: 1, device: 7 }),
        }
    );
    // Gone from enumeration too.
    assert!(udev::enumerate()
        .unwrap()
        .iter()
        .all(|device| device.port_path != "1-2.4"));

    // Without a receiver the thread ends at its next event.
    drop(events);
    testbed.uevent(&format!("{xhci}/usb1/1-2/1-2.1"), "add");
    let (joined_sender, joined) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = joined_sender.send(monitor.join().is_ok());
    });
    assert_eq!(
        joined.recv_timeout(EVENT_DEADLINE),
        Ok(true),
        "the watch thread did not end after its receiver was dropped"
    );
    println!("inner test ran: inner_monitor_turns_uevents_into_events");
}
