//! The JSON answers of the admin API and the workspace's own API, as types: workspaces, keys,
//! tiers, limit requests, audit entries, usage, and the lists of them. A handler returns one of
//! these (in `SortedJson`), and the OpenAPI document (`openapi`) describes it from the same
//! struct's `ToSchema` derive, so the document says what is sent; `tests/gateway/openapi.rs`
//! checks every answer against it.
//!
//! Conventions the document relies on:
//! - a field that is always sent, `null` when it has no value, is an `Option` marked
//!   `#[schema(required = true)]` (required and nullable);
//! - a field left out when it has no value has `skip_serializing_if` and is never `null`
//!   (`#[schema(nullable = false)]`, as in `model::Limits`);
//! - instants are `Timestamp`s, sent as RFC 3339 in UTC;
//! - ids are written `i64` rather than `WorkspaceId` and kin: the derive cannot see through a
//!   type alias, and would describe one as a schema of its own.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Serialize, Serializer};
use utoipa::openapi::schema::{KnownFormat, Object, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::error::ApiError;
use super::headers::duration;
use crate::admin::NextTier;
use crate::app::AppState;
use crate::catalog::Catalog;
use crate::limiter::core::day_of;
use crate::limiter::{LimiterError, MonthKey, Nanos, Window, NANOS_PER_SEC};
use crate::model::{
    ApiKey, Attributes, AuditAction, AuditEntry, Budget, Condition, Enforcement, KeyLimits,
    LimitRequest, LimitRequestStatus, Limits, Overrides, Promotion, ShadowLimit, Shadowing, Tier,
    TierSpec, Workspace, WorkspaceStatus,
};
use crate::store::{DailyUsage, DeliveryRecord, HourRow, KeyUsage, WebhookEndpoint};
use crate::usage::hour_of;

/// A typed answer, sent as JSON with its keys in alphabetical order at every level. That is
/// the order these answers have always had: they were built with `json!`, whose objects are
/// sorted maps (serde_json without `preserve_order`), so rendering through `serde_json::Value`
/// keeps every answer byte for byte what it was, whatever the order of the fields in the
/// structs. Costs one `Value` per answer, on routes that read the store anyway.
pub struct SortedJson<T>(pub T);

impl<T: Serialize> IntoResponse for SortedJson<T> {
    fn into_response(self) -> Response {
        match serde_json::to_value(&self.0) {
            Ok(value) => Json(value).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "an answer could not be serialized");
                ApiError::Internal.into_response()
            }
        }
    }
}

/// `201 Created` with `view`.
pub fn created<T: Serialize>(view: T) -> Response {
    (StatusCode::CREATED, SortedJson(view)).into_response()
}

/// An instant, unix seconds, sent as RFC 3339 in UTC (`2027-01-01T00:00:00Z`). An instant
/// outside the years 0 to 9999 (which no clock or input of tiergate makes) is sent as the
/// nearest one inside them, so that the answer is always a valid date-time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    const RANGE: (i64, i64) = (-62_167_219_200, 253_402_300_799);

    pub fn rfc3339(self) -> String {
        crate::store::rfc3339(self.0.clamp(Self::RANGE.0, Self::RANGE.1))
    }
}

/// An instant as the answers send it, as JSON (for those that compare answers).
pub fn rfc3339(secs: i64) -> serde_json::Value {
    serde_json::Value::String(Timestamp(secs).rfc3339())
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some(
                "An instant, RFC 3339 in UTC, e.g. 2027-01-01T00:00:00Z.",
            ))
            .into()
    }
}

impl ToSchema for Timestamp {}

/// The `object` of a list: always `"list"`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListObject {
    List,
}

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T> {
    pub object: ListObject,
    pub data: Vec<T>,
}

