//! The store: everything that must outlast the process. Only this module knows SQL.
//!
//! It holds the tier catalogue, workspaces and their overrides, API keys (as SHA-256 hashes),
//! limit requests, and the usage ledger. The ledger is written in batches by `usage::Recorder`:
//! each settled request is an event keyed by its request id (so settling twice never counts
//! twice) and is rolled up, in the same transaction, into one row per workspace, day and model.
//! Month totals are sums of those daily rows. Events older than the idempotency window are pruned,
//! so the ledger does not grow by a row per request for ever.
//!
//! Every mutation of the catalogue bumps `catalog_version`, which the serving instances poll to
//! reload their in-memory copy (see `catalog`).

pub mod sqlite;

use async_trait::async_trait;

use crate::limiter::{MonthKey, MonthTotals};
use crate::model::{
    ApiKey, KeyId, LimitRequest, LimitRequestId, LimitRequestStatus, Overrides, Tier, Workspace,
    WorkspaceId, WorkspaceStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// One settled request for the ledger, or a denial to count.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageRecord {
    Settled {
        request_id: String,
        workspace: WorkspaceId,
        /// `YYYY-MM-DD`, UTC, the day of settlement.
        day: String,
        model: String,
        tokens: u64,
        /// Unix seconds.
        at: i64,
    },
    Denied {
        workspace: WorkspaceId,
        day: String,
        model: String,
    },
}

/// A rolled-up ledger row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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

#[derive(Debug, Clone, Default)]
pub struct WorkspaceChange {
    pub tier: Option<String>,
    /// Replaces the overrides as a whole.
    pub overrides: Option<Overrides>,
    pub status: Option<WorkspaceStatus>,
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub workspace: WorkspaceId,
    pub name: Option<String>,
    pub prefix: String,
    pub hash: [u8; 32],
    pub expires_at: Option<i64>,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Reachable and answering.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn catalog_version(&self) -> Result<i64, StoreError>;
    async fn load_catalog(&self) -> Result<CatalogData, StoreError>;

    async fn list_tiers(&self) -> Result<Vec<Tier>, StoreError>;
    /// Creates or replaces.
    async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError>;
    /// Inserts the tiers that do not exist yet; returns how many were inserted.
    async fn seed_tiers(&self, tiers: &[Tier]) -> Result<usize, StoreError>;

    async fn create_workspace(
        &self,
        name: &str,
        tier: &str,
        now: i64,
    ) -> Result<Workspace, StoreError>;
    async fn list_workspaces(&self) -> Result<Vec<Workspace>, StoreError>;
    async fn get_workspace(&self, id: WorkspaceId) -> Result<Workspace, StoreError>;
    async fn update_workspace(
        &self,
        id: WorkspaceId,
        change: &WorkspaceChange,
    ) -> Result<Workspace, StoreError>;

    async fn create_key(&self, key: &NewKey, now: i64) -> Result<ApiKey, StoreError>;
    async fn list_keys(&self, workspace: WorkspaceId) -> Result<Vec<ApiKey>, StoreError>;
    async fn find_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError>;
    async fn revoke_key(&self, id: KeyId, now: i64) -> Result<ApiKey, StoreError>;
    async fn touch_keys(&self, used: &[(KeyId, i64)]) -> Result<(), StoreError>;

    /// Writes a batch to the ledger in one transaction; settled events already recorded are
    /// skipped. Returns how many settled events were new.
    async fn record_usage(&self, batch: &[UsageRecord]) -> Result<usize, StoreError>;
    async fn month_totals(
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
    /// Drops ledger events settled before `before` (unix seconds); their totals stay.
    async fn prune_events(&self, before: i64) -> Result<u64, StoreError>;

    async fn create_limit_request(
        &self,
        workspace: WorkspaceId,
        use_case: &str,
        requested: &Overrides,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    async fn list_limit_requests(
        &self,
        workspace: Option<WorkspaceId>,
        status: Option<LimitRequestStatus>,
    ) -> Result<Vec<LimitRequest>, StoreError>;
    /// Approves a pending request and sets the granted overrides (by default the requested
    /// ones) on its workspace, atomically.
    async fn approve_limit_request(
        &self,
        id: LimitRequestId,
        granted: Option<&Overrides>,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
    async fn deny_limit_request(
        &self,
        id: LimitRequestId,
        reason: &str,
        now: i64,
    ) -> Result<LimitRequest, StoreError>;
}
