//! The plugin configuration as a JSON Schema (draft 2020-12), built next to the parser it
//! describes ([`crate::config`] and the `rules_from_json` of [`crate::limits`],
//! [`crate::policy`], [`crate::jwt`] and [`crate::pricing`]).
//!
//! The checked-in `examples/plugin-config.schema.json` is this function's output, pretty-printed;
//! `tests/config_schema.rs` fails when the two differ (regenerate with
//! `MA_GATEWAY_WRITE_SCHEMA=1 cargo test --test config_schema`) and probes the parser with every
//! bound, enum, type and closed object the schema states, so the two cannot drift apart.
//!
//! What the schema says is exactly what the parser checks field by field: types, required
//! fields, integer ranges, enums, string lengths and character sets, unknown fields
//! (`additionalProperties: false` on every object). Defaults are read from what the parser
//! compiles for a config that leaves them out, never restated. What JSON Schema cannot say is
//! left to the parser and named in `$comment`: unique names, references between sections
//! (a key's tenant, a tenant's credential), calendar validity of `expires_at` and the price
//! ceiling of decimal strings. So the schema never rejects a config the filter accepts, and
//! rejects almost everything it refuses.

use serde_json::{json, Map, Value};

use crate::config::{Origin, Plan, API_VERSION, DEFAULT_TENANT, MANAGED_AGENTS_BETA};
use crate::credentials::DEFAULT_CREDENTIAL;
use crate::limits::{MAX_RATE, MAX_STREAMS};
use crate::policy::{TenantPolicy, MAX_BODY_BYTES as POLICY_MAX_BODY_BYTES};
use crate::pricing::{MAX_PRICE_MICROS, MICROS_PER_USD};
use crate::routes::{Action, Family, Neighbour};
use crate::tenancy::{Untagged, METADATA_MAX_KEY_CHARS};

/// The draft this schema is written in.
pub const SCHEMA_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";
/// The schema's identifier.
pub const SCHEMA_ID: &str = "urn:ma-gateway:plugin-config:v1";

/// A config the parser compiles with every optional field left out (and the optional sections
/// whose fields have defaults present), so the schema's defaults are what the parser chooses.
const DEFAULTS_PROBE: &str = r#"{"api_version":"v1",
    "jwt":{"tenant_claim":"tenant"},
    "credentials":[{"name":"probe","vault":{"cluster":"vault","authority":"vault","path":"/v1/probe","token_env":"VAULT_TOKEN"}}]}"#;

// Limits the parser states inline (in `config.rs`, `jwt.rs`, `limits.rs`, `policy.rs`); the
// test probes each of them against the parser from the generated schema.
/// `credentials[].name`, `tenants[].name`.
const MAX_NAME_CHARS: u64 = 64;
/// Tenant names as keys of `limits.tenants`, `limits.budgets.tenants`, `policy.tenants`.
const MAX_MAP_NAME_CHARS: u64 = 128;
/// `jwt.*` claim and key names (bytes in the parser; characters here, which is never stricter).
const MAX_JWT_NAME: u64 = 256;
/// `anthropic-beta` tokens and `upstream.anthropic_version`.
const MAX_HEADER_TOKEN: u64 = 128;
/// `upstream.cluster`.
const MAX_CLUSTER_NAME: u64 = 256;
/// Policy globs (bytes in the parser; characters here, which is never stricter).
const MAX_POLICY_PATTERN: u64 = 256;

/// Every family, in the order of `scopes.rs`. [`family_guard`] fails to compile when a variant
/// is added to [`Family`] until it is listed here too.
const FAMILIES: [Family; 15] = [
    Family::Agents,
    Family::AgentVersions,
    Family::Sessions,
    Family::SessionEvents,
    Family::SessionThreads,
    Family::SessionResources,
    Family::Environments,
    Family::EnvironmentWork,
    Family::Vaults,
    Family::VaultCredentials,
    Family::Files,
    Family::Skills,
    Family::MemoryStores,
    Family::Deployments,
    Family::DeploymentRuns,
];

/// Every action, in the order of `scopes.rs`; see [`action_guard`].
const ACTIONS: [Action; 8] = [
    Action::Create,
    Action::Read,
    Action::List,
    Action::Update,
    Action::Delete,
    Action::Archive,
    Action::Stream,
    Action::SendEvents,
];

