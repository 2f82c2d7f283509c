//! Circuit breakers (limits on what a cluster is asked at once) and the retry budget (retries
//! as a share of recent requests). Both are shared by every worker of the proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::config;

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Breaker {
    pub fn label(self) -> &'static str {
        match self {
            Breaker::Connections => "connections",
            Breaker::Pending => "pending",
            Breaker::Requests => "requests",
            Breaker::Retries => "retries",
        }
    }
}

#[derive(Debug)]
struct Gate {
    open: AtomicU32,
    max: u32,
}

impl Gate {
    fn new(max: u32) -> Self {
        Gate {
            open: AtomicU32::new(0),
            max: if max == 0 { u32::MAX } else { max },
        }
    }

    fn enter(&self) -> bool {
        let before = self.open.fetch_add(1, Relaxed);
        if before >= self.max {
            self.open.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    fn leave(&self) {
        self.open.fetch_sub(1, Relaxed);
    }
}

/// A cluster's circuit breakers.
#[derive(Debug)]
pub struct Breakers {
    connections: Gate,
    pending: Gate,
    requests: Gate,
    retries: Gate,
}

/// Holds one unit of a breaker until dropped.
#[derive(Debug)]
pub struct Permit {
    breakers: Arc<Breakers>,
    which: Breaker,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breakers.gate(self.which).leave();
    }
}

impl Breakers {
    pub fn new(c: &config::CircuitBreakers) -> Self {
        Breakers {
            connections: Gate::new(c.max_connections),
            pending: Gate::new(c.max_pending_requests),
            requests: Gate::new(c.max_requests),
            retries: Gate::new(c.max_retries),
        }
    }

    fn gate(&self, which: Breaker) -> &Gate {
        match which {
            Breaker::Connections => &self.connections,
            Breaker::Pending => &self.pending,
            Breaker::Requests => &self.requests,
            Breaker::Retries => &self.retries,
        }
    }

    /// Takes one unit of `which`, or says it is full.
    pub fn enter(self: &Arc<Self>, which: Breaker) -> Result<Permit, Breaker> {
        if self.gate(which).enter() {
            Ok(Permit {
                breakers: self.clone(),
                which,
            })
        } else {
            Err(which)
        }
    }

    /// Units of `which` in use.
    pub fn in_use(&self, which: Breaker) -> u32 {
        self.gate(which).open.load(Relaxed)
    }
}

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

/// Linkerd's retry budget: over the last `window`, retries may number at most
/// `min_per_second × window + ratio × requests`. Per-second buckets in a ring; a bucket is
/// reset when its second comes round again (a racing reset may lose a count: it is a budget, not
/// a ledger).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    buckets: Vec<Bucket>,
}

impl RetryBudget {
    pub fn new(c: &config::RetryBudget) -> Self {
        let window = c.window.0.as_secs().clamp(1, 300);
        RetryBudget {
            ratio: c.ratio.max(0.0),
            reserve: f64::from(c.min_per_second) * window as f64,
            buckets: (0..window).map(|_| Bucket::default()).collect(),
        }
    }

    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % self.buckets.len() as u64) as usize];
        if b.second.load(Relaxed) != second {
            b.second.store(second, Relaxed);
            b.deposits.store(0, Relaxed);
            b.withdrawals.store(0, Relaxed);
        }
        b
    }

    /// A request was sent (at `second` since the time base).
    pub fn deposit(&self, second: u64) {
        self.bucket(second).deposits.fetch_add(1, Relaxed);
    }

    /// Asks to retry now; `false` when the budget is spent.
    pub fn withdraw(&self, second: u64) -> bool {
        let window = self.buckets.len() as u64;
        let current = self.bucket(second);
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Relaxed);
            if s + window > second && s <= second {
                deposits += b.deposits.load(Relaxed);
                withdrawals += b.withdrawals.load(Relaxed);
            }
        }
        if (withdrawals as f64) < self.reserve + self.ratio * deposits as f64 {
            current.withdrawals.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use std::time::Duration;

    #[test]
    fn breakers_admit_up_to_their_limit() {
        let b = Arc::new(Breakers::new(&config::CircuitBreakers {
            max_requests: 2,
            ..Default::default()
        }));
        let p1 = b.enter(Breaker::Requests).expect("first");
        let _p2 = b.enter(Breaker::Requests).expect("second");
        assert_eq!(
            b.enter(Breaker::Requests).expect_err("full"),
            Breaker::Requests
        );
        drop(p1);
        assert!(b.enter(Breaker::Requests).is_ok());
        let unlimited = Arc::new(Breakers::new(&config::CircuitBreakers {
            max_pending_requests: 0,
            ..Default::default()
        }));
        let held: Vec<_> = (0..5000)
            .map(|_| unlimited.enter(Breaker::Pending))
            .collect();
        assert!(held.iter().all(Result::is_ok));
    }

    #[test]
    fn budget_allows_reserve_plus_ratio() {
        let b = RetryBudget::new(&config::RetryBudget {
            ratio: 0.2,
            min_per_second: 1,
            window: Dur(Duration::from_secs(10)),
        });
        // Reserve: 10 retries with no traffic at all.
        let allowed = (0..100).filter(|_| b.withdraw(100)).count();
        assert_eq!(allowed, 10);
        // 100 requests buy 20 more.
        for _ in 0..100 {
            b.deposit(101);
        }
        let more = (0..100).filter(|_| b.withdraw(101)).count();
        assert_eq!(more, 20);
        // A window later, the old withdrawals no longer count.
        assert!(b.withdraw(120));
    }
}
