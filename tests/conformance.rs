//! One suite of limiter behaviour, run against every `Limiter`: in memory, one Redis server, and
//! a Redis Cluster. Each case is a sequence of calls at times of a manual clock; every backend
//! must give the same answers as the in-memory one (whose arithmetic `tests/limiter.rs` checks
//! in detail), and each case also states what it expects, so that a bug shared by all backends
//! fails too. Random sequences (property tests) compare the backends the same way.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use proptest::prelude::*;
use time::macros::datetime;

use tiergate::limiter::local::LocalLimiter;
use tiergate::limiter::redis::{RedisLimiter, RedisOptions, TimeSource, Topology};
use tiergate::limiter::{
    Decision, DenialKind, LimitName, Limiter, LimiterError, MonthKey, MonthSource, MonthTotals,
    Nanos, Reservation, ReservationId, TokenCost, Usage, NANOS_PER_SEC,
};
use tiergate::model::{
    KeyId, KeyLimits, KeyScope, Limits, ModelLimits, WorkspaceId, MAX_BURST,
    MAX_REQUESTS_PER_SECOND, MAX_TOKENS_PER_MINUTE, MAX_TOKENS_PER_MONTH,
};

const MS: Nanos = NANOS_PER_SEC / 1_000;
const SEC: Nanos = NANOS_PER_SEC;

// ---------------------------------------------------------------------------------------------
// The ledger the limiters start month counters from
// ---------------------------------------------------------------------------------------------

/// A settled event: model, tokens, the counter generation that counted it, and the key.
type Event = (String, u64, Option<String>, Option<KeyId>);

/// Settled events per workspace and month.
#[derive(Default)]
pub struct Ledger {
    events: Mutex<HashMap<(WorkspaceId, MonthKey), Vec<Event>>>,
}

impl Ledger {
    pub fn add(
        &self,
        ws: WorkspaceId,
        month: MonthKey,
        model: &str,
        tokens: u64,
        counter: Option<&str>,
    ) {
        self.add_for_key(ws, month, model, tokens, counter, None);
    }

    pub fn add_for_key(
        &self,
        ws: WorkspaceId,
        month: MonthKey,
        model: &str,
        tokens: u64,
        counter: Option<&str>,
        key: Option<KeyId>,
    ) {
        self.events
            .lock()
            .unwrap()
            .entry((ws, month))
            .or_default()
            .push((model.to_string(), tokens, counter.map(str::to_string), key));
    }
}

#[async_trait]
impl MonthSource for Ledger {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding: Option<&str>,
    ) -> Result<MonthTotals, LimiterError> {
        let mut totals = MonthTotals {
            month: Some(month),
            ..MonthTotals::default()
        };
        let events = self.events.lock().unwrap();
        for (model, tokens, counter, key) in events.get(&(workspace, month)).into_iter().flatten() {
            if excluding.is_some() && counter.as_deref() == excluding {
                continue;
            }
            if let Some(key) = key {
                *totals.by_key.entry(*key).or_default() += tokens;
            }
            totals.tokens += tokens;
            totals.requests += 1;
            if !model.is_empty() {
                *totals.by_model.entry(model.clone()).or_default() += tokens;
            }
        }
        Ok(totals)
    }
}

// ---------------------------------------------------------------------------------------------
// The backends
// ---------------------------------------------------------------------------------------------

pub struct Backend {
    pub name: &'static str,
    pub limiter: Arc<dyn Limiter>,
}

fn prefix() -> String {
    format!(
        "t{}",
        ReservationId::next().0 as u64 ^ (ReservationId::next().0 >> 64) as u64
    )
}

fn redis(topology: Topology, ledger: Arc<Ledger>) -> Arc<dyn Limiter> {
    let options = RedisOptions {
        topology,
        prefix: prefix(),
        timeout: std::time::Duration::from_secs(5),
        // Lease expiry is the shared backend's own behaviour (tested apart): here no lease ends.
        lease: std::time::Duration::from_secs(30 * 24 * 3600),
        time: TimeSource::Caller,
    };
    Arc::new(RedisLimiter::new(options, ledger).unwrap())
}

/// Every backend, each over `ledger`.
pub fn backends(ledger: &Arc<Ledger>) -> Vec<Backend> {
    let mut all = vec![Backend {
        name: "memory",
        limiter: Arc::new(LocalLimiter::new(ledger.clone())),
    }];
    if let Some(url) = support::redis::shared_redis() {
        all.push(Backend {
            name: "redis",
            limiter: redis(Topology::Single(url), ledger.clone()),
        });
    }
    let seeds = support::redis::cluster_seeds();
    all.push(Backend {
        name: "cluster",
        limiter: redis(
            Topology::Cluster(seeds.split(',').map(str::to_string).collect()),
            ledger.clone(),
        ),
    });
    all
}

