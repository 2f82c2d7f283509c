//! Request bodies on their way upstream: the client's (as received, or through the listener's
//! filters), streamed frame by frame and counted as they pass, kept for a retry to replay, or a
//! filter's callout; and the stream idle timer both directions share.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;

use tokio::time::Sleep;

use super::Cluster;
pub use crate::errors::BoxError;

/// A body of the stages above (the filter chain's), seen only as a body.
pub type DynBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>;

/// The request body as the client sends it: as received, or through the listener's filters.
pub enum DownstreamBody {
    Plain(Incoming),
    /// As received, its data bytes counted (for the access log).
    Counted(Incoming, Arc<AtomicU64>),
    /// Through the listener's filters.
    Filtered(DynBody),
}

impl DownstreamBody {
    /// The client's body as received, counted into `received` when there is a counter.
    pub fn received(body: Incoming, received: Option<Arc<AtomicU64>>) -> Self {
        match received {
            Some(n) => DownstreamBody::Counted(body, n),
            None => DownstreamBody::Plain(body),
        }
    }
}

impl std::fmt::Debug for DownstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownstreamBody::Plain(_) => f.write_str("DownstreamBody::Plain"),
            DownstreamBody::Counted(..) => f.write_str("DownstreamBody::Counted"),
            DownstreamBody::Filtered(_) => f.write_str("DownstreamBody::Filtered"),
        }
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            DownstreamBody::Plain(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DownstreamBody::Counted(b, n) => {
                let polled = Pin::new(b).poll_frame(cx).map_err(Into::into);
                if let Poll::Ready(Some(Ok(f))) = &polled
                    && let Some(d) = f.data_ref()
                {
                    n.fetch_add(d.len() as u64, Relaxed);
                }
                polled
            }
            DownstreamBody::Filtered(b) => b.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownstreamBody::Plain(b) | DownstreamBody::Counted(b, _) => b.is_end_stream(),
            DownstreamBody::Filtered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownstreamBody::Plain(b) | DownstreamBody::Counted(b, _) => b.size_hint(),
            DownstreamBody::Filtered(b) => b.size_hint(),
        }
    }
}

/// A response body as it comes from an upstream: from the proxy's HTTP/1.1 client, or from
/// hyper's (HTTP/2, and a tunnel's HTTP/1.1 answer).
pub enum UpstreamResponseBody {
    H1(super::h1::Body),
    Hyper(Incoming),
}

impl std::fmt::Debug for UpstreamResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamResponseBody::H1(b) => b.fmt(f),
            UpstreamResponseBody::Hyper(_) => f.write_str("UpstreamResponseBody::Hyper"),
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamResponseBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpstreamResponseBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamResponseBody::H1(b) => b.is_end_stream(),
            UpstreamResponseBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamResponseBody::H1(b) => b.size_hint(),
            UpstreamResponseBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// One body's stream idle timer: armed while the body waits, re-armed by any movement. The
/// request and response bodies of an exchange share their activity count (the stream is idle
/// only while neither moves); a response with no request body keeps its own.
#[derive(Debug)]
pub struct IdleTimer {
    timeout: Duration,
    cluster: Arc<Cluster>,
    shared: Option<Rc<Cell<u64>>>,
    own: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    armed_at: Option<u64>,
    counted: bool,
}

impl IdleTimer {
    pub fn new(timeout: Duration, cluster: &Arc<Cluster>, shared: Option<&Rc<Cell<u64>>>) -> Self {
        IdleTimer {
            timeout,
            cluster: cluster.clone(),
            shared: shared.cloned(),
            own: 0,
            sleep: None,
            armed_at: None,
            counted: false,
        }
    }

    fn activity(&self) -> u64 {
        self.shared.as_ref().map_or(self.own, |s| s.get())
    }

    pub(crate) fn moved(&mut self) {
        match &self.shared {
            Some(s) => s.set(s.get().wrapping_add(1)),
            None => self.own = self.own.wrapping_add(1),
        }
    }

    /// Called when the body has nothing to give: true once the stream has been idle for the
    /// timeout.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let activity = self.activity();
        if self.armed_at != Some(activity) {
            let deadline = tokio::time::Instant::now() + self.timeout;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed_at = Some(activity);
        }
        let fired = self
            .sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready());
        if fired && !self.counted {
            self.counted = true;
            self.cluster.stats.timeout("stream_idle");
        }
        fired
    }
}

pub(crate) fn idle_error() -> BoxError {
    "stream idle timeout".into()
}

/// The request body sent upstream: the downstream body, streamed and counted, or (when the
/// route retries) a [`ReplayBody`].
pub enum UpstreamBody {
    Empty,
    Stream {
        inner: DownstreamBody,
        /// `weft_downstream_received_bytes_total` of the listener.
        downstream_rx: Counter,
        /// `weft_upstream_sent_bytes_total` of the cluster.
        upstream_tx: Counter,
        idle: Option<IdleTimer>,
    },
    Replay(ReplayBody),
    /// A filter's callout.
    Callout(CalloutBody),
}

