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
            fields.push(("reason", format!("{}: {}", error.reason, error.message)));
        }
    }
    fields
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
            out.push_str("sha256:");
            out.push_str(&sha256::to_hex(&sha256::digest(id.as_bytes()))[..16]);
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
