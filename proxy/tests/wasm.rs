//! Wasm filters through a real weft process: behaviour filters built with the public
//! `proxy-wasm` SDK (tests/filters/), hostile and order-logging guests in WAT
//! (`wasm_guests`), real backends and real clients.

mod wasm_guests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_testkit::client::{self, curl, get_with};
use weft_testkit::filters;
use weft_testkit::grpc::GrpcBackend;
use weft_testkit::grpc::pb::EchoRequest;
use weft_testkit::grpc::pb::echo_client::EchoClient;
use weft_testkit::{Backend, Weft, eventually};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// One listener `main` running `chain`, routing everything to `app`.
fn config(app: &str, chain: &[&str], filters: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [{chain}] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{app}"], connect_timeout: 1s }}
filters:
{filters}
"#,
        chain = chain.join(", ")
    )
}

fn filter(name: &str, module: &str) -> String {
    format!("  - {{ name: {name}, module: \"{module}\" }}\n")
}

async fn post(c: &client::Client, url: &str, body: impl Into<Bytes>) -> client::Reply {
    let req = Request::post(url)
        .body(Full::new(body.into()))
        .expect("request");
    client::send(c, req).await.expect("response")
}

fn validate(yaml: &str) -> (bool, String) {
    weft_testkit::validate(WEFT, yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_read_and_written_both_ways() {
    let app = Backend::start("app").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [h] }}
routes:
  main:
    - match: {{ path: /rewritten }}
      direct_response: {{ status: 200, body: "rewritten route" }}
    - match: {{ host: other.example }}
      direct_response: {{ status: 200, body: "routed by the filter's authority" }}
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
{}"#,
        app.endpoint(),
        filter("h", &filters::path("headers"))
    );
    let weft = Weft::start(WEFT, &yaml);
    for c in [client::http1(), client::h2c()] {
        let r = get_with(
            &c,
            &weft.url("main", "/hello"),
            &[
                ("x-echo", "abc"),
                ("x-remove-me", "1"),
                ("x-replace-me", "a"),
            ],
        )
        .await
        .expect("response");
        assert_eq!(r.status, 200);
        let seen = &r.json()["headers"];
        assert_eq!(seen["x-wasm-request"], "seen", "{seen}");
        assert_eq!(seen["x-replace-me"], "replaced");
        assert!(seen.get("x-remove-me").is_none(), "{seen}");
        assert_eq!(r.header("x-wasm-response"), Some("seen"));
        assert_eq!(r.header("x-echo-back"), Some("abc"));
        // The request's fields stay readable once they went upstream (the chain keeps a copy),
        // a filter's own addition and the request id the upstream saw among them.
        assert_eq!(r.header("x-request-later"), Some("seen"));
        assert!(seen["x-request-id"].is_string(), "{seen}");
        assert_eq!(
            r.header("x-request-id-later"),
            seen["x-request-id"].as_str(),
            "{seen}"
        );
        assert!(seen["host"].is_string(), "Host goes upstream: {seen}");
        assert_eq!(r.header("x-upstream-status"), Some("200"));
        assert_eq!(r.header("x-backend"), None, "removed by the filter");

        // A `:path` the filter sets is what the request is routed (and forwarded) by.
        let r = get_with(
            &c,
            &weft.url("main", "/elsewhere"),
            &[("x-rewrite-path", "/rewritten")],
        )
        .await
        .expect("response");
        assert_eq!(r.text(), "rewritten route");
        assert_eq!(
            r.header("x-wasm-response"),
            Some("seen"),
            "local answers go through the filters too"
        );
        let r = get_with(&c, &weft.url("main", "/a"), &[("x-rewrite-path", "/b?c=d")])
            .await
            .expect("response");
        let uri = r.json()["uri"].as_str().unwrap_or_default().to_owned();
        assert!(uri.ends_with("/b?c=d"), "{uri}");

        // Likewise an `:authority` the filter sets: the request is routed by it, and forwarded
        // with it as `Host`; untouched, the client's own goes on.
        // Another spelling of the same host routes the same.
        for spelling in [
            "other.example",
            "OTHER.Example",
            "other.example.",
            "other.example:80",
        ] {
            let r = get_with(
                &c,
                &weft.url("main", "/a"),
                &[("x-rewrite-authority", spelling)],
            )
            .await
            .expect("response");
            assert_eq!(r.text(), "routed by the filter's authority", "{spelling}");
        }
        let r = get_with(
            &c,
            &weft.url("main", "/a"),
            &[("x-rewrite-authority", "app.example:8080")],
        )
        .await
        .expect("response");
        assert_eq!(r.json()["headers"]["host"], "app.example:8080");
        let r = get_with(&c, &weft.url("main", "/a"), &[])
            .await
            .expect("response");
        let own = weft.addr("main").to_string();
        assert_eq!(r.json()["headers"]["host"].as_str(), Some(own.as_str()));
        // Hostile: an authority with a path, userinfo or a space smuggled in is refused, as
        // a client's would be, whichever way it is spelled.
        for bad in ["other.example/x", "user@other.example", "other example"] {
            let r = get_with(&c, &weft.url("main", "/a"), &[("x-rewrite-authority", bad)])
                .await
                .expect("response");
            assert!(
                r.status == 400 || r.status == 500,
                "{bad}: {} {}",
                r.status,
                r.text()
            );
            assert_ne!(r.text(), "routed by the filter's authority", "{bad}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_rewritten_both_ways_with_and_without_content_length() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &app.endpoint(),
            &["b"],
            &filter("b", &filters::path("body")),
        ),
    );
    for c in [client::http1(), client::h2c()] {
        // Content-Length both ways: the rewritten bodies get the right one.
        let r = post(&c, &weft.url("main", "/echo"), "hello world").await;
        assert_eq!(r.text(), "<filtered>HELLO WORLD</filtered>");
        assert_eq!(
            r.header("x-response-body-length"),
            Some("11"),
            "set after seeing the body"
        );
        let len = r.header("content-length").map(str::to_owned);
        assert!(len.is_none() || len.as_deref() == Some("32"), "{len:?}");
        // The request headers changed after the body was seen still reach the upstream.
        let r = post(&c, &weft.url("main", "/"), "abc").await;
        let text = r.text();
        let inner = text
            .strip_prefix("<filtered>")
            .and_then(|t| t.strip_suffix("</filtered>"))
            .expect("wrapped");
        let seen: serde_json::Value = serde_json::from_str(inner).expect("JSON");
        assert_eq!(seen["headers"]["x-request-body-length"], "3");
        // A response without Content-Length.
        let r = client::get(&c, &weft.url("main", "/chunked/100000"))
            .await
            .expect("response");
        assert_eq!(r.body.len(), 100_000 + 21);
        assert_eq!(r.header("x-response-body-length"), Some("100000"));
    }
    // A chunked request body.
    let (ok, out, err) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "chunked body",
        &weft.url("main", "/echo"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "<filtered>CHUNKED BODY</filtered>");

    // Past the filter's body buffer (1 MiB by default): 500 for a response, 413 for a request.
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/bytes/2000000"))
        .await
        .expect("response");
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-weft-error"), Some("response_body_too_large"));
    let r = post(&c, &weft.url("main", "/count"), vec![b'x'; 2_000_000]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("x-weft-error"), Some("request_body_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_responses_short_circuit_and_go_back_through_earlier_filters() {
    let app = Backend::start("app").await;
    let grpc = GrpcBackend::start().await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [h, l] }}
routes:
  main:
    - match: {{ path_prefix: /weft.test }}
      to: [{{ cluster: grpc }}]
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
  - {{ name: grpc, endpoints: ["{}"], protocol: http2 }}
filters:
{}{}"#,
        app.endpoint(),
        grpc.addr,
        filter("h", &filters::path("headers")),
        filter("l", &filters::path("local")),
    );
    let weft = Weft::start(WEFT, &yaml);
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/deny"))
        .await
        .expect("response");
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "denied by filter");
    assert_eq!(r.header("x-denied-by"), Some("local"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(
        r.header("x-local-saw"),
        Some("403"),
        "through its own response callbacks"
    );
    assert_eq!(
        r.header("x-wasm-response"),
        Some("seen"),
        "and the filters before it"
    );
    assert_eq!(app.requests(), 0, "never forwarded");

    let r = client::get(&c, &weft.url("main", "/fine"))
        .await
        .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-local-saw"), Some("200"));

    // gRPC through the filters; a filter's gRPC answer is a gRPC status.
    let mut grpc_client = EchoClient::connect(weft.url("main", ""))
        .await
        .expect("connect");
    let reply = grpc_client
        .unary(EchoRequest {
            message: "through".into(),
            ..Default::default()
        })
        .await
        .expect("unary through filters");
    assert_eq!(reply.into_inner().message, "through");
    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut()
        .insert("x-deny", "1".parse().expect("metadata"));
    let status = grpc_client.unary(req).await.expect_err("denied");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "no entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pauses_on_an_http_callout_and_resumes_from_its_response() {
    let app = Backend::start("app").await;
    let auth = Backend::start("auth").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [c] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
  - {{ name: auth, endpoints: ["{}"] }}
  - {{ name: down, endpoints: ["127.0.0.1:1"], connect_timeout: 1s }}
filters:
{}"#,
        app.endpoint(),
        auth.endpoint(),
        filter("c", &filters::path("callout")),
    );
    let weft = Weft::start(WEFT, &yaml);
    for c in [client::http1(), client::h2c()] {
        let r = client::get(&c, &weft.url("main", "/x"))
            .await
            .expect("response");
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = &r.json()["headers"];
        assert_eq!(seen["x-auth-status"], "200");
        assert_eq!(seen["x-auth-backend"], "auth");

        let r = get_with(&c, &weft.url("main", "/x"), &[("x-auth", "deny")])
            .await
            .expect("response");
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (403, "auth failed: 403".to_owned())
        );

        // A callout to a cluster weft does not have is refused at once.
        let r = get_with(&c, &weft.url("main", "/x"), &[("x-auth-cluster", "nope")])
            .await
            .expect("response");
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "callout refused: BadArgument");

        // One that cannot connect answers 503, as Envoy's async client does.
        let r = get_with(&c, &weft.url("main", "/x"), &[("x-auth-cluster", "down")])
            .await
            .expect("response");
        assert_eq!(r.text(), "auth failed: 503");
    }
    assert!(auth.requests() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pauses_on_a_grpc_callout() {
    let app = Backend::start("app").await;
    let grpc = GrpcBackend::start().await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [g] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
  - {{ name: grpc, endpoints: ["{}"], protocol: http2 }}
filters:
{}"#,
        app.endpoint(),
        grpc.addr,
        filter("g", &filters::path("grpc")),
    );
    let weft = Weft::start(WEFT, &yaml);
    let r = client::get(&client::http1(), &weft.url("main", "/asked/by/path"))
        .await
        .expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-grpc-reply"], "/asked/by/path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_compare_and_swap_holds_across_workers() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &app.endpoint(),
            &["s"],
            &filter("s", &filters::path("shared")),
        ),
    );
    let url = weft.url("main", "/");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                // Fresh connections spread over both workers.
                let mut hits = Vec::new();
                for _ in 0..25 {
                    let c = if i % 2 == 0 {
                        client::http1()
                    } else {
                        client::h2c()
                    };
                    let r = client::get(&c, &url).await.expect("response");
                    hits.push(
                        r.header("x-hits")
                            .expect("x-hits")
                            .parse::<u64>()
                            .expect("number"),
                    );
                }
                hits
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=200).collect::<Vec<u64>>(),
        "every increment counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_queue_items_reach_the_registered_consumer() {
    let app = Backend::start("app").await;
    let yaml = config(
        &app.endpoint(),
        &["q"],
        &format!(
            "  - {{ name: q, vm_id: queue, module: \"{}\" }}\n",
            filters::path("queue")
        ),
    );
    let weft = Weft::start(WEFT, &yaml);
    let c = client::http1();
    for i in 0..5 {
        client::get(&c, &weft.url("main", &format!("/item/{i}")))
            .await
            .expect("response");
    }
    let url = weft.url("main", "/item/last");
    let mut last = (0, String::new());
    for _ in 0..100 {
        let r = client::get(&c, &url).await.expect("response");
        last = (
            r.header("x-dequeued")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            r.header("x-last").unwrap_or_default().to_owned(),
        );
        if last.0 >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last.0 >= 6, "dequeued {last:?}");
    assert!(last.1.starts_with("/item/"), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_metrics_appear_on_the_metrics_endpoint() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &app.endpoint(),
            &["m"],
            &filter("m", &filters::path("metrics")),
        ),
    );
    let c = client::http1();
    for _ in 0..3 {
        client::get(&c, &weft.url("main", "/four"))
            .await
            .expect("response");
    }
    let r = post(&c, &weft.url("main", "/"), "x").await;
    assert_eq!(r.status, 200);
    let (_, text) = weft.admin_get("/metrics");
    for want in [
        r#"weft_wasm_requests_total{filter="m",method="GET"} 3"#,
        r#"weft_wasm_requests_total{filter="m",method="POST"} 1"#,
        r#"weft_wasm_path_length_count{filter="m"} 4"#,
        r#"weft_wasm_path_length_sum{filter="m"} 16.0"#,
        r#"weft_wasm_in_flight{filter="m"} 0"#,
        r#"weft_wasm_call_duration_seconds_count{filter="m"} 4"#,
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_timers_fire() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &app.endpoint(),
            &["t"],
            &filter("t", &filters::path("tick")),
        ),
    );
    let c = client::http1();
    let url = weft.url("main", "/");
    let mut ticks = 0;
    for _ in 0..100 {
        let r = client::get(&c, &url).await.expect("response");
        ticks = r
            .header("x-ticks")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ticks >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ticks >= 10, "{ticks} ticks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_have_envoys_names_and_encodings() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &app.endpoint(),
            &["p"],
            &filter("p", &filters::path("properties")),
        ),
    );
    let addr = weft.addr("main");
    let r = get_with(
        &client::http1(),
        &weft.url("main", "/p/q?x=1"),
        &[("user-agent", "tester")],
    )
    .await
    .expect("response");
    let p = |name: &str| {
        r.header(&format!("x-prop-{name}"))
            .unwrap_or("<missing>")
            .to_owned()
    };
    assert_eq!(p("request-path"), "/p/q?x=1");
    assert_eq!(p("request-url_path"), "/p/q");
    assert_eq!(p("request-query"), "x=1");
    assert_eq!(p("request-host"), addr.to_string());
    assert_eq!(p("request-method"), "GET");
    assert_eq!(p("request-scheme"), "http");
    assert_eq!(p("request-protocol"), "HTTP/1.1");
    assert_eq!(p("request-useragent"), "tester");
    assert_eq!(p("request-id").len(), 36, "a generated x-request-id");
    assert!(p("source-address").starts_with("127.0.0.1:"));
    assert_ne!(p("source-port"), "0");
    assert_eq!(p("destination-address"), addr.to_string());
    assert_eq!(p("destination-port"), addr.port().to_string());
    assert_ne!(p("connection-id"), "0");
    assert_eq!(p("request-size"), "0");
    assert_eq!(p("plugin_name"), "p");
    assert_eq!(
        p("plugin_root_id"),
        "<none>",
        "empty, which the SDK reads as none"
    );
    assert_eq!(p("plugin_vm_id"), "p");
    assert_eq!(p("listener_name"), "main");
    assert_eq!(p("cluster_name"), "app");
    assert_eq!(p("upstream-address"), app.endpoint());
    assert_eq!(p("response-code"), "200");
    assert_eq!(p("my_value"), "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_and_vm_configuration_reach_the_filter_and_a_rejected_one_fails_the_config() {
    let app = Backend::start("app").await;
    let module = filters::path("config");
    let with = |config: &str, vm_config: &str| {
        format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [cfg] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - name: cfg
    module: "{module}"
    config: "{config}"
    vm_config: "{vm_config}"
"#,
            app.endpoint()
        )
    };
    let mut weft = Weft::start(WEFT, &with("x-from-config=yes", "vm-one"));
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/"))
        .await
        .expect("response");
    assert_eq!(r.header("x-from-config"), Some("yes"));
    assert_eq!(r.header("x-vm-config"), Some("vm-one"));

    let (ok, err) = validate(&with("reject", "vm-one"));
    assert!(!ok);
    assert!(
        err.contains("filters[0].config: the plugin configuration was rejected (proxy_on_configure returned false)"),
        "{err}"
    );
    let (ok, err) = validate(&with("a=b", "fail"));
    assert!(!ok);
    assert!(
        err.contains("filters[0].vm_config: proxy_on_vm_start returned false"),
        "{err}"
    );

    // A rejected configuration changes nothing in a running proxy.
    let version = weft.version();
    weft.write_config_and_hup(&with("reject", "vm-one"));
    eventually(Duration::from_secs(10), "the reload is rejected", || {
        weft.log_contains("proxy_on_configure returned false")
    });
    assert_eq!(weft.version(), version);
    let r = client::get(&c, &weft.url("main", "/"))
        .await
        .expect("response");
    assert_eq!(r.header("x-from-config"), Some("yes"));

    // A new plugin configuration applies to new requests.
    weft.reload(&with("x-from-config=two", "vm-one"));
    let r = client::get(&c, &weft.url("main", "/"))
        .await
        .expect("response");
    assert_eq!(r.header("x-from-config"), Some("two"));
}

