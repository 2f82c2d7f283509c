//! Header, trailer and metadata maps: `proxy_{get,set}_header_map_pairs`,
//! `proxy_get_header_map_{size,value}`, `proxy_{add,replace,remove}_header_map_value`.
//!
//! Availability (Envoy's windows, made lenient where Envoy's strictness only makes SDKs panic):
//! request headers stay readable and writable for the whole stream (edits after they went
//! upstream have no effect, as on Envoy — but they go out later than on Envoy: after the first
//! body bytes passed the filters, so a filter that looks at the body can still change them);
//! response headers likewise once there is a response; trailers once they exist (and addable
//! from the last body callback);
//! callout maps only while a callout is being delivered. An unavailable map reads as empty
//! (`get_*_pairs`) or absent (`get_*_value`: NOT_FOUND); writing to it is BAD_ARGUMENT.

use bytes::Bytes;
use wasmtime::Caller;
use weft_abi::{MapType, Status, deserialize_pairs};

use super::memory::{HostResult, give, read, status, with_bytes, with_pair, write_u32};
use crate::wasm::runtime::caps;
use crate::wasm::state::{Callback, Headers, HostState, StreamData};

/// Applies `f` to map `map` for reading.
fn read_map<R>(state: &HostState, map: MapType, f: impl FnOnce(Option<&Headers>) -> R) -> R {
    match map {
        MapType::GrpcReceiveInitialMetadata | MapType::HttpCallResponseHeaders => {
            f(state.callout.as_ref().map(|c| &c.headers))
        }
        MapType::GrpcReceiveTrailingMetadata | MapType::HttpCallResponseTrailers => {
            f(state.callout.as_ref().map(|c| &c.trailers))
        }
        _ => match state.stream() {
            None => f(None),
            Some(stream) => {
                let s = stream.borrow();
                f(match map {
                    MapType::HttpRequestHeaders => Some(&s.request_headers),
                    MapType::HttpRequestTrailers => s.request_trailers.as_ref(),
                    MapType::HttpResponseHeaders => s.response_headers.as_ref(),
                    MapType::HttpResponseTrailers => s.response_trailers.as_ref(),
                    _ => None,
                })
            }
        },
    }
}

/// The map `map` of the stream, if it may be written now.
fn writable(s: &mut StreamData, map: MapType, phase: Callback, eos: bool) -> Option<&mut Headers> {
    match map {
        MapType::HttpRequestHeaders => Some(&mut s.request_headers),
        MapType::HttpResponseHeaders => s.response_headers.as_mut(),
        MapType::HttpRequestTrailers => {
            // Trailers may be created from the last request body callback.
            if s.request_trailers.is_none() && phase == Callback::RequestBody && eos {
                s.request_trailers = Some(Headers::default());
            }
            s.request_trailers.as_mut()
        }
        MapType::HttpResponseTrailers => {
            if s.response_trailers.is_none() && phase == Callback::ResponseBody && eos {
                s.response_trailers = Some(Headers::default());
            }
            s.response_trailers.as_mut()
        }
        _ => None,
    }
}

fn map_type(t: i32) -> Result<MapType, Status> {
    MapType::from_u32(t as u32).ok_or(Status::BadArgument)
}

/// Runs `f` on the writable map `map` of the effective stream.
fn edit(
    state: &HostState,
    map: i32,
    f: impl FnOnce(&mut Headers) -> Result<(), Status>,
) -> HostResult {
    let map = map_type(map)?;
    let call = state.call;
    let stream = state.stream().ok_or(Status::BadArgument)?;
    let mut s = stream.borrow_mut();
    let h = writable(&mut s, map, call.phase, call.end_of_stream).ok_or(Status::BadArgument)?;
    if map != MapType::HttpRequestHeaders {
        return f(h);
    }
    let path_before = path_of(h);
    f(h)?;
    s.request_head_edits += 1;
    // `path_before` holds the old bytes alive, so new ones cannot have their address.
    let at = |b: &Option<Bytes>| b.as_ref().map(|b| (b.as_ptr(), b.len()));
    if at(&path_of(&s.request_headers)) != at(&path_before) {
        canonical_path(&mut s);
    }
    Ok(())
}

/// `:path`, a cheap handle on its bytes (a write replaces them: compared by address).
fn path_of(h: &Headers) -> Option<Bytes> {
    h.pseudo
        .iter()
        .find(|(k, _)| &k[..] == b":path")
        .map(|(_, v)| v.clone())
}

