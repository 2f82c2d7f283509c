//! The end-of-request stage: what every request leaves behind once its response body is done —
//! its metrics, the filters' end (`on_log`), the endpoint's outcome, the upstream connection
//! back to its pool, and the downstream connection marked idle. One explicit stage: every
//! answer, from whichever stage, ends here ([`crate::http::respond::finish`] ties it to the
//! response body, which closes it).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::http::conn::ConnActivity;
use crate::metrics::RouteStats;
use crate::upstream::{EndpointGuard, PooledH1};
use crate::wasm::chain::Chain;

/// The end of one request, closed when its response body is done: records the request's
/// metrics, ends the endpoint's in-flight count, marks the downstream connection idle, and gives
/// a cleanly finished HTTP/1 upstream connection back to its pool.
pub struct Record {
    pub start: Instant,
    pub status: u16,
    pub stats: Arc<RouteStats>,
    pub downstream_tx: Counter,
    pub activity: Arc<ConnActivity>,
    pub endpoint: Option<EndpointGuard>,
    pub pooled: Option<PooledH1>,
    /// The request's run through the listener's filters: ends (`on_log`, …) after this.
    pub filters: Option<Rc<Chain>>,
}

impl Record {
    pub(crate) fn close(mut self, finished: bool) {
        let elapsed = self.start.elapsed();
        self.stats.record(self.status, elapsed.as_secs_f64());
        if let Some(chain) = self.filters.take() {
            chain.record_end(self.status, elapsed);
        }
        if let Some(ep) = self.endpoint.take() {
            ep.finish(self.status, finished);
        }
        if let Some(conn) = self.pooled.take()
            && finished
        {
            conn.release();
        }
        self.activity.end_request();
    }
}