// ---------------------------------------------------------------------------------------------
// Cases: a sequence of calls, run on every backend
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub enum Op {
    Reserve {
        ws: WorkspaceId,
        limits: usize,
        model: Option<&'static str>,
        cost: TokenCost,
    },
    /// Settles the `n`-th admission so far.
    Settle {
        n: usize,
        actual: u64,
    },
    /// Frees the `n`-th admission's slot.
    Release {
        n: usize,
    },
    Usage {
        ws: WorkspaceId,
        limits: usize,
    },
}

/// What a call answered, without the parts that differ by design (reservation ids).
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Decision(Decision),
    Usage(Usage),
    Settled(Nanos),
    Released,
    Skipped,
}

fn normalize(d: Decision) -> Decision {
    match d {
        Decision::Admit {
            mut reservation,
            snapshot,
        } => {
            reservation.id = ReservationId(0);
            // Whether the answer waits for the settlement is the shared backend's alone (the
            // in-memory one settles before the answer leaves):
            // `redis_limiter::a_reservation_holding_a_slot_is_settled_before_its_answer`.
            reservation.settle_before_answer = false;
            Decision::Admit {
                reservation,
                snapshot,
            }
        }
        d => d,
    }
}

/// Runs `steps` (offset from `start`, op) on `limiter`; workspace ids are shifted by `ws_base`
/// so that cases never share state.
pub async fn run(
    limiter: &dyn Limiter,
    limits: &[Limits],
    start: Nanos,
    ws_base: WorkspaceId,
    steps: &[(Nanos, Op)],
) -> Vec<Out> {
    let mut admitted: Vec<(Reservation, usize)> = Vec::new();
    let mut settled = vec![];
    let mut out = Vec::new();
    for (offset, op) in steps {
        let now = start + offset;
        let o = match op {
            Op::Reserve {
                ws,
                limits: li,
                model,
                cost,
            } => {
                let d = limiter
                    .reserve(ws_base + ws, &limits[*li], *model, *cost, now)
                    .await
                    .unwrap();
                if let Decision::Admit { reservation, .. } = &d {
                    admitted.push((reservation.clone(), *li));
                    settled.push(false);
                }
                Out::Decision(normalize(d))
            }
            Op::Settle { n, actual } => match admitted.get(*n) {
                Some((r, li)) if !settled[*n] => {
                    settled[*n] = true;
                    let s = limiter.settle(r, &limits[*li], *actual, now).await.unwrap();
                    Out::Settled(s.at)
                }
                _ => Out::Skipped,
            },
            Op::Release { n } => match admitted.get_mut(*n) {
                Some((r, _)) if !settled[*n] => {
                    limiter.release_slot(r).await.unwrap();
                    Out::Released
                }
                _ => Out::Skipped,
            },
            Op::Usage { ws, limits: li } => Out::Usage(
                limiter
                    .usage(ws_base + ws, &limits[*li], now)
                    .await
                    .unwrap(),
            ),
        };
        out.push(o);
    }
    out
}

/// Runs a case on every backend, asserts they all answer as the in-memory one, and returns its
/// answers for the case's own expectations.
pub async fn conform(
    case: &str,
    limits: &[Limits],
    start: Nanos,
    setup: impl Fn(&Ledger, WorkspaceId),
    steps: &[(Nanos, Op)],
) -> Vec<Out> {
    let ws_base = (ReservationId::next().0 as u64 % 1_000_000_000) as i64 * 16;
    let ledger = Arc::new(Ledger::default());
    setup(&ledger, ws_base);
    let mut reference: Option<Vec<Out>> = None;
    for backend in backends(&ledger) {
        let got = run(&*backend.limiter, limits, start, ws_base, steps).await;
        match &reference {
            None => reference = Some(got),
            Some(want) => {
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(
                        w, g,
                        "{case}: {} answers step {i} ({:?}) unlike memory",
                        backend.name, steps[i]
                    );
                }
            }
        }
    }
    reference.expect("the in-memory backend always runs")
}

// ---------------------------------------------------------------------------------------------
// Helpers for the expectations
// ---------------------------------------------------------------------------------------------

fn t0() -> Nanos {
    datetime!(2024-03-10 12:00 UTC).unix_timestamp_nanos() as Nanos
}

fn tokens(n: u64) -> TokenCost {
    TokenCost {
        prompt: n,
        estimate: n,
    }
}

fn reserve(ws: WorkspaceId, model: Option<&'static str>, n: u64) -> Op {
    Op::Reserve {
        ws,
        limits: 0,
        model,
        cost: tokens(n),
    }
}

#[track_caller]
fn admitted(out: &Out) -> u64 {
    match out {
        Out::Decision(Decision::Admit { reservation, .. }) => reservation.held.tokens,
        other => panic!("expected an admission, got {other:?}"),
    }
}

