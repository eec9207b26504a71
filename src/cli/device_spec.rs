//! The CLI's DEVICE argument: parsing `bus:dev`, `vid:pid`, a port path or a serial, and
//! resolving it against the present devices. Pure: no udev here.

use crate::model::{port, BusAddress, UsbDevice, UsbId};
use std::fmt;

/// What a DEVICE argument names.
///
/// Unprefixed text is read by its shape: `1:5` or `001:005` (one to three decimal digits
/// each side) is a bus address, `046d:c52b` (four hex digits each side) is an ID,
/// `1-2.3` or `usb1` is a port path, anything else a serial. A serial can look like one of
/// the other forms, so an unprefixed spec whose shape matches no device falls back to the
/// serial; the prefixes `addr:`, `id:`, `port:` and `serial:` say exactly what is meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: SpecKind,
    /// The text as given, for error messages and the serial fallback.
    pub text: String,
    /// True when a prefix fixed the kind, which turns the serial fallback off.
    pub explicit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    Address(BusAddress),
    Id(UsbId),
    Port(String),
    Serial(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("cannot parse device {spec:?}: {reason}")]
    ParseSpec { spec: String, reason: &'static str },
    #[error("no present usb device matches {spec:?}")]
    FindDevice { spec: String },
    #[error("device {spec:?} is ambiguous, {count} devices match: {candidates}")]
    ChooseDevice {
        spec: String,
        count: usize,
        candidates: String,
    },
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses a DEVICE argument. Errors only on text that cannot name any device: an empty
/// spec, or a prefix followed by something that does not fit it.
pub fn parse_device_spec(text: &str) -> Result<DeviceSpec, ResolveError> {
    let error = |reason| ResolveError::ParseSpec {
        spec: text.to_string(),
        reason,
    };
    if text.is_empty() {
        return Err(error("the device is empty"));
    }
    let explicit = |kind| {
        Ok(DeviceSpec {
            kind,
            text: text.to_string(),
            explicit: true,
        })
    };
    if let Some(rest) = text.strip_prefix("addr:") {
        return match parse_address(rest) {
            Some(address) => explicit(SpecKind::Address(address)),
            None => Err(error(
                "expected addr:BUS:DEV with decimal numbers, e.g. addr:1:5",
            )),
        };
    }
    if let Some(rest) = text.strip_prefix("id:") {
        return match parse_id(rest) {
            Some(id) => explicit(SpecKind::Id(id)),
            None => Err(error("expected id:VVVV:PPPP in hex, e.g. id:046d:c52b")),
        };
    }
    if let Some(rest) = text.strip_prefix("port:") {
        return if port::is_usb_device_name(rest) {
            explicit(SpecKind::Port(rest.to_string()))
        } else {
            Err(error(
                "expected port:PATH as the kernel names it, e.g. port:1-2.3",
            ))
        };
    }
    if let Some(rest) = text.strip_prefix("serial:") {
        return if rest.is_empty() {
            Err(error("the serial is empty"))
        } else {
            explicit(SpecKind::Serial(rest.to_string()))
        };
    }
    let kind = if let Some(address) = parse_address(text) {
        SpecKind::Address(address)
    } else if let Some(id) = parse_id(text) {
        SpecKind::Id(id)
    } else if port::is_usb_device_name(text) {
        SpecKind::Port(text.to_string())
    } else {
        SpecKind::Serial(text.to_string())
    };
    Ok(DeviceSpec {
        kind,
        text: text.to_string(),
        explicit: false,
    })
}

/// `BUS:DEV`, one to three decimal digits each, as lsusb prints them (`001:005`) or plain.
fn parse_address(text: &str) -> Option<BusAddress> {
    let (bus, device) = text.split_once(':')?;
    let number = |part: &str| -> Option<u16> {
        if (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    Some(BusAddress {
        bus: number(bus)?,
        device: number(device)?,
    })
}

/// `VVVV:PPPP`, exactly four hex digits each, as lsusb prints them.
fn parse_id(text: &str) -> Option<UsbId> {
    let (vendor, product) = text.split_once(':')?;
    let hex = |part: &str| -> Option<u16> {
        if part.len() == 4 && part.bytes().all(|b| b.is_ascii_hexdigit()) {
            u16::from_str_radix(part, 16).ok()
        } else {
            None
        }
    };
    Some(UsbId {
        vendor: hex(vendor)?,
        product: hex(product)?,
    })
}

pub fn find_by_address(devices: &[UsbDevice], address: BusAddress) -> Option<&UsbDevice> {
    devices.iter().find(|device| device.address() == address)
}

pub fn find_by_port<'a>(devices: &'a [UsbDevice], port_path: &str) -> Option<&'a UsbDevice> {
    devices.iter().find(|device| device.port_path == port_path)
}

pub fn find_by_syspath<'a>(devices: &'a [UsbDevice], syspath: &str) -> Option<&'a UsbDevice> {
    devices.iter().find(|device| device.syspath == syspath)
}

