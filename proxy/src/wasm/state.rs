//! What host functions read and write: each VM's store data ([`HostState`]) with its contexts,
//! and what an HTTP stream shares with the contexts of its filters ([`StreamData`]).
//!
//! Everything here is ABI-shaped (header maps as byte pairs, bodies as bytes): the filter chain
//! ([`super::chain`]) converts between it and the proxy's HTTP types.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;
use wasmtime::{Memory, StoreLimits, TypedFunc};
use weft_abi::{AbiVersion, LogLevel};

use super::runtime::caps;
use super::shared::WasmShared;
use super::vm::Vm;
use super::worker::WasmWorker;

pub use weft_abi::IdHasher;

/// A map keyed by host-made ids.
pub type IdMap<V> = HashMap<u32, V, weft_abi::BuildIdHasher>;

/// A list of pairs as a guest sent them (local response headers).
pub type Pairs = Vec<(Bytes, Bytes)>;

/// The body bytes each filter of a chain holds in one direction, by chain position; in place
/// for a chain of up to two filters.
pub type Bodies = SmallVec<[Vec<u8>; 2]>;

/// A header (trailer, metadata) map as the ABI sees it: pseudo-headers (`:method`, `:path`,
/// `:authority`, `:scheme`, `:status`) first, then the fields. The fields stay in the proxy's
/// own `HeaderMap`, moved into the stream; when a message goes on, the stream keeps a copy for
/// the callbacks after it (and `on_log`).
#[derive(Debug, Default, Clone)]
pub struct Headers {
    pub pseudo: Vec<(Bytes, Bytes)>,
    pub map: HeaderMap,
}

/// Why a guest's header edit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadHeader;

fn is_pseudo(name: &[u8]) -> bool {
    matches!(
        name,
        b":method" | b":path" | b":authority" | b":scheme" | b":status" | b":protocol"
    )
}

/// A field name to look up, as the map's `&str` key: looked up in place (lower-cased on the
/// stack), where a `HeaderName` would copy a name it does not know to the heap. `None` for a
/// name that is not text (never a valid field name).
pub fn field_name(name: &[u8]) -> Option<&str> {
    std::str::from_utf8(name).ok()
}

impl Headers {
    /// The first value of `name` (names compare lower-case).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        if name.first() == Some(&b':') {
            // Pseudo-header names are kept lower-case, as the host asks for them: an exact
            // match first, a caseless one for a guest's other spelling.
            return self
                .pseudo
                .iter()
                .find(|(k, _)| k[..] == *name)
                .or_else(|| {
                    self.pseudo
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                })
                .map(|(_, v)| &v[..]);
        }
        self.map.get(field_name(name)?).map(HeaderValue::as_bytes)
    }

    /// Entries, pseudo-headers first.
    pub fn len(&self) -> usize {
        self.pseudo.len() + self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of names and values.
    pub fn byte_size(&self) -> usize {
        self.pseudo
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + self
                .map
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
    }

    /// The map in the ABI's pairs encoding.
    pub fn serialize(&self) -> Vec<u8> {
        let mut pairs: Vec<(&[u8], &[u8])> = Vec::with_capacity(self.len());
        pairs.extend(self.pseudo.iter().map(|(k, v)| (&k[..], &v[..])));
        pairs.extend(
            self.map
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
        );
        weft_abi::serialize_pairs(&pairs)
    }

    fn value(v: &[u8]) -> Result<HeaderValue, BadHeader> {
        HeaderValue::from_bytes(v).map_err(|_| BadHeader)
    }

    /// Adds an occurrence (a pseudo-header is set instead: it has one value).
    pub fn add(&mut self, name: &[u8], value: &[u8]) -> Result<(), BadHeader> {
        if name.first() == Some(&b':') {
            return self.replace(name, value);
        }
        let n = HeaderName::from_bytes(name).map_err(|_| BadHeader)?;
        self.map.append(n, Self::value(value)?);
        Ok(())
    }

    /// Sets the one value of `name` (replacing all occurrences).
    pub fn replace(&mut self, name: &[u8], value: &[u8]) -> Result<(), BadHeader> {
        if name.first() == Some(&b':') {
            let lower = name.to_ascii_lowercase();
            if !is_pseudo(&lower) || value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(BadHeader);
            }
            let v = Bytes::copy_from_slice(value);
            match self.pseudo.iter_mut().find(|(k, _)| k[..] == lower[..]) {
                Some(slot) => slot.1 = v,
                None => self.pseudo.push((Bytes::from(lower), v)),
            }
            return Ok(());
        }
        let n = HeaderName::from_bytes(name).map_err(|_| BadHeader)?;
        self.map.insert(n, Self::value(value)?);
        Ok(())
    }

    /// Removes every occurrence of `name` (fine if there is none).
    pub fn remove(&mut self, name: &[u8]) {
        if name.first() == Some(&b':') {
            self.pseudo.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        } else if let Some(n) = field_name(name) {
            self.map.remove(n);
        }
    }

    /// Replaces the whole map with `pairs` (a guest's `proxy_set_header_map_pairs`).
    pub fn set_all(&mut self, pairs: &[(&[u8], &[u8])]) -> Result<(), BadHeader> {
        let mut next = Headers {
            pseudo: Vec::new(),
            map: HeaderMap::with_capacity(pairs.len()),
        };
        for (k, v) in pairs {
            next.add(k, v)?;
        }
        *self = next;
        Ok(())
    }

    /// Headers built from guest pairs.
    pub fn from_pairs(pairs: &[(&[u8], &[u8])]) -> Result<Headers, BadHeader> {
        let mut h = Headers::default();
        h.set_all(pairs)?;
        Ok(h)
    }
}

