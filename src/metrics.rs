//! The filter's metrics: names, kinds, labels, and how labels are encoded into Envoy stat names.
//!
//! proxy-wasm metrics have no labels, so a label set is encoded in the stat name —
//! `ma_gateway_tokens_total.tenant.acme.model.claude-opus-4-6.type.input` — and Envoy's
//! bootstrap `stats_config.stats_tags` (see `envoy.yaml`, one regex per label name, generated
//! by [`stats_tag_regex`]) turns each `.label.value` pair back into a Prometheus label:
//! `ma_gateway_tokens_total{tenant="acme",model="claude-opus-4-6",type="input"}`.
//!
//! Label values are sanitised to `[A-Za-z0-9_-]` (a `.` would split the pair) and bounded in
//! length. Session, agent and other resource ids are never labels: cardinality must stay bounded
//! by tenants × models × fixed enums.
//!
//! Scope: Envoy stats are per Envoy process (summed over workers); a fleet total is a
//! Prometheus `sum` over replicas.

use crate::store::{self, Store, StoreError};

/// How Envoy aggregates a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric the filter defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Label names, in the order their values are passed to [`stat_name`].
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! metric {
    ($ident:ident, $name:literal, $kind:ident, [$($label:literal),*], $help:literal) => {
        pub const $ident: Metric = Metric {
            name: $name,
            kind: Kind::$kind,
            labels: &[$($label),*],
            help: $help,
        };
    };
}

metric!(REQUESTS, "ma_gateway_requests_total", Counter, ["family", "action", "status_class"],
    "Calls answered, by operation (family, action; `unrouted` when refused before classification) and status class (2xx … 5xx).");
metric!(REFUSALS, "ma_gateway_refusals_total", Counter, ["reason"],
    "Calls the gateway answered itself without contacting upstream, by error type (authentication_error, not_found_error, …).");
metric!(TOKENS, "ma_gateway_tokens_total", Counter, ["tenant", "model", "type"],
    "Tokens metered exactly once per session; type is input, output, cache_read or cache_write (both TTLs).");
metric!(CACHE_WRITE_1H, "ma_gateway_cache_write_1h_tokens_total", Counter, ["tenant", "model"],
    "The part of cache_write tokens written with the 1-hour TTL (known from session snapshots; spans report only the sum).");
metric!(
    COST,
    "ma_gateway_cost_microdollars_total",
    Counter,
    ["tenant", "model"],
    "Price-table estimate of the metered tokens, runtime and web searches, in micro-USD (integer); corrected to Anthropic's list_cost by ma_gateway_cost_list_correction_microdollars_total."
);
metric!(
    UNPRICED_TOKENS,
    "ma_gateway_unpriced_tokens_total",
    Counter,
    ["tenant", "model"],
    "Tokens of a model the price table does not know: counted, never priced as $0."
);
metric!(
    RUNTIME_SECONDS,
    "ma_gateway_session_runtime_seconds_total",
    Counter,
    ["tenant", "model"],
    "Session active_seconds (billed runtime) reconciled from cumulative snapshots."
);
metric!(
    WEB_SEARCHES,
    "ma_gateway_web_search_requests_total",
    Counter,
    ["tenant", "model"],
    "Server-side web search requests reconciled from snapshots."
);
metric!(UPSTREAM_LIST_COST, "ma_gateway_upstream_list_cost_cents_total", Counter, ["tenant"],
    "Anthropic's own list_cost (cents) from session snapshots, for reconciling against ma_gateway_cost_microdollars_total.");
