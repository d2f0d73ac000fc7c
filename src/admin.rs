//! The admin operations: one set behind every front end. The admin API (`http::admin`), the
//! admin CLI (`main`), the demo, and the console to come all call `Admin`; none of them
//! validates, audits or refreshes on its own. A front end parses its syntax (JSON, flags) into
//! the inputs here, calls, and renders what it gets back.
//!
//! What lives here, once:
//! - **Validation.** Names are 1 to `MAX_NAME` characters with no control characters; a use case
//!   or a denial's reason is 1 to `MAX_TEXT` bytes (line breaks and tabs allowed); limits and
//!   overrides are checked by `model` (the bounds that keep the limiter's arithmetic exact); tier
//!   names are plain (`config::validate_tier_name`). What does not pass is `AdminError::Invalid`
//!   naming the field, before the store is touched.
//! - **Audit.** Every change is made by an `Actor` (an admin token's name, `cli:<user>`,
//!   `workspace:<id>`), which the store records with the change, in its transaction.
//! - **Catalogue refresh.** In a serving process, every change is refreshed into this
//!   instance's catalogue before the call returns, so it holds from the next request; other
//!   instances and processes see it within `catalog_refresh`. The CLI has no catalogue: the
//!   gateways pick its changes up from the store's change log.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::catalog::{generate_key, Catalog};
use crate::clock::Clock;
use crate::config::validate_tier_name;
use crate::limiter::MonthKey;
use crate::model::{
    validate_attributes, Actor, ApiKey, Attributes, AuditAction, AuditEntry, Budget, Condition,
    Enforcement, FieldPatch, KeyId, KeyLimits, LimitRequest, LimitRequestId, LimitRequestStatus,
    Limits, Overrides, OverridesPatch, Promoted, ShadowLimit, Tier, TierSpec, Workspace,
    WorkspaceId, WorkspaceStatus, MAX_BUDGET_MODELS, MAX_TOKENS_PER_MONTH,
};
use crate::store::{
    AuditFilter, Closing, DeliveryRecord, NewKey, NewWebhook, Store, StoreError, WebhookEndpoint,
    WebhookId, WorkspaceChange, WorkspacePage, WorkspaceQuery, WorkspaceSort,
};
use crate::usage::Recorder;

/// The longest name (of a workspace or a key), in characters.
pub const MAX_NAME: usize = 128;
/// The longest use case of an increase request, or reason of a denial, in bytes (4 KiB).
pub const MAX_TEXT: usize = 4096;
/// Audit entries per page: the default, and the most one call may ask for.
pub const AUDIT_PAGE: u32 = 100;
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// Workspaces per page of a listing: the default, and the most one call may ask for.
pub const WORKSPACE_PAGE: u32 = 50;
pub const MAX_WORKSPACE_PAGE: u32 = 500;
/// The last page a listing may ask for (far past any installation's).
pub const MAX_PAGE: u64 = 1_000_000;

/// Webhook endpoints a workspace may register for itself.
pub const MAX_WORKSPACE_WEBHOOKS: usize = 10;

/// Increase requests a workspace may have waiting for an answer at once.
pub const MAX_PENDING_LIMIT_REQUESTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The input is refused; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// E.g. a limit request that was already decided.
    #[error("{0}")]
    Conflict(String),
    /// A workspace made more changes of its own than it may for now (`ChangeBudget`); it may
    /// again in `retry_after_secs`.
    #[error("{message}")]
    TooManyChanges {
        message: String,
        retry_after_secs: u64,
    },
    /// The store failed (unreachable, or an error of its own): nothing was changed; or it was
    /// lost while committing (`StoreError::Uncertain`): the change may have been applied.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => AdminError::NotFound("not found".into()),
            StoreError::Conflict(m) => AdminError::Conflict(m),
            StoreError::Invalid(m) => AdminError::Invalid(m),
            e => AdminError::Store(e),
        }
    }
}

fn invalid(message: impl Into<String>) -> AdminError {
    AdminError::Invalid(message.into())
}

/// `NotFound` from the store, told as "no workspace 7".
fn not_found(what: &str, id: impl std::fmt::Display) -> impl FnOnce(StoreError) -> AdminError {
    let message = format!("no {what} {id}");
    move |e| match e {
        StoreError::NotFound => AdminError::NotFound(message),
        e => e.into(),
    }
}

/// The bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to U+2069):
/// text holding one can be shown in another order than it was written, and so read as other
/// than it is by the operator who reads it (an outside audit: a use case with U+202E was taken).
fn reorders(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A one-line name: trimmed, 1 to `MAX_NAME` characters, no control characters, no line or
/// paragraph separator, no bidirectional control (`reorders`).
pub fn name(field: &str, value: &str) -> Result<String, AdminError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("'{field}' must not be empty")));
    }
    if value.chars().count() > MAX_NAME {
        return Err(invalid(format!(
            "'{field}' must be at most {MAX_NAME} characters"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() || reorders(c) || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(invalid(format!(
            "'{field}' must not contain control characters, line separators or bidirectional \
             controls"
        )));
    }
    Ok(value.to_string())
}

/// Free text (a use case, a reason): trimmed, 1 to `MAX_TEXT` bytes; line breaks and tabs
/// allowed, no other control characters and no bidirectional control (`reorders`).
pub fn text(field: &str, value: &str) -> Result<String, AdminError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("'{field}' must not be empty")));
    }
    if value.len() > MAX_TEXT {
        return Err(invalid(format!(
            "'{field}' must be at most {MAX_TEXT} bytes"
        )));
    }
    if value
        .chars()
        .any(|c| (c.is_control() && !matches!(c, '\n' | '\r' | '\t')) || reorders(c))
    {
        return Err(invalid(format!(
            "'{field}' must not contain control characters other than line breaks and tabs, \
             nor bidirectional controls"
        )));
    }
    Ok(value.to_string())
}

fn tier_name(field: &str, value: &str) -> Result<(), AdminError> {
    validate_tier_name(value).map_err(|m| invalid(format!("'{field}': {m}")))
}

/// An RFC 3339 instant as unix seconds.
pub fn instant(field: &str, value: &str) -> Result<i64, AdminError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| {
            invalid(format!(
                "'{field}' must be an RFC 3339 instant, e.g. 2027-01-01T00:00:00Z"
            ))
        })
}

