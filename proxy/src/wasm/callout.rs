//! Running callouts on the worker: HTTP calls, unary gRPC calls and gRPC streams to a cluster,
//! over the worker's own upstream connections, with the result delivered to the root context
//! that made the call.
//!
//! As Envoy's async client does, a connect failure or a timeout of an HTTP call arrives as a
//! synthesized response (503 / 504), not as a failure: filters written for Envoy check
//! `:status`. A connection that breaks before a response is a failure (no headers; the status
//! is `BROKEN_CONNECTION`).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version, header};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use weft_abi::{Status, grpc_status};

use super::state::{CalloutData, Headers};
use super::vm::Vm;
use super::worker::CalloutSlot;
use crate::upstream::body::{CalloutBody, UpstreamBody};
use crate::upstream::pool::{self, Wire};
use crate::upstream::{Cluster, Outcome, PickArgs, Pools};

/// An HTTP call a guest made.
#[derive(Debug)]
pub struct HttpCallout {
    pub root: u32,
    pub token: u32,
    pub cluster: Arc<Cluster>,
    pub headers: Headers,
    pub body: Bytes,
    pub trailers: Headers,
    pub timeout: Duration,
    /// Most response body bytes kept: past it the call fails.
    pub max_body: usize,
}

/// Where a gRPC call or stream goes.
#[derive(Debug)]
pub struct GrpcTarget {
    pub cluster: Arc<Cluster>,
    /// `/service/method`.
    pub path: String,
    pub metadata: Headers,
    /// Largest message either way, and most bytes a stream may have queued for sending.
    pub max_message: usize,
}

/// A gRPC call or stream in flight, as the VM holds it.
#[derive(Debug)]
pub struct GrpcHandle {
    abort: AbortHandle,
    sender: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes sent to the stream and not yet taken by its connection.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

/// Why a message could not be sent on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The stream is closed for sending.
    Closed,
    /// Its queue is full (`limits.callout_body`): the peer is not reading fast enough.
    Full,
}

impl GrpcHandle {
    /// Sends a message on a stream (`end` half-closes after it).
    pub fn send(&mut self, msg: Bytes, end: bool) -> Result<(), SendError> {
        let Some(tx) = &self.sender else {
            return Err(SendError::Closed);
        };
        let framed = frame(&msg);
        if self.queued.load(Ordering::Relaxed) + framed.len() > self.max_queued {
            return Err(SendError::Full);
        }
        self.queued.fetch_add(framed.len(), Ordering::Relaxed);
        let sent = tx.send(framed).map_err(|_| SendError::Closed);
        if end {
            self.sender = None;
        }
        sent
    }

    pub fn close_send(&mut self) {
        self.sender = None;
    }

    pub fn cancel(self) {
        self.abort.abort();
    }
}

/// A gRPC message frame: compression flag 0, big-endian length, message.
fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

/// Whether the message at the front of `buf` is (or announces itself as) larger than `max`.
fn oversized(buf: &[u8], max: usize) -> bool {
    let announced = (buf.len() >= 5).then(|| u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]));
    buf.len() > max + 5 || announced.is_some_and(|n| n as usize > max)
}

/// Takes every complete message off the front of `buf`.
fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

fn response_headers(status: u16, map: HeaderMap) -> Headers {
    Headers {
        pseudo: vec![(
            Bytes::from_static(b":status"),
            Bytes::from(status.to_string()),
        )],
        map,
    }
}

fn synthesized(status: u16, body: &'static str) -> CalloutData {
    let mut map = HeaderMap::new();
    map.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    map.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    CalloutData {
        headers: response_headers(status, map),
        body: Bytes::from_static(body.as_bytes()),
        trailers: Headers::default(),
    }
}

