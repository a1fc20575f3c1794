//! What a job's tokens cost: the price table (`[prices.<model>]`) and whole micro-dollars.
//!
//! Prices are written as the provider publishes them, US dollars per million tokens, and held
//! as whole micro-dollars per million tokens, so a job's cost is integer arithmetic rounded
//! once: the same tokens always cost the same, on every instance, and sums add up.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Tokens spent on one job, as the provider reported them, in the Messages API's terms:
/// `input_tokens` are the prompt's tokens read without the cache; a prompt marked for caching
/// adds `cache_creation_input_tokens` the first time and `cache_read_input_tokens` after. Each
/// kind of token has its own price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Tokens written to the prompt cache (priced above plain input).
    #[serde(default)]
    #[schema(required = true)]
    pub cache_creation_input_tokens: u64,
    /// Tokens read from the prompt cache (priced at a tenth of plain input, or less).
    #[serde(default)]
    #[schema(required = true)]
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Both calls' tokens, for a job that took two (saturating: the counts are the provider's
    /// word).
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            cache_creation_input_tokens: self
                .cache_creation_input_tokens
                .saturating_add(other.cache_creation_input_tokens),
            cache_read_input_tokens: self
                .cache_read_input_tokens
                .saturating_add(other.cache_read_input_tokens),
        }
    }

    /// The tokens a provider's tokens-per-minute limit counts: everything but cache reads,
    /// which Anthropic leaves out of its input limit.
    pub fn rate_limited_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.output_tokens)
    }
}

/// A job's cost in micro-dollars (a millionth of a US dollar): `{"microdollars": 4500,
/// "currency": "USD"}` is $0.0045.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Cost {
    pub microdollars: u64,
    pub currency: Currency,
}

/// The currency prices are written in. Anthropic and OpenAI bill in US dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Currency {
    #[serde(rename = "USD")]
    Usd,
}

/// How a job was sent, which decides its price: one call at a time, or in a Message Batch at
/// the model's batch discount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Sync,
    Batch,
}

impl Path {
    /// The `path` label of the cost metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Batch => "batch",
        }
    }
}

const MICROS_PER_DOLLAR: f64 = 1_000_000.0;
const TOKENS_PER_PRICE: u128 = 1_000_000;
/// The batch discount is held in millionths.
const DISCOUNT_SCALE: u128 = 1_000_000;
/// No model costs anything near this per million tokens; a price above it is a typo, and the
/// bound keeps every product in range.
const MAX_PRICE_USD: f64 = 100_000.0;

/// One model's prices, in micro-dollars per million tokens (which is dollars per token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PriceAsWritten", into = "PriceAsWritten")]
pub struct ModelPrice {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
    /// What a batched call is spared, in millionths of the price.
    batch_discount: u64,
}

/// `[prices."claude-sonnet-4-5"]` as written: dollars per million tokens. A cache write costs
/// 1.25 times input and a cache read a tenth of it unless given (Anthropic's 5-minute cache);
/// batches are half price unless given.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceAsWritten {
    input: f64,
    output: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_write: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_read: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch_discount: Option<f64>,
}

impl TryFrom<PriceAsWritten> for ModelPrice {
    type Error = String;

    fn try_from(written: PriceAsWritten) -> Result<Self, String> {
        let dollars = |name: &str, value: f64| {
            if value.is_finite() && (0.0..=MAX_PRICE_USD).contains(&value) {
                Ok((value * MICROS_PER_DOLLAR).round() as u64)
            } else {
                Err(format!(
                    "`{name}` must be a price in dollars per million tokens, 0 to {MAX_PRICE_USD}, not {value}"
                ))
            }
        };
        let discount = written.batch_discount.unwrap_or(0.5);
        if !(discount.is_finite() && (0.0..=1.0).contains(&discount)) {
            return Err(format!(
                "`batch_discount` must be a fraction from 0 to 1 (0.5 is half price), not {discount}"
            ));
        }
        Ok(Self {
            input: dollars("input", written.input)?,
            output: dollars("output", written.output)?,
            cache_write: dollars(
                "cache_write",
                written.cache_write.unwrap_or(written.input * 1.25),
            )?,
            cache_read: dollars(
                "cache_read",
                written.cache_read.unwrap_or(written.input / 10.0),
            )?,
            batch_discount: (discount * DISCOUNT_SCALE as f64).round() as u64,
        })
    }
}

