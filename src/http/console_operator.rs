//! The console's operator pages, at `/console/operator/…`: what an operator signed in with an
//! admin token sees and changes. Server-rendered like the workspace's pages (`http::console`,
//! whose page frame, cookies and form checks these share), no script.
//!
//! - `GET /console/operator` → `303` to the workspaces.
//! - `GET /console/operator/workspaces?q=&sort=&dir=&page=`: the workspaces (`table#workspaces`,
//!   a row `tr[data-workspace-id]` each): name, id, tier, status, tokens this month, created;
//!   searched by a part of the name or id (`q`), sorted by `sort` = `name`, `id`, `tier`,
//!   `status`, `usage` or `created` (`dir` = `asc` or `desc`), `admin::WORKSPACE_PAGE` (50) a
//!   page. Searched, sorted and cut in the store's SQL (`Store::search_workspaces`), so a page
//!   costs the same with thousands of workspaces.
//! - `GET /console/operator/workspaces/{id}`: a workspace: its tier, its effective limits (the
//!   tier's, the overrides, the result), this month's usage, its keys (each with its own limits)
//!   and its increase requests;
//!   forms to change its tier (`form#change-tier`), its overrides (`form#overrides`), its status
//!   (`form#change-status`), to make a key (`form#create-key`) and revoke one (`form.revoke`).
//!   - `POST …/{id}/tier` (`tier`), `POST …/{id}/overrides` (the override fields; each shown
//!     with its value as loaded, `was_<field>`, so that only the fields edited are sent, as a
//!     patch: a number sets, an emptied field clears, and whatever changed the others meanwhile,
//!     an approval say, is kept), `POST …/{id}/status` (`status`: `active` or `suspended`),
//!     `POST …/{id}/keys` (`name`, `expires_at`): the key is made, and the answer is `303` to
//!     `GET /console/operator/keys/{id}/created`, the new secret in a cookie for that one path
//!     (`HttpOnly`, `SameSite=Strict`, 5 minutes), never in a URL. That page shows the secret if
//!     the cookie holds the secret of that very key, and clears the cookie: the secret is shown
//!     once, and reloading the page (or going back to it) makes no second key and shows no
//!     secret (`410`).
//!   - `POST …/{id}/attributes` (`attributes`: lines `NAME=VALUE`, replacing them all, then the
//!     promotion checked at once), `POST …/{id}/enforcement` (`enforcement`: `tier`, `enforce`
//!     or `shadow`; `shadow`: a box per limit, none ticked for the tier's alone).
//!   - `POST /console/operator/keys/{id}/revoke`; `POST /console/operator/keys/{id}/limits`
//!     (`form.key-limits`, one per active key, beside its limits: the four fields of
//!     `PATCH /admin/v1/keys/{id}`, filled with what the key has; an empty field is no limit of
//!     its own, all empty clears them).
//! - `GET /console/operator/tiers`: the catalogue (`table#tiers`, `tr[data-tier]`), a form per
//!   tier (`form.tier-edit`, `POST /console/operator/tiers/{name}`) and one to create a tier
//!   (`form#create-tier`, `POST /console/operator/tiers`, refused if the name exists). A tier's
//!   form holds all its limits (an empty field is no limit, as a field left out of
//!   `PUT /admin/v1/tiers/{name}` is), per-model ones as lines `MODEL tokens_per_minute=N
//!   tokens_per_month=N`, its promotion (`promotion_to`, `min_days`, `min_tokens_30d`,
//!   `min_attributes` as lines `NAME=VALUE`), `enforcement` and the limits it keeps in shadow
//!   (`shadow` boxes). A form without `enforcement` (one from before these fields) keeps the
//!   tier's promotion and shadow settings.
//! - `/console/operator/webhooks…`: the webhook endpoints (`http::console_webhooks`).
//! - `GET /console/operator/requests?status=&workspace=`: increase requests (`table#requests`,
//!   a row `tr[data-request-id]` each), pending ones by default, oldest first; `status=all`
//!   lists every one, pending first. A pending one has `form.approve` (the override fields,
//!   filled with what was asked: grant them as they are or edit them) and `form.deny`
//!   (`reason`, required): `POST /console/operator/requests/{id}/approve` and `…/deny`.
//! - `GET /console/operator/audit?workspace=&actor=&action=&after=`: the audit log, newest first,
//!   read-only, filtered as `GET /admin/v1/audit` is (`form#audit-filter`); the next page's link
//!   keeps the filters.
//!
//! Every page checks the session: an operator's session whose admin token is still configured
//! (same name, same fingerprint: `crate::console`). Without one, `303` to `/console` (the
//! cookie cleared if there was one); with a workspace's session, `403` and nothing of the
//! operator's data. Every `POST` carries the session's form token (`csrf`) and passes the
//! `Origin` check (`403` otherwise). Every change is made through `admin::Admin` as
//! `Actor::admin(<token's name>)`, the very actor the admin API records for that token, so the
//! audit log says who made it whichever front end they used; `Admin` refreshes this instance's
//! catalogue before it returns, so a change holds from the next request. A change answers `303`
//! back to its page with a short notice (`?done=…`, a fixed code, never text from the request);
//! a refused one shows the page again with the message, and the status the admin API would
//! give (`400` for what is not valid, `404`, `409`, `503`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::console::{
    cookie_value, field, key_limits_text, named_cookie, over_https, page, read_form_up_to,
    same_origin, see_other, session_of, set_cookie, SignedOut, Unread, PREFIX,
};
use super::error::ApiError;
use super::views::{usage_view, Timestamp};
use crate::admin::{self, AdminError, AuditQuery, NewKeyInput, WorkspaceListing, WorkspaceUpdate};
use crate::app::AppState;
use crate::console::{Session, SessionKind};
use crate::model::{
    Actor, ApiKey, AttributeValue, Attributes, AuditAction, AuditEntry, Enforcement, KeyId,
    LimitRequest, LimitRequestStatus, Limits, ModelLimits, Overrides, Promotion, ShadowLimit, Tier,
    TierSpec, Workspace, WorkspaceId, WorkspaceStatus,
};
use crate::store::{WorkspacePage, WorkspaceSort};

/// Where an operator lands after signing in.
pub const HOME: &str = "/console/operator/workspaces";
const REQUESTS: &str = "/console/operator/requests";
const TIERS: &str = "/console/operator/tiers";
const AUDIT: &str = "/console/operator/audit";

/// An operator's form holds at most a reason (4 KiB) or a tier's per-model lines.
const MAX_FORM_BYTES: usize = 64 * 1024;
/// Audit entries a page shows.
const AUDIT_PAGE: i64 = 50;

/// The override fields, in the order the forms show them, with their labels.
const OVERRIDE_FIELDS: [(&str, &str); 5] = [
    ("requests_per_second", "Requests per second"),
    ("burst", "Burst"),
    ("tokens_per_minute", "Tokens per minute"),
    ("tokens_per_month", "Tokens per month"),
    ("concurrent_requests", "Concurrent requests"),
];

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console/operator", get(|| async { see_other(HOME, None) }))
        .route(HOME, get(workspaces_page).post(create_workspace))
        .route("/console/operator/workspaces/{id}", get(workspace_page))
        .route("/console/operator/workspaces/{id}/tier", post(change_tier))
        .route(
            "/console/operator/workspaces/{id}/overrides",
            post(change_overrides),
        )
        .route(
            "/console/operator/workspaces/{id}/status",
            post(change_status),
        )
        .route("/console/operator/workspaces/{id}/pin", post(change_pin))
        .route(
            "/console/operator/workspaces/{id}/attributes",
            post(change_attributes),
        )
        .route(
            "/console/operator/workspaces/{id}/enforcement",
            post(change_enforcement),
        )
        .route("/console/operator/workspaces/{id}/keys", post(create_key))
        .route("/console/operator/keys/{id}/created", get(created_key))
        .route("/console/operator/keys/{id}/revoke", post(revoke_key))
        .route("/console/operator/keys/{id}/limits", post(set_key_limits))
        .route(TIERS, get(tiers_page).post(create_tier))
        .route("/console/operator/tiers/{name}", post(edit_tier))
        .route(REQUESTS, get(requests_page))
        .route("/console/operator/requests/{id}/approve", post(approve))
        .route("/console/operator/requests/{id}/deny", post(deny))
        .route(AUDIT, get(audit_page))
        .merge(super::console_webhooks::operator_routes())
}

/// A signed-in operator: the session, and the admin token's name it acts as.
pub(super) struct Operator {
    pub(super) session: Session,
    name: String,
    /// The new key whose secret a page showed last, if no page has been shown since
    /// (`KEY_SHOWN_COOKIE`), and whether the request came over HTTPS.
    key_shown: Option<String>,
    secure: bool,
}

impl Operator {
    /// The actor the admin API records for the same token.
    pub(super) fn actor(&self) -> Actor {
        Actor::admin(&self.name)
    }
}

/// An admin token's cookie value for a new operator's session, if `secret` is a configured
/// admin token.
pub(super) fn sign_in(state: &AppState, secret: &str, now: i64) -> Option<String> {
    let token = super::admin::admin_token(&state.config.admin_tokens, secret)?;
    let digest = Sha256::digest(token.token.as_bytes());
    Some(state.console.sign_in_operator(&token.name, &digest, now).1)
}

/// The operator this request's cookie signs in, if its session is valid and its admin token is
/// still configured (by name and fingerprint).
pub(super) fn operator_of(state: &AppState, headers: &HeaderMap) -> Option<Operator> {
    let session = session_of(state, headers)?;
    let SessionKind::Operator { name, fingerprint } = &session.kind else {
        return None;
    };
    let holds = state.config.admin_tokens.iter().any(|t| {
        t.name == *name
            && state
                .console
                .operator_fingerprint(&Sha256::digest(t.token.as_bytes()))
                == *fingerprint
    });
    let name = name.clone();
    let key_shown = named_cookie(headers, KEY_SHOWN_COOKIE)
        .filter(|v| !v.ends_with(SHOWN_SINCE))
        .map(str::to_owned);
    holds.then_some(Operator {
        session,
        name,
        key_shown,
        secure: over_https(headers),
    })
}

/// A cookie whose value changes when a new key's secret is shown (its key's id), and again on
/// the next operator's page (`<id>-done`). Chromium keeps even `no-store` pages in its
/// back/forward cache, but drops them if the site's cookies changed since: so Back neither shows
/// the secret's page again nor the workspace's page as it was before the key was made.
pub(super) const KEY_SHOWN_COOKIE: &str = "tiergate_key_shown";
pub(super) const SHOWN_SINCE: &str = "-done";

pub(super) fn key_shown_cookie(value: &str, secure: bool) -> HeaderValue {
    set_cookie(KEY_SHOWN_COOKIE, value, 43_200, PREFIX, "Strict", secure)
}

/// Why a request gets no operator's page.
pub(super) enum NotOperator {
    /// A workspace's session: `403`, nothing of the operator's.
    Workspace,
    /// No valid operator's session: to sign in (clearing the cookie, if any).
    SignedOut,
}

impl NotOperator {
    pub(super) fn answer(self, headers: &HeaderMap) -> Response {
        match self {
            NotOperator::Workspace => page(
                StatusCode::FORBIDDEN,
                "Operators only",
                html! {
                    h1 { "Operators only" }
                    p.error role="alert" { "This page is for operators. Sign out, then sign in with an admin token." }
                    p { a href="/console" { "Back to the console" } }
                },
            ),
            NotOperator::SignedOut => SignedOut {
                clear: cookie_value(headers).is_some(),
            }
            .to_sign_in(headers),
        }
    }
}

/// The operator, or why there is none.
pub(super) fn require(state: &AppState, headers: &HeaderMap) -> Result<Operator, NotOperator> {
    if let Some(op) = operator_of(state, headers) {
        return Ok(op);
    }
    match session_of(state, headers) {
        Some(Session {
            kind: SessionKind::Workspace { .. },
            ..
        }) => Err(NotOperator::Workspace),
        _ => Err(NotOperator::SignedOut),
    }
}

