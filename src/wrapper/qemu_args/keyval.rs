//! The keyval spelling `-device usb-host,hostbus=1,hostaddr=5,...` (QemuOpts): splitting
//! at single commas, QEMU's number rules, and replacing the selector properties in place.

use super::{contains, lossy, HostDeviceFacts, QemuArgsError, Selector, SELECTOR_PROPERTIES};
use crate::rules::ReconnectMode;
use crate::util::c_number;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

/// One comma-separated element of a QemuOpts string, as raw bytes (`,,` kept doubled).
struct KeyvalElement<'a> {
    raw: &'a [u8],
    /// The key, when the element has `=`; `None` for the implied first key or a flag.
    key: Option<&'a [u8]>,
}

pub(super) struct KeyvalDevice<'a> {
    elements: Vec<KeyvalElement<'a>>,
    pub(super) selector: Selector,
}

/// Splits a QemuOpts string at single commas; `,,` is an escaped comma inside a value.
pub(super) fn split_keyval(bytes: &[u8]) -> Vec<&[u8]> {
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
pub(super) fn unescape_keyval(raw: &[u8]) -> Vec<u8> {
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
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Option<KeyvalDevice<'a>>, QemuArgsError> {
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

    pub(super) fn render(&self, facts: &HostDeviceFacts, mode: ReconnectMode) -> Vec<u8> {
        let replacement = match (mode, facts.hostport.as_deref()) {
            (ReconnectMode::Port, Some(port)) => format!("hostbus={},hostport={port}", facts.bus),
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

#[cfg(test)]
mod tests {
    use crate::rules::ReconnectMode;
    use crate::wrapper::qemu_args::tests::{facts, os, rewrite_with};
    use crate::wrapper::qemu_args::{
        rewrite_args, Decision, HostDeviceFacts, Outcome, QemuArgsError, Selector,
    };

    #[test]
    fn keyval_bus_address_becomes_vendor_product_keeping_other_properties() {
        let (out, _, asked) = rewrite_with(
            &[
                "-device",
                "usb-host,hostbus=1,hostaddr=5,id=hostdev0,bus=usb.0,port=1,bootindex=2",
            ],
            ReconnectMode::Id,
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
            ReconnectMode::Port,
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
            ReconnectMode::Id,
        );
        assert_eq!(asked, vec![Selector::BusAddress { bus: 2, address: 8 }]);
        let (out, outcomes, _) = rewrite_with(
            &["-device", "usb-host,hostbus=1,hostaddr=08"],
            ReconnectMode::Id,
        );
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
            ReconnectMode::Id,
        );
        assert_eq!(out[1], "usb-host,vendorid=0x046d,productid=0xc52b,id=a,,b");
    }

    #[test]
    fn keyval_hostdevice_is_a_selector() {
        let (out, _, asked) = rewrite_with(
            &["-device", "usb-host,hostdevice=/dev/bus/usb/001/005,id=x"],
            ReconnectMode::Id,
        );
        assert_eq!(
            asked,
            vec![Selector::HostDevice("/dev/bus/usb/001/005".into())]
        );
        assert_eq!(out[1], "usb-host,vendorid=0x046d,productid=0xc52b,id=x");
    }

    #[test]
    fn port_mode_without_a_known_port_falls_back_to_ids() {
        let words = os(&["-device", "usb-host,hostbus=1,hostaddr=5"]);
        let (out, _) = rewrite_args(&words, |_| Decision::Rewrite {
            facts: HostDeviceFacts {
                hostport: None,
                ..facts()
            },
            mode: ReconnectMode::Port,
        });
        assert_eq!(out[1], "usb-host,vendorid=0x046d,productid=0xc52b");
    }
}
