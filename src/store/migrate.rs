//! `tiergate migrate`: copies a whole embedded installation (SQLite) into Postgres, so that an
//! operator can move from one instance to many without losing workspaces, keys, requests, the
//! month's usage or the audit log.
//!
//! The source must exist; its schema is first brought up to date, as `serve` would. It is then
//! read in one read transaction (a consistent snapshot, even if a gateway is still writing to
//! it); the target is written in one transaction, so a failed copy leaves it as it
//! was. The target must be empty: if it holds anything a `serve` started on it does not make
//! itself (any workspace, key, limit request, ledger row, audit entry, webhook endpoint, event
//! or delivery), nothing is changed. What a `serve` makes is replaced by the source's: the tiers
//! it seeded (seeding writes no audit entry: a tier changed on the target has one, and so makes
//! it non-empty) and the console's signing secret. The audit log is never deleted from: the
//! target's is empty, and the source's is copied into it.
//! Ids are kept, and the identity sequences continue after the copied ids. The catalogue version
//! is the source's, or one above the target's if that is higher, so that a gateway already
//! running on the target reloads everything.

use sqlx::{Row, Sqlite, Transaction};

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{redact, Backend, StoreError};

/// Rows read from the source and written to the target per statement.
const CHUNK: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("from: {0}")]
    From(String),
    #[error("to: {0}")]
    To(String),
    #[error("source {url}: {error}")]
    Source { url: String, error: StoreError },
    #[error("target {url}: {error}")]
    Target { url: String, error: StoreError },
    #[error("reading the source: {0}")]
    Read(StoreError),
    #[error("writing the target (nothing was changed): {0}")]
    Write(StoreError),
    #[error(
        "target {url} is not empty (workspaces: {workspaces}, keys: {keys}, limit requests: \
         {limit_requests}, ledger rows: {ledger_rows}, audit entries: {audit_entries}, webhook \
         endpoints: {webhook_endpoints}, webhook events: {webhook_events}, webhook deliveries: \
         {webhook_deliveries}); nothing was changed (migrate into a new, empty database)"
    )]
    TargetNotEmpty {
        url: String,
        workspaces: i64,
        keys: i64,
        limit_requests: i64,
        ledger_rows: i64,
        audit_entries: i64,
        webhook_endpoints: i64,
        webhook_events: i64,
        webhook_deliveries: i64,
    },
}

/// What was copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationSummary {
    pub tiers: u64,
    pub workspaces: u64,
    pub keys: u64,
    /// Of `keys`.
    pub revoked_keys: u64,
    pub limit_requests: u64,
    /// Per-request events written by versions before ledger batches.
    pub ledger_events: u64,
    pub daily_rows: u64,
    /// Rows by month-counter generation.
    pub counted_rows: u64,
    /// Rows per workspace and hour (the usage charts').
    pub hourly_rows: u64,
    /// Rows per workspace, day and key.
    pub key_rows: u64,
    /// Rows by month-counter generation and key.
    pub counted_key_rows: u64,
    /// Ids of ledger batches written (kept for a week, to recognise a batch sent again).
    pub batch_ids: u64,
    pub audit_entries: u64,
    pub webhook_endpoints: u64,
    /// Events of the webhooks' outbox, and their deliveries (pending, delivered or failed).
    pub webhook_events: u64,
    pub webhook_deliveries: u64,
    /// Whether the source had the console's signing secret (its sessions hold on the target).
    pub console_secret: bool,
    /// The catalogue version the target is now at.
    pub catalog_version: i64,
}

