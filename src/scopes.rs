//! Scopes: which operations a tenant or principal may perform.
//!
//! A scope is `family:action` over the names in [`crate::routes`]: `sessions:create`,
//! `vault_credentials:*`, `*:read`. The action `readonly` stands for `read`, `list` and
//! `stream` — never `poll` (claims a work item and its secret) nor `reveal` (answers a tunnel
//! token or a user-profile link), which must be granted by name. A principal's effective scopes are its tenant's scopes intersected with its own
//! (a key or token may narrow its tenant's rights, never widen them). A refusal names the
//! missing scope: `missing scope sessions:create`.

use std::fmt;

use crate::errors::{ApiError, ErrorKind};
use crate::routes::{Action, Family, Operation};

/// One parsed scope; `None` is a wildcard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope {
    family: Option<Family>,
    actions: ActionSet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActionSet {
    Any,
    ReadOnly,
    One(Action),
}

impl Scope {
    /// Parses `family:action`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Scope, String> {
        let (family, action) = text
            .split_once(':')
            .ok_or_else(|| format!("scope {text:?} is not family:action"))?;
        let family = match family {
            "*" => None,
            name => Some(
                Family::ALL
                    .into_iter()
                    .find(|f| f.as_str() == name)
                    .ok_or_else(|| format!("scope {text:?}: unknown family {name:?}"))?,
            ),
        };
        let actions = match action {
            "*" => ActionSet::Any,
            "readonly" => ActionSet::ReadOnly,
            name => ActionSet::One(
                Action::ALL
                    .into_iter()
                    .find(|a| a.as_str() == name)
                    .ok_or_else(|| format!("scope {text:?}: unknown action {name:?}"))?,
            ),
        };
        Ok(Scope { family, actions })
    }

    /// Every operation.
    pub const ALL: Scope = Scope {
        family: None,
        actions: ActionSet::Any,
    };

    fn allows(&self, family: Family, action: Action) -> bool {
        let family_ok = self.family.is_none_or(|f| f == family);
        let action_ok = match self.actions {
            ActionSet::Any => true,
            ActionSet::ReadOnly => matches!(action, Action::Read | Action::List | Action::Stream),
            ActionSet::One(a) => a == action,
        };
        family_ok && action_ok
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = self.family.map_or("*", Family::as_str);
        let action = match self.actions {
            ActionSet::Any => "*",
            ActionSet::ReadOnly => "readonly",
            ActionSet::One(a) => a.as_str(),
        };
        write!(f, "{family}:{action}")
    }
}

/// Whether any scope in `scopes` allows the operation.
pub fn allows(scopes: &[Scope], family: Family, action: Action) -> bool {
    scopes.iter().any(|s| s.allows(family, action))
}

