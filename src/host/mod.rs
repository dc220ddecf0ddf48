//! The glue: the only code that calls proxy-wasm hostcalls. Compiled for `wasm32` only.
//!
//! Each piece reads the host at the edge, hands plain values to the pure core, and applies the
//! core's answer. It never panics: host results are `Result`s from `proxy_wasm::hostcalls`
//! (the SDK's trait helpers `unwrap` them), and a panic hook logs at Critical in case.

mod claims;
mod credentials;
mod enforce;
#[cfg(feature = "fault-injection")]
mod fault_injection;
mod head_hold;
mod lookup;
mod metrics;
mod ownership;
mod root;
mod store;
mod stream;

use std::time::UNIX_EPOCH;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // Replaces the SDK's hook (which unwraps the log call) with one that cannot itself fail.
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("ma-gateway panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::GatewayRoot::new(context_id))
    });
}}

/// Host time in milliseconds since the epoch (0 if the host cannot tell).
pub fn now_ms() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