/// Exhaustive on purpose: a new [`Family`] variant stops the build here (list it in
/// [`FAMILIES`]).
#[allow(dead_code)]
fn family_guard(family: Family) {
    match family {
        Family::Agents
        | Family::AgentVersions
        | Family::Sessions
        | Family::SessionEvents
        | Family::SessionThreads
        | Family::SessionResources
        | Family::Environments
        | Family::EnvironmentWork
        | Family::Vaults
        | Family::VaultCredentials
        | Family::Files
        | Family::Skills
        | Family::MemoryStores
        | Family::Deployments
        | Family::DeploymentRuns => {}
    }
}

/// Exhaustive on purpose: a new [`Action`] variant stops the build here (list it in
/// [`ACTIONS`]).
#[allow(dead_code)]
fn action_guard(action: Action) {
    match action {
        Action::Create
        | Action::Read
        | Action::List
        | Action::Update
        | Action::Delete
        | Action::Archive
        | Action::Stream
        | Action::SendEvents => {}
    }
}

/// Characters Rust's `char::is_control` (Unicode Cc) refuses, as a regex class body.
const CONTROL: &str = r"\x00-\x1F\x7F-\x9F";
/// Characters Rust's `char::is_whitespace` (Unicode White_Space) refuses, minus the controls.
const WHITESPACE: &str = r"\x20\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";

/// The JSON Schema of the plugin configuration, exactly as the parser reads it.
pub fn plugin_config_schema() -> Value {
    match Plan::from_json(DEFAULTS_PROBE.as_bytes()) {
        Ok(defaults) => schema(&defaults),
        // Only reachable if the parser stopped accepting its own probe; the checked-in schema
        // then no longer matches and `tests/config_schema.rs` says why.
        Err(err) => json!({ "$comment": format!("defaults probe rejected: {err}") }),
    }
}

/// The schema pretty-printed as it is checked in (two-space indent, trailing newline).
pub fn plugin_config_schema_text() -> String {
    match serde_json::to_string_pretty(&plugin_config_schema()) {
        Ok(text) => text + "\n",
        Err(err) => format!("{{\"$comment\": \"cannot serialize: {err}\"}}\n"),
    }
}

fn schema(d: &Plan) -> Value {
    let mut root = object(
        "Configuration of the ma-gateway Envoy filter (Istio WasmPlugin.spec.pluginConfig, \
         Envoy Gateway EnvoyExtensionPolicy wasm[].config, or the StringValue under the Wasm \
         filter's configuration). Parsing is strict: an unknown field, a wrong type or a missing \
         value rejects the whole config, and Envoy's log names the field. Generated by \
         src/config_schema.rs; do not edit.",
        vec![
            (
                "api_version",
                json!({
                    "description": "config schema version; only `\"v1\"`",
                    "type": "string",
                    "const": API_VERSION,
                }),
            ),
            ("upstream", upstream(d)),
            ("credentials", credentials(d)),
            ("tenants", tenants()),
            ("isolation", isolation(d)),
            ("limits", limits()),
            ("policy", policy()),
            ("audit", audit(d)),
            ("jwt", jwt(d)),
            ("betas", betas(d)),
            ("routes", routes(d)),
            ("gateway_keys", gateway_keys()),
            ("metering", metering(d)),
        ],
        &["api_version"],
    );
    if let Value::Object(map) = &mut root {
        map.insert("$schema".into(), json!(SCHEMA_DIALECT));
        map.insert("$id".into(), json!(SCHEMA_ID));
        map.insert("title".into(), json!("ma-gateway plugin configuration"));
        map.insert(
            "$comment".into(),
            json!(
                "Checked by the parser only (not expressible here): credential, tenant and \
                 gateway key names are unique; tenants[].credential names a declared credential \
                 (or default); gateway_keys[].tenant names a declared tenant when tenants are \
                 declared; expires_at is a real calendar time from 1970 on; prices are at most \
                 $1000000; pricing.models[].match values are unique."
            ),
        );
        map.insert("$defs".into(), defs());
    }
    root
}

