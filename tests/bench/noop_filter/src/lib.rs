//! A proxy-wasm HTTP filter that does nothing of its own, for `make bench`:
//!
//! - with an empty plugin configuration every callback continues at once (the floor of any
//!   Wasm filter in Envoy);
//! - with `key=count` pairs (comma-separated) it makes the same *hostcalls* a gateway request
//!   makes, without any of the gateway's logic, so that a run can tell the cost of crossing
//!   into Envoy from the cost of the filter's own code. Keys: `get_headers`, `set_property`,
//!   `header_edits`, `shared_get`, `shared_set`, `time`, `status`, `add_response_headers`,
//!   `metrics`, and `rewrite_body=1` (buffer the response body, read it, write it back).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(NoopRoot { plan: Rc::new(Plan::default()) })
    });
}}

#[derive(Default, Clone)]
struct Plan {
    get_headers: u32,
    set_property: u32,
    header_edits: u32,
    shared_get: u32,
    shared_set: u32,
    time: u32,
    status: u32,
    add_response_headers: u32,
    metrics: u32,
    rewrite_body: bool,
    counter: Option<u32>,
}

impl Plan {
    fn parse(text: &str) -> Plan {
        let mut plan = Plan::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let n: u32 = value.trim().parse().unwrap_or(0);
            match key.trim() {
                "get_headers" => plan.get_headers = n,
                "set_property" => plan.set_property = n,
                "header_edits" => plan.header_edits = n,
                "shared_get" => plan.shared_get = n,
                "shared_set" => plan.shared_set = n,
                "time" => plan.time = n,
                "status" => plan.status = n,
                "add_response_headers" => plan.add_response_headers = n,
                "metrics" => plan.metrics = n,
                "rewrite_body" => plan.rewrite_body = n > 0,
                _ => {}
            }
        }
        plan
    }
}

struct NoopRoot {
    plan: Rc<Plan>,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let mut plan = Plan::parse(&text);
        if plan.metrics > 0 {
            plan.counter = hostcalls::define_metric(MetricType::Counter, "ma_bench_noop_calls").ok();
        }
        self.plan = Rc::new(plan);
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            plan: Rc::clone(&self.plan),
        }))
    }
}

struct Noop {
    plan: Rc<Plan>,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let p = &self.plan;
        for _ in 0..p.get_headers {
            let _ = hostcalls::get_map(MapType::HttpRequestHeaders);
        }
        for i in 0..p.set_property {
            let key = format!("ma_bench_field_{i}");
            let _ = hostcalls::set_property(vec![key.as_str()], Some(b"some-value".as_slice()));
        }
        for i in 0..p.header_edits {
            // Pairs of set/remove on a header of our own, so nothing extra goes upstream.
            let value = if i % 2 == 0 { Some("x") } else { None };
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-ma-bench", value);
        }
        if p.header_edits % 2 == 1 {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-ma-bench", None);
        }
        for i in 0..p.shared_get {
            let _ = hostcalls::get_shared_data(&format!("ma_bench.key.{}", i % 4));
        }
        for i in 0..p.shared_set {
            let _ = hostcalls::set_shared_data(
                &format!("ma_bench.key.{}", i % 4),
                Some(b"{\"tokens\":1000000,\"at\":1}".as_slice()),
                None,
            );
        }
        for _ in 0..p.time {
            let _ = hostcalls::get_current_time();
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let p = &self.plan;
        for _ in 0..p.status {
            let _ = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
        }
        for i in 0..p.add_response_headers {
            let _ = hostcalls::add_map_value(
                MapType::HttpResponseHeaders,
                &format!("x-ma-bench-{i}"),
                "1",
            );
        }
        if p.rewrite_body {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.plan.rewrite_body {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        if let Ok(Some(body)) = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
            let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &body);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(id) = self.plan.counter {
            for _ in 0..self.plan.metrics {
                let _ = hostcalls::increment_metric(id, 1);
            }
        }
    }
}
