//! The admin API, `/admin/v1`, behind `Authorization: Bearer <admin token>`. Each handler parses
//! the request, calls the operation of `crate::admin::Admin` (which validates, records the
//! change in the audit under the token's name, and refreshes this instance's catalogue before
//! it returns, so a change holds from the next request), and renders the answer, a typed view
//! (`views`). Each handler's `#[utoipa::path]` describes it in the OpenAPI document (`openapi`);
//! `api` registers the handlers and their documentation together.

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::extract::{query_id, JsonBody, NoFields, OptionalJson, PathParam, QueryParams};
use super::openapi::{AdminErrors, BadRequest, BodyErrors, NotFailed, NotFound};
use super::views::{
    audit_action_schema, created, usage_view, workspace_view, AuditEntryView, AuditPageView,
    DeliveryView, KeyView, LimitRequestView, List, ListObject, NewKeyView, NewWebhookView,
    SortedJson, TierView, UsageView, WebhookView, WorkspaceView,
};
use crate::admin::{self, AuditQuery, NewKeyInput, WorkspaceUpdate};
use crate::app::AppState;
use crate::config::AdminToken;
use crate::model::{
    shadow_list, Actor, Attributes, Enforcement, KeyId, LimitRequestId, LimitRequestStatus,
    Overrides, ShadowLimit, TierSpec, WorkspaceId, WorkspaceStatus,
};

/// The admin API's routes, relative to `/admin/v1`, each with its operation in the document.
pub fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::default()
        .routes(routes!(create_workspace, list_workspaces))
        .routes(routes!(get_workspace, patch_workspace))
        .routes(routes!(put_attributes))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(usage))
        .routes(routes!(revoke_key, patch_key))
        .routes(routes!(list_tiers))
        .routes(routes!(put_tier))
        .routes(routes!(list_limit_requests))
        .routes(routes!(get_limit_request))
        .routes(routes!(approve))
        .routes(routes!(deny))
        .routes(routes!(audit))
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(redeliver))
        .routes(routes!(delete_webhook))
        .routes(routes!(webhook_deliveries))
}

/// Proof that the request carries an admin token: the actor the audit records, the token's
/// name.
pub struct AdminActor(pub Actor);

impl FromRequestParts<Arc<AppState>> for AdminActor {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let tokens = &state.config.admin_tokens;
        if tokens.is_empty() {
            return Err(ApiError::AdminDisabled);
        }
        let given = super::bearer(&parts.headers).ok_or_else(|| {
            ApiError::Unauthorized(super::no_bearer(
                &parts.headers,
                "Missing admin token: send 'Authorization: Bearer <admin token>'.",
            ))
        })?;
        match admin_token(tokens, given) {
            Some(t) => Ok(AdminActor(Actor::admin(&t.name))),
            None => Err(ApiError::Unauthorized("Invalid admin token.")),
        }
    }
}

/// The configured admin token `given` is, if any (the admin API's and the console's sign-in
/// check). Digests are compared, with every configured token, so that the time taken says
/// nothing about how close a guess was or which token it was near.
pub(super) fn admin_token<'a>(tokens: &'a [AdminToken], given: &str) -> Option<&'a AdminToken> {
    let given = Sha256::digest(given.as_bytes());
    let mut found = None;
    for t in tokens {
        if Sha256::digest(t.token.as_bytes()) == given {
            found = Some(t);
        }
    }
    found
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateWorkspace {
    /// 1 to 128 characters after trimming, without control characters.
    name: String,
    /// The tier's name; `free` when left out.
    tier: Option<String>,
}

/// Creates a workspace.
#[utoipa::path(
    post,
    path = "/workspaces",
    tag = "admin",
    operation_id = "create_workspace",
    security(("admin_token" = [])),
    request_body = CreateWorkspace,
    responses(
        (status = 201, description = "The workspace, made.", body = WorkspaceView),
        BodyErrors,
        AdminErrors,
    )
)]
async fn create_workspace(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<CreateWorkspace>,
) -> Result<Response, ApiError> {
    let ws = state
        .admin
        .create_workspace(&by, &body.name, body.tier.as_deref())
        .await?;
    Ok(created(workspace_view(&state.catalog, &ws)))
}

