//! The legacy spelling `-usbdevice host:BUS.ADDR` or `host:VID:PID` (QEMU before 2.x),
//! rewritten to its autoconnect filter `host:auto:...`.

use super::{lossy, HostDeviceFacts, QemuArgsError, Selector};
use crate::rules::ReconnectMode;
use crate::util::c_number::strtoul;

pub(super) struct LegacySpec {
    pub(super) selector: Selector,
}

impl LegacySpec {
    /// `host:BUS.ADDR` or `host:VID:PID` as old QEMU's `usb_host_device_open` read them;
    /// `host:auto:...` and other devices (`tablet`, `disk:...`) are not ours to touch.
    pub(super) fn parse(bytes: &[u8]) -> Result<Option<LegacySpec>, QemuArgsError> {
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
pub(super) fn render_legacy(facts: &HostDeviceFacts, mode: ReconnectMode) -> Vec<u8> {
    let bus = match mode {
        ReconnectMode::Id => "*".to_string(),
        ReconnectMode::Port => facts.bus.to_string(),
    };
    format!(
        "host:auto:{bus}.*:{:04x}:{:04x}",
        facts.vendor_id, facts.product_id
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use crate::rules::ReconnectMode;
    use crate::wrapper::qemu_args::tests::rewrite_with;
    use crate::wrapper::qemu_args::{Outcome, Selector};

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
            let (out, _, asked) = rewrite_with(&["-usbdevice", value], ReconnectMode::Id);
            assert_eq!(asked.first(), selector.as_ref(), "{value}");
            assert_eq!(out[1], *expected, "{value}");
        }
        let (out, _, _) = rewrite_with(&["--usbdevice", "host:3.7"], ReconnectMode::Port);
        assert_eq!(out[1], "host:auto:1.*:046d:c52b");
    }

    #[test]
    fn legacy_octal_stops_at_eight_as_strtoul_does() {
        // strtoul("008", 0) reads "00" and stops at '8': device 0, which names nothing.
        let (out, outcomes, _) = rewrite_with(&["-usbdevice", "host:001.008"], ReconnectMode::Id);
        assert_eq!(out[1], "host:001.008");
        assert!(matches!(&outcomes[0], Outcome::Unparsed { .. }));
    }
}
