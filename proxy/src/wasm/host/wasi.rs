//! WASI preview1 for Proxy-Wasm modules (Rust std, TinyGo, Go, C++ with wasi-libc import it),
//! under `wasi_snapshot_preview1` and `wasi_unstable`: standard output and error go to the log,
//! clocks and randomness work, arguments and environment are empty, `proc_exit` fails the VM,
//! and every other function (files, sockets, …) answers an error: a filter has no such
//! capability.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, FuncType, Val, ValType};
use weft_abi::errno;

use super::memory::{read, with_bytes, write, write_u32, write_u64};
use crate::wasm::runtime::caps;
use crate::wasm::state::HostState;

/// Standard output and error go to the log. At most `limits.log_line` bytes of one call are
/// copied (iovecs may all point at the same large buffer: their lengths are summed first, and
/// nothing past the cap is read); the guest is told everything was written, as a terminal that
/// drops what it cannot show.
fn fd_write(
    mut caller: Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    ret_written: i32,
) -> i32 {
    if fd != 1 && fd != 2 {
        return errno::BADF as i32;
    }
    let count = iovs_len as u32 as usize;
    if count > caps::MAX_IOVECS {
        return errno::INVAL as i32;
    }
    let Ok(vec) = read(&mut caller, iovs, (count * 8) as i32) else {
        return errno::FAULT as i32;
    };
    let cap = caller.data().host_limits.log_line;
    let mut total: u64 = 0;
    let mut text = Vec::new();
    for iov in vec.chunks_exact(8) {
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        total += u64::from(len);
        let room = cap.saturating_sub(text.len()).min(len as usize);
        // Every iovec must lie in memory, whether or not its bytes are copied.
        let copied = with_bytes(&mut caller, ptr, len as i32, |b, _| {
            text.extend_from_slice(&b[..room]);
        });
        if copied.is_err() {
            return errno::FAULT as i32;
        }
    }
    let Ok(written) = u32::try_from(total) else {
        return errno::INVAL as i32;
    };
    let name = caller.data().log_name();
    let msg = String::from_utf8_lossy(&text);
    let mut msg = super::log::sanitize(msg.trim_end_matches('\n')).into_owned();
    if total > text.len() as u64 {
        super::log::note_cut(&mut msg, total - text.len() as u64);
    }
    if !msg.is_empty() {
        if fd == 1 {
            tracing::info!(target: "weft::wasm", filter = %name, "{msg}");
        } else {
            tracing::error!(target: "weft::wasm", filter = %name, "{msg}");
        }
    }
    match write_u32(&mut caller, ret_written, written) {
        Ok(()) => errno::SUCCESS as i32,
        Err(_) => errno::FAULT as i32,
    }
}

fn clock_time_get(mut caller: Caller<'_, HostState>, id: i32, _precision: i64, ret: i32) -> i32 {
    let now = match id {
        0 => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        1 => {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            START.get_or_init(Instant::now).elapsed().as_nanos() as u64
        }
        _ => return errno::NOTSUP as i32,
    };
    match write_u64(&mut caller, ret, now) {
        Ok(()) => errno::SUCCESS as i32,
        Err(_) => errno::FAULT as i32,
    }
}

fn clock_res_get(mut caller: Caller<'_, HostState>, id: i32, ret: i32) -> i32 {
    if id != 0 && id != 1 {
        return errno::NOTSUP as i32;
    }
    match write_u64(&mut caller, ret, 1) {
        Ok(()) => errno::SUCCESS as i32,
        Err(_) => errno::FAULT as i32,
    }
}

fn random_get(mut caller: Caller<'_, HostState>, buf: i32, len: i32) -> i32 {
    let len = len as u32 as usize;
    if len > weft_abi::MAX_RANDOM_BYTES {
        return errno::INVAL as i32;
    }
    let mut bytes = vec![0u8; len];
    fastrand::fill(&mut bytes);
    match write(&mut caller, buf, &bytes) {
        Ok(()) => errno::SUCCESS as i32,
        Err(_) => errno::FAULT as i32,
    }
}

/// `*_sizes_get`: no arguments, no environment.
fn sizes_get(mut caller: Caller<'_, HostState>, count: i32, size: i32) -> i32 {
    match write_u32(&mut caller, count, 0).and_then(|()| write_u32(&mut caller, size, 0)) {
        Ok(()) => errno::SUCCESS as i32,
        Err(_) => errno::FAULT as i32,
    }
}

fn nothing_get(_caller: Caller<'_, HostState>, _a: i32, _b: i32) -> i32 {
    errno::SUCCESS as i32
}

fn sched_yield(_caller: Caller<'_, HostState>) -> i32 {
    errno::SUCCESS as i32
}

fn proc_exit(_caller: Caller<'_, HostState>, code: i32) -> wasmtime::Result<()> {
    Err(wasmtime::Error::msg(format!(
        "the module called proc_exit({code})"
    )))
}

