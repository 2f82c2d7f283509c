//! Where the registry and the CA keep their state: nowhere (memory), a file (mode 0600), or a
//! key in etcd shared by every replica. An etcd write is a compare-and-swap on the revision
//! this replica last read: two replicas changing the registry at once cannot lose either
//! change; the later one is refused and tries again on the newer state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::etcd::Etcd;

#[derive(Debug)]
pub enum Blob {
    Memory,
    File(PathBuf),
    Etcd {
        etcd: Arc<Etcd>,
        key: Vec<u8>,
        /// The key's revision when this replica last read or wrote it (0: absent).
        revision: AtomicI64,
    },
}

/// A write lost to another replica's: read again and redo the change.
pub const CONFLICT: &str = "changed by another replica at the same time; try again";

impl Blob {
    pub fn file(path: Option<&Path>) -> Blob {
        path.map_or(Blob::Memory, |p| Blob::File(p.to_owned()))
    }

    /// Key `name` under the etcd store's prefix.
    pub fn etcd(etcd: Arc<Etcd>, name: &str) -> Blob {
        Blob::Etcd {
            key: etcd.key(name),
            etcd,
            revision: AtomicI64::new(0),
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Blob::Memory => "memory".into(),
            Blob::File(p) => p.display().to_string(),
            Blob::Etcd { etcd, key, .. } => format!(
                "{} key {}",
                etcd.config().describe(),
                String::from_utf8_lossy(key)
            ),
        }
    }

    /// Whether replicas share it (etcd).
    pub fn shared(&self) -> bool {
        matches!(self, Blob::Etcd { .. })
    }

    /// The etcd key, when it is one.
    pub fn etcd_key(&self) -> Option<&[u8]> {
        match self {
            Blob::Etcd { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The bytes kept (`None`: nothing yet).
    pub fn read(&self) -> Result<Option<Vec<u8>>, String> {
        match self {
            Blob::Memory => Ok(None),
            Blob::File(p) => match std::fs::read(p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {}: {e}", p.display())),
            },
            Blob::Etcd {
                etcd,
                key,
                revision,
            } => {
                let kv = etcd.block(etcd.get(key)).map_err(|e| e.to_string())?;
                revision.store(
                    kv.as_ref().map_or(0, |kv| kv.mod_revision),
                    Ordering::SeqCst,
                );
                Ok(kv.map(|kv| kv.value))
            }
        }
    }

    /// The bytes, when another replica wrote them since this one last read or wrote.
    pub fn changed(&self) -> Result<Option<Vec<u8>>, String> {
        let Blob::Etcd {
            etcd,
            key,
            revision,
        } = self
        else {
            return Ok(None);
        };
        let kv = etcd.block(etcd.get(key)).map_err(|e| e.to_string())?;
        Ok(kv
            .filter(|kv| kv.mod_revision != revision.load(Ordering::SeqCst))
            .map(|kv| {
                revision.store(kv.mod_revision, Ordering::SeqCst);
                kv.value
            }))
    }

    /// Takes what a watch saw: `Some(bytes)` when it is newer than what this replica has.
    pub fn seen(&self, mod_revision: i64, value: Vec<u8>) -> Option<Vec<u8>> {
        let Blob::Etcd { revision, .. } = self else {
            return None;
        };
        let mut current = revision.load(Ordering::SeqCst);
        loop {
            if mod_revision <= current {
                return None;
            }
            match revision.compare_exchange(
                current,
                mod_revision,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(value),
                Err(now) => current = now,
            }
        }
    }

    /// Replaces the bytes; on etcd only if no replica wrote since this one read ([`CONFLICT`]).
    pub fn write(&self, bytes: &[u8]) -> Result<(), String> {
        match self {
            Blob::Memory => Ok(()),
            Blob::File(p) => crate::ca::write_private(p, bytes)
                .map_err(|e| format!("cannot write {}: {e}", p.display())),
            Blob::Etcd {
                etcd,
                key,
                revision,
            } => {
                let seen = revision.load(Ordering::SeqCst);
                let txn = crate::etcd::pb::TxnRequest {
                    compare: vec![crate::etcd::unchanged_since(key.clone(), seen)],
                    success: vec![crate::etcd::put_op(key.clone(), bytes.to_vec())],
                    failure: Vec::new(),
                };
                let r = etcd.block(etcd.txn(txn)).map_err(|e| e.to_string())?;
                if !r.succeeded {
                    return Err(CONFLICT.into());
                }
                let now = r.header.map_or(seen, |h| h.revision);
                revision.store(now, Ordering::SeqCst);
                Ok(())
            }
        }
    }
}
