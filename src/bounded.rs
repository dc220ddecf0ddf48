//! Bounded shared-data families: per-resource and per-session keys live in a fixed number of
//! slots, so memory stays flat however many resources and sessions the gateway ever sees.
//!
//! Proxy-wasm 0.2 shared data cannot delete a key: a key once written (even emptied) keeps its
//! string and map entry in Envoy for the life of the process. So a key per id grows without
//! bound. Instead every key of a [`Family`] (`ma_gateway.owner.<id>`, …) is mapped to one of
//! the family's [`Family::slots`] slot keys by a hash of the id, `ma_gateway.slot.<family>.<n>`,
//! whose value carries the id it belongs to (`<len>:<id><payload>`). A slot holding another id
//! reads as a miss; writing an id into a slot held by another id *evicts* that id, when the
//! family's [`Evict`] rule allows it (else the write fails with [`StoreError::Full`]).
//!
//! [`Bounded`] wraps any [`Store`] and does the mapping for the keys of [`FAMILIES`]; every
//! other key passes through untouched. Callers keep using their logical keys.
//!
//! Correctness after an eviction, per family:
//! - `owner`: a miss is re-learnt by the upstream look-up, as for an id never seen;
//! - `tenant`, `thread_model`: caches of the reconciler's tenant label and a thread's model;
//!   a miss labels `unknown` / looks the model up again, never charges anything;
//! - `affinity`: a session whose affinity was evicted uses its tenant's credential (the
//!   affinity matters only when a tenant's credential mapping changes during a session);
//! - `usage` (exactly-once accounting records): evicted only when idle longer than the
//!   accounting TTL (settled), and the evicted id is remembered in a fixed-size Bloom filter
//!   ([`was_evicted`]), so a record re-created for it *re-baselines* on its next snapshot
//!   instead of charging the session a second time (see `accounting`);
//! - `list_cost`: the last list cost reported per session (a metric's high-water mark); also
//!   remembered in a Bloom filter, so a re-seen figure re-baselines instead of re-counting.

use crate::store::{self, Store, StoreError};

/// When a slot's occupant may be overwritten by another id.
#[derive(Clone, Copy, Debug)]
pub enum Evict {
    /// Always: the family is a cache, re-learnt on a miss.
    Always,
    /// Only when `settled(payload, now_secs)` says the occupant is done with.
    IfSettled(fn(&[u8], u64) -> bool),
}

/// One bounded key family.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// The `family` label of its metrics and the slot keys' infix.
    pub name: &'static str,
    /// Logical keys are `<prefix><id><suffix>`.
    pub prefix: &'static str,
    pub suffix: &'static str,
    pub slots: u32,
    pub evict: Evict,
    /// Remember evicted ids (in a Bloom filter of [`BLOOM_BLOCKS`] × [`BLOOM_BLOCK_BYTES`]).
    pub remember_evictions: bool,
}

/// Prefix of every slot key.
pub const SLOT_PREFIX: &str = "ma_gateway.slot.";
/// Prefix of the Bloom filter blocks of evicted ids.
pub const EVICTED_PREFIX: &str = "ma_gateway.evicted.";
/// Bloom filter size per family: 16 blocks of 4 KiB (524,288 bits).
pub const BLOOM_BLOCKS: u64 = 16;
pub const BLOOM_BLOCK_BYTES: usize = 4096;
const BLOOM_HASHES: u64 = 3;
const CAS_ATTEMPTS: usize = 8;

