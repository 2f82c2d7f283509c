//! Sidecar mode: weft next to a workload, in its network namespace, serving every connection
//! `weft init`'s nat rules redirect to it.
//!
//! Outbound (the workload calls out): the connection's original destination is looked up in
//! the mesh's service registry; a known service's `VIP:port` is served as that service — HTTP
//! through a route to its cluster (balancing, retries, filters as on any listener), or TCP —
//! over mesh mTLS to its endpoints when the service has identities. Anything else passes
//! through to where it was going, or is refused under `egress: registry_only`.
//!
//! Inbound (a peer calls the workload): mesh mTLS is terminated (plaintext too in `permissive`
//! mode), the inbound filter chain runs with the peer's identity, and the connection ends at
//! the workload on `app_address`.
//!
//! Everything here is built from the configuration into ordinary runtimes (clusters, route
//! tables, listener runtimes that are not bound); [`capture`] picks one per connection.

pub mod capture;
pub mod detect;
pub mod init;
pub mod original_dst;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{
    AppProtocol, ClusterTls, Config, ConfigError, Egress, InboundMode, Listener, ListenerTls,
    MeshService, Route, Sidecar, UpstreamProtocol,
};
#[cfg(test)]
use crate::metrics::Metrics;
use crate::metrics::SidecarStats;
use crate::router::RouteTable;
use crate::snapshot::listener::{BuildEnv, ListenerRuntime};
use crate::tcp::routes::{TcpRuntime, TcpTarget};
use crate::tls::client::TlsClient;
use crate::tls::server::TlsServer;
use crate::upstream::{Cluster, ClusterMap};
use crate::wasm::FilterSpec;

pub use crate::tls::{ALPN_MESH, ALPN_TCP};

/// The names of the capture listeners (reserved).
pub const OUTBOUND: &str = "sidecar-outbound";
pub const INBOUND: &str = "sidecar-inbound";

pub use crate::snapshot::listener::Capture;

/// A service port the workload may call, as it is served.
#[derive(Debug)]
pub struct Destination {
    pub service: Arc<str>,
    pub protocol: AppProtocol,
    pub cluster: Arc<Cluster>,
    /// Serves the connection as HTTP (a route to `cluster`, the outbound filters).
    pub http: Arc<ListenerRuntime>,
    /// Serves the connection as TCP to `cluster`.
    pub tcp: Arc<ListenerRuntime>,
}

/// One of the workload's ports, as it is served inbound.
#[derive(Debug)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: AppProtocol,
    /// HTTP to the workload, with the inbound filters (TLS already terminated).
    pub http: Arc<ListenerRuntime>,
    /// TCP to the workload (TLS already terminated).
    pub tcp: Arc<ListenerRuntime>,
    /// Mesh mTLS termination (ALPN `h2`, `http/1.1`, `weft-tcp`); none without an identity.
    pub tls: Option<Arc<TlsServer>>,
}

/// The sidecar of one snapshot.
#[derive(Debug)]
pub struct SidecarRuntime {
    pub outbound: HashMap<SocketAddr, Arc<Destination>>,
    pub inbound: HashMap<u16, Arc<InboundPort>>,
    pub egress: Egress,
    pub mode: InboundMode,
    pub detection_timeout: Duration,
    pub outbound_drain: Duration,
    /// Where the capture listeners are bound (a connection whose original destination is one
    /// of them was not redirected: it is refused, never looped back).
    pub capture_ports: (u16, u16),
    pub stats: Arc<SidecarStats>,
}

/// What [`build`] adds to a snapshot.
pub struct Built {
    pub runtime: Option<Arc<SidecarRuntime>>,
    /// The capture listeners, to bind.
    pub listeners: Vec<Arc<ListenerRuntime>>,
    /// The services' and the workload's clusters (shown on `/clusters`, health-checked and
    /// swept as any other).
    pub clusters: Vec<Arc<Cluster>>,
}

/// A listener configuration with every default (the runtimes below are built from one).
fn listener(name: &str, address: &str) -> Listener {
    serde_json::from_value(serde_json::json!({ "name": name, "address": address }))
        .expect("a listener with a name and an address is complete")
}

