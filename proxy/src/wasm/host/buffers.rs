//! Buffers: `proxy_get_buffer_bytes`, `proxy_get_buffer_status`, `proxy_set_buffer_bytes`, and
//! v0.1.0's `proxy_get_configuration`.
//!
//! HTTP bodies are the bytes the calling filter holds (the current chunk, or everything it
//! buffered while pausing); configurations are readable at any time; callout bodies while the
//! callout is being delivered.

use bytes::Bytes;
use wasmtime::Caller;
use weft_abi::{BufferType, Status};

use super::memory::{HostResult, give, read, status, write_u32};
use crate::wasm::state::{Callback, Direction, HostState};

/// A copy of buffer `t` as the effective context sees it.
fn contents(state: &HostState, t: BufferType) -> Result<Bytes, Status> {
    match t {
        BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
            let (stream, index) = state.stream_at().ok_or(Status::NotFound)?;
            let s = stream.borrow();
            let d = if t == BufferType::HttpRequestBody {
                Direction::Request
            } else {
                Direction::Response
            };
            Ok(Bytes::copy_from_slice(s.body(d, index)))
        }
        BufferType::HttpCallResponseBody | BufferType::GrpcReceiveBuffer => state
            .callout
            .as_ref()
            .map(|c| c.body.clone())
            .ok_or(Status::NotFound),
        BufferType::VmConfiguration => Ok(state.vm_config.clone()),
        BufferType::PluginConfiguration => state
            .plugin()
            .map(|p| p.config.clone())
            .ok_or(Status::NotFound),
        BufferType::DownstreamData
        | BufferType::UpstreamData
        | BufferType::ForeignFunctionArguments => Err(Status::NotFound),
    }
}

fn buffer_type(t: i32) -> Result<BufferType, Status> {
    BufferType::from_u32(t as u32).ok_or(Status::BadArgument)
}

pub fn get_buffer_bytes(
    mut caller: Caller<'_, HostState>,
    t: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    status((|| {
        let (start, max) = (start as u32 as usize, max as u32 as usize);
        start.checked_add(max).ok_or(Status::BadArgument)?;
        let bytes = contents(caller.data(), buffer_type(t)?)?;
        let from = start.min(bytes.len());
        let to = (from + max).min(bytes.len());
        give(&mut caller, &bytes[from..to], ret_ptr, ret_len)
    })())
}

pub fn get_buffer_status(
    mut caller: Caller<'_, HostState>,
    t: i32,
    ret_len: i32,
    ret_flags: i32,
) -> i32 {
    status((|| {
        let len = contents(caller.data(), buffer_type(t)?)?.len();
        write_u32(&mut caller, ret_len, len as u32)?;
        write_u32(&mut caller, ret_flags, 0)
    })())
}

/// Replaces `size` bytes at `start` with `data`: `(0, 0)` prepends, `start >= len` appends,
/// `(0, >= len)` replaces everything, anything else splices.
pub fn set_buffer_bytes(
    mut caller: Caller<'_, HostState>,
    t: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    status((|| {
        let limit = caller.data().host_limits.body_buffer;
        if len as u32 as usize > limit {
            return Err(Status::BadArgument);
        }
        let data = read(&mut caller, ptr, len)?;
        let t = buffer_type(t)?;
        let (stream, index) = caller.data().stream_at().ok_or(Status::NotFound)?;
        let mut s = stream.borrow_mut();
        let d = match t {
            BufferType::HttpRequestBody => Direction::Request,
            BufferType::HttpResponseBody => Direction::Response,
            _ => return Err(Status::BadArgument),
        };
        let body = s.body_mut(d, index);
        let start = (start as u32 as usize).min(body.len());
        let end = start.saturating_add(size as u32 as usize).min(body.len());
        // A body a filter grows may not grow past the filter's `body_buffer` (one it receives
        // larger may shrink or stay as it is).
        let new_len = body.len() - (end - start) + data.len();
        if new_len > body.len() && new_len > limit {
            return Err(Status::BadArgument);
        }
        body.splice(start..end, data);
        s.body_modified[d as usize] = true;
        Ok(())
    })())
}

/// v0.1.0: the VM configuration in `on_vm_start`, the plugin's otherwise.
pub fn get_configuration(mut caller: Caller<'_, HostState>, ret_ptr: i32, ret_len: i32) -> i32 {
    status((|| -> HostResult {
        let t = if caller.data().call.phase == Callback::VmStart {
            BufferType::VmConfiguration
        } else {
            BufferType::PluginConfiguration
        };
        let bytes = contents(caller.data(), t)?;
        give(&mut caller, &bytes, ret_ptr, ret_len)
    })())
}
