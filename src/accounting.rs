//! Exactly-once usage accounting per session, over the [`Store`] shared by all workers.
//!
//! This module owns deciding how much of an [`Observation`] is *new* — the delta a worker
//! should emit as metrics — given everything any worker has already charged for the session.
//! It does not price anything (`pricing` does, from the [`Charge`] returned here), parse
//! anything (`usage` does) or talk to Envoy (the host glue implements [`Store`]).
//!
//! # What can be seen more than once
//! The same usage reaches the gateway many times: two clients streaming one session see the
//! same `span.*_end` events; a reconnecting client re-reads them through
//! `GET /v1/sessions/{id}/events` (same event `id`); and cumulative snapshots (`session.usage`
//! events, `usage` on a session body) repeat everything so far. Some usage is never seen as
//! a span at all (nobody was streaming).
//!
//! # The rule
//! Per session the store keeps, per usage type, `charged` (what was emitted so far) and
//! `spans` (the sum of the distinct spans counted), plus the hashed ids of the spans counted.
//! Every quantity only grows, and every observation moves `charged` up to a *lower bound of
//! the truth*, never past it:
//! - a span whose id was counted before is a duplicate: nothing;
//! - a new span adds its tokens to `spans` and `charged := max(charged, spans)`. The sum of
//!   distinct spans cannot exceed the session's true usage, so this never over-charges, and
//!   a span already covered by an earlier snapshot charges only what the snapshot has not
//!   already covered (usually nothing);
//! - a snapshot sets `charged := max(charged, snapshot)`: a stale (lower) snapshot does
//!   nothing, a newer one adds exactly what spans missed.
//!
//! So `charged` never exceeds the truth, and equals it after every snapshot. In between it can
//! lag: when spans were missed before a snapshot, `spans` sits below `charged` and the next new
//! spans first fill that gap (charging nothing) until the next snapshot, which the server sends
//! each time the session goes idle. Without timestamps nobody can tell whether a span the
//! gateway first sees *after* a snapshot is covered by it; lagging is the choice that never
//! over-bills.
//!
//! Cache writes: spans report one lump (`cache_creation_input_tokens`), snapshots split it into
//! 5-minute and 1-hour writes. The store keeps the lump total and the 1-hour part; span lumps
//! count as 5-minute writes (the cheaper rate) until a snapshot says otherwise. When it does,
//! tokens already charged at the 5m rate are *reclassified* ([`Charge::cache_write_5m_to_1h`]),
//! so that the money charged is exact and never more than the truth as long as the 1-hour
//! price is at least the 5-minute price (true of every list price).
//!
//! # Money: estimates, then Anthropic's list cost
//! Each charge is priced as it is recorded, inside the same compare-and-swap, by the caller's
//! pricer (`pricing::PriceTable::estimate` with the span's speed, band, the session's geo):
//! the record keeps the session's charged cost exactly (whole µ$ plus a sub-µ$ remainder), and
//! the charge carries the whole µ$ it added ([`Charge::estimate_micros`]). When a snapshot
//! carries Anthropic's cumulative `list_cost` and covers everything charged (no counted span
//! is newer than it: every charged total is at most the snapshot's), the charged cost is set
//! to exactly that figure and the charge carries the signed difference
//! ([`Charge::correction_micros`]): up when the table was low or the model unpriced, down
//! when it was high. The same snapshot seen again (a second stream, a history page, the
//! reconciler's read) finds the cost already equal and corrects nothing, so each figure
//! corrects the session exactly once; an older snapshot (it does not cover spans counted
//! since, or its list cost is below one applied) corrects nothing either, and estimates of
//! later spans add on top until the next figure.
//!
//! # Bounded state, and why forgetting is never allowed
//! Forgetting a span id would double count that span when a reconnecting client re-reads the
//! history — and `GET …/events` lists the whole session, so a *recent*-ids window cannot be
//! enough: a 1,000-span session re-read through a 256-id window would count 744 spans twice.
//! So the record keeps the hashes (8 bytes each) of the first [`Limits::max_span_ids`] spans
//! it counted and never evicts one. Once full, new span ids are not counted one by one
//! (`deferred`): the session falls back to snapshot cadence, which is still exact at every
//! idle and never over-counts. Snapshots need no id memory at all.
//!
//! # Expiry
//! Shared data cannot delete keys, and a record simply dropped (or reset) would let a later
//! history read or session GET charge the whole session a second time. So a session idle
//! longer than [`Limits::idle_ttl_secs`] is *compacted*, never reset: its span ids are dropped
//! and it keeps only its charged totals (~100 bytes). A compacted session still reconciles
//! exactly against snapshots; its spans are no longer counted (they are all deferred to the
//! next snapshot) since duplicates could no longer be recognised. The trade-off picked: a
//! small tombstone per session for the life of the Envoy process (its key could not be
//! removed anyway) in exchange for never double counting. An Envoy restart empties shared
//! data, after which old sessions are charged from zero again: that needs external storage.
//!
//! # The index
//! `ma_gateway.usage.index` lists up to [`Limits::index_capacity`] sessions with a coarse
//! last-activity time, for a background task to reconcile ([`active_sessions`]) and expire
//! ([`sweep`]). When full, admitting a session evicts the least recently touched one and
//! compacts it, so full-size records are bounded by the index capacity.
//!
//! # Concurrency
//! Every change is a compare-and-swap read-modify-write ([`store::update`]); a worker that
//! loses a race re-reads and re-applies its observation to the winner's state, so two workers
//! seeing the same span emit it once between them. Creating a key is last-writer-wins in
//! proxy-wasm (see `store`): the host should call [`observe_session`] when it sees the
//! `POST /v1/sessions` response, so that a session's record exists before anybody streams it.

use base64::Engine;
use serde::Serialize;
use serde_json::Value;

use crate::store::{self, Store, StoreError};
use crate::usage::{Observation, SessionFacts, Snapshot, SpanTokens};

/// Prefix of the per-session record keys: `ma_gateway.usage.<session_id>`.
pub const KEY_PREFIX: &str = "ma_gateway.usage.";
/// Key of the index of known sessions.
pub const INDEX_KEY: &str = "ma_gateway.usage.index";
/// Version written into every record; a record of another version is an error, never
/// silently re-started (that would double count).
const RECORD_VERSION: u32 = 1;
/// µ$ in one cent (list costs are in minor units of USD).
const MICROS_PER_CENT: u64 = 10_000;
/// Longest session id accepted into a key.
const MAX_SESSION_ID_BYTES: usize = 128;

/// Bounds and timings of the accounting state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Span ids remembered per session (8 bytes each). Beyond it spans are deferred to the
    /// next snapshot (see the module doc).
    pub max_span_ids: usize,
    /// A session with no change for longer than this is compacted.
    pub idle_ttl_secs: u64,
    /// Sessions listed in the index.
    pub index_capacity: usize,
    /// Compare-and-swap attempts per update.
    pub cas_attempts: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // 4 KiB of hashes: hundreds of model requests, i.e. many turns of tool loops.
            max_span_ids: 512,
            idle_ttl_secs: 6 * 3600,
            index_capacity: 1024,
            cas_attempts: 16,
        }
    }
}

impl Limits {
    /// How stale an index entry may get before activity refreshes it: keeps index writes
    /// rare (the index is one hot key) while its order stays close to least-recently-used.
    fn touch_interval(&self) -> u64 {
        (self.idle_ttl_secs / 4).max(1)
    }
}

/// Cumulative usage charged for a session, in the classes prices are quoted in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub active_seconds: u64,
    pub web_search_requests: u64,
}

/// What one observation added, to be emitted as metrics (and priced with `pricing`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    /// New cache writes charged at the 5-minute rate.
    pub cache_write_5m: u64,
    /// New cache writes charged at the 1-hour rate.
    pub cache_write_1h: u64,
    /// Cache-write tokens charged earlier at the 5-minute rate that a snapshot showed to be
    /// 1-hour writes: they now cost the difference of the two rates. For token metrics they
    /// are 1-hour tokens; a monotonic 5m counter keeps counting them too (counters cannot go
    /// down), so `5m − reclassified` is the true 5m figure.
    pub cache_write_5m_to_1h: u64,
    pub active_seconds: u64,
    pub web_search_requests: u64,
    /// The span had been counted already (by this or another worker, stream or page).
    pub duplicate: bool,
    /// The span is new but was not counted individually because the session's id set is
    /// full or was expired; the next snapshot charges it.
    pub deferred: bool,
    /// The session's charged totals before this charge. Pricing charges the difference of
    /// the cumulative cost, so that many small charges sum to exactly one big one.
    pub before: Tally,
    /// The session's model, when known (from [`observe_session`]).
    pub model: Option<String>,
    /// The session runs with `inference_geo: "us"` (from [`observe_session`]).
    pub geo_us: bool,
    /// Whole µ$ the pricer's estimate of this charge added to the session's charged cost.
    pub estimate_micros: u64,
    /// The pricer could not price this charge (unknown model): its tokens cost nothing until
    /// a list cost corrects the session.
    pub unpriced: bool,
    /// µ$ by which Anthropic's list cost corrected the session's charged cost (signed).
    pub correction_micros: i64,
    /// The list cost (µ$) this charge set the session's charged cost to, if it did.
    pub list_cost_micros: Option<u64>,
    /// The session's charged cost (µ$) after this charge.
    pub charged_micros: u64,
}