fn catch_all(cluster: &str) -> Vec<Route> {
    // No route timeout: a mesh carries long streams (gRPC, server-sent events); retries on
    // connection failures and refused streams, as Istio's sidecars do.
    serde_json::from_value(serde_json::json!([{
        "to": [{ "cluster": cluster }],
        "timeout": "0s",
        "retries": { "attempts": 2, "on": ["connect-failure", "refused-stream"] }
    }]))
    .expect("a catch-all route is complete")
}

/// Builds the sidecar: checks `sidecar` and `mesh_services` (errors located there), makes the
/// services' clusters, the workload's clusters and the runtimes that serve captured
/// connections. Nothing when the configuration has no `sidecar`.
pub fn build(
    config: &Config,
    previous: &[Arc<Cluster>],
    env: BuildEnv<'_>,
    cluster_names: &ClusterMap,
    filters: &HashMap<String, Arc<FilterSpec>>,
    errors: &mut Vec<ConfigError>,
) -> Built {
    let mut built = Built {
        runtime: None,
        listeners: Vec::new(),
        clusters: Vec::new(),
    };
    let Some(s) = &config.sidecar else {
        // A registry without a sidecar (a control plane sends it to every proxy) is checked
        // and not served.
        for (i, svc) in config.mesh_services.iter().enumerate() {
            check_service(&format!("mesh_services[{i}]"), svc, errors);
        }
        return built;
    };
    let before = errors.len();
    check_sidecar(s, config, errors);
    let access_log = s.access_log.as_ref().and_then(|a| {
        crate::snapshot::listener::build_access_log("sidecar.access_log", a, env.base_dir, errors)
    });
    let chain = |at: &str, names: &[String], errors: &mut Vec<ConfigError>| {
        let mut out = Vec::new();
        for (j, name) in names.iter().enumerate() {
            match filters.get(name) {
                Some(f) => out.push(f.clone()),
                None if config.filters.iter().any(|f| f.name == *name) => {}
                None => errors.push(ConfigError::new(
                    format!("sidecar.{at}[{j}]"),
                    format!("unknown filter {name:?}"),
                )),
            }
        }
        out
    };
    let outbound_filters = chain("outbound_filters", &s.outbound_filters, errors);
    let inbound_filters = chain("inbound_filters", &s.inbound_filters, errors);

    let stats = Arc::new(env.metrics.sidecar_stats());
    let mut outbound = HashMap::new();
    let mut names = std::collections::HashSet::new();
    for (i, svc) in config.mesh_services.iter().enumerate() {
        let at = format!("mesh_services[{i}]");
        if !names.insert(svc.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate service name {:?}", svc.name),
            ));
        }
        let Some(endpoint_ips) = check_service(&at, svc, errors) else {
            continue;
        };
        let vips: Vec<IpAddr> = svc
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        for (j, p) in svc.ports.iter().enumerate() {
            let name = format!("outbound|{}|{}", p.port, svc.name);
            if cluster_names.contains_key(&name) {
                errors.push(ConfigError::new(
                    format!("{at}.ports[{j}]"),
                    format!("a cluster is already called {name:?}"),
                ));
                continue;
            }
            let tls = (!svc.identities.is_empty()).then(|| ClusterTls {
                identities: svc.identities.clone(),
                ..<ClusterTls as crate::config::MeshShorthand>::mesh()
            });
            let endpoints: Vec<String> = endpoint_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, p.target()).to_string())
                .collect();
            let protocol = match p.protocol {
                AppProtocol::Http => UpstreamProtocol::Auto,
                AppProtocol::Http2 | AppProtocol::Grpc => UpstreamProtocol::Http2,
                AppProtocol::Auto | AppProtocol::Tcp => UpstreamProtocol::Downstream,
            };
            let Some(cluster) = make_cluster(
                &format!("{at}.ports[{j}]"),
                &name,
                &endpoints,
                protocol,
                tls.as_ref(),
                previous,
                env,
                errors,
            ) else {
                continue;
            };
            // The application is the origin of what it sends out: only the inbound side adds
            // the client's address (the application there sees loopback).
            let (http, tcp) = runtimes(
                &name,
                &cluster,
                outbound_filters.clone(),
                false,
                &access_log,
                env,
            );
            let dest = Arc::new(Destination {
                service: Arc::from(svc.name.as_str()),
                protocol: p.protocol,
                cluster: cluster.clone(),
                http,
                tcp,
            });
            for vip in &vips {
                let key = SocketAddr::new(*vip, p.port);
                if let Some(other) = outbound.insert(key, dest.clone()) {
                    errors.push(ConfigError::new(
                        format!("{at}.addresses"),
                        format!("{key} is also service {:?}'s", other.service),
                    ));
                }
            }
            built.clusters.push(cluster);
        }
    }

    // Inbound: one cluster per workload port, to the workload on app_address.
    let app: Option<IpAddr> = s.app_address.parse().ok();
    let inbound_tls = match env.identity {
        Some(_) => {
            let mesh = <ListenerTls as crate::config::MeshShorthand>::mesh();
            let alpn: &[&str] = &["h2", "http/1.1", "weft-tcp"];
            match TlsServer::build(
                INBOUND,
                &mesh,
                alpn,
                env.base_dir,
                &env.metrics.tls,
                env.identity,
            ) {
                Ok(t) => Some(Arc::new(t)),
                Err(errs) => {
                    for (at, e) in errs {
                        errors.push(ConfigError::new(format!("sidecar.mode ({at})"), e));
                    }
                    None
                }
            }
        }
        None => {
            if s.mode == InboundMode::Strict {
                errors.push(ConfigError::new(
                    "sidecar.mode",
                    "strict needs the proxy's mesh identity (enroll it with the control plane)",
                ));
            }
            None
        }
    };
    let mut inbound = HashMap::new();
    if let Some(app) = app {
        for (i, p) in s.ports.iter().enumerate() {
            let name = format!("inbound|{}", p.port);
            let endpoint = SocketAddr::new(app, p.port).to_string();
            let protocol = match p.protocol {
                AppProtocol::Http2 | AppProtocol::Grpc => UpstreamProtocol::Http2,
                AppProtocol::Http => UpstreamProtocol::Http1,
                AppProtocol::Auto | AppProtocol::Tcp => UpstreamProtocol::Downstream,
            };
            let Some(cluster) = make_cluster(
                &format!("sidecar.ports[{i}]"),
                &name,
                &[endpoint],
                protocol,
                None,
                previous,
                env,
                errors,
            ) else {
                continue;
            };
            // TLS is terminated (or not) before these runtimes serve a connection.
            let (http, tcp) = runtimes(
                &name,
                &cluster,
                inbound_filters.clone(),
                true,
                &access_log,
                env,
            );
            inbound.insert(
                p.port,
                Arc::new(InboundPort {
                    port: p.port,
                    protocol: p.protocol,
                    http,
                    tcp,
                    tls: inbound_tls.clone(),
                }),
            );
            built.clusters.push(cluster);
        }
    }

    for (capture, name, port) in [
        (Capture::Outbound, OUTBOUND, s.outbound_port),
        (Capture::Inbound, INBOUND, s.inbound_port),
    ] {
        for ip in s.bind.iter().filter_map(|b| b.parse::<IpAddr>().ok()) {
            if ip.is_ipv6() && !ipv6_available() {
                tracing::info!(address = %ip, "no IPv6 on this host: capture port not bound on it");
                continue;
            }
            let full = if ip.is_ipv6() {
                format!("{name}-ipv6")
            } else {
                name.to_owned()
            };
            let address = SocketAddr::new(ip, port);
            let mut l = listener(&full, &address.to_string());
            // A sidecar's one application makes all the connections: no per-IP cap, and the
            // listener-wide cap of any listener.
            l.max_connections_per_source_ip = 0;
            let table = Arc::new(RouteTable::build(&full, &[], cluster_names, errors));
            let mut runtime = ListenerRuntime::new(&l, address, table, Vec::new(), env.metrics);
            runtime.capture = Some(capture);
            built.listeners.push(Arc::new(runtime));
        }
    }

    if errors.len() > before {
        return built;
    }
    built.runtime = Some(Arc::new(SidecarRuntime {
        outbound,
        inbound,
        egress: s.egress,
        mode: s.mode,
        detection_timeout: s.detection_timeout.0,
        outbound_drain: s.outbound_drain.0,
        capture_ports: (s.outbound_port, s.inbound_port),
        stats,
    }));
    built
}

