//! HTTP on the proxy's downstream side: the connection ([`server`]), the request's way through
//! the proxy ([`proxy`]), and what they use on the way (headers, paths, bodies).

pub mod body;
pub mod filtered;
pub mod forward;
pub mod headers;
pub mod path;
pub mod proxy;
pub mod respond;
pub mod server;
pub mod upgrade;
