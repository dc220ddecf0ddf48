//! Plugin configuration: JSON (as Istio `pluginConfig` and Envoy Gateway send it) → a validated,
//! compiled, immutable [`Plan`].
//!
//! Parsing is strict and every error names the field path, e.g.
//! `config error at gateway_keys[1].sha256: expected 64 hex digits`. Unknown fields are errors
//! (a typo must not silently disable a control). The root context keeps the last good plan
//! only when a new one compiles completely; `on_configure` returns false otherwise.

use std::fmt;

use crate::errors::json_type_name as type_name;
use serde_json::{Map, Value};

use crate::accounting::Limits;
use crate::audit::AuditRules;
use crate::credentials::DEFAULT_CREDENTIAL;
use crate::jwt::{rules_from_json, JwtRules};
use crate::limits::LimitRules;
use crate::policy::PolicyRules;
use crate::pricing::PriceTable;
use crate::routes::{Neighbour, RouteRules};
use crate::scopes::Scope;
use crate::sha256;
use crate::sse::ScannerConfig;
use crate::tenancy::{valid_tag_key, Ownership, Untagged, DEFAULT_TAG_KEY};
use crate::time::parse_rfc3339_utc;

/// The only config version this build understands.
pub const API_VERSION: &str = "v1";
/// The beta every Managed Agents call must carry.
pub const MANAGED_AGENTS_BETA: &str = "managed-agents-2026-04-01";

/// A config problem and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path with indices, e.g. `upstream.authority` or `gateway_keys[0].name`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "config error: {}", self.message)
        } else {
            write!(f, "config error at {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The compiled configuration every stream reads; built once per `on_configure`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub upstream: Upstream,
    pub betas: Betas,
    pub routes: RouteRules,
    pub gateway_keys: Vec<GatewayKey>,
    /// Declared tenants. Empty: every tenant may do everything (single-team deployments).
    pub tenants: Vec<Tenant>,
    /// Named upstream credentials; always contains `default`.
    pub credentials: Vec<CredentialSource>,
    pub isolation: Isolation,
    /// Identity from JWTs verified by Envoy's `jwt_authn` filter, when configured.
    pub jwt: Option<JwtRules>,
    pub audit: AuditRules,
    /// Request rates, concurrent streams and token/cost budgets (per Envoy process).
    pub limits: LimitRules,
    /// What agents, sessions, environments and vaults may be.
    pub policy: PolicyRules,
    pub metering: Metering,
}

impl Plan {
    /// The scopes of a tenant: its declared ones, all when no tenants are declared, none
    /// when tenants are declared but this one is not (a JWT naming an unknown tenant).
    pub fn tenant_scopes(&self, tenant: &str) -> Vec<Scope> {
        if self.tenants.is_empty() {
            return vec![Scope::ALL];
        }
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .map(|t| t.scopes.clone())
            .unwrap_or_default()
    }

    /// The credential a tenant's calls use.
    pub fn tenant_credential(&self, tenant: &str) -> &str {
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .map_or(DEFAULT_CREDENTIAL, |t| t.credential.as_str())
    }
}

/// How usage is metered and priced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metering {
    /// Cap on one usage event's data in a stream (bigger ones are counted as oversize).
    pub scanner: ScannerConfig,
    /// Bounds of the per-session accounting state in shared data.
    pub limits: Limits,
    pub prices: PriceTable,
    /// How often the reconciler polls known sessions; 0 disables it.
    pub reconcile_interval_secs: u64,
    /// Sessions polled per reconciler tick.
    pub reconcile_batch: usize,
}

impl Default for Metering {
    fn default() -> Self {
        Metering {
            scanner: ScannerConfig {
                max_event_bytes: 256 * 1024,
            },
            limits: Limits::default(),
            prices: PriceTable::defaults(),
            reconcile_interval_secs: 30,
            reconcile_batch: 16,
        }
    }
}

/// Where calls go and how they are credentialed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// `:authority` sent upstream, e.g. `api.anthropic.com`.
    pub authority: String,
    /// Environment variable (exposed through `vm_config.environment_variables.host_env_keys`)
    /// that seeds the upstream key into shared data. Never the key itself.
    pub credential_env: String,
    /// `anthropic-version` set when the client sent none (a client's own is never changed).
    pub anthropic_version: String,
    /// Envoy cluster for the gateway's own calls (session lookups by the reconciler and for
    /// unknown models); must reach the same upstream as the route.
    pub cluster: String,
}

/// The `anthropic-beta` rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Betas {
    /// Always present on forwarded calls (merged with the client's).
    pub required: Vec<String>,
    /// What clients may send; anything else is refused with 400. Always includes `required`.
    pub allowed: Vec<String>,
}

/// One gateway API key: only its SHA-256 is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub tenant: String,
    /// Unix seconds after which the key is refused; `None` never expires.
    pub expires_at: Option<u64>,
    /// Narrows the tenant's scopes for this key; `None` = the tenant's scopes.
    pub scopes: Option<Vec<Scope>>,
}

/// A tenant: the unit of isolation, scopes and upstream credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub scopes: Vec<Scope>,
    /// Name of the upstream credential its calls use (e.g. its own workspace key).
    pub credential: String,
}