metric!(
    COST_CORRECTION,
    "ma_gateway_cost_list_correction_microdollars_total",
    Counter,
    ["tenant", "model", "kind"],
    "How far Anthropic's session list_cost moved the charged cost from the price-table estimate, in micro-USD; kind up (table low, or model unpriced) or down (table high). Reconciled cost = ma_gateway_cost_microdollars_total + up - down."
);
metric!(
    LIST_COST_CORRECTIONS,
    "ma_gateway_list_cost_corrections_total",
    Counter,
    ["tenant", "model", "kind"],
    "Sessions' charged cost set to a new Anthropic list_cost figure (each figure once, however many streams, pages and reads carry it)."
);
metric!(
    CHARGED_COST,
    "ma_gateway_charged_cost_microdollars",
    Gauge,
    ["tenant", "model"],
    "Cost charged to budgets, in micro-USD: estimates plus list_cost corrections (equals the sessions' list_cost once reconciled)."
);
metric!(
    USAGE_EVENTS,
    "ma_gateway_usage_events_total",
    Counter,
    ["kind"],
    "Usage observations seen (span, snapshot), including duplicates."
);
metric!(DUPLICATES, "ma_gateway_usage_duplicates_total", Counter, [],
    "Usage observations already counted for their session (second stream, history page, stale snapshot).");
metric!(
    BAD_EVENTS,
    "ma_gateway_usage_rejected_total",
    Counter,
    ["reason"],
    "Usage-bearing events that could not be metered: oversize (over the scanner cap) or malformed."
);
metric!(
    ACTIVE_STREAMS,
    "ma_gateway_active_streams",
    Gauge,
    [],
    "Event streams currently open through this Envoy."
);
metric!(
    VM_MEMORY,
    "ma_gateway_wasm_memory_bytes",
    Gauge,
    [],
    "Linear memory of the Wasm VM that logged the latest request (per VM; with several workers, the last writer). Flat under any stream size."
);
metric!(
    STREAM_DURATION,
    "ma_gateway_stream_duration_milliseconds",
    Histogram,
    [],
    "How long event streams stayed open."
);
metric!(
    FIRST_EVENT,
    "ma_gateway_time_to_first_event_milliseconds",
    Histogram,
    [],
    "From stream request to the first named event reaching the client."
);
metric!(
    OPERATION_DURATION,
    "ma_gateway_operation_duration_milliseconds",
    Histogram,
    ["family"],
    "Duration of non-stream calls (OpenTelemetry gen_ai.client.operation.duration analogue)."
);
metric!(UPSTREAM_ERRORS, "ma_gateway_upstream_errors_total", Counter, ["type"],
    "Errors from upstream: error envelopes on responses and session.error events on streams, by error type.");

metric!(STATE_LIVE, "ma_gateway_state_live_entries", Gauge, ["family"],
    "Occupied slots of a bounded shared-data family (owner, affinity, tenant, thread_model); at most the family's slot count.");
metric!(STATE_EVICTIONS, "ma_gateway_state_evictions_total", Counter, ["family"],
    "Entries of a bounded shared-data family overwritten by another id; each is re-learnt when needed (owners by look-up).");
metric!(STATE_REFUSED, "ma_gateway_state_refused_total", Counter, ["family"],
    "Writes a bounded family refused because the slot's occupant may not be evicted yet (none of today's cache families refuses).");

/// Every metric, for documentation and config checks.
pub const ALL: &[Metric] = &[
    REQUESTS,
    REFUSALS,
    TOKENS,
    CACHE_WRITE_1H,
    COST,
    UNPRICED_TOKENS,
    RUNTIME_SECONDS,
    WEB_SEARCHES,
    UPSTREAM_LIST_COST,
    COST_CORRECTION,
    LIST_COST_CORRECTIONS,
    CHARGED_COST,
    USAGE_EVENTS,
    DUPLICATES,
    BAD_EVENTS,
    ACTIVE_STREAMS,
    VM_MEMORY,
    STREAM_DURATION,
    FIRST_EVENT,
    OPERATION_DURATION,
    UPSTREAM_ERRORS,
    STATE_LIVE,
    STATE_EVICTIONS,
    STATE_REFUSED,
];

/// Longest label value kept; longer ones are cut (a bounded stat name, a bounded label).
const MAX_LABEL_BYTES: usize = 64;

