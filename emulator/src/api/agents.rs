//! Agents: create, list, retrieve (optionally a given `version`), update with optimistic
//! `version` checks and version history, archive, and the versions listing.

use serde_json::{json, Map, Value};

use super::{
    archive_value, array_field, body_object, list_reply, merge_metadata, metadata_patch,
    new_metadata, nullable_string, ok, required_string, ApiError, ApiResult, App, Order, Request,
};
use crate::store::AgentRec;
use crate::util::now_rfc3339;

pub(super) fn normalize_model(v: Option<&Value>) -> Result<Value, ApiError> {
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

pub(super) fn create_agent(app: &App, req: &Request) -> ApiResult {
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

pub(super) fn agent_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("agent {id} not found"))
}

pub(super) fn list_agents(app: &App, req: &Request) -> ApiResult {
    let items = app
        .store()
        .agents
        .values()
        .map(|a| (a.seq, a.current().clone()))
        .collect();
    list_reply(items, &req.query, Order::Desc, true)
}

pub(super) fn parse_version(v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ApiError::bad_request("version: Input should be a positive integer"))
}

pub(super) fn get_agent(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn update_agent(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn archive_agent(app: &App, id: &str) -> ApiResult {
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

pub(super) fn list_agent_versions(app: &App, req: &Request, id: &str) -> ApiResult {
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
