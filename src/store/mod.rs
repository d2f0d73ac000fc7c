//! The store: everything that must outlast the process. Only this module knows SQL.
//!
//! It holds the tier catalogue, workspaces and their overrides, API keys (as SHA-256 hashes),
//! limit requests, and the usage ledger. Two backends implement `Store`: `sqlite` (the embedded
//! default, one file) and `postgres` (shared by many instances). `open` picks one by the URL's
//! scheme; `migrate` copies an embedded installation into Postgres.
//!
//! # Ledger
//! The ledger is written in batches by `usage::Recorder`, which adds settled usage and denials
//! up in memory per (workspace, day, model, counter) between flushes: a batch is a few rows, not
//! a row per request. Each batch carries an id (the writing process's random id and a sequence
//! number) that is recorded in the same transaction as its rows (`ledger_batches`), so a batch
//! sent again after a write whose outcome was unknown (the connection died at commit) is
//! recognised and counts once, on SQLite and on Postgres with many instances alike. Its rows are
//! added to one row per workspace, day and model (`usage_daily`); month totals are sums of those.
//! Rows settled under one of the limiter's shared month-counter generations are also added per
//! generation (`usage_counted`), so that `month_totals` can leave out what that counter already
//! holds. Batch ids are kept for the idempotency window, then pruned in bounded batches, as are
//! the per-request events (`usage_events`) that versions before batches wrote.
//!
//! A batch also carries the same usage rolled up for the usage charts, written in its
//! transaction (so once, like its rows): per workspace and hour (`usage_hourly`: requests,
//! denials, prompt and completion tokens; pruned after a week) and per workspace, day and key
//! (`usage_daily_by_key`; kept as long as the daily rows). Every instance adds to the same rows.

//! # Catalogue changes
//! Every mutation of the catalogue bumps `catalog_version` and, in the same transaction, logs
//! what changed (a tier name, a workspace id, a key id) under the new version. Serving instances
//! poll `catalog_changes(since)` and reload only what changed; the log keeps the last
//! `CHANGE_LOG_KEEP` versions, and an instance further behind is told to reload everything. The
//! version is bumped last in each transaction and its row stays locked until commit, so versions
//! become visible in order: whoever sees version `v` sees every change up to `v`.
//!
//! # Audit
//! Every admin change (tiers, workspaces, keys, limit requests and their answers) writes an
//! `audit` row — who, what, when, the object before and after as JSON — in the transaction of
//! the change itself, so a change is never without its entry and a refused change leaves none.
//! Keys appear with their prefix only, never their hash or secret.
//!
//! # Concurrency
//! Several processes may write at once (the admin CLI next to a gateway; on Postgres, many
//! gateways). Every transaction that reads what it then writes locks it first (`FOR UPDATE` on
//! Postgres; on SQLite a write transaction taken up front). Batch writes lock rows in the order
//! of their keys, so overlapping batches cannot deadlock.

pub mod migrate;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::limiter::{MonthKey, MonthTotals};
use crate::model::{
    Actor, ApiKey, Attributes, AuditAction, AuditEntry, Budget, KeyId, LimitRequest,
    LimitRequestId, LimitRequestStatus, Overrides, OverridesPatch, Promoted, Tier, Workspace,
    WorkspaceId, WorkspaceStatus,
};

/// How many catalogue versions the change log keeps. An instance that is further behind (or new)
/// reloads the whole catalogue.
pub const CHANGE_LOG_KEEP: i64 = 1000;
/// Ledger events deleted per statement (each its own transaction) when pruning.
pub const PRUNE_BATCH: i64 = 5000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The database cannot be reached (refused, timed out, connection lost): nothing was done,
    /// or the transaction was rolled back.
    #[error("database unreachable: {0}")]
    Unreachable(String),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let unreachable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // Postgres: connection exceptions (class 08) and the server shutting down or
            // starting up (57P01-57P03).
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
            _ => false,
        };
        if unreachable {
            StoreError::Unreachable(e.to_string())
        } else {
            StoreError::Database(e)
        }
    }
}

