//! Pure rewriting of QEMU's USB host arguments (`-usbdevice host:...` and
//! `-device usb-host,...` in keyval and JSON form) so that QEMU reconnects a device by
//! itself; every other byte of the command line passes through unchanged.
//!
//! Nothing here does I/O: the caller resolves a selector (bus and address, or a device
//! node) to the device's facts and picks a mode, through the closure it hands to
//! [`rewrite_args`].

use crate::rules::ReconnectMode;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

mod json;
mod keyval;
mod legacy;

use json::JsonDevice;
use keyval::{split_keyval, unescape_keyval, KeyvalDevice};
use legacy::{render_legacy, LegacySpec};

/// An argument that names a usb-host device but cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuArgsError {
    #[error("cannot parse usb-host json {argument:?}: {message}")]
    ParseJson { argument: String, message: String },
    #[error("cannot parse usb-host property {property} in {argument:?}: {message}")]
    ParseProperty {
        argument: String,
        property: String,
        message: String,
    },
    #[error("cannot parse legacy usb host spec {argument:?}")]
    ParseLegacy { argument: String },
}

/// Which spelling of a USB host argument was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgForm {
    /// `-usbdevice host:...`, QEMU before 2.x.
    Legacy,
    /// `-device usb-host,hostbus=1,...` (QemuOpts keyval).
    Keyval,
    /// `-device {"driver":"usb-host",...}`, as libvirt 8 and later write it.
    Json,
}

/// What the argument points at, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `hostbus`+`hostaddr`, or legacy `host:BUS.ADDR`: one plug of one device.
    BusAddress { bus: u32, address: u32 },
    /// `hostdevice=/dev/bus/usb/001/005` or any other node path.
    HostDevice(OsString),
    /// Legacy `host:VID:PID`: already names the device by its IDs.
    VendorProduct { vendor_id: u16, product_id: u16 },
}

/// Facts about the host device a selector names, read at launch: what a rewritten
/// argument names the device by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDeviceFacts {
    pub vendor_id: u16,
    pub product_id: u16,
    pub bus: u32,
    /// QEMU's `hostport`: the kernel port path without the bus, e.g. `2.3` for `1-2.3`.
    /// `None` when it is not known (a legacy `host:VID:PID` spec with no device present).
    pub hostport: Option<String>,
}

/// The caller's answer for one selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Name the device by `mode`: [`ReconnectMode::Id`] writes `vendorid`+`productid`
    /// (legacy: `auto:*.*:VID:PID`), any port, any bus; [`ReconnectMode::Port`] writes
    /// `hostbus`+`hostport` (legacy, which has no port: `auto:BUS.*:VID:PID`), or the IDs
    /// when the port is not known.
    Rewrite {
        facts: HostDeviceFacts,
        mode: ReconnectMode,
    },
    /// Leave the argument as it is (policy says so); nothing is logged.
    Keep,
    /// Leave the argument as it is and report why (device gone, unreadable sysfs).
    Warn(String),
}

/// One usb-host argument the caller asked about, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Rewritten {
        index: usize,
        form: ArgForm,
        before: OsString,
        after: OsString,
    },
    Kept {
        index: usize,
    },
    Warned {
        index: usize,
        message: String,
    },
    Unparsed {
        index: usize,
        error: QemuArgsError,
    },
}

/// QEMU options that take no value, across QEMU versions. Any other option is assumed
/// to take one: guessing wrong that way can only miss a rewrite, never misread some
/// option's value (`-append "-device ..."`) as an option.
const OPTIONS_WITHOUT_VALUE: &[&str] = &[
    "h",
    "help",
    "version",
    "S",
    "s",
    "snapshot",
    "usb",
    "nographic",
    "portrait",
    "full-screen",
    "win2k-hack",
    "no-fd-bootchk",
    "no-acpi",
    "no-hpet",
    "no-reboot",
    "no-shutdown",
    "no-quit",
    "daemonize",
    "only-migratable",
    "nodefaults",
    "nodefconfig",
    "no-user-config",
    "enable-kvm",
    "no-kvm",
    "no-kvm-irqchip",
    "no-kvm-pit",
    "no-kvm-pit-reinjection",
    "enable-fips",
    "enable-sync-profile",
    "async-teardown",
    "mem-prealloc",
    "audio-help",
    "singlestep",
    "preconfig",
    "xen-attach",
    "xen-create",
    "xen-domid-restrict",
    "curses",
    "sdl",
    "alt-grab",
    "ctrl-grab",
    "no-frame",
    "show-cursor",
    "semihosting",
    "old-param",
    "tdf",
];

/// The option name of a command-line word, as QEMU's `lookup_opt` reads it: one or two
/// leading dashes. `None` for a positional word (a disk image).
fn option_name(word: &[u8]) -> Option<&[u8]> {
    let rest = word.strip_prefix(b"-")?;
    if rest.is_empty() {
        return None;
    }
    Some(rest.strip_prefix(b"-").unwrap_or(rest))
}

