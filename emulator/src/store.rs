//! The emulator's in-memory state: agents (with version history), environments, vaults and
//! credentials, sessions with their event logs, open streams and turn queues, and the
//! usage ground truth the scripted turns emitted.
//!
//! All of it lives behind one mutex in [`crate::api::App`]. Events are persisted and
//! broadcast while that lock is held, so every stream and the history agree on order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::script::ModelUsage;
use crate::sse::Broadcaster;
use crate::util::{now_rfc3339, IdGen};

/// A stored resource whose JSON representation is kept as is.
#[derive(Debug, Clone)]
pub struct Rec {
    pub seq: u64,
    pub value: Value,
}

/// An agent and every version of it; the last entry is the current version.
#[derive(Debug, Clone)]
pub struct AgentRec {
    pub seq: u64,
    pub versions: Vec<Value>,
}

impl AgentRec {
    pub fn current(&self) -> &Value {
        // `versions` is never empty: created with one entry and only ever pushed to.
        self.versions.last().unwrap_or(&Value::Null)
    }
}

/// A vault credential (secrets already removed).
#[derive(Debug, Clone)]
pub struct CredRec {
    pub seq: u64,
    pub vault_id: String,
    pub value: Value,
}

/// A `user.message` waiting for its turn.
#[derive(Debug, Clone)]
pub struct PendingTurn {
    pub event_id: String,
    pub text: String,
}

/// The session's single (primary) thread.
#[derive(Debug, Clone)]
pub struct ThreadRec {
    pub id: String,
    pub created_at: String,
    pub updated_at: String,
    pub archived_at: Option<String>,
}

/// A session and everything hanging off it.
pub struct SessionRec {
    pub seq: u64,
    pub id: String,
    pub title: Value,
    pub metadata: Value,
    pub budget: Value,
    /// Snapshot of the agent at creation (with overrides applied).
    pub agent: Value,
    pub agent_id: String,
    pub environment_id: String,
    pub vault_ids: Vec<String>,
    pub status: &'static str,
    pub created_at: String,
    pub updated_at: String,
    pub archived_at: Option<String>,
    pub created: Instant,
    pub thread: ThreadRec,
    pub resources: Vec<Rec>,
    pub events: Vec<Rec>,
    pub broadcaster: Broadcaster,
    pub pending: VecDeque<PendingTurn>,
    pub worker_active: bool,
    /// Turns started so far; the next turn's index.
    pub turns: u64,
    pub interrupt: Arc<AtomicBool>,
}

/// Cumulative usage the emulator emitted for one session (survives session deletion).
#[derive(Debug, Clone, Default)]
pub struct UsageTruth {
    pub session_id: String,
    pub model: String,
    pub model_requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub ephemeral_5m_input_tokens: u64,
    pub ephemeral_1h_input_tokens: u64,
    pub active_seconds: u64,
    pub span_event_ids: Vec<String>,
    /// The usage of each span, in the order of `span_event_ids`.
    pub span_usage: Vec<ModelUsage>,
    /// The model each span was billed at (a thread's, when not the session's).
    pub span_models: Vec<String>,
    /// Exact list cost of the tokens so far, in 10⁻⁶ µ$ (runtime is added when reported).
    pub list_pico: u128,
    /// Added to the computed list cost (session metadata `emulator_list_cost_delta_cents`):
    /// how a test makes Anthropic's list cost differ from any price table, either way.
    pub list_cost_delta_cents: i64,
}

/// Runtime list price, µ$ per session-hour of `active_seconds`.
pub const RUNTIME_MICROS_PER_HOUR: u128 = 80_000;

