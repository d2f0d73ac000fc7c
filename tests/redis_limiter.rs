//! What only the shared (Redis) limiter does: leases, cancellation of abandoned calls, the month
//! counter rebuilt from the ledger, its key layout and memory in Redis, and the server's clock.
//! `tests/conformance.rs` proves that it decides as the in-memory limiter does, call by call;
//! these tests prove what it promises beyond that (see the design comment of
//! `src/limiter/redis.rs`).
//!
//! Every test runs against a real Redis: the shared server with a key prefix of its own, a
//! private `RedisServer` when it stops or flushes Redis, or the test cluster. Times are driven
//! by hand (`TimeSource::Caller`) wherever the behaviour allows; where it needs real time (lease
//! renewal, re-bases, the server's clock) the bounds are seconds and the test polls.

mod support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::FromRedisValue;
use time::macros::datetime;

use support::redis::{cluster_seeds, shared_redis, RedisServer};
use tiergate::clock::{Clock, SystemClock};
use tiergate::limiter::redis::{
    model_id, Carry, RedisLimiter, RedisOptions, TimeSource, Topology, REAP_LATENESS, TOMBSTONE,
};
use tiergate::limiter::{
    Decision, DenialKind, Held, LimitName, Limiter, LimiterError, MonthKey, MonthSource,
    MonthTotals, Nanos, Reservation, ReservationId, TokenCost, Usage, NANOS_PER_SEC,
};
use tiergate::model::{Limits, ModelLimits, WorkspaceId};

const MS: Nanos = NANOS_PER_SEC / 1_000;
const SEC: Nanos = NANOS_PER_SEC;

// ---------------------------------------------------------------------------------------------
// The ledger: settled events with the counter generation that counted them
// ---------------------------------------------------------------------------------------------

/// One settled request, as the ledger stores it.
#[derive(Debug, Clone)]
struct Event {
    workspace: WorkspaceId,
    month: MonthKey,
    /// The reservation it settled; `None` for usage from before the test.
    request: Option<ReservationId>,
    model: String,
    tokens: u64,
    /// The counter generation that counted it (`Settled::counter`).
    counter: Option<String>,
}

/// A `MonthSource` over events kept in memory. Reads can be made slow, so that settlements land
/// while a counter is being based on them.
#[derive(Default)]
struct Ledger {
    events: Mutex<Vec<Event>>,
    /// A read pauses up to `.0` before it takes its snapshot and up to `.1` after it: what is
    /// written meanwhile is missing from what it answers.
    pause: Mutex<(Duration, Duration)>,
    /// Every (workspace, month) read.
    reads: Mutex<Vec<(WorkspaceId, MonthKey)>>,
}

impl Ledger {
    fn add(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }

    /// Usage from before the test, counted by no generation that still exists.
    fn add_prior(&self, workspace: WorkspaceId, month: MonthKey, model: &str, tokens: u64) {
        self.add(Event {
            workspace,
            month,
            request: None,
            model: model.to_string(),
            tokens,
            counter: None,
        });
    }

    fn slow(&self, before: Duration, after: Duration) {
        *self.pause.lock().unwrap() = (before, after);
    }

    fn total(&self, workspace: WorkspaceId, month: MonthKey) -> u64 {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.workspace == workspace && e.month == month)
            .map(|e| e.tokens)
            .sum()
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
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
        self.reads.lock().unwrap().push((workspace, month));
        let (before, after) = *self.pause.lock().unwrap();
        tokio::time::sleep(random_duration(before)).await;
        let mut totals = MonthTotals {
            month: Some(month),
            ..MonthTotals::default()
        };
        for e in self.events.lock().unwrap().iter() {
            if e.workspace != workspace || e.month != month {
                continue;
            }
            if excluding.is_some() && e.counter.as_deref() == excluding {
                continue;
            }
            totals.tokens += e.tokens;
            totals.requests += 1;
            if !e.model.is_empty() {
                *totals.by_model.entry(e.model.clone()).or_default() += e.tokens;
            }
        }
        tokio::time::sleep(random_duration(after)).await;
        Ok(totals)
    }
}

