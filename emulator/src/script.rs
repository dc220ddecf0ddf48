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
//! 7. `session.usage` with the cumulative snapshot, including Anthropic's `list_cost` (see
//!    `UsageTruth::list_cost_cents`; [`TurnOptions`] for fast mode, long prompts and threads
//!    on other models);
//! 8. `session.status_idle` with `stop_reason: end_turn`.
//!
//! `emulator:ticker N` instead emits N `agent.message` ticks one second apart (stamped with
//! the wall clock just before each is broadcast) inside one model request; `user.interrupt`
//! ends it early. Token counts depend only on the text, the turn index and the request index.
//!
//! `emulator:large N KB` (N ≤ 10000, KB ≤ 16384, larger values are clamped) is a bulk-output
//! stress turn: inside one model request it emits N `agent.message` events whose text is
//! exactly KB KiB of `"lorem ipsum "` filler, back to back (the usual `--event-delay-ms`
//! only before the first and after the last), then the usual `span.model_request_end`
//! (usage by [`model_usage`] of the user text, recorded in the ground truth like any turn),
//! `session.usage` and `session.status_idle`. To keep the emulator's memory bounded:
//!
//! - the filler is built once per turn and each SSE frame is formatted once per event (one
//!   allocation of ~KB KiB, shared by every stream), one event at a time;
//! - the event *history* keeps only the first [`LARGE_HISTORY_BYTES`] of each such text
//!   followed by a `[ma-emulator: …]` note (same id and timestamps as the streamed event),
//!   so `GET …/events` returns truncated texts;
//! - before each event the turn blocks (outside the store lock) until every open stream has
//!   at most [`LARGE_BACKLOG_BYTES`] queued and unwritten (see [`crate::sse`]): a slow
//!   reader slows the turn down instead of piling frames up; one whose backlog has not
//!   shrunk for [`LARGE_STALL_TIMEOUT`] is detached (no more events; its response ends
//!   after what was already queued); `user.interrupt` or deleting the session ends the wait
//!   and the turn early. Peak memory is thus about 3·KB KiB (filler, the frame being built,
//!   one queued frame) plus up to 8 MiB per open stream, plus ~3 KiB of history per
//!   event (~30 MB at N = 10000);
//! - streams that asked for `agent.message` previews get an `event_start` (no deltas,
//!   which the API documents as best-effort) before each large event.
//!
//! `emulator:fault KIND [ARG]` is a fault-injection turn for gateway tests. It first runs
//! one ordinary model request, delivered in full (`span.model_request_start`,
//! `agent.message` "Echo: …", `span.model_request_end`, recorded in the ground truth), so
//! usage seen before the fault is known exactly; then, on every stream open on the session:
//!
//! - `reset`: the connection is dropped mid-body, without the chunked terminator, as an
//!   upstream reset does. The rest of the turn (`session.usage`, `session.status_idle`) goes
//!   to the history only;
//! - `hang [S]` (S ≤ 600, default 30): nothing more is written, not even heartbeats, for S
//!   seconds; then the connection is dropped as by `reset`. The rest of the turn goes to the
//!   history only;
//! - `malformed`: [`MALFORMED_SSE`] is written as is: lines without a colon, names without
//!   data, data without names, data that is not JSON or not an object, usage fields of the
//!   wrong type, sign or presence, `id:`/`retry:` fields, CRLF and bare-CR line ends,
//!   multi-line data, comments. None of it is an event of the API, none carries valid
//!   usage, none is kept in the history;
//! - `badutf8`: [`bad_utf8_frames`]: an `agent.message` and an unnamed frame whose data hold
//!   invalid UTF-8 (lone continuation bytes, overlong encodings, surrogates, 0xFF), and an
//!   event *name* with invalid UTF-8. Not kept in the history;
//! - `hugeline [M]` (M MiB, ≤ 64, default 8): a comment line of M MiB, an `agent.message`
//!   whose one data line is M MiB (valid JSON; the history keeps it truncated like
//!   `emulator:large`), then a second model request whose `span.model_request_end` carries
//!   an M MiB `padding` string beside valid `model_usage` (recorded in the ground truth: a
//!   gateway that cannot hold so large an event must still reach the truth from the
//!   `session.usage` snapshot that follows). Each frame waits for the streams' backlogs
//!   like `emulator:large`;
//! - `truncated`: a second model request whose `span.model_request_end` frame is cut in the
//!   middle of its JSON (`{…,"model_usage":{"` and five more characters, then the blank
//!   line). Its usage
//!   is recorded in the ground truth and the history keeps the complete event, so only
//!   the `session.usage` snapshot that follows lets a gateway reach the truth.
//!
//! Then `session.usage` and `session.status_idle` as in every turn.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::App;
use crate::sse;
use crate::store::{PendingTurn, Store, UsageTruth};
use crate::util::{now_rfc3339, unix_millis};

