//! List prices and exact cost, in integer micro-dollars (µ$, 10⁻⁶ USD). No float anywhere.
//!
//! This module owns the price table (defaults from the reference's "List prices", overridable
//! from plugin JSON) and turning usage into money. It does not decide what is new usage
//! (`accounting` does) nor learn a session's model (`usage` does).
//!
//! # Units
//! Token prices are µ$ per million tokens (input $5/MTok = `5_000_000`), so that every list
//! price is an integer; session runtime is µ$ per session-hour of `active_seconds`
//! ($0.08 = `80_000`) and web search µ$ per 1,000 requests ($10 = `10_000_000`).
//!
//! # Rounding: floor of the exact cumulative cost
//! The exact cost of any usage is a rational number of µ$ (a token at $0.50/MTok is 0.5 µ$, a
//! second of runtime at $0.08/h is 22.2… µ$). [`PriceTable::cost`] computes it exactly with
//! `u128` intermediates (numerator over 3,600 × 10⁶) and floors it once. A [`Charge`] is priced
//! as `floor(cost(after)) − floor(cost(before))`, where `before`/`after` are the session's
//! cumulative charged totals around the charge: the differences telescope, so the µ$ emitted
//! for a session always sum to exactly `floor(cost(everything charged))` — a thousand one-token
//! charges give the same total as one thousand-token charge — and the rounding loss per
//! session is below 1 µ$, never repeated per event.
//!
//! # Model matching
//! A rule's `match` is either an exact model id (`claude-opus-4-6`) or a prefix ending in `*`
//! (`claude-opus-4-6*` matches `claude-opus-4-6` and `claude-opus-4-6-20260101`; `*` alone
//! matches everything). An exact rule wins over any prefix; among prefixes the longest wins.
//! The defaults name each priced generation explicitly (`claude-opus-4-5*` … `claude-opus-4-8*`,
//! `claude-opus-5-5*`, exact `claude-opus-5`; never `claude-opus-4-*` or `claude-opus-5*`):
//! Opus 4.0/4.1 cost three times more, Opus 5.5 less than Opus 5, and an unknown future model
//! must show up as [`Priced::Unpriced`] (then corrected to Anthropic's `list_cost`), never as
//! a guessed or $0 price. The table's date is [`PriceTable::source_date`]; the rates the
//! reference could not verify are marked on their constants below.
//!
//! # Estimates and Anthropic's list cost
//! What this table prices is an **estimate**: spans carry no model name, thread models are
//! known only when read, and any table lags Anthropic's. Anthropic's cumulative `list_cost`
//! (on `session.usage` events and session objects) is authoritative; `accounting` corrects
//! each session's charged cost to it exactly once per new figure. [`PriceTable::estimate`]
//! prices one charge exactly, in units of 1/[`EXACT_UNITS_PER_MICRO`] µ$, so that accounting
//! can keep the session's running estimate without rounding loss.
//!
//! # Multipliers
//! - fast mode (`model_usage.speed: "fast"`): ×2 on every token type (reference §8);
//! - long context: Haiku 5.5 prompts (`input + cache_read + cache_creation` of the span) over
//!   100,000 tokens cost ×5 on every token type, output included (reference §8);
//! - data residency `inference_geo: "us"`: ×1.1 on every token type, stacked multiplicatively
//!   with the others (unverified how it stacks with fast mode).
//!
//! Runtime and web search are never multiplied. These multipliers are built in, not part of
//! the plugin JSON.

use std::fmt;

use serde_json::{Map, Value};

use crate::accounting::{Charge, Tally};

/// µ$ in one dollar.
pub const MICROS_PER_USD: u64 = 1_000_000;
/// Largest price accepted anywhere: $1,000,000 per unit. Keeps every product far from the
/// `u128` limit (tokens < 2⁶⁴, price < 2⁴⁰, scale < 2³²).
pub const MAX_PRICE_MICROS: u64 = 1_000_000 * MICROS_PER_USD;

const TOKENS_PER_MTOK: u128 = 1_000_000;
const SECONDS_PER_HOUR: u128 = 3_600;
const REQUESTS_PER_WEB_SEARCH_UNIT: u128 = 1_000;

/// Token prices of one model, in µ$ per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelPrices {
    pub input: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
    pub output: u64,
}

impl ModelPrices {
    /// Prices given in whole cents per MTok (all list prices are).
    const fn cents(input: u64, w5m: u64, w1h: u64, read: u64, output: u64) -> ModelPrices {
        const C: u64 = MICROS_PER_USD / 100;
        ModelPrices {
            input: input * C,
            cache_write_5m: w5m * C,
            cache_write_1h: w1h * C,
            cache_read: read * C,
            output: output * C,
        }
    }
}

// List prices, USD per MTok (input, 5m write, 1h write, cache read, output), from the
// reference's §8 table "Pricing (USD per million tokens)" compiled 2026-12-04 from the
// per-model pages of platform.claude.com (undated snapshots) — the current official pricing
// page could not be read. Rates marked (unverified) come from third parties or are derived.
const PRICE_TABLE_DATE: &str = "2026-12-04";