/// The stat name for `metric` with label `values` (same order as `metric.labels`; missing
/// values become `unknown`).
pub fn stat_name(metric: &Metric, values: &[&str]) -> String {
    let mut name = String::from(metric.name);
    for (i, label) in metric.labels.iter().enumerate() {
        name.push('.');
        name.push_str(label);
        name.push('.');
        push_label_value(&mut name, values.get(i).copied().unwrap_or(""));
    }
    name
}

fn push_label_value(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push_str("unknown");
        return;
    }
    for c in value.chars().take(MAX_LABEL_BYTES) {
        out.push(if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        });
    }
}

/// The `stats_tags` regex for one label name: matched against the full original stat name
/// (`wasmcustom.` + our name), wherever the pair sits among the others.
pub fn stats_tag_regex(label: &str) -> String {
    format!(r"^wasmcustom\.ma_gateway_\w+(?:\.\w+\.[\w-]+)*?(\.{label}\.([\w-]+))")
}

/// Every label name used by some metric, sorted, without repeats.
pub fn label_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = ALL.iter().flat_map(|m| m.labels.iter().copied()).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The one `tenant` label value for every tenant the config does not know (a JWT naming an
/// undeclared tenant, a session whose tenant was never learnt): each new claim value must not
/// become a new series.
pub const UNKNOWN_TENANT: &str = "unknown";

/// The `tenant` label values a config allows: its declared tenants and the tenants of its
/// gateway keys, plus [`UNKNOWN_TENANT`] for anything else. Bounded by the config, whatever
/// tokens clients present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantLabels {
    known: Vec<String>,
}

impl TenantLabels {
    pub fn from_plan(plan: &crate::config::Plan) -> TenantLabels {
        let mut known: Vec<String> = plan.tenants.iter().map(|t| t.name.clone()).collect();
        known.extend(plan.gateway_keys.iter().map(|k| k.tenant.clone()));
        known.sort_unstable();
        known.dedup();
        TenantLabels { known }
    }

    /// The label value recorded for `tenant`.
    pub fn label<'a>(&self, tenant: &'a str) -> &'a str {
        if self.known.iter().any(|k| k == tenant) {
            tenant
        } else {
            UNKNOWN_TENANT
        }
    }

    /// `values` (in `metric.labels` order) with every `tenant` value bounded.
    pub fn bound<'a>(&self, metric: &Metric, values: &[&'a str]) -> Vec<&'a str> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| match metric.labels.get(i) {
                Some(&"tenant") => self.label(v),
                _ => v,
            })
            .collect()
    }
}

/// `ma_gateway_active_streams` is recomputed rather than only counted up and down: a stream cut
/// by a VM failure never runs its end-of-stream callback, so a bare gauge would stay one too
/// high per such stream. Every filter root publishes its open-stream count with a heartbeat
/// (`<open> <at_ms>`, written by that root alone) under [`stream_lease_key`], listed in
/// [`STREAM_ROOTS_KEY`]; the background leader sets the gauge each tick to the sum over roots
/// heard from within [`STREAM_LEASE_STALE_MS`], and drops the silent ones (a failed VM's root
/// stops beating, so its streams stop counting).
pub const STREAM_ROOTS_KEY: &str = "ma_gateway.streams.roots";
/// A root silent this long (it beats every second) no longer counts.
pub const STREAM_LEASE_STALE_MS: u64 = 5_000;
/// Most roots listed; each VM reload adds one and the leader drops silent ones.
pub const MAX_STREAM_ROOTS: usize = 1024;

/// The shared-data key of one filter root's open-stream count.
pub fn stream_lease_key(root: &str) -> String {
    format!("ma_gateway.streams.{root}")
}

/// One root's record: its open streams at `at_ms`.
pub fn encode_stream_lease(open: u64, at_ms: u64) -> Vec<u8> {
    format!("{open} {at_ms}").into_bytes()
}

fn parse_stream_lease(bytes: &[u8]) -> Option<(u64, u64)> {
    let (open, at) = std::str::from_utf8(bytes).ok()?.split_once(' ')?;
    Some((open.parse().ok()?, at.parse().ok()?))
}