/// A `POST` of an operator's form: the operator and the form's fields, once the session, the
/// `Origin` and the form's token hold.
pub(super) async fn posted(
    state: &AppState,
    request: Request,
) -> Result<(Operator, Form), Response> {
    let (parts, body) = request.into_parts();
    let op = require(state, &parts.headers).map_err(|n| n.answer(&parts.headers))?;
    let refused = || {
        page(
            StatusCode::FORBIDDEN,
            "Refused",
            html! { p.error role="alert" { "This form is not valid for your session. Reload the page and try again." } },
        )
    };
    if !same_origin(&parts.headers) {
        return Err(page(
            StatusCode::FORBIDDEN,
            "Refused",
            html! { p.error role="alert" { "This form was sent from another site." } },
        ));
    }
    let fields = match read_form_up_to(body, MAX_FORM_BYTES).await {
        Ok(fields) => fields,
        Err(Unread::TimedOut(answer)) => return Err(answer),
        Err(Unread::TooLarge) => {
            return Err(message_page(
                &op,
                state,
                StatusCode::BAD_REQUEST,
                "The form could not be read (at most 64 KiB).",
            ))
        }
    };
    let form = Form(fields);
    if !state.console.csrf_holds(&op.session, &form.get("csrf")) {
        return Err(refused());
    }
    Ok((op, form))
}

/// A form's fields.
pub(super) struct Form(pub(super) Vec<(String, String)>);

impl Form {
    /// The field, trimmed; empty when absent.
    fn get(&self, name: &str) -> String {
        field(&self.0, name)
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }

    /// Whether the form has the field at all (even empty).
    fn has(&self, name: &str) -> bool {
        field(&self.0, name).is_some()
    }

    /// Every value of a field that may repeat (checkboxes of one name).
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.trim())
    }
}

/// What a refused change shows: the admin API's status and message for it.
pub(super) async fn refusal(e: AdminError) -> (StatusCode, String) {
    ApiError::from(e).status_and_message().await
}

/// A number typed in a form as the admin API's JSON would give it (`Value::Null` when empty,
/// for "clear"); text that is not a number names the field.
fn number(field: &str, text: &str) -> Result<Value, AdminError> {
    if text.is_empty() {
        return Ok(Value::Null);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Number(_)) => Ok(v),
        _ => Err(AdminError::Invalid(format!(
            "'{field}' must be a number, or empty"
        ))),
    }
}

/// Overrides typed in a form (empty fields set nothing), read and checked as the admin API
/// reads its `limits`.
fn overrides_of(form: &Form) -> Result<Overrides, AdminError> {
    let values = OVERRIDE_FIELDS
        .iter()
        .map(|(f, _)| Ok((*f, number(f, &form.get(f))?)))
        .collect::<Result<Vec<_>, AdminError>>()?;
    let set: Vec<(&str, &Value)> = values
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(f, v)| (*f, v))
        .collect();
    Ok(admin::overrides_patch(set)?.apply(&Overrides::default()))
}

/// A tier's limits typed in its form: an empty field is no limit.
/// A tier's rank from its form: empty for none (off the ladder).
fn rank_of(form: &Form) -> Result<Option<u32>, AdminError> {
    let text = form.get("rank");
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|_| {
        AdminError::Invalid(
            "'rank' must be a whole number from 0, or empty for a tier off the ladder".into(),
        )
    })
}

fn limits_of(form: &Form) -> Result<Limits, AdminError> {
    fn parsed<T: std::str::FromStr>(
        form: &Form,
        field: &str,
        what: &str,
    ) -> Result<Option<T>, AdminError> {
        let text = form.get(field);
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            AdminError::Invalid(format!("'{field}' must be {what}, or empty for no limit"))
        })
    }
    const WHOLE: &str = "a whole number";
    let mut models = std::collections::BTreeMap::new();
    for (i, line) in form.get("models").lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            AdminError::Invalid(format!(
                "models, line {}: write MODEL tokens_per_minute=N tokens_per_month=N (either limit may be left out; a name with a space in double quotes)",
                i + 1
            ))
        };
        let (model, rest) = model_word(line).ok_or_else(bad)?;
        let mut limits = ModelLimits::default();
        for word in rest.split_whitespace() {
            let (name, value) = word.split_once('=').ok_or_else(bad)?;
            let value: u64 = value.parse().map_err(|_| bad())?;
            match name {
                "tokens_per_minute" => limits.tokens_per_minute = Some(value),
                "tokens_per_month" => limits.tokens_per_month = Some(value),
                _ => return Err(bad()),
            }
        }
        if models.insert(model.to_string(), limits).is_some() {
            return Err(AdminError::Invalid(format!(
                "models, line {}: {model} is given twice",
                i + 1
            )));
        }
    }
    Ok(Limits {
        requests_per_second: parsed(form, "requests_per_second", "a number")?,
        burst: parsed(form, "burst", WHOLE)?,
        tokens_per_minute: parsed(form, "tokens_per_minute", WHOLE)?,
        tokens_per_month: parsed(form, "tokens_per_month", WHOLE)?,
        concurrent_requests: parsed(form, "concurrent_requests", WHOLE)?,
        models,
        key: None,
    })
}

/// A tier's promotion, its enforcement and the limits it keeps in shadow.
type Growth = (Option<Promotion>, Enforcement, Vec<ShadowLimit>);

/// A tier's promotion, enforcement and limits in shadow from its form; `None` when the form
/// has none of those fields (a form of before they were editable: the tier keeps its own).
fn growth_of(form: &Form) -> Result<Option<Growth>, AdminError> {
    if !form.has("enforcement") {
        return Ok(None);
    }
    fn whole<T: std::str::FromStr>(form: &Form, field: &str) -> Result<Option<T>, AdminError> {
        let text = form.get(field);
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| AdminError::Invalid(format!("'{field}' must be a whole number, or empty")))
    }
    let min_days = whole(form, "min_days")?;
    let min_tokens_30d = whole(form, "min_tokens_30d")?;
    let min_attributes = AttributeValue::lines(&form.get("min_attributes"))
        .map_err(|m| AdminError::Invalid(format!("min_attributes, {m}")))?;
    let to = form.get("promotion_to");
    let promotion = if to.is_empty() {
        if min_days.is_some() || min_tokens_30d.is_some() || !min_attributes.is_empty() {
            return Err(AdminError::Invalid(
                "'promotion_to': the promotion's conditions need a tier to promote to".into(),
            ));
        }
        None
    } else {
        Some(Promotion {
            to,
            min_days,
            min_tokens_30d,
            min_attributes,
        })
    };
    let enforcement = Enforcement::parse(&form.get("enforcement")).map_err(AdminError::Invalid)?;
    Ok(Some((promotion, enforcement, shadow_of(form)?)))
}

/// The limits ticked in a form's `shadow` boxes, sorted, each once.
fn shadow_of(form: &Form) -> Result<Vec<ShadowLimit>, AdminError> {
    let mut shadow = form
        .all("shadow")
        .map(ShadowLimit::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(AdminError::Invalid)?;
    shadow.sort();
    shadow.dedup();
    Ok(shadow)
}

/// A workspace id from a path; `None` (a `404`) when it is not one.
pub(super) fn id_of(text: &str) -> Option<i64> {
    text.parse().ok().filter(|id| *id > 0)
}

/// The notices a change leaves on the page it returns to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    Tier,
    Overrides,
    Unchanged,
    Suspended,
    Reactivated,
    Revoked,
    KeyLimits,
    TierSaved,
    TierCreated,
    Approved,
    Denied,
    Pinned,
    Unpinned,
    Created,
    Attributes,
    AttributesPromoted,
    Enforcement,
    WebhookRemoved,
    Redelivered,
}

impl Done {
    const ALL: [Done; 19] = [
        Done::Redelivered,
        Done::Created,
        Done::AttributesPromoted,
        Done::WebhookRemoved,
        Done::Attributes,
        Done::Enforcement,
        Done::Pinned,
        Done::Unpinned,
        Done::Tier,
        Done::Overrides,
        Done::Unchanged,
        Done::Suspended,
        Done::Reactivated,
        Done::Revoked,
        Done::KeyLimits,
        Done::TierSaved,
        Done::TierCreated,
        Done::Approved,
        Done::Denied,
    ];

    pub(super) fn code(self) -> &'static str {
        match self {
            Done::Tier => "tier",
            Done::Overrides => "overrides",
            Done::Unchanged => "unchanged",
            Done::Suspended => "suspended",
            Done::Reactivated => "reactivated",
            Done::Revoked => "revoked",
            Done::KeyLimits => "key-limits",
            Done::TierSaved => "tier-saved",
            Done::TierCreated => "tier-created",
            Done::Approved => "approved",
            Done::Denied => "denied",
            Done::Pinned => "pinned",
            Done::Unpinned => "unpinned",
            Done::Created => "created",
            Done::Attributes => "attributes",
            Done::AttributesPromoted => "attributes-promoted",
            Done::Enforcement => "enforcement",
            Done::WebhookRemoved => "webhook-removed",
            Done::Redelivered => "redelivered",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Done::Tier => "Tier changed.",
            Done::Overrides => "Overrides saved.",
            Done::Unchanged => "Nothing was changed: no field was edited.",
            Done::Suspended => "Workspace suspended.",
            Done::Reactivated => "Workspace reactivated.",
            Done::Revoked => "Key revoked.",
            Done::KeyLimits => "Key limits saved.",
            Done::TierSaved => "Tier saved.",
            Done::TierCreated => "Tier created.",
            Done::Approved => "Request approved.",
            Done::Denied => "Request denied.",
            Done::Pinned => "Workspace pinned: it is not promoted automatically.",
            Done::Unpinned => "Workspace released: it is promoted when it qualifies.",
            Done::Created => "Workspace created. Make it a key below.",
            Done::Attributes => {
                "Attributes saved; the promotion conditions were checked again, and not all hold."
            }
            Done::AttributesPromoted => {
                "Attributes saved: they met its tier's promotion conditions, and it was promoted."
            }
            Done::Enforcement => "Enforcement saved.",
            Done::WebhookRemoved => "Endpoint removed, with what it had still to receive.",
            Done::Redelivered => "Delivery sent again: its attempts start over, the first now.",
        }
    }

    fn parse(code: &str) -> Option<Done> {
        Done::ALL.into_iter().find(|d| d.code() == code)
    }
}

/// A query string's parameters.
fn query(raw: Option<String>) -> Vec<(String, String)> {
    raw.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The notice `?done=` names, if any.
fn notice(params: &[(String, String)]) -> Option<&'static str> {
    param(params, "done").and_then(Done::parse).map(Done::text)
}

/// The notice a page's raw query names with `?done=`, if any.
pub(super) fn notice_of(raw: Option<String>) -> Option<&'static str> {
    notice(&query(raw))
}

/// An operator's page: the navigation, a notice or an error, and `body`.
pub(super) fn operator_page(
    state: &AppState,
    op: &Operator,
    status: StatusCode,
    title: &str,
    messages: (Option<&str>, Option<&str>),
    body: Markup,
) -> Response {
    let token = state.console.csrf_token(&op.session);
    let (notice, error) = messages;
    let mut answer = page(
        status,
        title,
        html! {
            nav.operator {
                a href=(HOME) { "Workspaces" }
                a href=(REQUESTS) { "Requests" }
                a href=(TIERS) { "Tiers" }
                a href=(super::console_webhooks::OPERATOR_WEBHOOKS) { "Webhooks" }
                a href=(AUDIT) { "Audit log" }
                span.who { "Operator " strong { (op.name) } }
                form #sign-out method="post" action="/console/sign-out" {
                    input type="hidden" name="csrf" value=(token);
                    button type="submit" { "Sign out" }
                }
            }
            @if let Some(n) = notice { p.notice role="status" { (n) } }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            (body)
        },
    );
    if let Some(shown) = &op.key_shown {
        let since = key_shown_cookie(&format!("{shown}{SHOWN_SINCE}"), op.secure);
        answer.headers_mut().append(header::SET_COOKIE, since);
    }
    answer
}

