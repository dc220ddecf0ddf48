//! The seam for state shared across Envoy workers.
//!
//! Every worker thread runs its own copy of the filter, so anything that must be counted once
//! per Envoy process (usage already charged, span ids already seen) lives in proxy-wasm
//! *shared data*: a process-wide byte map with a compare-and-swap token per key. This module
//! owns the [`Store`] trait that mirrors those semantics, an in-memory implementation for
//! native tests ([`MemoryStore`]), and [`update`], the one read-modify-write loop everybody
//! uses. The host glue implements [`Store`] over `get_shared_data` / `set_shared_data`; no
//! proxy-wasm type appears here.
//!
//! # Semantics every implementation must keep (they are Envoy's)
//! - Every successful write gives the key a new, non-zero token.
//! - A write carrying a token fails with [`StoreError::CasMismatch`] when the key's current
//!   token differs, i.e. when anybody wrote in between.
//! - Keys cannot be deleted, only overwritten. By convention an **empty value means absent**:
//!   [`update`] hands an empty value to its closure as `None`. Such a tombstone keeps its
//!   token, so re-creating a tombstoned key is still CAS-protected.
//! - A key that has never been written has no token, and Envoy inserts a missing key whatever
//!   token the write carries. Creating a key is therefore last-writer-wins: two workers that
//!   both create the same key at the same instant can lose one write. Callers keep that window
//!   small by creating per-session keys from the single stream that sees the session first.
//!
//! Host glue note: the Rust SDK reports an existing empty value as `(None, Some(cas))`; map it
//! to `Some((vec![], cas))` so that the tombstone's token is not lost.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;

/// Why a write did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Somebody wrote the key since it was read (or [`update`] ran out of attempts).
    CasMismatch,
    /// The store refused to grow.
    Full,
    /// Anything else the host reported, or a value that could not be decoded.
    Other(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::CasMismatch => write!(f, "shared data changed concurrently (cas mismatch)"),
            StoreError::Full => write!(f, "shared data is full"),
            StoreError::Other(message) => write!(f, "shared data error: {message}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Process-wide key/value state with compare-and-swap (proxy-wasm shared data).
pub trait Store {
    /// The value and its compare-and-swap token, which changes on every write.
    /// `None` when the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value`. `cas: None` writes unconditionally; `Some(c)` fails with
    /// [`StoreError::CasMismatch`] if the key exists and its current token is not `c`.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// A [`Store`] in a `HashMap`, with Envoy's semantics, for native tests and tools.
///
/// Test hooks: [`MemoryStore::inject_cas_conflicts`] makes the next conditional writes fail
/// as if another worker had just written the key, and [`MemoryStore::with_max_keys`] makes
/// the store refuse new keys with [`StoreError::Full`].
#[derive(Debug)]
pub struct MemoryStore {
    entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// The next token handed out; like Envoy, one counter for all keys, never 0.
    next_cas: Cell<u32>,
    /// How many upcoming conditional writes to fail with a simulated foreign write.
    pending_conflicts: Cell<usize>,
    max_keys: Option<usize>,
    writes: Cell<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            entries: RefCell::new(HashMap::new()),
            next_cas: Cell::new(1),
            pending_conflicts: Cell::new(0),
            max_keys: None,
            writes: Cell::new(0),
        }
    }

    /// A store that refuses to create more than `max_keys` keys.
    pub fn with_max_keys(max_keys: usize) -> MemoryStore {
        MemoryStore {
            max_keys: Some(max_keys),
            ..MemoryStore::new()
        }
    }

    /// The next `n` writes that carry a token fail with [`StoreError::CasMismatch`], each
    /// after a simulated foreign write that leaves the bytes as they were but moves the token
    /// on, exactly what a concurrent worker's write looks like to the loser.
    pub fn inject_cas_conflicts(&self, n: usize) {
        self.pending_conflicts.set(n);
    }

    /// Conflicts injected but not yet consumed.
    pub fn pending_cas_conflicts(&self) -> usize {
        self.pending_conflicts.get()
    }

    /// Successful writes so far (lets tests assert that a no-op did not write).
    pub fn writes(&self) -> u64 {
        self.writes.get()
    }

    /// Number of keys ever written (tombstones included: keys cannot be deleted).
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }

    /// The current bytes of `key`, without its token.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.entries.borrow().get(key).map(|(v, _)| v.clone())
    }

    fn take_cas(&self) -> u32 {
        let cas = self.next_cas.get();
        let next = match cas.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        self.next_cas.set(next);
        cas
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.entries.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let exists = self.entries.borrow().contains_key(key);
        if cas.is_some() && exists && self.pending_conflicts.get() > 0 {
            self.pending_conflicts.set(self.pending_conflicts.get() - 1);
            let token = self.take_cas();
            if let Some(entry) = self.entries.borrow_mut().get_mut(key) {
                entry.1 = token;
            }
            return Err(StoreError::CasMismatch);
        }
        if !exists && self.max_keys.is_some_and(|max| self.len() >= max) {
            return Err(StoreError::Full);
        }
        let token = self.take_cas();
        let mut entries = self.entries.borrow_mut();
        match entries.get_mut(key) {
            Some(entry) => {
                if cas.is_some_and(|c| c != entry.1) {
                    return Err(StoreError::CasMismatch);
                }
                *entry = (value.to_vec(), token);
            }
            // Envoy inserts a missing key whatever token the write carries.
            None => {
                entries.insert(key.to_string(), (value.to_vec(), token));
            }
        }
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }
}

