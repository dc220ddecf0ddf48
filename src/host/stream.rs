//! The per-request `HttpContext`: the glue that reads the host, asks the core, applies answers.
//!
//! - Request headers → [`gateway::admit`] (authenticate, route, scopes, credential, header
//!   edits) → with tenant isolation on, the ownership gate: ids in the path (and, for
//!   create/update calls, ids referenced in the JSON body, which is also tagged with the
//!   owner) must belong to the caller's tenant; unknown ids are looked up upstream while the
//!   request waits. Refusals answer with the Anthropic error envelope; upstream is untouched.
//! - Response headers → a [`ResponseMeter`] decides what of the body to look at; JSON of owned
//!   resources is buffered (bounded by Envoy's buffer limit) to strip the owner tag and filter
//!   list pages.
//! - Response body → streams are scanned in bounded slices and always `Continue`d, so nothing is
//!   held back; usage goes to metrics and the request's filter state.
//! - Log → request counters and durations.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType, Status};

use super::claims;
use super::credentials::{self, SharedKeys};
use super::lookup;
use super::metrics::Metrics;
use super::now_ms;
use super::store::SharedData;
use crate::accounting;
use crate::audit;
use crate::config::Plan;
use crate::credentials::KeyRing;
use crate::errors::{gateway_request_id, ApiError, ErrorKind};
use crate::gateway::{self, header_value as header, Admitted, RequestHead};
use crate::headers::HeaderEdit;
use crate::limits::{self, Admission, Class, LimitScope};
use crate::metering::{MeterContext, ResponseMeter};
use crate::metrics;
use crate::policy;
use crate::routes::{Action as RouteAction, Family, IdKind, Operation};
use crate::tenancy::{self, LookupResult, Verdict};

/// Filter-state key (single path token) under which each request's usage JSON is stored; an
/// access log prints it with `%FILTER_STATE(wasm.ma_gateway_usage:PLAIN)%`.
const USAGE_PROPERTY: &str = "ma_gateway_usage";

/// Largest piece of a response body copied into the VM at once.
const READ_SLICE_BYTES: usize = 64 * 1024;

/// What a call this stream dispatched is for.
enum Pending {
    /// The session's model was unknown when its stream opened.
    Model(String),
    /// Who owns an id (ownership cache miss).
    Owner(IdKind, String),
}

/// Where the request stands at the ownership gate.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    /// Nothing to check, or checked and let through.
    Open,
    /// Waiting for owner lookups; `ids` are checked again when they are all in.
    AwaitingOwners {
        ids: Vec<(IdKind, String)>,
        retried: bool,
    },
    /// Answered by the gateway.
    Refused,
}

pub struct GatewayStream {
    context_id: u32,
    plan: Option<Rc<Plan>>,
    metrics: Rc<RefCell<Metrics>>,
    admitted: Option<Admitted>,
    started_ms: u64,
    status: u32,
    gate: Gate,
    /// The (small) JSON body of a create/update call is still to be checked and tagged.
    body_pending: bool,
    /// A `POST …/events` body whose event types the audit record lists.
    events_pending: bool,
    /// Rate-limit headers of an admitted call, added to its response.
    rate_headers: Vec<(String, String)>,
    /// Concurrent-stream slots this request holds (closed in `on_log`).
    stream_slots: Vec<String>,
    /// Envoy's `x-request-id` of this request, for the `request_id` of gateway answers.
    envoy_request_id: Option<String>,
    pending: HashMap<u32, Pending>,
    meter: Option<ResponseMeter>,
    /// The response is JSON of owned resources: buffered, tag stripped, list filtered.
    rewrite_response: bool,
    stream_open: bool,
    first_event_recorded: bool,
}

