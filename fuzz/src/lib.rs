//! The fuzz targets of ma-gateway's pure core, as plain functions over bytes.
//!
//! Each `fuzz_targets/<name>.rs` is a one-line libFuzzer wrapper around the function of the
//! same name here; `src/bin/stable_mutate.rs` drives the same functions with a deterministic
//! mutation loop when no nightly toolchain is available. Every target asserts properties, not
//! only the absence of panics; an assertion failure is a finding.
//!
//! Inputs are decoded with [`Input`]: a few leading bytes choose options (an operation, split
//! points, a tenant), the rest is the body under test.

// Harness code: assertions are the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use ma_gateway::accounting::Limits;
use ma_gateway::config::Plan;
use ma_gateway::credentials::{self, KeyRing, StoredCredential};
use ma_gateway::errors::ApiError;
use ma_gateway::gateway::{self, RequestHead};
use ma_gateway::headers::{HeaderEdit, CREDENTIAL_HEADERS, HOP_BY_HOP_HEADERS};
use ma_gateway::jwt::{self, JwtRules};
use ma_gateway::metering::{MeterContext, ResponseMeter};
use ma_gateway::policy::{self, PolicyRules};
use ma_gateway::pricing::{self, ModelPattern, PriceTable};
use ma_gateway::routes::{classify, Action, Family, IdKind, Neighbour, Operation, RouteRules};
use ma_gateway::scopes::Scope;
use ma_gateway::sse::{Scanner, ScannerConfig, SseEvent, DEFAULT_MAX_EVENT_BYTES};
use ma_gateway::store::MemoryStore;
use ma_gateway::tenancy::{self, LookupResult, Owner, Ownership, Untagged};
use ma_gateway::{audit, sha256, time, usage};
use serde_json::{json, Value};

/// A fuzz target: bytes in, panics on a finding.
pub type Target = fn(&[u8]);

/// Every target, by name (the stable runner uses this list).
pub const TARGETS: [(&str, Target); 13] = [
    ("sse", sse),
    ("routes", routes),
    ("config", config),
    ("tenancy_request", tenancy_request),
    ("tenancy_response", tenancy_response),
    ("policy", policy),
    ("usage", usage),
    ("metering", metering),
    ("jwt", jwt),
    ("vault", vault),
    ("audit", audit),
    ("gateway", gateway),
    ("text", text),
];

/// A cursor over the fuzz input: option bytes first, then the rest.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// The next byte, or 0 when the input is exhausted.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | (u16::from(self.byte()) << 8)
    }

    /// Everything not consumed yet.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }

    /// Up to the next `sep` (consumed), or everything.
    pub fn until(&mut self, sep: u8) -> &'a [u8] {
        match self.data.iter().position(|&b| b == sep) {
            Some(i) => {
                let (head, tail) = self.data.split_at(i);
                self.data = &tail[1..];
                head
            }
            None => std::mem::take(&mut self.data),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SSE scanner
// ---------------------------------------------------------------------------------------------

const METERED: [&str; 5] = [
    "span.model_request_end",
    "span.outcome_evaluation_end",
    "session.usage",
    "session.error",
    "message",
];

#[derive(Debug, PartialEq, Eq)]
struct Scan {
    events: Vec<(String, Option<String>, Vec<u8>, bool)>,
    stats: ma_gateway::sse::ScanStats,
    retry: Option<u64>,
    max_buffered: usize,
}

fn scan(chunks: &[&[u8]], max_event_bytes: usize) -> Scan {
    let mut scanner = Scanner::new(&METERED, ScannerConfig { max_event_bytes });
    let mut events = Vec::new();
    let mut on_event = |e: SseEvent<'_>| {
        assert!(
            METERED.contains(&e.name),
            "uninteresting event {:?}",
            e.name
        );
        assert!(e.data.len() <= max_event_bytes, "event data over the cap");
        assert!(!e.oversize || e.data.is_empty(), "oversize event with data");
        if let Some(id) = e.id {
            assert!(!id.is_empty() && !id.contains('\0'), "bad event id {id:?}");
        }
        events.push((
            e.name.to_string(),
            e.id.map(str::to_string),
            e.data.to_vec(),
            e.oversize,
        ));
    };
    let mut max_buffered = 0;
    for chunk in chunks {
        scanner.feed(chunk, &mut on_event);
        max_buffered = max_buffered.max(scanner.buffered_bytes());
    }
    scanner.finish(&mut on_event);
    // Idempotent: a second finish dispatches nothing.
    scanner.finish(&mut |_| panic!("second finish dispatched an event"));
    let stats = scanner.stats();
    Scan {
        events,
        stats,
        retry: scanner.retry(),
        max_buffered,
    }
}

