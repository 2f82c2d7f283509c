//! weft-cp replicas on a real etcd, with real proxies under continuous load: an apply on any
//! replica reaches every proxy, concurrent applies on two replicas both land as consecutive
//! versions, a killed replica's proxies move to the others without a failed request, etcd
//! going away changes nothing that serves (and applies are refused clearly until it is back),
//! and a replica that stops answering (SIGSTOP: a half-open link) is left by keepalive.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod cp;

use cp::{Cp, Etcd, TOKEN, WEFT, stdout, write};
use weft_testkit::{Backend, Weft, client, eventually};

const BOOTSTRAP: &str = "drain: { grace_period: 1s }\n";

/// A proxy of every replica in `cps` (it picks one at random, and moves on when it goes).
fn proxy(cps: &[&Cp], id: &str, state: &Path) -> Weft {
    let urls: Vec<String> = cps.iter().map(|c| c.url()).collect();
    let urls = urls.join(",");
    let state = state.join(id).to_string_lossy().into_owned();
    Weft::start_env(
        WEFT,
        BOOTSTRAP,
        &[
            "--workers",
            "1",
            "--insecure-plaintext",
            "--control-plane",
            &urls,
            "--node-id",
            id,
            "--state-dir",
            &state,
        ],
        &[("WEFT_CP_TOKEN", TOKEN)],
    )
}

/// The mesh, its cluster on `backend`.
fn mesh(backend: &Backend) -> String {
    format!(
        r#"
kind: cluster
spec: {{ name: app, endpoints: ["{}"] }}
---
kind: routes
spec: {{ name: main, routes: [ {{ to: [ {{ cluster: app }} ] }} ] }}
---
kind: listener
spec: {{ name: main, address: "127.0.0.1:0", routes: main }}
"#,
        backend.endpoint()
    )
}

fn cluster(name: &str, backend: &Backend) -> String {
    format!(
        "kind: cluster\nspec: {{ name: {name}, endpoints: [\"{}\"] }}\n",
        backend.endpoint()
    )
}

/// The proxies connected to `cp` now.
fn connected(cp: &Cp) -> Vec<String> {
    stdout(&cp.ctl(&["status"]))
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("connected"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The proxies `cp` reports connected, here or to another replica.
fn seen(cp: &Cp) -> Vec<String> {
    stdout(&cp.ctl(&["status"]))
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|s| s == "connected" || s.starts_with("via:"))
        })
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The backend each proxy's `main` listener reaches.
async fn backends(proxies: &[Weft]) -> Vec<String> {
    let c = client::http1();
    let mut out = Vec::new();
    for p in proxies {
        let b = match client::get(&c, &p.url("main", "/")).await {
            Ok(r) => r.header("x-backend").unwrap_or_default().to_owned(),
            Err(e) => e,
        };
        out.push(b);
    }
    out
}

/// Requests to every URL in turn until `stop` (at most 3 minutes, 40,000 requests): the
/// failures, with what they were.
fn load(urls: Vec<String>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let c = client::http1();
        let started = Instant::now();
        let mut ok = 0;
        let mut failed = Vec::new();
        for n in 0..40_000usize {
            if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(180) {
                break;
            }
            match client::get(&c, &urls[n % urls.len()]).await {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failed.push(format!("{}: {}", urls[n % urls.len()], r.status)),
                Err(e) => failed.push(format!("{}: {e}", urls[n % urls.len()])),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failed)
    })
}

