//! Routes: what a request must look like, and what to do with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ByteSize, Dur, OneOrMany};

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
    #[serde(default = "super::defaults::route_timeout")]
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
    /// When and how a failed try is retried.
    #[serde(default)]
    pub retries: Retries,
}

/// A route's retry policy. Each retry goes to another endpoint when there is one, after an
/// exponential back-off with jitter, within the cluster's retry budget and circuit breakers,
/// and never past the route's `timeout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (0: none).
    #[serde(default = "retry_defaults::attempts")]
    pub attempts: u32,
    /// What is retried.
    #[serde(default = "retry_defaults::on")]
    pub on: Vec<RetryOn>,
    /// Response statuses retried (with `retriable-status-codes` implied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Time each try gets for response headers (0s: only the route's `timeout`).
    #[serde(default)]
    pub per_try_timeout: Dur,
    #[serde(default)]
    pub backoff: Backoff,
    /// A request body is kept up to this size so it can be sent again; a longer one is not
    /// retried once its sending began.
    #[serde(default = "retry_defaults::replay_buffer")]
    pub replay_buffer: ByteSize,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: retry_defaults::attempts(),
            on: retry_defaults::on(),
            status_codes: Vec::new(),
            per_try_timeout: Dur::default(),
            backoff: Backoff::default(),
            replay_buffer: retry_defaults::replay_buffer(),
        }
    }
}

/// Conditions a try is retried on (Envoy's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection to the endpoint could not be made (the request was not sent).
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM (the request was not processed).
    RefusedStream,
    /// The connection failed before response headers, or the try timed out.
    Reset,
    /// Any 5xx response, and everything `reset` and `connect-failure` cover.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504 responses, and everything `reset` and `connect-failure` cover.
    GatewayError,
    /// The statuses in `status_codes`.
    RetriableStatusCodes,
    /// gRPC statuses (from `grpc-status` in response headers).
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

/// Exponential back-off with full jitter: try n waits a random time up to
/// `min(base × 2^(n-1), max)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "retry_defaults::backoff_base")]
    pub base: Dur,
    #[serde(default = "retry_defaults::backoff_max")]
    pub max: Dur,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: retry_defaults::backoff_base(),
            max: retry_defaults::backoff_max(),
        }
    }
}

mod retry_defaults {
    use super::{ByteSize, Dur, RetryOn};
    use std::time::Duration;

    pub fn attempts() -> u32 {
        2
    }
    pub fn on() -> Vec<RetryOn> {
        vec![RetryOn::ConnectFailure, RetryOn::RefusedStream]
    }
    pub fn backoff_base() -> Dur {
        Dur(Duration::from_millis(25))
    }
    pub fn backoff_max() -> Dur {
        Dur(Duration::from_millis(250))
    }
    pub fn replay_buffer() -> ByteSize {
        ByteSize(64 * 1024)
    }
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
    #[serde(default = "super::defaults::weight")]
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
    #[serde(default = "super::defaults::redirect_code")]
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