impl<T> List<T> {
    pub fn of(data: Vec<T>) -> Self {
        List {
            object: ListObject::List,
            data,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Workspace)]
pub struct WorkspaceView {
    pub id: i64,
    pub name: String,
    /// The tier's name.
    pub tier: String,
    pub status: WorkspaceStatus,
    pub overrides: Overrides,
    /// The effective limits: the tier's, with the overrides applied. `null` while this
    /// instance's catalogue does not hold the workspace yet (one made by another process, for
    /// at most about a second).
    #[schema(required = true)]
    pub limits: Option<Limits>,
    pub created_at: Timestamp,
    /// Held on its tier: never promoted automatically.
    pub pinned: bool,
    /// What the operator's own systems set (`PUT .../attributes`), for promotion conditions.
    pub attributes: Attributes,
    /// Its last automatic promotion.
    #[schema(required = true)]
    pub promoted: Option<PromotedView>,
    /// The monthly caps the workspace set for itself (`PUT /v1/budget`).
    pub budget: Budget,
    /// Its own enforcement; `null`: the tier's.
    #[schema(required = true)]
    pub enforcement: Option<Enforcement>,
    /// Its own limits in shadow, beside the tier's; `null`: none of its own.
    #[schema(required = true)]
    pub shadow: Option<Vec<ShadowLimit>>,
    /// The effective enforcement and limits in shadow (the workspace's and the tier's); `null`
    /// while this instance's catalogue does not hold the workspace yet.
    #[schema(required = true)]
    pub shadowing: Option<Shadowing>,
    /// The limits in shadow with their figures (absent from `limits`, which are those
    /// enforced); `null` when none.
    #[schema(required = true)]
    pub shadow_limits: Option<Limits>,
}

/// A workspace's last automatic promotion.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Promoted)]
pub struct PromotedView {
    pub from: String,
    pub to: String,
    pub at: Timestamp,
    /// The conditions that held: `min_days 9 >= 7, attributes.paid_usd 60 >= 50`.
    pub reason: String,
}

/// A workspace as the admin API shows it, its effective limits from `catalog` (the admin CLI
/// loads one to print the same).
pub fn workspace_view(catalog: &Catalog, w: &Workspace) -> WorkspaceView {
    let entry = catalog.workspace(w.id);
    WorkspaceView {
        enforcement: w.enforcement,
        shadow: w.shadow.clone(),
        shadowing: entry.as_ref().map(|e| e.shadowing.clone()),
        shadow_limits: entry.as_ref().and_then(|e| e.shadow.as_deref().cloned()),
        id: w.id,
        name: w.name.clone(),
        tier: w.tier.clone(),
        status: w.status,
        overrides: w.overrides.clone(),
        limits: entry.as_ref().map(|e| (*e.limits).clone()),
        created_at: Timestamp(w.created_at),
        pinned: w.pinned,
        attributes: w.attributes.clone(),
        budget: w.budget.clone(),
        promoted: w.promoted.as_ref().map(|p| PromotedView {
            from: p.from.clone(),
            to: p.to.clone(),
            at: Timestamp(p.at),
            reason: p.reason.clone(),
        }),
    }
}

/// An API key: never its secret.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Key)]
pub struct KeyView {
    pub id: i64,
    pub workspace_id: i64,
    #[schema(required = true)]
    pub name: Option<String>,
    /// The start of the key, to tell keys apart.
    pub prefix: String,
    pub created_at: Timestamp,
    #[schema(required = true)]
    pub expires_at: Option<Timestamp>,
    #[schema(required = true)]
    pub revoked_at: Option<Timestamp>,
    #[schema(required = true)]
    pub last_used_at: Option<Timestamp>,
    /// The key's own limits as set (`{}`: none). What is enforced is each brought within the
    /// workspace's limits of the moment.
    pub limits: KeyLimits,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        KeyView {
            id: k.id,
            workspace_id: k.workspace_id,
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_at: Timestamp(k.created_at),
            expires_at: k.expires_at.map(Timestamp),
            revoked_at: k.revoked_at.map(Timestamp),
            last_used_at: k.last_used_at.map(Timestamp),
            limits: k.limits,
        }
    }
}

/// A key just made: the key, and its secret.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = NewKey)]
pub struct NewKeyView {
    #[serde(flatten)]
    pub info: KeyView,
    /// The secret, shown this once: only its hash is stored.
    pub key: String,
}

/// A webhook endpoint: never its secret.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Webhook)]
pub struct WebhookView {
    pub id: i64,
    /// The workspace whose events it gets; `null` for the operator's, which gets every
    /// workspace's.
    #[schema(required = true)]
    pub workspace_id: Option<i64>,
    pub url: String,
    /// The event types it gets: `limit_request.created`, `limit_request.decided`,
    /// `workspace.tier_changed`, `workspace.suspended`, `quota.threshold`.
    pub events: Vec<String>,
    pub created_at: Timestamp,
}

impl From<&WebhookEndpoint> for WebhookView {
    fn from(e: &WebhookEndpoint) -> Self {
        WebhookView {
            id: e.id,
            workspace_id: e.workspace_id,
            url: e.shown_url(),
            events: e.events.clone(),
            created_at: Timestamp(e.created_at),
        }
    }
}

/// A webhook endpoint just registered, with its signing secret.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CreatedWebhook)]
pub struct NewWebhookView {
    #[serde(flatten)]
    pub info: WebhookView,
    /// `whsec_` and the base64 of 24 random bytes, shown this once: deliveries are signed with
    /// it (Standard Webhooks).
    pub secret: String,
}

