//! The JSON spelling `-device {"driver":"usb-host",...}` that libvirt 8 and later write:
//! every member but the selector is copied byte for byte.

use super::{contains, lossy, HostDeviceFacts, QemuArgsError, Selector, SELECTOR_PROPERTIES};
use crate::rules::ReconnectMode;
use std::ffi::OsString;

/// One member of the top-level JSON object, with its byte span (from the key's opening
/// quote to the end of its value) so that every other member is copied as it was.
struct JsonMember {
    key: String,
    span: std::ops::Range<usize>,
}

pub(super) struct JsonDevice<'a> {
    bytes: &'a [u8],
    members: Vec<JsonMember>,
    pub(super) selector: Selector,
}

impl<'a> JsonDevice<'a> {
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Option<JsonDevice<'a>>, QemuArgsError> {
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

    pub(super) fn render(&self, facts: &HostDeviceFacts, mode: ReconnectMode) -> Vec<u8> {
        // QEMU's JSON visitor wants numbers for integer properties, not strings.
        let replacement = match (mode, facts.hostport.as_deref()) {
            (ReconnectMode::Port, Some(port)) => format!(
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
    use crate::rules::ReconnectMode;
    use crate::wrapper::qemu_args::tests::rewrite_with;
    use crate::wrapper::qemu_args::{ArgForm, Outcome, QemuArgsError};

    #[test]
    fn json_from_libvirt_keeps_every_other_member_byte_for_byte() {
        let value = r#"{"driver":"usb-host","hostdevice":"/dev/bus/usb/001/005","id":"hostdev0","bootindex":1,"bus":"usb.0","port":"1"}"#;
        let (out, outcomes, _) = rewrite_with(&["-device", value], ReconnectMode::Id);
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
        let (out, _, _) = rewrite_with(&["-device", value], ReconnectMode::Port);
        assert_eq!(
            out[1],
            "{\"hostbus\":1,\"hostport\":\"2.3\",\"driver\":\"usb-host\",\"id\":\"a \\\"q\\\" b\"}"
        );
    }

    #[test]
    fn json_string_numbers_are_reported_not_rewritten() {
        let value = r#"{"driver":"usb-host","hostbus":"1","hostaddr":5}"#;
        let (out, outcomes, _) = rewrite_with(&["-device", value], ReconnectMode::Id);
        assert_eq!(out[1], value);
        assert!(matches!(&outcomes[0], Outcome::Unparsed { .. }));
        let broken = r#"{"driver":"usb-host","hostbus":1,"#;
        let (out, outcomes, _) = rewrite_with(&["-device", broken], ReconnectMode::Id);
        assert_eq!(out[1], broken);
        assert!(matches!(
            &outcomes[0],
            Outcome::Unparsed {
                error: QemuArgsError::ParseJson { .. },
                ..
            }
        ));
    }
}
