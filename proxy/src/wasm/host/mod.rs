//! Host functions, one file per area; this file links them all. Every guest pointer goes
//! through [`memory`]. The functions of every ABI version are defined for every module (extra
//! definitions are harmless; a module links what it imports).

pub mod buffers;
pub mod callouts;
pub mod context;
pub mod headers;
pub mod log;
pub mod memory;
pub mod metrics;
pub mod properties;
pub mod shared_data;
pub mod stream;
pub mod wasi;

use std::collections::HashSet;
use std::sync::OnceLock;

use wasmtime::{IntoFunc, Linker};
use weft_abi::names::host as n;

use super::runtime::Runtime;
use super::state::HostState;

/// A linker that remembers what it defines.
pub struct HostLinker {
    pub linker: Linker<HostState>,
    names: HashSet<(String, String)>,
}

impl HostLinker {
    pub fn wrap<Params, Results>(
        &mut self,
        module: &str,
        name: &str,
        f: impl IntoFunc<HostState, Params, Results>,
    ) -> wasmtime::Result<()> {
        self.linker.func_wrap(module, name, f)?;
        self.names.insert((module.to_owned(), name.to_owned()));
        Ok(())
    }

    pub fn new_func(
        &mut self,
        module: &str,
        name: &str,
        ty: wasmtime::FuncType,
        f: impl Fn(
            wasmtime::Caller<'_, HostState>,
            &[wasmtime::Val],
            &mut [wasmtime::Val],
        ) -> wasmtime::Result<()>
        + Send
        + Sync
        + 'static,
    ) -> wasmtime::Result<()> {
        self.linker.func_new(module, name, ty, f)?;
        self.names.insert((module.to_owned(), name.to_owned()));
        Ok(())
    }

    /// Whether `module.name` is defined.
    pub fn provides(&self, module: &str, name: &str) -> bool {
        self.names.contains(&(module.to_owned(), name.to_owned()))
    }
}

fn build() -> wasmtime::Result<HostLinker> {
    let mut l = HostLinker {
        linker: Linker::new(Runtime::global().engine()),
        names: HashSet::new(),
    };
    let env = "env";
    l.wrap(env, n::LOG, log::log)?;
    l.wrap(env, n::GET_LOG_LEVEL, log::get_log_level)?;
    l.wrap(
        env,
        n::GET_CURRENT_TIME_NANOSECONDS,
        log::get_current_time_nanoseconds,
    )?;
    l.wrap(
        env,
        n::SET_TICK_PERIOD_MILLISECONDS,
        context::set_tick_period_milliseconds,
    )?;
    l.wrap(
        env,
        n::SET_EFFECTIVE_CONTEXT,
        context::set_effective_context,
    )?;
    l.wrap(env, n::DONE, context::done)?;
    l.wrap(
        env,
        n::CALL_FOREIGN_FUNCTION,
        context::call_foreign_function,
    )?;
    l.wrap(env, n::GET_BUFFER_BYTES, buffers::get_buffer_bytes)?;
    l.wrap(env, n::GET_BUFFER_STATUS, buffers::get_buffer_status)?;
    l.wrap(env, n::SET_BUFFER_BYTES, buffers::set_buffer_bytes)?;
    l.wrap(env, n::GET_CONFIGURATION, buffers::get_configuration)?;
    l.wrap(env, n::GET_HEADER_MAP_PAIRS, headers::get_header_map_pairs)?;
    l.wrap(env, n::SET_HEADER_MAP_PAIRS, headers::set_header_map_pairs)?;
    l.wrap(env, n::GET_HEADER_MAP_SIZE, headers::get_header_map_size)?;
    l.wrap(env, n::GET_HEADER_MAP_VALUE, headers::get_header_map_value)?;
    l.wrap(env, n::ADD_HEADER_MAP_VALUE, headers::add_header_map_value)?;
    l.wrap(
        env,
        n::REPLACE_HEADER_MAP_VALUE,
        headers::replace_header_map_value,
    )?;
    l.wrap(
        env,
        n::REMOVE_HEADER_MAP_VALUE,
        headers::remove_header_map_value,
    )?;
    l.wrap(env, n::CONTINUE_STREAM, stream::continue_stream)?;
    l.wrap(env, n::CLOSE_STREAM, stream::close_stream)?;
    l.wrap(env, n::SEND_LOCAL_RESPONSE, stream::send_local_response)?;
    l.wrap(env, n::GET_STATUS, stream::get_status)?;
    l.wrap(env, n::CONTINUE_REQUEST, stream::continue_request)?;
    l.wrap(env, n::CONTINUE_RESPONSE, stream::continue_response)?;
    l.wrap(env, n::CLEAR_ROUTE_CACHE, stream::clear_route_cache)?;
    l.wrap(env, n::HTTP_CALL, callouts::http_call)?;
    l.wrap(env, n::GRPC_CALL, callouts::grpc_call)?;
    l.wrap(env, n::GRPC_STREAM, callouts::grpc_stream)?;
    l.wrap(env, n::GRPC_SEND, callouts::grpc_send)?;
    l.wrap(env, n::GRPC_CANCEL, callouts::grpc_cancel)?;
    l.wrap(env, n::GRPC_CLOSE, callouts::grpc_close)?;
    l.wrap(env, n::GET_SHARED_DATA, shared_data::get_shared_data)?;
    l.wrap(env, n::SET_SHARED_DATA, shared_data::set_shared_data)?;
    l.wrap(
        env,
        n::REGISTER_SHARED_QUEUE,
        shared_data::register_shared_queue,
    )?;
    l.wrap(
        env,
        n::RESOLVE_SHARED_QUEUE,
        shared_data::resolve_shared_queue,
    )?;
    l.wrap(
        env,
        n::ENQUEUE_SHARED_QUEUE,
        shared_data::enqueue_shared_queue,
    )?;
    l.wrap(
        env,
        n::DEQUEUE_SHARED_QUEUE,
        shared_data::dequeue_shared_queue,
    )?;
    l.wrap(env, n::DEFINE_METRIC, metrics::define_metric)?;
    l.wrap(env, n::RECORD_METRIC, metrics::record_metric)?;
    l.wrap(env, n::INCREMENT_METRIC, metrics::increment_metric)?;
    l.wrap(env, n::GET_METRIC, metrics::get_metric)?;
    l.wrap(env, n::GET_PROPERTY, properties::get_property)?;
    l.wrap(env, n::SET_PROPERTY, properties::set_property)?;
    wasi::register(&mut l)?;
    Ok(l)
}

/// The linker every module is linked with (built once).
pub fn linker() -> &'static HostLinker {
    static LINKER: OnceLock<HostLinker> = OnceLock::new();
    LINKER.get_or_init(|| build().unwrap_or_else(|e| panic!("host functions do not link: {e}")))
}