/// Lists the workspaces.
#[utoipa::path(
    get,
    path = "/workspaces",
    tag = "admin",
    operation_id = "list_workspaces",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every workspace.", body = List<WorkspaceView>),
        AdminErrors,
    )
)]
async fn list_workspaces(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
) -> Result<SortedJson<List<WorkspaceView>>, ApiError> {
    let all = state.admin.list_workspaces().await?;
    Ok(SortedJson(List::of(
        all.iter()
            .map(|w| workspace_view(&state.catalog, w))
            .collect(),
    )))
}

/// Reads a workspace.
#[utoipa::path(
    get,
    path = "/workspaces/{id}",
    tag = "admin",
    operation_id = "get_workspace",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The workspace's id.")),
    responses(
        (status = 200, description = "The workspace.", body = WorkspaceView),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn get_workspace(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
) -> Result<SortedJson<WorkspaceView>, ApiError> {
    let ws = state.admin.get_workspace(id).await?;
    Ok(SortedJson(workspace_view(&state.catalog, &ws)))
}

/// At least one of the six.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchWorkspace {
    /// `true` holds the workspace on its tier: it is never promoted automatically.
    pinned: Option<bool>,
    /// A tier's name.
    tier: Option<String>,
    /// `{"requests_per_second": n|null, ...}`: a number sets, null clears, a field left out
    /// keeps.
    #[schema(schema_with = super::openapi::overrides_patch)]
    #[serde(default, deserialize_with = "present")]
    limits: Option<Option<Map<String, Value>>>,
    #[schema(value_type = Option<WorkspaceStatus>)]
    status: Option<String>,
    /// `enforce` or `shadow` for this workspace's limits; null: the tier's.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Enforcement>, nullable)]
    enforcement: Option<Option<String>>,
    /// Limits in shadow for this workspace, beside the tier's; null: none of its own.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<ShadowLimit>>, nullable)]
    shadow: Option<Option<Value>>,
}

/// A field that is present, `null` included (`Some(None)`); a field left out is `None`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// Changes a workspace's tier, overrides and/or status.
#[utoipa::path(
    patch,
    path = "/workspaces/{id}",
    tag = "admin",
    operation_id = "update_workspace",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The workspace's id.")),
    request_body = PatchWorkspace,
    responses(
        (status = 200, description = "The workspace, changed (tier, overrides and status in one transaction).", body = WorkspaceView),
        BodyErrors,
        NotFound,
        AdminErrors,
    )
)]
async fn patch_workspace(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
    JsonBody(body): JsonBody<PatchWorkspace>,
) -> Result<SortedJson<WorkspaceView>, ApiError> {
    // `null` is not "none": read as left out, it cleared nothing while the answer was `200`
    // (an outside audit, with Schemathesis).
    let limits = match body.limits {
        Some(Some(limits)) => limits,
        None => Map::new(),
        Some(None) => {
            return Err(ApiError::BadRequest(
                "'limits' must be an object; to clear an override, set it to null within it (\"limits\": {\"tokens_per_minute\": null})".into(),
            ))
        }
    };
    let update = WorkspaceUpdate {
        tier: body.tier,
        overrides: admin::overrides_patch(limits.iter().map(|(k, v)| (k.as_str(), v)))?,
        status: body
            .status
            .as_deref()
            .map(admin::workspace_status)
            .transpose()?,
        pinned: body.pinned,
        enforcement: body
            .enforcement
            .map(|e| e.as_deref().map(Enforcement::parse).transpose())
            .transpose()
            .map_err(ApiError::BadRequest)?,
        shadow: body
            .shadow
            .map(|s| s.map(shadow_list).transpose())
            .transpose()
            .map_err(ApiError::BadRequest)?,
    };
    let ws = state.admin.update_workspace(&by, id, update).await?;
    Ok(SortedJson(workspace_view(&state.catalog, &ws)))
}

