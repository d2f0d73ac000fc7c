//! The ledger writer: settled usage goes to the store in batches, off the hot path.
//!
//! Each settled request is sent here as a `UsageRecord` and written within `flush_every`
//! (250 ms by default) in one transaction, together with keys' `last_used_at`. Writes are
//! idempotent by request id, so a failed batch is simply retried: while the store is down the
//! writer keeps what it has (up to `MAX_PENDING` records) and writes it all once the store
//! answers again. What a crash can lose is what
//! was in flight plus at most one flush interval of settled usage (see ARCHITECTURE.md).
//!
//! # Bounds
//! Memory stays bounded whatever clients or the store do:
//! - Settlements reach the writer over a channel of `CHANNEL` messages, and wait in it while the
//!   store is down, up to `MAX_PENDING` in all. Past that bound (the store down for a long time)
//!   a settlement is not written to the ledger: it is counted in
//!   `tiergate_ledger_dropped_total` and `tiergate_ledger_dropped_tokens_total` and logged (at
//!   most every 10 s, with the totals). The limiter has counted it all the same.
//! - Denials are not sent one by one: they are counted in memory per workspace, day and model
//!   and written as one row update each per flush (`MAX_DENIAL_KEYS` keys at most; past that,
//!   a workspace's further models are counted under `OTHER_MODEL`).
//! - Model names are the client's choice: per workspace and day, the ledger records at most
//!   `MAX_MODELS_PER_DAY` distinct names (models with a limit of their own always count); the
//!   others are recorded as `OTHER_MODEL`, so the daily table cannot grow a row per made-up name.
//!
//! A settlement the limiter could not take (Redis unreachable) is *deferred*: kept here and
//! retried every interval until the limiter answers (settling is idempotent by reservation id),
//! then written with the counter generation that counted it. The ledger records each
//! settlement with that generation, which is what keeps the shared month counter exact. At
//! shutdown, what is still deferred is written without one (counted by any later generation).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::limiter::core::day_of;
use crate::limiter::MonthKey;
use crate::limiter::{Limiter, Reservation, Settled, NANOS_PER_SEC};
use crate::metrics::Metrics;
use crate::model::{Limits, WorkspaceId};
use crate::store::{DailyUsage, Store, StoreError, UsageRecord};

/// How long settled events are kept for idempotency before only their daily totals remain.
pub const EVENT_RETENTION_SECS: i64 = 7 * 24 * 3600;
/// A batch is written at once when it reaches this size.
const BATCH: usize = 1024;
/// Past this many unwritten records (store down for long), new ones are dropped and counted.
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

/// A settled request as the ledger records it, counted by the limiter as `settled` says.
pub fn settled_record(
    request_id: String,
    workspace: WorkspaceId,
    model: String,
    tokens: u64,
    settled: &Settled,
) -> UsageRecord {
    UsageRecord::Settled {
        request_id,
        workspace,
        day: day_of(settled.at),
        model,
        tokens,
        at: (settled.at / NANOS_PER_SEC) as i64,
        counter: settled.counter.clone(),
    }
}

/// A settlement the limiter has not taken yet.
pub struct Deferred {
    pub reservation: Reservation,
    pub limits: Arc<Limits>,
    pub actual: u64,
    pub request_id: String,
    pub model: String,
}

