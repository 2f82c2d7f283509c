//! Callouts: `proxy_http_call`, `proxy_grpc_call`, `proxy_grpc_stream`, `proxy_grpc_send`,
//! `proxy_grpc_cancel`, `proxy_grpc_close`.
//!
//! A callout goes to a configured cluster by name (never a URL), belongs to the root context of
//! the caller, and is answered later by a callback on that root context (the worker runs it:
//! [`crate::wasm::callout`]). The token is returned before anything can complete.

use std::time::Duration;

use bytes::Bytes;
use wasmtime::Caller;
use weft_abi::{MAX_PAIRS_BYTES, Status, deserialize_pairs};

use super::memory::{HostResult, read, status, write_u32};
use crate::wasm::callout::{GrpcTarget, HttpCallout, SendError};
use crate::wasm::runtime::caps;
use crate::wasm::state::{Headers, HostState};
use crate::wasm::worker::{CalloutSlot, WasmWorker};

/// Token kinds (low two bits), so the three kinds never collide.
pub const HTTP: u32 = 0;
pub const GRPC_CALL: u32 = 1;
pub const GRPC_STREAM: u32 = 2;

fn text(bytes: Vec<u8>) -> Result<String, Status> {
    String::from_utf8(bytes).map_err(|_| Status::BadArgument)
}

fn pairs(bytes: &[u8]) -> Result<Headers, Status> {
    let p = deserialize_pairs(bytes).map_err(|_| Status::BadArgument)?;
    Headers::from_pairs(&p).map_err(|_| Status::BadArgument)
}

/// Reserves the token's slot in guest memory before starting anything.
fn check_out(caller: &mut Caller<'_, HostState>, ret_token: i32) -> HostResult {
    write_u32(caller, ret_token, 0)
}

/// Room for one more callout: within the VM's `limits.callouts` and the worker's cap
/// (`INTERNAL_FAILURE` past either: the SDKs report it as an error).
fn admit(state: &HostState, worker: &WasmWorker) -> Result<CalloutSlot, Status> {
    if state.callouts.len() >= state.host_limits.callouts {
        return Err(Status::InternalFailure);
    }
    worker.callout_slot().ok_or(Status::InternalFailure)
}

/// The guest's timeout; 0 means the filter's `limits.callout_timeout`, not forever.
fn timeout(state: &HostState, timeout_ms: i32) -> Result<Duration, Status> {
    match timeout_ms {
        ..0 => Err(Status::BadArgument),
        0 => Ok(state.host_limits.callout_timeout),
        ms => Ok(Duration::from_millis(ms as u64)),
    }
}

/// Reads `len` bytes of guest memory, refusing more than `max` before copying anything.
fn read_at_most(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    max: usize,
    refusal: Status,
) -> Result<Vec<u8>, Status> {
    if len as u32 as usize > max {
        return Err(refusal);
    }
    read(caller, ptr, len)
}

#[allow(clippy::too_many_arguments)]
pub fn http_call(
    mut caller: Caller<'_, HostState>,
    upstream_ptr: i32,
    upstream_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    body_ptr: i32,
    body_len: i32,
    trailers_ptr: i32,
    trailers_len: i32,
    timeout_ms: i32,
    ret_token: i32,
) -> i32 {
    status((|| {
        let max_body = caller.data().host_limits.callout_body;
        let bad = Status::BadArgument;
        let upstream = text(read_at_most(
            &mut caller,
            upstream_ptr,
            upstream_len,
            caps::MAX_NAME,
            bad,
        )?)?;
        let headers = pairs(&read_at_most(
            &mut caller,
            headers_ptr,
            headers_len,
            MAX_PAIRS_BYTES,
            bad,
        )?)?;
        let body = Bytes::from(read_at_most(
            &mut caller,
            body_ptr,
            body_len,
            max_body,
            bad,
        )?);
        let trailers = pairs(&read_at_most(
            &mut caller,
            trailers_ptr,
            trailers_len,
            MAX_PAIRS_BYTES,
            bad,
        )?)?;
        let timeout = timeout(caller.data(), timeout_ms)?;
        for required in [&b":method"[..], b":path", b":authority"] {
            if headers.get(required).is_none_or(<[u8]>::is_empty) {
                return Err(Status::BadArgument);
            }
        }
        check_out(&mut caller, ret_token)?;
        let state = caller.data_mut();
        let root = state
            .root_of(state.call.effective)
            .ok_or(Status::BadArgument)?;
        let worker = state
            .worker
            .as_ref()
            .and_then(|w| w.upgrade())
            .ok_or(Status::InternalFailure)?;
        let cluster = worker.cluster(&upstream).ok_or(Status::BadArgument)?;
        let slot = admit(state, &worker)?;
        let token = state.token(HTTP);
        state.callouts.insert(token, root);
        worker.http_call(
            state.vm.clone(),
            HttpCallout {
                root,
                token,
                cluster,
                headers,
                body,
                trailers,
                timeout,
                max_body,
            },
            slot,
        );
        write_u32(&mut caller, ret_token, token)
    })())
}