pub const OWNER: Family = Family {
    name: "owner",
    prefix: "ma_gateway.owner.",
    suffix: "",
    slots: 32_768,
    evict: Evict::Always,
    remember_evictions: false,
};
pub const AFFINITY: Family = Family {
    name: "affinity",
    prefix: "ma_gateway.affinity.",
    suffix: "",
    slots: 16_384,
    evict: Evict::Always,
    remember_evictions: false,
};
pub const TENANT: Family = Family {
    name: "tenant",
    prefix: "ma_gateway.tenant.",
    suffix: "",
    slots: 16_384,
    evict: Evict::Always,
    remember_evictions: false,
};
pub const THREAD_MODEL: Family = Family {
    name: "thread_model",
    prefix: "ma_gateway.thread_model.",
    suffix: "",
    slots: 16_384,
    evict: Evict::Always,
    remember_evictions: false,
};
pub const LIST_COST: Family = Family {
    name: "list_cost",
    prefix: "ma_gateway.usage.",
    suffix: ".list_cost",
    slots: 16_384,
    evict: Evict::Always,
    remember_evictions: true,
};
pub const USAGE: Family = Family {
    name: "usage",
    prefix: "ma_gateway.usage.",
    suffix: "",
    slots: 16_384,
    evict: Evict::IfSettled(crate::accounting::evictable),
    remember_evictions: true,
};

/// Every bounded family, matched in order. Only caches are bounded today: an evicted entry is
/// re-learnt (owner look-up, tenant `unknown`, thread model looked up again, the tenant's
/// credential), so eviction never changes a charge. The accounting families (`USAGE`,
/// `LIST_COST`) are defined but NOT bounded: a hash slot shared with an active session would
/// leave a new session unmetered, and the Bloom filter that guards a re-seen evicted session
/// saturates over time (false positives would re-baseline new sessions as already charged).
/// Their records stay one key per session, as before, until a design that is exact under
/// collisions exists.
pub const FAMILIES: [Family; 4] = [OWNER, AFFINITY, TENANT, THREAD_MODEL];

/// Keys under a family prefix that are not per-id (they pass through).
const SINGLETONS: [&str; 1] = [crate::accounting::INDEX_KEY];

/// The family and id of a logical key, if it is bounded.
pub fn family_of(key: &str) -> Option<(&'static Family, &str)> {
    if SINGLETONS.contains(&key) {
        return None;
    }
    FAMILIES.iter().find_map(|family| {
        let id = key
            .strip_prefix(family.prefix)?
            .strip_suffix(family.suffix)?;
        (!id.is_empty() && !id.contains('.')).then_some((family, id))
    })
}

fn fnv1a64(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Final mix so that low bits depend on every byte.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// The slot key holding `id` of `family`.
pub fn slot_key(family: &Family, id: &str) -> String {
    let slot = fnv1a64(id.as_bytes(), 0) % u64::from(family.slots.max(1));
    format!("{SLOT_PREFIX}{}.{slot}", family.name)
}

fn encode(id: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{}:{id}", id.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The id and payload of a slot value; `None` for an empty (never used) slot or junk.
fn decode(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let colon = bytes.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
    let rest = &bytes[colon + 1..];
    if rest.len() < len {
        return None;
    }
    let id = std::str::from_utf8(&rest[..len]).ok()?;
    Some((id, &rest[len..]))
}

/// What a write did to its slot, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The slot was empty and now holds an id (live count +1).
    pub filled: bool,
    /// The slot held another id, which was evicted.
    pub evicted: bool,
    /// The write was refused: the occupant may not be evicted yet.
    pub refused: bool,
}

/// Told about every effect (the host turns them into metrics).
pub trait Observer {
    fn effect(&self, family: &Family, effect: Effect);
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn effect(&self, _: &Family, _: Effect) {}
}

/// A [`Store`] whose bounded families live in slots of `inner`.
pub struct Bounded<'a> {
    pub inner: &'a dyn Store,
    pub now_secs: u64,
    pub observer: &'a dyn Observer,
}

