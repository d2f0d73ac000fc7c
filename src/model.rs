//! The domain: workspaces, tiers, limits, keys and limit requests.
//!
//! These types are plain data shared by the limiter, the store and the HTTP layer. They know
//! nothing of SQL or HTTP. Limits use the same field names everywhere (config file, admin API,
//! overrides, the limits page) so that an operator learns one vocabulary; the types that appear
//! in the APIs' JSON derive `ToSchema`, so that the OpenAPI document describes them from the
//! same definitions (their serde attributes included).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub type WorkspaceId = i64;
pub type KeyId = i64;
pub type LimitRequestId = i64;

/// Per-model token limits, applied on top of the workspace-wide ones.
///
/// The `ToSchema` derives here describe these types in the OpenAPI document (`http::openapi`):
/// a limit left out is absent from the JSON, never `null`, hence `nullable = false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    description = "Token limits of one model, on top of the workspace-wide ones; a limit left out is no limit."
)]
pub struct ModelLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 10_000_000_000.0)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1_000_000_000_000_000.0)]
    pub tokens_per_month: Option<u64>,
}

/// A set of limits. `None` means "no such limit".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(description = "A set of limits; a limit left out is no limit.")]
pub struct Limits {
    /// Requests per second (GCRA), 0.001 to 1,000,000 with at most three decimals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0.001, maximum = 1000000)]
    pub requests_per_second: Option<f64>,
    /// Requests that may be sent at once; defaults to `max(1, ceil(requests_per_second))`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 10_000_000_000.0)]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per calendar month (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1_000_000_000_000_000.0)]
    pub tokens_per_month: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub concurrent_requests: Option<u32>,
    /// Limits per model name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelLimits>,
    /// The limits of the API key a request came with, enforced in the same decision (set per
    /// request by the proxy, never part of a tier or a workspace).
    #[serde(skip)]
    #[schema(ignore)]
    pub key: Option<KeyScope>,
}

impl Limits {
    /// These limits with every figure brought within the bounds `validate` enforces. Limits
    /// are validated where they are set, but a store may hold figures written by an older
    /// version or by hand: the limiter only ever sees figures within bounds, so its arithmetic
    /// cannot overflow whatever the store holds.
    pub fn within_bounds(&self) -> Limits {
        let tokens = |v: Option<u64>, max: u64| v.map(|n| n.clamp(1, max));
        let mut out = self.clone();
        out.requests_per_second = self.requests_per_second.map(|rps| {
            let rps = if rps.is_finite() {
                rps
            } else {
                MAX_REQUESTS_PER_SECOND
            };
            ((rps * 1000.0).round() / 1000.0).clamp(0.001, MAX_REQUESTS_PER_SECOND)
        });
        out.burst = self.burst.map(|b| b.clamp(1, MAX_BURST));
        out.tokens_per_minute = tokens(self.tokens_per_minute, MAX_TOKENS_PER_MINUTE);
        out.tokens_per_month = tokens(self.tokens_per_month, MAX_TOKENS_PER_MONTH);
        out.concurrent_requests = self
            .concurrent_requests
            .map(|c| c.clamp(1, MAX_CONCURRENT_REQUESTS));
        for m in out.models.values_mut() {
            m.tokens_per_minute = tokens(m.tokens_per_minute, MAX_TOKENS_PER_MINUTE);
            m.tokens_per_month = tokens(m.tokens_per_month, MAX_TOKENS_PER_MONTH);
        }
        out
    }

    /// The burst that GCRA allows: the configured one, or `max(1, ceil(rps))`.
    pub fn effective_burst(&self) -> u32 {
        match (self.burst, self.requests_per_second) {
            (Some(b), _) => b.max(1),
            (None, Some(rps)) => (rps.ceil() as u32).clamp(1, MAX_BURST),
            (None, None) => 1,
        }
    }

    /// `validate` for a tier's limits, which must also stand on their own: a `burst` needs its
    /// `requests_per_second` (an override's burst alone applies to its tier's rate). The admin
    /// API, the console and the settings file's `[tiers.NAME]` all check tiers with it.
    pub fn validate_for_tier(&self) -> Result<(), String> {
        self.validate()?;
        if self.burst.is_some() && self.requests_per_second.is_none() {
            // As for a key: a burst is the room of a rate, and without one it limits nothing.
            return Err("burst: a tier's burst needs its requests_per_second".into());
        }
        Ok(())
    }

    /// Checks that every figure is usable; names the offending field.
    ///
    /// The bounds keep every quantity of the limiter exact in a double (the Redis script's
    /// numbers; see `limiter::core`): rates with at most three decimals, capacities well below
    /// 2^53 in the limiter's units.
    pub fn validate(&self) -> Result<(), String> {
        let Limits {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
            models,
            key: _,
        } = self;
        if let Some(rps) = requests_per_second {
            let milli = rps * 1000.0;
            if !rps.is_finite() || *rps < 0.001 || *rps > MAX_REQUESTS_PER_SECOND {
                return Err(format!(
                    "requests_per_second must be a number from 0.001 to {MAX_REQUESTS_PER_SECOND}"
                ));
            }
            if (milli - milli.round()).abs() > 1e-6 {
                return Err("requests_per_second must have at most three decimals".into());
            }
        }
        if let Some(b) = burst {
            if *b == 0 || *b > MAX_BURST {
                return Err(format!("burst must be from 1 to {MAX_BURST}"));
            }
        }
        check_tokens(
            "tokens_per_minute",
            *tokens_per_minute,
            MAX_TOKENS_PER_MINUTE,
        )?;
        check_tokens("tokens_per_month", *tokens_per_month, MAX_TOKENS_PER_MONTH)?;
        if let Some(c) = concurrent_requests {
            if *c == 0 || *c > MAX_CONCURRENT_REQUESTS {
                return Err(format!(
                    "concurrent_requests must be from 1 to {MAX_CONCURRENT_REQUESTS} (leave it out for no limit)"
                ));
            }
        }
        for (model, m) in models {
            if model.is_empty() {
                return Err("models: a model name must not be empty".into());
            }
            if model.len() > MAX_MODEL_NAME {
                return Err(format!(
                    "models: a model name is at most {MAX_MODEL_NAME} bytes"
                ));
            }
            check_tokens(
                &format!("models.{model}.tokens_per_minute"),
                m.tokens_per_minute,
                MAX_TOKENS_PER_MINUTE,
            )?;
            check_tokens(
                &format!("models.{model}.tokens_per_month"),
                m.tokens_per_month,
                MAX_TOKENS_PER_MONTH,
            )?;
        }
        Ok(())
    }
}

/// An API key's own limits, within its workspace's: the same names as overrides, for requests
/// per second, tokens per minute and tokens per month. A limit left out is no limit of the key's
/// own (the workspace's still hold).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    description = "An API key's own limits, at most its workspace's; a limit left out is no limit of the key's own."
)]
pub struct KeyLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0.001, maximum = 1000000)]
    pub requests_per_second: Option<f64>,
    /// Requests that may be sent at once; defaults to `max(1, ceil(requests_per_second))`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 10_000_000_000.0)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1_000_000_000_000_000.0)]
    pub tokens_per_month: Option<u64>,
}

