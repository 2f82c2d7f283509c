//! Guest metrics (host-global, exported on `/metrics` as `weft_wasm_<name>{filter=...}`):
//! `proxy_define_metric`, `proxy_record_metric`, `proxy_increment_metric`, `proxy_get_metric`.

use wasmtime::Caller;
use weft_abi::{MetricType, Status};

use super::memory::{read, status, write_u32, write_u64};
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

pub fn record_metric(caller: Caller<'_, HostState>, id: i32, value: i64) -> i32 {
    status(caller.data().shared.record(id as u32, value as u64))
}

pub fn increment_metric(caller: Caller<'_, HostState>, id: i32, delta: i64) -> i32 {
    status(caller.data().shared.increment(id as u32, delta))
}

pub fn get_metric(mut caller: Caller<'_, HostState>, id: i32, ret: i32) -> i32 {
    status((|| {
        let v = caller.data().shared.value(id as u32)?;
        write_u64(&mut caller, ret, v)
    })())
}
