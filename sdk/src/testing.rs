//! Native tests for filters: [`FilterTest`] runs a [`Plugin`] against [`TestHost`], an
//! in-memory proxy that records what the filter did — headers changed, local responses,
//! callouts, metrics, logs, shared data — and lets the test answer callouts and move time.
//! Plain `cargo test`: no proxy, no Wasm.
//!
//! ```ignore
//! let mut t = FilterTest::new::<MyPlugin>(r#"{"limit": 1}"#).expect("config accepted");
//! let s = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
//! assert_eq!(s.request_headers(true), Verdict::Continue);
//! let s = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
//! assert_eq!(s.request_headers(true), Verdict::Paused);
//! assert_eq!(t.host().local_response().map(|r| r.status), Some(429));
//! ```

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use weft_abi::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};

use crate::Plugin;
use crate::dispatch::{self, Phase};
use crate::host::{Host, Pairs};

/// A callout the filter made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub token: u32,
    /// The context that made it.
    pub context: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
    /// gRPC calls: `service/method`.
    pub grpc_method: Option<String>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local response the filter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub context: u32,
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub grpc_status: Option<u32>,
}

impl LocalResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    maps: HashMap<(u32, u32), Pairs>,
    /// What the host holds: a body buffer is passed on (moved to `passed`) when its direction
    /// continues, as a proxy does.
    buffers: HashMap<(u32, u32), Vec<u8>>,
    passed: HashMap<(u32, u32), Vec<u8>>,
    local: Vec<LocalResponse>,
    continued: Vec<(u32, StreamType)>,
    calls: Vec<Call>,
    next_token: u32,
    properties: HashMap<String, Vec<u8>>,
    shared: HashMap<String, (Vec<u8>, u32)>,
    metrics: Vec<(MetricType, String, i64)>,
    histograms: HashMap<u32, Vec<u64>>,
    logs: Vec<(LogLevel, String)>,
    /// The callbacks the module said it need not be called for (`weft.skip_callbacks`).
    skipped: Vec<String>,
}

/// The in-memory proxy.
pub struct TestHost {
    inner: RefCell<Inner>,
    effective: Cell<u32>,
    now: Cell<SystemTime>,
    tick: Cell<Duration>,
}

impl Default for TestHost {
    fn default() -> Self {
        TestHost {
            inner: RefCell::default(),
            effective: Cell::new(0),
            // The real time when the test starts, then only what the test advances.
            now: Cell::new(SystemTime::now()),
            tick: Cell::new(Duration::ZERO),
        }
    }
}

fn lossy(pairs: &Pairs) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn owned(pairs: &[(&[u8], &[u8])]) -> Pairs {
    pairs
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

impl TestHost {
    fn key(&self, kind: u32) -> (u32, u32) {
        (self.effective.get(), kind)
    }

    /// A direction of `context` continued: the body it holds goes on.
    fn pass_on(&self, context: u32, stream: StreamType) {
        let kind = match stream {
            StreamType::HttpRequest => BufferType::HttpRequestBody,
            _ => BufferType::HttpResponseBody,
        };
        let key = (context, kind as u32);
        let mut inner = self.inner.borrow_mut();
        let held = inner.buffers.remove(&key).unwrap_or_default();
        inner.passed.entry(key).or_default().extend(held);
    }

    /// The body of `context` as it went on, then what is still held.
    fn body(&self, context: u32, kind: BufferType) -> Vec<u8> {
        let key = (context, kind as u32);
        let inner = self.inner.borrow();
        let mut out = inner.passed.get(&key).cloned().unwrap_or_default();
        out.extend_from_slice(inner.buffers.get(&key).map_or(&[][..], Vec::as_slice));
        out
    }

    /// The headers (or trailers) of `context` as the filter left them.
    pub fn map(&self, context: u32, kind: MapType) -> Vec<(String, String)> {
        self.inner
            .borrow()
            .maps
            .get(&(context, kind as u32))
            .map(lossy)
            .unwrap_or_default()
    }

    /// Every local response sent, in order.
    pub fn local_responses(&self) -> Vec<LocalResponse> {
        self.inner.borrow().local.clone()
    }

    /// The last local response sent.
    pub fn local_response(&self) -> Option<LocalResponse> {
        self.inner.borrow().local.last().cloned()
    }

    /// Every callout made, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.borrow().calls.clone()
    }

    /// The streams the filter resumed, in order.
    pub fn continued(&self) -> Vec<(u32, StreamType)> {
        self.inner.borrow().continued.clone()
    }

    /// What the filter logged.
    /// The callbacks the module told the host it need not call (`weft.skip_callbacks`), in
    /// the order it told them. This host goes on calling them, as a proxy other than weft does.
    pub fn skipped(&self) -> Vec<String> {
        self.inner.borrow().skipped.clone()
    }

    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.inner.borrow().logs.clone()
    }

    /// A metric's value by its full name (labels included: `name{k="v"}`); histograms: the
    /// number of values recorded.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let inner = self.inner.borrow();
        let (i, (kind, _, v)) = inner
            .metrics
            .iter()
            .enumerate()
            .find(|(_, (_, n, _))| n == name)?;
        if *kind == MetricType::Histogram {
            return Some(
                inner
                    .histograms
                    .get(&(i as u32))
                    .map_or(0, |h| h.len() as i64),
            );
        }
        Some(*v)
    }

    /// Every metric defined: (kind, full name, value).
    pub fn metrics(&self) -> Vec<(MetricType, String, i64)> {
        self.inner.borrow().metrics.clone()
    }

    /// Sets a property (`["source", "address"]` …) every request sees.
    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        self.inner
            .borrow_mut()
            .properties
            .insert(path.join("."), value.to_vec());
    }

    /// A property as the filter (or the test) set it last.
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.inner.borrow().properties.get(&path.join(".")).cloned()
    }

    /// Shared data as the filter left it.
    pub fn shared(&self, key: &str) -> Option<Vec<u8>> {
        self.inner.borrow().shared.get(key).map(|(v, _)| v.clone())
    }

    /// The tick period the filter asked for.
    pub fn tick_period(&self) -> Duration {
        self.tick.get()
    }

    pub fn now_time(&self) -> SystemTime {
        self.now.get()
    }
}