/// Tenant isolation on a shared upstream key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    /// On by default as soon as tenants are declared.
    pub enabled: bool,
    /// The `metadata` key that records the owning tenant upstream.
    pub tag_key: String,
    /// What to do with resources that carry no tag (created outside the gateway).
    pub untagged: Untagged,
    /// Largest request body inspected (create/update calls); bigger ones are refused with 413.
    pub max_body_bytes: usize,
    /// Hold the request head while an inspected body arrives, so a refusal sends nothing
    /// upstream. Needs `allow_on_headers_stop_iteration: true` on the Wasm filter (Envoy ≥
    /// 1.35): without it Envoy holds the body with the head and such calls wait until a timeout.
    /// `false` for hosts that cannot set it: the head may then reach upstream before a body
    /// refusal resets the request.
    pub hold_request_head: bool,
}

impl Isolation {
    pub fn ownership(&self) -> Ownership<'_> {
        Ownership {
            tag_key: &self.tag_key,
            untagged: self.untagged,
        }
    }
}

/// Where a named upstream credential comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialSource {
    pub name: String,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// An environment variable of the Envoy process, exposed to the VM with
    /// `vm_config.environment_variables.host_env_keys`, read at VM start.
    Env(String),
    /// A HashiCorp Vault KV v2 secret, polled by the background service.
    Vault(VaultSource),
}

/// `GET <path>` on `cluster` with `X-Vault-Token: $<token_env>`, key at `data.data.<field>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultSource {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub field: String,
    pub token_env: String,
    pub refresh_secs: u64,
}

/// The tenant a key belongs to when its config names none.
pub const DEFAULT_TENANT: &str = "default";

impl Plan {
    /// Parses, validates and compiles plugin configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, ConfigError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError {
            path: String::new(),
            message: format!("not valid JSON: {e}"),
        })?;
        let mut root = Obj::new(value, String::new())?;
        let version = root.req_str("api_version")?;
        if version != API_VERSION {
            return Err(root.error_at(
                "api_version",
                format!(
                    "unsupported version {version:?}; this build understands \"{API_VERSION}\""
                ),
            ));
        }
        let upstream = parse_upstream(root.opt_obj("upstream")?)?;
        let betas = parse_betas(root.opt_obj("betas")?)?;
        let routes = parse_routes(root.opt_obj("routes")?)?;
        let credentials = parse_credentials(&mut root, &upstream)?;
        let tenants = parse_tenants(&mut root, &credentials)?;
        let isolation = parse_isolation(root.opt_obj("isolation")?, !tenants.is_empty())?;
        if isolation.enabled {
            if let Some((i, n)) = routes.unisolated_neighbour() {
                return Err(ConfigError {
                    path: format!("routes.neighbours[{i}]"),
                    message: format!(
                        "{:?} is not isolated between tenants: the gateway records no owner for \
                         its objects, so every tenant could read, list, delete and attach every \
                         other tenant's; list it in routes.shared_neighbours to share it on \
                         purpose, or remove it",
                        n.as_str()
                    ),
                });
            }
        }
        let audit = match root.opt_obj("audit")? {
            None => AuditRules::default(),
            Some(mut obj) => {
                let redact_ids = obj.opt_bool("redact_ids")?.unwrap_or(false);
                obj.finish()?;
                AuditRules { redact_ids }
            }
        };
        let jwt = match root.take("jwt") {
            None => None,
            Some(value) => Some(rules_from_json(&value, "jwt").map_err(|m| located("jwt", m))?),
        };
        let limits = match root.take("limits") {
            None => LimitRules::default(),
            Some(value) => crate::limits::rules_from_json(&value, "limits")
                .map_err(|m| located("limits", m))?,
        };
        let policy = match root.take("policy") {
            None => PolicyRules::default(),
            Some(value) => crate::policy::rules_from_json(&value, "policy")
                .map_err(|m| located("policy", m))?,
        };
        let gateway_keys = parse_gateway_keys(&mut root, &tenants)?;
        let metering = parse_metering(root.opt_obj("metering")?)?;
        root.finish()?;
        require_declared_tenants(&tenants, &gateway_keys, jwt.is_some())?;
        Ok(Plan {
            upstream,
            betas,
            routes,
            gateway_keys,
            tenants,
            credentials,
            isolation,
            jwt,
            audit,
            limits,
            policy,
            metering,
        })
    }
}

fn parse_upstream(obj: Option<Obj>) -> Result<Upstream, ConfigError> {
    let mut upstream = Upstream {
        authority: "api.anthropic.com".into(),
        credential_env: "ANTHROPIC_API_KEY".into(),
        anthropic_version: "2023-06-01".into(),
        cluster: "anthropic".into(),
    };
    let Some(mut obj) = obj else {
        return Ok(upstream);
    };
    if let Some(authority) = obj.opt_str("authority")? {
        let valid = !authority.is_empty()
            && authority.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        if !valid {
            return Err(obj.error_at("authority", "expected a host name, optionally with :port"));
        }
        upstream.authority = authority;
    }
    if let Some(name) = obj.opt_str("credential_env")? {
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(obj.error_at(
                "credential_env",
                "expected an environment variable name ([A-Za-z0-9_]+), not a key",
            ));
        }
        upstream.credential_env = name;
    }
    if let Some(cluster) = obj.opt_str("cluster")? {
        if cluster.is_empty() || cluster.len() > 256 {
            return Err(obj.error_at("cluster", "expected an Envoy cluster name"));
        }
        upstream.cluster = cluster;
    }
    if let Some(version) = obj.opt_str("anthropic_version")? {
        if !is_header_token(&version) {
            return Err(obj.error_at("anthropic_version", "expected a version such as 2023-06-01"));
        }
        upstream.anthropic_version = version;
    }
    obj.finish()?;
    Ok(upstream)
}

