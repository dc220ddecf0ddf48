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
//! - Log → request counters and durations, stream slots released.
//!
//! The ownership gate and body inspection live in [`super::ownership`], rate limits, stream
//! caps and budgets in [`super::enforce`]; both extend this context.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType, Status};

use super::claims;
use super::credentials::{self, SharedKeys};
use super::head_hold;
use super::lookup;
use super::metrics::Metrics;
use super::now_ms;
use super::store::SharedData;
use crate::accounting;
use crate::audit;
use crate::config::Plan;
use crate::content_coding;
use crate::errors::{gateway_request_id, ApiError, ErrorKind};
use crate::gateway::{self, header_value as header, Admitted, RequestHead};
use crate::headers::HeaderEdit;
use crate::limits;
use crate::metering::{MeterContext, ResponseMeter};
use crate::metrics;
use crate::routes::{Action as RouteAction, Family, IdKind};
use crate::tenancy;

/// Filter-state key (single path token) under which each request's usage JSON is stored; an
/// access log prints it with `%FILTER_STATE(wasm.ma_gateway_usage:PLAIN)%`.
const USAGE_PROPERTY: &str = "ma_gateway_usage";

/// Largest piece of a response body copied into the VM at once.
const READ_SLICE_BYTES: usize = 64 * 1024;

/// What a call this stream dispatched is for.
pub(super) enum Pending {
    /// The session's model was unknown when its stream opened.
    Model(String),
    /// Who owns an id (ownership cache miss).
    Owner(IdKind, String),
}

/// Where the request stands at the ownership gate.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gate {
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

/// A session budget this request reserved (see `GatewayStream::inspect_body`), settled in
/// `on_log`: bound to the created session, released, or put back.
#[derive(Debug)]
pub(super) struct HeldReservation {
    pub(super) holder: String,
    pub(super) previous: Option<crate::limits::Reservation>,
    pub(super) create: bool,
}

