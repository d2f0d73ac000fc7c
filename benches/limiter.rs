//! Micro-benchmarks of the limiter and the estimate, without I/O. `cargo bench --bench limiter`
//! measures; under `cargo test` every case runs a few iterations only, to prove it still works.
//!
//! Cases (each timed as `SAMPLES` batches; the median batch is reported, with the fastest):
//! - one decision (`reserve`) over three limits (requests/s, tokens/min, tokens/month) for one
//!   workspace, in the pure core and through `LocalLimiter` as the gateway calls it;
//! - the same through `LocalLimiter` with 100k and 1M workspaces in the table, visited in a
//!   scattered order so that most states are out of the caches;
//! - two threads deciding for one workspace;
//! - the settle step;
//! - the token estimate of a 4 KiB and a 64 KiB prompt (`estimate::inspect` + `Estimator`);
//! - allocations per decision and per settlement, counted by the global allocator below, and
//!   the limiter's heap per active workspace (growth over 1M workspaces, divided by 1M).
//!
//! Written by hand rather than with criterion or divan: both would add their dependency trees
//! (criterion: clap, serde, plotters, rayon…; divan: clap and a proc-macro crate) to every
//! `cargo test --all-targets` build on a 2-core machine, for a handful of figures that a median
//! of batches gives as well. A counting `#[global_allocator]` is a dozen lines either way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tiergate::estimate::{inspect, Endpoint, Estimator};
use tiergate::limiter::core::WorkspaceState;
use tiergate::limiter::local::LocalLimiter;
use tiergate::limiter::{
    Decision, Limiter, LimiterError, MonthKey, MonthSource, MonthTotals, Nanos, Reservation,
    TokenCost, Verdict,
};
use tiergate::model::{Limits, WorkspaceId, MAX_TOKENS_PER_MINUTE, MAX_TOKENS_PER_MONTH};

// ---------------------------------------------------------------------------------------------
// Counting allocator
// ---------------------------------------------------------------------------------------------

/// The system allocator, counting calls and live bytes (as requested, not as malloc rounds them).
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as u64, Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as u64, Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        LIVE_BYTES.fetch_add(new_size as u64, Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.load(Relaxed)
}

