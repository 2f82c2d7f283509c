//! One access-log line, written byte by byte into its buffer: JSON strings escaped as they are
//! copied, numbers and addresses without `core::fmt`, and the start time from a per-thread copy
//! of the current second's date (a line costs about a quarter of what formatting it did).

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::text::{push_addr, push_padded, push_u64};

/// A line being written.
pub struct Line(pub Vec<u8>);

impl Line {
    pub fn with_capacity(n: usize) -> Line {
        Line(Vec::with_capacity(n))
    }

    /// Text the proxy wrote (field names, punctuation): copied as it is.
    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    /// The inside of a JSON string, escaped.
    pub fn json(&mut self, bytes: &[u8]) -> &mut Self {
        push_json(&mut self.0, bytes);
        self
    }

    /// A whole field, `,"name":"value"`, both escaped.
    pub fn field(&mut self, name: &[u8], value: &[u8]) -> &mut Self {
        self.raw(",\"")
            .json(name)
            .raw("\":\"")
            .json(value)
            .raw("\"")
    }

    pub fn number(&mut self, n: u64) -> &mut Self {
        push_u64(&mut self.0, n);
        self
    }

    /// Milliseconds with three decimals (`1.500`).
    pub fn millis(&mut self, d: Duration) -> &mut Self {
        let us = d.as_micros();
        push_u64(&mut self.0, u64::try_from(us / 1000).unwrap_or(u64::MAX));
        self.0.push(b'.');
        push_padded(&mut self.0, (us % 1000) as u64, 3);
        self
    }

    /// An address as `Display` writes it (`1.2.3.4:5`, `[::1]:5`).
    pub fn addr(&mut self, a: SocketAddr) -> &mut Self {
        push_addr(&mut self.0, a);
        self
    }

    /// `t` in RFC 3339, UTC, with microseconds (`2026-12-03T04:01:25.911000Z`); a time before
    /// 1970 as 1970's first second.
    pub fn timestamp(&mut self, t: SystemTime) -> &mut Self {
        let since = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let secs = since.as_secs();
        self.0.extend_from_slice(&date_time(secs));
        self.0.push(b'.');
        push_padded(&mut self.0, u64::from(since.subsec_micros()), 6);
        self.0.push(b'Z');
        self
    }
}

