//! The workspace's own API, with its key: its limits and usage (the data of the limits page),
//! its usage over time and per key (the console's charts), and its requests for higher limits. These routes count against no limit. Each handler's
//! `#[utoipa::path]` describes it in the OpenAPI document (`openapi`).

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::HeaderMap;
use axum::response::{Redirect, Response};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::NewWebhook;
use super::authenticate;
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, NoFields, OptionalJson, PathParam, QueryParams};
use super::openapi::{BadRequest, BodyErrors, ChangeErrors, NotFailed, NotFound, WorkspaceErrors};
use super::views::{
    created, usage_and_key_view, usage_history_view, CallingKeyView, LimitRequestView, List,
    NewWebhookView, NextTierView, OwnDeliveryView, SortedJson, UsageHistoryView, WebhookView,
    WorkspaceLimitsView, WorkspaceSummary,
};
use crate::app::AppState;
use crate::limiter::MonthKey;
use crate::model::{Actor, Budget, Overrides};

/// The workspace's own routes (and the limits page), each with its operation in the document.
pub fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::default()
        .routes(routes!(limits_page))
        .routes(routes!(limits))
        .routes(routes!(usage))
        .routes(routes!(create_limit_request, list_limit_requests))
        .routes(routes!(get_limit_request, withdraw_limit_request))
        .routes(routes!(get_budget, put_budget))
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(delete_webhook))
        .routes(routes!(webhook_deliveries))
        .routes(routes!(redeliver))
}

/// The limits page, which is the console's workspace page now.
#[utoipa::path(
    get,
    path = "/limits",
    tag = "workspace",
    operation_id = "limits_page",
    responses(
        (status = 308, description = "The limits page moved to the console: `Location: /console/workspace` (which asks to sign in first when there is no session).", headers(("location" = String, description = "`/console/workspace`"))),
    )
)]
async fn limits_page() -> Redirect {
    Redirect::permanent("/console/workspace")
}

/// Reads the workspace's limits and usage.
#[utoipa::path(
    get,
    path = "/v1/limits",
    tag = "workspace",
    operation_id = "get_limits",
    security(("workspace_key" = [])),
    responses(
        (status = 200, description = "The workspace's limits and usage. The limiter's figures are live; the ledger's (`requests_this_month`, `daily`) may be up to about 1.3 s behind.", body = WorkspaceLimitsView),
        WorkspaceErrors,
    )
)]
async fn limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<SortedJson<WorkspaceLimitsView>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let entry = &caller.workspace;
    let ws = &entry.workspace;
    let tiers = state.store.list_tiers().await?;
    let tier_limits = tiers
        .iter()
        .find(|t| t.name == ws.tier)
        .map(|t| t.limits.clone());
    // Asked with the key's limits, so that the limiter can tell the key's own windows too.
    let limits = caller.limits();
    let (usage, key_usage) = usage_and_key_view(&state, ws, &limits, None, None, false).await?;
    let key = limits.key.map(|scope| CallingKeyView {
        id: scope.id,
        limits: scope.limits,
        usage: key_usage,
    });
    let next_tier = state.admin.next_tier(ws, &tiers, false).await?;
    Ok(SortedJson(WorkspaceLimitsView {
        workspace: WorkspaceSummary {
            id: ws.id,
            name: ws.name.clone(),
            status: ws.status,
        },
        tier: ws.tier.clone(),
        limits: (*entry.limits).clone(),
        tier_limits,
        overrides: ws.overrides.clone(),
        usage,
        next_tier: next_tier.as_ref().map(NextTierView::from),
        key,
        shadowing: entry.shadowing.clone(),
        shadow_limits: entry.shadow.as_deref().cloned(),
    }))
}

/// `GET /v1/usage?month=YYYY-MM`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UsageQuery {
    /// The month whose days and keys to give, `YYYY-MM` (UTC), at most the current one;
    /// default: the current month. The hours are the last 48 whichever the month.
    month: Option<String>,
}

