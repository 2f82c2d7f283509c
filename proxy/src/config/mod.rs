//! The configuration model: what `weft.yaml` (and, later, the control plane) says.
//!
//! Config is data: this module only describes its shape (serde, unknown fields rejected) and
//! parses it. [`crate::snapshot::Snapshot::build`] validates it fully — every error located by
//! its path — and turns it into the runtime objects the proxy serves from.

mod cluster;
mod filter;
mod listener;
mod route;
mod sidecar;
mod tls;
mod types;

pub use cluster::*;
pub use filter::*;
pub use listener::*;
pub use route::*;
pub use sidecar::*;
pub use tls::*;
pub use types::{ByteSize, Dur, OneOrMany};

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole configuration of one proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin listener (`/ready`, `/metrics`, `/config`, `/clusters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    /// Where the proxy accepts traffic.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Route tables by name; a listener names the table it routes with.
    #[serde(default)]
    pub routes: BTreeMap<String, Vec<Route>>,
    /// Upstream clusters routes send to.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// Wasm filters listeners may run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Wasm services: modules that run on their own, with no request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Sidecar mode: capture ports, the workload's ports, inbound mTLS mode, egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<Sidecar>,
    /// The mesh's service registry a sidecar routes outbound connections by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mesh_services: Vec<MeshService>,
    /// How the proxy stops.
    #[serde(default)]
    pub drain: Drain,
    /// The Wasm runtime's capacity.
    #[serde(default, skip_serializing_if = "WasmOptions::is_default")]
    pub wasm: WasmOptions,
    /// Public keys (`ed25519:<base64>`) filter modules must be signed by; empty: signatures
    /// are not required. A proxy enrolled with a control plane that requires signatures also
    /// trusts that control plane's keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub module_trust: Vec<String>,
}

/// A module a configuration names, with where it is named (`filters[2]`, `services[0]`).
#[derive(Debug, Clone, Copy)]
pub struct ModuleUse<'a> {
    pub at: &'a str,
    pub index: usize,
    pub name: &'a str,
    pub module: &'a str,
    pub signature: Option<&'a ModuleSignature>,
}

impl Config {
    /// Every module use of the configuration: its filters', then its services'.
    pub fn module_uses(&self) -> impl Iterator<Item = ModuleUse<'_>> {
        let filters = self.filters.iter().enumerate().map(|(index, f)| ModuleUse {
            at: "filters",
            index,
            name: &f.name,
            module: &f.module,
            signature: f.signature.as_ref(),
        });
        let services = self
            .services
            .iter()
            .enumerate()
            .map(|(index, s)| ModuleUse {
                at: "services",
                index,
                name: &s.name,
                module: &s.module,
                signature: s.signature.as_ref(),
            });
        filters.chain(services)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmOptions {
    /// Filter VMs that can exist at once (each worker runs one VM per filter, and a reload
    /// briefly keeps the old ones); fixed at start. Default: planned from the configuration
    /// at start, at least 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_instances: Option<u32>,
}

impl WasmOptions {
    fn is_default(&self) -> bool {
        *self == WasmOptions::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `IP:port` of the admin listener; port 0 picks a free port (logged at start). It must be
    /// a loopback address unless `allow_remote` says otherwise.
    pub address: String,
    /// Serve the admin listener on an address other hosts can reach (it shows the running
    /// configuration and metrics, and says when the proxy drains).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_remote: bool,
    /// `/config` shows filter configurations and header-edit values as they are, instead of
    /// `<redacted>` (they may hold keys and tokens).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub show_secrets: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// On SIGTERM, how long in-flight requests get to finish before connections are closed.
    #[serde(default = "defaults::grace_period")]
    pub grace_period: Dur,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            grace_period: defaults::grace_period(),
        }
    }
}

mod defaults {
    use super::{ByteSize, Dur};
    use std::time::Duration;

    pub fn yes() -> bool {
        true
    }
    pub fn grace_period() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }
    pub fn max_connections() -> u32 {
        10_000
    }
    pub fn max_request_headers_kb() -> u32 {
        60
    }
    pub fn max_headers() -> u32 {
        100
    }
    pub fn request_headers_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn stream_idle_timeout() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn idle_timeout() -> Dur {
        Dur(Duration::from_secs(3600))
    }
    pub fn max_concurrent_streams() -> u32 {
        100
    }
    pub fn initial_stream_window() -> ByteSize {
        ByteSize(64 * 1024)
    }
    pub fn initial_connection_window() -> ByteSize {
        ByteSize(1024 * 1024)
    }
    pub fn route_timeout() -> Dur {
        Dur(Duration::from_secs(15))
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn redirect_code() -> u16 {
        301
    }
}

/// One thing wrong with a configuration, located by its path in the document
/// (`routes.main[1].to[0].cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl Config {
    /// Parses a YAML document. Only the shape is checked here; see
    /// [`crate::snapshot::Snapshot::build`] for validation.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let location = e
                .location()
                .map(|l| format!("line {}, column {}", l.line(), l.column()))
                .unwrap_or_default();
            // serde_yaml_ng repeats " at line X column Y" inside the message; we say it first,
            // once.
            let message = strip_locations(&e.to_string());
            ConfigError::new(location, message).into()
        })
    }

    /// Reads and parses a YAML file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::from(ConfigError::new(
                path.display().to_string(),
                format!("cannot read: {e}"),
            ))
        })?;
        Config::from_yaml(&text).map_err(|ConfigErrors(errors)| {
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|e| {
                        let at = if e.path.is_empty() {
                            path.display().to_string()
                        } else {
                            format!("{}: {}", path.display(), e.path)
                        };
                        ConfigError::new(at, e.message)
                    })
                    .collect(),
            )
        })
    }
}

