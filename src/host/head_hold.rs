//! The watch on held request heads: a careless config must fail with a clear answer, not hang.
//!
//! With `isolation.hold_request_head` (the default) a stream returns `Pause` from its request
//! headers while an inspected body arrives. That only works when the Wasm filter's Envoy config
//! has `allow_on_headers_stop_iteration: true`: without it Envoy turns the pause into "stop
//! everything" and never delivers the body, so the call would wait for a timeout. The first body
//! callback of a held stream proves the setting for the whole VM (it is one filter config);
//! until then the filter root's one-second tick answers streams held longer than
//! [`UNPROVEN_HOLD_LIMIT_MS`] with a 500 that names the setting, and logs it once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// How long a held head may wait for its first body byte before the VM, with the setting not
/// yet proven, assumes Envoy will never deliver it. Generous: a client pausing this long
/// between head and body on the very first inspected call of a VM is answered 500 too.
pub const UNPROVEN_HOLD_LIMIT_MS: u64 = 10_000;

thread_local! {
    /// A held stream got a body callback: Envoy honours the pause of the head in this VM.
    static PROVEN: Cell<bool> = const { Cell::new(false) };
    /// Held streams still waiting for their first body callback: context id -> since (ms).
    static WAITING: RefCell<HashMap<u32, u64>> = RefCell::new(HashMap::new());
}

/// A stream now holds its head for its body.
pub fn held(context_id: u32, now_ms: u64) {
    if !PROVEN.with(Cell::get) {
        WAITING.with(|w| w.borrow_mut().insert(context_id, now_ms));
    }
}

/// A body (or trailers) callback arrived on `context_id`: if it was held, the setting works.
pub fn body_arrived(context_id: u32) {
    let was_waiting = WAITING.with(|w| w.borrow_mut().remove(&context_id).is_some());
    if was_waiting {
        PROVEN.with(|p| p.set(true));
        WAITING.with(|w| w.borrow_mut().clear());
    }
}

/// The stream ended (or was answered): stop watching it.
pub fn forget(context_id: u32) {
    WAITING.with(|w| {
        w.borrow_mut().remove(&context_id);
    });
}

/// Held streams that waited longer than the limit without the setting proven; each is
/// returned once.
pub fn overdue(now_ms: u64) -> Vec<u32> {
    if PROVEN.with(Cell::get) {
        return Vec::new();
    }
    WAITING.with(|w| {
        let mut waiting = w.borrow_mut();
        let late: Vec<u32> = waiting
            .iter()
            .filter(|(_, since)| now_ms.saturating_sub(**since) > UNPROVEN_HOLD_LIMIT_MS)
            .map(|(id, _)| *id)
            .collect();
        for id in &late {
            waiting.remove(id);
        }
        late
    })
}
