//! Request dispatch: the shared [`App`] state, the [`Server`] handler, routing, the API's
//! error envelope and the request helpers every resource module uses.
//!
//! `/v1/...` is the emulated Managed Agents API: every request is recorded, then checked for
//! the key (`x-api-key` or `Authorization: Bearer`), `anthropic-version` and the
//! `managed-agents-2026-04-01` beta, then routed to [`agents`], [`environments`],
//! [`vaults`] or [`sessions`]. `/_emulator/...` holds the unauthenticated test hooks
//! (request log, usage ground truth, health, fault injection). Errors use the API's
//! envelope `{"type":"error","error":{"type","message"},"request_id"}`.
//!
//! Request-level faults (`POST /_emulator/faults`, see [`add_fault`]), each consumed by the
//! next `count` matching `/v1` requests after the key and version checks:
//!
//! - `status`: that status with the envelope (500 `api_error`, 529 `overloaded_error`, …);
//! - `reset`: the connection is closed without an answer;
//! - `hang`: no answer for `hold_ms`, then the connection is closed;
//! - `hang_headers`: a 200 head (event stream on stream paths), then no body for `hold_ms`;
//! - `truncated`: the real answer, cut after half its body under the full `Content-Length`;
//! - `truncated_json`: the real answer's first half as a complete response (broken JSON).
//!
//! Held connections end early when the client leaves. Faults in the middle of an event
//! stream are scripted turns instead (`emulator:fault …`, see [`crate::script`]).

mod agents;
mod environments;
mod neighbours;
mod sessions;
mod vaults;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::http::{self, BodyReport, Misbehave, Query, Reply, Request, Response};
use crate::page::{paginate, Cursor, Order, Page, PageParams};
use crate::store::{merge_metadata, Rec, Store};
use crate::util::{now_rfc3339, IdGen};
use crate::Config;

/// The beta every Managed Agents request must opt into.
pub const BETA: &str = "managed-agents-2026-04-01";
/// How many requests `/_emulator/requests` remembers.
const REQUEST_LOG_CAP: usize = 10_000;
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;
const MAX_EVENTS_LIMIT: usize = 1000;

/// Shared state of the running emulator.
pub struct App {
    pub cfg: Config,
    pub ids: Arc<IdGen>,
    store: Mutex<Store>,
    requests: Mutex<RequestLog>,
    faults: Mutex<Vec<Fault>>,
    /// Keys accepted right now: starts as `--api-key`, replaced by `POST /_emulator/api-keys`
    /// (rotation tests: accept old and new during a switch, then only the new one).
    accepted_keys: Mutex<Vec<String>>,
}

impl App {
    pub fn new(cfg: Config) -> Self {
        let key = cfg.api_key.clone();
        let ids = Arc::new(IdGen::new(cfg.seed));
        Self {
            store: Mutex::new(Store::new(Arc::clone(&ids))),
            ids,
            cfg,
            requests: Mutex::new(RequestLog::default()),
            accepted_keys: Mutex::new(vec![key]),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Locks the store (a panicked holder does not poison the emulator).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a request the moment its head arrives (before its body is read); returns
    /// its sequence number for [`App::record_body`].
    fn record_head(&self, req: &Request) -> u64 {
        let headers: Vec<Value> = req.headers.iter().map(|(n, v)| json!([n, v])).collect();
        let entry = json!({
            "method": req.method,
            "path": req.target,
            "headers": headers,
            "protocol": req.protocol,
            "content_encoding": req.header("content-encoding"),
            "body_bytes": 0,
            "body_complete": false,
            "trailers": [],
        });
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        while log.entries.len() >= REQUEST_LOG_CAP {
            log.entries.pop_front();
            log.first += 1;
        }
        log.entries.push_back(entry);
        log.first + log.entries.len() as u64 - 1
    }

    /// Completes the entry `seq` with what its body turned out to be.
    fn record_body(&self, seq: u64, report: &BodyReport) {
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let Some(index) = seq
            .checked_sub(log.first)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if let Some(entry) = log.entries.get_mut(index) {
            entry["body_bytes"] = json!(report.bytes);
            entry["body_complete"] = json!(report.complete);
            entry["trailers"] = json!(report.trailers);
        }
    }

    /// Consumes one matching injected fault, if any.
    fn take_fault(&self, req: &Request) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let pos = faults.iter().position(|f| {
            req.path.starts_with(&f.path_prefix)
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(&req.method))
        })?;
        let fault = &mut faults[pos];
        fault.remaining -= 1;
        let taken = fault.clone();
        if fault.remaining == 0 {
            faults.remove(pos);
        }
        Some(taken)
    }
}

