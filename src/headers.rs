//! Request header rewriting: what the gateway removes, sets and refuses before forwarding.
//!
//! Input is the client's header list; output is an ordered list of [`HeaderEdit`]s (all removals,
//! then all sets) that the glue applies verbatim. Client credentials and hop-by-hop headers are
//! removed; `anthropic-version` is set only when absent (a client's own is never downgraded);
//! `anthropic-beta` is merged into one comma-separated value that always contains the required
//! betas (except on the GA families — Files, Skills, User Profiles — where the SDKs send none
//! and the gateway adds none), and any beta outside the allowlist is refused; `accept-encoding` becomes `identity`
//! (the gateway reads response bodies: [`crate::content_coding`]); `:authority` and the
//! upstream key are set last, so nothing the client sent can override them.

use crate::config::Plan;
use crate::content_coding::UPSTREAM_ACCEPT_ENCODING;
use crate::errors::{excerpt, ApiError, ErrorKind};
use crate::routes::Family;

/// Headers that carry a client's credentials: never forwarded.
pub const CREDENTIAL_HEADERS: [&str; 4] = [
    "x-api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
];

/// Connection-scoped headers (RFC 9110 §7.6.1) that must not cross the proxy.
pub const HOP_BY_HOP_HEADERS: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Headers the gateway owns on the upstream request; a client may not name them in
/// `Connection` to have them dropped, and the gateway always sets them itself.
const GATEWAY_OWNED: [&str; 4] = [
    ":authority",
    "x-api-key",
    "anthropic-beta",
    "accept-encoding",
];

/// Most betas one call may carry; bounds parsing work and the forwarded header.
const MAX_BETAS: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    Remove(String),
    Set(String, String),
}

/// Computes the edits for one request. `credential` is the upstream key read from shared data;
/// `family` is the classified call's (GA families get no required beta).
pub fn rewrite_request(
    plan: &Plan,
    headers: &[(String, String)],
    credential: &str,
    family: Family,
) -> Result<Vec<HeaderEdit>, ApiError> {
    let mut removals: Vec<String> = Vec::new();
    let mut remove = |name: &str| {
        if !removals.iter().any(|r| r == name) {
            removals.push(name.to_string());
        }
    };
    let mut betas: Vec<&str> = Vec::new();
    let mut has_version = false;
    for (name, value) in headers {
        let name = name.as_str();
        if CREDENTIAL_HEADERS.contains(&name) || HOP_BY_HOP_HEADERS.contains(&name) {
            remove(name);
        }
        match name {
            "connection" => {
                for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    let token = token.to_ascii_lowercase();
                    if !token.starts_with(':') && !GATEWAY_OWNED.contains(&token.as_str()) {
                        remove(&token);
                    }
                }
            }
            "anthropic-version" => has_version |= !value.trim().is_empty(),
            "anthropic-beta" => {
                for beta in value.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                    if !betas.contains(&beta) {
                        betas.push(beta);
                    }
                }
            }
            _ => {}
        }
    }

    let merged = merge_betas(plan, &betas, !family.is_ga())?;
    let mut edits: Vec<HeaderEdit> = removals.into_iter().map(HeaderEdit::Remove).collect();
    // Replace every client copy of the beta header by the single merged value (none at all
    // on a GA call that named none: an empty header is not "no beta").
    edits.push(HeaderEdit::Remove("anthropic-beta".into()));
    if !merged.is_empty() {
        edits.push(HeaderEdit::Set("anthropic-beta".into(), merged));
    }
    // Every client copy of the offer (the SDKs send `gzip, deflate` or more) is replaced: the
    // upstream compresses whatever is offered, and the gateway must read what it answers.
    edits.push(HeaderEdit::Remove("accept-encoding".into()));
    edits.push(HeaderEdit::Set(
        "accept-encoding".into(),
        UPSTREAM_ACCEPT_ENCODING.into(),
    ));
    if !has_version {
        edits.push(HeaderEdit::Set(
            "anthropic-version".into(),
            plan.upstream.anthropic_version.clone(),
        ));
    }
    edits.push(HeaderEdit::Set(
        ":authority".into(),
        plan.upstream.authority.clone(),
    ));
    edits.push(HeaderEdit::Set("x-api-key".into(), credential.to_string()));
    Ok(edits)
}

