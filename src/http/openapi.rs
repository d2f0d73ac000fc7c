//! The OpenAPI 3.1 document of the admin API and the workspace's own API, served at
//! `/openapi.json`.
//!
//! It is generated from the code: each handler of those APIs carries `#[utoipa::path]` (its
//! route, parameters, body and answers), and is registered on the router with
//! `utoipa_axum::routes!`, which adds the route to the router and its operation to the
//! document in one call, so no route of those APIs is served undocumented. The bodies' schemas
//! are the `ToSchema` derives of the very types the handlers parse and answer with (`views`,
//! `model`, the request structs beside each handler, `error::ErrorBody`), so the document
//! follows them, serde attributes included. `tests/gateway/openapi.rs` checks it against the
//! answers themselves.
//!
//! **Where.** Each listener serves the document of the routes it serves, so that whatever
//! reads it from a base URL finds every operation there: without `admin_listen`, one listener,
//! both APIs; with it, the main listener's document has the workspace's API alone and the admin
//! listener's the admin API alone. The document holds no secret, but an operator who moved the
//! admin API off the public listener should not find it advertised there. No token is needed to
//! read it. The proxied routes (`/v1/chat/completions`, ...) are the upstream's API and are not
//! described (the description names them), nor are the health checks and `/metrics`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, Method};
use axum::response::IntoResponse;
use axum::routing::{get, MethodRouter};
use serde_json::Value;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::{IntoResponses, Modify, PartialSchema};

use super::error::ErrorBody;
use crate::app::AppState;
use crate::model::Overrides;

/// The security schemes. The operations' `security(...)` name them again, as the literals the
/// macro requires; `tests/gateway/openapi.rs` checks that every operation names one defined here.
pub const ADMIN_TOKEN: &str = "admin_token";
pub const WORKSPACE_KEY: &str = "workspace_key";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "tiergate",
        description = "The admin API (`/admin/v1`, an admin token) and the workspace's own API \
(`/v1/limits`, `/v1/limit-requests`, a workspace key) of tiergate, a rate-limit and usage-tier \
gateway for OpenAI/Mistral-compatible LLM APIs.\n\n\
Not described here: the proxied routes (`POST /v1/chat/completions`, `/v1/completions`, \
`/v1/fim/completions`, `/v1/embeddings`, `/v1/responses`, and any other `/v1/*`), which are the \
upstream's API passed through with a workspace key, rate-limit headers added, and errors in the \
`Error` shape below; the health checks (`GET /healthz`, `GET /readyz`); and `GET /metrics` \
(Prometheus text).\n\n\
This document describes the routes of the listener that serves it: with `admin_listen` set, the \
main listener's has the workspace's API and the admin listener's the admin API.\n\n\
Unknown fields of a request body and unknown query parameters are refused (`400`). A route \
without the method asked answers `405` with `Allow`."
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "admin", description = "The operators' API, with an admin token. On the admin listener alone when `admin_listen` is set."),
        (name = "workspace", description = "A workspace's own API, with one of its keys. Counts against no limit."),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
            http.description = Some(description.to_string());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            ADMIN_TOKEN,
            bearer("`Authorization: Bearer <admin token>`: `admin_token`, or a token of `[[admin_tokens]]`."),
        );
        components.add_security_scheme(
            WORKSPACE_KEY,
            bearer("`Authorization: Bearer <key>`: one of the workspace's API keys (`tg_...`)."),
        );
    }
}

/// The document's info, description, tags, security schemes and shared schemas, which the
/// routers' operations are added to.
pub fn base() -> OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi()
}

/// `GET /openapi.json`: `document`, rendered once.
pub fn route<S: Clone + Send + Sync + 'static>(document: &OpenApi) -> MethodRouter<S> {
    let body = Bytes::from(render(document));
    get(move || {
        let body = body.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
    })
}

/// The query parameters each operation of `document` takes, by method and path as the router
/// matches them (`GET /admin/v1/workspaces/{id}/usage`), and whether it asks for credentials.
#[derive(Debug, Default)]
pub struct QueryNames(HashMap<(Method, String), (Vec<String>, bool)>);

impl QueryNames {
    pub fn of(document: &OpenApi) -> QueryNames {
        let document = serde_json::to_value(document).expect("the document serializes");
        let mut known = HashMap::new();
        for (path, item) in document["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let Ok(method) = method.to_uppercase().parse::<Method>() else {
                    continue;
                };
                let names = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
                known.insert((method, path.clone()), (names, secured));
            }
        }
        QueryNames(known)
    }

    /// The first parameter of `query` that the operation at (`method`, `path`) does not take,
    /// if any, and whether the operation asks for credentials; `None` too for an operation not
    /// in the document (the handler decides).
    fn unknown(&self, method: &Method, path: &str, query: &str) -> Option<(String, bool)> {
        let (names, secured) = self.0.get(&(method.clone(), path.to_owned()))?;
        form_urlencoded::parse(query.as_bytes())
            .map(|(name, _)| name)
            .find(|name| !names.iter().any(|n| n == name))
            .map(|name| (name.into_owned(), *secured))
    }
}

