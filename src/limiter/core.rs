//! The arithmetic of the limits: the request bucket (GCRA), the refilled token bucket, the
//! calendar month, and the one decision that checks them all before changing any. Pure: no I/O,
//! no clock of its own; every function takes `now` in nanoseconds since the Unix epoch, so tests
//! inject time.
//!
//! # Units, shared with the Redis script
//! The same decisions are made by `limiter/redis.lua`, where every number is a double. So that
//! both backends compute the same thing exactly, every quantity is an integer below 2^53:
//! - **time** is counted in microseconds inside (`now / 1000`); outputs are turned back into
//!   nanoseconds against the caller's `now` (`target_us * 1000 - now`), so that waiting exactly
//!   `retry_after` is enough and one nanosecond less is not;
//! - **requests** are counted in nano-requests (10^9 per request): a rate of `rps` refills
//!   `rps * 1000` nano-requests per microsecond, an integer because rates have at most three
//!   decimals. Capacity is `burst * 10^9` ≤ 10^15;
//! - **tokens** per minute are counted in units of 1/60,000 token and refilled once per whole
//!   millisecond by `capacity` units (`capacity / 60` tokens per second). Capacity ≤ 10^10
//!   tokens, i.e. ≤ 6·10^14 units; debt is floored at one minute (`-capacity`);
//! - a refill never multiplies an elapsed time by a rate beyond the deficit it fills, so no
//!   product exceeds about 2·10^15.
//!
//! `Limits::validate` enforces the bounds these rely on (see `model.rs`).

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;

use crate::model::{KeyId, KeyLimits, Limits, ModelLimits};

pub type Nanos = u64;
pub const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Nano-requests per request.
pub const NANO_REQUESTS: i64 = 1_000_000_000;
/// Token-bucket units per token: a bucket of capacity `C` tokens refills `C` units per
/// millisecond, i.e. `C / 60` tokens per second.
pub const UNITS_PER_TOKEN: i64 = 60_000;
/// Models a workspace's state counts apart at most: models with limits of their own always
/// count; others only while fewer are tracked (names are the client's choice). The Redis script
/// keeps the same bound.
pub const MAX_TRACKED_MODELS: usize = 256;
/// What one request may reserve or settle at most, in tokens: far above any real request, and
/// low enough that every sum stays exact in a double.
pub const MAX_REQUEST_TOKENS: u64 = 100_000_000_000;

/// Microseconds of `now` (floored).
pub fn micros(now: Nanos) -> u64 {
    now / 1_000
}

/// Nanoseconds from `now` until the microsecond `target` begins (0 if it has).
pub fn until(target_us: u64, now: Nanos) -> Nanos {
    target_us.saturating_mul(1_000).saturating_sub(now)
}

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Requests per second in nano-requests per microsecond (`rps * 1000`, rates have at most three
/// decimals).
pub fn request_rate(rps: f64) -> i64 {
    ((rps * 1000.0).round() as i64).max(1)
}

/// Requests per second as a bucket of `burst` requests refilled at `rps` (the generic cell rate
/// algorithm seen as a bucket): smooth, no window boundaries.
#[derive(Debug, Clone, Copy)]
pub struct RequestBucket {
    /// Nano-requests available (negative after a lowered burst, until refilled).
    level: i64,
    /// Microsecond of `level`.
    at: u64,
    /// The burst (capacity in requests) `level` was computed with; never 0, which lets
    /// `Option<RequestBucket>` take no more room than the bucket.
    burst: NonZeroU32,
    /// The rate (`request_rate`, at most 10^9) it refills at: that of the limits it was last
    /// taken from under (in room the bucket had unused).
    rate: u32,
}

impl RequestBucket {
    fn full(capacity: i64, rate: i64, now_us: u64) -> Self {
        RequestBucket {
            level: capacity,
            at: now_us,
            burst: burst_of(capacity),
            rate: rate_of(rate),
        }
    }

    /// A bucket with nothing left at `now_us`, refilling from there.
    fn empty(capacity: i64, rate: i64, now_us: u64) -> Self {
        RequestBucket {
            level: 0,
            ..Self::full(capacity, rate, now_us)
        }
    }

    /// The rate it refills at until it is next taken from.
    fn own_rate(&self) -> i64 {
        i64::from(self.rate)
    }

    /// The capacity `level` was computed with, in nano-requests.
    fn capacity(&self) -> i64 {
        self.burst.get() as i64 * NANO_REQUESTS
    }

    /// Level and time at `now_us`, under a burst of `capacity`. When the limits changed (a new
    /// tier, an override), what was used stays used: the level moves by the change of capacity;
    /// and it refills at the rate of the limits it was used under until it is next taken from,
    /// so that what it had refilled under them is not taken back (lowered after a pause, a
    /// workspace's limits start full, not in debt for requests long refilled).
    fn at_time(&self, capacity: i64, now_us: u64) -> (i64, u64) {
        let level = (self.level + capacity - self.capacity()).min(capacity);
        if now_us <= self.at {
            return (level, self.at);
        }
        let deficit = capacity - level;
        if deficit <= 0 {
            return (capacity, now_us);
        }
        let elapsed = (now_us - self.at) as i64;
        if elapsed >= ceil_div(deficit, self.own_rate()) {
            (capacity, now_us)
        } else {
            (level + elapsed * self.own_rate(), now_us)
        }
    }

    /// The microsecond at which one more request fits (now when it does).
    fn admit_at(&self, capacity: i64, now_us: u64) -> u64 {
        let (level, at) = self.at_time(capacity, now_us);
        let need = NANO_REQUESTS - level;
        if need <= 0 {
            now_us
        } else {
            at + ceil_div(need, self.own_rate()) as u64
        }
    }

    fn take(&mut self, capacity: i64, rate: i64, now_us: u64) {
        let (level, at) = self.at_time(capacity, now_us);
        *self = RequestBucket {
            level: level - NANO_REQUESTS,
            at,
            burst: burst_of(capacity),
            rate: rate_of(rate),
        };
    }

    /// (requests that could be sent at once, microsecond at which the burst is full again).
    fn view(&self, capacity: i64, now_us: u64) -> (u64, u64) {
        let (level, at) = self.at_time(capacity, now_us);
        let remaining = (level.max(0) / NANO_REQUESTS) as u64;
        (
            remaining,
            at + ceil_div(capacity - level, self.own_rate()) as u64,
        )
    }

    fn is_full(&self, capacity: i64, now_us: u64) -> bool {
        self.at_time(capacity, now_us).0 >= capacity
    }
}

/// A request rate as stored (valid limits give 1 to 10^9).
fn rate_of(rate: i64) -> u32 {
    rate.clamp(1, i64::from(u32::MAX)) as u32
}

/// The burst of a request capacity (a whole number of requests, at least 1 for valid limits).
fn burst_of(capacity: i64) -> NonZeroU32 {
    NonZeroU32::new((capacity / NANO_REQUESTS) as u32).unwrap_or(NonZeroU32::MIN)
}

/// A token capacity as stored (valid limits are at least 1 token).
fn token_capacity(capacity: u64) -> NonZeroU64 {
    NonZeroU64::new(capacity).unwrap_or(NonZeroU64::MIN)
}

/// A continuously refilled bucket: capacity = the per-minute limit, refill limit/60 per second,
/// credited per whole millisecond. The level may go below zero (debt, at most one minute's
/// worth) when settled usage exceeds what was reserved.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    level: i64,
    /// Microsecond of `level`: moves by whole milliseconds while refilling, so no fraction of a
    /// millisecond's credit is lost.
    at: u64,
    /// The capacity (tokens) `level` was computed with; never 0, which lets
    /// `Option<TokenBucket>` take no more room than the bucket.
    capacity: NonZeroU64,
}

