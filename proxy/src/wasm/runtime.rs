//! Wasm runtime policy, all in one place: the one wasmtime `Engine` (pooling allocator, epoch
//! interruption), the epoch ticker that bounds every call into a guest, per-VM memory limits,
//! and the module cache (compiled once per sha256; the compiled artifact kept on disk, keyed by
//! digest and engine).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, OptLevel, PoolingAllocationConfig,
};

/// The finest epoch tick. Deadlines are whole ticks, so a runaway guest is stopped within a
/// tick of its deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The largest memory any VM may have (per-filter limits are at most this).
pub const MAX_VM_MEMORY: usize = 1 << 30;

/// VMs that can exist at once in the process (pooling allocator slots) when nothing planned
/// the pool (`weft validate`, the control plane's validation).
pub const DEFAULT_POOL_INSTANCES: u32 = 512;

/// The pool size the process's engine is (or will be) created with.
static POOL_INSTANCES: OnceLock<u32> = OnceLock::new();

/// Sizes the VM pool, before the engine exists (the first module load creates it). Returns the
/// size in effect: `instances`, or what was fixed before.
pub fn plan_pool(instances: u32) -> u32 {
    *POOL_INSTANCES.get_or_init(|| instances.max(1))
}

/// How many VMs can exist at once: the pool's size, or `None` when VMs are allocated on demand
/// (the pooling allocator was refused its address space).
pub fn pool_capacity() -> Option<u32> {
    let runtime = Runtime::global();
    runtime
        .pooled
        .then(|| *POOL_INSTANCES.get_or_init(|| DEFAULT_POOL_INSTANCES))
}

/// What a guest may make the host hold for it, beyond its own memory: every host-side buffer a
/// guest can grow has a cap here, and going past it is an error status for the guest (the call
/// changes nothing), never an abort of the proxy. Per VM, from its filter's `limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostLimits {
    /// Longest log message (`proxy_log`, standard output and error).
    pub log_line: usize,
    /// Bytes of keys and values in the shared data of the VM's `vm_id`.
    pub shared_data: usize,
    /// Keys in the shared data of the VM's `vm_id`.
    pub shared_data_keys: usize,
    /// Items and bytes waiting in a queue the VM registers.
    pub queue_depth: usize,
    pub queue_bytes: usize,
    /// HTTP and gRPC callouts in flight at once.
    pub callouts: usize,
    /// The timeout of a callout made with timeout 0.
    pub callout_timeout: Duration,
    /// Largest callout body either way (HTTP bodies, gRPC messages, a stream's send queue).
    pub callout_body: usize,
    /// Most body bytes a filter may hold (what `proxy_set_buffer_bytes` may grow a body to).
    pub body_buffer: usize,
}

impl HostLimits {
    pub fn of(l: &crate::config::FilterLimits) -> HostLimits {
        let size = |b: crate::config::ByteSize| usize::try_from(b.0).unwrap_or(usize::MAX);
        HostLimits {
            log_line: size(l.log_line),
            shared_data: size(l.shared_data),
            shared_data_keys: l.shared_data_keys as usize,
            queue_depth: l.queue_depth as usize,
            queue_bytes: size(l.queue_bytes),
            callouts: l.callouts as usize,
            callout_timeout: l.callout_timeout.0,
            callout_body: size(l.callout_body),
            body_buffer: size(l.body_buffer),
        }
    }
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits::of(&crate::config::FilterLimits::default())
    }
}

/// Fixed caps on what a guest can make the host hold (not worth a setting each).
pub mod caps {
    /// iovecs in one `fd_write` (POSIX's `IOV_MAX`).
    pub const MAX_IOVECS: usize = 1024;
    /// Queues one `vm_id` may register.
    pub const MAX_QUEUES_PER_VM_ID: usize = 1024;
    /// Longest queue name, shared-data key, metric name.
    pub const MAX_NAME: usize = 4096;
    /// Bytes of properties a stream's filters may set (`proxy_set_property`).
    pub const MAX_FILTER_STATE: usize = 64 * 1024;
    /// Actions (continue, close, local response) a stream may have waiting.
    pub const MAX_STREAM_ACTIONS: usize = 64;
    /// A header map a filter grows may not grow past this many bytes or entries (as
    /// proxy-wasm-cpp-host's limits on serialized maps).
    pub const MAX_HEADER_MAP_BYTES: usize = weft_abi::MAX_PAIRS_BYTES;
    pub const MAX_HEADER_MAP_ENTRIES: usize = weft_abi::MAX_PAIRS;
    /// Callouts in flight at once on one worker, all VMs together.
    pub const WORKER_CALLOUTS: usize = 1024;
}

