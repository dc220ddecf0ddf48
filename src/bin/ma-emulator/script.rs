//! Deterministic scripted agent turns.
//!
//! Every `user.message` queues a turn; one worker thread per busy session runs the queued
//! turns in order, emitting events `--event-delay-ms` apart:
//!
//! 1. the second (processed) echo of the user event;
//! 2. `session.status_running`;
//! 3. `span.model_request_start`;
//! 4. when the text contains the word "tool": `agent.tool_use` (bash `echo hi`), the
//!    first `span.model_request_end`, `agent.tool_result`, and a second
//!    `span.model_request_start`;
//! 5. `agent.message` with `Echo: <text>` (preceded by `event_start`/`event_delta`
//!    previews on streams that asked for them);
//! 6. `span.model_request_end` with [`model_usage`];
//! 7. `session.usage` with the cumulative snapshot;
//! 8. `session.status_idle` with `stop_reason: end_turn`.
//!
//! `emulator:ticker N` instead emits N `agent.message` ticks one second apart (stamped with
//! the wall clock just before each is broadcast) inside one model request; `user.interrupt`
//! ends it early. Token counts depend only on the text, the turn index and the request index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::App;
use crate::store::{PendingTurn, Store, UsageTruth};
use crate::util::unix_millis;

/// `active_seconds` accounted per model request.
pub const ACTIVE_SECONDS_PER_REQUEST: u64 = 2;
/// Upper bound on `emulator:ticker N`.
pub const MAX_TICKS: u32 = 600;
const TICK_INTERVAL: Duration = Duration::from_secs(1);
const TICKER_PREFIX: &str = "emulator:ticker";

/// Token usage of one model request, as carried by `span.model_request_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl ModelUsage {
    pub fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        })
    }
}

/// Usage of request `request_index` (0-based) of turn `turn_index` (0-based) for `text`,
/// where `len` counts Unicode scalar values:
///
/// - input = 100 + 3·len + 1000·turn + 50·request
/// - output = 20 + len
/// - cache_creation = 50 for the session's very first request, else 0
/// - cache_read = 500·turn + 100·request
pub fn model_usage(text: &str, turn_index: u64, request_index: u64) -> ModelUsage {
    let len = u64::try_from(text.chars().count()).unwrap_or(u64::MAX / 8);
    ModelUsage {
        input_tokens: 100 + 3 * len + 1000 * turn_index + 50 * request_index,
        output_tokens: 20 + len,
        cache_creation_input_tokens: if turn_index == 0 && request_index == 0 {
            50
        } else {
            0
        },
        cache_read_input_tokens: 500 * turn_index + 100 * request_index,
    }
}

/// What a user message makes the agent do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnKind {
    /// Echo the text back, using a tool first when asked to.
    Reply { tool: bool },
    /// Emit this many one-second ticks.
    Ticker(u32),
}

/// Chooses the script for a user message.
pub fn classify(text: &str) -> TurnKind {
    match ticker_count(text) {
        Some(n) => TurnKind::Ticker(n),
        None => TurnKind::Reply {
            tool: mentions_tool(text),
        },
    }
}

/// `emulator:ticker N` → `Some(min(N, 600))`.
pub fn ticker_count(text: &str) -> Option<u32> {
    let rest = text.trim_start().strip_prefix(TICKER_PREFIX)?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let n: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(u32::try_from(n.min(u64::from(MAX_TICKS))).unwrap_or(MAX_TICKS))
}

/// Whether `text` contains the word "tool" (case-insensitive, whole word).
pub fn mentions_tool(text: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|word| word.eq_ignore_ascii_case("tool"))
}

/// Starts the session's worker thread. The caller has already set `worker_active`.
pub fn start_worker(app: &Arc<App>, session_id: &str) {
    let worker_app = Arc::clone(app);
    let sid = session_id.to_string();
    let spawned = thread::Builder::new()
        .name(format!("turns-{session_id}"))
        .spawn(move || run_worker(&worker_app, &sid));
    if let Err(e) = spawned {
        eprintln!("ma-emulator: cannot start turn worker for {session_id}: {e}");
        if let Some(s) = app.store().sessions.get_mut(session_id) {
            s.worker_active = false;
        }
    }
}