impl GatewayStream {
    pub fn new(context_id: u32, plan: Option<Rc<Plan>>, metrics: Rc<RefCell<Metrics>>) -> Self {
        GatewayStream {
            context_id,
            plan,
            metrics,
            admitted: None,
            started_ms: now_ms(),
            status: 0,
            gate: Gate::Open,
            body_pending: false,
            events_pending: false,
            rate_headers: Vec::new(),
            stream_slots: Vec::new(),
            envoy_request_id: None,
            pending: HashMap::new(),
            meter: None,
            rewrite_response: false,
            stream_open: false,
            first_event_recorded: false,
        }
    }

    /// Answers the client with the Anthropic error envelope; upstream is never contacted.
    fn refuse(&mut self, error: &ApiError) -> Action {
        self.refuse_with(error, Vec::new())
    }

    /// [`Self::refuse`] with extra response headers (`retry-after` on a 429, …); an extra
    /// `x-should-retry` replaces the default.
    fn refuse_with(&mut self, error: &ApiError, extra: Vec<(String, String)>) -> Action {
        // Envoy's x-request-id, captured with the request headers (they cannot be read from
        // later callbacks: the SDK's getter panics when the host refuses).
        let request_id = gateway_request_id(self.envoy_request_id.as_deref());
        let body = error.envelope(&request_id);
        // Only rate limits are worth an automatic SDK retry; everything else needs a human.
        let retry = if error.kind == ErrorKind::RateLimit {
            "true"
        } else {
            "false"
        };
        let mut reply: Vec<(&str, &str)> = vec![
            ("content-type", "application/json"),
            ("request-id", request_id.as_str()),
        ];
        if !extra.iter().any(|(n, _)| n == "x-should-retry") {
            reply.push(("x-should-retry", retry));
        }
        reply.extend(extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        self.status = error.status();
        self.gate = Gate::Refused;
        self.audit(vec![
            ("decision", "refused".to_string()),
            ("reason", format!("{}: {}", error.reason, error.message)),
        ]);
        self.metrics
            .borrow_mut()
            .add(&metrics::REFUSALS, &[error.kind.wire_name()], 1);
        log::info!(
            "#{} refused {}: {}",
            self.context_id,
            error.status(),
            error.message
        );
        if let Err(status) = hostcalls::send_http_response(error.status(), reply, Some(&body)) {
            log::error!(
                "#{} cannot send the {} reply: {status:?}",
                self.context_id,
                error.status()
            );
        }
        Action::Pause
    }

    /// Stores audit fields as filter state for the audit access log.
    fn audit(&self, fields: Vec<(&'static str, String)>) {
        for (name, value) in fields {
            let key = format!("{}{name}", audit::PROPERTY_PREFIX);
            if let Err(status) = hostcalls::set_property(vec![key.as_str()], Some(value.as_bytes()))
            {
                log::debug!(
                    "#{} cannot set audit field {name}: {status:?}",
                    self.context_id
                );
            }
        }
    }

    fn apply(edits: &[HeaderEdit]) -> Result<(), Status> {
        for edit in edits {
            match edit {
                HeaderEdit::Remove(name) => {
                    hostcalls::remove_map_value(MapType::HttpRequestHeaders, name)?
                }
                HeaderEdit::Set(name, value) => {
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))?
                }
            }
        }
        Ok(())
    }

