//! The embedded store: one SQLite file in WAL mode, created and migrated on open.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::{CatalogData, DailyUsage, NewKey, Store, StoreError, UsageRecord, WorkspaceChange};
use crate::limiter::{MonthKey, MonthTotals};
use crate::model::{
    ApiKey, KeyId, LimitRequest, LimitRequestId, LimitRequestStatus, Limits, Overrides, Tier,
    Workspace, WorkspaceId, WorkspaceStatus,
};

/// Schema steps, applied in order once each. Never edit a step that has shipped; add one.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database at `url` (`sqlite://PATH`).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
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

    async fn bump_version(tx: &mut sqlx::SqliteConnection) -> Result<(), StoreError> {
        sqlx::query("UPDATE meta SET value = value + 1 WHERE key = 'catalog_version'")
            .execute(tx)
            .await?;
        Ok(())
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn tier_row(row: &SqliteRow) -> Result<Tier, StoreError> {
    Ok(Tier {
        name: row.try_get("name")?,
        limits: parse_json::<Limits>(row.try_get("limits")?, "tiers.limits")?,
    })
}

fn workspace_row(row: &SqliteRow) -> Result<Workspace, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Workspace {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        tier: row.try_get("tier")?,
        overrides: parse_json(row.try_get("overrides")?, "workspaces.overrides")?,
        status: WorkspaceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("workspaces.status: {status}")))?,
        created_at: row.try_get("created_at")?,
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
    })
}

