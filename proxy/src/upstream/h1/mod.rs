//! The HTTP/1.1 client of the hot path: one request at a time on a pooled connection, written
//! and read by the request's own task (no connection task, no channel between them), so a
//! request reaches the upstream as soon as it is routed.
//!
//! Upgrades and `CONNECT` go through hyper's client (see [`super::pool`]); everything else that
//! is sent to an HTTP/1.1 endpoint goes through here.
//!
//! Strict where it matters for a pooled connection (RFC 9112): a response head is bounded
//! ([`MAX_HEAD`], [`MAX_HEADERS`]); `Content-Length` must be one well-formed number (repeated
//! values must agree); `Transfer-Encoding` overrides it (and the connection is not reused);
//! chunk sizes are bounded hex, lines end in CRLF; a body delimited by the connection's close,
//! bytes after the response, a response before the request was fully sent, or any error mean
//! the connection is closed, never reused. A response that arrives while the request body is
//! still being sent is forwarded (the upstream refused early), and the request body keeps
//! flowing while the upstream reads it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::rc::Weak;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::UpstreamBody;
use super::pool::{ConnGuard, PoolKey, Pools};
use crate::errors::BoxError;
use crate::tls::io::{ClientIo, MaybeTls};

pub mod codec;

use codec::{
    Decoded, Framing, Head, Reading, decode_chunk, encode_head, ends_here, framing, parse_head,
    says_empty_length,
};

/// Bytes read from the socket at a time.
const READ_SIZE: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the connection closed before a complete response")]
    Closed,
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response: {0}")]
    Protocol(&'static str),
    #[error("the request body could not be read from the client: {0}")]
    RequestBody(BoxError),
    #[error("the request body does not match its content-length")]
    BodyLength,
}

