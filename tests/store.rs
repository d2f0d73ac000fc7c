//! The store, on both backends: one table of cases run against a real SQLite file and against the
//! real Postgres (a fresh database per test), then what only Postgres has to survive: many
//! writers at once, and the database going away.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tiergate::app::LedgerMonths;
use tiergate::catalog::{generate_key, AuthFailure, Catalog};
use tiergate::clock::{Clock, SystemClock};
use tiergate::limiter::local::LocalLimiter;
use tiergate::limiter::MonthKey;
use tiergate::metrics::Metrics;
use tiergate::model::{
    Actor, AuditAction, FieldPatch, LimitRequestStatus, Limits, Overrides, OverridesPatch, Tier,
    WorkspaceStatus,
};
use tiergate::store::{
    AuditFilter, CatalogChanges, CatalogDelta, NewKey, Store, StoreError, UsageRecord,
    WorkspaceChange, CHANGE_LOG_KEEP, PRUNE_BATCH,
};
use tiergate::usage::Recorder;

use support::postgres::{Line, PgDatabase, Proxy};

/// A store under test, and what keeps its database alive.
struct Backend {
    store: Arc<dyn Store>,
    url: String,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDatabase>,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        Backend {
            store: tiergate::store::open(&url).await.unwrap(),
            url,
            _dir: Some(dir),
            _db: None,
        }
    }

    async fn postgres() -> Option<Backend> {
        let db = PgDatabase::create().await?;
        Some(Backend {
            store: tiergate::store::open(&db.url).await.unwrap(),
            url: db.url.clone(),
            _dir: None,
            _db: Some(db),
        })
    }

    /// Another store on the same database, with its own connections: another process.
    async fn another(&self) -> Arc<dyn Store> {
        tiergate::store::open(&self.url).await.unwrap()
    }
}

/// Runs each case once on SQLite (`sqlite::case`) and once on Postgres (`postgres::case`).
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(backend) = super::Backend::postgres().await {
                        super::$case(backend).await
                    }
                }
            )*
        }
    };
}

on_both_backends!(
    catalogue_changes_bump_the_version,
    the_change_log_gives_what_changed_since_a_version,
    a_catalogue_applies_changes_made_by_another_process,
    keys_are_created_found_touched_and_revoked,
    limit_requests_are_decided_once,
    settling_the_same_request_twice_never_counts_twice,
    month_totals_can_leave_out_a_counter,
    daily_usage_lists_the_days_asked_for,
    pruning_in_batches_keeps_the_totals,
    an_overrides_patch_sets_clears_and_keeps,
    an_approval_racing_an_overrides_change_keeps_both,
    overlapping_batches_from_many_writers_count_each_request_once,
    every_admin_change_writes_its_audit_entry_and_a_refused_one_none,
    the_audit_log_is_filtered_and_paged_newest_first,
);

fn tier(name: &str, rps: f64) -> Tier {
    Tier {
        name: name.into(),
        limits: Limits {
            requests_per_second: Some(rps),
            tokens_per_minute: Some(1000),
            ..Limits::default()
        },
    }
}

fn new_key(workspace: i64) -> (String, NewKey) {
    let secret = generate_key();
    let key = NewKey {
        workspace,
        name: Some("k".into()),
        prefix: secret.prefix.clone(),
        hash: secret.hash,
        expires_at: None,
    };
    (secret.secret, key)
}

fn settled(id: &str, workspace: i64, day: &str, model: &str, tokens: u64, at: i64) -> UsageRecord {
    UsageRecord::Settled {
        request_id: id.into(),
        workspace,
        day: day.into(),
        model: model.into(),
        tokens,
        at,
        counter: None,
    }
}

fn counted(id: &str, day: &str, model: &str, tokens: u64, counter: &str) -> UsageRecord {
    UsageRecord::Settled {
        request_id: id.into(),
        workspace: 1,
        day: day.into(),
        model: model.into(),
        tokens,
        at: 1000,
        counter: Some(counter.into()),
    }
}

fn denied(workspace: i64, day: &str, model: &str) -> UsageRecord {
    UsageRecord::Denied {
        workspace,
        day: day.into(),
        model: model.into(),
        count: 1,
    }
}

/// Who the store's tests make changes as.
fn by() -> Actor {
    Actor::admin("test")
}

/// November 2026.
const NOV: MonthKey = MonthKey(2026 * 12 + 10);

fn patch_rps(rps: f64) -> WorkspaceChange {
    WorkspaceChange {
        overrides: OverridesPatch {
            requests_per_second: FieldPatch::Set(rps),
            ..OverridesPatch::default()
        },
        ..WorkspaceChange::default()
    }
}

async fn catalogue_changes_bump_the_version(b: Backend) {
    let s = &b.store;
    let v0 = s.catalog_version().await.unwrap();
    assert_eq!(
        s.seed_tiers(&[tier("a", 1.0), tier("b", 2.0)])
            .await
            .unwrap(),
        2
    );
    let v1 = s.catalog_version().await.unwrap();
    assert!(v1 > v0);
    // Seeding what exists changes nothing.
    assert_eq!(s.seed_tiers(&[tier("a", 9.0)]).await.unwrap(), 0);
    assert_eq!(s.catalog_version().await.unwrap(), v1);
    s.put_tier(&tier("a", 3.0), &by(), 0).await.unwrap();
    let v2 = s.catalog_version().await.unwrap();
    assert!(v2 > v1);
    let tiers = s.list_tiers().await.unwrap();
    assert_eq!(tiers, vec![tier("a", 3.0), tier("b", 2.0)]);

    let e = s
        .create_workspace("x", "nope", &by(), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("nope")),
        "{e}"
    );
    assert_eq!(
        s.catalog_version().await.unwrap(),
        v2,
        "a refused change bumps nothing"
    );
    let ws = s.create_workspace("acme", "a", &by(), 10).await.unwrap();
    assert_eq!((ws.name.as_str(), ws.tier.as_str()), ("acme", "a"));
    assert_eq!(ws.status, WorkspaceStatus::Active);
    let v3 = s.catalog_version().await.unwrap();
    assert!(v3 > v2);
    let other = s.create_workspace("other", "b", &by(), 11).await.unwrap();
    assert!(other.id > ws.id);
    assert_eq!(s.get_workspace(ws.id).await.unwrap(), ws);
    assert!(matches!(
        s.get_workspace(other.id + 100).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.list_workspaces().await.unwrap(), vec![ws.clone(), other]);

    let changed = s
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                tier: Some("b".into()),
                status: Some(WorkspaceStatus::Suspended),
                ..WorkspaceChange::default()
            },
            &by(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(changed.tier, "b");
    assert_eq!(changed.status, WorkspaceStatus::Suspended);
    assert!(s.catalog_version().await.unwrap() > v3);

    let (_, key) = new_key(ws.id);
    let key = s.create_key(&key, &by(), 20).await.unwrap();
    let (_, revoked) = new_key(ws.id);
    let revoked = s.create_key(&revoked, &by(), 20).await.unwrap();
    s.revoke_key(revoked.id, &by(), 30).await.unwrap();
    let data = s.load_catalog().await.unwrap();
    assert_eq!(data.version, s.catalog_version().await.unwrap());
    assert_eq!(data.tiers.len(), 2);
    assert_eq!(data.workspaces.len(), 2);
    assert_eq!(data.keys, vec![key], "revoked keys are not loaded");
}

