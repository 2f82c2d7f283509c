//! `weft-testkit`: what Weft's integration and end-to-end tests stand on — real backends
//! (HTTP/1.1 + h2c, gRPC), a harness for real `weft` processes, and real clients.
//! Everything binds `127.0.0.1:0`; nothing assumes a fixed port or an installed server.

pub mod backend;
pub mod client;
pub mod filters;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod jwt;
pub mod netns;
pub mod process;
pub mod refusing;
pub mod tls;

pub use backend::Backend;
pub use client::Reply;
pub use process::{Weft, eventually, http_get, validate};
pub use refusing::RefusingPort;
