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
//! generation (`usage_counted`, and per key `usage_counted_by_key`), so that `month_totals` can
//! leave out what that counter already holds, for the workspace and for each key alike. Batch ids are kept for the idempotency window, then pruned in bounded batches, as are
//! the per-request events (`usage_events`) that versions before batches wrote.
//!
//! A batch also carries the same usage rolled up for the usage charts, written in its
//! transaction (so once, like its rows): per workspace and hour (`usage_hourly`: requests,
//! denials, prompt and completion tokens; pruned after a week) and per workspace, day and key
//! (`usage_daily_by_key`; kept as long as the daily rows), which also give each key's month
//! total (`MonthTotals::by_key`, for keys' own month limits). Every instance adds to the same
//! rows.

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
//! # Webhook outbox
//! An event (`WebhookEvent`) is written to `webhook_events` in the transaction of the change
//! that causes it (a limit request created or decided, a workspace's tier changed or its
//! suspension), with one `webhook_deliveries` row per endpoint that subscribes to it (an
//! operator's endpoint, or the workspace's own), due at once. A `quota.threshold` event carries
//! a unique key (workspace, month, threshold), inserted `ON CONFLICT DO NOTHING`, so it is
//! written once whichever instance sees the crossing. Delivering instances claim due rows by
//! setting `locked_until` in one conditional statement, so one instance sends a row at a time;
//! a claim whose instance died expires and the row is sent again (at least once).
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
    Actor, ApiKey, Attributes, AuditAction, AuditEntry, Budget, Enforcement, KeyId, KeyLimits,
    LimitRequest, LimitRequestId, LimitRequestStatus, Limits, Overrides, OverridesPatch, Promoted,
    ShadowLimit, Tier, Workspace, WorkspaceId, WorkspaceStatus,
};

/// How many catalogue versions the change log keeps. An instance that is further behind (or new)
/// reloads the whole catalogue.
pub const CHANGE_LOG_KEEP: i64 = 1000;
/// Ledger events deleted per statement (each its own transaction) when pruning.
pub const PRUNE_BATCH: i64 = 5000;

/// Runs `step` (a statement that deletes at most `PRUNE_BATCH` rows, each its own short
/// transaction, and says how many) until it deletes fewer than a batch; the rows deleted.
async fn prune_in_batches<F, Fut>(mut step: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut pruned = 0;
    loop {
        let n = step().await?;
        pruned += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(pruned);
        }
    }
}

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
    /// The database was lost after a change was sent to be committed: it may or may not have
    /// been applied.
    #[error("database lost while committing (the change may have been applied): {0}")]
    Uncertain(String),
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
    /// Requests a limit in shadow would have denied (they were admitted), and their settled
    /// tokens, which a shadow limiter's month counter leaves out.
    pub shadow_denied: u64,
    pub shadow_denied_tokens: u64,
    /// The shadow limiter's month-counter generation that counted these settlements, if any
    /// (a row's settlements are all admitted by the shadow or none is).
    pub shadow_counter: Option<String>,
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