/// What the guest is being called for: decides which buffers and maps are readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    Idle,
    Start,
    ContextCreate,
    VmStart,
    Configure,
    Tick,
    QueueReady,
    HttpCallResponse,
    GrpcInitialMetadata,
    GrpcReceive,
    GrpcTrailingMetadata,
    GrpcClose,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
    Done,
    Delete,
}

impl Callback {
    /// The stream callback an export name of [`weft_abi::names::foreign::SKIPPABLE`] is.
    pub fn skippable(name: &[u8]) -> Option<Callback> {
        use weft_abi::names::callback as cb;
        let name = std::str::from_utf8(name).ok()?;
        Some(match name {
            cb::ON_REQUEST_HEADERS => Callback::RequestHeaders,
            cb::ON_REQUEST_BODY => Callback::RequestBody,
            cb::ON_REQUEST_TRAILERS => Callback::RequestTrailers,
            cb::ON_RESPONSE_HEADERS => Callback::ResponseHeaders,
            cb::ON_RESPONSE_BODY => Callback::ResponseBody,
            cb::ON_RESPONSE_TRAILERS => Callback::ResponseTrailers,
            cb::ON_LOG => Callback::Log,
            cb::ON_DONE => Callback::Done,
            _ => return None,
        })
    }
}

/// The callbacks a module said it implements as nothing that lets everything through
/// (`weft.skip_callbacks`): the host leaves them uncalled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped(u32);

impl Skipped {
    pub fn contains(self, cb: Callback) -> bool {
        self.0 & (1 << cb as u32) != 0
    }

    pub fn insert(&mut self, cb: Callback) {
        self.0 |= 1 << cb as u32;
    }

    /// `names`, comma-separated export names; `None` (and nothing added) if one is not
    /// skippable.
    pub fn parse(names: &[u8]) -> Option<Skipped> {
        let mut set = Skipped::default();
        for name in names.split(|&b| b == b',') {
            set.insert(Callback::skippable(name.trim_ascii())?);
        }
        Some(set)
    }

    pub fn union(self, other: Skipped) -> Skipped {
        Skipped(self.0 | other.0)
    }
}

/// Which way a body flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request = 0,
    Response = 1,
}

/// A local response a filter asked for (`proxy_send_local_response`).
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u16,
    pub details: Bytes,
    pub body: Bytes,
    pub headers: Pairs,
    /// `None`: not a gRPC response.
    pub grpc_status: Option<u32>,
}

/// Something a filter asked of its stream, applied by the chain once the guest call returned.
#[derive(Debug, Clone)]
pub enum StreamAction {
    Continue(Direction),
    Close(Direction),
    LocalResponse(LocalResponse),
}

