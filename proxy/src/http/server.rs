//! One downstream connection: detect HTTP/1.1 or prior-knowledge HTTP/2, serve it with hyper,
//! enforce the connection's deadlines, and drain it when asked.
//!
//! Deadlines (Go's semantics, which hyper's own h1 timer does not give: its header timer also
//! runs while a keep-alive connection waits for the next request):
//! - `request_headers_timeout` runs from the first byte of a request head until the request is
//!   dispatched (HTTP/1.1), so a slowloris client cannot hold a connection;
//! - `idle_timeout` runs while no request is in flight.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::http::conn::{ConnActivity, ConnCtx};
use crate::http::request;
use crate::local::LocalExec;
use crate::published::Worker;
use crate::snapshot::ListenerRuntime;
use crate::tls::io::{MaybeTls, ServerIo};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Downstream connection ids (the `connection.id` property of filters).
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Follows the frames an HTTP/2 client sends (their 9-byte headers only) to see when the
/// preface (the magic, then a SETTINGS frame) is complete and when a header block is open, so
/// `request_headers_timeout` bounds both: a client cannot hold a connection — and, while a
/// header block is open, every stream on it — by sending half of either and stopping.
#[derive(Debug)]
struct H2Frames {
    magic_left: usize,
    header: [u8; 9],
    have: usize,
    skip: usize,
    settings_seen: bool,
    block_open: bool,
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PUSH_PROMISE: u8 = 0x5;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;

impl H2Frames {
    fn new() -> Self {
        H2Frames {
            magic_left: H2_PREFACE.len(),
            header: [0; 9],
            have: 0,
            skip: 0,
            settings_seen: false,
            block_open: false,
        }
    }

