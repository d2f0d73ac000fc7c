//! What the Redis limiter costs, measured against yardsticks in the same run:
//!
//! 1. **Throughput.** Decisions per second of `RedisLimiter` (a decision is `reserve` + `settle`,
//!    two script calls; every limit set, a per-model one included; `CONCURRENCY` tasks on one
//!    multiplexed connection; the server's clock, as in service) against `redis-benchmark`'s
//!    `SET` at the same concurrency on the same server, round by round, interleaved; with the
//!    server's own time per call of each (`INFO commandstats`), which is what bounds ours.
//! 2. **Added latency.** Two gateways built as in service (`tiergate::app`, SQLite in a temp dir,
//!    the mock upstream in-process), one with `redis` set and one without, and the mock alone:
//!    one keep-alive connection to each, sequential requests, in small batches that take turns.
//! 3. **Memory** of one workspace's keys in Redis (`MEMORY USAGE`), with 1 to 1,000 requests in
//!    flight, then settled.
//!
//! The speed of the machine drifts by tens of percent from minute to minute, so nothing is
//! compared with a figure taken at another time: every comparison is between runs interleaved in
//! time, and is reported as a ratio or a difference.
//!
//! `cargo bench --bench redis` measures (about a minute); under `cargo test` it runs a few
//! iterations to prove it still works. It needs the Redis at `TIERGATE_TEST_REDIS` (default
//! `redis://127.0.0.1:6379`): without it, it says so and skips, except under `cargo test` with
//! `CI` set, where it fails as the tests do. Without `redis-benchmark` it skips the comparison
//! with `SET`. Its keys start with `{bench<pid>` and are deleted at the end; the server is never
//! flushed.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use tiergate::clock::{Clock, SystemClock};
use tiergate::config::{RawSettings, RawUpstream};
use tiergate::limiter::redis::{RedisLimiter, RedisOptions, TimeSource, Topology};
use tiergate::limiter::{
    Decision, Limiter, LimiterError, MonthKey, MonthSource, MonthTotals, Reservation, TokenCost,
};
use tiergate::model::{
    Limits, ModelLimits, WorkspaceId, MAX_TOKENS_PER_MINUTE, MAX_TOKENS_PER_MONTH,
};
use tiergate::Config;

/// Requests in flight at once: ours (tasks) and `redis-benchmark`'s (connections).
const CONCURRENCY: usize = 50;
const ROUNDS: usize = 3;
/// Workspaces the decisions are spread over.
const WORKSPACES: usize = 100;
const MODEL: &str = "mistral-small-latest";
const ADMIN: &str = "bench-admin-token-0123456789";
const COST: TokenCost = TokenCost {
    prompt: 20,
    estimate: 300,
};
const SETTLED: u64 = 250;

/// How much each part does: a measurement under `--bench`, a smoke run under `cargo test`.
struct Plan {
    /// How long each round of ours runs.
    round: Duration,
    /// `SET` commands per round of `redis-benchmark`.
    set_requests: u64,
    /// Latency: per round, batches per path, and requests per batch.
    batches: usize,
    batch: usize,
    /// Requests per path before measuring.
    warmup: usize,
    /// Requests in flight at each memory measurement.
    in_flight: &'static [usize],
}