fn listed_roots(bytes: Option<&[u8]>) -> Vec<&str> {
    bytes
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(|text| text.split('\n').filter(|r| !r.is_empty()).collect())
        .unwrap_or_default()
}

/// Whether `root` is listed among the roots whose streams are counted.
pub fn stream_root_listed(store: &dyn Store, root: &str) -> bool {
    store
        .get(STREAM_ROOTS_KEY)
        .is_some_and(|(bytes, _)| listed_roots(Some(&bytes)).contains(&root))
}

/// Lists `root` (once). Refused with `Full` beyond [`MAX_STREAM_ROOTS`].
pub fn register_stream_root(store: &dyn Store, root: &str) -> Result<(), StoreError> {
    let mut full = false;
    store::update(store, STREAM_ROOTS_KEY, 8, |current| {
        let mut roots = listed_roots(current);
        if roots.contains(&root) {
            return None;
        }
        if roots.len() >= MAX_STREAM_ROOTS {
            full = true;
            return None;
        }
        roots.push(root);
        Some((roots.join("\n").into_bytes(), ()))
    })?;
    if full {
        return Err(StoreError::Full);
    }
    Ok(())
}

/// The leader's recount at `now_ms`: open streams of every root heard from recently. Roots
/// silent for longer than [`STREAM_LEASE_STALE_MS`] are unlisted and their records cleared.
pub fn recount_streams(store: &dyn Store, now_ms: u64) -> Result<u64, StoreError> {
    let listed = store.get(STREAM_ROOTS_KEY).map(|(bytes, _)| bytes);
    let mut total = 0u64;
    let mut silent: Vec<String> = Vec::new();
    for root in listed_roots(listed.as_deref()) {
        let live = store
            .get(&stream_lease_key(root))
            .and_then(|(bytes, _)| parse_stream_lease(&bytes))
            .filter(|(_, at)| now_ms.saturating_sub(*at) <= STREAM_LEASE_STALE_MS);
        match live {
            Some((open, _)) => total = total.saturating_add(open),
            None => silent.push(root.to_string()),
        }
    }
    if !silent.is_empty() {
        store::update(store, STREAM_ROOTS_KEY, 8, |current| {
            let kept: Vec<&str> = listed_roots(current)
                .into_iter()
                .filter(|r| !silent.iter().any(|s| s == r))
                .collect();
            Some((kept.join("\n").into_bytes(), ()))
        })?;
        for root in &silent {
            store.set(&stream_lease_key(root), b"", None)?;
        }
    }
    Ok(total)
}

