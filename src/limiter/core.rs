//! The arithmetic of the limits: GCRA, the refilled token bucket, the calendar month, and the
//! one decision that checks them all before changing any. Pure: no I/O, no clock of its own;
//! every function takes `now` in nanoseconds since the Unix epoch, so tests inject time.

use std::collections::HashMap;

use crate::model::Limits;

pub type Nanos = u64;
pub const NANOS_PER_SEC: u64 = 1_000_000_000;
/// One token in the bucket's fixed-point unit. A bucket of capacity `C` tokens refills `C` units
/// per nanosecond, i.e. `C / 60` tokens per second, with no rounding drift.
const UNITS_PER_TOKEN: i128 = 60 * NANOS_PER_SEC as i128;

/// Generic cell rate algorithm for requests per second: one timestamp of state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gcra {
    /// Theoretical arrival time of the next request.
    tat: Nanos,
    /// The emission interval `tat` was computed with (0 before the first request).
    interval: Nanos,
}

fn emission_interval(rps: f64) -> Nanos {
    // Rounded up, so that no interval admits more than `burst + rate × interval`.
    ((NANOS_PER_SEC as f64 / rps).ceil() as Nanos).max(1)
}

impl Gcra {
    /// `tat` under emission interval `t`. When the rate changed (a new tier or override), the
    /// requests already counted stay counted, at the new rate: an upgrade holds at once.
    fn tat_at(&self, now: Nanos, t: Nanos) -> Nanos {
        let tat = self.tat.max(now);
        if self.interval == 0 || self.interval == t {
            return tat;
        }
        let used = (tat - now) as u128 * t as u128 / self.interval as u128;
        now + used as Nanos
    }

    /// `Ok(new_tat)` when a request is allowed now, else `Err(wait)`.
    fn check(&self, now: Nanos, rps: f64, burst: u32) -> Result<Nanos, Nanos> {
        let t = emission_interval(rps);
        let new_tat = self.tat_at(now, t) + t;
        let allow_at = new_tat.saturating_sub(t * burst as u64);
        if now < allow_at {
            Err(allow_at - now)
        } else {
            Ok(new_tat)
        }
    }

    fn commit(&mut self, new_tat: Nanos, rps: f64) {
        self.tat = new_tat;
        self.interval = emission_interval(rps);
    }

    /// (remaining requests that could be sent at once, time until the burst is full again).
    fn view(&self, now: Nanos, rps: f64, burst: u32) -> (u64, Nanos) {
        let t = emission_interval(rps);
        let used = self.tat_at(now, t) - now;
        let capacity = t * burst as u64;
        let remaining = capacity.saturating_sub(used) / t;
        (remaining, used)
    }

    fn is_idle(&self, now: Nanos) -> bool {
        self.tat <= now
    }
}

/// A continuously refilled bucket: capacity = the per-minute limit, refill limit/60 per second.
/// The level may go below zero (debt) when settled usage exceeds what was reserved.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    level: i128,
    at: Nanos,
    /// The capacity `level` was computed with.
    capacity: u64,
}

impl TokenBucket {
    fn full(capacity: u64, now: Nanos) -> Self {
        TokenBucket {
            level: capacity as i128 * UNITS_PER_TOKEN,
            at: now,
            capacity,
        }
    }

    fn level_at(&self, capacity: u64, now: Nanos) -> i128 {
        let cap = capacity as i128 * UNITS_PER_TOKEN;
        // When the limit changed, what was used in the last minute stays used: the level moves
        // by the difference, so an increase holds at once and a decrease does not forgive.
        let level = self.level + (capacity as i128 - self.capacity as i128) * UNITS_PER_TOKEN;
        let elapsed = now.saturating_sub(self.at) as i128;
        (level + elapsed * capacity as i128).min(cap)
    }

    fn refill(&mut self, capacity: u64, now: Nanos) {
        self.level = self.level_at(capacity, now);
        self.at = self.at.max(now);
        self.capacity = capacity;
    }