/// Refuses (`400`) a query parameter that the matched operation does not take, as the README
/// promises for the admin API and the workspace's own: the handlers read theirs with
/// `deny_unknown_fields`, but most operations take none, and a misspelt or stray parameter
/// (`DELETE /admin/v1/keys/1?dry_run=1`) would otherwise be ignored while the change is made.
///
/// The caller's credentials are checked first (the workspace's key on the workspace's API, an
/// admin token on the admin API), so that a caller without any gets the `401` it would get
/// with a valid query, and learns nothing of the operations' parameters.
pub async fn refuse_unknown_query(
    axum::extract::State((known, state)): axum::extract::State<(Arc<QueryNames>, Arc<AppState>)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned());
    if let (Some(path), Some(query)) = (path, request.uri().query()) {
        if let Some((name, secured)) = known.unknown(request.method(), &path, query) {
            let (mut parts, _) = request.into_parts();
            let credentials = if !secured {
                Ok(())
            } else if path.starts_with("/admin/") {
                use axum::extract::FromRequestParts;
                super::admin::AdminActor::from_request_parts(&mut parts, &state)
                    .await
                    .map(drop)
            } else {
                super::authenticate(&state, &parts.headers).await.map(drop)
            };
            if let Err(refused) = credentials {
                return refused.into_response();
            }
            let shown: String = name.chars().take(64).collect();
            return super::error::ApiError::BadRequest(format!(
                "invalid query: unknown parameter '{shown}'"
            ))
            .into_response();
        }
    }
    next.run(request).await
}

/// `document` as JSON, without the tags and security schemes that none of its operations use
/// (the base has both APIs', and a listener may serve only one).
fn render(document: &OpenApi) -> Vec<u8> {
    let mut document = serde_json::to_value(document).expect("the document serializes");
    let mut tags = BTreeSet::new();
    let mut schemes = BTreeSet::new();
    for item in document["paths"].as_object().into_iter().flatten() {
        for op in item.1.as_object().into_iter().flatten().map(|(_, op)| op) {
            let names = op["tags"].as_array().into_iter().flatten();
            tags.extend(names.filter_map(Value::as_str).map(str::to_owned));
            for requirement in op["security"].as_array().into_iter().flatten() {
                schemes.extend(
                    requirement
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|e| e.0.clone()),
                );
            }
        }
    }
    // Every operation refuses a query parameter it does not take (`refuse_unknown_query`): one
    // that lists no `400` of its own is given this one.
    let error = format!(
        "#/components/schemas/{}",
        <ErrorBody as utoipa::ToSchema>::name()
    );
    for item in document["paths"].as_object_mut().into_iter().flatten() {
        for op in item
            .1
            .as_object_mut()
            .into_iter()
            .flatten()
            .map(|(_, op)| op)
        {
            let responses = &mut op["responses"];
            if responses.get("400").is_none() {
                responses["400"] = serde_json::json!({
                    "description": "A query parameter the operation does not take \
                        (`invalid_request_error`; the message names it).",
                    "content": {"application/json": {"schema": {"$ref": error}}}
                });
            }
        }
    }
    if let Some(all) = document["tags"].as_array_mut() {
        all.retain(|t| t["name"].as_str().is_some_and(|n| tags.contains(n)));
    }
    if let Some(all) = document["components"]["securitySchemes"].as_object_mut() {
        all.retain(|name, _| schemes.contains(name));
    }
    serde_json::to_vec(&document).expect("the document serializes")
}

/// The `object` of an error: always `"error"`.
pub fn error_object() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["error"]))
}

/// Only `null`.
pub fn null() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new().schema_type(Type::Null)
}

/// A change of overrides in `PATCH /admin/v1/workspaces/{id}`: `Overrides`' own properties,
/// each a number that sets it or `null` that clears it; one left out is kept. Built from
/// `Overrides`' schema so that a limit added there is documented here too (the handler reads
/// this object field by field, `admin::overrides_patch`, to tell `null` from absent).
pub fn overrides_patch() -> impl Into<RefOr<Schema>> {
    let RefOr::T(Schema::Object(overrides)) = Overrides::schema() else {
        unreachable!("Overrides is described as an object");
    };
    let mut patch = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Overrides to change: a number sets one, `null` clears it (back to the tier's), one left out is kept.",
        ))
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::<Schema>::FreeForm(false),
        ));
    for (name, property) in overrides.properties {
        patch = patch.property(name, nullable(property));
    }
    patch
}

