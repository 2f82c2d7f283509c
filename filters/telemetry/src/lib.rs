//! # telemetry: golden metrics, access logs, trace propagation (Mixer's telemetry)
//!
//! For every request: Istio's golden metrics (`requests_total`, `request_duration_milliseconds`,
//! `request_bytes`, `response_bytes`) labelled with the source workload (from the client's mTLS
//! identity), the destination (the cluster), the response code and gRPC status — label sets
//! capped per worker so a flood of distinct values cannot blow up memory; access-log fields
//! (the trace, and chosen request headers) added to the listener's native access-log line, or
//! a JSON line of its own; and W3C `traceparent` / B3 propagation, starting a trace when the
//! request has none.
//! See `README.md` for the configuration reference.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use serde::Deserialize;
use weft_sdk::metrics::{Counter, Histogram};
use weft_sdk::{Action, Headers, HttpFilter, Plugin, decimal, properties, random, time};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    /// W3C Trace Context (`traceparent`, `tracestate`).
    #[default]
    W3c,
    /// Zipkin B3 multi-header (`x-b3-traceid`, …).
    B3,
    /// Both: read either (W3C first), write both.
    Both,
    /// Neither: no trace headers are touched.
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Fields added to the listener's access-log line (`trace_id`, `span_id`, `log_headers`),
    /// which weft writes natively (`access_log` on the listener).
    #[default]
    Native,
    /// A JSON line of the filter's own in weft's log (slower: each field is read through the
    /// host, the line formatted in the guest).
    Json,
    /// No access log.
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The workload this proxy fronts (the `destination_workload` label); default: the
    /// cluster the request went to.
    #[serde(default)]
    pub destination_workload: Option<String>,
    /// Most distinct label sets per metric and worker; beyond, labels read `_other`.
    #[serde(default = "default_max_label_sets")]
    pub max_label_sets: usize,
    #[serde(default)]
    pub access_log: LogFormat,
    #[serde(default)]
    pub propagation: Propagation,
    /// Request headers copied into the access log (lower case).
    #[serde(default)]
    pub log_headers: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            destination_workload: None,
            max_label_sets: default_max_label_sets(),
            access_log: LogFormat::default(),
            propagation: Propagation::default(),
            log_headers: Vec::new(),
        }
    }
}

fn default_max_label_sets() -> usize {
    200
}

/// The metrics of one label set, resolved once.
struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Handles {
    /// `labels`: source workload, source namespace, destination, code, gRPC status.
    fn new(labels: &[&str; 5]) -> Handles {
        let hist = |name: &str| {
            Histogram::new(name)
                .with("source_workload", labels[0])
                .with("destination_workload", labels[2])
                .with("response_code", labels[3])
        };
        Handles {
            requests: Counter::new("requests_total")
                .with("source_workload", labels[0])
                .with("source_namespace", labels[1])
                .with("destination_workload", labels[2])
                .with("response_code", labels[3])
                .with("grpc_response_status", labels[4]),
            duration: hist("request_duration_milliseconds"),
            request_bytes: hist("request_bytes"),
            response_bytes: hist("response_bytes"),
        }
    }
}

pub struct Telemetry {
    config: Config,
    /// The proxy records the golden metrics itself (weft does, natively).
    host_metrics: bool,
    /// The label sets seen on this worker, with their metrics, by [`label_key`].
    handles: RefCell<HashMap<String, Rc<Handles>>>,
    /// The key of the label set being looked up (one buffer, reused).
    key: RefCell<String>,
    /// For label sets past the cap.
    other: Rc<Handles>,
}

impl Plugin for Telemetry {
    type Config = Config;
    type Filter = TelemetryFilter;

