//! The in-memory limiter for one instance: workspace states in a sharded map, each decision
//! under one shard lock. Memory is bounded by the active workspaces: `evict_idle` drops states
//! that are back to full and have been idle for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::core::{MonthKey, Nanos, TokenCost, Usage, Verdict, WorkspaceState};
use super::{Decision, Limiter, LimiterError, MonthSource, Reservation};
use crate::model::{Limits, WorkspaceId};

const SHARDS: usize = 64;

pub struct LocalLimiter {
    shards: Vec<Mutex<HashMap<WorkspaceId, WorkspaceState>>>,
    months: Arc<dyn MonthSource>,
}

impl LocalLimiter {
    pub fn new(months: Arc<dyn MonthSource>) -> Self {
        LocalLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            months,
        }
    }

    fn shard(
        &self,
        workspace: WorkspaceId,
    ) -> MutexGuard<'_, HashMap<WorkspaceId, WorkspaceState>> {
        let i = (workspace as u64 as usize) % SHARDS;
        // A panic while holding the lock cannot leave a state half-updated in a way that matters
        // more than losing the whole limiter, so a poisoned lock is used as is.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the workspace's state for the current month, loading the month's ledger
    /// totals first when the state is new or belongs to an earlier month.
    async fn with_state<T>(
        &self,
        workspace: WorkspaceId,
        now: Nanos,
        f: impl FnOnce(&mut WorkspaceState) -> T,
    ) -> Result<T, LimiterError> {
        {
            let mut map = self.shard(workspace);
            if let Some(state) = map.get_mut(&workspace) {
                if !state.month_is_stale(now) {
                    return Ok(f(state));
                }
            }
        }
        let totals = self
            .months
            .month_totals(workspace, MonthKey::of(now))
            .await?;
        let mut map = self.shard(workspace);
        let state = map
            .entry(workspace)
            .or_insert_with(|| WorkspaceState::new(now, &totals));
        state.roll_month(now, &totals);
        Ok(f(state))
    }
}

#[async_trait]
impl Limiter for LocalLimiter {
    async fn reserve(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Result<Decision, LimiterError> {
        self.with_state(workspace, now, |state| {
            match state.reserve(limits, model, cost, now) {
                (Verdict::Admit(held), snapshot) => Decision::Admit {
                    reservation: Reservation { workspace, held },
                    snapshot,
                },
                (Verdict::Deny(denial), snapshot) => Decision::Deny { denial, snapshot },
            }
        })
        .await
    }

    async fn settle(
        &self,
        reservation: &Reservation,
        limits: &Limits,
        actual: u64,
        now: Nanos,
    ) -> Result<(), LimiterError> {
        // The state cannot have been evicted: it holds an unsettled reservation, so it is not idle.
        let mut map = self.shard(reservation.workspace);
        if let Some(state) = map.get_mut(&reservation.workspace) {
            state.settle(limits, &reservation.held, actual, now);
        }
        Ok(())
    }

    async fn release_slot(&self, reservation: &mut Reservation) -> Result<(), LimiterError> {
        let mut map = self.shard(reservation.workspace);
        if let Some(state) = map.get_mut(&reservation.workspace) {
            state.release_slot(&mut reservation.held);
        }
        Ok(())
    }

    async fn usage(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Result<Usage, LimiterError> {
        self.with_state(workspace, now, |state| state.usage(limits, now))
            .await
    }

    fn evict_idle(
        &self,
        now: Nanos,
        idle_for: Nanos,
        limits_of: &dyn Fn(WorkspaceId) -> Option<Arc<Limits>>,
    ) -> usize {
        let mut evicted = 0;
        for i in 0..SHARDS {
            let mut map = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|ws, state| {
                let keep = now.saturating_sub(state.last_seen) < idle_for
                    || !state.is_idle(limits_of(*ws).as_deref(), now);
                if !keep {
                    evicted += 1;
                }
                keep
            });
        }
        evicted
    }

    fn tracked_workspaces(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}
