//! What the shared limiter does when Redis does not answer.
//!
//! # Design
//! `Failover` puts the Redis limiter behind a circuit breaker and a failure policy:
//! - Every Redis call has a short timeout (`redis_timeout_ms`, 50 ms by default), so no request
//!   waits longer than that because Redis is down. After `TRIP_AFTER` consecutive failures the
//!   breaker opens: requests stop calling Redis at all, and a probe pings it every
//!   `PROBE_EVERY` until it answers, then the breaker closes. In a Redis Cluster there is a
//!   breaker per hash slot, probed through the master that holds it: a master that dies trips
//!   only the workspaces whose keys it holds, and another master answering says nothing of it.
//!   (The Redis limiter keeps its cluster connection through a node's failure: made anew, it
//!   would connect to every master, and a hung one would hold up every call.) Each transition is logged once and
//!   counted in `/metrics`.
//! - While Redis cannot answer, the policy decides:
//!   - `closed`: deny with `503 limiter_unavailable` and `Retry-After`;
//!   - `open`: admit without limits, and count it;
//!   - `local` (the default): each instance enforces its share of every limit in memory, so
//!     that the sum over the instances stays within the limit. The share is 1/N of each rate
//!     and capacity (with the remainder of small integers given to the lowest ranks), and 1/N of
//!     what was left of each month quota when the instance first fell back. N is `instances`
//!     when configured, else the count of live instances that their heartbeats in Redis
//!     showed, held for `COUNT_HELD_FOR` when it drops (`HeldCount`); when neither is known,
//!     the instance denies as under `closed`. A share taken up counts in flight this
//!     instance's own requests admitted through Redis that still run (`Failover::seeded`),
//!     each until it ends.
//! - A request whose own call failed while the breaker was still closed is decided by the
//!   policy too, and is carried back like the others (below), as soon as Redis answers.
//! - Every reservation is settled where it was made (but for those carried back, below). Usage
//!   admitted by the fallback reaches the
//!   ledger (untagged, so any later counter generation counts it), and once Redis answers for it
//!   (or at the workspace's next decision, if that comes first) a new generation of such a
//!   workspace's month counter starts, which is then rebuilt from the ledger: nothing used
//!   during the outage is lost. It carries back what the instance's share used that Redis does not know (`Carry`): what the share's
//!   requests and tokens-per-minute buckets lack is taken from Redis's, which refilled
//!   meanwhile; and its requests still running (`Failover::alone`) each become a reservation of
//!   the new generation under its own id, renewed as the instance's own are (the ledger has
//!   none of their tokens yet). Those are then settled in Redis, not on the share
//!   (`Failover::carried`), so their usage counts once, in that generation. A carry whose call
//!   failed is sent again as it was, and taken in once (`Pending`).
//!
//! `local` is the default because it keeps serving while still protecting the upstream: a
//! Redis outage neither becomes an API outage (`closed`) nor opens the gate (`open`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::core::{request_rate, MonthKey};
use super::local::LocalLimiter;
use super::redis::{Carry, RedisLimiter, TOMBSTONE};
use super::{
    Answer, Decision, Denial, DenialKind, Held, LimitName, Limiter, LimiterError, Nanos, Origin,
    Reservation, ReservationId, Settled, Snapshot, TokenCost, Usage, NANOS_PER_SEC,
};
use crate::clock::Clock;
use crate::config::FailurePolicy;
use crate::metrics::Metrics;
use crate::model::{Limits, WorkspaceId};

/// Consecutive failed calls that open the breaker.
const TRIP_AFTER: u32 = 3;
/// How often an open breaker pings Redis.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long the breaker must stay closed before the local shares of the last outage are
/// forgotten. Cleared at once, a breaker that opens and closes again and again (one cluster
/// node stalled while the others answer) gave every workspace a fresh local burst at each
/// close: an outside audit measured 1.6 times a workspace's rate over a 6 s stall.
const LOCAL_KEPT_FOR: Duration = Duration::from_secs(10);
/// How often an instance announces itself, and how long the announcement lasts. A heartbeat
/// that finds this instance missing tells it that Redis lost what it held (restarted empty or
/// flushed), and it holds its running requests again at once: checked every 250 ms, since until
/// then the other instances' decisions do not count them (an outside audit: a month quota and a
/// concurrency limit exceeded for the 5 s until the next lease renewal, after a Redis restart
/// too quick to open the breaker).
const HEARTBEAT_EVERY: Duration = PROBE_EVERY;
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// How long a count of live instances is held after it was last seen, when later heartbeats
/// see fewer. After Redis restarts empty, the instances announce themselves again one by one:
/// the first to do so sees itself alone, and had Redis failed again then, it took the whole
/// limit as its share (an outside audit measured 1.8 times the rate across three instances).
/// Held, a count that drops takes effect only once it has stayed lower this long.
const COUNT_HELD_FOR: Duration = Duration::from_secs(30);

/// The open flag of a slot's breaker, beside its count of consecutive failures.
const OPEN: u32 = 1 << 31;
/// The most slots whose probes run in one round.
const PROBES_AT_ONCE: usize = 32;

/// The circuit breakers: one per hash slot of a Redis Cluster (one in all for a single server),
/// so that a master that stops answering trips only the workspaces whose keys it holds, and
/// the others keep deciding through Redis. Each counts its consecutive failed calls and opens at
/// `TRIP_AFTER`. 16384 slots of 4 bytes: 64 KiB.
struct Breakers {
    slots: Box<[AtomicU32]>,
    /// How many are open now: 0 for nearly every call, which then looks no further.
    open: AtomicUsize,
    /// Per slot with failures, the workspace whose call failed last there (`None`: the
    /// instances' own keys): its probe asks the node that holds them.
    failing: Mutex<HashMap<usize, Option<WorkspaceId>>>,
}

/// The largest count of live instances the heartbeats showed lately (`COUNT_HELD_FOR`).
#[derive(Debug, Default)]
struct HeldCount {
    count: u32,
    /// When `count` was last seen.
    seen_at: Option<tokio::time::Instant>,
}

impl HeldCount {
    /// The place (count, rank) the local share is to use, given a heartbeat's (count, rank)
    /// seen `at`: that one, unless a larger count was seen within `COUNT_HELD_FOR`; then that
    /// count, with the last rank (the smallest share: this instance's place among them is not
    /// known).
    fn place(&mut self, count: u32, rank: u32, at: tokio::time::Instant) -> (u32, u32) {
        let held = self
            .seen_at
            .is_some_and(|seen| at.saturating_duration_since(seen) < COUNT_HELD_FOR);
        if count >= self.count || !held {
            self.count = count;
            self.seen_at = Some(at);
            (count, rank)
        } else {
            (self.count, self.count - 1)
        }
    }
}

impl HeldCount {
    /// The place to use when no heartbeat could be read at `at` (Redis down), given the last
    /// one heard, `last`: the hold ends `COUNT_HELD_FOR` after the larger count was last seen,
    /// heard from Redis or not. Kept until a heartbeat was heard again, it lasted the whole
    /// outage: after a rolling restart (whose stopped instances' heartbeats live 3 s), every
    /// instance took the smallest share of a count of instances that no longer ran, and a
    /// concurrency limit below it was refused by all of them (an outside audit).
    fn unheard(
        &mut self,
        last: Option<(u32, u32)>,
        at: tokio::time::Instant,
    ) -> Option<(u32, u32)> {
        last.map(|(count, rank)| self.place(count, rank, at))
    }
}

/// (instances, this one's rank) for the local share: the count `instances` gives, else the one
/// the heartbeats showed (`seen`: count in the high half, rank in the low; 0 unknown; held, see
/// `HeldCount`).
fn local_place(configured: Option<u32>, seen: u64) -> Option<(u32, u32)> {
    let (n, rank) = ((seen >> 32) as u32, seen as u32);
    match (configured, n) {
        // This instance's place unknown (no heartbeat seen yet) or past the count given
        // (more instances live than `instances` says): the last rank's share, the smallest,
        // so that instances unsure of their place never each take a remainder (two such
        // instances both took rank 0's, and together one more than the burst).
        (Some(c), n) if n == 0 || rank >= c => Some((c, c.saturating_sub(1))),
        (Some(c), _) => Some((c, rank)),
        (None, 0) => None,
        (None, n) => Some((n, rank)),
    }
}