/// The reusable leaves, referenced as `#/$defs/<name>`.
fn defs() -> Value {
    let families: Vec<&str> = FAMILIES.iter().map(|f| f.as_str()).collect();
    let actions: Vec<&str> = ACTIONS.iter().map(|a| a.as_str()).collect();
    let scope = format!(
        r"^(\*|{}):(\*|readonly|{})$",
        families.join("|"),
        actions.join("|")
    );
    json!({
        "name": {
            "description": "a name usable in logs, metric labels and shared-data keys",
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_NAME_CHARS,
            "pattern": "^[A-Za-z0-9_.-]+$",
        },
        "env_name": {
            "description": "an environment variable name, never a key or token",
            "type": "string",
            "minLength": 1,
            "pattern": "^[A-Za-z0-9_]+$",
        },
        "header_token": {
            "description": "visible ASCII without commas or spaces, at most 128 characters",
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_HEADER_TOKEN,
            "pattern": r"^[\x21-\x2B\x2D-\x7E]+$",
        },
        "scope": {
            "description": "`family:action`; `*` for any family or action, `readonly` for read, list and stream",
            "type": "string",
            "pattern": scope,
        },
        "scopes": {
            "type": "array",
            "items": { "$ref": "#/$defs/scope" },
        },
        "usd": {
            "description": "US dollars: a decimal string with at most six decimals (more only as trailing zeros), parsed exactly, or a non-negative JSON integer; at most 1000000",
            "type": ["string", "integer"],
            "pattern": r"^[0-9]+(\.[0-9]{1,6}0*)?$",
            "minimum": 0,
            "maximum": MAX_PRICE_MICROS / MICROS_PER_USD,
        },
        "rate": {
            "description": "a token bucket holding `burst` requests (default: `per_minute`), refilled at `per_minute` per minute; `null` lifts an inherited limit",
            "type": ["object", "null"],
            "additionalProperties": false,
            "required": ["per_minute"],
            "properties": {
                "per_minute": { "type": "integer", "minimum": 1, "maximum": MAX_RATE },
                "burst": { "type": "integer", "minimum": 1, "maximum": MAX_RATE },
            },
        },
        "policy_pattern": {
            "description": "a glob whose only wildcard is `*`; no control characters or whitespace, at most 256 bytes",
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_POLICY_PATTERN,
            "pattern": format!("^[^{CONTROL}{WHITESPACE}]+$"),
        },
        "name_rules": {
            "description": "`allow` admits only what matches one of its patterns (`[]` admits nothing); `deny` wins over `allow`",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "allow": { "type": "array", "items": { "$ref": "#/$defs/policy_pattern" } },
                "deny": { "type": "array", "items": { "$ref": "#/$defs/policy_pattern" } },
            },
        },
    })
}

fn upstream(d: &Plan) -> Value {
    let u = &d.upstream;
    object(
        "where calls go and how they are credentialed",
        vec![
            (
                "authority",
                json!({
                    "description": "`:authority` sent upstream (`host[:port]`)",
                    "type": "string",
                    "default": u.authority,
                    "minLength": 1,
                    "pattern": r"^[A-Za-z0-9.:\[\]-]+$",
                }),
            ),
            (
                "credential_env",
                described(
                    "name of the environment variable (listed in \
                     `vm_config.environment_variables.host_env_keys`) that seeds the upstream \
                     key into shared data. Never the key itself",
                    json!({ "$ref": "#/$defs/env_name", "default": u.credential_env }),
                ),
            ),
            (
                "anthropic_version",
                described(
                    "`anthropic-version` set when the client sent none",
                    json!({ "$ref": "#/$defs/header_token", "default": u.anthropic_version }),
                ),
            ),
            (
                "cluster",
                json!({
                    "description": "Envoy cluster for the gateway's own calls (ownership and session lookups, reconciler). It must reach the same upstream as the route: on Istio `outbound|<port>||<host>`, on Envoy Gateway `httproute/<namespace>/<name>/rule/<index>`",
                    "type": "string",
                    "default": u.cluster,
                    "minLength": 1,
                    "maxLength": MAX_CLUSTER_NAME,
                }),
            ),
        ],
        &[],
    )
}