/// `2xx` … `5xx` for a status code.
pub fn status_class(status: u32) -> &'static str {
    match status {
        0 => "none",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn stat_names_encode_labels_in_order() {
        assert_eq!(
            stat_name(&TOKENS, &["acme", "claude-opus-4-6", "input"]),
            "ma_gateway_tokens_total.tenant.acme.model.claude-opus-4-6.type.input"
        );
        assert_eq!(
            stat_name(&DUPLICATES, &[]),
            "ma_gateway_usage_duplicates_total"
        );
        assert_eq!(
            stat_name(&COST, &["a.b c", ""]),
            "ma_gateway_cost_microdollars_total.tenant.a_b_c.model.unknown"
        );
        let long = "x".repeat(500);
        assert_eq!(
            stat_name(&REFUSALS, &[&long]).len(),
            "ma_gateway_refusals_total.reason.".len() + 64
        );
    }

    #[test]
    fn names_are_unique_and_prometheus_friendly() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for m in ALL {
            assert!(m.name.starts_with("ma_gateway_"));
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.name
            );
            assert!(
                !m.labels
                    .iter()
                    .any(|l| l.contains("session") || l.contains("agent")),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn envoy_yaml_has_a_stats_tag_for_every_label() {
        let yaml = include_str!("../envoy.yaml");
        for label in label_names() {
            let wanted = format!("tag_name: {label}\n");
            assert!(
                yaml.contains(&wanted),
                "envoy.yaml stats_tags lacks {label}"
            );
            let regex = stats_tag_regex(label).replace('\\', "\\\\");
            assert!(
                yaml.contains(&format!("regex: \"{regex}\"")),
                "envoy.yaml regex for {label} should be {regex}"
            );
        }
    }

    #[test]
    fn readme_documents_every_metric() {
        let readme = include_str!("../README.md");
        for m in ALL {
            assert!(
                readme.contains(&format!("`{}`", m.name)),
                "README lacks {}",
                m.name
            );
        }
    }

    #[test]
    fn tenant_labels_are_bounded_by_the_config() {
        let plan = crate::config::Plan::from_json(
            br#"{"api_version":"v1","jwt":{"tenant_claim":"org"},
                "tenants":[{"name":"acme"},{"name":"globex"}],
                "gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","tenant":"acme"}]}"#,
        )
        .unwrap();
        let labels = TenantLabels::from_plan(&plan);
        assert_eq!(
            labels.bound(&TOKENS, &["acme", "claude-opus-4-6", "input"]),
            ["acme", "claude-opus-4-6", "input"]
        );
        assert_eq!(labels.bound(&COST, &["ghost-1", "m"]), ["unknown", "m"]);
        assert_eq!(labels.bound(&UPSTREAM_LIST_COST, &["globex"]), ["globex"]);
        // Only the tenant label is bounded; other labels pass unchanged.
        assert_eq!(labels.bound(&REFUSALS, &["ghost-1"]), ["ghost-1"]);
        // A thousand different claim values: one series.
        let names: std::collections::BTreeSet<String> = (0..1000)
            .map(|i| {
                stat_name(
                    &TOKENS,
                    &labels.bound(&TOKENS, &[&format!("t{i}"), "m", "input"]),
                )
            })
            .collect();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["ma_gateway_tokens_total.tenant.unknown.model.m.type.input"]
        );
        // Without tenants: the keys' one tenant.
        let single = crate::config::Plan::from_json(br#"{"api_version":"v1","gateway_keys":[{"name":"k","sha256":"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}]}"#).unwrap();
        let labels = TenantLabels::from_plan(&single);
        assert_eq!(
            (labels.label("default"), labels.label("x")),
            ("default", "unknown")
        );
    }

    #[test]
    fn active_streams_are_recounted_from_live_roots_only() {
        let store = crate::store::MemoryStore::new();
        register_stream_root(&store, "a").unwrap();
        register_stream_root(&store, "b").unwrap();
        register_stream_root(&store, "a").unwrap();
        assert!(stream_root_listed(&store, "a") && !stream_root_listed(&store, "c"));
        store
            .set(&stream_lease_key("a"), &encode_stream_lease(2, 1_000), None)
            .unwrap();
        store
            .set(&stream_lease_key("b"), &encode_stream_lease(3, 1_000), None)
            .unwrap();
        assert_eq!(recount_streams(&store, 1_500), Ok(5));
        // b's VM failed with its 3 streams open: it beats no more. a beats on.
        store
            .set(&stream_lease_key("a"), &encode_stream_lease(1, 6_500), None)
            .unwrap();
        assert_eq!(recount_streams(&store, 6_000), Ok(4));
        assert_eq!(recount_streams(&store, 6_001), Ok(1));
        // b is unlisted and cleared; a root never heard from counts nothing and goes too.
        assert!(!stream_root_listed(&store, "b"));
        assert_eq!(store.value(&stream_lease_key("b")), Some(vec![]));
        register_stream_root(&store, "silent").unwrap();
        assert_eq!(recount_streams(&store, 7_000), Ok(1));
        assert!(!stream_root_listed(&store, "silent") && stream_root_listed(&store, "a"));
        // Bounded registry.
        let full = crate::store::MemoryStore::new();
        for i in 0..MAX_STREAM_ROOTS {
            register_stream_root(&full, &format!("r{i}")).unwrap();
        }
        assert_eq!(
            register_stream_root(&full, "one-more"),
            Err(StoreError::Full)
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            [status_class(200), status_class(404), status_class(503)],
            ["2xx", "4xx", "5xx"]
        );
    }
}