#[track_caller]
fn denied(out: &Out) -> (DenialKind, LimitName, Nanos) {
    match out {
        Out::Decision(Decision::Deny { denial, .. }) => {
            (denial.kind, denial.limit, denial.retry_after)
        }
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[track_caller]
fn usage(out: &Out) -> &Usage {
    match out {
        Out::Usage(u) => u,
        other => panic!("expected a usage, got {other:?}"),
    }
}

fn l() -> Limits {
    Limits::default()
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn requests_per_second_under_and_over() {
    let limits = [Limits {
        requests_per_second: Some(2.0),
        burst: Some(3),
        ..l()
    }];
    let steps = [
        (0, reserve(0, None, 0)),
        (0, reserve(0, None, 0)),
        (0, reserve(0, None, 0)),
        (0, reserve(0, None, 0)),
        (500 * MS - 1, reserve(0, None, 0)),
        (500 * MS, reserve(0, None, 0)),
        (500 * MS, reserve(0, None, 0)),
    ];
    let out = conform("rps", &limits, t0(), |_, _| {}, &steps).await;
    for o in &out[..3] {
        admitted(o);
    }
    assert_eq!(
        denied(&out[3]),
        (
            DenialKind::RateLimited,
            LimitName::RequestsPerSecond,
            500 * MS
        )
    );
    assert_eq!(denied(&out[4]).2, 1);
    admitted(&out[5]);
    denied(&out[6]);
}

#[tokio::test]
async fn tokens_per_minute_under_and_over_with_settlement_debt_and_refund() {
    let limits = [Limits {
        tokens_per_minute: Some(600),
        ..l()
    }];
    let steps = [
        (0, reserve(0, None, 500)),
        (0, reserve(0, None, 100)),
        (0, reserve(0, None, 1)),
        // Settled above the reservation: debt.
        (0, Op::Settle { n: 0, actual: 800 }),
        (0, Op::Usage { ws: 0, limits: 0 }),
        // Refund: nothing was used.
        (SEC, Op::Settle { n: 1, actual: 0 }),
        (SEC, Op::Usage { ws: 0, limits: 0 }),
        (SEC, reserve(0, None, 10)),
        (40 * SEC, reserve(0, None, 200)),
    ];
    let out = conform("tpm", &limits, t0(), |_, _| {}, &steps).await;
    assert_eq!(admitted(&out[0]), 500);
    assert_eq!(admitted(&out[1]), 100);
    assert_eq!(
        denied(&out[2]),
        (
            DenialKind::RateLimited,
            LimitName::TokensPerMinute,
            100 * MS
        )
    );
    assert_eq!(usage(&out[4]).bucket_tokens, Some(-300));
    assert_eq!(usage(&out[6]).bucket_tokens, Some(-190));
    denied(&out[7]);
    assert_eq!(admitted(&out[8]), 200);
}

#[tokio::test]
async fn tokens_per_month_from_the_ledger_under_and_over() {
    let limits = [Limits {
        tokens_per_month: Some(1_000),
        ..l()
    }];
    let month = MonthKey::of(t0());
    let steps = [
        (0, reserve(0, None, 100)),
        (0, reserve(0, None, 1)),
        (0, Op::Settle { n: 0, actual: 50 }),
        (0, reserve(0, None, 50)),
        (0, reserve(0, None, 1)),
        (0, Op::Usage { ws: 0, limits: 0 }),
        (0, reserve(1, None, 1_000)),
        (0, reserve(1, None, 1_001)),
    ];
    let out = conform(
        "month",
        &limits,
        t0(),
        |ledger, base| ledger.add(base, month, "m", 900, Some("an-old-generation")),
        &steps,
    )
    .await;
    admitted(&out[0]);
    let (kind, limit, wait) = denied(&out[1]);
    assert_eq!(
        (kind, limit),
        (DenialKind::QuotaExceeded, LimitName::TokensPerMonth)
    );
    assert_eq!(wait, month.next().start() - t0());
    admitted(&out[3]);
    denied(&out[4]);
    let u = usage(&out[5]);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (950, 50));
    admitted(&out[6]);
    assert_eq!(denied(&out[7]).0, DenialKind::RequestTooLarge);
}

#[tokio::test]
async fn concurrency_under_and_over_with_early_release() {
    let limits = [Limits {
        concurrent_requests: Some(2),
        ..l()
    }];
    let steps = [
        (0, reserve(0, None, 0)),
        (0, reserve(0, None, 0)),
        (0, reserve(0, None, 0)),
        (0, Op::Release { n: 0 }),
        (0, reserve(0, None, 0)),
        (0, Op::Settle { n: 0, actual: 0 }),
        (0, reserve(0, None, 0)),
        (0, Op::Settle { n: 1, actual: 0 }),
        (0, Op::Usage { ws: 0, limits: 0 }),
        (0, reserve(0, None, 0)),
    ];
    let out = conform("concurrency", &limits, t0(), |_, _| {}, &steps).await;
    admitted(&out[0]);
    admitted(&out[1]);
    assert_eq!(
        denied(&out[2]),
        (DenialKind::RateLimited, LimitName::ConcurrentRequests, SEC)
    );
    admitted(&out[4]);
    // Settling a released reservation does not free a second slot.
    denied(&out[6]);
    assert_eq!(usage(&out[8]).in_flight, 1);
    admitted(&out[9]);
}

#[tokio::test]
async fn per_model_limits_only_that_model() {
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "big".to_string(),
        ModelLimits {
            tokens_per_minute: Some(100),
            tokens_per_month: Some(150),
        },
    );
    let limits = [Limits {
        tokens_per_minute: Some(1_000),
        models,
        ..l()
    }];
    let steps = [
        (0, reserve(0, Some("big"), 100)),
        (0, reserve(0, Some("big"), 1)),
        (0, reserve(0, Some("small"), 500)),
        (0, Op::Settle { n: 0, actual: 100 }),
        (60 * SEC, reserve(0, Some("big"), 51)),
        (60 * SEC, reserve(0, Some("big"), 50)),
        (60 * SEC, reserve(0, Some("big"), 101)),
        (61 * SEC, Op::Usage { ws: 0, limits: 0 }),
    ];
    let out = conform("models", &limits, t0(), |_, _| {}, &steps).await;
    admitted(&out[0]);
    assert_eq!(denied(&out[1]).1, LimitName::ModelTokensPerMinute);
    admitted(&out[2]);
    assert_eq!(
        denied(&out[4]).0..=denied(&out[4]).0,
        DenialKind::QuotaExceeded..=DenialKind::QuotaExceeded
    );
    assert_eq!(denied(&out[4]).1, LimitName::ModelTokensPerMonth);
    admitted(&out[5]);
    assert_eq!(denied(&out[6]).0, DenialKind::RequestTooLarge);
    // Per model: "big" has 100 + 50 of its month and refills its minute; "small" has no
    // limits of its own and is not listed.
    let u = usage(&out[7]);
    assert_eq!(u.models.len(), 1);
    let big = &u.models[0];
    assert_eq!((big.model.as_str(), big.month_used), ("big", 150));
    assert_eq!(big.month.as_ref().unwrap().remaining, 0);
    let minute = big.tokens.as_ref().unwrap();
    assert!(
        minute.remaining > 50 && minute.remaining < 100,
        "{minute:?}"
    );
}

#[tokio::test]
async fn a_denial_consumes_nothing_in_any_dimension() {
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "m".to_string(),
        ModelLimits {
            tokens_per_minute: Some(200),
            tokens_per_month: Some(1_000),
        },
    );
    let limits = [Limits {
        requests_per_second: Some(1.0),
        burst: Some(2),
        tokens_per_minute: Some(600),
        tokens_per_month: Some(10_000),
        concurrent_requests: Some(2),
        models,
        key: None,
    }];
    let steps = [
        (0, reserve(0, Some("m"), 150)),
        // Denied by the model's tokens/minute alone: takes nothing from anything else.
        (0, reserve(0, Some("m"), 100)),
        (0, Op::Usage { ws: 0, limits: 0 }),
        (0, reserve(0, None, 450)),
        // Denied by requests/s, tokens/minute and concurrency at once.
        (0, reserve(0, None, 1)),
        (0, Op::Usage { ws: 0, limits: 0 }),
        (0, Op::Settle { n: 0, actual: 150 }),
        (0, Op::Settle { n: 1, actual: 450 }),
        (SEC, reserve(0, None, 10)),
    ];
    let out = conform("atomic", &limits, t0(), |_, _| {}, &steps).await;
    admitted(&out[0]);
    assert_eq!(denied(&out[1]).1, LimitName::ModelTokensPerMinute);
    let u = usage(&out[2]);
    assert_eq!(
        (u.in_flight, u.month_reserved_tokens, u.bucket_tokens),
        (1, 150, Some(450))
    );
    // The model's own limits: what it took, and nothing of the denied request.
    assert_eq!(u.models.len(), 1);
    let m = &u.models[0];
    assert_eq!(m.model, "m");
    assert_eq!(m.tokens.as_ref().unwrap().remaining, 50);
    assert_eq!(
        (m.month_used, m.month.as_ref().unwrap().remaining),
        (150, 850)
    );
    assert_eq!(u.snapshot.requests.unwrap().remaining, 1);
    admitted(&out[3]);
    // The longest wait is named: tokens/minute needs 1 s for 10 tokens; requests/s 1 s too,
    // concurrency 1 s; a tie names the last checked.
    let (kind, _, wait) = denied(&out[4]);
    assert_eq!((kind, wait), (DenialKind::RateLimited, SEC));
    assert_eq!(usage(&out[5]), usage(&out[5]));
    let u = usage(&out[5]);
    assert_eq!(
        (u.in_flight, u.month_reserved_tokens, u.bucket_tokens),
        (2, 600, Some(0))
    );
    admitted(&out[8]);
}