fn credentials(d: &Plan) -> Value {
    let vault = d.credentials.iter().find_map(|c| match &c.origin {
        Origin::Vault(v) => Some(v),
        Origin::Env(_) => None,
    });
    let (field, refresh_secs) = vault.map_or((Value::Null, Value::Null), |v| {
        (json!(v.field), json!(v.refresh_secs))
    });
    let mut item = object(
        "a named upstream credential",
        vec![
            (
                "name",
                described(
                    "a named upstream key; `default` comes from `upstream.credential_env` \
                     unless declared. Unique",
                    json!({ "$ref": "#/$defs/name" }),
                ),
            ),
            (
                "env",
                described(
                    "environment variable holding the key (list it in `host_env_keys`)",
                    json!({ "$ref": "#/$defs/env_name" }),
                ),
            ),
            (
                "vault",
                object(
                    "HashiCorp Vault KV v2 read (`GET path`, `X-Vault-Token: $token_env`, key at \
                     `data.data.<field>`), polled by the background service with backoff and \
                     jitter. Exactly one of `env` / `vault`",
                    vec![
                        (
                            "cluster",
                            json!({ "description": "Envoy cluster that reaches Vault", "type": "string" }),
                        ),
                        (
                            "authority",
                            json!({ "description": "`:authority` of the Vault request", "type": "string" }),
                        ),
                        (
                            "path",
                            json!({
                                "description": "absolute path of the KV v2 secret, e.g. /v1/secret/data/anthropic/team",
                                "type": "string",
                                "pattern": r"^/[^\x00-\x20\x7F]*$",
                            }),
                        ),
                        (
                            "field",
                            json!({
                                "description": "key of the API key inside `data.data`",
                                "type": "string",
                                "default": field,
                            }),
                        ),
                        (
                            "token_env",
                            described(
                                "environment variable holding the Vault token (list it in `host_env_keys`)",
                                json!({ "$ref": "#/$defs/env_name" }),
                            ),
                        ),
                        (
                            "refresh_secs",
                            json!({
                                "description": "seconds between reads",
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 86_400,
                                "default": refresh_secs,
                            }),
                        ),
                    ],
                    &["cluster", "authority", "path", "token_env"],
                ),
            ),
        ],
        &["name"],
    );
    if let Value::Object(map) = &mut item {
        map.insert(
            "oneOf".into(),
            json!([{ "required": ["env"] }, { "required": ["vault"] }]),
        );
    }
    json!({
        "description": "named upstream keys; `default` is implicit (from `upstream.credential_env`) unless declared",
        "type": "array",
        "items": item,
    })
}

fn tenants() -> Value {
    json!({
        "description": "declared tenants; none declared: every tenant may do everything",
        "type": "array",
        "items": object(
            "a tenant: the unit of isolation, scopes and upstream credentials",
            vec![
                (
                    "name",
                    described(
                        "a tenant; when any are declared, every key's tenant must be one of them \
                         and JWT tenants outside the list may do nothing. Unique",
                        json!({ "$ref": "#/$defs/name" }),
                    ),
                ),
                (
                    "scopes",
                    described(
                        "`family:action` (`*` wildcards; action `readonly` = read, list, stream)",
                        json!({ "$ref": "#/$defs/scopes", "default": ["*:*"] }),
                    ),
                ),
                (
                    "credential",
                    json!({
                        "description": "which upstream credential the tenant's calls use (sessions keep the one they were created with). A declared credential's name, or default",
                        "type": "string",
                        "default": DEFAULT_CREDENTIAL,
                    }),
                ),
            ],
            &["name"],
        ),
    })
}

