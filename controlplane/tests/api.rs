//! The control API in process: concurrent applies both land, refusals change nothing, tokens
//! are required.

use weft_controlplane::server::{ControlPlane, ControlService};
use weft_controlplane::store::Store;
use weft_wire::v1::{self, control_server::Control};

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", "Bearer t0ken".parse().expect("header"));
    r
}

fn cluster(name: &str, port: u16) -> v1::ApplyRequest {
    v1::ApplyRequest {
        yaml: format!(
            "kind: cluster\nspec: {{ name: {name}, endpoints: [\"127.0.0.1:{port}\"] }}\n"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_both_land_and_refusals_change_nothing() {
    let cp =
        ControlPlane::new(Store::open(None).expect("store"), Some("t0ken".into())).expect("cp");
    let api = ControlService(cp);

    let e = api
        .status(tonic::Request::new(v1::StatusRequest {}))
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(cluster("x", 1));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(
        api.apply(wrong).await.expect_err("bad token").code(),
        tonic::Code::Unauthenticated
    );

    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(
                async move { api.apply(authed(cluster(&format!("c{i}"), 9000 + i))).await },
            )
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("applied");
    }
    let got = api
        .get(authed(v1::GetRequest {
            kind: "cluster".into(),
            name: String::new(),
        }))
        .await
        .expect("get")
        .into_inner();
    for i in 0..8 {
        assert!(
            got.yaml.contains(&format!("name: c{i}")),
            "c{i} lost:\n{}",
            got.yaml
        );
    }
    assert_eq!(got.version, 8);

    // Invalid: a route to a cluster that does not exist. Refused, located; nothing changes.
    let bad = v1::ApplyRequest {
        yaml: "kind: routes\nspec: { name: main, routes: [ { to: [ { cluster: ghost } ] } ] }\n"
            .into(),
    };
    let e = api.apply(authed(bad)).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("unknown cluster \"ghost\""),
        "{}",
        e.message()
    );
    let after = api
        .history(authed(v1::HistoryRequest {}))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(after.entries.last().map(|e| e.version), Some(8));

    // A filter must name an uploaded module by digest.
    let e = api
        .apply(authed(v1::ApplyRequest {
            yaml: "kind: filter\nspec: { name: f, module: f.wasm }\n".into(),
        }))
        .await
        .expect_err("refused");
    assert!(
        e.message().contains("module must be a digest"),
        "{}",
        e.message()
    );
    // Garbage is not a module.
    let e = api
        .upload_module(authed(v1::UploadModuleRequest {
            module: b"not wasm".to_vec(),
        }))
        .await
        .expect_err("refused");
    assert!(
        e.message().contains("the module is refused"),
        "{}",
        e.message()
    );
}

/// Two documents of one kind and name in one apply (a listener per app, both called `edge`)
/// are refused with both places; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_documents_are_refused_and_change_nothing() {
    let cp =
        ControlPlane::new(Store::open(None).expect("store"), Some("t0ken".into())).expect("cp");
    let api = ControlService(cp);
    api.apply(authed(cluster("app", 9000)))
        .await
        .expect("applied");
    let yaml = r#"
kind: routes
spec: { name: main, routes: [ { to: [ { cluster: app } ] } ] }
---
kind: listener
selector: { app: web }
spec: { name: edge, address: "127.0.0.1:0", routes: main }
---
kind: listener
selector: { app: api }
spec: { name: edge, address: "127.0.0.1:0", routes: main }
"#;
    let e = api
        .apply(authed(v1::ApplyRequest { yaml: yaml.into() }))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("document 3: listener/edge is also defined by document 2"),
        "{}",
        e.message()
    );
    let got = api
        .get(authed(v1::GetRequest {
            kind: String::new(),
            name: String::new(),
        }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.version, 1, "nothing stored");
    assert!(!got.yaml.contains("name: main"), "{}", got.yaml);
}
