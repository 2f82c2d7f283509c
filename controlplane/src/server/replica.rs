//! Replicas on etcd: each weft-cp follows the versions every replica stores (a watch of the
//! version keys) and pushes them to its own proxies; modules live in etcd by digest, in chunks,
//! and a replica loads the ones a version needs before it serves that version. While etcd is
//! away a replica serves what it has and refuses changes; it catches up when etcd is back.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::ControlPlane;
use crate::etcd::{Etcd, EtcdError, pb};
use crate::resources::Spec;
use crate::store::{StoreError, Version, decode_remote, is_head, watched};

/// How often a change is derived again when other replicas keep storing versions first.
pub(super) const CHANGE_TRIES: u32 = 5;

/// Module bytes per etcd value (etcd takes requests up to 1.5 MiB by default).
pub const MODULE_CHUNK: usize = 1024 * 1024;

/// A store error as the RPC's status: a lost race is `ABORTED` (derive again), etcd away is
/// `UNAVAILABLE` (nothing changed, try later).
pub(super) fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict => Status::aborted(e.to_string()),
        StoreError::Unavailable(_) => Status::unavailable(format!(
            "{e}; nothing changed (the proxies keep their configuration); try again when etcd is back"
        )),
        StoreError::Refused(_) => Status::failed_precondition(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The module digests `v`'s state and rollouts name.
fn digests(v: &Version) -> Vec<String> {
    let mut out = state_digests(&v.state);
    out.extend(v.rollouts.values().map(|r| r.to.module.clone()));
    out.retain(|m| m.starts_with("sha256:"));
    out.sort();
    out.dedup();
    out
}

/// The module digests `state` names.
pub(super) fn state_digests(state: &crate::store::State) -> Vec<String> {
    state
        .values()
        .filter_map(|r| match &r.spec {
            Spec::Filter(f) => Some(f.module.clone()),
            Spec::Service(s) => Some(s.module.clone()),
            _ => None,
        })
        .filter(|m| m.starts_with("sha256:"))
        .collect()
}

fn module_prefix(etcd: &Etcd, digest: &str) -> Vec<u8> {
    etcd.key(&format!(
        "modules/{}/",
        digest.trim_start_matches("sha256:")
    ))
}

/// Stores module `bytes` (whose digest is `digest`) in etcd: its chunks, then its size (a
/// module whose size key is there is whole). Stored once per digest.
pub async fn store_module(etcd: &Etcd, digest: &str, bytes: &[u8]) -> Result<(), EtcdError> {
    let prefix = module_prefix(etcd, digest);
    let mut size_key = prefix.clone();
    size_key.extend_from_slice(b"size");
    if etcd.get(&size_key).await?.is_some() {
        return Ok(());
    }
    for (i, chunk) in bytes.chunks(MODULE_CHUNK).enumerate() {
        let mut key = prefix.clone();
        key.extend_from_slice(format!("chunk/{i:06}").as_bytes());
        etcd.put(&key, chunk.to_vec()).await?;
    }
    etcd.put(&size_key, bytes.len().to_string().into_bytes())
        .await
}

/// Module `digest` from etcd, checked against its digest (`None`: not there, or not whole).
pub async fn load_module(etcd: &Etcd, digest: &str) -> Result<Option<Vec<u8>>, EtcdError> {
    let prefix = module_prefix(etcd, digest);
    let mut size_key = prefix.clone();
    size_key.extend_from_slice(b"size");
    let Some(size) = etcd.get(&size_key).await? else {
        return Ok(None);
    };
    let size: usize = String::from_utf8_lossy(&size.value).parse().unwrap_or(0);
    if size > weft_wire::MAX_MESSAGE {
        return Ok(None);
    }
    let mut chunks = prefix.clone();
    chunks.extend_from_slice(b"chunk/");
    let (kvs, _) = etcd.list(&chunks).await?;
    let mut bytes = Vec::with_capacity(size);
    for kv in kvs {
        bytes.extend_from_slice(&kv.value);
        if bytes.len() > size {
            break;
        }
    }
    if bytes.len() != size || crate::store::digest(&bytes) != digest {
        tracing::warn!(module = %digest, "the module's bytes in etcd do not match its digest");
        return Ok(None);
    }
    Ok(Some(bytes))
}

impl ControlPlane {
    /// Runs `attempt` (which derives a change from the current version and stores it) again
    /// after catching up, while another replica stores a version first (on etcd).
    pub(super) fn retrying<T>(&self, attempt: impl Fn() -> Result<T, Status>) -> Result<T, Status> {
        let mut tries = 0;
        loop {
            match attempt() {
                Err(e) if e.code() == tonic::Code::Aborted && tries < CHANGE_TRIES => {
                    tries += 1;
                    self.catch_up_now()?;
                }
                r => return r,
            }
        }
    }

    /// Reads etcd now and takes what other replicas stored (before deriving a change again).
    pub(super) fn catch_up_now(&self) -> Result<(), Status> {
        let Some(etcd) = self.lock().store.etcd() else {
            return Ok(());
        };
        let (versions, head_revision) = etcd
            .block(crate::store::read_remote(&etcd))
            .map_err(super::store_status)?;
        etcd.block(self.install(&etcd, versions, head_revision))
    }

    /// Makes the modules of `versions` available here (from etcd), then takes the versions
    /// newer than this replica's and pushes the newest to the proxies.
    async fn install(
        &self,
        etcd: &Etcd,
        versions: Vec<Version>,
        head_revision: i64,
    ) -> Result<(), Status> {
        let current = self.lock().store.current().number;
        let newer: Vec<Version> = versions
            .into_iter()
            .filter(|v| v.number > current)
            .collect();
        if let Some(newest) = newer.last() {
            self.ensure_modules(etcd, &digests(newest)).await?;
        }
        let mut inner = self.lock();
        inner.store.catch_up(newer, head_revision);
        let now = inner.store.current().number;
        drop(inner);
        if now > current {
            tracing::debug!(version = now, "new version from etcd");
            self.metrics.version.set(now as i64);
            self.version.send_replace(now);
        }
        Ok(())
    }

    /// Loads every module of `digests` this replica does not have from etcd.
    pub(super) async fn ensure_modules(
        &self,
        etcd: &Etcd,
        digests: &[String],
    ) -> Result<(), Status> {
        for d in digests {
            if self.module(d).is_some() {
                continue;
            }
            let bytes = load_module(etcd, d)
                .await
                .map_err(|e| store_status(e.into()))?
                .ok_or_else(|| {
                    Status::failed_precondition(format!("module {d} is not in the store"))
                })?;
            let name = d.clone();
            let checked = bytes.clone();
            tokio::task::spawn_blocking(move || weft_proxy::wasm::module::load(&name, &checked))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("module {d} from etcd: {e}")))?;
            self.modules
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(d.clone(), Arc::new(bytes));
        }
        Ok(())
    }

    /// Module `digest`, if this replica has it.
    pub(super) fn module(&self, digest: &str) -> Option<Arc<Vec<u8>>> {
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    /// Whether etcd answered the last time this replica asked.
    pub fn store_reachable(&self) -> bool {
        self.metrics.store_up.get() == 1
    }
}