async fn the_change_log_gives_what_changed_since_a_version(b: Backend) {
    let s = &b.store;
    s.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let ws = s.create_workspace("acme", "a", &by(), 10).await.unwrap();
    let v0 = s.catalog_version().await.unwrap();
    assert_eq!(
        s.catalog_changes(v0).await.unwrap(),
        CatalogChanges::Since(CatalogDelta {
            version: v0,
            ..CatalogDelta::default()
        }),
        "nothing changed"
    );

    s.put_tier(&tier("a", 4.0), &by(), 0).await.unwrap();
    let ws = s
        .update_workspace(ws.id, &patch_rps(7.0), &by(), 0)
        .await
        .unwrap();
    let (_, key) = new_key(ws.id);
    let key = s.create_key(&key, &by(), 20).await.unwrap();
    // Changed twice: listed once, as it is now.
    s.put_tier(&tier("a", 5.0), &by(), 0).await.unwrap();
    let untouched = s
        .create_workspace("untouched", "a", &by(), 10)
        .await
        .unwrap();
    let v1 = s.catalog_version().await.unwrap();
    let CatalogChanges::Since(delta) = s.catalog_changes(v0).await.unwrap() else {
        panic!("the log reaches back to {v0}")
    };
    assert_eq!(delta.version, v1);
    assert_eq!(delta.tiers, vec![tier("a", 5.0)]);
    assert_eq!(delta.workspaces, vec![ws.clone(), untouched.clone()]);
    assert_eq!(delta.keys, vec![key.clone()]);

    // A revoked key is listed, so that a copy drops it.
    let revoked = s.revoke_key(key.id, &by(), 30).await.unwrap();
    let CatalogChanges::Since(delta) = s.catalog_changes(v1).await.unwrap() else {
        panic!("the log reaches back to {v1}")
    };
    assert_eq!(delta.keys, vec![revoked]);
    assert!(delta.tiers.is_empty() && delta.workspaces.is_empty());

    // A version from before the log, or from another database, means: reload everything.
    assert_eq!(s.catalog_changes(0).await.unwrap(), CatalogChanges::TooOld);
    let now = s.catalog_version().await.unwrap();
    assert_eq!(
        s.catalog_changes(now + 5).await.unwrap(),
        CatalogChanges::TooOld
    );
    // So does a version bumped without its change logged (as a binary from before the log does).
    bump_version_as_an_older_binary(&b.url).await;
    assert_eq!(
        s.catalog_changes(now).await.unwrap(),
        CatalogChanges::TooOld
    );
    assert_eq!(s.catalog_changes(v0).await.unwrap(), CatalogChanges::TooOld);
}

async fn bump_version_as_an_older_binary(url: &str) {
    use sqlx::Connection;
    const BUMP: &str = "UPDATE meta SET value = value + 1 WHERE key = 'catalog_version'";
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(BUMP).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(BUMP).execute(&mut c).await.unwrap();
    }
}

