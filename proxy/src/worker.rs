//! Workers: one OS thread each, with a single-threaded tokio runtime, its own accept sockets
//! (`SO_REUSEPORT`, so the kernel spreads connections), its own upstream pools and a cached
//! handle on the current snapshot. A connection lives and dies on the worker that accepted it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::http::server;
use crate::published::{Published, Worker};

/// Caps the connections open at once on one bound listener, across workers: in all, and from
/// one source IP.
#[derive(Debug)]
pub struct ConnLimit {
    open: AtomicU32,
    max: AtomicU32,
    per_ip_max: AtomicU32,
    /// Open connections per source IP (only kept while `per_ip_max` is set).
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl ConnLimit {
    /// `max` and `per_ip` 0 mean no limit.
    pub fn new(max: u32, per_ip: u32) -> Self {
        let limit = ConnLimit {
            open: AtomicU32::new(0),
            max: AtomicU32::new(0),
            per_ip_max: AtomicU32::new(0),
            per_ip: Mutex::new(HashMap::new()),
        };
        limit.set_max(max, per_ip);
        limit
    }

    /// A reload changed the limits: they apply to connections accepted from now on.
    pub fn set_max(&self, max: u32, per_ip: u32) {
        self.max
            .store(if max == 0 { u32::MAX } else { max }, Ordering::Release);
        self.per_ip_max.store(per_ip, Ordering::Release);
    }

    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max.load(Ordering::Acquire) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let per_ip_max = self.per_ip_max.load(Ordering::Acquire);
        if per_ip_max == 0 {
            return Some(ConnPermit {
                limit: self.clone(),
                ip: None,
            });
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= per_ip_max {
            drop(per_ip);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *n += 1;
        Some(ConnPermit {
            limit: self.clone(),
            ip: Some(ip),
        })
    }
}

struct ConnPermit {
    limit: Arc<ConnLimit>,
    /// Counted against its source IP.
    ip: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut per_ip = self.limit.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Occupied(mut e) = per_ip.entry(ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

/// What the control thread tells a worker.
#[derive(Debug)]
pub enum Command {
    /// Start accepting on this socket for listener `name`; `id` names this binding.
    Listen {
        id: u64,
        name: Arc<str>,
        socket: std::net::TcpListener,
        limit: Arc<ConnLimit>,
    },
    /// Stop accepting on binding `id` and drain its connections.
    Unlisten { id: u64 },
    /// Stop accepting everywhere, drain every connection, and end the worker once they are
    /// closed or at `deadline`.
    Drain { deadline: Instant },
}

/// Handle the control thread keeps on a worker.
#[derive(Debug)]
pub struct WorkerHandle {
    pub commands: mpsc::UnboundedSender<Command>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts worker `id` on its own thread.
pub fn spawn(id: usize, shared: Arc<Published>) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name(format!("weft-worker-{id}"))
        .spawn(move || {
            // The Wasm epoch ticker runs while a worker is awake and may park while all sleep.
            let _awake = crate::wasm::runtime::guests::worker_started();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::wasm::runtime::guests::worker_parks)
                .on_thread_unpark(crate::wasm::runtime::guests::worker_unparked)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = id, error = %e, "cannot start the worker's runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(id, shared, rx));
        })?;
    Ok(WorkerHandle {
        commands: tx,
        thread,
    })
}

async fn run(id: usize, shared: Arc<Published>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let worker = Worker::start(id, shared);
    tokio::task::spawn_local(sweep_pools(worker.clone()));

    let mut listeners: HashMap<u64, watch::Sender<bool>> = HashMap::new();
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::Listen {
                id: binding,
                name,
                socket,
                limit,
            } => {
                let listener = match TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(worker = id, listener = %name, error = %e, "cannot register the listening socket");
                        continue;
                    }
                };
                let (stop_tx, stop_rx) = watch::channel(false);
                if let Some(old) = listeners.insert(binding, stop_tx) {
                    let _ = old.send(true);
                }
                tokio::task::spawn_local(accept_loop(
                    worker.clone(),
                    name,
                    listener,
                    limit,
                    stop_rx,
                ));
            }
            Command::Unlisten { id: binding } => {
                if let Some(stop) = listeners.remove(&binding) {
                    let _ = stop.send(true);
                }
            }
            Command::Drain { deadline } => {
                for stop in listeners.values() {
                    let _ = stop.send(true);
                }
                if tokio::time::timeout_at(deadline.into(), worker.all_closed())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        worker = id,
                        open = worker.connections(),
                        "grace period over: closing the connections still open"
                    );
                }
                return;
            }
        }
    }
}

async fn accept_loop(
    worker: Rc<Worker>,
    name: Arc<str>,
    listener: TcpListener,
    limit: Arc<ConnLimit>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let snap = worker.snapshot();
        let Some(runtime) = snap.listeners.get(&*name).cloned() else {
            // Removed by a reload the worker has not acted on yet.
            continue;
        };
        let Some(permit) = limit.try_acquire(peer.ip()) else {
            runtime.stats.cx_rejected.inc();
            continue;
        };
        let worker = worker.clone();
        let stop = stop.clone();
        tokio::task::spawn_local(async move {
            let open = Rc::new(OpenConnection::new(worker, runtime, permit));
            if let Some(capture) = open.runtime.capture {
                let Some(sidecar) = snap.sidecar.clone() else {
                    return;
                };
                let captured = crate::sidecar::capture::Captured {
                    worker: open.worker.clone(),
                    listener: open.runtime.clone(),
                    sidecar,
                    hold: open.clone(),
                    peer,
                    stop,
                };
                crate::sidecar::capture::serve(captured, capture, stream).await;
                return;
            }
            if open.runtime.tcp.is_some() {
                crate::tcp::serve(open.runtime.clone(), stream, peer, stop).await;
                return;
            }
            let (worker, runtime) = (open.worker.clone(), open.runtime.clone());
            server::serve(worker, runtime, open, stream, peer, stop).await;
        });
    }
}

/// Counts a downstream connection as open — in `weft_downstream_connections_active`, in its
/// listener's `max_connections` and for the worker's drain — until its task ends (even by a
/// panic), or the tunnel it became (an upgrade, `CONNECT`) ends.
struct OpenConnection {
    worker: Rc<Worker>,
    runtime: Arc<crate::snapshot::ListenerRuntime>,
    _permit: ConnPermit,
}

impl OpenConnection {
    fn new(
        worker: Rc<Worker>,
        runtime: Arc<crate::snapshot::ListenerRuntime>,
        permit: ConnPermit,
    ) -> Self {
        worker.connection_opened();
        runtime.stats.cx_total.inc();
        runtime.stats.cx_active.inc();
        OpenConnection {
            worker,
            runtime,
            _permit: permit,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.runtime.stats.cx_active.dec();
        self.worker.connection_closed();
    }
}

/// Closes idle upstream connections past their cluster's idle timeout.
async fn sweep_pools(worker: Rc<Worker>) {
    let mut tick = tokio::time::interval(crate::upstream::pool::SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = worker.snapshot();
        worker
            .pools
            .borrow_mut()
            .sweep(|cluster| snap.cluster(cluster).map(|c| c.idle_timeout));
    }
}
