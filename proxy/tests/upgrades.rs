//! Upgrades and CONNECT through a real weft: only what a listener's `http.upgrades` names gets
//! through; `h2c` never does; a tunnel keeps its connection's slot and gauge, ends when idle,
//! and closes on drain.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use weft_testkit::{Backend, Weft, eventually, http_get};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A listener (with `listener` settings) routing `CONNECT echo.internal` to cluster `echo` (at
/// `echo`, or the backend) and everything else to the backend.
fn config(backend: &str, listener: &str, echo: Option<SocketAddr>) -> String {
    let echo = echo.map_or_else(|| backend.to_owned(), |a| a.to_string());
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, {listener} }}
routes:
  main:
    - match: {{ method: CONNECT, host: echo.internal }}
      to: [{{ cluster: echo }}]
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{backend}"], protocol: http1 }}
  - {{ name: echo, endpoints: ["{echo}"] }}
drain: {{ grace_period: 30s }}
"#
    )
}

/// Reads until `until` was seen (or fails after 10 s).
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

/// Whether the peer closed the connection (reads to EOF within 30 s).
fn closes(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Opens an `Upgrade: echo` tunnel through weft and checks it echoes.
fn open_echo_tunnel(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .expect("write");
    let head = raw_until(&mut s, "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").expect("write");
    assert_eq!(raw_until(&mut s, "ping"), "ping");
    s
}

fn metric(admin: SocketAddr, line_start: &str) -> Option<f64> {
    let (_, m) = http_get(admin, "/metrics").expect("metrics");
    m.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_upgrades_are_spliced_and_others_refused() {
    let backend = Backend::start("u").await;
    let weft = Weft::start(
        WEFT,
        &config(&backend.endpoint(), "http: { upgrades: [echo] }", None),
    );
    let addr = weft.addr("main");
    blocking(move || {
        let mut s = open_echo_tunnel(addr);
        s.write_all(b"second message").expect("write");
        assert_eq!(raw_until(&mut s, "second message"), "second message");

        // A protocol the listener does not name: 403, nothing forwarded as an upgrade.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .expect("write");
        let head = raw_until(&mut s, "\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        assert!(head.contains("x-weft-error: upgrade_not_allowed"), "{head}");
    })
    .await;

    // The default allows websocket only: `echo` is refused.
    let weft = Weft::start(WEFT, &config(&backend.endpoint(), "", None));
    let addr = weft.addr("main");
    blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .expect("write");
        let head = raw_until(&mut s, "\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    })
    .await;
}

/// h2c smuggling: a client that upgrades to h2c through the proxy would then speak HTTP/2
/// straight to the backend. weft removes the upgrade and answers the request itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_never_forwarded() {
    let backend = Backend::start("b").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &backend.endpoint(),
            "http: { upgrades: [websocket, echo] }",
            None,
        ),
    );
    let addr = weft.addr("main");
    let out = blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(
            b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .expect("write");
        raw_until(&mut s, "}")
    })
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let lower = out.to_ascii_lowercase();
    let body = &lower[lower.find("\r\n\r\n").expect("head") + 4..];
    assert!(
        !body.contains("upgrade"),
        "the backend saw an upgrade: {out}"
    );
    assert!(!body.contains("http2-settings"), "{out}");
    // curl's own h2c upgrade works as plain HTTP/1.1.
    let (ok, out, err) = weft_testkit::client::curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &format!("http://{addr}/curl"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "200 1.1");
    // And h2c in the configuration is refused, located.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("weft.yaml");
    std::fs::write(
        &file,
        config(
            &backend.endpoint(),
            "http: { upgrades: [websocket, H2C] }",
            None,
        ),
    )
    .expect("write");
    let out = std::process::Command::new(WEFT)
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .expect("validate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listeners[0].http.upgrades[1]: h2c cannot be forwarded"),
        "{err}"
    );
}

