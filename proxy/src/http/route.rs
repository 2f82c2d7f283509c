//! The route stage: the request's host, path, method and headers matched against the listener's
//! route table; the route answers locally (a direct response, a redirect) or hands the request
//! to the forward stage for the cluster it picks.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response};

use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::check::{authority, split_host_port};
use crate::http::conn::ConnCtx;
use crate::http::forward::{Forward, Forwarding};
use crate::http::path::{self, Canonical};
use crate::http::respond::{Answer, StageError};
use crate::metrics::RouteStats;
use crate::router::{Action, RedirectFrom, RequestView};
use crate::snapshot::ListenerRuntime;
use crate::upstream::body::DownstreamBody;
use crate::wasm::state::{Headers, Routing};

/// Where routing left a request: answered, or on its way to a cluster.
pub enum Routed<'a> {
    /// The route answered (a direct response, a redirect), or the request was refused.
    Answered(Result<Answer, StageError>),
    /// Forwarded to a cluster (or tunneled to it): [`Pending::answer`] waits for the answer.
    Pending(Pending<'a>),
}

/// A request routed to a cluster, not answered yet.
// The forwarding state is the common case and is held in place: boxing it would cost every
// request an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Pending<'a> {
    Forward {
        forwarding: Forwarding<'a>,
        stats: Arc<RouteStats>,
    },
    /// A `CONNECT` tunnel: rare, so its (large) future is on the heap.
    Connect(Pin<Box<dyn Future<Output = Result<Answer, StageError>> + 'a>>),
}

impl Pending<'_> {
    /// The answer of the cluster the request went to. Borrows the request's state where it
    /// is, so that the request's future holds it once.
    pub async fn answer(&mut self) -> Result<Answer, StageError> {
        match self {
            Pending::Forward { forwarding, stats } => forwarding
                .run()
                .await
                .map_err(|e| StageError::on(e, stats))
                .map(|(resp, endpoint)| Answer {
                    resp,
                    stats: stats.clone(),
                    endpoint: Some(endpoint),
                }),
            Pending::Connect(tunnel) => tunnel.await,
        }
    }
}

/// What the stages before routing already did to the request head.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The request's authority, found and checked (`check::authority`) on the head as it is
    /// now.
    pub authority: Option<String>,
    /// `x-request-id` was set (or the client's kept) before: it is not looked at again, so the
    /// access-log line and the upstream see the same one, and a filter that removed it is
    /// obeyed (as Envoy's router does).
    pub request_id: bool,
}

/// Routes a checked request: answered locally, or prepared for the cluster it goes to (all
/// without waiting; the caller awaits [`Pending::answer`]).
pub fn route<'a>(
    conn: &'a ConnCtx,
    listener: &'a ListenerRuntime,
    parts: Parts,
    body: DownstreamBody,
    start: Instant,
    prepared: Prepared,
) -> Routed<'a> {
    let Prepared {
        authority: checked_authority,
        request_id,
    } = prepared;
    // Each return builds the whole value where it is returned: `Routed` holds the forwarding
    // state (hundreds of bytes), and a `Result` around it would be copied out again.
    let refuse = |error| Routed::Answered(Err(StageError::new(error)));
    debug_assert!(
        checked_authority.is_none()
            || authority(&parts).ok().as_deref() == checked_authority.as_deref(),
        "route was given an authority that is not the request's"
    );
    let authority = match checked_authority {
        Some(a) => a,
        None => match authority(&parts) {
            Ok(a) => a.into_owned(),
            Err(e) => return refuse(e),
        },
    };
    let (host, port) = split_host_port(&authority);
    // A cheap clone (shared bytes) so the path and query can be borrowed while `parts` moves on.
    let uri = parts.uri.clone();
    let connect = parts.method == Method::CONNECT;
    // Canonical already: the check stage made the client's path so, and the filter stage let
    // through only a canonical path a filter set. Not done again here (debug builds check it).
    // A CONNECT has none: only routes without a path condition take it.
    let path: Cow<'_, str> = Cow::Borrowed(if connect { "" } else { uri.path() });
    debug_assert!(
        connect
            || matches!(
                path::canonicalize(&path, &listener.http.path),
                Ok(Canonical::Path(Cow::Borrowed(_)))
            ),
        "route got a path that is not canonical: {path:?}"
    );
    let query = uri.query();

    let view = RequestView {
        host: &host,
        path: &path,
        query,
        method: &parts.method,
        headers: &parts.headers,
    };
    let Some((index, route)) = listener.table.find(&view) else {
        return refuse(ProxyError::NoRoute);
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
            Routed::Answered(Ok(Answer::local(resp, &route_stats.local)))
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
                    return Routed::Answered(Err(StageError::on(
                        ProxyError::BadRequest("the redirect location is not a valid header"),
                        &route_stats.local,
                    )));
                }
            }
            route.response_headers.apply(resp.headers_mut());
            Routed::Answered(Ok(Answer::local(resp, &route_stats.local)))
        }
        Action::Forward(split) => {
            let t = split.pick();
            let cluster = &split.targets[t].cluster;
            let stats = route_stats.targets[t].clone();
            if connect {
                let tunnel = async move {
                    match crate::http::upgrade::connect(conn, listener, cluster, parts).await {
                        Ok((resp, endpoint)) => Ok(Answer {
                            resp,
                            stats,
                            endpoint: Some(endpoint),
                        }),
                        Err(e) => Err(StageError {
                            error: e,
                            stats: Some(stats),
                        }),
                    }
                };
                return Routed::Pending(Pending::Connect(Box::pin(tunnel)));
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
                request_id_set: request_id,
                path: &upstream_path,
                path_unchanged,
                query,
                start,
            };
            match forward.start(parts, body) {
                Ok(forwarding) => Routed::Pending(Pending::Forward { forwarding, stats }),
                Err(e) => Routed::Answered(Err(StageError::on(e, &stats))),
            }
        }
    }
}

/// The route a request head matches as filters left it so far (the `route_name` property,
/// asked before the request is routed).
impl Routing for ListenerRuntime {
    fn route_name(&self, head: &Headers) -> Option<String> {
        let text = |name: &[u8]| std::str::from_utf8(head.get(name)?).ok();
        let target = text(b":path")?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let Canonical::Path(path) = path::canonicalize(path, &self.http.path).ok()? else {
            return None;
        };
        let (host, _) = split_host_port(text(b":authority").unwrap_or_default());
        let method = Method::from_bytes(head.get(b":method")?).ok()?;
        let view = RequestView {
            host: &host,
            path: &path,
            query,
            method: &method,
            headers: &head.map,
        };
        self.table.find(&view).map(|(_, r)| r.name.clone())
    }

    fn canonical_target(&self, target: &str) -> Option<String> {
        path::canonical_target(target, &self.http.path)
            .ok()
            .flatten()
    }
}
