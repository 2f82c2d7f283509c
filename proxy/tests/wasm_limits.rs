//! A filter cannot make the host allocate without bound: hostile guests (WAT) that grow every
//! host-side buffer they can reach get error statuses past the caps, while the proxy's memory
//! stays bounded and other streams are served. `weft validate` runs the same bounded start-up.

mod wasm_guests;

use std::process::{Command, Stdio};
use std::time::Duration;

use weft_testkit::{Backend, Weft, client, eventually};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// Runs `cmd` to its end; its exit success and its own peak resident memory in KiB (from
/// `wait4`, so nothing else this test process ran is counted).
// The child is reaped by `wait4`, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (bool, u64, String) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.expect("stderr");
    // Keeps the first 64 KiB (a regression could print gigabytes).
    let reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            let room = (65536 - kept.len()).min(n);
            kept.extend_from_slice(&buf[..room]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not waited for yet; the pointers are valid for the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4");
    let err = reader.join().expect("stderr reader");
    (
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss as u64,
        err,
    )
}

#[test]
fn weft_validate_survives_a_module_that_floods_stdout_at_start_up() {
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "flood", &wasm_guests::stdout_flood());
    let config = dir.path().join("weft.yaml");
    std::fs::write(
        &config,
        format!("filters:\n  - {{ name: flood, module: \"{module}\", limits: {{ cpu_per_call: 30s }} }}\n"),
    )
    .expect("write");
    let (ok, peak_kib, err) = run_measured(
        Command::new(WEFT)
            .args(["validate", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info"),
    );
    assert!(ok, "validate failed: {err}");
    // 200 iovecs over one 15 MiB buffer were 3 GB of copies (18 GB peak, seen); now the
    // guest's own 16 MiB, the compiler and a few log lines of at most 16 KiB.
    assert!(
        peak_kib < 300 * 1024,
        "weft validate peaked at {} MiB",
        peak_kib / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_filter_is_refused_by_every_cap_while_the_proxy_stays_small() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "greedy", &wasm_guests::greedy());
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: greedy, address: "127.0.0.1:0", routes: main, filters: [greedy] }}
  - {{ name: plain, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - name: greedy
    module: "{module}"
    limits: {{ cpu_per_call: 30s, shared_data: 1MiB, queue_bytes: 1MiB }}
"#,
            app.endpoint()
        ),
    );
    let c = client::http1();
    for _ in 0..3 {
        // Whatever the greedy request gets, the proxy answers it.
        client::get(&c, &weft.url("greedy", "/"))
            .await
            .expect("an answer");
        let r = client::get(&c, &weft.url("plain", "/"))
            .await
            .expect("plain");
        assert_eq!(r.status, 200, "other streams are served");
    }
    for refusal in [
        "refused:shared",
        "refused:queue",
        "refused:property",
        "refused:header",
        "refused:body",
        "refused:callout",
        "fd_write:ok",
        "log:ok",
        "more bytes dropped: limits.log_line",
    ] {
        eventually(Duration::from_secs(10), refusal, || {
            weft.log_contains(refusal)
        });
    }
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.contains("weft_wasm_metrics_dropped_total{filter=\"greedy\"}"),
        "{metrics}"
    );
    let (_, peak_kib) = weft.memory_kb();
    // Two workers' VMs (16 MiB of guest memory each, touched) and the proxy: far from the
    // gigabytes the guest asked for.
    assert!(
        peak_kib < 400 * 1024,
        "weft peaked at {} MiB",
        peak_kib / 1024
    );
}

/// Nobody reads weft's log (a stuck terminal, a full pipe) while a filter logs ten 16 KiB lines
/// per request: requests are still served, and the lines the writer could not take are
/// dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_never_stalls_requests() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let module = wasm_guests::write(dir.path(), "chatty", &wasm_guests::chatty());
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [chatty] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - {{ name: chatty, module: "{module}" }}
"#,
            app.endpoint()
        ),
    );
    weft.stall_log();
    let c = client::http1();
    // 10 lines each: far more than the pipe and the log queue hold together.
    for i in 0..1000 {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            client::get(&c, &weft.url("main", "/")),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} stalled behind the log"))
        .expect("served");
        assert_eq!(r.status, 200);
    }
    let (_, metrics) = weft.admin_get("/metrics");
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_log_lines_dropped_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no weft_log_lines_dropped_total in {metrics}"));
    assert!(dropped > 0.0, "{dropped} lines dropped");
    weft.resume_log();
}

