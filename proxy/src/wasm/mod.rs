//! Wasm filters: the Proxy-Wasm ABI v0.2.1 (and 0.2.0, 0.1.0) hosted on wasmtime.
//!
//! A configured filter becomes a [`FilterSpec`] when a snapshot is built: its module loaded
//! (compiled once per digest), checked, and started once on a throw-away canary VM so that a
//! module that does not start or a configuration its `on_configure` rejects fails the whole
//! configuration, located. At run time each worker has its own VMs ([`worker::WasmWorker`]) and
//! each request with filters runs them through a [`chain::Chain`].
//!
//! | module | role |
//! |---|---|
//! | [`runtime`] | the engine, the epoch ticker, the module cache |
//! | [`module`] | loading and linking a module |
//! | [`vm`] | one VM: every call into a guest, bounded |
//! | [`host`] | the host functions |
//! | [`state`] | what host functions read and write |
//! | [`shared`] | what VMs share across workers (data, queues, metrics) |
//! | [`worker`] | a worker's VMs, callouts, timers and queues |
//! | [`chain`] | one request through a listener's filters |
//! | [`figures`] | what each filter revision did, for staged rollouts |
//! | [`callout`] | HTTP and gRPC callouts |

pub mod callout;
pub mod chain;
pub mod figures;
pub mod golden;
pub mod host;
pub mod module;
pub mod runtime;
pub mod shared;
pub mod signing;
pub mod state;
pub mod vm;
pub mod worker;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{ConfigError, FailMode, Filter, Placement, Service};
pub use shared::WasmShared;
use state::PluginInfo;
use vm::{StartError, Vm, VmSpec};

/// What makes two filters share a VM on a worker: the same code, `vm_id`, VM configuration and
/// limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmKey {
    pub digest: String,
    pub vm_id: Arc<str>,
    pub vm_config: Bytes,
    pub memory: usize,
    pub cpu_per_call: Duration,
    pub host: runtime::HostLimits,
}

/// Which optional callbacks a module exports: a body nobody can see is not wrapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wants {
    pub request_body: bool,
    pub response_body: bool,
}

/// A filter ready to run: the VM it runs in and the plugin (root context) it is.
#[derive(Debug)]
pub struct FilterSpec {
    pub name: Arc<str>,
    pub vm: VmSpec,
    pub key: VmKey,
    pub plugin: Arc<PluginInfo>,
    pub wants: Wants,
    /// `weft_wasm_call_duration_seconds` of this filter.
    pub call_time: prometheus_client::metrics::histogram::Histogram,
    /// [`Filter::revision`] of its configuration.
    pub revision: Arc<str>,
    /// What this revision did since it was built (kept across reloads that keep the spec).
    pub figures: figures::Figures,
}

impl FilterSpec {
    pub fn fail_open(&self) -> bool {
        self.plugin.fail_open
    }

    /// Same VM and same plugin: a reload can keep it as it is.
    fn same_as(&self, other: &FilterSpec) -> bool {
        self.revision == other.revision
            && self.key == other.key
            && self.plugin.name == other.plugin.name
            && self.plugin.root_id == other.plugin.root_id
            && self.plugin.config == other.plugin.config
            && self.plugin.fail_open == other.plugin.fail_open
            && self.plugin.body_buffer == other.plugin.body_buffer
    }
}

/// A service ready to run: the plugin it is, and where.
#[derive(Debug)]
pub struct ServiceSpec {
    pub plugin: Arc<FilterSpec>,
    pub placement: Placement,
}

impl ServiceSpec {
    /// Whether worker `id` runs an instance of it.
    pub fn runs_on(&self, worker: usize) -> bool {
        self.placement == Placement::Worker || worker == 0
    }
}

/// A configuration value handed to a guest: a string as is, anything else as JSON, nothing as
/// empty (as Envoy does with `StringValue` and `Struct`).
fn config_bytes(v: &serde_json::Value) -> Bytes {
    match v {
        serde_json::Value::Null => Bytes::new(),
        serde_json::Value::String(s) => Bytes::from(s.clone()),
        other => Bytes::from(other.to_string()),
    }
}

