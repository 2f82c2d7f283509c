//! `weft-proxy`: Weft's data plane.
//!
//! Owns the configuration model, listeners, HTTP/1.1 + HTTP/2 (+ gRPC) proxying, routing,
//! upstream clusters and their connections, the admin listener, metrics and the proxy's
//! lifecycle (reload, drain). It must not know about the control plane's storage.
//!
//! A request's way, one module per stop:
//! [`listener`] → [`worker`] (accept) → [`http::server`] (connection) → [`http::proxy`]
//! (the request) → [`router`] → [`upstream`] (balancing, pools) → back through
//! [`http::body`], with every proxy-made error answered by [`errors`].

pub mod admin;
pub mod config;
pub mod control;
pub mod errors;
pub mod http;
pub mod identity;
pub mod listener;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod peek;
pub mod router;
pub mod server;
pub mod sidecar;
pub mod snapshot;
pub mod splice;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod wasm;
pub mod worker;

pub use server::{Options, Server, run};
