//! Guest metrics (host-global, exported on `/metrics` as `weft_wasm_<name>{filter=...}`):
//! `proxy_define_metric`, `proxy_record_metric`, `proxy_increment_metric`, `proxy_get_metric`.

use wasmtime::Caller;
use weft_abi::{MetricType, Status};

use super::memory::{read, status, write_u32, write_u64};
use crate::wasm::shared::GuestMetric;
use crate::wasm::state::HostState;

pub fn define_metric(
    mut caller: Caller<'_, HostState>,
    t: i32,
    name_ptr: i32,
    name_len: i32,
    ret_id: i32,
) -> i32 {
    status((|| {
        let t = MetricType::from_u32(t as u32).ok_or(Status::BadArgument)?;
        if name_len as u32 as usize > crate::wasm::runtime::caps::MAX_NAME {
            return Err(Status::BadArgument);
        }
        let name = read(&mut caller, name_ptr, name_len)?;
        let name = String::from_utf8(name).map_err(|_| Status::BadArgument)?;
        if name.is_empty() {
            return Err(Status::BadArgument);
        }
        let state = caller.data();
        let id = state.shared.define_metric(&state.log_name(), t, &name);
        write_u32(&mut caller, ret_id, id)
    })())
}

/// Metric `id` through the VM's cache.
fn with_metric<R>(
    state: &mut HostState,
    id: i32,
    f: impl FnOnce(&GuestMetric) -> Result<R, Status>,
) -> Result<R, Status> {
    let HostState {
        metrics, shared, ..
    } = state;
    f(metrics.get(shared, id as u32)?)
}

pub fn record_metric(mut caller: Caller<'_, HostState>, id: i32, value: i64) -> i32 {
    status(with_metric(caller.data_mut(), id, |m| {
        m.record(value as u64);
        Ok(())
    }))
}

pub fn increment_metric(mut caller: Caller<'_, HostState>, id: i32, delta: i64) -> i32 {
    status(with_metric(caller.data_mut(), id, |m| m.increment(delta)))
}

pub fn get_metric(mut caller: Caller<'_, HostState>, id: i32, ret: i32) -> i32 {
    status((|| {
        let v = with_metric(caller.data_mut(), id, GuestMetric::value)?;
        write_u64(&mut caller, ret, v)
    })())
}