/// What was settled and denied for a workspace through one of its keys on one day, counted by
/// one month-counter generation of the limiter (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDayRow {
    pub workspace: WorkspaceId,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub key: KeyId,
    /// The limiter's shared month-counter generation that counted these settlements, if any
    /// (added per generation to `usage_counted_by_key`, as `LedgerRow::counter` is to
    /// `usage_counted`).
    pub counter: Option<String>,
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
    /// In key order (workspace, day, key, counter).
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
    /// Requests a limit in shadow would have denied (admitted all the same).
    pub shadow_denied: u64,
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
    /// Replaces the workspace's own enforcement (`Some(None)`: the tier's).
    pub enforcement: Option<Option<Enforcement>>,
    /// Replaces the workspace's own list of limits in shadow (`Some(None)`: none of its own).
    pub shadow: Option<Option<Vec<ShadowLimit>>>,
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

    /// Closes the connections: the idle ones at once, those in use as they come back, waited
    /// for a short time (SQLite's calls on a local file end quickly; a silent Postgres would
    /// hold them for their timeouts, and a stop is not made to wait for those). What is called
    /// afterwards fails as the database unreachable.
    async fn close(&self);

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
    /// `NotFound` when there is no such key (revoked keys are found).
    async fn get_key(&self, id: KeyId) -> Result<ApiKey, StoreError>;
    /// Replaces a key's own limits (audited as `key.limits`, logged as a change of the key);
    /// `NotFound` for no key, `Conflict` for a revoked one. The limits are checked by the
    /// caller (`Admin::set_key_limits`).
    async fn set_key_limits(
        &self,
        id: KeyId,
        limits: &KeyLimits,
        by: &Actor,
        now: i64,
    ) -> Result<ApiKey, StoreError>;
    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<(), StoreError>;

    /// Writes a batch to the ledger in one transaction, with its id: a batch whose id was
    /// already written (a retry after a write whose outcome was not known) changes nothing and
    /// gives `false`. `now` is unix seconds, kept with the id for pruning.
    async fn record_usage(&self, batch: &LedgerBatch, now: i64) -> Result<bool, StoreError>;
    /// The month's settled totals (tokens, requests, tokens by model, tokens by key) from the
    /// daily rollups; with `excluding_counter`, minus what that month-counter generation
    /// counted (for the workspace, each model and each key). A key with no tokens left is not
    /// in `by_key`.
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding_counter: Option<&str>,
    ) -> Result<MonthTotals, StoreError>;
    /// The month's settled tokens of requests a limit in shadow would have denied (in total and
    /// by model): what a shadow limiter's month counter leaves out of `month_totals`.
    async fn shadow_denied_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
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
    /// of older versions settled before it, rows by counter (per model and per key) for days
    /// before `counted_before_day`, and hourly rows of hours starting before `hours_before`,
    /// `PRUNE_BATCH` rows per transaction; the daily totals (by model and by key) stay.
    /// Returns how many rows were dropped.
    async fn prune_ledger(
        &self,
        before: i64,
        counted_before_day: &str,
        hours_before: i64,
    ) -> Result<u64, StoreError>;

    /// `NotFound` when the workspace does not exist; `Conflict` when it already has
    /// `most_pending` requests waiting for an answer, counted in the same transaction as the
    /// insert, with the workspace locked: requests sent at once cannot pass the bound.
    #[allow(clippy::too_many_arguments)]
    async fn create_limit_request(
        &self,
        workspace: WorkspaceId,
        use_case: &str,
        expected_volume: Option<&str>,
        requested: &Overrides,
        most_pending: usize,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    async fn list_limit_requests(
        &self,
        workspace: Option<WorkspaceId>,
        status: Option<LimitRequestStatus>,
    ) -> Result<Vec<LimitRequest>, StoreError>;
    /// Approves a pending request and merges the granted overrides (by default the requested
    /// ones) into its workspace's, atomically, with both rows locked; `note`, the operator's
    /// words to the workspace, is kept as its `reason`. `Conflict` if it was already decided.
    async fn approve_limit_request(
        &self,
        id: LimitRequestId,
        granted: Option<&Overrides>,
        note: Option<&str>,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    /// Ends a pending request without a grant (`closing` says how), atomically with its audit
    /// entry and event. `NotFound` when it does not exist, or is another workspace's than the
    /// one withdrawing it; `Conflict` if it was no longer pending.
    async fn close_limit_request(
        &self,
        id: LimitRequestId,
        closing: Closing<'_>,
        by: &Actor,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    /// One request, whichever its workspace.
    async fn get_limit_request(
        &self,
        id: LimitRequestId,
    ) -> Result<Option<LimitRequest>, StoreError>;

    /// Audit entries matching `filter`, newest first, at most `filter.limit`.
    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError>;

    /// Registers a webhook endpoint (audited as `webhook.create`). `NotFound` when its
    /// workspace does not exist; `Conflict` when that workspace already has
    /// `most_per_workspace` endpoints, counted as `create_limit_request` counts.
    async fn create_webhook(
        &self,
        webhook: &NewWebhook,
        most_per_workspace: usize,
        by: &Actor,
        now: i64,
    ) -> Result<WebhookEndpoint, StoreError>;
    /// Endpoints by id: every one (`None`), or one workspace's own.
    async fn list_webhooks(
        &self,
        workspace: Option<WorkspaceId>,
    ) -> Result<Vec<WebhookEndpoint>, StoreError>;
    /// Removes an endpoint and its deliveries (audited as `webhook.delete`); with `workspace`,
    /// only that workspace's own (`NotFound` for another's).
    async fn delete_webhook(
        &self,
        id: WebhookId,
        workspace: Option<WorkspaceId>,
        by: &Actor,
        now: i64,
    ) -> Result<WebhookEndpoint, StoreError>;
    /// An endpoint's deliveries, newest first, at most `limit`; `NotFound` for no endpoint.
    async fn webhook_deliveries(
        &self,
        endpoint: WebhookId,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;
    /// Sends a failed delivery again: its attempts start over, the first due at once (audited
    /// as `webhook.redeliver`). With `workspace`, only that workspace's own endpoint is found.
    /// `NotFound` for no such endpoint, or no delivery of `event_id` to it (never made, or
    /// pruned); `Conflict` for one that has not failed (pending, or delivered).
    async fn redeliver(
        &self,
        endpoint: WebhookId,
        event_id: &str,
        workspace: Option<WorkspaceId>,
        by: &Actor,
        now: i64,
    ) -> Result<DeliveryRecord, StoreError>;
    /// Writes an event that no store change causes (`quota.threshold`) with its deliveries;
    /// `false` when its `dedupe` key was already written.
    async fn enqueue_event(&self, event: &WebhookEvent, now: i64) -> Result<bool, StoreError>;
    /// Claims up to `limit` pending deliveries due at `now_ms` whose claim (if any) has
    /// expired, until `lock_until_ms`: no other caller gets them meanwhile. At most
    /// `MOST_IN_FLIGHT_PER_ENDPOINT` of an endpoint's are claimed at once (those claimed and
    /// not finished count), the earliest due first.
    async fn claim_deliveries(
        &self,
        now_ms: i64,
        lock_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>, StoreError>;
    /// Drops deliveries that are over (delivered or failed) and were created before `before`,
    /// then events left without deliveries that were created before it, except those with a
    /// dedupe key, kept until `keys_before` (so that a quota event is not written again while
    /// its month can still be checked). `PRUNE_BATCH` rows per statement.
    async fn prune_webhooks(&self, before: i64, keys_before: i64) -> Result<u64, StoreError>;
    /// Records an attempt's outcome and releases the claim.
    async fn finish_delivery(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError>;
}

pub type WebhookId = i64;

/// A webhook endpoint as stored (its secret only in `NewWebhook` and to the delivering task).
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub id: WebhookId,
    /// `None`: the operator's, which gets every workspace's events.
    pub workspace_id: Option<WorkspaceId>,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: i64,
}

impl WebhookEndpoint {
    /// The URL as shown (listings, pages, the audit log): a password in it (`user:pass@`) as
    /// `***`. Only the delivering task sends it whole (an outside audit saw credentials in every
    /// listing and in the audit log).
    pub fn shown_url(&self) -> String {
        shown_url(&self.url)
    }
}

/// `url` with the password of its user information, if any, as `***` (and a user name given
/// alone, which is then the credential, as in `https://TOKEN@host`: an outside audit), and the
/// values of its query parameters named as secrets are (`mask_password_parameter`: `?token=`,
/// `?key=`; an outside audit saw a receiver's token whole in the listings).
pub fn shown_url(url: &str) -> String {
    let url = match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(mut parsed) if !parsed.username().is_empty() => {
            let _ = parsed.set_username("***");
            parsed.to_string()
        }
        _ => url.to_string(),
    };
    mask_password_parameter(&url)
}

#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub workspace: Option<WorkspaceId>,
    pub url: String,
    pub events: Vec<String>,
    /// `whsec_…`, made by the gateway.
    pub secret: String,
}

/// An event on its way into the outbox: its stable id, the workspace it concerns, its type and
/// the body every delivery sends, byte for byte.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEvent {
    pub id: String,
    pub workspace: WorkspaceId,
    pub kind: String,
    pub payload: String,
    /// Written once: a second event with the same key is dropped.
    pub dedupe: Option<String>,
}

/// A claimed delivery: where to send what.
#[derive(Debug, Clone, PartialEq)]
pub struct DueDelivery {
    pub id: i64,
    pub url: String,
    pub secret: String,
    pub event_id: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    Delivered {
        status: u16,
    },
    /// Failed; tried again at `next_at_ms`.
    Retry {
        status: Option<u16>,
        error: Option<String>,
        next_at_ms: i64,
    },
    /// Failed for the last time.
    Failed {
        status: Option<u16>,
        error: Option<String>,
    },
}

/// A delivery's state, for the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub event_id: String,
    pub kind: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// Unix ms; only while pending.
    pub next_attempt_at_ms: Option<i64>,
    pub created_at: i64,
}

