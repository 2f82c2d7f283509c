//! `weftctl`: the control plane's CLI. The server is `--server` (or `WEFT_CP`), the token
//! `WEFT_CP_TOKEN`.
//!
//! ```sh
//! weftctl apply -f mesh.yaml                 # waits until every proxy ACKed or NACKed
//! weftctl filter push quota --module quota.wasm --config '{"limits": []}' --select app=web
//! weftctl status
//! weftctl history && weftctl rollback 3
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weft_wire::v1::{self, control_client::ControlClient};

#[derive(Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Drive weft-cp: apply, push filters, watch proxies"
)]
struct Cli {
    #[arg(
        long,
        env = "WEFT_CP",
        default_value = "http://127.0.0.1:18000",
        global = true
    )]
    server: String,
    /// How long a change may take to reach every proxy.
    #[arg(long, default_value = "30s", global = true, value_parser = humantime::parse_duration)]
    wait: Duration,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or replace the resources of a YAML file (documents separated by `---`).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print resources as YAML.
    Get {
        kind: Option<String>,
        name: Option<String>,
    },
    /// Remove a resource.
    Delete { kind: String, name: String },
    /// Upload a Wasm module and apply a filter that runs it.
    Filter {
        #[command(subcommand)]
        command: FilterCmd,
    },
    /// Every proxy: connected, labels, applied version, last NACK.
    Status,
    /// The versions kept, newest last.
    History,
    /// Make a past version's state current again (as a new version).
    Rollback { version: u64 },
}

#[derive(Subcommand)]
enum FilterCmd {
    Push {
        name: String,
        #[arg(long)]
        module: PathBuf,
        /// The filter's configuration (JSON or YAML text).
        #[arg(long)]
        config: Option<String>,
        /// Labels of the proxies it is for (`app=web`; repeatable).
        #[arg(long = "select", value_name = "KEY=VALUE")]
        select: Vec<String>,
        /// `closed` (default) or `open`.
        #[arg(long)]
        fail: Option<String>,
    },
}

type Client = ControlClient<tonic::transport::Channel>;

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(t) = std::env::var("WEFT_CP_TOKEN")
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

fn labels(list: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    list.iter()
        .map(|l| {
            l.split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("{l:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// Waits for `version` to reach every connected proxy; prints the outcome. `Ok(false)`: some
/// proxy refused it or did not answer in time.
async fn follow(client: &mut Client, version: u64, wait: Duration) -> anyhow::Result<bool> {
    let mut stream = client
        .rollout(request(v1::RolloutRequest {
            version,
            timeout_ms: wait.as_millis() as u64,
        }))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await.map_err(status_error)? {
        if !p.done {
            eprint!(
                "\rversion {}: {}/{} proxies applied",
                p.version, p.acked, p.selected
            );
        }
        let done = p.done;
        last = Some(p);
        if done {
            break;
        }
    }
    eprint!("\r");
    let Some(p) = last else {
        anyhow::bail!("no rollout progress");
    };
    println!(
        "version {}: {}/{} proxies applied in {} ms",
        p.version, p.acked, p.selected, p.elapsed_ms
    );
    for x in &p.proxies {
        if x.nacked_version == version && x.applied_version < version {
            println!("  {} refused it: {}", x.node_id, x.nack_reason);
        } else if x.applied_version < version {
            println!(
                "  {} has not answered (applied {})",
                x.node_id, x.applied_version
            );
        }
    }
    Ok(p.acked == p.selected)
}

/// Applies `yaml` (one or more documents) and waits for the proxies, as `changed` does.
async fn apply(client: &mut Client, yaml: String, wait: Duration) -> anyhow::Result<bool> {
    let r = client
        .apply(request(v1::ApplyRequest { yaml }))
        .await
        .map_err(status_error)?
        .into_inner();
    changed(client, r, wait).await
}

async fn changed(
    client: &mut Client,
    r: v1::ChangeResponse,
    wait: Duration,
) -> anyhow::Result<bool> {
    if !r.changed {
        println!("unchanged: version {}", r.version);
        return Ok(true);
    }
    follow(client, r.version, wait).await
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let channel = tonic::transport::Endpoint::from_shared(cli.server.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {}: {e}", cli.server))?;
    let mut client = Client::new(channel)
        .max_decoding_message_size(weft_wire::MAX_MESSAGE)
        .max_encoding_message_size(weft_wire::MAX_MESSAGE);
    match cli.command {
        Cmd::Apply { file } => {
            let yaml = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            apply(&mut client, yaml, cli.wait).await
        }
        Cmd::Get { kind, name } => {
            let r = client
                .get(request(v1::GetRequest {
                    kind: kind.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            println!("# version {}\n{}", r.version, r.yaml);
            Ok(true)
        }
        Cmd::Delete { kind, name } => {
            let r = client
                .delete(request(v1::DeleteRequest { kind, name }))
                .await
                .map_err(status_error)?
                .into_inner();
            changed(&mut client, r, cli.wait).await
        }
        Cmd::Filter {
            command:
                FilterCmd::Push {
                    name,
                    module,
                    config,
                    select,
                    fail,
                },
        } => {
            let bytes =
                std::fs::read(&module).map_err(|e| anyhow::anyhow!("{}: {e}", module.display()))?;
            let up = client
                .upload_module(request(v1::UploadModuleRequest { module: bytes }))
                .await
                .map_err(status_error)?
                .into_inner();
            println!("module {} ({} bytes) uploaded", up.digest, up.size);
            let config: serde_json::Value = match config {
                None => serde_json::Value::Null,
                Some(text) => {
                    serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("--config: {e}"))?
                }
            };
            let mut spec = serde_json::json!({ "name": name, "module": up.digest });
            if !config.is_null() {
                spec["config"] = config;
            }
            if let Some(f) = fail {
                spec["fail"] = serde_json::Value::String(f);
            }
            let doc = serde_json::json!({
                "kind": "filter",
                "selector": labels(&select)?,
                "spec": spec,
            });
            let yaml = serde_yaml_ng::to_string(&doc)?;
            apply(&mut client, yaml, cli.wait).await
        }
        Cmd::Status => {
            let r = client
                .status(request(v1::StatusRequest {}))
                .await
                .map_err(status_error)?
                .into_inner();
            println!("version {}", r.version);
            println!(
                "{:<20} {:<10} {:>8} {:>4} {:<24} last NACK",
                "proxy", "state", "applied", "lag", "labels"
            );
            for p in r.proxies {
                let labels: Vec<String> =
                    p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let mut labels = labels;
                labels.sort();
                let nack = if p.nacked_version > p.applied_version {
                    format!("version {}: {}", p.nacked_version, p.nack_reason)
                } else {
                    "-".into()
                };
                println!(
                    "{:<20} {:<10} {:>8} {:>4} {:<24} {}",
                    p.node_id,
                    if p.connected { "connected" } else { "gone" },
                    p.applied_version,
                    r.version.saturating_sub(p.applied_version),
                    labels.join(","),
                    nack
                );
            }
            Ok(true)
        }
        Cmd::History => {
            let r = client
                .history(request(v1::HistoryRequest {}))
                .await
                .map_err(status_error)?
                .into_inner();
            for e in r.entries {
                println!("{:>6}  {}  {}", e.version, e.at_ms, e.change);
            }
            Ok(true)
        }
        Cmd::Rollback { version } => {
            let r = client
                .rollback(request(v1::RollbackRequest { version }))
                .await
                .map_err(status_error)?
                .into_inner();
            changed(&mut client, r, cli.wait).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
