//! gRPC through weft with a real tonic client and server: unary, streaming both ways, errors
//! carried in trailers, and metadata.

use futures_util::StreamExt;
use weft_testkit::Weft;
use weft_testkit::grpc::GrpcBackend;
use weft_testkit::grpc::pb::EchoRequest;
use weft_testkit::grpc::pb::echo_client::EchoClient;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

async fn setup(protocol: &str) -> (Weft, GrpcBackend, EchoClient<tonic::transport::Channel>) {
    let backend = GrpcBackend::start().await;
    let weft = Weft::start(
        WEFT,
        &format!(
            r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main }}
routes:
  main:
    - match: {{ path_prefix: /weft.test.echo.Echo/, headers: {{ content-type: {{ prefix: application/grpc }} }} }}
      to: [{{ cluster: grpc }}]
      timeout: 0s
clusters:
  - {{ name: grpc, endpoints: ["{}"], protocol: {protocol} }}
"#,
            backend.addr
        ),
    );
    let client = EchoClient::connect(weft.url("main", ""))
        .await
        .expect("connect through weft");
    (weft, backend, client)
}

fn req(message: &str, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count,
        fail_with: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_errors() {
    for protocol in ["http2", "downstream"] {
        let (_weft, _backend, mut client) = setup(protocol).await;
        let mut request = tonic::Request::new(req("hello", 0));
        request
            .metadata_mut()
            .insert("x-caller", "test".parse().expect("metadata"));
        let reply = client.unary(request).await.expect("unary");
        assert_eq!(reply.get_ref().message, "hello");

        // A gRPC error travels in trailers (grpc-status), through the proxy.
        let err = client
            .unary(EchoRequest {
                fail_with: tonic::Code::PermissionDenied as u32,
                ..req("no", 0)
            })
            .await
            .expect_err("fails");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(err.message(), "failing as asked with 7");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_client_streaming() {
    let (_weft, _backend, mut client) = setup("http2").await;
    let mut stream = client
        .server_stream(req("tick", 500))
        .await
        .expect("call")
        .into_inner();
    let mut n = 0;
    while let Some(reply) = stream.next().await {
        let reply = reply.expect("message");
        assert_eq!(reply.index, n);
        assert_eq!(reply.message, format!("tick #{n}"));
        n += 1;
    }
    assert_eq!(n, 500);

    let outbound = futures_util::stream::iter((0..300).map(|i| req(&i.to_string(), 0)));
    let reply = client
        .client_stream(outbound)
        .await
        .expect("call")
        .into_inner();
    assert_eq!(reply.index, 300);
    assert!(reply.message.starts_with("0,1,2,"), "{}", reply.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_streaming_interleaves() {
    let (_weft, _backend, mut client) = setup("http2").await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(tokio_stream_from(rx))
        .await
        .expect("call")
        .into_inner();
    // Each message is answered before the next is sent: the proxy streams, it does not buffer.
    for i in 0..50u32 {
        tx.send(req(&format!("m{i}"), 0)).await.expect("send");
        let reply = replies.next().await.expect("a reply").expect("ok");
        assert_eq!(reply.message, format!("m{i}"));
        assert_eq!(reply.index, i);
    }
    drop(tx);
    assert!(replies.next().await.is_none(), "the stream ends cleanly");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<EchoRequest>,
) -> impl futures_util::Stream<Item = EchoRequest> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
