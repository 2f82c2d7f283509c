//! One VM: a module instance with its own memory and contexts, living on one worker (or, to
//! validate a configuration, on the control thread). Every call into it goes through
//! [`Vm::call`]: bounded in time (epoch deadline) and memory (store limits); a trap, a deadline
//! or an exhausted memory fails the VM, which is never called again (the worker starts a new
//! one for later streams).

mod deliver;
mod stream;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Instance, Store, StoreLimitsBuilder, Trap, TypedFunc};
use weft_abi::names::callback as cb;
use weft_abi::{AbiVersion, Action};

use super::module::LoadedModule;
use super::runtime::{Runtime, ticks};
use super::shared::{TrapLabels, WasmShared};
use super::state::{
    Call, Callback, CalloutData, Context, Headers, HostState, IdMap, PluginInfo, RootContext,
    SharedStream, StreamContext,
};
use super::worker::WasmWorker;

/// Why a call into a VM did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmFailure {
    /// The VM failed earlier; it is not called any more.
    Failed,
    /// This call trapped (`kind`: trap, deadline, memory); the VM is now failed.
    Trapped { kind: &'static str, message: String },
}

impl std::error::Error for VmFailure {}

impl std::fmt::Display for VmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmFailure::Failed => f.write_str("the filter's VM has failed"),
            VmFailure::Trapped { kind, message } => write!(f, "{kind}: {message}"),
        }
    }
}

/// Why a VM or a root context could not start.
fn why(reason: &Option<String>) -> String {
    reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("cannot instantiate the module: {0}")]
    Instantiate(String),
    #[error("the module failed while starting: {0}")]
    Init(String),
    #[error("proxy_on_vm_start returned false{}", why(.0))]
    VmStartRejected(Option<String>),
    #[error("the plugin configuration was rejected (proxy_on_configure returned false){}", why(.0))]
    ConfigureRejected(Option<String>),
    #[error("the module failed while being configured: {0}")]
    Trapped(VmFailure),
}

/// How a VM is made.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub module: Arc<LoadedModule>,
    pub vm_id: Arc<str>,
    pub vm_config: Bytes,
    pub memory: usize,
    pub cpu_per_call: Duration,
    /// What the guest may make the host hold for it.
    pub host: super::runtime::HostLimits,
}

enum HeadersFn {
    V2(TypedFunc<(i32, i32, i32), i32>),
    V1(TypedFunc<(i32, i32), i32>),
}

type F1 = TypedFunc<i32, ()>;
type F2 = TypedFunc<(i32, i32), ()>;
type F3 = TypedFunc<(i32, i32, i32), ()>;
type R2 = TypedFunc<(i32, i32), i32>;
type R3 = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The callbacks a module exports (each optional: a missing one gets the host's default).
#[derive(Default)]
struct Exports {
    on_context_create: Option<F2>,
    on_vm_start: Option<R2>,
    on_configure: Option<R2>,
    on_tick: Option<F1>,
    on_queue_ready: Option<F2>,
    on_request_headers: Option<HeadersFn>,
    on_request_body: Option<R3>,
    on_request_trailers: Option<R2>,
    on_response_headers: Option<HeadersFn>,
    on_response_body: Option<R3>,
    on_response_trailers: Option<R2>,
    on_http_call_response: Option<F5>,
    on_grpc_initial_metadata: Option<F3>,
    on_grpc_receive: Option<F3>,
    on_grpc_trailing_metadata: Option<F3>,
    on_grpc_close: Option<F3>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<F1>,
    on_delete: Option<F1>,
}

fn typed<P, R>(
    store: &mut Store<HostState>,
    instance: &Instance,
    name: &str,
) -> Option<TypedFunc<P, R>>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    instance.get_func(&mut *store, name)?;
    match instance.get_typed_func::<P, R>(&mut *store, name) {
        Ok(f) => Some(f),
        Err(e) => {
            // proxy-wasm-cpp-host treats a mistyped callback as absent; so do we, loudly.
            tracing::warn!(export = name, error = %e, "ignoring a callback with the wrong signature");
            None
        }
    }
}