#[tokio::test]
async fn a_keys_own_limits_in_the_same_decision_as_its_workspaces() {
    let workspace = Limits {
        requests_per_second: Some(10.0),
        burst: Some(10),
        tokens_per_minute: Some(1_000),
        tokens_per_month: Some(10_000),
        ..l()
    };
    let key = KeyScope {
        id: 1,
        limits: KeyLimits {
            requests_per_second: Some(1.0),
            burst: Some(2),
            tokens_per_minute: Some(300),
            tokens_per_month: Some(500),
        },
    };
    // Key 1 with limits of its own; key 2 of the same workspace without.
    let limits = [
        Limits {
            key: Some(key),
            ..workspace.clone()
        },
        workspace.clone(),
    ];
    let with_key = |n: u64| Op::Reserve {
        ws: 0,
        limits: 0,
        model: None,
        cost: tokens(n),
    };
    let other_key = |n: u64| Op::Reserve {
        ws: 0,
        limits: 1,
        model: None,
        cost: tokens(n),
    };
    let month = MonthKey::of(t0());
    let steps = [
        // The workspace's state exists before the key's: the key's month starts from the ledger.
        (0, other_key(100)),
        (0, with_key(100)),
        (0, with_key(100)),
        // The key's burst is spent; the workspace's is not.
        (0, with_key(10)),
        // Another key of the workspace still has the workspace's room.
        (0, other_key(400)),
        (0, Op::Usage { ws: 0, limits: 0 }),
        // 1 s later: the key's bucket holds 105 tokens, the workspace's plenty.
        (SEC, with_key(150)),
        (SEC, Op::Usage { ws: 0, limits: 0 }),
        // Refunded: the key gets its tokens back, this month and this minute.
        (SEC, Op::Settle { n: 1, actual: 0 }),
        (SEC, with_key(150)),
        // Month: 100 (ledger) + 100 held + 150 held + 200 > 500.
        (2 * SEC, with_key(200)),
        (2 * SEC, with_key(600)),
    ];
    let out = conform(
        "key",
        &limits,
        t0(),
        |ledger, base| {
            ledger.add_for_key(base, month, "", 100, Some("an-old-generation"), Some(1));
            ledger.add_for_key(base, month, "", 1_000, None, Some(2));
        },
        &steps,
    )
    .await;
    admitted(&out[0]);
    admitted(&out[1]);
    assert_eq!(admitted(&out[2]), 100);
    // The headers show, per dimension, the tighter of the key's and the workspace's.
    match &out[2] {
        Out::Decision(Decision::Admit { snapshot, .. }) => {
            let requests = snapshot.requests.unwrap();
            assert_eq!((requests.limit, requests.remaining), (1.0, 0));
            let tokens = snapshot.tokens.unwrap();
            assert_eq!((tokens.limit, tokens.remaining), (300.0, 100));
            let month = snapshot.month.unwrap();
            // The workspace: 10,000 - 1,100 (ledger) - 300; the key: 500 - 100 - 200.
            assert_eq!((month.limit, month.remaining), (500.0, 200));
        }
        other => panic!("expected an admission, got {other:?}"),
    }
    let (kind, limit, wait) = denied(&out[3]);
    assert_eq!(
        (kind, limit, wait),
        (
            DenialKind::RateLimited,
            LimitName::KeyRequestsPerSecond,
            SEC
        )
    );
    admitted(&out[4]);
    let u = usage(&out[5]);
    // The workspace took the four admissions and nothing of the denial.
    assert_eq!(u.bucket_tokens, Some(1_000 - 700));
    assert_eq!(u.snapshot.requests.unwrap().remaining, 6);
    let k = u.key.as_ref().expect("the key's windows");
    assert_eq!(k.requests.unwrap().remaining, 0);
    assert_eq!(k.tokens.unwrap().remaining, 100);
    assert_eq!(k.month.unwrap().remaining, 200);
    let (kind, limit, _) = denied(&out[6]);
    assert_eq!(
        (kind, limit),
        (DenialKind::RateLimited, LimitName::KeyTokensPerMinute)
    );
    let u = usage(&out[7]);
    // Nothing of the denial, in the workspace or the key (the key refilled 5 tokens a second).
    assert_eq!(u.bucket_tokens, Some(1_000 - 700 + 16));
    let k = u.key.as_ref().unwrap();
    assert_eq!(
        (k.requests.unwrap().remaining, k.tokens.unwrap().remaining),
        (1, 105)
    );
    assert_eq!(admitted(&out[9]), 150);
    let (kind, limit, _) = denied(&out[10]);
    assert_eq!(
        (kind, limit),
        (DenialKind::QuotaExceeded, LimitName::KeyTokensPerMonth)
    );
    assert_eq!(denied(&out[11]).0, DenialKind::RequestTooLarge);
}

