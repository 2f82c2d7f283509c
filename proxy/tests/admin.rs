//! The admin listener: readiness, metrics with their documented names, the running config with
//! its version, clusters with live endpoint stats.

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
