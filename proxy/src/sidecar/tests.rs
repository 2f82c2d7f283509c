use super::*;
use crate::config::ConfigErrors;
use crate::snapshot::Snapshot;

fn build(yaml: &str, identity: bool) -> Result<Snapshot, ConfigErrors> {
    let config = Config::from_yaml(yaml)?;
    let metrics = Metrics::new();
    let wasm = crate::wasm::WasmShared::new(Arc::new(Metrics::new()));
    let id = crate::identity::svid::placeholder().expect("placeholder");
    let env = BuildEnv {
        metrics: &metrics,
        wasm: &wasm,
        base_dir: std::path::Path::new("."),
        identity: identity.then_some(&id),
        names: crate::upstream::Names::CheckOnly,
    };
    Snapshot::build(config, 1, None, env)
}

const GOOD: &str = r#"
sidecar:
  mode: strict
  ports: [ { port: 8080, protocol: http }, { port: 5432 } ]
mesh_services:
  - name: web
    addresses: ["10.96.0.10", "fd00::10"]
    ports: [ { port: 80, target_port: 8080, protocol: http }, { port: 5432, protocol: tcp } ]
    endpoints: ["10.0.0.2", "10.0.0.3"]
    identities: ["spiffe://cluster.local/ns/default/sa/web"]
  - name: outside
    addresses: ["10.96.0.11"]
    ports: [ { port: 443 } ]
    endpoints: ["192.0.2.1"]
"#;

#[test]
fn services_and_ports_become_runtimes() {
    let snap = build(GOOD, true).expect("valid");
    let sc = snap.sidecar.as_ref().expect("sidecar");
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    let web = &sc.outbound[&vip];
    assert_eq!(&*web.cluster.name, "outbound|80|web");
    assert!(
        web.cluster.tls.is_some(),
        "mesh mTLS to a service with identities"
    );
    assert_eq!(sc.outbound.len(), 5, "two VIPs × two ports, and one");
    let outside = &sc.outbound[&"10.96.0.11:443".parse::<SocketAddr>().expect("addr")];
    assert!(
        outside.cluster.tls.is_none(),
        "a service outside the mesh: plaintext"
    );
    assert_eq!(sc.inbound.len(), 2);
    assert!(snap.cluster("inbound|8080").is_some());
    // The capture listeners are bound like any listener.
    let names: Vec<String> = snap.bindings().into_iter().map(|b| b.name).collect();
    assert!(names.contains(&OUTBOUND.to_owned()) && names.contains(&INBOUND.to_owned()));
}

