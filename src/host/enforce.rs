//! Request rates, concurrent streams and budgets for one stream: the decisions are
//! [`crate::limits`]'s over shared data; this file applies them (429s with their headers,
//! stream slots released in `on_log`, metered spend charged to the tenant's budgets).

use proxy_wasm::types::Action;

use super::now_ms;
use super::store::SharedData;
use super::stream::GatewayStream;
use crate::config::Plan;
use crate::gateway::Admitted;
use crate::limits::{self, Admission, Class, LimitScope};
use crate::routes::{Action as RouteAction, Family, IdKind};

impl GatewayStream {
    /// Request rates (tenant and principal), concurrent streams and budgets for new work.
    /// Limits are accounting: if shared data fails they fail open (logged), unlike
    /// authentication and isolation, which fail closed.
    pub(super) fn enforce_limits(&mut self, plan: &Plan, admitted: &Admitted) -> Option<Action> {
        let op = &admitted.operation;
        let tenant = admitted.principal.tenant.as_str();
        let principal = format!("{tenant}/{}", admitted.principal.name);
        let class = limits::class_of(op);
        let now = now_ms();
        for (scope, name) in [
            (LimitScope::Tenant, tenant),
            (LimitScope::Principal, principal.as_str()),
        ] {
            if let Some(rate) = plan.limits.rate(scope, tenant, class) {
                match limits::admit(
                    &SharedData,
                    &rate,
                    &limits::bucket_key(scope, name, class),
                    now,
                ) {
                    Ok(Admission::Denied {
                        retry_after_ms,
                        limit,
                    }) => {
                        let (error, headers) = limits::rate_limited(class, retry_after_ms, limit);
                        return Some(self.refuse_with(&error, headers));
                    }
                    Ok(allowed) => self.rate_headers = allowed.headers(),
                    Err(err) => log::warn!("#{} rate limit not applied: {err}", self.context_id),
                }
            }
            if class == Class::Stream {
                if let Some(max) = plan.limits.max_streams(scope, tenant) {
                    let key = limits::streams_key(scope, name);
                    if self.slot_holder.is_empty() {
                        self.slot_holder = unique_holder("stream", self.context_id);
                    }
                    let lease = plan.limits.stream_lease_ms();
                    match limits::open_stream(&SharedData, &key, max, &self.slot_holder, now, lease)
                    {
                        Ok(true) => {
                            self.stream_slots.push(key);
                            self.slots_renewed_ms = now;
                        }
                        Ok(false) => {
                            let (error, headers) = limits::too_many_streams(max);
                            return Some(self.refuse_with(&error, headers));
                        }
                        Err(err) => {
                            log::warn!("#{} stream limit not applied: {err}", self.context_id)
                        }
                    }
                }
            }
        }
        let new_work = matches!(
            (op.family, op.action),
            (Family::Sessions, RouteAction::Create) | (_, RouteAction::SendEvents)
        );
        if new_work {
            if let Err(exhausted) =
                limits::check_budget(&SharedData, &plan.limits.budgets, tenant, now / 1000)
            {
                let (error, headers) = exhausted.to_error();
                return Some(self.refuse_with(&error.because("budget"), headers));
            }
        }
        None
    }

    /// Renews the leases of the stream slots this request holds, at most every third of the
    /// lease, as its response body flows: a stream whose VM died stops renewing and its slots
    /// free themselves when the lease runs out (see [`limits::open_stream`]).
    pub(super) fn renew_stream_slots(&mut self) {
        if self.stream_slots.is_empty() {
            return;
        }
        let Some(lease) = self.plan.as_ref().map(|p| p.limits.stream_lease_ms()) else {
            return;
        };
        let now = now_ms();
        if now.saturating_sub(self.slots_renewed_ms) < lease / 3 {
            return;
        }
        self.slots_renewed_ms = now;
        for key in &self.stream_slots {
            if let Err(err) = limits::renew_stream(&SharedData, key, &self.slot_holder, now, lease)
            {
                log::warn!("#{} stream slot {key} not renewed: {err}", self.context_id);
            }
        }
    }

    /// Gives back the stream slots this request holds (from `on_log`).
    pub(super) fn close_stream_slots(&mut self) {
        let now = now_ms();
        for key in std::mem::take(&mut self.stream_slots) {
            if let Err(err) = limits::close_stream(&SharedData, &key, &self.slot_holder, now) {
                log::warn!("#{} stream slot {key} not released: {err}", self.context_id);
            }
        }
    }

    /// Settles the session budget this request reserved, when it ends: a create that answered
    /// 2xx with a session binds it to the session (one whose session id could not be read
    /// keeps it until its pending lease ends); a failed create releases it; a failed
    /// update puts the session's previous one back. A session archived or deleted gives its
    /// reservation back.
    pub(super) fn settle_reservation(&mut self) {
        let Some(admitted) = self.admitted.as_ref() else {
            return;
        };
        let tenant = admitted.principal.tenant.as_str();
        let now = now_ms();
        let ok = (200..300).contains(&self.status);
        let op = &admitted.operation;
        let result = match self.reservation.take() {
            Some(held) if held.create => {
                let session = self.meter.as_ref().and_then(|m| m.usage.session_id.clone());
                match session {
                    Some(session) if ok => {
                        limits::bind_reservation(&SharedData, tenant, &held.holder, &session, now)
                    }
                    // Created, but the answer did not say which session: the reservation
                    // stays until its lease ends rather than be given back early.
                    None if ok => Ok(()),
                    _ => limits::release_reservation(&SharedData, tenant, &held.holder, now),
                }
            }
            Some(held) if !ok => limits::restore_reservation(
                &SharedData,
                tenant,
                &held.holder,
                held.previous.as_ref(),
                now,
            ),
            Some(_) => Ok(()),
            None => match (op.family, op.action, op.id(IdKind::Session)) {
                (Family::Sessions, RouteAction::Archive | RouteAction::Delete, Some(id)) if ok => {
                    limits::release_reservation(&SharedData, tenant, id, now)
                }
                _ => Ok(()),
            },
        };
        if let Err(err) = result {
            log::warn!(
                "#{} session budget reservation of {tenant} not settled: {err}",
                self.context_id
            );
        }
    }

    /// Adds what a response metered to the tenant's budgets.
    pub(super) fn charge_budgets(&mut self) {
        let (Some(meter), Some(admitted)) = (self.meter.as_mut(), self.admitted.as_ref()) else {
            return;
        };
        let spend = meter.take_spend();
        if spend.tokens == 0 && spend.microdollars == 0 {
            return;
        }
        let tenant = admitted.principal.tenant.as_str();
        if let Err(err) = limits::charge_session(
            &SharedData,
            tenant,
            meter.usage.session_id.as_deref(),
            spend.tokens,
            spend.microdollars,
            now_ms(),
        ) {
            log::warn!("#{} budget of {tenant} not charged: {err}", self.context_id);
        }
    }
}

/// A name for what this request holds in shared data (stream slots, a pending session
/// budget), unique across the workers of the process: the host clock in nanoseconds and the
/// context id (ids repeat across workers, not within one).
pub(super) fn unique_holder(what: &str, context_id: u32) -> String {
    let nanos = proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{what}.{nanos:x}.{context_id:x}")
}
