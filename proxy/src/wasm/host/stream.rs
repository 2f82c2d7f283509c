//! Stream control: `proxy_continue_stream`, `proxy_close_stream`, `proxy_send_local_response`,
//! `proxy_get_status`, and v0.1.0's `proxy_continue_request` / `proxy_continue_response` /
//! `proxy_clear_route_cache`.
//!
//! None of these act at once: they are recorded on the stream and applied by the chain after
//! the guest call returns (acting inside the call would re-enter the guest, which the SDKs do
//! not survive).

use bytes::Bytes;
use wasmtime::Caller;
use weft_abi::{Status, StreamType, deserialize_pairs};

use super::memory::{HostResult, give, read, status, write_u32};
use crate::wasm::state::{Direction, HostState, LocalResponse, StreamAction};

fn act(
    caller: &mut Caller<'_, HostState>,
    t: i32,
    make: fn(Direction) -> StreamAction,
) -> HostResult {
    let direction = match StreamType::from_u32(t as u32).ok_or(Status::BadArgument)? {
        StreamType::HttpRequest => Direction::Request,
        StreamType::HttpResponse => Direction::Response,
        // No TCP filters: nothing to resume or close there.
        StreamType::Downstream | StreamType::Upstream => return Ok(()),
    };
    match caller.data().stream_at() {
        Some((stream, index)) => {
            if !stream.borrow_mut().push(index, make(direction)) {
                return Err(Status::BadArgument);
            }
        }
        // A root context has no stream; the SDKs only accept OK, so this is a logged no-op.
        None => {
            tracing::debug!(filter = %caller.data().log_name(), "stream action outside a stream context ignored")
        }
    }
    Ok(())
}

pub fn continue_stream(mut caller: Caller<'_, HostState>, t: i32) -> i32 {
    status(act(&mut caller, t, StreamAction::Continue))
}

pub fn close_stream(mut caller: Caller<'_, HostState>, t: i32) -> i32 {
    status(act(&mut caller, t, StreamAction::Close))
}

pub fn continue_request(mut caller: Caller<'_, HostState>) -> i32 {
    status(act(
        &mut caller,
        StreamType::HttpRequest as i32,
        StreamAction::Continue,
    ))
}

pub fn continue_response(mut caller: Caller<'_, HostState>) -> i32 {
    status(act(
        &mut caller,
        StreamType::HttpResponse as i32,
        StreamAction::Continue,
    ))
}

/// v0.1.0: weft routes after the request headers callbacks, so nothing is cached to clear.
pub fn clear_route_cache(_caller: Caller<'_, HostState>) -> i32 {
    Status::Ok as i32
}

#[allow(clippy::too_many_arguments)]
pub fn send_local_response(
    mut caller: Caller<'_, HostState>,
    code: i32,
    details_ptr: i32,
    details_len: i32,
    body_ptr: i32,
    body_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    grpc_status: i32,
) -> i32 {
    status((|| {
        let details = read(&mut caller, details_ptr, details_len)?;
        let body = read(&mut caller, body_ptr, body_len)?;
        if headers_len as u32 as usize > weft_abi::MAX_PAIRS_BYTES {
            return Err(Status::BadArgument);
        }
        let raw = read(&mut caller, headers_ptr, headers_len)?;
        let headers = deserialize_pairs(&raw)
            .map_err(|_| Status::BadArgument)?
            .into_iter()
            .map(|(k, v)| {
                (
                    Bytes::copy_from_slice(&k.to_ascii_lowercase()),
                    Bytes::copy_from_slice(v),
                )
            })
            .collect();
        if !(200..=599).contains(&code) {
            return Err(Status::BadArgument);
        }
        let name = caller.data().log_name();
        let (stream, index) = caller.data().stream_at().ok_or(Status::BadArgument)?;
        let mut s = stream.borrow_mut();
        if s.local_response_sent {
            // A second one would contradict the first (and hung requests in Envoy): ignored.
            tracing::warn!(filter = %name, "a second local response for the same request was ignored");
            return Ok(());
        }
        s.local_response_sent = true;
        let pushed = s.push(
            index,
            StreamAction::LocalResponse(LocalResponse {
                status: code as u16,
                details: details.into(),
                body: body.into(),
                headers,
                grpc_status: (0..=16)
                    .contains(&grpc_status)
                    .then_some(grpc_status as u32),
            }),
        );
        if !pushed {
            s.local_response_sent = false;
            return Err(Status::BadArgument);
        }
        Ok(())
    })())
}

pub fn get_status(
    mut caller: Caller<'_, HostState>,
    ret_code: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    status((|| {
        let (code, message) = caller.data().status.clone();
        write_u32(&mut caller, ret_code, code)?;
        give(&mut caller, &message, ret_ptr, ret_len)
    })())
}