/// The request log: entries in arrival order; `first` is the sequence number of the front
/// one (cleared and evicted entries keep their numbers).
#[derive(Default)]
struct RequestLog {
    first: u64,
    entries: VecDeque<Value>,
}

/// What an injected fault does to a matching request (`kind` in `POST /_emulator/faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// Answer `status` with the API's error envelope (`overloaded_error` for 529).
    Status,
    /// Close the connection without answering.
    Reset,
    /// Answer nothing for `hold_ms` (or until the client leaves), then close.
    Hang,
    /// Send a 200 head (`text/event-stream` on stream paths, JSON otherwise; body chunked)
    /// and then nothing for `hold_ms` (or until the client leaves), then close.
    HangHeaders,
    /// Handle the request normally, then send only the first half of the response body
    /// under the full `Content-Length` and close (the connection breaks mid-body).
    Truncated,
    /// Handle the request normally, then send the first half of the body as a complete,
    /// well-framed response: valid HTTP carrying truncated JSON.
    TruncatedJson,
}

impl FaultKind {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "status" => Self::Status,
            "reset" => Self::Reset,
            "hang" => Self::Hang,
            "hang_headers" => Self::HangHeaders,
            "truncated" => Self::Truncated,
            "truncated_json" => Self::TruncatedJson,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Reset => "reset",
            Self::Hang => "hang",
            Self::HangHeaders => "hang_headers",
            Self::Truncated => "truncated",
            Self::TruncatedJson => "truncated_json",
        }
    }
}

/// Default and largest `hold_ms` of a hanging fault (a held connection is one thread).
const DEFAULT_HOLD_MS: u64 = 30_000;
const MAX_HOLD_MS: u64 = 600_000;

/// A fault injected with `POST /_emulator/faults`.
#[derive(Debug, Clone)]
struct Fault {
    kind: FaultKind,
    status: u16,
    remaining: u64,
    path_prefix: String,
    method: Option<String>,
    retry_after: Option<u64>,
    message: String,
    hold_ms: u64,
}

impl Fault {
    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind.name(),
            "status": self.status,
            "count": self.remaining,
            "path_prefix": self.path_prefix,
            "method": self.method,
            "retry_after": self.retry_after,
            "message": self.message,
            "hold_ms": self.hold_ms,
        })
    }

    /// How this fault answers `req`, whose normal handling is `handle`.
    fn apply(&self, req: &Request, handle: impl FnOnce() -> ApiResult) -> ApiResult {
        let hold = Duration::from_millis(self.hold_ms);
        match self.kind {
            FaultKind::Status => Err(ApiError {
                status: self.status,
                message: self.message.clone(),
                retry_after: self.retry_after,
            }),
            FaultKind::Reset => Ok(Reply::Fault(Misbehave::Close)),
            FaultKind::Hang => Ok(Reply::Fault(Misbehave::Hang(hold))),
            FaultKind::HangHeaders => {
                let stream = req.path.ends_with("/stream");
                let content_type = if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                };
                Ok(Reply::Fault(Misbehave::HeadThenHang {
                    status: 200,
                    headers: vec![("content-type".into(), content_type.into())],
                    hold,
                }))
            }
            FaultKind::Truncated | FaultKind::TruncatedJson => {
                let mut resp = match handle() {
                    Ok(Reply::Full(resp)) => resp,
                    Err(e) => e.into_response("req_fault"),
                    // Streams are cut with `emulator:fault` turns instead.
                    Ok(other) => return Ok(other),
                };
                let keep = resp.body.len() / 2;
                if self.kind == FaultKind::Truncated {
                    return Ok(Reply::Fault(Misbehave::Truncate { resp, keep }));
                }
                resp.body.truncate(keep);
                Ok(Reply::Full(resp))
            }
        }
    }
}

