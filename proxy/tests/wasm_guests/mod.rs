//! Hand-written guests (WAT) for what the SDKs cannot express: hostile modules (a loop that
//! never ends, a memory bomb, an import weft does not provide) and a module that logs every
//! callback it gets, for the order tests.
// Each test binary that includes this module uses some of its guests.
#![allow(dead_code)]

use std::path::Path;

/// The parts every Proxy-Wasm module needs: memory, the ABI marker, a bump allocator, and
/// `proxy_log`.
fn module(imports: &str, data: &str, body: &str) -> String {
    format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  {imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 32768))
  {data}
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (local.get $size) (i32.const 65536)) (i32.const 1))))))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  {body}
)"#
    )
}

/// Writes `wat` compiled to `dir/name.wasm`; returns the path.
pub fn write(dir: &Path, name: &str, wat_text: &str) -> String {
    let bytes = wat::parse_str(wat_text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).expect("write module");
    path.to_string_lossy().into_owned()
}

/// Never returns from `proxy_on_request_headers`.
pub fn endless_loop() -> String {
    module(
        "",
        "",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0))"#,
    )
}

/// Grows its memory 16 MiB at a time on each request until refused, then aborts (as an
/// allocator does when memory runs out).
pub fn memory_bomb() -> String {
    module(
        "",
        "",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 256)) (i32.const -1))))
    unreachable)"#,
    )
}

/// Imports a host function that does not exist.
pub fn missing_import() -> String {
    module(
        r#"(import "env" "proxy_does_not_exist" (func $nope (param i32) (result i32)))"#,
        "",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $nope (i32.const 0)))
    (i32.const 0))"#,
    )
}

/// Logs `order:<callback>` (with `+eos` where the callback says the stream ended) for every
/// callback of a stream context; root contexts log `order:root_…`.
pub fn order_logger() -> String {
    order_logger_with("", "", "")
}

/// [`order_logger`], which first asks weft not to call some of its callbacks: its
/// `proxy_on_configure` calls `weft.skip_callbacks` with `args_len` bytes at `args_ptr` (`None`:
/// `args`, where it is put) and logs `skip:ok` or `skip:refused`. Its `proxy_on_log` also logs
/// the `request.size` and `response.size` properties, as `size:request=<n>` and
/// `size:response=<n>`.
pub fn skipping_order_logger(args: &str, args_at: Option<(i32, i32)>) -> String {
    foreign_order_logger("weft.skip_callbacks", args, args_at, 512)
}

/// [`skipping_order_logger`], calling foreign function `name` instead (`args` may hold a line
/// feed), with its two out-parameters at `ret_at` and `ret_at + 4`.
pub fn foreign_order_logger(
    name: &str,
    args: &str,
    args_at: Option<(i32, i32)>,
    ret_at: i32,
) -> String {
    assert!(
        !args.contains(['"', '\\']) && args.len() < 1800 && name.len() <= 60,
        "plain args only"
    );
    let (ptr, len) = args_at.unwrap_or((4160, args.len() as i32));
    let name_len = name.len();
    let ret_len_at = ret_at.wrapping_add(4);
    let args = args.replace('\n', "\\0a");
    let data = format!(
        r#"(data (i32.const 4096) "{name}")
  (data (i32.const 4160) "{args}")
  (data (i32.const 6000) "request\00size")
  (data (i32.const 6016) "response\00size")
  (data (i32.const 6100) "skip:ok")
  (data (i32.const 6110) "skip:refused")
  (data (i32.const 6130) "size:request=")
  (data (i32.const 6150) "size:response=")"#
    );
    let imports = r#"(import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $property (param i32 i32 i32 i32) (result i32)))"#;
    let functions = format!(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32)
    (if (i32.eqz (call $foreign (i32.const 4096) (i32.const {name_len}) (i32.const {ptr}) (i32.const {len}) (i32.const {ret_at}) (i32.const {ret_len_at})))
      (then (drop (call $log (i32.const 2) (i32.const 6100) (i32.const 7))))
      (else (drop (call $log (i32.const 2) (i32.const 6110) (i32.const 12)))))
    (i32.const 1))
  ;; Logs the int64 property at `path` after `prefix`, in decimal (written at 8192..).
  (func $say_size (param $path i32) (param $path_len i32) (param $prefix i32) (param $prefix_len i32)
    (local $v i64) (local $p i32)
    (if (call $property (local.get $path) (local.get $path_len) (i32.const 520) (i32.const 524))
      (then (return)))
    (local.set $v (i64.load (i32.load (i32.const 520))))
    (local.set $p (i32.const 8300))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i64.store8 (local.get $p) (i64.add (i64.const 48) (i64.rem_u (local.get $v) (i64.const 10))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (local.set $p (i32.sub (local.get $p) (local.get $prefix_len)))
    (memory.copy (local.get $p) (local.get $prefix) (local.get $prefix_len))
    (drop (call $log (i32.const 2) (local.get $p) (i32.sub (i32.const 8300) (local.get $p)))))"#
    );
    order_logger_with(imports, &data, &functions).replacen(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))"#,
        "",
        1,
    )
}