fn parse_betas(obj: Option<Obj>) -> Result<Betas, ConfigError> {
    let mut betas = Betas {
        required: vec![MANAGED_AGENTS_BETA.into()],
        allowed: [
            MANAGED_AGENTS_BETA,
            "files-api-2025-04-14",
            "skills-2025-10-02",
            "agent-memory-2026-07-22",
            "dreaming-2026-04-21",
            "mcp-tunnels-2026-06-22",
            "user-profiles-2026-08-18",
            "user-profiles-2026-09-04",
            "google-managed-data-controls-2026-09-01",
        ]
        .map(String::from)
        .to_vec(),
    };
    let Some(mut obj) = obj else {
        return Ok(betas);
    };
    if let Some(required) = obj.opt_str_list("required", is_header_token)? {
        if !required.iter().any(|b| b == MANAGED_AGENTS_BETA) {
            return Err(obj.error_at(
                "required",
                format!("must include {MANAGED_AGENTS_BETA:?}: every Managed Agents call needs it"),
            ));
        }
        betas.required = required;
    }
    if let Some(allowed) = obj.opt_str_list("allowed", is_header_token)? {
        betas.allowed = allowed;
    }
    obj.finish()?;
    // Required betas are always allowed; keep the union here so checks need one list.
    for required in &betas.required {
        if !betas.allowed.contains(required) {
            betas.allowed.insert(0, required.clone());
        }
    }
    Ok(betas)
}

fn parse_routes(obj: Option<Obj>) -> Result<RouteRules, ConfigError> {
    let mut rules = RouteRules::default();
    let Some(mut obj) = obj else {
        return Ok(rules);
    };
    if let Some(names) = obj.opt_str_list("neighbours", |_| true)? {
        let mut neighbours = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let Some(n) = Neighbour::parse(name) else {
                let known: Vec<_> = Neighbour::ALL.iter().map(|n| n.as_str()).collect();
                return Err(obj.error_at(
                    &format!("neighbours[{i}]"),
                    format!("unknown neighbour {name:?}; known: {}", known.join(", ")),
                ));
            };
            neighbours.push(n);
        }
        rules.neighbours = neighbours;
    }
    if let Some(names) = obj.opt_str_list("shared_neighbours", |_| true)? {
        let mut shared = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let at = format!("shared_neighbours[{i}]");
            let Some(n) = Neighbour::parse(name) else {
                let known: Vec<_> = Neighbour::ALL.iter().map(|n| n.as_str()).collect();
                return Err(obj.error_at(
                    &at,
                    format!("unknown neighbour {name:?}; known: {}", known.join(", ")),
                ));
            };
            shared.push(n);
        }
        rules.shared_neighbours = shared;
    }
    if let Some(n) = obj.opt_uint("max_path_bytes", 64, 65_536)? {
        rules.max_path_bytes = n;
    }
    if let Some(n) = obj.opt_uint("max_id_bytes", 16, 1024)? {
        rules.max_id_bytes = n;
    }
    obj.finish()?;
    Ok(rules)
}

fn parse_metering(obj: Option<Obj>) -> Result<Metering, ConfigError> {
    let mut metering = Metering::default();
    let Some(mut obj) = obj else {
        return Ok(metering);
    };
    if let Some(n) = obj.opt_uint("max_event_bytes", 1024, 64 * 1024 * 1024)? {
        metering.scanner.max_event_bytes = n;
    }
    if let Some(n) = obj.opt_uint("session_idle_ttl_secs", 60, 30 * 24 * 3600)? {
        metering.limits.idle_ttl_secs = n as u64;
    }
    if let Some(n) = obj.opt_uint("max_tracked_sessions", 16, 1_000_000)? {
        metering.limits.index_capacity = n;
    }
    if let Some(n) = obj.opt_uint("reconcile_interval_secs", 0, 24 * 3600)? {
        metering.reconcile_interval_secs = n as u64;
    }
    if let Some(n) = obj.opt_uint("reconcile_batch", 1, 1000)? {
        metering.reconcile_batch = n;
    }
    if let Some(value) = obj.take("pricing") {
        let path = obj.child_path("pricing");
        metering.prices =
            PriceTable::from_json_value(&value, &path).map_err(|m| located(&path, m))?;
    }
    obj.finish()?;
    Ok(metering)
}

