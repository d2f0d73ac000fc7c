//! A key's own limits through the admin API (`PATCH /admin/v1/keys/{id}`): set, shown in the
//! key listing and on the key's `/v1/limits`, cleared; refused naming the field when unknown,
//! invalid or above the workspace's effective limits (tier, overrides, budget); `404` for no
//! key, `409` for a revoked one; audited; picked up by the catalogue when another process makes
//! the change; and, after the workspace's limits go down, enforced within them while stored as
//! set.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::admin::Admin;
use tiergate::clock::SystemClock;
use tiergate::model::{Actor, KeyLimits};

use crate::harness::*;

const TIER: &str = "k-tier";

/// A gateway, a workspace on a tier of 10 requests/s, 100,000 tokens/minute and 1,000,000
/// tokens/month, and two keys: `(gateway, workspace, [(id, secret); 2])`.
async fn setup() -> (TestGateway, i64, [(i64, String); 2]) {
    let gw = TestGateway::start().await;
    gw.put_tier(
        TIER,
        json!({"requests_per_second": 10, "tokens_per_minute": 100000, "tokens_per_month": 1000000}),
    )
    .await;
    let (ws, first) = gw.workspace(TIER).await;
    let second = gw.key(ws).await;
    let keys = listing(&gw, ws).await;
    let id = |i: usize| keys[i]["id"].as_i64().unwrap();
    (gw, ws, [(id(0), first), (id(1), second)])
}

async fn listing(gw: &TestGateway, ws: i64) -> Vec<Value> {
    let (s, v) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}/keys"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

async fn patch(gw: &TestGateway, id: i64, body: Value) -> (StatusCode, Value) {
    gw.admin(Method::PATCH, &format!("/keys/{id}"), Some(body))
        .await
}

