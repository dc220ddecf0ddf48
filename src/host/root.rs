//! The root context, in one of two roles chosen by its `root_id`:
//!
//! - the HTTP filter (`ma_gateway`): `on_configure` parses → validates → compiles the plugin
//!   JSON into a [`Plan`], seeds environment-sourced credentials into shared data, and hands
//!   the plan to every stream;
//! - the background service (`ma_gateway_reconciler`, a singleton `envoy.bootstrap.wasm`
//!   service with the same `vm_id`, so it sees the same shared data). Every second it checks
//!   its duties: refresh Vault-backed credentials that are due (with backoff and jitter), and
//!   every `metering.reconcile_interval_secs` poll a batch of known sessions and meter their
//!   cumulative usage, compacting idle accounting records; and recount the open streams into
//!   `ma_gateway_active_streams`.
//!
//! Envoy reloads a failed filter VM on its next request but never a failed bootstrap service,
//! so the duties are held under a lease in shared data (`reconcile::try_lead`): the service
//! renews it every tick, and every filter root checks it on its own one-second tick and takes
//! the duties over, one root at a time, once the service has gone silent for
//! `reconcile::LEASE_MS`.
//!
//! A config error is logged with its field path and rejects the config (returns false).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};

use super::credentials;
use super::head_hold;
use super::lookup;
use super::metrics::Metrics;
use super::store::SharedData;
use super::stream::GatewayStream;
use crate::accounting;
use crate::config::{Origin, Plan, VaultSource};
use crate::credentials::{next_refresh_secs, parse_vault_kv2};
use crate::errors::{gateway_request_id, ApiError, ErrorKind};
use crate::limits::{self, Class, LimitScope};
use crate::reconcile::{self, Leadership, RECONCILER_ROOT_ID};

/// Upper bound on one call to Vault.
const VAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct GatewayRoot {
    context_id: u32,
    plan: Option<Rc<Plan>>,
    /// One metric registry per VM, shared by its streams.
    metrics: Rc<RefCell<Metrics>>,
    /// Background service: where the next batch starts in the session index.
    cursor: usize,
    /// Background service: when the next session batch is due (Unix seconds).
    next_reconcile: u64,
    /// Background service: per Vault-backed credential, (next due, consecutive failures).
    vault_schedule: HashMap<String, (u64, u32)>,
    /// Background service: calls in flight, by call token.
    in_flight: HashMap<u32, Pending>,
    /// This root is the background service (not the HTTP filter).
    is_reconciler: bool,
    /// A filter root's name in the background lease and the stream count (unique per root).
    instance: String,
    /// A filter root currently runs the background duties (it holds the lease).
    leading: bool,
}

/// What a dispatched call was for.
enum Pending {
    Session(String),
    Vault(String),
}

impl GatewayRoot {
    pub fn new(context_id: u32) -> Self {
        GatewayRoot {
            context_id,
            plan: None,
            metrics: Rc::new(RefCell::new(Metrics::default())),
            cursor: 0,
            next_reconcile: 0,
            vault_schedule: HashMap::new(),
            in_flight: HashMap::new(),
            is_reconciler: false,
            instance: String::new(),
            leading: false,
        }
    }

    /// A filter root's tick: publish its open streams, then run the background duties if it
    /// holds (or may take over) the lease.
    fn standby_tick(&mut self, plan: &Plan) {
        let now_ms = super::now_ms();
        self.metrics.borrow().beat(now_ms);
        if !crate::metrics::stream_root_listed(&SharedData, &self.instance) {
            if let Err(err) = crate::metrics::register_stream_root(&SharedData, &self.instance) {
                log::warn!("#{} open streams not listed: {err}", self.context_id);
            }
        }
        match reconcile::try_lead(&SharedData, &self.instance, now_ms) {
            Ok(Leadership::Renewed) => {}
            Ok(Leadership::TookOver { from: Some(from) }) => {
                log::warn!(
                    "#{} background duties taken over by filter root {} from {from} (silent for over {} ms: a failed background service is not reloaded by Envoy)",
                    self.context_id,
                    self.instance,
                    reconcile::LEASE_MS
                );
                self.leading = true;
            }
            Ok(Leadership::TookOver { from: None }) => {
                // No background service in this deployment (e.g. Istio, Envoy Gateway).
                log::info!(
                    "#{} background duties run by filter root {} (no background service holds the lease)",
                    self.context_id,
                    self.instance
                );
                self.leading = true;
            }
            Ok(Leadership::Standby) => {
                if self.leading {
                    log::info!(
                        "#{} background duties handed back (lease held elsewhere)",
                        self.context_id
                    );
                    self.leading = false;
                }
                return;
            }
            Err(err) => {
                log::warn!("#{} background lease not checked: {err}", self.context_id);
                return;
            }
        }
        self.background_duties(plan, now_ms / 1000);
    }