/// Fable 5.2 / Mythos 5.2: in/out DOCS; cache rates (unverified, 3P).
const FABLE_5_2: ModelPrices = ModelPrices::cents(800, 1000, 1600, 20, 4000);
/// Fable 5.1 / Mythos 5.1: in/out DOCS, cache read a quarter of Fable 5's (DOCS, value 3P);
/// write rates (unverified, 3P).
const FABLE_5_1: ModelPrices = ModelPrices::cents(1000, 1250, 2000, 25, 5000);
/// Fable 5 / Mythos 5 (legacy): in/out DOCS; cache rates (unverified, 3P).
const FABLE_5: ModelPrices = ModelPrices::cents(1000, 1250, 2000, 100, 5000);
/// Opus 5.5: DOCS (all five).
const OPUS_5_5: ModelPrices = ModelPrices::cents(400, 500, 800, 20, 2000);
/// Opus 5, 4.8, 4.7, 4.6, 4.5: DOCS in/out; 4.7/4.8 cache rates assumed standard (unverified).
const OPUS: ModelPrices = ModelPrices::cents(500, 625, 1000, 50, 2500);
/// Sonnet 5.5: DOCS says cache read $0.20, two 3P trackers say $0.10 since 2026-10-07: the
/// cache-read rate is **unverified** (the DOCS figure is used; list_cost corrects either way).
const SONNET_5_5: ModelPrices = ModelPrices::cents(200, 250, 400, 20, 1000);
/// Sonnet 5 (legacy): DOCS.
const SONNET_5: ModelPrices = ModelPrices::cents(200, 250, 400, 20, 1000);
/// Sonnet 4.6 (and the retired 4.5, kept for old sessions): old DOCS pricing page.
const SONNET: ModelPrices = ModelPrices::cents(300, 375, 600, 30, 1500);
/// Haiku 5.5, prompts ≤ 100K: DOCS in/writes/out; cache read $0.01 (unverified, 3P). Prompts
/// over 100K cost ×5 (DOCS; the ×5 1h-write rate is derived, unverified).
const HAIKU_5_5: ModelPrices = ModelPrices {
    input: 100_000,
    cache_write_5m: 125_000,
    cache_write_1h: 200_000,
    cache_read: 10_000,
    output: 500_000,
};
/// Haiku 4.5: old DOCS pricing page.
const HAIKU: ModelPrices = ModelPrices::cents(100, 125, 200, 10, 500);

/// Exact cost units per µ$: 3,600 (runtime is priced per hour, counted in seconds) × 10⁶
/// (prices are per million tokens) × 10 (multipliers are in tenths).
pub const EXACT_UNITS_PER_MICRO: u128 = 3_600 * 1_000_000 * 10;

/// Multipliers in tenths (×2 = 20).
const FAST_TENTHS: u128 = 20;
const GEO_US_TENTHS: u128 = 11;
const STANDARD_TENTHS: u128 = 10;

/// A long-context band: a span whose prompt exceeds `above_tokens` costs `multiplier` times
/// every token rate of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongContextRule {
    pub pattern: ModelPattern,
    pub above_tokens: u64,
    pub multiplier: u64,
}

/// What is known about how one charge's tokens were served, beyond the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Terms {
    /// The span ran in fast mode (`model_usage.speed: "fast"`).
    pub fast: bool,
    /// The span's prompt (`input + cache_read + cache_creation`), for long-context bands;
    /// `None` for snapshot deltas (priced at the base band: never above the truth).
    pub prompt_tokens: Option<u64>,
    /// The session runs with `inference_geo: "us"`.
    pub geo_us: bool,
}

/// Which model ids a rule applies to (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelPattern {
    Exact(String),
    Prefix(String),
}

impl ModelPattern {
    /// `name*` is a prefix, anything else an exact id. `*` may only come last.
    pub fn parse(pattern: &str) -> Result<ModelPattern, String> {
        let (body, prefix) = match pattern.strip_suffix('*') {
            Some(body) => (body, true),
            None => (pattern, false),
        };
        if pattern.is_empty() {
            return Err("must not be empty".into());
        }
        if body.contains('*') {
            return Err(format!("{pattern:?}: `*` is only allowed at the end"));
        }
        if !body.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{pattern:?}: only visible ASCII is allowed"));
        }
        Ok(if prefix {
            ModelPattern::Prefix(body.to_string())
        } else {
            ModelPattern::Exact(body.to_string())
        })
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Exact(id) => model == id,
            ModelPattern::Prefix(prefix) => model.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelPattern::Exact(id) => write!(f, "{id}"),
            ModelPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRule {
    pub pattern: ModelPattern,
    pub prices: ModelPrices,
}

/// The result of pricing usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priced {
    /// Cost in µ$.
    Micros(u64),
    /// The model is unknown (or no rule matches it): the tokens are still counted, but no
    /// cost is invented.
    Unpriced,
}

/// All prices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    pub models: Vec<ModelRule>,
    /// µ$ per session-hour of `active_seconds`.
    pub runtime_per_hour: u64,
    /// µ$ per 1,000 web search requests.
    pub web_search_per_1k: u64,
    /// Long-context bands (built in: Haiku 5.5 over 100K tokens ×5).
    pub long_context: Vec<LongContextRule>,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable::defaults()
    }
}

