//! Usage read out of Managed Agents SSE events and session JSON bodies.
//!
//! This module owns turning bytes into [`Observation`]s and [`SessionFacts`]; it keeps no state
//! and knows nothing of prices or of what was already counted (see `accounting`). Usage shows up
//! in three places (reference: "Usage — the three places it appears"):
//! 1. `span.model_request_end` (`model_usage`) and `span.outcome_evaluation_end` (`usage`):
//!    the four token counts of one model request, identified by the event `id` →
//!    [`Observation::Span`].
//! 2. `usage` on a session object (`POST /v1/sessions`, `GET /v1/sessions/{id}`): the
//!    cumulative snapshot → [`SessionFacts::snapshot`], read by [`from_session_body`].
//! 3. `session.usage` events: the same cumulative snapshot → [`Observation::Snapshot`].
//!
//! # Strictness
//! New fields appear monthly, so unknown fields are ignored everywhere and a body is never
//! rejected for its size or for what it carries outside the usage. The usage numbers
//! themselves are strict: a token count that is missing, negative, fractional or not a number
//! is an error naming the field, because a silently-zero count would under-bill and a guessed
//! one could over-bill. The only number accepted as a float is `active_seconds` (seen as a
//! float in practice): it is floored to whole seconds, so runtime is never over-counted.
//! `list_cost` corrects the session's charged cost (see `accounting`); a malformed one is
//! logged and dropped rather than failing the whole snapshot (the next one corrects anyway).

use std::fmt;

use serde_json::{Map, Value};

/// The SSE event names that carry usage.
pub const USAGE_EVENT_NAMES: [&str; 3] = [
    "span.model_request_end",
    "span.outcome_evaluation_end",
    "session.usage",
];

/// Name an SSE frame gets when it has no `event:` line; such frames are dispatched on the
/// JSON `type` field instead.
const UNNAMED_EVENT: &str = "message";

/// Whether an SSE event of this name carries usage.
pub fn is_usage_event(name: &str) -> bool {
    USAGE_EVENT_NAMES.contains(&name)
}

/// Which span a [`Observation::Span`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// `span.model_request_end`.
    ModelRequest,
    /// `span.outcome_evaluation_end`.
    OutcomeEvaluation,
}

/// The four token counts of one span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanTokens {
    pub input: u64,
    pub output: u64,
    /// All cache writes, whatever their TTL: the span does not split 5m from 1h.
    pub cache_creation: u64,
    pub cache_read: u64,
}

/// The cumulative usage of a session so far (never a delta).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    /// Whole seconds the session spent running (floored); `None` when not reported.
    pub active_seconds: Option<u64>,
    pub web_search_requests: u64,
    pub web_fetch_requests: u64,
    /// Anthropic's own list cost in US cents, when reported in USD.
    pub list_cost_cents: Option<u64>,
}

/// One usage-bearing event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// One model request (or outcome evaluation); counted once per `event_id`.
    Span {
        event_id: String,
        kind: SpanKind,
        tokens: SpanTokens,
        /// `standard` or `fast` when reported.
        speed: Option<String>,
        /// Failed requests still carry (and cost) usage.
        is_error: bool,
    },
    /// A `session.usage` event: the session's cumulative usage.
    Snapshot(Snapshot),
}

/// What a session object tells the gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFacts {
    pub session_id: String,
    pub agent_id: Option<String>,
    /// `agent.model.id`, or `agent.model` when it is a plain string. Spans carry no model, so
    /// this is the only place pricing learns it.
    pub model: Option<String>,
    pub status: Option<String>,
    /// `agent.model.inference_geo` (`us`, `global`), when the body says.
    pub inference_geo: Option<String>,
    /// The cumulative `usage`, when the body carries one.
    pub snapshot: Option<Snapshot>,
    /// The body carried a `usage` that could not be read. The other facts are still good (the
    /// model matters more than one snapshot; the next snapshot reconciles anyway), so this is
    /// reported here rather than failing the whole body.
    pub snapshot_error: Option<UsageError>,
}

