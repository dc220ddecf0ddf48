//! Request dispatch and handlers.
//!
//! `/v1/...` is the emulated Managed Agents API: every request is recorded, then checked for
//! the key (`x-api-key` or `Authorization: Bearer`), `anthropic-version` and the
//! `managed-agents-2026-04-01` beta, then routed. `/_emulator/...` holds the unauthenticated
//! test hooks (request log, usage ground truth, health, fault injection). Errors use the
//! API's envelope `{"type":"error","error":{"type","message"},"request_id"}`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::http::{self, Query, Reply, Request, Response, StreamReply};
use crate::page::{paginate, Cursor, Order, Page, PageParams};
use crate::script;
use crate::sse;
use crate::store::{
    merge_metadata, strip_secrets, AgentRec, CredRec, PendingTurn, Rec, SessionRec, Store,
    ThreadRec, UsageTruth,
};
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
    requests: Mutex<VecDeque<Value>>,
    faults: Mutex<Vec<Fault>>,
}

impl App {
    pub fn new(cfg: Config) -> Self {
        let ids = Arc::new(IdGen::new(cfg.seed));
        Self {
            store: Mutex::new(Store::new(Arc::clone(&ids))),
            ids,
            cfg,
            requests: Mutex::new(VecDeque::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Locks the store (a panicked holder does not poison the emulator).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, req: &Request) {
        let headers: Vec<Value> = req.headers.iter().map(|(n, v)| json!([n, v])).collect();
        let entry = json!({
            "method": req.method,
            "path": req.target,
            "headers": headers,
            "body_bytes": req.body.len(),
        });
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        while log.len() >= REQUEST_LOG_CAP {
            log.pop_front();
        }
        log.push_back(entry);
    }

    /// Consumes one matching injected fault, if any.
    fn take_fault(&self, req: &Request) -> Option<ApiError> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let pos = faults.iter().position(|f| {
            req.path.starts_with(&f.path_prefix)
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(&req.method))
        })?;
        let fault = &mut faults[pos];
        fault.remaining -= 1;
        let err = ApiError {
            status: fault.status,
            message: fault.message.clone(),
            retry_after: fault.retry_after,
        };
        if fault.remaining == 0 {
            faults.remove(pos);
        }
        Some(err)
    }
}

/// An error injected with `POST /_emulator/faults`.
#[derive(Debug, Clone)]
struct Fault {
    status: u16,
    remaining: u64,
    path_prefix: String,
    method: Option<String>,
    retry_after: Option<u64>,
    message: String,
}

impl Fault {
    fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "count": self.remaining,
            "path_prefix": self.path_prefix,
            "method": self.method,
            "retry_after": self.retry_after,
            "message": self.message,
        })
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
            400 | 405 | 409 | 422 => "invalid_request_error",
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
        reply.headers_mut().push(("request-id".into(), request_id));
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
            app.record(req);
            check_auth(app, req)?;
            check_versions(req)?;
            if let Some(err) = app.take_fault(req) {
                return Err(err);
            }
            v1(app, req, &segments)
        }
        _ => {
            app.record(req);
            Err(ApiError::not_found(format!("Not found: {}", req.path)))
        }
    }
}

fn check_auth(app: &App, req: &Request) -> Result<(), ApiError> {
    let key = app.cfg.api_key.as_str();
    let by_header = req.header_values("x-api-key").any(|v| v == key);
    let by_bearer = req.header_values("authorization").any(|v| {
        v.split_once(' ').is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim() == key
        })
    });
    if by_header || by_bearer {
        Ok(())
    } else {
        Err(ApiError::new(401, "invalid x-api-key"))
    }
}

