//! weft-cp's services: `Distribution` (proxies subscribe, get their snapshot at every version,
//! answer ACK or NACK, fetch modules by digest) and `Control` (weftctl: apply, delete, get,
//! upload modules, status, rollouts, history, rollback). Everything given is validated in full
//! before it is stored; everything stored is pushed at once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::sync::{Notify, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use weft_proxy::config::Config;
use weft_wire::v1::{self, control_server::Control, distribution_server::Distribution};

use crate::resources::{Kind, Resource, assemble, parse_documents};
use crate::store::{State, Store, digest, write_atomically};

/// What the control plane knows of one proxy.
#[derive(Debug, Clone)]
pub struct ProxyState {
    pub labels: BTreeMap<String, String>,
    pub connected: bool,
    /// Identifies the current stream (a reconnect replaces it).
    stream: u64,
    pub applied: u64,
    pub sent: u64,
    pub nacked: u64,
    pub reason: String,
    pub since: Instant,
}

struct Inner {
    store: Store,
    proxies: BTreeMap<String, ProxyState>,
    next_stream: u64,
}

/// weft-cp's metrics (`weft_cp_*`).
pub struct CpMetrics {
    registry: Mutex<prometheus_client::registry::Registry>,
    connected: prometheus_client::metrics::gauge::Gauge,
    push_latency: prometheus_client::metrics::histogram::Histogram,
    nacks: prometheus_client::metrics::family::Family<
        ReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    sent_bytes: prometheus_client::metrics::counter::Counter,
    version: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabels {
    /// Where the first error is (`listeners[0].address`), or `other`.
    pub reason: String,
}

impl CpMetrics {
    fn new() -> CpMetrics {
        let mut registry = prometheus_client::registry::Registry::with_prefix("weft_cp");
        let m = CpMetrics {
            connected: Default::default(),
            push_latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
            ),
            nacks: Default::default(),
            sent_bytes: Default::default(),
            version: Default::default(),
            registry: Mutex::default(),
        };
        registry.register(
            "connected_proxies",
            "Proxies with a stream open",
            m.connected.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "Time from a version's creation to each proxy's ACK",
            m.push_latency.clone(),
        );
        registry.register(
            "nacks",
            "Versions proxies refused, by where the first error is",
            m.nacks.clone(),
        );
        registry.register(
            "sent_bytes",
            "Snapshot and module bytes sent to proxies",
            m.sent_bytes.clone(),
        );
        registry.register("version", "The current version", m.version.clone());
        CpMetrics {
            registry: Mutex::new(registry),
            ..m
        }
    }

    /// Exports the log lines the logger dropped (`weft_cp_log_lines_dropped_total`).
    pub fn export_log_drops(&self, dropped: weft_proxy::logging::DroppedLines) {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.register_collector(Box::new(dropped));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The control plane.
pub struct ControlPlane {
    pub metrics: CpMetrics,
    /// Held while a change is derived, validated and stored.
    changing: Mutex<()>,
    inner: Mutex<Inner>,
    /// The current version, for the subscription tasks.
    version: watch::Sender<u64>,
    /// Something changed in a proxy's state (ACK, NACK, connect).
    proxy_event: Notify,
    token: Option<String>,
    modules: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    modules_dir: Option<PathBuf>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlPlane")
    }
}

fn check_token<T>(token: &Option<String>, req: &Request<T>) -> Result<(), Status> {
    let Some(want) = token else {
        return Ok(());
    };
    let got = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time enough for a token: compare every byte.
    let ok = got.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "a valid `authorization: Bearer <token>` is required",
        ))
    }
}

