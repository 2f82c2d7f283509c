//! The respond stage: what a request is answered with ([`Answer`], from whichever stage), every
//! proxy-generated error turned into the response the client reads (one place for all of
//! them), and the response handed back with the request's [`Record`] tied to its body.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Response, StatusCode, header};

use crate::errors::{ERROR_HEADER, ProxyError, percent_encode};
use crate::http::body::ResponseBody;
use crate::http::conn::ConnCtx;
use crate::http::record::{Logged, Record};
use crate::metrics::RouteStats;
use crate::snapshot::ListenerRuntime;
use crate::upstream::EndpointGuard;
use crate::wasm::chain::Chain;

/// The answer to one request, with what its end must record.
pub struct Answer {
    pub resp: Response<ResponseBody>,
    pub stats: Arc<RouteStats>,
    pub endpoint: Option<EndpointGuard>,
}

impl Answer {
    /// An answer the proxy made itself (no upstream).
    pub fn local(resp: Response<ResponseBody>, stats: &Arc<RouteStats>) -> Answer {
        Answer {
            resp,
            stats: stats.clone(),
            endpoint: None,
        }
    }
}

/// An error a stage ended a request with, and the route statistics it counts against (none
/// before a route matched: the listener's `no_route` ones).
#[derive(Debug)]
pub struct StageError {
    pub error: ProxyError,
    pub stats: Option<Arc<RouteStats>>,
}

impl StageError {
    pub fn new(error: ProxyError) -> StageError {
        StageError { error, stats: None }
    }

    pub fn on(error: ProxyError, stats: &Arc<RouteStats>) -> StageError {
        StageError {
            error,
            stats: Some(stats.clone()),
        }
    }
}

impl From<ProxyError> for StageError {
    fn from(error: ProxyError) -> StageError {
        StageError::new(error)
    }
}

/// The response for an answer, with the request's record tied to the end of its body.
pub fn finish(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    answer: Answer,
    start: Instant,
    filters: Option<Rc<Chain>>,
    mut logged: Option<Box<Logged>>,
) -> Response<ResponseBody> {
    let Answer {
        mut resp,
        stats,
        endpoint,
    } = answer;
    let status = resp.status().as_u16();
    if let Some(l) = &mut logged {
        l.entry.upstream = endpoint.as_ref().map(|e| e.address());
        // A gRPC answer in headers only (trailers-only); trailers replace it later.
        l.entry.grpc_status = resp.headers().get("grpc-status").cloned();
    }
    resp.body_mut().attach(Record {
        start,
        status,
        stats,
        downstream_tx: listener.stats.tx_bytes.clone(),
        activity: conn.activity.clone(),
        endpoint,
        filters,
        logged,
        body_sent: 0,
    });
    resp
}

/// The answer for an error a stage ended a request with: counted, logged, and answered.
pub fn error_answer(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    failed: StageError,
    http1: bool,
    grpc: bool,
) -> Answer {
    let StageError { error, stats } = failed;
    listener.stats.error(error.cause());
    tracing::debug!(listener = %listener.name, peer = %conn.peer, %error, "proxy error");
    let mut resp = respond(&error, grpc);
    if http1 && error.closes_connection() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Answer {
        resp,
        stats: stats.unwrap_or_else(|| listener.no_route.clone()),
        endpoint: None,
    }
}

/// `307` to the canonical path (`escaped_slashes: unescape_and_redirect`).
pub fn canonical_redirect(listener: &ListenerRuntime, location: &str) -> Answer {
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Answer::local(resp, &listener.no_route)
}

/// Builds the response for an error: for a gRPC client a gRPC "trailers-only" answer (HTTP 200,
/// `grpc-status`, `grpc-message`), otherwise a plain one.
pub fn respond(err: &ProxyError, grpc: bool) -> Response<ResponseBody> {
    if grpc {
        let mut resp = Response::new(ResponseBody::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(err.grpc_status())),
        );
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&err.public_message())) {
            h.insert("grpc-message", v);
        }
        h.insert(ERROR_HEADER, HeaderValue::from_static(err.cause()));
        return resp;
    }
    let mut body = err.public_message();
    body.push('\n');
    let mut resp = Response::new(ResponseBody::full(body.into()));
    *resp.status_mut() = err.status();
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(err.cause()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_clients_get_grpc_errors() {
        let r = respond(&ProxyError::UpstreamTimeout(Duration::from_secs(1)), true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["grpc-message"], "upstream request timeout");
        assert_eq!(r.headers()[ERROR_HEADER], "upstream_timeout");
    }

    #[test]
    fn refused_connect_is_503_with_cause() {
        let e = ProxyError::ConnectFailed {
            addr: "127.0.0.1:1".parse().expect("addr"),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let r = respond(&e, false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "upstream_connect_failed");
    }
}
