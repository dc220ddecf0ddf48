//! The per-request `HttpContext`: the glue that reads the host, asks the core, applies answers.
//!
//! Request headers → [`gateway::admit`] → forward with header edits, or answer with the error
//! envelope. Response headers → a [`ResponseMeter`] decides what of the body to look at.
//! Response body chunks → the meter (SSE scanned incrementally; the callback always returns
//! `Continue`, so nothing is ever held back) → metrics and the request's usage in filter state.
//! Log → request counters and durations.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType, Status};

use super::credentials;
use super::lookup;
use super::metrics::Metrics;
use super::store::SharedData;
use crate::accounting;
use crate::config::Plan;
use crate::errors::{gateway_request_id, ApiError, ErrorKind};
use crate::gateway::{self, header_value as header, Admitted, RequestHead};
use crate::headers::HeaderEdit;
use crate::metering::{MeterContext, ResponseMeter};
use crate::metrics;
use crate::routes::{Action as RouteAction, Family, IdKind};

/// Filter-state key (single path token) under which each request's usage JSON is stored; an
/// access log prints it with `%FILTER_STATE(wasm.ma_gateway_usage:PLAIN)%`.
const USAGE_PROPERTY: &str = "ma_gateway_usage";

/// Largest piece of a response body copied into the VM at once.
const READ_SLICE_BYTES: usize = 64 * 1024;

pub struct GatewayStream {
    context_id: u32,
    plan: Option<Rc<Plan>>,
    metrics: Rc<RefCell<Metrics>>,
    admitted: Option<Admitted>,
    started_ms: u64,
    status: u32,
    meter: Option<ResponseMeter>,
    stream_open: bool,
    first_event_recorded: bool,
    /// A session lookup in flight (model unknown when the stream opened): token, session.
    lookup: Option<(u32, String)>,
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
            meter: None,
            stream_open: false,
            first_event_recorded: false,
            lookup: None,
        }
    }

    /// Answers the client with the Anthropic error envelope; upstream is never contacted.
    fn refuse(&mut self, error: &ApiError, headers: &[(String, String)]) -> Action {
        let request_id = gateway_request_id(header(headers, "x-request-id"));
        let body = error.envelope(&request_id);
        // Only rate limits are worth an automatic SDK retry; everything else needs a human.
        let retry = if error.kind == ErrorKind::RateLimit {
            "true"
        } else {
            "false"
        };
        let reply = vec![
            ("content-type", "application/json"),
            ("request-id", request_id.as_str()),
            ("x-should-retry", retry),
        ];
        self.status = error.status();
        self.metrics
            .borrow_mut()
            .add(&metrics::REFUSALS, &[error.kind.wire_name()], 1);
        if let Err(status) = hostcalls::send_http_response(error.status(), reply, Some(&body)) {
            log::error!(
                "#{} cannot send the {} reply: {status:?}",
                self.context_id,
                error.status()
            );
        }
        Action::Pause
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
}

impl Context for GatewayStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some((token, session_id)), Some(plan), Some(admitted)) =
            (&self.lookup, &self.plan, &self.admitted)
        else {
            return;
        };
        if *token != token_id {
            return;
        }
        let tenant = admitted.principal.tenant.clone();
        lookup::on_response(
            plan,
            &mut self.metrics.borrow_mut(),
            session_id,
            &tenant,
            body_size,
            now_ms() / 1000,
        );
        self.lookup = None;
    }
}

impl HttpContext for GatewayStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = match hostcalls::get_map(MapType::HttpRequestHeaders) {
            Ok(headers) => headers,
            Err(status) => {
                log::error!(
                    "#{} cannot read request headers: {status:?}",
                    self.context_id
                );
                return self.refuse(
                    &ApiError::new(ErrorKind::Api, "gateway could not read the request"),
                    &[],
                );
            }
        };
        let Some(plan) = self.plan.clone() else {
            return self.refuse(
                &ApiError::new(ErrorKind::Api, "gateway is not configured"),
                &headers,
            );
        };
        let head = RequestHead {
            method: header(&headers, ":method").unwrap_or(""),
            path: header(&headers, ":path").unwrap_or(""),
            headers: &headers,
        };
        match gateway::admit(&plan, &head, &credentials::SharedKeys, now_ms() / 1000) {
            Ok(admitted) => {
                if let Err(status) = Self::apply(&admitted.edits) {
                    log::error!(
                        "#{} cannot rewrite request headers: {status:?}",
                        self.context_id
                    );
                    return self.refuse(
                        &ApiError::new(ErrorKind::Api, "gateway could not prepare the request"),
                        &headers,
                    );
                }
                log::debug!(
                    "#{} {}/{} {}.{} forwarded",
                    self.context_id,
                    admitted.principal.tenant,
                    admitted.principal.name,
                    admitted.operation.family.as_str(),
                    admitted.operation.action.as_str()
                );
                self.admitted = Some(admitted);
                Action::Continue
            }
            Err(error) => {
                log::info!(
                    "#{} refused {}: {}",
                    self.context_id,
                    error.status(),
                    error.message
                );
                self.refuse(&error, &headers)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(admitted), Some(plan)) = (&self.admitted, &self.plan) else {
            // Our own refusal passing back through the chain: nothing to meter.
            return Action::Continue;
        };
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        self.status = status;
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
                    self.lookup = lookup::dispatch(plan, session_id)
                        .map(|token| (token, session_id.to_string()));
                }
            }
        }
        self.meter = meter.wants_body().then_some(meter);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(meter), Some(plan)) = (self.meter.as_mut(), self.plan.as_ref()) else {
            return Action::Continue;
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
                match hostcalls::get_buffer(BufferType::HttpResponseBody, offset, len) {
                    Ok(bytes) => bytes.unwrap_or_default(),
                    Err(status) => {
                        log::warn!("#{} cannot read response body: {status:?}", self.context_id);
                        return Action::Continue;
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

/// Host time in milliseconds since the epoch (0 if the host cannot tell).
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