impl TokenBucket {
    fn full(capacity: u64, now_us: u64) -> Self {
        TokenBucket {
            level: capacity as i64 * UNITS_PER_TOKEN,
            at: now_us,
            capacity: token_capacity(capacity),
        }
    }

    /// A bucket with nothing left at `now_us`, refilling from there.
    fn empty(capacity: u64, now_us: u64) -> Self {
        TokenBucket {
            level: 0,
            ..Self::full(capacity, now_us)
        }
    }

    /// The rate it refills at (units a millisecond) until it is next taken from or added to:
    /// its capacity a minute.
    fn own_rate(&self) -> i64 {
        self.capacity.get() as i64
    }

    fn at_time(&self, capacity: u64, now_us: u64) -> (i64, u64) {
        let cap = capacity as i64 * UNITS_PER_TOKEN;
        // When the limit changed, what was used in the last minute stays used: the level moves
        // by the difference, so an increase holds at once and a decrease does not forgive; and
        // it refills at the rate of the limit it was used under until it is next taken from or
        // added to, so that what it had refilled under it is not taken back (a workspace idle
        // for a minute starts a lowered limit full).
        let level = (self.level + (capacity as i64 - self.capacity.get() as i64) * UNITS_PER_TOKEN)
            .clamp(-cap, cap);
        if now_us <= self.at {
            return (level, self.at);
        }
        let deficit = cap - level;
        if deficit <= 0 {
            return (cap, now_us);
        }
        let ms = ((now_us - self.at) / 1_000) as i64;
        if ms >= ceil_div(deficit, self.own_rate()) {
            (cap, now_us)
        } else {
            (level + ms * self.own_rate(), self.at + ms as u64 * 1_000)
        }
    }

    /// The microsecond at which `cost` tokens are available (now when they are).
    fn available_at(&self, capacity: u64, cost: u64, now_us: u64) -> u64 {
        let (level, at) = self.at_time(capacity, now_us);
        let need = cost as i64 * UNITS_PER_TOKEN - level;
        if need <= 0 {
            now_us
        } else {
            at + ceil_div(need, self.own_rate()) as u64 * 1_000
        }
    }

    /// Adds `tokens` (negative takes), within one minute of debt and the capacity.
    fn add(&mut self, capacity: u64, tokens: i64, now_us: u64) {
        let cap = capacity as i64 * UNITS_PER_TOKEN;
        let (level, at) = self.at_time(capacity, now_us);
        *self = TokenBucket {
            level: (level + tokens * UNITS_PER_TOKEN).clamp(-cap, cap),
            at,
            capacity: token_capacity(capacity),
        };
    }

    /// Whole tokens held now; a bucket in debt holds 0.
    fn remaining(&self, capacity: u64, now_us: u64) -> u64 {
        (self.at_time(capacity, now_us).0.max(0) / UNITS_PER_TOKEN) as u64
    }

    /// The microsecond at which the bucket is full.
    fn full_at(&self, capacity: u64, now_us: u64) -> u64 {
        let (level, at) = self.at_time(capacity, now_us);
        let missing = capacity as i64 * UNITS_PER_TOKEN - level;
        if missing <= 0 {
            now_us
        } else {
            at + ceil_div(missing, self.own_rate()) as u64 * 1_000
        }
    }

