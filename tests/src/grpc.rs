//! A real gRPC server (tonic) for tests: the `Echo` service of `proto/echo.proto`, with unary,
//! server-streaming, client-streaming and bidirectional calls.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// Generated code for `weft.test.echo`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weft.test.echo");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

#[derive(Debug, Default)]
struct Service;

fn check(req: &EchoRequest) -> Result<(), Status> {
    if req.fail_with != 0 {
        return Err(Status::new(
            tonic::Code::from_i32(req.fail_with as i32),
            format!("failing as asked with {}", req.fail_with),
        ));
    }
    Ok(())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = req.into_inner();
        check(&req)?;
        Ok(Response::new(EchoReply {
            message: req.message,
            index: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        check(&req)?;
        let replies = (0..req.count).map(move |i| {
            Ok(EchoReply {
                message: format!("{} #{i}", req.message),
                index: i,
            })
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(replies))))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut stream = req.into_inner();
        let mut parts = Vec::new();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            check(&msg)?;
            parts.push(msg.message);
        }
        Ok(Response::new(EchoReply {
            message: parts.join(","),
            index: parts.len() as u32,
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let stream = req.into_inner();
        let out = stream.enumerate().map(|(i, msg)| {
            let msg = msg?;
            check(&msg)?;
            Ok(EchoReply {
                message: msg.message,
                index: i as u32,
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// A running gRPC server on `127.0.0.1:0`; stops when dropped.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcBackend {
    pub async fn start() -> GrpcBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve(listener)
    }

    /// Serves on a listener bound elsewhere (in a pod's network namespace, say).
    pub fn start_with(listener: std::net::TcpListener) -> GrpcBackend {
        listener.set_nonblocking(true).expect("nonblocking");
        Self::serve(tokio::net::TcpListener::from_std(listener).expect("listener"))
    }

    fn serve(listener: tokio::net::TcpListener) -> GrpcBackend {
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(EchoServer::new(Service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        GrpcBackend { addr, task }
    }
}
