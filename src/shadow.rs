//! Shadow mode: limits that only say what they would have denied.
//!
//! # Design
//! A workspace's limits in shadow (`model::Shadowing`: named in the workspace's or the tier's
//! `shadow` list, or all of them under `shadow` enforcement) are split off its enforced limits by
//! the catalogue (`WorkspaceEntry::shadow`); the budget applies to the enforced part only. They
//! are decided by a second limiter of the same kind as the primary, which holds their state
//! apart: in memory a `LocalLimiter` of its own, with Redis a `RedisLimiter` under a key prefix
//! of its own (`<prefix>-s`), so shadow and real state never mix and each decision is still one
//! atomic step. The shadow is asked only once the enforced limits admitted the request (with
//! enforcement on, a request they deny consumes nothing anywhere), with the same model and cost:
//! - it admits: the shadow reservation is kept beside the real one and settled to the same
//!   actual usage (0 when refunded), its concurrency slot freed with the real one's;
//! - it denies: nothing is taken in the shadow state (a denial never is), the request goes on,
//!   and the denial is counted (`tiergate_shadow_denied_total{limit}`), logged, marked on the
//!   answer (`x-ratelimit-shadow-denied`) and recorded in the ledger with the request's settled
//!   tokens (`shadow_denied`, `shadow_denied_tokens` per day and model).
//!
//! So the shadow state is exactly what enforcement would have produced for the same sequence.
//! Month counters of the shadow start from the ledger's month less the tokens of requests the
//! shadow denied (`ShadowMonths`); its Redis generations are tagged in the ledger like the
//! primary's (`LedgerRow::shadow_counter`), so a rebuilt counter counts each settlement once.
//!
//! The shadow never denies or delays a request beyond the limiter's timeout: a call that fails
//! or times out is counted (`tiergate_shadow_unavailable_total`) and skipped, and for a second
//! after a failure no call is made. A shadow settlement that fails is dropped (counted), never
//! deferred: only the real settlement goes to the ledger's retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limiter::local::LocalLimiter;
use crate::limiter::{
    Decision, Limiter, LimiterError, MonthKey, MonthSource, MonthTotals, Nanos, Reservation,
    Settled, TokenCost,
};
use crate::metrics::Metrics;
use crate::model::{Limits, WorkspaceId};
use crate::store::Store;

/// After a failed call, no call is made for this long.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The shadow limiter's month source: the ledger's month, less the tokens of requests the
/// shadow denied (which enforcement would never have admitted).
pub struct ShadowMonths(pub Arc<dyn Store>);

#[async_trait::async_trait]
impl MonthSource for ShadowMonths {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding: Option<&str>,
    ) -> Result<MonthTotals, LimiterError> {
        let ledger = |e: crate::store::StoreError| LimiterError::Ledger(e.to_string());
        let mut totals = self
            .0
            .month_totals(workspace, month, excluding)
            .await
            .map_err(ledger)?;
        let denied = self
            .0
            .shadow_denied_totals(workspace, month)
            .await
            .map_err(ledger)?;
        totals.tokens = totals.tokens.saturating_sub(denied.tokens);
        for (model, tokens) in denied.by_model {
            if let Some(t) = totals.by_model.get_mut(&model) {
                *t = t.saturating_sub(tokens);
            }
        }
        Ok(totals)
    }
}

/// The shadow limiter.
pub struct Shadow {
    limiter: Arc<dyn Limiter>,
    /// The in-memory backend, when it is the one, for idle eviction.
    local: Option<Arc<LocalLimiter>>,
    /// The longest a call may take (Redis); none in memory.
    timeout: Option<Duration>,
    metrics: Arc<Metrics>,
    born: Instant,
    /// Milliseconds after `born` until which no call is made.
    paused_until: AtomicU64,
}

impl Shadow {
    /// A shadow limiter in memory.
    pub fn local(local: Arc<LocalLimiter>, metrics: Arc<Metrics>) -> Shadow {
        Shadow {
            limiter: local.clone(),
            local: Some(local),
            timeout: None,
            metrics,
            born: Instant::now(),
            paused_until: AtomicU64::new(0),
        }
    }

    /// A shadow limiter on a shared backend, every call bounded by `timeout`.
    pub fn shared(limiter: Arc<dyn Limiter>, timeout: Duration, metrics: Arc<Metrics>) -> Shadow {
        Shadow {
            limiter,
            local: None,
            timeout: Some(timeout),
            metrics,
            born: Instant::now(),
            paused_until: AtomicU64::new(0),
        }
    }

    /// The in-memory backend, if that is the one.
    pub fn local_limiter(&self) -> Option<&Arc<LocalLimiter>> {
        self.local.as_ref()
    }

    fn elapsed_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn paused(&self) -> bool {
        self.elapsed_ms() < self.paused_until.load(Ordering::Relaxed)
    }

    /// Awaits `call` for at most the timeout (an error when it runs out).
    async fn within_timeout<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, LimiterError>>,
    ) -> Result<T, LimiterError> {
        match self.timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .unwrap_or_else(|_| Err(LimiterError::Unavailable("timed out".into()))),
            None => call.await,
        }
    }

    /// Runs one call within the timeout; `None` (counted, and calls paused) when it failed.
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, LimiterError>>,
    ) -> Option<T> {
        if self.paused() {
            Metrics::inc(&self.metrics.shadow_unavailable);
            return None;
        }
        match self.within_timeout(call).await {
            Ok(v) => Some(v),
            Err(e) => {
                Metrics::inc(&self.metrics.shadow_unavailable);
                self.paused_until.store(
                    self.elapsed_ms() + PAUSE_AFTER_FAILURE.as_millis() as u64,
                    Ordering::Relaxed,
                );
                tracing::debug!(error = %e, call = what, "shadow limiter unavailable");
                None
            }
        }
    }

    /// The shadow's decision for a request the enforced limits admitted; `None` when it could
    /// not be made.
    pub async fn reserve(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Option<Decision> {
        self.call(
            "reserve",
            self.limiter.reserve(workspace, limits, model, cost, now),
        )
        .await
    }

    /// Settles a shadow reservation to the request's actual tokens; `None` when it failed
    /// (dropped, counted).
    pub async fn settle(
        &self,
        reservation: &Reservation,
        limits: &Limits,
        actual: u64,
        now: Nanos,
    ) -> Option<Settled> {
        // Not skipped while paused: a settlement left out would hold its tokens and slot.
        let call = self.limiter.settle(reservation, limits, actual, now);
        match self.within_timeout(call).await {
            Ok(settled) => Some(settled),
            Err(e) => {
                Metrics::inc(&self.metrics.shadow_unavailable);
                tracing::debug!(error = %e, "shadow settlement dropped");
                None
            }
        }
    }

    /// Frees a shadow reservation's concurrency slot.
    pub async fn release_slot(&self, reservation: &mut Reservation) {
        let _ = self
            .call("release_slot", self.limiter.release_slot(reservation))
            .await;
    }
}
