//! What the proxy keeps on disk of the control plane's pushes: the last snapshot applied (so a
//! restart without a reachable control plane serves it) and the modules it fetched, by digest
//! (checked again when read).

use std::path::PathBuf;
use std::sync::Arc;

use super::ControlOptions;
use crate::config::Config;

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    version: u64,
    config: Config,
    /// SHA-256 (hex) of the snapshot's configuration as the control plane sent it: told in
    /// the hello, so a control plane that would now send something else (the proxy's labels
    /// changed) sends it although the version is the same.
    #[serde(default)]
    digest: String,
}

pub(super) fn snapshot_file(o: &ControlOptions) -> PathBuf {
    o.state_dir.join("snapshot.json")
}

pub(super) fn module_file(o: &ControlOptions, digest: &str) -> PathBuf {
    o.state_dir
        .join("modules")
        .join(format!("{}.wasm", digest.trim_start_matches("sha256:")))
}

/// The last snapshot applied (its modules loaded from the cache), if any.
pub fn last_good(o: &ControlOptions) -> Option<(u64, Config)> {
    let bytes = std::fs::read(snapshot_file(o)).ok()?;
    let saved: Saved = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("the saved snapshot is damaged, ignored: {e}");
            return None;
        }
    };
    for u in saved.config.module_uses() {
        if u.module.starts_with("sha256:") && load_cached(o, u.module).is_err() {
            tracing::warn!(module = %u.module, "a module of the saved snapshot is missing from the cache");
            return None;
        }
    }
    Some((saved.version, saved.config))
}

/// The version and configuration digest of the saved snapshot.
pub(super) fn saved_digest(o: &ControlOptions) -> Option<(u64, String)> {
    let bytes = std::fs::read(snapshot_file(o)).ok()?;
    let saved: Saved = serde_json::from_slice(&bytes).ok()?;
    Some((saved.version, saved.digest))
}

/// SHA-256 (hex) of a snapshot's configuration bytes.
pub fn config_digest(config_json: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(config_json))
}

/// Writes the snapshot that was just applied.
pub fn save_last_good(o: &ControlOptions, version: u64, config: &Config, digest: &str) {
    let saved = Saved {
        version,
        config: config.clone(),
        digest: digest.to_owned(),
    };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&o.state_dir)?;
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        let path = snapshot_file(o);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!("cannot save the snapshot to {}: {e}", o.state_dir.display());
    }
}

/// Loads a cached module, checking its digest.
pub(super) fn load_cached(
    o: &ControlOptions,
    digest: &str,
) -> Result<Arc<crate::wasm::module::LoadedModule>, String> {
    if let Some(m) = crate::wasm::module::by_digest(digest) {
        return Ok(m);
    }
    let bytes = std::fs::read(module_file(o, digest)).map_err(|e| e.to_string())?;
    if crate::wasm::runtime::digest(&bytes) != digest {
        return Err("cached module does not match its digest".into());
    }
    crate::wasm::module::load(digest, &bytes)
}
