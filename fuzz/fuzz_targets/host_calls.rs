#![no_main]
//! The Proxy-Wasm host functions with arbitrary pointers and lengths: a guest (generated WAT)
//! reads the fuzz input as its plugin configuration and interprets it as calls — an opcode
//! byte choosing one of the host functions, then its arguments, raw from the input. Whatever
//! the guest asks, the host answers with a status, never panics, and never lets the guest
//! touch memory outside its own.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weft_proxy::metrics::Metrics;
use weft_proxy::wasm::WasmShared;
use weft_proxy::wasm::module::{self, LoadedModule};
use weft_proxy::wasm::runtime::HostLimits;
use weft_proxy::wasm::state::PluginInfo;
use weft_proxy::wasm::vm::{Vm, VmSpec};

/// Every host function a guest can import: (module, name, parameter types). `I` is i32, `L`
/// i64; every one returns an i32.
const IMPORTS: &[(&str, &str, &str)] = &[
    ("env", "proxy_log", "III"),
    ("env", "proxy_get_log_level", "I"),
    ("env", "proxy_get_current_time_nanoseconds", "I"),
    ("env", "proxy_set_tick_period_milliseconds", "I"),
    ("env", "proxy_set_effective_context", "I"),
    ("env", "proxy_done", ""),
    ("env", "proxy_call_foreign_function", "IIIIII"),
    ("env", "proxy_get_buffer_bytes", "IIIII"),
    ("env", "proxy_get_buffer_status", "III"),
    ("env", "proxy_set_buffer_bytes", "IIIII"),
    ("env", "proxy_get_header_map_pairs", "III"),
    ("env", "proxy_set_header_map_pairs", "III"),
    ("env", "proxy_get_header_map_size", "II"),
    ("env", "proxy_get_header_map_value", "IIIII"),
    ("env", "proxy_add_header_map_value", "IIIII"),
    ("env", "proxy_replace_header_map_value", "IIIII"),
    ("env", "proxy_remove_header_map_value", "III"),
    ("env", "proxy_continue_stream", "I"),
    ("env", "proxy_close_stream", "I"),
    ("env", "proxy_send_local_response", "IIIIIIII"),
    ("env", "proxy_get_status", "III"),
    ("env", "proxy_continue_request", ""),
    ("env", "proxy_continue_response", ""),
    ("env", "proxy_clear_route_cache", ""),
    ("env", "proxy_http_call", "IIIIIIIIII"),
    ("env", "proxy_grpc_call", "IIIIIIIIIIII"),
    ("env", "proxy_grpc_stream", "IIIIIIIII"),
    ("env", "proxy_grpc_send", "IIII"),
    ("env", "proxy_grpc_cancel", "I"),
    ("env", "proxy_grpc_close", "I"),
    ("env", "proxy_get_shared_data", "IIIII"),
    ("env", "proxy_set_shared_data", "IIIII"),
    ("env", "proxy_register_shared_queue", "III"),
    ("env", "proxy_resolve_shared_queue", "IIIII"),
    ("env", "proxy_enqueue_shared_queue", "III"),
    ("env", "proxy_dequeue_shared_queue", "III"),
    ("env", "proxy_define_metric", "IIII"),
    ("env", "proxy_record_metric", "IL"),
    ("env", "proxy_increment_metric", "IL"),
    ("env", "proxy_get_metric", "II"),
    ("env", "proxy_get_property", "IIII"),
    ("env", "proxy_set_property", "IIII"),
    ("wasi_snapshot_preview1", "fd_write", "IIII"),
    ("wasi_snapshot_preview1", "random_get", "II"),
    ("wasi_snapshot_preview1", "clock_time_get", "ILI"),
];

