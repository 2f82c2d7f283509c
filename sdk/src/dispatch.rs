//! The SDK's side of the ABI: contexts, the per-VM executor that runs `async` callbacks, and
//! the callbacks the exports (and the test harness) call.
//!
//! A stream callback's future is polled at once; if it finishes, its [`Action`] is the answer.
//! If it waits (a callout, a sleep), the stream is paused, the future is kept, and it is polled
//! again when what it waits for arrives — in the root context's callback that delivers it, with
//! the stream made the effective context first — and its outcome then continues the stream,
//! answers it, or leaves it held.
//!
//! What the host delivers while a callback waits (more body, trailers) is answered "pause" and
//! remembered; when the waiting callback returns, the filter is called for it in order, so the
//! filter sees every byte before it is passed on. Body bytes a filter let through while the host
//! still held them (because the SDK had paused for it) are not shown to it again: each body
//! callback's [`Body`] starts after them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::Duration;

use weft_abi::{BufferType, BuildIdHasher, LogLevel, MapType, StreamType};

use crate::host::host;
use crate::{Action, Body, Headers, HttpFilter, Plugin};

/// A callback's answer, and for a body callback where its view of the buffer ended (the bytes
/// it let through, when it continues).
type BoxFuture = Pin<Box<dyn Future<Output = (Action, usize)>>>;

/// A plugin with its type erased.
trait RootAny {
    fn new_stream(&self) -> Rc<dyn StreamAny>;
    fn tick_period(&self) -> Option<Duration>;
    fn on_tick(&self);
}

impl<P: Plugin> RootAny for Rc<P> {
    fn new_stream(&self) -> Rc<dyn StreamAny> {
        // One allocation: the filter is the trait object (its calls take the `Rc` itself).
        Rc::new(self.filter())
    }
    fn tick_period(&self) -> Option<Duration> {
        Plugin::tick_period(&**self)
    }
    fn on_tick(&self) {
        Plugin::on_tick(&**self);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

/// A callback whose default ran: the filter's type does not implement it. The host is told
/// once (`weft.skip_callbacks`), and weft stops calling it; any other proxy answers
/// `NOT_FOUND` and goes on calling it, which changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unused {
    Stream(Phase),
    Log,
    /// `proxy_on_done`, which always answers "done" in this SDK.
    Done,
}

impl Unused {
    fn bit(self) -> u8 {
        match self {
            Unused::Stream(p) => p as u8,
            Unused::Log => 6,
            Unused::Done => 7,
        }
    }

    fn export(self) -> &'static str {
        use weft_abi::names::callback as cb;
        match self {
            Unused::Stream(Phase::RequestHeaders) => cb::ON_REQUEST_HEADERS,
            Unused::Stream(Phase::RequestBody) => cb::ON_REQUEST_BODY,
            Unused::Stream(Phase::RequestTrailers) => cb::ON_REQUEST_TRAILERS,
            Unused::Stream(Phase::ResponseHeaders) => cb::ON_RESPONSE_HEADERS,
            Unused::Stream(Phase::ResponseBody) => cb::ON_RESPONSE_BODY,
            Unused::Stream(Phase::ResponseTrailers) => cb::ON_RESPONSE_TRAILERS,
            Unused::Log => cb::ON_LOG,
            Unused::Done => cb::ON_DONE,
        }
    }
}

thread_local! {
    /// Bits of the [`Unused`] callbacks the host was told of (one VM per instance).
    static TOLD: Cell<u8> = const { Cell::new(0) };
}

/// Tells the host, once per VM, that `callback` does nothing for this module's filter.
pub(crate) fn unused(callback: Unused) {
    let bit = 1 << callback.bit();
    if TOLD.get() & bit != 0 {
        return;
    }
    TOLD.set(TOLD.get() | bit);
    let name = weft_abi::names::foreign::SKIP_CALLBACKS;
    // NOT_FOUND (not weft) or any refusal: the host goes on calling it, as before.
    let _ = host().call_foreign_function(name, callback.export().as_bytes());
}

