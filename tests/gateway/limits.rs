//! Every limit under and over, through the gateway.

use std::time::Duration;

use futures_util::future::join_all;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn free_tier_admits_one_request_per_second_and_retry_after_is_truthful() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;

    let ok = gw.chat(&key, hello(), &[]).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(header(&ok, "x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(header(&ok, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(&ok, "x-ratelimit-reset-requests"), Some("1s"));
    assert_eq!(header(&ok, "x-ratelimit-limit-tokens"), Some("500000"));
    assert_eq!(
        header(&ok, "x-ratelimit-limit-tokens-month"),
        Some("1000000000")
    );
    // The upstream's own rate-limit headers are replaced by the gateway's.
    assert_ne!(header(&ok, "x-ratelimit-limit-requests"), Some("999"));

    gw.advance(Duration::from_millis(400));
    let denied = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&denied, "retry-after"), Some("1"));
    assert_eq!(header(&denied, "retry-after-ms"), Some("600"));
    assert_eq!(header(&denied, "x-should-retry"), None);
    assert_eq!(header(&denied, "x-ratelimit-remaining-requests"), Some("0"));
    let body = expect_429(denied, "rate_limited", "requests_per_second").await;
    assert!(
        body["message"].as_str().unwrap().contains("600ms"),
        "{body}"
    );

    // Waiting exactly what retry-after-ms said is enough.
    gw.advance(Duration::from_millis(600));
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn burst_allows_that_many_at_once() {
    let (gw, key) = TestGateway::on_tier(json!({"requests_per_second": 2, "burst": 3})).await;
    for remaining in ["2", "1", "0"] {
        let r = gw.chat(&key, hello(), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
    }
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "retry-after-ms"), Some("500"));
    expect_429(r, "rate_limited", "requests_per_second").await;
    gw.advance(Duration::from_millis(500));
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn tokens_per_minute_settles_to_upstream_usage_and_refills_continuously() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 600})).await;

    // The upstream reports 100 + 200 tokens; the bucket is settled to 300 used.
    let r = gw.chat(&key, hello(), &[("x-mock-usage", "100,200")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let limits = gw.limits(&key).await;
    assert_eq!(limits["usage"]["token_bucket"]["level"], 300);

    // Another 300 used: the bucket is empty.
    let r = gw.chat(&key, hello(), &[("x-mock-usage", "100,200")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(gw.limits(&key).await["usage"]["token_bucket"]["level"], 0);

    // Over: the next estimate does not fit. The wait is the time to refill the estimate at
    // 600/60 = 10 tokens per second.
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("0"));
    let wait_ms = header_u64(&r, "retry-after-ms");
    expect_429(r, "rate_limited", "tokens_per_minute").await;
    assert!(wait_ms > 1000 && wait_ms <= 60_000, "{wait_ms}");

    // No burst at a minute boundary: half a minute later, half the bucket.
    gw.advance(Duration::from_secs(30));
    assert_eq!(gw.limits(&key).await["usage"]["token_bucket"]["level"], 300);
    gw.advance(Duration::from_millis(wait_ms).saturating_sub(Duration::from_secs(30)));
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn underestimated_usage_puts_the_bucket_in_debt_and_headers_never_go_negative() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 1000})).await;
    let r = gw
        .chat(&key, hello(), &[("x-mock-usage", "1000,1000")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        gw.limits(&key).await["usage"]["token_bucket"]["level"],
        -1000
    );
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("0"));
    // The debt and the next estimate must refill first: more than a minute.
    assert!(header_u64(&r, "retry-after") > 60);
    expect_429(r, "rate_limited", "tokens_per_minute").await;
}

