//! Request rate limits, concurrent streams and token/cost budgets, counted in shared data.
//!
//! This module owns three kinds of limit and the configuration that declares them:
//!
//! - **Request rates**: a token bucket per (scope, name, [`Class`]). The classes mirror the
//!   upstream's own limits: `create` (create, update, archive, delete, send events), `read`
//!   (read, list) and `stream` (opening an event stream). See [`admit`].
//! - **Concurrent streams**: leased slots per (scope, name) of event streams open right now,
//!   each renewed while its stream's body flows and freed when the stream ends or, if its VM
//!   died, when the lease runs out. See [`open_stream`], [`renew_stream`] and [`close_stream`].
//! - **Budgets**: tokens and list cost (integer micro-dollars, µ$) a tenant used in the current
//!   minute, UTC day and UTC calendar month. See [`charge`], [`check_budget`] and
//!   [`remaining_microdollars`].
//! - **Session budget reservations**: the money a tenant's sessions may still spend. See
//!   below and [`reserve_session_budget`].
//!
//! # Session budgets: each grant is reserved
//! Under a cost budget every session create and every session update that sets a budget gets
//! a session `budget` (the upstream stops the session there) no larger than what the tenant
//! can give it, and that money is *reserved* in a per-tenant ledger in shared data
//! (compare-and-swap, like every counter here) until the session cannot spend it any more:
//!
//! - what a grant may use is the least `limit - used` over the tenant's cost windows minus
//!   every other reservation's unspent part, so N sessions opened together on any workers
//!   share the money instead of each getting all of it. A create asking for less keeps its
//!   own budget and reserves only that; one asking for more gets what is left; one asking for
//!   nothing gets the tenant's `session_microdollars` (or what is left, if less or unset); a
//!   create when nothing is left is refused (429). Whole cents, rounded down;
//! - a create's reservation is pending (a lease of [`PENDING_RESERVATION_MS`]) until its
//!   response names the session; a failed create releases it;
//! - an update's ceiling is the spend seen on the session plus what is left; `null` (removing
//!   the budget) is refused; a lower budget gives the difference back; a failed update puts
//!   the previous reservation back;
//! - spend the gateway meters on a session ([`charge_session`]) is counted in the usage
//!   windows first and then taken off the session's reservation, so no money is ever counted
//!   in neither;
//! - archiving or deleting a session through the gateway releases its reservation. An *idle*
//!   session keeps it: it can be resumed and spend the rest of its budget. So without
//!   `session_microdollars`, the first session created without a budget holds all the tenant
//!   has and the next is refused until it is archived: set `session_microdollars` (or give
//!   sessions explicit budgets) to run several at once.
//!
//! Limits of the scheme: reservations are per Envoy process, like everything here, and are
//! lost with shared data (a restart); sessions created before that are not in the ledger
//! (their later updates are capped at what is left). A VM that dies between a create's
//! request and its response leaks the pending reservation for its lease, after which the
//! session's budget is no longer held.
//!
//! # Scope of every limit: one Envoy process
//! All counters live in proxy-wasm *shared data* through the [`Store`] seam, which is one map
//! per Envoy process shared by all its worker threads (and it survives a VM reload). So every
//! limit here is **per Envoy process**: with N gateway replicas a tenant gets up to N times each
//! rate, N times the concurrent streams and N times each budget. At fleet scale, either divide
//! the configured values by the replica count, or enforce request rates with Envoy's global
//! rate-limit service (`envoy.filters.http.ratelimit` + a `ratelimit` service, descriptors
//! `tenant`/`principal`/`class`) and budgets with a central ledger fed by the usage the gateway
//! meters; the [`Store`] seam is where such an implementation plugs in.
//!
//! # Config (`rules_from_json`)
//! ```json
//! {
//!   "per_tenant":    {"create": {"per_minute": 300, "burst": 50},
//!                     "read":   {"per_minute": 600},
//!                     "stream": {"per_minute": 60, "burst": 10},
//!                     "concurrent_streams": 20},
//!   "per_principal": {"create": {"per_minute": 60, "burst": 10}, "concurrent_streams": 5},
//!   "tenants": {
//!     "acme": {"create": {"per_minute": 1000, "burst": 100}, "read": null,
//!              "per_principal": {"concurrent_streams": 10}}
//!   },
//!   "stream_slot_lease_secs": 60,
//!   "budgets": {"tenants": {
//!     "acme": {"tokens_per_minute": 100000, "tokens_per_day": 5000000,
//!              "microdollars_per_day": 50000000, "microdollars_per_month": 1000000000},
//!     "*":    {"microdollars_per_day": 5000000}
//!   }}
//! }
//! ```
//! - A rate is `{"per_minute": 1..=6000000, "burst": 1..=6000000}`: the bucket holds `burst`
//!   requests (default: `per_minute`) and refills at `per_minute` per minute. A missing class is
//!   unlimited. `concurrent_streams` is 1..=1000000; missing is unlimited.
//! - `per_tenant` applies to each tenant (all its principals together), `per_principal` to each
//!   principal on its own. Both are checked; either refusing refuses the call.
//! - `tenants.<name>` overrides `per_tenant` field by field for that tenant, and its optional
//!   `per_principal` overrides `per_principal` for that tenant's principals. A field set to
//!   `null` lifts the inherited limit; a missing field inherits it.
//! - `stream_slot_lease_secs` (1..=86400, default 60): a stream slot not renewed for this long
//!   is free again. Renewal happens as the stream's body flows (events, pings), at most every
//!   third of the lease; set it above the longest quiet gap of a stream, or a quiet stream is
//!   not counted until its next chunk.
//! - `budgets.tenants.<name>` (or `"*"` for every tenant without its own entry; an own entry
//!   replaces `"*"` wholly) takes any of `tokens_per_{minute,day,month}` and
//!   `microdollars_per_{minute,day,month}`, each a non-negative integer (0 blocks the tenant).
//!   Tokens are all four usage kinds added up (input, output, cache writes and reads).
//!   `session_microdollars` (at least one cent) is the budget a session created without one
//!   is granted and reserved (see below); without it such a session gets all that is left.
//!
//! Errors name the field path: `limits.tenants.acme.create.per_minute: expected an integer from
//! 1 to 6000000, found 0`. Unknown fields are errors (a typo must not disable a limit).
//!
//! # Failure and exactness
//! Every write is a compare-and-swap retried [`CAS_ATTEMPTS`] times; a [`StoreError`] is handed
//! to the caller, who decides whether to fail open (availability) or closed. Reads never fail:
//! an undecodable value (only a bug can write one) is treated as absent and overwritten.
//!
//! Counting is exact once a key exists. The one gap is a key's very first write: Envoy inserts
//! a missing key whatever compare-and-swap token the write carries (see [`crate::store`]), so
//! workers that all saw the key missing each write from a fresh state, and all but the last
//! write are lost — at most one extra request, stream or unrecorded charge per such worker,
//! once per key and process lifetime. [`prepare_key`] closes the gap: called before traffic
//! (e.g. from `on_configure` for the configured tenants' keys) it creates the key empty, and
//! the first real write is then compare-and-swap protected like every other.

use std::collections::BTreeMap;

use crate::errors::json_type_name as type_name;
use serde_json::{Map, Value};

use crate::errors::{ApiError, ErrorKind};
use crate::routes::{Action, Operation};
use crate::store::{update, Store, StoreError};
use crate::time::{civil_from_days, days_from_civil};

/// Request header carrying the caller's tenant to Envoy's global rate-limit filter (set by the
/// gateway on every admitted call, overwriting anything a client sent; removed before upstream).
pub const TENANT_HEADER: &str = "x-ma-gateway-tenant";
/// Request header carrying the call's limit class (`create`, `read`, `stream`), likewise.
pub const CLASS_HEADER: &str = "x-ma-gateway-class";

/// Compare-and-swap attempts per write. Contention is per key (one tenant's bucket), so a
/// handful of retries absorbs a burst from every worker of a large host.
pub const CAS_ATTEMPTS: usize = 8;
/// Largest `per_minute` and `burst` accepted (100 000 requests a second).
pub const MAX_RATE: u64 = 6_000_000;
/// Largest `concurrent_streams` accepted.
pub const MAX_STREAMS: u64 = 1_000_000;

/// Shared-data key prefix of everything this module stores.
const KEY_PREFIX: &str = "ma_gateway";
/// Bucket levels are kept in thousandths of a request, so slow rates refill exactly.
const MILLI: u64 = 1_000;

// ---------------------------------------------------------------------------------------------
// Classes and scopes
// ---------------------------------------------------------------------------------------------

/// The rate class of a call; mirrors the upstream's separate create/read/stream limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Create, update, archive, delete and `POST …/events`: the calls that change state.
    Create,
    /// Read and list.
    Read,
    /// Opening an event stream.
    Stream,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Create, Class::Read, Class::Stream];

    /// The config and key name: `create`, `read`, `stream`.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Create => "create",
            Class::Read => "read",
            Class::Stream => "stream",
        }
    }
}

/// The rate class of an operation.
pub fn class_of(op: &Operation) -> Class {
    match op.action {
        Action::Create
        | Action::Update
        | Action::Archive
        | Action::Delete
        | Action::SendEvents
        | Action::Reveal
        | Action::Run
        | Action::Validate => Class::Create,
        // A worker polls every few seconds; a poll is paced like a read.
        Action::Read | Action::List | Action::Poll => Class::Read,
        Action::Stream => Class::Stream,
    }
}

/// Who a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitScope {
    /// All principals of a tenant together.
    Tenant,
    /// One principal. Its name must be qualified by the caller (e.g. `acme/key-1`) so that
    /// principals of different tenants never share a counter.
    Principal,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Tenant => "tenant",
            LimitScope::Principal => "principal",
        }
    }
}

/// The bucket key: `ma_gateway.rl.tenant.acme.create`. Keys cannot be deleted from shared
/// data, so there is one per (scope, name, class) that ever made a call.
pub fn bucket_key(scope: LimitScope, name: &str, class: Class) -> String {
    format!(
        "{KEY_PREFIX}.rl.{}.{name}.{}",
        scope.as_str(),
        class.as_str()
    )
}

/// The concurrent-stream counter key: `ma_gateway.streams.tenant.acme`.
pub fn streams_key(scope: LimitScope, name: &str) -> String {
    format!("{KEY_PREFIX}.streams.{}.{name}", scope.as_str())
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// A token bucket: holds `burst` requests, refills at `per_minute` per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u64,
    pub burst: u64,
}

/// The limits of one scope; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitSet {
    pub create: Option<Rate>,
    pub read: Option<Rate>,
    pub stream: Option<Rate>,
    pub concurrent_streams: Option<u64>,
}

impl LimitSet {
    pub fn rate(&self, class: Class) -> Option<Rate> {
        match class {
            Class::Create => self.create,
            Class::Read => self.read,
            Class::Stream => self.stream,
        }
    }
}

/// A tenant's changes to a [`LimitSet`]: `None` inherits, `Some(None)` lifts the limit
/// (`null` in config), `Some(Some(_))` replaces it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitOverride {
    pub create: Option<Option<Rate>>,
    pub read: Option<Option<Rate>>,
    pub stream: Option<Option<Rate>>,
    pub concurrent_streams: Option<Option<u64>>,
}

impl LimitOverride {
    fn apply(&self, base: &LimitSet) -> LimitSet {
        LimitSet {
            create: self.create.unwrap_or(base.create),
            read: self.read.unwrap_or(base.read),
            stream: self.stream.unwrap_or(base.stream),
            concurrent_streams: self.concurrent_streams.unwrap_or(base.concurrent_streams),
        }
    }
}

/// One tenant's overrides (`tenants.<name>` in config).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantLimits {
    pub tenant: LimitOverride,
    pub per_principal: LimitOverride,
}

/// Everything `rules_from_json` compiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitRules {
    pub per_tenant: LimitSet,
    pub per_principal: LimitSet,
    pub tenants: BTreeMap<String, TenantLimits>,
    pub budgets: Budgets,
    /// `stream_slot_lease_secs`; `None`: [`DEFAULT_STREAM_LEASE_SECS`].
    pub stream_slot_lease_secs: Option<u64>,
}

impl LimitRules {
    /// The effective limits of `scope` for a tenant (or for a principal of that tenant).
    pub fn limits(&self, scope: LimitScope, tenant: &str) -> LimitSet {
        let own = self.tenants.get(tenant);
        match scope {
            LimitScope::Tenant => own.map_or_else(
                || self.per_tenant.clone(),
                |t| t.tenant.apply(&self.per_tenant),
            ),
            LimitScope::Principal => own.map_or_else(
                || self.per_principal.clone(),
                |t| t.per_principal.apply(&self.per_principal),
            ),
        }
    }