/// `active_seconds` accounted per model request.
pub const ACTIVE_SECONDS_PER_REQUEST: u64 = 2;
/// Upper bound on `emulator:ticker N`.
pub const MAX_TICKS: u32 = 600;
const TICK_INTERVAL: Duration = Duration::from_secs(1);
const TICKER_PREFIX: &str = "emulator:ticker";
const LARGE_PREFIX: &str = "emulator:large";
/// Upper bound on N of `emulator:large N KB`.
pub const MAX_LARGE_EVENTS: u32 = 10_000;
/// Upper bound on KB of `emulator:large N KB`.
pub const MAX_LARGE_KIB: u32 = 16_384;
/// How much of each large text the event history keeps.
pub const LARGE_HISTORY_BYTES: usize = 1024;
/// A stream with more than this queued makes the large turn wait before its next event.
pub const LARGE_BACKLOG_BYTES: usize = 8 << 20;
/// A stream whose backlog stays over [`LARGE_BACKLOG_BYTES`] without shrinking this long is
/// detached from the session (its response ends after what was already queued).
pub const LARGE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
const FILLER: &str = "lorem ipsum ";
const FAULT_PREFIX: &str = "emulator:fault";
/// Upper bound on S of `emulator:fault hang S`.
pub const MAX_HANG_SECS: u64 = 600;
const DEFAULT_HANG_SECS: u64 = 30;
/// Upper bound on M of `emulator:fault hugeline M`.
pub const MAX_HUGELINE_MIB: u32 = 64;
const DEFAULT_HUGELINE_MIB: u32 = 8;

/// What `emulator:fault malformed` writes: bytes that are not events of the API. None
/// carries valid usage, so a correct gateway meters none of it.
pub const MALFORMED_SSE: &[u8] = b"this line has no colon\n\n\
event: agent.message\n\n\
data: {\"type\":\"agent.message\",\"content\":[]}\n\n\
event: agent.message\ndata: this is not json {\n\n\
event: span.model_request_end\ndata: [1,2,3]\n\n\
event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"id\":\"sevt_malformed1\",\"model_usage\":{\"input_tokens\":\"many\",\"output_tokens\":1,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0}}\n\n\
event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"id\":\"sevt_malformed2\",\"model_usage\":{\"input_tokens\":-5,\"output_tokens\":1,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0}}\n\n\
event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"id\":\"sevt_malformed3\",\"model_usage\":{\"input_tokens\":1.5,\"output_tokens\":1,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0}}\n\n\
event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"id\":\"sevt_malformed4\",\"model_usage\":{\"input_tokens\":7}}\n\n\
event: session.usage\ndata: {\"type\":\"session.usage\",\"usage\":\"lots\"}\n\n\
id: 7\nretry: 1000\nevent: agent.message\r\ndata: {\"type\":\"agent.message\",\"content\":[]}\r\n\r\n\
event: agent.message\rdata: {\"type\":\"agent.message\",\"content\":[]}\r\r\
event: agent.message\ndata: {\"type\":\ndata: \"agent.message\",\"content\":[]}\n\n\
: a comment line\n\
event:\ndata:\n\n\
event: \x00nul.in.name\ndata: {}\n\n\
\n\n\n";

/// Stands for the text while a large frame's JSON is serialized (cannot occur elsewhere in
/// it: ids are base62, timestamps digits and punctuation).
const TEXT_PLACEHOLDER: &str = "@@ma-emulator-large-text@@";