fn check_versions(req: &Request) -> Result<(), ApiError> {
    if req.header("anthropic-version").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "anthropic-version: header is required",
        ));
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
        ("GET", ["agents"]) => list_agents(app, req),
        ("POST", ["agents"]) => create_agent(app, req),
        ("GET", ["agents", id]) => get_agent(app, req, id),
        ("POST", ["agents", id]) => update_agent(app, req, id),
        ("POST", ["agents", id, "archive"]) => archive_agent(app, id),
        ("GET", ["agents", id, "versions"]) => list_agent_versions(app, req, id),

        ("GET", ["environments"]) => list_environments(app, req),
        ("POST", ["environments"]) => create_environment(app, req),
        ("GET", ["environments", id]) => get_environment(app, id),
        ("POST", ["environments", id]) => update_environment(app, req, id),
        ("DELETE", ["environments", id]) => delete_environment(app, id),
        ("POST", ["environments", id, "archive"]) => archive_environment(app, id),
        ("GET", ["environments", id, "work"]) => list_work(app, id),
        ("POST", ["environments", id, "work", _work_id, "ack"]) => ack_work(app, id),

        ("GET", ["vaults"]) => list_vaults(app, req),
        ("POST", ["vaults"]) => create_vault(app, req),
        ("GET", ["vaults", id]) => get_vault(app, id),
        ("POST", ["vaults", id]) => update_vault(app, req, id),
        ("DELETE", ["vaults", id]) => delete_vault(app, id),
        ("POST", ["vaults", id, "archive"]) => archive_vault(app, id),
        ("GET", ["vaults", id, "credentials"]) => list_credentials(app, req, id),
        ("POST", ["vaults", id, "credentials"]) => create_credential(app, req, id),
        ("GET", ["vaults", id, "credentials", cid]) => get_credential(app, id, cid),
        ("POST", ["vaults", id, "credentials", cid]) => update_credential(app, req, id, cid),
        ("DELETE", ["vaults", id, "credentials", cid]) => delete_credential(app, id, cid),
        ("POST", ["vaults", id, "credentials", cid, "archive"]) => archive_credential(app, id, cid),

        ("GET", ["sessions"]) => list_sessions(app, req),
        ("POST", ["sessions"]) => create_session(app, req),
        ("GET", ["sessions", id]) => get_session(app, id),
        ("POST", ["sessions", id]) => update_session(app, req, id),
        ("DELETE", ["sessions", id]) => delete_session(app, id),
        ("POST", ["sessions", id, "archive"]) => archive_session(app, id),
        ("POST", ["sessions", id, "events"]) => post_events(app, req, id),
        ("GET", ["sessions", id, "events"]) => list_events(app, req, id),
        ("GET", ["sessions", id, "events", "stream"] | ["sessions", id, "stream"]) => {
            open_stream(app, req, id)
        }
        ("GET", ["sessions", id, "threads"]) => list_threads(app, id),
        ("GET", ["sessions", id, "threads", tid]) => get_thread(app, id, tid),
        ("POST", ["sessions", id, "threads", tid, "archive"]) => archive_thread(app, id, tid),
        ("GET", ["sessions", id, "threads", tid, "events"]) => {
            with_thread(app, id, tid)?;
            list_events(app, req, id)
        }
        ("GET", ["sessions", id, "threads", tid, "stream"]) => {
            with_thread(app, id, tid)?;
            open_stream(app, req, id)
        }
        ("GET", ["sessions", id, "resources"]) => list_resources(app, req, id),
        ("POST", ["sessions", id, "resources"]) => create_resource(app, req, id),
        ("GET", ["sessions", id, "resources", rid]) => get_resource(app, id, rid),
        ("POST", ["sessions", id, "resources", rid]) => update_resource(app, req, id, rid),
        ("DELETE", ["sessions", id, "resources", rid]) => delete_resource(app, id, rid),

        _ => Err(ApiError::not_found(format!(
            "Not found: {} {}",
            req.method, req.path
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Private endpoints

fn private(app: &App, req: &Request, segments: &[&str]) -> ApiResult {
    match (req.method.as_str(), &segments[1..]) {
        ("GET", ["health"]) => ok(&json!({"ok": true})),
        ("GET", ["requests"]) => {
            let log = app.requests.lock().unwrap_or_else(|e| e.into_inner());
            ok(&json!({"requests": log.iter().cloned().collect::<Vec<_>>()}))
        }
        ("DELETE", ["requests"]) => {
            app.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
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
        ("DELETE", ["faults"]) => {
            app.faults.lock().unwrap_or_else(|e| e.into_inner()).clear();
            ok(&json!({"ok": true}))
        }
        _ => Err(ApiError::not_found(format!(
            "Not found: {} {}",
            req.method, req.path
        ))),
    }
}

/// `POST /_emulator/faults` `{"status":429,"count":1,"path_prefix":"/v1/","method":null,
/// "retry_after":1,"message":"..."}`: the next `count` matching `/v1` requests (after the
/// auth checks) fail with that status.
fn add_fault(app: &App, req: &Request) -> ApiResult {
    let body = body_object(req)?;
    let status = body
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..=599).contains(s))
        .ok_or_else(|| ApiError::bad_request("status: must be an integer in 400..=599"))?;
    let fault = Fault {
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

// ---------------------------------------------------------------------------------------
// Agents

fn normalize_model(v: Option<&Value>) -> Result<Value, ApiError> {
    match v {
        None | Some(Value::Null) => Err(ApiError::bad_request("model: Field required")),
        Some(Value::String(id)) if !id.is_empty() => Ok(json!({"id": id, "speed": "standard"})),
        Some(Value::Object(m))
            if m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()) =>
        {
            let mut model = m.clone();
            if model.get("speed").is_none_or(Value::is_null) {
                model.insert("speed".into(), json!("standard"));
            }
            Ok(Value::Object(model))
        }
        Some(_) => Err(ApiError::bad_request(
            "model: Input should be a model id string or an object with an `id`",
        )),
    }
}

fn create_agent(app: &App, req: &Request) -> ApiResult {
    let body = body_object(req)?;
    let name = required_string(&body, "name")?;
    let model = normalize_model(body.get("model"))?;
    let description = nullable_string(&body, "description")?;
    let system = nullable_string(&body, "system")?;
    let tools = array_field(&body, "tools")?;
    let mcp_servers = array_field(&body, "mcp_servers")?;
    let skills = array_field(&body, "skills")?;
    let metadata = new_metadata(&body)?;
    let execution_identity = body
        .get("execution_identity")
        .filter(|v| v.is_object())
        .cloned()
        .unwrap_or_else(|| json!({"type": "service_account"}));
    let multiagent = body.get("multiagent").cloned().unwrap_or(Value::Null);

    let mut store = app.store();
    let id = store.id("agent_");
    let now = now_rfc3339();
    let agent = json!({
        "id": id,
        "type": "agent",
        "name": name,
        "description": description,
        "model": model,
        "system": system,
        "tools": tools,
        "mcp_servers": mcp_servers,
        "skills": skills,
        "metadata": metadata,
        "execution_identity": execution_identity,
        "multiagent": multiagent,
        "version": 1,
        "created_at": now,
        "updated_at": now,
        "archived_at": Value::Null,
    });
    let seq = store.next_seq();
    store.agents.insert(
        id,
        AgentRec {
            seq,
            versions: vec![agent.clone()],
        },
    );
    ok(&agent)
}

fn agent_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("agent {id} not found"))
}

fn list_agents(app: &App, req: &Request) -> ApiResult {
    let items = app
        .store()
        .agents
        .values()
        .map(|a| (a.seq, a.current().clone()))
        .collect();
    list_reply(items, &req.query, Order::Desc, true)
}

fn parse_version(v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ApiError::bad_request("version: Input should be a positive integer"))
}

fn get_agent(app: &App, req: &Request, id: &str) -> ApiResult {
    let store = app.store();
    let agent = store.agents.get(id).ok_or_else(|| agent_not_found(id))?;
    match req.query.get("version").filter(|s| !s.is_empty()) {
        None => ok(agent.current()),
        Some(v) => {
            let n = parse_version(v)?;
            let version = agent
                .versions
                .get(n - 1)
                .ok_or_else(|| ApiError::not_found(format!("agent {id} has no version {n}")))?;
            ok(version)
        }
    }
}

fn update_agent(app: &App, req: &Request, id: &str) -> ApiResult {
    let body = body_object(req)?;
    let expected = match body.get("version") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| ApiError::bad_request("version: Input should be a valid integer"))?,
        ),
    };
    let mut patch = Map::new();
    if body.contains_key("name") {
        patch.insert("name".into(), json!(required_string(&body, "name")?));
    }
    if body.contains_key("model") {
        patch.insert("model".into(), normalize_model(body.get("model"))?);
    }
    for field in ["description", "system"] {
        if body.contains_key(field) {
            patch.insert(field.into(), nullable_string(&body, field)?);
        }
    }
    for field in ["tools", "mcp_servers", "skills"] {
        if body.contains_key(field) {
            patch.insert(field.into(), array_field(&body, field)?);
        }
    }
    if let Some(v) = body.get("execution_identity") {
        let identity = if v.is_object() {
            v.clone()
        } else {
            json!({"type": "service_account"})
        };
        patch.insert("execution_identity".into(), identity);
    }
    if let Some(v) = body.get("multiagent") {
        patch.insert("multiagent".into(), v.clone());
    }
    let metadata = metadata_patch(&body)?;

    let mut store = app.store();
    let agent = store
        .agents
        .get_mut(id)
        .ok_or_else(|| agent_not_found(id))?;
    let current = agent.current().clone();
    let current_version = current.get("version").and_then(Value::as_u64).unwrap_or(1);
    if let Some(v) = expected {
        if v != current_version {
            return Err(ApiError::new(
                409,
                format!("version conflict: agent {id} is at version {current_version}, not {v}"),
            ));
        }
    }
    let mut next = current.clone();
    for (k, v) in patch {
        next[k.as_str()] = v;
    }
    if let Some(m) = metadata {
        merge_metadata(&mut next["metadata"], &m);
    }
    if next == current {
        return ok(&current);
    }
    next["version"] = json!(current_version + 1);
    next["updated_at"] = json!(now_rfc3339());
    agent.versions.push(next.clone());
    ok(&next)
}

fn archive_agent(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let agent = store
        .agents
        .get_mut(id)
        .ok_or_else(|| agent_not_found(id))?;
    let Some(current) = agent.versions.last_mut() else {
        return Err(agent_not_found(id));
    };
    archive_value(current);
    ok(current)
}