    /// Time until `cost` tokens are available; 0 when they are now.
    fn wait_for(&self, capacity: u64, cost: u64, now: Nanos) -> Nanos {
        let need = cost as i128 * UNITS_PER_TOKEN - self.level_at(capacity, now);
        if need <= 0 {
            0
        } else {
            let rate = capacity as i128;
            ((need + rate - 1) / rate) as Nanos
        }
    }

    fn add(&mut self, capacity: u64, tokens: i128, now: Nanos) {
        self.refill(capacity, now);
        let cap = capacity as i128 * UNITS_PER_TOKEN;
        self.level = (self.level + tokens * UNITS_PER_TOKEN).min(cap);
    }

    /// Whole tokens held now; a bucket in debt holds 0.
    fn remaining(&self, capacity: u64, now: Nanos) -> u64 {
        (self.level_at(capacity, now).max(0) / UNITS_PER_TOKEN) as u64
    }

    /// Time until the bucket is full.
    fn until_full(&self, capacity: u64, now: Nanos) -> Nanos {
        let missing = capacity as i128 * UNITS_PER_TOKEN - self.level_at(capacity, now);
        if missing <= 0 {
            0
        } else {
            let rate = capacity as i128;
            ((missing + rate - 1) / rate) as Nanos
        }
    }

    /// Balance in whole tokens, negative when in debt (for the usage view).
    fn balance(&self, capacity: u64, now: Nanos) -> i64 {
        (self.level_at(capacity, now) / UNITS_PER_TOKEN) as i64
    }
}

/// A calendar month in UTC, as `year * 12 + month0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MonthKey(pub i32);

impl MonthKey {
    pub fn of(now: Nanos) -> MonthKey {
        month_span(now).0
    }

    fn compute(now: Nanos) -> MonthKey {
        let dt = datetime(now);
        MonthKey(dt.year() * 12 + (dt.month() as i32 - 1))
    }

    pub fn year(self) -> i32 {
        self.0.div_euclid(12)
    }

    /// 1 to 12.
    pub fn month(self) -> u8 {
        (self.0.rem_euclid(12) + 1) as u8
    }

    /// The first instant of this month, in nanoseconds since the epoch.
    pub fn start(self) -> Nanos {
        let month = time::Month::try_from(self.month()).expect("1..=12");
        let date = time::Date::from_calendar_date(self.year(), month, 1).expect("valid date");
        let ts = date.midnight().assume_utc().unix_timestamp_nanos();
        ts.max(0) as Nanos
    }

    pub fn next(self) -> MonthKey {
        MonthKey(self.0 + 1)
    }

    /// `YYYY-MM-01`, the first day as the ledger names days.
    pub fn first_day(self) -> String {
        format!("{:04}-{:02}-01", self.year(), self.month())
    }
}

/// The month of `now` and the first instant of the next one. Calendar arithmetic costs more than
/// a whole decision, and nearly every call falls in the same month as the last, so each thread
/// remembers the last month it computed.
pub fn month_span(now: Nanos) -> (MonthKey, Nanos) {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<(Nanos, Nanos, MonthKey)> = const { Cell::new((1, 0, MonthKey(0))) };
    }
    LAST.with(|last| {
        let (start, end, key) = last.get();
        if start <= now && now < end {
            return (key, end);
        }
        let key = MonthKey::compute(now);
        let end = key.next().start();
        last.set((key.start(), end, key));
        (key, end)
    })
}

pub fn datetime(now: Nanos) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(now as i128).expect("in range")
}

/// `YYYY-MM-DD` in UTC: the ledger's day.
pub fn day_of(now: Nanos) -> String {
    let dt = datetime(now);
    format!("{:04}-{:02}-{:02}", dt.year(), dt.month() as u8, dt.day())
}

/// Tokens settled and reserved in one calendar month.
#[derive(Debug, Clone, Copy)]
struct MonthCounter {
    month: MonthKey,
    settled: u64,
    reserved: u64,
}