#[tokio::test]
async fn the_estimate_does_not_reserve_all_of_max_tokens() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 5000})).await;
    // Streamed: its headers are sent before its cost is known, and so show its reservation (a
    // JSON answer's show what is left after its cost).
    let body = json!({"model": "m", "max_tokens": 100000, "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    // Reserving max_tokens would need 100000 tokens; the estimate is prompt + 256.
    let r = gw
        .chat(&key, body.clone(), &[("x-mock-usage", "5,20")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let remaining = header_u64(&r, "x-ratelimit-remaining-tokens");
    assert!((5000 - 300..5000).contains(&remaining), "{remaining}");
    r.text().await.unwrap();
    // After seeing completions of 20 tokens, the next estimate follows them.
    let r = gw.chat(&key, body, &[("x-mock-usage", "5,20")]).await;
    let after_second = header_u64(&r, "x-ratelimit-remaining-tokens");
    assert!(
        5000 - 25 - after_second < 40,
        "estimate should be ~prompt+20, left {after_second}"
    );
}

/// A completion cut at `max_tokens` says only that the answer would have been at least that
/// long: it counts as at least the default. Learned as it was, a few requests with `max_tokens:
/// 1` made the estimate of requests without it 1 token, and 50 of those at once took 40 times a
/// minute's tokens (an outside audit).
#[tokio::test]
async fn completions_cut_at_max_tokens_do_not_lower_the_estimate() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 1_000_000})).await;
    let body = |max_tokens: Option<u64>| {
        let mut b = json!({"model": "m", "stream": true,
            "messages": [{"role": "user", "content": "Hi"}]});
        if let Some(m) = max_tokens {
            b["max_tokens"] = json!(m);
        }
        b
    };
    // Streamed: the headers show the reservation.
    let reserved =
        |r: &reqwest::Response, before: u64| before - header_u64(r, "x-ratelimit-remaining-tokens");
    let mut left = 1_000_000;
    for _ in 0..20 {
        let r = gw
            .chat(&key, body(Some(1)), &[("x-mock-usage", "5,1")])
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap();
        left -= 6;
    }
    let r = gw
        .chat(&key, body(None), &[("x-mock-usage", "5,300")])
        .await;
    // The prompt (about 9) and the default completion (256), not 1.
    let first = reserved(&r, left);
    assert!(first >= 256, "{first}");
    r.text().await.unwrap();
    left -= 305;
    // A completion that stopped on its own, below its `max_tokens`, is learned from.
    let r = gw
        .chat(&key, body(Some(1_000)), &[("x-mock-usage", "5,40")])
        .await;
    r.text().await.unwrap();
    left -= 45;
    let r = gw.chat(&key, body(None), &[("x-mock-usage", "5,40")]).await;
    let next = reserved(&r, left);
    assert!(
        (300..=320).contains(&next),
        "the largest of the last: 300, {next}"
    );
}

/// What a model reads besides the messages counts in the estimate: a tool's description of
/// 100,000 characters reserved nothing, and 40 such requests at once took 130 times a minute's
/// tokens (an outside audit).
#[tokio::test]
async fn tool_definitions_count_in_the_estimate() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 6000})).await;
    let body = json!({"model": "m", "max_tokens": 1,
        "tools": [{"type": "function", "function": {"name": "f", "description": "word ".repeat(20_000)}}],
        "messages": [{"role": "user", "content": "x"}]});
    let r = gw.chat(&key, body, &[("x-mock-usage", "20000,1")]).await;
    expect_429(r, "request_too_large", "tokens_per_minute").await;
}

#[tokio::test]
async fn the_prompt_estimate_learns_what_the_upstream_reports() {
    const LIMIT: u64 = 1_000_000;
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": LIMIT})).await;
    // 80 words of 4 letters and a space: 75 tokens by the rule, + 4 + 3 = 82; completion 1.
    // Streamed: its headers show its reservation (a JSON answer's, what is left after its cost).
    let body = |model: &str| {
        json!({"model": model, "max_tokens": 1, "stream": true,
               "messages": [{"role": "user", "content": "word ".repeat(80)}]})
    };
    // An upstream whose tokenizer counts twice the rule (as an older one does for Chinese).
    let usage = [("x-mock-usage", "164,1")];
    let mut reserved = Vec::new();
    for k in 0..60u64 {
        let r = gw.chat(&key, body("m"), &usage).await;
        assert_eq!(r.status(), StatusCode::OK);
        let remaining = header_u64(&r, "x-ratelimit-remaining-tokens");
        reserved.push(LIMIT - 165 * k - remaining);
        r.text().await.unwrap();
    }
    // The first follows the rule; each settlement moves the factor 1/8 of the way to 2
    // (82 × 1.125 = 92.25 -> 93); it gets there, and no further.
    assert_eq!(reserved[..2], [83, 94]);
    assert!(reserved.windows(2).all(|w| w[0] <= w[1]), "{reserved:?}");
    assert_eq!(reserved[59], 165, "{reserved:?}");
    // Another model of the same workspace has learned nothing.
    let r = gw.chat(&key, body("other"), &usage).await;
    let remaining = header_u64(&r, "x-ratelimit-remaining-tokens");
    assert_eq!(LIMIT - 165 * 60 - remaining, 83);
}