impl Host for TestHost {
    fn call_foreign_function(&self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        if name != weft_abi::names::foreign::SKIP_CALLBACKS {
            return Err(Status::NotFound);
        }
        let args = std::str::from_utf8(args).map_err(|_| Status::BadArgument)?;
        let names: Vec<&str> = args.split(',').map(str::trim).collect();
        if !names
            .iter()
            .all(|n| weft_abi::names::foreign::SKIPPABLE.contains(n))
        {
            return Err(Status::BadArgument);
        }
        let mut inner = self.inner.borrow_mut();
        inner.skipped.extend(names.iter().map(|n| (*n).to_owned()));
        Ok(None)
    }
    fn log(&self, level: LogLevel, message: &str) {
        self.inner
            .borrow_mut()
            .logs
            .push((level, message.to_owned()));
    }
    fn log_level(&self) -> LogLevel {
        LogLevel::Trace
    }
    fn now(&self) -> SystemTime {
        self.now.get()
    }
    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        self.tick.set(period);
        Ok(())
    }
    fn set_effective_context(&self, context: u32) -> Result<(), Status> {
        self.effective.set(context);
        Ok(())
    }
    fn get_buffer(&self, kind: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status> {
        let inner = self.inner.borrow();
        let key = match kind {
            BufferType::PluginConfiguration
            | BufferType::VmConfiguration
            | BufferType::HttpCallResponseBody
            | BufferType::GrpcReceiveBuffer => (0, kind as u32),
            _ => self.key(kind as u32),
        };
        let b = inner.buffers.get(&key).ok_or(Status::NotFound)?;
        let end = start.saturating_add(max).min(b.len());
        Ok(b.get(start.min(end)..end).unwrap_or_default().to_vec())
    }
    fn set_buffer(
        &self,
        kind: BufferType,
        start: usize,
        size: usize,
        data: &[u8],
    ) -> Result<(), Status> {
        let key = self.key(kind as u32);
        let mut inner = self.inner.borrow_mut();
        let b = inner.buffers.entry(key).or_default();
        let start = start.min(b.len());
        let end = start.saturating_add(size).min(b.len());
        b.splice(start..end, data.iter().copied());
        Ok(())
    }
    fn get_map(&self, kind: MapType) -> Result<Pairs, Status> {
        let key = match kind {
            MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => {
                (0, kind as u32)
            }
            _ => self.key(kind as u32),
        };
        Ok(self
            .inner
            .borrow()
            .maps
            .get(&key)
            .cloned()
            .unwrap_or_default())
    }
    fn set_map(&self, kind: MapType, pairs: &[(&[u8], &[u8])]) -> Result<(), Status> {
        let key = self.key(kind as u32);
        self.inner.borrow_mut().maps.insert(key, owned(pairs));
        Ok(())
    }
    fn get_map_value(&self, kind: MapType, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        let map = self.get_map(kind)?;
        let values: Vec<&Vec<u8>> = map
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
            .collect();
        if values.is_empty() {
            return Ok(None);
        }
        Ok(Some(values.iter().fold(Vec::new(), |mut acc, v| {
            if !acc.is_empty() {
                acc.push(b',');
            }
            acc.extend_from_slice(v);
            acc
        })))
    }
    fn add_map_value(&self, kind: MapType, key: &[u8], value: &[u8]) -> Result<(), Status> {
        let k = self.key(kind as u32);
        self.inner
            .borrow_mut()
            .maps
            .entry(k)
            .or_default()
            .push((key.to_vec(), value.to_vec()));
        Ok(())
    }
    fn replace_map_value(&self, kind: MapType, key: &[u8], value: &[u8]) -> Result<(), Status> {
        self.remove_map_value(kind, key)?;
        self.add_map_value(kind, key, value)
    }
    fn remove_map_value(&self, kind: MapType, key: &[u8]) -> Result<(), Status> {
        let k = self.key(kind as u32);
        if let Some(m) = self.inner.borrow_mut().maps.get_mut(&k) {
            m.retain(|(n, _)| !n.eq_ignore_ascii_case(key));
        }
        Ok(())
    }
    fn continue_stream(&self, stream: StreamType) -> Result<(), Status> {
        let c = self.effective.get();
        self.inner.borrow_mut().continued.push((c, stream));
        self.pass_on(c, stream);
        Ok(())
    }
    fn close_stream(&self, _stream: StreamType) -> Result<(), Status> {
        Ok(())
    }
    fn send_local_response(
        &self,
        status: u16,
        details: &str,
        body: &[u8],
        headers: &[(&[u8], &[u8])],
        grpc_status: Option<u32>,
    ) -> Result<(), Status> {
        let r = LocalResponse {
            context: self.effective.get(),
            status,
            details: details.to_owned(),
            body: body.to_vec(),
            headers: lossy(&owned(headers)),
            grpc_status,
        };
        self.inner.borrow_mut().local.push(r);
        Ok(())
    }
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
        _trailers: &[(&[u8], &[u8])],
        timeout: Duration,
    ) -> Result<u32, Status> {
        let mut inner = self.inner.borrow_mut();
        inner.next_token += 1;
        let token = inner.next_token;
        inner.calls.push(Call {
            token,
            context: self.effective.get(),
            cluster: cluster.to_owned(),
            headers: lossy(&owned(headers)),
            body: body.to_vec(),
            timeout,
            grpc_method: None,
        });
        Ok(token)
    }
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&[u8], &[u8])],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, Status> {
        let mut inner = self.inner.borrow_mut();
        inner.next_token += 1;
        let token = inner.next_token;
        inner.calls.push(Call {
            token,
            context: self.effective.get(),
            cluster: cluster.to_owned(),
            headers: lossy(&owned(metadata)),
            body: message.to_vec(),
            timeout,
            grpc_method: Some(format!("{service}/{method}")),
        });
        Ok(token)
    }
    fn get_property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        Ok(self.inner.borrow().properties.get(&path.join(".")).cloned())
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
        self.set_property(path, value);
        Ok(())
    }
    fn get_shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        Ok(match self.inner.borrow().shared.get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        })
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let mut inner = self.inner.borrow_mut();
        let current = inner.shared.get(key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return Err(Status::CasMismatch);
        }
        inner
            .shared
            .insert(key.to_owned(), (value.to_vec(), current + 1));
        Ok(())
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut inner = self.inner.borrow_mut();
        if let Some(i) = inner
            .metrics
            .iter()
            .position(|(k, n, _)| *k == kind && n == name)
        {
            return Ok(i as u32);
        }
        inner.metrics.push((kind, name.to_owned(), 0));
        Ok(inner.metrics.len() as u32 - 1)
    }
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        let mut inner = self.inner.borrow_mut();
        let m = inner.metrics.get_mut(id as usize).ok_or(Status::NotFound)?;
        if m.0 == MetricType::Histogram {
            return Err(Status::BadArgument);
        }
        m.2 += delta;
        Ok(())
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        let mut inner = self.inner.borrow_mut();
        let kind = inner.metrics.get(id as usize).ok_or(Status::NotFound)?.0;
        match kind {
            MetricType::Histogram => inner.histograms.entry(id).or_default().push(value),
            _ => inner.metrics[id as usize].2 = value as i64,
        }
        Ok(())
    }
    fn get_metric(&self, id: u32) -> Result<u64, Status> {
        let inner = self.inner.borrow();
        let m = inner.metrics.get(id as usize).ok_or(Status::NotFound)?;
        Ok(m.2.max(0) as u64)
    }
}

