//! The root context: `on_configure` parses → validates → compiles the plugin JSON into a
//! [`Plan`], seeds the upstream credential into shared data, and hands the plan to every
//! stream. A config error is logged with its field path and rejects the config (returns false).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use super::credentials;
use super::metrics::Metrics;
use super::stream::GatewayStream;
use crate::config::Plan;

pub struct GatewayRoot {
    context_id: u32,
    plan: Option<Rc<Plan>>,
    /// One metric registry per VM, shared by its streams.
    metrics: Rc<RefCell<Metrics>>,
}

impl GatewayRoot {
    pub fn new(context_id: u32) -> Self {
        GatewayRoot {
            context_id,
            plan: None,
            metrics: Rc::new(RefCell::new(Metrics::default())),
        }
    }
}

impl Context for GatewayRoot {}

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
        self.plan = Some(Rc::new(plan));
        true
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
