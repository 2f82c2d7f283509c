//! Sidecar mode end to end: pods are network namespaces on a bridge, each with its
//! application and a `weft` sidecar running as uid 1337 after `weft init`; weft-cp runs in the
//! hub namespace and is the mesh's CA. Applications know nothing of the mesh: they call a
//! service's virtual IP, and the nat rules and sidecars do the rest.
//!
//! Needs root (CI runs the tests as root), `ip`, iptables and curl (`scripts/test` installs
//! them).

mod cp;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cp::{Cp, WEFT, stdout, write};
use weft_testkit::Backend;
use weft_testkit::netns::{self, Net, Pod};

const PROXY_USER: (u32, u32) = (1337, 1337);
const VIP: &str = "10.96.0.10";

/// A process killed when dropped (a failed test leaves none behind).
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(mut cmd: Command, tag: &'static str) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("process starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                sink.lock().expect("log").push(line);
            }
        });
        Proc { child, log }
    }

    fn logged(&self, what: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(what))
    }

    fn wait_for(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.logged(what) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status}) before logging {what:?}");
            }
            assert!(Instant::now() < deadline, "never logged {what:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    eprintln!(
        "[{cmd:?}] {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `weft init` in the pod, for the workload's ports.
fn init(pod: &Pod, ports: &str) {
    let out = run(pod.ns.command(WEFT, None).args([
        "init",
        "--inbound-ports",
        ports,
        "--exclude-inbound-ports",
        "15000",
    ]));
    assert!(out.status.success(), "weft init failed");
}

/// The nat rules of weft in the pod.
fn weft_rules(pod: &Pod) -> usize {
    let mut n = 0;
    for save in ["iptables-save", "ip6tables-save"] {
        let out = run(pod.ns.command(save, None).args(["-t", "nat"]));
        n += String::from_utf8_lossy(&out.stdout).matches("WEFT").count();
    }
    n
}

/// A sidecar in `pod`, enrolled with `token`, as uid 1337.
fn sidecar(pod: &Pod, cp: &Cp, token: &str, dir: &Path) -> Proc {
    let state = dir.join(format!("{}-state", pod.ip));
    std::fs::create_dir_all(&state).expect("state dir");
    chown(&state);
    let boot = PathBuf::from(write(
        dir,
        &format!("{}-boot.yaml", pod.ip),
        "admin: { address: 127.0.0.1:15000 }\n",
    ));
    let token_file = PathBuf::from(write(dir, &format!("{}-token", pod.ip), token));
    chown(&token_file);
    let mut cmd = pod.ns.command(WEFT, Some(PROXY_USER));
    cmd.args(["run", "--workers", "1", "--config"])
        .arg(&boot)
        .arg("--control-plane")
        .arg(cp.url())
        .arg("--state-dir")
        .arg(&state)
        .arg("--join-token-file")
        .arg(&token_file)
        .env("RUST_LOG", "info");
    let mut p = Proc::spawn(cmd, "sidecar");
    p.wait_for("name=sidecar-inbound");
    p
}

fn chown(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::chown(c.as_ptr(), PROXY_USER.0, PROXY_USER.1) };
    assert_eq!(r, 0, "chown {}", p.display());
    let mut parent = p.parent();
    // Let uid 1337 reach it (the test's temporary directory is root's, mode 0700).
    while let Some(d) = parent {
        if d == Path::new("/") || d == std::env::temp_dir() {
            break;
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711));
        parent = d.parent();
    }
}

/// `curl` from the pod (as its application, uid 0: captured).
fn curl(pod: &Pod, args: &[&str]) -> Output {
    run(pod
        .ns
        .command("curl", None)
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(args))
}

/// A metric's value from the sidecar's admin listener in `pod`.
fn metric(pod: &Pod, line_start: &str) -> f64 {
    let text = pod.ns.run(|| {
        weft_testkit::http_get("127.0.0.1:15000".parse().expect("addr"), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    });
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A server that speaks first (as SMTP, MySQL), then echoes one line.
fn server_first(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.write_all(b"220 ready\r\n");
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        break;
                    }
                }
                let _ = s.write_all(&line);
            });
        }
    });
}