/// One row of a ledger batch: what was settled and denied for a workspace, on a day, for a
/// model, counted by one month-counter generation of the limiter (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub workspace: WorkspaceId,
    /// `YYYY-MM-DD`, UTC, the day of settlement.
    pub day: String,
    pub model: String,
    /// The limiter's shared month-counter generation that counted these settlements, if any.
    pub counter: Option<String>,
    pub requests: u64,
    pub tokens: u64,
    pub denied: u64,
}

/// What was settled and denied for a workspace in one hour (UTC), for the usage charts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourRow {
    pub workspace: WorkspaceId,
    /// The hour's start, unix seconds (a multiple of 3600).
    pub hour: i64,
    pub requests: u64,
    /// Requests the limiter denied (`429`).
    pub denied: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// What was settled and denied for a workspace through one of its keys on one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDayRow {
    pub workspace: WorkspaceId,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub key: KeyId,
    pub requests: u64,
    pub tokens: u64,
    pub denied: u64,
}

/// A batch for the ledger: settled usage and denials added up per row, written whole exactly
/// once under its id, however often it is sent. `hours` and `keys` are the same settlements and
/// denials rolled up per hour and per key (the usage charts'), written in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerBatch {
    /// Unique to this batch: the writing process's random id and a sequence number.
    pub id: String,
    pub rows: Vec<LedgerRow>,
    /// In key order (workspace, hour).
    pub hours: Vec<HourRow>,
    /// In key order (workspace, day, key).
    pub keys: Vec<KeyDayRow>,
}

impl LedgerBatch {
    /// Rows of all three kinds.
    pub fn len(&self) -> usize {
        self.rows.len() + self.hours.len() + self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A key's usage over a range of days, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key: KeyId,
    pub requests: u64,
    pub tokens: u64,
    pub denied: u64,
}

/// A rolled-up ledger row. Sent as it is in the usage views (`daily`), hence `ToSchema`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[schema(description = "Usage of one day (UTC) and model.")]
pub struct DailyUsage {
    pub day: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub denied: u64,
}

/// Everything the hot path needs to authenticate and find limits, loaded at once.
#[derive(Debug, Clone, Default)]
pub struct CatalogData {
    pub version: i64,
    pub tiers: Vec<Tier>,
    pub workspaces: Vec<Workspace>,
    /// Keys that are not revoked.
    pub keys: Vec<ApiKey>,
}

/// What changed in the catalogue after a version, as the changed rows are now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CatalogDelta {
    /// The catalogue version these rows are at (at least).
    pub version: i64,
    pub tiers: Vec<Tier>,
    pub workspaces: Vec<Workspace>,
    /// Revoked keys included, so that a copy can drop them.
    pub keys: Vec<ApiKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CatalogChanges {
    /// Everything that changed since the version asked about (nothing if it is current).
    Since(CatalogDelta),
    /// The change log does not reach back that far (or the version is not this store's):
    /// reload everything.
    TooOld,
}

/// A change to a workspace; `None` and `FieldPatch::Keep` keep what is there.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceChange {
    pub tier: Option<String>,
    /// Applied field by field to the overrides as they are in the store.
    pub overrides: OverridesPatch,
    pub status: Option<WorkspaceStatus>,
    pub pinned: Option<bool>,
    /// Replaces the attributes.
    pub attributes: Option<Attributes>,
    /// Replaces the workspace's own budget.
    pub budget: Option<Budget>,
    /// An automatic promotion: made only if the workspace is still on `from` and not pinned
    /// (`Conflict` otherwise, so that instances evaluating at once promote it once), recorded
    /// as `workspace.promote`.
    pub promoted: Option<Promoted>,
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub workspace: WorkspaceId,
    pub name: Option<String>,
    pub prefix: String,
    pub hash: [u8; 32],
    pub expires_at: Option<i64>,
}

/// What a listing of workspaces is sorted by (each way; ties go by id the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkspaceSort {
    #[default]
    Id,
    /// The name, in either case alike (ASCII letters on SQLite, every letter on Postgres), then
    /// byte by byte.
    Name,
    Tier,
    Status,
    /// Tokens used this month (the ledger's).
    MonthTokens,
    Created,
}

