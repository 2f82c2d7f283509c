//! Integers in decimal without `core::fmt`, whose machinery costs a guest several times as
//! much as the digits (and filters write numbers on every request: status codes, counts).

/// `m / 10` and `m % 10` by a multiply: Wasm has no multiply-high, so the compiler leaves a
/// division by ten as a real division (tens of cycles each), on `u32`s too. `0xCCCC_CCCD` is
/// 2^35 / 10 rounded up, exact for every `u32`.
fn div10(m: u32) -> (u32, u8) {
    let q = ((u64::from(m) * 0xCCCC_CCCD) >> 35) as u32;
    (q, (m - q * 10) as u8)
}

/// Appends `n` in decimal. Past `u32::MAX` one 64-bit division splits off nine digits at a
/// time; the digits themselves come from `u32`s.
pub fn push(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut high = n;
    while high > u64::from(u32::MAX) {
        let mut low = (high % 1_000_000_000) as u32;
        high /= 1_000_000_000;
        for _ in 0..9 {
            let (q, r) = div10(low);
            i -= 1;
            digits[i] = b'0' + r;
            low = q;
        }
    }
    // At most u32::MAX now (and at least 4 when a group was split off above).
    let mut m = high as u32;
    loop {
        let (q, r) = div10(m);
        i -= 1;
        digits[i] = b'0' + r;
        m = q;
        if m == 0 {
            break;
        }
    }
    if let Ok(text) = std::str::from_utf8(&digits[i..]) {
        out.push_str(text);
    }
}

/// `n` in decimal.
pub fn string(n: u64) -> String {
    let mut s = String::with_capacity(20);
    push(&mut s, n);
    s
}

#[cfg(test)]
mod tests {
    /// The multiply equals the division: every 997th `u32`, and the first and last million.
    #[test]
    fn div10_is_exact() {
        let check = |m: u32| assert_eq!(super::div10(m), (m / 10, (m % 10) as u8), "{m}");
        (0..1_000_000).for_each(check);
        (u32::MAX - 1_000_000..=u32::MAX).for_each(check);
        (0..=u32::MAX).step_by(997).for_each(check);
    }

    /// As `core::fmt` writes them, at the edges.
    #[test]
    fn digits_match_core_fmt() {
        let mut edges = vec![0, 1, 9, 10, 99, 100, 503, 65_535, u64::MAX, u64::MAX - 1];
        // Around the u32 boundary and every power of ten (where digits are split off).
        for base in [u64::from(u32::MAX), 1 << 32]
            .into_iter()
            .chain((0..20).map(|e| 10u64.pow(e)))
        {
            edges.extend([base.saturating_sub(1), base, base.saturating_add(1)]);
        }
        // Zeros inside a nine-digit group, and a group of all zeros.
        edges.extend([
            4_000_000_000,
            4_000_000_001,
            10_000_000_000_000_000_000,
            12_000_000_000_345,
        ]);
        for n in edges {
            assert_eq!(super::string(n), n.to_string());
            let mut s = String::from("x=");
            super::push(&mut s, n);
            assert_eq!(s, format!("x={n}"));
        }
    }
}
