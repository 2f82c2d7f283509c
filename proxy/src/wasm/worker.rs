//! A worker's Wasm side: its VMs (one per [`VmKey`], each with a root context per plugin), the
//! callouts, timers and queue notifications they need, and their replacement — after a failure
//! (with a back-off when a VM keeps failing fast) and after a reload (new streams get the new
//! VMs; streams in flight finish on the old ones, which go when their last stream does).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::callout::{self, GrpcHandle, GrpcTarget, HttpCallout};
use super::runtime::caps;
use super::shared::{QueueReady, WasmShared};
use super::state::IdHasher;
use super::vm::{StartError, Vm, VmFailure};
use super::{FilterSpec, ServiceSpec, VmKey};
use crate::upstream::{Cluster, Pools};
use std::hash::BuildHasherDefault;

/// What a worker's Wasm side needs of a configuration: its plugins and the clusters callouts
/// go to. The proxy's snapshot is one; the Wasm side does not know the rest of it.
pub trait WasmConfig {
    fn version(&self) -> u64;
    /// Every filter and service plugin.
    fn plugins(&self) -> Box<dyn Iterator<Item = &Arc<FilterSpec>> + '_>;
    fn services(&self) -> Box<dyn Iterator<Item = &Arc<ServiceSpec>> + '_>;
    fn cluster(&self, name: &str) -> Option<&Arc<Cluster>>;
}

/// Where the current configuration comes from (the configuration every worker shares).
pub trait ConfigSource {
    fn current(&self) -> Arc<dyn WasmConfig + Send + Sync>;
    /// Changes each time a new configuration is published.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// A VM that failed this soon after starting counts as failing fast.
const FAST_FAILURE: Duration = Duration::from_secs(1);
/// Fast failures in a row before restarts are spaced out.
const FREE_RESTARTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why a filter has no VM for a stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("{0}")]
    Failed(#[from] VmFailure),
    #[error("the VM keeps failing; next start in {0:?}")]
    BackingOff(Duration),
}

#[derive(Debug, Default, Clone, Copy)]
struct Restarts {
    fast_failures: u32,
    not_before: Option<Instant>,
}

/// A filter's spec (kept alive), its VM and its root context id, by the spec's address.
type Instances = HashMap<usize, (Arc<FilterSpec>, Rc<Vm>, u32), BuildHasherDefault<IdHasher>>;

/// A service running on this worker: its spec, VM and root context.
struct Running {
    spec: Arc<ServiceSpec>,
    vm: Rc<Vm>,
}

pub struct WasmWorker {
    pub id: usize,
    host: Arc<WasmShared>,
    proxy: Arc<dyn ConfigSource>,
    pools: Rc<RefCell<Pools>>,
    vms: RefCell<HashMap<VmKey, Rc<Vm>>>,
    /// Where each filter of the current configuration runs, by the address of its spec (kept
    /// alive here, so the address is not reused while it is a key): the per-request lookup.
    instances: RefCell<Instances>,
    /// Every VM still alive (cached or serving old streams), by uid, for queue notifications.
    by_uid: RefCell<HashMap<u64, Weak<Vm>>>,
    restarts: RefCell<HashMap<VmKey, Restarts>>,
    queue_tx: mpsc::UnboundedSender<QueueReady>,
    me: Weak<WasmWorker>,
    /// The snapshot version the cache was last pruned for.
    version: Cell<u64>,
    /// Callouts in flight on this worker, all VMs together.
    callouts: Rc<Cell<usize>>,
    /// The services this worker runs, by name.
    services: RefCell<HashMap<Arc<str>, Running>>,
    /// Told when one of the worker's VMs fails (a service may need a restart).
    failed: Rc<Notify>,
}

/// A callout's place among the worker's callouts in flight, given back when it is dropped
/// (the callout completed, failed, or was cancelled).
#[derive(Debug)]
pub struct CalloutSlot(Rc<Cell<usize>>);

impl Drop for CalloutSlot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl std::fmt::Debug for WasmWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmWorker")
            .field("id", &self.id)
            .field("vms", &self.vms.borrow().len())
            .finish()
    }
}

