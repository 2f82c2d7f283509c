//! Data shared by every VM of the filter's `vm_id` (on weft: across workers), with
//! compare-and-swap.

use weft_abi::Status;

use crate::Error;
use crate::host::host;

/// The version of a value, for [`set`]'s compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cas(pub u32);

/// The value of `key` and its version, if set.
pub fn get(key: &str) -> Result<Option<(Vec<u8>, Cas)>, Error> {
    let (v, cas) = host()
        .get_shared_data(key)
        .map_err(|s| Error::new("get_shared_data", s))?;
    Ok(v.map(|v| (v, Cas(cas))))
}

/// Why [`set`] did not store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    /// Someone stored a newer version since `cas` was read: read again and retry.
    CasMismatch,
    Host(Error),
}

/// Stores `value` under `key` — only if its version is still `cas` (`None`: unconditionally).
pub fn set(key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), SetError> {
    match host().set_shared_data(key, value, cas.map_or(0, |c| c.0)) {
        Ok(()) => Ok(()),
        Err(Status::CasMismatch) => Err(SetError::CasMismatch),
        Err(s) => Err(SetError::Host(Error::new("set_shared_data", s))),
    }
}