pub fn find_by_id(devices: &[UsbDevice], id: UsbId) -> Vec<&UsbDevice> {
    devices.iter().filter(|device| device.id() == id).collect()
}

pub fn find_by_serial<'a>(devices: &'a [UsbDevice], serial: &str) -> Vec<&'a UsbDevice> {
    devices
        .iter()
        .filter(|device| device.serial.as_deref() == Some(serial))
        .collect()
}

/// Every present device the spec names, in the order of `devices`.
pub fn find_device<'a>(spec: &DeviceSpec, devices: &'a [UsbDevice]) -> Vec<&'a UsbDevice> {
    let found: Vec<&UsbDevice> = match &spec.kind {
        SpecKind::Address(address) => find_by_address(devices, *address).into_iter().collect(),
        SpecKind::Id(id) => find_by_id(devices, *id),
        SpecKind::Port(port) => find_by_port(devices, port).into_iter().collect(),
        SpecKind::Serial(serial) => find_by_serial(devices, serial),
    };
    if spec.explicit || matches!(spec.kind, SpecKind::Serial(_)) {
        return found;
    }
    // Read by its shape, the text may also be some device's serial ("1-2.4" as one
    // device's port and another's serial): every reading counts, so that such a clash
    // is reported as ambiguous instead of silently resolved.
    let mut found = found;
    for device in find_by_serial(devices, &spec.text) {
        if !found.iter().any(|other| other.syspath == device.syspath) {
            found.push(device);
        }
    }
    found
}

