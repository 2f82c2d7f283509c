//! Per-worker upstream connections: HTTP/1.1 keep-alive pools and shared HTTP/2 connections,
//! and sending a request over them.
//!
//! Each worker owns its [`Pools`] (no locks, no cross-core traffic). HTTP/1.1 requests go
//! through the proxy's own client ([`super::h1`]): a connection goes back to its pool when the
//! response body it carried ended cleanly; one that was cut short is closed. A pooled
//! connection found closed is skipped and the request is sent on another. Upgrades and
//! `CONNECT` take a new connection of hyper's client, which the tunnel then owns.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::{UpstreamBody, UpstreamResponseBody};
use super::h1;
use super::{Cluster, Endpoint};
use crate::errors::ProxyError;
use crate::local::LocalExec;
use crate::tls::client::Alpn;
use crate::tls::io::{ClientIo, MaybeTls};

/// The HTTP version spoken to an endpoint for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Http1,
    Http2,
    /// A TLS endpoint's choice by ALPN: a connection already open to it says which, else a new
    /// one offers both. The request comes prepared for HTTP/1.1 and is turned into its HTTP/2
    /// form when the endpoint speaks HTTP/2.
    Negotiated,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    cluster: Arc<str>,
    addr: SocketAddr,
    /// A digest of the cluster's TLS settings (0 for plain text): connections made with other
    /// TLS settings are not reused after a reload changed them.
    tls: u64,
}

/// How often [`Pools::sweep`] runs; idle ages are counted in these ticks (no clock is read on
/// the request path).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Idle {
    conn: Box<h1::Conn>,
    /// Sweep tick when it went idle.
    since: u64,
}

struct H2 {
    tx: http2::SendRequest<UpstreamBody>,
    /// Sweep tick of its last use.
    last_used: u64,
}

#[derive(Default)]
struct EndpointPool {
    idle: Vec<Idle>,
    h2: Vec<H2>,
}

/// The upstream connections of one worker.
#[derive(Default)]
pub struct Pools {
    /// Looked up twice per request (take, then release): a fast hash, as its keys come from
    /// the configuration and discovery, never from a client.
    map: HashMap<PoolKey, EndpointPool, foldhash::fast::RandomState>,
    tick: u64,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("endpoints", &self.map.len())
            .finish()
    }
}