fn isolation(d: &Plan) -> Value {
    let untagged = match d.isolation.untagged {
        Untagged::Deny => "deny",
        Untagged::Allow => "allow",
    };
    object(
        "tenant isolation on a shared upstream key",
        vec![
            (
                "enabled",
                json!({
                    "description": "tenant isolation on the shared upstream key. Default: true when tenants are declared",
                    "type": "boolean",
                }),
            ),
            (
                "tag_key",
                json!({
                    "description": "`metadata` key recording the owner upstream",
                    "type": "string",
                    "default": d.isolation.tag_key,
                    "minLength": 1,
                    "maxLength": METADATA_MAX_KEY_CHARS,
                    "pattern": format!("^[^{CONTROL}]+$"),
                }),
            ),
            (
                "untagged",
                json!({
                    "description": "resources without a tag (created outside the gateway)",
                    "type": "string",
                    "enum": ["deny", "allow"],
                    "default": untagged,
                }),
            ),
            (
                "max_body_bytes",
                json!({
                    "description": "largest create/update body inspected; bigger: `413`",
                    "type": "integer",
                    "minimum": 1024,
                    "maximum": 16 * 1024 * 1024,
                    "default": d.isolation.max_body_bytes,
                }),
            ),
        ],
        &[],
    )
}

/// A set of limits; `with_per_principal` for a tenant's own entry.
fn limit_set(description: &str, nullable: bool, with_per_principal: bool) -> Value {
    let mut fields = vec![
        (
            "create",
            described(
                "create, update, archive, delete and `POST …/events`",
                rate(),
            ),
        ),
        ("read", described("read and list", rate())),
        ("stream", described("opening an event stream", rate())),
        (
            "concurrent_streams",
            json!({
                "description": "event streams open at once; `null` lifts an inherited limit",
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": MAX_STREAMS,
            }),
        ),
    ];
    if with_per_principal {
        fields.push((
            "per_principal",
            limit_set(
                "overrides `per_principal` for this tenant's principals",
                true,
                false,
            ),
        ));
    }
    let set = object(description, fields, &[]);
    if nullable {
        self::nullable(set)
    } else {
        set
    }
}

fn rate() -> Value {
    json!({ "$ref": "#/$defs/rate" })
}

fn limits() -> Value {
    let tenant_key = json!({
        "minLength": 1,
        "maxLength": MAX_MAP_NAME_CHARS,
        "pattern": "^[A-Za-z0-9_.-]+$",
    });
    object(
        "request rates, concurrent streams and budgets (see below and `src/limits.rs`). Every \
         limit is per Envoy process",
        vec![
            (
                "per_tenant",
                limit_set(
                    "limits of each tenant (all its principals together)",
                    true,
                    false,
                ),
            ),
            (
                "per_principal",
                limit_set("limits of each principal on its own", true, false),
            ),
            (
                "tenants",
                json!({
                    "description": "per-tenant overrides of `per_tenant`, field by field (`null` lifts a limit)",
                    "type": "object",
                    "propertyNames": tenant_key,
                    "additionalProperties": limit_set("one tenant's overrides", false, true),
                }),
            ),
            ("budgets", budgets()),
        ],
        &[],
    )
}

fn budgets() -> Value {
    let fields: Vec<(&str, Value)> = [
        "tokens_per_minute",
        "tokens_per_day",
        "tokens_per_month",
        "microdollars_per_minute",
        "microdollars_per_day",
        "microdollars_per_month",
    ]
    .into_iter()
    .map(|name| {
        (
            name,
            json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX }),
        )
    })
    .collect();
    nullable(object(
        "token and micro-dollar budgets per UTC minute, day and month",
        vec![(
            "tenants",
            json!({
                "description": "budgets by tenant; `*` for every tenant without its own entry (an own entry replaces it wholly)",
                "type": "object",
                "propertyNames": {
                    "minLength": 1,
                    "maxLength": MAX_MAP_NAME_CHARS,
                    "pattern": r"^([A-Za-z0-9_.-]+|\*)$",
                },
                "additionalProperties": object(
                    "a tenant's budgets; tokens are all usage kinds added up; 0 blocks the tenant",
                    fields,
                    &[],
                ),
            }),
        )],
        &[],
    ))
}

