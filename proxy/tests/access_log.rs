//! Native access logs through a real weft: one JSON line per request in the listener's file,
//! whatever the request says (hostile bytes, duplicates, an unroutable or refused request), with
//! the bytes counted both ways; fields from a filter; the file reopened on SIGUSR1; every line
//! written before the process exits; and a bad `access_log` refused by validation and reloads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_testkit::{Backend, Weft, eventually, validate};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn config(app: &Backend, access_log: &str) -> String {
    format!(
        r#"
listeners:
  - name: main
    address: "127.0.0.1:0"
    routes: main
    access_log: {access_log}
routes:
  main:
    - match: {{ path_prefix: /app }}
      to: [{{ cluster: app }}]
    - match: {{ path_prefix: /consume }}
      to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.endpoint()
    )
}

fn log_path(weft: &Weft) -> PathBuf {
    weft.config_path().with_file_name("access.log")
}

/// The lines of the access log, parsed (each must be one JSON object).
fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// Waits until the file has `n` lines (the writer batches for up to 100 ms), and returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    eventually(Duration::from_secs(20), "access log lines", || {
        lines(path).len() >= n
    });
    lines(path)
}

/// Sends raw bytes on a fresh connection and reads the answer until the server closes.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_json_line_whatever_it_says() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(&app, "{ path: access.log, headers: [x-tenant, x-absent] }"),
    );
    let path = log_path(&weft);
    let addr = weft.addr("main");

    // Hostile bytes where a client controls them: quotes, backslashes, a forged field, a tab,
    // bytes that are not UTF-8; the logged header duplicated.
    let mut req = Vec::new();
    // (The backend reads the whole body before it answers.)
    req.extend_from_slice(b"POST /consume/200?a=%22,%5C'x'&a=2 HTTP/1.1\r\n");
    req.extend_from_slice(b"Host: example.test\r\n");
    req.extend_from_slice(b"User-Agent: ua\"\\\t\xff\xfe end\r\n");
    req.extend_from_slice(b"X-Tenant: first\"}\r\nX-Tenant: second\r\n");
    req.extend_from_slice(b"X-Request-Id: abc-123\r\n");
    req.extend_from_slice(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    req.extend_from_slice(b"4\r\nabcd\r\n6\r\nefghij\r\n0\r\n\r\n");
    let answer = exchange(addr, &req);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let sent = answer.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());

    // No route: answered by weft, logged all the same.
    let answer = exchange(
        addr,
        b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // Another spelling of a routed path: the canonical path, and the client's.
    let answer = exchange(
        addr,
        b"GET /%61pp//x/../y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Refused by the check stage (an encoded NUL): logged with the path as sent.
    let answer = exchange(
        addr,
        b"GET /app/%00x/%2e%2e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let all = wait_lines(&path, 4);
    assert_eq!(all.len(), 4, "{all:?}");
    let v = &all[0];
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/consume/200?a=%22,%5C'x'&a=2");
    assert!(v.get("original_path").is_none(), "canonical already");
    assert_eq!(v["authority"], "example.test");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["user_agent"], "ua\"\\\t\u{fffd}\u{fffd} end");
    assert_eq!(v["x-tenant"], "first\"}", "the first of duplicates");
    assert!(v.get("x-absent").is_none());
    assert_eq!(v["request_id"], "abc-123");
    assert_eq!(v["response_code"], 200);
    assert_eq!(v["bytes_received"], 10);
    assert_eq!(v["bytes_sent"], sent as u64);
    assert_eq!(v["route"], "main[1]");
    assert_eq!(v["cluster"], "app");
    assert_eq!(v["upstream_host"], app.endpoint());
    assert!(
        v["source_address"]
            .as_str()
            .expect("as expected")
            .starts_with("127.0.0.1:")
    );
    assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
    assert!(
        v["start_time"]
            .as_str()
            .expect("as expected")
            .ends_with('Z')
    );
    // The upstream saw the id the line has.
    let echoed: serde_json::Value = {
        let answer = exchange(
            addr,
            b"GET /app/id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        serde_json::from_str(answer.split_once("\r\n\r\n").expect("as expected").1)
            .expect("echo JSON")
    };
    let id = echoed["headers"]["x-request-id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let all = wait_lines(&path, 5);
    assert_eq!(all[4]["request_id"], id.as_str());

    let v = &all[1];
    assert_eq!(
        (v["response_code"].as_u64(), v["route"].as_str()),
        (Some(404), Some(""))
    );
    assert_eq!(v["upstream_host"], "");
    let v = &all[2];
    assert_eq!(v["path"], "/app/y");
    assert_eq!(v["original_path"], "/%61pp//x/../y");
    assert_eq!(v["route"], "main[0]");
    let v = &all[3];
    assert_eq!(v["response_code"], 400);
    assert_eq!(v["path"], "/app/%00x/%2e%2e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_are_logged_with_their_protocol() {
    let app = Backend::start("app").await;
    let weft = Weft::start(WEFT, &config(&app, "{ path: access.log }"));
    let c = weft_testkit::client::h2c();
    let r = weft_testkit::client::get(&c, &weft.url("main", "/app/h2"))
        .await
        .expect("answer");
    assert_eq!(r.status, 200);
    let all = wait_lines(&log_path(&weft), 1);
    assert_eq!(all[0]["protocol"], "HTTP/2.0");
    assert_eq!(all[0]["path"], "/app/h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_line_is_lost_when_the_proxy_stops() {
    let app = Backend::start("app").await;
    let mut weft = Weft::start(WEFT, &config(&app, "{ path: access.log }"));
    let path = log_path(&weft);
    let addr = weft.addr("main");
    // Keep-alive requests on one connection, then SIGTERM at once: the lines are pending in
    // memory (the writer waits up to 100 ms) when the drain begins.
    let n = 200;
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..n {
        write!(s, "GET /app/{i} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        // One answer each (the echo's body ends with a closing brace and fits one read or
        // few).
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).trim_end().ends_with('}') {
            let k = s.read(&mut buf).expect("read");
            assert!(k > 0, "closed early");
            got.extend_from_slice(&buf[..k]);
        }
    }
    drop(s);
    weft.signal(libc::SIGTERM);
    assert!(weft.wait_exit(Duration::from_secs(30)).success());
    let all = lines(&path);
    assert_eq!(all.len(), n, "every request's line is written before exit");
    assert_eq!(all[n - 1]["path"], format!("/app/{}", n - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_a_rotation() {
    let app = Backend::start("app").await;
    let weft = Weft::start(WEFT, &config(&app, "{ path: access.log }"));
    let path = log_path(&weft);
    let addr = weft.addr("main");
    let get = |p: &str| {
        let a = exchange(
            addr,
            format!("GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    };
    get("/app/before");
    wait_lines(&path, 1);
    let rotated = path.with_file_name("access.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    weft.signal(libc::SIGUSR1);
    eventually(Duration::from_secs(20), "the reopen", || {
        weft.log_contains("access logs reopened")
    });
    get("/app/after");
    let now = wait_lines(&path, 1);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0]["path"], "/app/after");
    let old = lines(&rotated);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["path"], "/app/before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_access_log_is_refused_and_changes_nothing() {
    let app = Backend::start("app").await;
    for (bad, says) in [
        ("{ path: no/such/dir/access.log }", "no/such/dir/access.log"),
        ("{ path: a.log, headers: [X-Upper] }", "lower case"),
        ("{ path: a.log, headers: [\"bad name\"] }", "lower case"),
        ("{ path: \"\" }", "a file path is required"),
        ("{ path: a.log, format: text }", "unknown field"),
        ("{ headers: [x-a] }", "path"),
    ] {
        let (ok, err) = validate(WEFT, &config(&app, bad));
        assert!(!ok, "{bad} must be refused");
        assert!(err.contains(says), "{bad}: {err}");
    }
    let tcp = format!(
        r#"
listeners:
  - name: raw
    address: "127.0.0.1:0"
    protocol: tcp
    tcp: {{ routes: [{{ cluster: app }}] }}
    access_log: {{ path: a.log }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.endpoint()
    );
    let (ok, err) = validate(WEFT, &tcp);
    assert!(!ok && err.contains("HTTP listeners only"), "{err}");

    // A reload naming a path that cannot be opened is refused; the running log keeps going.
    let weft = Weft::start(WEFT, &config(&app, "{ path: access.log }"));
    let path = log_path(&weft);
    let version = weft.version();
    weft.write_config_and_hup(&config(&app, "{ path: missing/dir/access.log }"));
    eventually(Duration::from_secs(20), "the rejected reload", || {
        weft.log_contains("reload rejected")
    });
    assert_eq!(weft.version(), version);
    let a = exchange(
        weft.addr("main"),
        b"GET /app/still HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(wait_lines(&path, 1)[0]["path"], "/app/still");
}