/// Token usage of one model request, as carried by `span.model_request_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Ran in fast mode: `speed: "fast"` (otherwise no `speed`, as without the beta).
    pub fast: bool,
}

impl ModelUsage {
    pub fn to_json(self) -> Value {
        let mut usage = json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        });
        if self.fast {
            usage["speed"] = json!("fast");
        }
        usage
    }
}

/// Per-turn billing options, words anywhere in the user text (the turn is otherwise
/// ordinary):
///
/// - `emulator:fast`: every model request of the turn runs in fast mode
///   (`model_usage.speed: "fast"`, list cost ×2);
/// - `emulator:prompt=N`: every model request of the turn has N input tokens (e.g. past
///   Haiku 5.5's 100,000-token band, list cost ×5);
/// - `emulator:thread-model=MODEL`: the turn runs on a thread of another model (an advisor
///   or subagent): its spans are billed at MODEL in the list cost. Spans carry no model
///   name either way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnOptions {
    pub fast: bool,
    pub prompt_tokens: Option<u64>,
    pub thread_model: Option<String>,
}

impl TurnOptions {
    pub fn parse(text: &str) -> TurnOptions {
        let mut opts = TurnOptions::default();
        for word in text.split_whitespace() {
            if word == "emulator:fast" {
                opts.fast = true;
            } else if let Some(n) = word.strip_prefix("emulator:prompt=") {
                opts.prompt_tokens = n.parse().ok();
            } else if let Some(model) = word.strip_prefix("emulator:thread-model=") {
                opts.thread_model = Some(model.to_string()).filter(|m| !m.is_empty());
            }
        }
        opts
    }

    fn apply(&self, mut usage: ModelUsage) -> ModelUsage {
        usage.fast |= self.fast;
        if let Some(n) = self.prompt_tokens {
            usage.input_tokens = n;
        }
        usage
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
        fast: false,
    }
}

/// Which fault an `emulator:fault` turn injects after its first model request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTurn {
    Reset,
    /// Silence for this many seconds, then a reset.
    Hang(u64),
    Malformed,
    BadUtf8,
    /// Lines of this many MiB.
    HugeLine(u32),
    Truncated,
}

/// `emulator:fault KIND [ARG]` → the fault (unknown kinds: `None`, an ordinary reply).
pub fn fault_turn(text: &str) -> Option<FaultTurn> {
    let rest = text.trim_start().strip_prefix(FAULT_PREFIX)?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut words = rest.split_whitespace();
    let kind = words.next()?;
    let arg = words.next().and_then(|w| w.parse::<u64>().ok());
    Some(match kind {
        "reset" => FaultTurn::Reset,
        "hang" => FaultTurn::Hang(arg.unwrap_or(DEFAULT_HANG_SECS).min(MAX_HANG_SECS)),
        "malformed" => FaultTurn::Malformed,
        "badutf8" => FaultTurn::BadUtf8,
        "hugeline" => {
            FaultTurn::HugeLine(arg.map_or(DEFAULT_HUGELINE_MIB, |m| clamp(m, MAX_HUGELINE_MIB)))
        }
        "truncated" => FaultTurn::Truncated,
        _ => return None,
    })
}

/// The frames of `emulator:fault badutf8`: invalid UTF-8 in data and in an event name.
pub fn bad_utf8_frames() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"event: agent.message\ndata: {\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"");
    // Lone continuation byte, overlong '/', a UTF-16 surrogate, 0xFF, a truncated 3-byte
    // sequence.
    out.extend_from_slice(b"\x80 \xc0\xaf \xed\xa0\x80 \xff \xe2\x82");
    out.extend_from_slice(b"\"}]}\n\n");
    out.extend_from_slice(
        b"data: {\"type\":\"span.model_request_end\",\"id\":\"sevt_\xff\xfe\"}\n\n",
    );
    out.extend_from_slice(b"event: span.model_request_end\xff\xfe\ndata: {\"x\":\"\xc3\"}\n\n");
    out
}