fn target_uri(wire: Wire, scheme: &[u8], authority: &[u8], path: &[u8]) -> Option<Uri> {
    match wire {
        // A negotiated request goes in HTTP/1.1 form (the pool turns it into HTTP/2's).
        Wire::Http1 | Wire::Negotiated => Uri::try_from(path).ok(),
        Wire::Http2 => {
            let mut s = Vec::with_capacity(scheme.len() + authority.len() + path.len() + 3);
            s.extend_from_slice(scheme);
            s.extend_from_slice(b"://");
            s.extend_from_slice(authority);
            s.extend_from_slice(path);
            Uri::try_from(s).ok()
        }
    }
}

/// Sends one request to `cluster` and reads the whole response.
async fn exchange(
    pools: &Rc<RefCell<Pools>>,
    cluster: &Cluster,
    wire: Wire,
    req: Request<UpstreamBody>,
    max_body: usize,
) -> Result<(u16, HeaderMap, Bytes, HeaderMap), crate::errors::ProxyError> {
    use crate::errors::ProxyError;
    let endpoint = cluster
        .pick(&PickArgs::default())
        .ok_or_else(|| ProxyError::NoHealthyUpstream(cluster.name.clone()))?;
    let started = Instant::now();
    let result = pool::send(pools, cluster, &endpoint, wire, req).await;
    let resp = match result {
        Ok(r) => r,
        Err(f) => {
            if matches!(
                f.error,
                ProxyError::ConnectFailed { .. }
                    | ProxyError::ConnectTimeout(_)
                    | ProxyError::UpstreamTls { .. }
            ) {
                cluster.report(&endpoint, Outcome::ConnectFailure, started.elapsed());
            }
            return Err(f.error);
        }
    };
    let status = resp.status().as_u16();
    cluster.report(
        &endpoint,
        Outcome::Response {
            status,
            retry_after: None,
        },
        started.elapsed(),
    );
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ProxyError::UpstreamReset)?;
        if let Some(d) = frame.data_ref() {
            if data.len() + d.len() > max_body {
                return Err(ProxyError::BadRequest("callout response body too large"));
            }
            data.extend_from_slice(d);
        } else if let Ok(t) = frame.into_trailers() {
            trailers = t;
        }
    }
    Ok((status, parts.headers, data.freeze(), trailers))
}

/// Performs an HTTP callout and delivers its result.
pub async fn http(pools: Rc<RefCell<Pools>>, vm: Weak<Vm>, call: HttpCallout) {
    let result = http_exchange(&pools, &call).await;
    if let Some(vm) = vm.upgrade() {
        vm.deliver_http_response(call.root, call.token, result);
    }
}

async fn http_exchange(
    pools: &Rc<RefCell<Pools>>,
    call: &HttpCallout,
) -> Result<CalloutData, (u32, Bytes)> {
    use crate::errors::ProxyError;
    let h = &call.headers;
    let wire = match call.cluster.protocol {
        crate::config::UpstreamProtocol::Http2 => Wire::Http2,
        crate::config::UpstreamProtocol::Auto if call.cluster.tls.is_some() => Wire::Negotiated,
        _ => Wire::Http1,
    };
    let method = Method::from_bytes(h.get(b":method").unwrap_or(b"GET")).map_err(|_| {
        (
            Status::BadArgument as u32,
            Bytes::from_static(b"invalid :method"),
        )
    })?;
    let authority = h.get(b":authority").unwrap_or_default();
    let uri = target_uri(
        wire,
        h.get(b":scheme").unwrap_or(b"http"),
        authority,
        h.get(b":path").unwrap_or(b"/"),
    )
    .ok_or((
        Status::BadArgument as u32,
        Bytes::from_static(b"invalid :path"),
    ))?;
    let mut headers = h.map.clone();
    if wire != Wire::Http2
        && let Ok(v) = HeaderValue::from_bytes(authority)
    {
        headers.insert(header::HOST, v);
    }
    if !call.body.is_empty() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(call.body.len()));
    }
    let mut req = Request::new(UpstreamBody::Callout(CalloutBody::Full {
        data: (!call.body.is_empty()).then(|| call.body.clone()),
        trailers: (!call.trailers.map.is_empty()).then(|| call.trailers.map.clone()),
    }));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = if wire == Wire::Http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers;
    let sent = exchange(pools, &call.cluster, wire, req, call.max_body);
    let result = tokio::time::timeout(call.timeout, sent)
        .await
        .unwrap_or(Err(ProxyError::UpstreamTimeout(call.timeout)));
    match result {
        Ok((status, map, body, trailers)) => Ok(CalloutData {
            headers: response_headers(status, map),
            body,
            trailers: Headers {
                pseudo: Vec::new(),
                map: trailers,
            },
        }),
        Err(ProxyError::UpstreamTimeout(_)) => Ok(synthesized(504, "upstream request timeout")),
        Err(
            ProxyError::ConnectFailed { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::UpstreamTls { .. }
            | ProxyError::NoHealthyUpstream(_)
            | ProxyError::Overflow { .. },
        ) => Ok(synthesized(
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
        )),
        Err(e) => {
            tracing::debug!(cluster = %call.cluster.name, error = %e, "HTTP callout failed");
            Err((
                Status::BrokenConnection as u32,
                Bytes::from_static(b"reset"),
            ))
        }
    }
}