    /// Balance in whole tokens, negative when in debt (for the usage view).
    fn balance(&self, capacity: u64, now_us: u64) -> i64 {
        self.at_time(capacity, now_us).0 / UNITS_PER_TOKEN
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

/// `YYYY-MM-DD` in UTC: the ledger's day. Every settlement and denial asks for it: the last
/// day's text is kept per thread, so that a call within the day copies it rather than formats
/// the date again.
pub fn day_of(now: Nanos) -> String {
    const NANOS_PER_DAY: Nanos = 86_400 * NANOS_PER_SEC;
    thread_local! {
        static LAST: std::cell::RefCell<(Nanos, String)> = const {
            std::cell::RefCell::new((Nanos::MAX, String::new()))
        };
    }
    let day = now / NANOS_PER_DAY;
    LAST.with_borrow_mut(|(last, text)| {
        if *last != day {
            let dt = datetime(now);
            *text = format!("{:04}-{:02}-{:02}", dt.year(), dt.month() as u8, dt.day());
            *last = day;
        }
        text.clone()
    })
}

/// Tokens settled and reserved in one calendar month.
#[derive(Debug, Clone, Copy)]
struct MonthCounter {
    month: MonthKey,
    settled: u64,
    reserved: u64,
    /// What `settled` started from (the ledger's total when the counter was seeded).
    seed: u64,
}

impl MonthCounter {
    fn starting(month: MonthKey, seed: u64) -> Self {
        MonthCounter {
            month,
            settled: seed,
            reserved: 0,
            seed,
        }
    }

    fn used(&self) -> u64 {
        self.settled + self.reserved
    }

    /// Takes up the ledger's `total` for this month, read again: what was settled is at least
    /// that (the ledger only grows), and what it started from is that.
    fn reseed(&mut self, total: u64) {
        self.settled = self.settled.max(total);
        self.seed = self.seed.max(total);
    }

    /// Rolls over to `month`; settled usage of a new month starts from the ledger's base.
    fn roll(&mut self, month: MonthKey, base: u64) {
        if self.month != month {
            *self = MonthCounter::starting(month, base);
        }
    }
}

/// What a workspace's state counts for one model: its month usage always (so that a per-model
/// month limit set later starts from what was used), its token bucket only while it has a
/// per-minute limit (rare, so kept out of line).
#[derive(Debug, Clone)]
struct ModelState {
    name: ModelName,
    bucket: Option<Box<TokenBucket>>,
    month: MonthCounter,
}

/// A model's name as the limiter keeps it: shared by every state that counts the model and by
/// the reservations made for it, so that a decision copies no string.
pub type ModelName = Arc<str>;

/// Model names shared by the workspace states of one table (a shard of the in-memory limiter):
/// a name is stored once however many workspaces use it. `prune` forgets the names that only
/// this table still holds.
#[derive(Debug, Default)]
pub struct ModelNames {
    names: HashSet<ModelName, foldhash::fast::RandomState>,
}

impl ModelNames {
    pub fn get(&mut self, model: &str) -> ModelName {
        if let Some(name) = self.names.get(model) {
            return name.clone();
        }
        let name = ModelName::from(model);
        self.names.insert(name.clone());
        name
    }

    /// Forgets names that no state and no reservation holds any more.
    pub fn prune(&mut self) {
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }
}

/// Month totals from the durable ledger, used to seed a workspace's month counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthTotals {
    pub month: Option<MonthKey>,
    pub tokens: u64,
    pub requests: u64,
    pub by_model: HashMap<String, u64>,
    /// Tokens per API key (the ledger's per-key rows), for keys' own month limits.
    pub by_key: HashMap<crate::model::KeyId, u64>,
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
    /// A key's own limits (`Limits::key`).
    KeyRequestsPerSecond,
    KeyTokensPerMinute,
    KeyTokensPerMonth,
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
            LimitName::KeyRequestsPerSecond => "key_requests_per_second",
            LimitName::KeyTokensPerMinute => "key_tokens_per_minute",
            LimitName::KeyTokensPerMonth => "key_tokens_per_month",
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
    /// This instance's share of a limit cannot take it while Redis does not answer, though the
    /// workspace's whole limit could (a month share used up, a prompt above the share's
    /// capacity): waiting for Redis, or another instance, fixes it. Set by the failover only.
    ShareUsedUp,
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

impl Snapshot {
    /// As of the request's settlement: it held `held` tokens and was charged `charged` (`0`
    /// refunded), so each token window has the difference more left, or less, within its
    /// limit and never below nothing, and the minute's bucket is full that much sooner (or
    /// later). The requests window is as it was: a request counts whatever it cost.
    pub fn settled(mut self, held: u64, charged: u64) -> Snapshot {
        let given_back = held as i128 - charged as i128;
        for w in [&mut self.tokens, &mut self.month].into_iter().flatten() {
            let left = w.remaining as i128 + given_back;
            w.remaining = left.clamp(0, w.limit.max(0.0) as i128) as u64;
        }
        if let Some(w) = &mut self.tokens {
            // The bucket refills its limit in a minute, and its debt is at most a minute's
            // worth: it is full again within two (an outside audit: 5,000 tokens charged on a
            // limit of 1,000 a minute said 5m0s, where the next denial said 2m).
            let per_minute = (w.limit as i128).max(1);
            let sooner = given_back * (60 * NANOS_PER_SEC as i128) / per_minute;
            w.reset = match w.remaining as f64 >= w.limit {
                true => 0,
                false => (w.reset as i128 - sooner).clamp(0, 120 * NANOS_PER_SEC as i128) as Nanos,
            };
        }
        self
    }

    /// For each window, whichever of this one's and `other`'s has less remaining (the later
    /// reset on a tie): what a client may still send when both hold.
    pub fn tighter(self, other: Snapshot) -> Snapshot {
        fn pick(a: Option<Window>, b: Option<Window>) -> Option<Window> {
            match (a, b) {
                (Some(a), Some(b)) => Some(
                    if (b.remaining, std::cmp::Reverse(b.reset))
                        < (a.remaining, std::cmp::Reverse(a.reset))
                    {
                        b
                    } else {
                        a
                    },
                ),
                (a, b) => a.or(b),
            }
        }
        Snapshot {
            requests: pick(self.requests, other.requests),
            tokens: pick(self.tokens, other.tokens),
            month: pick(self.month, other.month),
        }
    }
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
    /// Each model with limits of its own (`Limits::models`), by name.
    pub models: Vec<ModelUsage>,
    /// The key's own limits as of now, when the limits asked about carry a key's
    /// (`Limits::key`).
    pub key: Option<Snapshot>,
}

/// A per-minute bucket of `cap` as a window now (whole when it was never used).
fn token_window(bucket: Option<&TokenBucket>, cap: u64, now: Nanos) -> Window {
    let now_us = micros(now);
    match bucket {
        Some(b) => Window {
            limit: cap as f64,
            remaining: b.remaining(cap, now_us),
            reset: until(b.full_at(cap, now_us), now),
        },
        None => Window {
            limit: cap as f64,
            remaining: cap,
            reset: 0,
        },
    }
}

/// One model's limits as of now: its per-minute bucket and its month, each `None` without
/// that limit.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelUsage {
    pub model: String,
    pub tokens: Option<Window>,
    pub month: Option<Window>,
    /// Tokens of this model settled and reserved this month.
    pub month_used: u64,
}

/// What was held for an admitted request, to be settled exactly once.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub model: Option<ModelName>,
    pub tokens: u64,
    pub month: MonthKey,
    pub slot: bool,
    /// The key whose own limits took from it too (`Limits::key`).
    pub key: Option<KeyId>,
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Admit(Held),
    Deny(Denial),
}

