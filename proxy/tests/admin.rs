//! The admin listener: readiness, metrics with their documented names, the running config with
//! its version, clusters with live endpoint stats.

mod wasm_guests;

use weft_testkit::client;
use weft_testkit::{Backend, Weft};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_the_running_proxy() {
    let b = Backend::start("b").await;
    let weft = Weft::start_with(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: edge, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - name: api
      match: {{ path_prefix: /api }}
      to: [{{ cluster: app }}]
    - name: teapot
      match: {{ path: /teapot }}
      direct_response: {{ status: 418 }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
            b.endpoint()
        ),
        &["--workers", "3"],
    );
    let c = client::http1();
    for _ in 0..5 {
        assert_eq!(
            client::get(&c, &weft.url("edge", "/api/x"))
                .await
                .expect("req")
                .status,
            200
        );
    }
    assert_eq!(
        client::get(&c, &weft.url("edge", "/teapot"))
            .await
            .expect("req")
            .status,
        418
    );
    assert_eq!(
        client::get(&c, &weft.url("edge", "/nope"))
            .await
            .expect("req")
            .status,
        404
    );

    assert_eq!(weft.admin_get("/ready"), (200, "ready\n".into()));

    let (status, metrics) = weft.admin_get("/metrics");
    assert_eq!(status, 200);
    for line in [
        r#"weft_http_requests_total{listener="edge",route="api",cluster="app",status_class="2xx"} 5"#,
        r#"weft_http_requests_total{listener="edge",route="teapot",cluster="",status_class="4xx"} 1"#,
        r#"weft_http_requests_total{listener="edge",route="",cluster="",status_class="4xx"} 1"#,
        r#"weft_http_request_duration_seconds_count{listener="edge",route="api",cluster="app"} 5"#,
        r#"weft_http_proxy_errors_total{listener="edge",cause="no_route"} 1"#,
        r#"weft_upstream_requests_total{cluster="app"} 5"#,
        r#"weft_config_version 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    // The client may have opened more than one connection (its own pool's business).
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("missing {name} in\n{metrics}"))
    };
    assert!(value(r#"weft_downstream_connections_total{listener="edge"}"#) >= 1.0);
    assert!(value(r#"weft_downstream_connections_active{listener="edge"}"#) >= 1.0);
    // One upstream connection normally; a second when the client's next request beats the
    // first connection's return to the pool (the response is complete for the client a moment
    // before weft's exchange ends).
    let opened = value(r#"weft_upstream_connections_opened_total{cluster="app"}"#);
    assert!(
        (1.0..=2.0).contains(&opened),
        "{opened} upstream connections"
    );
    assert!(value(r#"weft_upstream_connections_active{cluster="app"}"#) >= 1.0);
    assert!(metrics.contains("weft_upstream_received_bytes_total{cluster=\"app\"}"));
    assert!(metrics.contains("weft_downstream_sent_bytes_total{listener=\"edge\"}"));
    assert!(metrics.ends_with("# EOF\n"));

    let (_, config) = weft.admin_get("/config");
    let config: serde_json::Value = serde_json::from_str(&config).expect("JSON");
    assert_eq!(config["version"], 1);
    assert!(
        config["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert_eq!(config["config"]["listeners"][0]["name"], "edge");
    assert_eq!(config["config"]["routes"]["main"][0]["timeout"], "15s");

    let (_, clusters) = weft.admin_get("/clusters");
    let clusters: serde_json::Value = serde_json::from_str(&clusters).expect("JSON");
    let ep = &clusters["clusters"][0]["endpoints"][0];
    assert_eq!(ep["address"], b.endpoint());
    assert_eq!(ep["stats"]["requests_total"], 5);
    assert_eq!(ep["stats"]["requests_active"], 0);
    // As many as were opened (see above): none closed since.
    assert_eq!(ep["stats"]["connections_active"].as_f64(), Some(opened));

    assert_eq!(weft.admin_get("/nothing-here").0, 404);
}

fn secret_config(b: &Backend, admin: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0"{admin} }}
listeners:
  - {{ name: edge, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
      request_headers: {{ set: {{ authorization: "Bearer s3cret-token" }} }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        b.endpoint()
    )
}

/// `/config` hides header-edit values and filter configurations unless asked to show them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_config_is_shown_without_its_secrets() {
    let b = Backend::start("b").await;
    let weft = Weft::start(WEFT, &secret_config(&b, ""));
    let (status, config) = weft.admin_get("/config");
    assert_eq!(status, 200);
    assert!(!config.contains("s3cret-token"), "{config}");
    assert!(
        config.contains("authorization") && config.contains("<redacted>"),
        "{config}"
    );
    let weft = Weft::start(WEFT, &secret_config(&b, ", show_secrets: true"));
    assert!(weft.admin_get("/config").1.contains("Bearer s3cret-token"));
}

#[test]
fn a_remote_admin_address_must_be_allowed_explicitly() {
    let validate = |yaml: &str| weft_testkit::validate(WEFT, yaml);
    let (ok, err) = validate("admin: { address: \"0.0.0.0:9901\" }\n");
    assert!(!ok);
    assert!(
        err.contains("admin.address: 0.0.0.0:9901 is not a loopback address"),
        "{err}"
    );
    let (ok, err) = validate("admin: { address: \"0.0.0.0:9901\", allow_remote: true }\n");
    assert!(ok, "{err}");
    let (ok, err) = validate("admin: { address: \"[::1]:9901\" }\n");
    assert!(ok, "{err}");
}

/// Idle clients cannot take every admin connection: past the cap new ones are closed, and a
/// slot comes back when one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped() {
    use std::io::Read;
    let b = Backend::start("b").await;
    let weft = Weft::start(WEFT, &secret_config(&b, ""));
    let admin = weft.admin;
    tokio::task::spawn_blocking(move || {
        let idle: Vec<std::net::TcpStream> = (0..64)
            .map(|_| std::net::TcpStream::connect(admin).expect("connect"))
            .collect();
        // The 65th is closed without an answer (weft accepts it, then drops it).
        weft_testkit::eventually(
            std::time::Duration::from_secs(10),
            "a connection past the cap is closed",
            || {
                let mut s = std::net::TcpStream::connect(admin).expect("connect");
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .expect("timeout");
                let mut buf = [0u8; 16];
                matches!(s.read(&mut buf), Ok(0) | Err(_))
            },
        );
        drop(idle);
        weft_testkit::eventually(
            std::time::Duration::from_secs(10),
            "the admin listener serves again",
            || matches!(weft_testkit::http_get(admin, "/ready"), Ok((200, _))),
        );
    })
    .await
    .expect("blocking");
}

/// The admin listener answers while a reload is busy validating (a filter that takes seconds
/// to configure): a readiness probe during a reload must not time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_while_a_reload_is_validated() {
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "slow", &wasm_guests::slow_configure(6000));
    let plain = format!(
        r#"
listeners:
  - {{ name: edge, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        b.endpoint()
    );
    // The validation run's guest log lines are at debug level.
    let weft = Weft::start_env(
        WEFT,
        &plain,
        &["--workers", "2"],
        &[("RUST_LOG", "info,weft::wasm=debug")],
    );
    let slow = format!(
        "{plain}filters:\n  - {{ name: slow, module: \"{module}\", limits: {{ cpu_per_call: 30s }} }}\n"
    );
    weft.write_config_and_hup(&slow);
    weft_testkit::eventually(
        std::time::Duration::from_secs(30),
        "the reload validates the slow filter",
        || weft.log_contains("configuring"),
    );
    // The control thread is busy in the filter for seconds: the admin answers meanwhile.
    let admin = weft.admin;
    let answered = tokio::task::spawn_blocking(move || {
        (
            weft_testkit::http_get(admin, "/ready"),
            weft_testkit::http_get(admin, "/config"),
        )
    })
    .await
    .expect("blocking");
    assert!(matches!(answered.0, Ok((200, _))), "{:?}", answered.0);
    let config = answered.1.expect("/config").1;
    assert!(config.contains("\"version\": 1"), "{config}");
    assert!(
        !weft.log_contains("configuration applied"),
        "the reload ended before the admin was asked"
    );
    weft_testkit::eventually(
        std::time::Duration::from_secs(60),
        "the reload is applied",
        || weft.version() == 2,
    );
}