fn parse_credentials(
    root: &mut Obj,
    upstream: &Upstream,
) -> Result<Vec<CredentialSource>, ConfigError> {
    let mut sources: Vec<CredentialSource> = Vec::new();
    for (i, item) in root
        .opt_array("credentials")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let mut obj = Obj::new(item, format!("credentials[{i}]"))?;
        let name = obj.req_str("name")?;
        if !is_name(&name) {
            return Err(obj.error_at("name", "expected a non-empty name of [A-Za-z0-9_.-]"));
        }
        if sources.iter().any(|c| c.name == name) {
            return Err(obj.error_at("name", format!("duplicate credential {name:?}")));
        }
        let env = obj.opt_str("env")?;
        let vault = obj.opt_obj("vault")?;
        let origin = match (env, vault) {
            (Some(var), None) if is_env_name(&var) => Origin::Env(var),
            (Some(_), None) => {
                return Err(obj.error_at(
                    "env",
                    "expected an environment variable name ([A-Za-z0-9_]+), not a key",
                ))
            }
            (None, Some(vault)) => Origin::Vault(parse_vault(vault)?),
            _ => return Err(obj.error_at("env", "exactly one of env or vault is required")),
        };
        obj.finish()?;
        sources.push(CredentialSource { name, origin });
    }
    if !sources.iter().any(|c| c.name == DEFAULT_CREDENTIAL) {
        sources.insert(
            0,
            CredentialSource {
                name: DEFAULT_CREDENTIAL.into(),
                origin: Origin::Env(upstream.credential_env.clone()),
            },
        );
    }
    Ok(sources)
}

/// Splits a sub-parser's `path: message` error into a [`ConfigError`] under `section`.
fn located(section: &str, message: String) -> ConfigError {
    match message.split_once(": ") {
        Some((at, rest)) if at.starts_with(section) => ConfigError {
            path: at.to_string(),
            message: rest.to_string(),
        },
        _ => ConfigError {
            path: section.to_string(),
            message,
        },
    }
}

fn parse_isolation(obj: Option<Obj>, tenants_declared: bool) -> Result<Isolation, ConfigError> {
    let mut isolation = Isolation {
        enabled: tenants_declared,
        tag_key: DEFAULT_TAG_KEY.into(),
        untagged: Untagged::Deny,
        max_body_bytes: 1024 * 1024,
        hold_request_head: true,
    };
    let Some(mut obj) = obj else {
        return Ok(isolation);
    };
    if let Some(enabled) = obj.opt_bool("enabled")? {
        isolation.enabled = enabled;
    }
    if let Some(key) = obj.opt_str("tag_key")? {
        if !valid_tag_key(&key) {
            return Err(obj.error_at(
                "tag_key",
                "expected a metadata key of at most 64 characters",
            ));
        }
        isolation.tag_key = key;
    }
    if let Some(policy) = obj.opt_str("untagged")? {
        isolation.untagged = match policy.as_str() {
            "deny" => Untagged::Deny,
            "allow" => Untagged::Allow,
            _ => {
                return Err(obj.error_at(
                    "untagged",
                    format!("expected \"deny\" or \"allow\", found {policy:?}"),
                ))
            }
        };
    }
    if let Some(n) = obj.opt_uint("max_body_bytes", 1024, 16 * 1024 * 1024)? {
        isolation.max_body_bytes = n;
    }
    if let Some(hold) = obj.opt_bool("hold_request_head")? {
        isolation.hold_request_head = hold;
    }
    obj.finish()?;
    Ok(isolation)
}

fn parse_vault(mut obj: Obj) -> Result<VaultSource, ConfigError> {
    let cluster = obj.req_str("cluster")?;
    let authority = obj.req_str("authority")?;
    let path = obj.req_str("path")?;
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(obj.error_at(
            "path",
            "expected an absolute path such as /v1/secret/data/anthropic/team",
        ));
    }
    let field = obj.opt_str("field")?.unwrap_or_else(|| "api_key".into());
    let token_env = obj.req_str("token_env")?;
    if !is_env_name(&token_env) {
        return Err(obj.error_at(
            "token_env",
            "expected an environment variable name, not a token",
        ));
    }
    let refresh_secs = obj.opt_uint("refresh_secs", 1, 86_400)?.unwrap_or(300) as u64;
    obj.finish()?;
    Ok(VaultSource {
        cluster,
        authority,
        path,
        field,
        token_env,
        refresh_secs,
    })
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn parse_tenants(
    root: &mut Obj,
    credentials: &[CredentialSource],
) -> Result<Vec<Tenant>, ConfigError> {
    let Some(items) = root.opt_array("tenants")? else {
        return Ok(Vec::new());
    };
    let mut tenants: Vec<Tenant> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let mut obj = Obj::new(item, format!("tenants[{i}]"))?;
        let name = obj.req_str("name")?;
        if !is_name(&name) {
            return Err(obj.error_at("name", "expected a non-empty name of [A-Za-z0-9_.-]"));
        }
        if tenants.iter().any(|t| t.name == name) {
            return Err(obj.error_at("name", format!("duplicate tenant {name:?}")));
        }
        let scopes = parse_scopes(&mut obj, "scopes")?.unwrap_or_else(|| vec![Scope::ALL]);
        let credential = obj
            .opt_str("credential")?
            .unwrap_or_else(|| DEFAULT_CREDENTIAL.into());
        if !credentials.iter().any(|c| c.name == credential) {
            return Err(obj.error_at(
                "credential",
                format!("credential {credential:?} is not declared in credentials"),
            ));
        }
        obj.finish()?;
        tenants.push(Tenant {
            name,
            scopes,
            credential,
        });
    }
    Ok(tenants)
}

