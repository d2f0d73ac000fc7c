//! The in-memory limiter for one instance: workspace states in a sharded map, each decision
//! under one shard lock. Memory is bounded by the active workspaces: `evict_idle` drops states
//! that are back to full and have been idle for a while. Eviction and the count of tracked
//! workspaces are this backend's own: a shared backend expires idle keys instead.
//!
//! # Layout
//! A decision costs one lock and one lookup, and allocates nothing once a workspace is known:
//! - 64 shards by workspace id, each on its own cache lines, so that decisions for workspaces
//!   of different shards on different threads do not contend;
//! - per shard, a map from workspace id to a boxed `WorkspaceState` (a small bucket of 16 bytes
//!   in the map, whose growth by doubling then costs little), hashed with foldhash: the ids are
//!   the store's, never a client's choice;
//! - per shard, the ids of the reservations not yet settled (what makes settling idempotent):
//!   it holds what is in flight, not one set per workspace;
//! - per shard, the model names its states share (`ModelNames`), so a name is stored once per
//!   shard, not once per workspace, and a reservation holds it without copying it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::core::{ModelNames, MonthKey, Nanos, TokenCost, Usage, Verdict, WorkspaceState};
use super::{
    Answer, Decision, Limiter, LimiterError, MonthSource, Reservation, ReservationId, Settled,
};
use crate::model::{KeyId, Limits, WorkspaceId};

const SHARDS: usize = 64;

type Fast = foldhash::fast::RandomState;

#[derive(Default)]
struct Shard {
    states: HashMap<WorkspaceId, Box<WorkspaceState>, Fast>,
    /// Reservations not yet settled: settling one twice, or one this limiter never made,
    /// changes nothing.
    live: HashSet<ReservationId, Fast>,
    names: ModelNames,
}

/// A shard's lock on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Padded(Mutex<Shard>);

/// One workspace's state with what its shard shares.
struct Entry<'a> {
    state: &'a mut WorkspaceState,
    live: &'a mut HashSet<ReservationId, Fast>,
    names: &'a mut ModelNames,
}

pub struct LocalLimiter {
    shards: Box<[Padded]>,
    months: Arc<dyn MonthSource>,
}

impl LocalLimiter {
    pub fn new(months: Arc<dyn MonthSource>) -> Self {
        LocalLimiter {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            months,
        }
    }

    fn shard(&self, workspace: WorkspaceId) -> MutexGuard<'_, Shard> {
        let i = (workspace as u64 as usize) % SHARDS;
        // A panic while holding the lock cannot leave a state half-updated in a way that matters
        // more than losing the whole limiter, so a poisoned lock is used as is.
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the workspace's state when it is held for the current month (with a state
    /// for the key of `limits`, when it has limits of its own); gives `f` back when the month's
    /// totals must be read from the ledger first.
    fn try_entry<T, F: FnOnce(Entry<'_>) -> T>(
        &self,
        workspace: WorkspaceId,
        limits: Option<&Limits>,
        now: Nanos,
        f: F,
    ) -> Result<T, F> {
        let mut guard = self.shard(workspace);
        let Shard {
            states,
            live,
            names,
        } = &mut *guard;
        match states.get_mut(&workspace) {
            Some(state)
                if !state.month_is_stale(now) && !limits.is_some_and(|l| state.needs_key(l)) =>
            {
                Ok(f(Entry { state, live, names }))
            }
            _ => Err(f),
        }
    }

    /// Runs `f` on the workspace's entry for the current month, loading the month's ledger
    /// totals first when the state is new, belongs to an earlier month, or has no state yet for
    /// the key of `limits`.
    async fn with_entry<T, F: FnOnce(Entry<'_>) -> T>(
        &self,
        workspace: WorkspaceId,
        limits: Option<&Limits>,
        now: Nanos,
        f: F,
    ) -> Result<T, LimiterError> {
        let f = match self.try_entry(workspace, limits, now, f) {
            Ok(done) => return Ok(done),
            Err(f) => f,
        };
        let totals = self
            .months
            .month_totals(workspace, MonthKey::of(now), None)
            .await?;
        let mut guard = self.shard(workspace);
        let Shard {
            states,
            live,
            names,
        } = &mut *guard;
        let state = states
            .entry(workspace)
            .or_insert_with(|| Box::new(WorkspaceState::new_named(now, &totals, Some(names))));
        state.roll_month_named(now, &totals, Some(names));
        if let Some(k) = limits.and_then(|l| l.key) {
            state.add_key(k.id, &totals, now);
        }
        Ok(f(Entry { state, live, names }))
    }

