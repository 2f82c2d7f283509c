#![no_main]
//! The configuration parser and validator: any text gives a config or located errors, never a
//! panic; a config that validates survives its JSON round trip (what `/config` shows and the
//! control plane sends is what runs).
//!
//! File paths (certificates, modules) are pointed at a missing file and host names at a
//! literal address first: the validator reads files and resolves names, and a fuzzer must
//! touch neither `/dev/zero` nor DNS.

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use weft_proxy::config::Config;
use weft_proxy::metrics::Metrics;
use weft_proxy::snapshot::{BuildEnv, Snapshot};
use weft_proxy::wasm::WasmShared;

fn neutralize(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match (k.as_str(), &*child) {
                    ("cert" | "key" | "ca", serde_json::Value::String(_)) => {
                        *child = "missing-file.pem".into();
                    }
                    ("module", serde_json::Value::String(s)) if !s.starts_with("sha256:") => {
                        *child = "missing-module.wasm".into();
                    }
                    _ => neutralize(child),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(neutralize),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_yaml(text) else {
        return;
    };
    let mut json = serde_json::to_value(&config).expect("a parsed config serializes");
    neutralize(&mut json);
    let Ok(mut config) = serde_json::from_value::<Config>(json) else {
        return;
    };
    for c in &mut config.clusters {
        for e in &mut c.endpoints {
            if e.address().parse::<std::net::SocketAddr>().is_err() {
                *e = weft_proxy::config::Endpoint::Address("127.0.0.1:9".into());
            }
        }
    }
    static ENV: OnceLock<(Metrics, Arc<WasmShared>, tempfile::TempDir)> = OnceLock::new();
    let (metrics, wasm, dir) = ENV.get_or_init(|| {
        let metrics = Metrics::new();
        let wasm = WasmShared::new(Arc::new(Metrics::new()));
        (metrics, wasm, tempfile::tempdir().expect("dir"))
    });
    let env = BuildEnv {
        metrics,
        wasm,
        base_dir: dir.path(),
        identity: None,
        // Random names are checked, not looked up (no DNS traffic, the same answer each run).
        names: weft_proxy::upstream::Names::CheckOnly,
    };
    match Snapshot::build(config.clone(), 1, None, env) {
        Ok(s) => {
            let text = serde_json::to_string(&*s.config).expect("serializes");
            let back: Config = serde_json::from_str(&text).expect("its own JSON parses");
            assert_eq!(back, *s.config, "the JSON round trip changed the config");
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