/// An error answered with the API's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// The envelope's `error.type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            400 | 405 | 409 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        }
    }

    pub fn into_response(self, request_id: &str) -> Response {
        let body = json!({
            "type": "error",
            "error": {"type": self.kind(), "message": self.message},
            "request_id": request_id,
        });
        let mut resp = json_response(self.status, &body);
        if let Some(secs) = self.retry_after {
            resp.headers.push(("retry-after".into(), secs.to_string()));
        }
        resp
    }
}

type ApiResult = Result<Reply, ApiError>;

fn json_response(status: u16, body: &Value) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(body).unwrap_or_default(),
    }
}

fn ok(body: &Value) -> ApiResult {
    Ok(Reply::Full(json_response(200, body)))
}

/// The [`http::Handler`] wiring the server to [`App`].
pub struct Server {
    app: Arc<App>,
}

impl Server {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

impl http::Handler for Server {
    /// Every request but the private `/_emulator` ones is recorded as its head arrives.
    fn arrived(&self, head: &Request) -> Option<u64> {
        let private = head.path == "/_emulator" || head.path.starts_with("/_emulator/");
        (!private).then(|| self.app.record_head(head))
    }

    fn body_read(&self, token: u64, report: &BodyReport) {
        self.app.record_body(token, report);
    }

    fn handle(&self, req: Request) -> Reply {
        let request_id = self.app.ids.next("req_");
        let started = Instant::now();
        let mut reply = match dispatch(&self.app, &req) {
            Ok(reply) => reply,
            Err(e) => Reply::Full(e.into_response(&request_id)),
        };
        if self.app.cfg.verbose {
            eprintln!(
                "ma-emulator: {} {} -> {} ({} µs)",
                req.method,
                req.target,
                reply.status(),
                started.elapsed().as_micros()
            );
        }
        if let Some(headers) = reply.headers_mut() {
            headers.push(("request-id".into(), request_id));
        }
        reply
    }

    fn reject(&self, status: u16, message: &str) -> Response {
        let request_id = self.app.ids.next("req_");
        let mut resp = ApiError::new(status, message).into_response(&request_id);
        resp.headers.push(("request-id".into(), request_id));
        resp
    }
}

fn dispatch(app: &Arc<App>, req: &Request) -> ApiResult {
    let segments: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.first().copied() {
        Some("_emulator") => private(app, req, &segments),
        Some("v1") => {
            check_auth(app, req)?;
            check_versions(req, &segments)?;
            match app.take_fault(req) {
                Some(fault) => fault.apply(req, || v1(app, req, &segments)),
                None => v1(app, req, &segments),
            }
        }
        _ => Err(ApiError::not_found(format!("Not found: {}", req.path))),
    }
}

fn check_auth(app: &App, req: &Request) -> Result<(), ApiError> {
    let keys = app
        .accepted_keys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let accepted = |candidate: &str| keys.iter().any(|k| k == candidate);
    let by_header = req.header_values("x-api-key").any(accepted);
    let by_bearer = req.header_values("authorization").any(|v| {
        v.split_once(' ').is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && accepted(token.trim())
        })
    });
    if by_header || by_bearer {
        Ok(())
    } else {
        Err(ApiError::new(401, "invalid x-api-key"))
    }
}

fn check_versions(req: &Request, segments: &[&str]) -> Result<(), ApiError> {
    if req.header("anthropic-version").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "anthropic-version: header is required",
        ));
    }
    if neighbours::is_ga(segments) {
        return Ok(());
    }
    let has_beta = req
        .header_values("anthropic-beta")
        .flat_map(|v| v.split(','))
        .any(|b| b.trim() == BETA);
    if !has_beta {
        return Err(ApiError::bad_request(format!(
            "anthropic-beta: header must include {BETA}"
        )));
    }
    Ok(())
}

