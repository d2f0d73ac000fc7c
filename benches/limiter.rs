//! Decisions per second of the limiter, without I/O: the pure core, and the in-memory backend
//! across many workspaces. `cargo bench --bench limiter` measures; under `cargo test` it only
//! runs a few iterations to prove it still works.
//!
//! Written by hand rather than with criterion: a handful of throughput figures does not need a
//! statistics framework, and criterion would add its dependency tree to every test build.

use std::sync::Arc;
use std::time::Instant;

use tiergate::limiter::core::WorkspaceState;
use tiergate::limiter::local::LocalLimiter;
use tiergate::limiter::{
    Decision, Limiter, LimiterError, MonthKey, MonthSource, MonthTotals, TokenCost,
};
use tiergate::model::{
    Limits, ModelLimits, WorkspaceId, MAX_TOKENS_PER_MINUTE, MAX_TOKENS_PER_MONTH,
};

struct EmptyLedger;

#[async_trait::async_trait]
impl MonthSource for EmptyLedger {
    async fn month_totals(
        &self,
        _: WorkspaceId,
        month: MonthKey,
        _: Option<&str>,
    ) -> Result<MonthTotals, LimiterError> {
        Ok(MonthTotals {
            month: Some(month),
            ..MonthTotals::default()
        })
    }
}

fn limits() -> Limits {
    let mut l = Limits {
        requests_per_second: Some(1e6),
        burst: None,
        tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
        tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
        concurrent_requests: Some(1_000_000),
        models: Default::default(),
    };
    l.models.insert(
        "m".into(),
        ModelLimits {
            tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
            tokens_per_month: None,
        },
    );
    l.validate().expect("the largest valid limits");
    l
}

fn report(name: &str, n: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{name:<48} {:>12.0} decisions/s  {:>8.1} ns/decision",
        n as f64 / secs,
        secs * 1e9 / n as f64
    );
}

fn core(n: u64) {
    let limits = limits();
    let mut now = 1_800_000_000_000_000_000;
    let mut state = WorkspaceState::new(now, &MonthTotals::default());
    let cost = TokenCost {
        prompt: 20,
        estimate: 300,
    };
    let started = Instant::now();
    for _ in 0..n {
        now += 1_000;
        match state.reserve(&limits, Some("m"), cost, now).0 {
            tiergate::limiter::Verdict::Admit(held) => state.settle(&limits, &held, 250, now),
            tiergate::limiter::Verdict::Deny(d) => panic!("denied: {d:?}"),
        }
    }
    report("core: reserve + settle, all limits, one model", n, started);
}

async fn local(n: u64, workspaces: i64) {
    let limiter = Arc::new(LocalLimiter::new(Arc::new(EmptyLedger)));
    let limits = limits();
    let cost = TokenCost {
        prompt: 20,
        estimate: 300,
    };
    let mut now = 1_800_000_000_000_000_000;
    let started = Instant::now();
    for i in 0..n {
        now += 1_000;
        let ws = (i as i64) % workspaces;
        let d = limiter
            .reserve(ws, &limits, Some("m"), cost, now)
            .await
            .unwrap();
        let Decision::Admit { reservation, .. } = d else {
            panic!("denied")
        };
        limiter
            .settle(&reservation, &limits, 250, now)
            .await
            .unwrap();
    }
    report(
        &format!("local: reserve + settle over {workspaces} workspaces"),
        n,
        started,
    );
    assert_eq!(
        limiter.tracked_workspaces() as i64,
        workspaces.min(n as i64)
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 2_000_000 } else { 1_000 };
    core(n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(local(n, 1));
    rt.block_on(local(n, 10_000));
}
