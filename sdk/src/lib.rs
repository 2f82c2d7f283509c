//! # weft-sdk: Proxy-Wasm filters in Rust, the comfortable way
//!
//! A filter is two types: a [`Plugin`] — created once per VM from the filter's configuration
//! (deserialized with serde into your own type; an error rejects the configuration) — and an
//! [`HttpFilter`], one per request, whose callbacks are `async`: a filter can `await` an HTTP or
//! gRPC call to a cluster, or a [`time::sleep`], in the middle of its request handling, and the
//! request waits for it without blocking anything else.
//!
//! ```ignore
//! use weft_sdk::prelude::*;
//!
//! #[derive(serde::Deserialize, Default)]
//! struct Config { header: String }
//!
//! struct Tagger { config: Config }
//!
//! impl Plugin for Tagger {
//!     type Config = Config;
//!     type Filter = TagRequest;
//!     fn configure(config: Config) -> Result<Self, String> {
//!         if config.header.is_empty() { return Err("header must not be empty".into()); }
//!         Ok(Tagger { config })
//!     }
//!     fn filter(self: &Rc<Self>) -> TagRequest { TagRequest { plugin: self.clone() } }
//! }
//!
//! struct TagRequest { plugin: Rc<Tagger> }
//!
//! impl HttpFilter for TagRequest {
//!     async fn on_request_headers(&self, req: &mut Headers, _end_of_stream: bool) -> Action {
//!         if req.get("authorization").is_none() {
//!             return Action::respond(Response::new(401).body("who are you?"));
//!         }
//!         let _ = req.set(&self.plugin.config.header, "seen");
//!         Action::Continue
//!     }
//! }
//!
//! weft_sdk::plugin!(Tagger);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip1`: the result is a plain Proxy-Wasm
//! 0.2.1 module (it runs on Envoy too). Test natively with [`testing::FilterTest`]: no proxy, no
//! Wasm.
//!
//! Nothing in this SDK panics on what the host answers: every host call returns a
//! [`Result`] with an [`Error`] naming the call and the host's status.

#![allow(async_fn_in_trait)]

#[cfg(target_family = "wasm")]
mod abi_host;
pub mod config;
pub mod decimal;
mod dispatch;
#[cfg(target_family = "wasm")]
#[doc(hidden)]
pub mod exports;
pub mod host;
mod http_types;
pub mod log;
pub mod metrics;
pub mod properties;
pub mod random;
pub mod shared;
pub mod testing;
pub mod time;
pub mod upstream;

use std::rc::Rc;

pub use http;
pub use http_types::{Action, Body, Headers, Response};
pub use weft_abi::Status;

/// What filter code usually needs.
pub mod prelude {
    pub use crate::upstream::{CallRequest, CallResponse};
    pub use crate::{Action, Body, Error, Headers, HttpFilter, Plugin, Response};
    pub use std::rc::Rc;
}

/// A host call that failed: which call, and the status the host answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub call: &'static str,
    pub status: Status,
}

impl Error {
    pub(crate) fn new(call: &'static str, status: Status) -> Error {
        Error { call, status }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {:?}", self.call, self.status)
    }
}

impl std::error::Error for Error {}

/// A filter's per-VM state: built from the filter's `config` when the proxy configures it, and
/// the factory of the per-request [`HttpFilter`]s.
pub trait Plugin: Sized + 'static {
    /// The filter's `config`, deserialized from its JSON text (`Default` when there is none).
    type Config: serde::de::DeserializeOwned + Default;
    /// What runs for each request.
    type Filter: HttpFilter;

    /// Checks the configuration and builds the plugin. An `Err` rejects the configuration: the
    /// proxy refuses it (on weft, the whole config update is refused with this message).
    fn configure(config: Self::Config) -> Result<Self, String>;

    /// A filter for a new request.
    fn filter(self: &Rc<Self>) -> Self::Filter;

    /// How often [`Plugin::on_tick`] runs; `None` (the default): never.
    fn tick_period(&self) -> Option<std::time::Duration> {
        None
    }

    /// Periodic work (every [`Plugin::tick_period`]).
    fn on_tick(&self) {}
}

