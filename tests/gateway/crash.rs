//! Crashes and stops of a `tiergate serve` process on SQLite, under streaming and non-streaming
//! load. The upstream's own count is what the clients were answered: every request reports a
//! usage of its own (`x-mock-usage: N,1`, so N + 1 tokens, different for every request). The
//! ledger adds usage up per workspace, day and model, so what is checked is its totals.
//!
//! - SIGKILL: the ledger's requests and tokens are at least those of every request that finished
//!   more than one ledger flush interval before the kill (plus the time a write takes), and at
//!   most those of the requests answered or in flight; keys and workspaces all survive.
//! - SIGTERM: requests in flight, streams included, finish; the ledger then holds exactly the
//!   requests that finished, and their tokens.
//! - A stop right after a client left a stream waits for the gateway to read that stream's usage
//!   and settle it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::harness::Mock;
use crate::process::{admin, ledger_totals, workspace, Process};

/// The ledger writer's flush interval, and how long a write may take on a busy machine.
const FLUSH: Duration = Duration::from_millis(250);
const WRITE: Duration = Duration::from_millis(500);

struct Installation {
    _dir: tempfile::TempDir,
    db_path: std::path::PathBuf,
    db: String,
    mock: Mock,
}

impl Installation {
    async fn new() -> Installation {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("tiergate.db");
        let db = format!("sqlite://{}", db_path.display());
        Installation {
            _dir: dir,
            db_path,
            db,
            mock: Mock::start().await,
        }
    }

    async fn start(&self, args: &[&str]) -> Process {
        Process::start(&self.db, &self.mock.url, args).await
    }
}

/// One request of the load.
#[derive(Debug, Clone)]
struct Sent {
    tokens: u64,
    stream: bool,
    /// The gateway's `x-request-id`, once its answer's head arrived.
    id: Option<String>,
    headed: Option<Instant>,
    finished: Option<Instant>,
}

/// Streaming and non-streaming clients sending requests one after another until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, key: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(1));
        let client = Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let tasks = (0..clients)
            .map(|i| {
                let (stop, sent, next, client) =
                    (stop.clone(), sent.clone(), next.clone(), client.clone());
                let (url, key) = (format!("{url}/v1/chat/completions"), key.to_string());
                let stream = i % 2 == 0;
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        let index = {
                            let mut sent = sent.lock().unwrap();
                            sent.push(Sent {
                                tokens: n + 1,
                                stream,
                                id: None,
                                headed: None,
                                finished: None,
                            });
                            sent.len() - 1
                        };
                        // Streams: 300 ms to the first event, then ~19 ms apart.
                        let latency = if stream { "300" } else { "40" };
                        let r = client
                            .post(&url)
                            .bearer_auth(&key)
                            .header("x-mock-usage", format!("{n},1"))
                            .header("x-mock-latency-ms", latency)
                            .json(&json!({"model": "mistral-small-latest", "stream": stream,
                                "messages": [{"role": "user", "content": "Hello"}]}))
                            .send()
                            .await;
                        let Ok(r) = r else { continue };
                        if r.status() != StatusCode::OK {
                            continue;
                        }
                        let id = r
                            .headers()
                            .get("x-request-id")
                            .map(|v| v.to_str().unwrap().to_string());
                        {
                            let mut sent = sent.lock().unwrap();
                            sent[index].id = id;
                            sent[index].headed = Some(Instant::now());
                        }
                        let whole = match r.text().await {
                            Ok(text) => !stream || text.trim_end().ends_with("data: [DONE]"),
                            Err(_) => false,
                        };
                        if whole {
                            sent.lock().unwrap()[index].finished = Some(Instant::now());
                        }
                    }
                })
            })
            .collect();
        Load { stop, sent, tasks }
    }

    async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.sent).unwrap().into_inner().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_loses_at_most_one_flush_of_what_finished_and_counts_nothing_twice() {
    let install = Installation::new().await;
    let mut gateway = install.start(&[]).await;
    let (ws, key) = workspace(&gateway.url, "load").await;
    let (_, other_key) = workspace(&gateway.url, "bystander").await;

    let load = Load::start(&gateway.url, &key, 16);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    load.stop.store(true, Ordering::SeqCst);
    let killed_at = Instant::now();
    gateway.kill();
    let sent = load.stop().await;

    let finished: Vec<&Sent> = sent.iter().filter(|s| s.finished.is_some()).collect();
    let in_flight: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.finished.is_none() && s.id.is_some())
        .collect();
    assert!(finished.iter().any(|s| s.stream) && finished.iter().any(|s| !s.stream));
    assert!(
        in_flight.iter().any(|s| s.stream),
        "streams were in flight at the kill"
    );

    // Started again on the same file.
    let gateway = install.start(&[]).await;
    let (requests, tokens) = ledger_totals(&install.db_path, ws).await;
    // Everything that finished more than a flush (and a write) before the kill is there, and
    // nothing that was not answered or in flight.
    let bound = killed_at - FLUSH - WRITE;
    let must: Vec<&&Sent> = finished
        .iter()
        .filter(|s| s.finished.unwrap() < bound)
        .collect();
    let answered = finished.len() + in_flight.len();
    eprintln!(
        "{} sent, {} finished ({} more than {:?} before the kill), {} in flight; ledger: {} requests",
        sent.len(),
        finished.len(),
        must.len(),
        FLUSH + WRITE,
        in_flight.len(),
        requests
    );
    assert!(must.len() > 20, "enough finished early: {}", must.len());
    assert!(
        (must.len() as u64..=answered as u64).contains(&requests),
        "{requests} requests in the ledger, not in {}..={answered}",
        must.len()
    );
    let at_least: u64 = must.iter().map(|s| s.tokens).sum();
    let at_most: u64 = finished.iter().chain(&in_flight).map(|s| s.tokens).sum();
    assert!(
        (at_least..=at_most).contains(&tokens),
        "{tokens} tokens in the ledger, not in {at_least}..={at_most}"
    );
    // Each request's tokens are its number + 1: the ledger's tokens are those of `requests`
    // distinct requests, no fewer than the smallest such and no more than the largest.
    let mut all: Vec<u64> = finished
        .iter()
        .chain(&in_flight)
        .map(|s| s.tokens)
        .collect();
    all.sort_unstable();
    let smallest: u64 = all.iter().take(requests as usize).sum();
    let largest: u64 = all.iter().rev().take(requests as usize).sum();
    assert!(
        (smallest..=largest).contains(&tokens),
        "{tokens} tokens cannot be {requests} distinct answered requests"
    );

    // The month as the gateway reports it is the ledger's.
    let limits: Value = Client::new()
        .get(format!("{}/v1/limits", gateway.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        limits["usage"]["tokens_this_month"].as_u64().unwrap(),
        tokens
    );
    assert_eq!(
        limits["usage"]["requests_this_month"].as_u64().unwrap(),
        requests
    );

    // No key and no workspace lost.
    for k in [&key, &other_key] {
        let r = Client::new()
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(k)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let list = admin(
        &gateway.url,
        reqwest::Method::GET,
        "/workspaces",
        Value::Null,
    )
    .await;
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"load") && names.contains(&"bystander"),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_gateway_finishes_what_is_in_flight_and_settles_all_of_it() {
    stop_finishes_and_settles(&[]).await;
}

/// The same on one thread (`--workers 1`, tokio's single-threaded scheduler): streams, the
/// ledger writer and the stop all share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_one_thread_serves_and_stops_the_same() {
    stop_finishes_and_settles(&["--workers", "1"]).await;
}