/// Two listeners: `main` with `chain`, `plain` without filters.
fn two_listeners(app: &str, chain: &str, filters: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [{chain}] }}
  - {{ name: plain, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
filters:
{filters}"#
    )
}

/// A guest that adds, replaces and removes request headers with names or values outside its
/// memory (past the end, wrapping around 4 GiB, a negative length) gets INVALID_MEMORY_ACCESS
/// for each, and the request's headers are as if it had not tried; its good edit still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_edits_outside_guest_memory_are_refused_and_change_nothing() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(
        dir.path(),
        "edits",
        &wasm_guests::header_edits_out_of_bounds(),
    );
    let weft = Weft::start(
        WEFT,
        &two_listeners(
            &app.endpoint(),
            "edits",
            &format!("  - {{ name: edits, module: \"{module}\" }}\n"),
        ),
    );
    for c in [client::http1(), client::h2c()] {
        let r = get_with(&c, &weft.url("main", "/"), &[("x-client", "1")])
            .await
            .expect("response");
        assert_eq!(r.status, 200);
        let seen = r.json()["headers"].clone();
        assert_eq!(seen["x-ok"], "yes", "{seen}");
        assert!(
            seen.get("x-wrong").is_none(),
            "an edit was not refused: {seen}"
        );
        assert_eq!(seen["x-client"], "1", "{seen}");
        let names: Vec<&String> = seen.as_object().expect("headers").keys().collect();
        assert!(
            names
                .iter()
                .all(|n| n.is_ascii() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic())),
            "{names:?}"
        );
    }
}

