//! Wasm runtime policy, all in one place: the one wasmtime `Engine` (pooling allocator, epoch
//! interruption), the epoch ticker that bounds every call into a guest, per-VM memory limits,
//! and the module cache (compiled once per sha256; the compiled artifact kept on disk, keyed by
//! digest and engine).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, OptLevel, PoolingAllocationConfig,
};

/// One epoch tick. Deadlines are whole ticks, so a runaway guest is stopped within a tick of
/// its deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The largest memory any VM may have (per-filter limits are at most this).
pub const MAX_VM_MEMORY: usize = 1 << 30;

/// VMs that can exist at once in the process (pooling allocator slots).
const POOL_INSTANCES: u32 = 512;

/// The process's Wasm engine and module cache.
pub struct Runtime {
    engine: Engine,
    modules: Mutex<HashMap<String, Module>>,
    cache_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

fn config(pooling: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(32))
        .max_wasm_stack(512 * 1024);
    if pooling {
        let mut p = PoolingAllocationConfig::default();
        p.total_core_instances(POOL_INSTANCES)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES)
            .max_memories_per_module(1)
            .max_tables_per_module(2)
            .max_memory_size(MAX_VM_MEMORY)
            .table_elements(100_000);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

/// Digest of module bytes, as `sha256:<hex>`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl Runtime {
    /// The process-wide runtime (one engine, one epoch ticker).
    pub fn global() -> &'static Runtime {
        static RUNTIME: OnceLock<Runtime> = OnceLock::new();
        RUNTIME.get_or_init(|| {
            let cache_dir = cache_dir();
            // The pooling allocator reserves address space up front; where that is refused
            // (a small address-space limit), fall back to on-demand allocation.
            let engine = Engine::new(&config(true))
                .or_else(|e| {
                    tracing::warn!(error = %e, "the pooling allocator is unavailable; allocating VMs on demand");
                    Engine::new(&config(false))
                })
                .unwrap_or_else(|e| panic!("cannot create the Wasm engine: {e}"));
            start_ticker(engine.clone());
            Runtime {
                engine,
                modules: Mutex::new(HashMap::new()),
                cache_dir,
            }
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `bytes` (whose digest is `digest`), or returns the module compiled before:
    /// from memory, then from the disk cache, then by compiling (and storing the result).
    pub fn module(&self, digest: &str, bytes: &[u8]) -> Result<Module, String> {
        if let Some(m) = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Ok(m.clone());
        }
        let cached = self.cache_path(digest);
        let module = match cached.as_deref().and_then(|p| self.load_cached(p)) {
            Some(m) => m,
            None => {
                let m = Module::new(&self.engine, bytes).map_err(|e| {
                    // One line: the first cause is what a user can act on.
                    let text = format!("{e:#}");
                    let line = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ");
                    format!("invalid Wasm module: {line}")
                })?;
                if let Some(p) = &cached {
                    store_cached(p, &m);
                }
                m
            }
        };
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.to_owned(), module.clone());
        Ok(module)
    }

    fn cache_path(&self, digest: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = Sha256::new();
        h.update(digest.as_bytes());
        // The artifact is only valid for this engine's compiler and settings.
        std::hash::Hash::hash(
            &self.engine.precompile_compatibility_hash(),
            &mut HashWriter(&mut h),
        );
        Some(dir.join(format!("{:x}.cwasm", h.finalize())))
    }

    fn load_cached(&self, path: &Path) -> Option<Module> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `store_cached` from a module this engine compiled, in
        // a directory only this user can write (checked by `cache_dir`); wasmtime also checks
        // that the artifact matches the engine's configuration before using it.
        match unsafe { Module::deserialize_file(&self.engine, path) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable cached module");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }
}

/// Feeds `std::hash::Hash` into sha256.
struct HashWriter<'a>(&'a mut Sha256);

impl std::hash::Hasher for HashWriter<'_> {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn store_cached(path: &Path, module: &Module) {
    let Ok(bytes) = module.serialize() else {
        return;
    };
    // Write then rename: a concurrent reader never sees half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The directory compiled modules are cached in: `$WEFT_WASM_CACHE`, else
/// `$XDG_CACHE_HOME/weft/wasm`, else `~/.cache/weft/wasm`. It must belong to this user and be
/// writable by nobody else (a cached artifact is native code); otherwise there is no disk cache.
fn cache_dir() -> Option<PathBuf> {
    if std::env::var_os("WEFT_WASM_CACHE").is_some_and(|v| v == "off") {
        return None;
    }
    let dir = std::env::var_os("WEFT_WASM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("weft/wasm")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/weft/wasm")))?;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let meta = std::fs::metadata(&dir).ok()?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        tracing::warn!(dir = %dir.display(), "not using the Wasm cache directory: it must be ours and not writable by others");
        return None;
    }
    Some(dir)
}

/// Increments the engine's epoch every [`EPOCH_TICK`], on its own thread, for the life of the
/// process. A store's deadline is counted in these ticks.
fn start_ticker(engine: Engine) {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("weft-wasm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the Wasm epoch ticker: guest calls would not be bounded");
    }
}

/// Deadline in epoch ticks for a call allowed `limit`.
pub fn ticks(limit: Duration) -> u64 {
    (limit.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// Shared handle on the runtime.
pub type SharedRuntime = Arc<Runtime>;
