//! The admin API, `/admin/v1`, behind `Authorization: Bearer <admin token>`. Every change is
//! written to the store and then refreshed into this instance's catalogue before the answer, so
//! it holds from the next request; other instances see it within `catalog_refresh`.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::{JsonBody, OptionalJson};
use super::views::{key_json, limit_request_json, usage_json, workspace_json};
use crate::app::AppState;
use crate::catalog::generate_key;
use crate::config::validate_tier_name;
use crate::model::{
    FieldPatch, KeyId, LimitRequestId, LimitRequestStatus, Limits, Overrides, OverridesPatch, Tier,
    WorkspaceId, WorkspaceStatus,
};
use crate::store::{NewKey, WorkspaceChange};

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
        .route("/tiers/{name}", axum::routing::put(put_tier))
        .route("/limit-requests", get(list_limit_requests))
        .route("/limit-requests/{id}/approve", post(approve))
        .route("/limit-requests/{id}/deny", post(deny))
}

/// Proof that the request carries the admin token.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let Some(expected) = &state.config.admin_token else {
            return Err(ApiError::AdminDisabled);
        };
        let given = super::bearer(&parts.headers).ok_or(ApiError::Unauthorized(
            "Missing admin token: send 'Authorization: Bearer <admin token>'.",
        ))?;
        // Compare digests so the comparison takes the same time whatever the input.
        if Sha256::digest(given.as_bytes()) != Sha256::digest(expected.as_bytes()) {
            return Err(ApiError::Unauthorized("Invalid admin token."));
        }
        Ok(Admin)
    }
}

/// Brings this instance's catalogue up to a change just made. The change is in the store
/// whatever happens here: if the refresh fails, it is logged, and the background refresh picks
/// the change up once the store answers.
async fn refresh(state: &AppState) {
    if let Err(e) = state.catalog.refresh().await {
        tracing::warn!(error = %e, "catalog refresh after an admin change failed");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWorkspace {
    name: String,
    tier: Option<String>,
}

async fn create_workspace(
    _: Admin,
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<CreateWorkspace>,
) -> Result<Response, ApiError> {
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::BadRequest("'name' must not be empty".into()));
    }
    let tier = body.tier.as_deref().unwrap_or("free");
    let ws = state
        .store
        .create_workspace(name, tier, state.clock.now_secs())
        .await?;
    refresh(&state).await;
    Ok((StatusCode::CREATED, Json(workspace_json(&state, &ws))).into_response())
}

async fn list_workspaces(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let list = state.store.list_workspaces().await?;
    let data: Vec<Value> = list.iter().map(|w| workspace_json(&state, w)).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

async fn get_workspace(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<WorkspaceId>,
) -> Result<Json<Value>, ApiError> {
    let ws = state.store.get_workspace(id).await?;
    Ok(Json(workspace_json(&state, &ws)))
}

/// Reads `{"requests_per_second": n|null, ...}` as a patch: a number sets, null clears, a
/// missing field keeps. The store applies it to the overrides as they are when it writes.
fn overrides_patch(patch: &Map<String, Value>) -> Result<OverridesPatch, ApiError> {
    fn number<T: DeserializeOwned>(field: &str, v: &Value) -> Result<FieldPatch<T>, ApiError> {
        if v.is_null() {
            return Ok(FieldPatch::Clear);
        }
        serde_json::from_value(v.clone())
            .map(FieldPatch::Set)
            .map_err(|_| {
                ApiError::BadRequest(format!("limits.{field} must be a positive number or null"))
            })
    }
    let mut overrides = OverridesPatch::default();
    for (field, v) in patch {
        match field.as_str() {
            "requests_per_second" => overrides.requests_per_second = number(field, v)?,
            "tokens_per_minute" => overrides.tokens_per_minute = number(field, v)?,
            "tokens_per_month" => overrides.tokens_per_month = number(field, v)?,
            "concurrent_requests" => overrides.concurrent_requests = number(field, v)?,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "limits.{other} is not a limit; use requests_per_second, tokens_per_minute, tokens_per_month or concurrent_requests"
                )))
            }
        }
    }
    overrides
        .validate()
        .map_err(|m| ApiError::BadRequest(format!("limits: {m}")))?;
    Ok(overrides)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchWorkspace {
    tier: Option<String>,
    limits: Option<Map<String, Value>>,
    status: Option<String>,
}