/// The state of one key's own limits (`Limits::key`), kept in its workspace's state so that one
/// decision checks and takes both: its request bucket, token bucket and month counter (counted
/// for every request made with the key once the key has limits, so that a month limit set later
/// starts from what was used).
#[derive(Debug, Clone)]
struct KeyState {
    id: KeyId,
    /// The limits last enforced, for `is_idle` (which is not told the keys' limits).
    limits: KeyLimits,
    requests: Option<RequestBucket>,
    bucket: Option<TokenBucket>,
    month: MonthCounter,
}

/// The request bucket's capacity and rate for a key's `limits`.
fn key_request_limit(limits: &KeyLimits) -> Option<(f64, i64, i64)> {
    request_limit(&limits.as_limits())
}

/// The windows of one set of buckets and a month counter now (a bucket never used is whole):
/// the workspace's or a key's.
#[allow(clippy::too_many_arguments)]
fn windows(
    requests: Option<&RequestBucket>,
    request_limit: Option<(f64, i64, i64)>,
    tokens: Option<&TokenBucket>,
    tokens_per_minute: Option<u64>,
    tokens_per_month: Option<u64>,
    month_used: u64,
    now: Nanos,
    next_month: Nanos,
) -> Snapshot {
    let now_us = micros(now);
    let requests = request_limit.map(|(rps, cap, _)| match requests {
        Some(b) => {
            let (remaining, full_at) = b.view(cap, now_us);
            Window {
                limit: rps,
                remaining,
                reset: until(full_at, now),
            }
        }
        None => Window {
            limit: rps,
            remaining: (cap / NANO_REQUESTS) as u64,
            reset: 0,
        },
    });
    let tokens = tokens_per_minute.map(|cap| token_window(tokens, cap, now));
    let month = tokens_per_month.map(|cap| Window {
        limit: cap as f64,
        remaining: cap.saturating_sub(month_used),
        reset: next_month.saturating_sub(now),
    });
    Snapshot {
        requests,
        tokens,
        month,
    }
}

/// A key's windows now, as `snapshot_at` makes the workspace's.
fn key_snapshot(
    state: Option<&KeyState>,
    limits: &KeyLimits,
    now: Nanos,
    next_month: Nanos,
) -> Snapshot {
    windows(
        state.and_then(|k| k.requests.as_ref()),
        key_request_limit(limits),
        state.and_then(|k| k.bucket.as_ref()),
        limits.tokens_per_minute,
        limits.tokens_per_month,
        state.map_or(0, |k| k.month.used()),
        now,
        next_month,
    )
}

/// All limiter state of one workspace: 120 bytes, plus 56 per model it counts apart (see
/// `ModelState`) and what its keys with limits of their own hold. Kept small because an
/// instance holds one per active workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceState {
    requests: Option<RequestBucket>,
    bucket: Option<TokenBucket>,
    month: MonthCounter,
    /// Sorted by name; a boxed slice, exactly as long as the models counted (most workspaces
    /// use one or a few; at most `MAX_TRACKED_MODELS` plus the limited ones).
    models: Box<[ModelState]>,
    /// Requests in flight counted against `concurrent_requests` (only while that limit is set).
    in_flight: u32,
    /// Every admitted request not yet settled, whatever the limits: a state holding one is
    /// never evicted, so its settlement always finds it.
    unsettled: u32,
    pub last_seen: Nanos,
    /// Keys with limits of their own, by id; `None` for nearly every workspace. Boxed so that
    /// it costs every state 8 bytes, not a `Vec`'s 24.
    #[allow(clippy::box_collection)]
    keys: Option<Box<Vec<KeyState>>>,
}

/// The request bucket's capacity and rate for `limits`, if it limits requests.
fn request_limit(limits: &Limits) -> Option<(f64, i64, i64)> {
    limits.requests_per_second.map(|rps| {
        let capacity = limits.effective_burst() as i64 * NANO_REQUESTS;
        (rps, capacity, request_rate(rps))
    })
}

/// A name for a model, shared through `names` when given, else its own.
fn name_of(names: &mut Option<&mut ModelNames>, model: &str) -> ModelName {
    match names {
        Some(names) => names.get(model),
        None => ModelName::from(model),
    }
}

impl WorkspaceState {
    /// A fresh state whose month counters start from the ledger's totals for `totals.month`.
    pub fn new(now: Nanos, totals: &MonthTotals) -> Self {
        Self::new_named(now, totals, None)
    }

    /// `new`, sharing model names through `names`.
    pub fn new_named(now: Nanos, totals: &MonthTotals, mut names: Option<&mut ModelNames>) -> Self {
        let current = MonthKey::of(now);
        let same_month = totals.month == Some(current);
        let base = |n: u64| if same_month { n } else { 0 };
        let mut models: Vec<ModelState> = totals
            .by_model
            .iter()
            .take(MAX_TRACKED_MODELS)
            .map(|(m, t)| ModelState {
                name: name_of(&mut names, m),
                bucket: None,
                month: MonthCounter::starting(current, base(*t)),
            })
            .collect();
        models.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        WorkspaceState {
            requests: None,
            bucket: None,
            month: MonthCounter::starting(current, base(totals.tokens)),
            models: models.into_boxed_slice(),
            in_flight: 0,
            unsettled: 0,
            last_seen: now,
            keys: None,
        }
    }