    /// Forgets workspaces that have nothing to remember; returns how many were dropped.
    pub fn evict_idle(
        &self,
        now: Nanos,
        idle_for: Nanos,
        limits_of: &dyn Fn(WorkspaceId) -> Option<Arc<Limits>>,
    ) -> usize {
        let mut evicted = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.states.len();
            shard.states.retain(|ws, state| {
                now.saturating_sub(state.last_seen) < idle_for
                    || !state.is_idle(limits_of(*ws).as_deref(), now)
            });
            if shard.states.len() < before {
                evicted += before - shard.states.len();
                shard.names.prune();
            }
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
        let shard = self.shard(workspace);
        let state = shard.states.get(&workspace)?;
        (!state.month_is_stale(now)).then(|| state.month_seeds())
    }

    /// What key `key`'s month counter started from, once it is tracked this month.
    pub fn key_month_seed(&self, workspace: WorkspaceId, key: KeyId, now: Nanos) -> Option<u64> {
        let shard = self.shard(workspace);
        let state = shard.states.get(&workspace)?;
        if state.month_is_stale(now) {
            return None;
        }
        state.key_month_seed(key)
    }

    /// Forgets every workspace.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            shard.states.clear();
            shard.live.clear();
            shard.names.clear();
        }
    }

    /// Workspaces whose state is held in memory.
    pub fn tracked_workspaces(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).states.len())
            .sum()
    }
}

/// A decision for a workspace already held this month is made at once, under one shard lock,
/// with no future to box; only a new workspace (or a new month) waits for the ledger.
impl Limiter for LocalLimiter {
    fn reserve<'a>(
        &'a self,
        workspace: WorkspaceId,
        limits: &'a Limits,
        model: Option<&'a str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Answer<'a, Result<Decision, LimiterError>> {
        let decide = move |entry: Entry<'_>| {
            let Entry { state, live, names } = entry;
            match state.reserve_named(limits, model, cost, now, Some(names)) {
                (Verdict::Admit(held), snapshot) => {
                    let reservation = Reservation::new(workspace, held);
                    live.insert(reservation.id);
                    Decision::Admit {
                        reservation,
                        snapshot,
                    }
                }
                (Verdict::Deny(denial), snapshot) => Decision::Deny { denial, snapshot },
            }
        };
        match self.try_entry(workspace, Some(limits), now, decide) {
            Ok(decision) => Answer::now(Ok(decision)),
            Err(decide) => Answer::later(self.with_entry(workspace, Some(limits), now, decide)),
        }
    }

    fn settle<'a>(
        &'a self,
        reservation: &'a Reservation,
        limits: &'a Limits,
        actual: u64,
        now: Nanos,
    ) -> Answer<'a, Result<Settled, LimiterError>> {
        // The state cannot have been evicted: it holds an unsettled reservation, so it is not idle.
        // A settlement in a new month rolls the counters over first (from the ledger, which
        // cannot hold this settlement yet), so that it counts in the month in which it lands.
        let settle = move |entry: Entry<'_>| {
            if entry.live.remove(&reservation.id) {
                entry.state.settle(limits, &reservation.held, actual, now);
            }
        };
        let settled = Settled {
            at: now,
            counter: None,
        };
        let stale = {
            let mut guard = self.shard(reservation.workspace);
            let Shard {
                states,
                live,
                names,
            } = &mut *guard;
            match states.get_mut(&reservation.workspace) {
                Some(state) if state.month_is_stale(now) => true,
                Some(state) => {
                    settle(Entry { state, live, names });
                    false
                }
                None => false,
            }
        };
        if !stale {
            return Answer::now(Ok(settled));
        }
        Answer::later(async move {
            if let Err(e) = self
                .with_entry(reservation.workspace, None, now, settle)
                .await
            {
                tracing::warn!(error = %e, "month rollover at settlement: ledger unavailable");
                let mut guard = self.shard(reservation.workspace);
                let Shard {
                    states,
                    live,
                    names,
                } = &mut *guard;
                if let Some(state) = states.get_mut(&reservation.workspace) {
                    settle(Entry { state, live, names });
                }
            }
            Ok(settled)
        })
    }

    fn release_slot<'a>(
        &'a self,
        reservation: &'a mut Reservation,
    ) -> Answer<'a, Result<(), LimiterError>> {
        let mut shard = self.shard(reservation.workspace);
        let Shard { states, live, .. } = &mut *shard;
        if let Some(state) = states.get_mut(&reservation.workspace) {
            if live.contains(&reservation.id) {
                state.release_slot(&mut reservation.held);
            }
        }
        Answer::now(Ok(()))
    }

    fn usage<'a>(
        &'a self,
        workspace: WorkspaceId,
        limits: &'a Limits,
        now: Nanos,
    ) -> Answer<'a, Result<Usage, LimiterError>> {
        let view = move |entry: Entry<'_>| entry.state.usage(limits, now);
        match self.try_entry(workspace, Some(limits), now, view) {
            Ok(usage) => Answer::now(Ok(usage)),
            Err(view) => Answer::later(self.with_entry(workspace, Some(limits), now, view)),
        }
    }
}
