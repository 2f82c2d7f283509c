//! The end-of-request stage: what every request leaves behind once its response body is done —
//! its metrics, the filters' end (`on_log`), the endpoint's outcome, the upstream connection
//! back to its pool, and the downstream connection marked idle. One explicit stage: every
//! answer, from whichever stage, ends here ([`crate::http::respond::finish`] ties it to the
//! response body, which closes it).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use prometheus_client::metrics::counter::Counter;

use crate::access_log::{AccessLog, Entry, FILTER_FIELD_PREFIX, Outcome};
use crate::http::conn::{ConnActivity, ConnCtx};
use crate::http::headers;
use crate::metrics::RouteStats;
use crate::upstream::EndpointGuard;
use crate::wasm::chain::Chain;

/// The end of one request, closed when its response body is done: records the request's
/// metrics, ends the endpoint's in-flight count and marks the downstream connection idle (an
/// HTTP/1.1 upstream connection went back to its pool when its response body ended).
pub struct Record {
    pub start: Instant,
    pub status: u16,
    pub stats: Arc<RouteStats>,
    pub downstream_tx: Counter,
    pub activity: Arc<ConnActivity>,
    pub endpoint: Option<EndpointGuard>,
    /// The request's run through the listener's filters: ends (`on_log`, …) after this.
    pub filters: Option<Rc<Chain>>,
    /// The request's access-log line, written last.
    pub logged: Option<Box<Logged>>,
    /// Response body bytes sent downstream.
    pub body_sent: u64,
}

/// A request on a listener with an access log: the log, and what its line says.
#[derive(Debug)]
pub struct Logged {
    pub log: Arc<AccessLog>,
    pub entry: Entry,
}

impl Logged {
    /// The access-log entry of a request as it arrived, when its listener logs. The request
    /// gets its `x-request-id` here (a well-formed one it carries is kept), so the line and the
    /// upstream see the same.
    pub fn begin(
        conn: &ConnCtx,
        log: Option<&Arc<AccessLog>>,
        parts: &mut Parts,
    ) -> Option<Box<Logged>> {
        let log = log?;
        headers::ensure_request_id(&mut parts.headers);
        let h = &parts.headers;
        let entry = Entry {
            start: std::time::SystemTime::now(),
            method: parts.method.clone(),
            path: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("")),
            original_path: None,
            authority: parts
                .uri
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
                .or_else(|| h.get(http::header::HOST).cloned()),
            version: parts.version,
            user_agent: h.get(http::header::USER_AGENT).cloned(),
            request_id: h.get(&headers::X_REQUEST_ID).cloned(),
            headers: log.headers.iter().map(|n| h.get(n).cloned()).collect(),
            source: conn.peer,
            identity: conn
                .tls
                .as_ref()
                .and_then(|t| t.peer.as_ref())
                .map(|p| p.principal().to_owned()),
            received: Default::default(),
            sent: 0,
            grpc_status: None,
            upstream: None,
        };
        Some(Box::new(Logged {
            log: log.clone(),
            entry,
        }))
    }
}

impl Record {
    pub(crate) fn close(mut self, finished: bool) {
        let elapsed = self.start.elapsed();
        self.stats.record(self.status, elapsed.as_secs_f64());
        if let Some(chain) = &self.filters {
            chain.record_end(self.status, elapsed, self.body_sent);
        }
        if let Some(logged) = self.logged.take() {
            write_line(
                *logged,
                self.status,
                elapsed,
                &self.stats,
                self.filters.as_deref(),
            );
        }
        self.filters = None;
        if let Some(ep) = self.endpoint.take() {
            ep.finish(self.status, finished);
        }
        self.activity.end_request();
    }
}

/// Writes a request's access-log line. With filters, after they ended (`on_log` may still add
/// fields), with the fields they set.
pub fn write_line(
    logged: Logged,
    status: u16,
    elapsed: std::time::Duration,
    stats: &RouteStats,
    filters: Option<&Chain>,
) {
    let Logged { log, entry } = logged;
    let outcome = Outcome {
        status,
        duration: elapsed,
        route: stats.route(),
        cluster: stats.cluster(),
    };
    let Some(chain) = filters else {
        log.log(&entry, &outcome, std::iter::empty());
        return;
    };
    chain.end();
    let stream = chain.stream.borrow();
    entry.received.fetch_max(
        stream.info.request_body_bytes,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut fields: Vec<(&[u8], &[u8])> = stream
        .filter_state
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(FILTER_FIELD_PREFIX)?, &v[..])))
        .collect();
    // In one order whatever the map's: by name.
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    log.log(&entry, &outcome, fields.into_iter());
}
