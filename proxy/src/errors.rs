//! Every error the proxy answers for itself, and the one place that turns them into responses.
//!
//! A proxy-generated response carries `x-weft-error: <cause>` so a client (or an operator reading
//! an access log) can tell a proxy failure from an upstream's answer. The body says what failed
//! in plain words, without internal addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, header};

/// Any error a body or a connection task passes on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The name of the header naming the cause of a proxy-generated response.
pub const ERROR_HEADER: &str = "x-weft-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matched the request")]
    NoRoute,
    #[error("the request path is not acceptable: {0}")]
    InvalidPath(&'static str),
    #[error("header names with underscores are not accepted: {0:?}")]
    UnderscoreHeader(String),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("the request has {0} header fields, more than max_headers")]
    TooManyHeaders(usize),
    #[error("cluster {0:?} has no endpoint to send to")]
    NoHealthyUpstream(Arc<str>),
    #[error("connecting to {addr} failed: {source}")]
    ConnectFailed {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("TLS handshake with {addr} failed ({reason}): {source}")]
    UpstreamTls {
        addr: SocketAddr,
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the upstream connection failed before a response: {0}")]
    UpstreamReset(#[source] BoxError),
    #[error("the request body could not be read from the client: {0}")]
    DownstreamBody(#[source] BoxError),
    #[error("the upstream sent no response headers within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("the upgrade cannot be proxied: {0}")]
    UpgradeNotSupported(&'static str),
    #[error("this listener does not allow {0:?} (see http.upgrades)")]
    UpgradeNotAllowed(String),
    #[error("cluster {cluster:?} is at its {breaker} limit")]
    Overflow {
        cluster: Arc<str>,
        breaker: &'static str,
    },
    #[error("filter {0:?} failed")]
    FilterFailed(Arc<str>),
    #[error("filter {0:?} paused the request and did not continue it in time")]
    FilterTimeout(Arc<str>),
    #[error("filter {0:?} buffered more request body than its limit")]
    RequestBodyTooLarge(Arc<str>),
    #[error("filter {0:?} buffered more response body than its limit")]
    ResponseBodyTooLarge(Arc<str>),
    #[error("the filters left an invalid request: {0}")]
    FilterOutput(&'static str),
    #[error(
        "cluster {0:?} speaks HTTP/1.1 and gRPC needs HTTP/2: set `protocol: http2` on the cluster"
    )]
    GrpcNeedsHttp2(Arc<str>),
}

/// A stream a filter closed: the downstream sees a reset (HTTP/2) or a closed connection
/// (HTTP/1.1), never a response.
#[derive(Debug, thiserror::Error)]
#[error("a filter closed the stream")]
pub struct StreamReset;

impl ProxyError {
    /// The status sent downstream.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::TooManyHeaders(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::InvalidPath(_)
            | ProxyError::UnderscoreHeader(_)
            | ProxyError::BadRequest(_)
            | ProxyError::DownstreamBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoHealthyUpstream(_)
            | ProxyError::ConnectFailed { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::UpstreamTls { .. }
            | ProxyError::Overflow { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Handshake { .. } | ProxyError::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpgradeNotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::UpgradeNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::FilterFailed(_)
            | ProxyError::ResponseBodyTooLarge(_)
            | ProxyError::FilterOutput(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::GrpcNeedsHttp2(_) => StatusCode::BAD_GATEWAY,
            ProxyError::FilterTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestBodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The `x-weft-error` value (also the `cause` label of `weft_http_proxy_errors_total`).
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::InvalidPath(_) => "invalid_path",
            ProxyError::UnderscoreHeader(_) => "invalid_header",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::TooManyHeaders(_) => "header_fields_too_large",
            ProxyError::NoHealthyUpstream(_) => "no_healthy_upstream",
            ProxyError::ConnectFailed { .. } => "upstream_connect_failed",
            ProxyError::ConnectTimeout(_) => "upstream_connect_timeout",
            ProxyError::UpstreamTls { .. } => "upstream_tls_failed",
            ProxyError::Handshake { .. } => "upstream_protocol_error",
            ProxyError::UpstreamReset(_) => "upstream_reset",
            ProxyError::DownstreamBody(_) => "bad_request_body",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpgradeNotSupported(_) => "upgrade_not_supported",
            ProxyError::UpgradeNotAllowed(_) => "upgrade_not_allowed",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::FilterFailed(_) => "filter_failed",
            ProxyError::FilterTimeout(_) => "filter_timeout",
            ProxyError::RequestBodyTooLarge(_) => "request_body_too_large",
            ProxyError::ResponseBodyTooLarge(_) => "response_body_too_large",
            ProxyError::FilterOutput(_) => "filter_invalid_request",
            ProxyError::GrpcNeedsHttp2(_) => "upstream_protocol_mismatch",
        }
    }

    /// The gRPC status a gRPC client gets instead (the gRPC spec's HTTP mapping, with the
    /// deadline case made precise).
    pub fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::NoRoute | ProxyError::UpgradeNotSupported(_) => 12, // UNIMPLEMENTED
            ProxyError::UpgradeNotAllowed(_) => 7,                          // PERMISSION_DENIED
            ProxyError::TooManyHeaders(_) => 8,                             // RESOURCE_EXHAUSTED
            ProxyError::UpstreamTimeout(_) | ProxyError::FilterTimeout(_) => 4, // DEADLINE_EXCEEDED
            ProxyError::RequestBodyTooLarge(_) | ProxyError::ResponseBodyTooLarge(_) => 8, // RESOURCE_EXHAUSTED
            ProxyError::FilterFailed(_)
            | ProxyError::FilterOutput(_)
            | ProxyError::GrpcNeedsHttp2(_) => 13, // INTERNAL
            ProxyError::NoHealthyUpstream(_)
            | ProxyError::ConnectFailed { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::UpstreamTls { .. }
            | ProxyError::Handshake { .. }
            | ProxyError::UpstreamReset(_)
            | ProxyError::Overflow { .. } => 14, // UNAVAILABLE
            ProxyError::InvalidPath(_)
            | ProxyError::UnderscoreHeader(_)
            | ProxyError::BadRequest(_)
            | ProxyError::DownstreamBody(_) => 13, // INTERNAL
        }
    }

    /// Whether the downstream HTTP/1 connection must close after this answer: the request was
    /// malformed, so nothing after it on the connection can be trusted.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_) | ProxyError::DownstreamBody(_)
        )
    }

    /// What the client reads: the failure in plain words, no internal addresses.
    pub fn public_message(&self) -> String {
        match self {
            ProxyError::NoRoute => "no route matched the request".into(),
            ProxyError::NoHealthyUpstream(_) => "no healthy upstream".into(),
            ProxyError::TooManyHeaders(_) => "too many header fields".into(),
            ProxyError::ConnectFailed { source, .. } => {
                format!("upstream connect error: {}", io_reason(source))
            }
            ProxyError::ConnectTimeout(_) => "upstream connect timeout".into(),
            ProxyError::UpstreamTls { reason, .. } => format!("upstream TLS error: {reason}"),
            ProxyError::Handshake { .. } => "upstream protocol error".into(),
            ProxyError::UpstreamReset(_) => "upstream reset before response".into(),
            ProxyError::DownstreamBody(_) => "malformed or interrupted request body".into(),
            ProxyError::Overflow { .. } => "upstream overflow".into(),
            ProxyError::UpstreamTimeout(_) => "upstream request timeout".into(),
            ProxyError::FilterFailed(_) => "filter failed".into(),
            ProxyError::FilterTimeout(_) => "filter timeout".into(),
            ProxyError::RequestBodyTooLarge(_) => "request body too large".into(),
            ProxyError::ResponseBodyTooLarge(_) => "response body too large".into(),
            other => other.to_string(),
        }
    }
}

fn io_reason(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused",
        ConnectionReset => "connection reset",
        HostUnreachable | NetworkUnreachable => "unreachable",
        AddrNotAvailable => "address not available",
        _ => "connection failure",
    }
}

impl ProxyError {
    /// Classifies a failed upstream exchange: the request body failing to come from the client
    /// is the client's fault, anything else the upstream's.
    pub fn upstream(e: hyper::Error) -> ProxyError {
        if e.is_user() {
            ProxyError::DownstreamBody(Box::new(e))
        } else {
            ProxyError::UpstreamReset(Box::new(e))
        }
    }
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest as `%XX`.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is gRPC (its errors are answered the gRPC way).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
