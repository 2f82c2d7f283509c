//! Sidecar mode: the capture ports `weft init` redirects a workload's traffic to, the workload's
//! own ports, and the mesh's service registry outbound traffic is routed by.

use serde::{Deserialize, Serialize};

use super::Dur;

/// A sidecar: every TCP connection the workload makes is redirected to `outbound_port`, every
/// connection to the workload's `ports` to `inbound_port` (by `weft init`'s nat rules); weft
/// reads each connection's original destination and serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Its name as a control-plane resource (`kind: sidecar`); not needed in a file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Where outbound connections are redirected to.
    #[serde(default = "defaults::outbound_port")]
    pub outbound_port: u16,
    /// Where inbound connections are redirected to.
    #[serde(default = "defaults::inbound_port")]
    pub inbound_port: u16,
    /// IPs the capture ports are bound on (`::` is skipped where the host has no IPv6).
    #[serde(default = "defaults::bind")]
    pub bind: Vec<String>,
    /// How long a captured connection whose protocol is not declared gets to send its first
    /// bytes; a client that sends nothing by then (a server-first protocol: MySQL, SMTP, …) is
    /// served as TCP.
    #[serde(default = "defaults::detection_timeout")]
    pub detection_timeout: Dur,
    /// Outbound connections to a destination the registry does not know: passed through to
    /// it (`allow_any`) or refused (`registry_only`).
    #[serde(default)]
    pub egress: Egress,
    /// Inbound: whether plaintext (from workloads without a sidecar) is served besides mesh
    /// mTLS.
    #[serde(default)]
    pub mode: InboundMode,
    /// The workload's ports: connections to them are served inbound.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    /// Where the workload listens: inbound connections end at `app_address:port`.
    #[serde(default = "defaults::app_address")]
    pub app_address: String,
    /// Wasm filters inbound HTTP requests run through (the peer's identity is known to them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_filters: Vec<String>,
    /// Wasm filters outbound HTTP requests run through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_filters: Vec<String>,
    /// On SIGTERM outbound connections keep being accepted this long (the application may
    /// call out while it shuts down) while inbound drains at once.
    #[serde(default = "defaults::outbound_drain")]
    pub outbound_drain: Dur,
    /// One JSON line per HTTP request, inbound and outbound (as a listener's `access_log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<super::AccessLogConfig>,
}

impl Default for Sidecar {
    fn default() -> Self {
        Sidecar {
            name: String::new(),
            outbound_port: defaults::outbound_port(),
            inbound_port: defaults::inbound_port(),
            bind: defaults::bind(),
            detection_timeout: defaults::detection_timeout(),
            egress: Egress::default(),
            mode: InboundMode::default(),
            ports: Vec::new(),
            app_address: defaults::app_address(),
            inbound_filters: Vec::new(),
            outbound_filters: Vec::new(),
            outbound_drain: defaults::outbound_drain(),
            access_log: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// Unknown destinations are reached directly (counted).
    #[default]
    AllowAny,
    /// Unknown destinations are refused (counted).
    RegistryOnly,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundMode {
    /// Mesh mTLS and plaintext both served (a workload without a sidecar can still call).
    #[default]
    Permissive,
    /// Only mesh mTLS: plaintext connections are refused.
    Strict,
}

/// What a port speaks. Declared: no detection. `auto`: detected from the first bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppProtocol {
    #[default]
    Auto,
    /// HTTP/1.1, or HTTP/2 with prior knowledge.
    Http,
    /// HTTP/2 only (upstream too).
    Http2,
    /// gRPC: HTTP/2.
    Grpc,
    /// Bytes, whatever they are.
    Tcp,
}

impl AppProtocol {
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }
}

/// One of the workload's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadPort {
    pub port: u16,
    #[serde(default)]
    pub protocol: AppProtocol,
}

/// A service of the mesh's registry: its virtual addresses and ports, where it runs, and the
/// identities it runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshService {
    /// Unique; shown in metrics (`outbound|<port>|<name>` clusters and listeners).
    pub name: String,
    /// Virtual IPs clients connect to.
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    /// The IPs the service's instances run on (connected to at each port's `target_port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// SPIFFE IDs its instances present: connections to it use mesh mTLS and accept only these
    /// identities. Empty: the service is outside the mesh (plaintext).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The port instances listen on; default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: AppProtocol,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

mod defaults {
    use super::Dur;
    use std::time::Duration;

    pub fn outbound_port() -> u16 {
        15001
    }
    pub fn inbound_port() -> u16 {
        15006
    }
    pub fn bind() -> Vec<String> {
        vec!["0.0.0.0".into(), "::".into()]
    }
    pub fn detection_timeout() -> Dur {
        Dur(Duration::from_millis(100))
    }
    pub fn app_address() -> String {
        "127.0.0.1".into()
    }
    pub fn outbound_drain() -> Dur {
        Dur(Duration::from_secs(5))
    }
}
