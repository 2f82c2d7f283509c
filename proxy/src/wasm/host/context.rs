//! Contexts and timers: `proxy_set_effective_context`, `proxy_done`,
//! `proxy_set_tick_period_milliseconds`, `proxy_call_foreign_function`.

use std::time::Duration;

use wasmtime::Caller;
use weft_abi::Status;

use super::memory::{give, status, with_bytes};
use crate::wasm::golden::{Golden, GoldenSpec};
use crate::wasm::state::{Context, HostState, Skipped};

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

/// Longest arguments a foreign function reads (every skippable name fits many times).
const MAX_FOREIGN_ARGS: i32 = 1024;

/// weft's foreign functions (see [`weft_abi::names::foreign`]); any other name is NOT_FOUND
/// (which the SDKs accept).
pub fn call_foreign_function(
    mut caller: Caller<'_, HostState>,
    name_ptr: i32,
    name_len: i32,
    args_ptr: i32,
    args_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    use weft_abi::names::foreign;
    let which = with_bytes(&mut caller, name_ptr, name_len, |name, _| {
        if name == foreign::SKIP_CALLBACKS.as_bytes() {
            Some(Foreign::SkipCallbacks)
        } else if name == foreign::GOLDEN_METRICS.as_bytes() {
            Some(Foreign::GoldenMetrics)
        } else {
            None
        }
    });
    let which = match which {
        Ok(Some(w)) => w,
        Ok(None) => return status(Err(Status::NotFound)),
        Err(e) => return status(Err(e)),
    };
    if !(0..=MAX_FOREIGN_ARGS).contains(&args_len) {
        return status(Err(Status::BadArgument));
    }
    let parsed = with_bytes(&mut caller, args_ptr, args_len, |args, _| match which {
        Foreign::SkipCallbacks => Skipped::parse(args).map(Call::Skip),
        Foreign::GoldenMetrics => GoldenSpec::parse(args).map(Call::Golden),
    });
    let call = match parsed {
        Ok(Some(c)) => c,
        Ok(None) => return status(Err(Status::BadArgument)),
        Err(e) => return status(Err(e)),
    };
    let state = caller.data_mut();
    let root = state.root_of(state.call.effective);
    if matches!(call, Call::Golden(_)) && root.is_none() {
        return status(Err(Status::BadArgument));
    }
    // Nothing returned: the out-parameters are checked and zeroed before anything changes.
    if let Err(e) = give(&mut caller, &[], ret_ptr, ret_len) {
        return status(Err(e));
    }
    let state = caller.data_mut();
    match call {
        Call::Skip(skipped) => state.skipped = state.skipped.union(skipped),
        Call::Golden(spec) => {
            if let Some(Context::Root(r)) = root.and_then(|id| state.contexts.get_mut(&id)) {
                // The same request again (a reconfiguration) keeps the label sets seen.
                if r.golden.as_ref().is_none_or(|g| *g.spec() != spec) {
                    r.golden = Some(Golden::new(spec));
                }
            }
        }
    }
    Status::Ok as i32
}

/// weft's foreign functions.
#[derive(Debug, Clone, Copy)]
enum Foreign {
    SkipCallbacks,
    GoldenMetrics,
}

/// A foreign function call, its arguments parsed.
enum Call {
    Skip(Skipped),
    Golden(GoldenSpec),
}
