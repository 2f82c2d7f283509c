//! Properties: `proxy_get_property`, `proxy_set_property`, with Envoy's attribute names and
//! encodings (strings raw; int64 and uint64 as 8 bytes little-endian; bool as 1 byte;
//! timestamps and durations as int64 nanoseconds; maps in the pairs encoding).
//!
//! | path | type |
//! |---|---|
//! | `plugin_name`, `plugin_root_id`, `plugin_vm_id` | string |
//! | `request.path` `.url_path` `.host` `.scheme` `.method` `.referer` `.useragent` `.id` `.protocol` `.query` | string |
//! | `request.headers` (map), `request.headers.<name>` | map / string |
//! | `request.time` | timestamp; `request.duration` duration; `request.size` `.total_size` `.headers_bytes` int |
//! | `response.code` `.grpc_status` `.size` `.total_size` `.headers_bytes` `.flags` | int |
//! | `response.code_details` string; `response.headers` `.trailers` map; `response.backend_latency` duration |
//! | `source.address` `destination.address` (`ip:port`), `.port` (int) | string / int |
//! | `connection.id` (uint), `connection.mtls` (bool), `connection.requested_server_name` | |
//! | `upstream.address`, `upstream.port`, `upstream.request_attempt_count` (uint) | |
//! | `route_name`, `cluster_name`, `listener_name` (also under `xds.`) | string |
//! | any other name | what `proxy_set_property` stored for this request |

use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use wasmtime::Caller;
use weft_abi::{Status, serialize_pairs, split_property_path};

use super::memory::{give, read, status, with_bytes};
use crate::wasm::state::{Headers, HostState, StreamData};

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn uint(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn duration(d: Duration) -> Vec<u8> {
    int(d.as_nanos() as i64)
}

/// Map property: names lower-case, several values joined by `,`.
fn map(h: &Headers) -> Vec<u8> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(h.len());
    for (k, v) in &h.pseudo {
        pairs.push((k.to_vec(), v.to_vec()));
    }
    for name in h.map.keys() {
        let mut joined = Vec::new();
        for (i, v) in h.map.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.push(b',');
            }
            joined.extend_from_slice(v.as_bytes());
        }
        pairs.push((name.as_str().as_bytes().to_vec(), joined));
    }
    serialize_pairs(&pairs)
}