pub fn workspace_status(value: &str) -> Result<WorkspaceStatus, AdminError> {
    WorkspaceStatus::parse(value)
        .ok_or_else(|| invalid("'status' must be \"active\" or \"suspended\""))
}

pub fn limit_request_status(value: &str) -> Result<LimitRequestStatus, AdminError> {
    LimitRequestStatus::parse(value)
        .ok_or_else(|| invalid("'status' must be pending, approved, denied or withdrawn"))
}

pub fn audit_action(value: &str) -> Result<AuditAction, AdminError> {
    AuditAction::parse(value).ok_or_else(|| {
        let names: Vec<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
        invalid(format!("'action' must be one of {}", names.join(", ")))
    })
}

/// The names an override may be given by, in the admin API's `limits` object and the CLI's
/// `--limit NAME=VALUE`.
pub const OVERRIDE_NAMES: &str =
    "requests_per_second, burst, tokens_per_minute, tokens_per_month, concurrent_requests";

/// What a limit's figure must be: a whole number but for the rate (`5.0` was told it must be "a
/// positive number", which it is: an outside audit).
fn number_wanted(field: &str) -> String {
    if field == "requests_per_second" {
        format!("limits.{field} must be a positive number or null")
    } else {
        format!("limits.{field} must be a positive whole number (no fraction or exponent) or null")
    }
}

/// Reads overrides given field by field as a patch: a number sets, `null` clears, a field left
/// out keeps. Both front ends give their fields here (the CLI's `none` is `null`).
pub fn overrides_patch<'a>(
    fields: impl IntoIterator<Item = (&'a str, &'a Value)>,
) -> Result<OverridesPatch, AdminError> {
    fn number<T: serde::de::DeserializeOwned>(
        field: &str,
        v: &Value,
    ) -> Result<FieldPatch<T>, AdminError> {
        if v.is_null() {
            return Ok(FieldPatch::Clear);
        }
        serde_json::from_value(v.clone())
            .map(FieldPatch::Set)
            .map_err(|_| invalid(number_wanted(field)))
    }
    let mut patch = OverridesPatch::default();
    for (field, v) in fields {
        match field {
            "requests_per_second" => patch.requests_per_second = number(field, v)?,
            "burst" => patch.burst = number(field, v)?,
            "tokens_per_minute" => patch.tokens_per_minute = number(field, v)?,
            "tokens_per_month" => patch.tokens_per_month = number(field, v)?,
            "concurrent_requests" => patch.concurrent_requests = number(field, v)?,
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(invalid(format!(
                    "limits.{shown} is not a limit; use {OVERRIDE_NAMES}"
                )));
            }
        }
    }
    patch
        .validate()
        .map_err(|m| invalid(format!("limits: {m}")))?;
    Ok(patch)
}

/// The names a key's own limit may be given by (`KeyLimits`' fields).
pub const KEY_LIMIT_NAMES: &str = "requests_per_second, burst, tokens_per_minute, tokens_per_month";

/// Reads a key's limits as the admin API and the console give them, whole: `null` or `{}` for
/// none, else an object of `KEY_LIMIT_NAMES`, each a number (`null` or left out: no limit of
/// the key's own). An unknown name is refused naming it; the figures are checked by
/// `Admin::set_key_limits`.
pub fn key_limits(value: &Value) -> Result<KeyLimits, AdminError> {
    fn number<T: serde::de::DeserializeOwned>(
        field: &str,
        v: &Value,
    ) -> Result<Option<T>, AdminError> {
        if v.is_null() {
            return Ok(None);
        }
        serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| invalid(number_wanted(field)))
    }
    let fields = match value {
        Value::Null => return Ok(KeyLimits::default()),
        Value::Object(fields) => fields,
        _ => return Err(invalid("limits must be an object or null")),
    };
    let mut limits = KeyLimits::default();
    for (field, v) in fields {
        match field.as_str() {
            "requests_per_second" => limits.requests_per_second = number(field, v)?,
            "burst" => limits.burst = number(field, v)?,
            "tokens_per_minute" => limits.tokens_per_minute = number(field, v)?,
            "tokens_per_month" => limits.tokens_per_month = number(field, v)?,
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(invalid(format!(
                    "limits.{shown} is not a limit a key may have; use {KEY_LIMIT_NAMES}"
                )));
            }
        }
    }
    Ok(limits)
}

/// A change to a workspace: each part that is set is applied, the others kept.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceUpdate {
    pub tier: Option<String>,
    pub overrides: OverridesPatch,
    pub status: Option<WorkspaceStatus>,
    /// Held on its tier (no automatic promotion), or released.
    pub pinned: Option<bool>,
    /// Its own enforcement (`Some(None)`: the tier's again).
    pub enforcement: Option<Option<Enforcement>>,
    /// Its own limits in shadow (`Some(None)`: none of its own, the tier's alone).
    pub shadow: Option<Option<Vec<ShadowLimit>>>,
}

/// The actor automatic promotions are recorded as.
pub const PROMOTION_ACTOR: &str = "promotion";

/// The promotion conditions count the tokens of the last this many days, today included.
pub const PROMOTION_WINDOW_DAYS: i64 = 30;

/// What a workspace can reach next: the tier its own tier promotes to (with the conditions, and
/// which are met), else the next tier up the ladder (reached by asking: no conditions).
#[derive(Debug, Clone, PartialEq)]
pub struct NextTier {
    pub tier: Tier,
    /// The promotion's conditions; `None` when the tier is reached only by asking.
    pub conditions: Option<Vec<Condition>>,
    /// The workspace is pinned: it is not promoted whatever the conditions say.
    pub pinned: bool,
}

#[derive(Debug, Clone, Default)]
pub struct NewKeyInput {
    pub name: Option<String>,
    /// RFC 3339.
    pub expires_at: Option<String>,
}

/// Which workspaces to list, a page at a time (see `WorkspaceQuery`): `page` counts from 1,
/// `per_page` defaults to `WORKSPACE_PAGE`.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceListing {
    pub search: Option<String>,
    pub sort: WorkspaceSort,
    pub descending: bool,
    pub page: Option<u64>,
    pub per_page: Option<u32>,
}

/// Which audit entries to list (see `AuditFilter`); `limit` defaults to `AUDIT_PAGE`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub workspace: Option<WorkspaceId>,
    pub actor: Option<String>,
    pub action: Option<AuditAction>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub after: Option<i64>,
    pub limit: Option<i64>,
}