/// A filter that removes `x-request-id` is obeyed, as by Envoy's router: the upstream gets
/// none (weft does not set it again after the filters). Without the filter, the upstream gets
/// the client's well-formed id, or one weft made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_a_filter_removed_stays_removed() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "rid", &wasm_guests::request_id_remover());
    let weft = Weft::start(
        WEFT,
        &two_listeners(
            &app.endpoint(),
            "rid",
            &format!("  - {{ name: rid, module: \"{module}\" }}\n"),
        ),
    );
    for c in [client::http1(), client::h2c()] {
        for given in [None, Some("client-id-1")] {
            let headers: Vec<(&str, &str)> =
                given.map(|g| ("x-request-id", g)).into_iter().collect();
            let r = get_with(&c, &weft.url("main", "/"), &headers)
                .await
                .expect("response");
            let seen = r.json()["headers"].clone();
            assert!(seen.get("x-request-id").is_none(), "{given:?}: {seen}");
            let r = get_with(&c, &weft.url("plain", "/"), &headers)
                .await
                .expect("response");
            let id = r.json()["headers"]["x-request-id"].clone();
            match given {
                Some(g) => assert_eq!(id, g),
                None => assert_eq!(id.as_str().map(str::len), Some(36), "{id}"),
            }
        }
    }
}

