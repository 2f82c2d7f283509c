//! weft-cp: the mesh's desired state — listeners, route tables, clusters, filters and services,
//! each selecting proxies by label — validated, versioned and stored ([`store`]), distributed
//! to every proxy, and filters' new revisions rolled out in stages ([`rollout`]).

pub mod blob;
pub mod ca;
pub mod etcd;
pub mod inject;
pub mod link;
pub mod registry;
pub mod resources;
pub mod rollout;
pub mod server;
pub mod store;