fn takes_value(name: &[u8]) -> bool {
    !OPTIONS_WITHOUT_VALUE.iter().any(|o| o.as_bytes() == name)
}

/// Rewrites every usb-host argument in `args` (argv without `argv[0]`) for which `decide`
/// returns [`Decision::Rewrite`]. Every other word, and every byte of the words it
/// does not rewrite, stays as it was. Returns the new argument list and one outcome per
/// usb-host argument found.
pub fn rewrite_args<F>(args: &[OsString], mut decide: F) -> (Vec<OsString>, Vec<Outcome>)
where
    F: FnMut(&Selector) -> Decision,
{
    let mut out: Vec<OsString> = args.to_vec();
    let mut outcomes = Vec::new();
    for (name, value_index) in options_with_values(args) {
        let value = &args[value_index];
        let form = match name {
            b"device" => Some(if value.as_bytes().first() == Some(&b'{') {
                ArgForm::Json
            } else {
                ArgForm::Keyval
            }),
            b"usbdevice" => Some(ArgForm::Legacy),
            _ => None,
        };
        if let Some(form) = form {
            if let Some(outcome) = rewrite_one(value_index, value, form, &mut decide) {
                if let Outcome::Rewritten { after, .. } = &outcome {
                    out[value_index] = after.clone();
                }
                outcomes.push(outcome);
            }
        }
    }
    (out, outcomes)
}

/// The guest name from `-name guest=NAME,...` (or `-name NAME`), for log lines.
pub fn guest_name(args: &[OsString]) -> Option<String> {
    // The last -name decides.
    options_with_values(args)
        .filter(|(name, _)| *name == b"name")
        .map(|(_, value_index)| {
            let elements = split_keyval(args[value_index].as_bytes());
            elements.iter().enumerate().find_map(|(position, element)| {
                if let Some(guest) = element.strip_prefix(b"guest=") {
                    Some(lossy(&unescape_keyval(guest)))
                } else if position == 0 && !element.contains(&b'=') {
                    Some(lossy(&unescape_keyval(element)))
                } else {
                    None
                }
            })
        })
        .last()
        .flatten()
}

/// Every option that takes a value, as (its name, the index of its value), in order.
/// Positional words and options without a value are stepped over; an option left
/// without its value at the end ends the walk. A value is never read as an option.
fn options_with_values(args: &[OsString]) -> impl Iterator<Item = (&[u8], usize)> {
    let mut index = 0;
    std::iter::from_fn(move || {
        while index < args.len() {
            let Some(name) = option_name(args[index].as_bytes()) else {
                index += 1;
                continue;
            };
            if !takes_value(name) {
                index += 1;
                continue;
            }
            let value_index = index + 1;
            if value_index >= args.len() {
                index = args.len();
                return None;
            }
            index = value_index + 1;
            return Some((name, value_index));
        }
        None
    })
}

/// Rewrites one option value; `None` when it is no usb-host argument with a selector to
/// replace (another device, or one that already reconnects by itself).
fn rewrite_one<F>(index: usize, value: &OsStr, form: ArgForm, decide: &mut F) -> Option<Outcome>
where
    F: FnMut(&Selector) -> Decision,
{
    let bytes = value.as_bytes();
    let parsed = match form {
        ArgForm::Legacy => LegacySpec::parse(bytes).map(|spec| spec.map(Parsed::Legacy)),
        ArgForm::Keyval => KeyvalDevice::parse(bytes).map(|device| device.map(Parsed::Keyval)),
        ArgForm::Json => JsonDevice::parse(bytes).map(|device| device.map(Parsed::Json)),
    };
    let parsed = match parsed {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return None,
        Err(error) => return Some(Outcome::Unparsed { index, error }),
    };
    match decide(parsed.selector()) {
        Decision::Keep => Some(Outcome::Kept { index }),
        Decision::Warn(message) => Some(Outcome::Warned { index, message }),
        Decision::Rewrite { facts, mode } => {
            let after = OsString::from_vec(parsed.render(&facts, mode));
            Some(Outcome::Rewritten {
                index,
                form,
                before: value.to_os_string(),
                after,
            })
        }
    }
}