async fn a_catalogue_applies_changes_made_by_another_process(b: Backend) {
    let s = &b.store;
    s.seed_tiers(&[tier("a", 1.0), tier("b", 2.0)])
        .await
        .unwrap();
    let ws = s.create_workspace("acme", "a", &by(), 10).await.unwrap();
    let on_b = s.create_workspace("on-b", "b", &by(), 10).await.unwrap();
    let (secret, key) = new_key(ws.id);
    s.create_key(&key, &by(), 10).await.unwrap();
    let catalog = Catalog::load(s.clone()).await.unwrap();
    let rps = |id| catalog.limits_of(id).unwrap().requests_per_second;
    assert_eq!(rps(ws.id), Some(1.0));
    assert!(!catalog.refresh().await.unwrap(), "nothing to apply");

    let elsewhere = b.another().await;
    // A tier change: every workspace on it, and only those.
    elsewhere.put_tier(&tier("a", 6.0), &by(), 0).await.unwrap();
    assert!(catalog.refresh().await.unwrap());
    assert_eq!(rps(ws.id), Some(6.0));
    assert_eq!(rps(on_b.id), Some(2.0));
    // An override, then a move to another tier.
    elsewhere
        .update_workspace(ws.id, &patch_rps(40.0), &by(), 0)
        .await
        .unwrap();
    catalog.refresh().await.unwrap();
    assert_eq!(rps(ws.id), Some(40.0));
    elsewhere
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                tier: Some("b".into()),
                overrides: OverridesPatch::replacing(&Overrides::default()),
                ..WorkspaceChange::default()
            },
            &by(),
            0,
        )
        .await
        .unwrap();
    elsewhere.put_tier(&tier("b", 3.0), &by(), 0).await.unwrap();
    catalog.refresh().await.unwrap();
    assert_eq!(rps(ws.id), Some(3.0));
    assert_eq!(rps(on_b.id), Some(3.0));

    // A new key works, a revoked one does not, a suspension holds.
    let (new_secret, new) = new_key(ws.id);
    let new = elsewhere.create_key(&new, &by(), 10).await.unwrap();
    catalog.refresh().await.unwrap();
    assert!(catalog.authenticate(&new_secret, 10).await.is_ok());
    elsewhere.revoke_key(new.id, &by(), 20).await.unwrap();
    catalog.refresh().await.unwrap();
    assert_eq!(
        catalog.authenticate(&new_secret, 20).await.unwrap_err(),
        AuthFailure::UnknownKey
    );
    elsewhere
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                status: Some(WorkspaceStatus::Suspended),
                ..WorkspaceChange::default()
            },
            &by(),
            0,
        )
        .await
        .unwrap();
    catalog.refresh().await.unwrap();
    assert_eq!(
        catalog.authenticate(&secret, 20).await.unwrap_err(),
        AuthFailure::Suspended
    );
    assert_eq!(catalog.version(), s.catalog_version().await.unwrap());

    // Further behind than the log keeps: everything is reloaded, and still right.
    let behind = catalog.version();
    for i in 0..=CHANGE_LOG_KEEP {
        elsewhere
            .put_tier(&tier("churn", i as f64 + 1.0), &by(), 0)
            .await
            .unwrap();
    }
    elsewhere
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                status: Some(WorkspaceStatus::Active),
                ..patch_rps(11.0)
            },
            &by(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        s.catalog_changes(behind).await.unwrap(),
        CatalogChanges::TooOld
    );
    assert!(catalog.refresh().await.unwrap());
    assert_eq!(rps(ws.id), Some(11.0));
    assert!(catalog.authenticate(&secret, 30).await.is_ok());
    assert_eq!(catalog.version(), s.catalog_version().await.unwrap());
}

async fn keys_are_created_found_touched_and_revoked(b: Backend) {
    let s = &b.store;
    s.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let ws = s.create_workspace("acme", "a", &by(), 10).await.unwrap();
    let (_, missing) = new_key(ws.id + 100);
    assert!(matches!(
        s.create_key(&missing, &by(), 10).await,
        Err(StoreError::NotFound)
    ));
    let (_, k1) = new_key(ws.id);
    let (_, mut k2) = new_key(ws.id);
    k2.expires_at = Some(5000);
    let k1 = s.create_key(&k1, &by(), 10).await.unwrap();
    let k2 = s.create_key(&k2, &by(), 11).await.unwrap();
    assert_eq!(k2.expires_at, Some(5000));
    assert_eq!(s.find_key(&k1.hash).await.unwrap(), Some(k1.clone()));
    assert_eq!(s.find_key(&[7; 32]).await.unwrap(), None);
    assert_eq!(
        s.list_keys(ws.id).await.unwrap(),
        vec![k1.clone(), k2.clone()]
    );

    // Last use only moves forward, whatever order the uses come in.
    s.touch_keys(&[(k2.id, 300), (k1.id, 100), (k1.id, 200)])
        .await
        .unwrap();
    s.touch_keys(&[(k1.id, 150)]).await.unwrap();
    let keys = s.list_keys(ws.id).await.unwrap();
    assert_eq!(keys[0].last_used_at, Some(200));
    assert_eq!(keys[1].last_used_at, Some(300));

    let v = s.catalog_version().await.unwrap();
    let revoked = s.revoke_key(k1.id, &by(), 400).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(400));
    assert!(s.catalog_version().await.unwrap() > v);
    // Revoking again keeps the first time.
    assert_eq!(
        s.revoke_key(k1.id, &by(), 500).await.unwrap().revoked_at,
        Some(400)
    );
    assert_eq!(
        s.find_key(&k1.hash).await.unwrap().unwrap().revoked_at,
        Some(400)
    );
    assert!(matches!(
        s.revoke_key(k2.id + 100, &by(), 500).await,
        Err(StoreError::NotFound)
    ));
}

async fn limit_requests_are_decided_once(b: Backend) {
    let s = &b.store;
    s.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let ws = s.create_workspace("acme", "a", &by(), 10).await.unwrap();
    let other = s.create_workspace("other", "a", &by(), 10).await.unwrap();
    s.update_workspace(ws.id, &patch_rps(3.0), &by(), 0)
        .await
        .unwrap();
    let ask = |tpm| Overrides {
        tokens_per_minute: Some(tpm),
        ..Overrides::default()
    };
    let r1 = s
        .create_limit_request(ws.id, "launch", &ask(5000), &by(), 100)
        .await
        .unwrap();
    assert_eq!(r1.status, LimitRequestStatus::Pending);
    assert_eq!(r1.requested_limits, ask(5000));
    let r2 = s
        .create_limit_request(ws.id, "more", &ask(9000), &by(), 101)
        .await
        .unwrap();
    let r3 = s
        .create_limit_request(other.id, "other", &ask(7000), &by(), 102)
        .await
        .unwrap();
    let listed = s.list_limit_requests(Some(ws.id), None).await.unwrap();
    assert_eq!(listed, vec![r1.clone(), r2.clone()]);
    assert_eq!(s.list_limit_requests(None, None).await.unwrap().len(), 3);

    // Approved as requested: merged into the overrides, the rest kept.
    let v = s.catalog_version().await.unwrap();
    let approved = s
        .approve_limit_request(r1.id, None, &by(), 200)
        .await
        .unwrap();
    assert_eq!(approved.status, LimitRequestStatus::Approved);
    assert_eq!(approved.granted_limits, Some(ask(5000)));
    assert_eq!(approved.decided_at, Some(200));
    assert!(s.catalog_version().await.unwrap() > v);
    let o = s.get_workspace(ws.id).await.unwrap().overrides;
    assert_eq!(
        (o.requests_per_second, o.tokens_per_minute),
        (Some(3.0), Some(5000))
    );

    // Approved with other limits than requested.
    let granted = Overrides {
        tokens_per_month: Some(1_000_000),
        ..Overrides::default()
    };
    let approved = s
        .approve_limit_request(r2.id, Some(&granted), &by(), 201)
        .await
        .unwrap();
    assert_eq!(approved.granted_limits, Some(granted));
    let o = s.get_workspace(ws.id).await.unwrap().overrides;
    assert_eq!(
        (o.tokens_per_minute, o.tokens_per_month),
        (Some(5000), Some(1_000_000))
    );

    let d = s
        .deny_limit_request(r3.id, "not now", &by(), 300)
        .await
        .unwrap();
    assert_eq!(d.status, LimitRequestStatus::Denied);
    assert_eq!(d.reason.as_deref(), Some("not now"));
    assert_eq!(
        s.get_workspace(other.id).await.unwrap().overrides,
        Overrides::default()
    );

    // Decided is decided.
    for e in [
        s.approve_limit_request(r3.id, None, &by(), 400)
            .await
            .unwrap_err(),
        s.deny_limit_request(r1.id, "late", &by(), 400)
            .await
            .unwrap_err(),
        s.approve_limit_request(r1.id, None, &by(), 400)
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(e, StoreError::Conflict(ref m) if m.contains("already")),
            "{e}"
        );
    }
    assert!(matches!(
        s.approve_limit_request(r3.id + 100, None, &by(), 400).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.deny_limit_request(r3.id + 100, "x", &by(), 400).await,
        Err(StoreError::NotFound)
    ));
    let pending = s
        .list_limit_requests(None, Some(LimitRequestStatus::Pending))
        .await
        .unwrap();
    assert!(pending.is_empty());
    let denied = s
        .list_limit_requests(None, Some(LimitRequestStatus::Denied))
        .await
        .unwrap();
    assert_eq!(denied, vec![d]);
}

