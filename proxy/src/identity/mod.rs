//! The proxy's mesh identity (the Istio-Auth role, proxy side): SPIFFE IDs ([`spiffe`]), the
//! key, certificate and trust bundle it holds ([`svid`]), and the rustls pieces that present
//! and verify SVIDs on the control link and on `tls: mesh` listeners and clusters ([`mesh`]).
//! The control plane issues the certificates (enrollment and renewal: `crate::control`).

pub mod mesh;
pub mod spiffe;
pub mod svid;

pub use spiffe::SpiffeId;
pub use svid::{Identity, Material};

/// The path of the control plane's own identity in a trust domain: proxies accept a control
/// plane only with `spiffe://<td>/ns/weft-system/sa/weft-cp`.
pub const CONTROL_PLANE_NS: &str = "weft-system";
pub const CONTROL_PLANE_SA: &str = "weft-cp";
/// Operators' identities are `spiffe://<td>/weft/admin/<name>`.
pub const ADMIN_PATH: &str = "/weft/admin/";