    /// The bucket for `class`, or `None` when unlimited.
    pub fn rate(&self, scope: LimitScope, tenant: &str, class: Class) -> Option<Rate> {
        self.limits(scope, tenant).rate(class)
    }

    /// How long a stream slot lasts without being renewed, in milliseconds.
    pub fn stream_lease_ms(&self) -> u64 {
        self.stream_slot_lease_secs
            .unwrap_or(DEFAULT_STREAM_LEASE_SECS)
            .saturating_mul(1_000)
    }

    /// The most streams open at once, or `None` when unlimited.
    pub fn max_streams(&self, scope: LimitScope, tenant: &str) -> Option<u64> {
        self.limits(scope, tenant).concurrent_streams
    }
}

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Tokens,
    Microdollars,
}

/// The window a budget counts over; days and months are UTC calendar ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Day,
    Month,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Minute, Window::Day, Window::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    fn adjective(self) -> &'static str {
        match self {
            Window::Minute => "per-minute",
            Window::Day => "daily",
            Window::Month => "monthly",
        }
    }
}

/// A tenant's budgets; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    pub microdollars_per_minute: Option<u64>,
    pub microdollars_per_day: Option<u64>,
    pub microdollars_per_month: Option<u64>,
    /// `session_microdollars`: the budget a session asking for none is granted (at most what
    /// is left); `None`: everything that is left.
    pub session_microdollars: Option<u64>,
}

impl Budget {
    pub fn limit(&self, metric: Metric, window: Window) -> Option<u64> {
        match (metric, window) {
            (Metric::Tokens, Window::Minute) => self.tokens_per_minute,
            (Metric::Tokens, Window::Day) => self.tokens_per_day,
            (Metric::Tokens, Window::Month) => self.tokens_per_month,
            (Metric::Microdollars, Window::Minute) => self.microdollars_per_minute,
            (Metric::Microdollars, Window::Day) => self.microdollars_per_day,
            (Metric::Microdollars, Window::Month) => self.microdollars_per_month,
        }
    }
}

/// Budgets by tenant name; `"*"` is the default for tenants without their own entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    pub tenants: BTreeMap<String, Budget>,
}

impl Budgets {
    pub fn for_tenant(&self, tenant: &str) -> Option<&Budget> {
        self.tenants.get(tenant).or_else(|| self.tenants.get("*"))
    }
}

// ---------------------------------------------------------------------------------------------
// Token buckets
// ---------------------------------------------------------------------------------------------

/// The answer of [`admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead. `limit` is the bucket size (`burst`), `remaining` the whole requests left in
    /// it, `reset_ms` the time until it is full again.
    Allowed {
        remaining: u64,
        limit: u64,
        reset_ms: u64,
    },
    /// Refused; one request will be admitted again in `retry_after_ms` (≥ 1).
    Denied { retry_after_ms: u64, limit: u64 },
}

impl Admission {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Admission::Allowed { .. })
    }

    /// Informational headers for an admitted call's response: `x-ratelimit-limit`,
    /// `x-ratelimit-remaining`, `x-ratelimit-reset` (seconds until full, rounded up). Empty
    /// for a denial (use [`rate_limited`]).
    pub fn headers(&self) -> Vec<(String, String)> {
        match *self {
            Admission::Allowed {
                remaining,
                limit,
                reset_ms,
            } => vec![
                ("x-ratelimit-limit".into(), limit.to_string()),
                ("x-ratelimit-remaining".into(), remaining.to_string()),
                ("x-ratelimit-reset".into(), ceil_secs(reset_ms).to_string()),
            ],
            Admission::Denied { .. } => Vec::new(),
        }
    }
}

/// The refill step of a rate: every `chunk_ms` milliseconds exactly `per_chunk` milli-requests
/// are added. `per_minute` milli-requests arrive per 60 ms, so the smallest whole step is
/// `60 / gcd(per_minute, 60)` ms; stepping in whole chunks (and leaving the remainder of the
/// elapsed time for the next call) means integer arithmetic never loses or invents refill,
/// however often the bucket is read.
fn refill_step(per_minute: u64) -> (u64, u64) {
    let chunk_ms = 60 / gcd(per_minute.max(1), 60);
    (chunk_ms, per_minute.max(1) * chunk_ms / 60)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The bucket `(level in milli-requests, time of the last refill step)` brought up to `now_ms`.
fn refill(rate: &Rate, stored: Option<(u64, u64)>, now_ms: u64) -> (u64, u64) {
    let capacity = rate.burst.saturating_mul(MILLI);
    let Some((level, last)) = stored else {
        return (capacity, now_ms);
    };
    // A smaller burst since the value was written (config change) takes effect at once.
    let level = level.min(capacity);
    // Another worker's clock may be a little ahead: then no time has passed for us.
    if now_ms <= last {
        return (level, last);
    }
    let (chunk_ms, per_chunk) = refill_step(rate.per_minute);
    let chunks = (now_ms - last) / chunk_ms;
    let level = level.saturating_add(chunks.saturating_mul(per_chunk));
    if level >= capacity {
        // A full bucket does not bank the time it spends full.
        (capacity, now_ms)
    } else {
        (level, last + chunks * chunk_ms)
    }
}

/// When the bucket reaches `target` milli-requests, in ms from `now_ms`.
fn time_until(rate: &Rate, level: u64, last: u64, target: u64, now_ms: u64) -> u64 {
    if level >= target {
        return 0;
    }
    let (chunk_ms, per_chunk) = refill_step(rate.per_minute);
    let chunks = (target - level).div_ceil(per_chunk);
    last.saturating_add(chunks.saturating_mul(chunk_ms))
        .saturating_sub(now_ms)
}

fn decode_pair(bytes: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (a, b) = text.split_once(' ')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Takes one request from the bucket at `key` (see [`bucket_key`]) at `now_ms`.
///
/// The stored value is `"<level in milli-requests> <last refill ms>"`, e.g. `"49000
/// 1700000000000"`. Admission is a compare-and-swap of the value read, so workers racing for
/// the last request cannot both get it: the loser re-reads and sees the bucket empty. Over any
/// run the admitted count is at most `burst` plus what refilled (for a key that existed before
/// the race, see [`prepare_key`]). A denial writes nothing.
pub fn admit(
    store: &dyn Store,
    rate: &Rate,
    key: &str,
    now_ms: u64,
) -> Result<Admission, StoreError> {
    let limit = rate.burst;
    let mut denied = None;
    let allowed = update(store, key, CAS_ATTEMPTS, |value| {
        denied = None;
        let stored = value.and_then(|bytes| {
            let pair = decode_pair(bytes);
            if pair.is_none() {
                log::warn!("rate limit bucket {key}: undecodable value, starting full");
            }
            pair
        });
        let (level, last) = refill(rate, stored, now_ms);
        if level < MILLI {
            let wait = time_until(rate, level, last, MILLI, now_ms);
            denied = Some(Admission::Denied {
                retry_after_ms: wait.max(1),
                limit,
            });
            return None;
        }
        let level = level - MILLI;
        let capacity = rate.burst.saturating_mul(MILLI);
        let admission = Admission::Allowed {
            remaining: level / MILLI,
            limit,
            reset_ms: time_until(rate, level, last, capacity, now_ms),
        };
        Some((format!("{level} {last}").into_bytes(), admission))
    })?;
    match (allowed, denied) {
        (Some(admission), _) | (None, Some(admission)) => Ok(admission),
        // `update` returns `Ok(None)` only when the closure declined, which sets `denied`.
        (None, None) => Err(StoreError::Other("rate limit: no decision".into())),
    }
}

/// Creates `key` empty ("absent", see [`crate::store`]) if it was never written, so that the
/// first real write to it is compare-and-swap protected. Returns whether it wrote. Harmless on
/// any key this module uses, at any time the key is missing; call it before traffic can race.
pub fn prepare_key(store: &dyn Store, key: &str) -> Result<bool, StoreError> {
    if store.get(key).is_some() {
        return Ok(false);
    }
    store.set(key, b"", None)?;
    Ok(true)
}

/// The 429 answer to a denied call and its headers: `retry-after` (whole seconds, rounded up,
/// at least 1 so that clients never retry at once), `retry-after-ms` (the SDKs prefer it),
/// `x-ratelimit-limit`, `x-ratelimit-remaining: 0` and `x-ratelimit-reset` (seconds).
pub fn rate_limited(
    class: Class,
    retry_after_ms: u64,
    limit: u64,
) -> (ApiError, Vec<(String, String)>) {
    let secs = ceil_secs(retry_after_ms).max(1);
    let error = ApiError::new(
        ErrorKind::RateLimit,
        format!(
            "rate limit exceeded for {} requests (limit {limit}); retry after {secs} s",
            class.as_str()
        ),
    );
    let headers = vec![
        ("retry-after".into(), secs.to_string()),
        ("retry-after-ms".into(), retry_after_ms.to_string()),
        ("x-ratelimit-limit".into(), limit.to_string()),
        ("x-ratelimit-remaining".into(), "0".into()),
        ("x-ratelimit-reset".into(), secs.to_string()),
    ];
    (error, headers)
}

fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1_000)
}

// ---------------------------------------------------------------------------------------------
// Concurrent streams
// ---------------------------------------------------------------------------------------------

/// Default lease of a stream slot (`stream_slot_lease_secs`).
pub const DEFAULT_STREAM_LEASE_SECS: u64 = 60;
/// Longest `stream_slot_lease_secs` accepted (one day).
pub const MAX_STREAM_LEASE_SECS: u64 = 86_400;
/// Most slots kept per key, live or not (bounds the value; a `concurrent_streams` above it
/// is counted up to it).
const MAX_SLOTS: usize = 100_000;

/// Decodes `"<holder>:<lease end ms> …"`; anything undecodable (an older counter format, a
/// bug) is no slot.
fn decode_slots(bytes: &[u8]) -> Vec<(String, u64)> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Vec::new();
    };
    text.split(' ')
        .filter_map(|entry| {
            let (holder, until) = entry.split_once(':')?;
            let until = until.parse().ok()?;
            (!holder.is_empty()).then(|| (holder.to_string(), until))
        })
        .collect()
}

fn encode_slots(slots: &[(String, u64)]) -> Vec<u8> {
    slots
        .iter()
        .map(|(holder, until)| format!("{holder}:{until}"))
        .collect::<Vec<_>>()
        .join(" ")
        .into_bytes()
}

/// The slots at `key` whose lease has not ended at `now_ms`.
fn live_slots(value: Option<&[u8]>, now_ms: u64) -> Vec<(String, u64)> {
    let mut slots = value.map(decode_slots).unwrap_or_default();
    slots.retain(|(_, until)| *until > now_ms);
    slots
}

/// Takes a stream slot at `key` (see [`streams_key`]) for `holder` (unique per stream across
/// workers) unless `max` live slots are taken already; `Ok(false)` means refused (nothing
/// written). The slot is a lease ending `lease_ms` from `now_ms`: [`renew_stream`] extends it
/// while the stream's body flows and [`close_stream`] gives it back when the stream ends.
/// A slot whose lease ran out is not counted and is dropped at the next write, so a stream
/// whose VM died (a panic under `FAIL_RELOAD`: its `on_log` never runs) frees its slot within
/// `lease_ms` instead of holding it until the Envoy process restarts.
pub fn open_stream(
    store: &dyn Store,
    key: &str,
    max: u64,
    holder: &str,
    now_ms: u64,
    lease_ms: u64,
) -> Result<bool, StoreError> {
    let opened = update(store, key, CAS_ATTEMPTS, |value| {
        let mut slots = live_slots(value, now_ms);
        if slots.len() as u64 >= max || slots.len() >= MAX_SLOTS {
            return None;
        }
        slots.retain(|(h, _)| h != holder);
        slots.push((holder.to_string(), now_ms.saturating_add(lease_ms)));
        Some((encode_slots(&slots), ()))
    })?;
    Ok(opened.is_some())
}