impl KeyLimits {
    pub fn is_empty(&self) -> bool {
        *self == KeyLimits::default()
    }

    /// As a set of limits (for validation and the limiter's arithmetic).
    pub fn as_limits(&self) -> Limits {
        Limits {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_month: self.tokens_per_month,
            ..Limits::default()
        }
    }

    /// Checks every figure as `Limits::validate` does; names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        self.as_limits().validate()
    }

    /// The first of these limits that is above the workspace's `limits` (a key's limits are at
    /// most its workspace's), as an error naming it.
    pub fn above(&self, limits: &Limits) -> Option<String> {
        fn over<T: PartialOrd + Copy + std::fmt::Display>(
            name: &str,
            key: Option<T>,
            workspace: Option<T>,
        ) -> Option<String> {
            match (key, workspace) {
                (Some(k), Some(w)) if k > w => Some(format!(
                    "{name} must be at most the workspace's ({w}); it is {k}"
                )),
                _ => None,
            }
        }
        over(
            "requests_per_second",
            self.requests_per_second,
            limits.requests_per_second,
        )
        .or_else(|| {
            let burst = self.burst.filter(|_| self.requests_per_second.is_some());
            let workspace = limits.requests_per_second.map(|_| limits.effective_burst());
            over("burst", burst, workspace)
        })
        .or_else(|| {
            over(
                "tokens_per_minute",
                self.tokens_per_minute,
                limits.tokens_per_minute,
            )
        })
        .or_else(|| {
            over(
                "tokens_per_month",
                self.tokens_per_month,
                limits.tokens_per_month,
            )
        })
    }

    /// These limits brought within the workspace's `limits` (each at most the workspace's) and
    /// within the bounds `Limits::validate` enforces: what the limiter enforces for the key,
    /// whatever changed in the workspace since the key's limits were set.
    pub fn within(&self, limits: &Limits) -> KeyLimits {
        fn min<T: PartialOrd + Copy>(key: Option<T>, workspace: Option<T>) -> Option<T> {
            match (key, workspace) {
                (Some(k), Some(w)) if w < k => Some(w),
                (k, _) => k,
            }
        }
        let bounded = self.as_limits().within_bounds();
        let requests_per_second = min(bounded.requests_per_second, limits.requests_per_second);
        KeyLimits {
            requests_per_second,
            burst: requests_per_second.and(min(
                bounded.burst,
                limits.requests_per_second.map(|_| limits.effective_burst()),
            )),
            tokens_per_minute: min(bounded.tokens_per_minute, limits.tokens_per_minute),
            tokens_per_month: min(bounded.tokens_per_month, limits.tokens_per_month),
        }
    }
}

/// A key's limits as the limiter enforces them (see `KeyLimits::within`), with the key's id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyScope {
    pub id: KeyId,
    pub limits: KeyLimits,
}

impl Limits {
    /// These limits with the key `id`'s own, brought within these (see `KeyLimits::within`);
    /// a key with no limits of its own adds nothing.
    pub fn with_key(&self, id: KeyId, key: &KeyLimits) -> Limits {
        let limits = key.within(self);
        Limits {
            key: (!limits.is_empty()).then_some(KeyScope { id, limits }),
            ..self.clone()
        }
    }
}

/// The largest figures a limit may have (see `Limits::validate`).
pub const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
pub const MAX_TOKENS_PER_MINUTE: u64 = 10_000_000_000;
pub const MAX_TOKENS_PER_MONTH: u64 = 1_000_000_000_000_000;
pub const MAX_CONCURRENT_REQUESTS: u32 = 1_000_000;
pub const MAX_MODEL_NAME: usize = 256;

fn check_tokens(field: &str, value: Option<u64>, max: u64) -> Result<(), String> {
    match value {
        Some(0) => Err(format!(
            "{field} must be at least 1 (leave it out for no limit)"
        )),
        Some(n) if n > max => Err(format!("{field} must be at most {max}")),
        _ => Ok(()),
    }
}

/// A figure of an increase that would not raise the limit in force (`Overrides::not_above`).
struct NotAbove {
    name: &'static str,
    asked: String,
    now: Option<String>,
}

/// Per-limit overrides a workspace may carry (what an approved increase sets). A `Some` wins over
/// the tier's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    description = "Limits that replace the tier's for one workspace; a limit left out is the tier's."
)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0.001, maximum = 1000000)]
    pub requests_per_second: Option<f64>,
    /// Requests that may be sent at once. Left out while `requests_per_second` is set:
    /// `max(1, ceil(requests_per_second))`, never the tier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 10_000_000_000.0)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1_000_000_000_000_000.0)]
    pub tokens_per_month: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub concurrent_requests: Option<u32>,
}

impl Overrides {
    /// An approval's figures, from its fields (the admin API's `limits`, the CLI's `--limit`s):
    /// a `null` is refused (an approval grants figures; `clear` says how to clear an override
    /// instead), and a field that does not read is named. Left out, a `null` was dropped while
    /// the approval went through (two outside audits, the admin API's then the CLI's).
    pub fn granted(
        fields: serde_json::Map<String, serde_json::Value>,
        clear: &str,
    ) -> Result<Overrides, String> {
        if let Some((name, _)) = fields.iter().find(|(_, v)| v.is_null()) {
            return Err(format!(
                "'{name}' is null: an approval grants figures; clear an override with {clear}"
            ));
        }
        serde_path_to_error::deserialize(serde_json::Value::Object(fields))
            .map_err(|e| format!("'{}': {}", e.path(), e.inner()))
    }

    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    pub fn validate(&self) -> Result<(), String> {
        let Overrides {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
        } = self.clone();
        Limits {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
            ..Limits::default()
        }
        .validate()
    }

    /// For an increase request: the first figure asked for that is not above the limit in force
    /// now (`current`), named with both; a figure where there is no limit now would lower it.
    /// An outside audit saw a request for 1,000 tokens/minute on a tier of 500,000 sent, granted
    /// as asked, and the lowered figure kept through a promotion.
    pub fn not_an_increase(&self, current: &Limits) -> Option<String> {
        self.not_above(current).map(|n| match n.now {
            Some(now) => format!(
                "requested_limits.{}: {} is not above the limit in force ({now}); an increase request asks for more",
                n.name, n.asked
            ),
            None if n.name == "burst" => {
                "requested_limits.burst: there is no requests_per_second limit now for a burst to go with".into()
            }
            None => format!(
                "requested_limits.{}: there is no {} limit now; asking for one would lower it",
                n.name, n.name
            ),
        })
    }

