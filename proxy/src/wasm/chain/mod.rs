//! One request through a listener's filters, in Envoy's order: request headers → body →
//! trailers through filters 0..n, response headers → body → trailers back through them in
//! reverse, then `on_log` for each filter and `on_done` / `on_delete` for each.
//!
//! Pausing, as Envoy does it:
//! * a headers callback that pauses holds the whole stream (no body callbacks, nothing read)
//!   until the filter continues it;
//! * a body callback that pauses keeps the bytes it saw (buffered, up to the filter's
//!   `body_buffer`: beyond, 413 for a request and 500 for a response) and is called again with
//!   everything it holds when more arrives; at the end of the body it holds the stream until the
//!   filter continues it;
//! * a trailers callback that pauses holds the end of the stream likewise.
//!
//! Continues, closes and local responses are recorded by the host functions and applied here
//! after the guest call returns (never re-entering a guest).
//!
//! Headers go on (upstream, or downstream) only once the first body bytes came out of the
//! filters (or the body ended) — except for open-ended streams (gRPC, server-sent events,
//! upgrades), whose headers go as soon as nothing more is there — so a filter that looks at the
//! body can still change the headers (and a rewritten body gets a correct `Content-Length`).
//! This lifts Envoy's limitation (proxy-wasm/spec#63).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::OnceLock;

use bytes::Bytes;
use http::HeaderValue;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};
use weft_abi::Action;

use super::FilterSpec;
use super::state::{
    Callback, Direction, Headers, LocalResponse, SharedStream, StreamAction, StreamData, StreamInfo,
};
use super::vm::Vm;
use super::worker::WasmWorker;
use crate::errors::BoxError;

mod body;
mod run;

pub use body::FilterBody;

/// Why a stream stopped going through its filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Filter `filter` answered with a local response.
    Local { filter: usize, dir: Direction },
    /// Filter `filter` failed (its VM trapped, ran out of time or memory, or could not start)
    /// and fails closed.
    Failed { filter: usize, dir: Direction },
    /// Filter `filter` held more body than its `body_buffer`.
    TooLarge { filter: usize, dir: Direction },
    /// Filter `filter` paused the stream and did not continue it in time.
    Timeout { filter: usize, dir: Direction },
    /// A filter closed the stream.
    Reset,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Local { .. } => f.write_str("a filter answered the request itself"),
            Stop::Failed { .. } => f.write_str("a filter failed"),
            Stop::TooLarge { .. } => f.write_str("a filter held more body than its buffer limit"),
            Stop::Timeout { .. } => f.write_str("a paused filter did not continue in time"),
            Stop::Reset => f.write_str("a filter closed the stream"),
        }
    }
}

