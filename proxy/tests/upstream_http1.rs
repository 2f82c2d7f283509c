//! weft's HTTP/1.1 client against upstreams that misbehave, checked with a scripted backend on
//! a real socket: conflicting lengths, responses that try to smuggle a second response onto a
//! pooled connection, early answers before the request body is read, interim responses,
//! bodies delimited by the close, and trailers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_testkit::Weft;
use weft_testkit::client::{self, Reply};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// What the scripted backend does with each request head it reads: the bytes to answer, and
/// whether to close the connection afterwards (without reading anything more).
type Script = fn(request: &str) -> (Vec<u8>, bool);

struct Upstream {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream(script: Script) -> Upstream {
    upstream_with(script, None).await
}

/// The scripted backend, over TLS when given an acceptor.
async fn upstream_with(script: Script, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
    counting_backend(move |s| {
        let tls = tls.clone();
        async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(s).await {
                        serve(s, script).await;
                    }
                }
                None => serve(s, script).await,
            }
        }
    })
    .await
}

/// A backend on `127.0.0.1:0` that counts the connections it accepts and runs `conn` on each.
async fn counting_backend<F, Fut>(conn: F) -> Upstream
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(conn(s));
        }
    });
    Upstream {
        addr,
        accepted,
        task,
    }
}

/// Answers each request head on `s` as `script` says.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, script: Script) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let (answer, close) = script(&head);
        if s.write_all(&answer).await.is_err() || s.flush().await.is_err() || close {
            return;
        }
        // A request body, if any, is the script's to ignore: keep-alive scripts here only see
        // bodiless requests.
        buf.clear();
    }
}

fn start(up: &Upstream) -> Weft {
    start_with_cluster(up, "")
}

/// weft in front of `up` alone (no retries, no ejection), with `extra` lines for the cluster.
fn start_with_cluster(up: &Upstream, extra: &str) -> Weft {
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
      retries: {{ attempts: 0 }}
clusters:
  - name: app
    endpoints: ["{}"]
    protocol: http1
    outlier_detection: {{ consecutive_5xx: 0, consecutive_gateway_errors: 0, consecutive_connect_failures: 0 }}
{extra}
"#,
        up.addr
    );
    Weft::start_with(WEFT, &yaml, &["--workers", "1"])
}

async fn get(weft: &Weft, path: &str) -> Reply {
    let c = client::http1();
    tokio::time::timeout(
        Duration::from_secs(20),
        client::get(&c, &weft.url("main", path)),
    )
    .await
    .expect("answered in time")
    .expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_lengths_and_bad_heads_are_a_502_never_a_guess() {
    let up = upstream(|req| {
        let answer: &[u8] = if req.starts_with("GET /two-lengths") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\nhello"
        } else if req.starts_with("GET /bad-length") {
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello"
        } else if req.starts_with("GET /folded") {
            b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n"
        } else if req.starts_with("GET /bare-lf-chunk") {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
        } else if req.starts_with("GET /switch") {
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        (answer.to_vec(), true)
    })
    .await;
    let weft = start(&up);
    for path in ["/two-lengths", "/bad-length", "/folded", "/switch"] {
        let r = get(&weft, path).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.header("x-weft-error"), Some("upstream_reset"), "{path}");
    }
    // The head was fine and already sent on; the body is cut off rather than passed on wrong.
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/bare-lf-chunk")).await;
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.body.is_empty()),
        "{r:?}"
    );
    assert_eq!(get(&weft, "/fine").await.text(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_response_never_answer_the_next_request() {
    // Each response is followed by a second, unasked-for one: an upstream trying to desync the
    // pooled connection. The next request must not read it.
    let up = upstream(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
              HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil"
                .to_vec(),
            false,
        )
    })
    .await;
    let weft = start(&up);
    for _ in 0..4 {
        let r = get(&weft, "/").await;
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        4,
        "a connection with stray bytes is closed, not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_header_and_the_fields_it_names_stop_at_weft() {
    // `Connection` is this hop's: whether it only says `keep-alive` or also names a field of
    // the response, neither it, the fields it names nor `Keep-Alive` reach the client, and the
    // pooled connection is reused unless it said `close`.
    let up = upstream(|req| {
        let answer: &[u8] = if req.starts_with("GET /names") {
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, X-Secret\r\nx-secret: 1\r\n\
              keep-alive: timeout=5\r\nx-ok: 1\r\ncontent-length: 2\r\n\r\nok"
        } else if req.starts_with("GET /close") {
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nx-ok: 1\r\ncontent-length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\
              x-ok: 1\r\ncontent-length: 2\r\n\r\nok"
        };
        (answer.to_vec(), req.starts_with("GET /close"))
    })
    .await;
    let weft = start(&up);
    for path in ["/plain", "/names", "/plain", "/names"] {
        let r = get(&weft, path).await;
        assert_eq!(r.text(), "ok", "{path}");
        assert_eq!(r.header("x-ok"), Some("1"), "{path}");
        for hop in ["x-secret", "keep-alive"] {
            assert_eq!(r.header(hop), None, "{path}: {hop}");
        }
        assert!(
            r.header("connection")
                .is_none_or(|c| !c.contains("keep-alive, X-Secret")),
            "{path}"
        );
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "kept alive: one connection"
    );
    let r = get(&weft, "/close").await;
    assert_eq!(r.text(), "ok");
    assert_eq!(get(&weft, "/plain").await.text(), "ok");
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        2,
        "a connection that said close is not reused"
    );
}