/// weft with a filter that never returns (20 ms per call) on `main`, none on `plain`.
async fn spinning() -> (Backend, tempfile::TempDir, Weft) {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "loop", &wasm_guests::endless_loop());
    let weft = Weft::start(
        WEFT,
        &two_listeners(
            &app.endpoint(),
            "spin",
            &format!(
                "  - {{ name: spin, module: \"{module}\", limits: {{ cpu_per_call: 20ms }} }}\n"
            ),
        ),
    );
    (app, dir, weft)
}

/// A request through the spinning filter is answered 500 `filter_failed`, not left hanging.
async fn stopped_in_time(c: &client::Client, weft: &Weft) {
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        client::get(c, &weft.url("main", "/")),
    )
    .await
    .expect("answered, not hung")
    .expect("response");
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-weft-error"), Some("filter_failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped_and_the_proxy_keeps_serving() {
    let (_app, _dir, weft) = spinning().await;
    let c = client::http1();
    for _ in 0..3 {
        stopped_in_time(&c, &weft).await;
        let r = client::get(&c, &weft.url("plain", "/"))
            .await
            .expect("response");
        assert_eq!(r.status, 200);
    }
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"weft_wasm_traps_total{filter="spin",kind="deadline"} 3"#),
        "{metrics}"
    );
}

