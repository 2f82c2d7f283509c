//! A Wasm service in the manner of the public SDK's `hello_world` example: it greets in
//! `on_vm_start` (with its VM configuration), then works on a timer with no request — each
//! tick logs the time and a random number (WASI `clock_time_get` and `random_get`), counts in
//! shared data (`hello.ticks`) and in a counter metric (`hello_ticks`), and, when configured,
//! calls a cluster and keeps the answer in shared data (`hello.last`).
//!
//! Plugin configuration, `key=value` pairs separated by commas: `tick_ms=N` (no timer
//! without it), `callout=CLUSTER`, `trap_at=N` (panic on the N-th tick of this VM).
//!
//! As a filter (same `vm_id` as the service) it reports what the service keeps:
//! `x-hello-ticks` and `x-hello-last` on responses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::info;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Hello::default()) });
}}

#[derive(Default)]
struct Hello {
    ticks: u64,
    trap_at: Option<u64>,
    callout: Option<String>,
    counter: Option<u32>,
}

fn text(v: Option<Vec<u8>>) -> String {
    v.and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

impl Context for Hello {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let _ = self.set_shared_data("hello.last", Some(&body), None);
    }
}

impl RootContext for Hello {
    fn on_vm_start(&mut self, size: usize) -> bool {
        let config = text(self.get_vm_configuration()).to_owned();
        info!("Hello, World! ({size} bytes of VM configuration: {config})");
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let config = text(self.get_plugin_configuration());
        for pair in config.split(',').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return false;
            };
            match k.trim() {
                "tick_ms" => match v.trim().parse() {
                    Ok(ms) => self.set_tick_period(Duration::from_millis(ms)),
                    Err(_) => return false,
                },
                "trap_at" => self.trap_at = v.trim().parse().ok(),
                "callout" => self.callout = Some(v.trim().to_owned()),
                _ => return false,
            }
        }
        self.counter =
            proxy_wasm::hostcalls::define_metric(MetricType::Counter, "hello_ticks").ok();
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.trap_at == Some(self.ticks) {
            panic!("trap on tick {}", self.ticks);
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut byte = [0u8; 1];
        getrandom::fill(&mut byte).expect("random_get");
        info!(
            "It's {secs} seconds past the epoch, and there is a {}% chance of rain.",
            byte[0] % 100
        );
        if let Some(id) = self.counter {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        loop {
            let (value, cas) = self.get_shared_data("hello.ticks");
            let n = text(value).parse::<u64>().unwrap_or(0) + 1;
            match self.set_shared_data("hello.ticks", Some(n.to_string().as_bytes()), cas) {
                Err(Status::CasMismatch) => continue,
                _ => break,
            }
        }
        if let Some(cluster) = &self.callout {
            let headers = vec![
                (":method", "GET"),
                (":path", "/hello"),
                (":authority", "hello"),
            ];
            let _ = self.dispatch_http_call(cluster, headers, None, vec![], Duration::from_secs(5));
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Reporter))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Reporter;

impl Context for Reporter {}

impl HttpContext for Reporter {
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let ticks = text(self.get_shared_data("hello.ticks").0);
        let last = text(self.get_shared_data("hello.last").0);
        self.set_http_response_header("x-hello-ticks", Some(&ticks));
        self.set_http_response_header("x-hello-last", Some(&last));
        Action::Continue
    }
}