/// Reads the workspace's usage over time and per key.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "workspace",
    operation_id = "get_usage_history",
    security(("workspace_key" = [])),
    params(UsageQuery),
    responses(
        (status = 200, description = "The workspace's usage from the ledger: per day of the month (this month: so far), per hour over the last 48 hours, and per key that month (UTC). Added up across instances; up to about 1.3 s behind.", body = UsageHistoryView),
        BadRequest,
        WorkspaceErrors,
    )
)]
async fn usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<QueryParams<UsageQuery>, ApiError>,
) -> Result<SortedJson<UsageHistoryView>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    // The query is checked once the caller is known: without a key, `401` whatever it asks.
    let QueryParams(query) = query?;
    let month = query
        .month
        .as_deref()
        .map(|m| super::views::past_month(m, MonthKey::of(state.clock.now())))
        .transpose()?;
    Ok(SortedJson(
        usage_history_view(&state, &entry.workspace, false, month).await?,
    ))
}

/// Reads the workspace's own monthly caps.
#[utoipa::path(
    get,
    path = "/v1/budget",
    tag = "workspace",
    operation_id = "get_budget",
    security(("workspace_key" = [])),
    responses(
        (status = 200, description = "The workspace's budget: `tokens_per_month` (`null`: none) and per-model caps.", body = Budget),
        WorkspaceErrors,
    )
)]
async fn get_budget(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<SortedJson<Budget>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    Ok(SortedJson(entry.workspace.budget.clone()))
}

/// The whole budget to set: each part may be left out.
// Only the document's: the body is read as `model::Budget`, whose schema is the answer's, where
// `tokens_per_month` is always sent.
#[derive(ToSchema)]
#[allow(dead_code)]
struct BudgetChange {
    /// Tokens per calendar month (UTC) for the whole workspace, at most its month limit; `null`
    /// or left out: none.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000.0)]
    tokens_per_month: Option<u64>,
    /// Tokens per month per model (at most 64 models), each at most the model's month limit and
    /// the workspace's; left out: none.
    #[schema(nullable = false)]
    models: Option<std::collections::BTreeMap<String, BudgetCap>>,
}

/// A model's cap in a budget.
#[derive(ToSchema)]
#[schema(minimum = 1, maximum = 1_000_000_000_000_000.0)]
#[allow(dead_code)]
struct BudgetCap(u64);

/// Sets the workspace's own monthly caps, below its limits: a request that would go past one is
/// a `429` (`quota_exceeded`, code `workspace_budget` or `model_budget`).
// The key is checked before the body is read (the body is bounded either way).
#[utoipa::path(
    put,
    path = "/v1/budget",
    tag = "workspace",
    operation_id = "put_budget",
    security(("workspace_key" = [])),
    request_body(content = BudgetChange, description = "The whole budget: `tokens_per_month` (`null` or left out: none) and `models` (left out: none)."),
    responses(
        (status = 200, description = "The budget, set.", body = Budget),
        BodyErrors,
        WorkspaceErrors,
        ChangeErrors,
    )
)]
async fn put_budget(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Request,
) -> Result<SortedJson<Budget>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    let JsonBody(budget) = JsonBody::<Budget>::from_request(body, &state).await?;
    let id = entry.workspace.id;
    let ws = state
        .admin
        .set_budget(&Actor::workspace(id), id, budget)
        .await?;
    Ok(SortedJson(ws.budget))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewLimitRequest {
    /// What the limits are for: 1 to 4096 bytes, no control characters other than line breaks
    /// and tabs.
    use_case: String,
    /// What the workspace expects to send under the new limits (e.g. "2M tokens a day, peaks
    /// of 20 requests/s"): optional, 1 to 4096 bytes as `use_case`.
    #[serde(default)]
    expected_volume: Option<String>,
    /// The limits asked for: at least one.
    // Required in the document: left out, it names none, which is refused.
    #[serde(default)]
    #[schema(required = true)]
    requested_limits: Overrides,
}

/// Too many requests waiting for an answer.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum TooManyPending {
    /// The workspace already has 10 requests waiting for an answer (`conflict`).
    #[response(status = 409)]
    Conflict(ErrorBody<'static>),
}