/// One event's delivery to an endpoint.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = WebhookDelivery)]
pub struct DeliveryView {
    /// The event's id, the same in every attempt (`webhook-id`).
    pub event_id: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `pending`, `delivered` or `failed` (after 12 attempts).
    pub status: String,
    pub attempts: u32,
    /// The HTTP status of the last attempt, if it got an answer.
    #[schema(required = true)]
    pub last_status_code: Option<u16>,
    /// Why the last attempt got no answer (connection refused, timeout).
    #[schema(required = true)]
    pub last_error: Option<String>,
    /// When it is tried next, while `pending`.
    #[schema(required = true)]
    pub next_attempt_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

impl From<&DeliveryRecord> for DeliveryView {
    fn from(d: &DeliveryRecord) -> Self {
        DeliveryView {
            event_id: d.event_id.clone(),
            kind: d.kind.clone(),
            status: d.status.clone(),
            attempts: d.attempts,
            last_status_code: d.last_status,
            last_error: d.last_error.clone(),
            next_attempt_at: d.next_attempt_at_ms.map(|ms| Timestamp(ms / 1000)),
            created_at: Timestamp(d.created_at),
        }
    }
}

/// One event's delivery to a workspace's own endpoint, as the workspace sees it: whether it
/// arrived, never what the endpoint answered (its status code or the error). Endpoints may name
/// any host the gateway reaches, its private network's included; with the answers, a workspace
/// could tell which of those hosts listen and what they say (an outside audit).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OwnWebhookDelivery)]
pub struct OwnDeliveryView {
    /// The event's id, the same in every attempt (`webhook-id`).
    pub event_id: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `pending`, `delivered` or `failed` (after 12 attempts).
    pub status: String,
    pub attempts: u32,
    /// When it is tried next, while `pending`.
    #[schema(required = true)]
    pub next_attempt_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

impl From<&DeliveryRecord> for OwnDeliveryView {
    fn from(d: &DeliveryRecord) -> Self {
        let DeliveryView {
            event_id,
            kind,
            status,
            attempts,
            next_attempt_at,
            created_at,
            last_status_code: _,
            last_error: _,
        } = DeliveryView::from(d);
        OwnDeliveryView {
            event_id,
            kind,
            status,
            attempts,
            next_attempt_at,
            created_at,
        }
    }
}

/// A tier: its name and its limits, side by side in one object.
#[derive(Debug, Serialize)]
pub struct TierView {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
    /// Left out when `enforce`, the default.
    #[serde(skip_serializing_if = "Enforcement::is_enforce")]
    pub enforcement: Enforcement,
    /// Left out when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowLimit>,
}

impl From<&Tier> for TierView {
    fn from(t: &Tier) -> Self {
        TierView {
            name: t.name.clone(),
            rank: t.rank,
            limits: t.limits.clone(),
            promotion: t.promotion.clone(),
            enforcement: t.enforcement,
            shadow: t.shadow.clone(),
        }
    }
}

/// `Limits`' own schema with `name` added. Not derived with `flatten`: that would be an `allOf`
/// of `Limits`, which allows no other property (`deny_unknown_fields`, right for a request
/// body), and `name`, which no answer could then satisfy.
impl PartialSchema for TierView {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(mut object)) = Limits::schema() else {
            unreachable!("Limits is described as an object");
        };
        object.properties.insert(
            "name".into(),
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("The tier's name."))
                .into(),
        );
        tier_properties(&mut object);
        object.required.push("name".into());
        object.additional_properties = None;
        object.description = Some(
            "A tier: its name, its rank on the ladder (none: off the ladder) and its limits (a limit left out is no limit)."
                .into(),
        );
        RefOr::T(Schema::Object(object))
    }
}

/// What a tier has besides its limits, in its body as in its answer: rank, promotion,
/// enforcement and the limits in shadow.
fn tier_properties(object: &mut Object) {
    object.properties.insert("rank".into(), rank_schema());
    object
        .properties
        .insert("promotion".into(), promotion_schema());
    object
        .properties
        .insert("enforcement".into(), Enforcement::schema());
    object.properties.insert(
        "shadow".into(),
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(ShadowLimit::schema())
            .description(Some(
                "Limits in shadow whatever the enforcement: they only say what they would have denied.",
            ))
            .into(),
    );
}

fn promotion_schema() -> RefOr<Schema> {
    utoipa::openapi::Ref::from_schema_name("Promotion").into()
}

fn rank_schema() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(u32::MAX))
        .description(Some(
            "The tier's place on the ladder: a workspace's next tier is the one of the lowest rank above its tier's. Left out: the tier is off the ladder.",
        ))
        .into()
}