/// Runs queued turns until the queue is empty or the session is gone.
pub fn run_worker(app: &App, session_id: &str) {
    loop {
        let next = {
            let mut store = app.store();
            let Some(session) = store.sessions.get_mut(session_id) else {
                return;
            };
            match session.pending.pop_front() {
                Some(turn) => {
                    let index = session.turns;
                    session.turns += 1;
                    session.interrupt.store(false, Ordering::SeqCst);
                    (turn, index, Arc::clone(&session.interrupt))
                }
                None => {
                    session.worker_active = false;
                    return;
                }
            }
        };
        let (turn, index, interrupt) = next;
        let runner = Turn {
            app,
            session_id,
            interrupt,
            delay: app.cfg.event_delay,
        };
        if runner.run(&turn, index).is_err() {
            return;
        }
    }
}

/// The session disappeared mid-turn.
#[derive(Debug)]
struct Gone;

struct Turn<'a> {
    app: &'a App,
    session_id: &'a str,
    interrupt: Arc<AtomicBool>,
    delay: Duration,
}

impl Turn<'_> {
    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> Option<T>) -> Result<T, Gone> {
        f(&mut self.app.store()).ok_or(Gone)
    }

    fn emit(&self, event: Value) -> Result<Value, Gone> {
        self.with_store(|s| s.emit(self.session_id, event))
    }

    fn pause(&self) {
        if !self.delay.is_zero() {
            thread::sleep(self.delay);
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// Sleeps for `d` unless interrupted first; returns whether it was interrupted.
    fn sleep_unless_interrupted(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if self.interrupted() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            thread::sleep(left.min(Duration::from_millis(10)));
        }
    }

    fn run(&self, turn: &PendingTurn, index: u64) -> Result<(), Gone> {
        let sid = self.session_id;
        self.with_store(|s| s.mark_processed(sid, &turn.event_id))?;
        self.pause();
        self.with_store(|s| {
            s.set_status(sid, "running");
            s.emit(sid, json!({"type": "session.status_running"}))
        })?;
        match classify(&turn.text) {
            TurnKind::Ticker(n) => self.ticker(&turn.text, index, n)?,
            TurnKind::Reply { tool } => self.reply(&turn.text, index, tool)?,
        }
        self.pause();
        self.with_store(|s| {
            let usage = s.truth.get(sid).map(UsageTruth::snapshot)?;
            s.emit(sid, json!({"type": "session.usage", "usage": usage}))
        })?;
        self.pause();
        self.with_store(|s| {
            s.set_status(sid, "idle");
            s.emit(
                sid,
                json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}),
            )
        })?;
        Ok(())
    }

    fn reply(&self, text: &str, index: u64, tool: bool) -> Result<(), Gone> {
        let mut request = 0;
        let mut start_id = self.start_request()?;
        if tool && !self.interrupted() {
            self.pause();
            let tool_use = self.emit(json!({
                "type": "agent.tool_use",
                "name": "bash",
                "input": {"command": "echo hi"},
            }))?;
            let tool_use_id = tool_use.get("id").cloned().unwrap_or(Value::Null);
            self.end_request(&start_id, model_usage(text, index, request))?;
            self.pause();
            self.emit(json!({
                "type": "agent.tool_result",
                "tool_use_id": tool_use_id,
                "content": [{"type": "text", "text": "hi\n"}],
                "is_error": false,
            }))?;
            request += 1;
            start_id = self.start_request()?;
        }
        if !self.interrupted() {
            self.pause();
            self.agent_message(|| format!("Echo: {text}"))?;
        }
        self.end_request(&start_id, model_usage(text, index, request))
    }

    fn ticker(&self, text: &str, index: u64, ticks: u32) -> Result<(), Gone> {
        let start_id = self.start_request()?;
        for i in 1..=ticks {
            let wait = if i == 1 { self.delay } else { TICK_INTERVAL };
            if self.sleep_unless_interrupted(wait) {
                break;
            }
            self.agent_message(|| format!("tick {i} sent_at_ms {}", unix_millis()))?;
        }
        self.end_request(&start_id, model_usage(text, index, 0))
    }

    fn start_request(&self) -> Result<String, Gone> {
        self.pause();
        let event = self.emit(json!({"type": "span.model_request_start"}))?;
        Ok(event
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    fn end_request(&self, start_id: &str, usage: ModelUsage) -> Result<(), Gone> {
        self.pause();
        let sid = self.session_id;
        self.with_store(|s| {
            let event = s.emit(
                sid,
                json!({
                    "type": "span.model_request_end",
                    "model_request_start_id": start_id,
                    "is_error": false,
                    "model_usage": usage.to_json(),
                }),
            )?;
            let end_id = event.get("id").and_then(Value::as_str).unwrap_or_default();
            s.truth.entry(sid.to_string()).or_default().record(
                end_id,
                &usage,
                ACTIVE_SECONDS_PER_REQUEST,
            );
            Some(())
        })
    }

    /// Emits an `agent.message`; `text` is evaluated under the store lock, right before the
    /// event is broadcast. Streams that opted in get `event_start`/`event_delta` first.
    fn agent_message(&self, text: impl FnOnce() -> String) -> Result<(), Gone> {
        let sid = self.session_id;
        self.with_store(|s| {
            let id = s.id("sevt_");
            let text = text();
            let session = s.sessions.get_mut(sid)?;
            if session.broadcaster.wants_preview("agent.message") {
                let start = json!({
                    "type": "event_start",
                    "event": {"id": id, "type": "agent.message"},
                });
                let delta = json!({
                    "type": "event_delta",
                    "event_id": id,
                    "delta": {
                        "type": "content_delta",
                        "index": 0,
                        "content": {"type": "text", "text": text},
                    },
                });
                session.broadcaster.publish_preview(
                    "agent.message",
                    &[
                        ("event_start", start.to_string()),
                        ("event_delta", delta.to_string()),
                    ],
                );
            }
            s.emit(
                sid,
                json!({
                    "id": id,
                    "type": "agent.message",
                    "content": [{"type": "text", "text": text}],
                }),
            )
        })
        .map(drop)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn usage_formula_is_deterministic() {
        let a = model_usage("hello", 0, 0);
        assert_eq!(
            a,
            ModelUsage {
                input_tokens: 115,
                output_tokens: 25,
                cache_creation_input_tokens: 50,
                cache_read_input_tokens: 0,
            }
        );
        assert_eq!(a, model_usage("hello", 0, 0));
        let b = model_usage("héllo", 2, 1);
        assert_eq!(b.input_tokens, 100 + 15 + 2000 + 50);
        assert_eq!(b.output_tokens, 25);
        assert_eq!(b.cache_creation_input_tokens, 0);
        assert_eq!(b.cache_read_input_tokens, 1100);
        assert_eq!(model_usage("x", 0, 1).cache_creation_input_tokens, 0);
    }

    #[test]
    fn classification() {
        assert_eq!(classify("hi"), TurnKind::Reply { tool: false });
        assert_eq!(
            classify("please use a Tool."),
            TurnKind::Reply { tool: true }
        );
        assert_eq!(classify("toolbox tools"), TurnKind::Reply { tool: false });
        assert_eq!(classify("emulator:ticker 3"), TurnKind::Ticker(3));
        assert_eq!(
            classify("  emulator:ticker 5000 now"),
            TurnKind::Ticker(600)
        );
        assert_eq!(classify("emulator:ticker"), TurnKind::Reply { tool: false });
        assert_eq!(
            classify("emulator:tickerx 3"),
            TurnKind::Reply { tool: false }
        );
        assert_eq!(
            classify("emulator:ticker -1"),
            TurnKind::Reply { tool: false }
        );
    }
}
