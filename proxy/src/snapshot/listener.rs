//! One listener as requests see it — its settings, route table, filters, TLS, and the metric
//! handles resolved once per snapshot instead of once per request — and what building one
//! needs (the parts of a snapshot the sidecar's listeners are built from too).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{ConfigError, HttpOptions};
use crate::metrics::{ListenerStats, Metrics, RouteStats};
use crate::router::{Action, RouteTable};
use crate::tcp::routes::TcpRuntime;
use crate::tls::server::TlsServer;
use crate::wasm::{FilterSpec, WasmShared};

/// What building a snapshot needs besides the configuration.
#[derive(Debug, Clone, Copy)]
pub struct BuildEnv<'a> {
    pub metrics: &'a Metrics,
    /// Shared Wasm state (canary VMs of filters run against it).
    pub wasm: &'a Arc<WasmShared>,
    /// Relative paths in the configuration (filter modules) are relative to this.
    pub base_dir: &'a std::path::Path,
    /// The proxy's mesh identity (`tls: mesh`), when it has one.
    pub identity: Option<&'a Arc<crate::identity::Identity>>,
    /// Whether endpoint host names are looked up or only checked.
    pub names: crate::upstream::Names,
}

/// Which capture port of a sidecar a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    Outbound,
    Inbound,
}

/// One listener's runtime: its settings, route table and pre-resolved metric handles.
#[derive(Debug)]
pub struct ListenerRuntime {
    pub name: Arc<str>,
    /// As configured (`127.0.0.1:0` stays port 0 here; the bound port is the server's).
    pub address: SocketAddr,
    pub http: HttpOptions,
    pub max_connections: u32,
    pub max_connections_per_source_ip: u32,
    pub table: Arc<RouteTable>,
    pub stats: ListenerStats,
    /// Per route of `table`, in order.
    pub route_stats: Vec<RouteStatsSet>,
    /// For requests no route took (no match, rejected before routing).
    pub no_route: Arc<RouteStats>,
    /// The filters requests go through, in order.
    pub filters: Vec<Arc<FilterSpec>>,
    /// TLS termination.
    pub tls: Option<Arc<TlsServer>>,
    /// A `tcp` listener's routing (none on HTTP listeners).
    pub tcp: Option<TcpRuntime>,
    /// A sidecar's capture listener: connections are served by their original destination.
    pub capture: Option<Capture>,
    /// Whether requests get `x-forwarded-for` / `x-forwarded-proto` (not on a sidecar's
    /// outbound side: the application is the origin, as with Istio's sidecars).
    pub forwarded_for: bool,
    /// One line per request (`access_log`).
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}

/// Metric handles of one route on one listener.
#[derive(Debug)]
pub struct RouteStatsSet {
    /// Per forwarding target, in order.
    pub targets: Vec<Arc<RouteStats>>,
    /// For redirects, direct responses and errors before a target was chosen.
    pub local: Arc<RouteStats>,
}

impl ListenerRuntime {
    pub(crate) fn new(
        l: &crate::config::Listener,
        address: SocketAddr,
        table: Arc<RouteTable>,
        filters: Vec<Arc<FilterSpec>>,
        metrics: &Metrics,
    ) -> Self {
        let route_stats = table
            .routes
            .iter()
            .map(|r| RouteStatsSet {
                targets: match &r.action {
                    Action::Forward(split) => split
                        .targets
                        .iter()
                        .map(|t| Arc::new(metrics.route_stats(&l.name, &r.name, &t.cluster.name)))
                        .collect(),
                    _ => Vec::new(),
                },
                local: Arc::new(metrics.route_stats(&l.name, &r.name, "")),
            })
            .collect();
        ListenerRuntime {
            name: Arc::from(l.name.as_str()),
            address,
            http: l.http.clone(),
            max_connections: l.max_connections,
            max_connections_per_source_ip: l.max_connections_per_source_ip,
            stats: metrics.listener_stats(&l.name),
            no_route: Arc::new(metrics.route_stats(&l.name, "", "")),
            route_stats,
            table,
            filters,
            tls: None,
            tcp: None,
            capture: None,
            forwarded_for: true,
            access_log: None,
        }
    }
}

/// A listener's access log, its file open (or the one already open at that path).
pub(crate) fn build_access_log(
    at: &str,
    a: &crate::config::AccessLogConfig,
    base_dir: &std::path::Path,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<crate::access_log::AccessLog>> {
    use crate::access_log::{AccessFile, AccessLog};
    let before = errors.len();
    let mut headers = Vec::with_capacity(a.headers.len());
    for (i, h) in a.headers.iter().enumerate() {
        match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(n) if n.as_str() == h => headers.push(n),
            _ => errors.push(ConfigError::new(
                format!("{at}.headers[{i}]"),
                format!("{h:?} is not a header name in lower case"),
            )),
        }
    }
    if a.headers.len() > 64 {
        errors.push(ConfigError::new(
            format!("{at}.headers"),
            format!("{} headers; at most 64", a.headers.len()),
        ));
    }
    if a.path.is_empty() || a.path.contains('\0') {
        errors.push(ConfigError::new(
            format!("{at}.path"),
            "a file path is required",
        ));
    }
    if errors.len() > before {
        return None;
    }
    match AccessFile::open(&base_dir.join(&a.path)) {
        Ok(file) => Some(Arc::new(AccessLog { file, headers })),
        Err(e) => {
            errors.push(ConfigError::new(
                format!("{at}.path"),
                format!("cannot open {e}"),
            ));
            None
        }
    }
}