    fn configure(config: Config) -> Result<Self, String> {
        if config.max_label_sets == 0 || config.max_label_sets > 800 {
            return Err("max_label_sets: must be between 1 and 800".into());
        }
        for (i, h) in config.log_headers.iter().enumerate() {
            if h.is_empty() || h.starts_with(':') {
                return Err(format!("log_headers[{i}]: not a header name: {h:?}"));
            }
        }
        let host_metrics = weft_sdk::metrics::golden_metrics(
            config.destination_workload.as_deref(),
            config.max_label_sets,
        );
        if host_metrics && config.access_log != LogFormat::Json {
            // Nothing is left for the end of the request.
            weft_sdk::skip_on_log();
        }
        Ok(Telemetry {
            host_metrics,
            config,
            handles: RefCell::default(),
            key: RefCell::default(),
            other: Rc::new(Handles::new(&["_other"; 5])),
        })
    }

    fn filter(self: &Rc<Self>) -> TelemetryFilter {
        TelemetryFilter {
            plugin: self.clone(),
            start_ns: Cell::new(0),
            request: RefCell::default(),
        }
    }
}

/// What the request head said, kept for the end.
#[derive(Debug, Default, Clone)]
struct Seen {
    method: String,
    path: String,
    authority: String,
    protocol_grpc: bool,
    trace_id: String,
    span_id: String,
    request_id: String,
    user_agent: String,
    extra: Vec<(String, String)>,
}

pub struct TelemetryFilter {
    plugin: Rc<Telemetry>,
    start_ns: Cell<u128>,
    request: RefCell<Seen>,
}

/// A label set as one map key: each value with its length first, so no two sets share a key
/// whatever their values hold.
fn label_key(out: &mut String, labels: &[&str; 5]) {
    out.clear();
    for l in labels {
        decimal::push(out, l.len() as u64);
        out.push(':');
        out.push_str(l);
    }
}

/// A random id of `bytes` bytes in lower-case hex, never all zeros (which W3C and B3 reserve).
/// Written digit by digit: `core::fmt`'s padded hex costs a guest several times as much, on
/// every request.
fn hex_id(bytes: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Written as bytes (16 digits per random word), not pushed char by char.
    let mut digits = vec![0u8; bytes * 2];
    for chunk in digits.chunks_mut(16) {
        let mut x = random::u64();
        for d in chunk {
            *d = HEX[(x >> 60) as usize];
            x <<= 4;
        }
    }
    if digits.iter().all(|&d| d == b'0') {
        digits[0] = b'1';
    }
    // Only hex digits: always UTF-8.
    String::from_utf8(digits).unwrap_or_default()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// `00-<trace>-<parent>-<flags>`: the trace id and flags of a valid `traceparent`.
fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut it = v.trim().split('-');
    let (version, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if version.len() != 2 || version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if !is_hex(trace, 32) || !is_hex(parent, 16) || flags.len() != 2 {
        return None;
    }
    if version == "00" && it.next().is_some() {
        return None;
    }
    Some((trace.to_ascii_lowercase(), flags.to_owned()))
}

/// A string as the inside of a JSON string, escaped as it is written (no copy).
struct Json<'a>(&'a str);

impl std::fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        let mut run = 0;
        for (i, b) in s.bytes().enumerate() {
            if b == b'"' || b == b'\\' || b < 0x20 {
                f.write_str(&s[run..i])?;
                match b {
                    b'"' => f.write_str("\\\"")?,
                    b'\\' => f.write_str("\\\\")?,
                    _ => write!(f, "\\u{b:04x}")?,
                }
                run = i + 1;
            }
        }
        f.write_str(&s[run..])
    }
}

