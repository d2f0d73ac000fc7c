//! The ledger writer: settled usage goes to the store in batches, off the hot path.
//!
//! Each settled request is sent here as a `UsageRecord` and added, in memory, to the row of its
//! (workspace, day, model, counter generation), and to the rollups the usage charts read: the
//! row of its (workspace, hour) and of its (workspace, day, key, counter generation). Within `flush_every` (250 ms
//! by default) the rows are written as one `LedgerBatch` (or several of at most `BATCH` rows),
//! together with keys' `last_used_at`. A busy workspace costs a few rows per flush, not a row
//! per request. The rollups travel in the same batches as the daily rows, so they are written
//! exactly once too, and they add up to the same totals.
//!
//! # Exactly once
//! A batch gets its id (this process's random id and a sequence number) when it is first sent,
//! and the store records the id in the batch's own transaction. A batch whose write failed is
//! kept as it was, id and rows, and sent again until the store takes it; if the first write had
//! in fact committed (the connection died at commit), the store recognises the id and adds
//! nothing. While sent batches wait, new settlements keep adding up in memory and are sealed
//! into a batch only once the waiting ones are written. What a crash can lose is what was in
//! flight plus at most one flush interval of settled usage (see ARCHITECTURE.md).
//!
//! # Bounds
//! Memory stays bounded whatever clients or the store do:
//! - Settlements reach the writer over a channel of `CHANNEL` messages. Rows being added up are
//!   at most `MAX_PENDING`, and so are rows sealed in batches waiting to be sent again (a batch
//!   is sealed only when none waits); a settlement for a row already being added up is added to
//!   it, whatever the bound. Past the bound
//!   (the store down for long while very many workspaces settle) a settlement that would need a
//!   new row is not written to the ledger: it is counted in `tiergate_ledger_dropped_total` and
//!   `tiergate_ledger_dropped_tokens_total` and logged (at most every 10 s, with the totals).
//!   The limiter has counted it all the same.
//! - The rollups by hour and by key are bounded the same way, each by `MAX_PENDING` rows: a
//!   settlement is added to its three rows or, when one of them would be a new row past its
//!   bound, to none (and counted as dropped), so the rollups never disagree with the ledger.
//!   Between two flushes they hold at most a row per workspace and hour (one or two hours) and
//!   per key used (and counter generation: one, or two across a change of generation):
//!   bounded by the catalogue's keys.
//! - Denials are not sent one by one: they are counted in memory per workspace, day, model,
//!   hour and key, and added to the rows at each flush (`MAX_DENIAL_KEYS` keys at most; past
//!   that, a workspace's further models are counted under `OTHER_MODEL`, so what is added past
//!   the bound is bounded by the keys in the catalogue; past `MAX_PENDING` rows, a denial that
//!   would need a new row is not recorded).
//! - Model names are the client's choice: per workspace and day, the ledger records at most
//!   `MAX_MODELS_PER_DAY` distinct names (models with a limit of their own always count); the
//!   others are recorded as `OTHER_MODEL`, so the daily table cannot grow a row per made-up name.
//!
//! A settlement the limiter could not take (Redis unreachable) is *deferred*: kept here and
//! retried every interval until the limiter answers (settling is idempotent by reservation id),
//! then recorded under the counter generation that counted it. The ledger keeps what each
//! generation counted, which is what keeps the shared month counter exact. Before a new shared
//! counter generation is based on the ledger, a catch-up (`CatchUp`) settles the deferred ones and
//! writes what is held at once. At shutdown, what is still deferred is recorded without one
//! (counted by any later generation).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::limiter::core::day_of;
use crate::limiter::MonthKey;
use crate::limiter::{Limiter, Nanos, Reservation, Settled, NANOS_PER_SEC};
use crate::metrics::Metrics;
use crate::model::{KeyId, Limits, WorkspaceId};
use crate::store::{
    DailyUsage, HourRow, KeyDayRow, KeyUsage, LedgerBatch, LedgerRow, Store, StoreError,
};

/// How long the ids of written batches are kept, so that a batch sent again is recognised.
pub const EVENT_RETENTION_SECS: i64 = 7 * 24 * 3600;
/// How long the hourly rollup is kept (the chart shows 48 hours).
pub const HOURLY_RETENTION_SECS: i64 = 7 * 24 * 3600;
/// How long rows by counter generation are kept: a generation counts one month.
const COUNTED_RETENTION_SECS: u64 = 62 * 24 * 3600;
/// Rows in one batch (one transaction) at most.
const BATCH: usize = 1024;
/// Past this many rows waiting to be written (store down for long), settlements that need a
/// new row are dropped and counted.
pub const MAX_PENDING: usize = 1_000_000;
/// Messages the channel to the writer holds.
const CHANNEL: usize = 65_536;
/// Distinct (workspace, day, model) denial counters held between flushes.
const MAX_DENIAL_KEYS: usize = 100_000;
/// Distinct model names the ledger records per workspace and day.
pub const MAX_MODELS_PER_DAY: usize = 32;
/// The name under which the ledger counts models past `MAX_MODELS_PER_DAY`.
pub const OTHER_MODEL: &str = "(other)";
/// Past this many deferred settlements (Redis down for long), new ones are written at once
/// without a counter generation.
const MAX_DEFERRED: usize = 100_000;