/// The process's Wasm engine and module cache.
pub struct Runtime {
    engine: Engine,
    /// VMs come from the pool (else: allocated on demand).
    pooled: bool,
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

fn config(pooling: Option<u32>) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(32))
        .max_wasm_stack(512 * 1024);
    // For filter authors profiling their filter: `perf` names the guest's functions.
    if std::env::var_os("WEFT_WASM_PROFILE").is_some_and(|v| v == "perfmap") {
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if let Some(instances) = pooling {
        let mut p = PoolingAllocationConfig::default();
        p.total_core_instances(instances)
            .total_memories(instances)
            .total_tables(instances)
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
            let instances = *POOL_INSTANCES.get_or_init(|| DEFAULT_POOL_INSTANCES);
            let (engine, pooled) = match Engine::new(&config(Some(instances))) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(error = %e, "the pooling allocator is unavailable; allocating VMs on demand");
                    let engine = Engine::new(&config(None))
                        .unwrap_or_else(|e| panic!("cannot create the Wasm engine: {e}"));
                    (engine, false)
                }
            };
            start_ticker(engine.clone());
            Runtime {
                engine,
                pooled,
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

    /// Forgets compiled modules whose digest `keep` does not hold (those in use stay alive
    /// through their users; this drops the cache's hold).
    pub fn retain_modules(&self, keep: &dyn Fn(&str) -> bool) {
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d, _| keep(d));
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
    if let Some(dir) = path.parent() {
        prune_cache(dir, MAX_CACHED_MODULES);
    }
}

/// Compiled modules kept on disk at most: the oldest go first (a proxy that gets a new module
/// on every push does not fill its disk).
const MAX_CACHED_MODULES: usize = 256;