fn grpc_target(
    caller: &mut Caller<'_, HostState>,
    upstream: (i32, i32),
    service: (i32, i32),
    method: (i32, i32),
    metadata: (i32, i32),
) -> Result<GrpcTarget, Status> {
    let bad = Status::BadArgument;
    let upstream = read_at_most(caller, upstream.0, upstream.1, caps::MAX_NAME, bad)?;
    let upstream = text(upstream).map_err(|_| Status::ParseFailure)?;
    let service = text(read_at_most(
        caller,
        service.0,
        service.1,
        caps::MAX_NAME,
        bad,
    )?)?;
    let method = text(read_at_most(
        caller,
        method.0,
        method.1,
        caps::MAX_NAME,
        bad,
    )?)?;
    let metadata = pairs(&read_at_most(
        caller,
        metadata.0,
        metadata.1,
        MAX_PAIRS_BYTES,
        bad,
    )?)?;
    let worker = caller
        .data()
        .worker
        .as_ref()
        .and_then(|w| w.upgrade())
        .ok_or(Status::InternalFailure)?;
    // An unknown upstream is a parse failure for gRPC (Envoy parses it as a GrpcService).
    let cluster = worker.cluster(&upstream).ok_or(Status::ParseFailure)?;
    if service.is_empty() || method.is_empty() || service.contains('/') || method.contains('/') {
        return Err(Status::BadArgument);
    }
    Ok(GrpcTarget {
        cluster,
        path: format!("/{service}/{method}"),
        metadata,
        max_message: caller.data().host_limits.callout_body,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn grpc_call(
    mut caller: Caller<'_, HostState>,
    upstream_ptr: i32,
    upstream_len: i32,
    service_ptr: i32,
    service_len: i32,
    method_ptr: i32,
    method_len: i32,
    metadata_ptr: i32,
    metadata_len: i32,
    message_ptr: i32,
    message_len: i32,
    timeout_ms: i32,
    ret_token: i32,
) -> i32 {
    status((|| {
        let target = grpc_target(
            &mut caller,
            (upstream_ptr, upstream_len),
            (service_ptr, service_len),
            (method_ptr, method_len),
            (metadata_ptr, metadata_len),
        )?;
        // The SDKs take INTERNAL_FAILURE and PARSE_FAILURE as errors here, nothing else.
        let message = read_at_most(
            &mut caller,
            message_ptr,
            message_len,
            target.max_message,
            Status::InternalFailure,
        )?;
        let message = Bytes::from(message);
        let timeout = timeout(caller.data(), timeout_ms).map_err(|_| Status::InternalFailure)?;
        check_out(&mut caller, ret_token)?;
        let state = caller.data_mut();
        let root = state
            .root_of(state.call.effective)
            .ok_or(Status::BadArgument)?;
        let worker = state
            .worker
            .as_ref()
            .and_then(|w| w.upgrade())
            .ok_or(Status::InternalFailure)?;
        let slot = admit(state, &worker)?;
        let token = state.token(GRPC_CALL);
        state.callouts.insert(token, root);
        let handle = worker.grpc_call(
            state.vm.clone(),
            root,
            token,
            target,
            message,
            timeout,
            slot,
        );
        state.grpc.insert(token, handle);
        write_u32(&mut caller, ret_token, token)
    })())
}

#[allow(clippy::too_many_arguments)]
pub fn grpc_stream(
    mut caller: Caller<'_, HostState>,
    upstream_ptr: i32,
    upstream_len: i32,
    service_ptr: i32,
    service_len: i32,
    method_ptr: i32,
    method_len: i32,
    metadata_ptr: i32,
    metadata_len: i32,
    ret_token: i32,
) -> i32 {
    status((|| {
        let target = grpc_target(
            &mut caller,
            (upstream_ptr, upstream_len),
            (service_ptr, service_len),
            (method_ptr, method_len),
            (metadata_ptr, metadata_len),
        )?;
        check_out(&mut caller, ret_token)?;
        let state = caller.data_mut();
        let root = state
            .root_of(state.call.effective)
            .ok_or(Status::BadArgument)?;
        let worker = state
            .worker
            .as_ref()
            .and_then(|w| w.upgrade())
            .ok_or(Status::InternalFailure)?;
        let slot = admit(state, &worker)?;
        let token = state.token(GRPC_STREAM);
        state.callouts.insert(token, root);
        let handle = worker.grpc_stream(state.vm.clone(), root, token, target, slot);
        state.grpc.insert(token, handle);
        write_u32(&mut caller, ret_token, token)
    })())
}

pub fn grpc_send(
    mut caller: Caller<'_, HostState>,
    token: i32,
    msg_ptr: i32,
    msg_len: i32,
    end_stream: i32,
) -> i32 {
    status((|| {
        let max = caller.data().host_limits.callout_body;
        let msg = Bytes::from(read_at_most(
            &mut caller,
            msg_ptr,
            msg_len,
            max,
            Status::BadArgument,
        )?);
        let token = token as u32;
        if token & 3 != GRPC_STREAM {
            return Err(Status::BadArgument);
        }
        let handle = caller
            .data_mut()
            .grpc
            .get_mut(&token)
            .ok_or(Status::NotFound)?;
        match handle.send(msg, end_stream != 0) {
            Ok(()) => Ok(()),
            Err(SendError::Closed) => Err(Status::NotFound),
            // The peer does not read fast enough: the guest may try again later.
            Err(SendError::Full) => Err(Status::BadArgument),
        }
    })())
}

/// Cancels a call or resets a stream: no callback follows.
pub fn grpc_cancel(mut caller: Caller<'_, HostState>, token: i32) -> i32 {
    let state = caller.data_mut();
    match state.grpc.remove(&(token as u32)) {
        Some(handle) => {
            handle.cancel();
            state.callouts.remove(&(token as u32));
            Status::Ok as i32
        }
        None => Status::NotFound as i32,
    }
}

/// Half-closes a stream (a call is cancelled).
pub fn grpc_close(mut caller: Caller<'_, HostState>, token: i32) -> i32 {
    let state = caller.data_mut();
    let token = token as u32;
    if token & 3 == GRPC_STREAM {
        match state.grpc.get_mut(&token) {
            Some(handle) => {
                handle.close_send();
                Status::Ok as i32
            }
            None => Status::NotFound as i32,
        }
    } else {
        grpc_cancel(caller, token as i32)
    }
}
