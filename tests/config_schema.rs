//! The plugin config schema: `examples/plugin-config.schema.json` is exactly what
//! `ma_gateway::config_schema` generates, the parser agrees with every bound, enum, type,
//! length, required field and closed object the schema states, and every plugin config shipped
//! in the repository (as JSON text) is accepted by the parser.
//!
//! The Python side (`tests/e2e/test_schema.py`) validates the same shipped configs — plus the
//! YAML-written Istio `pluginConfig`, which it also runs through the real filter in Envoy —
//! against the schema with the `jsonschema` package, checks the pattern corpus below against
//! the schema's regular expressions, and compares the README's field table with the schema.

// A test crate: its helpers (not only its #[test] functions) may unwrap and panic.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use ma_gateway::config::{Plan, MANAGED_AGENTS_BETA};
use ma_gateway::config_schema::{plugin_config_schema, plugin_config_schema_text, SCHEMA_DIALECT};
use ma_gateway::routes::Neighbour;
use ma_gateway::scopes::Scope;

const SCHEMA_FILE: &str = "examples/plugin-config.schema.json";
const REGENERATE: &str = "MA_GATEWAY_WRITE_SCHEMA=1 cargo test --test config_schema";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn checked_in_schema_is_the_generated_one() {
    let path = root().join(SCHEMA_FILE);
    let generated = plugin_config_schema_text();
    assert_eq!(
        plugin_config_schema()["$schema"],
        json!(SCHEMA_DIALECT),
        "the generator fell back to its error schema: {generated}"
    );
    if std::env::var_os("MA_GATEWAY_WRITE_SCHEMA").is_some() {
        fs::write(&path, &generated).unwrap();
        eprintln!("wrote {}", path.display());
    }
    let checked_in = fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "{SCHEMA_FILE} is not what src/config_schema.rs generates (first difference at line \
             {}).\nRegenerate it with:\n\n    {REGENERATE}\n\nand commit the result.",
            line + 1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Every shipped plugin config parses
// ---------------------------------------------------------------------------------------------

/// A plugin config found in the repository: where, and its JSON text.
struct Shipped {
    origin: String,
    text: String,
}

/// The lines indented under each line for which `is_key(line, previous line)` holds.
fn blocks_under(text: &str, is_key: impl Fn(&str, &str) -> bool) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let previous = if i == 0 { "" } else { lines[i - 1] };
        if !is_key(line.trim(), previous) {
            continue;
        }
        let mut block = Vec::new();
        for next in &lines[i + 1..] {
            if next.trim().is_empty() {
                block.push("");
                continue;
            }
            if indent(next) <= indent(line) {
                break;
            }
            block.push(next);
        }
        blocks.push(block.join("\n"));
    }
    blocks
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

/// Every plugin config the repository ships as JSON text: the example JSON files, the
/// `StringValue` of every plain-Envoy config and xDS resource file (`examples/ecds/`,
/// `examples/lds/`), and the `config:` of every Envoy Gateway `EnvoyExtensionPolicy`. (The Istio `pluginConfig` is YAML; test_schema.py covers it.)
fn shipped_plugin_configs() -> Vec<Shipped> {
    let root = root();
    let examples = root.join("examples");
    let mut shipped = Vec::new();
    let relative = |p: &Path| p.strip_prefix(&root).unwrap().display().to_string();
    for path in files(&examples, ".json") {
        if path.to_string_lossy().ends_with(".schema.json") {
            continue;
        }
        shipped.push(Shipped {
            origin: relative(&path),
            text: fs::read_to_string(&path).unwrap(),
        });
    }
    let mut envoy_configs = vec![root.join("envoy.yaml")];
    envoy_configs.extend(files(&examples, ".envoy.yaml"));
    // xDS resource files served from a watched directory: the ECDS filter config, the LDS listener.
    for dir in ["ecds", "lds"] {
        envoy_configs.extend(files(&examples.join(dir), ".yaml"));
    }
    for path in envoy_configs {
        let text = fs::read_to_string(&path).unwrap();
        let blocks = blocks_under(&text, |line, previous| {
            line == "value: |" && previous.contains("google.protobuf.StringValue")
        });
        assert!(
            !blocks.is_empty(),
            "no plugin StringValue in {}",
            relative(&path)
        );
        for (i, block) in blocks.into_iter().enumerate() {
            shipped.push(Shipped {
                origin: format!("{} (StringValue {i})", relative(&path)),
                text: block,
            });
        }
    }
    for dir in ["envoy-gateway", "ai-gateway"] {
        for path in files(&examples.join(dir), ".yaml") {
            let text = fs::read_to_string(&path).unwrap();
            if !text.contains("kind: EnvoyExtensionPolicy") {
                continue;
            }
            let blocks = blocks_under(&text, |line, _| line == "config:");
            assert!(!blocks.is_empty(), "no wasm config in {}", relative(&path));
            for (i, block) in blocks.into_iter().enumerate() {
                shipped.push(Shipped {
                    origin: format!("{} (wasm config {i})", relative(&path)),
                    text: block,
                });
            }
        }
    }
    shipped
}

