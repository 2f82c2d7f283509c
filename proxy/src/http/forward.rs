//! Forwarding one request to a cluster, try after try: prepare the upstream request once; then
//! for each try pick an endpoint (not one already tried), pass the circuit breakers, send with
//! the try's deadline, tell the cluster how it went (latency estimate, outlier detection), and
//! either answer or — when the policy, the body, the deadline, the budget and the breakers all
//! allow — wait a back-off and try again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::upgrade::OnUpgrade;

use crate::config::UpstreamProtocol;
use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::conn::ConnCtx;
use crate::http::headers;
use crate::router::{Route, TryFailure};
use crate::snapshot::ListenerRuntime;
use crate::upstream::body::{
    DownstreamBody, IdleTimer, Replay, UpstreamBody, UpstreamResponseBody,
};
use crate::upstream::pool::{self, Head, Wire};
use crate::upstream::{
    Breaker, Cluster, EndpointGuard, HashSource, Outcome, Permit, PickArgs, hash64, nanos_at,
};

/// What a forwarded request needs to know: the request's own strings (`'s`) only to prepare
/// its head, the rest (`'a`) from try to try.
pub struct Forward<'a, 's> {
    pub conn: &'a ConnCtx,
    pub listener: &'a ListenerRuntime,
    pub route: &'a Route,
    pub cluster: &'a Arc<Cluster>,
    pub authority: &'s str,
    pub path: &'s str,
    /// `path` is the request's own: an origin-form request URI can be forwarded as it is.
    pub path_unchanged: bool,
    pub query: Option<&'s str>,
    pub start: Instant,
    /// `x-request-id` is set already (see [`crate::http::route::Prepared`]).
    pub request_id_set: bool,
}

/// The response, with the endpoint that produced it.
pub type Forwarded = (Response<ResponseBody>, EndpointGuard);

/// Where each try's request body comes from.
enum Source {
    /// No body.
    Empty,
    /// Streamed once (no retries configured).
    Once(Option<DownstreamBody>),
    /// Kept for replay.
    Replay(std::rc::Rc<std::cell::RefCell<Replay>>),
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Parses `grpc-timeout` (`1..8 digits` + `H M S m u n`).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Classifies a failed try for the retry policy and for the cluster's outcome tracking.
fn classify(e: &ProxyError) -> (TryFailure, Option<Outcome>) {
    match e {
        ProxyError::ConnectFailed { .. }
        | ProxyError::ConnectTimeout(_)
        | ProxyError::UpstreamTls { .. }
        | ProxyError::Handshake { .. } => {
            (TryFailure::ConnectFailure, Some(Outcome::ConnectFailure))
        }
        ProxyError::UpstreamReset(err) => {
            // An HTTP/2 stream the upstream refused unprocessed, somewhere in the causes.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
            let mut refused = false;
            while let Some(c) = cause {
                if let Some(h2) = c.downcast_ref::<h2::Error>() {
                    refused = h2.reason() == Some(h2::Reason::REFUSED_STREAM);
                    break;
                }
                cause = c.source();
            }
            if refused {
                (TryFailure::RefusedStream, None)
            } else {
                (TryFailure::Reset, Some(Outcome::Reset))
            }
        }
        _ => (TryFailure::Final, None),
    }
}

/// The key `ring_hash` hashes, when the request has it.
fn hash_of(key: &HashSource, headers: &HeaderMap, peer: SocketAddr) -> Option<u64> {
    match key {
        HashSource::Header(name) => {
            let v = headers.get(name)?;
            Some(hash64(v.as_bytes()))
        }
        HashSource::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| hash64(v.as_bytes())),
        HashSource::SourceIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash64(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash64(&ip.octets()),
        }),
    }
}