fn list_agent_versions(app: &App, req: &Request, id: &str) -> ApiResult {
    let items = {
        let store = app.store();
        let agent = store.agents.get(id).ok_or_else(|| agent_not_found(id))?;
        agent
            .versions
            .iter()
            .map(|v| {
                (
                    v.get("version").and_then(Value::as_u64).unwrap_or(0),
                    v.clone(),
                )
            })
            .collect()
    };
    list_reply(items, &req.query, Order::Desc, false)
}

// ---------------------------------------------------------------------------------------
// Environments

fn normalize_env_config(v: Option<&Value>) -> Result<Value, ApiError> {
    let cfg = match v {
        Some(Value::Object(cfg)) => cfg,
        None | Some(Value::Null) => return Err(ApiError::bad_request("config: Field required")),
        Some(_) => return Err(ApiError::bad_request("config: Input should be an object")),
    };
    match cfg.get("type").and_then(Value::as_str) {
        Some("cloud") => {
            let networking = match cfg.get("networking") {
                None | Some(Value::Null) => json!({"type": "unrestricted"}),
                Some(Value::Object(n)) => {
                    match n.get("type").and_then(Value::as_str) {
                        Some("unrestricted") => json!({"type": "unrestricted"}),
                        Some("limited") => json!({
                            "type": "limited",
                            "allowed_hosts": n.get("allowed_hosts").cloned().unwrap_or_else(|| json!([])),
                            "allow_package_managers": n.get("allow_package_managers").cloned().unwrap_or(json!(false)),
                            "allow_mcp_servers": n.get("allow_mcp_servers").cloned().unwrap_or(json!(false)),
                        }),
                        _ => return Err(ApiError::bad_request(
                            "config.networking.type: Input should be 'unrestricted' or 'limited'",
                        )),
                    }
                }
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "config.networking: Input should be an object",
                    ))
                }
            };
            let mut packages = json!({
                "type": "packages", "apt": [], "cargo": [], "gem": [], "go": [], "npm": [], "pip": [],
            });
            if let Some(Value::Object(p)) = cfg.get("packages") {
                for (k, v) in p {
                    if k != "type" && v.is_array() {
                        packages[k.as_str()] = v.clone();
                    }
                }
            }
            Ok(json!({"type": "cloud", "networking": networking, "packages": packages}))
        }
        Some("self_hosted") => Ok(Value::Object(cfg.clone())),
        _ => Err(ApiError::bad_request(
            "config.type: Input should be 'cloud' or 'self_hosted'",
        )),
    }
}

fn env_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("environment {id} not found"))
}

fn create_environment(app: &App, req: &Request) -> ApiResult {
    let body = body_object(req)?;
    let name = required_string(&body, "name")?;
    let config = normalize_env_config(body.get("config"))?;
    let description = nullable_string(&body, "description")?;
    let metadata = new_metadata(&body)?;
    let mut store = app.store();
    let id = store.id("env_");
    let now = now_rfc3339();
    let env = json!({
        "id": id,
        "type": "environment",
        "name": name,
        "description": description,
        "config": config,
        "metadata": metadata,
        "scope": "organization",
        "created_at": now,
        "updated_at": now,
        "archived_at": Value::Null,
    });
    let seq = store.next_seq();
    store.environments.insert(
        id,
        Rec {
            seq,
            value: env.clone(),
        },
    );
    ok(&env)
}

fn list_environments(app: &App, req: &Request) -> ApiResult {
    let items = rec_values(&app.store().environments);
    list_reply(items, &req.query, Order::Desc, true)
}

fn get_environment(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let env = store
        .environments
        .get(id)
        .ok_or_else(|| env_not_found(id))?;
    ok(&env.value)
}

fn update_environment(app: &App, req: &Request, id: &str) -> ApiResult {
    let body = body_object(req)?;
    let mut patch = Map::new();
    if body.contains_key("name") {
        patch.insert("name".into(), json!(required_string(&body, "name")?));
    }
    if body.contains_key("description") {
        patch.insert("description".into(), nullable_string(&body, "description")?);
    }
    if body.get("config").is_some_and(|c| !c.is_null()) {
        patch.insert("config".into(), normalize_env_config(body.get("config"))?);
    }
    let metadata = metadata_patch(&body)?;
    let mut store = app.store();
    let env = store
        .environments
        .get_mut(id)
        .ok_or_else(|| env_not_found(id))?;
    for (k, v) in patch {
        env.value[k.as_str()] = v;
    }
    if let Some(m) = metadata {
        merge_metadata(&mut env.value["metadata"], &m);
    }
    env.value["updated_at"] = json!(now_rfc3339());
    ok(&env.value)
}

fn delete_environment(app: &App, id: &str) -> ApiResult {
    app.store()
        .environments
        .remove(id)
        .ok_or_else(|| env_not_found(id))?;
    ok(&json!({"id": id, "type": "environment_deleted"}))
}

fn archive_environment(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let env = store
        .environments
        .get_mut(id)
        .ok_or_else(|| env_not_found(id))?;
    archive_value(&mut env.value);
    ok(&env.value)
}

fn list_work(app: &App, id: &str) -> ApiResult {
    if !app.store().environments.contains_key(id) {
        return Err(env_not_found(id));
    }
    ok(&json!({"data": [], "next_page": Value::Null}))
}

fn ack_work(app: &App, id: &str) -> ApiResult {
    if !app.store().environments.contains_key(id) {
        return Err(env_not_found(id));
    }
    ok(&json!({}))
}

// ---------------------------------------------------------------------------------------
// Vaults and credentials

fn vault_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("vault {id} not found"))
}

fn credential_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("credential {id} not found"))
}

/// `display_name` (SDK) or `name` (accepted as an alias).
fn vault_name(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    if body.contains_key("display_name") {
        Ok(Some(required_string(body, "display_name")?))
    } else if body.contains_key("name") {
        Ok(Some(required_string(body, "name")?))
    } else {
        Ok(None)
    }
}

fn create_vault(app: &App, req: &Request) -> ApiResult {
    let body = body_object(req)?;
    let name =
        vault_name(&body)?.ok_or_else(|| ApiError::bad_request("display_name: Field required"))?;
    let metadata = new_metadata(&body)?;
    let mut store = app.store();
    let id = store.id("vlt_");
    let now = now_rfc3339();
    let vault = json!({
        "id": id,
        "type": "vault",
        "display_name": name,
        "name": name,
        "metadata": metadata,
        "created_at": now,
        "updated_at": now,
        "archived_at": Value::Null,
    });
    let seq = store.next_seq();
    store.vaults.insert(
        id,
        Rec {
            seq,
            value: vault.clone(),
        },
    );
    ok(&vault)
}

fn list_vaults(app: &App, req: &Request) -> ApiResult {
    let items = rec_values(&app.store().vaults);
    list_reply(items, &req.query, Order::Desc, true)
}

fn get_vault(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let vault = store.vaults.get(id).ok_or_else(|| vault_not_found(id))?;
    ok(&vault.value)
}

