//! Time as the limiter sees it: nanoseconds since the Unix epoch, from a clock the app is given.
//! Production uses the system clock; tests use `ManualClock` and move time by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::limiter::{Nanos, NANOS_PER_SEC};

pub trait Clock: Send + Sync {
    fn now(&self) -> Nanos;

    fn now_secs(&self) -> i64 {
        (self.now() / NANOS_PER_SEC) as i64
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as Nanos)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: Nanos) -> Self {
        ManualClock(AtomicU64::new(start))
    }

    /// Starts at the system time now, so that months and days are realistic.
    pub fn starting_now() -> Self {
        ManualClock::new(SystemClock.now())
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, to: Nanos) {
        self.0.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.0.load(Ordering::SeqCst)
    }
}