/// A page of workspaces: those whose name (in either case, as for `WorkspaceSort::Name`) or id
/// holds `search`, sorted, `limit` of them after the first `offset`, each
/// with its usage in `month` from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceQuery {
    /// Empty: every workspace.
    pub search: String,
    pub sort: WorkspaceSort,
    pub descending: bool,
    pub offset: u64,
    pub limit: u32,
    pub month: MonthKey,
}

/// A workspace in a listing, with its month's usage.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceListed {
    pub workspace: Workspace,
    pub tokens_this_month: u64,
    pub requests_this_month: u64,
}

/// A page of a listing, and how many workspaces match in all.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspacePage {
    pub total: u64,
    pub rows: Vec<WorkspaceListed>,
}

/// Which audit entries to read: every filter that is set must match. Entries come newest first
/// (by id); `after` continues a listing after the entry with that id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub workspace: Option<WorkspaceId>,
    pub actor: Option<String>,
    pub action: Option<AuditAction>,
    /// Unix seconds, inclusive.
    pub from: Option<i64>,
    /// Unix seconds, exclusive.
    pub to: Option<i64>,
    /// Only entries older than (with an id below) this one.
    pub after: Option<i64>,
    pub limit: u32,
}

/// Every admin mutation below takes who makes it (`by`) and when (`now`, unix seconds), and
/// writes its audit entry in its own transaction.
#[async_trait]
pub trait Store: Send + Sync {
    /// Reachable and answering.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The console's session-signing secret: `candidate` is stored if none is yet, and the
    /// stored one is returned, so that every instance, and every restart, signs with the same.
    async fn console_secret(&self, candidate: &[u8; 32]) -> Result<Vec<u8>, StoreError>;

    async fn catalog_version(&self) -> Result<i64, StoreError>;
    async fn load_catalog(&self) -> Result<CatalogData, StoreError>;
    /// What changed after catalogue version `since`, from the change log.
    async fn catalog_changes(&self, since: i64) -> Result<CatalogChanges, StoreError>;

    async fn list_tiers(&self) -> Result<Vec<Tier>, StoreError>;
    /// Creates or replaces.
    async fn put_tier(&self, tier: &Tier, by: &Actor, now: i64) -> Result<(), StoreError>;
    /// Inserts the tiers that do not exist yet; returns how many were inserted.
    async fn seed_tiers(&self, tiers: &[Tier]) -> Result<usize, StoreError>;

    async fn create_workspace(
        &self,
        name: &str,
        tier: &str,
        by: &Actor,
        now: i64,
    ) -> Result<Workspace, StoreError>;
    async fn list_workspaces(&self) -> Result<Vec<Workspace>, StoreError>;
    /// A page of workspaces as `query` asks, searched, sorted and cut in SQL (one snapshot), so
    /// that a page costs the same with thousands of workspaces: the month's usage is summed
    /// per workspace from its own daily rows (by the primary key).
    async fn search_workspaces(&self, query: &WorkspaceQuery) -> Result<WorkspacePage, StoreError>;
    async fn get_workspace(&self, id: WorkspaceId) -> Result<Workspace, StoreError>;
    /// Applies `change` with the workspace locked; `Invalid` (naming the field) when the
    /// resulting overrides or the tier are not valid.
    async fn update_workspace(
        &self,
        id: WorkspaceId,
        change: &WorkspaceChange,
        by: &Actor,
        now: i64,
    ) -> Result<Workspace, StoreError>;

    /// `NotFound` when the workspace does not exist.
    async fn create_key(&self, key: &NewKey, by: &Actor, now: i64) -> Result<ApiKey, StoreError>;
    async fn list_keys(&self, workspace: WorkspaceId) -> Result<Vec<ApiKey>, StoreError>;
    async fn find_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError>;
    /// Revoking a revoked key keeps its first revocation time (and is recorded again).
    async fn revoke_key(&self, id: KeyId, by: &Actor, now: i64) -> Result<ApiKey, StoreError>;
    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<(), StoreError>;

