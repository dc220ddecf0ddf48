//! Sessions and everything under them: agent snapshots, client events (echoed twice and
//! queued as scripted turns), event history, SSE streams, the primary thread and session
//! resources.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::agents::{agent_not_found, normalize_model, parse_version};
use super::environments::env_not_found;
use super::vaults::vault_not_found;
use super::{
    array_field, body_object, flag, list_reply, merge_metadata, metadata_patch, new_metadata,
    nullable_string, ok, page_json, page_params, required_string, ApiError, ApiResult, App, Order,
    Rec, Request, Store, MAX_EVENTS_LIMIT, MAX_LIMIT,
};
use crate::http::{Reply, StreamReply};
use crate::page::paginate;
use crate::script;
use crate::sse;
use crate::store::{strip_secrets, PendingTurn, SessionRec, ThreadRec, UsageTruth};
use crate::util::now_rfc3339;

pub(super) fn session_not_found(id: &str) -> ApiError {
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
    "metadata",
    "version",
];

/// Resolves the `agent` of a session create into (agent id, snapshot).
pub(super) fn resolve_agent(store: &Store, agent_ref: &Value) -> Result<(String, Value), ApiError> {
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
pub(super) fn validate_events(
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
pub(super) fn message_text(event: &Value) -> String {
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
pub(super) fn ingest_events(
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

pub(super) fn new_resource(store: &mut Store, body: &Map<String, Value>) -> Result<Rec, ApiError> {
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

pub(super) fn create_session(app: &Arc<App>, req: &Request) -> ApiResult {
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
        // A test hook: make Anthropic's list cost differ from any price table.
        let list_cost_delta_cents = rec
            .metadata
            .get("emulator_list_cost_delta_cents")
            .and_then(Value::as_str)
            .and_then(|d| d.parse::<i64>().ok())
            .unwrap_or(0);
        store.truth.insert(
            id.clone(),
            UsageTruth {
                session_id: id.clone(),
                model,
                list_cost_delta_cents,
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

pub(super) fn list_sessions(app: &App, req: &Request) -> ApiResult {
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

pub(super) fn get_session(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.session_json(session))
}

pub(super) fn update_session(app: &App, req: &Request, id: &str) -> ApiResult {
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
    let (title_changed, metadata_changed) = (title.is_some(), metadata.is_some());
    let budget_changed = body.contains_key("budget");
    if let Some(title) = title {
        session.title = title;
    }
    if let Some(m) = metadata {
        merge_metadata(&mut session.metadata, &m);
    }
    if let Some(budget) = body.get("budget") {
        session.budget = budget.clone();
    }
    let agent_changed = !agent_patch.is_empty();
    for (k, v) in agent_patch {
        session.agent[k.as_str()] = v;
    }
    session.updated_at = now_rfc3339();
    // `session.updated` carries only the changed fields (the full agent snapshot, with its
    // `metadata`, when tools or MCP servers changed).
    let mut changed = Map::new();
    changed.insert("type".into(), json!("session.updated"));
    if title_changed {
        changed.insert("title".into(), session.title.clone());
    }
    if metadata_changed {
        changed.insert("metadata".into(), session.metadata.clone());
    }
    if budget_changed {
        changed.insert("budget".into(), session.budget.clone());
    }
    if agent_changed {
        changed.insert("agent".into(), session.agent.clone());
    }
    store.emit(id, Value::Object(changed));
    let store = &*store;
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.session_json(session))
}

pub(super) fn delete_session(app: &App, id: &str) -> ApiResult {
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

pub(super) fn archive_session(app: &App, id: &str) -> ApiResult {
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

pub(super) fn post_events(app: &Arc<App>, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn list_events(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn open_stream(app: &App, req: &Request, id: &str) -> ApiResult {
    let previews: Vec<String> = req
        .query
        .get_all("event_deltas")
        .into_iter()
        .map(str::to_string)
        .collect();
    let sub = {
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
        body: Box::new(move |out| sse::pump(&sub, out, heartbeat, kind)),
    }))
}

// ---------------------------------------------------------------------------------------
// Threads

pub(super) fn with_thread(app: &App, id: &str, tid: &str) -> Result<(), ApiError> {
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

pub(super) fn list_threads(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&json!({"data": [store.thread_json(session)], "next_page": Value::Null}))
}

pub(super) fn get_thread(app: &App, id: &str, tid: &str) -> ApiResult {
    with_thread(app, id, tid)?;
    let store = app.store();
    let session = store
        .sessions
        .get(id)
        .ok_or_else(|| session_not_found(id))?;
    ok(&store.thread_json(session))
}

pub(super) fn archive_thread(app: &App, id: &str, tid: &str) -> ApiResult {
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

pub(super) fn resource_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("resource {id} not found"))
}

pub(super) fn list_resources(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn create_resource(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn resource_mut<'a>(
    store: &'a mut Store,
    id: &str,
    rid: &str,
) -> Result<&'a mut Rec, ApiError> {
    store
        .sessions
        .get_mut(id)
        .ok_or_else(|| session_not_found(id))?
        .resources
        .iter_mut()
        .find(|r| r.value.get("id").and_then(Value::as_str) == Some(rid))
        .ok_or_else(|| resource_not_found(rid))
}

pub(super) fn get_resource(app: &App, id: &str, rid: &str) -> ApiResult {
    let mut store = app.store();
    ok(&resource_mut(&mut store, id, rid)?.value)
}

pub(super) fn update_resource(app: &App, req: &Request, id: &str, rid: &str) -> ApiResult {
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

pub(super) fn delete_resource(app: &App, id: &str, rid: &str) -> ApiResult {
    let mut store = app.store();
    resource_mut(&mut store, id, rid)?;
    if let Some(session) = store.sessions.get_mut(id) {
        session
            .resources
            .retain(|r| r.value.get("id").and_then(Value::as_str) != Some(rid));
    }
    ok(&json!({"id": rid, "type": "session_resource_deleted"}))
}
