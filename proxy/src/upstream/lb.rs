//! Load balancing: weighted round robin over a cluster's endpoints.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Smooth weighted round robin (as nginx does it), precomputed into a schedule so a pick is one
/// atomic increment: weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`.
#[derive(Debug)]
pub struct RoundRobin {
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

/// The schedule never grows past this; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 4096;

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let scaled: Vec<i64> = if total > MAX_SCHEDULE {
            weights
                .iter()
                .map(|w| ((u64::from(*w) * MAX_SCHEDULE / total).max(1)) as i64)
                .collect()
        } else {
            weights.iter().map(|w| i64::from(*w)).collect()
        };
        let sum: i64 = scaled.iter().sum();
        let mut current = vec![0i64; scaled.len()];
        let mut schedule = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for i in 0..scaled.len() {
                current[i] += scaled[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= sum;
            schedule.push(best as u32);
        }
        RoundRobin {
            schedule,
            // Start each cluster at a random place so workers and reloads do not all begin
            // with the first endpoint.
            cursor: AtomicUsize::new(fastrand::usize(..usize::MAX / 2)),
        }
    }

    pub fn pick(&self) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = self.cursor.fetch_add(1, Relaxed);
        Some(self.schedule[n % self.schedule.len()] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_and_weighted() {
        let rr = RoundRobin::new(&[5, 1, 1]);
        let s = &rr.schedule;
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 5);
        // The light endpoints are spread out, not bunched at the end of the cycle.
        assert!(!s.windows(3).any(|w| w == [0, 0, 0]), "{s:?}");
    }

    #[test]
    fn equal_weights_alternate() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let picks: Vec<usize> = (0..6).filter_map(|_| rr.pick()).collect();
        for w in picks.windows(2) {
            assert_ne!(w[0], w[1]);
        }
        assert!(RoundRobin::new(&[]).pick().is_none());
    }

    #[test]
    fn huge_weights_are_scaled() {
        let rr = RoundRobin::new(&[1_000_000, 1_000_000, 1]);
        assert!(rr.schedule.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(rr.schedule.contains(&2));
    }
}