enum Parsed<'a> {
    Legacy(LegacySpec),
    Keyval(KeyvalDevice<'a>),
    Json(JsonDevice<'a>),
}

impl Parsed<'_> {
    fn selector(&self) -> &Selector {
        match self {
            Parsed::Legacy(spec) => &spec.selector,
            Parsed::Keyval(device) => &device.selector,
            Parsed::Json(device) => &device.selector,
        }
    }

    fn render(&self, facts: &HostDeviceFacts, mode: ReconnectMode) -> Vec<u8> {
        match self {
            Parsed::Legacy(_) => render_legacy(facts, mode),
            Parsed::Keyval(device) => device.render(facts, mode),
            Parsed::Json(device) => device.render(facts, mode),
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Properties that pick the host device in the keyval and JSON forms; all are replaced
/// together.
const SELECTOR_PROPERTIES: &[&[u8]] = &[
    b"hostbus",
    b"hostaddr",
    b"hostport",
    b"hostdevice",
    b"vendorid",
    b"productid",
];

/// Whether `needle` occurs anywhere in `haystack`, for the forms' test before parsing.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The helpers are `pub(super)` for the tests of each form's module.
    pub(super) fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    pub(super) fn facts() -> HostDeviceFacts {
        HostDeviceFacts {
            vendor_id: 0x046d,
            product_id: 0xc52b,
            bus: 1,
            hostport: Some("2.3".to_string()),
        }
    }

    pub(super) fn rewrite_with(
        words: &[&str],
        mode: ReconnectMode,
    ) -> (Vec<OsString>, Vec<Outcome>, Vec<Selector>) {
        let mut asked = Vec::new();
        let (out, outcomes) = rewrite_args(&os(words), |selector| {
            asked.push(selector.clone());
            Decision::Rewrite {
                facts: facts(),
                mode,
            }
        });
        (out, outcomes, asked)
    }

    #[test]
    fn already_reconnecting_devices_are_left_alone() {
        for value in [
            "usb-host,vendorid=0x046d,productid=0xc52b",
            "usb-host,hostbus=1,hostport=2.3",
            "usb-host,hostbus=1",
            "usb-host,help",
            "usb-kbd,id=usb-host",
            r#"{"driver":"usb-host","vendorid":1133,"productid":50475}"#,
            r#"{"driver":"usb-tablet","id":"usb-host"}"#,
        ] {
            let (out, outcomes, asked) = rewrite_with(&["-device", value], ReconnectMode::Id);
            assert_eq!(out[1], value);
            assert!(outcomes.is_empty(), "{value}");
            assert!(asked.is_empty(), "{value}");
        }
    }

    #[test]
    fn values_of_other_options_are_never_read_as_options() {
        let words = [
            "-append",
            "-device usb-host,hostbus=1,hostaddr=5",
            "-name",
            "-device",
            "usb-host,hostbus=1,hostaddr=5",
            "-fw_cfg",
            "name=opt/x,string=-usbdevice host:1.2",
            "-usbdevice",
            "tablet",
        ];
        let (out, outcomes, asked) = rewrite_with(&words, ReconnectMode::Id);
        assert_eq!(out, os(&words));
        assert!(outcomes.is_empty());
        assert!(asked.is_empty());
    }

    #[test]
    fn options_without_value_do_not_swallow_the_next_word() {
        let words = [
            "-S",
            "-nodefaults",
            "disk.img",
            "--no-user-config",
            "-device",
            "usb-host,hostbus=1,hostaddr=5",
        ];
        let (out, _, _) = rewrite_with(&words, ReconnectMode::Id);
        assert_eq!(out[5], "usb-host,vendorid=0x046d,productid=0xc52b");
        assert_eq!(out[..5], os(&words)[..5]);
    }

    #[test]
    fn guest_name_from_libvirt_and_plain_forms() {
        assert_eq!(
            guest_name(&os(&["-S", "-name", "guest=win,,11,debug-threads=on"])),
            Some("win,11".to_string())
        );
        assert_eq!(
            guest_name(&os(&["-name", "plain"])),
            Some("plain".to_string())
        );
        assert_eq!(guest_name(&os(&["-append", "-name x"])), None);
    }

    #[test]
    fn non_utf8_bytes_pass_through() {
        let mut odd = b"usb-host,hostbus=1,hostaddr=5,id=\xff\xfe".to_vec();
        let words = vec![
            OsString::from("-device"),
            OsString::from_vec(odd.clone()),
            OsString::from("-name"),
            OsString::from_vec(b"guest=\xc3\x28".to_vec()),
        ];
        let (out, _) = rewrite_args(&words, |_| Decision::Rewrite {
            facts: facts(),
            mode: ReconnectMode::Id,
        });
        odd = b"usb-host,vendorid=0x046d,productid=0xc52b,id=\xff\xfe".to_vec();
        assert_eq!(out[1].as_bytes(), &odd[..]);
        assert_eq!(out[3], words[3]);
    }

    #[test]
    fn keep_and_warn_leave_the_argument() {
        let words = os(&["-device", "usb-host,hostbus=1,hostaddr=5"]);
        let (out, outcomes) = rewrite_args(&words, |_| Decision::Warn("gone".into()));
        assert_eq!(out, words);
        assert_eq!(
            outcomes,
            vec![Outcome::Warned {
                index: 1,
                message: "gone".into()
            }]
        );
        let (out, outcomes) = rewrite_args(&words, |_| Decision::Keep);
        assert_eq!(out, words);
        assert_eq!(outcomes, vec![Outcome::Kept { index: 1 }]);
    }
}