fn update_vault(app: &App, req: &Request, id: &str) -> ApiResult {
    let body = body_object(req)?;
    let name = vault_name(&body)?;
    let metadata = metadata_patch(&body)?;
    let mut store = app.store();
    let vault = store
        .vaults
        .get_mut(id)
        .ok_or_else(|| vault_not_found(id))?;
    if let Some(name) = name {
        vault.value["display_name"] = json!(name);
        vault.value["name"] = json!(name);
    }
    if let Some(m) = metadata {
        merge_metadata(&mut vault.value["metadata"], &m);
    }
    vault.value["updated_at"] = json!(now_rfc3339());
    ok(&vault.value)
}

fn delete_vault(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    store.vaults.remove(id).ok_or_else(|| vault_not_found(id))?;
    store.credentials.retain(|_, c| c.vault_id != id);
    ok(&json!({"id": id, "type": "vault_deleted"}))
}

fn archive_vault(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let vault = store
        .vaults
        .get_mut(id)
        .ok_or_else(|| vault_not_found(id))?;
    archive_value(&mut vault.value);
    ok(&vault.value)
}

fn create_credential(app: &App, req: &Request, vault_id: &str) -> ApiResult {
    if !app.store().vaults.contains_key(vault_id) {
        return Err(vault_not_found(vault_id));
    }
    let body = body_object(req)?;
    let mut auth = match body.get("auth") {
        Some(Value::Object(a)) if a.get("type").is_some_and(Value::is_string) => {
            Value::Object(a.clone())
        }
        Some(Value::Object(_)) => return Err(ApiError::bad_request("auth.type: Field required")),
        None | Some(Value::Null) => return Err(ApiError::bad_request("auth: Field required")),
        Some(_) => return Err(ApiError::bad_request("auth: Input should be an object")),
    };
    strip_secrets(&mut auth);
    let display_name = nullable_string(&body, "display_name")?;
    let metadata = new_metadata(&body)?;
    let mut store = app.store();
    if !store.vaults.contains_key(vault_id) {
        return Err(vault_not_found(vault_id));
    }
    let id = store.id("vcrd_");
    let now = now_rfc3339();
    let credential = json!({
        "id": id,
        "type": "vault_credential",
        "vault_id": vault_id,
        "display_name": display_name,
        "auth": auth,
        "metadata": metadata,
        "created_at": now,
        "updated_at": now,
        "archived_at": Value::Null,
    });
    let seq = store.next_seq();
    store.credentials.insert(
        id,
        CredRec {
            seq,
            vault_id: vault_id.to_string(),
            value: credential.clone(),
        },
    );
    ok(&credential)
}

fn credential_mut<'a>(
    store: &'a mut Store,
    vault_id: &str,
    id: &str,
) -> Result<&'a mut CredRec, ApiError> {
    if !store.vaults.contains_key(vault_id) {
        return Err(vault_not_found(vault_id));
    }
    store
        .credentials
        .get_mut(id)
        .filter(|c| c.vault_id == vault_id)
        .ok_or_else(|| credential_not_found(id))
}

fn list_credentials(app: &App, req: &Request, vault_id: &str) -> ApiResult {
    let items = {
        let store = app.store();
        if !store.vaults.contains_key(vault_id) {
            return Err(vault_not_found(vault_id));
        }
        store
            .credentials
            .values()
            .filter(|c| c.vault_id == vault_id)
            .map(|c| (c.seq, c.value.clone()))
            .collect()
    };
    list_reply(items, &req.query, Order::Desc, true)
}

fn get_credential(app: &App, vault_id: &str, id: &str) -> ApiResult {
    let mut store = app.store();
    let credential = credential_mut(&mut store, vault_id, id)?;
    ok(&credential.value)
}

fn update_credential(app: &App, req: &Request, vault_id: &str, id: &str) -> ApiResult {
    let body = body_object(req)?;
    let auth_patch = match body.get("auth") {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => {
            let mut a = Value::Object(a.clone());
            strip_secrets(&mut a);
            Some(a)
        }
        Some(_) => return Err(ApiError::bad_request("auth: Input should be an object")),
    };
    let display_name = if body.contains_key("display_name") {
        Some(nullable_string(&body, "display_name")?)
    } else {
        None
    };
    let metadata = metadata_patch(&body)?;
    let mut store = app.store();
    let credential = credential_mut(&mut store, vault_id, id)?;
    if let Some(Value::Object(patch)) = auth_patch {
        for (k, v) in patch {
            if k != "type" {
                credential.value["auth"][k.as_str()] = v;
            }
        }
    }
    if let Some(name) = display_name {
        credential.value["display_name"] = name;
    }
    if let Some(m) = metadata {
        merge_metadata(&mut credential.value["metadata"], &m);
    }
    credential.value["updated_at"] = json!(now_rfc3339());
    ok(&credential.value)
}

fn delete_credential(app: &App, vault_id: &str, id: &str) -> ApiResult {
    let mut store = app.store();
    credential_mut(&mut store, vault_id, id)?;
    store.credentials.remove(id);
    ok(&json!({"id": id, "type": "vault_credential_deleted"}))
}

fn archive_credential(app: &App, vault_id: &str, id: &str) -> ApiResult {
    let mut store = app.store();
    let credential = credential_mut(&mut store, vault_id, id)?;
    archive_value(&mut credential.value);
    ok(&credential.value)
}

// ---------------------------------------------------------------------------------------
// Sessions

fn session_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("session {id} not found"))
}

const SNAPSHOT_FIELDS: &[&str] = &[
    "id",
    "type",
    "name",
    "description",
    "model",
    "system",
    "tools",
    "mcp_servers",
    "skills",
    "execution_identity",
    "multiagent",
    "version",
];

/// Resolves the `agent` of a session create into (agent id, snapshot).
fn resolve_agent(store: &Store, agent_ref: &Value) -> Result<(String, Value), ApiError> {
    let (id, version, overrides) = match agent_ref {
        Value::String(id) => (id.clone(), None, None),
        Value::Object(o) => {
            let id = o
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("agent.id: Field required"))?
                .to_string();
            let version = match o.get("version") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                    ApiError::bad_request("agent.version: Input should be a positive integer")
                })?),
            };
            match o.get("type").and_then(Value::as_str).unwrap_or("agent") {
                "agent" => (id, version, None),
                "agent_with_overrides" => (id, version, Some(o)),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "agent.type: unknown agent reference type '{other}'"
                    )))
                }
            }
        }
        Value::Null => return Err(ApiError::bad_request("agent: Field required")),
        _ => {
            return Err(ApiError::bad_request(
                "agent: Input should be an agent id or an agent reference object",
            ))
        }
    };
    let agent = store.agents.get(&id).ok_or_else(|| agent_not_found(&id))?;
    let source = match version {
        None => agent.current(),
        Some(n) => usize::try_from(n)
            .ok()
            .and_then(|n| agent.versions.get(n - 1))
            .ok_or_else(|| ApiError::not_found(format!("agent {id} has no version {n}")))?,
    };
    let mut snapshot = Map::new();
    for field in SNAPSHOT_FIELDS {
        snapshot.insert(
            (*field).to_string(),
            source.get(*field).cloned().unwrap_or(Value::Null),
        );
    }
    if let Some(o) = overrides {
        for field in ["system", "tools", "mcp_servers", "skills"] {
            if let Some(v) = o.get(field) {
                snapshot.insert(field.into(), v.clone());
            }
        }
        if o.get("model").is_some_and(|m| !m.is_null()) {
            snapshot.insert("model".into(), normalize_model(o.get("model"))?);
        }
    }
    Ok((id, Value::Object(snapshot)))
}