/// A page that only says `message` (a failure with nothing else to show).
pub(super) fn message_page(
    op: &Operator,
    state: &AppState,
    status: StatusCode,
    message: &str,
) -> Response {
    message_page_back(op, state, status, message, (HOME, "Back to the workspaces"))
}

/// A message, and a way `back` (where, and its words) to the page it came from: a refused
/// filter of the requests or the audit log leads back there (an outside audit: it led to the
/// workspaces).
fn message_page_back(
    op: &Operator,
    state: &AppState,
    status: StatusCode,
    message: &str,
    (back, words): (&str, &str),
) -> Response {
    // Titled by what happened ("Not Found", "Bad Request"), not "Console" alone: an outside
    // audit found such pages hard to tell apart.
    let heading = status.canonical_reason().unwrap_or("Refused");
    operator_page(
        state,
        op,
        status,
        heading,
        (None, Some(message)),
        html! {
            h1 { (heading) }
            p { a href=(back) { (words) } }
        },
    )
}

pub(super) async fn failure_page(op: &Operator, state: &AppState, e: AdminError) -> Response {
    let (status, message) = refusal(e).await;
    message_page(op, state, status, &message)
}

/// `failure_page`, leading `back` to a page other than the workspaces.
async fn failure_page_back(
    op: &Operator,
    state: &AppState,
    e: AdminError,
    back: (&str, &str),
) -> Response {
    let (status, message) = refusal(e).await;
    message_page_back(op, state, status, &message, back)
}

fn optional<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(String::new, |v| v.to_string())
}

/// Each model with limits of its own, enforced or in shadow: (model, tokens a minute, tokens a
/// month), a limit in shadow said so (an outside audit: a model's limits in shadow showed as
/// "—", which reads as no limit, or the model not at all).
fn model_figures<'a>(
    effective: &'a Limits,
    shadow: Option<&'a Limits>,
) -> Vec<(&'a str, String, String)> {
    let names: std::collections::BTreeSet<&str> = effective
        .models
        .keys()
        .chain(
            shadow
                .map(|s| &s.models)
                .into_iter()
                .flatten()
                .map(|(m, _)| m),
        )
        .map(String::as_str)
        .collect();
    let figure = |enforced: Option<u64>, shadow: Option<u64>| match (enforced, shadow) {
        (Some(v), _) => v.to_string(),
        (None, Some(v)) => format!("in shadow: {v}"),
        (None, None) => "—".into(),
    };
    names
        .into_iter()
        .map(|model| {
            let e = effective.models.get(model);
            let s = shadow.and_then(|s| s.models.get(model));
            (
                model,
                figure(
                    e.and_then(|l| l.tokens_per_minute),
                    s.and_then(|l| l.tokens_per_minute),
                ),
                figure(
                    e.and_then(|l| l.tokens_per_month),
                    s.and_then(|l| l.tokens_per_month),
                ),
            )
        })
        .collect()
}

fn shown<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "—".to_string(), |v| v.to_string())
}

fn status_name(s: WorkspaceStatus) -> &'static str {
    s.as_str()
}

// ---- Workspaces ----------------------------------------------------------------------------

/// The listing's parameters, as the page's links write them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListParams {
    q: String,
    sort: WorkspaceSort,
    descending: bool,
    page: u64,
}

const SORTS: [(WorkspaceSort, &str, &str); 6] = [
    (WorkspaceSort::Name, "name", "Name"),
    (WorkspaceSort::Id, "id", "ID"),
    (WorkspaceSort::Tier, "tier", "Tier"),
    (WorkspaceSort::Status, "status", "Status"),
    (WorkspaceSort::MonthTokens, "usage", "Tokens this month"),
    (WorkspaceSort::Created, "created", "Created"),
];

impl ListParams {
    fn parse(params: &[(String, String)]) -> Result<ListParams, AdminError> {
        let sort = match param(params, "sort").filter(|s| !s.is_empty()) {
            None => WorkspaceSort::Id,
            Some(s) => SORTS
                .iter()
                .find(|(_, code, _)| *code == s)
                .map(|(sort, _, _)| *sort)
                .ok_or_else(|| {
                    AdminError::Invalid(
                        "'sort' must be name, id, tier, status, usage or created".into(),
                    )
                })?,
        };
        let descending = match param(params, "dir").filter(|s| !s.is_empty()) {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => return Err(AdminError::Invalid("'dir' must be asc or desc".into())),
        };
        let page = match param(params, "page").filter(|s| !s.is_empty()) {
            None => 1,
            Some(p) => p
                .parse()
                .map_err(|_| AdminError::Invalid("'page' must be a whole number".into()))?,
        };
        Ok(ListParams {
            q: param(params, "q").unwrap_or_default().trim().to_string(),
            sort,
            descending,
            page,
        })
    }

    fn href(&self) -> String {
        let code = SORTS
            .iter()
            .find(|(s, _, _)| *s == self.sort)
            .map_or("id", |(_, c, _)| c);
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if !self.q.is_empty() {
            q.append_pair("q", &self.q);
        }
        q.append_pair("sort", code);
        q.append_pair("dir", if self.descending { "desc" } else { "asc" });
        q.append_pair("page", &self.page.to_string());
        format!("{HOME}?{}", q.finish())
    }
}

async fn workspaces_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let params = query(raw);
    show_workspaces(&state, &op, &params, StatusCode::OK, None).await
}

/// The workspaces' page for `params` (its query), with `error` (a refused new workspace) above.
async fn show_workspaces(
    state: &AppState,
    op: &Operator,
    params: &[(String, String)],
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let list = match ListParams::parse(params) {
        Ok(list) => list,
        Err(e) => return failure_page(op, state, e).await,
    };
    let listing = WorkspaceListing {
        search: Some(list.q.clone()),
        sort: list.sort,
        descending: list.descending,
        page: Some(list.page),
        per_page: None,
    };
    let token = state.console.csrf_token(&op.session);
    let tiers = match state.admin.list_tiers().await {
        Ok(tiers) => tiers,
        Err(e) => return failure_page(op, state, e).await,
    };
    match state.admin.search_workspaces(listing).await {
        Ok(found) => operator_page(
            state,
            op,
            status,
            "Workspaces",
            (notice(params), error),
            html! {
                (workspaces_body(&list, &found))
                (new_workspace_form(&tiers, &token))
            },
        ),
        Err(e) => failure_page(op, state, e).await,
    }
}

/// The form that makes a workspace (its name and tier); its keys are made on its page.
fn new_workspace_form(tiers: &[Tier], token: &str) -> Markup {
    html! {
        h2 { "New workspace" }
        form #create-workspace method="post" action=(HOME) {
            input type="hidden" name="csrf" value=(token);
            label { "Name " input type="text" name="name" required maxlength="128"; }
            label {
                "Tier "
                select name="tier" {
                    @for t in tiers {
                        option value=(t.name) selected[t.name == "free"] { (t.name) }
                    }
                }
            }
            button type="submit" { "Create workspace" }
        }
    }
}

/// `POST /console/operator/workspaces` (`name`, `tier`): makes a workspace, as
/// `POST /admin/v1/workspaces` would, and opens its page.
async fn create_workspace(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let tier = form.get("tier");
    let tier = (!tier.is_empty()).then_some(tier.as_str());
    match state
        .admin
        .create_workspace(&op.actor(), &form.get("name"), tier)
        .await
    {
        Ok(ws) => see_other(
            &format!("{HOME}/{}?done={}", ws.id, Done::Created.code()),
            None,
        ),
        // The page again, with why (it showed the message alone: an outside audit).
        Err(e) => {
            let (status, message) = refusal(e).await;
            show_workspaces(&state, &op, &[], status, Some(&message)).await
        }
    }
}

fn workspaces_body(list: &ListParams, found: &WorkspacePage) -> Markup {
    let per_page = u64::from(admin::WORKSPACE_PAGE);
    let pages = found.total.div_ceil(per_page).max(1);
    let at = |page: u64| {
        ListParams {
            page,
            ..list.clone()
        }
        .href()
    };
    html! {
        h1 { "Workspaces" }
        form #search method="get" action=(HOME) {
            label for="q" { "Name or id" }
            input #q type="search" name="q" value=(list.q) maxlength="128";
            @let code = SORTS.iter().find(|(s, _, _)| *s == list.sort).map_or("id", |(_, c, _)| c);
            input type="hidden" name="sort" value=(code);
            input type="hidden" name="dir" value=(if list.descending { "desc" } else { "asc" });
            button type="submit" { "Search" }
        }
        p.note #matching {
            span #total { (found.total) } " workspace" @if found.total != 1 { "s" }
            @if !list.q.is_empty() { " matching “" (list.q) "”" }
            // Past the last page, the note below says so (it read "page 9 of 4").
            @if list.page <= pages { " · page " span #page { (list.page) } " of " (pages) }
        }
        table #workspaces {
            thead { tr {
                @for (sort, code, label) in SORTS {
                    @let active = list.sort == sort;
                    @let next = ListParams { sort, descending: active && !list.descending, page: 1, q: list.q.clone() };
                    th scope="col" data-sort=(code) aria-sort=[active.then_some(if list.descending { "descending" } else { "ascending" })] {
                        a href=(next.href()) { (label) @if active { @if list.descending { " ↓" } @else { " ↑" } } }
                    }
                }
            } }
            tbody {
                @for row in &found.rows {
                    @let w = &row.workspace;
                    tr data-workspace-id=(w.id) {
                        td.name { a href=(format!("{HOME}/{}", w.id)) { (w.name) } }
                        td.id { (w.id) }
                        td.tier { (w.tier) }
                        td.status { (status_name(w.status)) }
                        td.usage data-tokens=(row.tokens_this_month) { (row.tokens_this_month) }
                        td.created { (Timestamp(w.created_at).rfc3339()) }
                    }
                }
            }
        }
        @if found.rows.is_empty() {
            p.empty #no-workspaces {
                @if list.page > pages {
                    "There is no page " (list.page) ". " a href=(at(pages)) { "Go to the last page" } "."
                } @else if !list.q.is_empty() {
                    "No workspace matches “" (list.q) "”."
                } @else {
                    "No workspace yet: make one below."
                }
            }
        }
        p.pages {
            @if list.page > 1 { a rel="prev" href=(at((list.page - 1).min(pages))) { "‹ Previous" } " " }
            @if list.page < pages { a rel="next" href=(at(list.page + 1)) { "Next ›" } }
        }
    }
}

/// What a workspace's page shows, read for it.
struct WorkspaceData {
    workspace: Workspace,
    tiers: Vec<Tier>,
    effective: Limits,
    tokens_this_month: Option<u64>,
    requests_this_month: Option<u64>,
    keys: Vec<ApiKey>,
    requests: Vec<LimitRequest>,
    /// The limits in shadow (not enforced), which `effective` leaves out.
    shadow: Option<Arc<Limits>>,
    /// Unix seconds, to tell expired keys.
    now: i64,
}

