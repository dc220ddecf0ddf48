//! The request-phase decision, as one pure function: may this call go upstream, and how?
//!
//! `admit` runs the steps in a fixed order — authenticate, classify (default deny), check the
//! upstream credential, rewrite headers — and returns either everything the glue needs to
//! forward the call or the [`ApiError`] to answer with. Authentication comes first so that an
//! anonymous caller learns nothing about which paths exist.

use crate::config::{Origin, Plan};
use crate::credentials::{choose, KeyRing};
use crate::errors::{excerpt, ApiError, ErrorKind};
use crate::headers::{rewrite_request, HeaderEdit};
use crate::identity::{authenticate, from_claims, presented_key, Principal};
use crate::jwt::Claims;
use crate::routes::{classify, IdKind, Operation};
use crate::scopes::authorize;

/// What the glue read from the host for one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// `:path`, query string included.
    pub path: &'a str,
    /// Every request header (lowercase names, pseudo-headers included), in order.
    pub headers: &'a [(String, String)],
}

impl<'a> RequestHead<'a> {
    /// The first value of a header, by lowercase name.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        header_value(self.headers, name)
    }
}

/// The first value of header `name` (lowercase) in a header list.
pub fn header_value<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A call the gateway lets through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub operation: Operation,
    pub principal: Principal,
    /// Name of the upstream credential used (recorded as the session's affinity on create).
    pub credential: String,
    /// Header edits to apply, in order.
    pub edits: Vec<HeaderEdit>,
}

/// A call the gateway answers itself, with what was known of it when it was refused (for the
/// audit record: who tried what).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: ApiError,
    pub principal: Option<Principal>,
    pub operation: Option<Operation>,
}

/// Decides one request at `now_secs`; upstream keys and session affinities come from `keys`,
/// `jwt` is what the host found of a verified token (`None`: no token, or JWT not configured).
pub fn admit(
    plan: &Plan,
    head: &RequestHead<'_>,
    keys: &dyn KeyRing,
    jwt: Option<Result<Claims, String>>,
    now_secs: u64,
) -> Result<Admitted, Box<Refusal>> {
    // A JWT verified by Envoy's jwt_authn (read from dynamic metadata, never from a header a
    // client could send) wins; otherwise a gateway key is required.
    let principal = match jwt {
        Some(claims) => from_claims(claims),
        None => {
            let presented = presented_key(head.header("x-api-key"), head.header("authorization"));
            authenticate(&plan.gateway_keys, presented, now_secs)
        }
    }
    .map_err(|error| {
        Box::new(Refusal {
            error,
            principal: None,
            operation: None,
        })
    })?;
    let operation = match classify_call(plan, head) {
        Ok(operation) => operation,
        Err(error) => {
            return Err(Box::new(Refusal {
                error,
                principal: Some(principal),
                operation: None,
            }))
        }
    };
    match forward(plan, head, keys, &principal, &operation) {
        Ok((credential, edits)) => Ok(Admitted {
            operation,
            principal,
            credential,
            edits,
        }),
        Err(error) => Err(Box::new(Refusal {
            error,
            principal: Some(principal),
            operation: Some(operation),
        })),
    }
}

/// Default deny: the operation, or the 404 naming the call.
fn classify_call(plan: &Plan, head: &RequestHead<'_>) -> Result<Operation, ApiError> {
    classify(&plan.routes, head.method, head.path).ok_or_else(|| {
        let path = head.path.split_once('?').map_or(head.path, |(p, _)| p);
        ApiError::new(
            ErrorKind::NotFound,
            format!(
                "no Managed Agents endpoint matches {} {} on this gateway",
                excerpt(head.method, 16),
                excerpt(path, 200)
            ),
        )
    })
}

