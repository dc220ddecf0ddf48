//! Test-only fault injection: compiled only with the cargo feature `fault-injection`, which no
//! shipped build enables (the e2e suite builds it into `target/fault-injection/`, and a test
//! checks the shipped `.wasm` does not contain [`HEADER`]).
//!
//! A request carrying `x-ma-gateway-fault: <point>` makes the VM panic at that point, so the
//! tests can watch what Envoy's `failure_policy` does with a real panic (`panic = "abort"`: the
//! VM traps, exactly like a bug would):
//!
//! - `request-headers`: in `on_http_request_headers`, before authentication;
//! - `response-body` or `response-body:<n>`: in `on_http_response_body`, at the `n`-th body
//!   callback carrying data (default 1), i.e. mid-stream for an SSE response;
//! - `tick`: the background service panics in its next `on_tick` (the flag goes through shared
//!   data, which the singleton shares with the filter VMs); the request itself proceeds.

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;

use crate::gateway::header_value;

/// The request header naming where to panic.
pub const HEADER: &str = "x-ma-gateway-fault";

/// Shared-data flag asking the background service to panic in its next tick.
const TICK_FLAG: &str = "ma_gateway.fault.tick";

thread_local! {
    /// Per stream (context id): body callbacks with data still to go before the panic.
    static ARMED: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
}

/// Reads the fault header of a request: panics now, or arms a later point.
pub fn on_request_headers(context_id: u32, headers: &[(String, String)]) {
    let Some(point) = header_value(headers, HEADER) else {
        return;
    };
    match point {
        "request-headers" => fail("on_http_request_headers"),
        "tick" => {
            if let Err(status) = hostcalls::set_shared_data(TICK_FLAG, Some(b"1"), None) {
                log::warn!("fault injection: tick flag not set: {status:?}");
            }
        }
        _ => {
            let countdown = match point.strip_prefix("response-body") {
                Some("") => Some(1),
                Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse::<u32>().ok()),
                None => None,
            };
            match countdown {
                Some(n) if n > 0 => ARMED.with(|armed| {
                    armed.borrow_mut().insert(context_id, n);
                }),
                _ => log::warn!("fault injection: unknown point {point:?}"),
            }
        }
    }
}

/// A response body callback: panics when this stream's countdown reaches zero.
pub fn on_response_body(context_id: u32, body_size: usize) {
    if body_size == 0 {
        return;
    }
    let due = ARMED.with(|armed| {
        let mut armed = armed.borrow_mut();
        match armed.get_mut(&context_id) {
            Some(left) if *left <= 1 => {
                armed.remove(&context_id);
                true
            }
            Some(left) => {
                *left -= 1;
                false
            }
            None => false,
        }
    });
    if due {
        fail("on_http_response_body");
    }
}

/// The stream is over: nothing stays armed for a reused context id.
pub fn forget(context_id: u32) {
    ARMED.with(|armed| {
        armed.borrow_mut().remove(&context_id);
    });
}

/// The background service's tick: panics once per raised flag (cleared first, so the reloaded
/// service does not panic again).
pub fn on_tick() {
    let raised = matches!(
        hostcalls::get_shared_data(TICK_FLAG),
        Ok((Some(bytes), _)) if !bytes.is_empty()
    );
    if raised {
        if let Err(status) = hostcalls::set_shared_data(TICK_FLAG, Some(b""), None) {
            log::warn!("fault injection: tick flag not cleared: {status:?}");
        }
        fail("on_tick");
    }
}

// Deliberately: this is the fault being injected, in test builds only.
#[allow(clippy::panic)]
fn fail(at: &str) -> ! {
    panic!("fault injected in {at} (fault-injection test build)")
}
