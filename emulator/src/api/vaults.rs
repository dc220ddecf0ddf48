//! Vaults and their credentials. Secret fields of credential `auth` bodies are dropped
//! before anything is stored, so they can never be echoed or logged.

use serde_json::{json, Map, Value};

use super::{
    archive_value, body_object, list_reply, merge_metadata, metadata_patch, new_metadata,
    nullable_string, ok, rec_values, required_string, ApiError, ApiResult, App, Order, Rec,
    Request, Store,
};
use crate::store::{strip_secrets, CredRec};
use crate::util::now_rfc3339;

pub(super) fn vault_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("vault {id} not found"))
}

pub(super) fn credential_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("credential {id} not found"))
}

/// `display_name` (SDK) or `name` (accepted as an alias).
pub(super) fn vault_name(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    if body.contains_key("display_name") {
        Ok(Some(required_string(body, "display_name")?))
    } else if body.contains_key("name") {
        Ok(Some(required_string(body, "name")?))
    } else {
        Ok(None)
    }
}

pub(super) fn create_vault(app: &App, req: &Request) -> ApiResult {
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

pub(super) fn list_vaults(app: &App, req: &Request) -> ApiResult {
    let items = rec_values(&app.store().vaults);
    list_reply(items, &req.query, Order::Desc, true)
}

pub(super) fn get_vault(app: &App, id: &str) -> ApiResult {
    let store = app.store();
    let vault = store.vaults.get(id).ok_or_else(|| vault_not_found(id))?;
    ok(&vault.value)
}

pub(super) fn update_vault(app: &App, req: &Request, id: &str) -> ApiResult {
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

pub(super) fn delete_vault(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    store.vaults.remove(id).ok_or_else(|| vault_not_found(id))?;
    store.credentials.retain(|_, c| c.vault_id != id);
    ok(&json!({"id": id, "type": "vault_deleted"}))
}

pub(super) fn archive_vault(app: &App, id: &str) -> ApiResult {
    let mut store = app.store();
    let vault = store
        .vaults
        .get_mut(id)
        .ok_or_else(|| vault_not_found(id))?;
    archive_value(&mut vault.value);
    ok(&vault.value)
}

pub(super) fn create_credential(app: &App, req: &Request, vault_id: &str) -> ApiResult {
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

pub(super) fn credential_mut<'a>(
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

pub(super) fn list_credentials(app: &App, req: &Request, vault_id: &str) -> ApiResult {
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

pub(super) fn get_credential(app: &App, vault_id: &str, id: &str) -> ApiResult {
    let mut store = app.store();
    let credential = credential_mut(&mut store, vault_id, id)?;
    ok(&credential.value)
}

pub(super) fn update_credential(app: &App, req: &Request, vault_id: &str, id: &str) -> ApiResult {
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

pub(super) fn delete_credential(app: &App, vault_id: &str, id: &str) -> ApiResult {
    let mut store = app.store();
    credential_mut(&mut store, vault_id, id)?;
    store.credentials.remove(id);
    ok(&json!({"id": id, "type": "vault_credential_deleted"}))
}

pub(super) fn archive_credential(app: &App, vault_id: &str, id: &str) -> ApiResult {
    let mut store = app.store();
    let credential = credential_mut(&mut store, vault_id, id)?;
    archive_value(&mut credential.value);
    ok(&credential.value)
}