/// Validates a list of client events (`events` of `POST …/events`, or `initial_events`).
fn validate_events(
    v: Option<&Value>,
    field: &str,
    required: bool,
) -> Result<Vec<Map<String, Value>>, ApiError> {
    let items = match v {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) if !required => return Ok(Vec::new()),
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(format!("{field}: Field required")))
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "{field}: Input should be a valid list"
            )))
        }
    };
    if required && items.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{field}: List should have at least 1 item"
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(event) = item else {
                return Err(ApiError::bad_request(format!(
                    "{field}[{i}]: Input should be an object"
                )));
            };
            match event.get("type") {
                Some(Value::String(t)) if !t.is_empty() => {}
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "{field}[{i}].type: Field required"
                    )))
                }
            }
            if event.get("type").and_then(Value::as_str) == Some("user.message")
                && !event
                    .get("content")
                    .is_some_and(|c| c.is_array() || c.is_string())
            {
                return Err(ApiError::bad_request(format!(
                    "{field}[{i}].content: Field required"
                )));
            }
            Ok(event.clone())
        })
        .collect()
}

/// The text of a `user.message` (its text blocks, concatenated).
fn message_text(event: &Value) -> String {
    match event.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Stores and echoes client events; queues turns. Returns the first echoes and whether a
/// worker must be started.
fn ingest_events(
    store: &mut Store,
    session_id: &str,
    events: Vec<Map<String, Value>>,
) -> Result<(Vec<Value>, bool), ApiError> {
    let mut echoed = Vec::with_capacity(events.len());
    for mut event in events {
        let id = store.id("sevt_");
        event.insert("id".into(), json!(id));
        event.insert("processed_at".into(), Value::Null);
        event.remove("created_at");
        let stored = store
            .emit(session_id, Value::Object(event))
            .ok_or_else(|| session_not_found(session_id))?;
        let event_type = stored.get("type").and_then(Value::as_str).unwrap_or("");
        let session = store
            .sessions
            .get_mut(session_id)
            .ok_or_else(|| session_not_found(session_id))?;
        match event_type {
            "user.message" => session.pending.push_back(PendingTurn {
                event_id: id,
                text: message_text(&stored),
            }),
            other => {
                if other == "user.interrupt" && session.worker_active {
                    session.interrupt.store(true, Ordering::SeqCst);
                }
                store.mark_processed(session_id, &id);
            }
        }
        echoed.push(stored);
    }
    let session = store
        .sessions
        .get_mut(session_id)
        .ok_or_else(|| session_not_found(session_id))?;
    let start = !session.pending.is_empty() && !session.worker_active;
    if start {
        session.worker_active = true;
    }
    Ok((echoed, start))
}

fn new_resource(store: &mut Store, body: &Map<String, Value>) -> Result<Rec, ApiError> {
    if !body.get("type").is_some_and(Value::is_string) {
        return Err(ApiError::bad_request("type: Field required"));
    }
    let mut value = Value::Object(body.clone());
    strip_secrets(&mut value);
    let now = now_rfc3339();
    value["id"] = json!(store.id("sres_"));
    value["created_at"] = json!(now);
    value["updated_at"] = json!(now);
    Ok(Rec {
        seq: store.next_seq(),
        value,
    })
}

fn create_session(app: &Arc<App>, req: &Request) -> ApiResult {
    let body = body_object(req)?;
    let agent_ref = body
        .get("agent")
        .ok_or_else(|| ApiError::bad_request("agent: Field required"))?;
    let environment_id = required_string(&body, "environment_id")?;
    let title = nullable_string(&body, "title")?;
    let metadata = new_metadata(&body)?;
    let vault_ids: Vec<String> = match body.get("vault_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::bad_request("vault_ids: Input should be a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "vault_ids: Input should be a valid list",
            ))
        }
    };
    let resources = match array_field(&body, "resources")? {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    let initial_events = validate_events(body.get("initial_events"), "initial_events", false)?;
    let budget = body.get("budget").cloned().unwrap_or(Value::Null);

    let (session, start_worker, id) = {
        let mut store = app.store();
        let (agent_id, agent) = resolve_agent(&store, agent_ref)?;
        if !store.environments.contains_key(&environment_id) {
            return Err(env_not_found(&environment_id));
        }
        if let Some(missing) = vault_ids.iter().find(|v| !store.vaults.contains_key(*v)) {
            return Err(vault_not_found(missing));
        }
        let mut resource_recs = Vec::with_capacity(resources.len());
        for (i, r) in resources.iter().enumerate() {
            let Value::Object(r) = r else {
                return Err(ApiError::bad_request(format!(
                    "resources[{i}]: Input should be an object"
                )));
            };
            resource_recs.push(new_resource(&mut store, r)?);
        }
        let id = store.id("sesn_");
        let now = now_rfc3339();
        let model = agent
            .get("model")
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let seq = store.next_seq();
        let thread_id = store.id("sthr_");
        let rec = SessionRec {
            seq,
            id: id.clone(),
            title,
            metadata,
            budget,
            agent,
            agent_id,
            environment_id,
            vault_ids,
            status: "idle",
            created_at: now.clone(),
            updated_at: now.clone(),
            archived_at: None,
            created: Instant::now(),
            thread: ThreadRec {
                id: thread_id,
                created_at: now.clone(),
                updated_at: now,
                archived_at: None,
            },
            resources: resource_recs,
            events: Vec::new(),
            broadcaster: sse::Broadcaster::default(),
            pending: VecDeque::new(),
            worker_active: false,
            turns: 0,
            interrupt: Arc::default(),
        };
        store.truth.insert(
            id.clone(),
            UsageTruth {
                session_id: id.clone(),
                model,
                ..UsageTruth::default()
            },
        );
        store.sessions.insert(id.clone(), rec);
        let (_, start) = ingest_events(&mut store, &id, initial_events)?;
        let session = store
            .sessions
            .get(&id)
            .map(|s| store.session_json(s))
            .unwrap_or(Value::Null);
        (session, start, id)
    };
    if start_worker {
        script::start_worker(app, &id);
    }
    ok(&session)
}

fn list_sessions(app: &App, req: &Request) -> ApiResult {
    let q = &req.query;
    let params = page_params(q, Order::Desc, MAX_LIMIT)?;
    let statuses = q.get_all("statuses");
    let agent_id = q.get("agent_id").filter(|s| !s.is_empty());
    let agent_version = match q.get("agent_version").filter(|s| !s.is_empty()) {
        None => None,
        Some(v) => Some(u64::try_from(parse_version(v)?).unwrap_or(u64::MAX)),
    };
    let include_archived = flag(q, "include_archived");
    let mut items: Vec<(u64, Value)> = {
        let store = app.store();
        store
            .sessions
            .values()
            .filter(|s| include_archived || s.archived_at.is_none())
            .filter(|s| agent_id.is_none_or(|a| a == s.agent_id))
            .filter(|s| {
                agent_version
                    .is_none_or(|v| s.agent.get("version").and_then(Value::as_u64) == Some(v))
            })
            .filter(|s| statuses.is_empty() || statuses.contains(&s.status))
            .map(|s| (s.seq, store.session_json(s)))
            .collect()
    };
    items.sort_by_key(|(seq, _)| *seq);
    ok(&page_json(paginate(&items, &params), true))
}

