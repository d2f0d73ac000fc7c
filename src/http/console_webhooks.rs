//! The console's webhook pages: the endpoints an operator and a workspace register for the
//! events of [`crate::webhooks`], made and removed as the admin API and the workspace's own API
//! make and remove them (`admin::Admin`, the same validation and audit).
//!
//! The operator's (on the operator's pages' listener):
//! - `GET /console/operator/webhooks`: every endpoint (`table#webhooks`, a row
//!   `tr[data-webhook-id]` each): the operator's, which get every workspace's events, and the
//!   workspaces' own; a form to register one of the operator's (`form#create-webhook`).
//! - `GET /console/operator/webhooks/{id}`: an endpoint and its latest 100 deliveries
//!   (`table#deliveries`), as `GET /admin/v1/webhooks/{id}/deliveries` lists them.
//! - `POST /console/operator/webhooks` (`url`, `events`): registers it, then `303` to
//!   `GET /console/operator/webhooks/{id}/created`, which shows its signing secret once.
//! - `POST /console/operator/webhooks/{id}/delete`: removes it (any workspace's too).
//! - `POST /console/operator/webhooks/{id}/deliveries/{event}/redeliver`: sends a failed
//!   delivery again (`form.redeliver` beside it), then `303` to the endpoint's page.
//!
//! The workspace's (its session's workspace alone, as `/v1/webhooks`):
//! - a section of `/console/workspace` (`section#webhooks`): its endpoints, each with
//!   `form.delete-webhook`, and `form#create-webhook`;
//! - `GET /console/webhooks/{id}`: one of its endpoints and its latest 100 deliveries
//!   (`table#deliveries`), as `GET /v1/webhooks/{id}/deliveries` lists them;
//! - `POST /console/webhooks` → `303` to `GET /console/webhooks/{id}/created`;
//! - `POST /console/webhooks/{id}/delete` (another workspace's endpoint: `404`);
//! - `POST /console/webhooks/{id}/deliveries/{event}/redeliver`, as the operator's.
//!
//! **The secret, once.** As a new key's: the form answers `303`, and the secret goes to the
//! page that shows it in a cookie for that one path (`HttpOnly`, `SameSite=Strict`, 5 minutes),
//! never in a URL. The cookie is sealed (`Console::seal`) for the session that made the
//! endpoint and for that endpoint's id, so the page shows only a secret this gateway put there
//! for this session; it clears the cookie, and a reload gets `410`. The store keeps the secret
//! to sign deliveries and never gives it out again.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};

use super::console::{
    field, named_cookie, not_found_page, over_https, see_other, set_cookie, signed_in,
    workspace_form, workspace_refused,
};
use super::console_operator::{
    failure_page, id_of, key_shown_cookie, message_page, notice_of, operator_page, posted, refusal,
    require, Done, Operator, HOME, KEY_SHOWN_COOKIE, SHOWN_SINCE,
};
use super::views::Timestamp;
use crate::admin::AdminError;
use crate::app::AppState;
use crate::console::Session;
use crate::model::{Actor, WorkspaceId};
use crate::store::{DeliveryRecord, WebhookEndpoint};
use crate::webhooks::EVENT_TYPES;

pub(super) const OPERATOR_WEBHOOKS: &str = "/console/operator/webhooks";

/// The cookie that carries a new endpoint's secret to the page that shows it.
const NEW_SECRET_COOKIE: &str = "tiergate_new_webhook";
/// How long that cookie lives: long enough to follow the redirect.
const NEW_SECRET_SECONDS: i64 = 300;
/// The deliveries an endpoint's page lists.
const DELIVERIES_SHOWN: u32 = 100;

pub(super) fn operator_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(OPERATOR_WEBHOOKS, get(operator_list).post(operator_create))
        .route("/console/operator/webhooks/{id}", get(operator_endpoint))
        .route(
            "/console/operator/webhooks/{id}/created",
            get(operator_created),
        )
        .route(
            "/console/operator/webhooks/{id}/delete",
            post(operator_delete),
        )
        .route(
            "/console/operator/webhooks/{id}/deliveries/{event}/redeliver",
            post(operator_redeliver),
        )
}

