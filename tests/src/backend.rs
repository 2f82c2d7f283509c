//! A real HTTP backend for tests and demos: HTTP/1.1 and prior-knowledge h2c on one port,
//! bound to `127.0.0.1:0`, with behaviours chosen by path:
//!
//! | path | answer |
//! |---|---|
//! | anything else | 200, JSON describing the request (backend name, method, uri, version, headers) |
//! | `/status/<code>` | that status |
//! | `/delay/<ms>` | 200 after that many milliseconds |
//! | `/bytes/<n>` | `n` bytes, streamed in 64 KiB chunks, with a content-length |
//! | `/chunked/<n>` | `n` bytes, streamed without a content-length |
//! | `/echo` | the request body streamed back |
//! | `/count` | the number of request body bytes received |
//! | `/trailers` | body `ok` then the trailer `x-trailer: done` |
//! | `/consume/<code>` | reads the whole request body, then answers that status with its size |
//! | `/stall` | one chunk, then nothing (the response never ends) |
//! | `/healthz` | 200, or 503 after [`Backend::set_healthy`]`(false)` |
//! | `/auth` | an API-key service: 200 with `x-user: <name>` when `x-api-key` is `key-<name>`, else 403 |
//! | `Upgrade: echo` | 101, then every byte sent comes back |
//!
//! Every response carries `x-backend: <name>`, after [`Backend::set_delay`] if one is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the backend answers with.
pub enum TestBody {
    Full(Option<Bytes>),
    Stream {
        left: u64,
        chunk: Bytes,
    },
    Echo(Incoming),
    Trailers(u8),
    /// One chunk, then pending forever.
    Stall(bool),
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            TestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            TestBody::Stream { left, chunk } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                let n = (*left).min(chunk.len() as u64) as usize;
                *left -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n)))))
            }
            TestBody::Echo(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            TestBody::Stall(sent) => {
                if *sent {
                    Poll::Pending
                } else {
                    *sent = true;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first chunk\n")))))
                }
            }
            TestBody::Trailers(step) => {
                *step += 1;
                match *step {
                    1 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ok"))))),
                    2 => {
                        let mut t = HeaderMap::new();
                        t.insert("x-trailer", HeaderValue::from_static("done"));
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    _ => Poll::Ready(None),
                }
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            TestBody::Full(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            _ => http_body::SizeHint::default(),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TestBody::Full(b) => b.is_none(),
            TestBody::Stream { left, .. } => *left == 0,
            TestBody::Echo(inner) => inner.is_end_stream(),
            TestBody::Trailers(step) => *step >= 2,
            TestBody::Stall(_) => false,
        }
    }
}

/// What the backend's requests share, changeable while it runs.
struct State {
    name: Arc<str>,
    requests: AtomicU64,
    delay_ms: AtomicU64,
    healthy: AtomicBool,
}

/// A running backend; stopped (listener and every open connection) when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<State>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl Backend {
    /// Starts a backend on `127.0.0.1:0`.
    pub async fn start(name: &str) -> Backend {
        Self::start_on("127.0.0.1:0".parse().expect("address"), name).await
    }

    /// Starts a backend on a given address (to bring a "killed" endpoint back).
    pub async fn start_on(addr: SocketAddr, name: &str) -> Backend {
        Self::start_inner(addr, name, None, false).await
    }

    /// Starts a backend that speaks HTTP/1.1 only (as most application servers do): an
    /// HTTP/2 preface gets nowhere.
    pub async fn start_http1_only(name: &str) -> Backend {
        let addr = "127.0.0.1:0".parse().expect("address");
        Self::start_inner(addr, name, None, true).await
    }

    /// Starts a backend on `127.0.0.1:0` that speaks TLS with `config` (see
    /// [`crate::tls::server_config`]); ALPN picks HTTP/2 or HTTP/1.1.
    pub async fn start_tls(name: &str, config: Arc<rustls::ServerConfig>) -> Backend {
        let addr = "127.0.0.1:0".parse().expect("address");
        Self::start_inner(
            addr,
            name,
            Some(tokio_rustls::TlsAcceptor::from(config)),
            false,
        )
        .await
    }

    /// Serves on a listener bound elsewhere (in a pod's network namespace, say).
    pub async fn start_with(listener: std::net::TcpListener, name: &str) -> Backend {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("listener");
        Self::serve(listener, name, None, false).await
    }

    /// Serves TLS with `config` on a listener bound elsewhere.
    pub async fn start_tls_with(
        listener: std::net::TcpListener,
        name: &str,
        config: Arc<rustls::ServerConfig>,
    ) -> Backend {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("listener");
        let tls = Some(tokio_rustls::TlsAcceptor::from(config));
        Self::serve(listener, name, tls, false).await
    }

    async fn start_inner(
        addr: SocketAddr,
        name: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
        http1_only: bool,
    ) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("backend binds");
        Self::serve(listener, name, tls, http1_only).await
    }

    async fn serve(
        listener: TcpListener,
        name: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
        http1_only: bool,
    ) -> Backend {
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            name: Arc::from(name),
            requests: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut closing = stopped.clone();
            loop {
                // Stopping wins over a connection that arrives at the same time: once `Drop`
                // has run, nothing more is accepted (the abort alone lands at the task's next
                // poll, which may be on another thread).
                let accepted = tokio::select! {
                    biased;
                    _ = closing.wait_for(|s| *s) => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                let mut stopped = stopped.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| respond(state.clone(), req));
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if http1_only {
                        builder = builder.http1_only();
                    }
                    let serve = async {
                        match tls {
                            None => {
                                let io = TokioIo::new(stream);
                                let _ = builder.serve_connection_with_upgrades(io, service).await;
                            }
                            Some(acceptor) => {
                                let Ok(stream) = acceptor.accept(stream).await else {
                                    return;
                                };
                                let io = TokioIo::new(stream);
                                let _ = builder.serve_connection_with_upgrades(io, service).await;
                            }
                        }
                    };
                    // Stopped first: a request that reaches a dropped backend on a connection
                    // it had kept alive is never answered.
                    tokio::select! {
                        biased;
                        _ = stopped.wait_for(|s| *s) => {}
                        _ = serve => {}
                    }
                });
            }
        });
        Backend {
            addr,
            name: name.to_owned(),
            state,
            stop,
            task,
        }
    }

    /// Requests this backend has received.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Adds `delay` to every answer from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// What `/healthz` answers: 200 when healthy, 503 otherwise.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Relaxed);
    }

    /// `127.0.0.1:port`, as a config endpoint.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