/// A backend that holds every answer until `burst` requests are waiting, so that each of them
/// has an upstream connection of its own, then answers them all. Counts the connections.
async fn burst_upstream(burst: usize) -> Upstream {
    let all_in = Arc::new(tokio::sync::Barrier::new(burst));
    counting_backend(move |mut s| {
        let all_in = all_in.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.clear();
                all_in.wait().await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_leaves_its_connections_for_the_next_burst() {
    // More requests at once than the 128 idle connections weft used to keep per endpoint: the
    // burst's connections all stay in the pool (until its idle timeout), and the next burst
    // reuses them instead of closing some and opening new ones.
    const BURST: usize = 200;
    let up = burst_upstream(BURST).await;
    let weft = start(&up);
    let c = client::http1();
    let url = weft.url("main", "/");
    for round in 1..=2 {
        let requests: Vec<_> = (0..BURST)
            .map(|_| {
                let (c, url) = (c.clone(), url.clone());
                tokio::spawn(async move { client::get(&c, &url).await })
            })
            .collect();
        for r in requests {
            let r = tokio::time::timeout(Duration::from_secs(60), r)
                .await
                .unwrap_or_else(|_| panic!("round {round}: the burst was not answered"))
                .expect("task")
                .expect("response");
            assert_eq!(r.text(), "ok", "round {round}");
        }
    }
    // Each connection goes back to the pool as its response ends, which can be a moment after
    // the client has it: a few of the second burst may find theirs not back yet.
    let accepted = up.accepted.load(Ordering::SeqCst);
    assert!(
        (BURST..BURST + 16).contains(&accepted),
        "{accepted} upstream connections for two bursts of {BURST}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_keep_alive_connections_are_reused_and_close_delimited_ones_are_not() {
    let up = upstream(|req| {
        if req.starts_with("GET /until-close") {
            (b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec(), true)
        } else if req.starts_with("GET /both") {
            // Transfer-Encoding wins over Content-Length; the connection is not trusted after.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
                  4\r\nwhol\r\n1\r\ne\r\n0\r\n\r\n"
                    .to_vec(),
                false,
            )
        } else if req.starts_with("GET /hints") {
            (
                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"
                    .to_vec(),
                false,
            )
        } else if req.starts_with("GET /trailers") {
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n0\r\nx-checksum: 42\r\n\r\n"
                    .to_vec(),
                false,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                false,
            )
        }
    })
    .await;
    let weft = start(&up);
    for _ in 0..5 {
        assert_eq!(get(&weft, "/").await.text(), "ok");
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "one pooled connection"
    );
    assert_eq!(get(&weft, "/hints").await.text(), "final");
    assert_eq!(get(&weft, "/trailers").await.text(), "abc");
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "still the same connection"
    );

    let r = get(&weft, "/until-close").await;
    assert_eq!(r.text(), "all of it");
    let r = get(&weft, "/both").await;
    assert_eq!(r.text(), "whole");
    assert_eq!(
        r.header("content-length"),
        None,
        "the overridden length is not passed on"
    );
    let before = up.accepted.load(Ordering::SeqCst);
    assert_eq!(get(&weft, "/").await.text(), "ok");
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        before + 1,
        "after a message with both lengths, a new connection"
    );
}

