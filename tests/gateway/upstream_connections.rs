//! The gateway's connections to its upstream: kept and reused across requests, each request
//! naming the upstream's host and its path, and a connection the upstream closed never failing
//! the request sent after it. The upstream here is a bare HTTP/1.1 server that counts the
//! connections it accepts and records each request's head.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tiergate::config::RawSettings;
use tiergate::http::upstream::Upstream;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::harness::*;

/// Tokens each answer reports: 5 prompt, 7 completion.
const TOKENS: u64 = 12;

#[derive(Default)]
struct Seen {
    /// Closes every connection that waits for its next request.
    hang_up: tokio::sync::Notify,
    connections: AtomicUsize,
    /// Connections the gateway closed (the end of their stream seen).
    closed: AtomicUsize,
    /// Each request's line and `Host`.
    heads: Mutex<Vec<(String, String)>>,
}

/// An upstream on a free port. It answers each request on a connection kept alive, or, with
/// `close_after_each`, closes the connection after each answer without saying so first
/// (no `Connection: close`), as an upstream whose idle timeout has passed does.
async fn bare_upstream(close_after_each: bool) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let seen = shared.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::new(read);
                loop {
                    let mut line = String::new();
                    tokio::select! {
                        n = read.read_line(&mut line) => if n.unwrap_or(0) == 0 {
                            seen.closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        },
                        _ = seen.hang_up.notified() => return,
                    }
                    let (mut host, mut length) = (String::new(), 0usize);
                    loop {
                        let mut header = String::new();
                        read.read_line(&mut header).await.unwrap();
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        let (name, value) = header.split_once(':').unwrap();
                        match name.to_ascii_lowercase().as_str() {
                            "host" => host = value.trim().to_string(),
                            "content-length" => length = value.trim().parse().unwrap(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    read.read_exact(&mut body).await.unwrap();
                    seen.heads
                        .lock()
                        .unwrap()
                        .push((line.trim_end().to_string(), host));
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    let usage = json!({"prompt_tokens": 5, "completion_tokens": 7,
                                       "total_tokens": TOKENS});
                    let (content_type, answer) = if request["stream"] == true {
                        let chunk = json!({"id": "c", "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": {"content": "hi"}}]});
                        let last = json!({"id": "c", "object": "chat.completion.chunk",
                            "choices": [], "usage": usage});
                        (
                            "text/event-stream",
                            format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n"),
                        )
                    } else {
                        let answer = json!({"id": "c", "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "hi"}}],
                            "usage": usage});
                        ("application/json", answer.to_string())
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n\
                         content-length: {}\r\n\r\n",
                        answer.len()
                    );
                    if write.write_all(head.as_bytes()).await.is_err()
                        || write.write_all(answer.as_bytes()).await.is_err()
                    {
                        return;
                    }
                    if close_after_each {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// Limits high enough never to refuse these tests' requests.
fn roomy() -> Value {
    json!({"tokens_per_minute": 1_000_000, "tokens_per_month": 10_000_000})
}

async fn gateway_before(upstream: &str) -> (TestGateway, String) {
    TestGateway::before(upstream, RawSettings::default(), roomy()).await
}

/// Sends plain and streamed chats one after another; each must be answered whole.
async fn chats(gw: &TestGateway, key: &str, n: usize) {
    for i in 0..n {
        let mut body = hello();
        let stream = i % 3 == 2;
        body["stream"] = json!(stream);
        let r = gw.chat(key, body, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        let text = r.text().await.unwrap();
        // A stream ends with its `[DONE]` (the usage chunk the gateway asked for is not passed
        // on to a client that did not); a JSON answer comes whole, with its usage.
        let whole = if stream { "data: [DONE]" } else { "\"usage\"" };
        assert!(text.contains(whole), "request {i}: {text}");
    }
}

async fn month_tokens_reach(gw: &TestGateway, key: &str, want: u64) {
    eventually(Duration::from_secs(10), "every answer settled", || async {
        gw.limits(key).await["usage"]["tokens_this_month"].as_u64() == Some(want)
    })
    .await;
}

#[tokio::test]
async fn requests_one_after_another_share_one_upstream_connection() {
    let (upstream, seen) = bare_upstream(false).await;
    let (gw, key) = gateway_before(&upstream).await;
    chats(&gw, &key, 9).await;
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "one connection, kept alive, for 9 requests in turn (6 plain, 3 streamed)"
    );
    // Each request names the upstream's host and port, and its path alone (origin form).
    let host = upstream.trim_start_matches("http://").to_string();
    let heads = seen.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 9);
    for (line, h) in heads {
        assert_eq!(line, "POST /v1/chat/completions HTTP/1.1");
        assert_eq!(h, host);
    }
    month_tokens_reach(&gw, &key, 9 * TOKENS).await;
    // The same, from outside.
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "tiergate_upstream_connections_opened_total"),
        1.0
    );
    assert_eq!(sample(&m, "tiergate_upstream_idle_connections"), 1.0);
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {exposition}"))
}

