//! HTTP on the proxy's downstream side, one module per stage of a request, each using only the
//! ones listed after it:
//!
//! - [`server`]: the connection (HTTP/1.1 or HTTP/2 with hyper, its deadlines, its drain);
//! - [`request`]: one request through the stages below, in order;
//! - [`filter`]: the listener's Wasm filters, both ways (absent without filters);
//! - [`route`]: the route table, local answers (direct, redirect);
//! - [`forward`], [`upgrade`]: to the cluster (balance, pool, retry; `CONNECT`, upgrades);
//! - [`check`]: refusals and the canonical path, before anything else;
//! - [`respond`]: proxy errors as responses;
//! - [`body`], [`record`]: the response body and the end of the request it closes;
//! - [`conn`]: the connection as its requests see it;
//! - [`headers`], [`path`]: header rules and path canonicalization (no stage of their own).

pub mod body;
pub mod check;
pub mod conn;
pub mod filter;
pub mod forward;
pub mod headers;
pub mod path;
pub mod record;
pub mod request;
pub mod respond;
pub mod route;
pub mod server;
pub mod upgrade;
