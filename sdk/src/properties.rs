//! Properties of the current request and connection (Envoy's attribute names), typed.

use crate::Error;
use crate::host::host;

/// A property's raw bytes (`None` when the proxy has no value for it).
pub fn get(path: &[&str]) -> Result<Option<Vec<u8>>, Error> {
    host()
        .get_property(path)
        .map_err(|s| Error::new("get_property", s))
}

/// A property as text.
pub fn get_string(path: &[&str]) -> Option<String> {
    String::from_utf8(get(path).ok()??).ok()
}

/// A property that is a little-endian 64-bit integer (Envoy's encoding of numbers).
pub fn get_int(path: &[&str]) -> Option<i64> {
    let b = get(path).ok()??;
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some(i64::from_le_bytes(a))
}

/// Stores a value for the rest of the request (readable by later filters).
pub fn set(path: &[&str], value: &[u8]) -> Result<(), Error> {
    host()
        .set_property(path, value)
        .map_err(|s| Error::new("set_property", s))
}

/// The client's address (`source.address`, `IP:port`).
pub fn source_address() -> Option<String> {
    get_string(&["source", "address"])
}

/// The client's IP (from `source.address`).
pub fn source_ip() -> Option<std::net::IpAddr> {
    let a = source_address()?;
    if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    a.parse().ok()
}

pub use weft_abi::workload_of;

/// The verified identity of an mTLS client: its first URI SAN (`spiffe://…`), else its first
/// DNS SAN.
pub fn peer_identity() -> Option<String> {
    get_string(&["connection", "uri_san_peer_certificate"])
        .filter(|s| !s.is_empty())
        .or_else(|| get_string(&["connection", "dns_san_peer_certificate"]))
        .filter(|s| !s.is_empty())
}

/// Whether the client presented a verified certificate.
pub fn mtls() -> bool {
    get(&["connection", "mtls"])
        .ok()
        .flatten()
        .is_some_and(|b| b.first() == Some(&1))
}

/// The route that took the request.
pub fn route_name() -> Option<String> {
    get_string(&["route_name"])
}

/// The cluster the request went to.
pub fn cluster_name() -> Option<String> {
    get_string(&["cluster_name"])
}

/// This filter's name (its `name` in the configuration).
pub fn plugin_name() -> Option<String> {
    get_string(&["plugin_name"])
}

/// The response status, once known (in `on_log`, or on the response path).
pub fn response_code() -> Option<u16> {
    get_int(&["response", "code"]).and_then(|c| u16::try_from(c).ok())
}

/// Request duration so far (or in total, in `on_log`).
pub fn request_duration() -> Option<std::time::Duration> {
    get_int(&["request", "duration"]).map(|ns| std::time::Duration::from_nanos(ns.max(0) as u64))
}
