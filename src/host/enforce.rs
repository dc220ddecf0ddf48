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
use crate::routes::{Action as RouteAction, Family};

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
                    match limits::open_stream(&SharedData, &key, max) {
                        Ok(true) => self.stream_slots.push(key),
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
        if let Err(err) = limits::charge(
            &SharedData,
            tenant,
            spend.tokens,
            spend.microdollars,
            now_ms() / 1000,
        ) {
            log::warn!("#{} budget of {tenant} not charged: {err}", self.context_id);
        }
    }
}
