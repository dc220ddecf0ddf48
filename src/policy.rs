//! Policy: what a tenant's agents may be — models, tools, MCP servers, environment networking,
//! vaults — checked on the request bodies that define them, before they reach the upstream.
//!
//! Scopes ([`crate::scopes`]) say which calls a tenant may make; this module says what those
//! calls may contain. It reads the JSON body only (no state), so every check is exact and the
//! same on every worker and replica. It also owns [`clamp_session_budget`] and
//! [`clamp_session_budget_update`], which cap a session's own spend ceiling at what the
//! tenant can give it (reserved in [`crate::limits::reserve_session_budget`]), and
//! [`clamp_deployment_budget`] for the budget a deployment copies to every session it fires.
//!
//! # Config (`rules_from_json`)
//! ```json
//! {"tenants": {
//!   "acme": {
//!     "models":       {"allow": ["claude-sonnet-4-*"], "deny": ["*-fast"]},
//!     "tools":        {"deny": ["bash", "web_fetch"], "allow": ["read", "grep", "custom:*"]},
//!     "mcp_servers":  {"allow_urls": ["https://mcp.internal/*"]},
//!     "environments": {"forbid_unrestricted": true, "allowed_hosts": ["*.internal.example"],
//!                      "allow_package_managers": false},
//!     "vaults": false,
//!     "max_body_bytes": 65536,
//!     "fast_mode": false,
//!     "inference_geo": {"allow": ["us"]},
//!     "multiagent": {"subagents": true, "workflows": false, "inline_agents": false},
//!     "execution_identity": {"allow": ["service_account", "aws_role"],
//!                            "role_arns": ["arn:aws:iam::111122223333:role/agents-*"]},
//!     "deployments": {"schedules": false}
//!   },
//!   "*": {"environments": {"forbid_unrestricted": true}}
//! }}
//! ```
//! `"*"` is the policy of every tenant without its own entry (an own entry replaces it wholly);
//! a tenant with neither has no policy. Every field is optional; a missing one does not
//! restrict. Patterns are globs whose only wildcard is `*` (any run of characters, also
//! empty). An `allow` list admits only what matches one of its patterns (`[]` admits nothing);
//! `deny` wins over `allow`.
//!
//! - `models`: every model config the body names — `model` (a string or `{"id": …}`), an
//!   enabled multi-agent `advisor.model`, and any roster entry with a `model` (`coordinator`
//!   `agents[]`, `predefined_agents[]` of enabled subagents and workflows; an `advisor` entry
//!   must name one). Case-sensitive.
//! - `fast_mode: false` refuses `speed: "fast"` (and speeds unknown to this build) on every
//!   model config the body names.
//! - `inference_geo`: allow/deny globs over each model config's `inference_geo`; a model
//!   without one (also a plain id string) runs in the workspace's `default_inference_geo` and
//!   is checked as `default`.
//! - `multiagent`: `subagents`, `workflows` and `inline_agents` (each `true` by default)
//!   refuse what a `multiagent_20261001` config enables — counting what it enables by
//!   default: an absent or `null` `subagents`/`workflows`/`inline_agents` is enabled, so
//!   `{"type": "multiagent_20261001"}` alone enables all three. `subagents: false` also
//!   refuses the legacy `coordinator` roster. While a `models`, `fast_mode` or
//!   `inference_geo` rule is set, inline agents are refused: they choose their own models at
//!   run time, which the gateway cannot check against the primary's rules (send
//!   `inline_agents: {"type": "disabled"}`). A multiagent type unknown to this build is
//!   refused while any of these rules is set.
//! - `execution_identity`: `allow` globs over the identity type (an agent created without
//!   one, or with `null`, runs as `service_account`), `role_arns` globs every `aws_role`
//!   `role_arn` must match.
//! - `deployments.schedules: false` refuses a deployment `schedule` (`null`, which clears
//!   one, passes).
//! - `tools`: every tool the body *enables*. Built-in tools go by their name (`bash`, `edit`,
//!   `read`, `write`, `glob`, `grep`, `web_fetch`, `web_search`), custom tools as
//!   `custom:<name>`, MCP toolsets as `mcp:<server name>`. An `agent_toolset_*` enables every
//!   built-in unless `default_config.enabled` is `false`, then exactly the `configs[]` entries
//!   with `enabled: true`. A toolset version unknown to this build that enables tools by
//!   default is refused while any tool rule is set: the gateway cannot know what it enables.
//! - `mcp_servers.allow_urls`: `scheme://host[:port][/path-glob]`. Scheme and host compare
//!   case-insensitively, the host glob never crosses into the path, a pattern without a path
//!   allows any path, and URLs with user info or unusual authority characters are refused.
//! - `environments`: `forbid_unrestricted` refuses `networking: {"type": "unrestricted"}`, and
//!   so do `allowed_hosts` and `allow_package_managers: false` (each means "not every host").
//!   Since the upstream's default networking is not documented, a cloud environment created
//!   without explicit `limited` networking is refused too while any of them is set. `allowed_hosts` patterns (case
//!   insensitive) must each match every `limited.allowed_hosts[]` entry, which must be plain
//!   host names (`*.` prefix allowed). `allow_package_managers: false` refuses
//!   `allow_package_managers: true`. Self-hosted environments run on your own network and are
//!   not restricted here.
//! - `vaults: false` refuses creating vaults and creating or changing vault credentials.
//! - `max_body_bytes` caps inspected request bodies for the tenant ([`check_body_size`], 413).
//!
//! Where rules apply: agent create/update; session create and update with an `agent` object
//! (its `model`/`multiagent`/`execution_identity`/`tools`/`mcp_servers` overrides, the same
//! on both; omitted fields keep the stored agent's); deployment create/update (the
//! `deployments` neighbour: `schedule`, and an `agent` object like a session's; its `budget`
//! is capped by [`clamp_deployment_budget`]); environment create/update; vault and
//! credential writes. A multiagent object on an agent update is checked as sent, like a
//! create's (the upstream merges it level by level, but an omitted level counts as enabled
//! here). A refusal is
//! 403 `permission_error` naming the rule, e.g. `policy: model claude-opus-4-6 is not allowed
//! for tenant acme (allowed: claude-sonnet-4-*)`; a field a rule must read but cannot (wrong
//! type) is 400 `invalid_request_error`. Agents referenced by id are not re-checked here: they
//! were checked when created or updated through the gateway.

use std::collections::BTreeMap;

use crate::errors::json_type_name as type_name;
use crate::limits::valid_name;
use serde_json::{json, Map, Value};

use crate::errors::{excerpt, ApiError, ErrorKind};
use crate::routes::{Action, Family, Operation};

/// Largest `max_body_bytes` accepted (64 MiB).
pub const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// The built-in tools of `agent_toolset_20260401`, enabled unless disabled.
pub const BUILTIN_TOOLS: [&str; 8] = [
    "bash",
    "edit",
    "read",
    "write",
    "glob",
    "grep",
    "web_fetch",
    "web_search",
];
/// Toolset versions whose built-ins are [`BUILTIN_TOOLS`].
const KNOWN_TOOLSETS: [&str; 1] = ["agent_toolset_20260401"];
/// Longest client text echoed in a refusal.
const ECHO_CHARS: usize = 120;

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// Allow and deny globs over names (models, tools).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameRules {
    /// `None`: anything not denied.
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

impl NameRules {
    fn is_set(&self) -> bool {
        self.allow.is_some() || !self.deny.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvironmentRules {
    pub forbid_unrestricted: bool,
    /// Lowercased host globs; `None`: any host.
    pub allowed_hosts: Option<Vec<String>>,
    /// `false` refuses `allow_package_managers: true`.
    pub allow_package_managers: bool,
}

/// What `multiagent_20261001` may switch on (`multiagent` in config); each `true` by default,
/// as upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiagentRules {
    /// `false` refuses enabled `subagents` (and the legacy `coordinator` roster).
    pub subagents: bool,
    /// `false` refuses enabled `workflows`.
    pub workflows: bool,
    /// `false` refuses inline agents in enabled subagents or workflows.
    pub inline_agents: bool,
}

impl Default for MultiagentRules {
    fn default() -> Self {
        MultiagentRules {
            subagents: true,
            workflows: true,
            inline_agents: true,
        }
    }
}

/// Which `execution_identity` an agent may run as (`execution_identity` in config).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityRules {
    /// Identity type globs (`service_account`, `aws_role`); `None`: any type.
    pub allow: Option<Vec<String>>,
    /// `aws_role` `role_arn` globs; `None`: any role.
    pub role_arns: Option<Vec<String>>,
}

impl IdentityRules {
    fn is_set(&self) -> bool {
        self.allow.is_some() || self.role_arns.is_some()
    }
}

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy {
            models: NameRules::default(),
            fast_mode: true,
            inference_geo: NameRules::default(),
            multiagent: MultiagentRules::default(),
            execution_identity: IdentityRules::default(),
            deployment_schedules: true,
            tools: NameRules::default(),
            mcp_allow_urls: None,
            environments: EnvironmentRules {
                forbid_unrestricted: false,
                allowed_hosts: None,
                allow_package_managers: true,
            },
            vaults: true,
            max_body_bytes: None,
        }
    }
}

/// One tenant's policy (`tenants.<name>` in config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantPolicy {
    pub models: NameRules,
    /// `false` refuses `speed: "fast"` on every model config a body names.
    pub fast_mode: bool,
    /// Globs over `inference_geo`; a model config without one is checked as `default`.
    pub inference_geo: NameRules,
    pub multiagent: MultiagentRules,
    pub execution_identity: IdentityRules,
    /// `false` refuses a deployment `schedule` (`deployments.schedules`).
    pub deployment_schedules: bool,
    pub tools: NameRules,
    /// URL globs (`mcp_servers.allow_urls`); `None`: any URL.
    pub mcp_allow_urls: Option<Vec<String>>,
    pub environments: EnvironmentRules,
    /// `false` refuses vault creation and credential writes.
    pub vaults: bool,
    pub max_body_bytes: Option<u64>,
}

/// Policies by tenant; `"*"` for tenants without their own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRules {
    pub tenants: BTreeMap<String, TenantPolicy>,
}

impl PolicyRules {
    pub fn for_tenant(&self, tenant: &str) -> Option<&TenantPolicy> {
        self.tenants.get(tenant).or_else(|| self.tenants.get("*"))
    }
}

// ---------------------------------------------------------------------------------------------
// Glob matching
// ---------------------------------------------------------------------------------------------

/// Whether `text` matches `pattern`, where `*` matches any run of characters (also empty) and
/// every other character only itself. Linear backtracking over the last `*`: no recursion, no
/// exponential blow-up on patterns like `*a*a*a*b`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in the text its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more byte and retry from there.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

fn any_match(patterns: &[String], text: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, text))
}

/// Splits `scheme://authority[rest]` at the end of the authority (`/`, `?` or `#`).
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    Some((scheme, authority, rest))
}

/// Whether an MCP server URL matches a `scheme://host-glob[:port][/path-glob]` pattern.
/// Scheme and authority compare case-insensitively and separately from the path, so `*` in a
/// host can never match `evil.example/` and a pattern without a path allows any path.
pub fn url_match(pattern: &str, url: &str) -> bool {
    let (Some((ps, pa, pr)), Some((us, ua, ur))) = (split_url(pattern), split_url(url)) else {
        return false;
    };
    let authority_ok = !ua.is_empty()
        && ua
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    authority_ok
        && ps.eq_ignore_ascii_case(us)
        && glob_match(&pa.to_ascii_lowercase(), &ua.to_ascii_lowercase())
        && (pr.is_empty() || glob_match(pr, ur))
}

/// A plain host name as an environment may list it: letters, digits, `-`, `.`, optionally
/// starting with `*.`.
fn plain_host(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn refuse(message: String) -> ApiError {
    ApiError::new(ErrorKind::Permission, format!("policy: {message}"))
}

fn malformed(field: &str, expected: &str) -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!("policy: {field} must be {expected}"),
    )
}

fn show(text: &str) -> String {
    excerpt(text, ECHO_CHARS)
}