pub struct Failover {
    shared: Arc<RedisLimiter>,
    local: Arc<LocalLimiter>,
    policy: FailurePolicy,
    configured_instances: Option<u32>,
    /// (instances, this one's rank) as the last heartbeat saw them; 0 instances = unknown.
    seen: AtomicU64,
    breakers: Breakers,
    /// When the local shares are to be forgotten, once the breaker has stayed closed that long.
    forget_local_at: Mutex<Option<tokio::time::Instant>>,
    metrics: Arc<Metrics>,
    /// Workspaces decided without the shared limiter since it last answered: what their share
    /// used is carried back (`Carry`) and their month counter rebuilt from the ledger as soon as
    /// Redis answers for them (`rebuild_all`, from the watcher), or before their next shared
    /// decision if that comes first (`rebuild_if_due`). That includes a decision made on the
    /// share because one call timed out, the breaker still closed: not carried, the share's
    /// requests, tokens and slots were unknown to the other instances, which admitted the whole
    /// limit on top of them (an outside audit, 80 ms stalls against a 50 ms timeout that never
    /// opened the breaker: 58 requests where the limit allowed 43, a month quota used to 101%,
    /// 4 requests in flight of 3).
    /// With each, its limits then, for the rebuild the watcher starts.
    rebuild: Mutex<HashMap<WorkspaceId, Arc<Limits>>>,
    /// Carries whose call failed, sent again first (`Pending`).
    pending: Mutex<HashMap<WorkspaceId, Vec<Pending>>>,
    /// Workspaces whose share was carried back, Redis answering, with no decision on the share
    /// since: the next one starts the share anew (empty), as a fresh one.
    answered: Mutex<HashSet<WorkspaceId>>,
    /// Whether `rebuild_all` runs now.
    rebuilding: std::sync::atomic::AtomicBool,
    /// The gateway's clock, for the rebuilds the switch back starts itself.
    clock: Arc<dyn Clock>,
    /// What Redis last reported of each workspace with a decision, for the local shares
    /// (`Seen`).
    reported: Mutex<HashMap<WorkspaceId, Seen>>,
    /// Requests admitted on a local share not yet settled, at most `ALONE` of them: those still
    /// running at the switch back are carried into Redis (`Carry::running`).
    alone: Mutex<Alone>,
    /// Requests admitted on a local share that were carried into Redis at the switch back and
    /// are not yet settled there: Redis holds each as a reservation of its own, which they are
    /// settled into (and their slot freed through) as Redis's own are.
    carried: Mutex<HashSet<ReservationId>>,
    /// This instance's requests admitted through Redis that were still running when their
    /// workspace's local share was taken up: the share counts them in flight until each ends.
    seeded: Mutex<HashMap<ReservationId, WorkspaceId>>,
    /// Whether `seeded` may hold any: most settlements then look no further.
    any_seeded: std::sync::atomic::AtomicBool,
    /// Per workspace with a local share, how far below full its buckets were when last
    /// accounted for (`Accounted`), so that only what the share used since is carried back.
    accounted: Mutex<HashMap<WorkspaceId, Accounted>>,
    /// Per workspace with a local share, the share's limits last decided with, which its
    /// requests are settled under: settled under the workspace's whole limits, a share's
    /// tokens-per-minute bucket took their capacity, and refilled at the whole rate (an outside
    /// audit: each of three instances admitting about the workspace's minute during a stall).
    shares: Mutex<HashMap<WorkspaceId, Arc<Limits>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// This instance's name among the live ones (its heartbeat).
    instance: String,
}

/// How far below full a local share's buckets were at `at` without being the share's use: all
/// of the workspace's requests and tokens-per-minute buckets when the share was taken up (they
/// start empty), then, after each carry, whatever was carried. A bucket refills meanwhile, and
/// so does what it lacked: only what it lacks beyond that, `Accounted::owed`, is carried back.
/// Without it a share that took nothing gave Redis its empty start as use (an outside audit: a
/// 0.3 s stall took 290 of a workspace's 600 tokens a minute, three stalls put it in debt).
#[derive(Debug, Clone, Default)]
struct Accounted {
    at: Nanos,
    requests: f64,
    tokens: f64,
    /// The key's (its id, requests, tokens) and each model's tokens.
    key: Option<(crate::model::KeyId, f64, f64)>,
    models: HashMap<String, f64>,
}

impl Accounted {
    /// What a bucket lacking `lack` now owes, when it lacked `was` at `self.at` without use and
    /// refills `per_sec` a second.
    fn owed(&self, lack: u64, was: f64, per_sec: f64, now: Nanos) -> u64 {
        let elapsed = now.saturating_sub(self.at) as f64 / NANOS_PER_SEC as f64;
        lack.saturating_sub((was - per_sec * elapsed).max(0.0).ceil() as u64)
    }
}

/// Requests admitted on local shares that are remembered to be carried back (`Failover::alone`)
/// at most; past that, further ones are not carried (each about 100 bytes).
const ALONE: usize = 100_000;

/// A carry whose call failed: it may have been run all the same (it timed out on its way, or
/// while Redis stalled), so it is sent again as it was, under the same generation id, which
/// Redis takes in once (`RedisLimiter::new_generation`). Sent afresh instead, the same share's
/// use was taken from Redis several times over (an outside audit saw a minute's worth of tokens
/// in debt after a short stall); not sent again, what the share used was never carried.
struct Pending {
    generation: String,
    carry: Carry,
    /// When it was first sent.
    since: tokio::time::Instant,
}

/// How long a carry whose call failed is sent again (`Pending`): well within the life of the
/// record by which Redis knows it took the carry in (`TOMBSTONE`, from when it ran, which is
/// after it was first sent). Past that, its requests still running are let go in Redis and
/// settled on the share, and what its buckets lacked is not carried.
const CARRY_SENT_FOR: Duration = Duration::from_millis(TOMBSTONE.as_millis() as u64 / 2);

/// The requests admitted on local shares not yet settled, by workspace.
#[derive(Default)]
struct Alone {
    by_workspace: HashMap<WorkspaceId, HashMap<ReservationId, Reservation>>,
    len: usize,
}

impl Alone {
    fn insert(&mut self, reservation: &Reservation) {
        if self.len < ALONE {
            let held = self.by_workspace.entry(reservation.workspace).or_default();
            if held.insert(reservation.id, reservation.clone()).is_none() {
                self.len += 1;
            }
        }
    }

    fn remove(&mut self, reservation: &Reservation) {
        let ws = reservation.workspace;
        if let Some(held) = self.by_workspace.get_mut(&ws) {
            if held.remove(&reservation.id).is_some() {
                self.len -= 1;
            }
            if held.is_empty() {
                self.by_workspace.remove(&ws);
            }
        }
    }

    fn get_mut(&mut self, reservation: &Reservation) -> Option<&mut Reservation> {
        self.by_workspace
            .get_mut(&reservation.workspace)?
            .get_mut(&reservation.id)
    }

    /// The workspace's, admitted in `month`.
    fn of(&self, workspace: WorkspaceId, month: MonthKey) -> Vec<Reservation> {
        self.by_workspace
            .get(&workspace)
            .map_or_else(Vec::new, |held| {
                held.values()
                    .filter(|r| r.held.month == month)
                    .cloned()
                    .collect()
            })
    }
}

/// Workspaces whose figures are remembered (`Failover::reported`) at most; past that the
/// memory starts again (about 64 bytes each).
const MONTHS_SEEN: usize = 1 << 20;

/// What Redis last reported of a workspace with a decision.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The month's use (its own month window), the largest this month: the ledger a month share
    /// would start from lags by a flush and lacks the reservations in flight, which Redis counts.
    month: Option<(MonthKey, u64)>,
    /// When the latest decision was made, and the requests and tokens-per-minute windows' room
    /// left after it (the tightest of the workspace's, its key's and its model's, so never more
    /// than the workspace's own): where a share taken up starts from.
    at: Nanos,
    requests_left: Option<u64>,
    tokens_left: Option<u64>,
}

/// How long what Redis last said of a workspace's room is a share's start: past that the share
/// starts empty, as when nothing was seen. The other instances may have used that room since.
const ROOM_SEEN_FOR: Nanos = 10 * NANOS_PER_SEC;