fn parse_scopes(obj: &mut Obj, key: &str) -> Result<Option<Vec<Scope>>, ConfigError> {
    let Some(texts) = obj.opt_str_list(key, |_| true)? else {
        return Ok(None);
    };
    let mut scopes = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        scopes.push(
            Scope::parse(text).map_err(|message| obj.error_at(&format!("{key}[{i}]"), message))?,
        );
    }
    Ok(Some(scopes))
}

/// Longest tenant, credential or key name.
pub const MAX_NAME_BYTES: usize = 64;

/// A name usable in logs, metric labels and shared-data keys (tenants, credentials, keys; also
/// the tenant a verified JWT names).
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn parse_gateway_keys(root: &mut Obj, tenants: &[Tenant]) -> Result<Vec<GatewayKey>, ConfigError> {
    let Some(items) = root.opt_array("gateway_keys")? else {
        return Ok(Vec::new());
    };
    let mut keys: Vec<GatewayKey> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{}[{i}]", root.child_path("gateway_keys"));
        let mut obj = Obj::new(item, path)?;
        let name = obj.req_str("name")?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(obj.error_at("name", "expected a non-empty name of [A-Za-z0-9_.-]"));
        }
        if keys.iter().any(|k| k.name == name) {
            return Err(obj.error_at("name", format!("duplicate key name {name:?}")));
        }
        let hex = obj.req_str("sha256")?;
        let Some(sha256) = sha256::from_hex(&hex) else {
            return Err(obj.error_at(
                "sha256",
                "expected 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)",
            ));
        };
        let tenant = obj
            .opt_str("tenant")?
            .unwrap_or_else(|| DEFAULT_TENANT.into());
        if !tenants.is_empty() && !tenants.iter().any(|t| t.name == tenant) {
            return Err(obj.error_at(
                "tenant",
                format!("tenant {tenant:?} is not declared in tenants"),
            ));
        }
        let expires_at = match obj.opt_str("expires_at")? {
            None => None,
            Some(text) => Some(parse_rfc3339_utc(&text).ok_or_else(|| {
                obj.error_at(
                    "expires_at",
                    format!("expected a UTC time like 2027-01-31T00:00:00Z, found {text:?}"),
                )
            })?),
        };
        let scopes = parse_scopes(&mut obj, "scopes")?;
        obj.finish()?;
        keys.push(GatewayKey {
            name,
            sha256,
            tenant,
            expires_at,
            scopes,
        });
    }
    Ok(keys)
}

/// Without a `tenants` list nothing separates tenants (isolation is off by default) and every
/// tenant may do everything (`*:*`), which is sound only while a single tenant can exist. A
/// config under which several can — a JWT (its claim may name any tenant) or keys of two
/// tenants — is refused rather than silently sharing every resource between them.
fn require_declared_tenants(
    tenants: &[Tenant],
    keys: &[GatewayKey],
    jwt: bool,
) -> Result<(), ConfigError> {
    if !tenants.is_empty() {
        return Ok(());
    }
    if jwt {
        return Err(ConfigError {
            path: "jwt.tenant_claim".into(),
            message: "a verified token may name any tenant, so `tenants` must be declared: without it tenant isolation is off and every tenant may do everything (*:*) with the others' resources".into(),
        });
    }
    let Some(first) = keys.first() else {
        return Ok(());
    };
    match keys.iter().enumerate().find(|(_, k)| k.tenant != first.tenant) {
        None => Ok(()),
        Some((i, other)) => Err(ConfigError {
            path: format!("gateway_keys[{i}].tenant"),
            message: format!(
                "tenant {:?} differs from gateway_keys[0]'s {:?} while no tenants are declared: declare them in `tenants`, or tenant isolation is off and every tenant may do everything (*:*) with the others' resources",
                other.tenant, first.tenant
            ),
        }),
    }
}

/// A visible-ASCII token usable as a header value element (no commas, spaces or controls).
fn is_header_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

/// A JSON object being consumed field by field; whatever is left at `finish` is unknown.
struct Obj {
    path: String,
    fields: Map<String, Value>,
}

