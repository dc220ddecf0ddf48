//! Who is calling: turns the credential a client presents into a [`Principal`], or refuses.
//!
//! Gateway keys arrive as `x-api-key: <key>` or `Authorization: Bearer <key>` (the current
//! official Python SDK uses the latter). Config holds only SHA-256 hashes; the presented key is
//! hashed once and compared against every configured hash in constant time, without stopping
//! at the first match, so timing reveals neither which key matched nor how much of one did.

use crate::config::GatewayKey;
use crate::errors::{ApiError, ErrorKind};
use crate::jwt::Claims;
use crate::scopes::Scope;
use crate::sha256;

/// How a principal proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    GatewayKey,
    /// A JWT verified by Envoy's `jwt_authn` filter.
    Jwt,
}

/// An authenticated caller. Every principal belongs to exactly one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The configured name of the key (never the key).
    pub name: String,
    pub tenant: String,
    pub method: AuthMethod,
    /// The principal's own scopes, narrowing its tenant's; `None` = the tenant's.
    pub scopes: Option<Vec<Scope>>,
}

/// Longest credential we will hash: real keys are ~100 bytes; this bounds work per request.
const MAX_PRESENTED_KEY_BYTES: usize = 512;

/// The credential a client presented, from `x-api-key` first, then `Authorization: Bearer`.
pub fn presented_key<'h>(
    x_api_key: Option<&'h str>,
    authorization: Option<&'h str>,
) -> Option<&'h str> {
    if let Some(key) = x_api_key.map(str::trim).filter(|k| !k.is_empty()) {
        return Some(key);
    }
    let auth = authorization?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Authenticates a presented gateway key against the configured hashes at `now_secs`.
pub fn authenticate(
    keys: &[GatewayKey],
    presented: Option<&str>,
    now_secs: u64,
) -> Result<Principal, ApiError> {
    let Some(presented) = presented else {
        return Err(ApiError::new(
            ErrorKind::Authentication,
            "missing gateway key: send it as `x-api-key: <key>` or `Authorization: Bearer <key>`",
        ));
    };
    let invalid = || ApiError::new(ErrorKind::Authentication, "invalid gateway key");
    if presented.len() > MAX_PRESENTED_KEY_BYTES {
        return Err(invalid());
    }
    let digest = sha256::digest(presented.as_bytes());
    let mut found: Option<&GatewayKey> = None;
    for key in keys {
        // No early exit: every configured hash is compared whatever the outcome.
        if sha256::constant_time_eq(&key.sha256, &digest) && found.is_none() {
            found = Some(key);
        }
    }
    let key = found.ok_or_else(invalid)?;
    if key.expires_at.is_some_and(|at| now_secs >= at) {
        return Err(ApiError::new(
            ErrorKind::Authentication,
            "gateway key expired",
        ));
    }
    Ok(Principal {
        name: key.name.clone(),
        tenant: key.tenant.clone(),
        method: AuthMethod::GatewayKey,
        scopes: key.scopes.clone(),
    })
}

/// The principal of a JWT that Envoy's `jwt_authn` verified. Scopes in the token that are not
/// `family:action` (e.g. `openid`) are ignored; a token with a scope claim but no usable scope
/// may do nothing.
pub fn from_claims(claims: Result<Claims, String>) -> Result<Principal, ApiError> {
    let claims = claims.map_err(|why| {
        ApiError::new(
            ErrorKind::Authentication,
            format!("verified token not usable: {why}"),
        )
    })?;
    let scopes = claims.scopes.map(|list| {
        list.iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect::<Vec<_>>()
    });
    Ok(Principal {
        name: claims.subject,
        tenant: claims.tenant,
        method: AuthMethod::Jwt,
        scopes,
    })
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn keys() -> Vec<GatewayKey> {
        vec![
            GatewayKey {
                name: "alpha".into(),
                sha256: sha256::digest(b"key-alpha"),
                tenant: "team-a".into(),
                expires_at: None,
                scopes: None,
            },
            GatewayKey {
                name: "beta".into(),
                sha256: sha256::digest(b"key-beta"),
                tenant: "team-b".into(),
                expires_at: Some(2_000),
                scopes: Some(vec![Scope::ALL]),
            },
        ]
    }

    #[test]
    fn presented_key_sources() {
        assert_eq!(presented_key(Some("k1"), Some("Bearer k2")), Some("k1"));
        assert_eq!(presented_key(None, Some("Bearer k2")), Some("k2"));
        assert_eq!(presented_key(None, Some("bearer   k2 ")), Some("k2"));
        assert_eq!(presented_key(Some(""), Some("Bearer k2")), Some("k2"));
        assert_eq!(presented_key(None, Some("Basic dXNlcjpwYXNz")), None);
        assert_eq!(presented_key(None, Some("Bearer ")), None);
        assert_eq!(presented_key(None, Some("Bearer")), None);
        assert_eq!(presented_key(None, None), None);
    }

    #[test]
    fn known_keys_map_to_their_principal() {
        let p = authenticate(&keys(), Some("key-beta"), 1_999).unwrap();
        assert_eq!(
            p,
            Principal {
                name: "beta".into(),
                tenant: "team-b".into(),
                method: AuthMethod::GatewayKey,
                scopes: Some(vec![Scope::ALL]),
            }
        );
    }

    #[test]
    fn jwt_claims_become_a_principal() {
        let claims = Claims {
            subject: "user-1".into(),
            tenant: "acme".into(),
            scopes: Some(vec!["openid".into(), "sessions:read".into()]),
        };
        let p = from_claims(Ok(claims)).unwrap();
        assert_eq!(
            (p.name.as_str(), p.tenant.as_str(), p.method),
            ("user-1", "acme", AuthMethod::Jwt)
        );
        assert_eq!(p.scopes, Some(vec![Scope::parse("sessions:read").unwrap()]));
        let e = from_claims(Err("no tenant claim \"org\"".into())).unwrap_err();
        assert_eq!(
            (e.status(), e.message.as_str()),
            (401, "verified token not usable: no tenant claim \"org\"")
        );
    }

    #[test]
    fn expired_keys_are_401() {
        let e = authenticate(&keys(), Some("key-beta"), 2_000).unwrap_err();
        assert_eq!(
            (e.status(), e.message.as_str()),
            (401, "gateway key expired")
        );
        assert!(authenticate(&keys(), Some("key-alpha"), u64::MAX).is_ok());
    }

    #[test]
    fn missing_wrong_and_oversized_keys_are_401() {
        let missing = authenticate(&keys(), None, 0).unwrap_err();
        assert_eq!(missing.status(), 401);
        assert!(missing.message.starts_with("missing gateway key"));
        for bad in ["key-gamma", "key-alph", "key-alpha ", ""] {
            let e = authenticate(&keys(), Some(bad), 0).unwrap_err();
            assert_eq!(
                (e.status(), e.message.as_str()),
                (401, "invalid gateway key"),
                "{bad:?}"
            );
        }
        let huge = "k".repeat(MAX_PRESENTED_KEY_BYTES + 1);
        assert_eq!(
            authenticate(&keys(), Some(&huge), 0).unwrap_err().status(),
            401
        );
        assert_eq!(
            authenticate(&[], Some("key-alpha"), 0)
                .unwrap_err()
                .status(),
            401
        );
    }
}