impl Charge {
    /// Whether no usage was added (a list-cost correction may still have happened).
    pub fn is_zero(&self) -> bool {
        self.after() == self.before
    }

    /// Whether neither usage nor money changed.
    pub fn is_nothing(&self) -> bool {
        self.is_zero() && self.correction_micros == 0 && self.list_cost_micros.is_none()
    }

    /// The session's charged totals after this charge.
    pub fn after(&self) -> Tally {
        let b = &self.before;
        Tally {
            input: b.input.saturating_add(self.input),
            output: b.output.saturating_add(self.output),
            cache_read: b.cache_read.saturating_add(self.cache_read),
            cache_write_5m: b
                .cache_write_5m
                .saturating_add(self.cache_write_5m)
                .saturating_sub(self.cache_write_5m_to_1h),
            cache_write_1h: b
                .cache_write_1h
                .saturating_add(self.cache_write_1h)
                .saturating_add(self.cache_write_5m_to_1h),
            active_seconds: b.active_seconds.saturating_add(self.active_seconds),
            web_search_requests: b
                .web_search_requests
                .saturating_add(self.web_search_requests),
        }
    }
}

/// What the store knows about one session (for the reconciler, debugging and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSummary {
    pub charged: Tally,
    /// Span ids remembered.
    pub span_ids: usize,
    /// Idle past the TTL: span ids dropped, only snapshots count.
    pub compacted: bool,
    pub model: Option<String>,
    /// Time of the last change, in the caller's seconds.
    pub last_change_secs: u64,
    /// Whole µ$ charged for the session (estimates and list-cost corrections).
    pub charged_micros: u64,
    /// The highest list cost (µ$) applied to the session.
    pub list_cost_micros: Option<u64>,
}

/// The store key of a session's record.
pub fn session_key(session_id: &str) -> String {
    format!("{KEY_PREFIX}{session_id}")
}

/// Records one observation for a session with the default [`Limits`].
pub fn record(
    store: &dyn Store,
    session_id: &str,
    observation: &Observation,
    now_secs: u64,
) -> Result<Charge, StoreError> {
    record_with(store, &Limits::default(), session_id, observation, now_secs)
}

/// Records one observation for a session and returns what it added, without pricing it.
pub fn record_with(
    store: &dyn Store,
    limits: &Limits,
    session_id: &str,
    observation: &Observation,
    now_secs: u64,
) -> Result<Charge, StoreError> {
    record_priced(store, limits, session_id, observation, &no_price, now_secs)
}

/// Prices a charge exactly, in 1/`pricing::EXACT_UNITS_PER_MICRO` µ$; `None` when it cannot
/// (unknown model). Called inside the compare-and-swap, so it must be pure.
pub type Pricer<'a> = &'a dyn Fn(&Charge) -> Option<u128>;

/// Exact units per µ$ (same as `pricing::EXACT_UNITS_PER_MICRO`).
const UNITS_PER_MICRO: u128 = 3_600 * 1_000_000 * 10;

fn no_price(_: &Charge) -> Option<u128> {
    Some(0)
}

/// Records one observation and prices what it added with `pricer` (see the module doc).
pub fn record_priced(
    store: &dyn Store,
    limits: &Limits,
    session_id: &str,
    observation: &Observation,
    pricer: Pricer<'_>,
    now_secs: u64,
) -> Result<Charge, StoreError> {
    apply(
        store,
        limits,
        session_id,
        Input::Observation(observation),
        pricer,
        now_secs,
    )
}

/// Records what a session body says: remembers the model (spans carry none) and reconciles
/// the snapshot, if any. Call it on `POST /v1/sessions` and `GET /v1/sessions/{id}` responses
/// and from the reconciler.
pub fn observe_session(
    store: &dyn Store,
    limits: &Limits,
    facts: &SessionFacts,
    now_secs: u64,
) -> Result<Charge, StoreError> {
    observe_session_priced(store, limits, facts, &no_price, now_secs)
}

/// [`observe_session`], pricing what the snapshot adds with `pricer`.
pub fn observe_session_priced(
    store: &dyn Store,
    limits: &Limits,
    facts: &SessionFacts,
    pricer: Pricer<'_>,
    now_secs: u64,
) -> Result<Charge, StoreError> {
    apply(
        store,
        limits,
        &facts.session_id,
        Input::Facts(facts),
        pricer,
        now_secs,
    )
}

/// Whether a record's slot may be given to another session (see `bounded`): only once the
/// record has been idle longer than the default TTL, i.e. its session is settled. An
/// unreadable record is never evicted.
pub fn evictable(bytes: &[u8], now_secs: u64) -> bool {
    Record::decode(bytes).is_ok_and(|record| record.idle_past_ttl(&Limits::default(), now_secs))
}