#[tokio::test]
async fn limit_changes_keep_what_was_used() {
    let limits = [
        Limits {
            requests_per_second: Some(1.0),
            burst: Some(4),
            tokens_per_minute: Some(600),
            ..l()
        },
        Limits {
            requests_per_second: Some(2.0),
            burst: Some(8),
            tokens_per_minute: Some(1_200),
            ..l()
        },
        Limits {
            requests_per_second: Some(0.5),
            burst: Some(1),
            tokens_per_minute: Some(100),
            ..l()
        },
    ];
    let at = |li: usize, n: u64| Op::Reserve {
        ws: 0,
        limits: li,
        model: None,
        cost: tokens(n),
    };
    let steps = [
        (0, at(0, 300)),
        (0, at(0, 300)),
        (0, at(0, 1)),
        // Upgrade: 600 more tokens and 4 more requests at once.
        (0, at(1, 600)),
        (0, Op::Usage { ws: 0, limits: 1 }),
        // Downgrade: what was used stays used, the debt floored at one minute of the new limit
        // (-100); and it refills at the rate it was used under until the next admission (1 s of
        // 1,200 tokens/minute).
        (SEC, at(2, 1)),
        (SEC, Op::Usage { ws: 0, limits: 2 }),
    ];
    let out = conform("limit change", &limits, t0(), |_, _| {}, &steps).await;
    admitted(&out[0]);
    admitted(&out[1]);
    denied(&out[2]);
    admitted(&out[3]);
    assert_eq!(usage(&out[4]).bucket_tokens, Some(0));
    denied(&out[5]);
    assert_eq!(usage(&out[6]).bucket_tokens, Some(-80));
}