/// One settled request, as the ledger writer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub workspace: WorkspaceId,
    /// The key the request came with.
    pub key: KeyId,
    /// `YYYY-MM-DD`, UTC, the day of settlement.
    pub day: String,
    /// The start of the hour of settlement, unix seconds (`hour_of`); in `day`.
    pub hour: i64,
    pub model: String,
    pub tokens: u64,
    /// Of `tokens`, the prompt's (the rest is the completion's).
    pub prompt_tokens: u64,
    /// The limiter's shared month-counter generation that counted it, if any.
    pub counter: Option<String>,
    /// What the shadow limiter made of it (see `shadow`).
    pub shadow: ShadowMark,
}

/// What the shadow limiter made of a settled request: it would have denied it, or it admitted
/// it and its settlement was counted by a shadow month-counter generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShadowMark {
    pub denied: bool,
    pub counter: Option<String>,
}

/// The tokens of a settlement: `total`, of which `prompt` are the prompt's (as the upstream
/// reported them; as estimated when it reported none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub total: u64,
    pub prompt: u64,
}

/// The start of the hour (UTC) of `at`, in unix seconds.
pub fn hour_of(at: Nanos) -> i64 {
    let secs = (at / NANOS_PER_SEC) as i64;
    secs - secs.rem_euclid(3600)
}

/// A settled request as the ledger records it, counted by the limiter as `settled` says.
pub fn settled_record(
    workspace: WorkspaceId,
    key: KeyId,
    model: String,
    tokens: Tokens,
    settled: &Settled,
) -> UsageRecord {
    UsageRecord {
        workspace,
        key,
        day: day_of(settled.at),
        hour: hour_of(settled.at),
        model,
        tokens: tokens.total,
        prompt_tokens: tokens.prompt.min(tokens.total),
        counter: settled.counter.clone(),
        shadow: ShadowMark::default(),
    }
}

/// A settlement the limiter has not taken yet.
pub struct Deferred {
    pub reservation: Reservation,
    pub limits: Arc<Limits>,
    /// The key the request came with.
    pub key: KeyId,
    pub actual: Tokens,
    pub model: String,
    pub shadow: ShadowMark,
}

enum Msg {
    Record(UsageRecord),
    Defer(Box<Deferred>),
    Flush(oneshot::Sender<()>),
    CatchUp(oneshot::Sender<()>),
    /// The last flush, to end by the instant given.
    Shutdown(oneshot::Sender<Unwritten>, tokio::time::Instant),
}

/// The longest a new shared counter generation waits for the writer to catch up (`CatchUp`).
pub const CATCH_UP_PATIENCE: Duration = Duration::from_secs(1);

/// Catch-ups answered by one settling and write at most: those that wait together (every
/// workspace's first decision after Redis is back asks for one) cost one write, not one each.
const CATCH_UPS_AT_ONCE: usize = 1024;

/// The ledger writer as the shared month counter's source needs it: before a new counter
/// generation is based on the ledger, it settles the settlements it deferred (Redis may have run
/// them when it woke, though their calls timed out) and writes what it holds, so that the ledger
/// has what this process settled. Holds the writer weakly: the writer holds the limiter, which
/// holds this.
#[derive(Clone)]
pub struct CatchUp {
    tx: mpsc::WeakSender<Msg>,
    /// The longest a catch-up is waited for (it is on a request's path); past it, the ledger is
    /// read as it is, and the generation's re-bases take in the rest.
    within: Duration,
}

impl CatchUp {
    pub async fn run(&self) {
        let Some(tx) = self.tx.upgrade() else { return };
        let _ = tokio::time::timeout(self.within, async move {
            let (ack, done) = oneshot::channel();
            if tx.send(Msg::CatchUp(ack)).await.is_ok() {
                drop(tx);
                let _ = done.await;
            }
        })
        .await;
    }
}

/// Usage the ledger writer could not write before the stop (the store unreachable to the end):
/// settled requests and their tokens, lost. Nothing, on a clean stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unwritten {
    pub requests: u64,
    pub tokens: u64,
}

/// At most one line per this while the ledger's writes keep failing.
const FAILED_WRITE_LOG_EVERY: Duration = Duration::from_secs(10);

/// At a stop, how long the last write may take in all, tried again while the store does not
/// answer: with the default grace (20 s), usage drain (2 s) and settlements' grace (5 s), a stop
/// still fits in the 30 s Kubernetes gives before SIGKILL. It bounds every attempt, not only
/// when one may start: a store call can wait seconds for a connection or an answer.
pub const LAST_WRITE_PATIENCE: Duration = Duration::from_secs(3);