/// A tier's body in `PUT /admin/v1/tiers/{name}`: `Limits`' schema with `rank` beside the
/// limits, as `TierSpec` reads it.
impl PartialSchema for TierSpec {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(mut object)) = Limits::schema() else {
            unreachable!("Limits is described as an object");
        };
        tier_properties(&mut object);
        // In a body, `null` is read as a field left out, whichever the field.
        for (_, property) in object.properties.iter_mut() {
            let given = std::mem::replace(property, ObjectBuilder::new().into());
            *property = utoipa::openapi::schema::OneOfBuilder::new()
                .item(given)
                .item(ObjectBuilder::new().schema_type(Type::Null))
                .into();
        }
        object.description = Some(
            "A tier's rank and limits, all of them: a limit left out (or null) is no limit, a rank left out puts the tier off the ladder."
                .into(),
        );
        RefOr::T(Schema::Object(object))
    }
}

impl ToSchema for TierSpec {
    fn name() -> std::borrow::Cow<'static, str> {
        "TierSpec".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <Limits as ToSchema>::schemas(schemas);
        schemas.push(("Promotion".into(), Promotion::schema()));
        <Promotion as ToSchema>::schemas(schemas);
    }
}

impl ToSchema for TierView {
    fn name() -> std::borrow::Cow<'static, str> {
        "Tier".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <Limits as ToSchema>::schemas(schemas);
        schemas.push(("Promotion".into(), Promotion::schema()));
        <Promotion as ToSchema>::schemas(schemas);
    }
}

/// A workspace's request for higher limits, and the operator's answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = LimitRequest)]
pub struct LimitRequestView {
    pub id: i64,
    pub workspace_id: i64,
    pub use_case: String,
    /// What the workspace expects to send under the new limits, in its own words.
    #[schema(required = true)]
    pub expected_volume: Option<String>,
    pub requested_limits: Overrides,
    pub status: LimitRequestStatus,
    /// The overrides set on approval.
    #[schema(required = true)]
    pub granted_limits: Option<Overrides>,
    /// The operator's reason on denial; on approval, the note given with it, if any.
    #[schema(required = true)]
    pub reason: Option<String>,
    pub created_at: Timestamp,
    #[schema(required = true)]
    pub decided_at: Option<Timestamp>,
}

impl From<&LimitRequest> for LimitRequestView {
    fn from(r: &LimitRequest) -> Self {
        LimitRequestView {
            id: r.id,
            workspace_id: r.workspace_id,
            use_case: r.use_case.clone(),
            expected_volume: r.expected_volume.clone(),
            requested_limits: r.requested_limits.clone(),
            status: r.status,
            granted_limits: r.granted_limits.clone(),
            reason: r.reason.clone(),
            created_at: Timestamp(r.created_at),
            decided_at: r.decided_at.map(Timestamp),
        }
    }
}

/// The names of `AuditAction`, as the document's `enum` of an audit entry's `action`.
pub fn audit_action_schema() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(AuditAction::ALL.iter().map(|a| a.as_str())))
}

/// One recorded admin action.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AuditEntry)]
pub struct AuditEntryView {
    pub id: i64,
    pub at: Timestamp,
    /// An admin token's name, `cli:USER` for the CLI, or `workspace:ID`.
    pub actor: String,
    #[schema(schema_with = audit_action_schema)]
    pub action: String,
    /// The workspace concerned; `null` for a tier or an operator's webhook endpoint.
    #[schema(required = true)]
    pub workspace_id: Option<i64>,
    /// What was changed: `tier:NAME`, `workspace:ID`, `key:ID`, `limit_request:ID` or
    /// `webhook:ID`.
    pub target: String,
    /// The object before the change; `null` for a creation.
    #[schema(required = true, value_type = Option<Object>)]
    pub before: Option<serde_json::Value>,
    /// The object after the change.
    #[schema(required = true, value_type = Option<Object>)]
    pub after: Option<serde_json::Value>,
}

impl From<&AuditEntry> for AuditEntryView {
    fn from(e: &AuditEntry) -> Self {
        AuditEntryView {
            id: e.id,
            at: Timestamp(e.at),
            actor: e.actor.clone(),
            action: e.action.clone(),
            workspace_id: e.workspace_id,
            target: e.target.clone(),
            before: e.before.clone(),
            after: e.after.clone(),
        }
    }
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AuditPage)]
pub struct AuditPageView {
    pub object: ListObject,
    pub data: Vec<AuditEntryView>,
    /// Older entries match too: ask again with `after` = `last_id`.
    pub has_more: bool,
    /// The id of the last entry of this page; `null` when it is empty.
    #[schema(required = true)]
    pub last_id: Option<i64>,
}

