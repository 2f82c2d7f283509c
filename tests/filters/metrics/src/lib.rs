//! Guest metrics: a counter `requests{method="<m>"}`, a gauge `in_flight` and a histogram
//! `path_length`, defined in `on_configure` and recorded per request; `x-requests` answers the
//! counter's value read back.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Root {
    in_flight: u32,
    path_length: u32,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        self.in_flight = hostcalls::define_metric(MetricType::Gauge, "in_flight").expect("gauge");
        self.path_length =
            hostcalls::define_metric(MetricType::Histogram, "path_length").expect("histogram");
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            root: self.clone(),
            counters: HashMap::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    root: Root,
    counters: HashMap<String, u32>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let name = format!("requests{{method=\"{method}\"}}");
        let id = *self.counters.entry(name.clone()).or_insert_with(|| {
            hostcalls::define_metric(MetricType::Counter, &name).expect("counter")
        });
        hostcalls::increment_metric(id, 1).expect("increment");
        hostcalls::increment_metric(self.root.in_flight, 1).expect("gauge up");
        let path = self.get_http_request_header(":path").unwrap_or_default();
        hostcalls::record_metric(self.root.path_length, path.len() as u64).expect("record");
        let value = hostcalls::get_metric(id).expect("get");
        self.set_http_request_header("x-requests", Some(&value.to_string()));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        hostcalls::increment_metric(self.root.in_flight, -1).expect("gauge down");
        Action::Continue
    }
}