/// Keeps the request's `:path` canonical after a filter wrote it, so the filters after it, the
/// router and the upstream see one path. A path that cannot be made canonical is left as the
/// filter wrote it; routing refuses it (400).
fn canonical_path(s: &mut StreamData) {
    let Some(routing) = s.info.routes.clone() else {
        return;
    };
    let Some(target) = s
        .request_headers
        .get(b":path")
        .and_then(|p| std::str::from_utf8(p).ok())
    else {
        return;
    };
    if let Some(canonical) = routing.canonical_target(target) {
        let _ = s.request_headers.replace(b":path", canonical.as_bytes());
    }
}

pub fn get_header_map_pairs(
    mut caller: Caller<'_, HostState>,
    map: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    status((|| {
        let map = map_type(map)?;
        let bytes = read_map(caller.data(), map, |h| h.map(Headers::serialize));
        // An unavailable map is empty (Envoy answers OK; the Rust SDK accepts nothing else).
        give(
            &mut caller,
            bytes.as_deref().unwrap_or_default(),
            ret_ptr,
            ret_len,
        )
    })())
}

pub fn set_header_map_pairs(
    mut caller: Caller<'_, HostState>,
    map: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    status((|| {
        if len as u32 as usize > weft_abi::MAX_PAIRS_BYTES {
            return Err(Status::BadArgument);
        }
        let bytes = read(&mut caller, ptr, len)?;
        let pairs = deserialize_pairs(&bytes).map_err(|_| Status::BadArgument)?;
        edit(caller.data(), map, |h| {
            h.set_all(&pairs).map_err(|_| Status::BadArgument)
        })
    })())
}

pub fn get_header_map_size(mut caller: Caller<'_, HostState>, map: i32, ret_size: i32) -> i32 {
    status((|| {
        let map = map_type(map)?;
        let size = read_map(caller.data(), map, |h| h.map_or(0, Headers::byte_size));
        write_u32(&mut caller, ret_size, size as u32)
    })())
}

pub fn get_header_map_value(
    mut caller: Caller<'_, HostState>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    status((|| {
        let map = map_type(map)?;
        let value = with_bytes(&mut caller, key_ptr, key_len, |key, state| {
            read_map(state, map, |h| {
                h.and_then(|h| h.get(key)).map(<[u8]>::to_vec)
            })
        })?;
        match value {
            Some(v) => give(&mut caller, &v, ret_ptr, ret_len),
            // v0.1.0 modules expect OK with an empty value for a missing key.
            None if caller.data().abi == weft_abi::AbiVersion::V0_1_0 => {
                give(&mut caller, &[], ret_ptr, ret_len)
            }
            None => Err(Status::NotFound),
        }
    })())
}

pub fn add_header_map_value(
    mut caller: Caller<'_, HostState>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    let at = ((key_ptr, key_len), (value_ptr, value_len));
    status(edit_pair(&mut caller, map, at, |h, key, value| {
        room_for(h, key.len() + value.len(), 1)?;
        h.add(key, value).map_err(|_| Status::BadArgument)
    }))
}

/// Runs `f` on the writable map `map` with a name and a value (pointer and length each) read
/// where they are in guest memory: the map copies them once, into its own field.
fn edit_pair(
    caller: &mut Caller<'_, HostState>,
    map: i32,
    (key, value): ((i32, i32), (i32, i32)),
    f: impl FnOnce(&mut Headers, &[u8], &[u8]) -> HostResult,
) -> HostResult {
    with_pair(caller, key, value, |key, value, state| {
        edit(state, map, |h| f(h, key, value))
    })?
}

/// Whether a map may grow by `bytes` and `entries`: a filter cannot grow a header map past
/// proxy-wasm-cpp-host's limits on maps (1 MiB, 1024 entries).
fn room_for(h: &Headers, bytes: usize, entries: usize) -> HostResult {
    if h.len() + entries > caps::MAX_HEADER_MAP_ENTRIES
        || h.byte_size() + bytes > caps::MAX_HEADER_MAP_BYTES
    {
        return Err(Status::BadArgument);
    }
    Ok(())
}

pub fn replace_header_map_value(
    mut caller: Caller<'_, HostState>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    let at = ((key_ptr, key_len), (value_ptr, value_len));
    status(edit_pair(&mut caller, map, at, |h, key, value| {
        // What it replaces leaves room (`get` is the first value; the others go too).
        let old = h.get(key).map(|v| key.len() + v.len());
        let added = (key.len() + value.len()).saturating_sub(old.unwrap_or(0));
        room_for(h, added, usize::from(old.is_none()))?;
        h.replace(key, value).map_err(|_| Status::BadArgument)
    }))
}

pub fn remove_header_map_value(
    mut caller: Caller<'_, HostState>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
) -> i32 {
    status((|| {
        with_bytes(&mut caller, key_ptr, key_len, |key, state| {
            edit(state, map, |h| {
                h.remove(key);
                Ok(())
            })
        })?
    })())
}
