//! The audit record of every call: who did what to which resource, what the gateway decided
//! and why, and what it cost — never a secret (no keys, no credential bodies, no content).
//!
//! The record travels through Envoy's own access logging, so operators ship it like any other
//! log: the glue stores each field as filter state `ma_gateway_audit_<field>` as soon as it is
//! known (a refusal has its record before the local reply is sent), and the shipped
//! `envoy.yaml` writes one JSON line per request to the audit file, adding Envoy's own fields
//! (time, request id, status, flags such as `DC` for a client that left early, latency,
//! bytes). Fields this module does not know stay absent (`omit_empty_values`).

use serde_json::Value;

use crate::errors::ApiError;
use crate::identity::{AuthMethod, Principal};
use crate::routes::{Action, IdKind, Operation};
use crate::sha256;

/// Prefix of every filter-state key of the record.
pub const PROPERTY_PREFIX: &str = "ma_gateway_audit_";
/// The field holding [`path_field`] (filter state `ma_gateway_audit_path`).
pub const PATH_FIELD: &str = "path";

/// Event types listed per `POST …/events` at most (the rest are counted as `+N`).
const MAX_EVENT_TYPES: usize = 32;

/// Audit options from the plugin config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditRules {
    /// Replace resource ids by `sha256:<16 hex>` (stable, so records still join).
    pub redact_ids: bool,
}

/// Fields known once the request head is decided.
pub fn decision_fields(
    rules: &AuditRules,
    principal: Option<&Principal>,
    op: Option<&Operation>,
    refusal: Option<&ApiError>,
) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    if let Some(p) = principal {
        fields.push(("tenant", p.tenant.clone()));
        fields.push(("principal", p.name.clone()));
        let method = match p.method {
            AuthMethod::GatewayKey => "gateway_key",
            AuthMethod::Jwt => "jwt",
        };
        fields.push(("auth", method.to_string()));
    }
    match op {
        Some(op) => {
            fields.push((
                "operation",
                format!("{}.{}", op.family.as_str(), op.action.as_str()),
            ));
            fields.push(("mutating", is_mutating(op).to_string()));
            let ids = ids_field(rules, &op.ids);
            if !ids.is_empty() {
                fields.push(("ids", ids));
            }
        }
        None => fields.push(("operation", "unrouted".to_string())),
    }
    match refusal {
        None => fields.push(("decision", "allowed".to_string())),
        Some(error) => {
            fields.push(("decision", "refused".to_string()));
            let ids = op.map_or(&[][..], |op| op.ids.as_slice());
            fields.push(("reason", reason_field(rules, error, ids)));
        }
    }
    fields
}

/// `reason: message` of a refusal. With `redact_ids`, every id in it is redacted as in
/// [`ids_field`]: the `ids` of the call, and any word that starts with an id prefix
/// (`agent_…`, `sesn_…`, …) — a body reference or a query filter named in a 404 is not among
/// the path ids. Over-redacting a field name such as `file_id` is the safe side.
pub fn reason_field(rules: &AuditRules, error: &ApiError, ids: &[(IdKind, String)]) -> String {
    let reason = format!("{}: {}", error.reason, error.message);
    if rules.redact_ids {
        redact_text(&reason, ids)
    } else {
        reason
    }
}