/// An endpoint's events as stored: `,a,b,`, so that one `LIKE '%,type,%'` matches a type.
fn events_column(events: &[String]) -> String {
    format!(",{},", events.join(","))
}

fn events_of(column: &str) -> Vec<String> {
    column
        .split(',')
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

fn webhook_endpoint(
    (id, workspace_id, url, events, created_at): (i64, Option<i64>, String, String, i64),
) -> WebhookEndpoint {
    WebhookEndpoint {
        id,
        workspace_id,
        url,
        events: events_of(&events),
        created_at,
    }
}

const WEBHOOK_COLUMNS: &str = "id, workspace_id, url, events, created_at";

type DeliveryColumns = (
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<String>,
    i64,
    i64,
);

fn delivery_record(
    (event_id, kind, status, attempts, last_status, last_error, next, created_at): DeliveryColumns,
) -> DeliveryRecord {
    DeliveryRecord {
        // Due at once is stored as 0 (due whatever the clock says), and shown as the delivery's
        // creation: an outside audit read 1970-01-01 in the API.
        next_attempt_at_ms: (status == "pending").then_some(if next == 0 {
            created_at.saturating_mul(1000)
        } else {
            next
        }),
        event_id,
        kind,
        status,
        attempts: attempts.clamp(0, u32::MAX as i64) as u32,
        last_status: last_status.and_then(|s| u16::try_from(s).ok()),
        last_error,
        created_at,
    }
}

const DELIVERIES_SQL: &str = "
SELECT d.event_id, v.kind, d.status, d.attempts, d.last_status, d.last_error, d.next_attempt_at, d.created_at
    FROM webhook_deliveries d JOIN webhook_events v ON v.id = d.event_id
    WHERE d.endpoint_id = $1 ORDER BY d.id DESC LIMIT $2";

/// One delivery of an event to an endpoint, as `DELIVERIES_SQL` reads them.
const DELIVERY_SQL: &str = "
SELECT d.event_id, v.kind, d.status, d.attempts, d.last_status, d.last_error, d.next_attempt_at, d.created_at
    FROM webhook_deliveries d JOIN webhook_events v ON v.id = d.event_id
    WHERE d.endpoint_id = $1 AND d.event_id = $2";

/// A failed delivery made pending again, due at once (`$3`: the time of asking, in ms, which
/// the list then shows as its next attempt), its attempts from zero (what it last got stays
/// until the next attempt's outcome replaces it).
const REDELIVER_SQL: &str = "
UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = $3,
    locked_until = NULL, claim = NULL
    WHERE endpoint_id = $1 AND event_id = $2 AND status = 'failed'";

const INSERT_EVENT_SQL: &str = "INSERT INTO webhook_events (id, workspace_id, kind, payload, dedupe, created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";

/// One pending delivery, due at once, per endpoint that subscribes to the event's type and is
/// the operator's or the event's workspace's.
const INSERT_DELIVERIES_SQL: &str = "
INSERT INTO webhook_deliveries (endpoint_id, event_id, status, attempts, next_attempt_at, created_at)
    SELECT id, $1, 'pending', 0, 0, $2 FROM webhook_endpoints
    WHERE events LIKE $3 AND (workspace_id IS NULL OR workspace_id = $4)";

/// The claimed rows, with where and what to send.
const CLAIMED_SQL: &str = "
SELECT d.id, e.url, e.secret, d.event_id, v.payload, d.attempts
    FROM webhook_deliveries d
    JOIN webhook_endpoints e ON e.id = d.endpoint_id
    JOIN webhook_events v ON v.id = d.event_id
    WHERE d.claim = $1 AND d.status = 'pending' ORDER BY d.id";

/// A claim's own mark, so that a caller reads back only the rows it claimed.
fn claim_token() -> String {
    let mut t = [0u8; 12];
    getrandom::fill(&mut t).expect("the OS has randomness");
    crate::hex(&t)
}

type ClaimedColumns = (i64, String, String, String, String, i64);

fn due_delivery((id, url, secret, event_id, payload, attempts): ClaimedColumns) -> DueDelivery {
    DueDelivery {
        id,
        url,
        secret,
        event_id,
        payload,
        attempts: attempts.clamp(0, u32::MAX as i64) as u32,
    }
}

/// `(status, last_status, last_error, next_attempt_at)` of an outcome.
fn outcome_columns(o: &DeliveryOutcome) -> (&'static str, Option<i64>, Option<&str>, i64) {
    match o {
        DeliveryOutcome::Delivered { status } => ("delivered", Some(*status as i64), None, 0),
        DeliveryOutcome::Retry {
            status,
            error,
            next_at_ms,
        } => (
            "pending",
            status.map(i64::from),
            error.as_deref(),
            *next_at_ms,
        ),
        DeliveryOutcome::Failed { status, error } => {
            ("failed", status.map(i64::from), error.as_deref(), 0)
        }
    }
}

const PRUNE_DELIVERIES_SQL: &str = "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries WHERE status <> 'pending' AND created_at < $1 LIMIT $2)";

const PRUNE_EVENTS_SQL: &str = "DELETE FROM webhook_events WHERE id IN (SELECT v.id FROM webhook_events v WHERE v.created_at < $1 AND (v.dedupe IS NULL OR v.created_at < $3) AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = v.id) LIMIT $2)";

/// The most deliveries of one endpoint claimed at once: a workspace whose endpoints never
/// answer, flooding them with events of its own, held back every other endpoint's deliveries
/// (an outside audit: 92 s for an event that took 0.1 s before), since deliveries were claimed
/// in the order they fell due, whatever their endpoint. With it, a silent endpoint holds at
/// most this many of the dispatcher's attempts (and a workspace ten times as many).
pub(crate) const MOST_IN_FLIGHT_PER_ENDPOINT: i64 = 8;

const FINISH_SQL: &str = "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, last_status = $2, last_error = $3, next_attempt_at = $4, locked_until = NULL WHERE id = $5";

/// The event a workspace change causes, if any: its tier changed, or it was suspended.
pub(crate) fn workspace_events(
    before: &Workspace,
    after: &Workspace,
    now: i64,
) -> Vec<WebhookEvent> {
    let mut events = Vec::new();
    if before.tier != after.tier {
        events.push(WebhookEvent::new(
            "workspace.tier_changed",
            after.id,
            now,
            serde_json::json!({
                "workspace_id": after.id,
                "from": before.tier,
                "to": after.tier,
                "promoted": after.promoted.is_some() && after.promoted != before.promoted,
            }),
            None,
        ));
    }
    if before.status != after.status && after.status == WorkspaceStatus::Suspended {
        events.push(WebhookEvent::new(
            "workspace.suspended",
            after.id,
            now,
            serde_json::json!({ "workspace_id": after.id }),
            None,
        ));
    }
    events
}

/// `limit_request.created` or `limit_request.decided`, with the request as the admin API shows
/// it.
pub(crate) fn limit_request_event(kind: &str, request: &LimitRequest, now: i64) -> WebhookEvent {
    WebhookEvent::new(
        kind,
        request.workspace_id,
        now,
        serde_json::json!({
            "workspace_id": request.workspace_id,
            "limit_request": limit_request_json(request),
        }),
        None,
    )
}

/// A limit request as the admin API shows it (`http::views::LimitRequestView`): every field
/// present, times in RFC 3339, so that a receiver reads events with the parser of its API
/// answers (README, Webhooks). `tests/gateway/webhooks.rs` compares the two.
fn limit_request_json(r: &LimitRequest) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "workspace_id": r.workspace_id,
        "use_case": r.use_case,
        "expected_volume": r.expected_volume,
        "requested_limits": r.requested_limits,
        "status": r.status,
        "granted_limits": r.granted_limits,
        "reason": r.reason,
        "created_at": rfc3339(r.created_at),
        "decided_at": r.decided_at.map(rfc3339),
    })
}

