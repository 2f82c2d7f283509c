//! One upstream endpoint and everything known about it: live stats, active health, passive
//! outlier state and its peak-EWMA latency. Every worker reads and reports through atomics
//! (relaxed: these are estimates and counters, not synchronization).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process's first look at the clock: a shared time base for atomics.
pub fn now_nanos() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// `at` on the same time base as [`now_nanos`], without reading the clock.
pub fn nanos_at(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_nanos() as u64
}

/// What configured an endpoint: the control plane (later) and DNS feed these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    /// The name it was resolved from (`api.internal:80`), if any.
    pub hostname: Option<String>,
    pub weight: u32,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub hostname: Option<String>,
    pub weight: u32,
    pub stats: EndpointStats,
    /// Active health checking's verdict (healthy until a check says otherwise).
    pub healthy: AtomicBool,
    pub(super) health_successes: AtomicU32,
    pub(super) health_failures: AtomicU32,
    pub outlier: OutlierState,
    pub(super) ewma: PeakEwma,
}

/// Live counters of one endpoint, shown by `/clusters`.
#[derive(Debug, Default, Serialize)]
pub struct EndpointStats {
    pub requests_total: AtomicU64,
    pub requests_active: AtomicU64,
    /// Responses with a 5xx status and requests that failed without a response.
    pub requests_failed: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub connect_failures: AtomicU64,
}

/// Passive outlier detection state.
#[derive(Debug, Default)]
pub struct OutlierState {
    pub consecutive_5xx: AtomicU32,
    pub consecutive_gateway: AtomicU32,
    pub consecutive_connect: AtomicU32,
    /// Taken out of balancing until `ejected_until` (see [`now_nanos`]).
    pub ejected: AtomicBool,
    pub ejected_until: AtomicU64,
    /// Times ejected (the next ejection lasts this many + 1 base times); decays while healthy.
    pub ejections: AtomicU32,
}

impl Endpoint {
    pub fn new(spec: &EndpointSpec) -> Self {
        Endpoint {
            address: spec.address,
            hostname: spec.hostname.clone(),
            weight: spec.weight.max(1),
            stats: EndpointStats::default(),
            healthy: AtomicBool::new(true),
            health_successes: AtomicU32::new(0),
            health_failures: AtomicU32::new(0),
            outlier: OutlierState::default(),
            ewma: PeakEwma::new(),
        }
    }

    /// Healthy and not ejected: the balancer may pick it.
    pub fn available(&self) -> bool {
        self.healthy.load(Relaxed) && !self.outlier.ejected.load(Relaxed)
    }

    /// The load peak-EWMA balances on: latency estimate × (in flight + 1) / weight.
    pub fn ewma_load(&self, now: u64) -> f64 {
        let pending = self.stats.requests_active.load(Relaxed) as f64;
        self.ewma.estimate(now) * (pending + 1.0) / f64::from(self.weight)
    }

    /// The current latency estimate, for `/clusters`.
    pub fn ewma_millis(&self) -> f64 {
        self.ewma.estimate(now_nanos()) / 1e6
    }

    pub fn in_flight(&self) -> u64 {
        self.stats.requests_active.load(Relaxed)
    }
}

/// Counts one request against an endpoint until it ends (dropped without `finish`, it counts
/// as failed).
#[derive(Debug)]
pub struct EndpointGuard {
    endpoint: Arc<Endpoint>,
    done: bool,
    /// The cluster's `max_requests` unit, released with the guard.
    _permit: Option<super::Permit>,
}