/// `text` with every id (see [`reason_field`]) replaced by its redacted form.
pub fn redact_text(text: &str, ids: &[(IdKind, String)]) -> String {
    let is_id_byte = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(|c: char| !is_id_byte(c)).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        if !word.is_empty() {
            if looks_like_id(word, ids) {
                out.push_str(&redacted_id(word));
            } else {
                out.push_str(word);
            }
        }
        let mut chars = tail.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

fn looks_like_id(word: &str, ids: &[(IdKind, String)]) -> bool {
    ids.iter().any(|(_, id)| id == word)
        || IdKind::ALL.iter().any(|kind| {
            kind.prefix()
                .and_then(|p| word.strip_prefix(p))
                .is_some_and(|body| !body.is_empty())
        })
}

/// One id as the audit writes it with `redact_ids`: `sha256:<16 hex>`.
pub fn redacted_id(id: &str) -> String {
    format!(
        "sha256:{}",
        &sha256::to_hex(&sha256::digest(id.as_bytes()))[..16]
    )
}

/// The request path for Envoy's access logs (filter state `ma_gateway_audit_path`, which
/// the shipped configs print instead of `%REQ(:PATH)%`). Without `redact_ids` it is the path
/// as received. With it: the path's id segments are redacted as in [`ids_field`] (so lines
/// still join with the audit record), every query value (and a bare parameter) is redacted
/// the same way (cursors and filters alike; names are kept), and a path that is not a routed endpoint — whose ids the gateway
/// cannot tell from words — is written as `unrouted:sha256:<16 hex>` of the whole path.
pub fn path_field(rules: &AuditRules, path: &str, op: Option<&Operation>) -> String {
    if !rules.redact_ids {
        return path.to_string();
    }
    let Some(op) = op else {
        return format!("unrouted:{}", redacted_id(path));
    };
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut out = path_only
        .split('/')
        .map(|segment| {
            if op.ids.iter().any(|(_, id)| id == segment) {
                redacted_id(segment)
            } else {
                segment.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) if !value.is_empty() => {
                    format!("{key}={}", redacted_id(value))
                }
                Some(_) => pair.to_string(),
                None if pair.is_empty() => String::new(),
                None => redacted_id(pair),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Whether the call changes state upstream (everything but reads, lists and streams).
pub fn is_mutating(op: &Operation) -> bool {
    !matches!(op.action, Action::Read | Action::List | Action::Stream)
}

/// `session=sesn_1 vault=vlt_2`, ids redacted when configured.
pub fn ids_field(rules: &AuditRules, ids: &[(IdKind, String)]) -> String {
    let mut out = String::new();
    for (kind, id) in ids {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(kind_name(*kind));
        out.push('=');
        if rules.redact_ids {
            out.push_str(&redacted_id(id));
        } else {
            out.push_str(id);
        }
    }
    out
}

fn kind_name(kind: IdKind) -> &'static str {
    match kind {
        IdKind::Agent => "agent",
        IdKind::Session => "session",
        IdKind::Thread => "thread",
        IdKind::SessionResource => "resource",
        IdKind::Environment => "environment",
        IdKind::Work => "work",
        IdKind::Vault => "vault",
        IdKind::Credential => "credential",
        IdKind::File => "file",
        IdKind::Skill => "skill",
        IdKind::SkillVersion => "skill_version",
        IdKind::MemoryStore => "memory_store",
        IdKind::Memory => "memory",
        IdKind::Deployment => "deployment",
        IdKind::DeploymentRun => "deployment_run",
        IdKind::MemoryVersion => "memory_version",
        IdKind::Dream => "dream",
        IdKind::Tunnel => "tunnel",
        IdKind::TunnelCertificate => "tunnel_certificate",
        IdKind::UserProfile => "user_profile",
    }
}

/// The types of the events a `POST …/events` body sends — `user.message,user.interrupt` —
/// never their content. Unparseable bodies give `unparsed`.
pub fn event_types(body: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return "unparsed".to_string();
    };
    let Some(events) = value.get("events").and_then(Value::as_array) else {
        return "unparsed".to_string();
    };
    let mut types: Vec<&str> = events
        .iter()
        .map(|e| match e.get("type").and_then(Value::as_str) {
            Some(t) if is_event_type(t) => t,
            _ => "invalid",
        })
        .collect();
    let extra = types.len().saturating_sub(MAX_EVENT_TYPES);
    types.truncate(MAX_EVENT_TYPES);
    let mut out = types.join(",");
    if extra > 0 {
        out.push_str(&format!(",+{extra}"));
    }
    out
}

/// `user.message`-like names only, so a crafted type cannot smuggle content into the log.
fn is_event_type(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::errors::ErrorKind;
    use crate::routes::Family;

    fn principal() -> Principal {
        Principal {
            name: "alice".into(),
            tenant: "acme".into(),
            method: AuthMethod::GatewayKey,
            scopes: None,
        }
    }

    fn op(action: Action) -> Operation {
        Operation {
            family: Family::VaultCredentials,
            action,
            ids: vec![
                (IdKind::Vault, "vlt_1".into()),
                (IdKind::Credential, "vcrd_2".into()),
            ],
        }
    }

    #[test]
    fn redacted_reasons_and_paths_carry_no_raw_id() {
        let rules = AuditRules { redact_ids: true };
        let h = |id: &str| redacted_id(id);
        let ids = vec![
            (IdKind::Session, "sesn_1".to_string()),
            (IdKind::SessionResource, "res9".to_string()),
        ];
        let error = ApiError::new(ErrorKind::NotFound, "agent agent_01Xy not found; see res9")
            .because("ownership");
        assert_eq!(
            reason_field(&rules, &error, &ids),
            format!(
                "ownership: agent {} not found; see {}",
                h("agent_01Xy"),
                h("res9")
            )
        );
        assert_eq!(
            reason_field(&AuditRules::default(), &error, &ids),
            "ownership: agent agent_01Xy not found; see res9"
        );
        // Words that merely share a prefix's letters are kept; a bare prefix is not an id.
        assert_eq!(
            redact_text("sessions agents:create env_ vlt_a-b…", &[]),
            format!("sessions agents:create env_ {}…", h("vlt_a-b"))
        );
        let op = Operation {
            family: Family::SessionResources,
            action: Action::Read,
            ids: ids.clone(),
        };
        assert_eq!(
            path_field(
                &rules,
                "/v1/sessions/sesn_1/resources/res9?limit=1&agent_id=agent_2&x",
                Some(&op)
            ),
            format!(
                "/v1/sessions/{}/resources/{}?limit={}&agent_id={}&{}",
                h("sesn_1"),
                h("res9"),
                h("1"),
                h("agent_2"),
                h("x")
            )
        );
        assert_eq!(
            path_field(&rules, "/v1/sessions/sesn_1", Some(&op)),
            format!("/v1/sessions/{}", h("sesn_1"))
        );
        assert_eq!(
            path_field(&rules, "/v1/nope/agent_1?a=b", None),
            format!("unrouted:{}", h("/v1/nope/agent_1?a=b"))
        );
        assert_eq!(
            path_field(&AuditRules::default(), "/v1/nope/agent_1?a=b", None),
            "/v1/nope/agent_1?a=b"
        );
        assert_eq!(h("sesn_1").len(), "sha256:".len() + 16);
    }

    #[test]
    fn allowed_call() {
        let fields = decision_fields(
            &AuditRules::default(),
            Some(&principal()),
            Some(&op(Action::Create)),
            None,
        );
        assert_eq!(
            fields,
            vec![
                ("tenant", "acme".to_string()),
                ("principal", "alice".to_string()),
                ("auth", "gateway_key".to_string()),
                ("operation", "vault_credentials.create".to_string()),
                ("mutating", "true".to_string()),
                ("ids", "vault=vlt_1 credential=vcrd_2".to_string()),
                ("decision", "allowed".to_string()),
            ]
        );
    }

    #[test]
    fn refusal_before_authentication_names_the_rule() {
        let error = ApiError::new(ErrorKind::Authentication, "invalid gateway key");
        let fields = decision_fields(&AuditRules::default(), None, None, Some(&error));
        assert_eq!(
            fields,
            vec![
                ("operation", "unrouted".to_string()),
                ("decision", "refused".to_string()),
                ("reason", "authentication: invalid gateway key".to_string()),
            ]
        );
        let ownership =
            ApiError::new(ErrorKind::NotFound, "agent agent_x not found").because("ownership");
        let fields = decision_fields(
            &AuditRules::default(),
            Some(&principal()),
            Some(&op(Action::Read)),
            Some(&ownership),
        );
        assert!(fields.contains(&("reason", "ownership: agent agent_x not found".to_string())));
        assert!(fields.contains(&("mutating", "false".to_string())));
    }

    #[test]
    fn ids_can_be_redacted_stably() {
        let rules = AuditRules { redact_ids: true };
        let ids = vec![(IdKind::Session, "sesn_1".to_string())];
        let redacted = ids_field(&rules, &ids);
        assert_eq!(
            redacted,
            format!(
                "session=sha256:{}",
                &sha256::to_hex(&sha256::digest(b"sesn_1"))[..16]
            )
        );
        assert_eq!(redacted, ids_field(&rules, &ids));
        assert!(!redacted.contains("sesn_1"));
    }

    #[test]
    fn event_types_never_carry_content() {
        let body = br#"{"events":[{"type":"user.message","content":[{"type":"text","text":"secret plan"}]},
                                  {"type":"user.tool_confirmation","tool_use_id":"x","result":"allow"},
                                  {"type":"Ignore previous; <script>"},{"content":"no type"}]}"#;
        assert_eq!(
            event_types(body),
            "user.message,user.tool_confirmation,invalid,invalid"
        );
        assert_eq!(event_types(b"not json"), "unparsed");
        let many: Vec<String> = (0..40)
            .map(|_| r#"{"type":"user.interrupt"}"#.to_string())
            .collect();
        let body = format!(r#"{{"events":[{}]}}"#, many.join(","));
        assert!(event_types(body.as_bytes()).ends_with("user.interrupt,+8"));
    }
}