    /// For an approval granting these figures (`field`: `limits` when the operator gave them,
    /// `requested_limits` when it grants what was asked): the first that would lower the limit
    /// in force now (`current`). The limits may have risen since the request was filed (a new
    /// tier, another request approved): an outside audit saw an approval take a workspace from
    /// the 10M tokens/minute of its new tier down to the 3M it had asked for.
    pub fn lowers(&self, current: &Limits, field: &str) -> Option<String> {
        self.not_above(current).map(|n| {
            let now = match n.now {
                Some(now) => format!("the limit in force is {now}"),
                None => format!("there is no {} limit now", n.name),
            };
            format!(
                "{field}.{}: {} is not above what holds now ({now}): approving it would lower the workspace's limit; grant other figures, or deny it",
                n.name, n.asked
            )
        })
    }

    /// The first figure not above the limit in force now (`current`), or asked for where there
    /// is none (a burst, where there is no rate for it).
    fn not_above(&self, current: &Limits) -> Option<NotAbove> {
        fn check<T: PartialOrd + std::fmt::Display>(
            name: &'static str,
            asked: Option<T>,
            now: Option<T>,
        ) -> Option<NotAbove> {
            let asked = asked?;
            match now {
                Some(now) if asked > now => None,
                now => Some(NotAbove {
                    name,
                    asked: asked.to_string(),
                    now: now.map(|n| n.to_string()),
                }),
            }
        }
        if self.burst.is_some()
            && self.requests_per_second.is_none()
            && current.requests_per_second.is_none()
        {
            return Some(NotAbove {
                name: "burst",
                asked: self.burst.map(|b| b.to_string()).unwrap_or_default(),
                now: None,
            });
        }
        let burst_now = current
            .requests_per_second
            .map(|_| current.effective_burst());
        check(
            "requests_per_second",
            self.requests_per_second,
            current.requests_per_second,
        )
        .or_else(|| {
            // A burst asked for with a new rate goes with that rate.
            self.requests_per_second
                .is_none()
                .then(|| check("burst", self.burst, burst_now))
                .flatten()
        })
        .or_else(|| {
            check(
                "tokens_per_minute",
                self.tokens_per_minute,
                current.tokens_per_minute,
            )
        })
        .or_else(|| {
            check(
                "tokens_per_month",
                self.tokens_per_month,
                current.tokens_per_month,
            )
        })
        .or_else(|| {
            check(
                "concurrent_requests",
                self.concurrent_requests,
                current.concurrent_requests,
            )
        })
    }

    /// Sets every field that `granted` sets, keeping the others.
    pub fn merge(&mut self, granted: &Overrides) {
        let Overrides {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
        } = granted;
        if requests_per_second.is_some() {
            self.requests_per_second = *requests_per_second;
        }
        if burst.is_some() {
            self.burst = *burst;
        }
        if tokens_per_minute.is_some() {
            self.tokens_per_minute = *tokens_per_minute;
        }
        if tokens_per_month.is_some() {
            self.tokens_per_month = *tokens_per_month;
        }
        if concurrent_requests.is_some() {
            self.concurrent_requests = *concurrent_requests;
        }
    }

    /// The effective limits: each override, else the tier's value.
    ///
    /// The burst goes with the rate: an override of `requests_per_second` brings its own burst,
    /// the override's `burst` if it sets one, else `max(1, ceil(rps))` (as for a tier), never the
    /// tier's, so a lowered rate never admits more at once than the rate suggests. An override of
    /// `burst` alone applies to the tier's rate.
    pub fn apply(&self, tier: &Limits) -> Limits {
        let Overrides {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
        } = self;
        let mut limits = tier.clone();
        if let Some(rps) = requests_per_second {
            limits.requests_per_second = Some(*rps);
            limits.burst = *burst;
        } else if burst.is_some() {
            limits.burst = *burst;
        }
        if tokens_per_minute.is_some() {
            limits.tokens_per_minute = *tokens_per_minute;
        }
        if tokens_per_month.is_some() {
            limits.tokens_per_month = *tokens_per_month;
        }
        if concurrent_requests.is_some() {
            limits.concurrent_requests = *concurrent_requests;
        }
        limits
    }
}

/// What a change does to one override: keep it, set it, or clear it (back to the tier's value).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum FieldPatch<T> {
    #[default]
    Keep,
    Set(T),
    Clear,
}

impl<T: Copy> FieldPatch<T> {
    fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            FieldPatch::Keep => current,
            FieldPatch::Set(v) => Some(v),
            FieldPatch::Clear => None,
        }
    }

    fn set_value(self) -> Option<T> {
        match self {
            FieldPatch::Set(v) => Some(v),
            FieldPatch::Keep | FieldPatch::Clear => None,
        }
    }
}

/// A change to a workspace's overrides, field by field. The store applies it to the overrides
/// as they are when the change is made (with the row locked), so two changes made at once, or a
/// change and an approved increase, both hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverridesPatch {
    pub requests_per_second: FieldPatch<f64>,
    pub burst: FieldPatch<u32>,
    pub tokens_per_minute: FieldPatch<u64>,
    pub tokens_per_month: FieldPatch<u64>,
    pub concurrent_requests: FieldPatch<u32>,
}

impl Overrides {
    /// What a promotion from a tier of `from` limits to one of `to` clears: each override that
    /// raised `from`'s figure (an increase granted) and that `to` gives at least as much of (or
    /// does not limit), since it would now hold the workspace below the tier it climbed to.
    /// An override that lowered a figure, or limited what `from` did not, is the operator's
    /// restriction, and stays.
    pub fn outgrown(&self, from: &Limits, to: &Limits) -> OverridesPatch {
        fn clear<T: PartialOrd>(o: Option<T>, from: Option<T>, to: Option<T>) -> FieldPatch<T> {
            match (o, from) {
                (Some(o), Some(f)) if o > f && to.is_none_or(|t| t >= o) => FieldPatch::Clear,
                _ => FieldPatch::Keep,
            }
        }
        let burst = |l: &Limits| {
            l.requests_per_second
                .map(|_| l.effective_burst())
                .or(l.burst)
        };
        OverridesPatch {
            requests_per_second: clear(
                self.requests_per_second,
                from.requests_per_second,
                to.requests_per_second,
            ),
            burst: clear(self.burst, burst(from), burst(to)),
            tokens_per_minute: clear(
                self.tokens_per_minute,
                from.tokens_per_minute,
                to.tokens_per_minute,
            ),
            tokens_per_month: clear(
                self.tokens_per_month,
                from.tokens_per_month,
                to.tokens_per_month,
            ),
            concurrent_requests: clear(
                self.concurrent_requests,
                from.concurrent_requests,
                to.concurrent_requests,
            ),
        }
    }
}