impl<'a> Forward<'a, '_> {
    /// Prepares the upstream request head: hop-by-hop fields out, forwarding fields in, the
    /// route's edits, the target and `Host` for the wire chosen.
    fn prepare(&self, parts: &mut Parts, wire: Wire, upgrade: bool) -> Result<(), ProxyError> {
        let h = &mut parts.headers;
        headers::strip_hop_by_hop(h, upgrade);
        // hyper answers `100 Continue` itself when the body is first read.
        h.remove(header::EXPECT);
        if self.listener.forwarded_for {
            headers::set_forwarded(h, &self.conn.peer_header, self.conn.scheme);
        }
        if !self.request_id_set {
            headers::ensure_request_id(h);
        }
        self.route.request_headers.apply(h);
        // The common HTTP/1.1 case (origin-form URI, own Host header, nothing rewritten) is
        // forwarded without rebuilding the URI or the Host header.
        let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
        // A negotiated request is prepared for HTTP/1.1 (and turned into HTTP/2 when the
        // endpoint speaks it).
        let h1_form = wire != Wire::Http2;
        let keep_as_is = h1_form
            && origin_form
            && self.path_unchanged
            && self.route.host_rewrite.is_none()
            && parts.headers.contains_key(header::HOST);
        if !keep_as_is {
            let authority = match &self.route.host_rewrite {
                Some(v) => v.clone(),
                None => HeaderValue::from_str(self.authority)
                    .map_err(|_| ProxyError::BadRequest("invalid authority"))?,
            };
            let mut target =
                String::with_capacity(self.path.len() + self.query.map_or(0, |q| q.len() + 1) + 32);
            if !h1_form {
                target.push_str("http://");
                target.push_str(authority.to_str().unwrap_or_default());
            }
            target.push_str(self.path);
            if let Some(q) = self.query {
                target.push('?');
                target.push_str(q);
            }
            parts.uri = Uri::try_from(target)
                .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
            if h1_form {
                parts.headers.insert(header::HOST, authority);
            } else {
                parts.headers.remove(header::HOST);
            }
        }
        parts.version = if h1_form {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        };
        Ok(())
    }

    /// Prepares the request for its cluster: the wire it goes over, its upstream head, where
    /// its body comes from on each try, and its deadline. Nothing is sent yet.
    pub fn start(
        self,
        mut parts: Parts,
        body: DownstreamBody,
    ) -> Result<Forwarding<'a>, ProxyError> {
        let cluster = self.cluster;
        let policy = &self.route.retries;
        let upgrade = parts.version == Version::HTTP_11 && headers::wants_upgrade(&parts.headers);
        let wire = match cluster.protocol {
            UpstreamProtocol::Http1 => Wire::Http1,
            UpstreamProtocol::Http2 => Wire::Http2,
            UpstreamProtocol::Downstream if parts.version == Version::HTTP_2 => Wire::Http2,
            UpstreamProtocol::Downstream => Wire::Http1,
            // An upgrade is an HTTP/1.1 affair (ALPN offers only http/1.1 for it).
            UpstreamProtocol::Auto if cluster.tls.is_none() || upgrade => Wire::Http1,
            UpstreamProtocol::Auto => Wire::Negotiated,
        };
        let grpc = crate::errors::is_grpc(&parts.headers);
        // Said at once, not found out as a hang or a reset: gRPC cannot go over HTTP/1.1.
        if wire == Wire::Http1 && grpc {
            return Err(ProxyError::GrpcNeedsHttp2(cluster.name.clone()));
        }
        if upgrade && wire == Wire::Http2 {
            return Err(ProxyError::UpgradeNotSupported(
                "the cluster speaks HTTP/2 only",
            ));
        }
        let downstream_upgrade = if upgrade {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        let hash = cluster
            .hash_key
            .as_ref()
            .and_then(|k| hash_of(k, &parts.headers, self.conn.peer));
        // The overall deadline: the route's timeout, tightened by a gRPC client's own.
        let grpc_deadline = grpc.then(|| grpc_timeout(&parts.headers)).flatten();
        let overall = match (self.route.timeout, grpc_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.prepare(&mut parts, wire, upgrade)?;

        let downstream_rx = &self.listener.stats.rx_bytes;
        let has_body = !body.is_end_stream();
        let idle_timeout = self.listener.http.stream_idle_timeout.non_zero();
        let source = if !has_body {
            Source::Empty
        } else if policy.attempts > 0 && !upgrade {
            // A body announced as longer than the buffer is streamed, and replayable only until
            // its first byte is sent.
            let announced: Option<usize> = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let limit = match announced {
                Some(n) if n > policy.replay_buffer => 0,
                _ => policy.replay_buffer,
            };
            Source::Replay(Replay::new(body, limit, downstream_rx.clone()))
        } else {
            Source::Once(Some(body))
        };
        let request = Request::from_parts(parts, UpstreamBody::Empty);
        // A copy of the head, for retries after a request was (maybe) sent. A request that was
        // not sent at all comes back from the pool, so retrying connect failures needs none.
        let head = (policy.attempts > 0 && policy.retries_after_sending(wire == Wire::Http2))
            .then(|| Box::new(Head::of(&request)));
        Ok(Forwarding {
            conn: self.conn,
            listener: self.listener,
            route: self.route,
            cluster,
            start: self.start,
            wire,
            upgrade,
            downstream_upgrade,
            hash,
            overall,
            deadline: overall.map(|d| self.start + d),
            idle_timeout,
            // Both bodies of the exchange count as activity; only needed when there are two.
            shared_activity: (has_body && idle_timeout.is_some())
                .then(|| std::rc::Rc::new(std::cell::Cell::new(0u64))),
            has_body,
            source,
            request: Some(request),
            head,
        })
    }
}

