//! The built-in filters (`filters/`, written with weft-sdk) in a real weft, built to Wasm:
//! fault injection, …

use std::time::{Duration, Instant};

use weft_testkit::filters::builtin;
use weft_testkit::{Backend, Weft, client};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn with_filter(app: &Backend, filter: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [f] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
{filter}"#,
        app.endpoint()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delays_and_aborts_in_a_real_proxy() {
    let app = Backend::start("app").await;
    let module = builtin("fault");
    let filter = format!(
        r#"  - name: f
    module: "{module}"
    config:
      rules:
        - name: slow
          match: {{ path: {{ prefix: /slow }} }}
          delay: {{ fixed: 300ms }}
        - name: broken
          match: {{ path: {{ prefix: /broken }} }}
          abort: {{ http_status: 503 }}
        - name: half
          match: {{ path: {{ prefix: /half }} }}
          abort: {{ http_status: 500, percentage: 50 }}
"#
    );
    let weft = Weft::start(WEFT, &with_filter(&app, &filter));
    let c = client::http1();

    let started = Instant::now();
    let r = client::get(&c, &weft.url("main", "/slow"))
        .await
        .expect("slow");
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(took >= Duration::from_millis(290), "delayed only {took:?}");
    assert!(took < Duration::from_secs(3), "delayed {took:?}");

    // Delays do not block the worker: a fast request is served meanwhile.
    let slow = tokio::spawn({
        let url = weft.url("main", "/slow");
        async move { client::get(&client::http1(), &url).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let fast = client::get(&c, &weft.url("main", "/fast"))
        .await
        .expect("fast");
    assert_eq!(fast.status, 200);
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(slow.await.expect("task").expect("slow").status, 200);

    let r = client::get(&c, &weft.url("main", "/broken"))
        .await
        .expect("broken");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-weft-fault"), Some("broken"));
    assert_eq!(r.text(), "fault filter abort");

    let n = 400;
    let mut aborted = 0;
    for _ in 0..n {
        let r = client::get(&c, &weft.url("main", "/half"))
            .await
            .expect("half");
        if r.status == 500 {
            aborted += 1;
        }
    }
    // 50 % of 400 = 200, σ = 10: ±5σ.
    assert!((150..=250).contains(&aborted), "{aborted} of {n}");

    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.contains(r#"weft_wasm_fault_aborts_total{filter="f",rule="broken"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"weft_wasm_fault_delays_total{filter="f",rule="slow"} 2"#));

    // A bad configuration is refused, located, before anything is served.
    let out = std::process::Command::new(WEFT)
        .args(["validate", "--config"])
        .arg({
            let dir = tempfile::tempdir().expect("dir");
            let p = dir.path().join("bad.yaml");
            std::fs::write(
                &p,
                with_filter(
                    &app,
                    &format!(
                        "  - name: f\n    module: \"{module}\"\n    config: {{ rules: [{{ abort: {{ http_status: 503, percentage: 101 }} }}] }}\n"
                    ),
                ),
            )
            .expect("write");
            let keep = p.clone();
            std::mem::forget(dir);
            keep
        })
        .output()
        .expect("validate");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("rules[0].abort.percentage: 101 is not between 0 and 100"),
        "{text}"
    );
}
