//! Rewrites bodies both ways once it has seen all of them: the request body upper-cased, the
//! response body wrapped in `<filtered>…</filtered>`; and, having seen each body, sets a header
//! with its original length (`x-request-body-length` on the request, `x-response-body-length`
//! on the response) — after the body, where Envoy could no longer do it.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Body) });
}}

struct Body;

impl Context for Body {}

impl HttpContext for Body {
    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        self.set_http_request_body(0, size, &body.to_ascii_uppercase());
        self.set_http_request_header("x-request-body-length", Some(&size.to_string()));
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        let mut wrapped = b"<filtered>".to_vec();
        wrapped.extend_from_slice(&body);
        wrapped.extend_from_slice(b"</filtered>");
        self.set_http_response_body(0, size, &wrapped);
        self.set_http_response_header("x-response-body-length", Some(&size.to_string()));
        Action::Continue
    }
}
