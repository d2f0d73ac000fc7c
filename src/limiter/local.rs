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
//!   through an index of 8-byte entries, each a tag of the id's hash (foldhash: the ids are the
//!   store's, never a client's choice) beside the state's position (`Index`). With a million
//!   workspaces a lookup misses the cache on the index's one line and then on the state; a
//!   hashbrown table of positions missed on its control bytes and then on the bucket as well,
//!   and a table of (id, box) pairs was four times as large;
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

/// The positions of a shard's states, by workspace id: open addressing with linear probing over
/// 8-byte entries, each the high half of the id's hash (its tag) and the position (plus one; 0
/// is empty). A lookup reads the entries from the tag's home on, so it finds the position in the
/// cache line it reads first, where a hashbrown table reads its control bytes and then, in
/// another line, the bucket: with a million workspaces both miss the cache, one after the other
/// (BENCHMARKS.md, "Micro-benchmarks"). The home is the tag's low bits, so growing and removing
/// need only the entries, never the states. At most three quarters full, so a probe is short.
/// Written here because no well-kept crate keeps the tag beside the value.
#[derive(Default)]
struct Index {
    entries: Box<[u64]>,
    len: usize,
}

impl Index {
    const EMPTY: u64 = 0;

    fn tag(hash: u64) -> u32 {
        (hash >> 32) as u32
    }

    fn entry(tag: u32, at: u32) -> u64 {
        (u64::from(tag) << 32) | (u64::from(at) + 1)
    }

    fn at(entry: u64) -> u32 {
        (entry as u32).wrapping_sub(1)
    }

    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    /// The slot holding the entry of `hash` for which `is` holds, if any.
    fn slot(&self, hash: u64, mut is: impl FnMut(u32) -> bool) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let tag = Self::tag(hash);
        let mask = self.mask();
        let mut i = tag as usize & mask;
        loop {
            let e = self.entries[i];
            if e == Self::EMPTY {
                return None;
            }
            if (e >> 32) as u32 == tag && is(Self::at(e)) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn find(&self, hash: u64, is: impl FnMut(u32) -> bool) -> Option<u32> {
        self.slot(hash, is).map(|i| Self::at(self.entries[i]))
    }

    fn insert(&mut self, hash: u64, at: u32) {
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.grow();
        }
        self.put(Self::entry(Self::tag(hash), at));
        self.len += 1;
    }

    fn put(&mut self, entry: u64) {
        let mask = self.mask();
        let mut i = (entry >> 32) as usize & mask;
        while self.entries[i] != Self::EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
    }

    fn grow(&mut self) {
        let size = (self.entries.len() * 2).max(8);
        let old = std::mem::replace(
            &mut self.entries,
            vec![Self::EMPTY; size].into_boxed_slice(),
        );
        for e in old.iter().copied().filter(|&e| e != Self::EMPTY) {
            self.put(e);
        }
    }

    /// Points the entry of `hash` at position `from` to `to`.
    fn repoint(&mut self, hash: u64, from: u32, to: u32) {
        if let Some(i) = self.slot(hash, |at| at == from) {
            self.entries[i] = Self::entry(Self::tag(hash), to);
        }
    }