/// Client betas first (their order kept), then any required beta they lacked (when
/// `add_required`; GA calls get only what the client named, still checked against the list).
fn merge_betas(plan: &Plan, client: &[&str], add_required: bool) -> Result<String, ApiError> {
    if client.len() > MAX_BETAS {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "too many anthropic-beta values ({}); at most {MAX_BETAS}",
                client.len()
            ),
        ));
    }
    let allowed = &plan.betas.allowed;
    if let Some(refused) = client.iter().find(|b| !allowed.iter().any(|a| a == *b)) {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "anthropic-beta {:?} is not allowed by this gateway; allowed: {}",
                excerpt(refused, 64),
                allowed.join(", ")
            ),
        ));
    }
    let mut merged: Vec<&str> = client.to_vec();
    let required = if add_required {
        plan.betas.required.as_slice()
    } else {
        &[]
    };
    for required in required {
        if !merged.contains(&required.as_str()) {
            merged.push(required);
        }
    }
    Ok(merged.join(","))
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::config::MANAGED_AGENTS_BETA;

    fn plan() -> Plan {
        Plan::from_json(br#"{"api_version":"v1","upstream":{"authority":"api.example.test"}}"#)
            .unwrap()
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn set_value<'e>(edits: &'e [HeaderEdit], name: &str) -> Option<&'e str> {
        edits.iter().rev().find_map(|e| match e {
            HeaderEdit::Set(n, v) if n == name => Some(v.as_str()),
            _ => None,
        })
    }

    fn removed(edits: &[HeaderEdit]) -> Vec<&str> {
        edits
            .iter()
            .filter_map(|e| match e {
                HeaderEdit::Remove(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn plain_sdk_request_is_rewritten() {
        let edits = rewrite_request(
            &plan(),
            &h(&[
                (":method", "GET"),
                (":authority", "gateway.local"),
                ("authorization", "Bearer gw-key"),
                ("anthropic-version", "2026-10-21"),
                ("anthropic-beta", MANAGED_AGENTS_BETA),
            ]),
            "sk-upstream",
            Family::Sessions,
        )
        .unwrap();
        assert_eq!(
            edits,
            vec![
                HeaderEdit::Remove("authorization".into()),
                HeaderEdit::Remove("anthropic-beta".into()),
                HeaderEdit::Set("anthropic-beta".into(), MANAGED_AGENTS_BETA.into()),
                HeaderEdit::Remove("accept-encoding".into()),
                HeaderEdit::Set("accept-encoding".into(), "identity".into()),
                HeaderEdit::Set(":authority".into(), "api.example.test".into()),
                HeaderEdit::Set("x-api-key".into(), "sk-upstream".into()),
            ]
        );
    }

    #[test]
    fn every_compression_offer_becomes_identity() {
        // The official SDKs' defaults, a browser's, a list with q-values, repeated headers,
        // and a client trying to drop the gateway's own value through `Connection`.
        for offers in [
            vec![("accept-encoding", "gzip, deflate")],
            vec![("accept-encoding", "gzip, deflate, br, zstd")],
            vec![("accept-encoding", "br;q=1.0, gzip;q=0.8, *;q=0.1")],
            vec![("accept-encoding", "gzip"), ("accept-encoding", "br")],
            vec![("accept-encoding", "identity")],
            vec![
                ("connection", "accept-encoding"),
                ("accept-encoding", "gzip"),
            ],
            vec![],
        ] {
            let edits = rewrite_request(&plan(), &h(&offers), "sk", Family::Sessions).unwrap();
            let set: Vec<_> = edits
                .iter()
                .filter(|e| matches!(e, HeaderEdit::Set(n, _) if n == "accept-encoding"))
                .collect();
            assert_eq!(
                set,
                vec![&HeaderEdit::Set(
                    "accept-encoding".into(),
                    "identity".into()
                )],
                "{offers:?}"
            );
            let removed_at = edits
                .iter()
                .position(|e| *e == HeaderEdit::Remove("accept-encoding".into()))
                .unwrap();
            let set_at = edits
                .iter()
                .position(|e| matches!(e, HeaderEdit::Set(n, _) if n == "accept-encoding"))
                .unwrap();
            assert!(removed_at < set_at, "{offers:?}");
        }
    }

    #[test]
    fn version_is_only_set_when_absent() {
        let edits =
            rewrite_request(&plan(), &h(&[("x-api-key", "gw")]), "sk", Family::Sessions).unwrap();
        assert_eq!(set_value(&edits, "anthropic-version"), Some("2023-06-01"));
        let edits = rewrite_request(
            &plan(),
            &h(&[("anthropic-version", "2026-10-21")]),
            "sk",
            Family::Sessions,
        )
        .unwrap();
        assert_eq!(set_value(&edits, "anthropic-version"), None);
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_are_removed() {
        let edits = rewrite_request(
            &plan(),
            &h(&[
                ("x-api-key", "gw"),
                ("authorization", "Bearer x"),
                ("proxy-authorization", "Basic y"),
                ("cookie", "session=z"),
                (
                    "connection",
                    "keep-alive, X-Secret-Hop, x-api-key, :authority",
                ),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "h2c"),
                ("x-secret-hop", "1"),
                ("x-unrelated", "kept"),
            ]),
            "sk",
            Family::Sessions,
        )
        .unwrap();
        assert_eq!(
            removed(&edits),
            vec![
                "x-api-key",
                "authorization",
                "proxy-authorization",
                "cookie",
                "connection",
                "keep-alive",
                "x-secret-hop",
                "te",
                "upgrade",
                "anthropic-beta",
                "accept-encoding"
            ]
        );
        // The gateway's own key is set after every removal, so it is the one that is forwarded.
        assert_eq!(
            edits.last(),
            Some(&HeaderEdit::Set("x-api-key".into(), "sk".into()))
        );
    }

    #[test]
    fn betas_merge_into_one_value_with_the_required_one() {
        let edits = rewrite_request(
            &plan(),
            &h(&[
                ("anthropic-beta", "files-api-2025-04-14 , skills-2025-10-02"),
                ("anthropic-beta", "files-api-2025-04-14"),
            ]),
            "sk",
            Family::Sessions,
        )
        .unwrap();
        assert_eq!(
            set_value(&edits, "anthropic-beta"),
            Some("files-api-2025-04-14,skills-2025-10-02,managed-agents-2026-04-01")
        );
        let edits = rewrite_request(&plan(), &h(&[]), "sk", Family::Sessions).unwrap();
        assert_eq!(
            set_value(&edits, "anthropic-beta"),
            Some(MANAGED_AGENTS_BETA)
        );
    }

    #[test]
    fn betas_outside_the_allowlist_are_refused() {
        let err = rewrite_request(
            &plan(),
            &h(&[(
                "anthropic-beta",
                "managed-agents-2026-04-01,computer-use-2025-01-24",
            )]),
            "sk",
            Family::Sessions,
        )
        .unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(
            err.message,
            "anthropic-beta \"computer-use-2025-01-24\" is not allowed by this gateway; allowed: managed-agents-2026-04-01, files-api-2025-04-14, skills-2025-10-02, agent-memory-2026-07-22, dreaming-2026-04-21, mcp-tunnels-2026-06-22, user-profiles-2026-08-18, user-profiles-2026-09-04, google-managed-data-controls-2026-09-01"
        );
        let many: Vec<String> = (0..=MAX_BETAS)
            .map(|i| format!("files-api-2025-04-14-{i}"))
            .collect();
        let err = rewrite_request(
            &plan(),
            &h(&[("anthropic-beta", &many.join(","))]),
            "sk",
            Family::Sessions,
        )
        .unwrap_err();
        assert!(err
            .message
            .starts_with("too many anthropic-beta values (33)"));
    }

    #[test]
    fn ga_calls_get_no_required_beta_but_keep_the_allowlist() {
        for family in [Family::Files, Family::Skills, Family::UserProfiles] {
            let edits = rewrite_request(&plan(), &h(&[]), "sk", family).unwrap();
            assert_eq!(set_value(&edits, "anthropic-beta"), None, "{family:?}");
            assert!(removed(&edits).contains(&"anthropic-beta"));
            let edits = rewrite_request(
                &plan(),
                &h(&[("anthropic-beta", "files-api-2025-04-14")]),
                "sk",
                family,
            )
            .unwrap();
            assert_eq!(
                set_value(&edits, "anthropic-beta"),
                Some("files-api-2025-04-14")
            );
            let err = rewrite_request(&plan(), &h(&[("anthropic-beta", "nope-1")]), "sk", family)
                .unwrap_err();
            assert_eq!(err.status(), 400);
        }
        let edits = rewrite_request(&plan(), &h(&[]), "sk", Family::Dreams).unwrap();
        assert_eq!(
            set_value(&edits, "anthropic-beta"),
            Some(MANAGED_AGENTS_BETA)
        );
    }
}
