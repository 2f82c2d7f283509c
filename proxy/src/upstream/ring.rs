//! Consistent hashing (a Ketama ring): each endpoint owns `POINTS_PER_WEIGHT` × weight points on
//! a 64-bit ring, placed by hashing its address; a key goes to the owner of the first point at
//! or after its hash. Adding an endpoint moves only the keys its new points capture (about
//! 1/n of them); removing one moves only its own.

use std::sync::Arc;

use super::endpoint::Endpoint;

const POINTS_PER_WEIGHT: u64 = 160;
const MAX_POINTS: u64 = 1 << 17;

/// FNV-1a with a 64-bit finalizer (murmur3's fmix64) for avalanche: stable across processes,
/// machines and Rust versions, so every proxy maps a key to the same endpoint.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[derive(Debug)]
pub struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new(endpoints: &[Arc<Endpoint>]) -> Ring {
        let total: u64 = endpoints
            .iter()
            .map(|e| u64::from(e.weight) * POINTS_PER_WEIGHT)
            .sum();
        let scale = if total > MAX_POINTS {
            MAX_POINTS as f64 / total as f64
        } else {
            1.0
        };
        let mut points = Vec::with_capacity(total.min(MAX_POINTS) as usize + endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            let n = ((u64::from(e.weight) * POINTS_PER_WEIGHT) as f64 * scale).max(1.0) as u64;
            let id = e.address.to_string();
            for k in 0..n {
                points.push((hash64(format!("{id}#{k}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The endpoint owning `hash`, or the next `ok` one clockwise.
    pub fn lookup(&self, hash: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let len = self.points.len();
        (0..len)
            .map(|k| self.points[(start + k) % len].1 as usize)
            .find(|i| ok(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::endpoint::EndpointSpec;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(&EndpointSpec {
                    address: format!("10.0.0.{}:8080", i + 1).parse().expect("addr"),
                    hostname: None,
                    weight: 1,
                }))
            })
            .collect()
    }

    fn owner(ring: &Ring, eps: &[Arc<Endpoint>], key: &str) -> std::net::SocketAddr {
        let i = ring
            .lookup(hash64(key.as_bytes()), &|_| true)
            .expect("owner");
        eps[i].address
    }

    #[test]
    fn keys_stay_and_few_move_when_one_is_added() {
        let three = endpoints(3);
        let four = endpoints(4);
        let r3 = Ring::new(&three);
        let r4 = Ring::new(&four);
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let moved = keys
            .iter()
            .filter(|k| owner(&r3, &three, k) != owner(&r4, &four, k))
            .count();
        // Ideal: 1/4 of the keys move, all to the new endpoint.
        assert!((1800..3200).contains(&moved), "{moved} of 10000 moved");
        for k in &keys {
            let before = owner(&r3, &three, k);
            let after = owner(&r4, &four, k);
            assert!(before == after || after == four[3].address);
        }
        // Spread: every endpoint owns a fair share.
        let mut share = [0usize; 4];
        for k in &keys {
            let a = owner(&r4, &four, k);
            share[four.iter().position(|e| e.address == a).expect("known")] += 1;
        }
        assert!(share.iter().all(|s| (1800..3200).contains(s)), "{share:?}");
    }

    #[test]
    fn unavailable_owner_passes_to_the_next() {
        let eps = endpoints(3);
        let ring = Ring::new(&eps);
        let h = hash64(b"some-key");
        let first = ring.lookup(h, &|_| true).expect("owner");
        let second = ring.lookup(h, &|i| i != first).expect("next");
        assert_ne!(first, second);
    }
}