fn grpc_request(
    target: &GrpcTarget,
    body: UpstreamBody,
    timeout: Option<Duration>,
) -> Option<Request<UpstreamBody>> {
    let uri = Uri::try_from(format!("http://{}{}", target.cluster.name, target.path)).ok()?;
    let mut headers = target.metadata.map.clone();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(t) = timeout
        && let Ok(v) = HeaderValue::from_str(&format!("{}m", t.as_millis().max(1)))
    {
        headers.insert("grpc-timeout", v);
    }
    let mut req = Request::new(body);
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers;
    Some(req)
}

/// The call's outcome from `grpc-status` (trailers, else headers) and the HTTP status.
fn grpc_outcome(http_status: u16, headers: &HeaderMap, trailers: &HeaderMap) -> (u32, Bytes) {
    let field = |name: &str| trailers.get(name).or_else(|| headers.get(name));
    let status =
        match field("grpc-status").and_then(|v| v.to_str().ok()?.trim().parse::<u32>().ok()) {
            Some(s) => s,
            None if http_status != 200 => grpc_status::UNAVAILABLE,
            None => grpc_status::UNKNOWN,
        };
    let message = field("grpc-message")
        .map(|v| Bytes::from(percent_decode(v.as_bytes())))
        .unwrap_or_default();
    (status, message)
}