const MESH: &str = r#"
kind: mesh_service
spec:
  name: web
  addresses: ["10.96.0.10", "fd96::10"]
  ports:
    - { port: 80, target_port: 8080, protocol: http }
    - { port: 25, target_port: 2525 }
    - { port: 443, target_port: 8443 }
    - { port: 9000, protocol: grpc }
  endpoints: ["10.77.0.2"]
  identities: ["spiffe://cluster.local/ns/default/sa/web"]
---
kind: sidecar
selector: { app: web }
spec:
  name: web
  mode: strict
  ports: [ { port: 8080, protocol: http }, { port: 2525 }, { port: 8443 }, { port: 9000, protocol: grpc } ]
  inbound_filters: [authz]
---
kind: sidecar
selector: { app: client }
spec: { name: client, outbound_drain: 60s }
"#;

/// The server's inbound policy: only the client's identity.
const POLICY: &str = r#"{"default": "deny", "rules": [{"name": "client", "action": "allow", "when": {"identities": ["spiffe://cluster.local/ns/default/sa/client"]}}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_call_a_service_by_its_virtual_ip_through_both_sidecars_over_mesh_mtls() {
    if let Err(why) = netns::available() {
        // CI (root) sets WEFT_REQUIRE_NETNS=1: there this test can never be skipped.
        if std::env::var("WEFT_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mut net = Net::new();
    let client = net.pod("client");
    let server = net.pod("server");
    let plain = net.pod("plain");
    let other = net.pod("other");
    assert_eq!(
        (client.ip.as_str(), server.ip.as_str()),
        ("10.77.0.1", "10.77.0.2")
    );
    let store = dir.path().join("cp.json");
    let cp = Cp::start_tls_in(&net.hub.path(), &store, &format!("{}:0", net.hub_ip()), &[]);
    let policy = weft_testkit::filters::builtin("policy");
    let out = cp.ctl(&[
        "filter", "push", "authz", "--module", &policy, "--config", POLICY, "--select", "app=web",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let out = cp.ctl(&["apply", "-f", &write(dir.path(), "mesh.yaml", MESH)]);
    assert!(out.status.success(), "{}", stdout(&out));
    let client_token = cp.add_node("client", "default/client", &["app=client"], &[]);
    let other_token = cp.add_node("other", "default/other", &["app=client"], &[]);
    let server_token = cp.add_node("web", "default/web", &["app=web"], &[]);

    // The applications: an HTTP server and a server-first one, on loopback in the server pod
    // (the sidecar reaches them there); an HTTP server outside the mesh in the plain pod.
    let app = server
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:8080"))
        .expect("bind");
    let _web = Backend::start_with(app, "web").await;
    server_first(
        server
            .ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:2525"))
            .expect("bind"),
    );
    let outside = plain
        .ns
        .run(|| std::net::TcpListener::bind("0.0.0.0:8081"))
        .expect("bind");
    let _outside = Backend::start_with(outside, "outside").await;
    // An application that speaks TLS itself: its bytes cross the mesh as TCP, inside mTLS.
    let pki = weft_testkit::tls::Pki::new("app");
    let cert = pki.issue("secure", &["secure.example"]);
    let secure = server
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:8443"))
        .expect("bind");
    let _secure = Backend::start_tls_with(
        secure,
        "secure",
        weft_testkit::tls::server_config(&cert, None),
    )
    .await;

    let _grpc = weft_testkit::grpc::GrpcBackend::start_with(
        server
            .ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:9000"))
            .expect("bind"),
    );
    init(&client, "*");
    init(&other, "*");
    init(&server, "8080,2525,8443,9000");
    let mut server_sidecar = sidecar(&server, &cp, &server_token, dir.path());
    let mut client_sidecar = sidecar(&client, &cp, &client_token, dir.path());
    let _other_sidecar = sidecar(&other, &cp, &other_token, dir.path());

    // HTTP to the VIP: captured, sent over mTLS to the server pod, captured inbound, answered
    // by the application, which sees the client's identity.
    let out = curl(&client, &[&format!("http://{VIP}/hello")]);
    let text = stdout(&out);
    assert!(text.ends_with("\n200"), "{text}");
    assert!(
        text.contains("\"x-backend\"") || text.contains("web"),
        "{text}"
    );
    assert!(
        text.contains("URI=spiffe://cluster.local/ns/default/sa/client"),
        "the server's sidecar did not see the client's identity: {text}"
    );
    // The server application learns its client's address once (from the inbound side).
    assert!(text.contains("\"x-forwarded-for\":\"10.77.0.1\""), "{text}");
    assert_eq!(
        metric(
            &client,
            "weft_sidecar_connections_total{direction=\"outbound\",result=\"service\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &server,
            "weft_sidecar_connections_total{direction=\"inbound\",result=\"mesh\"}"
        ),
        1.0
    );

    // The server's inbound policy sees each caller's identity: another workload is denied.
    let out = curl(&other, &[&format!("http://{VIP}/hello")]);
    assert!(stdout(&out).ends_with("\n403"), "{}", stdout(&out));

    // HTTP/2 (prior knowledge) through the capture.
    let out = curl(
        &client,
        &["--http2-prior-knowledge", &format!("http://{VIP}/h2")],
    );
    assert!(stdout(&out).ends_with("\n200"), "{}", stdout(&out));

    // gRPC through the capture: unary, a server stream, and an error in trailers (the client
    // runs in the pod: its sockets are the pod's).
    let (unary, streamed, code) = client.ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use weft_testkit::grpc::pb::EchoRequest;
            use weft_testkit::grpc::pb::echo_client::EchoClient;
            let mut c = EchoClient::connect(format!("http://{VIP}:9000"))
                .await
                .expect("connect");
            let req = |message: &str, count, fail_with| EchoRequest {
                message: message.into(),
                count,
                fail_with,
            };
            let unary = c.unary(req("hello", 0, 0)).await.expect("unary");
            let mut stream = c
                .server_stream(req("tick", 3, 0))
                .await
                .expect("stream")
                .into_inner();
            let mut streamed = Vec::new();
            while let Some(m) = stream.message().await.expect("message") {
                streamed.push(m.message);
            }
            let err = c
                .unary(req("no", 0, tonic::Code::PermissionDenied as u32))
                .await
                .expect_err("fails");
            (unary.into_inner().message, streamed, err.code())
        })
    });
    assert_eq!(unary, "hello");
    assert_eq!(streamed, ["tick #0", "tick #1", "tick #2"]);
    assert_eq!(code, tonic::Code::PermissionDenied);

    // IPv6: the VIP's IPv6 address is captured by the IPv6 rules (IP6T_SO_ORIGINAL_DST).
    let out = curl(&client, &["-g", "http://[fd96::10]/v6"]);
    assert!(stdout(&out).ends_with("\n200"), "{}", stdout(&out));
    let refused = metric(
        &server,
        "weft_sidecar_connections_total{direction=\"inbound\",result=\"refused_plaintext\"}",
    );
    let out = curl(&plain, &["-g", &format!("http://[{}]:8080/", server.ip6)]);
    assert!(
        !out.status.success(),
        "plaintext over IPv6 reached a strict workload"
    );
    assert_eq!(
        metric(
            &server,
            "weft_sidecar_connections_total{direction=\"inbound\",result=\"refused_plaintext\"}",
        ),
        refused + 1.0,
        "refused by the sidecar (captured over IPv6), not by an unreachable address"
    );

    // The application's own TLS passes through the mesh untouched (the certificate the client
    // checks is the server application's).
    let ca = pki.ca.to_string_lossy().into_owned();
    let resolve = format!("secure.example:443:{VIP}");
    let out = curl(
        &client,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "https://secure.example/tls",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.ends_with("\n200") && text.contains("\"secure\""),
        "{text}"
    );

    // A server-first protocol: the client sends nothing until it is greeted. Detection gives
    // up after its short timeout and serves TCP (the greeting arrives; without a timeout it
    // would never come).
    let (greeting, echoed) = client.ns.run(|| {
        let mut s = TcpStream::connect((VIP, 25)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut greeting = String::new();
        r.read_line(&mut greeting).expect("greeting");
        s.write_all(b"HELO client\r\n").expect("write");
        let mut echoed = String::new();
        r.read_line(&mut echoed).expect("echo");
        (greeting, echoed)
    });
    assert_eq!(
        (greeting.as_str(), echoed.as_str()),
        ("220 ready\r\n", "HELO client\r\n")
    );

    // Strict: a pod without a sidecar cannot reach the server in plaintext.
    let out = curl(&plain, &[&format!("http://{}:8080/", server.ip)]);
    assert!(
        !out.status.success(),
        "plaintext reached a strict workload: {}",
        stdout(&out)
    );
    assert!(
        metric(
            &server,
            "weft_sidecar_connections_total{direction=\"inbound\",result=\"refused_plaintext\"}"
        ) >= 1.0
    );

    // A destination the registry does not know is passed through (the sidecar's own
    // connection is not captured again: no loop).
    let out = curl(&client, &[&format!("http://{}:8081/out", plain.ip)]);
    assert!(stdout(&out).ends_with("\n200"), "{}", stdout(&out));
    assert_eq!(
        metric(
            &client,
            "weft_sidecar_connections_total{direction=\"outbound\",result=\"passthrough\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &client,
            "weft_sidecar_connections_total{direction=\"outbound\",result=\"loop\"}"
        ),
        0.0
    );

    // Another pod that reaches a sidecar's outbound capture port directly (no redirect: no
    // original destination but the port itself) cannot use it as an open proxy.
    let out = curl(&plain, &[&format!("http://{}:15001/", client.ip)]);
    assert!(!stdout(&out).ends_with("\n200"), "{}", stdout(&out));
    assert_eq!(
        metric(
            &client,
            "weft_sidecar_connections_total{direction=\"outbound\",result=\"loop\"}"
        ),
        1.0
    );

    // registry_only: refused, counted.
    let only = MESH.replace(
        "spec: { name: client, outbound_drain: 60s }",
        "spec: { name: client, outbound_drain: 60s, egress: registry_only }",
    );
    assert_ne!(only, MESH);
    let out = cp.ctl(&["apply", "-f", &write(dir.path(), "mesh2.yaml", &only)]);
    assert!(out.status.success(), "{}", stdout(&out));
    let out = curl(&client, &[&format!("http://{}:8081/out", plain.ip)]);
    assert!(!stdout(&out).ends_with("\n200"), "{}", stdout(&out));
    assert_eq!(
        metric(
            &client,
            "weft_sidecar_connections_total{direction=\"outbound\",result=\"refused_unknown\"}"
        ),
        1.0
    );
    // The service still works.
    assert!(stdout(&curl(&client, &[&format!("http://{VIP}/again")])).ends_with("\n200"));

    // SIGTERM: a sidecar serves its application's outbound calls while the application
    // stops; inbound stops at once.
    let term = |p: &Proc| {
        // SAFETY: kill(2) on a child we started and have not reaped.
        unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
    };
    term(&client_sidecar);
    client_sidecar.wait_for("draining inbound");
    let out = curl(&client, &[&format!("http://{VIP}/while-stopping")]);
    assert!(stdout(&out).ends_with("\n200"), "{}", stdout(&out));
    term(&server_sidecar);
    server_sidecar.wait_for("draining inbound");
    let out = curl(&other, &[&format!("http://{VIP}/after")]);
    assert!(!stdout(&out).ends_with("\n200"), "{}", stdout(&out));

    // `weft init --cleanup` leaves no rule behind.
    for pod in [&client, &server] {
        assert!(weft_rules(pod) > 0);
        let out = run(pod.ns.command(WEFT, None).args(["init", "--cleanup"]));
        assert!(out.status.success());
        assert_eq!(weft_rules(pod), 0);
    }
}
