//! The configuration model: what `weft.yaml` (and, later, the control plane) says.
//!
//! Config is data: this module only describes its shape (serde, unknown fields rejected) and
//! parses it. [`crate::snapshot::Snapshot::build`] validates it fully — every error located by
//! its path — and turns it into the runtime objects the proxy serves from.

mod types;

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
    /// How the proxy stops.
    #[serde(default)]
    pub drain: Drain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `IP:port` of the admin listener; port 0 picks a free port (logged at start).
    pub address: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name, used in metrics labels and logs.
    pub name: String,
    /// `IP:port` to bind; port 0 picks a free port (logged at start and shown by `/listeners`).
    pub address: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// The route table (a key of `routes`) requests on this listener are matched against.
    pub routes: String,
    /// HTTP limits and behaviour of this listener.
    #[serde(default)]
    pub http: HttpOptions,
    /// Most downstream connections open at once on this listener (per proxy); beyond it,
    /// new connections are accepted and closed at once. 0 means no limit.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 (prior-knowledge h2c) on the same port.
    #[default]
    Http,
}

/// Per-listener HTTP settings. Defaults follow Envoy's edge recommendations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Most bytes of a request head (request line and headers); beyond it: 431.
    #[serde(default = "defaults::max_request_headers_kb")]
    pub max_request_headers_kb: u32,
    /// Most header fields in a request; beyond it: 431 (HTTP/1) or a stream reset (HTTP/2).
    #[serde(default = "defaults::max_headers")]
    pub max_headers: u32,
    /// Total time a client gets to send a request head (slowloris defence).
    #[serde(default = "defaults::request_headers_timeout")]
    pub request_headers_timeout: Dur,
    /// A downstream connection with no request in flight for this long is closed.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Dur,
    /// HTTP/2: most concurrent streams per connection.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// HTTP/2: initial flow-control window of each stream.
    #[serde(default = "defaults::initial_stream_window")]
    pub initial_stream_window: ByteSize,
    /// HTTP/2: initial flow-control window of each connection.
    #[serde(default = "defaults::initial_connection_window")]
    pub initial_connection_window: ByteSize,
    /// How the request path is canonicalized before routing and forwarding.
    #[serde(default)]
    pub path: PathOptions,
    /// What to do with header names containing `_` (proxies disagree on them).
    #[serde(default)]
    pub headers_with_underscores: UnderscoreAction,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_request_headers_kb: defaults::max_request_headers_kb(),
            max_headers: defaults::max_headers(),
            request_headers_timeout: defaults::request_headers_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_concurrent_streams: defaults::max_concurrent_streams(),
            initial_stream_window: defaults::initial_stream_window(),
            initial_connection_window: defaults::initial_connection_window(),
            path: PathOptions::default(),
            headers_with_underscores: UnderscoreAction::default(),
        }
    }
}

/// Path canonicalization: one view of the path used for routing, by filters, and upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathOptions {
    /// RFC 3986 normalization: resolve `.` and `..` segments, decode percent-encoded
    /// unreserved characters, upper-case the remaining percent-encodings.
    #[serde(default = "defaults::yes")]
    pub normalize: bool,
    /// Collapse runs of `/` into one.
    #[serde(default = "defaults::yes")]
    pub merge_slashes: bool,
    /// What to do with `%2F` and `%5C` (encoded `/` and `\`) in a path.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathOptions {
    fn default() -> Self {
        PathOptions {
            normalize: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Forward them as they are (they do not separate segments for routing).
    Keep,
    /// Answer 400: a backend that decodes them could see another path than the router did.
    #[default]
    Reject,
    /// Decode them to `/` and `\`, then redirect the client to the canonical path.
    UnescapeAndRedirect,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreAction {
    #[default]
    Allow,
    /// Answer 400.
    Reject,
    /// Remove such headers before routing and forwarding.
    Drop,
}

/// One route: a match and what to do with the requests it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name used in metrics and logs; defaults to `<table>[<index>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, all of which must hold. An empty match matches every request.
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    /// Forward to these clusters, split by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<WeightedCluster>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Answer with this response instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    /// Time the upstream gets to send response headers; then 504. `0s` disables it.
    #[serde(default = "defaults::route_timeout")]
    pub timeout: Dur,
    /// Replace the matched `path_prefix` (or the whole `path`) with this before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Replace the `Host` / `:authority` sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rewrite: Option<String>,
    /// Header edits on the request sent upstream.
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    /// Header edits on the response sent downstream (also on redirects and direct responses).
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Host (authority without port): exact, `*.suffix`, or `*`; one or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<OneOrMany<String>>,
    /// The path equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The whole path matches this regular expression (RE2 syntax, anchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// The method is this one (or one of these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<OneOrMany<String>>,
    /// Request headers, by name: a string is an exact match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, ValueMatch>,
    /// Query parameters, by name: a string is an exact match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, ValueMatch>,
}

/// How a header or query parameter value must look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a string (exact match) or a map with one of `exact`, `prefix`, `regex`, `present`"
)]
pub enum ValueMatch {
    Exact(String),
    Rule(ValueRule),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Anchored regular expression over the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: present with any value; `false`: absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub cluster: String,
    /// Relative share of the requests (default 1).
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`; default: the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Default: the request's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Default: the request's port (none when it had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replace the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replace the matched `path_prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default = "defaults::redirect_code")]
    pub code: u16,
    /// Drop the query string.
    #[serde(default)]
    pub strip_query: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Header edits: `set` replaces, `add` appends, `remove` deletes; applied remove → set → add.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// `IP:port` or `host:port` (resolved when the config is applied), or `{address, weight}`.
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub lb: LbPolicy,
    /// The HTTP version spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time a TCP connect to an endpoint may take; then the request fails with 503.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default)]
    pub pool: PoolOptions,
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
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// The version the downstream request arrived with (gRPC over h2 stays h2).
    #[default]
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

mod defaults {
    use super::{ByteSize, Dur};
    use std::time::Duration;

    pub fn yes() -> bool {
        true
    }
    pub fn grace_period() -> Dur {
        Dur(Duration::from_secs(10))
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
    pub fn connect_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn max_idle_per_endpoint() -> u32 {
        128
    }
    pub fn pool_idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
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
