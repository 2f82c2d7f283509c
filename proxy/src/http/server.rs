//! One downstream connection: detect HTTP/1.1 or prior-knowledge HTTP/2, serve it with hyper,
//! enforce the connection's deadlines, and drain it when asked.
//!
//! Deadlines (Go's semantics, which hyper's own h1 timer does not give: its header timer also
//! runs while a keep-alive connection waits for the next request):
//! - `request_headers_timeout` runs from the first byte of a request head until the request is
//!   dispatched (HTTP/1.1), so a slowloris client cannot hold a connection;
//! - `idle_timeout` runs while no request is in flight.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::http::proxy::{self, ConnCtx};
use crate::snapshot::ListenerRuntime;
use crate::worker::{LocalExec, Worker};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection is doing, shared by its IO, its requests and its watchdog. Only the
/// connection's own worker touches it; atomics (relaxed loads and stores) are there because
/// hyper requires an upgradable IO to be `Send`.
#[derive(Debug)]
pub struct ConnActivity {
    http1: bool,
    base: Instant,
    active: AtomicU32,
    /// Nanoseconds since `base`.
    idle_since: AtomicU64,
    /// Nanoseconds since `base`, plus one; 0 when no head is being read.
    head_started: AtomicU64,
}

impl ConnActivity {
    pub fn new(http1: bool) -> Self {
        ConnActivity {
            http1,
            base: Instant::now(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn at(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos)
    }

    /// A request (HTTP/1.1) or stream (HTTP/2) was dispatched.
    pub fn begin_request(&self) {
        self.active.store(self.active.load(Relaxed) + 1, Relaxed);
        self.head_started.store(0, Relaxed);
    }

    /// Its response ended (sent or abandoned).
    pub fn end_request(&self) {
        let n = self.active.load(Relaxed).saturating_sub(1);
        self.active.store(n, Relaxed);
        if n == 0 {
            self.idle_since.store(self.now(), Relaxed);
        }
    }

    fn on_read(&self) {
        if self.http1 && self.active.load(Relaxed) == 0 && self.head_started.load(Relaxed) == 0 {
            self.head_started.store(self.now() + 1, Relaxed);
        }
    }

    fn deadline(
        &self,
        idle: Option<Duration>,
        head: Option<Duration>,
    ) -> Option<(Instant, Expired)> {
        if self.active.load(Relaxed) > 0 {
            return None;
        }
        let idle = idle.map(|d| (self.at(self.idle_since.load(Relaxed)) + d, Expired::Idle));
        let head = match (self.head_started.load(Relaxed), head) {
            (0, _) | (_, None) => None,
            (start, Some(d)) => Some((self.at(start - 1) + d, Expired::Head)),
        };
        match (idle, head) {
            (Some(i), Some(h)) => Some(if h.0 < i.0 { h } else { i }),
            (i, h) => i.or(h),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Idle,
    Head,
}

/// Fires when the connection's current deadline passes. It is polled after the connection on
/// every wake-up, so it always sees the latest activity; the timer is only re-armed when the
/// deadline moves earlier (a later one is checked when the early timer fires).
struct Watchdog {
    activity: Arc<ConnActivity>,
    idle: Option<Duration>,
    head: Option<Duration>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Future for Watchdog {
    type Output = Expired;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Expired> {
        loop {
            let Some((deadline, why)) = self.activity.deadline(self.idle, self.head) else {
                // Nothing to time: any progress wakes the connection task, which polls us again.
                return Poll::Pending;
            };
            if self.armed.is_none_or(|armed| deadline < armed) {
                self.sleep.as_mut().reset(deadline.into());
                self.armed = Some(deadline);
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    if Instant::now() >= deadline {
                        return Poll::Ready(why);
                    }
                    // Fired for an earlier deadline that has since moved: re-arm.
                    self.armed = None;
                }
            }
        }
    }
}

/// The connection's socket, telling [`ConnActivity`] when bytes of a new request head arrive.
struct ConnIo {
    inner: TcpStream,
    activity: Arc<ConnActivity>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        r
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

/// Peeks at the first bytes: the HTTP/2 connection preface means prior-knowledge h2c.
async fn detect(stream: &TcpStream) -> io::Result<Proto> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(Proto::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Proto::Http2);
        }
        // A partial preface: wait for the rest (bounded by the caller's deadline).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one accepted connection until it closes, drains, or times out.
pub async fn serve(
    worker: Rc<Worker>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(listener.address);
    let opts = &listener.http;
    let head_timeout = opts.request_headers_timeout.non_zero();

    let detected = match head_timeout {
        Some(t) => tokio::time::timeout(t, detect(&stream)).await.ok(),
        None => Some(detect(&stream).await),
    };
    let proto = match detected {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed before the first request");
            return;
        }
        None => {
            tracing::debug!(%peer, "no request head within request_headers_timeout");
            return;
        }
    };

    let activity = Arc::new(ConnActivity::new(proto == Proto::Http1));
    let io = TokioIo::new(ConnIo {
        inner: stream,
        activity: activity.clone(),
    });
    let ctx = Rc::new(ConnCtx {
        worker,
        listener: listener.clone(),
        peer,
        local,
        activity: activity.clone(),
        scheme: "http",
    });
    let service = service_fn(move |req| proxy::handle(ctx.clone(), req));
    let watchdog = Watchdog {
        activity,
        idle: opts.idle_timeout.non_zero(),
        head: head_timeout,
        sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        armed: None,
    };

    match proto {
        Proto::Http1 => {
            let conn = http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .max_headers(opts.max_headers as usize)
                .max_header_size(opts.max_request_headers_kb as usize * 1024)
                .serve_connection(io, service)
                .with_upgrades();
            drive(conn, |c| c.graceful_shutdown(), watchdog, &mut stop, peer).await;
        }
        Proto::Http2 => {
            let conn = http2::Builder::new(LocalExec)
                .timer(TokioTimer::new())
                .max_concurrent_streams(opts.max_concurrent_streams)
                .max_header_list_size(opts.max_request_headers_kb.saturating_mul(1024))
                .initial_stream_window_size(opts.initial_stream_window.0 as u32)
                .initial_connection_window_size(opts.initial_connection_window.0 as u32)
                .max_pending_accept_reset_streams(Some(20))
                .max_local_error_reset_streams(Some(1024))
                .serve_connection(io, service);
            drive(conn, |c| c.graceful_shutdown(), watchdog, &mut stop, peer).await;
        }
    }
}

/// Polls the connection to its end; on a drain signal or idle deadline it shuts down gracefully
/// (HTTP/1.1: after the response in flight; HTTP/2: GOAWAY), on a head deadline it closes.
async fn drive<C, G>(
    conn: C,
    mut graceful: G,
    watchdog: Watchdog,
    stop: &mut watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), hyper::Error>>,
    G: FnMut(Pin<&mut C>),
{
    let mut conn = pin!(conn);
    let mut watchdog = pin!(watchdog);
    let mut shutting_down = *stop.borrow();
    if shutting_down {
        graceful(conn.as_mut());
    }
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
                }
                return;
            }
            why = watchdog.as_mut(), if !shutting_down => match why {
                Expired::Head => {
                    tracing::debug!(%peer, "request head not received within request_headers_timeout");
                    return;
                }
                Expired::Idle => {
                    shutting_down = true;
                    graceful(conn.as_mut());
                }
            },
            changed = stop.changed(), if !shutting_down => {
                // A dropped sender (the worker went away) means stop too.
                let _ = changed;
                shutting_down = true;
                graceful(conn.as_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_activity() {
        let a = ConnActivity::new(true);
        let idle = Some(Duration::from_secs(60));
        let head = Some(Duration::from_secs(5));
        assert_eq!(a.deadline(idle, head).map(|d| d.1), Some(Expired::Idle));
        a.on_read();
        assert_eq!(a.deadline(idle, head).map(|d| d.1), Some(Expired::Head));
        a.begin_request();
        assert_eq!(
            a.deadline(idle, head),
            None,
            "no deadline while a request is in flight"
        );
        a.end_request();
        assert_eq!(a.deadline(idle, head).map(|d| d.1), Some(Expired::Idle));
        let h2 = ConnActivity::new(false);
        h2.on_read();
        assert_eq!(h2.deadline(None, head), None, "HTTP/2 has no head deadline");
    }
}
