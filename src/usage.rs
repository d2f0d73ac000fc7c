//! The ledger writer: settled usage goes to the store in batches, off the hot path.
//!
//! Each settled request is sent here as a `UsageRecord` and written within `flush_every`
//! (250 ms by default) in one transaction, together with keys' `last_used_at`. Writes are
//! idempotent by request id, so a failed batch is simply retried: while the store is down the
//! writer keeps what it has (up to `MAX_PENDING` records) and writes it all once the store
//! answers again. What a crash can lose is what
//! was in flight plus at most one flush interval of settled usage (see ARCHITECTURE.md).
//!
//! A settlement the limiter could not take (Redis unreachable) is *deferred*: kept here and
//! retried every interval until the limiter answers (settling is idempotent by reservation id),
//! then written with the counter generation that counted it. The ledger records each
//! settlement with that generation, which is what keeps the shared month counter exact. At
//! shutdown, what is still deferred is written without one (counted by any later generation).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::limiter::core::day_of;
use crate::limiter::{Limiter, Reservation, Settled, NANOS_PER_SEC};
use crate::metrics::Metrics;
use crate::model::{Limits, WorkspaceId};
use crate::store::{Store, UsageRecord};

/// How long settled events are kept for idempotency before only their daily totals remain.
pub const EVENT_RETENTION_SECS: i64 = 7 * 24 * 3600;
/// A batch is written at once when it reaches this size.
const BATCH: usize = 1024;
/// Past this many unwritten records (store down for long), new ones are dropped and counted.
const MAX_PENDING: usize = 1_000_000;
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

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Msg>,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            store,
            catalog,
            limiter,
            deferred: VecDeque::new(),
            clock,
            metrics,
            pending: Vec::new(),
            last_prune: 0,
        };
        let task = tokio::spawn(writer.run(rx, flush_every));
        (Recorder { tx }, task)
    }

    pub fn record(&self, record: UsageRecord) {
        // The writer only stops at shutdown, after the last requests were settled.
        let _ = self.tx.send(Msg::Record(record));
    }

    /// Keeps a settlement the limiter could not take, to retry it.
    pub fn defer(&self, deferred: Deferred) {
        let _ = self.tx.send(Msg::Defer(Box::new(deferred)));
    }

    /// Writes everything recorded so far; returns once it is in the store (or failed).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// The last flush: tries the deferred settlements once more, then writes them all.
    pub async fn shutdown(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(ack)).is_ok() {
            let _ = done.await;
        }
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
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>, flush_every: Duration) {
        let mut tick = tokio::time::interval(flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Record(r)) => {
                        if self.pending.len() < MAX_PENDING {
                            self.pending.push(r);
                        } else {
                            Metrics::inc(&self.metrics.ledger_write_errors);
                        }
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
                    self.pending.push(settled_record(
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

    /// Records a settlement the limiter never confirmed: the ledger keeps the usage, untagged.
    fn unconfirmed(&mut self, d: Deferred) {
        Metrics::inc(&self.metrics.settlements_unconfirmed);
        let settled = Settled {
            at: self.clock.now(),
            counter: None,
        };
        self.pending.push(settled_record(
            d.request_id,
            d.reservation.workspace,
            d.model,
            d.actual,
            &settled,
        ));
    }

    async fn write(&mut self) {
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
