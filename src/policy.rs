//! Policy: what a tenant's agents may be — models, tools, MCP servers, environment networking,
//! vaults — checked on the request bodies that define them, before they reach the upstream.
//!
//! Scopes ([`crate::scopes`]) say which calls a tenant may make; this module says what those
//! calls may contain. It reads the JSON body only (no state), so every check is exact and the
//! same on every worker and replica. It also owns [`clamp_session_budget`] and
//! [`clamp_session_budget_update`], which cap a session's own spend ceiling at what the
//! tenant can give it (reserved in [`crate::limits::reserve_session_budget`]).
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
//!     "max_body_bytes": 65536
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
//! - `models`: every model the body names — `model` (a string or `{"id": …}`), an enabled
//!   multi-agent `advisor.model` and `advisor` roster entries. Case-sensitive.
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
//! (its `model`/`tools`/`mcp_servers` overrides, the same on both); environment
//! create/update; vault and credential writes. A refusal is
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

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy {
            models: NameRules::default(),
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
        (Family::Agents, Action::Create | Action::Update) => ctx.agent(body, ""),
        // An update's `agent` is checked like a create's overrides: the upstream documents
        // only `tools` and `mcp_servers` there, but a model it might accept must pass too.
        (Family::Sessions, Action::Create | Action::Update) => match body.get("agent") {
            Some(agent @ Value::Object(_)) => ctx.agent(agent, "agent."),
            _ => Ok(()),
        },
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
    /// An agent definition: a create/update body, or a session's `agent` object (`prefix`
    /// `agent.`), whose overrides use the same field names.
    fn agent(&self, agent: &Value, prefix: &str) -> Result<(), ApiError> {
        self.models(agent, prefix)?;
        self.tools(agent.get("tools"), &format!("{prefix}tools"))?;
        self.mcp_servers(agent.get("mcp_servers"), &format!("{prefix}mcp_servers"))
    }

    fn models(&self, agent: &Value, prefix: &str) -> Result<(), ApiError> {
        let rules = &self.policy.models;
        if !rules.is_set() {
            return Ok(());
        }
        let mut models: Vec<&str> = Vec::new();
        match agent.get("model") {
            None | Some(Value::Null) => {}
            Some(Value::String(id)) => models.push(id),
            Some(Value::Object(config)) => match config.get("id") {
                Some(Value::String(id)) => models.push(id),
                _ => return Err(malformed(&format!("{prefix}model.id"), "a model id string")),
            },
            Some(_) => {
                return Err(malformed(
                    &format!("{prefix}model"),
                    "a model id string or an object with an id",
                ))
            }
        }
        if let Some(multi) = agent.get("multiagent").and_then(Value::as_object) {
            // `multiagent_20261001`: an enabled advisor names its model.
            if let Some(Value::String(id)) = multi.get("advisor").and_then(|a| a.get("model")) {
                models.push(id);
            }
            // `coordinator`: the roster may hold `{"type": "advisor", "model": …}`.
            if let Some(Value::Array(roster)) = multi.get("agents") {
                for entry in roster {
                    if entry.get("type").and_then(Value::as_str) == Some("advisor") {
                        match entry.get("model") {
                            Some(Value::String(id)) => models.push(id),
                            _ => {
                                return Err(malformed(
                                    &format!("{prefix}multiagent.agents[].model"),
                                    "a model id string",
                                ))
                            }
                        }
                    }
                }
            }
        }
        for model in models {
            self.name_allowed(rules, "model", model, None)?;
        }
        Ok(())
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
                    "max_body_bytes": 65536
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