/// The body of a callout a filter made.
#[derive(Debug)]
pub enum CalloutBody {
    Full {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
    /// A gRPC stream: framed messages as the filter sends them; closed channel = end. The
    /// counter holds the bytes sent to the channel and not yet taken from it.
    Channel(
        tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ),
}

impl CalloutBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            CalloutBody::Full { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            CalloutBody::Channel(rx, queued) => rx.poll_recv(cx).map(|m| {
                m.map(|b| {
                    queued.fetch_sub(b.len(), std::sync::atomic::Ordering::Relaxed);
                    Ok(Frame::data(b))
                })
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            self,
            CalloutBody::Full {
                data: None,
                trailers: None
            }
        )
    }
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
            UpstreamBody::Replay(r) => r.poll(cx),
            UpstreamBody::Callout(c) => c.poll(cx),
            UpstreamBody::Stream {
                inner,
                downstream_rx,
                upstream_tx,
                idle,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        downstream_rx.inc_by(d.len() as u64);
                        upstream_tx.inc_by(d.len() as u64);
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Stream { inner, .. } => inner.is_end_stream(),
            UpstreamBody::Replay(r) => r.is_end_stream(),
            UpstreamBody::Callout(c) => c.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Stream { inner, .. } => inner.size_hint(),
            UpstreamBody::Replay(r) => r.size_hint(),
            UpstreamBody::Callout(CalloutBody::Full { data, .. }) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            UpstreamBody::Callout(CalloutBody::Channel(..)) => SizeHint::default(),
        }
    }
}

/// A request body that can be sent again: the first try streams it from the client and keeps a
/// copy of up to `limit` bytes; a retry replays the copy, then goes on reading from the client.
/// Once more than `limit` bytes went out, it can no longer be replayed. Only the latest try may
/// read: a try superseded by a retry gets an error, so its connection is abandoned rather than
/// eating the client's bytes.
#[derive(Debug)]
pub struct Replay {
    rest: Option<DownstreamBody>,
    kept: Vec<Bytes>,
    kept_len: usize,
    limit: usize,
    overflowed: bool,
    trailers: Option<http::HeaderMap>,
    ended: bool,
    epoch: u32,
    downstream_rx: Counter,
}

/// One try's view of a [`Replay`].
#[derive(Debug)]
pub struct ReplayBody {
    state: Rc<RefCell<Replay>>,
    epoch: u32,
    next: usize,
    trailers_sent: bool,
    upstream_tx: Counter,
    idle: Option<IdleTimer>,
}

impl Replay {
    pub fn new(body: DownstreamBody, limit: usize, downstream_rx: Counter) -> Rc<RefCell<Replay>> {
        Rc::new(RefCell::new(Replay {
            rest: Some(body),
            kept: Vec::new(),
            kept_len: 0,
            limit,
            overflowed: false,
            trailers: None,
            ended: false,
            epoch: 0,
            downstream_rx,
        }))
    }

    /// Whether the body can still be sent again in full.
    pub fn replayable(&self) -> bool {
        !self.overflowed
    }

    /// The body for the next try (earlier tries stop reading).
    pub fn attempt(
        state: &Rc<RefCell<Replay>>,
        upstream_tx: Counter,
        idle: Option<IdleTimer>,
    ) -> ReplayBody {
        let mut s = state.borrow_mut();
        s.epoch += 1;
        ReplayBody {
            state: state.clone(),
            epoch: s.epoch,
            next: 0,
            trailers_sent: false,
            upstream_tx,
            idle,
        }
    }
}

impl ReplayBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = self.state.borrow_mut();
        if s.epoch != self.epoch {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if self.next < s.kept.len() {
            let chunk = s.kept[self.next].clone();
            self.next += 1;
            self.upstream_tx.inc_by(chunk.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.ended {
            return match (&s.trailers, self.trailers_sent) {
                (Some(t), false) => {
                    self.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
                }
                _ => Poll::Ready(None),
            };
        }
        let Some(rest) = s.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => {
                if self.idle.as_mut().is_some_and(|t| t.expired(cx)) {
                    Poll::Ready(Some(Err(idle_error())))
                } else {
                    Poll::Pending
                }
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = &mut self.idle {
                    t.moved();
                }
                if let Some(d) = frame.data_ref() {
                    let n = d.len();
                    s.downstream_rx.inc_by(n as u64);
                    self.upstream_tx.inc_by(n as u64);
                    if !s.overflowed {
                        if s.kept_len + n <= s.limit {
                            s.kept.push(d.clone());
                            s.kept_len += n;
                            self.next = s.kept.len();
                        } else {
                            s.overflowed = true;
                            s.kept = Vec::new();
                            self.next = 0;
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.state.borrow();
        s.epoch == self.epoch
            && self.next >= s.kept.len()
            && s.ended
            && (s.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.state.borrow();
        let replaying: u64 = s.kept[self.next.min(s.kept.len())..]
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        match &s.rest {
            None => SizeHint::with_exact(replaying),
            Some(rest) => {
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(replaying + r.lower());
                if let Some(u) = r.upper() {
                    h.set_upper(replaying + u);
                }
                h
            }
        }
    }
}