/// Follows the registry and the CA in etcd: another replica's enrollment, removal or rotation
/// step is taken here within a watch's delay (and the proxies get the new trust bundle).
pub fn spawn_identity_follower(cp: Arc<ControlPlane>) -> Option<tokio::task::JoinHandle<()>> {
    let etcd = cp.lock().store.etcd()?;
    cp.security.ca.blob().etcd_key()?;
    Some(tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(e) = follow_identity(&cp, &etcd).await {
                tracing::warn!("etcd (registry and CA): {e}");
            }
            let jitter = fastrand::u64(..=backoff.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }))
}

/// The next response of a watch; `None` when etcd cancelled it (its history was compacted):
/// the caller reads everything again.
async fn next_events(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
) -> Result<Option<pb::WatchResponse>, String> {
    let r = match stream.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return Err("the watch ended".into()),
        Err(s) => return Err(format!("the watch broke: {}", crate::etcd::why(&s))),
    };
    if r.compact_revision > 0 || r.canceled {
        tracing::info!(
            reason = %r.cancel_reason,
            "etcd watch cancelled (history compacted?): reading everything again"
        );
        return Ok(None);
    }
    Ok(Some(r))
}

/// Where the registry and the CA are kept under the prefix.
pub const IDENTITY: &str = "identity/";

async fn follow_identity(cp: &ControlPlane, etcd: &Etcd) -> Result<(), String> {
    let prefix = etcd.key(IDENTITY);
    let (kvs, revision) = etcd.list(&prefix).await.map_err(|e| e.to_string())?;
    for kv in kvs {
        take_identity(cp, kv);
    }
    let mut stream = etcd
        .watch(&prefix, revision + 1)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let Some(r) = next_events(&mut stream).await? else {
            return Ok(());
        };
        for e in r.events {
            if e.r#type == pb::event::EventType::Put as i32
                && let Some(kv) = e.kv
            {
                take_identity(cp, kv);
            }
        }
    }
}