/// The order logger with more imports, data and functions; `$size_log` in its `proxy_on_log`
/// when `functions` defines `$say_size`.
fn order_logger_with(imports: &str, more_data: &str, functions: &str) -> String {
    let names = [
        "order:context_create",
        "order:request_headers",
        "order:request_headers+eos",
        "order:request_body",
        "order:request_body+eos",
        "order:request_trailers",
        "order:response_headers",
        "order:response_headers+eos",
        "order:response_body",
        "order:response_body+eos",
        "order:response_trailers",
        "order:log",
        "order:done",
        "order:delete",
        "order:root_done",
        "order:root_delete",
    ];
    let mut data = String::from(more_data);
    let mut at = 1024;
    let mut offsets = std::collections::HashMap::new();
    for n in names {
        data.push_str(&format!("(data (i32.const {at}) \"{n}\")\n"));
        offsets.insert(n, (at, n.len()));
        at += n.len() + 1;
    }
    let say = |n: &str| {
        let (o, l) = offsets[n];
        format!("(drop (call $log (i32.const 2) (i32.const {o}) (i32.const {l})))")
    };
    let pick = |plain: &str, eos: &str, flag: &str| {
        format!(
            "(if (local.get {flag}) (then {}) (else {}))",
            say(eos),
            say(plain)
        )
    };
    let body = format!(
        r#"(global $root (mut i32) (i32.const 0))
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (if (i32.eqz (local.get $parent))
      (then (global.set $root (local.get $ctx)))
      (else {create})))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {rh} (i32.const 0))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {rb} (i32.const 0))
  (func (export "proxy_on_request_trailers") (param $ctx i32) (param $n i32) (result i32)
    {rt} (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {sh} (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {sb} (i32.const 0))
  (func (export "proxy_on_response_trailers") (param $ctx i32) (param $n i32) (result i32)
    {st} (i32.const 0))
  (func (export "proxy_on_log") (param $ctx i32) {log} {sizes})
  {functions}
  (func (export "proxy_on_done") (param $ctx i32) (result i32)
    (if (i32.eq (local.get $ctx) (global.get $root)) (then {root_done}) (else {done}))
    (i32.const 1))
  (func (export "proxy_on_delete") (param $ctx i32)
    (if (i32.eq (local.get $ctx) (global.get $root)) (then {root_delete}) (else {delete})))"#,
        create = say("order:context_create"),
        rh = pick("order:request_headers", "order:request_headers+eos", "$eos"),
        rb = pick("order:request_body", "order:request_body+eos", "$eos"),
        rt = say("order:request_trailers"),
        sh = pick(
            "order:response_headers",
            "order:response_headers+eos",
            "$eos"
        ),
        sb = pick("order:response_body", "order:response_body+eos", "$eos"),
        st = say("order:response_trailers"),
        log = say("order:log"),
        sizes = if functions.contains("$say_size") {
            "(call $say_size (i32.const 6000) (i32.const 12) (i32.const 6130) (i32.const 13)) \
             (call $say_size (i32.const 6016) (i32.const 13) (i32.const 6150) (i32.const 14))"
        } else {
            ""
        },
        root_done = say("order:root_done"),
        done = say("order:done"),
        root_delete = say("order:root_delete"),
        delete = say("order:delete"),
    );
    // This module defines its own `proxy_on_context_create`.
    module(imports, &data, &body).replacen(
        r#"(func (export "proxy_on_context_create") (param i32 i32))"#,
        "",
        1,
    )
}

