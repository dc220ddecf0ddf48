//! Background reconciliation: the agent keeps spending while nobody streams, so a singleton
//! service (the same `.wasm`, `root_id: ma_gateway_reconciler`, on Envoy's main thread) polls
//! `GET /v1/sessions/{id}` for the sessions the gateway knows, and feeds the cumulative usage
//! snapshot in those bodies to the same exactly-once accounting as the streams.
//!
//! This module holds the decisions (which sessions this tick, what request to send, who the
//! session belongs to); `host::root` does the timer and the calls. Scope: per Envoy process
//! (the session index lives in its shared data). At fleet scale every replica reconciles the
//! sessions it has seen; accounting is idempotent, so overlap costs requests, not accuracy.

use crate::config::Plan;
use crate::store::{self, Store, StoreError};

/// The root id that makes a root context the reconciler instead of the HTTP filter.
pub const RECONCILER_ROOT_ID: &str = "ma_gateway_reconciler";

/// Who runs the background duties (reconciling, Vault refresh, the active-streams recount):
/// a lease in shared data, `<holder> <until_ms>`. The singleton service renews it every tick
/// (it is the designated owner and writes unconditionally). Envoy never reloads a bootstrap
/// service whose VM failed (a panic stops it until Envoy restarts), so every filter root checks
/// the lease on its own tick and, once it has run out, takes it over by compare-and-swap: one
/// holder at a time, and the duties resume within [`LEASE_MS`] plus a tick of the service's
/// last renewal. A holder that fails the same way is replaced the same way.
pub const LEASE_KEY: &str = "ma_gateway.background.lease";
/// The singleton service's name in the lease.
pub const SERVICE_HOLDER: &str = "service";
/// How long a lease lasts without renewal; holders renew every one-second tick.
pub const LEASE_MS: u64 = 3_000;

/// What a filter root's tick found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// This root held the lease and renewed it: it runs the duties.
    Renewed,
    /// The lease had run out (its holder, if any, stopped renewing): this root took it over.
    TookOver { from: Option<String> },
    /// Somebody else holds a live lease (normally the service), or won the race for it.
    Standby,
}

fn encode_lease(holder: &str, until_ms: u64) -> Vec<u8> {
    format!("{holder} {until_ms}").into_bytes()
}

fn parse_lease(bytes: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (holder, until) = text.split_once(' ')?;
    Some((holder.to_string(), until.parse().ok()?))
}

/// The service's tick: it takes or keeps the lease whoever holds it.
pub fn renew_as_service(store: &dyn Store, now_ms: u64) -> Result<(), StoreError> {
    store.set(
        LEASE_KEY,
        &encode_lease(SERVICE_HOLDER, now_ms.saturating_add(LEASE_MS)),
        None,
    )
}

/// A filter root's tick: renews the lease when `me` holds it, takes it over when it has run
/// out, else stands by. The write carries the token of the read, so of several roots racing
/// for an expired lease exactly one wins (the key is created empty at configure time: a
/// missing key would be created whatever token the write carries).
pub fn try_lead(store: &dyn Store, me: &str, now_ms: u64) -> Result<Leadership, StoreError> {
    let (holder, until, cas) = match store.get(LEASE_KEY) {
        None => (None, 0, None),
        Some((bytes, cas)) => match parse_lease(&bytes) {
            Some((holder, until)) => (Some(holder), until, Some(cas)),
            None => (None, 0, Some(cas)),
        },
    };
    let mine = holder.as_deref() == Some(me);
    if !mine && until > now_ms {
        return Ok(Leadership::Standby);
    }
    match store.set(
        LEASE_KEY,
        &encode_lease(me, now_ms.saturating_add(LEASE_MS)),
        cas,
    ) {
        Ok(()) if mine => Ok(Leadership::Renewed),
        Ok(()) => Ok(Leadership::TookOver { from: holder }),
        Err(StoreError::CasMismatch) => Ok(Leadership::Standby),
        Err(other) => Err(other),
    }
}

/// Picks up to `batch` sessions starting at `cursor` (wrapping), so that over successive ticks
/// every indexed session is polled in turn. Returns the batch and the next cursor.
pub fn next_batch(sessions: &[String], cursor: usize, batch: usize) -> (Vec<String>, usize) {
    if sessions.is_empty() || batch == 0 {
        return (Vec::new(), 0);
    }
    let start = cursor % sessions.len();
    let take = batch.min(sessions.len());
    let picked = (0..take)
        .map(|i| sessions[(start + i) % sessions.len()].clone())
        .collect();
    (picked, (start + take) % sessions.len())
}

/// Headers of the gateway's own `GET /v1/sessions/{id}` call, credentialed like a forwarded
/// call (the key from shared data, required betas, the configured version).
pub fn session_request(plan: &Plan, session_id: &str, credential: &str) -> Vec<(String, String)> {
    get_request(plan, &format!("/v1/sessions/{session_id}"), credential)
}

/// Headers of any `GET <path>` the gateway sends upstream on its own behalf.
pub fn get_request(plan: &Plan, path: &str, credential: &str) -> Vec<(String, String)> {
    vec![
        (":method".into(), "GET".into()),
        (":path".into(), path.to_string()),
        (":authority".into(), plan.upstream.authority.clone()),
        ("x-api-key".into(), credential.to_string()),
        (
            "anthropic-version".into(),
            plan.upstream.anthropic_version.clone(),
        ),
        ("anthropic-beta".into(), plan.betas.required.join(",")),
        ("user-agent".into(), "ma-gateway-reconciler".into()),
        // The gateway reads the answer (usage, owner tag): never let it come compressed.
        (
            "accept-encoding".into(),
            crate::content_coding::UPSTREAM_ACCEPT_ENCODING.into(),
        ),
    ]
}