#[tokio::test]
async fn tokens_per_month_is_a_quota_that_waiting_seconds_cannot_fix() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_month": 1000})).await;
    let r = gw.chat(&key, hello(), &[("x-mock-usage", "400,500")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let limits = gw.limits(&key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], 900);

    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens-month"),
        Some("100")
    );
    let reset = header(&r, "x-ratelimit-reset-tokens-month")
        .unwrap()
        .to_string();
    assert!(reset.ends_with('s') && reset.contains('h'), "{reset}");
    let retry_after = header_u64(&r, "retry-after");
    let body = expect_429(r, "quota_exceeded", "tokens_per_month").await;
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("1000 tokens per month"), "{message}");
    // Something is left: the message says why this request does not fit.
    assert!(
        message.contains(" tokens, is more than the 100 left"),
        "{message}"
    );
    // Retry-After points at the next month (at least an hour away unless the test runs in the
    // last hour of a month) and never exceeds a month.
    assert!(retry_after <= 31 * 24 * 3600, "{retry_after}");
    gw.advance(Duration::from_secs(retry_after));
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn concurrent_requests_are_released_when_the_answer_ends() {
    let (gw, key) = TestGateway::on_tier(json!({"concurrent_requests": 1})).await;
    let slow = {
        let gw_url = gw.url.clone();
        let key = key.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{gw_url}/v1/chat/completions"))
                .bearer_auth(key)
                .header("x-mock-latency-ms", "700")
                .json(&hello())
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // Wait (bounded) until the slow one is in flight.
    for _ in 0..100 {
        if gw.limits(&key).await["usage"]["in_flight"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = gw.chat(&key, hello(), &[]).await;
    expect_429(r, "rate_limited", "concurrent_requests").await;
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert_eq!(gw.limits(&key).await["usage"]["in_flight"], 0);
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_upstream_never_holds_more_than_the_concurrency_limit() {
    let (gw, key) = TestGateway::on_tier(json!({"concurrent_requests": 2})).await;
    let slow = [("x-mock-tag", "ws"), ("x-mock-latency-ms", "800")];
    let answers = join_all((0..6).map(|_| gw.chat(&key, hello(), &slow))).await;
    let admitted = answers
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count() as u64;
    let denied = answers
        .iter()
        .filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((admitted, denied), (2, 4));
    // The gateway forwards the tag; the denied requests never reached the upstream.
    let stats = gw.upstream_stats("ws").await;
    assert_eq!(
        (stats.count, stats.max_in_flight),
        (admitted, 2),
        "{stats:?}"
    );
}

#[tokio::test]
async fn per_model_limits_apply_to_that_model_only() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "models",
        json!({"models": {"big": {"tokens_per_minute": 100}}}),
    )
    .await;
    let (_, key) = gw.workspace("models").await;
    let big =
        json!({"model": "big", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]});
    let r = gw
        .chat(&key, big.clone(), &[("x-mock-usage", "50,50")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = gw.chat(&key, big, &[]).await;
    let body = expect_429(r, "rate_limited", "model_tokens_per_minute").await;
    assert!(
        body["message"].as_str().unwrap().contains("'big'"),
        "{body}"
    );
    let small = json!({"model": "small", "messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(gw.chat(&key, small, &[]).await.status(), StatusCode::OK);
}

/// A request on a model with limits of its own is answered with the tighter of the model's and
/// the workspace's windows, in every family: a client that paces itself by the headers sees the
/// limit that denies it (they used to show the workspace's alone, with plenty left).
async fn model_limits_show_in_the_headers(gw: &TestGateway) {
    gw.put_tier(
        "model-headers",
        json!({"tokens_per_minute": 100_000, "tokens_per_month": 1_000_000,
            "models": {"big": {"tokens_per_minute": 1000, "tokens_per_month": 5000}}}),
    )
    .await;
    let (_, key) = gw.workspace("model-headers").await;
    let big =
        json!({"model": "big", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]});
    let n = |r: &reqwest::Response, name: &str| -> u64 {
        header(r, name)
            .unwrap_or_else(|| panic!("no {name}"))
            .parse()
            .unwrap()
    };
    let r = gw
        .chat(&key, big.clone(), &[("x-mock-usage", "490,500")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(n(&r, "x-ratelimit-limit-tokens"), 1000);
    assert!(n(&r, "x-ratelimit-remaining-tokens") < 1000);
    assert_eq!(n(&r, "x-ratelimit-limit-tokens-month"), 5000);
    let policy = header(&r, "ratelimit-policy").unwrap();
    assert!(
        policy.contains("\"tokens-minute\";q=1000;") && policy.contains("\"tokens-month\";q=5000;"),
        "{policy}"
    );
    // Settled to 990: what the model has left cannot hold the next request.
    eventually(Duration::from_secs(5), "settled", || async {
        gw.limits(&key).await["usage"]["tokens_this_month"].as_u64() == Some(990)
    })
    .await;
    let r = gw.chat(&key, big, &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(n(&r, "x-ratelimit-limit-tokens"), 1000);
    let left = n(&r, "x-ratelimit-remaining-tokens");
    assert!(left < 100, "{left}");
    assert_eq!(n(&r, "x-ratelimit-remaining-tokens-month"), 5000 - 990);
    let body = expect_429(r, "rate_limited", "model_tokens_per_minute").await;
    assert!(
        body["message"].as_str().unwrap().contains("'big'"),
        "{body}"
    );
    // Another model is answered with the workspace's windows.
    let small = json!({"model": "small", "messages": [{"role": "user", "content": "Hi"}]});
    let r = gw.chat(&key, small, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(n(&r, "x-ratelimit-limit-tokens"), 100_000);
    assert_eq!(n(&r, "x-ratelimit-limit-tokens-month"), 1_000_000);
}

#[tokio::test]
async fn model_limits_show_in_the_headers_in_memory() {
    model_limits_show_in_the_headers(&TestGateway::start().await).await;
}

#[tokio::test]
async fn model_limits_show_in_the_headers_with_redis() {
    let Some(redis) = crate::support::redis::shared_redis() else {
        return;
    };
    let fleet = TestGateway::fleet(1, &redis, |_| {}).await;
    model_limits_show_in_the_headers(&fleet[0]).await;
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_not_retryable() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 50})).await;
    let long = "word ".repeat(400); // 2000 chars: ~500 tokens.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": long}]});
    let before = gw.upstream_count().await;
    let r = gw.chat(&key, body, &[]).await;
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert_eq!(header(&r, "retry-after"), None);
    let b = expect_429(r, "request_too_large", "tokens_per_minute").await;
    assert!(b["message"].as_str().unwrap().contains("never fit"));
    assert_eq!(gw.upstream_count().await, before, "not forwarded");
    // A small one still fits: the denial took nothing.
    assert_eq!(
        gw.chat(&key, hello(), &[("x-mock-usage", "5,5")])
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_denied_request_consumes_nothing_in_any_dimension() {
    let (gw, key) = TestGateway::on_tier(json!({"requests_per_second": 1, "tokens_per_minute": 10000, "tokens_per_month": 100000, "concurrent_requests": 5})).await;
    assert_eq!(
        gw.chat(&key, hello(), &[("x-mock-usage", "10,10")])
            .await
            .status(),
        StatusCode::OK
    );
    let before = gw.limits(&key).await["usage"].clone();
    for _ in 0..5 {
        let r = gw.chat(&key, hello(), &[]).await;
        expect_429(r, "rate_limited", "requests_per_second").await;
    }
    let after = gw.limits(&key).await["usage"].clone();
    for field in [
        "tokens_this_month",
        "tokens_reserved",
        "in_flight",
        "token_bucket",
    ] {
        assert_eq!(before[field], after[field], "{field} changed");
    }
    let ledger = gw.exact_usage(&key).await;
    assert_eq!(ledger["requests_this_month"], 1);
    // The denials were counted as denials, not as usage.
    assert_eq!(ledger["daily"][0]["denied"], 5);
    assert_eq!(ledger["daily"][0]["requests"], 1);
}

#[tokio::test]
async fn two_keys_of_a_workspace_share_limits_and_other_workspaces_are_untouched() {
    let gw = TestGateway::start().await;
    let (ws, key_a) = gw.workspace("free").await;
    let key_b = gw.key(ws).await;
    let (_, other) = gw.workspace("free").await;
    assert_eq!(gw.chat(&key_a, hello(), &[]).await.status(), StatusCode::OK);
    expect_429(
        gw.chat(&key_b, hello(), &[]).await,
        "rate_limited",
        "requests_per_second",
    )
    .await;
    assert_eq!(gw.chat(&other, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn month_usage_survives_a_restart() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_month": 1000})).await;
    assert_eq!(
        gw.chat(&key, hello(), &[("x-mock-usage", "300,400")])
            .await
            .status(),
        StatusCode::OK
    );
    let gw = gw.restart().await;
    let limits = gw.limits(&key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], 700);
    assert_eq!(limits["usage"]["requests_this_month"], 1);
    let r = gw.chat(&key, hello(), &[("x-mock-usage", "100,100")]).await;
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens-month").map(|v| v.parse::<u64>().unwrap() < 300),
        Some(true)
    );
    assert_eq!(r.status(), StatusCode::OK);
    expect_429(
        gw.chat(&key, hello(), &[]).await,
        "quota_exceeded",
        "tokens_per_month",
    )
    .await;
}

#[tokio::test]
async fn tier_changes_and_overrides_take_effect_on_the_next_request() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    expect_429(
        gw.chat(&key, hello(), &[]).await,
        "rate_limited",
        "requests_per_second",
    )
    .await;

    let (s, v) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"tier": "tier-2"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("10"));

    let (s, _) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": {"requests_per_second": 3, "tokens_per_minute": 777}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("777"));

    // null clears the override: back to the tier's value.
    let (_, v) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": {"tokens_per_minute": null}})),
        )
        .await;
    assert_eq!(v["overrides"], json!({"requests_per_second": 3.0}));
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("5000000"));
}

#[tokio::test]
async fn a_tier_without_a_limit_sends_no_header_for_it() {
    let (gw, key) = TestGateway::on_tier(json!({})).await;
    for _ in 0..20 {
        let r = gw.chat(&key, hello(), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("x-ratelimit")));
    }
}

#[tokio::test]
async fn passthrough_routes_count_as_requests_and_settle_usage_when_present() {
    let (gw, key) = TestGateway::on_tier(json!({"requests_per_second": 1})).await;
    let r = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let models: serde_json::Value = r.json().await.unwrap();
    assert_eq!(models["object"], "list");
    let r = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    expect_429(r, "rate_limited", "requests_per_second").await;
    // A pass-through answer without usage is not an estimate settled for lack of usage.
    assert!(gw
        .metrics()
        .await
        .contains("tiergate_settled_without_usage_total 0"));
    // /v1/limits counts against nothing.
    for _ in 0..3 {
        gw.limits(&key).await;
    }
}

#[tokio::test]
async fn every_metered_route_settles_the_upstreams_usage() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 100000})).await;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "a b c"}]}),
            3 + 3 + 16,
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "a b c d", "max_tokens": 4}),
            4 + 4,
        ),
        (
            "/v1/fim/completions",
            json!({"model": "codestral", "prompt": "def f(", "suffix": "return 1", "max_tokens": 2}),
            5 + 2,
        ),
        (
            "/v1/embeddings",
            json!({"model": "e", "input": ["one two", "three"]}),
            3,
        ),
    ];
    let mut total = 0;
    for (path, body, expected) in cases {
        let r = gw.post(&key, path, body, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["usage"]["total_tokens"], expected, "{path}: {v}");
        total += expected;
        assert_eq!(
            gw.limits(&key).await["usage"]["tokens_this_month"],
            total,
            "{path}"
        );
    }
}