impl Exports {
    fn find(store: &mut Store<HostState>, i: &Instance, abi: AbiVersion) -> Exports {
        let headers = |store: &mut Store<HostState>, name| {
            if abi.headers_have_end_of_stream() {
                typed(store, i, name).map(HeadersFn::V2)
            } else {
                typed(store, i, name).map(HeadersFn::V1)
            }
        };
        Exports {
            on_context_create: typed(store, i, cb::ON_CONTEXT_CREATE),
            on_vm_start: typed(store, i, cb::ON_VM_START),
            on_configure: typed(store, i, cb::ON_CONFIGURE),
            on_tick: typed(store, i, cb::ON_TICK),
            on_queue_ready: typed(store, i, cb::ON_QUEUE_READY),
            on_request_headers: headers(store, cb::ON_REQUEST_HEADERS),
            on_request_body: typed(store, i, cb::ON_REQUEST_BODY),
            on_request_trailers: typed(store, i, cb::ON_REQUEST_TRAILERS),
            on_response_headers: headers(store, cb::ON_RESPONSE_HEADERS),
            on_response_body: typed(store, i, cb::ON_RESPONSE_BODY),
            on_response_trailers: typed(store, i, cb::ON_RESPONSE_TRAILERS),
            on_http_call_response: typed(store, i, cb::ON_HTTP_CALL_RESPONSE),
            on_grpc_initial_metadata: typed(store, i, cb::ON_GRPC_RECEIVE_INITIAL_METADATA),
            on_grpc_receive: typed(store, i, cb::ON_GRPC_RECEIVE),
            on_grpc_trailing_metadata: typed(store, i, cb::ON_GRPC_RECEIVE_TRAILING_METADATA),
            on_grpc_close: typed(store, i, cb::ON_GRPC_CLOSE),
            on_done: typed(store, i, cb::ON_DONE),
            on_log: typed(store, i, cb::ON_LOG),
            on_delete: typed(store, i, cb::ON_DELETE),
        }
    }
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

pub struct Vm {
    uid: u64,
    pub spec: VmSpec,
    store: RefCell<Store<HostState>>,
    x: Exports,
    failed: Cell<bool>,
    started: std::time::Instant,
    next_id: Cell<u32>,
    shared: Arc<WasmShared>,
    on_worker: bool,
    ticks: RefCell<IdMap<tokio::task::AbortHandle>>,
    /// Root contexts by plugin identity, and the streams each serves now.
    roots: RefCell<HashMap<Arc<PluginKey>, u32>>,
    streams_of: RefCell<IdMap<(usize, bool)>>,
}

/// What makes a plugin: its name, root id and configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginKey {
    pub name: Arc<str>,
    pub root_id: Arc<str>,
    pub config: Bytes,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("uid", &self.uid)
            .field("module", &self.spec.module.name)
            .field("failed", &self.failed.get())
            .finish()
    }
}

fn trap_kind(e: &wasmtime::Error) -> &'static str {
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return "deadline";
    }
    let text = format!("{e:#}");
    if text.contains("memory")
        && (text.contains("grow") || text.contains("allocat") || text.contains("limit"))
    {
        "memory"
    } else {
        "trap"
    }
}

impl Vm {
    /// What the guest last warned about (a rejection's reason), once.
    fn take_complaint(&self) -> Option<String> {
        self.store.borrow_mut().data_mut().last_complaint.take()
    }