impl Phase {
    pub(crate) fn stream(self) -> StreamType {
        match self {
            Phase::RequestHeaders | Phase::RequestBody | Phase::RequestTrailers => {
                StreamType::HttpRequest
            }
            _ => StreamType::HttpResponse,
        }
    }

    /// 0 for the request, 1 for the response.
    fn direction(self) -> usize {
        match self.stream() {
            StreamType::HttpRequest => 0,
            _ => 1,
        }
    }

    fn is_body(self) -> bool {
        matches!(self, Phase::RequestBody | Phase::ResponseBody)
    }
}

/// A filter with its type erased: each callback as a boxed future. Body callbacks see the
/// buffer's bytes `start..size`.
trait StreamAny {
    fn call(
        self: Rc<Self>,
        phase: Phase,
        start: usize,
        size: usize,
        end_of_stream: bool,
    ) -> Option<BoxFuture>;
    fn on_log(&self);
}

impl<F: HttpFilter> StreamAny for F {
    fn call(
        self: Rc<Self>,
        phase: Phase,
        start: usize,
        size: usize,
        eos: bool,
    ) -> Option<BoxFuture> {
        let f = self;
        let view = size.saturating_sub(start);
        Some(match phase {
            Phase::RequestHeaders => Box::pin(async move {
                let mut h = Headers::new(MapType::HttpRequestHeaders);
                (f.on_request_headers(&mut h, eos).await, 0)
            }),
            Phase::RequestBody if F::WANTS_BODIES => Box::pin(async move {
                let mut b = Body::new(BufferType::HttpRequestBody, start, view);
                let action = f.on_request_body(&mut b, eos).await;
                (action, start + b.len())
            }),
            Phase::RequestTrailers => Box::pin(async move {
                let mut h = Headers::new(MapType::HttpRequestTrailers);
                (f.on_request_trailers(&mut h).await, 0)
            }),
            Phase::ResponseHeaders => Box::pin(async move {
                let mut h = Headers::new(MapType::HttpResponseHeaders);
                (f.on_response_headers(&mut h, eos).await, 0)
            }),
            Phase::ResponseBody if F::WANTS_BODIES => Box::pin(async move {
                let mut b = Body::new(BufferType::HttpResponseBody, start, view);
                let action = f.on_response_body(&mut b, eos).await;
                (action, start + b.len())
            }),
            Phase::ResponseTrailers => Box::pin(async move {
                let mut h = Headers::new(MapType::HttpResponseTrailers);
                (f.on_response_trailers(&mut h).await, 0)
            }),
            Phase::RequestBody | Phase::ResponseBody => return None,
        })
    }
    fn on_log(&self) {
        HttpFilter::on_log(self);
    }
}

struct Root {
    plugin: Option<Rc<dyn RootAny>>,
    /// The tick period asked of the host now.
    period: Option<Duration>,
    /// Time of the last plugin tick, in host nanoseconds.
    last_plugin_tick: u128,
}

struct Stream {
    root: u32,
    filter: Rc<dyn StreamAny>,
    /// A callback still waiting, with the phase it answers for and the size of the host's
    /// buffer when it was called.
    pending: Option<(Phase, usize, BoxFuture)>,
    /// What the host delivered while a callback waited, in order (phase, buffer size, end of
    /// stream); successive body deliveries are one entry.
    missed: Vec<(Phase, usize, bool)>,
    /// Per direction: bytes at the front of the host's body buffer the filter already let
    /// through, still held by the host because the SDK paused.
    passed: [usize; 2],
    /// The request is over; nothing is resumed any more.
    done: bool,
}

type Factory = fn(&[u8]) -> Result<Rc<dyn RootAny>, String>;

#[derive(Default)]
struct State {
    factory: Option<Factory>,
    roots: HashMap<u32, Root, BuildIdHasher>,
    streams: HashMap<u32, Stream, BuildIdHasher>,
    /// Streams whose futures were woken and must be polled.
    ready: Vec<u32>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
    /// The stream whose callback runs now (0: none), for what its future registers.
    static CURRENT: Cell<u32> = const { Cell::new(0) };
}