impl Error {
    /// Nothing of a response arrived: the connection was closed or reset under the request.
    pub fn closed_before_response(&self) -> bool {
        match self {
            Error::Closed => true,
            Error::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// An HTTP/1.1 connection to an endpoint, idle or carrying one exchange.
pub struct Conn {
    io: ClientIo,
    /// Bytes read and not yet parsed.
    buf: BytesMut,
    /// The field names of the responses read so far.
    names: codec::Names,
    home: Home,
    _guard: ConnGuard,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Conn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

fn noop_context() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

impl Conn {
    /// A connection, on the heap once for its life (the pool and the exchanges on it move a
    /// pointer, not the connection).
    pub fn new(io: ClientIo, guard: ConnGuard, home: Home) -> Box<Conn> {
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            names: codec::Names::default(),
            home,
            _guard: guard,
        })
    }

    /// Its pool's key.
    pub fn key(&self) -> &PoolKey {
        &self.home.key
    }

    /// Most idle connections its pool keeps for its endpoint.
    pub fn max_idle(&self) -> usize {
        self.home.max_idle
    }

    /// Whether an idle connection can take a request: nothing arrived on it since its last
    /// response (no close, no stray bytes). Costs no system call unless the socket became
    /// readable.
    pub fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = noop_context();
        let tcp = match &mut self.io {
            MaybeTls::Plain(s) => &*s,
            MaybeTls::Tls(s) => {
                // Bytes already decrypted and never read are stray bytes too (they never
                // reach the socket's readiness).
                match s.get_mut().1.process_new_packets() {
                    Ok(state) if state.plaintext_bytes_to_read() == 0 => {}
                    _ => return false,
                }
                s.get_ref().0
            }
        };
        if tcp.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        // Readable: a close, stray bytes, or (TLS) a record that carries no data, such as a
        // session ticket.
        let mut scratch = [0u8; 64];
        let mut rb = ReadBuf::new(&mut scratch);
        match Pin::new(&mut self.io).poll_read(&mut cx, &mut rb) {
            Poll::Pending => true,
            Poll::Ready(Ok(())) | Poll::Ready(Err(_)) => false,
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        let spare = self.buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: `n` bytes of the spare capacity were just initialized by the read.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }
}

/// Where a finished connection goes.
pub struct Home {
    pub pools: Weak<RefCell<Pools>>,
    pub key: PoolKey,
    pub max_idle: usize,
}

/// The request on its way out: framed segments to write, then the body's frames.
struct Writer {
    out: VecDeque<Bytes>,
    body: UpstreamBody,
    framing: Framing,
    /// The body's last frame was framed (and queued).
    body_done: bool,
    flushed: bool,
    /// Some of the request reached the socket.
    wrote: bool,
}

impl Writer {
    fn finished(&self) -> bool {
        self.body_done && self.out.is_empty() && self.flushed
    }

    /// Writes what it can; `Ready(Ok)` once everything is written and flushed, `Pending` when
    /// the socket or the body has to wait.
    fn poll_write(&mut self, io: &mut ClientIo, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            while !self.out.is_empty() {
                let mut slices = [IoSlice::new(&[]); 16];
                let n = self
                    .out
                    .iter()
                    .zip(slices.iter_mut())
                    .map(|(b, s)| *s = IoSlice::new(b))
                    .count();
                let written = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))?;
                if written == 0 {
                    return Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into())));
                }
                self.advance(written);
                self.flushed = false;
                self.wrote = true;
            }
            if self.body_done {
                if !self.flushed {
                    ready!(Pin::new(&mut *io).poll_flush(cx))?;
                    self.flushed = true;
                }
                return Poll::Ready(Ok(()));
            }
            // The queue is empty: frame the body's next frame.
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.queue_data(data)?,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.queue_end(Some(&trailers))?;
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(Error::RequestBody(e))),
                None => self.queue_end(None)?,
            }
            // A body that knows it ended needs no further poll.
            if !self.body_done && self.body.is_end_stream() {
                self.queue_end(None)?;
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.out.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.out.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    fn queue_data(&mut self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            Framing::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(Error::BodyLength);
                }
                *left -= n;
                self.out.push_back(data);
            }
            Framing::Chunked => {
                self.out
                    .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                self.out.push_back(data);
                self.out.push_back(Bytes::from_static(b"\r\n"));
            }
        }
        Ok(())
    }

    fn queue_end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), Error> {
        if self.body_done {
            return Ok(());
        }
        self.body_done = true;
        match self.framing {
            Framing::Length(0) => Ok(()),
            Framing::Length(_) => Err(Error::BodyLength),
            Framing::Chunked => {
                let mut end = BytesMut::from(&b"0\r\n"[..]);
                for (name, value) in trailers.into_iter().flatten() {
                    end.extend_from_slice(name.as_str().as_bytes());
                    end.extend_from_slice(b": ");
                    end.extend_from_slice(value.as_bytes());
                    end.extend_from_slice(b"\r\n");
                }
                end.extend_from_slice(b"\r\n");
                self.out.push_back(end.freeze());
                Ok(())
            }
        }
    }
}

/// A failed exchange.
pub struct Failed {
    pub error: Error,
    /// The request back, when its body is whole (none of it was sent, or it had none).
    pub request: Option<Request<UpstreamBody>>,
    /// Some of the request reached the socket.
    pub written: bool,
}