/// Byte 0: event cap selector; byte 1: number of split points; then that many u16 offsets;
/// the rest is the stream. Checks that the outcome does not depend on where the stream is cut
/// (whole, at the fuzzer's points, and byte by byte for short inputs), that only interesting
/// events come out within the cap, and that memory stays bounded.
pub fn sse(data: &[u8]) {
    let mut input = Input::new(data);
    let max_event_bytes = match input.byte() % 4 {
        0 => DEFAULT_MAX_EVENT_BYTES,
        1 => 0,
        2 => 7,
        _ => 64,
    };
    let splits = usize::from(input.byte() % 16);
    let mut points: Vec<usize> = (0..splits).map(|_| usize::from(input.u16())).collect();
    let stream = input.rest();
    points.iter_mut().for_each(|p| *p %= stream.len() + 1);
    points.sort_unstable();

    let whole = scan(&[stream], max_event_bytes);
    let mut chunks = Vec::new();
    let mut last = 0;
    for p in points {
        chunks.push(&stream[last..p]);
        last = p;
    }
    chunks.push(&stream[last..]);
    let split = scan(&chunks, max_event_bytes);
    assert_eq!(whole.events, split.events, "events depend on chunking");
    assert_eq!(whole.stats, split.stats, "stats depend on chunking");
    assert_eq!(whole.retry, split.retry, "retry depends on chunking");
    if stream.len() <= 512 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let byte_by_byte = scan(&bytes, max_event_bytes);
        assert_eq!(
            whole.events, byte_by_byte.events,
            "byte-by-byte events differ"
        );
        assert_eq!(whole.stats, byte_by_byte.stats, "byte-by-byte stats differ");
    }
    let stats = whole.stats;
    assert_eq!(stats.bytes, stream.len() as u64);
    assert_eq!(stats.interesting, whole.events.len() as u64);
    assert!(stats.interesting <= stats.events + 1, "{stats:?}");
    assert_eq!(
        stats.oversize,
        whole.events.iter().filter(|e| e.3).count() as u64
    );
    // Bounded memory: one event's data (doubling growth) plus the last id (lossy UTF-8).
    let bound = 2 * max_event_bytes.max(16 * 1024) + 3 * ma_gateway::sse::MAX_ID_BYTES + 64;
    assert!(
        whole.max_buffered <= bound && split.max_buffered <= bound,
        "buffered {} / {} > {bound}",
        whole.max_buffered,
        split.max_buffered
    );
}

// ---------------------------------------------------------------------------------------------
// Route classifier
// ---------------------------------------------------------------------------------------------