/// A denial's workspace, day, model, hour and key.
type DenialKey = (WorkspaceId, String, String, i64, KeyId);

/// How long a workspace's ledger figures read for its limits page are reused.
pub const RECENT_READS: Duration = Duration::from_secs(1);

/// A workspace's ledger figures over a range of days, as the limits page shows them.
#[derive(Debug, Clone)]
pub struct LedgerView {
    pub requests_this_month: u64,
    pub daily: Vec<DailyUsage>,
}

type ViewKey = (WorkspaceId, MonthKey, String, String);

/// A workspace's ledger over time, as the usage charts show it.
#[derive(Debug, Clone, Default)]
pub struct UsageHistory {
    /// Rows by day and model over the range of days.
    pub daily: Vec<DailyUsage>,
    /// Rows by hour over the range of hours.
    pub hours: Vec<HourRow>,
    /// Per key, over the range of days.
    pub keys: Vec<KeyUsage>,
}

/// A workspace, its first and last day, and its first and past-the-last hour.
type HistoryKey = (WorkspaceId, String, String, i64, i64);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
    store: Arc<dyn Store>,
    /// Recent reads of the ledger for workspaces' own views, reused for `RECENT_READS`.
    recent: Arc<Mutex<HashMap<ViewKey, (std::time::Instant, LedgerView)>>>,
    /// Recent reads of workspaces' usage history, reused for `RECENT_READS` likewise.
    recent_history: Arc<Mutex<HashMap<HistoryKey, (std::time::Instant, UsageHistory)>>>,
    denials: Arc<Mutex<Map<DenialKey, u64>>>,
    metrics: Arc<Metrics>,
    /// Unix seconds of the last "dropped" log line, so a flood logs once every 10 s.
    last_drop_log: Arc<AtomicU64>,
    /// Cancelled when the stop begins: the writer gives up the write under way, and the last
    /// write takes over.
    stopping: CancellationToken,
}

impl Recorder {
    /// Starts the writer task.
    pub fn start(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        limiter: Arc<dyn Limiter>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        flush_every: Duration,
    ) -> (Recorder, JoinHandle<()>) {
        Self::start_bounded(
            store,
            catalog,
            limiter,
            clock,
            metrics,
            flush_every,
            MAX_PENDING,
        )
    }

    /// `start`, holding at most `max_pending` unwritten settlements (tests use a small bound).
    pub fn start_bounded(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        limiter: Arc<dyn Limiter>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        flush_every: Duration,
        max_pending: usize,
    ) -> (Recorder, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let store_for_reads = store.clone();
        let denials = Arc::new(Mutex::new(Map::default()));
        let last_drop_log = Arc::new(AtomicU64::new(0));
        let stopping = CancellationToken::new();
        let writer = Writer {
            store,
            catalog,
            limiter,
            deferred: VecDeque::new(),
            clock,
            metrics: metrics.clone(),
            pending: Map::default(),
            pending_hours: Map::default(),
            pending_keys: Map::default(),
            sealed: VecDeque::new(),
            sealed_rows: 0,
            failed_writes_logged: None,
            writer_id: writer_id(),
            next_batch: 0,
            last_prune: 0,
            denials: denials.clone(),
            models_today: Map::default(),
            max_pending,
            last_drop_log: last_drop_log.clone(),
            stopping: stopping.clone(),
            touching: Vec::new(),
        };
        let task = tokio::spawn(writer.run(rx, flush_every));
        let recorder = Recorder {
            tx,
            store: store_for_reads,
            recent: Arc::new(Mutex::new(HashMap::new())),
            recent_history: Arc::new(Mutex::new(HashMap::new())),
            denials,
            metrics,
            last_drop_log,
            stopping,
        };
        (recorder, task)
    }

    /// Sends a settled request to the ledger; past the bounds it is counted as dropped.
    pub fn record(&self, record: UsageRecord) {
        if let Err(e) = self.tx.try_send(Msg::Record(record)) {
            let record = match e {
                TrySendError::Full(Msg::Record(r)) | TrySendError::Closed(Msg::Record(r)) => r,
                _ => return,
            };
            dropped(&self.metrics, &self.last_drop_log, record.tokens);
        }
    }

    /// Settlements sent and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Counts a denial, at `at`, of a request that came with `key`, for the ledger (written
    /// per workspace, day and model, per hour, and per key, at each flush).
    pub fn record_denied(&self, workspace: WorkspaceId, key: KeyId, at: Nanos, model: String) {
        let mut denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        let full = denials.len() >= MAX_DENIAL_KEYS;
        let entry = (workspace, day_of(at), model, hour_of(at), key);
        if full && !denials.contains_key(&entry) {
            let (workspace, day, _, hour, key) = entry;
            *denials
                .entry((workspace, day, OTHER_MODEL.to_string(), hour, key))
                .or_insert(0) += 1;
        } else {
            *denials.entry(entry).or_insert(0) += 1;
        }
    }

