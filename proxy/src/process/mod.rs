//! The proxy's life: start (load, validate, bind, spawn workers), reload on SIGHUP (validate
//! fully, bind what is new, swap atomically, close what is gone), drain on SIGTERM/SIGINT.
//!
//! This runs on the control thread; workers only receive commands from it.

mod reload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, AdminState, Lifecycle, ListenerInfo};
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::listener;
use crate::metrics::{Metrics, ResultLabels};
use crate::published::Published;
use crate::snapshot::{BuildEnv, Snapshot};
use crate::wasm::WasmShared;
use crate::worker::{self, Command, ConnLimit, WorkerHandle};

/// How often certificate files are checked for changes.
const TLS_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How `weft run` was asked to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file; with a control plane, the bootstrap (static parts).
    pub config_path: PathBuf,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Where snapshots come from besides the file.
    pub control: Option<crate::control::ControlOptions>,
    /// Log lines dropped so far, exported on `/metrics` (when the binary installed
    /// [`crate::logging`]).
    pub log_dropped: Option<crate::logging::DroppedLines>,
}

#[derive(Debug)]
struct BoundListener {
    id: u64,
    name: String,
    requested: SocketAddr,
    local: SocketAddr,
    limit: Arc<ConnLimit>,
}

/// A running proxy.
#[derive(Debug)]
pub struct Server {
    config_path: PathBuf,
    /// The file's configuration, as last read.
    bootstrap: Config,
    /// The control plane's last applied snapshot (its version and configuration).
    remote: Option<(u64, Config)>,
    control: Option<crate::control::ControlOptions>,
    shared: Arc<Published>,
    admin: Option<Arc<AdminState>>,
    admin_addr: Option<SocketAddr>,
    workers: Vec<WorkerHandle>,
    bound: Vec<BoundListener>,
    next_listener_id: u64,
    /// Per-cluster periodic work (health checks, re-admission, DNS refresh) of the snapshot
    /// being served.
    maintenance: Vec<tokio::task::AbortHandle>,
}

/// The bootstrap's configuration with the control plane's items added.
fn merge(bootstrap: &Config, remote: Option<&Config>) -> Config {
    let mut c = bootstrap.clone();
    if let Some(r) = remote {
        c.listeners.extend(r.listeners.iter().cloned());
        c.routes
            .extend(r.routes.iter().map(|(k, v)| (k.clone(), v.clone())));
        c.clusters.extend(r.clusters.iter().cloned());
        c.filters.extend(r.filters.iter().cloned());
        c.services.extend(r.services.iter().cloned());
        c.mesh_services.extend(r.mesh_services.iter().cloned());
        // The control plane's sidecar settings (from the workload's registration) win over
        // a bootstrap's.
        if r.sidecar.is_some() {
            c.sidecar = r.sidecar.clone();
        }
    }
    c
}

/// Loads and validates a config file the way `weft validate` and `weft run` do.
pub fn load(
    path: &Path,
    version: u64,
    previous: Option<&Snapshot>,
    metrics: &Metrics,
    wasm: &Arc<WasmShared>,
    identity: Option<&Arc<crate::identity::Identity>>,
) -> Result<Snapshot, ConfigErrors> {
    let config = Config::from_file(path)?;
    Snapshot::build(
        config,
        version,
        previous,
        env(path, metrics, wasm, identity),
    )
}

fn env<'a>(
    path: &'a Path,
    metrics: &'a Metrics,
    wasm: &'a Arc<WasmShared>,
    identity: Option<&'a Arc<crate::identity::Identity>>,
) -> BuildEnv<'a> {
    BuildEnv {
        metrics,
        wasm,
        base_dir: path.parent().unwrap_or(Path::new(".")),
        identity,
        names: crate::upstream::Names::Resolve,
    }
}

fn worker_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The VM pool's size: `wasm.pool_instances`, else planned from the configuration at start —
/// twice what its filters need on every worker (a reload keeps the old VMs a while), at least
/// 128 (a control plane may add filters later).
fn plan_pool(config: &Config, workers: usize) -> u32 {
    let planned = config.wasm.pool_instances.unwrap_or_else(|| {
        let vms = workers.saturating_mul(config.filters.len() + config.services.len() + 1);
        u32::try_from(vms.saturating_mul(2) + 1)
            .unwrap_or(u32::MAX)
            .max(128)
    });
    crate::wasm::runtime::plan_pool(planned)
}