/// Replaces a workspace's attributes: what the operator's own systems know of it (numbers and
/// booleans, e.g. `{"paid_usd": 50, "verified": true}`), which tiers' promotion conditions
/// read. The workspace is promoted at once if they now make it qualify.
#[utoipa::path(
    put,
    path = "/workspaces/{id}/attributes",
    tag = "admin",
    operation_id = "put_workspace_attributes",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The workspace's id.")),
    request_body(content = Attributes, description = "All of the attributes (at most 64; names 1 to 64 of `a-z A-Z 0-9 _ - .`): a number or a boolean each."),
    responses(
        (status = 200, description = "The workspace, its attributes replaced (and its tier, if that promoted it).", body = WorkspaceView),
        BodyErrors,
        NotFound,
        AdminErrors,
    )
)]
async fn put_attributes(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
    JsonBody(attributes): JsonBody<Attributes>,
) -> Result<SortedJson<WorkspaceView>, ApiError> {
    let ws = state.admin.set_attributes(&by, id, attributes).await?;
    Ok(SortedJson(workspace_view(&state.catalog, &ws)))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    /// 1 to 128 characters after trimming, without control characters.
    name: Option<String>,
    /// RFC 3339 instant.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// Makes an API key for a workspace.
#[utoipa::path(
    post,
    path = "/workspaces/{id}/keys",
    tag = "admin",
    operation_id = "create_key",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The workspace's id.")),
    request_body(content = Option<CreateKey>, description = "May be left out (an empty body)."),
    responses(
        (status = 201, description = "The key, with its secret: shown this once.", body = NewKeyView),
        BodyErrors,
        NotFound,
        AdminErrors,
    )
)]
async fn create_key(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
    OptionalJson(body): OptionalJson<CreateKey>,
) -> Result<Response, ApiError> {
    let input = NewKeyInput {
        name: body.name,
        expires_at: body.expires_at,
    };
    let (key, secret) = state.admin.create_key(&by, id, input).await?;
    Ok(created(NewKeyView {
        info: KeyView::from(&key),
        key: secret,
    }))
}

/// Lists a workspace's keys.
#[utoipa::path(
    get,
    path = "/workspaces/{id}/keys",
    tag = "admin",
    operation_id = "list_keys",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The workspace's id.")),
    responses(
        (status = 200, description = "The workspace's keys, revoked ones included; never their secrets.", body = List<KeyView>),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn list_keys(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
) -> Result<SortedJson<List<KeyView>>, ApiError> {
    let keys = state.admin.list_keys(id).await?;
    Ok(SortedJson(List::of(
        keys.iter().map(KeyView::from).collect(),
    )))
}

/// Revokes a key.
#[utoipa::path(
    delete,
    path = "/keys/{id}",
    tag = "admin",
    operation_id = "revoke_key",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The key's id.")),
    responses(
        (status = 200, description = "The key, revoked at once.", body = KeyView),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn revoke_key(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<KeyId>,
    _: OptionalJson<NoFields>,
) -> Result<SortedJson<KeyView>, ApiError> {
    let key = state.admin.revoke_key(&by, id).await?;
    Ok(SortedJson(KeyView::from(&key)))
}

/// `{"limits": {...}}`; `null` or `{}` clears them.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchKey {
    /// The key's own limits, replacing those it has: `requests_per_second`, `burst`,
    /// `tokens_per_minute`, `tokens_per_month` (the names of overrides), each at most the
    /// workspace's effective limit now; `null` or `{}`: none of its own.
    #[serde(deserialize_with = "required")]
    #[schema(schema_with = super::openapi::key_limits_patch, required = true)]
    limits: Value,
}

/// A field that must be given, `null` included (which `Option` would take for left out).
fn required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Value::deserialize(d)
}

/// What the key's route may answer besides its own.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum KeyRevoked {
    /// The key is revoked (`conflict`): its limits can no longer be changed.
    #[response(status = 409)]
    Conflict(super::error::ErrorBody<'static>),
}

/// Sets or clears a key's own limits.
#[utoipa::path(
    patch,
    path = "/keys/{id}",
    tag = "admin",
    operation_id = "update_key",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The key's id.")),
    request_body = PatchKey,
    responses(
        (status = 200, description = "The key, its limits replaced; they hold from its next request (on other instances within `catalog_refresh_ms`).", body = KeyView),
        BodyErrors,
        NotFound,
        KeyRevoked,
        AdminErrors,
    )
)]
async fn patch_key(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<KeyId>,
    JsonBody(body): JsonBody<PatchKey>,
) -> Result<SortedJson<KeyView>, ApiError> {
    let limits = admin::key_limits(&body.limits)?;
    let key = state.admin.set_key_limits(&by, id, limits).await?;
    Ok(SortedJson(KeyView::from(&key)))
}

/// Lists the tiers.
#[utoipa::path(
    get,
    path = "/tiers",
    tag = "admin",
    operation_id = "list_tiers",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tier catalogue.", body = List<TierView>),
        AdminErrors,
    )
)]
async fn list_tiers(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
) -> Result<SortedJson<List<TierView>>, ApiError> {
    let tiers = state.admin.list_tiers().await?;
    Ok(SortedJson(List::of(
        tiers.iter().map(TierView::from).collect(),
    )))
}

