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

use crate::ca::Ca;
use crate::link::LinkPeer;
use crate::registry::Registry;

mod replica;
mod rollouts;
use crate::resources::{Kind, Resource, assemble, parse_documents};
use crate::store::{State, Store, digest, write_atomically};
use replica::store_status;
pub use replica::{IDENTITY, spawn_follower, spawn_identity_follower, spawn_peers};
pub use rollouts::spawn_driver as spawn_rollout_driver;

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
    /// Module digests the proxy's snapshots named: the only ones it may fetch (TLS link).
    modules: std::collections::HashSet<String>,
    /// The trust bundle generation it acknowledged.
    pub bundle_generation: u64,
}

/// The mesh's identity side: the CA, the registry, and whether the control link is TLS.
pub struct Security {
    pub ca: Arc<Ca>,
    pub registry: Mutex<Registry>,
    /// Lifetime of the certificates issued to proxies.
    pub lifetime: Duration,
    /// `false` (`--insecure-plaintext`): proxies say who they are and authenticate, if at
    /// all, with the token; no enrollment.
    pub tls: bool,
    /// Keys filter modules must be signed by (`--module-trust`); empty: not required.
    pub module_keys: Vec<weft_proxy::wasm::signing::PublicKey>,
}

impl Security {
    /// In memory, plaintext: in-process tests and benchmarks.
    pub fn insecure_in_memory() -> Result<Security, String> {
        Ok(Security {
            ca: Arc::new(Ca::open("cluster.local", None)?),
            registry: Mutex::new(Registry::open(None)?),
            lifetime: crate::ca::DEFAULT_LIFETIME,
            tls: false,
            module_keys: Vec::new(),
        })
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Who is calling, from the link's certificate or the token.
#[derive(Debug, Clone)]
enum Caller {
    /// An operator: an admin certificate, or the token.
    Operator,
    /// An enrolled proxy, by its certificate.
    Proxy {
        node: String,
        id: String,
        labels: BTreeMap<String, String>,
    },
    /// A certificate the registry does not know (removed node, unknown kind of identity).
    Unknown,
    Nobody,
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
    /// 1 while the store (etcd) answers; always 1 for the file store.
    store_up: prometheus_client::metrics::gauge::Gauge,
    /// Snapshots sent as changes only.
    incremental: prometheus_client::metrics::counter::Counter,
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
            store_up: Default::default(),
            incremental: Default::default(),
            registry: Mutex::default(),
        };
        m.store_up.set(1);
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
        registry.register(
            "incremental_pushes",
            "Snapshots sent as what changed since the version the proxy holds",
            m.incremental.clone(),
        );
        registry.register(
            "store_up",
            "1 while the store (etcd) answers and changes are taken",
            m.store_up.clone(),
        );
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

/// How long a disconnected proxy's labels count in validation, unless set otherwise.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(600);

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
    pub security: Security,
    /// Validation builds `tls: mesh` settings with a stand-in identity.
    placeholder: Option<Arc<weft_proxy::identity::Identity>>,
    /// The trust bundle's generation, for the subscription tasks.
    trust: watch::Sender<u64>,
    /// The CA changed (a rotation moved on): the control plane's own certificate follows.
    pub ca_changed: Notify,
    /// Counts registration removals: subscriptions of removed nodes end.
    removals: watch::Sender<u64>,
    /// When each node last renewed: a node renews at most once per [`MIN_RENEWAL_GAP`].
    renewed: Mutex<HashMap<String, Instant>>,
    /// Certificates issued (`kind`: enroll, renew) and requests refused (`reason`).
    issued: prometheus_client::metrics::family::Family<
        KindLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    csr_failures: prometheus_client::metrics::family::Family<
        ReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// When each node's certificate expires (Unix seconds).
    expiry: prometheus_client::metrics::family::Family<
        NodeLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    /// What proxies last reported of their filters, and where each rollout's step began.
    rollout_figures: Mutex<rollouts::Reports>,
    /// How long a disconnected proxy's labels still count in validation (milliseconds).
    forget_after_ms: std::sync::atomic::AtomicU64,
    /// Snapshots of one version by (base version, labels).
    push_cache: Mutex<PushCache>,
    /// This replica's id among replicas (random at start).
    replica_id: String,
    /// The proxies other replicas publish, by etcd key.
    peers: Mutex<HashMap<Vec<u8>, Vec<replica::PeerProxy>>>,
    /// Counts changes of this replica's proxies (what it publishes).
    status_generation: std::sync::atomic::AtomicU64,
    /// The rollout cohorts other replicas publish (their proxies' figures), by etcd key.
    peer_cohorts: Mutex<HashMap<Vec<u8>, BTreeMap<String, rollouts::StepCohorts>>>,
}

type PushCache = (
    u64,
    HashMap<(u64, BTreeMap<String, String>), Arc<v1::Snapshot>>,
);

/// Snapshots kept per version (label sets × base versions).
const PUSH_CACHE: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlPlane")
    }
}

/// Whether `req` carries the operator token (`None`: no token is configured).
fn token_matches<T>(token: &Option<String>, req: &Request<T>) -> Option<bool> {
    let want = token.as_ref()?;
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
    Some(ok)
}

