//! The life of one request, top to bottom, one stage after another:
//! [`check`](crate::http::check) (refuse, canonicalize) → [`filter`](crate::http::filter) (on
//! listeners with filters) → [`route`](crate::http::route) → [`forward`](crate::http::forward)
//! → [`respond`](crate::http::respond) (proxy errors) → [`record`](crate::http::record) (the
//! end of the request). This module only calls them in order.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, Version};
use hyper::body::Incoming;

use crate::errors::{self, StreamReset};
use crate::http::body::ResponseBody;
use crate::http::check::{self, Checked};
use crate::http::conn::ConnCtx;
use crate::http::record::Logged;
use crate::http::respond::StageError;
use crate::http::route::Routed;
use crate::http::{filter, respond, route};
use crate::snapshot::ListenerRuntime;
use crate::upstream::body::DownstreamBody;

/// hyper's service function: every failure is a response, except a stream a filter closed.
///
/// Written as a function returning an `async move` block, not an `async fn`: an `async fn`
/// keeps its arguments and the locals they are moved into side by side in its future, which
/// hyper moves (for HTTP/2, several times per stream). The block captures the request's parts
/// and uses them in place.
pub fn handle(
    conn: Rc<ConnCtx>,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ResponseBody>, StreamReset>> {
    let start = Instant::now();
    let http1 = req.version() < Version::HTTP_2;
    let grpc = errors::is_grpc(req.headers());
    let (mut parts, body) = req.into_parts();
    async move {
        conn.activity.begin_request();
        let snap = conn.worker.snapshot();
        let listener: &Arc<ListenerRuntime> = snap
            .listeners
            .get(&*conn.listener.name)
            .unwrap_or(&conn.listener);
        let mut logged = Logged::begin(&conn, listener.access_log.as_ref(), &mut parts);
        let received = logged.as_ref().map(|l| l.entry.received.clone());
        let checked = check::check(&conn, listener, &mut parts);
        if let (Some(l), Ok(Checked::Proceed)) = (&mut logged, &checked) {
            l.entry.canonical_path(parts.uri.path_and_query());
        }
        let answer = match checked {
            Ok(Checked::Proceed) if !listener.filters.is_empty() => {
                // On the heap: the filter stage's state is large, and would otherwise make every
                // request's future (moved around by hyper) larger.
                let answered = Box::pin(filter::run(
                    &conn, listener, parts, body, start, http1, grpc, logged,
                ))
                .await;
                if answered.is_err() {
                    conn.activity.end_request();
                }
                return answered;
            }
            Ok(Checked::Proceed) => {
                let body = DownstreamBody::received(body, received);
                // Awaited where it is: the forwarding state is held once, by this future.
                // An access log set the request's id already (its line shows it).
                let prepared = route::Prepared {
                    authority: None,
                    request_id: logged.is_some(),
                };
                let mut routed = route::route(&conn, listener, parts, body, start, prepared);
                match routed {
                    Routed::Answered(answer) => answer,
                    Routed::Pending(ref mut pending) => pending.answer().await,
                }
            }
            Ok(Checked::Redirect(location)) => Ok(respond::canonical_redirect(listener, &location)),
            Err(e) => Err(StageError::new(e)),
        };
        let answer =
            answer.unwrap_or_else(|f| respond::error_answer(&conn, listener, f, http1, grpc));
        Ok(respond::finish(
            &conn, listener, answer, start, None, logged,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::future::Future;
    use std::mem::size_of;
    use std::rc::Rc;
    use std::sync::Arc;

    use http::Request;

    use crate::http::route::Pending;
    use crate::upstream::body::UpstreamBody;
    use crate::upstream::pool::{Pools, Wire};
    use crate::upstream::{Cluster, Endpoint};

    /// The size of the future a function returns, without calling it.
    fn future_of<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        size_of::<F>()
    }

    fn pending_answer<'a: 'b, 'b, F: Future + 'b>(
        _: impl FnOnce(&'b mut Pending<'a>) -> F,
    ) -> usize {
        size_of::<F>()
    }

    fn pool_send<'a, F: Future + 'a>(
        _: impl FnOnce(
            &'a Rc<RefCell<Pools>>,
            &'a Cluster,
            &'a Arc<Endpoint>,
            Wire,
            Request<UpstreamBody>,
        ) -> F,
    ) -> usize {
        size_of::<F>()
    }

    /// Every request's future is moved by hyper (for HTTP/2, into a task of its own), and
    /// each stage's future sits inside the one before it. An `async fn` that keeps its
    /// arguments beside the locals made from them, or a future bound to a local and awaited
    /// in one arm only, grows all of them by hundreds of bytes (the request's future was
    /// 6.2 KB before these limits). The limits leave a margin of about a sixth.
    #[test]
    fn request_futures_stay_small() {
        let sizes = [
            ("request::handle", future_of(super::handle), 3_200),
            (
                "route::Pending::answer",
                pending_answer(Pending::answer),
                2_100,
            ),
            ("pool::send", pool_send(crate::upstream::pool::send), 1_100),
            ("h1::send", future_of(crate::upstream::h1::send), 560),
        ];
        for (name, size, limit) in sizes {
            assert!(
                size <= limit,
                "the future of {name} is {size} bytes, over its limit of {limit}"
            );
        }
    }
}