impl Overrides {
    /// What an approval grants (`self`), given the workspace's overrides `before` it and its
    /// tier's limits: when it raises `requests_per_second` without naming `burst`, and the burst
    /// override `before` is an earlier increase (above the tier's burst) below the new rate's
    /// own (`max(1, ceil(rps))`), the same with the burst raised to that. Kept as it was, the
    /// earlier grant held the workspace below what the new one gives (an outside audit: 20/s
    /// approved after a burst of 8, and 8 of 20 requests at once admitted). A burst override at
    /// or below the tier's is the operator's restriction, and stays. Judged in the approval's
    /// transaction, on the overrides as they are then (an outside audit: judged before it, a
    /// restriction set meanwhile was overwritten).
    pub fn with_burst_kept_up(&self, before: &Overrides, tier: &Limits) -> Overrides {
        let mut grant = self.clone();
        let (Some(rps), None, Some(earlier)) =
            (grant.requests_per_second, grant.burst, before.burst)
        else {
            return grant;
        };
        let tier_burst = tier.requests_per_second.map(|_| tier.effective_burst());
        let own = Limits {
            requests_per_second: Some(rps),
            ..Limits::default()
        }
        .effective_burst();
        if tier_burst.is_some_and(|t| earlier > t) && earlier < own {
            grant.burst = Some(own);
        }
        grant
    }
}

impl OverridesPatch {
    /// A patch that makes the overrides exactly `target`.
    pub fn replacing(target: &Overrides) -> Self {
        fn to<T>(v: Option<T>) -> FieldPatch<T> {
            v.map_or(FieldPatch::Clear, FieldPatch::Set)
        }
        let Overrides {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
        } = target.clone();
        OverridesPatch {
            requests_per_second: to(requests_per_second),
            burst: to(burst),
            tokens_per_minute: to(tokens_per_minute),
            tokens_per_month: to(tokens_per_month),
            concurrent_requests: to(concurrent_requests),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == OverridesPatch::default()
    }

    /// `current` with this patch applied.
    pub fn apply(&self, current: &Overrides) -> Overrides {
        let OverridesPatch {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
        } = self;
        Overrides {
            requests_per_second: requests_per_second.apply(current.requests_per_second),
            burst: burst.apply(current.burst),
            tokens_per_minute: tokens_per_minute.apply(current.tokens_per_minute),
            tokens_per_month: tokens_per_month.apply(current.tokens_per_month),
            concurrent_requests: concurrent_requests.apply(current.concurrent_requests),
        }
    }

    /// Checks the values it sets, as `Overrides::validate` would check the result (each field
    /// is checked on its own, so valid overrides stay valid under a valid patch).
    pub fn validate(&self) -> Result<(), String> {
        let OverridesPatch {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
        } = self;
        Overrides {
            requests_per_second: requests_per_second.set_value(),
            burst: burst.set_value(),
            tokens_per_minute: tokens_per_minute.set_value(),
            tokens_per_month: tokens_per_month.set_value(),
            concurrent_requests: concurrent_requests.set_value(),
        }
        .validate()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    /// The tier's place on the ladder workspaces climb: the next tier of a ranked tier is the
    /// one of the lowest rank above its own (ties broken by name). A tier without a rank
    /// (a custom or enterprise tier) is off the ladder and has no next tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    pub limits: Limits,
    /// The tier a workspace moves up to by itself, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
    /// Whether the tier's limits deny (`enforce`) or only say what they would have denied
    /// (`shadow`); see `Shadowing`.
    #[serde(default, skip_serializing_if = "Enforcement::is_enforce")]
    pub enforcement: Enforcement,
    /// Limits in shadow whatever the enforcement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowLimit>,
}

impl Tier {
    /// The next tier up the ladder from `self` among `tiers`, if `self` is ranked and a tier
    /// ranks above it.
    pub fn next_in<'a>(&self, tiers: impl IntoIterator<Item = &'a Tier>) -> Option<&'a Tier> {
        let rank = self.rank?;
        tiers
            .into_iter()
            .filter(|t| t.rank.is_some_and(|r| r > rank))
            .min_by(|a, b| (a.rank, &a.name).cmp(&(b.rank, &b.name)))
    }
}

/// A tier as the admin API and the config file write it: its limits, and its rank and promotion
/// beside them in the same object (`{"rank": 2, "tokens_per_minute": 1000, "promotion": {…}}`). `Limits` refuses fields it
/// does not know, which serde's `flatten` would defeat, so the rank is taken out of the object
/// first and the rest is read as `Limits`, with `Limits`' own errors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TierSpec {
    pub rank: Option<u32>,
    pub limits: Limits,
    pub promotion: Option<Promotion>,
    pub enforcement: Enforcement,
    pub shadow: Vec<ShadowLimit>,
}

/// Limits alone: a tier off the ladder, enforced.
impl From<Limits> for TierSpec {
    fn from(limits: Limits) -> Self {
        TierSpec {
            rank: None,
            limits,
            promotion: None,
            enforcement: Enforcement::Enforce,
            shadow: Vec::new(),
        }
    }
}

/// The fields of a tier but its limits', as serde names them in a list of what was expected.
const TIER_FIELDS: &str =
    "`concurrent_requests`, `models`, `rank`, `promotion`, `enforcement`, `shadow`";

impl<'de> Deserialize<'de> for TierSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut object = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let rank = match object.remove("rank") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(u32::deserialize(v).map_err(|_| {
                D::Error::custom("rank: must be a whole number from 0 to 4294967295")
            })?),
        };
        let promotion = match object.remove("promotion") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                Promotion::deserialize(v)
                    .map_err(|e| D::Error::custom(format!("promotion: {e}")))?,
            ),
        };
        let enforcement = match object.remove("enforcement") {
            None | Some(serde_json::Value::Null) => Enforcement::Enforce,
            Some(v) => Enforcement::deserialize(v)
                .map_err(|e| D::Error::custom(format!("enforcement: {e}")))?,
        };
        let shadow = match object.remove("shadow") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(v) => shadow_list(v).map_err(D::Error::custom)?,
        };
        // `null` is "left out" for every field of the body, `models` as the limits.
        if object.get("models") == Some(&serde_json::Value::Null) {
            object.remove("models");
        }
        // Read with its path, so that a value of the wrong type names its field here too.
        let limits =
            serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
                let path = e.path().to_string();
                // An unknown field: `Limits`' list of what it expected leaves out the fields
                // taken out above (an outside audit).
                let why = e
                    .into_inner()
                    .to_string()
                    .replace("`concurrent_requests`, `models`", TIER_FIELDS);
                match path.as_str() {
                    "." | "" => D::Error::custom(why),
                    field => D::Error::custom(format!("'{field}': {why}")),
                }
            })?;
        Ok(TierSpec {
            rank,
            limits,
            promotion,
            enforcement,
            shadow,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceStatus {
    Active,
    Suspended,
}

impl WorkspaceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceStatus::Active => "active",
            WorkspaceStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(WorkspaceStatus::Active),
            "suspended" => Some(WorkspaceStatus::Suspended),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    pub tier: String,
    pub overrides: Overrides,
    pub status: WorkspaceStatus,
    /// Unix seconds.
    pub created_at: i64,
    /// Held on its tier by an operator: never promoted automatically.
    #[serde(default)]
    pub pinned: bool,
    /// What the operator's own systems say of the workspace (`paid_usd`, `verified`), for the
    /// promotion conditions.
    #[serde(default)]
    pub attributes: Attributes,
    /// Its last automatic promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<Promoted>,
    /// The lower monthly caps the workspace set for itself.
    #[serde(default, skip_serializing_if = "Budget::is_empty")]
    pub budget: Budget,
    /// Its own enforcement; `None`: the tier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Limits in shadow for this workspace, beside the tier's; `None`: the tier's alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Vec<ShadowLimit>>,
}

/// Whether limits deny or only say what they would have denied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// A limit denies (`429`).
    #[default]
    Enforce,
    /// A limit keeps a state of its own and marks, counts and logs the requests it would have
    /// denied, which are admitted.
    Shadow,
}

