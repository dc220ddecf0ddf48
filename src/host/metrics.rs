//! Metric handles: defines each labelled stat once per VM (Envoy dedups by name across
//! workers, so all workers add into one process-wide stat) and records into it.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use super::store::SharedData;
use crate::metering::Emission;
use crate::metrics::{self, stat_name, Kind, Metric, TenantLabels};

/// Most distinct stats one VM will define; beyond it new label sets are dropped (and logged
/// once) rather than growing without bound.
const MAX_STATS: usize = 4096;

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    overflow_logged: bool,
    /// The `tenant` label values the config allows; any other tenant is recorded as `unknown`.
    tenants: TenantLabels,
    /// Streams of this root open now, and where they are published (see
    /// `metrics::recount_streams`); `None` until the root is configured.
    open_streams: i64,
    stream_lease: Option<String>,
}

impl Metrics {
    /// The config's tenants: the only `tenant` label values recorded from now on.
    pub fn set_tenants(&mut self, tenants: TenantLabels) {
        self.tenants = tenants;
    }

    fn id(&mut self, metric: &Metric, labels: &[&str]) -> Option<u32> {
        let name = stat_name(metric, &self.tenants.bound(metric, labels));
        if let Some(id) = self.ids.get(&name) {
            return Some(*id);
        }
        if self.ids.len() >= MAX_STATS {
            if !self.overflow_logged {
                log::warn!(
                    "more than {MAX_STATS} distinct stats; dropping new label sets such as {name}"
                );
                self.overflow_logged = true;
            }
            return None;
        }
        let kind = match metric.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        };
        match hostcalls::define_metric(kind, &name) {
            Ok(id) => {
                self.ids.insert(name, id);
                Some(id)
            }
            Err(status) => {
                log::warn!("cannot define metric {name}: {status:?}");
                None
            }
        }
    }

    /// Publishes this root's open streams under `root` from now on.
    pub fn set_stream_root(&mut self, root: &str) {
        self.stream_lease = Some(metrics::stream_lease_key(root));
        self.beat(super::now_ms());
    }

    /// This root's heartbeat: its open-stream count, stamped `now_ms`.
    pub fn beat(&self, now_ms: u64) {
        let Some(key) = &self.stream_lease else {
            return;
        };
        let open = u64::try_from(self.open_streams).unwrap_or(0);
        if let Err(err) = crate::store::Store::set(
            &SharedData,
            key,
            &metrics::encode_stream_lease(open, now_ms),
            None,
        ) {
            log::warn!("open-stream count not published: {err}");
        }
    }

    /// Sets a gauge to `value`.
    pub fn set_gauge(&mut self, metric: &Metric, value: u64) {
        self.record(metric, &[], value);
    }

    /// Adds `delta` to a counter or gauge (gauges may go down).
    pub fn add(&mut self, metric: &Metric, labels: &[&str], delta: i64) {
        if delta == 0 {
            return;
        }
        if metric.name == metrics::ACTIVE_STREAMS.name {
            // Counted at once, and published so that the background leader's recount (which
            // sets the gauge to the true sum) forgets the streams of a VM that failed.
            self.open_streams = self.open_streams.saturating_add(delta);
            self.beat(super::now_ms());
        }
        if let Some(id) = self.id(metric, labels) {
            if let Err(status) = hostcalls::increment_metric(id, delta) {
                log::warn!("cannot increment {}: {status:?}", metric.name);
            }
        }
    }

    /// Records one histogram sample.
    pub fn record(&mut self, metric: &Metric, labels: &[&str], value: u64) {
        if let Some(id) = self.id(metric, labels) {
            if let Err(status) = hostcalls::record_metric(id, value) {
                log::warn!("cannot record {}: {status:?}", metric.name);
            }
        }
    }

    /// Applies what the metering core decided.
    pub fn apply(&mut self, emissions: Vec<Emission>) {
        for emission in emissions {
            match emission {
                Emission::Add(metric, labels, delta) => {
                    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                    self.add(metric, &labels, delta);
                }
                Emission::Record(metric, labels, value) => {
                    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                    self.record(metric, &labels, value);
                }
            }
        }
    }
}