impl std::error::Error for Stop {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamCall {
    Headers { eos: bool },
    Body { eos: bool },
    Trailers,
}

impl StreamCall {
    fn callback(self, d: Direction) -> Callback {
        match (d, self) {
            (Direction::Request, StreamCall::Headers { .. }) => Callback::RequestHeaders,
            (Direction::Request, StreamCall::Body { .. }) => Callback::RequestBody,
            (Direction::Request, StreamCall::Trailers) => Callback::RequestTrailers,
            (Direction::Response, StreamCall::Headers { .. }) => Callback::ResponseHeaders,
            (Direction::Response, StreamCall::Body { .. }) => Callback::ResponseBody,
            (Direction::Response, StreamCall::Trailers) => Callback::ResponseTrailers,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The end of the body (the filter paused its last body callback).
    End,
    Trailers,
}

enum Run {
    /// Not reached yet: no context.
    Idle,
    Active {
        vm: Rc<Vm>,
        ctx: u32,
    },
    /// Failed (or could not start) and fails open: skipped from now on.
    Skipped,
    /// Failed and fails closed.
    Failed,
}

struct Slot {
    spec: Arc<FilterSpec>,
    run: Run,
    /// Time spent inside the VM for this stream, in the raw units of [`clock`].
    ticks: u64,
    /// The filter answered the stream itself with a 5xx.
    local_5xx: bool,
}

/// Most filters on one listener (a chain's per-filter flags are bits of a `u64`).
pub const MAX_CHAIN: usize = 64;

/// The clock of filter time: the CPU's time-stamp counter where it is reliable (quanta checks;
/// else the OS clock). Two raw reads per guest call, summed per filter and turned into a
/// duration once, when the stream ends. Calibrated on first use (a few ms): the process makes
/// that happen before it serves.
pub fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// The filters a direction visits, in order: `0..len` for requests, `len-1..=0` for
/// responses. Positions (`p`) index this order; filter indices are the chain's.
#[derive(Debug, Default, Clone, Copy)]
struct Order {
    len: usize,
    reverse: bool,
}

impl Order {
    fn len(self) -> usize {
        self.len
    }

    /// The filter at position `p` (< len).
    fn at(self, p: usize) -> usize {
        if self.reverse { self.len - 1 - p } else { p }
    }

    fn get(self, p: usize) -> Option<usize> {
        (p < self.len).then(|| self.at(p))
    }

    fn pos_of(self, filter: usize) -> Option<usize> {
        (filter < self.len).then(|| {
            if self.reverse {
                self.len - 1 - filter
            } else {
                filter
            }
        })
    }

    fn iter(self) -> impl Iterator<Item = usize> {
        (0..self.len).map(move |p| self.at(p))
    }
}

/// One direction's progress through its filters.
#[derive(Default)]
struct Flow {
    /// The filters this direction visits, in order.
    order: Order,
    started: bool,
    headers_eos: bool,
    /// The headers reached this position of `order`.
    headers_at: usize,
    /// The filter at `headers_at` paused the headers.
    headers_paused: bool,
    headers_done: bool,
    /// Bit per position of `order`: the filter paused its body and holds what it saw.
    buffering: u64,
    /// The filter at this position holds the end of the stream.
    held: Option<(usize, Held)>,
    /// Trailers entered this direction (from the source, or added by a filter).
    trailers: bool,
    /// Body bytes past the last filter, not yet a frame.
    tail: Vec<u8>,
    out: VecDeque<Frame<Bytes>>,
    /// The end came out of the last filter.
    ended: bool,
    stop: Option<Stop>,
    bytes_in: u64,
}

impl Flow {
    fn new(order: Order) -> Flow {
        Flow {
            order,
            started: true,
            ..Flow::default()
        }
    }

    fn pos_of(&self, filter: usize) -> Option<usize> {
        self.order.pos_of(filter)
    }

    fn is_buffering(&self, p: usize) -> bool {
        self.buffering & (1 << p) != 0
    }

    fn set_buffering(&mut self, p: usize, on: bool) {
        if on {
            self.buffering |= 1 << p;
        } else {
            self.buffering &= !(1 << p);
        }
    }

    /// Waiting on a filter (not on the source).
    fn waiting(&self) -> bool {
        self.headers_paused || self.held.is_some()
    }

    fn any_buffering(&self) -> bool {
        self.buffering != 0
    }

    /// The filter the flow waits on.
    fn waiting_on(&self) -> Option<usize> {
        if self.headers_paused {
            return self.order.get(self.headers_at);
        }
        self.held.map(|(p, _)| self.order.at(p))
    }
}

fn side(d: Direction) -> usize {
    d as usize
}

/// `fut`, given at most `wait` (`None` once it is over). A timer is only set up when `fut` is
/// not ready at once, which is the common case's saving.
async fn bounded<F: std::future::Future>(fut: F, wait: Option<Duration>) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(v) = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(v);
    }
    match wait {
        None => Some(fut.await),
        Some(t) => tokio::time::timeout(t, fut).await.ok(),
    }
}

/// A message's fields as they go on, with a copy left in their place for the callbacks after
/// (and `on_log`). The map itself goes: it keeps its spare room (the request's, for the `Host`
/// field the filters did not see), where a copy is made exactly full and would grow when a
/// field goes in.
fn hand_on(map: &mut http::HeaderMap) -> http::HeaderMap {
    let copy = map.clone();
    std::mem::replace(map, copy)
}

/// A chain's filters, in place for up to two (no allocation per request for them).
type Slots = smallvec::SmallVec<[Slot; 2]>;

struct ChainState {
    worker: Rc<WasmWorker>,
    stream: SharedStream,
    slots: Slots,
    flows: [Flow; 2],
    /// The response headers went downstream: a local response can no longer replace them.
    response_sent: bool,
    local: Option<(usize, LocalResponse)>,
    finished: bool,
}

/// A request's run through its filters, shared by the request handler and the two bodies.
pub struct Chain {
    state: RefCell<ChainState>,
    pub stream: SharedStream,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").finish_non_exhaustive()
    }
}