/// Seconds since 1970 as RFC 3339 in UTC (`2027-01-01T00:00:00Z`); empty out of range. The
/// admin API's times (`http::views::Timestamp`) are written by it too.
pub(crate) fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl WebhookEvent {
    /// A new event with a fresh id, its body `{"type", "timestamp", "data"}`.
    pub fn new(
        kind: &str,
        workspace: WorkspaceId,
        now: i64,
        data: serde_json::Value,
        dedupe: Option<String>,
    ) -> WebhookEvent {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the OS has randomness");
        let id = crate::hex(&id);
        let timestamp = rfc3339(now);
        WebhookEvent {
            id: format!("evt_{id}"),
            workspace,
            kind: kind.to_string(),
            payload: json(&serde_json::json!({
                "type": kind,
                "timestamp": timestamp,
                "data": data,
            })),
            dedupe,
        }
    }
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

impl AuditRow<'_> {
    fn webhook<'a>(
        by: &'a Actor,
        at: i64,
        action: AuditAction,
        endpoint: &WebhookEndpoint,
    ) -> AuditRow<'a> {
        let view = serde_json::json!({
            "id": endpoint.id,
            "workspace_id": endpoint.workspace_id,
            "url": endpoint.shown_url(),
            "events": endpoint.events,
        });
        let row = AuditRow::new(by, at, action, format!("webhook:{}", endpoint.id));
        let row = match endpoint.workspace_id {
            Some(w) => row.workspace(w),
            None => row,
        };
        match action {
            AuditAction::WebhookDelete => row.before(&view),
            _ => row.after(&view),
        }
    }

    /// A delivery sent again: its endpoint, and the event, with the delivery as it was.
    fn redelivery<'a>(
        by: &'a Actor,
        at: i64,
        endpoint: &WebhookEndpoint,
        before: &DeliveryRecord,
    ) -> AuditRow<'a> {
        let delivery = |status: &str, attempts: u32| {
            serde_json::json!({
                "webhook_id": endpoint.id,
                "event_id": before.event_id,
                "type": before.kind,
                "status": status,
                "attempts": attempts,
            })
        };
        let row = AuditRow::new(
            by,
            at,
            AuditAction::WebhookRedeliver,
            format!("webhook:{}", endpoint.id),
        );
        let row = match endpoint.workspace_id {
            Some(w) => row.workspace(w),
            None => row,
        };
        row.before(&delivery(&before.status, before.attempts))
            .after(&delivery("pending", 0))
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

