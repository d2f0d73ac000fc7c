//! The operator's side: the audit of admin actions and its filters, named admin tokens, the
//! admin listener, and admin changes racing each other and other processes.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::clock::Clock;
use tiergate::config::{RawAdminToken, RawSettings};
use tiergate::http::views::rfc3339;
use tiergate::model::{Actor, Overrides};
use tiergate::store::sqlite::SqliteStore;
use tiergate::store::{Store, WorkspaceChange};

use crate::harness::*;

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789abc";

/// A gateway with the single admin token (`admin`) and two named ones, `alice` and `bob`.
async fn with_named_tokens(admin_listener: bool) -> TestGateway {
    TestGateway::start_with(Options {
        raw: RawSettings {
            admin_tokens: Some(vec![
                RawAdminToken {
                    name: "alice".into(),
                    token: ALICE.into(),
                },
                RawAdminToken {
                    name: "bob".into(),
                    token: BOB.into(),
                },
            ]),
            ..RawSettings::default()
        },
        admin_listener,
        ..Options::default()
    })
    .await
}

/// The audit log through the API, with `query`.
async fn audit(gw: &TestGateway, query: &str) -> Value {
    let (s, v) = gw.admin(Method::GET, &format!("/audit{query}"), None).await;
    assert_eq!(s, StatusCode::OK, "{query}: {v}");
    v
}