async fn workspace_data(state: &AppState, id: WorkspaceId) -> Result<WorkspaceData, AdminError> {
    let workspace = state.admin.get_workspace(id).await?;
    let tiers = state.admin.list_tiers().await?;
    let keys = state.admin.list_keys(id).await?;
    let requests = state.admin.list_limit_requests(Some(id), None).await?;
    let effective = state
        .catalog
        .limits_of(id)
        .map(|l| (*l).clone())
        .unwrap_or_else(|| {
            let tier = tiers.iter().find(|t| t.name == workspace.tier);
            workspace
                .overrides
                .apply(&tier.map(|t| t.limits.clone()).unwrap_or_default())
        });
    // The month's usage as the admin API's usage view gives it (the ledger's figures exact);
    // a limiter that cannot answer leaves it out rather than the whole page.
    let usage = usage_view(state, &workspace, &effective, None, None, true).await;
    let (tokens_this_month, requests_this_month) = match usage {
        Ok(u) => (Some(u.tokens_this_month), Some(u.requests_this_month)),
        Err(e) => {
            tracing::warn!(error = %e, workspace = id, "console: no usage for the operator's page");
            (None, None)
        }
    };
    Ok(WorkspaceData {
        workspace,
        tiers,
        effective,
        tokens_this_month,
        requests_this_month,
        keys,
        requests,
        shadow: state.catalog.workspace(id).and_then(|e| e.shadow.clone()),
        now: state.clock.now_secs(),
    })
}

async fn workspace_page(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let params = query(raw);
    show_workspace(&state, &op, &id, StatusCode::OK, notice(&params), None).await
}

/// A workspace's page, with a notice or an error.
async fn show_workspace(
    state: &AppState,
    op: &Operator,
    id: &str,
    status: StatusCode,
    notice: Option<&str>,
    error: Option<&str>,
) -> Response {
    let Some(id) = id_of(id) else {
        return message_page(op, state, StatusCode::NOT_FOUND, "No such workspace.");
    };
    match workspace_data(state, id).await {
        Ok(data) => {
            let token = state.console.csrf_token(&op.session);
            operator_page(
                state,
                op,
                status,
                &data.workspace.name,
                (notice, error),
                workspace_body(&data, &token),
            )
        }
        Err(e) => failure_page(op, state, e).await,
    }
}

fn workspace_body(d: &WorkspaceData, token: &str) -> Markup {
    let w = &d.workspace;
    let base = format!("{HOME}/{}", w.id);
    let tier = d.tiers.iter().find(|t| t.name == w.tier);
    let o = &w.overrides;
    let overrides: [Option<String>; 5] = [
        o.requests_per_second.map(|v| v.to_string()),
        o.burst.map(|v| v.to_string()),
        o.tokens_per_minute.map(|v| v.to_string()),
        o.tokens_per_month.map(|v| v.to_string()),
        o.concurrent_requests.map(|v| v.to_string()),
    ];
    let tier_limits = tier.map(|t| limit_figures(&t.limits));
    let mut effective = limit_figures(&d.effective);
    // A limit in shadow is left out of what is enforced; "—" would read as no limit at all.
    if let Some(shadow) = &d.shadow {
        for (shown, figure) in effective.iter_mut().zip(limit_figures(shadow)) {
            if *shown == "—" && figure != "—" {
                *shown = format!("in shadow: {figure}");
            }
        }
    }
    // The month's figure is the workspace's own budget where that is lower: said so, beside
    // the month limit in shadow if there is one (an outside audit: the budget alone, unmarked,
    // hid that the tier's month quota was not enforced).
    if let Some(b) = w.budget.tokens_per_month {
        if d.effective.tokens_per_month == Some(b) {
            effective[3] = match d.shadow.as_ref().and_then(|s| s.tokens_per_month) {
                Some(s) => format!("in shadow: {s}; its own budget: {b}"),
                None => format!("{b} (its own budget)"),
            };
        }
    }
    html! {
        h1 { (w.name) }
        p #summary {
            "Workspace " span #workspace-id { (w.id) }
            " · tier " strong #tier { (w.tier) }
            " · " span #status { (status_name(w.status)) }
            " · created " (Timestamp(w.created_at).rfc3339())
        }
        @if tier.is_none() { p.error { "Its tier is not in the catalogue." } }
        h2 { "Limits" }
        table #limits {
            thead { tr { th { "Limit" } th { "Tier" } th { "Override" } th { "Effective" } } }
            tbody {
                @for (i, (field, label)) in OVERRIDE_FIELDS.iter().enumerate() {
                    tr data-limit=(field) {
                        th scope="row" { (label) }
                        td.tier { (tier_limits.as_ref().map_or_else(|| "—".into(), |t| t[i].clone())) }
                        td.override { (overrides[i].clone().unwrap_or_else(|| "—".into())) }
                        td.effective { (effective[i]) }
                    }
                }
            }
        }
        @let models = model_figures(&d.effective, d.shadow.as_deref());
        @if !models.is_empty() {
            table #model-limits {
                thead { tr { th { "Model" } th { "Tokens per minute" } th { "Tokens per month" } } }
                tbody {
                    @for (model, minute, month) in &models {
                        tr data-model=(model) {
                            th scope="row" { (model) }
                            td { (minute) }
                            td { (month) }
                        }
                    }
                }
            }
        }
        h2 { "This month" }
        p #usage {
            "Tokens used: " span #tokens-this-month { (shown(d.tokens_this_month)) }
            @if let Some(q) = d.effective.tokens_per_month { " of " (q) }
            " · requests: " span #requests-this-month { (shown(d.requests_this_month)) }
        }
        h2 { "Change" }
        form #change-tier method="post" action=(format!("{base}/tier")) {
            input type="hidden" name="csrf" value=(token);
            label for="tier-select" { "Tier" }
            select #tier-select name="tier" {
                @for t in &d.tiers {
                    option value=(t.name) selected[t.name == w.tier] { (t.name) }
                }
            }
            button type="submit" { "Change tier" }
        }
        form #overrides method="post" action=(format!("{base}/overrides")) {
            input type="hidden" name="csrf" value=(token);
            @for (i, (field, label)) in OVERRIDE_FIELDS.iter().enumerate() {
                label {
                    (label)
                    input type="text" inputmode="decimal" name=(field) value=(overrides[i].clone().unwrap_or_default()) size="14";
                }
                input type="hidden" name=(format!("was_{field}")) value=(overrides[i].clone().unwrap_or_default());
            }
            button type="submit" { "Save overrides" }
            span.note { "A number sets an override; an emptied field clears it (the tier's applies)." }
        }
        @match w.status {
            // Asked twice: suspending cuts off all of the workspace's traffic at once (an
            // outside audit: one click did).
            WorkspaceStatus::Active => {
                details.suspend {
                    summary { "Suspend…" }
                    form #change-status method="post" action=(format!("{base}/status")) {
                        input type="hidden" name="csrf" value=(token);
                        input type="hidden" name="status" value="suspended";
                        button type="submit" { "Suspend " (w.name) " now" }
                        span.note { "Its requests are refused (403) and its console sessions end." }
                    }
                }
            }
            WorkspaceStatus::Suspended => {
                form #change-status method="post" action=(format!("{base}/status")) {
                    input type="hidden" name="csrf" value=(token);
                    input type="hidden" name="status" value="active";
                    button type="submit" { "Reactivate" }
                }
            }
        }
        h2 { "Promotion" }
        p #promotion {
            @if w.pinned { strong #pinned { "Pinned" } ": held on its tier, never promoted automatically." }
            @else { span #pinned { "Not pinned" } ": promoted when its tier's conditions hold." }
            @if let Some(p) = &w.promoted {
                br;
                "Last promoted from " (p.from) " to " (p.to) " at " (Timestamp(p.at).rfc3339()) ": " (p.reason)
            }
        }
        @if !w.budget.is_empty() {
            p #budget {
                "Its own monthly budget: "
                (w.budget.tokens_per_month.map_or_else(|| "none for the workspace".to_string(), |n| format!("{n} tokens")))
                @for (model, n) in &w.budget.models { "; " (model) " " (n) }
            }
        }
        @if !w.attributes.is_empty() {
            table #attributes {
                thead { tr { th { "Attribute" } th { "Value" } } }
                tbody {
                    @for (name, value) in &w.attributes {
                        tr data-attribute=(name) { th scope="row" { (name) } td { (value) } }
                    }
                }
            }
        }
        form #change-pin method="post" action=(format!("{base}/pin")) {
            input type="hidden" name="csrf" value=(token);
            input type="hidden" name="pinned" value=(if w.pinned { "false" } else { "true" });
            button type="submit" { @if w.pinned { "Release" } @else { "Pin to its tier" } }
        }
        form #change-attributes method="post" action=(format!("{base}/attributes")) {
            input type="hidden" name="csrf" value=(token);
            label.models {
                "Attributes, one NAME=VALUE a line (a number, true or false), as your own systems know the workspace"
                textarea name="attributes" rows="3" cols="40" placeholder="paid_usd=50" { (attribute_lines(&w.attributes)) }
            }
            button type="submit" { "Save attributes" }
            span.note { "Replaces them all (empty: none); the workspace is promoted at once if they make it qualify." }
        }
        h2 { "Enforcement" }
        p #enforcement {
            "Its own: " strong { (w.enforcement.map_or("the tier's", |e| e.as_str())) }
            @if let Some(tier) = tier { " · the tier's: " (enforcement_text(tier)) }
        }
        form #change-enforcement method="post" action=(format!("{base}/enforcement")) {
            input type="hidden" name="csrf" value=(token);
            select name="enforcement" aria-label="Enforcement" {
                option value="tier" selected[w.enforcement.is_none()] { "the tier's" }
                @for e in [Enforcement::Enforce, Enforcement::Shadow] {
                    option value=(e.as_str()) selected[w.enforcement == Some(e)] { (e.as_str()) }
                }
            }
            " limits in shadow (besides the tier's): "
            @for l in ShadowLimit::ALL {
                label.check {
                    input type="checkbox" name="shadow" value=(l.as_str()) checked[w.shadow.as_ref().is_some_and(|s| s.contains(&l))];
                    (l.as_str())
                }
            }
            button type="submit" { "Save enforcement" }
            span.note { "A limit in shadow denies nothing: it marks, counts and logs what it would have denied. A limit named here is in shadow whatever the enforcement." }
        }
        h2 { "API keys" }
        table #keys {
            thead { tr { th { "Prefix" } th { "Name" } th { "Created" } th { "Last used" } th { "Expires" } th { "Limits of its own" } th { "Status" } th {} } }
            tbody {
                @for k in &d.keys {
                    tr data-key-id=(k.id) {
                        td { code { (k.prefix) "…" } }
                        td { (k.name.as_deref().unwrap_or("")) }
                        td { (Timestamp(k.created_at).rfc3339()) }
                        td { (k.last_used_at.map_or_else(|| "never".into(), |t| Timestamp(t).rfc3339())) }
                        td { (k.expires_at.map_or_else(|| "never".into(), |t| Timestamp(t).rfc3339())) }
                        td.key-limits {
                            (key_limits_text(&k.limits))
                            @if k.revoked_at.is_none() { (key_limits_form(k, token)) }
                        }
                        td.status { (super::console::key_status(k, d.now)) }
                        td {
                            @if k.revoked_at.is_none() {
                                // Asked twice: the first click only opens the button that
                                // revokes (no script on these pages).
                                details.revoke {
                                    summary { "Revoke…" }
                                    form.revoke method="post" action=(format!("/console/operator/keys/{}/revoke", k.id)) {
                                        input type="hidden" name="csrf" value=(token);
                                        button type="submit" { "Revoke " (k.prefix) " now: it cannot be undone" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        form #create-key method="post" action=(format!("{base}/keys")) {
            input type="hidden" name="csrf" value=(token);
            label { "Name " input type="text" name="name" maxlength="128"; }
            label { "Expires (RFC 3339, optional) " input type="text" name="expires_at" placeholder="2027-01-01T00:00:00Z"; }
            button type="submit" { "Create key" }
        }
        h2 { "Increase requests" }
        @if d.requests.is_empty() {
            p.note { "None." }
        } @else {
            table #workspace-requests {
                thead { tr { th { "#" } th { "Asked" } th { "Use case" } th { "Limits asked" } th { "Status" } th { "Answer" } } }
                tbody {
                    @for r in d.requests.iter().rev() {
                        tr data-request-id=(r.id) {
                            td { (r.id) }
                            td { (Timestamp(r.created_at).rfc3339()) }
                            td.use-case {
                                (r.use_case)
                                @if let Some(v) = &r.expected_volume { br; span.note.expected-volume { "Expected volume: " (v) } }
                            }
                            td { (overrides_text(&r.requested_limits)) }
                            td.status { (r.status.as_str()) }
                            td { (answer_text(r)) }
                        }
                    }
                }
            }
            p { a href=(format!("{REQUESTS}?status=all&workspace={}", w.id)) { "Answer them on the requests page" } }
        }
    }
}

/// A key's limits form (`form.key-limits`): its four limits, filled with what it has; an empty
/// field is no limit of its own, all empty clears them.
fn key_limits_form(k: &ApiKey, token: &str) -> Markup {
    let l = &k.limits;
    let value = |v: Option<String>| v.unwrap_or_default();
    html! {
        form.key-limits method="post" action=(format!("/console/operator/keys/{}/limits", k.id)) {
            input type="hidden" name="csrf" value=(token);
            @for (name, label, v) in [
                ("requests_per_second", "Requests/s", value(l.requests_per_second.map(|v| v.to_string()))),
                ("burst", "Burst", value(l.burst.map(|v| v.to_string()))),
                ("tokens_per_minute", "Tokens/min", value(l.tokens_per_minute.map(|v| v.to_string()))),
                ("tokens_per_month", "Tokens/month", value(l.tokens_per_month.map(|v| v.to_string()))),
            ] {
                label { (label) " " input type="text" inputmode="decimal" size="8" name=(name) value=(v); }
            }
            button type="submit" { "Set limits" }
        }
    }
}

/// The five override-able limits of `l`, as the limits table shows them.
fn limit_figures(l: &Limits) -> [String; 5] {
    [
        shown(l.requests_per_second),
        l.requests_per_second
            .map_or_else(|| shown(l.burst), |_| l.effective_burst().to_string()),
        shown(l.tokens_per_minute),
        shown(l.tokens_per_month),
        shown(l.concurrent_requests),
    ]
}

fn overrides_text(o: &Overrides) -> String {
    let Overrides {
        requests_per_second,
        burst,
        tokens_per_minute,
        tokens_per_month,
        concurrent_requests,
    } = o;
    let mut parts = Vec::new();
    let mut add = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{name} {v}"));
        }
    };
    add(
        "requests_per_second",
        requests_per_second.map(|v| v.to_string()),
    );
    add("burst", burst.map(|v| v.to_string()));
    add(
        "tokens_per_minute",
        tokens_per_minute.map(|v| v.to_string()),
    );
    add("tokens_per_month", tokens_per_month.map(|v| v.to_string()));
    add(
        "concurrent_requests",
        concurrent_requests.map(|v| v.to_string()),
    );
    parts.join(", ")
}

/// The limits in force now of each figure `asked` names.
fn in_force_text(asked: &Overrides, now: &Limits) -> String {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "unlimited".into());
    let mut parts = Vec::new();
    if asked.requests_per_second.is_some() {
        let v = now.requests_per_second.map(|v| v.to_string());
        parts.push(format!("requests_per_second {}", or_none(v)));
    }
    if asked.burst.is_some() {
        let v = now
            .requests_per_second
            .map(|_| now.effective_burst().to_string());
        parts.push(format!("burst {}", or_none(v)));
    }
    if asked.tokens_per_minute.is_some() {
        let v = now.tokens_per_minute.map(|v| v.to_string());
        parts.push(format!("tokens_per_minute {}", or_none(v)));
    }
    if asked.tokens_per_month.is_some() {
        let v = now.tokens_per_month.map(|v| v.to_string());
        parts.push(format!("tokens_per_month {}", or_none(v)));
    }
    if asked.concurrent_requests.is_some() {
        let v = now.concurrent_requests.map(|v| v.to_string());
        parts.push(format!("concurrent_requests {}", or_none(v)));
    }
    parts.join(", ")
}

fn answer_text(r: &LimitRequest) -> String {
    match r.status {
        LimitRequestStatus::Pending => String::new(),
        LimitRequestStatus::Approved => {
            let granted = r.granted_limits.as_ref().map(overrides_text);
            match &r.reason {
                Some(note) => format!("granted {}: {note}", granted.unwrap_or_default()),
                None => format!("granted {}", granted.unwrap_or_default()),
            }
        }
        LimitRequestStatus::Denied => r.reason.clone().unwrap_or_default(),
        LimitRequestStatus::Withdrawn => "withdrawn by the workspace".into(),
    }
}

/// After a change to workspace `id`: back to its page with `done`, or the page again with why
/// it was refused.
async fn after_change(
    state: &AppState,
    op: &Operator,
    id: &str,
    outcome: Result<Done, AdminError>,
) -> Response {
    match outcome {
        Ok(done) => see_other(&format!("{HOME}/{id}?done={}", done.code()), None),
        Err(e) => {
            let (status, message) = refusal(e).await;
            show_workspace(state, op, id, status, None, Some(&message)).await
        }
    }
}

fn workspace_id(id: &str) -> Result<WorkspaceId, AdminError> {
    id_of(id).ok_or_else(|| AdminError::NotFound("No such workspace.".into()))
}

async fn change_tier(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let update = WorkspaceUpdate {
            tier: Some(form.get("tier")),
            ..WorkspaceUpdate::default()
        };
        let ws = workspace_id(&id)?;
        state
            .admin
            .update_workspace(&op.actor(), ws, update)
            .await?;
        Ok(Done::Tier)
    }
    .await;
    after_change(&state, &op, &id, outcome).await
}