/// Version numbers and changes of `history`.
fn history(cp: &Cp) -> Vec<(u64, String)> {
    stdout(&cp.ctl(&["history"]))
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let n = w.next()?.parse().ok()?;
            let _at = w.next()?;
            Some((n, w.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_etcd_share_changes_and_proxies_fail_over_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("dir");
    let mut etcd = Etcd::start(dir.path());
    let store = etcd.url();
    let store = Path::new(&store);
    let mut cps: Vec<Option<Cp>> = (0..3)
        .map(|_| Some(Cp::start(store, "127.0.0.1:0")))
        .collect();
    let one = Backend::start("one").await;
    let two = Backend::start("two").await;
    let three = Backend::start("three").await;

    let all: Vec<&Cp> = cps.iter().flatten().collect();
    let mut proxies: Vec<Weft> = ["p-1", "p-2", "p-3"]
        .iter()
        .map(|id| proxy(&all, id, dir.path()))
        .collect();
    eventually(Duration::from_secs(30), "every proxy connects", || {
        all.iter().map(|c| connected(c).len()).sum::<usize>() == 3
    });

    // Every replica's status shows every proxy, wherever it is connected.
    for cp in &all {
        eventually(
            Duration::from_secs(10),
            "each replica sees all proxies",
            || seen(cp).len() == 3,
        );
    }

    // An apply on replica 1 reaches every proxy, and it waits for all of them.
    let f = write(dir.path(), "mesh.yaml", &mesh(&one));
    let out = all[0].ctl(&["apply", "-f", &f]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("3/3 proxies applied"),
        "{}",
        stdout(&out)
    );
    eventually(
        Duration::from_secs(30),
        "every proxy serves the mesh",
        || {
            proxies.iter_mut().all(|p| {
                p.refresh_listeners();
                p.listener("main").is_some()
            })
        },
    );
    assert_eq!(backends(&proxies).await, ["one", "one", "one"]);

    // Two applies at once on two replicas: both land, as consecutive versions, on every
    // replica; neither loses the other.
    let before = history(all[0]).last().map_or(0, |v| v.0);
    let fa = write(dir.path(), "a.yaml", &cluster("extra-a", &two));
    let fb = write(dir.path(), "b.yaml", &cluster("extra-b", &two));
    let (ra, rb) = std::thread::scope(|s| {
        let a = s.spawn(|| all[1].ctl(&["apply", "-f", &fa]));
        let b = s.spawn(|| all[2].ctl(&["apply", "-f", &fb]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(ra.status.success(), "{}", stdout(&ra));
    assert!(rb.status.success(), "{}", stdout(&rb));
    for cp in &all {
        eventually(
            Duration::from_secs(10),
            "both applies on every replica",
            || {
                let h = history(cp);
                let tail: Vec<&(u64, String)> = h.iter().filter(|v| v.0 > before).collect();
                tail.len() == 2
                    && tail[0].0 == before + 1
                    && tail[1].0 == before + 2
                    && tail.iter().any(|v| v.1.contains("extra-a"))
                    && tail.iter().any(|v| v.1.contains("extra-b"))
            },
        );
        let got = stdout(&cp.ctl(&["get", "cluster"]));
        assert!(
            got.contains("name: extra-a") && got.contains("name: extra-b"),
            "{got}"
        );
    }

    // Continuous load through every proxy from here on.
    let urls: Vec<String> = proxies.iter().map(|p| p.url("main", "/")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(urls, stop.clone());

    // Kill the replica with the most proxies: they move to the others within seconds.
    let counts: Vec<usize> = all.iter().map(|c| connected(c).len()).collect();
    let victim = (0..3).max_by_key(|&i| counts[i]).expect("a replica");
    drop(all);
    let mut gone = cps[victim].take().expect("victim");
    let _ = gone.child.kill();
    let _ = gone.child.wait();
    drop(gone);
    let left: Vec<&Cp> = cps.iter().flatten().collect();
    let moved = Instant::now();
    eventually(
        Duration::from_secs(20),
        "the killed replica's proxies reconnect to the others",
        || left.iter().map(|c| connected(c).len()).sum::<usize>() == 3,
    );
    let failover = moved.elapsed();
    // A change on a remaining replica reaches every proxy; the killed replica's publication
    // went with its lease (no proxy is shown twice or on a dead replica).
    for cp in &left {
        eventually(
            Duration::from_secs(30),
            "survivors see the 3 proxies once",
            || {
                let mut s = seen(cp);
                s.sort();
                s == ["p-1", "p-2", "p-3"]
            },
        );
    }
    let f = write(dir.path(), "mesh2.yaml", &mesh(&two));
    let out = left[0].ctl(&["apply", "-f", &f]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("3/3 proxies applied"),
        "{}",
        stdout(&out)
    );
    let c = client::http1();
    for p in &proxies {
        let url = p.url("main", "/");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = client::get(&c, &url).await.expect("served");
            if r.header("x-backend") == Some("two") {
                break;
            }
            assert!(Instant::now() < deadline, "the change reached {url}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // etcd goes away: proxies keep serving, applies are refused clearly and change nothing.
    let versions = history(left[0]);
    etcd.stop();
    let f3 = write(dir.path(), "mesh3.yaml", &mesh(&three));
    let out = left[1].ctl(&["apply", "-f", &f3]);
    assert!(!out.status.success(), "an apply without etcd is refused");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("cannot be reached") && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(history(left[0]), versions, "nothing changed");
    assert_eq!(history(left[1]), versions, "nothing changed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backends(&proxies).await, ["two", "two", "two"]);

    // etcd back: replicas catch up by themselves; an apply lands everywhere.
    etcd.restart();
    eventually(Duration::from_secs(30), "an apply is taken again", || {
        left[1].ctl(&["apply", "-f", &f3]).status.success()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while backends(&proxies).await != ["three", "three", "three"] {
        assert!(
            Instant::now() < deadline,
            "the change after etcd came back reached every proxy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The replica that did not take the apply follows etcd's watch, which it opens again
    // after a back-off of up to 5 s once etcd is back: its history catches up by itself.
    eventually(
        Duration::from_secs(30),
        "both replicas hold the same history",
        || history(left[0]) == history(left[1]),
    );
    let h0 = history(left[0]);
    assert_eq!(
        h0.len(),
        versions.len() + 1,
        "nothing lost, nothing doubled"
    );

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = running.await.expect("load");
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert!(
        failed.is_empty(),
        "no request failed through a replica's death and etcd's absence: {failed:?}"
    );
    eprintln!("failover took {failover:?}; {ok} requests, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_answering_is_left_by_keepalive_on_both_sides() {
    let dir = tempfile::tempdir().expect("dir");
    let etcd = Etcd::start(dir.path());
    let store = etcd.url();
    let store = Path::new(&store);
    let a = Cp::start(store, "127.0.0.1:0");
    let b = Cp::start(store, "127.0.0.1:0");
    let backend = Backend::start("one").await;
    let mut p = proxy(&[&a, &b], "p-1", dir.path());
    eventually(Duration::from_secs(30), "the proxy connects", || {
        connected(&a).len() + connected(&b).len() == 1
    });
    let f = write(dir.path(), "mesh.yaml", &mesh(&backend));
    assert!(a.ctl(&["apply", "-f", &f]).status.success());
    eventually(Duration::from_secs(30), "the proxy serves the mesh", || {
        p.refresh_listeners();
        p.listener("main").is_some()
    });
    let (on, other) = if connected(&a).len() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };

    // The proxy's replica stops (its sockets stay open: nothing tells the proxy).
    let pid = on.child.id() as i32;
    // SAFETY: kill(2) on a child of this test with a valid signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the proxy leaves the stopped replica for the other",
        || connected(other).len() == 1,
    );
    let proxy_side = stopped.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let r = client::get(&client::http1(), &p.url("main", "/"))
        .await
        .expect("served throughout");
    assert_eq!(r.status, 200);

    // The proxy stops: its replica finds the link dead and counts it gone.
    p.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the replica finds the stopped proxy gone",
        || connected(other).is_empty(),
    );
    let server_side = stopped.elapsed();
    p.signal(libc::SIGCONT);
    eprintln!(
        "half-open link found: by the proxy in {proxy_side:?}, by weft-cp in {server_side:?}"
    );
}

/// The pin weft-cp logged at start (the root its certificate chains to). The line may come
/// after the one the test waited for: it is waited for too (a busy machine delays it).
fn pin(cp: &Cp) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = cp
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find_map(|l| l.split("pin=").nth(1))
            .map(|p| p.split_whitespace().next().unwrap_or_default().to_owned());
        if let Some(pin) = found {
            return pin;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "weft-cp logs its pin within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_replicas_share_the_ca_and_the_registry_and_a_proxy_moves_with_its_identity() {
    let dir = tempfile::tempdir().expect("dir");
    let etcd = Etcd::start(dir.path());
    let store = etcd.url();
    let store = Path::new(&store);
    let admin = dir.path().join("admin");
    let a = Cp::start_tls_admin(store, "127.0.0.1:0", &[], &admin);
    let b = Cp::start_tls_admin(store, "127.0.0.1:0", &[], &admin);
    assert_eq!(pin(&a), pin(&b), "one CA for every replica");

    // Registrations made at once on two replicas are both kept.
    let (web1, web2) = std::thread::scope(|s| {
        let x = s.spawn(|| a.add_node("web-1", "shop/web", &["app=web"], &[]));
        let y = s.spawn(|| b.add_node("web-2", "shop/web", &["app=web"], &[]));
        (x.join().expect("web-1"), y.join().expect("web-2"))
    });
    for cp in [&a, &b] {
        eventually(
            Duration::from_secs(10),
            "both registrations everywhere",
            || {
                let list = stdout(&cp.ctl(&["node", "list"]));
                list.contains("web-1") && list.contains("web-2")
            },
        );
    }
    let backend = Backend::start("one").await;
    let f = write(dir.path(), "mesh.yaml", &mesh(&backend));
    assert!(b.ctl(&["apply", "-f", &f]).status.success());

    // A proxy enrolls (with a token made on replica a, wherever it lands) and serves.
    let urls = format!("{},{}", a.url(), b.url());
    let state = dir.path().join("web-1").to_string_lossy().into_owned();
    let mut p = Weft::start_env(
        WEFT,
        BOOTSTRAP,
        &[
            "--workers",
            "1",
            "--control-plane",
            &urls,
            "--state-dir",
            &state,
        ],
        &[("WEFT_JOIN_TOKEN", web1.lines().last().unwrap_or_default())],
    );
    eventually(Duration::from_secs(30), "the proxy serves the mesh", || {
        p.refresh_listeners();
        p.listener("main").is_some()
    });
    let (on, other) = if connected(&a).contains(&"web-1".to_owned()) {
        (a, b)
    } else {
        (b, a)
    };
    // Its replica goes: it moves to the other one with the same certificate.
    drop(on);
    eventually(
        Duration::from_secs(20),
        "the proxy reconnects to the other replica by its certificate",
        || connected(&other).contains(&"web-1".to_owned()),
    );
    let two = Backend::start("two").await;
    let f = write(dir.path(), "mesh2.yaml", &mesh(&two));
    let out = other.ctl(&["apply", "-f", &f]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("1/1 proxies applied"),
        "{}",
        stdout(&out)
    );
    let r = client::get(&client::http1(), &p.url("main", "/"))
        .await
        .expect("served");
    assert_eq!(r.header("x-backend"), Some("two"));
    drop(web2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_judged_on_the_figures_of_every_replicas_proxies() {
    let dir = tempfile::tempdir().expect("dir");
    let etcd = Etcd::start(dir.path());
    let store = etcd.url();
    let store = Path::new(&store);
    let a = Cp::start(store, "127.0.0.1:0");
    let b = Cp::start(store, "127.0.0.1:0");
    let backend = Backend::start("app").await;
    // p-1 on replica a, p-2 and p-3 on replica b.
    let mut proxies: Vec<Weft> = [("p-1", &a), ("p-2", &b), ("p-3", &b)]
        .iter()
        .map(|(id, cp)| {
            let state = dir.path().join(id).to_string_lossy().into_owned();
            let url = cp.url();
            Weft::start_env(
                WEFT,
                BOOTSTRAP,
                &[
                    "--workers",
                    "1",
                    "--insecure-plaintext",
                    "--control-plane",
                    &url,
                    "--node-id",
                    id,
                    "--label",
                    "app=web",
                    "--state-dir",
                    &state,
                ],
                &[("WEFT_CP_TOKEN", TOKEN)],
            )
        })
        .collect();
    eventually(Duration::from_secs(20), "a sees all three", || {
        seen(&a).len() == 3
    });
    let out = a.ctl(&[
        "filter",
        "push",
        "ver",
        "--module",
        &weft_testkit::filters::path("add_header"),
        "--config",
        "'x-version: v1'",
        "--select",
        "app=web",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let f = write(
        dir.path(),
        "mesh.yaml",
        &format!(
            "kind: cluster\nspec: {{ name: app, endpoints: [\"{}\"] }}\n---\nkind: routes\nspec: {{ name: main, routes: [ {{ to: [ {{ cluster: app }} ] }} ] }}\n---\nkind: listener\nselector: {{ app: web }}\nspec: {{ name: main, address: \"127.0.0.1:0\", routes: main, filters: [ver] }}\n",
            backend.endpoint()
        ),
    );
    let out = a.ctl(&["apply", "-f", &f]);
    assert!(
        stdout(&out).contains("3/3 proxies applied"),
        "{}",
        stdout(&out)
    );
    for p in &mut proxies {
        p.refresh_listeners();
    }
    let urls: Vec<String> = proxies.iter().map(|p| p.url("main", "/")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(urls, stop.clone());

    // A bad revision for one of the three, started on replica a: judged on all three's figures.
    let out = a.ctl(&[
        "filter",
        "rollout",
        "ver",
        "--module",
        &weft_testkit::filters::path("flaky"),
        "--config",
        "'x-version: v2'",
        "--steps",
        "30,100",
        "--step-time",
        "60s",
        "--max-error-rate",
        "1%",
        "--min-requests",
        "10",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    eventually(Duration::from_secs(60), "rolled back", || {
        stdout(&a.ctl(&["filter", "status", "ver"])).contains("rolled back: error rate")
    });
    stop.store(true, Ordering::Relaxed);
    let _ = running.await;
    let status = stdout(&a.ctl(&["filter", "status", "ver"]));
    let proxies_in = |cohort: &str| -> u32 {
        status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(cohort))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        (proxies_in("new"), proxies_in("old")),
        (1, 2),
        "the cohorts hold every replica's proxies: {status}"
    );
    assert!(
        stdout(&b.ctl(&["get", "filter", "ver"])).contains("'x-version: v1'"),
        "v1 everywhere after the rollback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_cp_talks_to_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = weft_testkit::tls::Pki::new("etcd");
    let server = pki.issue("etcd", &["localhost"]);
    let client = pki.issue("weft-cp", &["weft-cp"]);
    let etcd = Etcd::start_tls(dir.path(), &server.cert, &server.key, &pki.ca);
    // By name: the certificate is for localhost.
    let store = format!("etcd://localhost:{}", etcd.client.port());
    let (ca, cert, key) = (
        pki.ca.to_string_lossy().into_owned(),
        client.cert.to_string_lossy().into_owned(),
        client.key.to_string_lossy().into_owned(),
    );
    let cp = Cp::spawn(
        Path::new(&store),
        "127.0.0.1:0",
        false,
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );
    let f = write(
        dir.path(),
        "c.yaml",
        "kind: cluster\nspec: { name: c, endpoints: [\"127.0.0.1:9\"] }\n",
    );
    let out = cp.ctl(&["apply", "-f", &f]);
    assert!(out.status.success(), "{}", stdout(&out));
    // Another replica reads it over TLS too.
    let other = Cp::spawn(
        Path::new(&store),
        "127.0.0.1:0",
        false,
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );
    assert!(stdout(&other.ctl(&["get", "cluster"])).contains("name: c"));

    // Without a client certificate etcd drops the connection: weft-cp waits for it, serves
    // nothing (an empty state would take every proxy's configuration away) and says what may
    // be missing.
    let mut cmd = std::process::Command::new(cp::sibling("weft-cp"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--insecure-plaintext",
        "--store",
        &store,
    ])
    .args(["--etcd-ca", &ca])
    .env("WEFT_CP_TOKEN", TOKEN)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("weft-cp runs");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let waiting = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("waiting for etcd") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let waiting = waiting.unwrap_or_else(|| panic!("weft-cp says why it waits: {seen:?}"));
    assert!(waiting.contains("--etcd-cert"), "{waiting}");
    assert!(!seen.iter().any(|l| l.contains("listening")), "{seen:?}");
}
