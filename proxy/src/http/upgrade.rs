//! Upgrades and `CONNECT`: what a listener lets through (its `http.upgrades`, as Envoy's
//! `upgrade_configs`), and the tunnel an accepted one becomes.
//!
//! - `Upgrade: h2c` is never forwarded: its upgrade headers are removed and the request is
//!   served as plain HTTP/1.1 (after a forwarded `101`, the client would speak HTTP/2 straight
//!   to the backend and no later request would be routed or filtered — h2c smuggling).
//! - Any other protocol the listener does not name is refused with 403.
//! - A tunnel keeps its downstream connection counted as open (its `max_connections` slot, the
//!   active gauge), ends after the listener's `stream_idle_timeout` without a byte either way,
//!   and is closed when the proxy drains.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::conn::ConnCtx;
use crate::snapshot::ListenerRuntime;
use crate::splice::{self, Ended, Side};
use crate::tls::client::Alpn;
use crate::upstream::{Cluster, EndpointGuard, Outcome, PickArgs, pool};

/// Splices an upgraded downstream connection with `up` on the connection's worker, holding the
/// connection open until the tunnel ends.
pub(crate) fn spawn_tunnel<U>(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    down: hyper::upgrade::OnUpgrade,
    up: U,
    up_counts: Side,
    idle: Option<Duration>,
    keep: Option<Box<dyn std::any::Any>>,
) where
    U: std::future::Future + 'static,
    U::Output: TunnelIo,
{
    conn.activity.set_tunnel();
    let hold = conn.hold.clone();
    let stop = conn.stop.clone();
    let peer = conn.peer;
    let down_counts = Side {
        read: listener.stats.rx_bytes.clone(),
        written: listener.stats.tx_bytes.clone(),
    };
    tokio::task::spawn_local(async move {
        let (down, up) = tokio::join!(down, up);
        let (down, up) = match (down, up.into_io()) {
            (Ok(d), Ok(u)) => (d, u),
            (Err(e), _) => {
                tracing::debug!(%peer, error = %e, "the client's side of an upgrade did not complete");
                return;
            }
            (_, Err(e)) => {
                tracing::debug!(%peer, error = %e, "the upstream's side of an upgrade did not complete");
                return;
            }
        };
        let down: TokioIo<Upgraded> = TokioIo::new(down);
        match splice::splice(down, down_counts, up, up_counts, idle, Some(stop)).await {
            Ended::Done(Err(e)) => {
                tracing::debug!(%peer, error = %e, "tunnel ended with an error");
            }
            Ended::Idle => tracing::debug!(%peer, "tunnel idle too long: closed"),
            Ended::Drained => tracing::debug!(%peer, "tunnel closed: the proxy is draining"),
            Ended::Done(Ok(_)) => {}
        }
        drop(keep);
        drop(hold);
    });
}

/// Endpoints tried for one `CONNECT` before giving up.
const CONNECT_ATTEMPTS: usize = 3;

/// Answers a `CONNECT` the route sends to `cluster`: a connection to one of its endpoints
/// (the next one tried when a connect fails), `200`, then the client's bytes spliced to it
/// (as Envoy terminates `CONNECT`: the tunnel reaches the cluster, never an address the
/// client names).
pub(crate) async fn connect(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    cluster: &Arc<Cluster>,
    mut parts: Parts,
) -> Result<(http::Response<ResponseBody>, EndpointGuard), ProxyError> {
    let Some(down) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(ProxyError::UpgradeNotSupported(
            "the connection cannot be tunneled",
        ));
    };
    let mut tried = Vec::new();
    let (io, pooled, endpoint) = loop {
        let endpoint = cluster
            .pick(&PickArgs {
                hash: None,
                exclude: &tried,
            })
            .ok_or_else(|| ProxyError::NoHealthyUpstream(cluster.name.clone()))?;
        let started = Instant::now();
        match pool::connect(cluster, &endpoint, Alpn::None).await {
            Ok((io, pooled)) => break (io, pooled, endpoint),
            Err(e @ ProxyError::Overflow { .. }) => return Err(e),
            Err(e) => {
                cluster.report(&endpoint, Outcome::ConnectFailure, started.elapsed());
                tried.push(endpoint.address);
                if tried.len() >= CONNECT_ATTEMPTS {
                    return Err(e);
                }
            }
        }
    };
    spawn_tunnel(
        conn,
        listener,
        down,
        std::future::ready(Ok::<_, std::convert::Infallible>(io)),
        Side {
            read: cluster.stats.rx_bytes.clone(),
            written: cluster.stats.tx_bytes.clone(),
        },
        listener.http.stream_idle_timeout.non_zero(),
        Some(Box::new(pooled)),
    );
    Ok((
        http::Response::new(ResponseBody::empty()),
        EndpointGuard::new(endpoint),
    ))
}

/// What the upstream side of a tunnel resolves to.
pub(crate) trait TunnelIo {
    type Io: AsyncRead + AsyncWrite + Unpin + 'static;
    fn into_io(self) -> Result<Self::Io, Box<dyn std::error::Error>>;
}

impl TunnelIo for Result<Upgraded, hyper::Error> {
    type Io = TokioIo<Upgraded>;
    fn into_io(self) -> Result<Self::Io, Box<dyn std::error::Error>> {
        self.map(TokioIo::new).map_err(Into::into)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> TunnelIo for Result<T, std::convert::Infallible> {
    type Io = T;
    fn into_io(self) -> Result<T, Box<dyn std::error::Error>> {
        self.map_err(|e| match e {})
    }
}