impl Enforcement {
    pub fn is_enforce(&self) -> bool {
        *self == Enforcement::Enforce
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Enforce => "enforce",
            Enforcement::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Result<Enforcement, String> {
        match s {
            "enforce" => Ok(Enforcement::Enforce),
            "shadow" => Ok(Enforcement::Shadow),
            _ => Err(format!(
                "enforcement: `{s}` is not one of `enforce`, `shadow`"
            )),
        }
    }
}

/// A limit that can be put in shadow by name; the `model_*` ones stand for that kind of limit
/// of every model. The names are the `code`s a denial by the limit carries.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ShadowLimit {
    RequestsPerSecond,
    TokensPerMinute,
    TokensPerMonth,
    ConcurrentRequests,
    ModelTokensPerMinute,
    ModelTokensPerMonth,
}

impl ShadowLimit {
    pub const ALL: [ShadowLimit; 6] = [
        ShadowLimit::RequestsPerSecond,
        ShadowLimit::TokensPerMinute,
        ShadowLimit::TokensPerMonth,
        ShadowLimit::ConcurrentRequests,
        ShadowLimit::ModelTokensPerMinute,
        ShadowLimit::ModelTokensPerMonth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShadowLimit::RequestsPerSecond => "requests_per_second",
            ShadowLimit::TokensPerMinute => "tokens_per_minute",
            ShadowLimit::TokensPerMonth => "tokens_per_month",
            ShadowLimit::ConcurrentRequests => "concurrent_requests",
            ShadowLimit::ModelTokensPerMinute => "model_tokens_per_minute",
            ShadowLimit::ModelTokensPerMonth => "model_tokens_per_month",
        }
    }

    /// The limit of that name; an error naming anything else.
    pub fn parse(s: &str) -> Result<ShadowLimit, String> {
        ShadowLimit::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "shadow: `{s}` is not a limit that can be put in shadow (one of {})",
                    ShadowLimit::ALL.map(|l| l.as_str()).join(", ")
                )
            })
    }
}

/// A list of limit names (JSON), sorted and without repeats; an error naming the first that is
/// not one.
pub fn shadow_list(value: serde_json::Value) -> Result<Vec<ShadowLimit>, String> {
    let serde_json::Value::Array(items) = value else {
        return Err("shadow: must be a list of limit names".to_string());
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let serde_json::Value::String(name) = item else {
            return Err("shadow: must be a list of limit names".to_string());
        };
        out.push(ShadowLimit::parse(&name)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Which of a workspace's limits are in shadow. Most specific wins: a limit is in shadow when
/// it is named in the workspace's `shadow` list or the tier's; otherwise the workspace's
/// `enforcement` decides when it is set, else the tier's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Shadowing {
    /// The enforcement of the limits not named: the workspace's, else the tier's.
    pub enforcement: Enforcement,
    /// The limits in shadow, sorted: every one under `shadow` enforcement, else those named.
    pub shadow: Vec<ShadowLimit>,
}

impl Shadowing {
    /// The effective settings of workspace `ws` on tier `tier` (`None`: a tier not found,
    /// which enforces).
    pub fn of(tier: Option<&Tier>, ws: &Workspace) -> Shadowing {
        let enforcement = ws
            .enforcement
            .or(tier.map(|t| t.enforcement))
            .unwrap_or_default();
        let mut shadow: Vec<ShadowLimit> = match enforcement {
            Enforcement::Shadow => ShadowLimit::ALL.to_vec(),
            Enforcement::Enforce => tier
                .map(|t| t.shadow.as_slice())
                .unwrap_or_default()
                .iter()
                .chain(ws.shadow.as_deref().unwrap_or_default())
                .copied()
                .collect(),
        };
        shadow.sort_unstable();
        shadow.dedup();
        Shadowing {
            enforcement,
            shadow,
        }
    }

    pub fn is_shadow(&self, limit: ShadowLimit) -> bool {
        self.shadow.contains(&limit)
    }

    /// `limits` split into the part enforced and the part in shadow (`None` when no limit of
    /// `limits` is in shadow). A request rate goes with its burst.
    pub fn split(&self, limits: &Limits) -> (Limits, Option<Limits>) {
        if self.shadow.is_empty() {
            return (limits.clone(), None);
        }
        let Limits {
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
            models,
            key: _,
        } = limits;
        let mut enforced = Limits::default();
        let mut shadow = Limits::default();
        let side = |limit: ShadowLimit| {
            if self.is_shadow(limit) {
                1
            } else {
                0
            }
        };
        {
            let mut parts = [&mut enforced, &mut shadow];
            let p = &mut parts[side(ShadowLimit::RequestsPerSecond)];
            p.requests_per_second = *requests_per_second;
            p.burst = *burst;
            parts[side(ShadowLimit::TokensPerMinute)].tokens_per_minute = *tokens_per_minute;
            parts[side(ShadowLimit::TokensPerMonth)].tokens_per_month = *tokens_per_month;
            parts[side(ShadowLimit::ConcurrentRequests)].concurrent_requests = *concurrent_requests;
            for (model, m) in models {
                let minute = side(ShadowLimit::ModelTokensPerMinute);
                let month = side(ShadowLimit::ModelTokensPerMonth);
                if m.tokens_per_minute.is_some() {
                    parts[minute]
                        .models
                        .entry(model.clone())
                        .or_default()
                        .tokens_per_minute = m.tokens_per_minute;
                }
                if m.tokens_per_month.is_some() {
                    parts[month]
                        .models
                        .entry(model.clone())
                        .or_default()
                        .tokens_per_month = m.tokens_per_month;
                }
            }
        }
        let empty = shadow == Limits::default();
        (enforced, (!empty).then_some(shadow))
    }
}

impl Workspace {
    /// The limits in force for this workspace on `tier`'s limits: the tier's with the
    /// overrides applied (within bounds), then its own budget; and where the budget binds.
    pub fn effective_limits(&self, tier: &Limits) -> (Limits, BudgetBinds) {
        self.budget
            .apply(&self.overrides.apply(tier).within_bounds())
    }
}

/// A workspace's own monthly token caps, below its limits: for the whole workspace and per
/// model. A budget binds where it is at most the effective limit (or there is none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Tokens per calendar month (UTC) for the whole workspace; `null`: none.
    #[serde(default)]
    #[schema(required = true)]
    pub tokens_per_month: Option<u64>,
    /// Tokens per month per model.
    #[serde(default)]
    pub models: BTreeMap<String, u64>,
}

/// At most this many models in a budget.
pub const MAX_BUDGET_MODELS: usize = 64;

impl Budget {
    pub fn is_empty(&self) -> bool {
        self.tokens_per_month.is_none() && self.models.is_empty()
    }

    /// The effective limits with the budget applied: each month cap the lower of the two. Returns
    /// them, and whether the budget binds for the workspace and for which models: only where it
    /// is below the quota (equal to it, the quota is what a denial names, since raising or
    /// clearing the budget would not help).
    pub fn apply(&self, limits: &Limits) -> (Limits, BudgetBinds) {
        let mut out = limits.clone();
        let mut binds = BudgetBinds::default();
        if let Some(b) = self.tokens_per_month {
            if limits.tokens_per_month.is_none_or(|l| b < l) {
                out.tokens_per_month = Some(b);
                binds.workspace = true;
            }
        }
        for (model, &b) in &self.models {
            let entry = out.models.entry(model.clone()).or_default();
            if entry.tokens_per_month.is_none_or(|l| b < l) {
                entry.tokens_per_month = Some(b);
                binds.models.push(model.clone());
            }
        }
        (out, binds)
    }
}

/// Where a workspace's budget is what binds (its month cap is the budget's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetBinds {
    pub workspace: bool,
    /// Sorted.
    pub models: Vec<String>,
}

