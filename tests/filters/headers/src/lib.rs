//! Reads and writes headers both ways: the request gets `x-wasm-request`, `x-replace-me` is
//! replaced and `x-remove-me` removed, `:path` is set from `x-rewrite-path` and `:authority`
//! from `x-rewrite-authority`; the response gets
//! `x-wasm-response`, `x-echo-back` (the request's `x-echo`), `x-upstream-status`, and loses
//! `x-backend`.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Headers { echo: None }) });
}}

struct Headers {
    echo: Option<String>,
}

impl Context for Headers {}

impl HttpContext for Headers {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.add_http_request_header("x-wasm-request", "seen");
        if self.get_http_request_header("x-replace-me").is_some() {
            self.set_http_request_header("x-replace-me", Some("replaced"));
        }
        self.set_http_request_header("x-remove-me", None);
        if let Some(path) = self.get_http_request_header("x-rewrite-path") {
            self.set_http_request_header(":path", Some(&path));
        }
        if let Some(authority) = self.get_http_request_header("x-rewrite-authority") {
            self.set_http_request_header(":authority", Some(&authority));
        }
        self.echo = self.get_http_request_header("x-echo");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.add_http_response_header("x-wasm-response", "seen");
        if let Some(echo) = &self.echo {
            self.add_http_response_header("x-echo-back", echo);
        }
        // The request's fields as they went upstream, read after they went.
        for (name, echo) in [
            ("x-wasm-request", "x-request-later"),
            ("x-request-id", "x-request-id-later"),
        ] {
            if let Some(v) = self.get_http_request_header(name) {
                self.add_http_response_header(echo, &v);
            }
        }
        let status = self.get_http_response_header(":status").unwrap_or_default();
        self.add_http_response_header("x-upstream-status", &status);
        self.set_http_response_header("x-backend", None);
        Action::Continue
    }
}
