//! Wasm filters: which module, with what configuration, and what happens when it fails.

use serde::{Deserialize, Serialize};

use super::{ByteSize, Dur};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Unique name; the filter's `plugin_name` property, and the `filter` label of its metrics.
    pub name: String,
    /// A `.wasm` file (relative to the config file's directory), or `sha256:<hex>` of a module
    /// the control plane delivered.
    pub module: String,
    /// The plugin's root id (`plugin_root_id`): which root context of the module serves it.
    #[serde(default)]
    pub root_id: String,
    /// Filters with the same `vm_id`, module and `vm_config` share one VM per worker (and its
    /// state); shared data and queues are scoped by `vm_id`. Default: the filter's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// Plugin configuration, read in `on_configure`: a string is handed over as is; a map or
    /// a list as its JSON text (as Envoy does).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
    /// VM configuration, read in `on_vm_start` (same encoding as `config`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub vm_config: serde_json::Value,
    /// What a request gets when the filter's VM fails (traps, runs out of time or memory):
    /// `closed` answers 500; `open` lets the request pass without the filter.
    #[serde(default)]
    pub fail: FailMode,
    #[serde(default)]
    pub limits: FilterLimits,
    /// An Ed25519 signature over the module's digest and this filter's name (`weftctl filter
    /// push --sign`); required when the proxy trusts module keys (`module_trust`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ModuleSignature>,
}

impl Filter {
    /// What names this exact filter (module, configuration, limits, everything): the first 12
    /// hex digits of the SHA-256 of its JSON. The proxy reports figures by revision and the
    /// control plane compares a rollout's old and new revision with them.
    pub fn revision(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hash = sha2::Sha256::digest(&json);
        hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

/// A Wasm service: a module whose root context works on its own, with no request (Envoy's
/// `WasmService`): ticks, shared-data aggregation, callouts on a timer. It is started with the
/// configuration that names it, restarted when it fails, and stopped when a configuration no
/// longer names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique among filters and services; the `plugin_name` property and the `filter` label
    /// of its metrics.
    pub name: String,
    /// As a filter's `module`.
    pub module: String,
    #[serde(default)]
    pub root_id: String,
    /// As a filter's: a service and filters with the same `vm_id` share shared data and
    /// queues (and, with the same module and `vm_config`, a VM on a worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub vm_config: serde_json::Value,
    /// `process` (default): one instance in the proxy; `worker`: one on every worker.
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub limits: FilterLimits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ModuleSignature>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    Process,
    Worker,
}

impl Service {
    /// The service as the plugin it runs: what filters and services have in common is built
    /// one way.
    pub fn plugin(&self) -> Filter {
        Filter {
            name: self.name.clone(),
            module: self.module.clone(),
            root_id: self.root_id.clone(),
            vm_id: self.vm_id.clone(),
            config: self.config.clone(),
            vm_config: self.vm_config.clone(),
            fail: FailMode::Closed,
            limits: self.limits.clone(),
            signature: self.signature.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSignature {
    /// The signing key's id (first 16 hex digits of its SHA-256).
    pub key: String,
    /// The signature, base64.
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Closed,
    Open,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterLimits {
    /// Most linear memory the VM may grow to.
    #[serde(default = "defaults::memory")]
    pub memory: ByteSize,
    /// Most time one call into the VM may take (a callback, `on_configure`, …); past it the
    /// call is stopped and the VM counts as failed.
    #[serde(default = "defaults::cpu_per_call")]
    pub cpu_per_call: Dur,
    /// Most body bytes the filter may hold back (pausing a body buffers it); beyond: 413 for a
    /// request, 500 for a response.
    #[serde(default = "defaults::body_buffer")]
    pub body_buffer: ByteSize,
    /// Longest log message the filter may write (`proxy_log`, standard output and error):
    /// longer ones are cut, with a note saying how much was dropped.
    #[serde(default = "defaults::log_line")]
    pub log_line: ByteSize,
    /// Most bytes of keys and values in the shared data of the filter's `vm_id`; a write past
    /// it fails (`INTERNAL_FAILURE`) and changes nothing.
    #[serde(default = "defaults::shared_data")]
    pub shared_data: ByteSize,
    /// Most keys in the shared data of the filter's `vm_id`.
    #[serde(default = "defaults::shared_data_keys")]
    pub shared_data_keys: u32,
    /// Most items waiting in a shared queue the filter registers; an enqueue past it (or past
    /// `queue_bytes`) fails and changes nothing.
    #[serde(default = "defaults::queue_depth")]
    pub queue_depth: u32,
    /// Most bytes waiting in a shared queue the filter registers.
    #[serde(default = "defaults::queue_bytes")]
    pub queue_bytes: ByteSize,
    /// Most HTTP and gRPC callouts (streams included) in flight at once per VM.
    #[serde(default = "defaults::callouts")]
    pub callouts: u32,
    /// The timeout of a callout made with timeout 0.
    #[serde(default = "defaults::callout_timeout")]
    pub callout_timeout: Dur,
    /// Largest callout body either way: an HTTP call's request and response bodies, a gRPC
    /// message, and what a gRPC stream may have queued for sending.
    #[serde(default = "defaults::callout_body")]
    pub callout_body: ByteSize,
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            memory: defaults::memory(),
            cpu_per_call: defaults::cpu_per_call(),
            body_buffer: defaults::body_buffer(),
            log_line: defaults::log_line(),
            shared_data: defaults::shared_data(),
            shared_data_keys: defaults::shared_data_keys(),
            queue_depth: defaults::queue_depth(),
            queue_bytes: defaults::queue_bytes(),
            callouts: defaults::callouts(),
            callout_timeout: defaults::callout_timeout(),
            callout_body: defaults::callout_body(),
        }
    }
}

mod defaults {
    use super::{ByteSize, Dur};
    use std::time::Duration;

    pub fn memory() -> ByteSize {
        ByteSize(64 * 1024 * 1024)
    }
    pub fn cpu_per_call() -> Dur {
        Dur(Duration::from_millis(100))
    }
    pub fn body_buffer() -> ByteSize {
        ByteSize(1024 * 1024)
    }
    pub fn log_line() -> ByteSize {
        ByteSize(16 * 1024)
    }
    pub fn shared_data() -> ByteSize {
        ByteSize(16 * 1024 * 1024)
    }
    pub fn shared_data_keys() -> u32 {
        100_000
    }
    pub fn queue_depth() -> u32 {
        10_000
    }
    pub fn queue_bytes() -> ByteSize {
        ByteSize(16 * 1024 * 1024)
    }
    pub fn callouts() -> u32 {
        64
    }
    pub fn callout_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn callout_body() -> ByteSize {
        ByteSize(1024 * 1024)
    }
}