/// Writes settlements to the ledger each after a random delay up to `lag`, in any order, as the
/// usage writers of several instances do.
struct LaggingWriter {
    ledger: Arc<Ledger>,
    lag: Duration,
    pending: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl LaggingWriter {
    fn write(&self, event: Event) {
        let ledger = self.ledger.clone();
        let lag = random_duration(self.lag);
        let write = tokio::spawn(async move {
            tokio::time::sleep(lag).await;
            ledger.add(event);
        });
        self.pending.lock().unwrap().push(write);
    }

    /// Returns once every settlement written so far is in the ledger.
    async fn drain(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        for write in pending {
            write.await.unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Limiters, and a plain client to look at what they leave in Redis
// ---------------------------------------------------------------------------------------------

fn random_below(n: u64) -> u64 {
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(DRAWS.fetch_add(1, Ordering::Relaxed)) % n.max(1)
}

fn random_duration(at_most: Duration) -> Duration {
    Duration::from_micros(random_below(at_most.as_micros() as u64 + 1))
}

/// A key prefix no other test (or run) uses.
fn unique_prefix() -> String {
    format!("rt{:016x}", random_below(u64::MAX))
}

fn limiter(
    topology: Topology,
    prefix: &str,
    lease: Duration,
    time: TimeSource,
    ledger: Arc<Ledger>,
) -> RedisLimiter {
    let options = RedisOptions {
        topology,
        prefix: prefix.to_string(),
        timeout: Duration::from_secs(5),
        lease,
        time,
    };
    RedisLimiter::new(options, ledger).unwrap()
}

/// A limiter on one server, on the caller's clock, with a lease of a minute and an empty ledger.
fn on_the_callers_clock(url: String, prefix: &str) -> RedisLimiter {
    limiter(
        Topology::Single(url),
        prefix,
        Duration::from_secs(60),
        TimeSource::Caller,
        Arc::new(Ledger::default()),
    )
}

fn cluster_topology(seeds: &str) -> Topology {
    Topology::Cluster(seeds.split(',').map(str::to_string).collect())
}

/// The workspace's keys, as `redis.rs` names them.
fn keys_of(prefix: &str, workspace: WorkspaceId) -> [String; 3] {
    let tag = format!("{{{prefix}:{workspace}}}");
    [tag.clone(), format!("{tag}:r"), format!("{tag}:e")]
}

/// A plain Redis client, to read what the limiter leaves in Redis.
enum Spy {
    Single(MultiplexedConnection),
    Cluster {
        conn: ClusterConnection,
        masters: Vec<MultiplexedConnection>,
    },
}

impl Spy {
    async fn single(url: &str) -> Spy {
        let client = redis::Client::open(url).unwrap();
        Spy::Single(client.get_multiplexed_async_connection().await.unwrap())
    }

    async fn cluster(seeds: &str) -> Spy {
        let seeds: Vec<&str> = seeds.split(',').collect();
        let mut first = redis::Client::open(seeds[0])
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut first)
            .await
            .unwrap();
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 2 && fields[2].split(',').any(|flag| flag == "master") {
                let address = fields[1].split('@').next().unwrap();
                let url = format!("redis://{address}");
                let client = redis::Client::open(url.as_str()).unwrap();
                masters.push(client.get_multiplexed_async_connection().await.unwrap());
            }
        }
        let client = redis::cluster::ClusterClient::new(seeds).unwrap();
        Spy::Cluster {
            conn: client.get_async_connection().await.unwrap(),
            masters,
        }
    }

    /// Runs a command on the node that holds its key.
    async fn run<T: FromRedisValue>(&mut self, args: &[&[u8]]) -> T {
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let answer = match self {
            Spy::Single(conn) => cmd.query_async(conn).await,
            Spy::Cluster { conn, .. } => cmd.query_async(conn).await,
        };
        answer.unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&args.concat())))
    }

    /// Every key that starts with `start` (letters, digits, `{`, `}`, `:` only), on every master.
    async fn keys_starting(&mut self, start: &str) -> Vec<Vec<u8>> {
        let mut cmd = redis::cmd("KEYS");
        cmd.arg(format!("{start}*"));
        let mut keys = HashSet::new();
        match self {
            Spy::Single(conn) => keys.extend(cmd.query_async::<Vec<Vec<u8>>>(conn).await.unwrap()),
            Spy::Cluster { masters, .. } => {
                for node in masters {
                    keys.extend(cmd.query_async::<Vec<Vec<u8>>>(node).await.unwrap());
                }
            }
        }
        let mut keys: Vec<_> = keys.into_iter().collect();
        keys.sort();
        keys
    }

    /// The records of a workspace: reservation id -> record.
    async fn records(&mut self, prefix: &str, workspace: WorkspaceId) -> HashMap<String, String> {
        let key = &keys_of(prefix, workspace)[1];
        self.run(&[b"HGETALL", key.as_bytes()]).await
    }

    async fn pttl(&mut self, key: &[u8]) -> i64 {
        self.run(&[b"PTTL", key]).await
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for the expectations
// ---------------------------------------------------------------------------------------------

/// A fixed instant for tests on the caller's clock.
fn t0() -> Nanos {
    datetime!(2024-03-10 12:00 UTC).unix_timestamp_nanos() as Nanos
}

fn cost(prompt: u64, estimate: u64) -> TokenCost {
    TokenCost { prompt, estimate }
}

#[track_caller]
fn admitted(decision: Decision) -> Reservation {
    match decision {
        Decision::Admit { reservation, .. } => reservation,
        other => panic!("expected an admission, got {other:?}"),
    }
}

#[track_caller]
fn denied(decision: Decision) -> (DenialKind, LimitName, Nanos) {
    match decision {
        Decision::Deny { denial, .. } => (denial.kind, denial.limit, denial.retry_after),
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// (in flight, month reserved, month settled): what a reservation holds, and what counted.
fn holds(u: &Usage) -> (u32, u64, u64) {
    (u.in_flight, u.month_reserved_tokens, u.month_settled_tokens)
}

/// Polls `check` every 50 ms until it answers `Ok`, for at most `within`; `Err` says what it saw.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(found) => return found,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {within:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A reservation that holds a concurrency slot is marked to be settled before its answer ends;
/// one of a workspace without a concurrency limit is not (its answer does not wait for Redis).
#[tokio::test]
async fn a_reservation_holding_a_slot_is_settled_before_its_answer() {
    let Some(url) = shared_redis() else { return };
    let limiter = on_the_callers_clock(url, &unique_prefix());
    let now = t0();
    let limited = Limits {
        concurrent_requests: Some(4),
        ..Limits::default()
    };
    for (ws, limits, waits) in [(1, &limited, true), (2, &Limits::default(), false)] {
        for _ in 0..2 {
            let r = admitted(
                limiter
                    .reserve(ws, limits, None, cost(1, 1), now)
                    .await
                    .unwrap(),
            );
            assert_eq!(r.settle_before_answer, waits, "workspace {ws}");
        }
    }
}

/// An instance killed with a request running, and no call for its workspace until the
/// records' keys have expired (their life is about two leases; the workspace's hash lives ten
/// minutes): the holds of the records that went with them go too. They stayed, a slot and
/// tokens held until the hash expired, and every refusal gave it its life again (an outside
/// audit, `kill -9` of an instance on an idle workspace).
#[tokio::test]
async fn holds_whose_records_expired_are_let_go() {
    let Some(url) = shared_redis() else { return };
    let prefix = unique_prefix();
    let (ws, start) = (1, t0());
    let limits = Limits {
        concurrent_requests: Some(1),
        tokens_per_month: Some(100_000),
        ..Limits::default()
    };
    {
        // The instance that dies: its reservation is never settled nor renewed.
        let dies = on_the_callers_clock(url.clone(), &prefix);
        admitted(
            dies.reserve(ws, &limits, None, cost(10, 500), start)
                .await
                .unwrap(),
        );
    }
    // What Redis does when the records' keys reach their life, with nobody calling meanwhile.
    let [_, records, expiries] = keys_of(&prefix, ws);
    let mut spy = Spy::single(&url).await;
    let Spy::Single(conn) = &mut spy else {
        unreachable!()
    };
    let _: () = redis::cmd("DEL")
        .arg(&records)
        .arg(&expiries)
        .query_async(conn)
        .await
        .unwrap();
    let other = on_the_callers_clock(url, &prefix);
    let later = start + 600 * SEC;
    let u = other.usage(ws, &limits, later).await.unwrap();
    assert_eq!(holds(&u), (0, 0, 0), "nothing is held");
    admitted(
        other
            .reserve(ws, &limits, None, cost(10, 500), later)
            .await
            .unwrap(),
    );
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_lease_frees_slot_and_month_hold_and_a_late_settlement_counts_once() {
    let Some(url) = shared_redis() else { return };
    let (ws, start) = (1, t0());
    let ledger = Arc::new(Ledger::default());
    ledger.add_prior(ws, MonthKey::of(start), "", 500);
    let limiter = limiter(
        Topology::Single(url),
        &unique_prefix(),
        Duration::from_secs(10),
        TimeSource::Caller,
        ledger,
    );
    // 6000 tokens/minute refill 100 a second, so the bucket shows what a reservation still takes.
    let limits = Limits {
        concurrent_requests: Some(1),
        tokens_per_minute: Some(6_000),
        tokens_per_month: Some(100_000),
        ..Limits::default()
    };

    let a = admitted(
        limiter
            .reserve(ws, &limits, None, cost(1_000, 3_000), start)
            .await
            .unwrap(),
    );
    assert_eq!(a.held.tokens, 3_000);

    // Until its lease ends, the reservation holds its slot and its month tokens.
    let before_end = start + 10 * SEC - MS;
    let d = limiter
        .reserve(ws, &limits, None, cost(1, 1), before_end)
        .await
        .unwrap();
    let (kind, limit, _) = denied(d);
    assert_eq!(
        (kind, limit),
        (DenialKind::RateLimited, LimitName::ConcurrentRequests)
    );
    let u = limiter.usage(ws, &limits, before_end).await.unwrap();
    assert_eq!(holds(&u), (1, 3_000, 500));

    // Past the lease (acted on within `REAP_LATENESS` of the last look, which was the call
    // above), the instance is presumed gone: slot and month hold are released, the tokens it
    // took from the bucket stay taken (3000 left + 10.099 s of refill).
    let after = before_end + REAP_LATENESS.as_nanos() as Nanos;
    let u = limiter.usage(ws, &limits, after).await.unwrap();
    assert_eq!(holds(&u), (0, 0, 500));
    assert_eq!(u.bucket_tokens, Some(4_009));
    let b = admitted(
        limiter
            .reserve(ws, &limits, None, cost(100, 100), after)
            .await
            .unwrap(),
    );

    // The late settlement counts its actual usage in the month once, gives the bucket back
    // held - actual, and frees no slot (b's stays held).
    let first = limiter.settle(&a, &limits, 1_200, after).await.unwrap();
    assert_eq!(first.at, after);
    assert!(first.counter.is_some());
    let u = limiter.usage(ws, &limits, after).await.unwrap();
    assert_eq!(holds(&u), (1, 100, 500 + 1_200));
    assert_eq!(u.bucket_tokens, Some(4_009 - 100 + (3_000 - 1_200)));

    // Again (a retry, even with another figure): nothing changes, and it answers as before.
    for actual in [1_200, 5] {
        let again = limiter.settle(&a, &limits, actual, after).await.unwrap();
        assert_eq!(again, first);
        assert_eq!(limiter.usage(ws, &limits, after).await.unwrap(), u);
    }

    limiter.settle(&b, &limits, 100, after).await.unwrap();
    let u = limiter.usage(ws, &limits, after).await.unwrap();
    assert_eq!(holds(&u), (0, 0, 500 + 1_200 + 100));
}

/// A reservation whose lease ran out is remembered (as `X`) for a tombstone's life, whichever
/// call reaped it, so that a late settlement gives its tokens back rather than charging them a
/// second time. Here the reaping call is a read (`usage`), on the server's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_reaped_by_a_read_is_still_known_to_its_late_settlement() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix) = (2, unique_prefix());
    let ledger = Arc::new(Ledger::default());
    let lease = Duration::from_secs(1);
    let topology = Topology::Single(url.clone());
    // 600 tokens/minute refill 10 a second: slow against the seconds this test takes.
    let limits = Limits {
        concurrent_requests: Some(1),
        tokens_per_minute: Some(600),
        ..Limits::default()
    };
    let gone = limiter(
        topology.clone(),
        &prefix,
        lease,
        TimeSource::Server,
        ledger.clone(),
    );
    let a = admitted(
        gone.reserve(ws, &limits, None, cost(500, 500), 0)
            .await
            .unwrap(),
    );
    // Its instance stops renewing.
    drop(gone);

    let other = limiter(topology, &prefix, lease, TimeSource::Server, ledger);
    eventually(Duration::from_secs(10), "the lease ends", || async {
        let u = other.usage(ws, &limits, 0).await.unwrap();
        (u.in_flight == 0).then_some(()).ok_or(format!("{u:?}"))
    })
    .await;
    // Past the life the record had when it was live (its lease and a second).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut spy = Spy::single(&url).await;
    let record = spy.records(&prefix, ws).await.remove(&a.id.to_string());

    other.settle(&a, &limits, 100, 0).await.unwrap();
    let u = other.usage(ws, &limits, 0).await.unwrap();
    // 500 were taken, 400 come back: at least 500 of 600 (more as it refills), whereas
    // charging the 100 on top of the 500 would leave at most 100 plus the refill.
    let bucket = u.bucket_tokens.unwrap();
    assert!(
        bucket >= 500,
        "bucket {bucket}: the late settlement charged again; its record before: {record:?}"
    );
    assert!(
        record.as_deref().is_some_and(|r| r.starts_with("X|500|")),
        "the expired record is kept for its late settlement: {record:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_holds_its_slot_until_its_instance_is_gone() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix) = (3, unique_prefix());
    let ledger = Arc::new(Ledger::default());
    // Renewed every 300 ms; a stall of 600 ms would let it lapse, which a busy machine may cause
    // once in a long while but not in the few seconds this test takes.
    let lease = Duration::from_millis(900);
    let topology = Topology::Single(url);
    let limits = Limits {
        concurrent_requests: Some(1),
        ..Limits::default()
    };
    let holder = limiter(
        topology.clone(),
        &prefix,
        lease,
        TimeSource::Server,
        ledger.clone(),
    );
    let other = limiter(topology, &prefix, lease, TimeSource::Server, ledger);
    admitted(
        holder
            .reserve(ws, &limits, None, cost(0, 0), 0)
            .await
            .unwrap(),
    );

    // Unsettled for four lease lengths: still holding its slot, seen from another instance.
    let held_since = Instant::now();
    while held_since.elapsed() < lease * 4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let u = other.usage(ws, &limits, 0).await.unwrap();
        assert_eq!(
            u.in_flight,
            1,
            "the slot lapsed after {:?}",
            held_since.elapsed()
        );
    }
    let d = other
        .reserve(ws, &limits, None, cost(0, 0), 0)
        .await
        .unwrap();
    assert_eq!(denied(d).1, LimitName::ConcurrentRequests);

    // Its instance goes away: nobody renews, and the slot comes free within a few leases.
    drop(holder);
    let gone_at = Instant::now();
    eventually(Duration::from_secs(10), "the slot is freed", || async {
        let u = other.usage(ws, &limits, 0).await.unwrap();
        (u.in_flight == 0).then_some(()).ok_or(format!("{u:?}"))
    })
    .await;
    let freed_after = gone_at.elapsed();
    eprintln!("slot freed {freed_after:?} after its instance went away (lease {lease:?})");
    assert!(freed_after < lease * 6, "freed only after {freed_after:?}");
    admitted(
        other
            .reserve(ws, &limits, None, cost(0, 0), 0)
            .await
            .unwrap(),
    );
}

/// The limiter's code runs as a function library where the server offers functions (loaded
/// again when the server lost it) and as a script where it refuses them, with the same
/// decisions.
#[tokio::test]
async fn the_library_is_loaded_when_missing_and_a_server_without_functions_runs_the_script() {
    let server = RedisServer::start();
    assert_eq!(
        server.cli(&[
            "ACL",
            "SETUSER",
            "nofn",
            "on",
            ">pw",
            "~*",
            "+@all",
            "-fcall",
            "-function"
        ]),
        "OK"
    );
    let url = server.url();
    let no_functions = url.replacen("redis://", "redis://nofn:pw@", 1);
    let limits = Limits {
        requests_per_second: Some(1.0),
        burst: Some(3),
        tokens_per_minute: Some(1_000),
        concurrent_requests: Some(10),
        ..Limits::default()
    };
    let mut outcomes = Vec::new();
    for (url, prefix) in [(no_functions, unique_prefix()), (url, unique_prefix())] {
        let limiter = limiter(
            Topology::Single(url),
            &prefix,
            Duration::from_secs(30),
            TimeSource::Caller,
            Arc::new(Ledger::default()),
        );
        let mut seen = Vec::new();
        for i in 0..5 {
            if i == 2 {
                // The server loses its functions (a flush, a new node): they are loaded again.
                assert_eq!(server.cli(&["FUNCTION", "FLUSH"]), "OK");
            }
            let d = limiter
                .reserve(1, &limits, None, cost(100, 200), t0())
                .await
                .unwrap();
            let mut text = format!("{d:?}");
            if let Decision::Admit { reservation, .. } = &d {
                limiter
                    .settle(reservation, &limits, 150, t0())
                    .await
                    .unwrap();
                // Reservation ids differ between the runs; everything else is the same.
                text = text.replace(&format!("{:?}", reservation.id), "ID");
            }
            seen.push(text);
        }
        let u = limiter.usage(1, &limits, t0()).await.unwrap();
        seen.push(format!("{:?} {:?}", holds(&u), u.bucket_tokens));
        outcomes.push(seen);
    }
    assert_eq!(
        outcomes[0].iter().filter(|d| d.contains("Admit")).count(),
        3
    );
    assert_eq!(outcomes[0], outcomes[1]);
    assert!(
        server.cli(&["FUNCTION", "LIST"]).contains("tiergate_"),
        "the library is loaded again after the flush"
    );
    let stats = server.cli(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_fcall:"), "{stats}");
    assert!(stats.contains("cmdstat_evalsha:"), "{stats}");
}

/// A settlement that never reaches Redis (the connection dies under it) leaves its record live;
/// the instance must stop renewing it, so that its lease frees the slot, as if the instance
/// were gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_failed_is_not_renewed_so_its_lease_frees_the_slot() {
    let server = RedisServer::start();
    let (ws, prefix) = (13, unique_prefix());
    let lease = Duration::from_millis(900);
    let limiter = limiter(
        Topology::Single(server.url()),
        &prefix,
        lease,
        TimeSource::Server,
        Arc::new(Ledger::default()),
    );
    let limits = Limits {
        concurrent_requests: Some(1),
        ..Limits::default()
    };
    let r = admitted(
        limiter
            .reserve(ws, &limits, None, cost(100, 100), 0)
            .await
            .unwrap(),
    );

    // Scripts wait while writes are paused; the settlement's connection is killed meanwhile,
    // so the server never runs it.
    let mut spy = Spy::single(&server.url()).await;
    let _: () = spy.run(&[b"CLIENT", b"PAUSE", b"10000", b"WRITE"]).await;
    let settle = limiter.settle(&r, &limits, 0, 0);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _: i64 = spy
            .run(&[b"CLIENT", b"KILL", b"TYPE", b"normal", b"SKIPME", b"yes"])
            .await;
        let _: () = spy.run(&[b"CLIENT", b"UNPAUSE"]).await;
    };
    let (settled, ()) = tokio::join!(settle, kill);
    assert!(settled.is_err(), "the settlement ran: {settled:?}");
    let record = spy.records(&prefix, ws).await.remove(&r.id.to_string());
    assert!(
        record.as_deref().is_some_and(|r| r.starts_with('L')),
        "the record stays live: {record:?}"
    );

    let failed_at = Instant::now();
    eventually(Duration::from_secs(10), "the slot is freed", || async {
        let u = limiter.usage(ws, &limits, 0).await.unwrap();
        (u.in_flight == 0).then_some(()).ok_or(format!("{u:?}"))
    })
    .await;
    eprintln!(
        "slot freed {:?} after the settlement failed",
        failed_at.elapsed()
    );
    assert!(failed_at.elapsed() < lease * 6);
    assert_eq!(limiter.live_reservations(), 0);

    // The caller's retries count once.
    for _ in 0..2 {
        limiter.settle(&r, &limits, 40, 0).await.unwrap();
        let u = limiter.usage(ws, &limits, 0).await.unwrap();
        assert_eq!(holds(&u), (0, 0, 40));
    }
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

/// Sends `signal` to the Redis server's process.
fn signal(server: &RedisServer, signal: libc::c_int) {
    server.signal(signal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_dropped_mid_call_is_refunded_once_the_server_answers() {
    let server = RedisServer::start();
    let (ws, prefix, now) = (4, unique_prefix(), t0());
    let limiter = on_the_callers_clock(server.url(), &prefix);
    let limits = Limits {
        requests_per_second: Some(1.0),
        burst: Some(5),
        concurrent_requests: Some(2),
        tokens_per_minute: Some(6_000),
        tokens_per_month: Some(100_000),
        models: [(
            "m".to_string(),
            ModelLimits {
                tokens_per_minute: Some(3_000),
                tokens_per_month: None,
            },
        )]
        .into(),
        key: None,
    };
    // Connected, the script loaded, the month counter based: the next call is one EVALSHA.
    let fresh = limiter.usage(ws, &limits, now).await.unwrap();
    assert_eq!(holds(&fresh), (0, 0, 0));

    // The server stops answering; the caller gives up on its reserve after 100 ms. The call is
    // already on the wire, so the server makes the reservation when it resumes, and then takes
    // the cancellation that the dropped future left behind.
    signal(&server, libc::SIGSTOP);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        limiter.reserve(ws, &limits, Some("m"), cost(500, 2_000), now),
    )
    .await;
    assert!(gave_up.is_err(), "the stopped server answered: {gave_up:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&server, libc::SIGCONT);

    let u = eventually(Duration::from_secs(10), "the refund", || async {
        let u = limiter.usage(ws, &limits, now).await.unwrap();
        (holds(&u) == (0, 0, 0) && u.bucket_tokens == Some(6_000))
            .then(|| u.clone())
            .ok_or(format!("{u:?}"))
    })
    .await;
    // The reservation was made (it took its request, which no settlement gives back), and then
    // refunded: its tokens and slot are back, nothing counted in the month.
    let requests = u.snapshot.requests.unwrap();
    assert_eq!(requests.remaining, 4, "the reserve reached the server");
    let mut spy = Spy::single(&server.url()).await;
    let records = spy.records(&prefix, ws).await;
    assert_eq!(
        records.values().collect::<Vec<_>>(),
        ["C"],
        "one cancelled record, no live one"
    );
    assert_eq!(limiter.live_reservations(), 0);
    // The model's bucket was refunded too: a reservation of its whole capacity fits.
    let full = limiter
        .reserve(ws, &limits, Some("m"), cost(3_000, 3_000), now)
        .await
        .unwrap();
    assert_eq!(admitted(full).held.tokens, 3_000);
}

/// Plants a cancellation for `id` as the guard of a dropped `reserve` sends it, by running the
/// script's `cancel` op directly: the limiter does not offer it, since only a dropped call
/// cancels.
async fn plant_cancel(url: &str, prefix: &str, workspace: WorkspaceId, id: ReservationId) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let script = redis::Script::new(&tiergate::limiter::redis::script_code());
    let mut invocation = script.prepare_invoke();
    for key in keys_of(prefix, workspace) {
        invocation.key(key);
    }
    // op, now (µs), idle ms, records ms, tombstone ms; id, generation candidate, actual, tpm,
    // model, model tpm
    let now = (t0() / 1_000).to_string();
    for arg in [
        "cancel",
        &now,
        "600000",
        "61000",
        "10000",
        &id.to_string(),
        "planted",
        "0",
        "0",
        "",
        "0",
    ] {
        invocation.arg(arg);
    }
    let _: redis::Value = invocation.invoke_async(&mut conn).await.unwrap();
}

/// The other order: the cancellation reaches the server before the reserve it cancels. The
/// limiter cannot be made to send them so (one connection keeps them in order), so the test
/// plants the tombstone for the id the next `reserve` will draw (`ReservationId::next()` counts
/// up; other tests drawing in between make it retry, for as long as they draw: up to 20 s).
#[tokio::test]
async fn a_cancelled_id_is_refused_when_its_reserve_arrives_later() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix, now) = (5, unique_prefix(), t0());
    let limiter = on_the_callers_clock(url.clone(), &prefix);
    let limits = Limits {
        concurrent_requests: Some(10),
        tokens_per_minute: Some(6_000),
        ..Limits::default()
    };
    let mut spy = Spy::single(&url).await;
    let mut refused = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let drawn = ReservationId::next();
        let cancelled = ReservationId(drawn.0 + 1);
        plant_cancel(&url, &prefix, ws, cancelled).await;
        let r = admitted(
            limiter
                .reserve(ws, &limits, None, cost(100, 100), now)
                .await
                .unwrap(),
        );
        assert_ne!(r.id, cancelled, "a cancelled id was admitted");
        // Refused, the reserve drew a generation candidate and then another id.
        if r.id == ReservationId(drawn.0 + 3) {
            refused = Some((cancelled, r));
            break;
        }
        limiter.settle(&r, &limits, 0, now).await.unwrap();
    }
    let (cancelled, r) = refused.expect("the reserve never drew the planted id in 20 s");
    let records = spy.records(&prefix, ws).await;
    assert_eq!(records[&cancelled.to_string()], "C");
    assert!(records[&r.id.to_string()].starts_with("L|100|"));
    // Only the admitted reservation holds anything.
    let u = limiter.usage(ws, &limits, now).await.unwrap();
    assert_eq!((u.in_flight, u.bucket_tokens), (1, Some(6_000 - 100)));
}

// ---------------------------------------------------------------------------------------------
// The month counter, rebuilt from the ledger
// ---------------------------------------------------------------------------------------------

/// Many requests settle while the month counter vanishes twice (`FLUSHDB`: counter and records
/// gone) and is rebuilt from a ledger that is slow to read and written late. Once everything is
/// written and the re-bases are over, the counter equals the ledger: nothing lost, nothing
/// counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_month_counter_rebuilt_after_flushes_counts_every_settlement_once() {
    let server = RedisServer::start();
    let ws = 6;
    let month = MonthKey::of(SystemClock.now());
    let ledger = Arc::new(Ledger::default());
    ledger.add_prior(ws, month, "", 10_000);
    // Counted by a generation long gone: still part of what any new one starts from.
    ledger.add(Event {
        workspace: ws,
        month,
        request: None,
        model: String::new(),
        tokens: 2_000,
        counter: Some("gone".to_string()),
    });
    // Reads answer what was written up to 50 ms after they began, up to 0.45 s later: settlements
    // land while a base is read, and what lagged is missing from it.
    ledger.slow(Duration::from_millis(50), Duration::from_millis(400));
    let writer = Arc::new(LaggingWriter {
        ledger: ledger.clone(),
        lag: Duration::from_millis(300),
        pending: Mutex::new(Vec::new()),
    });
    let limiter = Arc::new(limiter(
        Topology::Single(server.url()),
        &unique_prefix(),
        Duration::from_secs(30),
        TimeSource::Server,
        ledger.clone(),
    ));
    let limits = Limits {
        tokens_per_month: Some(1_000_000_000),
        ..Limits::default()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..12 {
        let (limiter, limits, writer, stop) = (
            limiter.clone(),
            limits.clone(),
            writer.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let (mut settled, mut failed) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let estimate = 50 + random_below(150);
                let decision = limiter
                    .reserve(ws, &limits, None, cost(10, estimate), SystemClock.now())
                    .await;
                let reservation = match decision {
                    Ok(d) => admitted(d),
                    // The counter changed under three attempts in a row: not admitted.
                    Err(e) => {
                        eprintln!("reserve failed: {e}");
                        failed += 1;
                        continue;
                    }
                };
                tokio::time::sleep(random_duration(Duration::from_millis(150))).await;
                let actual = random_below(300);
                let s = limiter
                    .settle(&reservation, &limits, actual, SystemClock.now())
                    .await
                    .expect("settling against a running server");
                writer.write(Event {
                    workspace: ws,
                    month: MonthKey::of(s.at),
                    request: Some(reservation.id),
                    model: String::new(),
                    tokens: actual,
                    counter: s.counter,
                });
                settled += 1;
            }
            (settled, failed)
        }));
    }

    let mut spy = Spy::single(&server.url()).await;
    let mut last_flush = Instant::now();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _: () = spy.run(&[b"FLUSHDB"]).await;
        last_flush = Instant::now();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut settled, mut failed) = (0, 0);
    for worker in workers {
        let (s, f) = worker.await.unwrap();
        settled += s;
        failed += f;
    }
    writer.drain().await;
    let events = ledger.events();
    let generations: HashSet<_> = events
        .iter()
        .filter(|e| e.request.is_some())
        .filter_map(|e| e.counter.clone())
        .collect();
    eprintln!(
        "{settled} settlements, {failed} reserves failed, {} generations counted them, {} reads \
         of the ledger",
        generations.len(),
        ledger.reads.lock().unwrap().len()
    );
    assert!(
        settled > 50,
        "too little traffic to mean anything: {settled}"
    );
    assert!(
        generations.len() >= 3,
        "one generation before the flushes and one after each: {generations:?}"
    );
    let ids: Vec<_> = events.iter().filter_map(|e| e.request).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "the ledger holds a request twice");

    // The last generation's re-bases (1, 3 and 10 s after its first base, which follows the
    // last flush by at most a slow read) are over by then.
    let rebased = last_flush + Duration::from_millis(11_500);
    tokio::time::sleep_until(rebased.into()).await;
    let want = ledger.total(ws, month);
    let u = limiter.usage(ws, &limits, SystemClock.now()).await.unwrap();
    assert_eq!(
        (u.month_settled_tokens, u.month_reserved_tokens, u.in_flight),
        (want, 0, 0),
        "the counter against the ledger's {want}"
    );
}