impl Chain {
    /// A stream through `filters`, with its request headers.
    pub fn new(
        worker: Rc<WasmWorker>,
        filters: &[Arc<FilterSpec>],
        info: StreamInfo,
        headers: Headers,
    ) -> Rc<Chain> {
        let stream = Rc::new(RefCell::new(StreamData {
            request_headers: headers,
            info,
            ..StreamData::default()
        }));
        let slots = filters
            .iter()
            .map(|spec| Slot {
                spec: spec.clone(),
                run: Run::Idle,
                ticks: 0,
                local_5xx: false,
            })
            .collect();
        Rc::new(Chain {
            state: RefCell::new(ChainState {
                worker,
                stream: stream.clone(),
                slots,
                flows: [Flow::default(), Flow::default()],
                response_sent: false,
                local: None,
                finished: false,
            }),
            stream,
        })
    }

    pub fn len(&self) -> usize {
        self.state.borrow().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name of filter `i`.
    pub fn filter_name(&self, i: usize) -> Arc<str> {
        self.state.borrow().slots[i].spec.name.clone()
    }

    /// Whether any filter of the response flow (or, for the request, any filter) may look at
    /// the body: it exports a body or trailers callback, and has not asked for both to be
    /// skipped (or holds part of the stream).
    pub fn wants_body(&self, d: Direction) -> bool {
        let st = self.state.borrow();
        let wants = |i: usize| {
            let slot = &st.slots[i];
            let (exported, body, trailers) = match d {
                Direction::Request => (
                    slot.spec.wants.request_body,
                    Callback::RequestBody,
                    Callback::RequestTrailers,
                ),
                Direction::Response => (
                    slot.spec.wants.response_body,
                    Callback::ResponseBody,
                    Callback::ResponseTrailers,
                ),
            };
            exported && !(st.passes(i, body) && st.passes(i, trailers))
        };
        match d {
            Direction::Request => (0..st.slots.len()).any(wants),
            Direction::Response => st.flows[1].order.iter().any(wants),
        }
    }

    /// Runs the request headers through the filters (waiting through pauses, at most `wait`).
    pub async fn request_headers(
        &self,
        end_of_stream: bool,
        wait: Option<Duration>,
    ) -> Result<(), Stop> {
        {
            let mut st = self.state.borrow_mut();
            let n = st.slots.len();
            st.flows[0] = Flow::new(Order {
                len: n,
                reverse: false,
            });
            st.flows[0].headers_eos = end_of_stream;
            st.run(Direction::Request, |st| {
                st.headers_from(Direction::Request, 0)
            });
        }
        self.wait_headers(Direction::Request, wait).await
    }

    /// Runs response headers through filters `upto - 1 ..= 0` (all of them for an upstream's
    /// response; those that saw the request, for a local one). Starts the response side over.
    pub async fn response_headers(
        &self,
        upto: usize,
        headers: Headers,
        end_of_stream: bool,
        wait: Option<Duration>,
    ) -> Result<(), Stop> {
        {
            let mut st = self.state.borrow_mut();
            {
                let mut s = st.stream.borrow_mut();
                s.info.response_code = headers
                    .get(b":status")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
                s.response_headers = Some(headers);
                s.response_trailers = None;
                s.body_modified[1] = false;
                for b in &mut s.response_body {
                    b.clear();
                }
            }
            st.flows[1] = Flow::new(Order {
                len: upto,
                reverse: true,
            });
            st.flows[1].headers_eos = end_of_stream;
            st.run(Direction::Response, |st| {
                st.headers_from(Direction::Response, 0)
            });
        }
        self.wait_headers(Direction::Response, wait).await
    }

    async fn wait_headers(&self, d: Direction, wait: Option<Duration>) -> Result<(), Stop> {
        let done = poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            st.apply_actions();
            st.check_waiting_vm(d);
            let flow = &st.flows[side(d)];
            if let Some(stop) = flow.stop {
                return Poll::Ready(Err(stop));
            }
            if !flow.headers_paused {
                return Poll::Ready(Ok(()));
            }
            st.stream.borrow_mut().wakers[side(d)] = Some(cx.waker().clone());
            Poll::Pending
        });
        match bounded(done, wait).await {
            Some(r) => r,
            None => Err(self.timed_out(d)),
        }
    }

    fn timed_out(&self, d: Direction) -> Stop {
        let mut st = self.state.borrow_mut();
        let filter = st.flows[side(d)].waiting_on().unwrap_or(0);
        tracing::warn!(filter = %st.slots[filter].spec.name, "a paused filter did not continue the stream in time");
        let stop = Stop::Timeout { filter, dir: d };
        st.record(d, stop);
        stop
    }

    /// The local response a filter sent, once.
    pub fn take_local(&self) -> Option<(usize, LocalResponse)> {
        self.state.borrow_mut().local.take()
    }

    /// The stop of direction `d`, if it stopped.
    pub fn stopped(&self, d: Direction) -> Option<Stop> {
        self.state.borrow().flows[side(d)].stop
    }

    /// The request's fields as the filters left them, for the upstream ([`hand_on`]). The
    /// pseudo-headers are read where they are (`stream.borrow().request_headers`).
    pub fn request_fields(&self) -> http::HeaderMap {
        hand_on(&mut self.stream.borrow_mut().request_headers.map)
    }

    /// The response's fields and `:status` as the filters left them ([`hand_on`]); from now on
    /// the response is committed. The status is
    /// `None` when there is none, `Some(None)` when a filter set one that is not a valid status
    /// code.
    pub fn response_head(&self) -> (http::HeaderMap, Option<Option<http::StatusCode>>) {
        self.state.borrow_mut().response_sent = true;
        let mut s = self.stream.borrow_mut();
        let Some(h) = &mut s.response_headers else {
            return (http::HeaderMap::new(), None);
        };
        let status = h.get(b":status").map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .and_then(|s| http::StatusCode::from_u16(s).ok())
        });
        (hand_on(&mut h.map), status)
    }

    /// Fixes `Content-Length` for a body the filters rewrote before its headers went out: the
    /// exact length when all of it is already through, none (chunked) otherwise.
    pub fn fix_length(&self, d: Direction, headers: &mut http::HeaderMap) {
        let st = self.state.borrow();
        if !st.stream.borrow().body_modified[side(d)] || !headers.contains_key(CONTENT_LENGTH) {
            return;
        }
        let flow = &st.flows[side(d)];
        if flow.ended {
            let len: usize = flow
                .out
                .iter()
                .filter_map(|f| f.data_ref().map(Bytes::len))
                .sum();
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        } else {
            headers.remove(CONTENT_LENGTH);
        }
    }

    /// What `on_log` reads about the end of the exchange; `body_sent`, the response body bytes
    /// that went downstream.
    pub fn record_end(&self, status: u16, duration: Duration, body_sent: u64) {
        let mut s = self.stream.borrow_mut();
        s.info.response_code = Some(status);
        s.info.duration = Some(duration);
        s.info.response_body_bytes = body_sent;
    }

    /// Ends the stream now (`on_log`, `on_done`, `on_delete` for every filter) instead of when
    /// the chain is dropped; nothing happens if it ended already, or if the chain is busy.
    pub fn end(&self) {
        if let Ok(mut state) = self.state.try_borrow_mut() {
            state.finish();
        }
    }

    pub fn set_info(&self, f: impl FnOnce(&mut StreamInfo)) {
        f(&mut self.stream.borrow_mut().info);
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.state.get_mut().finish();
    }
}