/// The interpreter guest: `on_configure` copies its configuration (the input) to memory and
/// runs it as calls: `[opcode][args…]…`, each i32 argument 4 bytes and each i64 8 (little
/// endian; missing bytes read as 0).
fn interpreter() -> String {
    let mut imports = String::new();
    let mut cases = String::new();
    let n = IMPORTS.len();
    for (i, (module, name, params)) in IMPORTS.iter().enumerate() {
        let types: Vec<&str> = params
            .chars()
            .map(|c| if c == 'L' { "i64" } else { "i32" })
            .collect();
        imports.push_str(&format!(
            "  (import \"{module}\" \"{name}\" (func $f{i} (param {}) (result i32)))\n",
            types.join(" ")
        ));
        let args: String = params
            .chars()
            .map(|c| {
                if c == 'L' {
                    "(call $arg64) "
                } else {
                    "(call $arg32) "
                }
            })
            .collect();
        cases = format!("(block $c{i}\n{cases})\n(drop (call $f{i} {args}))\n(br $next)\n");
    }
    let targets: String = (0..n).map(|i| format!("$c{i} ")).collect();
    let dispatch = cases.replacen(
        "(block $c0\n",
        &format!(
            "(block $c0\n(br_table {targets} $c0 (i32.rem_u (local.get $op) (i32.const {n})))\n"
        ),
        1,
    );
    format!(
        r#"(module
{imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $pos (mut i32) (i32.const 0))
  (global $end (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (if (i32.eq (memory.grow (i32.add (i32.div_u (local.get $size) (i32.const 65536)) (i32.const 1))) (i32.const -1))
        (then (return (i32.const 0))))))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func $arg32 (result i32)
    (local $v i32)
    (if (i32.gt_u (i32.add (global.get $pos) (i32.const 4)) (global.get $end))
      (then (global.set $pos (global.get $end)) (return (i32.const 0))))
    (local.set $v (i32.load (global.get $pos)))
    (global.set $pos (i32.add (global.get $pos) (i32.const 4)))
    (local.get $v))
  (func $arg64 (result i64)
    (local $v i64)
    (if (i32.gt_u (i32.add (global.get $pos) (i32.const 8)) (global.get $end))
      (then (global.set $pos (global.get $end)) (return (i64.const 0))))
    (local.set $v (i64.load (global.get $pos)))
    (global.set $pos (i32.add (global.get $pos) (i32.const 8)))
    (local.get $v))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $op i32)
    ;; The configuration (the input) into memory: its address at 0, its length at 4.
    (drop (call $f7 (i32.const 7) (i32.const 0) (local.get $size) (i32.const 0) (i32.const 4)))
    (global.set $pos (i32.load (i32.const 0)))
    (global.set $end (i32.add (global.get $pos) (i32.load (i32.const 4))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (global.get $pos) (global.get $end)))
        (local.set $op (i32.load8_u (global.get $pos)))
        (global.set $pos (i32.add (global.get $pos) (i32.const 1)))
{dispatch}))
    (i32.const 1))
)"#
    )
}

struct Fixture {
    module: Arc<LoadedModule>,
    host: Arc<WasmShared>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let wasm = wat::parse_str(interpreter()).expect("the interpreter assembles");
        Fixture {
            module: module::load("host-calls", &wasm).expect("the interpreter links"),
            host: WasmShared::new(Arc::new(Metrics::new())),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let spec = VmSpec {
        module: f.module.clone(),
        vm_id: Arc::from("fuzz"),
        vm_config: Bytes::new(),
        memory: 4 << 20,
        cpu_per_call: Duration::from_millis(500),
        host: HostLimits {
            shared_data: 1 << 20,
            queue_bytes: 1 << 20,
            ..HostLimits::default()
        },
    };
    let plugin = Arc::new(PluginInfo {
        name: Arc::from("fuzz"),
        root_id: Arc::from(""),
        vm_id: Arc::from("fuzz"),
        config: Bytes::copy_from_slice(data),
        fail_open: false,
        body_buffer: 1 << 20,
    });
    // A guest may trap (its own out-of-bounds access) or be refused: both are answers.
    if let Ok(vm) = Vm::start(spec, None, f.host.clone()) {
        let _ = vm.root(&plugin);
    }
});
