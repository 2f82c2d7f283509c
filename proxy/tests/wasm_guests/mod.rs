//! Hand-written guests (WAT) for what the SDKs cannot express: hostile modules (a loop that
//! never ends, a memory bomb, an import weft does not provide) and a module that logs every
//! callback it gets, for the order tests.

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
    let mut data = String::new();
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
  (func (export "proxy_on_log") (param $ctx i32) {log})
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
        root_done = say("order:root_done"),
        done = say("order:done"),
        root_delete = say("order:root_delete"),
        delete = say("order:delete"),
    );
    // This module defines its own `proxy_on_context_create`.
    module("", &data, &body).replacen(
        r#"(func (export "proxy_on_context_create") (param i32 i32))"#,
        "",
        1,
    )
}
