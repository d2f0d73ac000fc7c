//! The HTTP layer: the only module that knows axum. Routes, authentication of workspace keys and
//! of the admin tokens, serving (`serve`), and the mapping of every error to an answer
//! (`error`).
//!
//! Two sets of routes: the gateway's (`/v1/*`, the limits page, the workspace's console, health
//! checks) and the operator's (`/admin/v1/*`, `/metrics`, the console's operator pages). Without
//! `admin_listen` both are served on the main listener; with it, the operator's are served on
//! the admin listener only (with the health checks and the console's sign-in), and the main
//! listener answers them `404` (see `console::Scope`). Every route that does not exist answers
//! a JSON `404`, and a method a route does not have a JSON `405`, in the gateway's error shape;
//! `/v1/*` routes the gateway does not know are passed to the upstream, except under the
//! workspace API's own (`OWN_V1_ROUTES`), which answer `404`.
//!
//! The admin API and the workspace's own API are registered with their OpenAPI operations
//! (`utoipa_axum`); each listener serves the document of what it serves at `/openapi.json`
//! (see `openapi`).

pub mod admin;
pub mod console;
pub mod console_charts;
pub mod console_operator;
mod console_webhooks;
mod cors;
pub mod error;
pub mod extract;
pub mod headers;
pub mod openapi;
#[cfg(feature = "otel")]
pub mod otel;
pub mod proxy;
pub mod serve;
pub mod upstream;
pub mod views;
pub mod workspace;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, OriginalUri, Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use utoipa_axum::router::OpenApiRouter;

use crate::app::AppState;
use crate::catalog::{AuthFailure, Authenticated};
use crate::metrics::Metrics;
use error::ApiError;

/// The main listener's routes, as the config says: with the operator's routes unless
/// `admin_listen` is set.
pub fn router(state: Arc<AppState>) -> Router {
    let with_operator = state.config.admin_listen.is_none();
    main_router(state, with_operator)
}

/// The gateway's routes, and the operator's too when `with_operator`.
pub fn main_router(state: Arc<AppState>, with_operator: bool) -> Router {
    let api = documented(&state, true, with_operator);
    let routes = health().merge(api).merge(console::routes(console::Scope {
        workspace: true,
        operator: with_operator,
    }));
    let routes = if with_operator {
        routes.merge(operator())
    } else {
        routes
    };
    // The gateway's own answers say `nosniff`; the proxied ones are the upstream's, as sent
    // (their errors from the gateway say it too: `error::answer`).
    let routes = routes
        .layer(axum::middleware::map_response(nosniff))
        .route("/v1/{*path}", any(upstream_or_none));
    finish(routes, state)
}

/// The admin listener's routes: the operator's (the console's operator pages among them), and
/// the health checks.
pub fn admin_router(state: Arc<AppState>) -> Router {
    let console = console::routes(console::Scope {
        workspace: false,
        operator: true,
    });
    finish(
        health()
            .merge(documented(&state, false, true))
            .merge(operator())
            .merge(console)
            .layer(axum::middleware::map_response(nosniff)),
        state,
    )
}

/// `X-Content-Type-Options: nosniff`: a browser takes an answer for what its `Content-Type`
/// says (an export's CSV, an API's JSON), never sniffs it into a page. And `Cache-Control:
/// no-store` where the answer does not say otherwise: the gateway's own answers are live
/// figures, or secrets shown once (a new key, a webhook's signing secret), which no cache
/// should keep (an outside audit).
async fn nosniff(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    if !headers.contains_key(axum::http::header::CACHE_CONTROL) {
        headers.insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-store"),
        );
    }
    response
}

/// The routes of the workspace's own API and of the admin API, as asked, with the OpenAPI
/// document of exactly those at `/openapi.json`.
fn documented(
    state: &Arc<AppState>,
    workspace_api: bool,
    admin_api: bool,
) -> Router<Arc<AppState>> {
    let mut api = OpenApiRouter::with_openapi(openapi::base());
    if workspace_api {
        api = api.merge(workspace::api());
    }
    if admin_api {
        api = api.nest("/admin/v1", admin::api());
    }
    let (routes, document) = api.split_for_parts();
    let query_names = Arc::new(openapi::QueryNames::of(&document));
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            (query_names, state.clone()),
            openapi::refuse_unknown_query,
        ))
        .route("/openapi.json", openapi::route(&document))
}

fn health() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

/// The metrics (the admin API is in `documented`).
fn operator() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

fn finish(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        // Bodies are read with a limit by the handlers themselves, so that an oversized body
        // gets our JSON 413 rather than axum's plain text.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_request_with_state(
            state.clone(),
            body_deadline,
        ))
        .with_state(state)
}

/// At most 200 characters of a path, for a message.
fn shown_path(uri: &Uri) -> String {
    let path = uri.path();
    let mut s: String = path.chars().take(200).collect();
    if s.len() < path.len() {
        s.push('…');
    }
    s
}

/// The path as the client sent it (a nested router sees it without its prefix).
async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> Response {
    // A page of the console a browser asked for: answered as a page, not as an API's JSON.
    let path = uri.path();
    if path == console::PREFIX || path.starts_with("/console/") {
        return console::not_found_page();
    }
    ApiError::NotFound(format!("No route for {method} {}.", shown_path(&uri))).into_response()
}

/// A `/v1/` path no route of the gateway has: the upstream's, unless it is under one of the
/// workspace API's own routes (`/v1/limit-requests/7/x`), which are the gateway's alone (such a
/// path was forwarded, and cost a request).
async fn upstream_or_none(state: State<Arc<AppState>>, request: Request) -> Response {
    let path = request.uri().path();
    let first = path
        .strip_prefix("/v1/")
        .and_then(|rest| rest.split('/').next());
    if first.is_some_and(|first| OWN_V1_ROUTES.contains(&first)) {
        return not_found(request.method().clone(), OriginalUri(request.uri().clone())).await;
    }
    proxy::proxy(state, request).await
}