/// Facts about the stream, for properties.
#[derive(Debug, Default)]
pub struct StreamInfo {
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connection_id: u64,
    /// The downstream connection's TLS, if any.
    pub tls: Option<Arc<crate::tls::TlsInfo>>,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: &'static str,
    pub scheme: &'static str,
    /// When the request began.
    pub started: Option<std::time::Instant>,
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    /// Where the request stage counts a body that goes around the filters.
    pub request_body_counted: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub listener: Arc<str>,
    /// The route and cluster that took the request (their names).
    pub route: Option<Arc<crate::metrics::RouteStats>>,
    /// Before the request is routed: what finds the route it matches now (`route_name` during
    /// the request's filters, computed when a filter asks, as Envoy's route cache).
    pub routes: Option<Arc<dyn Routing + Send + Sync>>,
    pub upstream: Option<SocketAddr>,
    pub response_code: Option<u16>,
    pub response_details: Option<String>,
    pub backend_latency: Option<Duration>,
    pub duration: Option<Duration>,
    pub tries: u32,
}

/// What the filters' host asks of the listener's routing before the request is routed. The
/// route stage provides it.
pub trait Routing: std::fmt::Debug {
    /// The route a request head matches now (the `route_name` property on the way in).
    fn route_name(&self, head: &Headers) -> Option<String>;
    /// A request target (path and query) a filter wrote, made canonical as the check stage
    /// makes a client's: `None` when it is canonical already or cannot be made so.
    fn canonical_target(&self, target: &str) -> Option<String>;
}

/// What an HTTP stream shares with the contexts of its filters.
#[derive(Debug, Default)]
pub struct StreamData {
    pub request_headers: Headers,
    pub request_trailers: Option<Headers>,
    pub response_headers: Option<Headers>,
    pub response_trailers: Option<Headers>,
    /// Per filter (by chain position): the request body bytes it holds (those of the current
    /// body callback, or buffered while it pauses). Grown when a body first flows.
    pub request_body: Bodies,
    /// Likewise for the response body.
    pub response_body: Bodies,
    /// What filters asked for, with the position of the filter that asked.
    pub actions: VecDeque<(usize, StreamAction)>,
    /// The request side and the response side of the chain wait on these (for an action, or
    /// for output the other side produced).
    pub wakers: [Option<Waker>; 2],
    /// A filter rewrote the request (0) or response (1) body.
    pub body_modified: [bool; 2],
    pub info: StreamInfo,
    /// Values from `proxy_set_property`, by path.
    pub filter_state: HashMap<Vec<u8>, Bytes, foldhash::fast::RandomState>,
    /// Bytes of paths and values in `filter_state`.
    pub filter_state_bytes: usize,
    /// A local response was asked for; later ones are ignored (and logged).
    pub local_response_sent: bool,
    /// Writes filters made to the request headers so far.
    pub request_head_edits: u64,
    /// Before the request is routed: the route its head matched (`route_name`), and after how
    /// many edits — asked again only once a filter changed the head since, as Envoy's route
    /// cache is cleared.
    pub route_seen: std::cell::RefCell<Option<(u64, Option<String>)>>,
}

impl StreamData {
    /// The body bytes filter `i` holds in direction `d` (none yet: empty).
    pub fn body(&self, d: Direction, i: usize) -> &[u8] {
        let bodies = match d {
            Direction::Request => &self.request_body,
            Direction::Response => &self.response_body,
        };
        bodies.get(i).map_or(&[], Vec::as_slice)
    }

    /// The body filter `i` holds in direction `d`, to change.
    pub fn body_mut(&mut self, d: Direction, i: usize) -> &mut Vec<u8> {
        let bodies = match d {
            Direction::Request => &mut self.request_body,
            Direction::Response => &mut self.response_body,
        };
        if bodies.len() <= i {
            bodies.resize_with(i + 1, Vec::new);
        }
        &mut bodies[i]
    }

    /// Records an action and wakes the chain (which acts once the guest call has returned:
    /// nothing here calls back into a guest).
    ///
    /// The same continue or close asked for again while the first still waits is one action;
    /// at most [`caps::MAX_STREAM_ACTIONS`] wait at once (false: refused).
    pub fn push(&mut self, index: usize, action: StreamAction) -> bool {
        let repeated = match (&action, self.actions.back()) {
            (StreamAction::Continue(d), Some((i, StreamAction::Continue(e))))
            | (StreamAction::Close(d), Some((i, StreamAction::Close(e)))) => *i == index && d == e,
            _ => false,
        };
        if !repeated {
            if self.actions.len() >= caps::MAX_STREAM_ACTIONS {
                return false;
            }
            self.actions.push_back((index, action));
        }
        self.wake_all();
        true
    }