/// Creates or replaces a tier.
#[utoipa::path(
    put,
    path = "/tiers/{name}",
    tag = "admin",
    operation_id = "put_tier",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The tier's name: 1 to 64 of `a-z A-Z 0-9 - _ .`.")),
    request_body(content = TierSpec, description = "The tier's rank and limits, all of them: a limit left out is no limit, a rank left out puts the tier off the ladder."),
    responses(
        (status = 200, description = "The tier, made or replaced.", body = TierView),
        BodyErrors,
        AdminErrors,
    )
)]
async fn put_tier(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(name): PathParam<String>,
    JsonBody(spec): JsonBody<TierSpec>,
) -> Result<SortedJson<TierView>, ApiError> {
    let tier = state.admin.put_tier(&by, &name, spec).await?;
    Ok(SortedJson(TierView::from(&tier)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Range {
    /// The first day, `YYYY-MM-DD`; default: the first of this month (UTC).
    #[param(format = Date)]
    from: Option<String>,
    /// The last day, `YYYY-MM-DD`; default: today (UTC).
    #[param(format = Date)]
    to: Option<String>,
}

/// Reads a workspace's usage over a range of days.
#[utoipa::path(
    get,
    path = "/workspaces/{id}/usage",
    tag = "admin",
    operation_id = "get_usage",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The workspace's id."), Range),
    responses(
        (status = 200, description = "The workspace's usage, the ledger's figures exact.", body = UsageView),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn usage(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
    QueryParams(range): QueryParams<Range>,
) -> Result<SortedJson<UsageView>, ApiError> {
    let ws = state.admin.get_workspace(id).await?;
    let limits = state
        .catalog
        .limits_of(id)
        .map(|l| (*l).clone())
        .unwrap_or_default();
    Ok(SortedJson(
        usage_view(&state, &ws, &limits, range.from, range.to, true).await?,
    ))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LimitRequestFilter {
    #[param(value_type = Option<LimitRequestStatus>)]
    status: Option<String>,
    /// Only this workspace's.
    #[serde(default, deserialize_with = "query_id")]
    #[param(minimum = 1)]
    workspace_id: Option<i64>,
}

/// Lists the increase requests.
#[utoipa::path(
    get,
    path = "/limit-requests",
    tag = "admin",
    operation_id = "list_limit_requests",
    security(("admin_token" = [])),
    params(LimitRequestFilter),
    responses(
        (status = 200, description = "Every workspace's increase requests, or those the filters select.", body = List<LimitRequestView>),
        BadRequest,
        AdminErrors,
    )
)]
async fn list_limit_requests(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    QueryParams(filter): QueryParams<LimitRequestFilter>,
) -> Result<SortedJson<List<LimitRequestView>>, ApiError> {
    let status = filter
        .status
        .as_deref()
        .map(admin::limit_request_status)
        .transpose()?;
    let all = state
        .admin
        .list_limit_requests(filter.workspace_id, status)
        .await?;
    Ok(SortedJson(List::of(
        all.iter().map(LimitRequestView::from).collect(),
    )))
}

/// Reads one increase request.
#[utoipa::path(
    get,
    path = "/limit-requests/{id}",
    tag = "admin",
    operation_id = "get_limit_request",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The limit request's id.")),
    responses(
        (status = 200, description = "The request, whichever its workspace.", body = LimitRequestView),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn get_limit_request(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<LimitRequestId>,
) -> Result<SortedJson<LimitRequestView>, ApiError> {
    let request = state.admin.get_limit_request(id, None).await?;
    Ok(SortedJson(LimitRequestView::from(&request)))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct Approve {
    /// The overrides to set; left out, what was asked. Figures only: an approval grants
    /// limits, and a `null` (which would clear an override on `PATCH`) is refused.
    #[schema(nullable = false)]
    #[serde(default, deserialize_with = "granted")]
    limits: Option<Overrides>,
    /// Words to the workspace, which it reads as the request's `reason` (why other figures were
    /// granted, say): 1 to 4096 bytes.
    #[serde(default)]
    reason: Option<String>,
}

/// An approval's `limits`, refusing a `null` figure: read as overrides, it was left out, and the
/// override it named stayed as it was while the approval answered `200` (an outside audit).
fn granted<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Overrides>, D::Error> {
    use serde::de::Error;
    let Some(fields) = Option::<serde_json::Map<String, serde_json::Value>>::deserialize(d)? else {
        return Ok(None);
    };
    Overrides::granted(fields, "PATCH /admin/v1/workspaces/{id}")
        .map(Some)
        .map_err(D::Error::custom)
}

/// The conflict of an answer to a request already answered.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum AlreadyDecided {
    /// The request was already approved, denied or withdrawn (`conflict`).
    #[response(status = 409)]
    Conflict(super::error::ErrorBody<'static>),
}

/// Approves an increase request.
#[utoipa::path(
    post,
    path = "/limit-requests/{id}/approve",
    tag = "admin",
    operation_id = "approve_limit_request",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The limit request's id.")),
    request_body(content = Option<Approve>, description = "May be left out (an empty body): grants what was asked."),
    responses(
        (status = 200, description = "The request, approved; the workspace's overrides are set.", body = LimitRequestView),
        BodyErrors,
        NotFound,
        AlreadyDecided,
        AdminErrors,
    )
)]
async fn approve(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<LimitRequestId>,
    OptionalJson(body): OptionalJson<Approve>,
) -> Result<SortedJson<LimitRequestView>, ApiError> {
    let request = state
        .admin
        .approve_limit_request(&by, id, body.limits.as_ref(), body.reason.as_deref())
        .await?;
    Ok(SortedJson(LimitRequestView::from(&request)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Deny {
    /// What the workspace reads: 1 to 4096 bytes.
    reason: String,
}

/// Denies an increase request.
#[utoipa::path(
    post,
    path = "/limit-requests/{id}/deny",
    tag = "admin",
    operation_id = "deny_limit_request",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The limit request's id.")),
    request_body = Deny,
    responses(
        (status = 200, description = "The request, denied.", body = LimitRequestView),
        BodyErrors,
        NotFound,
        AlreadyDecided,
        AdminErrors,
    )
)]
async fn deny(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<LimitRequestId>,
    JsonBody(body): JsonBody<Deny>,
) -> Result<SortedJson<LimitRequestView>, ApiError> {
    let request = state
        .admin
        .deny_limit_request(&by, id, &body.reason)
        .await?;
    Ok(SortedJson(LimitRequestView::from(&request)))
}

/// `GET /admin/v1/audit?workspace_id=&actor=&action=&from=&to=&after=&limit=`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// Only the entries about this workspace.
    #[serde(default, deserialize_with = "query_id")]
    #[param(minimum = 1)]
    workspace_id: Option<i64>,
    /// Exact.
    actor: Option<String>,
    #[param(schema_with = audit_action_schema)]
    action: Option<String>,
    /// RFC 3339, inclusive.
    #[param(format = DateTime)]
    from: Option<String>,
    /// RFC 3339, exclusive.
    #[param(format = DateTime)]
    to: Option<String>,
    /// An entry id: continue with the entries older than it.
    #[serde(default, deserialize_with = "query_id")]
    #[param(minimum = 1)]
    after: Option<i64>,
    /// Entries per page, 1 to 1000; default 100.
    limit: Option<i64>,
}

/// Reads the audit log.
#[utoipa::path(
    get,
    path = "/audit",
    tag = "admin",
    operation_id = "list_audit_entries",
    security(("admin_token" = [])),
    params(AuditParams),
    responses(
        (status = 200, description = "The audit log, newest first, a page at a time.", body = AuditPageView),
        BadRequest,
        AdminErrors,
    )
)]
async fn audit(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    QueryParams(p): QueryParams<AuditParams>,
) -> Result<SortedJson<AuditPageView>, ApiError> {
    let query = AuditQuery {
        workspace: p.workspace_id,
        actor: p.actor,
        action: p.action.as_deref().map(admin::audit_action).transpose()?,
        from: p
            .from
            .as_deref()
            .map(|s| admin::instant("from", s))
            .transpose()?,
        to: p
            .to
            .as_deref()
            .map(|s| admin::instant("to", s))
            .transpose()?,
        after: p.after,
        limit: p.limit,
    };
    let page = state.admin.audit(query).await?;
    Ok(SortedJson(AuditPageView {
        object: ListObject::List,
        data: page.entries.iter().map(AuditEntryView::from).collect(),
        has_more: page.has_more,
        last_id: page.entries.last().map(|e| e.id),
    }))
}

/// A webhook endpoint to register.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewWebhook {
    /// `http` or `https`, with a host; redirects are not followed.
    url: String,
    /// At least one of `limit_request.created`, `limit_request.decided`,
    /// `workspace.tier_changed`, `workspace.suspended`, `quota.threshold`.
    events: Vec<String>,
}

