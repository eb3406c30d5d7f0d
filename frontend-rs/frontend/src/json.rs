//! A small JSON writer into a reused byte buffer: the response and chunk bodies are written
//! field by field in the Python server's (msgspec's) field order, without building a
//! `serde_json::Value` or any intermediate `String` per token.

/// Append `s` as a JSON string literal, escaped as msgspec escapes it: `"` and `\`,
/// the short escapes `\n \r \t \b \f`, other control characters as `\u00XX`;
/// everything else (non-ASCII included) verbatim as UTF-8.
pub fn write_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[(b >> 4) as usize]);
            buf.push(HEX[(b & 0xf) as usize]);
        } else {
            buf.extend_from_slice(escape);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
}

/// Append an optional string (`null` for None).
pub fn write_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(buf, s),
        None => buf.extend_from_slice(b"null"),
    }
}

pub fn write_i64(buf: &mut Vec<u8>, v: i64) {
    use std::io::Write;
    let _ = write!(buf, "{}", v);
}

/// A float as its shortest round-trip form (`1.0`, `-0.25`); `null` when not finite, as
/// msgspec writes NaN and infinities.
pub fn write_f64(buf: &mut Vec<u8>, v: f64) {
    // serde_json formats with ryu (shortest round-trip) and writes null for NaN/inf.
    let _ = serde_json::to_writer(&mut *buf, &v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        let mut b = Vec::new();
        write_str(&mut b, x);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn escapes_like_msgspec() {
        assert_eq!(s("plain"), "\"plain\"");
        assert_eq!(s("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(s("l1\nl2\t\r"), "\"l1\\nl2\\t\\r\"");
        assert_eq!(s("\u{0}\u{1f}\u{8}\u{c}"), "\"\\u0000\\u001f\\b\\f\"");
        assert_eq!(s("héllo 🦀 </>"), "\"héllo 🦀 </>\"");
    }

    /// msgspec.json.encode of the same floats (the logprobs a response carries).
    #[test]
    fn floats_like_msgspec() {
        let cases = [
            (1e-7, "1e-7"),
            (-1.5e-10, "-1.5e-10"),
            (1e16, "1e16"),
            (-0.0, "-0.0"),
            (123456789012345680.0, "1.2345678901234568e17"),
            (0.0001, "0.0001"),
            (-2.5e-5, "-0.000025"),
            (-0.6931471805599453, "-0.6931471805599453"),
        ];
        for (x, want) in cases {
            let mut b = Vec::new();
            write_f64(&mut b, x);
            assert_eq!(String::from_utf8(b).unwrap(), want, "{x:e}");
        }
    }

    #[test]
    fn floats_round_trip() {
        let mut b = Vec::new();
        write_f64(&mut b, -0.5);
        b.push(b' ');
        write_f64(&mut b, 1.0);
        b.push(b' ');
        write_f64(&mut b, f64::NEG_INFINITY);
        assert_eq!(String::from_utf8(b).unwrap(), "-0.5 1.0 null");
    }
}