async fn stop_finishes_and_settles(args: &[&str]) {
    let install = Installation::new().await;
    let mut gateway = install.start(args).await;
    let (ws, key) = workspace(&gateway.url, "load").await;

    let load = Load::start(&gateway.url, &key, 16);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    load.stop.store(true, Ordering::SeqCst);
    let stopped_at = Instant::now();
    gateway.terminate();
    let sent = load.stop().await;
    let status = gateway.exited(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    eprintln!("exited {:?} after SIGTERM", stopped_at.elapsed());

    // What was in flight finished, streams included.
    let headed_before: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.headed.is_some_and(|t| t < stopped_at))
        .collect();
    let drained: Vec<&&Sent> = headed_before
        .iter()
        .filter(|s| s.finished.is_some_and(|t| t > stopped_at))
        .collect();
    assert!(
        drained.iter().any(|s| s.stream),
        "streams were in flight at the stop and finished"
    );
    let unfinished: Vec<&&Sent> = headed_before
        .iter()
        .filter(|s| s.finished.is_none())
        .collect();
    assert!(unfinished.is_empty(), "cut by the stop: {unfinished:?}");

    // Everything that finished is in the ledger, once; nothing else is.
    let finished: Vec<&Sent> = sent.iter().filter(|s| s.finished.is_some()).collect();
    let want = (
        finished.len() as u64,
        finished.iter().map(|s| s.tokens).sum::<u64>(),
    );
    assert_eq!(ledger_totals(&install.db_path, ws).await, want);
    eprintln!(
        "{} finished, {} of them after the stop",
        finished.len(),
        drained.len()
    );
}

/// A client leaves a stream, and the gateway is stopped at once: the stop waits for the gateway
/// to read that stream's usage (within `usage_drain_ms`) and to settle it before the last ledger
/// flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_the_settlement_of_a_client_that_left() {
    let install = Installation::new().await;
    let mut gateway = install.start(&[]).await;
    let (ws, key) = workspace(&gateway.url, "left").await;
    // 800 ms before the first event, then 50 ms apart: the usage comes about 850 ms after it.
    let r = Client::new()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .header("x-mock-latency-ms", "800")
        .header("x-mock-usage", "7,16")
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let mut r = r;
    r.chunk().await.unwrap().expect("a first event");
    drop(r);
    gateway.terminate();
    let status = gateway.exited(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        ledger_totals(&install.db_path, ws).await,
        (1, 23),
        "settled from the usage read after the client left"
    );
}
