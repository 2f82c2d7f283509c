//! Contexts and timers: `proxy_set_effective_context`, `proxy_done`,
//! `proxy_set_tick_period_milliseconds`, `proxy_call_foreign_function`.

use std::time::Duration;

use wasmtime::Caller;
use weft_abi::Status;

use super::memory::status;
use crate::wasm::state::HostState;

pub fn set_effective_context(mut caller: Caller<'_, HostState>, id: i32) -> i32 {
    let state = caller.data_mut();
    let id = id as u32;
    if state.contexts.contains_key(&id) {
        state.call.effective = id;
        Status::Ok as i32
    } else {
        Status::BadArgument as i32
    }
}

pub fn done(mut caller: Caller<'_, HostState>) -> i32 {
    let state = caller.data_mut();
    let id = state.call.effective;
    if state.awaiting_done.remove(&id) {
        state.done.push(id);
        Status::Ok as i32
    } else {
        Status::NotFound as i32
    }
}

/// One period per root context (the caller's); 0 stops the ticks. Applied when the call returns.
pub fn set_tick_period_milliseconds(mut caller: Caller<'_, HostState>, period: i32) -> i32 {
    let state = caller.data_mut();
    match state.root_of(state.call.effective) {
        Some(root) => {
            // The last period set in a call wins: one change per root context.
            state.tick_changes.retain(|(r, _)| *r != root);
            state
                .tick_changes
                .push((root, Duration::from_millis(u64::from(period as u32))));
            Status::Ok as i32
        }
        None => Status::BadArgument as i32,
    }
}

/// weft registers no foreign functions: every name is NOT_FOUND (which the SDKs accept).
pub fn call_foreign_function(
    _caller: Caller<'_, HostState>,
    _name_ptr: i32,
    _name_len: i32,
    _args_ptr: i32,
    _args_len: i32,
    _ret_ptr: i32,
    _ret_len: i32,
) -> i32 {
    status(Err(Status::NotFound))
}