    /// Instantiates the module and runs its start-up (`_initialize`, then `main` or
    /// `__main_void`; else `_start`).
    pub fn start(
        spec: VmSpec,
        worker: Option<Weak<WasmWorker>>,
        shared: Arc<WasmShared>,
    ) -> Result<Rc<Vm>, StartError> {
        let engine = Runtime::global().engine();
        let module = &spec.module;
        let limits = StoreLimitsBuilder::new()
            .memory_size(spec.memory)
            .instances(1)
            .memories(1)
            .tables(4)
            .table_elements(1_000_000)
            .build();
        let on_worker = worker.is_some();
        let state = HostState {
            limits,
            host_limits: spec.host,
            abi: module.abi,
            vm_id: spec.vm_id.clone(),
            vm_config: spec.vm_config.clone(),
            module_name: module.name.clone(),
            contexts: IdMap::default(),
            call: Call::default(),
            callout: None,
            status: (0, Bytes::new()),
            alloc: None,
            memory: None,
            shared: shared.clone(),
            worker,
            vm: Weak::new(),
            tick_changes: Vec::new(),
            skipped: Default::default(),
            metrics: Default::default(),
            awaiting_done: Default::default(),
            done: Vec::new(),
            next_callout_token: 0,
            callouts: IdMap::default(),
            grpc: IdMap::default(),
            log_level: super::host::log::current_level(),
            last_complaint: None,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        super::runtime::fit_tick(spec.cpu_per_call);
        let _entered = super::runtime::guests::enter();
        // Start-up may do more than a callback (static initializers): give it ten times as long.
        store.set_epoch_deadline(ticks(spec.cpu_per_call).saturating_mul(10));
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| StartError::Instantiate(format!("{e:#}")))?;
        let alloc = typed::<i32, i32>(&mut store, &instance, cb::ON_MEMORY_ALLOCATE)
            .or_else(|| typed::<i32, i32>(&mut store, &instance, cb::MALLOC));
        let memory = instance.get_memory(&mut store, cb::MEMORY);
        store.data_mut().alloc = alloc.map(Rc::new);
        store.data_mut().memory = memory;
        let x = Exports::find(&mut store, &instance, module.abi);

        store.data_mut().call.phase = Callback::Start;
        let init = (|| -> wasmtime::Result<()> {
            if let Some(f) = typed::<(), ()>(&mut store, &instance, cb::INITIALIZE) {
                f.call(&mut store, ())?;
                if let Some(main) = typed::<(i32, i32), i32>(&mut store, &instance, cb::MAIN) {
                    main.call(&mut store, (0, 0))?;
                } else if let Some(main) = typed::<(), i32>(&mut store, &instance, cb::MAIN_VOID) {
                    main.call(&mut store, ())?;
                }
            } else if let Some(start) = typed::<(), ()>(&mut store, &instance, cb::START) {
                start.call(&mut store, ())?;
            }
            Ok(())
        })();
        store.data_mut().call = Call::default();
        init.map_err(|e| StartError::Init(format!("{e:#}")))?;

        shared
            .stats
            .vm_starts
            .get_or_create(&super::shared::FilterLabels {
                filter: spec.vm_id.to_string(),
            })
            .inc();
        let vm = Rc::new(Vm {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            spec,
            store: RefCell::new(store),
            x,
            failed: Cell::new(false),
            started: std::time::Instant::now(),
            next_id: Cell::new(1),
            shared,
            on_worker,
            ticks: RefCell::new(IdMap::default()),
            roots: RefCell::new(HashMap::new()),
            streams_of: RefCell::new(IdMap::default()),
        });
        vm.store.borrow_mut().data_mut().vm = Rc::downgrade(&vm);
        Ok(vm)
    }

