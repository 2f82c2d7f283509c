//! `weftctl`: the control plane's CLI. The server is `--server` (or `WEFT_CP`); the caller is an
//! operator by the credential `weft-cp --init-admin DIR` wrote (`--credentials DIR` or
//! `WEFT_CREDENTIALS`), or by the token `WEFT_CP_TOKEN` with the CA to trust (`--ca FILE`).
//!
//! ```sh
//! weftctl node add web-1 --identity shop/web --label app=web   # prints a join token
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
use weft_proxy::control::link::LinkSecurity;
use weft_proxy::identity::Material;
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
        default_value = "https://127.0.0.1:18000",
        global = true
    )]
    server: String,
    /// The directory `weft-cp --init-admin` wrote (admin.pem, admin.key, ca.pem).
    #[arg(long, env = "WEFT_CREDENTIALS", global = true, value_name = "DIR")]
    credentials: Option<PathBuf>,
    /// The CA to verify weft-cp by (PEM), when the token is the credential.
    #[arg(long, env = "WEFT_CP_CA", global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
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
    /// Upload a Wasm module and apply a service (a module that runs with no request).
    Service {
        #[command(subcommand)]
        command: ServiceCmd,
    },
    /// Every proxy: connected, labels, applied version, last NACK.
    Status,
    /// The versions kept, newest last.
    History,
    /// Make a past version's state current again (as a new version).
    Rollback { version: u64 },
    /// Workload registrations and the nodes they enrolled.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// Module signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
    },
    /// Print Kubernetes manifests (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
    /// CronJob) with the weft sidecar added: `weft init` as an init container, the proxy as a
    /// native sidecar. Other documents pass through. Needs no control plane.
    Inject {
        /// The manifests (`-` reads standard input).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The weft image.
        #[arg(long)]
        image: Option<String>,
        /// The control plane's URL(s) the sidecar enrolls with.
        #[arg(long)]
        control_plane: Option<String>,
        /// The Secret (key `token`) holding a reusable join token for the workload.
        #[arg(long)]
        join_secret: Option<String>,
        /// The ConfigMap (key `bootstrap.yaml`) with the sidecar's bootstrap.
        #[arg(long)]
        bootstrap_configmap: Option<String>,
        /// The uid (and gid) the sidecar runs as.
        #[arg(long)]
        proxy_uid: Option<u32>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make an Ed25519 signing key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub (for
    /// weft-cp --module-trust and proxies' module_trust).
    Generate { prefix: PathBuf },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Register a workload identity and labels; prints a join token for `weft run`.
    Add {
        name: String,
        /// `NAMESPACE/SERVICE-ACCOUNT`: the certificate says
        /// `spiffe://<trust-domain>/ns/NAMESPACE/sa/SERVICE-ACCOUNT`.
        #[arg(long)]
        identity: String,
        /// A label resources select the node by (`app=web`; repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// One token for a class of workloads: it enrolls any number of proxies (node ids
        /// `NAME-<random>`) until it expires.
        #[arg(long)]
        reusable: bool,
        /// How long the token works.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Registrations and enrolled nodes, with their certificates.
    List,
    /// Remove a registration and the nodes it enrolled.
    Remove { name: String },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Roots, the issuing one, and where a rotation stands.
    Status,
    /// Rotate the root: a new root joins every trust bundle, issuing switches to it, the old
    /// one is retired once every proxy holds a certificate from the new one.
    Rotate,
}

/// What pushing a module as a filter or a service takes.
#[derive(clap::Args)]
struct PushArgs {
    name: String,
    #[arg(long)]
    module: PathBuf,
    /// The plugin configuration (JSON or YAML text).
    #[arg(long)]
    config: Option<String>,
    /// Labels of the proxies it is for (`app=web`; repeatable).
    #[arg(long = "select", value_name = "KEY=VALUE")]
    select: Vec<String>,
    /// Sign the module (its digest and the name) with this key (PREFIX.key from `weftctl
    /// keys generate`).
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
}

#[derive(Subcommand)]
enum FilterCmd {
    /// Upload a module and apply a filter that runs it.
    Push {
        #[command(flatten)]
        push: PushArgs,
        /// `closed` (default) or `open`.
        #[arg(long)]
        fail: Option<String>,
    },
    /// Roll a new revision of a running filter out in stages (`--module`, `--config`; the rest
    /// of the filter as it runs), judged by what proxies report; or pause, resume or abort
    /// the rollout under way.
    Rollout {
        name: String,
        /// The new module.
        #[arg(long, required_unless_present_any = ["pause", "resume", "abort"])]
        module: Option<PathBuf>,
        /// The new configuration (JSON or YAML text); default: the running one.
        #[arg(long)]
        config: Option<String>,
        /// Sign the new module with this key (PREFIX.key).
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
        /// Percentages of the selected proxies per step, ending at 100.
        #[arg(long, default_value = "5,25,100", value_delimiter = ',')]
        steps: Vec<u32>,
        /// How long each step runs before it is judged.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        step_time: Duration,
        /// Most the new revision's error rate may exceed the old one's (`1%`).
        #[arg(long, default_value = "1%", value_parser = percentage)]
        max_error_rate: f64,
        /// Most the new revision's p99 time in the filter may exceed the old one's.
        #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
        max_p99_increase: Duration,
        /// Requests the new revision must serve in a step before it is judged.
        #[arg(long, default_value_t = 100)]
        min_requests: u64,
        #[arg(long, conflicts_with_all = ["resume", "abort", "module"])]
        pause: bool,
        #[arg(long, conflicts_with_all = ["pause", "abort", "module"])]
        resume: bool,
        /// Every proxy back on the running revision.
        #[arg(long, conflicts_with_all = ["pause", "resume", "module"])]
        abort: bool,
    },
    /// Where a filter's rollout stands: its step, each cohort's figures, its decisions.
    Status { name: String },
}

/// `1%`, `0.5 %` or `2` (percent) as a fraction.
fn percentage(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a percentage (1%)"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("{s:?}: 0% to 100%"));
    }
    Ok(n / 100.0)
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Upload a module and apply a service that runs it.
    Push {
        #[command(flatten)]
        push: PushArgs,
        /// `process` (default: one instance per proxy) or `worker` (one per worker).
        #[arg(long)]
        placement: Option<String>,
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

/// Uploads a module, signed first for `name` when a key is given (a bad key uploads nothing):
/// its digest and signature.
async fn upload(
    client: &mut Client,
    name: &str,
    module: &std::path::Path,
    sign: Option<&std::path::Path>,
) -> anyhow::Result<(String, Option<weft_proxy::config::ModuleSignature>)> {
    let bytes = std::fs::read(module).map_err(|e| anyhow::anyhow!("{}: {e}", module.display()))?;
    let signature = match sign {
        None => None,
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let key = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
                .map_err(|e| anyhow::anyhow!("--sign {}: {e}", path.display()))?;
            let digest = weft_proxy::wasm::runtime::digest(&bytes);
            Some(
                weft_proxy::wasm::signing::sign(key.secret_pkcs8_der(), name, &digest)
                    .map_err(|e| anyhow::anyhow!("--sign {}: {e}", path.display()))?,
            )
        }
    };
    let up = client
        .upload_module(request(v1::UploadModuleRequest { module: bytes }))
        .await
        .map_err(status_error)?
        .into_inner();
    println!("module {} ({} bytes) uploaded", up.digest, up.size);
    Ok((up.digest, signature))
}

/// Prints where a filter's rollout stands.
fn print_rollout(st: &v1::FilterRolloutStatus) {
    let steps: Vec<String> = st.steps.iter().map(|s| format!("{s}%")).collect();
    println!(
        "filter/{} rollout: {}, step {} of {} ({}), {} of {} proxies on the new revision",
        st.name,
        st.phase,
        st.step,
        st.steps.len(),
        steps.join(" → "),
        st.canaries,
        st.selected
    );
    println!(
        "revision {} → {}; step time {} s ({} s in); limits: error rate +{:.2} %, p99 +{:.3} ms, at least {} requests",
        st.from_revision,
        st.to_revision,
        st.step_time_ms / 1000,
        st.step_elapsed_ms / 1000,
        st.max_error_rate * 100.0,
        st.max_p99_increase_us as f64 / 1000.0,
        st.min_requests
    );
    println!(
        "{:<6} {:<14} {:>7} {:>10} {:>8} {:>11} {:>7} {:>8} {:>10} {:>10}",
        "cohort",
        "revision",
        "proxies",
        "requests",
        "errors",
        "error rate",
        "failed",
        "local5xx",
        "p50",
        "p99"
    );
    for c in &st.cohorts {
        let rate = if c.requests == 0 {
            0.0
        } else {
            c.errors as f64 * 100.0 / c.requests as f64
        };
        println!(
            "{:<6} {:<14} {:>7} {:>10} {:>8} {:>10.2}% {:>7} {:>8} {:>8.3}ms {:>8.3}ms",
            c.cohort,
            c.revision,
            c.proxies,
            c.requests,
            c.errors,
            rate,
            c.failed,
            c.local_5xx,
            c.p50_us / 1000.0,
            c.p99_us / 1000.0
        );
    }
    for d in &st.decisions {
        println!("{}  {}", when_ms(d.at_ms), d.text);
    }
}

fn when_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms % 1000)
}

