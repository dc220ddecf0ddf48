//! The per-request `HttpContext`: reads the request head, asks [`gateway::admit`], then either
//! applies the header edits and lets the call through, or answers with the error envelope.
//! Body callbacks are not overridden: bodies (SSE included) stream through untouched.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType, Status};

use super::credentials;
use crate::config::Plan;
use crate::errors::{gateway_request_id, ApiError, ErrorKind};
use crate::gateway::{self, header_value as header, Admitted, RequestHead};
use crate::headers::HeaderEdit;

pub struct GatewayStream {
    context_id: u32,
    plan: Option<Rc<Plan>>,
    admitted: Option<Admitted>,
}

impl GatewayStream {
    pub fn new(context_id: u32, plan: Option<Rc<Plan>>) -> Self {
        GatewayStream {
            context_id,
            plan,
            admitted: None,
        }
    }

    /// Answers the client with the Anthropic error envelope; upstream is never contacted.
    fn refuse(&self, error: &ApiError, headers: &[(String, String)]) -> Action {
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

impl Context for GatewayStream {}

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
        let credential = credentials::current_key();
        match gateway::admit(&plan, &head, credential.as_deref()) {
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
                log::info!(
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
}
