//! Logging and time: `proxy_log`, `proxy_get_log_level`, `proxy_get_current_time_nanoseconds`.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::Caller;
use weft_abi::{LogLevel, Status};

use super::memory::{status, with_bytes, write_u32, write_u64};
use crate::wasm::state::HostState;

/// Guest log messages are logged without the log formatter's own escaping (it goes character
/// by character, and a filter may log a line per request): this makes them safe instead, in
/// one pass that copies nothing when there is nothing to escape. Control characters (but tab),
/// DEL and the C1 controls are escaped, so a message cannot forge log lines or drive a terminal.
pub fn sanitize(msg: &str) -> std::borrow::Cow<'_, str> {
    let b = msg.as_bytes();
    let unsafe_at = |i: usize| {
        let c = b[i];
        (c < 0x20 && c != b'\t')
            || c == 0x7f
            || (c == 0xc2 && b.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)))
    };
    if !(0..b.len()).any(unsafe_at) {
        return std::borrow::Cow::Borrowed(msg);
    }
    let mut out = String::with_capacity(msg.len() + 16);
    for ch in msg.chars() {
        match ch {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..=0x9f).contains(&(c as u32)) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Marks a message that was cut to the filter's `log_line` limit.
pub fn note_cut(msg: &mut String, dropped: u64) {
    use std::fmt::Write;
    let _ = write!(msg, " … ({dropped} more bytes dropped: limits.log_line)");
}

/// `msg` cut to at most `cap` bytes (on a character boundary), and how many bytes were dropped.
fn cut(msg: &[u8], cap: usize) -> (&[u8], u64) {
    if msg.len() <= cap {
        return (msg, 0);
    }
    let mut end = cap;
    // Back to the start of a UTF-8 character (continuation bytes are 10xxxxxx).
    while end > 0 && msg[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    (&msg[..end], (msg.len() - end) as u64)
}

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
            let (msg, dropped) = cut(msg, state.host_limits.log_line);
            let msg = String::from_utf8_lossy(msg);
            let mut msg = sanitize(&msg);
            if dropped > 0 {
                note_cut(msg.to_mut(), dropped);
            }
            let filter = state.log_name();
            if level >= LogLevel::Warn {
                state.last_complaint = Some(msg.chars().take(500).collect());
            }
            // The canary (a configuration's validation run) speaks at debug: a service's or
            // filter's start-up lines are logged once, by the instance that serves.
            if state.worker.is_none() {
                tracing::debug!(target: "weft::wasm", %filter, canary = true, "{msg}");
                return;
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

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        assert_eq!(super::cut(b"short", 10), (&b"short"[..], 0));
        let text = "ab\u{e9}cd".as_bytes(); // é is two bytes, at 2..4
        assert_eq!(super::cut(text, 3), (&b"ab"[..], 4));
        assert_eq!(super::cut(text, 4), (&text[..4], 2));
    }

    #[test]
    fn guest_messages_cannot_forge_lines_or_drive_terminals() {
        let plain = "{\"path\":\"/a\",\"ok\":true}\tdone é";
        assert!(matches!(sanitize(plain), std::borrow::Cow::Borrowed(_)));
        assert_eq!(sanitize(plain), plain);
        assert_eq!(
            sanitize("a\nINFO forged\r\x1b[31mred\x07\x7f\u{9b}z"),
            "a\\nINFO forged\\r\\x1b[31mred\\x07\\x7f\\u{9b}z"
        );
    }
}
