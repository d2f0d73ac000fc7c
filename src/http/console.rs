//! The console's pages, at `/console`: server-rendered HTML (maud, checked at compile time,
//! escaping everything it interpolates), a small stylesheet inlined, no script. Sessions,
//! form tokens and the sign-in limiter are `crate::console`'s; this module parses, checks,
//! and renders.
//!
//! - `GET /console`: the sign-in form (or, signed in, a redirect to the session's first page:
//!   the workspace page, or the operator's workspaces).
//! - `POST /console/sign-in`: a workspace key or an admin token (form field `key`) for a
//!   session cookie (`HttpOnly`, `SameSite=Lax`, `Path=/console`, `Secure` when the request
//!   came over HTTPS as `X-Forwarded-Proto: https` says). A wrong key gets the form again,
//!   `401`; more than `SIGN_INS_PER_MINUTE` attempts a minute from one address, `429`. No
//!   session exists yet, so the form carries no token: it is protected by `SameSite=Lax` and,
//!   when the browser sends `Origin`, by requiring it to name this host (`403` otherwise).
//! - `GET /console/workspace`: the workspace's tier, limits with their usage (the figures of
//!   `GET /v1/limits`, from the same `usage_view`), charts of its usage per day and per hour
//!   and its usage per key (those of `GET /v1/usage`, drawn by `console_charts`), and its keys.
//!   The workspace is the session's: no id is taken from the URL.
//! - `POST /console/sign-out`: with the session's form token (`403` without it), clears the
//!   cookie.
//!
//! Every page re-checks the session's key and workspace in the catalogue
//! (`Catalog::session_key`): a session whose key was revoked or expired, or whose workspace was
//! suspended, is sent back to sign in, its cookie cleared. An operator's session is no
//! workspace's: the workspace page sends it to `/console`, which sends it on to its own pages.
//!
//! # Which listener serves what (`Scope`)
//! The operator's pages (`http::console_operator`) follow the admin API: without
//! `admin_listen` the main listener serves the workspace's pages and the operator's, and its
//! sign-in takes either secret (an admin token is looked for first, by digest, then a
//! workspace key). With `admin_listen`, the main listener serves the workspace's pages only and
//! its sign-in never looks at admin tokens (one typed there is refused as any wrong key is,
//! saying nothing of whether it was valid); the admin listener serves the sign-in form, the
//! operator's pages and sign-out, and its sign-in takes admin tokens only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;

use super::console_charts;
use super::views::{
    past_month, usage_history_view, usage_view, Timestamp, UsageHistoryView, UsageView, WindowView,
};
use crate::admin::{AdminError, NextTier};
use crate::app::AppState;
use crate::catalog::{AuthFailure, Authenticated, WorkspaceEntry};
use crate::console::{Session, SessionKind, COOKIE, SESSION_LIFETIME, SIGN_INS_PER_MINUTE};
use crate::limiter::MonthKey;
use crate::metrics::Metrics;
use crate::model::{
    Actor, ApiKey, AttributeValue, KeyId, KeyLimits, LimitRequest, LimitRequestId,
    LimitRequestStatus, Limits, Overrides, Tier, Workspace,
};
use crate::store::WebhookEndpoint;

/// The path every console route starts with: the server adds the client's address to these
/// requests only (`ClientAddr`).
pub const PREFIX: &str = "/console";

/// The address of the client's connection, added by the server to console requests.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A sign-in form body is a key and little else.
const MAX_FORM_BYTES: usize = 4096;

/// A form of the workspace page: an increase request's two texts may each be 4096 bytes, which
/// URL-encoding makes up to three times as long (a body that size used to be refused as an
/// invalid form, the text lost).
const MAX_PAGE_FORM_BYTES: usize = 64 * 1024;

const CSS: &str = include_str!("console.css");

/// Which sessions a listener's console serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// Workspace keys sign in, and the workspace's pages are served.
    pub workspace: bool,
    /// Admin tokens sign in, and the operator's pages are served.
    pub operator: bool,
}

pub fn routes(scope: Scope) -> Router<Arc<AppState>> {
    let mut routes = Router::new()
        .route("/console", get(sign_in_page))
        .route("/console/sign-in", post(sign_in))
        .route("/console/sign-out", post(sign_out));
    if scope.workspace {
        routes = routes
            .route("/console/workspace", get(workspace_page))
            .route("/console/workspace/usage", get(usage_page))
            .route("/console/keys/{id}/revoke", post(revoke_key))
            .route("/console/limit-requests", post(request_increase))
            .route(
                "/console/limit-requests/{id}/withdraw",
                post(withdraw_request),
            )
            .route("/console/budget", post(set_budget))
            .merge(super::console_webhooks::workspace_routes());
    }
    if scope.operator {
        routes = routes.merge(super::console_operator::routes());
    }
    routes.layer(Extension(scope))
}

async fn sign_in_page(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
) -> Response {
    if scope.operator && super::console_operator::operator_of(&state, &headers).is_some() {
        return see_other(super::console_operator::HOME, None);
    }
    let signed = match scope.workspace {
        true => signed_in(&state, &headers).await.map(|_| ()),
        // Here only an operator's session counts; any other cookie is for the other listener
        // (cookies are per host, not per port), so it is left alone.
        false => Err(SignedOut { clear: false }),
    };
    match signed {
        Ok(()) => see_other("/console/workspace", None),
        Err(SignedOut { clear }) => {
            let mut r = page(StatusCode::OK, "Sign in", sign_in_form(scope, None));
            if clear {
                r.headers_mut()
                    .append(header::SET_COOKIE, cookie("", 0, over_https(&headers)));
            }
            r
        }
    }
}

