//! Answers some requests itself: `/deny` gets 403 `denied by filter` with `x-denied-by`;
//! `/grpc-deny` a gRPC PERMISSION_DENIED. Every response it sees (its own included) gets
//! `x-local-saw: <status>`.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, GrpcStatusCode, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Local) });
}}

struct Local;

impl Context for Local {}

impl HttpContext for Local {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        match self.get_http_request_header(":path").as_deref() {
            Some("/deny") => {
                self.send_http_response(
                    403,
                    vec![("x-denied-by", "local")],
                    Some(b"denied by filter"),
                );
                Action::Pause
            }
            Some(p)
                if p.ends_with("/grpc-deny")
                    || p.contains("Unary") && self.get_http_request_header("x-deny").is_some() =>
            {
                self.send_grpc_response(GrpcStatusCode::PermissionDenied, Some("no entry"), vec![]);
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        self.set_http_response_header("x-local-saw", Some(&status));
        Action::Continue
    }
}
