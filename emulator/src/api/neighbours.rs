//! The families around Managed Agents proper that the gateway routes on request (files,
//! skills, user profiles, memory stores with memories and versions, deployments and their
//! runs, dreams, tunnels with certificates), plus the newer calls of core families (the
//! environment work queue's verbs, vault credential `mcp_oauth_validate`).
//!
//! These are shape stubs, not stateful models: each call answers an object of the right
//! `type` and id prefix (the path's ids echoed back), lists answer an empty page. The calls
//! whose answers carry a secret — tunnel `reveal_token` / `rotate_token` (`tunnel_token`),
//! work `poll` (`secret` with a `sessions_token`), user-profile `action_urls` /
//! `enrollment_url` (`url`) — mint a fresh value each time, so a leak sweep can look for
//! exactly what the caller was given. Files, Skills and User Profiles are GA: they need no
//! `anthropic-beta` ([`is_ga`]).

use serde_json::{json, Map, Value};

use super::{body_object, ok, ApiError, ApiResult, App, Request};
use crate::util::now_rfc3339;

/// The GA families: no beta header required.
pub(super) fn is_ga(segments: &[&str]) -> bool {
    matches!(
        segments.get(1).copied(),
        Some("files" | "skills" | "user_profiles")
    )
}

/// Routes `segments` (after `v1`); `None` when no neighbour call matches.
pub(super) fn route(app: &App, req: &Request, segments: &[&str]) -> Option<ApiResult> {
    let m = req.method.as_str();
    let reply = match (m, segments) {
        // Environment work queue (core family; the environment must exist).
        ("GET", ["environments", e, "work", rest @ ..]) => work(app, e, m, rest)?,
        ("POST", ["environments", e, "work", rest @ ..]) => work(app, e, m, rest)?,
        ("POST", ["vaults", v, "credentials", c, "mcp_oauth_validate"]) => {
            if !app.store().vaults.contains_key(*v) {
                return Some(Err(ApiError::not_found(format!("vault {v} not found"))));
            }
            ok(&json!({
                "type": "mcp_oauth_validation",
                "credential_id": c,
                "vault_id": v,
                "status": "valid",
            }))
        }
        // Files and skills (GA).
        ("POST", ["files"]) => ok(&object(app, "file", "file_", None)),
        ("GET", ["files"]) => page(),
        ("GET", ["files", f]) => ok(&with_id("file", f)),
        ("GET", ["files", _f, "content"]) => ok(&json!({"content": "emulated file"})),
        ("DELETE", ["files", f]) => ok(&json!({"id": f, "type": "file_deleted"})),
        ("POST", ["skills"]) => ok(&object(app, "skill", "skill_", None)),
        ("GET", ["skills"]) => page(),
        ("GET", ["skills", s]) => ok(&with_id("skill", s)),
        ("DELETE", ["skills", s]) => ok(&json!({"id": s, "type": "skill_deleted"})),
        ("GET", ["skills", _s, "versions"]) => page(),
        ("POST", ["skills", s, "versions"]) => {
            ok(&json!({"type": "skill_version", "skill_id": s, "version": "1"}))
        }
        ("GET" | "DELETE", ["skills", s, "versions", v]) => {
            ok(&json!({"type": "skill_version", "skill_id": s, "version": v}))
        }
        // User profiles (GA) and the beta-only enrollment URL.
        ("POST", ["user_profiles"]) => ok(&object(app, "user_profile", "uprof_", body(req))),
        ("GET", ["user_profiles"]) => page(),
        ("GET" | "POST", ["user_profiles", u]) => ok(&with_id("user_profile", u)),
        ("DELETE", ["user_profiles", u]) => ok(&json!({"id": u, "type": "user_profile_deleted"})),
        ("POST", ["user_profiles", _u, "action_urls"]) => ok(&json!({
            "url": secret_url(app, "action"),
            "expires_at": now_rfc3339(),
        })),
        ("POST", ["user_profiles", _u, "enrollment_url"]) => ok(&json!({
            "type": "enrollment_url",
            "url": secret_url(app, "enroll"),
            "expires_at": now_rfc3339(),
        })),
        ("GET" | "POST", ["user_profiles", u, "providers", "google", "data_controls"]) => {
            ok(&json!({"type": "google_data_controls", "user_profile_id": u, "enabled": false}))
        }
        // Memory stores, memories, memory versions.
        ("POST", ["memory_stores"]) => ok(&object(app, "memory_store", "memstore_", body(req))),
        ("GET", ["memory_stores"]) => page(),
        ("GET" | "POST", ["memory_stores", s]) => ok(&with_id("memory_store", s)),
        ("DELETE", ["memory_stores", s]) => ok(&json!({"id": s, "type": "memory_store_deleted"})),
        ("POST", ["memory_stores", s, "archive"]) => ok(&archived("memory_store", s)),
        ("POST", ["memory_stores", s, "memories"]) => {
            let mut memory = object(app, "memory", "mem_", None);
            memory["memory_store_id"] = json!(s);
            memory["path"] = body(req)
                .and_then(|b| b.get("path").cloned())
                .unwrap_or(Value::Null);
            ok(&memory)
        }
        ("GET", ["memory_stores", _s, "memories" | "memory_versions"]) => page(),
        ("GET" | "POST", ["memory_stores", s, "memories", x]) => {
            ok(&child("memory", x, "memory_store_id", s))
        }
        ("DELETE", ["memory_stores", _s, "memories", x]) => {
            ok(&json!({"id": x, "type": "memory_deleted"}))
        }
        ("GET", ["memory_stores", s, "memory_versions", v]) => {
            ok(&child("memory_version", v, "memory_store_id", s))
        }
        ("POST", ["memory_stores", s, "memory_versions", v, "redact"]) => {
            let mut version = child("memory_version", v, "memory_store_id", s);
            version["redacted_at"] = json!(now_rfc3339());
            ok(&version)
        }
        // Deployments and their runs.
        ("POST", ["deployments"]) => ok(&object(app, "deployment", "depl_", body(req))),
        ("GET", ["deployments"] | ["deployment_runs"]) => page(),
        ("GET" | "POST", ["deployments", d]) => ok(&with_id("deployment", d)),
        ("DELETE", ["deployments", d]) => ok(&json!({"id": d, "type": "deployment_deleted"})),
        ("POST", ["deployments", d, "archive"]) => ok(&archived("deployment", d)),
        ("POST", ["deployments", d, verb @ ("pause" | "unpause")]) => {
            let mut depl = with_id("deployment", d);
            depl["status"] = json!(if *verb == "pause" { "paused" } else { "active" });
            ok(&depl)
        }
        ("POST", ["deployments", d, "run"]) => {
            let mut run = object(app, "deployment_run", "drun_", None);
            run["deployment_id"] = json!(d);
            run["trigger_context"] = json!({"type": "manual"});
            ok(&run)
        }
        ("GET", ["deployment_runs", r]) => ok(&with_id("deployment_run", r)),
        // Dreams.
        ("POST", ["dreams"]) => {
            let mut dream = object(app, "dream", "drm_", None);
            dream["status"] = json!("queued");
            ok(&dream)
        }
        ("GET", ["dreams"]) => page(),
        ("GET", ["dreams", d]) => ok(&with_id("dream", d)),
        ("POST", ["dreams", d, "cancel"]) => {
            let mut dream = with_id("dream", d);
            dream["status"] = json!("canceled");
            ok(&dream)
        }
        ("POST", ["dreams", d, "archive"]) => ok(&archived("dream", d)),
        // Tunnels and their certificates.
        ("POST", ["tunnels"]) => ok(&object(app, "tunnel", "tnl_", body(req))),
        ("GET", ["tunnels"]) => page(),
        ("GET", ["tunnels", t]) => ok(&with_id("tunnel", t)),
        ("POST", ["tunnels", t, "archive"]) => ok(&archived("tunnel", t)),
        ("POST", ["tunnels", t, "reveal_token" | "rotate_token"]) => ok(&json!({
            "type": "tunnel_token",
            "tunnel_id": t,
            "tunnel_token": app.ids.next("tnltok_"),
        })),
        ("POST", ["tunnels", t, "certificates"]) => {
            let mut cert = object(app, "tunnel_certificate", "tcrt_", None);
            cert["tunnel_id"] = json!(t);
            ok(&cert)
        }
        ("GET", ["tunnels", _t, "certificates"]) => page(),
        ("GET", ["tunnels", t, "certificates", c]) => {
            ok(&child("tunnel_certificate", c, "tunnel_id", t))
        }
        ("POST", ["tunnels", t, "certificates", c, "archive"]) => {
            let mut cert = child("tunnel_certificate", c, "tunnel_id", t);
            cert["archived_at"] = json!(now_rfc3339());
            ok(&cert)
        }
        _ => return None,
    };
    Some(reply)
}

