//! The embedded store: one SQLite file in WAL mode, created and migrated on open.
//!
//! SQLite has one writer at a time. Every transaction that writes is begun as a write
//! transaction (`BEGIN IMMEDIATE`), so what it reads before writing cannot change under it, and
//! two processes on the same file (the admin CLI next to a gateway) queue instead of failing
//! when a reader tries to become a writer.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, Sqlite, SqlitePool, Transaction};

use super::{
    already_decided, approval_lowers, approval_state, audit_entry, hour_row, json, key_usage_row,
    log_covers, month_range, month_totals_of, parse_json, promotion_holds, prune_in_batches,
    rank_of, revoked, search_pattern, tier_shadowing_column, tier_shadowing_of,
    workspace_search_sql, workspace_shadowing_column, workspace_shadowing_of, AuditColumns,
    AuditFilter, AuditRow, CatalogChanges, CatalogData, CatalogDelta, Changed, Closing, DailyUsage,
    HourRow, KeyUsage, LedgerBatch, MonthTotalsRow, NewKey, Store, StoreError, WorkspaceChange,
    WorkspaceListed, WorkspacePage, WorkspaceQuery, AUDIT_COLUMNS, CHANGE_LOG_KEEP, CHANGE_LOG_SQL,
    KEY_USAGE_SQL, MONTH_TOTALS_SQL, PRUNE_BATCH, SHADOW_DENIED_SQL,
};
use super::{
    claim_token, delivery_record, due_delivery, events_column, limit_request_event,
    outcome_columns, webhook_endpoint, workspace_events, ClaimedColumns, DeliveryColumns,
    DeliveryOutcome, DeliveryRecord, DueDelivery, NewWebhook, WebhookEndpoint, WebhookEvent,
    WebhookId, CLAIMED_SQL, DELIVERIES_SQL, DELIVERY_SQL, FINISH_SQL, INSERT_DELIVERIES_SQL,
    INSERT_EVENT_SQL, MOST_IN_FLIGHT_PER_ENDPOINT, PRUNE_DELIVERIES_SQL, PRUNE_EVENTS_SQL,
    REDELIVER_SQL, WEBHOOK_COLUMNS,
};
use crate::limiter::{MonthKey, MonthTotals};
use crate::model::{
    Actor, ApiKey, AuditAction, AuditEntry, KeyId, KeyLimits, LimitRequest, LimitRequestId,
    LimitRequestStatus, Limits, Overrides, Tier, Workspace, WorkspaceId, WorkspaceStatus,
};

/// Schema steps, applied in order once each. Never edit a step that has shipped; add one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('catalog_version', 1);
CREATE TABLE tiers (
    name TEXT PRIMARY KEY,
    limits TEXT NOT NULL
);
CREATE TABLE workspaces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    tier TEXT NOT NULL REFERENCES tiers(name),
    overrides TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'active',
    created_at INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
    name TEXT,
    prefix TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER
);
CREATE INDEX api_keys_workspace ON api_keys(workspace_id);
CREATE TABLE usage_events (
    request_id TEXT PRIMARY KEY,
    workspace_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    settled_at INTEGER NOT NULL
);
CREATE INDEX usage_events_settled_at ON usage_events(settled_at);
CREATE TABLE usage_daily (
    workspace_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, day, model)
);
CREATE TABLE limit_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
    use_case TEXT NOT NULL,
    requested_limits TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    granted_limits TEXT,
    reason TEXT,
    created_at INTEGER NOT NULL,
    decided_at INTEGER
);
CREATE INDEX limit_requests_status ON limit_requests(status);
"#,
    // The limiter's month-counter tag on ledger events, and the catalogue change log (complete
    // for the versions after `catalog_log_from`).
    r#"
ALTER TABLE usage_events ADD COLUMN counter TEXT;
CREATE INDEX usage_events_counter ON usage_events(counter, workspace_id, day)
    WHERE counter IS NOT NULL;
CREATE TABLE catalog_changes (
    version INTEGER NOT NULL,
    tier TEXT,
    workspace_id INTEGER,
    key_id INTEGER
);
CREATE INDEX catalog_changes_version ON catalog_changes(version);
INSERT INTO meta (key, value)
    SELECT 'catalog_log_from', value FROM meta WHERE key = 'catalog_version';
"#,
    // The audit log of admin changes.
    r#"
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    workspace_id INTEGER,
    target TEXT NOT NULL,
    before_json TEXT,
    after_json TEXT
);
CREATE INDEX audit_workspace ON audit(workspace_id, id);
CREATE INDEX audit_actor ON audit(actor, id);
CREATE INDEX audit_at ON audit(at, id);
"#,
    // The ledger in batches: the ids of batches written (idempotency), and what each of the
    // limiter's month-counter generations counted, per workspace, day and model.
    r#"
CREATE TABLE ledger_batches (
    id TEXT PRIMARY KEY,
    written_at INTEGER NOT NULL
);
CREATE INDEX ledger_batches_written_at ON ledger_batches(written_at);
CREATE TABLE usage_counted (
    counter TEXT NOT NULL,
    workspace_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, workspace_id, day, model)
);
CREATE INDEX usage_counted_day ON usage_counted(day);
"#,
    // Secrets the gateway makes for itself once and shares between instances (the console's
    // session-signing key).
    r#"
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"#,
    // The tiers' order on the ladder (the shipped tiers get theirs), and what a workspace
    // expects to send under the limits it asks for.
    r#"
ALTER TABLE tiers ADD COLUMN rank INTEGER;
UPDATE tiers SET rank = CASE name WHEN 'free' THEN 0 WHEN 'tier-1' THEN 1 WHEN 'tier-2' THEN 2
    WHEN 'tier-3' THEN 3 WHEN 'tier-4' THEN 4 WHEN 'scale' THEN 5 END;
ALTER TABLE limit_requests ADD COLUMN expected_volume TEXT;
"#,
    // The ledger's rollups for the usage charts: per workspace and hour (kept a week), and per
    // workspace, day and key (kept as long as the daily rows).
    r#"
CREATE TABLE usage_hourly (
    workspace_id INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, hour)
);
CREATE INDEX usage_hourly_hour ON usage_hourly(hour);
CREATE TABLE usage_daily_by_key (
    workspace_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, day, key_id)
);
"#,
    // Automatic promotion: a tier's way up, and a workspace's pin, attributes and last
    // promotion.
    r#"
