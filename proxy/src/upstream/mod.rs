//! Upstreams: clusters of endpoints, the choice of an endpoint for each try, what is learned
//! from each outcome, and the connections to endpoints.
//!
//! A [`Cluster`] is shared by every worker. Its endpoints form an [`EndpointSet`] swapped as a
//! whole when they change (DNS refresh now, the control plane later: [`Cluster::set_endpoints`]),
//! so requests in flight keep the endpoint they hold. Endpoints keep their stats, health and
//! latency estimate across such changes and across config reloads. Connections are per worker
//! ([`pool::Pools`]) so a request never waits on another core.

pub mod body;
mod breaker;
pub mod discovery;
mod endpoint;
pub mod h1;
pub mod health;
mod lb;
pub mod pool;
mod ring;

pub use breaker::{Breaker, Breakers, Permit, RetryBudget};
pub use endpoint::{
    Endpoint, EndpointGuard, EndpointSpec, EndpointStats, PeakEwma, nanos_at, now_nanos,
};
pub use lb::{EndpointSet, PickArgs};
pub use pool::Pools;
pub use ring::hash64;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{self, ConfigError, HashKey, LbPolicy, UpstreamProtocol};
use crate::metrics::{ClusterStats, Metrics};

/// One upstream cluster.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub lb: LbPolicy,
    pub hash_key: Option<HashSource>,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Duration,
    /// The endpoints as configured (names unresolved), for DNS refresh.
    pub configured: Vec<config::Endpoint>,
    pub dns_refresh: Duration,
    pub ewma_decay: Duration,
    pub health_check: Option<config::HealthCheck>,
    pub outlier: config::OutlierDetection,
    pub breakers: Arc<Breakers>,
    pub budget: RetryBudget,
    pub stats: ClusterStats,
    /// TLS to the endpoints.
    pub tls: Option<Arc<crate::tls::client::TlsClient>>,
    set: ArcSwap<EndpointSet>,
}

/// How one try to an endpoint ended, as far as balancing and ejection are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived.
    Response {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The connection could not be made.
    ConnectFailure,
    /// The connection failed before response headers.
    Reset,
    /// No response headers within the try's timeout.
    Timeout,
}

impl Cluster {
    /// The current endpoints.
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Picks the endpoint for a try.
    pub fn pick(&self, args: &PickArgs<'_>) -> Option<Arc<Endpoint>> {
        self.set
            .load()
            .pick(self.lb, args, self.outlier.panic_threshold, now_nanos())
    }

    /// Replaces the endpoints (DNS refresh; the control plane's endpoint updates). Endpoints at
    /// the same address and weight are kept with their state; requests in flight finish on
    /// whatever they hold.
    pub fn set_endpoints(&self, specs: &[EndpointSpec]) {
        let previous = self.set.load();
        let next = EndpointSet::from_specs(specs, Some(&previous), self.lb, self.ewma_decay);
        self.set.store(Arc::new(next));
        self.update_endpoint_gauges();
    }