/// Removes every ` at line N column M` from a parser message.
fn strip_locations(message: &str) -> String {
    static AT: std::sync::LazyLock<Option<regex::Regex>> =
        std::sync::LazyLock::new(|| regex::Regex::new(r" at line \d+ column \d+").ok());
    match &*AT {
        Some(re) => re.replace_all(message, "").into_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_locations_are_said_once() {
        assert_eq!(
            strip_locations(
                "found unexpected end of stream at line 5 column 1, while scanning a quoted scalar at line 3 column 14"
            ),
            "found unexpected end of stream, while scanning a quoted scalar"
        );
        assert_eq!(strip_locations("plain"), "plain");
        assert_eq!(strip_locations("x at line one"), "x at line one");
    }

    #[test]
    fn design_example_shape_parses() {
        let yaml = r#"
admin: { address: 127.0.0.1:9901 }
listeners:
  - name: main
    address: 127.0.0.1:8080
    protocol: http
    routes: main
routes:
  main:
    - match: { path_prefix: /api/, headers: { x-canary: "1" } }
      to: [{ cluster: api-v2 }]
    - match: { path_prefix: / }
      to: [{ cluster: api-v1, weight: 90 }, { cluster: api-v2, weight: 10 }]
      timeout: 2s
clusters:
  - name: api-v1
    endpoints: [127.0.0.1:9000, { address: 127.0.0.1:9001, weight: 3 }]
  - name: api-v2
    endpoints: [localhost:9002]
    protocol: http2
"#;
        let c = Config::from_yaml(yaml).expect("parses");
        assert_eq!(c.listeners[0].name, "main");
        assert_eq!(c.routes["main"].len(), 2);
        assert_eq!(c.routes["main"][1].timeout.0.as_secs(), 2);
        assert_eq!(
            c.routes["main"][0].matcher.headers["x-canary"],
            ValueMatch::Exact("1".into())
        );
        assert_eq!(c.clusters[0].endpoints[1].weight(), 3);
        assert_eq!(c.clusters[1].protocol, UpstreamProtocol::Http2);
    }

    #[test]
    fn unknown_field_is_located() {
        let e = Config::from_yaml("listeners:\n  - name: a\n    adress: x\n").expect_err("invalid");
        let text = e.to_string();
        assert!(
            text.starts_with("line 3, column 5: listeners[0]: unknown field `adress`"),
            "{text}"
        );
    }

    #[test]
    fn round_trips_through_json() {
        let c = Config::from_yaml("clusters: [{name: a, endpoints: [\"127.0.0.1:1\"]}]\n")
            .expect("parses");
        let json = serde_json::to_string(&c).expect("serializes");
        let back: Config = serde_json::from_str(&json).expect("parses back");
        assert_eq!(c, back);
    }
}