async fn settling_the_same_request_twice_never_counts_twice(b: Backend) {
    let s = &b.store;
    let batch = vec![
        settled("r1", 1, "2026-11-03", "a", 10, 100),
        settled("r2", 1, "2026-11-03", "a", 5, 200),
        settled("r3", 1, "2026-11-30", "b", 7, 300),
        settled("r4", 1, "2026-12-01", "a", 1000, 400),
        // The same request twice in one batch counts once.
        settled("r2", 1, "2026-11-03", "a", 5, 200),
        denied(1, "2026-11-03", "a"),
    ];
    assert_eq!(s.record_usage(&batch).await.unwrap(), 4);
    // The same batch again (a retried write): nothing new; denials are counted as sent.
    assert_eq!(s.record_usage(&batch).await.unwrap(), 0);
    assert_eq!(s.record_usage(&[]).await.unwrap(), 0);
    let t = s.month_totals(1, NOV, None).await.unwrap();
    assert_eq!((t.tokens, t.requests), (22, 3));
    assert_eq!(t.month, Some(NOV));
    assert_eq!(t.by_model.get("a"), Some(&15));
    assert_eq!(t.by_model.get("b"), Some(&7));
    assert_eq!(
        s.month_totals(1, NOV.next(), None).await.unwrap().tokens,
        1000
    );
    assert_eq!(s.month_totals(2, NOV, None).await.unwrap().tokens, 0);
    let daily = s.daily_usage(1, "2026-11-03", "2026-11-03").await.unwrap();
    assert_eq!(daily.len(), 1);
    assert_eq!(
        (daily[0].requests, daily[0].tokens, daily[0].denied),
        (2, 15, 2)
    );
}

async fn month_totals_can_leave_out_a_counter(b: Backend) {
    let s = &b.store;
    s.record_usage(&[
        settled("plain", 1, "2026-11-02", "a", 100, 10),
        counted("g1-1", "2026-11-03", "a", 10, "g1"),
        counted("g1-2", "2026-11-04", "b", 20, "g1"),
        counted("g2-1", "2026-11-04", "b", 40, "g2"),
        // Another month, and another workspace, with the same tag: never subtracted here.
        counted("g1-dec", "2026-12-01", "a", 1000, "g1"),
        UsageRecord::Settled {
            request_id: "g1-ws2".into(),
            workspace: 2,
            day: "2026-11-04".into(),
            model: "a".into(),
            tokens: 3000,
            at: 10,
            counter: Some("g1".into()),
        },
    ])
    .await
    .unwrap();
    let all = s.month_totals(1, NOV, None).await.unwrap();
    assert_eq!((all.tokens, all.requests), (170, 4));
    let without_g1 = s.month_totals(1, NOV, Some("g1")).await.unwrap();
    assert_eq!((without_g1.tokens, without_g1.requests), (140, 2));
    assert_eq!(without_g1.by_model.get("a"), Some(&100));
    assert_eq!(without_g1.by_model.get("b"), Some(&40));
    let without_g2 = s.month_totals(1, NOV, Some("g2")).await.unwrap();
    assert_eq!((without_g2.tokens, without_g2.requests), (130, 3));
    assert_eq!(without_g2.by_model.get("b"), Some(&20));
    let unknown = s.month_totals(1, NOV, Some("nobody")).await.unwrap();
    assert_eq!((unknown.tokens, unknown.requests), (170, 4));
    let dec = s.month_totals(1, NOV.next(), Some("g1")).await.unwrap();
    assert_eq!((dec.tokens, dec.requests), (0, 0));
    let ws2 = s.month_totals(2, NOV, Some("g1")).await.unwrap();
    assert_eq!(ws2.tokens, 0);
}

