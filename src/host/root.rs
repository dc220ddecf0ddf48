//! The root context, in one of two roles chosen by its `root_id`:
//!
//! - the HTTP filter (`ma_gateway`): `on_configure` parses → validates → compiles the plugin
//!   JSON into a [`Plan`], seeds the upstream credential into shared data, and hands the plan
//!   to every stream;
//! - the reconciler (`ma_gateway_reconciler`, a singleton `envoy.bootstrap.wasm` service with
//!   the same `vm_id`, so it sees the same shared data): on each tick it polls a batch of known
//!   sessions and meters their cumulative usage, and compacts idle accounting records.
//!
//! A config error is logged with its field path and rejects the config (returns false).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use super::credentials;
use super::lookup;
use super::metrics::Metrics;
use super::store::SharedData;
use super::stream::GatewayStream;
use crate::accounting;
use crate::config::Plan;
use crate::reconcile::{self, RECONCILER_ROOT_ID};

pub struct GatewayRoot {
    context_id: u32,
    plan: Option<Rc<Plan>>,
    /// One metric registry per VM, shared by its streams.
    metrics: Rc<RefCell<Metrics>>,
    reconciler: bool,
    /// Reconciler: where the next batch starts in the session index.
    cursor: usize,
    /// Reconciler: lookups in flight, by call token.
    in_flight: HashMap<u32, String>,
}

impl GatewayRoot {
    pub fn new(context_id: u32) -> Self {
        GatewayRoot {
            context_id,
            plan: None,
            metrics: Rc::new(RefCell::new(Metrics::default())),
            reconciler: false,
            cursor: 0,
            in_flight: HashMap::new(),
        }
    }
}

impl Context for GatewayRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some(session_id), Some(plan)) = (self.in_flight.remove(&token_id), self.plan.clone())
        else {
            return;
        };
        let tenant =
            reconcile::tenant_of(&SharedData, &session_id).unwrap_or_else(|| "unknown".into());
        lookup::on_response(
            &plan,
            &mut self.metrics.borrow_mut(),
            &session_id,
            &tenant,
            body_size,
            now_secs(),
        );
    }
}

impl RootContext for GatewayRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                log::error!(
                    "#{} config error: no plugin configuration (expected JSON with api_version)",
                    self.context_id
                );
                return false;
            }
            Err(status) => {
                log::error!(
                    "#{} cannot read plugin configuration: {status:?}",
                    self.context_id
                );
                return false;
            }
        };
        let plan = match Plan::from_json(&bytes) {
            Ok(plan) => plan,
            Err(err) => {
                log::error!("#{} {err}", self.context_id);
                return false;
            }
        };
        credentials::seed_from_env(&plan.upstream.credential_env);
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        self.reconciler = root_id == RECONCILER_ROOT_ID;
        if self.reconciler {
            let every = plan.metering.reconcile_interval_secs;
            if every > 0 {
                if let Err(status) = hostcalls::set_tick_period(Duration::from_secs(every)) {
                    log::error!(
                        "#{} reconciler cannot start its timer: {status:?}",
                        self.context_id
                    );
                    return false;
                }
            }
            log::info!(
                "#{} reconciler: polling up to {} sessions every {every}s (0 = off)",
                self.context_id,
                plan.metering.reconcile_batch
            );
        } else {
            log::info!(
                "#{} configured: upstream {}, {} gateway key(s), neighbours [{}]",
                self.context_id,
                plan.upstream.authority,
                plan.gateway_keys.len(),
                plan.routes
                    .neighbours
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.plan = Some(Rc::new(plan));
        true
    }

    fn on_tick(&mut self) {
        let Some(plan) = self.plan.clone() else {
            return;
        };
        let now = now_secs();
        if let Err(err) = accounting::sweep(&SharedData, &plan.metering.limits, now) {
            log::warn!("#{} accounting sweep failed: {err}", self.context_id);
        }
        // A slow upstream must not let lookups pile up: skip the tick while a batch is out.
        if !self.in_flight.is_empty() {
            return;
        }
        let sessions = accounting::active_sessions(&SharedData);
        let (batch, cursor) =
            reconcile::next_batch(&sessions, self.cursor, plan.metering.reconcile_batch);
        self.cursor = cursor;
        for session_id in batch {
            if let Some(token) = lookup::dispatch(&plan, &session_id) {
                self.in_flight.insert(token, session_id);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None would panic inside the SDK; a stream without a plan answers 500 instead.
        Some(Box::new(GatewayStream::new(
            context_id,
            self.plan.clone(),
            Rc::clone(&self.metrics),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn now_secs() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}