fn filters_yaml(dir: &std::path::Path, names: &[u32], pool: u32, app: &str) -> String {
    let mut filters = String::new();
    let mut chain = Vec::new();
    for n in names {
        let module = wasm_guests::write(dir, &format!("m{n}"), &wasm_guests::numbered(*n));
        filters.push_str(&format!("  - {{ name: f{n}, module: \"{module}\" }}\n"));
        chain.push(format!("f{n}"));
    }
    format!(
        r#"
wasm: {{ pool_instances: {pool} }}
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [{}] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
filters:
{filters}"#,
        chain.join(", ")
    )
}

/// The VM pool is planned: a configuration whose filters cannot all have their VMs on every
/// worker (with the old configuration's while it drains) is refused at start and at reload,
/// located — not answered with 500s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_the_vm_pool_cannot_hold_is_refused_up_front() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    // 3 filters on 2 workers: 2 × (3 + 1) + 1 = 9 VMs; a pool of 8 cannot start it.
    let config = dir.path().join("weft.yaml");
    std::fs::write(
        &config,
        filters_yaml(dir.path(), &[1, 2, 3], 8, &app.endpoint()),
    )
    .expect("write");
    let out = Command::new(WEFT)
        .args(["run", "--workers", "2", "--config"])
        .arg(&config)
        .output()
        .expect("weft runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("filters: 3 filter VMs on 2 workers need 9 VMs at once")
            && err.contains("the VM pool holds 8"),
        "{err}"
    );

    // With room for it, it runs; a reload to four other filters (7 VMs alive while the old
    // ones drain: 17 > 16) is refused and the running configuration keeps serving.
    let mut weft = Weft::start(
        WEFT,
        &filters_yaml(dir.path(), &[1, 2, 3], 16, &app.endpoint()),
    );
    let c = client::http1();
    assert_eq!(
        client::get(&c, &weft.url("main", "/"))
            .await
            .expect("served")
            .status,
        200
    );
    let before = weft.version();
    weft.write_config_and_hup(&filters_yaml(
        dir.path(),
        &[4, 5, 6, 7],
        16,
        &app.endpoint(),
    ));
    eventually(Duration::from_secs(20), "the reload is refused", || {
        weft.log_contains("need 17 VMs at once")
    });
    assert_eq!(weft.version(), before);
    assert_eq!(
        client::get(&c, &weft.url("main", "/"))
            .await
            .expect("served")
            .status,
        200
    );
    // A pool size cannot change while running.
    weft.write_config_and_hup(&filters_yaml(dir.path(), &[1, 2, 3], 64, &app.endpoint()));
    eventually(Duration::from_secs(20), "the resize is refused", || {
        weft.log_contains("wasm.pool_instances: cannot change while running")
    });
    // One that fits is applied.
    weft.reload(&filters_yaml(dir.path(), &[1, 2], 16, &app.endpoint()));
    assert_eq!(
        client::get(&c, &weft.url("main", "/"))
            .await
            .expect("served")
            .status,
        200
    );
}

fn metric_value(weft: &Weft, name: &str) -> f64 {
    let (_, m) = weft.admin_get("/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// Modules no configuration uses any more are let go: 100 reloads, each to a module with a
/// new digest, keep the loaded modules to a handful and memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_no_configuration_uses_are_evicted() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().expect("dir");
    let mut weft = Weft::start(
        WEFT,
        &filters_yaml(dir.path(), &[1000], 512, &app.endpoint()),
    );
    let c = client::http1();
    let mut rss_at_10 = 0;
    for n in 1..=100 {
        weft.reload(&filters_yaml(dir.path(), &[1000 + n], 512, &app.endpoint()));
        // Each configuration serves (its VMs start on the workers).
        assert_eq!(
            client::get(&c, &weft.url("main", "/"))
                .await
                .expect("served")
                .status,
            200
        );
        if n == 10 {
            rss_at_10 = weft.memory_kb().0;
        }
    }
    // At most: the current module, the one it replaced, and one a worker's cached snapshot
    // still holds until that worker serves again (one per worker; the kit starts 2).
    let loaded = metric_value(&weft, "weft_wasm_modules_loaded");
    assert!(loaded <= 4.0, "{loaded} modules loaded after 100 pushes");
    let growth = weft.memory_kb().0.saturating_sub(rss_at_10);
    assert!(
        growth < 32 * 1024,
        "RSS grew by {} MiB over 90 pushes",
        growth / 1024
    );
}