/// The bytes of a module: a file (relative to `base_dir`), or a module delivered before,
/// named by its digest.
fn module_bytes(source: &str, base_dir: &Path) -> Result<(String, ModuleSource), String> {
    if let Some(hex) = source.strip_prefix("sha256:") {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "invalid module digest {source:?}: expected sha256: and 64 hex digits"
            ));
        }
        let digest = format!("sha256:{}", hex.to_ascii_lowercase());
        return match module::by_digest(&digest) {
            Some(m) => Ok((source.to_owned(), ModuleSource::Loaded(m))),
            None => Err(format!(
                "no module with digest {digest} has been delivered to this proxy"
            )),
        };
    }
    let path = base_dir.join(source);
    match std::fs::read(&path) {
        Ok(b) => Ok((source.to_owned(), ModuleSource::Bytes(b))),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

enum ModuleSource {
    Bytes(Vec<u8>),
    Loaded(Arc<module::LoadedModule>),
}

/// Smallest and largest limits a filter may be given.
const MIN_MEMORY: u64 = 1 << 20;
const MIN_CPU: Duration = Duration::from_millis(1);
const MAX_CPU: Duration = Duration::from_secs(60);
const MIN_BODY_BUFFER: u64 = 1024;
const MAX_BODY_BUFFER: u64 = 1 << 30;

/// Builds every filter of a configuration, reporting every error located. A filter identical
/// to one of `previous` is kept as it is (no new canary).
pub fn build_filters(
    filters: &[Filter],
    base_dir: &Path,
    host: &Arc<WasmShared>,
    previous: &HashMap<String, Arc<FilterSpec>>,
    trusted: &[signing::PublicKey],
    errors: &mut Vec<ConfigError>,
) -> HashMap<String, Arc<FilterSpec>> {
    let mut out = HashMap::new();
    let mut names = std::collections::HashSet::new();
    for (i, f) in filters.iter().enumerate() {
        let at = format!("filters[{i}]");
        if f.name.is_empty() {
            errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
            continue;
        }
        if !names.insert(f.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate filter name {:?}", f.name),
            ));
            continue;
        }
        if let Some(spec) = build_one(f, &at, base_dir, host, previous, trusted, errors) {
            out.insert(f.name.clone(), spec);
        }
    }
    out
}

/// Builds every service of a configuration as [`build_filters`] builds filters; a service's
/// name may not be a filter's too (they share the `filter` label of metrics and logs).
#[allow(clippy::too_many_arguments)]
pub fn build_services(
    services: &[Service],
    filters: &[Filter],
    base_dir: &Path,
    host: &Arc<WasmShared>,
    previous: &HashMap<String, Arc<ServiceSpec>>,
    trusted: &[signing::PublicKey],
    errors: &mut Vec<ConfigError>,
) -> HashMap<String, Arc<ServiceSpec>> {
    let kept: HashMap<String, Arc<FilterSpec>> = previous
        .iter()
        .map(|(k, v)| (k.clone(), v.plugin.clone()))
        .collect();
    let mut out = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let at = format!("services[{i}]");
        if s.name.is_empty() {
            errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
            continue;
        }
        if out.contains_key(&s.name) {
            errors.push(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate service name {:?}", s.name),
            ));
            continue;
        }
        if filters.iter().any(|f| f.name == s.name) {
            errors.push(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is also a filter's name: filters and services are told apart by \
                     name in metrics and logs",
                    s.name
                ),
            ));
            continue;
        }
        let Some(plugin) = build_one(&s.plugin(), &at, base_dir, host, &kept, trusted, errors)
        else {
            continue;
        };
        let spec = match previous.get(&s.name) {
            Some(p) if Arc::ptr_eq(&p.plugin, &plugin) && p.placement == s.placement => p.clone(),
            _ => Arc::new(ServiceSpec {
                plugin,
                placement: s.placement,
            }),
        };
        out.insert(s.name.clone(), spec);
    }
    out
}

fn check_limits(f: &Filter, at: &str, errors: &mut Vec<ConfigError>) -> bool {
    let before = errors.len();
    let l = &f.limits;
    if !(MIN_MEMORY..=runtime::MAX_VM_MEMORY as u64).contains(&l.memory.0) {
        errors.push(ConfigError::new(
            format!("{at}.limits.memory"),
            format!("{} bytes is out of range (1MiB..=1GiB)", l.memory.0),
        ));
    }
    if !(MIN_CPU..=MAX_CPU).contains(&l.cpu_per_call.0) {
        errors.push(ConfigError::new(
            format!("{at}.limits.cpu_per_call"),
            "out of range (1ms..=60s)",
        ));
    }
    if !(MIN_BODY_BUFFER..=MAX_BODY_BUFFER).contains(&l.body_buffer.0) {
        errors.push(ConfigError::new(
            format!("{at}.limits.body_buffer"),
            format!("{} bytes is out of range (1KiB..=1GiB)", l.body_buffer.0),
        ));
    }
    let mut range = |field: &str, v: u64, lo: u64, hi: u64, shown: &str| {
        if !(lo..=hi).contains(&v) {
            errors.push(ConfigError::new(
                format!("{at}.limits.{field}"),
                format!("{v} is out of range ({shown})"),
            ));
        }
    };
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    range("log_line", l.log_line.0, 256, MIB, "256..=1MiB");
    range("shared_data", l.shared_data.0, 0, 1024 * MIB, "0..=1GiB");
    range(
        "shared_data_keys",
        l.shared_data_keys.into(),
        0,
        10_000_000,
        "0..=10000000",
    );
    range(
        "queue_depth",
        l.queue_depth.into(),
        1,
        10_000_000,
        "1..=10000000",
    );
    range(
        "queue_bytes",
        l.queue_bytes.0,
        KIB,
        1024 * MIB,
        "1KiB..=1GiB",
    );
    range(
        "callouts",
        l.callouts.into(),
        1,
        runtime::caps::WORKER_CALLOUTS as u64,
        "1..=1024",
    );
    range(
        "callout_body",
        l.callout_body.0,
        KIB,
        64 * MIB,
        "1KiB..=64MiB",
    );
    if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&l.callout_timeout.0) {
        errors.push(ConfigError::new(
            format!("{at}.limits.callout_timeout"),
            "out of range (1ms..=1h)",
        ));
    }
    errors.len() == before
}

