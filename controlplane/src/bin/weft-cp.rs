//! `weft-cp`: the control plane. Serves proxies (`Distribution`, `Identity`) and weftctl
//! (`Control`) on one gRPC port over TLS (mTLS for proxies and operators); state in one file
//! (`--store`), modules, the CA and the registry next to it.
//!
//! ```sh
//! weft-cp --store weft-cp.json --init-admin ./admin     # once: an operator credential
//! weft-cp --listen 0.0.0.0:18000 --store weft-cp.json --server-name cp.example
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use weft_controlplane::blob::Blob;
use weft_controlplane::ca::Ca;
use weft_controlplane::etcd::{Etcd, EtcdConfig};
use weft_controlplane::link::{LinkTls, incoming, own_material};
use weft_controlplane::registry::Registry;
use weft_controlplane::server::{
    ControlPlane, ControlService, DistributionService, IDENTITY, IdentityService, Security,
};
use weft_controlplane::store::Store;
use weft_wire::v1::{
    control_server::ControlServer, distribution_server::DistributionServer,
    identity_server::IdentityServer,
};

#[derive(Parser)]
#[command(name = "weft-cp", version, about = "Weft's control plane")]
struct Cli {
    /// Address to serve gRPC on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Where the state lives: `file:PATH` (or a plain path; created if missing), `memory`
    /// (nothing kept), or `etcd://host:port[,host:port…]` (replicas share it).
    #[arg(long, default_value = "weft-cp.json")]
    store: String,
    /// With an etcd store: every key weft-cp writes starts with this.
    #[arg(long, default_value = "/weft/")]
    etcd_prefix: String,
    /// With an etcd store: talk TLS to etcd, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// With an etcd store: a client certificate (PEM) for etcd members that require one.
    #[arg(long, value_name = "FILE", requires = "etcd_key", requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// The key of `--etcd-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// With an etcd store: authenticate as this user (password from `WEFT_ETCD_PASSWORD`).
    #[arg(long)]
    etcd_user: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The mesh's trust domain: identities are `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Issue from an operator's intermediate CA (PEM: the intermediate first, then what is
    /// above it) instead of a root of weft-cp's own.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of `--ca-cert` (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The root of `--ca-cert`, when the file does not end with it (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_bundle: Option<PathBuf>,
    /// Lifetime of the certificates issued to proxies (at least 2 s; they renew at half).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_lifetime: std::time::Duration,
    /// DNS names and addresses the control plane's own certificate also carries (proxies check
    /// its identity, not a name; other TLS clients may want one). Repeatable.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// How long a disconnected proxy's labels still count when changes are validated.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    forget_after: std::time::Duration,
    /// Serve the control link without TLS: only on a loopback address, for development.
    /// Proxies then say who they are (no enrollment) and the token, if set, is the only check.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Write an operator credential (admin.pem, admin.key, ca.pem) to this directory and exit.
    #[arg(long, value_name = "DIR")]
    init_admin: Option<PathBuf>,
    /// A file of public keys (`ed25519:<base64>`, one per line; `weftctl keys generate` writes
    /// them) filter modules must be signed by; repeatable. Without it signatures are not
    /// required. Proxies enrolled here trust these keys too.
    #[arg(long = "module-trust", value_name = "FILE")]
    module_trust: Vec<PathBuf>,
    /// The operator's name in the credential `--init-admin` writes.
    #[arg(long, default_value = "admin")]
    admin_name: String,
}

/// How long an operator credential from `--init-admin` works.
const ADMIN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// The file next to the store named `<store><suffix>` (None for an in-memory store).
fn beside(store: &Option<PathBuf>, suffix: &str) -> Option<PathBuf> {
    store.as_ref().map(|p| {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    })
}

fn open_ca(cli: &Cli, blob: Blob) -> anyhow::Result<Ca> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    match (&cli.ca_cert, &cli.ca_key) {
        (Some(cert), Some(key)) => {
            let bundle = cli.ca_bundle.as_ref().map(read).transpose()?;
            Ok(Ca::operator(
                &cli.trust_domain,
                &read(cert)?,
                &read(key)?,
                bundle.as_deref(),
            )
            .map_err(|e| anyhow::anyhow!(e))?)
        }
        _ => Ok(Ca::open_in(&cli.trust_domain, blob).map_err(|e| anyhow::anyhow!(e))?),
    }
}