async fn change_overrides(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let ws = workspace_id(&id)?;
        // Only the fields edited since the page was loaded: a patch, as the admin API's.
        let mut edited = Vec::new();
        for (field, _) in OVERRIDE_FIELDS {
            let now = form.get(field);
            if now != form.get(&format!("was_{field}")) {
                edited.push((field, number(field, &now)?));
            }
        }
        if edited.is_empty() {
            return Ok(Done::Unchanged);
        }
        let patch = admin::overrides_patch(edited.iter().map(|(f, v)| (*f, v)))?;
        let update = WorkspaceUpdate {
            overrides: patch,
            ..WorkspaceUpdate::default()
        };
        state
            .admin
            .update_workspace(&op.actor(), ws, update)
            .await?;
        Ok(Done::Overrides)
    }
    .await;
    after_change(&state, &op, &id, outcome).await
}

async fn change_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let ws = workspace_id(&id)?;
        let status = admin::workspace_status(&form.get("status"))?;
        let update = WorkspaceUpdate {
            status: Some(status),
            ..WorkspaceUpdate::default()
        };
        state
            .admin
            .update_workspace(&op.actor(), ws, update)
            .await?;
        Ok(match status {
            WorkspaceStatus::Active => Done::Reactivated,
            WorkspaceStatus::Suspended => Done::Suspended,
        })
    }
    .await;
    after_change(&state, &op, &id, outcome).await
}

/// `POST …/{id}/pin` (`pinned`: `true` or `false`): holds the workspace on its tier, or
/// releases it to automatic promotion.
async fn change_pin(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let ws = workspace_id(&id)?;
        let pinned = match form.get("pinned").as_str() {
            "true" => true,
            "false" => false,
            _ => return Err(AdminError::Invalid("'pinned' must be true or false".into())),
        };
        let update = WorkspaceUpdate {
            pinned: Some(pinned),
            ..WorkspaceUpdate::default()
        };
        state
            .admin
            .update_workspace(&op.actor(), ws, update)
            .await?;
        Ok(if pinned { Done::Pinned } else { Done::Unpinned })
    }
    .await;
    after_change(&state, &op, &id, outcome).await
}

/// `POST …/{id}/attributes`: replaces the workspace's attributes, as
/// `PUT /admin/v1/workspaces/{id}/attributes` would (and promotes it if they make it qualify).
async fn change_attributes(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let ws = workspace_id(&id)?;
        let attributes = AttributeValue::lines(&form.get("attributes"))
            .map_err(|m| AdminError::Invalid(format!("attributes, {m}")))?;
        let before = state.admin.get_workspace(ws).await?.tier;
        let after = state
            .admin
            .set_attributes(&op.actor(), ws, attributes)
            .await?;
        Ok(if after.tier == before {
            Done::Attributes
        } else {
            Done::AttributesPromoted
        })
    }
    .await;
    after_change(&state, &op, &id, outcome).await
}

/// `POST …/{id}/enforcement`: the workspace's own enforcement (`tier`: the tier's) and its own
/// limits in shadow (none ticked: the tier's alone), as `PATCH /admin/v1/workspaces/{id}` sets
/// `enforcement` and `shadow`.
async fn change_enforcement(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let ws = workspace_id(&id)?;
        let enforcement = match form.get("enforcement").as_str() {
            "tier" => None,
            other => Some(Enforcement::parse(other).map_err(AdminError::Invalid)?),
        };
        let shadow = shadow_of(&form)?;
        let update = WorkspaceUpdate {
            enforcement: Some(enforcement),
            shadow: Some((!shadow.is_empty()).then_some(shadow)),
            ..WorkspaceUpdate::default()
        };
        state
            .admin
            .update_workspace(&op.actor(), ws, update)
            .await?;
        Ok(Done::Enforcement)
    }
    .await;
    after_change(&state, &op, &id, outcome).await
}

async fn create_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let secure = over_https(request.headers());
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let made = async {
        let ws = workspace_id(&id)?;
        let nonempty = |v: String| (!v.is_empty()).then_some(v);
        let input = NewKeyInput {
            name: nonempty(form.get("name")),
            expires_at: nonempty(form.get("expires_at")),
        };
        state.admin.create_key(&op.actor(), ws, input).await
    }
    .await;
    match made {
        // Post, redirect, get: reloading the page that shows the secret must not make another
        // key. The secret goes to that page in a cookie for its path alone, never in a URL.
        Ok((key, secret)) => {
            let path = created_path(key.id);
            let cookie = set_cookie(NEW_KEY_COOKIE, &secret, 300, &path, "Strict", secure);
            see_other(&path, Some(cookie))
        }
        Err(e) => after_change(&state, &op, &id, Err(e)).await,
    }
}

/// The cookie that carries a new key's secret to the page that shows it.
const NEW_KEY_COOKIE: &str = "tiergate_new_key";

fn created_path(key: KeyId) -> String {
    format!("/console/operator/keys/{key}/created")
}

/// `GET /console/operator/keys/{id}/created`: the new key's secret, once (see `create_key`).
async fn created_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let Some(id) = id_of(&id) else {
        return message_page(&op, &state, StatusCode::NOT_FOUND, "No such key.");
    };
    // Shown only if the cookie holds this key's own secret.
    let shown = named_cookie(&headers, NEW_KEY_COOKIE).and_then(|secret| {
        let (key, workspace, _) = state.catalog.owner_of_key(secret)?;
        (key == id).then_some((secret, workspace))
    });
    let Some((secret, workspace)) = shown else {
        return message_page(
            &op,
            &state,
            StatusCode::GONE,
            "This key's secret was shown once, and only its hash is kept. If it was not copied, revoke the key and make another.",
        );
    };
    let keys = state.admin.list_keys(workspace).await.unwrap_or_default();
    let key = keys.iter().find(|k| k.id == id);
    let mut page = operator_page(
        &state,
        &op,
        StatusCode::OK,
        "New key",
        (Some("Key created."), None),
        html! {
            h1 { "New key" }
            p { "Copy the key now: it is shown this once, and only its hash is kept." }
            p { code #new-key { (secret) } }
            @if let Some(key) = key {
                p.note { "Prefix " code { (key.prefix) "…" } @if let Some(n) = &key.name { " · name " (n) } }
            }
            p { a href=(format!("{HOME}/{workspace}")) { "Back to the workspace" } }
        },
    );
    let path = created_path(id);
    let clear = set_cookie(NEW_KEY_COOKIE, "", 0, &path, "Strict", over_https(&headers));
    page.headers_mut().append(header::SET_COOKIE, clear);
    let shown = key_shown_cookie(&id.to_string(), over_https(&headers));
    page.headers_mut().append(header::SET_COOKIE, shown);
    page
}

