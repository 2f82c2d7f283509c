//! Mesh identity with real processes and real TLS: weft-cp's CA, enrollment by join token,
//! the mTLS control link, renewal and root rotation. Hostile callers first: used, expired and
//! malformed tokens, a proxy's certificate trying an operator's calls or another node's
//! snapshot, plaintext, and a certificate from another CA.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod cp;

use cp::{Cp, Credential, TOKEN, WEFT, stdout, write};
use weft_proxy::control::link::{LinkSecurity, connect};
use weft_proxy::identity::{Identity, Material};
use weft_testkit::{Backend, Weft, client, eventually};
use weft_wire::v1;

/// The static parts (the test kit adds an admin listener).
const BOOTSTRAP: &str = "drain: { grace_period: 1s }\n";

/// A listener (named `<app>`), routes and a cluster for proxies labelled `app=<app>`, on
/// `port`.
fn config_for(app: &str, backend: &Backend, port: u16) -> String {
    format!(
        r#"
kind: cluster
selector: {{ app: {app} }}
spec: {{ name: app-{app}, endpoints: ["{}"] }}
---
kind: routes
selector: {{ app: {app} }}
spec: {{ name: routes-{app}, routes: [ {{ to: [ {{ cluster: app-{app} }} ] }} ] }}
---
kind: listener
selector: {{ app: {app} }}
spec: {{ name: {app}, address: "127.0.0.1:{port}", routes: routes-{app} }}
"#,
        backend.endpoint()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A proxy on the TLS link, enrolling with `token` if it has no identity in `state`.
fn proxy(cp: &Cp, state: &Path, token: Option<&str>, extra: &[&str]) -> Weft {
    let url = cp.url();
    let state = state.to_string_lossy().into_owned();
    let mut args = vec![
        "--workers",
        "1",
        "--control-plane",
        &url,
        "--state-dir",
        &state,
    ];
    args.extend(extra);
    let mut env = vec![];
    if let Some(t) = token {
        env.push(("WEFT_JOIN_TOKEN", t));
    }
    Weft::start_env(WEFT, BOOTSTRAP, &args, &env)
}

/// Runs weft expecting it to fail at start; answers what it printed.
fn proxy_fails(cp: &Cp, state: &Path, token: &str) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let config = write(dir.path(), "bootstrap.yaml", BOOTSTRAP);
    let mut child = Command::new(WEFT)
        .args([
            "run",
            "--config",
            &config,
            "--control-plane",
            &cp.url(),
            "--state-dir",
        ])
        .arg(state)
        .env("WEFT_JOIN_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weft starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(!status.success(), "weft started");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("weft did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Applies `mesh`, registers web-1 (shop/web, app=web) and starts it: its state directory, the
/// proxy, and the token it used.
fn apply_and_enroll_web(cp: &Cp, dir: &Path, mesh: &str) -> (std::path::PathBuf, Weft, String) {
    assert!(
        cp.ctl(&["apply", "-f", &write(dir, "mesh.yaml", mesh)])
            .status
            .success()
    );
    let token = cp.add_node("web-1", "shop/web", &["app=web"], &[]);
    let state = dir.join("web-1");
    let p = proxy(cp, &state, Some(&token), &[]);
    (state, p, token)
}

fn identity_of(state: &Path) -> std::sync::Arc<Identity> {
    Identity::new(
        Material::load(state)
            .expect("the identity loads")
            .expect("an identity is saved"),
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_enrolls_and_its_registration_decides_what_it_gets() {
    let dir = tempfile::tempdir().expect("dir");
    let cp = Cp::start_tls(&dir.path().join("cp.json"), "127.0.0.1:0", &[]);
    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let (web_port, api_port) = (free_port(), free_port());
    let mesh = format!(
        "{}---{}",
        config_for("web", &web, web_port),
        config_for("api", &api, api_port)
    );
    let out = cp.ctl(&["apply", "-f", &write(dir.path(), "mesh.yaml", &mesh)]);
    assert!(out.status.success());

    let token = cp.add_node("web-1", "shop/web", &["app=web"], &[]);
    assert!(token.starts_with("weft-join.web-1."), "{token}");
    // The proxy claims to be api-1, labelled app=api: its registration decides.
    let state = dir.path().join("web-1");
    let mut p = proxy(
        &cp,
        &state,
        Some(&token),
        &["--node-id", "api-1", "--label", "app=api"],
    );
    eventually(Duration::from_secs(20), "the web listener arrives", || {
        p.refresh_listeners();
        p.listener("web").is_some()
    });
    assert_eq!(p.addr("web").port(), web_port);
    assert_eq!(p.listener("api"), None);
    let r = client::get(&client::http1(), &p.url("web", "/"))
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("web"), "{}", r.text());

    // The key never left: it is in the proxy's state, mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let file = state.join("identity.json");
    let mode = std::fs::metadata(&file)
        .expect("identity")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let m = Material::load(&state).expect("loads").expect("saved");
    assert_eq!(
        m.svid.id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(m.svid.node, "web-1");

    let status = stdout(&cp.ctl(&["status"]));
    let line = status
        .lines()
        .find(|l| l.starts_with("web-1"))
        .unwrap_or_else(|| panic!("web-1 in {status}"));
    assert!(
        line.contains("connected") && line.contains("app=web"),
        "{line}"
    );
    assert!(
        line.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{line}"
    );
    assert!(!status.contains("api-1"), "{status}");

    // The token works once: a second proxy with it does not start.
    let e = proxy_fails(&cp, &dir.path().join("thief"), &token);
    assert!(e.contains("already used"), "{e}");
    // A restart needs no token: the saved identity serves.
    drop(p);
    let p = proxy(&cp, &state, None, &[]);
    eventually(Duration::from_secs(20), "reconnected", || {
        stdout(&cp.ctl(&["status"]))
            .lines()
            .any(|l| l.starts_with("web-1") && l.contains("connected"))
    });
    drop(p);
    let m = cp.metrics_text();
    assert_eq!(
        metric(&m, "weft_cp_certificates_issued_total{kind=\"enroll\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "weft_cp_csr_failures_total{reason=\"token_used\"}"),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "weft_cp_certificate_expiry_timestamp_seconds{node=\"web-1\"}"
        ) > 1.7e9,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let cp = Cp::start_tls(&dir.path().join("cp.json"), "127.0.0.1:0", &[]);
    let token = cp.add_node("short", "shop/web", &[], &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let e = proxy_fails(&cp, &dir.path().join("a"), &token);
    assert!(e.contains("expired"), "{e}");

    let token = cp.add_node("web", "shop/web", &[], &[]);
    // Malformed, a wrong secret, a pin of another root: each refused; the token still works.
    let e = proxy_fails(&cp, &dir.path().join("b"), "weft-join.web");
    assert!(e.contains("malformed"), "{e}");
    let parts: Vec<&str> = token.split('.').collect();
    let wrong_secret = format!("weft-join.web.{}.{}", "ab".repeat(32), parts[3]);
    let e = proxy_fails(&cp, &dir.path().join("c"), &wrong_secret);
    assert!(e.contains("not known"), "{e}");
    let wrong_pin = format!("weft-join.web.{}.{}", parts[2], "cd".repeat(32));
    let e = proxy_fails(&cp, &dir.path().join("d"), &wrong_pin);
    assert!(e.contains("cannot connect"), "{e}");
    let p = proxy(&cp, &dir.path().join("e"), Some(&token), &[]);
    drop(p);

    // Registrations that are malformed are refused.
    for bad in [
        vec!["node", "add", "Bad Name", "--identity", "a/b"],
        vec!["node", "add", "x", "--identity", "a"],
        vec!["node", "add", "x", "--identity", "../b"],
        vec!["node", "add", "x", "--identity", "a/b", "--label", "k"],
        vec!["node", "add", "web", "--identity", "a/b"],
    ] {
        assert!(!cp.ctl(&bad).status.success(), "{bad:?} was accepted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_certificate_cannot_act_as_an_operator_or_another_node() {
    let dir = tempfile::tempdir().expect("dir");
    let cp = Cp::start_tls(&dir.path().join("cp.json"), "127.0.0.1:0", &[]);
    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let mesh = format!(
        "{}---{}",
        config_for("web", &web, free_port()),
        config_for("api", &api, free_port())
    );
    let (state, p, token) = apply_and_enroll_web(&cp, dir.path(), &mesh);
    let before = stdout(&cp.ctl(&["get"]));

    let channel = connect(&cp.url(), &LinkSecurity::Mesh(identity_of(&state)))
        .await
        .expect("the proxy's certificate connects");
    let mut control = v1::control_client::ControlClient::new(channel.clone());
    fn denied<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) {
        let e = r.expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
    }
    denied(
        control
            .apply(v1::ApplyRequest {
                yaml: "kind: cluster\nspec: { name: evil, endpoints: [\"127.0.0.1:1\"] }\n".into(),
            })
            .await,
        "apply",
    );
    denied(
        control
            .upload_module(v1::UploadModuleRequest {
                module: vec![0, 97, 115, 109],
            })
            .await,
        "push",
    );
    denied(
        control.rollback(v1::RollbackRequest { version: 1 }).await,
        "rollback",
    );
    denied(control.get(v1::GetRequest::default()).await, "get");
    denied(control.status(v1::StatusRequest {}).await, "status");
    denied(
        control
            .add_node(v1::AddNodeRequest {
                name: "evil".into(),
                namespace: "a".into(),
                service_account: "b".into(),
                ..Default::default()
            })
            .await,
        "node add",
    );
    denied(control.rotate_ca(v1::RotateCaRequest {}).await, "ca rotate");

    // Subscribing as another node, with other labels: the certificate decides.
    let mut dist = v1::distribution_client::DistributionClient::new(channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::ProxyMessage {
        kind: Some(v1::proxy_message::Kind::Hello(v1::Hello {
            node_id: "api-1".into(),
            labels: [("app".to_owned(), "api".to_owned())].into(),
            ..Default::default()
        })),
    })
    .await
    .expect("hello");
    let mut pushes = dist
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("subscribed")
        .into_inner();
    let snapshot = loop {
        let push = tokio::time::timeout(Duration::from_secs(20), pushes.message())
            .await
            .expect("a push in time")
            .expect("stream")
            .expect("a push");
        if let Some(v1::push::Kind::Snapshot(mut s)) = push.kind {
            // A large configuration comes in parts.
            for _ in 0..s.parts {
                if let Ok(Some(v1::Push {
                    kind: Some(v1::push::Kind::Part(p)),
                })) = pushes.message().await
                {
                    s.config_json.extend_from_slice(&p.data);
                }
            }
            break s;
        }
    };
    let config = String::from_utf8_lossy(&snapshot.config_json);
    assert!(
        config.contains("app-web") && !config.contains("app-api"),
        "{config}"
    );
    // A module never sent to this node cannot be fetched.
    let e = dist
        .fetch_module(v1::ModuleRequest {
            digest: format!("sha256:{}", "0".repeat(64)),
        })
        .await
        .expect_err("fetch");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Enrolling again with the proxy's own certificate is no way in either.
    let mut identity = v1::identity_client::IdentityClient::new(channel);
    // Renewing in a loop is refused, not served.
    let csr = || {
        let key = weft_proxy::identity::svid::new_key().expect("key");
        weft_proxy::identity::svid::csr(&key).expect("csr")
    };
    identity
        .renew(v1::RenewRequest { csr: csr() })
        .await
        .expect("a renewal");
    let e = identity
        .renew(v1::RenewRequest { csr: csr() })
        .await
        .expect_err("a renewal right after");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let e = identity
        .enroll(v1::EnrollRequest {
            token: token.clone(),
            csr: vec![],
        })
        .await
        .expect_err("enroll");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Nothing changed.
    assert_eq!(stdout(&cp.ctl(&["get"])), before);

    // Removing the node closes its stream and keeps it out; it serves what it has.
    assert!(cp.ctl(&["node", "remove", "web-1"]).status.success());
    eventually(
        Duration::from_secs(20),
        "the removed node is cut off",
        || {
            let (_, m) = weft_testkit::http_get(p.admin, "/metrics").expect("metrics");
            metric(&m, "weft_control_plane_connected") == 0.0
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let (_, m) = weft_testkit::http_get(p.admin, "/metrics").expect("metrics");
    assert_eq!(
        metric(&m, "weft_control_plane_connected"),
        0.0,
        "it got back in"
    );
    let status = stdout(&cp.ctl(&["status"]));
    assert!(
        !status
            .lines()
            .any(|l| l.starts_with("web-1") && l.contains("connected")),
        "{status}"
    );
    drop(p);

    // Operators: without a credential weftctl says what it needs; a token over TLS with the CA
    // works; a wrong token is refused.
    let ca = cp.admin.as_ref().expect("admin").join("ca.pem");
    let out = cp.ctl_as(&Credential::Plain, &["status"], Some(TOKEN));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--credentials"));
    let out = cp.ctl_as(&Credential::Token(ca.clone()), &["status"], Some(TOKEN));
    assert!(out.status.success());
    let out = cp.ctl_as(&Credential::Token(ca), &["status"], Some("wrong"));
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_strangers_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let cp = Cp::start_tls(&dir.path().join("cp.json"), "127.0.0.1:0", &[]);
    // A plaintext client on the TLS link gets nothing.
    let plain = format!("http://{}", cp.addr);
    let r = async {
        let channel = connect(&plain, &LinkSecurity::Plain).await?;
        v1::control_client::ControlClient::new(channel)
            .status(v1::StatusRequest {})
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(r.is_err(), "plaintext was served");
    // weft-cp serves plaintext only on loopback, and only when told.
    let out = Command::new(cp::sibling("weft-cp"))
        .args([
            "--listen",
            "0.0.0.0:0",
            "--store",
            "memory",
            "--insecure-plaintext",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    // A module trust file with a line that is not a key stops weft-cp at start, located.
    let bad = write(dir.path(), "trust.pub", "ed25519:AAAA\n");
    let out = Command::new(cp::sibling("weft-cp"))
        .args([
            "--store",
            "memory",
            "--insecure-plaintext",
            "--module-trust",
            &bad,
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust.pub:1"));
    // weft wants https:// unless told otherwise.
    let out = Command::new(WEFT)
        .args(["run", "--control-plane", &plain])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-plaintext"));

    // A proxy enrolled with another CA (even of the same trust domain) is refused, and it
    // refuses this control plane.
    let other = Cp::start_tls(&dir.path().join("other.json"), "127.0.0.1:0", &[]);
    let token = other.add_node("stranger", "shop/web", &[], &[]);
    let state = dir.path().join("stranger");
    drop(proxy(&other, &state, Some(&token), &[]));
    let r = async {
        let channel = connect(&cp.url(), &LinkSecurity::Mesh(identity_of(&state))).await?;
        v1::control_client::ControlClient::new(channel)
            .status(v1::StatusRequest {})
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(r.is_err(), "a stranger was served");
    // An operator credential of the other CA is refused too.
    let out = cp.ctl_as(&other.operator(), &["status"], None);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_and_the_root_rotates_while_proxies_stay_connected() {
    let dir = tempfile::tempdir().expect("dir");
    let cp = Cp::start_tls(
        &dir.path().join("cp.json"),
        "127.0.0.1:0",
        &["--cert-lifetime", "6s"],
    );
    let web = Backend::start("web").await;
    let port = free_port();
    assert!(
        cp.ctl(&[
            "apply",
            "-f",
            &write(dir.path(), "mesh.yaml", &config_for("web", &web, port))
        ])
        .status
        .success()
    );
    let token = cp.add_node("web", "shop/web", &["app=web"], &["--reusable"]);
    let a = proxy(&cp, &dir.path().join("a"), Some(&token), &[]);
    let b = proxy(&cp, &dir.path().join("b"), Some(&token), &[]);
    let list = stdout(&cp.ctl(&["node", "list"]));
    assert_eq!(list.matches("web-").count(), 2, "{list}");

    // Renewals at about half of 6 s, without a reconnect.
    eventually(Duration::from_secs(30), "two renewals each", || {
        metric(
            &cp.metrics_text(),
            "weft_cp_certificates_issued_total{kind=\"renew\"}",
        ) >= 4.0
    });
    for p in [&a, &b] {
        let (_, m) = weft_testkit::http_get(p.admin, "/metrics").expect("metrics");
        assert!(
            metric(&m, "weft_identity_renewals_total{result=\"ok\"}") >= 1.0,
            "{m}"
        );
        assert_eq!(metric(&m, "weft_control_plane_connected"), 1.0, "{m}");
    }

    // Root rotation: a new root joins, issuing moves, the old root leaves.
    let before = stdout(&cp.ctl(&["ca", "status"]));
    let old_root = before
        .lines()
        .find(|l| l.contains("(issuing)"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("the issuing root")
        .to_owned();
    assert!(cp.ctl(&["ca", "rotate"]).status.success());
    assert!(
        !cp.ctl(&["ca", "rotate"]).status.success(),
        "two rotations at once"
    );
    let during = stdout(&cp.ctl(&["ca", "status"]));
    assert!(during.contains(&old_root), "{during}");
    eventually(Duration::from_secs(60), "the rotation completes", || {
        cp.logged("the old root is retired")
    });
    // The operator's credential is from the old root: a new one.
    cp.renew_admin();
    eventually(Duration::from_secs(20), "the new root alone", || {
        let s = stdout(&cp.ctl(&["ca", "status"]));
        s.contains("rotation: stable") && !s.contains(&old_root) && s.matches(" root ").count() == 1
    });
    for state in ["a", "b"] {
        let m = Material::load(&dir.path().join(state))
            .expect("loads")
            .expect("saved");
        assert_eq!(m.bundle.roots.len(), 1);
    }
    let list = stdout(&cp.ctl(&["node", "list"]));
    assert!(!list.contains(&old_root), "{list}");
    let status = stdout(&cp.ctl(&["status"]));
    assert_eq!(status.matches("connected").count(), 2, "{status}");
    let mut a = a;
    a.refresh_listeners();
    let r = client::get(&client::http1(), &a.url("web", "/"))
        .await
        .expect("request");
    assert_eq!(r.status, 200);
}

/// Requests through `front` until `stop`: half on one kept-alive client, half each on a new
/// connection. Answers (ok, failed, first failures).
async fn load(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64, Vec<String>) {
    use std::sync::atomic::Ordering;
    let kept = client::http1();
    let (mut ok, mut failed, mut why) = (0u64, 0u64, Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        i += 1;
        let r = if i.is_multiple_of(2) {
            client::get(&kept, &url).await
        } else {
            client::get(&client::http1(), &url).await
        };
        match r {
            Ok(r) if r.status == 200 => ok += 1,
            Ok(r) => {
                failed += 1;
                if why.len() < 5 {
                    why.push(format!("{} {}", r.status, r.text()));
                }
            }
            Err(e) => {
                failed += 1;
                if why.len() < 5 {
                    why.push(e.to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (ok, failed, why)
}

/// Two proxies talk mTLS with nothing but `tls: mesh` configured; the policy filter allows or
/// denies by their SPIFFE identity; certificates of a few seconds renew, and the root rotates,
/// under continuous load (kept-alive and new connections) without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_proxies_talk_mtls_by_identity_and_rotate_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().expect("dir");
    let cp = Cp::start_tls(
        &dir.path().join("cp.json"),
        "127.0.0.1:0",
        &["--cert-lifetime", "4s"],
    );
    let db = Backend::start("db").await;
    let mesh_port = free_port();
    let mesh = format!(
        r#"
kind: cluster
selector: {{ app: db }}
spec: {{ name: db-local, endpoints: ["{db}"] }}
---
kind: routes
selector: {{ app: db }}
spec: {{ name: db-in, routes: [ {{ to: [ {{ cluster: db-local }} ] }} ] }}
---
kind: listener
selector: {{ app: db }}
spec: {{ name: db-in, address: "127.0.0.1:{mesh_port}", routes: db-in, tls: mesh, filters: [authz] }}
---
kind: cluster
selector: {{ role: client }}
spec:
  name: db
  endpoints: ["127.0.0.1:{mesh_port}"]
  tls: {{ mode: mesh, identities: ["spiffe://cluster.local/ns/shop/sa/db"] }}
---
kind: routes
selector: {{ role: client }}
spec: {{ name: front, routes: [ {{ to: [ {{ cluster: db }} ] }} ] }}
---
kind: listener
selector: {{ role: client }}
spec: {{ name: front, address: "127.0.0.1:0", routes: front }}
"#,
        db = db.endpoint()
    );
    let policy = weft_testkit::filters::builtin("policy");
    let out = cp.ctl(&[
        "filter",
        "push",
        "authz",
        "--module",
        &policy,
        "--config",
        r#"{"default": "deny", "rules": [{"name": "web", "action": "allow", "when": {"identities": ["spiffe://cluster.local/ns/shop/sa/web"]}}]}"#,
        "--select",
        "app=db",
    ]);
    assert!(out.status.success());
    let out = cp.ctl(&["apply", "-f", &write(dir.path(), "mesh.yaml", &mesh)]);
    assert!(out.status.success());

    let start = |name: &str, identity: &str, label: &str| {
        let token = cp.add_node(name, identity, &[label], &[]);
        proxy(&cp, &dir.path().join(name), Some(&token), &[])
    };
    let db_proxy = start("db", "shop/db", "app=db");
    let mut web = start("web", "shop/web", "role=client");
    let mut other = start("other", "shop/other", "role=client");
    for p in [&mut web, &mut other] {
        eventually(Duration::from_secs(20), "the front listener", || {
            p.refresh_listeners();
            p.listener("front").is_some()
        });
    }
    let url = web.url("front", "/hello");
    let r = client::get(&client::http1(), &url).await.expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen: serde_json::Value = serde_json::from_str(&r.text()).expect("echo");
    let xfcc = seen["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/shop/sa/web"),
        "{seen}"
    );
    let r = client::get(&client::http1(), &other.url("front", "/hello"))
        .await
        .expect("request");
    assert_eq!(r.status, 403, "{}", r.text());
    // Without a mesh certificate, the mesh listener serves nothing.
    let direct = client::get(&client::http1(), &format!("http://127.0.0.1:{mesh_port}/")).await;
    assert!(direct.is_err() || direct.is_ok_and(|r| r.status != 200));

    // Continuous load while certificates of 4 s renew, and while the root rotates.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(load(url.clone(), stop.clone()));
    let before = metric(
        &cp.metrics_text(),
        "weft_cp_certificates_issued_total{kind=\"renew\"}",
    );
    let renewed = |n: f64| {
        metric(
            &cp.metrics_text(),
            "weft_cp_certificates_issued_total{kind=\"renew\"}",
        ) >= before + n
    };
    let cp_ref = &cp;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = std::time::Instant::now();
    while !renewed(6.0) && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(renewed(6.0), "three proxies renewed twice each");
    assert!(cp_ref.ctl(&["ca", "rotate"]).status.success());
    let t0 = std::time::Instant::now();
    while !cp_ref.logged("the old root is retired") {
        assert!(t0.elapsed() < Duration::from_secs(60), "rotation stuck");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A little more load on the new root alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, why) = task.await.expect("load");
    assert!(ok > 50, "only {ok} requests");
    assert_eq!(failed, 0, "{failed} of {} failed: {why:?}", ok + failed);
    drop((db_proxy, web, other));
}

/// The signature of `module` (a file) for the filter `name`, with the key `weftctl keys
/// generate` wrote.
fn signature_of(key: &Path, name: &str, module: &str) -> weft_proxy::config::ModuleSignature {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(key).expect("key");
    let digest = weft_proxy::wasm::runtime::digest(&std::fs::read(module).expect("module"));
    weft_proxy::wasm::signing::sign(key.secret_pkcs8_der(), name, &digest).expect("signs")
}

/// Signed modules: weft-cp requires them from trusted keys, proxies enrolled there trust the
/// same keys and check them themselves; a module changed after signing, an unsigned one and one
/// signed by another key are refused, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_modules_are_required_and_checked_by_weft_cp_and_the_proxy() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("dir");
    for k in ["signer", "other"] {
        let out = Command::new(cp::sibling("weftctl"))
            .args(["keys", "generate"])
            .arg(keys.join(k))
            .output()
            .expect("weftctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let signer_pub = keys.join("signer.pub").to_string_lossy().into_owned();
    let cp = Cp::start_tls(
        &dir.path().join("cp.json"),
        "127.0.0.1:0",
        &["--module-trust", &signer_pub],
    );
    let web = Backend::start("web").await;
    let mesh = config_for("web", &web, free_port());
    let (state, p, _) = apply_and_enroll_web(&cp, dir.path(), &mesh);
    assert_eq!(identity_of(&state).current().module_keys.len(), 1);

    let policy = weft_testkit::filters::builtin("policy");
    let fault = weft_testkit::filters::builtin("fault");
    let config = r#"{"default": "allow", "rules": []}"#;
    let push = |module: &str, sign: Option<&str>| {
        let mut args = vec![
            "filter", "push", "authz", "--module", module, "--config", config, "--select",
            "app=web",
        ];
        let key;
        if let Some(k) = sign {
            key = keys.join(format!("{k}.key")).to_string_lossy().into_owned();
            args.extend(["--sign", &key]);
        }
        cp.ctl(&args)
    };
    let refused = |out: std::process::Output, why: &str| {
        assert!(!out.status.success(), "accepted");
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(e.contains(why), "{why}: {e}");
    };
    refused(push(&policy, None), "not signed");
    refused(push(&policy, Some("other")), "not trusted");
    assert!(!stdout(&cp.ctl(&["get", "filter"])).contains("authz"));
    let out = push(&policy, Some("signer"));
    assert!(out.status.success(), "the signed module was refused");
    assert!(
        stdout(&out).contains("1/1 proxies applied"),
        "{}",
        stdout(&out)
    );

    // Another module with the first one's signature: refused by weft-cp, nothing changes.
    let sig = signature_of(&keys.join("signer.key"), "authz", &policy);
    let up = cp.ctl(&[
        "filter", "push", "other", "--module", &fault, "--select", "app=none",
    ]);
    assert!(!up.status.success(), "unsigned, refused at apply");
    let fault_digest = weft_proxy::wasm::runtime::digest(&std::fs::read(&fault).expect("fault"));
    let forged = format!(
        "kind: filter\nselector: {{ app: web }}\nspec: {{ name: authz, module: \"{fault_digest}\", signature: {{ key: {}, value: \"{}\" }} }}\n",
        sig.key, sig.value
    );
    let before = stdout(&cp.ctl(&["get", "filter"]));
    refused(
        cp.ctl(&["apply", "-f", &write(dir.path(), "forged.yaml", &forged)]),
        "does not match",
    );
    assert_eq!(stdout(&cp.ctl(&["get", "filter"])), before);
    drop(p);

    // The proxy checks by itself: its saved snapshot, changed to name another module, no
    // longer loads; and weft validate refuses what module_trust does not cover.
    let snapshot = state.join("snapshot.json");
    let text = std::fs::read_to_string(&snapshot).expect("snapshot");
    let policy_digest = weft_proxy::wasm::runtime::digest(&std::fs::read(&policy).expect("policy"));
    assert!(text.contains(&policy_digest));
    std::fs::write(
        state.join("modules").join(format!(
            "{}.wasm",
            fault_digest.trim_start_matches("sha256:")
        )),
        std::fs::read(&fault).expect("fault"),
    )
    .expect("plant");
    std::fs::write(&snapshot, text.replace(&policy_digest, &fault_digest)).expect("tamper");
    let public = std::fs::read_to_string(&signer_pub).expect("pub");
    let check = |sig: Option<&weft_proxy::config::ModuleSignature>| {
        let sig = sig.map_or(String::new(), |s| {
            format!(", signature: {{ key: {}, value: \"{}\" }}", s.key, s.value)
        });
        let yaml = format!(
            "module_trust: [\"{}\"]\nfilters:\n  - {{ name: authz, module: {policy}{sig} }}\n",
            public.trim()
        );
        Command::new(WEFT)
            .args(["validate", "--config", &write(dir.path(), "v.yaml", &yaml)])
            .output()
            .expect("validate")
    };
    let out = check(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("filters[0].signature"));
    assert!(check(Some(&sig)).status.success());
    let other = signature_of(&keys.join("other.key"), "authz", &policy);
    assert!(!check(Some(&other)).status.success());
    // Restarted with the control plane gone, the proxy refuses the tampered snapshot.
    drop(cp);
    let p = proxy_from_disk(&state);
    assert!(
        p.log_contains("the saved snapshot no longer loads"),
        "the tampered snapshot was served"
    );
}

/// A proxy started with its saved identity while the control plane is down.
fn proxy_from_disk(state: &Path) -> Weft {
    let state = state.to_string_lossy().into_owned();
    Weft::start_env(
        WEFT,
        BOOTSTRAP,
        &[
            "--control-plane",
            "https://127.0.0.1:1",
            "--state-dir",
            &state,
        ],
        &[],
    )
}