impl TelemetryFilter {
    fn propagate(&self, headers: &mut Headers, seen: &mut Seen) {
        let mode = self.plugin.config.propagation;
        if mode == Propagation::None {
            return;
        }
        let span = hex_id(8);
        let w3c = matches!(mode, Propagation::W3c | Propagation::Both);
        let b3 = matches!(mode, Propagation::B3 | Propagation::Both);
        // Each header is read only when its format is on (W3C first): a read is a host call.
        let from_w3c = || {
            headers
                .get("traceparent")
                .and_then(|v| parse_traceparent(&v))
        };
        let from_b3 = || {
            headers
                .get("x-b3-traceid")
                .filter(|t| is_hex(t, 32) || is_hex(t, 16))
                .map(|t| {
                    let sampled = match headers.get("x-b3-sampled").as_deref() {
                        Some("0") => "00",
                        _ => "01",
                    };
                    (format!("{t:0>32}").to_ascii_lowercase(), sampled.to_owned())
                })
        };
        let found = w3c.then(from_w3c).flatten();
        let found = found.or_else(|| b3.then(from_b3).flatten());
        let (trace, flags) = found.unwrap_or_else(|| (hex_id(16), "01".to_owned()));
        if w3c {
            let mut parent = String::with_capacity(55);
            for (i, part) in ["00", &trace, &span, &flags].into_iter().enumerate() {
                if i > 0 {
                    parent.push('-');
                }
                parent.push_str(part);
            }
            headers.set("traceparent", &parent).ok();
        }
        if b3 {
            if let Some(parent) = headers.get("x-b3-spanid") {
                headers.set("x-b3-parentspanid", &parent).ok();
            }
            headers.set("x-b3-traceid", &trace).ok();
            headers.set("x-b3-spanid", &span).ok();
            headers
                .set("x-b3-sampled", if flags == "00" { "0" } else { "1" })
                .ok();
        }
        seen.trace_id = trace;
        seen.span_id = span;
    }

    /// The metrics of a label set, or the `_other` ones once the worker has seen too many.
    fn handles(&self, values: &[&str; 5]) -> Rc<Handles> {
        let mut key = self.plugin.key.borrow_mut();
        label_key(&mut key, values);
        let mut all = self.plugin.handles.borrow_mut();
        if let Some(h) = all.get(key.as_str()) {
            return h.clone();
        }
        if all.len() >= self.plugin.config.max_label_sets {
            return self.plugin.other.clone();
        }
        let h = Rc::new(Handles::new(values));
        all.insert(key.clone(), h.clone());
        h
    }
}

