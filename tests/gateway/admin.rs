//! The admin API, the workspace's limits page data, and the limit-request workflow.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::catalog::generate_key;
use tiergate::model::Actor;
use tiergate::store::sqlite::SqliteStore;
use tiergate::store::{NewKey, Store, WorkspaceChange};

use crate::harness::*;

#[tokio::test]
async fn the_admin_api_needs_the_admin_token() {
    let gw = TestGateway::start().await;
    let url = format!("{}/admin/v1/workspaces", gw.url);
    let r = gw.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = gw
        .client
        .get(&url)
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "authentication_error");
    let r = gw.client.get(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let off = TestGateway::start_with(Options {
        admin_token: None,
        ..Options::default()
    })
    .await;
    let r = off
        .client
        .get(format!("{}/admin/v1/workspaces", off.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("no admin token"));
}

#[tokio::test]
async fn workspaces_keys_and_tiers_are_managed_over_the_api() {
    let gw = TestGateway::start().await;
    let (s, ws) = gw
        .admin(Method::POST, "/workspaces", Some(json!({"name": "acme"})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(ws["tier"], "free", "new workspaces start on the free tier");
    assert_eq!(ws["limits"]["requests_per_second"], 1.0);
    let id = ws["id"].as_i64().unwrap();

    let (s, _) = gw
        .admin(
            Method::POST,
            "/workspaces",
            Some(json!({"name": "x", "tier": "gold"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown tier");
    let (s, _) = gw.admin(Method::GET, "/workspaces/999", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, key) = gw
        .admin(
            Method::POST,
            &format!("/workspaces/{id}/keys"),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = key["key"].as_str().unwrap();
    assert!(secret.starts_with(key["prefix"].as_str().unwrap()));
    assert_eq!(gw.chat(secret, hello(), &[]).await.status(), StatusCode::OK);
    // last_used_at is recorded.
    let (_, keys) = gw
        .admin(Method::GET, &format!("/workspaces/{id}/keys"), None)
        .await;
    assert!(keys["data"][0]["last_used_at"].is_string(), "{keys}");
    assert!(keys["data"][0].get("key").is_none());

    let (_, list) = gw.admin(Method::GET, "/workspaces", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let names: Vec<&str> = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for t in ["free", "tier-1", "tier-2", "tier-3", "tier-4", "scale"] {
        assert!(names.contains(&t), "{names:?}");
    }
    let free = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "free")
        .unwrap();
    assert_eq!(free["tokens_per_minute"], 500000);
    assert_eq!(free["tokens_per_month"], 1000000000u64);

    // Editing a tier changes its workspaces' limits at once.
    gw.put_tier("free", json!({"requests_per_second": 5})).await;
    gw.advance(Duration::from_secs(1));
    let r = gw.chat(secret, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("5"));
    assert_eq!(
        header(&r, "x-ratelimit-limit-tokens"),
        None,
        "a left-out field is no limit"
    );

    let (s, v) = gw
        .admin(
            Method::PUT,
            "/tiers/bad",
            Some(json!({"tokens_per_minute": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = gw
        .admin(
            Method::PUT,
            "/tiers/bad",
            Some(json!({"tokens_per_minut": 5})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown fields are refused");
}

#[tokio::test]
async fn usage_is_reported_per_day_and_model() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "t",
        json!({"tokens_per_minute": 100000, "tokens_per_month": 1000000}),
    )
    .await;
    let (id, key) = gw.workspace("t").await;
    let a = json!({"model": "a", "messages": [{"role": "user", "content": "Hi"}]});
    let b = json!({"model": "b", "messages": [{"role": "user", "content": "Hi"}]});
    gw.chat(&key, a.clone(), &[("x-mock-usage", "1,2")]).await;
    gw.chat(&key, a, &[("x-mock-usage", "3,4")]).await;
    gw.chat(&key, b, &[("x-mock-usage", "10,0")]).await;
    let (s, u) = gw
        .admin(Method::GET, &format!("/workspaces/{id}/usage"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(u["tokens_this_month"], 20);
    assert_eq!(u["requests_this_month"], 3);
    let daily = u["daily"].as_array().unwrap();
    assert_eq!(daily.len(), 2);
    assert_eq!(
        (
            daily[0]["model"].as_str(),
            daily[0]["tokens"].as_u64(),
            daily[0]["requests"].as_u64()
        ),
        (Some("a"), Some(10), Some(2))
    );
    assert_eq!(
        (daily[1]["model"].as_str(), daily[1]["tokens"].as_u64()),
        (Some("b"), Some(10))
    );
    assert_eq!(u["token_bucket"]["level"], 100000 - 20);

    let (s, u) = gw
        .admin(
            Method::GET,
            &format!("/workspaces/{id}/usage?from=1999-01-01&to=1999-01-31"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(u["daily"], json!([]));
    let (s, _) = gw
        .admin(
            Method::GET,
            &format!("/workspaces/{id}/usage?from=yesterday"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// A usage figure past what one request may settle (a faulty upstream's) is capped at that for
/// everything alike: the ledger (its days) held the raw figure, or a negative one from 2^63 up,
/// while the limiter's month capped it, and the two disagreed until a restart rebuilt the month
/// from the ledger (an outside audit).
#[tokio::test]
async fn a_huge_usage_is_capped_alike_in_the_ledger_and_the_limiter() {
    let gw = TestGateway::start().await;
    gw.put_tier("t", json!({"tokens_per_month": 1_000_000_000_000_u64}))
        .await;
    let (id, key) = gw.workspace("t").await;
    let r = gw
        .chat(&key, hello(), &[("x-mock-usage", "1000000000000000,1")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let cap = tiergate::limiter::core::MAX_REQUEST_TOKENS;
    let (s, u) = gw
        .admin(Method::GET, &format!("/workspaces/{id}/usage"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(u["tokens_this_month"], cap, "{u}");
    let days: u64 = u["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(days, cap, "{u}");
}

#[tokio::test]
async fn a_workspace_asks_for_more_and_the_operator_answers() {
    let gw = TestGateway::start().await;
    let (id, key) = gw.workspace("free").await;
    let url = format!("{}/v1/limit-requests", gw.url);

    let r = gw
        .client
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"use_case": "  ", "requested_limits": {"requests_per_second": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = gw
        .client
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"use_case": "x", "requested_limits": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // An increase asks for more than the limit in force (`free`: 1 request/s, 500,000 tokens a
    // minute, no concurrency limit): a lower or equal figure, or a limit where there is none,
    // would lower it (an outside audit saw 1,000 tokens a minute asked, granted, and kept
    // through a promotion).
    for (asked, named) in [
        (json!({"tokens_per_minute": 1000}), "tokens_per_minute"),
        (json!({"requests_per_second": 1}), "requests_per_second"),
        (
            json!({"tokens_per_minute": 2000000, "concurrent_requests": 9}),
            "concurrent_requests",
        ),
    ] {
        let r = gw
            .client
            .post(&url)
            .bearer_auth(&key)
            .json(&json!({"use_case": "more", "requested_limits": asked}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{asked}");
        let body: Value = r.json().await.unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("requested_limits.{named}:")),
            "{message}"
        );
    }

    let ask = json!({"use_case": "Production chatbot, 3k users", "requested_limits": {"requests_per_second": 5, "tokens_per_minute": 2000000}});
    let r = gw
        .client
        .post(&url)
        .bearer_auth(&key)
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["status"], "pending");
    let request_id = created["id"].as_i64().unwrap();

    let (_, pending) = gw
        .admin(Method::GET, "/limit-requests?status=pending", None)
        .await;
    assert_eq!(pending["data"].as_array().unwrap().len(), 1);
    assert_eq!(pending["data"][0]["workspace_id"], id);

    // Approve with a smaller grant than asked, and a note that says why (an empty one is
    // refused, as an empty reason for a denial is).
    let approve = format!("/limit-requests/{request_id}/approve");
    let grant = |note: &str| Some(json!({"limits": {"requests_per_second": 3}, "reason": note}));
    let (s, refused) = gw.admin(Method::POST, &approve, grant(" ")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{refused}");
    let note = "3/s now; 5/s once your traffic shows it";
    let (s, approved) = gw.admin(Method::POST, &approve, grant(note)).await;
    assert_eq!(s, StatusCode::OK, "{approved}");
    assert_eq!(approved["status"], "approved");
    let r = gw
        .client
        .get(format!("{url}/{request_id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["reason"], note, "the workspace reads the note: {seen}");
    assert_eq!(seen["granted_limits"], json!({"requests_per_second": 3.0}));
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("3"));
    // Deciding twice is a conflict.
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{request_id}/deny"),
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // A second request, denied with a reason the workspace can read.
    let r = gw
        .client
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"use_case": "more", "requested_limits": {"tokens_per_month": 5000000000u64}}))
        .send()
        .await
        .unwrap();
    let second: Value = r.json().await.unwrap();
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{}/deny", second["id"]),
            Some(json!({"reason": ""})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a denial needs a reason");
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{}/deny", second["id"]),
            Some(json!({"reason": "Spend history too short"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let mine: Value = gw
        .client
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = mine["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["status"], "approved");
    assert_eq!(
        data[0]["granted_limits"],
        json!({"requests_per_second": 3.0})
    );
    assert_eq!(data[1]["status"], "denied");
    assert_eq!(data[1]["reason"], "Spend history too short");

    // Approving without a body grants what was asked.
    let r = gw
        .client
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"use_case": "burst", "requested_limits": {"tokens_per_month": 9_000_000_000u64}}))
        .send()
        .await
        .unwrap();
    let third: Value = r.json().await.unwrap();
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{}/approve", third["id"]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let limits = gw.limits(&key).await;
    assert_eq!(limits["limits"]["tokens_per_month"], 9_000_000_000u64);
    assert_eq!(limits["limits"]["requests_per_second"], 3.0);
    assert_eq!(limits["tier"], "free");
    assert_eq!(limits["tier_limits"]["requests_per_second"], 1.0);
}

#[tokio::test]
async fn changes_made_by_another_process_are_seen_within_about_a_second() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    // Another process (the admin CLI) opens the same database.
    let other = SqliteStore::open(&format!("sqlite://{}", gw.db.display()))
        .await
        .unwrap();

    // A key created there works at once.
    let secret = generate_key();
    other
        .create_key(
            &NewKey {
                workspace: ws,
                name: None,
                prefix: secret.prefix.clone(),
                hash: secret.hash,
                expires_at: None,
            },
            &Actor::cli(Some("other")),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        gw.chat(&secret.secret, hello(), &[]).await.status(),
        StatusCode::OK
    );

    // A tier change there is seen within the refresh bound.
    other
        .update_workspace(
            ws,
            &WorkspaceChange {
                tier: Some("tier-3".into()),
                ..WorkspaceChange::default()
            },
            &Actor::cli(Some("other")),
            0,
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        gw.advance(Duration::from_secs(1));
        let r = gw.chat(&key, hello(), &[]).await;
        if header(&r, "x-ratelimit-limit-requests") == Some("25") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not seen after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Unknown keys arriving all the time do not use up the checks of the store: a key created by
/// another process in the middle of a flood of made-up keys works on its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_does_not_keep_a_new_key_out() {
    let gw = TestGateway::start().await;
    let (ws, _) = gw.workspace("tier-3").await;
    let other = SqliteStore::open(&format!("sqlite://{}", gw.db.display()))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (client, url, stop) = (gw.client.clone(), gw.url.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let mut refused = 0u32;
            // Bounded: at most 2,000 requests a task, and stopped by the test before that.
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(generate_key().secret)
                    .json(&hello())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
                refused += 1;
            }
            refused
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..5 {
        let secret = generate_key();
        other
            .create_key(
                &NewKey {
                    workspace: ws,
                    name: None,
                    prefix: secret.prefix.clone(),
                    hash: secret.hash,
                    expires_at: None,
                },
                &Actor::cli(Some("other")),
                0,
            )
            .await
            .unwrap();
        let r = gw.chat(&secret.secret, hello(), &[]).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "new key {round} during the flood"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for task in flood {
        refused += task.await.unwrap();
    }
    assert!(refused >= 16, "the flood ran: {refused} refused");
}

/// A workspace cannot pile up increase requests: past the bound of pending ones, a new one is
/// refused (409) until the operator answers one.
#[tokio::test]
async fn a_workspace_has_at_most_ten_increase_requests_waiting() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let ask = |n: u64| {
        gw.client
            .post(format!("{}/v1/limit-requests", gw.url))
            .bearer_auth(&key)
            .json(&json!({"use_case": format!("ask {n}"), "requested_limits": {"tokens_per_month": 2_000_000_000u64 + n}}))
            .send()
    };
    let mut first = None;
    for n in 0..10 {
        let r = ask(n).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        first.get_or_insert(v["id"].as_i64().unwrap());
    }
    let r = ask(10).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "conflict", "{body}");
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/limit-requests/{}/deny", first.unwrap()),
            Some(json!({"reason": "no"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ask(11).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(ask(12).await.unwrap().status(), StatusCode::CONFLICT);
    // Or until the workspace withdraws one of its own.
    let r = gw
        .client
        .delete(format!(
            "{}/v1/limit-requests/{}",
            gw.url,
            first.unwrap() + 1
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ask(13).await.unwrap().status(), StatusCode::CREATED);
}

/// A workspace reads one of its requests and withdraws it while it is pending; another
/// workspace's is not found, and paths under its routes are never forwarded (an outside audit:
/// `GET /v1/limit-requests/{id}` went to the upstream and cost a request).
#[tokio::test]
async fn a_workspace_reads_and_withdraws_its_own_increase_requests() {
    let gw = TestGateway::start().await;
    let (ws, key) = gw.workspace("free").await;
    let (_, other) = gw.workspace("free").await;
    let r = gw
        .client
        .post(format!("{}/v1/limit-requests", gw.url))
        .bearer_auth(&key)
        .json(&json!({"use_case": "launch", "requested_limits": {"tokens_per_month": 2_000_000_000u64}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_i64().unwrap();
    let one = |method: Method, path: String, key: &str| {
        gw.client
            .request(method, format!("{}{path}", gw.url))
            .bearer_auth(key)
            .send()
    };
    let path = format!("/v1/limit-requests/{id}");

    let r = one(Method::GET, path.clone(), &key).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), created);
    for method in [Method::GET, Method::DELETE] {
        let r = one(method.clone(), path.clone(), &other).await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} of another's");
    }
    let r = one(Method::DELETE, path.clone(), &key).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let withdrawn: Value = r.json().await.unwrap();
    assert_eq!(withdrawn["status"], "withdrawn", "{withdrawn}");
    assert!(withdrawn["decided_at"].is_string(), "{withdrawn}");
    assert_eq!(withdrawn["granted_limits"], Value::Null);
    let r = one(Method::DELETE, path.clone(), &key).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already withdrawn"),
        "{body}"
    );
    let (s, body) = gw
        .admin(Method::POST, &format!("/limit-requests/{id}/approve"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (s, seen) = gw
        .admin(Method::GET, &format!("/limit-requests/{id}"), None)
        .await;
    assert_eq!((s, &seen), (StatusCode::OK, &withdrawn));
    let (s, _) = gw.admin(Method::GET, "/limit-requests/999999", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, listed) = gw
        .admin(Method::GET, "/limit-requests?status=withdrawn", None)
        .await;
    assert_eq!(listed["data"], json!([withdrawn]));
    let (_, audit) = gw
        .admin(Method::GET, "/audit?action=limit_request.withdraw", None)
        .await;
    assert_eq!(
        audit["data"][0]["actor"],
        format!("workspace:{ws}"),
        "{audit}"
    );
    let overrides = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await
        .1;
    assert_eq!(
        overrides["overrides"],
        json!({}),
        "a withdrawal grants nothing"
    );

    // The gateway's own, whatever follows: never the upstream's, never counted.
    for (method, path, status) in [
        (Method::GET, format!("/v1/limit-requests/{id}/approve"), 404),
        (Method::POST, format!("/v1/limit-requests/{id}"), 405),
        (Method::GET, "/v1/limit-requests/abc".into(), 400),
        (Method::POST, "/v1/limits/more".into(), 404),
        (Method::GET, "/v1/usage/2026-12".into(), 404),
        (Method::GET, "/v1/Limit-Requests/1/x".into(), 404),
    ] {
        let r = one(method.clone(), path.clone(), &key).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["object"], "error", "{method} {path}: {body}");
    }
    let r = gw
        .client
        .get(format!("{}{path}", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(gw.upstream_count().await, 0, "forwarded upstream");
    assert_eq!(gw.exact_usage(&key).await["requests_this_month"], 0);
}

/// A revoke answers the key with its last use, as the list of keys gives it (an outside audit:
/// `null` right after a request with the key, its use not yet written).
#[tokio::test]
async fn a_revoke_answers_the_key_with_its_last_use() {
    let gw = TestGateway::start().await;
    let (ws, _) = gw.workspace("free").await;
    // Its id from its creation: listing the keys would write their last use first.
    let (s, made) = gw
        .admin(Method::POST, &format!("/workspaces/{ws}/keys"), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let (key, secret) = (made["id"].as_i64().unwrap(), made["key"].as_str().unwrap());
    assert_eq!(gw.chat(secret, hello(), &[]).await.status(), StatusCode::OK);
    let (s, revoked) = gw
        .admin(Method::DELETE, &format!("/keys/{key}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    assert!(revoked["last_used_at"].is_string(), "{revoked}");
}

/// An approval only raises: a figure granted at or below the limit in force at approval is
/// refused, whether the operator typed it or it is what was asked and the limits rose since (an
/// outside audit: a request for 3M tokens/minute, approved after the workspace moved to a tier
/// of 10M, cut it to 3M; of two requests, the lower approved last won).
#[tokio::test]
async fn an_approval_never_lowers_a_limit() {
    let gw = TestGateway::start().await;
    let (_, first) = gw.workspace("free").await;
    let (ws, second) = gw.workspace("free").await;
    let ask = |key: &str, tpm: u64| {
        let gw = &gw;
        let key = key.to_string();
        async move {
            let r = gw
                .post(
                    &key,
                    "/v1/limit-requests",
                    json!({"use_case": "more", "requested_limits": {"tokens_per_minute": tpm}}),
                    &[],
                )
                .await;
            assert_eq!(r.status(), StatusCode::CREATED);
            r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
        }
    };
    let tpm = |key: &str| {
        let key = key.to_string();
        let gw = gw.url.clone();
        async move {
            let r = reqwest::Client::new()
                .get(format!("{gw}/v1/limits"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["limits"]["tokens_per_minute"].clone()
        }
    };
    let approve = |id: i64, body: Option<Value>| {
        let gw = &gw;
        async move {
            gw.admin(Method::POST, &format!("/limit-requests/{id}/approve"), body)
                .await
        }
    };
    // Two requests (free: 500,000 a minute): the higher approved first, the lower then refused.
    let (lower, higher) = (ask(&first, 800_000).await, ask(&first, 900_000).await);
    assert_eq!(approve(higher, None).await.0, StatusCode::OK);
    let (s, body) = approve(lower, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("requested_limits.tokens_per_minute: 800000 is not above what holds now (the limit in force is 900000)"),
        "{message}"
    );
    assert_eq!(tpm(&first).await, 900_000);
    // The tier rose past what was asked: approving as asked is refused, other figures go.
    let asked = ask(&second, 3_000_000).await;
    let (s, _) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"tier": "tier-3"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let in_force = tpm(&second).await.as_u64().unwrap();
    assert!(in_force > 3_000_000, "{in_force}");
    let (s, body) = approve(asked, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let (s, body) = approve(asked, Some(json!({"limits": {"tokens_per_minute": 100}}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("limits.tokens_per_minute: 100"),
        "{body}"
    );
    assert_eq!(tpm(&second).await, in_force, "nothing lowered");
    let more = json!({"limits": {"tokens_per_minute": in_force + 1}});
    let (s, body) = approve(asked, Some(more)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(tpm(&second).await, in_force + 1);
}

/// A burst granted earlier does not hold back a rate granted later: approving 20/s after a
/// burst of 8 (both increases over a tier of 5/s, burst 5) raises the burst to the new rate's
/// own, 20 (an outside audit: 8 of 20 requests at once admitted, where a workspace never given
/// the burst got 20). A burst the operator set below the tier's stays.
#[tokio::test]
async fn an_earlier_burst_increase_does_not_cap_a_later_rate_increase() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "five",
        json!({"requests_per_second": 5, "burst": 5, "tokens_per_minute": 10000000}),
    )
    .await;
    let ask_and_grant = |key: String, asked: Value| {
        let gw = &gw;
        async move {
            let r = gw
                .client
                .post(format!("{}/v1/limit-requests", gw.url))
                .bearer_auth(&key)
                .json(&json!({"use_case": "more", "requested_limits": asked}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
            let (s, v) = gw
                .admin(
                    Method::POST,
                    &format!("/limit-requests/{id}/approve"),
                    Some(json!({})),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v
        }
    };
    let at_once = |key: String| {
        let gw = &gw;
        async move {
            let mut admitted = 0;
            for _ in 0..30 {
                if gw.chat(&key, hello(), &[]).await.status() == StatusCode::OK {
                    admitted += 1;
                }
            }
            admitted
        }
    };
    let (ws, key) = gw.workspace("five").await;
    ask_and_grant(key.clone(), json!({"burst": 8})).await;
    let approved = ask_and_grant(key.clone(), json!({"requests_per_second": 20})).await;
    assert_eq!(
        approved["granted_limits"],
        json!({"requests_per_second": 20.0, "burst": 20})
    );
    let (_, w) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    assert_eq!(w["overrides"]["burst"], 20, "{w}");
    // The clock stands still: what is admitted is the burst.
    assert_eq!(at_once(key).await, 20);

    // The operator's restriction (a burst of 2, below the tier's 5) is kept.
    let (ws, key) = gw.workspace("five").await;
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": {"burst": 2}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let approved = ask_and_grant(key.clone(), json!({"requests_per_second": 20})).await;
    assert_eq!(
        approved["granted_limits"],
        json!({"requests_per_second": 20.0})
    );
    assert_eq!(at_once(key).await, 2);
}

/// A change that changes nothing (the tier the workspace is on, a status it has) answers the
/// workspace as it is and writes no audit entry (an outside audit: entries whose before and
/// after were the same); a real change still does.
#[tokio::test]
async fn a_change_that_changes_nothing_is_not_audited() {
    let gw = TestGateway::start().await;
    let (ws, _) = gw.workspace("free").await;
    let updates = || async {
        let (s, log) = gw
            .admin(
                Method::GET,
                &format!("/audit?action=workspace.update&workspace_id={ws}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{log}");
        log["data"].as_array().unwrap().len()
    };
    let patch = |body: Value| {
        let gw = &gw;
        async move {
            let (s, v) = gw
                .admin(Method::PATCH, &format!("/workspaces/{ws}"), Some(body))
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v
        }
    };
    assert_eq!(updates().await, 0);
    patch(json!({"tier": "free"})).await;
    patch(json!({"status": "active"})).await;
    assert_eq!(updates().await, 0);
    let v = patch(json!({"status": "suspended"})).await;
    assert_eq!(v["status"], "suspended");
    patch(json!({"status": "suspended"})).await;
    assert_eq!(updates().await, 1);
    // A tier put as it is, likewise.
    let tier = json!({"requests_per_second": 3, "tokens_per_minute": 5000});
    gw.put_tier("same", tier.clone()).await;
    gw.put_tier("same", tier).await;
    let (_, log) = gw.admin(Method::GET, "/audit?action=tier.put", None).await;
    let puts = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "tier:same")
        .count();
    assert_eq!(puts, 1, "{log}");
}

/// A burst override needs a rate to go with, the tier's or an override's: on a tier without
/// one it was taken, shown in the limits, and limited nothing (an outside audit).
#[tokio::test]
async fn a_burst_override_without_a_rate_is_refused() {
    let gw = TestGateway::start().await;
    gw.put_tier("no-rate", json!({"tokens_per_month": 100000}))
        .await;
    let (ws, _) = gw.workspace("no-rate").await;
    let patch = |body: Value| {
        let gw = &gw;
        async move {
            gw.admin(Method::PATCH, &format!("/workspaces/{ws}"), Some(body))
                .await
        }
    };
    let (s, v) = patch(json!({"limits": {"burst": 3}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with("limits.burst:"),
        "{v}"
    );
    let (s, v) = patch(json!({"limits": {"burst": 3, "requests_per_second": 2}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Clearing the rate would leave the burst alone: refused too.
    let (s, v) = patch(json!({"limits": {"requests_per_second": null}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // On a tier with a rate, a burst alone applies to it.
    let (ws, _) = gw.workspace("free").await;
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": {"burst": 3}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}
