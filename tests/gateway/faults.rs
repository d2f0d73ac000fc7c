//! Faults on either side of the gateway: upstreams that stall, break or redirect, clients that
//! are slow (slowloris) or leave, and one workspace hammering the gateway. Each holds nothing
//! once its timeout has passed: no concurrency slot, no reservation, no connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tiergate::config::RawSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A gateway whose upstream bodies may stay silent 400 ms, and answers' headers may take 1 s.
async fn impatient() -> (TestGateway, String) {
    let mut raw = RawSettings::default();
    raw.upstream.idle_read_timeout_ms = Some(400);
    raw.upstream.timeout_secs = Some(1);
    raw.rate_limit_headers = Some(vec!["openai".into(), "ietf".into(), "mistral".into()]);
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier(
        "t",
        json!({"tokens_per_minute": 100_000, "tokens_per_month": 1_000_000,
               "concurrent_requests": 2}),
    )
    .await;
    let (_, key) = gw.workspace("t").await;
    (gw, key)
}

fn stream_body() -> Value {
    json!({"model": "m", "stream": true, "max_tokens": 5,
           "messages": [{"role": "user", "content": "Hello, world!"}]})
}

/// Reads a body to its end; true if it ended broken. Fails if it has not ended within 5 s.
async fn ends_broken(r: reqwest::Response) -> (bool, Vec<u8>) {
    let mut body = r.bytes_stream();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => got.extend_from_slice(&c),
                Err(_) => return true,
            }
        }
        false
    })
    .await;
    (read.expect("the body ends within 5 s"), got)
}

/// The workspace holds nothing: no request in flight, no tokens reserved.
async fn holds_nothing(gw: &TestGateway, key: &str) {
    eventually(
        Duration::from_secs(5),
        "slots and reservations released",
        || async {
            let usage = gw.limits(key).await["usage"].clone();
            usage["in_flight"] == 0 && usage["tokens_reserved"] == 0
        },
    )
    .await;
}

fn reserved(r: &reqwest::Response) -> u64 {
    1_000_000 - header_u64(r, "x-ratelimit-remaining-tokens-month")
}

