//! Callouts: `proxy_http_call`, `proxy_grpc_call`, `proxy_grpc_stream`, `proxy_grpc_send`,
//! `proxy_grpc_cancel`, `proxy_grpc_close`.
//!
//! A callout goes to a configured cluster by name (never a URL), belongs to the root context of
//! the caller, and is answered later by a callback on that root context (the worker runs it:
//! [`crate::wasm::callout`]). The token is returned before anything can complete.

use std::time::Duration;

use bytes::Bytes;
use wasmtime::Caller;
use weft_abi::{Status, deserialize_pairs};

use super::memory::{HostResult, read, status, write_u32};
use crate::wasm::callout::{GrpcTarget, HttpCallout};
use crate::wasm::state::{Headers, HostState};

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
        let upstream = text(read(&mut caller, upstream_ptr, upstream_len)?)?;
        let headers = pairs(&read(&mut caller, headers_ptr, headers_len)?)?;
        let body = Bytes::from(read(&mut caller, body_ptr, body_len)?);
        let trailers = pairs(&read(&mut caller, trailers_ptr, trailers_len)?)?;
        if timeout_ms < 0 {
            return Err(Status::BadArgument);
        }
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
                timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64)),
            },
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
    let upstream = text(read(caller, upstream.0, upstream.1)?).map_err(|_| Status::ParseFailure)?;
    let service = text(read(caller, service.0, service.1)?)?;
    let method = text(read(caller, method.0, method.1)?)?;
    let metadata = pairs(&read(caller, metadata.0, metadata.1)?)?;
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
        let message = Bytes::from(read(&mut caller, message_ptr, message_len)?);
        if timeout_ms < 0 {
            return Err(Status::BadArgument);
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
        let token = state.token(GRPC_CALL);
        state.callouts.insert(token, root);
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64));
        let handle = worker.grpc_call(state.vm.clone(), root, token, target, message, timeout);
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
        let token = state.token(GRPC_STREAM);
        state.callouts.insert(token, root);
        let handle = worker.grpc_stream(state.vm.clone(), root, token, target);
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
        let msg = Bytes::from(read(&mut caller, msg_ptr, msg_len)?);
        let token = token as u32;
        if token & 3 != GRPC_STREAM {
            return Err(Status::BadArgument);
        }
        let handle = caller
            .data_mut()
            .grpc
            .get_mut(&token)
            .ok_or(Status::NotFound)?;
        if handle.send(msg, end_stream != 0) {
            Ok(())
        } else {
            Err(Status::NotFound)
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