impl Store for Bounded<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let Some((family, id)) = family_of(key) else {
            return self.inner.get(key);
        };
        let (bytes, cas) = self.inner.get(&slot_key(family, id))?;
        match decode(&bytes) {
            Some((held, payload)) if held == id => Some((payload.to_vec(), cas)),
            // Another id (or nothing) in the slot: a miss, carrying the slot's token so that a
            // conditional write made from this read fails if the slot changes meanwhile.
            _ => Some((Vec::new(), cas)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let Some((family, id)) = family_of(key) else {
            return self.inner.set(key, value, cas);
        };
        let slot = slot_key(family, id);
        let current = self.inner.get(&slot);
        let token = match (cas, &current) {
            (Some(c), _) => Some(c),
            (None, Some((_, t))) => Some(*t),
            (None, None) => None,
        };
        let mut effect = Effect::default();
        let mut evicted_id = None;
        if let Some((bytes, _)) = &current {
            match decode(bytes) {
                Some((held, payload)) if held != id => {
                    let allowed = match family.evict {
                        Evict::Always => true,
                        Evict::IfSettled(settled) => {
                            payload.is_empty() || settled(payload, self.now_secs)
                        }
                    };
                    if !allowed {
                        self.observer.effect(
                            family,
                            Effect {
                                refused: true,
                                ..Effect::default()
                            },
                        );
                        return Err(StoreError::Full);
                    }
                    effect.evicted = true;
                    evicted_id = Some(held.to_string());
                }
                Some(_) => {}
                None => effect.filled = !value.is_empty(),
            }
        } else {
            effect.filled = !value.is_empty();
        }
        // An empty logical value (a tombstone) of the slot's own id empties the slot.
        let bytes = if value.is_empty() {
            Vec::new()
        } else {
            encode(id, value)
        };
        self.inner.set(&slot, &bytes, token)?;
        if let (Some(evicted), true) = (&evicted_id, family.remember_evictions) {
            if let Err(error) = remember_eviction(self.inner, family, evicted) {
                log::warn!("eviction of {evicted} not remembered: {error}");
            }
        }
        if effect != Effect::default() {
            self.observer.effect(family, effect);
        }
        Ok(())
    }
}

fn bloom_positions(family: &Family, id: &str) -> (String, [usize; BLOOM_HASHES as usize]) {
    let block = fnv1a64(id.as_bytes(), 1) % BLOOM_BLOCKS;
    let bits = (BLOOM_BLOCK_BYTES * 8) as u64;
    let mut positions = [0usize; BLOOM_HASHES as usize];
    for (i, p) in positions.iter_mut().enumerate() {
        *p = usize::try_from(fnv1a64(id.as_bytes(), 2 + i as u64) % bits).unwrap_or(0);
    }
    (
        format!("{EVICTED_PREFIX}{}.{block}", family.name),
        positions,
    )
}

fn remember_eviction(store: &dyn Store, family: &Family, id: &str) -> Result<(), StoreError> {
    let (key, positions) = bloom_positions(family, id);
    store::update(store, &key, CAS_ATTEMPTS, |current| {
        let mut block = current.map_or_else(Vec::new, <[u8]>::to_vec);
        block.resize(BLOOM_BLOCK_BYTES, 0);
        let before = block.clone();
        for p in positions {
            block[p / 8] |= 1 << (p % 8);
        }
        (block != before).then_some((block, ()))
    })
    .map(|_| ())
}