impl Plan {
    fn new(full: bool) -> Plan {
        if full {
            Plan {
                round: Duration::from_secs(3),
                set_requests: 100_000,
                batches: 100,
                batch: 20,
                warmup: 300,
                in_flight: &[1, 10, 100, 1000],
            }
        } else {
            Plan {
                round: Duration::from_millis(150),
                set_requests: 2_000,
                batches: 2,
                batch: 5,
                warmup: 5,
                in_flight: &[1, 10],
            }
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let plan = Plan::new(full);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("TIERGATE_TEST_REDIS")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
    let shown = tiergate::config::redact(&url);
    if let Err(why) = rt.block_on(ping(&url)) {
        if in_ci() && !full {
            panic!("CI needs the shared Redis at {shown}, which does not answer: {why}");
        }
        println!(
            "*** SKIP: no Redis at {shown} ({why}); start redis-server on 127.0.0.1:6379 or set \
             TIERGATE_TEST_REDIS. ***"
        );
        return;
    }
    let prefix = format!("bench{}", std::process::id());
    println!(
        "tiergate Redis benchmark against {shown}, {} ({} cores)",
        if full { "full run" } else { "smoke run" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    throughput(&rt, &plan, &url, &prefix);
    rt.block_on(latency(&plan, &url, &format!("{prefix}g")));
    rt.block_on(memory(&plan, &url, &format!("{prefix}m")));
    rt.block_on(delete_keys(&url, &prefix));
}

// ---------------------------------------------------------------------------------------------
// 1. Decisions per second against `redis-benchmark`'s SET.

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

/// Every limit, high enough that nothing is denied: the script checks and takes each.
fn limits() -> Limits {
    let mut l = Limits {
        requests_per_second: Some(1e6),
        burst: None,
        tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
        tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
        concurrent_requests: Some(1_000_000),
        models: Default::default(),
        key: None,
    };
    l.models.insert(
        MODEL.into(),
        ModelLimits {
            tokens_per_minute: Some(MAX_TOKENS_PER_MINUTE),
            tokens_per_month: Some(MAX_TOKENS_PER_MONTH),
        },
    );
    l.validate().expect("valid limits");
    l
}

/// The limiter as in service, but for the timeout: 1 s rather than 50 ms, since a Redis call
/// that fails here fails the run, while in service it falls back (which is not measured here).
fn redis_limiter(url: &str, prefix: &str) -> RedisLimiter {
    let options = RedisOptions {
        topology: Topology::Single(url.to_string()),
        prefix: prefix.to_string(),
        timeout: Duration::from_secs(1),
        lease: Duration::from_secs(30),
        time: TimeSource::Server,
    };
    RedisLimiter::new(options, Arc::new(EmptyLedger)).expect("a valid Redis limiter")
}

async fn reserve(limiter: &RedisLimiter, ws: WorkspaceId, limits: &Limits) -> Reservation {
    let now = SystemClock.now();
    match limiter.reserve(ws, limits, Some(MODEL), COST, now).await {
        Ok(Decision::Admit { reservation, .. }) => reservation,
        Ok(Decision::Deny { denial, .. }) => panic!("denied: {denial:?}"),
        Err(e) => panic!("reserve: {e}"),
    }
}

async fn settle(limiter: &RedisLimiter, reservation: &Reservation, limits: &Limits) {
    let now = SystemClock.now();
    if let Err(e) = limiter.settle(reservation, limits, SETTLED, now).await {
        panic!("settle: {e}");
    }
}

struct Ours {
    decisions: usize,
    secs: f64,
    /// Of each decision (reserve + settle), sorted.
    latencies: Vec<Duration>,
}

/// `CONCURRENCY` tasks deciding one after another for `length`.
async fn decide_for(limiter: &Arc<RedisLimiter>, limits: &Arc<Limits>, length: Duration) -> Ours {
    let started = Instant::now();
    let deadline = started + length;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let (limiter, limits) = (limiter.clone(), limits.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut ws = task;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = reserve(&limiter, (ws % WORKSPACES) as WorkspaceId, &limits).await;
                    settle(&limiter, &r, &limits).await;
                    latencies.push(t.elapsed());
                    ws += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("a deciding task"));
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    Ours {
        decisions: latencies.len(),
        secs,
        latencies,
    }
}

struct SetFigure {
    per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

enum RedisBenchmark {
    /// Not installed: the comparison is skipped.
    Missing(String),
    /// It ran and failed, or said something unreadable: the run fails.
    Failed(String),
}

/// `redis-benchmark` at our concurrency, without pipelining: `SET` of a 3-byte value, as
/// `-t set` does, but on a key of ours (`-t set` writes `key:__rand_int__`, which this shared
/// server's other users may own).
fn redis_benchmark(url: &str, key: &str, requests: u64) -> Result<SetFigure, RedisBenchmark> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| RedisBenchmark::Failed(format!("{}: {e}", tiergate::config::redact(url))))?;
    let mut command = Command::new("redis-benchmark");
    command
        .args(["-h", parsed.host_str().unwrap_or("127.0.0.1")])
        .args(["-p", &parsed.port().unwrap_or(6379).to_string()])
        .args(["-c", &CONCURRENCY.to_string(), "-P", "1"])
        .args(["-n", &requests.to_string(), "--csv"]);
    if !parsed.username().is_empty() {
        command.args(["--user", parsed.username()]);
    }
    if let Some(password) = parsed.password() {
        command.args(["-a", password]);
    }
    if parsed.scheme() == "rediss" {
        command.arg("--tls");
    }
    command.args(["SET", key, "xxx"]);
    // Messages show the command line: never the password.
    let redact = |why: String| match parsed.password() {
        Some(password) => why.replace(password, "***"),
        None => why,
    };
    let output = match run(command, Duration::from_secs(60)) {
        Ok(output) => output,
        Err(Run::NotFound(why)) => return Err(RedisBenchmark::Missing(redact(why))),
        Err(Run::Failed(why)) => return Err(RedisBenchmark::Failed(redact(why))),
    };
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",...
    let row = output
        .lines()
        .map(|line| {
            line.split(',')
                .map(|f| f.trim().trim_matches('"'))
                .collect::<Vec<_>>()
        })
        .find(|fields| fields[0].starts_with("SET"))
        .ok_or_else(|| {
            RedisBenchmark::Failed(format!("redis-benchmark printed no SET figure: {output:?}"))
        })?;
    let field = |i: usize| row.get(i).and_then(|f| f.parse::<f64>().ok());
    Ok(SetFigure {
        per_sec: field(1).ok_or_else(|| {
            RedisBenchmark::Failed(format!("redis-benchmark printed no requests/s: {row:?}"))
        })?,
        p50_ms: field(4),
        p99_ms: field(6),
    })
}

enum Run {
    NotFound(String),
    Failed(String),
}

/// Runs a command to its end, killing it after `timeout`; its stdout when it succeeds.
fn run(mut command: Command, timeout: Duration) -> Result<String, Run> {
    let what = format!("{command:?}");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| {
        let why = format!("cannot run {what}: {e}");
        match e.kind() {
            std::io::ErrorKind::NotFound => Run::NotFound(why),
            _ => Run::Failed(why),
        }
    })?;
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Run::Failed(format!(
                    "{what} did not finish within {timeout:?}"
                )));
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        let stderr = stderr.join().unwrap_or_default();
        Err(Run::Failed(format!(
            "{what} failed ({status}): {stdout}{stderr}"
        )))
    }
}

