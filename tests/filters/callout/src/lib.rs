//! Pauses each request on an HTTP callout to the `auth` cluster (or the one `x-auth-cluster`
//! names) and resumes it from the callout's response: a 200 lets the request through with
//! `x-auth-status` and `x-auth-backend`; anything else answers 403 `auth failed: <status>`.
//! `x-auth: deny` makes the callout ask `/status/403`; a refused callout answers 502.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Callout) });
}}

struct Callout;

impl HttpContext for Callout {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let cluster = self
            .get_http_request_header("x-auth-cluster")
            .unwrap_or_else(|| "auth".into());
        let path = match self.get_http_request_header("x-auth").as_deref() {
            Some("deny") => "/status/403",
            _ => "/check",
        };
        let call = self.dispatch_http_call(
            &cluster,
            vec![
                (":method", "GET"),
                (":path", path),
                (":authority", "auth.local"),
            ],
            None,
            vec![],
            Duration::from_secs(5),
        );
        match call {
            Ok(_) => Action::Pause,
            Err(status) => {
                self.send_http_response(
                    502,
                    vec![],
                    Some(format!("callout refused: {status:?}").as_bytes()),
                );
                Action::Pause
            }
        }
    }
}

impl Context for Callout {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        if status == "200" {
            self.set_http_request_header("x-auth-status", Some(&status));
            let backend = self
                .get_http_call_response_header("x-backend")
                .unwrap_or_default();
            self.set_http_request_header("x-auth-backend", Some(&backend));
            self.resume_http_request();
        } else {
            self.send_http_response(
                403,
                vec![],
                Some(format!("auth failed: {status}").as_bytes()),
            );
        }
    }
}