/// The emulator's own list prices, µ$ per MTok: input, 5m write, 1h write, cache read, output
/// (the reference's 2026-12 table). `None` for models it does not price: their list cost is
/// only the session's `emulator_list_cost_delta_cents`.
pub fn list_rates(model: &str) -> Option<[u128; 5]> {
    let m = |p: &str| model.starts_with(p);
    Some(if m("claude-opus-5-5") {
        [4_000_000, 5_000_000, 8_000_000, 200_000, 20_000_000]
    } else if m("claude-sonnet-5-5") || model == "claude-sonnet-5" {
        [2_000_000, 2_500_000, 4_000_000, 200_000, 10_000_000]
    } else if m("claude-haiku-5-5") {
        [100_000, 125_000, 200_000, 10_000, 500_000]
    } else if m("claude-fable-5-2") {
        [8_000_000, 10_000_000, 16_000_000, 200_000, 40_000_000]
    } else if m("claude-opus-4-") || model == "claude-opus-5" {
        [5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000]
    } else if m("claude-sonnet-4-") {
        [3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000]
    } else if m("claude-haiku-4-5") {
        [1_000_000, 1_250_000, 2_000_000, 100_000, 5_000_000]
    } else {
        return None;
    })
}

impl UsageTruth {
    /// Adds one model request (all cache writes are counted as 5-minute writes), billed in
    /// the list cost at `model` (the session's, or a thread's on another model): fast spans
    /// cost ×2, Haiku 5.5 prompts over 100,000 tokens ×5.
    pub fn record_on(
        &mut self,
        span_end_id: &str,
        usage: &ModelUsage,
        active_seconds: u64,
        model: &str,
    ) {
        if let Some([input, w5m, _, read, output]) = list_rates(model) {
            let prompt = usage.input_tokens
                + usage.cache_read_input_tokens
                + usage.cache_creation_input_tokens;
            let mut times = if usage.fast { 2 } else { 1 };
            if model.starts_with("claude-haiku-5-5") && prompt > 100_000 {
                times *= 5;
            }
            let t = |n: u64, rate: u128| u128::from(n) * rate;
            self.list_pico += times
                * (t(usage.input_tokens, input)
                    + t(usage.cache_creation_input_tokens, w5m)
                    + t(usage.cache_read_input_tokens, read)
                    + t(usage.output_tokens, output));
        }
        self.span_models.push(model.to_string());
        self.model_requests += 1;
        self.input_tokens += usage.input_tokens;
        self.output_tokens += usage.output_tokens;
        self.cache_creation_input_tokens += usage.cache_creation_input_tokens;
        self.ephemeral_5m_input_tokens += usage.cache_creation_input_tokens;
        self.cache_read_input_tokens += usage.cache_read_input_tokens;
        self.active_seconds += active_seconds;
        self.span_event_ids.push(span_end_id.to_string());
        self.span_usage.push(*usage);
    }

    /// Anthropic's list cost so far, in cents: the exact cost of the tokens (at each span's
    /// model, speed and band) plus runtime, rounded half up, plus the test's delta once a
    /// model request ran (never below zero).
    pub fn list_cost_cents(&self) -> u64 {
        let runtime = u128::from(self.active_seconds) * RUNTIME_MICROS_PER_HOUR * 1_000_000 / 3_600;
        let pico = self.list_pico + runtime;
        let cents = i128::try_from((pico + 5_000_000_000) / 10_000_000_000).unwrap_or(i128::MAX);
        // Nothing ran yet: nothing to differ on.
        let delta = if self.model_requests == 0 {
            0
        } else {
            i128::from(self.list_cost_delta_cents)
        };
        u64::try_from((cents + delta).max(0)).unwrap_or(0)
    }

    /// The cumulative snapshot as it appears in `session.usage` and on the session.
    pub fn snapshot(&self) -> Value {
        json!({
            "list_cost": {"amount": self.list_cost_cents().to_string(), "currency": "USD"},
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.ephemeral_5m_input_tokens,
                "ephemeral_1h_input_tokens": self.ephemeral_1h_input_tokens,
            },
            "active_seconds": self.active_seconds,
        })
    }

    /// The `/_emulator/usage/{id}` document.
    pub fn to_json(&self) -> Value {
        json!({
            "session_id": self.session_id,
            "model": self.model,
            "model_requests": self.model_requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.ephemeral_5m_input_tokens,
                "ephemeral_1h_input_tokens": self.ephemeral_1h_input_tokens,
            },
            "active_seconds": self.active_seconds,
            "list_cost_cents": self.list_cost_cents(),
            "list_cost_delta_cents": self.list_cost_delta_cents,
            "span_event_ids": self.span_event_ids,
            "spans": self
                .span_event_ids
                .iter()
                .zip(&self.span_usage)
                .zip(&self.span_models)
                .map(|((id, usage), model)| {
                    let mut span = usage.to_json();
                    span["id"] = json!(id);
                    span["model"] = json!(model);
                    span
                })
                .collect::<Vec<_>>(),
        })
    }
}