/// Wake-ups of weft's Wasm epoch ticker thread so far (its voluntary context switches).
fn ticker_wakeups(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for t in tasks {
        let dir = t.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "weft-wasm-epoch" {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).expect("status");
        return status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches");
    }
    panic!("no weft-wasm-epoch thread in {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_parks_the_epoch_ticker_and_a_runaway_call_still_stops() {
    // A 20 ms limit ticks every 2 ms: 1,000 wake-ups in two seconds if the ticker never rested.
    let (_app, _dir, weft) = spinning().await;
    let c = client::http1();
    let plain = client::get(&c, &weft.url("plain", "/"))
        .await
        .expect("response");
    assert_eq!(plain.status, 200);
    // Idle: the workers wake for their once-a-second chores, and the ticker ticks a few times
    // after each. A busy machine only makes it tick less.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ticker_wakeups(weft.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = ticker_wakeups(weft.pid()) - before;
    assert!(
        idle < 200,
        "the epoch ticker woke {idle} times in 2 s of idleness"
    );
    // From rest, a call that never returns is still stopped at its deadline.
    for _ in 0..2 {
        stopped_in_time(&c, &weft).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_contained() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "bomb", &wasm_guests::memory_bomb());
    let weft = Weft::start(
        WEFT,
        &two_listeners(
            &app.endpoint(),
            "bomb",
            &format!("  - {{ name: bomb, module: \"{module}\", limits: {{ memory: 32MiB }} }}\n"),
        ),
    );
    let c = client::http1();
    for _ in 0..4 {
        let r = client::get(&c, &weft.url("main", "/"))
            .await
            .expect("response");
        assert_eq!(r.status, 500);
        assert_eq!(r.header("x-weft-error"), Some("filter_failed"));
        assert_eq!(
            client::get(&c, &weft.url("plain", "/"))
                .await
                .expect("response")
                .status,
            200
        );
    }
    let (rss_kb, _) = weft.memory_kb();
    assert!(
        rss_kb < 256 * 1024,
        "resident {rss_kb} KiB: the VMs' memory is not capped"
    );
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"weft_wasm_traps_total{filter="bomb",kind="trap"} 4"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_closed_or_open_and_a_fresh_vm_serves_the_next_request() {
    let app = Backend::start("app").await;
    let module = filters::path("panic");
    let yaml = format!(
        r#"
listeners:
  - {{ name: closed, address: "127.0.0.1:0", routes: main, filters: [p-closed] }}
  - {{ name: open, address: "127.0.0.1:0", routes: main, filters: [p-open] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - {{ name: p-closed, module: "{module}" }}
  - {{ name: p-open, module: "{module}", fail: open }}
"#,
        app.endpoint()
    );
    let weft = Weft::start_with(WEFT, &yaml, &["--workers", "1"]);
    let c = client::http1();
    let instance = |r: &client::Reply| r.header("x-vm-instance").map(str::to_owned);

    let first = client::get(&c, &weft.url("closed", "/"))
        .await
        .expect("response");
    assert_eq!(first.status, 200);
    let r = get_with(&c, &weft.url("closed", "/"), &[("x-panic", "1")])
        .await
        .expect("response");
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-weft-error"), Some("filter_failed"));
    let next = client::get(&c, &weft.url("closed", "/"))
        .await
        .expect("response");
    assert_eq!(next.status, 200);
    assert!(instance(&next).is_some());
    assert_ne!(instance(&next), instance(&first), "a fresh VM");

    // Failing in the response path, with the request already forwarded: still 500.
    let r = get_with(&c, &weft.url("closed", "/"), &[("x-panic-late", "1")])
        .await
        .expect("response");
    assert_eq!(r.status, 500);

    let before = client::get(&c, &weft.url("open", "/"))
        .await
        .expect("response");
    let r = get_with(&c, &weft.url("open", "/"), &[("x-panic", "1")])
        .await
        .expect("response");
    assert_eq!(r.status, 200, "fail: open lets the request through");
    assert_eq!(instance(&r), None, "without the filter");
    let after = client::get(&c, &weft.url("open", "/"))
        .await
        .expect("response");
    assert!(instance(&after).is_some());
    assert_ne!(instance(&after), instance(&before), "a fresh VM");

    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"weft_wasm_traps_total{filter="p-closed",kind="trap"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"weft_wasm_traps_total{filter="p-open",kind="trap"} 1"#),
        "{metrics}"
    );
    assert!(
        weft.log_contains("asked to panic"),
        "the guest's panic message is logged"
    );
}

#[test]
fn modules_weft_cannot_run_are_rejected_at_validate() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = wasm_guests::write(dir.path(), "missing", &wasm_guests::missing_import());
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm at all").expect("write");
    let no_marker = dir.path().join("plain.wasm");
    std::fs::write(
        &no_marker,
        wat::parse_str("(module (memory (export \"memory\") 1))").expect("wat"),
    )
    .expect("write");
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [a, b, c, d, ghost] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["127.0.0.1:9"] }}
filters:
  - {{ name: a, module: "{missing}" }}
  - {{ name: b, module: "{}" }}
  - {{ name: c, module: "{}" }}
  - {{ name: d, module: "/nonexistent/filter.wasm" }}
"#,
        garbage.display(),
        no_marker.display()
    );
    let (ok, err) = validate(&yaml);
    assert!(!ok);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        "filters[0].module: the module imports what weft does not provide: env.proxy_does_not_exist"
    );
    assert!(
        lines[1].starts_with("filters[1].module: invalid Wasm module"),
        "{err}"
    );
    assert_eq!(
        lines[2],
        "filters[2].module: not a Proxy-Wasm module: it exports no ABI version marker (proxy_abi_version_0_2_1, _0_2_0 or _0_1_0)"
    );
    assert_eq!(
        lines[3],
        "filters[3].module: cannot read /nonexistent/filter.wasm: No such file or directory (os error 2)"
    );
    assert_eq!(
        lines[4],
        "listeners[0].filters[4]: unknown filter \"ghost\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_module_is_swapped_under_load_without_a_failed_request() {
    let app = Backend::start("app").await;
    let yaml = |module: &str| {
        config(
            &app.endpoint(),
            &["swap"],
            &filter("swap", &filters::path(module)),
        )
    };
    let mut weft = Weft::start(WEFT, &yaml("headers"));
    let url = weft.url("main", "/");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (url, stop, ok, failed) = (url.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let c = if i % 2 == 0 {
                    client::http1()
                } else {
                    client::h2c()
                };
                let mut errors = Vec::new();
                // Bounded by `stop` and by count.
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match client::get(&c, &url).await {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => {
                            errors.push(format!("{} {:?}", r.status, r.text()));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            errors.push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    weft.reload(&yaml("local"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    weft.reload(&yaml("headers"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.expect("task"));
    }
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let r = client::get(&client::http1(), &url).await.expect("response");
    assert_eq!(
        r.header("x-wasm-response"),
        Some("seen"),
        "the last module serves"
    );
}

/// The callbacks of a GET, in Envoy's order.
const GET_ORDER: [&str; 7] = [
    "context_create",
    "request_headers+eos",
    "response_headers",
    "response_body+eos",
    "log",
    "done",
    "delete",
];

/// The callbacks of a request with a body for a module that skips its body callbacks.
const HEADERS_ONLY: [&str; 6] = [
    "context_create",
    "request_headers",
    "response_headers",
    "log",
    "done",
    "delete",
];

/// The `order:` lines logged from `from` on, once the stream's `order:delete` is there.
fn order_lines(weft: &Weft, from: usize) -> Vec<String> {
    let mut lines = Vec::new();
    eventually(Duration::from_secs(10), "the stream ends", || {
        lines = weft.log_lines()[from..]
            .iter()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("order:")))
            .filter(|w| !w.starts_with("order:root"))
            .map(|w| w.trim_start_matches("order:").to_owned())
            .collect();
        lines.last().is_some_and(|l| l == "delete")
    });
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_come_in_envoys_order() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let order = wasm_guests::write(dir.path(), "order", &wasm_guests::order_logger());
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [o] }}
  - {{ name: local, address: "127.0.0.1:0", routes: main, filters: [o, l] }}
  - {{ name: broken, address: "127.0.0.1:0", routes: down, filters: [o] }}
routes:
  main:
    - to: [{{ cluster: app }}]
  down:
    - to: [{{ cluster: down }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
  - {{ name: down, endpoints: ["127.0.0.1:1"], connect_timeout: 1s }}
filters:
  - {{ name: o, module: "{order}" }}
  - {{ name: l, module: "{}" }}
"#,
        app.endpoint(),
        filters::path("local")
    );
    let weft = Weft::start_with(WEFT, &yaml, &["--workers", "1"]);
    let c = client::http1();
    // Warm the VM up, so its start-up lines are out of the way.
    client::get(&c, &weft.url("main", "/"))
        .await
        .expect("response");
    order_lines(&weft, 0);

    let mark = weft.log_lines().len();
    client::get(&c, &weft.url("main", "/"))
        .await
        .expect("response");
    assert_eq!(order_lines(&weft, mark), GET_ORDER, "GET");

    let mark = weft.log_lines().len();
    post(&c, &weft.url("main", "/"), "a body").await;
    assert_eq!(
        order_lines(&weft, mark),
        [
            "context_create",
            "request_headers",
            "request_body+eos",
            "response_headers",
            "response_body+eos",
            "log",
            "done",
            "delete"
        ],
        "POST"
    );

    let mark = weft.log_lines().len();
    let r = client::get(&c, &weft.url("local", "/deny"))
        .await
        .expect("response");
    assert_eq!(r.status, 403);
    assert_eq!(
        order_lines(&weft, mark),
        GET_ORDER,
        "local reply from the next filter"
    );

    let mark = weft.log_lines().len();
    let r = client::get(&c, &weft.url("broken", "/"))
        .await
        .expect("response");
    assert_eq!(r.status, 503);
    assert_eq!(order_lines(&weft, mark), GET_ORDER, "upstream error");
}

/// A listener per filter of `names` (named as the filter), all routing to `app`.
fn listener_per_filter(app: &Backend, names: &[&str], filters: &str) -> String {
    let listeners: String = names
        .iter()
        .map(|name| {
            format!(
                "  - {{ name: {name}, address: \"127.0.0.1:0\", routes: main, filters: [{name}] }}\n"
            )
        })
        .collect();
    format!(
        "listeners:\n{listeners}routes:\n  main:\n    - to: [{{ cluster: app }}]\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\nfilters:\n{filters}",
        app.endpoint()
    )
}

/// The words of the log lines from `from` on that start with `prefix`.
fn logged_words(weft: &Weft, from: usize, prefix: &str) -> Vec<String> {
    weft.log_lines()[from..]
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// A module may say which of its callbacks do nothing (`weft.skip_callbacks`); weft then does
/// not call them, and what they would have let through goes on: a body that no filter looks
/// at goes around the filters and is still counted in `request.size` and `response.size`.
/// A list with a name weft does not know, a callback that cannot be skipped, or arguments out
/// of bounds or too long is refused as a whole, and every callback is called as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_a_module_says_do_nothing_are_not_called() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let skipping = |name: &str, args: &str, at: Option<(i32, i32)>| {
        let path = wasm_guests::write(
            dir.path(),
            name,
            &wasm_guests::skipping_order_logger(args, at),
        );
        format!("  - {{ name: {name}, module: \"{path}\" }}\n")
    };
    let refused = [
        "unknown",
        "create",
        "empty",
        "oversized",
        "outside",
        "badret",
    ];
    let mut filters = skipping(
        "quiet",
        "proxy_on_response_headers, proxy_on_response_body,proxy_on_response_trailers,proxy_on_log,proxy_on_done",
        None,
    );
    filters += &skipping(
        "around",
        "proxy_on_request_body,proxy_on_request_trailers,proxy_on_response_body,proxy_on_response_trailers",
        None,
    );
    // Bodies skipped but not trailers: the bodies are still watched (for trailers), and their
    // data goes through as it came.
    filters += &skipping(
        "bodies",
        "proxy_on_request_body,proxy_on_response_body",
        None,
    );
    filters += &skipping("unknown", "proxy_on_log,proxy_on_bogus", None);
    filters += &skipping("create", "proxy_on_context_create", None);
    filters += &skipping("empty", "", None);
    filters += &skipping("oversized", "proxy_on_log", Some((4160, 5000)));
    filters += &skipping("outside", "proxy_on_log", Some((0x7fff_0000, 12)));
    // A valid list, but nowhere to put the (empty) result: refused before anything changes.
    let bad_ret =
        wasm_guests::foreign_order_logger("weft.skip_callbacks", "proxy_on_log", None, 0x7fff_0000);
    let path = wasm_guests::write(dir.path(), "badret", &bad_ret);
    filters += &format!("  - {{ name: badret, module: \"{path}\" }}\n");
    let names: Vec<&str> = ["quiet", "around", "bodies"]
        .iter()
        .chain(&refused)
        .copied()
        .collect();
    let yaml = listener_per_filter(&app, &names, &filters);
    let weft = Weft::start_with(WEFT, &yaml, &["--workers", "1"]);
    let c = client::http1();
    // Every VM up, and its answer to the call logged.
    for name in ["quiet", "around", "bodies"].iter().chain(&refused) {
        let r = client::get(&c, &weft.url(name, "/"))
            .await
            .expect("response");
        assert_eq!(r.status, 200, "{name}");
    }
    eventually(Duration::from_secs(10), "the last VM's stream ends", || {
        logged_words(&weft, 0, "order:delete").len() == 3 + refused.len()
    });
    let ok = logged_words(&weft, 0, "skip:ok").len();
    let no = logged_words(&weft, 0, "skip:refused").len();
    assert!(ok >= 3 && no >= refused.len(), "ok {ok}, refused {no}");

    let mark = weft.log_lines().len();
    let r = client::get(&c, &weft.url("quiet", "/q"))
        .await
        .expect("GET");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"/q\""), "{}", r.text());
    assert_eq!(
        order_lines(&weft, mark),
        ["context_create", "request_headers+eos", "delete"],
        "GET, the response side skipped"
    );
    let mark = weft.log_lines().len();
    let r = post(&c, &weft.url("quiet", "/q"), "a body").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        order_lines(&weft, mark),
        [
            "context_create",
            "request_headers",
            "request_body+eos",
            "delete"
        ],
        "POST, the response side skipped"
    );

    let mark = weft.log_lines().len();
    let r = post(&c, &weft.url("around", "/a"), "a body").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"/a\""), "{}", r.text());
    assert_eq!(
        order_lines(&weft, mark),
        HEADERS_ONLY,
        "POST, bodies skipped"
    );
    assert_eq!(
        logged_words(&weft, mark, "size:"),
        [
            "size:request=6".to_owned(),
            format!("size:response={}", r.body.len())
        ],
        "bodies that went around the filter are counted"
    );

    // Many frames each way, none shown to the filter, all of them through and counted.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mark = weft.log_lines().len();
    let r = post(&c, &weft.url("bodies", "/echo"), big.clone()).await;
    assert_eq!(r.status, 200);
    assert!(r.body[..] == big[..], "the body came back as sent");
    assert_eq!(
        order_lines(&weft, mark),
        HEADERS_ONLY,
        "POST, body callbacks skipped"
    );
    assert_eq!(
        logged_words(&weft, mark, "size:"),
        ["size:request=300000", "size:response=300000"],
    );

    for name in refused {
        let mark = weft.log_lines().len();
        let r = client::get(&c, &weft.url(name, "/")).await.expect("GET");
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(
            order_lines(&weft, mark),
            GET_ORDER,
            "{name}: refused, every callback is called"
        );
    }
}

