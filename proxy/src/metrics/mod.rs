//! Prometheus metrics of the proxy (`/metrics`), registered when the proxy is built.
//!
//! Families are created once; the request path never looks a label set up: when a config is
//! applied, every (listener, route, cluster) combination gets its handles resolved in advance
//! ([`RouteStats`], [`ListenerStats`], [`ClusterStats`]), so counting a request is a few atomic
//! adds. Names are documented in the README's metrics reference.

mod tls;

pub use tls::{CertLabels, FailureLabels, HandshakeLabels, ReloadLabels, TlsMetrics};

use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: String,
    pub route: String,
    pub cluster: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub listener: String,
    pub route: String,
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SidecarLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// What became of the connection: `service`, `passthrough`, `refused_unknown`, `mesh`,
    /// `plaintext`, `refused_plaintext`, `loop`, …
    pub result: &'static str,
}

/// A sidecar's counts of captured connections.
#[derive(Clone, Debug)]
pub struct SidecarStats {
    connections: Family<SidecarLabels, Counter>,
    /// Bytes of passed-through connections, from and to their destinations.
    pub passthrough_rx: Counter,
    pub passthrough_tx: Counter,
}

impl SidecarStats {
    pub fn connection(&self, direction: &'static str, result: &'static str) {
        self.connections
            .get_or_create(&SidecarLabels { direction, result })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterKindLabels {
    pub cluster: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub cluster: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub listener: String,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 250 µs … ~65 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00025, 2.0, 19,
    ))
}

