//! What weft does with hostile or malformed input, checked with raw bytes on real sockets:
//! header limits, slow clients, request smuggling classes, Host confusion, path tricks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use weft_testkit::client::{self, get_with};
use weft_testkit::{Backend, Weft};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

async fn start(http: &str) -> (Weft, Backend) {
    let backend = Backend::start("b").await;
    let yaml = format!(
        r#"
listeners:
  - name: main
    address: "127.0.0.1:0"
    routes: main
    http: {{ {http} }}
routes:
  main:
    - match: {{ path_prefix: /admin }}
      direct_response: {{ status: 403, body: "admin is off limits\n" }}
    - match: {{ host: other.example }}
      direct_response: {{ status: 200, body: "routed by the URI's authority\n" }}
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"], protocol: http1 }}
"#,
        backend.endpoint()
    );
    (Weft::start(WEFT, &yaml), backend)
}

/// Sends raw bytes, then reads until the server closes the connection (or 10 s pass).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one whole response (head, then a content-length body) from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                if body.ends_with("0\r\n\r\n") {
                    return text;
                }
            } else {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
        }
        let n = s.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_too_many_headers_get_431() {
    let (weft, _b) = start("max_request_headers_kb: 4, max_headers: 20").await;
    let addr = weft.addr("main");
    blocking(move || {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(5000)
        );
        assert_eq!(status_of(&exchange(addr, big.as_bytes())), 431);

        let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..30 {
            many.push_str(&format!("X-H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(status_of(&exchange(addr, many.as_bytes())), 431);

        // Within the limits, all is well.
        let ok = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        assert_eq!(status_of(&exchange(addr, ok.as_bytes())), 200);
    })
    .await;

    // HTTP/2: the header list size is advertised and enforced, and so is the count.
    let big = "a".repeat(5000);
    let r = get_with(&client::h2c(), &weft.url("main", "/"), &[("x-big", &big)])
        .await
        .expect("h2 request");
    assert_eq!(r.status, 431);
    let names: Vec<String> = (0..30).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = get_with(&client::h2c(), &weft.url("main", "/"), &many)
        .await
        .expect("h2 request");
    assert_eq!(r.status, 431);
    assert_eq!(r.header("x-weft-error"), Some("header_fields_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_off() {
    let (weft, _b) = start("request_headers_timeout: 300ms").await;
    let addr = weft.addr("main");
    blocking(move || {
        // A slowloris client: part of a head, then nothing. The proxy must close on it.
        let out = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        assert!(!out.contains("200"), "{out}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_outlives_the_head_timeout_but_not_the_idle_timeout() {
    let (weft, _b) = start("request_headers_timeout: 300ms, idle_timeout: 1500ms").await;
    let addr = weft.addr("main");
    blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let req = b"GET /delay/0 HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut buf = [0u8; 4096];
        for _ in 0..2 {
            s.write_all(req).expect("write");
            let r = read_response(&mut s);
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            // Idle for longer than the head timeout: a keep-alive connection must survive it.
            std::thread::sleep(Duration::from_millis(600));
        }
        // Left idle past idle_timeout, it is closed by the proxy.
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "idle connection was not closed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_classes_are_refused() {
    let (weft, backend) = start("").await;
    let addr = weft.addr("main");
    blocking(move || {
        // CL + TE: processed by TE alone and the connection closed after the response.
        let out = exchange(
            addr,
            b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "a second request was read: {out}");
        assert!(out.to_ascii_lowercase().contains("connection: close"), "{out}");

        let bad = [
            // Differing duplicate Content-Length.
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"[..],
            // Transfer-Encoding that is not chunked.
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            // Whitespace before the colon.
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            // Signed / non-numeric Content-Length.
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd",
            // NUL and bare CR in a header value.
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            // obs-fold.
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            // Missing, duplicate, or malformed Host.
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n",
        ];
        for req in bad {
            let out = exchange(addr, req);
            assert!(
                out.is_empty() || status_of(&out) == 400,
                "{:?} got {out:?}",
                String::from_utf8_lossy(req)
            );
        }
    })
    .await;
    assert!(
        backend.requests() <= 1,
        "malformed requests reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_authority_wins_over_host() {
    let (weft, _b) = start("").await;
    let addr = weft.addr("main");
    let out = blocking(move || {
        exchange(
            addr,
            b"GET http://other.example/ HTTP/1.1\r\nHost: innocent.example\r\nConnection: close\r\n\r\n",
        )
    })
    .await;
    assert!(out.contains("routed by the URI's authority"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_canonicalized_before_routing() {
    let (weft, _b) = start("").await;
    let c = client::http1();
    let get = |p: &'static str| {
        let url = weft.url("main", p);
        let c = c.clone();
        async move { client::get(&c, &url).await.expect("request") }
    };
    // Dot segments and encoded dots cannot reach around the /admin rule.
    assert_eq!(get("/public/../admin").await.status, 403);
    assert_eq!(get("/public/%2e%2e/admin").await.status, 403);
    assert_eq!(get("//admin").await.status, 403);
    // Encoded slashes are refused by default.
    let r = get("/public%2F..%2Fadmin").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-weft-error"), Some("invalid_path"));
    // The canonical path is what the upstream receives.
    let r = get("/a/./b/../c/%7Euser").await;
    assert_eq!(r.json()["path"], "/a/c/~user");
    // `..;` tricks some backends play with are refused.
    assert_eq!(get("/x/..;a=b/admin").await.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed() {
    let backend = Backend::start("b").await;
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, max_connections: 2 }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
            backend.endpoint()
        ),
    );
    let addr = weft.addr("main");
    let admin = weft.admin;
    blocking(move || {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(req).expect("write");
            assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
            held.push(s);
        }
        // The third is accepted by the kernel, then closed by the proxy without an answer.
        let out = exchange(addr, req);
        assert!(out.is_empty(), "{out}");
        let (_, metrics) = weft_testkit::http_get(admin, "/metrics").expect("metrics");
        assert!(
            metrics.contains("weft_downstream_connections_rejected_total{listener=\"main\"} 1"),
            "{metrics}"
        );
        // Closing one makes room again.
        drop(held.pop());
        weft_testkit::eventually(Duration::from_secs(10), "a slot frees up", || {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(req).is_ok() && {
                let mut buf = [0u8; 12];
                matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
            }
        });
    })
    .await;
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Whether weft closes the connection (EOF or reset) within 30 s of `bytes` being sent.
fn closed_after(addr: SocketAddr, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // The server's own SETTINGS and the like.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_that_stall_a_preface_or_a_header_block_are_cut_off() {
    let (weft, _b) = start("request_headers_timeout: 500ms").await;
    let addr = weft.addr("main");
    blocking(move || {
        // Half of the magic, then nothing.
        assert!(closed_after(addr, &H2_PREFACE[..10]));
        // The magic, but no SETTINGS frame.
        assert!(closed_after(addr, H2_PREFACE));
        // A complete preface, then a HEADERS frame without END_HEADERS and no CONTINUATION.
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(h2_frame(0x4, 0, 0, &[]));
        bytes.extend(h2_frame(0x1, 0x1, 1, &[0x82, 0x86]));
        assert!(closed_after(addr, &bytes));
    })
    .await;
    // A well-behaved HTTP/2 client idle longer than the head timeout is not cut off.
    let c = client::h2c();
    for _ in 0..2 {
        let r = client::get(&c, &weft.url("main", "/"))
            .await
            .expect("h2 request");
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Clients that send part of an HTTP/2 preface (or of a TLS ClientHello) and stop cost
/// nothing while they wait: detection waits for readability, it does not poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_prefaces_cost_no_cpu_while_they_wait() {
    let (weft, _b) = start("request_headers_timeout: 60s").await;
    let addr = weft.addr("main");
    let pid = weft.pid();
    blocking(move || {
        let mut held = Vec::new();
        for _ in 0..500 {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"PRI * HTTP").expect("write");
            held.push(s);
        }
        // Let every connection reach its detection wait, then measure a quiet period.
        std::thread::sleep(Duration::from_millis(500));
        let before = cpu_time(pid);
        std::thread::sleep(Duration::from_secs(2));
        let used = cpu_time(pid) - before;
        // Polling 500 sockets every millisecond costs about a core; waiting costs nothing.
        assert!(
            used < Duration::from_millis(300),
            "weft used {used:?} of CPU in 2 s with 500 stalled clients"
        );
        drop(held);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_source_ip_cap_are_closed() {
    let backend = Backend::start("b").await;
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, max_connections_per_source_ip: 2 }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
            backend.endpoint()
        ),
    );
    let addr = weft.addr("main");
    blocking(move || {
        let from = |ip: &str| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            let local: SocketAddr = format!("{ip}:0").parse().expect("addr");
            sock.bind(&local.into()).expect("bind");
            sock.connect(&addr.into()).expect("connect");
            let s: TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s
        };
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = from("127.0.0.1");
            s.write_all(req).expect("write");
            assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
            held.push(s);
        }
        // A third from the same address is closed without an answer…
        let mut third = from("127.0.0.1");
        let _ = third.write_all(req);
        let mut buf = [0u8; 64];
        assert!(matches!(third.read(&mut buf), Ok(0) | Err(_)));
        // …while another address is served.
        let mut other = from("127.0.0.2");
        other.write_all(req).expect("write");
        assert!(read_response(&mut other).starts_with("HTTP/1.1 200"));
        // A closed connection gives its address a slot back.
        drop(held.pop());
        weft_testkit::eventually(Duration::from_secs(10), "a slot frees up", || {
            let mut s = from("127.0.0.1");
            s.write_all(req).is_ok() && {
                let mut buf = [0u8; 12];
                matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
            }
        });
    })
    .await;
}