// ---------------------------------------------------------------------------------------------
// Keys and memory
// ---------------------------------------------------------------------------------------------

/// Model names as clients may send them: hash-tag braces, separators, spaces, 10 KB, unicode.
fn awkward_models() -> Vec<String> {
    vec![
        "{evil}".to_string(),
        "ab}{cd".to_string(),
        "vendor:model:v1".to_string(),
        "model with spaces".to_string(),
        "модель-模型-🚀".to_string(),
        format!("long-{}", "xyz".repeat(10 * 1024 / 3)),
    ]
}

/// How long a workspace's key may live after a call: `IDLE_TTL` (10 min), or until its buckets
/// refill from a minute of debt (2 min), with a margin.
const MAX_KEY_TTL_MS: i64 = (600 + 120 + 10) * 1_000;

/// Every key of `prefix`: it has a TTL, no longer than `MAX_KEY_TTL_MS`.
async fn assert_all_expire(spy: &mut Spy, prefix: &str) {
    let mut wrong = Vec::new();
    for key in spy.keys_starting(&format!("{{{prefix}:")).await {
        let ttl = spy.pttl(&key).await;
        if !(0 < ttl && ttl <= MAX_KEY_TTL_MS) {
            wrong.push(format!("{}: PTTL {ttl}", String::from_utf8_lossy(&key)));
        }
    }
    assert!(wrong.is_empty(), "keys that never expire: {wrong:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_keeps_at_most_three_keys_on_one_slot_without_model_names() {
    let seeds = tokio::task::spawn_blocking(cluster_seeds).await.unwrap();
    let (ws, prefix) = (7, unique_prefix());
    let models = awkward_models();
    let made_up: Vec<String> = ["made-up {1}", "made:up:2", "made up 3"]
        .map(String::from)
        .to_vec();
    let ledger = Arc::new(Ledger::default());
    ledger.add_prior(ws, MonthKey::of(SystemClock.now()), &models[0], 100);
    let limiter = limiter(
        cluster_topology(&seeds),
        &prefix,
        Duration::from_secs(30),
        TimeSource::Server,
        ledger,
    );
    let mut limits = Limits {
        requests_per_second: Some(100.0),
        tokens_per_minute: Some(1_000_000),
        tokens_per_month: Some(100_000_000),
        concurrent_requests: Some(100),
        ..Limits::default()
    };
    for m in &models {
        limits.models.insert(
            m.clone(),
            ModelLimits {
                tokens_per_minute: Some(100_000),
                tokens_per_month: Some(1_000_000),
            },
        );
    }

    // Each limited model: one settled request, and one left in flight for the last.
    let mut in_flight = None;
    for (i, m) in models.iter().enumerate() {
        let r = admitted(
            limiter
                .reserve(ws, &limits, Some(m), cost(10, 50), 0)
                .await
                .unwrap(),
        );
        if i + 1 < models.len() {
            limiter.settle(&r, &limits, 40, 0).await.unwrap();
        } else {
            in_flight = Some(r);
        }
    }
    // Names no limit knows (the upstream refuses them): refunded, they leave nothing behind.
    for m in &made_up {
        let r = admitted(
            limiter
                .reserve(ws, &limits, Some(m), cost(10, 50), 0)
                .await
                .unwrap(),
        );
        limiter.settle(&r, &limits, 0, 0).await.unwrap();
    }

    let mut spy = Spy::cluster(&seeds).await;
    let keys = spy.keys_starting(&format!("{{{prefix}:")).await;
    let expected: Vec<Vec<u8>> = {
        let mut k: Vec<_> = keys_of(&prefix, ws).map(String::into_bytes).to_vec();
        k.sort();
        k
    };
    assert_eq!(keys, expected, "the workspace's keys, and no other");
    let mut slots = HashSet::new();
    for key in &keys {
        let slot: i64 = spy.run(&[b"CLUSTER", b"KEYSLOT", key]).await;
        slots.insert(slot);
    }
    assert_eq!(slots.len(), 1, "one slot for the workspace: {slots:?}");

    // What the keys hold: fields and records name models by their hash only.
    let [state, records, expiries] = keys_of(&prefix, ws);
    let fields: Vec<(Vec<u8>, Vec<u8>)> = spy.run(&[b"HGETALL", state.as_bytes()]).await;
    let recs: Vec<(Vec<u8>, Vec<u8>)> = spy.run(&[b"HGETALL", records.as_bytes()]).await;
    let members: Vec<Vec<u8>> = spy
        .run(&[b"ZRANGE", expiries.as_bytes(), b"0", b"-1"])
        .await;
    let mut stored: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    for (f, v) in fields.iter().chain(&recs) {
        stored.extend([f.as_slice(), v.as_slice()]);
    }
    stored.extend(members.iter().map(Vec::as_slice));
    for m in models.iter().chain(&made_up) {
        let leak = stored
            .iter()
            .find(|s| s.windows(m.len()).any(|w| w == m.as_bytes()));
        if let Some(leak) = leak {
            panic!(
                "model name {m:.40} stored in Redis: {:.80}",
                String::from_utf8_lossy(leak)
            );
        }
    }
    let names: HashSet<String> = fields
        .iter()
        .map(|(f, _)| String::from_utf8(f.clone()).unwrap())
        .collect();
    for (i, m) in models.iter().enumerate() {
        let id = model_id(m);
        // The month fields: settled (`md`), or held while in flight (`mr`, the last one).
        let month = if i + 1 < models.len() { "md" } else { "mr" };
        for field in [format!("mt:{id}:l"), format!("{month}:{id}")] {
            assert!(names.contains(&field), "{field} for {m:.40}: {names:?}");
        }
    }
    assert!(names.contains(&format!("mb:{}", model_id(&models[0]))));
    for m in &made_up {
        let id = model_id(m);
        assert!(!names.iter().any(|f| f.contains(&id)), "{m} left {names:?}");
    }

    // Idle keys expire: every key has a TTL, also of a workspace only looked at, and of one
    // only ever denied.
    let (looked_at, denied_only) = (8, 9);
    limiter.usage(looked_at, &limits, 0).await.unwrap();
    let too_large = limiter
        .reserve(denied_only, &limits, None, cost(2_000_000, 2_000_000), 0)
        .await
        .unwrap();
    assert_eq!(denied(too_large).0, DenialKind::RequestTooLarge);
    assert_all_expire(&mut spy, &prefix).await;

    limiter
        .settle(&in_flight.unwrap(), &limits, 40, 0)
        .await
        .unwrap();
    assert_all_expire(&mut spy, &prefix).await;
}

/// `MEMORY USAGE` of a workspace's keys, in bytes.
async fn memory(spy: &mut Spy, prefix: &str, workspace: WorkspaceId) -> (i64, Vec<i64>) {
    let mut each = Vec::new();
    for key in keys_of(prefix, workspace) {
        let bytes: Option<i64> = spy
            .run(&[b"MEMORY", b"USAGE", key.as_bytes(), b"SAMPLES", b"0"])
            .await;
        each.push(bytes.unwrap_or(0));
    }
    (each.iter().sum(), each)
}

#[tokio::test]
async fn a_workspace_takes_a_few_kilobytes_of_redis() {
    let server = RedisServer::start();
    let (ws, prefix, start) = (10, unique_prefix(), t0());
    let limiter = on_the_callers_clock(server.url(), &prefix);
    let model = "mistral-large-latest";
    let limits = Limits {
        requests_per_second: Some(10.0),
        burst: Some(20),
        tokens_per_minute: Some(100_000),
        tokens_per_month: Some(10_000_000),
        concurrent_requests: Some(10),
        models: [(
            model.to_string(),
            ModelLimits {
                tokens_per_minute: Some(50_000),
                tokens_per_month: Some(1_000_000),
            },
        )]
        .into(),
        key: None,
    };
    let mut spy = Spy::single(&server.url()).await;

    // Typical activity: requests settled a second apart, the last still in flight.
    let mut now = start;
    let mut last = None;
    for i in 0..6 {
        now += SEC;
        let r = admitted(
            limiter
                .reserve(ws, &limits, Some(model), cost(300, 1_000), now)
                .await
                .unwrap(),
        );
        if i < 5 {
            limiter.settle(&r, &limits, 700, now).await.unwrap();
        } else {
            last = Some(r);
        }
    }
    let (in_flight, each_in_flight) = memory(&mut spy, &prefix, ws).await;
    limiter
        .settle(&last.unwrap(), &limits, 700, now)
        .await
        .unwrap();
    let (settled, each_settled) = memory(&mut spy, &prefix, ws).await;
    // A minute later the tombstones of the settled requests are gone: the workspace is idle.
    now += 61 * SEC;
    limiter.usage(ws, &limits, now).await.unwrap();
    let (idle, each_idle) = memory(&mut spy, &prefix, ws).await;
    // And one request in flight alone.
    limiter
        .reserve(ws, &limits, Some(model), cost(300, 1_000), now)
        .await
        .unwrap();
    let (one, each_one) = memory(&mut spy, &prefix, ws).await;
    eprintln!(
        "MEMORY USAGE of a workspace (all limits, one model limit), bytes [state, records, \
         expiries]: 5 settled in the last minute and one in flight {in_flight} \
         {each_in_flight:?}; 6 settled, none in flight {settled} {each_settled:?}; idle {idle} \
         {each_idle:?}; idle but one in flight {one} {each_one:?}"
    );
    assert!(in_flight < 4 * 1024, "{in_flight} bytes with one in flight");
    assert!(settled < 4 * 1024, "{settled} bytes with recent tombstones");
    assert!(idle < 2 * 1024, "{idle} bytes idle");
    assert_eq!(each_idle[1..], [0, 0], "no records left once idle");
    assert!(one < 4 * 1024, "{one} bytes with one in flight alone");
}

// ---------------------------------------------------------------------------------------------
// The server's clock
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_the_server_clock_admit_one_burst_between_them() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix) = (11, unique_prefix());
    let ledger = Arc::new(Ledger::default());
    let instances = [
        limiter(
            Topology::Single(url.clone()),
            &prefix,
            Duration::from_secs(30),
            TimeSource::Server,
            ledger.clone(),
        ),
        limiter(
            Topology::Single(url),
            &prefix,
            Duration::from_secs(30),
            TimeSource::Server,
            ledger,
        ),
    ];
    for instance in &instances {
        instance.ping(None).await.unwrap();
    }
    let limits = Limits {
        requests_per_second: Some(1.0),
        burst: Some(2),
        ..Limits::default()
    };
    // Their own clocks are an hour apart: on the server's, that changes nothing.
    let hour = 3_600 * SEC;
    let clocks = [SystemClock.now() - hour, SystemClock.now() + hour];
    let started = Instant::now();
    let decisions = futures_util::future::join_all((0..20).map(|i| {
        let (limiter, limits) = (&instances[i % 2], &limits);
        async move {
            limiter
                .reserve(ws, limits, None, cost(0, 0), clocks[i % 2])
                .await
                .unwrap()
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let mut admitted = 0;
    for d in decisions {
        match d {
            Decision::Admit { .. } => admitted += 1,
            Decision::Deny { denial, .. } => {
                assert_eq!(denial.limit, LimitName::RequestsPerSecond);
                assert!(denial.retry_after <= SEC, "{denial:?}");
            }
        }
    }
    // The burst, and what the rate adds while the calls take.
    let at_most = 2 + elapsed.as_secs();
    eprintln!("{admitted} of 20 admitted in {elapsed:?}");
    assert!(
        (2..=at_most).contains(&admitted),
        "{admitted} admitted in {elapsed:?}"
    );
}

#[tokio::test]
async fn on_the_server_clock_settlements_and_months_follow_the_server() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix) = (12, unique_prefix());
    let ledger = Arc::new(Ledger::default());
    let limiter = limiter(
        Topology::Single(url.clone()),
        &prefix,
        Duration::from_secs(30),
        TimeSource::Server,
        ledger.clone(),
    );
    let limits = Limits {
        tokens_per_month: Some(1_000),
        ..Limits::default()
    };
    // The caller's clock is years wrong; the server's is the system's (one machine).
    let wrong = datetime!(2001-01-15 00:00 UTC).unix_timestamp_nanos() as Nanos;
    let month = MonthKey::of(SystemClock.now());
    let r = admitted(
        limiter
            .reserve(ws, &limits, None, cost(100, 100), wrong)
            .await
            .unwrap(),
    );
    assert_eq!(r.held.month, month);
    assert_eq!(*ledger.reads.lock().unwrap(), [(ws, month)]);

    let s = limiter.settle(&r, &limits, 100, wrong).await.unwrap();
    let mut spy = Spy::single(&url).await;
    let (secs, micros): (u64, u64) = spy.run(&[b"TIME"]).await;
    let server_now = secs * SEC + micros * 1_000;
    let system_now = SystemClock.now();
    for (clock, now) in [("server", server_now), ("system", system_now)] {
        assert!(
            s.at.abs_diff(now) < 5 * SEC,
            "settled at {} ns, {clock} time {now}",
            s.at
        );
    }
    assert_eq!(MonthKey::of(s.at), month);

    // Time until the next month, from the server's now.
    let d = limiter
        .reserve(ws, &limits, None, cost(950, 950), wrong)
        .await
        .unwrap();
    let (kind, _, retry_after) = denied(d);
    assert_eq!(kind, DenialKind::QuotaExceeded);
    let until_next = month.next().start() - server_now;
    assert!(
        retry_after.abs_diff(until_next) < 5 * SEC,
        "retry after {retry_after} ns, the month ends in {until_next}"
    );
}

/// A reserve that reaches the server twice with one id (a client that re-sent it after losing
/// the answer, as a cluster client may after a broken connection) is admitted once: the second
/// call answers the same admission and takes nothing more.
#[tokio::test]
async fn a_reserve_sent_twice_is_admitted_once() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix) = (9, unique_prefix());
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let script = redis::Script::new(&tiergate::limiter::redis::script_code());
    let now = (t0() / 1_000).to_string();
    let id = ReservationId::next().to_string();
    // op, now, idle, records, tomb; id, lease, gen candidate, rate, burst capacity, tpm, month
    // cap, concurrency, model, model tpm, model month, prompt, estimate, need base; the key's
    // id (none), rate, burst capacity, tpm, month cap
    let args = [
        "reserve",
        &now,
        "600000",
        "61000",
        "10000",
        &id,
        "60000",
        "g1",
        "1000",
        "2000000000",
        "600",
        "0",
        "1",
        "",
        "0",
        "0",
        "100",
        "100",
        "0",
        "",
        "0",
        "0",
        "0",
        "0",
    ];
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut invocation = script.prepare_invoke();
        for key in keys_of(&prefix, ws) {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let reply: Vec<redis::Value> = invocation.invoke_async(&mut conn).await.unwrap();
        replies.push(reply);
    }
    for reply in &replies {
        assert_eq!(reply[0], redis::Value::Int(1), "admitted: {reply:?}");
        assert_eq!(
            reply[2],
            redis::Value::Int(100),
            "the same tokens: {reply:?}"
        );
    }
    // One slot, 100 tokens, one request taken: not two.
    let limiter = on_the_callers_clock(url.clone(), &prefix);
    let limits = Limits {
        requests_per_second: Some(1.0),
        burst: Some(2),
        tokens_per_minute: Some(600),
        concurrent_requests: Some(1),
        ..Limits::default()
    };
    let u = limiter.usage(ws, &limits, t0()).await.unwrap();
    assert_eq!(u.in_flight, 1);
    assert_eq!(u.bucket_tokens, Some(500));
    assert_eq!(u.snapshot.requests.unwrap().remaining, 1);
}