/// Every metric family of the proxy.
pub struct Metrics {
    registry: Mutex<Registry>,
    http_requests: Family<RequestLabels, Counter>,
    http_request_duration: HistogramFamily<RouteLabels>,
    http_proxy_errors: Family<ErrorLabels, Counter>,
    downstream_cx_active: Family<ListenerLabels, Gauge>,
    downstream_cx: Family<ListenerLabels, Counter>,
    downstream_cx_rejected: Family<ListenerLabels, Counter>,
    sidecar_connections: Family<SidecarLabels, Counter>,
    sidecar_passthrough_rx: Counter,
    sidecar_passthrough_tx: Counter,
    downstream_rx_bytes: Family<ListenerLabels, Counter>,
    downstream_tx_bytes: Family<ListenerLabels, Counter>,
    upstream_cx_opened: Family<ClusterLabels, Counter>,
    upstream_cx_active: Family<ClusterLabels, Gauge>,
    upstream_cx_failed: Family<ClusterLabels, Counter>,
    upstream_tx_bytes: Family<ClusterLabels, Counter>,
    upstream_rx_bytes: Family<ClusterLabels, Counter>,
    upstream_requests: Family<ClusterLabels, Counter>,
    upstream_retries: Family<ClusterLabels, Counter>,
    upstream_retry_overflow: Family<ClusterLabels, Counter>,
    upstream_stale_resends: Family<ClusterLabels, Counter>,
    upstream_ejections: Family<ClusterLabels, Counter>,
    upstream_endpoints: Family<EndpointStateLabels, Gauge>,
    upstream_overflow: Family<ClusterKindLabels, Counter>,
    upstream_health_checks: Family<ClusterKindLabels, Counter>,
    upstream_timeouts: Family<ClusterKindLabels, Counter>,
    pub config_version: Gauge,
    pub config_reloads: Family<ResultLabels, Counter>,
    /// Handshakes, failures, certificate expiry, reloads.
    pub tls: TlsMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut reg = Registry::with_prefix("weft");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            http_requests: Family::default(),
            http_request_duration: HistogramFamily::new_with_constructor(duration_histogram),
            http_proxy_errors: Family::default(),
            downstream_cx_active: Family::default(),
            downstream_cx: Family::default(),
            downstream_cx_rejected: Family::default(),
            sidecar_connections: Family::default(),
            sidecar_passthrough_rx: Counter::default(),
            sidecar_passthrough_tx: Counter::default(),
            downstream_rx_bytes: Family::default(),
            downstream_tx_bytes: Family::default(),
            upstream_cx_opened: Family::default(),
            upstream_cx_active: Family::default(),
            upstream_cx_failed: Family::default(),
            upstream_tx_bytes: Family::default(),
            upstream_rx_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_retries: Family::default(),
            upstream_retry_overflow: Family::default(),
            upstream_stale_resends: Family::default(),
            upstream_ejections: Family::default(),
            upstream_endpoints: Family::default(),
            upstream_overflow: Family::default(),
            upstream_health_checks: Family::default(),
            upstream_timeouts: Family::default(),
            config_version: Gauge::default(),
            config_reloads: Family::default(),
            tls: TlsMetrics::default(),
        };
        reg.register(
            "http_requests",
            "HTTP requests completed, by listener, route, cluster and status class",
            m.http_requests.clone(),
        );
        reg.register(
            "http_request_duration_seconds",
            "Time from request start to the end of the response, by listener, route and cluster",
            m.http_request_duration.clone(),
        );
        reg.register(
            "http_proxy_errors",
            "Responses generated by the proxy because of an error, by listener and cause (the x-weft-error value)",
            m.http_proxy_errors.clone(),
        );
        reg.register(
            "downstream_connections_active",
            "Open downstream connections",
            m.downstream_cx_active.clone(),
        );
        reg.register(
            "downstream_connections",
            "Downstream connections accepted",
            m.downstream_cx.clone(),
        );
        reg.register(
            "sidecar_connections",
            "Connections a sidecar captured, by direction and what became of them",
            m.sidecar_connections.clone(),
        );
        reg.register(
            "sidecar_passthrough_received_bytes",
            "Bytes received from destinations outside the registry (passed through)",
            m.sidecar_passthrough_rx.clone(),
        );
        reg.register(
            "sidecar_passthrough_sent_bytes",
            "Bytes sent to destinations outside the registry (passed through)",
            m.sidecar_passthrough_tx.clone(),
        );
        reg.register(
            "downstream_connections_rejected",
            "Downstream connections closed at once because the listener was at max_connections",
            m.downstream_cx_rejected.clone(),
        );
        reg.register(
            "downstream_received_bytes",
            "Request body bytes received from downstream",
            m.downstream_rx_bytes.clone(),
        );
        reg.register(
            "downstream_sent_bytes",
            "Response body bytes sent downstream",
            m.downstream_tx_bytes.clone(),
        );
        reg.register(
            "upstream_connections_opened",
            "Upstream connections established",
            m.upstream_cx_opened.clone(),
        );
        reg.register(
            "upstream_connections_active",
            "Open upstream connections",
            m.upstream_cx_active.clone(),
        );
        reg.register(
            "upstream_connections_failed",
            "Upstream connection attempts that failed (refused, unreachable, timed out, handshake)",
            m.upstream_cx_failed.clone(),
        );
        reg.register(
            "upstream_sent_bytes",
            "Request body bytes sent upstream",
            m.upstream_tx_bytes.clone(),
        );
        reg.register(
            "upstream_received_bytes",
            "Response body bytes received from upstream",
            m.upstream_rx_bytes.clone(),
        );
        reg.register(
            "upstream_requests",
            "Tries sent to an upstream endpoint (first tries and retries)",
            m.upstream_requests.clone(),
        );
        reg.register(
            "upstream_retries",
            "Retries sent",
            m.upstream_retries.clone(),
        );
        reg.register(
            "upstream_retry_overflow",
            "Retries not sent because the retry budget or the retries circuit breaker said no",
            m.upstream_retry_overflow.clone(),
        );
        reg.register(
            "upstream_stale_resends",
            "Bodyless idempotent requests sent again because a pooled connection closed under them",
            m.upstream_stale_resends.clone(),
        );
        reg.register(
            "upstream_ejections",
            "Endpoints ejected by passive outlier detection",
            m.upstream_ejections.clone(),
        );
        reg.register(
            "upstream_endpoints",
            "Endpoints by state: available (healthy and not ejected), ejected, unhealthy",
            m.upstream_endpoints.clone(),
        );
        reg.register(
            "upstream_overflow",
            "Requests refused by a circuit breaker (kind: connections, pending, requests)",
            m.upstream_overflow.clone(),
        );
        reg.register(
            "upstream_health_checks",
            "Active health checks by result (kind: success, failure)",
            m.upstream_health_checks.clone(),
        );
        reg.register(
            "upstream_timeouts",
            "Timeouts by kind: connect, per_try, request (the route's), stream_idle",
            m.upstream_timeouts.clone(),
        );
        reg.register(
            "config_version",
            "Version of the configuration being served",
            m.config_version.clone(),
        );
        reg.register(
            "config_reloads",
            "Configuration reloads, by result (applied, rejected)",
            m.config_reloads.clone(),
        );
        m.tls.register(&mut reg);
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = reg;
        m
    }

    /// Lets other components (the Wasm host, …) register their families.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut reg)
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }

    pub fn route_stats(&self, listener: &str, route: &str, cluster: &str) -> RouteStats {
        RouteStats {
            labels: RouteLabels {
                listener: listener.to_owned(),
                route: route.to_owned(),
                cluster: cluster.to_owned(),
            },
            family: self.http_requests.clone(),
            durations: self.http_request_duration.clone(),
            requests: Default::default(),
            duration: OnceLock::new(),
        }
    }

    pub fn sidecar_stats(&self) -> SidecarStats {
        SidecarStats {
            connections: self.sidecar_connections.clone(),
            passthrough_rx: self.sidecar_passthrough_rx.clone(),
            passthrough_tx: self.sidecar_passthrough_tx.clone(),
        }
    }

    pub fn listener_stats(&self, listener: &str) -> ListenerStats {
        let l = ListenerLabels {
            listener: listener.to_owned(),
        };
        ListenerStats {
            name: listener.to_owned(),
            cx_active: self.downstream_cx_active.get_or_create(&l).clone(),
            cx_total: self.downstream_cx.get_or_create(&l).clone(),
            cx_rejected: self.downstream_cx_rejected.get_or_create(&l).clone(),
            rx_bytes: self.downstream_rx_bytes.get_or_create(&l).clone(),
            tx_bytes: self.downstream_tx_bytes.get_or_create(&l).clone(),
            errors: self.http_proxy_errors.clone(),
        }
    }

    pub fn cluster_stats(&self, cluster: &str) -> ClusterStats {
        let c = ClusterLabels {
            cluster: cluster.to_owned(),
        };
        // One statement per lookup: `get_or_create` returns a read guard, and two guards alive
        // in one statement deadlock when the second has to insert.
        let endpoints = |state| {
            self.upstream_endpoints
                .get_or_create(&EndpointStateLabels {
                    cluster: cluster.to_owned(),
                    state,
                })
                .clone()
        };
        let endpoints_available = endpoints("available");
        let endpoints_ejected = endpoints("ejected");
        let endpoints_unhealthy = endpoints("unhealthy");
        let counter = |family: &Family<ClusterLabels, Counter>| family.get_or_create(&c).clone();
        let cx_opened = counter(&self.upstream_cx_opened);
        let cx_failed = counter(&self.upstream_cx_failed);
        let tx_bytes = counter(&self.upstream_tx_bytes);
        let rx_bytes = counter(&self.upstream_rx_bytes);
        let requests = counter(&self.upstream_requests);
        let retries = counter(&self.upstream_retries);
        let retry_overflow = counter(&self.upstream_retry_overflow);
        let stale_resends = counter(&self.upstream_stale_resends);
        let ejections = counter(&self.upstream_ejections);
        let cx_active = self.upstream_cx_active.get_or_create(&c).clone();
        ClusterStats {
            cx_opened,
            cx_active,
            cx_failed,
            tx_bytes,
            rx_bytes,
            requests,
            retries,
            retry_overflow,
            stale_resends,
            ejections,
            endpoints_available,
            endpoints_ejected,
            endpoints_unhealthy,
            name: cluster.to_owned(),
            overflow: self.upstream_overflow.clone(),
            health_checks: self.upstream_health_checks.clone(),
            timeouts: self.upstream_timeouts.clone(),
        }
    }
}

