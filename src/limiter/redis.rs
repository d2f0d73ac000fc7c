//! The shared limiter: every instance decides against the same state in Redis (one server or a
//! Redis Cluster), so that any number of instances admit no more than one would.
//!
//! # Design
//! - **One round trip per decision.** `redis.lua` checks and takes every dimension of a request
//!   (requests/s, tokens/minute, tokens/month, concurrency, per-model limits) in one atomic
//!   script, with the arithmetic of `core.rs` in the same integer units. A denial changes
//!   nothing. Settling is one more call, idempotent by reservation id.
//! - **A function library, else a script.** The code is loaded as a Redis function library
//!   (Redis 7.0+; named by a hash of the code, loaded on any server that answers it lacks it), so
//!   its helpers are made once at load instead of on every call. A server that refuses functions
//!   gets the same code through `EVALSHA`, as does a call refused as `OOM`.
//! - **The server's clock.** In service the script reads `TIME`, so clock skew between instances
//!   changes nothing, and the ledger's day follows the same clock (`Settled::at`). Tests pass
//!   `now` in (`TimeSource::Caller`) to drive every backend with one manual clock.
//! - **Key layout.** A workspace's keys share the hash tag `{prefix:workspace}`, so its script
//!   runs on one cluster slot: `{p:w}` (buckets, concurrency, month counter), `{p:w}:r`
//!   (reservation records) and `{p:w}:e` (their expiries). Model names never appear in keys:
//!   fields use a 64-bit hash of the name. The prefix is validated at start; nothing a client
//!   sends can leave its workspace's keys. Idle keys expire (`IDLE_TTL` after the last call,
//!   later while a bucket refills), so memory follows the active workspaces.
//! - **Leases.** Every reservation is a record with a lease, renewed by its instance every third
//!   of the lease while the request is in flight (streams can last minutes). A record whose
//!   lease ran out (its instance died) gives back its concurrency slot and month hold; a late
//!   settlement of it still counts once.
//! - **Cancellation.** The reservation id is drawn before the call; if the caller's future is
//!   dropped mid-call, a guard cancels the id in the background (refunding it if it was made, or
//!   leaving a tombstone that refuses it if it arrives later).
//! - **The month counter is a cache of the ledger.** See ARCHITECTURE.md, "The month counter":
//!   each counter has a generation id; every settlement it counts is tagged with that id in the
//!   ledger; a new generation (after a flush, an eviction, a new month) starts from the ledger's
//!   total *excluding its own tag*, read when first needed and raised again over the next
//!   seconds to catch writes that lagged. Nothing is lost and nothing counts twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::Value;
use sha2::{Digest, Sha256};

use super::core::{micros, until, ModelUsage, MonthKey, MAX_REQUEST_TOKENS, NANO_REQUESTS};
use super::{
    Answer, Decision, Denial, DenialKind, Held, LimitName, Limiter, LimiterError, MonthSource,
    Nanos, Reservation, ReservationId, Settled, Snapshot, TokenCost, Usage, Window,
};
use crate::model::{KeyId, Limits, ModelLimits, WorkspaceId};

/// Reservation ids are this process's own (a random prefix and a counter), never a client's.
type Fast = foldhash::fast::RandomState;

/// How long a workspace's keys live after its last call (longer while a bucket refills).
pub const IDLE_TTL: Duration = Duration::from_secs(600);
/// How long a settled or cancelled reservation is remembered: a settlement retried within it
/// answers as the first did. One retried later, after an attempt that may have landed, first
/// starts a new generation of the month counter (rebuilt from the ledger), so it still counts
/// once. Short, because a busy workspace keeps one tombstone per request for this long.
pub const TOMBSTONE: Duration = Duration::from_secs(10);
/// How late a lease's end may be acted on (and a tombstone outlive its life): `redis.lua` looks
/// for expired records at most this often per workspace (`REAP_EVERY`), so that a busy
/// workspace reaps its tombstones in batches.
pub const REAP_LATENESS: Duration = Duration::from_millis(100);
/// After a counter generation is first based on the ledger, it is raised again this long after:
/// at 1, 3 and 10 s for ledger writes of other instances that lagged behind, then every 5 s
/// until 10 s past a `lease`. Requests an instance admitted on its own and carried back
/// (`Carry`) are settled in Redis, in the generation; but one that could not be carried (its
/// carry's call timed out, yet Redis ran it) is held for one lease and settled on the share, into
/// the ledger only: without these re-reads the counter never had what it settled once the hold
/// ended (an outside audit: 1.64 times a quota, 30 s after a switch back).
fn rebase_after(lease: Duration) -> Vec<Duration> {
    let mut at = vec![
        Duration::from_secs(1),
        Duration::from_secs(3),
        Duration::from_secs(10),
    ];
    let (step, until) = (Duration::from_secs(5), lease + Duration::from_secs(10));
    let mut next = Duration::from_secs(15);
    while next <= until {
        at.push(next);
        next += step;
    }
    at
}

/// Re-bases are accepted by the script this long after a generation began: past the last one.
fn rebase_window_ms(lease: Duration) -> u64 {
    let last = rebase_after(lease).last().copied().unwrap_or_default();
    (last + Duration::from_secs(20)).as_millis().max(60_000) as u64
}

/// The limiter's code: it defines `run(KEYS, ARGV)`, called as a script or as a function.
const SOURCE: &str = include_str!("redis.lua");

/// The code as a script (`EVAL`): every call makes its helpers again.
pub fn script_code() -> String {
    format!("{SOURCE}\nreturn run(KEYS, ARGV)\n")
}

/// The code as a function library (Redis 7.0 and later), whose helpers are made once when it
/// loads: (its name, which is also its function's, and its code). The name carries a hash of the
/// code, so that instances of different versions on one Redis (a rolling upgrade) each call
/// their own.
fn library() -> (String, String) {
    let digest = Sha256::digest(SOURCE.as_bytes());
    let name = format!("tiergate_{}", crate::hex(&digest[..8]));
    let code = format!(
        "#!lua name={name}\n{SOURCE}\nredis.register_function('{name}', \
         function(keys, args) return run(keys, args) end)\n"
    );
    (name, code)
}

/// What a call does after the function library failed it.
enum Next {
    Fail(redis::RedisError),
    Again,
    Script,
}

/// A server error (as opposed to a connection's or a timeout).
fn server_error(e: &redis::RedisError) -> bool {
    e.code().is_some()
}

/// The server does not offer functions (older than 7.0, an ACL that does not allow them, a
/// Redis-compatible server without them): this process calls the script from then on.
fn functions_refused(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM")
        || e.detail()
            .is_some_and(|d| d.to_ascii_lowercase().contains("unknown command"))
}

fn function_missing(e: &redis::RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.to_ascii_lowercase().contains("function not found"))
}

/// Whose clock the script uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// The Redis server's (`TIME`): in service.
    Server,
    /// The `now` each call is given: for tests with a manual clock.
    Caller,
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server: `redis://[user:password@]host:port[/db]` or `rediss://…`.
    Single(String),
    /// The seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub topology: Topology,
    /// Starts every key: `{prefix:workspace}`. Letters, digits, `-`, `_`, `.`.
    pub prefix: String,
    /// The longest any call may take.
    pub timeout: Duration,
    /// A reservation's lease; renewed every third of it while in flight.
    pub lease: Duration,
    pub time: TimeSource,
}

enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

#[derive(Clone)]
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

