//! The workspace's own API, with its key: its limits and usage (the data of the limits page),
//! and its requests for higher limits. These routes count against no limit.

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::authenticate;
use super::error::ApiError;
use super::extract::JsonBody;
use super::views::{limit_request_json, usage_json};
use crate::app::AppState;
use crate::model::{Actor, Overrides};

pub async fn limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, entry) = authenticate(&state, &headers).await?;
    let ws = &entry.workspace;
    let tiers = state.store.list_tiers().await?;
    let tier_limits = tiers.iter().find(|t| t.name == ws.tier).map(|t| &t.limits);
    let usage = usage_json(&state, ws, &entry.limits, None, None, false).await?;
    Ok(Json(json!({
        "workspace": { "id": ws.id, "name": ws.name, "status": ws.status },
        "tier": ws.tier,
        "limits": *entry.limits,
        "tier_limits": tier_limits,
        "overrides": ws.overrides,
        "usage": usage,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLimitRequest {
    use_case: String,
    #[serde(default)]
    requested_limits: Overrides,
}

/// The key is checked before the body is read (the body is bounded either way).
pub async fn create_limit_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Request,
) -> Result<Response, ApiError> {
    let (_, entry) = authenticate(&state, &headers).await?;
    let JsonBody(body) = JsonBody::<NewLimitRequest>::from_request(body, &state).await?;
    let id = entry.workspace.id;
    let request = state
        .admin
        .create_limit_request(
            &Actor::workspace(id),
            id,
            &body.use_case,
            &body.requested_limits,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(limit_request_json(&request))).into_response())
}

pub async fn list_limit_requests(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, entry) = authenticate(&state, &headers).await?;
    let list = state
        .admin
        .list_limit_requests(Some(entry.workspace.id), None)
        .await?;
    let data: Vec<Value> = list.iter().map(limit_request_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}
