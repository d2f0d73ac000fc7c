//! Streams: passed through event by event, settled from the usage chunk, never refunded once
//! delivered.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tiergate::config::RawSettings;
use tiergate::mock_upstream::prompt_tokens_of;

use crate::harness::*;

fn stream_body(include_usage: Option<bool>) -> Value {
    let mut b = json!({"model": "m", "stream": true, "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hello, world!"}]});
    if let Some(u) = include_usage {
        b["stream_options"] = json!({"include_usage": u});
    }
    b
}

fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

async fn setup() -> (TestGateway, String) {
    TestGateway::on_tier(json!({"tokens_per_minute": 100000, "tokens_per_month": 1000000})).await
}

#[tokio::test]
async fn a_stream_is_settled_from_its_usage_and_the_client_gets_the_stream_it_asked_for() {
    let (gw, key) = setup().await;
    let r = gw.chat(&key, stream_body(None), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(header(&r, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    // Headers are on the stream's answer too.
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("100000"));
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let evs = events(&text);
    // The gateway asked for usage on the client's behalf and removed the usage-only chunk.
    assert!(
        evs.iter()
            .all(|e| e["choices"].as_array().is_some_and(|c| !c.is_empty())),
        "{text}"
    );
    assert_eq!(evs.len(), 6, "5 words and the finish chunk");
    // Nor the `"usage": null` its asking brought to every chunk: OpenAI sends none unasked, and
    // Mistral's TypeScript SDK refuses it (an outside audit).
    assert!(evs.iter().all(|e| e.get("usage").is_none()), "{text}");

    let expected = prompt_tokens_of("Hello, world!") + 3 + 5;
    let limits = gw.limits(&key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], expected);
    assert_eq!(limits["usage"]["tokens_reserved"], 0);
}

#[tokio::test]
async fn a_client_that_asks_for_stream_usage_gets_it() {
    let (gw, key) = setup().await;
    let text = gw
        .chat(&key, stream_body(Some(true)), &[])
        .await
        .text()
        .await
        .unwrap();
    let evs = events(&text);
    let (last, others) = evs.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    // Asked for, the stream is the upstream's as it came: OpenAI's `"usage": null` included.
    assert!(
        others.iter().all(|e| e.get("usage") == Some(&Value::Null)),
        "{text}"
    );
    let total = last["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], total);
}

/// Bodies as clients write them (spacing, escapes, options of their own): the gateway splices
/// `include_usage` into the bytes, so each stream is settled to its usage, and the usage-only
/// chunk the client did not ask for is removed.
#[tokio::test]
async fn usage_is_asked_for_in_the_body_as_the_client_wrote_it() {
    let (gw, key) = setup().await;
    let client = reqwest::Client::new();
    let rest = r#""model":"m","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"Hello, world!"}]"#;
    let bodies = [
        format!("{{{rest}}}"),
        format!("{{ \"stream_options\" : null ,\n {rest} }}"),
        format!(
            r#"{{{rest},"stream_options":{{"include_usage":false,"continuous_usage_stats":false}}}}"#
        ),
        format!(r#"{{"stream\u005foptions":{{"include\u005fusage":false}},{rest}}}"#),
        format!(r#"{{"stream_options":"yes",{rest}}}"#),
    ];
    let per_request = prompt_tokens_of("Hello, world!") + 3 + 5;
    for (i, body) in bodies.iter().enumerate() {
        let r = client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{body}");
        let text = r.text().await.unwrap();
        let evs = events(&text);
        assert!(
            evs.iter()
                .all(|e| e["choices"].as_array().is_some_and(|c| !c.is_empty())
                    && e.get("usage").is_none()),
            "{body}: {text}"
        );
        let limits = gw.limits(&key).await;
        assert_eq!(
            limits["usage"]["tokens_this_month"],
            per_request * (i as u64 + 1),
            "{body}: settled to the stream's usage"
        );
    }
}

#[tokio::test]
async fn upstreams_that_refuse_stream_options_are_read_from_the_last_chunk() {
    let mut raw = RawSettings::default();
    raw.upstream.request_stream_usage = Some(false);
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_minute": 100000})).await;
    let (_, key) = gw.workspace("t").await;
    let h = [
        ("x-mock-reject-stream-options", "1"),
        ("x-mock-stream-usage", "last-chunk"),
        ("x-mock-usage", "11,5"),
    ];
    let r = gw.chat(&key, stream_body(None), &h).await;
    assert_eq!(r.status(), StatusCode::OK, "the option was not sent");
    r.text().await.unwrap();
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 16);
}

#[tokio::test]
async fn a_stream_that_breaks_is_charged_not_refunded() {
    let (gw, key) = setup().await;
    let r = gw
        .chat(
            &key,
            stream_body(None),
            &[("x-mock-fail-after-chunks", "2")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.bytes_stream();
    let mut got_error = false;
    let mut before = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => before.extend_from_slice(&bytes),
            Err(_) => {
                got_error = true;
                break;
            }
        }
    }
    assert!(got_error, "the client sees the break");
    // The two events that came before the break reach the client first, even when the break
    // comes in the same read from the upstream.
    let before = String::from_utf8(before).unwrap();
    assert_eq!(before.matches("data: ").count(), 2, "{before}");
    // Settled to the estimate (no usage arrived): not zero.
    let used = gw.settled_month_tokens(&key).await;
    assert!(used > 0, "a partly delivered stream is never refunded");
    assert_eq!(gw.limits(&key).await["usage"]["tokens_reserved"], 0);
}

/// A stream that ends without its usage is charged at least what it delivered: its prompt's
/// estimate and a token for each event of text passed on. It was charged the estimate alone, so
/// a client that read a long answer and left before its usage paid for a few tokens of it (an
/// outside audit).
#[tokio::test]
async fn a_stream_without_usage_is_charged_at_least_what_it_delivered() {
    let (gw, key) = setup().await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]});
    let h = [("x-mock-usage", "7,40"), ("x-mock-fail-after-chunks", "30")];
    let r = gw.chat(&key, body, &h).await;
    assert_eq!(r.status(), StatusCode::OK);
    let reserved = 1_000_000 - header_u64(&r, "x-ratelimit-remaining-tokens-month");
    let text = String::from_utf8_lossy(&collect_until_error(r).await).into_owned();
    let delivered =
        text.matches("\"content\":\"").count() - text.matches("\"content\":\"\"").count();
    assert_eq!(delivered, 30, "{text}");
    // The estimate held the prompt and the 5 tokens `max_tokens` allows.
    let used = gw.settled_month_tokens(&key).await;
    assert_eq!(used, reserved - 5 + 30, "reserved {reserved}");
}

