//! `weft-proxy`: Weft's data plane.
//!
//! Owns the configuration model, listeners, HTTP/1.1 + HTTP/2 (+ gRPC) proxying, routing,
//! upstream clusters and their connections, the admin listener, metrics and the proxy's
//! lifecycle (reload, drain). It must not know about the control plane's storage.
//!
//! A request's way, one module per stage, each depending only on the ones below it (a test,
//! `tests/layers.rs`, keeps it so): [`worker`] (accept) → (TLS, [`tls::server`]) →
//! [`http::server`] (the connection) → [`http::request`], which runs the stages in order:
//! [`http::check`] → [`http::filter`] (Wasm, [`wasm`]) → [`http::route`] ([`router`]) →
//! [`http::forward`] ([`upstream`]: balancing, pools, retries) → [`http::respond`] →
//! [`http::record`] (the end of the request). [`published`] holds what the workers share and
//! each worker's handles on it; [`process`] runs the whole (listeners, reloads, drain).

pub mod access_log;
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
pub mod process;
pub mod published;
pub mod router;
pub mod sidecar;
pub mod snapshot;
pub mod splice;
pub mod tcp;
pub mod text;
pub mod tls;
pub mod upstream;
pub mod wasm;
pub mod worker;

pub use process::{Options, Server, run};
