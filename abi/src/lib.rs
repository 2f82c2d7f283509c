//! `weft-abi`: the Proxy-Wasm ABI (v0.2.1, with v0.2.0 and v0.1.0) as both sides of Weft see it —
//! the host in `weft-proxy` and guests built with `weft-sdk`.
//!
//! Owns: status codes, enums, the hasher for host-made ids, the marker exports that name an ABI version, the map ("pairs")
//! and property-path encodings, the names of host functions and callbacks, and the limits a
//! host enforces. Must not know about wasmtime, tokio or hyper; needs only `alloc`.

#![no_std]

extern crate alloc;

pub mod names;
mod pairs;

pub use pairs::{PairsError, deserialize_pairs, pairs_len, serialize_pairs};

use alloc::vec::Vec;

/// Largest serialized map a host accepts from a guest (as proxy-wasm-cpp-host).
pub const MAX_PAIRS_BYTES: usize = 1 << 20;
/// Most entries in a serialized map.
pub const MAX_PAIRS: usize = 1024;
/// Most bytes `random_get` fills in one call.
pub const MAX_RANDOM_BYTES: usize = 64 * 1024;

/// The ABI version a module was built for, from its marker export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AbiVersion {
    V0_1_0,
    V0_2_0,
    V0_2_1,
}

impl AbiVersion {
    /// The marker export that names this version.
    pub const fn marker(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "proxy_abi_version_0_1_0",
            AbiVersion::V0_2_0 => "proxy_abi_version_0_2_0",
            AbiVersion::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }

    /// The version named by an export, if it is a marker.
    pub fn from_marker(export: &str) -> Option<AbiVersion> {
        [AbiVersion::V0_2_1, AbiVersion::V0_2_0, AbiVersion::V0_1_0]
            .into_iter()
            .find(|v| v.marker() == export)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }

    /// Whether `proxy_on_request_headers` / `proxy_on_response_headers` take `end_of_stream`.
    pub const fn headers_have_end_of_stream(self) -> bool {
        !matches!(self, AbiVersion::V0_1_0)
    }
}

/// `proxy_status_t`: what every host function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    BadExpression = 5,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    ResultMismatch = 9,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    pub fn from_u32(v: u32) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => NotFound,
            2 => BadArgument,
            3 => SerializationFailure,
            4 => ParseFailure,
            5 => BadExpression,
            6 => InvalidMemoryAccess,
            7 => Empty,
            8 => CasMismatch,
            9 => ResultMismatch,
            10 => InternalFailure,
            11 => BrokenConnection,
            12 => Unimplemented,
            _ => return None,
        })
    }
}

/// `proxy_action_t` as the Rust and Go SDKs return it. The C++ SDK returns Envoy's wider
/// status enums; [`Action::from_headers`] and friends map those the way Envoy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