fn v1(app: &Arc<App>, req: &Request, segments: &[&str]) -> ApiResult {
    let method = req.method.as_str();
    match (method, &segments[1..]) {
        ("GET", ["agents"]) => agents::list_agents(app, req),
        ("POST", ["agents"]) => agents::create_agent(app, req),
        ("GET", ["agents", id]) => agents::get_agent(app, req, id),
        ("POST", ["agents", id]) => agents::update_agent(app, req, id),
        ("POST", ["agents", id, "archive"]) => agents::archive_agent(app, id),
        ("GET", ["agents", id, "versions"]) => agents::list_agent_versions(app, req, id),

        ("GET", ["environments"]) => environments::list_environments(app, req),
        ("POST", ["environments"]) => environments::create_environment(app, req),
        ("GET", ["environments", id]) => environments::get_environment(app, id),
        ("POST", ["environments", id]) => environments::update_environment(app, req, id),
        ("DELETE", ["environments", id]) => environments::delete_environment(app, id),
        ("POST", ["environments", id, "archive"]) => environments::archive_environment(app, id),
        ("GET", ["environments", id, "work"]) => environments::list_work(app, id),
        ("POST", ["environments", id, "work", _work_id, "ack"]) => environments::ack_work(app, id),

        ("GET", ["vaults"]) => vaults::list_vaults(app, req),
        ("POST", ["vaults"]) => vaults::create_vault(app, req),
        ("GET", ["vaults", id]) => vaults::get_vault(app, id),
        ("POST", ["vaults", id]) => vaults::update_vault(app, req, id),
        ("DELETE", ["vaults", id]) => vaults::delete_vault(app, id),
        ("POST", ["vaults", id, "archive"]) => vaults::archive_vault(app, id),
        ("GET", ["vaults", id, "credentials"]) => vaults::list_credentials(app, req, id),
        ("POST", ["vaults", id, "credentials"]) => vaults::create_credential(app, req, id),
        ("GET", ["vaults", id, "credentials", cid]) => vaults::get_credential(app, id, cid),
        ("POST", ["vaults", id, "credentials", cid]) => {
            vaults::update_credential(app, req, id, cid)
        }
        ("DELETE", ["vaults", id, "credentials", cid]) => vaults::delete_credential(app, id, cid),
        ("POST", ["vaults", id, "credentials", cid, "archive"]) => {
            vaults::archive_credential(app, id, cid)
        }

        ("GET", ["sessions"]) => sessions::list_sessions(app, req),
        ("POST", ["sessions"]) => sessions::create_session(app, req),
        ("GET", ["sessions", id]) => sessions::get_session(app, id),
        ("POST", ["sessions", id]) => sessions::update_session(app, req, id),
        ("DELETE", ["sessions", id]) => sessions::delete_session(app, id),
        ("POST", ["sessions", id, "archive"]) => sessions::archive_session(app, id),
        ("POST", ["sessions", id, "events"]) => sessions::post_events(app, req, id),
        ("GET", ["sessions", id, "events"]) => sessions::list_events(app, req, id),
        ("GET", ["sessions", id, "events", "stream"] | ["sessions", id, "stream"]) => {
            sessions::open_stream(app, req, id)
        }
        ("GET", ["sessions", id, "threads"]) => sessions::list_threads(app, id),
        ("GET", ["sessions", id, "threads", tid]) => sessions::get_thread(app, id, tid),
        ("POST", ["sessions", id, "threads", tid, "archive"]) => {
            sessions::archive_thread(app, id, tid)
        }
        ("GET", ["sessions", id, "threads", tid, "events"]) => {
            sessions::with_thread(app, id, tid)?;
            sessions::list_events(app, req, id)
        }
        ("GET", ["sessions", id, "threads", tid, "stream"]) => {
            sessions::with_thread(app, id, tid)?;
            sessions::open_stream(app, req, id)
        }
        ("GET", ["sessions", id, "resources"]) => sessions::list_resources(app, req, id),
        ("POST", ["sessions", id, "resources"]) => sessions::create_resource(app, req, id),
        ("GET", ["sessions", id, "resources", rid]) => sessions::get_resource(app, id, rid),
        ("POST", ["sessions", id, "resources", rid]) => {
            sessions::update_resource(app, req, id, rid)
        }
        ("DELETE", ["sessions", id, "resources", rid]) => sessions::delete_resource(app, id, rid),

        _ => neighbours::route(app, req, &segments[1..]).unwrap_or_else(|| {
            Err(ApiError::not_found(format!(
                "Not found: {} {}",
                req.method, req.path
            )))
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Private endpoints

fn private(app: &App, req: &Request, segments: &[&str]) -> ApiResult {
    match (req.method.as_str(), &segments[1..]) {
        ("GET", ["health"]) => ok(&json!({"ok": true})),
        ("GET", ["requests"]) => {
            let log = app.requests.lock().unwrap_or_else(|e| e.into_inner());
            ok(&json!({"requests": log.entries.iter().cloned().collect::<Vec<_>>()}))
        }
        ("DELETE", ["requests"]) => {
            let mut log = app.requests.lock().unwrap_or_else(|e| e.into_inner());
            let cleared = log.entries.len() as u64;
            log.first += cleared;
            log.entries.clear();
            ok(&json!({"ok": true}))
        }
        ("POST", ["api-keys"]) => {
            let body: Value = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
            let keys: Vec<String> = body
                .get("keys")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if keys.is_empty() {
                return Err(ApiError::bad_request(
                    "keys: a non-empty array of strings is required",
                ));
            }
            *app.accepted_keys.lock().unwrap_or_else(|e| e.into_inner()) = keys;
            ok(&json!({"ok": true}))
        }
        ("GET", ["usage", sid]) => match app.store().truth.get(*sid) {
            Some(truth) => ok(&truth.to_json()),
            None => Err(ApiError::not_found(format!("session {sid} not found"))),
        },
        ("GET", ["faults"]) => {
            let faults = app.faults.lock().unwrap_or_else(|e| e.into_inner());
            ok(&json!({"faults": faults.iter().map(Fault::to_json).collect::<Vec<_>>()}))
        }
        ("POST", ["faults"]) => add_fault(app, req),
        ("POST", ["compression"]) => {
            let body = body_object(req)?;
            let always = match body.get("mode").and_then(Value::as_str) {
                Some("always") => true,
                Some("configured") => false,
                _ => {
                    return Err(ApiError::new(
                        400,
                        "mode must be \"always\" or \"configured\"",
                    ))
                }
            };
            crate::server::FORCE_GZIP.store(always, std::sync::atomic::Ordering::Relaxed);
            ok(&json!({"ok": true, "mode": if always { "always" } else { "configured" }}))
        }
        ("DELETE", ["faults"]) => {
            app.faults.lock().unwrap_or_else(|e| e.into_inner()).clear();
            ok(&json!({"ok": true}))
        }
        _ => neighbours::route(app, req, &segments[1..]).unwrap_or_else(|| {
            Err(ApiError::not_found(format!(
                "Not found: {} {}",
                req.method, req.path
            )))
        }),
    }
}

/// `POST /_emulator/faults` `{"kind":"status","status":429,"count":1,"path_prefix":"/v1/",
/// "method":null,"retry_after":1,"message":"...","hold_ms":30000}`: the next `count`
/// matching `/v1` requests (after the auth checks) get the fault. `kind` (default `status`)
/// is one of [`FaultKind`]: `status` needs `status` in 400..=599 (529 answers the API's
/// `overloaded_error` envelope); `reset`, `hang` and `hang_headers` misbehave on the
/// connection (`hold_ms`, default 30000, at most 600000); `truncated` and `truncated_json`
/// cut the normal answer's body in half (broken framing, resp. well-framed broken JSON).
fn add_fault(app: &App, req: &Request) -> ApiResult {
    let body = body_object(req)?;
    let kind = match body.get("kind") {
        None | Some(Value::Null) => FaultKind::Status,
        Some(v) => v.as_str().and_then(FaultKind::parse).ok_or_else(|| {
            ApiError::bad_request(
                "kind: one of status, reset, hang, hang_headers, truncated, truncated_json",
            )
        })?,
    };
    let status = if kind == FaultKind::Status || body.contains_key("status") {
        body.get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (400..=599).contains(s))
            .ok_or_else(|| ApiError::bad_request("status: must be an integer in 400..=599"))?
    } else {
        0
    };
    let fault = Fault {
        kind,
        status,
        remaining: body
            .get("count")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1),
        path_prefix: body
            .get("path_prefix")
            .and_then(Value::as_str)
            .unwrap_or("/v1/")
            .to_string(),
        method: body
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_string),
        retry_after: body.get("retry_after").and_then(Value::as_u64),
        message: body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("injected fault")
            .to_string(),
        hold_ms: body
            .get("hold_ms")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_HOLD_MS)
            .min(MAX_HOLD_MS),
    };
    let mut faults = app.faults.lock().unwrap_or_else(|e| e.into_inner());
    faults.push(fault);
    ok(&json!({"faults": faults.iter().map(Fault::to_json).collect::<Vec<_>>()}))
}