fn policy() -> Value {
    let d = TenantPolicy::default();
    let tenant = object(
        "one tenant's policy; every field is optional and a missing one does not restrict",
        vec![
            (
                "models",
                described(
                    "every model a body names",
                    json!({ "$ref": "#/$defs/name_rules" }),
                ),
            ),
            (
                "tools",
                described(
                    "every tool a body enables: built-ins by name, `custom:<name>`, `mcp:<server>`",
                    json!({ "$ref": "#/$defs/name_rules" }),
                ),
            ),
            (
                "mcp_servers",
                object(
                    "MCP servers agents may use",
                    vec![(
                        "allow_urls",
                        json!({
                            "description": "`scheme://host[:port][/path-glob]` patterns",
                            "type": "array",
                            "items": {
                                "$ref": "#/$defs/policy_pattern",
                                "pattern": r"^[A-Za-z]+://[^/?#]",
                            },
                        }),
                    )],
                    &[],
                ),
            ),
            (
                "environments",
                object(
                    "cloud environment networking",
                    vec![
                        (
                            "forbid_unrestricted",
                            json!({
                                "description": "refuse `networking: {\"type\": \"unrestricted\"}`",
                                "type": "boolean",
                                "default": d.environments.forbid_unrestricted,
                            }),
                        ),
                        (
                            "allowed_hosts",
                            json!({
                                "description": "host globs every `limited.allowed_hosts[]` entry must match (case-insensitive)",
                                "type": "array",
                                "items": {
                                    "$ref": "#/$defs/policy_pattern",
                                    "pattern": r"^[A-Za-z0-9.*-]+$",
                                },
                            }),
                        ),
                        (
                            "allow_package_managers",
                            json!({
                                "description": "false refuses `allow_package_managers: true`",
                                "type": "boolean",
                                "default": d.environments.allow_package_managers,
                            }),
                        ),
                    ],
                    &[],
                ),
            ),
            (
                "vaults",
                json!({
                    "description": "false refuses creating vaults and creating or changing vault credentials",
                    "type": "boolean",
                    "default": d.vaults,
                }),
            ),
            (
                "max_body_bytes",
                json!({
                    "description": "cap on this tenant's inspected request bodies (413 beyond)",
                    "type": "integer",
                    "minimum": 1,
                    "maximum": POLICY_MAX_BODY_BYTES,
                }),
            ),
        ],
        &[],
    );
    object(
        "per-tenant rules on agent/session/environment/vault bodies (see below and \
         `src/policy.rs`)",
        vec![(
            "tenants",
            json!({
                "description": "policies by tenant; `*` for every tenant without its own entry (an own entry replaces it wholly)",
                "type": "object",
                "propertyNames": {
                    "minLength": 1,
                    "maxLength": MAX_MAP_NAME_CHARS,
                    "pattern": r"^([A-Za-z0-9_.-]+|\*)$",
                },
                "additionalProperties": tenant,
            }),
        )],
        &[],
    )
}

fn audit(d: &Plan) -> Value {
    object(
        "audit record options",
        vec![(
            "redact_ids",
            json!({
                "description": "write resource ids in the audit record as `sha256:<16 hex>` (stable, so records still join)",
                "type": "boolean",
                "default": d.audit.redact_ids,
            }),
        )],
        &[],
    )
}

fn jwt(d: &Plan) -> Value {
    let claim = |description: &str, default: Option<&str>| {
        let mut field = json!({
            "description": description,
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_JWT_NAME,
            "pattern": format!("^[^{CONTROL}]+$"),
        });
        if let (Some(default), Value::Object(map)) = (default, &mut field) {
            map.insert("default".into(), json!(default));
        }
        field
    };
    let rules = d.jwt.as_ref();
    object(
        "identity from JWTs verified by Envoy's `jwt_authn` filter (read from dynamic metadata)",
        vec![
            (
                "tenant_claim",
                claim(
                    "claim naming the tenant (dotted path or full claim name)",
                    None,
                ),
            ),
            (
                "scopes_claim",
                claim(
                    "space-separated string or array; non-`family:action` scopes are ignored",
                    rules.map(|r| r.scopes_claim.as_str()),
                ),
            ),
            (
                "subject_claim",
                claim("principal name", rules.map(|r| r.subject_claim.as_str())),
            ),
            (
                "metadata_key",
                claim(
                    "`payload_in_metadata` of the `jwt_authn` provider",
                    rules.map(|r| r.metadata_key.as_str()),
                ),
            ),
        ],
        &["tenant_claim"],
    )
}