/// `--init-admin DIR`: a key made here and a certificate for `spiffe://<td>/weft/admin/<name>`,
/// with the trust bundle to verify weft-cp by.
fn init_admin(ca: &Ca, dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let id = weft_proxy::identity::SpiffeId::with_path(ca.trust_domain(), &["weft", "admin", name])
        .map_err(|e| anyhow::anyhow!("--admin-name: {e}"))?;
    let key = weft_proxy::identity::svid::new_key().map_err(|e| anyhow::anyhow!(e))?;
    let csr = weft_proxy::identity::svid::csr(&key).map_err(|e| anyhow::anyhow!(e))?;
    let issued = ca
        .issue(&csr, &id, name, ADMIN_LIFETIME, &[])
        .map_err(|e| anyhow::anyhow!(e))?;
    let chain: String = issued
        .chain
        .iter()
        .map(|c| weft_controlplane::ca::cert_pem(c))
        .collect();
    let bundle: String = ca
        .bundle()
        .1
        .iter()
        .map(|c| weft_controlplane::ca::cert_pem(c))
        .collect();
    use weft_controlplane::ca::write_private;
    write_private(&dir.join("admin.key"), key.serialize_pem().as_bytes())?;
    write_private(&dir.join("admin.pem"), chain.as_bytes())?;
    write_private(&dir.join("ca.pem"), bundle.as_bytes())?;
    println!(
        "wrote {}/admin.pem, admin.key and ca.pem for {id} (until {}); weftctl reads them with --credentials {}",
        dir.display(),
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(issued.not_after.max(0) as u64)
        ),
        dir.display()
    );
    Ok(())
}

/// Where `--store` says the state lives.
enum StorePlace {
    Memory,
    File(PathBuf),
    Etcd(EtcdConfig),
}

impl StorePlace {
    fn parse(cli: &Cli) -> anyhow::Result<StorePlace> {
        let s = cli.store.as_str();
        if s == "memory" {
            return Ok(StorePlace::Memory);
        }
        if s.starts_with("etcd://") {
            let mut c = EtcdConfig::parse(s, &cli.etcd_prefix)
                .map_err(|e| anyhow::anyhow!("--store {e}"))?;
            c.ca = cli.etcd_ca.clone();
            c.cert = cli.etcd_cert.clone().zip(cli.etcd_key.clone());
            if let Some(user) = &cli.etcd_user {
                let password = std::env::var("WEFT_ETCD_PASSWORD").map_err(|_| {
                    anyhow::anyhow!("--etcd-user needs the password in WEFT_ETCD_PASSWORD")
                })?;
                c.user = Some((user.clone(), password));
            }
            return Ok(StorePlace::Etcd(c));
        }
        if cli.etcd_ca.is_some() || cli.etcd_user.is_some() {
            anyhow::bail!("--etcd-ca and --etcd-user go with --store etcd://…");
        }
        if let Some((scheme, _)) = s.split_once("://") {
            anyhow::bail!(
                "--store {s:?}: unknown scheme {scheme:?} (file:PATH, memory, etcd://host:port)"
            );
        }
        let path = s.strip_prefix("file:").unwrap_or(s);
        if path.is_empty() {
            anyhow::bail!("--store: empty path");
        }
        Ok(StorePlace::File(PathBuf::from(path)))
    }
}

/// The store in etcd: waits for etcd (a replica that served an empty state while etcd is away
/// would take every proxy's configuration away), with back-off, logging each failure.
async fn open_etcd(config: EtcdConfig) -> anyhow::Result<Store> {
    let where_ = config.describe();
    // etcd run with --client-cert-auth drops a connection without a certificate once the
    // handshake is over: the client sees only a broken connection, so say what may be missing.
    let hint = if config.ca.is_some() && config.cert.is_none() {
        " (no --etcd-cert/--etcd-key given: an etcd that requires client certificates drops the connection)"
    } else {
        ""
    };
    let etcd = Etcd::connect(config)
        .await
        .map_err(|e| anyhow::anyhow!("--store {where_}: {e}"))?;
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match Store::open_etcd(etcd.clone()).await {
            Ok(s) => {
                tracing::info!(store = %where_, version = s.current().number, "state read from etcd");
                return Ok(s);
            }
            Err(weft_controlplane::store::StoreError::Unavailable(e)) => {
                tracing::warn!("{e}{hint}; waiting for etcd before serving");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => anyhow::bail!("--store {where_}: {e}"),
        }
    }
}