async fn sign_in(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    request: Request,
) -> Response {
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map(|a| a.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if !state.console.allow_sign_in(client, state.clock.now()) {
        Metrics::inc(&state.metrics.console_sign_in_rate_limited);
        let mut r = page(
            StatusCode::TOO_MANY_REQUESTS,
            "Sign in",
            sign_in_form(scope, Some(&format!(
                "Too many sign-in attempts from your address (at most {SIGN_INS_PER_MINUTE} a minute, one more every 6 seconds). Try again in 6 seconds."
            ))),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("6"));
        return r;
    }
    let (parts, body) = request.into_parts();
    if !same_origin(&parts.headers) {
        Metrics::inc(&state.metrics.console_sign_in_refused);
        return page(
            StatusCode::FORBIDDEN,
            "Sign in",
            sign_in_form(scope, Some("This form was sent from another site.")),
        );
    }
    let form = match read_form(body).await {
        Ok(form) => form,
        Err(Unread::TimedOut(answer)) => return answer,
        Err(Unread::TooLarge) => {
            Metrics::inc(&state.metrics.console_sign_in_refused);
            return page(
                StatusCode::BAD_REQUEST,
                "Sign in",
                sign_in_form(scope, Some("The form could not be read.")),
            );
        }
    };
    let key = field(&form, "key").unwrap_or_default();
    let now = state.clock.now_secs();
    if scope.operator {
        if let Some(value) = super::console_operator::sign_in(&state, key.trim(), now) {
            Metrics::inc(&state.metrics.console_signed_in);
            let secure = over_https(&parts.headers);
            return see_other(
                super::console_operator::HOME,
                Some(cookie(&value, SESSION_LIFETIME, secure)),
            );
        }
    }
    if !scope.workspace {
        Metrics::inc(&state.metrics.console_sign_in_refused);
        return page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            sign_in_form(scope, Some("Invalid admin token.")),
        );
    }
    // Identified, not authenticated: signing in is not a use of the key (`last_used_at`).
    match state.catalog.identify(key.trim(), now).await {
        Ok(Authenticated { key, workspace, .. }) => {
            Metrics::inc(&state.metrics.console_signed_in);
            let (_, value) = state.console.sign_in(workspace.workspace.id, key, now);
            let secure = over_https(&parts.headers);
            see_other(
                "/console/workspace",
                Some(cookie(&value, SESSION_LIFETIME, secure)),
            )
        }
        Err(failure) => {
            Metrics::inc(&state.metrics.console_sign_in_refused);
            let (status, message) = refusal(failure);
            page(status, "Sign in", sign_in_form(scope, Some(message)))
        }
    }
}

#[derive(Deserialize)]
struct PageQuery {
    /// What was just done, by a form of this page (`NOTICES`); anything else is ignored.
    done: Option<String>,
}

/// The notices a redirect back to the workspace page may ask for, by name: the page never shows
/// text taken from the URL.
const NOTICES: &[(&str, &str)] = &[
    (
        "requested",
        "Your request was sent. The operator's answer will show below.",
    ),
    (
        "revoked",
        "The key was revoked: requests with it are refused from now on.",
    ),
    ("budget", "Your budget was saved."),
    ("withdrawn", "Your request was withdrawn."),
    (
        "webhook-removed",
        "The endpoint was removed, with what it had still to receive.",
    ),
];

#[derive(Deserialize)]
struct MonthQuery {
    /// `YYYY-MM`, at most the current month; default: the current month.
    month: Option<String>,
}

/// `GET /console/workspace/usage?month=YYYY-MM`: the usage charts and the usage per key of one
/// month, with links to the months before and after, as `GET /v1/usage?month=` gives them
/// (the workspace's page shows this month's only).
async fn usage_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<MonthQuery>,
) -> Response {
    let (_, entry) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(out) => return out.to_sign_in(&headers),
    };
    let this = MonthKey::of(state.clock.now());
    let month = match query.month.as_deref().map(|m| past_month(m, this)) {
        None => this,
        Some(Ok(month)) => month,
        Some(Err(e)) => {
            let (status, message) = e.status_and_message().await;
            let body = html! {
                p.error { (message) }
                p { a href="/console/workspace/usage" { "This month's usage" } }
            };
            return page(status, "Usage", body);
        }
    };
    let history = match usage_history_view(&state, &entry.workspace, false, Some(month)).await {
        Ok(history) => history,
        Err(e) => return unavailable(e.into_response().status()),
    };
    let name = |m: MonthKey| format!("{:04}-{:02}", m.year(), m.month());
    let before = MonthKey(month.0 - 1);
    let after = MonthKey(month.0 + 1);
    let body = html! {
        h1 { "Usage of " (entry.workspace.name) }
        p #months {
            a #earlier href={ "/console/workspace/usage?month=" (name(before)) } { "← " (name(before)) }
            " · " strong { (name(month)) } " · "
            @if after <= this {
                a #later href={ "/console/workspace/usage?month=" (name(after)) } { (name(after)) " →" }
                " · "
            }
            a href="/console/workspace" { "Back to the workspace" }
        }
        (console_charts::usage_section(&history, month == this))
    };
    page(StatusCode::OK, "Usage", body)
}

async fn workspace_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let (session, entry) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(out) => return out.to_sign_in(&headers),
    };
    let notice = query
        .done
        .and_then(|d| NOTICES.iter().find(|(name, _)| *name == d))
        .map(|(_, text)| Notice::Done(text));
    let mut page = render_workspace(&state, &session, &entry, notice, StatusCode::OK, None).await;
    // A page that showed a new secret was left: the "shown" cookie changes again, so that
    // Back does not bring that page back from the browser's cache.
    if let Some(since) = super::console_webhooks::shown_pending(&headers) {
        let cookie = super::console_operator::key_shown_cookie(&since, over_https(&headers));
        page.headers_mut().append(header::SET_COOKIE, cookie);
    }
    page
}

