//! Weft's control-plane protocol: `weft.control.v1` (see `proto/weft/control/v1/control.proto`),
//! generated once for both sides — the `Distribution` service proxies subscribe to, and the
//! `Control` service weftctl speaks.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("weft.control.v1");
}

/// The part of etcd's v3 API weft-cp stores its state with (see `proto/etcd/kv.proto`).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The largest piece of a snapshot's configuration in one message: a stream's encoder keeps
/// a buffer as large as the largest message it sent, for the stream's life.
pub const CONFIG_PART: usize = 16 * 1024;

/// Module chunks on the wire.
pub const MODULE_CHUNK: usize = 256 * 1024;

/// The largest message either side accepts (a module upload in one message).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