/// A usage field that is missing or malformed, or a body that is not JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError {
    /// Dotted path of the field, e.g. `model_usage.input_tokens`; empty for the whole body.
    pub path: String,
    pub message: String,
}

impl UsageError {
    fn new(path: &str, message: impl Into<String>) -> UsageError {
        UsageError {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "usage error: {}", self.message)
        } else {
            write!(f, "usage error at {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for UsageError {}

/// Parses the data of a usage event. `name` is the SSE event name; `message` (a frame without
/// an `event:` line) is dispatched on the JSON `type`. Returns `Ok(None)` for events that carry
/// no usage (the caller normally filters with [`is_usage_event`] first). The event name wins
/// over the JSON `type` when both are present, as in the SDKs.
pub fn from_event(name: &str, data: &[u8]) -> Result<Option<Observation>, UsageError> {
    let value: Value = serde_json::from_slice(data)
        .map_err(|e| UsageError::new("", format!("event data is not JSON: {e}")))?;
    let Some(event) = value.as_object() else {
        return Err(UsageError::new("", "event data is not a JSON object"));
    };
    let name = if name == UNNAMED_EVENT {
        match event.get("type").and_then(Value::as_str) {
            Some(kind) => kind,
            None => return Ok(None),
        }
    } else {
        name
    };
    match name {
        "span.model_request_end" => span(event, SpanKind::ModelRequest).map(Some),
        "span.outcome_evaluation_end" => span(event, SpanKind::OutcomeEvaluation).map(Some),
        "session.usage" => session_usage(event).map(|s| Some(Observation::Snapshot(s))),
        _ => Ok(None),
    }
}

fn span(event: &Map<String, Value>, kind: SpanKind) -> Result<Observation, UsageError> {
    let event_id = match event.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(other) => return Err(invalid("id", "a non-empty string", other)),
        None => return Err(UsageError::new("id", "missing")),
    };
    // The reference names the object `model_usage` on model requests and `usage` on outcome
    // evaluations; accept the other name too so that a rename does not stop metering.
    let (primary, secondary) = match kind {
        SpanKind::ModelRequest => ("model_usage", "usage"),
        SpanKind::OutcomeEvaluation => ("usage", "model_usage"),
    };
    let (path, usage) = match (event.get(primary), event.get(secondary)) {
        (Some(usage), _) if !usage.is_null() => (primary, usage),
        (_, Some(usage)) if !usage.is_null() => (secondary, usage),
        _ => return Err(UsageError::new(primary, "missing")),
    };
    let usage = object(usage, path)?;
    let tokens = SpanTokens {
        input: required_count(usage, path, "input_tokens")?,
        output: required_count(usage, path, "output_tokens")?,
        cache_creation: required_count(usage, path, "cache_creation_input_tokens")?,
        cache_read: required_count(usage, path, "cache_read_input_tokens")?,
    };
    // The tier the request actually ran at is `model_usage.speed`; older shapes put it on
    // the event.
    let (speed_path, speed) = match (usage.get("speed"), event.get("speed")) {
        (Some(speed), _) if !speed.is_null() => (join(path, "speed"), Some(speed)),
        (_, speed) => ("speed".to_string(), speed),
    };
    let speed = match speed {
        None | Some(Value::Null) => None,
        Some(Value::String(speed)) => Some(speed.clone()),
        Some(other) => return Err(invalid(&speed_path, "a string", other)),
    };
    let is_error = match event.get("is_error") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(invalid("is_error", "a boolean", other)),
    };
    Ok(Observation::Span {
        event_id,
        kind,
        tokens,
        speed,
        is_error,
    })
}

fn session_usage(event: &Map<String, Value>) -> Result<Snapshot, UsageError> {
    match event.get("usage") {
        Some(usage) if !usage.is_null() => {
            snapshot(object(usage, "usage")?, "usage", event.get("stats"))
        }
        // Where exactly the event puts the snapshot is unverified; if there is no `usage`
        // object but the counts sit at the top level, read them there.
        _ if event.contains_key("input_tokens") => snapshot(event, "", event.get("stats")),
        _ => Err(UsageError::new("usage", "missing")),
    }
}

/// The fields of a session object we read; everything else (agent system prompt, tools,
/// resources, …) is ignored.
struct SessionBody {
    id: Option<Value>,
    agent: Option<Value>,
    status: Option<Value>,
    usage: Option<Value>,
    stats: Option<Value>,
}

impl SessionBody {
    /// Parsed as a `Value` and picked apart, not with `#[derive(Deserialize)]`: a derived
    /// struct makes serde link its "invalid type: floating point" message and with it core's
    /// float printing, ~15 KB of the module for an error nobody reads.
    fn parse(body: &[u8]) -> Result<SessionBody, String> {
        let Value::Object(mut object) = serde_json::from_slice(body).map_err(|e| e.to_string())?
        else {
            return Err("not an object".to_string());
        };
        let mut take = |name: &str| object.remove(name).filter(|v| !v.is_null());
        Ok(SessionBody {
            id: take("id"),
            agent: take("agent"),
            status: take("status"),
            usage: take("usage"),
            stats: take("stats"),
        })
    }
}

/// Parses a session object (the body of `POST /v1/sessions` or `GET /v1/sessions/{id}`).
/// Only `id` is required; a malformed `usage` is reported in
/// [`SessionFacts::snapshot_error`].
pub fn from_session_body(body: &[u8]) -> Result<SessionFacts, UsageError> {
    let session = SessionBody::parse(body)
        .map_err(|e| UsageError::new("", format!("session body is not a JSON object: {e}")))?;
    let session_id = match session.id {
        Some(Value::String(id)) if !id.is_empty() => id,
        Some(other) => return Err(invalid("id", "a non-empty string", &other)),
        None => return Err(UsageError::new("id", "missing")),
    };
    let mut facts = SessionFacts {
        session_id,
        status: session
            .status
            .as_ref()
            .and_then(Value::as_str)
            .map(String::from),
        ..SessionFacts::default()
    };
    match &session.agent {
        // A response carries the agent snapshot object; a bare id only appears in requests,
        // accepted so that the caller may pass either.
        Some(Value::String(id)) => facts.agent_id = Some(id.clone()),
        Some(Value::Object(agent)) => {
            facts.agent_id = agent.get("id").and_then(Value::as_str).map(String::from);
            facts.model = match agent.get("model") {
                Some(Value::String(model)) => Some(model.clone()),
                Some(Value::Object(model)) => {
                    facts.inference_geo = model
                        .get("inference_geo")
                        .and_then(Value::as_str)
                        .map(String::from);
                    model.get("id").and_then(Value::as_str).map(String::from)
                }
                _ => None,
            };
        }
        _ => {}
    }
    facts.model = facts.model.filter(|m| !m.is_empty());
    match &session.usage {
        None | Some(Value::Null) => {}
        Some(usage) => {
            match object(usage, "usage").and_then(|u| snapshot(u, "usage", session.stats.as_ref()))
            {
                Ok(snapshot) => facts.snapshot = Some(snapshot),
                Err(error) => facts.snapshot_error = Some(error),
            }
        }
    }
    Ok(facts)
}

/// The model of each thread object in a thread body: one thread
/// (`GET /v1/sessions/{id}/threads/{thread_id}`) or a page of them (`{"data": [...]}`). A
/// thread's `agent` is a saved-agent snapshot (`model` an id or `{id, …}`), an advisor
/// (`{type: "advisor", model}`) or an inline agent (`{type: "inline", model}`); threads
/// without a readable model are left out. Malformed bodies give nothing.
pub fn thread_models(body: &[u8]) -> Vec<(String, String)> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let threads: Vec<&Value> = match value.get("data").and_then(Value::as_array) {
        Some(page) => page.iter().collect(),
        None => vec![&value],
    };
    threads
        .into_iter()
        .filter_map(|thread| {
            let id = thread.get("id")?.as_str().filter(|id| !id.is_empty())?;
            let model = match thread.get("agent")?.get("model")? {
                Value::String(model) => model.as_str(),
                Value::Object(model) => model.get("id")?.as_str()?,
                _ => return None,
            };
            (!model.is_empty()).then(|| (id.to_string(), model.to_string()))
        })
        .collect()
}