fn build_one(
    f: &Filter,
    at: &str,
    base_dir: &Path,
    host: &Arc<WasmShared>,
    previous: &HashMap<String, Arc<FilterSpec>>,
    trusted: &[signing::PublicKey],
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<FilterSpec>> {
    let limits_ok = check_limits(f, at, errors);
    // The signature is checked against the bytes' digest before they are compiled.
    let signed = |digest: &str| {
        if trusted.is_empty() {
            return Ok(());
        }
        signing::verify(trusted, &f.name, digest, f.signature.as_ref())
    };
    let module = match module_bytes(&f.module, base_dir) {
        Ok((name, ModuleSource::Bytes(b))) => match signed(&runtime::digest(&b)) {
            Ok(()) => module::load(&name, &b),
            Err(e) => {
                errors.push(ConfigError::new(format!("{at}.signature"), e));
                return None;
            }
        },
        Ok((_, ModuleSource::Loaded(m))) => match signed(&m.digest) {
            Ok(()) => Ok(m),
            Err(e) => {
                errors.push(ConfigError::new(format!("{at}.signature"), e));
                return None;
            }
        },
        Err(e) => Err(e),
    };
    let module = match module {
        Ok(m) => m,
        Err(e) => {
            errors.push(ConfigError::new(format!("{at}.module"), e));
            return None;
        }
    };
    if !limits_ok {
        return None;
    }
    let name: Arc<str> = Arc::from(f.name.as_str());
    let vm_id: Arc<str> = Arc::from(f.vm_id.as_deref().unwrap_or(&f.name));
    let vm_config = config_bytes(&f.vm_config);
    let key = VmKey {
        digest: module.digest.clone(),
        vm_id: vm_id.clone(),
        vm_config: vm_config.clone(),
        memory: f.limits.memory.0 as usize,
        cpu_per_call: f.limits.cpu_per_call.0,
        host: runtime::HostLimits::of(&f.limits),
    };
    let plugin = Arc::new(PluginInfo {
        name: name.clone(),
        root_id: Arc::from(f.root_id.as_str()),
        vm_id: vm_id.clone(),
        config: config_bytes(&f.config),
        fail_open: f.fail == FailMode::Open,
        body_buffer: f.limits.body_buffer.0 as usize,
    });
    let wants = Wants {
        request_body: module.exports_any(&[
            weft_abi::names::callback::ON_REQUEST_BODY,
            weft_abi::names::callback::ON_REQUEST_TRAILERS,
        ]),
        response_body: module.exports_any(&[
            weft_abi::names::callback::ON_RESPONSE_BODY,
            weft_abi::names::callback::ON_RESPONSE_TRAILERS,
        ]),
    };
    let spec = FilterSpec {
        name,
        vm: VmSpec {
            module,
            vm_id,
            vm_config,
            memory: f.limits.memory.0 as usize,
            cpu_per_call: f.limits.cpu_per_call.0,
            host: key.host,
        },
        key,
        plugin,
        wants,
        call_time: host
            .stats
            .call_time
            .get_or_create(&shared::FilterLabels {
                filter: f.name.clone(),
            })
            .clone(),
        revision: Arc::from(f.revision()),
        figures: figures::Figures::default(),
    };
    if let Some(prev) = previous.get(&f.name)
        && prev.same_as(&spec)
    {
        return Some(prev.clone());
    }
    // The canary: start the VM and the plugin once, here, so that what would fail on every
    // worker fails the configuration instead.
    let canary = Vm::start(spec.vm.clone(), None, host.clone())
        .and_then(|vm| vm.root(&spec.plugin).map(|_| vm));
    match canary {
        Ok(vm) => {
            vm.retire_roots_except(&[]);
            Some(Arc::new(spec))
        }
        Err(e) => {
            let field = match e {
                StartError::ConfigureRejected(_) => "config",
                StartError::VmStartRejected(_) => "vm_config",
                _ => "module",
            };
            errors.push(ConfigError::new(format!("{at}.{field}"), e.to_string()));
            None
        }
    }
}
