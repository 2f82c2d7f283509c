//! Serving a captured connection: its original destination says what it is for, its first
//! bytes (unless the port declares a protocol) how it is served.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::detect::{Detected, detect};
use super::{ALPN_MESH, ALPN_TCP, Capture, Destination, InboundPort, SidecarRuntime};
use crate::config::{AppProtocol, Egress, InboundMode};
use crate::http::server::{self, Proto};
use crate::published::Worker;
use crate::snapshot::ListenerRuntime;
use crate::tls::io::MaybeTls;

/// Time a passed-through connection gets to connect to its original destination.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A passed-through connection that moves no byte for this long is closed.
const PASSTHROUGH_IDLE: Duration = Duration::from_secs(3600);

/// What a captured connection was for.
pub struct Captured {
    pub worker: Rc<Worker>,
    /// The capture listener that accepted it.
    pub listener: Arc<ListenerRuntime>,
    pub sidecar: Arc<SidecarRuntime>,
    /// Keeps the connection counted (listener, worker drain) while it is served.
    pub hold: Rc<dyn std::any::Any>,
    pub peer: SocketAddr,
    pub stop: watch::Receiver<bool>,
}

/// The address as IPv4 when it is an IPv4-mapped IPv6 address (a dual-stack socket's view).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

pub async fn serve(c: Captured, capture: Capture, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let stats = c.sidecar.stats.clone();
    let direction = match capture {
        Capture::Outbound => "outbound",
        Capture::Inbound => "inbound",
    };
    let local = match stream.local_addr() {
        Ok(l) => canonical(l),
        Err(_) => return,
    };
    let dst = match super::original_dst::original_dst(&stream, local.is_ipv6()) {
        Ok(d) => canonical(d),
        Err(e) => {
            tracing::debug!(peer = %c.peer, error = %e, "captured connection without an original destination");
            stats.connection(direction, "no_original_destination");
            return;
        }
    };
    // Not redirected (a client that connected to the capture port itself): serving it would
    // connect to the capture port again, and again.
    if dst == local
        || dst.port() == c.sidecar.capture_ports.0
        || dst.port() == c.sidecar.capture_ports.1
    {
        tracing::debug!(peer = %c.peer, %dst, "connection to a capture port itself: refused");
        stats.connection(direction, "loop");
        return;
    }
    match capture {
        Capture::Outbound => outbound(c, stream, dst).await,
        Capture::Inbound => inbound(c, stream, dst).await,
    }
}

async fn outbound(c: Captured, stream: TcpStream, dst: SocketAddr) {
    let stats = c.sidecar.stats.clone();
    let Some(dest) = c.sidecar.outbound.get(&dst).cloned() else {
        match c.sidecar.egress {
            Egress::RegistryOnly => {
                tracing::debug!(peer = %c.peer, %dst, "unknown destination refused (registry_only)");
                stats.connection("outbound", "refused_unknown");
            }
            Egress::AllowAny => {
                stats.connection("outbound", "passthrough");
                passthrough(&c, stream, dst).await;
            }
        }
        return;
    };
    stats.connection("outbound", "service");
    let detected = match dest.protocol {
        AppProtocol::Tcp => Detected::Tcp,
        AppProtocol::Http2 | AppProtocol::Grpc | AppProtocol::Http => {
            // Declared: hyper's own preface check tells HTTP/1 from HTTP/2.
            return serve_http(&c, &dest.http, stream).await;
        }
        AppProtocol::Auto => detect_within(&c.sidecar, &stream).await,
    };
    match detected {
        Detected::Http1 => serve_plain(&c, &dest.http, stream, Proto::Http1).await,
        Detected::Http2 => serve_plain(&c, &dest.http, stream, Proto::Http2).await,
        // The application's own TLS (passed through inside mesh mTLS), a server-first
        // protocol, or bytes of any other kind.
        Detected::Tls { .. } | Detected::Tcp => serve_tcp(&c, &dest, stream).await,
    }
}

/// Detects with the sidecar's timeout; a client that says nothing by then is TCP.
async fn detect_within(sidecar: &SidecarRuntime, stream: &TcpStream) -> Detected {
    match tokio::time::timeout(sidecar.detection_timeout, detect(stream)).await {
        Ok(Ok(d)) => d,
        Ok(Err(_)) | Err(_) => Detected::Tcp,
    }
}

async fn serve_http(c: &Captured, runtime: &Arc<ListenerRuntime>, stream: TcpStream) {
    server::serve(
        c.worker.clone(),
        runtime.clone(),
        c.hold.clone(),
        stream,
        c.peer,
        c.stop.clone(),
    )
    .await;
}