/// Handles for one (listener, route, cluster): request counts by status class and duration.
/// A series is created the first time it is used (so `/metrics` lists no never-seen
/// combination), then kept: counting is one atomic load and one add.
#[derive(Debug)]
pub struct RouteStats {
    labels: RouteLabels,
    family: Family<RequestLabels, Counter>,
    durations: HistogramFamily<RouteLabels>,
    requests: [OnceLock<Counter>; 5],
    duration: OnceLock<Histogram>,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RouteStats {
    /// The route's name (empty for requests no route took).
    pub fn route(&self) -> &str {
        &self.labels.route
    }

    /// The cluster's name (empty for local answers).
    pub fn cluster(&self) -> &str {
        &self.labels.cluster
    }

    pub fn record(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class]
            .get_or_init(|| {
                self.family
                    .get_or_create(&RequestLabels {
                        listener: self.labels.listener.clone(),
                        route: self.labels.route.clone(),
                        cluster: self.labels.cluster.clone(),
                        status_class: STATUS_CLASSES[class],
                    })
                    .clone()
            })
            .inc();
        self.duration
            .get_or_init(|| self.durations.get_or_create(&self.labels).clone())
            .observe(seconds);
    }
}

/// Handles for one listener.
#[derive(Clone, Debug)]
pub struct ListenerStats {
    pub name: String,
    pub cx_active: Gauge,
    pub cx_total: Counter,
    pub cx_rejected: Counter,
    pub rx_bytes: Counter,
    pub tx_bytes: Counter,
    errors: Family<ErrorLabels, Counter>,
}