impl From<ModelPrice> for PriceAsWritten {
    fn from(price: ModelPrice) -> Self {
        let dollars = |micros: u64| micros as f64 / MICROS_PER_DOLLAR;
        Self {
            input: dollars(price.input),
            output: dollars(price.output),
            cache_write: Some(dollars(price.cache_write)),
            cache_read: Some(dollars(price.cache_read)),
            batch_discount: Some(price.batch_discount as f64 / DISCOUNT_SCALE as f64),
        }
    }
}

impl ModelPrice {
    /// Dollars per million tokens: input, output, cache write, cache read; batches at half.
    pub fn per_million(input: f64, output: f64, cache_write: f64, cache_read: f64) -> Self {
        Self::try_from(PriceAsWritten {
            input,
            output,
            cache_write: Some(cache_write),
            cache_read: Some(cache_read),
            batch_discount: None,
        })
        .expect("a price within bounds")
    }

    /// What `usage` costs sent by `path`, rounded half up to a whole micro-dollar once.
    pub fn cost(&self, usage: &Usage, path: Path) -> Cost {
        let scaled = [
            (usage.input_tokens, self.input),
            (usage.output_tokens, self.output),
            (usage.cache_creation_input_tokens, self.cache_write),
            (usage.cache_read_input_tokens, self.cache_read),
        ]
        .iter()
        .map(|&(tokens, price)| u128::from(tokens) * u128::from(price))
        .fold(0u128, u128::saturating_add);
        let kept = match path {
            Path::Sync => DISCOUNT_SCALE,
            Path::Batch => DISCOUNT_SCALE - u128::from(self.batch_discount),
        };
        let divisor = TOKENS_PER_PRICE * DISCOUNT_SCALE;
        let micros = scaled.saturating_mul(kept).saturating_add(divisor / 2) / divisor;
        Cost {
            microdollars: u64::try_from(micros).unwrap_or(u64::MAX),
            currency: Currency::Usd,
        }
    }
}

/// `[prices]`: each model's prices, keyed by model name. A key prices the model of that name
/// and every dated or versioned name under it (`claude-sonnet-4-5` prices
/// `claude-sonnet-4-5-20250929` and `claude-sonnet-4-5@20250929`); the longest key that fits
/// wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PriceTable(BTreeMap<String, ModelPrice>);

impl Default for PriceTable {
    /// Anthropic's published prices (platform.claude.com/docs/en/about-claude/pricing,
    /// December 2026), standard context, 5-minute cache writes.
    fn default() -> Self {
        let price = ModelPrice::per_million;
        let table = [
            ("claude-opus-5-5", price(4.0, 20.0, 5.0, 0.20)),
            ("claude-opus-5", price(5.0, 25.0, 6.25, 0.50)),
            ("claude-opus-4-8", price(5.0, 25.0, 6.25, 0.50)),
            ("claude-opus-4-7", price(5.0, 25.0, 6.25, 0.50)),
            ("claude-opus-4-6", price(5.0, 25.0, 6.25, 0.50)),
            ("claude-opus-4-5", price(5.0, 25.0, 6.25, 0.50)),
            ("claude-opus-4-1", price(15.0, 75.0, 18.75, 1.50)),
            ("claude-opus-4", price(15.0, 75.0, 18.75, 1.50)),
            ("claude-sonnet-5-5", price(2.0, 10.0, 2.50, 0.10)),
            ("claude-sonnet-5", price(2.0, 10.0, 2.50, 0.20)),
            ("claude-sonnet-4", price(3.0, 15.0, 3.75, 0.30)),
            ("claude-3-7-sonnet", price(3.0, 15.0, 3.75, 0.30)),
            ("claude-haiku-5-5", price(0.10, 0.50, 0.125, 0.01)),
            ("claude-haiku-4-5", price(1.0, 5.0, 1.25, 0.10)),
            ("claude-3-5-haiku", price(0.80, 4.0, 1.0, 0.08)),
            ("claude-3-haiku", price(0.25, 1.25, 0.30, 0.03)),
        ];
        Self(
            table
                .into_iter()
                .map(|(model, price)| (model.to_owned(), price))
                .collect(),
        )
    }
}