/// Extends `holder`'s lease at `key` to `lease_ms` from `now_ms`. A lease that ran out
/// meanwhile (the stream was quiet for longer than the lease) is taken again even when that
/// goes over the limit: the stream is open, and counting it is what keeps new streams out.
pub fn renew_stream(
    store: &dyn Store,
    key: &str,
    holder: &str,
    now_ms: u64,
    lease_ms: u64,
) -> Result<(), StoreError> {
    update(store, key, CAS_ATTEMPTS, |value| {
        let mut slots = live_slots(value, now_ms);
        let until = now_ms.saturating_add(lease_ms);
        match slots.iter().position(|(h, _)| h == holder) {
            Some(i) => slots[i].1 = slots[i].1.max(until),
            None if slots.len() < MAX_SLOTS => slots.push((holder.to_string(), until)),
            None => return None,
        }
        Some((encode_slots(&slots), ()))
    })?;
    Ok(())
}

/// Gives `holder`'s slot at `key` back (expired slots are dropped on the way). Closing a
/// slot that is not held (never opened, expired and dropped) writes only if something expired.
pub fn close_stream(
    store: &dyn Store,
    key: &str,
    holder: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    update(store, key, CAS_ATTEMPTS, |value| {
        let stored = value.map(decode_slots).unwrap_or_default();
        let mut slots = live_slots(value, now_ms);
        slots.retain(|(h, _)| h != holder);
        (slots.len() != stored.len()).then(|| (encode_slots(&slots), ()))
    })?;
    Ok(())
}

/// Live stream slots at `key` at `now_ms`.
pub fn open_streams(store: &dyn Store, key: &str, now_ms: u64) -> u64 {
    store.get(key).map_or(0, |(bytes, _)| {
        live_slots(Some(&bytes), now_ms).len() as u64
    })
}

/// The 429 answer when a scope has `max` streams open already. There is no retry time to
/// promise (it depends on when a stream ends), so no `retry-after`: SDKs back off on their own.
pub fn too_many_streams(max: u64) -> (ApiError, Vec<(String, String)>) {
    let error = ApiError::new(
        ErrorKind::RateLimit,
        format!("too many concurrent event streams (limit {max}); close one and retry"),
    );
    let headers = vec![
        ("x-ratelimit-limit".into(), max.to_string()),
        ("x-ratelimit-remaining".into(), "0".into()),
    ];
    (error, headers)
}

// ---------------------------------------------------------------------------------------------
// Budgets
// ---------------------------------------------------------------------------------------------

/// `[start, end)` of the window containing `now_secs`, in Unix seconds. Minutes and days are
/// plain arithmetic (Unix time has no leap seconds); months are UTC calendar months.
pub fn window_bounds(window: Window, now_secs: u64) -> (u64, u64) {
    match window {
        Window::Minute => {
            let start = now_secs - now_secs % 60;
            (start, start + 60)
        }
        Window::Day => {
            let start = now_secs - now_secs % 86_400;
            (start, start + 86_400)
        }
        Window::Month => {
            let (year, month, _) = civil_from_days(now_secs / 86_400);
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            (
                days_from_civil(year, month, 1) * 86_400,
                days_from_civil(next_year, next_month, 1) * 86_400,
            )
        }
    }
}

/// `2026-06-01T00:00:00Z`.
fn format_utc(secs: u64) -> String {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3_600,
        s / 60 % 60,
        s % 60
    )
}

/// `$50.00`, `$0.01`, `$1.2345`: at least cents, more digits only when they are not zero.
fn format_usd(microdollars: u64) -> String {
    let dollars = microdollars / 1_000_000;
    let fraction = microdollars % 1_000_000;
    let mut digits = format!("{fraction:06}");
    while digits.len() > 2 && digits.ends_with('0') {
        digits.pop();
    }
    format!("${dollars}.{digits}")
}

/// The usage counter of one tenant and window: `ma_gateway.budget.acme.day`. One key per
/// window kind, holding the window's start, rather than one key per window: shared-data keys
/// cannot be deleted, and a key per minute would grow the map by 1440 keys a tenant a day.
fn usage_key(tenant: &str, window: Window) -> String {
    format!("{KEY_PREFIX}.budget.{tenant}.{}", window.as_str())
}

/// Decodes `"<window start> <tokens> <microdollars>"`.
fn decode_usage(bytes: &[u8]) -> Option<(u64, u64, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split(' ');
    let start = parts.next()?.parse().ok()?;
    let tokens = parts.next()?.parse().ok()?;
    let micro = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((start, tokens, micro))
}

/// What the stored counter counts for the window starting at `start`. A counter from an
/// older window counts nothing (the window rolled over). One from a *newer* window (another
/// worker's clock is a little ahead at the boundary) is kept and counted: resetting it would
/// forget usage, and counting into it errs on the strict side.
fn current_usage(stored: Option<(u64, u64, u64)>, start: u64) -> (u64, u64, u64) {
    match stored {
        Some((s, tokens, micro)) if s >= start => (s, tokens, micro),
        _ => (start, 0, 0),
    }
}

/// Adds usage to the tenant's minute, day and month counters. Call it once per usage fact the
/// metering has counted (it is not idempotent). All three windows are attempted; the first
/// error is returned.
pub fn charge(
    store: &dyn Store,
    tenant: &str,
    tokens: u64,
    microdollars: u64,
    now_secs: u64,
) -> Result<(), StoreError> {
    if tokens == 0 && microdollars == 0 {
        return Ok(());
    }
    let mut first_error = None;
    for window in Window::ALL {
        let (start, _) = window_bounds(window, now_secs);
        let result = update(store, &usage_key(tenant, window), CAS_ATTEMPTS, |value| {
            let (s, t, m) = current_usage(value.and_then(decode_usage), start);
            let (t, m) = (t.saturating_add(tokens), m.saturating_add(microdollars));
            Some((format!("{s} {t} {m}").into_bytes(), ()))
        });
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Takes money back off the tenant's current minute, day and month counters (never below
/// zero): a session whose Anthropic list cost came in below the estimate already charged.
pub fn refund(
    store: &dyn Store,
    tenant: &str,
    microdollars: u64,
    now_secs: u64,
) -> Result<(), StoreError> {
    if microdollars == 0 {
        return Ok(());
    }
    let mut first_error = None;
    for window in Window::ALL {
        let (start, _) = window_bounds(window, now_secs);
        let result = update(store, &usage_key(tenant, window), CAS_ATTEMPTS, |value| {
            let (s, t, m) = current_usage(value.and_then(decode_usage), start);
            let m = m.saturating_sub(microdollars);
            Some((format!("{s} {t} {m}").into_bytes(), ()))
        });
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `(tokens, microdollars)` the tenant used in the current `window`.
pub fn usage(store: &dyn Store, tenant: &str, window: Window, now_secs: u64) -> (u64, u64) {
    let (start, _) = window_bounds(window, now_secs);
    let stored = store
        .get(&usage_key(tenant, window))
        .and_then(|(bytes, _)| decode_usage(&bytes));
    let (_, tokens, micro) = current_usage(stored, start);
    (tokens, micro)
}

/// Within budget: the least left of each metric over the windows that have a budget (`None`
/// when the metric has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetState {
    pub remaining_tokens: Option<u64>,
    pub remaining_microdollars: Option<u64>,
}

/// A budget that is used up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetExhausted {
    pub tenant: String,
    pub metric: Metric,
    pub window: Window,
    pub limit: u64,
    pub used: u64,
    /// Unix seconds when the window ends.
    pub resets_at: u64,
    pub retry_after_secs: u64,
}

impl BudgetExhausted {
    /// `tenant acme has used its daily cost budget ($50.00); it resets at
    /// 2026-06-01T00:00:00Z`.
    pub fn message(&self) -> String {
        let (what, amount) = match self.metric {
            Metric::Tokens => ("token", format!("{} tokens", self.limit)),
            Metric::Microdollars => ("cost", format_usd(self.limit)),
        };
        format!(
            "tenant {} has used its {} {what} budget ({amount}); it resets at {}",
            self.tenant,
            self.window.adjective(),
            format_utc(self.resets_at)
        )
    }

    /// The 429 answer: `retry-after` / `retry-after-ms` until the window ends, and, when that
    /// is more than a minute away, `x-should-retry: false` so that the SDKs surface the error
    /// instead of spending their retries on a budget that cannot come back before they give up.
    pub fn to_error(&self) -> (ApiError, Vec<(String, String)>) {
        let secs = self.retry_after_secs.max(1);
        let mut headers = vec![
            ("retry-after".to_string(), secs.to_string()),
            ("retry-after-ms".to_string(), (secs * 1_000).to_string()),
        ];
        if secs > 60 {
            headers.push(("x-should-retry".into(), "false".into()));
        }
        (ApiError::new(ErrorKind::RateLimit, self.message()), headers)
    }
}

/// The order budgets are checked in. A refusal names the first exhausted one, which is the one
/// whose window ends last (a month ends no sooner than the day, the day no sooner than the
/// minute): the call cannot succeed before then anyway. Cost before tokens on a tie.
const CHECK_ORDER: [(Metric, Window); 6] = [
    (Metric::Microdollars, Window::Month),
    (Metric::Tokens, Window::Month),
    (Metric::Microdollars, Window::Day),
    (Metric::Tokens, Window::Day),
    (Metric::Microdollars, Window::Minute),
    (Metric::Tokens, Window::Minute),
];

/// Whether the tenant may start more work: refused once any budget's usage has reached its
/// limit (usage is charged after the fact, so it may overshoot by one call's worth).
pub fn check_budget(
    store: &dyn Store,
    budgets: &Budgets,
    tenant: &str,
    now_secs: u64,
) -> Result<BudgetState, BudgetExhausted> {
    let Some(budget) = budgets.for_tenant(tenant) else {
        return Ok(BudgetState::default());
    };
    let mut state = BudgetState::default();
    for (metric, window) in CHECK_ORDER {
        let Some(limit) = budget.limit(metric, window) else {
            continue;
        };
        let (tokens, micro) = usage(store, tenant, window, now_secs);
        let used = match metric {
            Metric::Tokens => tokens,
            Metric::Microdollars => micro,
        };
        if used >= limit {
            let (_, end) = window_bounds(window, now_secs);
            return Err(BudgetExhausted {
                tenant: tenant.to_string(),
                metric,
                window,
                limit,
                used,
                resets_at: end,
                retry_after_secs: end - now_secs,
            });
        }
        let left = limit - used;
        let slot = match metric {
            Metric::Tokens => &mut state.remaining_tokens,
            Metric::Microdollars => &mut state.remaining_microdollars,
        };
        *slot = Some(slot.map_or(left, |s| s.min(left)));
    }
    Ok(state)
}

/// The least money the tenant has left in any window with a cost budget (0 when one is used
/// up), or `None` without a cost budget. Used to cap a new session's `budget.max_list_cost`.
pub fn remaining_microdollars(
    store: &dyn Store,
    budgets: &Budgets,
    tenant: &str,
    now_secs: u64,
) -> Option<u64> {
    let budget = budgets.for_tenant(tenant)?;
    Window::ALL
        .into_iter()
        .filter_map(|window| {
            let limit = budget.limit(Metric::Microdollars, window)?;
            let (_, micro) = usage(store, tenant, window, now_secs);
            Some(limit.saturating_sub(micro))
        })
        .min()
}

// ---------------------------------------------------------------------------------------------
// Session budget reservations
// ---------------------------------------------------------------------------------------------

/// Micro-dollars in a cent (session budgets are whole cents).
const MICRO_PER_CENT: u64 = 10_000;
/// Most reservations one tenant's ledger holds; a create beyond them is granted nothing.
pub const MAX_RESERVATIONS: usize = 10_000;
/// How long a create's reservation lasts before its response names the session (longer than
/// the 300 s route timeout): a VM that dies in between leaks it for at most this long.
pub const PENDING_RESERVATION_MS: u64 = 330_000;

/// One entry of a tenant's reservation ledger: money granted to a session (or to a create
/// still waiting for its response), what of it the gateway has seen spent, and for a pending
/// create the end of its lease (0: held until released).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub holder: String,
    pub granted: u64,
    pub spent: u64,
    pub until_ms: u64,
}

impl Reservation {
    /// Money granted and not yet seen spent: what the session may still spend.
    pub fn outstanding(&self) -> u64 {
        self.granted.saturating_sub(self.spent)
    }
}

/// The ledger of one tenant: `ma_gateway.reserve.acme`.
pub fn reservations_key(tenant: &str) -> String {
    format!("{KEY_PREFIX}.reserve.{tenant}")
}

/// Decodes `"<holder>:<granted>:<spent>:<until ms> …"`; undecodable entries are dropped.
fn decode_reservations(bytes: &[u8]) -> Vec<Reservation> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Vec::new();
    };
    text.split(' ')
        .filter_map(|entry| {
            let mut parts = entry.split(':');
            let holder = parts.next().filter(|h| !h.is_empty())?.to_string();
            let granted = parts.next()?.parse().ok()?;
            let spent = parts.next()?.parse().ok()?;
            let until_ms = parts.next()?.parse().ok()?;
            parts.next().is_none().then_some(Reservation {
                holder,
                granted,
                spent,
                until_ms,
            })
        })
        .collect()
}

