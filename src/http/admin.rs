//! The admin API, `/admin/v1`, behind `Authorization: Bearer <admin token>`. Each handler parses
//! the request, calls the operation of `crate::admin::Admin` (which validates, records the
//! change in the audit under the token's name, and refreshes this instance's catalogue before
//! it returns, so a change holds from the next request), and renders the answer.

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::{JsonBody, OptionalJson, PathParam, QueryParams};
use super::views::{
    audit_json, key_json, limit_request_json, tier_json, usage_json, workspace_json,
};
use crate::admin::{self, AuditQuery, NewKeyInput, WorkspaceUpdate};
use crate::app::AppState;
use crate::model::{Actor, KeyId, LimitRequestId, Limits, Overrides, WorkspaceId};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/workspaces", post(create_workspace).get(list_workspaces))
        .route(
            "/workspaces/{id}",
            get(get_workspace).patch(patch_workspace),
        )
        .route("/workspaces/{id}/keys", post(create_key).get(list_keys))
        .route("/workspaces/{id}/usage", get(usage))
        .route("/keys/{id}", delete(revoke_key))
        .route("/tiers", get(list_tiers))
        .route("/tiers/{name}", put(put_tier))
        .route("/limit-requests", get(list_limit_requests))
        .route("/limit-requests/{id}/approve", post(approve))
        .route("/limit-requests/{id}/deny", post(deny))
        .route("/audit", get(audit))
        .method_not_allowed_fallback(super::method_not_allowed)
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
        let given = super::bearer(&parts.headers).ok_or(ApiError::Unauthorized(
            "Missing admin token: send 'Authorization: Bearer <admin token>'.",
        ))?;
        // Compare digests, with every configured token, so that the time taken says nothing
        // about how close a guess was or which token it was near.
        let given = Sha256::digest(given.as_bytes());
        let mut found = None;
        for t in tokens {
            if Sha256::digest(t.token.as_bytes()) == given {
                found = Some(&t.name);
            }
        }
        match found {
            Some(name) => Ok(AdminActor(Actor::admin(name))),
            None => Err(ApiError::Unauthorized("Invalid admin token.")),
        }
    }
}

fn list(data: Vec<Value>) -> Json<Value> {
    Json(json!({ "object": "list", "data": data }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWorkspace {
    name: String,
    tier: Option<String>,
}

async fn create_workspace(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<CreateWorkspace>,
) -> Result<Response, ApiError> {
    let ws = state
        .admin
        .create_workspace(&by, &body.name, body.tier.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(workspace_json(&state, &ws))).into_response())
}

async fn list_workspaces(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let all = state.admin.list_workspaces().await?;
    Ok(list(
        all.iter().map(|w| workspace_json(&state, w)).collect(),
    ))
}

async fn get_workspace(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
) -> Result<Json<Value>, ApiError> {
    let ws = state.admin.get_workspace(id).await?;
    Ok(Json(workspace_json(&state, &ws)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchWorkspace {
    tier: Option<String>,
    /// `{"requests_per_second": n|null, ...}`: a number sets, null clears, a field left out
    /// keeps.
    limits: Option<Map<String, Value>>,
    status: Option<String>,
}

async fn patch_workspace(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
    JsonBody(body): JsonBody<PatchWorkspace>,
) -> Result<Json<Value>, ApiError> {
    let limits = body.limits.unwrap_or_default();
    let update = WorkspaceUpdate {
        tier: body.tier,
        overrides: admin::overrides_patch(limits.iter().map(|(k, v)| (k.as_str(), v)))?,
        status: body
            .status
            .as_deref()
            .map(admin::workspace_status)
            .transpose()?,
    };
    let ws = state.admin.update_workspace(&by, id, update).await?;
    Ok(Json(workspace_json(&state, &ws)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: Option<String>,
    /// RFC 3339 instant.
    expires_at: Option<String>,
}

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
    let mut v = key_json(&key);
    v["key"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_keys(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
) -> Result<Json<Value>, ApiError> {
    let keys = state.admin.list_keys(id).await?;
    Ok(list(keys.iter().map(key_json).collect()))
}

async fn revoke_key(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<KeyId>,
) -> Result<Json<Value>, ApiError> {
    let key = state.admin.revoke_key(&by, id).await?;
    Ok(Json(key_json(&key)))
}

async fn list_tiers(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let tiers = state.admin.list_tiers().await?;
    Ok(list(tiers.iter().map(tier_json).collect()))
}

async fn put_tier(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(name): PathParam<String>,
    JsonBody(limits): JsonBody<Limits>,
) -> Result<Json<Value>, ApiError> {
    let tier = state.admin.put_tier(&by, &name, limits).await?;
    Ok(Json(tier_json(&tier)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Range {
    from: Option<String>,
    to: Option<String>,
}

async fn usage(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<WorkspaceId>,
    QueryParams(range): QueryParams<Range>,
) -> Result<Json<Value>, ApiError> {
    let ws = state.admin.get_workspace(id).await?;
    let limits = state
        .catalog
        .limits_of(id)
        .map(|l| (*l).clone())
        .unwrap_or_default();
    Ok(Json(
        usage_json(&state, &ws, &limits, range.from, range.to, true).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitRequestFilter {
    status: Option<String>,
    workspace_id: Option<WorkspaceId>,
}

async fn list_limit_requests(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    QueryParams(filter): QueryParams<LimitRequestFilter>,
) -> Result<Json<Value>, ApiError> {
    let status = filter
        .status
        .as_deref()
        .map(admin::limit_request_status)
        .transpose()?;
    let all = state
        .admin
        .list_limit_requests(filter.workspace_id, status)
        .await?;
    Ok(list(all.iter().map(limit_request_json).collect()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Approve {
    limits: Option<Overrides>,
}

async fn approve(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<LimitRequestId>,
    OptionalJson(body): OptionalJson<Approve>,
) -> Result<Json<Value>, ApiError> {
    let request = state
        .admin
        .approve_limit_request(&by, id, body.limits.as_ref())
        .await?;
    Ok(Json(limit_request_json(&request)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deny {
    reason: String,
}

async fn deny(
    AdminActor(by): AdminActor,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam<LimitRequestId>,
    JsonBody(body): JsonBody<Deny>,
) -> Result<Json<Value>, ApiError> {
    let request = state
        .admin
        .deny_limit_request(&by, id, &body.reason)
        .await?;
    Ok(Json(limit_request_json(&request)))
}

/// `GET /admin/v1/audit?workspace_id=&actor=&action=&from=&to=&after=&limit=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    workspace_id: Option<WorkspaceId>,
    actor: Option<String>,
    action: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
    /// An entry id: continue with the entries older than it.
    after: Option<i64>,
    limit: Option<i64>,
}

async fn audit(
    _: AdminActor,
    State(state): State<Arc<AppState>>,
    QueryParams(p): QueryParams<AuditParams>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({
        "object": "list",
        "data": page.entries.iter().map(audit_json).collect::<Vec<_>>(),
        "has_more": page.has_more,
        "last_id": page.entries.last().map(|e| e.id),
    })))
}
