//! Bodies on their way through the proxy: streamed frame by frame, counted as they pass, and the
//! end of an exchange recorded (metrics, connection reuse) when the response body is done.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;

use crate::http::server::ConnActivity;
use crate::metrics::RouteStats;
use crate::upstream::{EndpointGuard, PooledH1};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body sent upstream: the downstream body, streamed and counted.
pub enum UpstreamBody {
    Empty,
    Stream {
        inner: Incoming,
        /// `weft_downstream_received_bytes_total` of the listener.
        downstream_rx: Counter,
        /// `weft_upstream_sent_bytes_total` of the cluster.
        upstream_tx: Counter,
    },
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Stream {
                inner,
                downstream_rx,
                upstream_tx,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        downstream_rx.inc_by(d.len() as u64);
                        upstream_tx.inc_by(d.len() as u64);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

enum Kind {
    Full(Option<Bytes>),
    Upstream {
        inner: Incoming,
        /// `weft_upstream_received_bytes_total` of the cluster.
        upstream_rx: Counter,
    },
}

/// The response body sent downstream: the upstream's body streamed through, or one the proxy
/// made. When it is dropped (sent, or abandoned), the exchange's [`Exchange`] is closed.
pub struct ResponseBody {
    kind: Kind,
    exchange: Option<Exchange>,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            exchange: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(inner: Incoming, upstream_rx: Counter) -> Self {
        ResponseBody {
            kind: Kind::Upstream { inner, upstream_rx },
            exchange: None,
        }
    }

    /// Ties the end of this body to the end of the exchange.
    pub fn attach(&mut self, exchange: Exchange) {
        self.exchange = Some(exchange);
    }

    fn finished(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { inner, upstream_rx } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        upstream_rx.inc_by(d.len() as u64);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(x)) = (&polled, &this.exchange)
            && let Some(d) = frame.data_ref()
        {
            x.downstream_tx.inc_by(d.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.finished()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let finished = self.finished();
        if let Some(x) = self.exchange.take() {
            x.close(finished);
        }
    }
}

/// One request/response exchange, closed when its response body is done: records the request's
/// metrics, ends the endpoint's in-flight count, marks the downstream connection idle, and gives
/// a cleanly finished HTTP/1 upstream connection back to its pool.
pub struct Exchange {
    pub start: Instant,
    pub status: u16,
    pub stats: Arc<RouteStats>,
    pub downstream_tx: Counter,
    pub activity: Arc<ConnActivity>,
    pub endpoint: Option<EndpointGuard>,
    pub pooled: Option<PooledH1>,
}

impl Exchange {
    fn close(mut self, finished: bool) {
        self.stats
            .record(self.status, self.start.elapsed().as_secs_f64());
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