/// A page of audit entries, newest first; `has_more` when older ones match too (ask again with
/// `after` = the last entry's id).
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub has_more: bool,
}

/// The admin operations over one store.
pub struct Admin {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// How many changes each workspace may still make of its own now (`ChangeBudget`).
    changes: std::sync::Mutex<ChangeBudget>,
    catalog: Option<Arc<Catalog>>,
    recorder: Option<Recorder>,
    /// Woken after every change, which may have written webhook events to send.
    webhooks: Option<Arc<tokio::sync::Notify>>,
}

/// The changes a workspace makes of its own (increase requests and their withdrawal, its budget,
/// its webhook endpoints, its keys revoked), with its key or in the console: a burst of
/// `CHANGE_BURST`, then one every `CHANGE_EVERY`, per instance. Those routes count against no
/// limit of the workspace's tier, and each change is stored and audited: an outside audit made
/// and withdrew 150 requests of 4 KiB in 4.5 s with a free tier's key, growing the database by
/// about 2 MB a second. The buckets of at most `CHANGE_WORKSPACES` workspaces are kept (past
/// that, those full again are forgotten).
#[derive(Default)]
struct ChangeBudget {
    /// Per workspace: changes left (in `CHANGE_EVERY`s) as of when (ns).
    left: HashMap<WorkspaceId, (f64, u64)>,
}

pub const CHANGE_BURST: u32 = 60;
pub const CHANGE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
const CHANGE_WORKSPACES: usize = 100_000;

impl ChangeBudget {
    /// Takes one change of `workspace`'s at `now` (ns); `Err` with the seconds until one is
    /// left.
    fn take(&mut self, workspace: WorkspaceId, now: u64) -> Result<(), u64> {
        let every = CHANGE_EVERY.as_nanos() as f64;
        let refill = |(left, at): (f64, u64)| {
            (left + now.saturating_sub(at) as f64 / every).min(f64::from(CHANGE_BURST))
        };
        if self.left.len() >= CHANGE_WORKSPACES && !self.left.contains_key(&workspace) {
            self.left
                .retain(|_, v| refill(*v) < f64::from(CHANGE_BURST));
        }
        let entry = self
            .left
            .entry(workspace)
            .or_insert((f64::from(CHANGE_BURST), now));
        let left = refill(*entry);
        if left >= 1.0 {
            *entry = (left - 1.0, now);
            Ok(())
        } else {
            let secs = ((1.0 - left) * CHANGE_EVERY.as_secs_f64()).ceil() as u64;
            Err(secs.max(1))
        }
    }
}

impl Admin {
    /// Takes one of `by`'s changes when it is a workspace acting on its own (`ChangeBudget`);
    /// an operator's are not counted.
    fn change_by(&self, by: &Actor) -> Result<(), AdminError> {
        let Some(workspace) = by.as_workspace() else {
            return Ok(());
        };
        let now = self.clock.now();
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(workspace, now)
            .map_err(|retry_after_secs| AdminError::TooManyChanges {
                message: format!(
                    "Too many changes: a workspace may make {CHANGE_BURST} changes of its own at once, then one every {} s; try again in {retry_after_secs} s.",
                    CHANGE_EVERY.as_secs()
                ),
                retry_after_secs,
            })
    }

