//! The respond stage: a [`ProxyError`] becomes the answer the client reads — one place for
//! every proxy-generated error response.

use http::{HeaderValue, Response, header};

use crate::errors::{ERROR_HEADER, ProxyError, percent_encode};
use crate::http::body::ResponseBody;

/// Builds the response for an error: for a gRPC client a gRPC "trailers-only" answer (HTTP 200,
/// `grpc-status`, `grpc-message`), otherwise a plain one.
pub fn respond(err: &ProxyError, grpc: bool) -> Response<ResponseBody> {
    if grpc {
        let mut resp = Response::new(ResponseBody::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(err.grpc_status())),
        );
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&err.public_message())) {
            h.insert("grpc-message", v);
        }
        h.insert(ERROR_HEADER, HeaderValue::from_static(err.cause()));
        return resp;
    }
    let mut body = err.public_message();
    body.push('\n');
    let mut resp = Response::new(ResponseBody::full(body.into()));
    *resp.status_mut() = err.status();
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(err.cause()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_clients_get_grpc_errors() {
        let r = respond(&ProxyError::UpstreamTimeout(Duration::from_secs(1)), true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["grpc-message"], "upstream request timeout");
        assert_eq!(r.headers()[ERROR_HEADER], "upstream_timeout");
    }

    #[test]
    fn refused_connect_is_503_with_cause() {
        let e = ProxyError::ConnectFailed {
            addr: "127.0.0.1:1".parse().expect("addr"),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let r = respond(&e, false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "upstream_connect_failed");
    }
}