fn betas(d: &Plan) -> Value {
    object(
        "the `anthropic-beta` rules",
        vec![
            (
                "required",
                json!({
                    "description": "always present in the forwarded `anthropic-beta`; must include the Managed Agents beta",
                    "type": "array",
                    "items": { "$ref": "#/$defs/header_token" },
                    "contains": { "const": MANAGED_AGENTS_BETA },
                    "default": d.betas.required,
                }),
            ),
            (
                "allowed",
                json!({
                    "description": "betas clients may send; others get `400`. Required betas are always allowed",
                    "type": "array",
                    "items": { "$ref": "#/$defs/header_token" },
                    "default": d.betas.allowed,
                }),
            ),
        ],
        &[],
    )
}

fn routes(d: &Plan) -> Value {
    let names: Vec<&str> = Neighbour::ALL.iter().map(|n| n.as_str()).collect();
    let defaults: Vec<&str> = d.routes.neighbours.iter().map(|n| n.as_str()).collect();
    object(
        "what is routed",
        vec![
            (
                "neighbours",
                json!({
                    "description": "neighbouring APIs to route as well: `files`, `skills`, `memory_stores`, `deployments` (includes `deployment_runs`)",
                    "type": "array",
                    "items": { "type": "string", "enum": names },
                    "default": defaults,
                }),
            ),
            (
                "max_path_bytes",
                json!({
                    "description": "longest path (without query) forwarded",
                    "type": "integer",
                    "minimum": 64,
                    "maximum": 65_536,
                    "default": d.routes.max_path_bytes,
                }),
            ),
            (
                "max_id_bytes",
                json!({
                    "description": "longest id segment forwarded",
                    "type": "integer",
                    "minimum": 16,
                    "maximum": 1024,
                    "default": d.routes.max_id_bytes,
                }),
            ),
        ],
        &[],
    )
}

fn gateway_keys() -> Value {
    json!({
        "description": "gateway API keys clients present (`x-api-key` or `Authorization: Bearer`); only their SHA-256 is configured",
        "type": "array",
        "items": object(
            "one gateway key",
            vec![
                (
                    "name",
                    json!({
                        "description": "name of the key (logs); `[A-Za-z0-9_.-]`, unique",
                        "type": "string",
                        "minLength": 1,
                        "pattern": "^[A-Za-z0-9_.-]+$",
                    }),
                ),
                (
                    "sha256",
                    json!({
                        "description": "hex SHA-256 of the key: `printf %s \"$KEY\" | sha256sum`",
                        "type": "string",
                        "pattern": "^[0-9A-Fa-f]{64}$",
                    }),
                ),
                (
                    "tenant",
                    json!({
                        "description": "tenant the key's principal belongs to",
                        "type": "string",
                        "default": DEFAULT_TENANT,
                    }),
                ),
                (
                    "expires_at",
                    json!({
                        "description": "UTC time (`2027-01-31T00:00:00Z`) from which the key is refused. Default: never",
                        "type": "string",
                        "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[\s\S]*)?[Zz]$",
                    }),
                ),
                (
                    "scopes",
                    described(
                        "narrows (never widens) the tenant's scopes for this key. Default: the tenant's",
                        json!({ "$ref": "#/$defs/scopes" }),
                    ),
                ),
            ],
            &["name", "sha256"],
        ),
    })
}