impl MonthCounter {
    fn used(&self) -> u64 {
        self.settled + self.reserved
    }

    /// Rolls over to `month`; settled usage of a new month starts from the ledger's base.
    fn roll(&mut self, month: MonthKey, base: u64) {
        if self.month != month {
            *self = MonthCounter {
                month,
                settled: base,
                reserved: 0,
            };
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ModelState {
    bucket: Option<TokenBucket>,
    month: Option<MonthCounter>,
}

/// Month totals from the durable ledger, used to seed a workspace's month counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthTotals {
    pub month: Option<MonthKey>,
    pub tokens: u64,
    pub requests: u64,
    pub by_model: HashMap<String, u64>,
}

/// Which limit a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitName {
    RequestsPerSecond,
    TokensPerMinute,
    TokensPerMonth,
    ConcurrentRequests,
    ModelTokensPerMinute,
    ModelTokensPerMonth,
}

impl LimitName {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitName::RequestsPerSecond => "requests_per_second",
            LimitName::TokensPerMinute => "tokens_per_minute",
            LimitName::TokensPerMonth => "tokens_per_month",
            LimitName::ConcurrentRequests => "concurrent_requests",
            LimitName::ModelTokensPerMinute => "model_tokens_per_minute",
            LimitName::ModelTokensPerMonth => "model_tokens_per_month",
        }
    }
}

/// Why a request was denied; each asks something different of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DenialKind {
    /// Waiting a few seconds fixes it.
    RateLimited,
    /// Waiting for the next month (or an increase) fixes it.
    QuotaExceeded,
    /// Nothing but a smaller request or a larger limit fixes it.
    RequestTooLarge,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub kind: DenialKind,
    pub limit: LimitName,
    /// Set for per-model limits.
    pub model: Option<String>,
    pub limit_value: f64,
    /// Time after which the same request, alone, would be admitted. 0 for `RequestTooLarge`.
    pub retry_after: Nanos,
}

/// What a request costs in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCost {
    /// The prompt alone: if this exceeds a limit's capacity, the request can never fit.
    pub prompt: u64,
    /// The estimate to reserve (prompt + expected completion), at least `prompt`.
    pub estimate: u64,
}

/// One rate-limit window, as the headers show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub limit: f64,
    pub remaining: u64,
    pub reset: Nanos,
}

/// The state of a workspace's limits as of one decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
    pub month: Option<Window>,
}

/// Usage counters for the limits page and the admin usage view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub snapshot: Snapshot,
    /// Token bucket balance now (negative in debt); None without a per-minute limit.
    pub bucket_tokens: Option<i64>,
    pub month_settled_tokens: u64,
    pub month_reserved_tokens: u64,
    pub in_flight: u32,
}

/// What was held for an admitted request, to be settled exactly once.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub model: Option<String>,
    pub tokens: u64,
    pub month: MonthKey,
    pub slot: bool,
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Admit(Held),
    Deny(Denial),
}

/// All limiter state of one workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceState {
    gcra: Gcra,
    bucket: Option<TokenBucket>,
    month: MonthCounter,
    models: HashMap<String, ModelState>,
    /// Requests in flight counted against `concurrent_requests` (only while that limit is set).
    in_flight: u32,
    /// Every admitted request not yet settled, whatever the limits: a state holding one is
    /// never evicted, so its settlement always finds it.
    unsettled: u32,
    pub last_seen: Nanos,
}

impl WorkspaceState {
    /// A fresh state whose month counters start from the ledger's totals for `totals.month`.
    pub fn new(now: Nanos, totals: &MonthTotals) -> Self {
        let current = MonthKey::of(now);
        let same_month = totals.month == Some(current);
        let base = |n: u64| if same_month { n } else { 0 };
        let models = totals
            .by_model
            .iter()
            .map(|(m, t)| {
                let month = Some(MonthCounter {
                    month: current,
                    settled: base(*t),
                    reserved: 0,
                });
                (
                    m.clone(),
                    ModelState {
                        bucket: None,
                        month,
                    },
                )
            })
            .collect();
        WorkspaceState {
            gcra: Gcra::default(),
            bucket: None,
            month: MonthCounter {
                month: current,
                settled: base(totals.tokens),
                reserved: 0,
            },
            models,
            in_flight: 0,
            unsettled: 0,
            last_seen: now,
        }
    }

