//! `tcp` listeners: raw TCP to a cluster. A connection is routed by its TLS server name — read
//! from the ClientHello without terminating TLS (passthrough), or from the handshake when the
//! listener terminates TLS — or by a catch-all route; then spliced to an endpoint the cluster's
//! balancer picks, with the next endpoint tried when a connect fails.

pub mod routes;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::errors::ProxyError;
use crate::snapshot::ListenerRuntime;
use crate::splice::Ended;
use crate::tls::client::Alpn;
use crate::tls::io::{MaybeTls, ServerIo};
use crate::tls::sni::{self, Peeked};
use crate::upstream::{EndpointGuard, HashSource, Outcome, PickArgs, pool};

/// Endpoints tried for one connection before giving up.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Waits for a complete ClientHello (or proof that none is coming) without consuming it.
async fn peek_sni(stream: &TcpStream) -> io::Result<Option<String>> {
    let mut buf = vec![0u8; 1024];
    let mut seen = 0;
    loop {
        let n = crate::peek::peek_more(stream, &mut buf, seen).await?;
        match sni::parse(&buf[..n]) {
            Peeked::Hello(name) => return Ok(name),
            Peeked::NotTls => return Ok(None),
            // The peer closed before a whole hello.
            Peeked::NeedMore if n == 0 || n <= seen => return Ok(None),
            Peeked::NeedMore => {
                if n == buf.len() {
                    if buf.len() >= sni::MAX_HELLO + 1024 {
                        return Ok(None);
                    }
                    buf.resize(buf.len() * 2, 0);
                }
                // Else the rest of the hello has not arrived: wait for more (bounded by the
                // caller's timeout).
                seen = n;
            }
        }
    }
}

/// Serves one accepted connection of a `tcp` listener until both sides are done.
pub async fn serve(
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let Some(tcp) = &listener.tcp else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (down, sni): (ServerIo, Option<String>) = if let Some(server) = &listener.tls {
        let Some((tls, info)) = server.accept(stream).await else {
            return;
        };
        (MaybeTls::Tls(Box::new(tls)), info.sni)
    } else if tcp.inspect_sni {
        match tokio::time::timeout(tcp.client_hello_timeout, peek_sni(&stream)).await {
            Ok(Ok(name)) => (MaybeTls::Plain(stream), name),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection failed before its ClientHello");
                return;
            }
            Err(_) => {
                listener.stats.error("client_hello_timeout");
                return;
            }
        }
    } else {
        (MaybeTls::Plain(stream), None)
    };

    forward(&listener, down, sni, peer, stop).await;
}

/// Sends a connection whose TLS, if any, is terminated (or passed through) to the cluster of
/// the listener's route for `sni`, until both sides are done.
pub async fn forward(
    listener: &ListenerRuntime,
    down: ServerIo,
    sni: Option<String>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let Some(tcp) = &listener.tcp else {
        return;
    };
    let Some(route) = tcp.route(sni.as_deref()) else {
        tracing::debug!(%peer, sni = ?sni, "no tcp route for the connection");
        listener.stats.error(ProxyError::NoRoute.cause());
        return;
    };
    let cluster = &route.cluster;
    let hash = match cluster.hash_key {
        Some(HashSource::SourceIp) => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => crate::upstream::hash64(&ip.octets()),
            std::net::IpAddr::V6(ip) => crate::upstream::hash64(&ip.octets()),
        }),
        _ => None,
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let (up, guard, endpoint) = loop {
        let args = PickArgs {
            hash,
            exclude: &tried,
        };
        let Some(endpoint) = cluster.pick(&args) else {
            listener
                .stats
                .error(ProxyError::NoHealthyUpstream(cluster.name.clone()).cause());
            return;
        };
        let started = Instant::now();
        match pool::connect(cluster, &endpoint, Alpn::None).await {
            Ok((io, guard)) => {
                cluster.report(
                    &endpoint,
                    Outcome::Response {
                        status: 200,
                        retry_after: None,
                    },
                    started.elapsed(),
                );
                break (io, guard, endpoint);
            }
            Err(e) => {
                tracing::debug!(%peer, cluster = %cluster.name, error = %e, "tcp connect failed");
                if matches!(e, ProxyError::Overflow { .. }) {
                    listener.stats.error(e.cause());
                    return;
                }
                cluster.report(&endpoint, Outcome::ConnectFailure, started.elapsed());
                tried.push(endpoint.address);
                if tried.len() >= MAX_CONNECT_ATTEMPTS {
                    listener.stats.error(e.cause());
                    return;
                }
            }
        }
    };
    let exchange = EndpointGuard::new(endpoint);
    let ended = crate::splice::splice(
        down,
        crate::splice::Side {
            read: listener.stats.rx_bytes.clone(),
            written: listener.stats.tx_bytes.clone(),
        },
        up,
        crate::splice::Side {
            read: cluster.stats.rx_bytes.clone(),
            written: cluster.stats.tx_bytes.clone(),
        },
        tcp.idle_timeout,
        Some(stop),
    )
    .await;
    match ended {
        Ended::Done(Ok(_)) => exchange.finish(200, true),
        Ended::Done(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tcp connection ended with an error");
            exchange.finish(200, false);
        }
        Ended::Idle => {
            tracing::debug!(%peer, "tcp connection idle too long: closed");
            exchange.finish(200, true);
        }
        Ended::Drained => {
            tracing::debug!(%peer, "tcp connection closed: the proxy is draining");
            exchange.finish(200, true);
        }
    }
    drop(guard);
}