pub(super) fn workspace_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console/webhooks", post(workspace_create))
        .route("/console/webhooks/{id}", get(workspace_endpoint))
        .route("/console/webhooks/{id}/created", get(workspace_created))
        .route("/console/webhooks/{id}/delete", post(workspace_delete))
        .route(
            "/console/webhooks/{id}/deliveries/{event}/redeliver",
            post(workspace_redeliver),
        )
}

// ---- Shared --------------------------------------------------------------------------------

/// A new endpoint's fields from its form: `url`, and each `events` box ticked.
fn new_endpoint(form: &[(String, String)]) -> (String, Vec<String>) {
    let url = field(form, "url").unwrap_or_default().trim().to_string();
    let events = form
        .iter()
        .filter(|(n, _)| n == "events")
        .map(|(_, v)| v.trim().to_string())
        .collect();
    (url, events)
}

/// The form that registers an endpoint, posted to `action`; `sent`: the form as it was sent,
/// when it was refused (else every event ticked).
fn create_form(
    action: &str,
    token: &str,
    scope: &str,
    sent: Option<&[(String, String)]>,
) -> Markup {
    let (url, events) = sent.map(new_endpoint).unwrap_or_default();
    let ticked = |e: &str| sent.is_none() || events.iter().any(|x| x == e);
    html! {
        form #create-webhook method="post" action=(action) {
            input type="hidden" name="csrf" value=(token);
            label.url { "URL " input type="url" name="url" required size="50" placeholder="https://example.com/hooks/tiergate" value=(url); }
            fieldset {
                legend { "Events" }
                @for e in EVENT_TYPES {
                    label.check { input type="checkbox" name="events" value=(e) checked[ticked(e)]; (e) }
                }
            }
            button type="submit" { "Add endpoint" }
            span.note { (scope) " Its signing secret is shown once, on the next page." }
        }
    }
}

/// Where the page that shows endpoint `id`'s secret is, under `base`.
fn created_path(base: &str, id: i64) -> String {
    format!("{base}/{id}/created")
}

/// The label a secret is sealed under: one endpoint's.
fn seal_label(id: i64) -> String {
    format!("webhook-secret:{id}")
}

/// The `303` to the page that shows the new endpoint's secret, with the sealed secret in a
/// cookie for that page's path alone.
fn to_secret_page(
    state: &AppState,
    session: &Session,
    base: &str,
    endpoint: &WebhookEndpoint,
    secret: &str,
    secure: bool,
) -> Response {
    let path = created_path(base, endpoint.id);
    let sealed = state
        .console
        .seal(session, &seal_label(endpoint.id), secret);
    let cookie = set_cookie(
        NEW_SECRET_COOKIE,
        &sealed,
        NEW_SECRET_SECONDS,
        &path,
        "Strict",
        secure,
    );
    see_other(&path, Some(cookie))
}

/// The secret the cookie carries to endpoint `id`'s page, if this session's gateway sealed it
/// there for that endpoint.
fn sealed_secret<'h>(
    state: &AppState,
    session: &Session,
    headers: &'h HeaderMap,
    id: i64,
) -> Option<&'h str> {
    let sealed = named_cookie(headers, NEW_SECRET_COOKIE)?;
    state.console.unseal(session, &seal_label(id), sealed)
}

/// What a page that showed a secret adds: the cookie cleared, and the "shown" cookie changed
/// (so that a browser's back/forward cache drops the page: see `console_operator`).
fn after_showing(page: &mut Response, base: &str, id: i64, secure: bool) {
    let path = created_path(base, id);
    let clear = set_cookie(NEW_SECRET_COOKIE, "", 0, &path, "Strict", secure);
    page.headers_mut().append(header::SET_COOKIE, clear);
    let shown = key_shown_cookie(&format!("webhook-{id}"), secure);
    page.headers_mut().append(header::SET_COOKIE, shown);
}