/// One request's filter. Every callback is optional; the defaults let the request through.
/// A callback left at its default costs nothing on weft: the first time a default runs, the
/// SDK tells weft (`weft.skip_callbacks`), which stops calling it.
///
/// The `async` callbacks may await callouts ([`upstream::http_call`], [`upstream::grpc_call`])
/// and [`time::sleep`]: the request (or response) is held where it is until the callback
/// returns. What arrives while a callback waits (more body, trailers) is held too, and the
/// filter is called for it, in order, when the waiting callback returns: nothing passes unseen.
pub trait HttpFilter: 'static {
    /// The request head arrived. `end_of_stream`: the request has no body. Return
    /// [`Action::Continue`] to pass it on, [`Action::Respond`] to answer in place of the
    /// upstream (the request goes no further), [`Action::Pause`] to hold it (it stays held).
    async fn on_request_headers(&self, headers: &mut Headers, end_of_stream: bool) -> Action {
        let _ = (headers, end_of_stream);
        dispatch::unused(dispatch::Unused::Stream(dispatch::Phase::RequestHeaders));
        Action::Continue
    }

    /// A chunk of the request body (`body` holds what is buffered so far). [`Action::Pause`]
    /// keeps buffering: the next call sees this chunk and the next ones, and with
    /// `end_of_stream` the whole body. Only called when the filter's type overrides it.
    async fn on_request_body(&self, body: &mut Body, end_of_stream: bool) -> Action {
        let _ = (body, end_of_stream);
        dispatch::unused(dispatch::Unused::Stream(dispatch::Phase::RequestBody));
        Action::Continue
    }

    /// The request trailers arrived.
    async fn on_request_trailers(&self, trailers: &mut Headers) -> Action {
        let _ = trailers;
        dispatch::unused(dispatch::Unused::Stream(dispatch::Phase::RequestTrailers));
        Action::Continue
    }

    /// The response head arrived (from the upstream, or a local response).
    async fn on_response_headers(&self, headers: &mut Headers, end_of_stream: bool) -> Action {
        let _ = (headers, end_of_stream);
        dispatch::unused(dispatch::Unused::Stream(dispatch::Phase::ResponseHeaders));
        Action::Continue
    }

    /// A chunk of the response body; as [`HttpFilter::on_request_body`].
    async fn on_response_body(&self, body: &mut Body, end_of_stream: bool) -> Action {
        let _ = (body, end_of_stream);
        dispatch::unused(dispatch::Unused::Stream(dispatch::Phase::ResponseBody));
        Action::Continue
    }

    /// The response trailers arrived.
    async fn on_response_trailers(&self, trailers: &mut Headers) -> Action {
        let _ = trailers;
        dispatch::unused(dispatch::Unused::Stream(dispatch::Phase::ResponseTrailers));
        Action::Continue
    }

    /// The request is over (completed, answered locally, or reset): the place for access logs
    /// and metrics. Request and response headers, and properties, can still be read.
    fn on_log(&self) {
        dispatch::unused(dispatch::Unused::Log);
    }

    /// Whether the filter overrides the body callbacks (so the SDK asks for bodies): set to
    /// `true` when you implement `on_request_body` / `on_response_body`.
    const WANTS_BODIES: bool = false;
}

/// Tells the proxy that this filter's [`HttpFilter::on_log`] does nothing from now on (for
/// every request of this VM): weft then stops calling it; another proxy goes on, harmlessly.
/// For a filter whose `on_log` only works under some configurations.
pub fn skip_on_log() {
    dispatch::unused(dispatch::Unused::Log);
}

/// Registers `$plugin` (a [`Plugin`]) as the module's filter: every root context of the module
/// runs it. Put it once in the filter crate's `lib.rs`.
#[macro_export]
macro_rules! plugin {
    ($plugin:ty) => {
        #[cfg(target_family = "wasm")]
        #[unsafe(no_mangle)]
        pub extern "C" fn _initialize() {
            $crate::exports::initialize();
            $crate::register::<$plugin>();
        }
    };
}

/// Makes `P` the plugin every root context of this module runs (the [`plugin!`] macro and the
/// test harness call it).
pub fn register<P: Plugin>() {
    dispatch::register::<P>();
}
