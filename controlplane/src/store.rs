//! The embedded store: every version of the mesh's state (resources and filter rollouts) with
//! what changed, and
//! the Wasm modules by digest. One JSON file (written to a temporary file, synced, renamed: a
//! crash leaves the old file or the new one, never half of one) and a directory of modules next
//! to it. The newest [`MAX_HISTORY`] versions are kept for rollback.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::resources::{Kind, Resource};
use crate::rollout::Rollouts;

/// Versions kept for `history` and `rollback`.
pub const MAX_HISTORY: usize = 100;

/// The resources of one version, by kind and name.
pub type State = BTreeMap<(Kind, String), Resource>;

#[derive(Debug, Clone)]
pub struct Version {
    pub number: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// What changed, in words (`apply cluster/ratings`, `rollback to 3`).
    pub change: String,
    pub state: Arc<State>,
    /// Filter rollouts: running, paused, and how the last one of each filter ended.
    pub rollouts: Arc<Rollouts>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the store {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("cannot write the store {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no version {0} in the history")]
    NoSuchVersion(u64),
    /// Another replica stored a version first: catch up and derive the change again.
    #[error("another replica changed the state at the same time")]
    Conflict,
    /// etcd could not be reached: nothing changed.
    #[error("the store cannot be reached: {0}")]
    Unavailable(String),
    #[error("the store (etcd) refused the change: {0}")]
    Refused(String),
    #[error("the store (etcd) holds something unreadable at {key}: {why}")]
    RemoteDamaged { key: String, why: String },
}