impl PriceTable {
    /// The reference list prices (table dated [`PriceTable::source_date`]): the Fable,
    /// Mythos, Opus, Sonnet and Haiku generations the API serves in December 2026, runtime
    /// $0.08 per session-hour, web search $10 per 1,000, Haiku 5.5's >100K band ×5.
    pub fn defaults() -> PriceTable {
        let rule = |prefix: &str, prices| ModelRule {
            pattern: ModelPattern::Prefix(prefix.to_string()),
            prices,
        };
        PriceTable {
            models: vec![
                rule("claude-fable-5-2", FABLE_5_2),
                rule("claude-mythos-5-2", FABLE_5_2),
                rule("claude-fable-5-1", FABLE_5_1),
                rule("claude-mythos-5-1", FABLE_5_1),
                // Exact ids: a prefix `claude-fable-5` would also match 5-3 and later.
                ModelRule {
                    pattern: ModelPattern::Exact("claude-fable-5".into()),
                    prices: FABLE_5,
                },
                ModelRule {
                    pattern: ModelPattern::Exact("claude-mythos-5".into()),
                    prices: FABLE_5,
                },
                rule("claude-opus-5-5", OPUS_5_5),
                ModelRule {
                    pattern: ModelPattern::Exact("claude-opus-5".into()),
                    prices: OPUS,
                },
                rule("claude-opus-4-5", OPUS),
                rule("claude-opus-4-6", OPUS),
                rule("claude-opus-4-7", OPUS),
                rule("claude-opus-4-8", OPUS),
                rule("claude-sonnet-5-5", SONNET_5_5),
                ModelRule {
                    pattern: ModelPattern::Exact("claude-sonnet-5".into()),
                    prices: SONNET_5,
                },
                rule("claude-sonnet-4-5", SONNET),
                rule("claude-sonnet-4-6", SONNET),
                rule("claude-haiku-5-5", HAIKU_5_5),
                rule("claude-haiku-4-5", HAIKU),
            ],
            runtime_per_hour: 80_000,
            web_search_per_1k: 10 * MICROS_PER_USD,
            long_context: vec![LongContextRule {
                pattern: ModelPattern::Prefix("claude-haiku-5-5".into()),
                above_tokens: 100_000,
                multiplier: 5,
            }],
        }
    }

    /// The date of the reference table the defaults come from.
    pub fn source_date() -> &'static str {
        PRICE_TABLE_DATE
    }

    /// Reads a price table from plugin JSON. `path` is where `value` sits in the plugin
    /// config (e.g. `pricing`) and prefixes every error, e.g.
    /// `pricing.models[2].input_usd_per_mtok: expected …`.
    ///
    /// ```json
    /// {
    ///   "models": [
    ///     {"match": "claude-opus-4-6*", "input_usd_per_mtok": "5",
    ///      "cache_write_5m_usd_per_mtok": "6.25", "cache_write_1h_usd_per_mtok": "10",
    ///      "cache_read_usd_per_mtok": "0.50", "output_usd_per_mtok": "25"}
    ///   ],
    ///   "replace_default_models": false,
    ///   "runtime_usd_per_session_hour": "0.08",
    ///   "web_search_usd_per_1k": "10"
    /// }
    /// ```
    /// Every field is optional; absent ones keep the defaults. `models` rules are merged into
    /// the default rules: a rule with the same `match` replaces the default one, others are
    /// added; `replace_default_models: true` starts from no model rules at all. In a rule all
    /// five prices are required. Amounts are decimal strings of US dollars with at most six
    /// decimals (parsed exactly, never through a float); plain JSON integers are accepted too,
    /// JSON numbers with a fraction are not. Unknown fields are errors: a typo must not
    /// silently keep a default price.
    pub fn from_json_value(value: &Value, path: &str) -> Result<PriceTable, String> {
        let object = value
            .as_object()
            .ok_or_else(|| at(path, "expected an object"))?;
        known_fields(
            object,
            path,
            &[
                "models",
                "replace_default_models",
                "runtime_usd_per_session_hour",
                "web_search_usd_per_1k",
            ],
        )?;
        let mut table = PriceTable::defaults();
        match object.get("replace_default_models") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => table.models.clear(),
            Some(_) => {
                return Err(at(
                    &join(path, "replace_default_models"),
                    "expected true or false",
                ))
            }
        }
        if let Some(models) = object.get("models") {
            let models_path = join(path, "models");
            let models = models
                .as_array()
                .ok_or_else(|| at(&models_path, "expected an array"))?;
            let mut seen: Vec<&ModelPattern> = Vec::new();
            let rules = models
                .iter()
                .enumerate()
                .map(|(i, rule)| model_rule(rule, &format!("{models_path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            for (i, rule) in rules.iter().enumerate() {
                if seen.contains(&&rule.pattern) {
                    return Err(at(
                        &format!("{models_path}[{i}].match"),
                        &format!("{} is listed twice", rule.pattern),
                    ));
                }
                seen.push(&rule.pattern);
            }
            for rule in rules {
                table.models.retain(|r| r.pattern != rule.pattern);
                table.models.push(rule);
            }
        }
        if let Some(v) = object.get("runtime_usd_per_session_hour") {
            table.runtime_per_hour = usd(v, &join(path, "runtime_usd_per_session_hour"))?;
        }
        if let Some(v) = object.get("web_search_usd_per_1k") {
            table.web_search_per_1k = usd(v, &join(path, "web_search_usd_per_1k"))?;
        }
        Ok(table)
    }

    /// The prices of a model: an exact rule, else the longest matching prefix rule.
    pub fn lookup(&self, model: &str) -> Option<&ModelPrices> {
        let exact = self
            .models
            .iter()
            .find(|r| matches!(&r.pattern, ModelPattern::Exact(id) if id == model));
        exact
            .or_else(|| {
                self.models
                    .iter()
                    .filter(|r| {
                        matches!(r.pattern, ModelPattern::Prefix(_)) && r.pattern.matches(model)
                    })
                    .max_by_key(|r| match &r.pattern {
                        ModelPattern::Prefix(p) | ModelPattern::Exact(p) => p.len(),
                    })
            })
            .map(|r| &r.prices)
    }

    /// The cost of cumulative usage, floored to whole µ$. `Unpriced` when `model` is `None`
    /// or matches no rule.
    pub fn cost(&self, model: Option<&str>, usage: &Tally) -> Priced {
        match model.and_then(|m| self.lookup(m)) {
            Some(prices) => Priced::Micros(self.cost_with(prices, usage)),
            None => Priced::Unpriced,
        }
    }

    /// The µ$ a [`Charge`] adds for a session of `model` (normally `charge.model`):
    /// `floor(cost(after)) − floor(cost(before))`, see the module doc.
    pub fn price_charge(&self, model: Option<&str>, charge: &Charge) -> Priced {
        match model.and_then(|m| self.lookup(m)) {
            Some(prices) => {
                let after = self.cost_with(prices, &charge.after());
                let before = self.cost_with(prices, &charge.before);
                // Cumulative cost only grows, unless a config prices 1h writes below 5m ones
                // and a reclassification happens: then nothing is charged.
                Priced::Micros(after.saturating_sub(before))
            }
            None => Priced::Unpriced,
        }
    }

    /// The exact cost of what `charge` adds, in 1/[`EXACT_UNITS_PER_MICRO`] µ$, for tokens of
    /// `model` served on `terms`; `None` when the model is unknown. Reclassified cache writes
    /// cost the rate difference (never negative). Runtime and web search are never multiplied.
    pub fn estimate(&self, model: Option<&str>, charge: &Charge, terms: &Terms) -> Option<u128> {
        let model = model?;
        let prices = self.lookup(model)?;
        let mut tenths = STANDARD_TENTHS;
        if terms.fast {
            tenths = tenths * FAST_TENTHS / STANDARD_TENTHS;
        }
        if let Some(prompt) = terms.prompt_tokens {
            if let Some(band) = self
                .long_context
                .iter()
                .find(|b| b.pattern.matches(model) && prompt > b.above_tokens)
            {
                tenths = tenths.saturating_mul(u128::from(band.multiplier));
            }
        }
        if terms.geo_us {
            tenths = tenths.saturating_mul(GEO_US_TENTHS) / STANDARD_TENTHS;
        }
        let m = |a: u64, b: u64| u128::from(a).saturating_mul(u128::from(b));
        let tokens = [
            m(charge.input, prices.input),
            m(charge.output, prices.output),
            m(charge.cache_read, prices.cache_read),
            m(charge.cache_write_5m, prices.cache_write_5m),
            m(charge.cache_write_1h, prices.cache_write_1h),
            m(
                charge.cache_write_5m_to_1h,
                prices.cache_write_1h.saturating_sub(prices.cache_write_5m),
            ),
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add);
        // tokens × µ$/MTok × tenths / (10⁶ × 10) µ$ = that × 3,600 units.
        let tokens = tokens
            .saturating_mul(tenths)
            .saturating_mul(SECONDS_PER_HOUR);
        // seconds × µ$/h / 3,600 µ$ = that × 10⁷ units.
        let runtime = m(charge.active_seconds, self.runtime_per_hour)
            .saturating_mul(EXACT_UNITS_PER_MICRO / SECONDS_PER_HOUR);
        // requests × µ$/1k / 1,000 µ$.
        let searches = m(charge.web_search_requests, self.web_search_per_1k)
            .saturating_mul(EXACT_UNITS_PER_MICRO / REQUESTS_PER_WEB_SEARCH_UNIT);
        Some(tokens.saturating_add(runtime).saturating_add(searches))
    }

    fn cost_with(&self, prices: &ModelPrices, usage: &Tally) -> u64 {
        let m = |a: u64, b: u64| u128::from(a).saturating_mul(u128::from(b));
        // Token costs in pico-dollars (tokens × µ$/MTok = 10⁻⁶ µ$), exact.
        let tokens = [
            m(usage.input, prices.input),
            m(usage.output, prices.output),
            m(usage.cache_read, prices.cache_read),
            m(usage.cache_write_5m, prices.cache_write_5m),
            m(usage.cache_write_1h, prices.cache_write_1h),
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add);
        // Everything over the common denominator 3,600 × 10⁶, so that runtime (priced per
        // hour, counted in seconds) stays exact too.
        let scale = SECONDS_PER_HOUR * TOKENS_PER_MTOK;
        let numerator = tokens
            .saturating_mul(SECONDS_PER_HOUR)
            .saturating_add(
                m(usage.active_seconds, self.runtime_per_hour).saturating_mul(TOKENS_PER_MTOK),
            )
            .saturating_add(
                m(usage.web_search_requests, self.web_search_per_1k)
                    .saturating_mul(scale / REQUESTS_PER_WEB_SEARCH_UNIT),
            );
        u64::try_from(numerator / scale).unwrap_or(u64::MAX)
    }
}