pub(crate) fn current_stream() -> u32 {
    CURRENT.with(Cell::get)
}

/// The root context of the current stream (or `context` itself if it is a root).
pub(crate) fn root_of(context: u32) -> Option<u32> {
    STATE.with(|s| {
        let s = s.borrow();
        if s.roots.contains_key(&context) {
            return Some(context);
        }
        s.streams.get(&context).map(|st| st.root)
    })
}

fn build<P: Plugin>(config: &[u8]) -> Result<Rc<dyn RootAny>, String> {
    let parsed: P::Config = if config.iter().all(u8::is_ascii_whitespace) {
        P::Config::default()
    } else {
        serde_json::from_slice(config).map_err(|e| format!("invalid configuration: {e}"))?
    };
    let plugin = P::configure(parsed)?;
    Ok(Rc::new(Rc::new(plugin)))
}

pub(crate) fn register<P: Plugin>() {
    STATE.with(|s| s.borrow_mut().factory = Some(build::<P>));
}

/// Forgets every context (the test harness starts each test afresh).
pub(crate) fn reset() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let factory = s.factory;
        *s = State {
            factory,
            ..State::default()
        };
    });
    crate::upstream::reset();
    crate::time::reset();
    TOLD.set(0);
}

// Waking: a waker is the stream's context id; waking queues it to be polled.

fn waker_for(context: u32) -> Waker {
    fn clone(data: *const ()) -> RawWaker {
        RawWaker::new(data, &VTABLE)
    }
    fn wake(data: *const ()) {
        let context = data as usize as u32;
        let _ = STATE.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if !s.ready.contains(&context) {
                    s.ready.push(context);
                }
            } else {
                let _ = PENDING_WAKES.try_with(|p| p.borrow_mut().push(context));
            }
        });
    }
    fn drop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);
    // SAFETY: the vtable's functions only read the pointer's value as a number.
    unsafe { Waker::from_raw(RawWaker::new(context as usize as *const (), &VTABLE)) }
}