/// Asks for higher limits.
// The key is checked before the body is read (the body is bounded either way).
#[utoipa::path(
    post,
    path = "/v1/limit-requests",
    tag = "workspace",
    operation_id = "create_limit_request",
    security(("workspace_key" = [])),
    request_body = NewLimitRequest,
    responses(
        (status = 201, description = "The request, `pending` until an operator answers.", body = LimitRequestView),
        BodyErrors,
        TooManyPending,
        WorkspaceErrors,
        ChangeErrors,
    )
)]
async fn create_limit_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Request,
) -> Result<Response, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    let JsonBody(body) = JsonBody::<NewLimitRequest>::from_request(body, &state).await?;
    let id = entry.workspace.id;
    let request = state
        .admin
        .create_limit_request(
            &Actor::workspace(id),
            id,
            &body.use_case,
            body.expected_volume.as_deref(),
            &body.requested_limits,
        )
        .await?;
    Ok(created(LimitRequestView::from(&request)))
}

/// Lists the workspace's increase requests.
#[utoipa::path(
    get,
    path = "/v1/limit-requests",
    tag = "workspace",
    operation_id = "list_own_limit_requests",
    security(("workspace_key" = [])),
    responses(
        (status = 200, description = "The workspace's increase requests and their answers.", body = List<LimitRequestView>),
        WorkspaceErrors,
    )
)]
async fn list_limit_requests(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<SortedJson<List<LimitRequestView>>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    let list = state
        .admin
        .list_limit_requests(Some(entry.workspace.id), None)
        .await?;
    Ok(SortedJson(List::of(
        list.iter().map(LimitRequestView::from).collect(),
    )))
}

/// Reads one of the workspace's increase requests.
#[utoipa::path(
    get,
    path = "/v1/limit-requests/{id}",
    tag = "workspace",
    operation_id = "get_own_limit_request",
    security(("workspace_key" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The request's id.")),
    responses(
        (status = 200, description = "The request and its answer, if any.", body = LimitRequestView),
        BadRequest,
        NotFound,
        WorkspaceErrors,
    )
)]
async fn get_limit_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<PathParam<i64>, ApiError>,
) -> Result<SortedJson<LimitRequestView>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    // The id is checked once the caller is known: without a key, `401` whatever the path.
    let PathParam(id) = id?;
    let request = state
        .admin
        .get_limit_request(id, Some(entry.workspace.id))
        .await?;
    Ok(SortedJson(LimitRequestView::from(&request)))
}

/// The conflict of withdrawing a request that was already answered.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum NotPending {
    /// The request was already approved, denied or withdrawn (`conflict`).
    #[response(status = 409)]
    Conflict(ErrorBody<'static>),
}

/// Withdraws one of the workspace's requests that no operator has answered yet.
#[utoipa::path(
    delete,
    path = "/v1/limit-requests/{id}",
    tag = "workspace",
    operation_id = "withdraw_own_limit_request",
    security(("workspace_key" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The request's id.")),
    responses(
        (status = 200, description = "The request, `withdrawn`: it no longer counts among the 10 that may wait.", body = LimitRequestView),
        BadRequest,
        NotFound,
        NotPending,
        WorkspaceErrors,
        ChangeErrors,
    )
)]
async fn withdraw_limit_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<PathParam<i64>, ApiError>,
    body: Request,
) -> Result<SortedJson<LimitRequestView>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    let PathParam(id) = id?;
    // A field in the body is refused, as in the other `DELETE`s.
    OptionalJson::<NoFields>::from_request(body, &state).await?;
    let ws = entry.workspace.id;
    let request = state
        .admin
        .withdraw_limit_request(&Actor::workspace(ws), ws, id)
        .await?;
    Ok(SortedJson(LimitRequestView::from(&request)))
}

/// Too many endpoints.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum TooManyWebhooks {
    /// The workspace already has 10 endpoints (`conflict`).
    #[response(status = 409)]
    Conflict(ErrorBody<'static>),
}

/// Registers an endpoint that gets this workspace's events only.
// The key is checked before the body is read.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "workspace",
    operation_id = "create_own_webhook",
    security(("workspace_key" = [])),
    request_body = NewWebhook,
    responses(
        (status = 201, description = "The endpoint, with its signing secret: shown this once.", body = NewWebhookView),
        BodyErrors,
        TooManyWebhooks,
        WorkspaceErrors,
        ChangeErrors,
    )
)]
async fn create_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Request,
) -> Result<Response, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    let JsonBody(body) = JsonBody::<NewWebhook>::from_request(body, &state).await?;
    let id = entry.workspace.id;
    let (url, events) = body.parts();
    let (endpoint, secret) = state
        .admin
        .create_webhook(&Actor::workspace(id), Some(id), url, events)
        .await?;
    Ok(created(NewWebhookView {
        info: WebhookView::from(&endpoint),
        secret,
    }))
}