async fn serve_plain(
    c: &Captured,
    runtime: &Arc<ListenerRuntime>,
    stream: TcpStream,
    proto: Proto,
) {
    let local = stream.local_addr().unwrap_or(runtime.address);
    server::serve_accepted(
        server::Accepted {
            worker: c.worker.clone(),
            listener: runtime.clone(),
            hold: c.hold.clone(),
            io: MaybeTls::Plain(stream),
            proto,
            tls: None,
            peer: c.peer,
            local,
        },
        c.stop.clone(),
    )
    .await;
}

async fn serve_tcp(c: &Captured, dest: &Destination, stream: TcpStream) {
    crate::tcp::forward(
        &dest.tcp,
        MaybeTls::Plain(stream),
        None,
        c.peer,
        c.stop.clone(),
    )
    .await;
}

/// Connects to where the connection was going (the sidecar's own connections are not
/// captured: `weft init` exempts its uid) and splices the two.
async fn passthrough(c: &Captured, stream: TcpStream, dst: SocketAddr) {
    let up = match tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, TcpStream::connect(dst)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %c.peer, %dst, error = %e, "passthrough connect failed");
            c.sidecar.stats.connection("outbound", "passthrough_failed");
            return;
        }
        Err(_) => {
            c.sidecar.stats.connection("outbound", "passthrough_failed");
            return;
        }
    };
    let _ = up.set_nodelay(true);
    let stats = &c.sidecar.stats;
    let _ = crate::splice::splice(
        stream,
        crate::splice::Side {
            read: c.listener.stats.rx_bytes.clone(),
            written: c.listener.stats.tx_bytes.clone(),
        },
        up,
        crate::splice::Side {
            read: stats.passthrough_rx.clone(),
            written: stats.passthrough_tx.clone(),
        },
        Some(PASSTHROUGH_IDLE),
        Some(c.stop.clone()),
    )
    .await;
}

async fn inbound(c: Captured, stream: TcpStream, dst: SocketAddr) {
    let stats = c.sidecar.stats.clone();
    let Some(port) = c.sidecar.inbound.get(&dst.port()).cloned() else {
        tracing::debug!(peer = %c.peer, %dst, "inbound connection to a port the workload does not declare");
        stats.connection("inbound", "unknown_port");
        return;
    };
    let strict = c.sidecar.mode == InboundMode::Strict;
    let detected = detect_within(&c.sidecar, &stream).await;
    match detected {
        Detected::Tls { alpn } if is_mesh(&alpn) => mesh(&c, &port, stream).await,
        _ if strict => {
            tracing::debug!(peer = %c.peer, %dst, "plaintext refused (mode strict)");
            stats.connection("inbound", "refused_plaintext");
        }
        Detected::Http1 if port.protocol != AppProtocol::Tcp => {
            stats.connection("inbound", "plaintext");
            serve_plain(&c, &port.http, stream, Proto::Http1).await;
        }
        Detected::Http2 if port.protocol != AppProtocol::Tcp => {
            stats.connection("inbound", "plaintext");
            serve_plain(&c, &port.http, stream, Proto::Http2).await;
        }
        _ => {
            stats.connection("inbound", "plaintext");
            crate::tcp::forward(
                &port.tcp,
                MaybeTls::Plain(stream),
                None,
                c.peer,
                c.stop.clone(),
            )
            .await;
        }
    }
}

/// A mesh peer's ClientHello: weft sidecars offer `weft-tcp` or add `weft-mesh`.
fn is_mesh(alpn: &[Vec<u8>]) -> bool {
    alpn.iter().any(|p| p == ALPN_TCP || p == ALPN_MESH)
}

/// Terminates mesh mTLS, then serves HTTP or TCP as the peer's ALPN says.
async fn mesh(c: &Captured, port: &InboundPort, stream: TcpStream) {
    let Some(tls) = &port.tls else {
        c.sidecar
            .stats
            .connection("inbound", "refused_mesh_without_identity");
        return;
    };
    let Some((io, info)) = tls.accept(stream).await else {
        c.sidecar
            .stats
            .connection("inbound", "mesh_handshake_failed");
        return;
    };
    c.sidecar.stats.connection("inbound", "mesh");
    let local = io.get_ref().0.local_addr().unwrap_or(port.http.address);
    let tcp = info.alpn.as_deref() == Some("weft-tcp") || port.protocol == AppProtocol::Tcp;
    if tcp {
        crate::tcp::forward(
            &port.tcp,
            MaybeTls::Tls(Box::new(io)),
            info.sni.clone(),
            c.peer,
            c.stop.clone(),
        )
        .await;
        return;
    }
    let proto = match info.alpn.as_deref() {
        Some("h2") => Proto::Http2,
        _ => Proto::Http1,
    };
    server::serve_accepted(
        server::Accepted {
            worker: c.worker.clone(),
            listener: port.http.clone(),
            hold: c.hold.clone(),
            io: MaybeTls::Tls(Box::new(io)),
            proto,
            tls: Some(Arc::new(info)),
            peer: c.peer,
            local,
        },
        c.stop.clone(),
    )
    .await;
}
