//! Panics on demand: on request headers when the request has `x-panic`, on response headers
//! when it has `x-panic-late`. Otherwise responses carry `x-vm-instance`, a number drawn when
//! the VM started, so a test can tell a fresh VM from the one that failed.

use std::sync::atomic::{AtomicU64, Ordering};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

static INSTANCE: AtomicU64 = AtomicU64::new(0);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        let now = self
            .get_current_time()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        INSTANCE.store(now, Ordering::Relaxed);
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { late: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    late: bool,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if self.get_http_request_header("x-panic").is_some() {
            panic!("asked to panic");
        }
        self.late = self.get_http_request_header("x-panic-late").is_some();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.late {
            panic!("asked to panic late");
        }
        let id = INSTANCE.load(Ordering::Relaxed).to_string();
        self.set_http_response_header("x-vm-instance", Some(&id));
        Action::Continue
    }
}