/// What a callback answered the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Passed on.
    Continue,
    /// Held (paused, waiting, or answered locally: see [`TestHost::local_response`]).
    Paused,
}

fn verdict(v: u32) -> Verdict {
    if v == 0 {
        Verdict::Continue
    } else {
        Verdict::Paused
    }
}

/// A plugin configured on a [`TestHost`], and its requests.
pub struct FilterTest {
    host: Rc<TestHost>,
    root: u32,
    next: Cell<u32>,
    tick_elapsed: Cell<Duration>,
}

impl FilterTest {
    /// Registers `P`, creates its root context and configures it with `config` (JSON, or ""
    /// for none). `Err` carries what the plugin said when it refused the configuration.
    pub fn new<P: Plugin>(config: &str) -> Result<FilterTest, String> {
        let host = Rc::new(TestHost::default());
        crate::host::install(host.clone());
        dispatch::reset();
        crate::metrics::reset();
        crate::register::<P>();
        let root = 1;
        host.inner
            .borrow_mut()
            .buffers
            .insert((0, BufferType::PluginConfiguration as u32), config.into());
        host.effective.set(root);
        dispatch::on_context_create(root, 0);
        dispatch::on_vm_start(root, 0);
        if dispatch::on_configure(root, config.len()) == 0 {
            let why = host
                .logs()
                .into_iter()
                .rev()
                .find(|(l, _)| *l == LogLevel::Error)
                .map(|(_, m)| m)
                .unwrap_or_else(|| "configuration refused".into());
            return Err(why);
        }
        Ok(FilterTest {
            host,
            root,
            next: Cell::new(2),
            tick_elapsed: Cell::new(Duration::ZERO),
        })
    }