    pub fn uid(&self) -> u64 {
        self.uid
    }

    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// How long ago the VM started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    fn next_context(&self) -> u32 {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1).max(1));
        id
    }

    /// Runs one call into the guest for `context`.
    fn call<R>(
        &self,
        context: u32,
        phase: Callback,
        eos: bool,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, VmFailure> {
        if self.failed.get() {
            return Err(VmFailure::Failed);
        }
        let Ok(mut store) = self.store.try_borrow_mut() else {
            // Never expected: nothing calls a guest from inside a host function.
            return Err(VmFailure::Trapped {
                kind: "trap",
                message: "re-entered".into(),
            });
        };
        store.data_mut().call = Call {
            context,
            effective: context,
            phase,
            end_of_stream: eos,
        };
        let entered = super::runtime::guests::enter();
        store.set_epoch_deadline(ticks(self.spec.cpu_per_call));
        let result = f(&mut store);
        drop(entered);
        let state = store.data_mut();
        state.call = Call::default();
        state.callout = None;
        let ticks = std::mem::take(&mut state.tick_changes);
        let done = std::mem::take(&mut state.done);
        if result.is_ok() {
            drop(store);
            self.apply_ticks(ticks);
            for id in done {
                self.delete(id);
            }
            return result.map_err(|_| VmFailure::Failed);
        }
        let filter = match state.contexts.get(&context) {
            Some(Context::Root(r)) => Some(r.plugin.name.clone()),
            Some(Context::Stream(s)) => match state.contexts.get(&s.root) {
                Some(Context::Root(r)) => Some(r.plugin.name.clone()),
                _ => None,
            },
            None => None,
        }
        .unwrap_or_else(|| state.module_name.clone());
        drop(store);
        match result {
            Ok(v) => Ok(v),
            Err(e) => Err(self.fail(&filter, phase, e)),
        }
    }

    fn fail(&self, filter: &Arc<str>, phase: Callback, e: wasmtime::Error) -> VmFailure {
        let kind = trap_kind(&e);
        self.failed.set(true);
        for (_, t) in self.ticks.borrow_mut().drain() {
            t.abort();
        }
        self.shared
            .stats
            .traps
            .get_or_create(&TrapLabels {
                filter: filter.to_string(),
                kind,
            })
            .inc();
        let message = format!("{e:#}");
        tracing::error!(filter = %filter, ?phase, kind, "Wasm VM failed: {message}");
        let worker = self
            .store
            .try_borrow()
            .ok()
            .and_then(|s| s.data().worker.as_ref().and_then(Weak::upgrade));
        if let Some(w) = worker {
            w.vm_failed();
        }
        // Streams paused on this VM learn of it now, not when they time out.
        let streams: Vec<SharedStream> = match self.store.try_borrow() {
            Ok(store) => store
                .data()
                .contexts
                .values()
                .filter_map(|c| match c {
                    Context::Stream(s) => Some(s.stream.clone()),
                    Context::Root(_) => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for s in streams {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.wake_all();
            }
        }
        VmFailure::Trapped {
            kind,
            message: format!("{e}"),
        }
    }

    fn apply_ticks(&self, changes: Vec<(u32, Duration)>) {
        if changes.is_empty() {
            return;
        }
        if changes.is_empty() || !self.on_worker {
            return;
        }
        let weak = self.store.borrow().data().vm.clone();
        let mut ticks = self.ticks.borrow_mut();
        for (root, period) in changes {
            if let Some(old) = ticks.remove(&root) {
                old.abort();
            }
            if period.is_zero() {
                continue;
            }
            let weak = weak.clone();
            let task = tokio::task::spawn_local(async move {
                let mut interval =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    match weak.upgrade() {
                        Some(vm) if !vm.failed() => vm.tick(root),
                        _ => return,
                    }
                }
            });
            ticks.insert(root, task.abort_handle());
        }
    }

    /// Creates (or finds) the root context of `plugin`: `proxy_on_context_create(root, 0)`,
    /// `proxy_on_vm_start`, `proxy_on_configure`.
    pub fn root(&self, plugin: &Arc<PluginInfo>) -> Result<u32, StartError> {
        let key = Arc::new(PluginKey {
            name: plugin.name.clone(),
            root_id: plugin.root_id.clone(),
            config: plugin.config.clone(),
        });
        if let Some(id) = self.roots.borrow().get(&key) {
            return Ok(*id);
        }
        let id = self.next_context();
        self.store.borrow_mut().data_mut().contexts.insert(
            id,
            Context::Root(RootContext {
                plugin: plugin.clone(),
                golden: None,
            }),
        );
        let trapped = StartError::Trapped;
        if let Some(f) = &self.x.on_context_create {
            self.call(id, Callback::ContextCreate, false, |s| {
                f.call(s, (id as i32, 0))
            })
            .map_err(trapped)?;
        }
        let vm_config_len = self.spec.vm_config.len() as i32;
        self.store.borrow_mut().data_mut().last_complaint = None;
        if let Some(f) = &self.x.on_vm_start
            && self
                .call(id, Callback::VmStart, false, |s| {
                    f.call(s, (id as i32, vm_config_len))
                })
                .map_err(trapped)?
                == 0
        {
            return Err(StartError::VmStartRejected(self.take_complaint()));
        }
        let config_len = plugin.config.len() as i32;
        if let Some(f) = &self.x.on_configure
            && self
                .call(id, Callback::Configure, false, |s| {
                    f.call(s, (id as i32, config_len))
                })
                .map_err(trapped)?
                == 0
        {
            return Err(StartError::ConfigureRejected(self.take_complaint()));
        }
        self.roots.borrow_mut().insert(key, id);
        self.streams_of.borrow_mut().insert(id, (0, false));
        Ok(id)
    }

    /// Roots of plugins not in `keep` are retired: finished at once, or when their last stream
    /// ends.
    pub fn retire_roots_except(&self, keep: &[Arc<PluginInfo>]) {
        let gone: Vec<u32> = self
            .roots
            .borrow()
            .iter()
            .filter(|(k, _)| {
                !keep
                    .iter()
                    .any(|p| p.name == k.name && p.root_id == k.root_id && p.config == k.config)
            })
            .map(|(_, id)| *id)
            .collect();
        for id in gone {
            self.roots.borrow_mut().retain(|_, v| *v != id);
            let idle = {
                let mut s = self.streams_of.borrow_mut();
                let e = s.entry(id).or_insert((0, false));
                e.1 = true;
                e.0 == 0
            };
            if idle {
                self.finish_context(id);
            }
        }
    }
}