async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}.", shown_path(&uri)))
}

/// Gives every request's body the deadline `body_read_timeout`, counted from now (its head has
/// just been read): a client that sends its body too slowly gets `408` from the handler that
/// reads it, and its connection is closed.
async fn body_deadline(State(state): State<Arc<AppState>>, request: Request) -> Request {
    with_body_deadline(&state, request)
}

/// `body_deadline`'s work, for the requests the router does not see (`proxy_directly`).
fn with_body_deadline(state: &AppState, request: Request) -> Request {
    let deadline = tokio::time::Instant::now() + state.config.body_read_timeout;
    request.map(|body| {
        Body::new(TimedBody {
            body,
            deadline,
            timer: None,
            limit: state.config.body_read_timeout,
        })
    })
}

/// Whether the main listener hands a request for `path` to the proxy itself, past the router:
/// the metered routes, which the router gives to `/v1/{*path}` (no route of the gateway's own
/// API has one of their paths, in any letter case). It skips, for nearly every request the
/// gateway serves, the router's matching, its layers and the boxing of the handler's future.
/// `uri` with its path normalised (`proxy::normalise_path`) when it names a `/v1/` route in
/// another spelling, before any route is matched: `/v1/limits/` is then the workspace API's
/// `/v1/limits` (it was forwarded upstream, with whatever body it had), and
/// `//v1//chat/completions` the metered route (it was a 404). `None` for a path already normal
/// (nearly every request's: one scan, no copy), or not under `/v1/`, or one that cannot be
/// normalised (the proxy refuses it).
/// A path that names one of the workspace API's routes in another letter case (`/v1/Limits`) is
/// given that route's own (`OWN_V1_ROUTES`): it was forwarded upstream.
pub(crate) fn normalised_v1(uri: &Uri) -> Option<Uri> {
    let path = match proxy::normalise_path(uri.path()).ok()? {
        std::borrow::Cow::Borrowed(normal) => own_route_spelt(normal)?,
        std::borrow::Cow::Owned(path) => own_route_spelt(&path).unwrap_or(path),
    };
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    target.parse().ok()
}

/// The first segments after `/v1/` of the workspace API's own routes, which are matched in any
/// letter case (`tests/gateway/openapi.rs` checks that this lists them all).
pub const OWN_V1_ROUTES: [&str; 5] = ["limits", "usage", "budget", "limit-requests", "webhooks"];

/// `path` (normal), when its first segment after `/v1/` names an own route in any letter case,
/// with every segment in lower case: the routes' words, and their ids (numbers, and the
/// lower-case hex of an event's, `evt_…`) alike (an outside audit: `/v1/webhooks/1/Deliveries`
/// was a `404`). `None` when it names none, or is spelt so already.
fn own_route_spelt(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/")?;
    let first = rest.split('/').next().unwrap_or(rest);
    OWN_V1_ROUTES
        .iter()
        .any(|own| own.eq_ignore_ascii_case(first))
        .then_some(())?;
    rest.bytes()
        .any(|b| b.is_ascii_uppercase())
        .then(|| format!("/v1/{}", rest.to_ascii_lowercase()))
}

pub(crate) fn proxied_directly(path: &str) -> bool {
    path.starts_with("/v1/") && crate::estimate::Endpoint::of_path(path).is_some()
}

/// What the main router does with a request `proxied_directly` names: the body's deadline
/// (`body_deadline`), then the proxy.
pub(crate) async fn proxy_directly(
    state: Arc<AppState>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<Response, std::convert::Infallible> {
    let request = with_body_deadline(&state, request.map(Body::new));
    Ok(proxy::proxy(State(state), request).await)
}

/// The error of a body that did not arrive whole in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} ms", .0.as_millis())]
pub struct BodyReadTimeout(pub Duration);

impl BodyReadTimeout {
    /// The timeout, if `error` or any error it wraps is a body read timeout.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(timeout) = e.downcast_ref::<BodyReadTimeout>() {
                return Some(timeout.0);
            }
            next = e.source();
        }
        None
    }
}

/// A request body that fails with `BodyReadTimeout` once its deadline passes. The timer is
/// made only when the body has to be waited for (not for an empty body, or one already whole).
struct TimedBody {
    body: Body,
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Some(Err(axum::Error::new(BodyReadTimeout(self.limit)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.store.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "store not reachable");
            // A probe's answer, in a probe's words (the API's error said nothing was changed).
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the database cannot be reached",
            )
                .into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.render_metrics();
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// Why a request carries no bearer token (`bearer` gave none): `missing`, the message for a
/// request without one or with another scheme; or that it sent two `Authorization` headers,
/// which a client told its key was missing would not look for.
pub(crate) fn no_bearer(headers: &HeaderMap, missing: &'static str) -> &'static str {
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        "Two 'Authorization' headers: send one, 'Authorization: Bearer <key>'."
    } else {
        missing
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next()?.to_str().ok()?;
    if all.next().is_some() {
        // Two credentials: which one the client meant is not the gateway's to guess.
        return None;
    }
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
) -> Result<Authenticated, ApiError> {
    let Some(secret) = bearer(headers) else {
        Metrics::inc(&state.metrics.unauthenticated);
        return Err(ApiError::Unauthorized(no_bearer(
            headers,
            "Missing API key: send 'Authorization: Bearer <key>'.",
        )));
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