/// The HTTP and the TCP way to serve a connection to `cluster`.
fn runtimes(
    name: &str,
    cluster: &Arc<Cluster>,
    filters: Vec<Arc<FilterSpec>>,
    forwarded_for: bool,
    access_log: &Option<Arc<crate::access_log::AccessLog>>,
    env: BuildEnv<'_>,
) -> (Arc<ListenerRuntime>, Arc<ListenerRuntime>) {
    let mut map = ClusterMap::new();
    map.insert(cluster.name.to_string(), cluster.clone());
    let mut ignored = Vec::new();
    let table = Arc::new(RouteTable::build(
        name,
        &catch_all(&cluster.name),
        &map,
        &mut ignored,
    ));
    debug_assert!(ignored.is_empty(), "{ignored:?}");
    let l = listener(name, "0.0.0.0:0");
    let address: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut http = ListenerRuntime::new(&l, address, table.clone(), filters, env.metrics);
    http.forwarded_for = forwarded_for;
    http.access_log = access_log.clone();
    let mut tcp = ListenerRuntime::new(&l, address, table, Vec::new(), env.metrics);
    tcp.tcp = Some(TcpRuntime {
        routes: vec![TcpTarget {
            server_names: Vec::new(),
            cluster: cluster.clone(),
        }],
        idle_timeout: Some(Duration::from_secs(3600)),
        client_hello_timeout: Duration::from_secs(10),
        inspect_sni: false,
    });
    (Arc::new(http), Arc::new(tcp))
}