impl ControlPlane {
    pub fn new(store: Store, token: Option<String>) -> Result<Arc<ControlPlane>, String> {
        let modules_dir = store.modules_dir();
        let mut modules = HashMap::new();
        if let Some(dir) = &modules_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for e in entries.flatten() {
                let Ok(bytes) = std::fs::read(e.path()) else {
                    continue;
                };
                let d = digest(&bytes);
                if e.file_name().to_string_lossy().trim_end_matches(".wasm")
                    != &d["sha256:".len()..]
                {
                    tracing::warn!(file = %e.path().display(), "module file does not match its digest: skipped");
                    continue;
                }
                weft_proxy::wasm::module::load(&d, &bytes)?;
                modules.insert(d, Arc::new(bytes));
            }
        }
        let version = store.current().number;
        let metrics = CpMetrics::new();
        metrics.version.set(version as i64);
        Ok(Arc::new(ControlPlane {
            metrics,
            changing: Mutex::new(()),
            inner: Mutex::new(Inner {
                store,
                proxies: BTreeMap::new(),
                next_stream: 0,
            }),
            version: watch::channel(version).0,
            proxy_event: Notify::new(),
            token,
            modules: Mutex::new(modules),
            modules_dir,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot of `version` for a proxy with `labels`.
    fn snapshot_for(
        &self,
        state: &State,
        version: u64,
        labels: &BTreeMap<String, String>,
    ) -> v1::Snapshot {
        let config = assemble(state.values(), labels);
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let refs = config
            .filters
            .iter()
            .filter_map(|f| f.module.strip_prefix("sha256:").map(|_| f.module.clone()))
            .map(|d| v1::ModuleRef {
                size: modules.get(&d).map_or(0, |b| b.len() as u64),
                digest: d,
            })
            .collect();
        v1::Snapshot {
            version,
            config_json: serde_json::to_vec(&config).unwrap_or_default(),
            modules: refs,
        }
    }

    /// Validates `state` for every proxy it could reach: each known proxy's labels, each
    /// resource's selector, and a proxy without labels.
    fn validate(&self, state: &State) -> Result<(), Vec<String>> {
        let mut label_sets: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for p in self.lock().proxies.values() {
            label_sets.push(p.labels.clone());
        }
        for r in state.values() {
            label_sets.push(r.selector.clone());
        }
        label_sets.sort();
        label_sets.dedup();
        let mut errors = Vec::new();
        for r in state.values() {
            if let crate::resources::Spec::Filter(f) = &r.spec
                && !f.module.starts_with("sha256:")
            {
                errors.push(format!(
                    "filter/{}: module must be a digest (sha256:…) of an uploaded module; `weftctl filter push` uploads it",
                    f.name
                ));
            }
        }
        let metrics = weft_proxy::metrics::Metrics::new();
        let wasm = weft_proxy::wasm::SharedHost::new(Arc::new(weft_proxy::metrics::Metrics::new()));
        for labels in &label_sets {
            let config: Config = assemble(state.values(), labels);
            let env = weft_proxy::snapshot::BuildEnv {
                metrics: &metrics,
                wasm: &wasm,
                base_dir: std::path::Path::new("/nonexistent"),
            };
            if let Err(e) = weft_proxy::snapshot::Snapshot::build(config, 1, None, env) {
                let who = if labels.is_empty() {
                    "proxies without labels".to_owned()
                } else {
                    format!(
                        "proxies labelled {}",
                        labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                };
                for line in e.0 {
                    let line = format!("{who}: {line}");
                    if !errors.contains(&line) {
                        errors.push(line);
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Derives a new state from the current one with `edit`, validates it, stores it as a new
    /// version and pushes it. Changes are serialized: two applies at once cannot lose either.
    fn change(
        &self,
        edit: impl FnOnce(&State) -> Result<(State, String), Status>,
    ) -> Result<v1::ChangeResponse, Status> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.lock().store.current().state.clone();
        let (state, what) = edit(&current)?;
        self.validate(&state)
            .map_err(|e| Status::invalid_argument(e.join("\n")))?;
        let mut inner = self.lock();
        let version = inner
            .store
            .commit(state, what)
            .map_err(|e| Status::internal(e.to_string()))?;
        let selected = inner.proxies.values().filter(|p| p.connected).count() as u32;
        let current = inner.store.current().number;
        drop(inner);
        if let Some(v) = version {
            tracing::info!(version = v, "new version");
            self.metrics.version.set(v as i64);
            self.version.send_replace(v);
        }
        Ok(v1::ChangeResponse {
            version: current,
            changed: version.is_some(),
            selected,
        })
    }

    fn statuses(&self) -> (u64, Vec<v1::ProxyStatus>) {
        let inner = self.lock();
        let list = inner
            .proxies
            .iter()
            .map(|(id, p)| v1::ProxyStatus {
                node_id: id.clone(),
                labels: p.labels.clone().into_iter().collect(),
                connected: p.connected,
                applied_version: p.applied,
                sent_version: p.sent,
                nacked_version: p.nacked,
                nack_reason: p.reason.clone(),
                since_ms: p.since.elapsed().as_millis() as u64,
            })
            .collect();
        (inner.store.current().number, list)
    }

    fn update(&self, node: &str, stream: u64, f: impl FnOnce(&mut ProxyState)) {
        let mut inner = self.lock();
        if let Some(p) = inner.proxies.get_mut(node)
            && p.stream == stream
        {
            f(p);
            p.since = Instant::now();
        }
        drop(inner);
        self.proxy_event.notify_waiters();
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `Distribution` service.
#[derive(Debug, Clone)]
pub struct DistributionService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl Distribution for DistributionService {
    type SubscribeStream = Boxed<v1::Snapshot>;
    type FetchModuleStream = Boxed<v1::ModuleChunk>;

    async fn subscribe(
        &self,
        req: Request<Streaming<v1::ProxyMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let cp = self.0.clone();
        check_token(&cp.token, &req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(v1::ProxyMessage {
            kind: Some(v1::proxy_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("hello.node_id must not be empty"));
        }
        let node = hello.node_id.clone();
        let labels: BTreeMap<String, String> = hello.labels.into_iter().collect();
        let stream_id = {
            let mut inner = cp.lock();
            inner.next_stream += 1;
            let id = inner.next_stream;
            let prev = inner.proxies.get(&node).cloned();
            inner.proxies.insert(
                node.clone(),
                ProxyState {
                    labels: labels.clone(),
                    connected: true,
                    stream: id,
                    applied: hello.applied_version,
                    sent: hello.applied_version,
                    nacked: prev.as_ref().map_or(0, |p| p.nacked),
                    reason: prev.map(|p| p.reason).unwrap_or_default(),
                    since: Instant::now(),
                },
            );
            id
        };
        cp.proxy_event.notify_waiters();
        cp.metrics.connected.inc();
        tracing::info!(node = %node, ?labels, applied = hello.applied_version, "proxy connected");

        let (tx, rx) = mpsc::channel::<Result<v1::Snapshot, Status>>(4);
        let mut versions = cp.version.subscribe();
        tokio::spawn(async move {
            let mut sent = hello.applied_version;
            loop {
                let current = *versions.borrow_and_update();
                if current != sent {
                    let snapshot = {
                        let inner = cp.lock();
                        let state = inner.store.current().state.clone();
                        drop(inner);
                        cp.snapshot_for(&state, current, &labels)
                    };
                    let bytes = snapshot.config_json.len() as u64;
                    if tx.send(Ok(snapshot)).await.is_err() {
                        break;
                    }
                    cp.metrics.sent_bytes.inc_by(bytes);
                    sent = current;
                    cp.update(&node, stream_id, |p| p.sent = current);
                }
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { break },
                    msg = inbound.message() => match msg {
                        Ok(Some(v1::ProxyMessage { kind: Some(v1::proxy_message::Kind::Ack(a)) })) => {
                            let created = cp.lock().store.get(a.version).map(|v| v.at_ms);
                            if let Some(at) = created {
                                let now = std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_millis() as u64);
                                cp.metrics
                                    .push_latency
                                    .observe(now.saturating_sub(at) as f64 / 1000.0);
                            }
                            cp.update(&node, stream_id, |p| p.applied = a.version);
                        }
                        Ok(Some(v1::ProxyMessage { kind: Some(v1::proxy_message::Kind::Nack(n)) })) => {
                            tracing::warn!(node = %node, version = n.version, reason = %n.reason, "proxy refused a version");
                            let at = n
                                .reason
                                .split(':')
                                .next()
                                .filter(|s| s.len() < 80 && !s.contains(' '))
                                .unwrap_or("other")
                                .to_owned();
                            cp.metrics.nacks.get_or_create(&ReasonLabels { reason: at }).inc();
                            cp.update(&node, stream_id, |p| {
                                p.nacked = n.version;
                                p.reason = n.reason.clone();
                            });
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            cp.update(&node, stream_id, |p| p.connected = false);
            cp.metrics.connected.dec();
            tracing::info!(node = %node, "proxy disconnected");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_module(
        &self,
        req: Request<v1::ModuleRequest>,
    ) -> Result<Response<Self::FetchModuleStream>, Status> {
        check_token(&self.0.token, &req)?;
        let d = req.into_inner().digest;
        let bytes = self
            .0
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&d)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no module {d}")))?;
        self.0.metrics.sent_bytes.inc_by(bytes.len() as u64);
        let chunks: Vec<Result<v1::ModuleChunk, Status>> = bytes
            .chunks(weft_wire::MODULE_CHUNK)
            .map(|c| Ok(v1::ModuleChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// The `Control` service.
#[derive(Debug, Clone)]
pub struct ControlService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl Control for ControlService {
    type RolloutStream = Boxed<v1::RolloutProgress>;

    async fn apply(
        &self,
        req: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ChangeResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let docs = parse_documents(&req.into_inner().yaml)
            .map_err(|e| Status::invalid_argument(e.join("\n")))?;
        if docs.is_empty() {
            return Err(Status::invalid_argument("no resource in the documents"));
        }
        let cp = self.0.clone();
        let r = tokio::task::spawn_blocking(move || {
            cp.change(|current| {
                let mut state = current.clone();
                let mut names = Vec::new();
                for r in docs {
                    names.push(format!("{}/{}", r.spec.kind().as_str(), r.spec.name()));
                    state.insert(r.key(), r);
                }
                Ok((state, format!("apply {}", names.join(", "))))
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(r))
    }

    async fn delete(
        &self,
        req: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::ChangeResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let d = req.into_inner();
        let kind = Kind::parse(&d.kind)
            .ok_or_else(|| Status::invalid_argument(format!("unknown kind {:?}", d.kind)))?;
        let cp = self.0.clone();
        let r = tokio::task::spawn_blocking(move || {
            cp.change(|current| {
                let mut state = current.clone();
                if state.remove(&(kind, d.name.clone())).is_none() {
                    return Err(Status::not_found(format!(
                        "no {}/{}",
                        kind.as_str(),
                        d.name
                    )));
                }
                Ok((state, format!("delete {}/{}", kind.as_str(), d.name)))
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(r))
    }

    async fn get(&self, req: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let g = req.into_inner();
        let kind =
            if g.kind.is_empty() {
                None
            } else {
                Some(Kind::parse(&g.kind).ok_or_else(|| {
                    Status::invalid_argument(format!("unknown kind {:?}", g.kind))
                })?)
            };
        let inner = self.0.lock();
        let current = inner.store.current();
        let docs: Vec<String> = current
            .state
            .values()
            .filter(|r| kind.is_none_or(|k| r.spec.kind() == k))
            .filter(|r| g.name.is_empty() || r.spec.name() == g.name)
            .map(Resource::to_yaml)
            .collect();
        Ok(Response::new(v1::GetResponse {
            version: current.number,
            yaml: docs.join("---\n"),
        }))
    }

    async fn upload_module(
        &self,
        req: Request<v1::UploadModuleRequest>,
    ) -> Result<Response<v1::UploadModuleResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let bytes = req.into_inner().module;
        let d = digest(&bytes);
        let size = bytes.len() as u64;
        let name = d.clone();
        let checked = bytes.clone();
        tokio::task::spawn_blocking(move || weft_proxy::wasm::module::load(&name, &checked))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("the module is refused: {e}")))?;
        if let Some(dir) = &self.0.modules_dir {
            let path = dir.join(format!("{}.wasm", &d["sha256:".len()..]));
            if !path.exists() {
                write_atomically(&path, &bytes).map_err(|e| Status::internal(e.to_string()))?;
            }
        }
        self.0
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.clone(), Arc::new(bytes));
        Ok(Response::new(v1::UploadModuleResponse { digest: d, size }))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let (version, proxies) = self.0.statuses();
        Ok(Response::new(v1::StatusResponse { version, proxies }))
    }

    async fn rollout(
        &self,
        req: Request<v1::RolloutRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        check_token(&self.0.token, &req)?;
        let r = req.into_inner();
        let timeout = match r.timeout_ms {
            0 => Duration::from_secs(30),
            ms => Duration::from_millis(ms),
        };
        let cp = self.0.clone();
        // Progress is timed from the version's creation.
        let created_ms = cp.lock().store.get(r.version).map(|v| v.at_ms);
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let started = Instant::now();
            let since = move || match created_ms {
                Some(at) => now_ms().saturating_sub(at),
                None => started.elapsed().as_millis() as u64,
            };
            loop {
                let notified = cp.proxy_event.notified();
                let (_, all) = cp.statuses();
                let selected: Vec<_> = all.into_iter().filter(|p| p.connected).collect();
                let acked = selected
                    .iter()
                    .filter(|p| p.applied_version >= r.version)
                    .count();
                let nacked = selected
                    .iter()
                    .filter(|p| p.nacked_version == r.version && p.applied_version < r.version)
                    .count();
                let done = acked + nacked == selected.len() || started.elapsed() >= timeout;
                let progress = v1::RolloutProgress {
                    version: r.version,
                    selected: selected.len() as u32,
                    acked: acked as u32,
                    nacked: nacked as u32,
                    proxies: selected,
                    done,
                    elapsed_ms: since(),
                };
                if tx.send(Ok(progress)).await.is_err() || done {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn history(
        &self,
        req: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let inner = self.0.lock();
        let entries = inner
            .store
            .history()
            .iter()
            .map(|v| v1::HistoryEntry {
                version: v.number,
                at_ms: v.at_ms,
                change: v.change.clone(),
            })
            .collect();
        Ok(Response::new(v1::HistoryResponse { entries }))
    }

    async fn rollback(
        &self,
        req: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::ChangeResponse>, Status> {
        check_token(&self.0.token, &req)?;
        let to = req.into_inner().version;
        let state = self
            .0
            .lock()
            .store
            .get(to)
            .map(|v| (*v.state).clone())
            .ok_or_else(|| Status::not_found(format!("no version {to} in the history")))?;
        let cp = self.0.clone();
        let r = tokio::task::spawn_blocking(move || {
            cp.change(|_| Ok((state, format!("rollback to {to}"))))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(r))
    }
}