impl HttpFilter for TelemetryFilter {
    async fn on_request_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        let format = self.plugin.config.access_log;
        if !self.plugin.host_metrics || format == LogFormat::Json {
            self.start_ns.set(time::now_nanos());
        }
        // A line of the filter's own needs the request's fields; the native line has them.
        let mut seen = if format == LogFormat::Json {
            Seen {
                method: headers.get(":method").unwrap_or_default(),
                path: headers.path().unwrap_or_default(),
                authority: headers.authority().unwrap_or_default(),
                protocol_grpc: headers
                    .get("content-type")
                    .is_some_and(|c| c.starts_with("application/grpc")),
                request_id: headers.get("x-request-id").unwrap_or_default(),
                user_agent: headers.get("user-agent").unwrap_or_default(),
                ..Seen::default()
            }
        } else {
            Seen::default()
        };
        for h in self
            .plugin
            .config
            .log_headers
            .iter()
            .filter(|_| format != LogFormat::Off)
        {
            if let Some(v) = headers.get(h) {
                seen.extra.push((h.clone(), v));
            }
        }
        self.propagate(headers, &mut seen);
        if format == LogFormat::Native {
            // The listener's line has the request; the filter adds what only it knows.
            if !seen.trace_id.is_empty() {
                properties::set(&["access_log", "trace_id"], seen.trace_id.as_bytes()).ok();
                properties::set(&["access_log", "span_id"], seen.span_id.as_bytes()).ok();
            }
            for (k, v) in &seen.extra {
                properties::set(&["access_log", k], v.as_bytes()).ok();
            }
            return Action::Continue;
        }
        *self.request.borrow_mut() = seen;
        Action::Continue
    }

    fn on_log(&self) {
        if self.plugin.host_metrics && self.plugin.config.access_log != LogFormat::Json {
            // The proxy records the metrics, and writes the access log (or none is wanted).
            return;
        }
        // The last look at the request: taken, not copied.
        let seen = std::mem::take(&mut *self.request.borrow_mut());
        let code = properties::response_code().unwrap_or(0);
        // An int64, as Envoy encodes it; absent for non-gRPC responses.
        let grpc_status = properties::get_int(&["response", "grpc_status"])
            .map(|g| g.to_string())
            .unwrap_or_default();
        let identity = properties::peer_identity();
        let (src_workload, src_ns) = properties::workload_of(identity.as_deref());
        let cluster = properties::cluster_name().unwrap_or_default();
        let destination = match &self.plugin.config.destination_workload {
            Some(d) => d.as_str(),
            None if cluster.is_empty() => "unknown",
            None => cluster.as_str(),
        };
        let duration_ms = properties::request_duration()
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or_else(|| time::now_nanos().saturating_sub(self.start_ns.get()) as f64 / 1e6);
        let req_bytes = properties::get_int(&["request", "total_size"])
            .unwrap_or(0)
            .max(0);
        let resp_bytes = properties::get_int(&["response", "total_size"])
            .unwrap_or(0)
            .max(0);
        if !self.plugin.host_metrics {
            let mut code_text = String::with_capacity(3);
            decimal::push(&mut code_text, u64::from(code));
            let m = self.handles(&[src_workload, src_ns, destination, &code_text, &grpc_status]);
            m.requests.inc().ok();
            m.duration.record(duration_ms.round() as u64).ok();
            m.request_bytes.record(req_bytes as u64).ok();
            m.response_bytes.record(resp_bytes as u64).ok();
        }

        if self.plugin.config.access_log == LogFormat::Json {
            let start = self.start_ns.get();
            let start_time = UNIX_EPOCH + std::time::Duration::from_nanos(start as u64);
            let secs = start_time
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let mut line = String::with_capacity(512);
            let _ = write!(
                line,
                concat!(
                    "access {{\"start_time\":{:.6},\"method\":\"{}\",\"path\":\"{}\",\"authority\":\"{}\",",
                    "\"response_code\":{},\"grpc_status\":\"{}\",\"duration_ms\":{:.3},",
                    "\"bytes_received\":{},\"bytes_sent\":{},\"source_address\":\"{}\",",
                    "\"source_identity\":\"{}\",\"route\":\"{}\",\"cluster\":\"{}\",",
                    "\"upstream_host\":\"{}\",\"request_id\":\"{}\",\"user_agent\":\"{}\",",
                    "\"trace_id\":\"{}\",\"span_id\":\"{}\",\"protocol\":\"{}\""
                ),
                secs,
                Json(&seen.method),
                Json(&seen.path),
                Json(&seen.authority),
                code,
                Json(&grpc_status),
                duration_ms,
                req_bytes,
                resp_bytes,
                Json(&properties::source_address().unwrap_or_default()),
                Json(identity.as_deref().unwrap_or("")),
                Json(&properties::route_name().unwrap_or_default()),
                Json(&cluster),
                Json(&properties::get_string(&["upstream", "address"]).unwrap_or_default()),
                Json(&seen.request_id),
                Json(&seen.user_agent),
                seen.trace_id,
                seen.span_id,
                if seen.protocol_grpc { "grpc" } else { "http" },
            );
            for (k, v) in &seen.extra {
                let _ = write!(line, ",\"{}\":\"{}\"", Json(k), Json(v));
            }
            line.push('}');
            weft_sdk::log::info(&line);
        }
    }
}

