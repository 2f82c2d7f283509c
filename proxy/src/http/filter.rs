//! The filter stage (on listeners with filters): a checked request through the filters (request
//! headers, the start of the body), routed and forwarded with what the filters left, and its
//! answer — the upstream's, a filter's local response, or a proxy error — back through the
//! filters (response headers, the start of the body) before it goes downstream.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::errors::{self, ProxyError, StreamReset};
use crate::http::body::ResponseBody;
use crate::http::check;
use crate::http::conn::ConnCtx;
use crate::http::headers;
use crate::http::path::{PathError, canonical_target};
use crate::http::record::{self, Logged};
use crate::http::respond::{self, Answer, StageError};
use crate::http::route::{self, Routed};
use crate::metrics::RouteStats;
use crate::snapshot::ListenerRuntime;
use crate::upstream::body::DownstreamBody;
use crate::wasm::chain::{Chain, FilterBody, Stop};
use crate::wasm::state::{Direction, Headers, LocalResponse, StreamInfo};

fn pseudo(name: &'static [u8], value: impl Into<Bytes>) -> (Bytes, Bytes) {
    (Bytes::from_static(name), value.into())
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn method_bytes(m: &Method) -> Bytes {
    match *m {
        Method::GET => Bytes::from_static(b"GET"),
        Method::POST => Bytes::from_static(b"POST"),
        Method::PUT => Bytes::from_static(b"PUT"),
        Method::DELETE => Bytes::from_static(b"DELETE"),
        Method::HEAD => Bytes::from_static(b"HEAD"),
        Method::OPTIONS => Bytes::from_static(b"OPTIONS"),
        Method::PATCH => Bytes::from_static(b"PATCH"),
        _ => Bytes::copy_from_slice(m.as_str().as_bytes()),
    }
}

/// `:status` as filters see it (the common ones without an allocation).
fn status_bytes(status: StatusCode) -> Bytes {
    match status.as_u16() {
        200 => Bytes::from_static(b"200"),
        204 => Bytes::from_static(b"204"),
        301 => Bytes::from_static(b"301"),
        302 => Bytes::from_static(b"302"),
        304 => Bytes::from_static(b"304"),
        400 => Bytes::from_static(b"400"),
        401 => Bytes::from_static(b"401"),
        403 => Bytes::from_static(b"403"),
        404 => Bytes::from_static(b"404"),
        500 => Bytes::from_static(b"500"),
        502 => Bytes::from_static(b"502"),
        503 => Bytes::from_static(b"503"),
        504 => Bytes::from_static(b"504"),
        n => Bytes::from(n.to_string()),
    }
}

/// The request head as filters see it: `:authority`, `:path`, `:method`, `:scheme` (Envoy's
/// order), then the fields, without `Host` and without connection-specific ones. Also the
/// request's own `Host` field, which goes back as it was when no filter changes `:authority`.
/// `x-request-id` is set here unless `id_set` (the access log set it already).
fn request_head(
    parts: &mut Parts,
    authority: &str,
    scheme: &'static str,
    id_set: bool,
) -> (Headers, Option<HeaderValue>) {
    let mut map = std::mem::take(&mut parts.headers);
    let host = map.remove(header::HOST);
    let upgrade = parts.version == Version::HTTP_11 && headers::wants_upgrade(&map);
    headers::strip_hop_by_hop(&mut map, upgrade);
    if !id_set {
        headers::ensure_request_id(&mut map);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = Headers {
        pseudo: vec![
            pseudo(b":authority", Bytes::copy_from_slice(authority.as_bytes())),
            pseudo(b":path", Bytes::copy_from_slice(path.as_bytes())),
            pseudo(b":method", method_bytes(&parts.method)),
            pseudo(b":scheme", scheme),
        ],
        map,
    };
    (head, host)
}

/// Puts what the filters left back into the request. A `:path` a filter set is canonical
/// already (the host made it so when it was written) or is refused here, as a client's would
/// be: the router and the upstream see the path the filters saw. `authority` is the one the
/// filters were shown and `host` the request's `Host` field; true when `:authority` is still
/// `authority` (the router need not find and check it again).
fn apply_request_head(
    parts: &mut Parts,
    chain: &Chain,
    opts: &crate::config::PathOptions,
    authority: &str,
    host: Option<HeaderValue>,
) -> Result<bool, ProxyError> {
    let stream = chain.stream.borrow();
    let head = &stream.request_headers;
    let method = head.get(b":method").unwrap_or(b"GET");
    parts.method =
        Method::from_bytes(method).map_err(|_| ProxyError::FilterOutput("invalid :method"))?;
    let path = head.get(b":path").unwrap_or(b"/");
    if path
        != parts
            .uri
            .path_and_query()
            .map_or(&b"/"[..], |p| p.as_str().as_bytes())
    {
        let text = std::str::from_utf8(path)
            .map_err(|_| ProxyError::InvalidPath(PathError::Forbidden.reason()))?;
        // A fragment is no part of a request target: the URI parser would drop it unseen.
        if text.contains('#') {
            return Err(ProxyError::InvalidPath(PathError::Forbidden.reason()));
        }
        match canonical_target(text, opts) {
            Ok(None) => {}
            Ok(Some(_)) => return Err(ProxyError::InvalidPath("not canonical")),
            Err(e) => return Err(ProxyError::InvalidPath(e.reason())),
        }
        parts.uri = Uri::try_from(path).map_err(|_| ProxyError::FilterOutput("invalid :path"))?;
    }
    let now = head.get(b":authority").unwrap_or_default();
    let unchanged = now == authority.as_bytes();
    let host = match host {
        Some(h) if unchanged && h.as_bytes() == now => Some(h),
        _ => (!now.is_empty())
            .then(|| HeaderValue::from_bytes(now))
            .transpose()
            .map_err(|_| ProxyError::FilterOutput("invalid :authority"))?,
    };
    // An HTTP/2 request (or an absolute-form target) carries its authority in the URI too,
    // where it wins over `Host`: it becomes the filter's, or the two would disagree.
    if !unchanged && !now.is_empty() && parts.uri.authority().is_some() {
        let invalid = || ProxyError::BadRequest("invalid authority");
        let new: http::uri::Authority = std::str::from_utf8(now)
            .ok()
            .filter(|a| !a.contains('@'))
            .and_then(|a| a.parse().ok())
            .ok_or_else(invalid)?;
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.authority = Some(new);
        parts.uri = Uri::from_parts(uri).map_err(|_| invalid())?;
    }
    drop(stream);
    let mut fields = chain.request_fields();
    chain.fix_length(Direction::Request, &mut fields);
    parts.headers = fields;
    if let Some(h) = host {
        parts.headers.insert(header::HOST, h);
    }
    Ok(unchanged)
}

/// Whether a message's body may be an open-ended conversation (gRPC, server-sent events, an
/// upgrade), whose headers must not wait for its first bytes.
fn streaming(map: &HeaderMap) -> bool {
    let ct = map
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    ct.starts_with(b"application/grpc")
        || ct.starts_with(b"text/event-stream")
        || map.contains_key(header::UPGRADE)
}

/// gRPC's status for an HTTP one (the gRPC spec's mapping).
fn grpc_for_http(status: u16) -> u32 {
    use weft_abi::grpc_status as g;
    match status {
        400 => g::INTERNAL,
        401 => g::UNAUTHENTICATED,
        403 => g::PERMISSION_DENIED,
        404 => g::UNIMPLEMENTED,
        429 | 502..=504 => g::UNAVAILABLE,
        _ => g::UNKNOWN,
    }
}

/// The response a filter asked for. A gRPC client gets a gRPC answer ("trailers-only", the
/// body as `grpc-message`), as from Envoy.
fn local_response(lr: LocalResponse, grpc: bool) -> Response<ResponseBody> {
    let mut headers = HeaderMap::with_capacity(lr.headers.len() + 2);
    for (k, v) in &lr.headers {
        match (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
            (Ok(k), Ok(v)) => {
                headers.append(k, v);
            }
            _ => tracing::debug!("a local response header that is not valid HTTP was dropped"),
        }
    }
    if grpc {
        let code = lr.grpc_status.unwrap_or_else(|| grpc_for_http(lr.status));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        if !lr.body.is_empty()
            && let Ok(v) =
                HeaderValue::from_str(&errors::percent_encode(&String::from_utf8_lossy(&lr.body)))
        {
            headers.insert("grpc-message", v);
        }
        let mut resp = Response::new(ResponseBody::empty());
        *resp.headers_mut() = headers;
        return resp;
    }
    if !lr.body.is_empty() && !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    let mut resp = Response::new(ResponseBody::full(lr.body));
    *resp.status_mut() =
        StatusCode::from_u16(lr.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    *resp.headers_mut() = headers;
    resp
}

/// What a stream the filters stopped answers, and how many filters (from the first) its
/// response goes back through.
fn stopped(
    chain: &Chain,
    listener: &ListenerRuntime,
    stop: Stop,
    stats: Option<Arc<RouteStats>>,
    grpc: bool,
) -> Result<(Answer, usize), StreamReset> {
    let answer = |resp| Answer {
        resp,
        stats: stats.clone().unwrap_or_else(|| listener.no_route.clone()),
        endpoint: None,
    };
    let error = |e: ProxyError| {
        listener.stats.error(e.cause());
        respond::respond(&e, grpc)
    };
    Ok(match stop {
        Stop::Reset => return Err(StreamReset),
        Stop::Local { filter, dir } => {
            let Some((_, lr)) = chain.take_local() else {
                return Err(StreamReset);
            };
            chain.set_info(|i| {
                i.response_details = Some(String::from_utf8_lossy(&lr.details).into_owned())
            });
            let upto = if dir == Direction::Request {
                filter + 1
            } else {
                filter
            };
            (answer(local_response(lr, grpc)), upto)
        }
        Stop::Failed { filter, .. } => (
            answer(error(ProxyError::FilterFailed(chain.filter_name(filter)))),
            filter,
        ),
        Stop::Timeout { filter, .. } => (
            answer(error(ProxyError::FilterTimeout(chain.filter_name(filter)))),
            filter,
        ),
        Stop::TooLarge { filter, dir } => match dir {
            Direction::Request => (
                answer(error(ProxyError::RequestBodyTooLarge(
                    chain.filter_name(filter),
                ))),
                filter + 1,
            ),
            Direction::Response => (
                answer(error(ProxyError::ResponseBodyTooLarge(
                    chain.filter_name(filter),
                ))),
                filter,
            ),
        },
    })
}

/// Runs a checked request through the listener's filters, and its answer back.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    conn: &Rc<ConnCtx>,
    listener: &Arc<ListenerRuntime>,
    mut parts: Parts,
    body: Incoming,
    start: Instant,
    http1: bool,
    grpc: bool,
    mut logged: Option<Box<Logged>>,
) -> Result<Response<ResponseBody>, StreamReset> {
    // Filters see `:authority`: a request without a valid one is refused before them.
    let authority = match check::authority(&parts) {
        Ok(a) => a.into_owned(),
        Err(e) => {
            let answer = respond::error_answer(conn, listener, StageError::new(e), http1, grpc);
            return Ok(respond::finish(conn, listener, answer, start, None, logged));
        }
    };
    let info = StreamInfo {
        peer: Some(conn.peer),
        local: Some(conn.local),
        connection_id: conn.id,
        tls: conn.tls.clone(),
        protocol: protocol(parts.version),
        scheme: conn.scheme,
        started: Some(start),
        listener: listener.name.clone(),
        routes: Some(listener.clone()),
        ..StreamInfo::default()
    };
    let (head, host) = request_head(&mut parts, &authority, conn.scheme, logged.is_some());
    let chain = Chain::new(conn.worker.wasm.clone(), &listener.filters, info, head);
    let wait = listener.http.stream_idle_timeout.non_zero();
    let n = chain.len();

    // The request: headers, then the start of the body, through the filters.
    let eos = body.is_end_stream();
    let mut request_body = None;
    let mut stop = chain.request_headers(eos, wait).await.err();
    if stop.is_none() {
        if !eos && chain.wants_body(Direction::Request) {
            let committed = !streaming(&chain.stream.borrow().request_headers.map);
            let mut filtered = FilterBody::new(chain.clone(), Direction::Request, body);
            stop = filtered.prime(committed, wait).await.err();
            request_body = Some(DownstreamBody::Filtered(Box::pin(filtered)));
        } else {
            // A body that goes around the filters is still counted for them (`request.size`).
            let received = (!eos).then(|| match &logged {
                Some(l) => l.entry.received.clone(),
                None => Default::default(),
            });
            if let Some(n) = &received {
                chain.set_info(|i| i.request_body_counted = Some(n.clone()));
            }
            request_body = Some(DownstreamBody::received(body, received));
        }
    }

    let answered = async {
        let (answer, upto) = match (stop, request_body) {
            (stop @ Some(_), _) | (stop @ None, None) => {
                stopped(&chain, listener, stop.unwrap_or(Stop::Reset), None, grpc)?
            }
            (None, Some(body)) => {
                let opts = &listener.http.path;
                let forwarded = match apply_request_head(&mut parts, &chain, opts, &authority, host)
                {
                    Ok(unchanged) => {
                        // The request's id was set before the filters (`request_head`).
                        let prepared = route::Prepared {
                            authority: unchanged.then_some(authority),
                            request_id: true,
                        };
                        let mut routed = route::route(conn, listener, parts, body, start, prepared);
                        match routed {
                            Routed::Answered(answer) => answer,
                            Routed::Pending(ref mut pending) => pending.answer().await,
                        }
                    }
                    Err(e) => Err(StageError::new(e)),
                };
                // A filter may have stopped the request body meanwhile: that decides the answer.
                match chain.stopped(Direction::Request) {
                    Some(stop) => {
                        let stats = forwarded.as_ref().ok().map(|a| a.stats.clone());
                        stopped(&chain, listener, stop, stats, grpc)?
                    }
                    None => (
                        forwarded.unwrap_or_else(|f| {
                            respond::error_answer(conn, listener, f, http1, grpc)
                        }),
                        n,
                    ),
                }
            }
        };
        filter_response(
            conn,
            listener,
            &chain,
            answer,
            upto,
            start,
            grpc,
            &mut logged,
        )
        .await
    }
    .await;
    // A stream the filters reset still leaves its line, with no response code (as Envoy's).
    if answered.is_err()
        && let Some(l) = logged
    {
        record::write_line(*l, 0, start.elapsed(), &listener.no_route, Some(&chain));
    }
    answered
}

/// Sends an answer back through filters `upto - 1 ..= 0`; a filter that stops it replaces it
/// (a local response, or an error) and the replacement goes through the filters before it.
#[allow(clippy::too_many_arguments)]
async fn filter_response(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    chain: &Rc<Chain>,
    mut answer: Answer,
    mut upto: usize,
    start: Instant,
    grpc: bool,
    logged: &mut Option<Box<Logged>>,
) -> Result<Response<ResponseBody>, StreamReset> {
    let wait = listener.http.stream_idle_timeout.non_zero();
    let route = answer.stats.clone();
    let upstream = answer.endpoint.as_ref().map(|e| e.address());
    chain.set_info(|i| {
        i.route = Some(route);
        i.upstream = upstream;
        i.tries = u32::from(upstream.is_some());
        if upstream.is_some() {
            i.backend_latency = Some(start.elapsed());
        }
    });
    loop {
        let (mut parts, body) = answer.resp.into_parts();
        let head = Headers {
            pseudo: vec![pseudo(b":status", status_bytes(parts.status))],
            map: std::mem::take(&mut parts.headers),
        };
        let eos = body.is_end_stream();
        let mut outcome = chain
            .response_headers(upto, head, eos, wait)
            .await
            .map(|()| None);
        let mut body = Some(body);
        if outcome.is_ok() && !eos && chain.wants_body(Direction::Response) {
            let committed = !chain
                .stream
                .borrow()
                .response_headers
                .as_ref()
                .is_some_and(|h| streaming(&h.map));
            let mut filtered = FilterBody::new(
                chain.clone(),
                Direction::Response,
                body.take().unwrap_or_else(ResponseBody::empty),
            );
            outcome = filtered
                .prime(committed, wait)
                .await
                .map(|()| Some(filtered));
        }
        match outcome {
            Ok(filtered) => {
                let (mut fields, status) = chain.response_head();
                chain.fix_length(Direction::Response, &mut fields);
                match status {
                    Some(Some(s)) => parts.status = s,
                    Some(None) => {
                        tracing::warn!("a filter set an invalid :status; the original is kept")
                    }
                    None => {}
                }
                parts.headers = fields;
                let body = match filtered {
                    // All of it is already through: sent as it is, no more filter work.
                    Some(mut f) => match f.take_complete() {
                        Some(bytes) => ResponseBody::full(bytes),
                        None => ResponseBody::filtered(Box::pin(f)),
                    },
                    None => body.unwrap_or_else(ResponseBody::empty),
                };
                answer.resp = Response::from_parts(parts, body);
                return Ok(respond::finish(
                    conn,
                    listener,
                    answer,
                    start,
                    Some(chain.clone()),
                    logged.take(),
                ));
            }
            Err(stop) => {
                let (next, next_upto) =
                    stopped(chain, listener, stop, Some(answer.stats.clone()), grpc)?;
                answer = next;
                upto = next_upto;
            }
        }
    }
}
