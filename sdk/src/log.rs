//! Logging through the proxy (the line carries the filter's name). The macros format like
//! `format!`: `weft_sdk::info!("user {} denied", user)`.

use weft_abi::LogLevel;

use crate::host::host;

pub fn log(level: LogLevel, message: &str) {
    let h = host();
    if level >= h.log_level() {
        h.log(level, message);
    }
}

pub fn trace(message: &str) {
    log(LogLevel::Trace, message);
}
pub fn debug(message: &str) {
    log(LogLevel::Debug, message);
}
pub fn info(message: &str) {
    log(LogLevel::Info, message);
}
pub fn warn(message: &str) {
    log(LogLevel::Warn, message);
}
pub fn error(message: &str) {
    log(LogLevel::Error, message);
}

#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::log::debug(&format!($($t)*)) };
}
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::info(&format!($($t)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::warn(&format!($($t)*)) };
}
#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::log::error(&format!($($t)*)) };
}