/// Sends `req` on `conn` and reads the response head.
///
/// A named future rather than an `async fn`: it holds the exchange and the request's parts
/// once, where an `async fn` would also keep the request it was given and every value built
/// from it, and every request's future holds this one.
pub fn send(conn: Box<Conn>, req: Request<UpstreamBody>) -> Sending {
    // Built where it is returned (each arm makes the whole value), not wrapped from another
    // function's result: the future is a few hundred bytes, and each wrapping copies it.
    let (parts, body) = req.into_parts();
    let unsent = |error| {
        Sending(SendState::Failed(Failed {
            error,
            request: None,
            written: false,
        }))
    };
    let framing = match framing(&parts.headers, &body) {
        Ok(f) => f,
        Err(e) => return unsent(e),
    };
    let add_length = match framing {
        Framing::Chunked => false,
        Framing::Length(0) => {
            parts.headers.contains_key(header::CONTENT_LENGTH) || says_empty_length(&parts.method)
        }
        Framing::Length(_) => true,
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = encode_head(&parts.method, target, &parts.headers, framing, add_length);
    let body_done = body.is_end_stream();
    let mut writer = Writer {
        out: VecDeque::from([head]),
        body,
        framing,
        body_done: false,
        flushed: false,
        wrote: false,
    };
    if body_done && let Err(e) = writer.queue_end(None) {
        return unsent(e);
    }
    let method = parts.method.clone();
    Sending(SendState::Started(Started {
        exchange: Exchange {
            conn: Some(conn),
            writer: Some(writer),
            write_error: None,
            method,
        },
        parts,
        body_done,
    }))
}

/// The future of [`send`].
pub struct Sending(SendState);

enum SendState {
    Started(Started),
    /// Refused before anything was queued (the request's framing).
    Failed(Failed),
    Done,
}

/// A request whose head is queued on its connection.
struct Started {
    exchange: Exchange,
    /// The request's head, given back with its body if it must be sent again.
    parts: http::request::Parts,
    body_done: bool,
}

impl Future for Sending {
    type Output = Result<Response<Body>, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let state = &mut self.get_mut().0;
        let got = match state {
            SendState::Started(started) => Some(ready!(started.exchange.poll_head(cx))),
            _ => None,
        };
        Poll::Ready(match (std::mem::replace(state, SendState::Done), got) {
            (SendState::Started(started), Some(got)) => started.finish(got),
            (SendState::Failed(failed), _) => Err(failed),
            // Polled again after it finished.
            _ => Err(Failed {
                error: Error::Closed,
                request: None,
                written: false,
            }),
        })
    }
}

impl Started {
    /// The response for the head read, or the failure (with the request back when its body is
    /// whole).
    // The failure carries the request back (for another connection or a retry).
    #[allow(clippy::result_large_err)]
    fn finish(self, got: Result<Head, Error>) -> Result<Response<Body>, Failed> {
        let Started {
            mut exchange,
            parts,
            body_done,
        } = self;
        match got {
            Ok(head) => {
                let conn = exchange.conn.take();
                // Still sending (the upstream answered early): the rare case, kept on the heap.
                let writer = exchange
                    .writer
                    .take()
                    .filter(|w| !w.finished())
                    .map(Box::new);
                let keep_alive = head.keep_alive && exchange.write_error.is_none();
                let mut resp = Response::new(Body {
                    conn,
                    reading: head.reading,
                    writer,
                    keep_alive,
                });
                *resp.status_mut() = head.status;
                *resp.version_mut() = head.version;
                *resp.headers_mut() = head.headers;
                // A bodiless response ends here: the connection goes home at once.
                resp.body_mut().maybe_release();
                Ok(resp)
            }
            Err(error) => {
                let writer = exchange.writer.take();
                let written = writer.as_ref().is_none_or(|w| w.wrote);
                // The body is whole when none of the request was written, or when it had none.
                let request = writer
                    .filter(|_| !written || body_done)
                    .map(|w| Request::from_parts(parts, w.body));
                Err(Failed {
                    error,
                    request,
                    written,
                })
            }
        }
    }
}

struct Exchange {
    conn: Option<Box<Conn>>,
    writer: Option<Writer>,
    /// Writing failed (the upstream may have answered and closed): keep reading, never reuse;
    /// reported if no response comes.
    write_error: Option<std::io::Error>,
    method: Method,
}

