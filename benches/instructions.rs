//! Instructions per request of the real gateway, counted by callgrind: the regression check
//! that CI runs. `bench/instructions/README.md` says how to run it and how to bless a baseline.
//!
//! Wall-clock figures drift by tens of percent on the machines we have; the instructions a
//! fixed scenario executes do not. So the check runs one fixed scenario under
//! `valgrind --tool=callgrind` and compares its instructions per request with
//! `bench/instructions/baseline.json`, failing on a rise of more than `THRESHOLD`.
//!
//! # The scenario
//! The gateway as `main` builds it (`tiergate::app`, served by `App::serve` on a loopback port,
//! a SQLite file in a temp dir, in-memory limits) in front of the built-in mock upstream, and a
//! reqwest client, all in this process on one current-thread tokio runtime. Two workspaces: one
//! on a tier with every limit set (requests/s, tokens/minute and /month, concurrency, a model's
//! tokens/minute) high enough that nothing is denied, and one on a tier of 1 request/s whose
//! clock never moves, so that every request after the first is denied (`429`). After a warm-up
//! of every kind, each kind is measured on its own: `REQUESTS` requests one after the other,
//! then one ledger flush (its cost is spread over them), between callgrind's zeroing and dumping
//! of its counters. The counts are of the whole process, every thread: the gateway, the
//! client, the mock upstream, and sqlx's SQLite worker thread.
//!
//! - `plain`: a chat completion answered as JSON.
//! - `stream`: the same, streamed (server-sent events, usage from the last chunk).
//! - `denied`: a chat completion from the workspace over its limit.
//! - `direct`: the plain request sent straight to the mock upstream: what the client and the
//!   upstream cost, for reading the others (`plain` − `direct` is what the gateway adds).
//! - `redis`: the plain request through a second gateway, the first's twin with its limits in
//!   the shared Redis (`TIERGATE_TEST_REDIS`, keys of this process's own). Redis's own work is
//!   not counted: `redis` − `plain` is what the gateway spends on its calls. Without a Redis it
//!   is skipped, loudly, except in CI, where it fails.
//!
//! # Determinism
//! - One thread runs everything async; valgrind runs threads one at a time anyway. sqlx's
//!   SQLite worker is a thread of its own, busy only in the flushes.
//! - The limiter's clock is a `ManualClock` that never moves, so no refill depends on time.
//! - Timers that would fire during a run are pushed out: the ledger flushes only when told, the
//!   catalogue refresh and idle eviction never come round.
//! - Requests run one at a time, each read to its end before the next.
//!
//! What remains (glibc malloc's paths, which depend on the heap's history; random keys and ids;
//! hyper's per-second date header; the sqlx thread's wake-ups; in `redis`, the server's clock
//! and how Redis's answers split across reads) moves the counts by less than 1%; the README
//! gives the spread seen.
//!
//! # Modes
//! - No argument (`cargo test --all-targets`): the scenario with a few requests, natively,
//!   checking every answer's status: proves it still runs. No valgrind needed.
//! - `--measure`: what runs under callgrind.
//! - `--bench` (`cargo bench --bench instructions`): runs this binary with `--measure` under
//!   valgrind, reads the dumps, prints the table and fails on a regression; with `--bless` too,
//!   writes the counts as the new baseline instead.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tiergate::admin::NewKeyInput;
use tiergate::clock::{Clock, ManualClock};
use tiergate::config::{RawSettings, RawUpstream};
use tiergate::mock_upstream::{self, MockConfig};
use tiergate::model::{Actor, Limits, ModelLimits, MAX_TOKENS_PER_MINUTE, MAX_TOKENS_PER_MONTH};
use tiergate::{AppState, Config};
use tokio::sync::oneshot;

