//! Loading a module: digest, compile (cached), detect the ABI from its marker export, check it
//! exports an allocator and memory, and link it against the host functions — every import it
//! has must be one weft provides, or the module is refused before it ever runs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use wasmtime::{ExternType, InstancePre, Module};
use weft_abi::AbiVersion;
use weft_abi::names::callback as cb;

use super::host;
use super::runtime::{Runtime, digest};
use super::state::HostState;

/// A compiled, linked module ready to be instantiated.
pub struct LoadedModule {
    pub digest: String,
    /// Where it came from (a path, or its digest), for messages and logs.
    pub name: Arc<str>,
    pub abi: AbiVersion,
    pub pre: InstancePre<HostState>,
    exports: HashSet<String>,
}

impl LoadedModule {
    /// Whether the module exports any of `names`.
    pub fn exports_any(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.exports.contains(*n))
    }
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("abi", &self.abi)
            .finish()
    }
}

/// Modules loaded so far, by digest.
fn loaded() -> &'static Mutex<HashMap<String, Arc<LoadedModule>>> {
    static LOADED: OnceLock<Mutex<HashMap<String, Arc<LoadedModule>>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// A module loaded before, by its digest (`sha256:<hex>`).
pub fn by_digest(digest: &str) -> Option<Arc<LoadedModule>> {
    loaded()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(digest)
        .cloned()
}

/// Forgets the loaded modules nothing holds but this cache (a snapshot's filters, a draining
/// snapshot's VMs and a control-plane delivery not yet applied all hold theirs): a proxy that
/// receives a new module on every push does not keep every module it ever ran. One forgotten
/// and needed again is loaded again (from the disk cache).
pub fn evict_unused() {
    let mut loaded = loaded().lock().unwrap_or_else(|e| e.into_inner());
    loaded.retain(|_, m| Arc::strong_count(m) > 1);
    Runtime::global().retain_modules(&|d| loaded.contains_key(d));
}

/// Modules loaded now.
pub fn loaded_count() -> usize {
    loaded().lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Loads `bytes` (named `name` in messages).
pub fn load(name: &str, bytes: &[u8]) -> Result<Arc<LoadedModule>, String> {
    let digest = digest(bytes);
    if let Some(m) = by_digest(&digest) {
        return Ok(m);
    }
    let module = Runtime::global().module(&digest, bytes)?;
    let loaded_module = Arc::new(link(name, digest.clone(), &module)?);
    loaded()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(digest, loaded_module.clone());
    Ok(loaded_module)
}

fn link(name: &str, digest: String, module: &Module) -> Result<LoadedModule, String> {
    let abi = module
        .exports()
        .filter(|e| matches!(e.ty(), ExternType::Func(_)))
        .find_map(|e| AbiVersion::from_marker(e.name()))
        .ok_or_else(|| {
            "not a Proxy-Wasm module: it exports no ABI version marker (proxy_abi_version_0_2_1, _0_2_0 or _0_1_0)"
                .to_owned()
        })?;
    let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
    if !exports.contains(&cb::ON_MEMORY_ALLOCATE) && !exports.contains(&cb::MALLOC) {
        return Err("the module exports no allocator (proxy_on_memory_allocate or malloc)".into());
    }
    if !module
        .exports()
        .any(|e| e.name() == cb::MEMORY && matches!(e.ty(), ExternType::Memory(_)))
    {
        return Err("the module exports no memory".into());
    }
    let linker = host::linker();
    let missing: Vec<String> = module
        .imports()
        .filter(|i| !provided(i.module(), i.name()))
        .map(|i| format!("{}.{}", i.module(), i.name()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the module imports what weft does not provide: {}",
            missing.join(", ")
        ));
    }
    let pre = linker
        .linker
        .instantiate_pre(module)
        .map_err(|e| format!("cannot link the module: {e:#}"))?;
    Ok(LoadedModule {
        digest,
        name: Arc::from(name),
        abi,
        pre,
        exports: module.exports().map(|e| e.name().to_owned()).collect(),
    })
}

fn provided(module: &str, name: &str) -> bool {
    host::linker().provides(module, name)
}
