//! A timer: `on_configure` sets a 10 ms tick; each `on_tick` counts in shared data (`ticks`).
//! A response reports the count in `x-ticks`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

fn ticks(ctx: &dyn Context) -> u64 {
    ctx.get_shared_data("ticks")
        .0
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        self.set_tick_period(Duration::from_millis(10));
        true
    }

    fn on_tick(&mut self) {
        loop {
            let (_, cas) = self.get_shared_data("ticks");
            let n = ticks(self) + 1;
            if self
                .set_shared_data("ticks", Some(n.to_string().as_bytes()), cas)
                .is_ok()
            {
                return;
            }
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
        self.set_http_response_header("x-ticks", Some(&ticks(self).to_string()));
        Action::Continue
    }
}