impl Drop for Failover {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

/// Each instance's share of `limits` when `n` instances enforce them apart, for the instance of
/// `rank` (0-based). Integers that do not divide evenly give their remainder to the lowest
/// ranks, so that the shares add up to the limit and never more; but a burst is at least one
/// request, since a share of a rate that can never hold one request refuses every request
/// for as long as Redis is down (an outside audit: the free tier's 1 request a second, on two
/// instances, always refused by one of them). The rate is still split, so the instances
/// together admit no more than the rate; only after an idle spell may they admit up to N at
/// once where the burst is below N. Month quotas are shared from what was left when the
/// instance started counting on its own (`seeds`). `Err` names a limit whose share is nothing
/// at all.
pub fn share(
    limits: &Limits,
    n: u32,
    rank: u32,
    seeds: &(u64, HashMap<String, u64>),
) -> Result<Limits, LimitName> {
    let n = n.max(1);
    let split = |v: u64| v / n as u64 + u64::from((rank as u64) < v % n as u64);
    let mut out = limits.clone();
    if let Some(rps) = limits.requests_per_second {
        let milli = request_rate(rps) as u64 / n as u64;
        let burst = split(limits.effective_burst() as u64).max(1);
        if milli == 0 {
            return Err(LimitName::RequestsPerSecond);
        }
        out.requests_per_second = Some(milli as f64 / 1000.0);
        out.burst = Some(burst as u32);
    }
    if let Some(tpm) = limits.tokens_per_minute {
        match tpm / n as u64 {
            0 => return Err(LimitName::TokensPerMinute),
            t => out.tokens_per_minute = Some(t),
        }
    }
    let month = |cap: u64, seed: u64| month_share(cap, seed, n);
    if let Some(cap) = limits.tokens_per_month {
        out.tokens_per_month = Some(month(cap, seeds.0));
    }
    if let Some(c) = limits.concurrent_requests {
        match split(c as u64) {
            0 => return Err(LimitName::ConcurrentRequests),
            c => out.concurrent_requests = Some(c as u32),
        }
    }
    // A key's own limits are shared alike; its month by the caller, from the key's seed.
    if let Some(l) = out.key.as_mut().map(|k| &mut k.limits) {
        if let Some(rps) = l.requests_per_second {
            let milli = request_rate(rps) as u64 / n as u64;
            let burst = split(l.as_limits().effective_burst() as u64).max(1);
            if milli == 0 {
                return Err(LimitName::KeyRequestsPerSecond);
            }
            l.requests_per_second = Some(milli as f64 / 1000.0);
            l.burst = Some(burst as u32);
        }
        if let Some(tpm) = l.tokens_per_minute {
            match tpm / n as u64 {
                0 => return Err(LimitName::KeyTokensPerMinute),
                t => l.tokens_per_minute = Some(t),
            }
        }
    }
    for (model, l) in out.models.iter_mut() {
        if let Some(tpm) = l.tokens_per_minute {
            match tpm / n as u64 {
                0 => return Err(LimitName::ModelTokensPerMinute),
                t => l.tokens_per_minute = Some(t),
            }
        }
        if let Some(cap) = l.tokens_per_month {
            l.tokens_per_month = Some(month(cap, seeds.1.get(model).copied().unwrap_or(0)));
        }
    }
    Ok(out)
}

/// One instance's share of a month quota `cap` of which `seed` was used when it began counting
/// on its own.
fn month_share(cap: u64, seed: u64, n: u32) -> u64 {
    month_share_of(cap, seed, seed, n)
}

/// One instance's share of a month quota `cap`, for a counter that starts at `seed`, when
/// `used` (at least `seed`) is known to be used: a 1/N of what is left after `used`.
fn month_share_of(cap: u64, seed: u64, used: u64, n: u32) -> u64 {
    if seed >= cap {
        cap
    } else {
        seed + cap.saturating_sub(used.max(seed)) / n.max(1) as u64
    }
}

fn limit_value(limits: &Limits, name: LimitName) -> f64 {
    let key = limits.key.map(|k| k.limits).unwrap_or_default();
    match name {
        LimitName::KeyRequestsPerSecond => key.requests_per_second.unwrap_or(0.0),
        LimitName::KeyTokensPerMinute => key.tokens_per_minute.unwrap_or(0) as f64,
        LimitName::RequestsPerSecond => limits.requests_per_second.unwrap_or(0.0),
        LimitName::TokensPerMinute => limits.tokens_per_minute.unwrap_or(0) as f64,
        LimitName::ConcurrentRequests => limits.concurrent_requests.unwrap_or(0) as f64,
        _ => 0.0,
    }
}

impl Failover {
    pub fn new(
        shared: Arc<RedisLimiter>,
        local: Arc<LocalLimiter>,
        policy: FailurePolicy,
        configured_instances: Option<u32>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let slots = if shared.is_cluster() { 16384 } else { 1 };
        let failover = Arc::new(Failover {
            shared,
            local,
            policy,
            configured_instances,
            seen: AtomicU64::new(0),
            breakers: Breakers {
                slots: (0..slots).map(|_| AtomicU32::new(0)).collect(),
                open: AtomicUsize::new(0),
                failing: Mutex::new(HashMap::new()),
            },
            forget_local_at: Mutex::new(None),
            metrics,
            rebuild: Mutex::new(HashMap::new()),
            pending: Mutex::default(),
            answered: Mutex::default(),
            rebuilding: std::sync::atomic::AtomicBool::new(false),
            clock,
            reported: Mutex::new(HashMap::new()),
            alone: Mutex::new(Alone::default()),
            shares: Mutex::default(),
            carried: Mutex::new(HashSet::new()),
            seeded: Mutex::new(HashMap::new()),
            any_seeded: std::sync::atomic::AtomicBool::new(false),
            accounted: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            instance: super::ReservationId::next().to_string(),
        });
        let task = tokio::spawn(watch(Arc::downgrade(&failover)));
        failover
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        failover
    }

    /// Whether any breaker is open: some workspaces are decided without Redis.
    pub fn is_open(&self) -> bool {
        self.breakers.open.load(Ordering::Acquire) > 0
    }

    /// The breaker of `workspace`'s keys (`None`: the instances' own keys).
    fn slot(&self, workspace: Option<WorkspaceId>) -> usize {
        if self.breakers.slots.len() == 1 {
            0
        } else {
            usize::from(self.shared.slot_of(workspace))
        }
    }

    /// Whether calls for `workspace` are not made now.
    fn is_open_for(&self, workspace: WorkspaceId) -> bool {
        self.is_open()
            && self.breakers.slots[self.slot(Some(workspace))].load(Ordering::Acquire) & OPEN != 0
    }

    fn success(&self, workspace: Option<WorkspaceId>) {
        let slot = &self.breakers.slots[self.slot(workspace)];
        if slot.load(Ordering::Relaxed) != 0 {
            slot.fetch_and(OPEN, Ordering::Relaxed);
        }
    }

    fn failure(&self, error: &LimiterError, workspace: Option<WorkspaceId>) {
        Metrics::inc(&self.metrics.limiter_backend_errors);
        let s = self.slot(workspace);
        self.breakers
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s, workspace);
        let slot = &self.breakers.slots[s];
        let seen = slot.fetch_add(1, Ordering::AcqRel) + 1;
        if seen & !OPEN < TRIP_AFTER || seen & OPEN != 0 {
            return;
        }
        if slot.fetch_or(OPEN, Ordering::AcqRel) & OPEN != 0 {
            return;
        }
        // Said once per outage, not per slot: when the first opens.
        if self.breakers.open.fetch_add(1, Ordering::AcqRel) == 0 {
            // The shares of an outage just ended still hold: this is the same one.
            *self
                .forget_local_at
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            Metrics::inc(&self.metrics.limiter_breaker_opened);
            self.metrics.limiter_backend_up.set(0);
            tracing::error!(
                error = %error,
                policy = self.policy.as_str(),
                "Redis is not answering: the shared limiter stops calling it for the workspaces it holds (in a cluster, those of the master that failed) and applies the failure policy to them until it is back"
            );
        }
    }

