//! Extractors whose rejections are answered in the gateway's error shape: JSON bodies (bounded),
//! path parameters and query strings. A handler never uses axum's own `Json`, `Path` or `Query`,
//! whose rejections are plain text.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Path, Query, Request};
use axum::http::request::Parts;
use futures_util::StreamExt;
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

/// The largest JSON body of the admin API and the workspace's own API (the proxy has its own
/// limit, `max_body_bytes`). Read before the body is parsed, so an oversized body costs no more
/// than this, whoever sends it.
pub const MAX_API_BODY: usize = 1024 * 1024;

/// The body, up to `limit` bytes; `413` beyond.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| unreadable(&e, "the request body could not be read".into()))?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The body as `T`; a value of the wrong type or out of range is refused naming its field
/// (`'requested_limits.tokens_per_minute': invalid type: string "5", expected u64`), as
/// serde_json alone does not say where it was.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every body of these APIs is an object. serde reads a struct from an array too, its
    // fields by position (an outside audit: `PUT /v1/budget` with `[]` cleared the budget,
    // `[7000]` set it), which no document says.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "invalid JSON body: it must be a JSON object".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // `?` stands for a place whose name was not read yet (`{` and the end of the body):
        // named by the field around it, if any (an outside audit saw `'?'`).
        let field = path.trim_end_matches('?').trim_end_matches('.');
        ApiError::BadRequest(match field {
            // The whole body (not an object, or not JSON at all).
            "" => format!("invalid JSON body: {inner}"),
            field => format!("invalid JSON body: '{field}': {inner}"),
        })
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// A JSON body that may be left out (empty, or JSON `null`, as the OpenAPI document's
/// `oneOf [T, null]` allows), then `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body(), MAX_API_BODY).await?;
        if bytes.trim_ascii().is_empty() || bytes.trim_ascii() == b"null" {
            return Ok(OptionalJson(T::default()));
        }
        parse(&bytes).map(OptionalJson)
    }
}

/// The body of a call that takes none (a `DELETE`): left out, `null` or `{}`; a field is
/// refused, as everywhere in the admin API (an outside audit: `{"x": 1}` was ignored).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

/// A JSON body, at most `MAX_API_BODY` bytes.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body(), MAX_API_BODY).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest("a JSON body is required".into()));
        }
        parse(&bytes).map(JsonBody)
    }
}

/// Path parameters. A parameter that does not parse (an id that is not a number, text that is
/// not UTF-8 once decoded) is a `400`.
pub struct PathParam<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // An id is a whole number above 0: `-1` or `0` names nothing, and is refused as `abc`
        // is, not looked for (an outside audit: `404`, where the README promises `400`).
        let is_id = what::<T>() != "path";
        let parsed = match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) if !is_id => Ok(v),
            Ok(Path(v)) => match Path::<i64>::from_request_parts(parts, state).await {
                Ok(Path(id)) if id <= 0 => Err(()),
                _ => Ok(v),
            },
            Err(_) => Err(()),
        };
        match parsed {
            Ok(v) => Ok(PathParam(v)),
            Err(()) => {
                // The path as the client sent it (a nested router sees it without its prefix).
                let uri = parts
                    .extensions
                    .get::<OriginalUri>()
                    .map_or(&parts.uri, |o| &o.0);
                Err(ApiError::BadRequest(format!(
                    "invalid path: {} is not a valid {}",
                    shown(uri.path()),
                    what::<T>()
                )))
            }
        }
    }
}

/// Query parameters; unknown ones are refused where `T` says `deny_unknown_fields`.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(v)| QueryParams(v))
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
    }
}

/// A query parameter that is an id: a whole number above 0, as a path id is (`0` or `-1` names
/// nothing and is a `400`, not an empty list). For `#[serde(default, deserialize_with = ...)]`.
pub fn query_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize;
    match i64::deserialize(d)? {
        id if id > 0 => Ok(Some(id)),
        id => Err(serde::de::Error::custom(format_args!(
            "{id} is not a valid id (a whole number above 0)"
        ))),
    }
}

/// What a path parameter of type `T` is, for messages.
fn what<T>() -> &'static str {
    match std::any::type_name::<T>() {
        "i64" | "u64" | "i32" | "u32" => "id (a whole number above 0)",
        _ => "path",
    }
}

/// At most 200 characters of a path, for a message.
fn shown(path: &str) -> String {
    let mut s: String = path.chars().take(200).collect();
    if s.len() < path.len() {
        s.push('…');
    }
    format!("'{s}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        outer: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Inner {
        #[allow(dead_code)]
        n: u64,
    }

    fn refusal(body: &str) -> String {
        match parse::<Body>(body.as_bytes()) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("{body}: {other:?}"),
        }
    }

    /// A refusal names the field where it has one, and never a place by `?` (what
    /// serde_path_to_error calls a key not read yet).
    #[test]
    fn a_refusal_names_the_field_and_never_a_question_mark() {
        assert_eq!(
            refusal("{"),
            "invalid JSON body: EOF while parsing an object at line 1 column 1"
        );
        assert_eq!(
            refusal(r#"{"outer": {"n": "5"}}"#),
            "invalid JSON body: 'outer.n': invalid type: string \"5\", expected u64 at line 1 column 19"
        );
        for body in [
            r#"{"outer": {"#,
            r#"{"outer": {"n""#,
            "[",
            "{\"outer\"",
            "nul",
        ] {
            assert!(!refusal(body).contains('?'), "{body}: {}", refusal(body));
        }
    }
}