    /// The ownership gate for `ids`: `Continue` when every id is the caller's tenant's, a
    /// refusal, or `Pause` while unknown owners are looked up upstream.
    fn check_owners(&mut self, ids: Vec<(IdKind, String)>, retried: bool) -> Action {
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
    fn on_owner_answer(&mut self, kind: IdKind, id: &str, body_size: usize) {
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
        if self.check_owners(ids, true) == Action::Continue {
            if let Err(status) = hostcalls::resume_http_request() {
                log::error!("#{} cannot resume the request: {status:?}", self.context_id);
            }
        }
    }

    /// Collects a (small) `POST …/events` body to record the event types sent; a body over the
    /// inspection cap is let through unread (the audit says so) rather than refused.
    fn audit_events(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let cap = self.plan.as_ref().map_or(0, |p| p.isolation.max_body_bytes);
        if body_size > cap {
            self.events_pending = false;
            self.audit(vec![(
                "events",
                "unread (body over the inspection cap)".to_string(),
            )]);
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.events_pending = false;
        let types = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(body) => audit::event_types(&body.unwrap_or_default()),
            Err(_) => "unread".to_string(),
        };
        self.audit(vec![("events", types)]);
        Action::Continue
    }

    /// Whether the request body must be read before anything of it goes upstream: owned
    /// create/update calls under isolation (references, tagging), calls a tenant policy
    /// applies to, and session creates under a money budget (clamping).
    fn needs_body(plan: &Plan, tenant: &str, op: &Operation) -> bool {
        let owned_write = matches!(
            op.family,
            Family::Agents | Family::Sessions | Family::Environments | Family::Vaults
        ) && matches!(op.action, RouteAction::Create | RouteAction::Update);
        let policed = plan.policy.for_tenant(tenant).is_some()
            && (owned_write
                || (op.family == Family::VaultCredentials
                    && matches!(op.action, RouteAction::Create | RouteAction::Update)));
        let clamped = op.family == Family::Sessions
            && op.action == RouteAction::Create
            && plan.limits.budgets.for_tenant(tenant).is_some();
        (plan.isolation.enabled && owned_write) || policed || clamped
    }

    /// Policy, budget clamp and owner tag applied to a whole request body: the body to
    /// forward and whether it changed, or the refusal.
    fn inspect_body(
        plan: &Plan,
        tenant: &str,
        op: &Operation,
        body: Vec<u8>,
    ) -> Result<(Vec<u8>, bool), ApiError> {
        policy::check_body_size(&plan.policy, tenant, body.len() as u64)?;
        let mut body = body;
        let mut changed = false;
        let policed = plan.policy.for_tenant(tenant).is_some();
        let clamp = op.family == Family::Sessions && op.action == RouteAction::Create;
        if policed || clamp {
            let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("request body is not valid JSON: {e}"),
                )
            })?;
            if policed {
                policy::check(&plan.policy, tenant, op, &value).map_err(|e| e.because("policy"))?;
            }
            if clamp {
                let remaining = limits::remaining_microdollars(
                    &SharedData,
                    &plan.limits.budgets,
                    tenant,
                    now_ms() / 1000,
                );
                if let Some(remaining) = remaining {
                    if policy::clamp_session_budget(&mut value, remaining) {
                        body = serde_json::to_vec(&value).map_err(|e| {
                            ApiError::new(
                                ErrorKind::Api,
                                format!("gateway could not rewrite the body: {e}"),
                            )
                        })?;
                        changed = true;
                    }
                }
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

    /// Request rates (tenant and principal), concurrent streams and budgets for new work.
    /// Limits are accounting: if shared data fails they fail open (logged), unlike
    /// authentication and isolation, which fail closed.
    fn enforce_limits(&mut self, plan: &Plan, admitted: &Admitted) -> Option<Action> {
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
    fn charge_budgets(&mut self) {
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

    /// Whether a 2xx response of `op` is JSON the gateway rewrites (tag stripped, list filtered).
    fn rewrites(op: &Operation) -> bool {
        matches!(
            op.family,
            Family::Agents
                | Family::AgentVersions
                | Family::Sessions
                | Family::Environments
                | Family::Vaults
                | Family::VaultCredentials
        ) && op.action != RouteAction::Stream
    }

    /// Feeds `body_size` bytes of the response body to the meter, in bounded slices, and
    /// emits what it found (metrics, filter state, session affinity on create).
    fn meter_body(&mut self, buffer: BufferType, body_size: usize, end_of_stream: bool) {
        let (Some(meter), Some(plan)) = (self.meter.as_mut(), self.plan.as_ref()) else {
            return;
        };
        let ctx = MeterContext {
            store: &SharedData,
            prices: &plan.metering.prices,
            limits: &plan.metering.limits,
            now_secs: now_ms() / 1000,
            scanner: plan.metering.scanner,
        };
        // Copy the chunk into the VM in bounded slices: Envoy may hand over a megabyte at
        // once, and the VM's memory (which never shrinks) must not follow the chunk size.
        let mut emissions = Vec::new();
        let mut offset = 0;
        loop {
            let len = (body_size - offset).min(READ_SLICE_BYTES);
            let slice = if len == 0 {
                Vec::new()
            } else {
                match hostcalls::get_buffer(buffer, offset, len) {
                    Ok(bytes) => bytes.unwrap_or_default(),
                    Err(status) => {
                        log::warn!("#{} cannot read response body: {status:?}", self.context_id);
                        return;
                    }
                }
            };
            offset += len;
            let last = offset >= body_size;
            emissions.extend(meter.on_body(&slice, end_of_stream && last, &ctx));
            if last {
                break;
            }
        }
        if let (Some(admitted), Some(session_id)) = (&self.admitted, &meter.usage.session_id) {
            let created = admitted.operation.family == Family::Sessions
                && admitted.operation.action == RouteAction::Create;
            if created && end_of_stream && self.status == 200 {
                credentials::remember_affinity(session_id, &admitted.credential);
            }
        }
        let first_event = meter.first_event_seen && !self.first_event_recorded && self.stream_open;
        let usage = (!emissions.is_empty() && meter.has_usage()).then(|| meter.usage.to_json());
        if first_event {
            self.first_event_recorded = true;
            let waited = now_ms().saturating_sub(self.started_ms);
            self.metrics
                .borrow_mut()
                .record(&metrics::FIRST_EVENT, &[], waited);
        }
        if let Some(json) = usage {
            if let Err(status) = hostcalls::set_property(vec![USAGE_PROPERTY], Some(&json)) {
                log::debug!("#{} cannot set filter state: {status:?}", self.context_id);
            }
        }
        self.metrics.borrow_mut().apply(emissions);
    }

    /// The whole buffered JSON response of an owned resource: tag stripped, list filtered.
    fn rewrite_owned_response(&mut self, body_size: usize) -> Action {
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

impl Context for GatewayStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        match self.pending.remove(&token_id) {
            Some(Pending::Owner(kind, id)) => self.on_owner_answer(kind, &id, body_size),
            Some(Pending::Model(session_id)) => {
                let (Some(plan), Some(admitted)) = (&self.plan, &self.admitted) else {
                    return;
                };
                let tenant = admitted.principal.tenant.clone();
                lookup::on_response(
                    plan,
                    &mut self.metrics.borrow_mut(),
                    &session_id,
                    &tenant,
                    body_size,
                    now_ms() / 1000,
                );
            }
            None => {}
        }
    }
}

impl HttpContext for GatewayStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = match hostcalls::get_map(MapType::HttpRequestHeaders) {
            Ok(headers) => headers,
            Err(status) => {
                log::error!(
                    "#{} cannot read request headers: {status:?}",
                    self.context_id
                );
                return self.refuse(&ApiError::new(
                    ErrorKind::Api,
                    "gateway could not read the request",
                ));
            }
        };
        self.envoy_request_id = header(&headers, "x-request-id").map(str::to_string);
        let Some(plan) = self.plan.clone() else {
            return self.refuse(&ApiError::new(ErrorKind::Api, "gateway is not configured"));
        };
        let head = RequestHead {
            method: header(&headers, ":method").unwrap_or(""),
            path: header(&headers, ":path").unwrap_or(""),
            headers: &headers,
        };
        let jwt = plan.jwt.as_ref().and_then(claims::verified_claims);
        let admitted = match gateway::admit(&plan, &head, &SharedKeys, jwt, now_ms() / 1000) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                self.audit(audit::decision_fields(
                    &plan.audit,
                    refusal.principal.as_ref(),
                    refusal.operation.as_ref(),
                    Some(&refusal.error),
                ));
                return self.refuse(&refusal.error);
            }
        };
        self.audit(audit::decision_fields(
            &plan.audit,
            Some(&admitted.principal),
            Some(&admitted.operation),
            None,
        ));
        if let Err(status) = Self::apply(&admitted.edits) {
            log::error!(
                "#{} cannot rewrite request headers: {status:?}",
                self.context_id
            );
            return self.refuse(&ApiError::new(
                ErrorKind::Api,
                "gateway could not prepare the request",
            ));
        }
        log::debug!(
            "#{} {}/{} {}.{} admitted",
            self.context_id,
            admitted.principal.tenant,
            admitted.principal.name,
            admitted.operation.family.as_str(),
            admitted.operation.action.as_str()
        );
        let op = admitted.operation.clone();
        let tenant = admitted.principal.tenant.clone();
        // Descriptors for Envoy's global rate-limit filter (fleet-scale limits): always set by
        // the gateway, so a client can never supply them; envoy.yaml removes them before
        // the request goes upstream.
        for (name, value) in [
            (limits::TENANT_HEADER, tenant.as_str()),
            (limits::CLASS_HEADER, limits::class_of(&op).as_str()),
        ] {
            if let Err(status) =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            {
                log::warn!("#{} cannot set {name}: {status:?}", self.context_id);
            }
        }
        if let Some(action) = self.enforce_limits(&plan, &admitted) {
            return action;
        }
        self.admitted = Some(admitted);
        if op.action == RouteAction::SendEvents && !end_of_stream {
            // Which event types were sent (never their content) goes to the audit record.
            self.events_pending = true;
        }
        if Self::needs_body(&plan, &tenant, &op) {
            if end_of_stream && op.action == RouteAction::Create {
                return self.refuse(&ApiError::new(
                    ErrorKind::InvalidRequest,
                    "a JSON body is required",
                ));
            }
            if !end_of_stream {
                // The body is checked (policy, references), clamped (budget) and tagged
                // (owner) before any of it goes upstream; its length changes. (proxy-wasm
                // cannot see a body while the headers are held, so the head may already be on
                // its way: a refused call is reset before its body.)
                if let Err(status) =
                    hostcalls::remove_map_value(MapType::HttpRequestHeaders, "content-length")
                {
                    log::warn!(
                        "#{} cannot drop content-length: {status:?}",
                        self.context_id
                    );
                }
                self.body_pending = true;
            }
        }
        if !plan.isolation.enabled {
            return Action::Continue;
        }
        self.check_owners(op.ids, false)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.gate != Gate::Open {
            return Action::Pause;
        }
        if self.events_pending {
            return self.audit_events(body_size, end_of_stream);
        }
        if !self.body_pending {
            return Action::Continue;
        }
        let (Some(plan), Some(admitted)) = (self.plan.clone(), self.admitted.as_ref()) else {
            return Action::Continue;
        };
        if body_size > plan.isolation.max_body_bytes {
            let limit = plan.isolation.max_body_bytes;
            return self.refuse(&ApiError::new(
                ErrorKind::RequestTooLarge,
                format!("request body exceeds the gateway's {limit}-byte limit for this call"),
            ));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.body_pending = false;
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!(
                    "#{} cannot read the request body: {status:?}",
                    self.context_id
                );
                return self.refuse(&ApiError::new(
                    ErrorKind::Api,
                    "gateway could not read the request",
                ));
            }
        };
        let op = admitted.operation.clone();
        let tenant = admitted.principal.tenant.clone();
        let (body, changed) = match Self::inspect_body(&plan, &tenant, &op, body) {
            Ok(inspected) => inspected,
            Err(error) => return self.refuse(&error),
        };
        if changed {
            if let Err(status) =
                hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &body)
            {
                log::error!(
                    "#{} cannot replace the request body: {status:?}",
                    self.context_id
                );
                return self.refuse(&ApiError::new(
                    ErrorKind::Api,
                    "gateway could not prepare the request",
                ));
            }
        }
        if !plan.isolation.enabled {
            return Action::Continue;
        }
        let references = serde_json::from_slice(&body)
            .map(|value| tenancy::body_references(&op, &value))
            .unwrap_or_default();
        // Path ids were checked with the headers; the body adds its references.
        match self.check_owners(references, false) {
            Action::Continue => Action::Continue,
            // Keep the (rewritten) body buffered until the owners are known.
            _ => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (Some(admitted), Some(plan)) = (&self.admitted, &self.plan) else {
            // Our own refusal passing back through the chain: nothing to meter.
            return Action::Continue;
        };
        if self.gate == Gate::Refused {
            return Action::Continue;
        }
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        self.status = status;
        for (name, value) in &self.rate_headers {
            if let Err(status) = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value)
            {
                log::debug!("#{} cannot add {name}: {status:?}", self.context_id);
            }
        }
        let meter = ResponseMeter::new(
            &admitted.operation,
            status,
            &admitted.principal.tenant,
            plan.metering.scanner,
        );
        if meter.is_stream() {
            self.stream_open = true;
            self.metrics
                .borrow_mut()
                .add(&metrics::ACTIVE_STREAMS, &[], 1);
            // Spans carry no model: if this session's model was never learned (created before
            // this gateway, or on another replica), look it up with the injected credential.
            if let Some(session_id) = admitted.operation.id(IdKind::Session) {
                let known = accounting::summary(&SharedData, session_id)
                    .ok()
                    .flatten()
                    .and_then(|s| s.model)
                    .is_some();
                if !known {
                    if let Some(token) = lookup::dispatch(plan, session_id) {
                        self.pending
                            .insert(token, Pending::Model(session_id.to_string()));
                    }
                }
            }
        }
        self.rewrite_response = plan.isolation.enabled
            && (200..300).contains(&status)
            && !end_of_stream
            && Self::rewrites(&admitted.operation);
        self.meter = meter.wants_body().then_some(meter);
        if self.rewrite_response {
            // The body will change length. (The headers cannot be held: proxy-wasm would stop
            // the body too; the body is buffered and rewritten in the body callback.)
            if let Err(status) =
                hostcalls::remove_map_value(MapType::HttpResponseHeaders, "content-length")
            {
                log::warn!(
                    "#{} cannot drop content-length: {status:?}",
                    self.context_id
                );
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.rewrite_response {
            if !end_of_stream {
                return Action::Pause;
            }
            self.meter_body(BufferType::HttpResponseBody, body_size, true);
            self.charge_budgets();
            return self.rewrite_owned_response(body_size);
        }
        self.meter_body(BufferType::HttpResponseBody, body_size, end_of_stream);
        self.charge_budgets();
        // Never hold the body back: streams flow as they arrive.
        Action::Continue
    }

    fn on_log(&mut self) {
        let (family, action) = match &self.admitted {
            Some(admitted) => (
                admitted.operation.family.as_str(),
                admitted.operation.action.as_str(),
            ),
            None => ("unrouted", "none"),
        };
        for key in std::mem::take(&mut self.stream_slots) {
            if let Err(err) = limits::close_stream(&SharedData, &key) {
                log::warn!("#{} stream slot {key} not released: {err}", self.context_id);
            }
        }
        let elapsed = now_ms().saturating_sub(self.started_ms);
        let mut metrics = self.metrics.borrow_mut();
        metrics.add(
            &metrics::REQUESTS,
            &[family, action, metrics::status_class(self.status)],
            1,
        );
        if self.stream_open {
            metrics.add(&metrics::ACTIVE_STREAMS, &[], -1);
            metrics.record(&metrics::STREAM_DURATION, &[], elapsed);
        } else if self.admitted.is_some() {
            metrics.record(&metrics::OPERATION_DURATION, &[family], elapsed);
        }
        metrics.record(&metrics::VM_MEMORY, &[], wasm_memory_bytes());
    }
}

/// Size of this VM's linear memory (it only grows; flat means nothing accumulated).
fn wasm_memory_bytes() -> u64 {
    (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
}