/// What a user message makes the agent do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnKind {
    /// Echo the text back, using a tool first when asked to.
    Reply { tool: bool },
    /// Emit this many one-second ticks.
    Ticker(u32),
    /// Emit `events` messages of `kib` KiB each, back to back.
    Large { events: u32, kib: u32 },
    /// One ordinary model request, then a fault on the streams.
    Fault(FaultTurn),
    /// `emulator:events-2026-12`: an ordinary reply, then one event of every type new in the
    /// 2026-12 union ([`EVENTS_2026_12`]), and an idle with `stop_reason: refusal`.
    Events2026,
}

const EVENTS_PREFIX: &str = "emulator:events-2026-12";

/// What `emulator:events-2026-12` emits after its reply (ids and timestamps are added).
pub fn events_2026_12() -> Vec<Value> {
    vec![
        json!({"type": "workflow_run.created", "workflow_run_id": "wfrun_1", "name": "review",
               "description": "two phases", "phases": [{"id": "wfph_1", "name": "plan", "description": null}]}),
        json!({"type": "workflow_run.status_running", "workflow_run_id": "wfrun_1"}),
        json!({"type": "workflow_run.phase_started", "workflow_run_id": "wfrun_1", "workflow_run_phase_id": "wfph_1"}),
        json!({"type": "span.outcome_evaluation_ongoing", "outcome_evaluation_start_id": "sevt_x", "iteration": 1}),
        json!({"type": "workflow_run.phase_ended", "workflow_run_id": "wfrun_1", "phase_started_id": "sevt_y",
               "workflow_run_phase_id": "wfph_1"}),
        json!({"type": "workflow_run.status_idle", "workflow_run_id": "wfrun_1"}),
        json!({"type": "workflow_run.error", "workflow_run_id": null,
               "error": {"type": "thread_limit_error", "message": "too many threads"}}),
        json!({"type": "workflow_run.status_ended", "workflow_run_id": "wfrun_1", "result": {"type": "error"}}),
        json!({"type": "system.message", "content": [{"type": "text", "text": "note from the system"}]}),
        json!({"type": "session.thread_status_rescheduled", "session_thread_id": "sthr_x"}),
        json!({"type": "session.status_rescheduled"}),
        json!({"type": "session.error", "error": {"type": "billing_error", "message": "card declined",
               "retry_status": {"type": "terminal"}}}),
    ]
}

/// Chooses the script for a user message.
pub fn classify(text: &str) -> TurnKind {
    if let Some(n) = ticker_count(text) {
        return TurnKind::Ticker(n);
    }
    if let Some((events, kib)) = large_args(text) {
        return TurnKind::Large { events, kib };
    }
    if let Some(fault) = fault_turn(text) {
        return TurnKind::Fault(fault);
    }
    if text.split_whitespace().any(|w| w == EVENTS_PREFIX) {
        return TurnKind::Events2026;
    }
    TurnKind::Reply {
        tool: mentions_tool(text),
    }
}

/// The first `K` whitespace-separated non-negative integers after `prefix` (which must be
/// followed by whitespace); anything after them is ignored.
fn command_args<const K: usize>(text: &str, prefix: &str) -> Option<[u64; K]> {
    let rest = text.trim_start().strip_prefix(prefix)?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut words = rest.split_whitespace();
    let mut args = [0; K];
    for arg in &mut args {
        *arg = words.next()?.parse().ok()?;
    }
    Some(args)
}

fn clamp(n: u64, max: u32) -> u32 {
    u32::try_from(n.min(u64::from(max))).unwrap_or(max)
}

/// `emulator:ticker N` → `Some(min(N, 600))`.
pub fn ticker_count(text: &str) -> Option<u32> {
    let [n] = command_args(text, TICKER_PREFIX)?;
    Some(clamp(n, MAX_TICKS))
}

/// `emulator:large N KB` → `Some((min(N, 10000), min(KB, 16384)))`.
pub fn large_args(text: &str) -> Option<(u32, u32)> {
    let [n, kib] = command_args(text, LARGE_PREFIX)?;
    Some((clamp(n, MAX_LARGE_EVENTS), clamp(kib, MAX_LARGE_KIB)))
}