#[tokio::test]
async fn a_stream_that_stalls_after_its_headers_is_ended_and_refunded() {
    let (gw, key) = impatient().await;
    let started = Instant::now();
    let r = gw
        .chat(
            &key,
            stream_body(),
            &[("x-mock-stall-after-chunks", "0"), ("x-mock-tag", "stall")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let (broken, got) = ends_broken(r).await;
    assert!(broken && got.is_empty(), "ended broken, with nothing");
    eprintln!(
        "a stalled stream was ended after {:?} (idle timeout 400 ms)",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    holds_nothing(&gw, &key).await;
    let limits = gw.limits(&key).await;
    assert_eq!(
        limits["usage"]["tokens_this_month"], 0,
        "nothing delivered: refunded"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tiergate_upstream_idle_timeouts_total 1"),
        "{metrics}"
    );
    // The gateway let go of the upstream's connection too.
    eventually(
        Duration::from_secs(3),
        "upstream connection closed",
        || async { gw.upstream_stats("stall").await.in_flight == 0 },
    )
    .await;
}

#[tokio::test]
async fn a_stream_that_stalls_midway_is_ended_and_charged_its_estimate() {
    let (gw, key) = impatient().await;
    let r = gw
        .chat(&key, stream_body(), &[("x-mock-stall-after-chunks", "2")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let estimate = reserved(&r);
    let (broken, got) = ends_broken(r).await;
    assert!(broken);
    assert_eq!(
        String::from_utf8_lossy(&got).matches("data: ").count(),
        2,
        "the client got what came before the stall"
    );
    holds_nothing(&gw, &key).await;
    let used = gw.settled_month_tokens(&key).await;
    assert!(estimate > 0);
    assert_eq!(used, estimate, "delivered: never refunded");
}

#[tokio::test]
async fn an_error_body_that_never_ends_is_a_504_and_refunded() {
    let (gw, key) = impatient().await;
    let started = Instant::now();
    let answer = async {
        let r = gw
            .chat(
                &key,
                hello(),
                &[("x-mock-status", "500"), ("x-mock-stall-after-chunks", "0")],
            )
            .await;
        (r.status(), r.json::<Value>().await)
    };
    let (status, v) = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("answered within 5 s");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let v = v.unwrap();
    assert_eq!(v["type"], "upstream_timeout", "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("Nothing was charged"));
    holds_nothing(&gw, &key).await;
    let limits = gw.limits(&key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], 0);
    assert_eq!(limits["usage"]["token_bucket"]["level"], 100_000);
}

/// A 502/504 after the upstream's headers: the request is charged its estimate, and the message
/// says so; one before its headers is charged nothing, and says that.
#[tokio::test]
async fn an_answer_cut_after_its_headers_says_what_it_charged() {
    let (gw, key) = impatient().await;
    let cases = [
        (
            "x-mock-stall-after-chunks",
            "0",
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
        ),
        (
            "x-mock-fail-after-chunks",
            "0",
            StatusCode::BAD_GATEWAY,
            "upstream_error",
        ),
    ];
    let mut charged_so_far = 0;
    for (control, value, status, kind) in cases {
        let r = gw.chat(&key, hello(), &[(control, value)]).await;
        assert_eq!(r.status(), status, "{control}");
        let estimate = reserved(&r) - charged_so_far;
        let cost = header(&r, "x-ratelimit-tokens-query-cost").map(str::to_owned);
        assert_eq!(cost, Some(estimate.to_string()), "{control}");
        // Charged without a result: the upstream's id is what its support asks for.
        let upstream_id = header(&r, "x-upstream-request-id").unwrap_or("");
        assert!(
            upstream_id.starts_with("mock-req-"),
            "{control}: {upstream_id:?}"
        );
        assert!(header(&r, "x-request-id").is_some_and(|id| id.starts_with("req_")));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], kind, "{v}");
        assert_eq!(v["code"], "upstream_incomplete", "{v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("charged its estimate: {estimate} tokens")),
            "{message}"
        );
        assert!(!message.contains("Nothing was charged"), "{message}");
        charged_so_far += estimate;
        holds_nothing(&gw, &key).await;
        assert_eq!(
            gw.limits(&key).await["usage"]["tokens_this_month"],
            charged_so_far,
            "{control}: the accounting matches the message"
        );
    }
    // No headers in time: nothing charged, and the message says so.
    let r = gw
        .chat(&key, hello(), &[("x-mock-latency-ms", "3000")])
        .await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("Nothing was charged"));
    assert_eq!(
        gw.limits(&key).await["usage"]["tokens_this_month"],
        charged_so_far
    );
}

#[tokio::test]
async fn upstream_redirects_are_passed_on_never_followed() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 10_000})).await;
    // A client that does not follow redirects itself, to see what the gateway answered.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("x-mock-redirect", "/v1/models")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(header(&r, "location"), Some("/v1/models"));
    assert_eq!(
        gw.upstream_count().await,
        1,
        "the redirect was not followed"
    );
    assert_eq!(
        gw.limits(&key).await["usage"]["token_bucket"]["level"],
        10_000,
        "refunded"
    );
}

