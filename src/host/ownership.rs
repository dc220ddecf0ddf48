//! The ownership gate and request-body inspection of a stream (tenant isolation, policy,
//! budget clamp), and the rewriting of owned-resource responses (owner tag stripped, list pages
//! filtered). Decisions are [`crate::tenancy`]'s and [`crate::policy`]'s; this file only moves
//! bytes between them and the host.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType};

use super::credentials::SharedKeys;
use super::lookup;
use super::now_ms;
use super::store::SharedData;
use super::stream::{Gate, GatewayStream, Pending};
use crate::config::Plan;
use crate::credentials::KeyRing;
use crate::errors::{gateway_request_id, ApiError, ErrorKind};
use crate::limits;
use crate::metrics;
use crate::policy;
use crate::routes::{Action as RouteAction, Family, IdKind, Operation};
use crate::tenancy::{self, LookupResult, Verdict};

impl GatewayStream {
    /// The ownership gate for `ids`: `Continue` when every id is the caller's tenant's, a
    /// refusal, or `Pause` while unknown owners are looked up upstream.
    pub(super) fn check_owners(&mut self, ids: Vec<(IdKind, String)>, retried: bool) -> Action {
        let (Some(plan), Some(admitted)) = (self.plan.clone(), self.admitted.as_ref()) else {
            return Action::Continue;
        };
        let ownership = plan.isolation.ownership();
        match tenancy::check(&SharedData, &ownership, &admitted.principal.tenant, &ids) {
            Verdict::Allow => {
                self.gate = Gate::Open;
                Action::Continue
            }
            Verdict::Deny(error) => self.refuse(&error),
            Verdict::Lookup(_) if retried => {
                // Owners were just fetched but could not be cached: fail closed.
                self.refuse(&ApiError::new(
                    ErrorKind::Unavailable,
                    "ownership could not be verified; nothing was forwarded",
                ))
            }
            Verdict::Lookup(unknown) => {
                let Some(key) = SharedKeys.key(&admitted.credential) else {
                    return self.refuse(&ApiError::new(
                        ErrorKind::Unavailable,
                        "ownership could not be verified; nothing was forwarded",
                    ));
                };
                for (kind, id) in unknown {
                    let token = tenancy::lookup_path(kind, &id)
                        .and_then(|path| lookup::dispatch_get(&plan, &path, &key));
                    match token {
                        Some(token) => {
                            self.pending.insert(token, Pending::Owner(kind, id));
                        }
                        None => {
                            return self.refuse(&ApiError::new(
                                ErrorKind::Unavailable,
                                "ownership could not be verified; nothing was forwarded",
                            ));
                        }
                    }
                }
                self.gate = Gate::AwaitingOwners { ids, retried };
                Action::Pause
            }
        }
    }

    /// One owner lookup answered: cache it, and once all are in, decide.
    pub(super) fn on_owner_answer(&mut self, kind: IdKind, id: &str, body_size: usize) {
        let Some(plan) = self.plan.clone() else {
            return;
        };
        if self.gate == Gate::Refused {
            return;
        }
        let (status, body) = lookup::response(body_size);
        match tenancy::owner_from_lookup(status, &body, &plan.isolation.tag_key) {
            LookupResult::Owner(owner) => {
                if let Err(err) = tenancy::remember_owner(&SharedData, id, owner) {
                    log::warn!("#{} owner of {id} not cached: {err}", self.context_id);
                }
            }
            LookupResult::Missing => {
                self.refuse(&tenancy::not_found(kind, id));
                return;
            }
            LookupResult::Failed => {
                log::warn!(
                    "#{} ownership lookup of {id} answered {status}",
                    self.context_id
                );
                self.refuse(&ApiError::new(
                    ErrorKind::Unavailable,
                    "ownership could not be verified; nothing was forwarded",
                ));
                return;
            }
        }
        let owners_pending = self
            .pending
            .values()
            .any(|p| matches!(p, Pending::Owner(..)));
        if owners_pending {
            return;
        }
        let Gate::AwaitingOwners { ids, .. } = std::mem::replace(&mut self.gate, Gate::Open) else {
            return;
        };
        if self.check_owners(ids, true) != Action::Continue {
            return;
        }
        // The owners are the caller's: go on with whatever has arrived meanwhile. The body may
        // be complete (read and decided now) or still coming. With the head held, Envoy keeps
        // delivering it and the last body callback lets the request go; without
        // (`hold_request_head: false`), Envoy holds the body with the head, so resume to have
        // it delivered to the body callback.
        let resume = match self.advance() {
            Action::Continue => true,
            _ => {
                self.gate == Gate::Open && !self.body_complete && !plan.isolation.hold_request_head
            }
        };
        if resume {
            if let Err(status) = hostcalls::resume_http_request() {
                log::error!("#{} cannot resume the request: {status:?}", self.context_id);
            }
        }
    }