/// Byte 0: neighbours enabled (bit per neighbour) and a method; then `path`. Checks default
/// deny (only GET/POST/DELETE, only `/v1/…` of safe bytes), that the query never matters, that
/// every id returned is a whole, well-formed segment of the path, and agreement with a
/// classifier that has every neighbour enabled.
pub fn routes(data: &[u8]) {
    let mut input = Input::new(data);
    let options = input.byte();
    let methods = ["GET", "POST", "DELETE", "PUT", "get", "PATCH", "HEAD", ""];
    let method = methods[usize::from(options & 7)];
    let neighbours: Vec<Neighbour> = Neighbour::ALL
        .into_iter()
        .enumerate()
        .filter(|(i, _)| options & (8 << i) != 0)
        .map(|(_, n)| n)
        .collect();
    let rules = RouteRules {
        neighbours,
        ..RouteRules::default()
    };
    let Ok(path) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let result = classify(&rules, method, path);
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    assert_eq!(
        result,
        classify(&rules, method, bare),
        "the query changed the result"
    );
    let all = RouteRules {
        neighbours: Neighbour::ALL.to_vec(),
        ..RouteRules::default()
    };
    if let Some(op) = &result {
        assert!(
            matches!(method, "GET" | "POST" | "DELETE"),
            "{method} routed"
        );
        assert!(bare.starts_with("/v1/") && bare.len() <= rules.max_path_bytes);
        assert!(
            bare.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.')),
            "unsafe byte routed: {bare:?}"
        );
        let segments: Vec<&str> = bare.split('/').collect();
        assert!(segments
            .iter()
            .skip(1)
            .all(|s| !s.is_empty() && *s != "." && *s != ".."));
        for (_, id) in &op.ids {
            assert!(
                segments.contains(&id.as_str()),
                "id {id:?} not a segment of {bare:?}"
            );
            assert!(id.len() <= rules.max_id_bytes);
            assert!(!id.contains('.'), "dotted id {id:?}");
        }
        assert_eq!(classify(&all, method, path).as_ref(), Some(op));
        // Re-classifying the same call is stable, whatever the case of the query.
        assert_eq!(classify(&rules, method, &format!("{bare}?X=1")), result);
    }
    // The upper-case form of a path is a different path: never the same operation with
    // different ids (no case folding).
    let upper = bare.to_ascii_uppercase();
    if upper != bare {
        if let (Some(a), Some(b)) = (&result, classify(&rules, method, &upper)) {
            assert_ne!(a, &b, "case folding: {bare:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config parser
// ---------------------------------------------------------------------------------------------

/// The plugin config. Checks that parsing is deterministic, that an accepted config is
/// internally consistent (a `default` credential, tenants' credentials declared, unique
/// names), that errors are bounded and name a path, and that a config reformatted by serde
/// parses the same.
pub fn config(data: &[u8]) {
    match Plan::from_json(data) {
        Ok(plan) => {
            assert!(plan.credentials.iter().any(|c| c.name == "default"));
            for tenant in &plan.tenants {
                assert!(
                    plan.credentials.iter().any(|c| c.name == tenant.credential),
                    "tenant {} uses an undeclared credential",
                    tenant.name
                );
            }
            let mut names: Vec<&str> = plan.tenants.iter().map(|t| t.name.as_str()).collect();
            names.sort_unstable();
            let before = names.len();
            names.dedup();
            assert_eq!(before, names.len(), "duplicate tenant names accepted");
            assert!(tenancy::valid_tag_key(&plan.isolation.tag_key));
            let value: Value = serde_json::from_slice(data).expect("accepted but not JSON");
            let again = Plan::from_json(&serde_json::to_vec(&value).unwrap())
                .expect("the re-serialized config was refused");
            assert_eq!(format!("{plan:?}"), format!("{again:?}"));
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
            assert!(
                text.len() <= 4096 + data.len().min(4096),
                "config error of {} bytes",
                text.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operations for the body targets
// ---------------------------------------------------------------------------------------------

/// Calls covering every family and action that has a body or a rewritten response.
const CALLS: [(&str, &str); 40] = [
    ("POST", "/v1/agents"),
    ("GET", "/v1/agents"),
    ("GET", "/v1/agents/agent_01"),
    ("POST", "/v1/agents/agent_01"),
    ("POST", "/v1/agents/agent_01/archive"),
    ("GET", "/v1/agents/agent_01/versions"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/sesn_1"),
    ("POST", "/v1/sessions/sesn_1"),
    ("DELETE", "/v1/sessions/sesn_1"),
    ("POST", "/v1/sessions/sesn_1/archive"),
    ("POST", "/v1/sessions/sesn_1/events"),
    ("GET", "/v1/sessions/sesn_1/events"),
    ("GET", "/v1/sessions/sesn_1/events/stream"),
    ("GET", "/v1/sessions/sesn_1/stream"),
    ("GET", "/v1/sessions/sesn_1/threads"),
    ("GET", "/v1/sessions/sesn_1/threads/sthr_2"),
    ("GET", "/v1/sessions/sesn_1/threads/sthr_2/events"),
    ("GET", "/v1/sessions/sesn_1/threads/sthr_2/stream"),
    ("POST", "/v1/sessions/sesn_1/resources"),
    ("GET", "/v1/sessions/sesn_1/resources"),
    ("POST", "/v1/sessions/sesn_1/resources/sres_9"),
    ("POST", "/v1/environments"),
    ("GET", "/v1/environments"),
    ("GET", "/v1/environments/env_1"),
    ("POST", "/v1/environments/env_1"),
    ("DELETE", "/v1/environments/env_1"),
    ("GET", "/v1/environments/env_1/work"),
    ("POST", "/v1/vaults"),
    ("GET", "/v1/vaults"),
    ("GET", "/v1/vaults/vlt_1"),
    ("POST", "/v1/vaults/vlt_1"),
    ("DELETE", "/v1/vaults/vlt_1"),
    ("POST", "/v1/vaults/vlt_1/credentials"),
    ("GET", "/v1/vaults/vlt_1/credentials"),
    ("POST", "/v1/vaults/vlt_1/credentials/vcrd_2"),
    ("GET", "/v1/files?scope_id=sesn_1"),
    ("GET", "/v1/skills/skill_1/versions/1759178010641129"),
    ("GET", "/v1/deployments/depl_1"),
];

fn operation(selector: u8) -> Operation {
    let rules = RouteRules {
        neighbours: Neighbour::ALL.to_vec(),
        ..RouteRules::default()
    };
    let (method, path) = CALLS[usize::from(selector) % CALLS.len()];
    classify(&rules, method, path).expect("a sample call does not classify")
}

const TENANTS: [&str; 3] = ["acme", "globex", "a.b-c_1"];
const TAG_KEY: &str = "ma_gateway_tenant";

/// Every `metadata` object in `value` that still carries `tag_key`.
fn tagged_metadata(value: &Value, tag_key: &str) -> usize {
    match value {
        Value::Object(fields) => {
            let own = match fields.get("metadata") {
                Some(Value::Object(m)) => usize::from(m.contains_key(tag_key)),
                _ => 0,
            };
            own + fields
                .values()
                .map(|v| tagged_metadata(v, tag_key))
                .sum::<usize>()
        }
        Value::Array(items) => items.iter().map(|v| tagged_metadata(v, tag_key)).sum(),
        _ => 0,
    }
}

/// JSON equality, exact: the crate parses floats with serde_json's `float_roundtrip`, so a
/// re-encoded body carries the very numbers the client sent (without it,
/// `3.3333333333333332e+41` went upstream as `…336e+41`; found by this target).
fn same_json(a: &Value, b: &Value) -> bool {
    a == b
}

/// Every string anywhere in a value (keys and values).
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(fields) => fields.iter().for_each(|(k, v)| {
            out.push(k.clone());
            strings(v, out)
        }),
        _ => {}
    }
}

fn check_error(error: &ApiError) {
    let body = error.envelope("req_gw_fuzz");
    let value: Value = serde_json::from_slice(&body).expect("error envelope is not JSON");
    assert_eq!(value["type"], "error");
    assert!(
        (400..=599).contains(&error.status()),
        "status {}",
        error.status()
    );
}

// ---------------------------------------------------------------------------------------------
// Tenancy: request bodies
// ---------------------------------------------------------------------------------------------

/// Byte 0: operation; byte 1: tenant and untagged policy; rest: request body. Checks
/// `body_references` (every reference is a well-formed owned id found in the body) and
/// `tag_request_body` (a create always leaves tagged with exactly the caller's tenant, the
/// result is stable when re-applied, no other content changes, references are unchanged).
pub fn tenancy_request(data: &[u8]) {
    let mut input = Input::new(data);
    let op = operation(input.byte());
    let options = input.byte();
    let tenant = TENANTS[usize::from(options % 3)];
    let ownership = Ownership {
        tag_key: TAG_KEY,
        untagged: if options & 4 == 0 {
            Untagged::Deny
        } else {
            Untagged::Allow
        },
    };
    let body = input.rest();
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let refs = parsed
        .as_ref()
        .map(|v| tenancy::body_references(&op, v))
        .unwrap_or_default();
    if let Some(value) = &parsed {
        let mut all = Vec::new();
        strings(value, &mut all);
        for (kind, id) in &refs {
            assert!(
                tenancy::owned_kind(*kind),
                "reference of unowned kind {kind:?}"
            );
            assert!(all.contains(id), "reference {id:?} is not in the body");
        }
    }
    let creates = matches!(
        op.family,
        Family::Agents | Family::Sessions | Family::Environments | Family::Vaults
    ) && op.action == Action::Create;
    match tenancy::tag_request_body(&op, body, tenant, &ownership) {
        Ok(Some(tagged)) => {
            let value: Value = serde_json::from_slice(&tagged).expect("tagged body is not JSON");
            assert_eq!(value["metadata"][TAG_KEY], json!(tenant), "wrong tag");
            assert_eq!(
                tenancy::tag_request_body(&op, &tagged, tenant, &ownership),
                Ok(None),
                "tagging is not idempotent"
            );
            // Only `metadata` changed.
            if let Some(Value::Object(before)) = &parsed {
                let Value::Object(after) = &value else {
                    panic!("tagged body is not an object")
                };
                for (k, v) in before {
                    if k != "metadata" {
                        assert!(
                            after.get(k).is_some_and(|a| same_json(a, v)),
                            "tagging changed {k}: {v} -> {:?}",
                            after.get(k)
                        );
                    }
                }
                assert_eq!(
                    tenancy::body_references(&op, &value),
                    refs,
                    "tagging changed the references"
                );
            }
        }
        Ok(None) => {
            if creates {
                // Forwarded as sent: it must already carry exactly this tenant.
                let value = parsed.expect("an untagged create forwarded unparsed");
                assert_eq!(
                    value["metadata"][TAG_KEY],
                    json!(tenant),
                    "create forwarded untagged"
                );
            }
        }
        Err(e) => check_error(&e),
    }
}

// ---------------------------------------------------------------------------------------------
// Tenancy: responses
// ---------------------------------------------------------------------------------------------

/// Byte 0: operation; byte 1: tenant, status, untagged policy; rest: response body. Checks
/// that whatever is sent on carries no owner tag, that a filtered list keeps only the
/// tenant's objects and counts them right, that a foreign single object is refused, and
/// `owner_from_lookup`.
pub fn tenancy_response(data: &[u8]) {
    let mut input = Input::new(data);
    let op = operation(input.byte());
    let options = input.byte();
    let tenant = TENANTS[usize::from(options % 3)];
    let statuses = [200, 201, 204, 404, 500, 200, 200, 200];
    let status = statuses[usize::from((options >> 2) & 7)];
    let ownership = Ownership {
        tag_key: TAG_KEY,
        untagged: if options & 0x20 == 0 {
            Untagged::Deny
        } else {
            Untagged::Allow
        },
    };
    let body = input.rest();
    let store = MemoryStore::new();
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match tenancy::rewrite_response(&op, status, body, tenant, &ownership, &store) {
        Ok(out) => {
            let sent: Option<Value> = match &out.body {
                Some(bytes) => Some(serde_json::from_slice(bytes).expect("rewritten not JSON")),
                None => parsed.clone(),
            };
            let rewritten_family = matches!(
                op.family,
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
            );
            if let Some(sent) = &sent {
                if rewritten_family && (200..300).contains(&status) && !op.is_stream() {
                    assert_eq!(tagged_metadata(sent, TAG_KEY), 0, "owner tag leaked");
                }
            }
            if op.action == Action::List && out.kept + out.dropped > 0 {
                let items = parsed.as_ref().and_then(|v| v["data"].as_array()).unwrap();
                assert_eq!(out.kept + out.dropped, items.len());
                let admitted = items
                    .iter()
                    .filter(|item| {
                        item.is_object() && ownership.admits(&Owner::of(item, TAG_KEY), tenant)
                    })
                    .count();
                assert_eq!(out.kept, admitted, "list filter kept the wrong items");
            }
        }
        Err(e) => check_error(&e),
    }
    match tenancy::owner_from_lookup(status, body, TAG_KEY) {
        LookupResult::Owner(owner) => {
            assert!((200..300).contains(&status));
            let value = parsed.expect("owner from an unparsed body");
            assert_eq!(owner, Owner::of(&value, TAG_KEY));
        }
        LookupResult::Missing => assert_eq!(status, 404),
        LookupResult::Failed => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Policy and budget clamping
// ---------------------------------------------------------------------------------------------

fn policy_rules() -> PolicyRules {
    policy::rules_from_json(
        &json!({"tenants": {
            "acme": {
                "models": {"allow": ["claude-sonnet-4-*", "claude-haiku-*"], "deny": ["*-fast"]},
                "tools": {"deny": ["bash", "web_fetch"], "allow": ["read", "grep", "glob", "custom:*", "mcp:docs"]},
                "mcp_servers": {"allow_urls": ["https://mcp.internal/*", "https://*.example.com"]},
                "environments": {"forbid_unrestricted": true, "allowed_hosts": ["*.internal.example", "pypi.org"],
                                 "allow_package_managers": false},
                "vaults": false,
                "max_body_bytes": 65536
            },
            "*": {"environments": {"forbid_unrestricted": true}, "tools": {"deny": ["bash"]}}
        }}),
        "policy",
    )
    .expect("the fuzz policy does not parse")
}

/// Byte 0: operation; byte 1: tenant; bytes 2..10: remaining µ$; rest: body. Runs the
/// request-body pipeline of the glue (size, policy, clamp) and checks: a refusal is a clean
/// 4xx envelope of bounded size; after a clamp the budget is at most the remaining money and
/// a second clamp changes nothing; a budget update with `null` is refused.
pub fn policy(data: &[u8]) {
    let mut input = Input::new(data);
    let op = operation(input.byte());
    let tenant = ["acme", "globex", "other"][usize::from(input.byte() % 3)];
    let mut remaining = 0u64;
    for _ in 0..8 {
        remaining = (remaining << 8) | u64::from(input.byte());
    }
    let body = input.rest();
    static RULES: OnceLock<PolicyRules> = OnceLock::new();
    let rules = RULES.get_or_init(policy_rules);
    if let Err(e) = policy::check_body_size(rules, tenant, body.len() as u64) {
        assert_eq!(e.status(), 413);
        check_error(&e);
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    match policy::check(rules, tenant, &op, &value) {
        Ok(()) => {}
        Err(e) => {
            assert!(
                matches!(e.status(), 400 | 403),
                "policy status {}",
                e.status()
            );
            assert!(
                e.message.len() <= 2048,
                "policy message of {} bytes",
                e.message.len()
            );
            check_error(&e);
        }
    }
    let original = value.clone();
    let cents = remaining / 10_000;
    let changed = policy::clamp_session_budget(&mut value, remaining);
    if changed {
        let amount = value["budget"]["max_list_cost"]["amount"].as_str().unwrap();
        assert_eq!(amount, cents.to_string());
        assert_eq!(value["budget"]["max_list_cost"]["currency"], "USD");
    } else {
        assert_eq!(
            value, original,
            "clamp changed the body but said it did not"
        );
    }
    assert!(
        !policy::clamp_session_budget(&mut value, remaining),
        "clamp not idempotent"
    );
    let mut update = original.clone();
    match policy::clamp_session_budget_update(&mut update, remaining) {
        Ok(_) => assert!(!matches!(original.get("budget"), Some(Value::Null))),
        Err(e) => {
            assert_eq!(original.get("budget"), Some(&Value::Null));
            assert_eq!(e.status(), 403);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Usage extraction
// ---------------------------------------------------------------------------------------------

/// Byte 0: event name; rest: event data or session body. Checks that an observation's
/// numbers are consistent and the parse is deterministic.
pub fn usage(data: &[u8]) {
    let mut input = Input::new(data);
    let names = [
        "span.model_request_end",
        "span.outcome_evaluation_end",
        "session.usage",
        "message",
        "session.error",
        "agent.message",
    ];
    let name = names[usize::from(input.byte()) % names.len()];
    let body = input.rest();
    let first = usage::from_event(name, body);
    assert_eq!(
        first,
        usage::from_event(name, body),
        "from_event not deterministic"
    );
    match first {
        Ok(Some(usage::Observation::Span { event_id, .. })) => {
            assert!(!event_id.is_empty(), "span without an id");
        }
        Ok(Some(usage::Observation::Snapshot(_))) | Ok(None) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if !usage::is_usage_event(name) && name != "message" {
        // Only usage events (or `message` dispatched on its type) can yield usage.
        assert!(
            !matches!(usage::from_event(name, body), Ok(Some(_))),
            "{name} gave usage"
        );
    }
    if let Ok(facts) = usage::from_session_body(body) {
        assert!(!facts.session_id.is_empty());
        // The session reader skips unread fields without validating them (e.g. a lone
        // surrogate escape), so compare only where the whole body is valid JSON.
        if let Ok(value) = serde_json::from_slice::<Value>(body) {
            assert_eq!(value["id"], json!(facts.session_id));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metering of a whole response
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Metered {
    usage: ma_gateway::metering::RequestUsage,
    emissions: usize,
}

fn meter(op: &Operation, status: u32, chunks: &[&[u8]], store: &MemoryStore) -> Metered {
    let prices = PriceTable::defaults();
    let limits = Limits::default();
    let ctx = MeterContext {
        store,
        prices: &prices,
        limits: &limits,
        now_secs: 1_780_000_000,
        scanner: ScannerConfig::default(),
    };
    let mut meter = ResponseMeter::new(op, status, "acme", ScannerConfig::default());
    let mut emissions = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        emissions += meter.on_body(chunk, i + 1 == chunks.len(), &ctx).len();
    }
    if chunks.is_empty() {
        emissions += meter.on_body(&[], true, &ctx).len();
    }
    Metered {
        usage: meter.usage.clone(),
        emissions,
    }
}

fn tokens(u: &ma_gateway::metering::RequestUsage) -> u64 {
    u.input_tokens + u.output_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
}

/// Byte 0: which response (event stream, thread stream, session object, history page,
/// error); byte 1: split point; rest: the body. Checks that metering does not depend on
/// chunking, and that replaying the same body for the same session (a second stream, a
/// reconnect) charges nothing more: usage is counted exactly once.
pub fn metering(data: &[u8]) {
    let mut input = Input::new(data);
    let calls = [
        ("GET", "/v1/sessions/sesn_1/events/stream", 200),
        ("GET", "/v1/sessions/sesn_1/threads/sthr_2/stream", 200),
        ("GET", "/v1/sessions/sesn_1", 200),
        ("GET", "/v1/sessions/sesn_1/events", 200),
        ("GET", "/v1/sessions/sesn_1/events/stream", 529),
    ];
    let (method, path, status) = calls[usize::from(input.byte()) % calls.len()];
    let rules = RouteRules::default();
    let op = classify(&rules, method, path).unwrap();
    let split = usize::from(input.u16());
    let body = input.rest();
    let split = split % (body.len() + 1);

    let whole_store = MemoryStore::new();
    let whole = meter(&op, status, &[body], &whole_store);
    let split_store = MemoryStore::new();
    let parts = meter(&op, status, &[&body[..split], &body[split..]], &split_store);
    assert_eq!(whole.usage, parts.usage, "metering depends on chunking");
    let replay = meter(&op, status, &[body], &whole_store);
    assert_eq!(
        tokens(&replay.usage),
        0,
        "replayed body charged again: first {:?}, replay {:?}",
        whole.usage,
        replay.usage
    );
}

// ---------------------------------------------------------------------------------------------
// JWT claims from Envoy's dynamic metadata (protobuf)
// ---------------------------------------------------------------------------------------------

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(number << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn entry(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(1, key.as_bytes(), &mut out);
    bytes_field(2, value, &mut out);
    out
}

/// `google.protobuf.Value` encoding of a JSON value.
fn pb_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match value {
        Value::Null => {
            varint(1 << 3, &mut out);
            varint(0, &mut out);
        }
        Value::Number(n) => {
            varint(2 << 3 | 1, &mut out);
            out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
        }
        Value::String(s) => bytes_field(3, s.as_bytes(), &mut out),
        Value::Bool(b) => {
            varint(4 << 3, &mut out);
            varint(u64::from(*b), &mut out);
        }
        Value::Object(fields) => {
            let mut st = Vec::new();
            for (k, v) in fields {
                bytes_field(1, &entry(k, &pb_value(v)), &mut st);
            }
            bytes_field(5, &st, &mut out);
        }
        Value::Array(items) => {
            let mut list = Vec::new();
            for v in items {
                bytes_field(1, &pb_value(v), &mut list);
            }
            bytes_field(6, &list, &mut out);
        }
    }
    out
}

/// JSON numbers as protobuf doubles.
fn as_doubles(value: &Value) -> Value {
    match value {
        Value::Number(n) => serde_json::Number::from_f64(n.as_f64().unwrap_or(0.0))
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.iter().map(as_doubles).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), as_doubles(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn metadata_with(payload: &[u8]) -> Vec<u8> {
    let mut namespace = Vec::new();
    bytes_field(1, &entry("jwt_payload", payload), &mut namespace);
    let mut metadata = Vec::new();
    bytes_field(
        1,
        &entry(jwt::JWT_AUTHN_NAMESPACE, &namespace),
        &mut metadata,
    );
    metadata
}

fn jwt_rules() -> JwtRules {
    jwt::rules_from_json(
        &json!({"tenant_claim": "org", "scopes_claim": "scope", "subject_claim": "sub"}),
        "jwt",
    )
    .unwrap()
}

fn check_claims(result: &Result<jwt::Claims, String>) {
    if let Ok(claims) = result {
        assert!(
            ma_gateway::config::is_name(&claims.tenant),
            "tenant {:?}",
            claims.tenant
        );
        assert!(!claims.subject.is_empty() && !claims.subject.chars().any(char::is_control));
        if let Some(scopes) = &claims.scopes {
            for s in scopes {
                assert!(
                    !s.is_empty() && !s.chars().any(char::is_whitespace),
                    "scope {s:?}"
                );
            }
        }
    }
}

/// Byte 0 even: the rest is raw serialized `Metadata` (the decoder must never panic; any
/// payload found is an object). Odd: the rest is JSON, encoded here as a jwt_authn payload
/// and decoded back (round trip), then run through the claim rules; also the rules parser.
pub fn jwt(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let rest = input.rest();
    static RULES: OnceLock<JwtRules> = OnceLock::new();
    let rules = RULES.get_or_init(jwt_rules);
    if mode & 1 == 0 {
        match jwt::payload_from_metadata(rest, "jwt_payload") {
            Ok(Some(payload)) => assert!(payload.is_object()),
            Ok(None) => {}
            Err(e) => assert!(!e.is_empty()),
        }
        if let Some(result) = jwt::claims_from_metadata(rest, rules) {
            check_claims(&result);
        }
        // The same bytes as one payload's Value, wrapped in well-formed metadata.
        if let Some(result) = jwt::claims_from_metadata(&metadata_with(rest), rules) {
            check_claims(&result);
        }
        return;
    }
    let Ok(value) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    if let Ok(parsed) = jwt::rules_from_json(&value, "jwt") {
        assert!(!parsed.tenant_claim.is_empty());
    }
    if !value.is_object() || depth(&value) > 30 {
        return;
    }
    let decoded = jwt::payload_from_metadata(&metadata_with(&pb_value(&value)), "jwt_payload");
    assert_eq!(decoded, Ok(Some(as_doubles(&value))), "protobuf round trip");
    let claims = jwt::claims_from_payload(&value, rules);
    check_claims(&claims);
}

// ---------------------------------------------------------------------------------------------
// Vault KV v2 and stored credentials
// ---------------------------------------------------------------------------------------------

/// Byte 0: field name; rest: a Vault answer (also tried as a stored credential record).
/// Checks that only a usable key comes out and it is the one at `data.data.<field>`; that a
/// refusal never echoes the secret; and the stored record round trip.
pub fn vault(data: &[u8]) {
    let mut input = Input::new(data);
    let field = ["api_key", "key", ""][usize::from(input.byte() % 3)];
    let body = input.rest();
    match credentials::parse_vault_kv2(body, field) {
        Ok(key) => {
            assert!(credentials::is_usable_key(&key));
            let value: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(value["data"]["data"][field], json!(key));
        }
        Err(message) => {
            if let Ok(value) = serde_json::from_slice::<Value>(body) {
                if let Some(secret) = value["data"]["data"][field].as_str() {
                    if secret.len() >= 8 {
                        assert!(!message.contains(secret), "the secret echoed in an error");
                    }
                }
            }
        }
    }
    if let Some(stored) = StoredCredential::decode(body) {
        assert!(credentials::is_usable_key(&stored.key));
        assert_eq!(
            StoredCredential::decode(&stored.encode()),
            Some(stored.clone())
        );
        let shown = format!("{stored:?}");
        let source = format!("{:?}", stored.source);
        if stored.key.len() >= 8 && !source.contains(&stored.key) {
            assert!(!shown.contains(&stored.key), "Debug shows the key");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

/// A `POST …/events` body: the audit field lists event types only, never content.
pub fn audit(data: &[u8]) {
    let out = audit::event_types(data);
    assert!(
        out.bytes().all(|b| b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'_' | b',' | b'+')),
        "audit field smuggles content: {out:?}"
    );
    assert!(out.len() <= 4096, "audit field of {} bytes", out.len());
}

// ---------------------------------------------------------------------------------------------
// The request decision: authentication, routing, scopes, header rewriting
// ---------------------------------------------------------------------------------------------

const UPSTREAM_KEY: &str = "sk-ant-upstream-SECRET-0123456789";
const CLIENT_KEYS: [&str; 3] = [
    "gw-key-platform-000",
    "gw-key-auditors-111",
    "gw-key-expired-222",
];

fn gateway_plan() -> Plan {
    let hash = |k: &str| sha256::to_hex(&sha256::digest(k.as_bytes()));
    let config = json!({
        "api_version": "v1",
        "betas": {"required": ["managed-agents-2026-04-01"],
                  "allowed": ["managed-agents-2026-04-01", "files-api-2025-04-14"]},
        "routes": {"neighbours": ["files", "skills"], "shared_neighbours": ["files", "skills"]},
        "tenants": [
            {"name": "platform", "scopes": ["*:*"]},
            {"name": "auditors", "scopes": ["*:readonly"]}
        ],
        "gateway_keys": [
            {"name": "p", "sha256": hash(CLIENT_KEYS[0]), "tenant": "platform"},
            {"name": "a", "sha256": hash(CLIENT_KEYS[1]), "tenant": "auditors"},
            {"name": "e", "sha256": hash(CLIENT_KEYS[2]), "tenant": "platform",
             "expires_at": "2020-01-01T00:00:00Z"}
        ]
    });
    Plan::from_json(&serde_json::to_vec(&config).unwrap()).expect("the fuzz plan does not parse")
}

struct Keys;

impl KeyRing for Keys {
    fn key(&self, credential: &str) -> Option<String> {
        (credential == "default").then(|| UPSTREAM_KEY.to_string())
    }
    fn affinity(&self, _session_id: &str) -> Option<String> {
        None
    }
}

/// Lines: `METHOD PATH`, then `name: value` headers (`\x01`..`\x03` in a value stand for the
/// three gateway keys). Checks, on admission, that after the edits no client credential or
/// hop-by-hop header survives, `x-api-key` is the upstream key, every beta is allowed and the
/// required one present, and no value carries CR, LF or NUL; on refusal, that neither the
/// upstream key nor the presented client key appears in the answer.
pub fn gateway(data: &[u8]) {
    let mut input = Input::new(data);
    let Ok(request_line) = std::str::from_utf8(input.until(b'\n')) else {
        return;
    };
    let (method, path) = request_line.split_once(' ').unwrap_or((request_line, "/"));
    let mut headers: Vec<(String, String)> = Vec::new();
    let rest = input.rest();
    for line in rest.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            return;
        };
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value
            .trim_start()
            .replace('\x01', CLIENT_KEYS[0])
            .replace('\x02', CLIENT_KEYS[1])
            .replace('\x03', CLIENT_KEYS[2]);
        headers.push((name.to_ascii_lowercase(), value));
    }
    static PLAN: OnceLock<Plan> = OnceLock::new();
    let plan = PLAN.get_or_init(gateway_plan);
    let head = RequestHead {
        method,
        path,
        headers: &headers,
    };
    match gateway::admit(plan, &head, &Keys, None, 1_780_000_000) {
        Ok(admitted) => {
            let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (n, v) in &headers {
                out.entry(n.clone()).or_default().push(v.clone());
            }
            for edit in &admitted.edits {
                match edit {
                    HeaderEdit::Remove(n) => {
                        out.remove(n);
                    }
                    HeaderEdit::Set(n, v) => {
                        assert!(!v.contains(['\r', '\n', '\0']), "CR/LF/NUL in {n}: {v:?}");
                        out.insert(n.clone(), vec![v.clone()]);
                    }
                }
            }
            for n in CREDENTIAL_HEADERS.iter().chain(HOP_BY_HOP_HEADERS.iter()) {
                if *n != "x-api-key" {
                    assert!(!out.contains_key(*n), "{n} forwarded");
                }
            }
            assert_eq!(out.get("x-api-key"), Some(&vec![UPSTREAM_KEY.to_string()]));
            // GA families (Files, Skills, User Profiles) get only the betas the client named,
            // possibly none; every other call carries the required Managed Agents beta.
            let ga = admitted.operation.family.is_ga();
            let betas = match out.get("anthropic-beta") {
                Some(betas) => betas.clone(),
                None if ga => Vec::new(),
                None => panic!("no anthropic-beta"),
            };
            assert!(betas.len() <= 1);
            let list: Vec<&str> = betas.first().map_or(Vec::new(), |b| b.split(',').collect());
            assert!(ga || list.contains(&"managed-agents-2026-04-01"));
            for b in list {
                assert!(
                    plan.betas.allowed.iter().any(|a| a == b),
                    "beta {b:?} forwarded"
                );
            }
            assert_eq!(
                out.get(":authority"),
                Some(&vec![plan.upstream.authority.clone()])
            );
            // The caller presented a valid, unexpired key of a declared tenant.
            assert!(CLIENT_KEYS[..2].iter().any(|k| headers
                .iter()
                .any(|(n, v)| (n == "x-api-key" || n == "authorization") && v.contains(k))));
        }
        Err(refusal) => {
            let body = String::from_utf8(refusal.error.envelope("req_gw_fuzz")).unwrap();
            assert!(!body.contains(UPSTREAM_KEY), "upstream key in a refusal");
            // A key the client also wrote into the path or a non-credential header may come
            // back quoted (e.g. a refused beta): only a credential header must never echo.
            let echoed_elsewhere = |k: &str| {
                request_line.contains(k)
                    || headers
                        .iter()
                        .any(|(n, v)| !CREDENTIAL_HEADERS.contains(&n.as_str()) && v.contains(k))
            };
            for k in CLIENT_KEYS {
                if !echoed_elsewhere(k) {
                    assert!(!body.contains(k), "client key echoed: {body}");
                }
            }
            check_error(&refusal.error);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small text parsers
// ---------------------------------------------------------------------------------------------

/// Byte 0 picks a parser; the rest is its text. Round trips where the format has an inverse:
/// RFC 3339 times, USD amounts, hex digests, scopes, model patterns; globs and URL patterns
/// against themselves.
pub fn text(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.byte();
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    match which % 7 {
        0 => {
            if let Some(secs) = time::parse_rfc3339_utc(text) {
                let days = secs / 86_400;
                let (y, m, d) = time::civil_from_days(days);
                assert_eq!(time::days_from_civil(y, m, d), days);
                let rem = secs % 86_400;
                let canonical = format!(
                    "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                    rem / 3600,
                    rem / 60 % 60,
                    rem % 60
                );
                if y <= 9999 {
                    assert_eq!(
                        time::parse_rfc3339_utc(&canonical),
                        Some(secs),
                        "{canonical}"
                    );
                }
            }
        }
        1 => {
            if let Ok(micros) = pricing::parse_usd(text) {
                let printed = pricing::format_usd(micros);
                let digits = printed.strip_prefix('$').expect("format_usd without $");
                assert_eq!(pricing::parse_usd(digits), Ok(micros), "{printed}");
            }
        }
        2 => {
            if let Some(bytes) = sha256::from_hex(text) {
                assert_eq!(sha256::to_hex(&bytes), text.to_ascii_lowercase());
            }
        }
        3 => {
            if let Ok(scope) = Scope::parse(text) {
                assert_eq!(Scope::parse(&scope.to_string()), Ok(scope));
            }
        }
        4 => {
            if let Ok(pattern) = ModelPattern::parse(text) {
                let shown = pattern.to_string();
                assert_eq!(
                    ModelPattern::parse(&shown).map(|p| p.to_string()),
                    Ok(shown)
                );
                let literal = text.trim_end_matches('*');
                assert!(pattern.matches(literal) || !text.ends_with('*'));
            }
        }
        5 => {
            let (pattern, subject) = text.split_once('\u{1}').unwrap_or((text, text));
            let matched = policy::glob_match(pattern, subject);
            if !pattern.contains('*') {
                assert_eq!(matched, pattern == subject);
            }
            assert!(policy::glob_match(
                &pattern.replace('*', ""),
                &pattern.replace('*', "")
            ));
            let _ = policy::url_match(pattern, subject);
        }
        _ => {
            let _ = credentials::is_usable_key(text);
            let _ = ma_gateway::errors::excerpt(text, usize::from(which >> 3));
            let _ = IdKind::Session;
        }
    }
}