    /// Writes a batch to the ledger in one transaction, with its id: a batch whose id was
    /// already written (a retry after a write whose outcome was not known) changes nothing and
    /// gives `false`. `now` is unix seconds, kept with the id for pruning.
    async fn record_usage(&self, batch: &LedgerBatch, now: i64) -> Result<bool, StoreError>;
    /// The month's settled totals (tokens, requests, tokens by model) from the daily rollups;
    /// with `excluding_counter`, minus what that month-counter generation counted.
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding_counter: Option<&str>,
    ) -> Result<MonthTotals, StoreError>;
    /// Daily rows with `from <= day <= to` (days as `YYYY-MM-DD`).
    async fn daily_usage(
        &self,
        workspace: WorkspaceId,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError>;
    /// Hourly rows with `from <= hour < to` (unix seconds of the hours' starts), by hour.
    async fn hourly_usage(
        &self,
        workspace: WorkspaceId,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourRow>, StoreError>;
    /// Per key, the sums of its daily rows with `from <= day <= to`, by key id.
    async fn key_usage(
        &self,
        workspace: WorkspaceId,
        from: &str,
        to: &str,
    ) -> Result<Vec<KeyUsage>, StoreError>;
    /// Tokens settled per workspace on the days from `from` (`YYYY-MM-DD`) on, for the
    /// workspaces in `workspaces`; a workspace without any is left out.
    async fn tokens_since(
        &self,
        workspaces: &[WorkspaceId],
        from: &str,
    ) -> Result<Vec<(WorkspaceId, u64)>, StoreError>;
    /// Drops the ids of batches written before `before` (unix seconds), the per-request events
    /// of older versions settled before it, rows by counter for days before
    /// `counted_before_day`, and hourly rows of hours starting before `hours_before`,
    /// `PRUNE_BATCH` rows per transaction; the daily totals (by model and by key) stay.
    /// Returns how many rows were dropped.
    async fn prune_ledger(
        &self,
        before: i64,
        counted_before_day: &str,
        hours_before: i64,
    ) -> Result<u64, StoreError>;

    /// `NotFound` when the workspace does not exist.
    async fn create_limit_request(
        &self,
        workspace: WorkspaceId,
        use_case: &str,
        expected_volume: Option<&str>,
        requested: &Overrides,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    async fn list_limit_requests(
        &self,
        workspace: Option<WorkspaceId>,
        status: Option<LimitRequestStatus>,
    ) -> Result<Vec<LimitRequest>, StoreError>;
    /// Approves a pending request and merges the granted overrides (by default the requested
    /// ones) into its workspace's, atomically, with both rows locked. `Conflict` if it was
    /// already decided.
    async fn approve_limit_request(
        &self,
        id: LimitRequestId,
        granted: Option<&Overrides>,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    async fn deny_limit_request(
        &self,
        id: LimitRequestId,
        reason: &str,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;

    /// Audit entries matching `filter`, newest first, at most `filter.limit`.
    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError>;
}

/// An audit row on its way into the transaction of the change it records.
struct AuditRow<'a> {
    by: &'a Actor,
    at: i64,
    action: AuditAction,
    workspace: Option<WorkspaceId>,
    target: String,
    before: Option<String>,
    after: Option<String>,
}

impl<'a> AuditRow<'a> {
    fn new(by: &'a Actor, at: i64, action: AuditAction, target: String) -> Self {
        AuditRow {
            by,
            at,
            action,
            workspace: None,
            target,
            before: None,
            after: None,
        }
    }

    fn workspace(mut self, id: WorkspaceId) -> Self {
        self.workspace = Some(id);
        self
    }

    fn before<T: serde::Serialize>(mut self, v: &T) -> Self {
        self.before = Some(json(v));
        self
    }

    fn after<T: serde::Serialize>(mut self, v: &T) -> Self {
        self.after = Some(json(v));
        self
    }

    fn tier(by: &'a Actor, at: i64, tier: &Tier, before: Option<Tier>) -> Self {
        let row = AuditRow::new(by, at, AuditAction::TierPut, format!("tier:{}", tier.name));
        match before {
            Some(b) => row.before(&b),
            None => row,
        }
        .after(tier)
    }

    fn workspace_change(
        by: &'a Actor,
        at: i64,
        action: AuditAction,
        before: Option<&Workspace>,
        after: &Workspace,
    ) -> Self {
        let row = AuditRow::new(by, at, action, format!("workspace:{}", after.id))
            .workspace(after.id)
            .after(after);
        match before {
            Some(b) => row.before(b),
            None => row,
        }
    }

    /// `ApiKey` serializes without its hash.
    fn key(
        by: &'a Actor,
        at: i64,
        action: AuditAction,
        before: Option<&ApiKey>,
        after: &ApiKey,
    ) -> Self {
        let row = AuditRow::new(by, at, action, format!("key:{}", after.id))
            .workspace(after.workspace_id)
            .after(after);
        match before {
            Some(b) => row.before(b),
            None => row,
        }
    }

    fn limit_request(
        by: &'a Actor,
        at: i64,
        action: AuditAction,
        before: Option<serde_json::Value>,
        after: serde_json::Value,
        request: &LimitRequest,
    ) -> Self {
        let row = AuditRow::new(by, at, action, format!("limit_request:{}", request.id))
            .workspace(request.workspace_id)
            .after(&after);
        match before {
            Some(b) => row.before(&b),
            None => row,
        }
    }
}

/// An approval's state: the request and its workspace's overrides.
fn approval_state(request: &LimitRequest, overrides: &Overrides) -> serde_json::Value {
    serde_json::json!({ "request": request, "workspace_overrides": overrides })
}

fn audit_entry(
    (id, at, actor, action, workspace_id, target, before, after): AuditColumns,
) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id,
        at,
        actor,
        action,
        workspace_id,
        target,
        before: before
            .map(|b| parse_json(&b, "audit.before_json"))
            .transpose()?,
        after: after
            .map(|a| parse_json(&a, "audit.after_json"))
            .transpose()?,
    })
}