/// Copies the SQLite installation at `from` (`sqlite://PATH`, which must exist) into the empty
/// Postgres database at `to` (created schema and all if needed).
pub async fn sqlite_to_postgres(from: &str, to: &str) -> Result<MigrationSummary, MigrateError> {
    if Backend::of(from) != Ok(Backend::Sqlite) {
        return Err(MigrateError::From(format!(
            "'{}' must be a sqlite:// URL",
            redact(from)
        )));
    }
    if Backend::of(to) != Ok(Backend::Postgres) {
        return Err(MigrateError::To(format!(
            "'{}' must be a postgres:// URL",
            redact(to)
        )));
    }
    let source_err = |error| MigrateError::Source {
        url: redact(from),
        error,
    };
    let target_err = |error| MigrateError::Target {
        url: redact(to),
        error,
    };
    let source = SqliteStore::open_existing(from).await.map_err(source_err)?;
    let target = PostgresStore::open(to).await.map_err(target_err)?;
    let mut src = source.pool.begin().await.map_err(read)?;
    let mut dst = target.pool.begin().await.map_err(write)?;

    // Nobody writes the target while it is checked and filled.
    sqlx::query(
        "LOCK TABLE meta, tiers, workspaces, api_keys, limit_requests, usage_events, usage_daily, usage_counted, usage_hourly, usage_daily_by_key, usage_counted_by_key, ledger_batches, catalog_changes, audit, secrets, webhook_endpoints, webhook_events, webhook_deliveries IN EXCLUSIVE MODE",
    )
    .execute(&mut *dst)
    .await
    .map_err(write)?;
    // Everything copied that a `serve` does not make itself must be absent: a `serve` seeds
    // tiers (without an audit entry) and makes the console's secret, and nothing else.
    let counts: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM workspaces), (SELECT COUNT(*) FROM api_keys), (SELECT COUNT(*) FROM limit_requests), (SELECT COUNT(*) FROM usage_events) + (SELECT COUNT(*) FROM usage_daily) + (SELECT COUNT(*) FROM usage_counted) + (SELECT COUNT(*) FROM usage_hourly) + (SELECT COUNT(*) FROM usage_daily_by_key) + (SELECT COUNT(*) FROM usage_counted_by_key) + (SELECT COUNT(*) FROM ledger_batches), (SELECT COUNT(*) FROM audit), (SELECT COUNT(*) FROM webhook_endpoints), (SELECT COUNT(*) FROM webhook_events), (SELECT COUNT(*) FROM webhook_deliveries)",
    )
    .fetch_one(&mut *dst)
    .await
    .map_err(write)?;
    let (
        workspaces,
        keys,
        limit_requests,
        ledger_rows,
        audit_entries,
        webhook_endpoints,
        webhook_events,
        webhook_deliveries,
    ) = counts;
    if workspaces
        + keys
        + limit_requests
        + ledger_rows
        + audit_entries
        + webhook_endpoints
        + webhook_events
        + webhook_deliveries
        > 0
    {
        return Err(MigrateError::TargetNotEmpty {
            url: redact(to),
            workspaces,
            keys,
            limit_requests,
            ledger_rows,
            audit_entries,
            webhook_endpoints,
            webhook_events,
            webhook_deliveries,
        });
    }

    // What a `serve` made gives way to the source's: the tiers it seeded, and the gateway's own
    // secrets (the console's signing key: the source's sessions go on on the target, and any a
    // `serve` made on the empty target end). The audit log is empty, as checked above, and is
    // never deleted from.
    sqlx::query("DELETE FROM tiers")
        .execute(&mut *dst)
        .await
        .map_err(write)?;
    sqlx::query("DELETE FROM secrets")
        .execute(&mut *dst)
        .await
        .map_err(write)?;
    let mut copied = Vec::with_capacity(TABLES.len());
    for (table, columns) in TABLES {
        copied.push(copy_table(&mut src, &mut dst, table, columns).await?);
    }
    let [tiers, workspaces, keys, limit_requests, ledger_events, daily_rows, counted_rows, hourly_rows, key_rows, counted_key_rows, batch_ids, audit_entries, secrets, webhook_endpoints, webhook_events, webhook_deliveries] =
        copied[..]
    else {
        unreachable!("one count per table")
    };
    let revoked_keys: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NOT NULL")
            .fetch_one(&mut *src)
            .await
            .map_err(read)?;
    let mut summary = MigrationSummary {
        tiers,
        workspaces,
        keys,
        revoked_keys: revoked_keys as u64,
        limit_requests,
        ledger_events,
        daily_rows,
        counted_rows,
        hourly_rows,
        key_rows,
        counted_key_rows,
        batch_ids,
        audit_entries,
        webhook_endpoints,
        webhook_events,
        webhook_deliveries,
        console_secret: secrets > 0,
        catalog_version: 0,
    };

    let source_version: i64 =
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'catalog_version'")
            .fetch_one(&mut *src)
            .await
            .map_err(read)?;
    let target_version: i64 =
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'catalog_version'")
            .fetch_one(&mut *dst)
            .await
            .map_err(write)?;
    summary.catalog_version = source_version.max(target_version + 1);
    // The highest id each table ever gave (SQLite's AUTOINCREMENT never gives one again), which
    // may be above the highest copied: the rows above were deleted.
    let given: Vec<(String, i64)> = sqlx::query_as("SELECT name, seq FROM sqlite_sequence")
        .fetch_all(&mut *src)
        .await
        .map_err(read)?;
    finish_target(&mut dst, summary.catalog_version, &given)
        .await
        .map_err(MigrateError::Write)?;
    dst.commit().await.map_err(write)?;
    src.commit().await.map_err(read)?;
    Ok(summary)
}

