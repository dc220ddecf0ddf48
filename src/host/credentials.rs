//! Reading and seeding the upstream credential in proxy-wasm shared data.
//!
//! Scope: shared data is per Envoy process (all workers, all VMs with the same `vm_id`), and
//! survives VM reloads. Each replica seeds its own copy from its environment.

use super::store::SharedData;
use crate::credentials::{
    is_usable_key, should_seed, Source, StoredCredential, DEFAULT_CREDENTIAL_SLOT,
};
use crate::store::{update, Store};

/// Compare-and-swap attempts before giving up; contention here is only other workers seeding.
const CAS_ATTEMPTS: usize = 8;

/// The upstream key for this request, read fresh from shared data so rotations apply at once.
pub fn current_key() -> Option<String> {
    let (bytes, _) = SharedData.get(DEFAULT_CREDENTIAL_SLOT)?;
    StoredCredential::decode(&bytes).map(|c| c.key)
}

/// Writes the key found in environment variable `var` into shared data, unless a rotated key
/// is already there. Logs what happened (never the key).
pub fn seed_from_env(var: &str) {
    let key = match std::env::var(var) {
        Ok(key) if is_usable_key(key.trim()) => key.trim().to_string(),
        Ok(_) => {
            log::warn!("{var} is set but empty or malformed; calls will be answered 503 until a credential is provided");
            return;
        }
        Err(_) => {
            log::warn!(
                "{var} is not in the VM environment (vm_config.environment_variables.host_env_keys); calls will be answered 503 until a credential is provided"
            );
            return;
        }
    };
    let seed = StoredCredential {
        source: Source::Env(var.to_string()),
        key,
    };
    let outcome = update(
        &SharedData,
        DEFAULT_CREDENTIAL_SLOT,
        CAS_ATTEMPTS,
        |current| {
            let stored = current.and_then(StoredCredential::decode);
            should_seed(stored.as_ref(), &seed).then(|| (seed.encode(), ()))
        },
    );
    match outcome {
        Ok(Some(())) => log::info!("upstream credential seeded into shared data from {var}"),
        Ok(None) => log::info!("upstream credential already in shared data; not re-seeded"),
        Err(err) => {
            log::error!("cannot seed the upstream credential into {DEFAULT_CREDENTIAL_SLOT}: {err}")
        }
    }
}
