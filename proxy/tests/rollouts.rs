//! Staged filter rollouts with real processes: weft-cp, three proxies under continuous load,
//! weftctl. A bad new revision is rolled back during its first step and never reaches the
//! other proxies; a good one reaches every proxy step by step, across a weft-cp restart; pause,
//! resume and abort; and what a rollout refuses.

mod cp;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cp::{Cp, TOKEN, WEFT, stdout, write};
use weft_testkit::filters;
use weft_testkit::{Backend, Weft, client, eventually};

const BOOTSTRAP: &str = "drain: { grace_period: 1s }\n";

fn proxy(addr: &str, id: &str, state: &Path) -> Weft {
    let url = format!("http://{addr}");
    let state = state.join(id).to_string_lossy().into_owned();
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
}

/// weft-cp, three proxies serving `main` through filter `ver` (x-version: v1).
async fn mesh(dir: &Path) -> (Cp, Vec<Weft>, Backend) {
    let backend = Backend::start("app").await;
    let cp = Cp::start(&dir.join("store.json"), "127.0.0.1:0");
    let addr = cp.addr.to_string();
    let proxies: Vec<Weft> = ["p1", "p2", "p3"]
        .iter()
        .map(|id| proxy(&addr, id, dir))
        .collect();
    let out = cp.ctl(&[
        "filter",
        "push",
        "ver",
        "--module",
        &filters::path("add_header"),
        "--config",
        "'x-version: v1'",
        "--select",
        "app=web",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let f = write(
        dir,
        "mesh.yaml",
        &format!(
            r#"
kind: cluster
spec: {{ name: app, endpoints: ["{}"] }}
---
kind: routes
spec: {{ name: main, routes: [ {{ to: [ {{ cluster: app }} ] }} ] }}
---
kind: listener
selector: {{ app: web }}
spec: {{ name: main, address: "127.0.0.1:0", routes: main, filters: [ver] }}
"#,
            backend.endpoint()
        ),
    );
    let out = cp.ctl(&["apply", "-f", &f]);
    assert!(
        stdout(&out).contains("3/3 proxies applied"),
        "{}",
        stdout(&out)
    );
    let mut proxies = proxies;
    for p in &mut proxies {
        p.refresh_listeners();
    }
    (cp, proxies, backend)
}

/// What each proxy answered: (status, x-version) counts, by proxy index.
type Seen = HashMap<(usize, u16, String), u64>;

/// Requests to every proxy in turn until `stop`, at most 20,000.
fn load(urls: Vec<String>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let c = client::http1();
        let mut seen = Seen::new();
        let started = Instant::now();
        for n in 0..20_000usize {
            if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120) {
                break;
            }
            let i = n % urls.len();
            let key = match client::get(&c, &urls[i]).await {
                Ok(r) => (
                    i,
                    r.status.as_u16(),
                    r.header("x-version").unwrap_or_default().to_owned(),
                ),
                Err(e) => (i, 0, e),
            };
            *seen.entry(key).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

fn status_of(cp: &Cp, name: &str) -> String {
    stdout(&cp.ctl(&["filter", "status", name]))
}

fn phase(cp: &Cp, name: &str) -> String {
    status_of(cp, name)
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .trim_end_matches(',')
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_revision_is_rolled_back_in_its_first_step_and_never_reaches_the_others() {
    let dir = tempfile::tempdir().expect("dir");
    let (cp, proxies, _backend) = mesh(dir.path()).await;
    let urls: Vec<String> = proxies.iter().map(|p| p.url("main", "/")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(urls.clone(), stop.clone());

    let out = cp.ctl(&[
        "filter",
        "rollout",
        "ver",
        "--module",
        &filters::path("flaky"),
        "--config",
        "'x-version: v2'",
        "--steps",
        "5,50,100",
        "--step-time",
        "60s",
        "--max-error-rate",
        "1%",
        "--min-requests",
        "10",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("running, step 1 of 3"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("1 of 3 proxies"), "{}", stdout(&out));
    eventually(
        Duration::from_secs(60),
        "the rollout is rolled back",
        || phase(&cp, "ver") == "rolled_back",
    );
    // Traffic after the rollback: every proxy on v1.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.expect("load");

    let touched: Vec<usize> = (0..3)
        .filter(|i| {
            seen.keys()
                .any(|(p, status, v)| p == i && (*status != 200 || v == "v2"))
        })
        .collect();
    assert_eq!(touched.len(), 1, "only the canary ran v2: {seen:?}");
    let canary = touched[0];
    assert!(
        seen.keys().any(|(p, s, _)| *p == canary && *s == 500),
        "the canary failed requests: {seen:?}"
    );
    for (p, status, version) in seen.keys() {
        if *p != canary {
            assert_eq!((*status, version.as_str()), (200, "v1"), "{seen:?}");
        }
    }
    // After the rollback the canary serves v1 again.
    let c = client::http1();
    for url in &urls {
        let r = client::get(&c, url).await.expect("served");
        assert_eq!(
            (r.status.as_u16(), r.header("x-version")),
            (200, Some("v1")),
            "{url}"
        );
    }
    let status = status_of(&cp, "ver");
    assert!(status.contains("rolled back: error rate"), "{status}");
    assert!(status.contains("limit +1.00 %"), "{status}");
    let got = stdout(&cp.ctl(&["get", "filter", "ver"]));
    assert!(got.contains("'x-version: v1'"), "{got}");
    // The rollout is history: a new one of the filter may start; the filter may change again.
    let history = stdout(&cp.ctl(&["history"]));
    assert!(history.contains("rolled back"), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_revision_reaches_every_proxy_step_by_step_across_a_weft_cp_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let (cp, proxies, _backend) = mesh(dir.path()).await;
    let urls: Vec<String> = proxies.iter().map(|p| p.url("main", "/")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(urls.clone(), stop.clone());

    let out = cp.ctl(&[
        "filter",
        "rollout",
        "ver",
        "--module",
        &filters::path("add_header"),
        "--config",
        "'x-version: v2'",
        "--steps",
        "5,50,100",
        "--step-time",
        "2s",
        "--min-requests",
        "5",
        // The revision is good by construction; the time in the filter is wall time, and on a
        // loaded machine the p99 of a few dozen requests moves by milliseconds. The latency
        // guard is not what this test is about.
        "--max-p99-increase",
        "10s",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    eventually(Duration::from_secs(60), "step 2", || {
        status_of(&cp, "ver").contains("step 2 of 3")
    });
    // weft-cp restarts mid-rollout: the rollout picks up where it stood.
    let addr = cp.addr.to_string();
    drop(cp);
    let cp = Cp::start(&dir.path().join("store.json"), &addr);
    let after = status_of(&cp, "ver");
    assert!(
        after.contains("step 2 of 3") || after.contains("step 3 of 3"),
        "{after}"
    );
    eventually(Duration::from_secs(60), "completed", || {
        phase(&cp, "ver") == "completed"
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.expect("load");
    assert!(
        seen.keys().all(|(_, status, _)| *status == 200),
        "no failed request: {seen:?}"
    );
    let c = client::http1();
    for url in &urls {
        let r = client::get(&c, url).await.expect("served");
        assert_eq!(r.header("x-version"), Some("v2"), "{url}");
    }
    let status = status_of(&cp, "ver");
    for step in [
        "started: rollout filter/ver: step 1 of 3",
        "step 1 (5 %) passed",
        "step 2 of 3 (50 %)",
        "step 3 of 3 (100 %)",
        "completed: every proxy runs revision",
    ] {
        assert!(status.contains(step), "{step} in {status}");
    }
    let got = stdout(&cp.ctl(&["get", "filter", "ver"]));
    assert!(got.contains("'x-version: v2'"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_abort_and_what_a_rollout_refuses() {
    let dir = tempfile::tempdir().expect("dir");
    let (cp, proxies, _backend) = mesh(dir.path()).await;
    let v2 = filters::path("add_header");
    let rollout = |extra: &[&str]| {
        let mut args = vec![
            "filter",
            "rollout",
            "ver",
            "--module",
            &v2,
            "--config",
            "'x-version: v2'",
        ];
        args.extend_from_slice(extra);
        cp.ctl(&args)
    };
    let refused = |out: std::process::Output, want: &str| {
        assert!(!out.status.success(), "{}", stdout(&out));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains(want), "{want}: {err}");
    };
    let version = || stdout(&cp.ctl(&["history"])).lines().count();
    let before = version();
    refused(rollout(&["--steps", "50,20"]), "must increase");
    refused(rollout(&["--steps", "5,50"]), "the last step is 100");
    refused(rollout(&["--step-time", "10ms"]), "step time");
    refused(rollout(&["--max-error-rate", "150%"]), "0% to 100%");
    refused(
        cp.ctl(&["filter", "rollout", "nope", "--module", &v2]),
        "no filter/nope",
    );
    refused(
        cp.ctl(&[
            "filter",
            "rollout",
            "ver",
            "--module",
            &v2,
            "--config",
            "'x-version: v1'",
        ]),
        "as it runs",
    );
    refused(
        cp.ctl(&[
            "filter",
            "rollout",
            "ver",
            "--module",
            &v2,
            "--config",
            "not a header",
        ]),
        "configuration was rejected",
    );
    refused(
        cp.ctl(&["filter", "rollout", "ver", "--pause"]),
        "no rollout",
    );
    assert_eq!(version(), before, "nothing refused made a version");

    let out = rollout(&[
        "--steps",
        "50,100",
        "--step-time",
        "1h",
        "--min-requests",
        "1",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    refused(rollout(&["--steps", "50,100"]), "already being rolled out");
    // The filter changes through its rollout only.
    refused(
        cp.ctl(&[
            "filter",
            "push",
            "ver",
            "--module",
            &v2,
            "--config",
            "'x-version: v3'",
        ]),
        "is being rolled out",
    );
    refused(cp.ctl(&["delete", "filter", "ver"]), "is being rolled out");

    let out = cp.ctl(&["filter", "rollout", "ver", "--pause"]);
    assert!(stdout(&out).contains("rollout: paused"), "{}", stdout(&out));
    refused(
        cp.ctl(&["filter", "rollout", "ver", "--pause"]),
        "is paused",
    );
    let out = cp.ctl(&["filter", "rollout", "ver", "--resume"]);
    assert!(
        stdout(&out).contains("rollout: running"),
        "{}",
        stdout(&out)
    );

    // Two of three proxies are canaries at 50 %.
    let c = client::http1();
    let versions = || async {
        let mut v = Vec::new();
        for p in &proxies {
            let r = client::get(&c, &p.url("main", "/")).await.expect("served");
            v.push(r.header("x-version").unwrap_or_default().to_owned());
        }
        v.sort();
        v
    };
    let mut now = Vec::new();
    for _ in 0..100 {
        now = versions().await;
        if now == ["v1", "v2", "v2"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, ["v1", "v2", "v2"]);

    let out = cp.ctl(&["filter", "rollout", "ver", "--abort"]);
    assert!(
        stdout(&out).contains("rollout: aborted"),
        "{}",
        stdout(&out)
    );
    for _ in 0..100 {
        now = versions().await;
        if now == ["v1", "v1", "v1"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, ["v1", "v1", "v1"]);
    refused(
        cp.ctl(&["filter", "rollout", "ver", "--resume"]),
        "is aborted",
    );
    // After the rollout, the filter changes as any resource does.
    let out = cp.ctl(&[
        "filter",
        "push",
        "ver",
        "--module",
        &v2,
        "--config",
        "'x-version: v3'",
        "--select",
        "app=web",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
}