/// Reads a cumulative usage object found at `path`; `stats` is the enclosing object's
/// `stats`, consulted for `active_seconds` when the usage itself has none.
fn snapshot(
    usage: &Map<String, Value>,
    path: &str,
    stats: Option<&Value>,
) -> Result<Snapshot, UsageError> {
    let input = required_count(usage, path, "input_tokens")?;
    let output = required_count(usage, path, "output_tokens")?;
    let cache_read = required_count(usage, path, "cache_read_input_tokens")?;
    let (cache_write_5m, cache_write_1h) = match usage.get("cache_creation") {
        Some(split) if !split.is_null() => {
            let split_path = join(path, "cache_creation");
            let split = object(split, &split_path)?;
            (
                required_count(split, &split_path, "ephemeral_5m_input_tokens")?,
                required_count(split, &split_path, "ephemeral_1h_input_tokens")?,
            )
        }
        // Without the split, a lump is charged as 5-minute writes: the cheaper rate, so
        // never an over-charge; a later split snapshot corrects it.
        _ if usage.contains_key("cache_creation_input_tokens") => (
            required_count(usage, path, "cache_creation_input_tokens")?,
            0,
        ),
        _ => return Err(UsageError::new(&join(path, "cache_creation"), "missing")),
    };
    let mut active_seconds =
        optional_seconds(usage.get("active_seconds"), &join(path, "active_seconds"))?;
    if active_seconds.is_none() {
        if let Some(Value::Object(stats)) = stats {
            active_seconds = optional_seconds(stats.get("active_seconds"), "stats.active_seconds")?;
        }
    }
    let (web_search_requests, web_fetch_requests) = match usage.get("server_tool_use") {
        None | Some(Value::Null) => (0, 0),
        Some(tools) => {
            let tools_path = join(path, "server_tool_use");
            let tools = object(tools, &tools_path)?;
            (
                optional_count(tools, &tools_path, "web_search_requests")?,
                optional_count(tools, &tools_path, "web_fetch_requests")?,
            )
        }
    };
    Ok(Snapshot {
        input,
        output,
        cache_read,
        cache_write_5m,
        cache_write_1h,
        active_seconds,
        web_search_requests,
        web_fetch_requests,
        list_cost_cents: list_cost_cents(usage.get("list_cost"), &join(path, "list_cost")),
    })
}