type Src = Transaction<'static, Sqlite>;
type Dst = Transaction<'static, sqlx::Postgres>;

fn read(e: sqlx::Error) -> MigrateError {
    MigrateError::Read(e.into())
}

fn write(e: sqlx::Error) -> MigrateError {
    MigrateError::Write(e.into())
}

/// How a column is read from SQLite and sent to Postgres.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    OptInt,
    Text,
    OptText,
    Bytes,
    Bool,
}

use Kind::*;

/// Every table of an installation, parents first, with every column. (`meta` is set apart, and
/// the change log starts afresh.)
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "tiers",
        &[
            ("name", Text),
            ("rank", OptInt),
            ("limits", Text),
            ("promotion", OptText),
            ("shadowing", Text),
        ],
    ),
    (
        "workspaces",
        &[
            ("id", Int),
            ("name", Text),
            ("tier", Text),
            ("overrides", Text),
            ("status", Text),
            ("created_at", Int),
            ("pinned", Bool),
            ("attributes", Text),
            ("promoted", OptText),
            ("budget", Text),
            ("shadowing", Text),
        ],
    ),
    (
        "api_keys",
        &[
            ("id", Int),
            ("workspace_id", Int),
            ("name", OptText),
            ("prefix", Text),
            ("hash", Bytes),
            ("created_at", Int),
            ("expires_at", OptInt),
            ("revoked_at", OptInt),
            ("last_used_at", OptInt),
            ("limits", Text),
        ],
    ),
    (
        "limit_requests",
        &[
            ("id", Int),
            ("workspace_id", Int),
            ("use_case", Text),
            ("expected_volume", OptText),
            ("requested_limits", Text),
            ("status", Text),
            ("granted_limits", OptText),
            ("reason", OptText),
            ("created_at", Int),
            ("decided_at", OptInt),
        ],
    ),
    (
        "usage_events",
        &[
            ("request_id", Text),
            ("workspace_id", Int),
            ("day", Text),
            ("model", Text),
            ("tokens", Int),
            ("settled_at", Int),
            ("counter", OptText),
        ],
    ),
    (
        "usage_daily",
        &[
            ("workspace_id", Int),
            ("day", Text),
            ("model", Text),
            ("requests", Int),
            ("tokens", Int),
            ("denied", Int),
            ("shadow_denied", Int),
            ("shadow_denied_tokens", Int),
        ],
    ),
    (
        "usage_counted",
        &[
            ("counter", Text),
            ("workspace_id", Int),
            ("day", Text),
            ("model", Text),
            ("requests", Int),
            ("tokens", Int),
        ],
    ),
    (
        "usage_hourly",
        &[
            ("workspace_id", Int),
            ("hour", Int),
            ("requests", Int),
            ("denied", Int),
            ("prompt_tokens", Int),
            ("completion_tokens", Int),
        ],
    ),
    (
        "usage_daily_by_key",
        &[
            ("workspace_id", Int),
            ("day", Text),
            ("key_id", Int),
            ("requests", Int),
            ("tokens", Int),
            ("denied", Int),
        ],
    ),
    (
        "usage_counted_by_key",
        &[
            ("counter", Text),
            ("workspace_id", Int),
            ("day", Text),
            ("key_id", Int),
            ("requests", Int),
            ("tokens", Int),
        ],
    ),
    ("ledger_batches", &[("id", Text), ("written_at", Int)]),
    (
        "audit",
        &[
            ("id", Int),
            ("at", Int),
            ("actor", Text),
            ("action", Text),
            ("workspace_id", OptInt),
            ("target", Text),
            ("before_json", OptText),
            ("after_json", OptText),
        ],
    ),
    ("secrets", &[("name", Text), ("value", Bytes)]),
    (
        "webhook_endpoints",
        &[
            ("id", Int),
            ("workspace_id", OptInt),
            ("url", Text),
            ("events", Text),
            ("secret", Text),
            ("created_at", Int),
        ],
    ),
    (
        "webhook_events",
        &[
            ("id", Text),
            ("workspace_id", Int),
            ("kind", Text),
            ("payload", Text),
            ("dedupe", OptText),
            ("created_at", Int),
        ],
    ),
    (
        "webhook_deliveries",
        &[
            ("id", Int),
            ("endpoint_id", Int),
            ("event_id", Text),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("locked_until", OptInt),
            ("claim", OptText),
            ("last_status", OptInt),
            ("last_error", OptText),
            ("created_at", Int),
        ],
    ),
];