impl Obj {
    fn new(value: Value, path: String) -> Result<Obj, ConfigError> {
        match value {
            Value::Object(fields) => Ok(Obj { path, fields }),
            other => Err(ConfigError {
                path: if path.is_empty() {
                    "(root)".into()
                } else {
                    path
                },
                message: format!("expected an object, found {}", type_name(&other)),
            }),
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.child_path(key),
            message: message.into(),
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.fields.remove(key)
    }

    fn req_str(&mut self, key: &str) -> Result<String, ConfigError> {
        self.opt_str(key)?
            .ok_or_else(|| self.error_at(key, "missing (a string is required)"))
    }

    fn opt_str(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error_at(
                key,
                format!("expected a string, found {}", type_name(&other)),
            )),
        }
    }

    fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.error_at(
                key,
                format!("expected true or false, found {}", type_name(&other)),
            )),
        }
    }

    fn opt_uint(
        &mut self,
        key: &str,
        min: usize,
        max: usize,
    ) -> Result<Option<usize>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.error_at(
                    key,
                    format!("expected an integer from {min} to {max}, found {n}"),
                )),
            },
            Some(other) => Err(self.error_at(
                key,
                format!("expected an integer, found {}", type_name(&other)),
            )),
        }
    }

    fn opt_obj(&mut self, key: &str) -> Result<Option<Obj>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(value) => Obj::new(value, self.child_path(key)).map(Some),
        }
    }

    fn opt_array(&mut self, key: &str) -> Result<Option<Vec<Value>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(self.error_at(
                key,
                format!("expected an array, found {}", type_name(&other)),
            )),
        }
    }

    /// An optional array of strings, each checked by `valid`.
    fn opt_str_list(
        &mut self,
        key: &str,
        valid: fn(&str) -> bool,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let at = format!("{key}[{i}]");
            match item {
                Value::String(s) if valid(&s) => out.push(s),
                Value::String(s) => return Err(self.error_at(&at, format!("invalid value {s:?}"))),
                other => {
                    return Err(self.error_at(
                        &at,
                        format!("expected a string, found {}", type_name(&other)),
                    ))
                }
            }
        }
        Ok(Some(out))
    }

    /// Fails on the first field nobody consumed: an unknown (probably misspelt) field.
    fn finish(self) -> Result<(), ConfigError> {
        match self.fields.keys().next() {
            None => Ok(()),
            Some(key) => Err(ConfigError {
                path: self.child_path(key),
                message: "unknown field".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn err(json: &str) -> String {
        Plan::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    const KEY_HASH: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    #[test]
    fn minimal_config_gets_defaults() {
        let plan = Plan::from_json(br#"{"api_version":"v1"}"#).unwrap();
        assert_eq!(plan.upstream.authority, "api.anthropic.com");
        assert_eq!(plan.upstream.credential_env, "ANTHROPIC_API_KEY");
        assert_eq!(plan.upstream.anthropic_version, "2023-06-01");
        assert_eq!(plan.betas.required, vec![MANAGED_AGENTS_BETA.to_string()]);
        assert_eq!(plan.betas.allowed.len(), 9);
        assert_eq!(plan.routes, RouteRules::default());
        assert!(plan.gateway_keys.is_empty());
    }

    #[test]
    fn full_config_compiles() {
        let json = format!(
            r#"{{"api_version":"v1",
               "upstream":{{"authority":"127.0.0.1:8080","credential_env":"UPSTREAM_KEY","anthropic_version":"2026-10-21"}},
               "betas":{{"required":["{MANAGED_AGENTS_BETA}"],"allowed":["files-api-2025-04-14"]}},
               "routes":{{"neighbours":["files","skills"],"max_path_bytes":512,"max_id_bytes":64}},
               "gateway_keys":[{{"name":"ci","sha256":"{KEY_HASH}","tenant":"acme"}}]}}"#
        );
        let plan = Plan::from_json(json.as_bytes()).unwrap();
        assert_eq!(plan.upstream.authority, "127.0.0.1:8080");
        assert_eq!(plan.upstream.credential_env, "UPSTREAM_KEY");
        assert_eq!(
            plan.routes.neighbours,
            vec![Neighbour::Files, Neighbour::Skills]
        );
        assert_eq!(plan.routes.max_path_bytes, 512);
        assert_eq!(plan.gateway_keys[0].name, "ci");
        assert_eq!(plan.gateway_keys[0].tenant, "acme");
        assert_eq!(plan.gateway_keys[0].sha256, sha256::digest(b"foo"));
    }

    #[test]
    fn tenants_scopes_and_expiry_compile() {
        let json = format!(
            r#"{{"api_version":"v1",
               "tenants":[{{"name":"acme","scopes":["*:*"]}},{{"name":"ro","scopes":["sessions:readonly"]}}],
               "gateway_keys":[{{"name":"k","sha256":"{KEY_HASH}","tenant":"ro","expires_at":"2027-01-01T00:00:00Z","scopes":["sessions:read"]}}]}}"#
        );
        let plan = Plan::from_json(json.as_bytes()).unwrap();
        assert_eq!(plan.gateway_keys[0].expires_at, Some(1_798_761_600));
        assert_eq!(
            plan.tenant_scopes("ro"),
            vec![Scope::parse("sessions:readonly").unwrap()]
        );
        assert_eq!(plan.tenant_scopes("nobody"), vec![]);
        assert!(
            plan.isolation.enabled,
            "declaring tenants turns isolation on"
        );
        assert!(
            !Plan::from_json(br#"{"api_version":"v1"}"#)
                .unwrap()
                .isolation
                .enabled
        );
        let open = Plan::from_json(br#"{"api_version":"v1"}"#).unwrap();
        assert_eq!(open.tenant_scopes("anyone"), vec![Scope::ALL]);
        assert_eq!(
            open.credentials,
            vec![CredentialSource {
                name: "default".into(),
                origin: Origin::Env("ANTHROPIC_API_KEY".into())
            }]
        );
        let json = br#"{"api_version":"v1",
            "credentials":[{"name":"research","env":"RESEARCH_KEY"},
                           {"name":"vaulted","vault":{"cluster":"vault","authority":"vault:8200","path":"/v1/secret/data/a","token_env":"VAULT_TOKEN","refresh_secs":5}}],
            "tenants":[{"name":"r","credential":"research"},{"name":"v","credential":"vaulted"},{"name":"d"}]}"#;
        let plan = Plan::from_json(json).unwrap();
        assert_eq!(plan.credentials.len(), 3);
        assert_eq!(plan.tenant_credential("r"), "research");
        assert_eq!(plan.tenant_credential("d"), "default");
        assert_eq!(plan.tenant_credential("unknown"), "default");
        assert!(
            matches!(&plan.credentials[2].origin, Origin::Vault(v) if v.refresh_secs == 5 && v.field == "api_key")
        );
    }

    #[test]
    fn errors_name_the_field_path() {
        let cases = [
            ("not json", "config error: not valid JSON"),
            (
                "[]",
                "config error at (root): expected an object, found an array",
            ),
            ("{}", "config error at api_version: missing"),
            (
                r#"{"api_version":2}"#,
                "config error at api_version: expected a string, found a number",
            ),
            (
                r#"{"api_version":"v9"}"#,
                "config error at api_version: unsupported version",
            ),
            (
                r#"{"api_version":"v1","upstrem":{}}"#,
                "config error at upstrem: unknown field",
            ),
            (
                r#"{"api_version":"v1","tenants":[{"name":"a"}],
                   "routes":{"neighbours":["files","memory_stores"],"shared_neighbours":["files"]}}"#,
                "config error at routes.neighbours[1]: \"memory_stores\" is not isolated between tenants",
            ),
            (
                r#"{"api_version":"v1","isolation":{"enabled":true},"routes":{"neighbours":["skills"]}}"#,
                "config error at routes.neighbours[0]: \"skills\" is not isolated between tenants",
            ),
            (
                r#"{"api_version":"v1","routes":{"shared_neighbours":["mail"]}}"#,
                "config error at routes.shared_neighbours[0]: unknown neighbour",
            ),
            (
                r#"{"api_version":"v1","upstream":{"host":"x"}}"#,
                "config error at upstream.host: unknown field",
            ),
            (
                r#"{"api_version":"v1","upstream":[]}"#,
                "config error at upstream: expected an object",
            ),
            (
                r#"{"api_version":"v1","upstream":{"authority":"a b"}}"#,
                "config error at upstream.authority:",
            ),
            (
                r#"{"api_version":"v1","upstream":{"credential_env":"sk-ant-123"}}"#,
                "config error at upstream.credential_env:",
            ),
            (
                r#"{"api_version":"v1","betas":{"required":["x"]}}"#,
                "config error at betas.required: must include",
            ),
            (
                r#"{"api_version":"v1","betas":{"allowed":["a,b"]}}"#,
                "config error at betas.allowed[0]: invalid value",
            ),
            (
                r#"{"api_version":"v1","betas":{"allowed":[1]}}"#,
                "config error at betas.allowed[0]: expected a string",
            ),
            (
                r#"{"api_version":"v1","routes":{"neighbours":["files","mail"]}}"#,
                "config error at routes.neighbours[1]: unknown neighbour",
            ),
            (
                r#"{"api_version":"v1","routes":{"max_id_bytes":-1}}"#,
                "config error at routes.max_id_bytes: expected an integer from 16 to 1024",
            ),
            (
                r#"{"api_version":"v1","routes":{"max_path_bytes":"big"}}"#,
                "config error at routes.max_path_bytes: expected an integer, found a string",
            ),
            (
                r#"{"api_version":"v1","gateway_keys":{}}"#,
                "config error at gateway_keys: expected an array",
            ),
            (
                r#"{"api_version":"v1","gateway_keys":[{"name":"a"}]}"#,
                "config error at gateway_keys[0].sha256: missing",
            ),
            (
                r#"{"api_version":"v1","gateway_keys":[{"name":"a","sha256":"abc"}]}"#,
                "config error at gateway_keys[0].sha256: expected 64 hex digits",
            ),
            (
                r#"{"api_version":"v1","gateway_keys":[{"name":"a b","sha256":"abc"}]}"#,
                "config error at gateway_keys[0].name:",
            ),
            (
                r#"{"api_version":"v1","gateway_keys":[1]}"#,
                "config error at gateway_keys[0]: expected an object, found a number",
            ),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(got.starts_with(want), "{json}\n got: {got}\nwant: {want}");
        }
        let undeclared = format!(
            r#"{{"api_version":"v1","tenants":[{{"name":"acme"}}],"gateway_keys":[{{"name":"a","sha256":"{KEY_HASH}","tenant":"other"}}]}}"#
        );
        assert_eq!(
            err(&undeclared),
            "config error at gateway_keys[0].tenant: tenant \"other\" is not declared in tenants"
        );
        let expiry = format!(
            r#"{{"api_version":"v1","gateway_keys":[{{"name":"a","sha256":"{KEY_HASH}","expires_at":"tomorrow"}}]}}"#
        );
        assert!(err(&expiry)
            .starts_with("config error at gateway_keys[0].expires_at: expected a UTC time"));
        let scope = format!(
            r#"{{"api_version":"v1","gateway_keys":[{{"name":"a","sha256":"{KEY_HASH}","scopes":["sessions:fly"]}}]}}"#
        );
        assert_eq!(err(&scope), "config error at gateway_keys[0].scopes[0]: scope \"sessions:fly\": unknown action \"fly\"");
        assert_eq!(
            err(r#"{"api_version":"v1","tenants":[{"name":"a","scopes":["x"]}]}"#),
            "config error at tenants[0].scopes[0]: scope \"x\" is not family:action"
        );
        assert!(err(
            r#"{"api_version":"v1","limits":{"per_tenant":{"create":{"per_minute":"x"}}}}"#
        )
        .starts_with("config error at limits.per_tenant.create.per_minute: "));
        assert!(
            err(r#"{"api_version":"v1","policy":{"tenants":{"*":{"vaults":"no"}}}}"#)
                .starts_with("config error at policy.tenants.*.vaults: ")
        );
        assert_eq!(
            err(r#"{"api_version":"v1","audit":{"redact":true}}"#),
            "config error at audit.redact: unknown field"
        );
        assert_eq!(
            err(r#"{"api_version":"v1","jwt":{"tenant_claim":7}}"#),
            "config error at jwt.tenant_claim: expected a string, found a number"
        );
        assert_eq!(
            err(r#"{"api_version":"v1","isolation":{"enabled":"yes"}}"#),
            "config error at isolation.enabled: expected true or false, found a string"
        );
        assert_eq!(
            err(r#"{"api_version":"v1","isolation":{"untagged":"maybe"}}"#),
            "config error at isolation.untagged: expected \"deny\" or \"allow\", found \"maybe\""
        );
        assert_eq!(
            err(r#"{"api_version":"v1","tenants":[{"name":"a","credential":"nope"}]}"#),
            "config error at tenants[0].credential: credential \"nope\" is not declared in credentials"
        );
        assert_eq!(
            err(r#"{"api_version":"v1","credentials":[{"name":"x"}]}"#),
            "config error at credentials[0].env: exactly one of env or vault is required"
        );
        assert_eq!(
            err(
                r#"{"api_version":"v1","credentials":[{"name":"x","vault":{"cluster":"v","authority":"v","path":"/p"}}]}"#
            ),
            "config error at credentials[0].vault.token_env: missing (a string is required)"
        );
        assert_eq!(
            err(r#"{"api_version":"v1","credentials":[{"name":"x","env":"sk-ant-abc"}]}"#),
            "config error at credentials[0].env: expected an environment variable name ([A-Za-z0-9_]+), not a key"
        );
        assert_eq!(
            err(r#"{"api_version":"v1","tenants":[{"name":"a"},{"name":"a"}]}"#),
            "config error at tenants[1].name: duplicate tenant \"a\""
        );
        let dup = format!(
            r#"{{"api_version":"v1","gateway_keys":[{{"name":"a","sha256":"{KEY_HASH}"}},{{"name":"a","sha256":"{KEY_HASH}"}}]}}"#
        );
        assert_eq!(
            err(&dup),
            "config error at gateway_keys[1].name: duplicate key name \"a\""
        );
        let extra = format!(
            r#"{{"api_version":"v1","gateway_keys":[{{"name":"a","sha256":"{KEY_HASH}","key":"plain"}}]}}"#
        );
        assert_eq!(
            err(&extra),
            "config error at gateway_keys[0].key: unknown field"
        );
    }

    #[test]
    fn several_possible_tenants_need_declared_tenants() {
        let key = |name: &str, tenant: Option<&str>| match tenant {
            Some(t) => format!(r#"{{"name":"{name}","sha256":"{KEY_HASH}","tenant":"{t}"}}"#),
            None => format!(r#"{{"name":"{name}","sha256":"{KEY_HASH}"}}"#),
        };
        let keys = |list: &[String]| {
            format!(
                r#"{{"api_version":"v1","gateway_keys":[{}]}}"#,
                list.join(",")
            )
        };
        // Keys of two tenants, no tenants list: refused at the first key of another tenant.
        assert_eq!(
            err(&keys(&[key("a", Some("acme")), key("b", Some("acme")), key("c", Some("globex"))])),
            "config error at gateway_keys[2].tenant: tenant \"globex\" differs from gateway_keys[0]'s \"acme\" while no tenants are declared: declare them in `tenants`, or tenant isolation is off and every tenant may do everything (*:*) with the others' resources"
        );
        // An implicit `default` and a named tenant are two tenants too.
        assert!(err(&keys(&[key("a", None), key("b", Some("acme"))]))
            .starts_with("config error at gateway_keys[1].tenant: tenant \"acme\" differs from gateway_keys[0]'s \"default\""));
        // One tenant, however named: nothing to isolate, accepted.
        let one =
            Plan::from_json(keys(&[key("a", Some("acme")), key("b", Some("acme"))]).as_bytes())
                .unwrap();
        assert_eq!((one.tenants.len(), one.isolation.enabled), (0, false));
        assert!(Plan::from_json(keys(&[key("a", None), key("b", None)]).as_bytes()).is_ok());
        // A JWT can name any tenant: tenants must be declared.
        assert_eq!(
            err(r#"{"api_version":"v1","jwt":{"tenant_claim":"org"}}"#),
            "config error at jwt.tenant_claim: a verified token may name any tenant, so `tenants` must be declared: without it tenant isolation is off and every tenant may do everything (*:*) with the others' resources"
        );
        let declared = format!(
            r#"{{"api_version":"v1","jwt":{{"tenant_claim":"org"}},"tenants":[{{"name":"acme"}},{{"name":"globex"}}],"gateway_keys":[{},{}]}}"#,
            key("a", Some("acme")),
            key("b", Some("globex"))
        );
        let plan = Plan::from_json(declared.as_bytes()).unwrap();
        assert!(plan.isolation.enabled);
        assert_eq!(plan.tenant_scopes("ghost"), vec![]);
    }
}
