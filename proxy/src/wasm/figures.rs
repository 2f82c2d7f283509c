//! What one revision of a filter did, for staged rollouts: requests, failures, local 5xx
//! answers and the time each request spent in the filter. Counted on the request path with
//! relaxed atomics (no lock, no allocation), reported to the control plane as running totals,
//! and compared there between the old and the new revision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets: bucket `i` holds times up to 2^(i/4) µs (each a fifth wider than the
/// one before), from 1 µs to about 16 s; the last one holds everything longer.
pub const BUCKETS: usize = 97;

/// The bucket a time falls in.
pub fn bucket_of(d: Duration) -> usize {
    let us = d.as_nanos() as f64 / 1000.0;
    if us <= 1.0 {
        return 0;
    }
    ((us.log2() * 4.0).ceil() as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in microseconds.
pub fn bucket_bound_us(i: usize) -> f64 {
    (i as f64 / 4.0).exp2()
}

/// The `q` quantile (0..=1) of a latency histogram, in microseconds (the upper bound of the
/// bucket it falls in); `None` for an empty one.
pub fn quantile_us(buckets: &[u64], q: f64) -> Option<f64> {
    let total = buckets.iter().fold(0u64, |a, n| a.saturating_add(*n));
    if total == 0 {
        return None;
    }
    // The rank of the quantile, 1-based: the p99 of 100 samples is the 99th.
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen = n.saturating_add(seen);
        if seen >= rank {
            return Some(bucket_bound_us(i));
        }
    }
    Some(bucket_bound_us(buckets.len().saturating_sub(1)))
}

/// How a request went for one filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Its VM failed or could not start (a trap, a limit, a start that failed).
    pub failed: bool,
    /// ... and the request went on without it (`fail: open`).
    pub skipped: bool,
    /// The filter answered the request itself with a 5xx.
    pub local_5xx: bool,
}

/// Running totals of one filter revision on this proxy.
#[derive(Debug)]
pub struct Figures {
    requests: AtomicU64,
    errors: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    local_5xx: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for Figures {
    fn default() -> Self {
        Figures {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            local_5xx: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A copy of [`Figures`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub requests: u64,
    /// Requests the filter failed on or answered with a 5xx (each request once).
    pub errors: u64,
    pub failed: u64,
    pub skipped: u64,
    pub local_5xx: u64,
    pub latency: Vec<u64>,
}

impl Figures {
    /// Counts one request that reached the filter and spent `time` in it.
    pub fn record(&self, time: Duration, outcome: Outcome) {
        let add = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        add(&self.requests);
        add(&self.latency[bucket_of(time)]);
        if outcome.failed || outcome.local_5xx {
            add(&self.errors);
        }
        if outcome.failed {
            add(&self.failed);
        }
        if outcome.skipped {
            add(&self.skipped);
        }
        if outcome.local_5xx {
            add(&self.local_5xx);
        }
    }

    pub fn totals(&self) -> Totals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            requests: get(&self.requests),
            errors: get(&self.errors),
            failed: get(&self.failed),
            skipped: get(&self.skipped),
            local_5xx: get(&self.local_5xx),
            latency: self.latency.iter().map(get).collect(),
        }
    }
}

impl Totals {
    /// What happened between `earlier` and `self` (running totals of one proxy); a proxy that
    /// restarted counts from zero again, so a total smaller than before is all new.
    pub fn since(&self, earlier: &Totals) -> Totals {
        if self.requests < earlier.requests {
            return self.clone();
        }
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Totals {
            requests: d(self.requests, earlier.requests),
            errors: d(self.errors, earlier.errors),
            failed: d(self.failed, earlier.failed),
            skipped: d(self.skipped, earlier.skipped),
            local_5xx: d(self.local_5xx, earlier.local_5xx),
            latency: (0..self.latency.len().max(earlier.latency.len()))
                .map(|i| {
                    d(
                        self.latency.get(i).copied().unwrap_or(0),
                        earlier.latency.get(i).copied().unwrap_or(0),
                    )
                })
                .collect(),
        }
    }

    /// Adds `other` (another proxy's figures) to these; the sums saturate (a report is only
    /// as good as the proxy that sent it).
    pub fn add(&mut self, other: &Totals) {
        let sum = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        sum(&mut self.requests, other.requests);
        sum(&mut self.errors, other.errors);
        sum(&mut self.failed, other.failed);
        sum(&mut self.skipped, other.skipped);
        sum(&mut self.local_5xx, other.local_5xx);
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            sum(a, *b);
        }
    }

    /// Errors per request (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_nanos(1000)), 0);
        assert_eq!(bucket_of(Duration::from_micros(2)), 4);
        assert_eq!(bucket_of(Duration::from_micros(3)), 7); // 2^(7/4) ≈ 3.36
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
        let f = Figures::default();
        for _ in 0..98 {
            f.record(Duration::from_micros(100), Outcome::default());
        }
        f.record(
            Duration::from_millis(10),
            Outcome {
                failed: true,
                skipped: true,
                local_5xx: false,
            },
        );
        f.record(
            Duration::from_millis(10),
            Outcome {
                local_5xx: true,
                ..Outcome::default()
            },
        );
        let t = f.totals();
        assert_eq!(
            (t.requests, t.errors, t.failed, t.skipped, t.local_5xx),
            (100, 2, 1, 1, 1)
        );
        let p50 = quantile_us(&t.latency, 0.5).expect("p50");
        assert!((100.0..=120.0).contains(&p50), "{p50}");
        let p99 = quantile_us(&t.latency, 0.99).expect("p99");
        assert!((10_000.0..=12_000.0).contains(&p99), "{p99}");
        assert_eq!(quantile_us(&[0; BUCKETS], 0.5), None);
        assert!((t.error_rate() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn differences_survive_a_restart_and_sums_add_up() {
        let f = Figures::default();
        f.record(Duration::from_micros(5), Outcome::default());
        let a = f.totals();
        f.record(Duration::from_micros(5), Outcome::default());
        let b = f.totals();
        assert_eq!(b.since(&a).requests, 1);
        // A restarted proxy reports less than before: all of it is new.
        let fresh = Figures::default();
        fresh.record(Duration::from_micros(5), Outcome::default());
        assert_eq!(fresh.totals().since(&b).requests, 1);
        let mut sum = Totals::default();
        sum.add(&a);
        sum.add(&b);
        assert_eq!(sum.requests, 3);
        assert_eq!(sum.latency.iter().sum::<u64>(), 3);
        // Absurd reports saturate instead of overflowing.
        let absurd = Totals {
            requests: u64::MAX,
            errors: u64::MAX,
            latency: vec![u64::MAX; BUCKETS],
            ..Totals::default()
        };
        sum.add(&absurd);
        sum.add(&absurd);
        assert_eq!(sum.requests, u64::MAX);
        assert!(quantile_us(&sum.latency, 0.99).is_some());
        assert!((0.0..=1.0).contains(&sum.error_rate()));
    }
}