/// A form of the workspace page refused by the admin operations: the page again with why, and
/// the status the API would give.
pub(super) async fn workspace_refused(
    state: &AppState,
    session: &Session,
    entry: &WorkspaceEntry,
    e: AdminError,
    form: Option<&[(String, String)]>,
) -> Response {
    let (status, retry_after) = match &e {
        AdminError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
        AdminError::Conflict(_) => (StatusCode::CONFLICT, None),
        AdminError::NotFound(_) => (StatusCode::NOT_FOUND, None),
        // The workspace's changes came too fast: the page again with when to try, as the API's
        // `429` says (an outside audit: it was a `503` page saying the console could not read
        // the workspace's usage).
        AdminError::TooManyChanges {
            retry_after_secs, ..
        } => (StatusCode::TOO_MANY_REQUESTS, Some(*retry_after_secs)),
        e => {
            tracing::warn!(error = %e, "console: a workspace's change failed");
            return unavailable(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let message = e.to_string();
    let mut page = render_workspace(
        state,
        session,
        entry,
        Some(Notice::Refused(&message)),
        status,
        form,
    )
    .await;
    if let Some(secs) = retry_after {
        page.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    page
}

/// What the page says at its top after a form: done, or why not.
enum Notice<'a> {
    Done(&'a str),
    Refused(&'a str),
}

/// The workspace page, with the increase-request form filled as it was sent when it was
/// refused (`form`).
async fn render_workspace(
    state: &AppState,
    session: &Session,
    entry: &WorkspaceEntry,
    notice: Option<Notice<'_>>,
    status: StatusCode,
    form: Option<&[(String, String)]>,
) -> Response {
    let ws = &entry.workspace;
    let usage = match usage_view(state, ws, &entry.limits, None, None, false).await {
        Ok(usage) => usage,
        Err(e) => return unavailable(e.into_response().status()),
    };
    let history = match usage_history_view(state, ws, false, None).await {
        Ok(history) => history,
        Err(e) => return unavailable(e.into_response().status()),
    };
    let (keys, tiers, requests, webhooks) = match tokio::try_join!(
        state.admin.list_keys(ws.id),
        state.admin.list_tiers(),
        state.admin.list_limit_requests(Some(ws.id), None),
        state.admin.list_webhooks(Some(ws.id)),
    ) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "console: could not read the workspace's keys, tiers or requests");
            return unavailable(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let next = match state.admin.next_tier(ws, &tiers, false).await {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = %e, "console: could not read the workspace's next tier");
            return unavailable(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let token = state.console.csrf_token(session);
    let page_data = WorkspacePage {
        entry,
        next: next.as_ref(),
        usage: &usage,
        history: &history,
        keys: &keys,
        tiers: &tiers,
        requests: &requests,
        webhooks: &webhooks,
        token: &token,
        session_key: session.workspace().map(|(_, key)| key),
        now: state.clock.now_secs(),
        notice,
        form,
    };
    page(status, &ws.name, workspace_body(&page_data))
}

/// A form of the workspace page, sent: the session, its workspace and the form's fields, once
/// the session, the origin and the form token hold; else the answer to send.
pub(super) async fn workspace_form(
    state: &AppState,
    request: Request,
) -> Result<(Session, Arc<WorkspaceEntry>, Vec<(String, String)>), Response> {
    let (parts, body) = request.into_parts();
    let (session, entry) = signed_in(state, &parts.headers)
        .await
        .map_err(|out| out.to_sign_in(&parts.headers))?;
    if !same_origin(&parts.headers) {
        return Err(page(
            StatusCode::FORBIDDEN,
            "Refused",
            html! { p.error { "This form was sent from another site." } },
        ));
    }
    let form = match read_form_up_to(body, MAX_PAGE_FORM_BYTES).await {
        Ok(form) => form,
        Err(Unread::TimedOut(answer)) => return Err(answer),
        Err(Unread::TooLarge) => {
            return Err(page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Refused",
                html! { p.error { "This form is too large to be read (64 KiB at most). Go back, shorten it and send it again." } },
            ))
        }
    };
    let token = field(&form, "csrf").unwrap_or_default();
    if !state.console.csrf_holds(&session, &token) {
        return Err(page(
            StatusCode::FORBIDDEN,
            "Refused",
            html! { p.error { "This form is not valid for your session. Reload the page and try again." } },
        ));
    }
    Ok((session, entry, form))
}

/// `POST /console/keys/{id}/revoke`: the workspace revokes one of its own keys. A key of
/// another workspace is answered as one that does not exist. Revoking the key the session was
/// made with ends the session.
async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (session, entry, _) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let Ok(id) = id.parse::<KeyId>() else {
        return not_found();
    };
    let ws = entry.workspace.id;
    match state
        .admin
        .revoke_workspace_key(&Actor::workspace(ws), ws, id)
        .await
    {
        Ok(_) if session.workspace().is_some_and(|(_, key)| key == id) => {
            see_other("/console", None)
        }
        Ok(_) => see_other("/console/workspace?done=revoked", None),
        Err(AdminError::NotFound(_)) => not_found(),
        Err(e @ AdminError::TooManyChanges { .. }) => {
            workspace_refused(&state, &session, &entry, e, None).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: could not revoke a key");
            unavailable(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

/// `POST /console/limit-requests/{id}/withdraw`: the workspace takes back one of its pending
/// requests, as `DELETE /v1/limit-requests/{id}`. Another workspace's request is answered as one
/// that does not exist; one already answered, with the page and why.
async fn withdraw_request(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (session, entry, _) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let Ok(id) = id.parse::<LimitRequestId>() else {
        return not_found();
    };
    let ws = entry.workspace.id;
    match state
        .admin
        .withdraw_limit_request(&Actor::workspace(ws), ws, id)
        .await
    {
        Ok(_) => see_other("/console/workspace?done=withdrawn", None),
        Err(AdminError::NotFound(_)) => not_found(),
        Err(AdminError::Conflict(m)) => {
            let notice = Some(Notice::Refused(&m));
            render_workspace(&state, &session, &entry, notice, StatusCode::CONFLICT, None).await
        }
        Err(e @ AdminError::TooManyChanges { .. }) => {
            workspace_refused(&state, &session, &entry, e, None).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: could not withdraw an increase request");
            unavailable(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

/// `POST /console/limit-requests`: the increase-request form, as `POST /v1/limit-requests`
/// (the same operation, by the workspace itself). A refused form is shown again as it was sent,
/// with why.
async fn request_increase(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (session, entry, form) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let ws = entry.workspace.id;
    let refused = |status, message: String| {
        let state = &state;
        let session = &session;
        let entry = &entry;
        let form = &form;
        async move {
            render_workspace(
                state,
                session,
                entry,
                Some(Notice::Refused(&message)),
                status,
                Some(form),
            )
            .await
        }
    };
    let requested = match requested_limits(&form) {
        Ok(r) => r,
        Err(message) => return refused(StatusCode::BAD_REQUEST, message).await,
    };
    let use_case = field(&form, "use_case").unwrap_or_default();
    let volume = field(&form, "expected_volume").filter(|v| !v.trim().is_empty());
    match state
        .admin
        .create_limit_request(
            &Actor::workspace(ws),
            ws,
            &use_case,
            volume.as_deref(),
            &requested,
        )
        .await
    {
        Ok(_) => see_other("/console/workspace?done=requested", None),
        Err(AdminError::Invalid(m)) => refused(StatusCode::BAD_REQUEST, m).await,
        Err(AdminError::Conflict(m)) => refused(StatusCode::CONFLICT, m).await,
        Err(e @ AdminError::TooManyChanges { .. }) => {
            workspace_refused(&state, &session, &entry, e, Some(&form)).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: could not file an increase request");
            unavailable(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

/// `POST /console/budget` (`tokens_per_month`, blank for none): the workspace's own cap for the
/// month, as `PUT /v1/budget` sets it; the per-model caps are kept.
async fn set_budget(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (session, entry, form) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let refused = |status, message: String| {
        let (state, session, entry, form) = (&state, &session, &entry, &form);
        async move {
            // The figure as typed, not the stored one (an outside audit saw it emptied).
            render_workspace(
                state,
                session,
                entry,
                Some(Notice::Refused(&message)),
                status,
                Some(form),
            )
            .await
        }
    };
    let text = field(&form, "tokens_per_month").unwrap_or_default();
    let text = text.trim().replace(['_', ','], "");
    let tokens_per_month = match text.as_str() {
        "" => None,
        n => match n.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return refused(
                    StatusCode::BAD_REQUEST,
                    "'tokens_per_month' must be a whole number, or empty for no budget".into(),
                )
                .await
            }
        },
    };
    let ws = entry.workspace.id;
    let budget = crate::model::Budget {
        tokens_per_month,
        models: entry.workspace.budget.models.clone(),
    };
    match state
        .admin
        .set_budget(&Actor::workspace(ws), ws, budget)
        .await
    {
        Ok(_) => see_other("/console/workspace?done=budget", None),
        Err(AdminError::Invalid(m)) => refused(StatusCode::BAD_REQUEST, m).await,
        Err(e @ AdminError::TooManyChanges { .. }) => {
            workspace_refused(&state, &session, &entry, e, Some(&form)).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: could not set a budget");
            unavailable(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

/// The limits asked for in the increase form: each field left blank is not asked for.
fn requested_limits(form: &[(String, String)]) -> Result<Overrides, String> {
    fn number<T: std::str::FromStr>(
        form: &[(String, String)],
        name: &str,
        what: &str,
    ) -> Result<Option<T>, String> {
        match field(form, name).map(|v| v.trim().replace(['_', ','], "")) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            // Digits that do not parse are too many for the type: a figure out of range is not
            // "not a whole number".
            Some(v) => {
                v.parse()
                    .map(Some)
                    .map_err(|_| match v.bytes().all(|b| b.is_ascii_digit()) {
                        true => format!("'{name}' is too large"),
                        false => format!("'{name}' must be {what}"),
                    })
            }
        }
    }
    Ok(Overrides {
        requests_per_second: number(form, "requests_per_second", "a number")?,
        burst: None,
        tokens_per_minute: number(form, "tokens_per_minute", "a whole number")?,
        tokens_per_month: number(form, "tokens_per_month", "a whole number")?,
        concurrent_requests: number(form, "concurrent_requests", "a whole number")?,
    })
}

async fn sign_out(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(session) = session_of(&state, &parts.headers) else {
        return SignedOut { clear: true }.to_sign_in(&parts.headers);
    };
    let form = match read_form(body).await {
        Ok(form) => form,
        Err(Unread::TimedOut(answer)) => return answer,
        Err(Unread::TooLarge) => Vec::new(),
    };
    let token = field(&form, "csrf").unwrap_or_default();
    if !same_origin(&parts.headers) || !state.console.csrf_holds(&session, &token) {
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            html! { p.error { "This form is not valid for your session. Reload the page and try again." } },
        );
    }
    see_other("/console", Some(cookie("", 0, over_https(&parts.headers))))
}

/// Not signed in (any more); `clear` when the browser holds a cookie to be removed.
pub(super) struct SignedOut {
    pub(super) clear: bool,
}

impl SignedOut {
    /// A redirect to sign in, clearing the cookie (with the same `Secure` as it was set with,
    /// so that the browser replaces it).
    pub(super) fn to_sign_in(&self, headers: &HeaderMap) -> Response {
        let clear = self.clear.then(|| cookie("", 0, over_https(headers)));
        see_other("/console", clear)
    }
}

/// The session in the request's cookie, if it is signed and unexpired.
pub(super) fn session_of(state: &AppState, headers: &HeaderMap) -> Option<Session> {
    let value = cookie_value(headers)?;
    state.console.verify(value, state.clock.now_secs())
}

/// The session, and its workspace, if the session is a workspace's, valid, and its key and
/// workspace still hold. An operator's session is not signed out by it (nothing to clear).
pub(super) async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Session, Arc<WorkspaceEntry>), SignedOut> {
    let clear = cookie_value(headers).is_some();
    let session = session_of(state, headers).ok_or(SignedOut { clear })?;
    let SessionKind::Workspace { workspace, key } = session.kind else {
        return Err(SignedOut { clear: false });
    };
    let entry = state
        .catalog
        .session_key(key, workspace, state.clock.now_secs())
        .await
        .map_err(|_| SignedOut { clear })?;
    Ok((session, entry))
}

pub(super) fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    named_cookie(headers, COOKIE)
}

/// The value of the cookie `wanted`, if the request carries it.
pub(super) fn named_cookie<'h>(headers: &'h HeaderMap, wanted: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == wanted).then_some(value)
        })
}

/// The session cookie's `Set-Cookie` (an empty value and `Max-Age=0` clears it).
pub(super) fn cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    set_cookie(COOKIE, value, max_age, PREFIX, "Lax", secure)
}

/// A console cookie's `Set-Cookie`: `HttpOnly` always, `Secure` over HTTPS.
pub(super) fn set_cookie(
    name: &str,
    value: &str,
    max_age: i64,
    path: &str,
    same_site: &str,
    secure: bool,
) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Max-Age={max_age}; Path={path}; HttpOnly; SameSite={same_site}{secure}"
    ))
    .expect("a cookie of ASCII")
}

pub(super) fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// True unless the browser says the request comes from a page of another host: `Origin`, when
/// sent, must name the host the request was sent to (`Host`, or `X-Forwarded-Host` as a proxy
/// in front that rewrites `Host` sets it; a page of another site cannot set either on a form it
/// sends).
pub(super) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin_host) = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host)
    else {
        return false;
    };
    [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .any(|host| host.trim().eq_ignore_ascii_case(origin_host))
}

async fn read_form(body: Body) -> Result<Vec<(String, String)>, Unread> {
    read_form_up_to(body, MAX_FORM_BYTES).await
}

/// Why a form's body was not read.
pub(super) enum Unread {
    /// Over the size allowed, or the client went away.
    TooLarge,
    /// It did not arrive whole within `body_read_timeout_ms`: answered `408` with the
    /// connection closed, as every other route answers it (this is that answer).
    TimedOut(Response),
}

/// A form body of at most `max` bytes, as its fields in order.
pub(super) async fn read_form_up_to(
    body: Body,
    max: usize,
) -> Result<Vec<(String, String)>, Unread> {
    let bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
        match super::BodyReadTimeout::find(&e) {
            Some(t) => Unread::TimedOut(
                super::error::ApiError::RequestTimeout(t.as_millis() as u64).into_response(),
            ),
            None => Unread::TooLarge,
        }
    })?;
    Ok(url::form_urlencoded::parse(&bytes).into_owned().collect())
}

pub(super) fn field(form: &[(String, String)], name: &str) -> Option<String> {
    form.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}

fn refusal(failure: AuthFailure) -> (StatusCode, &'static str) {
    match failure {
        AuthFailure::UnknownKey => (StatusCode::UNAUTHORIZED, "Invalid or revoked API key."),
        AuthFailure::Expired => (StatusCode::FORBIDDEN, "This API key has expired."),
        AuthFailure::Suspended => (
            StatusCode::FORBIDDEN,
            "This workspace is suspended; contact the operator.",
        ),
    }
}

pub(super) fn see_other(to: &str, cookie: Option<HeaderValue>) -> Response {
    let location = HeaderValue::try_from(to).unwrap_or_else(|_| HeaderValue::from_static(PREFIX));
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response();
    if let Some(c) = cookie {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

fn unavailable(status: StatusCode) -> Response {
    page(
        status,
        "Unavailable",
        html! { p.error { "The console cannot read this workspace's usage now. Try again in a moment." } },
    )
}

/// The console's `404`: a page with the way back, for a path under `/console` that is none.
pub(super) fn not_found_page() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        html! {
            h1 { "Not found" }
            p { "There is no such page. " a href="/console" { "Back to the console" } "." }
        },
    )
}

/// The console's one script:
/// - a page the browser brings back from its back/forward cache (Back after signing out, say)
///   is asked for again, so that the server decides what it shows. An outside audit saw the
///   workspace's page again after signing out: `no-store` and the cleared cookie did not keep
///   Chromium from restoring it;
/// - a form is sent once: a second submission of it from the same page (a double click) is
///   dropped. An outside audit's double click on "Add endpoint" made two webhook endpoints, one
///   of whose secrets was never shown. Every form of the console leads to another page, which
///   starts anew.
///
/// Without script the pages work as before, a double click included.
const SCRIPT: &str = "addEventListener('pageshow',function(e){if(e.persisted){location.reload();}});\
addEventListener('submit',function(e){var f=e.target;if(f.dataset.sent){e.preventDefault();}else{f.dataset.sent='1';}});";

/// The pages' `Content-Security-Policy`: no script but `SCRIPT` (by its hash), no
/// other source, no framing.
static POLICY: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    use base64::Engine;
    use sha2::Digest;
    let hash =
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT.as_bytes()));
    HeaderValue::try_from(format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ))
    .expect("a valid header value")
});

