//! A [`Snapshot`]: one validated configuration turned into the runtime objects the proxy serves
//! from. Built in one pass that reports every error, located; swapped in atomically; requests
//! finish on the snapshot they started with.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub mod listener;

pub use listener::{BuildEnv, Capture, ListenerRuntime, RouteStatsSet};

use crate::config::{Config, ConfigError, ConfigErrors, HttpOptions, ListenerProtocol};
use crate::snapshot::listener::build_access_log;
use crate::tcp::routes::TcpRuntime;

use crate::router::RouteTable;
use crate::tls::client::TlsClient;
use crate::tls::server::TlsServer;
use crate::upstream::{Cluster, ClusterMap};
use crate::wasm::{FilterSpec, ServiceSpec};

/// Everything the proxy serves from, for one version of the configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// `sha256:<hex>` of the configuration's canonical JSON.
    pub digest: String,
    pub config: Arc<Config>,
    pub admin: Option<SocketAddr>,
    pub grace_period: Duration,
    pub listeners: HashMap<String, Arc<ListenerRuntime>>,
    /// In configuration order.
    pub clusters: Vec<Arc<Cluster>>,
    /// Wasm filters, by name.
    pub filters: HashMap<String, Arc<FilterSpec>>,
    /// Wasm services, by name.
    pub services: HashMap<String, Arc<ServiceSpec>>,
    /// Sidecar mode: what captured connections are served by.
    pub sidecar: Option<Arc<crate::sidecar::SidecarRuntime>>,
}

/// A listening address to bind: a configured listener or a sidecar's capture port.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Where errors about it are located (`listeners[2].address`, `sidecar.outbound_port`).
    pub at: String,
    pub name: String,
    pub address: SocketAddr,
    pub max_connections: u32,
    pub max_connections_per_source_ip: u32,
}

fn parse_addr(at: &str, text: &str, errors: &mut Vec<ConfigError>) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(ConfigError::new(
                at,
                format!("invalid address {text:?}: expected IP:port, e.g. 127.0.0.1:8080"),
            ));
            None
        }
    }
}

fn check_http(at: &str, h: &HttpOptions, errors: &mut Vec<ConfigError>) {
    let mut range = |field: &str, v: u64, lo: u64, hi: u64| {
        if !(lo..=hi).contains(&v) {
            errors.push(ConfigError::new(
                format!("{at}.{field}"),
                format!("{v} is out of range ({lo}..={hi})"),
            ));
        }
    };
    range(
        "max_request_headers_kb",
        h.max_request_headers_kb.into(),
        1,
        8192,
    );
    range("max_headers", h.max_headers.into(), 1, 10_000);
    range(
        "max_concurrent_streams",
        h.max_concurrent_streams.into(),
        1,
        i32::MAX as u64,
    );
    range(
        "initial_stream_window",
        h.initial_stream_window.0,
        1024,
        i32::MAX as u64,
    );
    range(
        "initial_connection_window",
        h.initial_connection_window.0,
        65_535,
        i32::MAX as u64,
    );
    for (i, u) in h.upgrades.iter().enumerate() {
        let token = !u.is_empty()
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            errors.push(ConfigError::new(
                format!("{at}.upgrades[{i}]"),
                format!("{u:?} is not a protocol name (an HTTP token, e.g. websocket)"),
            ));
        } else if u.eq_ignore_ascii_case("h2c") {
            errors.push(ConfigError::new(
                format!("{at}.upgrades[{i}]"),
                "h2c cannot be forwarded: after the 101 the client would speak HTTP/2 straight \
                 to the backend, past routes and filters (h2c smuggling); weft serves HTTP/2 \
                 itself (prior knowledge or ALPN)",
            ));
        }
    }
    if h.request_headers_timeout.0.is_zero() {
        errors.push(ConfigError::new(
            format!("{at}.request_headers_timeout"),
            "must be greater than 0 (it is the slowloris defence)",
        ));
    }
}

