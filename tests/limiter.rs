//! The limiter through its public API: the pure core (`WorkspaceState`) driven by an injected
//! clock, and `LocalLimiter` over a test ledger. Every limit is checked under and over its bound,
//! then all together: a denial takes nothing, the most important cause is the one reported, and
//! waiting exactly `retry_after` is enough (and one nanosecond less is not).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use time::macros::datetime;
use time::OffsetDateTime;

use tiergate::limiter::core::WorkspaceState;
use tiergate::limiter::local::LocalLimiter;
use tiergate::limiter::{
    Decision, Denial, DenialKind, Held, LimitName, Limiter, LimiterError, MonthKey, MonthSource,
    MonthTotals, Nanos, Reservation, Snapshot, TokenCost, Verdict, Window, NANOS_PER_SEC,
};
use tiergate::model::{Limits, ModelLimits, WorkspaceId};

use DenialKind::{QuotaExceeded, RateLimited, RequestTooLarge};
use LimitName::{
    ConcurrentRequests, KeyRequestsPerSecond, KeyTokensPerMinute, KeyTokensPerMonth,
    ModelTokensPerMinute, ModelTokensPerMonth, RequestsPerSecond, TokensPerMinute, TokensPerMonth,
};

const MS: Nanos = NANOS_PER_SEC / 1_000;
const SEC: Nanos = NANOS_PER_SEC;
const HOUR: Nanos = 3_600 * SEC;
const DAY: Nanos = 24 * HOUR;

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

fn ns(t: OffsetDateTime) -> Nanos {
    t.unix_timestamp_nanos() as Nanos
}

/// A quiet instant in the middle of a month: 2024-03-10 12:00 UTC.
fn t0() -> Nanos {
    ns(datetime!(2024-03-10 12:00 UTC))
}

/// From `t0()` to the first instant of April 2024.
const T0_TO_APRIL: Nanos = 21 * DAY + 12 * HOUR;

fn limits() -> Limits {
    Limits::default()
}

/// Builds limits in one readable line: `limits().rps(1.0).tpm(600)`.
trait LimitsExt {
    fn rps(self, rps: f64) -> Self;
    fn burst(self, burst: u32) -> Self;
    fn tpm(self, capacity: u64) -> Self;
    fn month(self, cap: u64) -> Self;
    fn concurrent(self, max: u32) -> Self;
    fn model(self, name: &str, tpm: Option<u64>, month: Option<u64>) -> Self;
}

impl LimitsExt for Limits {
    fn rps(mut self, rps: f64) -> Self {
        self.requests_per_second = Some(rps);
        self
    }
    fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }
    fn tpm(mut self, capacity: u64) -> Self {
        self.tokens_per_minute = Some(capacity);
        self
    }
    fn month(mut self, cap: u64) -> Self {
        self.tokens_per_month = Some(cap);
        self
    }
    fn concurrent(mut self, max: u32) -> Self {
        self.concurrent_requests = Some(max);
        self
    }
    fn model(mut self, name: &str, tpm: Option<u64>, month: Option<u64>) -> Self {
        let model = ModelLimits {
            tokens_per_minute: tpm,
            tokens_per_month: month,
        };
        self.models.insert(name.to_string(), model);
        self
    }
}

/// The same limits with one of them removed.
fn without(limits: &Limits, name: LimitName, model: Option<&str>) -> Limits {
    fn model_limits<'a>(l: &'a mut Limits, model: Option<&str>) -> &'a mut ModelLimits {
        let model = model.expect("a per-model limit names its model");
        l.models.get_mut(model).expect("the model has limits")
    }
    let mut l = limits.clone();
    match name {
        RequestsPerSecond => l.requests_per_second = None,
        TokensPerMinute => l.tokens_per_minute = None,
        TokensPerMonth => l.tokens_per_month = None,
        ConcurrentRequests => l.concurrent_requests = None,
        ModelTokensPerMinute => model_limits(&mut l, model).tokens_per_minute = None,
        ModelTokensPerMonth => model_limits(&mut l, model).tokens_per_month = None,
        KeyRequestsPerSecond => key_limits(&mut l).requests_per_second = None,
        KeyTokensPerMinute => key_limits(&mut l).tokens_per_minute = None,
        KeyTokensPerMonth => key_limits(&mut l).tokens_per_month = None,
    }
    l
}

fn key_limits(l: &mut Limits) -> &mut tiergate::model::KeyLimits {
    &mut l.key.as_mut().expect("the key has limits").limits
}

/// A request whose prompt is the whole estimate.
fn tokens(n: u64) -> TokenCost {
    TokenCost {
        prompt: n,
        estimate: n,
    }
}

fn estimate(prompt: u64, estimate: u64) -> TokenCost {
    TokenCost { prompt, estimate }
}

/// The ledger's totals for the month of `now`.
fn totals(now: Nanos, tokens: u64, by_model: &[(&str, u64)]) -> MonthTotals {
    MonthTotals {
        month: Some(MonthKey::of(now)),
        tokens,
        requests: 0,
        by_model: by_model.iter().map(|(m, t)| (m.to_string(), *t)).collect(),
        by_key: Default::default(),
    }
}

fn fresh(now: Nanos) -> WorkspaceState {
    WorkspaceState::new(now, &MonthTotals::default())
}

#[track_caller]
fn admit(
    state: &mut WorkspaceState,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: Nanos,
) -> Held {
    match state.reserve(limits, model, cost, now).0 {
        Verdict::Admit(held) => held,
        Verdict::Deny(denial) => panic!("expected an admission at {now}, got {denial:?}"),
    }
}

#[track_caller]
fn deny(
    state: &mut WorkspaceState,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: Nanos,
) -> Denial {
    match state.reserve(limits, model, cost, now).0 {
        Verdict::Deny(denial) => denial,
        Verdict::Admit(held) => panic!("expected a denial at {now}, got {held:?}"),
    }
}

/// Admits and settles at once to the reserved amount.
#[track_caller]
fn spend(state: &mut WorkspaceState, limits: &Limits, model: Option<&str>, n: u64, now: Nanos) {
    let held = admit(state, limits, model, tokens(n), now);
    state.settle(limits, &held, held.tokens, now);
}

/// What `state` would answer at `at`, without changing it.
fn verdict_at(
    state: &WorkspaceState,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    at: Nanos,
) -> Verdict {
    state.clone().reserve(limits, model, cost, at).0
}

/// "Waiting Retry-After and retrying must succeed when nothing else is using the workspace",
/// and the wait is not longer than needed.
fn retry_is_exact(
    state: &WorkspaceState,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: Nanos,
    wait: Nanos,
) -> bool {
    wait > 0
        && matches!(
            verdict_at(state, limits, model, cost, now + wait - 1),
            Verdict::Deny(_)
        )
        && matches!(
            verdict_at(state, limits, model, cost, now + wait),
            Verdict::Admit(_)
        )
}

