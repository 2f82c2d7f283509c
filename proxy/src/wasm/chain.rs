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

// Per-call filter time is read from the CPU's time-stamp counter where it is reliable (quanta
// checks; else the OS clock): two reads per guest call, so they must be cheap.
use quanta::Instant;

use bytes::Bytes;
use http::HeaderValue;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};
use weft_abi::Action;

use super::FilterSpec;
use super::state::{
    Direction, Headers, LocalResponse, SharedStream, StreamAction, StreamData, StreamInfo,
};
use super::vm::Vm;
use super::worker::WasmWorker;
use crate::http::body::BoxError;

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
enum Callback {
    Headers { eos: bool },
    Body { eos: bool },
    Trailers,
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
    /// Time spent inside the VM for this stream.
    time: Duration,
    /// The filter answered the stream itself with a 5xx.
    local_5xx: bool,
}

/// Most filters on one listener (a chain's per-filter flags are bits of a `u64`).
pub const MAX_CHAIN: usize = 64;

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

struct ChainState {
    worker: Rc<WasmWorker>,
    stream: SharedStream,
    slots: Vec<Slot>,
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
                time: Duration::ZERO,
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
    /// the body.
    pub fn wants_body(&self, d: Direction) -> bool {
        let st = self.state.borrow();
        match d {
            Direction::Request => st.slots.iter().any(|s| s.spec.wants.request_body),
            Direction::Response => st.flows[1]
                .order
                .iter()
                .any(|i| st.slots[i].spec.wants.response_body),
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

    /// The request headers as the filters left them (kept for later callbacks and `on_log`).
    pub fn request_head(&self) -> Headers {
        self.stream.borrow().request_headers.clone()
    }

    /// The response headers as the filters left them; from now on the response is committed.
    pub fn response_head(&self) -> Headers {
        self.state.borrow_mut().response_sent = true;
        self.stream
            .borrow()
            .response_headers
            .clone()
            .unwrap_or_default()
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

    /// What `on_log` reads about the end of the exchange.
    pub fn record_end(&self, status: u16, duration: Duration) {
        let mut s = self.stream.borrow_mut();
        s.info.response_code = Some(status);
        s.info.duration = Some(duration);
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

impl ChainState {
    /// Runs `f`, recording a stop it ends with.
    fn run(&mut self, d: Direction, f: impl FnOnce(&mut ChainState) -> Result<(), Stop>) {
        if self.flows[side(d)].stop.is_some() {
            return;
        }
        if let Err(stop) = f(self) {
            self.record(d, stop);
        }
    }

    fn record(&mut self, d: Direction, stop: Stop) {
        let flow = &mut self.flows[side(d)];
        if flow.stop.is_none() {
            flow.stop = Some(stop);
        }
        if stop == Stop::Reset {
            for f in &mut self.flows {
                f.stop.get_or_insert(Stop::Reset);
            }
        }
        self.stream.borrow_mut().wake_all();
    }

    /// The VM and context of filter `i` for this stream (created when first reached); `None`
    /// when the filter is skipped.
    fn ensure(&mut self, i: usize, d: Direction) -> Result<Option<(Rc<Vm>, u32)>, Stop> {
        match &self.slots[i].run {
            Run::Active { vm, ctx } => return Ok(Some((vm.clone(), *ctx))),
            Run::Skipped => return Ok(None),
            Run::Failed => return Err(Stop::Failed { filter: i, dir: d }),
            Run::Idle => {}
        }
        let spec = self.slots[i].spec.clone();
        let made = self.worker.instance(&spec).and_then(|(vm, root)| {
            let ctx = vm.create_stream(root, self.stream.clone(), i)?;
            Ok((vm, ctx))
        });
        match made {
            Ok((vm, ctx)) => {
                self.slots[i].run = Run::Active {
                    vm: vm.clone(),
                    ctx,
                };
                Ok(Some((vm, ctx)))
            }
            Err(e) => {
                self.fail(i, d, &e)?;
                Ok(None)
            }
        }
    }

    /// Filter `i` failed: skipped from now on when it fails open; the stream stops otherwise.
    fn fail(&mut self, i: usize, d: Direction, why: &dyn std::fmt::Display) -> Result<(), Stop> {
        let spec = &self.slots[i].spec;
        if spec.fail_open() {
            tracing::warn!(filter = %spec.name, error = %why, "filter failed; the request goes on without it (fail: open)");
            self.slots[i].run = Run::Skipped;
            Ok(())
        } else {
            tracing::warn!(filter = %spec.name, error = %why, "filter failed; the request is answered 500 (fail: closed)");
            self.slots[i].run = Run::Failed;
            Err(Stop::Failed { filter: i, dir: d })
        }
    }

    /// Calls filter `i`'s callback; a skipped filter continues.
    fn call(&mut self, i: usize, d: Direction, cb: Callback) -> Result<Action, Stop> {
        // One clock read each side of the filter's work (its context's creation included).
        let started = Instant::now();
        let Some((vm, ctx)) = self.ensure(i, d)? else {
            return Ok(Action::Continue);
        };
        let (n_req, n_resp, n_req_t, n_resp_t, body) = {
            let s = self.stream.borrow();
            (
                s.request_headers.len(),
                s.response_headers.as_ref().map_or(0, Headers::len),
                s.request_trailers.as_ref().map_or(0, Headers::len),
                s.response_trailers.as_ref().map_or(0, Headers::len),
                s.body(d, i).len(),
            )
        };
        let result = match (d, cb) {
            (Direction::Request, Callback::Headers { eos }) => {
                vm.on_request_headers(ctx, n_req, eos)
            }
            (Direction::Request, Callback::Body { eos }) => vm.on_request_body(ctx, body, eos),
            (Direction::Request, Callback::Trailers) => vm.on_request_trailers(ctx, n_req_t),
            (Direction::Response, Callback::Headers { eos }) => {
                vm.on_response_headers(ctx, n_resp, eos)
            }
            (Direction::Response, Callback::Body { eos }) => vm.on_response_body(ctx, body, eos),
            (Direction::Response, Callback::Trailers) => vm.on_response_trailers(ctx, n_resp_t),
        };
        self.slots[i].time += started.elapsed();
        match result {
            Ok(a) => Ok(a),
            Err(e) => {
                self.fail(i, d, &e)?;
                Ok(Action::Continue)
            }
        }
    }

    /// Applies what filters asked for since the last time. A local response or a close stops
    /// the stream; a continue resumes the flow it is for (its own stops are recorded there).
    fn apply_actions(&mut self) {
        loop {
            let next = self.stream.borrow_mut().actions.pop_front();
            let Some((i, action)) = next else {
                return;
            };
            match action {
                StreamAction::Continue(d) => self.resume(d, i),
                StreamAction::Close(_) => self.record(Direction::Request, Stop::Reset),
                StreamAction::LocalResponse(lr) => {
                    let d = if self.flows[1].started {
                        Direction::Response
                    } else {
                        Direction::Request
                    };
                    if d == Direction::Response && self.response_sent {
                        tracing::warn!(filter = %self.slots[i].spec.name, "a local response after the response started: the stream is reset");
                        self.record(d, Stop::Reset);
                    } else {
                        self.slots[i].local_5xx = lr.status >= 500;
                        self.local = Some((i, lr));
                        self.record(d, Stop::Local { filter: i, dir: d });
                    }
                }
            }
        }
    }

    /// After a guest call: applies its actions; `Err` when they stopped direction `d`.
    fn after_call(&mut self, d: Direction) -> Result<(), Stop> {
        self.apply_actions();
        match self.flows[side(d)].stop {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    fn headers_from(&mut self, d: Direction, mut p: usize) -> Result<(), Stop> {
        let len = self.flows[side(d)].order.len();
        while p < len {
            let i = self.flows[side(d)].order.at(p);
            let eos = self.flows[side(d)].headers_eos;
            let action = self.call(i, d, Callback::Headers { eos })?;
            {
                let flow = &mut self.flows[side(d)];
                flow.headers_at = p;
                flow.headers_paused = action == Action::Pause;
            }
            self.after_call(d)?;
            if action == Action::Pause {
                // Still paused, or a continue from the same call already ran the rest.
                return Ok(());
            }
            p += 1;
        }
        let flow = &mut self.flows[side(d)];
        flow.headers_at = len;
        flow.headers_done = true;
        Ok(())
    }

    fn body_of(&mut self, d: Direction, i: usize) -> Vec<u8> {
        std::mem::take(self.stream.borrow_mut().body_mut(d, i))
    }

    fn add_body(&mut self, d: Direction, i: usize, mut bytes: Vec<u8>) {
        let mut s = self.stream.borrow_mut();
        let b = s.body_mut(d, i);
        if b.is_empty() {
            std::mem::swap(b, &mut bytes);
        } else {
            b.append(&mut bytes);
        }
    }

    fn body_len(&self, d: Direction, i: usize) -> usize {
        self.stream.borrow().body(d, i).len()
    }

    /// Moves what the filter at position `p` holds on to the next position (or the tail).
    fn pass_on(&mut self, d: Direction, p: usize) {
        let i = self.flows[side(d)].order.at(p);
        let bytes = self.body_of(d, i);
        if bytes.is_empty() {
            return;
        }
        match self.flows[side(d)].order.get(p + 1) {
            Some(next) => self.add_body(d, next, bytes),
            None => {
                let tail = &mut self.flows[side(d)].tail;
                if tail.is_empty() {
                    *tail = bytes;
                } else {
                    tail.extend_from_slice(&bytes);
                }
            }
        }
    }

    fn trailers_exist(&self, d: Direction) -> bool {
        let s = self.stream.borrow();
        let t = match d {
            Direction::Request => &s.request_trailers,
            Direction::Response => &s.response_trailers,
        };
        t.as_ref().is_some_and(|t| !t.is_empty())
    }

    /// Body bytes (already with the filter at position `p`) go through the filters from `p`.
    fn data_from(&mut self, d: Direction, mut p: usize, eos: bool) -> Result<(), Stop> {
        loop {
            let len = self.flows[side(d)].order.len();
            if p == len {
                self.emit_data(d, eos);
                return Ok(());
            }
            let i = self.flows[side(d)].order.at(p);
            let limit = self.slots[i].spec.plugin.body_buffer;
            if self.flows[side(d)].is_buffering(p) && self.body_len(d, i) > limit {
                return Err(self.too_large(i, d));
            }
            let had_trailers = self.flows[side(d)].trailers;
            let action = self.call(i, d, Callback::Body { eos })?;
            if action == Action::Pause {
                let flow = &mut self.flows[side(d)];
                if eos {
                    flow.held = Some((p, Held::End));
                } else {
                    flow.set_buffering(p, true);
                }
                if self.body_len(d, i) > limit {
                    return Err(self.too_large(i, d));
                }
                self.after_call(d)?;
                return Ok(());
            }
            self.flows[side(d)].set_buffering(p, false);
            self.after_call(d)?;
            self.pass_on(d, p);
            if eos && !had_trailers && self.trailers_exist(d) {
                // The filter added trailers at the end of the body: the data goes on without the
                // end, the trailers after it.
                self.flows[side(d)].trailers = true;
                self.data_from(d, p + 1, false)?;
                return self.trailers_from(d, p + 1);
            }
            p += 1;
        }
    }

    fn too_large(&mut self, i: usize, d: Direction) -> Stop {
        tracing::warn!(filter = %self.slots[i].spec.name, limit = self.slots[i].spec.plugin.body_buffer, ?d, "a filter held more body than its buffer limit");
        Stop::TooLarge { filter: i, dir: d }
    }

    /// Trailers go through the filters from position `p`; each filter's held body goes on
    /// before them.
    fn trailers_from(&mut self, d: Direction, mut p: usize) -> Result<(), Stop> {
        loop {
            let len = self.flows[side(d)].order.len();
            if p == len {
                self.emit_trailers(d);
                return Ok(());
            }
            let i = self.flows[side(d)].order.at(p);
            let action = self.call(i, d, Callback::Trailers)?;
            if action == Action::Pause {
                self.flows[side(d)].held = Some((p, Held::Trailers));
                self.after_call(d)?;
                return Ok(());
            }
            self.after_call(d)?;
            self.release_held_body(d, p)?;
            p += 1;
        }
    }

    /// Before trailers leave the filter at `p`, what it buffered goes on.
    fn release_held_body(&mut self, d: Direction, p: usize) -> Result<(), Stop> {
        self.flows[side(d)].set_buffering(p, false);
        let i = self.flows[side(d)].order.at(p);
        if self.body_len(d, i) > 0 {
            self.pass_on(d, p);
            self.data_from(d, p + 1, false)?;
        }
        Ok(())
    }

    fn emit_data(&mut self, d: Direction, eos: bool) {
        let flow = &mut self.flows[side(d)];
        if !flow.tail.is_empty() {
            let bytes = std::mem::take(&mut flow.tail);
            flow.out.push_back(Frame::data(Bytes::from(bytes)));
        }
        if eos {
            flow.ended = true;
        }
        self.wake_consumer(d);
    }

    fn emit_trailers(&mut self, d: Direction) {
        self.emit_data(d, false);
        let map = {
            let s = self.stream.borrow();
            let t = match d {
                Direction::Request => &s.request_trailers,
                Direction::Response => &s.response_trailers,
            };
            t.as_ref().map(|t| t.map.clone()).unwrap_or_default()
        };
        let flow = &mut self.flows[side(d)];
        flow.out.push_back(Frame::trailers(map));
        flow.ended = true;
    }

    /// Output for direction `d` may have been produced from the other side's poll.
    fn wake_consumer(&mut self, d: Direction) {
        if let Some(w) = self.stream.borrow_mut().wakers[side(d)].take() {
            w.wake();
        }
    }

    /// Filter `i` continued direction `d`: whatever it held goes on.
    fn resume(&mut self, d: Direction, i: usize) {
        let flow = &self.flows[side(d)];
        if !flow.started || flow.stop.is_some() {
            return;
        }
        let Some(p) = flow.pos_of(i) else {
            return;
        };
        if flow.headers_paused && flow.headers_at == p {
            self.flows[side(d)].headers_paused = false;
            self.run(d, |st| st.headers_from(d, p + 1));
        } else if let Some((hp, held)) = flow.held
            && hp == p
        {
            self.flows[side(d)].held = None;
            self.run(d, |st| match held {
                Held::End => {
                    st.pass_on(d, p);
                    st.data_from(d, p + 1, true)
                }
                Held::Trailers => {
                    st.release_held_body(d, p)?;
                    st.trailers_from(d, p + 1)
                }
            });
        } else if flow.is_buffering(p) {
            self.flows[side(d)].set_buffering(p, false);
            self.run(d, |st| {
                st.pass_on(d, p);
                st.data_from(d, p + 1, false)
            });
        }
        self.wake_consumer(d);
    }

    /// A flow waiting on a filter whose VM failed meanwhile (say, in a callout's callback)
    /// gets the filter's failure policy now.
    fn check_waiting_vm(&mut self, d: Direction) {
        let Some(i) = self.flows[side(d)].waiting_on() else {
            return;
        };
        let failed = match &self.slots[i].run {
            Run::Active { vm, .. } => vm.failed(),
            _ => false,
        };
        if !failed {
            return;
        }
        match self.fail(
            i,
            d,
            &"the filter's VM failed while the stream waited on it",
        ) {
            Err(stop) => self.record(d, stop),
            // Fails open: as if it had continued.
            Ok(()) => self.resume(d, i),
        }
    }

    /// Body input from the source.
    fn feed(&mut self, d: Direction, frame: Frame<Bytes>, end: bool) {
        let first = self.flows[side(d)].order.get(0);
        match frame.into_data() {
            Ok(data) => {
                self.flows[side(d)].bytes_in += data.len() as u64;
                match first {
                    Some(f) => self.add_body(d, f, data.to_vec()),
                    None => self.flows[side(d)].tail.extend_from_slice(&data),
                }
                self.run(d, |st| st.data_from(d, 0, end));
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    {
                        let mut s = self.stream.borrow_mut();
                        let h = Some(Headers {
                            pseudo: Vec::new(),
                            map: t,
                        });
                        match d {
                            Direction::Request => s.request_trailers = h,
                            Direction::Response => s.response_trailers = h,
                        }
                    }
                    self.flows[side(d)].trailers = true;
                    self.run(d, |st| st.trailers_from(d, 0));
                }
            }
        }
    }

    fn feed_end(&mut self, d: Direction) {
        if self.flows[side(d)].trailers {
            return;
        }
        self.run(d, |st| st.data_from(d, 0, true));
    }

    /// The end of the stream: `on_log` for every filter, then `on_done` and `on_delete`.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        {
            let mut s = self.stream.borrow_mut();
            s.info.request_body_bytes = self.flows[0].bytes_in;
            s.info.response_body_bytes = self.flows[1].bytes_in;
        }
        // Clock reads are shared: each filter's share is from the previous read to the next.
        let mut last = Instant::now();
        for i in 0..self.slots.len() {
            // As Envoy: a filter the request never reached still logs it.
            if matches!(self.slots[i].run, Run::Idle)
                && self.ensure(i, Direction::Response).is_err()
            {
                continue;
            }
            if let Run::Active { vm, ctx } = &self.slots[i].run
                && !vm.failed()
            {
                let (vm, ctx) = (vm.clone(), *ctx);
                if let Err(e) = vm.on_log(ctx) {
                    let _ = self.fail(i, Direction::Response, &e);
                }
                let now = Instant::now();
                self.slots[i].time += now - last;
                last = now;
            }
        }
        for slot in &mut self.slots {
            if let Run::Active { vm, ctx } = &slot.run {
                vm.finish_context(*ctx);
                let now = Instant::now();
                slot.time += now - last;
                last = now;
            }
            if !matches!(slot.run, Run::Idle) {
                slot.spec.call_time.observe(slot.time.as_secs_f64());
                slot.spec.figures.record(
                    slot.time,
                    super::figures::Outcome {
                        failed: matches!(slot.run, Run::Failed | Run::Skipped),
                        skipped: matches!(slot.run, Run::Skipped),
                        local_5xx: slot.local_5xx,
                    },
                );
            }
        }
    }
}

/// A body on its way through the filters of one direction: frames from the source go in, the
/// filters' output comes out. A stream the filters stopped ends with an error (the peer sees a
/// reset); what stopped it is on the chain.
pub struct FilterBody<B> {
    source: Option<B>,
    chain: Rc<Chain>,
    dir: Direction,
    source_error: Option<BoxError>,
    stop_reported: bool,
}

impl<B> std::fmt::Debug for FilterBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterBody")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

enum Pumped {
    /// Output is ready, or the flow ended or stopped.
    Ready,
    /// Nothing now; the waker is registered.
    Pending { on_source: bool },
}

impl<B> FilterBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(chain: Rc<Chain>, dir: Direction, source: B) -> Self {
        FilterBody {
            source: Some(source),
            chain,
            dir,
            source_error: None,
            stop_reported: false,
        }
    }

    /// Feeds the filters until output is ready, the flow ended or stopped, or nothing can
    /// happen now.
    fn pump(&mut self, cx: &mut Context<'_>) -> Pumped {
        let d = self.dir;
        // Output made during this poll needs no wake-up.
        self.chain.stream.borrow_mut().wakers[side(d)] = None;
        loop {
            {
                let mut st = self.chain.state.borrow_mut();
                st.apply_actions();
                st.check_waiting_vm(d);
                let flow = &st.flows[side(d)];
                if !flow.out.is_empty()
                    || flow.ended
                    || flow.stop.is_some()
                    || self.source_error.is_some()
                {
                    return Pumped::Ready;
                }
                if flow.waiting() || self.source.is_none() {
                    st.stream.borrow_mut().wakers[side(d)] = Some(cx.waker().clone());
                    return Pumped::Pending { on_source: false };
                }
            }
            let Some(source) = self.source.as_mut() else {
                continue;
            };
            match Pin::new(&mut *source).poll_frame(cx) {
                Poll::Pending => {
                    // An action (a continue, a local response) wakes us as well.
                    self.chain.stream.borrow_mut().wakers[side(d)] = Some(cx.waker().clone());
                    return Pumped::Pending { on_source: true };
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let end = source.is_end_stream();
                    if end {
                        self.source = None;
                    }
                    self.chain.state.borrow_mut().feed(d, frame, end);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.source = None;
                    self.source_error = Some(e.into());
                }
                Poll::Ready(None) => {
                    self.source = None;
                    self.chain.state.borrow_mut().feed_end(d);
                }
            }
        }
    }

    /// Runs the body through the filters until its first bytes came out (or it ended) when
    /// `wait_first`; otherwise until nothing more is there, unless a filter buffers or holds
    /// it. The headers go on after this.
    pub async fn prime(&mut self, wait_first: bool, wait: Option<Duration>) -> Result<(), Stop> {
        let d = self.dir;
        let chain = self.chain.clone();
        let primed = poll_fn(|cx| match self.pump(cx) {
            Pumped::Ready => Poll::Ready(()),
            Pumped::Pending { on_source } => {
                let st = chain.state.borrow();
                let flow = &st.flows[side(d)];
                if on_source && !wait_first && !flow.any_buffering() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
        });
        let timed_out = bounded(primed, wait).await.is_none();
        if timed_out && self.chain.state.borrow().flows[side(d)].waiting() {
            return Err(self.chain.timed_out(d));
        }
        match self.chain.stopped(d) {
            Some(stop) => {
                self.stop_reported = true;
                Err(stop)
            }
            None => Ok(()),
        }
    }
}

impl<B> FilterBody<B> {
    /// The whole body, when all of it already came out of the filters as data (no trailers):
    /// it can then go on as a plain body.
    pub fn take_complete(&mut self) -> Option<Bytes> {
        let mut st = self.chain.state.borrow_mut();
        let flow = &mut st.flows[side(self.dir)];
        if !flow.ended
            || flow.stop.is_some()
            || self.source_error.is_some()
            || flow.out.iter().any(|f| !f.is_data())
        {
            return None;
        }
        let mut frames = std::mem::take(&mut flow.out);
        if frames.len() == 1 {
            return frames.pop_front().and_then(|f| f.into_data().ok());
        }
        let mut all = Vec::new();
        for f in frames {
            if let Ok(d) = f.into_data() {
                all.extend_from_slice(&d);
            }
        }
        Some(Bytes::from(all))
    }
}

impl<B> Body for FilterBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Pumped::Pending { .. } = this.pump(cx) {
            return Poll::Pending;
        }
        let d = this.dir;
        let mut st = this.chain.state.borrow_mut();
        let flow = &mut st.flows[side(d)];
        if let Some(frame) = flow.out.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(stop) = flow.stop {
            if this.stop_reported {
                return Poll::Ready(None);
            }
            this.stop_reported = true;
            return Poll::Ready(Some(Err(Box::new(stop))));
        }
        if let Some(e) = this.source_error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        let st = self.chain.state.borrow();
        let flow = &st.flows[side(self.dir)];
        flow.ended && flow.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.chain.state.borrow();
        let flow = &st.flows[side(self.dir)];
        if flow.ended {
            let n: usize = flow
                .out
                .iter()
                .filter_map(|f| f.data_ref().map(Bytes::len))
                .sum();
            SizeHint::with_exact(n as u64)
        } else {
            SizeHint::default()
        }
    }
}
