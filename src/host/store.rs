//! [`Store`] over proxy-wasm shared data: process-wide (every worker, every VM with the same
//! `vm_id`), compare-and-swap per key, surviving VM reloads, gone when Envoy restarts.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::store::{Store, StoreError};

/// The shared-data store of this Envoy process.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(cas))) => Some((bytes, cas)),
            // An existing empty value (a tombstone) comes back without bytes; keep its token.
            Ok((None, Some(cas))) => Some((Vec::new(), cas)),
            Ok((Some(bytes), None)) => Some((bytes, 0)),
            Ok((None, None)) => None,
            Err(status) => {
                log::warn!("shared data read of {key} failed: {status:?}");
                None
            }
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(status) => Err(StoreError::Other(format!("{status:?}"))),
        }
    }
}