    pub fn wake_all(&mut self) {
        for w in &mut self.wakers {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }
}

pub type SharedStream = Rc<RefCell<StreamData>>;

/// A configured plugin: one root context of a VM.
#[derive(Debug)]
pub struct PluginInfo {
    /// The filter's name (`plugin_name`).
    pub name: Arc<str>,
    pub root_id: Arc<str>,
    pub vm_id: Arc<str>,
    pub config: Bytes,
    pub fail_open: bool,
    pub body_buffer: usize,
}

#[derive(Debug)]
pub struct RootContext {
    pub plugin: Arc<PluginInfo>,
    /// The golden metrics weft records for this plugin (`weft.golden_metrics`).
    pub golden: Option<super::golden::Golden>,
}

#[derive(Debug)]
pub struct StreamContext {
    pub root: u32,
    pub stream: SharedStream,
    /// The filter's position in the chain (its body buffers in [`StreamData`]).
    pub index: usize,
}

#[derive(Debug)]
pub enum Context {
    Root(RootContext),
    Stream(StreamContext),
}

/// The data of a callout being delivered (`proxy_on_http_call_response`, `proxy_on_grpc_*`).
#[derive(Debug, Default)]
pub struct CalloutData {
    pub headers: Headers,
    pub body: Bytes,
    pub trailers: Headers,
}

/// Who is being called, and for what.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub context: u32,
    pub effective: u32,
    pub phase: Callback,
    pub end_of_stream: bool,
}

impl Default for Call {
    fn default() -> Self {
        Call {
            context: 0,
            effective: 0,
            phase: Callback::Idle,
            end_of_stream: false,
        }
    }
}

/// A VM's store data.
pub struct HostState {
    pub limits: StoreLimits,
    /// What the guest may make the host hold for it (see [`super::runtime::HostLimits`]).
    pub host_limits: super::runtime::HostLimits,
    /// The last warning or error the guest logged: said with a rejected configuration.
    pub last_complaint: Option<String>,
    pub abi: AbiVersion,
    pub vm_id: Arc<str>,
    pub vm_config: Bytes,
    /// Name used in logs for calls not tied to a plugin (start-up).
    pub module_name: Arc<str>,
    pub contexts: IdMap<Context>,
    pub call: Call,
    pub callout: Option<CalloutData>,
    /// `proxy_get_status`: the code and message of the last callout failure.
    pub status: (u32, Bytes),
    /// The guest's allocator; shared (`Rc`) so a host call takes it for the call without
    /// cloning the function's type (which costs several atomic operations).
    pub alloc: Option<Rc<TypedFunc<i32, i32>>>,
    pub memory: Option<Memory>,
    pub shared: Arc<WasmShared>,
    /// The worker this VM lives on; `None` for a VM that only validates a configuration.
    pub worker: Option<Weak<WasmWorker>>,
    /// The VM itself, for async completions.
    pub vm: Weak<Vm>,
    /// Tick periods set during the current call: (root, period); applied after it returns.
    pub tick_changes: Vec<(u32, Duration)>,
    /// Callbacks the module asked the host not to call (`weft.skip_callbacks`).
    pub skipped: Skipped,
    /// The guest metrics this VM used.
    pub metrics: super::shared::MetricCache,
    /// Contexts whose `proxy_on_done` returned false (they finish with `proxy_done`).
    pub awaiting_done: std::collections::HashSet<u32>,
    /// Contexts that called `proxy_done` during the current call.
    pub done: Vec<u32>,
    /// The token of the next callout.
    pub next_callout_token: u32,
    /// Outstanding callouts: token → the root context that owns it.
    pub callouts: IdMap<u32>,
    /// gRPC calls and streams in flight, by token.
    pub grpc: IdMap<super::callout::GrpcHandle>,
    pub log_level: LogLevel,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("vm_id", &self.vm_id)
            .field("contexts", &self.contexts.len())
            .finish()
    }
}

impl HostState {
    /// The context host calls act on (the callback's, or the one `proxy_set_effective_context`
    /// chose).
    pub fn effective(&self) -> Option<&Context> {
        self.contexts.get(&self.call.effective)
    }