async fn patch_workspace(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<WorkspaceId>,
    JsonBody(body): JsonBody<PatchWorkspace>,
) -> Result<Json<Value>, ApiError> {
    let overrides = match &body.limits {
        Some(patch) => overrides_patch(patch)?,
        None => OverridesPatch::default(),
    };
    let status = match body.status.as_deref() {
        None => None,
        Some(s) => Some(WorkspaceStatus::parse(s).ok_or_else(|| {
            ApiError::BadRequest("status must be \"active\" or \"suspended\"".into())
        })?),
    };
    let change = WorkspaceChange {
        tier: body.tier,
        overrides,
        status,
    };
    let ws = state.store.update_workspace(id, &change).await?;
    refresh(&state).await;
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
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<WorkspaceId>,
    OptionalJson(body): OptionalJson<CreateKey>,
) -> Result<Response, ApiError> {
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(s) => Some(
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| ApiError::BadRequest("expires_at must be an RFC 3339 instant".into()))?
                .unix_timestamp(),
        ),
    };
    state.store.get_workspace(id).await?;
    let secret = generate_key();
    let key = state
        .store
        .create_key(
            &NewKey {
                workspace: id,
                name: body.name,
                prefix: secret.prefix.clone(),
                hash: secret.hash,
                expires_at,
            },
            state.clock.now_secs(),
        )
        .await?;
    refresh(&state).await;
    let mut v = key_json(&key);
    v["key"] = Value::String(secret.secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_keys(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<WorkspaceId>,
) -> Result<Json<Value>, ApiError> {
    state.store.get_workspace(id).await?;
    state.recorder.flush().await;
    let keys = state.store.list_keys(id).await?;
    let data: Vec<Value> = keys.iter().map(key_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

async fn revoke_key(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<KeyId>,
) -> Result<Json<Value>, ApiError> {
    let key = state.store.revoke_key(id, state.clock.now_secs()).await?;
    refresh(&state).await;
    Ok(Json(key_json(&key)))
}

async fn list_tiers(_: Admin, State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let tiers = state.store.list_tiers().await?;
    let data: Vec<Value> = tiers
        .iter()
        .map(|t| {
            let mut v = serde_json::to_value(&t.limits).expect("limits serialize");
            v["name"] = Value::String(t.name.clone());
            v
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

async fn put_tier(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    JsonBody(limits): JsonBody<Limits>,
) -> Result<Json<Value>, ApiError> {
    validate_tier_name(&name).map_err(ApiError::BadRequest)?;
    limits.validate().map_err(ApiError::BadRequest)?;
    let tier = Tier { name, limits };
    state.store.put_tier(&tier).await?;
    refresh(&state).await;
    let mut v = serde_json::to_value(&tier.limits).expect("limits serialize");
    v["name"] = Value::String(tier.name);
    Ok(Json(v))
}

#[derive(Deserialize)]
struct Range {
    from: Option<String>,
    to: Option<String>,
}

async fn usage(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<WorkspaceId>,
    Query(range): Query<Range>,
) -> Result<Json<Value>, ApiError> {
    let ws = state.store.get_workspace(id).await?;
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
struct StatusFilter {
    status: Option<String>,
}

async fn list_limit_requests(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Query(filter): Query<StatusFilter>,
) -> Result<Json<Value>, ApiError> {
    let status = match filter.status.as_deref() {
        None => None,
        Some(s) => Some(LimitRequestStatus::parse(s).ok_or_else(|| {
            ApiError::BadRequest("status must be pending, approved or denied".into())
        })?),
    };
    let list = state.store.list_limit_requests(None, status).await?;
    let data: Vec<Value> = list.iter().map(limit_request_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Approve {
    limits: Option<Overrides>,
}

async fn approve(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<LimitRequestId>,
    OptionalJson(body): OptionalJson<Approve>,
) -> Result<Json<Value>, ApiError> {
    let granted = body.limits;
    if let Some(g) = &granted {
        g.validate()
            .map_err(|m| ApiError::BadRequest(format!("limits: {m}")))?;
    }
    let request = state
        .store
        .approve_limit_request(id, granted.as_ref(), state.clock.now_secs())
        .await?;
    refresh(&state).await;
    Ok(Json(limit_request_json(&request)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deny {
    reason: String,
}

async fn deny(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<LimitRequestId>,
    JsonBody(body): JsonBody<Deny>,
) -> Result<Json<Value>, ApiError> {
    let reason = body.reason.trim();
    if reason.is_empty() {
        return Err(ApiError::BadRequest("'reason' must not be empty".into()));
    }
    let request = state
        .store
        .deny_limit_request(id, reason, state.clock.now_secs())
        .await?;
    Ok(Json(limit_request_json(&request)))
}