/// Scopes, the upstream credential and the header edits of an authenticated, routed call.
fn forward(
    plan: &Plan,
    head: &RequestHead<'_>,
    keys: &dyn KeyRing,
    principal: &Principal,
    operation: &Operation,
) -> Result<(String, Vec<HeaderEdit>), ApiError> {
    authorize(
        &plan.tenant_scopes(&principal.tenant),
        principal.scopes.as_deref(),
        operation,
    )?;
    let affinity = operation.id(IdKind::Session).and_then(|s| keys.affinity(s));
    let credential = choose(
        plan.tenant_credential(&principal.tenant),
        affinity.as_deref(),
    )
    .to_string();
    let key = keys.key(&credential).ok_or_else(|| {
        let hint = match plan.credentials.iter().find(|c| c.name == credential).map(|c| &c.origin) {
            Some(Origin::Env(var)) => format!("set {var} in Envoy's environment"),
            Some(Origin::Vault(vault)) => format!("its Vault secret {} has not been read yet", vault.path),
            None => "it is not configured".to_string(),
        };
        ApiError::new(
            ErrorKind::Unavailable,
            format!("the gateway has no upstream credential {credential:?} ({hint}); nothing was forwarded"),
        )
    })?;
    let edits = rewrite_request(plan, head.headers, &key, operation.family)?;
    Ok((credential, edits))
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::routes::{Action, Family};
    use crate::sha256;

    fn plan() -> Plan {
        let json = format!(
            r#"{{"api_version":"v1","gateway_keys":[{{"name":"dev","sha256":"{}","tenant":"acme"}}]}}"#,
            sha256::to_hex(&sha256::digest(b"gw-key"))
        );
        Plan::from_json(json.as_bytes()).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// One key for every credential name, no affinities.
    struct OneKey(Option<String>);

    impl KeyRing for OneKey {
        fn key(&self, _credential: &str) -> Option<String> {
            self.0.clone()
        }
        fn affinity(&self, _session_id: &str) -> Option<String> {
            None
        }
    }

    fn run(
        method: &str,
        path: &str,
        pairs: &[(&str, &str)],
        credential: Option<&str>,
    ) -> Result<Admitted, ApiError> {
        let headers = headers(pairs);
        admit(
            &plan(),
            &RequestHead {
                method,
                path,
                headers: &headers,
            },
            &OneKey(credential.map(str::to_string)),
            None,
            0,
        )
        .map_err(|refusal| refusal.error)
    }

    #[test]
    fn authenticated_known_call_is_admitted() {
        let admitted = run(
            "GET",
            "/v1/sessions/sesn_1/stream",
            &[("authorization", "Bearer gw-key")],
            Some("sk"),
        )
        .unwrap();
        assert_eq!(admitted.operation.family, Family::SessionEvents);
        assert_eq!(admitted.operation.action, Action::Stream);
        assert_eq!(admitted.principal.name, "dev");
        assert_eq!(admitted.principal.tenant, "acme");
        assert_eq!(
            admitted.edits.last(),
            Some(&HeaderEdit::Set("x-api-key".into(), "sk".into()))
        );
    }

    #[test]
    fn refusals_in_order() {
        let status = |r: Result<Admitted, ApiError>| r.map(|_| 200).unwrap_or_else(|e| e.status());
        // Anonymous: 401 even for a path that does not exist.
        assert_eq!(status(run("GET", "/v1/messages", &[], Some("sk"))), 401);
        assert_eq!(
            status(run(
                "GET",
                "/v1/agents",
                &[("x-api-key", "nope")],
                Some("sk")
            )),
            401
        );
        assert_eq!(
            status(run(
                "GET",
                "/v1/messages",
                &[("x-api-key", "gw-key")],
                Some("sk")
            )),
            404
        );
        assert_eq!(
            status(run("GET", "/v1/agents", &[("x-api-key", "gw-key")], None)),
            503
        );
        assert_eq!(
            status(run(
                "GET",
                "/v1/agents",
                &[("x-api-key", "gw-key"), ("anthropic-beta", "evil-1")],
                Some("sk")
            )),
            400
        );
        assert_eq!(
            status(run(
                "GET",
                "/v1/agents",
                &[("x-api-key", "gw-key")],
                Some("sk")
            )),
            200
        );
    }

    #[test]
    fn refusals_carry_what_was_known_for_the_audit() {
        let headers = headers(&[("x-api-key", "gw-key")]);
        let head = RequestHead {
            method: "GET",
            path: "/v1/messages",
            headers: &headers,
        };
        let refusal = admit(&plan(), &head, &OneKey(Some("sk".into())), None, 0).unwrap_err();
        assert_eq!(refusal.principal.map(|p| p.name), Some("dev".to_string()));
        assert_eq!(refusal.operation, None);
        let head = RequestHead {
            method: "GET",
            path: "/v1/agents",
            headers: &headers,
        };
        let refusal = admit(&plan(), &head, &OneKey(None), None, 0).unwrap_err();
        assert_eq!(refusal.operation.map(|o| o.family), Some(Family::Agents));
        let anonymous = RequestHead {
            method: "GET",
            path: "/v1/agents",
            headers: &[],
        };
        let refusal = admit(&plan(), &anonymous, &OneKey(None), None, 0).unwrap_err();
        assert_eq!((refusal.principal, refusal.error.status()), (None, 401));
    }

    #[test]
    fn not_found_message_names_the_call_without_the_query() {
        let err = run(
            "GET",
            "/v1/messages?key=secret",
            &[("x-api-key", "gw-key")],
            Some("sk"),
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(
            err.message,
            "no Managed Agents endpoint matches GET /v1/messages on this gateway"
        );
    }

    #[test]
    fn missing_credential_message_names_the_variable() {
        let err = run("GET", "/v1/agents", &[("x-api-key", "gw-key")], None).unwrap_err();
        assert_eq!(
            err.message,
            "the gateway has no upstream credential \"default\" (set ANTHROPIC_API_KEY in Envoy's environment); nothing was forwarded"
        );
    }
}