    /// Empties the workspace's requests and tokens-per-minute buckets for `limits` at `now`:
    /// they refill from there. For a state that takes over decisions made elsewhere until now
    /// (a share of limits whose use it cannot know), so that it admits no burst at once.
    pub fn drain_buckets(&mut self, limits: &Limits, now: Nanos) {
        self.drain_buckets_to(limits, now, (0.0, 0.0));
    }

    /// `drain_buckets`, the requests bucket then holding `start.0` requests and the tokens one
    /// `start.1` tokens (each within its capacity).
    pub fn drain_buckets_to(&mut self, limits: &Limits, now: Nanos, start: (f64, f64)) {
        let now_us = micros(now);
        if let Some((_, cap, rate)) = request_limit(limits) {
            let mut b = RequestBucket::empty(cap, rate, now_us);
            b.level = ((start.0.max(0.0) * NANO_REQUESTS as f64) as i64).min(b.capacity());
            self.requests = Some(b);
        }
        if let Some(cap) = limits.tokens_per_minute {
            let mut b = TokenBucket::empty(cap, now_us);
            let most = cap as i64 * UNITS_PER_TOKEN;
            b.level = ((start.1.max(0.0) * UNITS_PER_TOKEN as f64) as i64).min(most);
            self.bucket = Some(b);
        }
    }

    /// True when this state's month counters belong to an earlier month than `now`'s; the
    /// caller then reseeds from the ledger (settlements of the new month may already be there).
    pub fn month_is_stale(&self, now: Nanos) -> bool {
        self.month.month != MonthKey::of(now)
    }

    pub fn roll_month(&mut self, now: Nanos, totals: &MonthTotals) {
        self.roll_month_named(now, totals, None)
    }

    /// Takes up the ledger's month totals read again (`totals`, of `now`'s month; those of
    /// another month are ignored): the workspace's, its keys' and its models' month counters
    /// start from them, and count at least them as settled. For a share of the limits taken up
    /// again, whose counters were seeded when the workspace was first seen this month: the
    /// other instances have settled more since, through Redis (an outside audit: a share of what
    /// was left at 3,000 of 6,000 used, taken up again when 5,520 were, admitted 840 tokens
    /// where 480 were left).
    pub fn reseed_month(&mut self, now: Nanos, totals: &MonthTotals) {
        let current = MonthKey::of(now);
        if totals.month != Some(current) || self.month.month != current {
            return;
        }
        self.month.reseed(totals.tokens);
        for key in self.keys.iter_mut().flat_map(|k| k.iter_mut()) {
            key.month
                .reseed(totals.by_key.get(&key.id).copied().unwrap_or(0));
        }
        for state in self.models.iter_mut() {
            state
                .month
                .reseed(totals.by_model.get(&*state.name).copied().unwrap_or(0));
        }
    }

    /// `roll_month`, sharing model names through `names`.
    pub fn roll_month_named(
        &mut self,
        now: Nanos,
        totals: &MonthTotals,
        mut names: Option<&mut ModelNames>,
    ) {
        let current = MonthKey::of(now);
        if self.month.month == current {
            return;
        }
        let base = |n: u64| if totals.month == Some(current) { n } else { 0 };
        self.month.roll(current, base(totals.tokens));
        for key in self.keys.iter_mut().flat_map(|k| k.iter_mut()) {
            let seed = totals.by_key.get(&key.id).copied().unwrap_or(0);
            key.month.roll(current, base(seed));
        }
        for state in self.models.iter_mut() {
            state.month.roll(
                current,
                base(totals.by_model.get(&*state.name).copied().unwrap_or(0)),
            );
        }
        // Models first used in the new month may already have settled usage in the ledger.
        if totals.month == Some(current) {
            for (model, tokens) in &totals.by_model {
                if self.model_index(model).is_err() && self.models.len() < MAX_TRACKED_MODELS {
                    let name = name_of(&mut names, model);
                    self.insert_model(name, MonthCounter::starting(current, *tokens));
                }
            }
        }
    }

    /// Nothing to remember: evicting this state loses nothing (the month lives in the ledger).
    pub fn is_idle(&self, limits: Option<&Limits>, now: Nanos) -> bool {
        if self.unsettled > 0 || self.in_flight > 0 {
            return false;
        }
        let Some(limits) = limits else { return true };
        let now_us = micros(now);
        let requests_full = match (&self.requests, request_limit(limits)) {
            (Some(b), Some((_, cap, _))) => b.is_full(cap, now_us),
            _ => true,
        };
        let full = |b: Option<&TokenBucket>, cap: Option<u64>| match (b, cap) {
            (Some(b), Some(cap)) => b.full_at(cap, now_us) <= now_us,
            _ => true,
        };
        requests_full
            && full(self.bucket.as_ref(), limits.tokens_per_minute)
            && self.models.iter().all(|m| {
                let cap = limits
                    .models
                    .get(&*m.name)
                    .and_then(|l| l.tokens_per_minute);
                full(m.bucket.as_deref(), cap)
            })
            && self.keys.iter().flat_map(|k| k.iter()).all(|k| {
                let requests_full = match (&k.requests, key_request_limit(&k.limits)) {
                    (Some(b), Some((_, cap, _))) => b.is_full(cap, now_us),
                    _ => true,
                };
                requests_full && full(k.bucket.as_ref(), k.limits.tokens_per_minute)
            })
    }

    /// Whether the key of `limits` (if any) has no state here yet: its month counter must
    /// start from the ledger's total for the key first (`add_key`).
    pub fn needs_key(&self, limits: &Limits) -> bool {
        limits.key.is_some_and(|k| self.key_index(k.id).is_none())
    }

    fn key_index(&self, id: KeyId) -> Option<usize> {
        self.keys.as_ref()?.iter().position(|k| k.id == id)
    }

