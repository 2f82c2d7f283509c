//! HTTP/1.1 and h2c through a real weft process to real backends.

use weft_testkit::client::{self, curl};
use weft_testkit::{Backend, Weft};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn one_cluster(backend: &Backend) -> String {
    format!(
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
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_end_to_end() {
    let backend = Backend::start("b1").await;
    let weft = Weft::start(WEFT, &one_cluster(&backend));

    let r = client::get(&client::http1(), &weft.url("main", "/hello?x=1"))
        .await
        .expect("h1");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["backend"], "b1");
    assert_eq!(j["path"], "/hello?x=1");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"], "http");
    assert_eq!(
        j["headers"]["x-request-id"].as_str().map(str::len),
        Some(36)
    );

    let r = client::get(&client::h2c(), &weft.url("main", "/h2"))
        .await
        .expect("h2c");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["path"], "/h2");
    // `downstream` protocol: h2c in, h2c out.
    assert_eq!(j["version"], "HTTP/2.0");

    let (ok, out, err) = curl(&["-i", &weft.url("main", "/curl")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (ok, out, err) = curl(&["-i", "--http2-prior-knowledge", &weft.url("main", "/curl2")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
}
