//! Pauses each request on a unary gRPC callout (`weft.test.echo.Echo/Unary` on the `grpc`
//! cluster) with the request's path as the message, and resumes it with `x-grpc-reply` set to
//! the reply's message; a failed call answers 503 with `x-grpc-status`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Grpc) });
}}

struct Grpc;

/// `EchoRequest { message }`: field 1, length-delimited.
fn encode(message: &str) -> Vec<u8> {
    let mut out = vec![0x0a];
    let mut n = message.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(message.as_bytes());
    out
}

/// Field 1 (a string) of `EchoReply`.
fn decode(bytes: &[u8]) -> Option<String> {
    let mut i = 0;
    while i < bytes.len() {
        let key = bytes[i];
        i += 1;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                while bytes.get(i)? & 0x80 != 0 {
                    i += 1;
                }
                i += 1;
            }
            2 => {
                let (mut len, mut shift) = (0usize, 0);
                loop {
                    let b = *bytes.get(i)?;
                    i += 1;
                    len |= usize::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                let value = bytes.get(i..i + len)?;
                i += len;
                if field == 1 {
                    return String::from_utf8(value.to_vec()).ok();
                }
            }
            _ => return None,
        }
    }
    None
}

impl HttpContext for Grpc {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let call = self.dispatch_grpc_call(
            "grpc",
            "weft.test.echo.Echo",
            "Unary",
            vec![("x-from", b"filter")],
            Some(&encode(&path)),
            Duration::from_secs(5),
        );
        match call {
            Ok(_) => Action::Pause,
            Err(status) => {
                self.send_http_response(
                    502,
                    vec![],
                    Some(format!("gRPC callout refused: {status:?}").as_bytes()),
                );
                Action::Pause
            }
        }
    }
}

impl Context for Grpc {
    fn on_grpc_call_response(&mut self, _: u32, status: u32, size: usize) {
        if status == 0 {
            let body = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            let reply = decode(&body).unwrap_or_default();
            self.set_http_request_header("x-grpc-reply", Some(&reply));
            self.resume_http_request();
        } else {
            let code = status.to_string();
            self.send_http_response(
                503,
                vec![("x-grpc-status", &code)],
                Some(b"gRPC callout failed"),
            );
        }
    }
}