    fn key(&self, id: KeyId) -> Option<&KeyState> {
        self.keys.as_ref()?.iter().find(|k| k.id == id)
    }

    /// Starts the state of key `id`, its month counter from the ledger's `totals` (when they
    /// are this month's); nothing when it has one.
    pub fn add_key(&mut self, id: KeyId, totals: &MonthTotals, now: Nanos) {
        if self.key_index(id).is_some() {
            return;
        }
        let current = MonthKey::of(now);
        let seed = match totals.month == Some(current) {
            true => totals.by_key.get(&id).copied().unwrap_or(0),
            false => 0,
        };
        self.keys
            .get_or_insert_with(Default::default)
            .push(KeyState {
                id,
                limits: KeyLimits::default(),
                requests: None,
                bucket: None,
                month: MonthCounter::starting(current, seed),
            });
    }

    /// The state of key `id`, started from nothing when it has none (a caller that did not
    /// read the ledger first: see `needs_key`).
    fn key_state(&mut self, id: KeyId, now: Nanos) -> &mut KeyState {
        let i = match self.key_index(id) {
            Some(i) => i,
            None => {
                self.add_key(id, &MonthTotals::default(), now);
                self.keys.as_ref().map_or(0, |k| k.len() - 1)
            }
        };
        &mut self.keys.as_mut().expect("a key state")[i]
    }

    fn model_index(&self, model: &str) -> Result<usize, usize> {
        // Most workspaces use one model: one comparison of lengths, then of bytes.
        if let [only] = &*self.models {
            if only.name.len() == model.len() && *only.name == *model {
                return Ok(0);
            }
        }
        self.models.binary_search_by(|m| (*m.name).cmp(model))
    }

    /// Adds a model the state does not count yet (rare: a model's first request this month, or
    /// its first since the state was made), keeping the slice sorted and exactly as long.
    fn insert_model(&mut self, name: ModelName, month: MonthCounter) -> usize {
        let at = self.model_index(&name).unwrap_err();
        let mut models = std::mem::take(&mut self.models).into_vec();
        models.reserve_exact(1);
        models.insert(
            at,
            ModelState {
                name,
                bucket: None,
                month,
            },
        );
        self.models = models.into_boxed_slice();
        at
    }

    /// Whether `model` is (or may become) counted apart: limited, already tracked, or room left.
    fn tracks(&self, model: &str, limits: &Limits) -> bool {
        limits.models.contains_key(model)
            || self.models.len() < MAX_TRACKED_MODELS
            || self.model_index(model).is_ok()
    }

    fn model_state(
        &mut self,
        model: &str,
        now: Nanos,
        names: &mut Option<&mut ModelNames>,
    ) -> &mut ModelState {
        let i = match self.model_index(model) {
            Ok(i) => i,
            Err(_) => {
                let month = MonthCounter::starting(MonthKey::of(now), 0);
                self.insert_model(name_of(names, model), month)
            }
        };
        &mut self.models[i]
    }