type AuditColumns = (
    i64,
    i64,
    String,
    String,
    Option<i64>,
    String,
    Option<String>,
    Option<String>,
);

const AUDIT_COLUMNS: &str = "id, at, actor, action, workspace_id, target, before_json, after_json";

/// What a catalogue mutation changed, as logged under its version.
#[derive(Debug, Clone, Copy)]
enum Changed<'a> {
    Tier(&'a str),
    Workspace(WorkspaceId),
    Key(KeyId),
}

impl Changed<'_> {
    /// `(tier, workspace_id, key_id)` of a `catalog_changes` row: exactly one is set.
    fn columns(&self) -> (Option<&str>, Option<WorkspaceId>, Option<KeyId>) {
        match *self {
            Changed::Tier(name) => (Some(name), None, None),
            Changed::Workspace(id) => (None, Some(id), None),
            Changed::Key(id) => (None, None, Some(id)),
        }
    }
}

// Shared by both backends.

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The change a promotion makes, checked against the workspace as it is in the store.
pub(crate) fn promotion_holds(current: &Workspace, promoted: &Promoted) -> Result<(), StoreError> {
    if current.pinned {
        return Err(StoreError::Conflict("the workspace is pinned".into()));
    }
    if current.tier != promoted.from {
        return Err(StoreError::Conflict(format!(
            "the workspace is on tier '{}' now, not '{}'",
            current.tier, promoted.from
        )));
    }
    Ok(())
}

/// A tier's rank as stored (a nullable integer column), which must fit the model's `u32`.
fn rank_of(stored: Option<i64>) -> Result<Option<u32>, StoreError> {
    stored
        .map(|r| u32::try_from(r).map_err(|_| StoreError::Corrupt(format!("tiers.rank: {r}"))))
        .transpose()
}

fn month_range(month: MonthKey) -> (String, String) {
    (month.first_day(), month.next().first_day())
}

/// The month's daily rollups minus what the excluded counter counted (nothing when it is NULL):
/// its rows by counter, and the per-request events that versions before batches wrote; per
/// model, in one statement, so one snapshot.
const MONTH_TOTALS_SQL: &str = "
SELECT model, CAST(SUM(tokens) AS BIGINT) AS tokens, CAST(SUM(requests) AS BIGINT) AS requests FROM (
    SELECT model, tokens, requests FROM usage_daily
        WHERE workspace_id = $1 AND day >= $2 AND day < $3
    UNION ALL
    SELECT model, -tokens, -requests FROM usage_counted
        WHERE counter = $4 AND workspace_id = $1 AND day >= $2 AND day < $3
    UNION ALL
    SELECT model, -tokens, -1 FROM usage_events
        WHERE counter = $4 AND workspace_id = $1 AND day >= $2 AND day < $3
) AS t GROUP BY model";