impl Action {
    /// A headers callback's result: 0 continues; anything else stops.
    pub fn from_headers(v: u32) -> Action {
        if v == 0 {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    /// A body callback's result: 0 continues; anything else keeps buffering.
    pub fn from_body(v: u32) -> Action {
        Self::from_headers(v)
    }

    /// A trailers callback's result: 0 continues; anything else stops.
    pub fn from_trailers(v: u32) -> Action {
        Self::from_headers(v)
    }
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_u32(v: u32) -> Option<LogLevel> {
        Some(match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    DownstreamData = 2,
    UpstreamData = 3,
    HttpCallResponseBody = 4,
    GrpcReceiveBuffer = 5,
    VmConfiguration = 6,
    PluginConfiguration = 7,
    ForeignFunctionArguments = 8,
}

impl BufferType {
    pub fn from_u32(v: u32) -> Option<BufferType> {
        use BufferType::*;
        Some(match v {
            0 => HttpRequestBody,
            1 => HttpResponseBody,
            2 => DownstreamData,
            3 => UpstreamData,
            4 => HttpCallResponseBody,
            5 => GrpcReceiveBuffer,
            6 => VmConfiguration,
            7 => PluginConfiguration,
            8 => ForeignFunctionArguments,
            _ => return None,
        })
    }
}

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MapType {
    HttpRequestHeaders = 0,
    HttpRequestTrailers = 1,
    HttpResponseHeaders = 2,
    HttpResponseTrailers = 3,
    GrpcReceiveInitialMetadata = 4,
    GrpcReceiveTrailingMetadata = 5,
    HttpCallResponseHeaders = 6,
    HttpCallResponseTrailers = 7,
}

impl MapType {
    pub fn from_u32(v: u32) -> Option<MapType> {
        use MapType::*;
        Some(match v {
            0 => HttpRequestHeaders,
            1 => HttpRequestTrailers,
            2 => HttpResponseHeaders,
            3 => HttpResponseTrailers,
            4 => GrpcReceiveInitialMetadata,
            5 => GrpcReceiveTrailingMetadata,
            6 => HttpCallResponseHeaders,
            7 => HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t` (0.2.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum StreamType {
    HttpRequest = 0,
    HttpResponse = 1,
    Downstream = 2,
    Upstream = 3,
}

impl StreamType {
    pub fn from_u32(v: u32) -> Option<StreamType> {
        Some(match v {
            0 => StreamType::HttpRequest,
            1 => StreamType::HttpResponse,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

impl MetricType {
    pub fn from_u32(v: u32) -> Option<MetricType> {
        Some(match v {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// `proxy_peer_type_t`: who closed a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum PeerType {
    Unknown = 0,
    Local = 1,
    Remote = 2,
}

/// gRPC status codes (`grpc_status` of `proxy_send_local_response`, `proxy_on_grpc_close`).
pub mod grpc_status {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const ABORTED: u32 = 10;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
    /// `proxy_send_local_response`: "not a gRPC response".
    pub const NONE: i32 = -1;
}

/// WASI preview1 errno values the host returns.
pub mod errno {
    pub const SUCCESS: u32 = 0;
    pub const BADF: u32 = 8;
    pub const FAULT: u32 = 21;
    pub const INVAL: u32 = 28;
    pub const NOENT: u32 = 44;
    pub const NOSYS: u32 = 52;
    pub const NOTSUP: u32 = 58;
    pub const NOTCAPABLE: u32 = 76;
}

/// Splits a property path (segments joined by `\0`, no trailing NUL) into its segments.
pub fn split_property_path(path: &[u8]) -> Vec<&[u8]> {
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|b| *b == 0).collect()
}

/// A hasher for ids the host hands out itself (context ids, callout tokens, metric ids), on
/// either side: one multiply, no need for SipHash's flood resistance (which costs a guest
/// hundreds of instructions per lookup).
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl core::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

/// How to build [`IdHasher`]s: `HashMap<u32, V, BuildIdHasher>` is a map keyed by host-made ids.
pub type BuildIdHasher = core::hash::BuildHasherDefault<IdHasher>;

/// The `source_workload` and `source_namespace` of Istio's golden metrics, from a client's
/// identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` is (service account,
/// namespace); another identity is the workload itself, namespace `unknown`; none is
/// (`unknown`, `unknown`). Host and guests label alike with it.
pub fn workload_of(identity: Option<&str>) -> (&str, &str) {
    let Some(id) = identity else {
        return ("unknown", "unknown");
    };
    let after = |key: &str| {
        let mut parts = id.split('/');
        let mut previous = parts.next()?;
        for part in parts {
            if previous == key {
                return Some(part);
            }
            previous = part;
        }
        None
    };
    match (after("sa"), after("ns")) {
        (Some(sa), Some(ns)) => (sa, ns),
        _ => (id, "unknown"),
    }
}

/// Joins segments into a property path.
pub fn join_property_path<S: AsRef<[u8]>>(segments: &[S]) -> Vec<u8> {
    let len = segments.iter().map(|s| s.as_ref().len() + 1).sum::<usize>();
    let mut out = Vec::with_capacity(len.saturating_sub(1));
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(s.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_come_from_spiffe_identities() {
        assert_eq!(
            workload_of(Some("spiffe://mesh/ns/shop/sa/web")),
            ("web", "shop")
        );
        assert_eq!(
            workload_of(Some("spiffe://mesh/sa/web")),
            ("spiffe://mesh/sa/web", "unknown")
        );
        assert_eq!(workload_of(Some("web.shop")), ("web.shop", "unknown"));
        assert_eq!(workload_of(None), ("unknown", "unknown"));
    }

    #[test]
    fn markers_round_trip() {
        for v in [AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1] {
            assert_eq!(AbiVersion::from_marker(v.marker()), Some(v));
        }
        assert_eq!(AbiVersion::from_marker("proxy_abi_version_0_x_x"), None);
        assert!(!AbiVersion::V0_1_0.headers_have_end_of_stream());
    }

    #[test]
    fn property_paths() {
        let p = join_property_path(&["request", "path"]);
        assert_eq!(p, b"request\0path");
        assert_eq!(split_property_path(&p), [&b"request"[..], &b"path"[..]]);
        assert!(split_property_path(b"").is_empty());
    }

    #[test]
    fn wide_actions_map_to_stop() {
        assert_eq!(Action::from_headers(0), Action::Continue);
        assert_eq!(Action::from_headers(4), Action::Pause);
        assert_eq!(Status::from_u32(12), Some(Status::Unimplemented));
        assert_eq!(Status::from_u32(13), None);
    }
}