enum Msg {
    Record(UsageRecord),
    Defer(Box<Deferred>),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

type DenialKey = (WorkspaceId, String, String);

/// How long a workspace's ledger figures read for its limits page are reused.
pub const RECENT_READS: Duration = Duration::from_secs(1);

/// A workspace's ledger figures over a range of days, as the limits page shows them.
#[derive(Debug, Clone)]
pub struct LedgerView {
    pub requests_this_month: u64,
    pub daily: Vec<DailyUsage>,
}

type ViewKey = (WorkspaceId, MonthKey, String, String);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
    store: Arc<dyn Store>,
    /// Recent reads of the ledger for workspaces' own views, reused for `RECENT_READS`.
    recent: Arc<Mutex<HashMap<ViewKey, (std::time::Instant, LedgerView)>>>,
    denials: Arc<Mutex<HashMap<DenialKey, u64>>>,
    metrics: Arc<Metrics>,
    /// Unix seconds of the last "dropped" log line, so a flood logs once every 10 s.
    last_drop_log: Arc<AtomicU64>,
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
        let denials = Arc::new(Mutex::new(HashMap::new()));
        let last_drop_log = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            store,
            catalog,
            limiter,
            deferred: VecDeque::new(),
            clock,
            metrics: metrics.clone(),
            pending: Vec::new(),
            last_prune: 0,
            denials: denials.clone(),
            models_today: HashMap::new(),
            max_pending,
            last_drop_log: last_drop_log.clone(),
        };
        let task = tokio::spawn(writer.run(rx, flush_every));
        let recorder = Recorder {
            tx,
            store: store_for_reads,
            recent: Arc::new(Mutex::new(HashMap::new())),
            denials,
            metrics,
            last_drop_log,
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
            dropped(&self.metrics, &self.last_drop_log, &record);
        }
    }

    /// Counts a denial for the ledger (written per workspace, day and model at each flush).
    pub fn record_denied(&self, workspace: WorkspaceId, day: String, model: String) {
        let mut denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        let full = denials.len() >= MAX_DENIAL_KEYS;
        let key = (workspace, day, model);
        if full && !denials.contains_key(&key) {
            let (workspace, day, _) = key;
            *denials
                .entry((workspace, day, OTHER_MODEL.to_string()))
                .or_insert(0) += 1;
        } else {
            *denials.entry(key).or_insert(0) += 1;
        }
    }

    /// Keeps a settlement the limiter could not take, to retry it.
    pub fn defer(&self, deferred: Deferred) {
        if let Err(TrySendError::Full(Msg::Defer(d)) | TrySendError::Closed(Msg::Defer(d))) =
            self.tx.try_send(Msg::Defer(Box::new(deferred)))
        {
            let settled = Settled {
                at: 0,
                counter: None,
            };
            let record = settled_record(
                d.request_id,
                d.reservation.workspace,
                d.model,
                d.actual,
                &settled,
            );
            dropped(&self.metrics, &self.last_drop_log, &record);
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

    /// Writes everything recorded so far; returns once it is in the store (or failed).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The last flush: tries the deferred settlements once more, then writes them all.
    pub async fn shutdown(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(ack)).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// Counts a settlement the ledger will not get, and says so in the log (once every 10 s).
fn dropped(metrics: &Metrics, last_log: &AtomicU64, record: &UsageRecord) {
    Metrics::inc(&metrics.ledger_dropped);
    if let UsageRecord::Settled { tokens, .. } = record {
        Metrics::add(&metrics.ledger_dropped_tokens, *tokens);
    }
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
            dropped = metrics.ledger_dropped.load(Ordering::Relaxed),
            dropped_tokens = metrics.ledger_dropped_tokens.load(Ordering::Relaxed),
            bound = MAX_PENDING,
            "the ledger holds as many unwritten settlements as it may (the store has been unreachable for long): further settlements are not written to the ledger, only counted"
        );
    }
}

