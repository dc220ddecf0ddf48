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
use crate::store::{self, Store};

/// The root id that makes a root context the reconciler instead of the HTTP filter.
pub const RECONCILER_ROOT_ID: &str = "ma_gateway_reconciler";

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
    fn first_tenant_wins() {
        let store = MemoryStore::new();
        assert_eq!(tenant_of(&store, "sesn_1"), None);
        remember_tenant(&store, "sesn_1", "acme");
        remember_tenant(&store, "sesn_1", "other");
        assert_eq!(tenant_of(&store, "sesn_1").as_deref(), Some("acme"));
    }
}
