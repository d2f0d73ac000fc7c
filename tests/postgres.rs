//! The gateway on Postgres, end to end: serving while Postgres is down.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::clock::ManualClock;

use support::{Gateway, Line, PgDatabase, Proxy};

async fn created(gw: &Gateway, path: &str, body: Value) -> Value {
    let (s, v) = gw.admin(Method::POST, path, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{path}: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_requests_are_served_and_the_admin_api_says_so() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let clock = Arc::new(ManualClock::starting_now());
    let gw = Gateway::start(&db.url_via(&proxy), clock.clone()).await;
    let id = created(
        &gw,
        "/workspaces",
        json!({"name": "acme", "tier": "tier-2"}),
    )
    .await["id"]
        .as_i64()
        .unwrap();
    let key = created(&gw, &format!("/workspaces/{id}/keys"), json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(gw.chat(&key).await, StatusCode::OK);

    proxy.set(Line::Down);
    // The admin API answers quickly that nothing was done.
    let started = Instant::now();
    let (s, body) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{id}"),
            Some(json!({"limits": {"tokens_per_minute": 777}})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(body["object"], "error");
    assert_eq!(body["type"], "service_unavailable");
    assert_eq!(body["code"], "database_unreachable");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("nothing was changed"), "{message}");
    assert!(
        !message.contains("127.0.0.1"),
        "no internal details: {message}"
    );
    let ready = gw
        .client
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The hot path serves from memory.
    for _ in 0..3 {
        assert_eq!(gw.chat(&key).await, StatusCode::OK);
    }

    // Back: the usage settled meanwhile reaches the ledger, and the refused change never
    // happened.
    proxy.set(Line::Up);
    let deadline = Instant::now() + Duration::from_secs(20);
    let requests = loop {
        let (s, v) = gw.limits(&key).await;
        let n = v["usage"]["requests_this_month"].as_u64();
        if (s == StatusCode::OK && n == Some(4)) || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(requests, Some(4));
    let (s, ws) = gw
        .admin(Method::GET, &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ws["overrides"], json!({}));
    let ready = gw
        .client
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}
