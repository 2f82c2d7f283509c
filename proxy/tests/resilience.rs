//! Upstream intelligence through a real weft, with real backends made slow, failing or dead on
//! purpose: latency-aware balancing, consistent hashing, ejection and re-admission, health
//! checks, retries and their budget, circuit breakers, timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use weft_testkit::client::{self, get_with};
use weft_testkit::{Backend, RefusingPort, Weft, eventually};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A config with one route to cluster `app`; `cluster` and `route` are YAML fragments.
fn config(endpoints: &[String], cluster: &str, route: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
{route}
clusters:
  - name: app
    endpoints: [{}]
{cluster}
"#,
        eps.join(", ")
    )
}

/// Sends `n` requests from `concurrency` tasks; returns the `x-backend` of each (or the error).
async fn spread(url: &str, n: usize, concurrency: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let per = n / concurrency;
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let url = url.to_owned();
            let headers = headers.clone();
            tokio::spawn(async move {
                let c = client::http1();
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(a, b)| (a.as_str(), b.as_str()))
                    .collect();
                let mut out = Vec::with_capacity(per);
                for _ in 0..per {
                    out.push(match get_with(&c, &url, &h).await {
                        Ok(r) if r.status == 200 => r.header("x-backend").unwrap_or("?").to_owned(),
                        Ok(r) => format!(
                            "status {} {}",
                            r.status.as_u16(),
                            r.header("x-weft-error").unwrap_or("")
                        ),
                        Err(e) => format!("error {e}"),
                    });
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

fn share(results: &[String], name: &str) -> f64 {
    results.iter().filter(|r| *r == name).count() as f64 / results.len() as f64
}

fn metric(weft: &Weft, line_start: &str) -> f64 {
    let (_, text) = weft.admin_get("/metrics");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn endpoint_state(weft: &Weft, addr: &str) -> serde_json::Value {
    let (_, body) = weft.admin_get("/clusters");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["clusters"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["address"] == addr)
        .cloned()
        .unwrap_or_else(|| panic!("{addr} not in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peak_ewma_prefers_the_fast_endpoint_and_shifts_when_they_swap() {
    let fast = Backend::start("fast").await;
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_millis(40));
    let weft = Weft::start(
        WEFT,
        &config(
            &[fast.endpoint(), slow.endpoint()],
            "    lb: peak_ewma\n    ewma_decay: 1s",
            "",
        ),
    );
    let url = weft.url("main", "/");
    let first = spread(&url, 400, 4, &[]).await;
    assert!(
        share(&first, "fast") > 0.85,
        "fast got {}",
        share(&first, "fast")
    );

    // Swap: the one that was slow is fast now. The estimate of the newly slow one jumps at its
    // first slow answer; the other's decays within a few `ewma_decay`.
    fast.set_delay(Duration::from_millis(40));
    slow.set_delay(Duration::ZERO);
    let _settle = spread(&url, 200, 4, &[]).await;
    let after = spread(&url, 400, 4, &[]).await;
    assert!(
        share(&after, "slow") > 0.8,
        "the now-fast one got {}",
        share(&after, "slow")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_keys_and_moves_few_when_an_endpoint_is_added() {
    let backends = [
        Backend::start("b0").await,
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let eps: Vec<String> = backends.iter().map(Backend::endpoint).collect();
    let cluster = "    lb: ring_hash\n    hash_key: { header: x-user }";
    let mut weft = Weft::start(WEFT, &config(&eps[..3], cluster, ""));
    let c = client::http1();
    let owners = |weft: &Weft| {
        let url = weft.url("main", "/");
        let c = c.clone();
        async move {
            let mut map = HashMap::new();
            for i in 0..300 {
                let user = format!("user-{i}");
                let r = get_with(&c, &url, &[("x-user", &user)])
                    .await
                    .expect("request");
                map.insert(user, r.header("x-backend").expect("backend").to_owned());
            }
            map
        }
    };
    let before = owners(&weft).await;
    assert_eq!(before, owners(&weft).await, "a key stays on its endpoint");
    let used: std::collections::HashSet<&String> = before.values().collect();
    assert_eq!(used.len(), 3, "keys spread over all endpoints");

    weft.reload(&config(&eps, cluster, ""));
    let after = owners(&weft).await;
    let moved: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    // Ideal: a quarter move, all of them to the new endpoint.
    assert!(
        moved.len() < 300 * 2 / 5,
        "{} of 300 keys moved",
        moved.len()
    );
    assert!(!moved.is_empty());
    assert!(
        moved.iter().all(|k| after[*k] == "b3"),
        "keys moved between old endpoints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_ejected_then_readmitted_when_it_recovers() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let victim = Backend::start("victim").await;
    let victim_addr: SocketAddr = victim.addr;
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint(), b.endpoint(), victim.endpoint()],
            "    lb: round_robin\n    outlier_detection: { base_ejection_time: 1s, max_ejection_percent: 34 }",
            "",
        ),
    );
    let url = weft.url("main", "/");
    assert!(spread(&url, 30, 1, &[]).await.iter().any(|r| r == "victim"));

    drop(victim);
    // Retries (connect failures, by default) hide the dead endpoint from clients.
    let during = spread(&url, 60, 2, &[]).await;
    assert!(during.iter().all(|r| r == "a" || r == "b"), "{during:?}");
    let state = endpoint_state(&weft, &victim_addr.to_string());
    assert_eq!(state["health"], "ejected", "{state}");
    assert!(metric(&weft, "weft_upstream_ejections_total{cluster=\"app\"}") >= 1.0);

    // It comes back; after its ejection time it gets traffic again.
    let revived = Backend::start_on(victim_addr, "victim").await;
    eventually(
        Duration::from_secs(15),
        "the endpoint is re-admitted",
        || endpoint_state(&weft, &victim_addr.to_string())["health"] == "healthy",
    );
    let after = spread(&url, 30, 1, &[]).await;
    assert!(after.iter().any(|r| r == "victim"), "{after:?}");
    assert!(revived.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_dead_endpoint_of_three_costs_no_request_with_retries() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let refusing = RefusingPort::new().expect("a refusing port");
    let dead = refusing.addr().to_string();
    // Defaults: peak-EWMA counts each failure as a 1 s response, so the dead endpoint is all but
    // avoided after its first failures (and ejected if it kept getting tries); retries cover
    // those first failures.
    let weft = Weft::start(
        WEFT,
        &config(&[a.endpoint(), b.endpoint(), dead.clone()], "", ""),
    );
    let results = spread(&weft.url("main", "/"), 1000, 8, &[]).await;
    let failed: Vec<&String> = results.iter().filter(|r| *r != "a" && *r != "b").collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(results.len(), 1000);
    let tries = endpoint_state(&weft, &dead)["stats"]["requests_total"]
        .as_u64()
        .expect("count");
    assert!(tries < 50, "{tries} tries went to the dead endpoint");

    // Outlier detection off, round robin: every third try goes to the dead endpoint, and only
    // retries save the request (a third of the requests retrying needs a wider budget than the
    // default 20 %).
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint(), b.endpoint(), dead],
            "    lb: round_robin\n    outlier_detection: { consecutive_5xx: 0, consecutive_gateway_errors: 0, consecutive_connect_failures: 0 }\n    retry_budget: { ratio: 0.5 }",
            "      retries: { attempts: 2, on: [connect-failure] }",
        ),
    );
    let results = spread(&weft.url("main", "/"), 1000, 8, &[]).await;
    let failed: Vec<&String> = results.iter().filter(|r| *r != "a" && *r != "b").collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(results.len(), 1000);
    assert!(metric(&weft, "weft_upstream_retries_total{cluster=\"app\"}") >= 300.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_retry_budget_stops_retries_when_everything_fails() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint(), b.endpoint()],
            "    outlier_detection: { consecutive_5xx: 0, consecutive_gateway_errors: 0 }\n    retry_budget: { ratio: 0.2, min_per_second: 1, window: 10s }",
            "      retries: { attempts: 3, on: [5xx], backoff: { base: 1ms, max: 2ms } }",
        ),
    );
    let results = spread(&weft.url("main", "/status/503"), 200, 4, &[]).await;
    assert!(
        results.iter().all(|r| r.starts_with("status 503")),
        "{:?}",
        &results[..3]
    );
    let retries = metric(&weft, "weft_upstream_retries_total{cluster=\"app\"}");
    let refused = metric(&weft, "weft_upstream_retry_overflow_total{cluster=\"app\"}");
    // Without a budget: 600 retries. With it: 10 (1/s × 10 s) + 20 % of 200.
    assert!(retries <= 52.0, "{retries} retries");
    assert!(retries >= 40.0, "{retries} retries");
    assert!(refused > 100.0, "{refused} refused");
    assert!(a.requests() + b.requests() <= 252);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn circuit_breaker_overflow_is_503() {
    let a = Backend::start("a").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint()],
            "    circuit_breakers: { max_requests: 2 }",
            "",
        ),
    );
    let results = spread(&weft.url("main", "/delay/300"), 10, 10, &[]).await;
    let ok = results.iter().filter(|r| *r == "a").count();
    let overflow = results
        .iter()
        .filter(|r| *r == "status 503 overflow")
        .count();
    assert_eq!(ok + overflow, 10, "{results:?}");
    assert!((2..=4).contains(&ok), "{results:?}");
    assert!(
        metric(
            &weft,
            "weft_upstream_overflow_total{cluster=\"app\",kind=\"requests\"}"
        ) >= 6.0
    );
    // Once the burst is over, the breaker admits again.
    assert_eq!(spread(&weft.url("main", "/"), 2, 1, &[]).await, ["a", "a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_an_endpoint_out_and_bring_it_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint(), b.endpoint()],
            "    lb: round_robin\n    health_check: { http: { path: /healthz }, interval: 100ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 2, jitter: 10ms }",
            "",
        ),
    );
    b.set_healthy(false);
    eventually(Duration::from_secs(10), "b is marked unhealthy", || {
        endpoint_state(&weft, &b.endpoint())["health"] == "unhealthy"
    });
    let results = spread(&weft.url("main", "/"), 40, 2, &[]).await;
    assert!(results.iter().all(|r| r == "a"), "{results:?}");
    assert!(
        metric(
            &weft,
            "weft_upstream_health_checks_total{cluster=\"app\",kind=\"failure\"}"
        ) >= 2.0
    );

    b.set_healthy(true);
    eventually(Duration::from_secs(10), "b is healthy again", || {
        endpoint_state(&weft, &b.endpoint())["health"] == "healthy"
    });
    let results = spread(&weft.url("main", "/"), 40, 2, &[]).await;
    assert!(results.iter().any(|r| r == "b"), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_checks_notice_a_closed_port() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let b_addr = b.endpoint();
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint(), b.endpoint()],
            "    health_check: { tcp: {}, interval: 100ms, unhealthy_threshold: 1, jitter: 0s }",
            "",
        ),
    );
    drop(b);
    eventually(
        Duration::from_secs(10),
        "the closed port is unhealthy",
        || endpoint_state(&weft, &b_addr)["health"] == "unhealthy",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fire_where_configured() {
    let a = Backend::start("a").await;

    // Per try: each try gets 150 ms, two tries, then 504. (HTTP/2 to the backend: the gRPC
    // request below needs it.)
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint()],
            "    protocol: http2",
            "      timeout: 10s\n      retries: { attempts: 1, on: [reset], per_try_timeout: 150ms, backoff: { base: 1ms, max: 1ms } }",
        ),
    );
    let r = client::get(&client::http1(), &weft.url("main", "/delay/2000"))
        .await
        .expect("request");
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-weft-error"), Some("upstream_timeout"));
    assert_eq!(
        metric(
            &weft,
            "weft_upstream_timeouts_total{cluster=\"app\",kind=\"per_try\"}"
        ),
        2.0
    );

    // A gRPC client's own deadline (grpc-timeout) ends the request with DEADLINE_EXCEEDED.
    let r = get_with(
        &client::h2c(),
        &weft.url("main", "/delay/2000"),
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", "100m"),
        ],
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("4"));
    assert_eq!(r.header("x-weft-error"), Some("upstream_timeout"));

    // Connect: a listener whose accept queue is full drops SYNs, so connecting hangs.
    let full =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    full.listen(0).expect("listen");
    let full_addr = full.local_addr().expect("addr").as_socket().expect("inet");
    let _fillers: Vec<std::net::TcpStream> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&full_addr, Duration::from_millis(200)).ok()
        })
        .collect();
    let weft = Weft::start(
        WEFT,
        &config(
            &[full_addr.to_string()],
            "    connect_timeout: 200ms",
            "      retries: { attempts: 0 }",
        ),
    );
    let r = client::get(&client::http1(), &weft.url("main", "/"))
        .await
        .expect("request");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-weft-error"), Some("upstream_connect_timeout"));
    assert_eq!(
        metric(
            &weft,
            "weft_upstream_timeouts_total{cluster=\"app\",kind=\"connect\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_are_reset_after_the_stream_idle_timeout() {
    let a = Backend::start("a").await;
    let yaml = config(&[a.endpoint()], "", "      timeout: 0s").replace(
        "routes: main }",
        "routes: main, http: { stream_idle_timeout: 300ms } }",
    );
    let weft = Weft::start(WEFT, &yaml);
    let url = weft.url("main", "/stall");
    let (ok, out, _) = tokio::task::spawn_blocking(move || client::curl(&["-m", "20", &url]))
        .await
        .expect("curl");
    // The first chunk arrived, then the stream was cut (curl fails on the incomplete body).
    assert!(!ok);
    assert_eq!(out, "first chunk\n");
    assert_eq!(
        metric(
            &weft,
            "weft_upstream_timeouts_total{cluster=\"app\",kind=\"stream_idle\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_replayed_up_to_the_limit_and_not_beyond() {
    let a = Backend::start("a").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &[a.endpoint()],
            "    outlier_detection: { consecutive_5xx: 0, consecutive_gateway_errors: 0 }",
            "      retries: { attempts: 2, on: [5xx], replay_buffer: 1KiB, backoff: { base: 1ms, max: 1ms } }",
        ),
    );
    let post = |len: usize| {
        let url = weft.url("main", "/consume/503");
        async move {
            let req = http::Request::post(url)
                .body(Full::new(Bytes::from(vec![b'x'; len])))
                .expect("request");
            client::send(&client::http1(), req).await.expect("post")
        }
    };
    // Small: sent three times, every time in full.
    let before = a.requests();
    let r = post(512).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "512", "the last try carried the whole body");
    assert_eq!(a.requests() - before, 3);

    // Larger than the replay buffer: not retried.
    let before = a.requests();
    let r = post(4096).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "4096");
    assert_eq!(a.requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_by_dns_refresh_gets_traffic() {
    // `localhost` resolves to 127.0.0.1; the cluster lists it by name, so it is refreshed.
    let a = Backend::start_on("127.0.0.1:0".parse().expect("addr"), "a").await;
    let weft = Weft::start(
        WEFT,
        &config(
            &[format!("localhost:{}", a.addr.port())],
            "    dns_refresh: 1s",
            "",
        ),
    );
    let results = spread(&weft.url("main", "/"), 10, 1, &[]).await;
    assert!(results.iter().all(|r| r == "a"), "{results:?}");
    let state = endpoint_state(&weft, &a.endpoint());
    assert_eq!(state["hostname"], format!("localhost:{}", a.addr.port()));
}

/// A backend that answers the first request of each connection and closes the connection on
/// the second without answering: an idle keep-alive connection closed just as it is reused.
async fn closes_reused_connections() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for served in 0.. {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if served == 1 {
                        return;
                    }
                    buf.clear();
                    let answer =
                        b"HTTP/1.1 200 OK\r\nx-backend: flaky\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_under_a_get_costs_no_request() {
    let (addr, backend) = closes_reused_connections().await;
    // No retries at all: what saves the GET is the resend on a new connection.
    let weft = Weft::start_with(
        WEFT,
        &config(
            &[addr.to_string()],
            "    outlier_detection: { consecutive_5xx: 0, consecutive_gateway_errors: 0, consecutive_connect_failures: 0 }",
            "      retries: { attempts: 0 }",
        ),
        &["--workers", "1"],
    );
    let url = weft.url("main", "/");
    let c = client::http1();
    for i in 0..5 {
        let r = get_with(&c, &url, &[]).await.expect("request");
        assert_eq!(r.status, 200, "GET {i}: {:?}", r.header("x-weft-error"));
    }
    let resends = metric(&weft, "weft_upstream_stale_resends_total{cluster=\"app\"}");
    assert!(resends >= 4.0, "{resends} resends");

    // A request with a body is not sent twice: the client hears of the failure.
    let req = http::Request::post(&url)
        .body(Full::new(Bytes::from_static(b"once")))
        .expect("request");
    let r = client::send(&c, req).await.expect("response");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-weft-error"), Some("upstream_reset"));
    backend.abort();
}