    /// Keeps a settlement the limiter could not take, to retry it.
    pub fn defer(&self, deferred: Deferred) {
        if let Err(TrySendError::Full(Msg::Defer(d)) | TrySendError::Closed(Msg::Defer(d))) =
            self.tx.try_send(Msg::Defer(Box::new(deferred)))
        {
            dropped(&self.metrics, &self.last_drop_log, d.actual.total);
        }
    }

    /// The workspace's ledger figures for `month` and the days `from..=to`: exact (everything
    /// recorded so far written first) when `exact`, else as read from the store at most
    /// `RECENT_READS` ago, without forcing a write; that is, behind by at most one flush
    /// interval plus `RECENT_READS`, so that a workspace reading its own page often costs the
    /// store little.
    pub async fn ledger_view(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        from: &str,
        to: &str,
        exact: bool,
    ) -> Result<LedgerView, StoreError> {
        let key = (workspace, month, from.to_string(), to.to_string());
        if exact {
            self.flush().await;
        } else {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, view)) = recent.get(&key) {
                if at.elapsed() < RECENT_READS {
                    return Ok(view.clone());
                }
            }
        }
        let totals = self.store.month_totals(workspace, month, None).await?;
        let daily = self.store.daily_usage(workspace, from, to).await?;
        let view = LedgerView {
            requests_this_month: totals.requests,
            daily,
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= MAX_DENIAL_KEYS {
            recent.retain(|_, (at, _)| at.elapsed() < RECENT_READS);
        }
        recent.insert(key, (std::time::Instant::now(), view.clone()));
        Ok(view)
    }

    /// The workspace's ledger over the days `from..=to` (by day and model, and by key) and the
    /// hours `from_hour..to_hour` (unix seconds of their starts); exact or up to
    /// `RECENT_READS` old as in `ledger_view`.
    pub async fn usage_history(
        &self,
        workspace: WorkspaceId,
        (from, to): (&str, &str),
        (from_hour, to_hour): (i64, i64),
        exact: bool,
    ) -> Result<UsageHistory, StoreError> {
        let key = (
            workspace,
            from.to_string(),
            to.to_string(),
            from_hour,
            to_hour,
        );
        if exact {
            self.flush().await;
        } else {
            let recent = self
                .recent_history
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((at, history)) = recent.get(&key) {
                if at.elapsed() < RECENT_READS {
                    return Ok(history.clone());
                }
            }
        }
        let history = UsageHistory {
            daily: self.store.daily_usage(workspace, from, to).await?,
            hours: self
                .store
                .hourly_usage(workspace, from_hour, to_hour)
                .await?,
            keys: self.store.key_usage(workspace, from, to).await?,
        };
        let mut recent = self
            .recent_history
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if recent.len() >= MAX_DENIAL_KEYS {
            recent.retain(|_, (at, _)| at.elapsed() < RECENT_READS);
        }
        recent.insert(key, (std::time::Instant::now(), history.clone()));
        Ok(history)
    }

    /// Writes everything recorded so far; returns once it is in the store (or failed).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// A handle that brings the ledger up to this process's settlements (`CatchUp`), waiting
    /// at most `within` each time.
    pub fn catch_up(&self, within: Duration) -> CatchUp {
        CatchUp {
            tx: self.tx.downgrade(),
            within,
        }
    }

    /// The last flush: tries the deferred settlements once more, then writes them all.
    /// Writes what is left, trying again while the store does not answer, and answers what
    /// could not be written, all within `LAST_WRITE_PATIENCE` of the call (a write already
    /// under way is given up for it; a batch given up is sent again, written once).
    pub async fn shutdown(&self) -> Unwritten {
        let give_up = tokio::time::Instant::now() + LAST_WRITE_PATIENCE;
        self.stopping.cancel();
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(ack, give_up)).await.is_ok() {
            return done.await.unwrap_or_default();
        }
        Unwritten::default()
    }
}

/// Counts a settlement the ledger will not get, and says so in the log (once every 10 s).
fn dropped(metrics: &Metrics, last_log: &AtomicU64, tokens: u64) {
    Metrics::inc(&metrics.ledger_dropped);
    Metrics::add(&metrics.ledger_dropped_tokens, tokens);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = last_log.load(Ordering::Relaxed);
    if now >= last + 10
        && last_log
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::error!(
            dropped = metrics.ledger_dropped.get(),
            dropped_tokens = metrics.ledger_dropped_tokens.get(),
            bound = MAX_PENDING,
            "the ledger holds as many unwritten settlements as it may (the store has been unreachable for long): further settlements are not written to the ledger, only counted"
        );
    }
}