/// What the store holds for a session, if anything.
pub fn summary(store: &dyn Store, session_id: &str) -> Result<Option<SessionSummary>, StoreError> {
    let Some((bytes, _)) = store.get(&session_key(session_id)) else {
        return Ok(None);
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    let record = Record::decode(&bytes)?;
    Ok(Some(SessionSummary {
        charged: record.charged.tally(),
        span_ids: record.span_ids.len(),
        compacted: record.compacted,
        model: record.model.clone(),
        last_change_secs: record.last_change,
        charged_micros: record.charged_micros(),
        list_cost_micros: record.list_cost,
    }))
}

/// The sessions in the index, least recently touched first: what a background task should
/// reconcile (`GET /v1/sessions/{id}` → [`observe_session`]).
pub fn active_sessions(store: &dyn Store) -> Vec<String> {
    let mut entries = read_index(store.get(INDEX_KEY).as_ref().map(|(v, _)| v.as_slice()));
    entries.sort_by_key(|(_, touched)| *touched);
    entries.into_iter().map(|(id, _)| id).collect()
}

/// Compacts every indexed session idle longer than the TTL and drops it from the index.
/// Returns the sessions compacted. Errors on single sessions are logged and skipped.
pub fn sweep(store: &dyn Store, limits: &Limits, now_secs: u64) -> Result<Vec<String>, StoreError> {
    let mut gone = Vec::new();
    for session_id in active_sessions(store) {
        match compact(store, limits, &session_id, Some(now_secs)) {
            Ok(true) => gone.push(session_id),
            Ok(false) => {}
            Err(error) => log::warn!("usage sweep: session {session_id}: {error}"),
        }
    }
    if !gone.is_empty() {
        store::update(store, INDEX_KEY, limits.cas_attempts, |current| {
            let mut entries = read_index(current);
            entries.retain(|(id, _)| !gone.contains(id));
            Some((encode_index(&entries)?, ()))
        })?;
    }
    Ok(gone)
}

// ---------------------------------------------------------------------------------------------

enum Input<'a> {
    Observation(&'a Observation),
    Facts(&'a SessionFacts),
}

/// A session id usable in a key: visible ASCII, bounded, and never the index's name.
fn valid_session_id(session_id: &str) -> bool {
    !session_id.is_empty()
        && session_id.len() <= MAX_SESSION_ID_BYTES
        && session_id.bytes().all(|b| b.is_ascii_graphic())
        && session_key(session_id) != INDEX_KEY
}

fn apply(
    store: &dyn Store,
    limits: &Limits,
    session_id: &str,
    input: Input<'_>,
    pricer: Pricer<'_>,
    now_secs: u64,
) -> Result<Charge, StoreError> {
    if !valid_session_id(session_id) {
        return Err(StoreError::Other("invalid session id".into()));
    }
    let key = session_key(session_id);
    let evicted = store.get(&key).is_none_or(|(bytes, _)| bytes.is_empty())
        && crate::bounded::was_evicted(store, &crate::bounded::USAGE, session_id);
    let mut unchanged = Charge::default();
    let mut failure = None;
    // Set by the attempt that wrote: whether it created the record, and its previous time.
    let mut previous_change = None;
    let written = store::update(store, &key, limits.cas_attempts, |current| {
        let (mut record, previous) = match current {
            // A record evicted from its bounded slot (see `bounded`) comes back as a
            // baseline: its next snapshot is taken as already charged, its spans deferred.
            None if evicted => (Record::baseline(now_secs), None),
            None => (Record::new(now_secs), None),
            Some(bytes) => match Record::decode(bytes) {
                Ok(record) => {
                    let previous = record.last_change;
                    (record, Some(previous))
                }
                Err(error) => {
                    failure = Some(error);
                    return None;
                }
            },
        };
        // A baseline record is always written, so that it re-baselines only once.
        let expired = record.expire_if_idle(limits, now_secs) || (current.is_none() && evicted);
        let (mut charge, changed, list_cost) = match input {
            Input::Observation(Observation::Span {
                event_id, tokens, ..
            }) => {
                let (charge, changed) = record.add_span(limits, event_id, tokens);
                (charge, changed, None)
            }
            Input::Observation(Observation::Snapshot(snapshot)) => {
                record.rebaseline(snapshot);
                let (charge, changed) = record.add_snapshot(snapshot);
                let list_cost = snapshot
                    .list_cost_cents
                    .filter(|_| record.charged == Charged::of(snapshot));
                (charge, changed, list_cost)
            }
            Input::Facts(facts) => {
                let model_changed = match &facts.model {
                    Some(model) if record.model.as_ref() != Some(model) => {
                        record.model = Some(model.clone());
                        true
                    }
                    _ => false,
                };
                let geo_us = facts.inference_geo.as_deref() == Some("us");
                let geo_changed = facts.inference_geo.is_some() && geo_us != record.geo_us;
                if geo_changed {
                    record.geo_us = geo_us;
                }
                let (charge, changed) = match &facts.snapshot {
                    Some(snapshot) => {
                        record.rebaseline(snapshot);
                        record.add_snapshot(snapshot)
                    }
                    None => (record.no_charge(), false),
                };
                let list_cost = facts
                    .snapshot
                    .as_ref()
                    .filter(|s| record.charged == Charged::of(s))
                    .and_then(|s| s.list_cost_cents);
                (charge, changed || model_changed || geo_changed, list_cost)
            }
        };
        charge.geo_us = record.geo_us;
        let priced = record.price(&mut charge, pricer);
        let corrected = record.correct(&mut charge, list_cost);
        charge.charged_micros = record.charged_micros();
        let changed = changed || priced || corrected;
        if !(changed || expired) {
            unchanged = charge;
            return None;
        }
        record.last_change = now_secs;
        let bytes = match record.encode() {
            Ok(bytes) => bytes,
            Err(error) => {
                failure = Some(error);
                return None;
            }
        };
        previous_change = Some(previous);
        Some((bytes, charge))
    })?;
    if let Some(error) = failure {
        return Err(error);
    }
    let Some(charge) = written else {
        return Ok(unchanged);
    };
    // The charge is committed: index trouble must not hide it from the caller.
    let stale = previous_change
        .flatten()
        .is_none_or(|previous| now_secs.saturating_sub(previous) >= limits.touch_interval());
    if stale {
        if let Err(error) = touch_index(store, limits, session_id, now_secs) {
            log::warn!("usage index: session {session_id}: {error}");
        }
    }
    Ok(charge)
}

/// Adds or refreshes a session in the index, evicting (and compacting) the least recently
/// touched session when full.
fn touch_index(
    store: &dyn Store,
    limits: &Limits,
    session_id: &str,
    now_secs: u64,
) -> Result<(), StoreError> {
    let capacity = limits.index_capacity.max(1);
    let evicted = store::update(store, INDEX_KEY, limits.cas_attempts, |current| {
        let mut entries = read_index(current);
        let mut evicted = Vec::new();
        match entries.iter_mut().find(|(id, _)| id == session_id) {
            Some(entry) => entry.1 = now_secs,
            None => {
                while entries.len() >= capacity {
                    let oldest = entries
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, touched))| *touched)
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    evicted.push(entries.remove(oldest).0);
                }
                entries.push((session_id.to_string(), now_secs));
            }
        }
        Some((encode_index(&entries)?, evicted))
    })?;
    for id in evicted.into_iter().flatten() {
        if let Err(error) = compact(store, limits, &id, None) {
            log::warn!("usage index: compacting evicted session {id}: {error}");
        }
    }
    Ok(())
}

/// Compacts a session's record: unconditionally (`idle_at: None`) or only when idle past the
/// TTL at `idle_at`. Returns whether the session no longer belongs in the index: it was
/// compacted (now or before) and is idle, or it has no record.
fn compact(
    store: &dyn Store,
    limits: &Limits,
    session_id: &str,
    idle_at: Option<u64>,
) -> Result<bool, StoreError> {
    let mut done = false;
    let mut failure = None;
    store::update(
        store,
        &session_key(session_id),
        limits.cas_attempts,
        |current| {
            let Some(bytes) = current else {
                done = true;
                return None;
            };
            let mut record = match Record::decode(bytes) {
                Ok(record) => record,
                Err(error) => {
                    failure = Some(error);
                    return None;
                }
            };
            // A compacted session that is active again (it came back to the index) stays
            // listed: it depends on snapshots, which the reconciler provides.
            done = idle_at.is_none_or(|now| record.idle_past_ttl(limits, now));
            if !done || !record.compact() {
                return None;
            }
            match record.encode() {
                Ok(bytes) => Some((bytes, ())),
                Err(error) => {
                    failure = Some(error);
                    None
                }
            }
        },
    )?;
    match failure {
        Some(error) => Err(error),
        None => Ok(done),
    }
}

fn read_index(bytes: Option<&[u8]>) -> Vec<(String, u64)> {
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        return Vec::new();
    };
    match IndexRecord::decode(bytes) {
        Some(index) if index.v == u64::from(RECORD_VERSION) => index.s,
        // The index only guides reconciliation and expiry; losing it loses no usage.
        _ => {
            log::warn!("usage index is unreadable; starting a new one");
            Vec::new()
        }
    }
}

/// `None` only if serde_json fails, in which case the index is left as it was.
fn encode_index(entries: &[(String, u64)]) -> Option<Vec<u8>> {
    let index = IndexRecord {
        v: u64::from(RECORD_VERSION),
        s: entries.to_vec(),
    };
    serde_json::to_vec(&index).ok()
}

#[derive(Serialize)]
struct IndexRecord {
    v: u64,
    /// `[session_id, last_touched_secs]`.
    s: Vec<(String, u64)>,
}

// The stored records are read by walking a `serde_json::Value` rather than with
// `#[derive(Deserialize)]`: a derived integer field makes serde link its "invalid type:
// floating point `1.5`" message and with it core's float printing, ~20 KB of the module.

impl IndexRecord {
    fn decode(bytes: &[u8]) -> Option<IndexRecord> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        let record = value.as_object()?;
        let mut s = Vec::new();
        for entry in record.get("s")?.as_array()? {
            match entry.as_array()?.as_slice() {
                [id, touched] => s.push((id.as_str()?.to_string(), touched.as_u64()?)),
                _ => return None,
            }
        }
        Some(IndexRecord {
            v: record.get("v")?.as_u64()?,
            s,
        })
    }
}

/// The `u64`s of a JSON array of exactly `N` of them.
fn u64_array<const N: usize>(value: &Value) -> Option<[u64; N]> {
    let items = value.as_array().filter(|items| items.len() == N)?;
    let mut out = [0; N];
    for (slot, item) in out.iter_mut().zip(items) {
        *slot = item.as_u64()?;
    }
    Some(out)
}

/// Charged totals as stored: cache writes as a lump plus its 1-hour part, so that every field
/// only grows (the 5-minute part shrinks when a snapshot reclassifies writes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Charged {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
    cache_write_1h: u64,
    active_seconds: u64,
    web_search_requests: u64,
}

impl Charged {
    fn tally(&self) -> Tally {
        Tally {
            input: self.input,
            output: self.output,
            cache_read: self.cache_read,
            cache_write_5m: self.cache_write.saturating_sub(self.cache_write_1h),
            cache_write_1h: self.cache_write_1h,
            active_seconds: self.active_seconds,
            web_search_requests: self.web_search_requests,
        }
    }

    fn to_array(self) -> [u64; 7] {
        [
            self.input,
            self.output,
            self.cache_read,
            self.cache_write,
            self.cache_write_1h,
            self.active_seconds,
            self.web_search_requests,
        ]
    }

    fn from_array(a: [u64; 7]) -> Charged {
        Charged {
            input: a[0],
            output: a[1],
            cache_read: a[2],
            cache_write: a[3],
            cache_write_1h: a[4],
            active_seconds: a[5],
            web_search_requests: a[6],
        }
    }

    /// Field-wise maximum, keeping `cache_write_1h <= cache_write`.
    fn raise_to(&mut self, target: &Charged) {
        self.input = self.input.max(target.input);
        self.output = self.output.max(target.output);
        self.cache_read = self.cache_read.max(target.cache_read);
        self.cache_write_1h = self.cache_write_1h.max(target.cache_write_1h);
        self.cache_write = self
            .cache_write
            .max(target.cache_write)
            .max(self.cache_write_1h);
        self.active_seconds = self.active_seconds.max(target.active_seconds);
        self.web_search_requests = self.web_search_requests.max(target.web_search_requests);
    }
}