/// A tier's enforcement and limits in shadow, as its `shadowing` column holds them (JSON).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct TierShadowing {
    #[serde(default)]
    enforcement: Enforcement,
    #[serde(default)]
    shadow: Vec<ShadowLimit>,
}

fn tier_shadowing_column(tier: &Tier) -> String {
    json(&TierShadowing {
        enforcement: tier.enforcement,
        shadow: tier.shadow.clone(),
    })
}

fn tier_shadowing_of(column: &str) -> Result<(Enforcement, Vec<ShadowLimit>), StoreError> {
    let t: TierShadowing = parse_json(column, "tiers.shadowing")?;
    Ok((t.enforcement, t.shadow))
}

/// A workspace's own enforcement and limits in shadow, as its `shadowing` column holds them.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct WorkspaceShadowing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enforcement: Option<Enforcement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shadow: Option<Vec<ShadowLimit>>,
}

type OwnShadowing = (Option<Enforcement>, Option<Vec<ShadowLimit>>);

/// The `shadowing` column of workspace `current` after `change`.
fn workspace_shadowing_column(current: &Workspace, change: &WorkspaceChange) -> String {
    json(&WorkspaceShadowing {
        enforcement: change.enforcement.unwrap_or(current.enforcement),
        shadow: change.shadow.clone().unwrap_or(current.shadow.clone()),
    })
}