impl PriceTable {
    /// The price of `model`: its own entry, or the longest key it extends by `-` or `@`.
    pub fn price_of(&self, model: &str) -> Option<&ModelPrice> {
        if let Some(price) = self.0.get(model) {
            return Some(price);
        }
        self.0
            .iter()
            .filter(|(key, _)| {
                model
                    .strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.starts_with(['-', '@']))
            })
            .max_by_key(|(key, _)| key.len())
            .map(|(_, price)| price)
    }

    /// What `usage` of `model` cost sent by `path`, if the model has a price.
    pub fn cost(&self, model: &str, usage: &Usage, path: Path) -> Option<Cost> {
        self.price_of(model).map(|price| price.cost(usage, path))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        match self.0.keys().find(|model| model.trim().is_empty()) {
            Some(_) => Err("a model name must not be blank".into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, cache_write: u64, cache_read: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: cache_write,
            cache_read_input_tokens: cache_read,
        }
    }

    #[test]
    fn every_kind_of_token_is_priced_at_its_own_rate() {
        let sonnet = ModelPrice::per_million(3.0, 15.0, 3.75, 0.30);
        // 1,000 × $3 + 200 × $15 + 2,000 × $3.75 + 10,000 × $0.30, per million tokens.
        let cost = sonnet.cost(&usage(1_000, 200, 2_000, 10_000), Path::Sync);
        assert_eq!(cost.microdollars, 3_000 + 3_000 + 7_500 + 3_000);
        assert_eq!(cost.currency, Currency::Usd);
    }

    #[test]
    fn a_batch_costs_half_and_rounds_once() {
        let haiku = ModelPrice::per_million(0.25, 1.25, 0.30, 0.03);
        // 7 input tokens at $0.25/MTok is 1.75 µ$; 3 cache reads at $0.03 is 0.09 µ$.
        let tiny = usage(7, 0, 0, 3);
        assert_eq!(haiku.cost(&tiny, Path::Sync).microdollars, 2);
        assert_eq!(haiku.cost(&tiny, Path::Batch).microdollars, 1);
        let sonnet = ModelPrice::per_million(3.0, 15.0, 3.75, 0.30);
        let big = usage(1_000_000, 1_000_000, 0, 0);
        assert_eq!(sonnet.cost(&big, Path::Sync).microdollars, 18_000_000);
        assert_eq!(sonnet.cost(&big, Path::Batch).microdollars, 9_000_000);
    }

    #[test]
    fn enormous_counts_saturate_instead_of_wrapping() {
        let opus = ModelPrice::per_million(MAX_PRICE_USD, MAX_PRICE_USD, 0.0, 0.0);
        let cost = opus.cost(&usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX), Path::Sync);
        assert_eq!(cost.microdollars, u64::MAX);
    }

    #[test]
    fn a_dated_model_name_takes_the_price_of_its_longest_key() {
        let table = PriceTable::default();
        let price = |model| table.price_of(model).copied();
        assert_eq!(
            price("claude-opus-4-5-20251101"),
            price("claude-opus-4-5"),
            "not Opus 4's price"
        );
        assert_ne!(price("claude-opus-4-5"), price("claude-opus-4"));
        assert_eq!(price("claude-opus-4-20250514"), price("claude-opus-4"));
        assert_eq!(
            price("claude-sonnet-4-5@20250929"),
            price("claude-sonnet-4")
        );
        assert!(price("claude-sonnet-4").is_some());
        assert_eq!(price("claude-opus-40"), None, "a prefix must end at a `-`");
        assert_eq!(price("gpt-4o"), None);
        assert_eq!(price("offline"), None);
    }

    #[test]
    fn prices_as_written_fill_in_the_cache_and_batch_rates() {
        let price: ModelPrice =
            serde_json::from_str(r#"{"input": 2.0, "output": 8.0}"#).expect("a price");
        assert_eq!(price, ModelPrice::per_million(2.0, 8.0, 2.5, 0.2));
        let back: ModelPrice =
            serde_json::from_value(serde_json::to_value(price).expect("written")).expect("read");
        assert_eq!(back, price, "written and read back unchanged");
        for bad in [
            r#"{"input": -1.0, "output": 8.0}"#,
            r#"{"input": 1e300, "output": 8.0}"#,
            r#"{"input": 1.0, "output": 8.0, "batch_discount": 1.5}"#,
            r#"{"input": 1.0, "output": 8.0, "cache_reed": 0.1}"#,
        ] {
            assert!(serde_json::from_str::<ModelPrice>(bad).is_err(), "{bad}");
        }
    }
}