struct Inner {
    client: Client,
    conn: Mutex<Option<Conn>>,
    connecting: tokio::sync::Mutex<()>,
    script: redis::Script,
    /// The function library: name and code.
    library: (String, String),
    /// Whether calls go through the function library (else the script): until the server
    /// refuses functions.
    functions: std::sync::atomic::AtomicBool,
    prefix: String,
    timeout: Duration,
    lease: Duration,
    time: TimeSource,
    months: Arc<dyn MonthSource>,
    /// Reservations of this instance not yet settled, for lease renewal.
    live: Mutex<HashMap<ReservationId, Live, Fast>>,
    /// Wakes the lease renewal at once (`RedisLimiter::renew_now`).
    renew_wake: Arc<tokio::sync::Notify>,
    /// (workspace, generation) whose re-bases are scheduled.
    rebasing: Mutex<HashSet<(WorkspaceId, String)>>,
    /// Reservations whose settlement failed (it may or may not have landed), since when.
    in_doubt: Mutex<HashMap<ReservationId, std::time::Instant, Fast>>,
    /// The ids of the model names seen, at most `MODEL_IDS` of them.
    model_ids: Mutex<HashMap<Box<str>, Arc<str>, Fast>>,
}

/// A reservation of this instance not yet settled, as Redis holds it: enough to hold it again
/// where Redis no longer does (its lease ran out while Redis stalled, so Redis let it go as an
/// instance's that died; or Redis restarted empty) while the instance still runs its request.
#[derive(Debug, Clone)]
struct Live {
    workspace: WorkspaceId,
    tokens: u64,
    /// Its model's id, and whether the model has limits of its own.
    model: Option<(Arc<str>, bool)>,
    slot: bool,
    key: Option<KeyId>,
}

impl Live {
    /// `held`'s, its model's id `model` already made.
    fn new(workspace: WorkspaceId, held: &Held, model: Option<Arc<str>>, limits: &Limits) -> Live {
        let limited = |m: &str| {
            limits
                .models
                .get(m)
                .is_some_and(|l| l.tokens_per_minute.is_some() || l.tokens_per_month.is_some())
        };
        Live {
            workspace,
            tokens: held.tokens,
            model: model.zip(held.model.as_deref().map(limited)),
            slot: held.slot,
            key: held.key,
        }
    }

    /// Its six arguments for `newgen` and `renew`: id, tokens, model id, limited, slot, key.
    fn args(&self, id: ReservationId) -> [Arg; 6] {
        let (model, limited) = self
            .model
            .as_ref()
            .map_or((Arg::Static(""), false), |(m, l)| {
                (Arg::from(m.clone()), *l)
            });
        [
            id.into(),
            self.tokens.into(),
            model,
            Arg::Int(limited.into()),
            Arg::Int(self.slot.into()),
            self.key.map_or(Arg::Static(""), Arg::from),
        ]
    }
}

/// The most model ids `Inner::model_ids` keeps.
const MODEL_IDS: usize = 1024;

/// What an instance used on its own while Redis did not answer, taken into the shared state
/// when it answers again (`RedisLimiter::new_generation`), so that the instances together do not
/// use it again:
/// - its requests still running: each becomes a reservation of the new generation under its own
///   id, holding its tokens in the month (the workspace's, its model's, its key's) and its
///   concurrency slot, its lease renewed as this instance's own are. The ledger has none of
///   their tokens yet. Each is then settled, or its slot freed, through Redis like any other
///   reservation (`Limiter::settle` with the same `Reservation`), so its usage counts once, in
///   the new generation;
/// - how far below full its share's requests and tokens-per-minute buckets are (taken from the
///   shared buckets, which have refilled meanwhile); a model's own tokens-per-minute buckets,
///   and those of the key `limits` carry, alike.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Carry {
    pub running: Vec<Reservation>,
    /// Whole requests.
    pub requests: u64,
    pub tokens: u64,
    /// The key's own requests bucket (whole requests) and tokens bucket.
    pub key_requests: u64,
    pub key_tokens: u64,
    /// Each model's own tokens-per-minute bucket, by name.
    pub models: Vec<(String, u64)>,
}

/// Why a Redis can never serve the gateway as configured (`RedisLimiter::refused_at_start`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRefusal {
    /// It refuses the credentials in the URL; Redis's own words.
    Credentials(String),
    /// One server was given, and it is a node of a Redis Cluster.
    ClusterNode,
    /// A cluster was given, and the server has no cluster support.
    NotCluster,
}

/// The Redis limiter. Background work (lease renewal) stops when it is dropped.
pub struct RedisLimiter {
    inner: Arc<Inner>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for RedisLimiter {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

fn unavailable(e: impl std::fmt::Display) -> LimiterError {
    LimiterError::Unavailable(e.to_string())
}

/// A field-safe id of a model name: 16 hex digits of its SHA-256.
pub fn model_id(model: &str) -> String {
    crate::hex(&Sha256::digest(model.as_bytes())[..8])
}

/// A prefix that cannot break out of the hash tag or the key layout.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err("1 to 32 of a-z, A-Z, 0-9, '-', '_', '.'".into())
    }
}

/// The script's answer, read field by field.
struct Reply(Vec<Value>);

impl Reply {
    fn from(value: Value) -> Result<Reply, LimiterError> {
        match value {
            Value::Array(items) => Ok(Reply(items)),
            other => Err(unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    fn int(&self, i: usize) -> Result<i64, LimiterError> {
        match self.0.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            Some(Value::BulkString(b)) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| unavailable(format!("reply field {i} is not a number"))),
            other => Err(unavailable(format!("reply field {i}: {other:?}"))),
        }
    }

    fn u(&self, i: usize) -> Result<u64, LimiterError> {
        Ok(self.int(i)?.max(0) as u64)
    }

    fn string(&self, i: usize) -> Result<String, LimiterError> {
        match self.0.get(i) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Ok(s.clone()),
            Some(Value::Int(n)) => Ok(n.to_string()),
            other => Err(unavailable(format!("reply field {i}: {other:?}"))),
        }
    }
}

/// Converts the script's absolute microseconds into the caller's durations.
#[derive(Clone, Copy)]
struct Times {
    source: TimeSource,
    /// The caller's now.
    now: Nanos,
    /// The clock the script used, in microseconds.
    script_now: u64,
}

impl Times {
    fn until(&self, target_us: u64) -> Nanos {
        match self.source {
            TimeSource::Caller => until(target_us, self.now),
            TimeSource::Server => target_us.saturating_sub(self.script_now) * 1_000,
        }
    }

    fn until_ns(&self, target: Nanos) -> Nanos {
        match self.source {
            TimeSource::Caller => target.saturating_sub(self.now),
            TimeSource::Server => target.saturating_sub(self.script_now * 1_000),
        }
    }

    /// When the call happened, on the clock the limiter keeps.
    fn at(&self) -> Nanos {
        match self.source {
            TimeSource::Caller => self.now,
            TimeSource::Server => self.script_now * 1_000,
        }
    }
}

fn limit_name(code: i64) -> LimitName {
    match code {
        1 => LimitName::RequestsPerSecond,
        2 => LimitName::TokensPerMinute,
        3 => LimitName::TokensPerMonth,
        4 => LimitName::ConcurrentRequests,
        5 => LimitName::ModelTokensPerMinute,
        6 => LimitName::ModelTokensPerMonth,
        7 => LimitName::KeyRequestsPerSecond,
        8 => LimitName::KeyTokensPerMinute,
        _ => LimitName::KeyTokensPerMonth,
    }
}