pub(super) fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · tiergate console" }
                style { (PreEscaped(CSS)) }
                script { (PreEscaped(SCRIPT)) }
            }
            body {
                header { a href="/console" { "tiergate console" } }
                main { (body) }
            }
        }
    };
    let mut r = (status, markup.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("content-security-policy", POLICY.clone());
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn sign_in_form(scope: Scope, error: Option<&str>) -> Markup {
    let label = match (scope.workspace, scope.operator) {
        (true, true) => "Workspace API key or admin token",
        (false, true) => "Admin token",
        _ => "Workspace API key",
    };
    html! {
        h1 { "Sign in" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form #sign-in method="post" action="/console/sign-in" {
            label for="key" { (label) }
            input #key type="password" name="key" autocomplete="off" required;
            button type="submit" { "Sign in" }
        }
        p.note { "The secret is exchanged for a session cookie of 12 hours; it is not kept in your browser." }
    }
}

/// One limit's row: a bar of what is `used` of `limit`, and the figures.
fn bar(
    id: &str,
    label: &str,
    used: f64,
    limit: f64,
    figures: Markup,
    reset: Option<&str>,
) -> Markup {
    let used = used.clamp(0.0, limit.max(0.0));
    html! {
        tr data-limit=(id) {
            th scope="row" { (label) }
            // Named for screen readers (an outside audit: the bars had no accessible name).
            td { meter min="0" max=(limit) value=(used) aria-label=(format!("{label}: used of the limit")) {} }
            td.figures { (figures) }
            td { @if let Some(r) = reset { "whole again in " (r) } }
        }
    }
}

/// One limit of a model's own: a row like `bar`'s, named by the model too.
fn model_bar(
    model: &str,
    id: &str,
    label: &str,
    used: f64,
    limit: f64,
    figures: Markup,
    reset: &str,
) -> Markup {
    let used = used.clamp(0.0, limit.max(0.0));
    html! {
        tr data-model=(model) data-limit=(id) {
            th scope="row" { (model) }
            td { (label) }
            td { meter min="0" max=(limit) value=(used) aria-label=(format!("{model}, {label}: used of the limit")) {} }
            td.figures { (figures) }
            td { "whole again in " (reset) }
        }
    }
}

/// The requests/s row: its bar is of the burst, what may be sent at once (`remaining` never
/// exceeds it), not of the rate; with a burst below the rate, a bar of the rate showed requests
/// in use on an idle workspace.
fn requests_row(w: &WindowView, limits: &Limits) -> Markup {
    let burst = if limits.requests_per_second == Some(w.limit) {
        f64::from(limits.effective_burst())
    } else {
        // A key's own rate, tighter than the workspace's: its burst is not in `limits`.
        w.limit.ceil().max(1.0)
    }
    .max(w.remaining as f64);
    let used = (burst - w.remaining as f64).max(0.0);
    bar(
        "requests_per_second",
        "Requests per second",
        used,
        burst,
        html! {
            span.remaining { (w.remaining) } " of " (burst) " at once left · "
            (w.limit) " per second"
        },
        Some(&w.reset),
    )
}

fn window_row(id: &str, label: &str, unit: &str, w: &WindowView) -> Markup {
    let used = (w.limit - w.remaining as f64).max(0.0);
    bar(
        id,
        label,
        used,
        w.limit,
        html! { span.remaining { (w.remaining) } " of " (w.limit) " " (unit) " left" },
        Some(&w.reset),
    )
}

/// A key's own limits as text: `none`, or `requests_per_second 2, burst 2, tokens_per_minute
/// 5000`.
pub(super) fn key_limits_text(l: &KeyLimits) -> String {
    let KeyLimits {
        requests_per_second,
        burst,
        tokens_per_minute,
        tokens_per_month,
    } = l;
    let parts: Vec<String> = [
        (
            "requests_per_second",
            requests_per_second.map(|v| v.to_string()),
        ),
        ("burst", burst.map(|v| v.to_string())),
        (
            "tokens_per_minute",
            tokens_per_minute.map(|v| v.to_string()),
        ),
        ("tokens_per_month", tokens_per_month.map(|v| v.to_string())),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|v| format!("{name} {v}")))
    .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// What the workspace page shows.
struct WorkspacePage<'a> {
    entry: &'a WorkspaceEntry,
    usage: &'a UsageView,
    history: &'a UsageHistoryView,
    keys: &'a [ApiKey],
    tiers: &'a [Tier],
    /// What the workspace can reach next (`Admin::next_tier`).
    next: Option<&'a NextTier>,
    requests: &'a [LimitRequest],
    webhooks: &'a [WebhookEndpoint],
    token: &'a str,
    /// The key the session was made with (revoking it ends the session).
    session_key: Option<KeyId>,
    /// Unix seconds, to tell expired keys.
    now: i64,
    notice: Option<Notice<'a>>,
    /// The increase form as it was sent, when it was refused.
    form: Option<&'a [(String, String)]>,
}

