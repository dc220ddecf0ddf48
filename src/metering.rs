//! Metering of one response: which bodies are read, how usage found in them is counted
//! exactly once, priced, and turned into metric [`Emission`]s and the request's
//! [`RequestUsage`] (exposed to access logs).
//!
//! - Event streams (`…/events/stream`, `…/stream`, thread streams) go through the incremental
//!   [`Scanner`]: nothing is buffered beyond one usage event's data (capped).
//! - Small JSON bodies are copied up to a cap and parsed at the end: session objects
//!   (`POST /v1/sessions`, `GET`/`POST /v1/sessions/{id}`: model + cumulative snapshot), event
//!   history pages (spans seen again are duplicates), and upstream error envelopes.
//! - Everything else is not looked at.
//!
//! The host glue feeds bytes in and emits what comes out; all decisions are here.

use serde::Serialize;
use serde_json::Value;

use crate::accounting::{self, Charge, Limits};
use crate::metrics::{self, Metric};
use crate::pricing::{PriceTable, Terms};
use crate::routes::{Action, Family, IdKind, Operation};
use crate::sse::{Scanner, ScannerConfig, SseEvent};
use crate::store::{self, Store};
use crate::usage::{self, Observation};

/// Largest JSON body copied for metering (session objects, history pages, error envelopes).
pub const MAX_JSON_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A metric update for the glue to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Emission {
    Add(&'static Metric, Vec<String>, i64),
    Record(&'static Metric, Vec<String>, u64),
}

/// What one request metered: printed by the access log (filter state `ma_gateway_usage`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestUsage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    /// The price table's estimate of what this request metered; `None` when some usage was
    /// unpriced (unknown model).
    pub cost_microdollars: Option<u64>,
    /// The signed µ$ by which Anthropic's list cost corrected sessions' charged cost during
    /// this request (0 when none did).
    pub list_cost_correction_microdollars: i64,
    pub usage_events: u64,
    pub duplicates: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_list_cost_cents: Option<u64>,
}

impl RequestUsage {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Tokens and money newly charged, as budgets count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spend {
    pub tokens: u64,
    pub microdollars: u64,
    /// Money to give back: list costs below the estimates already charged. [`take_refund`]
    /// nets it against `microdollars` first.
    ///
    /// [`take_refund`]: ResponseMeter::take_refund
    pub refund_microdollars: u64,
}

/// Everything metering needs from outside the request.
pub struct MeterContext<'a> {
    pub store: &'a dyn Store,
    pub prices: &'a PriceTable,
    pub limits: &'a Limits,
    pub now_secs: u64,
    pub scanner: ScannerConfig,
}

enum Body {
    Stream(Box<Scanner>),
    Json {
        kind: JsonKind,
        buf: Vec<u8>,
        overflow: bool,
    },
    Ignore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JsonKind {
    Session,
    EventPage,
    /// A thread object or a page of them: remembers each thread's model.
    Threads,
    Error,
}

/// Store key of the model a thread runs on (thread ids are unique across sessions).
pub fn thread_model_key(thread_id: &str) -> String {
    format!("ma_gateway.thread_model.{thread_id}")
}

/// Per-request metering state.
pub struct ResponseMeter {
    tenant: String,
    session_id: Option<String>,
    /// The thread whose stream or history this is, and its model once looked up.
    thread_id: Option<String>,
    thread_model: Option<Option<String>>,
    body: Body,
    pub usage: RequestUsage,
    priced: bool,
    /// Tokens and µ$ charged since the glue last took them (for tenant budgets).
    unreported: Spend,
    events_before: u64,
    /// Whether the stream has delivered its first event yet (for time-to-first-event).
    pub first_event_seen: bool,
}

/// Names of stream events the scanner keeps the data of.
const STREAM_INTEREST: [&str; 6] = [
    "span.model_request_end",
    "span.outcome_evaluation_end",
    "session.usage",
    "session.error",
    "workflow_run.error",
    "message",
];

/// `session.error` `error.type` values (2026-12 union) that become a metric label as they are;
/// any other value is `other`, so an upstream string never grows the label set.
const SESSION_ERROR_TYPES: [&str; 15] = [
    "unknown_error",
    "model_overloaded_error",
    "model_rate_limited_error",
    "model_request_failed_error",
    "mcp_connection_failed_error",
    "mcp_authentication_failed_error",
    "billing_error",
    "credential_host_unreachable_error",
    "tool_use_limit_reached_error",
    "compaction_limit_reached_error",
    "repository_authentication_error",
    "repository_forbidden_error",
    "repository_not_found_error",
    "repository_checkout_error",
    "repository_clone_error",
];

/// `workflow_run.error` `error.type` values (2026-12); others are `other`.
const WORKFLOW_ERROR_TYPES: [&str; 5] = [
    "timeout_error",
    "program_error",
    "thread_limit_error",
    "max_workflow_runs_error",
    "unknown_error",
];

impl ResponseMeter {
    /// Decides what to read of the response to `op` with `status`, for a caller of `tenant`.
    pub fn new(op: &Operation, status: u32, tenant: &str, scanner: ScannerConfig) -> ResponseMeter {
        let session_id = op.id(IdKind::Session).map(str::to_string);
        let body = if status >= 400 {
            json(JsonKind::Error)
        } else if status != 200 {
            Body::Ignore
        } else {
            match (op.family, op.action) {
                (Family::SessionEvents | Family::SessionThreads, Action::Stream) => {
                    debug_assert!(STREAM_INTEREST.iter().all(|n| usage::is_usage_event(n)
                        || matches!(*n, "session.error" | "workflow_run.error" | "message")));
                    Body::Stream(Box::new(Scanner::new(&STREAM_INTEREST, scanner)))
                }
                (Family::Sessions, Action::Create | Action::Read | Action::Update) => {
                    json(JsonKind::Session)
                }
                (Family::SessionEvents, Action::List) => json(JsonKind::EventPage),
                (Family::SessionThreads, Action::List) if op.id(IdKind::Thread).is_some() => {
                    json(JsonKind::EventPage)
                }
                (Family::SessionThreads, Action::List | Action::Read) => json(JsonKind::Threads),
                _ => Body::Ignore,
            }
        };
        ResponseMeter {
            tenant: tenant.to_string(),
            usage: RequestUsage {
                session_id: session_id.clone(),
                cost_microdollars: Some(0),
                ..RequestUsage::default()
            },
            session_id,
            thread_id: op.id(IdKind::Thread).map(str::to_string),
            thread_model: None,
            body,
            priced: false,
            unreported: Spend::default(),
            events_before: 0,
            first_event_seen: false,
        }
    }

    /// A meter for a session object the gateway fetched itself (reconciler, model lookup).
    pub fn for_session_lookup(session_id: &str, status: u32, tenant: &str) -> ResponseMeter {
        let op = Operation {
            family: Family::Sessions,
            action: Action::Read,
            ids: vec![(IdKind::Session, session_id.to_string())],
        };
        ResponseMeter::new(&op, status, tenant, ScannerConfig { max_event_bytes: 0 })
    }

    /// What was charged since the last call: tokens and µ$, for the tenant's budgets. Call
    /// [`Self::take_refund`] first, or a pending refund is dropped with the rest.
    pub fn take_spend(&mut self) -> Spend {
        std::mem::take(&mut self.unreported)
    }

    /// Nets pending downward corrections against pending charges and returns the µ$ to give
    /// back to the tenant's budgets (0 when the charges cover them); what is left of the
    /// charges stays for [`Self::take_spend`].
    pub fn take_refund(&mut self) -> u64 {
        let spend = &mut self.unreported;
        let netted = spend.refund_microdollars.min(spend.microdollars);
        spend.microdollars -= netted;
        spend.refund_microdollars -= netted;
        std::mem::take(&mut spend.refund_microdollars)
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.body, Body::Stream(_))
    }

    /// Whether the body needs to be seen at all.
    pub fn wants_body(&self) -> bool {
        !matches!(self.body, Body::Ignore)
    }

    /// Whether this request has metered anything worth writing to the access log.
    pub fn has_usage(&self) -> bool {
        self.priced || self.usage.usage_events > 0
    }

    /// Feeds one body chunk; `end` on the last. Returns the metric updates it caused.
    pub fn on_body(&mut self, chunk: &[u8], end: bool, ctx: &MeterContext<'_>) -> Vec<Emission> {
        let mut out = Vec::new();
        match &mut self.body {
            Body::Ignore => {}
            Body::Stream(scanner) => {
                let mut events: Vec<(String, Vec<u8>, bool)> = Vec::new();
                let mut collect = |e: SseEvent<'_>| {
                    events.push((e.name.to_string(), e.data.to_vec(), e.oversize))
                };
                scanner.feed(chunk, &mut collect);
                if end {
                    scanner.finish(&mut collect);
                }
                let seen = scanner.stats().events;
                if seen > self.events_before {
                    self.events_before = seen;
                    self.first_event_seen = true;
                }
                for (name, data, oversize) in events {
                    self.on_stream_event(&name, &data, oversize, ctx, &mut out);
                }
            }
            Body::Json {
                kind,
                buf,
                overflow,
            } => {
                if !*overflow {
                    if buf.len() + chunk.len() > MAX_JSON_BODY_BYTES {
                        *overflow = true;
                        *buf = Vec::new();
                    } else {
                        buf.extend_from_slice(chunk);
                    }
                }
                if end {
                    let kind = *kind;
                    let overflowed = *overflow;
                    let body = std::mem::take(buf);
                    self.body = Body::Ignore;
                    if overflowed {
                        if kind != JsonKind::Error {
                            out.push(add(&metrics::BAD_EVENTS, &["oversize"], 1));
                        }
                    } else {
                        self.on_json(kind, &body, ctx, &mut out);
                    }
                }
            }
        }
        out
    }

    fn on_stream_event(
        &mut self,
        name: &str,
        data: &[u8],
        oversize: bool,
        ctx: &MeterContext<'_>,
        out: &mut Vec<Emission>,
    ) {
        if oversize {
            if name != "message" {
                out.push(add(&metrics::BAD_EVENTS, &["oversize"], 1));
            }
            return;
        }
        if name == "session.error" {
            let kind = event_error_type(data, &SESSION_ERROR_TYPES);
            out.push(add(
                &metrics::UPSTREAM_ERRORS,
                &[&format!("session_{kind}")],
                1,
            ));
            return;
        }
        if name == "workflow_run.error" {
            let kind = event_error_type(data, &WORKFLOW_ERROR_TYPES);
            out.push(add(
                &metrics::UPSTREAM_ERRORS,
                &[&format!("workflow_{kind}")],
                1,
            ));
            return;
        }
        self.on_usage_event(name, data, ctx, out);
    }

    fn on_usage_event(
        &mut self,
        name: &str,
        data: &[u8],
        ctx: &MeterContext<'_>,
        out: &mut Vec<Emission>,
    ) {
        let observation = match usage::from_event(name, data) {
            Ok(Some(observation)) => observation,
            Ok(None) => return,
            Err(err) => {
                log::warn!("malformed usage event {name}: {err}");
                out.push(add(&metrics::BAD_EVENTS, &["malformed"], 1));
                return;
            }
        };
        let Some(session_id) = self.session_id.clone() else {
            return;
        };
        let kind = match observation {
            Observation::Span { .. } => "span",
            Observation::Snapshot(_) => "snapshot",
        };
        out.push(add(&metrics::USAGE_EVENTS, &[kind], 1));
        self.usage.usage_events += 1;
        if let Observation::Snapshot(snapshot) = &observation {
            self.list_cost(&session_id, snapshot.list_cost_cents, ctx, out);
        }
        let terms = match &observation {
            Observation::Span { tokens, speed, .. } => Terms {
                fast: speed.as_deref() == Some("fast"),
                prompt_tokens: Some(
                    tokens
                        .input
                        .saturating_add(tokens.cache_read)
                        .saturating_add(tokens.cache_creation),
                ),
                geo_us: false,
            },
            Observation::Snapshot(_) => Terms::default(),
        };
        // Spans of a thread's stream or history are priced at the thread's model when the
        // gateway has read the thread (spans carry no model).
        let thread_model = match &observation {
            Observation::Span { .. } => self.thread_model(ctx),
            Observation::Snapshot(_) => None,
        };
        let pricer = |charge: &Charge| {
            let terms = Terms {
                geo_us: charge.geo_us,
                ..terms
            };
            let model = thread_model.as_deref().or(charge.model.as_deref());
            ctx.prices.estimate(model, charge, &terms)
        };
        match accounting::record_priced(
            ctx.store,
            ctx.limits,
            &session_id,
            &observation,
            &pricer,
            ctx.now_secs,
        ) {
            Ok(mut charge) => {
                if let Some(model) = thread_model {
                    charge.model = Some(model);
                }
                self.charge(&charge, out)
            }
            Err(err) => log::warn!("usage of {session_id} not recorded: {err}"),
        }
    }

    fn on_json(
        &mut self,
        kind: JsonKind,
        body: &[u8],
        ctx: &MeterContext<'_>,
        out: &mut Vec<Emission>,
    ) {
        match kind {
            JsonKind::Error => {
                let kind = serde_json::from_slice::<Value>(body)
                    .ok()
                    .and_then(|v| {
                        v.pointer("/error/type")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_else(|| "unparsed".to_string());
                out.push(add(&metrics::UPSTREAM_ERRORS, &[&kind], 1));
            }
            JsonKind::Session => match usage::from_session_body(body) {
                Ok(facts) => {
                    crate::reconcile::remember_tenant(ctx.store, &facts.session_id, &self.tenant);
                    self.session_id = Some(facts.session_id.clone());
                    self.usage.session_id = Some(facts.session_id.clone());
                    if let Some(snapshot) = &facts.snapshot {
                        self.list_cost(&facts.session_id, snapshot.list_cost_cents, ctx, out);
                    }
                    let pricer = |charge: &Charge| {
                        let terms = Terms {
                            geo_us: charge.geo_us,
                            ..Terms::default()
                        };
                        ctx.prices.estimate(charge.model.as_deref(), charge, &terms)
                    };
                    match accounting::observe_session_priced(
                        ctx.store,
                        ctx.limits,
                        &facts,
                        &pricer,
                        ctx.now_secs,
                    ) {
                        Ok(charge) => self.charge(&charge, out),
                        Err(err) => log::warn!("session {} not recorded: {err}", facts.session_id),
                    }
                }
                Err(err) => {
                    log::warn!("session body not understood: {err}");
                    out.push(add(&metrics::BAD_EVENTS, &["malformed"], 1));
                }
            },
            JsonKind::Threads => {
                for (thread_id, model) in usage::thread_models(body) {
                    let key = thread_model_key(&thread_id);
                    let result = store::update(ctx.store, &key, ctx.limits.cas_attempts, |c| {
                        (c != Some(model.as_bytes())).then(|| (model.as_bytes().to_vec(), ()))
                    });
                    if let Err(err) = result {
                        log::warn!("model of thread {thread_id} not remembered: {err}");
                    }
                }
            }
            JsonKind::EventPage => {
                let Ok(page) = serde_json::from_slice::<Value>(body) else {
                    out.push(add(&metrics::BAD_EVENTS, &["malformed"], 1));
                    return;
                };
                let events = page
                    .get("data")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for event in events {
                    let Some(name) = event.get("type").and_then(Value::as_str) else {
                        continue;
                    };
                    if usage::is_usage_event(name) {
                        let name = name.to_string();
                        let data = serde_json::to_vec(&event).unwrap_or_default();
                        self.on_usage_event(&name, &data, ctx, out);
                    }
                }
            }
        }
    }

    /// Emits a charge's tokens and cost, and adds them to this request's usage.
    fn charge(&mut self, charge: &Charge, out: &mut Vec<Emission>) {
        if charge.duplicate {
            self.usage.duplicates += 1;
            out.push(add(&metrics::DUPLICATES, &[], 1));
        }
        if charge.is_nothing() {
            return;
        }
        self.correct(charge, out);
        let model = charge.model.as_deref().unwrap_or("unknown");
        let tenant = self.tenant.as_str();
        if charge.is_zero() {
            out.retain(|e| !matches!(e, Emission::Add(_, _, 0)));
            return;
        }
        let cache_write = charge.cache_write_5m + charge.cache_write_1h;
        for (kind, tokens) in [
            ("input", charge.input),
            ("output", charge.output),
            ("cache_read", charge.cache_read),
            ("cache_write", cache_write),
        ] {
            out.push(add(&metrics::TOKENS, &[tenant, model, kind], tokens));
        }
        out.push(add(
            &metrics::CACHE_WRITE_1H,
            &[tenant, model],
            charge.cache_write_1h + charge.cache_write_5m_to_1h,
        ));
        out.push(add(
            &metrics::RUNTIME_SECONDS,
            &[tenant, model],
            charge.active_seconds,
        ));
        out.push(add(
            &metrics::WEB_SEARCHES,
            &[tenant, model],
            charge.web_search_requests,
        ));
        if charge.unpriced {
            let tokens = charge.input + charge.output + charge.cache_read + cache_write;
            out.push(add(&metrics::UNPRICED_TOKENS, &[tenant, model], tokens));
            self.usage.cost_microdollars = None;
        } else {
            let micros = charge.estimate_micros;
            out.push(add(&metrics::COST, &[tenant, model], micros));
            out.push(add(&metrics::CHARGED_COST, &[tenant, model], micros));
            self.unreported.microdollars += micros;
            if let Some(total) = &mut self.usage.cost_microdollars {
                *total += micros;
            }
        }
        self.priced = true;
        self.unreported.tokens += charge.input + charge.output + charge.cache_read + cache_write;
        self.usage.model = charge.model.clone();
        self.usage.input_tokens += charge.input;
        self.usage.output_tokens += charge.output;
        self.usage.cache_read_input_tokens += charge.cache_read;
        self.usage.cache_creation_input_tokens += cache_write;
        out.retain(|e| !matches!(e, Emission::Add(_, _, 0)));
    }

    /// The model of this request's thread, if it has one and the gateway has read it.
    fn thread_model(&mut self, ctx: &MeterContext<'_>) -> Option<String> {
        let thread_id = self.thread_id.as_deref()?;
        self.thread_model
            .get_or_insert_with(|| {
                ctx.store
                    .get(&thread_model_key(thread_id))
                    .and_then(|(bytes, _)| String::from_utf8(bytes).ok())
                    .filter(|m| !m.is_empty())
            })
            .clone()
    }

    /// Emits a list-cost correction of the session's charged cost and queues it for budgets.
    fn correct(&mut self, charge: &Charge, out: &mut Vec<Emission>) {
        if charge.list_cost_micros.is_none() || charge.correction_micros == 0 {
            return;
        }
        let model = charge.model.as_deref().unwrap_or("unknown");
        let tenant = self.tenant.as_str();
        let delta = charge.correction_micros;
        let (kind, magnitude) = if delta < 0 {
            ("down", delta.unsigned_abs())
        } else {
            ("up", delta.unsigned_abs())
        };
        out.push(add(
            &metrics::LIST_COST_CORRECTIONS,
            &[tenant, model, kind],
            1,
        ));
        out.push(add(
            &metrics::COST_CORRECTION,
            &[tenant, model, kind],
            magnitude,
        ));
        out.push(Emission::Add(
            &metrics::CHARGED_COST,
            vec![tenant.to_string(), model.to_string()],
            delta,
        ));
        if delta < 0 {
            self.unreported.refund_microdollars += magnitude;
        } else {
            self.unreported.microdollars += magnitude;
        }
        self.usage.list_cost_correction_microdollars += delta;
        self.priced = true;
        self.usage.model = charge.model.clone();
    }

    /// Anthropic's own cumulative `list_cost`: emits the increase since the last one seen for
    /// this session (kept beside the usage record), so it sums like our own cost counter.
    fn list_cost(
        &mut self,
        session_id: &str,
        cents: Option<u64>,
        ctx: &MeterContext<'_>,
        out: &mut Vec<Emission>,
    ) {
        let Some(cents) = cents else {
            return;
        };
        self.usage.upstream_list_cost_cents = Some(cents);
        let key = format!("{}.list_cost", accounting::session_key(session_id));
        // After an eviction the figure re-baselines: written, never counted again.
        let evicted =
            crate::bounded::was_evicted(ctx.store, &crate::bounded::LIST_COST, session_id);
        let result = store::update(ctx.store, &key, ctx.limits.cas_attempts, |current| {
            let previous = current
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse::<u64>().ok());
            let baseline = previous.is_none() && evicted;
            let previous = previous.unwrap_or(0);
            (cents > previous).then(|| {
                let delta = if baseline { 0 } else { cents - previous };
                (cents.to_string().into_bytes(), delta)
            })
        });
        if let Ok(Some(delta)) = result.map(|d| d.filter(|d| *d > 0)) {
            out.push(add(&metrics::UPSTREAM_LIST_COST, &[&self.tenant], delta));
        }
    }
}

fn json(kind: JsonKind) -> Body {
    Body::Json {
        kind,
        buf: Vec::new(),
        overflow: false,
    }
}

fn add(metric: &'static Metric, labels: &[&str], value: u64) -> Emission {
    Emission::Add(
        metric,
        labels.iter().map(|l| l.to_string()).collect(),
        i64::try_from(value).unwrap_or(i64::MAX),
    )
}

/// The `error.type` of a `session.error` / `workflow_run.error` event as a bounded label: one
/// of `known`, `other` for any other string, `unknown` when there is none. (The caller prefixes
/// it so it cannot be confused with HTTP error types.)
fn event_error_type(data: &[u8], known: &[&'static str]) -> &'static str {
    let value = serde_json::from_slice::<Value>(data).ok();
    match value
        .as_ref()
        .and_then(|v| v.pointer("/error/type"))
        .and_then(Value::as_str)
    {
        Some(kind) => known
            .iter()
            .find(|k| **k == kind)
            .copied()
            .unwrap_or("other"),
        None => "unknown",
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::MemoryStore;

    const SID: &str = "sesn_1";

    fn op(family: Family, action: Action, thread: Option<&str>) -> Operation {
        let mut ids = vec![(IdKind::Session, SID.to_string())];
        if let Some(t) = thread {
            ids.push((IdKind::Thread, t.to_string()));
        }
        Operation {
            family,
            action,
            ids,
        }
    }

    fn run(store: &MemoryStore, op: &Operation, body: &str) -> (Vec<Emission>, ResponseMeter) {
        let prices = PriceTable::defaults();
        let limits = Limits::default();
        let ctx = MeterContext {
            store,
            prices: &prices,
            limits: &limits,
            now_secs: 1,
            scanner: ScannerConfig {
                max_event_bytes: 65_536,
            },
        };
        let mut meter = ResponseMeter::new(op, 200, "acme", ctx.scanner);
        let out = meter.on_body(body.as_bytes(), true, &ctx);
        (out, meter)
    }

    fn total(out: &[Emission], metric: &Metric, labels: &[&str]) -> i64 {
        out.iter()
            .filter_map(|e| match e {
                Emission::Add(m, l, v) if m.name == metric.name && l == labels => Some(*v),
                _ => None,
            })
            .sum()
    }

    fn session(model: &str) -> String {
        format!(
            r#"{{"id":"{SID}","agent":{{"type":"agent","id":"agent_1","model":{{"id":"{model}","inference_geo":"global"}}}},"usage":null}}"#
        )
    }

    const SPAN: &str = "event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"id\":\"sevt_1\",\"model_usage\":{\"input_tokens\":1000000,\"output_tokens\":0,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"speed\":\"fast\"}}\n\n";

    fn usage_event(cents: u64) -> String {
        format!("event: session.usage\ndata: {{\"type\":\"session.usage\",\"usage\":{{\"input_tokens\":1000000,\"output_tokens\":0,\"cache_read_input_tokens\":0,\"cache_creation\":{{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":0}},\"list_cost\":{{\"amount\":\"{cents}\",\"currency\":\"USD\"}}}}}}\n\n")
    }

    #[test]
    fn error_events_are_counted_with_a_bounded_label() {
        let store = MemoryStore::new();
        let stream = op(Family::SessionEvents, Action::Stream, None);
        let frame = |name: &str, kind: &str| {
            format!("event: {name}\ndata: {{\"type\":\"{name}\",\"error\":{{\"type\":\"{kind}\",\"message\":\"m\"}}}}\n\n")
        };
        let body = [
            frame("session.error", "billing_error"),
            frame("session.error", "billing_error"),
            frame("session.error", "made_up_error_1"),
            frame("session.error", "made_up_error_2"),
            frame("workflow_run.error", "thread_limit_error"),
            frame("workflow_run.error", "surprise"),
            "event: session.error\ndata: {\"type\":\"session.error\"}\n\n".to_string(),
            // Passed through, not errors: nothing counted.
            "event: session.status_idle\ndata: {\"type\":\"session.status_idle\",\"stop_reason\":{\"type\":\"refusal\"},\"stop_details\":{\"type\":\"refusal\",\"category\":\"cyber\",\"explanation\":\"x\"}}\n\n".to_string(),
            "event: workflow_run.status_ended\ndata: {\"type\":\"workflow_run.status_ended\",\"result\":{\"type\":\"error\"}}\n\n".to_string(),
        ]
        .concat();
        let (out, _) = run(&store, &stream, &body);
        let count = |label: &str| total(&out, &metrics::UPSTREAM_ERRORS, &[label]);
        assert_eq!(count("session_billing_error"), 2);
        assert_eq!(count("session_other"), 2);
        assert_eq!(count("session_unknown"), 1);
        assert_eq!(count("workflow_thread_limit_error"), 1);
        assert_eq!(count("workflow_other"), 1);
        let all: i64 = out
            .iter()
            .filter_map(|e| match e {
                Emission::Add(m, _, v) if m.name == metrics::UPSTREAM_ERRORS.name => Some(*v),
                _ => None,
            })
            .sum();
        assert_eq!(all, 7);
    }

    #[test]
    fn a_fast_span_is_estimated_then_corrected_once_to_the_list_cost() {
        let store = MemoryStore::new();
        let opus = "claude-opus-5-5";
        run(
            &store,
            &op(Family::Sessions, Action::Read, None),
            &session(opus),
        );
        let stream = op(Family::SessionEvents, Action::Stream, None);
        // 1M fast input tokens of Opus 5.5: $4 × 2 = 8,000,000 µ$; Anthropic says $7.50.
        let body = format!("{SPAN}{}", usage_event(750));
        let (out, mut meter) = run(&store, &stream, &body);
        let labels = ["acme", opus];
        assert_eq!(total(&out, &metrics::COST, &labels), 8_000_000);
        assert_eq!(
            total(&out, &metrics::COST_CORRECTION, &["acme", opus, "down"]),
            500_000
        );
        assert_eq!(total(&out, &metrics::CHARGED_COST, &labels), 7_500_000);
        assert_eq!(meter.usage.cost_microdollars, Some(8_000_000));
        assert_eq!(meter.usage.list_cost_correction_microdollars, -500_000);
        // Budgets: the net charge, no refund.
        assert_eq!(meter.take_refund(), 0);
        assert_eq!(meter.take_spend().microdollars, 7_500_000);
        // A second stream and a history page of the same session: nothing more.
        let (out, mut meter) = run(&store, &stream, &body);
        assert_eq!(total(&out, &metrics::CHARGED_COST, &labels), 0);
        assert_eq!(total(&out, &metrics::DUPLICATES, &[]), 1);
        assert_eq!(
            (meter.take_refund(), meter.take_spend().microdollars),
            (0, 0)
        );
        // An older, lower figure changes nothing; a covering one below what was charged is a
        // refund for budgets.
        let lower = usage_event(740);
        let (out, mut meter) = run(&store, &stream, &lower);
        assert_eq!(total(&out, &metrics::CHARGED_COST, &labels), 0);
        assert_eq!(meter.take_refund(), 0);
        let (_, mut meter) = run(
            &store,
            &stream,
            "event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"id\":\"sevt_2\",\"model_usage\":{\"input_tokens\":100000,\"output_tokens\":0,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0}}\n\n",
        );
        assert_eq!(meter.take_spend().microdollars, 400_000);
        let covering = usage_event(751).replace("1000000", "1100000");
        let (out, mut meter) = run(&store, &stream, &covering);
        assert_eq!(total(&out, &metrics::CHARGED_COST, &labels), -390_000);
        assert_eq!(meter.take_refund(), 390_000);
        assert_eq!(meter.take_spend().microdollars, 0);
    }

    #[test]
    fn thread_spans_are_priced_at_the_thread_model() {
        let store = MemoryStore::new();
        run(
            &store,
            &op(Family::Sessions, Action::Read, None),
            &session("claude-opus-5-5"),
        );
        run(
            &store,
            &op(Family::SessionThreads, Action::List, None),
            r#"{"data":[{"id":"sthr_9","agent":{"type":"advisor","model":"claude-haiku-5-5"}}]}"#,
        );
        let thread = op(Family::SessionThreads, Action::Stream, Some("sthr_9"));
        let (out, _) = run(&store, &thread, SPAN);
        // 1M fast Haiku 5.5 input tokens, a prompt over 100K: $0.10 × 2 × 5 = $1.
        assert_eq!(
            total(&out, &metrics::COST, &["acme", "claude-haiku-5-5"]),
            1_000_000
        );
        assert_eq!(
            total(
                &out,
                &metrics::TOKENS,
                &["acme", "claude-haiku-5-5", "input"]
            ),
            1_000_000
        );
        // An unread thread's spans take the session's model.
        let other = op(Family::SessionThreads, Action::Stream, Some("sthr_8"));
        let (out, _) = run(&store, &other, &SPAN.replace("sevt_1", "sevt_2"));
        assert_eq!(
            total(&out, &metrics::COST, &["acme", "claude-opus-5-5"]),
            8_000_000
        );
    }
}