thread_local! {
    /// Wakes that came while the state was borrowed.
    static PENDING_WAKES: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

fn poll(context: u32, fut: &mut BoxFuture) -> Poll<(Action, usize)> {
    let waker = waker_for(context);
    let mut cx = Context::from_waker(&waker);
    let previous = CURRENT.with(|c| c.replace(context));
    let r = fut.as_mut().poll(&mut cx);
    CURRENT.with(|c| c.set(previous));
    r
}

fn with_stream<T>(context: u32, f: impl FnOnce(&mut Stream) -> T) -> Option<T> {
    STATE.with(|s| s.borrow_mut().streams.get_mut(&context).map(f))
}

/// Where a callback for `phase` goes from its first poll.
enum Step {
    /// It finished with this action (and body view end).
    Done(Action, usize),
    /// It waits; the future is kept.
    Waiting,
    /// The filter has no such callback.
    Skipped,
}

/// Starts the filter's callback for `phase` (the host buffer holding `size` bytes).
fn start(context: u32, filter: &Rc<dyn StreamAny>, phase: Phase, size: usize, eos: bool) -> Step {
    let from = if phase.is_body() {
        with_stream(context, |st| st.passed[phase.direction()]).unwrap_or(0)
    } else {
        0
    };
    let Some(mut fut) = filter.clone().call(phase, from, size, eos) else {
        unused(Unused::Stream(phase));
        return Step::Skipped;
    };
    match poll(context, &mut fut) {
        Poll::Ready((action, seen)) => Step::Done(action, seen),
        Poll::Pending => {
            with_stream(context, |st| st.pending = Some((phase, size, fut)));
            Step::Waiting
        }
    }
}

/// Sends a filter's local response.
fn respond(response: crate::Response) {
    if let Err(e) = response.send() {
        crate::log::error(&format!("sending the local response: {e}"));
    }
}

/// Runs a stream callback the host made; returns the answer to the host (0 continue, 1 pause).
pub(crate) fn on_stream(context: u32, phase: Phase, size: usize, eos: bool) -> u32 {
    let Some((filter, busy)) = with_stream(context, |st| (st.filter.clone(), st.pending.is_some()))
    else {
        return 0;
    };
    if busy {
        // A callback of this stream still waits: hold what comes (bodies buffer), and call the
        // filter for it when the waiting callback returns.
        with_stream(context, |st| match st.missed.last_mut() {
            Some(last) if last.0 == phase && phase.is_body() => *last = (phase, size, eos),
            _ => st.missed.push((phase, size, eos)),
        });
        return 1;
    }
    match start(context, &filter, phase, size, eos) {
        Step::Done(Action::Continue, _) | Step::Skipped => {
            // The host passes on what it holds.
            with_stream(context, |st| st.passed[phase.direction()] = 0);
            0
        }
        Step::Done(Action::Pause, _) | Step::Waiting => 1,
        Step::Done(Action::Respond(r), _) => {
            respond(r);
            1
        }
    }
}

/// A waiting callback for `phase` (called with the host's buffer at `size` bytes) finished with
/// `action`, its body view ending at `seen`: the filter is called for what the host delivered
/// meanwhile, then the stream is continued, answered or left held.
fn resume(
    context: u32,
    filter: &Rc<dyn StreamAny>,
    (mut phase, mut size): (Phase, usize),
    mut action: Action,
    mut seen: usize,
) {
    loop {
        match action {
            Action::Respond(r) => {
                with_stream(context, |st| st.missed.clear());
                respond(r);
                return;
            }
            // A headers callback that pauses holds the stream: nothing more reaches the filter.
            Action::Pause if !phase.is_body() => return,
            Action::Continue if phase.is_body() => {
                with_stream(context, |st| st.passed[phase.direction()] = seen);
            }
            Action::Continue | Action::Pause => {}
        }
        let next = with_stream(context, |st| {
            (!st.missed.is_empty()).then(|| st.missed.remove(0))
        })
        .flatten();
        let Some((next_phase, delivered, eos)) = next else {
            if matches!(action, Action::Continue) {
                with_stream(context, |st| st.passed[phase.direction()] = 0);
                if let Err(e) = host().continue_stream(phase.stream()) {
                    crate::log::error(&format!("continuing the stream: {e:?}"));
                }
            }
            return;
        };
        // The bytes that came after what the last callback was shown follow where its view
        // ended now (it may have changed the length of what it saw).
        size = if next_phase == phase {
            seen + delivered.saturating_sub(size)
        } else {
            delivered
        };
        phase = next_phase;
        match start(context, filter, phase, size, eos) {
            Step::Done(a, s) => (action, seen) = (a, s),
            Step::Skipped => (action, seen) = (Action::Continue, size),
            Step::Waiting => return,
        }
    }
}

/// Polls every woken stream (after a callout answer or a tick delivered something).
pub(crate) fn run_ready() {
    loop {
        let next = STATE.with(|s| {
            let mut s = s.borrow_mut();
            PENDING_WAKES.with(|p| {
                for c in p.borrow_mut().drain(..) {
                    if !s.ready.contains(&c) {
                        s.ready.push(c);
                    }
                }
            });
            if s.ready.is_empty() {
                None
            } else {
                Some(s.ready.remove(0))
            }
        });
        let Some(context) = next else {
            return;
        };
        let taken = with_stream(context, |st| {
            if st.done {
                st.pending = None;
                return None;
            }
            st.pending.take().map(|p| (p, st.filter.clone()))
        })
        .flatten();
        let Some(((phase, size, mut fut), filter)) = taken else {
            continue;
        };
        if host().set_effective_context(context).is_err() {
            continue;
        }
        match poll(context, &mut fut) {
            Poll::Ready((action, seen)) => resume(context, &filter, (phase, size), action, seen),
            Poll::Pending => {
                with_stream(context, |st| st.pending = Some((phase, size, fut)));
            }
        }
    }
}

pub(crate) fn on_context_create(context: u32, parent: u32) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if parent == 0 {
            s.roots.insert(
                context,
                Root {
                    plugin: None,
                    period: None,
                    last_plugin_tick: 0,
                },
            );
            return;
        }
        let filter = match s.roots.get(&parent).and_then(|r| r.plugin.as_ref()) {
            Some(p) => p.new_stream(),
            None => return,
        };
        s.streams.insert(
            context,
            Stream {
                root: parent,
                filter,
                pending: None,
                missed: Vec::new(),
                passed: [0; 2],
                done: false,
            },
        );
    });
}