/// Expired records are looked for at most once per `REAP_LATENESS` per workspace, 64 at a time
/// (`redis.lua`, `reap`). A look that finds a full batch looks again on the next call, so a
/// backlog drains call after call rather than a batch a tenth of a second; and a look that
/// finds less waits for the cadence again.
#[tokio::test]
async fn a_backlog_of_expired_records_is_reaped_in_full_batches_call_after_call() {
    let Some(url) = shared_redis() else { return };
    let (ws, prefix, start) = (11, unique_prefix(), t0());
    let limiter = on_the_callers_clock(url.clone(), &prefix);
    let limits = Limits {
        requests_per_second: Some(10_000.0),
        burst: Some(10_000),
        tokens_per_minute: Some(10_000_000),
        ..Limits::default()
    };
    let mut spy = Spy::single(&url).await;

    // 150 requests settled a millisecond apart leave 150 tombstones.
    let mut now = start;
    for _ in 0..150 {
        now += MS;
        let r = admitted(
            limiter
                .reserve(ws, &limits, None, cost(10, 10), now)
                .await
                .unwrap(),
        );
        limiter.settle(&r, &limits, 10, now).await.unwrap();
    }
    assert_eq!(spy.records(&prefix, ws).await.len(), 150);

    // Once they have all expired, calls at one instant take 64 each (a `usage` may make more
    // than one call) until none is left.
    now += TOMBSTONE.as_nanos() as Nanos + SEC;
    let mut left = Vec::new();
    for _ in 0..3 {
        limiter.usage(ws, &limits, now).await.unwrap();
        left.push(spy.records(&prefix, ws).await.len());
    }
    assert!(left.iter().all(|n| [86, 22, 0].contains(n)), "{left:?}");
    assert_eq!(left[2], 0, "{left:?}");

    // A look just before a record expires: the next look comes a `REAP_LATENESS` later, not at
    // the record's expiry.
    let r = admitted(
        limiter
            .reserve(ws, &limits, None, cost(10, 10), now)
            .await
            .unwrap(),
    );
    limiter.settle(&r, &limits, 10, now).await.unwrap();
    let expiry = now + TOMBSTONE.as_nanos() as Nanos;
    let lateness = REAP_LATENESS.as_nanos() as Nanos;
    let look = expiry - lateness / 2;
    limiter.usage(ws, &limits, look).await.unwrap();
    limiter.usage(ws, &limits, expiry + MS).await.unwrap();
    assert_eq!(
        spy.records(&prefix, ws).await.len(),
        1,
        "looked again too soon"
    );
    limiter.usage(ws, &limits, look + lateness).await.unwrap();
    assert_eq!(
        spy.records(&prefix, ws).await.len(),
        0,
        "not looked at the cadence"
    );
}

