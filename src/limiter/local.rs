//! The in-memory limiter for one instance: workspace states in a sharded map, each decision
//! under one shard lock. Memory is bounded by the active workspaces: `evict_idle` drops states
//! that are back to full and have been idle for a while. Eviction and the count of tracked
//! workspaces are this backend's own: a shared backend expires idle keys instead.
//!
//! # Layout
//! A decision costs one lock and one lookup, and allocates nothing once a workspace is known:
//! - 64 shards by workspace id, each on its own cache lines, so that decisions for workspaces
//!   of different shards on different threads do not contend;
//! - per shard, the workspace states (`States`): held unboxed in fixed chunks, and found
//!   through a hash table of 4-byte indices, hashed with foldhash (the ids are the store's,
//!   never a client's choice). With a million workspaces the table is a few megabytes and mostly
//!   stays in the processor's cache, so a decision's one miss is the state itself; a table of
//!   (id, box) pairs was four times as large and added a miss;
//! - per shard, the ids of the reservations not yet settled (what makes settling idempotent):
//!   it holds what is in flight, not one set per workspace;
//! - per shard, the model names its states share (`ModelNames`), so a name is stored once per
//!   shard, not once per workspace, and a reservation holds it without copying it.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use super::core::{ModelNames, MonthKey, Nanos, TokenCost, Usage, Verdict, WorkspaceState};
use super::{
    Answer, Decision, Limiter, LimiterError, MonthSource, Reservation, ReservationId, Settled,
};
use crate::model::{KeyId, Limits, WorkspaceId};

const SHARDS: usize = 64;

type Fast = foldhash::fast::RandomState;

/// States per chunk: a shard holds at most one chunk's worth of room unused (about 64 KB; 4 MB
/// over the 64 shards, once they hold a few thousand workspaces). The first chunk grows by
/// doubling from `FIRST`, so that a shard with a few workspaces takes a few kilobytes.
const CHUNK: usize = 512;
const FIRST: usize = 8;

/// A shard's workspace states: dense, in chunks of `CHUNK` (which, but for the first, never
/// move once allocated), and found through a table of their positions. Removing one moves the
/// last state into its place. Written here because no well-kept crate keeps the values unboxed without slack: indexmap's
/// entries grow to its index's capacity (up to twice the states held), and move when they grow.
#[derive(Default)]
struct States {
    /// Positions in `chunks`, hashed by the workspace id held there.
    index: hashbrown::HashTable<u32>,
    chunks: Vec<Vec<(WorkspaceId, WorkspaceState)>>,
    len: usize,
    hasher: Fast,
}

impl States {
    fn slot(
        chunks: &[Vec<(WorkspaceId, WorkspaceState)>],
        at: u32,
    ) -> &(WorkspaceId, WorkspaceState) {
        let at = at as usize;
        &chunks[at / CHUNK][at % CHUNK]
    }

    fn slot_mut(&mut self, at: usize) -> &mut (WorkspaceId, WorkspaceState) {
        &mut self.chunks[at / CHUNK][at % CHUNK]
    }

    fn position(&self, workspace: WorkspaceId) -> Option<u32> {
        let hash = self.hasher.hash_one(workspace);
        let chunks = &self.chunks;
        self.index
            .find(hash, |&at| Self::slot(chunks, at).0 == workspace)
            .copied()
    }

    fn get(&self, workspace: WorkspaceId) -> Option<&WorkspaceState> {
        let at = self.position(workspace)?;
        Some(&Self::slot(&self.chunks, at).1)
    }

    fn get_mut(&mut self, workspace: WorkspaceId) -> Option<&mut WorkspaceState> {
        let at = self.position(workspace)?;
        Some(&mut self.slot_mut(at as usize).1)
    }

    fn get_or_insert_with(
        &mut self,
        workspace: WorkspaceId,
        new: impl FnOnce() -> WorkspaceState,
    ) -> &mut WorkspaceState {
        let at = match self.position(workspace) {
            Some(at) => at as usize,
            None => {
                let at = self.len;
                if at.is_multiple_of(CHUNK) {
                    self.chunks
                        .push(Vec::with_capacity(if at == 0 { FIRST } else { CHUNK }));
                }
                let chunk = &mut self.chunks[at / CHUNK];
                if chunk.len() == chunk.capacity() {
                    chunk.reserve_exact((2 * chunk.capacity()).min(CHUNK) - chunk.len());
                }
                chunk.push((workspace, new()));
                self.len += 1;
                let (hasher, chunks) = (&self.hasher, &self.chunks);
                let hash = hasher.hash_one(workspace);
                self.index.insert_unique(hash, at as u32, |&i| {
                    hasher.hash_one(Self::slot(chunks, i).0)
                });
                at
            }
        };
        &mut self.slot_mut(at).1
    }