/// `POST /console/operator/keys/{id}/limits`: replaces a key's own limits as
/// `PATCH /admin/v1/keys/{id}` would (an empty field: none; all empty: cleared).
async fn set_key_limits(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let set = async {
        let key = id_of(&id).ok_or_else(|| AdminError::NotFound("No such key.".into()))?;
        let mut fields = serde_json::Map::new();
        for name in [
            "requests_per_second",
            "burst",
            "tokens_per_minute",
            "tokens_per_month",
        ] {
            fields.insert(name.to_string(), number(name, &form.get(name))?);
        }
        let limits = admin::key_limits(&Value::Object(fields))?;
        state.admin.set_key_limits(&op.actor(), key, limits).await
    }
    .await;
    match set {
        Ok(key) => see_other(
            &format!(
                "{HOME}/{}?done={}",
                key.workspace_id,
                Done::KeyLimits.code()
            ),
            None,
        ),
        // Its workspace's page again, where the form is, with why (it showed the message
        // alone: an outside audit).
        Err(e) => {
            let key = id_of(&id).map(|k| state.admin.get_key(k));
            match key {
                Some(key) => match key.await {
                    Ok(key) => {
                        after_change(&state, &op, &key.workspace_id.to_string(), Err(e)).await
                    }
                    Err(_) => failure_page(&op, &state, e).await,
                },
                None => failure_page(&op, &state, e).await,
            }
        }
    }
}

async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, _) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let revoked = match id_of(&id) {
        Some(key) => state.admin.revoke_key(&op.actor(), key).await,
        None => Err(AdminError::NotFound("No such key.".into())),
    };
    match revoked {
        Ok(key) => see_other(
            &format!("{HOME}/{}?done={}", key.workspace_id, Done::Revoked.code()),
            None,
        ),
        Err(e) => failure_page(&op, &state, e).await,
    }
}

// ---- Tiers ---------------------------------------------------------------------------------

async fn tiers_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let params = query(raw);
    show_tiers(&state, &op, StatusCode::OK, notice(&params), None, None).await
}

async fn show_tiers(
    state: &AppState,
    op: &Operator,
    status: StatusCode,
    notice: Option<&str>,
    error: Option<&str>,
    typed: Option<TypedTier<'_>>,
) -> Response {
    match state.admin.list_tiers().await {
        Ok(tiers) => {
            let token = state.console.csrf_token(&op.session);
            operator_page(
                state,
                op,
                status,
                "Tiers",
                (notice, error),
                tiers_body(&tiers, &token, typed),
            )
        }
        Err(e) => failure_page(op, state, e).await,
    }
}

/// A tier's promotion, as a line: `→ tier-2 when min_days ≥ 7, paid_usd ≥ 50`.
fn promotion_text(p: &crate::model::Promotion) -> String {
    let mut conditions = Vec::new();
    if let Some(d) = p.min_days {
        conditions.push(format!("min_days ≥ {d}"));
    }
    if let Some(t) = p.min_tokens_30d {
        conditions.push(format!("min_tokens_30d ≥ {t}"));
    }
    for (name, value) in &p.min_attributes {
        conditions.push(match value {
            crate::model::AttributeValue::Bool(b) => format!("{name} = {b}"),
            crate::model::AttributeValue::Number(n) => format!("{name} ≥ {n}"),
        });
    }
    if conditions.is_empty() {
        format!("→ {} at once", p.to)
    } else {
        format!("→ {} when {}", p.to, conditions.join(", "))
    }
}

/// A tier's enforcement, with the limits it keeps in shadow.
fn enforcement_text(t: &Tier) -> String {
    match (t.enforcement, t.shadow.as_slice()) {
        (crate::model::Enforcement::Shadow, _) => "shadow (every limit)".to_string(),
        (_, []) => "enforce".to_string(),
        (_, shadow) => {
            let names: Vec<&str> = shadow.iter().map(|s| s.as_str()).collect();
            format!("enforce; in shadow: {}", names.join(", "))
        }
    }
}

/// A model line's model name and what follows it: the first word, or a JSON string (`"a b"`),
/// which a name with a space, a quote first, or none is written as (`model_lines`).
fn model_word(line: &str) -> Option<(String, &str)> {
    if line.starts_with('"') {
        let mut strings = serde_json::Deserializer::from_str(line).into_iter::<String>();
        let model = strings.next()?.ok()?;
        let rest = &line[strings.byte_offset()..];
        // The name ends where a space does.
        return (rest.is_empty() || rest.starts_with(char::is_whitespace)).then_some((model, rest));
    }
    let end = line.find(char::is_whitespace).unwrap_or(line.len());
    Some((line[..end].to_string(), &line[end..]))
}

/// A tier's per-model limits as the form's lines; a model name the first word of a line cannot
/// be (with a space, a quote first, or empty) as a JSON string, which the form reads back (an
/// outside audit: a tier whose model name had a space, set through the API, could no longer
/// be saved from the console).
fn model_lines(limits: &Limits) -> String {
    let mut text = String::new();
    for (model, l) in &limits.models {
        let plain =
            !model.is_empty() && !model.starts_with('"') && !model.contains(char::is_whitespace);
        match plain {
            true => text.push_str(model),
            false => text.push_str(&serde_json::Value::String(model.clone()).to_string()),
        }
        if let Some(v) = l.tokens_per_minute {
            text.push_str(&format!(" tokens_per_minute={v}"));
        }
        if let Some(v) = l.tokens_per_month {
            text.push_str(&format!(" tokens_per_month={v}"));
        }
        text.push('\n');
    }
    text
}

/// A promotion's attribute conditions as the form's lines.
fn attribute_lines(attributes: &Attributes) -> String {
    attributes
        .iter()
        .map(|(name, value)| format!("{name}={value}\n"))
        .collect()
}

/// The fields of a tier's form, filled with `tier` (`None`: a new tier), or with what was typed
/// into it (`typed`: the form as sent, when it was refused: an outside audit saw what was typed
/// replaced by the stored figures); `tiers` are the catalogue's names, the tiers it may promote
/// to (itself left out).
fn tier_fields(tier: Option<&Tier>, tiers: &[Tier], token: &str, typed: Option<&Form>) -> Markup {
    let empty = Limits::default();
    let limits = tier.map_or(&empty, |t| &t.limits);
    let promotion = tier.and_then(|t| t.promotion.as_ref());
    let stored = |name: &str| -> String {
        match name {
            "rank" => optional(tier.and_then(|t| t.rank)),
            "requests_per_second" => optional(limits.requests_per_second),
            "burst" => optional(limits.burst),
            "tokens_per_minute" => optional(limits.tokens_per_minute),
            "tokens_per_month" => optional(limits.tokens_per_month),
            "concurrent_requests" => optional(limits.concurrent_requests),
            "models" => model_lines(limits),
            "promotion_to" => promotion.map(|p| p.to.clone()).unwrap_or_default(),
            "min_days" => optional(promotion.and_then(|p| p.min_days)),
            "min_tokens_30d" => optional(promotion.and_then(|p| p.min_tokens_30d)),
            "min_attributes" => promotion
                .map(|p| attribute_lines(&p.min_attributes))
                .unwrap_or_default(),
            "enforcement" => tier
                .map_or(Enforcement::Enforce, |t| t.enforcement)
                .as_str()
                .to_string(),
            _ => String::new(),
        }
    };
    let value = |name: &str| typed.map_or_else(|| stored(name), |form| form.get(name));
    let to = value("promotion_to");
    let enforcement = value("enforcement");
    let shadow: Vec<&str> = match typed {
        Some(form) => form.all("shadow").collect(),
        None => tier.map_or_else(Vec::new, |t| t.shadow.iter().map(|l| l.as_str()).collect()),
    };
    html! {
        input type="hidden" name="csrf" value=(token);
        label { "Rank" input type="text" inputmode="numeric" name="rank" value=(value("rank")) size="6"; }
        @for (field, label) in OVERRIDE_FIELDS.iter() {
            label { (label) input type="text" inputmode="decimal" name=(field) value=(value(field)) size="14"; }
        }
        label.models { "Per model" textarea name="models" rows="2" cols="60" placeholder="mistral-large-latest tokens_per_minute=100000" { (value("models")) } }
        fieldset.promotion {
            legend { "Automatic promotion (all conditions must hold)" }
            label {
                "To "
                select name="promotion_to" {
                    option value="" selected[to.is_empty()] { "none" }
                    @for t in tiers.iter().filter(|t| Some(t.name.as_str()) != tier.map(|t| t.name.as_str())) {
                        option value=(t.name) selected[to == t.name] { (t.name) }
                    }
                }
            }
            label { "Days since created ≥ " input type="text" inputmode="numeric" name="min_days" value=(value("min_days")) size="6"; }
            label { "Tokens over 30 days ≥ " input type="text" inputmode="numeric" name="min_tokens_30d" value=(value("min_tokens_30d")) size="14"; }
            label.models { "Attributes (NAME=N: at least N; NAME=true)" textarea name="min_attributes" rows="2" cols="40" placeholder="paid_usd=50" { (value("min_attributes")) } }
        }
        fieldset.enforcement {
            legend { "Enforcement" }
            select name="enforcement" aria-label="Enforcement" {
                @for e in [Enforcement::Enforce, Enforcement::Shadow] {
                    option value=(e.as_str()) selected[e.as_str() == enforcement] { (e.as_str()) }
                }
            }
            " limits in shadow: "
            @for l in ShadowLimit::ALL {
                label.check { input type="checkbox" name="shadow" value=(l.as_str()) checked[shadow.contains(&l.as_str())]; (l.as_str()) }
            }
        }
    }
}

/// Which tier's form was refused (`None`: the new tier's), with the form as sent.
type TypedTier<'a> = (Option<&'a str>, &'a Form);

fn tiers_body(tiers: &[Tier], token: &str, typed: Option<TypedTier>) -> Markup {
    let typed_for = |name: Option<&str>| typed.filter(|(t, _)| *t == name).map(|(_, f)| f);
    html! {
        h1 { "Tiers" }
        table #tiers {
            thead { tr { th { "Tier" } th { "Rank" } @for (_, label) in OVERRIDE_FIELDS { th { (label) } } th { "Per model" } th { "Promotion" } th { "Enforcement" } } }
            tbody {
                @for t in tiers {
                    @let figures = limit_figures(&t.limits);
                    tr data-tier=(t.name) {
                        th scope="row" { (t.name) }
                        td data-rank { (optional(t.rank)) }
                        @for (i, (field, _)) in OVERRIDE_FIELDS.iter().enumerate() {
                            td data-limit=(field) { (figures[i]) }
                        }
                        td { (model_lines(&t.limits)) }
                        td.promotion { (t.promotion.as_ref().map_or_else(|| "—".to_string(), promotion_text)) }
                        td.enforcement { (enforcement_text(t)) }
                    }
                }
            }
        }
        p.note { "An empty field is no limit. A change holds from the next request of every workspace on the tier. A promotion moves a workspace up to a tier of a higher rank once all its conditions hold (checked every promotion_interval_secs and at each attribute change); a limit in shadow denies nothing but marks, counts and logs what it would have denied." }
        @for t in tiers {
            section.tier data-tier=(t.name) {
                h2 { (t.name) }
                form.tier-edit method="post" action=(format!("{TIERS}/{}", t.name)) {
                    (tier_fields(Some(t), tiers, token, typed_for(Some(&t.name))))
                    button type="submit" { "Save " (t.name) }
                }
            }
        }
        section #new-tier {
            h2 { "New tier" }
            form #create-tier method="post" action=(TIERS) {
                label { "Name " input type="text" name="name" value=(typed_for(None).map(|f| f.get("name")).unwrap_or_default()) required maxlength="64" pattern="[A-Za-z0-9._\\-]+"; }
                (tier_fields(None, tiers, token, typed_for(None)))
                button type="submit" { "Create tier" }
            }
        }
    }
}