/// A key's own limits as `PATCH /admin/v1/keys/{id}` takes them: each a figure, or `null` (left
/// out: none of the key's own), and the whole `null` (none at all).
pub fn key_limits_patch() -> impl Into<RefOr<Schema>> {
    let RefOr::T(Schema::Object(limits)) = crate::model::KeyLimits::schema() else {
        unreachable!("KeyLimits is described as an object");
    };
    let mut patch = ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Object,
            Type::Null,
        ]))
        .description(Some(
            "The key's own limits: a figure sets one, `null` or left out means none of its own; `null` or `{}` for the whole clears them all.",
        ))
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::<Schema>::FreeForm(false),
        ));
    for (name, property) in limits.properties {
        patch = patch.property(name, nullable(property));
    }
    patch
}

/// `schema` or `null`.
fn nullable(schema: RefOr<Schema>) -> RefOr<Schema> {
    match schema {
        RefOr::T(Schema::Object(mut object)) => {
            let Object { schema_type, .. } = &mut object;
            *schema_type = match schema_type.clone() {
                utoipa::openapi::schema::SchemaType::Type(t) => {
                    utoipa::openapi::schema::SchemaType::from_iter([t, Type::Null])
                }
                other => other,
            };
            RefOr::T(Schema::Object(object))
        }
        other => other,
    }
}

/// What every admin route may answer besides its own: the token, and the database.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum AdminErrors {
    /// No admin token, or a wrong one (`authentication_error`); with `WWW-Authenticate: Bearer`.
    #[response(status = 401)]
    Unauthorized(ErrorBody<'static>),
    /// The admin API is off: no admin token is configured (`permission_error`).
    #[response(status = 403)]
    Forbidden(ErrorBody<'static>),
    /// The database cannot be reached (`service_unavailable`, code `database_unreachable`), or
    /// cannot answer: nothing was changed; or it was lost while a change was being saved, which
    /// may have been (`x-should-retry: false`, and the message says so).
    #[response(status = 503)]
    Unavailable(ErrorBody<'static>),
}

/// What every route of the workspace's own API may answer besides its own.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum WorkspaceErrors {
    /// No key, or one that is malformed, unknown or revoked (`authentication_error`, code
    /// `invalid_api_key`); with `WWW-Authenticate: Bearer`.
    #[response(status = 401)]
    Unauthorized(ErrorBody<'static>),
    /// The workspace is suspended, or the key has expired (`permission_error`).
    #[response(status = 403)]
    Forbidden(ErrorBody<'static>),
    /// The database cannot be reached (`service_unavailable`, code `database_unreachable`), or
    /// cannot answer: nothing was changed; or it was lost while a change was being saved, which
    /// may have been (`x-should-retry: false`, and the message says so).
    #[response(status = 503)]
    Unavailable(ErrorBody<'static>),
}

/// A route that changes what the workspace holds, with its key: counted among its changes of
/// its own.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ChangeErrors {
    /// The workspace's changes of its own came faster than 60 at once, then one every 2 s
    /// (`rate_limited`, code `workspace_changes`); with `Retry-After`; nothing changed.
    #[response(status = 429)]
    TooManyChanges(ErrorBody<'static>),
}

/// A route that reads a JSON body (at most 1 MiB).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum BodyErrors {
    /// A body, path parameter or query parameter that is not valid (`invalid_request_error`;
    /// the message names the field).
    #[response(status = 400)]
    BadRequest(ErrorBody<'static>),
    /// The body did not arrive whole within `body_read_timeout_ms` (`request_timeout`); the
    /// connection is closed.
    #[response(status = 408)]
    Timeout(ErrorBody<'static>),
    /// The body is over 1 MiB (`payload_too_large`).
    #[response(status = 413)]
    TooLarge(ErrorBody<'static>),
}

/// A route with a path or query parameter.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum BadRequest {
    /// A path or query parameter that is not valid (`invalid_request_error`; the message names
    /// it).
    #[response(status = 400)]
    BadRequest(ErrorBody<'static>),
}

/// Sending a delivery again that has not failed.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum NotFailed {
    /// The delivery is pending or was delivered (`conflict`): only a failed one is sent again.
    #[response(status = 409)]
    Conflict(ErrorBody<'static>),
}

/// A route about one object, by its id.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum NotFound {
    /// No such object (`not_found`; the message says which).
    #[response(status = 404)]
    NotFound(ErrorBody<'static>),
}