/// A workspace attribute: a number or a boolean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AttributeValue {
    Bool(bool),
    Number(f64),
}

impl AttributeValue {
    /// Whether `self` reaches the lower bound `min`: a number at least `min`, `true` for a
    /// `true`, anything for a `false`; a number never reaches a boolean bound, nor the reverse.
    pub fn reaches(self, min: AttributeValue) -> bool {
        match (self, min) {
            (AttributeValue::Number(v), AttributeValue::Number(m)) => v >= m,
            (AttributeValue::Bool(v), AttributeValue::Bool(m)) => v || !m,
            _ => false,
        }
    }

    /// `NAME=NUMBER`, `NAME=true` or `NAME=false` (the CLI's arguments, the console's lines),
    /// spaces around either part allowed; the name is checked by `validate_attributes`.
    pub fn assignment(text: &str) -> Result<(String, AttributeValue), String> {
        let (name, value) = text
            .split_once('=')
            .ok_or_else(|| format!("'{text}' is not NAME=VALUE"))?;
        let value = match value.trim() {
            "true" => AttributeValue::Bool(true),
            "false" => AttributeValue::Bool(false),
            n => AttributeValue::Number(
                n.parse()
                    .map_err(|_| format!("'{text}': the value must be a number, true or false"))?,
            ),
        };
        Ok((name.trim().to_string(), value))
    }

    /// Lines of `NAME=VALUE` (blank lines skipped) into attributes, checked; an error names
    /// the line.
    pub fn lines(text: &str) -> Result<Attributes, String> {
        let mut out = Attributes::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (name, value) =
                AttributeValue::assignment(line).map_err(|m| format!("line {}: {m}", i + 1))?;
            if out.insert(name.clone(), value).is_some() {
                return Err(format!("line {}: {name} is given twice", i + 1));
            }
        }
        validate_attributes(&out)?;
        Ok(out)
    }
}

impl std::fmt::Display for AttributeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttributeValue::Bool(b) => write!(f, "{b}"),
            AttributeValue::Number(n) => write!(f, "{n}"),
        }
    }
}

pub type Attributes = BTreeMap<String, AttributeValue>;

/// At most this many attributes per workspace, each name 1 to 64 of `a-z A-Z 0-9 _ - .`.
pub const MAX_ATTRIBUTES: usize = 64;

/// Checks attribute names and values (finite numbers).
pub fn validate_attributes(attributes: &Attributes) -> Result<(), String> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(format!("at most {MAX_ATTRIBUTES} attributes"));
    }
    for (name, value) in attributes {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(format!(
                "attribute name '{}' must be 1 to 64 of a-z A-Z 0-9 _ - .",
                name.escape_default()
            ));
        }
        if let AttributeValue::Number(n) = value {
            if !n.is_finite() {
                return Err(format!("attribute '{name}' must be a finite number"));
            }
        }
    }
    Ok(())
}

/// A tier's way up: the tier a workspace moves to once every condition holds (each a lower
/// bound; all of them must hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The tier to move to: it must rank above this one.
    pub to: String,
    /// Days since the workspace was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub min_days: Option<u32>,
    /// Tokens settled over the last 30 days (the ledger's days, today included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub min_tokens_30d: Option<u64>,
    /// Attributes the operator's systems set: a number at least this, or `true`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub min_attributes: Attributes,
}

/// One promotion condition of a workspace: what it needs, what it has.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Condition {
    /// `min_days`, `min_tokens_30d`, or `attributes.NAME`.
    pub name: String,
    pub required: AttributeValue,
    /// What the workspace has (`null`: an attribute it does not have).
    #[schema(required = true)]
    pub actual: Option<AttributeValue>,
    pub met: bool,
}

impl Promotion {
    /// Each condition, against a workspace that has `tokens_30d` tokens settled over the last
    /// 30 days, at `now` (unix seconds).
    pub fn conditions(&self, ws: &Workspace, tokens_30d: u64, now: i64) -> Vec<Condition> {
        let mut out = Vec::new();
        if let Some(min) = self.min_days {
            let days = (now - ws.created_at).max(0) / 86_400;
            out.push(Condition {
                name: "min_days".into(),
                required: AttributeValue::Number(min as f64),
                actual: Some(AttributeValue::Number(days as f64)),
                met: days >= i64::from(min),
            });
        }
        if let Some(min) = self.min_tokens_30d {
            out.push(Condition {
                name: "min_tokens_30d".into(),
                required: AttributeValue::Number(min as f64),
                actual: Some(AttributeValue::Number(tokens_30d as f64)),
                met: tokens_30d >= min,
            });
        }
        for (name, &min) in &self.min_attributes {
            let actual = ws.attributes.get(name).copied();
            out.push(Condition {
                name: format!("attributes.{name}"),
                required: min,
                actual,
                met: actual.is_some_and(|a| a.reaches(min)),
            });
        }
        out
    }

    /// Checks the conditions' values (the target tier is checked against the catalogue where
    /// the tier is put).
    pub fn validate(&self) -> Result<(), String> {
        validate_attributes(&self.min_attributes)
            .map_err(|m| format!("promotion.min_attributes: {m}"))?;
        // A lower bound of `false` is met by either boolean: it asks nothing, and reads as if it
        // asked for `false` (an outside audit saw `verified = false` promote a verified one).
        if let Some((name, _)) = self
            .min_attributes
            .iter()
            .find(|(_, v)| **v == AttributeValue::Bool(false))
        {
            return Err(format!(
                "promotion.min_attributes.{name}: a condition is a number (at least it) or true; false would ask nothing"
            ));
        }
        Ok(())
    }
}

