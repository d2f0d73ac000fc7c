//! The limiter: decides, in one atomic step per request, whether a workspace may send it.
//!
//! # Design
//! A request goes through **reserve → forward → settle**:
//! 1. `reserve` checks every limit of the workspace (requests/s by GCRA, tokens/minute by a
//!    continuously refilled bucket, tokens/month against the calendar month, concurrent
//!    requests, per-model limits) and, only if all admit, takes from all of them. A denied
//!    request changes nothing. What is taken for tokens is an *estimate* (see `estimate`), capped
//!    by the smallest token capacity so that a request whose prompt fits can always get in.
//! 2. The request is forwarded while the estimate is held.
//! 3. `settle` replaces the estimate with the usage the upstream reported (0 refunds), which may
//!    put the bucket into debt; the concurrency slot is freed.
//!
//! Invariant: reservations never exceed a limit. Settled usage overshoots a limit only by what
//! was underestimated for the requests in flight at the time.
//!
//! The arithmetic lives in `core` and does no I/O. `Limiter` is the interface a backend
//! implements: `local` keeps state in memory for one instance; a shared backend (Redis) implements
//! the same calls with one script per decision. Month counters start from the durable ledger
//! (`MonthSource`), so a restart loses at most what was in flight or not yet flushed.

pub mod core;
pub mod local;

use std::sync::Arc;

use async_trait::async_trait;

pub use self::core::{
    Denial, DenialKind, Held, LimitName, MonthKey, MonthTotals, Nanos, Snapshot, TokenCost, Usage,
    Verdict, Window, NANOS_PER_SEC,
};
use crate::model::{Limits, WorkspaceId};

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("limiter backend unavailable: {0}")]
    Unavailable(String),
}

/// What an admitted request holds until it is settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub workspace: WorkspaceId,
    pub held: Held,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Admit {
        reservation: Reservation,
        snapshot: Snapshot,
    },
    Deny {
        denial: Denial,
        snapshot: Snapshot,
    },
}

/// Where month counters start from: the ledger's settled totals for a workspace and month.
#[async_trait]
pub trait MonthSource: Send + Sync {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
    ) -> Result<MonthTotals, LimiterError>;
}

/// A limiter backend. Every call takes `now`, so the clock is the caller's (tests inject one).
#[async_trait]
pub trait Limiter: Send + Sync {
    async fn reserve(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        model: Option<&str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Result<Decision, LimiterError>;

    /// Settles `reservation` to `actual` tokens (0 refunds). Called exactly once per admission.
    async fn settle(
        &self,
        reservation: &Reservation,
        limits: &Limits,
        actual: u64,
        now: Nanos,
    ) -> Result<(), LimiterError>;

    /// Frees the reservation's concurrency slot now; its tokens are settled later.
    async fn release_slot(&self, reservation: &mut Reservation) -> Result<(), LimiterError>;

    /// The workspace's state now, without taking anything.
    async fn usage(
        &self,
        workspace: WorkspaceId,
        limits: &Limits,
        now: Nanos,
    ) -> Result<Usage, LimiterError>;

    /// Forgets workspaces that have nothing to remember; returns how many were dropped.
    fn evict_idle(
        &self,
        now: Nanos,
        idle_for: Nanos,
        limits_of: &dyn Fn(WorkspaceId) -> Option<Arc<Limits>>,
    ) -> usize;

    /// Workspaces whose state is held in memory.
    fn tracked_workspaces(&self) -> usize;
}