impl ControlPlane {
    /// A plaintext control plane with an in-memory CA (in-process tests, benchmarks).
    pub fn new(store: Store, token: Option<String>) -> Result<Arc<ControlPlane>, String> {
        ControlPlane::with_security(store, token, Security::insecure_in_memory()?)
    }

    pub fn with_security(
        store: Store,
        token: Option<String>,
        security: Security,
    ) -> Result<Arc<ControlPlane>, String> {
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
        let issued = prometheus_client::metrics::family::Family::default();
        let csr_failures = prometheus_client::metrics::family::Family::default();
        let expiry = prometheus_client::metrics::family::Family::default();
        {
            let mut r = metrics.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "certificates_issued",
                "Certificates issued to proxies, by kind (enroll, renew)",
                issued.clone(),
            );
            r.register(
                "csr_failures",
                "Enrollments and renewals refused, by reason",
                csr_failures.clone(),
            );
            r.register(
                "certificate_expiry_timestamp_seconds",
                "When each node's last issued certificate expires (Unix time)",
                expiry.clone(),
            );
        }
        let generation = security.ca.bundle().0;
        let placeholder =
            weft_proxy::identity::svid::placeholder_trusting(security.module_keys.clone()).ok();
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
            security,
            placeholder,
            trust: watch::channel(generation).0,
            ca_changed: Notify::new(),
            removals: watch::channel(0).0,
            renewed: Mutex::default(),
            issued,
            csr_failures,
            expiry,
            rollout_figures: Mutex::default(),
            forget_after_ms: std::sync::atomic::AtomicU64::new(
                DEFAULT_FORGET_AFTER.as_millis() as u64
            ),
            push_cache: Mutex::new((0, HashMap::new())),
            replica_id: format!("{:016x}", fastrand::u64(..)),
            peers: Mutex::default(),
            status_generation: std::sync::atomic::AtomicU64::new(0),
            peer_cohorts: Mutex::default(),
        }))
    }

    /// How long a disconnected proxy's labels still count when changes are validated (a
    /// proxy restarting comes back within it; one gone for good stops holding changes back).
    pub fn set_forget_after(&self, d: Duration) {
        self.forget_after_ms.store(
            d.as_millis().min(u128::from(u64::MAX)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Who is calling.
    fn caller<T>(&self, req: &Request<T>) -> Caller {
        let peer = req.extensions().get::<LinkPeer>();
        if let Some(LinkPeer {
            tls: true,
            id: Some(id),
            common_name,
            ..
        }) = peer
        {
            if id.trust_domain() != self.security.ca.trust_domain() {
                return Caller::Unknown;
            }
            if id.path().starts_with(weft_proxy::identity::ADMIN_PATH) {
                return Caller::Operator;
            }
            let registry = self.security.registry();
            return match common_name.as_deref().and_then(|n| registry.node(n)) {
                Some(node) if node.identity == id.to_string() => Caller::Proxy {
                    node: node.id.clone(),
                    id: node.identity.clone(),
                    labels: node.labels.clone(),
                },
                _ => Caller::Unknown,
            };
        }
        match token_matches(&self.token, req) {
            Some(true) => Caller::Operator,
            // Plaintext without a token: every caller is trusted (loopback development).
            None if !self.security.tls => Caller::Operator,
            _ => Caller::Nobody,
        }
    }

    /// Operators only: a proxy's certificate is refused, nothing changes.
    fn operator<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.caller(req) {
            Caller::Operator => Ok(()),
            Caller::Proxy { node, .. } => Err(Status::permission_denied(format!(
                "node {node} is a proxy: proxies may only subscribe and fetch their modules"
            ))),
            Caller::Unknown => Err(Status::permission_denied(
                "the certificate names no registered node or operator",
            )),
            Caller::Nobody => Err(Status::unauthenticated(
                "an operator certificate or a valid `authorization: Bearer <token>` is required",
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot of `version` for proxy `node` with `labels`.
    fn snapshot_for(
        &self,
        at: &crate::store::Version,
        node: &str,
        labels: &BTreeMap<String, String>,
    ) -> v1::Snapshot {
        let mut config = assemble(at.state.values(), labels);
        crate::rollout::apply(&mut config, &at.rollouts, node);
        let reporting = at.rollouts.values().any(|r| r.phase.active());
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let digests: std::collections::BTreeSet<&str> = config
            .module_uses()
            .filter(|u| u.module.starts_with("sha256:"))
            .map(|u| u.module)
            .collect();
        let refs = digests
            .into_iter()
            .map(|d| v1::ModuleRef {
                size: modules.get(d).map_or(0, |b| b.len() as u64),
                digest: d.to_owned(),
            })
            .collect();
        v1::Snapshot {
            version: at.number,
            // Canonical JSON: a proxy building it back from an incremental snapshot makes
            // the same bytes.
            config_json: weft_proxy::control::delta::canonical(&config),
            modules: refs,
            report_interval_ms: if reporting {
                rollouts::REPORT_INTERVAL_MS
            } else {
                0
            },
            ..Default::default()
        }
    }

    /// The snapshot of `at` for `node`: only what changed since version `base` when the proxy
    /// holds it, it is still in the history, and the changes weigh less than the whole.
    fn push_for(
        &self,
        at: &crate::store::Version,
        node: &str,
        labels: &BTreeMap<String, String>,
        base: Option<u64>,
    ) -> v1::Snapshot {
        // Without a rollout running, what a proxy gets depends on its labels alone: proxies
        // with the same labels share one snapshot, built once per version.
        if at.rollouts.values().any(|r| r.phase.active()) {
            return self.build_push(at, node, labels, base);
        }
        let key = (base.unwrap_or(0), labels.clone());
        let mut cache = self.push_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != at.number {
            *cache = (at.number, HashMap::new());
        }
        if let Some(s) = cache.1.get(&key) {
            return (**s).clone();
        }
        drop(cache);
        let built = Arc::new(self.build_push(at, node, labels, base));
        let mut cache = self.push_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 == at.number && cache.1.len() < PUSH_CACHE {
            cache.1.insert(key, built.clone());
        }
        (*built).clone()
    }

    fn build_push(
        &self,
        at: &crate::store::Version,
        node: &str,
        labels: &BTreeMap<String, String>,
        base: Option<u64>,
    ) -> v1::Snapshot {
        use weft_proxy::control::delta;
        let full = self.snapshot_for(at, node, labels);
        let Some(b) = base.filter(|b| *b != at.number) else {
            return full;
        };
        let Some(old) = self.lock().store.get(b).cloned() else {
            return full;
        };
        let old = self.snapshot_for(&old, node, labels);
        let Some((changes, orders)) = delta::diff(&old.config_json, &full.config_json) else {
            return full;
        };
        if delta::size(&changes, &orders) >= full.config_json.len() {
            return full;
        }
        v1::Snapshot {
            config_digest: weft_proxy::control::config_digest(&full.config_json),
            config_json: Vec::new(),
            base_version: b,
            changes,
            orders,
            ..full
        }
    }

    /// Validates `state` for every proxy it could reach: each known proxy's labels, each
    /// resource's selector, and a proxy without labels.
    fn validate(&self, state: &State) -> Result<(), Vec<String>> {
        let mut label_sets: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        // Proxies gone longer than `forget_after` no longer hold their label sets.
        let forget = Duration::from_millis(
            self.forget_after_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        for p in self.lock().proxies.values() {
            if p.connected || p.since.elapsed() < forget {
                label_sets.push(p.labels.clone());
            }
        }
        label_sets.extend(self.peer_proxies().into_iter().map(|p| p.labels));
        for r in state.values() {
            label_sets.push(r.selector.clone());
        }
        label_sets.sort();
        label_sets.dedup();
        let mut errors = Vec::new();
        for r in state.values() {
            let (kind, name, module) = match &r.spec {
                crate::resources::Spec::Filter(f) => ("filter", &f.name, &f.module),
                crate::resources::Spec::Service(s) => ("service", &s.name, &s.module),
                _ => continue,
            };
            if !module.starts_with("sha256:") {
                errors.push(format!(
                    "{kind}/{name}: module must be a digest (sha256:…) of an uploaded module; `weftctl {kind} push` uploads it"
                ));
            }
        }
        let metrics = weft_proxy::metrics::Metrics::new();
        let wasm = weft_proxy::wasm::WasmShared::new(Arc::new(weft_proxy::metrics::Metrics::new()));
        for labels in &label_sets {
            let sidecars = crate::resources::sidecars(state.values(), labels);
            if sidecars.len() > 1 {
                errors.push(format!(
                    "sidecar/{} and sidecar/{} both select proxies labelled {}: one sidecar per proxy",
                    sidecars[0],
                    sidecars[1],
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ));
                continue;
            }
            let config: Config = assemble(state.values(), labels);
            let env = weft_proxy::snapshot::BuildEnv {
                metrics: &metrics,
                wasm: &wasm,
                base_dir: std::path::Path::new("/nonexistent"),
                identity: self.placeholder.as_ref(),
                // Names only the proxies can resolve are valid.
                names: weft_proxy::upstream::Names::CheckOnly,
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
        edit: impl Fn(&State) -> Result<(State, String), Status>,
    ) -> Result<v1::ChangeResponse, Status> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.retrying(|| self.change_once(&edit))
    }

    fn change_once(
        &self,
        edit: &impl Fn(&State) -> Result<(State, String), Status>,
    ) -> Result<v1::ChangeResponse, Status> {
        let at = self.lock().store.current().clone();
        let (state, what) = edit(&at.state)?;
        // A filter being rolled out changes through its rollout only.
        for (name, r) in at.rollouts.iter().filter(|(_, r)| r.phase.active()) {
            let key = (Kind::Filter, name.clone());
            if state.get(&key) != at.state.get(&key) {
                return Err(Status::failed_precondition(format!(
                    "filter/{name} is being rolled out (step {} of {}, {}): it changes through \
                     its rollout; abort it first (weftctl filter rollout {name} --abort)",
                    r.step + 1,
                    r.plan.steps.len(),
                    r.phase.as_str()
                )));
            }
        }
        if let Some(etcd) = self.lock().store.etcd() {
            // A version of another replica's (a rollback) may name modules not loaded here.
            etcd.block(self.ensure_modules(&etcd, &replica::state_digests(&state)))?;
        }
        self.validate(&state)
            .map_err(|e| Status::invalid_argument(e.join("\n")))?;
        self.commit(at.number, state, (*at.rollouts).clone(), what)
    }

    /// Stores `state` and `rollouts` as a new version (unless nothing changed) and pushes it.
    /// The caller holds `changing`, has validated `state`, and derived it from version `base`.
    fn commit(
        &self,
        base: u64,
        state: State,
        rollouts: crate::rollout::Rollouts,
        what: String,
    ) -> Result<v1::ChangeResponse, Status> {
        let mut inner = self.lock();
        let version = if let Some(etcd) = inner.store.etcd() {
            // Derived from a version another replica's has replaced since: derive it again.
            if inner.store.current().number != base {
                return Err(store_status(crate::store::StoreError::Conflict));
            }
            // The write to etcd happens without the lock: subscriptions keep being served.
            let prepared = inner
                .store
                .prepare_remote(state, rollouts, what)
                .map_err(store_status)?;
            drop(inner);
            let stored = match prepared {
                None => None,
                Some(p) => {
                    let revision = etcd
                        .block(crate::store::Store::write_remote(&etcd, &p))
                        .map_err(store_status)?;
                    Some((p.version, revision))
                }
            };
            inner = self.lock();
            stored.map(|(v, revision)| {
                let n = v.number;
                inner.store.catch_up(vec![v], revision);
                n
            })
        } else {
            inner
                .store
                .commit_with(state, rollouts, what)
                .map_err(|e| Status::internal(e.to_string()))?
        };
        let selected = inner.proxies.values().filter(|p| p.connected).count() as u32;
        drop(inner);
        let selected = selected + self.peer_proxies().len() as u32;
        let inner = self.lock();
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

    fn trust_push(&self, node: &str) -> v1::Push {
        v1::Push {
            kind: Some(v1::push::Kind::Trust(self.trust_bundle(Some(node)))),
        }
    }

    /// The trust bundle; `renew` is set for a node whose certificate is not from the issuing
    /// root while a rotation reissues.
    fn trust_bundle(&self, node: Option<&str>) -> v1::TrustBundle {
        let (generation, roots) = self.security.ca.bundle();
        let status = self.security.ca.status();
        let renew = node.is_some_and(|n| {
            status.phase == crate::ca::Phase::Reissuing
                && self
                    .security
                    .registry()
                    .node(n)
                    .is_some_and(|x| x.root != status.issuing)
        });
        v1::TrustBundle {
            generation,
            roots,
            renew,
        }
    }

    fn statuses(&self) -> (u64, Vec<v1::ProxyStatus>) {
        let certs: HashMap<String, (String, i64)> = self
            .security
            .registry()
            .nodes()
            .map(|n| (n.id.clone(), (n.identity.clone(), n.not_after)))
            .collect();
        let inner = self.lock();
        let list = inner
            .proxies
            .iter()
            .map(|(id, p)| v1::ProxyStatus {
                spiffe_id: certs.get(id).map(|c| c.0.clone()).unwrap_or_default(),
                certificate_not_after: certs.get(id).map_or(0, |c| c.1),
                bundle_generation: p.bundle_generation,
                node_id: id.clone(),
                labels: p.labels.clone().into_iter().collect(),
                connected: p.connected,
                applied_version: p.applied,
                sent_version: p.sent,
                nacked_version: p.nacked,
                nack_reason: p.reason.clone(),
                since_ms: p.since.elapsed().as_millis() as u64,
                replica: String::new(),
            })
            .collect::<Vec<_>>();
        let version = inner.store.current().number;
        drop(inner);
        let mut list = list;
        for p in self.peer_proxies() {
            list.push(v1::ProxyStatus {
                spiffe_id: certs.get(&p.node).map(|c| c.0.clone()).unwrap_or_default(),
                certificate_not_after: certs.get(&p.node).map_or(0, |c| c.1),
                bundle_generation: p.bundle_generation,
                labels: p.labels.into_iter().collect(),
                connected: true,
                applied_version: p.applied,
                sent_version: p.sent,
                nacked_version: p.nacked,
                nack_reason: p.reason,
                since_ms: 0,
                replica: p.replica,
                node_id: p.node,
            });
        }
        (version, list)
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
        self.proxies_changed();
        self.proxy_event.notify_waiters();
    }
}

/// A snapshot as pushes: itself with the first [`weft_wire::CONFIG_PART`] bytes of its
/// configuration, then the rest in parts.
fn in_parts(mut snapshot: v1::Snapshot) -> Vec<v1::Push> {
    let part = weft_wire::CONFIG_PART;
    if snapshot.config_json.len() <= part {
        return vec![v1::Push {
            kind: Some(v1::push::Kind::Snapshot(snapshot)),
        }];
    }
    let rest = snapshot.config_json.split_off(part);
    let parts: Vec<v1::Push> = rest
        .chunks(part)
        .map(|c| v1::Push {
            kind: Some(v1::push::Kind::Part(v1::ConfigPart { data: c.to_vec() })),
        })
        .collect();
    snapshot.parts = parts.len() as u32;
    let mut out = Vec::with_capacity(parts.len() + 1);
    out.push(v1::Push {
        kind: Some(v1::push::Kind::Snapshot(snapshot)),
    });
    out.extend(parts);
    out
}

/// A duration given in milliseconds on the wire, `0` meaning `default`.
fn millis_or(ms: u64, default: Duration) -> Duration {
    match ms {
        0 => default,
        ms => Duration::from_millis(ms),
    }
}

/// A node may renew at most this often (a proxy renews at half its certificate's life; one
/// that asks in a loop is refused instead of making the store write for each request).
const MIN_RENEWAL_GAP: Duration = Duration::from_millis(500);

/// Whether `node` is an enrolled node of the registry (a stream on the TLS link).
fn registered_node(cp: &ControlPlane, node: &str) -> bool {
    cp.security.tls && cp.security.registry().node(node).is_some()
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `Distribution` service.
#[derive(Debug, Clone)]
pub struct DistributionService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl Distribution for DistributionService {
    type SubscribeStream = Boxed<v1::Push>;
    type FetchModuleStream = Boxed<v1::ModuleChunk>;

    async fn subscribe(
        &self,
        req: Request<Streaming<v1::ProxyMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let cp = self.0.clone();
        // On the TLS link the certificate says who the proxy is; what it says in its hello
        // cannot widen what it receives.
        let registered = match cp.caller(&req) {
            Caller::Proxy { node, id, labels } => Some((node, id, labels)),
            Caller::Operator if !cp.security.tls => None,
            Caller::Operator => {
                return Err(Status::permission_denied(
                    "subscribing needs a proxy's certificate (an enrolled node)",
                ));
            }
            Caller::Unknown => {
                return Err(Status::permission_denied(
                    "the certificate names no registered node",
                ));
            }
            Caller::Nobody => {
                return Err(Status::unauthenticated(
                    "a proxy certificate (or, on the plaintext link, the token) is required",
                ));
            }
        };
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
        let claimed: BTreeMap<String, String> = hello.labels.into_iter().collect();
        let (node, labels) = match registered {
            Some((node, id, labels)) => {
                if (!hello.node_id.is_empty() && hello.node_id != node) || claimed != labels {
                    tracing::info!(node = %node, identity = %id, claimed_node = %hello.node_id, ?claimed,
                        "the proxy's hello claims another node id or labels: its registration decides");
                }
                (node, labels)
            }
            None => {
                if hello.node_id.is_empty() {
                    return Err(Status::invalid_argument("hello.node_id must not be empty"));
                }
                (hello.node_id.clone(), claimed)
            }
        };
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
                    reason: prev.as_ref().map(|p| p.reason.clone()).unwrap_or_default(),
                    since: Instant::now(),
                    modules: prev.map(|p| p.modules).unwrap_or_default(),
                    bundle_generation: hello.bundle_generation,
                },
            );
            id
        };
        cp.proxies_changed();
        cp.proxy_event.notify_waiters();
        cp.metrics.connected.inc();
        tracing::info!(node = %node, ?labels, applied = hello.applied_version, "proxy connected");

        let (tx, rx) = mpsc::channel::<Result<v1::Push, Status>>(4);
        let mut versions = cp.version.subscribe();
        let mut trust = cp.trust.subscribe();
        let mut removals = cp.removals.subscribe();
        let registered = registered_node(&cp, &node);
        let tls = cp.security.tls;
        // A proxy that serves the current version, but not what it would be sent now (it
        // restarted with other labels), gets the version again.
        let stale = !hello.applied_digest.is_empty() && {
            let at = cp.lock().store.current().clone();
            at.number == hello.applied_version
                && weft_proxy::control::config_digest(
                    &cp.push_for(&at, &node, &labels, None).config_json,
                ) != hello.applied_digest
        };
        // The version whose configuration the proxy holds as sent: changes are sent on it.
        let mut base =
            (hello.delta_base != 0 && hello.delta_base == hello.applied_version && !stale)
                .then_some(hello.applied_version);
        tokio::spawn(async move {
            let mut sent = if stale { 0 } else { hello.applied_version };
            let mut sent_trust = hello.bundle_generation;
            loop {
                let generation = *trust.borrow_and_update();
                if tls && generation != sent_trust {
                    let push = cp.trust_push(&node);
                    if tx.send(Ok(push)).await.is_err() {
                        break;
                    }
                    sent_trust = generation;
                }
                let current = *versions.borrow_and_update();
                if current != sent {
                    let snapshot = {
                        let at = cp.lock().store.current().clone();
                        cp.push_for(&at, &node, &labels, base)
                    };
                    // The store may have moved past the version that woke us: that is sent.
                    let current = snapshot.version;
                    let bytes = (snapshot.config_json.len()
                        + weft_proxy::control::delta::size(&snapshot.changes, &snapshot.orders))
                        as u64;
                    if snapshot.base_version != 0 {
                        cp.metrics.incremental.inc();
                    }
                    let digests: Vec<String> =
                        snapshot.modules.iter().map(|m| m.digest.clone()).collect();
                    cp.update(&node, stream_id, |p| p.modules.extend(digests));
                    let mut sending = true;
                    for push in in_parts(snapshot) {
                        if tx.send(Ok(push)).await.is_err() {
                            sending = false;
                            break;
                        }
                    }
                    if !sending {
                        break;
                    }
                    cp.metrics.sent_bytes.inc_by(bytes);
                    sent = current;
                    cp.update(&node, stream_id, |p| p.sent = current);
                }
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { break },
                    changed = trust.changed() => if changed.is_err() { break },
                    changed = removals.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        // A removed node's stream ends: its certificate no longer counts.
                        if registered && !registered_node(&cp, &node) {
                            tracing::info!(node = %node, "node removed: its stream is closed");
                            let _ = tx.send(Err(Status::permission_denied("the node was removed"))).await;
                            break;
                        }
                    }
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
                            base = Some(a.version);
                        }
                        Ok(Some(v1::ProxyMessage { kind: Some(v1::proxy_message::Kind::Nack(n)) })) if n.reason.starts_with("delta:") => {
                            // It could not build the configuration from the changes: it gets
                            // the whole configuration.
                            tracing::info!(node = %node, version = n.version, reason = %n.reason, "sending the whole configuration");
                            base = None;
                            sent = 0;
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
                        Ok(Some(v1::ProxyMessage { kind: Some(v1::proxy_message::Kind::Report(r)) })) => {
                            cp.record_figures(&node, r);
                        }
                        Ok(Some(v1::ProxyMessage { kind: Some(v1::proxy_message::Kind::TrustAck(t)) })) => {
                            // A proxy cannot claim a bundle newer than exists (it would move
                            // a rotation on without holding the new root).
                            let held = t.generation.min(cp.security.ca.bundle().0);
                            cp.update(&node, stream_id, |p| p.bundle_generation = held);
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
        let d = req.get_ref().digest.clone();
        match self.0.caller(&req) {
            Caller::Operator => {}
            Caller::Proxy { node, .. } => {
                let sent = self
                    .0
                    .lock()
                    .proxies
                    .get(&node)
                    .is_some_and(|p| p.modules.contains(&d));
                if !sent {
                    return Err(Status::permission_denied(format!(
                        "module {d} was never sent to node {node}"
                    )));
                }
            }
            Caller::Unknown => {
                return Err(Status::permission_denied(
                    "the certificate names no registered node",
                ));
            }
            Caller::Nobody => {
                return Err(Status::unauthenticated(
                    "a proxy certificate (or, on the plaintext link, the token) is required",
                ));
            }
        }
        let mut bytes = self.0.module(&d);
        let etcd = self.0.lock().store.etcd();
        if let (None, Some(etcd)) = (&bytes, etcd) {
            self.0
                .ensure_modules(&etcd, std::slice::from_ref(&d))
                .await?;
            bytes = self.0.module(&d);
        }
        let bytes = bytes.ok_or_else(|| Status::not_found(format!("no module {d}")))?;
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
        self.0.operator(&req)?;
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
                for r in &docs {
                    names.push(format!("{}/{}", r.spec.kind().as_str(), r.spec.name()));
                    state.insert(r.key(), r.clone());
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
        self.0.operator(&req)?;
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
        self.0.operator(&req)?;
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
        self.0.operator(&req)?;
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
        let etcd = self.0.lock().store.etcd();
        if let Some(etcd) = etcd {
            // In etcd before it is used: every replica can load what a version names.
            replica::store_module(&etcd, &d, &bytes)
                .await
                .map_err(|e| store_status(e.into()))?;
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
        self.0.operator(&req)?;
        let (version, proxies) = self.0.statuses();
        Ok(Response::new(v1::StatusResponse { version, proxies }))
    }

    async fn rollout(
        &self,
        req: Request<v1::RolloutRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        self.0.operator(&req)?;
        let r = req.into_inner();
        let timeout = millis_or(r.timeout_ms, Duration::from_secs(30));
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

    async fn start_filter_rollout(
        &self,
        req: Request<v1::StartFilterRolloutRequest>,
    ) -> Result<Response<v1::FilterRolloutStatus>, Status> {
        self.0.operator(&req)?;
        rollouts::start(self.0.clone(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn change_filter_rollout(
        &self,
        req: Request<v1::ChangeFilterRolloutRequest>,
    ) -> Result<Response<v1::FilterRolloutStatus>, Status> {
        self.0.operator(&req)?;
        rollouts::change(self.0.clone(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_filter_rollout(
        &self,
        req: Request<v1::GetFilterRolloutRequest>,
    ) -> Result<Response<v1::FilterRolloutStatus>, Status> {
        self.0.operator(&req)?;
        rollouts::status(&self.0, &req.into_inner().name).map(Response::new)
    }

    async fn history(
        &self,
        req: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        self.0.operator(&req)?;
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
        self.0.operator(&req)?;
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
            cp.change(|_| Ok((state.clone(), format!("rollback to {to}"))))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(r))
    }

    async fn add_node(
        &self,
        req: Request<v1::AddNodeRequest>,
    ) -> Result<Response<v1::AddNodeResponse>, Status> {
        self.0.operator(&req)?;
        let r = req.into_inner();
        let ttl = millis_or(r.ttl_ms, Duration::from_secs(3600));
        let ca = &self.0.security.ca;
        let secret = self
            .0
            .security
            .registry()
            .add(
                &r.name,
                &r.namespace,
                &r.service_account,
                r.labels.into_iter().collect(),
                r.reusable,
                ttl,
                ca.trust_domain(),
            )
            .map_err(Status::invalid_argument)?;
        let token = crate::registry::JoinToken {
            registration: r.name.clone(),
            secret,
            pin: ca.serving_pin(),
        };
        let expires = self
            .0
            .security
            .registry()
            .registration(&r.name)
            .map_or(0, |g| g.expires_ms);
        let id = weft_proxy::identity::SpiffeId::workload(
            ca.trust_domain(),
            &r.namespace,
            &r.service_account,
        )
        .map_err(Status::invalid_argument)?;
        tracing::info!(registration = %r.name, identity = %id, reusable = r.reusable, "node registered");
        Ok(Response::new(v1::AddNodeResponse {
            token: token.to_string(),
            spiffe_id: id.to_string(),
            expires_at_ms: expires,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.0.operator(&req)?;
        let td = self.0.security.ca.trust_domain().to_owned();
        let registry = self.0.security.registry();
        let registrations = registry
            .registrations()
            .map(|r| v1::RegistrationInfo {
                name: r.name.clone(),
                spiffe_id: format!("spiffe://{td}/ns/{}/sa/{}", r.namespace, r.account),
                labels: r.labels.clone().into_iter().collect(),
                reusable: r.reusable,
                expires_at_ms: r.expires_ms,
                uses: r.uses,
            })
            .collect();
        let nodes = registry
            .nodes()
            .map(|n| v1::NodeInfo {
                node_id: n.id.clone(),
                registration: n.registration.clone(),
                spiffe_id: n.identity.clone(),
                labels: n.labels.clone().into_iter().collect(),
                certificate_not_after: n.not_after,
                root: n.root.clone(),
                renewals: n.renewals,
            })
            .collect();
        Ok(Response::new(v1::ListNodesResponse {
            registrations,
            nodes,
        }))
    }

    async fn remove_node(
        &self,
        req: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::RemoveNodeResponse>, Status> {
        self.0.operator(&req)?;
        let name = req.into_inner().name;
        let nodes = self
            .0
            .security
            .registry()
            .remove(&name)
            .map_err(Status::not_found)?;
        for n in &nodes {
            self.0.expiry.remove(&NodeLabels { node: n.clone() });
        }
        self.0.removals.send_modify(|n| *n += 1);
        tracing::info!(registration = %name, ?nodes, "registration removed");
        Ok(Response::new(v1::RemoveNodeResponse { nodes }))
    }

    async fn ca_status(
        &self,
        req: Request<v1::CaStatusRequest>,
    ) -> Result<Response<v1::CaStatusResponse>, Status> {
        self.0.operator(&req)?;
        Ok(Response::new(self.0.ca_status()))
    }

    async fn rotate_ca(
        &self,
        req: Request<v1::RotateCaRequest>,
    ) -> Result<Response<v1::CaStatusResponse>, Status> {
        self.0.operator(&req)?;
        self.0
            .security
            .ca
            .begin_rotation()
            .map_err(Status::failed_precondition)?;
        tracing::info!("root rotation started: the new root joins every trust bundle");
        self.0.trust_changed();
        Ok(Response::new(self.0.ca_status()))
    }
}

impl ControlPlane {
    fn csr_failure(&self, reason: &str) {
        self.csr_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Issues a certificate for `grant`'s node and records it.
    fn issue_for(
        &self,
        grant: &crate::registry::Grant,
        registration: &str,
        csr: &[u8],
        kind: &'static str,
    ) -> Result<v1::IssuedCertificate, Status> {
        let ca = &self.security.ca;
        let id = weft_proxy::identity::SpiffeId::workload(
            ca.trust_domain(),
            &grant.namespace,
            &grant.account,
        )
        .map_err(Status::internal)?;
        let issued = ca
            .issue(csr, &id, &grant.node, self.security.lifetime, &[])
            .map_err(|e| {
                self.csr_failure(e.reason());
                Status::invalid_argument(e.to_string())
            })?;
        self.security
            .registry()
            .record(grant, registration, &id.to_string(), &issued)
            .map_err(Status::internal)?;
        self.issued.get_or_create(&KindLabels { kind }).inc();
        self.expiry
            .get_or_create(&NodeLabels {
                node: grant.node.clone(),
            })
            .set(issued.not_after);
        tracing::info!(node = %grant.node, identity = %id, kind, not_after = issued.not_after, root = %issued.root, "certificate issued");
        Ok(v1::IssuedCertificate {
            chain: issued.chain,
            trust: Some(self.trust_bundle(None)),
            node_id: grant.node.clone(),
            labels: grant.labels.clone().into_iter().collect(),
            spiffe_id: id.to_string(),
            module_keys: self
                .security
                .module_keys
                .iter()
                .map(|k| k.to_string())
                .collect(),
        })
    }
}

/// The `Identity` service: enrollment by join token, renewal by certificate.
#[derive(Debug, Clone)]
pub struct IdentityService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl weft_wire::v1::identity_server::Identity for IdentityService {
    async fn enroll(
        &self,
        req: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::IssuedCertificate>, Status> {
        let cp = &self.0;
        if !cp.security.tls {
            return Err(Status::failed_precondition(
                "enrollment needs the TLS control link (weft-cp runs with --insecure-plaintext)",
            ));
        }
        let r = req.into_inner();
        let token = crate::registry::JoinToken::parse(&r.token).map_err(|e| {
            cp.csr_failure(e.reason());
            Status::invalid_argument(e.to_string())
        })?;
        // The request is checked before the token is spent: a bad request keeps the token.
        crate::ca::check_csr(&r.csr).map_err(|e| {
            cp.csr_failure(e.reason());
            Status::invalid_argument(e.to_string())
        })?;
        let grant = cp.security.registry().enroll(&token).map_err(|e| {
            cp.csr_failure(e.reason());
            tracing::warn!(registration = %token.registration, reason = e.reason(), "enrollment refused");
            match e {
                crate::registry::EnrollError::Store(_) => Status::unavailable(e.to_string()),
                _ => Status::permission_denied(e.to_string()),
            }
        })?;
        let issued = cp.issue_for(&grant, &token.registration, &r.csr, "enroll")?;
        Ok(Response::new(issued))
    }

    async fn renew(
        &self,
        req: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::IssuedCertificate>, Status> {
        let cp = &self.0;
        let node = match cp.caller(&req) {
            Caller::Proxy { node, .. } => node,
            Caller::Operator | Caller::Unknown => {
                cp.csr_failure("not_a_node");
                return Err(Status::permission_denied(
                    "renewal needs the certificate of an enrolled node",
                ));
            }
            Caller::Nobody => {
                cp.csr_failure("no_certificate");
                return Err(Status::unauthenticated(
                    "renewal needs the node's current certificate on the TLS link",
                ));
            }
        };
        {
            let mut renewed = cp.renewed.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if renewed
                .get(&node)
                .is_some_and(|t| now.duration_since(*t) < MIN_RENEWAL_GAP)
            {
                cp.csr_failure("too_often");
                return Err(Status::resource_exhausted(
                    "renewing again so soon: a certificate renews at half its life",
                ));
            }
            if renewed.len() > 100_000 {
                renewed.retain(|_, t| now.duration_since(*t) < MIN_RENEWAL_GAP);
            }
            renewed.insert(node.clone(), now);
        }
        let (grant, registration) = {
            let registry = cp.security.registry();
            let n = registry
                .node(&node)
                .ok_or_else(|| Status::permission_denied("the node was removed"))?;
            let reg = registry
                .registration(&n.registration)
                .ok_or_else(|| Status::permission_denied("the node's registration was removed"))?;
            (
                crate::registry::Grant {
                    node: node.clone(),
                    namespace: reg.namespace.clone(),
                    account: reg.account.clone(),
                    labels: n.labels.clone(),
                },
                n.registration.clone(),
            )
        };
        let csr = req.into_inner().csr;
        let issued = cp.issue_for(&grant, &registration, &csr, "renew")?;
        Ok(Response::new(issued))
    }
}

impl ControlPlane {
    /// Tells every subscription the trust bundle changed.
    pub fn trust_changed(&self) {
        self.trust.send_replace(self.security.ca.bundle().0);
        self.ca_changed.notify_waiters();
        self.proxy_event.notify_waiters();
    }

    pub fn ca_status(&self) -> v1::CaStatusResponse {
        let st = self.security.ca.status();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let waiting_for = match st.phase {
            crate::ca::Phase::Stable => Vec::new(),
            crate::ca::Phase::Distributing => {
                let mut waiting: Vec<String> = self
                    .lock()
                    .proxies
                    .iter()
                    .filter(|(_, p)| p.connected && p.bundle_generation < st.generation)
                    .map(|(id, _)| id.clone())
                    .collect();
                // Proxies of other replicas count too.
                waiting.extend(
                    self.peer_proxies()
                        .into_iter()
                        .filter(|p| p.bundle_generation < st.generation)
                        .map(|p| p.node),
                );
                waiting
            }
            crate::ca::Phase::Reissuing => self
                .security
                .registry()
                .nodes()
                .filter(|n| n.root != st.issuing && n.not_after > now)
                .map(|n| n.id.clone())
                .collect(),
        };
        v1::CaStatusResponse {
            trust_domain: st.trust_domain,
            roots: st
                .roots
                .into_iter()
                .map(|(id, not_after)| v1::CaRoot { id, not_after })
                .collect(),
            issuing: st.issuing,
            generation: st.generation,
            phase: format!("{:?}", st.phase).to_ascii_lowercase(),
            waiting_for,
            operator_ca: st.operator,
        }
    }

    /// Moves a root rotation on when nothing waits: every connected proxy holds the bundle
    /// with the new root (then issuing switches to it and proxies are asked to renew), then
    /// every node's certificate is from the new root or has expired (then the old root
    /// leaves the bundle). Returns whether the CA changed.
    pub fn advance_rotation(&self) -> Result<bool, String> {
        let phase = self.security.ca.phase();
        if phase == crate::ca::Phase::Stable || !self.ca_status().waiting_for.is_empty() {
            return Ok(false);
        }
        match phase {
            crate::ca::Phase::Distributing => {
                self.security.ca.switch_issuing()?;
                tracing::info!("every proxy trusts the new root: issuing from it, proxies renew");
            }
            _ => {
                self.security.ca.retire_old_roots()?;
                tracing::info!(
                    "every node holds a certificate from the new root: the old root is retired"
                );
            }
        }
        self.trust_changed();
        Ok(true)
    }
}
