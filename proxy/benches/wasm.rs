//! What hosting a Wasm filter costs, in process: VM start (instantiate + `_initialize` + the
//! root context's `on_context_create` / `on_vm_start` / `on_configure`), and the guest calls of
//! one headers-only request (`on_context_create`, request and response headers, `on_log`,
//! `on_done`, `on_delete`) for the no-op and add-header test filters.
//! `cargo bench -p weft-proxy --bench wasm` (also run by `bench/wasm.sh`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use weft_proxy::metrics::Metrics;
use weft_proxy::wasm::WasmShared;
use weft_proxy::wasm::module;
use weft_proxy::wasm::state::{Headers, PluginInfo, StreamData};
use weft_proxy::wasm::vm::{Vm, VmSpec};

fn spec(name: &str) -> (VmSpec, Arc<PluginInfo>) {
    let path = weft_testkit::filters::path(name);
    let bytes = std::fs::read(&path).expect("module");
    let module = module::load(name, &bytes).expect("loads");
    let vm = VmSpec {
        module,
        vm_id: Arc::from(name),
        vm_config: Bytes::new(),
        memory: 64 << 20,
        cpu_per_call: Duration::from_millis(100),
        host: weft_proxy::wasm::runtime::HostLimits::default(),
    };
    let plugin = Arc::new(PluginInfo {
        name: Arc::from(name),
        root_id: Arc::from(""),
        vm_id: Arc::from(name),
        config: Bytes::new(),
        fail_open: false,
        body_buffer: 1 << 20,
    });
    (vm, plugin)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn vm_start(name: &str, host: &Arc<WasmShared>) {
    let (vm_spec, plugin) = spec(name);
    // Warm up (page in, pool slots).
    for _ in 0..50 {
        let vm = Vm::start(vm_spec.clone(), None, host.clone()).expect("start");
        vm.root(&plugin).expect("root");
    }
    let mut us = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let vm = Vm::start(vm_spec.clone(), None, host.clone()).expect("start");
        vm.root(&plugin).expect("root");
        us.push(t.elapsed().as_secs_f64() * 1e6);
        drop(vm);
    }
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    println!(
        "vm start ({name:<10}) mean {mean:>7.1} µs   p50 {:>7.1} µs   p99 {:>7.1} µs   (target <= 50 µs)",
        percentile(&mut us, 0.5),
        percentile(&mut us, 0.99)
    );
}

fn request_headers() -> Headers {
    let mut map = HeaderMap::new();
    for (k, v) in [
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("x-request-id", "0b9e3b8e-8a53-4c4e-9d5e-7b8f0f5e2a11"),
    ] {
        map.insert(k, v.parse().expect("value"));
    }
    Headers {
        pseudo: vec![
            (
                Bytes::from_static(b":authority"),
                Bytes::from_static(b"127.0.0.1:18003"),
            ),
            (Bytes::from_static(b":path"), Bytes::from_static(b"/")),
            (Bytes::from_static(b":method"), Bytes::from_static(b"GET")),
            (Bytes::from_static(b":scheme"), Bytes::from_static(b"http")),
        ],
        map,
    }
}

fn stream_cost(name: &str, host: &Arc<WasmShared>) {
    let (vm_spec, plugin) = spec(name);
    let vm = Vm::start(vm_spec, None, host.clone()).expect("start");
    let root = vm.root(&plugin).expect("root");
    let one = || {
        let stream = Rc::new(RefCell::new(StreamData {
            request_headers: request_headers(),
            request_body: smallvec::smallvec![Vec::new()],
            response_body: smallvec::smallvec![Vec::new()],
            ..StreamData::default()
        }));
        let ctx = vm.create_stream(root, stream.clone(), 0).expect("context");
        vm.on_request_headers(ctx, 7, true)
            .expect("request headers");
        let mut map = HeaderMap::new();
        map.insert("content-length", "12".parse().expect("value"));
        stream.borrow_mut().response_headers = Some(Headers {
            pseudo: vec![(Bytes::from_static(b":status"), Bytes::from_static(b"200"))],
            map,
        });
        vm.on_response_headers(ctx, 2, false)
            .expect("response headers");
        vm.on_log(ctx).expect("log");
        vm.finish_context(ctx);
    };
    for _ in 0..10_000 {
        one();
    }
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        one();
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!("guest calls of one headers-only request ({name:<10}) {per:>6.2} µs");
}

fn main() {
    let host = WasmShared::new(Arc::new(Metrics::new()));
    vm_start("noop", &host);
    vm_start("add_header", &host);
    stream_cost("noop", &host);
    stream_cost("add_header", &host);
}