    /// Keeps the states for which `keep` is true.
    fn retain(&mut self, mut keep: impl FnMut(WorkspaceId, &WorkspaceState) -> bool) {
        let mut at = 0;
        while at < self.len {
            let (id, state) = Self::slot(&self.chunks, at as u32);
            if keep(*id, state) {
                at += 1;
            } else {
                self.remove_at(at);
            }
        }
    }

    /// Removes the state at `at`, moving the last state into its place.
    fn remove_at(&mut self, at: usize) {
        let id = self.slot_mut(at).0;
        let hash = self.hasher.hash_one(id);
        if let Ok(entry) = self.index.find_entry(hash, |&i| i as usize == at) {
            entry.remove();
        }
        let last_at = self.len - 1;
        let last = self.chunks[last_at / CHUNK]
            .pop()
            .expect("the last chunk holds the last state");
        if self.chunks[last_at / CHUNK].is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        if at == last_at {
            return;
        }
        let hash = self.hasher.hash_one(last.0);
        if let Some(i) = self.index.find_mut(hash, |&i| i as usize == last_at) {
            *i = at as u32;
        }
        *self.slot_mut(at) = last;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.index.clear();
        self.chunks.clear();
        self.len = 0;
    }
}

#[derive(Default)]
struct Shard {
    states: States,
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
        match states.get_mut(workspace) {
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
        let state = states.get_or_insert_with(workspace, || {
            WorkspaceState::new_named(now, &totals, Some(names))
        });
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
                    || !state.is_idle(limits_of(ws).as_deref(), now)
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
        let state = shard.states.get(workspace)?;
        (!state.month_is_stale(now)).then(|| state.month_seeds())
    }

    /// What key `key`'s month counter started from, once it is tracked this month.
    pub fn key_month_seed(&self, workspace: WorkspaceId, key: KeyId, now: Nanos) -> Option<u64> {
        let shard = self.shard(workspace);
        let state = shard.states.get(workspace)?;
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
            match states.get_mut(reservation.workspace) {
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
                if let Some(state) = states.get_mut(reservation.workspace) {
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
        if let Some(state) = states.get_mut(reservation.workspace) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::core::MonthTotals;

    fn state(last_seen: Nanos) -> WorkspaceState {
        let mut s = WorkspaceState::new(0, &MonthTotals::default());
        s.last_seen = last_seen;
        s
    }

    /// The table against a `HashMap` through inserts across chunks and removals from the
    /// middle, the end and the first chunk: every id finds its own state, and only its own.
    #[test]
    fn the_states_table_finds_each_state_after_removals_move_others() {
        let mut states = States::default();
        let mut model = std::collections::HashMap::new();
        let n = (3 * CHUNK + 7) as WorkspaceId;
        for ws in 0..n {
            let s = states.get_or_insert_with(ws * 7919, || state(ws as Nanos));
            assert_eq!(s.last_seen, ws as Nanos);
            model.insert(ws * 7919, ws as Nanos);
        }
        // Inserting again finds the state: nothing new is made.
        states.get_or_insert_with(7919, || panic!("made twice"));
        // Drop every third, the last one and the first chunk's first.
        states.retain(|ws, s| !(s.last_seen % 3 == 1 || ws == (n - 1) * 7919 || ws == 0));
        model.retain(|&ws, seen| !(*seen % 3 == 1 || ws == (n - 1) * 7919 || ws == 0));
        assert_eq!(states.len(), model.len());
        assert_eq!(states.chunks.len(), model.len().div_ceil(CHUNK));
        for ws in 0..n {
            let id = ws * 7919;
            assert_eq!(
                states.get(id).map(|s| s.last_seen),
                model.get(&id).copied(),
                "workspace {id}"
            );
        }
        // Removing everything leaves nothing behind, and the table is usable again.
        states.retain(|_, _| false);
        assert_eq!((states.len(), states.chunks.len()), (0, 0));
        assert!(states.get(7919 * 2).is_none());
        states.get_or_insert_with(5, || state(9));
        assert_eq!(states.get(5).map(|s| s.last_seen), Some(9));
    }
}