impl ListenerStats {
    /// Counts a proxy-generated error response (rare: looked up when it happens).
    pub fn error(&self, cause: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                listener: self.name.clone(),
                cause,
            })
            .inc();
    }
}

/// Handles for one cluster.
#[derive(Clone, Debug)]
pub struct ClusterStats {
    pub cx_opened: Counter,
    pub cx_active: Gauge,
    pub cx_failed: Counter,
    pub tx_bytes: Counter,
    pub rx_bytes: Counter,
    pub requests: Counter,
    pub retries: Counter,
    pub retry_overflow: Counter,
    pub stale_resends: Counter,
    pub ejections: Counter,
    pub endpoints_available: Gauge,
    pub endpoints_ejected: Gauge,
    pub endpoints_unhealthy: Gauge,
    name: String,
    overflow: Family<ClusterKindLabels, Counter>,
    health_checks: Family<ClusterKindLabels, Counter>,
    timeouts: Family<ClusterKindLabels, Counter>,
}

impl ClusterStats {
    fn kind(&self, family: &Family<ClusterKindLabels, Counter>, kind: &'static str) {
        family
            .get_or_create(&ClusterKindLabels {
                cluster: self.name.clone(),
                kind,
            })
            .inc();
    }

    /// A circuit breaker refused a request (rare: looked up when it happens).
    pub fn overflow(&self, breaker: &'static str) {
        self.kind(&self.overflow, breaker);
    }

    pub fn health_check(&self, result: &'static str) {
        self.kind(&self.health_checks, result);
    }

    pub fn timeout(&self, kind: &'static str) {
        self.kind(&self.timeouts, kind);
    }
}

/// Shared handle to the proxy's metrics.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_documented_names() {
        let m = Metrics::new();
        m.route_stats("main", "r0", "api").record(204, 0.001);
        m.listener_stats("main").cx_total.inc();
        m.cluster_stats("api").cx_opened.inc();
        let text = m.encode();
        assert!(text.contains(
            "weft_http_requests_total{listener=\"main\",route=\"r0\",cluster=\"api\",status_class=\"2xx\"} 1"
        ), "{text}");
        assert!(
            text.contains("weft_http_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("weft_downstream_connections_total{listener=\"main\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("weft_upstream_connections_opened_total{cluster=\"api\"} 1"),
            "{text}"
        );
    }
}