/// Parses a decimal amount of US dollars ("6.25", "0.08", "10") into µ$, exactly. At most
/// six decimals (more are allowed only as trailing zeros); no sign, exponent or spaces; at
/// most [`MAX_PRICE_MICROS`].
pub fn parse_usd(text: &str) -> Result<u64, String> {
    let bad = || format!("expected a decimal amount of US dollars like \"6.25\", got {text:?}");
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || text.ends_with('.') {
        return Err(bad());
    }
    let (kept, rest) = fraction.split_at(fraction.len().min(6));
    if rest.bytes().any(|b| b != b'0') {
        return Err(format!(
            "{text:?} has more than 6 decimals (finer than a micro-dollar)"
        ));
    }
    let whole = match whole.trim_start_matches('0') {
        "" => 0,
        digits => digits.parse::<u64>().map_err(|_| too_large(text))?,
    };
    let mut micros_part: u64 = 0;
    for i in 0..6 {
        let digit = kept.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        micros_part = micros_part * 10 + digit;
    }
    let micros = whole
        .checked_mul(MICROS_PER_USD)
        .and_then(|w| w.checked_add(micros_part))
        .filter(|&m| m <= MAX_PRICE_MICROS)
        .ok_or_else(|| too_large(text))?;
    Ok(micros)
}