fn encode_reservations(entries: &[Reservation]) -> Vec<u8> {
    entries
        .iter()
        .map(|r| format!("{}:{}:{}:{}", r.holder, r.granted, r.spent, r.until_ms))
        .collect::<Vec<_>>()
        .join(" ")
        .into_bytes()
}

/// The ledger's entries that still hold money at `now_ms` (expired pending creates and fully
/// spent sessions dropped).
fn live_reservations(value: Option<&[u8]>, now_ms: u64) -> Vec<Reservation> {
    let mut entries = value.map(decode_reservations).unwrap_or_default();
    entries.retain(|r| (r.until_ms == 0 || r.until_ms > now_ms) && r.outstanding() > 0);
    entries
}

/// Money reserved by the tenant's sessions and pending creates at `now_ms`.
pub fn reserved_microdollars(store: &dyn Store, tenant: &str, now_ms: u64) -> u64 {
    let value = store.get(&reservations_key(tenant)).map(|(bytes, _)| bytes);
    live_reservations(value.as_deref(), now_ms)
        .iter()
        .map(Reservation::outstanding)
        .fold(0, u64::saturating_add)
}

/// A grant of [`reserve_session_budget`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The session's budget from now on, in µ$ (whole cents): what the body must carry.
    pub microdollars: u64,
    /// The holder's entry before, to put back if the call fails ([`restore_reservation`]).
    pub previous: Option<Reservation>,
}

/// Reserves a session budget for `holder` from what the tenant has left, atomically with
/// every other reservation of the tenant (one compare-and-swap ledger per tenant), so that
/// sessions opened together never hold more than the tenant has.
///
/// What is left is the least `limit - used` over the tenant's cost windows
/// ([`remaining_microdollars`], read inside each attempt) minus what every *other* entry
/// still holds (granted minus seen spent). The holder's own entry (a session update) keeps
/// its spent part: the ceiling is `spent + left`. The grant is the ceiling, or `wanted` (a
/// budget the client asked for, µ$, else the tenant's `session_microdollars`) when that is
/// lower, rounded down to whole cents. It is
/// recorded as the holder's entry, with a lease ending at `until_ms` (0: until released).
/// `Ok(None)`: the tenant has no cost budget. A full ledger grants nothing.
///
/// Why this never lets sessions spend more than the tenant has: the upstream stops each
/// session at its budget, the ledger subtracts each session's unspent budget from what later
/// grants may use, and spend moves from the ledger into the usage counters only after it was
/// counted there ([`charge_session`] charges first, then releases).
pub fn reserve_session_budget(
    store: &dyn Store,
    budgets: &Budgets,
    tenant: &str,
    holder: &str,
    wanted: Option<u64>,
    now_ms: u64,
    until_ms: u64,
) -> Result<Option<Grant>, StoreError> {
    if remaining_microdollars(store, budgets, tenant, now_ms / 1000).is_none() {
        return Ok(None);
    }
    let wanted = wanted.or_else(|| budgets.for_tenant(tenant)?.session_microdollars);
    let key = reservations_key(tenant);
    if store.get(&key).is_none() {
        // A missing key is written whatever token a write carries; create it first so the
        // ledger's writes are compare-and-swap protected (see the module doc).
        prepare_key(store, &key)?;
    }
    update(store, &key, CAS_ATTEMPTS, |value| {
        // Read the usage after the ledger: a charge counts usage before releasing its
        // reservation, so the two never both miss the same money.
        let remaining = remaining_microdollars(store, budgets, tenant, now_ms / 1000)?;
        let mut entries = live_reservations(value, now_ms);
        let previous = entries.iter().position(|r| r.holder == holder);
        let previous = previous.map(|i| entries.remove(i));
        let others = entries
            .iter()
            .map(Reservation::outstanding)
            .fold(0, u64::saturating_add);
        let spent = previous.as_ref().map_or(0, |r| r.spent);
        let left = remaining.saturating_sub(others);
        let ceiling = if entries.len() >= MAX_RESERVATIONS {
            spent
        } else {
            spent.saturating_add(left)
        };
        let granted = wanted.map_or(ceiling, |w| w.min(ceiling));
        let granted = granted - granted % MICRO_PER_CENT;
        entries.push(Reservation {
            holder: holder.to_string(),
            granted,
            spent,
            until_ms,
        });
        Some((
            encode_reservations(&entries),
            Grant {
                microdollars: granted,
                previous,
            },
        ))
    })
}

/// The pending create `holder` became session `session_id`: its entry is renamed and held
/// until released. Nothing happens when the entry expired meanwhile.
pub fn bind_reservation(
    store: &dyn Store,
    tenant: &str,
    holder: &str,
    session_id: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    update(store, &reservations_key(tenant), CAS_ATTEMPTS, |value| {
        let mut entries = live_reservations(value, now_ms);
        let i = entries.iter().position(|r| r.holder == holder)?;
        let mut entry = entries.remove(i);
        entry.holder = session_id.to_string();
        entry.until_ms = 0;
        entries.retain(|r| r.holder != session_id);
        entries.push(entry);
        Some((encode_reservations(&entries), ()))
    })?;
    Ok(())
}

/// Drops `holder`'s entry (a create that failed, a session archived or deleted).
pub fn release_reservation(
    store: &dyn Store,
    tenant: &str,
    holder: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    update(store, &reservations_key(tenant), CAS_ATTEMPTS, |value| {
        let stored = value.map(decode_reservations).unwrap_or_default();
        let mut entries = live_reservations(value, now_ms);
        entries.retain(|r| r.holder != holder);
        (entries.len() != stored.len()).then(|| (encode_reservations(&entries), ()))
    })?;
    Ok(())
}

/// Puts `holder`'s entry back as it was before a [`reserve_session_budget`] whose call
/// failed (`previous: None`: drops it). Spend seen meanwhile is kept.
pub fn restore_reservation(
    store: &dyn Store,
    tenant: &str,
    holder: &str,
    previous: Option<&Reservation>,
    now_ms: u64,
) -> Result<(), StoreError> {
    let Some(previous) = previous else {
        return release_reservation(store, tenant, holder, now_ms);
    };
    update(store, &reservations_key(tenant), CAS_ATTEMPTS, |value| {
        let mut entries = live_reservations(value, now_ms);
        let spent = entries
            .iter()
            .find(|r| r.holder == holder)
            .map_or(previous.spent, |r| r.spent.max(previous.spent));
        entries.retain(|r| r.holder != holder);
        entries.push(Reservation {
            spent,
            ..previous.clone()
        });
        Some((encode_reservations(&entries), ()))
    })?;
    Ok(())
}

/// [`charge`], then the same money counted as spent on `session_id`'s reservation (if it has
/// one), in that order: usage is counted before the reservation shrinks.
pub fn charge_session(
    store: &dyn Store,
    tenant: &str,
    session_id: Option<&str>,
    tokens: u64,
    microdollars: u64,
    now_ms: u64,
) -> Result<(), StoreError> {
    charge(store, tenant, tokens, microdollars, now_ms / 1000)?;
    adjust_session_spent(
        store,
        tenant,
        session_id,
        microdollars,
        now_ms,
        |entries, i| {
            if let Some(entry) = entries.get_mut(i) {
                entry.spent = entry.spent.saturating_add(microdollars);
            }
            entries.retain(|r| r.outstanding() > 0);
        },
    )
}

/// Applies `adjust` to `session_id`'s entry (index `i`) in the tenant's reservation ledger,
/// if it has one and `microdollars` is not 0: what [`charge_session`] and [`refund_session`]
/// share.
fn adjust_session_spent(
    store: &dyn Store,
    tenant: &str,
    session_id: Option<&str>,
    microdollars: u64,
    now_ms: u64,
    adjust: impl Fn(&mut Vec<Reservation>, usize),
) -> Result<(), StoreError> {
    let Some(session_id) = session_id.filter(|_| microdollars > 0) else {
        return Ok(());
    };
    let key = reservations_key(tenant);
    if store.get(&key).is_none() {
        return Ok(());
    }
    update(store, &key, CAS_ATTEMPTS, |value| {
        let mut entries = live_reservations(value, now_ms);
        let i = entries.iter().position(|r| r.holder == session_id)?;
        adjust(&mut entries, i);
        Some((encode_reservations(&entries), ()))
    })?;
    Ok(())
}

/// [`refund`], then the same money taken off what `session_id`'s reservation (if it has one)
/// counts as spent: a list cost below the estimate already charged leaves the session that
/// much more of its grant, as the upstream (which stops it at its list cost) sees it.
pub fn refund_session(
    store: &dyn Store,
    tenant: &str,
    session_id: Option<&str>,
    microdollars: u64,
    now_ms: u64,
) -> Result<(), StoreError> {
    refund(store, tenant, microdollars, now_ms / 1000)?;
    adjust_session_spent(
        store,
        tenant,
        session_id,
        microdollars,
        now_ms,
        |entries, i| {
            if let Some(entry) = entries.get_mut(i) {
                entry.spent = entry.spent.saturating_sub(microdollars);
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// Compiles the `limits` config object (shape in the module doc). `path` is where the object
/// sits in the whole config and prefixes every error: `limits.per_tenant.create: …`.
pub fn rules_from_json(value: &Value, path: &str) -> Result<LimitRules, String> {
    let root = object(
        value,
        path,
        &[
            "per_tenant",
            "per_principal",
            "tenants",
            "budgets",
            "stream_slot_lease_secs",
        ],
    )?;
    let base = |key: &str| -> Result<LimitSet, String> {
        match root.get(key) {
            None | Some(Value::Null) => Ok(LimitSet::default()),
            Some(v) => {
                let at = join(path, key);
                let set = object(v, &at, &SET_FIELDS)?;
                // In a base set `null` and absent both mean unlimited.
                Ok(parse_override(set, &at)?.apply(&LimitSet::default()))
            }
        }
    };
    let per_tenant = base("per_tenant")?;
    let per_principal = base("per_principal")?;

    let mut tenants = BTreeMap::new();
    if let Some(v) = root.get("tenants") {
        let at = join(path, "tenants");
        let map = any_object(v, &at)?;
        for (name, entry) in map {
            if !valid_name(name) {
                return Err(format!(
                    "{at}: invalid tenant name {name:?} (expected [A-Za-z0-9_.-]+; per_tenant is the default)"
                ));
            }
            let here = join(&at, name);
            let mut known = SET_FIELDS.to_vec();
            known.push("per_principal");
            let fields = object(entry, &here, &known)?;
            let tenant = parse_override(fields, &here)?;
            let per_principal = match fields.get("per_principal") {
                None | Some(Value::Null) => LimitOverride::default(),
                Some(p) => {
                    let pp = join(&here, "per_principal");
                    parse_override(object(p, &pp, &SET_FIELDS)?, &pp)?
                }
            };
            tenants.insert(
                name.clone(),
                TenantLimits {
                    tenant,
                    per_principal,
                },
            );
        }
    }

    let budgets = match root.get("budgets") {
        None | Some(Value::Null) => Budgets::default(),
        Some(v) => parse_budgets(v, &join(path, "budgets"))?,
    };
    let stream_slot_lease_secs = match root.get("stream_slot_lease_secs") {
        None | Some(Value::Null) => None,
        Some(v) => Some(uint(
            v,
            &join(path, "stream_slot_lease_secs"),
            1,
            MAX_STREAM_LEASE_SECS,
        )?),
    };
    Ok(LimitRules {
        per_tenant,
        per_principal,
        tenants,
        budgets,
        stream_slot_lease_secs,
    })
}

const SET_FIELDS: [&str; 4] = ["create", "read", "stream", "concurrent_streams"];

fn parse_override(fields: &Map<String, Value>, path: &str) -> Result<LimitOverride, String> {
    let rate = |class: &str| -> Result<Option<Option<Rate>>, String> {
        match fields.get(class) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => parse_rate(v, &join(path, class)).map(|r| Some(Some(r))),
        }
    };
    let concurrent_streams = match fields.get("concurrent_streams") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(uint(
            v,
            &join(path, "concurrent_streams"),
            1,
            MAX_STREAMS,
        )?)),
    };
    Ok(LimitOverride {
        create: rate("create")?,
        read: rate("read")?,
        stream: rate("stream")?,
        concurrent_streams,
    })
}

fn parse_rate(value: &Value, path: &str) -> Result<Rate, String> {
    let fields = object(value, path, &["per_minute", "burst"])?;
    let per_minute = match fields.get("per_minute") {
        Some(v) => uint(v, &join(path, "per_minute"), 1, MAX_RATE)?,
        None => {
            return Err(format!(
                "{}: missing (an integer is required)",
                join(path, "per_minute")
            ))
        }
    };
    let burst = match fields.get("burst") {
        Some(v) => uint(v, &join(path, "burst"), 1, MAX_RATE)?,
        None => per_minute,
    };
    Ok(Rate { per_minute, burst })
}

fn parse_budgets(value: &Value, path: &str) -> Result<Budgets, String> {
    let fields = object(value, path, &["tenants"])?;
    let mut tenants = BTreeMap::new();
    if let Some(v) = fields.get("tenants") {
        let at = join(path, "tenants");
        for (name, entry) in any_object(v, &at)? {
            if name != "*" && !valid_name(name) {
                return Err(format!(
                    "{at}: invalid tenant name {name:?} (expected [A-Za-z0-9_.-]+ or *)"
                ));
            }
            let here = join(&at, name);
            let b = object(entry, &here, &BUDGET_FIELDS)?;
            let get = |key: &str| -> Result<Option<u64>, String> {
                b.get(key)
                    .map(|v| uint(v, &join(&here, key), 0, u64::MAX))
                    .transpose()
            };
            let budget = Budget {
                tokens_per_minute: get("tokens_per_minute")?,
                tokens_per_day: get("tokens_per_day")?,
                tokens_per_month: get("tokens_per_month")?,
                microdollars_per_minute: get("microdollars_per_minute")?,
                microdollars_per_day: get("microdollars_per_day")?,
                microdollars_per_month: get("microdollars_per_month")?,
                session_microdollars: b
                    .get("session_microdollars")
                    .map(|v| {
                        uint(
                            v,
                            &join(&here, "session_microdollars"),
                            MICRO_PER_CENT,
                            u64::MAX,
                        )
                    })
                    .transpose()?,
            };
            tenants.insert(name.clone(), budget);
        }
    }
    Ok(Budgets { tenants })
}

const BUDGET_FIELDS: [&str; 7] = [
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "microdollars_per_minute",
    "microdollars_per_day",
    "microdollars_per_month",
    "session_microdollars",
];

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "(root)"
    } else {
        path
    }
}

