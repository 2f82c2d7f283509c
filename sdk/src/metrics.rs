//! Metrics the proxy exports (on weft: `/metrics`, as `weft_wasm_<name>{filter="…",…}`).
//!
//! A metric is defined once per VM by its full name (labels included) and cached, so
//! `Counter::new("requests_total").with("code", "200")` is cheap after its first use. Labels are
//! written into the name as `name{key="value",…}`, which weft turns into Prometheus labels.

use std::cell::RefCell;
use std::collections::HashMap;

use weft_abi::MetricType;

use crate::Error;
use crate::host::host;

thread_local! {
    static DEFINED: RefCell<HashMap<(u32, String), u32>> = RefCell::new(HashMap::new());
}

fn full_name(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut s = String::from(name);
    s.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        // Label values cannot break out of the name's syntax.
        s.extend(v.chars().filter(|c| !matches!(c, '"' | ',' | '{' | '}')));
        s.push('"');
    }
    s.push('}');
    s
}

fn id(kind: MetricType, name: &str, labels: &[(String, String)]) -> Result<u32, Error> {
    let full = full_name(name, labels);
    let key = (kind as u32, full);
    if let Some(id) = DEFINED.with(|d| d.borrow().get(&key).copied()) {
        return Ok(id);
    }
    let id = host()
        .define_metric(kind, &key.1)
        .map_err(|s| Error::new("define_metric", s))?;
    DEFINED.with(|d| d.borrow_mut().insert(key, id));
    Ok(id)
}

macro_rules! metric {
    ($t:ident, $kind:expr) => {
        /// Keep the handle to record without defining again: its id is resolved on first
        /// use and remembered.
        #[derive(Debug, Clone)]
        pub struct $t {
            name: String,
            labels: Vec<(String, String)>,
            resolved: std::cell::Cell<Option<u32>>,
        }

        impl $t {
            pub fn new(name: &str) -> $t {
                $t {
                    name: name.to_owned(),
                    labels: Vec::new(),
                    resolved: std::cell::Cell::new(None),
                }
            }

            /// The same metric with one more label.
            pub fn with(mut self, key: &str, value: &str) -> $t {
                self.labels.push((key.to_owned(), value.to_owned()));
                self.resolved.set(None);
                self
            }

            fn id(&self) -> Result<u32, Error> {
                if let Some(id) = self.resolved.get() {
                    return Ok(id);
                }
                let id = id($kind, &self.name, &self.labels)?;
                self.resolved.set(Some(id));
                Ok(id)
            }
        }
    };
}

metric!(Counter, MetricType::Counter);
metric!(Gauge, MetricType::Gauge);
metric!(Histogram, MetricType::Histogram);

impl Counter {
    pub fn inc(&self) -> Result<(), Error> {
        self.add(1)
    }
    pub fn add(&self, n: u64) -> Result<(), Error> {
        host()
            .increment_metric(self.id()?, n.min(i64::MAX as u64) as i64)
            .map_err(|s| Error::new("increment_metric", s))
    }
    pub fn value(&self) -> Result<u64, Error> {
        host()
            .get_metric(self.id()?)
            .map_err(|s| Error::new("get_metric", s))
    }
}

impl Gauge {
    pub fn set(&self, v: u64) -> Result<(), Error> {
        host()
            .record_metric(self.id()?, v)
            .map_err(|s| Error::new("record_metric", s))
    }
    pub fn add(&self, delta: i64) -> Result<(), Error> {
        host()
            .increment_metric(self.id()?, delta)
            .map_err(|s| Error::new("increment_metric", s))
    }
}

impl Histogram {
    pub fn record(&self, v: u64) -> Result<(), Error> {
        host()
            .record_metric(self.id()?, v)
            .map_err(|s| Error::new("record_metric", s))
    }
}

/// Asks the proxy to record Istio's golden metrics for this plugin itself, at the end of every
/// request: `requests_total`, `request_duration_milliseconds`, `request_bytes` and
/// `response_bytes`, labelled as the telemetry filter labels them (see
/// [`weft_abi::names::foreign::GOLDEN_METRICS`]), with at most `max_label_sets` label sets per
/// worker. Call it from [`crate::Plugin::configure`]. `true`: weft records them (natively,
/// without the eight property reads per request a filter needs); `false`: this proxy cannot,
/// and the filter records them itself.
pub fn golden_metrics(destination_workload: Option<&str>, max_label_sets: usize) -> bool {
    let mut args = max_label_sets.to_string();
    args.push('\n');
    args.push_str(destination_workload.unwrap_or(""));
    host()
        .call_foreign_function(weft_abi::names::foreign::GOLDEN_METRICS, args.as_bytes())
        .is_ok()
}

pub(crate) fn reset() {
    DEFINED.with(|d| d.borrow_mut().clear());
}
