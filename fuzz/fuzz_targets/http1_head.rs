#![no_main]
//! HTTP/1.1 request heads (and what follows them) sent to a live weft, in this process, in
//! front of a live backend: whatever the bytes, weft answers with an HTTP/1.x response or
//! closes the connection, and never panics (a panic on any thread aborts the fuzzer).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

/// Starts a backend and weft (listener, routes to it, a direct response, upgrades and
/// CONNECT allowed), once; the address weft listens on.
fn weft() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        // libFuzzer's C `main` does not ignore SIGPIPE as a Rust binary's does: a write to a
        // connection the peer closed would kill the process instead of failing.
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let backend = weft_testkit::Backend::start("b").await;
                let dir = tempfile::tempdir().expect("dir");
                let config = dir.path().join("weft.yaml");
                std::fs::write(
                    &config,
                    format!(
                        r#"
listeners:
  - name: main
    address: "{addr}"
    routes: main
    http: {{ upgrades: [websocket, echo, CONNECT], request_headers_timeout: 2s }}
routes:
  main:
    - match: {{ method: CONNECT }}
      to: [{{ cluster: app }}]
    - match: {{ path_prefix: /direct }}
      direct_response: {{ status: 200, body: "direct\n" }}
    - match: {{ path_prefix: /admin }}
      direct_response: {{ status: 403 }}
    - to: [{{ cluster: app }}]
      timeout: 2s
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
                        backend.endpoint()
                    ),
                )
                .expect("config");
                let server = weft_proxy::Server::start(&weft_proxy::Options {
                    config_path: config,
                    workers: 1,
                    control: None,
                    log_dropped: None,
                })
                .await
                .expect("weft starts");
                ready_tx.send(()).expect("ready");
                let _ = server.run_until_signalled().await;
                drop((backend, dir));
            });
        });
        ready_rx.recv().expect("weft started");
        addr
    })
}

fuzz_target!(|data: &[u8]| {
    let addr = weft();
    let Ok(mut s) = TcpStream::connect(addr) else {
        panic!("weft stopped accepting connections");
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(data).is_err() {
        return;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        match s.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    // A client that sends the HTTP/2 preface speaks HTTP/2: frames come back.
    let h2 = data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    if got > 0 && !h2 {
        assert!(
            head[..got].starts_with(&b"HTTP/1."[..got.min(7)]),
            "not an HTTP/1 response: {:?}",
            String::from_utf8_lossy(&head[..got])
        );
    }
});
