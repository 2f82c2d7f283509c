//! Logging and time: `proxy_log`, `proxy_get_log_level`, `proxy_get_current_time_nanoseconds`.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::Caller;
use weft_abi::{LogLevel, Status};

use super::memory::{status, with_bytes, write_u32, write_u64};
use crate::wasm::state::HostState;

/// The guest level the host's logging lets through.
pub fn current_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        _ => LogLevel::Error,
    }
}

pub fn log(mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> i32 {
    status((|| {
        let level = LogLevel::from_u32(level as u32).ok_or(Status::BadArgument)?;
        with_bytes(&mut caller, ptr, len, |msg, state| {
            let msg = String::from_utf8_lossy(msg);
            let filter = state.log_name();
            if level >= LogLevel::Warn {
                state.last_complaint = Some(msg.chars().take(500).collect());
            }
            match level {
                LogLevel::Trace => tracing::trace!(target: "weft::wasm", %filter, "{msg}"),
                LogLevel::Debug => tracing::debug!(target: "weft::wasm", %filter, "{msg}"),
                LogLevel::Info => tracing::info!(target: "weft::wasm", %filter, "{msg}"),
                LogLevel::Warn => tracing::warn!(target: "weft::wasm", %filter, "{msg}"),
                LogLevel::Error | LogLevel::Critical => {
                    tracing::error!(target: "weft::wasm", %filter, "{msg}")
                }
            }
        })
    })())
}

pub fn get_log_level(mut caller: Caller<'_, HostState>, ret: i32) -> i32 {
    let level = caller.data().log_level as u32;
    status(write_u32(&mut caller, ret, level))
}

pub fn get_current_time_nanoseconds(mut caller: Caller<'_, HostState>, ret: i32) -> i32 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    status(write_u64(&mut caller, ret, now))
}