/// The body up to the error that ends it.
async fn collect_until_error(r: reqwest::Response) -> Vec<u8> {
    let mut body = r.bytes_stream();
    let mut got = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        got.extend_from_slice(&chunk);
    }
    got
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_settled_from_the_real_usage() {
    let (gw, key) = setup().await;
    // A slow stream: the client reads one chunk and leaves.
    let h = [("x-mock-latency-ms", "160"), ("x-mock-usage", "7,16")];
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    let r = gw.chat(&key, body, &h).await;
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(stream);
    let used = gw.settled_month_tokens(&key).await;
    assert_eq!(used, 23, "the gateway kept reading to the usage chunk");
    assert_eq!(gw.limits(&key).await["usage"]["in_flight"], 0);
}

/// A stream that breaks before it produced anything is refunded whether the client stayed to
/// see it break or left before (an outside audit: refunded for the one, charged its estimate of
/// 265 for the other).
#[tokio::test]
async fn a_stream_that_breaks_before_any_data_is_refunded_even_if_the_client_left() {
    let (gw, key) = setup().await;
    let h = [
        ("x-mock-latency-ms", "300"),
        ("x-mock-fail-after-chunks", "0"),
    ];
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    // Stays: sees the break.
    let r = gw.chat(&key, body.clone(), &h).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(collect_until_error(r).await.is_empty());
    // Leaves with the head, before the break.
    let r = gw.chat(&key, body, &h).await;
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    // Nothing reserved any more once the break (after the client left) was settled.
    let limits = eventually_settled(&gw, &key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], 0, "{limits}");
    assert_eq!(gw.exact_usage(&key).await["tokens_this_month"], 0);
}