/// How often weft-cp pings each connection, and how long it waits for the answer.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

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
    let place = StorePlace::parse(&cli)?;
    let path = match &place {
        StorePlace::File(p) => Some(p.clone()),
        StorePlace::Memory | StorePlace::Etcd(_) => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // With etcd, the store, the CA and the registry are there, shared by every replica.
    let store = match &place {
        StorePlace::Etcd(config) => Some(rt.block_on(open_etcd(config.clone()))?),
        _ => None,
    };
    let etcd = store.as_ref().and_then(Store::etcd);
    let blob = |suffix: &str, key: &str| match &etcd {
        Some(etcd) => Blob::etcd(etcd.clone(), &format!("{IDENTITY}{key}")),
        None => Blob::file(beside(&path, suffix).as_deref()),
    };
    let ca = std::sync::Arc::new(open_ca(&cli, blob(".ca.json", "ca"))?);
    if let Some(dir) = &cli.init_admin {
        return init_admin(&ca, dir, &cli.admin_name);
    }
    if cli.cert_lifetime < std::time::Duration::from_secs(2) {
        anyhow::bail!("--cert-lifetime must be at least 2s");
    }
    if cli.insecure_plaintext {
        if !cli.listen.ip().is_loopback() {
            anyhow::bail!(
                "--insecure-plaintext serves only on a loopback address, not {}",
                cli.listen
            );
        }
        tracing::warn!(
            "--insecure-plaintext: the control link has no TLS; proxies are trusted to say who they are"
        );
    }
    let store = match store {
        Some(s) => s,
        None => Store::open(path.as_deref())?,
    };
    let registry =
        Registry::open_in(blob(".registry.json", "registry")).map_err(|e| anyhow::anyhow!(e))?;
    let mut module_keys = Vec::new();
    for f in &cli.module_trust {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("--module-trust {}: {e}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            module_keys.push(
                weft_proxy::wasm::signing::PublicKey::parse(line).map_err(|e| {
                    anyhow::anyhow!("--module-trust {}:{}: {e}", f.display(), n + 1)
                })?,
            );
        }
    }
    if !cli.module_trust.is_empty() && module_keys.is_empty() {
        anyhow::bail!("--module-trust: no key in the files given");
    }
    let security = Security {
        ca: ca.clone(),
        registry: std::sync::Mutex::new(registry),
        lifetime: cli.cert_lifetime,
        tls: !cli.insecure_plaintext,
        module_keys,
    };
    let cp = ControlPlane::with_security(store, token, security).map_err(|e| anyhow::anyhow!(e))?;
    cp.metrics.export_log_drops(logs.dropped());
    cp.set_forget_after(cli.forget_after);
    let mut names = cli.server_names.clone();
    names.extend(["localhost".to_owned(), cli.listen.ip().to_string()]);
    names.dedup();
    let link = if cli.insecure_plaintext {
        None
    } else {
        Some(
            LinkTls::new(own_material(&ca, &names).map_err(|e| anyhow::anyhow!(e))?)
                .map_err(|e| anyhow::anyhow!(e))?,
        )
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "weft-cp listening");
        if let Some(m) = cli.metrics {
            let l = tokio::net::TcpListener::bind(m).await?;
            tracing::info!(addr = %l.local_addr()?, "metrics listening");
            tokio::spawn(serve_metrics(l, cp.clone()));
        }
        if let Some(link) = &link {
            tokio::spawn(keep_identity(
                cp.clone(),
                link.clone(),
                ca.clone(),
                names.clone(),
            ));
            tracing::info!(
                identity = %link.identity.id(),
                pin = %ca.serving_pin(),
                "control link: TLS 1.3, proxies and operators by certificate"
            );
        }
        tokio::spawn(advance_rotations(cp.clone()));
        weft_controlplane::server::spawn_follower(cp.clone());
        weft_controlplane::server::spawn_identity_follower(cp.clone());
        weft_controlplane::server::spawn_peers(cp.clone());
        weft_controlplane::server::spawn_rollout_driver(cp.clone());
        let incoming = incoming(listener, link.clone());
        let max = weft_wire::MAX_MESSAGE;
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        // A peer that vanished without closing (its machine gone, its process stopped) is
        // found by HTTP/2 pings within 20 s, and its stream closed.
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .add_service(
                DistributionServer::new(DistributionService(cp.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                IdentityServer::new(IdentityService(cp.clone()))
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

/// Renews the control plane's own certificate at half its life, and follows the trust bundle
/// (a rotation adds and retires roots).
async fn keep_identity(
    cp: std::sync::Arc<ControlPlane>,
    link: std::sync::Arc<LinkTls>,
    ca: std::sync::Arc<Ca>,
    names: Vec<String>,
) {
    let mut served_generation = ca.bundle().0;
    let mut served_anchor = ca.serving_anchor();
    loop {
        let changed = cp.ca_changed.notified();
        let m = link.identity.current();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (generation, _) = ca.bundle();
        let due = now >= m.svid.renew_at()
            || generation != served_generation
            || ca.serving_anchor() != served_anchor;
        if due {
            match own_material(&ca, &names) {
                Ok(m) => {
                    link.set(m);
                    served_generation = generation;
                    served_anchor = ca.serving_anchor();
                    tracing::info!("control plane certificate renewed");
                }
                Err(e) => tracing::error!("cannot renew the control plane's certificate: {e}"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = changed => {}
        }
    }
}

/// Moves root rotations on as proxies catch up.
async fn advance_rotations(cp: std::sync::Arc<ControlPlane>) {
    loop {
        if let Err(e) = cp.advance_rotation() {
            tracing::error!("root rotation: {e}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
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