    /// Vault refresh, the active-streams recount and the reconciler's session batches.
    fn background_duties(&mut self, plan: &Plan, now: u64) {
        self.refresh_vault_credentials(plan, now);
        match crate::metrics::recount_streams(&SharedData, super::now_ms()) {
            Ok(open) => self
                .metrics
                .borrow_mut()
                .set_gauge(&crate::metrics::ACTIVE_STREAMS, open),
            Err(err) => log::warn!("#{} open streams not recounted: {err}", self.context_id),
        }
        let every = plan.metering.reconcile_interval_secs;
        // A slow upstream must not let lookups pile up: wait while a batch is out.
        let batch_out = self
            .in_flight
            .values()
            .any(|p| matches!(p, Pending::Session(_)));
        if every == 0 || now < self.next_reconcile || batch_out {
            return;
        }
        self.next_reconcile = now + every;
        if let Err(err) = accounting::sweep(&SharedData, &plan.metering.limits, now) {
            log::warn!("#{} accounting sweep failed: {err}", self.context_id);
        }
        let sessions = accounting::active_sessions(&SharedData);
        let (batch, cursor) =
            reconcile::next_batch(&sessions, self.cursor, plan.metering.reconcile_batch);
        self.cursor = cursor;
        for session_id in batch {
            if let Some(token) = lookup::dispatch(plan, &session_id) {
                self.in_flight.insert(token, Pending::Session(session_id));
            }
        }
    }

    /// The HTTP filter's tick: streams whose held head never got its body (Envoy lacks
    /// `allow_on_headers_stop_iteration`) are answered with a 500 naming the setting.
    fn answer_stuck_heads(&self) {
        let stuck = head_hold::overdue(super::now_ms());
        if stuck.is_empty() {
            return;
        }
        log::error!(
            "#{} config error: {} request(s) held for their body got none within {} ms: set `allow_on_headers_stop_iteration: true` on this Wasm filter (Envoy >= 1.35), or `isolation.hold_request_head: false` where the host cannot",
            self.context_id,
            stuck.len(),
            head_hold::UNPROVEN_HOLD_LIMIT_MS
        );
        let error = ApiError::new(
            ErrorKind::Api,
            "gateway misconfiguration: Envoy does not deliver request bodies to the filter while it holds the head (set allow_on_headers_stop_iteration: true on the Wasm filter, or isolation.hold_request_head: false); nothing was forwarded",
        );
        let body = error.envelope(&gateway_request_id(None));
        for context_id in stuck {
            if hostcalls::set_effective_context(context_id).is_err() {
                continue;
            }
            if let Err(status) = hostcalls::send_http_response(
                500,
                vec![
                    ("content-type", "application/json"),
                    ("x-should-retry", "false"),
                ],
                Some(&body),
            ) {
                log::warn!("#{context_id} stuck request not answered: {status:?}");
            }
        }
    }

    /// Polls the Vault-backed credentials that are due, at most one call each in flight.
    fn refresh_vault_credentials(&mut self, plan: &Plan, now: u64) {
        for source in &plan.credentials {
            let Origin::Vault(vault) = &source.origin else {
                continue;
            };
            let due = self
                .vault_schedule
                .get(&source.name)
                .map_or(0, |(due, _)| *due);
            let busy = self
                .in_flight
                .values()
                .any(|p| matches!(p, Pending::Vault(n) if *n == source.name));
            if now < due || busy {
                continue;
            }
            match dispatch_vault(vault) {
                Ok(token) => {
                    self.in_flight
                        .insert(token, Pending::Vault(source.name.clone()));
                }
                Err(why) => {
                    log::warn!("credential {}: Vault not polled: {why}", source.name);
                    self.schedule_vault(vault, &source.name, now, false);
                }
            }
        }
    }

