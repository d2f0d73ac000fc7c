//! Extractors whose rejections are answered in the gateway's error shape.

use axum::extract::{FromRequest, Request};
use axum::Json;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::BodyReadTimeout;

/// A body that could not be read: `408` when it came too slowly, else `400`.
fn unreadable(rejection: &(dyn std::error::Error + 'static), text: String) -> ApiError {
    match BodyReadTimeout::find(rejection) {
        Some(limit) => ApiError::RequestTimeout(limit.as_millis() as u64),
        None => ApiError::BadRequest(text),
    }
}

/// A JSON body that may be left out (empty), then `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| unreadable(&e, e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(OptionalJson)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// A JSON body whose rejections are answered in the gateway's error shape.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| JsonBody(v))
            .map_err(|e| unreadable(&e, e.body_text()))
    }
}