/// Read-modify-write of one key with compare-and-swap retries.
///
/// Each attempt reads the key and calls `f` with its current value (`None` when the key is
/// missing or empty, see the module doc). `f` returns `None` to leave the key alone, which
/// ends the loop with `Ok(None)`, or the new bytes and a result, which are written with the
/// token just read; on [`StoreError::CasMismatch`] the loop starts over with a fresh read, so
/// `f` must be a pure function of its input (it may run several times). After `attempts`
/// conflicts (at least one attempt is always made) the error is `CasMismatch`; other errors
/// end the loop at once.
pub fn update<T>(
    store: &dyn Store,
    key: &str,
    attempts: usize,
    mut f: impl FnMut(Option<&[u8]>) -> Option<(Vec<u8>, T)>,
) -> Result<Option<T>, StoreError> {
    for _ in 0..attempts.max(1) {
        let current = store.get(key);
        let (value, cas) = match &current {
            Some((bytes, cas)) if bytes.is_empty() => (None, Some(*cas)),
            Some((bytes, cas)) => (Some(bytes.as_slice()), Some(*cas)),
            None => (None, None),
        };
        let Some((new_value, result)) = f(value) else {
            return Ok(None);
        };
        match store.set(key, &new_value, cas) {
            Ok(()) => return Ok(Some(result)),
            Err(StoreError::CasMismatch) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::CasMismatch)
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn add_one(value: Option<&[u8]>) -> Option<(Vec<u8>, u64)> {
        let n: u64 = value
            .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
            .unwrap_or(0)
            + 1;
        Some((n.to_string().into_bytes(), n))
    }

    #[test]
    fn tokens_change_on_every_write_and_guard_writes() {
        let store = MemoryStore::new();
        assert_eq!(store.get("k"), None);
        store.set("k", b"a", None).unwrap();
        let (value, c1) = store.get("k").unwrap();
        assert_eq!(value, b"a");
        store.set("k", b"b", Some(c1)).unwrap();
        let (_, c2) = store.get("k").unwrap();
        assert_ne!(c1, c2);
        assert_ne!(c2, 0);
        assert_eq!(store.set("k", b"c", Some(c1)), Err(StoreError::CasMismatch));
        assert_eq!(store.value("k").unwrap(), b"b");
        // Unconditional writes always land.
        store.set("k", b"d", None).unwrap();
        assert_eq!(store.value("k").unwrap(), b"d");
        assert_eq!(store.writes(), 3);
    }

    #[test]
    fn a_missing_key_is_inserted_whatever_the_token_like_envoy() {
        let store = MemoryStore::new();
        store.set("k", b"x", Some(12345)).unwrap();
        assert_eq!(store.value("k").unwrap(), b"x");
    }

    #[test]
    fn update_creates_then_increments() {
        let store = MemoryStore::new();
        assert_eq!(update(&store, "n", 3, add_one), Ok(Some(1)));
        assert_eq!(update(&store, "n", 3, add_one), Ok(Some(2)));
        assert_eq!(store.value("n").unwrap(), b"2");
    }

    #[test]
    fn update_retries_conflicts_and_gives_up_after_attempts() {
        let store = MemoryStore::new();
        update(&store, "n", 1, add_one).unwrap();
        store.inject_cas_conflicts(2);
        assert_eq!(update(&store, "n", 3, add_one), Ok(Some(2)));
        assert_eq!(store.pending_cas_conflicts(), 0);
        store.inject_cas_conflicts(3);
        assert_eq!(
            update(&store, "n", 3, add_one),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(store.value("n").unwrap(), b"2");
        // Zero attempts still tries once.
        assert_eq!(update(&store, "n", 0, add_one), Ok(Some(3)));
    }

    #[test]
    fn update_sees_the_concurrent_write_on_retry() {
        // A store whose first conditional write loses to another worker's increment.
        struct Racy {
            inner: MemoryStore,
            raced: Cell<bool>,
        }
        impl Store for Racy {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                self.inner.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
                if !self.raced.replace(true) {
                    update(&self.inner, key, 1, add_one).unwrap();
                }
                self.inner.set(key, value, cas)
            }
        }
        let store = Racy {
            inner: MemoryStore::new(),
            raced: Cell::new(true),
        };
        update(&store, "n", 1, add_one).unwrap();
        store.raced.set(false);
        assert_eq!(update(&store, "n", 2, add_one), Ok(Some(3)));
        assert_eq!(store.inner.value("n").unwrap(), b"3");
    }

    #[test]
    fn empty_value_is_absent_but_keeps_its_token() {
        let store = MemoryStore::new();
        store.set("k", b"old", None).unwrap();
        store.set("k", b"", None).unwrap();
        let mut seen = Vec::new();
        let result = update(&store, "k", 1, |v| {
            seen.push(v.map(<[u8]>::to_vec));
            Some((b"new".to_vec(), ()))
        });
        assert_eq!(result, Ok(Some(())));
        assert_eq!(seen, vec![None]);
        // The tombstone's token was used: a conflict on it is detected.
        store.set("k", b"", None).unwrap();
        store.inject_cas_conflicts(1);
        assert_eq!(
            update(&store, "k", 1, |_| Some((b"x".to_vec(), ()))),
            Err(StoreError::CasMismatch)
        );
    }

    #[test]
    fn closure_none_does_not_write() {
        let store = MemoryStore::new();
        assert_eq!(update(&store, "k", 3, |_| None::<(Vec<u8>, ())>), Ok(None));
        assert_eq!(store.writes(), 0);
        assert!(store.is_empty());
    }

    #[test]
    fn full_store_refuses_new_keys_only() {
        let store = MemoryStore::with_max_keys(1);
        store.set("a", b"1", None).unwrap();
        assert_eq!(store.set("b", b"1", None), Err(StoreError::Full));
        store.set("a", b"2", None).unwrap();
        assert_eq!(update(&store, "c", 5, add_one), Err(StoreError::Full));
        assert_eq!(store.len(), 1);
    }
}