fn workspace_body(p: &WorkspacePage<'_>) -> Markup {
    let WorkspacePage {
        entry,
        usage,
        history,
        keys,
        tiers,
        requests,
        token,
        session_key,
        ..
    } = p;
    let ws = &entry.workspace;
    let limits = &entry.limits;
    let shadow = entry.shadow.as_deref();
    html! {
        h1 { (ws.name) }
        @match &p.notice {
            Some(Notice::Done(text)) => p.notice role="status" { (text) },
            Some(Notice::Refused(text)) => p.error role="alert" { (text) },
            None => {},
        }
        p { "Tier " strong #tier { (ws.tier) } " · status " (format!("{:?}", ws.status).to_lowercase()) " · month " (usage.month) }
        h2 { "Limits and usage" }
        table.limits {
            thead { tr { th { "Limit" } th { "Usage" } th { "Now" } th { "Reset" } } }
            tbody {
                @match &usage.requests_per_second {
                    Some(w) => (requests_row(w, limits)),
                    None => (unenforced("requests_per_second", "Requests per second", shadow.and_then(|l| l.requests_per_second).map(|v| format!("{v} per second")))),
                }
                @match &usage.tokens_per_minute {
                    Some(w) => (window_row("tokens_per_minute", "Tokens per minute", "tokens", w)),
                    None => (unenforced("tokens_per_minute", "Tokens per minute", shadow.and_then(|l| l.tokens_per_minute).map(|v| format!("{v} tokens")))),
                }
                @match &usage.tokens_per_month {
                    Some(m) => (bar(
                        "tokens_per_month",
                        "Tokens per month",
                        m.used as f64,
                        m.limit,
                        html! {
                            span.used { (m.used) } " of " (m.limit) " tokens used"
                            // The month limit is the workspace's own budget where that is lower.
                            @if ws.budget.tokens_per_month.is_some_and(|b| b as f64 == m.limit) {
                                " " span.budget-binds { "(your own budget)" }
                            }
                            // The month limit in shadow under an enforced budget: shown too (an
                            // outside audit: it appeared nowhere on the page).
                            @if let Some(v) = shadow.and_then(|l| l.tokens_per_month) {
                                "; the month limit, in shadow: " span.shadow { (v) " tokens" } " (not enforced)"
                            }
                        },
                        Some(&m.reset),
                    )),
                    None => (unenforced("tokens_per_month", "Tokens per month", shadow.and_then(|l| l.tokens_per_month).map(|v| format!("{v} tokens")))),
                }
                @match limits.concurrent_requests {
                    Some(c) => (bar(
                        "concurrent_requests",
                        "Concurrent requests",
                        usage.in_flight as f64,
                        c as f64,
                        html! { span.used { (usage.in_flight) } " of " (c) " in flight" },
                        None,
                    )),
                    None => (unenforced("concurrent_requests", "Concurrent requests", shadow.and_then(|l| l.concurrent_requests).map(|v| format!("{v} at once")))),
                }
            }
        }
        p.note { "Requests this month: " span #requests-this-month { (usage.requests_this_month) } " (the ledger, up to about a second behind)." }
        @let shadow_models = model_limits_in_shadow(limits, shadow);
        @if !usage.models.is_empty() || !shadow_models.is_empty() {
            h2 { "Per model" }
            table.limits.models #model-limits {
                thead { tr { th { "Model" } th { "Limit" } th { "Usage" } th { "Now" } th { "Reset" } } }
                tbody {
                    @for m in &usage.models {
                        @if let Some(w) = &m.tokens_per_minute {
                            (model_bar(
                                &m.model,
                                "tokens_per_minute",
                                "Tokens per minute",
                                (w.limit - w.remaining as f64).max(0.0),
                                w.limit,
                                html! { span.remaining { (w.remaining) } " of " (w.limit) " tokens left" },
                                &w.reset,
                            ))
                        }
                        @if let Some(w) = &m.tokens_per_month {
                            (model_bar(
                                &m.model,
                                "tokens_per_month",
                                "Tokens per month",
                                w.used as f64,
                                w.limit,
                                html! { span.used { (w.used) } " of " (w.limit) " tokens used" },
                                &w.reset,
                            ))
                        }
                    }
                    @for (model, id, label, figure) in &shadow_models {
                        tr data-model=(model) data-limit=(id) {
                            th scope="row" { (model) }
                            td { (label) }
                            td colspan="3" { "in shadow: " span.shadow { (figure) " tokens" } " (not enforced; requests over it are admitted and counted)" }
                        }
                    }
                }
            }
        }
        (tier_ladder(ws, limits, shadow, tiers, p.next))
        (console_charts::usage_section(history, true))
        p { a #earlier-months href="/console/workspace/usage" { "Usage by month, earlier months included" } }
        h2 { "API keys" }
        table.keys #keys {
            thead { tr { th { "Prefix" } th { "Name" } th { "Created" } th { "Last used" } th { "Expires" } th { "Limits of its own" } th { "Status" } th {} } }
            tbody {
                @for k in keys.iter() {
                    tr data-key-id=(k.id) {
                        td { code { (k.prefix) "…" } }
                        td { (k.name.as_deref().unwrap_or("")) }
                        td { (Timestamp(k.created_at).rfc3339()) }
                        td { (k.last_used_at.map(|t| Timestamp(t).rfc3339()).unwrap_or_else(|| "never".into())) }
                        td { (k.expires_at.map_or_else(|| "never".into(), |t| Timestamp(t).rfc3339())) }
                        // As enforced: within the workspace's limits of the moment.
                        td.key-limits {
                            (key_limits_text(&k.limits.within(limits)))
                            // What its own month limit has taken so far (the ledger's figure,
                            // as in the usage by key): a limit alone said nothing of how near
                            // the key was to it (an outside audit).
                            @if k.limits.tokens_per_month.is_some() {
                                @let used = p.history.keys.iter().find(|u| u.key_id == k.id).map_or(0, |u| u.tokens);
                                br; span.note.key-month-used data-tokens=(used) { (used) " used this month" }
                            }
                        }
                        td.status { (key_status(k, p.now)) }
                        td {
                            @if k.revoked_at.is_none() {
                                // Asked twice: the first click only opens the button that
                                // revokes (an outside audit: one click revoked a key).
                                details.revoke {
                                    summary { "Revoke…" }
                                    form.revoke method="post" action={ "/console/keys/" (k.id) "/revoke" } {
                                        input type="hidden" name="csrf" value=(token);
                                        button type="submit" {
                                            "Revoke " (k.prefix) " now: it cannot be undone"
                                            @if Some(k.id) == *session_key { " (signs you out)" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        p.note { "New keys are made by the operator: a leaked key cannot mint more." }
        (budget_form(&ws.budget, token, p.form.filter(|f| field(f, "use_case").is_none() && field(f, "url").is_none()).and_then(|f| field(f, "tokens_per_month"))))
        (increase_form(limits, token, p.form.filter(|f| field(f, "use_case").is_some())))
        (past_requests(requests, token))
        (super::console_webhooks::workspace_section(p.webhooks, token, p.form))
        form method="post" action="/console/sign-out" {
            input type="hidden" name="csrf" value=(token);
            button type="submit" { "Sign out" }
        }
    }
}

/// The workspace's limits beside what the next tier up the ladder gives.
/// `shadow`: the workspace's limits in shadow, shown as such where `limits` (the enforced ones)
/// have none.
fn tier_ladder(
    ws: &Workspace,
    limits: &Limits,
    shadow: Option<&Limits>,
    tiers: &[Tier],
    next_tier: Option<&NextTier>,
) -> Markup {
    let current = tiers.iter().find(|t| t.name == ws.tier);
    let next = next_tier.map(|n| &n.tier);
    let rows: [(&str, &str, Option<String>, Option<String>); 4] = {
        let rps = |l: &Limits| l.requests_per_second.map(|v| v.to_string());
        let tpm = |l: &Limits| l.tokens_per_minute.map(|v| v.to_string());
        let month = |l: &Limits| l.tokens_per_month.map(|v| v.to_string());
        let conc = |l: &Limits| l.concurrent_requests.map(|v| v.to_string());
        let n = next.map(|t| &t.limits);
        // What the workspace has now: the enforced figure, else the one in shadow, said so.
        let now = |f: &dyn Fn(&Limits) -> Option<String>| {
            f(limits).or_else(|| shadow.and_then(f).map(|v| format!("in shadow: {v}")))
        };
        [
            (
                "requests_per_second",
                "Requests per second",
                now(&rps),
                n.and_then(rps),
            ),
            (
                "tokens_per_minute",
                "Tokens per minute",
                now(&tpm),
                n.and_then(tpm),
            ),
            (
                "tokens_per_month",
                "Tokens per month",
                // The workspace's own budget where it binds, said so, beside the month limit in
                // shadow if there is one (an outside audit: the budget alone read as the tier's).
                match ws.budget.tokens_per_month {
                    Some(b) if limits.tokens_per_month == Some(b) => {
                        Some(match shadow.and_then(|l| l.tokens_per_month) {
                            Some(s) => format!("in shadow: {s}; your own budget: {b}"),
                            None => format!("{b} (your own budget)"),
                        })
                    }
                    _ => now(&month),
                },
                n.and_then(month),
            ),
            (
                "concurrent_requests",
                "Concurrent requests",
                now(&conc),
                n.and_then(conc),
            ),
        ]
    };
    html! {
        h2 { "Your tier and the next" }
        @match next {
            Some(next) => {
                table.ladder #ladder {
                    thead { tr {
                        th { "Limit" }
                        th { "Yours now (" (ws.tier) ")" }
                        th data-next-tier=(next.name) { "Tier " (next.name) }
                    } }
                    tbody {
                        @for (id, label, now, then) in &rows {
                            tr data-limit=(id) {
                                th scope="row" { (label) }
                                td.now { (now.as_deref().unwrap_or("no limit")) }
                                td.next { (then.as_deref().unwrap_or("no limit")) }
                            }
                        }
                    }
                }
                @match next_tier.and_then(|n| n.conditions.as_ref().map(|c| (c, n.pinned))) {
                    Some((conditions, pinned)) => {
                        @if pinned {
                            p.note #promotion-pinned { "The operator holds this workspace on its tier: it is not moved up by itself." }
                        } @else {
                            p.note { "This workspace moves up to tier " (next.name) " by itself once every condition below is met:" }
                        }
                        ul #promotion {
                            @for c in conditions {
                                li data-condition=(c.name) data-met=(c.met) {
                                    @if c.met { "✓ " } @else { "✗ " }
                                    (condition_label(&c.name)) ": "
                                    (c.actual.map_or_else(|| "none".to_string(), |a| a.to_string()))
                                    @match c.required {
                                        AttributeValue::Bool(b) => { ", needs " (b) },
                                        AttributeValue::Number(n) => { " of at least " (n) },
                                    }
                                }
                            }
                        }
                        p.note { "To get more sooner, ask for an increase below." }
                    }
                    None => p.note { "This tier is reached by asking: request an increase below." },
                }
            }
            None => {
                p #ladder-top { @if current.is_some_and(|c| c.rank.is_some()) {
                    "Tier " (ws.tier) " is the top of the ladder. For more, ask for an increase below."
                } @else {
                    "Tier " (ws.tier) " is set for you apart from the ladder. For more, ask for an increase below."
                } }
            }
        }
    }
}

/// A promotion condition as a person reads it.
fn condition_label(name: &str) -> String {
    match name {
        "min_days" => "days since the workspace was created".into(),
        "min_tokens_30d" => "tokens used over the last 30 days".into(),
        other => other.strip_prefix("attributes.").map_or_else(
            || other.to_string(),
            |a| format!("{a} (set by the operator)"),
        ),
    }
}

/// The workspace's own monthly cap: a form for the whole workspace's, and the models' as set
/// through the API.
/// `typed`: the figure of a refused budget form, shown again as it was sent.
fn budget_form(budget: &crate::model::Budget, token: &str, typed: Option<String>) -> Markup {
    let value = typed.unwrap_or_else(|| {
        budget
            .tokens_per_month
            .map(|n| n.to_string())
            .unwrap_or_default()
    });
    html! {
        h2 { "Your monthly budget" }
        p.note { "A cap you set below your limits, so that a bug cannot spend the whole quota. Past it, requests are refused (429, code workspace_budget) until next month or until you raise it." }
        form #budget method="post" action="/console/budget" {
            input type="hidden" name="csrf" value=(token);
            label for="budget_tokens_per_month" {
                "Tokens per month (empty: no budget)"
                input #budget_tokens_per_month type="number" min="1" step="1" name="tokens_per_month" value=(value);
            }
            button type="submit" { "Save the budget" }
        }
        @if !budget.models.is_empty() {
            p.note #model-budgets {
                "Per model (set with PUT /v1/budget): "
                @for (i, (model, n)) in budget.models.iter().enumerate() {
                    @if i > 0 { ", " }
                    (model) " " (n)
                }
            }
        }
    }
}

/// The "request a limit increase" form; `sent` holds the fields of a refused one, shown again.
/// The form asking for higher limits: a field for each limit the workspace has now (`limits`,
/// its tier's with its overrides), labelled with the figure in force. A limit it does not have is
/// not offered: asking for one would lower it, and was refused whatever the figure (an outside
/// audit: a free tier's form offered "Concurrent requests").
fn increase_form(limits: &Limits, token: &str, sent: Option<&[(String, String)]>) -> Markup {
    let value = |name: &str| sent.and_then(|f| field(f, name)).unwrap_or_default();
    let number = |name: &str, label: &str, step: &str, now: Option<String>| {
        html! {
            @if let Some(now) = now {
                label for=(name) { (label) " (now " (now) ")" input id=(name) type="number" name=(name) min="0" step=(step) value=(value(name)); }
            }
        }
    };
    let whole = |v: Option<u64>| v.map(super::console_charts::grouped);
    let offered = limits.requests_per_second.is_some()
        || limits.tokens_per_minute.is_some()
        || limits.tokens_per_month.is_some()
        || limits.concurrent_requests.is_some();
    html! {
        h2 { "Request a limit increase" }
        form #increase method="post" action="/console/limit-requests" {
            input type="hidden" name="csrf" value=(token);
            label for="use_case" { "Use case (required)" textarea #use_case name="use_case" rows="3" maxlength="4096" required { (value("use_case")) } }
            fieldset {
                legend { "The limits you need (leave blank what you do not ask for)" }
                (number("requests_per_second", "Requests per second", "0.001", limits.requests_per_second.map(|v| v.to_string())))
                (number("tokens_per_minute", "Tokens per minute", "1", whole(limits.tokens_per_minute)))
                (number("tokens_per_month", "Tokens per month", "1", whole(limits.tokens_per_month)))
                (number("concurrent_requests", "Concurrent requests", "1", whole(limits.concurrent_requests.map(u64::from))))
                @if !offered {
                    p.note { "Your workspace has none of these limits: there is nothing to raise." }
                }
            }
            label for="expected_volume" { "Expected volume (optional)" input #expected_volume type="text" name="expected_volume" maxlength="4096" placeholder="e.g. 2M tokens a day, peaks of 20 requests/s" value=(value("expected_volume")); }
            button type="submit" { "Send the request" }
        }
    }
}

/// The workspace's increase requests, newest first, with the operator's answer.
fn past_requests(requests: &[LimitRequest], token: &str) -> Markup {
    html! {
        h2 { "Your increase requests" }
        @if requests.is_empty() {
            p.note #no-requests { "None yet." }
        } @else {
            table.requests #requests {
                thead { tr { th { "Sent" } th { "Use case" } th { "Asked for" } th { "Status" } th { "Answer" } } }
                tbody {
                    @for r in requests.iter().rev() {
                        tr data-request-id=(r.id) data-status=(r.status.as_str()) {
                            td.at { (Timestamp(r.created_at).rfc3339()) }
                            td.use-case {
                                (r.use_case)
                                @if let Some(v) = &r.expected_volume { br; span.note { "Expected volume: " (v) } }
                            }
                            td { (overrides_text(&r.requested_limits)) }
                            td.status { (r.status.as_str()) }
                            td.answer {
                                @if let Some(g) = &r.granted_limits {
                                    "Granted: " (overrides_text(g))
                                    @if let Some(note) = &r.reason { br; "Note: " (note) }
                                } @else if let Some(reason) = &r.reason { "Denied: " (reason) }
                                @if let Some(at) = r.decided_at { br; span.note { (Timestamp(at).rfc3339()) } }
                                @if r.status == LimitRequestStatus::Pending {
                                    // Behind a first click, as revoking a key is: a withdrawn
                                    // request cannot be put back in the queue.
                                    details.withdraw {
                                        summary { "Withdraw…" }
                                        form.withdraw method="post" action={ "/console/limit-requests/" (r.id) "/withdraw" } {
                                            input type="hidden" name="csrf" value=(token);
                                            button type="submit" { "Withdraw request " (r.id) " now: it cannot be undone" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Overrides as a short text: `tokens_per_minute 5000, concurrent_requests 10`.
fn overrides_text(o: &Overrides) -> String {
    let fields = [
        (
            "requests_per_second",
            o.requests_per_second.map(|v| v.to_string()),
        ),
        ("burst", o.burst.map(|v| v.to_string())),
        (
            "tokens_per_minute",
            o.tokens_per_minute.map(|v| v.to_string()),
        ),
        (
            "tokens_per_month",
            o.tokens_per_month.map(|v| v.to_string()),
        ),
        (
            "concurrent_requests",
            o.concurrent_requests.map(|v| v.to_string()),
        ),
    ];
    let parts: Vec<String> = fields
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| format!("{name} {v}")))
        .collect();
    parts.join(", ")
}

fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        html! { p.error { "There is no such thing in your workspace." } },
    )
}

/// A key's status as both consoles show it: `revoked`, `expired` (refused since its expiry) or
/// `active`.
pub(super) fn key_status(k: &ApiKey, now: i64) -> &'static str {
    if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|t| t <= now) {
        "expired"
    } else {
        "active"
    }
}

/// Each model's limits in shadow that are not enforced too: (model, limit, label, figure). A
/// model's limits in shadow went unshown (an outside audit: a model's 100 tokens a minute in
/// shadow appeared nowhere on the page).
fn model_limits_in_shadow<'a>(
    limits: &Limits,
    shadow: Option<&'a Limits>,
) -> Vec<(&'a str, &'static str, &'static str, u64)> {
    let mut rows = Vec::new();
    for (model, l) in shadow.map(|s| &s.models).into_iter().flatten() {
        let enforced = limits.models.get(model);
        if let (Some(v), None) = (
            l.tokens_per_minute,
            enforced.and_then(|e| e.tokens_per_minute),
        ) {
            rows.push((model.as_str(), "tokens_per_minute", "Tokens per minute", v));
        }
        if let (Some(v), None) = (
            l.tokens_per_month,
            enforced.and_then(|e| e.tokens_per_month),
        ) {
            rows.push((model.as_str(), "tokens_per_month", "Tokens per month", v));
        }
    }
    rows
}

/// A limit not enforced: in shadow (its figure, which only says what it would have denied: see
/// the `x-ratelimit-shadow-denied` header), else none at all.
fn unenforced(id: &str, label: &str, shadow: Option<String>) -> Markup {
    match shadow {
        Some(figure) => html! {
            tr data-limit=(id) {
                th scope="row" { (label) }
                td colspan="3" { "in shadow: " span.shadow { (figure) } " (not enforced; requests over it are admitted and counted)" }
            }
        },
        None => unlimited(id, label),
    }
}

fn unlimited(id: &str, label: &str) -> Markup {
    html! { tr data-limit=(id) { th scope="row" { (label) } td colspan="3" { "no limit" } } }
}