fn throughput(rt: &tokio::runtime::Runtime, plan: &Plan, url: &str, prefix: &str) {
    println!(
        "\n1. Decisions per second through RedisLimiter (reserve + settle = 2 script calls, all \
         limits incl. a per-model one, {WORKSPACES} workspaces, {CONCURRENCY} tasks on one \
         multiplexed connection, server clock) vs redis-benchmark SET (-c {CONCURRENCY} -P 1), \
         interleaved, {}s per round of ours, {} SETs per round of theirs:",
        plan.round.as_secs_f64(),
        plan.set_requests
    );
    let limiter = Arc::new(rt.block_on(async { redis_limiter(url, prefix) }));
    let limits = Arc::new(limits());
    // Every workspace's first call starts its month counter (and the script is loaded).
    rt.block_on(async {
        for ws in 0..WORKSPACES {
            let r = reserve(&limiter, ws as WorkspaceId, &limits).await;
            settle(&limiter, &r, &limits).await;
        }
        decide_for(&limiter, &limits, plan.round / 4).await;
    });
    let set_key = format!("{{{prefix}}}:set");
    let mut conn = rt
        .block_on(redis_connection(url))
        .expect("Redis answered before");
    let mut stats = |command: &str| rt.block_on(server_time(&mut conn, command));
    let mut rows = Vec::new();
    let mut set_missing = false;
    for round in 1..=ROUNDS {
        let before = stats(LIMITER_CALLS);
        let ours = rt.block_on(decide_for(&limiter, &limits, plan.round));
        let script_us = per_call(before, stats(LIMITER_CALLS));
        let per_sec = ours.decisions as f64 / ours.secs;
        let before = stats("set");
        let theirs = if set_missing {
            None
        } else {
            match redis_benchmark(url, &set_key, plan.set_requests) {
                Ok(figure) => Some(figure),
                Err(RedisBenchmark::Missing(why)) => {
                    println!("   *** SKIP the comparison with SET: {why} ***");
                    set_missing = true;
                    None
                }
                Err(RedisBenchmark::Failed(why)) => panic!("{why}"),
            }
        };
        let set_us = per_call(before, stats("set"));
        let q = |p| ms(quantile(&ours.latencies, p));
        let mut line = format!(
            "   round {round}: ours {per_sec:>8.0} decisions/s = {:>8.0} script calls/s \
             (decision p50 {:.2} ms, p99 {:.2} ms)",
            2.0 * per_sec,
            q(0.5),
            q(0.99),
        );
        if let Some(set) = &theirs {
            line += &format!(
                " | SET {:>8.0}/s (p50 {}, p99 {}) | decisions/SET {:.3}, calls/SET {:.3}",
                set.per_sec,
                set.p50_ms.map_or("?".into(), |v| format!("{v:.2} ms")),
                set.p99_ms.map_or("?".into(), |v| format!("{v:.2} ms")),
                per_sec / set.per_sec,
                2.0 * per_sec / set.per_sec,
            );
        }
        println!("{line}");
        println!(
            "            server time per call: script {script_us:.1} µs{} (INFO commandstats, \
             every client of the server)",
            match theirs {
                Some(_) => format!(", SET {set_us:.2} µs"),
                None => String::new(),
            }
        );
        rows.push((per_sec, theirs.map(|s| s.per_sec)));
    }
    let ours: Vec<f64> = rows.iter().map(|r| r.0).collect();
    let mut line = format!(
        "   median: ours {:>8.0} decisions/s = {:>8.0} script calls/s",
        median(&ours),
        2.0 * median(&ours)
    );
    if rows.iter().all(|r| r.1.is_some()) {
        let sets: Vec<f64> = rows.iter().map(|r| r.1.unwrap_or(0.0)).collect();
        let ratios: Vec<f64> = rows.iter().map(|r| r.0 / r.1.unwrap_or(1.0)).collect();
        line += &format!(
            " | SET {:>8.0}/s | decisions/SET {:.3}, calls/SET {:.3} (medians of the rounds' \
             ratios)",
            median(&sets),
            median(&ratios),
            2.0 * median(&ratios)
        );
    }
    println!("{line}");
    assert_eq!(limiter.live_reservations(), 0, "every reservation settled");
}