/// A row of the ledger as the writer adds it up: workspace, day, model, counter generation, and
/// the shadow's counter generation.
type RowKey = (WorkspaceId, String, String, Option<String>, Option<String>);
/// The writer's maps (and the denials' count) hash with foldhash, not SipHash: each settled
/// request hashes three or four keys of strings. Model names are the clients', but each map is
/// bounded (`max_pending`, `MAX_DENIAL_KEYS`, `MAX_MODELS_PER_DAY` names per workspace and day)
/// and seeded at random, so a client cannot make one degrade past those bounds.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<T> = HashSet<T, foldhash::fast::RandomState>;
/// A row of the hourly rollup: workspace, the hour's start.
type HourKey = (WorkspaceId, i64);
/// A row of the rollup by key: workspace, day, key, counter generation (as `RowKey`'s: the
/// store adds what a generation counted per key too, for keys' month totals).
type KeyDayKey = (WorkspaceId, String, KeyId, Option<String>);

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    requests: u64,
    tokens: u64,
    denied: u64,
    shadow_denied: u64,
    shadow_denied_tokens: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct HourSums {
    requests: u64,
    denied: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// What one settlement or a count of denials adds to its three rows.
struct Addition {
    row: RowKey,
    hour: HourKey,
    key: KeyDayKey,
    sums: Sums,
    prompt_tokens: u64,
}

/// True when `key` has a row in `map`, or there is room for a new one under `max`.
fn fits<K: std::hash::Hash + Eq, V>(map: &Map<K, V>, key: &K, max: usize) -> bool {
    map.len() < max || map.contains_key(key)
}

struct Writer {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    limiter: Arc<dyn Limiter>,
    deferred: VecDeque<Box<Deferred>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Rows added up since the last batch was sealed.
    pending: Map<RowKey, Sums>,
    /// The same settlements and denials, rolled up per workspace and hour, and per workspace,
    /// day and key.
    pending_hours: Map<HourKey, HourSums>,
    pending_keys: Map<KeyDayKey, Sums>,
    /// Batches sent at least once and not yet known to be written, oldest first; sent again
    /// as they are (id and rows) until the store takes them.
    sealed: VecDeque<LedgerBatch>,
    /// Rows of workspace, day and model in `sealed`.
    sealed_rows: usize,
    /// When a failed write was last logged, and the failures since: while the store is down a
    /// write fails every flush interval (4 a second), and one line every `FAILED_WRITE_LOG_EVERY`
    /// says so as well as forty would.
    failed_writes_logged: Option<(std::time::Instant, u64)>,
    /// This process's part of batch ids, random; and the next batch's number.
    writer_id: String,
    next_batch: u64,
    last_prune: i64,
    denials: Arc<Mutex<Map<DenialKey, u64>>>,
    /// The model names recorded per day (today's and yesterday's only) and workspace: by day
    /// first, so that a settlement looks its names up without making a key of its day.
    models_today: Map<String, Map<WorkspaceId, Set<String>>>,
    max_pending: usize,
    last_drop_log: Arc<AtomicU64>,
    /// The stop has begun (`Recorder::shutdown`): writes other than the last are given up.
    stopping: CancellationToken,
    /// Keys' last use taken from the catalogue and not yet written.
    touching: Vec<(KeyId, i64)>,
}

/// A random id for this process's batches: 64 bits, so two processes never share one.
fn writer_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    format!("{:016x}", u64::from_le_bytes(bytes))
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, flush_every: Duration) {
        // The first write one interval after the start, not at once: a write at start has
        // nothing to write, and would race with the first settlements.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + flush_every, flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Record(r)) => {
                        self.push(r);
                        if self.pending.len() >= BATCH {
                            self.write_unless_stopping().await;
                        }
                    }
                    Some(Msg::Defer(d)) => self.defer(d),
                    Some(Msg::Flush(ack)) => {
                        self.write_unless_stopping().await;
                        let _ = ack.send(());
                    }
                    Some(Msg::CatchUp(ack)) => {
                        let (mut acks, mut shutdown) = (vec![ack], None);
                        // Others asked meanwhile are answered by the same write; what else
                        // waits is taken as it comes.
                        while acks.len() < CATCH_UPS_AT_ONCE {
                            match rx.try_recv() {
                                Ok(Msg::CatchUp(ack)) => acks.push(ack),
                                Ok(Msg::Record(r)) => self.push(r),
                                Ok(Msg::Defer(d)) => self.defer(d),
                                Ok(Msg::Flush(ack)) => acks.push(ack),
                                Ok(Msg::Shutdown(ack, give_up)) => {
                                    shutdown = Some((ack, give_up));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.catch_up(acks).await;
                        if let Some((ack, give_up)) = shutdown {
                            self.shut_down(ack, give_up, flush_every).await;
                        }
                    }
                    Some(Msg::Shutdown(ack, give_up)) => {
                        self.shut_down(ack, give_up, flush_every).await
                    }
                    None => {
                        self.write().await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    self.retry_deferred().await;
                    self.write_unless_stopping().await;
                }
            }
        }
    }

    /// Keeps a settlement the limiter could not take, to settle again (`retry_deferred`).
    fn defer(&mut self, d: Box<Deferred>) {
        if self.deferred.len() < MAX_DEFERRED {
            self.deferred.push_back(d);
        } else {
            self.unconfirmed(*d);
        }
        self.metrics
            .settlements_deferred
            .set(self.deferred.len() as i64);
    }

    /// Settles what is deferred while the limiter takes it, writes what is held, and answers
    /// every catch-up (`CatchUp`) of `acks`.
    async fn catch_up(&mut self, acks: Vec<oneshot::Sender<()>>) {
        self.retry_deferred().await;
        self.write_unless_stopping().await;
        for ack in acks {
            let _ = ack.send(());
        }
    }

    /// The last flush: the deferred settlements tried once more and then written without a
    /// counter generation; what is held written, and tried again for a while if the store does
    /// not answer; what could not be written answered.
    /// Everything here ends by `give_up`: each attempt is bounded by the time left (a write
    /// given up keeps its batch sealed, so what it may have written is counted once).
    async fn shut_down(
        &mut self,
        ack: oneshot::Sender<Unwritten>,
        give_up: tokio::time::Instant,
        flush_every: Duration,
    ) {
        let _ = tokio::time::timeout_at(give_up, self.retry_deferred()).await;
        while let Some(d) = self.deferred.pop_front() {
            self.unconfirmed(*d);
        }
        // The store down at the stop: tried again for a while, as the timed writes would have,
        // rather than dropped at once.
        while tokio::time::timeout_at(give_up, self.write()).await.is_ok() && self.waiting() > 0 {
            let next = tokio::time::Instant::now() + flush_every.min(Duration::from_millis(250));
            if next >= give_up {
                break;
            }
            tokio::time::sleep_until(next).await;
        }
        let _ = ack.send(self.unwritten());
    }

    /// A write in the normal course, given up once the stop has begun: the stop's last write,
    /// bounded, takes over (a batch whose write is given up stays sealed and is sent again).
    async fn write_unless_stopping(&mut self) {
        let stopping = self.stopping.clone();
        tokio::select! {
            biased;
            () = stopping.cancelled() => {}
            () = self.write() => {}
        }
    }

    /// Settles deferred settlements in order while the limiter takes them.
    async fn retry_deferred(&mut self) {
        while let Some(d) = self.deferred.front() {
            let now = self.clock.now();
            match self
                .limiter
                .settle(&d.reservation, &d.limits, d.actual.total, now)
                .await
            {
                Ok(settled) => {
                    let d = self.deferred.pop_front().expect("just seen");
                    let Deferred {
                        reservation,
                        key,
                        actual,
                        model,
                        shadow,
                        ..
                    } = *d;
                    self.push(UsageRecord {
                        shadow,
                        ..settled_record(reservation.workspace, key, model, actual, &settled)
                    });
                }
                Err(_) => break,
            }
        }
        self.metrics
            .settlements_deferred
            .set(self.deferred.len() as i64);
    }

    /// Rows of workspace, day and model waiting to be written: added up, or sealed in a batch.
    fn waiting(&self) -> usize {
        self.pending.len() + self.sealed_rows
    }

    /// The settled requests and tokens not yet written.
    fn unwritten(&self) -> Unwritten {
        let mut u = Unwritten::default();
        let rows = self.pending.values().map(|s| (s.requests, s.tokens));
        let sealed = self
            .sealed
            .iter()
            .flat_map(|b| b.rows.iter().map(|r| (r.requests, r.tokens)));
        for (requests, tokens) in rows.chain(sealed) {
            u.requests += requests;
            u.tokens += tokens;
        }
        u
    }

    /// Adds `a` to its row and to its rows by hour and by key; false, adding nothing, when one
    /// of them would need a new row past the bound. (Rows in sealed batches are bounded too: a
    /// batch is sealed only from at most `max_pending` rows of each kind, and only when no
    /// other waits.)
    fn add(&mut self, a: Addition) -> bool {
        let max = self.max_pending;
        if !(fits(&self.pending, &a.row, max)
            && fits(&self.pending_hours, &a.hour, max)
            && fits(&self.pending_keys, &a.key, max))
        {
            return false;
        }
        let Addition {
            row,
            hour,
            key,
            sums,
            prompt_tokens,
        } = a;
        let r = self.pending.entry(row).or_default();
        r.requests += sums.requests;
        r.tokens += sums.tokens;
        r.denied += sums.denied;
        r.shadow_denied += sums.shadow_denied;
        r.shadow_denied_tokens += sums.shadow_denied_tokens;
        let h = self.pending_hours.entry(hour).or_default();
        h.requests += sums.requests;
        h.denied += sums.denied;
        h.prompt_tokens += prompt_tokens;
        h.completion_tokens += sums.tokens - prompt_tokens;
        let k = self.pending_keys.entry(key).or_default();
        k.requests += sums.requests;
        k.tokens += sums.tokens;
        k.denied += sums.denied;
        true
    }

    /// Adds a settlement to its rows, within the bounds (see the module's comment).
    fn push(&mut self, record: UsageRecord) {
        let UsageRecord {
            workspace,
            key,
            day,
            hour,
            model,
            tokens,
            prompt_tokens,
            counter,
            shadow,
        } = record;
        let model = self.ledger_model(workspace, &day, model);
        let shadow_denied = u64::from(shadow.denied);
        let addition = Addition {
            row: (
                workspace,
                day.clone(),
                model,
                counter.clone(),
                shadow.counter,
            ),
            hour: (workspace, hour),
            key: (workspace, day, key, counter),
            sums: Sums {
                requests: 1,
                tokens,
                denied: 0,
                shadow_denied,
                shadow_denied_tokens: shadow_denied * tokens,
            },
            prompt_tokens: prompt_tokens.min(tokens),
        };
        if !self.add(addition) {
            dropped(&self.metrics, &self.last_drop_log, tokens);
        }
        self.metrics.ledger_pending.set(self.waiting() as i64);
    }

    /// The name the ledger records `model` under: itself, unless the workspace already has
    /// `MAX_MODELS_PER_DAY` others that day and this one has no limit of its own.
    fn ledger_model(&mut self, workspace: WorkspaceId, day: &str, model: String) -> String {
        if model.is_empty() || model == OTHER_MODEL {
            return model;
        }
        let today = self.models_today.get(day);
        if let Some(seen) = today.and_then(|by_workspace| by_workspace.get(&workspace)) {
            if seen.contains(&model) {
                return model;
            }
        }
        let known = today.is_some_and(|by_workspace| by_workspace.contains_key(&workspace));
        if !known && self.models_today.values().map(Map::len).sum::<usize>() >= MAX_DENIAL_KEYS {
            // Bounded: forgetting costs at most another `MAX_MODELS_PER_DAY` names in a day.
            self.models_today.clear();
        }
        let limited = self
            .catalog
            .limits_of(workspace)
            .is_some_and(|l| l.models.contains_key(&model));
        if !self.models_today.contains_key(day) {
            self.models_today.insert(day.to_string(), Map::default());
        }
        let seen = self
            .models_today
            .get_mut(day)
            .expect("just made")
            .entry(workspace)
            .or_default();
        if seen.len() < MAX_MODELS_PER_DAY || limited {
            seen.insert(model.clone());
            model
        } else {
            OTHER_MODEL.to_string()
        }
    }

    /// Adds the denials counted since the last write to their rows.
    fn take_denials(&mut self) {
        let denials = std::mem::take(&mut *self.denials.lock().unwrap_or_else(|e| e.into_inner()));
        // In a stable order, so that which names come first under the daily cap is no accident.
        let mut denials: Vec<_> = denials.into_iter().collect();
        denials.sort_unstable();
        for ((workspace, day, model, hour, key), count) in denials {
            let model = self.ledger_model(workspace, &day, model);
            // Past the bound a denial that needs a new row is not recorded: denials are a
            // statistic, not usage.
            self.add(Addition {
                row: (workspace, day.clone(), model, None, None),
                hour: (workspace, hour),
                key: (workspace, day, key, None),
                sums: Sums {
                    denied: count,
                    ..Sums::default()
                },
                prompt_tokens: 0,
            });
        }
    }

    /// Records a settlement the limiter never confirmed: the ledger keeps the usage, untagged.
    fn unconfirmed(&mut self, d: Deferred) {
        Metrics::inc(&self.metrics.settlements_unconfirmed);
        let settled = Settled {
            at: self.clock.now(),
            counter: None,
        };
        self.push(UsageRecord {
            shadow: d.shadow,
            ..settled_record(d.reservation.workspace, d.key, d.model, d.actual, &settled)
        });
    }

    /// Seals the rows added up so far into batches of at most `BATCH` rows (of all kinds),
    /// each kind in key order.
    fn seal(&mut self) {
        if self.pending.is_empty() && self.pending_hours.is_empty() && self.pending_keys.is_empty()
        {
            return;
        }
        let mut rows: Vec<LedgerRow> = self
            .pending
            .drain()
            .map(
                |((workspace, day, model, counter, shadow_counter), sums)| LedgerRow {
                    workspace,
                    day,
                    model,
                    counter,
                    requests: sums.requests,
                    tokens: sums.tokens,
                    denied: sums.denied,
                    shadow_denied: sums.shadow_denied,
                    shadow_denied_tokens: sums.shadow_denied_tokens,
                    shadow_counter,
                },
            )
            .collect();
        rows.sort_unstable_by(|a, b| {
            (a.workspace, &a.day, &a.model, &a.counter, &a.shadow_counter).cmp(&(
                b.workspace,
                &b.day,
                &b.model,
                &b.counter,
                &b.shadow_counter,
            ))
        });
        let mut hours: Vec<HourRow> = self
            .pending_hours
            .drain()
            .map(|((workspace, hour), sums)| HourRow {
                workspace,
                hour,
                requests: sums.requests,
                denied: sums.denied,
                prompt_tokens: sums.prompt_tokens,
                completion_tokens: sums.completion_tokens,
            })
            .collect();
        hours.sort_unstable_by_key(|h| (h.workspace, h.hour));
        let mut keys: Vec<KeyDayRow> = self
            .pending_keys
            .drain()
            .map(|((workspace, day, key, counter), sums)| KeyDayRow {
                workspace,
                day,
                key,
                counter,
                requests: sums.requests,
                tokens: sums.tokens,
                denied: sums.denied,
            })
            .collect();
        keys.sort_unstable_by(|a, b| {
            (a.workspace, &a.day, a.key, &a.counter).cmp(&(b.workspace, &b.day, b.key, &b.counter))
        });
        let (mut rows, mut hours, mut keys) = (
            rows.into_iter().peekable(),
            hours.into_iter().peekable(),
            keys.into_iter().peekable(),
        );
        while rows.peek().is_some() || hours.peek().is_some() || keys.peek().is_some() {
            let mut batch = LedgerBatch {
                id: String::new(),
                rows: rows.by_ref().take(BATCH).collect(),
                hours: Vec::new(),
                keys: Vec::new(),
            };
            batch.hours = hours.by_ref().take(BATCH - batch.len()).collect();
            batch.keys = keys.by_ref().take(BATCH - batch.len()).collect();
            self.next_batch += 1;
            batch.id = format!("{}-{}", self.writer_id, self.next_batch);
            self.sealed_rows += batch.rows.len();
            self.sealed.push_back(batch);
        }
    }

    /// Writes the sealed batches, oldest first, until one fails; true when none is left.
    async fn send_sealed(&mut self) -> bool {
        let now = self.clock.now_secs();
        while let Some(batch) = self.sealed.front() {
            match self.store.record_usage(batch, now).await {
                Ok(_) => {
                    // The next failure, after this success, is news again.
                    self.failed_writes_logged = None;
                    // Written now, or before (the id was known): either way, once.
                    let batch = self.sealed.pop_front().expect("just seen");
                    self.sealed_rows -= batch.rows.len();
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.ledger_write_errors);
                    let due = match &mut self.failed_writes_logged {
                        Some((at, since)) if at.elapsed() < FAILED_WRITE_LOG_EVERY => {
                            *since += 1;
                            None
                        }
                        logged => {
                            let since = logged.map_or(0, |(_, since)| since);
                            *logged = Some((std::time::Instant::now(), 0));
                            Some(since)
                        }
                    };
                    if let Some(failed_since) = due {
                        tracing::error!(
                            error = %e,
                            waiting = self.waiting(),
                            failed_since,
                            "ledger write failed; will retry (logged at most every 10 s; every failure is counted in tiergate_ledger_write_errors_total)"
                        );
                    }
                    return false;
                }
            }
        }
        true
    }

    async fn write(&mut self) {
        // Names are capped per day: yesterday's and today's are enough to remember.
        let yesterday = day_of(self.clock.now().saturating_sub(24 * 3600 * NANOS_PER_SEC));
        self.models_today.retain(|d, _| *d >= yesterday);
        self.take_denials();
        // Batches that failed go first, as they were. Only once they are written are the rows
        // added up since sealed into new ones: while the store is down, settlements keep adding
        // up in the same rows instead of sealing a batch per interval.
        let written = self.send_sealed().await && {
            self.seal();
            self.send_sealed().await
        };
        self.metrics.ledger_pending.set(self.waiting() as i64);
        if !written {
            // The store is likely down: keys' last use stays noted for the next write, and
            // this write does not wait on the store a second time.
            return;
        }
        self.metrics.ledger_written();
        // Kept here while being written: a write given up at the stop leaves them to the last.
        if self.touching.is_empty() {
            self.touching = self.catalog.take_touched();
        }
        if let Err(e) = self.store.touch_keys(&self.touching).await {
            tracing::warn!(error = %e, "could not record keys' last use");
        }
        self.touching.clear();
        let now = self.clock.now_secs();
        if now - self.last_prune >= 3600 {
            self.last_prune = now;
            let counted_before = day_of(
                self.clock
                    .now()
                    .saturating_sub(COUNTED_RETENTION_SECS * NANOS_PER_SEC),
            );
            if let Err(e) = self
                .store
                .prune_ledger(
                    now - EVENT_RETENTION_SECS,
                    &counted_before,
                    now - HOURLY_RETENTION_SECS,
                )
                .await
            {
                tracing::warn!(error = %e, "could not prune the ledger");
            }
        }
    }
}