#[tokio::test]
async fn client_headers_that_choose_the_billed_account_are_not_forwarded() {
    let mut raw = RawSettings::default();
    raw.upstream.drop_request_headers = Some(vec!["X-Billing-Tenant".into()]);
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    let (_, key) = gw.workspace("free").await;
    let sent = [
        ("x-mock-echo-headers", "1"),
        ("openai-organization", "org-someone-else"),
        ("openai-project", "proj_someone_else"),
        ("api-key", "azure-key-of-the-client"),
        ("x-api-key", "another-key-of-the-client"),
        ("cookie", "session=abc"),
        ("ocp-apim-subscription-key", "apim-key-of-the-client"),
        ("x-goog-api-key", "google-key-of-the-client"),
        ("x-goog-user-project", "someone-elses-project"),
        ("x-http-method-override", "POST"),
        ("x-http-method", "POST"),
        ("x-method-override", "POST"),
        ("x-original-url", "/v1/files"),
        ("x-rewrite-url", "/v1/files"),
        ("x-forwarded-prefix", "/admin"),
        ("x-billing-tenant", "acme"),
        ("openai-beta", "assistants=v2"),
        ("x-stainless-lang", "python"),
        ("x-stainless-retry-count", "0"),
        ("user-agent", "OpenAI/Python 1.50.0"),
        // A header that `Connection` names belongs to the hop (RFC 9110, 7.6.1).
        ("connection", "keep-alive, x-hop-only"),
        ("x-hop-only", "for the gateway alone"),
    ];
    let r = gw.chat(&key, hello(), &sent).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let received = &v["received_headers"];
    for dropped in [
        "openai-organization",
        "openai-project",
        "api-key",
        "x-api-key",
        "cookie",
        "ocp-apim-subscription-key",
        "x-goog-api-key",
        "x-goog-user-project",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-billing-tenant",
        "x-hop-only",
    ] {
        assert!(
            received.get(dropped).is_none(),
            "{dropped} reached the upstream: {received}"
        );
    }
    assert_eq!(received["openai-beta"], "assistants=v2");
    assert_eq!(received["x-stainless-lang"], "python");
    assert_eq!(received["x-stainless-retry-count"], "0");
    assert_eq!(received["user-agent"], "OpenAI/Python 1.50.0");
}

#[tokio::test]
async fn over_long_model_names_are_refused_and_not_forwarded() {
    let gw = TestGateway::start().await;
    gw.put_tier("t", json!({"tokens_per_minute": 100_000}))
        .await;
    let (_, key) = gw.workspace("t").await;
    let long = "m".repeat(257);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": long, "messages": []}),
        ),
        ("/v1/responses", json!({"model": long, "input": "hi"})),
        ("/v1/embeddings", json!({"model": long, "input": "hi"})),
    ] {
        let r = gw.post(&key, path, body, &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "invalid_request_error");
        assert!(v["message"].as_str().unwrap().contains("256"), "{v}");
    }
    assert_eq!(gw.upstream_count().await, 0);
    let fits = json!({"model": "m".repeat(256), "messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(gw.chat(&key, fits, &[]).await.status(), StatusCode::OK);
}

/// A gateway that allows 500 ms for a request's head and 800 ms for its body.
async fn strict_listener() -> (TestGateway, String) {
    let raw = RawSettings {
        header_read_timeout_ms: Some(500),
        body_read_timeout_ms: Some(800),
        ..RawSettings::default()
    };
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"concurrent_requests": 5})).await;
    let (_, key) = gw.workspace("t").await;
    (gw, key)
}

/// Writes `bytes` one every `gap` until the server closes the connection; returns how long the
/// connection lasted, or `None` if it was still open when everything was sent.
async fn trickle(
    socket: &mut tokio::net::TcpStream,
    bytes: &[u8],
    gap: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    for b in bytes {
        if socket.write_all(&[*b]).await.is_err() {
            return Some(started.elapsed());
        }
        // A closed connection shows as a read of 0 bytes (or an error) at once.
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(gap, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => return Some(started.elapsed()),
            Err(_) => {}
        }
    }
    None
}

#[tokio::test]
async fn a_client_that_sends_its_headers_slowly_is_cut_off() {
    let (gw, key) = strict_listener().await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Slowloris: a byte every 25 ms, for a head that would take about 4 s.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\nx-padding: {}\r\n\r\n",
        "a".repeat(40)
    );
    let lasted = trickle(&mut socket, head.as_bytes(), Duration::from_millis(25)).await;
    let lasted = lasted.expect("the connection was cut while the head trickled in");
    eprintln!("a head trickling in was cut after {lasted:?} (timeout 500 ms)");
    assert!(lasted < Duration::from_millis(2500), "cut after {lasted:?}");
    // The gateway serves others, and the slow client held nothing.
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    holds_nothing(&gw, &key).await;
}

