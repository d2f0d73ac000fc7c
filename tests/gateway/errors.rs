//! Every error a client can meet, and that none of them charges the workspace.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tiergate::config::RawSettings;

use crate::harness::*;

async fn error_body(r: reqwest::Response, status: StatusCode, kind: &str) -> Value {
    assert_eq!(r.status(), status);
    let v: Value = r.json().await.unwrap();
    assert!(is_error_shaped(&v), "{v}");
    assert_eq!(v["type"], kind, "{v}");
    v
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_are_refused_and_not_forwarded() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let url = format!("{}/v1/chat/completions", gw.url);

    let r = gw.client.post(&url).json(&hello()).send().await.unwrap();
    assert!(r
        .headers()
        .keys()
        .all(|k| !k.as_str().starts_with("x-ratelimit")));
    error_body(r, StatusCode::UNAUTHORIZED, "authentication_error").await;

    let r = gw
        .client
        .post(&url)
        .bearer_auth("tg_nope")
        .json(&hello())
        .send()
        .await
        .unwrap();
    error_body(r, StatusCode::UNAUTHORIZED, "authentication_error").await;
    assert_eq!(gw.upstream_count().await, 0);

    // Revoke at once.
    let (_, keys) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/workspaces/{ws}/keys"),
            None,
        )
        .await;
    let key_id = keys["data"][0]["id"].as_i64().unwrap();
    assert!(
        keys["data"][0].get("key").is_none(),
        "secrets are never listed"
    );
    let (s, _) = gw
        .admin(reqwest::Method::DELETE, &format!("/keys/{key_id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let r = gw.chat(&key, hello(), &[]).await;
    error_body(r, StatusCode::UNAUTHORIZED, "authentication_error").await;
    assert_eq!(gw.upstream_count().await, 0);
}

/// The exact bytes of an error: the Mistral API's fields in its order, then the same four under
/// `error`, the OpenAI API's shape. The openai Node SDK reads only `error`: without it a 429 or
/// 401 reaches its users as "429 status code (no body)", with no type or code (tests/sdk).
#[tokio::test]
async fn error_bodies_carry_the_mistral_and_the_openai_shape() {
    let (gw, key) = TestGateway::on_tier(json!({"requests_per_second": 1})).await;
    let r = gw.chat("tg_nope", hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.text().await.unwrap(),
        concat!(
            r#"{"object":"error","message":"Invalid or revoked API key.","type":"authentication_error","#,
            r#""param":null,"code":"invalid_api_key","error":{"message":"Invalid or revoked API key.","#,
            r#""type":"authentication_error","param":null,"code":"invalid_api_key"}}"#
        )
    );

    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let message = "Rate limit exceeded: 1 request per second (requests_per_second). Retry in 1s.";
    assert_eq!(
        r.text().await.unwrap(),
        format!(
            r#"{{"object":"error","message":"{message}","type":"rate_limited","param":null,"code":"requests_per_second","error":{{"message":"{message}","type":"rate_limited","param":null,"code":"requests_per_second"}}}}"#
        )
    );
}

#[tokio::test]
async fn suspended_workspaces_and_expired_keys_get_403() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    gw.admin(
        reqwest::Method::PATCH,
        &format!("/workspaces/{ws}"),
        Some(json!({"status": "suspended"})),
    )
    .await;
    error_body(
        gw.chat(&key, hello(), &[]).await,
        StatusCode::FORBIDDEN,
        "permission_error",
    )
    .await;
    gw.admin(
        reqwest::Method::PATCH,
        &format!("/workspaces/{ws}"),
        Some(json!({"status": "active"})),
    )
    .await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);

    // A key made to expire in a minute (one already expired is refused when made), then the
    // gateway's clock two minutes on.
    let soon = (time::OffsetDateTime::now_utc() + time::Duration::minutes(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (s, k) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/workspaces/{ws}/keys"),
            Some(json!({"name": "short", "expires_at": soon})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    gw.advance(std::time::Duration::from_secs(120));
    let expired = k["key"].as_str().unwrap();
    error_body(
        gw.chat(expired, hello(), &[]).await,
        StatusCode::FORBIDDEN,
        "permission_error",
    )
    .await;
    assert_eq!(gw.upstream_count().await, 1);
}

#[tokio::test]
async fn malformed_json_is_a_400_and_is_not_forwarded_or_charged() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let v = error_body(r, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    assert!(v["message"].as_str().unwrap().contains("not valid JSON"));
    let r = gw
        .chat(&key, json!({"model": "m", "messages": "nope"}), &[])
        .await;
    error_body(r, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    assert_eq!(gw.upstream_count().await, 0);
    // Nothing was taken: the one request of this second is still there.
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let raw = RawSettings {
        max_body_bytes: Some(2048),
        ..RawSettings::default()
    };
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    let (_, key) = gw.workspace("free").await;
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    error_body(
        gw.chat(&key, big, &[]).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    assert_eq!(gw.upstream_count().await, 0);
}

#[tokio::test]
async fn the_client_key_is_never_forwarded() {
    let mut raw = RawSettings::default();
    raw.upstream.api_key = Some("upstream-secret".into());
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    let (_, key) = gw.workspace("free").await;
    let r = gw
        .chat(&key, hello(), &[("x-mock-echo-headers", "1")])
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["received_headers"]["authorization"],
        "Bearer upstream-secret"
    );
    assert!(!v.to_string().contains(&key));
}

#[tokio::test]
async fn upstream_errors_pass_through_refunded_and_counted_apart() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 10000})).await;
    for (status, kind) in [
        (429, "rate_limited"),
        (503, "server_error"),
        (400, "invalid_request_error"),
    ] {
        let code = status.to_string();
        let r = gw
            .chat(&key, hello(), &[("x-mock-status", code.as_str())])
            .await;
        assert_eq!(r.status().as_u16(), status);
        // Our headers are on it too.
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("10000"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], kind, "the upstream's own body: {v}");
    }
    // The upstream refusing the gateway's own key is not the client's key being wrong.
    for status in ["401", "403"] {
        let r = gw.chat(&key, hello(), &[("x-mock-status", status)]).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{status}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "upstream_error");
    }
    let limits = gw.limits(&key).await;
    assert_eq!(limits["usage"]["tokens_this_month"], 0, "refunded");
    assert_eq!(limits["usage"]["token_bucket"]["level"], 10000);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tiergate_upstream_rate_limited_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tiergate_upstream_server_errors_total 1"));
    assert!(metrics.contains("tiergate_upstream_auth_failures_total 2"));
    // The upstream's 429 is not a denial of the workspace's own limits.
    assert!(!metrics.contains("outcome=\"rate_limited\""), "{metrics}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_refunded() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = TestGateway::start_with(Options {
        upstream: Some(format!("http://127.0.0.1:{port}")),
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_minute": 10000})).await;
    let (_, key) = gw.workspace("t").await;
    let r = gw.chat(&key, hello(), &[]).await;
    error_body(r, StatusCode::BAD_GATEWAY, "upstream_error").await;
    assert_eq!(
        gw.limits(&key).await["usage"]["token_bucket"]["level"],
        10000
    );
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_and_refunded() {
    let mut raw = RawSettings::default();
    raw.upstream.timeout_secs = Some(1);
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("t", json!({"tokens_per_minute": 10000})).await;
    let (_, key) = gw.workspace("t").await;
    let started = std::time::Instant::now();
    let r = gw
        .chat(&key, hello(), &[("x-mock-latency-ms", "3000")])
        .await;
    error_body(r, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout").await;
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert_eq!(
        gw.limits(&key).await["usage"]["token_bucket"]["level"],
        10000
    );
}

#[tokio::test]
async fn health_and_readiness_need_no_auth() {
    let gw = TestGateway::start().await;
    for path in ["/healthz", "/readyz"] {
        let r = gw
            .client
            .get(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
}
