//! The proxy's side of the control plane: subscribe (with back-off and jitter on every
//! failure), fetch the modules a snapshot names (once per digest: verified, cached on disk),
//! have the server apply it exactly as a reload, answer ACK or NACK with the errors, and keep
//! the last good snapshot on disk so that a restart without a reachable control plane serves it.
//! While the control plane is down the proxy keeps serving what it has.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};
use weft_wire::v1;

use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;

pub mod delta;
mod disk;
pub mod identity;
pub mod link;

pub use disk::{config_digest, last_good, save_last_good};
use disk::{load_cached, module_file, saved_digest};

/// `weft run --control-plane …`.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// `https://host:port` of each weft-cp replica (`http://` with `insecure`): the proxy talks
    /// to one at a time and moves to the next when it goes away.
    pub urls: Vec<String>,
    /// The replica talked to now (an index into `urls`).
    pub current: Arc<std::sync::atomic::AtomicUsize>,
    /// On the plaintext link, the node id and labels the proxy claims; on the TLS link its
    /// registration decides them.
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    /// Sent as `authorization: Bearer <token>` (plaintext link).
    pub token: Option<String>,
    /// The last good snapshot, the module cache and the identity.
    pub state_dir: PathBuf,
    /// `--insecure-plaintext`: no TLS, no identity.
    pub insecure: bool,
    /// The join token, used when no valid identity is saved.
    pub join_token: Option<String>,
    /// The proxy's identity on the TLS link (set by [`identity::establish`] at start).
    pub identity: Option<Arc<Identity>>,
    /// The bootstrap configuration's `module_trust` (set at start).
    pub module_trust: Vec<crate::wasm::signing::PublicKey>,
}

impl ControlOptions {
    /// The replica talked to now.
    pub fn url(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.urls[i % self.urls.len().max(1)]
    }

    /// Moves to the next replica.
    pub fn next_url(&self) {
        let n = self.urls.len().max(1);
        let _ = self.current.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |i| Some((i + 1) % n),
        );
    }

    /// Keys delivered modules must be signed by: the bootstrap's and the control plane's.
    fn trusted_keys(&self) -> Vec<crate::wasm::signing::PublicKey> {
        let mut keys = self.module_trust.clone();
        if let Some(id) = &self.identity {
            keys.extend(id.current().module_keys.iter().cloned());
        }
        keys
    }

    fn security(&self) -> link::LinkSecurity {
        match &self.identity {
            Some(i) => link::LinkSecurity::Mesh(i.clone()),
            None => link::LinkSecurity::Plain,
        }
    }
}

/// A snapshot for the server to apply; it answers on `answer`.
#[derive(Debug)]
pub struct Update {
    pub version: u64,
    pub config: Config,
    /// [`config_digest`] of the configuration as sent.
    pub digest: String,
    pub answer: oneshot::Sender<Result<(), String>>,
    /// The modules the snapshot names, held until it is applied (or refused): nothing evicts
    /// them meanwhile.
    pub modules: Vec<Arc<crate::wasm::module::LoadedModule>>,
}

type Client = v1::distribution_client::DistributionClient<tonic::transport::Channel>;

fn authorized<T>(o: &ControlOptions, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = &o.token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Makes every module of the snapshot available (from the cache, else fetched).
async fn ensure_modules(
    o: &ControlOptions,
    client: &mut Client,
    refs: &[v1::ModuleRef],
) -> Result<Vec<Arc<crate::wasm::module::LoadedModule>>, String> {
    let mut modules = Vec::with_capacity(refs.len());
    for m in refs {
        if let Ok(loaded) = load_cached(o, &m.digest) {
            modules.push(loaded);
            continue;
        }
        let mut stream = client
            .fetch_module(authorized(
                o,
                v1::ModuleRequest {
                    digest: m.digest.clone(),
                },
            ))
            .await
            .map_err(|e| format!("fetching {}: {}", m.digest, e.message()))?
            .into_inner();
        let mut bytes = Vec::with_capacity(m.size as usize);
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|e| format!("fetching {}: {}", m.digest, e.message()))?
        {
            bytes.extend_from_slice(&chunk.data);
            if bytes.len() > weft_wire::MAX_MESSAGE {
                return Err(format!("module {} is larger than allowed", m.digest));
            }
        }
        if crate::wasm::runtime::digest(&bytes) != m.digest {
            return Err(format!(
                "module {}: the bytes received do not match the digest",
                m.digest
            ));
        }
        let path = module_file(o, &m.digest);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            tracing::warn!(module = %m.digest, "cannot cache the module on disk");
        }
        let d = m.digest.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::wasm::module::load(&d, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("module {}: {e}", m.digest))?;
        modules.push(loaded);
    }
    Ok(modules)
}