/// A limit's figure as JSON: a whole number as an integer (`600`, as `limits` gives it, not
/// `600.0`: a client that decodes it into an integer type refused the latter), else as it is
/// (`0.5` requests a second).
fn limit_figure<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

/// A rate limit's window now.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowView {
    /// Requests a second (may have a fraction) or tokens a minute.
    #[serde(serialize_with = "limit_figure")]
    pub limit: f64,
    pub remaining: u64,
    /// The time until the window is whole again, as in the rate-limit headers (`250ms`,
    /// `6m0s`).
    pub reset: String,
}

/// A model's own limits now.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ModelWindows)]
pub struct ModelWindowsView {
    pub model: String,
    /// `null` without a per-minute limit of its own.
    #[schema(required = true)]
    pub tokens_per_minute: Option<WindowView>,
    /// `null` without a month limit of its own.
    #[schema(required = true)]
    pub tokens_per_month: Option<MonthWindowView>,
}

/// The month's quota now.
#[derive(Debug, Serialize, ToSchema)]
pub struct MonthWindowView {
    #[serde(serialize_with = "limit_figure")]
    pub limit: f64,
    /// Settled and reserved tokens this month.
    pub used: u64,
    pub remaining: u64,
    /// The time until the next month (UTC), in whole seconds (`412h3m0s`).
    pub reset: String,
}

/// The per-minute token bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenBucketView {
    /// `tokens_per_minute`.
    #[schema(required = true)]
    pub capacity: Option<u64>,
    /// Tokens in the bucket now; negative in debt (usage settled above its reservation).
    pub level: i64,
}

/// A workspace's usage: this month, the limits' windows now, and per day and model over a
/// range of days.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Usage)]
pub struct UsageView {
    pub workspace_id: i64,
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub requests_this_month: u64,
    pub tokens_this_month: u64,
    /// Tokens reserved by requests in flight.
    pub tokens_reserved: u64,
    pub in_flight: u32,
    /// `null` without a `tokens_per_minute` limit.
    #[schema(required = true)]
    pub token_bucket: Option<TokenBucketView>,
    /// `null` without such a limit.
    #[schema(required = true)]
    pub requests_per_second: Option<WindowView>,
    /// `null` without such a limit.
    #[schema(required = true)]
    pub tokens_per_minute: Option<WindowView>,
    /// `null` without such a limit.
    #[schema(required = true)]
    pub tokens_per_month: Option<MonthWindowView>,
    /// Each model with limits of its own: its per-minute and month windows, as above.
    pub models: Vec<ModelWindowsView>,
    /// The first day of `daily`, `YYYY-MM-DD`.
    pub from: String,
    /// The last day of `daily`, `YYYY-MM-DD`.
    pub to: String,
    pub daily: Vec<DailyUsage>,
}

/// A workspace as its own key sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceSummary {
    pub id: i64,
    pub name: String,
    pub status: WorkspaceStatus,
}

/// `GET /v1/limits`: the workspace's limits and usage.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = WorkspaceLimits)]
pub struct WorkspaceLimitsView {
    pub workspace: WorkspaceSummary,
    /// The tier's name.
    pub tier: String,
    /// The effective limits: the tier's, with the overrides applied.
    pub limits: Limits,
    /// The tier's own limits; `null` if the tier is no longer in the catalogue.
    #[schema(required = true)]
    pub tier_limits: Option<Limits>,
    pub overrides: Overrides,
    pub usage: UsageView,
    /// What the workspace can reach next: the tier its tier promotes to (with the conditions,
    /// which are met), else the next tier up the ladder (reached by asking for an increase);
    /// `null` at the top of the ladder or off it.
    #[schema(required = true)]
    pub next_tier: Option<NextTierView>,
    /// The key this was asked with, when it has limits of its own (else left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub key: Option<CallingKeyView>,
    /// The effective enforcement and the limits in shadow (absent from `limits`).
    pub shadowing: Shadowing,
    /// The limits in shadow with their figures; `null` when none.
    #[schema(required = true)]
    pub shadow_limits: Option<Limits>,
}

/// The tier a workspace can reach next, and how.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = NextTier)]
pub struct NextTierView {
    pub name: String,
    /// What it gives.
    pub limits: Limits,
    /// `true`: the workspace moves there by itself once every condition is met (unless
    /// pinned); `false`: it is the next tier up the ladder, reached by asking.
    pub automatic: bool,
    /// The promotion's conditions, each with what the workspace has (empty when not
    /// automatic).
    pub conditions: Vec<Condition>,
    /// Held on its tier by the operator: not promoted whatever the conditions say.
    pub pinned: bool,
}