#[test]
fn every_shipped_plugin_config_parses() {
    let shipped = shipped_plugin_configs();
    let mut failures = Vec::new();
    for config in &shipped {
        if let Err(err) = Plan::from_json(config.text.as_bytes()) {
            failures.push(format!("{}: {err}", config.origin));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let origins: Vec<&str> = shipped.iter().map(|s| s.origin.as_str()).collect();
    for expected in [
        "examples/plugin-config.json",
        "examples/plugin-config.minimal.json",
        "envoy.yaml (StringValue 0)",
        "examples/ecds/ma_gateway.yaml (StringValue 0)",
        "examples/lds/listener.yaml (StringValue 0)",
        "examples/envoy-gateway/extension-policy.yaml (wasm config 0)",
        "examples/ai-gateway/managed-agents.yaml (wasm config 0)",
    ] {
        assert!(
            origins.contains(&expected),
            "{expected} not found in {origins:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The parser agrees with what the schema states
// ---------------------------------------------------------------------------------------------

const KEY_HASH: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// A config with every field of the schema present (every optional section, every map with an
/// entry), valid as a whole: each probe changes one spot of it.
fn kitchen_sink() -> Value {
    let rates = |create: u64, stream: u64, streams: u64| {
        json!({
            "create": {"per_minute": create, "burst": create / 10 + 1},
            "read": {"per_minute": create * 2, "burst": create},
            "stream": {"per_minute": stream, "burst": stream / 10 + 1},
            "concurrent_streams": streams
        })
    };
    let mut acme_limits = rates(1000, 100, 50);
    acme_limits["per_principal"] = rates(100, 10, 10);
    json!({
        "api_version": "v1",
        "upstream": {"authority": "api.anthropic.com:443", "credential_env": "ANTHROPIC_API_KEY",
                     "anthropic_version": "2023-06-01", "cluster": "anthropic"},
        "credentials": [
            {"name": "research", "env": "RESEARCH_KEY"},
            {"name": "vaulted", "vault": {"cluster": "vault", "authority": "vault:8200",
              "path": "/v1/secret/data/a", "field": "api_key", "token_env": "VAULT_TOKEN",
              "refresh_secs": 60}}
        ],
        "tenants": [
            {"name": "acme", "scopes": ["*:*"], "credential": "research"},
            {"name": "ro", "scopes": ["sessions:readonly"], "credential": "default"},
            {"name": "default", "scopes": ["*:readonly"], "credential": "vaulted"}
        ],
        "isolation": {"enabled": true, "tag_key": "ma_gateway_tenant", "untagged": "deny",
                      "max_body_bytes": 1_048_576, "hold_request_head": true},
        "limits": {
            "per_tenant": rates(300, 60, 20),
            "per_principal": rates(60, 6, 5),
            "tenants": {"acme": acme_limits},
            "budgets": {"tenants": {
                "acme": {"tokens_per_minute": 100_000, "tokens_per_day": 5_000_000,
                         "tokens_per_month": 100_000_000, "microdollars_per_minute": 1_000_000,
                         "microdollars_per_day": 50_000_000, "microdollars_per_month": 1_000_000_000u64,
                         "session_microdollars": 2_000_000},
                "*": {"microdollars_per_day": 5_000_000}
            }},
            "stream_slot_lease_secs": 60
        },
        "policy": {"tenants": {
            "acme": {
                "models": {"allow": ["claude-sonnet-4-*"], "deny": ["*-fast"]},
                "tools": {"allow": ["read", "custom:*"], "deny": ["bash"]},
                "mcp_servers": {"allow_urls": ["https://mcp.internal/*"]},
                "environments": {"forbid_unrestricted": true, "allowed_hosts": ["*.internal.example"],
                                 "allow_package_managers": false},
                "vaults": false,
                "max_body_bytes": 65_536,
                "fast_mode": false,
                "inference_geo": {"allow": ["us", "default"], "deny": ["eu"]},
                "multiagent": {"subagents": true, "workflows": false, "inline_agents": false},
                "execution_identity": {"allow": ["service_account", "aws_role"],
                                       "role_arns": ["arn:aws:iam::111122223333:role/agents-*"]},
                "deployments": {"schedules": false}
            },
            "*": {"environments": {"forbid_unrestricted": true}}
        }},
        "audit": {"redact_ids": true},
        "jwt": {"tenant_claim": "org", "scopes_claim": "scope", "subject_claim": "sub",
                "metadata_key": "jwt_payload"},
        "betas": {"required": [MANAGED_AGENTS_BETA, "files-api-2025-04-14"],
                  "allowed": ["skills-2025-10-02"]},
        "routes": {"neighbours": ["files", "skills"], "shared_neighbours": ["files", "skills", "memory_stores", "deployments", "dreams", "tunnels", "user_profiles"], "max_path_bytes": 2048, "max_id_bytes": 128},
        "gateway_keys": [
            {"name": "ci", "sha256": KEY_HASH, "tenant": "acme",
             "expires_at": "2027-01-01T00:00:00Z", "scopes": ["sessions:read"]}
        ],
        "metering": {
            "max_event_bytes": 262_144, "session_idle_ttl_secs": 21_600,
            "max_tracked_sessions": 1024, "reconcile_interval_secs": 30, "reconcile_batch": 16,
            "pricing": {
                "models": [{"match": "claude-test-*", "input_usd_per_mtok": "3",
                            "cache_write_5m_usd_per_mtok": "3.75", "cache_write_1h_usd_per_mtok": 6,
                            "cache_read_usd_per_mtok": "0.30", "output_usd_per_mtok": "15"}],
                "replace_default_models": false,
                "runtime_usd_per_session_hour": "0.08",
                "web_search_usd_per_1k": 10
            }
        }
    })
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// A path as the parser's errors spell it: `limits.tenants.acme.create[0]`.
fn spelled(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn at_mut<'a>(value: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(value, |v, step| match step {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

fn child(path: &[Step], step: Step) -> Vec<Step> {
    let mut out = path.to_vec();
    out.push(step);
    out
}

/// The parser's verdict: `None` when it accepts, else the path of its error.
fn error_path(config: &Value) -> Option<String> {
    Plan::from_json(config.to_string().as_bytes())
        .err()
        .map(|e| e.path)
}

fn under(error: &str, path: &str) -> bool {
    error == path
        || error.starts_with(&format!("{path}."))
        || error.starts_with(&format!("{path}["))
}

/// The schema with `$ref` resolved (the referenced schema, then the sibling keywords).
fn resolved(schema: &Value, defs: &Value) -> Value {
    let mut out = schema.clone();
    while let Some(reference) = out.get("$ref").and_then(Value::as_str).map(str::to_string) {
        let name = reference.trim_start_matches("#/$defs/");
        let mut merged = defs[name].clone();
        for (k, v) in out.as_object().unwrap() {
            if k != "$ref" {
                merged[k.as_str()] = v.clone();
            }
        }
        out = merged;
    }
    out
}

fn types(schema: &Value) -> Vec<String> {
    match &schema["type"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        _ => Vec::new(),
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Walks the schema along the kitchen-sink config and probes the parser at every node.
struct Prober {
    defs: Value,
    base: Value,
    /// Schema paths (`credentials[].vault.path`, `limits.tenants.<name>.read`) reached.
    covered: BTreeSet<String>,
    failures: Vec<String>,
    probes: usize,
}

impl Prober {
    fn expect(&mut self, what: &str, path: &[Step], value: Value, accepted: bool) {
        let mut config = self.base.clone();
        *at_mut(&mut config, path) = value.clone();
        self.expect_config(what, &spelled(path), &config, accepted, &value);
    }

    fn expect_config(
        &mut self,
        what: &str,
        at: &str,
        config: &Value,
        accepted: bool,
        shown: &Value,
    ) {
        self.probes += 1;
        let error = error_path(config);
        let rejected_here = error.as_deref().is_some_and(|e| under(e, at));
        if rejected_here == accepted {
            let shown = shown.to_string();
            let shown: String = shown.chars().take(80).collect();
            self.failures.push(format!(
                "{at}: {what} {shown} — schema says {}, parser {}",
                if accepted { "valid" } else { "invalid" },
                match &error {
                    None => "accepts it".to_string(),
                    Some(e) => format!("rejects it at {e}"),
                }
            ));
        }
    }

    fn walk(&mut self, schema: &Value, path: Vec<Step>, generic: String, here: Value) {
        let schema = resolved(schema, &self.defs);
        self.covered.insert(generic.clone());
        let allowed = types(&schema);
        if !path.is_empty() {
            self.probe_leaf(&schema, &path, &allowed, &here);
        }
        if let Some(properties) = schema["properties"].as_object() {
            if schema["additionalProperties"] == json!(false) {
                // The kitchen sink holds every field the parser knows: each must be declared.
                for key in here.as_object().map(|m| m.keys()).into_iter().flatten() {
                    if !properties.contains_key(key) {
                        self.failures.push(format!(
                            "{}: the parser accepts this field, the schema does not declare it",
                            spelled(&child(&path, Step::Key(key.clone())))
                        ));
                    }
                }
                let unknown = child(&path, Step::Key("zz_unknown".into()));
                let mut config = self.base.clone();
                at_mut(&mut config, &path)["zz_unknown"] = json!(1);
                self.expect_config(
                    "unknown field",
                    &spelled(&unknown),
                    &config,
                    false,
                    &json!(1),
                );
            }
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().map(|v| v.as_str().unwrap()).collect())
                .unwrap_or_default();
            let exclusive: Vec<String> = schema["oneOf"]
                .as_array()
                .map(|alts| {
                    alts.iter()
                        .flat_map(|a| a["required"].as_array().cloned().unwrap_or_default())
                        .map(|v| v.as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            for (key, sub) in properties {
                let Some(value) = here.get(key) else { continue };
                let sub_path = child(&path, Step::Key(key.clone()));
                if !exclusive.contains(key) {
                    let mut config = self.base.clone();
                    at_mut(&mut config, &path)
                        .as_object_mut()
                        .unwrap()
                        .remove(key);
                    let accepted = !required.contains(&key.as_str());
                    self.expect_config(
                        "without",
                        &spelled(&sub_path),
                        &config,
                        accepted,
                        &json!(null),
                    );
                }
                let generic = if generic.is_empty() {
                    key.clone()
                } else {
                    format!("{generic}.{key}")
                };
                self.walk(sub, sub_path, generic, value.clone());
            }
        }
        if let (Some(items), Some(values)) = (schema.get("items"), here.as_array()) {
            for (i, value) in values.iter().enumerate() {
                self.walk(
                    items,
                    child(&path, Step::Index(i)),
                    format!("{generic}[]"),
                    value.clone(),
                );
            }
        }
        if let (Some(entry), Some(map)) = (
            schema.get("additionalProperties").filter(|a| a.is_object()),
            here.as_object(),
        ) {
            self.probe_keys(&schema["propertyNames"], &path, map.keys().next().cloned());
            for (key, value) in map {
                self.walk(
                    entry,
                    child(&path, Step::Key(key.clone())),
                    format!("{generic}.<name>"),
                    value.clone(),
                );
            }
        }
    }

    fn probe_leaf(&mut self, schema: &Value, path: &[Step], allowed: &[String], here: &Value) {
        let allows = |t: &str| allowed.iter().any(|a| a == t);
        if !allowed.is_empty() {
            let wrong = [json!("x"), json!(7), json!(true), json!([]), json!({})]
                .into_iter()
                .find(|v| !allows(type_of(v)));
            if let Some(wrong) = wrong {
                self.expect("wrong type", path, wrong, false);
            }
            self.expect("null", path, Value::Null, allows("null"));
        }
        if allows("integer") {
            let number = |n: i128| -> Value { serde_json::from_str(&n.to_string()).unwrap() };
            if let Some(min) = schema["minimum"].as_u64() {
                self.expect("minimum", path, json!(min), true);
                self.expect("below minimum", path, number(i128::from(min) - 1), false);
            }
            if let Some(max) = schema["maximum"].as_u64() {
                self.expect("maximum", path, json!(max), true);
                self.expect("above maximum", path, number(i128::from(max) + 1), false);
            }
        }
        if let Some(values) = schema["enum"].as_array() {
            for value in values {
                self.expect("enum value", path, value.clone(), true);
            }
            self.expect("not in enum", path, json!("zz-not-listed"), false);
        }
        if let Some(value) = schema.get("const") {
            self.expect("const", path, value.clone(), true);
            self.expect("not the const", path, json!("zz"), false);
        }
        if allows("string") {
            let grown = |n: u64| -> Value {
                let mut s = here.as_str().unwrap_or("").to_string();
                while (s.chars().count() as u64) < n {
                    s.push('a');
                }
                json!(s)
            };
            if let Some(max) = schema["maxLength"].as_u64() {
                self.expect("longest", path, grown(max), true);
                self.expect("too long", path, grown(max + 1), false);
            }
            if schema["minLength"].as_u64() == Some(1) {
                self.expect("empty", path, json!(""), false);
            }
        }
    }

    /// The names of a map (`limits.tenants`): the parser refuses a bad key at the map's path.
    fn probe_keys(&mut self, names: &Value, path: &[Step], key: Option<String>) {
        let Some(key) = key else { return };
        let base = self.base.clone();
        let renamed = |new: &str| -> Value {
            let mut config = base.clone();
            let map = at_mut(&mut config, path).as_object_mut().unwrap();
            let value = map.remove(&key).unwrap();
            map.insert(new.to_string(), value);
            config
        };
        let at = spelled(path);
        if let Some(max) = names["maxLength"].as_u64() {
            let longest = "a".repeat(max as usize);
            let too_long = "a".repeat(max as usize + 1);
            self.expect_config(
                "longest name",
                &at,
                &renamed(&longest),
                true,
                &json!(longest),
            );
            self.expect_config(
                "too long a name",
                &at,
                &renamed(&too_long),
                false,
                &json!(too_long),
            );
        }
        if names["minLength"].as_u64() == Some(1) {
            self.expect_config("empty name", &at, &renamed(""), false, &json!(""));
        }
        self.expect_config(
            "name with a space",
            &at,
            &renamed("a b"),
            false,
            &json!("a b"),
        );
    }
}

/// Every property path the schema declares, in the walker's notation.
fn schema_paths(schema: &Value, defs: &Value, generic: String, out: &mut BTreeSet<String>) {
    let schema = resolved(schema, defs);
    out.insert(generic.clone());
    if let Some(properties) = schema["properties"].as_object() {
        for (key, sub) in properties {
            let next = if generic.is_empty() {
                key.clone()
            } else {
                format!("{generic}.{key}")
            };
            schema_paths(sub, defs, next, out);
        }
    }
    if let Some(items) = schema.get("items") {
        schema_paths(items, defs, format!("{generic}[]"), out);
    }
    if let Some(entry) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        schema_paths(entry, defs, format!("{generic}.<name>"), out);
    }
}

#[test]
fn parser_agrees_with_every_bound_enum_type_and_closed_object_of_the_schema() {
    let schema = plugin_config_schema();
    let defs = schema["$defs"].clone();
    let base = kitchen_sink();
    assert_eq!(
        error_path(&base),
        None,
        "the kitchen-sink config must be valid"
    );
    let mut prober = Prober {
        defs: defs.clone(),
        base: base.clone(),
        covered: BTreeSet::new(),
        failures: Vec::new(),
        probes: 0,
    };
    prober.walk(&schema, Vec::new(), String::new(), base);
    assert!(
        prober.failures.is_empty(),
        "{} of {} probes disagree:\n{}",
        prober.failures.len(),
        prober.probes,
        prober.failures.join("\n")
    );
    let mut declared = BTreeSet::new();
    schema_paths(&schema, &defs, String::new(), &mut declared);
    let missed: Vec<&String> = declared.difference(&prober.covered).collect();
    assert!(
        missed.is_empty(),
        "the kitchen-sink config does not reach {missed:?}"
    );
    assert!(prober.probes > 400, "only {} probes ran", prober.probes);
}

#[test]
fn scope_pattern_lists_exactly_the_scopes_the_parser_accepts() {
    let schema = plugin_config_schema();
    let pattern = schema["$defs"]["scope"]["pattern"].as_str().unwrap();
    let body = pattern
        .strip_prefix("^(")
        .unwrap()
        .strip_suffix(")$")
        .unwrap();
    let (families, actions) = body.split_once("):(").unwrap();
    let families: Vec<&str> = families.split('|').collect();
    let actions: Vec<&str> = actions.split('|').collect();
    assert_eq!(families[0], r"\*");
    assert_eq!(&actions[..2], [r"\*", "readonly"]);
    for family in &families {
        for action in &actions {
            let scope = format!(
                "{}:{}",
                family.replace(r"\*", "*"),
                action.replace(r"\*", "*")
            );
            assert!(
                Scope::parse(&scope).is_ok(),
                "{scope} is in the schema but refused"
            );
        }
    }
    for family in &families[1..] {
        assert!(Scope::parse(&format!("{family}s:read")).is_err());
        assert!(Scope::parse(&format!("{}:read", family.to_uppercase())).is_err());
    }
    for action in &actions[2..] {
        assert!(Scope::parse(&format!("sessions:{action}x")).is_err());
    }
    let neighbours = &schema["properties"]["routes"]["properties"]["neighbours"]["items"]["enum"];
    let all: Vec<&str> = Neighbour::ALL.iter().map(|n| n.as_str()).collect();
    assert_eq!(neighbours, &json!(all));
    assert_eq!(
        schema["properties"]["betas"]["properties"]["required"]["contains"],
        json!({"const": MANAGED_AGENTS_BETA})
    );
}

/// Configs on either side of the schema's string patterns (character sets, formats), with the
/// parser's verdict. test_schema.py reads this very table and checks the schema's verdict on
/// each: one corpus, both sides.
#[rustfmt::skip]
const PATTERN_CORPUS: &[(bool, &str)] = &[
    (true, r#"{"api_version":"v1","upstream":{"authority":"api.anthropic.com"}}"#),
    (true, r#"{"api_version":"v1","upstream":{"authority":"[::1]:8443"}}"#),
    (false, r#"{"api_version":"v1","upstream":{"authority":"a b"}}"#),
    (false, r#"{"api_version":"v1","upstream":{"authority":"host/path"}}"#),
    (true, r#"{"api_version":"v1","upstream":{"credential_env":"TEAM_A_KEY"}}"#),
    (false, r#"{"api_version":"v1","upstream":{"credential_env":"sk-ant-api03"}}"#),
    (true, r#"{"api_version":"v1","upstream":{"anthropic_version":"2023-06-01"}}"#),
    (false, r#"{"api_version":"v1","upstream":{"anthropic_version":"2023,06"}}"#),
    (false, r#"{"api_version":"v1","upstream":{"anthropic_version":"2023 06"}}"#),
    (false, r#"{"api_version":"v1","upstream":{"anthropic_version":"v\u00e9"}}"#),
    (true, r#"{"api_version":"v1","upstream":{"cluster":"outbound|80||api.anthropic.com"}}"#),
    (true, r#"{"api_version":"v1","betas":{"allowed":["x~!"]}}"#),
    (true, r#"{"api_version":"v1","tenants":[{"name":"team.a_b-1"}]}"#),
    (false, r#"{"api_version":"v1","tenants":[{"name":"team a"}]}"#),
    (false, r#"{"api_version":"v1","tenants":[{"name":"\u00e9quipe"}]}"#),
    (true, r#"{"api_version":"v1","tenants":[{"name":"t","scopes":["*:*","sessions:readonly","vault_credentials:archive","*:send_events"]}]}"#),
    (false, r#"{"api_version":"v1","tenants":[{"name":"t","scopes":["sessions:fly"]}]}"#),
    (false, r#"{"api_version":"v1","tenants":[{"name":"t","scopes":["sessions"]}]}"#),
    (false, r#"{"api_version":"v1","tenants":[{"name":"t","scopes":["sessions:*:x"]}]}"#),
    (false, r#"{"api_version":"v1","tenants":[{"name":"t","scopes":["Sessions:read"]}]}"#),
    (true, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2C26B46B68FFC68FF99B453C1D30413413422D706483BFA0F98A5E886266E7AE"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7a"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"gc26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}]}"#),
    (true, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","expires_at":"2027-01-31T00:00:00Z"}]}"#),
    (true, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","expires_at":"2027-01-31t23:59:59.250z"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","expires_at":"2027-01-31 00:00:00Z"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","expires_at":"2027-1-31T00:00:00Z"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","expires_at":"2027-01-31T00:00:00+01:00"}]}"#),
    (false, r#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","expires_at":"tomorrow"}]}"#),
    (true, r#"{"api_version":"v1","isolation":{"tag_key":"owner tenant"}}"#),
    (false, r#"{"api_version":"v1","isolation":{"tag_key":"owner\u0007"}}"#),
    (false, r#"{"api_version":"v1","isolation":{"tag_key":"owner\u0085"}}"#),
    (true, r#"{"api_version":"v1","credentials":[{"name":"v","vault":{"cluster":"","authority":"","path":"/v1/a","token_env":"T"}}]}"#),
    (false, r#"{"api_version":"v1","credentials":[{"name":"v","vault":{"cluster":"c","authority":"a","path":"v1/a","token_env":"T"}}]}"#),
    (false, r#"{"api_version":"v1","credentials":[{"name":"v","vault":{"cluster":"c","authority":"a","path":"/v1/a b","token_env":"T"}}]}"#),
    (false, r#"{"api_version":"v1","credentials":[{"name":"v","vault":{"cluster":"c","authority":"a","path":"/v1/a","token_env":"hvs.token"}}]}"#),
    (false, r#"{"api_version":"v1","credentials":[{"name":"v","env":"E","vault":{"cluster":"c","authority":"a","path":"/p","token_env":"T"}}]}"#),
    (false, r#"{"api_version":"v1","credentials":[{"name":"v"}]}"#),
    (true, r#"{"api_version":"v1","tenants":[{"name":"t"}],"jwt":{"tenant_claim":"https://example.com/claims tenant"}}"#),
    (false, r#"{"api_version":"v1","jwt":{"tenant_claim":"org\u0001"}}"#),
    (true, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":"0.000001","web_search_usd_per_1k":"1.0000000"}}}"#),
    (true, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":"000.50","web_search_usd_per_1k":0}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":"1.0000001"}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":"1."}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":".5"}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":"-1"}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":"1e3"}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"runtime_usd_per_session_hour":" 1"}}}"#),
    (true, r#"{"api_version":"v1","metering":{"pricing":{"models":[{"match":"*","input_usd_per_mtok":"1","cache_write_5m_usd_per_mtok":"1","cache_write_1h_usd_per_mtok":"1","cache_read_usd_per_mtok":"1","output_usd_per_mtok":"1"}]}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"models":[{"match":"claude-*-x","input_usd_per_mtok":"1","cache_write_5m_usd_per_mtok":"1","cache_write_1h_usd_per_mtok":"1","cache_read_usd_per_mtok":"1","output_usd_per_mtok":"1"}]}}}"#),
    (false, r#"{"api_version":"v1","metering":{"pricing":{"models":[{"match":"claude x","input_usd_per_mtok":"1","cache_write_5m_usd_per_mtok":"1","cache_write_1h_usd_per_mtok":"1","cache_read_usd_per_mtok":"1","output_usd_per_mtok":"1"}]}}}"#),
    (true, r#"{"api_version":"v1","policy":{"tenants":{"*":{"models":{"allow":["claude-\u00e9*"]},"mcp_servers":{"allow_urls":["https://mcp.example/*","http://10.0.0.1:8080"]},"environments":{"allowed_hosts":["*.example.com","EXAMPLE.org"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"models":{"deny":["claude sonnet"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"tools":{"deny":["bash\u00a0"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"tools":{"deny":["bash\u2028"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"mcp_servers":{"allow_urls":["mcp.example/*"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"mcp_servers":{"allow_urls":["https:///x"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"mcp_servers":{"allow_urls":["h2://x"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"environments":{"allowed_hosts":["exa_mple.com"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"*":{"environments":{"allowed_hosts":["host:80"]}}}}}"#),
    (false, r#"{"api_version":"v1","policy":{"tenants":{"a*":{}}}}"#),
    (true, r#"{"api_version":"v1","limits":{"budgets":{"tenants":{"*":{"tokens_per_day":0}}}}}"#),
    (false, r#"{"api_version":"v1","limits":{"tenants":{"*":{}}}}"#),
    (false, r#"{"api_version":"v1","routes":{"neighbours":["mail"]}}"#),
];

#[test]
fn pattern_corpus_matches_the_parser() {
    let mut wrong = Vec::new();
    for (valid, text) in PATTERN_CORPUS {
        let verdict = Plan::from_json(text.as_bytes());
        if verdict.is_ok() != *valid {
            wrong.push(format!(
                "{text}\n  expected valid={valid}, parser: {verdict:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
