use super::*;
use crate::metrics::Metrics;
use crate::wasm::WasmShared;

fn build(yaml: &str) -> Result<Snapshot, ConfigErrors> {
    build_with(yaml, None)
}

fn build_with(
    yaml: &str,
    identity: Option<&Arc<crate::identity::Identity>>,
) -> Result<Snapshot, ConfigErrors> {
    let config = Config::from_yaml(yaml)?;
    let metrics = Metrics::new();
    let wasm = WasmShared::new(Arc::new(Metrics::new()));
    let env = BuildEnv {
        metrics: &metrics,
        wasm: &wasm,
        base_dir: std::path::Path::new("."),
        identity,
        names: crate::upstream::Names::Resolve,
    };
    Snapshot::build(config, 1, None, env)
}

/// `tls: mesh` needs an identity, takes nothing from files, and its identities are SPIFFE
/// IDs; every misuse is located.
#[test]
fn mesh_tls_is_checked() {
    let id = crate::identity::svid::placeholder().expect("placeholder");
    let ok = r#"
listeners:
  - { name: main, address: "127.0.0.1:0", routes: main, tls: mesh }
  - name: strict
    address: "127.0.0.1:0"
    routes: main
    tls: { mode: mesh, identities: ["spiffe://cluster.local/ns/a/sa/b"] }
routes:
  main:
    - to: [{ cluster: peer }]
clusters:
  - { name: peer, endpoints: ["127.0.0.1:1"], tls: mesh }
"#;
    build_with(ok, Some(&id)).expect("valid with an identity");
    let text = build_with(ok, None).expect_err("no identity").to_string();
    assert!(
        text.contains("clusters[0].tls.mode: `mesh` needs the proxy's mesh identity"),
        "{text}"
    );
    assert!(
        text.contains("listeners[0].tls.mode: `mesh` needs"),
        "{text}"
    );
    for (yaml, want) in [
        (
            r#"{ name: main, address: "127.0.0.1:0", routes: main, tls: { mode: mesh, cert: a.pem, key: a.key } }"#,
            "listeners[0].tls.cert: not with `mode: mesh`",
        ),
        (
            r#"{ name: main, address: "127.0.0.1:0", routes: main, tls: { mode: mesh, identities: ["spiffe://TD/x"] } }"#,
            "listeners[0].tls.identities: [0]",
        ),
        (
            r#"{ name: main, address: "127.0.0.1:0", routes: main, tls: { cert: a.pem, key: a.key, identities: ["spiffe://td/x"] } }"#,
            "listeners[0].tls.identities: only with `mode: mesh`",
        ),
    ] {
        let config = format!(
            "listeners:\n  - {yaml}\nroutes:\n  main:\n    - to: [{{ cluster: peer }}]\nclusters:\n  - {{ name: peer, endpoints: [\"127.0.0.1:1\"] }}\n"
        );
        let text = build_with(&config, Some(&id)).expect_err(want).to_string();
        assert!(text.contains(want), "{want}: {text}");
    }
    let cluster = |tls: &str| {
        format!(
            "listeners: []\nroutes: {{}}\nclusters:\n  - {{ name: peer, endpoints: [\"127.0.0.1:1\"], tls: {tls} }}\n"
        )
    };
    for (tls, want) in [
        (
            "{ mode: mesh, sni: x.test }",
            "clusters[0].tls.sni: not with `mode: mesh`",
        ),
        (
            "{ mode: mesh, identities: [nope] }",
            "clusters[0].tls.identities",
        ),
        (
            "{ ca: ca.pem, identities: [\"spiffe://td/x\"] }",
            "clusters[0].tls.identities: only with",
        ),
    ] {
        let text = build_with(&cluster(tls), Some(&id))
            .expect_err(want)
            .to_string();
        assert!(text.contains(want), "{want}: {text}");
    }
    // Another word than `mesh` is a parse error, not a silent plain-text cluster.
    assert!(build_with(&cluster("meshy"), Some(&id)).is_err());
    assert!(build_with(&cluster("MESH"), Some(&id)).is_err());
}

#[test]
fn every_error_is_reported_located() {
    let errs = build(
        r#"
listeners:
  - { name: main, address: "127.0.0.1:99999", routes: nope }
  - { name: main, address: "127.0.0.1:8080", routes: main }
routes:
  main:
    - to: [{ cluster: api-v3 }]
clusters:
  - { name: api, endpoints: [] }
"#,
    )
    .expect_err("invalid");
    let text = errs.to_string();
    assert_eq!(
        text,
        "clusters[0].endpoints: a cluster needs at least one endpoint\n\
             routes.main[0].to[0].cluster: unknown cluster \"api-v3\"\n\
             listeners[0].address: invalid address \"127.0.0.1:99999\": expected IP:port, e.g. 127.0.0.1:8080\n\
             listeners[0].routes: unknown route table \"nope\"\n\
             listeners[1].name: duplicate listener name \"main\""
    );
}

#[test]
fn valid_config_builds_with_a_digest() {
    let s = build(
        r#"
listeners: [{ name: main, address: "127.0.0.1:0", routes: main }]
routes: { main: [{ to: [{ cluster: api }] }] }
clusters: [{ name: api, endpoints: ["127.0.0.1:9000"] }]
"#,
    )
    .expect("valid");
    assert!(s.digest.starts_with("sha256:"));
    assert_eq!(s.listeners["main"].route_stats[0].targets.len(), 1);
}