impl EndpointGuard {
    /// The endpoint's address.
    pub fn address(&self) -> std::net::SocketAddr {
        self.endpoint.address
    }

    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.stats.requests_total.fetch_add(1, Relaxed);
        endpoint.stats.requests_active.fetch_add(1, Relaxed);
        EndpointGuard {
            endpoint,
            done: false,
            _permit: None,
        }
    }

    /// Keeps `permit` until the exchange ends.
    pub fn holding(mut self, permit: super::Permit) -> Self {
        self._permit = Some(permit);
        self
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The exchange ended with `status`; `complete` is false when the response was cut short.
    pub fn finish(mut self, status: u16, complete: bool) {
        self.done = true;
        let s = &self.endpoint.stats;
        s.requests_active.fetch_sub(1, Relaxed);
        if status >= 500 || !complete {
            s.requests_failed.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        if !self.done {
            let s = &self.endpoint.stats;
            s.requests_active.fetch_sub(1, Relaxed);
            s.requests_failed.fetch_add(1, Relaxed);
        }
    }
}

/// A peak-sensitive exponentially weighted moving average of latency (Linkerd's, from Finagle):
/// a sample above the estimate replaces it at once; lower samples pull it down in proportion to
/// the time since the last one (the cluster's `ewma_decay` time constant); and the estimate
/// decays towards zero while no sample comes, so an endpoint left alone is tried again.
#[derive(Debug)]
pub struct PeakEwma {
    /// f64 nanoseconds.
    estimate: AtomicU64,
    stamp: AtomicU64,
    /// The time constant, in nanoseconds (set from the cluster's config).
    decay_ns: AtomicU64,
}

impl PeakEwma {
    /// Default time constant of the decay (Linkerd's).
    pub const DECAY: Duration = Duration::from_secs(10);
    /// The estimate of an endpoint nothing is known about yet.
    pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
    /// What a 5xx (or a failure without response) counts as, at least.
    pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

    fn new() -> Self {
        PeakEwma {
            estimate: AtomicU64::new((Self::DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(now_nanos()),
            decay_ns: AtomicU64::new(Self::DECAY.as_nanos() as u64),
        }
    }

    pub fn set_decay(&self, decay: Duration) {
        self.decay_ns.store(decay.as_nanos().max(1) as u64, Relaxed);
    }

    fn decay_factor(&self, elapsed_ns: u64) -> f64 {
        (-(elapsed_ns as f64) / self.decay_ns.load(Relaxed) as f64).exp()
    }

    /// The estimate at `now`, decayed since the last sample.
    pub fn estimate(&self, now: u64) -> f64 {
        let est = f64::from_bits(self.estimate.load(Relaxed));
        let elapsed = now.saturating_sub(self.stamp.load(Relaxed));
        est * self.decay_factor(elapsed)
    }

    /// Records a latency sample (nanoseconds). Concurrent samples may overwrite each other: it
    /// is an estimate, and the next sample corrects it.
    pub fn observe(&self, sample_ns: f64, now: u64) {
        let est = f64::from_bits(self.estimate.load(Relaxed));
        let elapsed = now.saturating_sub(self.stamp.load(Relaxed));
        let next = if sample_ns > est {
            sample_ns
        } else {
            let w = self.decay_factor(elapsed);
            est * w + sample_ns * (1.0 - w)
        };
        self.estimate.store(next.to_bits(), Relaxed);
        self.stamp.store(now, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_peaks_fast_and_decays_slowly() {
        let e = PeakEwma::new();
        let t0 = now_nanos();
        e.observe(100e6, t0);
        assert_eq!(e.estimate(t0), 100e6, "a higher sample is taken at once");
        // A fast sample right after barely moves it; one much later mostly replaces it.
        e.observe(1e6, t0 + 1_000_000);
        assert!(e.estimate(t0 + 1_000_000) > 90e6);
        e.observe(1e6, t0 + 60_000_000_000);
        assert!(e.estimate(t0 + 60_000_000_000) < 2e6);
        // With no samples it decays towards zero.
        assert!(e.estimate(t0 + 600_000_000_000) < 1.0);
    }

    #[test]
    fn load_counts_in_flight_and_weight() {
        let spec = EndpointSpec {
            address: "127.0.0.1:1".parse().expect("addr"),
            hostname: None,
            weight: 2,
        };
        let e = Arc::new(Endpoint::new(&spec));
        let now = now_nanos();
        let idle = e.ewma_load(now);
        let _g = EndpointGuard::new(e.clone());
        assert!((e.ewma_load(now) - 2.0 * idle).abs() < idle * 0.01);
    }
}
