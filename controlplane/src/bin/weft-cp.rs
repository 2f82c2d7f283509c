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
        tonic::transport::Server::builder()
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
            .serve_with_incoming_shutdown(incoming, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}

/// A minimal HTTP/1.1 endpoint: `GET /metrics` answers the metrics, anything else 404.
async fn serve_metrics(l: tokio::net::TcpListener, cp: std::sync::Arc<ControlPlane>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            // Read the whole request head (unread bytes at close would reset the connection).
            let mut buf = Vec::with_capacity(1024);
            let read = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
            let head = String::from_utf8_lossy(&buf);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", cp.metrics.encode())
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
