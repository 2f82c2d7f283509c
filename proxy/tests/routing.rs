//! Routing through a real weft: matching on host, path, regex, method, headers and query;
//! rewrites, header edits, redirects, direct responses, weighted splits, no route.

use weft_testkit::client::{self, get_with};
use weft_testkit::{Backend, Weft};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

struct Setup {
    weft: Weft,
    _backends: Vec<Backend>,
}

async fn setup() -> Setup {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - name: exact-host
      match: {{ host: api.example.com, path: /exact }}
      to: [{{ cluster: a }}]
    - name: wildcard-host
      match: {{ host: "*.svc.local" }}
      to: [{{ cluster: b }}]
    - name: users-regex
      match: {{ path_regex: "/users/[0-9]+" }}
      to: [{{ cluster: c }}]
    - name: canary
      match: {{ path_prefix: /api/, headers: {{ x-canary: "1" }} }}
      to: [{{ cluster: b }}]
    - name: header-regex-and-present
      match:
        path_prefix: /api/
        headers:
          x-version: {{ regex: "v[23]" }}
          x-team: {{ present: true }}
      to: [{{ cluster: c }}]
    - name: query
      match: {{ path_prefix: /search, query: {{ debug: "1", q: {{ prefix: "weft" }} }} }}
      to: [{{ cluster: c }}]
    - name: method
      match: {{ path_prefix: /api/, method: [POST, PUT] }}
      to: [{{ cluster: c }}]
    - name: api
      match: {{ path_prefix: /api/ }}
      to: [{{ cluster: a }}]
      prefix_rewrite: /v2/
      host_rewrite: backend.internal
      request_headers:
        set: {{ x-route: api }}
        add: {{ x-added: "1" }}
        remove: [x-secret]
      response_headers:
        set: {{ x-served-by: weft }}
        remove: [x-backend]
    - name: old
      match: {{ path_prefix: /old/ }}
      redirect: {{ prefix_rewrite: /new/, code: 308 }}
    - name: secure
      match: {{ path: /login }}
      redirect: {{ scheme: https, host: secure.example.com }}
    - name: health
      match: {{ path: /healthz }}
      direct_response: {{ status: 200, body: "ok\n" }}
      response_headers: {{ set: {{ cache-control: no-store }} }}
    - name: split
      match: {{ path_prefix: /split }}
      to: [{{ cluster: a, weight: 80 }}, {{ cluster: b, weight: 20 }}]
clusters:
  - {{ name: a, endpoints: ["{}"] }}
  - {{ name: b, endpoints: ["{}"] }}
  - {{ name: c, endpoints: ["{}"] }}
"#,
        a.endpoint(),
        b.endpoint(),
        c.endpoint()
    );
    Setup {
        weft: Weft::start(WEFT, &yaml),
        _backends: vec![a, b, c],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_host_path_regex_headers_query_and_method() {
    let s = setup().await;
    let c = client::http1();
    let backend_for = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let url = s.weft.url("main", path);
        let c = c.clone();
        async move {
            let r = get_with(&c, &url, headers).await.expect("request");
            (
                r.status.as_u16(),
                r.header("x-backend").unwrap_or("-").to_owned(),
            )
        }
    };

    assert_eq!(
        backend_for("/exact", &[("host", "api.example.com")]).await,
        (200, "a".into())
    );
    assert_eq!(
        backend_for("/exact", &[("host", "API.Example.com:8080")]).await,
        (200, "a".into())
    );
    assert_eq!(
        backend_for("/any", &[("host", "reviews.svc.local")]).await,
        (200, "b".into())
    );
    assert_eq!(backend_for("/users/42", &[]).await, (200, "c".into()));
    assert_eq!(
        backend_for("/api/x", &[("x-canary", "1")]).await,
        (200, "b".into())
    );
    assert_eq!(
        backend_for("/api/x", &[("x-version", "v3"), ("x-team", "t")]).await,
        (200, "c".into())
    );
    // Regex is anchored; presence is required.
    assert_eq!(
        backend_for("/api/x", &[("x-version", "v33"), ("x-team", "t")])
            .await
            .0,
        200
    );
    assert_eq!(
        backend_for("/search?q=weft-proxy&debug=1", &[]).await,
        (200, "c".into())
    );

    // No route: 404 with the cause.
    let r = get_with(&c, &s.weft.url("main", "/search?debug=0"), &[])
        .await
        .expect("request");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-weft-error"), Some("no_route"));

    // Method match: POST goes to c.
    let req = http::Request::post(s.weft.url("main", "/api/items"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("request");
    let r = client::send(&c, req).await.expect("post");
    assert_eq!(r.header("x-backend"), Some("c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_header_edits() {
    let s = setup().await;
    let c = client::http1();
    let r = get_with(
        &c,
        &s.weft.url("main", "/api/users?page=2"),
        &[("x-secret", "token"), ("x-route", "client-value")],
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200);
    // Response edits: x-backend removed, x-served-by set.
    assert_eq!(r.header("x-backend"), None);
    assert_eq!(r.header("x-served-by"), Some("weft"));
    let j = r.json();
    assert_eq!(j["backend"], "a");
    assert_eq!(j["path"], "/v2/users?page=2");
    assert_eq!(j["headers"]["host"], "backend.internal");
    assert_eq!(j["headers"]["x-route"], "api");
    assert_eq!(j["headers"]["x-added"], "1");
    assert!(j["headers"].get("x-secret").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_direct_responses() {
    let s = setup().await;
    let c = client::http1();
    let r = get_with(
        &c,
        &s.weft.url("main", "/old/page?x=1"),
        &[("host", "site.example:8080")],
    )
    .await
    .expect("request");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("http://site.example:8080/new/page?x=1")
    );

    let r = get_with(
        &c,
        &s.weft.url("main", "/login"),
        &[("host", "site.example:8080")],
    )
    .await
    .expect("request");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://secure.example.com/login")
    );

    let r = get_with(&c, &s.weft.url("main", "/healthz"), &[])
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok\n");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("content-length"), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_within_statistical_bounds() {
    let s = setup().await;
    let c = client::http1();
    let url = s.weft.url("main", "/split");
    let n = 2000;
    let mut to_a = 0;
    for _ in 0..n {
        let r = client::get(&c, &url).await.expect("request");
        assert_eq!(r.status, 200);
        if r.header("x-backend") == Some("a") {
            to_a += 1;
        }
    }
    // Binomial(2000, 0.8): mean 1600, sd ≈ 17.9; ±5 sd.
    assert!(
        (1510..=1690).contains(&to_a),
        "{to_a} of {n} went to the weight-80 cluster"
    );
}