#[tokio::test]
async fn usage_is_read_whatever_encoding_the_client_accepts() {
    let (gw, key) = setup().await;
    let r = gw
        .chat(
            &key,
            hello(),
            &[
                ("accept-encoding", "gzip, br"),
                ("x-mock-usage", "3,4"),
                ("x-mock-echo-headers", "1"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["received_headers"]["accept-encoding"], "identity");
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 7);
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_slot_at_once_and_is_charged_the_estimate_if_usage_is_late()
{
    let mut raw = RawSettings::default();
    raw.upstream.usage_drain_ms = Some(300);
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier(
        "c",
        json!({"concurrent_requests": 1, "tokens_per_month": 1000000}),
    )
    .await;
    let (_, key) = gw.workspace("c").await;
    // 800 ms before the first event, then 50 ms between events: the usage comes ~850 ms later,
    // after the 300 ms the gateway waits for it.
    let h = [("x-mock-latency-ms", "800"), ("x-mock-usage", "7,16")];
    let body = json!({"model": "m", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]});
    let started = std::time::Instant::now();
    let r = gw.chat(&key, body, &h).await;
    let reserved = 1_000_000 - header_u64(&r, "x-ratelimit-remaining-tokens-month");
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    // Events pass as they come: the first one long before the upstream's stream ends (~1.7 s).
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "{:?}",
        started.elapsed()
    );
    drop(stream);
    let left = std::time::Instant::now();
    loop {
        if gw.limits(&key).await["usage"]["in_flight"] == 0 {
            break;
        }
        assert!(
            left.elapsed() < Duration::from_millis(250),
            "the slot was not freed at once"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let used = gw.settled_month_tokens(&key).await;
    assert_eq!(used, reserved, "settled to the estimate, not refunded");
    assert_ne!(used, 23);
}

/// A client that gives up before the upstream's answer (a timeout shorter than a long answer)
/// is settled from the usage the upstream reports when it comes within `usage_drain_ms`, not the
/// estimate (an outside audit: 268 charged for an answer of 5,010 tokens), and its slot is freed
/// at once; an answer later than that is charged the estimate.
#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_settled_from_the_usage_that_comes_after() {
    for (drain_ms, usage_counted) in [(3_000, true), (300, false)] {
        let mut raw = RawSettings::default();
        raw.upstream.usage_drain_ms = Some(drain_ms);
        let gw = TestGateway::start_with(Options {
            raw,
            ..Options::default()
        })
        .await;
        gw.put_tier(
            "c",
            json!({"concurrent_requests": 1, "tokens_per_month": 1_000_000}),
        )
        .await;
        let (_, key) = gw.workspace("c").await;
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let r = impatient
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("x-mock-latency-ms", "1500")
            .header("x-mock-usage", "7,500")
            .json(&json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await;
        assert!(r.is_err(), "the client gave up");
        // The slot is free long before the upstream answers (at 1.5 s).
        let left = std::time::Instant::now();
        while gw.limits(&key).await["usage"]["in_flight"] != 0 {
            assert!(
                left.elapsed() < Duration::from_millis(800),
                "the slot was held"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let used = gw.settled_month_tokens(&key).await;
        if usage_counted {
            assert_eq!(used, 507, "settled from the usage the upstream reported");
        } else {
            // The estimate: the prompt's few tokens and the 100 of `max_tokens` at most.
            assert!((1..=200).contains(&used), "the estimate, got {used}");
        }
    }
}

/// An upstream that sends a keep-alive comment on `/v1/chat/completions` and then nothing, and on
/// `/v1/things` a stream of five text events without usage.
async fn event_streams() -> String {
    use axum::body::Body;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sse = |body: Body| {
        axum::http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    };
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(move || async move {
                let comment = futures_util::stream::iter([Ok::<_, std::io::Error>(
                    axum::body::Bytes::from_static(b": keep-alive\n\n"),
                )]);
                sse(Body::from_stream(
                    comment.chain(futures_util::stream::pending()),
                ))
            }),
        )
        .route(
            "/v1/things",
            axum::routing::post(move || async move {
                let events = (0..5).map(|i| {
                    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i}\"}}}}]}}\n\n")
                });
                sse(Body::from(events.collect::<String>() + "data: [DONE]\n\n"))
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A stream that goes silent after only a comment (a keep-alive) delivered nothing the upstream
/// produced: refunded, as one silent from the start is (an outside audit saw it charged the
/// estimate). And off the metered routes a stream without usage is charged nothing: its events
/// of text count only where an estimate was reserved (the audit saw 5 charged for 5 events).
#[tokio::test]
async fn a_keep_alive_is_not_delivery_and_unmetered_streams_charge_no_text_events() {
    let mut raw = RawSettings::default();
    raw.upstream.idle_read_timeout_ms = Some(300);
    // `/v1/things` is not among the routes forwarded by default.
    raw.upstream.unmetered = Some("all".into());
    let gw = TestGateway::start_with(Options {
        upstream: Some(event_streams().await),
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_month": 1_000_000}))
        .await;
    let (_, key) = gw.workspace("t").await;
    let r = gw.chat(&key, stream_body(None), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let got = collect_until_error(r).await;
    assert_eq!(&got[..], b": keep-alive\n\n");
    let r = gw
        .post(&key, "/v1/things", json!({"stream": true}), &[])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("\"content\"").count(), 5, "{text}");
    let limits = eventually_settled(&gw, &key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], 0, "{limits}");
}

/// `/v1/limits` once nothing is reserved or in flight any more.
async fn eventually_settled(gw: &TestGateway, key: &str) -> Value {
    let started = std::time::Instant::now();
    loop {
        let limits = gw.limits(key).await;
        let usage = &limits["usage"];
        if usage["in_flight"] == 0 && usage["tokens_reserved"] == 0 {
            return limits;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{limits}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream whose answers are larger than the gateway reads whole (`max_buffered_bytes`):
/// `x-size: N` answers N bytes of JSON, `x-status` its status, `x-usage: 0` without usage.
async fn large_answers() -> String {
    use axum::http::{HeaderMap, StatusCode as AxumStatus};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|headers: HeaderMap| async move {
            let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
            let size: usize = h("x-size").parse().unwrap();
            let status = h("x-status").parse().unwrap_or(200);
            let usage = if h("x-usage") == "0" {
                String::new()
            } else {
                r#","usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}"#.into()
            };
            let head = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""#;
            let end = format!(r#""}},"finish_reason":"stop"}}]{usage}}}"#);
            let text = "a".repeat(size.saturating_sub(head.len() + end.len()));
            (
                AxumStatus::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                format!("{head}{text}{end}"),
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A JSON answer larger than `max_buffered_bytes` is passed on as it comes, whole and unchanged,
/// and settled to the usage at its end (or its estimate without one); an error answer that large
/// is passed on too, and charges nothing. One within the bound is read whole and says its cost.
#[tokio::test]
async fn answers_larger_than_the_gateway_holds_pass_through_and_are_settled_from_their_end() {
    let mut raw = RawSettings::default();
    raw.upstream.max_buffered_bytes = Some(65_536);
    raw.rate_limit_headers = Some(vec!["openai".into(), "mistral".into()]);
    let gw = TestGateway::start_with(Options {
        upstream: Some(large_answers().await),
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_month": 1_000_000}))
        .await;
    let (_, key) = gw.workspace("t").await;
    let month = || async { gw.limits(&key).await["usage"]["tokens_this_month"].clone() };
    let mut charged = 0;

    for size in [60_000usize, 1_000_000, 8_000_000] {
        let r = gw
            .chat(&key, hello(), &[("x-size", &size.to_string())])
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{size}");
        let cost = header(&r, "x-ratelimit-tokens-query-cost").map(str::to_owned);
        // Passed on as it came, with the upstream's length.
        let length = size.to_string();
        assert_eq!(
            header(&r, "content-length"),
            Some(length.as_str()),
            "{size}"
        );
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), size);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 33);
        // Read whole, its cost is in a header; passed on as it comes, it cannot be.
        assert_eq!(cost.as_deref(), (size < 65_536).then_some("33"), "{size}");
        charged += 33;
        let want = json!(charged);
        eventually(Duration::from_secs(5), "settled from the usage", || async {
            month().await == want
        })
        .await;
    }

    // Without usage: its estimate, as a small answer without usage is.
    let r = gw
        .chat(&key, hello(), &[("x-size", "300000"), ("x-usage", "0")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let reserved = 1_000_000 - charged - header_u64(&r, "x-ratelimit-remaining-tokens-month");
    assert!(reserved > 0);
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    charged += reserved;
    let want = json!(charged);
    eventually(
        Duration::from_secs(5),
        "settled to the estimate",
        || async { month().await == want },
    )
    .await;

    // An upstream error that large: passed on, nothing charged, nothing held.
    let r = gw
        .chat(&key, hello(), &[("x-size", "500000"), ("x-status", "500")])
        .await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.bytes().await.unwrap().len(), 500_000);
    eventually(Duration::from_secs(5), "nothing held", || async {
        let usage = gw.limits(&key).await["usage"].clone();
        usage["in_flight"] == 0 && usage["tokens_reserved"] == 0
    })
    .await;
    assert_eq!(month().await, json!(charged));
}

/// JSON lines (`application/x-ndjson`) are passed on line by line as they come, not held until
/// their end (from an outside audit), and settled to the usage on their last line.
#[tokio::test]
async fn json_lines_pass_on_as_they_come_and_are_settled_from_their_end() {
    use axum::body::{Body, Bytes};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // The second line is sent only once the client has read the first.
    let read_first = Arc::new(tokio::sync::Notify::new());
    let go = read_first.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let go = go.clone();
            async move {
                let lines = futures_util::stream::unfold(0, move |n| {
                    let go = go.clone();
                    async move {
                        let line = match n {
                            0 => "{\"delta\":\"Hel\"}\n",
                            1 => {
                                go.notified().await;
                                "{\"delta\":\"lo\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n"
                            }
                            _ => return None,
                        };
                        Some((Ok::<_, std::io::Error>(Bytes::from(line)), n + 1))
                    }
                });
                (
                    [("content-type", "application/x-ndjson")],
                    Body::from_stream(lines),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let gw = TestGateway::start_with(Options {
        upstream: Some(url),
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_month": 1_000_000}))
        .await;
    let (_, key) = gw.workspace("t").await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("the first line comes before the last is sent")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"{\"delta\":\"Hel\"}\n");
    read_first.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8(rest).unwrap().contains("\"usage\""));
    eventually(
        Duration::from_secs(5),
        "settled from the last line",
        || async { gw.limits(&key).await["usage"]["tokens_this_month"] == 6 },
    )
    .await;
}