impl WasmWorker {
    /// Creates the worker's Wasm side; must run on the worker (it spawns its queue listener).
    pub fn new(
        id: usize,
        host: Arc<WasmShared>,
        proxy: Arc<dyn ConfigSource>,
        pools: Rc<RefCell<Pools>>,
    ) -> Rc<WasmWorker> {
        let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<QueueReady>();
        let version = proxy.current().version();
        let w = Rc::new_cyclic(|me| WasmWorker {
            id,
            host,
            proxy,
            pools,
            vms: RefCell::new(HashMap::new()),
            instances: RefCell::new(HashMap::default()),
            by_uid: RefCell::new(HashMap::new()),
            restarts: RefCell::new(HashMap::new()),
            queue_tx,
            me: me.clone(),
            version: Cell::new(version),
            callouts: Rc::new(Cell::new(0)),
            services: RefCell::new(HashMap::new()),
            failed: Rc::new(Notify::new()),
        });
        tokio::task::spawn_local(supervise(Rc::downgrade(&w)));
        let weak = Rc::downgrade(&w);
        tokio::task::spawn_local(async move {
            while let Some(ready) = queue_rx.recv().await {
                let Some(worker) = weak.upgrade() else {
                    return;
                };
                let vm = worker
                    .by_uid
                    .borrow()
                    .get(&ready.vm)
                    .and_then(Weak::upgrade);
                drop(worker);
                if let Some(vm) = vm
                    && !vm.failed()
                {
                    vm.queue_ready(ready.root, ready.queue);
                }
            }
        });
        w
    }

    /// The VM and root context `spec` runs in on this worker, started if need be.
    pub fn instance(&self, spec: &Arc<FilterSpec>) -> Result<(Rc<Vm>, u32), Unavailable> {
        let key = Arc::as_ptr(spec) as usize;
        if let Some((_, vm, root)) = self.instances.borrow().get(&key)
            && !vm.failed()
        {
            return Ok((vm.clone(), *root));
        }
        let (vm, root) = self.find_or_start(spec)?;
        self.instances
            .borrow_mut()
            .insert(key, (spec.clone(), vm.clone(), root));
        Ok((vm, root))
    }

    fn find_or_start(&self, spec: &FilterSpec) -> Result<(Rc<Vm>, u32), Unavailable> {
        let cached = self.vms.borrow().get(&spec.key).cloned();
        let vm = match cached {
            Some(vm) if !vm.failed() => vm,
            stale => {
                if let Some(old) = stale {
                    self.vms.borrow_mut().remove(&spec.key);
                    self.note_failure(&spec.key, old.age());
                }
                self.start(spec)?
            }
        };
        match vm.root(&spec.plugin) {
            Ok(root) => Ok((vm, root)),
            Err(e) => {
                // A plugin that passed the canary but not here: the VM is not trusted again.
                tracing::error!(worker = self.id, filter = %spec.name, error = %e, "the filter could not start on this worker");
                self.vms.borrow_mut().remove(&spec.key);
                self.note_failure(&spec.key, vm.age());
                Err(e.into())
            }
        }
    }

    fn start(&self, spec: &FilterSpec) -> Result<Rc<Vm>, Unavailable> {
        let now = Instant::now();
        if let Some(at) = self
            .restarts
            .borrow()
            .get(&spec.key)
            .and_then(|r| r.not_before)
            && at > now
        {
            return Err(Unavailable::BackingOff(at - now));
        }
        match Vm::start(spec.vm.clone(), Some(self.me.clone()), self.host.clone()) {
            Ok(vm) => {
                self.vms.borrow_mut().insert(spec.key.clone(), vm.clone());
                let mut by_uid = self.by_uid.borrow_mut();
                by_uid.retain(|_, w| w.strong_count() > 0);
                by_uid.insert(vm.uid(), Rc::downgrade(&vm));
                Ok(vm)
            }
            Err(e) => {
                tracing::error!(worker = self.id, filter = %spec.name, error = %e, "cannot start the filter's VM");
                self.note_failure(&spec.key, Duration::ZERO);
                Err(e.into())
            }
        }
    }

    /// Spaces out restarts of a VM that keeps failing soon after it starts.
    fn note_failure(&self, key: &VmKey, age: Duration) {
        let mut restarts = self.restarts.borrow_mut();
        let r = restarts.entry(key.clone()).or_default();
        if age < FAST_FAILURE {
            r.fast_failures += 1;
        } else {
            r.fast_failures = 1;
        }
        r.not_before = (r.fast_failures > FREE_RESTARTS).then(|| {
            let exp = (r.fast_failures - FREE_RESTARTS - 1).min(16);
            Instant::now() + FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
        });
    }