    pub fn host(&self) -> &TestHost {
        &self.host
    }

    /// A new request with these request headers (pseudo-headers included). No callback runs
    /// until the test sends something.
    pub fn request(&self, headers: &[(&str, &str)]) -> TestStream<'_> {
        let context = self.next.get();
        self.next.set(context + 1);
        self.host.inner.borrow_mut().maps.insert(
            (context, MapType::HttpRequestHeaders as u32),
            headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        );
        self.host.effective.set(self.root);
        dispatch::on_context_create(context, self.root);
        TestStream { t: self, context }
    }

    /// Answers callout `token` (HTTP) with `status`, `headers` and `body`; waiting requests
    /// resume.
    pub fn answer_call(&self, token: u32, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut pairs: Pairs = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        pairs.extend(
            headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        let n = pairs.len();
        {
            let mut inner = self.host.inner.borrow_mut();
            inner
                .maps
                .insert((0, MapType::HttpCallResponseHeaders as u32), pairs);
            inner
                .buffers
                .insert((0, BufferType::HttpCallResponseBody as u32), body.to_vec());
        }
        self.host.effective.set(self.root);
        dispatch::on_http_call_response(self.root, token, n, body.len(), 0);
    }

    /// Fails callout `token` (no response, as on a reset).
    pub fn fail_call(&self, token: u32) {
        self.host.effective.set(self.root);
        dispatch::on_http_call_response(self.root, token, 0, 0, 0);
    }

    /// Answers gRPC callout `token` with `message` and `status`.
    pub fn answer_grpc(&self, token: u32, status: u32, message: &[u8]) {
        self.host
            .inner
            .borrow_mut()
            .buffers
            .insert((0, BufferType::GrpcReceiveBuffer as u32), message.to_vec());
        self.host.effective.set(self.root);
        if status == 0 {
            dispatch::on_grpc_receive(self.root, token, message.len());
        }
        dispatch::on_grpc_close(self.root, token, status);
    }

    /// Moves the clock by `by`, running the root's ticks that fall due on the way.
    pub fn advance(&self, by: Duration) {
        let step = Duration::from_millis(1);
        let mut left = by;
        while !left.is_zero() {
            let d = left.min(step);
            left -= d;
            self.host.now.set(self.host.now.get() + d);
            let period = self.host.tick.get();
            if period.is_zero() {
                self.tick_elapsed.set(Duration::ZERO);
                continue;
            }
            let elapsed = self.tick_elapsed.get() + d;
            if elapsed >= period {
                self.tick_elapsed.set(Duration::ZERO);
                self.host.effective.set(self.root);
                dispatch::on_tick(self.root);
            } else {
                self.tick_elapsed.set(elapsed);
            }
        }
    }
}