/// Removes the least recently written `.cwasm` files of `dir` beyond `keep`. (A process using
/// one keeps its mapping; it is compiled again when next loaded.)
fn prune_cache(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= keep {
        return;
    }
    files.sort();
    for (_, p) in &files[..files.len() - keep] {
        let _ = std::fs::remove_file(p);
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

/// Increments the engine's epoch every [`tick`], on its own thread. A store's deadline is
/// counted in these ticks. The ticker parks when no thread may be running a guest for
/// [`QUIET_TICKS`] ticks in a row (an idle proxy does not wake a thousand times a second), and
/// the next thread that may run one wakes it.
fn start_ticker(engine: Engine) {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("weft-wasm-epoch".into())
        .spawn(move || {
            let mut quiet = 0;
            loop {
                std::thread::sleep(tick());
                engine.increment_epoch();
                if guests::busy() {
                    quiet = 0;
                    continue;
                }
                quiet += 1;
                if quiet >= QUIET_TICKS {
                    guests::park_ticker();
                    quiet = 0;
                }
            }
        });
    match spawned {
        Ok(handle) => {
            let _ = guests::TICKER.set(handle.thread().clone());
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start the Wasm epoch ticker: guest calls would not be bounded");
        }
    }
}

/// Ticks without a guest that may be running before the ticker parks.
const QUIET_TICKS: u32 = 5;

/// The ticker's period in µs: a tenth of the shortest `cpu_per_call` of any VM made so far,
/// between [`EPOCH_TICK`] and [`MAX_TICK`] (the default 100 ms limit ticks every 10 ms, so a
/// runaway call is stopped within 10 % of its limit, at a hundred wake-ups a second).
static TICK_MICROS: AtomicU64 = AtomicU64::new(MAX_TICK.as_micros() as u64);

/// The coarsest tick.
pub const MAX_TICK: Duration = Duration::from_millis(10);

/// The ticker's period now.
pub fn tick() -> Duration {
    Duration::from_micros(TICK_MICROS.load(Ordering::Relaxed))
}

/// Makes the tick fine enough for a VM whose calls are allowed `limit` (it never coarsens
/// again: VMs made earlier keep their precision).
pub fn fit_tick(limit: Duration) {
    let wanted = tick_for(limit).as_micros() as u64;
    TICK_MICROS.fetch_min(wanted, Ordering::Relaxed);
}

/// Deadline in epoch ticks, at the current tick, for a call allowed `limit`: stopped between
/// `limit` and `limit` plus one tick after it starts.
pub fn ticks(limit: Duration) -> u64 {
    ticks_of(limit, tick())
}

fn ticks_of(limit: Duration, tick: Duration) -> u64 {
    (limit.as_micros() / tick.as_micros().max(1)).max(1) as u64 + 1
}

fn tick_for(limit: Duration) -> Duration {
    (limit / 10).clamp(EPOCH_TICK, MAX_TICK)
}

/// Which threads may be running a guest, for the ticker to know when it may park.
///
/// A worker marks its slot busy whenever its runtime is awake (tokio's park and unpark hooks:
/// no cost per call); any other thread marks it around each call with [`enter`]. Marking busy
/// and the ticker deciding to park are ordered (sequentially consistent store, then load, on
/// both sides), so either the thread sees the ticker parked and wakes it, or the ticker sees
/// the thread busy and keeps ticking.
pub mod guests {
    use std::cell::Cell;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
    use std::thread::Thread;

    /// One cache line per slot; threads beyond the slots share them (a counter, so sharing is
    /// only slower, never wrong).
    #[repr(align(64))]
    struct Slot(AtomicU32);

    const SLOTS: usize = 32;
    static BUSY: [Slot; SLOTS] = [const { Slot(AtomicU32::new(0)) }; SLOTS];
    static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
    static PARKED: AtomicBool = AtomicBool::new(false);
    pub(super) static TICKER: OnceLock<Thread> = OnceLock::new();

    thread_local! {
        static SLOT: usize = NEXT_SLOT.fetch_add(1, SeqCst) % SLOTS;
        /// This thread is a worker whose awake time is marked by its runtime's hooks.
        static HOOKED: Cell<bool> = const { Cell::new(false) };
    }

    fn slot() -> &'static AtomicU32 {
        &BUSY[SLOT.with(|s| *s)].0
    }

    fn mark_busy() {
        slot().fetch_add(1, SeqCst);
        if PARKED.load(SeqCst)
            && PARKED.swap(false, SeqCst)
            && let Some(t) = TICKER.get()
        {
            t.unpark();
        }
    }

    fn mark_idle() {
        slot().fetch_sub(1, SeqCst);
    }

    /// A worker thread starts: it is busy until its runtime parks, and from then on whenever
    /// its runtime is awake, until the returned mark is dropped (the thread ends).
    pub fn worker_started() -> Entered {
        HOOKED.with(|h| h.set(true));
        mark_busy();
        Entered(())
    }

    /// Tokio's `on_thread_park` hook of a worker.
    pub fn worker_parks() {
        mark_idle();
    }

    /// Tokio's `on_thread_unpark` hook of a worker.
    pub fn worker_unparked() {
        mark_busy();
    }

    /// A call into a guest is about to run on this thread.
    pub fn enter() -> Option<Entered> {
        if HOOKED.with(Cell::get) {
            return None;
        }
        mark_busy();
        Some(Entered(()))
    }

    /// Marks a thread busy until dropped: a thread that is not a worker while it runs a guest,
    /// or a worker thread for its life.
    #[derive(Debug)]
    pub struct Entered(());

    impl Drop for Entered {
        fn drop(&mut self) {
            mark_idle();
        }
    }

    pub(super) fn busy() -> bool {
        BUSY.iter().any(|s| s.0.load(SeqCst) != 0)
    }

    /// Parks the ticker until a thread is busy again (returns at once if one is).
    pub(super) fn park_ticker() {
        PARKED.store(true, SeqCst);
        if busy() {
            PARKED.store(false, SeqCst);
            return;
        }
        while PARKED.load(SeqCst) {
            std::thread::park();
        }
    }
}

/// Shared handle on the runtime.
pub type SharedRuntime = Arc<Runtime>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_shortest_limit() {
        let ms = Duration::from_millis;
        assert_eq!(tick_for(ms(100)), ms(10), "the default limit");
        assert_eq!(tick_for(ms(1)), ms(1), "never finer than 1 ms");
        assert_eq!(
            tick_for(Duration::from_secs(60)),
            ms(10),
            "never coarser than 10 ms"
        );
        assert_eq!(tick_for(ms(25)), Duration::from_micros(2500));
        // Stopped between the limit and one tick past it.
        assert_eq!(ticks_of(ms(100), ms(10)), 11);
        assert_eq!(ticks_of(ms(1), ms(1)), 2);
        assert_eq!(ticks_of(ms(25), Duration::from_micros(2500)), 11);
        // A VM made before a finer tick keeps its limit in time, not in ticks.
        assert_eq!(ticks_of(ms(100), ms(1)), 101);
    }

    #[test]
    fn the_disk_cache_keeps_the_newest_modules() {
        let dir = tempfile::tempdir().expect("dir");
        for i in 0..5 {
            let p = dir.path().join(format!("{i}.cwasm"));
            std::fs::write(&p, b"x").expect("write");
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_modified(t))
                .expect("mtime");
        }
        std::fs::write(dir.path().join("other.txt"), b"x").expect("write");
        super::prune_cache(dir.path(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["3.cwasm", "4.cwasm", "other.txt"]);
    }
}
