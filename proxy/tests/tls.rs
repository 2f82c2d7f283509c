//! TLS: termination (curl, ALPN h2, SNI), mTLS with the client's identity forwarded,
//! origination with a client certificate and expected SANs, certificate rotation under traffic,
//! broken files rejected, TCP proxying and TLS passthrough routed by SNI. Certificates are made
//! by the tests (rcgen).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use weft_testkit::tls::{self, Pki, cert_der, client_config, server_config};
use weft_testkit::{Backend, Weft, client, eventually};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// One HTTP listener terminating TLS with `tls` (YAML flow map), in front of `backend`.
fn edge(tls: &str, backend: &Backend) -> String {
    format!(
        r#"
listeners:
  - name: edge
    address: "127.0.0.1:0"
    routes: main
    tls: {tls}
routes:
  main:
    - to: [{{ cluster: app }}]
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        backend.endpoint()
    )
}

/// The value of the sample `series` (name and labels) in a metrics text; 0 when absent.
fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn curl_https(weft: &Weft, ca: &str, extra: &[&str], path: &str) -> (bool, String, String) {
    let port = weft.addr("edge").port();
    let resolve = format!("edge.test:{port}:127.0.0.1");
    let url = format!("https://edge.test:{port}{path}");
    let mut args = vec!["--cacert", ca, "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    client::curl(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_http1_and_http2_over_tls_and_handshakes_are_counted() {
    let pki = Pki::new("edge");
    let cert = pki.issue("edge", &["edge.test"]);
    let backend = Backend::start("app").await;
    let tls = format!(
        "{{ certificates: [{{ cert: {}, key: {} }}] }}",
        path(&cert.cert),
        path(&cert.key)
    );
    let weft = Weft::start(WEFT, &edge(&tls, &backend));
    let ca = path(&pki.ca);

    let (ok, out, err) = curl_https(
        &weft,
        &ca,
        &["--http1.1", "-w", "\n%{http_version}"],
        "/one",
    );
    assert!(ok, "curl over TLS failed: {err}");
    let (json, version) = out.rsplit_once('\n').expect("body and version");
    assert_eq!(version, "1.1");
    let seen: serde_json::Value = serde_json::from_str(json).expect("backend JSON");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert!(seen["headers"].get("x-forwarded-client-cert").is_none());

    let (ok, out, err) = curl_https(&weft, &ca, &["--http2", "-w", "\n%{http_version}"], "/two");
    assert!(ok, "curl --http2 over TLS failed: {err}");
    assert!(out.ends_with("\n2"), "ALPN should pick h2: {out}");

    // A client that does not trust the CA is refused by curl itself.
    let (ok, _, err) = client::curl(&[
        "--resolve",
        &format!("edge.test:{}:127.0.0.1", weft.addr("edge").port()),
        &format!("https://edge.test:{}/", weft.addr("edge").port()),
    ]);
    assert!(
        !ok,
        "an untrusted certificate must fail verification: {err}"
    );

    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.contains(
            r#"weft_tls_handshakes_total{side="listener",name="edge",version="TLSv1.3",alpn="h2"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"weft_tls_handshakes_total{side="listener",name="edge",version="TLSv1.3",alpn="http/1.1"} 1"#
    ));
    // The refused handshake is counted when weft reads curl's alert, which may be after curl
    // has exited.
    eventually(
        Duration::from_secs(5),
        "the refused handshake counted",
        || {
            weft.admin_get("/metrics")
                .1
                .contains("weft_tls_handshake_failures_total{side=\"listener\",name=\"edge\"")
        },
    );
    let expiry = metrics
        .lines()
        .find(|l| l.starts_with("weft_tls_certificate_expiry_timestamp_seconds{side=\"listener\""))
        .expect("expiry gauge");
    let at: i64 = expiry
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert!(at > now, "expiry {at} should be in the future");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate() {
    let pki = Pki::new("sni");
    let a = pki.issue("a", &["a.test"]);
    let b = pki.issue("b", &["*.b.test"]);
    let backend = Backend::start("app").await;
    let tls = format!(
        "{{ certificates: [{{ cert: {}, key: {} }}, {{ cert: {}, key: {} }}] }}",
        path(&a.cert),
        path(&a.key),
        path(&b.cert),
        path(&b.key)
    );
    let weft = Weft::start(WEFT, &edge(&tls, &backend));
    let addr = weft.addr("edge");
    let config = client_config(&pki.ca, None, &["http/1.1"]);

    let r = tls::get(addr, "a.test", config.clone(), "/")
        .await
        .expect("a.test");
    assert_eq!(r.server_cert, cert_der(&a.cert));
    let r = tls::get(addr, "x.b.test", config.clone(), "/")
        .await
        .expect("x.b.test");
    assert_eq!(r.server_cert, cert_der(&b.cert));
    // An unknown name gets the first certificate, which does not cover it.
    let e = tls::get(addr, "other.test", config, "/")
        .await
        .expect_err("wrong name");
    assert!(e.contains("handshake"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_and_forwards_the_identity() {
    let pki = Pki::new("mesh");
    let server = pki.issue("server", &["edge.test"]);
    let client_id = "spiffe://weft.test/ns/default/sa/client";
    let good = pki.issue("client", &[client_id]);
    let other_ca = Pki::new("other");
    let stranger = other_ca.issue("stranger", &["spiffe://weft.test/ns/evil/sa/x"]);
    let backend = Backend::start("app").await;
    let tls = format!(
        "{{ certificates: [{{ cert: {}, key: {} }}], client_ca: {} }}",
        path(&server.cert),
        path(&server.key),
        path(&pki.ca)
    );
    let weft = Weft::start(WEFT, &edge(&tls, &backend));
    let addr = weft.addr("edge");

    let none = client_config(&pki.ca, None, &["http/1.1"]);
    let e = tls::get(addr, "edge.test", none, "/")
        .await
        .expect_err("no certificate");
    assert!(!e.is_empty());
    let bad = client_config(&pki.ca, Some(&stranger), &["http/1.1"]);
    tls::get(addr, "edge.test", bad, "/")
        .await
        .expect_err("unknown CA");

    for alpn in ["http/1.1", "h2"] {
        let ok = client_config(&pki.ca, Some(&good), &[alpn]);
        let r = tls::get(addr, "edge.test", ok, "/who")
            .await
            .expect("with a certificate");
        assert_eq!(r.status, 200, "{}", r.body);
        let seen: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        let xfcc = seen["headers"]["x-forwarded-client-cert"]
            .as_str()
            .expect("x-forwarded-client-cert set");
        assert!(xfcc.contains(&format!("URI={client_id}")), "{xfcc}");
        assert!(xfcc.starts_with("Hash="), "{xfcc}");
    }

    // curl with the client certificate; a forged x-forwarded-client-cert is replaced.
    let (ok, out, err) = curl_https(
        &weft,
        &path(&pki.ca),
        &[
            "--cert",
            &path(&good.cert),
            "--key",
            &path(&good.key),
            "-H",
            "x-forwarded-client-cert: URI=spiffe://forged",
        ],
        "/",
    );
    assert!(ok, "{err}");
    assert!(!out.contains("forged"), "{out}");
    assert!(out.contains(client_id), "{out}");

    // Naming the identity (and the other fields weft sets) in `Connection` does not strip
    // them: the upstream still learns who the client proved to be.
    let (ok, out, err) = curl_https(
        &weft,
        &path(&pki.ca),
        &[
            "--cert",
            &path(&good.cert),
            "--key",
            &path(&good.key),
            "-H",
            "Connection: x-forwarded-client-cert, x-forwarded-for, x-forwarded-proto, x-request-id",
        ],
        "/",
    );
    assert!(ok, "{err}");
    let seen: serde_json::Value = serde_json::from_str(&out).expect("backend JSON");
    let xfcc = seen["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default();
    assert!(xfcc.contains(client_id), "{out}");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{out}");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1", "{out}");
    assert_eq!(
        seen["headers"]["x-request-id"].as_str().map(str::len),
        Some(36),
        "{out}"
    );

    // Refused handshakes are counted when weft reads the end of them (maybe after the client
    // gave up).
    eventually(
        Duration::from_secs(5),
        "the refused handshakes counted",
        || {
            let (_, metrics) = weft.admin_get("/metrics");
            metrics.contains("weft_tls_handshake_failures_total{side=\"listener\",name=\"edge\",reason=\"no_client_certificate\"}")
            && metrics.contains("weft_tls_handshake_failures_total{side=\"listener\",name=\"edge\",reason=\"unknown_ca\"}")
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origination_presents_a_client_certificate_and_checks_the_server_identity() {
    let pki = Pki::new("upstream");
    let backend_id = "spiffe://weft.test/ns/default/sa/backend";
    let backend_cert = pki.issue("backend", &["backend.test", backend_id]);
    let proxy_cert = pki.issue("proxy", &["spiffe://weft.test/ns/default/sa/proxy"]);
    // The backend refuses any client without a certificate from the mesh CA.
    let backend = Backend::start_tls("secure", server_config(&backend_cert, Some(&pki.ca))).await;
    let ep = backend.endpoint();
    let (ca, cert, key) = (path(&pki.ca), path(&proxy_cert.cert), path(&proxy_cert.key));
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - match: {{ path_prefix: /san/ }}
      to: [{{ cluster: by-san }}]
    - match: {{ path_prefix: /h2/ }}
      to: [{{ cluster: by-san-h2 }}]
    - match: {{ path_prefix: /wrong-san/ }}
      to: [{{ cluster: wrong-san }}]
    - match: {{ path_prefix: /no-cert/ }}
      to: [{{ cluster: no-cert }}]
    - match: {{ path_prefix: /wrong-name/ }}
      to: [{{ cluster: wrong-name }}]
    - to: [{{ cluster: by-name }}]
clusters:
  - name: by-name
    endpoints: ["{ep}"]
    tls: {{ sni: backend.test, ca: {ca}, certificate: {{ cert: {cert}, key: {key} }} }}
  - name: by-san
    endpoints: ["{ep}"]
    tls: {{ ca: {ca}, certificate: {{ cert: {cert}, key: {key} }}, subject_alt_names: ["{backend_id}"] }}
  - name: by-san-h2
    endpoints: ["{ep}"]
    protocol: http2
    tls: {{ ca: {ca}, certificate: {{ cert: {cert}, key: {key} }}, subject_alt_names: ["{backend_id}"] }}
  - name: wrong-san
    endpoints: ["{ep}"]
    tls: {{ ca: {ca}, certificate: {{ cert: {cert}, key: {key} }}, subject_alt_names: ["spiffe://weft.test/ns/default/sa/other"] }}
  - name: wrong-name
    endpoints: ["{ep}"]
    tls: {{ sni: elsewhere.test, ca: {ca}, certificate: {{ cert: {cert}, key: {key} }} }}
  - name: no-cert
    endpoints: ["{ep}"]
    tls: {{ sni: backend.test, ca: {ca} }}
"#
    );
    let weft = Weft::start(WEFT, &yaml);
    let c = client::http1();
    let r = client::get(&c, &weft.url("main", "/plain"))
        .await
        .expect("by name");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["backend"], "secure");
    // By default a TLS cluster speaks what ALPN settles: this backend offers h2.
    assert_eq!(r.json()["version"], "HTTP/2.0");
    let r = client::get(&c, &weft.url("main", "/san/x"))
        .await
        .expect("by SAN");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client::get(&c, &weft.url("main", "/h2/x"))
        .await
        .expect("h2 by ALPN");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");

    for p in ["/wrong-san/x", "/wrong-name/x"] {
        let r = client::get(&c, &weft.url("main", p)).await.expect("answer");
        assert_eq!(r.status, 503, "{p}: {}", r.text());
        assert_eq!(r.header("x-weft-error"), Some("upstream_tls_failed"), "{p}");
    }
    // Without a client certificate the backend refuses the connection (after the handshake,
    // in TLS 1.3): the request fails, never reaching it.
    let before = backend.requests();
    let r = client::get(&c, &weft.url("main", "/no-cert/x"))
        .await
        .expect("answer");
    assert!(r.status == 502 || r.status == 503, "{}", r.status);
    assert_eq!(backend.requests(), before);

    let (_, metrics) = weft.admin_get("/metrics");
    assert!(metrics.contains(r#"weft_tls_handshakes_total{side="cluster",name="by-san-h2",version="TLSv1.3",alpn="h2"}"#), "{metrics}");
    assert!(metrics.contains(r#"weft_tls_handshake_failures_total{side="cluster",name="wrong-san",reason="wrong_name"}"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_and_broken_files_are_refused() {
    let pki = Pki::new("rotate");
    let first = pki.issue("edge", &["edge.test"]);
    let backend = Backend::start("app").await;
    let tls = format!(
        "{{ certificates: [{{ cert: {}, key: {} }}] }}",
        path(&first.cert),
        path(&first.key)
    );
    let weft = Weft::start(WEFT, &edge(&tls, &backend));
    let addr = weft.addr("edge");
    let config = client_config(&pki.ca, None, &["http/1.1", "h2"]);
    let old_der = cert_der(&first.cert);

    // New connections all the time (each a handshake) while the files are replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (stop, ok, config) = (stop.clone(), ok.clone(), config.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match tls::get(addr, "edge.test", config.clone(), "/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = pki.issue("edge", &["edge.test"]);
    let new_der = cert_der(&second.cert);
    assert_ne!(old_der, new_der);
    let seen_new = {
        let config = config.clone();
        let mut seen = false;
        for _ in 0..250 {
            let r = tls::get(addr, "edge.test", config.clone(), "/")
                .await
                .expect("during rotation");
            if r.server_cert == new_der {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    };
    assert!(seen_new, "the new certificate was not served within 5 s");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let failures = t.await.expect("task");
        assert!(failures.is_empty(), "failed during rotation: {failures:?}");
    }
    assert!(ok.load(Ordering::Relaxed) > 20);

    // A broken certificate file: refused, counted, and the loaded one keeps serving.
    tls::write_atomically(&second.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n");
    eventually(
        Duration::from_secs(10),
        "the broken file is reported",
        || weft.log_contains("TLS reload rejected"),
    );
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        value(&metrics, r#"weft_tls_reloads_total{result="rejected"}"#) >= 1,
        "{metrics}"
    );
    assert!(
        value(&metrics, r#"weft_tls_reloads_total{result="applied"}"#) >= 1,
        "{metrics}"
    );
    let r = tls::get(addr, "edge.test", config.clone(), "/")
        .await
        .expect("still served");
    assert_eq!(r.server_cert, new_der);

    // SIGHUP re-reads too; a config naming a missing file is rejected, located.
    let bad = edge(
        "{ certificates: [{ cert: /nonexistent/cert.pem, key: /nonexistent/key.pem }] }",
        &backend,
    );
    let version = weft.version();
    weft.write_config_and_hup(&bad);
    eventually(
        Duration::from_secs(10),
        "the bad config is rejected",
        || weft.log_contains("listeners[0].tls.certificates[0]: cannot read /nonexistent/cert.pem"),
    );
    assert_eq!(weft.version(), version);
    let r = tls::get(addr, "edge.test", config, "/")
        .await
        .expect("still served");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_pass_tls_through_routed_by_sni() {
    let pki = Pki::new("passthrough");
    let a_cert = pki.issue("a", &["a.test"]);
    let b_cert = pki.issue("b", &["b.test"]);
    let a = Backend::start_tls("service-a", server_config(&a_cert, None)).await;
    let b = Backend::start_tls("service-b", server_config(&b_cert, None)).await;
    let plain = Backend::start("plain").await;
    let yaml = format!(
        r#"
listeners:
  - name: sni
    address: "127.0.0.1:0"
    protocol: tcp
    tcp:
      routes:
        - {{ server_names: [a.test], cluster: a }}
        - {{ server_names: ["*.b.test", b.test], cluster: b }}
  - name: raw
    address: "127.0.0.1:0"
    protocol: tcp
    tcp: {{ routes: [{{ cluster: plain }}] }}
clusters:
  - {{ name: a, endpoints: ["{}"] }}
  - {{ name: b, endpoints: ["{}"] }}
  - {{ name: plain, endpoints: ["{}"] }}
"#,
        a.endpoint(),
        b.endpoint(),
        plain.endpoint()
    );
    let weft = Weft::start(WEFT, &yaml);
    let addr = weft.addr("sni");
    let config = client_config(&pki.ca, None, &["h2", "http/1.1"]);
    for (name, backend) in [("a.test", "service-a"), ("b.test", "service-b")] {
        // The client verifies the backend's own certificate: weft did not terminate TLS.
        let r = tls::get(addr, name, config.clone(), "/").await.expect(name);
        assert_eq!(r.status, 200);
        let seen: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(seen["backend"], backend);
        assert_eq!(
            seen["version"], "HTTP/2.0",
            "ALPN passes through end to end"
        );
    }
    // No route for this name: the connection is closed.
    tls::get(addr, "c.test", config, "/")
        .await
        .expect_err("no route");

    // Raw TCP to a plain HTTP backend.
    let c = client::http1();
    let r = client::get(&c, &weft.url("raw", "/hello"))
        .await
        .expect("raw tcp");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "plain");
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(
        metrics.contains(r#"weft_http_proxy_errors_total{listener="sni",cause="no_route"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"weft_downstream_connections_total{listener="raw"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_versions_and_optional_client_certificates() {
    let pki = Pki::new("versions");
    let cert = pki.issue("edge", &["edge.test"]);
    let client_cert = pki.issue("client", &["spiffe://weft.test/sa/optional"]);
    let backend = Backend::start("app").await;
    let files = format!(
        "certificates: [{{ cert: {}, key: {} }}], client_ca: {}, client_certificate: optional",
        path(&cert.cert),
        path(&cert.key),
        path(&pki.ca)
    );
    let weft = Weft::start(WEFT, &edge(&format!("{{ {files} }}"), &backend));
    let ca = path(&pki.ca);
    // TLS 1.2 is accepted by default; a client without a certificate is served.
    let (ok, out, err) = curl_https(&weft, &ca, &["--tlsv1.2", "--tls-max", "1.2"], "/");
    assert!(ok, "{err}");
    assert!(!out.contains("x-forwarded-client-cert"), "{out}");
    let (ok, out, err) = curl_https(
        &weft,
        &ca,
        &[
            "--cert",
            &path(&client_cert.cert),
            "--key",
            &path(&client_cert.key),
        ],
        "/",
    );
    assert!(ok, "{err}");
    assert!(out.contains("URI=spiffe://weft.test/sa/optional"), "{out}");
    let (_, metrics) = weft.admin_get("/metrics");
    assert!(metrics.contains(r#"version="TLSv1.2""#), "{metrics}");

    // With min_version 1.3 a TLS 1.2 client is refused.
    let strict = Weft::start(
        WEFT,
        &edge(&format!("{{ {files}, min_version: \"1.3\" }}"), &backend),
    );
    let (ok, _, _) = curl_https(&strict, &ca, &["--tlsv1.2", "--tls-max", "1.2"], "/");
    assert!(!ok, "a TLS 1.2 client must be refused");
    let (ok, _, err) = curl_https(&strict, &ca, &[], "/");
    assert!(ok, "{err}");
}
