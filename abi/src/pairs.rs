//! The map ("pairs") encoding of header maps, metadata and map-typed properties:
//!
//! ```text
//! u32 N | N × (u32 key_len, u32 value_len) | N × (key bytes, 0x00, value bytes, 0x00)
//! ```
//! All integers little-endian; lengths exclude the NUL terminators.

use alloc::vec::Vec;

use crate::{MAX_PAIRS, MAX_PAIRS_BYTES};

/// Why serialized pairs were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairsError {
    /// More than [`MAX_PAIRS_BYTES`] bytes or [`MAX_PAIRS`] entries.
    TooLarge,
    /// Lengths that run past the end, a missing NUL, or bytes left over.
    Malformed,
}

/// The size of the encoding of `pairs`.
pub fn pairs_len<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> usize {
    4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.as_ref().len() + 1 + v.as_ref().len() + 1)
        .sum::<usize>()
}

/// Encodes `pairs`.
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pairs_len(pairs));
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Pairs borrowed from their encoding.
pub type BorrowedPairs<'a> = Vec<(&'a [u8], &'a [u8])>;

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Decodes pairs, borrowing from `bytes`. Fewer than 4 bytes, or N = 0, is an empty map (the
/// SDKs send 4 zero bytes, hosts send nothing, the spec also allows a single 0).
pub fn deserialize_pairs(bytes: &[u8]) -> Result<BorrowedPairs<'_>, PairsError> {
    if bytes.len() > MAX_PAIRS_BYTES {
        return Err(PairsError::TooLarge);
    }
    if bytes.len() < 4 {
        return Ok(Vec::new());
    }
    let n = u32_at(bytes, 0).ok_or(PairsError::Malformed)?;
    if n > MAX_PAIRS {
        return Err(PairsError::TooLarge);
    }
    let sizes_end = 4usize
        .checked_add(n.checked_mul(8).ok_or(PairsError::Malformed)?)
        .ok_or(PairsError::Malformed)?;
    if sizes_end > bytes.len() {
        return Err(PairsError::Malformed);
    }
    let mut out = Vec::with_capacity(n);
    let mut at = sizes_end;
    for i in 0..n {
        let klen = u32_at(bytes, 4 + i * 8).ok_or(PairsError::Malformed)?;
        let vlen = u32_at(bytes, 8 + i * 8).ok_or(PairsError::Malformed)?;
        let key_end = at.checked_add(klen).ok_or(PairsError::Malformed)?;
        let value_start = key_end + 1;
        let value_end = value_start.checked_add(vlen).ok_or(PairsError::Malformed)?;
        if value_end >= bytes.len() || bytes[key_end] != 0 || bytes[value_end] != 0 {
            return Err(PairsError::Malformed);
        }
        out.push((&bytes[at..key_end], &bytes[value_start..value_end]));
        at = value_end + 1;
    }
    if at != bytes.len() {
        return Err(PairsError::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worked_example_is_byte_exact() {
        let bytes = serialize_pairs(&[(":method", "GET"), (":path", "/")]);
        let want: &[u8] = &[
            2, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, b':', b'm', b'e', b't',
            b'h', b'o', b'd', 0, b'G', b'E', b'T', 0, b':', b'p', b'a', b't', b'h', 0, b'/', 0,
        ];
        assert_eq!(bytes, want);
        assert_eq!(pairs_len(&[(":method", "GET"), (":path", "/")]), want.len());
        let back = deserialize_pairs(&bytes).expect("valid");
        assert_eq!(
            back,
            [(&b":method"[..], &b"GET"[..]), (&b":path"[..], &b"/"[..])]
        );
    }

    #[test]
    fn empty_forms() {
        assert!(deserialize_pairs(&[]).expect("empty").is_empty());
        assert!(deserialize_pairs(&[0]).expect("single zero").is_empty());
        assert!(deserialize_pairs(&[0, 0, 0, 0]).expect("n = 0").is_empty());
        let empty: [(&str, &str); 0] = [];
        assert_eq!(serialize_pairs(&empty), [0, 0, 0, 0]);
    }

    #[test]
    fn duplicates_and_empty_values_survive() {
        let pairs = [
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("x-empty", ""),
        ];
        let bytes = serialize_pairs(&pairs);
        let back = deserialize_pairs(&bytes).expect("valid");
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], (&b"x-empty"[..], &b""[..]));
    }

    #[test]
    fn hostile_inputs_are_refused() {
        let good = serialize_pairs(&[("a", "1")]);
        // Lengths past the end.
        let mut bad = good.clone();
        bad[4] = 200;
        assert_eq!(deserialize_pairs(&bad), Err(PairsError::Malformed));
        // Missing NUL.
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] = b'x';
        assert_eq!(deserialize_pairs(&bad), Err(PairsError::Malformed));
        // Trailing garbage.
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(deserialize_pairs(&bad), Err(PairsError::Malformed));
        // Huge N.
        assert_eq!(
            deserialize_pairs(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]),
            Err(PairsError::TooLarge)
        );
        // N × 8 overflowing the buffer.
        assert_eq!(
            deserialize_pairs(&[100, 0, 0, 0]),
            Err(PairsError::Malformed)
        );
    }
}