    /// True when this state's month counters belong to an earlier month than `now`'s; the
    /// caller then reseeds from the ledger (settlements of the new month may already be there).
    pub fn month_is_stale(&self, now: Nanos) -> bool {
        self.month.month != MonthKey::of(now)
    }

    pub fn roll_month(&mut self, now: Nanos, totals: &MonthTotals) {
        let current = MonthKey::of(now);
        if self.month.month == current {
            return;
        }
        let base = |n: u64| if totals.month == Some(current) { n } else { 0 };
        self.month.roll(current, base(totals.tokens));
        for (model, state) in self.models.iter_mut() {
            if let Some(m) = state.month.as_mut() {
                m.roll(
                    current,
                    base(totals.by_model.get(model).copied().unwrap_or(0)),
                );
            }
        }
        // Models first used in the new month may already have settled usage in the ledger.
        if totals.month == Some(current) {
            for (model, tokens) in &totals.by_model {
                let state = self.models.entry(model.clone()).or_default();
                state.month.get_or_insert(MonthCounter {
                    month: current,
                    settled: *tokens,
                    reserved: 0,
                });
            }
        }
    }

    /// Nothing to remember: evicting this state loses nothing (the month lives in the ledger).
    pub fn is_idle(&self, limits: Option<&Limits>, now: Nanos) -> bool {
        if self.unsettled > 0 || self.in_flight > 0 || !self.gcra.is_idle(now) {
            return false;
        }
        let Some(limits) = limits else { return true };
        let full = |b: &Option<TokenBucket>, cap: Option<u64>| match (b, cap) {
            (Some(b), Some(cap)) => b.until_full(cap, now) == 0,
            _ => true,
        };
        full(&self.bucket, limits.tokens_per_minute)
            && self.models.iter().all(|(name, m)| {
                let cap = limits.models.get(name).and_then(|l| l.tokens_per_minute);
                full(&m.bucket, cap)
            })
    }

    fn model_state(&mut self, model: &str, now: Nanos) -> &mut ModelState {
        let current = MonthKey::of(now);
        if !self.models.contains_key(model) {
            self.models.insert(model.to_string(), ModelState::default());
        }
        let state = self.models.get_mut(model).expect("just inserted");
        state.month.get_or_insert(MonthCounter {
            month: current,
            settled: 0,
            reserved: 0,
        });
        state
    }