/// A new generation of the month counter (an instance's switch back after serving a workspace
/// on its own; every such instance starts one) keeps the holds of the reservations still live,
/// the month's and the model's, and counts their settlements once, in itself. Each generation
/// dropping them let the month be used again on top of requests still running (an outside
/// audit: a quota overrun by half at one switch back, more than doubled by a breaker tripping
/// again and again).
#[tokio::test]
async fn a_new_generation_keeps_the_holds_of_live_reservations() {
    let Some(url) = shared_redis() else { return };
    let (ws, start) = (1, t0());
    let ledger = Arc::new(Ledger::default());
    ledger.add_prior(ws, MonthKey::of(start), "", 500);
    let limiter = limiter(
        Topology::Single(url),
        &unique_prefix(),
        Duration::from_secs(60),
        TimeSource::Caller,
        ledger,
    );
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "m".to_string(),
        ModelLimits {
            tokens_per_minute: None,
            tokens_per_month: Some(5_000),
        },
    );
    let limits = Limits {
        concurrent_requests: Some(5),
        tokens_per_month: Some(10_000),
        models,
        ..Limits::default()
    };
    let a = admitted(
        limiter
            .reserve(ws, &limits, Some("m"), cost(1_000, 3_000), start)
            .await
            .unwrap(),
    );
    for _ in 0..2 {
        limiter
            .new_generation(
                ws,
                start,
                &RedisLimiter::generation_id(),
                Carry::default(),
                &limits,
            )
            .await
            .unwrap();
    }
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u), (1, 3_000, 500), "the hold kept");
    assert_eq!(u.models[0].month_used, 3_000, "the model's too");
    // 500 settled + 3,000 held + 7,000 > 10,000.
    let (kind, limit, _) = denied(
        limiter
            .reserve(ws, &limits, None, cost(7_000, 7_000), start)
            .await
            .unwrap(),
    );
    assert_eq!(
        (kind, limit),
        (DenialKind::QuotaExceeded, LimitName::TokensPerMonth)
    );
    // 3,000 held + 2,500 > 5,000 for the model.
    let (kind, limit, _) = denied(
        limiter
            .reserve(ws, &limits, Some("m"), cost(2_500, 2_500), start)
            .await
            .unwrap(),
    );
    assert_eq!(
        (kind, limit),
        (DenialKind::QuotaExceeded, LimitName::ModelTokensPerMonth)
    );
    // Settled, it counts once, in the generation of now.
    let settled = limiter.settle(&a, &limits, 1_200, start).await.unwrap();
    assert!(settled.counter.is_some());
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u), (0, 0, 500 + 1_200));
    assert_eq!(u.models[0].month_used, 1_200);
}

