//! Shared data and queues (host-global, scoped by `vm_id`): `proxy_{get,set}_shared_data`,
//! `proxy_{register,resolve,enqueue,dequeue}_shared_queue`.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::Caller;
use weft_abi::Status;

use super::memory::{give, read, status, write_u32};
use crate::wasm::runtime::caps;
use crate::wasm::shared::{DataLimits, QueueLimits};
use crate::wasm::state::HostState;

pub fn get_shared_data(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    ret_ptr: i32,
    ret_len: i32,
    ret_cas: i32,
) -> i32 {
    status((|| {
        let key = read(&mut caller, key_ptr, key_len)?;
        let (value, cas) = caller
            .data()
            .shared
            .get(&caller.data().vm_id, &key)
            .ok_or(Status::NotFound)?;
        give(&mut caller, &value, ret_ptr, ret_len)?;
        write_u32(&mut caller, ret_cas, cas)
    })())
}

/// A null value (`ptr = 0, len = 0`) removes the key (what the SDKs' `remove_shared_data` sends).
pub fn set_shared_data(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
    cas: i32,
) -> i32 {
    status((|| {
        let key = read(&mut caller, key_ptr, key_len)?;
        let value = if value_ptr == 0 && value_len == 0 {
            None
        } else {
            Some(Bytes::from(read(&mut caller, value_ptr, value_len)?))
        };
        let state = caller.data();
        let limits = DataLimits {
            bytes: state.host_limits.shared_data,
            keys: state.host_limits.shared_data_keys,
        };
        state
            .shared
            .set(&state.vm_id, &key, value, cas as u32, limits)
    })())
}

pub fn register_shared_queue(
    mut caller: Caller<'_, HostState>,
    name_ptr: i32,
    name_len: i32,
    ret_id: i32,
) -> i32 {
    status((|| {
        if name_len as u32 as usize > caps::MAX_NAME {
            return Err(Status::BadArgument);
        }
        let name = read(&mut caller, name_ptr, name_len)?;
        let state = caller.data();
        let root = state
            .root_of(state.call.effective)
            .ok_or(Status::BadArgument)?;
        // Items are delivered to this root context, on this VM's worker. A VM that only
        // validates a configuration opens the queue without becoming its consumer.
        let consumer = state
            .worker
            .as_ref()
            .and_then(|w| w.upgrade())
            .and_then(|w| {
                state
                    .vm
                    .upgrade()
                    .map(|vm| (w.queue_sender(), vm.uid(), root))
            });
        let limits = QueueLimits {
            items: state.host_limits.queue_depth,
            bytes: state.host_limits.queue_bytes,
        };
        let id = state
            .shared
            .register_queue(&state.vm_id, &name, consumer, limits)?;
        write_u32(&mut caller, ret_id, id)
    })())
}

pub fn resolve_shared_queue(
    mut caller: Caller<'_, HostState>,
    vm_id_ptr: i32,
    vm_id_len: i32,
    name_ptr: i32,
    name_len: i32,
    ret_id: i32,
) -> i32 {
    status((|| {
        let vm_id = read(&mut caller, vm_id_ptr, vm_id_len)?;
        let name = read(&mut caller, name_ptr, name_len)?;
        let state = caller.data();
        // An empty vm_id means the caller's own.
        let vm_id: Arc<str> = if vm_id.is_empty() {
            state.vm_id.clone()
        } else {
            Arc::from(String::from_utf8_lossy(&vm_id).as_ref())
        };
        let id = state
            .shared
            .resolve_queue(&vm_id, &name)
            .ok_or(Status::NotFound)?;
        write_u32(&mut caller, ret_id, id)
    })())
}

pub fn enqueue_shared_queue(
    mut caller: Caller<'_, HostState>,
    id: i32,
    value_ptr: i32,
    value_len: i32,
) -> i32 {
    status((|| {
        let value = read(&mut caller, value_ptr, value_len)?;
        caller.data().shared.enqueue(id as u32, Bytes::from(value))
    })())
}

pub fn dequeue_shared_queue(
    mut caller: Caller<'_, HostState>,
    id: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> i32 {
    status((|| {
        let value = caller.data().shared.dequeue(id as u32)?;
        give(&mut caller, &value, ret_ptr, ret_len)
    })())
}