/// A workspace's last automatic promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Promoted {
    pub from: String,
    pub to: String,
    /// Unix seconds.
    pub at: i64,
    /// The conditions that held, as text: `min_days 9 >= 7, attributes.paid_usd 60 >= 50`.
    pub reason: String,
}

/// An API key as stored: never the secret, only its hash and a displayable prefix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    pub id: KeyId,
    pub workspace_id: WorkspaceId,
    pub name: Option<String>,
    pub prefix: String,
    #[serde(skip)]
    pub hash: [u8; 32],
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// The key's own limits as set (empty: none); what the limiter enforces is these within
    /// the workspace's limits of the moment (`Limits::with_key`).
    #[serde(default, skip_serializing_if = "KeyLimits::is_empty")]
    pub limits: KeyLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LimitRequestStatus {
    Pending,
    Approved,
    Denied,
    /// Taken back by its workspace before an operator answered.
    Withdrawn,
}

impl LimitRequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitRequestStatus::Pending => "pending",
            LimitRequestStatus::Approved => "approved",
            LimitRequestStatus::Denied => "denied",
            LimitRequestStatus::Withdrawn => "withdrawn",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(LimitRequestStatus::Pending),
            "approved" => Some(LimitRequestStatus::Approved),
            "denied" => Some(LimitRequestStatus::Denied),
            "withdrawn" => Some(LimitRequestStatus::Withdrawn),
            _ => None,
        }
    }
}

/// A workspace's request for higher limits, and the operator's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitRequest {
    pub id: LimitRequestId,
    pub workspace_id: WorkspaceId,
    pub use_case: String,
    /// What the workspace expects to send under the new limits, in its own words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_volume: Option<String>,
    pub requested_limits: Overrides,
    pub status: LimitRequestStatus,
    /// The overrides that were set on approval.
    pub granted_limits: Option<Overrides>,
    /// The operator's reason on denial; on approval, the note given with it, if any.
    pub reason: Option<String>,
    pub created_at: i64,
    pub decided_at: Option<i64>,
}

/// The tier catalogue that ships with tiergate. `free` uses the figures the Mistral platform
/// publishes for its free tier; the others rise from there.
pub fn default_tiers() -> Vec<Tier> {
    fn tier(
        rank: u32,
        name: &str,
        rps: f64,
        tpm: u64,
        month: Option<u64>,
        conc: Option<u32>,
    ) -> Tier {
        Tier {
            name: name.to_string(),
            rank: Some(rank),
            limits: Limits {
                requests_per_second: Some(rps),
                burst: None,
                tokens_per_minute: Some(tpm),
                tokens_per_month: month,
                concurrent_requests: conc,
                models: BTreeMap::new(),
                key: None,
            },
            promotion: None,
            enforcement: Enforcement::Enforce,
            shadow: Vec::new(),
        }
    }
    vec![
        tier(0, "free", 1.0, 500_000, Some(1_000_000_000), None),
        tier(1, "tier-1", 5.0, 2_000_000, Some(10_000_000_000), Some(50)),
        tier(
            2,
            "tier-2",
            10.0,
            5_000_000,
            Some(50_000_000_000),
            Some(100),
        ),
        tier(
            3,
            "tier-3",
            25.0,
            10_000_000,
            Some(200_000_000_000),
            Some(250),
        ),
        tier(
            4,
            "tier-4",
            50.0,
            20_000_000,
            Some(1_000_000_000_000),
            Some(500),
        ),
        tier(5, "scale", 200.0, 100_000_000, None, Some(2000)),
    ]
}

/// Who makes a change, as the audit records it: an admin token's name (`alice`; plain, so it
/// never contains `:`), `cli:<OS user>` for the admin CLI, `workspace:<id>` for what a workspace
/// does with its own key (asking for higher limits), or a name the gateway gives itself
/// (`demo`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Actor(String);

/// The longest actor name kept; a longer one (an odd `$USER`) is cut.
pub const MAX_ACTOR: usize = 128;

impl Actor {
    /// The holder of the admin token named `name`.
    pub fn admin(name: &str) -> Actor {
        Actor::plain(name)
    }

    /// The admin CLI, run by the OS user `user` (`cli` when unknown).
    pub fn cli(user: Option<&str>) -> Actor {
        match user.map(str::trim).filter(|u| !u.is_empty()) {
            Some(u) => Actor::plain(&format!("cli:{u}")),
            None => Actor::plain("cli"),
        }
    }

    /// A workspace acting with its own key.
    pub fn workspace(id: WorkspaceId) -> Actor {
        Actor(format!("workspace:{id}"))
    }

    /// The workspace, when this is one acting with its own key.
    pub fn as_workspace(&self) -> Option<WorkspaceId> {
        self.0.strip_prefix("workspace:")?.parse().ok()
    }