    fn update_endpoint_gauges(&self) {
        let set = self.set.load();
        let available = set.recount();
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.outlier.ejected.load(Relaxed))
            .count();
        let unhealthy = set
            .endpoints
            .iter()
            .filter(|e| !e.healthy.load(Relaxed))
            .count();
        self.stats.endpoints_available.set(available as i64);
        self.stats.endpoints_ejected.set(ejected as i64);
        self.stats.endpoints_unhealthy.set(unhealthy as i64);
    }

    /// Learns from one try: the latency estimate (5xx, 429 and failures count as slow) and
    /// passive outlier detection (consecutive failures eject).
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome, elapsed: Duration) {
        self.report_at(endpoint, outcome, elapsed, now_nanos());
    }

    /// [`Cluster::report`] with the time (see [`nanos_at`]) already known.
    pub fn report_at(&self, endpoint: &Endpoint, outcome: Outcome, elapsed: Duration, now: u64) {
        let rtt = elapsed.as_nanos() as f64;
        let penalty = PeakEwma::FAILURE_PENALTY.as_nanos() as f64;
        let o = &endpoint.outlier;
        let reset = |c: &std::sync::atomic::AtomicU32| {
            if c.load(Relaxed) != 0 {
                c.store(0, Relaxed);
            }
        };
        match outcome {
            Outcome::Response {
                status,
                retry_after,
            } if status < 500 => {
                if status == 429 {
                    let wait = retry_after.map_or(penalty, |d| d.as_nanos() as f64);
                    endpoint.ewma.observe(rtt.max(wait), now);
                } else {
                    endpoint.ewma.observe(rtt, now);
                }
                reset(&o.consecutive_5xx);
                reset(&o.consecutive_gateway);
                reset(&o.consecutive_connect);
                return;
            }
            Outcome::Response { status, .. } => {
                endpoint.ewma.observe(rtt.max(penalty), now);
                o.consecutive_5xx.fetch_add(1, Relaxed);
                if (502..=504).contains(&status) {
                    o.consecutive_gateway.fetch_add(1, Relaxed);
                } else {
                    reset(&o.consecutive_gateway);
                }
                reset(&o.consecutive_connect);
            }
            Outcome::ConnectFailure => {
                endpoint.ewma.observe(rtt.max(penalty), now);
                o.consecutive_connect.fetch_add(1, Relaxed);
                o.consecutive_gateway.fetch_add(1, Relaxed);
                o.consecutive_5xx.fetch_add(1, Relaxed);
            }
            Outcome::Reset | Outcome::Timeout => {
                endpoint.ewma.observe(rtt.max(penalty), now);
                o.consecutive_gateway.fetch_add(1, Relaxed);
                o.consecutive_5xx.fetch_add(1, Relaxed);
            }
        }
        let d = &self.outlier;
        let over = |threshold: u32, c: &std::sync::atomic::AtomicU32| {
            threshold > 0 && c.load(Relaxed) >= threshold
        };
        if over(d.consecutive_5xx, &o.consecutive_5xx)
            || over(d.consecutive_gateway_errors, &o.consecutive_gateway)
            || over(d.consecutive_connect_failures, &o.consecutive_connect)
        {
            self.eject(endpoint, now);
        }
    }

    fn eject(&self, endpoint: &Endpoint, now: u64) {
        let set = self.set.load();
        let total = set.endpoints.len();
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.outlier.ejected.load(Relaxed))
            .count();
        let allowed = (total * self.outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        let o = &endpoint.outlier;
        if o.ejected
            .compare_exchange(false, true, AcqRel, Relaxed)
            .is_err()
        {
            return;
        }
        let times = o.ejections.fetch_add(1, Relaxed) + 1;
        let base = self.outlier.base_ejection_time.0;
        let length = (base * times).min(self.outlier.max_ejection_time.0.max(base));
        o.ejected_until
            .store(now + length.as_nanos() as u64, Relaxed);
        o.consecutive_5xx.store(0, Relaxed);
        o.consecutive_gateway.store(0, Relaxed);
        o.consecutive_connect.store(0, Relaxed);
        self.stats.ejections.inc();
        self.update_endpoint_gauges();
        tracing::warn!(
            cluster = %self.name,
            endpoint = %endpoint.address,
            ejection = times,
            duration = ?length,
            "endpoint ejected after consecutive failures"
        );
    }

    /// Brings ejected endpoints back when their time is over, and lets the ejection count of
    /// endpoints that behave decay (one step per `base_ejection_time` without ejection). Runs
    /// every second from [`health::maintain`].
    pub fn readmit(&self) {
        let now = now_nanos();
        let base = self.outlier.base_ejection_time.0.as_nanos() as u64;
        let mut changed = false;
        for e in &self.set.load().endpoints {
            let o = &e.outlier;
            let until = o.ejected_until.load(Relaxed);
            if o.ejected.load(Relaxed) {
                if now >= until {
                    o.ejected.store(false, Relaxed);
                    changed = true;
                    tracing::info!(cluster = %self.name, endpoint = %e.address, "ejected endpoint re-admitted");
                }
            } else if o.ejections.load(Relaxed) > 0 && now >= until + base {
                o.ejections.fetch_sub(1, Relaxed);
                o.ejected_until.store(now, Relaxed);
            }
        }
        if changed {
            self.update_endpoint_gauges();
        }
    }

    /// Takes a unit of a circuit breaker; a full one is counted and becomes the 503 `overflow`.
    pub fn enter(&self, which: Breaker) -> Result<Permit, crate::errors::ProxyError> {
        self.breakers.enter(which).map_err(|b| {
            self.stats.overflow(b.label());
            crate::errors::ProxyError::Overflow {
                cluster: self.name.clone(),
                breaker: b.label(),
            }
        })
    }

    /// Marks `endpoint`'s active health (from [`health`]).
    pub(crate) fn set_health(&self, endpoint: &Endpoint, healthy: bool) {
        if endpoint.healthy.swap(healthy, Relaxed) != healthy {
            self.update_endpoint_gauges();
            tracing::info!(
                cluster = %self.name,
                endpoint = %endpoint.address,
                healthy,
                "endpoint health changed"
            );
        }
    }

    /// Builds `clusters[index]`, resolving host names (or only checking them, `names`), and
    /// keeping the endpoints (and their state) that `previous` had at the same address.
    pub fn build(
        index: usize,
        c: &config::Cluster,
        previous: Option<&Cluster>,
        tls: Option<Arc<crate::tls::client::TlsClient>>,
        metrics: &Metrics,
        names: Names,
        errors: &mut Vec<ConfigError>,
    ) -> Cluster {
        let at = format!("clusters[{index}]");
        if c.name.is_empty() {
            errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
        }
        if c.endpoints.is_empty() {
            errors.push(ConfigError::new(
                format!("{at}.endpoints"),
                "a cluster needs at least one endpoint",
            ));
        }
        if c.connect_timeout.0.is_zero() {
            errors.push(ConfigError::new(
                format!("{at}.connect_timeout"),
                "must be greater than 0",
            ));
        }
        if c.dns_refresh.0 < Duration::from_secs(1) {
            errors.push(ConfigError::new(
                format!("{at}.dns_refresh"),
                "must be at least 1s",
            ));
        }
        let hash_key = match (c.lb, &c.hash_key) {
            (LbPolicy::RingHash, None) => {
                errors.push(ConfigError::new(
                    format!("{at}.hash_key"),
                    "ring_hash needs a hash_key (header, cookie or source_ip)",
                ));
                None
            }
            (LbPolicy::RingHash, Some(k)) => {
                HashSource::compile(&format!("{at}.hash_key"), k, errors)
            }
            (_, Some(_)) => {
                errors.push(ConfigError::new(
                    format!("{at}.hash_key"),
                    "only ring_hash uses a hash_key",
                ));
                None
            }
            (_, None) => None,
        };
        if let Some(hc) = &c.health_check {
            health::validate(&format!("{at}.health_check"), hc, errors);
        }
        let od = &c.outlier_detection;
        if od.max_ejection_percent > 100 {
            errors.push(ConfigError::new(
                format!("{at}.outlier_detection.max_ejection_percent"),
                "must be at most 100",
            ));
        }
        if od.panic_threshold > 100 {
            errors.push(ConfigError::new(
                format!("{at}.outlier_detection.panic_threshold"),
                "must be at most 100",
            ));
        }
        if od.base_ejection_time.0.is_zero() {
            errors.push(ConfigError::new(
                format!("{at}.outlier_detection.base_ejection_time"),
                "must be greater than 0",
            ));
        }
        if !(0.0..=10.0).contains(&c.retry_budget.ratio) || c.retry_budget.ratio.is_nan() {
            errors.push(ConfigError::new(
                format!("{at}.retry_budget.ratio"),
                "must be between 0 and 10",
            ));
        }
        if c.retry_budget.window.0 < Duration::from_secs(1)
            || c.retry_budget.window.0 > Duration::from_secs(300)
        {
            errors.push(ConfigError::new(
                format!("{at}.retry_budget.window"),
                "must be between 1s and 300s",
            ));
        }

        let mut specs: Vec<EndpointSpec> = Vec::new();
        for (j, e) in c.endpoints.iter().enumerate() {
            let eat = format!("{at}.endpoints[{j}]");
            if e.weight() == 0 {
                errors.push(ConfigError::new(
                    format!("{eat}.weight"),
                    "weight must be at least 1",
                ));
                continue;
            }
            let found = match names {
                Names::Resolve => resolve(e.address()),
                // A name only the proxies can resolve is valid: checked, not looked up.
                Names::CheckOnly => parse_endpoint(e.address()).map(|t| match t {
                    Target::Address(a) => (vec![a], None),
                    Target::Name(..) => (Vec::new(), Some(e.address().to_owned())),
                }),
            };
            match found {
                Ok((addrs, hostname)) => {
                    for address in addrs {
                        if specs.iter().any(|s| s.address == address) {
                            errors.push(ConfigError::new(
                                eat.clone(),
                                format!("duplicate endpoint {address}"),
                            ));
                            continue;
                        }
                        specs.push(EndpointSpec {
                            address,
                            hostname: hostname.clone(),
                            weight: e.weight(),
                        });
                    }
                }
                Err(message) => errors.push(ConfigError::new(eat, message)),
            }
        }
        let previous_set = previous.map(|p| p.endpoints());
        if c.ewma_decay.0 < Duration::from_millis(10) {
            errors.push(ConfigError::new(
                format!("{at}.ewma_decay"),
                "must be at least 10ms",
            ));
        }
        let set = EndpointSet::from_specs(&specs, previous_set.as_deref(), c.lb, c.ewma_decay.0);
        let cluster = Cluster {
            name: Arc::from(c.name.as_str()),
            lb: c.lb,
            hash_key,
            protocol: c.protocol,
            connect_timeout: c.connect_timeout.0,
            max_idle_per_endpoint: c.pool.max_idle_per_endpoint as usize,
            idle_timeout: c.pool.idle_timeout.0,
            configured: c.endpoints.clone(),
            dns_refresh: c.dns_refresh.0,
            ewma_decay: c.ewma_decay.0,
            health_check: c.health_check.clone(),
            outlier: c.outlier_detection.clone(),
            breakers: Arc::new(Breakers::new(&c.circuit_breakers)),
            budget: RetryBudget::new(&c.retry_budget),
            stats: metrics.cluster_stats(&c.name),
            tls,
            set: ArcSwap::from_pointee(set),
        };
        cluster.update_endpoint_gauges();
        cluster
    }

    /// A cluster with one endpoint and default settings, for unit tests elsewhere.
    #[cfg(test)]
    pub fn for_tests(name: &str) -> Cluster {
        let c: config::Cluster = serde_json::from_value(serde_json::json!({
            "name": name,
            "endpoints": ["127.0.0.1:1"],
        }))
        .expect("cluster config");
        let mut errors = Vec::new();
        Cluster::build(
            0,
            &c,
            None,
            None,
            &Metrics::new(),
            Names::Resolve,
            &mut errors,
        )
    }
}

