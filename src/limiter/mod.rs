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
pub mod failover;
pub mod local;
pub mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use async_trait::async_trait;

pub use self::core::{
    Denial, DenialKind, Held, LimitName, ModelName, ModelUsage, MonthKey, MonthTotals, Nanos,
    Snapshot, TokenCost, Usage, Verdict, Window, NANOS_PER_SEC,
};
use crate::model::{Limits, WorkspaceId};

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// The backend (Redis) did not answer in time or failed.
    #[error("limiter backend unavailable: {0}")]
    Unavailable(String),
    /// The ledger could not be read to start a month counter.
    #[error("ledger unavailable: {0}")]
    Ledger(String),
}

/// Names one reservation across every instance: a random 64-bit prefix drawn once per process
/// and a counter, so that ids never repeat without a random draw per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(pub u128);

impl ReservationId {
    pub fn next() -> ReservationId {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = *PREFIX.get_or_init(|| {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).expect("the OS has randomness");
            u64::from_le_bytes(bytes)
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        ReservationId(((prefix as u128) << 64) | n as u128)
    }

    /// The id as 32 lowercase hex digits (as `Display` writes it).
    pub fn hex(&self) -> String {
        crate::hex(&self.0.to_be_bytes())
    }

    /// `hex`, on the stack: two are written per call to Redis.
    pub fn hex_digits(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.to_be_bytes().iter().enumerate() {
            out[2 * i] = DIGITS[(b >> 4) as usize];
            out[2 * i + 1] = DIGITS[(b & 15) as usize];
        }
        out
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Which backend holds a reservation. A shared limiter that fell back (see `failover`) settles
/// each reservation where it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The limiter that made the decision (the in-memory one, or the shared one).
    Primary,
    /// The in-memory share used while the shared backend was unreachable.
    LocalShare,
    /// Admitted without any limiter while the shared backend was unreachable (policy `open`).
    Unmetered,
}

/// What an admitted request holds until it is settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub id: ReservationId,
    pub workspace: WorkspaceId,
    pub held: Held,
    pub origin: Origin,
    /// Its answer must not end before its settlement has been taken: a shared limiter admitted
    /// it holding a concurrency slot. Settled after the answer, its slot would still look taken
    /// for a moment to the other instances, and a client that sends its next request through
    /// another one as soon as this one ends would be refused for a concurrency it is not using
    /// (see ARCHITECTURE.md, "Settlement after the answer").
    pub settle_before_answer: bool,
}

impl Reservation {
    pub fn new(workspace: WorkspaceId, held: Held) -> Self {
        Reservation {
            id: ReservationId::next(),
            workspace,
            held,
            origin: Origin::Primary,
            settle_before_answer: false,
        }
    }
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

/// How a settlement was counted, for the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settled {
    /// When it counted, on the limiter's clock (the Redis server's in service): the ledger's
    /// day and month follow it, so the ledger and the counter agree on the month.
    pub at: Nanos,
    /// The generation of the shared month counter that counted it, if any (see `redis`).
    pub counter: Option<String>,
}

/// Where month counters start from: the ledger's settled totals for a workspace and month,
/// leaving out what the shared counter generation `excluding` has counted itself.
#[async_trait]
pub trait MonthSource: Send + Sync {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding: Option<&str>,
    ) -> Result<MonthTotals, LimiterError>;

    /// Brings the source up to what this process has settled: called before a new shared
    /// counter generation is first based on it. The ledger's source has its writer settle the
    /// settlements it deferred and write what it holds (see `usage::CatchUp`); by default,
    /// nothing.
    async fn catch_up(&self) {}
}

/// What a `Limiter` call answers, to be awaited: either at once (the in-memory limiter, whose
/// decisions then cost no allocation) or later (a boxed future, for a backend that waits on the
/// network or a month total from the ledger).
pub enum Answer<'a, T> {
    Now(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> Answer<'a, T> {
    pub fn now(value: T) -> Self {
        Answer::Now(Some(value))
    }

    pub fn later(future: impl Future<Output = T> + Send + 'a) -> Self {
        Answer::Later(Box::pin(future))
    }
}

impl<T: Unpin> Future for Answer<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            Answer::Now(value) => Poll::Ready(value.take().expect("an answer is awaited once")),
            Answer::Later(future) => future.as_mut().poll(cx),
        }
    }
}

/// A limiter backend. Every call takes `now`, the caller's clock; a backend may keep a clock of
/// its own (the Redis server's), in which case the times it answers are relative to that.
pub trait Limiter: Send + Sync {
    fn reserve<'a>(
        &'a self,
        workspace: WorkspaceId,
        limits: &'a Limits,
        model: Option<&'a str>,
        cost: TokenCost,
        now: Nanos,
    ) -> Answer<'a, Result<Decision, LimiterError>>;

    /// Settles `reservation` to `actual` tokens (0 refunds). Idempotent by reservation id: a
    /// second call for the same reservation changes nothing and answers as the first did.
    fn settle<'a>(
        &'a self,
        reservation: &'a Reservation,
        limits: &'a Limits,
        actual: u64,
        now: Nanos,
    ) -> Answer<'a, Result<Settled, LimiterError>>;

    /// Frees the reservation's concurrency slot now; its tokens are settled later.
    fn release_slot<'a>(
        &'a self,
        reservation: &'a mut Reservation,
    ) -> Answer<'a, Result<(), LimiterError>>;

    /// The workspace's state now, without taking anything.
    fn usage<'a>(
        &'a self,
        workspace: WorkspaceId,
        limits: &'a Limits,
        now: Nanos,
    ) -> Answer<'a, Result<Usage, LimiterError>>;

    /// At a stop, once no request is decided any more: what the backend does to leave. The
    /// shared limiter takes this instance out of the live ones at once; by default, nothing.
    fn leave(&self) -> Answer<'_, ()> {
        Answer::now(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids and model ids sent to Redis are the same text as `format!` wrote before: keys and
    /// records written by an earlier version are still found.
    #[test]
    fn ids_are_written_as_format_wrote_them() {
        let values = [
            0u128,
            1,
            0xf,
            0x10,
            0xdead_beef,
            u64::MAX as u128,
            (0x5c16_7f8d_9922_3388u128 << 64) | 0x2a,
            u128::MAX,
        ];
        for v in values {
            assert_eq!(ReservationId(v).hex(), format!("{v:032x}"));
            assert_eq!(
                ReservationId(v).hex_digits(),
                format!("{v:032x}").as_bytes()
            );
            assert_eq!(ReservationId(v).to_string(), format!("{v:032x}"));
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(b"mistral-small-latest");
        let before: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(redis::model_id("mistral-small-latest"), before);
    }
}