// ---------------------------------------------------------------------------------------
// Request helpers

fn body_object(req: &Request) -> Result<Map<String, Value>, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("invalid JSON body: {e}"))),
    }
}

fn required_string(body: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("{field}: Field required"))),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(ApiError::bad_request(format!(
            "{field}: String should have at least 1 character"
        ))),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field}: Input should be a valid string"
        ))),
    }
}

/// A string-or-null field; absent reads as null.
fn nullable_string(body: &Map<String, Value>, field: &str) -> Result<Value, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(v @ Value::String(_)) => Ok(v.clone()),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field}: Input should be a valid string"
        ))),
    }
}

/// An array field; absent or null reads as `[]`.
fn array_field(body: &Map<String, Value>, field: &str) -> Result<Value, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(json!([])),
        Some(v @ Value::Array(_)) => Ok(v.clone()),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field}: Input should be a valid list"
        ))),
    }
}

/// A metadata patch: an object whose values are strings (or null to delete).
fn metadata_patch(body: &Map<String, Value>) -> Result<Option<Map<String, Value>>, ApiError> {
    match body.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) if m.values().all(|v| v.is_string() || v.is_null()) => {
            Ok(Some(m.clone()))
        }
        Some(_) => Err(ApiError::bad_request(
            "metadata: Input should be an object of string values",
        )),
    }
}

