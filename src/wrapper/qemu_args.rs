//! Pure rewriting of QEMU's USB host arguments (`-usbdevice host:...` and
//! `-device usb-host,...` in keyval and JSON form) so that QEMU reconnects a device by
//! itself; every other byte of the command line passes through unchanged.
//!
//! Nothing here does I/O: the caller resolves a selector (bus and address, or a device
//! node) to the device's facts and picks a mode, through the closure it hands to
//! [`rewrite_args`].

use crate::util::c_number::{self, strtoul};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

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

/// Facts about the device a selector names, read at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    pub vendor_id: u16,
    pub product_id: u16,
    pub bus: u32,
    /// QEMU's `hostport`: the kernel port path without the bus, e.g. `2.3` for `1-2.3`.
    /// `None` when it is not known (a legacy `host:VID:PID` spec with no device present).
    pub hostport: Option<String>,
}

/// How to rewrite one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `vendorid`+`productid` (legacy: `auto:*.*:VID:PID`): any port, any bus.
    Id,
    /// `hostbus`+`hostport` (legacy, which has no port: `auto:BUS.*:VID:PID`).
    Port,
}

/// The caller's answer for one selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Rewrite {
        facts: DeviceFacts,
        mode: Mode,
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

/// Rewrites every usb-host argument in `args` (argv without argv[0]) for which `decide`
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

    fn render(&self, facts: &DeviceFacts, mode: Mode) -> Vec<u8> {
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

// ---------------------------------------------------------------------------------
// Legacy -usbdevice host:...

struct LegacySpec {
    selector: Selector,
}

impl LegacySpec {
    /// `host:BUS.ADDR` or `host:VID:PID` as old QEMU's `usb_host_device_open` read them;
    /// `host:auto:...` and other devices (`tablet`, `disk:...`) are not ours to touch.
    fn parse(bytes: &[u8]) -> Result<Option<LegacySpec>, QemuArgsError> {
        let Some(spec) = bytes.strip_prefix(b"host:") else {
            return Ok(None);
        };
        if spec.starts_with(b"auto:") {
            return Ok(None);
        }
        let unparsable = || QemuArgsError::ParseLegacy {
            argument: lossy(bytes),
        };
        // Old QEMU looked for '.' first, then ':'; numbers go through strtoul with base 0
        // for bus.addr (so `014` is octal 12) and base 16 for vid:pid.
        if let Some(dot) = spec.iter().position(|&b| b == b'.') {
            let (bus, _) = strtoul(&spec[..dot], 0).ok_or_else(unparsable)?;
            let (address, _) = strtoul(&spec[dot + 1..], 0).ok_or_else(unparsable)?;
            let bus = u32::try_from(bus).map_err(|_| unparsable())?;
            let address = u32::try_from(address).map_err(|_| unparsable())?;
            if bus == 0 || address == 0 {
                return Err(unparsable());
            }
            return Ok(Some(LegacySpec {
                selector: Selector::BusAddress { bus, address },
            }));
        }
        if let Some(colon) = spec.iter().position(|&b| b == b':') {
            let (vendor, _) = strtoul(&spec[..colon], 16).ok_or_else(unparsable)?;
            let (product, _) = strtoul(&spec[colon + 1..], 16).ok_or_else(unparsable)?;
            let vendor_id = u16::try_from(vendor).map_err(|_| unparsable())?;
            let product_id = u16::try_from(product).map_err(|_| unparsable())?;
            return Ok(Some(LegacySpec {
                selector: Selector::VendorProduct {
                    vendor_id,
                    product_id,
                },
            }));
        }
        Err(unparsable())
    }
}

/// The legacy autoconnect filter `auto:BUS.DEV:VID:PID`: bus and dev decimal, vid and pid
/// hex, `*` for any.
fn render_legacy(facts: &DeviceFacts, mode: Mode) -> Vec<u8> {
    let bus = match mode {
        Mode::Id => "*".to_string(),
        Mode::Port => facts.bus.to_string(),
    };
    format!(
        "host:auto:{bus}.*:{:04x}:{:04x}",
        facts.vendor_id, facts.product_id
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------
// Keyval -device usb-host,...

/// Properties that pick the host device; all are replaced together.
const SELECTOR_PROPERTIES: &[&[u8]] = &[
    b"hostbus",
    b"hostaddr",
    b"hostport",
    b"hostdevice",
    b"vendorid",
    b"productid",
];

/// One comma-separated element of a QemuOpts string, as raw bytes (`,,` kept doubled).
struct KeyvalElement<'a> {
    raw: &'a [u8],
    /// The key, when the element has `=`; `None` for the implied first key or a flag.
    key: Option<&'a [u8]>,
}

struct KeyvalDevice<'a> {
    elements: Vec<KeyvalElement<'a>>,
    selector: Selector,
}

/// Splits a QemuOpts string at single commas; `,,` is an escaped comma inside a value.
fn split_keyval(bytes: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut position = 0;
    while position < bytes.len() {
        if bytes[position] == b',' {
            if bytes.get(position + 1) == Some(&b',') {
                position += 2;
                continue;
            }
            parts.push(&bytes[start..position]);
            start = position + 1;
        }
        position += 1;
    }
    parts.push(&bytes[start..]);
    parts
}

/// A value with `,,` turned back into `,`.
fn unescape_keyval(raw: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(raw.len());
    let mut position = 0;
    while position < raw.len() {
        value.push(raw[position]);
        if raw[position] == b',' && raw.get(position + 1) == Some(&b',') {
            position += 1;
        }
        position += 1;
    }
    value
}

/// QEMU's `qemu_strtou64(text, NULL, 0, ..)` for keyval integers: the whole text must be
/// a number; `0x` is hex and a leading `0` octal.
fn parse_keyval_uint(text: &[u8]) -> Option<u64> {
    if text
        .first()
        .is_some_and(|b| b.is_ascii_whitespace() || *b == b'+')
    {
        return None;
    }
    c_number::parse_whole(text, 0)
}

impl<'a> KeyvalDevice<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Option<KeyvalDevice<'a>>, QemuArgsError> {
        // Cheap test first: nearly every -device is something else.
        if !contains(bytes, b"usb-host") {
            return Ok(None);
        }
        let elements: Vec<KeyvalElement<'a>> = split_keyval(bytes)
            .into_iter()
            .map(|raw| {
                let key = raw
                    .iter()
                    .position(|&b| b == b'=')
                    .map(|equals| &raw[..equals]);
                KeyvalElement { raw, key }
            })
            .collect();
        let driver =
            elements
                .iter()
                .enumerate()
                .find_map(|(position, element)| match element.key {
                    Some(b"driver") => Some(unescape_keyval(&element.raw[b"driver=".len()..])),
                    None if position == 0 => Some(unescape_keyval(element.raw)),
                    _ => None,
                });
        if driver.as_deref() != Some(b"usb-host") {
            return Ok(None);
        }
        let value_of = |name: &[u8]| {
            elements
                .iter()
                .rev()
                .find(|element| element.key == Some(name))
                .map(|element| unescape_keyval(&element.raw[name.len() + 1..]))
        };
        let number = |name: &str| -> Result<Option<u32>, QemuArgsError> {
            match value_of(name.as_bytes()) {
                None => Ok(None),
                Some(text) => parse_keyval_uint(&text)
                    .and_then(|value| u32::try_from(value).ok())
                    .map(Some)
                    .ok_or_else(|| QemuArgsError::ParseProperty {
                        argument: lossy(bytes),
                        property: name.to_string(),
                        message: format!("{:?} is no unsigned integer", lossy(&text)),
                    }),
            }
        };
        let selector = if let Some(path) = value_of(b"hostdevice") {
            Selector::HostDevice(OsString::from_vec(path))
        } else {
            match (number("hostbus")?, number("hostaddr")?) {
                (Some(bus), Some(address)) if bus != 0 && address != 0 => {
                    Selector::BusAddress { bus, address }
                }
                // Without both, QEMU already scans (or the device is matched by IDs).
                _ => return Ok(None),
            }
        };
        Ok(Some(KeyvalDevice { elements, selector }))
    }

    fn render(&self, facts: &DeviceFacts, mode: Mode) -> Vec<u8> {
        let replacement = match (mode, facts.hostport.as_deref()) {
            (Mode::Port, Some(port)) => format!("hostbus={},hostport={port}", facts.bus),
            _ => format!(
                "vendorid=0x{:04x},productid=0x{:04x}",
                facts.vendor_id, facts.product_id
            ),
        };
        let mut parts: Vec<&[u8]> = Vec::with_capacity(self.elements.len() + 1);
        let mut inserted = false;
        for element in &self.elements {
            let is_selector = element
                .key
                .is_some_and(|key| SELECTOR_PROPERTIES.contains(&key));
            if is_selector {
                if !inserted {
                    parts.push(replacement.as_bytes());
                    inserted = true;
                }
            } else {
                parts.push(element.raw);
            }
        }
        parts.join(&b","[..])
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

// ---------------------------------------------------------------------------------
// JSON -device {"driver":"usb-host",...}

/// One member of the top-level JSON object, with its byte span (from the key's opening
/// quote to the end of its value) so that every other member is copied as it was.
struct JsonMember {
    key: String,
    span: std::ops::Range<usize>,
}

struct JsonDevice<'a> {
    bytes: &'a [u8],
    members: Vec<JsonMember>,
    selector: Selector,
}

impl<'a> JsonDevice<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Option<JsonDevice<'a>>, QemuArgsError> {
        if !contains(bytes, b"usb-host") {
            return Ok(None);
        }
        let error = |message: String| QemuArgsError::ParseJson {
            argument: lossy(bytes),
            message,
        };
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(bytes).map_err(|e| error(e.to_string()))?;
        if object.get("driver").and_then(|d| d.as_str()) != Some("usb-host") {
            return Ok(None);
        }
        let members = scan_json_members(bytes).map_err(error)?;
        let number = |name: &str| -> Result<Option<u32>, QemuArgsError> {
            match object.get(name) {
                None => Ok(None),
                Some(value) => value
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| QemuArgsError::ParseProperty {
                        argument: lossy(bytes),
                        property: name.to_string(),
                        message: format!("{value} is no unsigned integer"),
                    }),
            }
        };
        let selector = if let Some(path) = object.get("hostdevice") {
            let Some(path) = path.as_str() else {
                return Err(QemuArgsError::ParseProperty {
                    argument: lossy(bytes),
                    property: "hostdevice".to_string(),
                    message: format!("{path} is no string"),
                });
            };
            Selector::HostDevice(OsString::from(path))
        } else {
            match (number("hostbus")?, number("hostaddr")?) {
                (Some(bus), Some(address)) if bus != 0 && address != 0 => {
                    Selector::BusAddress { bus, address }
                }
                _ => return Ok(None),
            }
        };
        Ok(Some(JsonDevice {
            bytes,
            members,
            selector,
        }))
    }

    fn render(&self, facts: &DeviceFacts, mode: Mode) -> Vec<u8> {
        // QEMU's JSON visitor wants numbers for integer properties, not strings.
        let replacement = match (mode, facts.hostport.as_deref()) {
            (Mode::Port, Some(port)) => format!(
                "\"hostbus\":{},\"hostport\":{}",
                facts.bus,
                serde_json::Value::from(port)
            ),
            _ => format!(
                "\"vendorid\":{},\"productid\":{}",
                facts.vendor_id, facts.product_id
            ),
        };
        let first_selector = self
            .members
            .iter()
            .position(|m| SELECTOR_PROPERTIES.contains(&m.key.as_bytes()));
        let mut pieces: Vec<&[u8]> = Vec::new();
        for (position, member) in self.members.iter().enumerate() {
            if SELECTOR_PROPERTIES.contains(&member.key.as_bytes()) {
                if Some(position) == first_selector {
                    pieces.push(replacement.as_bytes());
                }
            } else {
                pieces.push(&self.bytes[member.span.clone()]);
            }
        }
        let mut out = Vec::with_capacity(self.bytes.len() + 16);
        out.push(b'{');
        out.extend_from_slice(&pieces.join(&b","[..]));
        out.push(b'}');
        out
    }
}