/// Checks an operation against the tenant's scopes and, if the principal has its own, those
/// too. Refusal: 403 `permission_error` naming the missing scope.
pub fn authorize(
    tenant: &[Scope],
    principal: Option<&[Scope]>,
    op: &Operation,
) -> Result<(), ApiError> {
    let needed = format!("{}:{}", op.family.as_str(), op.action.as_str());
    if !allows(tenant, op.family, op.action) {
        return Err(ApiError::new(
            ErrorKind::Permission,
            format!("missing scope {needed}: your tenant is not allowed this operation"),
        ));
    }
    if let Some(own) = principal {
        if !allows(own, op.family, op.action) {
            return Err(ApiError::new(
                ErrorKind::Permission,
                format!("missing scope {needed}: your credential is not allowed this operation"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn scopes(list: &[&str]) -> Vec<Scope> {
        list.iter().map(|s| Scope::parse(s).unwrap()).collect()
    }

    fn op(family: Family, action: Action) -> Operation {
        Operation {
            family,
            action,
            ids: vec![],
        }
    }

    #[test]
    fn parse_and_display_round_trip() {
        for text in [
            "sessions:create",
            "*:read",
            "vaults:*",
            "*:*",
            "session_events:readonly",
        ] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Scope::parse("sessions").unwrap_err(),
            "scope \"sessions\" is not family:action"
        );
        assert_eq!(
            Scope::parse("mail:read").unwrap_err(),
            "scope \"mail:read\": unknown family \"mail\""
        );
        assert_eq!(
            Scope::parse("sessions:fly").unwrap_err(),
            "scope \"sessions:fly\": unknown action \"fly\""
        );
    }

    #[test]
    fn read_only_sessions_tenant() {
        let tenant = scopes(&[
            "sessions:readonly",
            "session_events:readonly",
            "agents:read",
        ]);
        assert!(authorize(&tenant, None, &op(Family::Sessions, Action::Read)).is_ok());
        assert!(authorize(&tenant, None, &op(Family::SessionEvents, Action::Stream)).is_ok());
        let err = authorize(&tenant, None, &op(Family::Sessions, Action::Create)).unwrap_err();
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.message,
            "missing scope sessions:create: your tenant is not allowed this operation"
        );
        let err = authorize(
            &tenant,
            None,
            &op(Family::SessionEvents, Action::SendEvents),
        )
        .unwrap_err();
        assert!(err
            .message
            .starts_with("missing scope session_events:send_events"));
    }

    #[test]
    fn principal_scopes_narrow_never_widen() {
        let tenant = scopes(&["*:*"]);
        let key = scopes(&["*:readonly"]);
        assert!(authorize(&tenant, Some(&key), &op(Family::Vaults, Action::List)).is_ok());
        let err = authorize(&tenant, Some(&key), &op(Family::Vaults, Action::Create)).unwrap_err();
        assert_eq!(
            err.message,
            "missing scope vaults:create: your credential is not allowed this operation"
        );
        let narrow_tenant = scopes(&["agents:read"]);
        let wide_key = scopes(&["*:*"]);
        assert!(authorize(
            &narrow_tenant,
            Some(&wide_key),
            &op(Family::Agents, Action::Create)
        )
        .is_err());
    }

    #[test]
    fn no_vault_writes_no_environment_creation() {
        let tenant = scopes(&[
            "*:readonly",
            "sessions:*",
            "session_events:*",
            "agents:*",
            "environments:read",
            "environments:list",
        ]);
        assert!(authorize(&tenant, None, &op(Family::Vaults, Action::Read)).is_ok());
        assert!(authorize(&tenant, None, &op(Family::VaultCredentials, Action::Create)).is_err());
        assert!(authorize(&tenant, None, &op(Family::Environments, Action::Create)).is_err());
        assert!(authorize(&tenant, None, &op(Family::Agents, Action::Archive)).is_ok());
    }

    #[test]
    fn new_families_and_secret_bearing_actions_need_their_own_scopes() {
        let c = |m: &str, p: &str| {
            let rules = crate::routes::RouteRules {
                neighbours: crate::routes::Neighbour::ALL.to_vec(),
                ..crate::routes::RouteRules::default()
            };
            crate::routes::classify(&rules, m, p).unwrap()
        };
        let readonly = scopes(&["*:readonly"]);
        let denied = |s: &[Scope], op: &Operation| authorize(s, None, op).unwrap_err().message;
        assert_eq!(
            denied(&readonly, &c("POST", "/v1/tunnels/tnl_1/reveal_token")),
            "missing scope tunnels:reveal: your tenant is not allowed this operation"
        );
        assert_eq!(
            denied(&readonly, &c("GET", "/v1/environments/env_1/work/poll")),
            "missing scope environment_work:poll: your tenant is not allowed this operation"
        );
        assert_eq!(
            denied(
                &readonly,
                &c("POST", "/v1/user_profiles/uprof_1/action_urls")
            ),
            "missing scope user_profiles:reveal: your tenant is not allowed this operation"
        );
        assert_eq!(
            denied(&readonly, &c("POST", "/v1/deployments/depl_1/run")),
            "missing scope deployments:run: your tenant is not allowed this operation"
        );
        assert_eq!(
            denied(
                &readonly,
                &c(
                    "POST",
                    "/v1/vaults/vlt_1/credentials/vcrd_1/mcp_oauth_validate"
                )
            ),
            "missing scope vault_credentials:validate: your tenant is not allowed this operation"
        );
        assert!(authorize(&readonly, None, &c("GET", "/v1/dreams/drm_1")).is_ok());
        let worker = scopes(&["environment_work:poll", "environment_work:update"]);
        assert!(authorize(&worker, None, &c("GET", "/v1/environments/env_1/work/poll")).is_ok());
        assert!(authorize(
            &worker,
            None,
            &c("POST", "/v1/environments/env_1/work/w1/heartbeat")
        )
        .is_ok());
        assert!(authorize(&worker, None, &c("GET", "/v1/environments/env_1")).is_err());
        for text in [
            "memories:create",
            "memory_versions:delete",
            "tunnel_certificates:*",
            "dreams:update",
        ] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
    }
}
