//! The life of one request, top to bottom: check and canonicalize it, route it, then answer it
//! locally (redirect, direct response, error) or forward it upstream and stream the response
//! back. Every proxy-generated error goes through [`crate::http::respond::respond`].

use std::borrow::Cow;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::errors::{self, ProxyError, StreamReset};
use crate::http::body::{DownstreamBody, Exchange, ResponseBody};
use crate::http::path::{self, Canonical};
use crate::http::server::ConnActivity;
use crate::metrics::RouteStats;
use crate::router::{Action, RedirectFrom, RequestView};
use crate::snapshot::ListenerRuntime;
use crate::upstream::{EndpointGuard, PooledH1};
use crate::wasm::chain::Chain;
use crate::worker::Worker;

/// What every request on one downstream connection shares.
pub struct ConnCtx {
    pub worker: Rc<Worker>,
    /// The listener as it was when the connection was accepted; requests use the current
    /// snapshot's listener of the same name, and this one only if it was removed since.
    pub listener: Arc<ListenerRuntime>,
    pub peer: SocketAddr,
    /// `peer`'s IP as a header value, for `x-forwarded-for`.
    pub peer_header: HeaderValue,
    pub local: SocketAddr,
    pub activity: Arc<ConnActivity>,
    pub scheme: &'static str,
    /// Unique in the process (the `connection.id` property).
    pub id: u64,
    /// What the TLS handshake settled (TLS listeners).
    pub tls: Option<Arc<crate::tls::TlsInfo>>,
    /// `x-forwarded-client-cert` for the client's verified certificate (mTLS).
    pub client_cert: Option<HeaderValue>,
    /// Keeps the connection counted as open (its `max_connections` slot, the active gauge,
    /// the worker's drain): a tunnel the connection becomes holds a clone.
    pub hold: Rc<dyn std::any::Any>,
    /// Turns true when the proxy drains (tunnels close then).
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// The answer to one request, with what its end must record.
pub(crate) struct Answer {
    pub resp: Response<ResponseBody>,
    pub stats: Arc<RouteStats>,
    pub endpoint: Option<EndpointGuard>,
    pub pooled: Option<PooledH1>,
}

/// hyper's service function: every failure is a response, except a stream a filter closed.
pub async fn handle(
    conn: Rc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, StreamReset> {
    let start = Instant::now();
    conn.activity.begin_request();
    let snap = conn.worker.snapshot();
    let listener: &ListenerRuntime = snap
        .listeners
        .get(&*conn.listener.name)
        .map(|l| &**l)
        .unwrap_or(&conn.listener);
    if !listener.filters.is_empty() {
        // On the heap: the filtered path's state is large, and would otherwise make every
        // request's future (moved around by hyper) larger.
        let answered = Box::pin(crate::http::filtered::handle(&conn, listener, req, start)).await;
        if answered.is_err() {
            conn.activity.end_request();
        }
        return answered;
    }

    let http1 = req.version() < Version::HTTP_2;
    let grpc = errors::is_grpc(req.headers());
    let (mut parts, body) = req.into_parts();
    let answer = match check(&conn, listener, &mut parts) {
        Ok(Checked::Proceed) => {
            route_and_forward(&conn, listener, parts, DownstreamBody::Plain(body), start).await
        }
        Ok(Checked::Redirect(location)) => Ok(canonical_redirect(listener, &location)),
        Err(e) => Err((e, None)),
    };
    let answer = answer.unwrap_or_else(|f| error_answer(&conn, listener, f, http1, grpc));
    Ok(complete(&conn, listener, answer, start, None))
}

/// The answer for a proxy error.
pub(crate) fn error_answer(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    (e, stats): Failure,
    http1: bool,
    grpc: bool,
) -> Answer {
    listener.stats.error(e.cause());
    tracing::debug!(listener = %listener.name, peer = %conn.peer, error = %e, "proxy error");
    let mut resp = crate::http::respond::respond(&e, grpc);
    if http1 && e.closes_connection() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Answer {
        resp,
        stats: stats.unwrap_or_else(|| listener.no_route.clone()),
        endpoint: None,
        pooled: None,
    }
}

/// The response for an answer, its end tied to the exchange's bookkeeping.
pub(crate) fn complete(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    answer: Answer,
    start: Instant,
    filters: Option<Rc<Chain>>,
) -> Response<ResponseBody> {
    let Answer {
        mut resp,
        stats,
        endpoint,
        pooled,
    } = answer;
    let status = resp.status().as_u16();
    resp.body_mut().attach(Exchange {
        start,
        status,
        stats,
        downstream_tx: listener.stats.tx_bytes.clone(),
        activity: conn.activity.clone(),
        endpoint,
        pooled,
        filters,
    });
    resp
}

pub(crate) type Failure = (ProxyError, Option<Arc<RouteStats>>);

use crate::http::forward::Forward;

/// What the check stage decided for a request it did not refuse.
pub(crate) enum Checked {
    /// Go on: filters, routing and the upstream see the request as it is now.
    Proceed,
    /// `escaped_slashes: unescape_and_redirect`: send the client here (path and query).
    Redirect(String),
}

/// `307` to the canonical path (`escaped_slashes: unescape_and_redirect`).
pub(crate) fn canonical_redirect(listener: &ListenerRuntime, location: &str) -> Answer {
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Answer {
        resp,
        stats: listener.no_route.clone(),
        endpoint: None,
        pooled: None,
    }
}

/// Rewrites the request's path to its canonical form, so that everything after this stage —
/// filters (`:path`, `request.path`), routes, metrics, logs and the upstream — sees one path:
/// nothing authorizes one spelling and forwards another.
fn canonicalize_uri(listener: &ListenerRuntime, parts: &mut Parts) -> Result<Checked, ProxyError> {
    let canonical = path::canonicalize(parts.uri.path(), &listener.http.path)
        .map_err(|e| ProxyError::InvalidPath(e.reason()))?;
    let path = match canonical {
        Canonical::Path(Cow::Borrowed(_)) => return Ok(Checked::Proceed),
        Canonical::Path(Cow::Owned(p)) => p,
        Canonical::Redirect(to) => {
            return Ok(Checked::Redirect(match parts.uri.query() {
                Some(q) => format!("{to}?{q}"),
                None => to,
            }));
        }
    };
    let target = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(
        http::uri::PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::InvalidPath("not a valid request target"))?,
    );
    parts.uri =
        Uri::from_parts(uri).map_err(|_| ProxyError::InvalidPath("not a valid request target"))?;
    Ok(Checked::Proceed)
}

/// What is refused before anything else looks at a request (filters included), and the
/// request's path made canonical.
pub(crate) fn check(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    parts: &mut Parts,
) -> Result<Checked, ProxyError> {
    // Only weft says who the client proved to be (Envoy's `sanitize_set`).
    crate::http::headers::set_client_cert(&mut parts.headers, conn.client_cert.as_ref());
    // hyper enforces this for HTTP/1.1 as it parses; HTTP/2 is checked here.
    if parts.headers.len() > listener.http.max_headers as usize {
        return Err(ProxyError::TooManyHeaders(parts.headers.len()));
    }
    // HTTP/2 field values with leading or trailing whitespace are malformed (RFC 9113
    // §8.2.1); an HTTP/1.1 parser trims it.
    if parts.version == Version::HTTP_2
        && parts.headers.values().any(|v| {
            let b = v.as_bytes();
            matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
        })
    {
        return Err(ProxyError::BadRequest(
            "field value with leading or trailing whitespace",
        ));
    }
    crate::http::upgrade::screen(&listener.http, parts)?;
    match listener.http.headers_with_underscores {
        crate::config::UnderscoreAction::Allow => {}
        crate::config::UnderscoreAction::Reject => {
            if let Some(h) = parts.headers.keys().find(|k| k.as_str().contains('_')) {
                return Err(ProxyError::UnderscoreHeader(h.as_str().to_owned()));
            }
        }
        crate::config::UnderscoreAction::Drop => {
            let names: Vec<_> = parts
                .headers
                .keys()
                .filter(|k| k.as_str().contains('_'))
                .cloned()
                .collect();
            for n in names {
                parts.headers.remove(n);
            }
        }
    }
    if parts.method == Method::CONNECT {
        // Authority-form (`host:port`): no path to canonicalize.
        return Ok(Checked::Proceed);
    }
    canonicalize_uri(listener, parts)
}

/// The request's host for routing: authority of the URI (HTTP/2, absolute-form), else `Host`.
pub(crate) fn authority(parts: &Parts) -> Result<Cow<'_, str>, ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if let Some(a) = parts.uri.authority() {
        // HTTP/2: a `host` field naming another authority than `:authority` makes the request
        // malformed (RFC 9113 §8.3.1): which one would a backend believe? (HTTP/1.1's
        // absolute-form target wins over `Host`, RFC 9112 §3.2.2.)
        if parts.version == Version::HTTP_2
            && let Some(h) = host
            && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
        {
            return Err(ProxyError::BadRequest("host differs from :authority"));
        }
        return Ok(Cow::Borrowed(a.as_str()));
    }
    match host {
        Some(h) => {
            let s = h
                .to_str()
                .map_err(|_| ProxyError::BadRequest("invalid Host header"))?;
            // Must be a valid authority: no path, userinfo or whitespace smuggled in.
            s.parse::<http::uri::Authority>()
                .map_err(|_| ProxyError::BadRequest("invalid Host header"))?;
            if s.contains('@') {
                return Err(ProxyError::BadRequest("invalid Host header"));
            }
            Ok(Cow::Borrowed(s))
        }
        None if parts.version == Version::HTTP_10 => Ok(Cow::Borrowed("")),
        None => Err(ProxyError::BadRequest("missing Host header")),
    }
}

