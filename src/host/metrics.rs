//! Metric handles: defines each labelled stat once per VM (Envoy dedups by name across
//! workers, so all workers add into one process-wide stat) and records into it.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::metering::Emission;
use crate::metrics::{stat_name, Kind, Metric};

/// Most distinct stats one VM will define; beyond it new label sets are dropped (and logged
/// once) rather than growing without bound.
const MAX_STATS: usize = 4096;

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    overflow_logged: bool,
}

impl Metrics {
    fn id(&mut self, metric: &Metric, labels: &[&str]) -> Option<u32> {
        let name = stat_name(metric, labels);
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

    /// Adds `delta` to a counter or gauge (gauges may go down).
    pub fn add(&mut self, metric: &Metric, labels: &[&str], delta: i64) {
        if delta == 0 {
            return;
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