struct Writer {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    limiter: Arc<dyn Limiter>,
    deferred: VecDeque<Box<Deferred>>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    pending: Vec<UsageRecord>,
    last_prune: i64,
    denials: Arc<Mutex<HashMap<DenialKey, u64>>>,
    /// The model names recorded per workspace and day (today's and yesterday's only).
    models_today: HashMap<(WorkspaceId, String), HashSet<String>>,
    max_pending: usize,
    last_drop_log: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, flush_every: Duration) {
        let mut tick = tokio::time::interval(flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Record(r)) => {
                        self.push(r);
                        if self.pending.len() >= BATCH {
                            self.write().await;
                        }
                    }
                    Some(Msg::Defer(d)) => {
                        if self.deferred.len() < MAX_DEFERRED {
                            self.deferred.push_back(d);
                        } else {
                            self.unconfirmed(*d);
                        }
                        self.metrics
                            .settlements_deferred
                            .store(self.deferred.len() as u64, Ordering::Relaxed);
                    }
                    Some(Msg::Flush(ack)) => {
                        self.write().await;
                        let _ = ack.send(());
                    }
                    Some(Msg::Shutdown(ack)) => {
                        self.retry_deferred().await;
                        while let Some(d) = self.deferred.pop_front() {
                            self.unconfirmed(*d);
                        }
                        self.write().await;
                        let _ = ack.send(());
                    }
                    None => {
                        self.write().await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    self.retry_deferred().await;
                    self.write().await;
                }
            }
        }
    }

    /// Settles deferred settlements in order while the limiter takes them.
    async fn retry_deferred(&mut self) {
        while let Some(d) = self.deferred.front() {
            let now = self.clock.now();
            match self
                .limiter
                .settle(&d.reservation, &d.limits, d.actual, now)
                .await
            {
                Ok(settled) => {
                    let d = self.deferred.pop_front().expect("just seen");
                    let Deferred {
                        reservation,
                        actual,
                        request_id,
                        model,
                        ..
                    } = *d;
                    self.push(settled_record(
                        request_id,
                        reservation.workspace,
                        model,
                        actual,
                        &settled,
                    ));
                }
                Err(_) => break,
            }
        }
        self.metrics
            .settlements_deferred
            .store(self.deferred.len() as u64, Ordering::Relaxed);
    }

    /// Keeps a record for the next write, within the bounds (see the module's comment).
    fn push(&mut self, mut record: UsageRecord) {
        if let UsageRecord::Settled {
            workspace,
            day,
            model,
            ..
        } = &mut record
        {
            *model = self.ledger_model(*workspace, day, std::mem::take(model));
        }
        if self.pending.len() < self.max_pending {
            self.pending.push(record);
        } else {
            dropped(&self.metrics, &self.last_drop_log, &record);
        }
        self.metrics
            .ledger_pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// The name the ledger records `model` under: itself, unless the workspace already has
    /// `MAX_MODELS_PER_DAY` others that day and this one has no limit of its own.
    fn ledger_model(&mut self, workspace: WorkspaceId, day: &str, model: String) -> String {
        if model.is_empty() || model == OTHER_MODEL {
            return model;
        }
        let key = (workspace, day.to_string());
        if !self.models_today.contains_key(&key) && self.models_today.len() >= MAX_DENIAL_KEYS {
            // Bounded: forgetting costs at most another `MAX_MODELS_PER_DAY` names in a day.
            self.models_today.clear();
        }
        let seen = self.models_today.entry(key).or_default();
        if seen.contains(&model) {
            return model;
        }
        let limited = self
            .catalog
            .limits_of(workspace)
            .is_some_and(|l| l.models.contains_key(&model));
        if seen.len() < MAX_MODELS_PER_DAY || limited {
            seen.insert(model.clone());
            model
        } else {
            OTHER_MODEL.to_string()
        }
    }

    /// Moves the denials counted since the last write into the batch.
    fn take_denials(&mut self) {
        let denials = std::mem::take(&mut *self.denials.lock().unwrap_or_else(|e| e.into_inner()));
        // In a stable order, so that which names come first under the daily cap is no accident.
        let mut denials: Vec<_> = denials.into_iter().collect();
        denials.sort_unstable();
        for ((workspace, day, model), count) in denials {
            let model = self.ledger_model(workspace, &day, model);
            self.pending.push(UsageRecord::Denied {
                workspace,
                day,
                model,
                count,
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
        self.push(settled_record(
            d.request_id,
            d.reservation.workspace,
            d.model,
            d.actual,
            &settled,
        ));
    }

    async fn write(&mut self) {
        // Names are capped per day: yesterday's and today's are enough to remember.
        let yesterday = day_of(self.clock.now().saturating_sub(24 * 3600 * NANOS_PER_SEC));
        self.models_today.retain(|(_, d), _| *d >= yesterday);
        self.take_denials();
        // In batches of at most `BATCH`, so that what piled up while the store was down is
        // written in transactions as short as usual.
        let mut written = 0;
        while written < self.pending.len() {
            let end = self.pending.len().min(written + BATCH);
            match self.store.record_usage(&self.pending[written..end]).await {
                Ok(_) => written = end,
                Err(e) => {
                    Metrics::inc(&self.metrics.ledger_write_errors);
                    tracing::error!(error = %e, pending = self.pending.len() - written, "ledger write failed; will retry");
                    break;
                }
            }
        }
        let failed = written < self.pending.len();
        self.pending.drain(..written);
        self.metrics
            .ledger_pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        if failed {
            // The store is likely down: keys' last use stays noted for the next write, and
            // this write does not wait on the store a second time.
            return;
        }
        let touched = self.catalog.take_touched();
        if let Err(e) = self.store.touch_keys(&touched).await {
            tracing::warn!(error = %e, "could not record keys' last use");
        }
        let now = self.clock.now_secs();
        if now - self.last_prune >= 3600 {
            self.last_prune = now;
            if let Err(e) = self.store.prune_events(now - EVENT_RETENTION_SECS).await {
                tracing::warn!(error = %e, "could not prune ledger events");
            }
        }
    }
}