ALTER TABLE tiers ADD COLUMN promotion TEXT;
ALTER TABLE workspaces ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workspaces ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE workspaces ADD COLUMN promoted TEXT;
"#,
    // The monthly caps a workspace sets for itself.
    r#"
ALTER TABLE workspaces ADD COLUMN budget TEXT NOT NULL DEFAULT '{}';
"#,
    // Webhooks: the endpoints, and the outbox (events, one delivery per endpoint and event).
    r#"
CREATE TABLE webhook_endpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id INTEGER,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE webhook_events (
    id TEXT PRIMARY KEY,
    workspace_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    dedupe TEXT UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until INTEGER,
    claim TEXT,
    last_status INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries(endpoint_id, id);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries(event_id);
CREATE INDEX webhook_events_created ON webhook_events(created_at);
"#,
    // Keys' own limits, and what each of the limiter's month-counter generations counted per
    // key (for keys' month totals, as `usage_counted` is for the workspace's).
    r#"
ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
CREATE TABLE usage_counted_by_key (
    counter TEXT NOT NULL,
    workspace_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, workspace_id, day, key_id)
);
CREATE INDEX usage_counted_by_key_day ON usage_counted_by_key(day);
"#,
    // Shadow mode: a tier's and a workspace's enforcement and limits in shadow (JSON), and the
    // requests a limit in shadow would have denied, with their tokens, per day and model.
    r#"
ALTER TABLE tiers ADD COLUMN shadowing TEXT NOT NULL DEFAULT '{}';
ALTER TABLE workspaces ADD COLUMN shadowing TEXT NOT NULL DEFAULT '{}';
ALTER TABLE usage_daily ADD COLUMN shadow_denied INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN shadow_denied_tokens INTEGER NOT NULL DEFAULT 0;
"#,
];

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
}

/// Checks that `url` names a database: a file (`sqlite://PATH`), or memory (`sqlite::memory:`,
/// `?mode=memory`). An empty or blank path would be a temporary database per connection, which
/// fails later with "no such table".
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = params.split('&').any(|p| p == "mode=memory");
    if path.trim().is_empty() && !in_memory {
        return Err(format!(
            "'{url}' names no file; use sqlite://PATH (e.g. sqlite://tiergate.db)"
        ));
    }
    SqliteConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(|e| format!("'{url}' is not a valid SQLite URL: {e}"))
}

/// A claim that this process alone serves the SQLite database at `url` with limits in its own
/// memory, held (an advisory lock on `PATH.serving`, a file beside the database) until the
/// returned file is dropped: at exit, however the process ends. A second such process on the
/// same file is refused: each would enforce the whole limits on its own, and together admit
/// twice each limit (an outside audit: 6 of 8 requests admitted where 3 were allowed; a second
/// demo revoked the first one's key). `None` for a database in memory, which no other process
/// opens. The admin commands and `migrate` take no claim: they may run beside the gateway.
pub fn serve_alone(url: &str) -> Result<Option<std::fs::File>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Ok(None);
    };
    let Some(path) = file_of(rest) else {
        return Ok(None);
    };
    let claim = format!("{path}.serving");
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&claim)
    {
        Ok(f) => f,
        // No such directory: opening the database says so, in its own words.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Invalid(format!("cannot open {claim}: {e}"))),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Conflict(format!(
            "another tiergate process serves {path} (it holds {claim}): two on one SQLite file \
             would each enforce the whole limits; stop it, use another file, or share the limits \
             through --redis"
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Invalid(format!("cannot lock {claim}: {e}")))
        }
    }
}

/// The file a `sqlite://PATH` URL names; `None` for a database in memory.
fn file_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory =
        path.is_empty() || path == ":memory:" || params.split('&').any(|p| p == "mode=memory");
    (!in_memory).then_some(path)
}