const GONE_SINCE: &str = "This endpoint was removed: its signing secret is not shown.";

const SHOWN_ONCE: &str = "This endpoint's signing secret was shown once. If it was not copied, remove the endpoint and add it again.";

fn secret_body(secret: &str, endpoint: Option<&WebhookEndpoint>, back: Markup) -> Markup {
    html! {
        h1 { "New webhook endpoint" }
        p { "Copy the signing secret now: it is shown this once. Deliveries are signed with it (Standard Webhooks: "
            code { "webhook-id" } ", " code { "webhook-timestamp" } ", " code { "webhook-signature" } ")." }
        p { code #new-secret { (secret) } }
        @if let Some(e) = endpoint {
            p.note { "For " code { (e.shown_url()) } " · " (e.events.join(", ")) }
        }
        p { (back) }
    }
}

fn events_text(e: &WebhookEndpoint) -> String {
    e.events.join(", ")
}

// ---- The operator's ------------------------------------------------------------------------

async fn operator_list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    show_list(&state, &op, StatusCode::OK, notice_of(raw), None, None).await
}

async fn show_list(
    state: &AppState,
    op: &Operator,
    status: StatusCode,
    notice: Option<&str>,
    error: Option<&str>,
    sent: Option<&[(String, String)]>,
) -> Response {
    match state.admin.list_webhooks(None).await {
        Ok(endpoints) => {
            let token = state.console.csrf_token(&op.session);
            operator_page(
                state,
                op,
                status,
                "Webhooks",
                (notice, error),
                list_body(&endpoints, &token, sent),
            )
        }
        Err(e) => failure_page(op, state, e).await,
    }
}

fn list_body(
    endpoints: &[WebhookEndpoint],
    token: &str,
    sent: Option<&[(String, String)]>,
) -> Markup {
    html! {
        h1 { "Webhooks" }
        p.note { "The operator's endpoints get every workspace's events; a workspace's own, only that workspace's. Each delivery is signed with the endpoint's secret and retried until it is answered 2xx (12 attempts)." }
        @if endpoints.is_empty() {
            p.note #no-webhooks { "No endpoint yet." }
        } @else {
            table #webhooks {
                thead { tr { th { "#" } th { "For" } th { "URL" } th { "Events" } th { "Created" } th {} } }
                tbody {
                    @for e in endpoints {
                        tr data-webhook-id=(e.id) {
                            td { a href=(format!("{OPERATOR_WEBHOOKS}/{}", e.id)) { (e.id) } }
                            td.scope {
                                @match e.workspace_id {
                                    Some(w) => { "workspace " a href=(format!("{HOME}/{w}")) { (w) } },
                                    None => "every workspace",
                                }
                            }
                            td.url { code { (e.shown_url()) } }
                            td.events { (events_text(e)) }
                            td { (Timestamp(e.created_at).rfc3339()) }
                            td {
                                a href=(format!("{OPERATOR_WEBHOOKS}/{}", e.id)) { "Deliveries" }
                                (remove_form(OPERATOR_WEBHOOKS, e, token, Shown::InList))
                            }
                        }
                    }
                }
            }
        }
        h2 { "New endpoint" }
        (create_form(OPERATOR_WEBHOOKS, token, "It gets every workspace's events.", sent))
    }
}

async fn operator_create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let secure = over_https(request.headers());
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (url, events) = new_endpoint(&form.0);
    match state
        .admin
        .create_webhook(&op.actor(), None, &url, &events)
        .await
    {
        Ok((endpoint, secret)) => to_secret_page(
            &state,
            &op.session,
            OPERATOR_WEBHOOKS,
            &endpoint,
            &secret,
            secure,
        ),
        Err(e) => {
            let (status, message) = refusal(e).await;
            show_list(&state, &op, status, None, Some(&message), Some(&form.0)).await
        }
    }
}