    /// Whether the request body must be read before anything of it goes upstream: owned
    /// create/update calls under isolation (references, tagging), calls a tenant policy
    /// applies to, and session creates and updates under a money budget (clamping: an update
    /// can replace or remove the budget set at create).
    pub(super) fn needs_body(plan: &Plan, tenant: &str, op: &Operation) -> bool {
        let owned_write = matches!(
            op.family,
            Family::Agents | Family::Sessions | Family::Environments | Family::Vaults
        ) && matches!(op.action, RouteAction::Create | RouteAction::Update);
        let policed = plan.policy.for_tenant(tenant).is_some()
            && (owned_write
                || (op.family == Family::VaultCredentials
                    && matches!(op.action, RouteAction::Create | RouteAction::Update)));
        let clamped = op.family == Family::Sessions
            && matches!(op.action, RouteAction::Create | RouteAction::Update)
            && has_money_budget(plan, tenant);
        // Deployments (an opt-in neighbour): policy (schedule, agent overrides) and the
        // budget every fired session copies.
        let deployment = op.family == Family::Deployments
            && matches!(op.action, RouteAction::Create | RouteAction::Update)
            && (plan.policy.for_tenant(tenant).is_some() || has_money_budget(plan, tenant));
        (plan.isolation.enabled && owned_write) || policed || clamped || deployment
    }