async fn create_tier(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let (promotion, enforcement, shadow) = growth_of(&form)?.unwrap_or_default();
        let spec = TierSpec {
            rank: rank_of(&form)?,
            limits: limits_of(&form)?,
            promotion,
            enforcement,
            shadow,
        };
        state
            .admin
            .create_tier(&op.actor(), &form.get("name"), spec)
            .await
    }
    .await;
    let typed = (None, &form);
    after_tier(&state, &op, outcome.map(|_| Done::TierCreated), typed).await
}

async fn edit_tier(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let (rank, limits, growth) = (rank_of(&form)?, limits_of(&form)?, growth_of(&form)?);
        let edit = |current: &Tier| {
            let (promotion, enforcement, shadow) = growth.unwrap_or_else(|| {
                (
                    current.promotion.clone(),
                    current.enforcement,
                    current.shadow.clone(),
                )
            });
            TierSpec {
                rank,
                limits,
                promotion,
                enforcement,
                shadow,
            }
        };
        state.admin.update_tier(&op.actor(), &name, edit).await
    }
    .await;
    let typed = (Some(name.as_str()), &form);
    after_tier(&state, &op, outcome.map(|_| Done::TierSaved), typed).await
}

/// A tier's form done: back to the tiers, or, refused, the page again with the message and the
/// form as it was sent (`typed`).
async fn after_tier(
    state: &AppState,
    op: &Operator,
    outcome: Result<Done, AdminError>,
    typed: TypedTier<'_>,
) -> Response {
    match outcome {
        Ok(done) => see_other(&format!("{TIERS}?done={}", done.code()), None),
        Err(e) => {
            let (status, message) = refusal(e).await;
            show_tiers(state, op, status, None, Some(&message), Some(typed)).await
        }
    }
}

// ---- Increase requests ---------------------------------------------------------------------

/// Which requests the page lists: a status, or all (`None`); and one workspace's, or all; and
/// which page of them, `REQUESTS_PAGE` a page.
struct RequestFilter {
    status: Option<LimitRequestStatus>,
    workspace: Option<WorkspaceId>,
    page: u64,
}

/// Requests a page of the operator's list shows. All of them on one page made a page 250,000 px
/// tall with 150 requests (an outside audit).
const REQUESTS_PAGE: usize = 50;

impl RequestFilter {
    fn parse(params: &[(String, String)]) -> Result<RequestFilter, AdminError> {
        let status = match param(params, "status").filter(|s| !s.is_empty()) {
            None => Some(LimitRequestStatus::Pending),
            Some("all") => None,
            Some(s) => Some(LimitRequestStatus::parse(s).ok_or_else(|| {
                AdminError::Invalid(
                    "'status' must be pending, approved, denied, withdrawn or all".into(),
                )
            })?),
        };
        let workspace = match param(params, "workspace").filter(|s| !s.is_empty()) {
            None => None,
            Some(w) => Some(
                id_of(w).ok_or_else(|| AdminError::Invalid("'workspace' must be an id".into()))?,
            ),
        };
        let page = match param(params, "page").filter(|s| !s.is_empty()) {
            None => 1,
            Some(p) => p.parse().ok().filter(|&p| p >= 1).ok_or_else(|| {
                AdminError::Invalid("'page' must be a whole number above 0".into())
            })?,
        };
        Ok(RequestFilter {
            status,
            workspace,
            page,
        })
    }

    /// The list with `status`, from its first page.
    fn href(&self, status: Option<LimitRequestStatus>) -> String {
        self.href_at(status, 1)
    }

    fn href_at(&self, status: Option<LimitRequestStatus>, page: u64) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("status", status.map_or("all", |s| s.as_str()));
        if let Some(w) = self.workspace {
            q.append_pair("workspace", &w.to_string());
        }
        if page != 1 {
            q.append_pair("page", &page.to_string());
        }
        format!("{REQUESTS}?{}", q.finish())
    }
}

async fn requests_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let params = query(raw);
    match RequestFilter::parse(&params) {
        Ok(filter) => {
            let shown = (notice(&params), None);
            show_requests(&state, &op, &filter, StatusCode::OK, shown, None).await
        }
        Err(e) => failure_page_back(&op, &state, e, (REQUESTS, "Back to the requests")).await,
    }
}

/// A refused answer's form, shown again as it was sent (`Typed`).
async fn show_requests(
    state: &AppState,
    op: &Operator,
    filter: &RequestFilter,
    status: StatusCode,
    (notice, error): (Option<&str>, Option<&str>),
    typed: Option<Typed<'_>>,
) -> Response {
    let mut requests = match state
        .admin
        .list_limit_requests(filter.workspace, filter.status)
        .await
    {
        Ok(r) => r,
        Err(e) => return failure_page(op, state, e).await,
    };
    // Pending first, oldest first (the queue); the answered ones newest first.
    requests.sort_by_key(|r| match r.status {
        LimitRequestStatus::Pending => (0, r.id),
        _ => (1, -r.id),
    });
    // A page of them: the one asked for, or, for a refused answer, the one with its request.
    let total = requests.len();
    let page = typed
        .and_then(|t| requests.iter().position(|r| r.id == t.request))
        .map_or(filter.page, |at| (at / REQUESTS_PAGE) as u64 + 1);
    let start = usize::try_from(page - 1)
        .ok()
        .and_then(|p| p.checked_mul(REQUESTS_PAGE))
        .unwrap_or(usize::MAX)
        .min(total);
    requests.drain(..start);
    requests.truncate(REQUESTS_PAGE);
    let paging = Paging { page, total };
    // Beside each pending request, the limits it would raise as they are now: they may have
    // changed since it was filed (a tier moved, another request approved).
    let mut in_force = HashMap::new();
    if requests
        .iter()
        .any(|r| r.status == LimitRequestStatus::Pending)
    {
        let tiers = match state.admin.list_tiers().await {
            Ok(t) => t,
            Err(e) => return failure_page(op, state, e).await,
        };
        for r in requests
            .iter()
            .filter(|r| r.status == LimitRequestStatus::Pending)
        {
            let Some(entry) = state.catalog.workspace(r.workspace_id) else {
                continue;
            };
            let ws = &entry.workspace;
            let tier = tiers
                .iter()
                .find(|t| t.name == ws.tier)
                .map(|t| t.limits.clone())
                .unwrap_or_default();
            in_force.insert(r.workspace_id, ws.overrides.apply(&tier).within_bounds());
        }
    }
    let token = state.console.csrf_token(&op.session);
    let body = requests_body(state, filter, paging, (&requests, &in_force), &token, typed);
    operator_page(
        state,
        op,
        status,
        "Increase requests",
        (notice, error),
        body,
    )
}

/// The answer to one request that was refused, as its form was sent: the approve form's figures
/// and note, or the deny form's reason. The page came back with the asked figures and no note,
/// and a second click granted what was asked (an outside audit).
#[derive(Clone, Copy)]
struct Typed<'a> {
    request: crate::model::LimitRequestId,
    form: &'a Form,
    approving: bool,
}

/// Which page of the requests is shown, of how many requests in all.
#[derive(Clone, Copy)]
struct Paging {
    page: u64,
    total: usize,
}

fn requests_body(
    state: &AppState,
    filter: &RequestFilter,
    paging: Paging,
    (requests, in_force): (&[LimitRequest], &HashMap<WorkspaceId, Limits>),
    token: &str,
    typed: Option<Typed<'_>>,
) -> Markup {
    let choices = [
        (Some(LimitRequestStatus::Pending), "Pending"),
        (Some(LimitRequestStatus::Approved), "Approved"),
        (Some(LimitRequestStatus::Denied), "Denied"),
        (Some(LimitRequestStatus::Withdrawn), "Withdrawn"),
        (None, "All"),
    ];
    html! {
        h1 { "Increase requests" }
        p #filters {
            @for (status, label) in choices {
                @if filter.status == status { strong { (label) } } @else { a href=(filter.href(status)) { (label) } }
                " "
            }
            @if let Some(w) = filter.workspace { " · workspace " (w) " · " a href=(RequestFilter { workspace: None, status: filter.status, page: 1 }.href(filter.status)) { "every workspace" } }
        }
        @let pages = (paging.total.div_ceil(REQUESTS_PAGE).max(1)) as u64;
        @if paging.total > REQUESTS_PAGE {
            p.note #matching { span #total { (paging.total) } " requests · page " span #page { (paging.page) } " of " (pages) }
        }
        @if requests.is_empty() {
            @if paging.page > pages {
                p.note #no-requests { "There is no page " (paging.page) ". " a href=(filter.href_at(filter.status, pages)) { "Go to the last page" } "." }
            } @else {
                p.note #no-requests { "No request here." }
            }
        } @else {
            table #requests {
                thead { tr { th { "#" } th { "Workspace" } th { "Asked" } th { "Use case" } th { "Limits asked" } th { "Status" } th { "Answer" } } }
                tbody {
                    @for r in requests {
                        @let name = state.catalog.workspace(r.workspace_id).map(|e| e.workspace.name.clone());
                        tr data-request-id=(r.id) data-status=(r.status.as_str()) {
                            td { (r.id) }
                            td.workspace {
                                a href=(format!("{HOME}/{}", r.workspace_id)) { (name.unwrap_or_else(|| format!("workspace {}", r.workspace_id))) }
                                " (" (r.workspace_id) ")"
                            }
                            td { (Timestamp(r.created_at).rfc3339()) }
                            td.use-case {
                                // A long use case (up to 4 KiB) opens on a click, so that one
                                // does not make its row thousands of pixels tall.
                                @match preview(&r.use_case) {
                                    Some(start) => details { summary { (start) "…" } (r.use_case) },
                                    None => (r.use_case),
                                }
                                @if let Some(v) = &r.expected_volume { br; span.note.expected-volume { "Expected volume: " (v) } }
                            }
                            td.asked {
                                (overrides_text(&r.requested_limits))
                                @if let Some(now) = in_force.get(&r.workspace_id).filter(|_| r.status == LimitRequestStatus::Pending) {
                                    br; span.note.in-force { "In force now: " (in_force_text(&r.requested_limits, now)) }
                                }
                            }
                            td.status { (r.status.as_str()) }
                            td.answer {
                                @if r.status == LimitRequestStatus::Pending {
                                    (answer_forms(r, token, typed.filter(|t| t.request == r.id)))
                                } @else {
                                    (answer_text(r))
                                }
                            }
                        }
                    }
                }
            }
            @if pages > 1 {
                p.pages {
                    @if paging.page > 1 { a rel="prev" href=(filter.href_at(filter.status, (paging.page - 1).min(pages))) { "‹ Previous" } " " }
                    @if paging.page < pages { a rel="next" href=(filter.href_at(filter.status, paging.page + 1)) { "Next ›" } }
                }
            }
        }
    }
}

/// The start of a use case longer than `PREVIEW_CHARS` characters, cut at a word where one ends
/// near it; `None` for a shorter one, shown whole.
fn preview(text: &str) -> Option<&str> {
    const PREVIEW_CHARS: usize = 280;
    let (cut, _) = text.char_indices().nth(PREVIEW_CHARS)?;
    let start = &text[..cut];
    Some(match start.rfind(char::is_whitespace) {
        Some(space) if space > cut / 2 => start[..space].trim_end(),
        _ => start,
    })
}