    /// When a Vault credential is next polled: its period after a success, backing off
    /// exponentially after failures; jittered so replicas do not poll in lockstep.
    fn schedule_vault(&mut self, vault: &VaultSource, name: &str, now: u64, ok: bool) {
        let failures = if ok {
            0
        } else {
            self.vault_schedule
                .get(name)
                .map_or(1, |(_, f)| f.saturating_add(1))
        };
        let seed = now ^ (u64::from(self.context_id) << 32) ^ (name.len() as u64);
        let next = now + next_refresh_secs(vault.refresh_secs, failures, seed);
        self.vault_schedule
            .insert(name.to_string(), (next, failures));
    }

    fn on_vault_response(&mut self, plan: &Plan, name: &str, body_size: usize) {
        let Some(vault) = plan.credentials.iter().find_map(|c| match &c.origin {
            Origin::Vault(v) if c.name == name => Some(v.clone()),
            _ => None,
        }) else {
            return;
        };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let result = match status.as_deref() {
            Some("200") => parse_vault_kv2(&body, &vault.field),
            other => Err(format!(
                "Vault answered {}",
                other.unwrap_or("nothing (timeout or reset)")
            )),
        };
        let ok = match result {
            Ok(key) => {
                credentials::store_rotated(name, &key);
                true
            }
            Err(why) => {
                log::warn!("credential {name}: Vault refresh failed: {why}");
                false
            }
        };
        self.schedule_vault(&vault, name, now_secs(), ok);
    }
}

/// `GET <path>` with `X-Vault-Token` from the VM environment.
fn dispatch_vault(vault: &VaultSource) -> Result<u32, String> {
    let token = std::env::var(&vault.token_env)
        .map_err(|_| format!("{} is not in the VM environment", vault.token_env))?;
    let headers = vec![
        (":method", "GET"),
        (":path", vault.path.as_str()),
        (":authority", vault.authority.as_str()),
        ("x-vault-token", token.trim()),
    ];
    hostcalls::dispatch_http_call(&vault.cluster, headers, None, vec![], VAULT_TIMEOUT)
        .map_err(|status| format!("call via cluster {} refused: {status:?}", vault.cluster))
}