    /// Policy, budget clamp and owner tag applied to a whole request body: the body to
    /// forward and whether it changed, or the refusal. A session budget granted here is
    /// reserved from the tenant's money (see [`limits::reserve_session_budget`]) and settled
    /// when the call ends (`settle_reservation`).
    pub(super) fn inspect_body(
        &mut self,
        plan: &Plan,
        tenant: &str,
        op: &Operation,
        body: Vec<u8>,
    ) -> Result<(Vec<u8>, bool), ApiError> {
        policy::check_body_size(&plan.policy, tenant, body.len() as u64)?;
        let mut body = body;
        let mut changed = false;
        let policed = plan.policy.for_tenant(tenant).is_some();
        let write = matches!(op.action, RouteAction::Create | RouteAction::Update);
        let money = write && has_money_budget(plan, tenant);
        let clamp = money && op.family == Family::Sessions;
        let clamp_deployment = money && op.family == Family::Deployments;
        if policed || clamp || clamp_deployment {
            let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("request body is not valid JSON: {e}"),
                )
            })?;
            if policed {
                policy::check(&plan.policy, tenant, op, &value).map_err(|e| e.because("policy"))?;
            }
            let clamped = if clamp_deployment {
                clamp_deployment_budget(plan, tenant, op, &mut value)?
            } else {
                clamp && self.clamp_session_budget(plan, tenant, op, &mut value)?
            };
            if clamped {
                body = serde_json::to_vec(&value).map_err(|e| {
                    ApiError::new(
                        ErrorKind::Api,
                        format!("gateway could not rewrite the body: {e}"),
                    )
                })?;
                changed = true;
            }
        }
        if plan.isolation.enabled {
            let ownership = plan.isolation.ownership();
            if let Some(tagged) = tenancy::tag_request_body(op, &body, tenant, &ownership)? {
                body = tagged;
                changed = true;
            }
        }
        Ok((body, changed))
    }

    /// Sets or lowers the `budget` of a session create or update to what the tenant can give
    /// it, reserving that; whether the body changed. A create is refused when everything the
    /// tenant has left is reserved by other sessions; an update may not remove the budget.
    fn clamp_session_budget(
        &mut self,
        plan: &Plan,
        tenant: &str,
        op: &Operation,
        value: &mut serde_json::Value,
    ) -> Result<bool, ApiError> {
        let create = op.action == RouteAction::Create;
        let holder = if create {
            super::enforce::unique_holder("create", self.context_id)
        } else {
            match (value.get("budget"), op.id(IdKind::Session)) {
                // An omitted budget keeps the session's; `null` would remove it.
                (None, _) => return Ok(false),
                (Some(serde_json::Value::Null), _) => {
                    return policy::clamp_session_budget_update(value, 0)
                        .map_err(|e| e.because("budget"))
                }
                (Some(_), Some(id)) => id.to_string(),
                (Some(_), None) => return Ok(false),
            }
        };
        let now = now_ms();
        let wanted = policy::requested_budget_microdollars(value);
        let until = if create {
            now + limits::PENDING_RESERVATION_MS
        } else {
            0
        };
        let budgets = &plan.limits.budgets;
        let granted = match limits::reserve_session_budget(
            &SharedData,
            budgets,
            tenant,
            &holder,
            wanted,
            now,
            until,
        ) {
            Ok(Some(grant)) => {
                self.reservation = Some(super::stream::HeldReservation {
                    holder,
                    previous: grant.previous,
                    create,
                });
                grant.microdollars
            }
            Ok(None) => return Ok(false),
            Err(err) => {
                // Limits fail open (logged): clamp to what is left, unreserved.
                log::warn!("#{} session budget not reserved: {err}", self.context_id);
                let Some(remaining) =
                    limits::remaining_microdollars(&SharedData, budgets, tenant, now / 1000)
                else {
                    return Ok(false);
                };
                remaining
            }
        };
        if create && granted == 0 && wanted != Some(0) {
            return Err(ApiError::new(
                ErrorKind::RateLimit,
                format!(
                    "tenant {tenant} has no cost budget left for a new session: what is left is reserved by its open sessions (archive the ones it no longer needs, or give new sessions a lower budget)"
                ),
            )
            .because("budget"));
        }
        if create {
            Ok(policy::clamp_session_budget(value, granted))
        } else {
            policy::clamp_session_budget_update(value, granted).map_err(|e| e.because("budget"))
        }
    }

    /// Whether a 2xx response of `op` is JSON the gateway buffers and rewrites (see
    /// [`tenancy::rewrites`]).
    pub(super) fn rewrites(op: &Operation) -> bool {
        tenancy::rewrites(op)
    }

    /// The whole buffered JSON response of an owned resource: tag stripped, list filtered.
    pub(super) fn rewrite_owned_response(&mut self, body_size: usize) -> Action {
        let (Some(plan), Some(admitted)) = (self.plan.clone(), self.admitted.as_ref()) else {
            return Action::Continue;
        };
        let body = match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!(
                    "#{} cannot read the response to rewrite: {status:?}",
                    self.context_id
                );
                return self.refuse(&ApiError::new(
                    ErrorKind::Api,
                    "gateway could not read the upstream response",
                ));
            }
        };
        let ownership = plan.isolation.ownership();
        let tenant = admitted.principal.tenant.clone();
        let op = admitted.operation.clone();
        match tenancy::rewrite_response(&op, self.status, &body, &tenant, &ownership, &SharedData) {
            Ok(rewrite) => {
                if let Some(new_body) = rewrite.body {
                    if let Err(status) =
                        hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &new_body)
                    {
                        log::error!(
                            "#{} cannot replace the response body: {status:?}",
                            self.context_id
                        );
                        return self.refuse(&ApiError::new(
                            ErrorKind::Api,
                            "gateway could not prepare the response",
                        ));
                    }
                }
                Action::Continue
            }
            Err(error) => {
                // The status line is already on its way: the body becomes the error envelope
                // (a defence-in-depth path; the request-side gate refuses foreign ids first).
                log::warn!("#{} response withheld: {}", self.context_id, error.message);
                self.metrics
                    .borrow_mut()
                    .add(&metrics::REFUSALS, &[error.kind.wire_name()], 1);
                let envelope = error.envelope(&gateway_request_id(None));
                if let Err(status) =
                    hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &envelope)
                {
                    log::error!(
                        "#{} cannot replace the response body: {status:?}",
                        self.context_id
                    );
                }
                Action::Continue
            }
        }
    }
}

/// Caps a deployment's `budget` (copied to every session it fires, out of the gateway's
/// sight) at what the tenant has left now; nothing is reserved, since the deployment itself
/// spends nothing. Limits fail open: an unreadable remainder leaves the body alone.
fn clamp_deployment_budget(
    plan: &Plan,
    tenant: &str,
    op: &Operation,
    value: &mut serde_json::Value,
) -> Result<bool, ApiError> {
    let create = op.action == RouteAction::Create;
    let Some(remaining) =
        limits::remaining_microdollars(&SharedData, &plan.limits.budgets, tenant, now_ms() / 1000)
    else {
        return Ok(false);
    };
    policy::clamp_deployment_budget(value, remaining, create, tenant)
        .map_err(|e| e.because("budget"))
}

/// Whether `tenant` has a money budget in any window (the session budget clamp applies).
fn has_money_budget(plan: &Plan, tenant: &str) -> bool {
    plan.limits.budgets.for_tenant(tenant).is_some_and(|b| {
        limits::Window::ALL
            .into_iter()
            .any(|w| b.limit(limits::Metric::Microdollars, w).is_some())
    })
}
