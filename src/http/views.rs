//! The JSON shapes the admin API and the workspace's own API share: workspaces, keys, tiers,
//! limit requests, audit entries, and usage.

use serde_json::{json, Value};

use super::error::ApiError;
use super::headers::duration;
use crate::app::AppState;
use crate::limiter::core::day_of;
use crate::limiter::{LimiterError, MonthKey, Window, NANOS_PER_SEC};
use crate::model::{ApiKey, AuditEntry, LimitRequest, Limits, Tier, Workspace};

pub fn rfc3339(secs: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

pub fn workspace_json(state: &AppState, w: &Workspace) -> Value {
    let limits = state.catalog.workspace(w.id).map(|e| (*e.limits).clone());
    json!({
        "id": w.id,
        "name": w.name,
        "tier": w.tier,
        "status": w.status,
        "overrides": w.overrides,
        "limits": limits,
        "created_at": rfc3339(w.created_at),
    })
}

pub fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "workspace_id": k.workspace_id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": rfc3339(k.created_at),
        "expires_at": k.expires_at.map(rfc3339),
        "revoked_at": k.revoked_at.map(rfc3339),
        "last_used_at": k.last_used_at.map(rfc3339),
    })
}

pub fn limit_request_json(r: &LimitRequest) -> Value {
    json!({
        "id": r.id,
        "workspace_id": r.workspace_id,
        "use_case": r.use_case,
        "requested_limits": r.requested_limits,
        "status": r.status,
        "granted_limits": r.granted_limits,
        "reason": r.reason,
        "created_at": rfc3339(r.created_at),
        "decided_at": r.decided_at.map(rfc3339),
    })
}

/// A tier: its limits, and its name.
pub fn tier_json(t: &Tier) -> Value {
    let mut v = serde_json::to_value(&t.limits).expect("limits serialize");
    v["name"] = Value::String(t.name.clone());
    v
}

pub fn audit_json(e: &AuditEntry) -> Value {
    json!({
        "id": e.id,
        "at": rfc3339(e.at),
        "actor": e.actor,
        "action": e.action,
        "workspace_id": e.workspace_id,
        "target": e.target,
        "before": e.before,
        "after": e.after,
    })
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
pub async fn usage_json(
    state: &AppState,
    ws: &Workspace,
    limits: &Limits,
    from: Option<String>,
    to: Option<String>,
    exact: bool,
) -> Result<Value, ApiError> {
    let now = state.clock.now();
    let month = MonthKey::of(now);
    let from = from.unwrap_or_else(|| month.first_day());
    let to = to.unwrap_or_else(|| day_of(now));
    if !valid_day(&from) || !valid_day(&to) {
        return Err(ApiError::BadRequest(
            "from and to are days as YYYY-MM-DD".into(),
        ));
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
        w.map(|w| {
            json!({
                "limit": w.limit,
                "remaining": w.remaining,
                "reset": duration(w.reset),
            })
        })
    };
    Ok(json!({
        "workspace_id": ws.id,
        "month": format!("{:04}-{:02}", month.year(), month.month()),
        "requests_this_month": ledger.requests_this_month,
        "tokens_this_month": live.month_settled_tokens,
        "tokens_reserved": live.month_reserved_tokens,
        "in_flight": live.in_flight,
        "token_bucket": live.bucket_tokens.map(|level| json!({
            "capacity": limits.tokens_per_minute,
            "level": level,
        })),
        "requests_per_second": window(live.snapshot.requests),
        "tokens_per_minute": window(live.snapshot.tokens),
        "tokens_per_month": live.snapshot.month.map(|w| json!({
            "limit": w.limit,
            "used": live.month_settled_tokens + live.month_reserved_tokens,
            "remaining": w.remaining,
            "reset": duration(w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC),
        })),
        "from": from,
        "to": to,
        "daily": ledger.daily,
    }))
}