impl NewWebhook {
    pub(super) fn parts(&self) -> (&str, &[String]) {
        (&self.url, &self.events)
    }
}

/// Registers a webhook endpoint that gets every workspace's events.
#[utoipa::path(
    post,
    path = "/webhooks",
    tag = "admin",
    operation_id = "create_webhook",
    security(("admin_token" = [])),
    request_body = NewWebhook,
    responses(
        (status = 201, description = "The endpoint, with its signing secret: shown this once.", body = NewWebhookView),
        BodyErrors,
        AdminErrors,
    )
)]
async fn create_webhook(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<NewWebhook>,
) -> Result<Response, ApiError> {
    let (url, events) = body.parts();
    let (endpoint, secret) = state.admin.create_webhook(&by, None, url, events).await?;
    Ok(created(NewWebhookView {
        info: WebhookView::from(&endpoint),
        secret,
    }))
}

/// Lists the webhook endpoints, the operator's and the workspaces' own.
#[utoipa::path(
    get,
    path = "/webhooks",
    tag = "admin",
    operation_id = "list_webhooks",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every endpoint; never their secrets.", body = List<WebhookView>),
        AdminErrors,
    )
)]
async fn list_webhooks(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
) -> Result<SortedJson<List<WebhookView>>, ApiError> {
    let list = state.admin.list_webhooks(None).await?;
    Ok(SortedJson(List::of(
        list.iter().map(WebhookView::from).collect(),
    )))
}