#[tokio::test]
async fn concurrent_requests_open_connections_that_are_then_reused() {
    let (upstream, seen) = bare_upstream(false).await;
    let (gw, key) = gateway_before(&upstream).await;
    let gw = Arc::new(gw);
    for _ in 0..3 {
        let mut wave = Vec::new();
        for _ in 0..4 {
            let (gw, key) = (gw.clone(), key.clone());
            wave.push(tokio::spawn(async move { chats(&gw, &key, 1).await }));
        }
        for w in wave {
            w.await.unwrap();
        }
    }
    // At most 4 at once, so at most 4 connections, whatever the timing; 12 requests.
    let opened = seen.connections.load(Ordering::SeqCst);
    assert!((1..=4).contains(&opened), "{opened} connections");
    assert_eq!(seen.heads.lock().unwrap().len(), 12);
    month_tokens_reach(&gw, &key, 12 * TOKENS).await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_does_not_fail_the_next_request() {
    let (upstream, seen) = bare_upstream(true).await;
    let (gw, key) = gateway_before(&upstream).await;
    chats(&gw, &key, 6).await;
    // A connection per request: none was sent on one the upstream had closed (it would have
    // been refused with a 502, or retried on a new one).
    assert_eq!(seen.connections.load(Ordering::SeqCst), 6);
    assert_eq!(seen.heads.lock().unwrap().len(), 6);
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "tiergate_upstream_connections_opened_total"),
        6.0
    );
    month_tokens_reach(&gw, &key, 6 * TOKENS).await;
}

#[tokio::test]
async fn idle_connections_the_upstream_closed_are_let_go() {
    let (url, seen) = bare_upstream(false).await;
    let upstream = upstream_client(&url, None);
    let ask = || async {
        let answer = upstream.client.request(chat_request(&url)).await.unwrap();
        assert_eq!(answer.status(), 200);
        // Read to its end, which puts the connection back on the idle list.
        http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap();
    };
    ask().await;
    assert_eq!(upstream.client.idle_connections(), 1);
    upstream.client.close_idle();
    assert_eq!(
        upstream.client.idle_connections(),
        1,
        "open and fresh: kept"
    );

    seen.hang_up.notify_waiters();
    eventually(
        Duration::from_secs(5),
        "the closed connection let go",
        || async {
            upstream.client.close_idle();
            upstream.client.idle_connections() == 0
        },
    )
    .await;
    ask().await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

/// The gateway's upstream client alone, for the upstream at `url`.
fn upstream_client(url: &str, max_idle_connections: Option<u64>) -> Upstream {
    let mut raw = RawSettings::default();
    raw.upstream.url = Some(url.to_string());
    raw.upstream.max_idle_connections = max_idle_connections;
    let config = tiergate::Config::try_from(raw).unwrap();
    Upstream::new(&config, Default::default()).unwrap()
}

/// A chat request straight to the upstream at `url`, as the gateway's client sends it.
fn chat_request(url: &str) -> axum::http::Request<http_body_util::Full<axum::body::Bytes>> {
    axum::http::Request::post(format!("{url}/v1/chat/completions"))
        .body(http_body_util::Full::new(axum::body::Bytes::from(
            hello().to_string(),
        )))
        .unwrap()
}

/// A burst of concurrent requests opens as many connections; once it has passed, only
/// `upstream.max_idle_connections` stay open, the most recently used, and the rest are closed.
#[tokio::test]
async fn idle_connections_past_the_bound_are_closed() {
    let (url, seen) = bare_upstream(false).await;
    let upstream = upstream_client(&url, Some(2));
    // Five answers held with their bodies unread: each holds its connection.
    let mut answers = Vec::new();
    for _ in 0..5 {
        let answer = upstream.client.request(chat_request(&url)).await.unwrap();
        assert_eq!(answer.status(), 200);
        answers.push(answer);
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 5);
    assert_eq!(upstream.client.idle_connections(), 0);
    for answer in answers {
        http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap();
    }
    assert_eq!(upstream.client.idle_connections(), 2);
    eventually(
        Duration::from_secs(5),
        "three connections closed",
        || async { seen.closed.load(Ordering::SeqCst) == 3 },
    )
    .await;
    // The two kept are reused: no new connection for two requests in turn.
    for _ in 0..2 {
        let answer = upstream.client.request(chat_request(&url)).await.unwrap();
        http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap();
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 5);

    // With 0, none is kept: each request opens one, and it is closed after its answer.
    let (url, seen) = bare_upstream(false).await;
    let upstream = upstream_client(&url, Some(0));
    for _ in 0..2 {
        let answer = upstream.client.request(chat_request(&url)).await.unwrap();
        http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap();
    }
    assert_eq!(upstream.client.idle_connections(), 0);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    eventually(Duration::from_secs(5), "both closed", || async {
        seen.closed.load(Ordering::SeqCst) == 2
    })
    .await;
}
