//! The response body sent downstream: the upstream's streamed through (counted, under the
//! stream idle timer), one the proxy made, or either through the listener's filters. When it is
//! dropped — sent, or abandoned — it closes the request's [`Record`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use crate::errors::BoxError;
use crate::http::record::Record;
use crate::upstream::body::{DynBody, IdleTimer, UpstreamResponseBody, idle_error};

enum Kind {
    Full(Option<Bytes>),
    /// Through the listener's filters.
    Filtered(DynBody),
    Upstream {
        inner: UpstreamResponseBody,
        /// `weft_upstream_received_bytes_total` of the cluster.
        upstream_rx: Counter,
        idle: Option<IdleTimer>,
    },
}

/// The response body sent downstream: the upstream's body streamed through, or one the proxy
/// made. When it is dropped (sent, or abandoned), the request's [`Record`] is closed.
pub struct ResponseBody {
    kind: Kind,
    record: Option<Record>,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            record: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(
        inner: UpstreamResponseBody,
        upstream_rx: Counter,
        idle: Option<IdleTimer>,
    ) -> Self {
        ResponseBody {
            kind: Kind::Upstream {
                inner,
                upstream_rx,
                idle,
            },
            record: None,
        }
    }

    /// This body through the listener's filters.
    pub fn filtered(body: DynBody) -> Self {
        ResponseBody {
            kind: Kind::Filtered(body),
            record: None,
        }
    }

    /// Ties the end of the request's record to the end of this body.
    pub fn attach(&mut self, record: Record) {
        self.record = Some(record);
    }

    fn finished(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
            Kind::Filtered(b) => b.is_end_stream(),
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
            Kind::Filtered(b) => b.as_mut().poll_frame(cx),
            Kind::Upstream {
                inner,
                upstream_rx,
                idle,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        upstream_rx.inc_by(d.len() as u64);
                    }
                    if let Some(t) = idle {
                        t.moved();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    if idle.as_mut().is_some_and(|t| t.expired(cx)) {
                        Poll::Ready(Some(Err(idle_error())))
                    } else {
                        Poll::Pending
                    }
                }
            },
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(x)) = (&polled, &mut this.record) {
            if let Some(d) = frame.data_ref() {
                x.downstream_tx.inc_by(d.len() as u64);
                x.body_sent += d.len() as u64;
                if let Some(l) = &mut x.logged {
                    l.entry.sent += d.len() as u64;
                }
            } else if let (Some(t), Some(l)) = (frame.trailers_ref(), &mut x.logged)
                && let Some(g) = t.get("grpc-status")
            {
                l.entry.grpc_status = Some(g.clone());
            }
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
            Kind::Filtered(b) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let finished = self.finished();
        if let Some(x) = self.record.take() {
            x.close(finished);
        }
    }
}
