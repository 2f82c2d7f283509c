//! A `tcp` listener's routes, checked when a snapshot is built: by TLS server name, or a
//! catch-all, to a cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, TcpProxy};
use crate::tls::files::name_matches;
use crate::upstream::Cluster;

#[derive(Debug)]
pub struct TcpTarget {
    /// Lower case; empty: any connection.
    pub server_names: Vec<String>,
    pub cluster: Arc<Cluster>,
}

/// A `tcp` listener's routing, checked.
#[derive(Debug)]
pub struct TcpRuntime {
    pub routes: Vec<TcpTarget>,
    pub idle_timeout: Option<Duration>,
    pub client_hello_timeout: Duration,
    /// Some route matches on SNI: read it from the ClientHello when TLS is not terminated.
    pub inspect_sni: bool,
}

impl TcpRuntime {
    pub fn build(
        at: &str,
        t: &TcpProxy,
        clusters: &HashMap<String, Arc<Cluster>>,
        errors: &mut Vec<ConfigError>,
    ) -> Option<TcpRuntime> {
        let before = errors.len();
        if t.routes.is_empty() {
            errors.push(ConfigError::new(
                format!("{at}.routes"),
                "a tcp listener needs at least one route",
            ));
        }
        if t.client_hello_timeout.0.is_zero() {
            errors.push(ConfigError::new(
                format!("{at}.client_hello_timeout"),
                "must be greater than 0",
            ));
        }
        let mut routes = Vec::new();
        for (i, r) in t.routes.iter().enumerate() {
            for (j, n) in r.server_names.iter().enumerate() {
                let bare = n.strip_prefix("*.").unwrap_or(n);
                let valid = !bare.is_empty()
                    && bare.len() <= 253
                    && bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !valid {
                    errors.push(ConfigError::new(
                        format!("{at}.routes[{i}].server_names[{j}]"),
                        format!("invalid server name {n:?}: expected a DNS name or *.suffix"),
                    ));
                }
            }
            match clusters.get(&r.cluster) {
                Some(c) => routes.push(TcpTarget {
                    server_names: r
                        .server_names
                        .iter()
                        .map(|n| n.to_ascii_lowercase())
                        .collect(),
                    cluster: c.clone(),
                }),
                None => errors.push(ConfigError::new(
                    format!("{at}.routes[{i}].cluster"),
                    format!("unknown cluster {:?}", r.cluster),
                )),
            }
        }
        if errors.len() > before {
            return None;
        }
        Some(TcpRuntime {
            inspect_sni: routes.iter().any(|r| !r.server_names.is_empty()),
            routes,
            idle_timeout: t.idle_timeout.non_zero(),
            client_hello_timeout: t.client_hello_timeout.0,
        })
    }

    /// The first route that takes a connection with this SNI.
    pub fn route(&self, sni: Option<&str>) -> Option<&TcpTarget> {
        self.routes.iter().find(|r| {
            r.server_names.is_empty()
                || sni.is_some_and(|s| r.server_names.iter().any(|p| name_matches(p, s)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_server_name_then_catch_all() {
        let cluster = Arc::new(Cluster::for_tests("a"));
        let t = TcpRuntime {
            routes: vec![
                TcpTarget {
                    server_names: vec!["a.example".into(), "*.b.example".into()],
                    cluster: cluster.clone(),
                },
                TcpTarget {
                    server_names: vec![],
                    cluster: Arc::new(Cluster::for_tests("fallback")),
                },
            ],
            idle_timeout: None,
            client_hello_timeout: Duration::from_secs(1),
            inspect_sni: true,
        };
        let name = |sni| t.route(sni).map(|r| r.cluster.name.to_string());
        assert_eq!(name(Some("a.example")).as_deref(), Some("a"));
        assert_eq!(name(Some("x.b.example")).as_deref(), Some("a"));
        assert_eq!(name(Some("b.example")).as_deref(), Some("fallback"));
        assert_eq!(name(None).as_deref(), Some("fallback"));
    }
}