/// Requests of each kind in a measured run.
const REQUESTS: u64 = 200;
/// Requests of each kind in the warm-up, and in a run under `cargo test`.
const WARM_UP: u64 = 20;
/// The largest rise over the baseline that passes, in percent.
const THRESHOLD: f64 = 10.0;
const BASELINE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/bench/instructions/baseline.json"
);
const MODEL: &str = "mistral-small-latest";
const PLAIN_BODY: &str = r#"{"model":"mistral-small-latest","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly."},{"role":"user","content":"What does a rate limiter do in front of an API, and why would a gateway settle the tokens a request really used instead of its estimate?"}],"max_tokens":64,"temperature":0.2}"#;
const STREAM_BODY: &str = r#"{"model":"mistral-small-latest","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly."},{"role":"user","content":"What does a rate limiter do in front of an API, and why would a gateway settle the tokens a request really used instead of its estimate?"}],"max_tokens":64,"temperature":0.2,"stream":true}"#;

/// The kinds of request measured, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Stream,
    Denied,
    Direct,
    /// The plain request through a second gateway, whose limits are in the shared Redis.
    Redis,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Plain,
        Kind::Stream,
        Kind::Denied,
        Kind::Direct,
        Kind::Redis,
    ];

    /// The scenario's name, as dumped by callgrind and keyed in the baseline.
    fn name(self) -> &'static CStr {
        match self {
            Kind::Plain => c"plain",
            Kind::Stream => c"stream",
            Kind::Denied => c"denied",
            Kind::Direct => c"direct",
            Kind::Redis => c"redis",
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--measure") {
        scenario(REQUESTS);
        ExitCode::SUCCESS
    } else if has("--bench") {
        match check(has("--bless")) {
            Ok(passed) if passed => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("instructions: {e}");
                ExitCode::FAILURE
            }
        }
    } else {
        scenario(WARM_UP);
        println!("instructions: the scenario runs (measure it with `bench/instructions/check`)");
        ExitCode::SUCCESS
    }
}

/// Runs the scenario with `n` measured requests of each kind, marking each kind for callgrind.
fn scenario(n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let redis = shared_redis();
    rt.block_on(async {
        let local = Bench::start(None).await;
        let shared = match &redis {
            Some(url) => Some(Bench::start(Some(url)).await),
            None => None,
        };
        let bench_of = |kind| match (kind, &shared) {
            (Kind::Redis, Some(shared)) => Some(shared),
            (Kind::Redis, None) => None,
            _ => Some(&local),
        };
        for kind in Kind::ALL {
            if let Some(bench) = bench_of(kind) {
                bench.run(kind, WARM_UP).await;
                bench.state.recorder.flush().await;
            }
        }
        for kind in Kind::ALL {
            let Some(bench) = bench_of(kind) else {
                continue;
            };
            callgrind::zero_stats();
            bench.run(kind, n).await;
            bench.state.recorder.flush().await;
            callgrind::dump_stats_at(kind.name());
        }
        local.stop().await;
        if let Some(shared) = shared {
            shared.stop().await;
        }
    });
}

