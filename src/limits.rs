//! Request rate limits, concurrent streams and token/cost budgets, counted in shared data.
//!
//! This module owns three kinds of limit and the configuration that declares them:
//!
//! - **Request rates**: a token bucket per (scope, name, [`Class`]). The classes mirror the
//!   upstream's own limits: `create` (create, update, archive, delete, send events), `read`
//!   (read, list) and `stream` (opening an event stream). See [`admit`].
//! - **Concurrent streams**: a counter per (scope, name) of event streams open right now. See
//!   [`open_stream`] and [`close_stream`].
//! - **Budgets**: tokens and list cost (integer micro-dollars, µ$) a tenant used in the current
//!   minute, UTC day and UTC calendar month. See [`charge`], [`check_budget`] and
//!   [`remaining_microdollars`] (which also caps a new session's own `budget`, see
//!   [`crate::policy::clamp_session_budget`]).
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
//! - `budgets.tenants.<name>` (or `"*"` for every tenant without its own entry; an own entry
//!   replaces `"*"` wholly) takes any of `tokens_per_{minute,day,month}` and
//!   `microdollars_per_{minute,day,month}`, each a non-negative integer (0 blocks the tenant).
//!   Tokens are all four usage kinds added up (input, output, cache writes and reads).
//!
//! Errors name the field path: `limits.tenants.acme.create.per_minute: expected an integer from
//! 1 to 6000000, found 0`. Unknown fields are errors (a typo must not disable a limit).
//!
//! # Failure
//! Every write is a compare-and-swap retried [`CAS_ATTEMPTS`] times; a [`StoreError`] is handed
//! to the caller, who decides whether to fail open (availability) or closed. Reads never fail:
//! an undecodable value (only a bug can write one) is treated as absent and overwritten.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::errors::{ApiError, ErrorKind};
use crate::routes::{Action, Operation};
use crate::store::{update, Store, StoreError};

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
        Action::Create | Action::Update | Action::Archive | Action::Delete | Action::SendEvents => {
            Class::Create
        }
        Action::Read | Action::List => Class::Read,
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
/// run the admitted count is at most `burst` plus what refilled. A denial writes nothing.
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

fn decode_count(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Counts one more open stream at `key` (see [`streams_key`]) unless `max` are open already;
/// `Ok(false)` means refused (nothing written). Every `Ok(true)` must be paired with exactly one
/// [`close_stream`] when the stream ends (`on_log` runs for every stream, reset ones included).
///
/// Known leak: a VM that dies with streams open (a panic under `FAIL_RELOAD`) never closes
/// them, and shared data outlives the VM, so their slots stay taken until the Envoy process
/// restarts. Size `concurrent_streams` with that in mind.
pub fn open_stream(store: &dyn Store, key: &str, max: u64) -> Result<bool, StoreError> {
    let opened = update(store, key, CAS_ATTEMPTS, |value| {
        let open = value.map_or(0, decode_count);
        (open < max).then(|| ((open + 1).to_string().into_bytes(), ()))
    })?;
    Ok(opened.is_some())
}

/// Counts one stream closed at `key`. The counter never goes below zero: a close without an
/// open (or after a config reload changed what is counted) writes nothing.
pub fn close_stream(store: &dyn Store, key: &str) -> Result<(), StoreError> {
    update(store, key, CAS_ATTEMPTS, |value| {
        let open = value.map_or(0, decode_count);
        (open > 0).then(|| ((open - 1).to_string().into_bytes(), ()))
    })?;
    Ok(())
}

/// Streams open at `key` now.
pub fn open_streams(store: &dyn Store, key: &str) -> u64 {
    store
        .get(key)
        .map_or(0, |(bytes, _)| decode_count(&bytes))
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

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm, years ≥ 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month, day)` of a day count since 1970-01-01 (Hinnant's inverse).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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
// Config
// ---------------------------------------------------------------------------------------------

/// Compiles the `limits` config object (shape in the module doc). `path` is where the object
/// sits in the whole config and prefixes every error: `limits.per_tenant.create: …`.
pub fn rules_from_json(value: &Value, path: &str) -> Result<LimitRules, String> {
    let root = object(
        value,
        path,
        &["per_tenant", "per_principal", "tenants", "budgets"],
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
    Ok(LimitRules {
        per_tenant,
        per_principal,
        tenants,
        budgets,
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
            };
            tenants.insert(name.clone(), budget);
        }
    }
    Ok(Budgets { tenants })
}

const BUDGET_FIELDS: [&str; 6] = [
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "microdollars_per_minute",
    "microdollars_per_day",
    "microdollars_per_month",
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
            _ if max == u64::MAX => Err(format!(
                "{path}: expected a non-negative integer, found {n}"
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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