// ---------------------------------------------------------------------------------------------
// 2. Added latency per request: gateway with Redis, gateway in memory, the mock alone.

struct Gateway {
    url: String,
    key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// A gateway built as `tiergate serve` builds it (defaults but for the listener, the database,
/// the admin token, and `redis`), with a workspace on a roomy tier and a key.
async fn gateway(upstream: &str, redis: Option<(&str, &str)>) -> Gateway {
    let dir = tempfile::tempdir().expect("a temp dir");
    let raw = RawSettings {
        listen: Some("127.0.0.1:0".into()),
        database: Some(format!(
            "sqlite://{}",
            dir.path().join("tiergate.db").display()
        )),
        admin_token: Some(ADMIN.into()),
        redis: redis.map(|(url, _)| url.to_string()),
        redis_prefix: redis.map(|(_, prefix)| prefix.to_string()),
        upstream: RawUpstream {
            url: Some(upstream.to_string()),
            ..RawUpstream::default()
        },
        ..RawSettings::default()
    };
    let config = Config::try_from(raw).expect("a valid config");
    let app = tiergate::app(config, Arc::new(SystemClock))
        .await
        .expect("the gateway starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        app.serve(listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("the gateway serves");
    });
    let admin = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Value| {
        admin
            .request(method, format!("{url}/admin/v1{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let tier = json!({
        "requests_per_second": 1_000_000,
        "tokens_per_minute": MAX_TOKENS_PER_MINUTE,
        "tokens_per_month": MAX_TOKENS_PER_MONTH,
        "concurrent_requests": 1_000,
        "models": {MODEL: {"tokens_per_minute": MAX_TOKENS_PER_MINUTE}},
    });
    let ok = |r: reqwest::Response| async move {
        let status = r.status();
        let body: Value = r.json().await.expect("a JSON answer");
        assert!(status.is_success(), "admin API: {status} {body}");
        body
    };
    ok(call(reqwest::Method::PUT, "/tiers/bench", tier)
        .await
        .unwrap())
    .await;
    let ws = ok(call(
        reqwest::Method::POST,
        "/workspaces",
        json!({"name": "bench", "tier": "bench"}),
    )
    .await
    .unwrap())
    .await;
    let id = ws["id"].as_i64().expect("a workspace id");
    let key = ok(call(
        reqwest::Method::POST,
        &format!("/workspaces/{id}/keys"),
        json!({}),
    )
    .await
    .unwrap())
    .await;
    Gateway {
        url,
        key: key["key"].as_str().expect("a key").to_string(),
        stop,
        server,
        _dir: dir,
    }
}

/// One of the compared paths, on a connection of its own.
struct Target {
    name: &'static str,
    endpoint: String,
    auth: Option<HeaderValue>,
    client: reqwest::Client,
    /// Per round.
    samples: Vec<Vec<Duration>>,
}

impl Target {
    fn new(name: &'static str, base: &str, key: Option<&str>) -> Target {
        Target {
            name,
            endpoint: format!("{base}/v1/chat/completions"),
            auth: key.map(|k| HeaderValue::from_str(&format!("Bearer {k}")).unwrap()),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .build()
                .unwrap(),
            samples: vec![Vec::new(); ROUNDS],
        }
    }