fn limit_value(limits: &Limits, model: Option<&str>, name: LimitName) -> f64 {
    let model = model.and_then(|m| limits.models.get(m));
    let key = limits.key.map(|k| k.limits).unwrap_or_default();
    let tokens = match name {
        LimitName::RequestsPerSecond => return limits.requests_per_second.unwrap_or(0.0),
        LimitName::KeyRequestsPerSecond => return key.requests_per_second.unwrap_or(0.0),
        LimitName::KeyTokensPerMinute => key.tokens_per_minute,
        LimitName::KeyTokensPerMonth => key.tokens_per_month,
        LimitName::ConcurrentRequests => {
            return limits.concurrent_requests.unwrap_or(0) as f64;
        }
        LimitName::TokensPerMinute => limits.tokens_per_minute,
        LimitName::TokensPerMonth => limits.tokens_per_month,
        LimitName::ModelTokensPerMinute => model.and_then(|m| m.tokens_per_minute),
        LimitName::ModelTokensPerMonth => model.and_then(|m| m.tokens_per_month),
    };
    tokens.unwrap_or(0) as f64
}

/// A snapshot from the script's `[requests remaining, requests full at, tokens remaining,
/// tokens full at, month used]`.
fn read_snapshot(v: [u64; 5], limits: &Limits, t: Times, mk: MonthKey) -> Snapshot {
    Snapshot {
        requests: limits.requests_per_second.map(|rps| Window {
            limit: rps,
            remaining: v[0],
            reset: t.until(v[1]),
        }),
        tokens: limits.tokens_per_minute.map(|cap| Window {
            limit: cap as f64,
            remaining: v[2],
            reset: t.until(v[3]),
        }),
        month: limits.tokens_per_month.map(|cap| Window {
            limit: cap as f64,
            remaining: cap.saturating_sub(v[4]),
            reset: t.until_ns(mk.next().start()),
        }),
    }
}

/// The snapshot a decision answers with: the workspace's windows, each replaced by the key's
/// (`Limits::key`, from the script's five numbers at `key`) and by the model's (its own limits,
/// from the three numbers after the key's) where it has less remaining, as `core` does.
fn decision_snapshot(
    reply: &Reply,
    workspace: usize,
    key: usize,
    limits: &Limits,
    model_limits: Option<&ModelLimits>,
    t: Times,
    mk: MonthKey,
) -> Result<Snapshot, LimiterError> {
    let mut snapshot = read_snapshot(reply.five(workspace)?, limits, t, mk);
    let mut at = key;
    if let Some(k) = limits.key {
        let own = read_snapshot(reply.five(key)?, &k.limits.as_limits(), t, mk);
        snapshot = snapshot.tighter(own);
        at += 5;
    }
    let tpm = model_limits
        .and_then(|l| l.tokens_per_minute)
        .filter(|&c| c > 0);
    let month = model_limits
        .and_then(|l| l.tokens_per_month)
        .filter(|&c| c > 0);
    if tpm.is_some() || month.is_some() {
        let (left, full_at, used) = (reply.u(at)?, reply.u(at + 1)?, reply.u(at + 2)?);
        snapshot = snapshot.tighter(Snapshot {
            requests: None,
            tokens: tpm.map(|cap| Window {
                limit: cap as f64,
                remaining: left,
                reset: t.until(full_at),
            }),
            month: month.map(|cap| Window {
                limit: cap as f64,
                remaining: cap.saturating_sub(used),
                reset: t.until_ns(mk.next().start()),
            }),
        });
    }
    Ok(snapshot)
}

/// One argument of a call. Most are numbers: they are written into the command as digits, with
/// no `String` of their own (a reserve sends about twenty).
#[derive(Debug, Clone)]
enum Arg {
    Int(i64),
    Uint(u64),
    Static(&'static str),
    Owned(String),
    /// A model's id, shared with `Inner::model_ids`.
    Shared(Arc<str>),
    /// A reservation id, written as its 32 hex digits without a `String` of its own.
    Id(ReservationId),
}

impl From<i64> for Arg {
    fn from(n: i64) -> Self {
        Arg::Int(n)
    }
}

impl From<u64> for Arg {
    fn from(n: u64) -> Self {
        Arg::Uint(n)
    }
}

impl From<u32> for Arg {
    fn from(n: u32) -> Self {
        Arg::Uint(n.into())
    }
}

impl From<&'static str> for Arg {
    fn from(s: &'static str) -> Self {
        Arg::Static(s)
    }
}

impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Owned(s)
    }
}

impl From<Arc<str>> for Arg {
    fn from(s: Arc<str>) -> Self {
        Arg::Shared(s)
    }
}

impl From<ReservationId> for Arg {
    fn from(id: ReservationId) -> Self {
        Arg::Id(id)
    }
}

/// Milliseconds of a duration, as an argument.
fn millis(d: Duration) -> Arg {
    Arg::Uint(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl redis::ToRedisArgs for Arg {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Arg::Int(n) => out.write_arg(itoa::Buffer::new().format(*n).as_bytes()),
            Arg::Uint(n) => out.write_arg(itoa::Buffer::new().format(*n).as_bytes()),
            Arg::Static(s) => out.write_arg(s.as_bytes()),
            Arg::Owned(s) => out.write_arg(s.as_bytes()),
            Arg::Shared(s) => out.write_arg(s.as_bytes()),
            Arg::Id(id) => out.write_arg(&id.hex_digits()),
        }
    }
}

/// The key's arguments (see `redis.lua`): id, rate, burst capacity, tokens per minute, month
/// cap; an empty id and zeros without limits of its own.
fn key_args(limits: &Limits) -> [Arg; 5] {
    match limits.key {
        Some(k) => {
            let l = k.limits.as_limits();
            let (rate, capacity) = request_args(&l);
            [
                k.id.into(),
                rate.into(),
                capacity.into(),
                l.tokens_per_minute.unwrap_or(0).into(),
                l.tokens_per_month.unwrap_or(0).into(),
            ]
        }
        None => [
            "".into(),
            Arg::Int(0),
            Arg::Int(0),
            Arg::Int(0),
            Arg::Int(0),
        ],
    }
}

impl Reply {
    fn five(&self, i: usize) -> Result<[u64; 5], LimiterError> {
        Ok([
            self.u(i)?,
            self.u(i + 1)?,
            self.u(i + 2)?,
            self.u(i + 3)?,
            self.u(i + 4)?,
        ])
    }
}

/// The request bucket's (rate, capacity) arguments; zeros without a requests/s limit.
fn request_args(limits: &Limits) -> (i64, i64) {
    match limits.requests_per_second {
        Some(rps) => (
            super::core::request_rate(rps),
            limits.effective_burst() as i64 * NANO_REQUESTS,
        ),
        None => (0, 0),
    }
}

impl Inner {
    /// The hash tag of a workspace's keys, `{prefix:workspace}`, its first key. Written without
    /// `fmt`: two calls per request build it.
    fn tag(&self, workspace: WorkspaceId) -> String {
        let mut tag = String::with_capacity(self.prefix.len() + 24);
        tag.push('{');
        tag.push_str(&self.prefix);
        tag.push(':');
        tag.push_str(itoa::Buffer::new().format(workspace));
        tag.push('}');
        tag
    }

    fn keys(&self, workspace: WorkspaceId) -> [String; 3] {
        let tag = self.tag(workspace);
        let with = |suffix: &str| {
            let mut key = String::with_capacity(tag.len() + 2);
            key.push_str(&tag);
            key.push_str(suffix);
            key
        };
        let (records, expiries) = (with(":r"), with(":e"));
        [tag, records, expiries]
    }