/// The shared Redis the tests use (`TIERGATE_TEST_REDIS`, default `redis://127.0.0.1:6379`),
/// when it answers `PING`. Without it the `redis` scenario is skipped with a loud line, except
/// in CI (`CI` set), where this fails, as the tests do.
fn shared_redis() -> Option<String> {
    use std::io::{Read, Write};
    let url = std::env::var("TIERGATE_TEST_REDIS")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let answers = || -> std::io::Result<bool> {
        let address = url
            .strip_prefix("redis://")
            .unwrap_or(&url)
            .split('/')
            .next()
            .unwrap_or_default();
        let address = address.rsplit('@').next().unwrap_or_default();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(address)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        conn.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    match answers() {
        Ok(true) => Some(url),
        why => {
            let shown = tiergate::config::redact(&url);
            if std::env::var_os("CI").is_some() {
                panic!("CI needs the shared Redis at {shown} for the `redis` scenario: {why:?}");
            }
            eprintln!(
                "*** SKIP: the `redis` scenario: no Redis answers at {shown} ({why:?}); start \
                 redis-server on 127.0.0.1:6379 or set TIERGATE_TEST_REDIS. ***"
            );
            None
        }
    }
}

/// The gateway, its mock upstream, and a client with the keys of the two workspaces.
struct Bench {
    state: Arc<AppState>,
    client: reqwest::Client,
    gateway: String,
    upstream: String,
    open_key: String,
    closed_key: String,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
    stop_mock: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Bench {
    /// The gateway, with its limits in the Redis at `redis` when given (under keys of this
    /// process's own, which expire when idle: the shared server is never flushed).
    async fn start(redis: Option<&str>) -> Bench {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", mock.local_addr().unwrap());
        let (stop_mock, mock_stopped) = oneshot::channel::<()>();
        tokio::spawn(mock_upstream::serve(mock, MockConfig::default(), async {
            let _ = mock_stopped.await;
        }));

        let raw = RawSettings {
            listen: Some("127.0.0.1:0".into()),
            database: Some(format!(
                "sqlite://{}",
                dir.path().join("tiergate.db").display()
            )),
            catalog_refresh_ms: Some(HOUR.as_millis() as u64),
            upstream: RawUpstream {
                url: Some(upstream.clone()),
                ..RawUpstream::default()
            },
            redis: redis.map(str::to_string),
            redis_prefix: redis.map(|_| format!("bench-instructions-{}", std::process::id())),
            ..RawSettings::default()
        };
        let mut config = Config::try_from(raw).expect("valid settings");
        config.ledger_flush = HOUR;
        config.idle_eviction = 4 * HOUR;
        // The background checks stay quiet during the measured window: what they run is not a
        // request's cost, and how often they fire in it would make the counts vary.
        config.promotion_interval = HOUR;
        config.webhook_quota_check = HOUR;
        config.webhook_idle_poll = HOUR;
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
        let app = tiergate::app(config, clock).await.expect("the gateway");
        let state = app.state.clone();

        let by = Actor::plain("bench");
        let admin = &state.admin;
        admin
            .put_tier(&by, "bench-open", open_limits())
            .await
            .unwrap();
        let closed = Limits {
            requests_per_second: Some(1.0),
            burst: Some(1),
            ..Limits::default()
        };
        admin.put_tier(&by, "bench-closed", closed).await.unwrap();
        let mut keys = Vec::new();
        for (name, tier) in [("open", "bench-open"), ("closed", "bench-closed")] {
            let ws = admin.create_workspace(&by, name, Some(tier)).await.unwrap();
            let input = NewKeyInput {
                name: None,
                expires_at: None,
            };
            let (_, secret) = admin.create_key(&by, ws.id, input).await.unwrap();
            keys.push(format!("Bearer {secret}"));
        }
        let closed_key = keys.pop().unwrap();
        let open_key = keys.pop().unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            app.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("served");
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a client");
        Bench {
            state,
            client,
            gateway,
            upstream,
            open_key,
            closed_key,
            stop,
            served,
            stop_mock,
            _dir: dir,
        }
    }

    /// Sends `n` requests of `kind` one after the other, each read to its end.
    async fn run(&self, kind: Kind, n: u64) {
        for _ in 0..n {
            let (base, key, body, expected) = match kind {
                Kind::Plain => (&self.gateway, &self.open_key, PLAIN_BODY, StatusCode::OK),
                Kind::Stream => (&self.gateway, &self.open_key, STREAM_BODY, StatusCode::OK),
                // The first of these (in the warm-up) is admitted: the tier's burst is 1.
                Kind::Denied => (
                    &self.gateway,
                    &self.closed_key,
                    PLAIN_BODY,
                    StatusCode::TOO_MANY_REQUESTS,
                ),
                Kind::Direct => (&self.upstream, &self.open_key, PLAIN_BODY, StatusCode::OK),
                Kind::Redis => (&self.gateway, &self.open_key, PLAIN_BODY, StatusCode::OK),
            };
            let response = self
                .client
                .post(format!("{base}/v1/chat/completions"))
                .header(AUTHORIZATION, key.as_str())
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .expect("an answer");
            let status = response.status();
            let answer = response.bytes().await.expect("a whole body");
            let admitted_first = matches!(kind, Kind::Denied) && status == StatusCode::OK;
            assert!(
                status == expected || admitted_first,
                "{kind:?}: {status} {}",
                String::from_utf8_lossy(&answer)
            );
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.expect("the gateway stopped");
        let _ = self.stop_mock.send(());
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Every limit set, none of them reached.
fn open_limits() -> Limits {
    let mut limits = Limits {
        requests_per_second: Some(100_000.0),
        burst: None,
        tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
        tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
        concurrent_requests: Some(1000),
        models: Default::default(),
        key: None,
    };
    limits.models.insert(
        MODEL.into(),
        ModelLimits {
            tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
            tokens_per_month: None,
        },
    );
    limits
}

/// The committed baseline, and what `--bless` writes.
#[derive(Debug, Serialize, Deserialize)]
struct Baseline {
    /// `rustc -V` of the build that was counted: another compiler gives other counts.
    rustc: String,
    /// `valgrind --version`.
    valgrind: String,
    /// Measured requests of each kind.
    requests: u64,
    /// Instructions per request, by scenario.
    instructions_per_request: BTreeMap<String, u64>,
}

/// Measures under callgrind and compares with the baseline (or writes it); `Ok(false)` on a
/// regression.
fn check(bless: bool) -> Result<bool, String> {
    let valgrind = version("valgrind", "--version").ok_or(
        "valgrind is not installed (apt-get install valgrind); bench/instructions/check installs it",
    )?;
    let rustc = version(
        &std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()),
        "-V",
    )
    .unwrap_or_else(|| "unknown".into());
    let now = measure()?;
    let path = Path::new(BASELINE);
    if bless {
        let baseline = Baseline {
            rustc,
            valgrind,
            requests: REQUESTS,
            instructions_per_request: now.clone(),
        };
        let text = serde_json::to_string_pretty(&baseline).expect("serialisable") + "\n";
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        print_table(&BTreeMap::new(), &now);
        println!("\nwrote {}", path.display());
        return Ok(true);
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "reading {}: {e} (write one with `bench/instructions/check --bless`)",
            path.display()
        )
    })?;
    let baseline: Baseline =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let passed = print_table(&baseline.instructions_per_request, &now);
    if baseline.rustc != rustc {
        println!(
            "\nnote: the baseline was counted with {}, this build with {rustc}; counts differ \
             between compilers, so a change here may be the compiler's",
            baseline.rustc
        );
    }
    if baseline.valgrind != valgrind {
        println!(
            "note: the baseline was counted with {}, this run with {valgrind}",
            baseline.valgrind
        );
    }
    if !passed {
        println!(
            "\nFAILED: instructions per request rose more than {THRESHOLD}% over \
             bench/instructions/baseline.json. Find what costs (bench/instructions/README.md), \
             or, if the rise is intended, bless it: bench/instructions/check --bless"
        );
    }
    Ok(passed)
}

/// Prints scenario, baseline, now and change; says whether no scenario rose past the threshold.
fn print_table(baseline: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> bool {
    let mut passed = true;
    let mut improved = false;
    println!(
        "{:<10} {:>14} {:>14} {:>9}",
        "scenario", "baseline", "now", "change"
    );
    for kind in Kind::ALL {
        let name = kind.name().to_str().expect("ASCII");
        let Some(&now) = now.get(name) else {
            println!("{name:<10} {:>14} {:>14} {:>9}", "-", "-", "skipped");
            continue;
        };
        let (was, change) = match baseline.get(name) {
            Some(&was) if was > 0 => {
                let change = (now as f64 - was as f64) / was as f64 * 100.0;
                let verdict = if change > THRESHOLD {
                    passed = false;
                    "  REGRESSION"
                } else if change < -THRESHOLD {
                    improved = true;
                    "  improved"
                } else {
                    ""
                };
                (was.to_string(), format!("{change:+.2}%{verdict}"))
            }
            _ => ("-".into(), "new".into()),
        };
        println!("{name:<10} {was:>14} {now:>14} {change:>9}");
    }
    println!(
        "(instructions per request, of this process only: `plain` - `direct` is what the gateway \
         adds; `redis` is `plain` with the limits in Redis, whose own work is not counted)"
    );
    if improved && passed {
        println!(
            "\nnote: a scenario improved by more than {THRESHOLD}%; bless the new counts so that \
             the check guards them: bench/instructions/check --bless"
        );
    }
    passed
}

/// Runs this binary with `--measure` under callgrind; instructions per request by scenario.
fn measure() -> Result<BTreeMap<String, u64>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = out.path().join("callgrind.out");
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg("--dump-line=no")
        .arg(&exe)
        .arg("--measure")
        .output()
        .map_err(|e| format!("running valgrind: {e}"))?;
    if !run.status.success() {
        return Err(format!(
            "valgrind {} --measure failed ({}):\n{}",
            exe.display(),
            run.status,
            String::from_utf8_lossy(&run.stderr)
        ));
    }
    let mut totals = BTreeMap::new();
    for entry in std::fs::read_dir(out.path()).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if let Some((name, total)) = read_dump(&path)? {
            totals.insert(name, total / REQUESTS);
        }
    }
    for kind in Kind::ALL {
        let name = kind.name().to_str().expect("ASCII");
        // The `redis` scenario is skipped without a Redis (and fails in CI, in the run itself).
        if !totals.contains_key(name) && kind != Kind::Redis {
            return Err(format!("callgrind wrote no dump for `{name}`"));
        }
    }
    Ok(totals)
}

/// The scenario and instruction total of one callgrind dump; `None` for the dump at exit. The
/// total is the `totals:` line (the dumps' totals add up to what valgrind reports collected; the
/// `summary:` line of the first dump after a zeroing counts more than was collected).
fn read_dump(path: &PathBuf) -> Result<Option<(String, u64)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut name = None;
    let mut total = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("desc: Trigger: Client Request: ") {
            name = Some(n.trim().to_string());
        } else if let Some(t) = line.strip_prefix("totals: ") {
            let first = t.split_whitespace().next().unwrap_or("");
            total = first.parse::<u64>().ok();
        }
    }
    match (name, total) {
        (Some(name), Some(total)) => Ok(Some((name, total))),
        (Some(name), None) => Err(format!("{}: no total for `{name}`", path.display())),
        (None, _) => Ok(None),
    }
}