/// Whether `id` of `family` may have been evicted (a Bloom filter: false positives, never
/// false negatives). Always false for families that do not remember evictions.
pub fn was_evicted(store: &dyn Store, family: &Family, id: &str) -> bool {
    if !family.remember_evictions {
        return false;
    }
    let (key, positions) = bloom_positions(family, id);
    let Some((block, _)) = store.get(&key) else {
        return false;
    };
    positions.iter().all(|p| {
        block
            .get(p / 8)
            .is_some_and(|byte| byte & (1 << (p % 8)) != 0)
    })
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::MemoryStore;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Tally(RefCell<Vec<(&'static str, Effect)>>);

    impl Observer for Tally {
        fn effect(&self, family: &Family, effect: Effect) {
            self.0.borrow_mut().push((family.name, effect));
        }
    }

    #[test]
    fn keys_route_to_their_family() {
        assert_eq!(
            family_of("ma_gateway.owner.agent_1").map(|(f, id)| (f.name, id)),
            Some(("owner", "agent_1"))
        );
        // Accounting records are not bounded (see FAMILIES): they pass through.
        assert!(family_of("ma_gateway.usage.sesn_1.list_cost").is_none());
        assert!(family_of("ma_gateway.usage.sesn_1").is_none());
        assert_eq!(
            family_of("ma_gateway.thread_model.sthr_1").map(|(f, id)| (f.name, id)),
            Some(("thread_model", "sthr_1"))
        );
        assert!(family_of(crate::accounting::INDEX_KEY).is_none());
        assert!(family_of("ma_gateway.credential.default").is_none());
        assert!(family_of("ma_gateway.budget.acme.day").is_none());
        assert!(family_of("ma_gateway.owner.").is_none());
    }

    #[test]
    fn a_hundred_thousand_ids_use_at_most_the_slots() {
        let inner = MemoryStore::new();
        let tally = Tally::default();
        let store = Bounded {
            inner: &inner,
            now_secs: 0,
            observer: &tally,
        };
        for i in 0..100_000 {
            let key = format!("ma_gateway.owner.agent_{i}");
            store.set(&key, b"tenant:acme", None).unwrap();
            assert_eq!(store.get(&key).unwrap().0, b"tenant:acme");
        }
        assert!(inner.len() <= OWNER.slots as usize);
        let effects = tally.0.borrow();
        let filled = effects.iter().filter(|(_, e)| e.filled).count();
        let evicted = effects.iter().filter(|(_, e)| e.evicted).count();
        assert_eq!(filled, inner.len());
        assert_eq!(filled + evicted, 100_000);
    }

    #[test]
    fn a_collision_is_a_miss_and_evicts_caches_only() {
        let inner = MemoryStore::new();
        let store = Bounded {
            inner: &inner,
            now_secs: 0,
            observer: &Silent,
        };
        // Two ids sharing a slot.
        let a = "agent_a".to_string();
        let b = (0..)
            .map(|i| format!("agent_{i}"))
            .find(|b| slot_key(&OWNER, b) == slot_key(&OWNER, &a))
            .unwrap();
        store
            .set(&format!("ma_gateway.owner.{a}"), b"tenant:x", None)
            .unwrap();
        assert_eq!(store.get(&format!("ma_gateway.owner.{b}")).unwrap().0, b"");
        store
            .set(&format!("ma_gateway.owner.{b}"), b"tenant:y", None)
            .unwrap();
        assert_eq!(store.get(&format!("ma_gateway.owner.{a}")).unwrap().0, b"");
        assert_eq!(
            store.get(&format!("ma_gateway.owner.{b}")).unwrap().0,
            b"tenant:y"
        );
        assert!(!was_evicted(&inner, &OWNER, &a));
    }

    #[test]
    fn accounting_records_are_never_slotted_so_no_session_goes_unmetered() {
        // Two sessions whose ids would share a usage slot both keep their own record: a
        // collision never refuses or evicts exact accounting.
        let inner = MemoryStore::default();
        let a = "sesn_a".to_string();
        let b = (0..)
            .map(|i| format!("sesn_{i}"))
            .find(|b| slot_key(&USAGE, b) == slot_key(&USAGE, &a))
            .unwrap();
        let limits = crate::accounting::Limits::default();
        let snap = crate::usage::Observation::Snapshot(crate::usage::Snapshot {
            input: 10,
            ..Default::default()
        });
        let store = Bounded {
            inner: &inner,
            now_secs: 100,
            observer: &Silent,
        };
        let first = crate::accounting::record_with(&store, &limits, &a, &snap, 100).unwrap();
        let second = crate::accounting::record_with(&store, &limits, &b, &snap, 100).unwrap();
        assert_eq!((first.input, second.input), (10, 10));
        let again = crate::accounting::record_with(&store, &limits, &a, &snap, 101).unwrap();
        assert_eq!(again.input, 0);
    }
}