/// Refuses a body longer than the tenant's `max_body_bytes` with 413 `request_too_large`.
pub fn check_body_size(rules: &PolicyRules, tenant: &str, len: u64) -> Result<(), ApiError> {
    match rules.for_tenant(tenant).and_then(|p| p.max_body_bytes) {
        Some(max) if len > max => Err(ApiError::new(
            ErrorKind::RequestTooLarge,
            format!(
                "policy: request body of {len} bytes exceeds the {max}-byte limit for tenant {tenant}"
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks a request body against the tenant's policy (see the module doc for what applies
/// where). Operations without rules pass whatever the body; so does everything for a tenant
/// without a policy.
pub fn check(
    rules: &PolicyRules,
    tenant: &str,
    op: &Operation,
    body: &Value,
) -> Result<(), ApiError> {
    let Some(policy) = rules.for_tenant(tenant) else {
        return Ok(());
    };
    let ctx = Ctx { policy, tenant };
    match (op.family, op.action) {
        (Family::Agents, Action::Create) => ctx.agent(body, "", true),
        (Family::Agents, Action::Update) => ctx.agent(body, "", false),
        // An update's `agent` is checked like a create's overrides: the upstream documents
        // only `tools` and `mcp_servers` there, but a model it might accept must pass too.
        (Family::Sessions, Action::Create | Action::Update) => ctx.agent_reference(body),
        (Family::Deployments, Action::Create | Action::Update) => {
            ctx.deployment_schedule(body)?;
            ctx.agent_reference(body)
        }
        (Family::Environments, Action::Create) => ctx.environment(body, true),
        (Family::Environments, Action::Update) => ctx.environment(body, false),
        (Family::Vaults, Action::Create) if !policy.vaults => {
            Err(refuse(format!("tenant {tenant} may not create vaults")))
        }
        (Family::VaultCredentials, Action::Create | Action::Update) if !policy.vaults => {
            Err(refuse(format!(
                "tenant {tenant} may not create or change vault credentials"
            )))
        }
        _ => Ok(()),
    }
}

struct Ctx<'a> {
    policy: &'a TenantPolicy,
    tenant: &'a str,
}

/// How a tool came to be enabled; a default gets a hint on how to disable it.
enum Enabled {
    Explicitly,
    ByDefault(String),
}

impl Ctx<'_> {
    /// The `agent` of a session or deployment body: a plain reference (id string or
    /// `{"type": "agent", …}`) carries nothing to check; an object's overrides are checked
    /// like an agent update (`prefix` `agent.`: omitted fields keep the stored agent's).
    fn agent_reference(&self, body: &Value) -> Result<(), ApiError> {
        match body.get("agent") {
            Some(agent @ Value::Object(_)) => self.agent(agent, "agent.", false),
            _ => Ok(()),
        }
    }

    /// An agent definition: a create/update body, or a session's `agent` object (`prefix`
    /// `agent.`), whose overrides use the same field names. `create`: the body defines a
    /// whole agent, so omitted fields take the upstream defaults.
    fn agent(&self, agent: &Value, prefix: &str, create: bool) -> Result<(), ApiError> {
        self.models(agent, prefix)?;
        self.multiagent(agent, prefix)?;
        self.execution_identity(agent, prefix, create)?;
        self.tools(agent.get("tools"), &format!("{prefix}tools"))?;
        self.mcp_servers(agent.get("mcp_servers"), &format!("{prefix}mcp_servers"))
    }

    /// Whether a rule reads model configs (model names, fast mode, inference geo).
    fn model_rules_set(&self) -> bool {
        let p = self.policy;
        p.models.is_set() || !p.fast_mode || p.inference_geo.is_set()
    }

    /// Every model config the body names: `model`, an advisor's model, and models in the
    /// `coordinator` roster or in `predefined_agents` of subagents and workflows.
    fn models(&self, agent: &Value, prefix: &str) -> Result<(), ApiError> {
        if !self.model_rules_set() {
            return Ok(());
        }
        if let Some(model) = agent.get("model").filter(|m| !m.is_null()) {
            self.model(model, &format!("{prefix}model"))?;
        }
        let Some(multi) = agent.get("multiagent").and_then(Value::as_object) else {
            return Ok(());
        };
        let at = format!("{prefix}multiagent");
        // `multiagent_20261001`: an enabled advisor names its model.
        if let Some(advisor) = multi.get("advisor").and_then(Value::as_object) {
            let disabled = advisor.get("type").and_then(Value::as_str) == Some("disabled");
            if let Some(model) = advisor.get("model").filter(|m| !disabled && !m.is_null()) {
                self.model(model, &format!("{at}.advisor.model"))?;
            }
        }
        // `coordinator`: the roster may hold `{"type": "advisor", "model": …}`.
        self.roster_models(multi.get("agents"), &format!("{at}.agents"))?;
        for key in ["subagents", "workflows"] {
            if let Some(spawn) = multi.get(key).and_then(Value::as_object) {
                if spawn.get("type").and_then(Value::as_str) != Some("disabled") {
                    self.roster_models(
                        spawn.get("predefined_agents"),
                        &format!("{at}.{key}.predefined_agents"),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Models of a roster's entries: an advisor must name one; any other entry that carries
    /// a `model` is checked too. Entries by id were checked when created through the gateway.
    fn roster_models(&self, roster: Option<&Value>, at: &str) -> Result<(), ApiError> {
        let Some(Value::Array(entries)) = roster else {
            return Ok(());
        };
        for (i, entry) in entries.iter().enumerate() {
            let model = entry.get("model").filter(|m| !m.is_null());
            match model {
                Some(model) => self.model(model, &format!("{at}[{i}].model"))?,
                None if entry.get("type").and_then(Value::as_str) == Some("advisor") => {
                    return Err(malformed(&format!("{at}[{i}].model"), "a model id string"))
                }
                None => {}
            }
        }
        Ok(())
    }

    /// One model config (`field` names it): a model id string, or `{id, speed?,
    /// inference_geo?}`; a string runs at standard speed in the workspace's default geo.
    fn model(&self, model: &Value, field: &str) -> Result<(), ApiError> {
        let text = |config: &Map<String, Value>, key: &str| match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(malformed(&format!("{field}.{key}"), "a string")),
        };
        let (id, speed, geo) = match model {
            Value::String(id) => (id.clone(), None, None),
            Value::Object(config) => match config.get("id") {
                Some(Value::String(id)) => (
                    id.clone(),
                    text(config, "speed")?,
                    text(config, "inference_geo")?,
                ),
                _ => return Err(malformed(&format!("{field}.id"), "a model id string")),
            },
            _ => {
                return Err(malformed(
                    field,
                    "a model id string or an object with an id",
                ))
            }
        };
        let tenant = self.tenant;
        self.name_allowed(&self.policy.models, "model", &id, None)?;
        if !self.policy.fast_mode {
            match speed.as_deref() {
                None | Some("standard") => {}
                Some("fast") => {
                    return Err(refuse(format!(
                        "fast mode ({field}.speed \"fast\") is not allowed for tenant {tenant}; use \"standard\""
                    )))
                }
                Some(other) => {
                    return Err(refuse(format!(
                        "speed {} ({field}.speed) is not known to the gateway",
                        show(other)
                    )))
                }
            }
        }
        if self.policy.inference_geo.is_set() {
            let (geo, hint) = match &geo {
                Some(geo) => (geo.as_str(), None),
                None => (
                    "default",
                    Some(format!(
                        "; {field} names no inference_geo, so it runs in the workspace's default_inference_geo (\"default\" to the policy): set {field}.inference_geo"
                    )),
                ),
            };
            self.name_allowed(
                &self.policy.inference_geo,
                "inference_geo",
                geo,
                hint.as_deref(),
            )?;
        }
        Ok(())
    }

    /// `multiagent`: what a `multiagent_20261001` config switches on, counting what it
    /// enables by default (`subagents`, `workflows` and their inline agents; a key sent as
    /// `null` is enabled too), and the legacy `coordinator` roster as subagents. While a
    /// model rule is set, inline agents are refused: they choose their own models at run
    /// time, out of the gateway's sight. A type unknown to this build is refused while any
    /// rule here or on models is set.
    fn multiagent(&self, agent: &Value, prefix: &str) -> Result<(), ApiError> {
        let rules = &self.policy.multiagent;
        let model_rules = self.model_rules_set();
        if *rules == MultiagentRules::default() && !model_rules {
            return Ok(());
        }
        let multi = match agent.get("multiagent") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Object(multi)) => multi,
            Some(_) => return Err(malformed(&format!("{prefix}multiagent"), "an object")),
        };
        let tenant = self.tenant;
        let at = format!("{prefix}multiagent");
        match multi.get("type").and_then(Value::as_str) {
            Some("coordinator") if !rules.subagents => Err(refuse(format!(
                "subagents are forbidden for tenant {tenant} ({at} type coordinator calls other agents)"
            ))),
            Some("coordinator") => Ok(()),
            Some("multiagent_20261001") => {
                for (key, allowed) in [("subagents", rules.subagents), ("workflows", rules.workflows)]
                {
                    let field = format!("{at}.{key}");
                    let Some((inline, by_default)) = spawn_config(multi.get(key), &field)? else {
                        continue;
                    };
                    if !allowed {
                        let hint = if by_default {
                            format!("; multiagent_20261001 enables them by default: send \"{key}\": {{\"type\":\"disabled\"}}")
                        } else {
                            String::new()
                        };
                        return Err(refuse(format!(
                            "{key} are forbidden for tenant {tenant} ({field}){hint}"
                        )));
                    }
                    let fix = format!("send \"inline_agents\": {{\"type\":\"disabled\"}} in {field}");
                    if inline && !rules.inline_agents {
                        return Err(refuse(format!(
                            "inline agents ({field}) are forbidden for tenant {tenant}; they are enabled unless disabled: {fix}"
                        )));
                    }
                    if inline && model_rules {
                        return Err(refuse(format!(
                            "inline agents ({field}) choose their own models, which the gateway cannot check against the model rules of tenant {tenant}; {fix}"
                        )));
                    }
                }
                Ok(())
            }
            other => Err(refuse(format!(
                "multiagent type {} is not known to the gateway ({at}.type)",
                show(other.unwrap_or("(missing)"))
            ))),
        }
    }

    /// `execution_identity`: its type must be allowed, and an `aws_role`'s `role_arn` must
    /// match a `role_arns` pattern. An agent created without one runs as `service_account`
    /// (so is `null`); an update or override without one keeps the stored agent's.
    fn execution_identity(
        &self,
        agent: &Value,
        prefix: &str,
        create: bool,
    ) -> Result<(), ApiError> {
        let rules = &self.policy.execution_identity;
        if !rules.is_set() {
            return Ok(());
        }
        let at = format!("{prefix}execution_identity");
        let identity = match agent.get("execution_identity") {
            None if !create => return Ok(()),
            None | Some(Value::Null) => None,
            Some(Value::Object(identity)) => Some(identity),
            Some(_) => return Err(malformed(&at, "an object")),
        };
        let kind = match identity.map(|i| i.get("type")) {
            None => "service_account",
            Some(Some(Value::String(kind))) => kind.as_str(),
            Some(_) => return Err(malformed(&format!("{at}.type"), "a string")),
        };
        let tenant = self.tenant;
        if let Some(allow) = &rules.allow {
            if !any_match(allow, kind) {
                let allowed = if allow.is_empty() {
                    "none".to_string()
                } else {
                    allow.join(", ")
                };
                let hint = if identity.is_none() {
                    format!("; an agent without {at} runs as service_account")
                } else {
                    String::new()
                };
                return Err(refuse(format!(
                    "execution identity {} is not allowed for tenant {tenant} (allowed: {allowed}){hint}",
                    show(kind)
                )));
            }
        }
        if let (Some(arns), Some(identity), "aws_role") = (&rules.role_arns, identity, kind) {
            let Some(arn) = identity.get("role_arn").and_then(Value::as_str) else {
                return Err(malformed(&format!("{at}.role_arn"), "a string"));
            };
            if !any_match(arns, arn) {
                let allowed = if arns.is_empty() {
                    "none".to_string()
                } else {
                    arns.join(", ")
                };
                return Err(refuse(format!(
                    "{at}.role_arn {} is not allowed for tenant {tenant} (allowed: {allowed})",
                    show(arn)
                )));
            }
        }
        Ok(())
    }

    /// `deployments.schedules: false` refuses a deployment `schedule` (`null` clears one).
    fn deployment_schedule(&self, body: &Value) -> Result<(), ApiError> {
        if self.policy.deployment_schedules {
            return Ok(());
        }
        match body.get("schedule") {
            None | Some(Value::Null) => Ok(()),
            Some(_) => Err(refuse(format!(
                "deployment schedules are forbidden for tenant {} (schedule); run the deployment on demand instead",
                self.tenant
            ))),
        }
    }

    /// Refuses `name` when denied or not allowed; `hint` explains a tool enabled by default.
    fn name_allowed(
        &self,
        rules: &NameRules,
        what: &str,
        name: &str,
        hint: Option<&str>,
    ) -> Result<(), ApiError> {
        let tenant = self.tenant;
        let hint = hint.unwrap_or_default();
        if any_match(&rules.deny, name) {
            return Err(refuse(format!(
                "{what} {} is denied for tenant {tenant} (denied: {}){hint}",
                show(name),
                rules.deny.join(", ")
            )));
        }
        if let Some(allow) = &rules.allow {
            if !any_match(allow, name) {
                let allowed = if allow.is_empty() {
                    "none".to_string()
                } else {
                    allow.join(", ")
                };
                return Err(refuse(format!(
                    "{what} {} is not allowed for tenant {tenant} (allowed: {allowed}){hint}",
                    show(name)
                )));
            }
        }
        Ok(())
    }

    fn tools(&self, tools: Option<&Value>, field: &str) -> Result<(), ApiError> {
        let rules = &self.policy.tools;
        if !rules.is_set() {
            return Ok(());
        }
        let items = match tools {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(malformed(field, "an array")),
        };
        for (i, tool) in items.iter().enumerate() {
            for (name, how) in enabled_tools(tool, &format!("{field}[{i}]"))? {
                let hint = match &how {
                    Enabled::Explicitly => None,
                    Enabled::ByDefault(set) => Some(format!(
                        "; {set} enables it by default: add {{\"name\":\"{name}\",\"enabled\":false}} to its configs"
                    )),
                };
                self.name_allowed(rules, "tool", &name, hint.as_deref())?;
            }
        }
        Ok(())
    }

    fn mcp_servers(&self, servers: Option<&Value>, field: &str) -> Result<(), ApiError> {
        let Some(allow) = &self.policy.mcp_allow_urls else {
            return Ok(());
        };
        let items = match servers {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(malformed(field, "an array")),
        };
        for (i, server) in items.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let kind = server.get("type").and_then(Value::as_str);
            if kind != Some("url") {
                return Err(refuse(format!(
                    "MCP server type {} is not known to the gateway ({at}); only \"url\" servers can be checked",
                    show(kind.unwrap_or("(missing)"))
                )));
            }
            let Some(url) = server.get("url").and_then(Value::as_str) else {
                return Err(malformed(&format!("{at}.url"), "a string"));
            };
            if !allow.iter().any(|p| url_match(p, url)) {
                return Err(refuse(format!(
                    "MCP server url {} is not allowed for tenant {} (allowed: {})",
                    show(url),
                    self.tenant,
                    allow.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn environment(&self, body: &Value, create: bool) -> Result<(), ApiError> {
        let rules = &self.policy.environments;
        // A host list or a ban on package registries both mean "not every host".
        let restrict_network = rules.forbid_unrestricted
            || rules.allowed_hosts.is_some()
            || !rules.allow_package_managers;
        if !restrict_network {
            return Ok(());
        }
        let tenant = self.tenant;
        let must_be_limited = || {
            refuse(format!(
                "environments of tenant {tenant} need explicit limited networking (config.networking {{\"type\":\"limited\",\"allowed_hosts\":[…]}}): unrestricted networking is forbidden"
            ))
        };
        let config = match body.get("config") {
            // On update an omitted config keeps the checked one.
            None if !create => return Ok(()),
            None | Some(Value::Null) => return Err(must_be_limited()),
            Some(config @ Value::Object(_)) => config,
            Some(_) => return Err(malformed("config", "an object")),
        };
        match config.get("type").and_then(Value::as_str) {
            Some("cloud") => {}
            Some("self_hosted") => return Ok(()),
            other => {
                return Err(refuse(format!(
                    "environment config type {} is not known to the gateway",
                    show(other.unwrap_or("(missing)"))
                )))
            }
        }
        let networking = match config.get("networking") {
            None if !create => return Ok(()),
            None | Some(Value::Null) => return Err(must_be_limited()),
            Some(networking @ Value::Object(_)) => networking,
            Some(_) => return Err(malformed("config.networking", "an object")),
        };
        match networking.get("type").and_then(Value::as_str) {
            Some("limited") => {}
            Some("unrestricted") => {
                return Err(refuse(format!(
                    "unrestricted networking is forbidden for tenant {tenant}; use {{\"type\":\"limited\",\"allowed_hosts\":[…]}}"
                )))
            }
            other => {
                return Err(refuse(format!(
                    "networking type {} is not known to the gateway",
                    show(other.unwrap_or("(missing)"))
                )))
            }
        }
        if !rules.allow_package_managers
            && networking.get("allow_package_managers") == Some(&Value::Bool(true))
        {
            return Err(refuse(format!(
                "package manager access is forbidden for tenant {tenant} (allow_package_managers)"
            )));
        }
        let Some(allowed) = &rules.allowed_hosts else {
            return Ok(());
        };
        let hosts = match networking.get("allowed_hosts") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(hosts)) => hosts,
            Some(_) => {
                return Err(malformed(
                    "config.networking.allowed_hosts",
                    "an array of host names",
                ))
            }
        };
        for host in hosts {
            let Some(host) = host.as_str() else {
                return Err(malformed(
                    "config.networking.allowed_hosts[]",
                    "a host name string",
                ));
            };
            if !plain_host(host) {
                return Err(refuse(format!(
                    "allowed host {} is not a plain host name",
                    show(host)
                )));
            }
            if !any_match(allowed, &host.to_ascii_lowercase()) {
                return Err(refuse(format!(
                    "allowed host {} is not allowed for tenant {tenant} (allowed: {})",
                    show(host),
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// A `subagents` / `workflows` config of `multiagent_20261001`: `None` when disabled, else
/// (inline agents enabled, enabled only by default). Absent or `null` means enabled, and so
/// do absent or `null` `inline_agents`.
fn spawn_config(value: Option<&Value>, at: &str) -> Result<Option<(bool, bool)>, ApiError> {
    let config = match value {
        None | Some(Value::Null) => return Ok(Some((true, true))),
        Some(Value::Object(config)) => config,
        Some(_) => return Err(malformed(at, "an object")),
    };
    let unknown = |field: &str, kind: Option<&str>| {
        refuse(format!(
            "{field} type {} is not known to the gateway",
            show(kind.unwrap_or("(missing)"))
        ))
    };
    match config.get("type").and_then(Value::as_str) {
        Some("disabled") => return Ok(None),
        Some("enabled") => {}
        other => return Err(unknown(at, other)),
    }
    let inline = match config.get("inline_agents") {
        None | Some(Value::Null) => true,
        Some(Value::Object(inline)) => match inline.get("type").and_then(Value::as_str) {
            Some("enabled") => true,
            Some("disabled") => false,
            other => return Err(unknown(&format!("{at}.inline_agents"), other)),
        },
        Some(_) => return Err(malformed(&format!("{at}.inline_agents"), "an object")),
    };
    Ok(Some((inline, false)))
}

/// The tools one `tools[]` entry enables, by policy name (see the module doc).
fn enabled_tools(tool: &Value, at: &str) -> Result<Vec<(String, Enabled)>, ApiError> {
    let Some(fields) = tool.as_object() else {
        return Err(malformed(at, "an object"));
    };
    let Some(kind) = fields.get("type").and_then(Value::as_str) else {
        return Err(malformed(&format!("{at}.type"), "a string"));
    };
    let name_of = |key: &str| match fields.get(key) {
        Some(Value::String(name)) => Ok(name.clone()),
        _ => Err(malformed(&format!("{at}.{key}"), "a string")),
    };
    match kind {
        "custom" => Ok(vec![(
            format!("custom:{}", name_of("name")?),
            Enabled::Explicitly,
        )]),
        "mcp_toolset" => Ok(vec![(
            format!("mcp:{}", name_of("mcp_server_name")?),
            Enabled::Explicitly,
        )]),
        set if set.starts_with("agent_toolset_") => toolset(fields, set, at),
        other => Err(refuse(format!(
            "tool type {} is not known to the gateway ({at})",
            show(other)
        ))),
    }
}

fn toolset(
    fields: &Map<String, Value>,
    set: &str,
    at: &str,
) -> Result<Vec<(String, Enabled)>, ApiError> {
    let default_on = match fields.get("default_config") {
        None | Some(Value::Null) => true,
        Some(Value::Object(config)) => match config.get("enabled") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(on)) => *on,
            Some(_) => {
                return Err(malformed(
                    &format!("{at}.default_config.enabled"),
                    "true or false",
                ))
            }
        },
        Some(_) => return Err(malformed(&format!("{at}.default_config"), "an object")),
    };
    if default_on && !KNOWN_TOOLSETS.contains(&set) {
        return Err(refuse(format!(
            "tool set {} is not known to the gateway, so the tools it enables by default cannot be checked; set default_config.enabled to false and enable tools by name",
            show(set)
        )));
    }
    // Each config's own `enabled`, where it says; `None` falls back to the default.
    let mut explicit: Vec<(String, Option<bool>)> = Vec::new();
    match fields.get("configs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(configs)) => {
            for (i, config) in configs.iter().enumerate() {
                let Some(name) = config.get("name").and_then(Value::as_str) else {
                    return Err(malformed(&format!("{at}.configs[{i}].name"), "a string"));
                };
                let enabled = match config.get("enabled") {
                    None | Some(Value::Null) => None,
                    Some(Value::Bool(on)) => Some(*on),
                    Some(_) => {
                        return Err(malformed(
                            &format!("{at}.configs[{i}].enabled"),
                            "true or false",
                        ))
                    }
                };
                explicit.push((name.to_string(), enabled));
            }
        }
        Some(_) => return Err(malformed(&format!("{at}.configs"), "an array")),
    }
    let mut out = Vec::new();
    let mut names: Vec<&str> = if default_on {
        BUILTIN_TOOLS.to_vec()
    } else {
        Vec::new()
    };
    for (name, _) in &explicit {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    for name in names {
        // The last config for a name wins, as a later override would.
        let own = explicit
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, e)| *e);
        match own {
            Some(true) => out.push((name.to_string(), Enabled::Explicitly)),
            Some(false) => {}
            None if default_on => out.push((name.to_string(), Enabled::ByDefault(set.to_string()))),
            None => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Session budgets
// ---------------------------------------------------------------------------------------------

/// Micro-dollars in a cent.
const MICRO_PER_CENT: u64 = 10_000;

/// The cents of a well-formed `{"type":"limit","max_list_cost":{"amount":"<cents>",
/// "currency":"USD"}}`, or `None`.
fn budget_cents(budget: &Value) -> Option<u64> {
    if budget.get("type").and_then(Value::as_str) != Some("limit") {
        return None;
    }
    let cost = budget.get("max_list_cost")?;
    if cost.get("currency").and_then(Value::as_str) != Some("USD") {
        return None;
    }
    let amount = cost.get("amount").and_then(Value::as_str)?;
    if amount.is_empty() || !amount.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    amount.parse().ok()
}

/// The budget a session body asks for, in µ$, when it is one the gateway can read (see
/// [`clamp_session_budget`]); `None` when absent, `null` or unreadable.
pub fn requested_budget_microdollars(body: &Value) -> Option<u64> {
    body.get("budget")
        .and_then(budget_cents)
        .map(|cents| cents.saturating_mul(MICRO_PER_CENT))
}

/// Caps a `POST /v1/sessions` body's spend ceiling at the tenant's `remaining_microdollars`
/// (from [`crate::limits::remaining_microdollars`]): sets or lowers `budget` to
/// `{"type":"limit","max_list_cost":{"amount":"<cents>","currency":"USD"}}` with cents =
/// floor(µ$ / 10 000). A client budget already at or below that is kept as sent (never
/// raised); an absent, `null` or unreadable one (other type or currency, non-integer amount)
/// is replaced, since the gateway cannot tell it is lower. Returns whether the body changed.
/// A non-object body is left to the upstream to refuse. Less than a cent left gives `"0"`
/// (rounding never grants money); the upstream stops such a session at once, and
/// [`crate::limits::check_budget`] normally refuses the call before it gets here.
///
/// Note: the upstream refuses budgets on sessions whose models have no public list price
/// (`model_not_budgetable`), so a tenant with a cost budget can only run priced models.
pub fn clamp_session_budget(body: &mut Value, remaining_microdollars: u64) -> bool {
    let Some(fields) = body.as_object_mut() else {
        return false;
    };
    let cents = remaining_microdollars / MICRO_PER_CENT;
    if fields
        .get("budget")
        .and_then(budget_cents)
        .is_some_and(|sent| sent <= cents)
    {
        return false;
    }
    fields.insert(
        "budget".into(),
        json!({"type": "limit", "max_list_cost": {"amount": cents.to_string(), "currency": "USD"}}),
    );
    true
}

/// The same cap for `POST /v1/sessions/{id}` (session update), where a budget is cumulative
/// over the session's life: `ceiling_microdollars` should be the session's list cost so far
/// plus the tenant's remaining money (the gateway uses the spend it has seen on the session's
/// reservation plus what is left unreserved, see [`crate::limits::reserve_session_budget`]). An omitted `budget` keeps the session's (capped) one and
/// is left alone; `null` would remove the cap and is refused with 403; any other value is
/// capped like [`clamp_session_budget`]. Returns whether the body changed.
pub fn clamp_session_budget_update(
    body: &mut Value,
    ceiling_microdollars: u64,
) -> Result<bool, ApiError> {
    match body.get("budget") {
        None => Ok(false),
        Some(Value::Null) => Err(refuse(
            "a session budget cannot be removed while the tenant has a cost budget".into(),
        )),
        Some(_) => Ok(clamp_session_budget(body, ceiling_microdollars)),
    }
}

/// The same cap for a deployment create or update (`POST /v1/deployments[/{id}]`), whose
/// `budget` is copied to every session it fires (sessions the gateway never sees): each fired
/// session may spend at most what the tenant has left now, `remaining_microdollars`. A create
/// without a readable budget gets one; an update that omits `budget` keeps the deployment's
/// (capped) one, and `null` would remove the cap and is refused with 403. Returns whether the
/// body changed.
pub fn clamp_deployment_budget(
    body: &mut Value,
    remaining_microdollars: u64,
    create: bool,
    tenant: &str,
) -> Result<bool, ApiError> {
    match body.get("budget") {
        None if !create => Ok(false),
        Some(Value::Null) if !create => Err(refuse(format!(
            "a deployment budget cannot be removed while tenant {tenant} has a cost budget (every session it fires copies it)"
        ))),
        _ => Ok(clamp_session_budget(body, remaining_microdollars)),
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// Compiles the `policy` config object (shape in the module doc). `path` prefixes every
/// error: `policy.tenants.acme.models.allow[0]: …`.
pub fn rules_from_json(value: &Value, path: &str) -> Result<PolicyRules, String> {
    let root = object(value, path, &["tenants"])?;
    let mut tenants = BTreeMap::new();
    if let Some(v) = root.get("tenants") {
        let at = join(path, "tenants");
        let Value::Object(map) = v else {
            return Err(format!("{at}: expected an object, found {}", type_name(v)));
        };
        for (name, entry) in map {
            if name != "*" && !valid_name(name) {
                return Err(format!(
                    "{at}: invalid tenant name {name:?} (expected [A-Za-z0-9_.-]+ or *)"
                ));
            }
            tenants.insert(name.clone(), parse_tenant(entry, &join(&at, name))?);
        }
    }
    Ok(PolicyRules { tenants })
}

fn parse_tenant(value: &Value, path: &str) -> Result<TenantPolicy, String> {
    let fields = object(
        value,
        path,
        &[
            "models",
            "fast_mode",
            "inference_geo",
            "multiagent",
            "execution_identity",
            "deployments",
            "tools",
            "mcp_servers",
            "environments",
            "vaults",
            "max_body_bytes",
        ],
    )?;
    let mut policy = TenantPolicy::default();
    if let Some(v) = fields.get("models") {
        policy.models = parse_names(v, &join(path, "models"), any_pattern)?;
    }
    if let Some(b) = fields.get("fast_mode") {
        policy.fast_mode = boolean(b, &join(path, "fast_mode"))?;
    }
    if let Some(v) = fields.get("inference_geo") {
        policy.inference_geo = parse_names(v, &join(path, "inference_geo"), any_pattern)?;
    }
    if let Some(v) = fields.get("multiagent") {
        let at = join(path, "multiagent");
        let multi = object(v, &at, &["subagents", "workflows", "inline_agents"])?;
        let rules = &mut policy.multiagent;
        for (key, slot) in [
            ("subagents", &mut rules.subagents),
            ("workflows", &mut rules.workflows),
            ("inline_agents", &mut rules.inline_agents),
        ] {
            if let Some(b) = multi.get(key) {
                *slot = boolean(b, &join(&at, key))?;
            }
        }
    }
    if let Some(v) = fields.get("execution_identity") {
        let at = join(path, "execution_identity");
        let identity = object(v, &at, &["allow", "role_arns"])?;
        policy.execution_identity = IdentityRules {
            allow: identity
                .get("allow")
                .map(|v| patterns(v, &join(&at, "allow"), any_pattern))
                .transpose()?,
            role_arns: identity
                .get("role_arns")
                .map(|v| patterns(v, &join(&at, "role_arns"), any_pattern))
                .transpose()?,
        };
    }
    if let Some(v) = fields.get("deployments") {
        let at = join(path, "deployments");
        let deployments = object(v, &at, &["schedules"])?;
        if let Some(b) = deployments.get("schedules") {
            policy.deployment_schedules = boolean(b, &join(&at, "schedules"))?;
        }
    }
    if let Some(v) = fields.get("tools") {
        policy.tools = parse_names(v, &join(path, "tools"), any_pattern)?;
    }
    if let Some(v) = fields.get("mcp_servers") {
        let at = join(path, "mcp_servers");
        let mcp = object(v, &at, &["allow_urls"])?;
        if let Some(list) = mcp.get("allow_urls") {
            policy.mcp_allow_urls = Some(patterns(list, &join(&at, "allow_urls"), url_pattern)?);
        }
    }
    if let Some(v) = fields.get("environments") {
        let at = join(path, "environments");
        let env = object(
            v,
            &at,
            &[
                "forbid_unrestricted",
                "allowed_hosts",
                "allow_package_managers",
            ],
        )?;
        if let Some(b) = env.get("forbid_unrestricted") {
            policy.environments.forbid_unrestricted =
                boolean(b, &join(&at, "forbid_unrestricted"))?;
        }
        if let Some(b) = env.get("allow_package_managers") {
            policy.environments.allow_package_managers =
                boolean(b, &join(&at, "allow_package_managers"))?;
        }
        if let Some(list) = env.get("allowed_hosts") {
            let hosts = patterns(list, &join(&at, "allowed_hosts"), host_pattern)?;
            policy.environments.allowed_hosts =
                Some(hosts.iter().map(|h| h.to_ascii_lowercase()).collect());
        }
    }
    if let Some(b) = fields.get("vaults") {
        policy.vaults = boolean(b, &join(path, "vaults"))?;
    }
    if let Some(n) = fields.get("max_body_bytes") {
        let at = join(path, "max_body_bytes");
        policy.max_body_bytes = Some(match n {
            Value::Number(num) => match num.as_u64() {
                Some(v) if (1..=MAX_BODY_BYTES).contains(&v) => v,
                _ => {
                    return Err(format!(
                        "{at}: expected an integer from 1 to {MAX_BODY_BYTES}, found {num}"
                    ))
                }
            },
            other => {
                return Err(format!(
                    "{at}: expected an integer, found {}",
                    type_name(other)
                ))
            }
        });
    }
    Ok(policy)
}

fn parse_names(value: &Value, path: &str, valid: fn(&str) -> bool) -> Result<NameRules, String> {
    let fields = object(value, path, &["allow", "deny"])?;
    Ok(NameRules {
        allow: fields
            .get("allow")
            .map(|v| patterns(v, &join(path, "allow"), valid))
            .transpose()?,
        deny: fields
            .get("deny")
            .map(|v| patterns(v, &join(path, "deny"), valid))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// An array of patterns, each non-empty, at most 256 bytes, without control characters or
/// whitespace, and accepted by `valid`.
fn patterns(value: &Value, path: &str, valid: fn(&str) -> bool) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "{path}: expected an array, found {}",
            type_name(value)
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::String(text) = item else {
            return Err(format!(
                "{path}[{i}]: expected a string, found {}",
                type_name(item)
            ));
        };
        let clean = !text.is_empty()
            && text.len() <= 256
            && !text.chars().any(|c| c.is_control() || c.is_whitespace());
        if !clean || !valid(text) {
            return Err(format!("{path}[{i}]: invalid pattern {text:?}"));
        }
        out.push(text.clone());
    }
    Ok(out)
}

fn any_pattern(_: &str) -> bool {
    true
}

/// `scheme://authority…` with a non-empty authority.
fn url_pattern(text: &str) -> bool {
    split_url(text).is_some_and(|(scheme, authority, _)| {
        !scheme.is_empty()
            && scheme.bytes().all(|b| b.is_ascii_alphabetic())
            && !authority.is_empty()
    })
}

/// Host characters plus `*`.
fn host_pattern(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*'))
}

fn boolean(value: &Value, path: &str) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        other => Err(format!(
            "{path}: expected true or false, found {}",
            type_name(other)
        )),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// An object whose keys must all be `known`; the first unknown one (in key order) is the error.
fn object<'a>(
    value: &'a Value,
    path: &str,
    known: &[&str],
) -> Result<&'a Map<String, Value>, String> {
    let Value::Object(map) = value else {
        let shown = if path.is_empty() { "(root)" } else { path };
        return Err(format!(
            "{shown}: expected an object, found {}",
            type_name(value)
        ));
    };
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(format!("{}: unknown field", join(path, unknown))),
        None => Ok(map),
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use serde_json::json;

    use super::*;
    use crate::routes::IdKind;

    fn op(family: Family, action: Action) -> Operation {
        Operation {
            family,
            action,
            ids: vec![],
        }
    }

    fn rules(tenant_policy: Value) -> PolicyRules {
        rules_from_json(&json!({"tenants": {"acme": tenant_policy}}), "policy").unwrap()
    }

    /// The refusal's status and message, for exact comparisons.
    fn refusal(rules: &PolicyRules, family: Family, action: Action, body: Value) -> (u32, String) {
        let error = check(rules, "acme", &op(family, action), &body).unwrap_err();
        (error.status(), error.message)
    }

    fn passes(rules: &PolicyRules, family: Family, action: Action, body: Value) {
        assert_eq!(
            check(rules, "acme", &op(family, action), &body),
            Ok(()),
            "{body}"
        );
    }

    // ---- matching ----

    #[test]
    fn glob_star_is_the_only_wildcard() {
        let table = [
            ("claude-sonnet-4-*", "claude-sonnet-4-6", true),
            ("claude-sonnet-4-*", "claude-sonnet-4-", true),
            ("claude-sonnet-4-*", "claude-sonnet-5", false),
            ("claude-sonnet-4-*", "xclaude-sonnet-4-6", false),
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "a", false),
            ("bash", "bash", true),
            ("bash", "bash2", false),
            ("*.internal.example", "a.internal.example", true),
            ("*.internal.example", "a.b.internal.example", true),
            ("*.internal.example", "internal.example", false),
            ("*.internal.example", "evil.example", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            (
                "*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
            ("*-fast", "claude-opus-4-6-fast", true),
            ("?", "a", false),
            ("[ab]", "a", false),
            ("custom:*", "custom:lookup", true),
            ("mcp:*", "custom:lookup", false),
        ];
        for (pattern, text, expected) in table {
            assert_eq!(glob_match(pattern, text), expected, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn url_patterns_keep_host_and_path_apart() {
        let table = [
            ("https://mcp.internal/*", "https://mcp.internal/sse", true),
            ("https://mcp.internal/*", "https://mcp.internal/", true),
            ("https://mcp.internal/*", "HTTPS://MCP.Internal/sse", true),
            ("https://mcp.internal/*", "https://mcp.internal", false),
            (
                "https://mcp.internal/*",
                "https://mcp.internal.evil.com/x",
                false,
            ),
            ("https://mcp.internal/*", "http://mcp.internal/x", false),
            (
                "https://mcp.internal/*",
                "https://mcp.internal@evil.com/x",
                false,
            ),
            (
                "https://mcp.internal/*",
                "https://mcp.internal:8443/x",
                false,
            ),
            (
                "https://mcp.internal:*/*",
                "https://mcp.internal:8443/x",
                true,
            ),
            (
                "https://*.internal",
                "https://a.internal/any/path?q=1",
                true,
            ),
            ("https://*.internal", "https://evil.com/.internal", false),
            (
                "https://*.internal/*",
                "https://evil.com/x.internal/y",
                false,
            ),
            ("https://*.internal", "https://user@a.internal/", false),
            (
                "https://*.internal",
                "https://a.internal\\@evil.com/",
                false,
            ),
            (
                "https://mcp.internal/v1/*",
                "https://mcp.internal/v2/x",
                false,
            ),
            (
                "https://mcp.internal/v1/*",
                "https://mcp.internal/v1/x",
                true,
            ),
            ("https://mcp.internal/*", "mcp.internal/x", false),
            ("https://*", "https:///x", false),
        ];
        for (pattern, url, expected) in table {
            assert_eq!(url_match(pattern, url), expected, "{pattern} ~ {url}");
        }
    }

    // ---- config ----

    #[test]
    fn full_config_compiles() {
        let rules = rules_from_json(
            &json!({"tenants": {
                "acme": {
                    "models": {"allow": ["claude-sonnet-4-*"], "deny": ["*-fast"]},
                    "tools": {"deny": ["bash", "web_fetch"], "allow": ["read", "custom:*"]},
                    "mcp_servers": {"allow_urls": ["https://mcp.internal/*"]},
                    "environments": {"forbid_unrestricted": true,
                                     "allowed_hosts": ["*.Internal.Example"],
                                     "allow_package_managers": false},
                    "vaults": false,
                    "max_body_bytes": 65536,
                    "fast_mode": false,
                    "inference_geo": {"allow": ["us", "default"], "deny": ["eu"]},
                    "multiagent": {"subagents": false, "workflows": false, "inline_agents": false},
                    "execution_identity": {"allow": ["aws_role"],
                                           "role_arns": ["arn:aws:iam::1:role/*"]},
                    "deployments": {"schedules": false}
                },
                "*": {"vaults": false}
            }}),
            "policy",
        )
        .unwrap();
        let acme = TenantPolicy {
            models: NameRules {
                allow: Some(vec!["claude-sonnet-4-*".into()]),
                deny: vec!["*-fast".into()],
            },
            tools: NameRules {
                allow: Some(vec!["read".into(), "custom:*".into()]),
                deny: vec!["bash".into(), "web_fetch".into()],
            },
            mcp_allow_urls: Some(vec!["https://mcp.internal/*".into()]),
            environments: EnvironmentRules {
                forbid_unrestricted: true,
                allowed_hosts: Some(vec!["*.internal.example".into()]),
                allow_package_managers: false,
            },
            vaults: false,
            max_body_bytes: Some(65_536),
            fast_mode: false,
            inference_geo: NameRules {
                allow: Some(vec!["us".into(), "default".into()]),
                deny: vec!["eu".into()],
            },
            multiagent: MultiagentRules {
                subagents: false,
                workflows: false,
                inline_agents: false,
            },
            execution_identity: IdentityRules {
                allow: Some(vec!["aws_role".into()]),
                role_arns: Some(vec!["arn:aws:iam::1:role/*".into()]),
            },
            deployment_schedules: false,
        };
        assert_eq!(rules.for_tenant("acme"), Some(&acme));
        let default = TenantPolicy {
            vaults: false,
            ..TenantPolicy::default()
        };
        assert_eq!(rules.for_tenant("other"), Some(&default));
        assert_eq!(
            rules_from_json(&json!({}), "policy").unwrap(),
            PolicyRules::default()
        );
        assert_eq!(PolicyRules::default().for_tenant("acme"), None);
    }

    #[test]
    fn config_errors_name_the_field_path() {
        let err = |v: Value| rules_from_json(&v, "policy").unwrap_err();
        let table = [
            (json!("x"), "policy: expected an object, found a string"),
            (json!({"tenant": {}}), "policy.tenant: unknown field"),
            (json!({"tenants": []}), "policy.tenants: expected an object, found an array"),
            (
                json!({"tenants": {"a b": {}}}),
                "policy.tenants: invalid tenant name \"a b\" (expected [A-Za-z0-9_.-]+ or *)",
            ),
            (json!({"tenants": {"acme": 1}}), "policy.tenants.acme: expected an object, found a number"),
            (json!({"tenants": {"acme": {"model": {}}}}), "policy.tenants.acme.model: unknown field"),
            (
                json!({"tenants": {"acme": {"models": {"allowed": []}}}}),
                "policy.tenants.acme.models.allowed: unknown field",
            ),
            (
                json!({"tenants": {"acme": {"models": {"allow": "claude-*"}}}}),
                "policy.tenants.acme.models.allow: expected an array, found a string",
            ),
            (
                json!({"tenants": {"acme": {"models": {"allow": [1]}}}}),
                "policy.tenants.acme.models.allow[0]: expected a string, found a number",
            ),
            (
                json!({"tenants": {"acme": {"tools": {"deny": ["bash", ""]}}}}),
                "policy.tenants.acme.tools.deny[1]: invalid pattern \"\"",
            ),
            (
                json!({"tenants": {"acme": {"tools": {"deny": ["ba sh"]}}}}),
                "policy.tenants.acme.tools.deny[0]: invalid pattern \"ba sh\"",
            ),
            (
                json!({"tenants": {"acme": {"mcp_servers": {"allow_urls": ["mcp.internal/*"]}}}}),
                "policy.tenants.acme.mcp_servers.allow_urls[0]: invalid pattern \"mcp.internal/*\"",
            ),
            (
                json!({"tenants": {"acme": {"mcp_servers": {"allow_urls": ["https:///x"]}}}}),
                "policy.tenants.acme.mcp_servers.allow_urls[0]: invalid pattern \"https:///x\"",
            ),
            (
                json!({"tenants": {"acme": {"mcp_servers": {"urls": []}}}}),
                "policy.tenants.acme.mcp_servers.urls: unknown field",
            ),
            (
                json!({"tenants": {"acme": {"environments": {"forbid_unrestricted": "yes"}}}}),
                "policy.tenants.acme.environments.forbid_unrestricted: expected true or false, found a string",
            ),
            (
                json!({"tenants": {"acme": {"environments": {"allowed_hosts": ["https://x"]}}}}),
                "policy.tenants.acme.environments.allowed_hosts[0]: invalid pattern \"https://x\"",
            ),
            (
                json!({"tenants": {"acme": {"environments": {"allow_package_managers": 0}}}}),
                "policy.tenants.acme.environments.allow_package_managers: expected true or false, found a number",
            ),
            (
                json!({"tenants": {"acme": {"environments": {"hosts": []}}}}),
                "policy.tenants.acme.environments.hosts: unknown field",
            ),
            (
                json!({"tenants": {"acme": {"vaults": "no"}}}),
                "policy.tenants.acme.vaults: expected true or false, found a string",
            ),
            (
                json!({"tenants": {"acme": {"max_body_bytes": 0}}}),
                "policy.tenants.acme.max_body_bytes: expected an integer from 1 to 67108864, found 0",
            ),
            (
                json!({"tenants": {"acme": {"max_body_bytes": "64k"}}}),
                "policy.tenants.acme.max_body_bytes: expected an integer, found a string",
            ),
            (
                json!({"tenants": {"acme": {"fast_mode": "off"}}}),
                "policy.tenants.acme.fast_mode: expected true or false, found a string",
            ),
            (
                json!({"tenants": {"acme": {"inference_geo": {"allow": "us"}}}}),
                "policy.tenants.acme.inference_geo.allow: expected an array, found a string",
            ),
            (
                json!({"tenants": {"acme": {"inference_geo": {"allow": [""]}}}}),
                "policy.tenants.acme.inference_geo.allow[0]: invalid pattern \"\"",
            ),
            (
                json!({"tenants": {"acme": {"multiagent": {"advisor": false}}}}),
                "policy.tenants.acme.multiagent.advisor: unknown field",
            ),
            (
                json!({"tenants": {"acme": {"multiagent": {"inline_agents": 0}}}}),
                "policy.tenants.acme.multiagent.inline_agents: expected true or false, found a number",
            ),
            (
                json!({"tenants": {"acme": {"execution_identity": {"types": []}}}}),
                "policy.tenants.acme.execution_identity.types: unknown field",
            ),
            (
                json!({"tenants": {"acme": {"execution_identity": {"role_arns": [1]}}}}),
                "policy.tenants.acme.execution_identity.role_arns[0]: expected a string, found a number",
            ),
            (
                json!({"tenants": {"acme": {"deployments": []}}}),
                "policy.tenants.acme.deployments: expected an object, found an array",
            ),
            (
                json!({"tenants": {"acme": {"deployments": {"schedules": null}}}}),
                "policy.tenants.acme.deployments.schedules: expected true or false, found null",
            ),
        ];
        for (value, expected) in table {
            assert_eq!(err(value.clone()), expected, "{value}");
        }
        assert_eq!(
            rules_from_json(&json!(null), "").unwrap_err(),
            "(root): expected an object, found null"
        );
    }

    // ---- models ----

    #[test]
    fn models_must_be_allowed_wherever_the_body_names_one() {
        let r = rules(
            json!({"models": {"allow": ["claude-sonnet-4-*", "claude-haiku-4-5"],
                                        "deny": ["*-fast"]}}),
        );
        let not_allowed = |model: &str| {
            (
                403,
                format!(
                    "policy: model {model} is not allowed for tenant acme (allowed: claude-sonnet-4-*, claude-haiku-4-5)"
                ),
            )
        };
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"name": "a", "model": "claude-sonnet-4-6"}),
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"model": {"id": "claude-haiku-4-5", "speed": "fast"}}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": "claude-opus-4-6"})
            ),
            not_allowed("claude-opus-4-6")
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Update,
                json!({"model": {"id": "claude-opus-4-6"}})
            ),
            not_allowed("claude-opus-4-6")
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": "claude-sonnet-4-6-fast"})
            ),
            (
                403,
                "policy: model claude-sonnet-4-6-fast is denied for tenant acme (denied: *-fast)"
                    .into()
            )
        );
        // An update that does not touch the model passes.
        passes(
            &r,
            Family::Agents,
            Action::Update,
            json!({"version": 3, "system": "hi"}),
        );
        // Multi-agent advisors name models too.
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": "claude-sonnet-4-6",
                       "multiagent": {"type": "multiagent_20261001",
                                      "advisor": {"type": "enabled", "model": "claude-opus-4-8"}}})
            ),
            not_allowed("claude-opus-4-8")
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": "claude-sonnet-4-6",
                       "multiagent": {"type": "coordinator",
                                      "agents": ["agent_1", {"type": "self"},
                                                 {"type": "advisor", "model": "claude-opus-5"}]}})
            ),
            not_allowed("claude-opus-5")
        );
        // Malformed model fields are the client's mistake: 400.
        assert_eq!(
            refusal(&r, Family::Agents, Action::Create, json!({"model": 5})),
            (
                400,
                "policy: model must be a model id string or an object with an id".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": {"speed": "fast"}})
            ),
            (400, "policy: model.id must be a model id string".into())
        );
        // Echoed names are bounded and control characters masked.
        let long = format!("x\n{}", "y".repeat(300));
        let (_, message) = refusal(&r, Family::Agents, Action::Create, json!({"model": long}));
        assert!(message.starts_with(&format!(
            "policy: model x?{}… is not allowed",
            "y".repeat(118)
        )));
    }

    #[test]
    fn an_empty_allow_list_admits_nothing() {
        let r = rules(json!({"models": {"allow": []}}));
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": "claude-haiku-4-5"})
            ),
            (
                403,
                "policy: model claude-haiku-4-5 is not allowed for tenant acme (allowed: none)"
                    .into()
            )
        );
    }

    // ---- tools ----

    #[test]
    fn a_denied_builtin_must_be_disabled_explicitly() {
        let r = rules(json!({"tools": {"deny": ["bash", "web_fetch"]}}));
        // The toolset enables every built-in by default, bash included.
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": "m", "tools": [{"type": "agent_toolset_20260401"}]})
            ),
            (
                403,
                "policy: tool bash is denied for tenant acme (denied: bash, web_fetch); agent_toolset_20260401 enables it by default: add {\"name\":\"bash\",\"enabled\":false} to its configs".into()
            )
        );
        // Explicitly enabled: no hint.
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"tools": [{"type": "agent_toolset_20260401",
                                  "default_config": {"enabled": false},
                                  "configs": [{"name": "read", "enabled": true},
                                              {"name": "web_fetch", "enabled": true}]}]})
            ),
            (
                403,
                "policy: tool web_fetch is denied for tenant acme (denied: bash, web_fetch)".into()
            )
        );
        // Both denied tools disabled: passes.
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"tools": [{"type": "agent_toolset_20260401",
                              "configs": [{"name": "bash", "enabled": false},
                                          {"name": "web_fetch", "enabled": false,
                                           "permission_policy": {"type": "always_ask"}}]}]}),
        );
        // Default off, nothing enabled by name (a config without `enabled` follows the default).
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"tools": [{"type": "agent_toolset_20260401",
                              "default_config": {"enabled": false},
                              "configs": [{"name": "bash"}, {"name": "read", "enabled": true}]}]}),
        );
        // The last config for a name wins.
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Update,
                json!({"tools": [{"type": "agent_toolset_20260401",
                                  "default_config": {"enabled": false},
                                  "configs": [{"name": "bash", "enabled": false},
                                              {"name": "bash", "enabled": true}]}]})
            )
            .1,
            "policy: tool bash is denied for tenant acme (denied: bash, web_fetch)"
        );
        // No tools at all, or an update leaving them alone: passes.
        passes(&r, Family::Agents, Action::Create, json!({"model": "m"}));
        passes(&r, Family::Agents, Action::Create, json!({"tools": []}));
    }

    #[test]
    fn an_allow_list_covers_builtins_custom_tools_and_mcp_toolsets() {
        let r = rules(json!({"tools": {"allow": ["read", "grep", "custom:*"]}}));
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"tools": [{"type": "agent_toolset_20260401",
                                  "configs": [{"name": "bash", "enabled": false}]}]})
            )
            .1,
            "policy: tool edit is not allowed for tenant acme (allowed: read, grep, custom:*); agent_toolset_20260401 enables it by default: add {\"name\":\"edit\",\"enabled\":false} to its configs"
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"tools": [
                {"type": "agent_toolset_20260401", "default_config": {"enabled": false},
                 "configs": [{"name": "read", "enabled": true}, {"name": "grep", "enabled": true}]},
                {"type": "custom", "name": "lookup", "description": "d", "input_schema": {}}]}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"tools": [{"type": "mcp_toolset", "mcp_server_name": "docs"}]})
            )
            .1,
            "policy: tool mcp:docs is not allowed for tenant acme (allowed: read, grep, custom:*)"
        );
        let with_mcp = rules(json!({"tools": {"allow": ["mcp:docs"]}}));
        passes(
            &with_mcp,
            Family::Agents,
            Action::Create,
            json!({"tools": [{"type": "mcp_toolset", "mcp_server_name": "docs"}]}),
        );
        assert_eq!(
            refusal(
                &with_mcp,
                Family::Agents,
                Action::Create,
                json!({"tools": [{"type": "custom", "name": "lookup"}]})
            )
            .1,
            "policy: tool custom:lookup is not allowed for tenant acme (allowed: mcp:docs)"
        );
    }

    #[test]
    fn tools_the_gateway_cannot_read_are_refused_while_tool_rules_are_set() {
        let r = rules(json!({"tools": {"deny": ["bash"]}}));
        let create =
            |tools: Value| refusal(&r, Family::Agents, Action::Create, json!({"tools": tools}));
        assert_eq!(
            create(json!([{"type": "agent_toolset_20270101"}])),
            (
                403,
                "policy: tool set agent_toolset_20270101 is not known to the gateway, so the tools it enables by default cannot be checked; set default_config.enabled to false and enable tools by name".into()
            )
        );
        // A newer toolset with everything off by default is fully known.
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"tools": [{"type": "agent_toolset_20270101", "default_config": {"enabled": false},
                              "configs": [{"name": "computer", "enabled": true}]}]}),
        );
        assert_eq!(
            create(json!([{"type": "browser_2027"}])),
            (
                403,
                "policy: tool type browser_2027 is not known to the gateway (tools[0])".into()
            )
        );
        assert_eq!(
            create(json!("bash")),
            (400, "policy: tools must be an array".into())
        );
        assert_eq!(
            create(json!([1])),
            (400, "policy: tools[0] must be an object".into())
        );
        assert_eq!(
            create(json!([{}])),
            (400, "policy: tools[0].type must be a string".into())
        );
        assert_eq!(
            create(json!([{"type": "custom"}])),
            (400, "policy: tools[0].name must be a string".into())
        );
        assert_eq!(
            create(json!([{"type": "mcp_toolset"}])),
            (
                400,
                "policy: tools[0].mcp_server_name must be a string".into()
            )
        );
        assert_eq!(
            create(
                json!([{"type": "agent_toolset_20260401", "default_config": {"enabled": "no"}}])
            ),
            (
                400,
                "policy: tools[0].default_config.enabled must be true or false".into()
            )
        );
        assert_eq!(
            create(json!([{"type": "agent_toolset_20260401", "default_config": true}])),
            (
                400,
                "policy: tools[0].default_config must be an object".into()
            )
        );
        assert_eq!(
            create(json!([{"type": "agent_toolset_20260401", "configs": {}}])),
            (400, "policy: tools[0].configs must be an array".into())
        );
        assert_eq!(
            create(json!([{"type": "agent_toolset_20260401", "configs": [{"enabled": false}]}])),
            (
                400,
                "policy: tools[0].configs[0].name must be a string".into()
            )
        );
        assert_eq!(
            create(
                json!([{"type": "agent_toolset_20260401", "configs": [{"name": "bash", "enabled": 0}]}])
            ),
            (
                400,
                "policy: tools[0].configs[0].enabled must be true or false".into()
            )
        );
        // Without tool rules nothing about tools is inspected.
        let none = rules(json!({}));
        passes(
            &none,
            Family::Agents,
            Action::Create,
            json!({"tools": [{"type": "browser_2027"}, 1]}),
        );
    }

    // ---- MCP servers ----

    #[test]
    fn mcp_server_urls_must_match_an_allowed_pattern() {
        let r = rules(json!({"mcp_servers": {"allow_urls": ["https://mcp.internal/*"]}}));
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"mcp_servers": [{"type": "url", "name": "docs", "url": "https://mcp.internal/sse"}]}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"mcp_servers": [
                    {"type": "url", "name": "docs", "url": "https://mcp.internal/sse"},
                    {"type": "url", "name": "x", "url": "https://evil.example/mcp"}]})
            ),
            (
                403,
                "policy: MCP server url https://evil.example/mcp is not allowed for tenant acme (allowed: https://mcp.internal/*)".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"mcp_servers": [{"type": "stdio", "name": "x"}]})
            ),
            (
                403,
                "policy: MCP server type stdio is not known to the gateway (mcp_servers[0]); only \"url\" servers can be checked".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"mcp_servers": [{"type": "url"}]})
            ),
            (400, "policy: mcp_servers[0].url must be a string".into())
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"mcp_servers": {}})
            ),
            (400, "policy: mcp_servers must be an array".into())
        );
    }

    // ---- sessions ----

    #[test]
    fn session_overrides_and_updates_are_checked_like_agents() {
        let r = rules(json!({
            "models": {"allow": ["claude-sonnet-4-*"]},
            "tools": {"deny": ["bash"]},
            "mcp_servers": {"allow_urls": ["https://mcp.internal/*"]}}));
        // A plain reference carries nothing to check.
        passes(
            &r,
            Family::Sessions,
            Action::Create,
            json!({"agent": "agent_1", "environment_id": "env_1"}),
        );
        passes(
            &r,
            Family::Sessions,
            Action::Create,
            json!({"agent": {"type": "agent", "id": "agent_1", "version": 2}}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Create,
                json!({"agent": {"type": "agent_with_overrides", "id": "agent_1",
                                 "model": "claude-opus-4-6"}})
            ),
            (
                403,
                "policy: model claude-opus-4-6 is not allowed for tenant acme (allowed: claude-sonnet-4-*)".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Create,
                json!({"agent": {"type": "agent_with_overrides", "id": "agent_1", "model": 1}})
            ),
            (
                400,
                "policy: agent.model must be a model id string or an object with an id".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Create,
                json!({"agent": {"type": "agent_with_overrides", "id": "agent_1",
                                 "tools": [{"type": "custom", "name": "x"}, "bad"]}})
            ),
            (400, "policy: agent.tools[1] must be an object".into())
        );
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Update,
                json!({"agent": {"tools": [{"type": "agent_toolset_20260401"}]}})
            )
            .1,
            "policy: tool bash is denied for tenant acme (denied: bash); agent_toolset_20260401 enables it by default: add {\"name\":\"bash\",\"enabled\":false} to its configs"
        );
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Update,
                json!({"agent": {"mcp_servers": [{"type": "url", "name": "e", "url": "https://e.example/"}]}})
            )
            .1,
            "policy: MCP server url https://e.example/ is not allowed for tenant acme (allowed: https://mcp.internal/*)"
        );
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Update,
                json!({"agent": {"mcp_servers": "x"}})
            ),
            (400, "policy: agent.mcp_servers must be an array".into())
        );
        // A model in a session update is checked like a create's override, whether or not
        // the upstream would apply it.
        assert_eq!(
            refusal(
                &r,
                Family::Sessions,
                Action::Update,
                json!({"title": "t", "agent": {"model": "claude-opus-4-6"}})
            ),
            (
                403,
                "policy: model claude-opus-4-6 is not allowed for tenant acme (allowed: claude-sonnet-4-*)".into()
            )
        );
        passes(
            &r,
            Family::Sessions,
            Action::Update,
            json!({"title": "t", "agent": {"model": "claude-sonnet-4-6"}}),
        );
    }

    // ---- environments ----

    #[test]
    fn unrestricted_networking_is_forbidden_when_configured() {
        let r = rules(json!({"environments": {"forbid_unrestricted": true}}));
        let create = |body: Value| refusal(&r, Family::Environments, Action::Create, body);
        assert_eq!(
            create(json!({"name": "e", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})),
            (
                403,
                "policy: unrestricted networking is forbidden for tenant acme; use {\"type\":\"limited\",\"allowed_hosts\":[…]}".into()
            )
        );
        let implicit = (
            403,
            "policy: environments of tenant acme need explicit limited networking (config.networking {\"type\":\"limited\",\"allowed_hosts\":[…]}): unrestricted networking is forbidden".to_string(),
        );
        assert_eq!(create(json!({"name": "e"})), implicit);
        assert_eq!(create(json!({"name": "e", "config": null})), implicit);
        assert_eq!(
            create(json!({"name": "e", "config": {"type": "cloud"}})),
            implicit
        );
        assert_eq!(
            create(json!({"config": {"type": "cloud", "networking": null}})),
            implicit
        );
        passes(
            &r,
            Family::Environments,
            Action::Create,
            json!({"name": "e", "config": {"type": "cloud",
                   "networking": {"type": "limited", "allowed_hosts": ["anything.example"],
                                  "allow_package_managers": true}}}),
        );
        passes(
            &r,
            Family::Environments,
            Action::Create,
            json!({"config": {"type": "self_hosted"}}),
        );
        // Updates that leave the config or its networking out keep the checked ones.
        passes(
            &r,
            Family::Environments,
            Action::Update,
            json!({"name": "renamed"}),
        );
        passes(
            &r,
            Family::Environments,
            Action::Update,
            json!({"config": {"type": "cloud", "packages": {}}}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Update,
                json!({"config": null})
            ),
            implicit
        );
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Update,
                json!({"config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
            )
            .1,
            "policy: unrestricted networking is forbidden for tenant acme; use {\"type\":\"limited\",\"allowed_hosts\":[…]}"
        );
        assert_eq!(
            create(json!({"config": {"type": "gpu"}})),
            (
                403,
                "policy: environment config type gpu is not known to the gateway".into()
            )
        );
        assert_eq!(
            create(json!({"config": {"type": "cloud", "networking": {"type": "vpn"}}})),
            (
                403,
                "policy: networking type vpn is not known to the gateway".into()
            )
        );
        assert_eq!(
            create(json!({"config": {"networking": {"type": "limited"}}})),
            (
                403,
                "policy: environment config type (missing) is not known to the gateway".into()
            )
        );
        assert_eq!(
            create(json!({"config": "cloud"})),
            (400, "policy: config must be an object".into())
        );
        assert_eq!(
            create(json!({"config": {"type": "cloud", "networking": "limited"}})),
            (400, "policy: config.networking must be an object".into())
        );
        // Without environment rules anything goes.
        let none = rules(json!({"vaults": true}));
        passes(
            &none,
            Family::Environments,
            Action::Create,
            json!({"config": {"type": "cloud", "networking": {"type": "unrestricted"}}}),
        );
    }

    #[test]
    fn allowed_hosts_must_each_match_and_imply_limited_networking() {
        let r =
            rules(json!({"environments": {"allowed_hosts": ["*.Internal.Example", "pypi.org"]}}));
        let limited = |hosts: Value| json!({"config": {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": hosts}}});
        passes(
            &r,
            Family::Environments,
            Action::Create,
            limited(json!(["api.internal.example", "PyPI.org"])),
        );
        passes(
            &r,
            Family::Environments,
            Action::Create,
            limited(json!(["*.svc.internal.example"])),
        );
        passes(&r, Family::Environments, Action::Create, limited(json!([])));
        assert_eq!(
            refusal(&r, Family::Environments, Action::Create, limited(json!(["api.internal.example", "evil.com"]))),
            (
                403,
                "policy: allowed host evil.com is not allowed for tenant acme (allowed: *.internal.example, pypi.org)".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Create,
                limited(json!(["*"]))
            )
            .1,
            "policy: allowed host * is not a plain host name"
        );
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Create,
                limited(json!(["evil.com/.internal.example"]))
            )
            .1,
            "policy: allowed host evil.com/.internal.example is not a plain host name"
        );
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Create,
                limited(json!([7]))
            ),
            (
                400,
                "policy: config.networking.allowed_hosts[] must be a host name string".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Create,
                limited(json!("a.internal.example"))
            ),
            (
                400,
                "policy: config.networking.allowed_hosts must be an array of host names".into()
            )
        );
        // A host list means not every host: unrestricted is refused without forbid_unrestricted.
        assert_eq!(
            refusal(
                &r,
                Family::Environments,
                Action::Create,
                json!({"config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
            )
            .1,
            "policy: unrestricted networking is forbidden for tenant acme; use {\"type\":\"limited\",\"allowed_hosts\":[…]}"
        );
    }

    #[test]
    fn package_managers_can_be_forbidden() {
        let r = rules(json!({"environments": {"allow_package_managers": false}}));
        let body = |on: bool| {
            json!({"config": {"type": "cloud",
                              "networking": {"type": "limited", "allow_package_managers": on}}})
        };
        passes(&r, Family::Environments, Action::Create, body(false));
        assert_eq!(
            refusal(&r, Family::Environments, Action::Update, body(true)),
            (
                403,
                "policy: package manager access is forbidden for tenant acme (allow_package_managers)".into()
            )
        );
        assert!(check(
            &r,
            "acme",
            &op(Family::Environments, Action::Create),
            &json!({"config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
        )
        .is_err());
    }

    // ---- vaults, sizes, defaults ----

    #[test]
    fn vault_writes_are_refused_when_vaults_are_off() {
        let r = rules(json!({"vaults": false}));
        assert_eq!(
            refusal(&r, Family::Vaults, Action::Create, json!({"name": "v"})),
            (403, "policy: tenant acme may not create vaults".into())
        );
        for action in [Action::Create, Action::Update] {
            assert_eq!(
                refusal(
                    &r,
                    Family::VaultCredentials,
                    action,
                    json!({"token": "secret"})
                ),
                (
                    403,
                    "policy: tenant acme may not create or change vault credentials".into()
                )
            );
        }
        for (family, action) in [
            (Family::Vaults, Action::List),
            (Family::Vaults, Action::Read),
            (Family::Vaults, Action::Archive),
            (Family::Vaults, Action::Delete),
            (Family::VaultCredentials, Action::Delete),
            (Family::VaultCredentials, Action::Archive),
        ] {
            passes(&r, family, action, Value::Null);
        }
        let on = rules(json!({"vaults": true}));
        passes(&on, Family::Vaults, Action::Create, json!({"name": "v"}));
        passes(&on, Family::VaultCredentials, Action::Create, json!({}));
    }

    #[test]
    fn body_size_limit_is_per_tenant() {
        let r = rules_from_json(
            &json!({"tenants": {"acme": {"max_body_bytes": 65536}, "*": {"max_body_bytes": 1024}}}),
            "policy",
        )
        .unwrap();
        assert_eq!(check_body_size(&r, "acme", 65_536), Ok(()));
        let error = check_body_size(&r, "acme", 65_537).unwrap_err();
        assert_eq!(error.status(), 413);
        assert_eq!(error.kind.wire_name(), "request_too_large");
        assert_eq!(
            error.message,
            "policy: request body of 65537 bytes exceeds the 65536-byte limit for tenant acme"
        );
        assert_eq!(
            check_body_size(&r, "beta", 2_000).unwrap_err().message,
            "policy: request body of 2000 bytes exceeds the 1024-byte limit for tenant beta"
        );
        assert_eq!(
            check_body_size(&PolicyRules::default(), "acme", u64::MAX),
            Ok(())
        );
    }

    #[test]
    fn the_default_policy_applies_to_tenants_without_their_own() {
        let r = rules_from_json(
            &json!({"tenants": {"*": {"models": {"allow": ["claude-haiku-*"]}},
                                "acme": {}}}),
            "policy",
        )
        .unwrap();
        let body = json!({"model": "claude-opus-4-6"});
        let agents = op(Family::Agents, Action::Create);
        // acme's own (empty) entry replaces the default wholly.
        assert_eq!(check(&r, "acme", &agents, &body), Ok(()));
        assert_eq!(
            check(&r, "beta", &agents, &body).unwrap_err().message,
            "policy: model claude-opus-4-6 is not allowed for tenant beta (allowed: claude-haiku-*)"
        );
        // No policy at all: everything passes, operations without rules too.
        assert_eq!(
            check(&PolicyRules::default(), "beta", &agents, &body),
            Ok(())
        );
        let read = Operation {
            family: Family::Agents,
            action: Action::Read,
            ids: vec![(IdKind::Agent, "agent_1".into())],
        };
        assert_eq!(check(&r, "beta", &read, &Value::Null), Ok(()));
    }

    // ---- session budgets ----

    // ---- December 2026 surface ----

    /// The same fields as an agent create, an agent update, a session create override, a
    /// session update and a deployment create/update override: every path refuses alike,
    /// with the field path prefixed by `agent.` under sessions and deployments.
    fn every_path(r: &PolicyRules, fields: Value) -> Vec<(u32, String)> {
        let mut override_ = json!({"type": "agent_with_overrides", "id": "agent_1"});
        let mut update = json!({});
        for (k, v) in fields.as_object().unwrap() {
            override_[k] = v.clone();
            update[k] = v.clone();
        }
        vec![
            refusal(r, Family::Agents, Action::Create, fields.clone()),
            refusal(r, Family::Agents, Action::Update, fields.clone()),
            refusal(
                r,
                Family::Sessions,
                Action::Create,
                json!({"agent": override_.clone(), "environment_id": "env_1"}),
            ),
            refusal(
                r,
                Family::Sessions,
                Action::Update,
                json!({"agent": update}),
            ),
            refusal(
                r,
                Family::Deployments,
                Action::Create,
                json!({"agent": override_.clone(), "name": "d"}),
            ),
            refusal(
                r,
                Family::Deployments,
                Action::Update,
                json!({"agent": override_}),
            ),
        ]
    }

    /// `message` with its field paths (`model…`, `multiagent…`, `execution_identity…`, not
    /// rule names like `model claude-…`) prefixed by `agent.`.
    fn under_agent(message: &str) -> String {
        let mut out = String::new();
        let mut rest = message;
        'scan: while let Some(c) = rest.chars().next() {
            for field in ["model", "multiagent", "execution_identity"] {
                let next = rest.get(field.len()..).unwrap_or_default();
                let starts = rest.starts_with(field)
                    && if next.starts_with(['.', ')']) {
                        out.ends_with(' ') || out.ends_with('(')
                    } else {
                        next.starts_with(' ')
                            && (out.ends_with('(')
                                || out.ends_with("; ")
                                || out.ends_with("without "))
                    };
                if starts {
                    out.push_str("agent.");
                    out.push_str(field);
                    rest = &rest[field.len()..];
                    continue 'scan;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    fn refused_everywhere(r: &PolicyRules, fields: Value, message: &str) {
        let at_agent = under_agent(message);
        let expected = [message, message, &at_agent, &at_agent, &at_agent, &at_agent]
            .map(|m| (403, m.to_string()));
        assert_eq!(every_path(r, fields), expected.to_vec());
    }

    #[test]
    fn fast_mode_can_be_forbidden_on_every_model_config() {
        let r = rules(json!({"fast_mode": false}));
        let fast = |field: &str| {
            format!("policy: fast mode ({field}.speed \"fast\") is not allowed for tenant acme; use \"standard\"")
        };
        refused_everywhere(
            &r,
            json!({"model": {"id": "claude-opus-5-5", "speed": "fast"}}),
            &fast("model"),
        );
        refused_everywhere(
            &r,
            json!({"multiagent": {"type": "multiagent_20261001",
                                  "subagents": {"type": "enabled", "inline_agents": {"type": "disabled"}},
                                  "workflows": {"type": "disabled"},
                                  "advisor": {"type": "enabled",
                                              "model": {"id": "claude-opus-5-5", "speed": "fast"}}}}),
            &fast("multiagent.advisor.model"),
        );
        refused_everywhere(
            &r,
            json!({"multiagent": {"type": "coordinator", "agents": [
                "agent_2", {"type": "advisor", "model": {"id": "claude-fable-5-2", "speed": "fast"}}]}}),
            &fast("multiagent.agents[1].model"),
        );
        refused_everywhere(
            &r,
            json!({"multiagent": {"type": "multiagent_20261001",
                                  "subagents": {"type": "disabled"},
                                  "workflows": {"type": "enabled", "inline_agents": {"type": "disabled"},
                                                "predefined_agents": [{"type": "advisor",
                                                    "model": {"id": "claude-opus-5", "speed": "fast"}}]}}}),
            &fast("multiagent.workflows.predefined_agents[0].model"),
        );
        refused_everywhere(
            &r,
            json!({"model": {"id": "claude-opus-5-5", "speed": "turbo"}}),
            "policy: speed turbo (model.speed) is not known to the gateway",
        );
        for model in [
            json!("claude-opus-5-5"),
            json!({"id": "claude-opus-5-5"}),
            json!({"id": "claude-opus-5-5", "speed": "standard"}),
            json!({"id": "claude-opus-5-5", "speed": null}),
        ] {
            passes(&r, Family::Agents, Action::Create, json!({"model": model}));
        }
        // A disabled advisor's model is not run.
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"multiagent": {"type": "multiagent_20261001",
                                  "subagents": {"type": "disabled"}, "workflows": {"type": "disabled"},
                                  "advisor": {"type": "disabled", "model": {"id": "m", "speed": "fast"}}}}),
        );
        // Without the rule, fast passes.
        passes(
            &rules(json!({})),
            Family::Agents,
            Action::Create,
            json!({"model": {"id": "claude-opus-5-5", "speed": "fast"}}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": {"id": "m", "speed": 2}})
            ),
            (400, "policy: model.speed must be a string".into())
        );
    }

    #[test]
    fn inference_geo_is_allowed_or_denied_per_tenant_and_absent_means_default() {
        let r = rules(json!({"inference_geo": {"allow": ["us", "global"], "deny": ["global"]}}));
        refused_everywhere(
            &r,
            json!({"model": {"id": "claude-opus-5-5", "inference_geo": "eu"}}),
            "policy: inference_geo eu is not allowed for tenant acme (allowed: us, global)",
        );
        refused_everywhere(
            &r,
            json!({"model": {"id": "claude-opus-5-5", "inference_geo": "global"}}),
            "policy: inference_geo global is denied for tenant acme (denied: global)",
        );
        refused_everywhere(
            &r,
            json!({"model": "claude-opus-5-5"}),
            "policy: inference_geo default is not allowed for tenant acme (allowed: us, global); model names no inference_geo, so it runs in the workspace's default_inference_geo (\"default\" to the policy): set model.inference_geo"
                ,
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"model": {"id": "claude-opus-5-5", "inference_geo": "us"}}),
        );
        // An update or override without a model keeps the stored agent's (checked then).
        passes(&r, Family::Agents, Action::Update, json!({"system": "s"}));
        passes(
            &r,
            Family::Sessions,
            Action::Create,
            json!({"agent": {"type": "agent_with_overrides", "id": "agent_1", "system": "s"}}),
        );
        let with_default = rules(json!({"inference_geo": {"allow": ["us", "default"]}}));
        passes(
            &with_default,
            Family::Agents,
            Action::Create,
            json!({"model": "claude-opus-5-5"}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"model": {"id": "m", "inference_geo": ["us"]}})
            ),
            (400, "policy: model.inference_geo must be a string".into())
        );
    }

    #[test]
    fn subagents_workflows_and_inline_agents_are_on_by_default_and_can_be_forbidden() {
        let multi = |v: Value| json!({"multiagent": v});
        let off = json!({"type": "disabled"});
        let no_inline = json!({"type": "enabled", "inline_agents": {"type": "disabled"}});
        let r = rules(json!({"multiagent": {"workflows": false}}));
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20261001"})),
            "policy: workflows are forbidden for tenant acme (multiagent.workflows); multiagent_20261001 enables them by default: send \"workflows\": {\"type\":\"disabled\"}",
        );
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20261001", "workflows": null})),
            "policy: workflows are forbidden for tenant acme (multiagent.workflows); multiagent_20261001 enables them by default: send \"workflows\": {\"type\":\"disabled\"}",
        );
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20261001", "workflows": {"type": "enabled"}})),
            "policy: workflows are forbidden for tenant acme (multiagent.workflows)",
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            multi(json!({"type": "multiagent_20261001", "workflows": off})),
        );
        let r = rules(json!({"multiagent": {"subagents": false}}));
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20261001", "workflows": off})),
            "policy: subagents are forbidden for tenant acme (multiagent.subagents); multiagent_20261001 enables them by default: send \"subagents\": {\"type\":\"disabled\"}",
        );
        refused_everywhere(
            &r,
            multi(json!({"type": "coordinator", "agents": ["agent_2"]})),
            "policy: subagents are forbidden for tenant acme (multiagent type coordinator calls other agents)",
        );
        let r = rules(json!({"multiagent": {"inline_agents": false}}));
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20261001", "subagents": no_inline,
                         "workflows": {"type": "enabled", "inline_agents": null}})),
            "policy: inline agents (multiagent.workflows) are forbidden for tenant acme; they are enabled unless disabled: send \"inline_agents\": {\"type\":\"disabled\"} in multiagent.workflows",
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            multi(
                json!({"type": "multiagent_20261001", "subagents": no_inline, "workflows": no_inline}),
            ),
        );
        // No multiagent field, or null: nothing is spawned.
        passes(&r, Family::Agents, Action::Create, json!({"name": "a"}));
        passes(
            &r,
            Family::Agents,
            Action::Update,
            json!({"multiagent": null}),
        );
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20270101"})),
            "policy: multiagent type multiagent_20270101 is not known to the gateway (multiagent.type)",
        );
        refused_everywhere(
            &r,
            multi(json!({"type": "multiagent_20261001", "subagents": {"type": "sometimes"}})),
            "policy: multiagent.subagents type sometimes is not known to the gateway",
        );
        assert_eq!(
            refusal(&r, Family::Agents, Action::Create, multi(json!("on"))),
            (400, "policy: multiagent must be an object".into())
        );
        // Without multiagent or model rules, anything goes.
        passes(
            &rules(json!({"tools": {"deny": ["bash"]}})),
            Family::Agents,
            Action::Create,
            multi(json!({"type": "multiagent_20270101"})),
        );
    }

    #[test]
    fn subagent_models_pass_the_primary_model_rules_and_inline_agents_cannot() {
        let r = rules(json!({"models": {"allow": ["claude-opus-5-5"]}}));
        let no_inline = json!({"type": "enabled", "inline_agents": {"type": "disabled"}});
        refused_everywhere(
            &r,
            json!({"model": "claude-opus-5-5", "multiagent": {"type": "multiagent_20261001",
                                                             "workflows": {"type": "disabled"}}}),
            "policy: inline agents (multiagent.subagents) choose their own models, which the gateway cannot check against the model rules of tenant acme; send \"inline_agents\": {\"type\":\"disabled\"} in multiagent.subagents",
        );
        refused_everywhere(
            &r,
            json!({"multiagent": {"type": "multiagent_20261001", "workflows": no_inline,
                                  "subagents": {"type": "enabled", "inline_agents": {"type": "disabled"},
                                                "predefined_agents": ["agent_2", {"type": "self"},
                                                                      {"type": "advisor", "model": "claude-haiku-5-5"}]}}}),
            "policy: model claude-haiku-5-5 is not allowed for tenant acme (allowed: claude-opus-5-5)",
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"multiagent": {"type": "multiagent_20261001", "workflows": no_inline,
                                      "subagents": {"type": "enabled", "inline_agents": {"type": "disabled"},
                                                    "predefined_agents": [{"type": "advisor"}]}}})
            ),
            (
                400,
                "policy: multiagent.subagents.predefined_agents[0].model must be a model id string"
                    .into()
            )
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"model": "claude-opus-5-5", "multiagent": {
                "type": "multiagent_20261001", "workflows": {"type": "disabled"},
                "subagents": {"type": "enabled", "inline_agents": {"type": "disabled"},
                              "predefined_agents": ["agent_2", {"type": "advisor", "model": "claude-opus-5-5"}]},
                "advisor": {"type": "enabled", "model": {"id": "claude-opus-5-5"}}}}),
        );
        // Fast mode and geo rules read model configs too, so they also rule out inline agents.
        assert_eq!(
            refusal(
                &rules(json!({"fast_mode": false})),
                Family::Agents,
                Action::Create,
                json!({"multiagent": {"type": "multiagent_20261001", "subagents": {"type": "disabled"}}})
            )
            .1,
            "policy: inline agents (multiagent.workflows) choose their own models, which the gateway cannot check against the model rules of tenant acme; send \"inline_agents\": {\"type\":\"disabled\"} in multiagent.workflows"
        );
    }

    #[test]
    fn execution_identity_types_and_role_arns_can_be_restricted() {
        let r = rules(json!({"execution_identity": {
            "allow": ["aws_role"], "role_arns": ["arn:aws:iam::111122223333:role/agents-*"]}}));
        let good =
            json!({"type": "aws_role", "role_arn": "arn:aws:iam::111122223333:role/agents-1"});
        refused_everywhere(
            &r,
            json!({"execution_identity": {"type": "aws_role", "role_arn": "arn:aws:iam::9:role/x"}}),
            "policy: execution_identity.role_arn arn:aws:iam::9:role/x is not allowed for tenant acme (allowed: arn:aws:iam::111122223333:role/agents-*)",
        );
        refused_everywhere(
            &r,
            json!({"execution_identity": {"type": "service_account"}}),
            "policy: execution identity service_account is not allowed for tenant acme (allowed: aws_role)",
        );
        // A create without one (or with null) runs as service_account; an update or
        // override without one keeps the agent's.
        assert_eq!(
            refusal(&r, Family::Agents, Action::Create, json!({"name": "a"})),
            (
                403,
                "policy: execution identity service_account is not allowed for tenant acme (allowed: aws_role); an agent without execution_identity runs as service_account".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Update,
                json!({"execution_identity": null})
            )
            .0,
            403
        );
        passes(&r, Family::Agents, Action::Update, json!({"name": "a"}));
        passes(
            &r,
            Family::Sessions,
            Action::Create,
            json!({"agent": {"type": "agent_with_overrides", "id": "agent_1", "system": "s"}}),
        );
        passes(
            &r,
            Family::Agents,
            Action::Create,
            json!({"execution_identity": good}),
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"execution_identity": {"type": "aws_role"}})
            ),
            (
                400,
                "policy: execution_identity.role_arn must be a string".into()
            )
        );
        assert_eq!(
            refusal(
                &r,
                Family::Agents,
                Action::Create,
                json!({"execution_identity": "x"})
            ),
            (400, "policy: execution_identity must be an object".into())
        );
        // Role patterns alone leave service accounts alone.
        let roles_only = rules(json!({"execution_identity": {"role_arns": []}}));
        passes(
            &roles_only,
            Family::Agents,
            Action::Create,
            json!({"name": "a"}),
        );
        assert_eq!(
            refusal(&roles_only, Family::Agents, Action::Create, json!({"execution_identity": good})).1,
            "policy: execution_identity.role_arn arn:aws:iam::111122223333:role/agents-1 is not allowed for tenant acme (allowed: none)"
        );
    }

    #[test]
    fn deployment_schedules_can_be_forbidden() {
        let r = rules(json!({"deployments": {"schedules": false}}));
        let schedule = json!({"type": "cron", "expression": "0 3 * * *", "timezone": "UTC"});
        for action in [Action::Create, Action::Update] {
            assert_eq!(
                refusal(&r, Family::Deployments, action, json!({"name": "d", "schedule": schedule})),
                (
                    403,
                    "policy: deployment schedules are forbidden for tenant acme (schedule); run the deployment on demand instead".into()
                )
            );
            passes(&r, Family::Deployments, action, json!({"name": "d"}));
            // `null` clears a schedule.
            passes(&r, Family::Deployments, action, json!({"schedule": null}));
            passes(&r, Family::Deployments, action, json!({"agent": "agent_1"}));
        }
        passes(
            &rules(json!({})),
            Family::Deployments,
            Action::Create,
            json!({"schedule": schedule}),
        );
    }

    #[test]
    fn a_deployment_budget_is_capped_like_a_session_budget_and_never_removed() {
        // Create: absent, unreadable or higher budgets get what is left; lower ones are kept.
        let mut body = json!({"name": "d"});
        assert_eq!(
            clamp_deployment_budget(&mut body, 1_234_567, true, "acme"),
            Ok(true)
        );
        assert_eq!(body, json!({"name": "d", "budget": budget("123")}));
        let mut body = json!({"budget": budget("999999")});
        assert_eq!(
            clamp_deployment_budget(&mut body, 1_234_567, true, "acme"),
            Ok(true)
        );
        assert_eq!(body["budget"], budget("123"));
        let mut body = json!({"budget": null});
        assert_eq!(
            clamp_deployment_budget(&mut body, 1_234_567, true, "acme"),
            Ok(true)
        );
        assert_eq!(body["budget"], budget("123"));
        let mut body = json!({"budget": budget("50")});
        assert_eq!(
            clamp_deployment_budget(&mut body, 1_234_567, true, "acme"),
            Ok(false)
        );
        // Update: omitted keeps the deployment's, null is refused, others are capped.
        let mut body = json!({"name": "d"});
        assert_eq!(
            clamp_deployment_budget(&mut body, 1_234_567, false, "acme"),
            Ok(false)
        );
        assert_eq!(body, json!({"name": "d"}));
        let mut body = json!({"budget": null});
        let error = clamp_deployment_budget(&mut body, 1_234_567, false, "acme").unwrap_err();
        assert_eq!(
            (error.status(), error.message.as_str()),
            (
                403,
                "policy: a deployment budget cannot be removed while tenant acme has a cost budget (every session it fires copies it)"
            )
        );
        let mut body = json!({"budget": budget("999999")});
        assert_eq!(
            clamp_deployment_budget(&mut body, 1_234_567, false, "acme"),
            Ok(true)
        );
        assert_eq!(body["budget"], budget("123"));
    }

    fn budget(amount: &str) -> Value {
        json!({"type": "limit", "max_list_cost": {"amount": amount, "currency": "USD"}})
    }

    #[test]
    fn a_session_without_a_budget_gets_the_remaining_money_in_cents() {
        let mut body = json!({"agent": "agent_1", "environment_id": "env_1"});
        assert!(clamp_session_budget(&mut body, 12_345_678));
        assert_eq!(
            body,
            json!({"agent": "agent_1", "environment_id": "env_1", "budget": budget("1234")})
        );
        let mut body = json!({"agent": "agent_1", "budget": null});
        assert!(clamp_session_budget(&mut body, 50_000_000));
        assert_eq!(body["budget"], budget("5000"));
        // Less than a cent left rounds down to zero, never up.
        let mut body = json!({});
        assert!(clamp_session_budget(&mut body, 9_999));
        assert_eq!(body["budget"], budget("0"));
    }

    #[test]
    fn a_lower_client_budget_is_kept_and_a_higher_one_lowered() {
        let mut body = json!({"budget": budget("500")});
        assert!(!clamp_session_budget(&mut body, 12_345_678));
        assert_eq!(body["budget"], budget("500"));
        let mut body = json!({"budget": budget("1234")});
        assert!(!clamp_session_budget(&mut body, 12_345_678));
        assert_eq!(body["budget"], budget("1234"));
        let mut body = json!({"budget": budget("1235")});
        assert!(clamp_session_budget(&mut body, 12_345_678));
        assert_eq!(body["budget"], budget("1234"));
        let mut body = json!({"budget": budget("99999999999999999999999")});
        assert!(clamp_session_budget(&mut body, 10_000));
        assert_eq!(body["budget"], budget("1"));
    }

    #[test]
    fn an_unreadable_client_budget_is_replaced() {
        for sent in [
            json!({"type": "limit", "max_list_cost": {"amount": "5.00", "currency": "USD"}}),
            json!({"type": "limit", "max_list_cost": {"amount": 5, "currency": "USD"}}),
            json!({"type": "limit", "max_list_cost": {"amount": "", "currency": "USD"}}),
            json!({"type": "limit", "max_list_cost": {"amount": "-5", "currency": "USD"}}),
            json!({"type": "limit", "max_list_cost": {"amount": "5", "currency": "EUR"}}),
            json!({"type": "unlimited"}),
            json!({"type": "limit"}),
            json!("5"),
        ] {
            let mut body = json!({"budget": sent.clone()});
            assert!(clamp_session_budget(&mut body, 1_000_000), "{sent}");
            assert_eq!(body["budget"], budget("100"), "{sent}");
        }
        let mut not_an_object = json!(["budget"]);
        assert!(!clamp_session_budget(&mut not_an_object, 1_000_000));
        assert_eq!(not_an_object, json!(["budget"]));
    }

    #[test]
    fn session_updates_may_lower_but_not_remove_or_raise_the_budget() {
        let mut body = json!({"title": "t"});
        assert_eq!(clamp_session_budget_update(&mut body, 1_000_000), Ok(false));
        assert_eq!(body, json!({"title": "t"}));
        let mut body = json!({"budget": null});
        let error = clamp_session_budget_update(&mut body, 1_000_000).unwrap_err();
        assert_eq!(error.status(), 403);
        assert_eq!(
            error.message,
            "policy: a session budget cannot be removed while the tenant has a cost budget"
        );
        let mut body = json!({"budget": budget("5000")});
        assert_eq!(clamp_session_budget_update(&mut body, 1_000_000), Ok(true));
        assert_eq!(body["budget"], budget("100"));
        let mut body = json!({"budget": budget("50")});
        assert_eq!(clamp_session_budget_update(&mut body, 1_000_000), Ok(false));
    }
}