    /// Removes the entry of `hash` at position `at`, moving back the entries after it that
    /// would otherwise no longer be found from their home (no tombstones).
    fn remove(&mut self, hash: u64, at: u32) {
        let Some(mut hole) = self.slot(hash, |a| a == at) else {
            return;
        };
        self.len -= 1;
        let mask = self.mask();
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let e = self.entries[i];
            if e == Self::EMPTY {
                break;
            }
            let home = (e >> 32) as usize & mask;
            // `e` may fill the hole unless its home lies cyclically in (hole, i].
            let stays = if hole <= i {
                hole < home && home <= i
            } else {
                hole < home || home <= i
            };
            if !stays {
                self.entries[hole] = e;
                hole = i;
            }
        }
        self.entries[hole] = Self::EMPTY;
    }

    fn clear(&mut self) {
        *self = Index::default();
    }
}

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
    index: Index,
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
            .find(hash, |at| Self::slot(chunks, at).0 == workspace)
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
                let hash = self.hasher.hash_one(workspace);
                self.index.insert(hash, at as u32);
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
        self.index.remove(hash, at as u32);
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
        self.index.repoint(hash, last_at as u32, at as u32);
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

    /// Counts `n` requests admitted elsewhere as in flight in the workspace's state, if held
    /// (`WorkspaceState::hold_slots`).
    pub fn hold_slots(&self, workspace: WorkspaceId, n: u32) {
        if let Some(state) = self.shard(workspace).states.get_mut(workspace) {
            state.hold_slots(n);
        }
    }

    /// One of the requests of `hold_slots` has ended.
    pub fn free_held_slot(&self, workspace: WorkspaceId) {
        if let Some(state) = self.shard(workspace).states.get_mut(workspace) {
            state.free_held_slot();
        }
    }

    /// Whether the workspace's state is held.
    pub fn holds(&self, workspace: WorkspaceId) -> bool {
        self.shard(workspace).states.get(workspace).is_some()
    }

    /// Sets the workspace's requests and tokens-per-minute buckets to `start` (requests,
    /// tokens; `(0.0, 0.0)` empties them), if its state is held
    /// (`WorkspaceState::drain_buckets_to`).
    pub fn drain(&self, workspace: WorkspaceId, limits: &Limits, now: Nanos, start: (f64, f64)) {
        if let Some(state) = self.shard(workspace).states.get_mut(workspace) {
            state.drain_buckets_to(limits, now, start);
        }
    }

    /// Reads the ledger's month totals again and has the workspace's state take them up
    /// (`WorkspaceState::reseed_month`), if it is held. The source's `catch_up` is called first;
    /// the ledger's own (`LedgerMonths`) does nothing there, so this process's settlements not
    /// yet flushed (at most one flush's) count only as far as the state had counted them.
    pub async fn reseed_month(
        &self,
        workspace: WorkspaceId,
        now: Nanos,
    ) -> Result<(), LimiterError> {
        self.months.catch_up().await;
        let totals = self
            .months
            .month_totals(workspace, MonthKey::of(now), None)
            .await?;
        if let Some(state) = self.shard(workspace).states.get_mut(workspace) {
            state.reseed_month(now, &totals);
        }
        Ok(())
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

    /// The index against a `HashMap` through random inserts, removals and moves, with hashes
    /// whose tags crowd a few homes (so probes run long and wrap past the table's end), and
    /// some tags shared by several positions.
    #[test]
    fn the_index_finds_every_position_through_collisions_and_removals() {
        let mut index = Index::default();
        let mut model: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // A tag's low bits are its home: 0xf_ffff is the last slot of any table up to 2^20
        // entries, so its probes wrap to the start, where those of 0 begin.
        let hash_of = |at: u32| -> u64 {
            let tag = match at % 8 {
                0..4 => [0xf_ffffu32, 0xf_fffe, 0, 7][at as usize % 4] ^ ((at / 64) << 20),
                // Spread, as real hashes are, with some tags shared.
                _ => (at / 2).wrapping_mul(0x9e37_79b9),
            };
            (u64::from(tag) << 32) | u64::from(at)
        };
        let mut next_at = 0u32;
        // Growing for the first half, then shrinking.
        for round in 0..8_000 {
            let r = next();
            let insert = if round < 4_000 {
                r % 3 != 0
            } else {
                r % 3 == 0
            };
            if model.is_empty() || insert {
                let at = next_at;
                next_at += 1;
                index.insert(hash_of(at), at);
                model.insert(at, hash_of(at));
            } else {
                let keys: Vec<u32> = model.keys().copied().collect();
                let at = keys[(r as usize / 3) % keys.len()];
                let hash = model.remove(&at).unwrap();
                if r % 2 == 0 {
                    index.remove(hash, at);
                } else {
                    // Moved to a new position, as a removal moves the last state.
                    let to = next_at;
                    next_at += 1;
                    index.repoint(hash, at, to);
                    model.insert(to, hash);
                }
            }
            assert_eq!(index.len, model.len(), "round {round}");
            if round % 250 == 0 || round > 7_950 {
                for (&at, &hash) in &model {
                    assert_eq!(index.find(hash, |a| a == at), Some(at), "round {round}");
                }
                let used = index.entries.iter().filter(|&&e| e != Index::EMPTY).count();
                assert_eq!(used, model.len());
                assert!(index.len * 4 <= index.entries.len() * 3);
            }
        }
        // A tag never inserted finds nothing.
        assert_eq!(index.find(0xdead_beef << 32, |_| true), None);
        index.clear();
        assert_eq!((index.len, index.entries.len()), (0, 0));
        assert_eq!(index.find(7 << 32, |_| true), None);
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