/// One request of a [`FilterTest`].
pub struct TestStream<'a> {
    t: &'a FilterTest,
    pub context: u32,
}

impl TestStream<'_> {
    /// Replaces this request's map `kind` (headers or trailers) with `pairs`.
    fn set_map(&self, kind: MapType, pairs: &[(&str, &str)]) {
        self.t.host.inner.borrow_mut().maps.insert(
            (self.context, kind as u32),
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        );
    }

    /// Appends `chunk` to this request's buffer `kind`; its new size.
    fn append(&self, kind: BufferType, chunk: &[u8]) -> usize {
        let mut inner = self.t.host.inner.borrow_mut();
        let b = inner
            .buffers
            .entry((self.context, kind as u32))
            .or_default();
        b.extend_from_slice(chunk);
        b.len()
    }

    fn run(&self, phase: Phase, size: usize, eos: bool) -> Verdict {
        self.t.host.effective.set(self.context);
        let v = verdict(dispatch::on_stream(self.context, phase, size, eos));
        if v == Verdict::Continue {
            self.t.host.pass_on(self.context, phase.stream());
        }
        v
    }

    /// Runs `on_request_headers` (the headers given to [`FilterTest::request`]).
    pub fn request_headers(&self, end_of_stream: bool) -> Verdict {
        self.run(Phase::RequestHeaders, 0, end_of_stream)
    }

    /// Appends `chunk` to the buffered request body and runs `on_request_body`.
    pub fn request_body(&self, chunk: &[u8], end_of_stream: bool) -> Verdict {
        let size = self.append(BufferType::HttpRequestBody, chunk);
        self.run(Phase::RequestBody, size, end_of_stream)
    }

    /// Sets the request trailers and runs `on_request_trailers`.
    pub fn request_trailers(&self, trailers: &[(&str, &str)]) -> Verdict {
        self.set_map(MapType::HttpRequestTrailers, trailers);
        self.run(Phase::RequestTrailers, 0, true)
    }

    /// Sets the response trailers and runs `on_response_trailers`.
    pub fn response_trailers(&self, trailers: &[(&str, &str)]) -> Verdict {
        self.set_map(MapType::HttpResponseTrailers, trailers);
        self.run(Phase::ResponseTrailers, 0, true)
    }

    /// Sets the response headers and runs `on_response_headers`.
    pub fn response_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) -> Verdict {
        self.set_map(MapType::HttpResponseHeaders, headers);
        self.run(Phase::ResponseHeaders, 0, end_of_stream)
    }

    /// Appends `chunk` to the buffered response body and runs `on_response_body`.
    pub fn response_body(&self, chunk: &[u8], end_of_stream: bool) -> Verdict {
        let size = self.append(BufferType::HttpResponseBody, chunk);
        self.run(Phase::ResponseBody, size, end_of_stream)
    }

    /// The request headers as the filter left them.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.t
            .host
            .map(self.context, MapType::HttpRequestHeaders)
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The response headers as the filter left them.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.t
            .host
            .map(self.context, MapType::HttpResponseHeaders)
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The request body as the filter left it: what went on, then what is still held.
    pub fn request_body_bytes(&self) -> Vec<u8> {
        self.t.host.body(self.context, BufferType::HttpRequestBody)
    }

    /// The response body as the filter left it: what went on, then what is still held.
    pub fn response_body_bytes(&self) -> Vec<u8> {
        self.t.host.body(self.context, BufferType::HttpResponseBody)
    }

    /// Whether the filter resumed the request (after a wait).
    pub fn request_resumed(&self) -> bool {
        self.t
            .host
            .continued()
            .contains(&(self.context, StreamType::HttpRequest))
    }

    /// The local response this request got, if any.
    pub fn local_response(&self) -> Option<LocalResponse> {
        self.t
            .host
            .local_responses()
            .into_iter()
            .rev()
            .find(|r| r.context == self.context)
    }

    /// Ends the request: `on_log`, `on_done`, `on_delete`.
    pub fn finish(self) {
        self.t.host.effective.set(self.context);
        dispatch::on_log(self.context);
        dispatch::on_done(self.context);
        dispatch::on_delete(self.context);
    }
}