    /// `model_id(model)`, from `model_ids` when it is there: a SHA-256 per call cost more than
    /// building all the other arguments.
    fn model_id(&self, model: &str) -> Arc<str> {
        let mut ids = self.model_ids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = ids.get(model) {
            return id.clone();
        }
        // Any client may name any model: the map is bounded, and emptied when full.
        if ids.len() >= MODEL_IDS {
            ids.clear();
        }
        let id: Arc<str> = model_id(model).into();
        ids.insert(model.into(), id.clone());
        id
    }

    /// The arguments every op starts with: op, now, the key's idle life, the records' life,
    /// the tombstones' life (see the top of `redis.lua`).
    /// How a reservation of `workspace` holding `held` under `limits` stands in Redis.
    fn live_of(&self, workspace: WorkspaceId, held: &Held, limits: &Limits) -> Live {
        let model = held.model.as_deref().map(|m| self.model_id(m));
        Live::new(workspace, held, model, limits)
    }

    /// Renews the leases of `live`, reservations of `workspace`, and holds again those Redis no
    /// longer holds (`renew` in `redis.lua`).
    async fn renew(&self, workspace: WorkspaceId, live: &[(ReservationId, Live)]) {
        for chunk in live.chunks(500) {
            let mut args = self.args("renew", 0);
            args.push(millis(self.lease));
            args.push(ReservationId::next().into());
            for (id, l) in chunk {
                args.extend(l.args(*id));
            }
            if let Err(e) = self.eval(&self.keys(workspace), &args).await {
                tracing::debug!(error = %e, workspace, "lease renewal failed");
            }
        }
    }