    /// Operations straight on the store (the CLI: no catalogue of its own to refresh).
    /// The store it changes (the admin CLI reads a catalogue from it to print what it changed).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Admin {
        Admin {
            store,
            clock,
            changes: std::sync::Mutex::default(),
            catalog: None,
            recorder: None,
            webhooks: None,
        }
    }

    /// Wakes `webhooks` after every change: the webhook sender looks for the events it wrote
    /// at once rather than at its next poll.
    pub fn waking(mut self, webhooks: Arc<tokio::sync::Notify>) -> Admin {
        self.webhooks = Some(webhooks);
        self
    }

    /// In a serving process: refreshes `catalog` after every change, and flushes the ledger
    /// writer (keys' last use) before keys are listed.
    pub fn serving(mut self, catalog: Arc<Catalog>, recorder: Recorder) -> Admin {
        self.catalog = Some(catalog);
        self.recorder = Some(recorder);
        self
    }

    /// Brings this instance's catalogue up to a change just made. The change is in the store
    /// whatever happens here: if the refresh fails, it is logged, and the background refresh
    /// picks the change up once the store answers.
    /// The webhook sender looks for events at once (a change may have written some).
    fn wake_webhooks(&self) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.notify_one();
        }
    }

    async fn refresh(&self) {
        self.wake_webhooks();
        if let Some(catalog) = &self.catalog {
            if let Err(e) = catalog.refresh().await {
                tracing::warn!(error = %e, "catalog refresh after an admin change failed");
            }
        }
    }

    fn now(&self) -> i64 {
        self.clock.now_secs()
    }

    pub async fn list_tiers(&self) -> Result<Vec<Tier>, AdminError> {
        Ok(self.store.list_tiers().await?)
    }

    /// Creates or replaces a tier, its rank and limits; a limit left out is no limit, a rank
    /// left out puts the tier off the ladder.
    pub async fn put_tier(
        &self,
        by: &Actor,
        name: &str,
        spec: impl Into<TierSpec>,
    ) -> Result<Tier, AdminError> {
        let spec = spec.into();
        tier_name("name", name)?;
        spec.limits.validate_for_tier().map_err(invalid)?;
        if let Some(p) = &spec.promotion {
            tier_name("promotion.to", &p.to)?;
            p.validate().map_err(invalid)?;
            if p.to == name {
                return Err(invalid("promotion.to: a tier cannot promote to itself"));
            }
            // Upward only: both ends ranked, the target above. (Checked again at each
            // evaluation, since either tier may change afterwards.)
            let tiers = self.store.list_tiers().await?;
            let Some(target) = tiers.iter().find(|t| t.name == p.to) else {
                return Err(invalid(format!("promotion.to: unknown tier '{}'", p.to)));
            };
            match (spec.rank, target.rank) {
                (Some(from), Some(to)) if to > from => {}
                _ => {
                    return Err(invalid(format!(
                        "promotion.to: tier '{}' must rank above this one (promotion is upward only; give both a rank)",
                        p.to
                    )))
                }
            }
        }
        let tier = Tier {
            name: name.to_string(),
            rank: spec.rank,
            limits: spec.limits,
            promotion: spec.promotion,
            enforcement: spec.enforcement,
            shadow: spec.shadow,
        };
        self.store.put_tier(&tier, by, self.now()).await?;
        self.refresh().await;
        Ok(tier)
    }

    /// Creates a tier that does not exist yet (`Conflict` if it does; the check is made just
    /// before, so two creations at once may both pass it, and then the later replaces the
    /// earlier, as `put_tier` would).
    pub async fn create_tier(
        &self,
        by: &Actor,
        name: &str,
        spec: TierSpec,
    ) -> Result<Tier, AdminError> {
        tier_name("name", name)?;
        spec.limits.validate().map_err(invalid)?;
        if self
            .store
            .list_tiers()
            .await?
            .iter()
            .any(|t| t.name == name)
        {
            return Err(AdminError::Conflict(format!(
                "tier '{name}' exists already; change its limits instead"
            )));
        }
        self.put_tier(by, name, spec).await
    }

    /// Replaces an existing tier with what `edit` makes of it as it is now (the console's form
    /// keeps what it does not show); `NotFound` if there is no such tier.
    pub async fn update_tier(
        &self,
        by: &Actor,
        name: &str,
        edit: impl FnOnce(&Tier) -> TierSpec,
    ) -> Result<Tier, AdminError> {
        let tiers = self.store.list_tiers().await?;
        let Some(current) = tiers.iter().find(|t| t.name == name) else {
            return Err(AdminError::NotFound(format!("no tier {name}")));
        };
        let spec = edit(current);
        self.put_tier(by, name, spec).await
    }

    /// A workspace on `tier` (default `free`).
    pub async fn create_workspace(
        &self,
        by: &Actor,
        name: &str,
        tier: Option<&str>,
    ) -> Result<Workspace, AdminError> {
        let name = self::name("name", name)?;
        let tier = tier.unwrap_or("free");
        tier_name("tier", tier)?;
        let ws = self
            .store
            .create_workspace(&name, tier, by, self.now())
            .await?;
        self.refresh().await;
        Ok(ws)
    }

    pub async fn list_workspaces(&self) -> Result<Vec<Workspace>, AdminError> {
        Ok(self.store.list_workspaces().await?)
    }

    /// A page of workspaces, searched by name or id and sorted, each with this month's usage
    /// (the ledger's, brought up to now first), and how many match in all.
    pub async fn search_workspaces(
        &self,
        listing: WorkspaceListing,
    ) -> Result<WorkspacePage, AdminError> {
        let WorkspaceListing {
            search,
            sort,
            descending,
            page,
            per_page,
        } = listing;
        let search = search.as_deref().map(str::trim).unwrap_or_default();
        if search.chars().count() > MAX_NAME {
            return Err(invalid(format!(
                "'search' must be at most {MAX_NAME} characters"
            )));
        }
        if search.chars().any(char::is_control) {
            return Err(invalid("'search' must not contain control characters"));
        }
        let page = page.unwrap_or(1);
        if !(1..=MAX_PAGE).contains(&page) {
            return Err(invalid(format!("'page' must be from 1 to {MAX_PAGE}")));
        }
        let limit = per_page.unwrap_or(WORKSPACE_PAGE);
        if !(1..=MAX_WORKSPACE_PAGE).contains(&limit) {
            return Err(invalid(format!(
                "'per_page' must be from 1 to {MAX_WORKSPACE_PAGE}"
            )));
        }
        if let Some(recorder) = &self.recorder {
            recorder.flush().await;
        }
        let query = WorkspaceQuery {
            search: search.to_string(),
            sort,
            descending,
            offset: (page - 1) * u64::from(limit),
            limit,
            month: MonthKey::of(self.clock.now()),
        };
        Ok(self.store.search_workspaces(&query).await?)
    }

    pub async fn get_workspace(&self, id: WorkspaceId) -> Result<Workspace, AdminError> {
        self.store
            .get_workspace(id)
            .await
            .map_err(not_found("workspace", id))
    }

    /// Changes a workspace's tier, overrides (a patch the store applies to them as they are,
    /// so a concurrent approval is never lost) and status, in one transaction.
    pub async fn update_workspace(
        &self,
        by: &Actor,
        id: WorkspaceId,
        update: WorkspaceUpdate,
    ) -> Result<Workspace, AdminError> {
        let WorkspaceUpdate {
            tier,
            overrides,
            status,
            pinned,
            enforcement,
            shadow,
        } = update;
        if tier.is_none()
            && overrides.is_empty()
            && status.is_none()
            && pinned.is_none()
            && enforcement.is_none()
            && shadow.is_none()
        {
            return Err(invalid(
                "nothing to change: give at least one of tier, limits (naming at least one limit), status, pinned, enforcement, shadow",
            ));
        }
        if let Some(t) = &tier {
            tier_name("tier", t)?;
        }
        overrides
            .validate()
            .map_err(|m| invalid(format!("limits: {m}")))?;
        if !overrides.is_empty() || tier.is_some() {
            self.burst_has_a_rate(id, tier.as_deref(), &overrides)
                .await?;
        }
        let change = WorkspaceChange {
            tier,
            overrides,
            status,
            pinned,
            enforcement,
            shadow,
            ..WorkspaceChange::default()
        };
        self.change_workspace(by, id, &change).await
    }

    /// Refuses a change that leaves workspace `id` with a burst override and no rate for it to
    /// go with (neither its tier's nor an override's): it was taken and shown in its limits,
    /// and limited nothing (an outside audit), where a tier's, a key's and an increase
    /// request's burst without a rate are refused.
    async fn burst_has_a_rate(
        &self,
        id: WorkspaceId,
        tier: Option<&str>,
        patch: &OverridesPatch,
    ) -> Result<(), AdminError> {
        let ws = self.get_workspace(id).await?;
        let overrides = patch.apply(&ws.overrides);
        if overrides.burst.is_none() || overrides.requests_per_second.is_some() {
            return Ok(());
        }
        let tier = tier.unwrap_or(&ws.tier);
        let tiers = self.store.list_tiers().await?;
        let rate = tiers
            .iter()
            .find(|t| t.name == tier)
            .is_some_and(|t| t.limits.requests_per_second.is_some());
        if rate {
            return Ok(());
        }
        Err(invalid(format!(
            "limits.burst: a burst goes with a requests_per_second, and neither tier '{tier}' nor the overrides set one: give requests_per_second too, or clear burst"
        )))
    }

    /// Makes `change` in the store and brings the catalogue up to date with it.
    async fn change_workspace(
        &self,
        by: &Actor,
        id: WorkspaceId,
        change: &WorkspaceChange,
    ) -> Result<Workspace, AdminError> {
        let ws = self
            .store
            .update_workspace(id, change, by, self.now())
            .await
            .map_err(not_found("workspace", id))?;
        self.refresh().await;
        Ok(ws)
    }

    /// Replaces a workspace's own budget (`by`: the workspace itself). Each cap must be a whole
    /// number from 1 to `MAX_TOKENS_PER_MONTH` and at most the workspace's effective limit (its
    /// tier's, then its overrides): a budget only ever lowers a limit. A model's cap is held against the model's
    /// own month limit and the workspace's.
    pub async fn set_budget(
        &self,
        by: &Actor,
        id: WorkspaceId,
        budget: Budget,
    ) -> Result<Workspace, AdminError> {
        self.change_by(by)?;
        if budget.models.len() > MAX_BUDGET_MODELS {
            return Err(invalid(format!(
                "models: at most {MAX_BUDGET_MODELS} models"
            )));
        }
        let ws = self.get_workspace(id).await?;
        let tiers = self.store.list_tiers().await?;
        let tier = tiers
            .iter()
            .find(|t| t.name == ws.tier)
            .map(|t| t.limits.clone())
            .unwrap_or_default();
        let limits = ws.overrides.apply(&tier).within_bounds();
        let check = |field: &str, n: u64, cap: Option<u64>| -> Result<(), AdminError> {
            if n == 0 {
                return Err(invalid(format!("'{field}' must be at least 1")));
            }
            // Without a month limit to stay under, the bound every month limit has.
            if n > MAX_TOKENS_PER_MONTH {
                return Err(invalid(format!(
                    "'{field}' must be at most {MAX_TOKENS_PER_MONTH}"
                )));
            }
            match cap {
                Some(cap) if n > cap => Err(invalid(format!(
                    "'{field}' ({n}) is above this workspace's limit of {cap} tokens per month: a budget can only lower it (ask for an increase instead)"
                ))),
                _ => Ok(()),
            }
        };
        if let Some(n) = budget.tokens_per_month {
            check("tokens_per_month", n, limits.tokens_per_month)?;
        }
        for (model, &n) in &budget.models {
            if model.is_empty() || model.len() > 256 {
                return Err(invalid("models: a model name is 1 to 256 bytes"));
            }
            let own = limits.models.get(model).and_then(|m| m.tokens_per_month);
            let cap = match (own, limits.tokens_per_month) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            check(&format!("models.{model}"), n, cap)?;
        }
        let change = WorkspaceChange {
            budget: Some(budget),
            ..WorkspaceChange::default()
        };
        self.change_workspace(by, id, &change).await
    }

    /// Replaces a workspace's attributes (what the operator's own systems know of it, for the
    /// promotion conditions), then promotes it at once if they now make it qualify.
    pub async fn set_attributes(
        &self,
        by: &Actor,
        id: WorkspaceId,
        attributes: Attributes,
    ) -> Result<Workspace, AdminError> {
        validate_attributes(&attributes).map_err(invalid)?;
        let change = WorkspaceChange {
            attributes: Some(attributes),
            ..WorkspaceChange::default()
        };
        let ws = self.change_workspace(by, id, &change).await?;
        let promoted = self.promote(Some(id)).await?;
        Ok(promoted.into_iter().next().unwrap_or(ws))
    }

    /// Promotes every workspace whose tier's promotion conditions all hold (`only`: that one
    /// workspace), one step up each; returns the workspaces promoted. Active, unpinned
    /// workspaces only, upward only (a promotion whose target does not rank above is skipped and
    /// logged). Instances evaluating at once promote a workspace once: the store makes the
    /// change only if the workspace is still on the tier it was promoted from.
    pub async fn promote(&self, only: Option<WorkspaceId>) -> Result<Vec<Workspace>, AdminError> {
        let tiers = self.store.list_tiers().await?;
        let workspaces = match only {
            Some(id) => vec![self.get_workspace(id).await?],
            None => self.store.list_workspaces().await?,
        };
        let candidates: Vec<(&Workspace, &crate::model::Promotion, OverridesPatch)> = workspaces
            .iter()
            .filter(|w| w.status == WorkspaceStatus::Active && !w.pinned)
            .filter_map(|w| {
                let tier = tiers.iter().find(|t| t.name == w.tier)?;
                let p = tier.promotion.as_ref()?;
                let target = tiers.iter().find(|t| t.name == p.to);
                match (tier.rank, target.and_then(|t| t.rank)) {
                    (Some(from), Some(to)) if to > from => {
                        let target = target.expect("ranked, so found");
                        let mut outgrown = w.overrides.outgrown(&tier.limits, &target.limits);
                        // Never a promotion refused for what is left (a burst without its rate).
                        if outgrown.apply(&w.overrides).validate().is_err() {
                            outgrown = OverridesPatch::default();
                        }
                        Some((w, p, outgrown))
                    }
                    _ => {
                        tracing::warn!(tier = %tier.name, to = %p.to, "promotion skipped: its target is not a tier ranked above");
                        None
                    }
                }
            })
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self
            .tokens_30d(candidates.iter().map(|(w, _, _)| w.id), true)
            .await?;
        let now = self.now();
        let by = Actor::plain(PROMOTION_ACTOR);
        let mut promoted = Vec::new();
        for (ws, p, outgrown) in candidates {
            let conditions = p.conditions(ws, tokens.get(&ws.id).copied().unwrap_or(0), now);
            if !conditions.iter().all(|c| c.met) {
                continue;
            }
            let reason = if conditions.is_empty() {
                "no conditions".to_string()
            } else {
                conditions
                    .iter()
                    .map(|c| {
                        let actual = c.actual.map_or_else(|| "none".into(), |a| a.to_string());
                        format!("{} {} >= {}", c.name, actual, c.required)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let change = WorkspaceChange {
                promoted: Some(Promoted {
                    from: ws.tier.clone(),
                    to: p.to.clone(),
                    at: now,
                    reason,
                }),
                // Increases it was granted that the new tier meets would hold it below it.
                overrides: outgrown,
                ..WorkspaceChange::default()
            };
            match self.store.update_workspace(ws.id, &change, &by, now).await {
                Ok(w) => {
                    tracing::info!(workspace = w.id, from = %ws.tier, to = %w.tier, "workspace promoted");
                    promoted.push(w);
                }
                // Promoted, pinned or moved by someone else meanwhile.
                Err(StoreError::Conflict(_)) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !promoted.is_empty() {
            self.refresh().await;
        }
        Ok(promoted)
    }

    /// Tokens settled over the promotion window, per workspace (the ledger flushed first, so
    /// that what was settled until now counts).
    async fn tokens_30d(
        &self,
        workspaces: impl Iterator<Item = WorkspaceId>,
        flush: bool,
    ) -> Result<std::collections::HashMap<WorkspaceId, u64>, AdminError> {
        if let (true, Some(recorder)) = (flush, &self.recorder) {
            recorder.flush().await;
        }
        let ids: Vec<WorkspaceId> = workspaces.collect();
        let from_ns =
            (self.now() - (PROMOTION_WINDOW_DAYS - 1) * 86_400).max(0) as u64 * 1_000_000_000;
        let from = crate::limiter::core::day_of(from_ns);
        Ok(self
            .store
            .tokens_since(&ids, &from)
            .await?
            .into_iter()
            .collect())
    }

    /// What `ws` can reach next (`tiers`: the catalogue): the tier its tier promotes to, with
    /// its conditions, else the next tier up the ladder. `flush`: write what the ledger holds
    /// first, so that the tokens condition counts everything settled (else it may be about a
    /// second behind).
    pub async fn next_tier(
        &self,
        ws: &Workspace,
        tiers: &[Tier],
        flush: bool,
    ) -> Result<Option<NextTier>, AdminError> {
        let Some(current) = tiers.iter().find(|t| t.name == ws.tier) else {
            return Ok(None);
        };
        if let Some(p) = &current.promotion {
            // Only a promotion `promote` would make: its target ranked above (a tier re-ranked
            // since it was set is skipped there, so it is not promised here either).
            let target = tiers.iter().find(|t| {
                t.name == p.to
                    && matches!((current.rank, t.rank), (Some(from), Some(to)) if to > from)
            });
            if let Some(target) = target {
                let tokens = match p.min_tokens_30d {
                    Some(_) => self.tokens_30d(std::iter::once(ws.id), flush).await?,
                    None => Default::default(),
                };
                let conditions =
                    p.conditions(ws, tokens.get(&ws.id).copied().unwrap_or(0), self.now());
                return Ok(Some(NextTier {
                    tier: target.clone(),
                    conditions: Some(conditions),
                    pinned: ws.pinned,
                }));
            }
        }
        Ok(current.next_in(tiers).map(|t| NextTier {
            tier: t.clone(),
            conditions: None,
            pinned: ws.pinned,
        }))
    }

    /// A new key for a workspace, and its secret (shown once; only its hash is stored).
    pub async fn create_key(
        &self,
        by: &Actor,
        workspace: WorkspaceId,
        input: NewKeyInput,
    ) -> Result<(ApiKey, String), AdminError> {
        let name = input
            .name
            .as_deref()
            .map(|n| self::name("name", n))
            .transpose()?;
        let expires_at = input
            .expires_at
            .as_deref()
            .map(|s| instant("expires_at", s))
            .transpose()?;
        if expires_at.is_some_and(|at| at <= self.now()) {
            return Err(invalid(
                "expires_at: must be in the future (a key that has already expired could never be used)",
            ));
        }
        let secret = generate_key();
        let key = self
            .store
            .create_key(
                &NewKey {
                    workspace,
                    name,
                    prefix: secret.prefix.clone(),
                    hash: secret.hash,
                    expires_at,
                },
                by,
                self.now(),
            )
            .await
            .map_err(not_found("workspace", workspace))?;
        self.refresh().await;
        Ok((key, secret.secret))
    }

    /// A workspace's keys (never the secrets), with their last use as of now.
    pub async fn list_keys(&self, workspace: WorkspaceId) -> Result<Vec<ApiKey>, AdminError> {
        self.get_workspace(workspace).await?;
        if let Some(recorder) = &self.recorder {
            recorder.flush().await;
        }
        Ok(self.store.list_keys(workspace).await?)
    }

    /// One key (never its secret).
    pub async fn get_key(&self, id: KeyId) -> Result<ApiKey, AdminError> {
        self.store.get_key(id).await.map_err(not_found("key", id))
    }

    /// Revokes a key at once. Answered with its last use as `list_keys` gives it (written
    /// first: an outside audit saw `null` right after a request with the key).
    pub async fn revoke_key(&self, by: &Actor, id: KeyId) -> Result<ApiKey, AdminError> {
        if let Some(recorder) = &self.recorder {
            recorder.flush().await;
        }
        let key = self
            .store
            .revoke_key(id, by, self.now())
            .await
            .map_err(not_found("key", id))?;
        self.refresh().await;
        Ok(key)
    }

    /// Replaces a key's own limits (empty: none). Each figure must be valid
    /// (`KeyLimits::validate`; a burst only with a rate) and at most the workspace's effective
    /// limit now (its tier's, then its overrides, then its budget), naming the field otherwise.
    /// `NotFound` for no key, `Conflict` for a revoked one. The limits stay as set when the
    /// workspace's change later: what is enforced is always within them (`Limits::with_key`).
    pub async fn set_key_limits(
        &self,
        by: &Actor,
        id: KeyId,
        limits: KeyLimits,
    ) -> Result<ApiKey, AdminError> {
        limits
            .validate()
            .map_err(|m| invalid(format!("limits: {m}")))?;
        if limits.burst.is_some() && limits.requests_per_second.is_none() {
            return Err(invalid(
                "limits: burst goes with requests_per_second: give both, or neither",
            ));
        }
        let key = self.store.get_key(id).await.map_err(not_found("key", id))?;
        if key.revoked_at.is_some() {
            return Err(AdminError::Conflict(format!("key {id} is revoked")));
        }
        let ws = self.get_workspace(key.workspace_id).await?;
        let tier = self.tier_limits(&ws).await?;
        let (effective, _) = ws.effective_limits(&tier);
        if let Some(m) = limits.above(&effective) {
            return Err(invalid(format!("limits.{m}")));
        }
        let key = self
            .store
            .set_key_limits(id, &limits, by, self.now())
            .await
            .map_err(not_found("key", id))?;
        self.refresh().await;
        Ok(key)
    }

    /// Revokes one of `workspace`'s keys (the workspace itself, from the console): `NotFound`
    /// for a key of another workspace, as for one that does not exist.
    pub async fn revoke_workspace_key(
        &self,
        by: &Actor,
        workspace: WorkspaceId,
        id: KeyId,
    ) -> Result<ApiKey, AdminError> {
        self.change_by(by)?;
        let keys = self.store.list_keys(workspace).await?;
        if !keys.iter().any(|k| k.id == id) {
            return Err(AdminError::NotFound(format!("no key {id}")));
        }
        self.revoke_key(by, id).await
    }

    /// The limits of `ws`'s tier as the store holds them (none, for a tier no longer there).
    async fn tier_limits(&self, ws: &Workspace) -> Result<Limits, AdminError> {
        Ok(self
            .store
            .list_tiers()
            .await?
            .into_iter()
            .find(|t| t.name == ws.tier)
            .map(|t| t.limits)
            .unwrap_or_default())
    }

    /// A workspace asks for higher limits (`by` is the workspace itself, or an operator on its
    /// behalf): each figure above the limit in force.
    pub async fn create_limit_request(
        &self,
        by: &Actor,
        workspace: WorkspaceId,
        use_case: &str,
        expected_volume: Option<&str>,
        requested: &Overrides,
    ) -> Result<LimitRequest, AdminError> {
        self.change_by(by)?;
        let use_case = text("use_case", use_case)?;
        let expected_volume = expected_volume
            .map(|v| text("expected_volume", v))
            .transpose()?;
        if requested.is_empty() {
            return Err(invalid(format!(
                "'requested_limits' must name at least one of {OVERRIDE_NAMES}"
            )));
        }
        requested
            .validate()
            .map_err(|m| invalid(format!("requested_limits: {m}")))?;
        // Each figure asked for is above the limit in force (the tier's with the overrides; the
        // workspace's own budget is its own to change).
        let ws = self.get_workspace(workspace).await?;
        let tier = self.tier_limits(&ws).await?;
        if let Some(m) = requested.not_an_increase(&ws.overrides.apply(&tier).within_bounds()) {
            return Err(invalid(m));
        }
        let request = self
            .store
            .create_limit_request(
                workspace,
                &use_case,
                expected_volume.as_deref(),
                requested,
                MAX_PENDING_LIMIT_REQUESTS,
                by,
                self.now(),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => AdminError::Conflict(format!(
                    "this workspace already has {MAX_PENDING_LIMIT_REQUESTS} increase requests waiting for an answer; withdraw one (its Withdraw button in the console, or DELETE /v1/limit-requests/{{id}}), wait for an answer, or ask the operator"
                )),
                e => not_found("workspace", workspace)(e),
            })?;
        self.wake_webhooks();
        Ok(request)
    }

    pub async fn list_limit_requests(
        &self,
        workspace: Option<WorkspaceId>,
        status: Option<LimitRequestStatus>,
    ) -> Result<Vec<LimitRequest>, AdminError> {
        Ok(self.store.list_limit_requests(workspace, status).await?)
    }

    /// Approves a pending request: its workspace's overrides get the granted limits (by
    /// default, what was asked), merged atomically with whatever else changes them. `note`: the
    /// operator's words to the workspace (why other figures were granted, say), as a denial's
    /// reason is checked.
    pub async fn approve_limit_request(
        &self,
        by: &Actor,
        id: LimitRequestId,
        granted: Option<&Overrides>,
        note: Option<&str>,
    ) -> Result<LimitRequest, AdminError> {
        let note = note.map(|n| text("reason", n)).transpose()?;
        if let Some(g) = granted {
            if g.is_empty() {
                return Err(invalid(format!(
                    "'limits' must name at least one of {OVERRIDE_NAMES}, or be left out to grant what was asked"
                )));
            }
            g.validate().map_err(|m| invalid(format!("limits: {m}")))?;
        }
        let request = self
            .store
            .approve_limit_request(id, granted, note.as_deref(), by, self.now())
            .await
            .map_err(not_found("limit request", id))?;
        self.refresh().await;
        Ok(request)
    }

    /// Denies a pending request with a reason the workspace can read.
    pub async fn deny_limit_request(
        &self,
        by: &Actor,
        id: LimitRequestId,
        reason: &str,
    ) -> Result<LimitRequest, AdminError> {
        let reason = text("reason", reason)?;
        let closing = Closing::Denied { reason: &reason };
        self.close_limit_request(by, id, closing).await
    }

    /// A workspace takes back one of its requests that is still pending (another workspace's
    /// request is not found).
    pub async fn withdraw_limit_request(
        &self,
        by: &Actor,
        workspace: WorkspaceId,
        id: LimitRequestId,
    ) -> Result<LimitRequest, AdminError> {
        self.change_by(by)?;
        self.close_limit_request(by, id, Closing::Withdrawn { workspace })
            .await
    }

    async fn close_limit_request(
        &self,
        by: &Actor,
        id: LimitRequestId,
        closing: Closing<'_>,
    ) -> Result<LimitRequest, AdminError> {
        let request = self
            .store
            .close_limit_request(id, closing, by, self.now())
            .await
            .map_err(not_found("limit request", id))?;
        self.wake_webhooks();
        Ok(request)
    }

    /// One request; `workspace`, when given, is the only one whose requests are found.
    pub async fn get_limit_request(
        &self,
        id: LimitRequestId,
        workspace: Option<WorkspaceId>,
    ) -> Result<LimitRequest, AdminError> {
        match self.store.get_limit_request(id).await? {
            Some(r) if workspace.is_none_or(|w| w == r.workspace_id) => Ok(r),
            _ => Err(AdminError::NotFound(format!("no limit request {id}"))),
        }
    }

    /// Registers a webhook endpoint: the operator's (`workspace: None`, every workspace's
    /// events) or a workspace's own. Returns it with its signing secret, shown this once.
    pub async fn create_webhook(
        &self,
        by: &Actor,
        workspace: Option<WorkspaceId>,
        url: &str,
        events: &[String],
    ) -> Result<(WebhookEndpoint, String), AdminError> {
        self.change_by(by)?;
        let url = crate::webhooks::validate_url(url).map_err(AdminError::Invalid)?;
        let events = crate::webhooks::validate_events(events).map_err(AdminError::Invalid)?;
        let secret = crate::webhooks::new_secret();
        let endpoint = self
            .store
            .create_webhook(
                &NewWebhook {
                    workspace,
                    url,
                    events,
                    secret: secret.clone(),
                },
                MAX_WORKSPACE_WEBHOOKS,
                by,
                self.now(),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => AdminError::Conflict(format!(
                    "this workspace already has {MAX_WORKSPACE_WEBHOOKS} webhook endpoints; remove one first"
                )),
                e => not_found("workspace", workspace.unwrap_or_default())(e),
            })?;
        Ok((endpoint, secret))
    }

    /// Every endpoint (`None`), or a workspace's own; never their secrets.
    pub async fn list_webhooks(
        &self,
        workspace: Option<WorkspaceId>,
    ) -> Result<Vec<WebhookEndpoint>, AdminError> {
        Ok(self.store.list_webhooks(workspace).await?)
    }

    /// Removes an endpoint and what it had still to receive; with `workspace`, only one of
    /// that workspace's own (another's is `NotFound`, as one that does not exist).
    pub async fn delete_webhook(
        &self,
        by: &Actor,
        id: WebhookId,
        workspace: Option<WorkspaceId>,
    ) -> Result<WebhookEndpoint, AdminError> {
        self.change_by(by)?;
        self.store
            .delete_webhook(id, workspace, by, self.now())
            .await
            .map_err(not_found("webhook", id))
    }

    /// Sends a failed delivery of event `event_id` to endpoint `id` again: its attempts start
    /// over, the first at once. `workspace`: only its own endpoints are found. A receiver that
    /// was down longer than the retries last (12 attempts, about 27 minutes at the default
    /// base) lost the event for good (an outside audit).
    pub async fn redeliver(
        &self,
        by: &Actor,
        id: WebhookId,
        event_id: &str,
        workspace: Option<WorkspaceId>,
    ) -> Result<DeliveryRecord, AdminError> {
        self.change_by(by)?;
        let record = self
            .store
            .redeliver(id, event_id, workspace, by, self.now())
            .await
            .map_err(|e| match e {
                StoreError::NotFound => AdminError::NotFound(format!(
                    "no webhook {id}, or no delivery of event {event_id:?} to it"
                )),
                e => e.into(),
            })?;
        self.wake_webhooks();
        Ok(record)
    }

    /// An endpoint's latest deliveries (at most `limit`, up to 1000), newest first.
    pub async fn webhook_deliveries(
        &self,
        id: WebhookId,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, AdminError> {
        self.store
            .webhook_deliveries(id, limit.clamp(1, 1000))
            .await
            .map_err(not_found("webhook", id))
    }

    /// One of `workspace`'s own endpoints and its latest deliveries (at most `limit`), newest
    /// first; `NotFound` for an endpoint of another workspace or of the operator.
    pub async fn own_webhook_deliveries(
        &self,
        workspace: WorkspaceId,
        id: WebhookId,
        limit: u32,
    ) -> Result<(WebhookEndpoint, Vec<DeliveryRecord>), AdminError> {
        let endpoint = self
            .list_webhooks(Some(workspace))
            .await?
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| AdminError::NotFound(format!("no webhook {id}")))?;
        let deliveries = self.webhook_deliveries(id, limit).await?;
        Ok((endpoint, deliveries))
    }

    /// Audit entries, newest first, a page at a time.
    pub async fn audit(&self, query: AuditQuery) -> Result<AuditPage, AdminError> {
        let AuditQuery {
            workspace,
            actor,
            action,
            from,
            to,
            after,
            limit,
        } = query;
        let limit = match limit.unwrap_or(AUDIT_PAGE as i64) {
            n if n < 1 || n > MAX_AUDIT_PAGE as i64 => {
                return Err(invalid(format!(
                    "'limit' must be from 1 to {MAX_AUDIT_PAGE}"
                )))
            }
            n => n as u32,
        };
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(invalid("'from' must not be after 'to'"));
            }
        }
        let actor = match actor {
            Some(a) if a.len() > 2 * MAX_NAME => {
                return Err(invalid(format!(
                    "'actor' must be at most {} bytes",
                    2 * MAX_NAME
                )))
            }
            a => a,
        };
        let mut entries = self
            .store
            .audit_log(&AuditFilter {
                workspace,
                actor,
                action,
                from,
                to,
                after,
                limit: limit + 1,
            })
            .await?;
        let has_more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        Ok(AuditPage { entries, has_more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_texts_are_bounded_and_plain() {
        assert_eq!(name("name", "  acme ").unwrap(), "acme");
        for bad in ["", "   ", "a\u{0}b", "line\nbreak", "\u{1b}[31mred"] {
            assert!(name("name", bad).is_err(), "{bad:?}");
        }
        assert!(name("name", &"x".repeat(MAX_NAME)).is_ok());
        let e = name("name", &"x".repeat(MAX_NAME + 1)).unwrap_err();
        assert!(e.to_string().contains("at most 128"), "{e}");
        assert!(text("use_case", "two\nlines\tand a tab").is_ok());
        assert!(text("use_case", &"x".repeat(MAX_TEXT)).is_ok());
        assert!(text("use_case", &"x".repeat(MAX_TEXT + 1)).is_err());
        assert!(text("use_case", "bell\u{7}").is_err());
        assert!(text("use_case", " \n ").is_err());
    }

    #[test]
    fn an_overrides_patch_names_the_field() {
        let fields = json!({"requests_per_second": 2.5, "burst": 4, "tokens_per_month": null});
        let map = fields.as_object().unwrap();
        let patch = overrides_patch(map.iter().map(|(k, v)| (k.as_str(), v))).unwrap();
        assert_eq!(patch.requests_per_second, FieldPatch::Set(2.5));
        assert_eq!(patch.burst, FieldPatch::Set(4));
        assert_eq!(patch.tokens_per_month, FieldPatch::Clear);
        assert_eq!(patch.tokens_per_minute, FieldPatch::Keep);
        for (field, value, says) in [
            ("speed", json!(1), "limits.speed is not a limit"),
            ("burst", json!(-1), "limits.burst"),
            ("burst", json!(0), "burst"),
            ("tokens_per_minute", json!("5"), "limits.tokens_per_minute"),
            ("requests_per_second", json!(1e300), "requests_per_second"),
            (
                "concurrent_requests",
                json!(1.5),
                "limits.concurrent_requests",
            ),
        ] {
            let e = overrides_patch([(field, &value)]).unwrap_err().to_string();
            assert!(e.contains(says), "{field}={value}: {e}");
        }
    }
}