/// Adds up `(model, tokens, requests)` rows into month totals; what an exclusion takes below
/// zero (never, while the ledger is consistent) counts as zero.
fn month_totals_of(
    month: MonthKey,
    rows: impl IntoIterator<Item = (String, i64, i64)>,
) -> MonthTotals {
    let mut totals = MonthTotals {
        month: Some(month),
        ..MonthTotals::default()
    };
    for (model, tokens, requests) in rows {
        let tokens = tokens.max(0) as u64;
        totals.tokens += tokens;
        totals.requests += requests.max(0) as u64;
        if !model.is_empty() {
            totals.by_model.insert(model, tokens);
        }
    }
    totals
}

/// Per key, the sums of a workspace's daily rows by key over a range of days.
const KEY_USAGE_SQL: &str = "
SELECT key_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(tokens) AS BIGINT), CAST(SUM(denied) AS BIGINT)
    FROM usage_daily_by_key WHERE workspace_id = $1 AND day >= $2 AND day <= $3
    GROUP BY key_id ORDER BY key_id";

fn key_usage_row((key, requests, tokens, denied): (i64, i64, i64, i64)) -> KeyUsage {
    KeyUsage {
        key,
        requests: requests.max(0) as u64,
        tokens: tokens.max(0) as u64,
        denied: denied.max(0) as u64,
    }
}

fn hour_row(
    workspace: WorkspaceId,
    (hour, requests, denied, prompt, completion): (i64, i64, i64, i64, i64),
) -> HourRow {
    HourRow {
        workspace,
        hour,
        requests: requests.max(0) as u64,
        denied: denied.max(0) as u64,
        prompt_tokens: prompt.max(0) as u64,
        completion_tokens: completion.max(0) as u64,
    }
}

/// The catalogue version, the version the change log starts after, and how many versions after
/// `$1` the log holds.
const CHANGE_LOG_SQL: &str = "
SELECT (SELECT value FROM meta WHERE key = 'catalog_version') AS version,
       (SELECT value FROM meta WHERE key = 'catalog_log_from') AS log_from,
       (SELECT COUNT(DISTINCT version) FROM catalog_changes WHERE version > $1) AS logged";

/// Whether the change log holds every version after `since`: it starts early enough, was not
/// trimmed past it, and no version is missing (a bump by an older binary, which logged nothing).
fn log_covers(since: i64, version: i64, log_from: Option<i64>, logged: i64) -> bool {
    let log_from = log_from.unwrap_or(version);
    since <= version
        && since >= log_from.max(version - CHANGE_LOG_KEEP)
        && logged == version - since
}