fn live_bytes() -> u64 {
    LIVE_BYTES.load(Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

struct Run {
    full: bool,
}

impl Run {
    fn samples(&self) -> usize {
        if self.full {
            21
        } else {
            2
        }
    }

    /// `n` in a measuring run, a few under `cargo test`.
    fn n(&self, n: usize) -> usize {
        if self.full {
            n
        } else {
            n.min(64)
        }
    }
}

/// Median and fastest of per-sample nanoseconds per operation.
fn report(name: &str, mut per_op: Vec<f64>, extra: &str) {
    per_op.sort_by(f64::total_cmp);
    let median = per_op[per_op.len() / 2];
    println!(
        "{name:<58} median {median:>9.1} ns  min {:>9.1} ns{extra}",
        per_op[0]
    );
}

/// Polls a future that a local limiter completes at once; spins on the rare `Pending` (a month
/// total being read from the test ledger, which is ready at once too).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

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

/// Requests/s, tokens/minute and tokens/month, high enough that nothing is denied: one request
/// per microsecond is exactly the refill of 1M requests/s.
fn three_limits() -> Limits {
    let l = Limits {
        requests_per_second: Some(1e6),
        burst: None,
        tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
        tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
        concurrent_requests: None,
        models: Default::default(),
        key: None,
    };
    l.validate().expect("valid limits");
    l
}

const COST: TokenCost = TokenCost {
    prompt: 20,
    estimate: 300,
};
/// A request names its model; this one has no limits of its own (the state still counts its
/// month usage apart, as for every model).
const MODEL: Option<&str> = Some("mistral-small-latest");
/// Mid-month: 2027-01-15.
const START: Nanos = 1_800_000_000_000_000_000;

fn local_limiter() -> LocalLimiter {
    LocalLimiter::new(Arc::new(EmptyLedger))
}

fn reserve(l: &LocalLimiter, ws: WorkspaceId, limits: &Limits, now: Nanos) -> Reservation {
    match ready(l.reserve(ws, limits, MODEL, COST, now)) {
        Ok(Decision::Admit { reservation, .. }) => reservation,
        other => panic!("not admitted: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// Reservations held at once in a timed batch before they are settled: a few hundred requests in
/// flight, as in a busy gateway.
const IN_FLIGHT: usize = 256;

/// Per sample, `rounds` batches of `IN_FLIGHT` reservations, then their settlements; returns the
/// nanoseconds per reserve and per settle of each sample, and the allocations per reserve and
/// per settle of the last sample.
fn reserve_then_settle<H>(
    run: &Run,
    rounds: usize,
    mut reserve: impl FnMut() -> H,
    mut settle: impl FnMut(&H),
) -> (Vec<f64>, Vec<f64>, f64, f64) {
    let mut held = Vec::with_capacity(IN_FLIGHT);
    let (mut reserve_ns, mut settle_ns) = (Vec::new(), Vec::new());
    let (mut reserve_allocs, mut settle_allocs) = (0, 0);
    for _ in 0..run.samples() {
        let (mut r_ns, mut s_ns) = (0u128, 0u128);
        (reserve_allocs, settle_allocs) = (0, 0);
        for _ in 0..rounds {
            let a = allocs();
            let t = Instant::now();
            for _ in 0..IN_FLIGHT {
                held.push(reserve());
            }
            r_ns += t.elapsed().as_nanos();
            reserve_allocs += allocs() - a;
            let a = allocs();
            let t = Instant::now();
            for h in &held {
                settle(h);
            }
            s_ns += t.elapsed().as_nanos();
            settle_allocs += allocs() - a;
            held.clear();
        }
        let ops = (rounds * IN_FLIGHT) as f64;
        reserve_ns.push(r_ns as f64 / ops);
        settle_ns.push(s_ns as f64 / ops);
    }
    let ops = (rounds * IN_FLIGHT) as f64;
    (
        reserve_ns,
        settle_ns,
        reserve_allocs as f64 / ops,
        settle_allocs as f64 / ops,
    )
}

/// The pure core: one workspace's state, reserve timed apart from settle.
fn core(run: &Run) {
    let limits = three_limits();
    let now = std::cell::Cell::new(START);
    let state = std::cell::RefCell::new(WorkspaceState::new(START, &MonthTotals::default()));
    let (reserve_ns, settle_ns, reserve_allocs, settle_allocs) = reserve_then_settle(
        run,
        run.n(40),
        || {
            now.set(now.get() + 1_000);
            match state
                .borrow_mut()
                .reserve(&limits, MODEL, COST, black_box(now.get()))
                .0
            {
                Verdict::Admit(h) => h,
                Verdict::Deny(d) => panic!("denied: {d:?}"),
            }
        },
        |h| {
            state
                .borrow_mut()
                .settle(&limits, h, black_box(250), now.get())
        },
    );
    report(
        "core: reserve, 3 limits, 1 workspace",
        reserve_ns,
        &format!("  {reserve_allocs:.2} allocs/op"),
    );
    report(
        "core: settle",
        settle_ns,
        &format!("  {settle_allocs:.2} allocs/op"),
    );
}

/// `LocalLimiter` as the gateway calls it (through the `Limiter` trait), over `workspaces`
/// workspaces visited in a scattered order; reports the heap per workspace once all are held.
fn local(run: &Run, workspaces: usize) {
    let limits = three_limits();
    let limiter = local_limiter();
    let mut now = START;
    let before = live_bytes();
    for ws in 0..workspaces {
        now += 1_000;
        let r = reserve(&limiter, ws as WorkspaceId, &limits, now);
        ready(limiter.settle(&r, &limits, 250, now)).unwrap();
    }
    let heap = live_bytes() - before;
    assert_eq!(limiter.tracked_workspaces(), workspaces);

    // A stride prime to the table size scatters consecutive decisions over the table.
    let stride = if workspaces > 1 {
        1_000_003 % workspaces
    } else {
        0
    };
    let now = std::cell::Cell::new(now);
    let ws = std::cell::Cell::new(0usize);
    let (reserve_ns, settle_ns, reserve_allocs, settle_allocs) = reserve_then_settle(
        run,
        run.n(40),
        || {
            now.set(now.get() + 1_000);
            ws.set((ws.get() + stride) % workspaces);
            reserve(
                &limiter,
                ws.get() as WorkspaceId,
                &limits,
                black_box(now.get()),
            )
        },
        |r| {
            ready(limiter.settle(r, &limits, black_box(250), now.get())).unwrap();
        },
    );
    report(
        &format!("local: reserve, 3 limits, {workspaces} workspaces"),
        reserve_ns,
        &format!("  {reserve_allocs:.2} allocs/op"),
    );
    report(
        &format!("local: settle, {workspaces} workspaces"),
        settle_ns,
        &format!("  {settle_allocs:.2} allocs/op"),
    );
    println!(
        "{:<58} {:>9.0} bytes/workspace (heap growth {heap} B / {workspaces})",
        format!("local: heap, 3 limits + 1 model, {workspaces} workspaces"),
        heap as f64 / workspaces as f64
    );
}

/// The heap per workspace with the three limits and no model named.
fn memory_without_model(run: &Run) {
    let workspaces = if run.full { 1_000_000 } else { 1_000 };
    let limits = three_limits();
    let limiter = local_limiter();
    let mut now = START;
    let before = live_bytes();
    for ws in 0..workspaces {
        now += 1_000;
        let r = match ready(limiter.reserve(ws as WorkspaceId, &limits, None, COST, now)) {
            Ok(Decision::Admit { reservation, .. }) => reservation,
            other => panic!("not admitted: {other:?}"),
        };
        ready(limiter.settle(&r, &limits, 250, now)).unwrap();
    }
    let heap = live_bytes() - before;
    println!(
        "{:<58} {:>9.0} bytes/workspace (heap growth {heap} B / {workspaces})",
        format!("local: heap, 3 limits, no model, {workspaces} workspaces"),
        heap as f64 / workspaces as f64
    );
}

/// Two threads deciding (reserve + settle) for one workspace at once.
fn two_threads(run: &Run) {
    let limits = Arc::new(three_limits());
    let limiter = Arc::new(local_limiter());
    let batch = run.n(100_000);
    let mut pairs_ns = Vec::new();
    for sample in 0..run.samples() as u64 {
        let start = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2u64)
            .map(|i| {
                let (limiter, limits, start) = (limiter.clone(), limits.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    // 2 µs apart per thread, interleaved: 1M requests/s between them.
                    let mut now = START + sample * batch as u64 * 2_000 + i * 1_000;
                    for _ in 0..batch {
                        now += 2_000;
                        let r = reserve(&limiter, 1, &limits, black_box(now));
                        ready(limiter.settle(&r, &limits, 250, now)).unwrap();
                    }
                    t.elapsed().as_nanos() as f64 / batch as f64
                })
            })
            .collect();
        let per_thread: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        pairs_ns.push(per_thread.iter().copied().fold(0.0, f64::max));
    }
    report(
        "local: reserve+settle, 2 threads on 1 workspace (per thread)",
        pairs_ns,
        "",
    );
}

/// The token estimate of a chat request whose prompt is `kib` KiB of text: reading the body
/// (its bytes, as received) and estimating, as the gateway does before reserving.
fn estimate(run: &Run, kib: usize) {
    let text: String = "The quick brown fox jumps over the lazy dog. "
        .chars()
        .cycle()
        .take(kib * 1024)
        .collect();
    let body = serde_json::json!({
        "model": "mistral-small-latest",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 512,
    })
    .to_string();
    let estimator = Estimator::new(256, 16);
    let batch = run.n(if kib > 16 { 200 } else { 2_000 });
    let mut ns = Vec::new();
    for _ in 0..run.samples() {
        let t = Instant::now();
        for _ in 0..batch {
            let info = inspect(
                Endpoint::ChatCompletions,
                black_box(body.as_bytes()),
                1 << 20,
            )
            .unwrap();
            black_box(estimator.estimate(1, &info));
        }
        ns.push(t.elapsed().as_nanos() as f64 / batch as f64);
    }
    report(&format!("estimate: {kib} KiB prompt"), ns, "");
}

fn main() {
    let run = Run {
        full: std::env::args().any(|a| a == "--bench"),
    };
    // `cargo bench --bench limiter -- NAME` runs the cases whose name contains NAME (for
    // `perf record` on one case).
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let on = |name: &str| name.contains(filter.as_str());
    if on("core") {
        core(&run);
    }
    if on("local-1") {
        local(&run, 1);
    }
    if on("local-100k") {
        local(&run, if run.full { 100_000 } else { 100 });
    }
    if on("local-1m") {
        local(&run, if run.full { 1_000_000 } else { 1_000 });
        memory_without_model(&run);
    }
    if on("threads") {
        two_threads(&run);
    }
    if on("estimate") {
        estimate(&run, 4);
        estimate(&run, 64);
    }
}
