//! The gateway's own `GET /v1/sessions/{id}` calls (reconciler ticks, unknown models on a
//! stream): dispatched to the upstream cluster with the key from shared data, answered into
//! the same metering as client traffic.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use super::credentials::SharedKeys;
use super::metrics::Metrics;
use super::store::SharedData;
use crate::config::Plan;
use crate::credentials::{choose, KeyRing};
use crate::limits;
use crate::metering::{MeterContext, ResponseMeter};
use crate::reconcile;

/// Upper bound on one lookup; a slow upstream must not pile calls up behind the timer.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends the session lookup; `None` (logged) when there is no credential or the host refuses.
pub fn dispatch(plan: &Plan, session_id: &str) -> Option<u32> {
    let credential = SharedKeys.key(&credential_for_session(plan, session_id))?;
    dispatch_get(plan, &format!("/v1/sessions/{session_id}"), &credential)
}

/// Sends `GET <path>` upstream with the given key (ownership lookups use the caller's).
pub fn dispatch_get(plan: &Plan, path: &str, credential: &str) -> Option<u32> {
    let headers = reconcile::get_request(plan, path, credential);
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match hostcalls::dispatch_http_call(
        &plan.upstream.cluster,
        headers,
        None,
        vec![],
        LOOKUP_TIMEOUT,
    ) {
        Ok(token) => Some(token),
        Err(status) => {
            log::warn!(
                "lookup GET {path} via cluster {} not sent: {status:?}",
                plan.upstream.cluster
            );
            None
        }
    }
}

/// The credential a lookup of `session_id` uses: the session's own (affinity), else the
/// tenant's its usage is attributed to.
fn credential_for_session(plan: &Plan, session_id: &str) -> String {
    let affinity = SharedKeys.affinity(session_id);
    let tenant = reconcile::tenant_of(&SharedData, session_id).unwrap_or_default();
    choose(plan.tenant_credential(&tenant), affinity.as_deref()).to_string()
}

/// Status and body of a call's answer (call from `on_http_call_response`).
pub fn response(body_size: usize) -> (u32, Vec<u8>) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0);
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

/// Meters the answer of a lookup (call from `on_http_call_response`).
pub fn on_response(
    plan: &Plan,
    metrics: &mut Metrics,
    session_id: &str,
    tenant: &str,
    body_size: usize,
    now_secs: u64,
) {
    let (status, body) = response(body_size);
    if status != 200 {
        log::info!("session lookup of {session_id} answered {status}");
    }
    let mut meter = ResponseMeter::for_session_lookup(session_id, status, tenant);
    let ctx = MeterContext {
        store: &SharedData,
        prices: &plan.metering.prices,
        limits: &plan.metering.limits,
        now_secs,
        scanner: plan.metering.scanner,
    };
    metrics.apply(meter.on_body(&body, true, &ctx));
    let refund = meter.take_refund();
    if let Err(err) = limits::refund_session(
        &SharedData,
        tenant,
        Some(session_id),
        refund,
        super::now_ms(),
    ) {
        log::warn!("budget of {tenant} not refunded: {err}");
    }
    let spend = meter.take_spend();
    if let Err(err) = limits::charge_session(
        &SharedData,
        tenant,
        Some(session_id),
        spend.tokens,
        spend.microdollars,
        super::now_ms(),
    ) {
        log::warn!("budget of {tenant} not charged: {err}");
    }
}
