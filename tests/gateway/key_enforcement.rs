//! A key's own limits, enforced through the gateway in the same decision as its workspace's:
//! a key's limit holds while another key of the workspace still has the workspace's room, and
//! a denial by either (the key's or the workspace's) takes nothing from the other. In memory,
//! on one Redis and on a Redis Cluster, all on the test's manual clock.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::limiter::redis::TimeSource;

use crate::harness::*;
use crate::support;

/// A new key of `workspace`: (id, secret).
async fn new_key(gw: &TestGateway, workspace: i64) -> (i64, String) {
    let (s, key) = gw
        .admin(
            Method::POST,
            &format!("/workspaces/{workspace}/keys"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{key}");
    (
        key["id"].as_i64().unwrap(),
        key["key"].as_str().unwrap().to_string(),
    )
}

/// An answer's status, error `code` and `type` (empty when not an error).
async fn status_and_code(r: reqwest::Response) -> (StatusCode, String, String) {
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let code = body["code"].as_str().unwrap_or_default().to_string();
    (
        status,
        code,
        body["type"].as_str().unwrap_or_default().to_string(),
    )
}

/// The issue's sequence, on `gw`: a workspace of 1 request/s (burst 3) with keys A (0.5/s,
/// burst 2, its own) and B (none of its own).
async fn keys_and_workspace_take_nothing_from_each_other(gw: TestGateway) {
    gw.put_tier(
        "k-tier",
        json!({"requests_per_second": 1, "burst": 3, "tokens_per_minute": 10000000}),
    )
    .await;
    let (ws, b) = gw.workspace("k-tier").await;
    let (a_id, a) = new_key(&gw, ws).await;
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{a_id}"),
            Some(json!({"limits": {"requests_per_second": 0.5, "burst": 2}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let gw = &gw;
    let send = |key: &String| {
        let key = key.clone();
        async move { gw.chat(&key, hello(), &[]).await }
    };
    // A's burst of 2; the headers show A's limit, the tighter one.
    let r = send(&a).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("0.5"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));
    r.text().await.unwrap();
    assert_eq!(send(&a).await.status(), StatusCode::OK);
    // A's own limit denies it, naming it; the workspace still has room (1 of 3).
    let (s, code, kind) = status_and_code(send(&a).await).await;
    assert_eq!(
        (s, code.as_str(), kind.as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            "key_requests_per_second",
            "rate_limited"
        )
    );
    // B gets the workspace's last request: A's denial took nothing from the workspace.
    let r = send(&b).await;
    assert_eq!(r.status(), StatusCode::OK, "B has the workspace's room");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    r.text().await.unwrap();
    let (s, code, _) = status_and_code(send(&b).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "requests_per_second")
    );

    // 2 s later: the workspace has 2 requests again, A has 1.
    gw.advance(Duration::from_secs(2));
    assert_eq!(send(&b).await.status(), StatusCode::OK);
    assert_eq!(send(&b).await.status(), StatusCode::OK);
    // Now the workspace denies A, which has room of its own: nothing is taken from A...
    let (s, code, _) = status_and_code(send(&a).await).await;
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "requests_per_second")
    );
    // ...so 1 s later (the workspace has 1, A 1.5) A is admitted; had the workspace's denial
    // taken from A, A would hold 0.5 and be denied by its own limit.
    gw.advance(Duration::from_secs(1));
    let r = send(&a).await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);

    // Every denial is counted under its own limit.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"tiergate_decisions_total{outcome="rate_limited",limit="key_requests_per_second"} 1"#
        ),
        "{metrics}"
    );
}

fn unique_prefix() -> String {
    format!(
        "keys{}{}",
        std::process::id(),
        tiergate::limiter::ReservationId::next().0 as u32
    )
}

fn on_redis(redis: String) -> Options {
    let mut options = Options {
        redis_time: TimeSource::Caller,
        ..Options::default()
    };
    options.raw.redis = Some(redis);
    options.raw.redis_prefix = Some(unique_prefix());
    options.raw.redis_timeout_ms = Some(5_000);
    options
}

#[tokio::test]
async fn a_keys_limit_holds_while_another_key_has_room_in_memory() {
    keys_and_workspace_take_nothing_from_each_other(TestGateway::start().await).await;
}

#[tokio::test]
async fn a_keys_limit_holds_while_another_key_has_room_on_redis() {
    let Some(url) = support::redis::shared_redis() else {
        return;
    };
    keys_and_workspace_take_nothing_from_each_other(TestGateway::start_with(on_redis(url)).await)
        .await;
}

#[tokio::test]
async fn a_keys_limit_holds_while_another_key_has_room_on_a_cluster() {
    let seeds = tokio::task::spawn_blocking(support::redis::cluster_seeds)
        .await
        .unwrap();
    keys_and_workspace_take_nothing_from_each_other(TestGateway::start_with(on_redis(seeds)).await)
        .await;
}