fn describe(name: &str, req: &Request<Incoming>) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_owned(), serde_json::Value::String(v));
            }
        }
    }
    serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    })
}

async fn respond(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let name = state.name.clone();
    let path = req.uri().path().to_owned();
    let mut parts: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    parts.resize(2, "");
    let (status, body) = if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(TestBody::Full(None));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("echo"));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert("x-backend", HeaderValue::from_str(&name).expect("name"));
        return Ok(r);
    } else {
        match (parts[0], parts[1]) {
            ("status", code) => (
                StatusCode::from_u16(code.parse().unwrap_or(500))
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                TestBody::Full(Some(Bytes::from(format!("status {code} from {name}\n")))),
            ),
            ("delay", ms) => {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
                (
                    StatusCode::OK,
                    TestBody::Full(Some(Bytes::from(format!("delayed by {name}\n")))),
                )
            }
            ("bytes", n) | ("chunked", n) => (
                StatusCode::OK,
                TestBody::Stream {
                    left: n.parse().unwrap_or(0),
                    chunk: Bytes::from(vec![b'x'; 64 * 1024]),
                },
            ),
            ("echo", _) => (StatusCode::OK, TestBody::Echo(req.into_body())),
            ("count", _) => {
                let mut body = req.into_body();
                let mut n = 0u64;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                        Err(_) => break,
                    }
                }
                (
                    StatusCode::OK,
                    TestBody::Full(Some(Bytes::from(n.to_string()))),
                )
            }
            ("trailers", _) => (StatusCode::OK, TestBody::Trailers(0)),
            ("stall", _) => (StatusCode::OK, TestBody::Stall(false)),
            ("healthz", _) => {
                if state.healthy.load(Ordering::Relaxed) {
                    (
                        StatusCode::OK,
                        TestBody::Full(Some(Bytes::from_static(b"ok\n"))),
                    )
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        TestBody::Full(Some(Bytes::from_static(b"unhealthy\n"))),
                    )
                }
            }
            ("auth", _) => {
                let user = req
                    .headers()
                    .get("x-api-key")
                    .and_then(|k| k.to_str().ok())
                    .and_then(|k| k.strip_prefix("key-"))
                    .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric()))
                    .map(str::to_owned);
                let mut r = Response::new(TestBody::Full(Some(Bytes::from_static(b""))));
                match user {
                    Some(u) => {
                        r.headers_mut()
                            .insert("x-user", HeaderValue::from_str(&u).expect("alphanumeric"));
                    }
                    None => *r.status_mut() = StatusCode::FORBIDDEN,
                }
                return Ok(r);
            }
            ("consume", code) => {
                let mut body = req.into_body();
                let mut n = 0u64;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                        Err(_) => break,
                    }
                }
                (
                    StatusCode::from_u16(code.parse().unwrap_or(500))
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    TestBody::Full(Some(Bytes::from(n.to_string()))),
                )
            }
            _ => {
                let json = describe(&name, &req);
                (
                    StatusCode::OK,
                    TestBody::Full(Some(Bytes::from(json.to_string()))),
                )
            }
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("x-backend", HeaderValue::from_str(&name).expect("name"));
    if parts[0] == "bytes" {
        h.insert(
            "content-length",
            HeaderValue::from(parts[1].parse::<u64>().unwrap_or(0)),
        );
    }
    if parts[0] == "trailers" {
        h.insert("trailer", HeaderValue::from_static("x-trailer"));
    }
    Ok(r)
}