fn workspace_shadowing_of(column: &str) -> Result<OwnShadowing, StoreError> {
    let w: WorkspaceShadowing = parse_json(column, "workspaces.shadowing")?;
    Ok((w.enforcement, w.shadow))
}

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
/// model (rows whose `key_id` is NULL) and per key (rows whose `model` is NULL), in one
/// statement, so one snapshot.
const MONTH_TOTALS_SQL: &str = "
SELECT model, key_id, CAST(SUM(tokens) AS BIGINT) AS tokens, CAST(SUM(requests) AS BIGINT) AS requests FROM (
    SELECT model, CAST(NULL AS BIGINT) AS key_id, tokens, requests FROM usage_daily
        WHERE workspace_id = $1 AND day >= $2 AND day < $3
    UNION ALL
    SELECT model, CAST(NULL AS BIGINT), -tokens, -requests FROM usage_counted
        WHERE counter = $4 AND workspace_id = $1 AND day >= $2 AND day < $3
    UNION ALL
    SELECT model, CAST(NULL AS BIGINT), -tokens, -1 FROM usage_events
        WHERE counter = $4 AND workspace_id = $1 AND day >= $2 AND day < $3
    UNION ALL
    SELECT CAST(NULL AS TEXT), key_id, tokens, 0 FROM usage_daily_by_key
        WHERE workspace_id = $1 AND day >= $2 AND day < $3
    UNION ALL
    SELECT CAST(NULL AS TEXT), key_id, -tokens, 0 FROM usage_counted_by_key
        WHERE counter = $4 AND workspace_id = $1 AND day >= $2 AND day < $3
) AS t GROUP BY model, key_id";

