//! [`Store`] over proxy-wasm shared data: process-wide (every worker, every VM with the same
//! `vm_id`), compare-and-swap per key, surviving VM reloads, gone when Envoy restarts.
//!
//! [`SharedData`] keeps the per-resource and per-session key families in bounded slots
//! ([`crate::bounded`]); [`RawSharedData`] is the plain map underneath.

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

use crate::bounded::{Bounded, Effect, Family, Observer};
use crate::metrics::{self, Metric};
use crate::store::{Store, StoreError};

/// The shared-data store of this Envoy process, with bounded key families.
pub struct SharedData;

/// The shared-data map itself, every key as written.
pub struct RawSharedData;

impl Store for RawSharedData {
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

thread_local! {
    static STAT_IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

fn bump(metric: &Metric, family: &Family, delta: i64) {
    let name = metrics::stat_name(metric, &[family.name]);
    let kind = match metric.kind {
        metrics::Kind::Gauge => MetricType::Gauge,
        _ => MetricType::Counter,
    };
    let id = STAT_IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if let Some(id) = ids.get(&name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, &name).ok()?;
        ids.insert(name, id);
        Some(id)
    });
    if let Some(id) = id {
        if let Err(status) = hostcalls::increment_metric(id, delta) {
            log::warn!("cannot increment {}: {status:?}", metric.name);
        }
    }
}

/// Turns slot effects into the `ma_gateway_state_*` metrics.
struct StateMetrics;

impl Observer for StateMetrics {
    fn effect(&self, family: &Family, effect: Effect) {
        if effect.filled {
            bump(&metrics::STATE_LIVE, family, 1);
        }
        if effect.evicted {
            bump(&metrics::STATE_EVICTIONS, family, 1);
        }
        if effect.refused {
            bump(&metrics::STATE_REFUSED, family, 1);
        }
    }
}

fn bounded() -> Bounded<'static> {
    Bounded {
        inner: &RawSharedData,
        now_secs: super::now_ms() / 1000,
        observer: &StateMetrics,
    }
}

impl Store for SharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        bounded().get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        bounded().set(key, value, cas)
    }
}