fn answer_forms(r: &LimitRequest, token: &str, typed: Option<Typed<'_>>) -> Markup {
    let asked = &r.requested_limits;
    let mut values = [
        optional(asked.requests_per_second),
        optional(asked.burst),
        optional(asked.tokens_per_minute),
        optional(asked.tokens_per_month),
        optional(asked.concurrent_requests),
    ];
    let (mut note, mut reason) = (String::new(), String::new());
    match typed {
        Some(t) if t.approving => {
            for (value, (field, _)) in values.iter_mut().zip(OVERRIDE_FIELDS.iter()) {
                *value = t.form.get(field);
            }
            note = t.form.get("reason");
        }
        Some(t) => reason = t.form.get("reason"),
        None => {}
    }
    html! {
        form.approve method="post" action=(format!("{REQUESTS}/{}/approve", r.id)) {
            input type="hidden" name="csrf" value=(token);
            @for (i, (field, label)) in OVERRIDE_FIELDS.iter().enumerate() {
                label { (label) input type="text" inputmode="decimal" name=(field) value=(values[i]) size="12"; }
            }
            label { "Note to the workspace (optional) " textarea name="reason" rows="2" cols="40" maxlength="4096" { (note) } }
            button type="submit" { "Approve" }
        }
        form.deny method="post" action=(format!("{REQUESTS}/{}/deny", r.id)) {
            input type="hidden" name="csrf" value=(token);
            label { "Reason " textarea name="reason" rows="2" cols="40" required maxlength="4096" { (reason) } }
            button type="submit" { "Deny" }
        }
    }
}

/// After an answer to a request: back to the pending ones with `done`, or that list again with
/// why it was refused.
async fn after_answer(
    state: &AppState,
    op: &Operator,
    outcome: Result<Done, AdminError>,
    typed: Option<Typed<'_>>,
) -> Response {
    match outcome {
        Ok(done) => see_other(&format!("{REQUESTS}?done={}", done.code()), None),
        Err(e) => {
            let (status, message) = refusal(e).await;
            let pending = RequestFilter {
                status: Some(LimitRequestStatus::Pending),
                workspace: None,
                page: 1,
            };
            let shown = (None, Some(message.as_str()));
            show_requests(state, op, &pending, status, shown, typed).await
        }
    }
}

fn request_id(id: &str) -> Result<i64, AdminError> {
    id_of(id).ok_or_else(|| AdminError::NotFound("No such request.".into()))
}

async fn approve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let id = request_id(&id)?;
        let granted = overrides_of(&form)?;
        if granted.is_empty() {
            // The API's words ("or be left out") mean nothing on a form (an outside audit).
            return Err(AdminError::Invalid(
                "Give at least one limit to grant (the form is filled in with what was asked)."
                    .into(),
            ));
        }
        let note = Some(form.get("reason")).filter(|n| !n.is_empty());
        state
            .admin
            .approve_limit_request(&op.actor(), id, Some(&granted), note.as_deref())
            .await?;
        Ok(Done::Approved)
    }
    .await;
    let typed = request_id(&id).ok().map(|request| Typed {
        request,
        form: &form,
        approving: true,
    });
    after_answer(&state, &op, outcome, typed).await
}

async fn deny(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (op, form) = match posted(&state, request).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let outcome = async {
        let id = request_id(&id)?;
        state
            .admin
            .deny_limit_request(&op.actor(), id, &form.get("reason"))
            .await?;
        Ok(Done::Denied)
    }
    .await;
    let typed = request_id(&id).ok().map(|request| Typed {
        request,
        form: &form,
        approving: false,
    });
    after_answer(&state, &op, outcome, typed).await
}

// ---- Audit log -----------------------------------------------------------------------------

async fn audit_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let op = match require(&state, &headers) {
        Ok(op) => op,
        Err(not) => return not.answer(&headers),
    };
    let params = query(raw);
    // An entry id, above 0, as the admin API takes it (an outside audit: `after=0` and
    // `after=-5` answered an empty page here, 400 there).
    let after = match param(&params, "after").filter(|s| !s.is_empty()) {
        None => None,
        Some(a) => match a.parse::<i64>() {
            Ok(a) if a > 0 => Some(a),
            _ => {
                let e = AdminError::Invalid("'after' must be an entry id".into());
                return failure_page_back(&op, &state, e, (AUDIT, "Back to the audit log")).await;
            }
        },
    };
    // The filters of `GET /admin/v1/audit`: the workspace, the actor, the action.
    let filter = AuditFilter {
        workspace: param(&params, "workspace").unwrap_or("").trim().to_string(),
        actor: param(&params, "actor").unwrap_or("").trim().to_string(),
        action: param(&params, "action").unwrap_or("").trim().to_string(),
    };
    let workspace = match filter.workspace.as_str() {
        "" => None,
        w => match id_of(w) {
            Some(w) => Some(w),
            None => {
                let e = AdminError::Invalid("'workspace' must be a workspace id".into());
                return failure_page_back(&op, &state, e, (AUDIT, "Back to the audit log")).await;
            }
        },
    };
    let action = match filter.action.as_str() {
        "" => None,
        a => match AuditAction::parse(a) {
            Some(a) => Some(a),
            None => {
                let e = AdminError::Invalid(format!("'action' must be one of {}", actions_list()));
                return failure_page_back(&op, &state, e, (AUDIT, "Back to the audit log")).await;
            }
        },
    };
    let query = AuditQuery {
        workspace,
        actor: (!filter.actor.is_empty()).then(|| filter.actor.clone()),
        action,
        after,
        limit: Some(AUDIT_PAGE),
        ..AuditQuery::default()
    };
    match state.admin.audit(query).await {
        Ok(found) => operator_page(
            &state,
            &op,
            StatusCode::OK,
            "Audit log",
            (None, None),
            audit_body(&found.entries, found.has_more, &filter),
        ),
        Err(e) => failure_page(&op, &state, e).await,
    }
}

/// The audit page's filters as given (empty: any).
struct AuditFilter {
    workspace: String,
    actor: String,
    action: String,
}

impl AuditFilter {
    /// The filters as a query string, for the next page's link.
    fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("workspace", &self.workspace),
            ("actor", &self.actor),
            ("action", &self.action),
        ] {
            if !value.is_empty() {
                q.append_pair(name, value);
            }
        }
        q.finish()
    }
}

fn actions_list() -> String {
    AuditAction::ALL
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn audit_body(entries: &[AuditEntry], has_more: bool, filter: &AuditFilter) -> Markup {
    let json = |v: &Option<Value>| {
        v.as_ref()
            .map(|v| serde_json::to_string_pretty(v).unwrap_or_default())
    };
    html! {
        h1 { "Audit log" }
        p.note { "Every change, newest first: who (an admin token's name, cli:USER, workspace:ID), what, and the object before and after." }
        form #audit-filter method="get" action=(AUDIT) {
            label { "Workspace id " input type="number" name="workspace" min="1" value=(filter.workspace); }
            label { "Who " input type="text" name="actor" placeholder="alice, cli:USER, workspace:ID, promotion" value=(filter.actor); }
            label { "What "
                select name="action" {
                    option value="" selected[filter.action.is_empty()] { "any" }
                    @for a in AuditAction::ALL {
                        option value=(a.as_str()) selected[filter.action == a.as_str()] { (a.as_str()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @if entries.is_empty() {
            p.empty { "No entry matches." }
        }
        table #audit {
            thead { tr { th { "#" } th { "When" } th { "Who" } th { "What" } th { "Target" } th { "Change" } } }
            tbody {
                @for e in entries {
                    tr data-entry-id=(e.id) {
                        td { (e.id) }
                        td { (Timestamp(e.at).rfc3339()) }
                        td.actor { (e.actor) }
                        td.action { (e.action) }
                        td.target {
                            @match e.workspace_id {
                                Some(w) => { a href=(format!("{HOME}/{w}")) { (e.target) } }
                                None => { (e.target) }
                            }
                        }
                        td {
                            details {
                                summary { "before / after" }
                                @if let Some(b) = json(&e.before) { pre.before { (b) } }
                                @if let Some(a) = json(&e.after) { pre.after { (a) } }
                            }
                        }
                    }
                }
            }
        }
        @if has_more {
            @if let Some(last) = entries.last() {
                @let filters = filter.query();
                @let sep = if filters.is_empty() { "" } else { "&" };
                p.pages { a rel="next" href=(format!("{AUDIT}?{filters}{sep}after={}", last.id)) { "Older entries ›" } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(fields: &[(&str, &str)]) -> Form {
        Form(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_tier_form_reads_into_limits_naming_what_is_wrong() {
        let limits = limits_of(&form(&[
            ("requests_per_second", "2.5"),
            ("burst", ""),
            ("tokens_per_minute", " 9000 "),
            (
                "models",
                "big tokens_per_minute=10\n\n small tokens_per_month=5 tokens_per_minute=1 \n",
            ),
        ]))
        .unwrap();
        assert_eq!(limits.requests_per_second, Some(2.5));
        assert_eq!(limits.burst, None);
        assert_eq!(limits.tokens_per_minute, Some(9000));
        assert_eq!(limits.models["big"].tokens_per_minute, Some(10));
        assert_eq!(limits.models["small"].tokens_per_month, Some(5));
        assert_eq!(
            model_lines(&limits),
            "big tokens_per_minute=10\nsmall tokens_per_minute=1 tokens_per_month=5\n"
        );
        for (field, value, says) in [
            ("burst", "1.5", "'burst' must be a whole number"),
            ("tokens_per_month", "lots", "'tokens_per_month'"),
            ("models", "m rpm=5", "models, line 1"),
            (
                "models",
                "a tokens_per_minute=1\na tokens_per_minute=2",
                "a is given twice",
            ),
        ] {
            let e = limits_of(&form(&[(field, value)])).unwrap_err().to_string();
            assert!(e.contains(says), "{field}={value}: {e}");
        }
    }

    #[test]
    fn an_approval_form_reads_as_the_admin_api_reads_limits() {
        let granted = overrides_of(&form(&[
            ("tokens_per_minute", "5000"),
            ("requests_per_second", ""),
            ("concurrent_requests", "3"),
        ]))
        .unwrap();
        assert_eq!(
            granted,
            Overrides {
                tokens_per_minute: Some(5000),
                concurrent_requests: Some(3),
                ..Overrides::default()
            }
        );
        let e = overrides_of(&form(&[("burst", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("burst"), "{e}");
        let e = overrides_of(&form(&[("tokens_per_minute", "ten")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'tokens_per_minute' must be a number"), "{e}");
        assert_eq!(overrides_of(&form(&[])).unwrap(), Overrides::default());
    }

    #[test]
    fn listing_links_say_what_they_list() {
        let params: Vec<(String, String)> = [
            ("q", "a&b"),
            ("sort", "usage"),
            ("dir", "desc"),
            ("page", "3"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let list = ListParams::parse(&params).unwrap();
        assert_eq!(list.sort, WorkspaceSort::MonthTokens);
        assert!(list.descending);
        assert_eq!(
            list.href(),
            format!("{HOME}?q=a%26b&sort=usage&dir=desc&page=3")
        );
        let again: Vec<(String, String)> =
            url::form_urlencoded::parse(list.href().split_once('?').unwrap().1.as_bytes())
                .into_owned()
                .collect();
        assert_eq!(ListParams::parse(&again).unwrap(), list);
        for (k, v) in [("sort", "secret"), ("dir", "up"), ("page", "x")] {
            assert!(
                ListParams::parse(&[(k.to_string(), v.to_string())]).is_err(),
                "{k}={v}"
            );
        }
        for d in Done::ALL {
            assert_eq!(Done::parse(d.code()), Some(d));
        }
        assert_eq!(Done::parse("<script>"), None);
    }
}