pub struct GatewayStream {
    pub(super) context_id: u32,
    pub(super) plan: Option<Rc<Plan>>,
    pub(super) metrics: Rc<RefCell<Metrics>>,
    pub(super) admitted: Option<Admitted>,
    pub(super) started_ms: u64,
    pub(super) status: u32,
    pub(super) gate: Gate,
    /// The (small) JSON body of a create/update call is still to be checked and tagged.
    pub(super) body_pending: bool,
    /// A `POST …/events` body whose event types the audit record lists.
    pub(super) events_pending: bool,
    /// The whole request body has arrived (end of stream on a body callback, or trailers):
    /// how it arrived (one frame, many, chunked, with trailers) never changes the decision.
    pub(super) body_complete: bool,
    /// Rate-limit headers of an admitted call, added to its response.
    pub(super) rate_headers: Vec<(String, String)>,
    /// Concurrent-stream slots this request holds (leases renewed as the body flows, closed
    /// in `on_log`), the holder name they are held under, and when they were last renewed.
    pub(super) stream_slots: Vec<String>,
    pub(super) slot_holder: String,
    pub(super) slots_renewed_ms: u64,
    pub(super) reservation: Option<HeldReservation>,
    /// Envoy's `x-request-id` of this request, for the `request_id` of gateway answers.
    pub(super) envoy_request_id: Option<String>,
    pub(super) pending: HashMap<u32, Pending>,
    pub(super) meter: Option<ResponseMeter>,
    /// The response is JSON of owned resources: buffered, tag stripped, list filtered.
    pub(super) rewrite_response: bool,
    /// Event pages and streams: the owner tag removed chunk by chunk as they flow.
    pub(super) event_strip: Option<crate::tag_strip::EventStrip>,
    pub(super) stream_open: bool,
    pub(super) first_event_recorded: bool,
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
            body_complete: false,
            rate_headers: Vec::new(),
            stream_slots: Vec::new(),
            slot_holder: String::new(),
            slots_renewed_ms: 0,
            reservation: None,
            envoy_request_id: None,
            pending: HashMap::new(),
            meter: None,
            rewrite_response: false,
            event_strip: None,
            stream_open: false,
            first_event_recorded: false,
        }
    }

    /// Answers the client with the Anthropic error envelope; upstream is never contacted.
    pub(super) fn refuse(&mut self, error: &ApiError) -> Action {
        self.refuse_with(error, Vec::new())
    }

    /// [`Self::refuse`] with extra response headers (`retry-after` on a 429, …); an extra
    /// `x-should-retry` replaces the default.
    pub(super) fn refuse_with(&mut self, error: &ApiError, extra: Vec<(String, String)>) -> Action {
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
        let rules = self.plan.as_ref().map(|p| p.audit).unwrap_or_default();
        let ids = self
            .admitted
            .as_ref()
            .map_or(&[][..], |a| a.operation.ids.as_slice());
        let reason = audit::reason_field(&rules, error, ids);
        self.audit(vec![
            ("decision", "refused".to_string()),
            ("reason", reason.clone()),
        ]);
        self.metrics
            .borrow_mut()
            .add(&metrics::REFUSALS, &[error.kind.wire_name()], 1);
        // With `redact_ids` the log line carries no raw id either.
        log::info!("#{} refused {}: {reason}", self.context_id, error.status());
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
    pub(super) fn audit(&self, fields: Vec<(&'static str, String)>) {
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

    /// Moves the request on as far as what has arrived allows. `Continue` forwards it (head,
    /// body and trailers together when the head was held); `Pause` waits for the rest of a
    /// body that must be read, or for owner lookups, or the call was refused. Called from
    /// every request callback and when owner lookups answer, so a decision never depends on
    /// whether the body came in one piece, in many, with trailers, or before the lookups.
    pub(super) fn advance(&mut self) -> Action {
        loop {
            if self.gate != Gate::Open {
                return Action::Pause;
            }
            if !self.body_pending && !self.events_pending {
                return Action::Continue;
            }
            if !self.body_complete {
                return Action::Pause;
            }
            let cap = self.plan.as_ref().map_or(0, |p| p.isolation.max_body_bytes);
            // One byte over the cap tells a body that is too large from one that fits.
            let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, cap + 1) {
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
            if self.events_pending {
                self.events_pending = false;
                let types = if body.len() > cap {
                    "unread (body over the inspection cap)".to_string()
                } else {
                    audit::event_types(&body)
                };
                self.audit(vec![("events", types)]);
            }
            if self.body_pending {
                self.body_pending = false;
                if body.len() > cap {
                    return self.refuse(&body_too_large(cap));
                }
                if self.decide_body(body) != Action::Continue {
                    return Action::Pause;
                }
            }
        }
    }

    /// Policy, budget clamp, owner tag and body references of a whole request body: the
    /// (rewritten) body is left in Envoy's buffer, and `Continue`, a refusal, or `Pause` while
    /// the owners of its references are looked up.
    fn decide_body(&mut self, body: Vec<u8>) -> Action {
        let (Some(plan), Some(admitted)) = (self.plan.clone(), self.admitted.as_ref()) else {
            return Action::Continue;
        };
        let original_len = body.len();
        let op = admitted.operation.clone();
        let tenant = admitted.principal.tenant.clone();
        let (body, changed) = match self.inspect_body(&plan, &tenant, &op, body) {
            Ok(inspected) => inspected,
            Err(error) => return self.refuse(&error),
        };
        if changed {
            if let Err(status) =
                hostcalls::set_buffer(BufferType::HttpRequestBody, 0, original_len, &body)
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
        self.check_owners(references, false)
    }

    /// Feeds `body_size` bytes of the response body to the meter, in bounded slices, and
    /// emits what it found (metrics, filter state, session affinity on create).
    pub(super) fn meter_body(&mut self, buffer: BufferType, body_size: usize, end_of_stream: bool) {
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
        // A list cost below the estimates charged gives money back; charges go through
        // `charge_budgets` (which takes what is left after netting).
        let refund = meter.take_refund();
        if let (Some(admitted), true) = (&self.admitted, refund > 0) {
            let tenant = admitted.principal.tenant.as_str();
            let session = meter.usage.session_id.as_deref();
            if let Err(err) = limits::refund_session(&SharedData, tenant, session, refund, now_ms())
            {
                log::warn!(
                    "#{} budget of {tenant} not refunded: {err}",
                    self.context_id
                );
            }
        }
    }
}

impl GatewayStream {
    /// Removes the owner tag from this chunk of an event page or stream and passes the rest
    /// on at once (the chunk is replaced in place; nothing is held beyond a key's prefix).
    fn strip_events(&mut self, body_size: usize, end_of_stream: bool) {
        let Some(strip) = self.event_strip.as_mut() else {
            return;
        };
        let mut out = Vec::with_capacity(body_size);
        let mut offset = 0;
        while offset < body_size {
            let len = (body_size - offset).min(READ_SLICE_BYTES);
            match hostcalls::get_buffer(BufferType::HttpResponseBody, offset, len) {
                Ok(bytes) => strip.push(&bytes.unwrap_or_default(), &mut out),
                Err(status) => {
                    log::error!(
                        "#{} cannot read events to strip: {status:?}",
                        self.context_id
                    );
                    return;
                }
            }
            offset += len;
        }
        if end_of_stream {
            strip.finish(&mut out);
        }
        if let Err(status) = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &out)
        {
            log::error!(
                "#{} cannot replace an events chunk: {status:?}",
                self.context_id
            );
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
        #[cfg(feature = "fault-injection")]
        super::fault_injection::on_request_headers(self.context_id, &headers);
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
                let mut fields = audit::decision_fields(
                    &plan.audit,
                    refusal.principal.as_ref(),
                    refusal.operation.as_ref(),
                    Some(&refusal.error),
                );
                fields.push((
                    audit::PATH_FIELD,
                    audit::path_field(&plan.audit, head.path, refusal.operation.as_ref()),
                ));
                self.audit(fields);
                return self.refuse(&refusal.error);
            }
        };
        let mut fields = audit::decision_fields(
            &plan.audit,
            Some(&admitted.principal),
            Some(&admitted.operation),
            None,
        );
        fields.push((
            audit::PATH_FIELD,
            audit::path_field(&plan.audit, head.path, Some(&admitted.operation)),
        ));
        self.audit(fields);
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
            // Which event types were sent (never their content) goes to the audit record,
            // unless the declared body is over the inspection cap: holding it back would run
            // into Envoy's own request buffer limit (a plain-text 413) instead of letting it
            // through unread as documented.
            let declared = header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|n| n > plan.isolation.max_body_bytes) {
                self.audit(vec![(
                    "events",
                    "unread (body over the inspection cap)".to_string(),
                )]);
            } else {
                self.events_pending = true;
            }
        }
        let needs_body = Self::needs_body(&plan, &tenant, &op);
        if needs_body && end_of_stream && op.action == RouteAction::Create {
            return self.refuse(&ApiError::new(
                ErrorKind::InvalidRequest,
                "a JSON body is required",
            ));
        }
        if !end_of_stream && (needs_body || self.events_pending) {
            // The gateway reads this body as JSON: an encoded one is refused now, before
            // anything of it goes upstream, never passed unread.
            if let Some(refusal) =
                content_coding::request_body_refusal(header(&headers, "content-encoding"))
            {
                return self.refuse(&refusal);
            }
        }
        if needs_body && !end_of_stream {
            // The body is checked (policy, references), clamped (budget) and tagged (owner)
            // before any of it goes upstream; its length changes.
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
        let action = if plan.isolation.enabled {
            // Filters in the query (`?agent_id=…`) are references like path ids.
            let mut ids = op.ids;
            ids.extend(tenancy::query_references(head.path));
            self.check_owners(ids, false)
        } else {
            Action::Continue
        };
        if action == Action::Continue
            && (self.body_pending || self.events_pending)
            && plan.isolation.hold_request_head
        {
            // Hold the head too until the body is decided, so a refusal sends nothing
            // upstream. With `allow_on_headers_stop_iteration` Envoy keeps delivering the body
            // to this filter meanwhile; `advance` lets head, body and trailers go together.
            head_hold::held(self.context_id, now_ms());
            return Action::Pause;
        }
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        head_hold::body_arrived(self.context_id);
        if self.gate == Gate::Refused {
            return Action::Pause;
        }
        if !self.body_pending && !self.events_pending {
            return self.advance();
        }
        let cap = self.plan.as_ref().map_or(0, |p| p.isolation.max_body_bytes);
        if body_size > cap {
            if self.body_pending {
                self.body_pending = false;
                return self.refuse(&body_too_large(cap));
            }
            // Event types are audit only: a body over the cap goes on unread (the audit says
            // so) rather than into Envoy's own buffer limit.
            self.events_pending = false;
            self.audit(vec![(
                "events",
                "unread (body over the inspection cap)".to_string(),
            )]);
            return self.advance();
        }
        if end_of_stream {
            self.body_complete = true;
        }
        self.advance()
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        head_hold::body_arrived(self.context_id);
        if self.gate == Gate::Refused {
            return Action::Pause;
        }
        // Trailers end the body (HTTP/2 trailers frame, chunked trailers): decide now, with
        // the body Envoy buffered, exactly as if the last data frame had ended the stream.
        self.body_complete = true;
        self.advance()
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
        let rewrite = plan.isolation.enabled
            && (200..300).contains(&status)
            && !end_of_stream
            && Self::rewrites(&admitted.operation);
        let event_strip =
            (plan.isolation.enabled && (200..300).contains(&status) && !end_of_stream)
                .then(|| {
                    crate::tag_strip::EventStrip::for_operation(
                        &admitted.operation,
                        &plan.isolation.tag_key,
                    )
                })
                .flatten();
        if (rewrite || event_strip.is_some() || meter.wants_body()) && !end_of_stream {
            // The gateway asked for identity; bytes it cannot read are never passed on unread
            // (metering would count 0, the owner tag would leak).
            let coding = hostcalls::get_map_value(MapType::HttpResponseHeaders, "content-encoding")
                .ok()
                .flatten();
            if let Some(refusal) = content_coding::response_body_refusal(coding.as_deref()) {
                log::warn!(
                    "#{} upstream answered {status} with content-encoding {}",
                    self.context_id,
                    coding.as_deref().unwrap_or_default()
                );
                return self.refuse(&refusal);
            }
        }
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
        self.rewrite_response = rewrite;
        self.meter = meter.wants_body().then_some(meter);
        self.event_strip = event_strip;
        if self.rewrite_response || self.event_strip.is_some() {
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
        #[cfg(feature = "fault-injection")]
        super::fault_injection::on_response_body(self.context_id, body_size);
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
        self.renew_stream_slots();
        self.strip_events(body_size, end_of_stream);
        // Never hold the body back: streams flow as they arrive.
        Action::Continue
    }

    fn on_log(&mut self) {
        #[cfg(feature = "fault-injection")]
        super::fault_injection::forget(self.context_id);
        head_hold::forget(self.context_id);
        let (family, action) = match &self.admitted {
            Some(admitted) => (
                admitted.operation.family.as_str(),
                admitted.operation.action.as_str(),
            ),
            None => ("unrouted", "none"),
        };
        self.close_stream_slots();
        self.settle_reservation();
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

/// The refusal of an inspected request body over the inspection cap.
fn body_too_large(cap: usize) -> ApiError {
    ApiError::new(
        ErrorKind::RequestTooLarge,
        format!("request body exceeds the gateway's {cap}-byte limit for this call"),
    )
}

/// Size of this VM's linear memory (it only grows; flat means nothing accumulated).
fn wasm_memory_bytes() -> u64 {
    (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
}
