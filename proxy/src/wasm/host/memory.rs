//! The one place guest pointers and lengths are used: every read, write and allocation checks
//! its bounds here.

use wasmtime::{Caller, Extern, Memory};
use weft_abi::Status;

use crate::wasm::state::HostState;

/// Result of a host function body: a status for the guest.
pub type HostResult = Result<(), Status>;

/// Turns a host function body's result into the `i32` the guest gets.
pub fn status(r: HostResult) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

fn memory(caller: &mut Caller<'_, HostState>) -> Result<Memory, Status> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            caller.data_mut().memory = Some(m);
            Ok(m)
        }
        _ => Err(Status::InvalidMemoryAccess),
    }
}

/// The byte range `[ptr, ptr + len)` of guest memory, checked.
fn range(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<(Memory, usize, usize), Status> {
    let m = memory(caller)?;
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    if end > m.data_size(&mut *caller) {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok((m, start, end))
}

/// Lends guest bytes `[ptr, ptr + len)` to `f` without copying.
pub fn with_bytes<R>(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &mut HostState) -> R,
) -> Result<R, Status> {
    let (m, start, end) = range(caller, ptr, len)?;
    let (data, state) = m.data_and_store_mut(&mut *caller);
    Ok(f(&data[start..end], state))
}

/// Lends two ranges of guest bytes to `f` at once (a name and its value), without copying.
pub fn with_pair<R>(
    caller: &mut Caller<'_, HostState>,
    (ptr_a, len_a): (i32, i32),
    (ptr_b, len_b): (i32, i32),
    f: impl FnOnce(&[u8], &[u8], &mut HostState) -> R,
) -> Result<R, Status> {
    let (m, start_a, end_a) = range(caller, ptr_a, len_a)?;
    let (_, start_b, end_b) = range(caller, ptr_b, len_b)?;
    let (data, state) = m.data_and_store_mut(&mut *caller);
    Ok(f(&data[start_a..end_a], &data[start_b..end_b], state))
}

/// Copies guest bytes `[ptr, ptr + len)`.
pub fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    with_bytes(caller, ptr, len, |b, _| b.to_vec())
}

/// Writes `bytes` at guest address `ptr` (into memory the guest provided).
pub fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> HostResult {
    let (m, start, end) = range(caller, ptr, bytes.len() as i32)?;
    m.data_mut(&mut *caller)[start..end].copy_from_slice(bytes);
    Ok(())
}

pub fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

pub fn write_u64(caller: &mut Caller<'_, HostState>, ptr: i32, v: u64) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

/// Hands `bytes` to the guest: allocated with its own allocator (exactly `len` bytes, so the
/// guest may free it), copied in, and the pointer and length written at `ret_ptr` and
/// `ret_len`. Empty data is `(0, 0)` with no allocation.
pub fn give(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    // Check the out-parameters before allocating, so a bad pointer leaks nothing.
    range(caller, ret_ptr, 4)?;
    range(caller, ret_len, 4)?;
    if bytes.is_empty() {
        write_u32(caller, ret_ptr, 0)?;
        return write_u32(caller, ret_len, 0);
    }
    let alloc = caller
        .data()
        .alloc
        .clone()
        .ok_or(Status::InvalidMemoryAccess)?;
    let len = i32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let ptr = alloc
        .call(&mut *caller, len)
        .map_err(|_| Status::InvalidMemoryAccess)?;
    if ptr == 0 {
        return Err(Status::InvalidMemoryAccess);
    }
    // The allocator may have grown (moved) the memory: it is borrowed again, once, and every
    // range is checked against it.
    let m = memory(caller)?;
    let data = m.data_mut(&mut *caller);
    let mut put = |at: i32, b: &[u8]| -> HostResult {
        let start = at as u32 as usize;
        let dst = start
            .checked_add(b.len())
            .and_then(|end| data.get_mut(start..end))
            .ok_or(Status::InvalidMemoryAccess)?;
        dst.copy_from_slice(b);
        Ok(())
    };
    put(ptr, bytes)?;
    put(ret_ptr, &(ptr as u32).to_le_bytes())?;
    put(ret_len, &(len as u32).to_le_bytes())
}