    /// This instance's reservations of `workspace` not yet settled.
    fn live_of_workspace(&self, workspace: WorkspaceId) -> Vec<(ReservationId, Live)> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, l)| l.workspace == workspace)
            .map(|(id, l)| (*id, l.clone()))
            .collect()
    }

    fn args(&self, op: &'static str, now: Nanos) -> Vec<Arg> {
        let records = self.lease.max(TOMBSTONE) + Duration::from_secs(1);
        let mut args = Vec::with_capacity(32);
        args.extend([
            op.into(),
            self.now_arg(now),
            millis(IDLE_TTL),
            millis(records),
            millis(TOMBSTONE),
        ]);
        args
    }

    fn now_arg(&self, now: Nanos) -> Arg {
        match self.time {
            TimeSource::Caller => micros(now).into(),
            TimeSource::Server => Arg::Int(0),
        }
    }

    /// The connection, made first if there is none (within `connect_timeout`).
    async fn connection(&self, connect_timeout: Duration) -> Result<Conn, LimiterError> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        let connect = async {
            match &self.client {
                Client::Single(client) => {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(connect_timeout))
                        .set_response_timeout(None);
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map(Conn::Single)
                }
                Client::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            }
        };
        let conn = tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| unavailable("connecting to Redis timed out"))?
            .map_err(unavailable)?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn forget_connection(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs one op of the script: connecting (when needed) and the call together take at most
    /// the timeout, so no request waits longer than that for Redis.
    async fn eval(&self, keys: &[String], args: &[Arg]) -> Result<Reply, LimiterError> {
        self.eval_within(self.timeout, keys, args).await
    }

    async fn eval_within(
        &self,
        limit: Duration,
        keys: &[String],
        args: &[Arg],
    ) -> Result<Reply, LimiterError> {
        let call = async {
            let mut conn = self.connection(limit).await?;
            if self.functions.load(std::sync::atomic::Ordering::Relaxed) {
                match self.fcall(&mut conn, keys, args).await {
                    Ok(value) => return Ok(value),
                    Err(e) => match self.function_failed(&mut conn, e).await {
                        Next::Fail(e) => return Err(self.failed(e)),
                        Next::Again => {
                            if let Ok(value) = self.fcall(&mut conn, keys, args).await {
                                return Ok(value);
                            }
                        }
                        Next::Script => {}
                    },
                }
            }
            // The script: when the server offers no functions, or the library could not be
            // called this time (it runs the same code, so it decides the same).
            let mut invocation = self.script.prepare_invoke();
            for k in keys {
                invocation.key(k);
            }
            for a in args {
                invocation.arg(a);
            }
            let result = match &mut conn {
                Conn::Single(c) => invocation.invoke_async::<Value>(c).await,
                Conn::Cluster(c) => invocation.invoke_async::<Value>(c).await,
            };
            result.map_err(|e| self.failed(e))
        };
        match tokio::time::timeout(limit, call).await {
            Err(_) => Err(unavailable(format!(
                "Redis did not answer within {} ms",
                limit.as_millis()
            ))),
            Ok(result) => Reply::from(result?),
        }
    }

    /// One call of the function library.
    async fn fcall(
        &self,
        conn: &mut Conn,
        keys: &[String],
        args: &[Arg],
    ) -> Result<Value, redis::RedisError> {
        // Sized at once (about 30 arguments): grown as they were written, its two vectors were
        // copied several times per call.
        let bytes = 64 + keys.iter().map(String::len).sum::<usize>() + 20 * args.len();
        let mut cmd = redis::Cmd::with_capacity(3 + keys.len() + args.len(), bytes);
        cmd.arg("FCALL")
            .arg(&self.library.0)
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        match conn {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// What follows a failed call of the library: it failed for good (the connection, the code
    /// itself); the library was missing and is loaded now (call it once more, then the script);
    /// or the call is made through the script (the server refused functions; or it is out of
    /// memory, where a function with writes is refused outright but a script fails only at its
    /// first write, as before functions were used, so that denials are still answered).
    async fn function_failed(&self, conn: &mut Conn, e: redis::RedisError) -> Next {
        if !server_error(&e) {
            return Next::Fail(e);
        }
        if functions_refused(&e) {
            self.refuse_functions(&e);
            return Next::Script;
        }
        if e.code() == Some("OOM") {
            return Next::Script;
        }
        if !function_missing(&e) {
            return Next::Fail(e);
        }
        // A server without the library (a new or flushed one): load it (on every master of a
        // cluster) and call it again.
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(&self.library.1);
        let loaded: Result<Value, _> = match conn {
            Conn::Single(c) => load.query_async(c).await,
            Conn::Cluster(c) => load.query_async(c).await,
        };
        match loaded {
            Ok(_) => Next::Again,
            Err(e) => {
                // Refused (or a server that cannot load it): scripts from now on. Otherwise (a
                // node down): the script this time, the library next time.
                if server_error(&e) {
                    self.refuse_functions(&e);
                }
                Next::Script
            }
        }
    }

    fn refuse_functions(&self, e: &redis::RedisError) {
        if self
            .functions
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                error = %e,
                "Redis functions are not available; calling the limiter as a script (slower)"
            );
        }
    }

    /// A failed call's error; a broken connection is made again next time.
    fn failed(&self, e: redis::RedisError) -> LimiterError {
        // A cluster's client mends its connections to each node itself; made anew, it would
        // connect to every master, and one that hangs would hold up every call meanwhile (the
        // workspaces of the masters that answer included). A single server's connection broken
        // by an I/O error is made anew.
        let single = matches!(self.client, Client::Single(_));
        if e.is_unrecoverable_error() || (single && (e.is_io_error() || e.is_connection_dropped()))
        {
            self.forget_connection();
        }
        unavailable(e)
    }

    /// Bases a new counter generation on the ledger, and schedules its re-bases.
    async fn base(
        self: &Arc<Self>,
        workspace: WorkspaceId,
        gen: &str,
        month: MonthKey,
        limits: &Limits,
        now: Nanos,
    ) -> Result<(), LimiterError> {
        // What this process settled just before the switch may not be in the ledger yet: a
        // settlement that timed out while Redis stalled (and that Redis ran when it woke), kept
        // by the ledger writer to settle again; or one written at the writer's next flush.
        // Without this, the new generation lacked it until the first re-base, a second later.
        self.months.catch_up().await;
        self.base_once(workspace, gen, month, limits, now).await?;
        // A new generation: Redis restarted or was flushed, or the month began, or an instance
        // rebuilt the counter at its switch back. This instance's requests still running are
        // held in it before the decision that asked for it is made.
        if self.time == TimeSource::Server {
            let live = self.live_of_workspace(workspace);
            if !live.is_empty() {
                self.renew(workspace, &live).await;
            }
        }
        let first = self
            .rebasing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((workspace, gen.to_string()));
        if first {
            let weak = Arc::downgrade(self);
            let gen = gen.to_string();
            let limits = Arc::new(limits.clone());
            tokio::spawn(rebase_later(weak, workspace, gen, month, limits, now));
        }
        Ok(())
    }

    async fn base_once(
        &self,
        workspace: WorkspaceId,
        gen: &str,
        month: MonthKey,
        limits: &Limits,
        now: Nanos,
    ) -> Result<(), LimiterError> {
        let totals = self
            .months
            .month_totals(workspace, month, Some(gen))
            .await
            .map_err(|e| LimiterError::Ledger(e.to_string()))?;
        let mut args = self.args("base", now);
        args.extend([
            gen.to_string().into(),
            rebase_window_ms(self.lease).into(),
            totals.tokens.into(),
        ]);
        // The key with limits of its own the call is for, if any.
        match limits.key {
            Some(k) => args.extend([
                Arg::Int(1),
                k.id.into(),
                totals.by_key.get(&k.id).copied().unwrap_or(0).into(),
            ]),
            None => args.push(Arg::Int(0)),
        }
        // Models with limits of their own first (always counted apart), then the most used, so
        // that the bound on models tracked keeps what matters.
        let mut models: Vec<(&String, &u64)> = totals.by_model.iter().collect();
        models.sort_by_key(|(m, t)| (!limits.models.contains_key(*m), std::cmp::Reverse(**t)));
        for (model, tokens) in models {
            args.push(self.model_id(model).into());
            args.push((*tokens).into());
            let limited = limits.models.contains_key(model);
            args.push(Arg::Int(limited.into()));
        }
        self.eval(&self.keys(workspace), &args).await?;
        Ok(())
    }

    async fn cancel(
        &self,
        workspace: WorkspaceId,
        id: ReservationId,
        limits: &Limits,
        model: Option<&str>,
        now: Nanos,
    ) {
        let key = limits.key.map(|k| k.id);
        let args = settle_args(self, "cancel", id, limits, model, key, 0, now);
        let keys = self.keys(workspace);
        // Sent again until Redis takes it, for as long as the lease would hold the reservation:
        // a call that timed out against a stalled node runs when the node wakes, and then held
        // its concurrency slot and tokens for the whole lease (an outside audit saw every
        // request of a workspace refused for 30 s after a 6 s stall). A cancel that arrives
        // first marks the id, so that the late reservation takes nothing.
        let give_up = tokio::time::Instant::now() + self.lease;
        let mut wait = CANCEL_RETRY_FIRST;
        loop {
            match self.eval(&keys, &args).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() + wait >= give_up => {
                    tracing::warn!(error = %e, "cancelling an abandoned reservation failed until its lease ends; the lease frees it");
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(CANCEL_RETRY_MOST);
                }
            }
        }
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

#[allow(clippy::too_many_arguments)]
fn settle_args(
    inner: &Inner,
    op: &'static str,
    id: ReservationId,
    limits: &Limits,
    model: Option<&str>,
    key: Option<KeyId>,
    actual: u64,
    now: Nanos,
) -> Vec<Arg> {
    let model_tpm = model
        .and_then(|m| limits.models.get(m))
        .and_then(|l| l.tokens_per_minute);
    let mut args = inner.args(op, now);
    args.extend([
        id.into(),
        ReservationId::next().into(),
        actual.min(MAX_REQUEST_TOKENS).into(),
        limits.tokens_per_minute.unwrap_or(0).into(),
        model.map_or(Arg::Static(""), |m| inner.model_id(m).into()),
        model_tpm.unwrap_or(0).into(),
    ]);
    // The key's bucket is refunded at its limit now (none when its limits were removed since).
    let key_tpm = limits
        .key
        .filter(|k| Some(k.id) == key)
        .and_then(|k| k.limits.tokens_per_minute);
    args.extend([
        key.map_or(Arg::Static(""), Arg::from),
        key_tpm.unwrap_or(0).into(),
    ]);
    args
}

/// Raises a generation's base over the next seconds, for ledger writes that lagged.
async fn rebase_later(
    inner: Weak<Inner>,
    workspace: WorkspaceId,
    gen: String,
    month: MonthKey,
    limits: Arc<Limits>,
    now: Nanos,
) {
    let mut waited = Duration::ZERO;
    let Some(lease) = inner.upgrade().map(|i| i.lease) else {
        return;
    };
    for after in rebase_after(lease) {
        tokio::time::sleep(after - waited).await;
        waited = after;
        let Some(inner) = inner.upgrade() else { return };
        // With the caller's clock, the generation's time does not move on its own.
        let at = now + waited.as_nanos() as u64 * (inner.time == TimeSource::Server) as u64;
        if let Err(e) = inner.base_once(workspace, &gen, month, &limits, at).await {
            tracing::debug!(error = %e, workspace, "re-basing a month counter failed");
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner
            .rebasing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(workspace, gen));
    }
}

/// Renews the leases of this instance's reservations every third of the lease, and at once when
/// woken (`RedisLimiter::renew_now`); holds again those Redis no longer holds.
async fn renew_leases(inner: Weak<Inner>, every: Duration, wake: Arc<tokio::sync::Notify>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.time == TimeSource::Caller {
            // Tests drive time by hand; renewing on the server's clock would mix two clocks.
            continue;
        }
        let mut by_workspace: HashMap<WorkspaceId, Vec<(ReservationId, Live)>> = HashMap::new();
        for (id, l) in inner.live.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            by_workspace
                .entry(l.workspace)
                .or_default()
                .push((*id, l.clone()));
        }
        for (ws, live) in by_workspace {
            inner.renew(ws, &live).await;
        }
    }
}

/// What a heartbeat answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Instances alive (their heartbeats not yet expired), this one included.
    pub instances: u32,
    /// This instance's rank among them (by id, from 0).
    pub rank: u32,
    /// This instance was not among them: its first heartbeat, or Redis lost it (restarted
    /// empty, flushed, or a stall longer than the heartbeat's life).
    pub missing: bool,
}

/// A Redis Cluster's hash slot of a key's hash tag (the text between its braces).
pub fn hash_slot(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
}

/// The first wait before a failed cancel is sent again, doubled each time up to the second.
const CANCEL_RETRY_FIRST: Duration = Duration::from_millis(100);
const CANCEL_RETRY_MOST: Duration = Duration::from_secs(1);

/// Cancels a reservation whose caller went away mid-call, unless disarmed.
struct CancelGuard<'a> {
    inner: &'a Arc<Inner>,
    workspace: WorkspaceId,
    id: ReservationId,
    /// Borrowed: copied only when the guard fires (nearly never).
    limits: &'a Limits,
    model: Option<&'a str>,
    now: Nanos,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let (workspace, id, now) = (self.workspace, self.id, self.now);
        let limits = self.limits.clone();
        let model = self.model.map(str::to_string);
        handle.spawn(async move {
            inner
                .cancel(workspace, id, &limits, model.as_deref(), now)
                .await;
        });
    }
}