/// A backend that answers 413 as soon as it has a request head, and closes with the body
/// unread.
async fn refusing_bodies() -> Upstream {
    upstream(|_| {
        (
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large"
                .to_vec(),
            true,
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_a_body_before_reading_it_is_heard() {
    // Answers 413 as soon as it has the head, and closes with the body unread (the kernel
    // resets the connection under the proxy's writes).
    let up = refusing_bodies().await;
    let weft = start(&up);
    let body = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
    for _ in 0..3 {
        let c = client::http1();
        let req = http::Request::post(weft.url("main", "/upload"))
            .body(Full::new(body.clone()))
            .expect("request");
        let r = tokio::time::timeout(Duration::from_secs(30), client::send(&c, req))
            .await
            .expect("answered in time");
        // The client may see its own upload cut short once the answer is in; when it reads
        // the answer, it is the upstream's.
        if let Ok(r) = r {
            assert_eq!(r.status, 413, "{:?}", r.header("x-weft-error"));
            assert_eq!(r.text(), "too large");
        }
    }
    // With curl, which reads the answer while it sends.
    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), &body[..]).expect("write");
    let data = format!("@{}", file.path().display());
    let url = weft.url("main", "/upload");
    let (_, out, err) = tokio::task::spawn_blocking(move || {
        client::curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            "--data-binary",
            &data,
            &url,
        ])
    })
    .await
    .expect("curl");
    assert_eq!(out, "413", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_after_an_early_answer_is_not_reset() {
    // The upstream answers 413 on the head alone, while the client still has most of its body
    // to send. weft sends the answer and its FIN, then lingers: it reads and drops what the
    // client still sends. A close with those bytes unread would reset the connection, and
    // curl, for one, gives up on a failed send without reading the answer it was sent.
    let up = refusing_bodies().await;
    let weft = start(&up);
    let mut s = tokio::net::TcpStream::connect(weft.addr("main"))
        .await
        .expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 104857600\r\n\r\n")
        .await
        .expect("head");
    let chunk = vec![b'x'; 16 * 1024];
    s.write_all(&chunk).await.expect("the first of the body");
    // The whole answer, then weft's FIN.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .expect("the answer and weft's FIN in time");
    let text = String::from_utf8_lossy(&got);
    assert!(read.is_ok(), "{read:?} (after {text:?})");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.ends_with("too large"), "{text}");
    // The rest of the body, as a client that was still sending sends it: taken, not refused.
    for i in 0..64 {
        if let Err(e) = s.write_all(&chunk).await {
            panic!("write {i} after the answer: {e}");
        }
    }
    s.shutdown().await.expect("the client's FIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_stops_sending_is_closed_and_starves_no_one() {
    // After an early answer, a client streams as fast as it can and never closes: weft's
    // lingering ends by its deadline (3 s), and meanwhile other clients are served.
    let up = refusing_bodies().await;
    let weft = start(&up);
    let mut s = tokio::net::TcpStream::connect(weft.addr("main"))
        .await
        .expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 999999999999\r\n\r\n")
        .await
        .expect("head");
    let chunk = vec![b'x'; 64 * 1024];
    let sender = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < until {
            if s.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });
    let r = get(&weft, "/other").await;
    assert_eq!(r.status, 413, "another client is served meanwhile");
    assert!(
        sender.await.expect("sender"),
        "the lingering connection was closed within 30 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_bytes_inside_a_tls_record_are_caught_too() {
    use weft_testkit::tls::{Pki, server_config};
    // Over TLS the stray bytes arrive in the same record as the response: decrypted, they are
    // in the proxy's buffer or still in the TLS session, not in the socket, and must keep the
    // connection out of the pool either way.
    let pki = Pki::new("stray");
    let cert = pki.issue("backend", &["backend.test"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&cert, None));
    let up = upstream_with(
        |_| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
                  HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil"
                    .to_vec(),
                false,
            )
        },
        Some(acceptor),
    )
    .await;
    let ca = pki.ca.display().to_string();
    let weft = start_with_cluster(
        &up,
        &format!(r#"    tls: {{ sni: backend.test, ca: "{ca}" }}"#),
    );
    for _ in 0..4 {
        assert_eq!(get(&weft, "/").await.text(), "ok");
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        4,
        "never reused after stray bytes"
    );
}