/// The difference between two charged states as a [`Charge`].
fn difference(before: &Charged, after: &Charged, model: &Option<String>) -> Charge {
    let (b, a) = (before.tally(), after.tally());
    let new_1h = a.cache_write_1h - b.cache_write_1h.min(a.cache_write_1h);
    // Tokens that left the 5m class went to the 1h class: reclassified, not new.
    let reclassified = b.cache_write_5m.saturating_sub(a.cache_write_5m);
    Charge {
        input: a.input.saturating_sub(b.input),
        output: a.output.saturating_sub(b.output),
        cache_read: a.cache_read.saturating_sub(b.cache_read),
        cache_write_5m: a.cache_write_5m.saturating_sub(b.cache_write_5m),
        cache_write_1h: new_1h.saturating_sub(reclassified),
        cache_write_5m_to_1h: reclassified,
        active_seconds: a.active_seconds.saturating_sub(b.active_seconds),
        web_search_requests: a.web_search_requests.saturating_sub(b.web_search_requests),
        before: b,
        model: model.clone(),
        ..Charge::default()
    }
}

/// One session's accounting state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    charged: Charged,
    /// Sums of the distinct spans counted: input, output, cache read, cache write lump.
    spans: [u64; 4],
    /// FNV-1a hashes of the span ids counted, in order; never evicted.
    span_ids: Vec<u64>,
    compacted: bool,
    last_change: u64,
    model: Option<String>,
    geo_us: bool,
    /// The pricer's estimate of everything charged, exactly (never reset).
    cost: Cost,
    /// The highest list cost (µ$) applied.
    list_cost: Option<u64>,
    /// `cost.whole` when that list cost was applied: the charged cost is the list cost plus
    /// the estimates since.
    cost_at_list: u64,
    /// A baseline record (re-created after eviction) that has not seen a snapshot yet.
    rebaseline: bool,
}

/// An exact amount of money: whole µ$ plus `remainder` / `UNITS_PER_MICRO` µ$.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cost {
    whole: u64,
    remainder: u64,
}

impl Cost {
    /// Adds `units` (1/`UNITS_PER_MICRO` µ$); returns the whole µ$ added.
    fn add(&mut self, units: u128) -> u64 {
        let total = u128::from(self.remainder).saturating_add(units);
        let whole = u64::try_from(total / UNITS_PER_MICRO).unwrap_or(u64::MAX);
        let before = self.whole;
        self.whole = self.whole.saturating_add(whole);
        self.remainder = u64::try_from(total % UNITS_PER_MICRO).unwrap_or(0);
        self.whole - before
    }
}

/// The stored form: short field names, ids as base64 of little-endian hashes.
#[derive(Serialize)]
struct StoredRecord {
    v: u64,
    c: [u64; 7],
    p: [u64; 4],
    #[serde(default, skip_serializing_if = "String::is_empty")]
    h: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    x: bool,
    t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    /// `inference_geo: "us"`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    g: bool,
    /// Charged cost: whole µ$, remainder units.
    #[serde(default, skip_serializing_if = "is_zero_pair")]
    k: [u64; 2],
    /// Highest list cost applied, µ$.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<u64>,
    /// Estimate (whole µ$) when `l` was applied.
    #[serde(default, skip_serializing_if = "is_zero")]
    a: u64,
    /// Waiting for the snapshot that re-baselines it (see `Record::baseline`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    b: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_pair(pair: &[u64; 2]) -> bool {
    *pair == [0, 0]
}

impl StoredRecord {
    /// Missing `p`, `h`, `x` and `m` take their defaults (older records and the encoder's
    /// omissions); unknown fields are ignored.
    fn decode(bytes: &[u8]) -> Result<StoredRecord, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let record = value.as_object().ok_or("not a JSON object")?;
        let field = |name: &str| record.get(name).filter(|v| !v.is_null());
        let wrong = |name: &str| format!("field `{name}` is missing or malformed");
        Ok(StoredRecord {
            v: field("v")
                .and_then(Value::as_u64)
                .ok_or_else(|| wrong("v"))?,
            c: field("c").and_then(u64_array).ok_or_else(|| wrong("c"))?,
            p: match field("p") {
                None => [0; 4],
                Some(p) => u64_array(p).ok_or_else(|| wrong("p"))?,
            },
            h: match field("h") {
                None => String::new(),
                Some(h) => h.as_str().ok_or_else(|| wrong("h"))?.to_string(),
            },
            x: match field("x") {
                None => false,
                Some(x) => x.as_bool().ok_or_else(|| wrong("x"))?,
            },
            t: field("t")
                .and_then(Value::as_u64)
                .ok_or_else(|| wrong("t"))?,
            m: match field("m") {
                None => None,
                Some(m) => Some(m.as_str().ok_or_else(|| wrong("m"))?.to_string()),
            },
            g: match field("g") {
                None => false,
                Some(g) => g.as_bool().ok_or_else(|| wrong("g"))?,
            },
            k: match field("k") {
                None => [0; 2],
                Some(k) => u64_array(k).ok_or_else(|| wrong("k"))?,
            },
            l: match field("l") {
                None => None,
                Some(l) => Some(l.as_u64().ok_or_else(|| wrong("l"))?),
            },
            a: match field("a") {
                None => 0,
                Some(a) => a.as_u64().ok_or_else(|| wrong("a"))?,
            },
            b: match field("b") {
                None => false,
                Some(b) => b.as_bool().ok_or_else(|| wrong("b"))?,
            },
        })
    }
}

impl Record {
    fn new(now_secs: u64) -> Record {
        Record {
            charged: Charged::default(),
            spans: [0; 4],
            span_ids: Vec::new(),
            compacted: false,
            last_change: now_secs,
            model: None,
            geo_us: false,
            cost: Cost::default(),
            list_cost: None,
            cost_at_list: 0,
            rebaseline: false,
        }
    }

    /// The record of a session whose record was evicted: compacted (its spans can no longer
    /// be told from duplicates) and waiting to take its next snapshot as the baseline.
    fn baseline(now_secs: u64) -> Record {
        Record {
            compacted: true,
            rebaseline: true,
            ..Record::new(now_secs)
        }
    }

    /// On a baseline record, takes `snapshot` as already charged (totals and list cost) so
    /// that nothing the evicted record had charged is charged again.
    fn rebaseline(&mut self, snapshot: &Snapshot) {
        if !self.rebaseline {
            return;
        }
        self.rebaseline = false;
        self.charged.raise_to(&Charged::of(snapshot));
        if let Some(cents) = snapshot.list_cost_cents {
            self.list_cost = Some(cents.saturating_mul(MICROS_PER_CENT));
            self.cost_at_list = self.cost.whole;
        }
    }

    fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
        // Never restart an unreadable record from zero: the next snapshot would charge the
        // whole session again.
        let bad = |why: String| StoreError::Other(format!("unreadable usage record: {why}"));
        let stored = StoredRecord::decode(bytes).map_err(bad)?;
        if stored.v != u64::from(RECORD_VERSION) {
            return Err(bad(format!("version {}", stored.v)));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(stored.h.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        if raw.len() % 8 != 0 {
            return Err(bad("span id hashes are not 8-byte aligned".into()));
        }
        let span_ids = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(Record {
            charged: Charged::from_array(stored.c),
            spans: stored.p,
            span_ids,
            compacted: stored.x,
            last_change: stored.t,
            model: stored.m,
            geo_us: stored.g,
            cost: Cost {
                whole: stored.k[0],
                remainder: stored.k[1],
            },
            list_cost: stored.l,
            cost_at_list: stored.a,
            rebaseline: stored.b,
        })
    }

    /// Fails only if serde_json does; then nothing is written, rather than an empty value
    /// that would read as a brand-new session.
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let raw: Vec<u8> = self.span_ids.iter().flat_map(|h| h.to_le_bytes()).collect();
        let stored = StoredRecord {
            v: u64::from(RECORD_VERSION),
            c: self.charged.to_array(),
            p: self.spans,
            h: base64::engine::general_purpose::STANDARD.encode(raw),
            x: self.compacted,
            t: self.last_change,
            m: self.model.clone(),
            g: self.geo_us,
            k: [self.cost.whole, self.cost.remainder],
            l: self.list_cost,
            a: self.cost_at_list,
            b: self.rebaseline,
        };
        serde_json::to_vec(&stored)
            .map_err(|e| StoreError::Other(format!("encoding usage record: {e}")))
    }

    fn no_charge(&self) -> Charge {
        Charge {
            before: self.charged.tally(),
            model: self.model.clone(),
            geo_us: self.geo_us,
            charged_micros: self.charged_micros(),
            ..Charge::default()
        }
    }

    /// Adds the pricer's estimate of `charge` to the charged cost. Returns whether the record
    /// changed.
    fn price(&mut self, charge: &mut Charge, pricer: Pricer<'_>) -> bool {
        if charge.is_zero() {
            return false;
        }
        match pricer(charge) {
            Some(units) => {
                let before = self.cost;
                charge.estimate_micros = self.cost.add(units);
                self.cost != before
            }
            None => {
                charge.unpriced = true;
                false
            }
        }
    }

