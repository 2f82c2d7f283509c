//! Listeners: where weft accepts traffic, and their HTTP limits.

use serde::{Deserialize, Serialize};

use super::{ByteSize, Dur};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name, used in metrics labels and logs.
    pub name: String,
    /// `IP:port` to bind; port 0 picks a free port (logged at start and shown by `/listeners`).
    pub address: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// The route table (a key of `routes`) requests on this listener are matched against
    /// (HTTP listeners).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub routes: String,
    /// TLS termination; none: plain text.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::tls::tls_or_mesh"
    )]
    pub tls: Option<super::ListenerTls>,
    /// Where a `tcp` listener sends its connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<super::TcpProxy>,
    /// Wasm filters (names from `filters`) every request runs through, in order; responses run
    /// through them in reverse order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// HTTP limits and behaviour of this listener.
    #[serde(default)]
    pub http: HttpOptions,
    /// Most downstream connections open at once on this listener (per proxy); beyond it,
    /// new connections are accepted and closed at once. 0 means no limit.
    #[serde(default = "super::defaults::max_connections")]
    pub max_connections: u32,
    /// Most downstream connections open at once from one source IP (per proxy); beyond it,
    /// new connections from that IP are accepted and closed at once. 0 means no limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_connections_per_source_ip: u32,
    /// One JSON line per request to a file (HTTP listeners); none: no access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogConfig>,
}

/// A listener's access log: `access_log: { path: /dev/stdout, headers: [x-tenant] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// The file lines are appended to (created if missing; relative to the configuration's
    /// directory). `/dev/stdout` and `/dev/stderr` work as for Envoy.
    pub path: String,
    /// Request headers logged as fields of their own, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 (prior-knowledge h2c) on the same port.
    #[default]
    Http,
    /// Raw TCP to a cluster (TLS passed through and routed by SNI, or terminated).
    Tcp,
}

/// Per-listener HTTP settings. Defaults follow Envoy's edge recommendations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Most bytes of a request head (request line and headers); beyond it: 431.
    #[serde(default = "super::defaults::max_request_headers_kb")]
    pub max_request_headers_kb: u32,
    /// Most header fields in a request; beyond it: 431 (HTTP/1) or a stream reset (HTTP/2).
    #[serde(default = "super::defaults::max_headers")]
    pub max_headers: u32,
    /// Total time a client gets to send a request head (slowloris defence).
    #[serde(default = "super::defaults::request_headers_timeout")]
    pub request_headers_timeout: Dur,
    /// A downstream connection with no request in flight for this long is closed.
    #[serde(default = "super::defaults::idle_timeout")]
    pub idle_timeout: Dur,
    /// A request whose bodies (either way) move no byte for this long is reset; it bounds
    /// long-lived streams the route's `timeout` (0s) does not. `0s`: no limit.
    #[serde(default = "super::defaults::stream_idle_timeout")]
    pub stream_idle_timeout: Dur,
    /// HTTP/2: most concurrent streams per connection.
    #[serde(default = "super::defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// HTTP/2: initial flow-control window of each stream.
    #[serde(default = "super::defaults::initial_stream_window")]
    pub initial_stream_window: ByteSize,
    /// HTTP/2: initial flow-control window of each connection.
    #[serde(default = "super::defaults::initial_connection_window")]
    pub initial_connection_window: ByteSize,
    /// How the request path is canonicalized before routing and forwarding.
    #[serde(default)]
    pub path: PathOptions,
    /// What to do with header names containing `_` (proxies disagree on them).
    #[serde(default)]
    pub headers_with_underscores: UnderscoreAction,
    /// Protocols a client may upgrade to through this listener (`Upgrade: websocket`), and
    /// `CONNECT` to tunnel to a route's cluster (as Envoy's `upgrade_configs`). Any other
    /// upgrade is refused (403); `h2c` is never forwarded: its upgrade headers are removed and
    /// the request served as HTTP/1.1.
    #[serde(default = "super::defaults::upgrades")]
    pub upgrades: Vec<String>,
}

impl HttpOptions {
    /// Whether a client may upgrade to `protocol` (an `Upgrade` token, with or without its
    /// `/version`).
    pub fn upgrade_allowed(&self, protocol: &str) -> bool {
        let name = protocol.split('/').next().unwrap_or_default().trim();
        !name.is_empty()
            && !name.eq_ignore_ascii_case("connect")
            && self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(name))
    }

    /// Whether `CONNECT` requests are tunneled to their route's cluster.
    pub fn connect_allowed(&self) -> bool {
        self.upgrades
            .iter()
            .any(|u| u.eq_ignore_ascii_case("connect"))
    }
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_request_headers_kb: super::defaults::max_request_headers_kb(),
            max_headers: super::defaults::max_headers(),
            request_headers_timeout: super::defaults::request_headers_timeout(),
            idle_timeout: super::defaults::idle_timeout(),
            stream_idle_timeout: super::defaults::stream_idle_timeout(),
            max_concurrent_streams: super::defaults::max_concurrent_streams(),
            initial_stream_window: super::defaults::initial_stream_window(),
            initial_connection_window: super::defaults::initial_connection_window(),
            path: PathOptions::default(),
            headers_with_underscores: UnderscoreAction::default(),
            upgrades: super::defaults::upgrades(),
        }
    }
}

/// Path canonicalization: one view of the path used for routing, by filters, and upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathOptions {
    /// RFC 3986 normalization: resolve `.` and `..` segments, decode percent-encoded
    /// unreserved characters, upper-case the remaining percent-encodings.
    #[serde(default = "super::defaults::yes")]
    pub normalize: bool,
    /// Collapse runs of `/` into one.
    #[serde(default = "super::defaults::yes")]
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
    Allow,
    /// Answer 400.
    Reject,
    /// Remove such headers before filters, routing and forwarding (as nginx does): a backend
    /// that reads `x_user` as `x-user` cannot be fed a value the proxy never checked.
    #[default]
    Drop,
}