    /// Checks every limit, and only if all admit, takes from every one: one atomic step.
    pub fn reserve(
        &mut self,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> (Verdict, Snapshot) {
        self.reserve_named(limits, model, cost, now, None)
    }

    /// `reserve`, sharing model names through `names`.
    pub fn reserve_named(
        &mut self,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
        mut names: Option<&mut ModelNames>,
    ) -> (Verdict, Snapshot) {
        self.last_seen = now;
        let now_us = micros(now);
        let (month_now, next_month) = month_span(now);
        let model_limits = match model {
            Some(m) if !limits.models.is_empty() => limits.models.get(m).map(|l| (m, l)),
            _ => None,
        };
        let cost = TokenCost {
            prompt: cost.prompt.min(MAX_REQUEST_TOKENS),
            estimate: cost.estimate.min(MAX_REQUEST_TOKENS),
        };

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
            limits
                .key
                .and_then(|k| k.limits.tokens_per_minute)
                .map(|c| (c, LimitName::KeyTokensPerMinute, None)),
            limits
                .key
                .and_then(|k| k.limits.tokens_per_month)
                .map(|c| (c, LimitName::KeyTokensPerMonth, None)),
        ];
        let mut tokens = cost.estimate.max(cost.prompt);
        // The cause a client must hear first: what can never fit, then the month, then the
        // longest wait, so that retrying after `retry_after` succeeds when nothing else runs.
        // Kept as it is found, so that an admission builds nothing.
        let mut worst: Option<Denial> = None;
        let mut deny = |d: Denial| {
            // On a tie, a key's own limit (checked last) does not replace the workspace's: the
            // workspace's binds every key, and raising the key's would not help.
            let key = matches!(
                d.limit,
                LimitName::KeyRequestsPerSecond
                    | LimitName::KeyTokensPerMinute
                    | LimitName::KeyTokensPerMonth
            );
            let replace = match &worst {
                None => true,
                Some(w) if key => (d.kind, d.retry_after) > (w.kind, w.retry_after),
                Some(w) => (d.kind, d.retry_after) >= (w.kind, w.retry_after),
            };
            if replace {
                worst = Some(d);
            }
        };
        for (cap, name, m) in capacities.into_iter().flatten() {
            if cost.prompt > cap {
                deny(Denial {
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
        let request_limit = request_limit(limits);
        if let Some((rps, cap, rate)) = request_limit {
            let bucket = self
                .requests
                .get_or_insert_with(|| RequestBucket::full(cap, rate, now_us));
            let at = bucket.admit_at(cap, now_us);
            if at > now_us {
                deny(Denial {
                    kind: DenialKind::RateLimited,
                    limit: LimitName::RequestsPerSecond,
                    model: None,
                    limit_value: rps,
                    retry_after: until(at, now),
                });
            }
        }

        // Concurrent requests.
        if let Some(max) = limits.concurrent_requests {
            if self.in_flight >= max {
                deny(Denial {
                    kind: DenialKind::RateLimited,
                    limit: LimitName::ConcurrentRequests,
                    model: None,
                    limit_value: max as f64,
                    retry_after: until(now_us + 1_000_000, now),
                });
            }
        }

        // Tokens per minute.
        if let Some(cap) = limits.tokens_per_minute {
            let bucket = self
                .bucket
                .get_or_insert_with(|| TokenBucket::full(cap, now_us));
            let at = bucket.available_at(cap, tokens, now_us);
            if at > now_us && tokens <= cap {
                deny(Denial {
                    kind: DenialKind::RateLimited,
                    limit: LimitName::TokensPerMinute,
                    model: None,
                    limit_value: cap as f64,
                    retry_after: until(at, now),
                });
            }
        }

        // Tokens per month.
        if let Some(cap) = limits.tokens_per_month {
            if self.month.used() + tokens > cap && tokens <= cap {
                deny(Denial {
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
            let state = self.model_state(m, now, &mut names);
            if let Some(cap) = ml.tokens_per_minute {
                let bucket = state
                    .bucket
                    .get_or_insert_with(|| Box::new(TokenBucket::full(cap, now_us)));
                let at = bucket.available_at(cap, tokens, now_us);
                if at > now_us && tokens <= cap {
                    deny(Denial {
                        kind: DenialKind::RateLimited,
                        limit: LimitName::ModelTokensPerMinute,
                        model: Some(m.to_string()),
                        limit_value: cap as f64,
                        retry_after: until(at, now),
                    });
                }
            }
            if let Some(cap) = ml.tokens_per_month {
                if state.month.used() + tokens > cap && tokens <= cap {
                    deny(Denial {
                        kind: DenialKind::QuotaExceeded,
                        limit: LimitName::ModelTokensPerMonth,
                        model: Some(m.to_string()),
                        limit_value: cap as f64,
                        retry_after: next_month.saturating_sub(now),
                    });
                }
            }
        }

        // The key's own limits.
        let key = limits.key.map(|k| (k, key_request_limit(&k.limits)));
        if let Some((k, key_requests)) = key {
            let state = self.key_state(k.id, now);
            state.limits = k.limits;
            if let Some((rps, cap, rate)) = key_requests {
                let bucket = state
                    .requests
                    .get_or_insert_with(|| RequestBucket::full(cap, rate, now_us));
                let at = bucket.admit_at(cap, now_us);
                if at > now_us {
                    deny(Denial {
                        kind: DenialKind::RateLimited,
                        limit: LimitName::KeyRequestsPerSecond,
                        model: None,
                        limit_value: rps,
                        retry_after: until(at, now),
                    });
                }
            }
            if let Some(cap) = k.limits.tokens_per_minute {
                let bucket = state
                    .bucket
                    .get_or_insert_with(|| TokenBucket::full(cap, now_us));
                let at = bucket.available_at(cap, tokens, now_us);
                if at > now_us && tokens <= cap {
                    deny(Denial {
                        kind: DenialKind::RateLimited,
                        limit: LimitName::KeyTokensPerMinute,
                        model: None,
                        limit_value: cap as f64,
                        retry_after: until(at, now),
                    });
                }
            }
            if let Some(cap) = k.limits.tokens_per_month {
                if state.month.used() + tokens > cap && tokens <= cap {
                    deny(Denial {
                        kind: DenialKind::QuotaExceeded,
                        limit: LimitName::KeyTokensPerMonth,
                        model: None,
                        limit_value: cap as f64,
                        retry_after: next_month.saturating_sub(now),
                    });
                }
            }
        }

        if let Some(worst) = worst {
            let snapshot =
                self.decision_snapshot(limits, model_limits, now, request_limit, next_month);
            return (Verdict::Deny(worst), snapshot);
        }

        // Admit: take from every limit.
        if let (Some((_, cap, rate)), Some(bucket)) = (request_limit, self.requests.as_mut()) {
            bucket.take(cap, rate, now_us);
        }
        if limits.concurrent_requests.is_some() {
            self.in_flight += 1;
        }
        self.unsettled += 1;
        if let (Some(cap), Some(bucket)) = (limits.tokens_per_minute, self.bucket.as_mut()) {
            bucket.add(cap, -(tokens as i64), now_us);
        }
        self.month.reserved += tokens;
        let held_model = match model {
            Some(m) if self.tracks(m, limits) => {
                let state = self.model_state(m, now, &mut names);
                if let (Some(cap), Some(bucket)) = (
                    model_limits.and_then(|(_, l)| l.tokens_per_minute),
                    state.bucket.as_mut(),
                ) {
                    bucket.add(cap, -(tokens as i64), now_us);
                }
                state.month.reserved += tokens;
                Some(state.name.clone())
            }
            // Not counted apart (past `MAX_TRACKED_MODELS`): a name of its own, not kept in
            // `names`, whose size follows the states only.
            Some(m) => Some(ModelName::from(m)),
            None => None,
        };
        if let Some((k, key_requests)) = key {
            let state = self.key_state(k.id, now);
            if let (Some((_, cap, rate)), Some(bucket)) = (key_requests, state.requests.as_mut()) {
                bucket.take(cap, rate, now_us);
            }
            if let (Some(cap), Some(bucket)) = (k.limits.tokens_per_minute, state.bucket.as_mut()) {
                bucket.add(cap, -(tokens as i64), now_us);
            }
            state.month.reserved += tokens;
        }
        let held = Held {
            model: held_model,
            tokens,
            month: month_now,
            slot: limits.concurrent_requests.is_some(),
            key: key.map(|(k, _)| k.id),
        };
        let snapshot = self.decision_snapshot(limits, model_limits, now, request_limit, next_month);
        (Verdict::Admit(held), snapshot)
    }

    /// Counts `n` requests as in flight that hold no reservation here: a share taken up while
    /// requests admitted elsewhere (through Redis) still run (`free_held_slot` as each ends).
    pub fn hold_slots(&mut self, n: u32) {
        self.in_flight = self.in_flight.saturating_add(n);
    }

    /// One of the requests of `hold_slots` has ended.
    pub fn free_held_slot(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
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
        let now_us = micros(now);
        let actual = actual.min(MAX_REQUEST_TOKENS);
        self.unsettled = self.unsettled.saturating_sub(1);
        let delta = held.tokens as i64 - actual as i64;
        if let (Some(cap), Some(bucket)) = (limits.tokens_per_minute, self.bucket.as_mut()) {
            bucket.add(cap, delta, now_us);
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
        if let Some(i) = held.key.and_then(|id| self.key_index(id)) {
            let state = &mut self.keys.as_mut().expect("a key state")[i];
            // The key's limit now, else the one its bucket was last computed with.
            let cap = limits
                .key
                .filter(|k| k.id == state.id)
                .map_or(state.limits.tokens_per_minute, |k| {
                    k.limits.tokens_per_minute
                });
            if let (Some(cap), Some(bucket)) = (cap, state.bucket.as_mut()) {
                bucket.add(cap, delta, now_us);
            }
            if state.month.month == held.month {
                state.month.reserved = state.month.reserved.saturating_sub(held.tokens);
            }
            if state.month.month == current {
                state.month.settled += actual;
            }
        }
        if let Some(m) = held.model.as_deref().filter(|m| self.tracks(m, limits)) {
            let cap = match limits.models.is_empty() {
                true => None,
                false => limits.models.get(m).and_then(|l| l.tokens_per_minute),
            };
            let state = match self.model_index(m) {
                Ok(i) => &mut self.models[i],
                // Counted from now on (the name is the reservation's own).
                Err(_) => {
                    let month = MonthCounter::starting(current, 0);
                    let name = held.model.clone().expect("a model");
                    let i = self.insert_model(name, month);
                    &mut self.models[i]
                }
            };
            if let (Some(cap), Some(bucket)) = (cap, state.bucket.as_mut()) {
                bucket.add(cap, delta, now_us);
            }
            let month = &mut state.month;
            if month.month == held.month {
                month.reserved = month.reserved.saturating_sub(held.tokens);
            }
            if month.month == current {
                month.settled += actual;
            }
        }
    }

    pub fn snapshot(&self, limits: &Limits, now: Nanos) -> Snapshot {
        self.snapshot_at(limits, now, request_limit(limits), month_span(now).1)
    }

    /// `snapshot`, with what the decision has computed already.
    fn snapshot_at(
        &self,
        limits: &Limits,
        now: Nanos,
        request_limit: Option<(f64, i64, i64)>,
        next_month: Nanos,
    ) -> Snapshot {
        windows(
            self.requests.as_ref(),
            request_limit,
            self.bucket.as_ref(),
            limits.tokens_per_minute,
            limits.tokens_per_month,
            self.month.used(),
            now,
            next_month,
        )
    }

    /// The windows a decision answers with: the workspace's, each replaced by the key's (when
    /// it has limits of its own) and by the request's model's (when it has limits of its own)
    /// where that has less remaining, so that a client pacing itself by the headers sees the
    /// limit that binds it.
    fn decision_snapshot(
        &self,
        limits: &Limits,
        model: Option<(&str, &ModelLimits)>,
        now: Nanos,
        request_limit: Option<(f64, i64, i64)>,
        next_month: Nanos,
    ) -> Snapshot {
        let mut snapshot = self.snapshot_at(limits, now, request_limit, next_month);
        if let Some(k) = limits.key {
            snapshot = snapshot.tighter(key_snapshot(self.key(k.id), &k.limits, now, next_month));
        }
        if let Some((m, l)) = model {
            let tpm = l.tokens_per_minute.filter(|&c| c > 0);
            let month = l.tokens_per_month.filter(|&c| c > 0);
            if tpm.is_some() || month.is_some() {
                let state = self.model_index(m).ok().map(|i| &self.models[i]);
                snapshot = snapshot.tighter(windows(
                    None,
                    None,
                    state.and_then(|s| s.bucket.as_deref()),
                    tpm,
                    month,
                    state.map_or(0, |s| s.month.used()),
                    now,
                    next_month,
                ));
            }
        }
        snapshot
    }

    /// What the key `id`'s month counter started from, once it is tracked.
    pub fn key_month_seed(&self, id: KeyId) -> Option<u64> {
        self.key(id).map(|k| k.month.seed)
    }

    /// What the month counters started from: the workspace's, and each model's.
    pub fn month_seeds(&self) -> (u64, HashMap<String, u64>) {
        let models = self
            .models
            .iter()
            .map(|m| (m.name.to_string(), m.month.seed))
            .collect();
        (self.month.seed, models)
    }

    pub fn usage(&self, limits: &Limits, now: Nanos) -> Usage {
        Usage {
            snapshot: self.snapshot(limits, now),
            bucket_tokens: limits.tokens_per_minute.map(|cap| match &self.bucket {
                Some(b) => b.balance(cap, micros(now)),
                None => cap as i64,
            }),
            month_settled_tokens: self.month.settled,
            month_reserved_tokens: self.month.reserved,
            in_flight: self.in_flight,
            models: self.model_usage(limits, now),
            key: limits
                .key
                .map(|k| key_snapshot(self.key(k.id), &k.limits, now, month_span(now).1)),
        }
    }

    /// Each model with limits of its own, as `usage` shows it.
    fn model_usage(&self, limits: &Limits, now: Nanos) -> Vec<ModelUsage> {
        let next_month = month_span(now).1;
        limits
            .models
            .iter()
            .map(|(name, l)| {
                let state = self.models.iter().find(|m| &*m.name == name.as_str());
                let used = state.map_or(0, |m| m.month.used());
                ModelUsage {
                    model: name.clone(),
                    month_used: used,
                    tokens: l
                        .tokens_per_minute
                        .map(|cap| token_window(state.and_then(|m| m.bucket.as_deref()), cap, now)),
                    month: l.tokens_per_month.map(|cap| Window {
                        limit: cap as f64,
                        remaining: cap.saturating_sub(used),
                        reset: next_month.saturating_sub(now),
                    }),
                }
            })
            .collect()
    }
}