/// An object with any keys (a map by name).
fn any_object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(format!(
            "{}: expected an object, found {}",
            shown(path),
            type_name(other)
        )),
    }
}

/// An object whose keys must all be `known`; the first unknown one (in key order) is the error.
fn object<'a>(
    value: &'a Value,
    path: &str,
    known: &[&str],
) -> Result<&'a Map<String, Value>, String> {
    let map = any_object(value, path)?;
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(format!("{}: unknown field", join(path, unknown))),
        None => Ok(map),
    }
}

fn uint(value: &Value, path: &str, min: u64, max: u64) -> Result<u64, String> {
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(v),
            _ if max == u64::MAX && min == 0 => Err(format!(
                "{path}: expected a non-negative integer, found {n}"
            )),
            _ if max == u64::MAX => Err(format!(
                "{path}: expected an integer of at least {min}, found {n}"
            )),
            _ => Err(format!(
                "{path}: expected an integer from {min} to {max}, found {n}"
            )),
        },
        other => Err(format!(
            "{path}: expected an integer, found {}",
            type_name(other)
        )),
    }
}

/// A tenant (or principal) name usable as a map key in `limits` and `policy` config.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use std::cell::Cell;

    use serde_json::json;

    use super::*;
    use crate::routes::{Family, IdKind};
    use crate::store::MemoryStore;
    use crate::time::parse_rfc3339_utc;

    fn at(text: &str) -> u64 {
        parse_rfc3339_utc(text).unwrap()
    }

    fn rate(per_minute: u64, burst: u64) -> Rate {
        Rate { per_minute, burst }
    }

    fn allowed(remaining: u64, limit: u64, reset_ms: u64) -> Admission {
        Admission::Allowed {
            remaining,
            limit,
            reset_ms,
        }
    }

    fn text(store: &MemoryStore, key: &str) -> String {
        String::from_utf8(store.value(key).unwrap()).unwrap()
    }

    // ---- classes and keys ----

    #[test]
    fn every_action_has_its_class() {
        let table = [
            (Action::Create, Class::Create),
            (Action::Update, Class::Create),
            (Action::Archive, Class::Create),
            (Action::Delete, Class::Create),
            (Action::SendEvents, Class::Create),
            (Action::Read, Class::Read),
            (Action::List, Class::Read),
            (Action::Stream, Class::Stream),
        ];
        for (action, class) in table {
            let op = Operation {
                family: Family::Sessions,
                action,
                ids: vec![(IdKind::Session, "sesn_1".into())],
            };
            assert_eq!(class_of(&op), class, "{action:?}");
        }
        assert_eq!(Class::ALL.map(Class::as_str), ["create", "read", "stream"]);
    }

    #[test]
    fn keys_are_namespaced_by_scope_name_and_class() {
        assert_eq!(
            bucket_key(LimitScope::Tenant, "acme", Class::Create),
            "ma_gateway.rl.tenant.acme.create"
        );
        assert_eq!(
            bucket_key(LimitScope::Principal, "acme/key-1", Class::Stream),
            "ma_gateway.rl.principal.acme/key-1.stream"
        );
        assert_eq!(
            streams_key(LimitScope::Tenant, "acme"),
            "ma_gateway.streams.tenant.acme"
        );
        assert_eq!(usage_key("acme", Window::Day), "ma_gateway.budget.acme.day");
    }

    // ---- config ----

    #[test]
    fn full_config_compiles_and_overrides_merge_field_by_field() {
        let rules = rules_from_json(
            &json!({
                "per_tenant": {"create": {"per_minute": 300, "burst": 50},
                               "read": {"per_minute": 600},
                               "stream": {"per_minute": 60, "burst": 10},
                               "concurrent_streams": 20},
                "per_principal": {"create": {"per_minute": 60, "burst": 10},
                                  "concurrent_streams": 5},
                "tenants": {"acme": {"create": {"per_minute": 1000, "burst": 100},
                                     "read": null,
                                     "per_principal": {"concurrent_streams": 10,
                                                       "create": null}}},
                "budgets": {"tenants": {
                    "acme": {"tokens_per_minute": 100000, "tokens_per_day": 5000000,
                             "microdollars_per_day": 50000000,
                             "microdollars_per_month": 1000000000},
                    "*": {"microdollars_per_day": 0}}}
            }),
            "limits",
        )
        .unwrap();
        let base = LimitSet {
            create: Some(rate(300, 50)),
            read: Some(rate(600, 600)),
            stream: Some(rate(60, 10)),
            concurrent_streams: Some(20),
        };
        assert_eq!(rules.per_tenant, base);
        assert_eq!(rules.limits(LimitScope::Tenant, "other"), base);
        assert_eq!(
            rules.limits(LimitScope::Tenant, "acme"),
            LimitSet {
                create: Some(rate(1000, 100)),
                read: None,
                stream: Some(rate(60, 10)),
                concurrent_streams: Some(20),
            }
        );
        assert_eq!(
            rules.limits(LimitScope::Principal, "other"),
            LimitSet {
                create: Some(rate(60, 10)),
                read: None,
                stream: None,
                concurrent_streams: Some(5),
            }
        );
        assert_eq!(
            rules.limits(LimitScope::Principal, "acme"),
            LimitSet {
                create: None,
                read: None,
                stream: None,
                concurrent_streams: Some(10),
            }
        );
        assert_eq!(
            rules.rate(LimitScope::Tenant, "acme", Class::Create),
            Some(rate(1000, 100))
        );
        assert_eq!(rules.max_streams(LimitScope::Principal, "acme"), Some(10));
        assert_eq!(
            rules.budgets.for_tenant("acme"),
            Some(&Budget {
                tokens_per_minute: Some(100_000),
                tokens_per_day: Some(5_000_000),
                microdollars_per_day: Some(50_000_000),
                microdollars_per_month: Some(1_000_000_000),
                ..Budget::default()
            })
        );
        assert_eq!(
            rules.budgets.for_tenant("someone"),
            Some(&Budget {
                microdollars_per_day: Some(0),
                ..Budget::default()
            })
        );
    }

    #[test]
    fn empty_config_limits_nothing() {
        let rules = rules_from_json(&json!({}), "limits").unwrap();
        assert_eq!(rules, LimitRules::default());
        for class in Class::ALL {
            assert_eq!(rules.rate(LimitScope::Tenant, "acme", class), None);
        }
        assert_eq!(rules.budgets.for_tenant("acme"), None);
        // `null` in a base set is the same as absent.
        let rules = rules_from_json(&json!({"per_tenant": {"create": null}}), "").unwrap();
        assert_eq!(rules.per_tenant, LimitSet::default());
    }

    #[test]
    fn config_errors_name_the_field_path() {
        let err = |v: Value| rules_from_json(&v, "limits").unwrap_err();
        let table = [
            (json!([]), "limits: expected an object, found an array"),
            (json!({"per_tennant": {}}), "limits.per_tennant: unknown field"),
            (
                json!({"tenants": {"acme": {"create": {"per_minute": 0}}}}),
                "limits.tenants.acme.create.per_minute: expected an integer from 1 to 6000000, found 0",
            ),
            (
                json!({"tenants": {"acme": {"create": {"per_minute": 1.5}}}}),
                "limits.tenants.acme.create.per_minute: expected an integer from 1 to 6000000, found 1.5",
            ),
            (
                json!({"tenants": {"acme": {"create": {"per_minute": "300"}}}}),
                "limits.tenants.acme.create.per_minute: expected an integer, found a string",
            ),
            (
                json!({"per_tenant": {"create": {"burst": 5}}}),
                "limits.per_tenant.create.per_minute: missing (an integer is required)",
            ),
            (
                json!({"per_tenant": {"read": {"per_minute": 5, "burst": 6000001}}}),
                "limits.per_tenant.read.burst: expected an integer from 1 to 6000000, found 6000001",
            ),
            (
                json!({"per_tenant": {"read": {"per_minute": 5, "rate": 1}}}),
                "limits.per_tenant.read.rate: unknown field",
            ),
            (
                json!({"per_tenant": {"create": 300}}),
                "limits.per_tenant.create: expected an object, found a number",
            ),
            (
                json!({"per_tenant": {"concurrent_streams": 0}}),
                "limits.per_tenant.concurrent_streams: expected an integer from 1 to 1000000, found 0",
            ),
            (
                json!({"per_principal": {"per_principal": {}}}),
                "limits.per_principal.per_principal: unknown field",
            ),
            (
                json!({"tenants": []}),
                "limits.tenants: expected an object, found an array",
            ),
            (
                json!({"tenants": {"*": {}}}),
                "limits.tenants: invalid tenant name \"*\" (expected [A-Za-z0-9_.-]+; per_tenant is the default)",
            ),
            (
                json!({"tenants": {"acme": {"per_principal": {"stream": {"per_minute": -1}}}}}),
                "limits.tenants.acme.per_principal.stream.per_minute: expected an integer from 1 to 6000000, found -1",
            ),
            (
                json!({"tenants": {"acme": {"per_principal": {"per_principal": {}}}}}),
                "limits.tenants.acme.per_principal.per_principal: unknown field",
            ),
            (
                json!({"tenants": {"acme": {"budget": {}}}}),
                "limits.tenants.acme.budget: unknown field",
            ),
            (
                json!({"budgets": {"tenant": {}}}),
                "limits.budgets.tenant: unknown field",
            ),
            (
                json!({"budgets": {"tenants": {"a b": {}}}}),
                "limits.budgets.tenants: invalid tenant name \"a b\" (expected [A-Za-z0-9_.-]+ or *)",
            ),
            (
                json!({"budgets": {"tenants": {"acme": {"microdollars_per_day": -1}}}}),
                "limits.budgets.tenants.acme.microdollars_per_day: expected a non-negative integer, found -1",
            ),
            (
                json!({"budgets": {"tenants": {"acme": {"dollars_per_day": 5}}}}),
                "limits.budgets.tenants.acme.dollars_per_day: unknown field",
            ),
            (
                json!({"budgets": {"tenants": {"acme": []}}}),
                "limits.budgets.tenants.acme: expected an object, found an array",
            ),
        ];
        for (value, expected) in table {
            assert_eq!(err(value.clone()), expected, "{value}");
        }
        assert_eq!(
            rules_from_json(&json!(1), "").unwrap_err(),
            "(root): expected an object, found a number"
        );
        assert_eq!(
            rules_from_json(&json!({"x": 1}), "").unwrap_err(),
            "x: unknown field"
        );
    }

    // ---- token buckets ----

    #[test]
    fn refill_steps_are_whole_milli_requests() {
        // (per_minute) → (chunk ms, milli-requests per chunk)
        let table = [
            (60, (1, 1)),
            (300, (1, 5)),
            (90, (2, 3)),
            (50, (6, 5)),
            (7, (60, 7)),
            (1, (60, 1)),
            (6_000_000, (1, 100_000)),
        ];
        for (per_minute, step) in table {
            assert_eq!(refill_step(per_minute), step, "{per_minute}");
        }
    }

    #[test]
    fn admit_spends_the_burst_then_refills_exactly() {
        let store = MemoryStore::new();
        let r = rate(60, 3);
        let key = "ma_gateway.rl.tenant.acme.create";
        assert_eq!(admit(&store, &r, key, 0), Ok(allowed(2, 3, 1_000)));
        assert_eq!(text(&store, key), "2000 0");
        assert_eq!(admit(&store, &r, key, 0), Ok(allowed(1, 3, 2_000)));
        assert_eq!(admit(&store, &r, key, 0), Ok(allowed(0, 3, 3_000)));
        let denied = Admission::Denied {
            retry_after_ms: 1_000,
            limit: 3,
        };
        assert_eq!(admit(&store, &r, key, 0), Ok(denied));
        let writes = store.writes();
        assert_eq!(
            admit(&store, &r, key, 999),
            Ok(Admission::Denied {
                retry_after_ms: 1,
                limit: 3
            })
        );
        assert_eq!(store.writes(), writes, "a denial writes nothing");
        assert_eq!(admit(&store, &r, key, 1_000), Ok(allowed(0, 3, 3_000)));
        assert_eq!(text(&store, key), "0 1000");
        // 2.5 s later: 2.5 requests refilled; two are taken, half of one is left.
        assert_eq!(admit(&store, &r, key, 3_500), Ok(allowed(1, 3, 1_500)));
        assert_eq!(admit(&store, &r, key, 3_500), Ok(allowed(0, 3, 2_500)));
        assert_eq!(text(&store, key), "500 3500");
        assert_eq!(
            admit(&store, &r, key, 3_500),
            Ok(Admission::Denied {
                retry_after_ms: 500,
                limit: 3
            })
        );
        // A long idle period fills the bucket, never beyond `burst`.
        assert_eq!(admit(&store, &r, key, 1_000_000), Ok(allowed(2, 3, 1_000)));
        assert_eq!(text(&store, key), "2000 1000000");
    }

    #[test]
    fn slow_awkward_rates_lose_no_refill_to_rounding() {
        // 7 a minute, polled every 10 ms for ten minutes with every call admitted when possible.
        let store = MemoryStore::new();
        let r = rate(7, 2);
        let mut admitted = 0;
        for now in (0..=600_000).step_by(10) {
            if admit(&store, &r, "k", now).unwrap().is_allowed() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 2 + 70);
        // 1 a minute: the request arrives exactly at 60 s, not a step later.
        let store = MemoryStore::new();
        let r = rate(1, 1);
        assert!(admit(&store, &r, "k", 0).unwrap().is_allowed());
        assert_eq!(
            admit(&store, &r, "k", 59_999),
            Ok(Admission::Denied {
                retry_after_ms: 1,
                limit: 1
            })
        );
        assert_eq!(admit(&store, &r, "k", 60_000), Ok(allowed(0, 1, 60_000)));
    }

    #[test]
    fn a_smaller_burst_applies_at_once_and_a_late_clock_gets_no_refill() {
        let store = MemoryStore::new();
        store.set("k", b"50000 1000", None).unwrap();
        assert_eq!(
            admit(&store, &rate(60, 5), "k", 1_000),
            Ok(allowed(4, 5, 1_000))
        );
        assert_eq!(text(&store, "k"), "4000 1000");
        // Another worker's clock was ahead: ours at 500 ms sees no time passing.
        assert_eq!(
            admit(&store, &rate(60, 5), "k", 500),
            Ok(allowed(3, 5, 2_500))
        );
        assert_eq!(text(&store, "k"), "3000 1000");
    }

    #[test]
    fn an_undecodable_bucket_starts_full() {
        let store = MemoryStore::new();
        store.set("k", b"garbage", None).unwrap();
        assert_eq!(
            admit(&store, &rate(60, 2), "k", 7),
            Ok(allowed(1, 2, 1_000))
        );
        assert_eq!(text(&store, "k"), "1000 7");
    }

    #[test]
    fn cas_conflicts_are_retried_and_consume_exactly_one_request() {
        let store = MemoryStore::new();
        let r = rate(60, 10);
        admit(&store, &r, "k", 0).unwrap();
        store.inject_cas_conflicts(3);
        assert_eq!(admit(&store, &r, "k", 0), Ok(allowed(8, 10, 2_000)));
        assert_eq!(store.pending_cas_conflicts(), 0);
        assert_eq!(text(&store, "k"), "8000 0");
        store.inject_cas_conflicts(CAS_ATTEMPTS);
        assert_eq!(admit(&store, &r, "k", 0), Err(StoreError::CasMismatch));
        assert_eq!(text(&store, "k"), "8000 0");
    }

    /// A store where every other read is followed, before the reader can write, by another
    /// worker's complete admission: the reader's compare-and-swap then fails and it re-reads.
    struct Racing<'a> {
        inner: &'a MemoryStore,
        rate: Rate,
        now: Cell<u64>,
        reads: Cell<u64>,
        nested_admitted: Cell<u64>,
    }

    impl Store for Racing<'_> {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            let current = self.inner.get(key);
            let n = self.reads.get();
            self.reads.set(n + 1);
            if n % 2 == 0 {
                if let Ok(a) = admit(self.inner, &self.rate, key, self.now.get()) {
                    if a.is_allowed() {
                        self.nested_admitted.set(self.nested_admitted.get() + 1);
                    }
                }
            }
            current
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn racing_workers_never_admit_more_than_burst_plus_refill() {
        let inner = MemoryStore::new();
        assert_eq!(prepare_key(&inner, "k"), Ok(true));
        let racing = Racing {
            inner: &inner,
            rate: rate(60, 10),
            now: Cell::new(0),
            reads: Cell::new(0),
            nested_admitted: Cell::new(0),
        };
        let (mut outer_admitted, mut calls, mut conflicts) = (0u64, 0u64, 0u64);
        // Ten seconds in 100 ms steps, three workers a step, plus the racing ones: far more
        // demand than 1 request a second.
        for step in 0..=100u64 {
            racing.now.set(step * 100);
            for worker in 0..3u64 {
                if (step + worker) % 7 == 0 {
                    inner.inject_cas_conflicts(2);
                }
                calls += 1;
                match admit(&racing, &racing.rate, "k", step * 100) {
                    Ok(a) if a.is_allowed() => outer_admitted += 1,
                    Ok(_) => {}
                    Err(StoreError::CasMismatch) => conflicts += 1,
                    Err(other) => panic!("{other}"),
                }
            }
        }
        let total = outer_admitted + racing.nested_admitted.get();
        // 10 in the initial burst + 10 refilled over 10 s: exactly, whoever won each race.
        assert_eq!(total, 20);
        assert!(outer_admitted > 0 && racing.nested_admitted.get() > 0);
        assert!(calls * 2 > total * 10, "demand far exceeded the limit");
        // Every outer call either decided or ran out of attempts; none was lost silently.
        assert!(conflicts < calls);
    }

    /// Admissions at one instant by 100 outer workers and the racing ones they provoke.
    fn admitted_at_one_instant(inner: &MemoryStore) -> u64 {
        let racing = Racing {
            inner,
            rate: rate(300, 50),
            now: Cell::new(5_000),
            reads: Cell::new(0),
            nested_admitted: Cell::new(0),
        };
        let outer = (0..100)
            .filter(|_| {
                admit(&racing, &racing.rate, "k", 5_000)
                    .map(|a| a.is_allowed())
                    .unwrap_or(false)
            })
            .count() as u64;
        outer + racing.nested_admitted.get()
    }

    #[test]
    fn a_hundred_workers_at_one_instant_get_exactly_the_burst() {
        let inner = MemoryStore::new();
        prepare_key(&inner, "k").unwrap();
        assert_eq!(admitted_at_one_instant(&inner), 50);
        // Preparing an existing key writes nothing.
        let writes = inner.writes();
        assert_eq!(prepare_key(&inner, "k"), Ok(false));
        assert_eq!(inner.writes(), writes);
    }

    #[test]
    fn an_unprepared_key_can_lose_its_first_write_once() {
        // Two workers see the key missing; the creating writes are not compare-and-swap
        // protected, so the first admission is overwritten: one extra request, once.
        let inner = MemoryStore::new();
        assert_eq!(admitted_at_one_instant(&inner), 51);
        assert_eq!(admitted_at_one_instant(&inner), 0);
    }

    #[test]
    fn prepared_keys_read_as_absent_everywhere() {
        let store = MemoryStore::new();
        for key in ["b", "s", "ma_gateway.budget.acme.day"] {
            prepare_key(&store, key).unwrap();
            assert_eq!(store.value(key), Some(vec![]));
        }
        assert_eq!(
            admit(&store, &rate(60, 2), "b", 0),
            Ok(allowed(1, 2, 1_000))
        );
        assert_eq!(open_streams(&store, "s", 0), 0);
        assert_eq!(open_stream(&store, "s", 1, "a", 0, 1_000), Ok(true));
        assert_eq!(usage(&store, "acme", Window::Day, 0), (0, 0));
        charge(&store, "acme", 1, 2, 0).unwrap();
        assert_eq!(usage(&store, "acme", Window::Day, 0), (1, 2));
    }

    #[test]
    fn rate_limited_answer_and_headers() {
        let (error, headers) = rate_limited(Class::Create, 1_200, 50);
        assert_eq!(error.status(), 429);
        assert_eq!(error.kind.wire_name(), "rate_limit_error");
        assert_eq!(
            error.message,
            "rate limit exceeded for create requests (limit 50); retry after 2 s"
        );
        let expected: Vec<(String, String)> = [
            ("retry-after", "2"),
            ("retry-after-ms", "1200"),
            ("x-ratelimit-limit", "50"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(headers, expected);
        // Never `retry-after: 0`.
        let (error, headers) = rate_limited(Class::Stream, 0, 1);
        assert_eq!(
            error.message,
            "rate limit exceeded for stream requests (limit 1); retry after 1 s"
        );
        assert_eq!(headers[0], ("retry-after".into(), "1".into()));
        assert_eq!(headers[1], ("retry-after-ms".into(), "0".into()));
        assert_eq!(rate_limited(Class::Read, 3_000, 9).1[0].1, "3");
    }

    #[test]
    fn admitted_calls_carry_informational_headers() {
        assert_eq!(
            allowed(7, 10, 2_001).headers(),
            vec![
                ("x-ratelimit-limit".to_string(), "10".to_string()),
                ("x-ratelimit-remaining".to_string(), "7".to_string()),
                ("x-ratelimit-reset".to_string(), "3".to_string()),
            ]
        );
        let denied = Admission::Denied {
            retry_after_ms: 5,
            limit: 1,
        };
        assert!(denied.headers().is_empty());
        assert!(!denied.is_allowed());
    }

    // ---- session budget reservations ----

    fn money(per_day: u64) -> Budgets {
        rules_from_json(
            &json!({"budgets": {"tenants": {"acme": {"microdollars_per_day": per_day}}}}),
            "limits",
        )
        .unwrap()
        .budgets
    }

    fn granted(grant: Result<Option<Grant>, StoreError>) -> u64 {
        grant.unwrap().unwrap().microdollars
    }

    #[test]
    fn each_grant_reserves_what_it_grants_so_concurrent_creates_share_the_budget() {
        let store = MemoryStore::new();
        let budgets = money(50_000_000);
        let now = 1_000_000;
        let pending = now + PENDING_RESERVATION_MS;
        // No budget asked: all that is left; the next create gets nothing.
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "p1", None, now, pending
            )),
            50_000_000
        );
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "p2", None, now, pending
            )),
            0
        );
        assert_eq!(reserved_microdollars(&store, "acme", now), 50_000_000);
        // The first create failed: released, and the money is back.
        release_reservation(&store, "acme", "p1", now).unwrap();
        assert_eq!(reserved_microdollars(&store, "acme", now), 0);
        // Asked budgets are kept when they fit, cut to what is left when not.
        let ask = |holder: &str, micro: u64| {
            granted(reserve_session_budget(
                &store,
                &budgets,
                "acme",
                holder,
                Some(micro),
                now,
                pending,
            ))
        };
        assert_eq!(ask("a", 7_000_000), 7_000_000);
        assert_eq!(ask("b", 40_000_000), 40_000_000);
        assert_eq!(ask("c", 7_000_000), 3_000_000);
        assert_eq!(ask("d", 7_000_000), 0);
        // Whole cents only: 1 µ$ short of a cent grants nothing more.
        release_reservation(&store, "acme", "c", now).unwrap();
        assert_eq!(ask("e", 2_999_999), 2_990_000);
        // Tenants without a cost budget get no grant and no ledger.
        assert_eq!(
            reserve_session_budget(&store, &budgets, "other", "x", None, now, pending),
            Ok(None)
        );
        assert_eq!(store.value(&reservations_key("other")), None);
    }

    #[test]
    fn refunds_give_money_back_to_the_tenant_and_the_sessions_grant() {
        let store = MemoryStore::new();
        let budgets = money(50_000_000);
        let now = 1_000_000;
        let ask = Some(10_000_000);
        granted(reserve_session_budget(
            &store, &budgets, "acme", "sesn_1", ask, now, 0,
        ));
        charge_session(&store, "acme", Some("sesn_1"), 5, 8_000_000, now).unwrap();
        assert_eq!(reserved_microdollars(&store, "acme", now), 2_000_000);
        // The list cost came in $3 below the estimate.
        refund_session(&store, "acme", Some("sesn_1"), 3_000_000, now).unwrap();
        assert_eq!(
            usage(&store, "acme", Window::Day, now / 1000),
            (5, 5_000_000)
        );
        assert_eq!(reserved_microdollars(&store, "acme", now), 5_000_000);
        // Never below zero.
        refund(&store, "acme", 9_000_000, now / 1000).unwrap();
        assert_eq!(usage(&store, "acme", Window::Day, now / 1000), (5, 0));
    }

    #[test]
    fn a_session_asking_for_no_budget_gets_the_tenants_session_default() {
        let store = MemoryStore::new();
        let budgets = rules_from_json(
            &json!({"budgets": {"tenants": {"acme": {"microdollars_per_day": 5_000_000,
                                                     "session_microdollars": 2_000_000}}}}),
            "limits",
        )
        .unwrap()
        .budgets;
        let grant = |holder: &str, wanted: Option<u64>| {
            granted(reserve_session_budget(
                &store, &budgets, "acme", holder, wanted, 0, 0,
            ))
        };
        assert_eq!(grant("a", None), 2_000_000);
        assert_eq!(grant("b", None), 2_000_000);
        assert_eq!(grant("c", None), 1_000_000);
        assert_eq!(grant("d", None), 0);
        release_reservation(&store, "acme", "a", 0).unwrap();
        // An asked budget is not bound by the default, only by what is left.
        assert_eq!(grant("e", Some(3_000_000)), 2_000_000);
        assert_eq!(
            rules_from_json(
                &json!({"budgets": {"tenants": {"acme": {"session_microdollars": 9_999}}}}),
                "limits"
            ),
            Err("limits.budgets.tenants.acme.session_microdollars: expected an integer of at least 10000, found 9999".into())
        );
    }

    #[test]
    fn spend_moves_from_the_reservation_to_the_usage_counters() {
        let store = MemoryStore::new();
        let budgets = money(10_000_000);
        let now = 86_400_000;
        let pending = now + PENDING_RESERVATION_MS;
        assert_eq!(
            granted(reserve_session_budget(
                &store,
                &budgets,
                "acme",
                "p",
                Some(4_000_000),
                now,
                pending
            )),
            4_000_000
        );
        bind_reservation(&store, "acme", "p", "sesn_1", now).unwrap();
        assert_eq!(
            text(&store, &reservations_key("acme")),
            "sesn_1:4000000:0:0"
        );
        // The bound reservation outlives the pending lease.
        assert_eq!(
            reserved_microdollars(&store, "acme", pending + 1),
            4_000_000
        );
        charge_session(&store, "acme", Some("sesn_1"), 10, 1_500_000, now).unwrap();
        assert_eq!(
            usage(&store, "acme", Window::Day, now / 1000),
            (10, 1_500_000)
        );
        assert_eq!(reserved_microdollars(&store, "acme", now), 2_500_000);
        // Left for a new session: 10 - 1.5 used - 2.5 still reserved.
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "q", None, now, pending
            )),
            6_000_000
        );
        release_reservation(&store, "acme", "q", now).unwrap();
        // An update: the ceiling is the session's spent part plus what is left.
        let grant =
            reserve_session_budget(&store, &budgets, "acme", "sesn_1", Some(99_000_000), now, 0)
                .unwrap()
                .unwrap();
        assert_eq!(grant.microdollars, 1_500_000 + 8_500_000);
        let previous = grant.previous.unwrap();
        assert_eq!((previous.granted, previous.spent), (4_000_000, 1_500_000));
        // The update failed upstream: back to the old budget.
        restore_reservation(&store, "acme", "sesn_1", Some(&previous), now).unwrap();
        assert_eq!(reserved_microdollars(&store, "acme", now), 2_500_000);
        // Fully spent: the entry is gone.
        charge_session(&store, "acme", Some("sesn_1"), 0, 2_500_000, now).unwrap();
        assert_eq!(text(&store, &reservations_key("acme")), "");
        // Spend of a session without a reservation only counts usage.
        charge_session(&store, "acme", Some("sesn_x"), 0, 1, now).unwrap();
        assert_eq!(
            usage(&store, "acme", Window::Day, now / 1000),
            (10, 4_000_001)
        );
    }

    #[test]
    fn a_pending_create_that_never_answers_expires_and_conflicts_are_retried() {
        let store = MemoryStore::new();
        let budgets = money(1_000_000);
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "dead", None, 0, 5_000
            )),
            1_000_000
        );
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "b", None, 4_999, 9_000
            )),
            0
        );
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "c", None, 5_000, 9_000
            )),
            1_000_000
        );
        // Binding an expired entry binds nothing.
        bind_reservation(&store, "acme", "c", "sesn_c", 9_000).unwrap();
        assert_eq!(reserved_microdollars(&store, "acme", 9_000), 0);
        store.inject_cas_conflicts(3);
        assert_eq!(
            granted(reserve_session_budget(
                &store, &budgets, "acme", "d", None, 9_000, 0
            )),
            1_000_000
        );
        store.inject_cas_conflicts(CAS_ATTEMPTS);
        assert_eq!(
            reserve_session_budget(&store, &budgets, "acme", "e", None, 9_000, 0),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(reserved_microdollars(&store, "acme", 9_000), 1_000_000);
    }

    // ---- concurrent streams ----

    #[test]
    fn streams_open_up_to_max_and_close_their_own_slot() {
        let store = MemoryStore::new();
        let key = streams_key(LimitScope::Tenant, "acme");
        let lease = 60_000;
        assert_eq!(open_stream(&store, &key, 2, "a", 0, lease), Ok(true));
        assert_eq!(open_stream(&store, &key, 2, "b", 0, lease), Ok(true));
        let writes = store.writes();
        assert_eq!(open_stream(&store, &key, 2, "c", 0, lease), Ok(false));
        assert_eq!(store.writes(), writes, "a refusal writes nothing");
        assert_eq!(open_streams(&store, &key, 0), 2);
        assert_eq!(text(&store, &key), "a:60000 b:60000");
        close_stream(&store, &key, "a", 1).unwrap();
        assert_eq!(text(&store, &key), "b:60000");
        assert_eq!(open_stream(&store, &key, 2, "c", 1, lease), Ok(true));
        // Closing a slot twice, or one never held, changes nothing.
        let writes = store.writes();
        close_stream(&store, &key, "a", 2).unwrap();
        close_stream(&store, "never", "a", 2).unwrap();
        assert_eq!(store.writes(), writes);
        assert_eq!(store.value("never"), None);
        close_stream(&store, &key, "b", 2).unwrap();
        close_stream(&store, &key, "c", 2).unwrap();
        assert_eq!(open_streams(&store, &key, 2), 0);
        // A lowered max refuses until enough streams close.
        for holder in ["x", "y", "z"] {
            open_stream(&store, &key, 3, holder, 3, lease).unwrap();
        }
        assert_eq!(open_stream(&store, &key, 1, "w", 3, lease), Ok(false));
    }

    #[test]
    fn the_stream_slot_lease_is_configurable_and_bounded() {
        assert_eq!(
            rules_from_json(&json!({}), "limits")
                .unwrap()
                .stream_lease_ms(),
            60_000
        );
        let rules = rules_from_json(&json!({"stream_slot_lease_secs": 5}), "limits").unwrap();
        assert_eq!(rules.stream_lease_ms(), 5_000);
        for (bad, error) in [
            (
                json!(0),
                "limits.stream_slot_lease_secs: expected an integer from 1 to 86400, found 0",
            ),
            (
                json!(86_401),
                "limits.stream_slot_lease_secs: expected an integer from 1 to 86400, found 86401",
            ),
            (
                json!("5"),
                "limits.stream_slot_lease_secs: expected an integer, found a string",
            ),
        ] {
            assert_eq!(
                rules_from_json(&json!({"stream_slot_lease_secs": bad}), "limits"),
                Err(error.to_string())
            );
        }
    }

    #[test]
    fn a_slot_nobody_renews_frees_itself_when_its_lease_ends() {
        let store = MemoryStore::new();
        let key = streams_key(LimitScope::Principal, "acme/k");
        // "dead" belongs to a VM that panicked: never renewed, never closed.
        assert_eq!(open_stream(&store, &key, 1, "dead", 1_000, 5_000), Ok(true));
        assert_eq!(
            open_stream(&store, &key, 1, "next", 5_999, 5_000),
            Ok(false)
        );
        assert_eq!(open_streams(&store, &key, 5_999), 1);
        assert_eq!(open_streams(&store, &key, 6_000), 0);
        assert_eq!(open_stream(&store, &key, 1, "next", 6_000, 5_000), Ok(true));
        assert_eq!(
            text(&store, &key),
            "next:11000",
            "the expired slot is dropped"
        );
        // A renewed slot lives on.
        renew_stream(&store, &key, "next", 9_000, 5_000).unwrap();
        assert_eq!(
            open_stream(&store, &key, 1, "third", 12_000, 5_000),
            Ok(false)
        );
        assert_eq!(text(&store, &key), "next:14000");
        // A renewal never shortens a lease.
        renew_stream(&store, &key, "next", 8_000, 5_000).unwrap();
        assert_eq!(text(&store, &key), "next:14000");
        // A stream quiet past its lease is counted again when its body flows on, even over
        // the limit: it is open.
        assert_eq!(
            open_stream(&store, &key, 1, "third", 14_000, 5_000),
            Ok(true)
        );
        renew_stream(&store, &key, "next", 14_500, 5_000).unwrap();
        assert_eq!(open_streams(&store, &key, 14_500), 2);
        assert_eq!(
            open_stream(&store, &key, 2, "fourth", 14_500, 5_000),
            Ok(false)
        );
        // An old counter (the format before leases) or garbage counts nothing.
        store.set("old", b"3", None).unwrap();
        assert_eq!(open_streams(&store, "old", 0), 0);
        assert_eq!(open_stream(&store, "old", 1, "a", 0, 5_000), Ok(true));
        assert_eq!(text(&store, "old"), "a:5000");
    }

    #[test]
    fn stream_slots_survive_cas_conflicts() {
        let store = MemoryStore::new();
        open_stream(&store, "s", 10, "a", 0, 1_000).unwrap();
        store.inject_cas_conflicts(4);
        assert_eq!(open_stream(&store, "s", 10, "b", 0, 1_000), Ok(true));
        store.inject_cas_conflicts(4);
        close_stream(&store, "s", "a", 0).unwrap();
        assert_eq!(text(&store, "s"), "b:1000");
        store.inject_cas_conflicts(4);
        renew_stream(&store, "s", "b", 500, 1_000).unwrap();
        assert_eq!(text(&store, "s"), "b:1500");
        store.inject_cas_conflicts(CAS_ATTEMPTS);
        assert_eq!(
            open_stream(&store, "s", 10, "c", 0, 1_000),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(text(&store, "s"), "b:1500");
    }

    #[test]
    fn too_many_streams_answer() {
        let (error, headers) = too_many_streams(20);
        assert_eq!(error.status(), 429);
        assert_eq!(
            error.message,
            "too many concurrent event streams (limit 20); close one and retry"
        );
        assert_eq!(
            headers,
            vec![
                ("x-ratelimit-limit".to_string(), "20".to_string()),
                ("x-ratelimit-remaining".to_string(), "0".to_string()),
            ]
        );
    }

    // ---- calendar ----

    #[test]
    fn windows_are_utc_minutes_days_and_calendar_months() {
        let now = at("2026-05-31T23:59:30Z");
        assert_eq!(
            window_bounds(Window::Minute, now),
            (at("2026-05-31T23:59:00Z"), at("2026-06-01T00:00:00Z"))
        );
        assert_eq!(
            window_bounds(Window::Day, now),
            (at("2026-05-31T00:00:00Z"), at("2026-06-01T00:00:00Z"))
        );
        assert_eq!(
            window_bounds(Window::Month, now),
            (at("2026-05-01T00:00:00Z"), at("2026-06-01T00:00:00Z"))
        );
        assert_eq!(
            window_bounds(Window::Month, at("2026-12-15T08:00:00Z")),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            window_bounds(Window::Month, at("2028-02-29T23:59:59Z")),
            (at("2028-02-01T00:00:00Z"), at("2028-03-01T00:00:00Z"))
        );
        assert_eq!(
            window_bounds(Window::Month, at("2027-02-01T00:00:00Z")),
            (at("2027-02-01T00:00:00Z"), at("2027-03-01T00:00:00Z"))
        );
        assert_eq!(window_bounds(Window::Minute, 0), (0, 60));
        assert_eq!(window_bounds(Window::Month, 0), (0, 31 * 86_400));
    }

    #[test]
    fn civil_dates_round_trip_and_format() {
        for days in (0..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_471_803), "2026-11-23T22:10:03Z");
        assert_eq!(
            format_utc(at("2028-02-29T12:00:00Z")),
            "2028-02-29T12:00:00Z"
        );
    }

    #[test]
    fn dollars_format_with_cents_and_only_needed_digits() {
        let table = [
            (50_000_000, "$50.00"),
            (10_000, "$0.01"),
            (1_234_500, "$1.2345"),
            (0, "$0.00"),
            (1, "$0.000001"),
            (1_000_000_000, "$1000.00"),
        ];
        for (micro, text) in table {
            assert_eq!(format_usd(micro), text);
        }
    }

    // ---- budgets ----

    #[test]
    fn charges_add_up_per_window_and_roll_over() {
        let store = MemoryStore::new();
        let t0 = at("2026-05-31T23:59:30Z");
        charge(&store, "acme", 1_000, 30_000, t0).unwrap();
        charge(&store, "acme", 500, 20_000, t0 + 29).unwrap();
        let minute_start = at("2026-05-31T23:59:00Z");
        assert_eq!(
            text(&store, "ma_gateway.budget.acme.minute"),
            format!("{minute_start} 1500 50000")
        );
        assert_eq!(usage(&store, "acme", Window::Minute, t0), (1_500, 50_000));
        assert_eq!(usage(&store, "acme", Window::Day, t0), (1_500, 50_000));
        assert_eq!(usage(&store, "acme", Window::Month, t0), (1_500, 50_000));
        // 30 s later it is June: every window rolled over.
        let t1 = t0 + 30;
        assert_eq!(usage(&store, "acme", Window::Minute, t1), (0, 0));
        assert_eq!(usage(&store, "acme", Window::Day, t1), (0, 0));
        assert_eq!(usage(&store, "acme", Window::Month, t1), (0, 0));
        charge(&store, "acme", 7, 70, t1).unwrap();
        assert_eq!(usage(&store, "acme", Window::Month, t1), (7, 70));
        assert_eq!(
            text(&store, "ma_gateway.budget.acme.month"),
            format!("{} 7 70", at("2026-06-01T00:00:00Z"))
        );
        // A minute later the day and month still count, the minute does not.
        charge(&store, "acme", 3, 30, t1 + 60).unwrap();
        assert_eq!(usage(&store, "acme", Window::Minute, t1 + 60), (3, 30));
        assert_eq!(usage(&store, "acme", Window::Day, t1 + 60), (10, 100));
        // Tenants are counted apart; nothing to charge writes nothing.
        assert_eq!(usage(&store, "other", Window::Day, t1), (0, 0));
        let writes = store.writes();
        charge(&store, "acme", 0, 0, t1).unwrap();
        assert_eq!(store.writes(), writes);
    }

    #[test]
    fn a_counter_from_a_clock_ahead_is_kept_not_reset() {
        let store = MemoryStore::new();
        let boundary = at("2026-06-01T00:00:00Z");
        charge(&store, "acme", 10, 100, boundary).unwrap();
        // A worker whose clock still says 23:59:59 charges into the newer window.
        charge(&store, "acme", 1, 1, boundary - 1).unwrap();
        assert_eq!(
            text(&store, "ma_gateway.budget.acme.minute"),
            format!("{boundary} 11 101")
        );
        assert_eq!(usage(&store, "acme", Window::Day, boundary - 1), (11, 101));
    }

    #[test]
    fn charges_survive_conflicts_and_saturate() {
        let store = MemoryStore::new();
        charge(&store, "acme", 1, 1, 0).unwrap();
        store.inject_cas_conflicts(5);
        charge(&store, "acme", u64::MAX, 2, 0).unwrap();
        assert_eq!(usage(&store, "acme", Window::Day, 0), (u64::MAX, 3));
        store
            .set("ma_gateway.budget.acme.day", b"junk", None)
            .unwrap();
        assert_eq!(usage(&store, "acme", Window::Day, 0), (0, 0));
        charge(&store, "acme", 4, 4, 0).unwrap();
        assert_eq!(text(&store, "ma_gateway.budget.acme.day"), "0 4 4");
    }

    fn budgets() -> Budgets {
        rules_from_json(
            &json!({"budgets": {"tenants": {
                "acme": {"tokens_per_minute": 100000, "tokens_per_day": 5000000,
                         "microdollars_per_day": 50000000,
                         "microdollars_per_month": 1000000000},
                "*": {"microdollars_per_month": 2000000}}}}),
            "limits",
        )
        .unwrap()
        .budgets
    }

    #[test]
    fn within_budget_reports_the_least_left() {
        let store = MemoryStore::new();
        let now = at("2026-05-31T12:00:10Z");
        assert_eq!(
            check_budget(&store, &budgets(), "acme", now),
            Ok(BudgetState {
                remaining_tokens: Some(100_000),
                remaining_microdollars: Some(50_000_000),
            })
        );
        charge(&store, "acme", 40_000, 12_345_678, now).unwrap();
        assert_eq!(
            check_budget(&store, &budgets(), "acme", now),
            Ok(BudgetState {
                remaining_tokens: Some(60_000),
                remaining_microdollars: Some(37_654_322),
            })
        );
        assert_eq!(
            remaining_microdollars(&store, &budgets(), "acme", now),
            Some(37_654_322)
        );
        // No budget at all: nothing is limited.
        assert_eq!(
            check_budget(&store, &Budgets::default(), "acme", now),
            Ok(BudgetState::default())
        );
        assert_eq!(
            remaining_microdollars(&store, &Budgets::default(), "acme", now),
            None
        );
    }

    #[test]
    fn a_used_up_daily_cost_budget_refuses_until_midnight() {
        let store = MemoryStore::new();
        let now = at("2026-05-31T12:00:10Z");
        charge(&store, "acme", 10, 50_000_000, now).unwrap();
        let exhausted = check_budget(&store, &budgets(), "acme", now).unwrap_err();
        assert_eq!(
            exhausted,
            BudgetExhausted {
                tenant: "acme".into(),
                metric: Metric::Microdollars,
                window: Window::Day,
                limit: 50_000_000,
                used: 50_000_000,
                resets_at: at("2026-06-01T00:00:00Z"),
                retry_after_secs: 43_190,
            }
        );
        assert_eq!(
            exhausted.message(),
            "tenant acme has used its daily cost budget ($50.00); it resets at 2026-06-01T00:00:00Z"
        );
        let (error, headers) = exhausted.to_error();
        assert_eq!(error.status(), 429);
        assert_eq!(error.kind, ErrorKind::RateLimit);
        assert_eq!(error.message, exhausted.message());
        assert_eq!(
            headers,
            vec![
                ("retry-after".to_string(), "43190".to_string()),
                ("retry-after-ms".to_string(), "43190000".to_string()),
                ("x-should-retry".to_string(), "false".to_string()),
            ]
        );
        assert_eq!(
            remaining_microdollars(&store, &budgets(), "acme", now),
            Some(0)
        );
        // The next day it is open again.
        let tomorrow = at("2026-06-01T00:00:00Z");
        assert!(check_budget(&store, &budgets(), "acme", tomorrow).is_ok());
    }

    #[test]
    fn a_per_minute_token_budget_says_so_and_is_retryable() {
        let store = MemoryStore::new();
        let now = at("2026-05-31T12:00:10Z");
        charge(&store, "acme", 100_001, 0, now).unwrap();
        let exhausted = check_budget(&store, &budgets(), "acme", now).unwrap_err();
        assert_eq!(
            exhausted.message(),
            "tenant acme has used its per-minute token budget (100000 tokens); it resets at 2026-05-31T12:01:00Z"
        );
        assert_eq!(exhausted.used, 100_001);
        assert_eq!(
            exhausted.to_error().1,
            vec![
                ("retry-after".to_string(), "50".to_string()),
                ("retry-after-ms".to_string(), "50000".to_string()),
            ]
        );
        // The money is untouched, so a session could still be capped at all of it.
        assert_eq!(
            remaining_microdollars(&store, &budgets(), "acme", now),
            Some(50_000_000)
        );
    }

    #[test]
    fn the_refusal_names_the_budget_that_resets_last() {
        let store = MemoryStore::new();
        let now = at("2026-05-31T12:00:10Z");
        // Every budget of acme is used up; the monthly one ends last.
        charge(&store, "acme", 6_000_000, 1_000_000_000, now).unwrap();
        let exhausted = check_budget(&store, &budgets(), "acme", now).unwrap_err();
        assert_eq!(
            (exhausted.metric, exhausted.window),
            (Metric::Microdollars, Window::Month)
        );
        assert_eq!(
            exhausted.message(),
            "tenant acme has used its monthly cost budget ($1000.00); it resets at 2026-06-01T00:00:00Z"
        );
        // Day tokens and day cost both used up, month not: cost is named first.
        let store = MemoryStore::new();
        charge(&store, "acme", 5_000_000, 50_000_000, now - 120).unwrap();
        let exhausted = check_budget(&store, &budgets(), "acme", now).unwrap_err();
        assert_eq!(
            (exhausted.metric, exhausted.window),
            (Metric::Microdollars, Window::Day)
        );
        // Only the day's tokens: that one.
        let store = MemoryStore::new();
        charge(&store, "acme", 5_000_000, 0, now - 120).unwrap();
        let exhausted = check_budget(&store, &budgets(), "acme", now).unwrap_err();
        assert_eq!(
            exhausted.message(),
            "tenant acme has used its daily token budget (5000000 tokens); it resets at 2026-06-01T00:00:00Z"
        );
    }

    #[test]
    fn the_default_budget_covers_tenants_without_their_own() {
        let store = MemoryStore::new();
        let now = at("2026-05-31T12:00:10Z");
        charge(&store, "beta", 0, 1_999_999, now).unwrap();
        assert_eq!(
            check_budget(&store, &budgets(), "beta", now),
            Ok(BudgetState {
                remaining_tokens: None,
                remaining_microdollars: Some(1),
            })
        );
        charge(&store, "beta", 0, 1, now).unwrap();
        let exhausted = check_budget(&store, &budgets(), "beta", now).unwrap_err();
        assert_eq!(
            exhausted.message(),
            "tenant beta has used its monthly cost budget ($2.00); it resets at 2026-06-01T00:00:00Z"
        );
        // acme's own entry replaces the default: its month allows $1000, not $2.
        charge(&store, "acme", 0, 2_000_000, now).unwrap();
        assert!(check_budget(&store, &budgets(), "acme", now).is_ok());
        // A zero budget blocks at once.
        let zero = Budgets {
            tenants: [(
                "z".to_string(),
                Budget {
                    tokens_per_day: Some(0),
                    ..Budget::default()
                },
            )]
            .into(),
        };
        assert!(check_budget(&store, &zero, "z", now).is_err());
        assert_eq!(remaining_microdollars(&store, &zero, "z", now), None);
    }
}