#[allow(clippy::too_many_arguments)]
fn make_cluster(
    at: &str,
    name: &str,
    endpoints: &[String],
    protocol: UpstreamProtocol,
    tls: Option<&ClusterTls>,
    previous: &[Arc<Cluster>],
    env: BuildEnv<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<Cluster>> {
    let mut c: crate::config::Cluster = serde_json::from_value(serde_json::json!({
        "name": name,
        "endpoints": endpoints,
    }))
    .expect("a cluster with a name and endpoints is complete");
    c.protocol = protocol;
    c.tls = tls.cloned();
    let prev = previous.iter().find(|c| &*c.name == name);
    let client = match tls {
        None => None,
        Some(t) => {
            let kept = prev
                .and_then(|p| p.tls.as_ref())
                .filter(|old| old.same_settings(t, env.base_dir));
            match kept {
                Some(old) => Some(old.clone()),
                None => {
                    match TlsClient::build(name, t, env.base_dir, &env.metrics.tls, env.identity) {
                        Ok(client) => Some(Arc::new(client)),
                        Err(errs) => {
                            for (_, e) in errs {
                                errors.push(ConfigError::new(format!("{at}: mesh mTLS"), e));
                            }
                            return None;
                        }
                    }
                }
            }
        }
    };
    let mut found = Vec::new();
    let cluster = Cluster::build(
        0,
        &c,
        prev.map(|a| &**a),
        client,
        env.metrics,
        env.names,
        &mut found,
    );
    // A service scaled to zero has no endpoints: valid, its connections get 503 / are closed
    // (no healthy upstream) until it has some.
    if endpoints.is_empty() {
        found.retain(|e| !e.message.contains("at least one endpoint"));
    }
    if !found.is_empty() {
        for e in found {
            errors.push(ConfigError::new(at, e.message));
        }
        return None;
    }
    Some(Arc::new(cluster))
}

fn check_sidecar(s: &Sidecar, config: &Config, errors: &mut Vec<ConfigError>) {
    if s.outbound_port == 0 || s.inbound_port == 0 {
        errors.push(ConfigError::new(
            "sidecar",
            "outbound_port and inbound_port must not be 0 (the nat rules redirect to them)",
        ));
    }
    if s.outbound_port == s.inbound_port {
        errors.push(ConfigError::new(
            "sidecar.inbound_port",
            format!("{} is the outbound port too", s.inbound_port),
        ));
    }
    if s.bind.is_empty() {
        errors.push(ConfigError::new("sidecar.bind", "needs at least one IP"));
    }
    for (i, b) in s.bind.iter().enumerate() {
        if b.parse::<IpAddr>().is_err() {
            errors.push(ConfigError::new(
                format!("sidecar.bind[{i}]"),
                format!("{b:?} is not an IP address"),
            ));
        }
    }
    if s.detection_timeout.0.is_zero() || s.detection_timeout.0 > Duration::from_secs(10) {
        errors.push(ConfigError::new(
            "sidecar.detection_timeout",
            "must be between 1ms and 10s",
        ));
    }
    if s.outbound_drain.0 > Duration::from_secs(600) {
        errors.push(ConfigError::new("sidecar.outbound_drain", "at most 600s"));
    }
    match s.app_address.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => errors.push(ConfigError::new(
            "sidecar.app_address",
            "must be an address the workload listens on (127.0.0.1, ::1, or its own IP)",
        )),
        Ok(_) => {}
        Err(_) => errors.push(ConfigError::new(
            "sidecar.app_address",
            format!("{:?} is not an IP address", s.app_address),
        )),
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        if p.port == 0 {
            errors.push(ConfigError::new(
                format!("sidecar.ports[{i}].port"),
                "must not be 0",
            ));
        } else if !seen.insert(p.port) {
            errors.push(ConfigError::new(
                format!("sidecar.ports[{i}].port"),
                format!("port {} is listed twice", p.port),
            ));
        } else if p.port == s.outbound_port || p.port == s.inbound_port {
            errors.push(ConfigError::new(
                format!("sidecar.ports[{i}].port"),
                format!("port {} is a capture port", p.port),
            ));
        }
    }
    for (i, l) in config.listeners.iter().enumerate() {
        if l.name.starts_with("sidecar-") {
            errors.push(ConfigError::new(
                format!("listeners[{i}].name"),
                "names starting with `sidecar-` are the sidecar's capture listeners'",
            ));
        }
    }
}