/// Uploads a module (signed first, when asked: a bad key changes nothing) and applies the
/// filter or service (`kind`) that runs it.
async fn push(
    client: &mut Client,
    kind: &str,
    args: PushArgs,
    extra: Option<(&str, serde_json::Value)>,
    wait: Duration,
) -> anyhow::Result<bool> {
    let PushArgs {
        name,
        module,
        config,
        select,
        sign,
    } = args;
    let config: serde_json::Value = match config {
        None => serde_json::Value::Null,
        Some(text) => {
            serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("--config: {e}"))?
        }
    };
    let selector = labels(&select)?;
    let (digest, signature) = upload(client, &name, &module, sign.as_deref()).await?;
    let mut spec = serde_json::json!({ "name": name, "module": digest });
    if !config.is_null() {
        spec["config"] = config;
    }
    if let Some((field, value)) = extra {
        spec[field] = value;
    }
    if let Some(sig) = signature {
        spec["signature"] = serde_json::to_value(sig)?;
    }
    let doc = serde_json::json!({ "kind": kind, "selector": selector, "spec": spec });
    let yaml = serde_yaml_ng::to_string(&doc)?;
    apply(client, yaml, wait).await
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

/// How weftctl proves itself and checks weft-cp: the operator credential, else the token with
/// the CA named; `http://` is the plaintext link.
fn link_security(cli: &Cli) -> anyhow::Result<LinkSecurity> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    if cli.server.starts_with("http://") {
        return Ok(LinkSecurity::Plain);
    }
    let certs = |p: &std::path::Path| -> anyhow::Result<Vec<Vec<u8>>> {
        let v = CertificateDer::pem_file_iter(p)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        if v.is_empty() {
            anyhow::bail!("{}: no certificate", p.display());
        }
        Ok(v)
    };
    if let Some(dir) = &cli.credentials {
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("admin.key"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("admin.key").display()))?;
        let key = match key {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => anyhow::bail!("{}: expected a PKCS#8 key", dir.join("admin.key").display()),
        };
        let m = Material::new(
            key,
            certs(&dir.join("admin.pem"))?,
            certs(&dir.join("ca.pem"))?,
            0,
        )
        .map_err(|e| anyhow::anyhow!("--credentials {}: {e}", dir.display()))?;
        return Ok(LinkSecurity::Mesh(weft_proxy::identity::Identity::new(m)));
    }
    match &cli.ca {
        Some(ca) => Ok(LinkSecurity::Trusted(certs(ca)?)),
        None => anyhow::bail!(
            "no credential: give --credentials DIR (from `weft-cp --init-admin DIR`), or WEFT_CP_TOKEN with --ca FILE; http:// URLs are the plaintext link"
        ),
    }
}