/// Removes a webhook endpoint (any workspace's too), and its deliveries still pending.
#[utoipa::path(
    delete,
    path = "/webhooks/{id}",
    tag = "admin",
    operation_id = "delete_webhook",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "The endpoint removed.", body = WebhookView),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn delete_webhook(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<i64>,
    _: OptionalJson<NoFields>,
) -> Result<SortedJson<WebhookView>, ApiError> {
    let endpoint = state.admin.delete_webhook(&by, id, None).await?;
    Ok(SortedJson(WebhookView::from(&endpoint)))
}

/// Sends a failed delivery again: its 12 attempts start over, the first at once.
#[utoipa::path(
    post,
    path = "/webhooks/{id}/deliveries/{event_id}/redeliver",
    tag = "admin",
    operation_id = "redeliver_webhook_delivery",
    security(("admin_token" = [])),
    params(
        ("id" = i64, Path, minimum = 1, description = "The endpoint's id."),
        ("event_id" = String, Path, description = "The event's id (`webhook-id`), as its deliveries list it."),
    ),
    responses(
        (status = 200, description = "The delivery, pending again.", body = DeliveryView),
        BadRequest,
        NotFound,
        NotFailed,
        AdminErrors,
    )
)]
async fn redeliver(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam((id, event_id)): PathParam<(i64, String)>,
    _: OptionalJson<NoFields>,
) -> Result<SortedJson<DeliveryView>, ApiError> {
    if id <= 0 {
        return Err(ApiError::BadRequest(format!(
            "invalid path: the endpoint's id {id} is not a whole number above 0"
        )));
    }
    let record = state.admin.redeliver(&by, id, &event_id, None).await?;
    Ok(SortedJson(DeliveryView::from(&record)))
}

/// Lists an endpoint's latest deliveries (at most 100), newest first.
#[utoipa::path(
    get,
    path = "/webhooks/{id}/deliveries",
    tag = "admin",
    operation_id = "list_webhook_deliveries",
    security(("admin_token" = [])),
    params(("id" = i64, Path, minimum = 1, description = "The endpoint's id.")),
    responses(
        (status = 200, description = "Each event sent to it, its status and attempts.", body = List<DeliveryView>),
        BadRequest,
        NotFound,
        AdminErrors,
    )
)]
async fn webhook_deliveries(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<i64>,
) -> Result<SortedJson<List<DeliveryView>>, ApiError> {
    let list = state.admin.webhook_deliveries(id, 100).await?;
    Ok(SortedJson(List::of(
        list.iter().map(DeliveryView::from).collect(),
    )))
}