    async fn send(&self, body: &Bytes) -> Duration {
        let started = Instant::now();
        let mut request = self
            .client
            .post(&self.endpoint)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.expect("an answer");
        let status = response.status();
        let answer = response.bytes().await.expect("a body");
        let took = started.elapsed();
        assert!(
            status.is_success(),
            "{}: {status} {}",
            self.name,
            String::from_utf8_lossy(&answer)
        );
        took
    }
}

async fn latency(plan: &Plan, url: &str, prefix: &str) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = format!("http://{}", listener.local_addr().unwrap());
    let (stop_mock, mock_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tiergate::mock_upstream::serve(
        listener,
        tiergate::mock_upstream::MockConfig::default(),
        async {
            let _ = mock_stopped.await;
        },
    ));
    let memory = gateway(&mock, None).await;
    let redis = gateway(&mock, Some((url, prefix))).await;
    let mut paths = [
        Target::new("mock alone", &mock, None),
        Target::new("gateway, in memory", &memory.url, Some(&memory.key)),
        Target::new("gateway, Redis", &redis.url, Some(&redis.key)),
    ];
    let body = Bytes::from(
        json!({
            "model": MODEL,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hello"}],
        })
        .to_string(),
    );
    println!(
        "\n2. Latency per request, sequential, one keep-alive connection per path, \
         {} requests per path per round in batches of {} that take turns (POST \
         /v1/chat/completions, {} bytes, mock upstream in-process):",
        plan.batches * plan.batch,
        plan.batch,
        body.len()
    );
    for path in &paths {
        for _ in 0..plan.warmup {
            path.send(&body).await;
        }
    }
    let mut conn = redis_connection(url).await.expect("Redis answered before");
    let before = server_time(&mut conn, LIMITER_CALLS).await;
    for round in 0..ROUNDS {
        for b in 0..plan.batches {
            // Each path goes first, second and third in turn.
            for i in 0..paths.len() {
                let path = &mut paths[(b + i) % 3];
                for _ in 0..plan.batch {
                    let took = path.send(&body).await;
                    path.samples[round].push(took);
                }
            }
        }
        for path in &mut paths {
            path.samples[round].sort();
        }
        let p50 = |i: usize| ms(quantile(&paths[i].samples[round], 0.5));
        println!(
            "   round {}: p50 mock {:.3} ms, memory {:.3} ms, Redis {:.3} ms | Redis − memory \
             {:+.3} ms, memory − mock {:+.3} ms",
            round + 1,
            p50(0),
            p50(1),
            p50(2),
            p50(2) - p50(1),
            p50(1) - p50(0),
        );
    }
    let calls = server_time(&mut conn, LIMITER_CALLS).await.0 - before.0;
    let all: Vec<Vec<Duration>> = paths
        .iter()
        .map(|p| {
            let mut v: Vec<Duration> = p.samples.concat();
            v.sort();
            v
        })
        .collect();
    let stats = |v: &[Duration]| {
        let mean = v.iter().sum::<Duration>() / v.len() as u32;
        [0.5, 0.9, 0.99]
            .map(|q| ms(quantile(v, q)))
            .into_iter()
            .chain([ms(mean)])
    };
    let s: Vec<Vec<f64>> = all.iter().map(|v| stats(v).collect()).collect();
    println!(
        "   all rounds ({} requests per path):   p50 ms    p90 ms    p99 ms   mean ms",
        all[0].len()
    );
    for (path, s) in paths.iter().zip(&s) {
        let cells: Vec<String> = s.iter().map(|v| format!("{v:>8.3}")).collect();
        println!("     {:<28} {}", path.name, cells.join("  "));
    }
    let diff = |a: usize, b: usize, name: &str| {
        let cells: Vec<String> = (0..4)
            .map(|i| format!("{:>+8.3}", s[a][i] - s[b][i]))
            .collect();
        println!("     {name:<28} {}", cells.join("  "));
    };
    diff(2, 1, "Redis − memory (added)");
    diff(1, 0, "memory − mock (the gateway)");
    diff(2, 0, "Redis − mock");
    // The Redis figure means something only if every decision was Redis's.
    let metrics = reqwest::get(format!("{}/metrics", redis.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let fallback = count("tiergate_limiter_fallback_total");
    let errors = count("tiergate_limiter_backend_errors_total");
    println!(
        "   script calls per request on the Redis path: {:.2} (every client of the server)",
        calls as f64 / all[2].len() as f64
    );
    println!(
        "   the Redis gateway's decisions made without Redis: {fallback}, Redis errors: {errors}{}",
        if fallback + errors > 0.0 {
            " (the Redis figures above include fallbacks)"
        } else {
            ""
        }
    );
    for gw in [memory, redis] {
        let _ = gw.stop.send(());
        gw.server.await.expect("the gateway stops");
    }
    let _ = stop_mock.send(());
}

// ---------------------------------------------------------------------------------------------
// 3. Memory per active workspace.

async fn memory(plan: &Plan, url: &str, prefix: &str) {
    let limiter = redis_limiter(url, prefix);
    let limits = limits();
    let mut conn = redis_connection(url).await.expect("Redis answered before");
    let ws: WorkspaceId = 1;
    let tag = format!("{{{prefix}:{ws}}}");
    let keys = [tag.clone(), format!("{tag}:r"), format!("{tag}:e")];
    println!(
        "\n3. Redis memory of one workspace (MEMORY USAGE ... SAMPLES 0 of {tag}, {tag}:r, \
         {tag}:e; all limits incl. one model):"
    );
    println!(
        "   {:<34} {:>8} {:>8} {:>8} {:>8}  encodings",
        "", "{ws}", ":r", ":e", "total"
    );
    let show = |what: String| {
        let keys = keys.clone();
        let mut conn = conn.clone();
        async move {
            let mut sizes = Vec::new();
            let mut encodings = Vec::new();
            for key in &keys {
                let size: Option<u64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(key)
                    .arg("SAMPLES")
                    .arg(0)
                    .query_async(&mut conn)
                    .await
                    .expect("MEMORY USAGE");
                let encoding: Option<String> = redis::cmd("OBJECT")
                    .arg("ENCODING")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .expect("OBJECT ENCODING");
                sizes.push(size.unwrap_or(0));
                encodings.push(encoding.unwrap_or_else(|| "-".into()));
            }
            let total: u64 = sizes.iter().sum();
            println!(
                "   {what:<34} {:>8} {:>8} {:>8} {:>8}  {}",
                sizes[0],
                sizes[1],
                sizes[2],
                total,
                encodings.join("/")
            );
            total
        }
    };
    let mut held = Vec::new();
    let mut last = (0, 0);
    for &n in plan.in_flight {
        while held.len() < n {
            held.push(reserve(&limiter, ws, &limits).await);
        }
        let total = show(format!("{n} in flight")).await;
        if last.0 > 0 {
            println!(
                "   {:<34} {:>+8.0} bytes per reservation from {} to {n}",
                "",
                (total - last.1) as f64 / (n - last.0) as f64,
                last.0
            );
        }
        last = (n, total);
    }
    for r in held.drain(1..) {
        settle(&limiter, &r, &limits).await;
    }
    show(format!("1 in flight, {} settled", last.0 - 1)).await;
    for r in held.drain(..) {
        settle(&limiter, &r, &limits).await;
    }
    show(format!("none in flight, {} settled", last.0)).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[1])
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    println!(
        "   (settled records stay as tombstones for {} s, reaped by later calls; the records' keys \
         expire {} s after the last call that renews them)",
        tiergate::limiter::redis::TOMBSTONE.as_secs(),
        ttl / 1000
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers.

async fn redis_connection(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connecting timed out".to_string())?
    .map_err(|e| e.to_string())
}

async fn ping(url: &str) -> Result<(), String> {
    let mut conn = redis_connection(url).await?;
    let answer: String = tokio::time::timeout(
        Duration::from_secs(2),
        redis::cmd("PING").query_async(&mut conn),
    )
    .await
    .map_err(|_| "PING timed out".to_string())?
    .map_err(|e| e.to_string())?;
    match answer.as_str() {
        "PONG" => Ok(()),
        other => Err(format!("it answered {other:?} to PING")),
    }
}

/// Deletes every key this run made: they all start with `{prefix`.
async fn delete_keys(url: &str, prefix: &str) {
    let Ok(mut conn) = redis_connection(url).await else {
        return;
    };
    let pattern = format!("{{{prefix}*");
    let mut cursor = 0u64;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .expect("UNLINK");
            deleted += n;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    println!("\n(deleted this run's {deleted} keys, {pattern})");
}

/// The commands the limiter's calls are counted under: its function library (`FCALL`), or the
/// script on a server without functions.
const LIMITER_CALLS: &str = "fcall+evalsha";

/// (calls, microseconds) the server has spent on `command` so far (`INFO commandstats`; `a+b`
/// sums several): all clients' together, since the server is shared.
async fn server_time(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    let mut total = (0, 0);
    for command in command.split('+') {
        let line = info
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:")))
            .unwrap_or("");
        let field = |name: &str| -> u64 {
            line.split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        total.0 += field("calls");
        total.1 += field("usec");
    }
    total
}

/// Microseconds per call between two `server_time`s.
fn per_call(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64
}

/// `CI` set, and not `0` or `false`: as `tests/support/redis.rs` reads it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.trim().is_empty() && !matches!(v.trim(), "0" | "false"))
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
