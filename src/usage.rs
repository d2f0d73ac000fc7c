//! The ledger writer: settled usage goes to the store in batches, off the hot path.
//!
//! Each settled request is sent here as a `UsageRecord` and written within `flush_every`
//! (250 ms by default) in one transaction, together with keys' `last_used_at`. Writes are
//! idempotent by request id, so a failed batch is simply retried: while the store is down the
//! writer keeps what it has (up to `MAX_PENDING` records) and writes it all once the store
//! answers again. What a crash can lose is what
//! was in flight plus at most one flush interval of settled usage (see ARCHITECTURE.md).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{Store, UsageRecord};

/// How long settled events are kept for idempotency before only their daily totals remain.
pub const EVENT_RETENTION_SECS: i64 = 7 * 24 * 3600;
/// A batch is written at once when it reaches this size.
const BATCH: usize = 1024;
/// Past this many unwritten records (store down for long), new ones are dropped and counted.
const MAX_PENDING: usize = 1_000_000;

enum Msg {
    Record(UsageRecord),
    Flush(oneshot::Sender<()>),
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
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        flush_every: Duration,
    ) -> (Recorder, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            store,
            catalog,
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

    /// Writes everything recorded so far; returns once it is in the store (or failed).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

struct Writer {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
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
                    Some(Msg::Flush(ack)) => {
                        self.write().await;
                        let _ = ack.send(());
                    }
                    None => {
                        self.write().await;
                        return;
                    }
                },
                _ = tick.tick() => self.write().await,
            }
        }
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