impl From<&NextTier> for NextTierView {
    fn from(n: &NextTier) -> Self {
        NextTierView {
            name: n.tier.name.clone(),
            limits: n.tier.limits.clone(),
            automatic: n.conditions.is_some(),
            conditions: n.conditions.clone().unwrap_or_default(),
            pinned: n.pinned,
        }
    }
}

fn valid_day(s: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &format).is_ok()
}

/// A workspace's usage: this month, the bucket now, and per day and model over a range
/// (default: this month so far).
/// `exact`: the ledger's figures include everything settled so far (the admin view); else they
/// may be behind by about a second (the workspace's own page, read often; see
/// `Recorder::ledger_view`). The limiter's figures (this month's tokens, the windows) are live.
pub async fn usage_view(
    state: &AppState,
    ws: &Workspace,
    limits: &Limits,
    from: Option<String>,
    to: Option<String>,
    exact: bool,
) -> Result<UsageView, ApiError> {
    Ok(usage_and_key_view(state, ws, limits, from, to, exact)
        .await?
        .0)
}

/// `usage_view`, and the windows of the key's own limits when `limits` carry a key's
/// (`Limits::key`) and the limiter gave them.
pub async fn usage_and_key_view(
    state: &AppState,
    ws: &Workspace,
    limits: &Limits,
    from: Option<String>,
    to: Option<String>,
    exact: bool,
) -> Result<(UsageView, Option<KeyWindowsView>), ApiError> {
    let now = state.clock.now();
    let month = MonthKey::of(now);
    let from = from.unwrap_or_else(|| month.first_day());
    let to = to.unwrap_or_else(|| day_of(now));
    if !valid_day(&from) || !valid_day(&to) {
        return Err(ApiError::BadRequest(
            "from and to are days as YYYY-MM-DD".into(),
        ));
    }
    // Days as YYYY-MM-DD compare as text; a range backwards is a mistake to say, one end left
    // to its default included (a `from` after today was answered with an empty range).
    if from > to {
        return Err(ApiError::BadRequest(format!(
            "from ({from}) must not be after to ({to})"
        )));
    }
    let live = state
        .limiter
        .usage(ws.id, limits, now)
        .await
        .map_err(|e| match e {
            LimiterError::Unavailable(_) => ApiError::LimiterUnavailable,
            LimiterError::Ledger(_) => ApiError::Unavailable,
        })?;
    let ledger = state
        .recorder
        .ledger_view(ws.id, month, &from, &to, exact)
        .await?;
    let window = |w: Option<Window>| {
        w.map(|w| WindowView {
            limit: w.limit,
            remaining: w.remaining,
            reset: duration(w.reset),
        })
    };
    let key = live.key.as_ref().map(|k| KeyWindowsView {
        requests_per_second: window(k.requests),
        tokens_per_minute: window(k.tokens),
        tokens_per_month: window(k.month.map(|w| Window {
            reset: w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC,
            ..w
        })),
    });
    let view = UsageView {
        workspace_id: ws.id,
        month: format!("{:04}-{:02}", month.year(), month.month()),
        requests_this_month: ledger.requests_this_month,
        tokens_this_month: live.month_settled_tokens,
        tokens_reserved: live.month_reserved_tokens,
        in_flight: live.in_flight,
        token_bucket: live.bucket_tokens.map(|level| TokenBucketView {
            capacity: limits.tokens_per_minute,
            level,
        }),
        requests_per_second: window(live.snapshot.requests),
        tokens_per_minute: window(live.snapshot.tokens),
        tokens_per_month: live.snapshot.month.map(|w| MonthWindowView {
            limit: w.limit,
            used: live.month_settled_tokens + live.month_reserved_tokens,
            remaining: w.remaining,
            reset: duration(w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC),
        }),
        models: live
            .models
            .into_iter()
            .map(|m| ModelWindowsView {
                tokens_per_minute: window(m.tokens),
                tokens_per_month: m.month.map(|w| MonthWindowView {
                    limit: w.limit,
                    used: m.month_used,
                    remaining: w.remaining,
                    reset: duration(w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC),
                }),
                model: m.model,
            })
            .collect(),
        from,
        to,
        daily: ledger.daily,
    };
    Ok((view, key))
}

/// The windows of a key's own limits now (`null` for a limit the key does not have).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = KeyWindows)]
pub struct KeyWindowsView {
    #[schema(required = true)]
    pub requests_per_second: Option<WindowView>,
    #[schema(required = true)]
    pub tokens_per_minute: Option<WindowView>,
    /// Its reset in whole seconds.
    #[schema(required = true)]
    pub tokens_per_month: Option<WindowView>,
}