async fn audited(gw: &TestGateway) -> Vec<Value> {
    let (s, v) = gw
        .admin(Method::GET, "/audit?action=key.limits", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_key_s_limits_are_set_shown_clamped_and_cleared() {
    let (gw, ws, [(id, key), (_, other)]) = setup().await;
    let limits = json!({"requests_per_second": 2.5, "burst": 2, "tokens_per_minute": 5000, "tokens_per_month": 50000});
    let (s, v) = patch(&gw, id, json!({"limits": limits})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["id"].as_i64(), &v["limits"]), (Some(id), &limits));
    assert_eq!(v["workspace_id"], ws);
    // The listing shows each key's limits: this one's, and none for the other.
    let keys = listing(&gw, ws).await;
    assert_eq!(keys[0]["limits"], limits);
    assert_eq!(keys[1]["limits"], json!({}));
    // Audited once, with the key before and after (never its hash).
    let log = audited(&gw).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["target"], format!("key:{id}"));
    assert_eq!(log[0]["workspace_id"], ws);
    assert_eq!(log[0]["after"]["limits"], limits);
    assert_eq!(log[0]["before"].get("limits"), None, "{}", log[0]);

    // The key's /v1/limits shows its limits as enforced; another key's shows none.
    let page = gw.limits(&key).await;
    assert_eq!(page["key"]["id"], id, "{page}");
    assert_eq!(page["key"]["limits"], limits);
    assert_eq!(gw.limits(&other).await.get("key"), None);
    // Requests with either key go through.
    for k in [&key, &other] {
        let r = gw.chat(k, hello(), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    // The workspace's limits go down below the key's: the key keeps its limits as set, and
    // what is enforced is within the workspace's.
    gw.put_tier(
        TIER,
        json!({"requests_per_second": 1, "tokens_per_minute": 3000, "tokens_per_month": 1000000}),
    )
    .await;
    assert_eq!(listing(&gw, ws).await[0]["limits"], limits);
    let page = gw.limits(&key).await;
    assert_eq!(
        page["key"]["limits"],
        json!({"requests_per_second": 1.0, "burst": 1, "tokens_per_minute": 3000, "tokens_per_month": 50000}),
        "{page}"
    );

    // Cleared, with null and with {}.
    for clear in [Value::Null, json!({})] {
        let (s, v) = patch(&gw, id, json!({"limits": limits})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "above the new tier's: {v}");
        let (s, v) = patch(&gw, id, json!({"limits": {"tokens_per_minute": 1000}})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            gw.limits(&key).await["key"]["limits"]["tokens_per_minute"],
            1000
        );
        let (s, v) = patch(&gw, id, json!({ "limits": clear })).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["limits"], json!({}));
        assert_eq!(listing(&gw, ws).await[0]["limits"], json!({}));
        assert_eq!(gw.limits(&key).await.get("key"), None);
    }
    assert_eq!(audited(&gw).await.len(), 5);
}

#[tokio::test]
async fn a_key_s_limits_are_refused_naming_the_field() {
    let (gw, ws, [(id, key), _]) = setup().await;
    let refused = [
        // Not a limit a key may have, or not a number.
        (json!({"concurrent_requests": 1}), "concurrent_requests"),
        (json!({"models": {}}), "models"),
        (json!({"tokens_per_minute": "many"}), "tokens_per_minute"),
        (json!({"tokens_per_minute": -5}), "tokens_per_minute"),
        // Invalid figures.
        (json!({"tokens_per_minute": 0}), "tokens_per_minute"),
        (json!({"tokens_per_month": 0}), "tokens_per_month"),
        (json!({"requests_per_second": 0}), "requests_per_second"),
        (
            json!({"requests_per_second": 1.0005}),
            "requests_per_second",
        ),
        (json!({"requests_per_second": 1, "burst": 0}), "burst"),
        (json!({"burst": 2}), "burst"),
        // Above the workspace's.
        (json!({"requests_per_second": 10.5}), "requests_per_second"),
        (json!({"requests_per_second": 5, "burst": 11}), "burst"),
        (json!({"tokens_per_minute": 100001}), "tokens_per_minute"),
        (json!({"tokens_per_month": 1000001}), "tokens_per_month"),
    ];
    for (limits, field) in refused {
        let (s, e) = patch(&gw, id, json!({ "limits": limits })).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{limits}: {e}");
        assert!(is_error_shaped(&e), "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(field), "{limits}: {message}");
    }
    for body in [json!({}), json!({"limit": {}}), json!({"limits": 5})] {
        let (s, e) = patch(&gw, id, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
    }
    // The workspace's own figures, as they are at the time: at the limit is allowed.
    let (s, v) = patch(
        &gw,
        id,
        json!({"limits": {"requests_per_second": 10, "burst": 10, "tokens_per_minute": 100000, "tokens_per_month": 1000000}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // An override raises what a key may have; a budget lowers it.
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"limits": {"tokens_per_minute": 200000}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = patch(&gw, id, json!({"limits": {"tokens_per_minute": 150000}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = gw
        .client
        .put(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .json(&json!({"tokens_per_month": 400000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (s, e) = patch(&gw, id, json!({"limits": {"tokens_per_month": 400001}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["message"].as_str().unwrap().contains("tokens_per_month"));
    let (s, v) = patch(&gw, id, json!({"limits": {"tokens_per_month": 400000}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let accepted = json!({"tokens_per_month": 400000});
    assert_eq!(listing(&gw, ws).await[0]["limits"], accepted);

    // No such key; a revoked key. Neither changes anything.
    let (s, e) = patch(&gw, id + 100, json!({"limits": {}})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert!(e["message"].as_str().unwrap().contains("key"), "{e}");
    let (s, revoked) = gw.admin(Method::DELETE, &format!("/keys/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    // Revoking it again changes nothing: the same answer, and no second audit entry.
    let (s, again) = gw.admin(Method::DELETE, &format!("/keys/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, revoked);
    let (_, log) = gw
        .admin(Method::GET, "/audit?action=key.revoke", None)
        .await;
    assert_eq!(log["data"].as_array().unwrap().len(), 1, "{log}");
    let (s, e) = patch(&gw, id, json!({"limits": {}})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(e["message"].as_str().unwrap().contains("revoked"), "{e}");
    assert_eq!(listing(&gw, ws).await[0]["limits"], accepted);
    // Only the three changes made were audited.
    assert_eq!(audited(&gw).await.len(), 3);
}

/// A change made by another process (the CLI, another instance) on the same store reaches the
/// gateway's catalogue within `catalog_refresh` (1 s): the key's page shows it, and clearing
/// it elsewhere is seen too.
#[tokio::test]
async fn a_change_made_elsewhere_reaches_the_gateway_within_the_catalogue_refresh() {
    let (gw, _, [(id, key), _]) = setup().await;
    let url = format!("sqlite://{}", gw.db.display());
    let store = tiergate::store::open(&url).await.unwrap();
    let elsewhere = Admin::new(store, Arc::new(SystemClock));
    let limits = KeyLimits {
        tokens_per_minute: Some(7000),
        ..KeyLimits::default()
    };
    elsewhere
        .set_key_limits(&Actor::cli(None), id, limits)
        .await
        .unwrap();
    eventually(Duration::from_secs(3), "the key's limits", || async {
        gw.limits(&key).await["key"]["limits"] == json!({"tokens_per_minute": 7000})
    })
    .await;
    elsewhere
        .set_key_limits(&Actor::cli(None), id, KeyLimits::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(3),
        "the key's limits cleared",
        || async { gw.limits(&key).await.get("key").is_none() },
    )
    .await;
}