/// Everything the emulator knows.
pub struct Store {
    ids: Arc<IdGen>,
    seq: u64,
    pub agents: HashMap<String, AgentRec>,
    pub environments: HashMap<String, Rec>,
    pub vaults: HashMap<String, Rec>,
    pub credentials: HashMap<String, CredRec>,
    pub sessions: HashMap<String, SessionRec>,
    pub truth: HashMap<String, UsageTruth>,
}

impl Store {
    pub fn new(ids: Arc<IdGen>) -> Self {
        Self {
            ids,
            seq: 0,
            agents: HashMap::new(),
            environments: HashMap::new(),
            vaults: HashMap::new(),
            credentials: HashMap::new(),
            sessions: HashMap::new(),
            truth: HashMap::new(),
        }
    }

    /// A fresh id with `prefix`.
    pub fn id(&self, prefix: &str) -> String {
        self.ids.next(prefix)
    }

    /// The next creation sequence number (orders every listing).
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Persists `event` in the session's history and broadcasts it to its streams.
    ///
    /// Fills in `id` (`sevt_…`), `created_at` and `processed_at` when absent (an explicit
    /// `"processed_at": null` is kept). Returns the stored event, or `None` if the session
    /// no longer exists.
    pub fn emit(&mut self, session_id: &str, mut event: Value) -> Option<Value> {
        if !self.sessions.contains_key(session_id) {
            return None;
        }
        let seq = self.next_seq();
        if let Value::Object(fields) = &mut event {
            if !fields.contains_key("id") {
                fields.insert("id".into(), Value::String(self.ids.next("sevt_")));
            }
            let now = now_rfc3339();
            fields
                .entry("created_at")
                .or_insert_with(|| Value::String(now.clone()));
            fields
                .entry("processed_at")
                .or_insert_with(|| Value::String(now));
        }
        let session = self.sessions.get_mut(session_id)?;
        session.events.push(Rec {
            seq,
            value: event.clone(),
        });
        publish(&mut session.broadcaster, &event);
        Some(event)
    }

    /// Persists `stored` (already carrying `id`, `created_at` and `processed_at`) in the
    /// session's history but broadcasts the preformatted SSE `frame` instead of `stored`'s
    /// serialization. Used by `emulator:large`, whose streamed events are far bigger than
    /// what the history keeps. Returns `None` if the session no longer exists.
    pub fn emit_with_frame(
        &mut self,
        session_id: &str,
        stored: Value,
        frame: &Arc<String>,
    ) -> Option<()> {
        if !self.sessions.contains_key(session_id) {
            return None;
        }
        let seq = self.next_seq();
        let session = self.sessions.get_mut(session_id)?;
        session.events.push(Rec { seq, value: stored });
        session.broadcaster.publish_frame(frame);
        Some(())
    }

    /// Marks a queued user event processed and broadcasts its second echo.
    pub fn mark_processed(&mut self, session_id: &str, event_id: &str) -> Option<Value> {
        let session = self.sessions.get_mut(session_id)?;
        let stored = session
            .events
            .iter_mut()
            .find(|e| e.value.get("id").and_then(Value::as_str) == Some(event_id))?;
        if let Value::Object(fields) = &mut stored.value {
            fields.insert("processed_at".into(), Value::String(now_rfc3339()));
        }
        let event = stored.value.clone();
        publish(&mut session.broadcaster, &event);
        Some(event)
    }