    fn head_pending(&self) -> bool {
        !self.settings_seen || self.block_open
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.magic_left > 0 {
                let n = self.magic_left.min(bytes.len());
                self.magic_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                return;
            }
            self.have = 0;
            let h = self.header;
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            match kind {
                FRAME_SETTINGS => self.settings_seen = true,
                FRAME_HEADERS | FRAME_PUSH_PROMISE => {
                    self.block_open = flags & FLAG_END_HEADERS == 0;
                }
                FRAME_CONTINUATION if flags & FLAG_END_HEADERS != 0 => self.block_open = false,
                _ => {}
            }
            self.skip = len;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Idle,
    Head,
}

/// Idle is judged by this many consecutive checks, `idle_timeout / IDLE_CHECKS` apart, that
/// each found nothing in flight and nothing begun since the last: a connection closes after
/// between 1 and 1.25 × `idle_timeout` of idleness.
const IDLE_CHECKS: u32 = 4;

/// Fires when the connection has been idle too long, or a request head is late. It is polled
/// after the connection on every wake-up of the connection's task, so it sees the latest
/// activity without being told.
struct Watchdog {
    activity: Arc<ConnActivity>,
    head: Option<Duration>,
    check_every: Option<Duration>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    next_check: Option<Instant>,
    idle_checks: u32,
    last_started: u64,
    head_since: Option<Instant>,
}

impl Watchdog {
    fn new(activity: Arc<ConnActivity>, idle: Option<Duration>, head: Option<Duration>) -> Self {
        let check_every = idle.map(|d| (d / IDLE_CHECKS).max(Duration::from_millis(1)));
        let now = Instant::now();
        Watchdog {
            activity,
            head,
            check_every,
            sleep: Box::pin(tokio::time::sleep_until(now + Duration::from_secs(3600))),
            armed: None,
            next_check: check_every.map(|d| now + d),
            idle_checks: 0,
            last_started: 0,
            head_since: None,
        }
    }
}

impl Future for Watchdog {
    type Output = Expired;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Expired> {
        let this = &mut *self;
        loop {
            // A head still incomplete after the connection's poll: time it from now on.
            if this.head.is_some() && this.activity.head_pending() {
                if this.head_since.is_none() {
                    this.head_since = Some(Instant::now());
                }
            } else {
                this.head_since = None;
            }
            let head_deadline = this.head_since.zip(this.head).map(|(s, d)| s + d);
            let deadline = match (head_deadline, this.next_check) {
                (Some(h), Some(c)) => h.min(c),
                (h, c) => match h.or(c) {
                    Some(d) => d,
                    // Nothing to time: any progress wakes the task, which polls us again.
                    None => return Poll::Pending,
                },
            };
            if this.armed != Some(deadline) {
                this.sleep.as_mut().reset(deadline);
                this.armed = Some(deadline);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if head_deadline.is_some_and(|h| now >= h) {
                return Poll::Ready(Expired::Head);
            }
            if let (Some(check), Some(every)) = (this.next_check, this.check_every)
                && now >= check
            {
                let started = this.activity.started.load(Relaxed);
                if this.activity.idle() && started == this.last_started {
                    this.idle_checks += 1;
                    if this.idle_checks >= IDLE_CHECKS {
                        return Poll::Ready(Expired::Idle);
                    }
                } else {
                    this.idle_checks = 0;
                    this.last_started = started;
                }
                this.next_check = Some(now + every);
            }
        }
    }
}

/// How long an HTTP/1.1 connection weft closes goes on reading (and discarding) what the
/// client still sends, after the last response and its FIN: see [`ConnIo::poll_shutdown`].
const LINGER: Duration = Duration::from_secs(3);

/// Reads per poll while lingering, so that a client sending fast cannot hold the worker.
const LINGER_READS: usize = 16;

/// The connection's socket, telling [`ConnActivity`] when bytes of a new request head arrive
/// (HTTP/1.1), or how far the preface and header blocks are (HTTP/2).
struct ConnIo {
    inner: ServerIo,
    activity: Arc<ConnActivity>,
    h2: Option<H2Frames>,
    /// The client closed its side (a read saw the end, or failed).
    read_closed: bool,
    /// While an HTTP/1.1 connection lingers: when it stops.
    linger: Option<Pin<Box<Sleep>>>,
}

impl ConnIo {
    fn new(inner: ServerIo, activity: Arc<ConnActivity>, h2: Option<H2Frames>) -> Self {
        ConnIo {
            inner,
            activity,
            h2,
            read_closed: false,
            linger: None,
        }
    }
}

/// Reads and drops what the client sends until it closes, until `until` fires, or for
/// [`LINGER_READS`] reads (then asks to be polled again).
fn poll_linger(
    io: &mut ServerIo,
    until: &mut Pin<Box<Sleep>>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let mut scratch = [0u8; 8192];
    let mut waiting = false;
    for _ in 0..LINGER_READS {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
            // The client closed (or reset) its side: nothing it sent is lost any more.
            Poll::Ready(_) => return Poll::Ready(Ok(())),
            Poll::Pending => {
                waiting = true;
                break;
            }
        }
    }
    if until.as_mut().poll(cx).is_ready() {
        return Poll::Ready(Ok(()));
    }
    if !waiting {
        cx.waker().wake_by_ref();
    }
    Poll::Pending
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            match &mut this.h2 {
                None => this.activity.on_read(),
                Some(frames) => {
                    frames.feed(&buf.filled()[before..]);
                    this.activity.set_h2_head_pending(frames.head_pending());
                }
            }
        } else if room && matches!(r, Poll::Ready(_)) {
            this.read_closed = true;
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
    /// HTTP/1.1 closes with a lingering close, as nginx's and Envoy's do: when weft ends a
    /// connection the client has not closed — an answer given before the request body was
    /// read, `Connection: close`, a drain — the client may still be sending. Closing the socket
    /// with its bytes unread would reset the connection, and a reset throws away what the
    /// client has received but not yet read: the answer itself. So weft sends its FIN after the
    /// answer, then reads and drops what still comes, until the client closes or [`LINGER`]
    /// has passed.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.h2.is_some() || this.read_closed || this.activity.tunnel() {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        let until = match &mut this.linger {
            Some(until) => until,
            None => {
                ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                this.linger.insert(Box::pin(tokio::time::sleep(LINGER)))
            }
        };
        poll_linger(&mut this.inner, until, cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// Peeks at the first bytes: the HTTP/2 connection preface means prior-knowledge h2c. A
/// partial preface waits for more bytes (bounded by the caller's deadline).
async fn detect(stream: &TcpStream) -> io::Result<Proto> {
    let mut buf = [0u8; 24];
    let mut seen = 0;
    loop {
        let n = crate::peek::peek_more(stream, &mut buf, seen).await?;
        if n == 0 || n <= seen || buf[..n] != H2_PREFACE[..n] {
            return Ok(Proto::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Proto::Http2);
        }
        seen = n;
    }
}

/// Serves one accepted connection until it closes, drains, or times out.
pub async fn serve(
    worker: Rc<Worker>,
    listener: Arc<ListenerRuntime>,
    hold: Rc<dyn std::any::Any>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(listener.address);
    let opts = &listener.http;
    let head_timeout = opts.request_headers_timeout.non_zero();

    let (proto, io, tls) = if let Some(server) = &listener.tls {
        // ALPN says which protocol; a client that offers none speaks HTTP/1.1.
        let Some((tls, info)) = server.accept(stream).await else {
            return;
        };
        let proto = match info.alpn.as_deref() {
            Some("h2") => Proto::Http2,
            _ => Proto::Http1,
        };
        (proto, MaybeTls::Tls(Box::new(tls)), Some(Arc::new(info)))
    } else {
        let detected = match head_timeout {
            Some(t) => tokio::time::timeout(t, detect(&stream)).await.ok(),
            None => Some(detect(&stream).await),
        };
        match detected {
            Some(Ok(p)) => (p, MaybeTls::Plain(stream), None),
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection failed before the first request");
                return;
            }
            None => {
                tracing::debug!(%peer, "no request head within request_headers_timeout");
                return;
            }
        }
    };

    serve_accepted(
        Accepted {
            worker,
            listener,
            hold,
            io,
            proto,
            tls,
            peer,
            local,
        },
        stop,
    )
    .await;
}

/// A connection whose TLS, if any, is terminated and whose protocol is known (a sidecar's
/// capture listener detects both before it knows which listener serves the connection).
pub struct Accepted {
    pub worker: Rc<Worker>,
    pub listener: Arc<ListenerRuntime>,
    /// Keeps the connection counted while it is served.
    pub hold: Rc<dyn std::any::Any>,
    pub io: crate::tls::io::ServerIo,
    pub proto: Proto,
    pub tls: Option<Arc<crate::tls::TlsInfo>>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Serves an accepted connection until it closes, drains, or times out.
pub async fn serve_accepted(a: Accepted, mut stop: watch::Receiver<bool>) {
    let Accepted {
        worker,
        listener,
        hold,
        io,
        proto,
        tls,
        peer,
        local,
    } = a;
    let opts = &listener.http;
    let head_timeout = opts.request_headers_timeout.non_zero();
    let activity = Arc::new(ConnActivity::new(proto == Proto::Http1));
    let h2 = (proto == Proto::Http2).then(H2Frames::new);
    if h2.is_some() {
        // The preface is due first.
        activity.set_h2_head_pending(true);
    }
    let io = TokioIo::new(ConnIo::new(io, activity.clone(), h2));
    let ctx = Rc::new(ConnCtx {
        worker,
        listener: listener.clone(),
        peer,
        peer_header: crate::http::headers::client_address(peer.ip()),
        local,
        activity: activity.clone(),
        scheme: if tls.is_some() { "https" } else { "http" },
        client_cert: tls
            .as_ref()
            .and_then(|t| t.peer.as_ref())
            .and_then(crate::http::headers::client_cert_value),
        tls,
        id: NEXT_CONNECTION.fetch_add(1, Relaxed),
        hold,
        stop: stop.clone(),
    });
    let watchdog = Watchdog::new(activity, opts.idle_timeout.non_zero(), head_timeout);

    match proto {
        Proto::Http1 => {
            let conn = http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .max_headers(opts.max_headers as usize)
                .max_header_size(opts.max_request_headers_kb as usize * 1024)
                .serve_connection(io, service_fn(move |req| request::handle(ctx.clone(), req)))
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
                // Each stream's future is a task of its own, moved several times on its way
                // into the task: on the heap, it moves as a pointer.
                .serve_connection(
                    io,
                    service_fn(move |req| Box::pin(request::handle(ctx.clone(), req))),
                );
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
    // The drain signal is waited for by one `changed()` for the connection's life. Its first
    // poll registers the connection's task with the channel, and that lasts: later wake-ups
    // (the connection's own, several per request) only compare the channel's version, instead
    // of taking the channel's lock to look at the registration again. Out of tokio's budget:
    // a first poll turned away by it would register nothing.
    let probe = stop.clone();
    let mut changed = pin!(tokio::task::unconstrained(stop.changed()));
    let mut registered = false;
    let mut drained = poll_fn(|cx| {
        if registered && matches!(probe.has_changed(), Ok(false)) {
            return Poll::Pending;
        }
        registered = true;
        changed.as_mut().poll(cx)
    });
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
            changed = &mut drained, if !shutting_down => {
                // A dropped sender (the worker went away) means stop too.
                let _ = changed;
                shutting_down = true;
                graceful(conn.as_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests;