#[track_caller]
fn assert_retry_is_exact(
    state: &WorkspaceState,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: Nanos,
    wait: Nanos,
) {
    assert!(
        retry_is_exact(state, limits, model, cost, now, wait),
        "retry_after {wait}ns is not exact: denied at {}: {:?}, admitted at +wait: {:?}",
        now + wait - 1,
        verdict_at(state, limits, model, cost, now + wait - 1),
        verdict_at(state, limits, model, cost, now + wait),
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Requests per second (GCRA)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Admit,
    Wait(Nanos),
}
use Expect::{Admit, Wait};

/// Sends one token-free request per step at `t0 + offset`; a `Wait` is also checked to be exact.
#[track_caller]
fn check_requests(limits: Limits, steps: &[(Nanos, Expect)]) {
    let start = t0();
    let rps = limits.requests_per_second.expect("a requests/s limit");
    let mut state = fresh(start);
    for (i, &(offset, want)) in steps.iter().enumerate() {
        let now = start + offset;
        let got = match state.reserve(&limits, None, tokens(0), now).0 {
            Verdict::Admit(_) => Admit,
            Verdict::Deny(d) => {
                assert_eq!(
                    (d.kind, d.limit, d.limit_value, d.model),
                    (RateLimited, RequestsPerSecond, rps, None),
                    "step {i}"
                );
                Wait(d.retry_after)
            }
        };
        assert_eq!(got, want, "step {i} at +{offset}ns");
        if let Wait(wait) = got {
            assert_retry_is_exact(&state, &limits, None, tokens(0), now, wait);
        }
    }
}

#[test]
fn requests_per_second_one_with_default_burst() {
    check_requests(
        limits().rps(1.0),
        &[
            (0, Admit),
            (500 * MS, Wait(500 * MS)),
            (SEC, Admit),
            (SEC, Wait(SEC)),
            // Idle time does not pile up beyond the burst of 1.
            (60 * SEC, Admit),
            (60 * SEC, Wait(SEC)),
        ],
    );
}

#[test]
fn requests_per_second_ten_with_default_burst_of_ten() {
    let mut steps = vec![(0, Admit); 10];
    steps.extend([
        (0, Wait(100 * MS)),
        (40 * MS, Wait(60 * MS)),
        (100 * MS, Admit),
        (100 * MS, Wait(100 * MS)),
    ]);
    // After a long pause the burst is back, but only the burst.
    steps.extend(vec![(60 * SEC, Admit); 10]);
    steps.push((60 * SEC, Wait(100 * MS)));
    check_requests(limits().rps(10.0), &steps);
}

#[test]
fn requests_per_second_fractional_rounds_the_default_burst_up() {
    // 2.5/s: one request every 400 ms, burst ceil(2.5) = 3.
    check_requests(
        limits().rps(2.5),
        &[
            (0, Admit),
            (0, Admit),
            (0, Admit),
            (0, Wait(400 * MS)),
            (400 * MS, Admit),
            (400 * MS, Wait(400 * MS)),
        ],
    );
}

#[test]
fn requests_per_second_with_explicit_burst() {
    check_requests(
        limits().rps(1.0).burst(3),
        &[
            (0, Admit),
            (0, Admit),
            (0, Admit),
            (0, Wait(SEC)),
            (SEC, Admit),
            (SEC, Wait(SEC)),
            (2_500 * MS, Admit),
            (2_500 * MS, Wait(500 * MS)),
        ],
    );
    // A burst below the rate still spaces requests by the emission interval.
    check_requests(
        limits().rps(10.0).burst(2),
        &[
            (0, Admit),
            (0, Admit),
            (0, Wait(100 * MS)),
            (100 * MS, Admit),
            (100 * MS, Wait(100 * MS)),
        ],
    );
}

#[test]
fn requests_per_second_fractional() {
    // 0.5/s: one request every 2 s, burst max(1, ceil(0.5)) = 1.
    check_requests(
        limits().rps(0.5),
        &[
            (0, Admit),
            (SEC, Wait(SEC)),
            (2 * SEC - 1, Wait(1)),
            (2 * SEC, Admit),
            (3 * SEC, Wait(SEC)),
            (4 * SEC, Admit),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Tokens per minute (continuously refilled bucket)
// ---------------------------------------------------------------------------------------------

#[test]
fn tokens_per_minute_admits_capacity_then_waits_for_one_token() {
    // (capacity C, time to refill one token = 60 s / C, rounded up to the millisecond: the
    // bucket is credited per whole millisecond)
    let table: &[(u64, Nanos)] = &[
        (1, 60 * SEC),
        (7, 8_572 * MS),
        (60, SEC),
        (600, 100 * MS),
        (1_000, 60 * MS),
        (1_000_000, MS),
    ];
    for &(capacity, one_token) in table {
        let l = limits().tpm(capacity);
        let now = t0();
        let mut s = fresh(now);
        // Under: C - 1, then the last token.
        assert_eq!(
            admit(&mut s, &l, None, tokens(capacity - 1), now).tokens,
            capacity - 1
        );
        assert_eq!(admit(&mut s, &l, None, tokens(1), now).tokens, 1);
        // Over: one more token.
        let d = deny(&mut s, &l, None, tokens(1), now);
        assert_eq!(
            (d.kind, d.limit, d.limit_value, d.retry_after),
            (RateLimited, TokensPerMinute, capacity as f64, one_token),
            "capacity {capacity}"
        );
        assert_retry_is_exact(&s, &l, None, tokens(1), now, one_token);
    }
}

#[test]
fn tokens_refill_continuously_without_minute_boundaries() {
    let l = limits().tpm(600); // 10 tokens/s
    let start = t0();
    let mut s = fresh(start);
    admit(&mut s, &l, None, tokens(600), start);
    // (time after draining, tokens available then)
    let table: &[(Nanos, u64)] = &[
        (0, 0),
        (100 * MS - 1, 0),
        (100 * MS, 1),
        (10 * SEC, 100),
        (30 * SEC, 300),
        (59 * SEC, 590),
        (60 * SEC, 600),
        (HOUR, 600),
    ];
    for &(offset, available) in table {
        let now = start + offset;
        let window = s.snapshot(&l, now).tokens.unwrap();
        assert_eq!(window.remaining, available, "at +{offset}");
        assert!(
            matches!(
                verdict_at(&s, &l, None, tokens(available), now),
                Verdict::Admit(_)
            ),
            "{available} tokens at +{offset}"
        );
        if available < 600 {
            assert!(
                matches!(
                    verdict_at(&s, &l, None, tokens(available + 1), now),
                    Verdict::Deny(_)
                ),
                "{} tokens at +{offset}",
                available + 1
            );
        }
    }
    // Draining again half-way gives nothing back at the next "minute": still 10 tokens/s.
    admit(&mut s, &l, None, tokens(300), start + 30 * SEC);
    deny(&mut s, &l, None, tokens(1), start + 30 * SEC);
    assert_eq!(
        s.snapshot(&l, start + 60 * SEC).tokens.unwrap().remaining,
        300
    );
    deny(&mut s, &l, None, tokens(301), start + 60 * SEC);
}

#[test]
fn settling_refunds_or_puts_the_bucket_in_debt() {
    // Capacity 600 (10 tokens/s); reserved at t, settled at t + after.
    // (reserved, after, actual, balance then, wait then for one more token)
    #[rustfmt::skip]
    let table: &[(u64, Nanos, u64, i64, Nanos)] = &[
        (300, 0, 300, 300, 0),
        (300, 0, 100, 500, 0),
        (300, 0, 0, 600, 0),
        (600, 0, 0, 600, 0),
        (600, 0, 600, 0, 100 * MS),
        (300, 0, 900, -300, 30_100 * MS),
        (600, 0, 1_200, -600, 60_100 * MS),
        // Debt is floored at one minute's worth.
        (100, 0, 5_000, -600, 60_100 * MS),
        // Refunds never fill the bucket beyond its capacity.
        (300, 15 * SEC, 100, 600, 0),
        (300, 30 * SEC, 0, 600, 0),
        // Debt is charged against what has refilled meanwhile.
        (600, 30 * SEC, 900, 0, 100 * MS),
    ];
    let l = limits().tpm(600);
    for &(reserved, after, actual, balance, wait) in table {
        let case = format!("reserved {reserved}, settled {actual} after {after}ns");
        let mut s = fresh(t0());
        let held = admit(&mut s, &l, None, tokens(reserved), t0());
        let now = t0() + after;
        s.settle(&l, &held, actual, now);
        let usage = s.usage(&l, now);
        assert_eq!(usage.bucket_tokens, Some(balance), "{case}");
        let window = usage.snapshot.tokens.unwrap();
        assert_eq!(window.remaining, balance.max(0) as u64, "{case}");
        assert_eq!(window.reset, (600 - balance) as u64 * 100 * MS, "{case}");
        if wait == 0 {
            admit(&mut s.clone(), &l, None, tokens(balance as u64), now);
        } else {
            let d = deny(&mut s, &l, None, tokens(1), now);
            assert_eq!((d.limit, d.retry_after), (TokensPerMinute, wait), "{case}");
            assert_retry_is_exact(&s, &l, None, tokens(1), now, wait);
        }
        if balance < 600 {
            deny(&mut s, &l, None, tokens(balance.max(0) as u64 + 1), now);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Tokens per month (calendar month, UTC)
// ---------------------------------------------------------------------------------------------

#[test]
fn tokens_per_month_quota_until_the_next_month() {
    // (now, cap, used per the ledger, cost, None = admitted / Some(time to the next month))
    #[rustfmt::skip]
    let table: &[(OffsetDateTime, u64, u64, u64, Option<Nanos>)] = &[
        (datetime!(2024-03-10 12:00 UTC), 1_000, 0, 1_000, None),
        (datetime!(2024-03-10 12:00 UTC), 1_000, 900, 100, None),
        (datetime!(2024-03-10 12:00 UTC), 1_000, 900, 101, Some(T0_TO_APRIL)),
        (datetime!(2024-03-10 12:00 UTC), 1_000, 1_000, 1, Some(T0_TO_APRIL)),
        // Leap year: February 2024 has 29 days.
        (datetime!(2024-02-28 00:00 UTC), 10, 10, 1, Some(2 * DAY)),
        (datetime!(2023-02-28 00:00 UTC), 10, 10, 1, Some(DAY)),
        // Across the year.
        (datetime!(2024-12-31 23:59:59.25 UTC), 10, 10, 1, Some(750 * MS)),
    ];
    for &(when, cap, used, cost, want) in table {
        let case = format!("{when}: cap {cap}, used {used}, cost {cost}");
        let now = ns(when);
        let l = limits().month(cap);
        let mut s = WorkspaceState::new(now, &totals(now, used, &[]));
        match want {
            None => {
                admit(&mut s, &l, None, tokens(cost), now);
                let u = s.usage(&l, now);
                assert_eq!(
                    (u.month_settled_tokens, u.month_reserved_tokens),
                    (used, cost)
                );
            }
            Some(wait) => {
                let before = s.usage(&l, now);
                let d = deny(&mut s, &l, None, tokens(cost), now);
                assert_eq!(
                    (d.kind, d.limit, d.limit_value, d.retry_after),
                    (QuotaExceeded, TokensPerMonth, cap as f64, wait),
                    "{case}"
                );
                assert_eq!(s.usage(&l, now), before, "{case}");
                // Still this month one nanosecond before; the next month is a fresh start.
                assert!(!s.month_is_stale(now + wait - 1), "{case}");
                deny(&mut s, &l, None, tokens(cost), now + wait - 1);
                assert!(s.month_is_stale(now + wait), "{case}");
                s.roll_month(now + wait, &MonthTotals::default());
                admit(&mut s, &l, None, tokens(cost), now + wait);
            }
        }
    }
}

#[test]
fn month_totals_seed_only_their_own_month() {
    let now = t0();
    let l = limits().month(1_000).model("m", None, Some(100));
    // (ledger totals given to `new`, settled tokens the state starts from)
    let table = [
        (totals(now, 700, &[("m", 60)]), 700),
        (MonthTotals::default(), 0),
        (
            MonthTotals {
                month: Some(MonthKey(MonthKey::of(now).0 - 1)),
                tokens: 700,
                ..MonthTotals::default()
            },
            0,
        ),
    ];
    for (ledger, settled) in table {
        let mut s = WorkspaceState::new(now, &ledger);
        let u = s.usage(&l, now);
        assert_eq!(
            (u.month_settled_tokens, u.month_reserved_tokens),
            (settled, 0)
        );
        assert_eq!(u.snapshot.month.unwrap().remaining, 1_000 - settled);
        admit(&mut s, &l, None, tokens(1_000 - settled), now);
        deny(&mut s, &l, None, tokens(1), now);
    }
    // Per-model totals seed per-model counters.
    let mut s = WorkspaceState::new(now, &totals(now, 60, &[("m", 60)]));
    admit(&mut s, &l, Some("m"), tokens(40), now);
    let d = deny(&mut s, &l, Some("m"), tokens(1), now);
    assert_eq!((d.kind, d.limit), (QuotaExceeded, ModelTokensPerMonth));
}

#[test]
fn month_rollover_resets_and_reseeds_counters() {
    let jan = ns(datetime!(2024-01-31 23:00 UTC));
    let feb = ns(datetime!(2024-02-01 00:00 UTC));
    let l = limits().month(1_000).model("m", None, Some(500));
    let mut s = WorkspaceState::new(jan, &totals(jan, 800, &[("m", 400)]));
    admit(&mut s, &l, Some("m"), tokens(100), jan);
    let d = deny(&mut s, &l, Some("m"), tokens(1), jan);
    assert_eq!((d.kind, d.limit), (QuotaExceeded, ModelTokensPerMonth));
    assert_eq!(d.retry_after, HOUR);
    assert!(!s.month_is_stale(feb - 1));
    assert!(s.month_is_stale(feb));

    // Totals of the wrong month seed nothing.
    let mut unseeded = s.clone();
    unseeded.roll_month(feb, &totals(jan, 800, &[("m", 400)]));
    let u = unseeded.usage(&l, feb);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (0, 0));

    // February starts from February's ledger; January's reservation is dropped.
    s.roll_month(feb, &totals(feb, 300, &[("m", 450)]));
    assert!(!s.month_is_stale(feb));
    let u = s.usage(&l, feb);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (300, 0));
    assert_eq!(u.snapshot.month.unwrap().remaining, 700);
    admit(&mut s, &l, Some("m"), tokens(50), feb);
    let d = deny(&mut s, &l, Some("m"), tokens(1), feb);
    assert_eq!(
        (d.limit, d.model.as_deref()),
        (ModelTokensPerMonth, Some("m"))
    );
    admit(&mut s, &l, None, tokens(650), feb);
    let d = deny(&mut s, &l, None, tokens(1), feb);
    assert_eq!((d.limit, d.retry_after), (TokensPerMonth, 29 * DAY));

    // Rolling again within the month changes nothing.
    let before = s.usage(&l, feb + SEC);
    s.roll_month(feb + SEC, &totals(feb, 0, &[]));
    assert_eq!(s.usage(&l, feb + SEC), before);
}

/// `new` seeds a counter for every model in the ledger's totals; `roll_month` must do the same,
/// or a model the state has not seen yet starts the month from 0 whatever the ledger says.
#[test]
fn roll_month_seeds_models_the_state_has_not_seen() {
    let jan = ns(datetime!(2024-01-20 12:00 UTC));
    let feb = ns(datetime!(2024-02-01 00:00:01 UTC));
    let l = limits().model("m", None, Some(1_000));
    // Active in January, never with "m".
    let mut rolled = WorkspaceState::new(jan, &totals(jan, 0, &[]));
    admit(&mut rolled, &l, None, tokens(10), jan);
    // February's ledger already holds 900 tokens of "m" (settled elsewhere).
    let ledger = totals(feb, 900, &[("m", 900)]);
    rolled.roll_month(feb, &ledger);

    let mut seeded = WorkspaceState::new(feb, &ledger);
    let want = deny(&mut seeded, &l, Some("m"), tokens(200), feb);
    assert_eq!(
        (want.kind, want.limit),
        (QuotaExceeded, ModelTokensPerMonth)
    );
    assert_eq!(
        rolled.reserve(&l, Some("m"), tokens(200), feb).0,
        Verdict::Deny(want),
        "roll_month ignored February's ledger total for model \"m\""
    );
}

#[test]
fn settlement_counts_in_the_month_it_is_settled() {
    let jan = ns(datetime!(2024-01-31 23:59:30 UTC));
    let feb = ns(datetime!(2024-02-01 00:00:30 UTC));
    let l = limits().month(1_000).model("m", None, Some(1_000));
    let mut s = WorkspaceState::new(jan, &totals(jan, 0, &[]));
    let jan_held = admit(&mut s, &l, Some("m"), tokens(100), jan);
    assert_eq!(jan_held.month, MonthKey::of(jan));

    // Settled in January: the settlement replaces the reservation.
    let mut in_jan = s.clone();
    in_jan.settle(&l, &jan_held, 120, jan + SEC);
    let u = in_jan.usage(&l, jan + SEC);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (120, 0));

    // Settled in February: it counts in February, and February's own reservation stays held.
    s.roll_month(feb, &totals(feb, 0, &[]));
    let feb_held = admit(&mut s, &l, Some("m"), tokens(30), feb);
    s.settle(&l, &jan_held, 120, feb + SEC);
    let u = s.usage(&l, feb + SEC);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (120, 30));
    s.settle(&l, &feb_held, 30, feb + 2 * SEC);
    let u = s.usage(&l, feb + 2 * SEC);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (150, 0));
    // The per-model counter agrees: 1_000 - 150 left for "m".
    admit(&mut s, &l, Some("m"), tokens(850), feb + 3 * SEC);
    let d = deny(&mut s, &l, Some("m"), tokens(1), feb + 3 * SEC);
    assert_eq!(d.kind, QuotaExceeded);
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrent requests
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_requests() {
    let l = limits().concurrent(2);
    let now = t0();
    let mut s = fresh(now);
    let first = admit(&mut s, &l, None, tokens(1), now);
    let second = admit(&mut s, &l, None, tokens(1), now);
    assert!(first.slot && second.slot);
    assert_eq!(s.usage(&l, now).in_flight, 2);
    let d = deny(&mut s, &l, None, tokens(1), now);
    assert_eq!(
        (d.kind, d.limit, d.limit_value, d.retry_after),
        (RateLimited, ConcurrentRequests, 2.0, SEC)
    );
    // Time alone frees nothing.
    deny(&mut s, &l, None, tokens(1), now + HOUR);
    s.settle(&l, &first, 1, now + HOUR);
    assert_eq!(s.usage(&l, now + HOUR).in_flight, 1);
    admit(&mut s, &l, None, tokens(1), now + HOUR);
    deny(&mut s, &l, None, tokens(1), now + HOUR);

    // Without the limit, no slot is held.
    let mut unlimited = fresh(now);
    let held = admit(&mut unlimited, &limits(), None, tokens(1), now);
    assert!(!held.slot);
    assert_eq!(unlimited.usage(&limits(), now).in_flight, 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Per-model limits
// ---------------------------------------------------------------------------------------------

#[test]
fn per_model_tokens_per_minute_limit_only_that_model() {
    let l = limits().tpm(10_000).model("m", Some(600), None);
    let now = t0();
    let mut s = fresh(now);
    admit(&mut s, &l, Some("m"), tokens(600), now);
    let d = deny(&mut s, &l, Some("m"), tokens(1), now);
    assert_eq!(
        (
            d.kind,
            d.limit,
            d.model.as_deref(),
            d.limit_value,
            d.retry_after
        ),
        (
            RateLimited,
            ModelTokensPerMinute,
            Some("m"),
            600.0,
            100 * MS
        )
    );
    assert_retry_is_exact(&s, &l, Some("m"), tokens(1), now, 100 * MS);
    // Other models and model-less requests only meet the workspace limit.
    assert_eq!(
        admit(&mut s, &l, Some("other"), tokens(5_000), now).tokens,
        5_000
    );
    assert_eq!(admit(&mut s, &l, None, tokens(4_400), now).tokens, 4_400);
    assert_eq!(s.usage(&l, now).bucket_tokens, Some(0));
    let d = deny(&mut s, &l, Some("other"), tokens(1), now);
    assert_eq!((d.limit, d.model), (TokensPerMinute, None));
}

#[test]
fn per_model_tokens_per_month_limit_only_that_model() {
    let l = limits().month(100_000).model("m", None, Some(1_000));
    let now = t0();
    let mut s = WorkspaceState::new(now, &totals(now, 5_000, &[("m", 900)]));
    admit(&mut s, &l, Some("m"), tokens(100), now);
    let d = deny(&mut s, &l, Some("m"), tokens(1), now);
    assert_eq!(
        (
            d.kind,
            d.limit,
            d.model.as_deref(),
            d.limit_value,
            d.retry_after
        ),
        (
            QuotaExceeded,
            ModelTokensPerMonth,
            Some("m"),
            1_000.0,
            T0_TO_APRIL
        )
    );
    admit(&mut s, &l, Some("other"), tokens(50_000), now);
    admit(&mut s, &l, None, tokens(44_900), now);
    let d = deny(&mut s, &l, None, tokens(1), now);
    assert_eq!((d.limit, d.model), (TokensPerMonth, None));
}

// ---------------------------------------------------------------------------------------------
// 6. Requests that can never fit, and estimates clamped to capacity
// ---------------------------------------------------------------------------------------------

#[test]
fn a_prompt_above_a_capacity_can_never_fit() {
    let model_minute = limits().tpm(1_000).model("m", Some(100), None);
    // (limits, model, cost, the limit it exceeds, its value)
    #[rustfmt::skip]
    let table: Vec<(Limits, Option<&str>, TokenCost, LimitName, f64)> = vec![
        (limits().tpm(1_000), None, tokens(1_001), TokensPerMinute, 1_000.0),
        (limits().tpm(1_000), None, estimate(1_001, 10), TokensPerMinute, 1_000.0),
        (limits().tpm(1_000).month(500), None, tokens(501), TokensPerMonth, 500.0),
        (model_minute, Some("m"), estimate(101, 300), ModelTokensPerMinute, 100.0),
        (limits().model("m", None, Some(50)), Some("m"), tokens(51), ModelTokensPerMonth, 50.0),
    ];
    for (l, model, cost, limit, value) in table {
        let now = t0();
        let mut s = fresh(now);
        let before = s.usage(&l, now);
        let d = deny(&mut s, &l, model, cost, now);
        assert_eq!(
            (
                d.kind,
                d.limit,
                d.model.as_deref(),
                d.limit_value,
                d.retry_after
            ),
            (RequestTooLarge, limit, model, value, 0),
            "{cost:?} under {l:?}"
        );
        assert_eq!(s.usage(&l, now), before);
        // Waiting does not help.
        deny(&mut s, &l, model, cost, now + 30 * DAY);
    }
}

#[test]
fn an_estimate_above_capacity_is_clamped_when_the_prompt_fits() {
    let model_minute = limits().tpm(1_000).model("m", Some(300), None);
    // (limits, model, cost, tokens held)
    #[rustfmt::skip]
    let table: Vec<(Limits, Option<&str>, TokenCost, u64)> = vec![
        (limits().tpm(1_000), None, estimate(800, 5_000), 1_000),
        (limits().tpm(1_000), None, estimate(1_000, 5_000), 1_000),
        (limits().tpm(1_000), None, estimate(300, 100), 300),
        (limits().tpm(1_000).month(700), None, estimate(100, 5_000), 700),
        (model_minute.clone(), Some("m"), estimate(200, 5_000), 300),
        (model_minute, Some("other"), estimate(200, 5_000), 1_000),
        (limits(), None, estimate(200, 5_000), 5_000),
    ];
    for (l, model, cost, held) in table {
        let now = t0();
        let mut s = fresh(now);
        let h = admit(&mut s, &l, model, cost, now);
        assert_eq!(h.tokens, held, "{cost:?} under {l:?}");
        let u = s.usage(&l, now);
        assert_eq!(u.month_reserved_tokens, held);
        if let Some(capacity) = l.tokens_per_minute {
            assert_eq!(u.bucket_tokens, Some((capacity - held) as i64));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Atomicity: a denial takes nothing from any limit
// ---------------------------------------------------------------------------------------------

fn all_limits() -> Limits {
    limits()
        .rps(1.0)
        .burst(2)
        .tpm(600)
        .month(10_000)
        .concurrent(2)
        .model("m", Some(200), Some(1_000))
}

struct OneLimitDenies {
    name: &'static str,
    /// Brings a state under `all_limits()` to where `cost` is denied at `now` by one limit only.
    setup: fn(&mut WorkspaceState, &Limits, Nanos),
    model: Option<&'static str>,
    cost: TokenCost,
    denied_by: LimitName,
}

/// Later requests, each settled to its reservation, probing every dimension.
const PROBES: &[(Nanos, Option<&str>, u64)] = &[
    (0, None, 1),
    (0, Some("m"), 5),
    (0, None, 20),
    (500 * MS, Some("m"), 100),
    (SEC, None, 300),
    (2 * SEC, Some("m"), 150),
    (2 * SEC, None, 5),
    (30 * SEC, None, 600),
    (61 * SEC, Some("m"), 200),
    (62 * SEC, None, 9_000),
];

/// `a` and `b` give the same answers now and to the same later requests.
#[track_caller]
fn assert_same_future(a: &WorkspaceState, b: &WorkspaceState, l: &Limits, now: Nanos, case: &str) {
    let (mut a, mut b) = (a.clone(), b.clone());
    assert_eq!(a.usage(l, now), b.usage(l, now), "{case}: usage");
    for &(offset, model, n) in PROBES {
        let at = now + offset;
        let (va, sa) = a.reserve(l, model, tokens(n), at);
        let (vb, sb) = b.reserve(l, model, tokens(n), at);
        assert_eq!(
            (&va, &sa),
            (&vb, &sb),
            "{case}: probe {model:?} {n} at +{offset}"
        );
        if let Verdict::Admit(held) = va {
            a.settle(l, &held, held.tokens, at);
            b.settle(l, &held, held.tokens, at);
        }
    }
    assert_eq!(
        a.usage(l, now + HOUR),
        b.usage(l, now + HOUR),
        "{case}: usage after"
    );
}

#[test]
fn a_denial_consumes_nothing_in_any_dimension() {
    let cases = [
        OneLimitDenies {
            name: "requests/s denies, tokens would admit",
            setup: |s, l, now| {
                spend(s, l, None, 1, now);
                spend(s, l, None, 1, now);
            },
            model: None,
            cost: tokens(10),
            denied_by: RequestsPerSecond,
        },
        OneLimitDenies {
            name: "tokens/minute denies, requests/s would admit",
            setup: |s, l, now| spend(s, l, None, 590, now - 2 * SEC),
            model: None,
            cost: tokens(100),
            denied_by: TokensPerMinute,
        },
        OneLimitDenies {
            name: "tokens/month denies",
            setup: |s, _, now| *s = WorkspaceState::new(now, &totals(now, 9_950, &[])),
            model: None,
            cost: tokens(100),
            denied_by: TokensPerMonth,
        },
        OneLimitDenies {
            name: "concurrency denies",
            setup: |s, l, now| {
                admit(s, l, None, tokens(1), now - 5 * SEC);
                admit(s, l, None, tokens(1), now - 3 * SEC);
            },
            model: None,
            cost: tokens(10),
            denied_by: ConcurrentRequests,
        },
        OneLimitDenies {
            name: "model tokens/minute denies, workspace bucket would admit",
            setup: |s, l, now| spend(s, l, Some("m"), 190, now - 3 * SEC),
            model: Some("m"),
            cost: tokens(100),
            denied_by: ModelTokensPerMinute,
        },
        OneLimitDenies {
            name: "model tokens/month denies",
            setup: |s, _, now| *s = WorkspaceState::new(now, &totals(now, 950, &[("m", 950)])),
            model: Some("m"),
            cost: tokens(100),
            denied_by: ModelTokensPerMonth,
        },
        OneLimitDenies {
            name: "prompt too large for tokens/minute",
            setup: |_, _, _| {},
            model: None,
            cost: tokens(700),
            denied_by: TokensPerMinute,
        },
    ];
    let l = all_limits();
    for case in cases {
        let now = t0() + 10 * SEC;
        let mut s = fresh(now - 10 * SEC);
        (case.setup)(&mut s, &l, now);
        let before = s.clone();

        let (verdict, snapshot) = s.reserve(&l, case.model, case.cost, now);
        let Verdict::Deny(d) = verdict else {
            panic!("{}: admitted", case.name)
        };
        assert_eq!(d.limit, case.denied_by, "{}", case.name);
        // The windows as they were: the workspace's, each replaced by the request's model's
        // where that has less left (what the headers show).
        let mut expected = before.snapshot(&l, now);
        if let Some(m) = case.model {
            let usage = before.usage(&l, now);
            let own = usage.models.iter().find(|u| u.model == m).unwrap();
            expected = expected.tighter(Snapshot {
                requests: None,
                tokens: own.tokens,
                month: own.month,
            });
        }
        assert_eq!(snapshot, expected, "{}", case.name);
        // Only that limit denies: without it, the same request is admitted.
        let others = without(&l, case.denied_by, case.model);
        admit(&mut before.clone(), &others, case.model, case.cost, now);
        // Nothing was taken: the same usage, and the same answers to every later request.
        assert_same_future(&before, &s, &l, now, case.name);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Which denial is reported
// ---------------------------------------------------------------------------------------------

struct Priority {
    name: &'static str,
    limits: Limits,
    setup: fn(&mut WorkspaceState, &Limits, Nanos),
    model: Option<&'static str>,
    cost: TokenCost,
    want: (DenialKind, LimitName, Nanos),
}

#[test]
fn denial_priority_too_large_then_quota_then_longest_wait() {
    let month_nearly_spent: fn(&mut WorkspaceState, &Limits, Nanos) = |s, l, now| {
        *s = WorkspaceState::new(now, &totals(now, 9_000, &[]));
        // Month at 9_950, bucket at 50 tokens, next request in 1 s.
        admit(s, l, None, tokens(950), now);
    };
    let cases = [
        Priority {
            name: "too large beats quota, tokens and requests/s",
            limits: limits().rps(1.0).tpm(1_000).month(10_000),
            setup: month_nearly_spent,
            model: None,
            cost: tokens(1_001),
            want: (RequestTooLarge, TokensPerMinute, 0),
        },
        Priority {
            name: "quota beats tokens (3 s) and requests/s (1 s)",
            limits: limits().rps(1.0).tpm(1_000).month(10_000),
            setup: month_nearly_spent,
            model: None,
            cost: tokens(100),
            want: (QuotaExceeded, TokensPerMonth, T0_TO_APRIL),
        },
        Priority {
            name: "too large for a model beats the workspace quota",
            limits: limits().month(1_000).model("m", Some(100), None),
            setup: |s, _, now| *s = WorkspaceState::new(now, &totals(now, 1_000, &[])),
            model: Some("m"),
            cost: tokens(200),
            want: (RequestTooLarge, ModelTokensPerMinute, 0),
        },
        Priority {
            name: "tokens (1 s) over requests/s (500 ms)",
            limits: limits().rps(2.0).burst(1).tpm(600),
            setup: |s, l, now| spend(s, l, None, 600, now),
            model: None,
            cost: tokens(10),
            want: (RateLimited, TokensPerMinute, SEC),
        },
        Priority {
            name: "requests/s (2 s) over tokens (100 ms)",
            limits: limits().rps(0.5).tpm(600),
            setup: |s, l, now| spend(s, l, None, 600, now),
            model: None,
            cost: tokens(1),
            want: (RateLimited, RequestsPerSecond, 2 * SEC),
        },
        Priority {
            name: "concurrency (1 s) over requests/s (250 ms)",
            limits: limits().rps(4.0).burst(1).concurrent(1),
            setup: |s, l, now| {
                admit(s, l, None, tokens(0), now);
            },
            model: None,
            cost: tokens(0),
            want: (RateLimited, ConcurrentRequests, SEC),
        },
        Priority {
            name: "tokens (10 s) over concurrency (1 s)",
            limits: limits().tpm(600).concurrent(1),
            setup: |s, l, now| {
                admit(s, l, None, tokens(600), now);
            },
            model: None,
            cost: tokens(100),
            want: (RateLimited, TokensPerMinute, 10 * SEC),
        },
        Priority {
            name: "model minute (15 s) over workspace minute (4 s)",
            limits: limits().tpm(600).model("m", Some(120), None),
            setup: |s, l, now| {
                spend(s, l, Some("m"), 100, now);
                spend(s, l, None, 490, now);
            },
            model: Some("m"),
            cost: tokens(50),
            want: (RateLimited, ModelTokensPerMinute, 15 * SEC),
        },
        Priority {
            name: "workspace minute (10 s) over model minute (9.5 s)",
            limits: limits().tpm(600).model("m", Some(120), None),
            setup: |s, l, now| {
                spend(s, l, Some("m"), 39, now);
                spend(s, l, None, 561, now);
            },
            model: Some("m"),
            cost: tokens(100),
            want: (RateLimited, TokensPerMinute, 10 * SEC),
        },
    ];
    for case in cases {
        let now = t0();
        let mut s = fresh(now);
        (case.setup)(&mut s, &case.limits, now);
        let d = deny(&mut s, &case.limits, case.model, case.cost, now);
        assert_eq!((d.kind, d.limit, d.retry_after), case.want, "{}", case.name);
        // With a request in flight the workspace is in use: no promise about the retry.
        if d.kind == RateLimited && case.limits.concurrent_requests.is_none() {
            assert_retry_is_exact(&s, &case.limits, case.model, case.cost, now, d.retry_after);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Properties
// ---------------------------------------------------------------------------------------------

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Rates whose emission interval is a whole number of nanoseconds, so that `floor(d * rps)` is
/// exact in integers.
const RATES: [f64; 9] = [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 8.0, 10.0, 1_000.0];

fn gap() -> impl Strategy<Value = Nanos> {
    prop_oneof![Just(0), 0..SEC, 0..90 * SEC]
}

proptest! {
    #![proptest_config(config())]

    /// In any interval [t, t + d], GCRA admits at most burst + floor(d * rps) requests, and
    /// every denial's wait is exact. A step is a pause (per mille of the emission interval), or
    /// `None`: a client that waits exactly the last denial's `retry_after`.
    #[test]
    fn gcra_admits_at_most_burst_plus_rate_in_any_interval(
        rps in select(RATES.to_vec()),
        burst in proptest::option::of(1u32..6),
        steps in vec(
            prop_oneof![Just(None), Just(Some(0u64)), (0..3_000u64).prop_map(Some)],
            1..100,
        ),
    ) {
        let l = Limits { requests_per_second: Some(rps), burst, ..Limits::default() };
        let interval = (SEC as f64 / rps) as Nanos;
        prop_assert_eq!(interval as f64 * rps, SEC as f64);
        let mut now = t0();
        let mut s = fresh(now);
        let mut admitted = Vec::new();
        let mut retry_after = 0;
        for step in steps {
            now += match step {
                Some(per_mille) => interval * per_mille / 1_000,
                None => retry_after,
            };
            retry_after = 0;
            match s.reserve(&l, None, tokens(0), now).0 {
                Verdict::Admit(_) => admitted.push(now),
                Verdict::Deny(d) => {
                    prop_assert_eq!(d.limit, RequestsPerSecond);
                    prop_assert!(retry_is_exact(&s, &l, None, tokens(0), now, d.retry_after));
                    retry_after = d.retry_after;
                }
            }
        }
        let burst = l.effective_burst() as u64;
        for (i, start) in admitted.iter().enumerate() {
            for (j, end) in admitted.iter().enumerate().skip(i) {
                let count = (j - i + 1) as u64;
                prop_assert!(
                    count <= burst + (end - start) / interval,
                    "{} requests in {}ns at {} rps, burst {}", count, end - start, rps, burst
                );
            }
        }
    }

    /// With every request settled to its reservation, the bucket never goes below 0 nor above
    /// capacity, and the tokens admitted in any [t0, t1] are at most C + C * (t1 - t0) / 60 s.
    #[test]
    fn token_bucket_admits_at_most_capacity_plus_refill(
        capacity in 1u64..3_000,
        ops in vec((gap(), 0u64..=1_000, 0u64..=1_500, any::<Option<Index>>()), 1..80),
    ) {
        let l = limits().tpm(capacity);
        let mut now = t0();
        let mut s = fresh(now);
        let mut admitted: Vec<(Nanos, u64)> = Vec::new();
        let mut held: Vec<Held> = Vec::new();
        for (gap, prompt_per_mille, extra_per_mille, settle) in ops {
            now += gap;
            let prompt = capacity * prompt_per_mille / 1_000;
            let cost = estimate(prompt, prompt + capacity * extra_per_mille / 1_000);
            match s.reserve(&l, None, cost, now).0 {
                Verdict::Admit(h) => {
                    prop_assert_eq!(h.tokens, cost.estimate.min(capacity));
                    admitted.push((now, h.tokens));
                    held.push(h);
                }
                Verdict::Deny(d) => {
                    prop_assert_eq!((d.kind, d.limit), (RateLimited, TokensPerMinute));
                    prop_assert!(retry_is_exact(&s, &l, None, cost, now, d.retry_after));
                }
            }
            if let (Some(i), false) = (settle, held.is_empty()) {
                let h = held.swap_remove(i.index(held.len()));
                s.settle(&l, &h, h.tokens, now);
            }
            let balance = s.usage(&l, now).bucket_tokens.unwrap();
            prop_assert!((0..=capacity as i64).contains(&balance), "balance {}", balance);
        }
        let minute = 60 * SEC as u128;
        for (i, &(start, _)) in admitted.iter().enumerate() {
            let mut sum = 0u128;
            for &(end, n) in &admitted[i..] {
                sum += n as u128;
                let bound = capacity as u128 * minute + capacity as u128 * (end - start) as u128;
                prop_assert!(
                    sum * minute <= bound,
                    "{} tokens in {}ns, capacity {}", sum, end - start, capacity
                );
            }
        }
    }

    /// Settled + reserved never exceeds the month cap by more than the underestimates settled so
    /// far (so never at all when every request is settled to its reservation), and a request is
    /// denied exactly when it would not fit.
    #[test]
    fn month_usage_exceeds_the_cap_only_by_underestimates(
        cap in 1u64..5_000,
        seeded_per_mille in 0u64..=1_000,
        exact in any::<bool>(),
        ops in vec((0u64..=1_500, any::<Option<Index>>(), 0u64..=3_000), 1..80),
    ) {
        let l = limits().month(cap);
        let mut now = t0();
        let mut s = WorkspaceState::new(now, &totals(now, cap * seeded_per_mille / 1_000, &[]));
        let mut held: Vec<Held> = Vec::new();
        let mut overshoot = 0u64;
        for (cost_per_mille, settle, actual_per_mille) in ops {
            now += SEC;
            let before = s.usage(&l, now);
            let used = before.month_settled_tokens + before.month_reserved_tokens;
            let wanted = (cap * cost_per_mille / 1_000).max(1);
            let cost = estimate(wanted.min(cap) / 2, wanted);
            let fits = used + wanted.min(cap) <= cap;
            match s.reserve(&l, None, cost, now).0 {
                Verdict::Admit(h) => {
                    prop_assert!(fits, "admitted {} with {} of {} used", h.tokens, used, cap);
                    held.push(h);
                }
                Verdict::Deny(d) => {
                    prop_assert!(!fits, "denied {:?} with {} of {} used", cost, used, cap);
                    prop_assert_eq!(
                        (d.kind, d.limit, d.retry_after),
                        (QuotaExceeded, TokensPerMonth, T0_TO_APRIL - (now - t0()))
                    );
                    prop_assert_eq!(s.usage(&l, now), before);
                }
            }
            if let (Some(i), false) = (settle, held.is_empty()) {
                let h = held.swap_remove(i.index(held.len()));
                let actual = if exact { h.tokens } else { h.tokens * actual_per_mille / 1_000 };
                overshoot += actual.saturating_sub(h.tokens);
                s.settle(&l, &h, actual, now);
            }
            let u = s.usage(&l, now);
            let used = u.month_settled_tokens + u.month_reserved_tokens;
            prop_assert!(
                used <= cap + overshoot,
                "{} used of {} (+{} underestimated)", used, cap, overshoot
            );
            prop_assert_eq!(u.snapshot.month.unwrap().remaining, cap.saturating_sub(used));
        }
    }

    /// With requests/s, a workspace bucket and a model bucket, and settlements above and below
    /// the reservations, every denial's wait is exact: retrying after it succeeds, one
    /// nanosecond earlier does not.
    #[test]
    fn waiting_retry_after_is_enough_and_necessary(
        rps in select(RATES[..8].to_vec()),
        burst in proptest::option::of(1u32..4),
        capacity in 60u64..2_000,
        model_capacity in 30u64..1_000,
        ops in vec(
            (gap(), 0usize..3, 0u64..=1_000, 0u64..=1_500, any::<Option<Index>>(), 0u64..=3_000),
            1..60,
        ),
    ) {
        let l = Limits { requests_per_second: Some(rps), burst, ..Limits::default() }
            .tpm(capacity)
            .model("m", Some(model_capacity), None);
        let models = [None, Some("m"), Some("x")];
        let mut now = t0();
        let mut s = fresh(now);
        let mut held: Vec<Held> = Vec::new();
        for (gap, model, prompt_per_mille, extra_per_mille, settle, actual_per_mille) in ops {
            now += gap;
            let model = models[model];
            let fits = if model == Some("m") { capacity.min(model_capacity) } else { capacity };
            let prompt = fits * prompt_per_mille / 1_000;
            let cost = estimate(prompt, prompt + fits * extra_per_mille / 1_000);
            match s.reserve(&l, model, cost, now).0 {
                Verdict::Admit(h) => held.push(h),
                Verdict::Deny(d) => {
                    prop_assert_eq!(d.kind, RateLimited);
                    prop_assert!(
                        retry_is_exact(&s, &l, model, cost, now, d.retry_after),
                        "{:?} for {:?} {:?}", d, model, cost
                    );
                }
            }
            if let (Some(i), false) = (settle, held.is_empty()) {
                let h = held.swap_remove(i.index(held.len()));
                s.settle(&l, &h, h.tokens * actual_per_mille / 1_000, now);
            }
        }
    }

    /// Every limit at once, two models with limits of their own and one without, and the limits
    /// changing between requests (a new tier, an override): a denial changes nothing that any
    /// later decision can see, an admission never takes a concurrency slot or a month's tokens
    /// beyond the limits in force, and a retry after `retry_after` is admitted when it is about
    /// rates alone.
    #[test]
    fn every_limit_holds_across_models_and_limit_changes(
        ops in vec(
            (
                0..4usize,
                select(vec![None, Some("m"), Some("n"), Some("x")]),
                0u64..=300,
                0u64..=300,
                prop_oneof![Just(0), 0..2 * SEC, 0..40 * SEC],
                any::<Option<Index>>(),
                0u64..=1_000,
            ),
            1..60,
        ),
    ) {
        let shapes = [
            all_limits(),
            all_limits().model("n", Some(150), None).rps(2.0).burst(3),
            limits().tpm(300).month(2_000).concurrent(1).model("m", Some(100), Some(500)),
            limits().rps(0.5).tpm(1_200).model("n", None, Some(300)),
        ];
        let mut now = t0();
        let mut s = fresh(now);
        let mut held: Vec<Held> = Vec::new();
        for (shape, model, prompt, extra, gap, settle, actual_per_mille) in ops {
            now += gap;
            let l = &shapes[shape];
            let cost = estimate(prompt, prompt + extra);
            let before = s.clone();
            let used = |s: &WorkspaceState| {
                let u = s.usage(l, now);
                u.month_settled_tokens + u.month_reserved_tokens
            };
            match s.reserve(l, model, cost, now).0 {
                Verdict::Admit(h) => {
                    let u = s.usage(l, now);
                    if let Some(max) = l.concurrent_requests {
                        prop_assert!(u.in_flight <= max, "{} in flight of {}", u.in_flight, max);
                    }
                    if let Some(cap) = l.tokens_per_month {
                        prop_assert!(
                            used(&before) + h.tokens <= cap,
                            "admitted {} over {} used of {}", h.tokens, used(&before), cap
                        );
                    }
                    held.push(h);
                }
                Verdict::Deny(d) => {
                    assert_same_future(&before, &s, l, now, "a denial");
                    // "Nothing else running": no request in flight holds a slot.
                    if d.kind == RateLimited && held.is_empty() {
                        prop_assert!(retry_is_exact(&s, l, model, cost, now, d.retry_after));
                    }
                }
            }
            if let (Some(i), false) = (settle, held.is_empty()) {
                let h = held.swap_remove(i.index(held.len()));
                s.settle(l, &h, h.tokens * actual_per_mille / 1_000, now);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Snapshot (header) values
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Act {
    Look,
    Reserve(u64),
    /// Settles the n-th reservation to the given tokens.
    Settle(usize, u64),
}
use Act::{Look, Reserve, Settle};

/// The requests/s window of `snapshot_windows_count_down_to_full`.
fn rps_window(remaining: u64, reset: Nanos) -> Window {
    Window {
        limit: 2.0,
        remaining,
        reset,
    }
}

/// The tokens/minute window of `snapshot_windows_count_down_to_full`.
fn tpm_window(remaining: u64, reset: Nanos) -> Window {
    Window {
        limit: 600.0,
        remaining,
        reset,
    }
}

#[test]
fn snapshot_windows_count_down_to_full() {
    let l = limits().rps(2.0).burst(4).tpm(600).month(1_000);
    let start = t0();
    let mut s = fresh(start);
    let mut held = Vec::new();
    // (at, act, requests/s window, tokens/minute window, month remaining)
    #[rustfmt::skip]
    let table = [
        (0, Look, rps_window(4, 0), tpm_window(600, 0), 1_000),
        (0, Reserve(100), rps_window(3, 500 * MS), tpm_window(500, 10 * SEC), 900),
        // 500 + 2.5 tokens refilled: 502 whole tokens, 97.5 missing.
        (250 * MS, Look, rps_window(3, 250 * MS), tpm_window(502, 9_750 * MS), 900),
        (250 * MS, Reserve(100), rps_window(2, 750 * MS), tpm_window(402, 19_750 * MS), 800),
        // 200 more than reserved: 202.5 tokens left.
        (250 * MS, Settle(0, 300), rps_window(2, 750 * MS), tpm_window(202, 39_750 * MS), 600),
        (SEC, Look, rps_window(4, 0), tpm_window(210, 39 * SEC), 600),
        // Debt: 210 - 500 = -290 tokens; remaining shows 0, never negative.
        (SEC, Settle(1, 600), rps_window(4, 0), tpm_window(0, 89 * SEC), 100),
    ];
    for (i, (offset, act, requests, tokens_per_minute, month_remaining)) in
        table.into_iter().enumerate()
    {
        let now = start + offset;
        match act {
            Look => {}
            Reserve(n) => {
                let (verdict, snapshot) = s.reserve(&l, None, tokens(n), now);
                let Verdict::Admit(h) = verdict else {
                    panic!("step {i}: {verdict:?}")
                };
                held.push(h);
                assert_eq!(snapshot, s.snapshot(&l, now), "step {i}");
            }
            Settle(n, actual) => s.settle(&l, &held[n], actual, now),
        }
        let snapshot = s.snapshot(&l, now);
        assert_eq!(snapshot.requests, Some(requests), "step {i}: requests");
        assert_eq!(snapshot.tokens, Some(tokens_per_minute), "step {i}: tokens");
        let month = snapshot.month.unwrap();
        assert_eq!(
            (month.limit, month.remaining, month.reset),
            (1_000.0, month_remaining, T0_TO_APRIL - offset),
            "step {i}: month"
        );
    }
    assert_eq!(s.usage(&l, start + SEC).bucket_tokens, Some(-290));
    // Unlimited dimensions have no window.
    assert_eq!(fresh(start).snapshot(&limits(), start), Default::default());
}

// ---------------------------------------------------------------------------------------------
// 11. LocalLimiter
// ---------------------------------------------------------------------------------------------

/// The durable ledger, a dependency of the limiter: fixed totals per workspace and month, a
/// record of every call, and a switch to make it unavailable.
#[derive(Default)]
struct Ledger {
    totals: Mutex<HashMap<(WorkspaceId, MonthKey), MonthTotals>>,
    calls: Mutex<Vec<(WorkspaceId, MonthKey)>>,
    down: AtomicBool,
}

impl Ledger {
    fn set(&self, workspace: WorkspaceId, now: Nanos, tokens: u64, by_model: &[(&str, u64)]) {
        let key = (workspace, MonthKey::of(now));
        self.totals
            .lock()
            .unwrap()
            .insert(key, totals(now, tokens, by_model));
    }

    fn calls(&self) -> Vec<(WorkspaceId, MonthKey)> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl MonthSource for Ledger {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        _excluding: Option<&str>,
    ) -> Result<MonthTotals, LimiterError> {
        self.calls.lock().unwrap().push((workspace, month));
        if self.down.load(Ordering::SeqCst) {
            return Err(LimiterError::Unavailable("ledger down".to_string()));
        }
        let totals = self
            .totals
            .lock()
            .unwrap()
            .get(&(workspace, month))
            .cloned();
        Ok(totals.unwrap_or(MonthTotals {
            month: Some(month),
            ..MonthTotals::default()
        }))
    }
}

fn local() -> (Arc<Ledger>, LocalLimiter) {
    let ledger = Arc::new(Ledger::default());
    let limiter = LocalLimiter::new(ledger.clone());
    (ledger, limiter)
}

/// Reserves through the `Limiter` trait; the request must be admitted.
async fn admitted(
    limiter: &dyn Limiter,
    workspace: WorkspaceId,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: Nanos,
) -> Reservation {
    match limiter.reserve(workspace, limits, model, cost, now).await {
        Ok(Decision::Admit { reservation, .. }) => reservation,
        other => panic!("expected an admission at {now}, got {other:?}"),
    }
}

/// Reserves through the `Limiter` trait; the request must be denied.
async fn denied(
    limiter: &dyn Limiter,
    workspace: WorkspaceId,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: Nanos,
) -> Denial {
    match limiter.reserve(workspace, limits, model, cost, now).await {
        Ok(Decision::Deny { denial, .. }) => denial,
        other => panic!("expected a denial at {now}, got {other:?}"),
    }
}

const IDLE: Nanos = 60 * SEC;

#[tokio::test]
async fn local_seeds_each_workspace_once_from_the_ledger() {
    let (ledger, limiter) = local();
    let now = t0();
    let march = MonthKey::of(now);
    ledger.set(1, now, 900, &[]);
    let l = limits().month(1_000);

    let r = admitted(&limiter, 1, &l, None, tokens(100), now).await;
    assert_eq!(r.workspace, 1);
    let d = denied(&limiter, 1, &l, None, tokens(1), now + SEC).await;
    assert_eq!((d.kind, d.limit), (QuotaExceeded, TokensPerMonth));
    let u = limiter.usage(1, &l, now + 2 * SEC).await.unwrap();
    assert_eq!(
        (u.month_settled_tokens, u.month_reserved_tokens),
        (900, 100)
    );
    limiter.settle(&r, &l, 100, now + 3 * SEC).await.unwrap();
    assert_eq!(ledger.calls(), vec![(1, march)]);

    // Another workspace has its own counters, loaded once too.
    admitted(&limiter, 2, &l, None, tokens(1_000), now).await;
    denied(&limiter, 2, &l, None, tokens(1), now).await;
    assert_eq!(ledger.calls(), vec![(1, march), (2, march)]);
    assert_eq!(limiter.tracked_workspaces(), 2);
}

#[tokio::test]
async fn local_reserve_then_settle_frees_the_slot_and_refunds() {
    let (_ledger, limiter) = local();
    let now = t0();
    let l = limits().tpm(600).concurrent(1);

    let Decision::Admit {
        reservation,
        snapshot,
    } = limiter
        .reserve(7, &l, Some("m"), estimate(100, 300), now)
        .await
        .unwrap()
    else {
        panic!("denied")
    };
    assert_eq!(reservation.workspace, 7);
    assert_eq!(
        reservation.held,
        Held {
            model: Some("m".into()),
            tokens: 300,
            month: MonthKey::of(now),
            slot: true,
            key: None,
        }
    );
    assert_eq!(snapshot.tokens.unwrap().remaining, 300);

    let d = denied(&limiter, 7, &l, None, tokens(1), now).await;
    assert_eq!(d.limit, ConcurrentRequests);

    // 300 reserved at t, +10 refilled by t + 1 s, 180 refunded.
    limiter
        .settle(&reservation, &l, 120, now + SEC)
        .await
        .unwrap();
    let u = limiter.usage(7, &l, now + SEC).await.unwrap();
    assert_eq!(u.in_flight, 0);
    assert_eq!(u.bucket_tokens, Some(490));
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (120, 0));
    admitted(&limiter, 7, &l, None, tokens(490), now + SEC).await;
}

#[tokio::test]
async fn local_evicts_only_idle_workspaces_after_idle_for() {
    let (_ledger, limiter) = local();
    let now = t0();
    let plain = Arc::new(limits().tpm(600).concurrent(4));
    let slow = Arc::new(limits().rps(0.005)); // one request per 200 s
    let model = Arc::new(limits().model("m", Some(60), None)); // 1 token/s for "m"
    let quota = Arc::new(limits().month(1_000));
    let limits_of = |ws: WorkspaceId| match ws {
        1..=3 | 7 => Some(plain.clone()),
        4 => Some(slow.clone()),
        6 => Some(model.clone()),
        8 => Some(quota.clone()),
        _ => None, // 5: the workspace is gone
    };

    // 1: a request in flight.
    let in_flight = admitted(&limiter, 1, &plain, None, tokens(10), now).await;
    // 2: in debt by 600 tokens (the most: one minute), full again after 120 s.
    let r = admitted(&limiter, 2, &plain, None, tokens(600), now).await;
    limiter.settle(&r, &plain, 1_200, now).await.unwrap();
    // 3: one small request, refunded: idle at once.
    let r = admitted(&limiter, 3, &plain, None, tokens(10), now).await;
    limiter.settle(&r, &plain, 0, now).await.unwrap();
    // 4: requests/s not back to full for 200 s.
    let r = admitted(&limiter, 4, &slow, None, tokens(1), now).await;
    limiter.settle(&r, &slow, 1, now).await.unwrap();
    // 5: in debt, but its limits are gone: nothing to remember.
    let r = admitted(&limiter, 5, &plain, None, tokens(600), now).await;
    limiter.settle(&r, &plain, 1_800, now).await.unwrap();
    // 6: model "m" in debt by 30 tokens, full again after 90 s.
    let r = admitted(&limiter, 6, &model, Some("m"), tokens(60), now).await;
    limiter.settle(&r, &model, 90, now).await.unwrap();
    // 7: a token-free request in flight, held by its concurrency slot alone.
    let slot_only = admitted(&limiter, 7, &plain, None, TokenCost::default(), now).await;
    // 8: tokens in flight, without a concurrency limit.
    let tokens_only = admitted(&limiter, 8, &quota, None, tokens(10), now).await;
    assert_eq!(limiter.tracked_workspaces(), 8);

    // (now, evicted, still tracked)
    let sweeps = [
        (now + IDLE - 1, 0, 8),
        (now + IDLE, 2, 6),          // 3 and 5
        (now + 90 * SEC - 1, 0, 6),  // 6 is one nanosecond short of full
        (now + 90 * SEC, 1, 5),      // 6
        (now + 120 * SEC - 1, 0, 5), // 2 likewise
        (now + 120 * SEC, 1, 4),     // 2
        (now + 200 * SEC, 1, 3),     // 4
        (now + HOUR, 0, 3),          // 1, 7 and 8 are still in flight
    ];
    for (at, evicted, tracked) in sweeps {
        assert_eq!(limiter.evict_idle(at, IDLE, &limits_of), evicted, "at {at}");
        assert_eq!(limiter.tracked_workspaces(), tracked, "at {at}");
    }
    for (r, l) in [
        (&in_flight, &plain),
        (&slot_only, &plain),
        (&tokens_only, &quota),
    ] {
        limiter
            .settle(r, l, r.held.tokens, now + HOUR)
            .await
            .unwrap();
    }
    let later = now + HOUR + IDLE;
    assert_eq!(limiter.evict_idle(later - 1, IDLE, &limits_of), 0);
    assert_eq!(limiter.evict_idle(later, IDLE, &limits_of), 3);
    assert_eq!(limiter.tracked_workspaces(), 0);
}

#[tokio::test]
async fn local_reloads_an_evicted_workspace_from_the_ledger() {
    let (ledger, limiter) = local();
    let now = t0();
    let march = MonthKey::of(now);
    ledger.set(1, now, 500, &[("m", 200)]);
    let l = Arc::new(limits().month(1_000).model("m", None, Some(300)));

    let r = admitted(&limiter, 1, &l, Some("m"), tokens(100), now).await;
    limiter.settle(&r, &l, 100, now).await.unwrap();
    let d = denied(&limiter, 1, &l, Some("m"), tokens(1), now).await;
    assert_eq!(d.limit, ModelTokensPerMonth);
    assert_eq!(
        limiter.evict_idle(now + IDLE, IDLE, &|_| Some(l.clone())),
        1
    );
    assert_eq!(limiter.tracked_workspaces(), 0);

    // Meanwhile the ledger recorded that settlement and 50 tokens of another model.
    ledger.set(1, now, 650, &[("m", 300)]);
    let later = now + IDLE;
    let u = limiter.usage(1, &l, later).await.unwrap();
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (650, 0));
    assert_eq!(ledger.calls(), vec![(1, march), (1, march)]);
    let d = denied(&limiter, 1, &l, Some("m"), tokens(1), later).await;
    assert_eq!(d.limit, ModelTokensPerMonth);
    admitted(&limiter, 1, &l, None, tokens(350), later).await;
    let d = denied(&limiter, 1, &l, None, tokens(1), later).await;
    assert_eq!(d.limit, TokensPerMonth);
    assert_eq!(ledger.calls().len(), 2);
}

#[tokio::test]
async fn local_rolls_over_to_the_next_month() {
    let (ledger, limiter) = local();
    let end = ns(datetime!(2024-03-31 23:59:59 UTC));
    let april = ns(datetime!(2024-04-01 00:00 UTC));
    ledger.set(1, end, 1_000, &[]);
    ledger.set(1, april, 200, &[]);
    let l = limits().month(1_000);

    let d = denied(&limiter, 1, &l, None, tokens(1), end).await;
    assert_eq!((d.kind, d.retry_after), (QuotaExceeded, SEC));
    // Waiting Retry-After is enough: April starts from April's ledger.
    admitted(&limiter, 1, &l, None, tokens(800), end + d.retry_after).await;
    denied(&limiter, 1, &l, None, tokens(1), april).await;
    assert_eq!(
        ledger.calls(),
        vec![(1, MonthKey::of(end)), (1, MonthKey::of(april))]
    );
}

#[tokio::test]
async fn local_ledger_failure_is_an_error_not_an_empty_month() {
    let (ledger, limiter) = local();
    let now = t0();
    ledger.set(1, now, 1_000, &[]);
    ledger.down.store(true, Ordering::SeqCst);
    let l = limits().month(1_000);

    let err = limiter.reserve(1, &l, None, tokens(1), now).await;
    assert!(matches!(err, Err(LimiterError::Unavailable(_))), "{err:?}");
    assert!(limiter.usage(1, &l, now).await.is_err());
    assert_eq!(limiter.tracked_workspaces(), 0);

    // Once the ledger is back, the month is not forgotten.
    ledger.down.store(false, Ordering::SeqCst);
    let d = denied(&limiter, 1, &l, None, tokens(1), now).await;
    assert_eq!(d.kind, QuotaExceeded);
}

/// A pass-through request reserves no tokens (`TokenCost::default()`) and is settled later from
/// the usage in its answer. Without a concurrency limit nothing marks the state as holding a
/// reservation, so it must still not be evicted while the request runs: `settle` on an evicted
/// workspace is dropped, and the usage never reaches the bucket.
#[tokio::test]
async fn local_never_evicts_a_workspace_holding_a_reservation() {
    let (_ledger, limiter) = local();
    let now = t0();
    let l = Arc::new(limits().tpm(600));
    let r = admitted(&limiter, 1, &l, None, TokenCost::default(), now).await;

    let evicted = limiter.evict_idle(now + IDLE, IDLE, &|_| Some(l.clone()));
    limiter.settle(&r, &l, 600, now + IDLE).await.unwrap();
    let u = limiter.usage(1, &l, now + IDLE).await.unwrap();
    assert_eq!(
        (evicted, u.bucket_tokens),
        (0, Some(0)),
        "(evicted, bucket after settling 600 tokens)"
    );
}

#[test]
fn a_keys_buckets_keep_its_workspace_until_they_are_full_again() {
    use tiergate::model::{KeyLimits, KeyScope};
    let now = t0();
    let workspace = Limits {
        tokens_per_minute: Some(6_000),
        ..Limits::default()
    };
    let with_key = Limits {
        key: Some(KeyScope {
            id: 3,
            limits: KeyLimits {
                tokens_per_minute: Some(600),
                ..KeyLimits::default()
            },
        }),
        ..workspace.clone()
    };
    let mut state = fresh(now);
    assert!(state.needs_key(&with_key));
    assert!(!state.needs_key(&workspace));
    let held = admit(&mut state, &with_key, None, tokens(300), now);
    assert_eq!(held.key, Some(3));
    assert!(!state.needs_key(&with_key));
    state.settle(&with_key, &held, 300, now);
    // The workspace's bucket is full again after 3 s (300 of 6,000 a minute); the key's after
    // 30 s (300 of 600 a minute): until then evicting the state would forget the key's use.
    assert!(!state.is_idle(Some(&workspace), now + 10 * SEC));
    assert!(state.is_idle(Some(&workspace), now + 30 * SEC));
    // Settled with the key's limits removed meanwhile: the key still gets its refund.
    let held = admit(&mut state, &with_key, None, tokens(500), now + 60 * SEC);
    state.settle(&workspace, &held, 100, now + 60 * SEC);
    let key = state.usage(&with_key, now + 60 * SEC).key.unwrap();
    assert_eq!(key.tokens.unwrap().remaining, 500);
}

/// The ledger's day is kept between calls: each call must still give its own instant's day,
/// across midnight both ways and back (a cached day that is not checked would keep the first).
#[test]
fn the_ledger_day_follows_the_instant_asked_for() {
    use tiergate::limiter::core::day_of;
    let before = ns(datetime!(2026-03-31 23:59:59.999 UTC));
    let after = ns(datetime!(2026-04-01 00:00:00 UTC));
    assert_eq!(day_of(before), "2026-03-31");
    assert_eq!(day_of(before), "2026-03-31");
    assert_eq!(day_of(after), "2026-04-01");
    assert_eq!(day_of(after + 3_600_000_000_000), "2026-04-01");
    assert_eq!(day_of(before), "2026-03-31");
    assert_eq!(day_of(ns(datetime!(1999-12-31 12:00 UTC))), "1999-12-31");
}

/// A key's month quota and its workspace's both spent: the workspace's is reported, as the one
/// that binds every key (raising the key's would not help). The key's, checked last, won the
/// tie and its message said the other keys were not affected (an outside audit).
#[test]
fn a_workspace_quota_is_reported_over_its_keys_on_a_tie() {
    use tiergate::model::{KeyLimits, KeyScope};
    let now = t0();
    let limits = Limits {
        tokens_per_month: Some(5_000),
        key: Some(KeyScope {
            id: 4,
            limits: KeyLimits {
                tokens_per_month: Some(3_000),
                ..KeyLimits::default()
            },
        }),
        ..Limits::default()
    };
    let mut s = fresh(now);
    // The key spends 2,990 of its 3,000; another key of the workspace 2,005: the workspace is
    // at 4,995 of its 5,000.
    spend(&mut s, &limits, None, 2_990, now);
    let other = Limits {
        key: None,
        ..limits.clone()
    };
    spend(&mut s, &other, None, 2_005, now);
    let d = deny(&mut s, &limits, None, tokens(20), now);
    assert_eq!((d.kind, d.limit), (QuotaExceeded, TokensPerMonth));
}

/// A drained state (a share of limits taken over from Redis, whose use it cannot know) admits
/// no burst: its requests and tokens refill from the moment it was drained, at their rates.
#[test]
fn a_drained_state_admits_no_burst_and_refills_at_its_rates() {
    let l = limits().rps(2.0).burst(10).tpm(600);
    let now = t0();
    let mut s = fresh(now);
    s.drain_buckets(&l, now);
    let denial = deny(&mut s, &l, None, tokens(0), now);
    assert_eq!(denial.limit, RequestsPerSecond);
    assert_eq!(denial.retry_after, SEC / 2, "one request refills in 1/rate");
    admit(&mut s, &l, None, tokens(0), now + SEC / 2);
    deny(&mut s, &l, None, tokens(0), now + SEC / 2);
    // Tokens: 600 a minute is 10 a second; none at the start, 10 after a second.
    let l = limits().tpm(600);
    let mut s = fresh(now);
    s.drain_buckets(&l, now);
    assert_eq!(
        deny(&mut s, &l, None, tokens(10), now).limit,
        TokensPerMinute
    );
    admit(&mut s, &l, None, tokens(10), now + SEC);
    // Undrained, the same state admits its whole burst at once.
    let l = limits().rps(2.0).burst(10);
    let mut s = fresh(now);
    for _ in 0..10 {
        admit(&mut s, &l, None, tokens(0), now);
    }
}

/// A state drained to a start (a share taken up with the room Redis last reported) admits that
/// start at once and no more, then refills at its rates; a start past the capacity is held to it.
#[test]
fn a_state_drained_to_a_start_admits_that_start_then_refills() {
    let l = limits().rps(2.0).burst(10).tpm(600);
    let now = t0();
    let mut s = fresh(now);
    s.drain_buckets_to(&l, now, (3.0, 25.0));
    for _ in 0..3 {
        admit(&mut s, &l, None, tokens(5), now);
    }
    assert_eq!(
        deny(&mut s, &l, None, tokens(0), now).limit,
        RequestsPerSecond
    );
    // 25 tokens, 15 taken: 10 left, and 10 more a second.
    admit(&mut s, &l, None, tokens(15), now + SEC / 2);
    assert_eq!(
        deny(&mut s, &l, None, tokens(6), now + SEC).limit,
        TokensPerMinute
    );
    admit(&mut s, &l, None, tokens(5), now + SEC);
    let mut s = fresh(now);
    s.drain_buckets_to(&l, now, (50.0, 1e9));
    for _ in 0..10 {
        admit(&mut s, &l, None, tokens(60), now);
    }
    assert_eq!(
        deny(&mut s, &l, None, tokens(0), now).limit,
        RequestsPerSecond
    );
}

/// A state's month counters take up the ledger's totals read again: what was settled since the
/// state was seeded, elsewhere, counts (a share taken up again when the other instances had used
/// more), and nothing counts twice (the ledger's total already holds what this state settled,
/// once flushed). Totals of another month change nothing.
#[test]
fn month_counters_take_up_the_ledger_s_totals_read_again() {
    let now = t0();
    let l = limits().month(6_000).model("m", None, Some(2_000));
    let mut s = WorkspaceState::new(now, &totals(now, 3_000, &[("m", 500)]));
    // Settled here: 100 (the ledger will hold it too).
    let held = admit(&mut s, &l, None, tokens(100), now);
    s.settle(&l, &held, 100, now);
    // Elsewhere 2,420 more, and 1,400 of the model's.
    s.reseed_month(now, &totals(now, 5_520, &[("m", 1_900)]));
    assert_eq!(s.month_seeds().0, 5_520);
    deny(&mut s, &l, None, tokens(481), now);
    admit(&mut s, &l, Some("m"), tokens(100), now);
    deny(&mut s, &l, Some("m"), tokens(1), now);
    // Lower figures or another month's change nothing.
    let mut s = WorkspaceState::new(now, &totals(now, 3_000, &[]));
    s.reseed_month(now, &totals(now, 1_000, &[]));
    s.reseed_month(now, &totals(now + 40 * 86_400 * SEC, 5_900, &[]));
    admit(&mut s, &l, None, tokens(3_000), now);
}