/// Requests an instance admitted on its own while Redis was away, still running when it is back,
/// become reservations of the new generation under their own ids (`Carry::running`): they hold
/// their tokens (the workspace's and their model's) and their concurrency slot, and are settled
/// there like Redis's own, counted once, in that generation.
#[tokio::test]
async fn requests_carried_back_are_reservations_of_the_new_generation() {
    let Some(url) = shared_redis() else { return };
    let (ws, start) = (1, t0());
    let ledger = Arc::new(Ledger::default());
    ledger.add_prior(ws, MonthKey::of(start), "", 500);
    let limiter = limiter(
        Topology::Single(url),
        &unique_prefix(),
        Duration::from_secs(60),
        TimeSource::Caller,
        ledger,
    );
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "m".to_string(),
        ModelLimits {
            tokens_per_minute: None,
            tokens_per_month: Some(5_000),
        },
    );
    let limits = Limits {
        concurrent_requests: Some(1),
        tokens_per_month: Some(10_000),
        models,
        ..Limits::default()
    };
    let alone = Reservation::new(
        ws,
        Held {
            model: Some("m".into()),
            tokens: 3_000,
            month: MonthKey::of(start),
            slot: true,
            key: None,
        },
    );
    let carry = Carry {
        running: vec![alone.clone()],
        ..Carry::default()
    };
    let generation = RedisLimiter::generation_id();
    limiter
        .new_generation(ws, start, &generation, carry, &limits)
        .await
        .unwrap();
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u), (1, 3_000, 500), "its slot and tokens held");
    assert_eq!(u.models[0].month_used, 3_000, "the model's too");
    // Its slot is the only one.
    let (kind, limit, _) = denied(
        limiter
            .reserve(ws, &limits, None, cost(10, 10), start)
            .await
            .unwrap(),
    );
    assert_eq!(
        (kind, limit),
        (DenialKind::RateLimited, LimitName::ConcurrentRequests)
    );
    let settled = limiter.settle(&alone, &limits, 1_200, start).await.unwrap();
    assert_eq!(settled.counter.as_deref(), Some(generation.as_str()));
    // Sent again (its first answer lost): the same answer, counted once.
    let again = limiter.settle(&alone, &limits, 1_200, start).await.unwrap();
    assert_eq!(again.counter, settled.counter);
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u), (0, 0, 500 + 1_200));
    assert_eq!(u.models[0].month_used, 1_200);
}