/// Limits lowered after a pause: what had refilled under the old limits stays refilled, so a
/// workspace that was idle starts the new ones full (an outside audit: an idle workspace moved
/// from 10/s to 1/s was told to wait 4.7 s, and one moved to 600 tokens/minute a minute after
/// it had used 60,000 had 10 left).
#[tokio::test]
async fn limits_lowered_after_a_pause_start_full() {
    let limits = [
        Limits {
            requests_per_second: Some(10.0),
            burst: Some(10),
            ..l()
        },
        Limits {
            requests_per_second: Some(1.0),
            ..l()
        },
        Limits {
            tokens_per_minute: Some(60_000),
            ..l()
        },
        Limits {
            tokens_per_minute: Some(600),
            ..l()
        },
    ];
    let at = |ws: WorkspaceId, li: usize, n: u64| Op::Reserve {
        ws,
        limits: li,
        model: None,
        cost: tokens(n),
    };
    let mut steps = vec![(0, at(1, 2, 60_000))];
    steps.extend((0..10).map(|_| (0, at(0, 0, 1))));
    steps.extend([
        (0, at(0, 0, 1)),
        // A second later the ten have refilled at 10/s: the lowered rate's burst of one is whole,
        // and the one after it is over.
        (SEC, at(0, 1, 1)),
        (SEC, at(0, 1, 1)),
        // A minute and a second after 60,000 tokens: refilled at 60,000 a minute, so 600 whole.
        (61 * SEC, Op::Usage { ws: 1, limits: 3 }),
        (61 * SEC, at(1, 3, 600)),
        (61 * SEC, at(1, 3, 1)),
    ]);
    let out = conform("lowered after a pause", &limits, t0(), |_, _| {}, &steps).await;
    assert_eq!(admitted(&out[0]), 60_000);
    for o in &out[1..11] {
        admitted(o);
    }
    assert_eq!(denied(&out[11]).1, LimitName::RequestsPerSecond);
    admitted(&out[12]);
    let (kind, limit, retry) = denied(&out[13]);
    assert_eq!(
        (kind, limit),
        (DenialKind::RateLimited, LimitName::RequestsPerSecond)
    );
    assert_eq!(
        retry, SEC,
        "one request a second from the one just admitted"
    );
    assert_eq!(usage(&out[14]).bucket_tokens, Some(600));
    assert_eq!(admitted(&out[15]), 600);
    assert_eq!(denied(&out[16]).1, LimitName::TokensPerMinute);
}

#[tokio::test]
async fn month_rollover_between_reservation_and_settlement() {
    let limits = [Limits {
        tokens_per_month: Some(1_000),
        ..l()
    }];
    let start = datetime!(2024-03-31 23:59:59 UTC).unix_timestamp_nanos() as Nanos;
    let march = MonthKey::of(start);
    let steps = [
        (0, reserve(0, None, 400)),
        (0, reserve(0, None, 400)),
        (0, Op::Usage { ws: 0, limits: 0 }),
        // Settled in April: counts in April; March's hold is gone with March.
        (2 * SEC, Op::Settle { n: 0, actual: 300 }),
        (2 * SEC, Op::Usage { ws: 0, limits: 0 }),
        (2 * SEC, reserve(0, None, 700)),
        (2 * SEC, reserve(0, None, 1)),
    ];
    let out = conform(
        "rollover",
        &limits,
        start,
        |ledger, base| ledger.add(base, march, "", 300, None),
        &steps,
    )
    .await;
    admitted(&out[0]);
    assert_eq!(denied(&out[1]).1, LimitName::TokensPerMonth);
    assert_eq!(usage(&out[2]).month_settled_tokens, 300);
    let u = usage(&out[4]);
    assert_eq!((u.month_settled_tokens, u.month_reserved_tokens), (300, 0));
    admitted(&out[5]);
    denied(&out[6]);
}