/// The key a workspace's own API was called with, when it has limits of its own.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CallingKey)]
pub struct CallingKeyView {
    pub id: i64,
    /// The key's limits as enforced now: as set, each brought within the workspace's limits.
    pub limits: KeyLimits,
    /// Its windows now; left out when the limiter does not give them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub usage: Option<KeyWindowsView>,
}

/// One day's usage (UTC), all models.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = DayUsage)]
pub struct DayUsageView {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub requests: u64,
    pub tokens: u64,
    /// Requests the limits denied (`429`).
    pub denied: u64,
    /// Requests a limit in shadow would have denied (they were admitted).
    pub shadow_denied: u64,
}

/// One hour's usage (UTC).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = HourUsage)]
pub struct HourUsageView {
    /// The hour's start.
    pub hour: Timestamp,
    pub requests: u64,
    /// Requests the limits denied (`429`).
    pub denied: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One key's usage this month.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = KeyUsage)]
pub struct KeyUsageView {
    pub key_id: i64,
    /// The key's first characters, as in the key listings.
    pub prefix: String,
    #[schema(required = true)]
    pub name: Option<String>,
    /// Whether the key is revoked.
    pub revoked: bool,
    pub requests: u64,
    pub tokens: u64,
    /// Requests with this key that the limits denied (`429`).
    pub denied: u64,
}

/// `GET /v1/usage`: the workspace's usage over time and per key, from the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = UsageHistory)]
pub struct UsageHistoryView {
    pub workspace_id: i64,
    /// `YYYY-MM`, UTC.
    pub month: String,
    /// Every day of the month (this month: so far, today last), oldest first; days without
    /// usage too.
    pub days: Vec<DayUsageView>,
    /// The last 48 hours, oldest first, the current hour last; hours without usage too.
    pub hours: Vec<HourUsageView>,
    /// Per key that month: every key that is not revoked, and every revoked key with usage
    /// that month; by id.
    pub keys: Vec<KeyUsageView>,
}

/// `YYYY-MM`, a month up to `now` (and from 1970 on).
pub(crate) fn past_month(text: &str, now: MonthKey) -> Result<MonthKey, ApiError> {
    let parsed = text
        .split_once('-')
        .filter(|(y, m)| y.len() == 4 && m.len() == 2)
        .and_then(|(y, m)| Some((y.parse::<i32>().ok()?, m.parse::<i32>().ok()?)))
        .filter(|&(y, m)| y >= 1970 && (1..=12).contains(&m))
        .map(|(y, m)| MonthKey(y * 12 + m - 1));
    match parsed {
        Some(month) if month <= now => Ok(month),
        Some(_) => Err(ApiError::BadRequest(format!(
            "'month' must not be after the current month ({:04}-{:02})",
            now.year(),
            now.month()
        ))),
        None => Err(ApiError::BadRequest(
            "'month' must be a month as YYYY-MM (e.g. 2026-11)".into(),
        )),
    }
}

/// Hours in `UsageHistoryView::hours`.
pub const HISTORY_HOURS: i64 = 48;

/// The workspace's usage over time: every day of `month` (default: this month, so far), the
/// last `HISTORY_HOURS` hours, and each key's usage that month. `exact` as in `usage_view`.
pub async fn usage_history_view(
    state: &AppState,
    ws: &Workspace,
    exact: bool,
    month: Option<MonthKey>,
) -> Result<UsageHistoryView, ApiError> {
    let now = state.clock.now();
    let this = MonthKey::of(now);
    let month = month.unwrap_or(this);
    let last = match month == this {
        true => now,
        false => month.next().start().saturating_sub(1),
    };
    let (from, to) = (month.first_day(), day_of(last));
    let last_hour = hour_of(now);
    let first_hour = last_hour - (HISTORY_HOURS - 1) * 3600;
    let history = state
        .recorder
        .usage_history(ws.id, (&from, &to), (first_hour, last_hour + 3600), exact)
        .await?;
    let keys = state.store.list_keys(ws.id).await?;
    Ok(UsageHistoryView {
        workspace_id: ws.id,
        month: format!("{:04}-{:02}", month.year(), month.month()),
        days: days_of(&from, &to, &history.daily),
        hours: hours_of(first_hour, &history.hours),
        keys: keys_of(&keys, &history.keys, month),
    })
}

/// Each day `from..=to`, with the sums of its rows (all models).
fn days_of(from: &str, to: &str, rows: &[DailyUsage]) -> Vec<DayUsageView> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let (Ok(mut day), Ok(last)) = (
        time::Date::parse(from, &format),
        time::Date::parse(to, &format),
    ) else {
        return Vec::new();
    };
    let mut days = Vec::new();
    while day <= last {
        let name = day.format(&format).unwrap_or_default();
        let mut view = DayUsageView {
            day: name,
            requests: 0,
            tokens: 0,
            denied: 0,
            shadow_denied: 0,
        };
        for r in rows.iter().filter(|r| r.day == view.day) {
            view.requests += r.requests;
            view.tokens += r.tokens;
            view.denied += r.denied;
            view.shadow_denied += r.shadow_denied;
        }
        days.push(view);
        match day.next_day() {
            Some(next) => day = next,
            None => break,
        }
    }
    days
}

