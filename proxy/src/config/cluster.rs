//! Clusters: the upstream endpoints routes send to, and how to use them — balancing, discovery,
//! health checks, outlier ejection, circuit breakers and the retry budget.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Dur;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// `IP:port` or `host:port`, or `{address, weight}`. Host names are resolved when the config
    /// is applied and again every `dns_refresh`.
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub lb: LbPolicy,
    /// `peak_ewma`: the time constant of the latency estimate's decay (Linkerd's 10s): how
    /// fast an endpoint's bad record is forgotten.
    #[serde(default = "defaults::ewma_decay")]
    pub ewma_decay: Dur,
    /// What `ring_hash` hashes (required for it, refused for the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// The HTTP version spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time a TCP connect to an endpoint may take; then the try fails (503 when it is the last).
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// How often host names among the endpoints are resolved again.
    #[serde(default = "defaults::dns_refresh")]
    pub dns_refresh: Dur,
    #[serde(default)]
    pub pool: PoolOptions,
    /// Active health checking; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    /// TLS to the endpoints; none: plain text.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::tls::tls_or_mesh"
    )]
    pub tls: Option<super::ClusterTls>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "an endpoint: \"host:port\" or a map with `address` and `weight`"
)]
pub enum Endpoint {
    Address(String),
    Weighted(WeightedEndpoint),
}

impl Endpoint {
    pub fn address(&self) -> &str {
        match self {
            Endpoint::Address(a) => a,
            Endpoint::Weighted(w) => &w.address,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Endpoint::Address(_) => 1,
            Endpoint::Weighted(w) => w.weight,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    pub address: String,
    #[serde(default = "super::defaults::weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices over a peak-sensitive EWMA of latency × requests in flight
    /// (Linkerd's balancer). 5xx and 429 responses count as slow ones.
    #[default]
    PeakEwma,
    /// Power of two choices over requests in flight.
    LeastRequest,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Consistent hashing of `hash_key`: a key stays on one endpoint, and few keys move when
    /// endpoints come and go.
    RingHash,
    /// Weighted random.
    Random,
}

/// What `ring_hash` hashes (exactly one of the fields). A request without the key goes to a
/// random endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashKey {
    /// The value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The value of this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The client's IP address (`source_ip: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 to plain-text endpoints; over TLS, what ALPN settles (`h2` or `http/1.1`), as
    /// Envoy's and nginx's defaults work with any HTTP/1.1 backend. gRPC needs `http2` (or a
    /// TLS endpoint that offers `h2`).
    #[default]
    Auto,
    Http1,
    Http2,
    /// The version the downstream request arrived with.
    Downstream,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolOptions {
    /// Most idle HTTP/1.1 connections kept per endpoint and worker.
    #[serde(default = "defaults::max_idle_per_endpoint")]
    pub max_idle_per_endpoint: u32,
    /// An idle upstream connection is closed after this long.
    #[serde(default = "defaults::pool_idle_timeout")]
    pub idle_timeout: Dur,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_idle_per_endpoint: defaults::max_idle_per_endpoint(),
            idle_timeout: defaults::pool_idle_timeout(),
        }
    }
}

/// Active health checking: each endpoint is probed every `interval` (plus up to `jitter`);
/// `unhealthy_threshold` failures in a row take it out of balancing, `healthy_threshold`
/// successes in a row bring it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// An HTTP `GET`; give this or `tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    /// A TCP connect that succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    #[serde(default = "defaults::hc_interval")]
    pub interval: Dur,
    #[serde(default = "defaults::hc_timeout")]
    pub timeout: Dur,
    #[serde(default = "defaults::hc_healthy")]
    pub healthy_threshold: u32,
    #[serde(default = "defaults::hc_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Up to this much is added at random to each interval, so checks do not align.
    #[serde(default = "defaults::hc_jitter")]
    pub jitter: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheck {
    pub path: String,
    /// `Host` header of the check; default: the endpoint's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Statuses that mean healthy: codes (`200`) or ranges (`"200-299"`). Default: 200-299.
    #[serde(default = "defaults::hc_statuses")]
    pub expected_statuses: Vec<StatusRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {}

/// A status code or an inclusive range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub from: u16,
    pub to: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.from..=self.to).contains(&status)
    }
}

impl Serialize for StatusRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.from == self.to {
            s.serialize_u16(self.from)
        } else {
            s.serialize_str(&format!("{}-{}", self.from, self.to))
        }
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a status code (200) or a range (\"200-299\")")]
        enum Raw {
            Code(u16),
            Text(String),
        }
        let bad = |t: &str| {
            serde::de::Error::custom(format_args!(
                "invalid status {t:?}: expected a code like 200 or a range like \"200-299\""
            ))
        };
        let (from, to) = match Raw::deserialize(d)? {
            Raw::Code(c) => (c, c),
            Raw::Text(t) => match t.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse().map_err(|_| bad(&t))?,
                    b.trim().parse().map_err(|_| bad(&t))?,
                ),
                None => {
                    let c = t.trim().parse().map_err(|_| bad(&t))?;
                    (c, c)
                }
            },
        };
        if !(100..=599).contains(&from) || !(100..=599).contains(&to) || from > to {
            return Err(bad(&format!("{from}-{to}")));
        }
        Ok(StatusRange { from, to })
    }
}