/// What `ring_hash` hashes, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
}

impl HashSource {
    fn compile(at: &str, k: &HashKey, errors: &mut Vec<ConfigError>) -> Option<HashSource> {
        let given = [
            k.header.is_some(),
            k.cookie.is_some(),
            k.source_ip.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            errors.push(ConfigError::new(
                at,
                "give exactly one of `header`, `cookie`, `source_ip`",
            ));
            return None;
        }
        if let Some(h) = &k.header {
            return match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => Some(HashSource::Header(name)),
                Err(_) => {
                    errors.push(ConfigError::new(
                        format!("{at}.header"),
                        format!("invalid header name {h:?}"),
                    ));
                    None
                }
            };
        }
        if let Some(c) = &k.cookie {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                errors.push(ConfigError::new(
                    format!("{at}.cookie"),
                    format!("invalid cookie name {c:?}"),
                ));
                return None;
            }
            return Some(HashSource::Cookie(c.clone()));
        }
        if k.source_ip == Some(false) {
            errors.push(ConfigError::new(
                format!("{at}.source_ip"),
                "must be true when given",
            ));
            return None;
        }
        Some(HashSource::SourceIp)
    }
}

/// What building a cluster does with endpoint host names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Looks them up (a proxy, `weft validate`).
    Resolve,
    /// Checks their form only (the control plane: names only proxies can resolve are valid).
    CheckOnly,
}