/// Finds the members of a top-level JSON object that serde_json already accepted.
fn scan_json_members(bytes: &[u8]) -> Result<Vec<JsonMember>, String> {
    let mut scanner = JsonScanner { bytes, position: 0 };
    scanner.skip_whitespace();
    scanner.expect(b'{')?;
    let mut members = Vec::new();
    scanner.skip_whitespace();
    if scanner.peek() == Some(b'}') {
        return Ok(members);
    }
    loop {
        scanner.skip_whitespace();
        let start = scanner.position;
        let key_span = scanner.skip_string()?;
        let key: String = serde_json::from_slice(&bytes[key_span]).map_err(|e| e.to_string())?;
        scanner.skip_whitespace();
        scanner.expect(b':')?;
        scanner.skip_whitespace();
        scanner.skip_value()?;
        members.push(JsonMember {
            key,
            span: start..scanner.position,
        });
        scanner.skip_whitespace();
        match scanner.next() {
            Some(b',') => continue,
            Some(b'}') => return Ok(members),
            _ => return Err("expected , or }".to_string()),
        }
    }
}

struct JsonScanner<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl JsonScanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.position += 1;
        Some(byte)
    }

    fn expect(&mut self, wanted: u8) -> Result<(), String> {
        match self.next() {
            Some(byte) if byte == wanted => Ok(()),
            _ => Err(format!("expected {:?}", wanted as char)),
        }
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    fn skip_string(&mut self) -> Result<std::ops::Range<usize>, String> {
        let start = self.position;
        self.expect(b'"')?;
        loop {
            match self.next() {
                Some(b'\\') => {
                    self.next();
                }
                Some(b'"') => return Ok(start..self.position),
                Some(_) => {}
                None => return Err("unterminated string".to_string()),
            }
        }
    }

    fn skip_value(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(b'"') => self.skip_string().map(|_| ()),
            Some(open @ (b'{' | b'[')) => {
                // serde_json has checked the nesting; only depth matters here.
                self.position += 1;
                let mut depth = 1usize;
                while depth > 0 {
                    match self.peek() {
                        Some(b'"') => {
                            self.skip_string()?;
                            continue;
                        }
                        Some(b'{' | b'[') => depth += 1,
                        Some(b'}' | b']') => depth -= 1,
                        Some(_) => {}
                        None => return Err(format!("unterminated {:?}", open as char)),
                    }
                    self.position += 1;
                }
                Ok(())
            }
            Some(_) => {
                while let Some(byte) = self.peek() {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.position += 1;
                }
                Ok(())
            }
            None => Err("missing value".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn facts() -> DeviceFacts {
        DeviceFacts {
            vendor_id: 0x046d,
            product_id: 0xc52b,
            bus: 1,
            hostport: Some("2.3".to_string()),
        }
    }

    fn rewrite_with(words: &[&str], mode: Mode) -> (Vec<OsString>, Vec<Outcome>, Vec<Selector>) {
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
    fn keyval_bus_address_becomes_vendor_product_keeping_other_properties() {
        let (out, _, asked) = rewrite_with(
            &[
                "-device",
                "usb-host,hostbus=1,hostaddr=5,id=hostdev0,bus=usb.0,port=1,bootindex=2",
            ],
            Mode::Id,
        );
        assert_eq!(asked, vec![Selector::BusAddress { bus: 1, address: 5 }]);
        assert_eq!(
            out[1],
            "usb-host,vendorid=0x046d,productid=0xc52b,id=hostdev0,bus=usb.0,port=1,bootindex=2"
        );
    }

    #[test]
    fn keyval_port_mode_writes_hostbus_and_hostport() {
        let (out, _, _) = rewrite_with(
            &[
                "-device",
                "usb-host,id=h,hostaddr=5,hostbus=1,guest-reset=off",
            ],
            Mode::Port,
        );
        assert_eq!(
            out[1],
            "usb-host,id=h,hostbus=1,hostport=2.3,guest-reset=off"
        );
    }

    #[test]
    fn keyval_numbers_follow_qemu_base_rules() {
        let (_, _, asked) = rewrite_with(
            &["-device", "driver=usb-host,hostbus=0x2,hostaddr=010"],
            Mode::Id,
        );
        assert_eq!(asked, vec![Selector::BusAddress { bus: 2, address: 8 }]);
        let (out, outcomes, _) =
            rewrite_with(&["-device", "usb-host,hostbus=1,hostaddr=08"], Mode::Id);
        assert_eq!(out[1], "usb-host,hostbus=1,hostaddr=08");
        assert!(matches!(
            &outcomes[0],
            Outcome::Unparsed { error: QemuArgsError::ParseProperty { property, .. }, .. } if property == "hostaddr"
        ));
    }

    #[test]
    fn keyval_escaped_commas_stay_escaped() {
        let (out, _, _) = rewrite_with(
            &["-device", "usb-host,hostbus=1,hostaddr=5,id=a,,b"],
            Mode::Id,
        );
        assert_eq!(out[1], "usb-host,vendorid=0x046d,productid=0xc52b,id=a,,b");
    }

    #[test]
    fn keyval_hostdevice_is_a_selector() {
        let (out, _, asked) = rewrite_with(
            &["-device", "usb-host,hostdevice=/dev/bus/usb/001/005,id=x"],
            Mode::Id,
        );
        assert_eq!(
            asked,
            vec![Selector::HostDevice("/dev/bus/usb/001/005".into())]
        );
        assert_eq!(out[1], "usb-host,vendorid=0x046d,productid=0xc52b,id=x");
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
            let (out, outcomes, asked) = rewrite_with(&["-device", value], Mode::Id);
            assert_eq!(out[1], value);
            assert!(outcomes.is_empty(), "{value}");
            assert!(asked.is_empty(), "{value}");
        }
    }

    #[test]
    fn json_from_libvirt_keeps_every_other_member_byte_for_byte() {
        let value = r#"{"driver":"usb-host","hostdevice":"/dev/bus/usb/001/005","id":"hostdev0","bootindex":1,"bus":"usb.0","port":"1"}"#;
        let (out, outcomes, _) = rewrite_with(&["-device", value], Mode::Id);
        assert_eq!(
            out[1],
            r#"{"driver":"usb-host","vendorid":1133,"productid":50475,"id":"hostdev0","bootindex":1,"bus":"usb.0","port":"1"}"#
        );
        assert!(matches!(
            &outcomes[0],
            Outcome::Rewritten {
                form: ArgForm::Json,
                ..
            }
        ));
        let parsed: serde_json::Value = serde_json::from_str(out[1].to_str().unwrap()).unwrap();
        assert_eq!(parsed["vendorid"], 0x046d);
    }

    #[test]
    fn json_port_mode_and_odd_spacing() {
        let value = "{ \"hostbus\" : 1 ,\n \"driver\":\"usb-host\", \"hostaddr\":5, \"id\":\"a \\\"q\\\" b\" }";
        let (out, _, _) = rewrite_with(&["-device", value], Mode::Port);
        assert_eq!(
            out[1],
            "{\"hostbus\":1,\"hostport\":\"2.3\",\"driver\":\"usb-host\",\"id\":\"a \\\"q\\\" b\"}"
        );
    }

    #[test]
    fn json_string_numbers_are_reported_not_rewritten() {
        let value = r#"{"driver":"usb-host","hostbus":"1","hostaddr":5}"#;
        let (out, outcomes, _) = rewrite_with(&["-device", value], Mode::Id);
        assert_eq!(out[1], value);
        assert!(matches!(&outcomes[0], Outcome::Unparsed { .. }));
        let broken = r#"{"driver":"usb-host","hostbus":1,"#;
        let (out, outcomes, _) = rewrite_with(&["-device", broken], Mode::Id);
        assert_eq!(out[1], broken);
        assert!(matches!(
            &outcomes[0],
            Outcome::Unparsed {
                error: QemuArgsError::ParseJson { .. },
                ..
            }
        ));
    }

    #[test]
    fn legacy_forms() {
        let cases: &[(&str, Option<Selector>, &str)] = &[
            (
                "host:046d:c52b",
                Some(Selector::VendorProduct {
                    vendor_id: 0x046d,
                    product_id: 0xc52b,
                }),
                "host:auto:*.*:046d:c52b",
            ),
            (
                "host:1.5",
                Some(Selector::BusAddress { bus: 1, address: 5 }),
                "host:auto:*.*:046d:c52b",
            ),
            // Zero-padded is octal to strtoul(.., 0): 014 is bus 12, 010 is device 8.
            (
                "host:014.010",
                Some(Selector::BusAddress {
                    bus: 12,
                    address: 8,
                }),
                "host:auto:*.*:046d:c52b",
            ),
            ("host:auto:1.*:046d:c52b", None, "host:auto:1.*:046d:c52b"),
            ("tablet", None, "tablet"),
        ];
        for (value, selector, expected) in cases {
            let (out, _, asked) = rewrite_with(&["-usbdevice", value], Mode::Id);
            assert_eq!(asked.first(), selector.as_ref(), "{value}");
            assert_eq!(out[1], *expected, "{value}");
        }
        let (out, _, _) = rewrite_with(&["--usbdevice", "host:3.7"], Mode::Port);
        assert_eq!(out[1], "host:auto:1.*:046d:c52b");
    }

    #[test]
    fn legacy_octal_stops_at_eight_as_strtoul_does() {
        // strtoul("008", 0) reads "00" and stops at '8': device 0, which names nothing.
        let (out, outcomes, _) = rewrite_with(&["-usbdevice", "host:001.008"], Mode::Id);
        assert_eq!(out[1], "host:001.008");
        assert!(matches!(&outcomes[0], Outcome::Unparsed { .. }));
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
        let (out, outcomes, asked) = rewrite_with(&words, Mode::Id);
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
        let (out, _, _) = rewrite_with(&words, Mode::Id);
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
            mode: Mode::Id,
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

    #[test]
    fn port_mode_without_a_known_port_falls_back_to_ids() {
        let words = os(&["-device", "usb-host,hostbus=1,hostaddr=5"]);
        let (out, _) = rewrite_args(&words, |_| Decision::Rewrite {
            facts: DeviceFacts {
                hostport: None,
                ..facts()
            },
            mode: Mode::Port,
        });
        assert_eq!(out[1], "usb-host,vendorid=0x046d,productid=0xc52b");
    }
}