    /// Sets the session status and bumps `updated_at`.
    pub fn set_status(&mut self, session_id: &str, status: &'static str) -> bool {
        match self.sessions.get_mut(session_id) {
            Some(s) => {
                s.status = status;
                s.updated_at = now_rfc3339();
                true
            }
            None => false,
        }
    }

    /// The session object as the API returns it.
    pub fn session_json(&self, session: &SessionRec) -> Value {
        let truth = self.truth.get(&session.id);
        let usage = truth.map_or_else(|| UsageTruth::default().snapshot(), UsageTruth::snapshot);
        let active = truth.map_or(0, |t| t.active_seconds);
        json!({
            "id": session.id,
            "type": "session",
            "status": session.status,
            "title": session.title,
            "metadata": session.metadata,
            "agent": session.agent,
            "environment_id": session.environment_id,
            "vault_ids": session.vault_ids,
            "resources": session.resources.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
            "budget": session.budget,
            "deployment_id": Value::Null,
            "outcome_evaluations": [],
            "usage": usage,
            "stats": {
                "active_seconds": active,
                "duration_seconds": session.created.elapsed().as_secs_f64(),
            },
            "created_at": session.created_at,
            "updated_at": session.updated_at,
            "archived_at": session.archived_at,
        })
    }

    /// The primary thread object of a session.
    pub fn thread_json(&self, session: &SessionRec) -> Value {
        let truth = self.truth.get(&session.id);
        let usage = truth.map_or_else(|| UsageTruth::default().snapshot(), UsageTruth::snapshot);
        let active = truth.map_or(0, |t| t.active_seconds);
        json!({
            "id": session.thread.id,
            "type": "session_thread",
            "session_id": session.id,
            "parent_thread_id": Value::Null,
            "agent": session.agent,
            "status": session.status,
            "stats": { "active_seconds": active },
            "usage": usage,
            "created_at": session.thread.created_at,
            "updated_at": session.thread.updated_at,
            "archived_at": session.thread.archived_at,
        })
    }
}

fn publish(broadcaster: &mut Broadcaster, event: &Value) {
    let event_type = event
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let json = serde_json::to_string(event).unwrap_or_default();
    broadcaster.publish(event_type, &json);
}

/// Keys whose values are secrets: stripped from anything stored or echoed.
const SECRET_KEYS: &[&str] = &[
    "access_token",
    "refresh_token",
    "token",
    "secret_value",
    "client_secret",
    "password",
    "api_key",
    "secret",
    "authorization_token",
    "private_key",
];

/// Removes secret-bearing keys at any depth.
pub fn strip_secrets(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            fields.retain(|k, _| !SECRET_KEYS.contains(&k.as_str()));
            fields.values_mut().for_each(strip_secrets);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_secrets),
        _ => {}
    }
}

/// Applies a metadata patch: string values upsert, `null` deletes.
pub fn merge_metadata(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(existing) = target {
        for (k, v) in patch {
            if v.is_null() {
                existing.remove(k);
            } else {
                existing.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_stripped_at_any_depth() {
        let mut v = json!({
            "type": "mcp_oauth",
            "access_token": "s1",
            "refresh": {"refresh_token": "s2", "client_id": "c", "token_endpoint_auth": {"client_secret": "s3"}},
            "list": [{"token": "s4", "keep": 1}],
        });
        strip_secrets(&mut v);
        let text = v.to_string();
        for s in ["s1", "s2", "s3", "s4"] {
            assert!(!text.contains(s), "{text}");
        }
        assert_eq!(v["refresh"]["client_id"], "c");
        assert_eq!(v["list"][0]["keep"], 1);
    }

    #[test]
    fn metadata_merge_upserts_and_deletes() {
        let mut m = json!({"a": "1", "b": "2"});
        let patch = json!({"a": null, "c": "3"});
        merge_metadata(&mut m, patch.as_object().unwrap());
        assert_eq!(m, json!({"b": "2", "c": "3"}));
    }
}