/// Checks a service; its endpoints' IPs when it can be served.
fn check_service(
    at: &str,
    svc: &MeshService,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<IpAddr>> {
    let before = errors.len();
    let valid_name = !svc.name.is_empty()
        && svc.name.len() <= 253
        && svc
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !valid_name {
        errors.push(ConfigError::new(
            format!("{at}.name"),
            format!(
                "{:?}: expected letters, digits, `-`, `.` or `_` (at most 253)",
                svc.name
            ),
        ));
    }
    if svc.addresses.is_empty() {
        errors.push(ConfigError::new(
            format!("{at}.addresses"),
            "a service needs at least one virtual IP",
        ));
    }
    for (j, a) in svc.addresses.iter().enumerate() {
        match a.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => errors.push(ConfigError::new(
                format!("{at}.addresses[{j}]"),
                format!("{ip} cannot be a service address"),
            )),
            Ok(_) => {}
            Err(_) => errors.push(ConfigError::new(
                format!("{at}.addresses[{j}]"),
                format!("{a:?} is not an IP address"),
            )),
        }
    }
    if svc.ports.is_empty() {
        errors.push(ConfigError::new(
            format!("{at}.ports"),
            "a service needs at least one port",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (j, p) in svc.ports.iter().enumerate() {
        if p.port == 0 || p.target_port == Some(0) {
            errors.push(ConfigError::new(
                format!("{at}.ports[{j}]"),
                "port and target_port must not be 0",
            ));
        }
        if !seen.insert(p.port) {
            errors.push(ConfigError::new(
                format!("{at}.ports[{j}].port"),
                format!("port {} is listed twice", p.port),
            ));
        }
    }
    let mut ips = Vec::new();
    for (j, e) in svc.endpoints.iter().enumerate() {
        match e.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => errors.push(ConfigError::new(
                format!("{at}.endpoints[{j}]"),
                format!("{ip} cannot be an endpoint"),
            )),
            Ok(ip) => ips.push(ip),
            Err(_) => errors.push(ConfigError::new(
                format!("{at}.endpoints[{j}]"),
                format!("{e:?} is not an IP address (the port is each service port's target_port)"),
            )),
        }
    }
    if let Err(e) = crate::identity::mesh::parse_identities(&svc.identities) {
        errors.push(ConfigError::new(format!("{at}.identities"), e));
    }
    (errors.len() == before).then_some(ips)
}

/// Whether this host can bind IPv6 sockets.
fn ipv6_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::net::TcpListener::bind("[::1]:0").is_ok())
}

#[cfg(test)]
mod tests;