/// A carry sent again under its generation's id (its first call failed on the caller's side,
/// but Redis may have run it) is taken in once: the request still running is held once, and the
/// shared buckets lose what the share used once. A carry under another id is taken in again.
#[tokio::test]
async fn a_carry_sent_again_under_its_id_is_taken_in_once() {
    let Some(url) = shared_redis() else { return };
    let (ws, start) = (1, t0());
    let limiter = limiter(
        Topology::Single(url),
        &unique_prefix(),
        Duration::from_secs(60),
        TimeSource::Caller,
        Arc::new(Ledger::default()),
    );
    let limits = Limits {
        requests_per_second: Some(1.0),
        burst: Some(10),
        concurrent_requests: Some(3),
        tokens_per_minute: Some(6_000),
        tokens_per_month: Some(100_000),
        ..Limits::default()
    };
    let running = Reservation::new(
        ws,
        Held {
            model: None,
            tokens: 1_000,
            month: MonthKey::of(start),
            slot: true,
            key: None,
        },
    );
    let carry = Carry {
        running: vec![running.clone()],
        requests: 4,
        tokens: 2_000,
        ..Carry::default()
    };
    let generation = RedisLimiter::generation_id();
    for _ in 0..3 {
        limiter
            .new_generation(ws, start, &generation, carry.clone(), &limits)
            .await
            .unwrap();
    }
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u).0, 1, "held once");
    assert_eq!(
        u.snapshot.requests.unwrap().remaining,
        6,
        "4 of 10 taken, once"
    );
    assert_eq!(
        u.snapshot.tokens.unwrap().remaining,
        4_000,
        "2,000 taken, once"
    );
    // Another carry is another's use.
    let other = Carry {
        requests: 4,
        ..Carry::default()
    };
    limiter
        .new_generation(ws, start, &RedisLimiter::generation_id(), other, &limits)
        .await
        .unwrap();
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(u.snapshot.requests.unwrap().remaining, 2);
}

