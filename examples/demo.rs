//! Weft's demo: builds the built-in filters and the example filter to Wasm (from source, with
//! the `wasm32-wasip1` target, added if missing), starts two demo backends (`api-v1` on
//! 127.0.0.1:9001, `api-v2` on :9002) and an auth service (:9003), and weft with
//! `examples/weft.yaml` in front of them; then prints what to try. Ctrl-C stops it (weft drains
//! first).
//!
//! ```sh
//! cargo run --release -p weft-examples --bin demo
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use weft_proxy::{Options, Server};
use weft_testkit::Backend;

const TRY: &str = r#"
  weft is running with the built-in filters (telemetry, policy, quota, fault):
  listeners http://127.0.0.1:8080 and http://127.0.0.1:8081 (API keys), admin http://127.0.0.1:9901

  Try:
    curl -i http://127.0.0.1:8080/api/hello              # 90 % api-v1, 10 % api-v2 (see "backend")
    curl -i -H 'x-canary: 1' http://127.0.0.1:8080/api/hi # always api-v2
    curl -i --http2-prior-knowledge http://127.0.0.1:8080/api/h2
    curl -i http://127.0.0.1:8080/api/admin/users        # 403: denied by the policy filter
    for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:8080/api/limited; done
                                                         # 200 200 200 429: the quota filter
    curl -i -H 'x-fault: abort' http://127.0.0.1:8080/api/hello   # 503 injected by the fault filter
    curl -s -o /dev/null -w '%{time_total}s\n' -H 'x-fault: delay' http://127.0.0.1:8080/api/hello
                                                         # ~1s: an injected delay
    curl -i http://127.0.0.1:8081/api/hello              # 401: the example API-key filter
    curl -i -H 'x-api-key: key-alice' http://127.0.0.1:8081/api/hello   # 200, upstream sees x-api-user: alice
    curl -s http://127.0.0.1:9901/metrics | grep -E 'weft_wasm_(requests_total|policy|quota|fault)'
    curl -i http://127.0.0.1:8080/healthz                # answered by weft itself
    curl -i http://127.0.0.1:8080/nowhere                # 404, x-weft-error: no_route

  Edit examples/weft.yaml and `kill -HUP <pid>` to reload; Ctrl-C to stop.
"#;

fn main() -> anyhow::Result<()> {
    let logs = weft_proxy::logging::init("info");

    eprintln!("building the filters (wasm32-wasip1, release)...");
    for f in ["telemetry", "policy", "quota", "fault", "api_key"] {
        weft_testkit::filters::builtin(f);
    }

    let backends = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (_v1, _v2, _auth) = backends.block_on(async {
        let bind = |port: u16, name: &'static str| async move {
            let addr = format!("127.0.0.1:{port}").parse().context("address")?;
            // Fail with a clear message if the port is taken, rather than a panic.
            std::net::TcpListener::bind(addr).with_context(|| {
                format!("port {port} is in use: the demo backend {name} needs it")
            })?;
            anyhow::Ok(Backend::start_on(addr, name).await)
        };
        anyhow::Ok((
            bind(9001, "api-v1").await?,
            bind(9002, "api-v2").await?,
            bind(9003, "auth").await?,
        ))
    })?;

    let config_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weft.yaml");
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    control.block_on(async {
        let server = Server::start(&Options {
            config_path,
            workers: 0,
            control: None,
            log_dropped: Some(logs.dropped()),
        })
        .await?;
        println!("{TRY}");
        server.run_until_signalled().await
    })
}