/// A TCP server that echoes what it reads, on a free port.
fn echo_server() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_unless_configured_then_tunnels_to_the_cluster() {
    let backend = Backend::start("b").await;
    let echo = echo_server();
    let weft = Weft::start(WEFT, &config(&backend.endpoint(), "", Some(echo)));
    let addr = weft.addr("main");
    blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n")
            .expect("write");
        let head = raw_until(&mut s, "\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    })
    .await;

    let weft = Weft::start(
        WEFT,
        &config(
            &backend.endpoint(),
            "http: { upgrades: [CONNECT] }",
            Some(echo),
        ),
    );
    let addr = weft.addr("main");
    blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n")
            .expect("write");
        let head = raw_until(&mut s, "\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"through the tunnel").expect("write");
        assert_eq!(raw_until(&mut s, "tunnel"), "through the tunnel");

        // A host no CONNECT route takes: 404, no tunnel.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(
            b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n",
        )
        .expect("write");
        let head = raw_until(&mut s, "\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    })
    .await;
}

/// A backend that speaks first and closes its side at once ("hello", FIN), then reads what
/// the client still sends until the client closes too, and hands that over.
fn half_closing_server() -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        if s.write_all(b"hello").is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
            return;
        }
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_carries_the_client_bytes_after_the_backend_half_closed() {
    // The backend's FIN becomes weft's FIN to the client (a half-close): what the client sends
    // afterwards still reaches the backend, none of it read and dropped as a closing HTTP/1.1
    // connection's is.
    let backend = Backend::start("b").await;
    let (half, got) = half_closing_server();
    let weft = Weft::start(
        WEFT,
        &config(
            &backend.endpoint(),
            "http: { upgrades: [CONNECT] }",
            Some(half),
        ),
    );
    let addr = weft.addr("main");
    let got = blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n")
            .expect("write");
        let head = raw_until(&mut s, "hello");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(closes(&mut s), "the backend's FIN reaches the client");
        s.write_all(b"after the backend's FIN").expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        got.recv_timeout(Duration::from_secs(30))
            .expect("the backend saw the client close")
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&got), "after the backend's FIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_holds_its_connection_slot_and_ends_when_idle() {
    let backend = Backend::start("u").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &backend.endpoint(),
            "max_connections: 1, http: { upgrades: [echo], stream_idle_timeout: 2s }",
            None,
        ),
    );
    let (addr, admin) = (weft.addr("main"), weft.admin);
    blocking(move || {
        let mut tunnel = open_echo_tunnel(addr);
        let active = r#"weft_downstream_connections_active{listener="main"}"#;
        assert_eq!(metric(admin, active), Some(1.0));
        // The tunnel holds the listener's only slot: another connection is closed at once.
        let mut other = TcpStream::connect(addr).expect("connect");
        other
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        assert!(closes(&mut other), "a second connection was served");
        // Kept busy (a message every 300 ms), the tunnel lives past its idle timeout…
        for i in 0..10 {
            std::thread::sleep(Duration::from_millis(300));
            let msg = format!("keepalive {i}");
            tunnel.write_all(msg.as_bytes()).expect("write");
            assert_eq!(raw_until(&mut tunnel, &msg), msg);
        }
        // …then, left idle, it is closed, and its slot and gauge come back.
        assert!(closes(&mut tunnel), "the idle tunnel stayed open");
        eventually(Duration::from_secs(10), "the gauge returns to 0", || {
            metric(admin, active) == Some(0.0)
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        assert!(raw_until(&mut s, "\r\n\r\n").starts_with("HTTP/1.1 200"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_closed_on_drain() {
    let backend = Backend::start("u").await;
    let mut weft = Weft::start(
        WEFT,
        &config(&backend.endpoint(), "http: { upgrades: [echo] }", None),
    );
    let addr = weft.addr("main");
    let mut tunnel = blocking(move || open_echo_tunnel(addr)).await;
    weft.signal(libc::SIGTERM);
    // The tunnel is closed at once, not at the end of the 30 s grace period, and weft exits.
    assert!(blocking(move || closes(&mut tunnel)).await);
    let status = weft.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

/// CONNECT over HTTP/2 (a stream becomes the tunnel), with the h2 crate as the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_http2_tunnels_a_stream() {
    let backend = Backend::start("b").await;
    let echo = echo_server();
    let weft = Weft::start(
        WEFT,
        &config(
            &backend.endpoint(),
            "http: { upgrades: [CONNECT] }",
            Some(echo),
        ),
    );
    let tcp = tokio::net::TcpStream::connect(weft.addr("main"))
        .await
        .expect("connect");
    let (h2, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.expect("ready");
    let req = http::Request::connect("echo.internal:443")
        .body(())
        .expect("request");
    let (resp, mut send) = h2.send_request(req, false).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    send.send_data(bytes::Bytes::from_static(b"over h2"), false)
        .expect("data");
    let mut got = Vec::new();
    while got.len() < 7 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("echoed in time")
            .expect("more data")
            .expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(&got, b"over h2");
}