impl Exchange {
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err(Error::Closed));
        };
        loop {
            if let Some(w) = self.writer.as_mut()
                && self.write_error.is_none()
                && !w.finished()
            {
                match w.poll_write(&mut conn.io, cx) {
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                    Poll::Ready(Err(Error::Io(e))) => {
                        // The upstream may have answered and closed: read what it said (the
                        // reactor may not have seen the answer arrive yet; the read below
                        // waits for it, or for the close).
                        self.write_error = Some(e);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
            }
            // Interim (1xx) responses are skipped.
            loop {
                match parse_head(&mut conn.buf, &self.method, &mut conn.names)? {
                    Some(h) if h.status.is_informational() => {
                        if h.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Poll::Ready(Err(Error::Protocol(
                                "101 to a request that asked for no upgrade",
                            )));
                        }
                    }
                    Some(h) => return Poll::Ready(Ok(h)),
                    None => break,
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(match self.write_error.take() {
                        Some(e) => Error::Io(e),
                        None => Error::Closed,
                    }));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Error::Io(self.write_error.take().unwrap_or(e)))),
            }
        }
    }
}

/// A response body read from its connection, which goes back to its pool when the body ends
/// cleanly (and the request was sent whole).
pub struct Body {
    conn: Option<Box<Conn>>,
    reading: Reading,
    /// The rest of the request, still being sent.
    writer: Option<Box<Writer>>,
    keep_alive: bool,
}

#[cfg(test)]
#[test]
fn a_response_body_is_small_enough_to_move() {
    assert!(
        std::mem::size_of::<Body>() <= 200,
        "{}",
        std::mem::size_of::<Body>()
    );
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Body")
            .field("reading", &self.reading)
            .finish()
    }
}

impl Body {
    fn maybe_release(&mut self) {
        if self.reading != Reading::Done {
            return;
        }
        let reusable = self.keep_alive
            && self.writer.as_ref().is_none_or(|w| w.finished())
            && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        let conn = self.conn.take();
        if let (true, Some(conn)) = (reusable, conn)
            && let Some(pools) = conn.home.pools.upgrade()
            && let Ok(mut pools) = pools.try_borrow_mut()
        {
            pools.put_idle(conn);
        }
    }

    /// Keeps sending the request body while the response is read; a failure there only means
    /// the connection is not reused.
    fn pump_request(&mut self, cx: &mut Context<'_>) {
        let (Some(w), Some(conn)) = (self.writer.as_mut(), self.conn.as_mut()) else {
            return;
        };
        match w.poll_write(&mut conn.io, cx) {
            Poll::Ready(Ok(())) => self.writer = None,
            Poll::Ready(Err(_)) => {
                self.writer = None;
                self.keep_alive = false;
            }
            Poll::Pending => {}
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.writer = None;
        self.reading = Reading::Done;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.writer.is_some() {
            this.pump_request(cx);
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.reading {
                Reading::Done => {
                    this.maybe_release();
                    return Poll::Ready(None);
                }
                Reading::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (conn.buf.len() as u64).min(left) as usize;
                        let data = conn.buf.split_to(n).freeze();
                        this.reading = match left - n as u64 {
                            0 => Reading::Done,
                            l => Reading::Length(l),
                        };
                        this.maybe_release();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Reading::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Reading::Chunked(state) => match decode_chunk(&mut conn.buf, state) {
                    Ok(Decoded::Need(state)) => this.reading = Reading::Chunked(state),
                    Ok(Decoded::Data(data, state)) => {
                        this.reading = Reading::Chunked(state);
                        // The plain last chunk may already be buffered: finish now, so the
                        // connection is home before the last frame is sent on.
                        if let Some(conn) = this.conn.as_mut()
                            && ends_here(&mut conn.buf, state)
                        {
                            this.reading = Reading::Done;
                            this.maybe_release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Decoded::End(trailers)) => {
                        this.reading = Reading::Done;
                        this.maybe_release();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Err(e) => return this.fail(e),
                },
            }
            // Need more bytes.
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.reading == Reading::UntilClose => {
                    this.reading = Reading::Done;
                    this.keep_alive = false;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Closed),
                Ok(_) => {}
                Err(e) => return this.fail(Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading == Reading::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Length(n) => SizeHint::with_exact(n),
            Reading::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
