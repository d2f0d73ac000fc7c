//! The ledger on a real SQLite file.

use tiergate::limiter::MonthKey;
use tiergate::store::sqlite::SqliteStore;
use tiergate::store::{Store, UsageRecord};

fn settled(id: &str, day: &str, model: &str, tokens: u64, at: i64) -> UsageRecord {
    UsageRecord::Settled {
        request_id: id.into(),
        workspace: 1,
        day: day.into(),
        model: model.into(),
        tokens,
        at,
    }
}

#[tokio::test]
async fn settling_the_same_request_twice_never_counts_twice_and_pruning_keeps_totals() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&format!("sqlite://{}", dir.path().join("l.db").display()))
        .await
        .unwrap();
    let batch = vec![
        settled("r1", "2026-11-03", "a", 10, 100),
        settled("r2", "2026-11-03", "a", 5, 200),
        settled("r3", "2026-11-30", "b", 7, 300),
        settled("r4", "2026-12-01", "a", 1000, 400),
    ];
    assert_eq!(store.record_usage(&batch).await.unwrap(), 4);
    // The same batch again (a retried write): nothing new.
    assert_eq!(store.record_usage(&batch).await.unwrap(), 0);
    let nov = MonthKey(2026 * 12 + 10);
    assert_eq!((nov.year(), nov.month()), (2026, 11));
    let t = store.month_totals(1, nov).await.unwrap();
    assert_eq!((t.tokens, t.requests), (22, 3));
    assert_eq!(t.by_model.get("a"), Some(&15));
    assert_eq!(
        store.month_totals(1, nov.next()).await.unwrap().tokens,
        1000
    );

    // Events older than the window go; their daily totals stay.
    assert_eq!(store.prune_events(350).await.unwrap(), 3);
    assert_eq!(store.month_totals(1, nov).await.unwrap().tokens, 22);
    let daily = store
        .daily_usage(1, "2026-11-01", "2026-11-30")
        .await
        .unwrap();
    assert_eq!(daily.len(), 2);
    assert_eq!((daily[0].requests, daily[0].tokens), (2, 15));
}
