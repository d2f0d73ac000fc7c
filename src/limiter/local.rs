//! The in-memory limiter for one instance: workspace states in a sharded map, each decision
//! under one shard lock. Memory is bounded by the active workspaces: `evict_idle` drops states
//! that are back to full and have been idle for a while. Eviction and the count of tracked
//! workspaces are this backend's own: a shared backend expires idle keys instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::core::{MonthKey, Nanos, TokenCost, Usage, Verdict, WorkspaceState};
use super::{Decision, Limiter, LimiterError, MonthSource, Reservation, ReservationId, Settled};
use crate::model::{Limits, WorkspaceId};

const SHARDS: usize = 64;

struct Entry {
    state: WorkspaceState,
    /// Reservations not yet settled: settling one twice, or one this state never made, changes
    /// nothing.
    live: HashSet<ReservationId>,
}

pub struct LocalLimiter {
    shards: Vec<Mutex<HashMap<WorkspaceId, Entry>>>,
    months: Arc<dyn MonthSource>,
}

impl LocalLimiter {
    pub fn new(months: Arc<dyn MonthSource>) -> Self {
        LocalLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            months,
        }
    }

    fn shard(&self, workspace: WorkspaceId) -> MutexGuard<'_, HashMap<WorkspaceId, Entry>> {
        let i = (workspace as u64 as usize) % SHARDS;
        // A panic while holding the lock cannot leave a state half-updated in a way that matters
        // more than losing the whole limiter, so a poisoned lock is used as is.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the workspace's entry for the current month, loading the month's ledger
    /// totals first when the state is new or belongs to an earlier month.
    async fn with_entry<T>(
        &self,
        workspace: WorkspaceId,
        now: Nanos,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Result<T, LimiterError> {
        {
            let mut map = self.shard(workspace);
            if let Some(entry) = map.get_mut(&workspace) {
                if !entry.state.month_is_stale(now) {
                    return Ok(f(entry));
                }
            }
        }
        let totals = self
            .months
            .month_totals(workspace, MonthKey::of(now), None)
            .await?;
        let mut map = self.shard(workspace);
        let entry = map.entry(workspace).or_insert_with(|| Entry {
            state: WorkspaceState::new(now, &totals),
            live: HashSet::new(),
        });
        entry.state.roll_month(now, &totals);
        Ok(f(entry))
    }

    /// Forgets workspaces that have nothing to remember; returns how many were dropped.
    pub fn evict_idle(
        &self,
        now: Nanos,
        idle_for: Nanos,
        limits_of: &dyn Fn(WorkspaceId) -> Option<Arc<Limits>>,
    ) -> usize {
        let mut evicted = 0;
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|ws, entry| {
                let state = &entry.state;
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

    /// What a workspace's month counters started from (the ledger's totals when it was first
    /// seen this month), once it is tracked.
    pub fn month_seeds(
        &self,
        workspace: WorkspaceId,
        now: Nanos,
    ) -> Option<(u64, std::collections::HashMap<String, u64>)> {
        let map = self.shard(workspace);
        let entry = map.get(&workspace)?;
        (!entry.state.month_is_stale(now)).then(|| entry.state.month_seeds())
    }

    /// Forgets every workspace.
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Workspaces whose state is held in memory.
    pub fn tracked_workspaces(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
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
        self.with_entry(workspace, now, |entry| {
            match entry.state.reserve(limits, model, cost, now) {
                (Verdict::Admit(held), snapshot) => {
                    let reservation = Reservation::new(workspace, held);
                    entry.live.insert(reservation.id);
                    Decision::Admit {
                        reservation,
                        snapshot,
                    }
                }
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
    ) -> Result<Settled, LimiterError> {
        // The state cannot have been evicted: it holds an unsettled reservation, so it is not idle.
        // A settlement in a new month rolls the counters over first (from the ledger, which
        // cannot hold this settlement yet), so that it counts in the month in which it lands.
        let settle = |entry: &mut Entry| {
            if entry.live.remove(&reservation.id) {
                entry.state.settle(limits, &reservation.held, actual, now);
            }
        };
        let stale = {
            let map = self.shard(reservation.workspace);
            map.get(&reservation.workspace)
                .is_some_and(|e| e.state.month_is_stale(now))
        };
        if stale {
            if let Err(e) = self.with_entry(reservation.workspace, now, settle).await {
                tracing::warn!(error = %e, "month rollover at settlement: ledger unavailable");
                let mut map = self.shard(reservation.workspace);
                if let Some(entry) = map.get_mut(&reservation.workspace) {
                    settle(entry);
                }
            }
        } else {
            let mut map = self.shard(reservation.workspace);
            if let Some(entry) = map.get_mut(&reservation.workspace) {
                settle(entry);
            }
        }
        Ok(Settled {
            at: now,
            counter: None,
        })
    }

    async fn release_slot(&self, reservation: &mut Reservation) -> Result<(), LimiterError> {
        let mut map = self.shard(reservation.workspace);
        if let Some(entry) = map.get_mut(&reservation.workspace) {
            if entry.live.contains(&reservation.id) {
                entry.state.release_slot(&mut reservation.held);
            }
        }
        Ok(())
    }

    async fn usage(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Result<Usage, LimiterError> {
        self.with_entry(workspace, now, |entry| entry.state.usage(limits, now))
            .await
    }
}