/// Lists the workspace's own endpoints.
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "workspace",
    operation_id = "list_own_webhooks",
    security(("workspace_key" = [])),
    responses(
        (status = 200, description = "The workspace's endpoints; never their secrets.", body = List<WebhookView>),
        WorkspaceErrors,
    )
)]
async fn list_webhooks(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<SortedJson<List<WebhookView>>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    let list = state.admin.list_webhooks(Some(entry.workspace.id)).await?;
    Ok(SortedJson(List::of(
        list.iter().map(WebhookView::from).collect(),
    )))
}

/// Removes one of the workspace's own endpoints.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "workspace",
    operation_id = "delete_own_webhook",
    security(("workspace_key" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "The endpoint removed.", body = WebhookView),
        BadRequest,
        NotFound,
        WorkspaceErrors,
        ChangeErrors,
    )
)]
async fn delete_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<PathParam<i64>, ApiError>,
    body: Request,
) -> Result<SortedJson<WebhookView>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    // The id is checked once the caller is known: without a key, `401` whatever the path.
    let PathParam(id) = id?;
    // A field in the body is refused, as in the admin API's `DELETE`s.
    OptionalJson::<NoFields>::from_request(body, &state).await?;
    let ws = entry.workspace.id;
    let endpoint = state
        .admin
        .delete_webhook(&Actor::workspace(ws), id, Some(ws))
        .await?;
    Ok(SortedJson(WebhookView::from(&endpoint)))
}

/// Lists the latest deliveries (at most 100) to one of the workspace's own endpoints, newest
/// first.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    tag = "workspace",
    operation_id = "list_own_webhook_deliveries",
    security(("workspace_key" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "Each event sent to it, its status and attempts (not what the endpoint answered).", body = List<OwnDeliveryView>),
        BadRequest,
        NotFound,
        WorkspaceErrors,
    )
)]
async fn webhook_deliveries(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<PathParam<i64>, ApiError>,
) -> Result<SortedJson<List<OwnDeliveryView>>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    // The id is checked once the caller is known: without a key, `401` whatever the path.
    let PathParam(id) = id?;
    let (_, list) = state
        .admin
        .own_webhook_deliveries(entry.workspace.id, id, 100)
        .await?;
    Ok(SortedJson(List::of(
        list.iter().map(OwnDeliveryView::from).collect(),
    )))
}

/// Sends a failed delivery to one of the workspace's own endpoints again: its 12 attempts start
/// over, the first at once.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/deliveries/{event_id}/redeliver",
    tag = "workspace",
    operation_id = "redeliver_own_webhook_delivery",
    security(("workspace_key" = [])),
    params(
        ("id" = i64, Path, minimum = 1, description = "The endpoint's id."),
        ("event_id" = String, Path, description = "The event's id (`webhook-id`), as its deliveries list it."),
    ),
    responses(
        (status = 200, description = "The delivery, pending again.", body = OwnDeliveryView),
        BadRequest,
        NotFound,
        NotFailed,
        WorkspaceErrors,
        ChangeErrors,
    )
)]
async fn redeliver(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<PathParam<(i64, String)>, ApiError>,
    body: Request,
) -> Result<SortedJson<OwnDeliveryView>, ApiError> {
    let entry = authenticate(&state, &headers).await?.workspace;
    // The path is checked once the caller is known: without a key, `401` whatever the path.
    let PathParam((id, event_id)) = path?;
    if id <= 0 {
        return Err(ApiError::BadRequest(format!(
            "invalid path: the endpoint's id {id} is not a whole number above 0"
        )));
    }
    OptionalJson::<NoFields>::from_request(body, &state).await?;
    let ws = entry.workspace.id;
    let record = state
        .admin
        .redeliver(&Actor::workspace(ws), id, &event_id, Some(ws))
        .await?;
    Ok(SortedJson(OwnDeliveryView::from(&record)))
}
