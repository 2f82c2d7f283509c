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
    // A bound against a hang, not a timing: a loaded machine may add seconds.
    assert!(took < Duration::from_secs(30), "delayed {took:?}");

    // Delays do not block the worker: a fast request is served while a slow one (3 s) waits
    // — shown by order, not by a stopwatch.
    // One worker: the fast request is served by the same event loop the delay runs on.
    let weft_slow = Weft::start_with(
        WEFT,
        &with_filter(
            &app,
            &format!(
                "  - name: f\n    module: \"{module}\"\n    config: {{ rules: [ {{ match: {{ path: {{ prefix: /slow }} }}, delay: {{ fixed: 3s }} }} ] }}\n"
            ),
        ),
        &["--workers", "1"],
    );
    let slow = tokio::spawn({
        let url = weft_slow.url("main", "/slow");
        async move { client::get(&client::http1(), &url).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = client::get(&c, &weft_slow.url("main", "/fast"))
        .await
        .expect("fast");
    assert_eq!(fast.status, 200);
    assert!(
        !slow.is_finished(),
        "the slow request ended before the fast one"
    );
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
        metrics
            .lines()
            .any(|l| l == r#"weft_wasm_fault_aborts_total{filter="f",rule="broken"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"weft_wasm_fault_delays_total{filter="f",rule="slow"} 1"#)
    );

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_is_exact_across_workers_and_refills() {
    let app = Backend::start("app").await;
    let module = builtin("quota");
    let filter = format!(
        r#"  - name: f
    module: "{module}"
    config:
      limits:
        - {{ name: per-key, requests: 5, per: 10s, key: [{{ header: x-api-key }}] }}
        - {{ name: fast, requests: 2, per: 1s, key: [{{ header: x-fast }}] }}
"#
    );
    // Two workers: new connections land on both, and share the buckets.
    let weft = Weft::start(WEFT, &with_filter(&app, &filter));
    let url = weft.url("main", "/");
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..8 {
        let c = client::http1(); // a new connection each time
        let r = client::get_with(&c, &url, &[("x-api-key", "alice")])
            .await
            .expect("answer");
        statuses.push(r.status);
        last = Some(r);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let r = last.expect("a response");
    assert_eq!(r.header("x-weft-quota"), Some("per-key"));
    assert_eq!(r.header("ratelimit-limit"), Some("5"));
    assert!(r.header("retry-after").is_some());
    let other = client::get_with(&client::http1(), &url, &[("x-api-key", "bob")])
        .await
        .expect("bob");
    assert_eq!(other.status, 200);
    assert_eq!(other.header("ratelimit-remaining"), Some("4"));

    for _ in 0..2 {
        let r = client::get_with(&client::http1(), &url, &[("x-fast", "k")])
            .await
            .expect("fast");
        assert_eq!(r.status, 200);
    }
    let r = client::get_with(&client::http1(), &url, &[("x-fast", "k")])
        .await
        .expect("fast");
    assert_eq!(r.status, 429);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = client::get_with(&client::http1(), &url, &[("x-fast", "k")])
        .await
        .expect("refilled");
    assert_eq!(r.status, 200, "a token is back after half a second");

    let (_, metrics) = weft.admin_get("/metrics");
    let denied: u64 = metrics
        .lines()
        .filter(|l| l.starts_with(r#"weft_wasm_quota_denied_total{filter="f",limit="per-key"}"#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(denied, 3, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_and_denies_by_identity_path_and_jwt() {
    use weft_testkit::jwt::{self, Alg};
    use weft_testkit::tls::{self as ttls, Pki};

    let app = Backend::start("app").await;
    let module = builtin("policy");
    let pki = Pki::new("mesh");
    let server = pki.issue("server", &["edge.test"]);
    let prod = pki.issue("prod", &["spiffe://weft.test/ns/prod/sa/web"]);
    let dev = pki.issue("dev", &["spiffe://weft.test/ns/dev/sa/web"]);
    let config = serde_json::json!({
        "default": "deny",
        "jwt": { "issuer": "https://issuer.test", "audiences": ["api"], "jwks": jwt::jwks(),
                 "forward_claims": { "sub": "x-user" } },
        "rules": [
            { "name": "no-admin", "action": "deny", "when": { "path": { "prefix": "/admin" } } },
            { "name": "prod-mesh", "action": "allow", "when": { "identities": ["spiffe://weft.test/ns/prod/*"] } },
            { "name": "users", "action": "allow", "when": { "authenticated": true, "methods": ["GET"] } }
        ]
    });
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [p] }}
  - name: mtls
    address: "127.0.0.1:0"
    routes: main
    filters: [p]
    tls: {{ cert: "{}", key: "{}", client_ca: "{}", client_certificate: optional }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - name: p
    module: "{module}"
    config: {config}
"#,
        server.cert.display(),
        server.key.display(),
        pki.ca.display(),
        app.endpoint()
    );
    let weft = Weft::start(WEFT, &yaml);
    let c = client::http1();
    let url = weft.url("main", "/items");
    let claims = |extra: serde_json::Value| {
        let mut c = serde_json::json!({ "iss": "https://issuer.test", "aud": "api",
                                        "sub": "alice", "exp": jwt::now() + 300 });
        for (k, v) in extra.as_object().into_iter().flatten() {
            c[k] = v.clone();
        }
        c
    };
    let get = |token: Option<String>| {
        let c = &c;
        let url = url.clone();
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let mut h = vec![("x-user", "forged")];
            if let Some(a) = &auth {
                h.push(("authorization", a.as_str()));
            }
            client::get_with(c, &url, &h).await.expect("answer")
        }
    };

    let r = get(None).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-weft-policy"), Some("default"));
    for alg in [Alg::Rs256, Alg::Es256] {
        let r = get(Some(jwt::sign(alg, &claims(serde_json::json!({}))))).await;
        assert_eq!(r.status, 200, "{alg:?}: {}", r.text());
        assert_eq!(r.json()["headers"]["x-user"], "alice");
    }
    for (extra, why) in [
        (
            serde_json::json!({ "exp": jwt::now() - 600 }),
            "token expired",
        ),
        (serde_json::json!({ "aud": "other" }), "wrong audience"),
    ] {
        let r = get(Some(jwt::sign(Alg::Es256, &claims(extra)))).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("x-weft-policy"),
            Some(&*format!("invalid_token: {why}"))
        );
    }
    let good = jwt::sign(Alg::Rs256, &claims(serde_json::json!({})));
    let evil = jwt::sign(Alg::Rs256, &claims(serde_json::json!({ "sub": "root" })));
    let forged = format!(
        "{}.{}.{}",
        good.split('.').next().unwrap_or(""),
        evil.split('.').nth(1).unwrap_or(""),
        good.split('.').nth(2).unwrap_or("")
    );
    let r = get(Some(forged)).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("x-weft-policy"),
        Some("invalid_token: bad signature")
    );
    let r = client::get(&c, &weft.url("main", "/admin/x"))
        .await
        .expect("admin");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-weft-policy"), Some("no-admin"));

    // The mTLS identity decides on the TLS listener.
    let addr = weft.addr("mtls");
    let as_prod = ttls::client_config(&pki.ca, Some(&prod), &["http/1.1"]);
    let r = ttls::get(addr, "edge.test", as_prod, "/items")
        .await
        .expect("prod");
    assert_eq!(r.status, 200, "{}", r.body);
    let as_dev = ttls::client_config(&pki.ca, Some(&dev), &["h2"]);
    let r = ttls::get(addr, "edge.test", as_dev, "/items")
        .await
        .expect("dev");
    assert_eq!(r.status, 403);

    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.lines().any(|l| l
            == r#"weft_wasm_policy_decisions_total{filter="p",rule="prod-mesh",action="allow"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_exports_golden_metrics_logs_and_propagates_traces() {
    let app = Backend::start("app").await;
    let module = builtin("telemetry");
    let filter = format!(
        "  - name: f\n    module: \"{module}\"\n    config: {{ log_headers: [x-tenant] }}\n"
    );
    // The filter adds the trace and its `log_headers` to the listener's native line.
    let yaml = with_filter(&app, &filter).replace(
        "filters: [f] }",
        "filters: [f], access_log: { path: access.log } }",
    );
    let weft = Weft::start(WEFT, &yaml);
    let c = client::http1();
    for _ in 0..3 {
        let r = client::get_with(
            &c,
            &weft.url("main", "/orders?id=7"),
            &[("x-tenant", "acme")],
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 200);
        let tp = r.json()["headers"]["traceparent"]
            .as_str()
            .expect("the upstream sees a traceparent")
            .to_owned();
        assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    }
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client::get_with(&c, &weft.url("main", "/"), &[("traceparent", incoming)])
        .await
        .expect("answer");
    let tp = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );

    // Recorded when each request ends, which may be just after its answer arrived.
    let series = r#"weft_wasm_requests_total{filter="f",source_workload="unknown",source_namespace="unknown",destination_workload="app",response_code="200",grpc_response_status=""} 4"#;
    let mut metrics = String::new();
    weft_testkit::eventually(Duration::from_secs(20), "four requests counted", || {
        metrics = weft.admin_get("/metrics").1;
        metrics.lines().any(|l| l == series)
    });
    assert!(
        metrics.lines().any(|l| l
            == r#"weft_wasm_request_duration_milliseconds_count{filter="f",source_workload="unknown",destination_workload="app",response_code="200"} 4"#),
        "{metrics}"
    );
    // Sizes are the head's bytes and the body's: more than nothing, and the same for each of
    // the three identical requests plus the fourth.
    for name in ["request_bytes", "response_bytes"] {
        let sum = format!(
            "weft_wasm_{name}_sum{{filter=\"f\",source_workload=\"unknown\",destination_workload=\"app\",response_code=\"200\"}} "
        );
        let total: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(sum.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{sum}: {metrics}"));
        assert!(total >= 4.0 * 20.0, "{name}: {total}");
    }

    let path = weft.config_path().with_file_name("access.log");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    weft_testkit::eventually(Duration::from_secs(20), "access log lines", || {
        read().lines().count() >= 4
    });
    let text = read();
    let json = text
        .lines()
        .find(|l| l.contains("/orders"))
        .expect("an access log line for /orders");
    assert!(
        !weft.log_lines().iter().any(|l| l.contains("access {")),
        "no line of the filter's own"
    );
    let v: serde_json::Value = serde_json::from_str(json).expect("well-formed JSON");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/orders?id=7");
    assert_eq!(v["response_code"], 200);
    assert_eq!(v["cluster"], "app");
    assert_eq!(v["x-tenant"], "acme");
    assert_eq!(v["trace_id"].as_str().map(str::len), Some(32));
    assert_eq!(v["span_id"].as_str().map(str::len), Some(16));
    assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
    assert!(v["bytes_sent"].as_i64().is_some_and(|b| b > 0));
}

/// Label sets past `max_label_sets` (per worker) are recorded as `_other`, and label values
/// cannot break out of the exposition's syntax.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_caps_its_label_sets_and_keeps_values_inside_their_labels() {
    let app = Backend::start("app").await;
    let module = builtin("telemetry");
    let filter = format!(
        "  - name: f\n    module: \"{module}\"\n    config: {{ max_label_sets: 1, destination_workload: 'or\"d{{e}}rs,x' }}\n"
    );
    let weft = Weft::start_with(WEFT, &with_filter(&app, &filter), &["--workers", "1"]);
    let c = client::http1();
    for (path, status) in [("/status/404", 404), ("/status/503", 503), ("/", 200)] {
        let r = client::get(&c, &weft.url("main", path))
            .await
            .expect("answer");
        assert_eq!(r.status, status);
    }
    let first = r#"weft_wasm_requests_total{filter="f",source_workload="unknown",source_namespace="unknown",destination_workload="ordersx",response_code="404",grpc_response_status=""} 1"#;
    let other = r#"weft_wasm_requests_total{filter="f",source_workload="_other",source_namespace="_other",destination_workload="_other",response_code="_other",grpc_response_status="_other"} 2"#;
    let mut metrics = String::new();
    weft_testkit::eventually(Duration::from_secs(20), "three requests counted", || {
        metrics = weft.admin_get("/metrics").1;
        metrics.lines().any(|l| l == other)
    });
    assert!(metrics.lines().any(|l| l == first), "{metrics}");
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("weft_wasm_requests_total{"))
            .count(),
        2,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_api_key_filter_works_as_its_readme_says() {
    let app = Backend::start("app").await;
    let auth = Backend::start("auth").await;
    let module = builtin("api_key");
    let yaml = format!(
        r#"
listeners:
  - {{ name: private, address: "127.0.0.1:0", routes: main, filters: [api-key] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
  - {{ name: auth, endpoints: ["{}"] }}
filters:
  - name: api-key
    module: "{module}"
    config: {{ auth_cluster: auth, path: /auth, cache_for: 30s }}
"#,
        app.endpoint(),
        auth.endpoint()
    );
    // One worker: the filter's cache is per VM, and a VM is per worker.
    let weft = Weft::start_with(WEFT, &yaml, &["--workers", "1"]);
    let c = client::http1();
    let url = weft.url("private", "/api/hello");
    let r = client::get(&c, &url).await.expect("no key");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-weft-api-key"), Some("missing x-api-key"));
    let r = client::get_with(&c, &url, &[("x-api-key", "nope")])
        .await
        .expect("bad key");
    assert_eq!(r.status, 403);
    let before = auth.requests();
    for _ in 0..3 {
        let r = client::get_with(
            &c,
            &url,
            &[("x-api-key", "key-alice"), ("x-api-user", "root")],
        )
        .await
        .expect("good key");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["headers"]["x-api-user"], "alice");
    }
    // One worker: the answer was cached after the first check.
    assert_eq!(auth.requests() - before, 1);
    drop(auth);
    let r = client::get_with(&c, &url, &[("x-api-key", "key-bob")])
        .await
        .expect("auth down");
    assert_eq!(r.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_see_the_route_a_request_matches() {
    let app = Backend::start("app").await;
    let fault = builtin("fault");
    let quota = builtin("quota");
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [q, f] }}
routes:
  main:
    - {{ name: flaky, match: {{ path_prefix: /flaky }}, to: [{{ cluster: app }}] }}
    - {{ name: rest, to: [{{ cluster: app }}] }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - name: f
    module: "{fault}"
    config: {{ rules: [{{ match: {{ routes: [flaky] }}, abort: {{ http_status: 502 }} }}] }}
  - name: q
    module: "{quota}"
    config: {{ limits: [{{ name: per-route, requests: 2, per: 1m, key: [{{ route: true }}] }}] }}
"#,
        app.endpoint()
    );
    let weft = Weft::start(WEFT, &yaml);
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/flaky/x"))
        .await
        .expect("flaky");
    assert_eq!(r.status, 502, "the fault rule matched the route");
    let r = client::get(&c, &weft.url("main", "/other"))
        .await
        .expect("rest");
    assert_eq!(r.status, 200);
    // Route `rest` has one request left in its bucket, route `flaky` one too.
    assert_eq!(
        client::get(&c, &weft.url("main", "/b"))
            .await
            .expect("b")
            .status,
        200
    );
    assert_eq!(
        client::get(&c, &weft.url("main", "/c"))
            .await
            .expect("c")
            .status,
        429
    );
}

/// `examples/weft.yaml` as the demo runs it, on free ports, in front of `v1`, `v2` and `auth`.
fn demo_config(v1: &Backend, v2: &Backend, auth: &Backend) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/weft.yaml"
    ))
    .expect("examples/weft.yaml");
    let mut yaml = text
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8081", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:9001", &v1.endpoint())
        .replace("127.0.0.1:9002", &v2.endpoint())
        .replace("127.0.0.1:9003", &auth.endpoint());
    for name in ["telemetry", "policy", "quota", "fault", "api_key"] {
        yaml = yaml.replace(
            &format!("../target/wasm-filters/wasm32-wasip1/release/{name}.wasm"),
            &builtin(name),
        );
    }
    yaml
}

