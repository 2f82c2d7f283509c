//! The Proxy-Wasm v0.2.1 exports of a module built with the SDK (Wasm builds only).

use crate::dispatch::{self, Phase};

unsafe extern "C" {
    fn __wasm_call_ctors();
}

/// Runs the module's static constructors (the [`crate::plugin!`] macro's `_initialize` calls
/// this first, as a WASI reactor must).
pub fn initialize() {
    // SAFETY: called once, from `_initialize`, before anything else runs.
    unsafe { __wasm_call_ctors() };
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host fills (returned strings and maps); the SDK takes it back with
/// `Vec::from_raw_parts(ptr, size, size)`.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    if size == 0 {
        return std::ptr::NonNull::dangling().as_ptr();
    }
    Box::into_raw(vec![0u8; size].into_boxed_slice()).cast::<u8>()
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(context: u32, parent: u32) {
    dispatch::on_context_create(context, parent);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(root: u32, size: usize) -> u32 {
    dispatch::on_vm_start(root, size)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    dispatch::on_configure(root, size)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(root: u32) {
    dispatch::on_tick(root);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_queue_ready(_root: u32, _queue: u32) {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(context: u32, _headers: usize, eos: u32) -> u32 {
    dispatch::on_stream(context, Phase::RequestHeaders, 0, eos != 0)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_body(context: u32, size: usize, eos: u32) -> u32 {
    dispatch::on_stream(context, Phase::RequestBody, size, eos != 0)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_trailers(context: u32, _trailers: usize) -> u32 {
    dispatch::on_stream(context, Phase::RequestTrailers, 0, true)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(context: u32, _headers: usize, eos: u32) -> u32 {
    dispatch::on_stream(context, Phase::ResponseHeaders, 0, eos != 0)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_body(context: u32, size: usize, eos: u32) -> u32 {
    dispatch::on_stream(context, Phase::ResponseBody, size, eos != 0)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_trailers(context: u32, _trailers: usize) -> u32 {
    dispatch::on_stream(context, Phase::ResponseTrailers, 0, true)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(context: u32) {
    dispatch::on_log(context);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_done(context: u32) -> u32 {
    dispatch::on_done(context)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_delete(context: u32) {
    dispatch::on_delete(context);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_http_call_response(
    root: u32,
    token: u32,
    headers: usize,
    body_size: usize,
    trailers: usize,
) {
    dispatch::on_http_call_response(root, token, headers, body_size, trailers);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_root: u32, _token: u32, _n: usize) {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_root: u32, _token: u32, _n: usize) {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive(root: u32, token: u32, size: usize) {
    dispatch::on_grpc_receive(root, token, size);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_close(root: u32, token: u32, status: u32) {
    dispatch::on_grpc_close(root, token, status);
}