impl RedisLimiter {
    /// Connects lazily: building never waits for Redis, so a gateway starts while it is down.
    pub fn new(options: RedisOptions, months: Arc<dyn MonthSource>) -> Result<Self, LimiterError> {
        validate_prefix(&options.prefix).map_err(unavailable)?;
        let client = match &options.topology {
            Topology::Single(url) => Client::Single(Box::new(
                redis::Client::open(url.as_str()).map_err(unavailable)?,
            )),
            Topology::Cluster(seeds) => Client::Cluster(Box::new(
                redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                    .connection_timeout(options.timeout.max(Duration::from_millis(250)))
                    .response_timeout(options.timeout)
                    .retries(2)
                    .build()
                    .map_err(unavailable)?,
            )),
        };
        let inner = Arc::new(Inner {
            client,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            script: redis::Script::new(&script_code()),
            library: library(),
            functions: std::sync::atomic::AtomicBool::new(true),
            prefix: options.prefix,
            timeout: options.timeout,
            lease: options.lease,
            time: options.time,
            months,
            live: Mutex::new(HashMap::default()),
            renew_wake: Arc::new(tokio::sync::Notify::new()),
            rebasing: Mutex::new(HashSet::new()),
            in_doubt: Mutex::new(HashMap::default()),
            model_ids: Mutex::new(HashMap::default()),
        });
        let renewal = tokio::spawn(renew_leases(
            Arc::downgrade(&inner),
            options.lease / 3,
            inner.renew_wake.clone(),
        ));
        Ok(RedisLimiter { inner, renewal })
    }

    /// At start: why this Redis can never serve the gateway as configured, which no wait mends:
    /// it refuses the credentials (a wrong password or user name, a password it does not ask for,
    /// a password missing), or it is not what `redis_cluster` says (a cluster node given as one
    /// server answers every key of another node's slots with `MOVED`; a server without cluster
    /// support refuses a cluster client): the gateway started, sent every request to the
    /// failure policy and called Redis unreachable, while `/readyz` said ready (an outside
    /// audit). `None` when it serves, or cannot be reached now: the gateway then starts, and the
    /// failure policy applies until Redis answers.
    pub async fn refused_at_start(&self) -> Option<StartRefusal> {
        let limit = self.inner.timeout.max(Duration::from_secs(1));
        let check = async {
            match &self.inner.client {
                Client::Single(client) => {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(limit))
                        .set_response_timeout(Some(limit));
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    let info: String = redis::cmd("INFO")
                        .arg("cluster")
                        .query_async(&mut conn)
                        .await?;
                    Ok(info
                        .lines()
                        .any(|l| l.trim() == "cluster_enabled:1")
                        .then_some(StartRefusal::ClusterNode))
                }
                Client::Cluster(client) => {
                    let mut conn = client.get_async_connection().await?;
                    redis::cmd("PING")
                        .query_async::<Value>(&mut conn)
                        .await
                        .map(|_| None)
                }
            }
        };
        let e: redis::RedisError = match tokio::time::timeout(limit, check).await {
            Ok(Ok(refusal)) => return refusal,
            Ok(Err(e)) => e,
            Err(_) => return None,
        };
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        {
            return Some(StartRefusal::Credentials(e.to_string()));
        }
        e.to_string()
            .contains("cluster support disabled")
            .then_some(StartRefusal::NotCluster)
    }

    /// Whether the limits live in a Redis Cluster (else one server).
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.client, Client::Cluster(_))
    }

    /// The hash slot of `workspace`'s keys (their tag `{prefix:workspace}`), as a Redis Cluster
    /// computes it: CRC16 (XMODEM) of the tag, modulo 16384. `None`: the slot of the instances'
    /// own keys (`{prefix}:instances`, `{prefix}:probe`).
    pub fn slot_of(&self, workspace: Option<WorkspaceId>) -> u16 {
        let tag = match workspace {
            Some(w) => self.inner.tag(w),
            None => format!("{{{}}}", self.inner.prefix),
        };
        hash_slot(&tag[1..tag.len() - 1])
    }

    /// Checks that Redis answers: for `workspace`, the node that holds its keys (in a cluster,
    /// the one whose failure is being waited out; another master answering says nothing of it).
    pub async fn ping(&self, workspace: Option<WorkspaceId>) -> Result<(), LimiterError> {
        let mut args = self.inner.args("heartbeat", 0);
        args.extend(["probe".into(), Arg::Int(1)]);
        let key = match workspace {
            Some(w) => format!("{}:probe", self.inner.tag(w)),
            None => format!("{{{}}}:probe", self.inner.prefix),
        };
        // It may take longer than a request's call: it runs in the background, and reconnects.
        let limit = self.inner.timeout.max(Duration::from_secs(1));
        self.inner
            .eval_within(limit, &[key], &args)
            .await
            .map(|_| ())
    }

    /// Announces this instance (for `ttl`) and answers how it stands (`Heartbeat`).
    pub async fn heartbeat(
        &self,
        instance: &str,
        ttl: Duration,
    ) -> Result<Heartbeat, LimiterError> {
        let mut args = self.inner.args("heartbeat", 0);
        args.extend([instance.to_string().into(), millis(ttl)]);
        let key = format!("{{{}}}:instances", self.inner.prefix);
        let reply = self.inner.eval(&[key], &args).await?;
        Ok(Heartbeat {
            instances: reply.u(1)? as u32,
            rank: reply.u(2)? as u32,
            missing: reply.u(3)? == 1,
        })
    }

    /// Takes `instance` out of the live instances at once (a stop): the others' next
    /// heartbeats count it no more.
    pub async fn leave(&self, instance: &str) -> Result<(), LimiterError> {
        let mut args = self.inner.args("leave", 0);
        args.push(instance.to_string().into());
        let key = format!("{{{}}}:instances", self.inner.prefix);
        self.inner.eval(&[key], &args).await.map(|_| ())
    }

    /// Starts a new generation of a workspace's month counter: it will be rebuilt from the
    /// ledger when next needed. `carry`: what this instance used on its own (Redis down) that
    /// the shared state is to take in (see `Carry`); `limits`: the workspace's, for its buckets.
    /// `generation`: the new generation's id (`generation_id`). A call sent again under the
    /// same id, after one that failed (and may have been run all the same), is taken in once,
    /// for as long as a tombstone lives after the first that ran (`TOMBSTONE`).
    pub async fn new_generation(
        &self,
        workspace: WorkspaceId,
        now: Nanos,
        generation: &str,
        carry: Carry,
        limits: &Limits,
    ) -> Result<(), LimiterError> {
        let (rate, capacity) = request_args(limits);
        let mut args = self.inner.args("newgen", now);
        args.extend([
            generation.to_string().into(),
            millis(self.inner.lease),
            rate.into(),
            capacity.into(),
            (carry.requests.min(1 << 20) as i64 * NANO_REQUESTS).into(),
            limits.tokens_per_minute.unwrap_or(0).into(),
            carry.tokens.into(),
            (carry.running.len() as u64).into(),
        ]);
        let running: Vec<(ReservationId, Live)> = carry
            .running
            .iter()
            .map(|r| (r.id, self.inner.live_of(workspace, &r.held, limits)))
            .collect();
        for (id, live) in &running {
            args.extend(live.args(*id));
        }
        if let Some(k) = limits.key {
            let l = k.limits.as_limits();
            let (rate, capacity) = request_args(&l);
            if carry.key_requests > 0 && rate > 0 {
                args.extend([
                    "kr".into(),
                    k.id.into(),
                    rate.into(),
                    capacity.into(),
                    (carry.key_requests.min(1 << 20) as i64 * NANO_REQUESTS).into(),
                ]);
            }
            if let (Some(tpm), true) = (l.tokens_per_minute, carry.key_tokens > 0) {
                args.extend([
                    "kt".into(),
                    k.id.into(),
                    tpm.into(),
                    Arg::Int(0),
                    carry.key_tokens.into(),
                ]);
            }
        }
        for (model, take) in &carry.models {
            let Some(tpm) = limits.models.get(model).and_then(|l| l.tokens_per_minute) else {
                continue;
            };
            if *take > 0 {
                args.extend([
                    "mt".into(),
                    self.inner.model_id(model).into(),
                    tpm.into(),
                    Arg::Int(0),
                    (*take).into(),
                ]);
            }
        }
        self.inner.eval(&self.inner.keys(workspace), &args).await?;
        // Renewed as this instance's own reservations are, while it lives.
        self.inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(running);
        Ok(())
    }

    /// A new generation's id, for `new_generation`.
    pub fn generation_id() -> String {
        ReservationId::next().to_string()
    }

    /// Cancels, in the background, what a `new_generation` call that failed may still have made
    /// of `running` (its `Carry::running`): the call may have reached Redis and been run all the
    /// same (it timed out on its way, or while Redis stalled), and each request is then held
    /// there as a live record with its concurrency slot, which nothing renews, settles or frees
    /// until its lease ends, and which no decision counted against the limit (an outside audit:
    /// 25 such records held a workspace with one concurrent request for 30 s while Redis
    /// flapped). Each is cancelled as a dropped `reserve` is (sent again until Redis takes it, at
    /// most a lease): a live record is freed, settled to nothing (its usage is the share's); and
    /// a cancellation that arrives first leaves a tombstone, which `newgen` does not hold again.
    pub fn abandon_carried(
        &self,
        workspace: WorkspaceId,
        running: &[Reservation],
        limits: &Limits,
        now: Nanos,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for r in running {
            let inner = self.inner.clone();
            let (id, limits) = (r.id, limits.clone());
            let model = r.held.model.as_deref().map(str::to_string);
            handle.spawn(async move {
                inner
                    .cancel(workspace, id, &limits, model.as_deref(), now)
                    .await;
            });
        }
    }

    /// This instance's reservations for `workspace` not yet settled.
    pub fn live_for(&self, workspace: WorkspaceId) -> Vec<ReservationId> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, l)| l.workspace == workspace)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Renews the leases of this instance's reservations now, and holds again those Redis no
    /// longer holds: called when Redis answers again after a failure, which may have outlasted
    /// their leases (Redis then let them go) or restarted Redis empty.
    pub fn renew_now(&self) {
        self.inner.renew_wake.notify_one();
    }

    /// Reservations of this instance not yet settled.
    pub fn live_reservations(&self) -> usize {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn times(&self, now: Nanos, script_now: u64) -> Times {
        Times {
            source: self.inner.time,
            now,
            script_now,
        }
    }
}