    /// The stream of the effective context.
    pub fn stream(&self) -> Option<SharedStream> {
        self.stream_at().map(|(s, _)| s)
    }

    /// The stream of the effective context, and the filter's position in its chain.
    pub fn stream_at(&self) -> Option<(SharedStream, usize)> {
        match self.effective()? {
            Context::Stream(s) => Some((s.stream.clone(), s.index)),
            Context::Root(_) => None,
        }
    }

    /// The root context of the effective context (itself when it is a root).
    pub fn root_of(&self, id: u32) -> Option<u32> {
        match self.contexts.get(&id)? {
            Context::Root(_) => Some(id),
            Context::Stream(s) => Some(s.root),
        }
    }

    /// The plugin of the effective context.
    pub fn plugin(&self) -> Option<Arc<PluginInfo>> {
        let root = self.root_of(self.call.effective)?;
        match self.contexts.get(&root)? {
            Context::Root(r) => Some(r.plugin.clone()),
            Context::Stream(_) => None,
        }
    }

    /// The name logs carry: the plugin's, else the module's.
    pub fn log_name(&self) -> Arc<str> {
        self.plugin()
            .map(|p| p.name.clone())
            .unwrap_or_else(|| self.module_name.clone())
    }

    /// A fresh callout token: HTTP, gRPC calls and gRPC streams get distinct ones (the low
    /// two bits tell them apart, as proxy-wasm-cpp-host does), never 0.
    pub fn token(&mut self, kind: u32) -> u32 {
        self.next_callout_token = self.next_callout_token.wrapping_add(4);
        if self.next_callout_token < 4 {
            self.next_callout_token = 4;
        }
        self.next_callout_token | (kind & 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only exact export names of skippable callbacks, each between commas (spaces around
    /// them aside), make a list; any other spelling refuses the whole list.
    #[test]
    fn skip_lists_are_parsed_strictly() {
        let log_and_done = Skipped::parse(b" proxy_on_log ,proxy_on_done").expect("a list");
        assert!(log_and_done.contains(Callback::Log) && log_and_done.contains(Callback::Done));
        assert!(!log_and_done.contains(Callback::RequestHeaders));
        assert_eq!(
            Skipped::parse(b"proxy_on_log,proxy_on_log"),
            Skipped::parse(b"proxy_on_log"),
            "a name twice is the name once"
        );
        for bad in [
            &b""[..],
            b",",
            b"proxy_on_log,",
            b",proxy_on_log",
            b"PROXY_ON_LOG",
            b"proxy_on_log\0",
            b"proxy_on_log;proxy_on_done",
            b"proxy_on_context_create",
            b"proxy_on_delete",
            b"proxy_on_tick",
            b"proxy_on_log,\xff",
            b"proxy%5Fon%5Flog",
        ] {
            assert_eq!(
                Skipped::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A guest's spelling of a field name finds (and removes) what `HeaderName` would: any
    /// case, names longer than the stack buffer the lookup lowers into, and nothing for a name
    /// that is not a valid field name.
    #[test]
    fn guest_names_find_the_fields_header_name_would() {
        let long = "x-".to_owned() + &"a".repeat(98);
        let mut h = Headers::default();
        for (k, v) in [
            ("x-api-key", "k1"),
            ("content-type", "text/plain"),
            (&*long, "l"),
        ] {
            h.add(k.as_bytes(), v.as_bytes()).expect("valid");
        }
        let long_upper = long.to_ascii_uppercase();
        for name in [
            &b"x-api-key"[..],
            b"X-Api-KEY",
            b"content-type",
            b"Content-Type",
            long.as_bytes(),
            long_upper.as_bytes(),
            b"x-missing",
            b"x api key",
            b"x-api-key\0",
            b"",
            b"x-\xffkey",
            b"caf\xc3\xa9",
        ] {
            let by_header_name = HeaderName::from_bytes(name)
                .ok()
                .and_then(|n| h.map.get(n))
                .map(HeaderValue::as_bytes);
            assert_eq!(
                h.get(name),
                by_header_name,
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
        let mut removed = h.clone();
        removed.remove(b"X-API-KEY");
        removed.remove(long_upper.as_bytes());
        removed.remove(b"bad name");
        removed.remove(b"\xff");
        assert_eq!(removed.map.len(), 1);
        assert!(removed.map.contains_key("content-type"));
    }
}
