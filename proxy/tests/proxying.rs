//! HTTP/1.1 and h2c through a real weft process to real backends: protocol translation,
//! headers, trailers, `Expect: 100-continue`, failures, and large bodies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use weft_testkit::client::{self, curl, get_with};
use weft_testkit::{Backend, RefusingPort, Weft};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn one_cluster(backend: &str, protocol: &str, extra_route: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
      {extra_route}
clusters:
  - {{ name: app, endpoints: ["{backend}"], protocol: {protocol}, connect_timeout: 1s }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_end_to_end() {
    let backend = Backend::start("b1").await;
    let weft = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "downstream", ""));

    let r = get_with(
        &client::http1(),
        &weft.url("main", "/hello?x=1"),
        &[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "must not pass"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "10.1.2.3"),
            ("x-request-id", "given-id"),
        ],
    )
    .await
    .expect("h1");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["backend"], "b1");
    assert_eq!(j["path"], "/hello?x=1");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"], "http");
    assert_eq!(j["headers"]["x-request-id"], "given-id");
    assert!(j["headers"].get("x-hop").is_none(), "{j}");
    assert!(j["headers"].get("keep-alive").is_none(), "{j}");

    let r = client::get(&client::h2c(), &weft.url("main", "/h2"))
        .await
        .expect("h2c");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["path"], "/h2");
    // `downstream` protocol: h2c in, h2c out.
    assert_eq!(j["version"], "HTTP/2.0");
    assert_eq!(
        j["headers"]["x-request-id"].as_str().map(str::len),
        Some(36)
    );

    let (ok, out, err) = curl(&["-i", &weft.url("main", "/curl")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (ok, out, err) = curl(&["-i", "--http2-prior-knowledge", &weft.url("main", "/curl2")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_are_translated_both_ways() {
    let backend = Backend::start("b").await;
    let to_h2 = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "http2", ""));
    let r = client::get(&client::http1(), &to_h2.url("main", "/x"))
        .await
        .expect("h1 → h2");
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(
        r.json()["headers"]["host"],
        serde_json::Value::Null,
        "h2 upstream uses :authority"
    );

    let to_h1 = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "http1", ""));
    let r = client::get(&client::h2c(), &to_h1.url("main", "/y"))
        .await
        .expect("h2 → h1");
    let j = r.json();
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["headers"]["host"], to_h1.addr("main").to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_through() {
    let backend = Backend::start("t").await;
    let weft = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "downstream", ""));
    let r = client::get(&client::h2c(), &weft.url("main", "/trailers"))
        .await
        .expect("h2c");
    assert_eq!(r.text(), "ok");
    let trailers = r.trailers.expect("trailers arrive");
    assert_eq!(trailers["x-trailer"], "done");

    // HTTP/1.1 with chunked encoding carries them too, when the client says it accepts them.
    let weft1 = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "http1", ""));
    let r = get_with(
        &client::http1(),
        &weft1.url("main", "/trailers"),
        &[("te", "trailers")],
    )
    .await
    .expect("h1");
    assert_eq!(r.text(), "ok");
    assert_eq!(r.trailers.expect("trailers arrive")["x-trailer"], "done");
}

/// A raw HTTP/1.1 exchange: writes `head`, reads until `until` has been seen.
fn raw_until(stream: &mut TcpStream, until: &str) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(until) {
        let n = stream.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "closed before {until:?}; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body() {
    let backend = Backend::start("e").await;
    let weft = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "http1", ""));
    let addr = weft.addr("main");
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .expect("write head");
        // Nothing of the body is sent until the 100 arrives; the backend's own 200 head may
        // follow it at once (it streams the echo), so read the transcript as a whole.
        let mut transcript = raw_until(&mut s, "\r\n\r\n");
        assert!(
            transcript.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
            "{transcript:?}"
        );
        s.write_all(b"hello").expect("write body");
        if !transcript.contains("hello") {
            transcript.push_str(&raw_until(&mut s, "hello"));
        }
        let after = &transcript["HTTP/1.1 100 Continue\r\n\r\n".len()..];
        assert!(after.starts_with("HTTP/1.1 200"), "{transcript:?}");
    })
    .await
    .expect("raw client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_times_out_with_504() {
    let backend = Backend::start("slow").await;
    let weft = Weft::start(
        WEFT,
        &one_cluster(&backend.endpoint(), "http1", "timeout: 200ms"),
    );
    let r = client::get(&client::http1(), &weft.url("main", "/delay/3000"))
        .await
        .expect("request");
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-weft-error"), Some("upstream_timeout"));
    // The same route still serves fast requests.
    let r = client::get(&client::http1(), &weft.url("main", "/delay/1"))
        .await
        .expect("request");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoint_is_503_with_its_cause() {
    let closed = RefusingPort::new().expect("a refusing port");
    let weft = Weft::start(WEFT, &one_cluster(&closed.addr().to_string(), "http1", ""));
    for c in [client::http1(), client::h2c()] {
        let r = client::get(&c, &weft.url("main", "/"))
            .await
            .expect("request");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-weft-error"), Some("upstream_connect_failed"));
        assert_eq!(r.text(), "upstream connect error: connection refused\n");
    }
    // Each request tried three times (the default retries connect failures twice).
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.contains("weft_upstream_connections_failed_total{cluster=\"app\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_upstream_retries_total{cluster=\"app\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "weft_http_proxy_errors_total{listener=\"main\",cause=\"upstream_connect_failed\"} 2"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_stream_through_in_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let backend = Backend::start("big").await;
    let weft = Weft::start(WEFT, &one_cluster(&backend.endpoint(), "downstream", ""));
    let (rss_before, _) = weft.memory_kb();

    // Download, HTTP/1.1 and h2c.
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let url = weft.url("main", &format!("/bytes/{SIZE}"));
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            curl(&[
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                &url,
            ])
        })
        .await
        .expect("curl");
        assert!(ok, "{err}");
        assert_eq!(out, format!("200 {SIZE}"));
    }

    // Upload (chunked, streamed by curl from a file), counted by the backend.
    let dir = tempfile_dir();
    let file = dir.join("upload.bin");
    {
        let mut f = std::fs::File::create(&file).expect("create");
        let chunk = vec![b'u'; 1024 * 1024];
        for _ in 0..100 {
            f.write_all(&chunk).expect("write");
        }
    }
    let url = weft.url("main", "/count");
    let path = file.display().to_string();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        curl(&["-H", "Transfer-Encoding: chunked", "-T", &path, &url])
    })
    .await
    .expect("curl");
    assert!(ok, "{err}");
    assert_eq!(out, SIZE.to_string());
    std::fs::remove_dir_all(&dir).ok();

    let (_, peak) = weft.memory_kb();
    eprintln!("RSS at start {rss_before} KiB, peak {peak} KiB");
    // 300 MB went through; the proxy's peak resident memory grew by a few buffers at most.
    assert!(
        peak < rss_before + 40 * 1024,
        "peak RSS {peak} KiB vs {rss_before} KiB at start: bodies are being buffered"
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("weft-upload-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
