//! Callouts to clusters, as futures: `upstream::http_call(...).await` inside a callback.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use weft_abi::{BufferType, MapType};

use crate::Error;
use crate::host::host;

/// An HTTP request to send to a cluster.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub method: String,
    pub path: String,
    /// `:authority`; default: the cluster's name.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl CallRequest {
    /// A `GET` of `path`, with a 5 s timeout.
    pub fn get(path: &str) -> CallRequest {
        CallRequest {
            method: "GET".into(),
            path: path.into(),
            authority: None,
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }

    /// A `POST` of `body` to `path`.
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> CallRequest {
        let mut r = CallRequest::get(path);
        r.method = "POST".into();
        r.body = body.into();
        r
    }

    pub fn header(mut self, name: &str, value: &str) -> CallRequest {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    pub fn authority(mut self, authority: &str) -> CallRequest {
        self.authority = Some(authority.to_owned());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> CallRequest {
        self.timeout = timeout;
        self
    }
}

/// What a cluster answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl CallResponse {
    /// The first value of `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Why a callout gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The host refused to send it (unknown cluster, invalid headers).
    Refused(Error),
    /// Sent, but no response came (connection failure, reset).
    NoResponse,
    /// A gRPC call ended with a non-OK status.
    Grpc { status: u32 },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(e) => write!(f, "callout refused: {e}"),
            CallError::NoResponse => f.write_str("callout got no response"),
            CallError::Grpc { status } => write!(f, "gRPC call ended with status {status}"),
        }
    }
}

impl std::error::Error for CallError {}

enum Outcome {
    Http(Result<CallResponse, CallError>),
    Grpc(Result<Vec<u8>, CallError>),
}

#[derive(Default)]
struct Slot {
    stream: u32,
    waker: Option<Waker>,
    outcome: Option<Outcome>,
    /// gRPC: the last message received before the close.
    message: Option<Vec<u8>>,
}

thread_local! {
    static CALLS: RefCell<HashMap<u32, Slot, weft_abi::BuildIdHasher>> = RefCell::new(HashMap::default());
}

pub(crate) fn reset() {
    CALLS.with(|c| c.borrow_mut().clear());
}

pub(crate) fn forget_stream(stream: u32) {
    CALLS.with(|c| c.borrow_mut().retain(|_, s| s.stream != stream));
}

fn strings(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

fn complete(token: u32, outcome: Outcome) {
    let waker = CALLS.with(|c| {
        let mut c = c.borrow_mut();
        let slot = c.get_mut(&token)?;
        slot.outcome = Some(outcome);
        slot.waker.take()
    });
    if let Some(w) = waker {
        w.wake();
    }
}

pub(crate) fn deliver_http(token: u32, headers: usize, body_size: usize, trailers: usize) {
    let h = host();
    let result = if headers == 0 {
        Err(CallError::NoResponse)
    } else {
        let head = h
            .get_map(MapType::HttpCallResponseHeaders)
            .map(strings)
            .unwrap_or_default();
        let status = head
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let body = if body_size > 0 {
            h.get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let trailers = if trailers > 0 {
            h.get_map(MapType::HttpCallResponseTrailers)
                .map(strings)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(CallResponse {
            status,
            headers: head
                .into_iter()
                .filter(|(k, _)| !k.starts_with(':'))
                .collect(),
            body,
            trailers,
        })
    };
    complete(token, Outcome::Http(result));
}

pub(crate) fn deliver_grpc_message(token: u32, size: usize) {
    let msg = host()
        .get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
        .unwrap_or_default();
    CALLS.with(|c| {
        if let Some(s) = c.borrow_mut().get_mut(&token) {
            s.message = Some(msg);
        }
    });
}

pub(crate) fn deliver_grpc_close(token: u32, status: u32) {
    let message = CALLS.with(|c| {
        c.borrow_mut()
            .get_mut(&token)
            .and_then(|s| s.message.take())
    });
    let result = if status == 0 {
        Ok(message.unwrap_or_default())
    } else {
        Err(CallError::Grpc { status })
    };
    complete(token, Outcome::Grpc(result));
}

/// A callout in flight; resolves when the answer arrives.
struct Pending {
    token: u32,
}

impl Future for Pending {
    type Output = Outcome;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        CALLS.with(|c| {
            let mut c = c.borrow_mut();
            let Some(slot) = c.get_mut(&self.token) else {
                return Poll::Ready(Outcome::Http(Err(CallError::NoResponse)));
            };
            match slot.outcome.take() {
                Some(o) => {
                    c.remove(&self.token);
                    Poll::Ready(o)
                }
                None => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // `try_with`: at thread exit the table may be gone already.
        let _ = CALLS.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                c.remove(&self.token);
            }
        });
    }
}

fn track(token: u32) -> Pending {
    let stream = crate::dispatch::current_stream();
    CALLS.with(|c| {
        c.borrow_mut().insert(
            token,
            Slot {
                stream,
                ..Slot::default()
            },
        )
    });
    Pending { token }
}

/// Sends `req` to `cluster` and waits for the answer. A response with any status is `Ok`
/// (the proxy answers 503/504 itself when the cluster cannot be reached or times out, as
/// Envoy does); `Err` when the host refused the call or no response came.
pub async fn http_call(cluster: &str, req: CallRequest) -> Result<CallResponse, CallError> {
    let authority = req.authority.as_deref().unwrap_or(cluster);
    let mut headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", req.method.as_bytes()),
        (b":path", req.path.as_bytes()),
        (b":authority", authority.as_bytes()),
    ];
    headers.extend(
        req.headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
    );
    let token = host()
        .http_call(cluster, &headers, &req.body, &[], req.timeout)
        .map_err(|s| CallError::Refused(Error::new("http_call", s)))?;
    match track(token).await {
        Outcome::Http(r) => r,
        Outcome::Grpc(_) => Err(CallError::NoResponse),
    }
}

/// A unary gRPC call: `message` (a serialized protobuf) to `service`/`method` on `cluster`;
/// the answer's serialized message.
pub async fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &str)],
    message: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, CallError> {
    let md: Vec<(&[u8], &[u8])> = metadata
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    let token = host()
        .grpc_call(cluster, service, method, &md, message, timeout)
        .map_err(|s| CallError::Refused(Error::new("grpc_call", s)))?;
    match track(token).await {
        Outcome::Grpc(r) => r,
        Outcome::Http(_) => Err(CallError::NoResponse),
    }
}

/// Callouts the current stream is waiting for (for tests and diagnostics).
pub fn pending_calls() -> usize {
    CALLS.with(|c| c.borrow().values().filter(|s| s.outcome.is_none()).count())
}
