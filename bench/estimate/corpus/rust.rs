// Snapshot of tiergate's own source (src/clock.rs, src/http/headers.rs, src/http/extract.rs, src/http/workspace.rs, src/metrics.rs at f218a64), kept fixed as the Rust corpus.

//! Time as the limiter sees it: nanoseconds since the Unix epoch, from a clock the app is given.
//! Production uses the system clock; tests use `ManualClock` and move time by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::limiter::{Nanos, NANOS_PER_SEC};

pub trait Clock: Send + Sync {
    fn now(&self) -> Nanos;

    fn now_secs(&self) -> i64 {
        (self.now() / NANOS_PER_SEC) as i64
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as Nanos)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: Nanos) -> Self {
        ManualClock(AtomicU64::new(start))
    }

    /// Starts at the system time now, so that months and days are realistic.
    pub fn starting_now() -> Self {
        ManualClock::new(SystemClock.now())
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, to: Nanos) {
        self.0.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.0.load(Ordering::SeqCst)
    }
}

//! The rate-limit headers every proxied answer carries, in the OpenAI API's names and duration
//! format (`1s`, `250ms`, `6m0s`, `412h3m0s`).

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::limiter::{Nanos, Snapshot, Window, NANOS_PER_SEC};

/// Formats a duration as the OpenAI API does (Go's `time.Duration` style): `250ms` below a
/// second, else hours, minutes and seconds with up to three decimals: `1s`, `1.5s`, `6m0s`.
pub fn duration(nanos: Nanos) -> String {
    let ms = nanos.div_ceil(1_000_000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s_ms = ms % 60_000;
    let secs = if s_ms.is_multiple_of(1000) {
        format!("{}s", s_ms / 1000)
    } else {
        let frac = format!("{:03}", s_ms % 1000);
        format!("{}.{}s", s_ms / 1000, frac.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

fn number(v: f64) -> HeaderValue {
    if v.fract() == 0.0 {
        HeaderValue::from(v as u64)
    } else {
        HeaderValue::from_str(&format!("{v}")).expect("a number is a valid header")
    }
}

/// `[limit, remaining, reset]` header names of one window.
type Names = [HeaderName; 3];

fn names(suffix: &'static str) -> Names {
    let name = |kind: &str| {
        HeaderName::try_from(format!("x-ratelimit-{kind}-{suffix}")).expect("valid header name")
    };
    [name("limit"), name("remaining"), name("reset")]
}

static NAMES: std::sync::LazyLock<[Names; 3]> =
    std::sync::LazyLock::new(|| [names("requests"), names("tokens"), names("tokens-month")]);

fn put(h: &mut HeaderMap, names: &Names, w: &Window, hours_reset: bool) {
    let [limit, remaining, reset_name] = names;
    h.insert(limit.clone(), number(w.limit));
    h.insert(remaining.clone(), HeaderValue::from(w.remaining));
    let reset = if hours_reset {
        // The month's reset reads in whole seconds: `412h3m0s`.
        duration(w.reset.div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC)
    } else {
        duration(w.reset)
    };
    h.insert(
        reset_name.clone(),
        HeaderValue::from_str(&reset).expect("a duration is a valid header"),
    );
}

/// Sets the headers of every limit the snapshot has; an absent limit has no header.
pub fn apply(snapshot: &Snapshot, h: &mut HeaderMap) {
    let [requests, tokens, month] = &*NAMES;
    if let Some(w) = &snapshot.requests {
        put(h, requests, w, false);
    }
    if let Some(w) = &snapshot.tokens {
        put(h, tokens, w, false);
    }
    if let Some(w) = &snapshot.month {
        put(h, month, w, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_the_openai_api() {
        let ms = 1_000_000;
        let s = 1000 * ms;
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(1), "1ms");
        assert_eq!(duration(250 * ms), "250ms");
        assert_eq!(duration(s), "1s");
        assert_eq!(duration(1500 * ms), "1.5s");
        assert_eq!(duration(360 * s), "6m0s");
        assert_eq!(duration(61 * s + 20 * ms), "1m1.02s");
        assert_eq!(duration((412 * 3600 + 3 * 60) * s), "412h3m0s");
    }
}

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

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// A JSON body that may be left out (empty), then `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body(), MAX_API_BODY).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse(&bytes).map(OptionalJson)
    }
}

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
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(PathParam(v)),
            Err(_) => {
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

/// What a path parameter of type `T` is, for messages.
fn what<T>() -> &'static str {
    match std::any::type_name::<T>() {
        "i64" | "u64" | "i32" | "u32" => "id (a whole number)",
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

//! The workspace's own API, with its key: its limits and usage (the data of the limits page),
//! and its requests for higher limits. These routes count against no limit.

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::authenticate;
use super::error::ApiError;
use super::extract::JsonBody;
use super::views::{limit_request_json, usage_json};
use crate::app::AppState;
use crate::model::{Actor, Overrides};

pub async fn limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, entry) = authenticate(&state, &headers).await?;
    let ws = &entry.workspace;
    let tiers = state.store.list_tiers().await?;
    let tier_limits = tiers.iter().find(|t| t.name == ws.tier).map(|t| &t.limits);
    let usage = usage_json(&state, ws, &entry.limits, None, None, false).await?;
    Ok(Json(json!({
        "workspace": { "id": ws.id, "name": ws.name, "status": ws.status },
        "tier": ws.tier,
        "limits": *entry.limits,
        "tier_limits": tier_limits,
        "overrides": ws.overrides,
        "usage": usage,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLimitRequest {
    use_case: String,
    #[serde(default)]
    requested_limits: Overrides,
}

/// The key is checked before the body is read (the body is bounded either way).
pub async fn create_limit_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Request,
) -> Result<Response, ApiError> {
    let (_, entry) = authenticate(&state, &headers).await?;
    let JsonBody(body) = JsonBody::<NewLimitRequest>::from_request(body, &state).await?;
    let id = entry.workspace.id;
    let request = state
        .admin
        .create_limit_request(
            &Actor::workspace(id),
            id,
            &body.use_case,
            &body.requested_limits,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(limit_request_json(&request))).into_response())
}

pub async fn list_limit_requests(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, entry) = authenticate(&state, &headers).await?;
    let list = state
        .admin
        .list_limit_requests(Some(entry.workspace.id), None)
        .await?;
    let data: Vec<Value> = list.iter().map(limit_request_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

//! Counters for operators, rendered as Prometheus text on `/metrics`.
//!
//! A handful of atomics written by hand: the `metrics` facade plus an exporter would add an HTTP
//! server and a registry for a dozen counters that the gateway's own router already serves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::limiter::{DenialKind, LimitName};

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub admitted: AtomicU64,
    pub unauthenticated: AtomicU64,
    denied: [AtomicU64; 6],
    pub denied_too_large: AtomicU64,
    pub upstream_rate_limited: AtomicU64,
    pub upstream_server_errors: AtomicU64,
    pub upstream_unreachable: AtomicU64,
    pub upstream_auth_failures: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    /// Streams and downloads given up because the upstream went silent mid-body.
    pub upstream_idle_timeouts: AtomicU64,
    pub refunds: AtomicU64,
    pub tokens_estimated: AtomicU64,
    pub tokens_settled: AtomicU64,
    pub settled_without_usage: AtomicU64,
    pub ledger_write_errors: AtomicU64,
    pub limiter_errors: AtomicU64,
    /// The shared limiter's backend (Redis): calls that failed or timed out.
    pub limiter_backend_errors: AtomicU64,
    /// Times the circuit breaker opened (Redis judged down).
    pub limiter_breaker_opened: AtomicU64,
    /// Gauge: 1 while the shared limiter's backend answers (or none is configured).
    pub limiter_backend_down: AtomicU64,
    /// Decisions made without the shared limiter, by failure policy.
    pub fallback_closed: AtomicU64,
    pub fallback_open: AtomicU64,
    pub fallback_local: AtomicU64,
    /// Gauge: instances sharing the limits, as last seen in Redis (0 unknown).
    pub instances: AtomicU64,
    /// Gauge: settlements waiting for the shared limiter to answer again.
    pub settlements_deferred: AtomicU64,
    /// Settlements written to the ledger without the shared limiter's confirmation.
    pub settlements_unconfirmed: AtomicU64,
    /// Settlements the ledger did not take (its buffer full), and their tokens.
    pub ledger_dropped: AtomicU64,
    pub ledger_dropped_tokens: AtomicU64,
    /// Gauge: ledger rows (usage added up per workspace, day, model and counter) waiting to be
    /// written.
    pub ledger_pending: AtomicU64,
}

const LIMITS: [LimitName; 6] = [
    LimitName::RequestsPerSecond,
    LimitName::TokensPerMinute,
    LimitName::TokensPerMonth,
    LimitName::ConcurrentRequests,
    LimitName::ModelTokensPerMinute,
    LimitName::ModelTokensPerMonth,
];

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn denied(&self, limit: LimitName, kind: DenialKind) {
        if kind == DenialKind::RequestTooLarge {
            Self::inc(&self.denied_too_large);
        } else {
            let i = LIMITS.iter().position(|l| *l == limit).unwrap_or(0);
            Self::inc(&self.denied[i]);
        }
    }

    pub fn render(&self, tracked_workspaces: usize) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "tiergate_requests_total",
            "Requests received on /v1 routes.",
            get(&self.requests),
        );
        counter(
            "tiergate_admitted_total",
            "Requests admitted by the limiter.",
            get(&self.admitted),
        );
        counter(
            "tiergate_unauthenticated_total",
            "Requests refused for a missing or unknown key.",
            get(&self.unauthenticated),
        );
        counter(
            "tiergate_denied_too_large_total",
            "Requests that can never fit a limit.",
            get(&self.denied_too_large),
        );
        counter(
            "tiergate_upstream_rate_limited_total",
            "Upstream 429 answers passed through (not the workspace's own denials).",
            get(&self.upstream_rate_limited),
        );
        counter(
            "tiergate_upstream_server_errors_total",
            "Upstream 5xx answers passed through.",
            get(&self.upstream_server_errors),
        );
        counter(
            "tiergate_upstream_unreachable_total",
            "Upstream connection failures (502).",
            get(&self.upstream_unreachable),
        );
        counter(
            "tiergate_upstream_auth_failures_total",
            "Upstream 401/403: the gateway's own upstream key was refused (answered 502).",
            get(&self.upstream_auth_failures),
        );
        counter(
            "tiergate_upstream_timeouts_total",
            "Upstream timeouts answered 504: no headers in time, or a JSON or error body not whole in time.",
            get(&self.upstream_timeouts),
        );
        counter(
            "tiergate_upstream_idle_timeouts_total",
            "Streams and downloads ended because the upstream sent nothing for upstream.idle_read_timeout_ms.",
            get(&self.upstream_idle_timeouts),
        );
        counter(
            "tiergate_refunds_total",
            "Reservations refunded because the upstream produced nothing.",
            get(&self.refunds),
        );
        counter(
            "tiergate_tokens_estimated_total",
            "Tokens reserved as estimates.",
            get(&self.tokens_estimated),
        );
        counter(
            "tiergate_tokens_settled_total",
            "Tokens settled from upstream usage.",
            get(&self.tokens_settled),
        );
        counter(
            "tiergate_settled_without_usage_total",
            "Requests settled to the estimate because no usage could be read.",
            get(&self.settled_without_usage),
        );
        counter(
            "tiergate_ledger_write_errors_total",
            "Failed ledger batch writes (retried).",
            get(&self.ledger_write_errors),
        );
        counter(
            "tiergate_limiter_errors_total",
            "Limiter backend errors.",
            get(&self.limiter_errors),
        );
        counter(
            "tiergate_limiter_backend_errors_total",
            "Calls to the shared limiter's Redis that failed or timed out.",
            get(&self.limiter_backend_errors),
        );
        counter(
            "tiergate_limiter_breaker_opened_total",
            "Times the circuit breaker judged Redis down and stopped calling it.",
            get(&self.limiter_breaker_opened),
        );
        counter(
            "tiergate_ledger_dropped_total",
            "Settlements not written to the ledger because its buffer of rows was full (the store unreachable for long).",
            get(&self.ledger_dropped),
        );
        counter(
            "tiergate_ledger_dropped_tokens_total",
            "Tokens of the settlements in tiergate_ledger_dropped_total.",
            get(&self.ledger_dropped_tokens),
        );
        counter(
            "tiergate_settlements_unconfirmed_total",
            "Settlements written to the ledger that Redis never confirmed (it stayed down until shutdown).",
            get(&self.settlements_unconfirmed),
        );
        let _ = writeln!(out, "# HELP tiergate_limiter_fallback_total Decisions made without the shared limiter while Redis was unreachable, by failure policy.\n# TYPE tiergate_limiter_fallback_total counter");
        for (policy, c) in [
            ("closed", &self.fallback_closed),
            ("open", &self.fallback_open),
            ("local", &self.fallback_local),
        ] {
            let _ = writeln!(
                out,
                "tiergate_limiter_fallback_total{{policy=\"{policy}\"}} {}",
                get(c)
            );
        }
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "tiergate_limiter_backend_up",
            "1 while the shared limiter's Redis answers (always 1 without Redis).",
            1 - get(&self.limiter_backend_down).min(1),
        );
        gauge(
            "tiergate_instances",
            "Instances sharing the limits, as last seen in Redis (0 when unknown).",
            get(&self.instances),
        );
        gauge(
            "tiergate_ledger_pending",
            "Ledger rows (usage added up per workspace, day, model and counter) waiting to be written.",
            get(&self.ledger_pending),
        );
        gauge(
            "tiergate_settlements_deferred",
            "Settlements waiting for Redis to answer again.",
            get(&self.settlements_deferred),
        );
        let _ = writeln!(out, "# HELP tiergate_denied_total Requests denied by the workspace's own limits.\n# TYPE tiergate_denied_total counter");
        for (limit, c) in LIMITS.iter().zip(&self.denied) {
            let _ = writeln!(
                out,
                "tiergate_denied_total{{limit=\"{}\"}} {}",
                limit.as_str(),
                get(c)
            );
        }
        let _ = writeln!(out, "# HELP tiergate_tracked_workspaces Workspaces whose limiter state is in memory.\n# TYPE tiergate_tracked_workspaces gauge\ntiergate_tracked_workspaces {tracked_workspaces}");
        out
    }
}
