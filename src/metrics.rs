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
    "List-price cost of the metered tokens, runtime and web searches, in micro-USD (integer)."
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
    USAGE_EVENTS,
    DUPLICATES,
    BAD_EVENTS,
    ACTIVE_STREAMS,
    VM_MEMORY,
    STREAM_DURATION,
    FIRST_EVENT,
    OPERATION_DURATION,
    UPSTREAM_ERRORS,
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
    fn status_classes() {
        assert_eq!(
            [status_class(200), status_class(404), status_class(503)],
            ["2xx", "4xx", "5xx"]
        );
    }
}