fn fd_fdstat_get(mut caller: Caller<'_, HostState>, fd: i32, ret: i32) -> i32 {
    if !(0..=2).contains(&fd) {
        return errno::BADF as i32;
    }
    // filetype character device, no flags, no rights: enough for std's stdio set-up.
    let stat = [
        2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    match write(&mut caller, ret, &stat) {
        Ok(()) => errno::SUCCESS as i32,
        Err(_) => errno::FAULT as i32,
    }
}

use ValType::{I32, I64};

/// Functions with no capability behind them: (name, parameters, errno answered).
const DENIED: &[(&str, &[ValType], u32)] = &[
    ("fd_advise", &[I32, I64, I64, I32], errno::BADF),
    ("fd_allocate", &[I32, I64, I64], errno::BADF),
    ("fd_close", &[I32], errno::BADF),
    ("fd_datasync", &[I32], errno::BADF),
    ("fd_fdstat_set_flags", &[I32, I32], errno::BADF),
    ("fd_fdstat_set_rights", &[I32, I64, I64], errno::BADF),
    ("fd_filestat_get", &[I32, I32], errno::BADF),
    ("fd_filestat_set_size", &[I32, I64], errno::BADF),
    ("fd_filestat_set_times", &[I32, I64, I64, I32], errno::BADF),
    ("fd_pread", &[I32, I32, I32, I64, I32], errno::BADF),
    ("fd_prestat_get", &[I32, I32], errno::BADF),
    ("fd_prestat_dir_name", &[I32, I32, I32], errno::BADF),
    ("fd_pwrite", &[I32, I32, I32, I64, I32], errno::BADF),
    ("fd_read", &[I32, I32, I32, I32], errno::BADF),
    ("fd_readdir", &[I32, I32, I32, I64, I32], errno::BADF),
    ("fd_renumber", &[I32, I32], errno::BADF),
    ("fd_seek", &[I32, I64, I32, I32], errno::BADF),
    ("fd_sync", &[I32], errno::BADF),
    ("fd_tell", &[I32, I32], errno::BADF),
    ("path_create_directory", &[I32, I32, I32], errno::NOENT),
    (
        "path_filestat_get",
        &[I32, I32, I32, I32, I32],
        errno::NOENT,
    ),
    (
        "path_filestat_set_times",
        &[I32, I32, I32, I32, I64, I64, I32],
        errno::NOENT,
    ),
    (
        "path_link",
        &[I32, I32, I32, I32, I32, I32, I32],
        errno::NOENT,
    ),
    (
        "path_open",
        &[I32, I32, I32, I32, I32, I64, I64, I32, I32],
        errno::NOENT,
    ),
    (
        "path_readlink",
        &[I32, I32, I32, I32, I32, I32],
        errno::NOENT,
    ),
    ("path_remove_directory", &[I32, I32, I32], errno::NOENT),
    ("path_rename", &[I32, I32, I32, I32, I32, I32], errno::NOENT),
    ("path_symlink", &[I32, I32, I32, I32, I32], errno::NOENT),
    ("path_unlink_file", &[I32, I32, I32], errno::NOENT),
    ("poll_oneoff", &[I32, I32, I32, I32], errno::NOTSUP),
    ("proc_raise", &[I32], errno::NOTSUP),
    ("sock_accept", &[I32, I32, I32], errno::NOTCAPABLE),
    (
        "sock_recv",
        &[I32, I32, I32, I32, I32, I32],
        errno::NOTCAPABLE,
    ),
    ("sock_send", &[I32, I32, I32, I32, I32], errno::NOTCAPABLE),
    ("sock_shutdown", &[I32, I32], errno::NOTCAPABLE),
];

pub fn register(linker: &mut super::HostLinker) -> wasmtime::Result<()> {
    let engine = linker.linker.engine().clone();
    for module in weft_abi::names::WASI_MODULES {
        linker.wrap(module, "fd_write", fd_write)?;
        linker.wrap(module, "clock_time_get", clock_time_get)?;
        linker.wrap(module, "clock_res_get", clock_res_get)?;
        linker.wrap(module, "random_get", random_get)?;
        linker.wrap(module, "environ_sizes_get", sizes_get)?;
        linker.wrap(module, "args_sizes_get", sizes_get)?;
        linker.wrap(module, "environ_get", nothing_get)?;
        linker.wrap(module, "args_get", nothing_get)?;
        linker.wrap(module, "sched_yield", sched_yield)?;
        linker.wrap(module, "proc_exit", proc_exit)?;
        linker.wrap(module, "fd_fdstat_get", fd_fdstat_get)?;
        for (name, params, answer) in DENIED {
            let ty = FuncType::new(&engine, params.iter().cloned(), [I32]);
            let answer = *answer as i32;
            linker.new_func(
                module,
                name,
                ty,
                move |_caller, _args, results: &mut [Val]| {
                    results[0] = Val::I32(answer);
                    Ok(())
                },
            )?;
        }
    }
    // Emscripten C++ builds import these.
    linker.wrap(
        "env",
        "emscripten_notify_memory_growth",
        |_: Caller<'_, HostState>, _: i32| {},
    )?;
    linker.wrap(
        "env",
        "pthread_equal",
        |_: Caller<'_, HostState>, a: i32, b: i32| i32::from(a == b),
    )?;
    Ok(())
}