/// What the proxy's filters did, by revision (see [`crate::wasm::figures`]).
pub type FigureSource = Arc<dyn Fn() -> Vec<v1::FilterFigures> + Send + Sync>;

/// The figures of every filter of `snapshot`.
pub fn filter_figures(snapshot: &crate::snapshot::Snapshot) -> Vec<v1::FilterFigures> {
    snapshot
        .filters
        .values()
        .map(|f| {
            let t = f.figures.totals();
            v1::FilterFigures {
                name: f.name.to_string(),
                revision: f.revision.to_string(),
                requests: t.requests,
                errors: t.errors,
                failed: t.failed,
                skipped: t.skipped,
                local_5xx: t.local_5xx,
                latency: t.latency,
            }
        })
        .collect()
}

/// Sends a [`v1::FilterReport`] every `every` milliseconds while it is not 0 (the control plane
/// asks for reports while a staged rollout needs them).
async fn report(
    out: mpsc::Sender<v1::ProxyMessage>,
    mut every: tokio::sync::watch::Receiver<u32>,
    figures: FigureSource,
) {
    loop {
        let ms = *every.borrow_and_update();
        if ms == 0 {
            if every.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(u64::from(ms.max(100)))).await;
        if *every.borrow() == 0 {
            continue;
        }
        let msg = v1::ProxyMessage {
            kind: Some(v1::proxy_message::Kind::Report(v1::FilterReport {
                filters: figures(),
            })),
        };
        if out.send(msg).await.is_err() {
            return;
        }
    }
}

/// Starts the subscription task.
pub fn spawn(
    o: ControlOptions,
    applied: u64,
    metrics: Arc<Metrics>,
    updates: mpsc::Sender<Update>,
    figures: FigureSource,
) {
    let connected = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let last_update = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    metrics.with_registry(|r| {
        r.register(
            "control_plane_connected",
            "1 while the proxy's stream to the control plane is up",
            connected.clone(),
        );
        r.register(
            "control_plane_last_update_timestamp_seconds",
            "When the last control-plane snapshot was applied (Unix time)",
            last_update.clone(),
        );
    });
    let renew_now = Arc::new(tokio::sync::Notify::new());
    if let Some(id) = &o.identity {
        let m = identity::IdentityMetrics::register(&metrics, id);
        identity::spawn_renewal(o.clone(), id.clone(), m, renew_now.clone());
    }
    let ctx = SessionContext {
        updates,
        connected,
        last_update,
        renew_now,
        figures,
        report_every: tokio::sync::watch::Sender::new(0u32),
        held: std::sync::Mutex::new(None),
    };
    tokio::spawn(async move {
        let mut applied = applied;
        let mut backoff = Backoff::default();
        loop {
            let started = tokio::time::Instant::now();
            match session(&o, &mut applied, &ctx).await {
                Ok(()) => tracing::info!(url = %o.url(), "control plane closed the stream"),
                Err(e) => tracing::warn!(url = %o.url(), "control plane: {e}"),
            }
            ctx.connected.set(0);
            if ctx.updates.is_closed() {
                return;
            }
            // The configuration keeps serving; the next replica is tried, spaced out.
            if started.elapsed() >= HEALTHY {
                backoff = Backoff::default();
            }
            o.next_url();
            tokio::time::sleep(backoff.next_wait()).await;
        }
    });
}

/// A stream that lasted this long was healthy: the back-off starts over.
pub const HEALTHY: Duration = Duration::from_secs(30);

/// Reconnection delays with full jitter: a random wait up to 100 ms, 200 ms, … 10 s, so that
/// proxies losing a replica together do not come back together.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_millis(100);
    pub const CAP: Duration = Duration::from_secs(10);

    /// The next delay.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = Backoff::BASE
            .saturating_mul(1 << self.attempt.min(16))
            .min(Backoff::CAP);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(fastrand::u64(..=ceiling.as_millis() as u64))
    }
}