pub(crate) fn on_vm_start(_root: u32, _size: usize) -> u32 {
    1
}

pub(crate) fn on_configure(root: u32, size: usize) -> u32 {
    let config = if size == 0 {
        Vec::new()
    } else {
        match host().get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(c) => c,
            Err(e) => {
                crate::log::error(&format!("reading the configuration: {e:?}"));
                return 0;
            }
        }
    };
    let Some(factory) = STATE.with(|s| s.borrow().factory) else {
        crate::log::error("no plugin registered (weft_sdk::plugin! missing)");
        return 0;
    };
    match factory(&config) {
        Ok(plugin) => {
            let period = plugin.tick_period();
            STATE.with(|s| {
                if let Some(r) = s.borrow_mut().roots.get_mut(&root) {
                    r.plugin = Some(plugin);
                }
            });
            if period.is_some() {
                update_tick(root);
            }
            unused(Unused::Done);
            1
        }
        Err(e) => {
            host().log(LogLevel::Error, &format!("configuration refused: {e}"));
            0
        }
    }
}

/// Sets the root's tick period to what the plugin and pending sleeps need.
pub(crate) fn update_tick(root: u32) {
    let want = STATE.with(|s| {
        let s = s.borrow();
        let plugin = s
            .roots
            .get(&root)
            .and_then(|r| r.plugin.as_ref())
            .and_then(|p| p.tick_period());
        let sleeps = crate::time::resolution(root);
        match (plugin, sleeps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    });
    let changed = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(r) = s.roots.get_mut(&root) else {
            return false;
        };
        if r.period == want {
            return false;
        }
        r.period = want;
        true
    });
    if changed {
        let _ = host().set_tick_period(want.unwrap_or(Duration::ZERO));
    }
}

pub(crate) fn on_tick(root: u32) {
    let now = crate::time::now_nanos();
    crate::time::fire(root, now);
    let due = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let r = s.roots.get_mut(&root)?;
        let period = r.plugin.as_ref()?.tick_period()?.as_nanos();
        if now.saturating_sub(r.last_plugin_tick) + 500_000 >= period {
            r.last_plugin_tick = now;
            Some(())
        } else {
            None
        }
    });
    if due.is_some() {
        // The plugin's own work, outside the state borrow.
        let plugin = STATE.with(|s| s.borrow().roots.get(&root).and_then(|r| r.plugin.clone()));
        if let Some(p) = plugin {
            p.on_tick();
        }
    }
    run_ready();
    update_tick(root);
}

pub(crate) fn on_http_call_response(
    _root: u32,
    token: u32,
    headers: usize,
    body_size: usize,
    trailers: usize,
) {
    crate::upstream::deliver_http(token, headers, body_size, trailers);
    run_ready();
}

pub(crate) fn on_grpc_receive(_root: u32, token: u32, size: usize) {
    crate::upstream::deliver_grpc_message(token, size);
    run_ready();
}

pub(crate) fn on_grpc_close(_root: u32, token: u32, status: u32) {
    crate::upstream::deliver_grpc_close(token, status);
    run_ready();
}

pub(crate) fn on_log(context: u32) {
    let filter = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let st = s.streams.get_mut(&context)?;
        st.done = true;
        st.pending = None;
        Some(st.filter.clone())
    });
    if let Some(f) = filter {
        let previous = CURRENT.with(|c| c.replace(context));
        f.on_log();
        CURRENT.with(|c| c.set(previous));
    }
}

pub(crate) fn on_done(_context: u32) -> u32 {
    1
}

pub(crate) fn on_delete(context: u32) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.streams.remove(&context).is_none() {
            s.roots.remove(&context);
        }
        s.ready.retain(|c| *c != context);
    });
    crate::upstream::forget_stream(context);
    crate::time::forget_stream(context);
}