#[tokio::test]
async fn settling_twice_counts_once() {
    let limits = [Limits {
        tokens_per_minute: Some(600),
        tokens_per_month: Some(10_000),
        concurrent_requests: Some(1),
        ..l()
    }];
    let ledger = Arc::new(Ledger::default());
    let ws = (ReservationId::next().0 as u64 % 1_000_000_000) as i64 * 16;
    for backend in backends(&ledger) {
        let limiter = &backend.limiter;
        let now = t0();
        let Decision::Admit { reservation, .. } = limiter
            .reserve(ws, &limits[0], None, tokens(100), now)
            .await
            .unwrap()
        else {
            panic!("{}: denied", backend.name)
        };
        let a = limiter
            .settle(&reservation, &limits[0], 300, now)
            .await
            .unwrap();
        // Retried 5 s later, as the ledger writer retries one whose answer was lost.
        let b = limiter
            .settle(&reservation, &limits[0], 300, now + 5 * SEC)
            .await
            .unwrap();
        assert_eq!(a.counter, b.counter, "{}", backend.name);
        let u = limiter.usage(ws, &limits[0], now).await.unwrap();
        assert_eq!(
            (u.month_settled_tokens, u.in_flight, u.bucket_tokens),
            (300, 0, Some(300)),
            "{}",
            backend.name
        );
    }
}

/// The largest limits validation accepts, at a time far in the future: every backend stays
/// exact (the Redis script computes in doubles).
#[tokio::test]
async fn extremes_stay_exact_on_every_backend() {
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "m".to_string(),
        ModelLimits {
            tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
            tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
        },
    );
    let limits = [
        Limits {
            requests_per_second: Some(MAX_REQUESTS_PER_SECOND),
            burst: Some(MAX_BURST),
            tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
            tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
            concurrent_requests: Some(1_000_000),
            models: models.clone(),
            key: None,
        },
        Limits {
            requests_per_second: Some(0.001),
            burst: Some(MAX_BURST),
            tokens_per_minute: Some(1),
            tokens_per_month: Some(1),
            ..l()
        },
    ];
    for l in &limits {
        l.validate().unwrap();
    }
    // 2200-12-31: times near 7.3e15 µs, still below 2^53.
    let start = datetime!(2200-12-31 23:59:00 UTC).unix_timestamp_nanos() as Nanos;
    let big = |n: u64| Op::Reserve {
        ws: 0,
        limits: 0,
        model: Some("m"),
        cost: tokens(n),
    };
    let small = |n: u64| Op::Reserve {
        ws: 1,
        limits: 1,
        model: None,
        cost: tokens(n),
    };
    let steps = [
        (0, big(MAX_TOKENS_PER_MINUTE)),
        (0, big(1)),
        (
            0,
            Op::Settle {
                n: 0,
                actual: 100_000_000_000,
            },
        ),
        (0, Op::Usage { ws: 0, limits: 0 }),
        (30 * SEC, Op::Usage { ws: 0, limits: 0 }),
        (0, small(1)),
        (0, small(1)),
        (0, Op::Usage { ws: 1, limits: 1 }),
        (59 * SEC, Op::Usage { ws: 1, limits: 1 }),
    ];
    let out = conform("extremes", &limits, start, |_, _| {}, &steps).await;
    assert_eq!(admitted(&out[0]), MAX_TOKENS_PER_MINUTE);
    assert_eq!(denied(&out[1]).1, LimitName::ModelTokensPerMinute);
    // Settled far above: the bucket's debt is floored at one minute.
    assert_eq!(
        usage(&out[3]).bucket_tokens,
        Some(-(MAX_TOKENS_PER_MINUTE as i64))
    );
    assert_eq!(usage(&out[3]).month_settled_tokens, 100_000_000_000);
    assert_eq!(
        usage(&out[4]).bucket_tokens,
        Some(-(MAX_TOKENS_PER_MINUTE as i64) / 2)
    );
    admitted(&out[5]);
    assert_eq!(denied(&out[6]).1, LimitName::TokensPerMonth);
}

// ---------------------------------------------------------------------------------------------
// Random sequences: every backend answers as the in-memory one
// ---------------------------------------------------------------------------------------------