/// The start of a guest that abuses the host: memory of 258 pages with a 15 MiB buffer of `a`
/// at 128 KiB (filled by `$fill`), the imports the abuse needs, a bump allocator and `$say`.
fn greedy_module(abuse_on_configure: bool, body: &str) -> String {
    let configure = if abuse_on_configure {
        "(call $fill) (call $flood_stdout) (call $flood_log) (i32.const 1)"
    } else {
        "(i32.const 1)"
    };
    format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register_queue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 32768))
  (data (i32.const 64) "x-greedy")
  (data (i32.const 80) "app")
  (data (i32.const 96) "greedy/q")
  (data (i32.const 112) "refused:shared")
  (data (i32.const 128) "refused:queue")
  (data (i32.const 144) "refused:property")
  (data (i32.const 176) "refused:header")
  (data (i32.const 192) "refused:callout")
  (data (i32.const 208) "refused:body")
  (data (i32.const 224) "fd_write:ok")
  (data (i32.const 240) "log:ok")
  (data (i32.const 4096) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\01\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/\00:authority\00x\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) {configure})
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32))
  (func $say (param $at i32) (param $len i32)
    (drop (call $log (i32.const 2) (local.get $at) (local.get $len))))
  ;; 15 MiB of `a` at 128 KiB (grows memory to 258 pages once).
  (func $fill
    (if (i32.lt_u (memory.size) (i32.const 258))
      (then (drop (memory.grow (i32.sub (i32.const 258) (memory.size))))))
    (memory.fill (i32.const 131072) (i32.const 97) (i32.const 15728640)))
  ;; 200 iovecs that all point at the same 15 MiB: 3 GB if the host copied each.
  (func $flood_stdout
    (local $i i32)
    (loop $iov
      (i32.store (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 8))) (i32.const 131072))
      (i32.store (i32.add (i32.const 1028) (i32.mul (local.get $i) (i32.const 8))) (i32.const 15728640))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $iov (i32.lt_u (local.get $i) (i32.const 200))))
    (if (i32.eqz (call $fd_write (i32.const 1) (i32.const 1024) (i32.const 200) (i32.const 0)))
      (then (call $say (i32.const 224) (i32.const 11)))))
  ;; One 15 MiB log message, ten times.
  (func $flood_log
    (local $i i32)
    (loop $more
      (drop (call $log (i32.const 2) (i32.const 131072) (i32.const 15728640)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 10))))
    (call $say (i32.const 240) (i32.const 6)))
  {body}
)"#
    )
}

/// `on_configure` writes 200 iovecs aliasing one 15 MiB buffer to standard output and logs
/// 15 MiB messages: the start-up `weft validate` and the control plane run too.
pub fn stdout_flood() -> String {
    greedy_module(true, "")
}

/// On every request, grows everything a guest can make the host hold — standard output and
/// log lines, shared data, a queue, metric definitions, properties, request headers, the
/// request body and callouts in flight — until the host refuses, and logs `refused:<what>`
/// for each refusal it got.
pub fn greedy() -> String {
    greedy_module(
        false,
        r#"(func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $i i32)
    (call $fill)
    (call $flood_stdout)
    (call $flood_log)
    ;; Shared data: 20,000 keys of 1 KiB.
    (local.set $i (i32.const 0))
    (block $done (loop $more
      (i32.store (i32.const 16) (local.get $i))
      (if (call $set_shared (i32.const 16) (i32.const 4) (i32.const 131072) (i32.const 1024) (i32.const 0))
        (then (call $say (i32.const 112) (i32.const 14)) (br $done)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 20000)))))
    ;; A queue: 20,000 items of 1 KiB.
    (drop (call $register_queue (i32.const 96) (i32.const 8) (i32.const 0)))
    (local.set $i (i32.const 0))
    (block $done (loop $more
      (if (call $enqueue (i32.load (i32.const 0)) (i32.const 131072) (i32.const 1024))
        (then (call $say (i32.const 128) (i32.const 13)) (br $done)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 20000)))))
    ;; 5,000 metric names.
    (local.set $i (i32.const 0))
    (loop $more
      (i32.store8 (i32.const 32) (i32.const 109))
      (i32.store8 (i32.const 33) (i32.add (i32.const 65) (i32.and (local.get $i) (i32.const 15))))
      (i32.store8 (i32.const 34) (i32.add (i32.const 65) (i32.and (i32.shr_u (local.get $i) (i32.const 4)) (i32.const 15))))
      (i32.store8 (i32.const 35) (i32.add (i32.const 65) (i32.and (i32.shr_u (local.get $i) (i32.const 8)) (i32.const 15))))
      (i32.store8 (i32.const 36) (i32.add (i32.const 65) (i32.and (i32.shr_u (local.get $i) (i32.const 12)) (i32.const 15))))
      (drop (call $define_metric (i32.const 0) (i32.const 32) (i32.const 5) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 5000))))
    ;; Properties: 2,000 of 1 KiB.
    (local.set $i (i32.const 0))
    (block $done (loop $more
      (i32.store (i32.const 16) (local.get $i))
      (if (call $set_property (i32.const 16) (i32.const 4) (i32.const 131072) (i32.const 1024))
        (then (call $say (i32.const 144) (i32.const 16)) (br $done)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 2000)))))
    ;; Request headers: 5,000 values of 1 KiB.
    (local.set $i (i32.const 0))
    (block $done (loop $more
      (if (call $add_header (i32.const 0) (i32.const 64) (i32.const 8) (i32.const 131072) (i32.const 1024))
        (then (call $say (i32.const 176) (i32.const 14)) (br $done)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 5000)))))
    ;; The request body: 1 MiB appended 200 times.
    (local.set $i (i32.const 0))
    (block $done (loop $more
      (if (call $set_buffer (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 131072) (i32.const 1048576))
        (then (call $say (i32.const 208) (i32.const 12)) (br $done)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 200)))))
    ;; Callouts: 5,000 with 64 KiB bodies, none of which can complete during this call.
    (local.set $i (i32.const 0))
    (block $done (loop $more
      (if (call $http_call (i32.const 80) (i32.const 3) (i32.const 4096) (i32.const 61)
                           (i32.const 131072) (i32.const 65536) (i32.const 0) (i32.const 0)
                           (i32.const 0) (i32.const 8))
        (then (call $say (i32.const 192) (i32.const 15)) (br $done)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 5000)))))
    (i32.const 0))"#,
    )
}