#[test]
fn every_bad_setting_is_located() {
    for (yaml, want) in [
        (
            "sidecar: { outbound_port: 15006 }",
            "sidecar.inbound_port: 15006 is the outbound port too",
        ),
        (
            "sidecar: { outbound_port: 0 }",
            "sidecar: outbound_port and inbound_port must not be 0",
        ),
        (
            "sidecar: { bind: [] }",
            "sidecar.bind: needs at least one IP",
        ),
        (
            "sidecar: { bind: [\"0.0.0.0\", \"localhost\"] }",
            "sidecar.bind[1]: \"localhost\" is not an IP",
        ),
        (
            "sidecar: { detection_timeout: 0s }",
            "sidecar.detection_timeout: must be between",
        ),
        (
            "sidecar: { detection_timeout: 1h }",
            "sidecar.detection_timeout: must be between",
        ),
        (
            "sidecar: { app_address: 0.0.0.0 }",
            "sidecar.app_address: must be an address the workload listens on",
        ),
        (
            "sidecar: { app_address: \"127.0.0.1:80\" }",
            "sidecar.app_address: \"127.0.0.1:80\" is not an IP",
        ),
        (
            "sidecar: { ports: [ { port: 80 }, { port: 80 } ] }",
            "sidecar.ports[1].port: port 80 is listed twice",
        ),
        (
            "sidecar: { ports: [ { port: 15001 } ] }",
            "sidecar.ports[0].port: port 15001 is a capture port",
        ),
        (
            "sidecar: { ports: [ { port: 0 } ] }",
            "sidecar.ports[0].port: must not be 0",
        ),
        (
            "sidecar: { inbound_filters: [nope] }",
            "sidecar.inbound_filters[0]: unknown filter \"nope\"",
        ),
        (
            "sidecar: { mode: strict }",
            "sidecar.mode: strict needs the proxy's mesh identity",
        ),
        ("sidecar: { mode: strictest }", "unknown variant"),
        ("sidecar: { egress: deny_all }", "unknown variant"),
        ("sidecar: { portz: [] }", "unknown field"),
    ] {
        let text = build(yaml, false).expect_err(want).to_string();
        assert!(text.contains(want), "{want}: {text}");
    }
    let svc = |s: &str| format!("sidecar: {{}}\nmesh_services:\n  - {s}\n");
    for (s, want) in [
        (
            r#"{ name: "", addresses: ["10.0.0.1"], ports: [{port: 80}] }"#,
            "mesh_services[0].name",
        ),
        (
            r#"{ name: "a b", addresses: ["10.0.0.1"], ports: [{port: 80}] }"#,
            "mesh_services[0].name",
        ),
        (
            r#"{ name: a, addresses: [], ports: [{port: 80}] }"#,
            "mesh_services[0].addresses: a service needs at least one virtual IP",
        ),
        (
            r#"{ name: a, addresses: ["web.default"], ports: [{port: 80}] }"#,
            "mesh_services[0].addresses[0]: \"web.default\" is not an IP",
        ),
        (
            r#"{ name: a, addresses: ["0.0.0.0"], ports: [{port: 80}] }"#,
            "mesh_services[0].addresses[0]: 0.0.0.0 cannot be a service address",
        ),
        (
            r#"{ name: a, addresses: ["224.0.0.1"], ports: [{port: 80}] }"#,
            "cannot be a service address",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [] }"#,
            "mesh_services[0].ports: a service needs at least one port",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 0}] }"#,
            "mesh_services[0].ports[0]: port and target_port must not be 0",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 80, target_port: 0}] }"#,
            "must not be 0",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 80}, {port: 80}] }"#,
            "mesh_services[0].ports[1].port: port 80 is listed twice",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 80}], endpoints: ["10.0.0.2:80"] }"#,
            "mesh_services[0].endpoints[0]: \"10.0.0.2:80\" is not an IP address",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 80}], identities: ["spiffe://TD/x"] }"#,
            "mesh_services[0].identities",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 80}], identities: ["spiffe://cluster.local/ns/a/sa/b"] }"#,
            "mesh_services[0].ports[0]: mesh mTLS",
        ),
        (
            r#"{ name: a, addresses: ["10.0.0.1"], ports: [{port: 70000}] }"#,
            "invalid value",
        ),
    ] {
        let text = build(&svc(s), false).expect_err(want).to_string();
        assert!(text.contains(want), "{want}: {text}");
    }
    // Two services on one VIP:port, two with one name.
    let text = build(
            "sidecar: {}\nmesh_services:\n  - { name: a, addresses: [\"10.0.0.1\"], ports: [{port: 80}] }\n  - { name: a, addresses: [\"10.0.0.1\"], ports: [{port: 80}] }\n",
            false,
        )
        .expect_err("clash")
        .to_string();
    assert!(
        text.contains("mesh_services[1].name: duplicate service name"),
        "{text}"
    );
    assert!(
        text.contains("10.0.0.1:80 is also service \"a\"'s"),
        "{text}"
    );
    // A listener may not take a capture listener's name; a registry without a sidecar is
    // checked all the same.
    let text = build(
            "listeners: [ { name: sidecar-inbound, address: \"127.0.0.1:0\", routes: r } ]\nroutes: { r: [] }\nsidecar: {}\n",
            false,
        )
        .expect_err("reserved")
        .to_string();
    assert!(
        text.contains("listeners[0].name: names starting with `sidecar-`"),
        "{text}"
    );
    let text = build(
        "mesh_services:\n  - { name: a, addresses: [x], ports: [{port: 80}] }\n",
        false,
    )
    .expect_err("checked")
    .to_string();
    assert!(text.contains("mesh_services[0].addresses[0]"), "{text}");
    // A service scaled to zero is valid.
    build(
            "sidecar: {}\nmesh_services:\n  - { name: a, addresses: [\"10.0.0.1\"], ports: [{port: 80}] }\n",
            false,
        )
        .expect("a service without endpoints");
}

#[test]
fn the_sidecar_access_log_is_written_by_every_http_runtime_inbound_and_outbound() {
    let dir = std::env::temp_dir().join(format!("weft-sc-al-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("access.log");
    let yaml = GOOD.replace(
        "  mode: strict\n",
        &format!(
            "  mode: strict\n  access_log: {{ path: \"{}\" }}\n",
            path.display()
        ),
    );
    let snap = build(&yaml, true).expect("valid");
    let sc = snap.sidecar.as_ref().expect("sidecar");
    assert!(sc.outbound.values().all(|d| d.http.access_log.is_some()));
    assert!(sc.outbound.values().all(|d| d.tcp.access_log.is_none()));
    assert!(sc.inbound.values().all(|p| p.http.access_log.is_some()));
    // Without it, none.
    let snap = build(GOOD, true).expect("valid");
    let sc = snap.sidecar.as_ref().expect("sidecar");
    assert!(sc.outbound.values().all(|d| d.http.access_log.is_none()));
    // A file that cannot be opened is a located error.
    let bad = GOOD.replace(
        "  mode: strict\n",
        "  mode: strict\n  access_log: { path: /no/such/dir/a.log }\n",
    );
    let text = build(&bad, true).expect_err("refused").to_string();
    assert!(
        text.contains("sidecar.access_log.path: cannot open /no/such/dir/a.log"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
