//! `weft-cp`: the control plane. Serves proxies (`Distribution`) and weftctl (`Control`) on one
//! gRPC port; state in one file (`--store`), modules next to it.
//!
//! ```sh
//! WEFT_CP_TOKEN=secret weft-cp --listen 127.0.0.1:18000 --store weft-cp.json
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use weft_controlplane::server::{ControlPlane, ControlService, DistributionService};
use weft_controlplane::store::Store;
use weft_wire::v1::{control_server::ControlServer, distribution_server::DistributionServer};

#[derive(Parser)]
#[command(name = "weft-cp", version, about = "Weft's control plane")]
struct Cli {
    /// Address to serve gRPC on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// The store file (created if missing); `memory` keeps state in memory only.
    #[arg(long, default_value = "weft-cp.json")]
    store: String,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

/// How long open streams get after SIGTERM or SIGINT.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    // The same logger as weft's: a bounded queue, its own writer thread, drops counted. A
    // pushed module's start-up runs here (validation) and may log.
    let logs = weft_proxy::logging::init("info");
    let cli = Cli::parse();
    let token = std::env::var("WEFT_CP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if token.is_none() {
        tracing::warn!("WEFT_CP_TOKEN is not set: the control plane accepts every caller");
    }
    let path = (cli.store != "memory").then(|| PathBuf::from(&cli.store));
    let store = Store::open(path.as_deref())?;
    let cp = ControlPlane::new(store, token).map_err(|e| anyhow::anyhow!(e))?;
    cp.metrics.export_log_drops(logs.dropped());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "weft-cp listening");
        if let Some(m) = cli.metrics {
            let l = tokio::net::TcpListener::bind(m).await?;
            tracing::info!(addr = %l.local_addr()?, "metrics listening");
            tokio::spawn(serve_metrics(l, cp.clone()));
        }
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let max = weft_wire::MAX_MESSAGE;
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        let server = tonic::transport::Server::builder()
            .add_service(
                DistributionServer::new(DistributionService(cp.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                ControlServer::new(ControlService(cp))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                stop_signal().await;
                tracing::info!(
                    "draining: no new streams; proxies move to another replica or reconnect"
                );
                let _ = stopping_tx.send(true);
            });
        // Proxies' subscriptions never end by themselves: past the grace period they are
        // closed (proxies keep serving their configuration and reconnect).
        let grace = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_GRACE).await;
        };
        tokio::select! {
            r = server => r?,
            () = grace => tracing::info!("grace period over: closing the streams still open"),
        }
        tracing::info!("weft-cp stopped");
        anyhow::Ok(())
    })
}

/// Metrics connections served at once; more are closed at once.
const METRICS_CONNECTIONS: usize = 64;

/// `GET /metrics` answers the metrics, anything else 404 — with hyper, at most
/// [`METRICS_CONNECTIONS`] at once, each with a head deadline and a bounded life; a failing
/// accept (out of descriptors) backs off instead of spinning.
async fn serve_metrics(l: tokio::net::TcpListener, cp: std::sync::Arc<ControlPlane>) {
    use std::time::Duration;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let stream = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let cp = cp.clone();
                async move {
                    let (status, body, kind) =
                        if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                            (
                                http::StatusCode::OK,
                                cp.metrics.encode(),
                                "text/plain; version=0.0.4; charset=utf-8",
                            )
                        } else {
                            (
                                http::StatusCode::NOT_FOUND,
                                "not found; try GET /metrics\n".to_owned(),
                                "text/plain; charset=utf-8",
                            )
                        };
                    let mut resp =
                        http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(kind),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(slot);
        });
    }
}

/// SIGTERM or SIGINT: time to drain.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