#[tokio::test]
async fn binary_answers_pass_through_as_they_come() {
    use futures_util::StreamExt;
    use tiergate::mock_upstream::{FILE_CHUNK, FILE_CHUNKS};
    // Files are not among the routes forwarded by default.
    let mut options = Options::default();
    options.raw.upstream.unmetered = Some("all".into());
    let gw = TestGateway::start_with(options).await;
    gw.put_tier("test-tier", json!({"tokens_per_minute": 1000}))
        .await;
    let (_, key) = gw.workspace("test-tier").await;
    let started = std::time::Instant::now();
    let r = gw
        .client
        .get(format!("{}/v1/files/f1/content", gw.url))
        .bearer_auth(&key)
        .header("x-mock-latency-ms", "400")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), Some("application/octet-stream"));
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("1000"));
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    // The first chunk arrives before the upstream has sent the rest (1.2 s later).
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(first[0], b'a');
    let mut total = first.len();
    while let Some(chunk) = body.next().await {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, FILE_CHUNK * FILE_CHUNKS);
    assert_eq!(gw.exact_usage(&key).await["requests_this_month"], 1);
}

/// The workspace's own page reads the ledger at most once a second and never forces a write,
/// so reading it often costs the store little; its ledger figures are then up to about a second
/// behind, while the limiter's (this month's tokens, the windows) are live.
#[tokio::test]
async fn the_limits_page_reads_the_ledger_at_most_once_a_second() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_month": 100000})).await;
    let first = gw.limits(&key).await;
    let read_at = std::time::Instant::now();
    assert_eq!(first["usage"]["requests_this_month"], 0);
    assert_eq!(
        gw.chat(&key, hello(), &[("x-mock-usage", "10,10")])
            .await
            .status(),
        StatusCode::OK
    );
    let again = gw.limits(&key).await;
    // Live: the limiter's count.
    assert_eq!(again["usage"]["tokens_this_month"], 20);
    if read_at.elapsed() < Duration::from_millis(900) {
        // The ledger's figures: the read of a moment ago, no write forced.
        assert_eq!(again["usage"]["requests_this_month"], 0);
        assert_eq!(again["usage"]["daily"], json!([]));
    }
    // Within the stated bound (a flush interval and a second), the page catches up.
    let started = std::time::Instant::now();
    loop {
        let now = gw.limits(&key).await;
        if now["usage"]["requests_this_month"] == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the page did not catch up: {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Limits are validated where they are set, but the store may hold figures an older version
/// or a hand-written row put there: the gateway brings them within bounds instead of letting
/// the limiter's arithmetic overflow.
#[tokio::test]
async fn limits_out_of_bounds_in_the_store_are_brought_within_bounds() {
    use tiergate::model::{Limits, ModelLimits, Tier, MAX_TOKENS_PER_MINUTE};
    use tiergate::store::Store;
    let gw = TestGateway::start().await;
    let store =
        tiergate::store::sqlite::SqliteStore::open(&format!("sqlite://{}", gw.db.display()))
            .await
            .unwrap();
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "mistral-small-latest".to_string(),
        ModelLimits {
            tokens_per_minute: Some(u64::MAX),
            tokens_per_month: Some(0),
        },
    );
    let wild = Limits {
        requests_per_second: Some(1e300),
        burst: Some(u32::MAX),
        tokens_per_minute: Some(u64::MAX),
        tokens_per_month: Some(u64::MAX),
        concurrent_requests: Some(u32::MAX),
        models,
        key: None,
    };
    assert!(wild.validate().is_err());
    store
        .put_tier(
            &Tier {
                name: "wild".into(),
                rank: None,
                promotion: None,
                limits: wild,
                enforcement: Default::default(),
                shadow: Vec::new(),
            },
            &tiergate::model::Actor::cli(Some("test")),
            0,
        )
        .await
        .unwrap();
    let gw = gw.restart().await;
    let (_, key) = gw.workspace("wild").await;
    // No panic, no overflow: the request is decided, and the headers show the bounded figures.
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: serde_json::Value = r.json().await.unwrap();
    // The model's month limit of 0 became 1: the request can never fit it.
    assert_eq!(body["type"], "request_too_large");
    assert_eq!(body["code"], "model_tokens_per_month");
    let limits = gw.limits(&key).await;
    assert_eq!(
        limits["limits"]["tokens_per_minute"].as_u64(),
        Some(MAX_TOKENS_PER_MINUTE)
    );
    assert_eq!(limits["limits"]["requests_per_second"], 1_000_000.0);
}

/// A stream reserved in one month and settled in the next counts in the month in which it is
/// settled, at once, even when the next request follows before the ledger has been written
/// (issue 9, defect 11: the in-memory counter used to miss it until the workspace was evicted).
#[tokio::test]
async fn a_settlement_across_the_month_boundary_counts_in_the_new_month_at_once() {
    use futures_util::StreamExt;
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_month": 1000})).await;
    use tiergate::clock::Clock;
    let next_month = tiergate::limiter::MonthKey::of(gw.clock.now())
        .next()
        .start();
    gw.clock.set(next_month - 1_000_000_000);
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("x-mock-usage", "10,5")
        .header("x-mock-latency-ms", "300")
        .json(&json!({"model": "m", "stream": true, "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Midnight passes while the stream is in flight; it ends in the new month.
    gw.advance(Duration::from_secs(2));
    while let Some(chunk) = body.next().await {
        chunk.unwrap();
    }
    // At once: no time for the ledger to be written.
    assert_eq!(
        gw.chat(&key, hello(), &[("x-mock-usage", "1,1")])
            .await
            .status(),
        StatusCode::OK
    );
    let usage = gw.limits(&key).await["usage"].clone();
    assert_eq!(usage["tokens_this_month"], 15 + 2, "{usage}");
    assert_eq!(usage["tokens_reserved"], 0);
}

/// Defect 12a: an override of requests/s brings its own burst, `max(1, ceil(rps))` unless it
/// sets one, never the tier's: a lowered rate admits no more at once than the rate suggests.
#[tokio::test]
async fn an_override_that_lowers_the_rate_lowers_the_burst_unless_it_sets_one() {
    let gw = TestGateway::start().await;
    gw.put_tier("fast", json!({"requests_per_second": 10, "burst": 10}))
        .await;
    let (id, key) = gw.workspace("fast").await;
    let patch = |limits: serde_json::Value| {
        let path = format!("/workspaces/{id}");
        let gw = &gw;
        async move {
            let (s, v) = gw
                .admin(
                    reqwest::Method::PATCH,
                    &path,
                    Some(json!({ "limits": limits })),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v
        }
    };

    // 1 request/s: one at once (under), the second refused (over).
    let ws = patch(json!({"requests_per_second": 1})).await;
    assert_eq!(ws["limits"]["burst"], serde_json::Value::Null, "{ws}");
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    let r = gw.chat(&key, hello(), &[]).await;
    expect_429(r, "rate_limited", "requests_per_second").await;

    // The override sets a burst of 3: three at once, not a fourth.
    patch(json!({"burst": 3})).await;
    gw.advance(Duration::from_secs(5));
    for remaining in ["2", "1", "0"] {
        let r = gw.chat(&key, hello(), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
    }
    let r = gw.chat(&key, hello(), &[]).await;
    expect_429(r, "rate_limited", "requests_per_second").await;

    // An increase asks for a rate and a burst; approved, both hold.
    let r = gw
        .post(
            &key,
            "/v1/limit-requests",
            json!({"use_case": "batch jobs", "requested_limits": {"requests_per_second": 2, "burst": 5}}),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let asked: serde_json::Value = r.json().await.unwrap();
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/limit-requests/{}/approve", asked["id"]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    gw.advance(Duration::from_secs(5));
    for _ in 0..5 {
        let r = gw.chat(&key, hello(), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("2"));
    }
    let r = gw.chat(&key, hello(), &[]).await;
    expect_429(r, "rate_limited", "requests_per_second").await;

    // Without the rate override, the tier's rate with the override's burst.
    let ws = patch(json!({"requests_per_second": null})).await;
    assert_eq!(
        (&ws["limits"]["requests_per_second"], &ws["limits"]["burst"]),
        (&json!(10.0), &json!(5))
    );
}

/// The windows of `/v1/limits` give whole limits as integers, as `limits` does, and a rate's
/// fraction as it is (an outside audit: `600.0`, which a client decoding integers refuses).
#[tokio::test]
async fn the_limits_page_gives_whole_limits_as_integers() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "figures",
        json!({"requests_per_second": 0.5, "tokens_per_minute": 600, "tokens_per_month": 5_000}),
    )
    .await;
    let (_, key) = gw.workspace("figures").await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    let limits = gw.limits(&key).await;
    let usage = &limits["usage"];
    assert_eq!(usage["requests_per_second"]["limit"], json!(0.5), "{usage}");
    assert_eq!(usage["tokens_per_minute"]["limit"], json!(600), "{usage}");
    assert_eq!(usage["tokens_per_month"]["limit"], json!(5_000), "{usage}");
    assert_eq!(
        usage["tokens_per_minute"]["limit"],
        limits["limits"]["tokens_per_minute"]
    );
}