/// Takes a registry or CA value another replica stored.
fn take_identity(cp: &ControlPlane, kv: pb::KeyValue) {
    let ca = &cp.security.ca;
    if ca.blob().etcd_key() == Some(kv.key.as_slice()) {
        match ca.reload(kv.mod_revision, kv.value) {
            Ok(true) => {
                tracing::info!("the CA changed on another replica: following");
                cp.trust_changed();
            }
            Ok(false) => {}
            Err(e) => tracing::error!("the CA in etcd: {e}"),
        }
        return;
    }
    let mut registry = cp.security.registry();
    if registry.blob().etcd_key() == Some(kv.key.as_slice())
        && let Err(e) = registry.reload(kv.mod_revision, kv.value)
    {
        tracing::error!("the registry in etcd: {e}");
    }
}

/// Follows etcd: reads every version, then watches the version keys and takes each new one;
/// when the watch breaks (etcd away, history compacted) reads again, with back-off.
pub fn spawn_follower(cp: Arc<ControlPlane>) -> Option<tokio::task::JoinHandle<()>> {
    let etcd = cp.lock().store.etcd()?;
    Some(tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let healthy = follow(&cp, &etcd).await;
            cp.metrics.store_up.set(0);
            if let Err(e) = &healthy {
                tracing::warn!(
                    "etcd: {e}; serving the last state, changes are refused until it is back"
                );
            }
            if healthy.is_ok() {
                backoff = Duration::from_millis(100);
            }
            let jitter = fastrand::u64(..=backoff.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }))
}

/// One pass: `Ok` when the watch ended in a way that calls for reading again at once.
async fn follow(cp: &ControlPlane, etcd: &Etcd) -> Result<(), String> {
    let (versions, head_revision) = crate::store::read_remote(etcd)
        .await
        .map_err(|e| e.to_string())?;
    cp.install(etcd, versions, head_revision)
        .await
        .map_err(|e| e.message().to_owned())?;
    let from = head_revision.max(1);
    let mut stream = etcd
        .watch(&watched(etcd), from)
        .await
        .map_err(|e| e.to_string())?;
    cp.metrics.store_up.set(1);
    loop {
        let Some(r) = next_events(&mut stream).await? else {
            return Ok(());
        };
        let mut versions = Vec::new();
        let mut head = 0;
        for e in r.events {
            let Some(kv) = e.kv else { continue };
            if e.r#type != pb::event::EventType::Put as i32 {
                continue;
            }
            if is_head(etcd, &kv.key) {
                head = head.max(kv.mod_revision);
            } else {
                match decode_remote(&kv.key, &kv.value) {
                    Ok(v) => versions.push(v),
                    Err(e) => tracing::error!("{e}"),
                }
            }
        }
        if head == 0 {
            continue;
        }
        let current = cp.lock().store.current().number;
        versions.sort_by_key(|v| v.number);
        let contiguous = versions
            .iter()
            .enumerate()
            .all(|(i, v)| v.number == current + 1 + i as u64);
        if !contiguous && versions.iter().any(|v| v.number > current) {
            // A gap (a version this replica never saw): read them all.
            return Ok(());
        }
        cp.install(etcd, versions, head)
            .await
            .map_err(|e| e.message().to_owned())?;
    }
}

/// Where replicas publish the proxies connected to them, under the prefix.
pub const REPLICAS: &str = "replicas/";

/// Proxies per published key (a key must fit one etcd request).
const SHARD: usize = 2000;

/// How long a replica's publication outlives it (its lease).
const LEASE_TTL: i64 = 10;

/// A proxy connected to another replica, as that replica publishes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerProxy {
    pub node: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub applied: u64,
    #[serde(default)]
    pub sent: u64,
    #[serde(default)]
    pub nacked: u64,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub bundle_generation: u64,
    /// The replica it is connected to.
    #[serde(skip)]
    pub replica: String,
}

