//! Counts requests in shared data with compare-and-swap (key `hits`, shared by every worker's
//! VM of the `vm_id`), retrying on a CAS mismatch, and answers the count it wrote in `x-hits`.
//! The key is created in `on_configure` (which the host runs once before any worker's VM), as
//! a write to a missing key cannot be conditional.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        if self.get_shared_data("hits").0.is_none() {
            self.set_shared_data("hits", Some(b"0"), None).is_ok()
        } else {
            true
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Shared { hits: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Shared {
    hits: u64,
}

impl Context for Shared {}

impl HttpContext for Shared {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        loop {
            let (value, cas) = self.get_shared_data("hits");
            let n = value
                .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            match self.set_shared_data("hits", Some(n.to_string().as_bytes()), cas) {
                Ok(()) => {
                    self.hits = n;
                    return Action::Continue;
                }
                Err(Status::CasMismatch) => continue,
                Err(e) => panic!("set_shared_data: {e:?}"),
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_http_response_header("x-hits", Some(&self.hits.to_string()));
        Action::Continue
    }
}