fn actions(page: &Value) -> Vec<(String, String)> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn ask(gw: &TestGateway, key: &str, body: Value) -> Value {
    let r = gw.post(key, "/v1/limit-requests", body, &[]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.unwrap()
}

#[tokio::test]
async fn every_admin_action_is_audited_with_who_what_when_before_and_after() {
    let gw = with_named_tokens(false).await;
    let started = gw.clock.now_secs();

    // alice: a tier, a workspace on it, a change of everything, a key made and revoked.
    let (s, _) = gw
        .admin_as(
            ALICE,
            Method::PUT,
            "/tiers/gold",
            Some(json!({"requests_per_second": 10, "tokens_per_minute": 9000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, ws) = gw
        .admin_as(
            ALICE,
            Method::POST,
            "/workspaces",
            Some(json!({"name": "acme", "tier": "gold"})),
        )
        .await;
    let id = ws["id"].as_i64().unwrap();
    gw.advance(Duration::from_secs(60));
    let (s, _) = gw
        .admin_as(
            ALICE,
            Method::PATCH,
            &format!("/workspaces/{id}"),
            Some(json!({"tier": "free", "limits": {"tokens_per_minute": 1234}, "status": "suspended"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, made) = gw
        .admin_as(
            ALICE,
            Method::POST,
            &format!("/workspaces/{id}/keys"),
            Some(json!({"name": "ci"})),
        )
        .await;
    let secret = made["key"].as_str().unwrap().to_string();
    let key_id = made["id"].as_i64().unwrap();
    gw.admin_as(ALICE, Method::DELETE, &format!("/keys/{key_id}"), None)
        .await;

    // The workspace asks twice (with a key of its own); bob approves one, admin denies one.
    gw.admin(
        Method::PATCH,
        &format!("/workspaces/{id}"),
        Some(json!({"status": "active"})),
    )
    .await;
    let key = gw.key(id).await;
    let first = ask(
        &gw,
        &key,
        json!({"use_case": "launch", "requested_limits": {"requests_per_second": 3}}),
    )
    .await;
    let second = ask(
        &gw,
        &key,
        json!({"use_case": "more", "requested_limits": {"tokens_per_month": 5_000_000_000u64}}),
    )
    .await;
    gw.advance(Duration::from_secs(60));
    let (s, _) = gw
        .admin_as(
            BOB,
            Method::POST,
            &format!("/limit-requests/{}/approve", first["id"]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{}/deny", second["id"]),
            Some(json!({"reason": "not yet"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let all = audit(&gw, "").await;
    let ws_actor = format!("workspace:{id}");
    let expected: Vec<(&str, &str)> = vec![
        ("admin", "limit_request.deny"),
        ("bob", "limit_request.approve"),
        (&ws_actor, "limit_request.create"),
        (&ws_actor, "limit_request.create"),
        ("admin", "key.create"),
        ("admin", "workspace.update"),
        ("alice", "key.revoke"),
        ("alice", "key.create"),
        ("alice", "workspace.update"),
        ("alice", "workspace.create"),
        ("alice", "tier.put"),
    ];
    let got = actions(&all);
    let got: Vec<(&str, &str)> = got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(got, expected, "newest first");
    assert_eq!(all["has_more"], false);
    let text = all.to_string();
    assert!(!text.contains(&secret), "a key's secret is never audited");
    assert!(!text.contains(&key), "a key's secret is never audited");
    assert!(!text.contains(ALICE) && !text.contains(BOB) && !text.contains(ADMIN));

    let entry = |action: &str, actor: &str| -> Value {
        all["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == action && e["actor"] == actor)
            .cloned()
            .unwrap()
    };
    let tier = entry("tier.put", "alice");
    assert_eq!(tier["target"], "tier:gold");
    assert!(tier["before"].is_null(), "created: nothing before");
    assert_eq!(tier["after"]["limits"]["tokens_per_minute"], 9000);
    assert!(tier["workspace_id"].is_null());
    assert_eq!(tier["at"], rfc3339(started));

    let update = entry("workspace.update", "alice");
    assert_eq!(update["target"], format!("workspace:{id}"));
    assert_eq!(update["workspace_id"], id);
    assert_eq!(update["at"], rfc3339(started + 60));
    assert_eq!(
        (
            &update["before"]["tier"],
            &update["before"]["status"],
            &update["before"]["overrides"]
        ),
        (&json!("gold"), &json!("active"), &json!({}))
    );
    assert_eq!(
        (
            &update["after"]["tier"],
            &update["after"]["status"],
            &update["after"]["overrides"]
        ),
        (
            &json!("free"),
            &json!("suspended"),
            &json!({"tokens_per_minute": 1234})
        )
    );

    let revoked = entry("key.revoke", "alice");
    assert_eq!(revoked["target"], format!("key:{key_id}"));
    assert!(revoked["before"]["revoked_at"].is_null());
    assert!(revoked["after"]["revoked_at"].is_number());
    assert_eq!(revoked["after"]["name"], "ci");
    assert!(revoked["after"].get("hash").is_none());
    assert!(secret.starts_with(revoked["after"]["prefix"].as_str().unwrap()));

    let approved = entry("limit_request.approve", "bob");
    assert_eq!(approved["before"]["request"]["status"], "pending");
    assert_eq!(approved["after"]["request"]["status"], "approved");
    assert_eq!(
        approved["before"]["workspace_overrides"],
        json!({"tokens_per_minute": 1234})
    );
    assert_eq!(
        approved["after"]["workspace_overrides"],
        json!({"tokens_per_minute": 1234, "requests_per_second": 3.0})
    );
    assert_eq!(approved["at"], rfc3339(started + 120));
    let denied = entry("limit_request.deny", "admin");
    assert_eq!(denied["after"]["reason"], "not yet");
    let created = entry("limit_request.create", &ws_actor);
    assert_eq!(created["after"]["use_case"], "more", "the newer one first");
    assert_eq!(created["after"]["status"], "pending");
    assert_eq!(created["workspace_id"], id);
}

#[tokio::test]
async fn the_audit_is_read_by_workspace_actor_action_and_time_a_page_at_a_time() {
    let gw = with_named_tokens(false).await;
    let t0 = gw.clock.now_secs();
    let (a, _) = gw.workspace("free").await; // admin: workspace.create, key.create
    gw.advance(Duration::from_secs(10));
    let (_, b) = gw
        .admin_as(
            ALICE,
            Method::POST,
            "/workspaces",
            Some(json!({"name": "b"})),
        )
        .await;
    let b = b["id"].as_i64().unwrap();
    for rps in 1..=5 {
        gw.advance(Duration::from_secs(10));
        let (s, _) = gw
            .admin_as(
                BOB,
                Method::PATCH,
                &format!("/workspaces/{b}"),
                Some(json!({"limits": {"requests_per_second": rps}})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let all = audit(&gw, "").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 8);

    let on_a = audit(&gw, &format!("?workspace_id={a}")).await;
    assert_eq!(
        actions(&on_a),
        [
            ("admin".to_string(), "key.create".to_string()),
            ("admin".to_string(), "workspace.create".to_string())
        ]
    );
    let by_alice = audit(&gw, "?actor=alice").await;
    assert_eq!(by_alice["data"].as_array().unwrap().len(), 1);
    assert_eq!(by_alice["data"][0]["workspace_id"], b);
    let updates = audit(&gw, "?action=workspace.update&actor=bob").await;
    assert_eq!(updates["data"].as_array().unwrap().len(), 5);
    assert_eq!(
        audit(&gw, "?actor=nobody").await["data"],
        json!([]),
        "an unknown actor matches nothing"
    );

    // [t0 + 20, t0 + 40): the updates made at +20 and +30.
    let from = rfc3339(t0 + 20);
    let to = rfc3339(t0 + 40);
    let window = audit(
        &gw,
        &format!(
            "?from={}&to={}",
            from.as_str().unwrap().replace('+', "%2B"),
            to.as_str().unwrap().replace('+', "%2B")
        ),
    )
    .await;
    let rps: Vec<&Value> = window["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["after"]["overrides"]["requests_per_second"])
        .collect();
    assert_eq!(rps, [&json!(2.0), &json!(1.0)]);

    // Pages of 3 walk the whole log, newest first, with nothing lost or repeated.
    let mut walked = Vec::new();
    let mut query = "?limit=3".to_string();
    loop {
        let page = audit(&gw, &query).await;
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        walked.extend(data.iter().map(|e| e["id"].as_i64().unwrap()));
        if page["has_more"] == false {
            break;
        }
        query = format!("?limit=3&after={}", page["last_id"]);
    }
    let every: Vec<i64> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(walked, every);
    assert!(every.windows(2).all(|w| w[0] > w[1]));
    let last = audit(&gw, "?limit=1000").await;
    assert_eq!(last["has_more"], false);
}

#[tokio::test]
async fn each_admin_token_works_and_a_wrong_one_or_none_is_refused() {
    let gw = with_named_tokens(false).await;
    for token in [ADMIN, ALICE, BOB] {
        let (s, _) = gw.admin_as(token, Method::GET, "/workspaces", None).await;
        assert_eq!(s, StatusCode::OK, "{token}");
    }
    for token in [
        "alice-token-012345678",
        "alice-token-0123456789x",
        "ALICE-TOKEN-0123456789",
        "alice",
    ] {
        let (s, v) = gw.admin_as(token, Method::GET, "/workspaces", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{token}");
        assert_eq!(v["type"], "authentication_error");
    }
}

#[tokio::test]
async fn with_an_admin_listener_the_admin_api_and_metrics_are_served_only_there() {
    let gw = with_named_tokens(true).await;
    let admin_url = gw.admin_url.clone().unwrap();
    let get = |url: String, token: Option<&str>| {
        let mut r = gw.client.get(url);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    // The main listener: no admin API, no metrics; a JSON 404, whatever the token.
    for path in [
        "/admin/v1/workspaces",
        "/admin/v1/audit",
        "/admin/v1/tiers",
        "/metrics",
    ] {
        let r = get(format!("{}{path}", gw.url), Some(ALICE)).await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (&v["object"], &v["type"]),
            (&json!("error"), &json!("not_found"))
        );
    }
    let r = gw
        .client
        .post(format!("{}/admin/v1/workspaces", gw.url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "sneaky"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The admin listener: the admin API, the metrics, the health checks; not the proxy.
    let (id, key) = gw.workspace("free").await;
    let r = get(format!("{admin_url}/admin/v1/workspaces/{id}"), Some(ALICE))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(gw.metrics().await.contains("tiergate_decisions_total"));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(format!("{admin_url}{path}"), None)
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
        assert_eq!(
            get(format!("{}{path}", gw.url), None)
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    let r = gw
        .client
        .post(format!("{admin_url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The gateway itself is on the main listener as ever.
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    assert_eq!(gw.limits(&key).await["workspace"]["id"], id);
}

#[tokio::test]
async fn without_an_admin_listener_the_admin_api_and_metrics_stay_on_the_main_listener() {
    let gw = TestGateway::start().await;
    assert!(gw.admin_url.is_none());
    let (s, _) = gw.admin(Method::GET, "/workspaces", None).await;
    assert_eq!(s, StatusCode::OK);
    let r = gw
        .client
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("tiergate_decisions_total"));
    // A method a route does not have: a JSON 405 that says which ones it has.
    let r = gw
        .client
        .delete(format!("{}/admin/v1/workspaces", gw.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = header(&r, "allow").unwrap_or_default().to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
}

/// Defect 7 through the admin API: a patch of the overrides and an approval of an increase, sent
/// at the same moment, both hold (the patch is applied by the store to the overrides as they
/// are, never written back whole from a copy read earlier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrides_patch_racing_an_approval_through_the_api_keeps_both() {
    let gw = TestGateway::start().await;
    let (id, key) = gw.workspace("free").await;
    for i in 0..20u64 {
        let request = ask(
            &gw,
            &key,
            json!({"use_case": "more", "requested_limits": {"tokens_per_month": 2_000_000_000 + i}}),
        )
        .await;
        let approve_path = format!("/limit-requests/{}/approve", request["id"]);
        let patch_path = format!("/workspaces/{id}");
        let approve = gw.admin(Method::POST, &approve_path, None);
        let patch = gw.admin(
            Method::PATCH,
            &patch_path,
            Some(json!({"limits": {"requests_per_second": i + 1}})),
        );
        let ((a, av), (p, pv)) = tokio::join!(approve, patch);
        assert_eq!((a, p), (StatusCode::OK, StatusCode::OK), "{av} {pv}");
        let (_, ws) = gw
            .admin(Method::GET, &format!("/workspaces/{id}"), None)
            .await;
        assert_eq!(
            (
                &ws["overrides"]["tokens_per_month"],
                &ws["overrides"]["requests_per_second"]
            ),
            (&json!(2_000_000_000 + i), &json!((i + 1) as f64)),
            "round {i}: one change was lost: {ws}"
        );
    }
}

/// Defect 6 through the admin API: admin changes that read then write (creating a workspace,
/// changing a tier, approving) while another process writes the same SQLite file (the admin
/// CLI) queue for the write lock instead of failing with SQLITE_BUSY (a 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_racing_another_process_on_the_same_sqlite_file_never_fail() {
    let gw = TestGateway::start().await;
    let (id, key) = gw.workspace("free").await;
    let other = SqliteStore::open(&format!("sqlite://{}", gw.db.display()))
        .await
        .unwrap();
    let cli = Actor::cli(Some("other"));
    let (_, others) = gw
        .admin(Method::POST, "/workspaces", Some(json!({"name": "o"})))
        .await;
    let others = others["id"].as_i64().unwrap();
    // One request each from six workspaces (two approvals for one workspace at once would have
    // the second refused, as it would lower the first's figure), asking more than any tier.
    let mut keys = vec![key.clone()];
    for _ in 1..6 {
        keys.push(gw.workspace("free").await.1);
    }
    let requests: Vec<Value> = join_all(keys.iter().enumerate().map(|(i, key)| {
        ask(
            &gw,
            key,
            json!({"use_case": "more", "requested_limits": {"tokens_per_month": 900_000_000_000_000u64 + i as u64}}),
        )
    }))
    .await;

    let background = async {
        for i in 0..40 {
            let tier = ["tier-1", "tier-2"][i % 2];
            other
                .update_workspace(
                    others,
                    &WorkspaceChange {
                        tier: Some(tier.into()),
                        ..WorkspaceChange::default()
                    },
                    &cli,
                    0,
                )
                .await
                .unwrap();
            other
                .create_limit_request(
                    others,
                    "cli",
                    None,
                    &Overrides {
                        concurrent_requests: Some(5),
                        ..Overrides::default()
                    },
                    // 40 of them: this test is about the write lock, not the bound.
                    usize::MAX,
                    &cli,
                    0,
                )
                .await
                .unwrap();
        }
    };
    // (method, path, body) of every call, made all at once.
    let mut calls = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let tier = if i % 2 == 0 { "tier-2" } else { "tier-3" };
        calls.push((
            Method::POST,
            format!("/limit-requests/{}/approve", r["id"]),
            None,
        ));
        calls.push((
            Method::POST,
            "/workspaces".to_string(),
            Some(json!({"name": format!("w{i}"), "tier": "tier-1"})),
        ));
        calls.push((
            Method::PATCH,
            format!("/workspaces/{id}"),
            Some(json!({ "tier": tier })),
        ));
    }
    let through_the_api = join_all(
        calls
            .iter()
            .map(|(method, path, body)| gw.admin(method.clone(), path, body.clone())),
    );
    let ((), answers) = tokio::join!(background, through_the_api);
    for (status, body) in answers {
        assert!(status.is_success(), "{status}: {body}");
    }
    let (_, log) = gw
        .admin(Method::GET, "/audit?action=limit_request.approve", None)
        .await;
    assert_eq!(log["data"].as_array().unwrap().len(), 6);
}

/// The CLI's audit actor in a gateway's log: another process's change is there with its actor.
#[tokio::test]
async fn changes_by_another_process_are_in_the_same_audit_log() {
    let gw = TestGateway::start().await;
    let (id, _) = gw.workspace("free").await;
    let other = SqliteStore::open(&format!("sqlite://{}", gw.db.display()))
        .await
        .unwrap();
    other
        .update_workspace(
            id,
            &WorkspaceChange {
                status: Some(tiergate::model::WorkspaceStatus::Suspended),
                ..WorkspaceChange::default()
            },
            &Actor::cli(Some("carol")),
            gw.clock.now_secs(),
        )
        .await
        .unwrap();
    let log = audit(&gw, "?actor=cli:carol").await;
    assert_eq!(log["data"][0]["action"], "workspace.update");
    assert_eq!(log["data"][0]["after"]["status"], "suspended");
}