impl ControlPlane {
    /// The proxies connected to other replicas (none of them connected here), by node.
    pub(super) fn peer_proxies(&self) -> Vec<PeerProxy> {
        let local: std::collections::HashSet<String> = self
            .lock()
            .proxies
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(n, _)| n.clone())
            .collect();
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: std::collections::BTreeMap<String, PeerProxy> = Default::default();
        for list in peers.values() {
            for p in list {
                if !local.contains(&p.node) {
                    out.insert(p.node.clone(), p.clone());
                }
            }
        }
        out.into_values().collect()
    }

    /// Something of this replica's proxies changed: published within a second.
    pub(super) fn proxies_changed(&self) {
        self.status_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Publishes this replica's connected proxies (under a lease: they go with the replica) and
/// follows the other replicas' publications: `status`, an apply's progress, validation's label
/// sets and a root rotation then see every proxy, wherever it is connected.
pub fn spawn_peers(cp: Arc<ControlPlane>) -> Option<tokio::task::JoinHandle<()>> {
    let etcd = cp.lock().store.etcd()?;
    let follower = {
        let (cp, etcd) = (cp.clone(), etcd.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = follow_peers(&cp, &etcd).await {
                    tracing::debug!("etcd (replicas): {e}");
                }
                tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(..800))).await;
            }
        })
    };
    Some(tokio::spawn(async move {
        let _follower = AbortOnDrop(follower);
        loop {
            if let Err(e) = publish(&cp, &etcd).await {
                tracing::debug!("etcd (publishing proxies): {e}");
            }
            tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(..800))).await;
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn publish(cp: &ControlPlane, etcd: &Etcd) -> Result<(), EtcdError> {
    let lease = etcd.grant(LEASE_TTL).await?;
    let mine = etcd.key(&format!("{REPLICAS}{}/", cp.replica_id));
    let mut published = u64::MAX;
    let mut published_cohorts = Vec::new();
    let mut shards = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut renewed = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if renewed.elapsed() >= Duration::from_secs(2) {
            if etcd.keep_alive(lease).await? <= 0 {
                return Err(EtcdError::Refused("the lease expired".into()));
            }
            renewed = tokio::time::Instant::now();
        }
        // The cohorts of running rollouts, for the replica that judges them.
        let cohorts = serde_json::to_vec(&cp.own_cohorts()).unwrap_or_default();
        if cohorts != published_cohorts {
            let mut key = mine.clone();
            key.push(b'c');
            etcd.put_leased(&key, cohorts.clone(), lease).await?;
            published_cohorts = cohorts;
        }
        let generation = cp
            .status_generation
            .load(std::sync::atomic::Ordering::Relaxed);
        if generation == published {
            continue;
        }
        let list: Vec<PeerProxy> = cp
            .lock()
            .proxies
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(node, p)| PeerProxy {
                node: node.clone(),
                labels: p.labels.clone(),
                applied: p.applied,
                sent: p.sent,
                nacked: p.nacked,
                reason: p.reason.chars().take(512).collect(),
                bundle_generation: p.bundle_generation,
                replica: String::new(),
            })
            .collect();
        let chunks: Vec<&[PeerProxy]> = list.chunks(SHARD).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut key = mine.clone();
            key.extend_from_slice(format!("p{i:06}").as_bytes());
            let value = serde_json::to_vec(chunk).unwrap_or_default();
            etcd.put_leased(&key, value, lease).await?;
        }
        if chunks.len() < shards {
            let (mut from, mut to) = (mine.clone(), mine.clone());
            from.extend_from_slice(format!("p{:06}", chunks.len()).as_bytes());
            to.push(b'q');
            etcd.delete_range(&from, to).await?;
        }
        shards = chunks.len();
        published = generation;
    }
}

async fn follow_peers(cp: &ControlPlane, etcd: &Etcd) -> Result<(), String> {
    let prefix = etcd.key(REPLICAS);
    let mine = etcd.key(&format!("{REPLICAS}{}/", cp.replica_id));
    let replica_of = |key: &[u8]| -> String {
        String::from_utf8_lossy(&key[prefix.len().min(key.len())..])
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let take = |key: Vec<u8>, value: Option<Vec<u8>>| {
        if key.starts_with(&mine) {
            return;
        }
        if key.last() == Some(&b'c') {
            let mut cohorts = cp.peer_cohorts.lock().unwrap_or_else(|e| e.into_inner());
            match value.map(|v| serde_json::from_slice(&v)) {
                Some(Ok(c)) => {
                    cohorts.insert(key, c);
                }
                Some(Err(e)) => tracing::warn!("a replica's rollout figures do not parse: {e}"),
                None => {
                    cohorts.remove(&key);
                }
            }
            return;
        }
        let mut peers = cp.peers.lock().unwrap_or_else(|e| e.into_inner());
        match value.map(|v| serde_json::from_slice::<Vec<PeerProxy>>(&v)) {
            Some(Ok(mut list)) => {
                let replica = replica_of(&key);
                for p in &mut list {
                    p.replica = replica.clone();
                }
                peers.insert(key, list);
            }
            Some(Err(e)) => tracing::warn!("a replica's publication does not parse: {e}"),
            None => {
                peers.remove(&key);
            }
        }
    };
    let (kvs, revision) = etcd.list(&prefix).await.map_err(|e| e.to_string())?;
    cp.peers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    cp.peer_cohorts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    for kv in kvs {
        take(kv.key, Some(kv.value));
    }
    cp.proxy_event.notify_waiters();
    let mut stream = etcd
        .watch(&prefix, revision + 1)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let Some(r) = next_events(&mut stream).await? else {
            return Ok(());
        };
        for e in r.events {
            let Some(kv) = e.kv else { continue };
            if e.r#type == pb::event::EventType::Put as i32 {
                take(kv.key, Some(kv.value));
            } else {
                take(kv.key, None);
            }
        }
        cp.proxy_event.notify_waiters();
    }
}
