//! The life of one request, top to bottom, one stage after another:
//! [`check`](crate::http::check) (refuse, canonicalize) → [`filter`](crate::http::filter) (on
//! listeners with filters) → [`route`](crate::http::route) → [`forward`](crate::http::forward)
//! → [`respond`](crate::http::respond) (proxy errors) → [`record`](crate::http::record) (the
//! end of the request). This module only calls them in order.

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
use crate::http::{filter, respond, route};
use crate::snapshot::ListenerRuntime;
use crate::upstream::body::DownstreamBody;

/// hyper's service function: every failure is a response, except a stream a filter closed.
pub async fn handle(
    conn: Rc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, StreamReset> {
    let start = Instant::now();
    conn.activity.begin_request();
    let snap = conn.worker.snapshot();
    let listener: &Arc<ListenerRuntime> = snap
        .listeners
        .get(&*conn.listener.name)
        .unwrap_or(&conn.listener);
    let http1 = req.version() < Version::HTTP_2;
    let grpc = errors::is_grpc(req.headers());
    let (mut parts, body) = req.into_parts();
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
            route::route(&conn, listener, parts, body, start).await
        }
        Ok(Checked::Redirect(location)) => Ok(respond::canonical_redirect(listener, &location)),
        Err(e) => Err(StageError::new(e)),
    };
    let answer = answer.unwrap_or_else(|f| respond::error_answer(&conn, listener, f, http1, grpc));
    Ok(respond::finish(
        &conn, listener, answer, start, None, logged,
    ))
}