/// Splits `host[:port]` (with `[v6]` literals), lower-casing the host and dropping one
/// trailing dot (`Example.COM.` is `example.com`): hosts are matched as hosts.
pub(crate) fn split_host_port(authority: &str) -> (String, Option<u16>) {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (&authority[..h.len() + 2], p.strip_prefix(':')),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (host.to_ascii_lowercase(), port.and_then(|p| p.parse().ok()))
}

/// Routes a checked request and answers it: locally, or from the cluster it is forwarded to.
pub(crate) async fn route_and_forward(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    parts: Parts,
    body: DownstreamBody,
    start: Instant,
) -> Result<Answer, Failure> {
    let fail = |e: ProxyError| (e, None);
    let authority = authority(&parts).map_err(fail)?.into_owned();
    let (host, port) = split_host_port(&authority);
    // A cheap clone (shared bytes) so the path and query can be borrowed while `parts` moves on.
    let uri = parts.uri.clone();
    let connect = parts.method == Method::CONNECT;
    // The check stage made the client's path canonical; a path a filter set is made so again
    // here (or refused: only a client's own request is redirected). A CONNECT has none: only
    // routes without a path condition take it.
    let canonical = if connect {
        Canonical::Path(Cow::Borrowed(""))
    } else {
        path::canonicalize(uri.path(), &listener.http.path)
            .map_err(|e| fail(ProxyError::InvalidPath(e.reason())))?
    };
    let query = uri.query();
    let path: Cow<'_, str> = match canonical {
        Canonical::Path(p) => p,
        Canonical::Redirect(_) => {
            return Err(fail(ProxyError::InvalidPath(
                path::PathError::EscapedSlash.reason(),
            )));
        }
    };

    let view = RequestView {
        host: &host,
        path: &path,
        query,
        method: &parts.method,
        headers: &parts.headers,
    };
    let Some((index, route)) = listener.table.find(&view) else {
        return Err(fail(ProxyError::NoRoute));
    };
    let route_stats = &listener.route_stats[index];

    match &route.action {
        Action::Direct { status, body } => {
            let mut resp = Response::new(ResponseBody::full(body.clone()));
            *resp.status_mut() = *status;
            if !body.is_empty() {
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
            route.response_headers.apply(resp.headers_mut());
            Ok(local(resp, &route_stats.local))
        }
        Action::Redirect(r) => {
            let location = r.location(&RedirectFrom {
                scheme: conn.scheme,
                host: &host,
                port,
                path: &path,
                query,
            });
            let mut resp = Response::new(ResponseBody::empty());
            *resp.status_mut() = r.status;
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                Err(_) => {
                    return Err((
                        ProxyError::BadRequest("the redirect location is not a valid header"),
                        Some(route_stats.local.clone()),
                    ));
                }
            }
            route.response_headers.apply(resp.headers_mut());
            Ok(local(resp, &route_stats.local))
        }
        Action::Forward(split) => {
            let t = split.pick();
            let cluster = &split.targets[t].cluster;
            let stats = route_stats.targets[t].clone();
            if connect {
                return match crate::http::upgrade::connect(conn, listener, cluster, parts).await {
                    Ok((resp, endpoint)) => Ok(Answer {
                        resp,
                        stats,
                        endpoint: Some(endpoint),
                        pooled: None,
                    }),
                    Err(e) => Err((e, Some(stats))),
                };
            }
            let upstream_path = match &route.path_rewrite {
                Some(rw) => Cow::Owned(rw.apply(&path)),
                None => path,
            };
            // Borrowed means the request's own path, untouched by canonicalization or rewrite.
            let path_unchanged = matches!(upstream_path, Cow::Borrowed(_));
            let forward = Forward {
                conn,
                listener,
                route,
                cluster,
                authority: &authority,
                path: &upstream_path,
                path_unchanged,
                query,
                start,
            };
            forward
                .run(parts, body)
                .await
                .map_err(|e| (e, Some(stats.clone())))
                .map(|(resp, endpoint, pooled)| Answer {
                    resp,
                    stats,
                    endpoint: Some(endpoint),
                    pooled,
                })
        }
    }
}

fn local(resp: Response<ResponseBody>, stats: &Arc<RouteStats>) -> Answer {
    Answer {
        resp,
        stats: stats.clone(),
        endpoint: None,
        pooled: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(
            split_host_port("Example.COM:8080"),
            ("example.com".into(), Some(8080))
        );
        assert_eq!(split_host_port("example.com"), ("example.com".into(), None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]".into(), Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]".into(), None));
        assert_eq!(
            split_host_port("Blocked.Test.:8080"),
            ("blocked.test".into(), Some(8080))
        );
        assert_eq!(
            split_host_port("blocked.test."),
            ("blocked.test".into(), None)
        );
    }
}