/// `weftctl keys generate`: local, no server needed.
fn generate_keys(prefix: PathBuf) -> anyhow::Result<bool> {
    let (secret, public) = weft_proxy::wasm::signing::generate().map_err(|e| anyhow::anyhow!(e))?;
    let mut key = prefix.clone().into_os_string();
    key.push(".key");
    let mut public_file = prefix.into_os_string();
    public_file.push(".pub");
    let pem = weft_controlplane::ca::pem("PRIVATE KEY", &secret);
    weft_controlplane::ca::write_private(std::path::Path::new(&key), pem.as_bytes())?;
    std::fs::write(&public_file, format!("{public}\n"))?;
    println!(
        "wrote {} (secret) and {}: {public} (id {})",
        std::path::Path::new(&key).display(),
        std::path::Path::new(&public_file).display(),
        public.id()
    );
    Ok(true)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    if let Cmd::Keys {
        command: KeysCmd::Generate { prefix },
    } = cli.command
    {
        return generate_keys(prefix);
    }
    if let Cmd::Inject {
        file,
        image,
        control_plane,
        join_secret,
        bootstrap_configmap,
        proxy_uid,
    } = cli.command
    {
        let d = weft_controlplane::inject::InjectOptions::default();
        let opts = weft_controlplane::inject::InjectOptions {
            image: image.unwrap_or(d.image),
            control_plane: control_plane.unwrap_or(d.control_plane),
            join_secret: join_secret.unwrap_or(d.join_secret),
            bootstrap_configmap: bootstrap_configmap.unwrap_or(d.bootstrap_configmap),
            proxy_uid: proxy_uid.unwrap_or(d.proxy_uid),
        };
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| anyhow::anyhow!("standard input: {e}"))?
        } else {
            std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        };
        let out = weft_controlplane::inject::inject(&text, &opts)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        print!("{out}");
        return Ok(true);
    }
    let security = link_security(&cli)?;
    let channel = weft_proxy::control::link::connect(&cli.server, &security)
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
            command: FilterCmd::Push { push: args, fail },
        } => {
            let extra = fail.map(|f| ("fail", serde_json::Value::String(f)));
            push(&mut client, "filter", args, extra, cli.wait).await
        }
        Cmd::Filter {
            command: FilterCmd::Status { name },
        } => {
            let st = client
                .get_filter_rollout(request(v1::GetFilterRolloutRequest { name }))
                .await
                .map_err(status_error)?
                .into_inner();
            print_rollout(&st);
            Ok(true)
        }
        Cmd::Filter {
            command:
                FilterCmd::Rollout {
                    name,
                    pause,
                    resume,
                    abort,
                    ..
                },
        } if pause || resume || abort => {
            let action = if pause {
                "pause"
            } else if resume {
                "resume"
            } else {
                "abort"
            };
            let st = client
                .change_filter_rollout(request(v1::ChangeFilterRolloutRequest {
                    name,
                    action: action.into(),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            print_rollout(&st);
            Ok(true)
        }
        Cmd::Filter {
            command:
                FilterCmd::Rollout {
                    name,
                    module,
                    config,
                    sign,
                    steps,
                    step_time,
                    max_error_rate,
                    max_p99_increase,
                    min_requests,
                    ..
                },
        } => {
            let module = module.ok_or_else(|| anyhow::anyhow!("--module is required"))?;
            let running = client
                .get(request(v1::GetRequest {
                    kind: "filter".into(),
                    name: name.clone(),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            let doc: serde_json::Value = serde_yaml_ng::from_str(&running.yaml)
                .map_err(|e| anyhow::anyhow!("filter/{name}: {e}"))?;
            let mut spec = match doc.get("spec") {
                Some(s) if s.is_object() => s.clone(),
                _ => anyhow::bail!("no filter/{name}: a rollout changes a filter that runs"),
            };
            let (digest, signature) = upload(&mut client, &name, &module, sign.as_deref()).await?;
            spec["module"] = serde_json::Value::String(digest);
            if let Some(text) = config {
                spec["config"] =
                    serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("--config: {e}"))?;
            }
            match signature {
                Some(sig) => spec["signature"] = serde_json::to_value(sig)?,
                None => {
                    if let Some(o) = spec.as_object_mut() {
                        o.remove("signature");
                    }
                }
            }
            let st = client
                .start_filter_rollout(request(v1::StartFilterRolloutRequest {
                    filter_json: serde_json::to_vec(&spec)?,
                    steps,
                    step_time_ms: step_time.as_millis() as u64,
                    max_error_rate,
                    max_p99_increase_us: max_p99_increase.as_micros() as u64,
                    min_requests,
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            print_rollout(&st);
            Ok(true)
        }
        Cmd::Service {
            command:
                ServiceCmd::Push {
                    push: args,
                    placement,
                },
        } => {
            let extra = placement.map(|p| ("placement", serde_json::Value::String(p)));
            push(&mut client, "service", args, extra, cli.wait).await
        }
        Cmd::Status => {
            let r = client
                .status(request(v1::StatusRequest {}))
                .await
                .map_err(status_error)?
                .into_inner();
            println!("version {}", r.version);
            println!(
                "{:<20} {:<10} {:>8} {:>4} {:<24} {:<40} {:<20} last NACK",
                "proxy", "state", "applied", "lag", "labels", "identity", "certificate expires"
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
                    "{:<20} {:<10} {:>8} {:>4} {:<24} {:<40} {:<20} {}",
                    p.node_id,
                    if !p.replica.is_empty() {
                        // Connected to another replica.
                        format!("via:{}", &p.replica[..p.replica.len().min(6)])
                    } else if p.connected {
                        "connected".to_owned()
                    } else {
                        "gone".to_owned()
                    },
                    p.applied_version,
                    r.version.saturating_sub(p.applied_version),
                    labels.join(","),
                    if p.spiffe_id.is_empty() {
                        "-"
                    } else {
                        &p.spiffe_id
                    },
                    when(p.certificate_not_after),
                    nack
                );
            }
            Ok(true)
        }
        Cmd::Node {
            command:
                NodeCmd::Add {
                    name,
                    identity,
                    labels: l,
                    reusable,
                    ttl,
                },
        } => {
            let (namespace, account) = identity.split_once('/').ok_or_else(|| {
                anyhow::anyhow!("--identity {identity:?}: expected NAMESPACE/SERVICE-ACCOUNT")
            })?;
            let r = client
                .add_node(request(v1::AddNodeRequest {
                    name,
                    namespace: namespace.to_owned(),
                    service_account: account.to_owned(),
                    labels: labels(&l)?.into_iter().collect(),
                    reusable,
                    ttl_ms: ttl.as_millis() as u64,
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            eprintln!(
                "registered {} until {}; start the proxy with WEFT_JOIN_TOKEN set to:",
                r.spiffe_id,
                when((r.expires_at_ms / 1000) as i64)
            );
            println!("{}", r.token);
            Ok(true)
        }
        Cmd::Node {
            command: NodeCmd::List,
        } => {
            let r = client
                .list_nodes(request(v1::ListNodesRequest {}))
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{:<24} {:<48} {:<9} {:>5} {:<20} labels",
                "registration", "identity", "reusable", "uses", "token expires"
            );
            for g in r.registrations {
                let mut l: Vec<String> = g.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                l.sort();
                println!(
                    "{:<24} {:<48} {:<9} {:>5} {:<20} {}",
                    g.name,
                    g.spiffe_id,
                    g.reusable,
                    g.uses,
                    when((g.expires_at_ms / 1000) as i64),
                    l.join(",")
                );
            }
            println!();
            println!(
                "{:<24} {:<48} {:<20} {:<16} {:>8}",
                "node", "identity", "certificate expires", "root", "renewals"
            );
            for n in r.nodes {
                println!(
                    "{:<24} {:<48} {:<20} {:<16} {:>8}",
                    n.node_id,
                    n.spiffe_id,
                    when(n.certificate_not_after),
                    n.root,
                    n.renewals
                );
            }
            Ok(true)
        }
        Cmd::Node {
            command: NodeCmd::Remove { name },
        } => {
            let r = client
                .remove_node(request(v1::RemoveNodeRequest { name: name.clone() }))
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "removed {name} and its nodes: {}",
                if r.nodes.is_empty() {
                    "-".to_owned()
                } else {
                    r.nodes.join(", ")
                }
            );
            Ok(true)
        }
        Cmd::Ca { command } => {
            let r = match command {
                CaCmd::Status => client.ca_status(request(v1::CaStatusRequest {})).await,
                CaCmd::Rotate => client.rotate_ca(request(v1::RotateCaRequest {})).await,
            }
            .map_err(status_error)?
            .into_inner();
            println!(
                "trust domain {}{}",
                r.trust_domain,
                if r.operator_ca {
                    " (operator's intermediate)"
                } else {
                    ""
                }
            );
            for root in &r.roots {
                println!(
                    "  root {} until {}{}",
                    root.id,
                    when(root.not_after),
                    if root.id == r.issuing {
                        "  (issuing)"
                    } else {
                        ""
                    }
                );
            }
            println!("bundle generation {}, rotation: {}", r.generation, r.phase);
            if !r.waiting_for.is_empty() {
                println!("  waiting for: {}", r.waiting_for.join(", "));
            }
            if r.phase != "stable" {
                println!(
                    "  when it is stable, write new operator credentials (weft-cp --init-admin DIR) and join tokens: the old root is retired"
                );
            }
            Ok(true)
        }
        Cmd::Keys { .. } | Cmd::Inject { .. } => unreachable!("handled before connecting"),
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

/// Unix seconds as RFC 3339 (UTC); `-` for none.
fn when(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix as u64))
        .to_string()
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
