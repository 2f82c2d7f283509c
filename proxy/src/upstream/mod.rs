//! Upstreams: clusters of endpoints, the choice of an endpoint, and the connections to them.
//!
//! A [`Cluster`] is shared by every worker; its endpoints carry live stats (shown by
//! `/clusters`) that survive config reloads when the endpoint does. Connections are per worker
//! ([`pool::Pools`]) so a request never waits on another core.

mod lb;
pub mod pool;

pub use pool::{PooledH1, Pools};

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, ConfigError, UpstreamProtocol};
use crate::metrics::{ClusterStats, Metrics};

/// One upstream cluster.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Duration,
    pub endpoints: Vec<Arc<Endpoint>>,
    lb: lb::RoundRobin,
    pub stats: ClusterStats,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// As written in the config (`api.internal:80`), when it was a name.
    pub hostname: Option<String>,
    pub weight: u32,
    pub stats: EndpointStats,
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

/// Counts one request against an endpoint until it ends (dropped without `finish`, it counts
/// as failed).
#[derive(Debug)]
pub struct EndpointGuard {
    endpoint: Arc<Endpoint>,
    done: bool,
}

impl EndpointGuard {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.stats.requests_total.fetch_add(1, Relaxed);
        endpoint.stats.requests_active.fetch_add(1, Relaxed);
        EndpointGuard {
            endpoint,
            done: false,
        }
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

impl Cluster {
    /// Picks the endpoint for the next request, or `None` when the cluster has none.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        self.lb.pick().map(|i| &self.endpoints[i])
    }

    /// Builds `clusters[index]`, resolving host names, and keeping the endpoints (and their
    /// stats) that `previous` had at the same address.
    pub fn build(
        index: usize,
        c: &config::Cluster,
        previous: Option<&Cluster>,
        metrics: &Metrics,
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
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        for (j, e) in c.endpoints.iter().enumerate() {
            let eat = format!("{at}.endpoints[{j}]");
            if e.weight() == 0 {
                errors.push(ConfigError::new(
                    format!("{eat}.weight"),
                    "weight must be at least 1",
                ));
                continue;
            }
            match resolve(e.address()) {
                Ok((addrs, hostname)) => {
                    for address in addrs {
                        if endpoints.iter().any(|x| x.address == address) {
                            errors.push(ConfigError::new(
                                eat.clone(),
                                format!("duplicate endpoint {address}"),
                            ));
                            continue;
                        }
                        let reused = previous.and_then(|p| {
                            p.endpoints
                                .iter()
                                .find(|x| x.address == address && x.weight == e.weight())
                        });
                        endpoints.push(match reused {
                            Some(x) => x.clone(),
                            None => Arc::new(Endpoint {
                                address,
                                hostname: hostname.clone(),
                                weight: e.weight(),
                                stats: EndpointStats::default(),
                            }),
                        });
                    }
                }
                Err(message) => errors.push(ConfigError::new(eat, message)),
            }
        }
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        Cluster {
            name: Arc::from(c.name.as_str()),
            protocol: c.protocol,
            connect_timeout: c.connect_timeout.0,
            max_idle_per_endpoint: c.pool.max_idle_per_endpoint as usize,
            idle_timeout: c.pool.idle_timeout.0,
            lb: lb::RoundRobin::new(&weights),
            endpoints,
            stats: metrics.cluster_stats(&c.name),
        }
    }

    /// A cluster with one endpoint and default settings, for unit tests elsewhere.
    #[cfg(test)]
    pub fn for_tests(name: &str) -> Cluster {
        let c = config::Cluster {
            name: name.into(),
            endpoints: vec![config::Endpoint::Address("127.0.0.1:1".into())],
            lb: Default::default(),
            protocol: Default::default(),
            connect_timeout: config::Dur(Duration::from_secs(1)),
            pool: Default::default(),
        };
        let mut errors = Vec::new();
        Cluster::build(0, &c, None, &Metrics::new(), &mut errors)
    }
}

/// Resolves `host:port`. A literal address is taken as is; a name is looked up once, and its
/// IPv4 addresses are used when it has any (IPv6 otherwise), as Envoy's `V4_PREFERRED` does.
fn resolve(text: &str) -> Result<(Vec<SocketAddr>, Option<String>), String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("invalid endpoint {text:?}: port 0"));
        }
        return Ok((vec![addr], None));
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
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .collect();
    let v4: Vec<SocketAddr> = found.iter().copied().filter(SocketAddr::is_ipv4).collect();
    let mut chosen = if v4.is_empty() { found } else { v4 };
    chosen.dedup();
    if chosen.is_empty() {
        return Err(format!("cannot resolve {text:?}: no addresses"));
    }
    Ok((chosen, Some(text.to_owned())))
}

/// Clusters by name, for the router to resolve references.
pub type ClusterMap = HashMap<String, Arc<Cluster>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_literals_and_names() {
        assert_eq!(
            resolve("127.0.0.1:80").expect("literal").0,
            vec!["127.0.0.1:80".parse::<SocketAddr>().expect("addr")]
        );
        let (addrs, name) = resolve("localhost:80").expect("localhost resolves");
        assert!(addrs.iter().all(|a| a.port() == 80));
        assert_eq!(name.as_deref(), Some("localhost:80"));
        assert!(resolve("nope").is_err());
        assert!(resolve("127.0.0.1:0").is_err());
        assert!(resolve("host:99999").is_err());
    }
}