/// `HISTORY_HOURS` hours from `first`, with their rows' figures.
fn hours_of(first: i64, rows: &[HourRow]) -> Vec<HourUsageView> {
    (0..HISTORY_HOURS)
        .map(|i| {
            let hour = first + i * 3600;
            let row = rows.iter().find(|r| r.hour == hour);
            HourUsageView {
                hour: Timestamp(hour),
                requests: row.map_or(0, |r| r.requests),
                denied: row.map_or(0, |r| r.denied),
                prompt_tokens: row.map_or(0, |r| r.prompt_tokens),
                completion_tokens: row.map_or(0, |r| r.completion_tokens),
            }
        })
        .collect()
}

/// The workspace's keys that were active in `month` (made before it ended, not revoked before it
/// began) or were used in it, with their usage. A key made later is not listed for an earlier
/// month (an outside audit: November listed three keys made in December).
fn keys_of(keys: &[ApiKey], usage: &[KeyUsage], month: MonthKey) -> Vec<KeyUsageView> {
    let seconds = |at: Nanos| i64::try_from(at / NANOS_PER_SEC).unwrap_or(i64::MAX);
    let (begins, ends) = (seconds(month.start()), seconds(month.next().start()));
    keys.iter()
        .filter_map(|k| {
            let used = usage.iter().find(|u| u.key == k.id);
            let active = k.created_at < ends && k.revoked_at.is_none_or(|at| at >= begins);
            (active || used.is_some()).then(|| KeyUsageView {
                key_id: k.id,
                prefix: k.prefix.clone(),
                name: k.name.clone(),
                revoked: k.revoked_at.is_some(),
                requests: used.map_or(0, |u| u.requests),
                tokens: used.map_or(0, |u| u.tokens),
                denied: used.map_or(0, |u| u.denied),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc_and_always_valid() {
        assert_eq!(Timestamp(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(1_798_761_600).rfc3339(), "2027-01-01T00:00:00Z");
        assert_eq!(Timestamp(i64::MAX).rfc3339(), "9999-12-31T23:59:59Z");
        assert_eq!(Timestamp(i64::MIN).rfc3339(), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn a_tier_is_its_name_beside_its_limits() {
        let tier = Tier {
            name: "t".into(),
            rank: None,
            promotion: None,
            limits: Limits {
                burst: Some(3),
                ..Limits::default()
            },
            enforcement: Enforcement::Enforce,
            shadow: Vec::new(),
        };
        let text =
            serde_json::to_string(&serde_json::to_value(TierView::from(&tier)).unwrap()).unwrap();
        assert_eq!(text, r#"{"burst":3,"name":"t"}"#);
    }

    /// The bounds the document states are the ones `Limits::validate` and `Overrides::validate`
    /// enforce (written as literals in the derives' attributes).
    #[test]
    fn the_documented_bounds_are_the_enforced_ones() {
        use crate::model::{
            Overrides, MAX_BURST, MAX_CONCURRENT_REQUESTS, MAX_REQUESTS_PER_SECOND,
            MAX_TOKENS_PER_MINUTE, MAX_TOKENS_PER_MONTH,
        };
        let bounds = [
            ("requests_per_second", 0.001, MAX_REQUESTS_PER_SECOND),
            ("burst", 1.0, MAX_BURST as f64),
            ("tokens_per_minute", 1.0, MAX_TOKENS_PER_MINUTE as f64),
            ("tokens_per_month", 1.0, MAX_TOKENS_PER_MONTH as f64),
            ("concurrent_requests", 1.0, MAX_CONCURRENT_REQUESTS as f64),
        ];
        let limits = serde_json::to_value(Limits::schema()).unwrap();
        let overrides = serde_json::to_value(Overrides::schema()).unwrap();
        let models = serde_json::to_value(crate::model::ModelLimits::schema()).unwrap();
        for (field, min, max) in bounds {
            for schema in [&limits, &overrides, &models] {
                let p = &schema["properties"][field];
                if p.is_null() {
                    continue;
                }
                assert_eq!(p["minimum"].as_f64(), Some(min), "{field}: {p}");
                assert_eq!(p["maximum"].as_f64(), Some(max), "{field}: {p}");
            }
        }
        assert!(!models["properties"]["tokens_per_minute"].is_null());
    }
}