fn metering(d: &Plan) -> Value {
    let m = &d.metering;
    let prices = &m.prices;
    let model = object(
        "prices of the models a `match` selects, in US dollars per million tokens",
        vec![
            (
                "match",
                json!({
                    "description": "a model id, or a prefix ending in `*`; visible ASCII",
                    "type": "string",
                    "minLength": 1,
                    "pattern": r"^[\x21-\x29\x2B-\x7E]*\*?$",
                }),
            ),
            ("input_usd_per_mtok", json!({ "$ref": "#/$defs/usd" })),
            (
                "cache_write_5m_usd_per_mtok",
                json!({ "$ref": "#/$defs/usd" }),
            ),
            (
                "cache_write_1h_usd_per_mtok",
                json!({ "$ref": "#/$defs/usd" }),
            ),
            ("cache_read_usd_per_mtok", json!({ "$ref": "#/$defs/usd" })),
            ("output_usd_per_mtok", json!({ "$ref": "#/$defs/usd" })),
        ],
        &[
            "match",
            "input_usd_per_mtok",
            "cache_write_5m_usd_per_mtok",
            "cache_write_1h_usd_per_mtok",
            "cache_read_usd_per_mtok",
            "output_usd_per_mtok",
        ],
    );
    let pricing = object(
        "the price table; every field is optional and absent ones keep the reference list prices",
        vec![
            (
                "models",
                json!({
                    "description": "`{\"match\": \"claude-opus-4-6\" or \"prefix*\", \"input_usd_per_mtok\": \"5\", \"cache_write_5m_usd_per_mtok\": \"6.25\", \"cache_write_1h_usd_per_mtok\": \"10\", \"cache_read_usd_per_mtok\": \"0.5\", \"output_usd_per_mtok\": \"25\"}`; decimal strings, parsed exactly. Same `match` replaces a default. Default: reference list prices",
                    "type": "array",
                    "items": model,
                }),
            ),
            (
                "replace_default_models",
                json!({
                    "description": "start from an empty model list",
                    "type": "boolean",
                    "default": false,
                }),
            ),
            (
                "runtime_usd_per_session_hour",
                described(
                    "price of `active_seconds`",
                    json!({ "$ref": "#/$defs/usd", "default": usd_text(prices.runtime_per_hour) }),
                ),
            ),
            (
                "web_search_usd_per_1k",
                described(
                    "price of web searches",
                    json!({ "$ref": "#/$defs/usd", "default": usd_text(prices.web_search_per_1k) }),
                ),
            ),
        ],
        &[],
    );
    object(
        "how usage is metered and priced",
        vec![
            (
                "max_event_bytes",
                json!({
                    "description": "largest usage event kept from a stream; bigger ones are counted in `ma_gateway_usage_rejected_total{reason=\"oversize\"}`, never buffered",
                    "type": "integer",
                    "minimum": 1024,
                    "maximum": 64 * 1024 * 1024,
                    "default": m.scanner.max_event_bytes,
                }),
            ),
            (
                "session_idle_ttl_secs",
                json!({
                    "description": "a session's accounting record is compacted (span ids dropped, totals kept) after this long without change",
                    "type": "integer",
                    "minimum": 60,
                    "maximum": 30 * 24 * 3600,
                    "default": m.limits.idle_ttl_secs,
                }),
            ),
            (
                "max_tracked_sessions",
                json!({
                    "description": "sessions listed for reconciliation; the least recently active is compacted first",
                    "type": "integer",
                    "minimum": 16,
                    "maximum": 1_000_000,
                    "default": m.limits.index_capacity,
                }),
            ),
            ("pricing", pricing),
            (
                "reconcile_interval_secs",
                json!({
                    "description": "how often the background service polls known sessions (0: never)",
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 24 * 3600,
                    "default": m.reconcile_interval_secs,
                }),
            ),
            (
                "reconcile_batch",
                json!({
                    "description": "sessions polled per round",
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 1000,
                    "default": m.reconcile_batch,
                }),
            ),
        ],
        &[],
    )
}

/// A closed object: `additionalProperties: false`, the given properties and required ones.
fn object(description: &str, properties: Vec<(&str, Value)>, required: &[&str]) -> Value {
    let mut props = Map::new();
    for (name, schema) in properties {
        props.insert(name.to_string(), schema);
    }
    let mut map = Map::new();
    map.insert("description".into(), json!(description));
    map.insert("type".into(), json!("object"));
    map.insert("additionalProperties".into(), json!(false));
    if !required.is_empty() {
        map.insert("required".into(), json!(required));
    }
    map.insert("properties".into(), Value::Object(props));
    Value::Object(map)
}

/// An object schema that also accepts `null` (the limits parser reads `null` as absent).
fn nullable(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.insert("type".into(), json!(["object", "null"]));
    }
    schema
}

/// `schema` with `description` set (for `$ref` leaves, whose own description is generic).
fn described(description: &str, mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.insert("description".into(), json!(description));
    }
    schema
}

/// Micro-dollars as the shortest decimal string of dollars: `80000` → `"0.08"`.
fn usd_text(micros: u64) -> String {
    let whole = micros / MICROS_PER_USD;
    let fraction = micros % MICROS_PER_USD;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}