impl From<crate::etcd::EtcdError> for StoreError {
    fn from(e: crate::etcd::EtcdError) -> StoreError {
        match e {
            crate::etcd::EtcdError::Unavailable { .. } => StoreError::Unavailable(e.to_string()),
            crate::etcd::EtcdError::Refused(why) => StoreError::Refused(why),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct FileVersion {
    number: u64,
    at_ms: u64,
    change: String,
    resources: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Rollouts::is_empty")]
    rollouts: Rollouts,
}

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    versions: Vec<FileVersion>,
}

/// The store. `path: None` keeps everything in memory (tests, `--store memory`); `remote`:
/// the versions live in etcd and `versions` is this replica's copy of the newest.
#[derive(Debug)]
pub struct Store {
    path: Option<PathBuf>,
    versions: Vec<Version>,
    remote: Option<Remote>,
}

/// The etcd side of a store: where it is, and the revision of the head key this replica's copy
/// is at (a change is stored only if the head is still there).
#[derive(Debug)]
struct Remote {
    etcd: Arc<crate::etcd::Etcd>,
    head_revision: i64,
}

/// A version this replica would store in etcd, and the transaction that stores it.
#[derive(Debug)]
pub struct Prepared {
    pub version: Version,
    txn: crate::etcd::pb::TxnRequest,
}

/// etcd refuses requests larger than this by default (`--max-request-bytes`, 1.5 MiB); a
/// version's state is one value, so it is refused here first, with a clear reason.
pub const MAX_REMOTE_VERSION: usize = 1536 * 1024 - 8 * 1024;

/// The key of the head (the newest version's number) and of each version, under the prefix.
const HEAD: &str = "versions/head";
const VERSIONS: &str = "versions/";

fn version_key(n: u64) -> String {
    format!("{VERSIONS}{n:020}")
}

#[derive(Serialize, Deserialize)]
struct Head {
    version: u64,
}

fn encode(v: &Version) -> Vec<u8> {
    serde_json::to_vec(&file_version(v)).unwrap_or_default()
}

fn file_version(v: &Version) -> FileVersion {
    FileVersion {
        number: v.number,
        at_ms: v.at_ms,
        change: v.change.clone(),
        resources: v.state.values().map(Resource::to_json).collect(),
        rollouts: (*v.rollouts).clone(),
    }
}

fn decode(v: FileVersion) -> Result<Version, String> {
    let mut state = State::new();
    for r in v.resources {
        let r = Resource::from_json(r).map_err(|e| format!("version {}: {e}", v.number))?;
        state.insert(r.key(), r);
    }
    Ok(Version {
        number: v.number,
        at_ms: v.at_ms,
        change: v.change,
        state: Arc::new(state),
        rollouts: Arc::new(v.rollouts),
    })
}

/// Decodes the value of version key `key`.
pub fn decode_remote(key: &[u8], value: &[u8]) -> Result<Version, StoreError> {
    let damaged = |why: String| StoreError::RemoteDamaged {
        key: String::from_utf8_lossy(key).into_owned(),
        why,
    };
    let v: FileVersion = serde_json::from_slice(value).map_err(|e| damaged(e.to_string()))?;
    decode(v).map_err(damaged)
}

/// Whether `key` (a full key) is the head key of `etcd`'s prefix.
pub fn is_head(etcd: &crate::etcd::Etcd, key: &[u8]) -> bool {
    key == etcd.key(HEAD).as_slice()
}

/// The prefix a replica watches: the head and every version.
pub fn watched(etcd: &crate::etcd::Etcd) -> Vec<u8> {
    etcd.key(VERSIONS)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: Option<&Path>) -> Result<Store, StoreError> {
        let mut store = Store {
            path: path.map(Path::to_owned),
            remote: None,
            versions: vec![Version {
                number: 0,
                at_ms: now_ms(),
                change: "empty".into(),
                state: Arc::new(State::new()),
                rollouts: Arc::new(Rollouts::new()),
            }],
        };
        let Some(path) = path else {
            return Ok(store);
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(store),
            Err(source) => {
                return Err(StoreError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let damaged = |why: String| StoreError::Damaged {
            path: path.to_owned(),
            why,
        };
        let file: File = serde_json::from_slice(&text).map_err(|e| damaged(e.to_string()))?;
        if file.format != 1 {
            return Err(damaged(format!("unknown format {}", file.format)));
        }
        let mut versions = Vec::new();
        for v in file.versions {
            versions.push(decode(v).map_err(damaged)?);
        }
        if !versions.is_empty() {
            store.versions = versions;
        }
        Ok(store)
    }

    /// Opens the store kept in etcd: this replica's copy of the newest [`MAX_HISTORY`]
    /// versions. An empty prefix is version 0.
    pub async fn open_etcd(etcd: Arc<crate::etcd::Etcd>) -> Result<Store, StoreError> {
        let mut store = Store::open(None)?;
        store.remote = Some(Remote {
            etcd,
            head_revision: 0,
        });
        let (versions, head_revision) = store.read_remote().await?;
        store.catch_up(versions, head_revision);
        Ok(store)
    }

    /// etcd, when the store is kept there.
    pub fn etcd(&self) -> Option<Arc<crate::etcd::Etcd>> {
        self.remote.as_ref().map(|r| r.etcd.clone())
    }

    /// Every version etcd holds, and the head's revision (0: no head yet).
    pub async fn read_remote(&self) -> Result<(Vec<Version>, i64), StoreError> {
        let Some(r) = &self.remote else {
            return Ok((Vec::new(), 0));
        };
        read_remote(&r.etcd).await
    }

    /// Takes the versions newer than this copy's newest (from etcd), and the head's revision.
    pub fn catch_up(&mut self, versions: Vec<Version>, head_revision: i64) {
        for v in versions {
            if v.number > self.current().number {
                self.versions.push(v);
            }
        }
        let excess = self.versions.len().saturating_sub(MAX_HISTORY);
        self.versions.drain(..excess);
        if let Some(r) = &mut self.remote {
            r.head_revision = r.head_revision.max(head_revision);
        }
    }

    /// The version `state` and `rollouts` would make, and the etcd transaction that stores it
    /// only if no replica stored one since this copy's newest. `None`: nothing changed.
    pub fn prepare_remote(
        &self,
        state: State,
        rollouts: Rollouts,
        change: String,
    ) -> Result<Option<Prepared>, StoreError> {
        use crate::etcd::{delete_op, put_op, unchanged_since};
        let Some(r) = &self.remote else {
            return Err(StoreError::Refused("not an etcd store".into()));
        };
        if state == *self.current().state && rollouts == *self.current().rollouts {
            return Ok(None);
        }
        let number = self.current().number + 1;
        let version = Version {
            number,
            at_ms: now_ms(),
            change,
            state: Arc::new(state),
            rollouts: Arc::new(rollouts),
        };
        let value = encode(&version);
        if value.len() > MAX_REMOTE_VERSION {
            return Err(StoreError::Refused(format!(
                "version {number} would be {} bytes: etcd takes at most {} in one request                  (its --max-request-bytes); nothing changed",
                value.len(),
                MAX_REMOTE_VERSION
            )));
        }
        let head = serde_json::to_vec(&Head { version: number }).unwrap_or_default();
        let mut success = vec![
            put_op(r.etcd.key(HEAD), head),
            put_op(r.etcd.key(&version_key(number)), value),
        ];
        // Versions past the history are deleted with the write that makes them so.
        if number > MAX_HISTORY as u64 {
            success.push(delete_op(
                r.etcd.key(&version_key(0)),
                r.etcd.key(&version_key(number - MAX_HISTORY as u64 + 1)),
            ));
        }
        Ok(Some(Prepared {
            version,
            txn: crate::etcd::pb::TxnRequest {
                compare: vec![unchanged_since(r.etcd.key(HEAD), r.head_revision)],
                success,
                failure: Vec::new(),
            },
        }))
    }

    /// Stores `p` in etcd: the revision it was stored at, or [`StoreError::Conflict`] when
    /// another replica stored a version first.
    pub async fn write_remote(etcd: &crate::etcd::Etcd, p: &Prepared) -> Result<i64, StoreError> {
        let r = etcd.txn(p.txn.clone()).await?;
        if !r.succeeded {
            return Err(StoreError::Conflict);
        }
        Ok(r.header.map_or(0, |h| h.revision))
    }

    pub fn current(&self) -> &Version {
        // There is always at least one version.
        &self.versions[self.versions.len() - 1]
    }

    pub fn history(&self) -> &[Version] {
        &self.versions
    }

    pub fn get(&self, number: u64) -> Option<&Version> {
        self.versions.iter().find(|v| v.number == number)
    }

    /// Makes `state` the new current version, with the current rollouts (unless it equals the
    /// current one), and writes the store; on a write error nothing changes.
    pub fn commit(&mut self, state: State, change: String) -> Result<Option<u64>, StoreError> {
        let rollouts = (*self.current().rollouts).clone();
        self.commit_with(state, rollouts, change)
    }

    /// As [`Store::commit`], with rollouts.
    pub fn commit_with(
        &mut self,
        state: State,
        rollouts: Rollouts,
        change: String,
    ) -> Result<Option<u64>, StoreError> {
        if let Some(r) = &self.remote {
            let etcd = r.etcd.clone();
            let Some(p) = self.prepare_remote(state, rollouts, change)? else {
                return Ok(None);
            };
            let revision = etcd.block(Store::write_remote(&etcd, &p))?;
            let number = p.version.number;
            self.catch_up(vec![p.version], revision);
            return Ok(Some(number));
        }
        if state == *self.current().state && rollouts == *self.current().rollouts {
            return Ok(None);
        }
        let number = self.current().number + 1;
        self.versions.push(Version {
            number,
            at_ms: now_ms(),
            change,
            state: Arc::new(state),
            rollouts: Arc::new(rollouts),
        });
        let excess = self.versions.len().saturating_sub(MAX_HISTORY);
        let dropped: Vec<Version> = self.versions.drain(..excess).collect();
        if let Err(e) = self.save() {
            self.versions.pop();
            for (i, v) in dropped.into_iter().enumerate() {
                self.versions.insert(i, v);
            }
            return Err(e);
        }
        Ok(Some(number))
    }

    fn save(&self) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = File {
            format: 1,
            versions: self.versions.iter().map(file_version).collect(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomically(path, &bytes).map_err(|source| StoreError::Write {
            path: path.clone(),
            source,
        })
    }

    /// Where modules live: `<store>.modules/` (none for an in-memory store).
    pub fn modules_dir(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| {
            let mut s = p.as_os_str().to_owned();
            s.push(".modules");
            PathBuf::from(s)
        })
    }
}

/// Every version under `etcd`'s prefix, oldest first, and the head's revision.
pub async fn read_remote(etcd: &crate::etcd::Etcd) -> Result<(Vec<Version>, i64), StoreError> {
    let (kvs, _) = etcd.list(&etcd.key(VERSIONS)).await?;
    let mut head_revision = 0;
    let mut head = None;
    let mut versions = Vec::new();
    for kv in kvs {
        if is_head(etcd, &kv.key) {
            head_revision = kv.mod_revision;
            let h: Head =
                serde_json::from_slice(&kv.value).map_err(|e| StoreError::RemoteDamaged {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    why: e.to_string(),
                })?;
            head = Some(h.version);
        } else {
            versions.push(decode_remote(&kv.key, &kv.value)?);
        }
    }
    versions.sort_by_key(|v| v.number);
    // A version past the head (a write racing the read) waits for its head.
    if let Some(h) = head {
        versions.retain(|v| v.number <= h);
    } else {
        versions.clear();
    }
    Ok((versions, head_revision))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `sha256:<hex>` of module bytes.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::parse_documents;

    fn state(yaml: &str) -> State {
        parse_documents(yaml)
            .expect("valid")
            .into_iter()
            .map(|r| (r.key(), r))
            .collect()
    }

    #[test]
    fn versions_survive_a_restart_and_unchanged_states_are_not_versions() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("weft-cp.json");
        let mut s = Store::open(Some(&path)).expect("open");
        assert_eq!(s.current().number, 0);
        let a = state("kind: cluster\nspec: { name: a, endpoints: [\"127.0.0.1:1\"] }\n");
        assert_eq!(
            s.commit(a.clone(), "apply cluster/a".into())
                .expect("commit"),
            Some(1)
        );
        assert_eq!(s.commit(a.clone(), "again".into()).expect("commit"), None);
        let mut b = a.clone();
        b.extend(state(
            "kind: cluster\nspec: { name: b, endpoints: [\"127.0.0.1:2\"] }\n",
        ));
        assert_eq!(
            s.commit(b, "apply cluster/b".into()).expect("commit"),
            Some(2)
        );
        drop(s);

        let s = Store::open(Some(&path)).expect("reopen");
        assert_eq!(s.current().number, 2);
        assert_eq!(s.current().state.len(), 2);
        assert_eq!(s.get(1).map(|v| v.state.len()), Some(1));
        assert_eq!(s.history().len(), 3);
        assert_eq!(s.current().change, "apply cluster/b");
    }

    #[test]
    fn a_damaged_file_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("weft-cp.json");
        std::fs::write(&path, b"{ not json").expect("write");
        let e = Store::open(Some(&path)).expect_err("damaged");
        assert!(e.to_string().contains("is damaged"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), b"{ not json");
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Store::open(None).expect("memory");
        for i in 0..(MAX_HISTORY + 20) {
            let st = state(&format!(
                "kind: cluster\nspec: {{ name: c, endpoints: [\"127.0.0.1:{}\"] }}\n",
                i + 1
            ));
            s.commit(st, format!("step {i}")).expect("commit");
        }
        assert_eq!(s.history().len(), MAX_HISTORY);
        assert_eq!(s.current().number, (MAX_HISTORY + 20) as u64);
    }
}
