//! The HTTP layer: the only module that knows axum. Routes, authentication of workspace keys and
//! of the admin token, and the mapping of every error to an answer (`error`).

pub mod admin;
pub mod error;
pub mod extract;
pub mod headers;
pub mod proxy;
pub mod views;
pub mod workspace;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;

use crate::app::AppState;
use crate::catalog::{AuthFailure, WorkspaceEntry};
use crate::metrics::Metrics;
use crate::model::KeyId;
use error::ApiError;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/limits",
            get(|| async { Html(include_str!("limits.html")) }),
        )
        .route("/v1/limits", get(workspace::limits))
        .route(
            "/v1/limit-requests",
            post(workspace::create_limit_request).get(workspace::list_limit_requests),
        )
        .route("/v1/{*path}", any(proxy::proxy))
        .nest("/admin/v1", admin::router())
        // Bodies are read with the configured limit by the handlers themselves, so that an
        // oversized body gets our JSON 413 rather than axum's plain text.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.store.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "store not reachable");
            (StatusCode::SERVICE_UNAVAILABLE, "store not reachable").into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.local.tracked_workspaces());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates a workspace key from `Authorization: Bearer`.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(KeyId, Arc<WorkspaceEntry>), ApiError> {
    let Some(secret) = bearer(headers) else {
        Metrics::inc(&state.metrics.unauthenticated);
        return Err(ApiError::Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>'.",
        ));
    };
    state
        .catalog
        .authenticate(secret, state.clock.now_secs())
        .await
        .map_err(|failure| match failure {
            AuthFailure::UnknownKey => {
                Metrics::inc(&state.metrics.unauthenticated);
                ApiError::Unauthorized("Invalid or revoked API key.")
            }
            AuthFailure::Expired => ApiError::Forbidden("This API key has expired.".into()),
            AuthFailure::Suspended => {
                ApiError::Forbidden("This workspace is suspended; contact the operator.".into())
            }
        })
}
