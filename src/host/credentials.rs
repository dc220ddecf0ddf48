//! Reading and seeding the upstream credential in proxy-wasm shared data.
//!
//! Scope: shared data is per Envoy process (all workers, all VMs with the same `vm_id`), and
//! survives VM reloads. Each replica seeds its own copy from its environment.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::credentials::{
    is_usable_key, should_seed, Source, StoredCredential, DEFAULT_CREDENTIAL_SLOT,
};

/// Compare-and-swap attempts before giving up; contention here is only other workers seeding.
const CAS_ATTEMPTS: usize = 8;

/// The upstream key for this request, read fresh from shared data so rotations apply at once.
pub fn current_key() -> Option<String> {
    match hostcalls::get_shared_data(DEFAULT_CREDENTIAL_SLOT) {
        Ok((Some(bytes), _)) => StoredCredential::decode(&bytes).map(|c| c.key),
        Ok((None, _)) => None,
        Err(status) => {
            log::warn!("cannot read the upstream credential from shared data: {status:?}");
            None
        }
    }
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
    for _ in 0..CAS_ATTEMPTS {
        let (stored, cas) = match hostcalls::get_shared_data(DEFAULT_CREDENTIAL_SLOT) {
            Ok((bytes, cas)) => (bytes.and_then(|b| StoredCredential::decode(&b)), cas),
            Err(status) => {
                log::error!("cannot read shared data {DEFAULT_CREDENTIAL_SLOT}: {status:?}");
                return;
            }
        };
        if !should_seed(stored.as_ref(), &seed) {
            log::info!(
                "upstream credential already in shared data ({:?}); not re-seeded",
                stored.map(|s| s.source)
            );
            return;
        }
        match hostcalls::set_shared_data(DEFAULT_CREDENTIAL_SLOT, Some(&seed.encode()), cas) {
            Ok(()) => {
                log::info!("upstream credential seeded into shared data from {var}");
                return;
            }
            Err(Status::CasMismatch) => continue,
            Err(status) => {
                log::error!("cannot write shared data {DEFAULT_CREDENTIAL_SLOT}: {status:?}");
                return;
            }
        }
    }
    log::error!(
        "gave up seeding the upstream credential after {CAS_ATTEMPTS} compare-and-swap conflicts"
    );
}