async fn daily_usage_lists_the_days_asked_for(b: Backend) {
    let s = &b.store;
    s.record_usage(&[
        settled("a", 1, "2026-11-01", "m2", 1, 10),
        settled("b", 1, "2026-11-01", "m1", 2, 10),
        settled("c", 1, "2026-11-02", "m1", 4, 10),
        settled("d", 1, "2026-11-03", "m1", 8, 10),
        settled("e", 2, "2026-11-02", "m1", 16, 10),
        denied(1, "2026-11-02", "m1"),
        denied(1, "2026-11-02", "m3"),
    ])
    .await
    .unwrap();
    let rows = s.daily_usage(1, "2026-11-01", "2026-11-02").await.unwrap();
    let got: Vec<(&str, &str, u64, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.day.as_str(),
                r.model.as_str(),
                r.requests,
                r.tokens,
                r.denied,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("2026-11-01", "m1", 1, 2, 0),
            ("2026-11-01", "m2", 1, 1, 0),
            ("2026-11-02", "m1", 1, 4, 1),
            ("2026-11-02", "m3", 0, 0, 1),
        ]
    );
    assert!(s
        .daily_usage(1, "2026-11-04", "2026-11-30")
        .await
        .unwrap()
        .is_empty());
}

async fn pruning_in_batches_keeps_the_totals(b: Backend) {
    let s = &b.store;
    // More than two batches of old events, and a few recent ones.
    let old = 2 * PRUNE_BATCH as usize + 123;
    let records: Vec<UsageRecord> = (0..old)
        .map(|i| {
            settled(
                &format!("old-{i:06}"),
                1,
                "2026-11-05",
                "a",
                2,
                100 + (i % 50) as i64,
            )
        })
        .chain((0..10).map(|i| settled(&format!("new-{i}"), 1, "2026-11-20", "a", 5, 10_000)))
        .collect();
    for chunk in records.chunks(4096) {
        s.record_usage(chunk).await.unwrap();
    }
    let before = s.month_totals(1, NOV, None).await.unwrap();
    assert_eq!(
        (before.tokens, before.requests),
        (2 * old as u64 + 50, old as u64 + 10)
    );

    assert_eq!(s.prune_events(5_000).await.unwrap(), old as u64);
    assert_eq!(s.prune_events(5_000).await.unwrap(), 0);
    let after = s.month_totals(1, NOV, None).await.unwrap();
    assert_eq!(
        (after.tokens, after.requests),
        (before.tokens, before.requests)
    );
    // Recent events are still there (a retry is still recognised); old ones are gone.
    assert_eq!(s.record_usage(&records[old..]).await.unwrap(), 0);
    assert_eq!(s.record_usage(&records[..1]).await.unwrap(), 1);
}

async fn an_overrides_patch_sets_clears_and_keeps(b: Backend) {
    let s = &b.store;
    s.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let ws = s.create_workspace("acme", "a", &by(), 10).await.unwrap();
    let start = Overrides {
        requests_per_second: Some(2.0),
        burst: None,
        tokens_per_minute: Some(100),
        tokens_per_month: Some(1000),
        concurrent_requests: None,
    };
    let ws1 = s
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                overrides: OverridesPatch::replacing(&start),
                ..WorkspaceChange::default()
            },
            &by(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(ws1.overrides, start);
    let patch = OverridesPatch {
        tokens_per_minute: FieldPatch::Set(500),
        tokens_per_month: FieldPatch::Clear,
        concurrent_requests: FieldPatch::Set(4),
        ..OverridesPatch::default()
    };
    let ws2 = s
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                overrides: patch,
                ..WorkspaceChange::default()
            },
            &by(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        ws2.overrides,
        Overrides {
            requests_per_second: Some(2.0),
            burst: None,
            tokens_per_minute: Some(500),
            tokens_per_month: None,
            concurrent_requests: Some(4),
        }
    );
    assert_eq!(ws2.tier, "a", "the tier is kept");

    // Refused, naming the field, and nothing changed.
    let v = s.catalog_version().await.unwrap();
    let bad = WorkspaceChange {
        overrides: OverridesPatch {
            tokens_per_minute: FieldPatch::Set(0),
            ..OverridesPatch::default()
        },
        ..WorkspaceChange::default()
    };
    let e = s.update_workspace(ws.id, &bad, &by(), 0).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("tokens_per_minute")),
        "{e}"
    );
    let e = s
        .update_workspace(
            ws.id,
            &WorkspaceChange {
                tier: Some("nope".into()),
                ..patch_rps(9.0)
            },
            &by(),
            0,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("nope")),
        "{e}"
    );
    assert!(matches!(
        s.update_workspace(ws.id + 100, &patch_rps(9.0), &by(), 0)
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.get_workspace(ws.id).await.unwrap(), ws2);
    assert_eq!(s.catalog_version().await.unwrap(), v);
}

/// An operator approves an increase while another (another process) changes the same
/// workspace's overrides: both changes must hold, every time.
async fn an_approval_racing_an_overrides_change_keeps_both(b: Backend) {
    let approver = b.store.clone();
    let patcher = b.another().await;
    approver.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let mut rounds = Vec::new();
    for w in 0..3 {
        let ws = approver
            .create_workspace(&format!("w{w}"), "a", &by(), 10)
            .await
            .unwrap();
        let (approver, patcher) = (approver.clone(), patcher.clone());
        rounds.push(tokio::spawn(async move {
            for i in 0..25u64 {
                let asked = Overrides {
                    tokens_per_month: Some(1_000 + i),
                    ..Overrides::default()
                };
                let request = approver
                    .create_limit_request(ws.id, "more", &asked, &by(), 10)
                    .await
                    .unwrap();
                let approve = {
                    let approver = approver.clone();
                    tokio::spawn(async move {
                        approver
                            .approve_limit_request(request.id, None, &by(), 20)
                            .await
                    })
                };
                let patch = {
                    let patcher = patcher.clone();
                    let rps = i as f64 + 1.0;
                    tokio::spawn(async move {
                        patcher
                            .update_workspace(ws.id, &patch_rps(rps), &by(), 0)
                            .await
                    })
                };
                approve.await.unwrap().unwrap();
                patch.await.unwrap().unwrap();
                let o = approver.get_workspace(ws.id).await.unwrap().overrides;
                assert_eq!(
                    (o.tokens_per_month, o.requests_per_second),
                    (Some(1_000 + i), Some(i as f64 + 1.0)),
                    "round {i}: one change was lost"
                );
            }
        }));
    }
    for r in rounds {
        r.await.unwrap();
    }
}