/// `{"amount":"<integer cents>","currency":"USD"}` → cents. Anything else is logged and
/// dropped: the next snapshot carries the cumulative figure again.
fn list_cost_cents(value: Option<&Value>, path: &str) -> Option<u64> {
    let cost = value.filter(|v| !v.is_null())?;
    let amount = cost.get("amount").and_then(Value::as_str);
    let currency = cost.get("currency").and_then(Value::as_str);
    match (amount, currency) {
        (Some(amount), Some("USD"))
            if !amount.is_empty() && amount.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match amount.parse() {
                Ok(cents) => Some(cents),
                Err(_) => {
                    log::warn!("{path}: amount {amount:?} out of range; ignored");
                    None
                }
            }
        }
        _ => {
            log::warn!("{path}: expected {{amount: \"<integer cents>\", currency: \"USD\"}}, got {cost}; ignored");
            None
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, UsageError> {
    value
        .as_object()
        .ok_or_else(|| invalid(path, "an object", value))
}

fn invalid(path: &str, expected: &str, got: &Value) -> UsageError {
    let mut shown = got.to_string();
    if shown.len() > 64 {
        // Never echo a large value into a log line.
        shown = format!("a {} value", json_kind(got));
    }
    UsageError::new(path, format!("expected {expected}, got {shown}"))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn required_count(object: &Map<String, Value>, path: &str, field: &str) -> Result<u64, UsageError> {
    let path = join(path, field);
    match object.get(field) {
        Some(value) => value
            .as_u64()
            .ok_or_else(|| invalid(&path, "a non-negative integer", value)),
        None => Err(UsageError::new(&path, "missing")),
    }
}

fn optional_count(object: &Map<String, Value>, path: &str, field: &str) -> Result<u64, UsageError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(_) => required_count(object, path, field),
    }
}

/// A non-negative number of seconds, floored to an integer (a float is accepted: the API has
/// been seen sending fractional seconds). Flooring means runtime is never over-counted; the
/// cumulative snapshot makes the lost fraction reappear once it adds up to a whole second.
fn optional_seconds(value: Option<&Value>, path: &str) -> Result<Option<u64>, UsageError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if let Some(seconds) = value.as_u64() {
        return Ok(Some(seconds));
    }
    match value.as_f64() {
        // Below 2^64 (and not NaN or infinite) the floored value fits; the cast is then exact.
        Some(f) if (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(Some(f.floor() as u64)),
        _ => Err(invalid(path, "a non-negative number of seconds", value)),
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const SPAN: &str = r#"{"type":"span.model_request_end","id":"sevt_1","model_request_start_id":"sevt_0","is_error":false,"model_usage":{"input_tokens":3571,"output_tokens":727,"cache_creation_input_tokens":0,"cache_read_input_tokens":6656},"processed_at":"2026-05-01T12:00:04.000Z"}"#;

    fn span_tokens(input: u64, output: u64, cache_creation: u64, cache_read: u64) -> SpanTokens {
        SpanTokens {
            input,
            output,
            cache_creation,
            cache_read,
        }
    }

    fn err(name: &str, data: &str) -> UsageError {
        from_event(name, data.as_bytes()).unwrap_err()
    }

    #[test]
    fn usage_event_names() {
        for name in USAGE_EVENT_NAMES {
            assert!(is_usage_event(name));
        }
        for name in [
            "span.model_request_start",
            "agent.message",
            "message",
            "session.usage.x",
            "",
        ] {
            assert!(!is_usage_event(name), "{name}");
        }
    }

    #[test]
    fn model_request_span() {
        let observation = from_event("span.model_request_end", SPAN.as_bytes()).unwrap();
        assert_eq!(
            observation,
            Some(Observation::Span {
                event_id: "sevt_1".into(),
                kind: SpanKind::ModelRequest,
                tokens: span_tokens(3571, 727, 0, 6656),
                speed: None,
                is_error: false,
            })
        );
    }

    #[test]
    fn outcome_span_with_speed_error_and_unknown_fields() {
        let data = r#"{"type":"span.outcome_evaluation_end","id":"sevt_9","is_error":true,"speed":"fast","new_field":{"deep":[1,2,{"x":null}]},"usage":{"input_tokens":10,"output_tokens":2,"cache_creation_input_tokens":30,"cache_read_input_tokens":4,"future_tokens":7}}"#;
        assert_eq!(
            from_event("span.outcome_evaluation_end", data.as_bytes()).unwrap(),
            Some(Observation::Span {
                event_id: "sevt_9".into(),
                kind: SpanKind::OutcomeEvaluation,
                tokens: span_tokens(10, 2, 30, 4),
                speed: Some("fast".into()),
                is_error: true,
            })
        );
    }

    #[test]
    fn unnamed_frames_dispatch_on_type() {
        let observation = from_event("message", SPAN.as_bytes()).unwrap();
        assert!(matches!(
            observation,
            Some(Observation::Span {
                kind: SpanKind::ModelRequest,
                ..
            })
        ));
        assert_eq!(
            from_event("message", br#"{"type":"agent.message"}"#).unwrap(),
            None
        );
        assert_eq!(from_event("message", br#"{"no_type":1}"#).unwrap(), None);
        assert_eq!(from_event("agent.message", SPAN.as_bytes()).unwrap(), None);
    }

    #[test]
    fn span_fields_are_strict_and_named() {
        let cases = [
            (
                SPAN.replace("\"input_tokens\":3571,", ""),
                "model_usage.input_tokens",
                "missing",
            ),
            (
                SPAN.replace("3571", "-1"),
                "model_usage.input_tokens",
                "expected a non-negative integer, got -1",
            ),
            (
                SPAN.replace("727", "7.5"),
                "model_usage.output_tokens",
                "expected a non-negative integer, got 7.5",
            ),
            (
                SPAN.replace("6656", "\"6656\""),
                "model_usage.cache_read_input_tokens",
                "expected a non-negative integer, got \"6656\"",
            ),
            (
                SPAN.replace(
                    "\"cache_creation_input_tokens\":0",
                    "\"cache_creation_input_tokens\":null",
                ),
                "model_usage.cache_creation_input_tokens",
                "expected a non-negative integer, got null",
            ),
            (SPAN.replace("\"id\":\"sevt_1\",", ""), "id", "missing"),
            (
                SPAN.replace("\"sevt_1\"", "7"),
                "id",
                "expected a non-empty string, got 7",
            ),
            (
                SPAN.replace("\"model_usage\"", "\"other\""),
                "model_usage",
                "missing",
            ),
            (
                SPAN.replace("\"is_error\":false", "\"is_error\":\"no\""),
                "is_error",
                "expected a boolean, got \"no\"",
            ),
            (
                SPAN.replace("3571", "18446744073709551616"),
                "model_usage.input_tokens",
                "expected a non-negative integer, got 1.8446744073709552e+19",
            ),
        ];
        for (data, path, message) in cases {
            let error = err("span.model_request_end", &data);
            assert_eq!(
                (error.path.as_str(), error.message.as_str()),
                (path, message),
                "{data}"
            );
        }
        assert_eq!(
            err("span.model_request_end", "{\"id\":").path,
            "",
            "truncated JSON is a whole-body error"
        );
        assert_eq!(
            err("span.model_request_end", "[1]").to_string(),
            "usage error: event data is not a JSON object"
        );
        assert_eq!(
            err("span.model_request_end", &SPAN.replace("3571", "-1")).to_string(),
            "usage error at model_usage.input_tokens: expected a non-negative integer, got -1"
        );
    }

    #[test]
    fn big_span_is_fine() {
        let padding = "x".repeat(1 << 20);
        let data = SPAN.replace(
            "\"processed_at\"",
            &format!("\"blob\":\"{padding}\",\"processed_at\""),
        );
        assert!(from_event("span.model_request_end", data.as_bytes())
            .unwrap()
            .is_some());
    }

    const USAGE: &str = r#"{"input_tokens":100,"output_tokens":20,"cache_read_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":40,"ephemeral_1h_input_tokens":50},"active_seconds":12.9,"list_cost":{"amount":"1234","currency":"USD"},"server_tool_use":{"web_search_requests":3,"web_fetch_requests":1}}"#;

    fn full_snapshot() -> Snapshot {
        Snapshot {
            input: 100,
            output: 20,
            cache_read: 300,
            cache_write_5m: 40,
            cache_write_1h: 50,
            active_seconds: Some(12),
            web_search_requests: 3,
            web_fetch_requests: 1,
            list_cost_cents: Some(1234),
        }
    }

    #[test]
    fn session_usage_event() {
        let data =
            format!(r#"{{"type":"session.usage","id":"sevt_5","usage":{USAGE},"budget":null}}"#);
        assert_eq!(
            from_event("session.usage", data.as_bytes()).unwrap(),
            Some(Observation::Snapshot(full_snapshot()))
        );
        // The same through an unnamed frame, and with the counts at the top level.
        assert_eq!(
            from_event("message", data.as_bytes()).unwrap(),
            Some(Observation::Snapshot(full_snapshot()))
        );
        let flat = format!(r#"{{"type":"session.usage",{}"#, &USAGE[1..]);
        assert_eq!(
            from_event("session.usage", flat.as_bytes()).unwrap(),
            Some(Observation::Snapshot(full_snapshot()))
        );
    }

    #[test]
    fn minimal_snapshot_and_optional_parts() {
        let data = r#"{"usage":{"input_tokens":1,"output_tokens":2,"cache_read_input_tokens":3,"cache_creation":{"ephemeral_5m_input_tokens":4,"ephemeral_1h_input_tokens":5},"active_seconds":null,"list_cost":null,"server_tool_use":{}}}"#;
        assert_eq!(
            from_event("session.usage", data.as_bytes()).unwrap(),
            Some(Observation::Snapshot(Snapshot {
                input: 1,
                output: 2,
                cache_read: 3,
                cache_write_5m: 4,
                cache_write_1h: 5,
                ..Snapshot::default()
            }))
        );
        // A lump without a split is read as 5-minute writes.
        let lump = r#"{"usage":{"input_tokens":1,"output_tokens":2,"cache_read_input_tokens":3,"cache_creation_input_tokens":9,"active_seconds":7}}"#;
        let Some(Observation::Snapshot(snapshot)) =
            from_event("session.usage", lump.as_bytes()).unwrap()
        else {
            panic!("not a snapshot");
        };
        assert_eq!((snapshot.cache_write_5m, snapshot.cache_write_1h), (9, 0));
        assert_eq!(snapshot.active_seconds, Some(7));
    }

    #[test]
    fn snapshot_errors_name_the_field() {
        let cases = [
            (USAGE.replace("\"input_tokens\":100,", ""), "usage.input_tokens", "missing"),
            (USAGE.replace("\"ephemeral_1h_input_tokens\":50", "\"ephemeral_1h_input_tokens\":-50"), "usage.cache_creation.ephemeral_1h_input_tokens", "expected a non-negative integer, got -50"),
            (USAGE.replace("12.9", "-1"), "usage.active_seconds", "expected a non-negative number of seconds, got -1"),
            (USAGE.replace("12.9", "\"12\""), "usage.active_seconds", "expected a non-negative number of seconds, got \"12\""),
            (USAGE.replace("\"web_search_requests\":3", "\"web_search_requests\":3.5"), "usage.server_tool_use.web_search_requests", "expected a non-negative integer, got 3.5"),
            (USAGE.replace("\"cache_creation\":{\"ephemeral_5m_input_tokens\":40,\"ephemeral_1h_input_tokens\":50},", ""), "usage.cache_creation", "missing"),
            (USAGE.replace("\"cache_creation\":{\"ephemeral_5m_input_tokens\":40,\"ephemeral_1h_input_tokens\":50}", "\"cache_creation\":5"), "usage.cache_creation", "expected an object, got 5"),
        ];
        for (usage, path, message) in cases {
            let data = format!(r#"{{"usage":{usage}}}"#);
            let error = err("session.usage", &data);
            assert_eq!(
                (error.path.as_str(), error.message.as_str()),
                (path, message),
                "{usage}"
            );
        }
        assert_eq!(err("session.usage", "{}").path, "usage");
    }

    #[test]
    fn thread_models_of_one_thread_or_a_page() {
        let one = br#"{"id":"sthr_1","type":"session_thread","agent":{"type":"advisor","model":"claude-opus-5-5"}}"#;
        assert_eq!(
            thread_models(one),
            vec![("sthr_1".to_string(), "claude-opus-5-5".to_string())]
        );
        let page = br#"{"data":[
            {"id":"sthr_1","agent":{"type":"agent","id":"agent_1","model":{"id":"claude-sonnet-5-5","speed":"standard"}}},
            {"id":"sthr_2","agent":{"type":"inline","model":{"id":"claude-haiku-5-5"}}},
            {"id":"sthr_3","agent":{"type":"inline"}},
            {"id":"","agent":{"model":"x"}},
            7
        ],"next_page":null}"#;
        assert_eq!(
            thread_models(page),
            vec![
                ("sthr_1".to_string(), "claude-sonnet-5-5".to_string()),
                ("sthr_2".to_string(), "claude-haiku-5-5".to_string()),
            ]
        );
        assert!(thread_models(b"not json").is_empty());
    }

    #[test]
    fn list_cost_is_lenient() {
        for bad in [
            r#"{"amount":"12.34","currency":"USD"}"#,
            r#"{"amount":"1234","currency":"EUR"}"#,
            r#"{"amount":1234,"currency":"USD"}"#,
            r#""1234""#,
            r#"{"amount":"99999999999999999999999","currency":"USD"}"#,
        ] {
            let data = format!(
                r#"{{"usage":{}}}"#,
                USAGE.replace(r#"{"amount":"1234","currency":"USD"}"#, bad)
            );
            let Some(Observation::Snapshot(snapshot)) =
                from_event("session.usage", data.as_bytes()).unwrap()
            else {
                panic!("{bad}");
            };
            assert_eq!(snapshot.list_cost_cents, None, "{bad}");
            assert_eq!(snapshot.input, 100);
        }
    }

    #[test]
    fn session_body_with_agent_snapshot() {
        let body = format!(
            r#"{{"id":"sesn_1","type":"session","status":"idle","agent":{{"type":"agent","id":"agent_1","version":3,"model":{{"id":"claude-opus-4-6","speed":"standard"}},"system":"{}","tools":[]}},"usage":{},"stats":{{"active_seconds":99.5}},"metadata":{{}}}}"#,
            "s".repeat(100_000),
            USAGE.replace(",\"active_seconds\":12.9", "")
        );
        let facts = from_session_body(body.as_bytes()).unwrap();
        assert_eq!(
            facts,
            SessionFacts {
                session_id: "sesn_1".into(),
                agent_id: Some("agent_1".into()),
                model: Some("claude-opus-4-6".into()),
                status: Some("idle".into()),
                inference_geo: None,
                // usage has no active_seconds: stats.active_seconds (floored) is used.
                snapshot: Some(Snapshot {
                    active_seconds: Some(99),
                    ..full_snapshot()
                }),
                snapshot_error: None,
            }
        );
    }

    #[test]
    fn session_body_variants() {
        let facts = from_session_body(
            br#"{"id":"sesn_2","agent":{"id":"agent_2","model":"claude-haiku-4-5"}}"#,
        )
        .unwrap();
        assert_eq!(facts.model.as_deref(), Some("claude-haiku-4-5"));
        assert_eq!(facts.agent_id.as_deref(), Some("agent_2"));
        assert_eq!((facts.status, facts.snapshot), (None, None));

        let facts =
            from_session_body(br#"{"id":"sesn_3","agent":"agent_3","usage":null}"#).unwrap();
        assert_eq!(
            (facts.agent_id.as_deref(), facts.model),
            (Some("agent_3"), None)
        );

        // usage.active_seconds wins over stats.
        let body = format!(r#"{{"id":"sesn_4","usage":{USAGE},"stats":{{"active_seconds":500}}}}"#);
        let facts = from_session_body(body.as_bytes()).unwrap();
        assert_eq!(facts.snapshot.unwrap().active_seconds, Some(12));

        // A broken usage keeps the rest.
        let facts = from_session_body(
            br#"{"id":"sesn_5","agent":{"model":{"id":"m"}},"usage":{"input_tokens":-1}}"#,
        )
        .unwrap();
        assert_eq!(facts.model.as_deref(), Some("m"));
        assert_eq!(facts.snapshot, None);
        assert_eq!(facts.snapshot_error.unwrap().path, "usage.input_tokens");
    }

    #[test]
    fn session_body_errors() {
        assert_eq!(from_session_body(b"{}").unwrap_err().path, "id");
        assert_eq!(from_session_body(br#"{"id":""}"#).unwrap_err().path, "id");
        assert_eq!(from_session_body(b"[]").unwrap_err().path, "");
        assert_eq!(from_session_body(b"not json").unwrap_err().path, "");
    }
}