fn tenant_key(session_id: &str) -> String {
    format!("ma_gateway.tenant.{session_id}")
}

/// Remembers which tenant a session's usage is attributed to (first writer wins), so the
/// reconciler, which has no caller, labels its charges the same way the streams do.
pub fn remember_tenant(store: &dyn Store, session_id: &str, tenant: &str) {
    let result = store::update(store, &tenant_key(session_id), 4, |current| match current {
        Some(_) => None,
        None => Some((tenant.as_bytes().to_vec(), ())),
    });
    if let Err(err) = result {
        log::warn!("tenant of {session_id} not remembered: {err}");
    }
}

/// The tenant a session's usage is attributed to, if known.
pub fn tenant_of(store: &dyn Store, session_id: &str) -> Option<String> {
    let (bytes, _) = store.get(&tenant_key(session_id))?;
    String::from_utf8(bytes).ok().filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::MemoryStore;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("sesn_{i}")).collect()
    }

    #[test]
    fn batches_rotate_over_every_session() {
        let sessions = ids(5);
        let (first, cursor) = next_batch(&sessions, 0, 2);
        assert_eq!(first, ["sesn_0", "sesn_1"]);
        let (second, cursor) = next_batch(&sessions, cursor, 2);
        assert_eq!(second, ["sesn_2", "sesn_3"]);
        let (third, cursor) = next_batch(&sessions, cursor, 2);
        assert_eq!(third, ["sesn_4", "sesn_0"]);
        assert_eq!(cursor, 1);
        // The list shrank below the cursor: it wraps instead of skipping or panicking.
        assert_eq!(next_batch(&ids(1), 7, 4), (vec!["sesn_0".to_string()], 0));
        assert_eq!(next_batch(&[], 3, 4), (vec![], 0));
    }

    #[test]
    fn request_is_credentialed_like_a_forwarded_call() {
        let plan =
            Plan::from_json(br#"{"api_version":"v1","upstream":{"authority":"up.test"}}"#).unwrap();
        let headers = session_request(&plan, "sesn_1", "sk-up");
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get(":path"), Some("/v1/sessions/sesn_1"));
        assert_eq!(get(":authority"), Some("up.test"));
        assert_eq!(get("x-api-key"), Some("sk-up"));
        assert_eq!(get("anthropic-beta"), Some("managed-agents-2026-04-01"));
        assert_eq!(get("anthropic-version"), Some("2023-06-01"));
    }

    #[test]
    fn the_service_leads_and_a_filter_root_takes_over_once_its_lease_runs_out() {
        let store = MemoryStore::new();
        crate::limits::prepare_key(&store, LEASE_KEY).unwrap();
        renew_as_service(&store, 10_000).unwrap();
        // While the service renews, filter roots stand by.
        assert_eq!(try_lead(&store, "vm-a", 10_500), Ok(Leadership::Standby));
        renew_as_service(&store, 11_000).unwrap();
        assert_eq!(try_lead(&store, "vm-a", 13_999), Ok(Leadership::Standby));
        // The service stopped renewing at 11 000 (a panic): its lease ends at 14 000.
        assert_eq!(
            try_lead(&store, "vm-a", 14_000),
            Ok(Leadership::TookOver {
                from: Some("service".into())
            })
        );
        assert_eq!(try_lead(&store, "vm-b", 14_100), Ok(Leadership::Standby));
        assert_eq!(try_lead(&store, "vm-a", 15_000), Ok(Leadership::Renewed));
        // The holder fails the same way: another root takes over from it.
        assert_eq!(
            try_lead(&store, "vm-b", 18_000),
            Ok(Leadership::TookOver {
                from: Some("vm-a".into())
            })
        );
        // The old holder, back, finds the lease taken: standby.
        assert_eq!(try_lead(&store, "vm-a", 18_500), Ok(Leadership::Standby));
        assert_eq!(try_lead(&store, "vm-b", 21_000), Ok(Leadership::Renewed));
        // A racer that read the expired lease but wrote second stands by.
        store.inject_cas_conflicts(1);
        assert_eq!(try_lead(&store, "vm-c", 40_000), Ok(Leadership::Standby));
        // A restarted service takes the lease back whoever holds it.
        renew_as_service(&store, 41_000).unwrap();
        assert_eq!(try_lead(&store, "vm-c", 41_500), Ok(Leadership::Standby));
        // The empty key made at configure time is free to take.
        let fresh = MemoryStore::new();
        crate::limits::prepare_key(&fresh, LEASE_KEY).unwrap();
        assert_eq!(
            try_lead(&fresh, "vm-a", 1),
            Ok(Leadership::TookOver { from: None })
        );
    }

    #[test]
    fn first_tenant_wins() {
        let store = MemoryStore::new();
        assert_eq!(tenant_of(&store, "sesn_1"), None);
        remember_tenant(&store, "sesn_1", "acme");
        remember_tenant(&store, "sesn_1", "other");
        assert_eq!(tenant_of(&store, "sesn_1").as_deref(), Some("acme"));
    }
}