fn everything(limit: u32) -> AuditFilter {
    AuditFilter {
        limit,
        ..AuditFilter::default()
    }
}

async fn every_admin_change_writes_its_audit_entry_and_a_refused_one_none(b: Backend) {
    let s = &b.store;
    let alice = Actor::admin("alice");
    let carol = Actor::cli(Some("carol"));
    s.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    assert_eq!(
        s.audit_log(&everything(100)).await.unwrap(),
        [],
        "seeding is not an admin change"
    );

    s.put_tier(&tier("b", 2.0), &alice, 100).await.unwrap();
    s.put_tier(&tier("b", 3.0), &alice, 101).await.unwrap();
    let ws = s.create_workspace("acme", "a", &carol, 102).await.unwrap();
    let change = WorkspaceChange {
        status: Some(WorkspaceStatus::Suspended),
        ..patch_rps(5.0)
    };
    s.update_workspace(ws.id, &change, &alice, 103)
        .await
        .unwrap();
    let (secret, key) = new_key(ws.id);
    let key = s.create_key(&key, &carol, 104).await.unwrap();
    s.revoke_key(key.id, &alice, 105).await.unwrap();
    let asked = Overrides {
        tokens_per_month: Some(5000),
        ..Overrides::default()
    };
    let itself = Actor::workspace(ws.id);
    let r1 = s
        .create_limit_request(ws.id, "more", &asked, &itself, 106)
        .await
        .unwrap();
    s.approve_limit_request(r1.id, None, &alice, 107)
        .await
        .unwrap();
    let r2 = s
        .create_limit_request(ws.id, "again", &asked, &itself, 108)
        .await
        .unwrap();
    s.deny_limit_request(r2.id, "no", &carol, 109)
        .await
        .unwrap();

    // Refused changes record nothing.
    assert!(s.create_workspace("x", "nope", &alice, 200).await.is_err());
    let bad = WorkspaceChange {
        overrides: OverridesPatch {
            tokens_per_minute: FieldPatch::Set(0),
            ..OverridesPatch::default()
        },
        ..WorkspaceChange::default()
    };
    assert!(s.update_workspace(ws.id, &bad, &alice, 200).await.is_err());
    assert!(s
        .update_workspace(ws.id + 100, &patch_rps(1.0), &alice, 200)
        .await
        .is_err());
    assert!(s
        .approve_limit_request(r1.id, None, &alice, 200)
        .await
        .is_err());
    assert!(s
        .deny_limit_request(r1.id, "late", &alice, 200)
        .await
        .is_err());
    assert!(s.revoke_key(key.id + 100, &alice, 200).await.is_err());
    let (_, orphan) = new_key(ws.id + 100);
    assert!(matches!(
        s.create_key(&orphan, &alice, 200).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.create_limit_request(ws.id + 100, "x", &asked, &itself, 200)
            .await,
        Err(StoreError::NotFound)
    ));

    let log = s.audit_log(&everything(100)).await.unwrap();
    let seen: Vec<(i64, &str, &str, &str, Option<i64>)> = log
        .iter()
        .map(|e| {
            (
                e.at,
                e.actor.as_str(),
                e.action.as_str(),
                e.target.as_str(),
                e.workspace_id,
            )
        })
        .collect();
    let (w, k, r1t, r2t) = (
        format!("workspace:{}", ws.id),
        format!("key:{}", key.id),
        format!("limit_request:{}", r1.id),
        format!("limit_request:{}", r2.id),
    );
    let ws_actor = itself.as_str();
    let id = Some(ws.id);
    assert_eq!(
        seen,
        [
            (109, "cli:carol", "limit_request.deny", r2t.as_str(), id),
            (108, ws_actor, "limit_request.create", r2t.as_str(), id),
            (107, "alice", "limit_request.approve", r1t.as_str(), id),
            (106, ws_actor, "limit_request.create", r1t.as_str(), id),
            (105, "alice", "key.revoke", k.as_str(), id),
            (104, "cli:carol", "key.create", k.as_str(), id),
            (103, "alice", "workspace.update", w.as_str(), id),
            (102, "cli:carol", "workspace.create", w.as_str(), id),
            (101, "alice", "tier.put", "tier:b", None),
            (100, "alice", "tier.put", "tier:b", None),
        ]
    );
    let entry = |i: usize| (log[i].before.clone(), log[i].after.clone().unwrap());
    let (before, after) = entry(9);
    assert_eq!(before, None);
    assert_eq!(after["limits"]["requests_per_second"], 2.0);
    let (before, after) = entry(8);
    assert_eq!(before.unwrap()["limits"]["requests_per_second"], 2.0);
    assert_eq!(after["limits"]["requests_per_second"], 3.0);
    let (before, after) = entry(6);
    let before = before.unwrap();
    assert_eq!(
        (&before["status"], &before["overrides"]),
        (&"active".into(), &serde_json::json!({}))
    );
    assert_eq!(after["status"], "suspended");
    assert_eq!(after["overrides"]["requests_per_second"], 5.0);
    let (before, after) = entry(4);
    assert!(before.unwrap()["revoked_at"].is_null());
    assert_eq!(after["revoked_at"], 105);
    assert!(after.get("hash").is_none());
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains(&secret), "never a key's secret");
    let (before, after) = entry(2);
    assert_eq!(
        before.unwrap()["workspace_overrides"]["tokens_per_month"],
        serde_json::Value::Null
    );
    assert_eq!(after["workspace_overrides"]["tokens_per_month"], 5000);
    assert_eq!(after["request"]["status"], "approved");
    let (before, after) = entry(0);
    assert_eq!(before.unwrap()["status"], "pending");
    assert_eq!(after["reason"], "no");
}