    /// Closes the breaker of slot `s` (its probe was answered).
    fn close(&self, s: usize) {
        if self.breakers.slots[s].swap(0, Ordering::AcqRel) & OPEN == 0 {
            return;
        }
        // The failure may have outlasted the leases of this instance's requests still running
        // through Redis (it then let them go), or restarted Redis empty: they are held again.
        self.shared.renew_now();
        self.breakers
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&s);
        // Said once the last one closes.
        if self.breakers.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.metrics.limiter_backend_up.set(1);
            // The next outage starts its shares afresh, once this one is surely over.
            *self
                .forget_local_at
                .lock()
                .unwrap_or_else(|e| e.into_inner()) =
                Some(tokio::time::Instant::now() + LOCAL_KEPT_FOR);
            tracing::warn!("Redis answers again: the shared limiter is back");
        }
    }

    /// The open slots, at most `PROBES_AT_ONCE`, each with the workspace its probe asks for.
    fn to_probe(&self) -> Vec<(usize, Option<WorkspaceId>)> {
        let failing = self
            .breakers
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failing
            .iter()
            .filter(|(s, _)| self.breakers.slots[**s].load(Ordering::Acquire) & OPEN != 0)
            .take(PROBES_AT_ONCE)
            .map(|(s, w)| (*s, *w))
            .collect()
    }

    /// (instances, rank) for the local share, if known.
    fn instances(&self) -> Option<(u32, u32)> {
        local_place(self.configured_instances, self.seen.load(Ordering::Relaxed))
    }

    /// Forgets the last outage's local shares once the breaker has stayed closed
    /// `LOCAL_KEPT_FOR`.
    fn forget_local_if_due(&self) {
        let mut at = self
            .forget_local_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at.is_some_and(|at| tokio::time::Instant::now() >= at) && !self.is_open() {
            *at = None;
            self.local.clear();
            self.accounted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.shares
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.answered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.seeded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.any_seeded.store(false, Ordering::Release);
        }
    }

    /// Makes (or keeps) `workspace`'s rebuild due (`Failover::rebuild`): it was decided without
    /// the shared limiter, or its rebuild failed.
    fn rebuild_due(&self, workspace: WorkspaceId, limits: &Limits) {
        self.rebuild
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(workspace)
            .or_insert_with(|| Arc::new(limits.clone()));
    }

    /// Rebuilds the workspace's month counter if it was decided without the shared limiter, and
    /// carries back what its share used (`Carry`): once, by whichever comes first, its next
    /// decision or the watcher (`rebuild_all`). A carry whose call failed is sent again first, as
    /// it was (`Pending`); then what the share used since it was made.
    async fn rebuild_if_due(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Result<(), LimiterError> {
        let Some(due) = self
            .rebuild
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&workspace)
        else {
            return Ok(());
        };
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&workspace)
            .unwrap_or_default();
        let (mut failed, sent) = (None, !pending.is_empty());
        for p in pending {
            if failed.is_some() {
                self.keep_pending(workspace, limits, now, p);
            } else if let Err(e) = self.send_carry(workspace, limits, now, p).await {
                failed = Some(e);
            }
        }
        if failed.is_none() {
            let carry = self.carry(workspace, limits, now).await;
            // Nothing more to carry, and the month counter rebuilt by the carry just sent.
            let done = sent && carry == Carry::default();
            let p = Pending {
                generation: RedisLimiter::generation_id(),
                carry,
                since: tokio::time::Instant::now(),
            };
            if !done {
                if let Err(e) = self.send_carry(workspace, limits, now, p).await {
                    failed = Some(e);
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                // Tried again by the watcher, or at the next decision.
                self.rebuild_due(workspace, &due);
                Err(e)
            }
        }
    }

    /// Sends a carry (`RedisLimiter::new_generation`); one that fails is kept to be sent again
    /// (`keep_pending`).
    async fn send_carry(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
        p: Pending,
    ) -> Result<(), LimiterError> {
        let result = self
            .shared
            .new_generation(workspace, now, &p.generation, p.carry.clone(), limits)
            .await;
        if let Err(e) = result {
            self.keep_pending(workspace, limits, now, p);
            return Err(e);
        }
        // A request that ended while the call was on its way was settled on the share, not in
        // Redis, which now holds it live, renewed for as long as this instance lives: its slot
        // and tokens held for good (an outside audit: a workspace with one concurrent request
        // refused for 18 minutes after Redis flapped under load). Those still running are
        // carried (`settle_async` looks under the same lock); the others' holds are freed in
        // Redis now, settled to nothing there: their usage went to the ledger as the share's.
        let ended: Vec<Reservation> = {
            let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
            let mut alone = self.alone.lock().unwrap_or_else(|e| e.into_inner());
            let (still, ended): (Vec<_>, Vec<_>) = p
                .carry
                .running
                .into_iter()
                .partition(|r| alone.get_mut(r).is_some());
            carried.extend(still.iter().map(|r| r.id));
            ended
        };
        // No decision on the share since this carry was made (which would have made the
        // rebuild due again, and whose use is not in it): the next starts the share anew.
        {
            let rebuild = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
            if !rebuild.contains_key(&workspace) {
                self.answered
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(workspace);
            }
        }
        for r in ended {
            // Settling stops its renewal first. A failure is cancelled in the background, sent
            // again until Redis takes it: left to its lease, its slot was held for a whole lease
            // after the request ended.
            if let Err(e) = self.shared.settle(&r, limits, 0, now).await {
                tracing::debug!(error = %e, "freeing a carried request that had ended failed; cancelling it");
                self.shared
                    .abandon_carried(workspace, std::slice::from_ref(&r), limits, now);
            }
        }
        Ok(())
    }

    /// Keeps a carry whose call failed to be sent again, for `CARRY_SENT_FOR`. Past that, the
    /// records it may have made in Redis of the requests still running (which nothing renews,
    /// settles or frees until their lease ends, and which no decision counted against the
    /// limit: an outside audit saw 25 of them hold a workspace with one concurrent request for
    /// 30 s while Redis flapped) are cancelled, and those requests are not carried again: they
    /// are settled on the share.
    fn keep_pending(&self, workspace: WorkspaceId, limits: &Limits, now: Nanos, p: Pending) {
        if p.since.elapsed() < CARRY_SENT_FOR {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(workspace)
                .or_default()
                .push(p);
            return;
        }
        let running = p.carry.running;
        if !running.is_empty() {
            {
                let _carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
                let mut alone = self.alone.lock().unwrap_or_else(|e| e.into_inner());
                for r in &running {
                    alone.remove(r);
                }
            }
            self.shared
                .abandon_carried(workspace, &running, limits, now);
        }
    }

    /// Once Redis answers again, rebuilds the month counters of the workspaces decided without
    /// it whose breaker is closed, without waiting for their next decision on this instance:
    /// until then the other instances' decisions did not count what this one's share used (an
    /// outside audit: 1.19 times a quota, with no more requests to this instance after the
    /// switch back).
    async fn rebuild_all(&self) {
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared however this ends (a panic included): left set, no rebuild would run again
        // but at a decision.
        struct Running<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(&self.rebuilding);
        let due: Vec<(WorkspaceId, Arc<Limits>)> = self
            .rebuild
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(w, _)| !self.is_open_for(**w))
            .map(|(w, limits)| (*w, limits.clone()))
            .collect();
        for (workspace, limits) in due {
            let now = self.clock.now();
            if let Err(e) = self.rebuild_if_due(workspace, &limits, now).await {
                tracing::debug!(error = %e, workspace, "rebuilding a month counter failed; tried again soon");
            }
        }
    }

    /// Whether some workspaces' rebuilds are due (`Failover::rebuild`).
    fn rebuilds_due(&self) -> bool {
        !self
            .rebuild
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Remembers what a decision's snapshot says of the workspace (`Seen`): its month use, when
    /// its month window is the workspace's own (the snapshot shows the tightest of the
    /// workspace's, its key's and its model's; another's is left alone), and the room left in
    /// its requests and tokens-per-minute windows.
    fn saw(&self, workspace: WorkspaceId, limits: &Limits, decision: &Decision, now: Nanos) {
        let (Decision::Admit { snapshot, .. } | Decision::Deny { snapshot, .. }) = decision;
        let month = limits.tokens_per_month.and_then(|cap| {
            let w = snapshot.month.filter(|w| w.limit == cap as f64)?;
            Some((MonthKey::of(now), cap.saturating_sub(w.remaining)))
        });
        let mut seen = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MONTHS_SEEN && !seen.contains_key(&workspace) {
            seen.clear();
        }
        let entry = seen.entry(workspace).or_insert(Seen {
            month,
            at: 0,
            requests_left: None,
            tokens_left: None,
        });
        // The month's use: the largest this month, since decisions made at once come back in
        // any order, and an earlier one's figure must not replace a later one's.
        if let Some((m, used)) = month {
            if entry
                .month
                .is_none_or(|(was, before)| was != m || before < used)
            {
                entry.month = Some((m, used));
            }
        }
        // The room: the latest decision's.
        if now >= entry.at {
            entry.at = now;
            entry.requests_left = snapshot.requests.map(|w| w.remaining);
            entry.tokens_left = snapshot.tokens.map(|w| w.remaining);
        }
    }

    /// Where a share of `limits` (`shared`, this instance's of `n`) taken up at `now` starts:
    /// the room Redis last said the workspace had, divided among the instances, within the
    /// share's capacity; `(0, 0)` (empty) when nothing was seen within `ROOM_SEEN_FOR`.
    /// (requests, tokens). Not refilled for the time since: the other instances took Redis's
    /// refill meanwhile (with it, three instances admitted 7 requests past a limit when Redis
    /// died under load, each call in flight then waiting out its timeout).
    ///
    /// Empty always, a share refused the first request after every call that timed out, for a
    /// workspace far below its limits as for one at them (an outside audit: a `429` for a
    /// workspace allowed 10^10 tokens a minute, on one 55 ms stall). Started from the room left,
    /// the instances that stall together start with no more than Redis had left, and one that
    /// stalls alone adds at most its part of that room to what the others admit through Redis
    /// (within its share, the bound the README states); a workspace at its limits still starts
    /// empty.
    fn share_start(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        shared: &Limits,
        n: u32,
        now: Nanos,
    ) -> (f64, f64) {
        let seen = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let Some(seen) = seen
            .get(&workspace)
            .filter(|s| now >= s.at && now - s.at <= ROOM_SEEN_FOR)
        else {
            return (0.0, 0.0);
        };
        let n = f64::from(n.max(1));
        let requests = match (seen.requests_left, limits.requests_per_second) {
            (Some(left), Some(_)) => {
                let whole = f64::from(limits.effective_burst());
                let cap = f64::from(shared.effective_burst());
                ((left as f64).min(whole) / n).min(cap)
            }
            _ => 0.0,
        };
        let tokens = match (seen.tokens_left, limits.tokens_per_minute) {
            (Some(left), Some(tpm)) => {
                let cap = shared.tokens_per_minute.unwrap_or(0) as f64;
                ((left as f64).min(tpm as f64) / n).min(cap)
            }
            _ => 0.0,
        };
        (requests, tokens)
    }

    /// The requests this instance admitted on `workspace`'s share this month still running.
    fn running_alone(&self, workspace: WorkspaceId, now: Nanos) -> Vec<Reservation> {
        self.alone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .of(workspace, MonthKey::of(now))
    }

    /// What this instance's share of `workspace`'s limits used that Redis does not know (see
    /// `Carry`): its requests still running, and what its buckets lack, if it still holds them.
    async fn carry(&self, workspace: WorkspaceId, limits: &Limits, now: Nanos) -> Carry {
        Carry {
            running: self.running_alone(workspace, now),
            ..self
                .share_lack(workspace, limits, now)
                .await
                .unwrap_or_default()
        }
    }

    /// What the share used that Redis does not know: how far its requests and tokens-per-minute
    /// buckets (the workspace's, its models', its key's) are below full, less what they lacked
    /// without use when last accounted for (`Accounted`), if the share is still held. What they
    /// lack now is then accounted for: carried once.
    async fn share_lack(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Option<Carry> {
        if !self.local.holds(workspace) {
            return None;
        }
        let (n, rank) = self.instances()?;
        let seeds = self.local.month_seeds(workspace, now).unwrap_or_default();
        let shared = share(limits, n, rank, &seeds).ok()?;
        // Read with the share's own limits, as its buckets were kept.
        let usage = self.local.usage(workspace, &shared, now).await.ok()?;
        // What a bucket of `cap` lacks when `w` says what is left in it.
        let lack =
            |cap: u64, w: Option<super::Window>| w.map_or(0, |w| cap.saturating_sub(w.remaining));
        let mut accounted = self.accounted.lock().unwrap_or_else(|e| e.into_inner());
        let before = accounted.remove(&workspace).unwrap_or(Accounted {
            at: now,
            ..Accounted::default()
        });
        let mut after = Accounted {
            at: now,
            ..Accounted::default()
        };
        let mut carry = Carry::default();
        if let Some(rps) = shared.requests_per_second {
            let lacks = lack(u64::from(shared.effective_burst()), usage.snapshot.requests);
            carry.requests = before.owed(lacks, before.requests, rps, now);
            after.requests = lacks as f64;
        }
        // The balance, not the window: a bucket in debt lacks more than its capacity.
        if let (Some(cap), Some(balance)) = (shared.tokens_per_minute, usage.bucket_tokens) {
            let lacks = (cap as i64).saturating_sub(balance).max(0) as u64;
            carry.tokens = before.owed(lacks, before.tokens, cap as f64 / 60.0, now);
            after.tokens = lacks as f64;
        }
        if let (Some(k), Some(snapshot)) = (shared.key, usage.key) {
            let (l, was) = (k.limits, before.key.filter(|(id, ..)| *id == k.id));
            let (was_requests, was_tokens) = was.map_or((0.0, 0.0), |(_, r, t)| (r, t));
            let mut lacks = (0, 0);
            if let Some(rps) = l.requests_per_second {
                lacks.0 = lack(
                    u64::from(l.as_limits().effective_burst()),
                    snapshot.requests,
                );
                carry.key_requests = before.owed(lacks.0, was_requests, rps, now);
            }
            if let Some(cap) = l.tokens_per_minute {
                lacks.1 = lack(cap, snapshot.tokens);
                carry.key_tokens = before.owed(lacks.1, was_tokens, cap as f64 / 60.0, now);
            }
            after.key = Some((k.id, lacks.0 as f64, lacks.1 as f64));
        }
        for m in &usage.models {
            let Some(cap) = shared
                .models
                .get(&m.model)
                .and_then(|l| l.tokens_per_minute)
            else {
                continue;
            };
            let lacks = lack(cap, m.tokens);
            let was = before.models.get(&m.model).copied().unwrap_or(0.0);
            let owed = before.owed(lacks, was, cap as f64 / 60.0, now);
            if owed > 0 {
                carry.models.push((m.model.clone(), owed));
            }
            after.models.insert(m.model.clone(), lacks as f64);
        }
        accounted.insert(workspace, after);
        Some(carry)
    }

    /// A request admitted through Redis has ended (or given its slot back): if its workspace's
    /// local share counted it in flight, it no longer does.
    fn unseed(&self, reservation: &Reservation) {
        if !self.any_seeded.load(Ordering::Acquire) {
            return;
        }
        let mut seeded = self.seeded.lock().unwrap_or_else(|e| e.into_inner());
        let found = seeded.remove(&reservation.id);
        if seeded.is_empty() {
            self.any_seeded.store(false, Ordering::Release);
        }
        drop(seeded);
        if let Some(workspace) = found {
            self.local.free_held_slot(workspace);
        }
    }

    fn is_carried(&self, id: ReservationId) -> bool {
        self.carried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// The workspace's month use as Redis last reported it this month.
    fn month_seen(&self, workspace: WorkspaceId, now: Nanos) -> Option<u64> {
        let seen = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&workspace)
            .and_then(|s| s.month)
            .filter(|(month, _)| *month == MonthKey::of(now))
            .map(|(_, used)| used)
    }

    async fn fallback(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Result<Decision, LimiterError> {
        let unavailable = || LimiterError::Unavailable("Redis is not answering".into());
        match self.policy {
            FailurePolicy::Closed => {
                Metrics::inc(&self.metrics.fallback_closed);
                Err(unavailable())
            }
            FailurePolicy::Open => {
                Metrics::inc(&self.metrics.fallback_open);
                self.rebuild_due(workspace, limits);
                let held = Held {
                    model: model.map(Into::into),
                    tokens: cost.estimate.max(cost.prompt),
                    month: MonthKey::of(now),
                    slot: false,
                    key: limits.key.map(|k| k.id),
                };
                let mut reservation = Reservation::new(workspace, held);
                reservation.origin = Origin::Unmetered;
                Ok(Decision::Admit {
                    reservation,
                    snapshot: Snapshot::default(),
                })
            }
            FailurePolicy::Local => {
                let Some((n, rank)) = self.instances() else {
                    Metrics::inc(&self.metrics.fallback_closed);
                    return Err(unavailable());
                };
                Metrics::inc(&self.metrics.fallback_local);
                self.rebuild_due(workspace, limits);
                // A share taken up now starts with the room Redis last reported, divided among
                // the instances (`share_start`), or empty when none is known: a full share on
                // every instance would admit a whole burst more than the limit at the switch.
                let fresh = !self.local.holds(workspace);
                // A share held from before, since carried back with Redis answering: it
                // starts empty again, as a fresh one does. Kept as it was, it refilled while
                // Redis decided, and each short stall admitted a share's burst on top of what
                // the other instances admitted through Redis (an outside audit: 44 requests
                // where the rate allowed 41, with 100 ms stalls that never opened the breaker).
                let anew = fresh
                    || self
                        .answered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&workspace);
                // Seed the month counters from the ledger first: the month share is of what
                // was left then. A share taken up again reads the ledger again: its counters
                // were seeded when it was first taken up, and the other instances have settled
                // more since.
                self.local.usage(workspace, limits, now).await?;
                if anew && !fresh {
                    self.local.reseed_month(workspace, now).await?;
                }
                let seeds = self.local.month_seeds(workspace, now).unwrap_or_default();
                let shared = match share(limits, n, rank, &seeds) {
                    Ok(mut l) => {
                        // The month share is of what Redis last said was left, when it said
                        // more was used than the ledger has.
                        if let (Some(cap), Some(used)) =
                            (limits.tokens_per_month, self.month_seen(workspace, now))
                        {
                            l.tokens_per_month = Some(month_share_of(cap, seeds.0, used, n));
                        }
                        if let Some(k) = l.key.as_mut() {
                            if let Some(cap) = k.limits.tokens_per_month {
                                let seed = self.local.key_month_seed(workspace, k.id, now);
                                k.limits.tokens_per_month =
                                    Some(month_share(cap, seed.unwrap_or(0), n));
                            }
                        }
                        l
                    }
                    Err(limit) => {
                        return Ok(Decision::Deny {
                            denial: Denial {
                                kind: DenialKind::RateLimited,
                                limit,
                                model: None,
                                limit_value: limit_value(limits, limit),
                                retry_after: NANOS_PER_SEC,
                            },
                            snapshot: Snapshot::default(),
                        })
                    }
                };
                if anew {
                    let start = self.share_start(workspace, limits, &shared, n, now);
                    self.local.drain(workspace, &shared, now, start);
                    // The drained buckets lack their capacity, less where they start, without
                    // use. Those of a share held from before keep their `at`, so that what its
                    // key's and models' buckets (not drained) lacked when last carried still
                    // refills from then: what the drained ones lack is then stated as of that
                    // `at`.
                    let (rps, burst) = (
                        shared.requests_per_second.unwrap_or(0.0),
                        shared
                            .requests_per_second
                            .map_or(0.0, |_| f64::from(shared.effective_burst()) - start.0),
                    );
                    let tpm = shared.tokens_per_minute.unwrap_or(0) as f64;
                    let tokens_lacking = tpm - start.1;
                    let mut accounted = self.accounted.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = accounted.entry(workspace).or_insert_with(|| Accounted {
                        at: now,
                        ..Accounted::default()
                    });
                    let since = now.saturating_sub(entry.at) as f64 / NANOS_PER_SEC as f64;
                    entry.requests = burst + rps * since;
                    entry.tokens = tokens_lacking + tpm / 60.0 * since;
                    drop(accounted);
                    // This instance's own requests still running hold slots of the share (those
                    // it already counts, from when it was last taken up, once).
                    if shared.concurrent_requests.is_some() {
                        let mut seeded = self.seeded.lock().unwrap_or_else(|e| e.into_inner());
                        let running: Vec<ReservationId> = self
                            .shared
                            .live_for(workspace)
                            .into_iter()
                            .filter(|id| !seeded.contains_key(id))
                            .collect();
                        self.local.hold_slots(workspace, running.len() as u32);
                        seeded.extend(running.into_iter().map(|id| (id, workspace)));
                        self.any_seeded.store(!seeded.is_empty(), Ordering::Release);
                    }
                }
                self.shares
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(workspace, Arc::new(shared.clone()));
                let decision = self
                    .local
                    .reserve(workspace, &shared, model, cost, now)
                    .await?;
                Ok(match decision {
                    Decision::Admit {
                        mut reservation,
                        snapshot,
                    } => {
                        reservation.origin = Origin::LocalShare;
                        self.alone
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(&reservation);
                        Decision::Admit {
                            reservation,
                            snapshot,
                        }
                    }
                    Decision::Deny {
                        mut denial,
                        snapshot,
                    } => {
                        if share_used_up(limits, &denial, cost.prompt) {
                            denial.kind = DenialKind::ShareUsedUp;
                            denial.retry_after = NANOS_PER_SEC;
                        }
                        Decision::Deny { denial, snapshot }
                    }
                })
            }
        }
    }
}

/// Whether `denial`, made on a local share, is the share's and not the workspace's: a month's
/// share used up while the workspace's whole quota had more left (others hold the rest), or a
/// prompt above the share's capacity that the whole limit can take. Told as such, to be retried
/// (`DenialKind::ShareUsedUp`), not as a quota exceeded or a request that can never fit.
fn share_used_up(limits: &Limits, denial: &Denial, prompt: u64) -> bool {
    let key = limits.key.map(|k| k.limits);
    let model = denial.model.as_deref().and_then(|m| limits.models.get(m));
    let whole = match denial.limit {
        LimitName::TokensPerMinute => limits.tokens_per_minute,
        LimitName::TokensPerMonth => limits.tokens_per_month,
        LimitName::ModelTokensPerMinute => model.and_then(|m| m.tokens_per_minute),
        LimitName::ModelTokensPerMonth => model.and_then(|m| m.tokens_per_month),
        LimitName::KeyTokensPerMinute => key.and_then(|k| k.tokens_per_minute),
        LimitName::KeyTokensPerMonth => key.and_then(|k| k.tokens_per_month),
        _ => None,
    };
    let Some(whole) = whole else {
        return false;
    };
    match denial.kind {
        DenialKind::QuotaExceeded => denial.limit_value < whole as f64,
        DenialKind::RequestTooLarge => denial.limit_value < whole as f64 && prompt <= whole,
        DenialKind::RateLimited | DenialKind::ShareUsedUp => false,
    }
}

/// Whether a failed call says Redis refused the credentials (not that it did not answer).
fn refuses_credentials(e: &LimiterError) -> bool {
    let text = e.to_string();
    [
        "NOAUTH",
        "WRONGPASS",
        "AuthenticationFailed",
        "Authentication required",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// The breaker's probe and the heartbeat, in one loop.
async fn watch(failover: Weak<Failover>) {
    let Some(instance) = failover.upgrade().map(|f| f.instance.clone()) else {
        return;
    };
    let mut last_heartbeat = tokio::time::Instant::now() - HEARTBEAT_EVERY;
    let mut held = HeldCount::default();
    // The (count, rank) the last heartbeat heard.
    let mut last_heard = None;
    // The count of live instances last warned about.
    let mut warned = 0;
    // Whether this outage's probes were refused for the credentials, as logged.
    let mut refused_logged = false;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(f) = failover.upgrade() else { return };
        if f.is_open() {
            // Each open slot's probe asks its own node; together, within one call's time.
            let probes = f.to_probe();
            let answers = futures_util::future::join_all(
                probes
                    .iter()
                    .map(|(_, workspace)| f.shared.ping(*workspace)),
            )
            .await;
            let mut closed = false;
            for ((slot, _), answer) in probes.iter().zip(answers) {
                match answer {
                    Ok(()) => {
                        f.close(*slot);
                        closed = true;
                        refused_logged = false;
                    }
                    // Said once an outage: a Redis that now asks for another password is no
                    // outage that ends by itself (an outside audit: only "broken pipe" was
                    // logged).
                    Err(e) if !refused_logged && refuses_credentials(&e) => {
                        refused_logged = true;
                        tracing::error!(
                            error = %e,
                            "Redis refuses this gateway's credentials (the password or user in the redis URL): the failure policy applies until it takes them"
                        );
                    }
                    Err(_) => {}
                }
            }
            if closed {
                let f = f.clone();
                tokio::spawn(async move { f.rebuild_all().await });
            }
        } else {
            f.forget_local_if_due();
            // Those decided on their share while the breaker stayed closed (one call timed
            // out), or whose rebuild failed since, are carried back without waiting for a
            // request.
            if f.rebuilds_due() {
                let f = f.clone();
                tokio::spawn(async move { f.rebuild_all().await });
            }
        }
        if last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
            last_heartbeat = tokio::time::Instant::now();
            match f.shared.heartbeat(&instance, HEARTBEAT_TTL).await {
                Ok(beat) => {
                    f.success(None);
                    // Also on the first heartbeat, which cannot tell a restart from a start: on a
                    // new instance the renewal has nothing to do, and an instance that began just
                    // before a restart may already run requests. Said only after a heartbeat was
                    // heard: on a start it is always missing (an outside audit: every start
                    // logged a Redis incident when requests came at once).
                    if beat.missing {
                        if last_heard.is_some() && f.shared.live_reservations() > 0 {
                            tracing::info!(
                                "Redis did not hold this instance's heartbeat (restarted empty, \
                                 flushed, or stalled): holding its running requests again"
                            );
                        }
                        f.shared.renew_now();
                    }
                    let n = beat.instances;
                    last_heard = Some((n, beat.rank));
                    let (count, rank) = held.place(n, beat.rank, tokio::time::Instant::now());
                    f.seen
                        .store(((count as u64) << 32) | rank as u64, Ordering::Relaxed);
                    if let Some(c) = f.configured_instances {
                        // Said once each time the count over `instances` changes, not every
                        // heartbeat (the held count is not the one seen: it said it each time).
                        if n <= c {
                            warned = 0;
                        } else if n != warned {
                            warned = n;
                            tracing::warn!(
                                live = n,
                                instances = c,
                                "more instances share Redis than `instances` says: should Redis \
                                 fail, their local shares (1/{c} each) add up to more than the limits"
                            );
                        }
                    }
                    f.metrics.instances.set(i64::from(n));
                }
                Err(e) => {
                    f.failure(&e, None);
                    if let Some((count, rank)) =
                        held.unheard(last_heard, tokio::time::Instant::now())
                    {
                        f.seen
                            .store(((count as u64) << 32) | rank as u64, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The calls of `Limiter`, whose futures the trait boxes: this backend waits on the network.
impl Failover {
    async fn reserve_async(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Result<Decision, LimiterError> {
        if !self.is_open_for(workspace) {
            let mut result = self.rebuild_if_due(workspace, limits, now).await;
            if result.is_ok() {
                result = match self
                    .shared
                    .reserve(workspace, limits, model, cost, now)
                    .await
                {
                    Ok(decision) => {
                        self.success(Some(workspace));
                        if self.policy == FailurePolicy::Local {
                            self.saw(workspace, limits, &decision, now);
                        }
                        return Ok(decision);
                    }
                    Err(e) => Err(e),
                };
            }
            match result {
                Err(e @ LimiterError::Unavailable(_)) => self.failure(&e, Some(workspace)),
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        self.fallback(workspace, limits, model, cost, now).await
    }

    async fn settle_async(
        &self,
        reservation: &Reservation,
        limits: &Limits,
        actual: u64,
        now: Nanos,
    ) -> Result<Settled, LimiterError> {
        match reservation.origin {
            Origin::Primary => {
                self.unseed(reservation);
                if self.is_open_for(reservation.workspace) {
                    return Err(LimiterError::Unavailable("Redis is not answering".into()));
                }
                match self.shared.settle(reservation, limits, actual, now).await {
                    Ok(s) => {
                        self.success(Some(reservation.workspace));
                        Ok(s)
                    }
                    Err(e) => {
                        if matches!(e, LimiterError::Unavailable(_)) {
                            self.failure(&e, Some(reservation.workspace));
                        }
                        Err(e)
                    }
                }
            }
            Origin::LocalShare => {
                // Whether it was carried, decided under the lock a carry takes to tell the
                // requests still running from those that ended (`rebuild_if_due`).
                let carried = {
                    let carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
                    self.alone
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(reservation);
                    carried.contains(&reservation.id)
                };
                // The share counts it whatever follows (again, harmlessly, when retried).
                // Under the share it was decided with.
                let share = self
                    .shares
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&reservation.workspace)
                    .cloned();
                let under = share.as_deref().unwrap_or(limits);
                let settled = self.local.settle(reservation, under, actual, now).await;
                if !carried {
                    return settled;
                }
                // Carried into Redis: settled there, counted once in its generation. One that
                // fails is deferred and tried again (it may have landed; settling is
                // idempotent), not recorded as the share's, which the ledger would count a
                // second time.
                let workspace = reservation.workspace;
                if self.is_open_for(workspace) {
                    return Err(LimiterError::Unavailable("Redis is not answering".into()));
                }
                match self.shared.settle(reservation, limits, actual, now).await {
                    Ok(s) => {
                        self.success(Some(workspace));
                        self.carried
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&reservation.id);
                        Ok(s)
                    }
                    Err(e) => {
                        if matches!(e, LimiterError::Unavailable(_)) {
                            self.failure(&e, Some(workspace));
                        }
                        Err(e)
                    }
                }
            }
            Origin::Unmetered => Ok(Settled {
                at: now,
                counter: None,
            }),
        }
    }

    async fn release_slot_async(&self, reservation: &mut Reservation) -> Result<(), LimiterError> {
        if reservation.origin == Origin::Primary && reservation.held.slot {
            self.unseed(reservation);
        }
        match reservation.origin {
            Origin::Primary if !self.is_open_for(reservation.workspace) => {
                self.shared.release_slot(reservation).await
            }
            Origin::Primary | Origin::Unmetered => Ok(()),
            Origin::LocalShare => {
                let held = reservation.held.slot;
                let released = self.local.release_slot(reservation).await;
                if held && !reservation.held.slot {
                    if let Some(r) = self
                        .alone
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(reservation)
                    {
                        r.held.slot = false;
                    }
                    // Carried: its slot in Redis too (a failure leaves it to the settlement,
                    // or to the lease).
                    if self.is_carried(reservation.id) && !self.is_open_for(reservation.workspace) {
                        let mut carried = reservation.clone();
                        carried.held.slot = true;
                        if let Err(e) = self.shared.release_slot(&mut carried).await {
                            tracing::debug!(error = %e, "freeing a carried slot failed");
                        }
                    }
                }
                released
            }
        }
    }

    async fn usage_async(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Result<Usage, LimiterError> {
        if self.is_open_for(workspace) {
            return Err(LimiterError::Unavailable("Redis is not answering".into()));
        }
        let result = self.shared.usage(workspace, limits, now).await;
        match &result {
            Ok(_) => self.success(Some(workspace)),
            Err(e @ LimiterError::Unavailable(_)) => self.failure(e, Some(workspace)),
            Err(_) => {}
        }
        result
    }
}

impl Failover {
    /// At a stop: the heartbeat stops, and the instance leaves the live ones at once, so that
    /// the others' shares, should Redis fail, are counted without it (an outside audit: after
    /// a rolling restart of three instances, heartbeats of the stopped ones still counted for
    /// 3 s made six, held for 30 s, and shares of a sixth). Not while Redis is judged down.
    async fn leave_now(&self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
        if self.is_open() {
            return;
        }
        // Within `redis_timeout_ms`, as every call.
        if let Err(e) = self.shared.leave(&self.instance).await {
            tracing::debug!(error = %e, "could not leave the live instances; its heartbeat expires");
        }
    }
}

impl Limiter for Failover {
    fn reserve<'a>(
        &'a self,
        workspace: WorkspaceId,
        limits: &'a Limits,
        model: Option<&'a str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Answer<'a, Result<Decision, LimiterError>> {
        Answer::later(self.reserve_async(workspace, limits, model, cost, now))
    }

    fn leave(&self) -> Answer<'_, ()> {
        Answer::later(self.leave_now())
    }

    fn settle<'a>(
        &'a self,
        reservation: &'a Reservation,
        limits: &'a Limits,
        actual: u64,
        now: Nanos,
    ) -> Answer<'a, Result<Settled, LimiterError>> {
        Answer::later(self.settle_async(reservation, limits, actual, now))
    }

    fn release_slot<'a>(
        &'a self,
        reservation: &'a mut Reservation,
    ) -> Answer<'a, Result<(), LimiterError>> {
        Answer::later(self.release_slot_async(reservation))
    }

    fn usage<'a>(
        &'a self,
        workspace: WorkspaceId,
        limits: &'a Limits,
        now: Nanos,
    ) -> Answer<'a, Result<Usage, LimiterError>> {
        Answer::later(self.usage_async(workspace, limits, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelLimits;
    use proptest::prelude::*;

    fn limits(rps_milli: u64, burst: u32, tpm: u64, month: u64, conc: u32) -> Limits {
        let mut models = std::collections::BTreeMap::new();
        models.insert(
            "m".to_string(),
            ModelLimits {
                tokens_per_minute: Some(tpm),
                tokens_per_month: Some(month),
            },
        );
        Limits {
            requests_per_second: Some(rps_milli as f64 / 1000.0),
            burst: Some(burst),
            tokens_per_minute: Some(tpm),
            tokens_per_month: Some(month),
            concurrent_requests: Some(conc),
            models,
            key: None,
        }
    }

    #[test]
    fn a_month_share_is_of_what_was_left_after_what_was_known_used() {
        // The ledger's seed alone: 1/N of what it has left.
        assert_eq!(month_share(1000, 100, 3), 100 + 300);
        // Redis said more was used: 1/N of what it had left, from the counter's own start.
        assert_eq!(month_share_of(1000, 100, 700, 3), 100 + 100);
        assert_eq!(month_share_of(1000, 0, 900, 1), 100);
        // Less than the seed changes nothing; all of it leaves nothing more.
        assert_eq!(month_share_of(1000, 100, 50, 3), 400);
        assert_eq!(month_share_of(1000, 100, 1200, 2), 100);
        assert_eq!(month_share_of(1000, 1000, 1200, 2), 1000);
    }

    #[test]
    fn a_keys_own_limits_are_shared_too() {
        use crate::model::{KeyLimits, KeyScope};
        let mut l = limits(10_000, 10, 600, 1_000, 5);
        l.key = Some(KeyScope {
            id: 4,
            limits: KeyLimits {
                requests_per_second: Some(3.0),
                burst: Some(5),
                tokens_per_minute: Some(300),
                tokens_per_month: Some(900),
            },
        });
        let none = (0, HashMap::new());
        let shares: Vec<KeyLimits> = (0..3)
            .map(|r| share(&l, 3, r, &none).unwrap().key.unwrap().limits)
            .collect();
        let bursts: Vec<_> = shares.iter().map(|k| k.burst.unwrap()).collect();
        assert_eq!(bursts, [2, 2, 1]);
        assert!(shares.iter().all(|k| k.requests_per_second == Some(1.0)));
        assert!(shares.iter().all(|k| k.tokens_per_minute == Some(100)));
        // The month is shared by the caller, from the key's own seed.
        assert_eq!(month_share(900, 300, 3), 500);
        // A key's limit too small to share is named.
        l.key.as_mut().unwrap().limits.tokens_per_minute = Some(2);
        assert_eq!(
            share(&l, 3, 0, &none).map(|_| ()),
            Err(LimitName::KeyTokensPerMinute)
        );
    }

    #[test]
    fn three_instances_share_one_limit() {
        let l = limits(10_000, 10, 600, 1_000, 5);
        let seeds = (400, [("m".to_string(), 100)].into_iter().collect());
        let shares: Vec<Limits> = (0..3).map(|r| share(&l, 3, r, &seeds).unwrap()).collect();
        // 10 requests/s → 3.333 each; burst 10 → 4, 3, 3; concurrency 5 → 2, 2, 1.
        assert!(shares.iter().all(|s| s.requests_per_second == Some(3.333)));
        let bursts: Vec<_> = shares.iter().map(|s| s.burst.unwrap()).collect();
        assert_eq!(bursts, [4, 3, 3]);
        let conc: Vec<_> = shares
            .iter()
            .map(|s| s.concurrent_requests.unwrap())
            .collect();
        assert_eq!(conc, [2, 2, 1]);
        assert!(shares.iter().all(|s| s.tokens_per_minute == Some(200)));
        // The month: 600 were left when counting apart began; each may use 200 of them.
        assert!(shares.iter().all(|s| s.tokens_per_month == Some(600)));
        assert!(shares
            .iter()
            .all(|s| s.models["m"].tokens_per_month == Some(100 + 300)));
        for s in &shares {
            s.validate().unwrap();
        }
    }

    #[test]
    fn a_count_of_instances_that_drops_is_held_for_a_while() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut held = HeldCount::default();
        assert_eq!(held.place(3, 1, at(0)), (3, 1));
        // Redis restarted empty: this instance announced itself first and sees itself alone.
        assert_eq!(
            held.place(1, 0, at(2)),
            (3, 2),
            "the count held, the smallest share"
        );
        assert_eq!(held.place(2, 1, at(3)), (3, 2));
        // Seen again: taken as it is, rank and all, and held from now.
        assert_eq!(held.place(3, 0, at(4)), (3, 0));
        assert_eq!(held.place(2, 0, at(33)), (3, 2));
        // Lower for longer than the hold (an instance has gone): the lower count.
        assert_eq!(held.place(2, 0, at(34)), (2, 0));
        // A count that grows is taken at once.
        assert_eq!(held.place(4, 3, at(35)), (4, 3));
        // The shares with the held count never add up to more than the limit.
        let l = limits(30_000, 30, 3000, 3000, 30);
        let seeds = (0, HashMap::new());
        let mut held = [
            HeldCount::default(),
            HeldCount::default(),
            HeldCount::default(),
        ];
        for (i, h) in held.iter_mut().enumerate() {
            h.place(3, i as u32, at(0));
        }
        let places = [
            held[0].place(1, 0, at(5)),
            held[1].place(2, 1, at(5)),
            held[2].place(3, 2, at(5)),
        ];
        let burst: u32 = places
            .iter()
            .map(|&(n, rank)| share(&l, n, rank, &seeds).unwrap().burst.unwrap())
            .sum();
        assert!(burst <= 30, "{places:?}: {burst}");
    }

    #[test]
    fn a_held_count_ends_on_time_while_no_heartbeat_is_heard() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut held = HeldCount::default();
        // A rolling restart: the stopped instances' heartbeats were seen for a moment.
        assert_eq!(held.place(6, 4, at(0)), (6, 4));
        assert_eq!(held.place(3, 1, at(3)), (6, 5));
        // Redis fails at 5 s: nothing is heard from then on.
        let last = Some((3, 1));
        assert_eq!(held.unheard(last, at(5)), Some((6, 5)), "still held");
        assert_eq!(held.unheard(last, at(29)), Some((6, 5)), "still held");
        assert_eq!(
            held.unheard(last, at(30)),
            Some((3, 1)),
            "30 s after 6 was last seen: the count last heard, and this instance's rank"
        );
        assert_eq!(held.unheard(last, at(60)), Some((3, 1)));
        // Nothing heard yet: nothing to go by.
        assert_eq!(HeldCount::default().unheard(None, at(60)), None);
    }

    #[test]
    fn an_instance_unsure_of_its_place_takes_the_smallest_share() {
        let seen = |n: u64, rank: u64| (n << 32) | rank;
        assert_eq!(local_place(None, 0), None);
        assert_eq!(local_place(None, seen(3, 1)), Some((3, 1)));
        assert_eq!(local_place(Some(2), seen(2, 0)), Some((2, 0)));
        // No heartbeat yet, or ranked past the count given: the last rank.
        assert_eq!(local_place(Some(2), 0), Some((2, 1)));
        assert_eq!(local_place(Some(2), seen(5, 3)), Some((2, 1)));
        assert_eq!(local_place(Some(2), seen(5, 4)), Some((2, 1)));
        // Two such instances on a burst of 5 take 2 each, not 3 each.
        let l = limits(5_000, 5, 1_000, 1_000, 5);
        let none = (0, HashMap::new());
        let (n, rank) = local_place(Some(2), 0).unwrap();
        assert_eq!(share(&l, n, rank, &none).unwrap().burst, Some(2));
    }

    #[test]
    fn a_limit_too_small_to_share_gives_some_instances_nothing_but_a_burst_of_one() {
        let none = (0, HashMap::new());
        // 1 request a second with a burst of 1, on three instances: each admits one request
        // every 3 s, where a burst split as integers left two of them refusing every request.
        let l = limits(1_000, 1, 600, 1_000, 3);
        for rank in 0..3 {
            let s = share(&l, 3, rank, &none).unwrap();
            assert_eq!((s.requests_per_second, s.burst), (Some(0.333), Some(1)));
        }
        let l = limits(1_000, 1, 600, 1_000, 1);
        assert_eq!(
            share(&l, 3, 1, &none).map(|_| ()),
            Err(LimitName::ConcurrentRequests)
        );
        let l = limits(1_000, 3, 2, 1_000, 3);
        assert_eq!(share(&l, 3, 2, &none), Err(LimitName::TokensPerMinute));
    }

    proptest! {
        /// Whatever the limits and the number of instances, the shares add up to no more than
        /// each limit (and the month shares to no more than what was left), but for bursts of
        /// one request each where the burst is below the number of instances.
        #[test]
        fn shares_never_add_up_to_more_than_the_limit(
            rps_milli in 1u64..100_000,
            burst in 1u32..100,
            tpm in 1u64..10_000,
            month in 1u64..100_000,
            conc in 1u32..100,
            seed in 0u64..120_000,
            n in 1u32..12,
        ) {
            let l = limits(rps_milli, burst, tpm, month, conc);
            let seeds = (seed, [("m".to_string(), seed)].into_iter().collect());
            let (mut rate, mut bursts, mut tokens, mut slots, mut months) = (0, 0, 0, 0, 0);
            for rank in 0..n {
                let Ok(s) = share(&l, n, rank, &seeds) else { continue };
                prop_assert!(s.validate().is_ok());
                rate += request_rate(s.requests_per_second.unwrap());
                bursts += s.burst.unwrap() as u64;
                tokens += s.tokens_per_minute.unwrap();
                slots += s.concurrent_requests.unwrap() as u64;
                months += s.tokens_per_month.unwrap().saturating_sub(seed.min(month));
            }
            prop_assert!(rate <= rps_milli as i64);
            // A burst is at least one request each.
            prop_assert!(bursts <= u64::from(burst.max(n)));
            prop_assert!(tokens <= tpm);
            prop_assert!(slots <= conc as u64);
            prop_assert!(months <= month.saturating_sub(seed));
        }
    }
}