/// What outlives one session with the control plane.
struct SessionContext {
    updates: mpsc::Sender<Update>,
    connected: Gauge<i64, std::sync::atomic::AtomicI64>,
    last_update: Gauge<i64, std::sync::atomic::AtomicI64>,
    renew_now: Arc<tokio::sync::Notify>,
    figures: FigureSource,
    /// The report interval the last snapshot asked for: it holds across reconnections (a
    /// control plane does not resend a snapshot the proxy has).
    report_every: tokio::sync::watch::Sender<u32>,
    /// The version applied last and its configuration as sent (canonical JSON): what an
    /// incremental snapshot is built on. Not kept across restarts.
    held: std::sync::Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl SessionContext {
    fn held(&self) -> Option<(u64, Arc<Vec<u8>>)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An incremental snapshot made whole from the configuration held; a whole one as it is.
fn expand(ctx: &SessionContext, mut s: v1::Snapshot) -> Result<v1::Snapshot, String> {
    if s.base_version == 0 {
        return Ok(s);
    }
    let Some((version, base)) = ctx.held().filter(|(v, _)| *v == s.base_version) else {
        return Err(format!(
            "delta: built on version {}, which this proxy does not hold",
            s.base_version
        ));
    };
    debug_assert_eq!(version, s.base_version);
    s.config_json = delta::rebuild(&base, &s.changes, &s.orders, &s.config_digest)?;
    s.base_version = 0;
    s.changes.clear();
    s.orders.clear();
    Ok(s)
}

async fn session(
    o: &ControlOptions,
    applied: &mut u64,
    ctx: &SessionContext,
) -> Result<(), String> {
    let SessionContext {
        connected,
        renew_now,
        figures,
        report_every,
        ..
    } = ctx;
    let channel = link::connect(o.url(), &o.security()).await?;
    let mut client = Client::new(channel)
        .max_decoding_message_size(weft_wire::MAX_MESSAGE)
        .max_encoding_message_size(weft_wire::MAX_MESSAGE);
    let (out, out_rx) = mpsc::channel::<v1::ProxyMessage>(8);
    let hello = v1::ProxyMessage {
        kind: Some(v1::proxy_message::Kind::Hello(v1::Hello {
            node_id: o.node_id.clone(),
            labels: o.labels.clone().into_iter().collect(),
            proxy_version: env!("CARGO_PKG_VERSION").into(),
            applied_version: *applied,
            bundle_generation: o
                .identity
                .as_ref()
                .map_or(0, |i| i.current().bundle.generation),
            applied_digest: saved_digest(o)
                .filter(|(v, _)| v == applied)
                .map(|(_, d)| d)
                .unwrap_or_default(),
            delta_base: ctx
                .held()
                .map(|(v, _)| v)
                .filter(|v| v == applied)
                .unwrap_or(0),
        })),
    };
    out.send(hello).await.map_err(|e| e.to_string())?;
    let mut snapshots = client
        .subscribe(authorized(
            o,
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        ))
        .await
        .map_err(|e| format!("subscribe refused: {}", e.message()))?
        .into_inner();
    connected.set(1);
    tracing::info!(url = %o.url(), node = %o.node_id, "connected to the control plane");
    let reporter = tokio::spawn(report(
        out.clone(),
        report_every.subscribe(),
        figures.clone(),
    ));
    // The reporter ends with the session, however it ends.
    let _reporter = AbortOnDrop(reporter);
    // A snapshot whose modules could not be fetched is tried again, spaced out, until it
    // applies or a newer one comes.
    let mut retry: Option<(v1::Snapshot, Duration, tokio::time::Instant)> = None;
    loop {
        let due = retry.as_ref().map(|r| r.2);
        let push = tokio::select! {
            m = snapshots.message() => match m.map_err(|e| e.message().to_owned())? {
                Some(p) => p,
                None => break,
            },
            () = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                let Some((s, backoff, _)) = retry.take() else { continue };
                tracing::info!(version = s.version, "trying the snapshot again");
                retry = apply_snapshot(o, &mut client, ctx, &out, applied, s, backoff).await?;
                continue;
            }
        };
        let s = match push.kind {
            Some(v1::push::Kind::Snapshot(mut s)) => {
                // The rest of a large configuration follows in parts.
                for _ in 0..s.parts {
                    let part = tokio::time::timeout(PART_WAIT, snapshots.message())
                        .await
                        .map_err(|_| "a snapshot's parts stopped coming".to_owned())?
                        .map_err(|e| e.message().to_owned())?;
                    let Some(v1::Push {
                        kind: Some(v1::push::Kind::Part(p)),
                    }) = part
                    else {
                        return Err("a snapshot's parts were interrupted".into());
                    };
                    if s.config_json.len() + p.data.len() > weft_wire::MAX_MESSAGE {
                        return Err("a snapshot larger than allowed".into());
                    }
                    s.config_json.extend_from_slice(&p.data);
                }
                s.parts = 0;
                s
            }
            Some(v1::push::Kind::Part(_)) => {
                return Err("a snapshot part without its snapshot".into());
            }
            Some(v1::push::Kind::Trust(t)) => {
                let Some(id) = &o.identity else { continue };
                let renew = t.renew;
                match identity::apply_trust(o, id, t).await {
                    Ok(generation) => {
                        out.send(v1::ProxyMessage {
                            kind: Some(v1::proxy_message::Kind::TrustAck(v1::TrustAck {
                                generation,
                            })),
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                        if renew {
                            renew_now.notify_one();
                        }
                    }
                    Err(e) => {
                        // Neither the bundle nor a renewal took: the stream restarts (and
                        // the bundle is sent again).
                        return Err(format!("trust bundle not applied: {e}"));
                    }
                }
                continue;
            }
            None => continue,
        };
        report_every.send_replace(s.report_interval_ms);
        let version = s.version;
        let s = match expand(ctx, s) {
            Ok(s) => s,
            Err(reason) => {
                tracing::info!(version, "{reason}: asking for the whole configuration");
                out.send(v1::ProxyMessage {
                    kind: Some(v1::proxy_message::Kind::Nack(v1::Nack { version, reason })),
                })
                .await
                .map_err(|e| e.to_string())?;
                // A newer snapshot replaces one waiting to be tried again.
                retry = None;
                continue;
            }
        };
        retry = apply_snapshot(o, &mut client, ctx, &out, applied, s, FIRST_RETRY).await?;
    }
    Ok(())
}

/// How long the next part of a snapshot may take.
const PART_WAIT: Duration = Duration::from_secs(60);

/// The first wait before a snapshot whose modules could not be fetched is tried again; it
/// doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Checks, fetches and applies one snapshot, and answers ACK or NACK. A snapshot that failed
/// for a reason that may pass (a module fetch) comes back to be tried again after `backoff`.
async fn apply_snapshot(
    o: &ControlOptions,
    client: &mut Client,
    ctx: &SessionContext,
    out: &mpsc::Sender<v1::ProxyMessage>,
    applied: &mut u64,
    s: v1::Snapshot,
    backoff: Duration,
) -> Result<Option<(v1::Snapshot, Duration, tokio::time::Instant)>, String> {
    let SessionContext {
        updates,
        last_update,
        ..
    } = ctx;
    let version = s.version;
    let digest = config_digest(&s.config_json);
    let sent = Arc::new(s.config_json.clone());
    // Signatures are checked before a module is fetched or compiled.
    let parsed = serde_json::from_slice::<Config>(&s.config_json)
        .map_err(|e| format!("the snapshot does not parse: {e}"))
        .and_then(|config| {
            let errors = crate::wasm::signing::check_delivered(&config, &o.trusted_keys());
            if errors.is_empty() {
                Ok(config)
            } else {
                Err(errors.join("\n"))
            }
        });
    let mut transient = false;
    let fetched = match parsed {
        Ok(config) => ensure_modules(o, client, &s.modules)
            .await
            .map(|modules| (config, modules))
            .inspect_err(|_| transient = true),
        Err(e) => Err(e),
    };
    let result = match fetched {
        Err(e) => Err(e),
        Ok((config, modules)) => {
            let (answer, rx) = oneshot::channel();
            updates
                .send(Update {
                    version,
                    config,
                    digest: digest.clone(),
                    answer,
                    modules,
                })
                .await
                .map_err(|_| "the proxy is stopping".to_owned())?;
            rx.await
                .unwrap_or_else(|_| Err("the proxy is stopping".into()))
        }
    };
    let kind = match result {
        Ok(()) => {
            *applied = version;
            *ctx.held.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, sent));
            last_update.set(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
            );
            v1::proxy_message::Kind::Ack(v1::Ack { version })
        }
        Err(reason) => v1::proxy_message::Kind::Nack(v1::Nack { version, reason }),
    };
    let nacked = matches!(kind, v1::proxy_message::Kind::Nack(_));
    out.send(v1::ProxyMessage { kind: Some(kind) })
        .await
        .map_err(|e| e.to_string())?;
    if nacked && transient {
        let wait = backoff.min(MAX_RETRY);
        tracing::warn!(version, retry_in = ?wait, "the snapshot's modules could not be fetched: trying again");
        return Ok(Some((
            s,
            (wait * 2).min(MAX_RETRY),
            tokio::time::Instant::now() + wait,
        )));
    }
    Ok(None)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