/// Creates the database's file, readable and writable by its owner alone, when it does not
/// exist: it holds the console's session secret and the webhooks' signing secrets, and SQLite
/// would create it (and its `-wal` and `-shm` files, which take its mode) as the umask lets,
/// world-readable under the usual 022 (an outside audit). A file that exists keeps its mode.
fn create_private(url: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(path) = file_of(url) else { return };
    // Fails when it exists (kept as it is) or its directory does not (SQLite says so).
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// SQLite's "unable to open database file" (`SQLITE_CANTOPEN`, 14) names neither the file nor
/// why: said here in words a user can act on.
fn cannot_open(url: &str, e: sqlx::Error) -> StoreError {
    let cant_open = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("14"));
    if !cant_open {
        return e.into();
    }
    let path = file_of(url).unwrap_or(url);
    StoreError::Invalid(format!(
        "the SQLite file {path} cannot be opened: its directory must exist and be writable \
         (and the file readable and writable, if it exists)"
    ))
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database at `url` (`sqlite://PATH`).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::connect(url, true).await
    }

    /// Opens and migrates an existing database; refuses to create one.
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        Self::connect(url, false).await
    }

    async fn connect(url: &str, create: bool) -> Result<Self, StoreError> {
        if create {
            create_private(url);
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            // sqlx's SQLite connections count their transactions themselves. A COMMIT that
            // fails in a way after which SQLite rolls the transaction back (a full disk, an I/O
            // error), then the ROLLBACK that finds none, leave a connection counted in a
            // transaction, and every later `BEGIN` on it failed ("attempted to call begin_with
            // at non-zero transaction depth") until a restart (an outside audit: no write
            // succeeded after a full disk had room again, and the usage settled since was lost
            // at the stop). Such a connection is closed, not reused. A transaction dropped
            // unfinished (a read that returns early, an error on the way) has queued its
            // rollback: the ping runs it first. Only then: no round trip to the connection's
            // thread on the releases after a commit.
            .after_release(|conn, _| {
                Box::pin(async move {
                    if !conn.is_in_transaction() {
                        return Ok(true);
                    }
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| cannot_open(url, e))?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// A write transaction, taken up front.
    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await?;
        for (i, step) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            sqlx::raw_sql(step).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))")
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Bumps the catalogue version, logs what changed under it and trims the log. Called last
    /// in the transaction of every catalogue mutation.
    async fn bump_version(
        tx: &mut sqlx::SqliteConnection,
        changed: &[Changed<'_>],
    ) -> Result<(), StoreError> {
        let version: i64 = sqlx::query_scalar(
            "UPDATE meta SET value = value + 1 WHERE key = 'catalog_version' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?;
        for change in changed {
            let (tier, workspace, key) = change.columns();
            sqlx::query(
                "INSERT INTO catalog_changes (version, tier, workspace_id, key_id) VALUES (?, ?, ?, ?)",
            )
            .bind(version)
            .bind(tier)
            .bind(workspace)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM catalog_changes WHERE version <= ?")
            .bind(version - CHANGE_LOG_KEEP)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Writes an audit row; called in the transaction of the change it records.
    async fn audit(tx: &mut sqlx::SqliteConnection, row: AuditRow<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, workspace_id, target, before_json, after_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(row.at)
        .bind(row.by.as_str())
        .bind(row.action.as_str())
        .bind(row.workspace)
        .bind(&row.target)
        .bind(row.before.as_deref())
        .bind(row.after.as_deref())
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Writes an event and its deliveries into the outbox; called in the transaction of the
    /// change that causes it. `false` when its dedupe key was already written.
    async fn enqueue(
        tx: &mut sqlx::SqliteConnection,
        event: &WebhookEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(INSERT_EVENT_SQL)
            .bind(&event.id)
            .bind(event.workspace)
            .bind(&event.kind)
            .bind(&event.payload)
            .bind(event.dedupe.as_deref())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        sqlx::query(INSERT_DELIVERIES_SQL)
            .bind(&event.id)
            .bind(now)
            .bind(format!("%,{},%", event.kind))
            .bind(event.workspace)
            .execute(&mut *tx)
            .await?;
        Ok(true)
    }

    async fn tier_exists(tx: &mut sqlx::SqliteConnection, tier: &str) -> Result<(), StoreError> {
        let exists: Option<String> = sqlx::query_scalar("SELECT name FROM tiers WHERE name = ?")
            .bind(tier)
            .fetch_optional(tx)
            .await?;
        match exists {
            Some(_) => Ok(()),
            None => Err(StoreError::Invalid(format!("unknown tier '{tier}'"))),
        }
    }
}

fn tier_row(row: &SqliteRow) -> Result<Tier, StoreError> {
    let (enforcement, shadow) = tier_shadowing_of(row.try_get("shadowing")?)?;
    Ok(Tier {
        name: row.try_get("name")?,
        rank: rank_of(row.try_get("rank")?)?,
        limits: parse_json::<Limits>(row.try_get("limits")?, "tiers.limits")?,
        promotion: row
            .try_get::<Option<String>, _>("promotion")?
            .map(|p| parse_json(&p, "tiers.promotion"))
            .transpose()?,
        enforcement,
        shadow,
    })
}

fn workspace_row(row: &SqliteRow) -> Result<Workspace, StoreError> {
    let status: String = row.try_get("status")?;
    let (enforcement, shadow) = workspace_shadowing_of(row.try_get("shadowing")?)?;
    Ok(Workspace {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        tier: row.try_get("tier")?,
        overrides: parse_json(row.try_get("overrides")?, "workspaces.overrides")?,
        status: WorkspaceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("workspaces.status: {status}")))?,
        created_at: row.try_get("created_at")?,
        pinned: row.try_get("pinned")?,
        attributes: parse_json(row.try_get("attributes")?, "workspaces.attributes")?,
        promoted: row
            .try_get::<Option<String>, _>("promoted")?
            .map(|p| parse_json(&p, "workspaces.promoted"))
            .transpose()?,
        budget: parse_json(row.try_get("budget")?, "workspaces.budget")?,
        enforcement,
        shadow,
    })
}

fn key_row(row: &SqliteRow) -> Result<ApiKey, StoreError> {
    let hash: Vec<u8> = row.try_get("hash")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        workspace_id: row.try_get("workspace_id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        hash: hash
            .try_into()
            .map_err(|_| StoreError::Corrupt("api_keys.hash length".into()))?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
        limits: parse_json(row.try_get("limits")?, "api_keys.limits")?,
    })
}

fn limit_request_row(row: &SqliteRow) -> Result<LimitRequest, StoreError> {
    let status: String = row.try_get("status")?;
    let granted: Option<String> = row.try_get("granted_limits")?;
    Ok(LimitRequest {
        id: row.try_get("id")?,
        workspace_id: row.try_get("workspace_id")?,
        use_case: row.try_get("use_case")?,
        expected_volume: row.try_get("expected_volume")?,
        requested_limits: parse_json(row.try_get("requested_limits")?, "requested_limits")?,
        status: LimitRequestStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("limit_requests.status: {status}")))?,
        granted_limits: granted
            .map(|g| parse_json(&g, "granted_limits"))
            .transpose()?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
        decided_at: row.try_get("decided_at")?,
    })
}

const KEY_COLUMNS: &str =
    "id, workspace_id, name, prefix, hash, created_at, expires_at, revoked_at, last_used_at, limits";

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // Its busy timeout: a call waits no longer for the file's lock.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.pool.close()).await;
    }

    async fn console_secret(&self, candidate: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO secrets (name, value) VALUES ('console_session', ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&candidate[..])
        .execute(&mut *tx)
        .await?;
        let value: Vec<u8> =
            sqlx::query_scalar("SELECT value FROM secrets WHERE name = 'console_session'")
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(value)
    }

    async fn catalog_version(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'catalog_version'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn load_catalog(&self) -> Result<CatalogData, StoreError> {
        // One read transaction, so the version matches what was read.
        let mut tx = self.pool.begin().await?;
        let version: i64 =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'catalog_version'")
                .fetch_one(&mut *tx)
                .await?;
        let tiers = sqlx::query("SELECT name, rank, limits, promotion, shadowing FROM tiers")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(tier_row)
            .collect::<Result<_, _>>()?;
        let workspaces = sqlx::query("SELECT * FROM workspaces")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(workspace_row)
            .collect::<Result<_, _>>()?;
        let keys = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL"
        ))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(key_row)
        .collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok(CatalogData {
            version,
            tiers,
            workspaces,
            keys,
        })
    }

    async fn catalog_changes(&self, since: i64) -> Result<CatalogChanges, StoreError> {
        // One read transaction: the log and the rows from the same snapshot.
        let mut tx = self.pool.begin().await?;
        let (version, log_from, logged): (i64, Option<i64>, i64) = sqlx::query_as(CHANGE_LOG_SQL)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?;
        if !log_covers(since, version, log_from, logged) {
            return Ok(CatalogChanges::TooOld);
        }
        let mut delta = CatalogDelta {
            version,
            ..CatalogDelta::default()
        };
        if since == version {
            return Ok(CatalogChanges::Since(delta));
        }
        delta.tiers = sqlx::query(
            "SELECT name, rank, limits, promotion, shadowing FROM tiers WHERE name IN (SELECT tier FROM catalog_changes WHERE version > ?) ORDER BY name",
        )
        .bind(since)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(tier_row)
        .collect::<Result<_, _>>()?;
        delta.workspaces = sqlx::query(
            "SELECT * FROM workspaces WHERE id IN (SELECT workspace_id FROM catalog_changes WHERE version > ?) ORDER BY id",
        )
        .bind(since)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(workspace_row)
        .collect::<Result<_, _>>()?;
        delta.keys = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id IN (SELECT key_id FROM catalog_changes WHERE version > ?) ORDER BY id"
        ))
        .bind(since)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(key_row)
        .collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok(CatalogChanges::Since(delta))
    }

    async fn list_tiers(&self) -> Result<Vec<Tier>, StoreError> {
        sqlx::query("SELECT name, rank, limits, promotion, shadowing FROM tiers ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(tier_row)
            .collect()
    }

    async fn put_tier(&self, tier: &Tier, by: &Actor, now: i64) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let before = sqlx::query(
            "SELECT name, rank, limits, promotion, shadowing FROM tiers WHERE name = ?",
        )
        .bind(&tier.name)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(tier_row)
        .transpose()?;
        sqlx::query(
            "INSERT INTO tiers (name, rank, limits, promotion, shadowing) VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET rank = excluded.rank, limits = excluded.limits, promotion = excluded.promotion, shadowing = excluded.shadowing",
        )
        .bind(&tier.name)
        .bind(tier.rank.map(i64::from))
        .bind(json(&tier.limits))
        .bind(tier.promotion.as_ref().map(json))
        .bind(tier_shadowing_column(tier))
        .execute(&mut *tx)
        .await?;
        // A tier put as it was is no change to audit (as a workspace's; an outside audit).
        if before.as_ref() != Some(tier) {
            Self::audit(&mut tx, AuditRow::tier(by, now, tier, before)).await?;
        }
        Self::bump_version(&mut tx, &[Changed::Tier(&tier.name)]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn seed_tiers(&self, tiers: &[Tier]) -> Result<usize, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut inserted = Vec::new();
        for tier in tiers {
            let n = sqlx::query(
                "INSERT INTO tiers (name, rank, limits, promotion, shadowing) VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING",
            )
            .bind(&tier.name)
            .bind(tier.rank.map(i64::from))
            .bind(json(&tier.limits))
            .bind(tier.promotion.as_ref().map(json))
            .bind(tier_shadowing_column(tier))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                inserted.push(Changed::Tier(&tier.name));
            }
        }
        if !inserted.is_empty() {
            Self::bump_version(&mut tx, &inserted).await?;
        }
        tx.commit().await?;
        Ok(inserted.len())
    }

    async fn create_workspace(
        &self,
        name: &str,
        tier: &str,
        by: &Actor,
        now: i64,
    ) -> Result<Workspace, StoreError> {
        let mut tx = self.write_tx().await?;
        Self::tier_exists(&mut tx, tier).await?;
        let row = sqlx::query(
            "INSERT INTO workspaces (name, tier, created_at) VALUES (?, ?, ?) RETURNING *",
        )
        .bind(name)
        .bind(tier)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let workspace = workspace_row(&row)?;
        let audit =
            AuditRow::workspace_change(by, now, AuditAction::WorkspaceCreate, None, &workspace);
        Self::audit(&mut tx, audit).await?;
        Self::bump_version(&mut tx, &[Changed::Workspace(workspace.id)]).await?;
        tx.commit().await?;
        Ok(workspace)
    }

    async fn list_workspaces(&self) -> Result<Vec<Workspace>, StoreError> {
        sqlx::query("SELECT * FROM workspaces ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(workspace_row)
            .collect()
    }

    async fn search_workspaces(&self, query: &WorkspaceQuery) -> Result<WorkspacePage, StoreError> {
        let (count, page) = workspace_search_sql(query, "");
        let pattern = search_pattern(&query.search);
        let (from, to) = month_range(query.month);
        // One read transaction: the count and the page from the same snapshot.
        let mut tx = self.pool.begin().await?;
        let total: i64 = sqlx::query_scalar(&count)
            .bind(&pattern)
            .fetch_one(&mut *tx)
            .await?;
        let rows = sqlx::query(&page)
            .bind(&pattern)
            .bind(&from)
            .bind(&to)
            .bind(i64::from(query.limit))
            .bind(i64::try_from(query.offset).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| {
                Ok(WorkspaceListed {
                    workspace: workspace_row(row)?,
                    tokens_this_month: row.try_get::<i64, _>("month_tokens")?.max(0) as u64,
                    requests_this_month: row.try_get::<i64, _>("month_requests")?.max(0) as u64,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        tx.commit().await?;
        Ok(WorkspacePage {
            total: total.max(0) as u64,
            rows,
        })
    }

    async fn get_workspace(&self, id: WorkspaceId) -> Result<Workspace, StoreError> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        workspace_row(&row)
    }

    async fn update_workspace(
        &self,
        id: WorkspaceId,
        change: &WorkspaceChange,
        by: &Actor,
        now: i64,
    ) -> Result<Workspace, StoreError> {
        let WorkspaceChange {
            tier,
            overrides,
            status,
            pinned,
            attributes,
            promoted,
            budget,
            enforcement: _,
            shadow: _,
        } = change;
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT * FROM workspaces WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let current = workspace_row(&row)?;
        if let Some(p) = promoted {
            promotion_holds(&current, p)?;
        }
        let tier = promoted.as_ref().map(|p| &p.to).or(tier.as_ref());
        if let Some(tier) = tier {
            Self::tier_exists(&mut tx, tier).await?;
        }
        let new_overrides = overrides.apply(&current.overrides);
        new_overrides
            .validate()
            .map_err(|m| StoreError::Invalid(format!("limits: {m}")))?;
        let row = sqlx::query(
            "UPDATE workspaces SET tier = ?, overrides = ?, status = ?, pinned = ?, attributes = ?, promoted = ?, budget = ?, shadowing = ? WHERE id = ? RETURNING *",
        )
        .bind(tier.unwrap_or(&current.tier))
        .bind(json(&new_overrides))
        .bind(status.unwrap_or(current.status).as_str())
        .bind(pinned.unwrap_or(current.pinned))
        .bind(json(attributes.as_ref().unwrap_or(&current.attributes)))
        .bind(promoted.as_ref().or(current.promoted.as_ref()).map(json))
        .bind(json(budget.as_ref().unwrap_or(&current.budget)))
        .bind(workspace_shadowing_column(&current, change))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let updated = workspace_row(&row)?;
        let action = match promoted {
            Some(_) => AuditAction::WorkspacePromote,
            None => AuditAction::WorkspaceUpdate,
        };
        // A change that changes nothing (the tier it is on, a status it has) is no change to
        // audit (an outside audit: entries whose before and after were the same).
        if updated != current {
            let audit = AuditRow::workspace_change(by, now, action, Some(&current), &updated);
            Self::audit(&mut tx, audit).await?;
        }
        for event in workspace_events(&current, &updated, now) {
            Self::enqueue(&mut tx, &event, now).await?;
        }
        Self::bump_version(&mut tx, &[Changed::Workspace(id)]).await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn create_key(&self, key: &NewKey, by: &Actor, now: i64) -> Result<ApiKey, StoreError> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (workspace_id, name, prefix, hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING {KEY_COLUMNS}"
        ))
        .bind(key.workspace)
        .bind(key.name.as_deref())
        .bind(&key.prefix)
        .bind(&key.hash[..])
        .bind(now)
        .bind(key.expires_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound,
            e => e.into(),
        })?;
        let key = key_row(&row)?;
        Self::audit(
            &mut tx,
            AuditRow::key(by, now, AuditAction::KeyCreate, None, &key),
        )
        .await?;
        Self::bump_version(&mut tx, &[Changed::Key(key.id)]).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn list_keys(&self, workspace: WorkspaceId) -> Result<Vec<ApiKey>, StoreError> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE workspace_id = ? ORDER BY id"
        ))
        .bind(workspace)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(key_row)
        .collect()
    }

    async fn find_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?"
        ))
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(key_row)
        .transpose()
    }

    async fn revoke_key(&self, id: KeyId, by: &Actor, now: i64) -> Result<ApiKey, StoreError> {
        let mut tx = self.write_tx().await?;
        let before = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let before = key_row(&before)?;
        if before.revoked_at.is_some() {
            // Already revoked: nothing changes, so nothing is recorded.
            return Ok(before);
        }
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING {KEY_COLUMNS}"
        ))
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let key = key_row(&row)?;
        Self::audit(
            &mut tx,
            AuditRow::key(by, now, AuditAction::KeyRevoke, Some(&before), &key),
        )
        .await?;
        Self::bump_version(&mut tx, &[Changed::Key(id)]).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn get_key(&self, id: KeyId) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        key_row(&row)
    }

    async fn set_key_limits(
        &self,
        id: KeyId,
        limits: &KeyLimits,
        by: &Actor,
        now: i64,
    ) -> Result<ApiKey, StoreError> {
        let mut tx = self.write_tx().await?;
        let before = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let before = key_row(&before)?;
        if before.revoked_at.is_some() {
            return Err(revoked(id));
        }
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET limits = ? WHERE id = ? RETURNING {KEY_COLUMNS}"
        ))
        .bind(json(limits))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let key = key_row(&row)?;
        Self::audit(
            &mut tx,
            AuditRow::key(by, now, AuditAction::KeyLimits, Some(&before), &key),
        )
        .await?;
        Self::bump_version(&mut tx, &[Changed::Key(id)]).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut used = used.to_vec();
        used.sort_unstable();
        let mut tx = self.write_tx().await?;
        for (id, at) in used {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_usage(&self, batch: &LedgerBatch, now: i64) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let new = sqlx::query(
            "INSERT INTO ledger_batches (id, written_at) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
        )
        .bind(&batch.id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if new == 0 {
            // Written before: the transaction is rolled back when dropped.
            return Ok(false);
        }
        for row in &batch.rows {
            sqlx::query(
                "INSERT INTO usage_daily (workspace_id, day, model, requests, tokens, denied, shadow_denied, shadow_denied_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(workspace_id, day, model) DO UPDATE SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens, denied = denied + excluded.denied, shadow_denied = shadow_denied + excluded.shadow_denied, shadow_denied_tokens = shadow_denied_tokens + excluded.shadow_denied_tokens",
            )
            .bind(row.workspace)
            .bind(&row.day)
            .bind(&row.model)
            .bind(row.requests as i64)
            .bind(row.tokens as i64)
            .bind(row.denied as i64)
            .bind(row.shadow_denied as i64)
            .bind(row.shadow_denied_tokens as i64)
            .execute(&mut *tx)
            .await?;
            for counter in row.counter.iter().chain(&row.shadow_counter) {
                if row.requests > 0 || row.tokens > 0 {
                    sqlx::query(
                        "INSERT INTO usage_counted (counter, workspace_id, day, model, requests, tokens) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(counter, workspace_id, day, model) DO UPDATE SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens",
                    )
                    .bind(counter)
                    .bind(row.workspace)
                    .bind(&row.day)
                    .bind(&row.model)
                    .bind(row.requests as i64)
                    .bind(row.tokens as i64)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        for row in &batch.hours {
            sqlx::query(
                "INSERT INTO usage_hourly (workspace_id, hour, requests, denied, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(workspace_id, hour) DO UPDATE SET requests = requests + excluded.requests, denied = denied + excluded.denied, prompt_tokens = prompt_tokens + excluded.prompt_tokens, completion_tokens = completion_tokens + excluded.completion_tokens",
            )
            .bind(row.workspace)
            .bind(row.hour)
            .bind(row.requests as i64)
            .bind(row.denied as i64)
            .bind(row.prompt_tokens as i64)
            .bind(row.completion_tokens as i64)
            .execute(&mut *tx)
            .await?;
        }
        for row in &batch.keys {
            sqlx::query(
                "INSERT INTO usage_daily_by_key (workspace_id, day, key_id, requests, tokens, denied) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(workspace_id, day, key_id) DO UPDATE SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens, denied = denied + excluded.denied",
            )
            .bind(row.workspace)
            .bind(&row.day)
            .bind(row.key)
            .bind(row.requests as i64)
            .bind(row.tokens as i64)
            .bind(row.denied as i64)
            .execute(&mut *tx)
            .await?;
            if let Some(counter) = &row.counter {
                if row.requests > 0 || row.tokens > 0 {
                    sqlx::query(
                        "INSERT INTO usage_counted_by_key (counter, workspace_id, day, key_id, requests, tokens) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(counter, workspace_id, day, key_id) DO UPDATE SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens",
                    )
                    .bind(counter)
                    .bind(row.workspace)
                    .bind(&row.day)
                    .bind(row.key)
                    .bind(row.requests as i64)
                    .bind(row.tokens as i64)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding_counter: Option<&str>,
    ) -> Result<MonthTotals, StoreError> {
        let (from, to) = month_range(month);
        let rows: Vec<MonthTotalsRow> = sqlx::query_as(MONTH_TOTALS_SQL)
            .bind(workspace)
            .bind(&from)
            .bind(&to)
            .bind(excluding_counter)
            .fetch_all(&self.pool)
            .await?;
        Ok(month_totals_of(month, rows))
    }

    async fn tokens_since(
        &self,
        workspaces: &[WorkspaceId],
        from: &str,
    ) -> Result<Vec<(WorkspaceId, u64)>, StoreError> {
        let ids = serde_json::to_string(workspaces).expect("ids serialize");
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT workspace_id, CAST(SUM(tokens) AS INTEGER) FROM usage_daily WHERE day >= ? AND workspace_id IN (SELECT value FROM json_each(?)) GROUP BY workspace_id ORDER BY workspace_id",
        )
        .bind(from)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(w, t)| (w, t.max(0) as u64))
            .collect())
    }

    async fn daily_usage(
        &self,
        workspace: WorkspaceId,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        sqlx::query(
            "SELECT day, model, requests, tokens, denied, shadow_denied FROM usage_daily WHERE workspace_id = ? AND day >= ? AND day <= ? ORDER BY day, model",
        )
        .bind(workspace)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(DailyUsage {
                day: row.try_get("day")?,
                model: row.try_get("model")?,
                requests: row.try_get::<i64, _>("requests")? as u64,
                tokens: row.try_get::<i64, _>("tokens")? as u64,
                denied: row.try_get::<i64, _>("denied")? as u64,
                shadow_denied: row.try_get::<i64, _>("shadow_denied")? as u64,
            })
        })
        .collect()
    }

    async fn shadow_denied_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
    ) -> Result<MonthTotals, StoreError> {
        let (from, to) = month_range(month);
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(SHADOW_DENIED_SQL)
            .bind(workspace)
            .bind(&from)
            .bind(&to)
            .fetch_all(&self.pool)
            .await?;
        Ok(month_totals_of(
            month,
            rows.into_iter().map(|(m, t, r)| (Some(m), None, t, r)),
        ))
    }

    async fn hourly_usage(
        &self,
        workspace: WorkspaceId,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourRow>, StoreError> {
        let rows: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT hour, requests, denied, prompt_tokens, completion_tokens FROM usage_hourly WHERE workspace_id = ? AND hour >= ? AND hour < ? ORDER BY hour",
        )
        .bind(workspace)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| hour_row(workspace, row))
            .collect())
    }

    async fn key_usage(
        &self,
        workspace: WorkspaceId,
        from: &str,
        to: &str,
    ) -> Result<Vec<KeyUsage>, StoreError> {
        let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(KEY_USAGE_SQL)
            .bind(workspace)
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(key_usage_row).collect())
    }

    async fn prune_ledger(
        &self,
        before: i64,
        counted_before_day: &str,
        hours_before: i64,
    ) -> Result<u64, StoreError> {
        // Each batch of rows is its own short transaction, so writers wait at most one batch.
        let batches = "DELETE FROM ledger_batches WHERE rowid IN (SELECT rowid FROM ledger_batches WHERE written_at < ? LIMIT ?)";
        let events = "DELETE FROM usage_events WHERE rowid IN (SELECT rowid FROM usage_events WHERE settled_at < ? LIMIT ?)";
        let hours = "DELETE FROM usage_hourly WHERE rowid IN (SELECT rowid FROM usage_hourly WHERE hour < ? LIMIT ?)";
        let counted = "DELETE FROM usage_counted WHERE rowid IN (SELECT rowid FROM usage_counted WHERE day < ? LIMIT ?)";
        let counted_by_key = "DELETE FROM usage_counted_by_key WHERE rowid IN (SELECT rowid FROM usage_counted_by_key WHERE day < ? LIMIT ?)";
        let pool = &self.pool;
        let mut pruned = 0;
        for (sql, bound) in [(batches, before), (events, before), (hours, hours_before)] {
            pruned += prune_in_batches(move || async move {
                Ok(sqlx::query(sql)
                    .bind(bound)
                    .bind(PRUNE_BATCH)
                    .execute(pool)
                    .await?
                    .rows_affected())
            })
            .await?;
        }
        for sql in [counted, counted_by_key] {
            pruned += prune_in_batches(move || async move {
                Ok(sqlx::query(sql)
                    .bind(counted_before_day)
                    .bind(PRUNE_BATCH)
                    .execute(pool)
                    .await?
                    .rows_affected())
            })
            .await?;
        }
        Ok(pruned)
    }

    async fn create_limit_request(
        &self,
        workspace: WorkspaceId,
        use_case: &str,
        expected_volume: Option<&str>,
        requested: &Overrides,
        most_pending: usize,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError> {
        // BEGIN IMMEDIATE: writers one at a time, so the count holds until the insert.
        let mut tx = self.write_tx().await?;
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM limit_requests WHERE workspace_id = ? AND status = 'pending'",
        )
        .bind(workspace)
        .fetch_one(&mut *tx)
        .await?;
        if pending as usize >= most_pending {
            return Err(StoreError::Conflict(format!("{pending} pending")));
        }
        let row = sqlx::query(
            "INSERT INTO limit_requests (workspace_id, use_case, expected_volume, requested_limits, created_at) VALUES (?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(workspace)
        .bind(use_case)
        .bind(expected_volume)
        .bind(json(requested))
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound,
            e => e.into(),
        })?;
        let request = limit_request_row(&row)?;
        let audit = AuditRow::limit_request(
            by,
            now,
            AuditAction::LimitRequestCreate,
            None,
            serde_json::to_value(&request).expect("plain data serializes"),
            &request,
        );
        Self::audit(&mut tx, audit).await?;
        let event = limit_request_event("limit_request.created", &request, now);
        Self::enqueue(&mut tx, &event, now).await?;
        tx.commit().await?;
        Ok(request)
    }

    async fn list_limit_requests(
        &self,
        workspace: Option<WorkspaceId>,
        status: Option<LimitRequestStatus>,
    ) -> Result<Vec<LimitRequest>, StoreError> {
        sqlx::query(
            "SELECT * FROM limit_requests WHERE (?1 IS NULL OR workspace_id = ?1) AND (?2 IS NULL OR status = ?2) ORDER BY id",
        )
        .bind(workspace)
        .bind(status.map(|s| s.as_str()))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(limit_request_row)
        .collect()
    }

    async fn approve_limit_request(
        &self,
        id: LimitRequestId,
        granted: Option<&Overrides>,
        note: Option<&str>,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT * FROM limit_requests WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let request = limit_request_row(&row)?;
        if request.status != LimitRequestStatus::Pending {
            return Err(already_decided(id, request.status));
        }
        let (current, tier): (String, String) = sqlx::query_as(
            "SELECT w.overrides, t.limits FROM workspaces w JOIN tiers t ON t.name = w.tier WHERE w.id = ?",
        )
        .bind(request.workspace_id)
        .fetch_one(&mut *tx)
        .await?;
        let before: Overrides = parse_json(&current, "workspaces.overrides")?;
        let tier: Limits = parse_json(&tier, "tiers.limits")?;
        approval_lowers(granted, &request.requested_limits, &before, &tier)?;
        let granted = granted
            .unwrap_or(&request.requested_limits)
            .with_burst_kept_up(&before, &tier);
        let mut overrides = before.clone();
        overrides.merge(&granted);
        overrides
            .validate()
            .map_err(|m| StoreError::Invalid(format!("limits: {m}")))?;
        let row = sqlx::query(
            "UPDATE limit_requests SET status = 'approved', granted_limits = ?, reason = ?, decided_at = ? WHERE id = ? RETURNING *",
        )
        .bind(json(&granted))
        .bind(note)
        .bind(now)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE workspaces SET overrides = ? WHERE id = ?")
            .bind(json(&overrides))
            .bind(request.workspace_id)
            .execute(&mut *tx)
            .await?;
        let approved = limit_request_row(&row)?;
        let audit = AuditRow::limit_request(
            by,
            now,
            AuditAction::LimitRequestApprove,
            Some(approval_state(&request, &before)),
            approval_state(&approved, &overrides),
            &approved,
        );
        Self::audit(&mut tx, audit).await?;
        let event = limit_request_event("limit_request.decided", &approved, now);
        Self::enqueue(&mut tx, &event, now).await?;
        Self::bump_version(&mut tx, &[Changed::Workspace(request.workspace_id)]).await?;
        tx.commit().await?;
        Ok(approved)
    }

    async fn close_limit_request(
        &self,
        id: LimitRequestId,
        closing: Closing<'_>,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT * FROM limit_requests WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let request = limit_request_row(&row)?;
        closing.may_close(request.workspace_id)?;
        if request.status != LimitRequestStatus::Pending {
            return Err(already_decided(id, request.status));
        }
        let row = sqlx::query(
            "UPDATE limit_requests SET status = ?, reason = ?, decided_at = ? WHERE id = ? RETURNING *",
        )
        .bind(closing.status().as_str())
        .bind(closing.reason())
        .bind(now)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let closed = limit_request_row(&row)?;
        let audit = AuditRow::limit_request(
            by,
            now,
            closing.action(),
            Some(serde_json::to_value(&request).expect("plain data serializes")),
            serde_json::to_value(&closed).expect("plain data serializes"),
            &closed,
        );
        Self::audit(&mut tx, audit).await?;
        let event = limit_request_event(closing.event(), &closed, now);
        Self::enqueue(&mut tx, &event, now).await?;
        tx.commit().await?;
        Ok(closed)
    }

    async fn get_limit_request(
        &self,
        id: LimitRequestId,
    ) -> Result<Option<LimitRequest>, StoreError> {
        sqlx::query("SELECT * FROM limit_requests WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(limit_request_row)
            .transpose()
    }

    async fn create_webhook(
        &self,
        webhook: &NewWebhook,
        most_per_workspace: usize,
        by: &Actor,
        now: i64,
    ) -> Result<WebhookEndpoint, StoreError> {
        // BEGIN IMMEDIATE: writers one at a time, so the count holds until the insert.
        let mut tx = self.write_tx().await?;
        if let Some(w) = webhook.workspace {
            let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM workspaces WHERE id = ?")
                .bind(w)
                .fetch_optional(&mut *tx)
                .await?;
            exists.ok_or(StoreError::NotFound)?;
            let held: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM webhook_endpoints WHERE workspace_id = ?")
                    .bind(w)
                    .fetch_one(&mut *tx)
                    .await?;
            if held as usize >= most_per_workspace {
                return Err(StoreError::Conflict(format!("{held} endpoints")));
            }
        }
        let endpoint = sqlx::query_as(&format!(
            "INSERT INTO webhook_endpoints (workspace_id, url, events, secret, created_at) VALUES (?, ?, ?, ?, ?) RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(webhook.workspace)
        .bind(&webhook.url)
        .bind(events_column(&webhook.events))
        .bind(&webhook.secret)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map(webhook_endpoint)?;
        let audit = AuditRow::webhook(by, now, AuditAction::WebhookCreate, &endpoint);
        Self::audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(endpoint)
    }

    async fn list_webhooks(
        &self,
        workspace: Option<WorkspaceId>,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        let rows = sqlx::query_as(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE (?1 IS NULL OR workspace_id = ?1) ORDER BY id"
        ))
        .bind(workspace)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(webhook_endpoint).collect())
    }

    async fn delete_webhook(
        &self,
        id: WebhookId,
        workspace: Option<WorkspaceId>,
        by: &Actor,
        now: i64,
    ) -> Result<WebhookEndpoint, StoreError> {
        let mut tx = self.write_tx().await?;
        let endpoint = sqlx::query_as(&format!(
            "DELETE FROM webhook_endpoints WHERE id = ?1 AND (?2 IS NULL OR workspace_id = ?2) RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(id)
        .bind(workspace)
        .fetch_optional(&mut *tx)
        .await?
        .map(webhook_endpoint)
        .ok_or(StoreError::NotFound)?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE endpoint_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let audit = AuditRow::webhook(by, now, AuditAction::WebhookDelete, &endpoint);
        Self::audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(endpoint)
    }

    async fn redeliver(
        &self,
        endpoint: WebhookId,
        event_id: &str,
        workspace: Option<WorkspaceId>,
        by: &Actor,
        now: i64,
    ) -> Result<DeliveryRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let found: WebhookEndpoint = sqlx::query_as(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints WHERE id = ?1 AND (?2 IS NULL OR workspace_id = ?2)"
        ))
        .bind(endpoint)
        .bind(workspace)
        .fetch_optional(&mut *tx)
        .await?
        .map(webhook_endpoint)
        .ok_or(StoreError::NotFound)?;
        let before = sqlx::query_as::<_, DeliveryColumns>(DELIVERY_SQL)
            .bind(endpoint)
            .bind(event_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(delivery_record)
            .ok_or(StoreError::NotFound)?;
        if before.status != "failed" {
            return Err(StoreError::Conflict(format!(
                "the delivery of {event_id} is {}: only a failed one is sent again",
                before.status
            )));
        }
        sqlx::query(REDELIVER_SQL)
            .bind(endpoint)
            .bind(event_id)
            .bind(now.saturating_mul(1000))
            .execute(&mut *tx)
            .await?;
        Self::audit(&mut tx, AuditRow::redelivery(by, now, &found, &before)).await?;
        let after = sqlx::query_as::<_, DeliveryColumns>(DELIVERY_SQL)
            .bind(endpoint)
            .bind(event_id)
            .fetch_one(&mut *tx)
            .await
            .map(delivery_record)?;
        tx.commit().await?;
        Ok(after)
    }

    async fn webhook_deliveries(
        &self,
        endpoint: WebhookId,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT id FROM webhook_endpoints WHERE id = ?")
                .bind(endpoint)
                .fetch_optional(&self.pool)
                .await?;
        exists.ok_or(StoreError::NotFound)?;
        let rows: Vec<DeliveryColumns> = sqlx::query_as(DELIVERIES_SQL)
            .bind(endpoint)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(delivery_record).collect())
    }

    async fn enqueue_event(&self, event: &WebhookEvent, now: i64) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let written = Self::enqueue(&mut tx, event, now).await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn claim_deliveries(
        &self,
        now_ms: i64,
        lock_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        // Most polls find nothing due: they read, and take no write lock from the ledger writer.
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?1 AND (locked_until IS NULL OR locked_until <= ?1) LIMIT 1",
        )
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let claim = claim_token();
        let mut tx = self.write_tx().await?;
        let claimed = sqlx::query(
            "UPDATE webhook_deliveries SET locked_until = ?1, claim = ?4 WHERE id IN (WITH busy AS (SELECT endpoint_id, COUNT(*) AS c FROM webhook_deliveries WHERE status = 'pending' AND locked_until > ?2 GROUP BY endpoint_id), due AS (SELECT id, endpoint_id, next_attempt_at, ROW_NUMBER() OVER (PARTITION BY endpoint_id ORDER BY next_attempt_at, id) AS n FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?2 AND (locked_until IS NULL OR locked_until <= ?2)) SELECT due.id FROM due LEFT JOIN busy ON busy.endpoint_id = due.endpoint_id WHERE due.n + COALESCE(busy.c, 0) <= ?5 ORDER BY due.next_attempt_at, due.id LIMIT ?3)",
        )
        .bind(lock_until_ms)
        .bind(now_ms)
        .bind(limit as i64)
        .bind(&claim)
        .bind(MOST_IN_FLIGHT_PER_ENDPOINT)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let rows: Vec<ClaimedColumns> = sqlx::query_as(CLAIMED_SQL)
            .bind(&claim)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(due_delivery).collect())
    }

    async fn finish_delivery(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError> {
        let (status, last_status, last_error, next) = outcome_columns(outcome);
        sqlx::query(FINISH_SQL)
            .bind(status)
            .bind(last_status)
            .bind(last_error)
            .bind(next)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn prune_webhooks(&self, before: i64, keys_before: i64) -> Result<u64, StoreError> {
        let pool = &self.pool;
        let deliveries = prune_in_batches(move || async move {
            Ok(sqlx::query(PRUNE_DELIVERIES_SQL)
                .bind(before)
                .bind(PRUNE_BATCH)
                .execute(pool)
                .await?
                .rows_affected())
        })
        .await?;
        let events = prune_in_batches(move || async move {
            Ok(sqlx::query(PRUNE_EVENTS_SQL)
                .bind(before)
                .bind(PRUNE_BATCH)
                .bind(keys_before)
                .execute(pool)
                .await?
                .rows_affected())
        })
        .await?;
        Ok(deliveries + events)
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let rows: Vec<AuditColumns> = sqlx::query_as(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE (?1 IS NULL OR workspace_id = ?1) AND (?2 IS NULL OR actor = ?2) AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR at >= ?4) AND (?5 IS NULL OR at < ?5) AND (?6 IS NULL OR id < ?6) ORDER BY id DESC LIMIT ?7"
        ))
        .bind(filter.workspace)
        .bind(filter.actor.as_deref())
        .bind(filter.action.map(|a| a.as_str()))
        .bind(filter.from)
        .bind(filter.to)
        .bind(filter.after)
        .bind(filter.limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(audit_entry).collect()
    }
}
