//! Wasm services through a real weft process: a module that works with no request (ticks,
//! shared data, callouts on a timer), started once per process or once per worker, restarted
//! when it fails, and stopped when the configuration drops it. The module (`tests/filters/hello`)
//! is written with the public `proxy-wasm` SDK in the manner of its `hello_world` example.

use std::time::Duration;

use weft_testkit::client;
use weft_testkit::filters;
use weft_testkit::{Backend, Weft, eventually};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A listener `main` whose filter `report` reads what service `hello` keeps in shared data
/// (same `vm_id`), and the service itself with `placement` and plugin `config`.
fn config(app: &str, placement: &str, service_config: &str) -> String {
    let module = filters::path("hello");
    let service = if placement.is_empty() {
        String::new()
    } else {
        format!(
            r#"
services:
  - name: hello
    module: "{module}"
    vm_id: hello
    vm_config: service
    config: "{service_config}"
    placement: {placement}
"#
        )
    };
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [report] }}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{app}"], connect_timeout: 1s }}
filters:
  - {{ name: report, module: "{module}", vm_id: hello, vm_config: reporter }}
{service}"#
    )
}

fn count(weft: &Weft, needle: &str) -> usize {
    weft.log_lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

const SERVICE_HELLO: &str = "Hello, World! (7 bytes of VM configuration: service)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_runs_once_per_process_with_no_request_and_its_work_reaches_filters() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(&app.endpoint(), "process", "tick_ms=50,callout=app"),
    );
    // No request has been made: the service started on its own, ticks, and calls out.
    eventually(Duration::from_secs(20), "the service ticks", || {
        count(&weft, "chance of rain") >= 3
    });
    eventually(Duration::from_secs(20), "the service's callout", || {
        app.requests() >= 1
    });
    // Once per process (two workers), and the validation run does not greet.
    assert_eq!(count(&weft, SERVICE_HELLO), 1, "{:#?}", weft.log_lines());
    assert_eq!(count(&weft, "service started"), 1);
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weft_wasm_hello_ticks") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // What the service kept in shared data reaches the filter on every worker.
    let c = client::http1();
    let mut seen = (0u64, String::new());
    for _ in 0..4 {
        let r = client::get(&c, &weft.url("main", "/"))
            .await
            .expect("response");
        assert_eq!(r.status, 200);
        seen = (
            r.header("x-hello-ticks")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            r.header("x-hello-last").unwrap_or_default().to_owned(),
        );
    }
    assert!(seen.0 >= 3, "{seen:?}");
    assert!(
        seen.1.contains("\"/hello\""),
        "the callout's answer: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_per_worker_and_a_reload_that_moves_or_drops_it() {
    let app = Backend::start("app").await;
    let mut weft = Weft::start(WEFT, &config(&app.endpoint(), "worker", "tick_ms=50"));
    eventually(Duration::from_secs(20), "a service on each worker", || {
        count(&weft, "service started") == 2
    });
    assert_eq!(count(&weft, SERVICE_HELLO), 2);

    // Back to one per process: worker 0's instance carries on (no new start), worker 1's
    // stops.
    weft.reload(&config(&app.endpoint(), "process", "tick_ms=50"));
    eventually(Duration::from_secs(20), "worker 1's service stops", || {
        count(&weft, "service stopped") == 1
    });
    assert_eq!(count(&weft, SERVICE_HELLO), 2);
    assert_eq!(count(&weft, "service started"), 2);

    // A new plugin configuration is a new instance.
    weft.reload(&config(&app.endpoint(), "process", "tick_ms=40"));
    eventually(Duration::from_secs(20), "the new instance", || {
        count(&weft, "service started") == 3
    });

    // Dropped: it stops, and its timer with it.
    weft.reload(&config(&app.endpoint(), "", ""));
    eventually(Duration::from_secs(20), "the service stops", || {
        count(&weft, "service stopped") == 3
    });
    // The timer is gone with the root context: the count settles.
    let settled = |weft: &Weft| {
        let before = count(weft, "chance of rain");
        std::thread::sleep(Duration::from_millis(300));
        count(weft, "chance of rain") == before
    };
    eventually(Duration::from_secs(20), "no more ticks", || settled(&weft));
    assert!(settled(&weft), "ticks go on after the service was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_traps_is_restarted_and_the_proxy_keeps_serving() {
    let app = Backend::start("app").await;
    let weft = Weft::start(
        WEFT,
        &config(&app.endpoint(), "process", "tick_ms=20,trap_at=3"),
    );
    eventually(Duration::from_secs(30), "restarts after traps", || {
        count(&weft, "service restarted after a failure") >= 2
    });
    // Each restart is a fresh VM that greets again and ticks again; one that keeps failing
    // fast is restarted less and less often.
    assert!(count(&weft, SERVICE_HELLO) >= 3);
    eventually(Duration::from_secs(30), "restarts back off", || {
        count(&weft, "the VM keeps failing; next start in") >= 1
    });
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weft_wasm_traps_total{") && l.contains("filter=\"hello\"")),
        "{metrics}"
    );
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/"))
        .await
        .expect("response");
    assert_eq!(r.status, 200);
}

fn validate(yaml: &str) -> (bool, String) {
    weft_testkit::validate(WEFT, yaml)
}

#[test]
fn bad_services_are_refused_located() {
    let module = filters::path("hello");
    let base = format!(
        r#"
filters:
  - {{ name: report, module: "{module}" }}
services:
"#
    );
    for (service, want) in [
        (
            format!(r#"  - {{ name: hello, module: "{module}", config: "bogus" }}"#),
            "services[0].config",
        ),
        (
            format!(r#"  - {{ name: report, module: "{module}" }}"#),
            "services[0].name: \"report\" is also a filter's name",
        ),
        (
            format!(
                r#"  - {{ name: a, module: "{module}" }}
  - {{ name: a, module: "{module}" }}"#
            ),
            "services[1].name: duplicate service name",
        ),
        (
            r#"  - { name: a, module: "/nonexistent.wasm" }"#.to_owned(),
            "services[0].module",
        ),
        (
            format!(r#"  - {{ name: a, module: "{module}", placement: everywhere }}"#),
            "placement",
        ),
        (
            format!(r#"  - {{ name: a, module: "{module}", limits: {{ memory: 1KiB }} }}"#),
            "services[0].limits.memory",
        ),
        (
            format!(r#"  - {{ name: "", module: "{module}" }}"#),
            "services[0].name: must not be empty",
        ),
    ] {
        let (ok, err) = validate(&format!("{base}{service}\n"));
        assert!(!ok, "{service} was accepted");
        assert!(err.contains(want), "{service}: {err}");
    }
    let (ok, err) = validate(&format!(
        "{base}  - {{ name: hello, module: \"{module}\", config: \"tick_ms=5\" }}\n"
    ));
    assert!(ok, "{err}");
}