impl Pools {
    /// The most recently used idle connection (the least likely to have been closed by the
    /// upstream's own idle timer).
    fn take_idle(&mut self, key: &PoolKey) -> Option<Box<h1::Conn>> {
        let pool = self.map.get_mut(key)?;
        while let Some(mut c) = pool.idle.pop() {
            if c.conn.usable() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Keeps an idle connection (beyond `max_idle` for its endpoint, it is closed).
    pub fn put_idle(&mut self, conn: Box<h1::Conn>) {
        if !self.map.contains_key(conn.key()) {
            self.map.insert(conn.key().clone(), EndpointPool::default());
        }
        let Some(pool) = self.map.get_mut(conn.key()) else {
            return;
        };
        if pool.idle.len() < conn.max_idle() {
            pool.idle.push(Idle {
                conn,
                since: self.tick,
            });
        }
    }

    fn h2_sender(&mut self, key: &PoolKey) -> Option<http2::SendRequest<UpstreamBody>> {
        let pool = self.map.get_mut(key)?;
        pool.h2.retain(|c| !c.tx.is_closed());
        let c = pool.h2.last_mut()?;
        c.last_used = self.tick;
        Some(c.tx.clone())
    }

    fn add_h2(&mut self, key: PoolKey, tx: http2::SendRequest<UpstreamBody>) {
        self.map.entry(key).or_default().h2.push(H2 {
            tx,
            last_used: self.tick,
        });
    }

    /// Forgets the HTTP/2 connections of `key` (one just failed to take a request).
    fn drop_h2(&mut self, key: &PoolKey) {
        if let Some(pool) = self.map.get_mut(key) {
            pool.h2.clear();
        }
    }

    /// Runs every [`SWEEP_EVERY`]: closes connections idle for longer than their cluster's
    /// `idle_timeout` (looked up by name; pools of clusters no longer configured close
    /// everything idle).
    pub fn sweep(&mut self, idle_timeout_of: impl Fn(&str) -> Option<Duration>) {
        self.tick += 1;
        let now = self.tick;
        self.map.retain(|key, pool| {
            let timeout = idle_timeout_of(&key.cluster).unwrap_or(Duration::ZERO);
            let max_age = timeout.as_millis().div_ceil(SWEEP_EVERY.as_millis()) as u64;
            pool.idle
                .retain_mut(|c| now - c.since < max_age && c.conn.usable());
            pool.h2
                .retain(|c| !c.tx.is_closed() && now - c.last_used < max_age);
            !pool.idle.is_empty() || !pool.h2.is_empty()
        });
    }

    /// Idle HTTP/1.1 and open HTTP/2 connections held.
    pub fn len(&self) -> usize {
        self.map.values().map(|p| p.idle.len() + p.h2.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts an open upstream connection until it closes.
pub struct ConnGuard {
    cluster_active: prometheus_client::metrics::gauge::Gauge,
    endpoint: Arc<Endpoint>,
    _permit: super::Permit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.cluster_active.dec();
        self.endpoint.stats.connections_active.fetch_sub(1, Relaxed);
    }
}

/// Opens a connection to `endpoint` (TLS when the cluster says so, offering `alpn`), within
/// the cluster's breakers and connect timeout.
pub async fn connect(
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
    alpn: Alpn,
) -> Result<(ClientIo, ConnGuard), ProxyError> {
    let started = tokio::time::Instant::now();
    let (stream, guard) = connect_tcp(cluster, endpoint).await?;
    let Some(tls) = &cluster.tls else {
        return Ok((MaybeTls::Plain(stream), guard));
    };
    let left = cluster.connect_timeout.saturating_sub(started.elapsed());
    let addr = endpoint.address;
    match tls
        .connect(stream, endpoint.hostname.as_deref(), addr, alpn, left)
        .await
    {
        Ok(s) => Ok((MaybeTls::Tls(Box::new(s)), guard)),
        Err((source, reason)) => {
            cluster.stats.cx_failed.inc();
            endpoint.stats.connect_failures.fetch_add(1, Relaxed);
            Err(ProxyError::UpstreamTls {
                addr,
                reason,
                source,
            })
        }
    }
}

async fn connect_tcp(
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
) -> Result<(TcpStream, ConnGuard), ProxyError> {
    let permit = cluster.enter(super::Breaker::Connections)?;
    let _pending = cluster.enter(super::Breaker::Pending)?;
    let addr = endpoint.address;
    let result = tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(addr)).await;
    let failed = || {
        cluster.stats.cx_failed.inc();
        endpoint.stats.connect_failures.fetch_add(1, Relaxed);
    };
    let stream = match result {
        Err(_) => {
            failed();
            return Err(ProxyError::ConnectTimeout(addr));
        }
        Ok(Err(source)) => {
            failed();
            return Err(ProxyError::ConnectFailed { addr, source });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    cluster.stats.cx_opened.inc();
    cluster.stats.cx_active.inc();
    endpoint.stats.connections_total.fetch_add(1, Relaxed);
    endpoint.stats.connections_active.fetch_add(1, Relaxed);
    Ok((
        stream,
        ConnGuard {
            cluster_active: cluster.stats.cx_active.clone(),
            endpoint: endpoint.clone(),
            _permit: permit,
        },
    ))
}

async fn connect_h1(
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
    home: h1::Home,
) -> Result<Box<h1::Conn>, ProxyError> {
    let (stream, guard) = connect(cluster, endpoint, Alpn::Http1).await?;
    Ok(h1::Conn::new(stream, guard, home))
}

/// A connection of hyper's client, for an upgrade or `CONNECT` (the tunnel keeps it).
async fn connect_tunnel(
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
) -> Result<http1::SendRequest<UpstreamBody>, ProxyError> {
    let (stream, guard) = connect(cluster, endpoint, Alpn::Http1).await?;
    handshake_h1(stream, guard, endpoint).await
}

async fn handshake_h1(
    stream: ClientIo,
    guard: ConnGuard,
    endpoint: &Arc<Endpoint>,
) -> Result<http1::SendRequest<UpstreamBody>, ProxyError> {
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProxyError::Handshake {
            addr: endpoint.address,
            source,
        })?;
    tokio::task::spawn_local(async move {
        let _guard = guard;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
        }
    });
    Ok(tx)
}

async fn connect_h2(
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
) -> Result<http2::SendRequest<UpstreamBody>, ProxyError> {
    let (stream, guard) = connect(cluster, endpoint, Alpn::Http2).await?;
    handshake_h2(stream, guard, endpoint).await
}

async fn handshake_h2(
    stream: ClientIo,
    guard: ConnGuard,
    endpoint: &Arc<Endpoint>,
) -> Result<http2::SendRequest<UpstreamBody>, ProxyError> {
    let (tx, conn) = http2::Builder::new(LocalExec)
        .timer(TokioTimer::new())
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProxyError::Handshake {
            addr: endpoint.address,
            source,
        })?;
    tokio::task::spawn_local(async move {
        let _guard = guard;
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(tx)
}

/// A failed send; `request` is the request back when none of it was sent (a connection that
/// could not be made, a breaker), so a retry needs no copy of it.
pub struct SendFailure {
    pub error: ProxyError,
    pub request: Option<Request<UpstreamBody>>,
}

impl From<ProxyError> for SendFailure {
    fn from(error: ProxyError) -> Self {
        SendFailure {
            error,
            request: None,
        }
    }
}

/// Sends `req` to `endpoint` over `wire`: the response head (an HTTP/1.1 connection goes back
/// to its pool when the response body is done).
///
/// An `async` block, not an `async fn`: the block uses the request where it was captured,
/// where an `async fn` would keep a second copy of it in every request's future.
#[allow(clippy::manual_async_fn)]
pub fn send<'a>(
    pools: &'a Rc<RefCell<Pools>>,
    cluster: &'a Cluster,
    endpoint: &'a Arc<Endpoint>,
    wire: Wire,
    mut req: Request<UpstreamBody>,
) -> impl Future<Output = Result<Response<UpstreamResponseBody>, SendFailure>> + 'a {
    async move {
        let unsent = |error, request| SendFailure {
            error,
            request: Some(request),
        };
        let key = PoolKey {
            cluster: cluster.name.clone(),
            addr: endpoint.address,
            tls: cluster.tls.as_ref().map_or(0, |t| t.key),
        };
        cluster.stats.requests.inc();
        let wire = match wire {
            Wire::Negotiated => match negotiate(pools, cluster, endpoint, &key).await {
                Ok(Wire::Http2) => {
                    if let Err(e) = into_h2_form(&mut req) {
                        return Err(unsent(e, req));
                    }
                    Wire::Http2
                }
                Ok(_) if crate::errors::is_grpc(req.headers()) => {
                    return Err(unsent(
                        ProxyError::GrpcNeedsHttp2(cluster.name.clone()),
                        req,
                    ));
                }
                Ok(w) => w,
                Err(e) => return Err(unsent(e, req)),
            },
            w => w,
        };
        let mut stale_retried = false;
        match wire {
            Wire::Http1 if is_tunnel(&req) => {
                // A new connection is the rare case: its (large) future lives on the heap, so
                // that every request's future stays small.
                let mut tx = match Box::pin(connect_tunnel(cluster, endpoint)).await {
                    Ok(tx) => tx,
                    Err(e) => return Err(unsent(e, req)),
                };
                match tx.try_send_request(req).await {
                    Ok(resp) => Ok(resp.map(UpstreamResponseBody::Hyper)),
                    Err(mut e) => match e.take_message() {
                        Some(r) => Err(unsent(ProxyError::upstream(e.into_error()), r)),
                        None => Err(ProxyError::upstream(e.into_error()).into()),
                    },
                }
            }
            Wire::Http1 => loop {
                let idle = if stale_retried {
                    None
                } else {
                    pools.borrow_mut().take_idle(&key)
                };
                let (conn, reused) = match idle {
                    Some(c) => (c, true),
                    None => {
                        let home = home_of(pools, &key, cluster.max_idle_per_endpoint);
                        match Box::pin(connect_h1(cluster, endpoint, home)).await {
                            Ok(c) => (c, false),
                            Err(e) => return Err(unsent(e, req)),
                        }
                    }
                };
                match h1::send(conn, req).await {
                    Ok(resp) => return Ok(resp.map(UpstreamResponseBody::H1)),
                    Err(f) => match f.request {
                        // Nothing written: the next connection.
                        Some(r) if !f.written && reused => req = r,
                        Some(r) if !f.written => return Err(unsent(h1_error(f.error), r)),
                        // The keep-alive race: the server may close an idle connection just as a
                        // request is written on it. A bodyless idempotent request that gets no
                        // response head is sent once more on a new connection (RFC 9112 §9.3.1),
                        // so that a backend restarting or timing out its idle connections costs
                        // no request.
                        Some(r)
                            if reused
                                && !stale_retried
                                && resendable(&r)
                                && f.error.closed_before_response() =>
                        {
                            tracing::debug!(
                                cluster = %cluster.name,
                                endpoint = %endpoint.address,
                                "pooled connection closed under the request; sending it again"
                            );
                            cluster.stats.stale_resends.inc();
                            stale_retried = true;
                            req = r;
                        }
                        _ => return Err(h1_error(f.error).into()),
                    },
                }
            },
            // Settled above.
            Wire::Negotiated => Err(ProxyError::BadRequest("no protocol negotiated").into()),
            Wire::Http2 => {
                // A shared connection that refuses the request unsent (going away) gets one more
                // try on a fresh connection.
                let mut reuse = true;
                loop {
                    let existing = if reuse {
                        pools.borrow_mut().h2_sender(&key)
                    } else {
                        None
                    };
                    let fresh = existing.is_none();
                    let mut tx = match existing {
                        Some(tx) => tx,
                        None => match Box::pin(connect_h2(cluster, endpoint)).await {
                            Ok(tx) => {
                                pools.borrow_mut().add_h2(key.clone(), tx.clone());
                                tx
                            }
                            Err(e) => return Err(unsent(e, req)),
                        },
                    };
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(UpstreamResponseBody::Hyper)),
                        Err(mut e) => {
                            pools.borrow_mut().drop_h2(&key);
                            match e.take_message() {
                                Some(r) if !fresh => {
                                    req = r;
                                    reuse = false;
                                }
                                Some(r) => {
                                    return Err(unsent(ProxyError::upstream(e.into_error()), r));
                                }
                                None => return Err(ProxyError::upstream(e.into_error()).into()),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The protocol a TLS endpoint speaks: that of a connection already open to it, else that of
/// a new one (offering both by ALPN), which joins the pool for the request to take.
async fn negotiate(
    pools: &Rc<RefCell<Pools>>,
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
    key: &PoolKey,
) -> Result<Wire, ProxyError> {
    {
        let p = pools.borrow();
        if let Some(pool) = p.map.get(key) {
            if !pool.h2.is_empty() {
                return Ok(Wire::Http2);
            }
            if !pool.idle.is_empty() {
                return Ok(Wire::Http1);
            }
        }
    }
    let (stream, guard) = Box::pin(connect(cluster, endpoint, Alpn::Either)).await?;
    let h2 = match &stream {
        MaybeTls::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        MaybeTls::Plain(_) => false,
    };
    if h2 {
        let tx = Box::pin(handshake_h2(stream, guard, endpoint)).await?;
        pools.borrow_mut().add_h2(key.clone(), tx);
        Ok(Wire::Http2)
    } else {
        let home = home_of(pools, key, cluster.max_idle_per_endpoint.max(1));
        pools
            .borrow_mut()
            .put_idle(h1::Conn::new(stream, guard, home));
        Ok(Wire::Http1)
    }
}

/// Turns a request prepared for HTTP/1.1 (origin-form target, `Host`) into its HTTP/2 form
/// (`https://authority/path`, no `Host`).
fn into_h2_form(req: &mut Request<UpstreamBody>) -> Result<(), ProxyError> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_owned(),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(ProxyError::BadRequest("no authority for an HTTP/2 request"))?
            .to_owned(),
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = http::Uri::try_from(format!("https://{authority}{target}"))
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    req.headers_mut().remove(http::header::HOST);
    *req.version_mut() = http::Version::HTTP_2;
    Ok(())
}

/// Whether a request may be sent again after a connection closed under it: an idempotent
/// method (RFC 9110 §9.2.2) and no body to replay.
fn resendable(req: &Request<UpstreamBody>) -> bool {
    matches!(req.body(), UpstreamBody::Empty)
        && matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
}

/// A copy of a request's head, to send the request again (a retry, or a resend after a stale
/// connection).
pub struct Head {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Head {
    pub fn of<B>(req: &Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    /// The request again, with `body`.
    pub fn request(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// The proxy error for a failed exchange of the HTTP/1.1 client: the client's body failing is
/// the client's fault, anything else the upstream's.
fn h1_error(e: h1::Error) -> ProxyError {
    match e {
        h1::Error::RequestBody(e) => ProxyError::DownstreamBody(e),
        e => ProxyError::UpstreamReset(Box::new(e)),
    }
}

fn home_of(pools: &Rc<RefCell<Pools>>, key: &PoolKey, max_idle: usize) -> h1::Home {
    h1::Home {
        pools: Rc::downgrade(pools),
        key: key.clone(),
        max_idle,
    }
}

/// An upgrade or `CONNECT`: the connection becomes a tunnel.
fn is_tunnel(req: &Request<UpstreamBody>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE)
}
