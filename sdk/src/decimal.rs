//! Integers in decimal without `core::fmt`, whose machinery costs a guest several times as
//! much as the digits (and filters write numbers on every request: status codes, counts).

/// Appends `n` in decimal.
pub fn push(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().map(|&d| char::from(d)));
}

/// `n` in decimal.
pub fn string(n: u64) -> String {
    let mut s = String::with_capacity(20);
    push(&mut s, n);
    s
}

#[cfg(test)]
mod tests {
    /// As `core::fmt` writes them, at the edges.
    #[test]
    fn digits_match_core_fmt() {
        for n in [0, 1, 9, 10, 99, 100, 503, 65_535, 1 << 32, u64::MAX] {
            assert_eq!(super::string(n), n.to_string());
            let mut s = String::from("x=");
            super::push(&mut s, n);
            assert_eq!(s, format!("x={n}"));
        }
    }
}