fn percent_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%'
            && i + 2 < v.len()
            && let Ok(b) =
                u8::from_str_radix(std::str::from_utf8(&v[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// Starts a unary gRPC call.
pub fn grpc_call(
    pools: Rc<RefCell<Pools>>,
    vm: Weak<Vm>,
    (root, token): (u32, u32),
    target: GrpcTarget,
    message: Bytes,
    timeout: Duration,
    slot: CalloutSlot,
) -> GrpcHandle {
    let max_message = target.max_message;
    let task = tokio::task::spawn_local(async move {
        let _slot = slot;
        let run = async {
            let req = grpc_request(
                &target,
                UpstreamBody::Callout(CalloutBody::Full {
                    data: Some(frame(&message)),
                    trailers: None,
                }),
                Some(timeout),
            )
            .ok_or((
                grpc_status::INTERNAL,
                Bytes::from_static(b"invalid gRPC target"),
            ))?;
            // The response body holds one framed message.
            let (status, headers, body, trailers) =
                exchange(&pools, &target.cluster, Wire::Http2, req, max_message + 5)
                    .await
                    .map_err(|e| (grpc_status::UNAVAILABLE, Bytes::from(e.to_string())))?;
            let (code, msg) = grpc_outcome(status, &headers, &trailers);
            if code != grpc_status::OK {
                return Err((code, msg));
            }
            let mut buf = BytesMut::from(&body[..]);
            Ok(messages(&mut buf).into_iter().next().unwrap_or_default())
        };
        let result = tokio::time::timeout(timeout, run).await.unwrap_or(Err((
            grpc_status::DEADLINE_EXCEEDED,
            Bytes::from_static(b"deadline exceeded"),
        )));
        if let Some(vm) = vm.upgrade() {
            match result {
                Ok(msg) => vm.deliver_grpc_message(root, token, msg, true),
                Err((code, msg)) => vm.deliver_grpc_close(root, token, code, msg),
            }
        }
    });
    GrpcHandle {
        abort: task.abort_handle(),
        sender: None,
        queued: Arc::default(),
        max_queued: max_message,
    }
}

/// Opens a gRPC stream.
pub fn grpc_stream(
    pools: Rc<RefCell<Pools>>,
    vm: Weak<Vm>,
    root: u32,
    token: u32,
    target: GrpcTarget,
    slot: CalloutSlot,
) -> GrpcHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let max_message = target.max_message;
    let body_queued = queued.clone();
    let task = tokio::task::spawn_local(async move {
        let _slot = slot;
        let close = |vm: &Weak<Vm>, code: u32, msg: Bytes| {
            if let Some(vm) = vm.upgrade() {
                vm.deliver_grpc_close(root, token, code, msg);
            }
        };
        let Some(req) = grpc_request(
            &target,
            UpstreamBody::Callout(CalloutBody::Channel(rx, body_queued)),
            None,
        ) else {
            return close(
                &vm,
                grpc_status::INTERNAL,
                Bytes::from_static(b"invalid gRPC target"),
            );
        };
        let Some(endpoint) = target.cluster.pick(&PickArgs::default()) else {
            return close(
                &vm,
                grpc_status::UNAVAILABLE,
                Bytes::from_static(b"no healthy upstream"),
            );
        };
        let resp = match pool::send(&pools, &target.cluster, &endpoint, Wire::Http2, req).await {
            Ok(r) => r,
            Err(f) => {
                return close(
                    &vm,
                    grpc_status::UNAVAILABLE,
                    Bytes::from(f.error.to_string()),
                );
            }
        };
        let status = resp.status().as_u16();
        let (parts, mut body) = resp.into_parts();
        match vm.upgrade() {
            Some(v) => v.deliver_grpc_metadata(
                root,
                token,
                Headers {
                    pseudo: Vec::new(),
                    map: parts.headers.clone(),
                },
                true,
            ),
            None => return,
        }
        let mut buf = BytesMut::new();
        let mut trailers = HeaderMap::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        buf.extend_from_slice(d);
                        // A message (or what is announced as one) larger than the limit ends
                        // the stream instead of growing the buffer.
                        if oversized(&buf, max_message) {
                            return close(
                                &vm,
                                grpc_status::RESOURCE_EXHAUSTED,
                                Bytes::from_static(b"message larger than limits.callout_body"),
                            );
                        }
                        for msg in messages(&mut buf) {
                            match vm.upgrade() {
                                Some(v) => v.deliver_grpc_message(root, token, msg, false),
                                None => return,
                            }
                        }
                    } else if let Ok(t) = f.into_trailers() {
                        trailers = t;
                    }
                }
                Err(e) => return close(&vm, grpc_status::UNAVAILABLE, Bytes::from(e.to_string())),
            }
        }
        if let Some(v) = vm.upgrade() {
            v.deliver_grpc_metadata(
                root,
                token,
                Headers {
                    pseudo: Vec::new(),
                    map: trailers.clone(),
                },
                false,
            );
        }
        let (code, msg) = grpc_outcome(status, &parts.headers, &trailers);
        close(&vm, code, msg);
    });
    GrpcHandle {
        abort: task.abort_handle(),
        sender: Some(tx),
        queued,
        max_queued: max_message,
    }
}

#[cfg(test)]
mod tests;