/// A new generation (a carry at a switch back) starts from what the old one counted: a
/// settlement the ledger has not had yet (it waits a flush) still counts in the month. It was
/// lost until the ledger had it, and another instance admitted a request past the quota (an
/// outside audit: 6,080 of 6,000). The ledger's totals, read again, may only raise it.
#[tokio::test]
async fn a_new_generation_keeps_what_the_old_one_counted() {
    let Some(url) = shared_redis() else { return };
    let (ws, start) = (1, t0());
    let ledger = Arc::new(Ledger::default());
    let limiter = limiter(
        Topology::Single(url),
        &unique_prefix(),
        Duration::from_secs(60),
        TimeSource::Caller,
        ledger.clone(),
    );
    let limits = Limits {
        tokens_per_month: Some(100_000),
        ..Limits::default()
    };
    let a = admitted(
        limiter
            .reserve(ws, &limits, None, cost(100, 1_000), start)
            .await
            .unwrap(),
    );
    limiter.settle(&a, &limits, 1_200, start).await.unwrap();
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u).2, 1_200);
    // The ledger has none of it yet; a carry starts a new generation.
    limiter
        .new_generation(
            ws,
            start,
            &RedisLimiter::generation_id(),
            Carry::default(),
            &limits,
        )
        .await
        .unwrap();
    let u = limiter.usage(ws, &limits, start).await.unwrap();
    assert_eq!(holds(&u).2, 1_200, "the settlement still counts");
    let d = limiter
        .reserve(ws, &limits, None, cost(100, 98_900), start)
        .await
        .unwrap();
    assert!(matches!(d, Decision::Deny { .. }), "{d:?}");
}