fn get_session(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.session_json(session))
}

fn update_session(app: &App, req: &Request, id: &str) -> ApiResult {
    let body = body_object(req)?;
    let title = if body.contains_key("title") {
        Some(nullable_string(&body, "title")?)
    } else {
        None
    };
    let metadata = metadata_patch(&body)?;
    let agent_patch = match body.get("agent") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => {
            let mut patch = Map::new();
            for field in ["tools", "mcp_servers"] {
                if a.contains_key(field) {
                    patch.insert(field.into(), array_field(a, field)?);
                }
            }
            patch
        }
        Some(_) => return Err(ApiError::bad_request("agent: Input should be an object")),
    };
    let mut store = app.store();
    let session = store
        .sessions
        .get_mut(id)
        .ok_or_else(|| session_not_found(id))?;
    if let Some(title) = title {
        session.title = title;
    }
    if let Some(m) = metadata {
        merge_metadata(&mut session.metadata, &m);
    }
    if let Some(budget) = body.get("budget") {
        session.budget = budget.clone();
    }
    for (k, v) in agent_patch {
        session.agent[k.as_str()] = v;
    }
    session.updated_at = now_rfc3339();
    let store = &*store;
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.session_json(session))
}

fn delete_session(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let mut session = store
        .sessions
        .remove(id)
        .ok_or_else(|| session_not_found(id))?;
    let now = now_rfc3339();
    let event = json!({
        "id": store.id("sevt_"),
        "type": "session.deleted",
        "created_at": now,
        "processed_at": now,
    });
    session
        .broadcaster
        .publish("session.deleted", &event.to_string());
    session.broadcaster.close();
    session.interrupt.store(true, Ordering::SeqCst);
    ok(&json!({"id": id, "type": "session_deleted"}))
}

fn archive_session(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let session = store
        .sessions
        .get_mut(id)
        .ok_or_else(|| session_not_found(id))?;
    let now = now_rfc3339();
    session.archived_at.get_or_insert_with(|| now.clone());
    session.updated_at = now;
    let store = &*store;
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.session_json(session))
}

// ---------------------------------------------------------------------------------------
// Events and streams

fn post_events(app: &Arc<App>, req: &Request, id: &str) -> ApiResult {
    if !app.store().sessions.contains_key(id) {
        return Err(session_not_found(id));
    }
    let body = body_object(req)?;
    let events = validate_events(body.get("events"), "events", true)?;
    let (echoed, start) = ingest_events(&mut app.store(), id, events)?;
    if start {
        script::start_worker(app, id);
    }
    ok(&json!({"data": echoed}))
}

fn list_events(app: &App, req: &Request, id: &str) -> ApiResult {
    let q = &req.query;
    let params = page_params(q, Order::Asc, MAX_EVENTS_LIMIT)?;
    let types = q.get_all("types");
    let items: Vec<(u64, Value)> = {
        let store = app.store();
        let session = store
            .sessions
            .get(id)
            .ok_or_else(|| session_not_found(id))?;
        session
            .events
            .iter()
            .filter(|e| {
                types.is_empty()
                    || e.value
                        .get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| types.contains(&t))
            })
            .map(|e| (e.seq, e.value.clone()))
            .collect()
    };
    ok(&page_json(paginate(&items, &params), false))
}

fn open_stream(app: &App, req: &Request, id: &str) -> ApiResult {
    let previews: Vec<String> = req
        .query
        .get_all("event_deltas")
        .into_iter()
        .map(str::to_string)
        .collect();
    let rx = {
        let mut store = app.store();
        let session = store
            .sessions
            .get_mut(id)
            .ok_or_else(|| session_not_found(id))?;
        session.broadcaster.subscribe(previews)
    };
    let heartbeat = app.cfg.heartbeat;
    let kind = app.cfg.heartbeat_kind;
    Ok(Reply::Stream(StreamReply {
        status: 200,
        headers: vec![
            ("content-type".into(), "text/event-stream".into()),
            ("cache-control".into(), "no-cache".into()),
        ],
        body: Box::new(move |out| sse::pump(&rx, out, heartbeat, kind)),
    }))
}

// ---------------------------------------------------------------------------------------
// Threads

fn with_thread(app: &App, id: &str, tid: &str) -> Result<(), ApiError> {
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    if session.thread.id == tid {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("thread {tid} not found")))
    }
}

fn list_threads(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&json!({"data": [store.thread_json(session)], "next_page": Value::Null}))
}

fn get_thread(app: &App, id: &str, tid: &str) -> ApiResult {
    with_thread(app, id, tid)?;
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.thread_json(session))
}

fn archive_thread(app: &App, id: &str, tid: &str) -> ApiResult {
    with_thread(app, id, tid)?;
    let mut store = app.store();
    let session = store
        .sessions
        .get_mut(id)
        .ok_or_else(|| session_not_found(id))?;
    let now = now_rfc3339();
    session
        .thread
        .archived_at
        .get_or_insert_with(|| now.clone());
    session.thread.updated_at = now;
    let store = &*store;
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.thread_json(session))
}

// ---------------------------------------------------------------------------------------
// Session resources

fn resource_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("resource {id} not found"))
}

fn list_resources(app: &App, req: &Request, id: &str) -> ApiResult {
    let items: Vec<(u64, Value)> = {
        let store = app.store();
        let session = store
            .sessions
            .get(id)
            .ok_or_else(|| session_not_found(id))?;
        session
            .resources
            .iter()
            .map(|r| (r.seq, r.value.clone()))
            .collect()
    };
    list_reply(items, &req.query, Order::Asc, false)
}

fn create_resource(app: &App, req: &Request, id: &str) -> ApiResult {
    let body = body_object(req)?;
    let mut store = app.store();
    if !store.sessions.contains_key(id) {
        return Err(session_not_found(id));
    }
    let rec = new_resource(&mut store, &body)?;
    let value = rec.value.clone();
    if let Some(session) = store.sessions.get_mut(id) {
        session.resources.push(rec);
    }
    ok(&value)
}

fn resource_mut<'a>(store: &'a mut Store, id: &str, rid: &str) -> Result<&'a mut Rec, ApiError> {
    store
        .sessions
        .get_mut(id)
        .ok_or_else(|| session_not_found(id))?
        .resources
        .iter_mut()
        .find(|r| r.value.get("id").and_then(Value::as_str) == Some(rid))
        .ok_or_else(|| resource_not_found(rid))
}

fn get_resource(app: &App, id: &str, rid: &str) -> ApiResult {
    let mut store = app.store();
    ok(&resource_mut(&mut store, id, rid)?.value)
}

