//! C's `strtoul` and the whole-string form of it that libvirt and QEMU use to read
//! numbers: the one place that knows base 0's `0x` and leading-zero rules.

/// C's `strtoul(text, &end, base)` as old QEMU called it: leading blanks, an optional
/// `+`, base 0 picks hex for `0x`, octal for a leading `0`, else decimal; it stops at the
/// first byte that is no digit of the base. Returns the value and the rest. `None` when
/// no digit was read or the value overflows (strtoul would give ULONG_MAX, which no
/// bus or device number can be).
pub fn strtoul(text: &[u8], base: u32) -> Option<(u64, &[u8])> {
    let mut rest = text;
    while let Some((first, tail)) = rest.split_first() {
        // C's isspace: Rust's is_ascii_whitespace leaves out the vertical tab.
        if first.is_ascii_whitespace() || *first == 0x0b {
            rest = tail;
        } else {
            break;
        }
    }
    if let Some(tail) = rest.strip_prefix(b"+") {
        rest = tail;
    }
    let has_hex_prefix = |r: &[u8]| {
        r.len() > 2 && r[0] == b'0' && (r[1] | 0x20) == b'x' && (r[2] as char).is_ascii_hexdigit()
    };
    let base = match base {
        0 if has_hex_prefix(rest) => {
            rest = &rest[2..];
            16
        }
        0 if rest.first() == Some(&b'0') => 8,
        0 => 10,
        16 if has_hex_prefix(rest) => {
            rest = &rest[2..];
            16
        }
        other => other,
    };
    let mut value: u64 = 0;
    let mut digits = 0;
    for &byte in rest {
        let Some(digit) = (byte as char).to_digit(base) else {
            break;
        };
        value = value
            .checked_mul(u64::from(base))?
            .checked_add(u64::from(digit))?;
        digits += 1;
    }
    if digits == 0 {
        return None;
    }
    Some((value, &rest[digits..]))
}

/// A number that must fill all of `text`, read as `strtoul(text, &end, base)` with `*end`
/// required to be the terminating nul: libvirt's `virStrToLong_uip` for hostdev XML
/// attributes, QEMU's `qemu_strtou64` for keyval properties.
pub fn parse_whole(text: &[u8], base: u32) -> Option<u64> {
    match strtoul(text, base) {
        Some((value, [])) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtoul_stops_where_c_does() {
        assert_eq!(strtoul(b"008", 0), Some((0, &b"8"[..])));
        assert_eq!(strtoul(b"0x1F.", 0), Some((31, &b"."[..])));
        assert_eq!(strtoul(b" +12", 10), Some((12, &b""[..])));
        assert_eq!(strtoul(b"\x0b7", 10), Some((7, &b""[..])));
        assert_eq!(strtoul(b"x", 10), None);
    }

    #[test]
    fn whole_numbers_in_base_zero() {
        assert_eq!(parse_whole(b"0", 0), Some(0));
        assert_eq!(parse_whole(b"00", 0), Some(0));
        assert_eq!(parse_whole(b" +7", 0), Some(7));
        assert_eq!(parse_whole(b"0x+7", 0), None);
        assert_eq!(parse_whole(b"017", 0), Some(15));
        assert_eq!(parse_whole(b"08", 0), None);
        assert_eq!(parse_whole(b"0x", 0), None);
    }
}
