//! Load balancing: which endpoint of a cluster gets the next try.
//!
//! Every policy picks among the *available* endpoints (healthy and not ejected) unless fewer than
//! `panic_threshold` % are available, in which case all are used. Endpoints already tried by the
//! request are avoided when another one can be picked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::endpoint::{Endpoint, EndpointSpec};
use super::ring::Ring;
use crate::config::LbPolicy;

/// The endpoints of a cluster at one moment, with what the balancers precompute from them.
/// Replaced as a whole when endpoints change (DNS, control plane); requests in flight keep the
/// endpoint they hold.
#[derive(Debug)]
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    cumulative: Vec<u64>,
    rr: RoundRobin,
    ring: Option<Ring>,
    available: AtomicUsize,
}

/// What a pick must respect.
#[derive(Debug, Default)]
pub struct PickArgs<'a> {
    /// `ring_hash`'s key hash, when the request had the key.
    pub hash: Option<u64>,
    /// Endpoints this request already tried.
    pub exclude: &'a [SocketAddr],
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>, policy: LbPolicy) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                total += u64::from(*w);
                total
            })
            .collect();
        let ring = (policy == LbPolicy::RingHash).then(|| Ring::new(&endpoints));
        let set = EndpointSet {
            rr: RoundRobin::new(&weights),
            cumulative,
            ring,
            available: AtomicUsize::new(0),
            endpoints,
        };
        set.recount();
        set
    }

    /// Builds a set from specs, keeping the endpoints (with their stats and state) of `previous`
    /// that have the same address and weight.
    pub fn from_specs(
        specs: &[EndpointSpec],
        previous: Option<&EndpointSet>,
        policy: LbPolicy,
        ewma_decay: std::time::Duration,
    ) -> Self {
        let endpoints = specs
            .iter()
            .map(|spec| {
                previous
                    .and_then(|p| {
                        p.endpoints
                            .iter()
                            .find(|e| e.address == spec.address && e.weight == spec.weight.max(1))
                    })
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(spec)))
            })
            .collect::<Vec<Arc<Endpoint>>>();
        for e in &endpoints {
            e.ewma.set_decay(ewma_decay);
        }
        EndpointSet::new(endpoints, policy)
    }

    /// Recomputes how many endpoints are available (after a health or ejection change).
    pub fn recount(&self) -> usize {
        let n = self.endpoints.iter().filter(|e| e.available()).count();
        self.available.store(n, Relaxed);
        n
    }

    pub fn available(&self) -> usize {
        self.available.load(Relaxed)
    }

    fn panicking(&self, panic_threshold: u32) -> bool {
        self.available() * 100 < self.endpoints.len() * panic_threshold as usize
    }

    fn weighted_index(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 {
            return 0;
        }
        let r = fastrand::u64(..total);
        self.cumulative.partition_point(|c| *c <= r)
    }

    /// Picks the endpoint for the next try.
    pub fn pick(
        &self,
        policy: LbPolicy,
        args: &PickArgs<'_>,
        panic_threshold: u32,
        now: u64,
    ) -> Option<Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let panic = self.panicking(panic_threshold);
        let usable = |i: usize| panic || self.endpoints[i].available();
        let fresh = |i: usize| usable(i) && !args.exclude.contains(&self.endpoints[i].address);
        let chosen = self
            .pick_with(policy, args.hash, &fresh, now)
            .or_else(|| self.pick_with(policy, args.hash, &usable, now))?;
        Some(self.endpoints[chosen].clone())
    }

    fn pick_with(
        &self,
        policy: LbPolicy,
        hash: Option<u64>,
        ok: &dyn Fn(usize) -> bool,
        now: u64,
    ) -> Option<usize> {
        match policy {
            LbPolicy::RoundRobin => self.rr.pick(ok),
            LbPolicy::Random => self.sample(ok),
            LbPolicy::LeastRequest => self.p2c(ok, |e| e.in_flight() as f64 / f64::from(e.weight)),
            LbPolicy::PeakEwma => self.p2c(ok, |e| e.ewma_load(now)),
            LbPolicy::RingHash => match (hash, &self.ring) {
                (Some(h), Some(ring)) => ring.lookup(h, ok),
                _ => self.sample(ok),
            },
        }
    }

    /// A weighted random endpoint that is `ok`.
    fn sample(&self, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        for _ in 0..8 {
            let i = self.weighted_index();
            if ok(i) {
                return Some(i);
            }
        }
        // Most are not ok: choose among those that are.
        let candidates: Vec<usize> = (0..self.endpoints.len()).filter(|i| ok(*i)).collect();
        (!candidates.is_empty()).then(|| candidates[fastrand::usize(..candidates.len())])
    }

    /// Power of two choices: two weighted random candidates, the one with less `load` wins.
    fn p2c(&self, ok: &dyn Fn(usize) -> bool, load: impl Fn(&Endpoint) -> f64) -> Option<usize> {
        let a = self.sample(ok)?;
        let b = self.sample(&|i| i != a && ok(i));
        Some(match b {
            Some(b) if load(&self.endpoints[b]) < load(&self.endpoints[a]) => b,
            _ => a,
        })
    }
}

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

    /// The next endpoint in the schedule that is `ok` (skipping those that are not).
    pub fn pick(&self, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Relaxed);
        (0..len)
            .map(|k| self.schedule[(start + k) % len] as usize)
            .find(|i| ok(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::endpoint::{EndpointGuard, now_nanos};
    use std::sync::atomic::Ordering;

    fn set(n: usize, policy: LbPolicy) -> EndpointSet {
        let specs: Vec<EndpointSpec> = (0..n)
            .map(|i| EndpointSpec {
                address: format!("127.0.0.{}:80", i + 1).parse().expect("addr"),
                hostname: None,
                weight: 1,
            })
            .collect();
        EndpointSet::from_specs(&specs, None, policy, crate::upstream::PeakEwma::DECAY)
    }

    fn counts(s: &EndpointSet, policy: LbPolicy, n: usize) -> Vec<usize> {
        let mut c = vec![0; s.endpoints.len()];
        for _ in 0..n {
            let e = s
                .pick(policy, &PickArgs::default(), 50, now_nanos())
                .expect("pick");
            c[s.endpoints
                .iter()
                .position(|x| x.address == e.address)
                .expect("known")] += 1;
        }
        c
    }

    #[test]
    fn smooth_and_weighted_round_robin() {
        let rr = RoundRobin::new(&[5, 1, 1]);
        let s = &rr.schedule;
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 5);
        assert!(!s.windows(3).any(|w| w == [0, 0, 0]), "{s:?}");
        let big = RoundRobin::new(&[1_000_000, 1_000_000, 1]);
        assert!(big.schedule.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(big.schedule.contains(&2));
    }

    #[test]
    fn unavailable_endpoints_are_skipped_until_panic() {
        let s = set(4, LbPolicy::RoundRobin);
        s.endpoints[0].healthy.store(false, Ordering::Relaxed);
        s.recount();
        assert_eq!(counts(&s, LbPolicy::RoundRobin, 300)[0], 0);
        // Three of four down: below the 50 % panic threshold, all four are used again.
        for e in &s.endpoints[1..3] {
            e.outlier.ejected.store(true, Ordering::Relaxed);
        }
        s.recount();
        assert!(counts(&s, LbPolicy::RoundRobin, 400).iter().all(|c| *c > 0));
    }

    #[test]
    fn tried_endpoints_are_avoided() {
        let s = set(3, LbPolicy::PeakEwma);
        let exclude = [s.endpoints[0].address, s.endpoints[1].address];
        for _ in 0..50 {
            let e = s
                .pick(
                    LbPolicy::PeakEwma,
                    &PickArgs {
                        hash: None,
                        exclude: &exclude,
                    },
                    50,
                    now_nanos(),
                )
                .expect("pick");
            assert_eq!(e.address, s.endpoints[2].address);
        }
        // All tried: one is picked anyway rather than none.
        let all: Vec<SocketAddr> = s.endpoints.iter().map(|e| e.address).collect();
        assert!(
            s.pick(
                LbPolicy::PeakEwma,
                &PickArgs {
                    hash: None,
                    exclude: &all
                },
                50,
                0
            )
            .is_some()
        );
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let s = set(2, LbPolicy::LeastRequest);
        let _busy: Vec<EndpointGuard> = (0..10)
            .map(|_| EndpointGuard::new(s.endpoints[0].clone()))
            .collect();
        let c = counts(&s, LbPolicy::LeastRequest, 200);
        assert!(c[1] > 180, "{c:?}");
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint() {
        let s = set(2, LbPolicy::PeakEwma);
        let now = now_nanos();
        s.endpoints[0].ewma.observe(50e6, now);
        s.endpoints[1].ewma.observe(1e6, now);
        let c = counts(&s, LbPolicy::PeakEwma, 200);
        assert!(c[1] > 180, "{c:?}");
    }

    #[test]
    fn random_follows_weights() {
        let specs = vec![
            EndpointSpec {
                address: "127.0.0.1:1".parse().expect("a"),
                hostname: None,
                weight: 3,
            },
            EndpointSpec {
                address: "127.0.0.1:2".parse().expect("a"),
                hostname: None,
                weight: 1,
            },
        ];
        let s = EndpointSet::from_specs(
            &specs,
            None,
            LbPolicy::Random,
            crate::upstream::PeakEwma::DECAY,
        );
        let c = counts(&s, LbPolicy::Random, 4000);
        assert!((2800..3200).contains(&c[0]), "{c:?}");
    }
}