    /// Sets the charged cost to the list cost (cents) of a snapshot that covers everything
    /// charged (the caller checks), unless it is below one already applied (list costs only
    /// grow: a lower one is stale). Returns whether the record changed.
    fn correct(&mut self, charge: &mut Charge, list_cost_cents: Option<u64>) -> bool {
        let Some(cents) = list_cost_cents else {
            return false;
        };
        let micros = cents.saturating_mul(MICROS_PER_CENT);
        if self.list_cost.is_some_and(|seen| micros < seen)
            || (self.list_cost == Some(micros) && self.charged_micros() == micros)
        {
            return false;
        }
        let delta = i128::from(micros) - i128::from(self.charged_micros());
        charge.correction_micros =
            i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        charge.list_cost_micros = Some(micros);
        self.list_cost = Some(micros);
        self.cost_at_list = self.cost.whole;
        true
    }

    /// µ$ charged for the session: the last list cost plus the estimates since, or the
    /// estimates alone before any list cost.
    fn charged_micros(&self) -> u64 {
        match self.list_cost {
            Some(list) => list.saturating_add(self.cost.whole.saturating_sub(self.cost_at_list)),
            None => self.cost.whole,
        }
    }

    /// Drops what only span counting needs. Returns whether anything changed.
    fn compact(&mut self) -> bool {
        if self.compacted {
            return false;
        }
        self.compacted = true;
        self.span_ids = Vec::new();
        self.spans = [0; 4];
        true
    }

    fn idle_past_ttl(&self, limits: &Limits, now_secs: u64) -> bool {
        now_secs.saturating_sub(self.last_change) > limits.idle_ttl_secs
    }

    fn expire_if_idle(&mut self, limits: &Limits, now_secs: u64) -> bool {
        self.idle_past_ttl(limits, now_secs) && self.compact()
    }

    fn add_span(&mut self, limits: &Limits, event_id: &str, tokens: &SpanTokens) -> (Charge, bool) {
        let mut charge = self.no_charge();
        let hash = fnv1a64(event_id.as_bytes());
        if self.span_ids.contains(&hash) {
            charge.duplicate = true;
            return (charge, false);
        }
        if self.compacted || self.span_ids.len() >= limits.max_span_ids {
            charge.deferred = true;
            return (charge, false);
        }
        self.span_ids.push(hash);
        let s = &mut self.spans;
        s[0] = s[0].saturating_add(tokens.input);
        s[1] = s[1].saturating_add(tokens.output);
        s[2] = s[2].saturating_add(tokens.cache_read);
        s[3] = s[3].saturating_add(tokens.cache_creation);
        let target = Charged {
            input: s[0],
            output: s[1],
            cache_read: s[2],
            cache_write: s[3],
            ..Charged::default()
        };
        let before = self.charged;
        self.charged.raise_to(&target);
        // Changed even when nothing is charged: the id must be remembered.
        (difference(&before, &self.charged, &self.model), true)
    }

    fn add_snapshot(&mut self, snapshot: &Snapshot) -> (Charge, bool) {
        let target = Charged::of(snapshot);
        let before = self.charged;
        self.charged.raise_to(&target);
        let changed = self.charged != before;
        (difference(&before, &self.charged, &self.model), changed)
    }
}

impl Charged {
    /// What a snapshot says was used.
    fn of(snapshot: &Snapshot) -> Charged {
        Charged {
            input: snapshot.input,
            output: snapshot.output,
            cache_read: snapshot.cache_read,
            cache_write: snapshot
                .cache_write_5m
                .saturating_add(snapshot.cache_write_1h),
            cache_write_1h: snapshot.cache_write_1h,
            active_seconds: snapshot.active_seconds.unwrap_or(0),
            web_search_requests: snapshot.web_search_requests,
        }
    }
}