fn new_metadata(body: &Map<String, Value>) -> Result<Value, ApiError> {
    let mut metadata = json!({});
    if let Some(patch) = metadata_patch(body)? {
        merge_metadata(&mut metadata, &patch);
    }
    Ok(metadata)
}

fn page_params(q: &Query, default_order: Order, max_limit: usize) -> Result<PageParams, ApiError> {
    let limit = match q.get("limit").filter(|s| !s.is_empty()) {
        None => DEFAULT_LIMIT.min(max_limit),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max_limit).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit: Input should be an integer between 1 and {max_limit}"
                ))
            })?,
    };
    let order = match q.get("order").filter(|s| !s.is_empty()) {
        None => default_order,
        Some(s) => Order::parse(s)
            .ok_or_else(|| ApiError::bad_request("order: Input should be 'asc' or 'desc'"))?,
    };
    let cursor = match q.get("page").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            Cursor::decode(s).ok_or_else(|| ApiError::bad_request("page: invalid page cursor"))?,
        ),
    };
    Ok(PageParams {
        limit,
        order,
        cursor,
    })
}

fn flag(q: &Query, name: &str) -> bool {
    q.get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn is_archived(v: &Value) -> bool {
    v.get("archived_at").is_some_and(|a| !a.is_null())
}

fn page_json(page: Page<Value>, with_prev: bool) -> Value {
    let mut out = json!({"data": page.data, "next_page": page.next_page});
    if with_prev {
        out["prev_page"] = json!(page.prev_page);
    }
    out
}

/// Lists `(seq, value)` pairs (any order) with the standard query parameters.
fn list_reply(
    mut items: Vec<(u64, Value)>,
    q: &Query,
    default_order: Order,
    honour_archived: bool,
) -> ApiResult {
    let params = page_params(q, default_order, MAX_LIMIT)?;
    if honour_archived && !flag(q, "include_archived") {
        items.retain(|(_, v)| !is_archived(v));
    }
    items.sort_by_key(|(seq, _)| *seq);
    ok(&page_json(paginate(&items, &params), false))
}

fn archive_value(v: &mut Value) {
    let now = now_rfc3339();
    if !is_archived(v) {
        v["archived_at"] = json!(now);
    }
    v["updated_at"] = json!(now);
}

fn rec_values(map: &HashMap<String, Rec>) -> Vec<(u64, Value)> {
    map.values().map(|r| (r.seq, r.value.clone())).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