/// An endpoint as written: a literal address or a host name and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    Address(SocketAddr),
    Name(&'a str, u16),
}

/// Parses `host:port` without looking anything up.
pub fn parse_endpoint(text: &str) -> Result<Target<'_>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("invalid endpoint {text:?}: port 0"));
        }
        return Ok(Target::Address(addr));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("invalid endpoint {text:?}: expected host:port"));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("invalid endpoint {text:?}: bad port {port:?}")),
    };
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err(format!("invalid endpoint {text:?}: bad host {host:?}"));
    }
    Ok(Target::Name(host, port))
}

/// Resolves `host:port`. A literal address is taken as is; a name is looked up, and its IPv4
/// addresses are used when it has any (IPv6 otherwise), as Envoy's `V4_PREFERRED` does.
pub fn resolve(text: &str) -> Result<(Vec<SocketAddr>, Option<String>), String> {
    let (host, port) = match parse_endpoint(text)? {
        Target::Address(addr) => return Ok((vec![addr], None)),
        Target::Name(host, port) => (host, port),
    };
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .collect();
    let v4: Vec<SocketAddr> = found.iter().copied().filter(SocketAddr::is_ipv4).collect();
    let mut chosen = if v4.is_empty() { found } else { v4 };
    chosen.sort();
    chosen.dedup();
    if chosen.is_empty() {
        return Err(format!("cannot resolve {text:?}: no addresses"));
    }
    Ok((chosen, Some(text.to_owned())))
}

/// Clusters by name, for the router to resolve references.
pub type ClusterMap = HashMap<String, Arc<Cluster>>;

#[cfg(test)]
mod tests;