/// 64-bit FNV-1a: stable across builds and workers, which a span-id set shared by all
/// workers needs. A collision makes a new span look like a duplicate (an under-charge the
/// next snapshot repairs), with odds of about n / 2^64.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use std::cell::RefCell;

    use super::*;
    use crate::store::MemoryStore;
    use crate::usage::SpanKind;

    const SID: &str = "sesn_1";

    fn span(
        id: &str,
        input: u64,
        output: u64,
        cache_creation: u64,
        cache_read: u64,
    ) -> Observation {
        Observation::Span {
            event_id: id.to_string(),
            kind: SpanKind::ModelRequest,
            tokens: SpanTokens {
                input,
                output,
                cache_creation,
                cache_read,
            },
            speed: None,
            is_error: false,
        }
    }

    fn snap(input: u64, output: u64, cache_read: u64, w5m: u64, w1h: u64) -> Observation {
        Observation::Snapshot(Snapshot {
            input,
            output,
            cache_read,
            cache_write_5m: w5m,
            cache_write_1h: w1h,
            ..Snapshot::default()
        })
    }

    fn tokens(c: &Charge) -> [u64; 6] {
        [
            c.input,
            c.output,
            c.cache_read,
            c.cache_write_5m,
            c.cache_write_1h,
            c.cache_write_5m_to_1h,
        ]
    }

    fn charged(store: &MemoryStore) -> Tally {
        summary(store, SID).unwrap().unwrap().charged
    }

    fn tally(input: u64, output: u64, cache_read: u64, w5m: u64, w1h: u64) -> Tally {
        Tally {
            input,
            output,
            cache_read,
            cache_write_5m: w5m,
            cache_write_1h: w1h,
            ..Tally::default()
        }
    }

    #[test]
    fn first_span_is_charged_in_full() {
        let store = MemoryStore::new();
        let charge = record(&store, SID, &span("sevt_1", 3571, 727, 10, 6656), 100).unwrap();
        assert_eq!(tokens(&charge), [3571, 727, 6656, 10, 0, 0]);
        assert!(!charge.duplicate && !charge.deferred);
        assert_eq!(charge.before, Tally::default());
        assert_eq!(charge.after(), tally(3571, 727, 6656, 10, 0));
    }

    #[test]
    fn duplicate_span_from_two_streams_counts_once() {
        let store = MemoryStore::new();
        let first = record(&store, SID, &span("sevt_1", 100, 10, 0, 5), 1).unwrap();
        let writes = store.writes();
        let second = record(&store, SID, &span("sevt_1", 100, 10, 0, 5), 1).unwrap();
        assert_eq!(tokens(&first), [100, 10, 5, 0, 0, 0]);
        assert_eq!(tokens(&second), [0; 6]);
        assert!(second.duplicate && second.is_zero());
        assert_eq!(second.before, tally(100, 10, 5, 0, 0));
        assert_eq!(store.writes(), writes, "a duplicate writes nothing");
        assert_eq!(charged(&store), tally(100, 10, 5, 0, 0));
    }

    #[test]
    fn history_reread_counts_once() {
        let store = MemoryStore::new();
        for (i, id) in ["sevt_a", "sevt_b", "sevt_c"].iter().enumerate() {
            record(&store, SID, &span(id, 10 * (i as u64 + 1), 1, 0, 0), 1).unwrap();
        }
        // A reconnecting client lists the same events through GET …/events.
        for id in ["sevt_a", "sevt_b", "sevt_c"] {
            let charge = record(&store, SID, &span(id, 999, 999, 999, 999), 2).unwrap();
            assert!(charge.duplicate && charge.is_zero(), "{id}");
        }
        assert_eq!(charged(&store), tally(60, 3, 0, 0, 0));
    }

    #[test]
    fn snapshot_after_spans_adds_only_the_missing_difference() {
        let store = MemoryStore::new();
        record(&store, SID, &span("sevt_1", 100, 10, 20, 5), 1).unwrap();
        record(&store, SID, &span("sevt_2", 50, 5, 0, 5), 1).unwrap();
        // A third request nobody streamed: input 30, output 7, read 2.
        let charge = record(&store, SID, &snap(180, 22, 12, 20, 0), 2).unwrap();
        assert_eq!(tokens(&charge), [30, 7, 2, 0, 0, 0]);
        assert_eq!(charge.before, tally(150, 15, 10, 20, 0));
        assert_eq!(charged(&store), tally(180, 22, 12, 20, 0));
        // The same snapshot again (another stream, a GET) adds nothing and writes nothing.
        let writes = store.writes();
        let again = record(&store, SID, &snap(180, 22, 12, 20, 0), 3).unwrap();
        assert!(again.is_zero() && !again.duplicate);
        assert_eq!(store.writes(), writes);
    }

    #[test]
    fn span_already_covered_by_a_snapshot_charges_nothing() {
        let store = MemoryStore::new();
        // Nobody streamed: the first thing seen is the snapshot.
        let first = record(&store, SID, &snap(1000, 100, 0, 0, 0), 1).unwrap();
        assert_eq!(tokens(&first), [1000, 100, 0, 0, 0, 0]);
        // Then a history read shows the spans it was made of.
        for (id, input) in [("sevt_1", 600), ("sevt_2", 400)] {
            let charge = record(&store, SID, &span(id, input, 50, 0, 0), 2).unwrap();
            assert!(charge.is_zero() && !charge.duplicate, "{id}");
        }
        // A genuinely new span beyond the snapshot charges only what exceeds it.
        let charge = record(&store, SID, &span("sevt_3", 300, 30, 0, 0), 3).unwrap();
        assert_eq!(tokens(&charge), [300, 30, 0, 0, 0, 0]);
        assert_eq!(charged(&store), tally(1300, 130, 0, 0, 0));
    }

    #[test]
    fn missed_spans_fill_the_gap_before_charging() {
        // The lag the rule accepts: a snapshot covers 1000 input; the gateway had seen 400 of
        // it as spans. A new 300-token span after that could be covered or new: only the part
        // above the snapshot is charged (0), and the next snapshot settles it.
        let store = MemoryStore::new();
        record(&store, SID, &span("sevt_1", 400, 0, 0, 0), 1).unwrap();
        record(&store, SID, &snap(1000, 0, 0, 0, 0), 2).unwrap();
        let charge = record(&store, SID, &span("sevt_9", 300, 0, 0, 0), 3).unwrap();
        assert!(charge.is_zero());
        let charge = record(&store, SID, &snap(1300, 0, 0, 0, 0), 4).unwrap();
        assert_eq!(charge.input, 300);
    }

    #[test]
    fn stale_snapshot_changes_nothing() {
        let store = MemoryStore::new();
        record(&store, SID, &snap(500, 50, 5, 5, 5), 1).unwrap();
        record(&store, SID, &span("sevt_1", 600, 60, 0, 0), 1).unwrap();
        let writes = store.writes();
        let charge = record(&store, SID, &snap(400, 40, 4, 4, 4), 2).unwrap();
        assert!(charge.is_zero() && !charge.duplicate);
        assert_eq!(store.writes(), writes);
        assert_eq!(charged(&store), tally(600, 60, 5, 5, 5));
        // A partly newer snapshot raises only the fields that grew.
        let charge = record(&store, SID, &snap(400, 70, 4, 4, 4), 2).unwrap();
        assert_eq!(tokens(&charge), [0, 10, 0, 0, 0, 0]);
    }

    #[test]
    fn snapshot_corrects_the_cache_write_split() {
        let store = MemoryStore::new();
        // Spans report a lump of 90 cache-write tokens: charged as 5m.
        record(&store, SID, &span("sevt_1", 0, 0, 60, 0), 1).unwrap();
        record(&store, SID, &span("sevt_2", 0, 0, 30, 0), 1).unwrap();
        assert_eq!(charged(&store), tally(0, 0, 0, 90, 0));
        // The snapshot says 40 were 5m and 50 were 1h: 50 are reclassified, nothing is new.
        let charge = record(&store, SID, &snap(0, 0, 0, 40, 50), 2).unwrap();
        assert_eq!(tokens(&charge), [0, 0, 0, 0, 0, 50]);
        assert_eq!(charge.after(), tally(0, 0, 0, 40, 50));
        // A later snapshot with 10 more 1h writes (a span we missed): 10 new 1h tokens.
        let charge = record(&store, SID, &snap(0, 0, 0, 40, 60), 3).unwrap();
        assert_eq!(tokens(&charge), [0, 0, 0, 0, 10, 0]);
        // A new span lump of 5: total 105 > snapshot 100, the excess is charged as 5m.
        let charge = record(&store, SID, &span("sevt_3", 0, 0, 15, 0), 4).unwrap();
        assert_eq!(tokens(&charge), [0, 0, 0, 5, 0, 0]);
        assert_eq!(charged(&store), tally(0, 0, 0, 45, 60));
    }

    #[test]
    fn split_correction_with_new_writes_in_the_same_snapshot() {
        let store = MemoryStore::new();
        record(&store, SID, &span("sevt_1", 0, 0, 90, 0), 1).unwrap();
        // Truth: 40 × 5m + 60 × 1h = 100; 90 were charged as 5m.
        let charge = record(&store, SID, &snap(0, 0, 0, 40, 60), 2).unwrap();
        assert_eq!(tokens(&charge), [0, 0, 0, 0, 10, 50]);
        assert_eq!(charge.after(), tally(0, 0, 0, 40, 60));
    }

    #[test]
    fn runtime_and_web_search_come_from_snapshots() {
        let store = MemoryStore::new();
        let mut snapshot = Snapshot {
            active_seconds: Some(30),
            web_search_requests: 2,
            ..Snapshot::default()
        };
        let charge = record(&store, SID, &Observation::Snapshot(snapshot.clone()), 1).unwrap();
        assert_eq!((charge.active_seconds, charge.web_search_requests), (30, 2));
        snapshot.active_seconds = None; // not reported: keeps what was charged
        snapshot.web_search_requests = 5;
        let charge = record(&store, SID, &Observation::Snapshot(snapshot), 2).unwrap();
        assert_eq!((charge.active_seconds, charge.web_search_requests), (0, 3));
        assert_eq!(charged(&store).active_seconds, 30);
    }

    #[test]
    fn cas_conflicts_are_retried_and_stay_exact() {
        let store = MemoryStore::new();
        record(&store, SID, &span("sevt_1", 10, 1, 0, 0), 1).unwrap();
        store.inject_cas_conflicts(5);
        let charge = record(&store, SID, &span("sevt_2", 20, 2, 0, 0), 2).unwrap();
        assert_eq!(store.pending_cas_conflicts(), 0);
        assert_eq!(tokens(&charge), [20, 2, 0, 0, 0, 0]);
        assert_eq!(charged(&store), tally(30, 3, 0, 0, 0));
        // Out of attempts: an error, and nothing recorded.
        store.inject_cas_conflicts(1000);
        let limits = Limits {
            cas_attempts: 3,
            ..Limits::default()
        };
        let result = record_with(&store, &limits, SID, &span("sevt_3", 5, 0, 0, 0), 3);
        assert_eq!(result, Err(StoreError::CasMismatch));
        store.inject_cas_conflicts(0);
        assert_eq!(charged(&store), tally(30, 3, 0, 0, 0));
    }

    /// A store where, just before this worker's first write, another worker records the
    /// given observation: the interleaving CAS exists for.
    struct Racing {
        inner: MemoryStore,
        rival: RefCell<Option<Observation>>,
        rival_charge: RefCell<Option<Charge>>,
    }

    impl Store for Racing {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let rival = self.rival.borrow_mut().take();
            if let Some(observation) = rival {
                let charge = record(&self.inner, SID, &observation, 5).unwrap();
                *self.rival_charge.borrow_mut() = Some(charge);
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn two_workers_racing_on_one_span_charge_it_once() {
        let store = Racing {
            inner: MemoryStore::new(),
            rival: RefCell::new(None),
            rival_charge: RefCell::new(None),
        };
        record(&store, SID, &span("sevt_0", 1, 0, 0, 0), 1).unwrap();
        *store.rival.borrow_mut() = Some(span("sevt_1", 100, 10, 0, 0));
        let mine = record(&store, SID, &span("sevt_1", 100, 10, 0, 0), 5).unwrap();
        let theirs = store.rival_charge.borrow().clone().unwrap();
        // The rival won the race; this worker retried, found the id, and charged nothing.
        assert_eq!(tokens(&theirs), [100, 10, 0, 0, 0, 0]);
        assert!(mine.duplicate && mine.is_zero());
        assert_eq!(
            summary(&store.inner, SID).unwrap().unwrap().charged,
            tally(101, 10, 0, 0, 0)
        );

        // A rival snapshot racing a span: the span is re-applied on top of the snapshot.
        *store.rival.borrow_mut() = Some(snap(500, 50, 0, 0, 0));
        let mine = record(&store, SID, &span("sevt_2", 300, 30, 0, 0), 6).unwrap();
        let theirs = store.rival_charge.borrow().clone().unwrap();
        assert_eq!(tokens(&theirs), [399, 40, 0, 0, 0, 0]);
        assert!(
            mine.is_zero(),
            "span sum 401 is covered by the snapshot's 500"
        );
        assert_eq!(
            summary(&store.inner, SID).unwrap().unwrap().charged,
            tally(500, 50, 0, 0, 0)
        );
    }

    #[test]
    fn the_span_id_set_is_bounded_and_never_forgets() {
        let store = MemoryStore::new();
        let limits = Limits {
            max_span_ids: 3,
            ..Limits::default()
        };
        for i in 0..3 {
            let charge = record_with(
                &store,
                &limits,
                SID,
                &span(&format!("sevt_{i}"), 10, 0, 0, 0),
                1,
            )
            .unwrap();
            assert_eq!(charge.input, 10);
        }
        let size = store.value(&session_key(SID)).unwrap().len();
        // Full: a new span is deferred, not counted, not remembered.
        let charge = record_with(&store, &limits, SID, &span("sevt_3", 10, 0, 0, 0), 2).unwrap();
        assert!(charge.deferred && !charge.duplicate && charge.is_zero());
        assert_eq!(store.value(&session_key(SID)).unwrap().len(), size);
        // The first ids are still known: a full history re-read charges nothing.
        for i in 0..4 {
            let charge = record_with(
                &store,
                &limits,
                SID,
                &span(&format!("sevt_{i}"), 10, 0, 0, 0),
                3,
            )
            .unwrap();
            assert!(charge.is_zero());
            assert_eq!(charge.duplicate, i < 3);
        }
        // The snapshot catches up with the deferred span.
        let charge = record_with(&store, &limits, SID, &snap(40, 0, 0, 0, 0), 4).unwrap();
        assert_eq!(charge.input, 10);
        let summary = summary(&store, SID).unwrap().unwrap();
        assert_eq!((summary.span_ids, summary.charged.input), (3, 40));
    }

    #[test]
    fn record_size_is_bounded_by_the_id_cap() {
        let store = MemoryStore::new();
        for i in 0..2000 {
            record(&store, SID, &span(&format!("sevt_{i:020}"), 1, 1, 1, 1), 1).unwrap();
        }
        let bytes = store.value(&session_key(SID)).unwrap();
        // 512 hashes × 8 bytes, base64: 5,464 characters, plus ~100 bytes of totals.
        assert!(bytes.len() < 5_600, "{}", bytes.len());
        assert_eq!(
            summary(&store, SID).unwrap().unwrap().charged,
            tally(512, 512, 512, 512, 0)
        );
    }

    #[test]
    fn idle_sessions_are_compacted_never_reset() {
        let store = MemoryStore::new();
        let limits = Limits {
            idle_ttl_secs: 100,
            ..Limits::default()
        };
        record_with(&store, &limits, SID, &span("sevt_1", 100, 10, 0, 0), 1_000).unwrap();
        record_with(&store, &limits, SID, &span("sevt_2", 100, 10, 0, 0), 1_050).unwrap();
        // Exactly at the TTL it is still live.
        let charge =
            record_with(&store, &limits, SID, &span("sevt_1", 100, 10, 0, 0), 1_150).unwrap();
        assert!(charge.duplicate);
        // Past it, the next observation compacts it first.
        let big = store.value(&session_key(SID)).unwrap().len();
        let charge =
            record_with(&store, &limits, SID, &span("sevt_1", 100, 10, 0, 0), 1_151).unwrap();
        assert!(charge.deferred && charge.is_zero());
        let summary_now = summary(&store, SID).unwrap().unwrap();
        assert!(summary_now.compacted);
        assert_eq!(
            (summary_now.span_ids, summary_now.charged),
            (0, tally(200, 20, 0, 0, 0))
        );
        assert!(store.value(&session_key(SID)).unwrap().len() < big);
        // A history read after expiry cannot double count: spans are deferred…
        for id in ["sevt_1", "sevt_2", "sevt_3"] {
            assert!(
                record_with(&store, &limits, SID, &span(id, 100, 10, 0, 0), 1_200)
                    .unwrap()
                    .is_zero()
            );
        }
        // …and the session snapshot charges only what the totals kept do not cover.
        let charge = record_with(&store, &limits, SID, &snap(300, 30, 0, 0, 0), 1_300).unwrap();
        assert_eq!(tokens(&charge), [100, 10, 0, 0, 0, 0]);
    }

    #[test]
    fn index_lists_sessions_and_sweep_expires_idle_ones() {
        let store = MemoryStore::new();
        let limits = Limits {
            idle_ttl_secs: 100,
            ..Limits::default()
        };
        record_with(
            &store,
            &limits,
            "sesn_a",
            &span("sevt_1", 1, 0, 0, 0),
            1_000,
        )
        .unwrap();
        record_with(
            &store,
            &limits,
            "sesn_b",
            &span("sevt_1", 1, 0, 0, 0),
            1_060,
        )
        .unwrap();
        assert_eq!(active_sessions(&store), vec!["sesn_a", "sesn_b"]);
        // Activity within the touch interval (25 s) does not rewrite the index.
        let index = store.get(INDEX_KEY).unwrap();
        record_with(
            &store,
            &limits,
            "sesn_b",
            &span("sevt_2", 1, 0, 0, 0),
            1_070,
        )
        .unwrap();
        assert_eq!(store.get(INDEX_KEY).unwrap(), index);
        // Idle for exactly the TTL is not yet expired.
        assert_eq!(sweep(&store, &limits, 1_100).unwrap(), Vec::<String>::new());
        assert_eq!(sweep(&store, &limits, 1_101).unwrap(), vec!["sesn_a"]);
        assert_eq!(active_sessions(&store), vec!["sesn_b"]);
        assert!(summary(&store, "sesn_a").unwrap().unwrap().compacted);
        assert!(!summary(&store, "sesn_b").unwrap().unwrap().compacted);
        // A compacted session that comes back (a snapshot much later) is indexed again.
        record_with(&store, &limits, "sesn_a", &snap(5, 0, 0, 0, 0), 5_000).unwrap();
        assert_eq!(active_sessions(&store), vec!["sesn_b", "sesn_a"]);
        // …and stays listed while active, although it is still compacted.
        assert_eq!(sweep(&store, &limits, 5_050).unwrap(), vec!["sesn_b"]);
        assert_eq!(active_sessions(&store), vec!["sesn_a"]);
        assert!(summary(&store, "sesn_a").unwrap().unwrap().compacted);
        assert_eq!(sweep(&store, &limits, 5_101).unwrap(), vec!["sesn_a"]);
        assert!(active_sessions(&store).is_empty());
    }

    #[test]
    fn a_full_index_evicts_and_compacts_the_least_recent() {
        let store = MemoryStore::new();
        let limits = Limits {
            index_capacity: 2,
            ..Limits::default()
        };
        for (i, sid) in ["sesn_a", "sesn_b", "sesn_c"].iter().enumerate() {
            record_with(&store, &limits, sid, &span("sevt_1", 1, 0, 0, 0), i as u64).unwrap();
        }
        assert_eq!(active_sessions(&store), vec!["sesn_b", "sesn_c"]);
        let evicted = summary(&store, "sesn_a").unwrap().unwrap();
        assert!(evicted.compacted);
        assert_eq!(evicted.charged.input, 1);
    }

    #[test]
    fn session_facts_carry_the_model_into_charges() {
        let store = MemoryStore::new();
        let facts = SessionFacts {
            session_id: SID.into(),
            model: Some("claude-opus-4-6".into()),
            ..SessionFacts::default()
        };
        let charge = observe_session(&store, &Limits::default(), &facts, 1).unwrap();
        assert!(charge.is_zero());
        assert_eq!(charge.model.as_deref(), Some("claude-opus-4-6"));
        let charge = record(&store, SID, &span("sevt_1", 5, 0, 0, 0), 2).unwrap();
        assert_eq!(charge.model.as_deref(), Some("claude-opus-4-6"));
        // A body with a snapshot reconciles like a session.usage event.
        let facts = SessionFacts {
            snapshot: Some(Snapshot {
                input: 8,
                ..Snapshot::default()
            }),
            ..facts
        };
        let charge = observe_session(&store, &Limits::default(), &facts, 3).unwrap();
        assert_eq!(charge.input, 3);
        // Nothing new: no write.
        let writes = store.writes();
        observe_session(&store, &Limits::default(), &facts, 4).unwrap();
        assert_eq!(store.writes(), writes);
    }

    #[test]
    fn empty_snapshot_of_an_unknown_session_creates_nothing() {
        let store = MemoryStore::new();
        let charge = record(&store, SID, &snap(0, 0, 0, 0, 0), 1).unwrap();
        assert!(charge.is_zero());
        assert!(store.is_empty());
    }

    #[test]
    fn bad_session_ids_and_unreadable_records_are_errors() {
        let store = MemoryStore::new();
        for bad in ["", "index", "a b", &"s".repeat(129)] {
            assert!(matches!(
                record(&store, bad, &span("sevt_1", 1, 0, 0, 0), 1),
                Err(StoreError::Other(_))
            ));
        }
        store
            .set(
                &session_key(SID),
                b"{\"v\":2,\"c\":[0,0,0,0,0,0,0],\"t\":0}",
                None,
            )
            .unwrap();
        let writes = store.writes();
        assert!(matches!(
            record(&store, SID, &snap(9, 0, 0, 0, 0), 1),
            Err(StoreError::Other(_))
        ));
        assert_eq!(
            store.writes(),
            writes,
            "an unreadable record is never overwritten"
        );
        // A tombstone (empty value) is an absent record.
        store.set(&session_key(SID), b"", None).unwrap();
        assert_eq!(
            record(&store, SID, &snap(9, 0, 0, 0, 0), 1).unwrap().input,
            9
        );
    }

    /// Prices every token at 1 µ$ (spans of `fast` at 2 µ$), unknown model → unpriced.
    fn flat(charge: &Charge) -> Option<u128> {
        let tokens = charge.input + charge.output + charge.cache_read + charge.cache_write_5m;
        match charge.model.as_deref() {
            Some("unknown-model") => None,
            _ => Some(u128::from(tokens) * UNITS_PER_MICRO),
        }
    }

    fn snap_cost(input: u64, cents: u64) -> Observation {
        Observation::Snapshot(Snapshot {
            input,
            list_cost_cents: Some(cents),
            ..Snapshot::default()
        })
    }

    fn rec(store: &MemoryStore, o: &Observation) -> Charge {
        record_priced(store, &Limits::default(), SID, o, &flat, 1).unwrap()
    }

    #[test]
    fn list_cost_corrects_the_estimate_exactly_once_up_and_down() {
        let store = MemoryStore::new();
        let c = rec(&store, &span("a", 30_000, 0, 0, 0));
        assert_eq!((c.estimate_micros, c.charged_micros), (30_000, 30_000));
        // list_cost 4 cents = 40,000 µ$: up by 10,000, the snapshot's tokens add no estimate.
        let c = rec(&store, &snap_cost(30_000, 4));
        assert_eq!(
            (
                c.estimate_micros,
                c.correction_micros,
                c.list_cost_micros,
                c.charged_micros
            ),
            (0, 10_000, Some(40_000), 40_000)
        );
        // The same figure again (second stream, history page, reconciler): nothing.
        for _ in 0..3 {
            let c = rec(&store, &snap_cost(30_000, 4));
            assert!(c.is_nothing(), "{c:?}");
            assert_eq!(c.charged_micros, 40_000);
        }
        // A later span adds its estimate on top; a stale figure (older than the span, or
        // lower than one applied) does not undo it.
        let c = rec(&store, &span("b", 50_000, 0, 0, 0));
        assert_eq!((c.estimate_micros, c.charged_micros), (50_000, 90_000));
        assert!(rec(&store, &snap_cost(30_000, 4)).is_nothing());
        assert!(rec(&store, &snap_cost(80_000, 3)).is_nothing());
        // A higher figure below the estimate corrects down, exactly to it.
        let c = rec(&store, &snap_cost(80_000, 7));
        assert_eq!((c.correction_micros, c.charged_micros), (-20_000, 70_000));
        let summary = summary(&store, SID).unwrap().unwrap();
        assert_eq!(
            (summary.charged_micros, summary.list_cost_micros),
            (70_000, Some(70_000))
        );
        // Session facts carry the same figure: nothing more.
        let facts = SessionFacts {
            session_id: SID.into(),
            snapshot: Some(Snapshot {
                input: 80_000,
                list_cost_cents: Some(7),
                ..Snapshot::default()
            }),
            ..SessionFacts::default()
        };
        let c = observe_session_priced(&store, &Limits::default(), &facts, &flat, 2).unwrap();
        assert!(c.is_nothing(), "{c:?}");
        // A newer snapshot with the same (rounded) figure covering more usage: the usage was
        // in the figure, so the estimate of it is taken back.
        let c = rec(&store, &span("c", 5_000, 0, 0, 0));
        assert_eq!(c.charged_micros, 75_000);
        let c = rec(&store, &snap_cost(85_000, 7));
        assert_eq!((c.correction_micros, c.charged_micros), (-5_000, 70_000));
        assert!(rec(&store, &snap_cost(85_000, 7)).is_nothing());
    }

    #[test]
    fn unpriced_sessions_converge_to_the_list_cost() {
        let store = MemoryStore::new();
        let facts = SessionFacts {
            session_id: SID.into(),
            model: Some("unknown-model".into()),
            inference_geo: Some("us".into()),
            ..SessionFacts::default()
        };
        observe_session_priced(&store, &Limits::default(), &facts, &flat, 1).unwrap();
        let c = rec(&store, &span("a", 1_000, 10, 0, 0));
        assert!(c.unpriced && c.geo_us);
        assert_eq!(
            (c.estimate_micros, c.charged_micros, c.input),
            (0, 0, 1_000)
        );
        // Not covering the span's output yet: no correction from it.
        assert!(rec(&store, &snap_cost(1_000, 100))
            .list_cost_micros
            .is_none());
        let c = rec(
            &store,
            &Observation::Snapshot(Snapshot {
                input: 1_000,
                output: 10,
                list_cost_cents: Some(123),
                ..Snapshot::default()
            }),
        );
        assert_eq!(
            (c.correction_micros, c.charged_micros),
            (1_230_000, 1_230_000)
        );
    }

    #[test]
    fn sub_micro_estimates_are_kept_exactly() {
        let store = MemoryStore::new();
        let third = |_: &Charge| Some(UNITS_PER_MICRO / 3);
        let mut sum = 0;
        for i in 0..300 {
            let c = record_priced(
                &store,
                &Limits::default(),
                SID,
                &span(&format!("s{i}"), 1, 0, 0, 0),
                &third,
                1,
            )
            .unwrap();
            sum += c.estimate_micros;
        }
        assert_eq!(sum, 100);
    }

    #[test]
    fn record_round_trips() {
        let record = Record {
            charged: Charged::from_array([1, 2, 3, 4, 5, 6, 7]),
            spans: [8, 9, 10, 11],
            span_ids: vec![fnv1a64(b"sevt_1"), u64::MAX, 0],
            compacted: false,
            last_change: 12,
            model: Some("claude-opus-4-6".into()),
            geo_us: true,
            cost: Cost {
                whole: 13,
                remainder: 14,
            },
            list_cost: Some(15),
            cost_at_list: 16,
            rebaseline: false,
        };
        assert_eq!(Record::decode(&record.encode().unwrap()).unwrap(), record);
        let tombstone = Record {
            span_ids: vec![],
            compacted: true,
            model: None,
            geo_us: false,
            cost: Cost::default(),
            list_cost: None,
            cost_at_list: 0,
            ..record
        };
        let bytes = tombstone.encode().unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"v":1,"c":[1,2,3,4,5,6,7],"p":[8,9,10,11],"x":true,"t":12}"#
        );
        assert_eq!(Record::decode(&bytes).unwrap(), tombstone);
        // FNV-1a 64 reference values.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// A deterministic mix of live spans, duplicates, history re-reads and snapshots: at every
    /// step charged ≤ truth, and after a final snapshot charged == truth.
    #[test]
    fn never_over_charges_and_converges() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..20 {
            let store = MemoryStore::new();
            let limits = Limits {
                max_span_ids: 40,
                ..Limits::default()
            };
            let mut spans: Vec<Observation> = Vec::new();
            let mut truth = Snapshot::default();
            let mut emitted = Tally::default();
            let mut now = 0;
            for _ in 0..200 {
                now += 1;
                let observation = match next(10) {
                    // A new model request, seen by a stream or missed (nobody streaming).
                    0..=4 => {
                        let (i, o, w, r) = (next(500), next(100), next(50), next(900));
                        let id = format!("sevt_{round}_{}", spans.len());
                        let s = span(&id, i, o, w, r);
                        truth.input += i;
                        truth.output += o;
                        truth.cache_read += r;
                        // The server knows the TTL split; spans only give the lump.
                        let h = next(w + 1);
                        truth.cache_write_1h += h;
                        truth.cache_write_5m += w - h;
                        spans.push(s.clone());
                        if next(3) == 0 {
                            continue;
                        }
                        s
                    }
                    // A re-read of any earlier span (second stream, history page).
                    5..=7 if !spans.is_empty() => spans[next(spans.len() as u64) as usize].clone(),
                    // A snapshot: current, or a stale copy from an earlier moment.
                    _ => {
                        let mut s = truth.clone();
                        if next(2) == 0 {
                            s.input /= 2;
                        }
                        Observation::Snapshot(s)
                    }
                };
                let charge = record_with(&store, &limits, SID, &observation, now).unwrap();
                assert_eq!(charge.before, emitted);
                emitted = charge.after();
                assert!(emitted.input <= truth.input && emitted.output <= truth.output);
                assert!(emitted.cache_read <= truth.cache_read);
                assert!(emitted.cache_write_1h <= truth.cache_write_1h);
                assert!(
                    emitted.cache_write_5m + emitted.cache_write_1h
                        <= truth.cache_write_5m + truth.cache_write_1h
                );
            }
            record_with(
                &store,
                &limits,
                SID,
                &Observation::Snapshot(truth.clone()),
                now + 1,
            )
            .unwrap();
            let done = summary(&store, SID).unwrap().unwrap().charged;
            assert_eq!(
                done,
                tally(
                    truth.input,
                    truth.output,
                    truth.cache_read,
                    truth.cache_write_5m,
                    truth.cache_write_1h
                ),
                "round {round}"
            );
        }
    }
}