fn shapes() -> Vec<Limits> {
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "m".to_string(),
        ModelLimits {
            tokens_per_minute: Some(300),
            tokens_per_month: Some(2_000),
        },
    );
    vec![
        Limits {
            requests_per_second: Some(2.5),
            burst: Some(3),
            tokens_per_minute: Some(600),
            tokens_per_month: Some(5_000),
            concurrent_requests: Some(2),
            models: models.clone(),
            key: None,
        },
        Limits {
            requests_per_second: Some(0.7),
            tokens_per_minute: Some(1_000),
            models,
            ..l()
        },
        Limits {
            requests_per_second: Some(10.0),
            burst: Some(1),
            tokens_per_month: Some(3_000),
            concurrent_requests: Some(1),
            ..l()
        },
        Limits {
            tokens_per_minute: Some(7),
            ..l()
        },
        // A key with limits of its own, beside the first shape's workspace limits.
        Limits {
            requests_per_second: Some(2.5),
            burst: Some(3),
            tokens_per_minute: Some(600),
            tokens_per_month: Some(5_000),
            key: Some(KeyScope {
                id: 7,
                limits: KeyLimits {
                    requests_per_second: Some(1.5),
                    burst: Some(2),
                    tokens_per_minute: Some(250),
                    tokens_per_month: Some(1_200),
                },
            }),
            ..l()
        },
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let model = prop_oneof![Just(None), Just(Some("m")), Just(Some("other"))];
    prop_oneof![
        4 => (0..2i64, 0..5usize, model, 0..400u64, 0..400u64).prop_map(|(ws, limits, model, p, e)| Op::Reserve {
            ws,
            limits,
            model,
            cost: TokenCost { prompt: p, estimate: p + e },
        }),
        3 => (0..12usize, 0..900u64).prop_map(|(n, actual)| Op::Settle { n, actual }),
        1 => (0..12usize).prop_map(|n| Op::Release { n }),
        1 => (0..2i64, 0..5usize).prop_map(|(ws, limits)| Op::Usage { ws, limits }),
    ]
}

fn gap() -> impl Strategy<Value = Nanos> {
    prop_oneof![3 => Just(0), 4 => 0..2 * SEC, 2 => 0..70 * SEC, 1 => Just(1_000), 1 => Just(999)]
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Starting at a quiet time, near a month's end, or at an odd nanosecond; with or without
    /// ledger usage: all backends agree call by call.
    #[test]
    fn random_sequences_agree_on_every_backend(
        start in prop_oneof![
            Just(datetime!(2024-03-10 12:00 UTC)),
            Just(datetime!(2024-02-29 23:59:30 UTC)),
            Just(datetime!(2024-03-10 12:00:00.000123457 UTC)),
        ],
        used in prop_oneof![Just(0u64), 0..6_000u64],
        gaps in proptest::collection::vec(gap(), 1..40),
        ops in proptest::collection::vec(op(), 40),
    ) {
        let start = start.unix_timestamp_nanos() as Nanos;
        let mut at = 0;
        let steps: Vec<(Nanos, Op)> = gaps.iter().zip(ops).map(|(g, op)| { at += g; (at, op) }).collect();
        let limits = shapes();
        let month = MonthKey::of(start);
        runtime().block_on(conform(
            "random",
            &limits,
            start,
            |ledger, base| {
                if used > 0 {
                    ledger.add(base, month, "m", used / 2, None);
                    ledger.add(base + 1, month, "", used, Some("gone"));
                }
            },
            &steps,
        ));
    }
}

/// Model names are the client's choice: past `MAX_TRACKED_MODELS` models in a month, a model
/// without a limit of its own is not counted apart (on every backend alike), while the models
/// already counted keep their counts, and the workspace's total counts everything.
#[tokio::test]
async fn the_models_counted_apart_are_bounded() {
    use tiergate::limiter::core::MAX_TRACKED_MODELS;
    let names: Vec<&'static str> = (0..MAX_TRACKED_MODELS + 20)
        .map(|i| &*Box::leak(format!("made-up-{i}").into_boxed_str()))
        .collect();
    let last = *names.last().unwrap();
    let mut models = std::collections::BTreeMap::new();
    for m in [names[0], last] {
        models.insert(
            m.to_string(),
            ModelLimits {
                tokens_per_minute: None,
                tokens_per_month: Some(100),
            },
        );
    }
    let limits = [l(), Limits { models, ..l() }];
    let mut steps = Vec::new();
    for (i, m) in names.iter().enumerate() {
        steps.push((
            0,
            Op::Reserve {
                ws: 0,
                limits: 0,
                model: Some(*m),
                cost: tokens(10),
            },
        ));
        steps.push((0, Op::Settle { n: i, actual: 10 }));
    }
    let probe = |model| Op::Reserve {
        ws: 0,
        limits: 1,
        model: Some(model),
        cost: tokens(95),
    };
    steps.push((SEC, probe(names[0])));
    steps.push((SEC, probe(last)));
    steps.push((SEC, Op::Usage { ws: 0, limits: 1 }));
    let out = conform("bounded models", &limits, t0(), |_, _| {}, &steps).await;
    let n = out.len();
    // The first model was counted apart: 10 + 95 is over its 100.
    assert_eq!(denied(&out[n - 3]).1, LimitName::ModelTokensPerMonth);
    // The last one came past the bound: nothing counted for it, 95 fits.
    assert_eq!(admitted(&out[n - 2]), 95);
    assert_eq!(
        usage(&out[n - 1]).month_settled_tokens,
        10 * names.len() as u64
    );
}