/// A request on its way to a cluster, prepared by [`Forward::start`]: its state from try to
/// try. It is awaited in place ([`Forwarding::run`] borrows it), so the request's future holds
/// it once instead of moving it into each stage's future.
pub struct Forwarding<'a> {
    conn: &'a ConnCtx,
    listener: &'a ListenerRuntime,
    route: &'a Route,
    cluster: &'a Arc<Cluster>,
    start: Instant,
    wire: Wire,
    upgrade: bool,
    /// The client's side of an upgrade, joined to the upstream's when it accepts.
    downstream_upgrade: Option<OnUpgrade>,
    hash: Option<u64>,
    /// The overall timeout, and the deadline it makes.
    overall: Option<Duration>,
    deadline: Option<Instant>,
    idle_timeout: Option<Duration>,
    shared_activity: Option<std::rc::Rc<std::cell::Cell<u64>>>,
    has_body: bool,
    source: Source,
    /// The first try's request (or one a try gave back unsent).
    request: Option<Request<UpstreamBody>>,
    /// A copy of the head, when a request may be tried again after it was sent.
    head: Option<Box<Head>>,
}

impl Forwarding<'_> {
    /// The body idle timer of one try's request or response.
    fn idle_timer(&self) -> Option<IdleTimer> {
        self.idle_timeout
            .map(|t| IdleTimer::new(t, self.cluster, self.shared_activity.as_ref()))
    }

    /// Tries the request until an answer, a final failure, or the end of the retry policy.
    pub async fn run(&mut self) -> Result<Forwarded, ProxyError> {
        let (cluster, route, listener) = (self.cluster, self.route, self.listener);
        let policy = &route.retries;
        let upstream_tx = &cluster.stats.tx_bytes;
        let downstream_rx = &listener.stats.rx_bytes;
        cluster.budget.deposit(nanos_at(self.start) / 1_000_000_000);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retry_permit: Option<Permit> = None;
        let mut attempt: u32 = 0;
        let mut try_start = self.start;
        loop {
            let requests = cluster.enter(Breaker::Requests)?;
            let endpoint = cluster
                .pick(&PickArgs {
                    hash: self.hash,
                    exclude: &tried,
                })
                .ok_or_else(|| ProxyError::NoHealthyUpstream(cluster.name.clone()))?;
            let idle = self.idle_timer();
            let body = match &mut self.source {
                Source::Empty => UpstreamBody::Empty,
                Source::Once(b) => match b.take() {
                    Some(inner) => UpstreamBody::Stream {
                        inner,
                        downstream_rx: downstream_rx.clone(),
                        upstream_tx: upstream_tx.clone(),
                        idle,
                    },
                    None => UpstreamBody::Empty,
                },
                Source::Replay(state) => {
                    UpstreamBody::Replay(Replay::attempt(state, upstream_tx.clone(), idle))
                }
            };
            let req = match (self.request.take(), &self.head) {
                (Some(r), _) => r.map(|_| body),
                (None, Some(h)) => h.request(body),
                // Unreachable: a retry is only decided when one of the two is there.
                (None, None) => return Err(ProxyError::BadRequest("request lost before a retry")),
            };

            let guard = EndpointGuard::new(endpoint.clone()).holding(requests);
            let remaining = self
                .deadline
                .map(|d| d.saturating_duration_since(try_start));
            let try_timeout = match (policy.per_try_timeout, remaining) {
                (Some(p), Some(r)) => Some(p.min(r)),
                (p, r) => p.or(r),
            };
            // With no timeout at all, a request whose body is done waits for response headers
            // at most the stream idle timeout.
            let try_timeout = try_timeout.or(if self.has_body {
                None
            } else {
                self.idle_timeout
            });
            // The send is made in each arm, not before the match: a future bound to a local
            // keeps its storage to the end of the local's scope.
            let (pools, wire) = (&self.conn.worker.pools, self.wire);
            let result = match try_timeout {
                Some(t) => {
                    let sent = pool::send(pools, cluster, &endpoint, wire, req);
                    match tokio::time::timeout(t, sent).await {
                        Ok(r) => r,
                        Err(_) => Err(ProxyError::UpstreamTimeout(t).into()),
                    }
                }
                None => pool::send(pools, cluster, &endpoint, wire, req).await,
            };
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(try_start);
            drop(retry_permit.take());
            let deadline_passed = self.deadline.is_some_and(|d| now >= d);

            // Learn from the try, and decide: answer, or try again.
            let retry_wanted = match &result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let outcome = Outcome::Response {
                        status,
                        // Only a 429's `Retry-After` is heeded (as how long to shun the endpoint).
                        retry_after: (status == 429)
                            .then(|| retry_after(resp.headers()))
                            .flatten(),
                    };
                    cluster.report_at(&endpoint, outcome, elapsed, nanos_at(now));
                    policy.retries_response(status, || grpc_status(resp.headers()))
                }
                Err(failure) => {
                    let (f, outcome) = match &failure.error {
                        ProxyError::UpstreamTimeout(_) => {
                            let per_try = !deadline_passed;
                            cluster
                                .stats
                                .timeout(if per_try { "per_try" } else { "request" });
                            let f = if per_try {
                                TryFailure::PerTryTimeout
                            } else {
                                TryFailure::Final
                            };
                            (f, Some(Outcome::Timeout))
                        }
                        e => {
                            if matches!(e, ProxyError::ConnectTimeout(_)) {
                                cluster.stats.timeout("connect");
                            }
                            classify(e)
                        }
                    };
                    if let Some(o) = outcome {
                        cluster.report_at(&endpoint, o, elapsed, nanos_at(now));
                    }
                    policy.retries_failure(f)
                }
            };
            let replayable = match &self.source {
                Source::Replay(s) => s.borrow().replayable(),
                Source::Once(b) => b.is_some(),
                Source::Empty => true,
            };
            let unsent = match &result {
                Err(f) => f.request.is_some(),
                Ok(_) => false,
            };
            let can_retry = retry_wanted
                && attempt < policy.attempts
                && replayable
                && (unsent || self.head.is_some())
                && !deadline_passed
                && !self.upgrade;
            if can_retry {
                let backoff = policy.backoff(attempt + 1);
                let fits = self.deadline.is_none_or(|d| now + backoff < d);
                let budget = fits && cluster.budget.withdraw(nanos_at(now) / 1_000_000_000);
                let permit = if budget {
                    cluster.breakers.enter(Breaker::Retries).ok()
                } else {
                    None
                };
                if permit.is_some() {
                    tracing::debug!(
                        cluster = %cluster.name,
                        endpoint = %endpoint.address,
                        attempt = attempt + 1,
                        "retrying"
                    );
                    retry_permit = permit;
                    attempt += 1;
                    tried.push(endpoint.address);
                    cluster.stats.retries.inc();
                    if let Err(f) = result {
                        self.request = f.request;
                    }
                    drop(guard);
                    tokio::time::sleep(backoff).await;
                    try_start = Instant::now();
                    continue;
                }
                if fits {
                    cluster.stats.retry_overflow.inc();
                }
            }

            return match result {
                Ok(resp) => Ok(self.respond(resp, guard)),
                Err(f) => match f.error {
                    ProxyError::UpstreamTimeout(_) if deadline_passed => Err(
                        ProxyError::UpstreamTimeout(self.overall.unwrap_or_default()),
                    ),
                    e => Err(e),
                },
            };
        }
    }

    /// The downstream response for an upstream one: hop-by-hop out, route edits in, and an
    /// accepted upgrade spliced through.
    fn respond(
        &mut self,
        mut resp: Response<UpstreamResponseBody>,
        guard: EndpointGuard,
    ) -> Forwarded {
        let upgrade = self.upgrade;
        let idle = self.idle_timer();
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        // Only hyper's client carries upgrades (a 101 elsewhere is refused as malformed).
        if switching
            && let Some(down) = self.downstream_upgrade.take()
            && matches!(resp.body(), UpstreamResponseBody::Hyper(_))
        {
            let up = hyper::upgrade::on(&mut resp);
            crate::http::upgrade::spawn_tunnel(
                self.conn,
                self.listener,
                down,
                up,
                crate::splice::Side {
                    read: self.cluster.stats.rx_bytes.clone(),
                    written: self.cluster.stats.tx_bytes.clone(),
                },
                self.listener.http.stream_idle_timeout.non_zero(),
                None,
            );
        }
        let (mut rparts, rbody) = resp.into_parts();
        headers::strip_hop_by_hop(&mut rparts.headers, switching && upgrade);
        self.route.response_headers.apply(&mut rparts.headers);
        let body = if switching {
            ResponseBody::full(Bytes::new())
        } else {
            ResponseBody::upstream(rbody, self.cluster.stats.rx_bytes.clone(), idle)
        };
        (Response::from_parts(rparts, body), guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-timeout", v.parse().expect("value"));
            grpc_timeout(&m)
        };
        assert_eq!(h("100m"), Some(Duration::from_millis(100)));
        assert_eq!(h("2S"), Some(Duration::from_secs(2)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("5x"), None);
        assert_eq!(h("123456789m"), None, "at most 8 digits");
        assert_eq!(h("m"), None);
    }

    #[test]
    fn cookies_and_headers_hash_stably() {
        let mut m = HeaderMap::new();
        m.insert(
            header::COOKIE,
            "a=1; session=abc; b=2".parse().expect("cookie"),
        );
        m.insert("x-user", "abc".parse().expect("value"));
        let peer: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let by_cookie = hash_of(&HashSource::Cookie("session".into()), &m, peer);
        let by_header = hash_of(
            &HashSource::Header(http::HeaderName::from_static("x-user")),
            &m,
            peer,
        );
        assert_eq!(by_cookie, by_header);
        assert_eq!(hash_of(&HashSource::Cookie("none".into()), &m, peer), None);
        assert_eq!(
            hash_of(&HashSource::SourceIp, &m, peer),
            hash_of(
                &HashSource::SourceIp,
                &m,
                "10.0.0.1:6000".parse().expect("addr")
            )
        );
    }
}