/// The one present device the spec names. None or several is an error; the ambiguous
/// case lists every candidate on one line, each with what tells it apart.
pub fn resolve<'a>(
    spec: &DeviceSpec,
    devices: &'a [UsbDevice],
) -> Result<&'a UsbDevice, ResolveError> {
    match find_device(spec, devices).as_slice() {
        [] => Err(ResolveError::FindDevice {
            spec: spec.text.clone(),
        }),
        [device] => Ok(device),
        several => Err(ResolveError::ChooseDevice {
            spec: spec.text.clone(),
            count: several.len(),
            candidates: several
                .iter()
                .map(|device| describe_candidate(device))
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// `046d:c52b at 001:005 (port 1-2) serial "A1"`: the address, port and serial are each
/// a spec the user can give instead. The serial is quoted with escapes, so a hostile
/// serial cannot break the line.
fn describe_candidate(device: &UsbDevice) -> String {
    match &device.serial {
        Some(serial) => format!("{device} serial \"{}\"", serial.escape_debug()),
        None => format!("{device} no serial"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices::device;

    fn with_serial(mut device: UsbDevice, serial: &str) -> UsbDevice {
        device.serial = Some(serial.to_string());
        device
    }

    fn devices() -> Vec<UsbDevice> {
        vec![
            device(1, 1, 0x1d6b, 0x0002, "usb1"),
            device(1, 2, 0x05e3, 0x0610, "1-2"),
            with_serial(device(1, 5, 0x046d, 0xc52b, "1-2.3"), "1-2.4"),
            with_serial(device(1, 6, 0x0403, 0x6001, "1-2.1"), "FT0001"),
            with_serial(device(1, 7, 0x0403, 0x6001, "1-2.2"), "FT0002"),
            with_serial(device(2, 3, 0x1234, 0x5678, "2-1"), "0001:0002"),
            with_serial(device(2, 4, 0xabcd, 0x0001, "2-2"), "FT0002"),
        ]
    }

    fn parsed(text: &str) -> SpecKind {
        parse_device_spec(text).unwrap().kind
    }

    #[test]
    fn shapes_choose_the_kind() {
        let address = |bus, device| SpecKind::Address(BusAddress { bus, device });
        let id = |vendor, product| SpecKind::Id(UsbId { vendor, product });
        assert_eq!(parsed("1:5"), address(1, 5));
        assert_eq!(parsed("001:005"), address(1, 5));
        assert_eq!(parsed("046d:c52b"), id(0x046d, 0xc52b));
        assert_eq!(parsed("046D:C52B"), id(0x046d, 0xc52b));
        // Four digits each side is an ID even when all digits are decimal.
        assert_eq!(parsed("1234:5678"), id(0x1234, 0x5678));
        assert_eq!(parsed("1-2.3"), SpecKind::Port("1-2.3".into()));
        assert_eq!(parsed("usb1"), SpecKind::Port("usb1".into()));
        assert_eq!(parsed("FT0001"), SpecKind::Serial("FT0001".into()));
        assert_eq!(parsed("1-2."), SpecKind::Serial("1-2.".into()));
        assert_eq!(parsed("0001:05"), SpecKind::Serial("0001:05".into()));
        assert_eq!(
            parsed("1234:5678:9"),
            SpecKind::Serial("1234:5678:9".into())
        );
        assert_eq!(parsed("<>&'\""), SpecKind::Serial("<>&'\"".into()));
    }

    #[test]
    fn prefixes_fix_the_kind() {
        let spec = parse_device_spec("serial:046d:c52b").unwrap();
        assert_eq!(spec.kind, SpecKind::Serial("046d:c52b".into()));
        assert!(spec.explicit);
        assert_eq!(
            parsed("addr:2:4"),
            SpecKind::Address(BusAddress { bus: 2, device: 4 })
        );
        assert_eq!(
            parsed("id:0403:6001"),
            SpecKind::Id(UsbId {
                vendor: 0x0403,
                product: 0x6001
            })
        );
        assert_eq!(parsed("port:1-2"), SpecKind::Port("1-2".into()));
    }

    #[test]
    fn bad_specs_are_errors_naming_the_spec() {
        for text in [
            "",
            "addr:1",
            "addr:1:x",
            "id:46d:c52b",
            "port:1-",
            "serial:",
        ] {
            let error = parse_device_spec(text).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, ResolveError::ParseSpec { .. }), "{text}");
            assert!(message.contains(&format!("{text:?}")), "{message}");
            assert!(
                !message.contains('\n') && !message.ends_with('.'),
                "{message}"
            );
        }
    }

    #[test]
    fn resolves_each_kind() {
        let devices = devices();
        let resolve_text = |text: &str| {
            resolve(&parse_device_spec(text).unwrap(), &devices)
                .map(|device| device.port_path.clone())
        };
        assert_eq!(resolve_text("1:5").unwrap(), "1-2.3");
        assert_eq!(resolve_text("001:006").unwrap(), "1-2.1");
        assert_eq!(resolve_text("046d:c52b").unwrap(), "1-2.3");
        assert_eq!(resolve_text("1-2.2").unwrap(), "1-2.2");
        assert_eq!(resolve_text("usb1").unwrap(), "usb1");
        assert_eq!(resolve_text("FT0001").unwrap(), "1-2.1");
        assert_eq!(resolve_text("serial:FT0001").unwrap(), "1-2.1");
        // The same bus and number on another bus is another device.
        assert_eq!(resolve_text("2:3").unwrap(), "2-1");
    }

    #[test]
    fn a_port_path_that_is_also_a_serial_is_ambiguous() {
        let mut devices = devices();
        devices.push(device(1, 8, 0x1111, 0x2222, "1-2.4"));
        let spec = parse_device_spec("1-2.4").unwrap();
        let error = resolve(&spec, &devices).unwrap_err().to_string();
        assert!(error.contains("is ambiguous, 2 devices match"), "{error}");
        assert!(
            error.contains("(port 1-2.4)") && error.contains("serial \"1-2.4\""),
            "{error}"
        );
        // The prefixes choose one reading.
        let spec = parse_device_spec("port:1-2.4").unwrap();
        assert_eq!(resolve(&spec, &devices).unwrap().devnum, 8);
        let spec = parse_device_spec("serial:1-2.4").unwrap();
        assert_eq!(resolve(&spec, &devices).unwrap().devnum, 5);
    }

    #[test]
    fn a_spec_shaped_like_a_port_falls_back_to_serials() {
        let devices = devices();
        // "1-2.4" is no present port, so it falls back to the serial of the receiver...
        let spec = parse_device_spec("1-2.4").unwrap();
        assert_eq!(resolve(&spec, &devices).unwrap().port_path, "1-2.3");
        // ...unless the prefix says it is a port.
        let spec = parse_device_spec("port:1-2.4").unwrap();
        assert_eq!(
            resolve(&spec, &devices).unwrap_err(),
            ResolveError::FindDevice {
                spec: "port:1-2.4".into()
            }
        );
        // A serial shaped like an ID that no device has is found as a serial.
        let spec = parse_device_spec("0001:0002").unwrap();
        assert_eq!(resolve(&spec, &devices).unwrap().port_path, "2-1");
    }

    #[test]
    fn no_match_is_an_error() {
        let devices = devices();
        for text in ["9:9", "dead:beef", "3-1", "NOPE"] {
            let error = resolve(&parse_device_spec(text).unwrap(), &devices).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("no present usb device matches {text:?}")
            );
        }
        assert!(resolve(&parse_device_spec("1:5").unwrap(), &[]).is_err());
    }

    #[test]
    fn ambiguous_specs_list_every_candidate_on_one_line() {
        let devices = devices();
        let error = resolve(&parse_device_spec("0403:6001").unwrap(), &devices).unwrap_err();
        assert_eq!(
            error.to_string(),
            "device \"0403:6001\" is ambiguous, 2 devices match: \
             0403:6001 at 001:006 (port 1-2.1) serial \"FT0001\"; \
             0403:6001 at 001:007 (port 1-2.2) serial \"FT0002\""
        );
        let error = resolve(&parse_device_spec("FT0002").unwrap(), &devices).unwrap_err();
        assert_eq!(
            error,
            ResolveError::ChooseDevice {
                spec: "FT0002".into(),
                count: 2,
                candidates: "0403:6001 at 001:007 (port 1-2.2) serial \"FT0002\"; \
                             abcd:0001 at 002:004 (port 2-2) serial \"FT0002\""
                    .into()
            }
        );
    }

    #[test]
    fn hostile_serials_stay_on_one_line() {
        let mut devices = devices();
        devices.push(with_serial(
            device(3, 1, 0x0403, 0x6001, "3-1"),
            "a\nb\"<>&'\u{fffd}",
        ));
        devices.push(device(3, 2, 0x0403, 0x6001, "3-2"));
        let error = resolve(&parse_device_spec("0403:6001").unwrap(), &devices).unwrap_err();
        let message = error.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.contains("(port 3-1) serial \"a\\nb\\\"<>&\\'\u{fffd}\""),
            "{message}"
        );
        assert!(message.contains("(port 3-2) no serial"), "{message}");
        // The exact serial, newline and all, still resolves.
        let spec = parse_device_spec("a\nb\"<>&'\u{fffd}").unwrap();
        assert_eq!(resolve(&spec, &devices).unwrap().port_path, "3-1");
    }

    #[test]
    fn lookups() {
        let devices = devices();
        assert_eq!(
            find_by_syspath(&devices, "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2.3")
                .unwrap()
                .devnum,
            5
        );
        assert!(find_by_syspath(&devices, "/sys/devices/nothing").is_none());
        assert_eq!(
            find_by_id(
                &devices,
                UsbId {
                    vendor: 0x0403,
                    product: 0x6001
                }
            )
            .len(),
            2
        );
        assert_eq!(find_by_serial(&devices, "FT0002").len(), 2);
        assert_eq!(find_by_port(&devices, "1-2").unwrap().devnum, 2);
    }
}