/// The statements of `search_workspaces`, for a backend whose numbered parameter is `$N` on
/// both, and whose byte order of text is `collate` (`""` on SQLite, whose default is bytes):
/// the count, and the page. Parameters: `$1` the search as a `LIKE` pattern (`''` for all),
/// `$2`..`$3` the month's first and next month's first day, `$4` limit, `$5` offset. The sort
/// is one of a fixed set of clauses, never text from a request.
///
/// The page's ids are picked first, and the month's usage is summed (from each workspace's own
/// daily rows, by the primary key) for those rows only; sorting by usage needs every matching
/// workspace's sum, so only that sort sums them all. Either way the cost follows the
/// workspaces that match and the days of this month, never the ledger's history (a grouped
/// join over `usage_daily` would read every month ever kept). Measured on a debug build with
/// 5,000 workspaces and 3 models a day: a page in about 10 ms, sorted by usage in 0.3 to 0.5 s.
fn workspace_search_sql(query: &WorkspaceQuery, collate: &str) -> (String, String) {
    const FILTER: &str = "($1 = '' OR LOWER(w.name) LIKE LOWER($1) ESCAPE '!' OR CAST(w.id AS TEXT) LIKE $1 ESCAPE '!')";
    const MONTH: &str =
        "FROM usage_daily u WHERE u.workspace_id = w.id AND u.day >= $2 AND u.day < $3";
    let tokens = format!("CAST(COALESCE((SELECT SUM(u.tokens) {MONTH}), 0) AS BIGINT)");
    let requests = format!("CAST(COALESCE((SELECT SUM(u.requests) {MONTH}), 0) AS BIGINT)");
    let dir = if query.descending { "DESC" } else { "ASC" };
    let by = match query.sort {
        WorkspaceSort::Id => String::new(),
        WorkspaceSort::Name => format!("LOWER(w.name){collate} {dir}, w.name{collate} {dir}, "),
        WorkspaceSort::Tier => format!("w.tier{collate} {dir}, "),
        WorkspaceSort::Status => format!("w.status{collate} {dir}, "),
        WorkspaceSort::MonthTokens => format!("month_tokens {dir}, "),
        WorkspaceSort::Created => format!("w.created_at {dir}, "),
    };
    let picked_usage = match query.sort {
        WorkspaceSort::MonthTokens => format!(", {tokens} AS month_tokens"),
        _ => String::new(),
    };
    let count = format!("SELECT COUNT(*) FROM workspaces w WHERE {FILTER}");
    let page = format!(
        "WITH picked AS (
    SELECT w.id{picked_usage} FROM workspaces w WHERE {FILTER}
    ORDER BY {by}w.id {dir} LIMIT $4 OFFSET $5
)
SELECT w.*,
    {tokens} AS month_tokens, {requests} AS month_requests
FROM picked JOIN workspaces w ON w.id = picked.id
ORDER BY {by}w.id {dir}"
    );
    (count, page)
}

/// A search as the `LIKE` pattern of `workspace_search_sql` (escape `!`; the database lowers
/// its letters as it lowers the names): `%`, `_` and `!` taken literally, anywhere in the
/// text; `''` for no search.
fn search_pattern(search: &str) -> String {
    if search.is_empty() {
        return String::new();
    }
    let mut p = String::with_capacity(search.len() + 2);
    p.push('%');
    for c in search.chars() {
        if matches!(c, '%' | '_' | '!') {
            p.push('!');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn already_decided(id: LimitRequestId, status: LimitRequestStatus) -> StoreError {
    StoreError::Conflict(format!("limit request {id} is already {}", status.as_str()))
}

/// Which backend a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sqlite:...`, or `postgres://...` / `postgresql://...`; the message says what is wrong.
    pub fn of(url: &str) -> Result<Backend, String> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            postgres::check_url(url)?;
            Ok(Backend::Postgres)
        } else {
            Err(format!(
                "'{}' is not supported; use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE",
                redact(url)
            ))
        }
    }
}

/// Opens (creating and migrating it) the store at `url`, by its scheme.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    match Backend::of(url).map_err(StoreError::Invalid)? {
        Backend::Sqlite => Ok(Arc::new(sqlite::SqliteStore::open(url).await?)),
        Backend::Postgres => Ok(Arc::new(postgres::PostgresStore::open(url).await?)),
    }
}

/// `url` with its password, if any, replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_is_taken_literally() {
        assert_eq!(search_pattern(""), "");
        assert_eq!(search_pattern("AcMe"), "%AcMe%");
        assert_eq!(search_pattern("50%_off!"), "%50!%!_off!!%");
        assert_eq!(search_pattern("Émile"), "%Émile%");
    }

    #[test]
    fn backends_by_scheme_and_passwords_never_shown() {
        assert_eq!(Backend::of("sqlite://x.db"), Ok(Backend::Sqlite));
        assert_eq!(Backend::of("sqlite::memory:"), Ok(Backend::Sqlite));
        assert_eq!(
            Backend::of("postgres://u@127.0.0.1:5432/db"),
            Ok(Backend::Postgres)
        );
        assert_eq!(
            Backend::of("postgresql://u:pw@db.example/tg"),
            Ok(Backend::Postgres)
        );
        let e = Backend::of("mysql://u:secret@h/db").unwrap_err();
        assert!(e.contains("not supported") && !e.contains("secret"), "{e}");
        let e = Backend::of("postgres://u:secret@h:notaport/db").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?sslmode=disable"),
            "postgres://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///tmp/a:b@c.db"), "sqlite:///tmp/a:b@c.db");
    }
}