async fn the_audit_log_is_filtered_and_paged_newest_first(b: Backend) {
    let s = &b.store;
    s.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let (alice, bob) = (Actor::admin("alice"), Actor::admin("bob"));
    let x = s.create_workspace("x", "a", &alice, 10).await.unwrap();
    let y = s.create_workspace("y", "a", &bob, 20).await.unwrap();
    for i in 0..10 {
        let (who, ws) = if i % 2 == 0 { (&alice, &x) } else { (&bob, &y) };
        s.update_workspace(ws.id, &patch_rps(i as f64 + 1.0), who, 30 + i)
            .await
            .unwrap();
    }
    s.put_tier(&tier("a", 2.0), &bob, 50).await.unwrap();
    let all = s.audit_log(&everything(1000)).await.unwrap();
    assert_eq!(all.len(), 13);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));

    let count = |f: AuditFilter| async move { s.audit_log(&f).await.unwrap() };
    let on_x = count(AuditFilter {
        workspace: Some(x.id),
        ..everything(100)
    })
    .await;
    assert_eq!(on_x.len(), 6);
    assert!(on_x.iter().all(|e| e.workspace_id == Some(x.id)));
    let by_bob = count(AuditFilter {
        actor: Some("bob".into()),
        ..everything(100)
    })
    .await;
    assert_eq!(by_bob.len(), 7);
    let bobs_updates_of_x = count(AuditFilter {
        actor: Some("bob".into()),
        workspace: Some(x.id),
        ..everything(100)
    })
    .await;
    assert_eq!(bobs_updates_of_x, []);
    let tiers = count(AuditFilter {
        action: Some(AuditAction::TierPut),
        ..everything(100)
    })
    .await;
    assert_eq!(tiers.len(), 1);
    assert_eq!(tiers[0].target, "tier:a");
    // [32, 35): the updates at 32, 33, 34.
    let window = count(AuditFilter {
        from: Some(32),
        to: Some(35),
        ..everything(100)
    })
    .await;
    let at: Vec<i64> = window.iter().map(|e| e.at).collect();
    assert_eq!(at, [34, 33, 32]);

    // Pages of 4, each after the last id of the one before, make up the whole log.
    let mut walked = Vec::new();
    let mut after = None;
    loop {
        let page = count(AuditFilter {
            after,
            ..everything(4)
        })
        .await;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        after = Some(page.last().unwrap().id);
        walked.extend(page);
    }
    assert_eq!(walked, all);
}

/// Many writers (two processes, four tasks each) write the same requests at the same moment,
/// half of them in the opposite order: no write fails (no deadlock), and every request is
/// counted exactly once.
async fn overlapping_batches_from_many_writers_count_each_request_once(b: Backend) {
    const WRITERS: usize = 8;
    const ROUNDS: usize = 6;
    const BATCH: usize = 1000;
    let stores = [b.store.clone(), b.another().await];
    // Request n of a round: workspace 1-3, one of two days, one of three models, 1-7 tokens.
    let request = |round: usize, n: usize| {
        settled(
            &format!("req-{round}-{n:04}"),
            (n % 3) as i64 + 1,
            ["2026-11-01", "2026-11-02"][n % 2],
            ["a", "b", "c"][n % 5 % 3],
            (n % 7) as u64 + 1,
            100,
        )
    };
    let together = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut writers = Vec::new();
    for task in 0..WRITERS {
        let store = stores[task % 2].clone();
        let together = together.clone();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for round in 0..ROUNDS {
                let mut batch: Vec<UsageRecord> = (0..BATCH).map(|n| request(round, n)).collect();
                // Denials on the same daily rows.
                batch.push(denied(1, "2026-11-01", "a"));
                batch.push(denied(2, "2026-11-02", "c"));
                if task % 2 == 1 {
                    batch.reverse();
                }
                together.wait().await;
                // Kept, not unwrapped here: the other writers wait for this one every round.
                written.push(store.record_usage(&batch).await);
            }
            written
        }));
    }
    let mut new = 0;
    for w in writers {
        for written in w.await.unwrap() {
            new += written.unwrap();
        }
    }
    assert_eq!(new, ROUNDS * BATCH, "each request is new exactly once");
    for ws in 1..=3i64 {
        let (mut tokens, mut requests) = (0, 0);
        for round in 0..ROUNDS {
            for n in 0..BATCH {
                if let UsageRecord::Settled {
                    workspace,
                    tokens: t,
                    ..
                } = request(round, n)
                {
                    if workspace == ws {
                        tokens += t;
                        requests += 1;
                    }
                }
            }
        }
        let t = b.store.month_totals(ws, NOV, None).await.unwrap();
        assert_eq!((t.tokens, t.requests), (tokens, requests), "workspace {ws}");
    }
    let mut denials = 0;
    for ws in [1, 2] {
        for row in b
            .store
            .daily_usage(ws, "2026-11-01", "2026-11-30")
            .await
            .unwrap()
        {
            denials += row.denied;
        }
    }
    assert_eq!(
        denials,
        (WRITERS * ROUNDS * 2) as u64,
        "every denial sent is counted"
    );
}