fn header(h: &Headers, name: &[u8]) -> Option<Vec<u8>> {
    if name.first() == Some(&b':') {
        return h.get(name).map(<[u8]>::to_vec);
    }
    let name = crate::wasm::state::field_name(name)?;
    let mut values = h.map.get_all(name).iter().peekable();
    values.peek()?;
    let mut out = Vec::new();
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

fn addr(a: Option<SocketAddr>, field: &[u8]) -> Option<Vec<u8>> {
    let a = a?;
    match field {
        b"address" => {
            let mut text = Vec::with_capacity(21);
            crate::text::push_addr(&mut text, a);
            Some(text)
        }
        b"port" => Some(int(i64::from(a.port()))),
        _ => None,
    }
}

fn request(s: &StreamData, path: &[&[u8]]) -> Option<Vec<u8>> {
    let h = &s.request_headers;
    let full_path = h.get(b":path").unwrap_or(b"/");
    match *path.first()? {
        b"path" => Some(full_path.to_vec()),
        b"url_path" => Some(
            full_path
                .split(|b| *b == b'?')
                .next()
                .unwrap_or(b"/")
                .to_vec(),
        ),
        b"query" => Some(
            full_path
                .iter()
                .position(|b| *b == b'?')
                .map(|i| full_path[i + 1..].to_vec())
                .unwrap_or_default(),
        ),
        b"host" => h.get(b":authority").map(<[u8]>::to_vec),
        b"scheme" => h.get(b":scheme").map(<[u8]>::to_vec),
        b"method" => h.get(b":method").map(<[u8]>::to_vec),
        b"referer" => header(h, b"referer"),
        b"useragent" => header(h, b"user-agent"),
        b"id" => header(h, b"x-request-id"),
        b"protocol" => Some(s.info.protocol.as_bytes().to_vec()),
        b"headers" => match path.get(1) {
            Some(name) => header(h, &name.to_ascii_lowercase()),
            None => Some(map(h)),
        },
        b"time" => {
            let began = std::time::SystemTime::now().checked_sub(s.info.started?.elapsed())?;
            Some(duration(began.duration_since(UNIX_EPOCH).ok()?))
        }
        b"duration" => s.info.duration.map(duration),
        b"size" => Some(int(s.info.request_body_bytes as i64)),
        b"headers_bytes" => Some(int(h.byte_size() as i64)),
        b"total_size" => Some(int(request_total_size(s) as i64)),
        _ => None,
    }
}

fn response(s: &StreamData, path: &[&[u8]]) -> Option<Vec<u8>> {
    let h = s.response_headers.as_ref();
    match *path.first()? {
        b"code" => s.info.response_code.map(|c| int(i64::from(c))),
        b"code_details" => s
            .info
            .response_details
            .as_ref()
            .map(|d| d.as_bytes().to_vec()),
        b"grpc_status" => grpc_status(s).map(int),
        b"headers" => match path.get(1) {
            Some(name) => header(h?, &name.to_ascii_lowercase()),
            None => Some(map(h?)),
        },
        b"trailers" => match path.get(1) {
            Some(name) => header(s.response_trailers.as_ref()?, &name.to_ascii_lowercase()),
            None => Some(map(s.response_trailers.as_ref()?)),
        },
        b"size" => Some(int(s.info.response_body_bytes as i64)),
        b"headers_bytes" => Some(int(h.map_or(0, Headers::byte_size) as i64)),
        b"total_size" => Some(int(response_total_size(s) as i64)),
        b"flags" => Some(uint(0)),
        b"backend_latency" => s.info.backend_latency.map(duration),
        _ => None,
    }
}

fn route_name(s: &StreamData) -> Option<Vec<u8>> {
    let Some(route) = s.info.route.as_ref() else {
        // Not routed yet: the match for the head as it is now, found once per version of it.
        let mut seen = s.route_seen.borrow_mut();
        let name = match &*seen {
            Some((edits, name)) if *edits == s.request_head_edits => name.clone(),
            _ => {
                let name = s.info.routes.as_ref()?.route_name(&s.request_headers);
                *seen = Some((s.request_head_edits, name.clone()));
                name
            }
        };
        return name.map(String::into_bytes);
    };
    let r = route.route();
    (!r.is_empty()).then(|| r.as_bytes().to_vec())
}

/// `request.total_size`: the head's bytes and the body's.
pub fn request_total_size(s: &StreamData) -> u64 {
    s.request_headers.byte_size() as u64 + s.info.request_body_bytes
}

/// `response.total_size`.
pub fn response_total_size(s: &StreamData) -> u64 {
    s.response_headers.as_ref().map_or(0, Headers::byte_size) as u64 + s.info.response_body_bytes
}

/// `response.grpc_status`: from the trailers, else the head (a trailers-only answer).
pub fn grpc_status(s: &StreamData) -> Option<i64> {
    fn from(h: Option<&Headers>) -> Option<&[u8]> {
        h?.get(b"grpc-status")
    }
    let v = from(s.response_trailers.as_ref()).or_else(|| from(s.response_headers.as_ref()))?;
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// The client's verified identity: its certificate's first URI SAN (when not empty), else its
/// first DNS SAN.
pub fn peer_identity(s: &StreamData) -> Option<&str> {
    let peer = s.info.tls.as_ref()?.peer.as_ref()?;
    peer.uris
        .first()
        .filter(|u| !u.is_empty())
        .or_else(|| peer.dns.first())
        .map(String::as_str)
}

/// `cluster_name`: the cluster that took the request.
pub fn cluster(s: &StreamData) -> Option<&str> {
    let c = s.info.route.as_ref()?.cluster();
    (!c.is_empty()).then_some(c)
}

fn cluster_name(s: &StreamData) -> Option<Vec<u8>> {
    cluster(s).map(|c| c.as_bytes().to_vec())
}

fn stream_property(s: &StreamData, segs: &[&[u8]], raw_path: &[u8]) -> Option<Vec<u8>> {
    let rest = &segs[1..];
    match segs[0] {
        b"request" => request(s, rest),
        b"response" => response(s, rest),
        b"source" => addr(s.info.peer, rest.first()?),
        b"destination" => addr(s.info.local, rest.first()?),
        b"upstream" => match *rest.first()? {
            b"request_attempt_count" => Some(uint(u64::from(s.info.tries))),
            field => addr(s.info.upstream, field),
        },
        b"connection" => connection(s, rest.first()?),
        b"route_name" => route_name(s),
        b"cluster_name" => cluster_name(s),
        b"listener_name" => Some(s.info.listener.as_bytes().to_vec()),
        b"xds" => match *rest.first()? {
            b"route_name" => route_name(s),
            b"cluster_name" => cluster_name(s),
            b"listener_name" => Some(s.info.listener.as_bytes().to_vec()),
            _ => None,
        },
        _ => s.filter_state.get(raw_path).map(|v| v.to_vec()),
    }
}

/// `connection.*`: Envoy's connection attributes, TLS ones included.
fn connection(s: &StreamData, key: &[u8]) -> Option<Vec<u8>> {
    let tls = s.info.tls.as_deref();
    let peer = tls.and_then(|t| t.peer.as_ref());
    let text = |v: &str| Some(v.as_bytes().to_vec());
    match key {
        b"id" => Some(uint(s.info.connection_id)),
        b"mtls" => Some(vec![u8::from(peer.is_some())]),
        b"requested_server_name" => text(tls.and_then(|t| t.sni.as_deref()).unwrap_or("")),
        b"tls_version" => text(tls?.version),
        b"uri_san_peer_certificate" => text(peer?.uris.first()?),
        b"dns_san_peer_certificate" => text(peer?.dns.first()?),
        b"subject_peer_certificate" => text(&peer?.subject),
        b"sha256_peer_certificate_digest" => text(&peer?.sha256),
        _ => None,
    }
}

fn property(state: &HostState, raw_path: &[u8]) -> Option<Vec<u8>> {
    let segs = split_property_path(raw_path);
    let first = *segs.first()?;
    if first.starts_with(b"plugin_")
        && let Some(plugin) = state.plugin()
    {
        match first {
            b"plugin_name" => return Some(plugin.name.as_bytes().to_vec()),
            b"plugin_root_id" => return Some(plugin.root_id.as_bytes().to_vec()),
            b"plugin_vm_id" => return Some(plugin.vm_id.as_bytes().to_vec()),
            _ => {}
        }
    }
    let stream = state.stream()?;
    let s = stream.borrow();
    stream_property(&s, &segs, raw_path)
}

pub fn get_property(
    mut caller: Caller<'_, HostState>,
    path_ptr: i32,
    path_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    status((|| {
        let value = with_bytes(&mut caller, path_ptr, path_len, |path, state| {
            property(state, path)
        })?;
        let value = value.ok_or(Status::NotFound)?;
        give(&mut caller, &value, ret_ptr, ret_len)
    })())
}

/// Stores a value for this request (readable back, and by the other filters of the stream).
pub fn set_property(
    mut caller: Caller<'_, HostState>,
    path_ptr: i32,
    path_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    status((|| {
        let limit = crate::wasm::runtime::caps::MAX_FILTER_STATE;
        if (path_len as u32 as usize).saturating_add(value_len as u32 as usize) > limit {
            return Err(Status::BadArgument);
        }
        let path = read(&mut caller, path_ptr, path_len)?;
        let value = read(&mut caller, value_ptr, value_len)?;
        let stream = caller.data().stream().ok_or(Status::NotFound)?;
        let mut s = stream.borrow_mut();
        let s = &mut *s;
        let added = path.len() + value.len();
        // What the stream's filters have set, with this value instead of the one it replaces
        // (the path is looked up once; a refused value leaves the map as it was).
        let entry = s.filter_state.entry(path);
        let replaced = match &entry {
            Entry::Occupied(o) => o.key().len() + o.get().len(),
            Entry::Vacant(_) => 0,
        };
        let held = s.filter_state_bytes - replaced + added;
        if held > limit {
            return Err(Status::BadArgument);
        }
        s.filter_state_bytes = held;
        match entry {
            Entry::Occupied(mut o) => {
                o.insert(value.into());
            }
            Entry::Vacant(v) => {
                v.insert(value.into());
            }
        }
        Ok(())
    })())
}