impl Context for GatewayRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some(pending), Some(plan)) = (self.in_flight.remove(&token_id), self.plan.clone())
        else {
            return;
        };
        match pending {
            Pending::Session(session_id) => {
                let tenant = reconcile::tenant_of(&SharedData, &session_id)
                    .unwrap_or_else(|| "unknown".into());
                lookup::on_response(
                    &plan,
                    &mut self.metrics.borrow_mut(),
                    &session_id,
                    &tenant,
                    body_size,
                    now_secs(),
                );
            }
            Pending::Vault(name) => self.on_vault_response(&plan, &name, body_size),
        }
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
        credentials::seed_all(&plan);
        prepare_limit_keys(&plan);
        self.metrics
            .borrow_mut()
            .set_tenants(crate::metrics::TenantLabels::from_plan(&plan));
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        self.is_reconciler = root_id == RECONCILER_ROOT_ID;
        // The lease key exists before anybody competes for it (a missing key is created
        // whatever compare-and-swap token a write carries).
        if let Err(err) = limits::prepare_key(&SharedData, reconcile::LEASE_KEY) {
            log::warn!("#{} background lease not prepared: {err}", self.context_id);
        }
        if self.is_reconciler {
            if let Err(err) = reconcile::renew_as_service(&SharedData, super::now_ms()) {
                log::warn!("#{} background lease not taken: {err}", self.context_id);
            }
            // One-second ticks; each duty keeps its own due time.
            if let Err(status) = hostcalls::set_tick_period(Duration::from_secs(1)) {
                log::error!(
                    "#{} background service cannot start its timer: {status:?}",
                    self.context_id
                );
                return false;
            }
            log::info!(
                "#{} background service: reconciling up to {} sessions every {}s (0 = off), {} Vault credential(s)",
                self.context_id,
                plan.metering.reconcile_batch,
                plan.metering.reconcile_interval_secs,
                plan.credentials.iter().filter(|c| matches!(c.origin, Origin::Vault(_))).count()
            );
        } else {
            if self.instance.is_empty() {
                self.instance = format!("{}-{}", now_ns(), self.context_id);
                self.metrics.borrow_mut().set_stream_root(&self.instance);
                // Listed at once, so the next recount already counts this root's streams.
                if let Err(err) = crate::metrics::register_stream_root(&SharedData, &self.instance)
                {
                    log::warn!("#{} open streams not listed: {err}", self.context_id);
                }
            }
            // One-second ticks in each worker VM: the watch on held heads (see head_hold), the
            // open-stream heartbeat, and the standby for the background duties.
            if let Err(status) = hostcalls::set_tick_period(Duration::from_secs(1)) {
                log::warn!(
                    "#{} cannot start the held-head watch and the background standby: {status:?}",
                    self.context_id
                );
            }
            log::info!(
                "#{} ma-gateway {} ({}) configured: upstream {}, {} gateway key(s), {} tenant(s), neighbours [{}]",
                self.context_id,
                env!("CARGO_PKG_VERSION"),
                option_env!("MA_GATEWAY_REVISION").unwrap_or("unknown revision"),
                plan.upstream.authority,
                plan.gateway_keys.len(),
                plan.tenants.len(),
                plan.routes.neighbours.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        self.plan = Some(Rc::new(plan));
        true
    }

    fn on_tick(&mut self) {
        let Some(plan) = self.plan.clone() else {
            return;
        };
        if !self.is_reconciler {
            if plan.isolation.hold_request_head {
                self.answer_stuck_heads();
            }
            self.standby_tick(&plan);
            return;
        }
        #[cfg(feature = "fault-injection")]
        super::fault_injection::on_tick();
        if let Err(err) = reconcile::renew_as_service(&SharedData, super::now_ms()) {
            log::warn!("#{} background lease not renewed: {err}", self.context_id);
        }
        self.background_duties(&plan, now_secs());
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

/// Creates the rate-limit buckets of known tenants and keys up front: shared data inserts a
/// missing key whatever compare-and-swap token a write carries, so two workers racing on a
/// bucket's very first write could both be admitted. An existing key is CAS-protected.
fn prepare_limit_keys(plan: &Plan) {
    let mut scopes: Vec<(LimitScope, String, String)> = plan
        .tenants
        .iter()
        .map(|t| (LimitScope::Tenant, t.name.clone(), t.name.clone()))
        .collect();
    for key in &plan.gateway_keys {
        scopes.push((LimitScope::Tenant, key.tenant.clone(), key.tenant.clone()));
        scopes.push((
            LimitScope::Principal,
            key.tenant.clone(),
            format!("{}/{}", key.tenant, key.name),
        ));
    }
    for (scope, tenant, name) in scopes {
        let mut keys = Vec::new();
        if plan.limits.max_streams(scope, &tenant).is_some() {
            keys.push(limits::streams_key(scope, &name));
        }
        if scope == LimitScope::Tenant && plan.limits.budgets.for_tenant(&tenant).is_some() {
            keys.push(limits::reservations_key(&tenant));
        }
        for key in keys {
            if let Err(err) = limits::prepare_key(&SharedData, &key) {
                log::warn!("limit key {key} not prepared: {err}");
            }
        }
        for class in [Class::Create, Class::Read, Class::Stream] {
            if plan.limits.rate(scope, &tenant, class).is_some() {
                if let Err(err) =
                    limits::prepare_key(&SharedData, &limits::bucket_key(scope, &name, class))
                {
                    log::warn!("rate-limit bucket of {name} not prepared: {err}");
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    super::now_ms() / 1000
}

fn now_ns() -> u128 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}
