//! Defaults that work for the common case, as a new user tries them: an HTTP/1.1 backend
//! behind weft whatever protocol the client speaks; TLS endpoints by ALPN; a clear error for
//! gRPC to an HTTP/1.1 cluster; hosts matched as hosts; HTTP/2's field rules.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use weft_testkit::client::{self, curl};
use weft_testkit::tls::{Pki, server_config};
use weft_testkit::{Backend, Weft};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// curl over TLS offers h2 by ALPN, as browsers do; h2c by prior knowledge too: with clusters
/// left at their default, an HTTP/1.1-only backend answers both (it got 502 upstream_reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_backend_serves_http2_clients_by_default() {
    let backend = Backend::start_http1_only("old").await;
    let pki = Pki::new("edge");
    let cert = pki.issue("edge", &["edge.test"]);
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: plain, address: "127.0.0.1:0", routes: main }}
  - {{ name: tls, address: "127.0.0.1:0", routes: main, tls: {{ cert: {}, key: {} }} }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
            path(&cert.cert),
            path(&cert.key),
            backend.endpoint()
        ),
    );
    let r = client::get(&client::h2c(), &weft.url("plain", "/h2c"))
        .await
        .expect("h2c");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    let addr = weft.addr("tls");
    let (ok, out, err) = curl(&[
        "--cacert",
        &path(&pki.ca),
        "--resolve",
        &format!("edge.test:{}:127.0.0.1", addr.port()),
        "-w",
        "\n%{http_code} %{http_version}",
        &format!("https://edge.test:{}/alpn", addr.port()),
    ]);
    assert!(ok, "{err}");
    assert!(out.ends_with("\n200 2"), "{out}");
    assert!(out.contains("\"version\":\"HTTP/1.1\""), "{out}");
}

/// A TLS cluster at its default speaks what the endpoint chooses by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clusters_speak_what_alpn_settles() {
    let pki = Pki::new("upstream");
    let cert = pki.issue("backend", &["backend.test"]);
    let both = Backend::start_tls("both", server_config(&cert, None)).await;
    let mut h1_only = (*server_config(&cert, None)).clone();
    h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
    let old = Backend::start_tls("old", Arc::new(h1_only)).await;
    let ca = path(&pki.ca);
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - match: {{ path_prefix: /old }}
      to: [{{ cluster: old }}]
    - to: [{{ cluster: both }}]
clusters:
  - {{ name: both, endpoints: ["{}"], tls: {{ sni: backend.test, ca: {ca} }} }}
  - {{ name: old, endpoints: ["{}"], tls: {{ sni: backend.test, ca: {ca} }} }}
"#,
            both.endpoint(),
            old.endpoint()
        ),
    );
    let c = client::http1();
    for _ in 0..3 {
        let r = client::get(&c, &weft.url("main", "/x?y=1"))
            .await
            .expect("both");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["version"], "HTTP/2.0");
        assert_eq!(r.json()["path"], "/x?y=1");
        let r = client::get(&c, &weft.url("main", "/old"))
            .await
            .expect("old");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["version"], "HTTP/1.1");
    }
}

/// gRPC to a cluster that speaks HTTP/1.1: a clear error at once, not a hang or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_to_an_http1_cluster_is_a_clear_error() {
    let backend = Backend::start_http1_only("old").await;
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
            backend.endpoint()
        ),
    );
    let req = Request::post(weft.url("main", "/echo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("request");
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client::send(&client::h2c(), req),
    )
    .await
    .expect("answered at once")
    .expect("response");
    assert_eq!(r.header("x-weft-error"), Some("upstream_protocol_mismatch"));
    let status = r
        .header("grpc-status")
        .or_else(|| r.trailers.as_ref()?.get("grpc-status")?.to_str().ok());
    assert_eq!(status, Some("13"));
    assert_eq!(backend.requests(), 0);
}

/// HTTP/2 requests whose `host` names another authority than `:authority`, or whose field
/// values carry leading or trailing whitespace, are malformed (400); hosts are matched as
/// hosts; header names with underscores are dropped by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_fields_are_read_strictly() {
    let backend = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - match: {{ host: blocked.test }}
      direct_response: {{ status: 403, body: "blocked\n" }}
    - match: {{ host: "fqdn.test." }}
      direct_response: {{ status: 418 }}
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
            backend.endpoint()
        ),
    );
    let addr = weft.addr("main");
    let c = client::http1();
    for host in [
        "blocked.test",
        "Blocked.TEST",
        "blocked.test.",
        "BLOCKED.test.:80",
    ] {
        let r = client::get_with(&c, &weft.url("main", "/"), &[("host", host)])
            .await
            .expect("response");
        assert_eq!(r.status, 403, "{host}");
    }
    let r = client::get_with(&c, &weft.url("main", "/"), &[("host", "fqdn.test")])
        .await
        .expect("response");
    assert_eq!(r.status, 418);
    // Underscores: dropped before anything sees them (a backend reading x_user as x-user
    // cannot be handed a value weft never checked).
    let r = client::get_with(&c, &weft.url("main", "/"), &[("x_user", "admin")])
        .await
        .expect("response");
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("x_user").is_none(), "{}", r.text());

    // HTTP/2 with the h2 crate, which sends what it is given.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (h2, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.expect("ready");
    let mut status_of = async |req: Request<()>| {
        let (resp, _) = h2.send_request(req, true).expect("send");
        resp.await.expect("response").status().as_u16()
    };
    let ok = Request::get(format!("http://{addr}/"))
        .body(())
        .expect("request");
    assert_eq!(status_of(ok).await, 200);
    let same_host = Request::get(format!("http://{addr}/"))
        .header("host", addr.to_string())
        .body(())
        .expect("request");
    assert_eq!(status_of(same_host).await, 200);
    let other_host = Request::get(format!("http://{addr}/"))
        .header("host", "blocked.test")
        .body(())
        .expect("request");
    assert_eq!(status_of(other_host).await, 400);
    for padded in [" value", "value ", "\tvalue"] {
        let req = Request::get(format!("http://{addr}/"))
            .header("x-padded", padded)
            .body(())
            .expect("request");
        assert_eq!(status_of(req).await, 400, "{padded:?}");
    }
}
