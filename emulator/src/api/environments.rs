//! Environments (cloud and self-hosted configs, normalized like the API returns them) and
//! the minimal self-hosted work queue.

use serde_json::{json, Map, Value};

use super::{
    archive_value, body_object, list_reply, merge_metadata, metadata_patch, new_metadata,
    nullable_string, ok, rec_values, required_string, ApiError, ApiResult, App, Order, Rec,
    Request,
};
use crate::util::now_rfc3339;

pub(super) fn normalize_env_config(v: Option<&Value>) -> Result<Value, ApiError> {
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

pub(super) fn env_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("environment {id} not found"))
}

pub(super) fn create_environment(app: &App, req: &Request) -> ApiResult {
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

pub(super) fn list_environments(app: &App, req: &Request) -> ApiResult {
    let items = rec_values(&app.store().environments);
    list_reply(items, &req.query, Order::Desc, true)
}

pub(super) fn get_environment(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let env = store
        .environments
        .get(id)
        .ok_or_else(|| env_not_found(id))?;
    ok(&env.value)
}

pub(super) fn update_environment(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn delete_environment(app: &App, id: &str) -> ApiResult {
    app.store()
        .environments
        .remove(id)
        .ok_or_else(|| env_not_found(id))?;
    ok(&json!({"id": id, "type": "environment_deleted"}))
}

pub(super) fn archive_environment(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let env = store
        .environments
        .get_mut(id)
        .ok_or_else(|| env_not_found(id))?;
    archive_value(&mut env.value);
    ok(&env.value)
}

pub(super) fn list_work(app: &App, id: &str) -> ApiResult {
    if !app.store().environments.contains_key(id) {
        return Err(env_not_found(id));
    }
    ok(&json!({"data": [], "next_page": Value::Null}))
}

pub(super) fn ack_work(app: &App, id: &str) -> ApiResult {
    if !app.store().environments.contains_key(id) {
        return Err(env_not_found(id));
    }
    ok(&json!({}))
}