/// The calls of `Limiter`, whose futures the trait boxes: this backend waits on the network.
impl RedisLimiter {
    async fn reserve_async(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Result<Decision, LimiterError> {
        let inner = &self.inner;
        let keys = inner.keys(workspace);
        let model_limits = model.and_then(|m| limits.models.get(m));
        let model_id = model.map(|m| inner.model_id(m));
        let (rate, capacity) = request_args(limits);
        for _ in 0..3 {
            let id = ReservationId::next();
            let mut args = inner.args("reserve", now);
            args.extend([
                id.into(),
                millis(inner.lease),
                ReservationId::next().into(),
                rate.into(),
                capacity.into(),
                limits.tokens_per_minute.unwrap_or(0).into(),
                limits.tokens_per_month.unwrap_or(0).into(),
                limits.concurrent_requests.unwrap_or(0).into(),
                model_id.clone().map_or(Arg::Static(""), Arg::from),
                model_limits
                    .and_then(|l| l.tokens_per_minute)
                    .unwrap_or(0)
                    .into(),
                model_limits
                    .and_then(|l| l.tokens_per_month)
                    .unwrap_or(0)
                    .into(),
                cost.prompt.min(MAX_REQUEST_TOKENS).into(),
                cost.estimate.min(MAX_REQUEST_TOKENS).into(),
                Arg::Int(0),
            ]);
            args.extend(key_args(limits));
            let mut guard = CancelGuard {
                inner,
                workspace,
                id,
                limits,
                model,
                now,
                armed: true,
            };
            let result = inner.eval(&keys, &args).await;
            let reply = match result {
                Ok(reply) => reply,
                // The call may or may not have reached the server: the guard cancels the id.
                Err(e) => return Err(e),
            };
            let status = reply.int(0)?;
            let t = self.times(now, reply.u(1)?);
            match status {
                1 => {
                    guard.armed = false;
                    let mk = MonthKey(reply.int(9)? as i32);
                    let held = Held {
                        model: model.map(Into::into),
                        tokens: reply.u(2)?,
                        month: mk,
                        slot: limits.concurrent_requests.is_some(),
                        key: limits.key.map(|k| k.id),
                    };
                    let live = Live::new(workspace, &held, model_id.clone(), limits);
                    inner
                        .live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, live);
                    let snapshot = decision_snapshot(&reply, 4, 10, limits, model_limits, t, mk)?;
                    let mut reservation = Reservation::new(workspace, held);
                    reservation.id = id;
                    reservation.settle_before_answer = reservation.held.slot;
                    return Ok(Decision::Admit {
                        reservation,
                        snapshot,
                    });
                }
                0 => {
                    guard.armed = false;
                    let mk = MonthKey(reply.int(10)? as i32);
                    let kind = match reply.int(2)? {
                        0 => DenialKind::RateLimited,
                        1 => DenialKind::QuotaExceeded,
                        _ => DenialKind::RequestTooLarge,
                    };
                    let limit = limit_name(reply.int(3)?);
                    let retry_after = match kind {
                        DenialKind::RateLimited => t.until(reply.u(4)?),
                        DenialKind::QuotaExceeded => t.until_ns(mk.next().start()),
                        DenialKind::RequestTooLarge | DenialKind::ShareUsedUp => 0,
                    };
                    let denial = Denial {
                        kind,
                        limit,
                        model: matches!(
                            limit,
                            LimitName::ModelTokensPerMinute | LimitName::ModelTokensPerMonth
                        )
                        .then(|| model.unwrap_or_default().to_string()),
                        limit_value: limit_value(limits, model, limit),
                        retry_after,
                    };
                    let snapshot = decision_snapshot(&reply, 5, 11, limits, model_limits, t, mk)?;
                    return Ok(Decision::Deny { denial, snapshot });
                }
                2 => {
                    // Nothing was reserved: base the new generation on the ledger and retry.
                    guard.armed = false;
                    let gen = reply.string(2)?;
                    let mk = MonthKey(reply.int(3)? as i32);
                    inner.base(workspace, &gen, mk, limits, now).await?;
                }
                _ => {
                    // The id is already known (a cancelled one): draw another.
                    guard.armed = false;
                }
            }
        }
        Err(unavailable(
            "the month counter kept changing while it was being rebuilt",
        ))
    }

