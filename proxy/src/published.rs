//! What the control thread publishes to the workers — the current snapshot, with the metrics
//! and the Wasm state every worker shares — and each worker's own handles on it: the stages of
//! a request (HTTP, filters, upstreams) reach their worker's snapshot, pools and Wasm VMs
//! through [`Worker`], without knowing how workers accept or drain.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::upstream::Pools;
use crate::wasm::WasmShared;
use crate::wasm::worker::{ConfigSource, WasmConfig, WasmWorker};

/// A worker's handle on a snapshot. Requests clone the `Rc` (a plain increment on the worker's
/// own memory), not the `Arc` every worker shares.
#[derive(Debug)]
pub struct LocalSnapshot(Arc<Snapshot>);

impl std::ops::Deref for LocalSnapshot {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

/// What every worker shares: the snapshot new requests use, published by the control thread.
#[derive(Debug)]
pub struct Published {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
    /// The generation again, for what waits for a new snapshot instead of looking at each
    /// request (Wasm services).
    published: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    /// What Wasm filters share across workers.
    pub wasm: Arc<WasmShared>,
}

impl Published {
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, wasm: Arc<WasmShared>) -> Self {
        Published {
            current: ArcSwap::from_pointee(snapshot),
            generation: AtomicU64::new(0),
            published: watch::Sender::new(0),
            metrics,
            wasm,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `snapshot` the one new requests use.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        self.current.store(snapshot);
        let generation = self.generation.fetch_add(1, Ordering::Release) + 1;
        self.published.send_replace(generation);
    }

    /// Changes each time a snapshot is published.
    pub fn published(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }
}

impl ConfigSource for Published {
    fn current(&self) -> Arc<dyn WasmConfig + Send + Sync> {
        self.snapshot()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.published()
    }
}

/// One worker's handles: its snapshot, upstream pools and Wasm VMs, and its count of open
/// connections (the worker's drain waits for it).
pub struct Worker {
    pub id: usize,
    shared: Arc<Published>,
    cached: RefCell<(u64, Rc<LocalSnapshot>)>,
    pub pools: Rc<RefCell<Pools>>,
    /// The worker's filter VMs.
    pub wasm: Rc<WasmWorker>,
    connections: Cell<usize>,
    all_closed: Notify,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish()
    }
}

impl Worker {
    /// The current snapshot, refreshed when a new one was published (one atomic load otherwise).
    pub fn snapshot(&self) -> Rc<LocalSnapshot> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = (generation, Rc::new(LocalSnapshot(self.shared.snapshot())));
            self.wasm.refresh(&**cached.1);
        }
        cached.1.clone()
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.set(self.connections.get() + 1);
    }

    pub(crate) fn connection_closed(&self) {
        let n = self.connections.get().saturating_sub(1);
        self.connections.set(n);
        if n == 0 {
            self.all_closed.notify_waiters();
        }
    }

    /// Starts worker `id`'s handles; must run on the worker's thread.
    pub fn start(id: usize, shared: Arc<Published>) -> Rc<Worker> {
        let first = Rc::new(LocalSnapshot(shared.snapshot()));
        let pools = Rc::new(RefCell::new(Pools::default()));
        let wasm = WasmWorker::new(id, shared.wasm.clone(), shared.clone(), pools.clone());
        Rc::new(Worker {
            id,
            cached: RefCell::new((shared.generation.load(Ordering::Acquire), first)),
            shared,
            pools,
            wasm,
            connections: Cell::new(0),
            all_closed: Notify::new(),
        })
    }

    /// Open connections.
    pub(crate) fn connections(&self) -> usize {
        self.connections.get()
    }

    /// Waits until no connection is open.
    pub(crate) async fn all_closed(&self) {
        while self.connections.get() > 0 {
            let notified = self.all_closed.notified();
            if self.connections.get() == 0 {
                break;
            }
            notified.await;
        }
    }
}