fn too_large(text: &str) -> String {
    format!("{text:?} is more than the largest accepted price, $1000000")
}

/// Formats µ$ as dollars with all six decimals, e.g. `39358` → `$0.039358`.
pub fn format_usd(micros: u64) -> String {
    format!(
        "${}.{:06}",
        micros / MICROS_PER_USD,
        micros % MICROS_PER_USD
    )
}

fn model_rule(value: &Value, path: &str) -> Result<ModelRule, String> {
    let object = value
        .as_object()
        .ok_or_else(|| at(path, "expected an object"))?;
    const PRICES: [&str; 5] = [
        "input_usd_per_mtok",
        "cache_write_5m_usd_per_mtok",
        "cache_write_1h_usd_per_mtok",
        "cache_read_usd_per_mtok",
        "output_usd_per_mtok",
    ];
    let mut fields = vec!["match"];
    fields.extend(PRICES);
    known_fields(object, path, &fields)?;
    let pattern_path = join(path, "match");
    let pattern = match object.get("match") {
        Some(Value::String(pattern)) => {
            ModelPattern::parse(pattern).map_err(|e| at(&pattern_path, &e))?
        }
        Some(_) => return Err(at(&pattern_path, "expected a string")),
        None => return Err(at(&pattern_path, "missing")),
    };
    let mut prices = [0u64; 5];
    for (price, field) in prices.iter_mut().zip(PRICES) {
        let field_path = join(path, field);
        *price = match object.get(field) {
            Some(v) => usd(v, &field_path)?,
            None => return Err(at(&field_path, "missing")),
        };
    }
    let [input, cache_write_5m, cache_write_1h, cache_read, output] = prices;
    Ok(ModelRule {
        pattern,
        prices: ModelPrices {
            input,
            cache_write_5m,
            cache_write_1h,
            cache_read,
            output,
        },
    })
}

/// A dollar amount: a decimal string, or a non-negative JSON integer.
fn usd(value: &Value, path: &str) -> Result<u64, String> {
    match value {
        Value::String(text) => parse_usd(text).map_err(|e| at(path, &e)),
        Value::Number(n) => match n.as_u64() {
            Some(whole) => whole
                .checked_mul(MICROS_PER_USD)
                .filter(|&m| m <= MAX_PRICE_MICROS)
                .ok_or_else(|| at(path, &too_large(&whole.to_string()))),
            None if n.is_i64() => Err(at(path, "must not be negative")),
            None => Err(at(
                path,
                &format!("write {n} as a string, e.g. \"{n}\": fractional JSON numbers are floats"),
            )),
        },
        _ => Err(at(
            path,
            "expected a decimal string of US dollars like \"6.25\"",
        )),
    }
}