/// The first line a tool prints for `flag`, if it runs.
fn version(tool: &str, flag: &str) -> Option<String> {
    let out = Command::new(tool).arg(flag).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.lines().next().unwrap_or("").trim().to_string())
}

/// Callgrind's client requests, as `valgrind/callgrind.h` issues them, without its C header:
/// natively they do nothing.
mod callgrind {
    use std::ffi::CStr;

    /// `VG_USERREQ_TOOL_BASE('C','T')`: callgrind's requests, in `callgrind.h`'s order.
    const BASE: usize = (b'C' as usize) << 24 | (b'T' as usize) << 16;
    const ZERO_STATS: usize = BASE + 1;
    const DUMP_STATS_AT: usize = BASE + 3;

    /// Zeroes the counters of every thread.
    pub fn zero_stats() {
        request(ZERO_STATS, 0);
    }

    /// Writes the counters of every thread as a dump described as `Client Request: {what}`,
    /// then zeroes them.
    pub fn dump_stats_at(what: &CStr) {
        request(DUMP_STATS_AT, what.as_ptr() as usize);
    }

    #[cfg(target_arch = "x86_64")]
    fn request(code: usize, arg: usize) {
        let args: [usize; 6] = [code, arg, 0, 0, 0, 0];
        // SAFETY: valgrind's "special instruction sequence" for amd64 (`valgrind.h`,
        // `__SPECIAL_INSTRUCTION_PREAMBLE` and `VALGRIND_DO_CLIENT_REQUEST_EXPR`): rotations of
        // rdi by 3, 13, 61 and 51 bits, 128 in all, leave it as it was, and `xchg rbx, rbx`
        // changes nothing, so natively this only clobbers the flags. Under valgrind the tool
        // reads `args` (alive for the whole block) through rax and writes its answer to rdx.
        unsafe {
            std::arch::asm!(
                "rol rdi, 3",
                "rol rdi, 13",
                "rol rdi, 61",
                "rol rdi, 51",
                "xchg rbx, rbx",
                in("rax") args.as_ptr(),
                inout("rdx") 0usize => _,
                inout("rdi") 0usize => _,
                options(nostack),
            );
        }
    }

    /// Elsewhere the scenario still runs; counting it is x86-64 only.
    #[cfg(not(target_arch = "x86_64"))]
    fn request(_code: usize, _arg: usize) {}
}