/// One column's values, on their way to an `unnest` parameter.
enum Values {
    Int(Vec<i64>),
    OptInt(Vec<Option<i64>>),
    Text(Vec<String>),
    OptText(Vec<Option<String>>),
    Bytes(Vec<Vec<u8>>),
    Bool(Vec<bool>),
}

/// Copies `table`, `CHUNK` rows per statement, in the source's rowid order (every tiergate
/// SQLite table has a rowid). Returns how many rows were copied.
async fn copy_table(
    src: &mut Src,
    dst: &mut Dst,
    table: &str,
    columns: &[(&str, Kind)],
) -> Result<u64, MigrateError> {
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    let names = names.join(", ");
    let select = format!(
        "SELECT rowid AS copy_rowid, {names} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"
    );
    let params: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| {
            let array = match kind {
                Int | OptInt => "BIGINT[]",
                Text | OptText => "TEXT[]",
                Bytes => "BYTEA[]",
                Bool => "BOOLEAN[]",
            };
            format!("${}::{array}", i + 1)
        })
        .collect();
    let insert = format!(
        "INSERT INTO {table} ({names}) SELECT * FROM unnest({})",
        params.join(", ")
    );
    let mut after = i64::MIN;
    let mut copied = 0;
    loop {
        let rows = sqlx::query(&select)
            .bind(after)
            .bind(CHUNK)
            .fetch_all(&mut **src)
            .await
            .map_err(read)?;
        let Some(last) = rows.last() else {
            return Ok(copied);
        };
        after = last.try_get("copy_rowid").map_err(read)?;
        let mut values: Vec<Values> = columns
            .iter()
            .map(|(_, kind)| match kind {
                Int => Values::Int(Vec::new()),
                OptInt => Values::OptInt(Vec::new()),
                Text => Values::Text(Vec::new()),
                OptText => Values::OptText(Vec::new()),
                Bytes => Values::Bytes(Vec::new()),
                Bool => Values::Bool(Vec::new()),
            })
            .collect();
        for row in &rows {
            for ((name, _), v) in columns.iter().zip(&mut values) {
                match v {
                    Values::Int(v) => v.push(row.try_get(*name).map_err(read)?),
                    Values::OptInt(v) => v.push(row.try_get(*name).map_err(read)?),
                    Values::Text(v) => v.push(row.try_get(*name).map_err(read)?),
                    Values::OptText(v) => v.push(row.try_get(*name).map_err(read)?),
                    Values::Bytes(v) => v.push(row.try_get(*name).map_err(read)?),
                    Values::Bool(v) => v.push(row.try_get(*name).map_err(read)?),
                }
            }
        }
        let mut query = sqlx::query(&insert);
        for v in values {
            query = match v {
                Values::Int(v) => query.bind(v),
                Values::OptInt(v) => query.bind(v),
                Values::Text(v) => query.bind(v),
                Values::OptText(v) => query.bind(v),
                Values::Bytes(v) => query.bind(v),
                Values::Bool(v) => query.bind(v),
            };
        }
        query.execute(&mut **dst).await.map_err(write)?;
        copied += rows.len() as u64;
    }
}

/// Sequences continue after the ids the source ever gave (`given`, SQLite's `sqlite_sequence`),
/// not only after those copied: an endpoint deleted before the copy keeps its id, and the audit
/// entries that name it name no other (an outside audit: `webhook:1` named two endpoints). The
/// catalogue is at `version`, with an empty change log that starts there (instances behind it
/// reload everything).
async fn finish_target(
    dst: &mut Dst,
    version: i64,
    given: &[(String, i64)],
) -> Result<(), StoreError> {
    for table in [
        "workspaces",
        "api_keys",
        "limit_requests",
        "audit",
        "webhook_endpoints",
        "webhook_deliveries",
    ] {
        let given = given
            .iter()
            .find(|(name, _)| name == table)
            .map_or(0, |&(_, seq)| seq);
        sqlx::query(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST(COALESCE(MAX(id), 0), $1) + 1, false) FROM {table}"
        ))
        .bind(given)
        .execute(&mut **dst)
        .await?;
    }
    sqlx::query("DELETE FROM catalog_changes")
        .execute(&mut **dst)
        .await?;
    sqlx::query("UPDATE meta SET value = $1 WHERE key IN ('catalog_version', 'catalog_log_from')")
        .bind(version)
        .execute(&mut **dst)
        .await?;
    Ok(())
}