thread_local! {
    /// The last second formatted on this thread (lines of one second share their date).
    static LAST_SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since 1970.
fn date_time(secs: u64) -> [u8; 19] {
    let (last, text) = LAST_SECOND.get();
    if last == secs {
        return text;
    }
    let days = secs / 86_400;
    let rest = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = [0u8; 19];
    let mut put = |at: usize, n: u64, width: usize| {
        let mut n = n;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, rest / 3600, 2);
    put(14, rest / 60 % 60, 2);
    put(17, rest % 60, 2);
    out[4] = b'-';
    out[7] = b'-';
    out[10] = b'T';
    out[13] = b':';
    out[16] = b':';
    LAST_SECOND.set((secs, out));
    out
}

/// Year, month and day of the proleptic Gregorian calendar for `days` since 1970-01-01 (the
/// usual era arithmetic: 400-year eras of 146,097 days, years starting in March).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Whether every byte is printable ASCII other than `"` and `\` (nothing to escape). Eight
/// bytes at a time: a byte is flagged when it is below 0x20, above 0x7e, or equal to one of
/// the two (each test sets the byte's high bit; no carry crosses bytes, as every addend keeps
/// each byte below 0x100).
fn plain(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let flagged = |x: u64| {
        let low7 = x & !HIGH;
        // High bit of each byte: the byte itself is >= 0x80, or its low 7 bits are >= 0x7f,
        // or they are < 0x20 (no +0x60 carry into bit 7), or they equal '"' or '\'.
        let over = x | (low7 + ONES);
        let under = !(low7 + ONES * 0x60);
        let quote = !((low7 ^ (ONES * u64::from(b'"'))) + ONES * 0x7f);
        let backslash = !((low7 ^ (ONES * u64::from(b'\\'))) + ONES * 0x7f);
        (over | under | quote | backslash) & HIGH != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        if flagged(u64::from_le_bytes(word)) {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Bytes as the inside of a JSON string: quotes, backslashes and control characters escaped
/// (C0, DEL, C1, and U+2028/U+2029, which end a line for some readers), bytes that are not
/// UTF-8 written as U+FFFD. Nothing a client sends can end the string, add a field or a line.
pub fn push_json(out: &mut Vec<u8>, bytes: &[u8]) {
    // Most fields are printable ASCII with nothing to escape: copied in one piece.
    if plain(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    for chunk in bytes.utf8_chunks() {
        let s = chunk.valid();
        let mut from = 0;
        for (i, c) in s.char_indices() {
            let esc: &[u8] = match c {
                '"' => b"\\\"",
                '\\' => b"\\\\",
                '\n' => b"\\n",
                '\r' => b"\\r",
                '\t' => b"\\t",
                c if (c as u32) < 0x20
                    || c == '\u{7f}'
                    || ('\u{80}'..='\u{9f}').contains(&c)
                    || c == '\u{2028}'
                    || c == '\u{2029}' =>
                {
                    b""
                }
                _ => continue,
            };
            out.extend_from_slice(&s.as_bytes()[from..i]);
            if esc.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let u = c as u32;
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((u >> shift) & 0xf) as usize]);
                }
            } else {
                out.extend_from_slice(esc);
            }
            from = i + c.len_utf8();
        }
        out.extend_from_slice(&s.as_bytes()[from..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &[u8]) -> String {
        let mut out = Vec::new();
        push_json(&mut out, b);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn json_strings_cannot_be_broken_out_of() {
        let hostile = b"a\"b\\c\nd\re\tf\x00g\x1bh\x7fi\xc2\x85j\xe2\x80\xa8k\xff\xfel\xe2\x80\xa9";
        let s = format!("\"{}\"", json(hostile));
        let back: String = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(
            back,
            "a\"b\\c\nd\re\tf\u{0}g\u{1b}h\u{7f}i\u{85}j\u{2028}k\u{fffd}\u{fffd}l\u{2029}"
        );
        assert!(!s.contains('\n') && !s.contains('\r'));
        assert!(s.bytes().all(|b| b >= 0x20 && b != 0x7f));
        assert!(!s.contains('\u{2028}') && !s.contains('\u{2029}'));
        // A truncated sequence at the very end, and one cut by a quote.
        assert_eq!(json(b"ab\xe2\x80"), "ab\u{fffd}");
        assert_eq!(json(b"\xe2\"x"), "\u{fffd}\\\"x");
        assert_eq!(json(b""), "");
        assert_eq!(json(b"plain/ascii?x=1"), "plain/ascii?x=1");
    }

    /// Every byte value, at every position of the eight-byte words and of the remainder, is
    /// found when it needs escaping (and only then).
    #[test]
    fn the_word_at_a_time_check_finds_every_byte_to_escape() {
        let needs = |b: u8| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\';
        for len in [1, 7, 8, 9, 16, 17] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(plain(&bytes), !needs(b), "byte {b:#04x} at {at} of {len}");
                }
            }
        }
        assert!(plain(b""));
    }

    #[test]
    fn timestamps_match_rfc3339_for_any_second() {
        // Every day boundary and leap rule: each day from 1970 to 2100 at a changing second,
        // plus the far end of four-digit years.
        let mut secs: Vec<u64> = (0..47_500u64)
            .map(|d| d * 86_400 + (d * 7_919) % 86_400)
            .collect();
        secs.extend([0, 59, 86_399, 951_782_400, 4_107_542_399, 253_402_300_799]);
        for s in secs {
            for micros in [0u32, 1, 911_000, 999_999] {
                let t = SystemTime::UNIX_EPOCH + Duration::new(s, micros * 1000);
                let mut line = Line::with_capacity(32);
                line.timestamp(t);
                let ours = String::from_utf8(line.0).expect("UTF-8");
                assert_eq!(
                    ours,
                    humantime::format_rfc3339_micros(t).to_string(),
                    "{s}.{micros}"
                );
            }
        }
        let mut line = Line::with_capacity(32);
        line.timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(line.0, b"1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn millis_have_three_decimals() {
        for us in [0u64, 1, 999, 1000, 1500, 123_456_789] {
            let mut line = Line::with_capacity(8);
            line.millis(Duration::from_micros(us));
            assert_eq!(
                String::from_utf8(line.0).expect("UTF-8"),
                format!("{}.{:03}", us / 1000, us % 1000)
            );
        }
    }
}