/// Passive outlier ejection: an endpoint failing this many times in a row is taken out of
/// balancing for `base_ejection_time` × the number of times it was ejected (at most
/// `max_ejection_time`), then tried again. A threshold of 0 turns that trigger off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// 5xx responses (and failures without a response) in a row.
    #[serde(default = "defaults::consecutive_5xx")]
    pub consecutive_5xx: u32,
    /// 502, 503, 504 responses and failures without a response, in a row.
    #[serde(default = "defaults::consecutive_gateway")]
    pub consecutive_gateway_errors: u32,
    /// Failed connection attempts in a row.
    #[serde(default = "defaults::consecutive_connect")]
    pub consecutive_connect_failures: u32,
    #[serde(default = "defaults::base_ejection")]
    pub base_ejection_time: Dur,
    #[serde(default = "defaults::max_ejection")]
    pub max_ejection_time: Dur,
    /// At most this share of the endpoints is ejected at once (always at least one).
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// When fewer than this share of the endpoints is available (healthy and not ejected),
    /// balance across all of them: better some errors than a pile-up on the few.
    #[serde(default = "defaults::panic_threshold")]
    pub panic_threshold: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: defaults::consecutive_5xx(),
            consecutive_gateway_errors: defaults::consecutive_gateway(),
            consecutive_connect_failures: defaults::consecutive_connect(),
            base_ejection_time: defaults::base_ejection(),
            max_ejection_time: defaults::max_ejection(),
            max_ejection_percent: defaults::max_ejection_percent(),
            panic_threshold: defaults::panic_threshold(),
        }
    }
}

/// Limits on what the cluster is asked at once (per proxy); beyond them, 503 with
/// `x-weft-error: overflow`. A limit of 0 means none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    /// Upstream connections open.
    #[serde(default = "defaults::breaker")]
    pub max_connections: u32,
    /// Requests waiting for a connection to be established.
    #[serde(default = "defaults::breaker")]
    pub max_pending_requests: u32,
    /// Requests in flight.
    #[serde(default = "defaults::breaker")]
    pub max_requests: u32,
    /// Retries in flight (beyond it, a failed try is not retried).
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: defaults::breaker(),
            max_pending_requests: defaults::breaker(),
            max_requests: defaults::breaker(),
            max_retries: defaults::max_retries(),
        }
    }
}

/// Retries may add at most `ratio` × the requests of the last `window`, plus `min_per_second`
/// (Linkerd's budget): retries cannot turn an outage into a storm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default = "defaults::budget_ratio")]
    pub ratio: f64,
    #[serde(default = "defaults::budget_min")]
    pub min_per_second: u32,
    #[serde(default = "defaults::budget_window")]
    pub window: Dur,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: defaults::budget_ratio(),
            min_per_second: defaults::budget_min(),
            window: defaults::budget_window(),
        }
    }
}

mod defaults {
    use super::{Dur, Duration, StatusRange};

    pub fn connect_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn ewma_decay() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn dns_refresh() -> Dur {
        Dur(Duration::from_secs(30))
    }
    /// As many as the circuit breaker lets a cluster open: a burst's connections stay for the
    /// next burst (until `idle_timeout`) instead of being closed and opened again, as Envoy's
    /// pool keeps them.
    pub fn max_idle_per_endpoint() -> u32 {
        1024
    }
    pub fn pool_idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn hc_interval() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn hc_timeout() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn hc_healthy() -> u32 {
        2
    }
    pub fn hc_unhealthy() -> u32 {
        3
    }
    pub fn hc_jitter() -> Dur {
        Dur(Duration::from_millis(500))
    }
    pub fn hc_statuses() -> Vec<StatusRange> {
        vec![StatusRange { from: 200, to: 299 }]
    }
    pub fn consecutive_5xx() -> u32 {
        5
    }
    pub fn consecutive_gateway() -> u32 {
        5
    }
    pub fn consecutive_connect() -> u32 {
        3
    }
    pub fn base_ejection() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_ejection() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn max_ejection_percent() -> u32 {
        10
    }
    pub fn panic_threshold() -> u32 {
        50
    }
    pub fn breaker() -> u32 {
        1024
    }
    /// Higher than Envoy's 3: the retry budget is what keeps retries in proportion; this only
    /// caps a burst.
    pub fn max_retries() -> u32 {
        100
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min() -> u32 {
        10
    }
    pub fn budget_window() -> Dur {
        Dur(Duration::from_secs(10))
    }
}