/// Logs ten 16 KiB lines per request (at info).
pub fn chatty() -> String {
    module(
        "",
        "",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    (memory.fill (i32.const 65536) (i32.const 98) (i32.const 16384))
    (loop $more
      (drop (call $log (i32.const 2) (i32.const 65536) (i32.const 16384)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 10))))
    (i32.const 0))"#,
    )
}

/// A module that does nothing, made distinct (another digest) by `n`.
pub fn numbered(n: u32) -> String {
    module("", &format!("(data (i32.const 1024) \"module {n}\")"), "")
}

/// `on_configure` logs `configuring`, then keeps the CPU busy for `ms` milliseconds (a module
/// that takes its time to start: the validation of a reload runs it).
pub fn slow_configure(ms: u64) -> String {
    format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "configuring")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 32768))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (local $until i64)
    (drop (call $log (i32.const 2) (i32.const 64) (i32.const 11)))
    (drop (call $now (i32.const 0)))
    (local.set $until (i64.add (i64.load (i32.const 0)) (i64.const {ns})))
    (loop $spin
      (drop (call $now (i32.const 0)))
      (br_if $spin (i64.lt_u (i64.load (i32.const 0)) (local.get $until))))
    (i32.const 1))
)"#,
        ns = ms * 1_000_000
    )
}

/// On request headers, edits the request's headers with names or values outside its memory
/// (past the end, and wrapping around 4 GiB), then adds `x-ok: yes`. Each edit that is not
/// refused with `INVALID_MEMORY_ACCESS` (6) adds `x-wrong: <which>`.
pub fn header_edits_out_of_bounds() -> String {
    module(
        r#"(import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 64) "x-ok")
  (data (i32.const 80) "yes")
  (data (i32.const 96) "x-wrong")
  (data (i32.const 112) "0123456789")"#,
        r#"(func $check (param $status i32) (param $which i32)
    (if (i32.ne (local.get $status) (i32.const 6))
      (then (drop (call $add (i32.const 0) (i32.const 96) (i32.const 7)
        (i32.add (i32.const 112) (local.get $which)) (i32.const 1))))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; A name past the end of memory (two pages: 131072 bytes).
    (call $check (call $add (i32.const 0) (i32.const 131070) (i32.const 4) (i32.const 80) (i32.const 3)) (i32.const 0))
    ;; A value past the end.
    (call $check (call $add (i32.const 0) (i32.const 64) (i32.const 4) (i32.const 131000) (i32.const 100)) (i32.const 1))
    ;; A name whose end wraps around 4 GiB.
    (call $check (call $add (i32.const 0) (i32.const -16) (i32.const 32) (i32.const 80) (i32.const 3)) (i32.const 2))
    ;; The same for replace: name, then value.
    (call $check (call $replace (i32.const 0) (i32.const 131070) (i32.const 4) (i32.const 80) (i32.const 3)) (i32.const 3))
    (call $check (call $replace (i32.const 0) (i32.const 64) (i32.const 4) (i32.const -1) (i32.const 2)) (i32.const 4))
    ;; A length that is negative as an i32.
    (call $check (call $replace (i32.const 0) (i32.const 64) (i32.const -1) (i32.const 80) (i32.const 3)) (i32.const 5))
    ;; Remove with a name past the end.
    (call $check (call $remove (i32.const 0) (i32.const 131071) (i32.const 2)) (i32.const 6))
    ;; And a good edit, which must still work.
    (drop (call $add (i32.const 0) (i32.const 64) (i32.const 4) (i32.const 80) (i32.const 3)))
    (i32.const 0))"#,
    )
}

/// On request headers, removes `x-request-id` (the id weft set, or the client's).
pub fn request_id_remover() -> String {
    module(
        r#"(import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 64) "x-request-id")"#,
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $remove (i32.const 0) (i32.const 64) (i32.const 12)))
    (i32.const 0))"#,
    )
}