/// A module may ask weft to record Istio's golden metrics for it (`weft.golden_metrics`):
/// weft counts and measures every request of the plugin itself, labelled as the telemetry
/// filter labels them, with at most the asked number of label sets (beyond, `_other`). Bad
/// arguments are refused and record nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_records_golden_metrics_a_module_asks_for() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let asking = |name: &str, args: &str| {
        let module = wasm_guests::foreign_order_logger("weft.golden_metrics", args, None, 512);
        let path = wasm_guests::write(dir.path(), name, &module);
        format!("  - {{ name: {name}, module: \"{path}\" }}\n")
    };
    let cases = [
        ("cluster", "200\n"),
        ("capped", "1\nshop"),
        ("zero", "0\nshop"),
        ("huge", "801\n"),
        ("word", "ten\n"),
        ("one_line", "20"),
    ];
    let filters: String = cases
        .iter()
        .map(|(name, args)| asking(name, args))
        .collect();
    let names: Vec<&str> = cases.iter().map(|(name, _)| *name).collect();
    let yaml = listener_per_filter(&app, &names, &filters);
    let weft = Weft::start_with(WEFT, &yaml, &["--workers", "1"]);
    let c = client::http1();
    for (name, _) in cases {
        for path in ["/", "/status/404", "/"] {
            client::get(&c, &weft.url(name, path))
                .await
                .expect("answer");
        }
    }
    let counted = |metrics: &str, filter: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("weft_wasm_requests_total{{filter=\"{filter}\"")))
            .map(str::to_owned)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let set = |lines: &[&str]| {
        lines
            .iter()
            .map(|l| (*l).to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mut metrics = String::new();
    eventually(Duration::from_secs(20), "every request counted", || {
        metrics = weft.admin_get("/metrics").1;
        counted(&metrics, "capped").len() == 2 && counted(&metrics, "cluster").len() == 2
    });
    assert_eq!(
        counted(&metrics, "cluster"),
        set(&[
            r#"weft_wasm_requests_total{filter="cluster",source_workload="unknown",source_namespace="unknown",destination_workload="app",response_code="200",grpc_response_status=""} 2"#,
            r#"weft_wasm_requests_total{filter="cluster",source_workload="unknown",source_namespace="unknown",destination_workload="app",response_code="404",grpc_response_status=""} 1"#,
        ]),
        "{metrics}"
    );
    assert_eq!(
        counted(&metrics, "capped"),
        set(&[
            r#"weft_wasm_requests_total{filter="capped",source_workload="unknown",source_namespace="unknown",destination_workload="shop",response_code="200",grpc_response_status=""} 2"#,
            r#"weft_wasm_requests_total{filter="capped",source_workload="_other",source_namespace="_other",destination_workload="_other",response_code="_other",grpc_response_status="_other"} 1"#,
        ]),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with(
            r#"weft_wasm_request_duration_milliseconds_count{filter="cluster",source_workload="unknown",destination_workload="app",response_code="200"} 2"#
        )),
        "{metrics}"
    );
    for (name, _) in &cases[2..] {
        assert!(counted(&metrics, name).is_empty(), "{name}: {metrics}");
    }
    assert_eq!(logged_words(&weft, 0, "skip:ok").len(), 2);
    assert!(logged_words(&weft, 0, "skip:refused").len() >= 4);
}