/// `work/…` of an existing environment; `None` for paths the queue does not have.
fn work(app: &App, env: &str, m: &str, rest: &[&str]) -> Option<ApiResult> {
    if !app.store().environments.contains_key(env) {
        return Some(Err(ApiError::not_found(format!(
            "environment {env} not found"
        ))));
    }
    let item = |id: &str| {
        json!({
            "id": id,
            "type": "work",
            "environment_id": env,
            "state": "active",
        })
    };
    let reply = match (m, rest) {
        ("GET", ["poll"]) => {
            // A claimed item carries its secret: the worker's per-session token.
            let id = app.ids.next("work_");
            let mut claimed = item(&id);
            claimed["state"] = json!("starting");
            claimed["secret"] = json!({
                "sessions_token": app.ids.next("sk-ant-req-"),
                "api_base_url": "https://api.anthropic.com",
            });
            ok(&claimed)
        }
        ("GET", ["stats"]) => ok(&json!({
            "type": "work_stats",
            "queued": 0,
            "starting": 0,
            "active": 0,
            "stopping": 0,
        })),
        ("GET" | "POST", [w]) => ok(&item(w)),
        ("POST", [_w, "ack"]) => ok(&json!({})),
        ("POST", [w, "heartbeat"]) => ok(&json!({
            "type": "work_heartbeat",
            "work_id": w,
            "last_heartbeat": now_rfc3339(),
        })),
        ("POST", [w, "stop"]) => {
            let mut stopped = item(w);
            stopped["state"] = json!("stopping");
            ok(&stopped)
        }
        _ => return None,
    };
    Some(reply)
}

