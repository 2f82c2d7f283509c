//! One downstream connection as its requests see it: who and where the client is, what TLS
//! settled, the worker it runs on, and what the connection is doing (for its deadlines).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use http::header::HeaderValue;

use crate::published::Worker;
use crate::snapshot::ListenerRuntime;

/// What every request on one downstream connection shares.
pub struct ConnCtx {
    pub worker: Rc<Worker>,
    /// The listener as it was when the connection was accepted; requests use the current
    /// snapshot's listener of the same name, and this one only if it was removed since.
    pub listener: Arc<ListenerRuntime>,
    pub peer: SocketAddr,
    /// `peer`'s IP as a header value, for `x-forwarded-for`.
    pub peer_header: HeaderValue,
    pub local: SocketAddr,
    pub activity: Arc<ConnActivity>,
    pub scheme: &'static str,
    /// Unique in the process (the `connection.id` property).
    pub id: u64,
    /// What the TLS handshake settled (TLS listeners).
    pub tls: Option<Arc<crate::tls::TlsInfo>>,
    /// `x-forwarded-client-cert` for the client's verified certificate (mTLS).
    pub client_cert: Option<HeaderValue>,
    /// Keeps the connection counted as open (its `max_connections` slot, the active gauge,
    /// the worker's drain): a tunnel the connection becomes holds a clone.
    pub hold: Rc<dyn std::any::Any>,
    /// Turns true when the proxy drains (tunnels close then).
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// What a connection is doing, shared by its IO, its requests and its watchdog. Only the
/// connection's own worker touches it; atomics (relaxed loads and stores, no read-modify-write)
/// are there because hyper requires an upgradable IO to be `Send`. Nothing here reads a clock:
/// the watchdog does, and only when a deadline is near.
#[derive(Debug)]
pub struct ConnActivity {
    http1: bool,
    /// Requests (HTTP/1.1) or streams (HTTP/2) in flight.
    active: AtomicU32,
    /// Requests begun so far.
    pub(crate) started: AtomicU64,
    /// HTTP/1.1: bytes of a request head arrived while nothing was in flight.
    head_pending: AtomicBool,
    /// HTTP/1.1: the connection became a tunnel (an upgrade or `CONNECT`), whose shutdowns
    /// are half-closes with the other direction still open.
    tunnel: AtomicBool,
}

impl ConnActivity {
    pub fn new(http1: bool) -> Self {
        ConnActivity {
            http1,
            active: AtomicU32::new(0),
            started: AtomicU64::new(0),
            head_pending: AtomicBool::new(false),
            tunnel: AtomicBool::new(false),
        }
    }

    /// The connection is handed to a tunnel once its response is sent.
    pub(crate) fn set_tunnel(&self) {
        self.tunnel.store(true, Relaxed);
    }

    pub(crate) fn tunnel(&self) -> bool {
        self.tunnel.load(Relaxed)
    }

    /// A request (HTTP/1.1) or stream (HTTP/2) was dispatched.
    pub fn begin_request(&self) {
        self.active.store(self.active.load(Relaxed) + 1, Relaxed);
        self.started.store(self.started.load(Relaxed) + 1, Relaxed);
        self.head_pending.store(false, Relaxed);
    }

    /// Its response ended (sent or abandoned).
    pub fn end_request(&self) {
        self.active
            .store(self.active.load(Relaxed).saturating_sub(1), Relaxed);
    }

    pub(crate) fn on_read(&self) {
        if self.http1 && self.active.load(Relaxed) == 0 && !self.head_pending.load(Relaxed) {
            self.head_pending.store(true, Relaxed);
        }
    }

    /// HTTP/2: whether the connection preface is still incomplete or a header block is open
    /// (a HEADERS frame without END_HEADERS, its CONTINUATIONs still to come).
    pub(crate) fn set_h2_head_pending(&self, pending: bool) {
        self.head_pending.store(pending, Relaxed);
    }

    pub(crate) fn idle(&self) -> bool {
        self.active.load(Relaxed) == 0
    }

    pub(crate) fn head_pending(&self) -> bool {
        if self.http1 {
            self.head_pending.load(Relaxed) && self.idle()
        } else {
            self.head_pending.load(Relaxed)
        }
    }
}