/// Per model, the month's shadow denials and their settled tokens.
const SHADOW_DENIED_SQL: &str = "
SELECT model, CAST(SUM(shadow_denied_tokens) AS BIGINT), CAST(SUM(shadow_denied) AS BIGINT)
    FROM usage_daily WHERE workspace_id = $1 AND day >= $2 AND day < $3 AND shadow_denied > 0
    GROUP BY model";

/// A row of `MONTH_TOTALS_SQL`: a model's (`key_id` NULL) or a key's (`model` NULL) tokens
/// and requests.
type MonthTotalsRow = (Option<String>, Option<i64>, i64, i64);

/// Adds up the rows of `MONTH_TOTALS_SQL` into month totals; what an exclusion takes below
/// zero (never, while the ledger is consistent) counts as zero.
fn month_totals_of(month: MonthKey, rows: impl IntoIterator<Item = MonthTotalsRow>) -> MonthTotals {
    let mut totals = MonthTotals {
        month: Some(month),
        ..MonthTotals::default()
    };
    for (model, key, tokens, requests) in rows {
        let tokens = tokens.max(0) as u64;
        match (model, key) {
            (Some(model), None) => {
                totals.tokens += tokens;
                totals.requests += requests.max(0) as u64;
                if !model.is_empty() {
                    totals.by_model.insert(model, tokens);
                }
            }
            (None, Some(key)) if tokens > 0 => {
                totals.by_key.insert(key, tokens);
            }
            _ => {}
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

/// A change refused because the key is revoked.
fn revoked(id: KeyId) -> StoreError {
    StoreError::Conflict(format!("key {id} is revoked"))
}

/// How a pending increase request ends without a grant (`Store::close_limit_request`).
#[derive(Debug, Clone, Copy)]
pub enum Closing<'a> {
    /// An operator denies it, with a reason its workspace reads.
    Denied { reason: &'a str },
    /// Its workspace takes it back, before an operator answered.
    Withdrawn { workspace: WorkspaceId },
}

impl<'a> Closing<'a> {
    pub(crate) fn status(self) -> LimitRequestStatus {
        match self {
            Closing::Denied { .. } => LimitRequestStatus::Denied,
            Closing::Withdrawn { .. } => LimitRequestStatus::Withdrawn,
        }
    }

    pub(crate) fn reason(self) -> Option<&'a str> {
        match self {
            Closing::Denied { reason } => Some(reason),
            Closing::Withdrawn { .. } => None,
        }
    }

    /// Whether the request, of `workspace`, may be closed this way: a workspace withdraws its
    /// own requests only (another's is as if it did not exist).
    pub(crate) fn may_close(self, workspace: WorkspaceId) -> Result<(), StoreError> {
        match self {
            Closing::Withdrawn { workspace: own } if own != workspace => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    pub(crate) fn action(self) -> AuditAction {
        match self {
            Closing::Denied { .. } => AuditAction::LimitRequestDeny,
            Closing::Withdrawn { .. } => AuditAction::LimitRequestWithdraw,
        }
    }

    /// The webhook event it sends.
    pub(crate) fn event(self) -> &'static str {
        match self {
            Closing::Denied { .. } => "limit_request.decided",
            Closing::Withdrawn { .. } => "limit_request.withdrawn",
        }
    }
}

/// Whether approving grants (`granted` as the operator gave them, else what was `asked`) would
/// lower a limit in force now: the workspace's overrides (`before`) over its tier's limits
/// (`tier`), read in the approval's transaction, rows locked, so that two approvals at once, or
/// a tier changed meanwhile, cannot slip one past (`Overrides::lowers`).
fn approval_lowers(
    granted: Option<&Overrides>,
    asked: &Overrides,
    before: &Overrides,
    tier: &Limits,
) -> Result<(), StoreError> {
    let (grant, field) = match granted {
        Some(g) => (g, "limits"),
        None => (asked, "requested_limits"),
    };
    match grant.lowers(&before.apply(tier).within_bounds(), field) {
        Some(m) => Err(StoreError::Invalid(m)),
        None => Ok(()),
    }
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
            sqlite::check_url(url)?;
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

/// `url` with its password, if any, replaced by `***`, for messages and logs: the user's, and
/// a `password` query parameter's (as libpq and redis-rs read one). Read as text, not parsed,
/// so that a URL that does not parse (the one an error is about) is masked too. The user's part
/// ends at the last `@`, so that a password with an `@`, `/`, `#` or `?` that should have been
/// escaped and was not is still masked whole (an outside audit: `u:ab#SECRET@host` was shown
/// whole); a query holding an `@` then masks more than the password, never less.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let user_masked = rest
        .rfind('@')
        .and_then(|at| match rest[..at].split_once(':') {
            // A `/` before the `:` is a path (`sqlite:///a:b@c.db`), not a user.
            Some((user, _password)) if !user.contains('/') => {
                Some(format!("{scheme}://{user}:***{}", &rest[at..]))
            }
            _ => None,
        });
    let url = user_masked.unwrap_or_else(|| url.to_string());
    mask_password_parameter(&url)
}

/// `url` with the value of each query parameter whose name (any case, percent-decoded) holds
/// `pass`, `pwd`, `secret`, `token`, `key`, `auth`, `signature` or `credential` replaced by
/// `***`: `password`, `sslpassword`, `pass%77ord` (an outside audit saw each shown whole), an
/// upstream's `?key=`, `X-Amz-Signature`; parameters split by `&` or by `;` (another audit saw
/// `?a=1;token=…` whole).
fn mask_password_parameter(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_string();
    };
    let (head, query) = url.split_at(q + 1);
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    let mut masked = String::with_capacity(query.len());
    for pair in query.split_inclusive(['&', ';']) {
        let (pair, separator) = match pair.strip_suffix(['&', ';']) {
            Some(p) => (p, &pair[p.len()..]),
            None => (pair, ""),
        };
        match pair.split_once('=') {
            Some((name, _)) if secret_name(name) => {
                masked.push_str(name);
                masked.push_str("=***");
            }
            _ => masked.push_str(pair),
        }
        masked.push_str(separator);
    }
    format!("{head}{masked}{fragment}")
}

/// Whether a query parameter's name says it holds a secret (`mask_password_parameter`).
fn secret_name(name: &str) -> bool {
    // Percent-decoded as a form's name is (`url` re-exports the decoder).
    let name = url::form_urlencoded::parse(name.as_bytes())
        .next()
        .map_or_else(String::new, |(name, _)| name.to_ascii_lowercase());
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "signature",
        "credential",
    ]
    .iter()
    .any(|s| name.contains(s))
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
        // URLs that do not parse, as the messages about them show them.
        assert_eq!(
            redact("redis://u:REDISPASS@host:notaport"),
            "redis://u:***@host:notaport"
        );
        assert_eq!(
            redact("http://user:PASS@bad host"),
            "http://user:***@bad host"
        );
        assert_eq!(redact("redis://u:pa/ss@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://u:p@ss@h:1"), "redis://u:***@h:1");
        // An unescaped `#` or `?` in a password, and a password given as a parameter.
        assert_eq!(
            redact("redis://u:ab#SECRETcd@host:1"),
            "redis://u:***@host:1"
        );
        assert_eq!(
            redact("postgres://u:ab?SECRETcd@host:1/db"),
            "postgres://u:***@host:1/db"
        );
        assert_eq!(
            redact("postgres://h:1/db?user=u&Password=SECRETQ&sslmode=disable"),
            "postgres://h:1/db?user=u&Password=***&sslmode=disable"
        );
        assert_eq!(
            redact("redis://h:1/0?password=SECRETQ"),
            "redis://h:1/0?password=***"
        );
        assert_eq!(
            redact("postgres://u@h:1/d?pass%77ord=S3CR&sslpassword=S3CR&sslmode=require"),
            "postgres://u@h:1/d?pass%77ord=***&sslpassword=***&sslmode=require"
        );
        assert_eq!(redact("http://h:1/?key=S3CR"), "http://h:1/?key=***");
        // Separated by `;`, and the other names of credentials (an outside audit saw each
        // whole); the others and the separators kept as they were.
        assert_eq!(
            shown_url("https://h/hook?a=1;token=S3CR&pwd=S3CR;X-Amz-Signature=S3CR&b=2#f"),
            "https://h/hook?a=1;token=***&pwd=***;X-Amz-Signature=***&b=2#f"
        );
        assert_eq!(
            shown_url("https://h/hook?auth=S3CR&Credential=S3CR&x="),
            "https://h/hook?auth=***&Credential=***&x="
        );
        for url in [
            "redis://u:ab#SECRETcd@host:1",
            "http://u:ab#SECRETcd@host:1",
            "postgres://h:1/db?password=SECRETQ",
        ] {
            assert!(!redact(url).contains("SECRET"), "{url}");
        }
    }
}