    /// Checks every limit, and only if all admit, takes from every one: one atomic step.
    pub fn reserve(
        &mut self,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> (Verdict, Snapshot) {
        self.last_seen = now;
        let model_limits = model.and_then(|m| limits.models.get(m).map(|l| (m, l)));

        // What may be reserved: the estimate, capped by the smallest token capacity so that a
        // request whose prompt fits can always be admitted once the limits have room.
        let capacities = [
            limits
                .tokens_per_minute
                .map(|c| (c, LimitName::TokensPerMinute, None)),
            limits
                .tokens_per_month
                .map(|c| (c, LimitName::TokensPerMonth, None)),
            model_limits.and_then(|(m, l)| {
                l.tokens_per_minute
                    .map(|c| (c, LimitName::ModelTokensPerMinute, Some(m)))
            }),
            model_limits.and_then(|(m, l)| {
                l.tokens_per_month
                    .map(|c| (c, LimitName::ModelTokensPerMonth, Some(m)))
            }),
        ];
        let mut tokens = cost.estimate.max(cost.prompt);
        let mut denials: Vec<Denial> = Vec::new();
        for (cap, name, m) in capacities.into_iter().flatten() {
            if cost.prompt > cap {
                denials.push(Denial {
                    kind: DenialKind::RequestTooLarge,
                    limit: name,
                    model: m.map(str::to_string),
                    limit_value: cap as f64,
                    retry_after: 0,
                });
            }
            tokens = tokens.min(cap);
        }
        let tokens = tokens.max(cost.prompt);

        // Requests per second.
        let burst = limits.effective_burst();
        let new_tat = match limits.requests_per_second {
            Some(rps) => match self.gcra.check(now, rps, burst) {
                Ok(tat) => Some(tat),
                Err(wait) => {
                    denials.push(Denial {
                        kind: DenialKind::RateLimited,
                        limit: LimitName::RequestsPerSecond,
                        model: None,
                        limit_value: rps,
                        retry_after: wait,
                    });
                    None
                }
            },
            None => None,
        };

        // Concurrent requests.
        if let Some(max) = limits.concurrent_requests {
            if self.in_flight >= max {
                denials.push(Denial {
                    kind: DenialKind::RateLimited,
                    limit: LimitName::ConcurrentRequests,
                    model: None,
                    limit_value: max as f64,
                    retry_after: NANOS_PER_SEC,
                });
            }
        }

        // Tokens per minute.
        if let Some(cap) = limits.tokens_per_minute {
            let bucket = self
                .bucket
                .get_or_insert_with(|| TokenBucket::full(cap, now));
            let wait = bucket.wait_for(cap, tokens, now);
            if wait > 0 && tokens <= cap {
                denials.push(Denial {
                    kind: DenialKind::RateLimited,
                    limit: LimitName::TokensPerMinute,
                    model: None,
                    limit_value: cap as f64,
                    retry_after: wait,
                });
            }
        }

        // Tokens per month.
        let next_month = month_span(now).1;
        if let Some(cap) = limits.tokens_per_month {
            if self.month.used() + tokens > cap && tokens <= cap {
                denials.push(Denial {
                    kind: DenialKind::QuotaExceeded,
                    limit: LimitName::TokensPerMonth,
                    model: None,
                    limit_value: cap as f64,
                    retry_after: next_month.saturating_sub(now),
                });
            }
        }

        // Per-model limits.
        if let Some((m, ml)) = model_limits {
            let state = self.model_state(m, now);
            if let Some(cap) = ml.tokens_per_minute {
                let bucket = state
                    .bucket
                    .get_or_insert_with(|| TokenBucket::full(cap, now));
                let wait = bucket.wait_for(cap, tokens, now);
                if wait > 0 && tokens <= cap {
                    denials.push(Denial {
                        kind: DenialKind::RateLimited,
                        limit: LimitName::ModelTokensPerMinute,
                        model: Some(m.to_string()),
                        limit_value: cap as f64,
                        retry_after: wait,
                    });
                }
            }
            if let (Some(cap), Some(month)) = (ml.tokens_per_month, state.month.as_ref()) {
                if month.used() + tokens > cap && tokens <= cap {
                    denials.push(Denial {
                        kind: DenialKind::QuotaExceeded,
                        limit: LimitName::ModelTokensPerMonth,
                        model: Some(m.to_string()),
                        limit_value: cap as f64,
                        retry_after: next_month.saturating_sub(now),
                    });
                }
            }
        }

        // The cause a client must hear first: what can never fit, then the month, then the
        // longest wait, so that retrying after `retry_after` succeeds when nothing else runs.
        if let Some(worst) = denials
            .into_iter()
            .max_by(|a, b| a.kind.cmp(&b.kind).then(a.retry_after.cmp(&b.retry_after)))
        {
            return (Verdict::Deny(worst), self.snapshot(limits, now));
        }

        // Admit: take from every limit.
        if let (Some(tat), Some(rps)) = (new_tat, limits.requests_per_second) {
            self.gcra.commit(tat, rps);
        }
        if limits.concurrent_requests.is_some() {
            self.in_flight += 1;
        }
        self.unsettled += 1;
        if let (Some(cap), Some(bucket)) = (limits.tokens_per_minute, self.bucket.as_mut()) {
            bucket.add(cap, -(tokens as i128), now);
        }
        self.month.reserved += tokens;
        if let Some(m) = model {
            let state = self.model_state(m, now);
            if let (Some(cap), Some(bucket)) = (
                model_limits.and_then(|(_, l)| l.tokens_per_minute),
                state.bucket.as_mut(),
            ) {
                bucket.add(cap, -(tokens as i128), now);
            }
            if let Some(month) = state.month.as_mut() {
                month.reserved += tokens;
            }
        }
        let held = Held {
            model: model.map(str::to_string),
            tokens,
            month: MonthKey::of(now),
            slot: limits.concurrent_requests.is_some(),
        };
        (Verdict::Admit(held), self.snapshot(limits, now))
    }

    /// Frees the concurrency slot of `held` before it is settled (a client that went away);
    /// the later `settle` does not free it again.
    pub fn release_slot(&mut self, held: &mut Held) {
        if held.slot {
            self.in_flight = self.in_flight.saturating_sub(1);
            held.slot = false;
        }
    }

    /// Replaces what `held` reserved with `actual` tokens (0 refunds) and frees its slot.
    pub fn settle(&mut self, limits: &Limits, held: &Held, actual: u64, now: Nanos) {
        self.last_seen = now;
        self.unsettled = self.unsettled.saturating_sub(1);
        let delta = held.tokens as i128 - actual as i128;
        if let (Some(cap), Some(bucket)) = (limits.tokens_per_minute, self.bucket.as_mut()) {
            bucket.add(cap, delta, now);
        }
        if held.slot {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        // Usage counts in the month in which it is settled; a reservation from an earlier
        // month was dropped when the counter rolled over.
        let current = MonthKey::of(now);
        if self.month.month == held.month {
            self.month.reserved = self.month.reserved.saturating_sub(held.tokens);
        }
        if self.month.month == current {
            self.month.settled += actual;
        }
        if let Some(m) = held.model.as_deref() {
            let cap = limits.models.get(m).and_then(|l| l.tokens_per_minute);
            let state = self.model_state(m, now);
            if let (Some(cap), Some(bucket)) = (cap, state.bucket.as_mut()) {
                bucket.add(cap, delta, now);
            }
            if let Some(month) = state.month.as_mut() {
                if month.month == held.month {
                    month.reserved = month.reserved.saturating_sub(held.tokens);
                }
                if month.month == current {
                    month.settled += actual;
                }
            }
        }
    }

    pub fn snapshot(&self, limits: &Limits, now: Nanos) -> Snapshot {
        let requests = limits.requests_per_second.map(|rps| {
            let (remaining, reset) = self.gcra.view(now, rps, limits.effective_burst());
            Window {
                limit: rps,
                remaining,
                reset,
            }
        });
        let tokens = limits.tokens_per_minute.map(|cap| match &self.bucket {
            Some(b) => Window {
                limit: cap as f64,
                remaining: b.remaining(cap, now),
                reset: b.until_full(cap, now),
            },
            None => Window {
                limit: cap as f64,
                remaining: cap,
                reset: 0,
            },
        });
        let month = limits.tokens_per_month.map(|cap| Window {
            limit: cap as f64,
            remaining: cap.saturating_sub(self.month.used()),
            reset: month_span(now).1.saturating_sub(now),
        });
        Snapshot {
            requests,
            tokens,
            month,
        }
    }

    pub fn usage(&self, limits: &Limits, now: Nanos) -> Usage {
        Usage {
            snapshot: self.snapshot(limits, now),
            bucket_tokens: limits.tokens_per_minute.map(|cap| match &self.bucket {
                Some(b) => b.balance(cap, now),
                None => cap as i64,
            }),
            month_settled_tokens: self.month.settled,
            month_reserved_tokens: self.month.reserved,
            in_flight: self.in_flight,
        }
    }
}
