//! weft-cp: the mesh's desired state — listeners, route tables, clusters and filters, each
//! selecting proxies by label — validated, versioned and stored ([`store`]), and distributed
//! to every proxy.

pub mod ca;
pub mod link;
pub mod registry;
pub mod resources;
pub mod server;
pub mod store;