    async fn settle_async(
        &self,
        reservation: &Reservation,
        limits: &Limits,
        actual: u64,
        now: Nanos,
    ) -> Result<Settled, LimiterError> {
        let inner = &self.inner;
        let args = settle_args(
            inner,
            "settle",
            reservation.id,
            limits,
            reservation.held.model.as_deref(),
            reservation.held.key,
            actual,
            now,
        );
        // Renewal stops first, whatever the call answers: a settlement that never reaches Redis
        // (or whose caller goes away) leaves the record to its lease, as if this instance were
        // gone, rather than renewed for as long as the instance lives. A retry still counts once.
        inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&reservation.id);
        let doubt = inner
            .in_doubt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&reservation.id)
            .copied();
        if doubt.is_some_and(|since| since.elapsed() >= TOMBSTONE / 2) {
            // An earlier attempt may have counted it, and its tombstone may be gone: count it
            // in a new generation of the month counter, rebuilt from the ledger without it.
            let generation = Self::generation_id();
            self.new_generation(
                reservation.workspace,
                now,
                &generation,
                Carry::default(),
                limits,
            )
            .await?;
        }
        let reply = match inner.eval(&inner.keys(reservation.workspace), &args).await {
            Ok(reply) => reply,
            Err(e) => {
                inner
                    .in_doubt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(reservation.id)
                    .or_insert_with(std::time::Instant::now);
                return Err(e);
            }
        };
        if doubt.is_some() {
            inner
                .in_doubt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&reservation.id);
        }
        let t = self.times(now, reply.u(1)?);
        let gen = reply.string(2)?;
        Ok(Settled {
            at: t.at(),
            counter: (!gen.is_empty()).then_some(gen),
        })
    }

    async fn release_slot_async(&self, reservation: &mut Reservation) -> Result<(), LimiterError> {
        if !reservation.held.slot {
            return Ok(());
        }
        let inner = &self.inner;
        let mut args = inner.args("release", 0);
        args.push(reservation.id.to_string().into());
        inner
            .eval(&inner.keys(reservation.workspace), &args)
            .await?;
        reservation.held.slot = false;
        if let Some(live) = inner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&reservation.id)
        {
            live.slot = false;
        }
        Ok(())
    }

    async fn usage_async(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Result<Usage, LimiterError> {
        let inner = &self.inner;
        let (rate, capacity) = request_args(limits);
        for _ in 0..3 {
            let mut args = inner.args("usage", now);
            args.extend([
                ReservationId::next().hex().into(),
                rate.into(),
                capacity.into(),
                limits.tokens_per_minute.unwrap_or(0).into(),
                Arg::Int(1),
            ]);
            args.extend(key_args(limits));
            for (model, l) in &limits.models {
                args.push(inner.model_id(model).into());
                args.push(l.tokens_per_minute.unwrap_or(0).into());
            }
            let reply = inner.eval(&inner.keys(workspace), &args).await?;
            let t = self.times(now, reply.u(1)?);
            if reply.int(0)? == 2 {
                let gen = reply.string(2)?;
                inner
                    .base(workspace, &gen, MonthKey(reply.int(3)? as i32), limits, now)
                    .await?;
                continue;
            }
            // {1, now, rr, rf, tr, tf, balance, settled, reserved, inflight, mk, gen}
            let mk = MonthKey(reply.int(10)? as i32);
            let settled = reply.u(7)?;
            let reserved = reply.u(8)?;
            let v = [
                reply.u(2)?,
                reply.u(3)?,
                reply.u(4)?,
                reply.u(5)?,
                settled + reserved,
            ];
            let snapshot = read_snapshot(v, limits, t, mk);
            // {…, gen, the key's five numbers, then per model: tokens left, whole again at, used
            // this month}
            let key = match limits.key {
                Some(k) => Some(read_snapshot(reply.five(12)?, &k.limits.as_limits(), t, mk)),
                None => None,
            };
            let mut models = Vec::with_capacity(limits.models.len());
            for (i, (model, l)) in limits.models.iter().enumerate() {
                let at = 17 + 3 * i;
                let (left, full_at, used) = (reply.u(at)?, reply.u(at + 1)?, reply.u(at + 2)?);
                models.push(ModelUsage {
                    model: model.clone(),
                    month_used: used,
                    tokens: l.tokens_per_minute.map(|cap| Window {
                        limit: cap as f64,
                        remaining: left,
                        reset: t.until(full_at),
                    }),
                    month: l.tokens_per_month.map(|cap| Window {
                        limit: cap as f64,
                        remaining: cap.saturating_sub(used),
                        reset: t.until_ns(mk.next().start()),
                    }),
                });
            }
            return Ok(Usage {
                snapshot,
                bucket_tokens: limits.tokens_per_minute.map(|_| reply.int(6).unwrap_or(0)),
                month_settled_tokens: settled,
                month_reserved_tokens: reserved,
                in_flight: reply.u(9)? as u32,
                models,
                key,
            });
        }
        Err(unavailable(
            "the month counter kept changing while it was being rebuilt",
        ))
    }
}

impl Limiter for RedisLimiter {
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
    use super::{hash_slot, rebase_after, rebase_window_ms};
    use std::time::Duration;

    #[test]
    fn a_generation_is_rebased_until_past_a_lease_and_the_script_takes_it() {
        let secs = |v: &[u64]| {
            v.iter()
                .map(|s| Duration::from_secs(*s))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rebase_after(Duration::from_secs(30)),
            secs(&[1, 3, 10, 15, 20, 25, 30, 35, 40])
        );
        assert_eq!(rebase_after(Duration::from_millis(300)), secs(&[1, 3, 10]));
        assert_eq!(
            rebase_after(Duration::from_secs(96)).last(),
            Some(&Duration::from_secs(105))
        );
        assert_eq!(rebase_window_ms(Duration::from_secs(30)), 60_000);
        assert_eq!(rebase_window_ms(Duration::from_secs(96)), 125_000);
    }

    /// The Redis Cluster specification's example: `123456789` is in slot 12739.
    #[test]
    fn hash_slots_are_the_cluster_s() {
        assert_eq!(hash_slot("123456789"), 12739);
        assert!(hash_slot("tg:42") < 16384);
    }

    use super::*;

    struct NoLedger;

    #[async_trait::async_trait]
    impl MonthSource for NoLedger {
        async fn month_totals(
            &self,
            _: WorkspaceId,
            _: MonthKey,
            _: Option<&str>,
        ) -> Result<super::super::MonthTotals, LimiterError> {
            Ok(Default::default())
        }
    }

    /// The model ids kept are those `model_id` makes, and no more than `MODEL_IDS` of them are
    /// kept however many names clients send. (No Redis is needed: nothing here connects.)
    #[tokio::test]
    async fn model_ids_are_kept_within_their_bound() {
        let options = RedisOptions {
            topology: Topology::Single("redis://127.0.0.1:1".into()),
            prefix: "t".into(),
            timeout: Duration::from_millis(50),
            lease: Duration::from_secs(30),
            time: TimeSource::Caller,
        };
        let limiter = RedisLimiter::new(options, Arc::new(NoLedger)).unwrap();
        let inner = &limiter.inner;
        let kept = || inner.model_ids.lock().unwrap().len();
        // Under the bound: each name once, asked twice.
        for i in 0..MODEL_IDS {
            let name = format!("model-{i}");
            assert_eq!(&*inner.model_id(&name), model_id(&name));
            assert_eq!(&*inner.model_id(&name), model_id(&name));
        }
        assert_eq!(kept(), MODEL_IDS);
        // Over it: the map is emptied and starts again, and ids stay right.
        for i in MODEL_IDS..MODEL_IDS + 10 {
            let name = format!("model-{i}");
            assert_eq!(&*inner.model_id(&name), model_id(&name));
            assert!(kept() <= MODEL_IDS, "{}", kept());
        }
        assert_eq!(kept(), 10);
        assert_eq!(&*inner.model_id("model-0"), model_id("model-0"));
    }
}