fn update_resource(app: &App, req: &Request, id: &str, rid: &str) -> ApiResult {
    let mut body = Value::Object(body_object(req)?);
    strip_secrets(&mut body);
    let mut store = app.store();
    let resource = resource_mut(&mut store, id, rid)?;
    if let Value::Object(patch) = body {
        for (k, v) in patch {
            if !matches!(k.as_str(), "id" | "type" | "created_at" | "updated_at") {
                resource.value[k.as_str()] = v;
            }
        }
    }
    resource.value["updated_at"] = json!(now_rfc3339());
    ok(&resource.value)
}

fn delete_resource(app: &App, id: &str, rid: &str) -> ApiResult {
    let mut store = app.store();
    resource_mut(&mut store, id, rid)?;
    if let Some(session) = store.sessions.get_mut(id) {
        session
            .resources
            .retain(|r| r.value.get("id").and_then(Value::as_str) != Some(rid));
    }
    ok(&json!({"id": rid, "type": "session_resource_deleted"}))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::http::{ChunkedWriter, Handler};
    use crate::sse::HeartbeatKind;
    use std::io::Cursor;
    use std::time::Duration;

    const KEY: &str = "test-key";

    fn server() -> Server {
        Server::new(Arc::new(App::new(Config {
            listen: "127.0.0.1:0".into(),
            api_key: KEY.into(),
            heartbeat: None,
            heartbeat_kind: HeartbeatKind::Comment,
            event_delay: Duration::ZERO,
            seed: 1,
            exit_on_stdin_eof: false,
            verbose: false,
        })))
    }

    fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Request {
        let mut raw = format!("{method} {target} HTTP/1.1\r\n");
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        http::read_request(&mut Cursor::new(raw.into_bytes()), &mut Vec::new()).unwrap()
    }

    const GOOD: &[(&str, &str)] = &[
        ("x-api-key", KEY),
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "files-api-2025-04-14, managed-agents-2026-04-01",
        ),
    ];

    fn full(reply: Reply) -> (u16, Value, Vec<(String, String)>) {
        match reply {
            Reply::Full(r) => (
                r.status,
                serde_json::from_slice(&r.body).unwrap(),
                r.headers,
            ),
            Reply::Stream(_) => panic!("unexpected stream"),
        }
    }

    fn call(s: &Server, method: &str, target: &str, body: Value) -> (u16, Value) {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, json, _) = full(s.handle(request(method, target, GOOD, &body)));
        (status, json)
    }

    fn setup(s: &Server) -> String {
        let (_, agent) = call(
            s,
            "POST",
            "/v1/agents",
            json!({"name": "a", "model": "claude-sonnet-4-6"}),
        );
        let (_, env) = call(
            s,
            "POST",
            "/v1/environments",
            json!({"name": "e", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}}),
        );
        let (status, session) = call(
            s,
            "POST",
            "/v1/sessions",
            json!({"agent": agent["id"], "environment_id": env["id"]}),
        );
        assert_eq!(status, 200, "{session}");
        session["id"].as_str().unwrap().to_string()
    }

    fn wait_idle(s: &Server, sid: &str) {
        for _ in 0..500 {
            {
                let store = s.app.store();
                let session = &store.sessions[sid];
                if !session.worker_active && session.pending.is_empty() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("session {sid} never went idle");
    }

    fn event_types(s: &Server, sid: &str) -> Vec<String> {
        let (_, page) = call(
            s,
            "GET",
            &format!("/v1/sessions/{sid}/events?limit=1000"),
            Value::Null,
        );
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn auth_and_version_headers() {
        let s = server();
        let (status, body, headers) = full(s.handle(request("GET", "/v1/agents", &[], "")));
        assert_eq!(status, 401);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["message"], "invalid x-api-key");
        let rid = body["request_id"].as_str().unwrap();
        assert!(rid.starts_with("req_") && rid.len() == 28);
        assert!(headers.iter().any(|(n, v)| n == "request-id" && v == rid));

        let bearer = format!("Bearer {KEY}");
        let (status, body, _) = full(s.handle(request(
            "GET",
            "/v1/agents",
            &[
                ("authorization", &bearer),
                ("anthropic-beta", "managed-agents-2026-04-01"),
            ],
            "",
        )));
        assert_eq!(status, 400);
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version"));
        let (status, body, _) = full(s.handle(request(
            "GET",
            "/v1/agents",
            &[
                ("authorization", &bearer),
                ("anthropic-version", "2026-10-21"),
            ],
            "",
        )));
        assert_eq!(status, 400);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-beta"));
        let (status, _, _) = full(s.handle(request(
            "GET",
            "/v1/agents?beta=true",
            &[
                ("authorization", &bearer),
                ("anthropic-version", "2026-10-21"),
                ("anthropic-beta", "managed-agents-2026-04-01"),
            ],
            "",
        )));
        assert_eq!(status, 200);

        let (_, log) = call(&s, "GET", "/_emulator/requests", Value::Null);
        let log = log["requests"].as_array().unwrap();
        assert_eq!(log.len(), 4);
        assert_eq!(log[3]["path"], "/v1/agents?beta=true");
        assert!(log[3]["headers"]
            .as_array()
            .unwrap()
            .contains(&json!(["authorization", bearer])));
    }

    #[test]
    fn agent_validation_versions_and_conflicts() {
        let s = server();
        let (status, body) = call(&s, "POST", "/v1/agents", json!({"model": "m"}));
        assert_eq!(status, 400);
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("name"));
        let (status, body) = call(&s, "POST", "/v1/agents", json!({"name": "n"}));
        assert_eq!(status, 400);
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("model"));

        let (_, agent) = call(
            &s,
            "POST",
            "/v1/agents",
            json!({"name": "n", "model": {"id": "claude-opus-4-8"}}),
        );
        let id = agent["id"].as_str().unwrap();
        assert!(id.starts_with("agent_"));
        assert_eq!(
            agent["model"],
            json!({"id": "claude-opus-4-8", "speed": "standard"})
        );
        assert_eq!(agent["version"], 1);
        let (status, _) = call(
            &s,
            "POST",
            &format!("/v1/agents/{id}"),
            json!({"version": 5, "name": "x"}),
        );
        assert_eq!(status, 409);
        let (_, v2) = call(
            &s,
            "POST",
            &format!("/v1/agents/{id}"),
            json!({"version": 1, "system": "be brief"}),
        );
        assert_eq!(v2["version"], 2);
        let (_, v1) = call(
            &s,
            "GET",
            &format!("/v1/agents/{id}?version=1"),
            Value::Null,
        );
        assert_eq!(v1["system"], Value::Null);
        let (_, versions) = call(&s, "GET", &format!("/v1/agents/{id}/versions"), Value::Null);
        assert_eq!(versions["data"].as_array().unwrap().len(), 2);
        assert_eq!(versions["data"][0]["version"], 2);
        let (_, archived) = call(&s, "POST", &format!("/v1/agents/{id}/archive"), Value::Null);
        assert!(archived["archived_at"].is_string());
        let (_, list) = call(&s, "GET", "/v1/agents", Value::Null);
        assert!(list["data"].as_array().unwrap().is_empty());
        let (_, list) = call(&s, "GET", "/v1/agents?include_archived=true", Value::Null);
        assert_eq!(list["data"].as_array().unwrap().len(), 1);
        let (status, body) = call(&s, "GET", "/v1/agents/agent_nope", Value::Null);
        assert_eq!(
            (status, body["error"]["type"].as_str()),
            (404, Some("not_found_error"))
        );
        let (status, _) = call(&s, "GET", "/v1/agents?limit=101", Value::Null);
        assert_eq!(status, 400);
    }

    #[test]
    fn list_pagination_through_the_api() {
        let s = server();
        for i in 0..5 {
            call(
                &s,
                "POST",
                "/v1/agents",
                json!({"name": format!("a{i}"), "model": "m"}),
            );
        }
        let mut names = Vec::new();
        let mut target = "/v1/agents?limit=2".to_string();
        loop {
            let (status, page) = call(&s, "GET", &target, Value::Null);
            assert_eq!(status, 200);
            for a in page["data"].as_array().unwrap() {
                names.push(a["name"].as_str().unwrap().to_string());
            }
            match page["next_page"].as_str() {
                Some(next) => target = format!("/v1/agents?limit=2&page={next}"),
                None => break,
            }
        }
        assert_eq!(names, ["a4", "a3", "a2", "a1", "a0"]);
        let (status, _) = call(&s, "GET", "/v1/agents?page=garbage", Value::Null);
        assert_eq!(status, 400);
    }

    #[test]
    fn scripted_turns_are_deterministic_and_metered() {
        let s = server();
        let sid = setup(&s);
        let (status, sent) = call(
            &s,
            "POST",
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "use a tool"}]}]}),
        );
        assert_eq!(status, 200);
        assert_eq!(sent["data"][0]["processed_at"], Value::Null);
        assert!(sent["data"][0]["id"].as_str().unwrap().starts_with("sevt_"));
        wait_idle(&s, &sid);
        assert_eq!(
            event_types(&s, &sid),
            [
                "user.message",
                "session.status_running",
                "span.model_request_start",
                "agent.tool_use",
                "span.model_request_end",
                "agent.tool_result",
                "span.model_request_start",
                "agent.message",
                "span.model_request_end",
                "session.usage",
                "session.status_idle",
            ]
        );
        call(
            &s,
            "POST",
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]}),
        );
        wait_idle(&s, &sid);

        // Turn 0 ("use a tool", 10 chars): requests 0 and 1; turn 1 ("hello", 5 chars).
        let u00 = script::model_usage("use a tool", 0, 0);
        let u01 = script::model_usage("use a tool", 0, 1);
        let u10 = script::model_usage("hello", 1, 0);
        let (_, truth) = call(&s, "GET", &format!("/_emulator/usage/{sid}"), Value::Null);
        assert_eq!(truth["model"], "claude-sonnet-4-6");
        assert_eq!(truth["model_requests"], 3);
        assert_eq!(
            truth["input_tokens"],
            u00.input_tokens + u01.input_tokens + u10.input_tokens
        );
        assert_eq!(
            truth["output_tokens"],
            u00.output_tokens + u01.output_tokens + u10.output_tokens
        );
        assert_eq!(truth["cache_creation_input_tokens"], 50);
        assert_eq!(truth["cache_read_input_tokens"], 100 + 500);
        assert_eq!(truth["active_seconds"], 6);

        let (_, page) = call(
            &s,
            "GET",
            &format!("/v1/sessions/{sid}/events?types[]=span.model_request_end&limit=100"),
            Value::Null,
        );
        let spans = page["data"].as_array().unwrap();
        let ids: Vec<&Value> = spans.iter().map(|e| &e["id"]).collect();
        assert_eq!(
            truth["span_event_ids"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            ids
        );
        assert_eq!(spans[2]["model_usage"], u10.to_json());

        let (_, session) = call(&s, "GET", &format!("/v1/sessions/{sid}"), Value::Null);
        assert_eq!(session["status"], "idle");
        assert_eq!(session["usage"]["input_tokens"], truth["input_tokens"]);
        assert_eq!(
            session["usage"]["cache_creation"]["ephemeral_5m_input_tokens"],
            50
        );
        let (_, usage_events) = call(
            &s,
            "GET",
            &format!("/v1/sessions/{sid}/events?types%5B%5D=session.usage&order=desc&limit=1"),
            Value::Null,
        );
        assert_eq!(usage_events["data"][0]["usage"], session["usage"]);

        let (_, echoed) = call(
            &s,
            "GET",
            &format!("/v1/sessions/{sid}/events?limit=1"),
            Value::Null,
        );
        assert!(echoed["data"][0]["processed_at"].is_string());
    }

    #[test]
    fn streams_see_new_events_and_end_on_delete() {
        let s = server();
        let sid = setup(&s);
        let Reply::Stream(stream) = s.handle(request(
            "GET",
            &format!("/v1/sessions/{sid}/stream"),
            GOOD,
            "",
        )) else {
            panic!("expected a stream");
        };
        assert!(stream
            .headers
            .contains(&("content-type".into(), "text/event-stream".into())));
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut chunks = ChunkedWriter::new(&mut out);
            (stream.body)(&mut chunks).unwrap();
            String::from_utf8(out).unwrap()
        });
        call(
            &s,
            "POST",
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]}),
        );
        wait_idle(&s, &sid);
        let (status, deleted) = call(&s, "DELETE", &format!("/v1/sessions/{sid}"), Value::Null);
        assert_eq!(
            (status, deleted["type"].as_str()),
            (200, Some("session_deleted"))
        );
        let text = reader.join().unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "user.message",
                "user.message",
                "session.status_running",
                "span.model_request_start",
                "agent.message",
                "span.model_request_end",
                "session.usage",
                "session.status_idle",
                "session.deleted",
            ]
        );
        assert!(text.contains(r#""text":"Echo: hi""#));
        let (status, _) = call(&s, "GET", &format!("/v1/sessions/{sid}"), Value::Null);
        assert_eq!(status, 404);
        let (status, _) = call(&s, "GET", &format!("/_emulator/usage/{sid}"), Value::Null);
        assert_eq!(status, 200, "ground truth survives deletion");
    }

    #[test]
    fn credentials_never_echo_secrets() {
        let s = server();
        let (_, vault) = call(&s, "POST", "/v1/vaults", json!({"display_name": "v"}));
        let vid = vault["id"].as_str().unwrap();
        assert!(vid.starts_with("vlt_"));
        let (status, cred) = call(
            &s,
            "POST",
            &format!("/v1/vaults/{vid}/credentials"),
            json!({"auth": {"type": "static_bearer", "token": "sekrit", "mcp_server_url": "https://x"}}),
        );
        assert_eq!(status, 200);
        assert!(cred["id"].as_str().unwrap().starts_with("vcrd_"));
        assert_eq!(
            cred["auth"],
            json!({"type": "static_bearer", "mcp_server_url": "https://x"})
        );
        let (_, list) = call(
            &s,
            "GET",
            &format!("/v1/vaults/{vid}/credentials"),
            Value::Null,
        );
        assert!(!list.to_string().contains("sekrit"));
    }
}