fn known_fields(object: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), String> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(at(
            &join(path, unknown),
            &format!("unknown field; expected one of {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn at(path: &str, message: &str) -> String {
    if path.is_empty() {
        message.to_string()
    } else {
        format!("{path}: {message}")
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use serde_json::json;

    use super::*;
    use crate::accounting;
    use crate::store::MemoryStore;
    use crate::usage::{Observation, SpanKind, SpanTokens};

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

    fn micros(priced: Priced) -> u64 {
        match priced {
            Priced::Micros(m) => m,
            Priced::Unpriced => panic!("unpriced"),
        }
    }

    #[test]
    fn the_reference_span_on_each_family() {
        let table = PriceTable::defaults();
        let usage = tally(3571, 727, 6656, 0, 0);
        // Opus: 3571 × $5 + 727 × $25 + 6656 × $0.50 per MTok
        //     = 17,855 + 18,175 + 3,328 µ$ = 39,358 µ$ exactly.
        assert_eq!(
            table.cost(Some("claude-opus-4-6"), &usage),
            Priced::Micros(39_358)
        );
        assert_eq!(format_usd(39_358), "$0.039358");
        // Sonnet: 3571 × 3 + 727 × 15 + 6656 × 0.30 = 10,713 + 10,905 + 1,996.8 → 23,614.
        assert_eq!(
            table.cost(Some("claude-sonnet-4-5-20250929"), &usage),
            Priced::Micros(23_614)
        );
        // Haiku: 3571 × 1 + 727 × 5 + 6656 × 0.10 = 3,571 + 3,635 + 665.6 → 7,871.
        assert_eq!(
            table.cost(Some("claude-haiku-4-5"), &usage),
            Priced::Micros(7_871)
        );
    }

    #[test]
    fn cache_writes_runtime_and_web_search() {
        let table = PriceTable::defaults();
        let opus = Some("claude-opus-4-5");
        // 1,000 × $6.25/MTok = 6,250 µ$; 1,000 × $10/MTok = 10,000 µ$.
        assert_eq!(
            table.cost(opus, &tally(0, 0, 0, 1000, 0)),
            Priced::Micros(6_250)
        );
        assert_eq!(
            table.cost(opus, &tally(0, 0, 0, 0, 1000)),
            Priced::Micros(10_000)
        );
        let runtime = |s| Tally {
            active_seconds: s,
            ..Tally::default()
        };
        // $0.08 per hour: 3,600 s = 80,000 µ$; 1 s = 22.2… → 22; 1,000 s = 22,222.2… → 22,222.
        assert_eq!(table.cost(opus, &runtime(3600)), Priced::Micros(80_000));
        assert_eq!(table.cost(opus, &runtime(1)), Priced::Micros(22));
        assert_eq!(table.cost(opus, &runtime(1000)), Priced::Micros(22_222));
        // $10 per 1,000 searches: one is 10,000 µ$.
        let searches = Tally {
            web_search_requests: 1,
            ..Tally::default()
        };
        assert_eq!(table.cost(opus, &searches), Priced::Micros(10_000));
        // Saturates instead of overflowing.
        let huge = Tally {
            input: u64::MAX,
            output: u64::MAX,
            active_seconds: u64::MAX,
            ..Tally::default()
        };
        assert_eq!(table.cost(opus, &huge), Priced::Micros(u64::MAX));
    }

    fn one(input: u64, cache_read: u64, active_seconds: u64, before: Tally) -> Charge {
        Charge {
            input,
            cache_read,
            active_seconds,
            before,
            ..Charge::default()
        }
    }

    #[test]
    fn a_thousand_small_charges_equal_one_big_one() {
        let table = PriceTable::defaults();
        let opus = Some("claude-opus-4-6");
        // One cache-read token is 0.5 µ$, one second of runtime 22.2… µ$: pricing each charge
        // on its own would floor the remainder away every time.
        let mut before = Tally::default();
        let mut sum = 0;
        for _ in 0..1000 {
            let charge = one(0, 1, 1, before);
            sum += micros(table.price_charge(opus, &charge));
            before = charge.after();
        }
        let big = one(0, 1000, 1000, Tally::default());
        assert_eq!(micros(table.price_charge(opus, &big)), 500 + 22_222);
        assert_eq!(sum, 500 + 22_222);
        assert_eq!(
            micros(table.price_charge(opus, &one(0, 1, 1, Tally::default()))),
            22
        );
    }

    #[test]
    fn charges_from_accounting_sum_exactly() {
        let table = PriceTable::defaults();
        let store = MemoryStore::new();
        let mut sum = 0;
        for i in 0..1000 {
            let span = Observation::Span {
                event_id: format!("sevt_{i}"),
                kind: SpanKind::ModelRequest,
                tokens: SpanTokens {
                    input: 0,
                    output: 0,
                    cache_creation: 0,
                    cache_read: 3,
                },
                speed: None,
                is_error: false,
            };
            let charge = accounting::record(&store, "sesn_1", &span, 1).unwrap();
            sum += micros(table.price_charge(Some("claude-sonnet-4-6"), &charge));
        }
        // 512 spans counted individually (the id cap), then deferred: 1,536 tokens × $0.30.
        assert_eq!(sum, 460); // 460.8 µ$ floored once
    }

    #[test]
    fn reclassified_cache_writes_cost_the_rate_difference() {
        let table = PriceTable::defaults();
        let opus = Some("claude-opus-4-6");
        // 90 tokens charged as 5m (562.5 µ$); the snapshot says 50 of them were 1h.
        let charge = Charge {
            cache_write_5m_to_1h: 50,
            before: tally(0, 0, 0, 90, 0),
            ..Charge::default()
        };
        assert_eq!(charge.after(), tally(0, 0, 0, 40, 50));
        // after: 40 × 6.25 + 50 × 10 = 750 µ$; before floor(562.5) = 562; the difference,
        // 188, brings the session to exactly 750.
        assert_eq!(table.price_charge(opus, &charge), Priced::Micros(188));
        assert_eq!(
            table.cost(opus, &tally(0, 0, 0, 90, 0)),
            Priced::Micros(562)
        );
    }

    #[test]
    fn unknown_models_are_unpriced() {
        let table = PriceTable::defaults();
        let charge = one(10, 0, 0, Tally::default());
        for model in [
            Some("claude-opus-4-1"),
            Some("claude-opus-4-20250514"),
            Some("claude-opus-4-9"),
            Some("gpt-5"),
            Some(""),
            None,
        ] {
            assert_eq!(
                table.price_charge(model, &charge),
                Priced::Unpriced,
                "{model:?}"
            );
            assert_eq!(table.cost(model, &tally(1, 0, 0, 0, 0)), Priced::Unpriced);
        }
    }

    fn est(table: &PriceTable, model: &str, charge: &Charge, terms: Terms) -> u128 {
        table.estimate(Some(model), charge, &terms).unwrap()
    }

    #[test]
    fn current_models_have_the_reference_prices() {
        let table = PriceTable::defaults();
        assert_eq!(PriceTable::source_date(), "2026-12-04");
        for (model, prices) in [
            ("claude-opus-5-5", OPUS_5_5),
            ("claude-sonnet-5-5", SONNET_5_5),
            ("claude-haiku-5-5", HAIKU_5_5),
            ("claude-fable-5-2", FABLE_5_2),
            ("claude-fable-5-1", FABLE_5_1),
            ("claude-fable-5", FABLE_5),
            ("claude-mythos-5-2", FABLE_5_2),
            ("claude-opus-5", OPUS),
            ("claude-sonnet-5", SONNET_5),
            ("claude-opus-4-8", OPUS),
            ("claude-sonnet-4-6", SONNET),
            ("claude-haiku-4-5-20251001", HAIKU),
        ] {
            assert_eq!(table.lookup(model), Some(&prices), "{model}");
        }
        // Opus 5.5: $4 in, $0.20 cache read (0.05×), $20 out.
        assert_eq!(OPUS_5_5.input, 4_000_000);
        assert_eq!(OPUS_5_5.cache_read, 200_000);
        // Never guessed: later generations and dated legacy ids are unpriced.
        for model in [
            "claude-fable-5-3",
            "claude-opus-5-6",
            "claude-haiku-6",
            "claude-opus-5-x",
        ] {
            assert_eq!(table.lookup(model), None, "{model}");
        }
    }

    #[test]
    fn estimates_apply_fast_band_and_geo_multipliers() {
        let table = PriceTable::defaults();
        let charge = Charge {
            input: 3571,
            output: 727,
            cache_read: 6656,
            ..Charge::default()
        };
        let standard = Terms {
            prompt_tokens: Some(3571 + 6656),
            ..Terms::default()
        };
        // Opus 5.5: 3571 × 4 + 727 × 20 + 6656 × 0.20 = 14,284 + 14,540 + 1,331.2 µ$.
        let base = est(&table, "claude-opus-5-5", &charge, standard);
        assert_eq!(base, 301_552 * EXACT_UNITS_PER_MICRO / 10);
        // Fast: ×2 on every token type.
        let fast = Terms {
            fast: true,
            ..standard
        };
        assert_eq!(est(&table, "claude-opus-5-5", &charge, fast), 2 * base);
        // Data residency us: ×1.1, stacked with fast.
        let geo = Terms {
            geo_us: true,
            ..standard
        };
        assert_eq!(est(&table, "claude-opus-5-5", &charge, geo), base * 11 / 10);
        let both = Terms {
            fast: true,
            geo_us: true,
            ..standard
        };
        assert_eq!(
            est(&table, "claude-opus-5-5", &charge, both),
            base * 22 / 10
        );
        // Haiku 5.5: ×5 only above 100,000 prompt tokens (input + cache read + writes).
        let haiku = |prompt| {
            est(
                &table,
                "claude-haiku-5-5",
                &charge,
                Terms {
                    prompt_tokens: Some(prompt),
                    ..Terms::default()
                },
            )
        };
        assert_eq!(haiku(100_000) * 5, haiku(100_001));
        // 3571 × 0.10 + 727 × 0.50 + 6656 × 0.01 = 357.1 + 363.5 + 66.56 = 787.16 µ$.
        assert_eq!(haiku(100_000), 78_716 * EXACT_UNITS_PER_MICRO / 100);
        // Other models have no band; snapshot deltas (no prompt) take the base band.
        assert_eq!(
            est(
                &table,
                "claude-opus-5-5",
                &charge,
                Terms {
                    prompt_tokens: Some(900_000),
                    ..Terms::default()
                }
            ),
            base
        );
        assert_eq!(
            est(&table, "claude-haiku-5-5", &charge, Terms::default()),
            haiku(100_000)
        );
        // Runtime and web search are not multiplied.
        let runtime = Charge {
            active_seconds: 3600,
            web_search_requests: 1,
            ..Charge::default()
        };
        assert_eq!(
            est(&table, "claude-opus-5-5", &runtime, both),
            (80_000 + 10_000) * EXACT_UNITS_PER_MICRO
        );
        // Reclassified cache writes cost the rate difference: 50 × (8 − 5) = 150 µ$.
        let reclassified = Charge {
            cache_write_5m_to_1h: 50,
            ..Charge::default()
        };
        assert_eq!(
            est(&table, "claude-opus-5-5", &reclassified, Terms::default()),
            150 * EXACT_UNITS_PER_MICRO
        );
        assert_eq!(table.estimate(Some("gpt-5"), &charge, &standard), None);
        assert_eq!(table.estimate(None, &charge, &standard), None);
    }

    #[test]
    fn matching_is_exact_first_then_longest_prefix() {
        let mut table = PriceTable::defaults();
        let custom = ModelPrices::cents(1, 1, 1, 1, 1);
        let longer = ModelPrices::cents(2, 2, 2, 2, 2);
        table.models.push(ModelRule {
            pattern: ModelPattern::Exact("claude-opus-4-6".into()),
            prices: custom,
        });
        table.models.insert(
            0,
            ModelRule {
                pattern: ModelPattern::Prefix("claude-opus-4-6-2026".into()),
                prices: longer,
            },
        );
        assert_eq!(table.lookup("claude-opus-4-6"), Some(&custom));
        assert_eq!(table.lookup("claude-opus-4-6-20260101"), Some(&longer));
        assert_eq!(table.lookup("claude-opus-4-6-fast"), Some(&OPUS));
        assert_eq!(table.lookup("claude-sonnet-4-6"), Some(&SONNET));
        assert_eq!(table.lookup("claude-haiku-4-5-20251001"), Some(&HAIKU));
        assert_eq!(table.lookup("claude-haiku-4"), None);
        table.models.push(ModelRule {
            pattern: ModelPattern::parse("*").unwrap(),
            prices: custom,
        });
        assert_eq!(table.lookup("anything"), Some(&custom));
        assert_eq!(table.lookup("claude-sonnet-4-5"), Some(&SONNET));
    }

    #[test]
    fn decimal_dollars_parse_exactly() {
        for (text, expected) in [
            ("5", 5_000_000),
            ("6.25", 6_250_000),
            ("0.50", 500_000),
            ("0.08", 80_000),
            ("0.000001", 1),
            ("0.0000010", 1),
            ("007.5", 7_500_000),
            ("0", 0),
            ("1000000", MAX_PRICE_MICROS),
        ] {
            assert_eq!(parse_usd(text), Ok(expected), "{text}");
        }
        for text in [
            "",
            ".5",
            "5.",
            "-1",
            "+1",
            "1e3",
            " 5",
            "5 ",
            "1,5",
            "0.0000001",
            "1000000.000001",
            "99999999999999999999",
            "$5",
            "NaN",
        ] {
            assert!(parse_usd(text).is_err(), "{text}");
        }
        assert_eq!(format_usd(0), "$0.000000");
        assert_eq!(format_usd(12_345_678), "$12.345678");
    }

    #[test]
    fn json_empty_is_the_defaults_and_overrides_merge() {
        assert_eq!(
            PriceTable::from_json_value(&json!({}), "pricing"),
            Ok(PriceTable::defaults())
        );
        let table = PriceTable::from_json_value(
            &json!({
                "models": [
                    {"match": "claude-opus-4-6*", "input_usd_per_mtok": "4", "cache_write_5m_usd_per_mtok": "5",
                     "cache_write_1h_usd_per_mtok": "8", "cache_read_usd_per_mtok": "0.4", "output_usd_per_mtok": 20},
                    {"match": "my-model", "input_usd_per_mtok": "0.000001", "cache_write_5m_usd_per_mtok": "0",
                     "cache_write_1h_usd_per_mtok": "0", "cache_read_usd_per_mtok": "0", "output_usd_per_mtok": "0"}
                ],
                "runtime_usd_per_session_hour": "0.10",
                "web_search_usd_per_1k": 12
            }),
            "pricing",
        )
        .unwrap();
        assert_eq!(table.models.len(), PriceTable::defaults().models.len() + 1);
        assert_eq!(
            table.lookup("claude-opus-4-6"),
            Some(&ModelPrices {
                input: 4_000_000,
                cache_write_5m: 5_000_000,
                cache_write_1h: 8_000_000,
                cache_read: 400_000,
                output: 20_000_000,
            })
        );
        assert_eq!(table.lookup("claude-opus-4-5"), Some(&OPUS));
        assert_eq!(table.lookup("my-model").map(|p| p.input), Some(1));
        assert_eq!(
            (table.runtime_per_hour, table.web_search_per_1k),
            (100_000, 12_000_000)
        );

        let only = PriceTable::from_json_value(
            &json!({"replace_default_models": true, "models": []}),
            "pricing",
        )
        .unwrap();
        assert!(only.models.is_empty());
        assert_eq!(
            only.cost(Some("claude-opus-4-6"), &Tally::default()),
            Priced::Unpriced
        );
    }

    #[test]
    fn json_errors_name_the_field_path() {
        let rule = json!({"match": "m", "input_usd_per_mtok": "1", "cache_write_5m_usd_per_mtok": "1",
            "cache_write_1h_usd_per_mtok": "1", "cache_read_usd_per_mtok": "1", "output_usd_per_mtok": "1"});
        let with = |field: &str, value: Value| {
            let mut bad = rule.clone();
            bad["match"] = json!("other");
            bad[field] = value;
            json!({"models": [rule.clone(), {"match": "x", "input_usd_per_mtok": "1", "cache_write_5m_usd_per_mtok": "1",
                "cache_write_1h_usd_per_mtok": "1", "cache_read_usd_per_mtok": "1", "output_usd_per_mtok": "1"}, bad]})
        };
        let error = |value: Value| PriceTable::from_json_value(&value, "pricing").unwrap_err();
        assert_eq!(
            error(with("input_usd_per_mtok", json!("5.0000001"))),
            "pricing.models[2].input_usd_per_mtok: \"5.0000001\" has more than 6 decimals (finer than a micro-dollar)"
        );
        assert_eq!(
            error(with("output_usd_per_mtok", json!(2.5))),
            "pricing.models[2].output_usd_per_mtok: write 2.5 as a string, e.g. \"2.5\": fractional JSON numbers are floats"
        );
        assert_eq!(
            error(with("cache_read_usd_per_mtok", json!("-1"))),
            "pricing.models[2].cache_read_usd_per_mtok: expected a decimal amount of US dollars like \"6.25\", got \"-1\""
        );
        assert_eq!(
            error(with("cache_write_1h_usd_per_mtok", json!(null))),
            "pricing.models[2].cache_write_1h_usd_per_mtok: expected a decimal string of US dollars like \"6.25\""
        );
        assert_eq!(
            error(with("match", json!("claude-*-4"))),
            "pricing.models[2].match: \"claude-*-4\": `*` is only allowed at the end"
        );
        assert_eq!(
            error(with("match", json!(""))),
            "pricing.models[2].match: must not be empty"
        );
        assert_eq!(
            error(with("input_per_mtok", json!("1"))),
            "pricing.models[2].input_per_mtok: unknown field; expected one of match, input_usd_per_mtok, \
             cache_write_5m_usd_per_mtok, cache_write_1h_usd_per_mtok, cache_read_usd_per_mtok, output_usd_per_mtok"
        );
        let mut missing = rule.clone();
        missing
            .as_object_mut()
            .unwrap()
            .remove("output_usd_per_mtok");
        assert_eq!(
            error(json!({"models": [missing]})),
            "pricing.models[0].output_usd_per_mtok: missing"
        );
        assert_eq!(
            error(json!({"models": [rule.clone(), rule.clone()]})),
            "pricing.models[1].match: m is listed twice"
        );
        assert_eq!(
            error(with("input_usd_per_mtok", json!(-3))),
            "pricing.models[2].input_usd_per_mtok: must not be negative"
        );
        assert_eq!(
            error(json!({"models": {}})),
            "pricing.models: expected an array"
        );
        assert_eq!(
            error(json!({"models": [7]})),
            "pricing.models[0]: expected an object"
        );
        assert_eq!(
            error(json!({"runtime_usd_per_hour": "1"})),
            "pricing.runtime_usd_per_hour: unknown field; expected one of models, replace_default_models, \
             runtime_usd_per_session_hour, web_search_usd_per_1k"
        );
        assert_eq!(
            error(json!({"web_search_usd_per_1k": "2000000"})),
            "pricing.web_search_usd_per_1k: \"2000000\" is more than the largest accepted price, $1000000"
        );
        assert_eq!(
            error(json!({"replace_default_models": "yes"})),
            "pricing.replace_default_models: expected true or false"
        );
        assert_eq!(error(json!([])), "pricing: expected an object");
        assert_eq!(
            PriceTable::from_json_value(&json!({"models": [7]}), "").unwrap_err(),
            "models[0]: expected an object"
        );
    }
}