/// Sends a request's head whole, then its body a byte every 50 ms; returns the answer (read to
/// the connection's end) and how long after the head it ended.
async fn trickle_body(gw: &TestGateway, key: &str, path: &str, body: &str) -> (String, Duration) {
    let addr = gw.url.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The console's forms, as a browser sends them; the APIs' bodies as JSON.
    let kind = if path.starts_with("/console/") {
        format!("application/x-www-form-urlencoded\r\norigin: http://{addr}")
    } else {
        "application/json".to_string()
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    for b in body.as_bytes() {
        if socket.write_all(&[*b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(50), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    // Whatever is left of the answer, to the connection's end.
    let _ = tokio::time::timeout(Duration::from_secs(2), socket.read_to_end(&mut answer)).await;
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_client_that_sends_its_body_slowly_gets_408_and_is_cut_off() {
    let (gw, key) = strict_listener().await;
    let chat = serde_json::to_string(&hello()).unwrap();
    let increase =
        r#"{"use_case": "a slow client", "requested_limits": {"tokens_per_minute": 1000}}"#;
    // The proxy, a workspace route that reads its body through an extractor, and a console
    // form (it answered 400, as if the form were unreadable: an outside audit).
    let sign_in = format!("key={key}");
    for (path, body) in [
        ("/v1/chat/completions", chat.as_str()),
        ("/v1/limit-requests", increase),
        ("/console/sign-in", sign_in.as_str()),
    ] {
        let (answer, lasted) = trickle_body(&gw, &key, path, body).await;
        eprintln!(
            "{path}: a body trickling in was answered and cut after {lasted:?} (timeout 800 ms)"
        );
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("\"request_timeout\""), "{path}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{path}: {answer}"
        );
        assert!(
            lasted < Duration::from_millis(3000),
            "{path}: answered after {lasted:?}"
        );
    }
    assert_eq!(gw.upstream_count().await, 0, "nothing was forwarded");
    holds_nothing(&gw, &key).await;
    let requests = gw
        .client
        .get(format!("{}/v1/limit-requests", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let requests: Value = requests.json().await.unwrap();
    assert_eq!(requests["data"], json!([]), "no increase request was made");
}

#[tokio::test]
async fn clients_that_leave_mid_request_or_mid_stream_hold_nothing() {
    let (gw, key) = impatient().await;
    let addr = gw.url.trim_start_matches("http://").to_string();

    // Gone in the middle of sending its body.
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\ncontent-length: 500\r\n\r\n{{\"model\":"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(socket);
    holds_nothing(&gw, &key).await;

    // Gone while the upstream prepares the answer.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("x-mock-latency-ms", "900")
        .header("x-mock-tag", "left")
        .json(&hello())
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    holds_nothing(&gw, &key).await;
    eventually(
        Duration::from_secs(3),
        "upstream request cancelled",
        || async { gw.upstream_stats("left").await.in_flight == 0 },
    )
    .await;

    // Gone mid-stream.
    let r = gw
        .chat(
            &key,
            stream_body(),
            &[("x-mock-latency-ms", "320"), ("x-mock-usage", "7,5")],
        )
        .await;
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    holds_nothing(&gw, &key).await;

    // All three at once never held both slots for good: two requests fit again.
    let (a, b) = tokio::join!(
        gw.chat(&key, hello(), &[("x-mock-latency-ms", "100")]),
        gw.chat(&key, hello(), &[("x-mock-latency-ms", "100")])
    );
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
}

/// One workspace hammered at ten times its rate by 50 connections, while another sends at half
/// its rate: the other gets every request through, none of them slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_hammered_at_ten_times_its_limit_leaves_another_untouched() {
    let gw = TestGateway::start_with(Options {
        real_clock: true,
        ..Options::default()
    })
    .await;
    gw.put_tier(
        "small",
        json!({"requests_per_second": 20, "burst": 20, "tokens_per_minute": 10_000_000}),
    )
    .await;
    let (_, noisy) = gw.workspace("small").await;
    let (_, quiet) = gw.workspace("small").await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let run_for = Duration::from_secs(3);
    let started = Instant::now();

    #[derive(Default)]
    struct Tally {
        ok: AtomicU64,
        denied: AtomicU64,
        other: AtomicU64,
        slowest_ms: AtomicU64,
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // 50 connections, each a request every 250 ms: 200 requests/s, ten times the limit.
    let send = |key: String, tag: &'static str, every: Duration, tally: Arc<Tally>| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while started.elapsed() < run_for {
                tick.tick().await;
                let sent = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("x-mock-tag", tag)
                    .header("x-mock-latency-ms", "20")
                    .json(&hello())
                    .send()
                    .await;
                let status = match r {
                    Ok(r) => {
                        let s = r.status();
                        let _ = r.bytes().await;
                        Some(s)
                    }
                    Err(_) => None,
                };
                tally
                    .slowest_ms
                    .fetch_max(sent.elapsed().as_millis() as u64, Ordering::Relaxed);
                match status {
                    Some(StatusCode::OK) => &tally.ok,
                    Some(StatusCode::TOO_MANY_REQUESTS) => &tally.denied,
                    _ => &tally.other,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let (loud, calm) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(send(
            noisy.clone(),
            "noisy",
            Duration::from_millis(250),
            loud.clone(),
        ));
    }
    // Two connections, each a request every 200 ms: 10 requests/s, half the limit.
    for _ in 0..2 {
        tasks.push(send(
            quiet.clone(),
            "quiet",
            Duration::from_millis(200),
            calm.clone(),
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);

    let (ok, denied) = (get(&loud.ok), get(&loud.denied));
    eprintln!(
        "noisy: {ok} admitted, {denied} denied, slowest {} ms; quiet: {} admitted, slowest {} ms",
        get(&loud.slowest_ms),
        get(&calm.ok),
        get(&calm.slowest_ms)
    );
    assert!(
        ok + denied >= 300,
        "the noisy workspace sent {} requests",
        ok + denied
    );
    assert!(denied > ok, "the noisy workspace was mostly denied");
    assert!(
        ok as f64 <= 20.0 + 20.0 * elapsed + 1.0,
        "{ok} admitted in {elapsed:.1}s"
    );
    assert_eq!(get(&loud.other), 0);
    assert_eq!(
        gw.upstream_stats("noisy").await.count,
        ok,
        "denials never reached the upstream"
    );

    assert_eq!(
        get(&calm.denied) + get(&calm.other),
        0,
        "every quiet request succeeded"
    );
    assert!(get(&calm.ok) >= 20, "{} quiet requests", get(&calm.ok));
    let slowest = get(&calm.slowest_ms);
    assert!(slowest < 1_000, "a quiet request took {slowest} ms");
}

/// A stop closes the connections still busy after `shutdown_grace_ms` and settles their
/// requests as clients that left (the usage read within `usage_drain_ms`, else the estimate)
/// before the last ledger flush.
#[tokio::test]
async fn a_stop_closes_what_outlives_its_grace_and_settles_it() {
    let raw = RawSettings {
        shutdown_grace_ms: Some(300),
        ..RawSettings::default()
    };
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_month": 1_000_000}))
        .await;
    let (_, key) = gw.workspace("t").await;
    // No event for 6 s: longer than the grace and the drain together.
    let h = [("x-mock-latency-ms", "6000")];
    let r = gw.chat(&key, stream_body(), &h).await;
    let estimate = reserved(&r);
    let stopped = Instant::now();
    let gw = gw.restart().await;
    let took = stopped.elapsed();
    eprintln!("stopped in {took:?} with a stream in flight (grace 300 ms, drain 2 s)");
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(r);
    assert_eq!(
        gw.limits(&key).await["usage"]["tokens_this_month"],
        estimate,
        "settled, and written, before the stop ended"
    );
}
