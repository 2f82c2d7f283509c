//! Numbers and addresses written as bytes, as `Display` writes them, without `core::fmt` (on
//! the request path: access-log lines, properties filters read).

use std::net::SocketAddr;

/// `n` in decimal.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    out.extend_from_slice(u64_text(n, &mut buf).as_bytes());
}

/// `n` in decimal, written at the end of `buf` (no allocation).
pub fn u64_text(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only digits: always UTF-8.
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

/// `n` in decimal with at least `width` digits (leading zeros; one digit at least, 20 at most).
pub fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    while n > 0 {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    at = at.min(digits.len() - width.clamp(1, digits.len()));
    out.extend_from_slice(&digits[at..]);
}

/// An address as `Display` writes it (`1.2.3.4:5`, `[::1]:5`).
pub fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            for (i, o) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(*o));
            }
            out.push(b':');
            push_u64(out, u64::from(v4.port()));
        }
        // Rare enough (and its shortening rules subtle enough) to leave to `Display`.
        SocketAddr::V6(_) => {
            use std::io::Write as _;
            let _ = write!(out, "{a}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_addresses_are_written_as_display_writes_them() {
        for n in [0u64, 7, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            assert_eq!(u64_text(n, &mut [0; 20]), n.to_string());
            for width in [0, 1, 3, 6, 20, 25] {
                let mut out = Vec::new();
                push_padded(&mut out, n, width);
                let want = format!("{n:0width$}", width = width.min(20));
                assert_eq!(String::from_utf8(out).expect("digits"), want);
            }
        }
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:5000",
            "255.255.255.255:65535",
            "[::1]:8080",
            "[2001:db8::1:0:0:1]:443",
            "[::ffff:10.0.0.1]:1",
        ] {
            let a: SocketAddr = a.parse().expect("address");
            let mut out = Vec::new();
            push_addr(&mut out, a);
            assert_eq!(out, a.to_string().as_bytes());
        }
    }
}