    /// A name as given, with control characters replaced and cut to `MAX_ACTOR` bytes.
    pub fn plain(name: &str) -> Actor {
        let mut s = String::with_capacity(name.len().min(MAX_ACTOR));
        for c in name.chars() {
            let c = if c.is_control() { '?' } else { c };
            if s.len() + c.len_utf8() > MAX_ACTOR {
                break;
            }
            s.push(c);
        }
        Actor(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an audit entry records. The names are stable: operators filter on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    /// A tier created or replaced.
    TierPut,
    WorkspaceCreate,
    /// Tier, overrides, status, pin and/or attributes changed (one entry per change, whatever
    /// it touched).
    WorkspaceUpdate,
    /// Moved up the ladder by itself, its conditions met (`after.promoted` says which).
    WorkspacePromote,
    KeyCreate,
    KeyRevoke,
    /// A key's own limits set or cleared.
    KeyLimits,
    /// A workspace asked for higher limits.
    LimitRequestCreate,
    LimitRequestApprove,
    LimitRequestDeny,
    /// A workspace took back its pending request.
    LimitRequestWithdraw,
    /// A webhook endpoint registered (by the operator or a workspace).
    WebhookCreate,
    WebhookDelete,
    /// A failed delivery sent again (its attempts start over).
    WebhookRedeliver,
}

impl AuditAction {
    pub const ALL: [AuditAction; 14] = [
        AuditAction::TierPut,
        AuditAction::WorkspaceCreate,
        AuditAction::WorkspaceUpdate,
        AuditAction::WorkspacePromote,
        AuditAction::KeyCreate,
        AuditAction::KeyRevoke,
        AuditAction::KeyLimits,
        AuditAction::LimitRequestCreate,
        AuditAction::LimitRequestApprove,
        AuditAction::LimitRequestDeny,
        AuditAction::LimitRequestWithdraw,
        AuditAction::WebhookCreate,
        AuditAction::WebhookDelete,
        AuditAction::WebhookRedeliver,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::TierPut => "tier.put",
            AuditAction::WorkspaceCreate => "workspace.create",
            AuditAction::WorkspaceUpdate => "workspace.update",
            AuditAction::WorkspacePromote => "workspace.promote",
            AuditAction::KeyCreate => "key.create",
            AuditAction::KeyRevoke => "key.revoke",
            AuditAction::KeyLimits => "key.limits",
            AuditAction::LimitRequestCreate => "limit_request.create",
            AuditAction::LimitRequestApprove => "limit_request.approve",
            AuditAction::LimitRequestDeny => "limit_request.deny",
            AuditAction::LimitRequestWithdraw => "limit_request.withdraw",
            AuditAction::WebhookCreate => "webhook.create",
            AuditAction::WebhookDelete => "webhook.delete",
            AuditAction::WebhookRedeliver => "webhook.redeliver",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// One recorded admin action. `before` and `after` are the changed object as JSON (never a key's
/// secret or hash); `before` is absent for a creation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    pub actor: String,
    pub action: String,
    /// The workspace concerned, if any (none for a tier, or for an operator's webhook
    /// endpoint).
    pub workspace_id: Option<WorkspaceId>,
    /// What was changed: `tier:NAME`, `workspace:ID`, `key:ID`, `limit_request:ID`,
    /// `webhook:ID`.
    pub target: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_granted_raises_an_earlier_burst_increase_only() {
        // A tier of 5/s, burst 5.
        let tier = Limits {
            requests_per_second: Some(5.0),
            burst: Some(5),
            ..Limits::default()
        };
        let grant = |rps: f64, burst: Option<u32>| Overrides {
            requests_per_second: Some(rps),
            burst,
            ..Overrides::default()
        };
        let before = |burst: u32| Overrides {
            burst: Some(burst),
            ..Overrides::default()
        };
        // An earlier increase (8 > 5) below the new rate's own (20): raised to 20.
        assert_eq!(
            grant(20.0, None).with_burst_kept_up(&before(8), &tier),
            grant(20.0, Some(20))
        );
        assert_eq!(
            grant(19.5, None)
                .with_burst_kept_up(&before(8), &tier)
                .burst,
            Some(20)
        );
        // A restriction (3 <= 5), one already as large, a grant naming its burst, none before,
        // a tier without a rate: unchanged.
        for (g, b, t) in [
            (grant(20.0, None), before(3), &tier),
            (grant(20.0, None), before(5), &tier),
            (grant(20.0, None), before(30), &tier),
            (grant(20.0, Some(9)), before(8), &tier),
            (grant(20.0, None), Overrides::default(), &tier),
            (grant(20.0, None), before(8), &Limits::default()),
        ] {
            assert_eq!(g.with_burst_kept_up(&b, t), g, "{b:?}");
        }
    }

    #[test]
    fn an_increase_request_asks_for_more_than_is_in_force() {
        let tier = Limits {
            requests_per_second: Some(2.0),
            tokens_per_minute: Some(1_000),
            ..Limits::default()
        };
        let ask = |o: Overrides| o.not_an_increase(&tier);
        let more_tpm = Overrides {
            tokens_per_minute: Some(1_001),
            ..Overrides::default()
        };
        assert_eq!(ask(more_tpm), None);
        let same_tpm = Overrides {
            tokens_per_minute: Some(1_000),
            ..Overrides::default()
        };
        assert!(ask(same_tpm)
            .unwrap()
            .starts_with("requested_limits.tokens_per_minute: 1000 is not above"));
        // No concurrency limit now: asking for one would lower it.
        let concurrency = Overrides {
            concurrent_requests: Some(50),
            ..Overrides::default()
        };
        assert!(ask(concurrency)
            .unwrap()
            .contains("there is no concurrent_requests limit now"));
        // A burst alone against the rate's (2); with a new rate it goes with that rate.
        let burst = |b| Overrides {
            burst: Some(b),
            ..Overrides::default()
        };
        assert!(ask(burst(2)).is_some());
        assert_eq!(ask(burst(3)), None);
        let with_rate = Overrides {
            requests_per_second: Some(4.0),
            burst: Some(1),
            ..Overrides::default()
        };
        assert_eq!(ask(with_rate), None);
        let without_rate = Limits::default();
        assert!(burst(5)
            .not_an_increase(&without_rate)
            .unwrap()
            .contains("no requests_per_second limit now"));
    }

    fn tier(rps: f64, burst: Option<u32>) -> Limits {
        Limits {
            requests_per_second: Some(rps),
            burst,
            ..Limits::default()
        }
    }

    #[test]
    fn an_override_of_the_rate_brings_its_own_burst() {
        let fast = tier(10.0, Some(20));
        // Lowered: one second's worth of the new rate, not the tier's 20.
        let lowered = Overrides {
            requests_per_second: Some(1.0),
            ..Overrides::default()
        }
        .apply(&fast);
        assert_eq!(lowered.effective_burst(), 1);
        let fractional = Overrides {
            requests_per_second: Some(2.5),
            ..Overrides::default()
        }
        .apply(&fast);
        assert_eq!(fractional.effective_burst(), 3);
        let slow = Overrides {
            requests_per_second: Some(0.1),
            ..Overrides::default()
        }
        .apply(&fast);
        assert_eq!(slow.effective_burst(), 1);
        // Raised: the same rule.
        let raised = Overrides {
            requests_per_second: Some(50.0),
            ..Overrides::default()
        }
        .apply(&tier(5.0, Some(8)));
        assert_eq!(raised.effective_burst(), 50);
        // An explicit burst wins, with or without a rate.
        let both = Overrides {
            requests_per_second: Some(1.0),
            burst: Some(4),
            ..Overrides::default()
        }
        .apply(&fast);
        assert_eq!(
            (both.requests_per_second, both.effective_burst()),
            (Some(1.0), 4)
        );
        let burst_only = Overrides {
            burst: Some(3),
            ..Overrides::default()
        }
        .apply(&fast);
        assert_eq!(
            (burst_only.requests_per_second, burst_only.effective_burst()),
            (Some(10.0), 3)
        );
        // No rate override: the tier's burst stays.
        let other = Overrides {
            tokens_per_minute: Some(5),
            ..Overrides::default()
        }
        .apply(&fast);
        assert_eq!(other.effective_burst(), 20);
    }

    #[test]
    fn actors_are_plain_and_bounded() {
        assert_eq!(Actor::cli(Some("carol")).as_str(), "cli:carol");
        assert_eq!(Actor::cli(None).as_str(), "cli");
        assert_eq!(Actor::cli(Some("  ")).as_str(), "cli");
        assert_eq!(Actor::workspace(7).as_str(), "workspace:7");
        assert_eq!(Actor::plain("a\nb\u{7}").as_str(), "a?b?");
        assert_eq!(Actor::plain(&"é".repeat(200)).as_str().len(), MAX_ACTOR);
        for a in AuditAction::ALL {
            assert_eq!(AuditAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(AuditAction::parse("key.delete"), None);
    }
}