/// Exactly `bytes` bytes of repeated `"lorem ipsum "` (ASCII, so JSON-safe as is).
pub fn filler(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + FILLER.len());
    while text.len() < bytes {
        text.push_str(FILLER);
    }
    text.truncate(bytes);
    text
}

/// What the history keeps of a large `text`: all of it up to [`LARGE_HISTORY_BYTES`], else
/// that many bytes and a note giving the streamed size.
pub fn history_text(text: &str) -> String {
    if text.len() <= LARGE_HISTORY_BYTES {
        return text.to_string();
    }
    let mut cut = LARGE_HISTORY_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}... [ma-emulator: history keeps the first {cut} of the {} bytes streamed]",
        &text[..cut],
        text.len()
    )
}

/// The SSE frame of a large `agent.message`, formatted in one allocation. `text` is
/// spliced into the JSON verbatim, so it must need no escaping (see [`filler`]).
pub fn large_frame(id: &str, created_at: &str, text: &str) -> String {
    let event = |text: &str| {
        json!({
            "id": id,
            "type": "agent.message",
            "content": [{"type": "text", "text": text}],
            "created_at": created_at,
            "processed_at": created_at,
        })
        .to_string()
    };
    let skeleton = event(TEXT_PLACEHOLDER);
    let Some((head, tail)) = skeleton.split_once(TEXT_PLACEHOLDER) else {
        return sse::format_frame("agent.message", &event(text));
    };
    const NAME: &str = "event: agent.message\ndata: ";
    let mut frame = String::with_capacity(NAME.len() + head.len() + text.len() + tail.len() + 2);
    frame.push_str(NAME);
    frame.push_str(head);
    frame.push_str(text);
    frame.push_str(tail);
    frame.push_str("\n\n");
    frame
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
            opts: TurnOptions::parse(&turn.text),
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
    opts: TurnOptions,
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
        let kind = classify(&turn.text);
        match kind {
            TurnKind::Events2026 => {
                self.reply(&turn.text, index, false)?;
                for event in events_2026_12() {
                    self.pause();
                    self.emit(event)?;
                }
            }
            TurnKind::Ticker(n) => self.ticker(&turn.text, index, n)?,
            TurnKind::Reply { tool } => self.reply(&turn.text, index, tool)?,
            TurnKind::Large { events, kib } => self.large(&turn.text, index, events, kib)?,
            TurnKind::Fault(fault) => self.fault(&turn.text, index, fault)?,
        }
        self.pause();
        self.with_store(|s| {
            let usage = s.truth.get(sid).map(UsageTruth::snapshot)?;
            s.emit(sid, json!({"type": "session.usage", "usage": usage}))
        })?;
        self.pause();
        self.with_store(|s| {
            s.set_status(sid, "idle");
            let idle = if kind == TurnKind::Events2026 {
                json!({"type": "session.status_idle", "stop_reason": {"type": "refusal"},
                       "stop_details": {"type": "refusal", "category": "cyber", "explanation": "declined"}})
            } else {
                json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}})
            };
            s.emit(sid, idle)
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

    fn large(&self, text: &str, index: u64, events: u32, kib: u32) -> Result<(), Gone> {
        let start_id = self.start_request()?;
        let body = filler(usize::try_from(kib).unwrap_or(0) * 1024);
        let kept = history_text(&body);
        self.pause();
        for _ in 0..events {
            if !self.await_streams()? {
                break;
            }
            self.large_message(&body, &kept)?;
        }
        self.end_request(&start_id, model_usage(text, index, 0))
    }

    fn fault(&self, text: &str, index: u64, fault: FaultTurn) -> Result<(), Gone> {
        let sid = self.session_id;
        self.reply(text, index, false)?;
        self.pause();
        let on_streams = |f: &dyn Fn(&mut sse::Broadcaster)| {
            self.with_store(|s| s.sessions.get_mut(sid).map(|x| f(&mut x.broadcaster)))
        };
        match fault {
            FaultTurn::Reset => on_streams(&|b| b.fail(&sse::Frame::Abort)),
            FaultTurn::Hang(secs) => {
                on_streams(&|b| b.fail(&sse::Frame::Hang(Duration::from_secs(secs))))
            }
            FaultTurn::Malformed => {
                let raw = Arc::new(MALFORMED_SSE.to_vec());
                on_streams(&|b| b.publish_raw(&raw))
            }
            FaultTurn::BadUtf8 => {
                let raw = Arc::new(bad_utf8_frames());
                on_streams(&|b| b.publish_raw(&raw))
            }
            FaultTurn::HugeLine(mib) => self.huge_lines(text, index, mib),
            FaultTurn::Truncated => self.truncated_span(text, index),
        }
    }

    /// `emulator:fault hugeline M`: see the module doc.
    fn huge_lines(&self, text: &str, index: u64, mib: u32) -> Result<(), Gone> {
        let sid = self.session_id;
        let bytes = usize::try_from(mib).unwrap_or(0) << 20;
        let body = filler(bytes);
        let mut comment = Vec::with_capacity(bytes + 4);
        comment.extend_from_slice(b": ");
        comment.extend_from_slice(body.as_bytes());
        comment.extend_from_slice(b"\n\n");
        let comment = Arc::new(comment);
        if self.await_streams()? {
            self.with_store(|s| {
                s.sessions
                    .get_mut(sid)
                    .map(|x| x.broadcaster.publish_raw(&comment))
            })?;
        }
        drop(comment);
        if self.await_streams()? {
            self.large_message(&body, &history_text(&body))?;
        }
        let start_id = self.start_request()?;
        if !self.await_streams()? {
            return self.end_request(&start_id, model_usage(text, index, 1));
        }
        self.end_request_framed(&start_id, model_usage(text, index, 1), |event| {
            let mut streamed = event.clone();
            streamed["padding"] = json!(TEXT_PLACEHOLDER);
            streamed.to_string().replace(TEXT_PLACEHOLDER, &body)
        })
    }

    /// `emulator:fault truncated`: see the module doc.
    fn truncated_span(&self, text: &str, index: u64) -> Result<(), Gone> {
        let start_id = self.start_request()?;
        self.end_request_framed(&start_id, model_usage(text, index, 1), |event| {
            let json = event.to_string();
            // `…"model_usage":{"` and five more characters: cut inside the usage object.
            const USAGE_KEY: &str = "\"model_usage\":{\"";
            let cut = json
                .find(USAGE_KEY)
                .map_or(json.len() / 2, |at| at + USAGE_KEY.len() + 5);
            json[..cut].to_string()
        })
    }

    /// Like [`Self::end_request`], but streams `data(event)` as the frame's data instead of the
    /// event itself (the history keeps the event); the usage is recorded in the ground truth
    /// either way.
    fn end_request_framed(
        &self,
        start_id: &str,
        usage: ModelUsage,
        data: impl FnOnce(&Value) -> String,
    ) -> Result<(), Gone> {
        let sid = self.session_id;
        let usage = self.opts.apply(usage);
        self.pause();
        self.with_store(|s| {
            let id = s.id("sevt_");
            let now = now_rfc3339();
            let event = json!({
                "id": id,
                "type": "span.model_request_end",
                "model_request_start_id": start_id,
                "is_error": false,
                "model_usage": usage.to_json(),
                "created_at": now,
                "processed_at": now,
            });
            let frame = Arc::new(sse::format_frame("span.model_request_end", &data(&event)));
            s.emit_with_frame(sid, event, &frame)?;
            self.record_truth(s, &id, &usage);
            Some(())
        })
    }

    /// Blocks until every open stream has at most [`LARGE_BACKLOG_BYTES`] queued; false
    /// when the turn was interrupted (or the session deleted) meanwhile.
    fn await_streams(&self) -> Result<bool, Gone> {
        let sid = self.session_id;
        let gauges = self.with_store(|s| s.sessions.get(sid).map(|x| x.broadcaster.gauges()))?;
        Ok(sse::wait_for_backlog(
            &gauges,
            LARGE_BACKLOG_BYTES,
            LARGE_STALL_TIMEOUT,
            || self.interrupted(),
        ))
    }

    /// Streams one large `agent.message` with the full `text`; the history gets `kept`.
    /// The frame is built before taking the store lock.
    fn large_message(&self, text: &str, kept: &str) -> Result<(), Gone> {
        let sid = self.session_id;
        let id = self.app.ids.next("sevt_");
        let now = now_rfc3339();
        let frame = Arc::new(large_frame(&id, &now, text));
        let stored = json!({
            "id": id,
            "type": "agent.message",
            "content": [{"type": "text", "text": kept}],
            "created_at": now,
            "processed_at": now,
        });
        self.with_store(|s| {
            let session = s.sessions.get_mut(sid)?;
            if session.broadcaster.wants_preview("agent.message") {
                let start = json!({
                    "type": "event_start",
                    "event": {"id": id, "type": "agent.message"},
                });
                session
                    .broadcaster
                    .publish_preview("agent.message", &[("event_start", start.to_string())]);
            }
            s.emit_with_frame(sid, stored, &frame)
        })
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

    /// Adds a model request to the ground truth, billed at the turn's thread model if any.
    fn record_truth(&self, s: &mut Store, id: &str, usage: &ModelUsage) {
        let truth = s.truth.entry(self.session_id.to_string()).or_default();
        let model = self
            .opts
            .thread_model
            .clone()
            .unwrap_or_else(|| truth.model.clone());
        truth.record_on(id, usage, ACTIVE_SECONDS_PER_REQUEST, &model);
    }

    fn end_request(&self, start_id: &str, usage: ModelUsage) -> Result<(), Gone> {
        let usage = self.opts.apply(usage);
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
            let end_id = event
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            self.record_truth(s, &end_id, &usage);
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
    fn list_cost_follows_model_speed_band_threads_and_the_test_delta() {
        let opts = TurnOptions::parse(
            "hi emulator:fast emulator:prompt=100001 emulator:thread-model=claude-haiku-5-5",
        );
        assert_eq!(
            opts,
            TurnOptions {
                fast: true,
                prompt_tokens: Some(100_001),
                thread_model: Some("claude-haiku-5-5".into()),
            }
        );
        let usage = opts.apply(model_usage("hi", 0, 0));
        assert_eq!(usage.to_json()["speed"], "fast");
        assert!(model_usage("hi", 0, 0).to_json().get("speed").is_none());
        let mut truth = UsageTruth {
            model: "claude-opus-5-5".into(),
            list_cost_delta_cents: 7,
            ..UsageTruth::default()
        };
        // Before any model request the delta does not apply.
        assert_eq!(truth.list_cost_cents(), 0);
        truth.list_cost_delta_cents = 0;
        // 1,000,000 input tokens of Opus 5.5 = $4 = 400 cents; runtime 2 s ≈ 0.004 cents.
        let million = ModelUsage {
            input_tokens: 1_000_000,
            output_tokens: 0,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            fast: false,
        };
        truth.record_on("a", &million, 2, "claude-opus-5-5");
        assert_eq!(truth.list_cost_cents(), 400);
        // Fast: ×2.
        truth.record_on(
            "b",
            &ModelUsage {
                fast: true,
                ..million
            },
            0,
            "claude-opus-5-5",
        );
        assert_eq!(truth.list_cost_cents(), 400 + 800);
        // A Haiku 5.5 thread over 100K: $0.10 × 5 per MTok.
        truth.record_on("c", &million, 0, "claude-haiku-5-5");
        assert_eq!(truth.list_cost_cents(), 1200 + 50);
        // An unpriced model adds nothing; the delta moves the figure either way.
        truth.record_on("d", &million, 0, "claude-future-9");
        assert_eq!(truth.list_cost_cents(), 1250);
        truth.list_cost_delta_cents = -50;
        assert_eq!(truth.list_cost_cents(), 1200);
        truth.list_cost_delta_cents = -5000;
        assert_eq!(truth.list_cost_cents(), 0);
        assert_eq!(
            truth.snapshot()["list_cost"],
            json!({"amount": "0", "currency": "USD"})
        );
    }

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
                fast: false,
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
    fn fault_turns_parse_and_clamp() {
        assert_eq!(fault_turn("emulator:fault reset"), Some(FaultTurn::Reset));
        assert_eq!(fault_turn("emulator:fault hang"), Some(FaultTurn::Hang(30)));
        assert_eq!(
            fault_turn("emulator:fault hang 5"),
            Some(FaultTurn::Hang(5))
        );
        assert_eq!(
            fault_turn("emulator:fault hang 99999"),
            Some(FaultTurn::Hang(MAX_HANG_SECS))
        );
        assert_eq!(
            fault_turn("emulator:fault hugeline"),
            Some(FaultTurn::HugeLine(8))
        );
        assert_eq!(
            fault_turn("emulator:fault hugeline 1000"),
            Some(FaultTurn::HugeLine(MAX_HUGELINE_MIB))
        );
        assert_eq!(
            fault_turn("emulator:fault malformed"),
            Some(FaultTurn::Malformed)
        );
        assert_eq!(
            fault_turn("emulator:fault badutf8"),
            Some(FaultTurn::BadUtf8)
        );
        assert_eq!(
            fault_turn("emulator:fault truncated"),
            Some(FaultTurn::Truncated)
        );
        assert_eq!(fault_turn("emulator:fault bogus"), None);
        assert_eq!(fault_turn("emulator:faultreset"), None);
        assert_eq!(
            classify("emulator:fault reset"),
            TurnKind::Fault(FaultTurn::Reset)
        );
        assert_eq!(
            classify("emulator:fault bogus"),
            TurnKind::Reply { tool: false }
        );
    }

    #[test]
    fn malformed_frames_carry_no_valid_usage() {
        assert!(std::str::from_utf8(&bad_utf8_frames()).is_err());
        assert!(std::str::from_utf8(MALFORMED_SSE).is_ok());
        // Every data line that parses as JSON with a usage object has an invalid one.
        let text = std::str::from_utf8(MALFORMED_SSE).unwrap();
        for line in text.split(['\n', '\r']) {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(usage) = value.get("model_usage") {
                let fields = [
                    "input_tokens",
                    "output_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ];
                assert!(
                    !fields
                        .iter()
                        .all(|f| usage.get(f).is_some_and(Value::is_u64)),
                    "{line}"
                );
            }
        }
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
        assert_eq!(classify("go emulator:events-2026-12"), TurnKind::Events2026);
        assert_eq!(
            classify("emulator:events-2026-123"),
            TurnKind::Reply { tool: false }
        );
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
        assert_eq!(
            classify("emulator:large 50 1024"),
            TurnKind::Large {
                events: 50,
                kib: 1024
            }
        );
        assert_eq!(
            classify(" emulator:large 99999 99999 please"),
            TurnKind::Large {
                events: MAX_LARGE_EVENTS,
                kib: MAX_LARGE_KIB
            }
        );
        for not_large in [
            "emulator:large 5",
            "emulator:large x 1",
            "emulator:larger 1 1",
        ] {
            assert_eq!(classify(not_large), TurnKind::Reply { tool: false });
        }
    }

    #[test]
    fn large_texts_frames_and_history() {
        let text = filler(3000);
        assert_eq!(text.len(), 3000);
        assert!(text.starts_with("lorem ipsum lorem"));
        assert_eq!(filler(0), "");
        let frame = large_frame("sevt_1", "2026-05-01T12:00:00.000000Z", &text);
        let data = frame
            .strip_prefix("event: agent.message\ndata: ")
            .and_then(|f| f.strip_suffix("\n\n"))
            .unwrap();
        assert!(!data.contains('\n'));
        let event: Value = serde_json::from_str(data).unwrap();
        assert_eq!(event["content"][0]["text"], text.as_str());
        assert_eq!(event["id"], "sevt_1");
        assert_eq!(event["processed_at"], "2026-05-01T12:00:00.000000Z");
        let kept = history_text(&text);
        assert!(kept.starts_with(&text[..LARGE_HISTORY_BYTES]));
        assert!(
            kept.ends_with("first 1024 of the 3000 bytes streamed]"),
            "{kept}"
        );
        assert_eq!(history_text("short"), "short");
    }
}
