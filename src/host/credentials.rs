//! Upstream credentials in proxy-wasm shared data: reading them per request, seeding them from
//! the VM environment, refreshing Vault-backed ones, and session affinity.
//!
//! Scope: shared data is per Envoy process (all workers, all VMs with the same `vm_id`), and
//! survives VM reloads. Each replica seeds and refreshes its own copy.

use super::store::SharedData;
use crate::config::{Origin, Plan};
use crate::credentials::{
    affinity_key, is_usable_key, should_seed, slot, KeyRing, Source, StoredCredential,
};
use crate::store::{update, Store};

/// Compare-and-swap attempts before giving up; contention here is only other workers seeding.
const CAS_ATTEMPTS: usize = 8;

/// [`KeyRing`] over shared data: read fresh on every request, so rotations apply at once.
pub struct SharedKeys;

impl KeyRing for SharedKeys {
    fn key(&self, credential: &str) -> Option<String> {
        let (bytes, _) = SharedData.get(&slot(credential))?;
        StoredCredential::decode(&bytes).map(|c| c.key)
    }

    fn affinity(&self, session_id: &str) -> Option<String> {
        let (bytes, _) = SharedData.get(&affinity_key(session_id))?;
        String::from_utf8(bytes)
            .ok()
            .filter(|name| !name.is_empty())
    }
}

/// Records the credential a session was created with (first writer wins).
pub fn remember_affinity(session_id: &str, credential: &str) {
    let result = update(
        &SharedData,
        &affinity_key(session_id),
        CAS_ATTEMPTS,
        |current| match current {
            Some(_) => None,
            None => Some((credential.as_bytes().to_vec(), ())),
        },
    );
    if let Err(err) = result {
        log::warn!("affinity of {session_id} not recorded: {err}");
    }
}

/// Seeds every environment-sourced credential of `plan` into shared data.
pub fn seed_all(plan: &Plan) {
    for source in &plan.credentials {
        if let Origin::Env(var) = &source.origin {
            seed_from_env(&source.name, var);
        }
    }
}

/// Writes the key found in environment variable `var` into the credential's slot, unless a
/// rotated key is already there. Logs what happened (never the key).
fn seed_from_env(name: &str, var: &str) {
    let key = match std::env::var(var) {
        Ok(key) if is_usable_key(key.trim()) => key.trim().to_string(),
        Ok(_) => {
            log::warn!("credential {name}: {var} is set but empty or malformed; its calls get 503 until a key is provided");
            return;
        }
        Err(_) => {
            log::warn!(
                "credential {name}: {var} is not in the VM environment (vm_config.environment_variables.host_env_keys); its calls get 503 until a key is provided"
            );
            return;
        }
    };
    let seed = StoredCredential {
        source: Source::Env(var.to_string()),
        key,
    };
    let outcome = update(&SharedData, &slot(name), CAS_ATTEMPTS, |current| {
        let stored = current.and_then(StoredCredential::decode);
        should_seed(stored.as_ref(), &seed).then(|| (seed.encode(), ()))
    });
    match outcome {
        Ok(Some(())) => log::info!("credential {name} seeded into shared data from {var}"),
        Ok(None) => log::info!("credential {name} already in shared data; not re-seeded"),
        Err(err) => log::error!("cannot seed credential {name}: {err}"),
    }
}

/// Stores a key obtained by rotation (e.g. from Vault); returns whether it changed.
pub fn store_rotated(name: &str, key: &str) -> bool {
    let rotated = StoredCredential {
        source: Source::Rotated,
        key: key.to_string(),
    };
    let outcome = update(&SharedData, &slot(name), CAS_ATTEMPTS, |current| {
        let changed = current
            .and_then(StoredCredential::decode)
            .is_none_or(|c| c.key != key);
        changed.then(|| (rotated.encode(), ()))
    });
    match outcome {
        Ok(Some(())) => {
            log::info!("credential {name} rotated");
            true
        }
        Ok(None) => false,
        Err(err) => {
            log::error!("cannot store rotated credential {name}: {err}");
            false
        }
    }
}