// ---- Postgres only ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_migrate_once() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let opening = (0..4).map(|_| tiergate::store::open(&db.url));
    let stores: Vec<_> = futures_util::future::join_all(opening)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let steps: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY 1")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(steps, vec![1, 2]);
    assert_eq!(stores[3].catalog_version().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_postgres_is_down_calls_fail_fast_and_the_ledger_catches_up() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let store = tiergate::store::open(&db.url_via(&proxy)).await.unwrap();
    let direct = tiergate::store::open(&db.url).await.unwrap();
    let catalog = Arc::new(Catalog::load(store.clone()).await.unwrap());
    let metrics = Arc::new(Metrics::default());
    let limiter = Arc::new(LocalLimiter::new(Arc::new(LedgerMonths(store.clone()))));
    let (recorder, _writer) = Recorder::start(
        store.clone(),
        catalog,
        limiter,
        Arc::new(SystemClock),
        metrics.clone(),
        Duration::from_millis(50),
    );
    let now = SystemClock.now_secs();
    let day = "2026-11-10";
    let record = |n: usize| settled(&format!("r{n}"), 1, day, "m", 3, now);
    for n in 0..100 {
        recorder.record(record(n));
    }
    recorder.flush().await;
    let requests = || async { direct.month_totals(1, NOV, None).await.unwrap().requests };
    assert_eq!(requests().await, 100);

    proxy.set(Line::Down);
    let started = Instant::now();
    let e = store.get_workspace(1).await.unwrap_err();
    assert!(matches!(e, StoreError::Unreachable(_)), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    // Usage settled meanwhile (with a retry of what was already written) is kept...
    for n in 90..150 {
        recorder.record(record(n));
    }
    recorder.flush().await;
    assert_eq!(requests().await, 100);
    assert!(metrics.ledger_write_errors.load(Ordering::Relaxed) > 0);

    // ...and written, once, when the database is back.
    proxy.set(Line::Up);
    let deadline = Instant::now() + Duration::from_secs(20);
    while requests().await < 150 && Instant::now() < deadline {
        recorder.flush().await;
    }
    let t = direct.month_totals(1, NOV, None).await.unwrap();
    assert_eq!((t.requests, t.tokens), (150, 450));
}

/// While the store is down the ledger writer keeps settlements up to its bound; past it, each
/// further settlement is counted (requests and tokens) in the metrics, never silently lost, and
/// what was kept is written once the store is back. Denials are counted per workspace, day and
/// model, and model names beyond the daily cap are counted under "(other)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_writer_keeps_its_bound_and_counts_what_it_drops() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let store = tiergate::store::open(&db.url_via(&proxy)).await.unwrap();
    let direct = tiergate::store::open(&db.url).await.unwrap();
    let catalog = Arc::new(Catalog::load(store.clone()).await.unwrap());
    let metrics = Arc::new(Metrics::default());
    let limiter = Arc::new(LocalLimiter::new(Arc::new(LedgerMonths(store.clone()))));
    let (recorder, _writer) = Recorder::start_bounded(
        store.clone(),
        catalog,
        limiter,
        Arc::new(SystemClock),
        metrics.clone(),
        Duration::from_millis(50),
        10,
    );
    let day = "2026-11-10";
    let now = SystemClock.now_secs();
    proxy.set(Line::Down);
    for n in 0..25 {
        recorder.record(settled(&format!("b{n}"), 1, day, "m", 7, now));
    }
    recorder.flush().await;
    let dropped = metrics.ledger_dropped.load(Ordering::Relaxed);
    assert_eq!(dropped, 15);
    assert_eq!(
        metrics.ledger_dropped_tokens.load(Ordering::Relaxed),
        15 * 7
    );
    assert_eq!(metrics.ledger_pending.load(Ordering::Relaxed), 10);

    proxy.set(Line::Up);
    let deadline = Instant::now() + Duration::from_secs(20);
    while direct.month_totals(1, NOV, None).await.unwrap().requests < 10
        && Instant::now() < deadline
    {
        recorder.flush().await;
    }
    let t = direct.month_totals(1, NOV, None).await.unwrap();
    assert_eq!((t.requests, t.tokens), (10, 70));

    // 40 denials under 40 made-up model names, then 5 more for one of them: one row update per
    // name and flush, at most the daily cap of names, the rest under "(other)".
    for n in 0..40 {
        recorder.record_denied(2, day.into(), format!("model-{n}"));
    }
    for _ in 0..5 {
        recorder.record_denied(2, day.into(), "model-0".into());
    }
    recorder.flush().await;
    let rows = direct.daily_usage(2, day, day).await.unwrap();
    assert!(
        rows.len() <= tiergate::usage::MAX_MODELS_PER_DAY + 1,
        "{} rows",
        rows.len()
    );
    assert_eq!(rows.iter().map(|r| r.denied).sum::<u64>(), 45);
    let other = rows
        .iter()
        .find(|r| r.model == tiergate::usage::OTHER_MODEL)
        .expect("names past the cap are counted together");
    assert_eq!(
        other.denied,
        40 - tiergate::usage::MAX_MODELS_PER_DAY as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_waits_briefly_when_the_store_does_not_answer() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(db.addr()).await;
    let store = tiergate::store::open(&db.url_via(&proxy)).await.unwrap();
    store.seed_tiers(&[tier("a", 1.0)]).await.unwrap();
    let ws = store
        .create_workspace("acme", "a", &by(), 10)
        .await
        .unwrap();
    let (known, key) = new_key(ws.id);
    store.create_key(&key, &by(), 10).await.unwrap();
    let catalog = Catalog::load(store.clone()).await.unwrap();

    // A key created elsewhere is found by the check on an unknown key.
    let (fresh, key) = new_key(ws.id);
    b_side_create(&db.url, key).await;
    assert!(catalog.authenticate(&fresh, 10).await.is_ok());

    // The network drops everything. A malformed key is refused without asking the store...
    proxy.set(Line::Silent);
    assert!(matches!(
        catalog.authenticate("tg_unknown", 10).now_or_never(),
        Some(Err(AuthFailure::UnknownKey))
    ));
    // ...and the check for a well-formed unknown key (due again after 100 ms) gives up quickly...
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    assert_eq!(
        catalog
            .authenticate(&generate_key().secret, 10)
            .await
            .unwrap_err(),
        AuthFailure::UnknownKey
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(1500),
        "waited {waited:?}: the check should have run and timed out after 250 ms"
    );
    // ...and is not tried again for a while (past the 100 ms between checks, within the 1 s
    // pause): the next unknown key is answered without waiting on anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        catalog
            .authenticate(&generate_key().secret, 10)
            .now_or_never(),
        Some(Err(AuthFailure::UnknownKey))
    ));
    // Known keys are served from memory all along.
    assert!(catalog
        .authenticate(&known, 10)
        .now_or_never()
        .unwrap()
        .is_ok());
    assert!(catalog
        .authenticate(&fresh, 10)
        .now_or_never()
        .unwrap()
        .is_ok());
}

async fn b_side_create(url: &str, key: NewKey) {
    let other = tiergate::store::open(url).await.unwrap();
    other.create_key(&key, &by(), 10).await.unwrap();
}
