//! The gateway on Postgres, end to end: moving an embedded installation there with
//! `tiergate migrate` (through the real binary), and serving while Postgres is down.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::clock::{Clock, ManualClock};
use tiergate::limiter::core::day_of;
use tiergate::limiter::MonthKey;
use tiergate::model::{default_tiers, Actor, AuditEntry, Limits, Tier};
use tiergate::store::{AuditFilter, KeyDayRow, LedgerBatch, LedgerRow, WebhookEndpoint};

use support::postgres::{Gateway, Line, PgDatabase, Proxy};

fn migrate(from: &str, to: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["migrate", "--from", from, "--to", to])
        .env_remove("TIERGATE_CONFIG")
        .env_remove("TIERGATE_DATABASE")
        .output()
        .unwrap()
}

async fn created(gw: &Gateway, path: &str, body: Value) -> Value {
    let (s, v) = gw.admin(Method::POST, path, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{path}: {v}");
    v
}

/// A workspace named `name` on `tier-2`, and a key of it: (its id, the key).
async fn workspace_with_key(gw: &Gateway, name: &str) -> (i64, String) {
    let id = created(gw, "/workspaces", json!({"name": name, "tier": "tier-2"})).await["id"]
        .as_i64()
        .unwrap();
    let key = created(gw, &format!("/workspaces/{id}/keys"), json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    (id, key)
}

/// `GET /v1/usage` with `key`.
async fn usage_history(gw: &Gateway, key: &str) -> Value {
    let r = gw
        .client
        .get(format!("{}/v1/usage", gw.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// What a workspace's key shows on its limits page that must survive the move.
fn page(v: &Value) -> Value {
    json!({
        "tier": v["tier"],
        "limits": v["limits"],
        "overrides": v["overrides"],
        "tokens_this_month": v["usage"]["tokens_this_month"],
        "requests_this_month": v["usage"]["requests_this_month"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_installation_moves_to_postgres_whole() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("embedded.db").display());
    let clock = Arc::new(ManualClock::starting_now());

    // An embedded installation in use: a custom tier, workspaces on different tiers, an
    // override, an approved and a pending increase, keys (one revoked), usage this month.
    let gw = Gateway::start(&sqlite, clock.clone()).await;
    let gold = json!({"requests_per_second": 50, "tokens_per_minute": 900000, "tokens_per_month": 5000000});
    let (s, v) = gw.admin(Method::PUT, "/tiers/gold", Some(gold)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let a = created(&gw, "/workspaces", json!({"name": "acme", "tier": "free"})).await["id"]
        .as_i64()
        .unwrap();
    let b = created(&gw, "/workspaces", json!({"name": "bolt", "tier": "gold"})).await["id"]
        .as_i64()
        .unwrap();
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{a}"),
            Some(json!({"limits": {"tokens_per_minute": 123456}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let key_of = |v: Value| v["key"].as_str().unwrap().to_string();
    let made_a = created(&gw, &format!("/workspaces/{a}/keys"), json!({})).await;
    let ka = key_of(made_a.clone());
    // A key with limits of its own.
    let (s, v) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", made_a["id"]),
            Some(json!({"limits": {"tokens_per_minute": 100000}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let made_b = created(&gw, &format!("/workspaces/{b}/keys"), json!({})).await;
    let kb_id = made_b["id"].as_i64().unwrap();
    let kb = key_of(made_b);
    let revoked = created(
        &gw,
        &format!("/workspaces/{a}/keys"),
        json!({"name": "old"}),
    )
    .await;
    let (s, _) = gw
        .admin(Method::DELETE, &format!("/keys/{}", revoked["id"]), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let revoked = key_of(revoked);
    for _ in 0..2 {
        assert_eq!(gw.chat(&ka).await, StatusCode::OK);
        clock.advance(Duration::from_secs(2));
    }
    for _ in 0..3 {
        assert_eq!(gw.chat(&kb).await, StatusCode::OK);
    }
    let ask =
        |tpm: u64| json!({"use_case": "launch", "requested_limits": {"tokens_per_month": tpm}});
    let r = gw
        .client
        .post(format!("{}/v1/limit-requests", gw.url))
        .bearer_auth(&ka)
        .json(&ask(2_000_000_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let request: Value = r.json().await.unwrap();
    let (s, v) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{}/approve", request["id"]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = gw
        .client
        .post(format!("{}/v1/limit-requests", gw.url))
        .bearer_auth(&kb)
        .json(&ask(9_000_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // The admin view writes the ledger out first; the pages read after it are exact.
    for ws in [a, b] {
        let (s, v) = gw
            .admin(Method::GET, &format!("/workspaces/{ws}/usage"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (_, before_a) = gw.limits(&ka).await;
    let (_, before_b) = gw.limits(&kb).await;
    let history_a = usage_history(&gw, &ka).await;
    assert_eq!(history_a["keys"][0]["requests"], 2, "{history_a}");
    assert!(before_a["usage"]["tokens_this_month"].as_u64().unwrap() > 0);
    gw.stop().await;

    // A settlement counted by a shared month counter, as the limiter records them.
    let month = MonthKey::of(clock.now());
    {
        let store = tiergate::store::open(&sqlite).await.unwrap();
        store
            .record_usage(
                &LedgerBatch {
                    id: "by-hand-1".into(),
                    rows: vec![LedgerRow {
                        workspace: b,
                        day: day_of(clock.now()),
                        model: "mistral-small-latest".into(),
                        counter: Some("gen-7".into()),
                        requests: 1,
                        tokens: 11,
                        denied: 0,
                        shadow_denied: 0,
                        shadow_denied_tokens: 0,
                        shadow_counter: None,
                    }],
                    hours: vec![],
                    keys: vec![KeyDayRow {
                        workspace: b,
                        day: day_of(clock.now()),
                        key: kb_id,
                        counter: Some("gen-7".into()),
                        requests: 1,
                        tokens: 11,
                        denied: 0,
                    }],
                },
                clock.now_secs(),
            )
            .await
            .unwrap();
    }

    // A webhook endpoint and an event still to deliver.
    let webhook = {
        let store = tiergate::store::open(&sqlite).await.unwrap();
        let endpoint = store
            .create_webhook(
                &tiergate::store::NewWebhook {
                    workspace: Some(b),
                    url: "http://127.0.0.1:9/hook".into(),
                    events: vec!["quota.threshold".into()],
                    secret: "whsec_c2VjcmV0".into(),
                },
                10,
                &Actor::cli(None),
                clock.now_secs(),
            )
            .await
            .unwrap();
        let event = tiergate::store::WebhookEvent::new(
            "quota.threshold",
            b,
            clock.now_secs(),
            json!({}),
            Some("quota:moved".into()),
        );
        assert!(store.enqueue_event(&event, clock.now_secs()).await.unwrap());
        endpoint
    };

    // The console's signing secret the source made (the gateway above asked for it at start).
    let source_secret = tiergate::store::open(&sqlite)
        .await
        .unwrap()
        .console_secret(&[1; 32])
        .await
        .unwrap();
    assert_ne!(source_secret, vec![1; 32], "the source had one already");

    // The target had a `serve` started on it once, with a tier of its own in its configuration:
    // seeded tiers only, replaced by the source's, and a secret of its own, replaced too.
    {
        let target = tiergate::store::open(&db.url).await.unwrap();
        let stale = Tier {
            name: "stale".into(),
            rank: None,
            promotion: None,
            limits: Limits::default(),
            enforcement: Default::default(),
            shadow: Vec::new(),
        };
        let mut seeded = default_tiers();
        seeded.push(stale);
        target.seed_tiers(&seeded).await.unwrap();
        assert_eq!(target.console_secret(&[2; 32]).await.unwrap(), vec![2; 32]);
    }
    let out = migrate(&sqlite, &db.url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Sessions signed by the source hold on the target.
    let target_secret = tiergate::store::open(&db.url)
        .await
        .unwrap()
        .console_secret(&[3; 32])
        .await
        .unwrap();
    assert_eq!(target_secret, source_secret);
    for copied in [
        "tiers: 7,",
        "workspaces: 2,",
        "keys: 3 (revoked: 1),",
        "limit requests: 2\n",
        "rows by counter: 1,",
        "(by counter: 1)",
        "events: 0\n",
        "webhooks: endpoints: 1, events: 4, deliveries: 1\n",
        "audit entries: 13; console secret: copied;",
    ] {
        assert!(stdout.contains(copied), "{copied}: {stdout}");
    }

    // The same gateway, now on Postgres.
    let gw = Gateway::start(&db.url, clock.clone()).await;
    let (s, after_a) = gw.limits(&ka).await;
    assert_eq!(s, StatusCode::OK, "{after_a}");
    assert_eq!(page(&after_a), page(&before_a));
    assert_eq!(after_a["limits"]["tokens_per_minute"], 123456);
    assert_eq!(after_a["overrides"]["tokens_per_month"], 2_000_000_000u64);
    // Usage over time and per key came along.
    assert_eq!(usage_history(&gw, &ka).await, history_a);
    let (_, after_b) = gw.limits(&kb).await;
    let mut expected_b = page(&before_b);
    expected_b["tokens_this_month"] =
        json!(before_b["usage"]["tokens_this_month"].as_u64().unwrap() + 11);
    expected_b["requests_this_month"] =
        json!(before_b["usage"]["requests_this_month"].as_u64().unwrap() + 1);
    assert_eq!(page(&after_b), expected_b);
    assert_eq!(after_b["limits"]["requests_per_second"], 50.0);
    assert_eq!(gw.chat(&kb).await, StatusCode::OK);
    assert_eq!(gw.chat(&revoked).await, StatusCode::UNAUTHORIZED);

    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let mut names: Vec<&str> = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["free", "gold", "scale", "tier-1", "tier-2", "tier-3", "tier-4"]
    );
    let (_, requests) = gw.admin(Method::GET, "/limit-requests", None).await;
    let statuses: Vec<&str> = requests["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["approved", "pending"]);
    let (_, keys) = gw
        .admin(Method::GET, &format!("/workspaces/{a}/keys"), None)
        .await;
    let keys = keys["data"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0]["last_used_at"].is_string(), "{keys:?}");
    assert_eq!(keys[0]["limits"], json!({"tokens_per_minute": 100000}));
    assert_eq!(keys[1]["limits"], json!({}));
    // The key's month total, and what the counter generation counted for it, came along.
    let totals = tiergate::store::open(&db.url)
        .await
        .unwrap()
        .month_totals(b, month, Some("gen-7"))
        .await
        .unwrap();
    let all = tiergate::store::open(&db.url)
        .await
        .unwrap()
        .month_totals(b, month, None)
        .await
        .unwrap();
    assert_eq!(
        all.by_key[&kb_id] - totals.by_key.get(&kb_id).copied().unwrap_or(0),
        11
    );
    assert!(keys[1]["revoked_at"].is_string(), "{keys:?}");

    // New ids continue after the copied ones.
    let c = created(&gw, "/workspaces", json!({"name": "new", "tier": "tier-1"})).await;
    assert_eq!(c["id"].as_i64().unwrap(), b + 1);
    let kc = key_of(created(&gw, &format!("/workspaces/{}/keys", c["id"]), json!({})).await);
    assert_eq!(gw.chat(&kc).await, StatusCode::OK);

    // The audit log came along, and goes on after it.
    let (_, log) = gw.admin(Method::GET, "/audit?limit=1000", None).await;
    let log = log["data"].as_array().unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.len(), 15, "{actions:?}");
    assert_eq!(
        &actions[..3],
        ["key.create", "workspace.create", "webhook.create"]
    );
    assert!(actions.contains(&"key.limits"), "{actions:?}");
    assert_eq!(actions[14], "tier.put");
    assert_eq!(log[14]["target"], "tier:gold");
    assert!(log
        .windows(2)
        .all(|w| w[0]["id"].as_i64() > w[1]["id"].as_i64()));

    // The webhook endpoint and its pending delivery came along; their ids go on.
    let store = tiergate::store::open(&db.url).await.unwrap();
    assert_eq!(
        store.list_webhooks(Some(b)).await.unwrap(),
        vec![webhook.clone()]
    );
    let pending = store.webhook_deliveries(webhook.id, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].status, "pending");
    let again = tiergate::store::WebhookEvent::new(
        "quota.threshold",
        b,
        0,
        json!({}),
        Some("quota:moved".into()),
    );
    assert!(
        !store.enqueue_event(&again, 0).await.unwrap(),
        "its dedupe key came along"
    );
    let next = store
        .create_webhook(
            &tiergate::store::NewWebhook {
                workspace: None,
                url: "http://127.0.0.1:9/other".into(),
                events: vec!["workspace.suspended".into()],
                secret: "whsec_c2VjcmV0".into(),
            },
            10,
            &Actor::cli(None),
            0,
        )
        .await
        .unwrap();
    assert_eq!(next.id, webhook.id + 1);

    // The counter tag came along.
    let store = tiergate::store::open(&db.url).await.unwrap();
    let counted = store.month_totals(b, month, None).await.unwrap();
    let uncounted = store.month_totals(b, month, Some("gen-7")).await.unwrap();
    assert_eq!(counted.tokens - uncounted.tokens, 11);
    gw.stop().await;

    // Into a target in use: refused, and nothing changed.
    let version = store.catalog_version().await.unwrap();
    let workspaces = store.list_workspaces().await.unwrap();
    let totals = store.month_totals(b, month, None).await.unwrap();
    let out = migrate(&sqlite, &db.url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not empty") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(store.catalog_version().await.unwrap(), version);
    assert_eq!(store.list_workspaces().await.unwrap(), workspaces);
    assert_eq!(store.month_totals(b, month, None).await.unwrap(), totals);

    // The URLs are checked, each naming its flag.
    let out = migrate(&db.url, &sqlite);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("from:"),
        "{stderr}"
    );
    let out = migrate(
        &format!("sqlite://{}/missing.db", dir.path().display()),
        &db.url,
    );
    assert!(!out.status.success());
}

/// What a target holds, as far as a refused migration must leave it.
/// Ids continue after the highest the source ever gave, not after the highest it still holds: an
/// endpoint deleted before the copy keeps its id in the audit log, and a new one took it (an
/// outside audit: `webhook:1` named two endpoints).
#[tokio::test]
async fn ids_deleted_before_a_migration_are_not_given_again() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("embedded.db").display());
    let endpoint = |url: &str| tiergate::store::NewWebhook {
        workspace: None,
        url: url.into(),
        events: vec!["workspace.suspended".into()],
        secret: "whsec_c2VjcmV0".into(),
    };
    let (kept, deleted) = {
        let store = tiergate::store::open(&sqlite).await.unwrap();
        let kept = store
            .create_webhook(
                &endpoint("http://127.0.0.1:9/kept"),
                10,
                &Actor::cli(None),
                0,
            )
            .await
            .unwrap();
        let gone = store
            .create_webhook(
                &endpoint("http://127.0.0.1:9/gone"),
                10,
                &Actor::cli(None),
                0,
            )
            .await
            .unwrap();
        store
            .delete_webhook(gone.id, None, &Actor::cli(None), 0)
            .await
            .unwrap();
        (kept.id, gone.id)
    };
    assert!(deleted > kept);
    let out = migrate(&sqlite, &db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = tiergate::store::open(&db.url).await.unwrap();
    let next = store
        .create_webhook(
            &endpoint("http://127.0.0.1:9/next"),
            10,
            &Actor::cli(None),
            0,
        )
        .await
        .unwrap();
    assert_eq!(next.id, deleted + 1);
}

async fn holdings(url: &str) -> (Vec<String>, Vec<AuditEntry>, Vec<WebhookEndpoint>, Vec<u8>) {
    let store = tiergate::store::open(url).await.unwrap();
    let mut tiers: Vec<String> = store
        .list_tiers()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    tiers.sort();
    let audit = store
        .audit_log(&AuditFilter {
            limit: 1000,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let webhooks = store.list_webhooks(None).await.unwrap();
    let secret = store.console_secret(&[9; 32]).await.unwrap();
    (tiers, audit, webhooks, secret)
}

/// A target that a `serve` has been used on (an operator's webhook endpoint, a tier changed,
/// an event in the webhooks' outbox) is refused as not empty, naming what it holds, and keeps
/// all of it, its audit log above all. It used to fail on a duplicate key with a raw database
/// error for the endpoint, and to delete the audit entry of the tier change (an outside audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_webhooks_or_audit_entries_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("embedded.db").display());
    let clock = Arc::new(ManualClock::starting_now());
    // A source with a webhook endpoint of its own (id 1, as the target's), and audit entries.
    {
        let gw = Gateway::start(&sqlite, clock.clone()).await;
        created(
            &gw,
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/source", "events": ["quota.threshold"]}),
        )
        .await;
        gw.stop().await;
    }

    // An operator's endpoint, made on a `serve` over the target.
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let gw = Gateway::start(&db.url, clock.clone()).await;
    created(
        &gw,
        "/webhooks",
        json!({"url": "http://127.0.0.1:9/target", "events": ["quota.threshold"]}),
    )
    .await;
    gw.stop().await;
    // A tier changed on a `serve` over another target: its audit entry is all it holds
    // beyond what a `serve` makes.
    let Some(tier_db) = PgDatabase::create().await else {
        return;
    };
    let gw = Gateway::start(&tier_db.url, clock.clone()).await;
    let (s, v) = gw
        .admin(
            Method::PUT,
            "/tiers/gold",
            Some(json!({"requests_per_second": 50})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    gw.stop().await;
    // An event in the outbox of a third, and nothing else.
    let Some(event_db) = PgDatabase::create().await else {
        return;
    };
    {
        let target = tiergate::store::open(&event_db.url).await.unwrap();
        target.seed_tiers(&default_tiers()).await.unwrap();
        let event = tiergate::store::WebhookEvent::new("quota.threshold", 1, 0, json!({}), None);
        assert!(target.enqueue_event(&event, 0).await.unwrap());
    }

    for (target, held) in [
        (
            &db,
            "audit entries: 1, webhook endpoints: 1, webhook events: 0",
        ),
        (
            &tier_db,
            "ledger rows: 0, audit entries: 1, webhook endpoints: 0",
        ),
        (
            &event_db,
            "audit entries: 0, webhook endpoints: 0, webhook events: 1",
        ),
    ] {
        let before = holdings(&target.url).await;
        let out = migrate(&sqlite, &target.url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("is not empty")
                && stderr.contains(held)
                && stderr.contains("nothing was changed"),
            "{held}: {stderr}"
        );
        assert!(!stderr.contains("database error"), "{stderr}");
        assert_eq!(holdings(&target.url).await, before, "{held}");
    }
    let (tiers, audit, webhooks, _) = holdings(&db.url).await;
    assert!(tiers.contains(&"free".to_string()), "{tiers:?}");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "webhook.create");
    assert_eq!(webhooks.len(), 1);
    assert_eq!(webhooks[0].url, "http://127.0.0.1:9/target");
    let (tiers, audit, _, _) = holdings(&tier_db.url).await;
    assert!(tiers.contains(&"gold".to_string()), "{tiers:?}");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].target, "tier:gold");
}

/// A stop while Postgres does not answer at all (every packet dropped: each store call waits
/// for its timeout) ends within the last write's patience (3 s), a ledger write already under
/// way included, and says what is lost. It used to take 8 to 10 s: the patience bounded only
/// when an attempt could start, and the write under way went on to its own timeout first (an
/// outside audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_postgres_silent_ends_within_the_last_write_patience() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let clock = Arc::new(ManualClock::starting_now());
    let gw = Gateway::start(&db.url_via(&proxy), clock.clone()).await;
    let (id, key) = workspace_with_key(&gw, "acme").await;
    assert_eq!(gw.chat(&key).await, StatusCode::OK);
    // The admin view writes the ledger out first: only what follows is left to write.
    let (s, v) = gw
        .admin(Method::GET, &format!("/workspaces/{id}/usage"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    proxy.set(Line::Silent);
    assert_eq!(gw.chat(&key).await, StatusCode::OK);
    // The ledger's next timed write (every 250 ms) starts and waits on the silent line.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = Instant::now();
    let stopped = gw.stopped().await;
    let took = started.elapsed();
    assert!(
        matches!(
            stopped,
            Err(tiergate::AppError::UsageLost { requests: 1, .. })
        ),
        "{stopped:?}"
    );
    // 3 s and a coarse margin for a busy machine.
    assert!(took < Duration::from_secs(6), "the stop took {took:?}");
}

/// A change whose `COMMIT` reached Postgres but whose answer never came back is answered as one
/// that may have been saved, not as "nothing was changed" (an outside audit: a workspace
/// created, a key made, a request approved, each so answered and each saved), and not to be
/// retried as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_commit_went_unanswered_may_have_been_saved() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let clock = Arc::new(ManualClock::starting_now());
    let gw = Gateway::start(&db.url_via(&proxy), clock.clone()).await;
    workspace_with_key(&gw, "first").await;

    proxy.set(Line::DeafAtCommitAfter("ghost-ws"));
    let started = Instant::now();
    let r = gw
        .client
        .post(format!("{}/admin/v1/workspaces", gw.url))
        .bearer_auth(support::postgres::ADMIN)
        .json(&json!({"name": "ghost-ws"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        r.headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap()),
        Some("false")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "database_unreachable", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("may or may not have been saved"),
        "{message}"
    );
    assert!(!message.contains("nothing was changed"), "{message}");

    // It was saved.
    proxy.set(Line::Up);
    let (s, listed) = gw.admin(Method::GET, "/workspaces", None).await;
    assert_eq!(s, StatusCode::OK, "{listed}");
    let ghosts = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == "ghost-ws")
        .count();
    assert_eq!(ghosts, 1, "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_requests_are_served_and_the_admin_api_says_so() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let clock = Arc::new(ManualClock::starting_now());
    let gw = Gateway::start(&db.url_via(&proxy), clock.clone()).await;
    let (id, key) = workspace_with_key(&gw, "acme").await;
    assert_eq!(gw.chat(&key).await, StatusCode::OK);
    // A workspace with a key, known to the catalogue, that this instance has not served yet.
    let (_, unserved) = workspace_with_key(&gw, "bolt").await;

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
    let said = ready.text().await.unwrap();
    assert_eq!(said, "not ready: the database cannot be reached");
    // The workspace's usage over time is read from the store: it says so too.
    let r = gw
        .client
        .get(format!("{}/v1/usage", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "database_unreachable", "{body}");
    // The hot path serves from memory.
    for _ in 0..3 {
        assert_eq!(gw.chat(&key).await, StatusCode::OK);
    }
    // Not for a workspace whose month's usage this instance has yet to read from the ledger
    // (README, "On Postgres"): 503, quickly, nothing sent.
    let started = Instant::now();
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&unserved)
        .json(&json!({"model": "mistral-small-latest", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "service_unavailable", "{body}");

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
