//! The proxy's life: reload under load without a failed request, a bad reload changing nothing,
//! listeners opening and closing with the config, and a graceful drain on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_testkit::client;
use weft_testkit::{Backend, Weft, eventually};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn config(listeners: &str, cluster: &str, endpoint: &str) -> String {
    format!(
        r#"
drain: {{ grace_period: 60s }}
listeners:
{listeners}
routes:
  main:
    - match: {{ path_prefix: /delay/ }}
      to: [{{ cluster: {cluster} }}]
      timeout: 30s
    - to: [{{ cluster: {cluster} }}]
clusters:
  - {{ name: {cluster}, endpoints: ["{endpoint}"] }}
"#
    )
}

const MAIN: &str = r#"  - { name: main, address: "127.0.0.1:0", routes: main }"#;

/// Sends requests from `clients` tasks until `stop`, counting successes and failures.
fn load(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<Vec<String>>>,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..clients)
        .map(|i| {
            let (url, stop, ok, failed) = (url.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let c = if i % 2 == 0 {
                    client::http1()
                } else {
                    client::h2c()
                };
                let mut errors = Vec::new();
                // Bounded in time by `stop` and in count, whichever comes first.
                for _ in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match client::get(&c, &url).await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{} {}", r.status, r.text()));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(e);
                        }
                    }
                }
                errors
            })
        })
        .collect();
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_load_fail_no_request() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut weft = Weft::start(WEFT, &config(MAIN, "one", &a.endpoint()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = load(weft.url("main", "/"), 8, stop.clone());

    // Alternate the cluster (and its endpoint) ten times while traffic flows.
    for i in 0..10 {
        let (name, ep) = if i % 2 == 0 {
            ("two", b.endpoint())
        } else {
            ("one", a.endpoint())
        };
        let before = ok.load(Ordering::Relaxed);
        weft.reload(&config(MAIN, name, &ep));
        eventually(
            Duration::from_secs(10),
            "traffic flows after the reload",
            || ok.load(Ordering::Relaxed) > before + 50,
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.expect("load task"));
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests: {errors:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 500);
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "both configs served traffic"
    );
    assert_eq!(weft.version(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_changes_nothing() {
    let a = Backend::start("a").await;
    let weft = Weft::start(WEFT, &config(MAIN, "one", &a.endpoint()));
    let (_, config_before) = weft.admin_get("/config");

    // Invalid: a route to a cluster that does not exist.
    weft.write_config_and_hup(&config(MAIN, "one", &a.endpoint()).replace(
        "    - to: [{ cluster: one }]",
        "    - to: [{ cluster: nope }]",
    ));
    eventually(Duration::from_secs(10), "the rejection is logged", || {
        weft.log_contains("reload rejected")
    });
    let (_, config_after) = weft.admin_get("/config");
    assert_eq!(config_before, config_after);
    let r = client::get(&client::http1(), &weft.url("main", "/"))
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-backend"), Some("a"));
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.contains("weft_config_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );

    // Unparseable YAML: the same.
    weft.write_config_and_hup("listeners: [\n");
    eventually(
        Duration::from_secs(10),
        "the second rejection is counted",
        || {
            weft.admin_get("/metrics")
                .1
                .contains("weft_config_reloads_total{result=\"rejected\"} 2")
        },
    );
    assert_eq!(weft.admin_get("/config").1, config_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_open_and_close_with_the_config() {
    let a = Backend::start("a").await;
    let mut weft = Weft::start(WEFT, &config(MAIN, "one", &a.endpoint()));
    let first = weft.addr("main");

    let two = format!("{MAIN}\n  - {{ name: extra, address: \"127.0.0.1:0\", routes: main }}");
    weft.reload(&config(&two, "one", &a.endpoint()));
    assert_eq!(
        weft.addr("main"),
        first,
        "an unchanged listener keeps its socket"
    );
    let r = client::get(&client::http1(), &weft.url("extra", "/"))
        .await
        .expect("new listener");
    assert_eq!(r.status, 200);

    let extra = weft.addr("extra");
    let only_extra = "  - { name: extra, address: \"127.0.0.1:0\", routes: main }";
    weft.reload(&config(only_extra, "one", &a.endpoint()));
    assert_eq!(weft.addr("extra"), extra);
    eventually(
        Duration::from_secs(10),
        "the removed listener stops accepting",
        || std::net::TcpStream::connect(first).is_err(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let a = Backend::start("a").await;
    let mut weft = Weft::start(WEFT, &config(MAIN, "one", &a.endpoint()));
    let url = weft.url("main", "/delay/1500");
    let addr = weft.addr("main");

    let c = client::http1();
    let in_flight = tokio::spawn(async move { client::get(&c, &url).await });
    eventually(
        Duration::from_secs(10),
        "the slow request reached the backend",
        || a.requests() == 1,
    );
    let sent = Instant::now();
    weft.signal(libc::SIGTERM);
    eventually(
        Duration::from_secs(5),
        "/ready turns 503 while draining",
        || matches!(weft_testkit::http_get(weft.admin, "/ready"), Ok((503, _))),
    );
    eventually(
        Duration::from_secs(5),
        "new connections are refused",
        || std::net::TcpStream::connect(addr).is_err(),
    );

    let r = in_flight
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(r.status, 200, "{}", r.text());
    let status = weft.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    // It exited once the request was done, not at the end of the 60 s grace period.
    assert!(sent.elapsed() < Duration::from_secs(30));
}

/// Connections that sit idle between requests when the drain starts are told at once, with
/// nothing else happening on them: an HTTP/1.1 one is closed, an HTTP/2 one gets its GOAWAY
/// and is closed, and weft exits without waiting for its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_as_soon_as_the_drain_starts() {
    use std::io::{Read, Write};

    let a = Backend::start("a").await;
    let mut weft = Weft::start(WEFT, &config(MAIN, "one", &a.endpoint()));
    let addr = weft.addr("main");
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .expect("request");
        // The answer (the test backend's JSON echo, a few hundred bytes) in full: its
        // Content-Length says when it is done.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let done = loop {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().expect("length"))
                    })
                    .expect("content-length");
                if body.len() >= len {
                    break head.to_owned();
                }
            }
        };
        assert!(done.starts_with("HTTP/1.1 200"), "{done}");
        idle.push(s);
    }
    let c = client::h2c();
    let r = client::get(&c, &weft.url("main", "/")).await.expect("h2c");
    assert_eq!(r.status, 200);

    let sent = Instant::now();
    weft.signal(libc::SIGTERM);
    for mut s in idle {
        let mut buf = [0u8; 64];
        // EOF (or a reset): the connection was closed, long before the read times out.
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("bytes on an idle connection: {:?}", &buf[..n]),
            Err(e) => panic!("the idle connection stayed open: {e}"),
        }
    }
    let status = weft.wait_exit(Duration::from_secs(50));
    assert!(status.success(), "{status}");
    assert!(
        sent.elapsed() < Duration::from_secs(40),
        "weft waited for the grace period: {:?}",
        sent.elapsed()
    );
    drop(c);
}