async fn operator_created(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let Some(id) = id_of(&id) else {
        return message_page(&op, &state, StatusCode::NOT_FOUND, "No such endpoint.");
    };
    let Some(secret) = sealed_secret(&state, &op.session, &headers, id) else {
        return message_page(&op, &state, StatusCode::GONE, SHOWN_ONCE);
    };
    let endpoints = state.admin.list_webhooks(None).await;
    // An endpoint removed since is not shown a secret for (a client that kept the cookie past
    // its life, as curl's cookie jar does, was: an outside audit). The list unreadable, the
    // secret is shown all the same: it is shown this once.
    if endpoints
        .as_ref()
        .is_ok_and(|all| all.iter().all(|e| e.id != id))
    {
        return message_page(&op, &state, StatusCode::GONE, GONE_SINCE);
    }
    let endpoints = endpoints.unwrap_or_default();
    let endpoint = endpoints.iter().find(|e| e.id == id);
    let back = html! { a href=(OPERATOR_WEBHOOKS) { "Back to the webhooks" } };
    let mut page = operator_page(
        &state,
        &op,
        StatusCode::OK,
        "New webhook endpoint",
        (Some("Endpoint added."), None),
        secret_body(secret, endpoint, back),
    );
    after_showing(&mut page, OPERATOR_WEBHOOKS, id, over_https(&headers));
    page
}

async fn operator_endpoint(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let messages = (notice_of(raw), None);
    operator_endpoint_page(&state, &op, &id, StatusCode::OK, messages).await
}

/// The operator's page of endpoint `id` (as its path gave it), with `messages` (a notice, an
/// error) and `status`; a page of the refusal when there is no such endpoint.
async fn operator_endpoint_page(
    state: &AppState,
    op: &Operator,
    id: &str,
    status: StatusCode,
    messages: (Option<&str>, Option<&str>),
) -> Response {
    let not_found = || AdminError::NotFound("No such endpoint.".into());
    let found = async {
        let id = id_of(id).ok_or_else(not_found)?;
        let endpoints = state.admin.list_webhooks(None).await?;
        let endpoint = endpoints
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(not_found)?;
        let deliveries = state.admin.webhook_deliveries(id, DELIVERIES_SHOWN).await?;
        Ok::<_, AdminError>((endpoint, deliveries))
    }
    .await;
    match found {
        Ok((endpoint, deliveries)) => {
            let token = state.console.csrf_token(&op.session);
            operator_page(
                state,
                op,
                status,
                "Webhook endpoint",
                messages,
                endpoint_body(&endpoint, &deliveries, &token),
            )
        }
        Err(e) => failure_page(op, state, e).await,
    }
}

fn endpoint_body(e: &WebhookEndpoint, deliveries: &[DeliveryRecord], token: &str) -> Markup {
    html! {
        h1 { "Webhook endpoint " (e.id) }
        p #endpoint {
            code { (e.shown_url()) } " · "
            @match e.workspace_id {
                Some(w) => { "workspace " a href=(format!("{HOME}/{w}")) { (w) } },
                None => "every workspace",
            }
            " · " (events_text(e)) " · created " (Timestamp(e.created_at).rfc3339())
        }
        (deliveries_table(deliveries, Answers::Shown, (OPERATOR_WEBHOOKS, e.id, token)))
        (remove_form(OPERATOR_WEBHOOKS, e, token, Shown::OnItsPage))
        p { a href=(OPERATOR_WEBHOOKS) { "Back to the webhooks" } }
    }
}

/// Where an endpoint's remove form stands.
#[derive(Clone, Copy, PartialEq)]
enum Shown {
    /// A row of a list of endpoints.
    InList,
    /// The endpoint's own page.
    OnItsPage,
}

/// The form that removes endpoint `e` (under `base`, the operator's pages or the workspace's),
/// behind a first click: its deliveries still due go with it.
fn remove_form(base: &str, e: &WebhookEndpoint, token: &str, shown: Shown) -> Markup {
    let (summary, button) = match shown {
        Shown::InList => ("Remove…", "Remove it and its deliveries due"),
        Shown::OnItsPage => ("Remove this endpoint…", "Remove it now"),
    };
    html! {
        details.delete-webhook {
            summary { (summary) }
            form.delete-webhook method="post" action=(format!("{base}/{}/delete", e.id)) {
                input type="hidden" name="csrf" value=(token);
                button type="submit" { (button) }
                @if shown == Shown::OnItsPage {
                    span.note { "Its deliveries still due are dropped." }
                }
            }
        }
    }
}