impl Snapshot {
    /// Validates `config` fully and builds its runtime objects; reports every error, located.
    /// Endpoints (and their stats) that `previous` had are kept.
    pub fn build(
        config: Config,
        version: u64,
        previous: Option<&Snapshot>,
        env: BuildEnv<'_>,
    ) -> Result<Snapshot, ConfigErrors> {
        let metrics = env.metrics;
        let mut errors = Vec::new();
        if let Some(n) = config.wasm.pool_instances
            && !(2..=100_000).contains(&n)
        {
            errors.push(ConfigError::new(
                "wasm.pool_instances",
                format!("{n} is out of range (2..=100000)"),
            ));
        }

        let admin = config
            .admin
            .as_ref()
            .and_then(|a| parse_addr("admin.address", &a.address, &mut errors));
        if let (Some(addr), Some(a)) = (admin, &config.admin)
            && !addr.ip().is_loopback()
            && !a.allow_remote
        {
            errors.push(ConfigError::new(
                "admin.address",
                format!(
                    "{addr} is not a loopback address: the admin listener shows the running \
                     configuration and metrics; set admin.allow_remote: true to serve it to \
                     other hosts"
                ),
            ));
        }

        // Clusters first: routes refer to them.
        let mut clusters = Vec::with_capacity(config.clusters.len());
        let mut by_name = ClusterMap::new();
        for (i, c) in config.clusters.iter().enumerate() {
            let prev = previous.and_then(|p| p.clusters.iter().find(|x| *x.name == *c.name));
            let tls = c.tls.as_ref().and_then(|t| {
                let kept = prev
                    .and_then(|p| p.tls.as_ref())
                    .filter(|old| old.same_settings(t, env.base_dir));
                if let Some(old) = kept {
                    return Some(old.clone());
                }
                match TlsClient::build(&c.name, t, env.base_dir, &metrics.tls, env.identity) {
                    Ok(client) => Some(Arc::new(client)),
                    Err(errs) => {
                        for (at, e) in errs {
                            errors.push(ConfigError::new(format!("clusters[{i}].tls.{at}"), e));
                        }
                        None
                    }
                }
            });
            let cluster = Arc::new(Cluster::build(
                i,
                c,
                prev.map(|a| &**a),
                tls,
                metrics,
                env.names,
                &mut errors,
            ));
            if by_name.insert(c.name.clone(), cluster.clone()).is_some() {
                errors.push(ConfigError::new(
                    format!("clusters[{i}].name"),
                    format!("duplicate cluster name {:?}", c.name),
                ));
            }
            clusters.push(cluster);
        }

        let tables: HashMap<&str, Arc<RouteTable>> = config
            .routes
            .iter()
            .map(|(name, routes)| {
                (
                    name.as_str(),
                    Arc::new(RouteTable::build(name, routes, &by_name, &mut errors)),
                )
            })
            .collect();

        let empty = HashMap::new();
        let mut trusted = match crate::wasm::signing::trusted_keys(&config) {
            Ok(k) => k,
            Err(e) => {
                errors.extend(e.into_iter().map(|(at, e)| ConfigError::new(at, e)));
                Vec::new()
            }
        };
        if let Some(id) = env.identity {
            trusted.extend(id.current().module_keys.iter().cloned());
        }
        let filters = crate::wasm::build_filters(
            &config.filters,
            env.base_dir,
            env.wasm,
            previous.map_or(&empty, |p| &p.filters),
            &trusted,
            &mut errors,
        );
        let services = crate::wasm::build_services(
            &config.services,
            &config.filters,
            env.base_dir,
            env.wasm,
            previous.map_or(&HashMap::new(), |p| &p.services),
            &trusted,
            &mut errors,
        );

        let sidecar = crate::sidecar::build(
            &config,
            previous.map_or(&[][..], |p| &p.clusters),
            env,
            &by_name,
            &filters,
            &mut errors,
        );
        clusters.extend(sidecar.clusters.iter().cloned());

        let empty_table = Arc::new(RouteTable::build("", &[], &by_name, &mut errors));
        let mut listeners = HashMap::new();
        let mut addresses = HashSet::new();
        let mut names = HashSet::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            if l.name.is_empty() {
                errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
            } else if !names.insert(l.name.as_str()) {
                errors.push(ConfigError::new(
                    format!("{at}.name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            let address = parse_addr(&format!("{at}.address"), &l.address, &mut errors);
            if let Some(a) = address
                && a.port() != 0
                && !addresses.insert(a)
            {
                errors.push(ConfigError::new(
                    format!("{at}.address"),
                    format!("address {a} is used by another listener"),
                ));
            }
            if admin.is_some_and(|ad| Some(ad) == address && ad.port() != 0) {
                errors.push(ConfigError::new(
                    format!("{at}.address"),
                    "address is the admin listener's",
                ));
            }
            check_http(&format!("{at}.http"), &l.http, &mut errors);
            let tcp = match l.protocol {
                ListenerProtocol::Http => {
                    if l.tcp.is_some() {
                        errors.push(ConfigError::new(
                            format!("{at}.tcp"),
                            "only a listener with protocol: tcp has tcp routes",
                        ));
                    }
                    None
                }
                ListenerProtocol::Tcp => {
                    if !l.routes.is_empty() {
                        errors.push(ConfigError::new(
                            format!("{at}.routes"),
                            "a tcp listener has no HTTP routes (give tcp.routes)",
                        ));
                    }
                    if !l.filters.is_empty() {
                        errors.push(ConfigError::new(
                            format!("{at}.filters"),
                            "Wasm filters run on HTTP listeners only",
                        ));
                    }
                    match &l.tcp {
                        None => {
                            errors.push(ConfigError::new(
                                format!("{at}.tcp"),
                                "a tcp listener needs tcp.routes",
                            ));
                            None
                        }
                        Some(t) => {
                            TcpRuntime::build(&format!("{at}.tcp"), t, &by_name, &mut errors)
                        }
                    }
                }
            };
            let table = match l.protocol {
                ListenerProtocol::Tcp => Some(empty_table.clone()),
                ListenerProtocol::Http => {
                    let table = tables.get(l.routes.as_str()).cloned();
                    if table.is_none() {
                        errors.push(ConfigError::new(
                            format!("{at}.routes"),
                            if l.routes.is_empty() {
                                "an HTTP listener needs a route table".to_owned()
                            } else {
                                format!("unknown route table {:?}", l.routes)
                            },
                        ));
                    }
                    table
                }
            };
            let tls = l.tls.as_ref().and_then(|t| {
                let kept = previous
                    .and_then(|p| p.listeners.get(&l.name))
                    .and_then(|p| p.tls.as_ref())
                    .filter(|old| old.same_settings(t, env.base_dir));
                if let Some(old) = kept {
                    return Some(old.clone());
                }
                let alpn: &[&str] = match l.protocol {
                    ListenerProtocol::Http => &["h2", "http/1.1"],
                    ListenerProtocol::Tcp => &[],
                };
                match TlsServer::build(&l.name, t, alpn, env.base_dir, &metrics.tls, env.identity) {
                    Ok(server) => Some(Arc::new(server)),
                    Err(errs) => {
                        for (at_tls, e) in errs {
                            errors.push(ConfigError::new(format!("{at}.tls.{at_tls}"), e));
                        }
                        None
                    }
                }
            });
            if l.filters.len() > crate::wasm::chain::MAX_CHAIN {
                errors.push(ConfigError::new(
                    format!("{at}.filters"),
                    format!(
                        "{} filters; a listener runs at most {}",
                        l.filters.len(),
                        crate::wasm::chain::MAX_CHAIN
                    ),
                ));
            }
            let mut chain = Vec::with_capacity(l.filters.len());
            for (j, name) in l.filters.iter().enumerate() {
                match filters.get(name) {
                    Some(f) => chain.push(f.clone()),
                    None if config.filters.iter().any(|f| f.name == *name) => {}
                    None => errors.push(ConfigError::new(
                        format!("{at}.filters[{j}]"),
                        format!("unknown filter {name:?}"),
                    )),
                }
            }
            let access_log = l.access_log.as_ref().and_then(|a| {
                if l.protocol != ListenerProtocol::Http {
                    errors.push(ConfigError::new(
                        format!("{at}.access_log"),
                        "access logs are written by HTTP listeners only",
                    ));
                    return None;
                }
                build_access_log(&format!("{at}.access_log"), a, env.base_dir, &mut errors)
            });
            if let (Some(address), Some(table)) = (address, table) {
                let mut runtime = ListenerRuntime::new(l, address, table, chain, metrics);
                runtime.tls = tls;
                runtime.tcp = tcp;
                runtime.access_log = access_log;
                listeners.insert(l.name.clone(), Arc::new(runtime));
            }
        }

        for l in &sidecar.listeners {
            if listeners.insert(l.name.to_string(), l.clone()).is_some() {
                errors.push(ConfigError::new(
                    "sidecar",
                    format!("listener name {:?} is taken", l.name),
                ));
            }
            if addresses.contains(&l.address) {
                errors.push(ConfigError::new(
                    "sidecar",
                    format!("capture address {} is another listener's", l.address),
                ));
            }
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let digest = format!(
            "sha256:{:x}",
            Sha256::digest(serde_json::to_vec(&config).unwrap_or_default())
        );
        Ok(Snapshot {
            version,
            digest,
            admin,
            grace_period: config.drain.grace_period.0,
            config: Arc::new(config),
            listeners,
            clusters,
            filters,
            services,
            sidecar: sidecar.runtime,
        })
    }

    /// Every address to bind: the configured listeners in order, then the capture ports.
    pub fn bindings(&self) -> Vec<Binding> {
        let mut out: Vec<Binding> = self
            .config
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let r = self.listeners.get(&l.name)?;
                Some(Binding {
                    at: format!("listeners[{i}].address"),
                    name: l.name.clone(),
                    address: r.address,
                    max_connections: l.max_connections,
                    max_connections_per_source_ip: l.max_connections_per_source_ip,
                })
            })
            .collect();
        let mut captures: Vec<&Arc<ListenerRuntime>> = self
            .listeners
            .values()
            .filter(|l| l.capture.is_some())
            .collect();
        captures.sort_by(|a, b| a.name.cmp(&b.name));
        for l in captures {
            let at = match l.capture {
                Some(Capture::Outbound) => "sidecar.outbound_port",
                _ => "sidecar.inbound_port",
            };
            out.push(Binding {
                at: at.to_owned(),
                name: l.name.to_string(),
                address: l.address,
                max_connections: l.max_connections,
                max_connections_per_source_ip: l.max_connections_per_source_ip,
            });
        }
        out
    }

    /// The VMs a worker runs for this snapshot: one per distinct VM key of the filters its
    /// listeners use and of its services.
    pub fn vm_keys(&self) -> std::collections::HashSet<&crate::wasm::VmKey> {
        self.listeners
            .values()
            .flat_map(|l| l.filters.iter().map(|f| &f.key))
            .chain(self.services.values().map(|s| &s.plugin.key))
            .collect()
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| &*c.name == name)
    }

    /// Re-reads the certificate files of every TLS listener and cluster that changed (all of
    /// them when `force`); a file that does not load is reported and the old material kept.
    pub fn refresh_tls(&self, force: bool) {
        for l in self.listeners.values() {
            if let Some(t) = &l.tls {
                let _ = t.refresh(force);
            }
        }
        for c in &self.clusters {
            if let Some(t) = &c.tls {
                let _ = t.refresh(force);
            }
        }
    }
}

impl crate::wasm::worker::WasmConfig for Snapshot {
    fn version(&self) -> u64 {
        self.version
    }

    fn plugins(&self) -> Box<dyn Iterator<Item = &Arc<FilterSpec>> + '_> {
        Box::new(
            self.filters
                .values()
                .chain(self.services.values().map(|s| &s.plugin)),
        )
    }

    fn services(&self) -> Box<dyn Iterator<Item = &Arc<ServiceSpec>> + '_> {
        Box::new(self.services.values())
    }

    fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        Snapshot::cluster(self, name)
    }
}

#[cfg(test)]
mod tests;
