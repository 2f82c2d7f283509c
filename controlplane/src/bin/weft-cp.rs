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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "weft-cp listening");
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