/// A workspace's own endpoint and its latest deliveries, with the form that removes it.
fn own_endpoint_body(e: &WebhookEndpoint, deliveries: &[DeliveryRecord], token: &str) -> Markup {
    html! {
        h1 { "Webhook endpoint " (e.id) }
        p #endpoint {
            code { (e.shown_url()) } " · " (events_text(e)) " · created "
            (Timestamp(e.created_at).rfc3339())
        }
        (deliveries_table(deliveries, Answers::Withheld, (WORKSPACE_WEBHOOKS, e.id, token)))
        (remove_form(WORKSPACE_WEBHOOKS, e, token, Shown::OnItsPage))
        p { a href="/console/workspace" { "Back to the workspace" } }
        form method="post" action="/console/sign-out" {
            input type="hidden" name="csrf" value=(token);
            button type="submit" { "Sign out" }
        }
    }
}

/// Whether a deliveries table shows what the endpoint answered: the operator's does; a
/// workspace's never does (`views::OwnDeliveryView` says why).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answers {
    Shown,
    Withheld,
}

/// The latest deliveries to an endpoint (`table#deliveries`), newest first; a failed one with
/// the form that sends it again (`form.redeliver`, to `{base}/{endpoint}/deliveries/{event}/
/// redeliver`, `again` = (base, endpoint, form token)).
fn deliveries_table(
    deliveries: &[DeliveryRecord],
    answers: Answers,
    again: (&str, i64, &str),
) -> Markup {
    let shown = answers == Answers::Shown;
    let (base, endpoint, token) = again;
    html! {
        h2 { "Latest deliveries" }
        @if deliveries.is_empty() {
            p.note #no-deliveries { "None yet." }
        } @else {
            table #deliveries {
                thead { tr { th { "Event" } th { "Type" } th { "Status" } th { "Attempts" } @if shown { th { "Last answer" } } th { "Next attempt" } th { "Created" } th {} } }
                tbody {
                    @for d in deliveries {
                        tr data-event-id=(d.event_id) data-status=(d.status) {
                            td { code { (d.event_id) } }
                            td { (d.kind) }
                            td.status { (d.status) }
                            td.attempts { (d.attempts) }
                            @if shown {
                                td.answer {
                                    @if let Some(code) = d.last_status { (code) }
                                    @if let Some(error) = &d.last_error { " " span.error-text { (error) } }
                                }
                            }
                            td { (d.next_attempt_at_ms.map_or_else(String::new, |ms| Timestamp(ms / 1000).rfc3339())) }
                            td { (Timestamp(d.created_at).rfc3339()) }
                            td {
                                @if d.status == "failed" {
                                    form.redeliver method="post" action=(format!("{base}/{endpoint}/deliveries/{}/redeliver", d.event_id)) {
                                        input type="hidden" name="csrf" value=(token);
                                        button type="submit" aria-label=(format!("Send {} again", d.event_id)) { "Send again" }
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

async fn operator_delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, _) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let removed = match id_of(&id) {
        Some(id) => state.admin.delete_webhook(&op.actor(), id, None).await,
        None => Err(AdminError::NotFound("No such endpoint.".into())),
    };
    match removed {
        Ok(_) => see_other(
            &format!("{OPERATOR_WEBHOOKS}?done={}", Done::WebhookRemoved.code()),
            None,
        ),
        Err(e) => failure_page(&op, &state, e).await,
    }
}

/// `POST /console/operator/webhooks/{id}/deliveries/{event}/redeliver`: a failed delivery sent
/// again, as the admin API's `redeliver`; back to the endpoint's page with a notice, or that page
/// again with the refusal and the admin API's status (one no longer failed, say).
async fn operator_redeliver(
    State(state): State<Arc<AppState>>,
    Path((id, event)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (op, _) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let sent = match id_of(&id) {
        Some(id) => state.admin.redeliver(&op.actor(), id, &event, None).await,
        None => Err(AdminError::NotFound("No such endpoint.".into())),
    };
    match sent {
        Ok(_) => see_other(
            &format!("{OPERATOR_WEBHOOKS}/{id}?done={}", Done::Redelivered.code()),
            None,
        ),
        Err(e) => {
            let (status, message) = refusal(e).await;
            operator_endpoint_page(&state, &op, &id, status, (None, Some(&message))).await
        }
    }
}

// ---- The workspace's -----------------------------------------------------------------------

const WORKSPACE_WEBHOOKS: &str = "/console/webhooks";

/// The workspace page's section: its endpoints and the form to add one (as it was sent, when
/// `sent` is a refused one: a form with a `url`).
pub(super) fn workspace_section(
    endpoints: &[WebhookEndpoint],
    token: &str,
    sent: Option<&[(String, String)]>,
) -> Markup {
    let sent = sent.filter(|f| field(f, "url").is_some());
    html! {
        section #webhooks {
            h2 { "Webhooks" }
            p.note { "Endpoints of your own get this workspace's events (limit requests made and decided, tier changes, suspension, quota thresholds), each signed with the endpoint's secret." }
            @if endpoints.is_empty() {
                p.note #no-webhooks { "No endpoint yet." }
            } @else {
                table #webhook-endpoints {
                    thead { tr { th { "URL" } th { "Events" } th { "Created" } th {} th {} } }
                    tbody {
                        @for e in endpoints {
                            tr data-webhook-id=(e.id) {
                                td.url { code { (e.shown_url()) } }
                                td.events { (events_text(e)) }
                                td { (Timestamp(e.created_at).rfc3339()) }
                                td { a.deliveries href=(format!("{WORKSPACE_WEBHOOKS}/{}", e.id)) { "Deliveries" } }
                                td {
                                    (remove_form(WORKSPACE_WEBHOOKS, e, token, Shown::InList))
                                }
                            }
                        }
                    }
                }
            }
            (create_form(WORKSPACE_WEBHOOKS, token, "At most 10 endpoints.", sent))
        }
    }
}

async fn workspace_create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let secure = over_https(request.headers());
    let (session, entry, form) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let ws: WorkspaceId = entry.workspace.id;
    let (url, events) = new_endpoint(&form);
    match state
        .admin
        .create_webhook(&Actor::workspace(ws), Some(ws), &url, &events)
        .await
    {
        Ok((endpoint, secret)) => to_secret_page(
            &state,
            &session,
            WORKSPACE_WEBHOOKS,
            &endpoint,
            &secret,
            secure,
        ),
        Err(e) => workspace_refused(&state, &session, &entry, e, Some(&form)).await,
    }
}

async fn workspace_created(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (session, entry) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(out) => return out.to_sign_in(&headers),
    };
    let Some(id) = id_of(&id) else {
        return not_found_page();
    };
    let back = html! { a href="/console/workspace" { "Back to the workspace" } };
    let Some(secret) = sealed_secret(&state, &session, &headers, id) else {
        return super::console::page(
            StatusCode::GONE,
            "Shown once",
            html! { p.error role="alert" { (SHOWN_ONCE) } p { (back) } },
        );
    };
    let endpoints = state.admin.list_webhooks(Some(entry.workspace.id)).await;
    // As for the operator's (`operator_created`).
    if endpoints
        .as_ref()
        .is_ok_and(|all| all.iter().all(|e| e.id != id))
    {
        return super::console::page(
            StatusCode::GONE,
            "Removed",
            html! { p.error role="alert" { (GONE_SINCE) } p { (back) } },
        );
    }
    let endpoints = endpoints.unwrap_or_default();
    let endpoint = endpoints.iter().find(|e| e.id == id);
    let mut page = super::console::page(
        StatusCode::OK,
        "New webhook endpoint",
        secret_body(secret, endpoint, back),
    );
    after_showing(&mut page, WORKSPACE_WEBHOOKS, id, over_https(&headers));
    page
}

/// One of the session's workspace's own endpoints and its latest deliveries (another
/// workspace's: `404`).
async fn workspace_endpoint(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (session, entry) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(out) => return out.to_sign_in(&headers),
    };
    let notice = (raw.as_deref() == Some("done=redelivered")).then_some(REDELIVERED);
    own_endpoint_page(
        &state,
        &session,
        &entry,
        &id,
        StatusCode::OK,
        (notice, None),
    )
    .await
}

/// What the workspace's endpoint page says after "Send again".
const REDELIVERED: &str = "Delivery sent again: its attempts start over, the first now.";

/// The workspace's page of its endpoint `id`, with `messages` (a notice, an error) and `status`
/// (another workspace's endpoint, or none: `404`).
async fn own_endpoint_page(
    state: &AppState,
    session: &Session,
    entry: &crate::catalog::WorkspaceEntry,
    id: &str,
    status: StatusCode,
    messages: (Option<&str>, Option<&str>),
) -> Response {
    let Some(id) = id_of(id) else {
        return not_found_page();
    };
    let found = state
        .admin
        .own_webhook_deliveries(entry.workspace.id, id, DELIVERIES_SHOWN)
        .await;
    match found {
        Ok((endpoint, deliveries)) => {
            let token = state.console.csrf_token(session);
            let (notice, error) = messages;
            super::console::page(
                status,
                "Webhook endpoint",
                html! {
                    @if let Some(n) = notice { p.notice role="status" { (n) } }
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    (own_endpoint_body(&endpoint, &deliveries, &token))
                },
            )
        }
        Err(AdminError::NotFound(_)) => not_found_page(),
        Err(e) => workspace_refused(state, session, entry, e, None).await,
    }
}

async fn workspace_delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (session, entry, _) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let ws = entry.workspace.id;
    let removed = match id_of(&id) {
        Some(id) => {
            state
                .admin
                .delete_webhook(&Actor::workspace(ws), id, Some(ws))
                .await
        }
        None => Err(AdminError::NotFound("No such endpoint.".into())),
    };
    match removed {
        Ok(_) => see_other("/console/workspace?done=webhook-removed", None),
        Err(AdminError::NotFound(_)) => not_found_page(),
        Err(e) => workspace_refused(&state, &session, &entry, e, None).await,
    }
}

/// `POST /console/webhooks/{id}/deliveries/{event}/redeliver`: a failed delivery to one of the
/// workspace's own endpoints sent again; back to the endpoint's page with a notice, or that page
/// again with the refusal.
async fn workspace_redeliver(
    State(state): State<Arc<AppState>>,
    Path((id, event)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (session, entry, _) = match workspace_form(&state, request).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let ws = entry.workspace.id;
    let sent = match id_of(&id) {
        Some(id) => {
            state
                .admin
                .redeliver(&Actor::workspace(ws), id, &event, Some(ws))
                .await
        }
        None => Err(AdminError::NotFound("No such endpoint.".into())),
    };
    match sent {
        Ok(_) => see_other(&format!("{WORKSPACE_WEBHOOKS}/{id}?done=redelivered"), None),
        Err(AdminError::NotFound(_)) => not_found_page(),
        Err(e @ (AdminError::Conflict(_) | AdminError::TooManyChanges { .. })) => {
            let (status, message) = refusal(e).await;
            own_endpoint_page(
                &state,
                &session,
                &entry,
                &id,
                status,
                (None, Some(&message)),
            )
            .await
        }
        Err(e) => workspace_refused(&state, &session, &entry, e, None).await,
    }
}

/// Whether the "shown" cookie of a page that showed a secret is still to be changed.
pub(super) fn shown_pending(headers: &HeaderMap) -> Option<String> {
    named_cookie(headers, KEY_SHOWN_COOKIE)
        .filter(|v| !v.ends_with(SHOWN_SINCE))
        .map(|v| format!("{v}{SHOWN_SINCE}"))
}