weft_sdk::plugin!(Telemetry);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::{FilterTest, Verdict};

    fn start(config: &str) -> FilterTest {
        FilterTest::new::<Telemetry>(config).expect("config")
    }

    /// Label keys keep sets apart.
    #[test]
    fn label_keys_keep_sets_apart() {
        let mut a = String::new();
        let mut b = String::new();
        label_key(&mut a, &["a:1", "b", "", "200", ""]);
        label_key(&mut b, &["a", "1:b", "", "200", ""]);
        assert_ne!(a, b);
        assert_eq!(a, "3:a:11:b0:3:2000:");
    }

    /// Ids are lower-case hex of the asked length (across the 16-digit blocks they are made
    /// of), valid as W3C ids, and do not repeat.
    #[test]
    fn ids_are_hex_of_their_length_and_valid() {
        let mut seen = std::collections::HashSet::new();
        for bytes in [1, 8, 9, 16] {
            for _ in 0..500 {
                let id = hex_id(bytes);
                assert_eq!(id.len(), bytes * 2, "{id}");
                assert!(
                    id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                    "{id}"
                );
                assert!(is_hex(&id, bytes * 2), "{id}");
                if bytes >= 8 {
                    assert!(seen.insert(id.clone()), "repeated: {id}");
                }
            }
        }
    }

    #[test]
    fn traces_are_started_or_continued() {
        let t = start("{}");
        let s = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
        assert_eq!(s.request_headers(true), Verdict::Continue);
        let tp = s.request_header("traceparent").expect("a traceparent");
        let (trace, flags) = parse_traceparent(&tp).expect("valid");
        assert_eq!(flags, "01");
        assert_eq!(trace.len(), 32);

        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("traceparent", incoming),
        ]);
        s.request_headers(true);
        let tp = s.request_header("traceparent").expect("traceparent");
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(!tp.contains("00f067aa0ba902b7"), "a new span id: {tp}");

        // An invalid traceparent is replaced by a new trace.
        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            (
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
        ]);
        s.request_headers(true);
        let tp = s.request_header("traceparent").expect("traceparent");
        assert!(!tp.contains("00000000000000000000000000000000"), "{tp}");
    }

    #[test]
    fn b3_is_read_and_written() {
        let t = start(r#"{"propagation":"both"}"#);
        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]);
        s.request_headers(true);
        assert_eq!(
            s.request_header("x-b3-traceid").as_deref(),
            Some("80f198ee56343ba864fe8b2a57d3eff7")
        );
        assert_eq!(
            s.request_header("x-b3-parentspanid").as_deref(),
            Some("e457b5a2e4d86bd1")
        );
        assert!(
            s.request_header("traceparent")
                .is_some_and(|t| t.contains("80f198ee56343ba864fe8b2a57d3eff7"))
        );
    }

    /// Each mode reads only its own headers; with both, W3C comes first.
    #[test]
    fn each_mode_continues_only_the_trace_it_reads() {
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let b3 = "80f198ee56343ba864fe8b2a57d3eff7";
        let trace_of = |mode: &str, headers: &[(&str, &str)]| {
            let t = start(&format!(r#"{{"propagation":"{mode}"}}"#));
            let mut req = vec![(":method", "GET"), (":path", "/"), (":authority", "a")];
            req.extend_from_slice(headers);
            let s = t.request(&req);
            s.request_headers(true);
            let written = match mode {
                "b3" => s.request_header("x-b3-traceid"),
                _ => s
                    .request_header("traceparent")
                    .map(|tp| tp[3..35].to_owned()),
            };
            written.expect("a trace written")
        };
        let both = [("traceparent", w3c), ("x-b3-traceid", b3)];
        assert_eq!(trace_of("both", &both), w3c[3..35]);
        assert_eq!(trace_of("both", &both[1..]), b3);
        assert_eq!(trace_of("w3c", &both), w3c[3..35]);
        assert_ne!(trace_of("w3c", &both[1..]), b3, "w3c ignores B3");
        assert_eq!(trace_of("b3", &both), b3);
        assert_ne!(trace_of("b3", &both[..1]), w3c[3..35], "b3 ignores W3C");
    }

    /// The access log line the filter logged (without its `access ` prefix).
    fn access_line(t: &FilterTest) -> String {
        t.host()
            .logs()
            .into_iter()
            .find_map(|(_, l)| l.strip_prefix("access ").map(str::to_owned))
            .expect("an access log line")
    }

    /// By default the filter writes no line: it adds the trace and its `log_headers` to the
    /// listener's native line, as `access_log.*` properties.
    #[test]
    fn native_access_logs_get_the_trace_and_the_headers_as_fields() {
        let t = start(r#"{"log_headers":["x-note","x-absent"]}"#);
        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("x-note", "n\"1\""),
        ]);
        s.request_headers(true);
        let tp = s.request_header("traceparent").expect("a traceparent");
        s.finish();
        let prop = |k: &str| {
            t.host()
                .property(&["access_log", k])
                .map(|v| String::from_utf8(v).expect("UTF-8"))
        };
        let trace = prop("trace_id").expect("trace_id");
        let span = prop("span_id").expect("span_id");
        assert_eq!(tp, format!("00-{trace}-{span}-01"));
        assert_eq!(prop("x-note").as_deref(), Some("n\"1\""));
        assert_eq!(prop("x-absent"), None);
        assert!(
            t.host()
                .logs()
                .iter()
                .all(|(_, l)| !l.starts_with("access ")),
            "no line of the filter's own"
        );
    }

    #[test]
    fn metrics_and_an_access_log_line_per_request() {
        let t = start(r#"{"destination_workload":"orders","access_log":"json"}"#);
        t.host().set_property(
            &["connection", "uri_san_peer_certificate"],
            b"spiffe://mesh/ns/shop/sa/web",
        );
        t.host()
            .set_property(&["response", "code"], &503i64.to_le_bytes());
        t.host()
            .set_property(&["request", "duration"], &(12_000_000i64).to_le_bytes());
        let s = t.request(&[
            (":method", "POST"),
            (":path", "/o?x=\"1\""),
            (":authority", "a"),
        ]);
        s.request_headers(true);
        s.finish();
        let series = r#"requests_total{source_workload="web",source_namespace="shop",destination_workload="orders",response_code="503",grpc_response_status=""}"#;
        assert_eq!(t.host().metric(series), Some(1));
        let hist = r#"request_duration_milliseconds{source_workload="web",destination_workload="orders",response_code="503"}"#;
        assert_eq!(t.host().metric(hist), Some(1));
        let line = access_line(&t);
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/o?x=\"1\"");
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["duration_ms"], 12.0);
        assert_eq!(v["source_identity"], "spiffe://mesh/ns/shop/sa/web");
    }

    /// Hostile bytes in every logged field (quotes, backslashes, control characters, a
    /// forged field, non-ASCII) stay inside their JSON strings, unchanged once parsed.
    #[test]
    fn the_access_log_line_is_json_whatever_the_request_says() {
        let t = start(r#"{"log_headers":["x-note"],"access_log":"json"}"#);
        let path = "/a\"b\\c\u{1}\n\",\"method\":\"FORGED";
        let agent = "é\t\"ua\\";
        let s = t.request(&[
            (":method", "GET"),
            (":path", path),
            (":authority", "h\"x"),
            ("user-agent", agent),
            ("x-note", "n\"}"),
        ]);
        s.request_headers(true);
        s.finish();
        let line = access_line(&t);
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], path);
        assert_eq!(v["authority"], "h\"x");
        assert_eq!(v["user_agent"], agent);
        assert_eq!(v["x-note"], "n\"}");
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn label_sets_are_capped() {
        let t = start(r#"{"max_label_sets":3,"access_log":"off"}"#);
        for code in 200..210i64 {
            t.host()
                .set_property(&["response", "code"], &code.to_le_bytes());
            let s = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
            s.request_headers(true);
            s.finish();
        }
        let series: Vec<String> = t
            .host()
            .metrics()
            .into_iter()
            .map(|(_, n, _)| n)
            .filter(|n| n.starts_with("requests_total"))
            .collect();
        assert_eq!(series.len(), 4, "3 label sets and _other: {series:?}");
        assert!(series.iter().any(|s| s.contains("_other")));
    }

    /// Label values are arbitrary (an identity, a cluster name): no two sets may share a key,
    /// whatever separators or digits their values hold.
    #[test]
    fn label_keys_are_unambiguous() {
        let key = |l: [&str; 5]| {
            let mut k = String::new();
            label_key(&mut k, &l);
            k
        };
        let sets = [
            ["a", "bc", "d", "200", ""],
            ["ab", "c", "d", "200", ""],
            ["a", "b", "cd", "200", ""],
            ["1:a", "", "d", "200", ""],
            ["", "1:a", "d", "200", ""],
            ["a:", "", "d", "200", ""],
        ];
        let keys: std::collections::HashSet<String> = sets.iter().map(|s| key(*s)).collect();
        assert_eq!(keys.len(), sets.len(), "{keys:?}");
    }
}