fn limit_request_row(row: &SqliteRow) -> Result<LimitRequest, StoreError> {
    let status: String = row.try_get("status")?;
    let granted: Option<String> = row.try_get("granted_limits")?;
    Ok(LimitRequest {
        id: row.try_get("id")?,
        workspace_id: row.try_get("workspace_id")?,
        use_case: row.try_get("use_case")?,
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
    "id, workspace_id, name, prefix, hash, created_at, expires_at, revoked_at, last_used_at";

fn month_range(month: MonthKey) -> (String, String) {
    (month.first_day(), month.next().first_day())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
        let tiers = sqlx::query("SELECT name, limits FROM tiers")
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

    async fn list_tiers(&self) -> Result<Vec<Tier>, StoreError> {
        sqlx::query("SELECT name, limits FROM tiers ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(tier_row)
            .collect()
    }

    async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tiers (name, limits) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET limits = excluded.limits",
        )
        .bind(&tier.name)
        .bind(json(&tier.limits))
        .execute(&mut *tx)
        .await?;
        Self::bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn seed_tiers(&self, tiers: &[Tier]) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for tier in tiers {
            inserted += sqlx::query(
                "INSERT INTO tiers (name, limits) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
            )
            .bind(&tier.name)
            .bind(json(&tier.limits))
            .execute(&mut *tx)
            .await?
            .rows_affected() as usize;
        }
        if inserted > 0 {
            Self::bump_version(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn create_workspace(
        &self,
        name: &str,
        tier: &str,
        now: i64,
    ) -> Result<Workspace, StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT name FROM tiers WHERE name = ?")
            .bind(tier)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::Invalid(format!("unknown tier '{tier}'")));
        }
        let row = sqlx::query(
            "INSERT INTO workspaces (name, tier, created_at) VALUES (?, ?, ?) RETURNING *",
        )
        .bind(name)
        .bind(tier)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        Self::bump_version(&mut tx).await?;
        tx.commit().await?;
        workspace_row(&row)
    }

    async fn list_workspaces(&self) -> Result<Vec<Workspace>, StoreError> {
        sqlx::query("SELECT * FROM workspaces ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(workspace_row)
            .collect()
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
    ) -> Result<Workspace, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(tier) = &change.tier {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM tiers WHERE name = ?")
                    .bind(tier)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                return Err(StoreError::Invalid(format!("unknown tier '{tier}'")));
            }
        }
        let row = sqlx::query(
            "UPDATE workspaces SET tier = COALESCE(?, tier), overrides = COALESCE(?, overrides), status = COALESCE(?, status) WHERE id = ? RETURNING *",
        )
        .bind(change.tier.as_deref())
        .bind(change.overrides.as_ref().map(json))
        .bind(change.status.map(|s| s.as_str()))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        Self::bump_version(&mut tx).await?;
        tx.commit().await?;
        workspace_row(&row)
    }

    async fn create_key(&self, key: &NewKey, now: i64) -> Result<ApiKey, StoreError> {
        let mut tx = self.pool.begin().await?;
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
        Self::bump_version(&mut tx).await?;
        tx.commit().await?;
        key_row(&row)
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

    async fn revoke_key(&self, id: KeyId, now: i64) -> Result<ApiKey, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING {KEY_COLUMNS}"
        ))
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        Self::bump_version(&mut tx).await?;
        tx.commit().await?;
        key_row(&row)
    }

    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
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

    async fn record_usage(&self, batch: &[UsageRecord]) -> Result<usize, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
        for record in batch {
            match record {
                UsageRecord::Settled {
                    request_id,
                    workspace,
                    day,
                    model,
                    tokens,
                    at,
                } => {
                    let inserted = sqlx::query(
                        "INSERT INTO usage_events (request_id, workspace_id, day, model, tokens, settled_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO NOTHING",
                    )
                    .bind(request_id)
                    .bind(workspace)
                    .bind(day)
                    .bind(model)
                    .bind(*tokens as i64)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if inserted == 0 {
                        continue;
                    }
                    new += 1;
                    sqlx::query(
                        "INSERT INTO usage_daily (workspace_id, day, model, requests, tokens) VALUES (?, ?, ?, 1, ?) ON CONFLICT(workspace_id, day, model) DO UPDATE SET requests = requests + 1, tokens = tokens + excluded.tokens",
                    )
                    .bind(workspace)
                    .bind(day)
                    .bind(model)
                    .bind(*tokens as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                UsageRecord::Denied {
                    workspace,
                    day,
                    model,
                } => {
                    sqlx::query(
                        "INSERT INTO usage_daily (workspace_id, day, model, denied) VALUES (?, ?, ?, 1) ON CONFLICT(workspace_id, day, model) DO UPDATE SET denied = denied + 1",
                    )
                    .bind(workspace)
                    .bind(day)
                    .bind(model)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(new)
    }

    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
    ) -> Result<MonthTotals, StoreError> {
        let (from, to) = month_range(month);
        let rows = sqlx::query(
            "SELECT model, SUM(tokens) AS tokens, SUM(requests) AS requests FROM usage_daily WHERE workspace_id = ? AND day >= ? AND day < ? GROUP BY model",
        )
        .bind(workspace)
        .bind(&from)
        .bind(&to)
        .fetch_all(&self.pool)
        .await?;
        let mut totals = MonthTotals {
            month: Some(month),
            ..MonthTotals::default()
        };
        for row in rows {
            let model: String = row.try_get("model")?;
            let tokens = row.try_get::<i64, _>("tokens")? as u64;
            totals.tokens += tokens;
            totals.requests += row.try_get::<i64, _>("requests")? as u64;
            if !model.is_empty() {
                totals.by_model.insert(model, tokens);
            }
        }
        Ok(totals)
    }

    async fn daily_usage(
        &self,
        workspace: WorkspaceId,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        sqlx::query(
            "SELECT day, model, requests, tokens, denied FROM usage_daily WHERE workspace_id = ? AND day >= ? AND day <= ? ORDER BY day, model",
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
            })
        })
        .collect()
    }

    async fn prune_events(&self, before: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM usage_events WHERE settled_at < ?")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn create_limit_request(
        &self,
        workspace: WorkspaceId,
        use_case: &str,
        requested: &Overrides,
        now: i64,
    ) -> Result<LimitRequest, StoreError> {
        let row = sqlx::query(
            "INSERT INTO limit_requests (workspace_id, use_case, requested_limits, created_at) VALUES (?, ?, ?, ?) RETURNING *",
        )
        .bind(workspace)
        .bind(use_case)
        .bind(json(requested))
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        limit_request_row(&row)
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
        now: i64,
    ) -> Result<LimitRequest, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT * FROM limit_requests WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let request = limit_request_row(&row)?;
        let granted = granted.unwrap_or(&request.requested_limits).clone();
        let row = sqlx::query(
            "UPDATE limit_requests SET status = 'approved', granted_limits = ?, decided_at = ? WHERE id = ? AND status = 'pending' RETURNING *",
        )
        .bind(json(&granted))
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(pending_or_missing(&mut tx, id).await);
        };
        let request = limit_request_row(&row)?;
        let current: String = sqlx::query_scalar("SELECT overrides FROM workspaces WHERE id = ?")
            .bind(request.workspace_id)
            .fetch_one(&mut *tx)
            .await?;
        let mut overrides: Overrides = parse_json(&current, "workspaces.overrides")?;
        overrides.merge(&granted);
        sqlx::query("UPDATE workspaces SET overrides = ? WHERE id = ?")
            .bind(json(&overrides))
            .bind(request.workspace_id)
            .execute(&mut *tx)
            .await?;
        Self::bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(request)
    }

    async fn deny_limit_request(
        &self,
        id: LimitRequestId,
        reason: &str,
        now: i64,
    ) -> Result<LimitRequest, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE limit_requests SET status = 'denied', reason = ?, decided_at = ? WHERE id = ? AND status = 'pending' RETURNING *",
        )
        .bind(reason)
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(pending_or_missing(&mut tx, id).await);
        };
        tx.commit().await?;
        limit_request_row(&row)
    }
}

async fn pending_or_missing(tx: &mut sqlx::SqliteConnection, id: LimitRequestId) -> StoreError {
    match sqlx::query_scalar::<_, String>("SELECT status FROM limit_requests WHERE id = ?")
        .bind(id)
        .fetch_optional(tx)
        .await
    {
        Ok(Some(status)) => StoreError::Conflict(format!("limit request {id} is already {status}")),
        Ok(None) => StoreError::NotFound,
        Err(e) => e.into(),
    }
}