/// The request's JSON object, if it has one (multipart uploads and empty bodies do not).
fn body(req: &Request) -> Option<Map<String, Value>> {
    body_object(req).ok()
}

/// A new object: fresh id, timestamps, and the body's `name` / `display_name` / `metadata`
/// only (never a secret field of it).
fn object(app: &App, kind: &str, prefix: &str, body: Option<Map<String, Value>>) -> Value {
    let now = now_rfc3339();
    let mut value = json!({
        "id": app.ids.next(prefix),
        "type": kind,
        "created_at": now,
        "updated_at": now,
        "archived_at": Value::Null,
    });
    for field in ["name", "display_name", "metadata"] {
        if let Some(v) = body.as_ref().and_then(|b| b.get(field)) {
            value[field] = v.clone();
        }
    }
    value
}

fn with_id(kind: &str, id: &str) -> Value {
    json!({"id": id, "type": kind, "archived_at": Value::Null})
}

fn child(kind: &str, id: &str, parent_field: &str, parent: &str) -> Value {
    let mut value = with_id(kind, id);
    value[parent_field] = json!(parent);
    value
}

fn archived(kind: &str, id: &str) -> Value {
    let mut value = with_id(kind, id);
    value["archived_at"] = json!(now_rfc3339());
    value
}

fn page() -> ApiResult {
    ok(&json!({"data": [], "next_page": Value::Null}))
}

/// A bearer-like link, unique per call.
fn secret_url(app: &App, what: &str) -> String {
    format!(
        "https://claude.ai/user-profiles/{what}?token={}",
        app.ids.next("uptok_")
    )
}