/// The issue's report, as a test: every spelling of `/api/admin/…` is denied by the demo's
/// policy rule, and every spelling of `/api/limited` counts against the demo's quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_policy_and_quota_hold_for_every_spelling_of_a_path() {
    let (v1, v2, auth) = (
        Backend::start("api-v1").await,
        Backend::start("api-v2").await,
        Backend::start("auth").await,
    );
    let weft = Weft::start(WEFT, &demo_config(&v1, &v2, &auth));
    let addr = weft.addr("main");
    let admin = [
        "/api/admin/users",
        "/api//admin/users",
        "/api/%61dmin/users",
        "/api/%61%64%6D%69%6E/users",
        "/api/x/../admin/users",
        "/api/x/%2e%2e/admin/users",
        "/api/x/%2E%2E/admin/users",
        "/api/./admin/users",
        "//api/admin/users",
        "/%61pi/admin/users",
        "/api/admin",
        "/api/admin?x=1",
        "/api/admin/../admin/users",
    ];
    for path in admin {
        // --path-as-is: curl sends the dots as they are.
        let (ok, out, err) = client::curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}{path}"),
        ]);
        assert!(ok, "{path}: {err}");
        assert_eq!(out, "403", "{path} passed the policy");
    }
    // Spellings a backend could read as /api/admin are refused, never forwarded.
    for path in ["/api%2Fadmin/users", "/api/%2e%2e;x/admin", "/api\\admin"] {
        let (_, out, _) = client::curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}{path}"),
        ]);
        assert_eq!(out, "400", "{path}");
    }
    assert_eq!(
        v1.requests() + v2.requests(),
        0,
        "a denied request was forwarded"
    );

    // The quota allows 3 per 10 s and source IP: whatever the spelling, the 4th is refused.
    let spellings = [
        "/api/limited",
        "/api//limited",
        "/api/%6Cimited",
        "/api/x/../limited",
        "/api/limited/",
        "/api/limited?a=b",
    ];
    let mut codes = Vec::new();
    for path in spellings {
        let (_, out, _) = client::curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}{path}"),
        ]);
        codes.push(out);
    }
    assert_eq!(
        codes,
        ["200", "200", "200", "429", "429", "429"],
        "{spellings:?}"
    );
}