/// Refuses a configuration whose filters cannot all have their VMs at once: every worker
/// runs one VM per filter VM key, and while the old configuration drains its VMs live on
/// (plus one VM per worker for a restart after a trap, and one to validate the next
/// configuration).
fn check_capacity(
    snapshot: &Snapshot,
    previous: Option<&Snapshot>,
    workers: usize,
    wasm: &WasmShared,
) -> Result<(), ConfigError> {
    let mut keys = snapshot.vm_keys();
    if let Some(p) = previous {
        keys.extend(p.vm_keys());
    }
    let needed = workers * (keys.len() + 1) + 1;
    wasm.stats.vms_needed.set(needed as i64);
    match crate::wasm::runtime::pool_capacity() {
        Some(pool) if keys.is_empty() || needed <= pool as usize => Ok(()),
        None => Ok(()),
        Some(pool) => Err(ConfigError::new(
            "filters",
            format!(
                "{} filter VMs on {workers} workers need {needed} VMs at once (with the \
                 running configuration's while it drains); the VM pool holds {pool}: set \
                 wasm.pool_instances (and restart)",
                keys.len()
            ),
        )),
    }
}

impl Server {
    /// Starts the proxy: nothing is bound unless the whole config is valid.
    pub async fn start(opts: &Options) -> anyhow::Result<Server> {
        let metrics = Arc::new(Metrics::new());
        if let Some(d) = &opts.log_dropped {
            metrics.with_registry(|r| r.register_collector(Box::new(d.clone())));
        }
        metrics.with_registry(|r| {
            r.register_collector(Box::new(crate::access_log::DroppedAccessLines))
        });
        let wasm = WasmShared::new(metrics.clone());
        let bootstrap = Config::from_file(&opts.config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let workers = worker_count(opts.workers);
        // The VM pool is sized before the first module is loaded (it fixes the pool).
        let pool = plan_pool(&bootstrap, workers);
        wasm.stats.pool_size.set(i64::from(pool));
        // With a control plane: the last snapshot it gave, kept on disk, serves until it is
        // reachable again.
        // On the TLS control link the proxy needs its identity first: the saved one, or one
        // enrolled now with the join token. Without it, start fails with why.
        let mut control = opts.control.clone();
        if let Some(c) = &mut control {
            c.module_trust = crate::wasm::signing::trusted_keys(&bootstrap).map_err(|e| {
                anyhow::anyhow!(
                    "{}",
                    e.iter()
                        .map(|(at, e)| format!("{at}: {e}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })?;
            c.identity = crate::control::identity::establish(c)
                .await
                .map_err(|e| anyhow::anyhow!("control plane: {e}"))?;
        }
        let mut remote = control.as_ref().and_then(crate::control::last_good);
        let snapshot = match &remote {
            Some((v, r)) => {
                let built = Snapshot::build(
                    merge(&bootstrap, Some(r)),
                    1,
                    None,
                    env(
                        &opts.config_path,
                        &metrics,
                        &wasm,
                        control.as_ref().and_then(|c| c.identity.as_ref()),
                    ),
                );
                match built {
                    Ok(s) => {
                        tracing::info!(
                            version = v,
                            "serving the control plane's last snapshot from disk"
                        );
                        Some(s)
                    }
                    Err(e) => {
                        tracing::warn!("the saved snapshot no longer loads, ignored: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        let snapshot = match snapshot {
            Some(s) => s,
            None => {
                remote = None;
                Snapshot::build(
                    bootstrap.clone(),
                    1,
                    None,
                    env(
                        &opts.config_path,
                        &metrics,
                        &wasm,
                        control.as_ref().and_then(|c| c.identity.as_ref()),
                    ),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?
            }
        };
        check_capacity(&snapshot, None, workers, &wasm).map_err(|e| anyhow::anyhow!("{e}"))?;
        metrics.config_version.set(1);
        tracing::info!(version = 1, digest = %snapshot.digest, "configuration loaded");
        let admin_addr = snapshot.admin;
        let shared = Arc::new(Published::new(snapshot, metrics, wasm));

        let mut server = Server {
            config_path: opts.config_path.clone(),
            bootstrap,
            remote,
            control,
            admin: None,
            admin_addr,
            workers: Vec::new(),
            bound: Vec::new(),
            next_listener_id: 0,
            maintenance: Vec::new(),
            shared: shared.clone(),
        };
        server.restart_maintenance();

        if let Some(addr) = admin_addr {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("admin.address: cannot bind {addr}"))?;
            l.set_nonblocking(true)?;
            let local = l.local_addr()?;
            let state = Arc::new(AdminState::new(shared.clone()));
            // A thread of its own: the control thread builds snapshots (compiling modules), and
            // `/ready` or `/metrics` must answer while it does.
            let admin_state = state.clone();
            std::thread::Builder::new()
                .name("weft-admin".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the admin listener's runtime");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => admin::serve(l, admin_state).await,
                            Err(e) => tracing::error!(error = %e, "cannot serve the admin listener"),
                        }
                    });
                })
                .context("cannot start the admin thread")?;
            tracing::info!(address = %local, "admin listening");
            server.admin = Some(state);
        }

        // The filter-time clock calibrates once (a few ms), here rather than on a first request.
        let _ = crate::wasm::chain::clock();
        let n = workers;
        for id in 0..n {
            server
                .workers
                .push(worker::spawn(id, shared.clone()).context("cannot start a worker thread")?);
        }
        tracing::info!(workers = n, "workers started");

        let snap = shared.snapshot();
        let mut pending = Vec::new();
        for l in snap.bindings() {
            let requested = l.address;
            let b = server
                .bind(
                    &l.name,
                    requested,
                    (l.max_connections, l.max_connections_per_source_ip),
                )
                .map_err(|e| anyhow::anyhow!("{}: cannot bind {requested}: {e}", l.at))?;
            pending.push(b);
        }
        for (b, sockets, limit) in pending {
            server.start_listening(b, sockets, limit);
        }
        server.publish_listeners();
        if let Some(a) = &server.admin {
            a.set_phase(Lifecycle::Ready);
        }
        Ok(server)
    }

    /// Starts the periodic work of the current snapshot's clusters, stopping the previous one's.
    fn restart_maintenance(&mut self) {
        for task in self.maintenance.drain(..) {
            task.abort();
        }
        for cluster in &self.shared.snapshot().clusters {
            let task = tokio::spawn(crate::upstream::health::maintain(cluster.clone()));
            self.maintenance.push(task.abort_handle());
        }
    }

    /// The admin address actually bound, if any.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    fn bind(
        &mut self,
        name: &str,
        requested: SocketAddr,
        (max_connections, per_ip): (u32, u32),
    ) -> std::io::Result<(BoundListener, Vec<std::net::TcpListener>, Arc<ConnLimit>)> {
        let (local, sockets) = listener::bind(requested, self.workers.len())?;
        self.next_listener_id += 1;
        let limit = Arc::new(ConnLimit::new(max_connections, per_ip));
        Ok((
            BoundListener {
                id: self.next_listener_id,
                name: name.to_owned(),
                requested,
                local,
                limit: limit.clone(),
            },
            sockets,
            limit,
        ))
    }

    fn start_listening(
        &mut self,
        b: BoundListener,
        sockets: Vec<std::net::TcpListener>,
        limit: Arc<ConnLimit>,
    ) {
        let name: Arc<str> = Arc::from(b.name.as_str());
        for (w, socket) in self.workers.iter().zip(sockets) {
            let _ = w.commands.send(Command::Listen {
                id: b.id,
                name: name.clone(),
                socket,
                limit: limit.clone(),
            });
        }
        tracing::info!(name = %b.name, address = %b.local, "listener bound");
        self.bound.push(b);
    }

    fn publish_listeners(&self) {
        self.publish_listing(self.bound.iter());
    }

    /// Shows `bound` on the admin `/listeners`.
    fn publish_listing<'a>(&self, bound: impl Iterator<Item = &'a BoundListener>) {
        if let Some(a) = &self.admin
            && let Ok(mut l) = a.listeners.lock()
        {
            *l = bound
                .map(|b| ListenerInfo {
                    name: b.name.clone(),
                    address: b.local,
                })
                .collect();
        }
    }

    /// Serves until SIGTERM or SIGINT, reloading on SIGHUP; then drains and returns.
    pub async fn run_until_signalled(mut self) -> anyhow::Result<()> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut tls_poll = tokio::time::interval(TLS_POLL);
        tls_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (updates_tx, mut updates) = tokio::sync::mpsc::channel(1);
        if let Some(c) = &self.control {
            let shared = self.shared.clone();
            crate::control::spawn(
                c.clone(),
                self.remote_version(),
                self.shared.metrics.clone(),
                updates_tx,
                Arc::new(move || crate::control::filter_figures(&shared.snapshot())),
            );
        }
        loop {
            tokio::select! {
                _ = tls_poll.tick() => self.shared.snapshot().refresh_tls(false),
                Some(update) = updates.recv() => {
                    let crate::control::Update { version, config, digest, answer, modules } = update;
                    let result = self
                        .apply_remote(version, config, &digest)
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    // Applied (its filters hold them now) or refused: evictable from here on.
                    drop(modules);
                    match &result {
                        Ok(()) => tracing::info!(version, "control plane snapshot applied"),
                        Err(e) => tracing::error!(version, "control plane snapshot refused, the previous configuration keeps serving: {e}"),
                    }
                    let _ = answer.send(result);
                },
                _ = hup.recv() => {
                    match self.reload() {
                        Ok(v) => tracing::info!(version = v, "reload done"),
                        Err(errors) => {
                            for e in &errors.0 {
                                tracing::error!("reload rejected: {e}");
                            }
                            tracing::error!(
                                errors = errors.0.len(),
                                "reload rejected; the previous configuration keeps serving"
                            );
                        }
                    }
                    // SIGHUP also means "read the certificates again", changed or not.
                    self.shared.snapshot().refresh_tls(true);
                }
                _ = usr1.recv() => {
                    // Log rotation: the access-log files are opened again by their paths.
                    crate::access_log::reopen_all();
                    tracing::info!("access logs reopened");
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        self.drain().await;
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, stops workers.
    pub async fn drain(self) {
        if let Some(a) = &self.admin {
            a.set_phase(Lifecycle::Draining);
        }
        // A sidecar's application may call out while it shuts down: inbound stops at once,
        // outbound is served a while longer.
        let sidecar = self.shared.snapshot().sidecar.clone();
        if let Some(sc) = sidecar.filter(|s| !s.outbound_drain.is_zero()) {
            for b in self
                .bound
                .iter()
                .filter(|b| !b.name.starts_with(crate::sidecar::OUTBOUND))
            {
                for w in &self.workers {
                    let _ = w.commands.send(Command::Unlisten { id: b.id });
                }
            }
            tracing::info!(
                outbound_drain = ?sc.outbound_drain,
                "draining inbound; outbound connections still served while the application stops"
            );
            tokio::time::sleep(sc.outbound_drain).await;
        }
        let grace = self.shared.snapshot().grace_period;
        tracing::info!(grace_period = ?grace, "draining");
        let deadline = Instant::now() + grace;
        for w in &self.workers {
            let _ = w.commands.send(Command::Drain { deadline });
        }
        let workers = self.workers;
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.thread.join();
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!("a worker did not stop cleanly");
        }
        // Every request has ended: its access-log line is written before the process exits.
        crate::access_log::flush_all();
        tracing::info!("drained; exiting");
    }
}

/// `weft run`: runs the proxy on the calling thread until it is told to stop.
pub fn run(opts: Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("weft-control")
        .build()?;
    rt.block_on(async {
        let server = Server::start(&opts).await?;
        server.run_until_signalled().await
    })
}

/// Counts a configuration change (file reload or control-plane snapshot) as applied or rejected.
fn count_reload(metrics: &Metrics, applied: bool) {
    let result = if applied { "applied" } else { "rejected" };
    metrics
        .config_reloads
        .get_or_create(&ResultLabels { result })
        .inc();
}