    /// After a reload: VMs no filter uses any more leave the cache, and root contexts of plugins
    /// no longer configured are retired (each once its last stream ends).
    pub fn refresh(&self, snapshot: &dyn WasmConfig) {
        if self.version.replace(snapshot.version()) == snapshot.version() {
            return;
        }
        self.instances.borrow_mut().clear();
        let mut vms = self.vms.borrow_mut();
        let gone: Vec<VmKey> = vms
            .keys()
            .filter(|k| !snapshot.plugins().any(|f| &f.key == *k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(vm) = vms.remove(&key) {
                vm.retire_roots_except(&[]);
            }
        }
        for (key, vm) in vms.iter() {
            let keep: Vec<_> = snapshot
                .plugins()
                .filter(|f| &f.key == key)
                .map(|f| f.plugin.clone())
                .collect();
            vm.retire_roots_except(&keep);
        }
        drop(vms);
        self.restarts
            .borrow_mut()
            .retain(|k, _| snapshot.plugins().any(|f| &f.key == k));
    }

    /// A VM of this worker failed.
    pub fn vm_failed(&self) {
        self.failed.notify_one();
    }

    /// Starts the services of `snapshot` this worker runs that are not running (new, changed,
    /// or failed), and lets go of those it no longer names. Answers when to try again, when a
    /// service could not start.
    fn run_services(&self, snapshot: &dyn WasmConfig) -> Option<Instant> {
        let wanted: Vec<&Arc<ServiceSpec>> =
            snapshot.services().filter(|s| s.runs_on(self.id)).collect();
        let stopped: Vec<Running> = {
            let mut running = self.services.borrow_mut();
            let names: Vec<Arc<str>> = running
                .iter()
                .filter(|(_, r)| {
                    !wanted
                        .iter()
                        .any(|w| Arc::ptr_eq(&w.plugin, &r.spec.plugin))
                })
                .map(|(n, _)| n.clone())
                .collect();
            names.iter().filter_map(|n| running.remove(n)).collect()
        };
        for r in stopped {
            tracing::info!(worker = self.id, service = %r.spec.plugin.name, "service stopped");
        }
        let mut retry: Option<Instant> = None;
        for spec in wanted {
            let name = &spec.plugin.name;
            // A running instance of the same plugin carries on (a new placement, say).
            if let Some(r) = self.services.borrow_mut().get_mut(name)
                && !r.vm.failed()
            {
                r.spec = spec.clone();
                continue;
            }
            let restart = self.services.borrow_mut().remove(name).is_some();
            match self.find_or_start(&spec.plugin) {
                Ok((vm, _root)) => {
                    if restart {
                        tracing::warn!(worker = self.id, service = %name, "service restarted after a failure");
                    } else {
                        tracing::info!(worker = self.id, service = %name, "service started");
                    }
                    self.services.borrow_mut().insert(
                        name.clone(),
                        Running {
                            spec: spec.clone(),
                            vm,
                        },
                    );
                }
                Err(e) => {
                    let at = match e {
                        Unavailable::BackingOff(d) => Instant::now() + d,
                        _ => Instant::now() + FIRST_BACKOFF,
                    };
                    tracing::warn!(worker = self.id, service = %name, error = %e, "service not running");
                    retry = Some(retry.map_or(at, |r| r.min(at)));
                }
            }
        }
        retry
    }

    /// A cluster of the current configuration, for callouts.
    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.proxy.current().cluster(name).cloned()
    }

    /// Where shared queues tell this worker of new items.
    pub fn queue_sender(&self) -> mpsc::UnboundedSender<QueueReady> {
        self.queue_tx.clone()
    }

    /// A place for one more callout, unless the worker has [`caps::WORKER_CALLOUTS`] in
    /// flight.
    pub fn callout_slot(&self) -> Option<CalloutSlot> {
        let n = self.callouts.get();
        if n >= caps::WORKER_CALLOUTS {
            return None;
        }
        self.callouts.set(n + 1);
        Some(CalloutSlot(self.callouts.clone()))
    }

    pub fn http_call(&self, vm: Weak<Vm>, call: HttpCallout, slot: CalloutSlot) {
        let pools = self.pools.clone();
        tokio::task::spawn_local(async move {
            callout::http(pools, vm, call).await;
            drop(slot);
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub fn grpc_call(
        &self,
        vm: Weak<Vm>,
        root: u32,
        token: u32,
        target: GrpcTarget,
        message: Bytes,
        timeout: Duration,
        slot: CalloutSlot,
    ) -> GrpcHandle {
        callout::grpc_call(
            self.pools.clone(),
            vm,
            (root, token),
            target,
            message,
            timeout,
            slot,
        )
    }

    pub fn grpc_stream(
        &self,
        vm: Weak<Vm>,
        root: u32,
        token: u32,
        target: GrpcTarget,
        slot: CalloutSlot,
    ) -> GrpcHandle {
        callout::grpc_stream(self.pools.clone(), vm, root, token, target, slot)
    }
}

/// Keeps a worker's services running: on each new snapshot, when one of the worker's VMs
/// fails, and when a service that could not start may be tried again.
async fn supervise(worker: Weak<WasmWorker>) {
    let Some(mut published) = worker.upgrade().map(|w| w.proxy.changes()) else {
        return;
    };
    loop {
        let Some(w) = worker.upgrade() else {
            return;
        };
        let snapshot = w.proxy.current();
        w.refresh(&*snapshot);
        let retry = w.run_services(&*snapshot);
        drop(snapshot);
        let failed = w.failed.clone();
        drop(w);
        let retry = async {
            match retry {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = failed.notified() => {}
            () = retry => {}
        }
    }
}
