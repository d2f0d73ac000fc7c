//! The one place that turns errors into HTTP answers: status, headers and a JSON body shaped
//! like the Mistral API's errors, `{"object":"error","message","type","param":null,"code"}`,
//! with the same fields again as OpenAI's `"error": {"message","type","param","code"}`.
//! Internal details go to the log, never to the client.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::headers;
use crate::admin::AdminError;
use crate::limiter::{Denial, DenialKind, LimitName, NANOS_PER_SEC};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    /// A metered request's body refused, naming its field where one is at fault.
    #[error("{}", .0.message)]
    Refused(crate::estimate::Refused),
    #[error("{0}")]
    NotFound(String),
    /// The route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    /// A workspace's changes of its own came too fast (`admin::ChangeBudget`).
    #[error("{message}")]
    TooManyChanges {
        message: String,
        retry_after_secs: u64,
    },
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The request's body did not arrive whole within `body_read_timeout_ms`.
    #[error("The request body did not arrive within {0} ms.")]
    RequestTimeout(u64),
    #[error("rate limited")]
    /// The rate-limit headers are the caller's to add (they depend on the configuration).
    /// `true`: the month cap that denied it is the workspace's own budget.
    Denied(Box<Denial>, bool, Option<Shortfall>),
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The upstream answered but its body did not arrive whole (it broke, or `timed_out`): it
    /// may have done the work, so the request was settled to its estimate, `charged` tokens.
    #[error("upstream answer incomplete")]
    UpstreamIncomplete { timed_out: bool, charged: u64 },
    #[error("the admin API is disabled: no admin token is configured")]
    AdminDisabled,
    #[error("service unavailable")]
    Unavailable,
    /// The shared limiter cannot decide (Redis down, policy `closed`).
    #[error("limiter unavailable")]
    LimiterUnavailable,
    /// The store cannot be reached: the operation was not carried out.
    #[error("database unreachable")]
    StoreUnreachable,
    /// The database was lost while a change was being committed: it may have been applied.
    #[error("database lost while committing")]
    StoreUncertain,
    #[error("internal error")]
    Internal,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            StoreError::Unreachable(e) => {
                tracing::warn!(error = %e, "store unreachable");
                ApiError::StoreUnreachable
            }
            StoreError::Uncertain(e) => {
                tracing::warn!(error = %e, "store lost while committing: the change may have been applied");
                ApiError::StoreUncertain
            }
            e => {
                tracing::error!(error = %e, "store error");
                ApiError::Unavailable
            }
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Invalid(m) => ApiError::BadRequest(m),
            AdminError::NotFound(m) => ApiError::NotFound(m),
            AdminError::Conflict(m) => ApiError::Conflict(m),
            AdminError::TooManyChanges {
                message,
                retry_after_secs,
            } => ApiError::TooManyChanges {
                message,
                retry_after_secs,
            },
            AdminError::Store(e) => e.into(),
        }
    }
}

impl ApiError {
    /// The status and message of this error's answer, for a page that shows it (the console):
    /// read back from the JSON answer itself, so that a page says what the API would, by the
    /// same mapping, and never an internal detail.
    pub async fn status_and_message(self) -> (StatusCode, String) {
        let response = self.into_response();
        let status = response.status();
        let message = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| "The request could not be carried out; retry later.".into());
        (status, message)
    }
}

/// The error shape: the Mistral API's fields, in its order, then the same four again under
/// `error`, the OpenAI API's shape. The mistralai SDK hands over the body as sent; the openai
/// SDKs read `error` (openai-python falls back on the whole body, openai-node does not: without
/// `error` it reports "429 status code (no body)" and no type or code; tests/sdk). Serialised
/// straight from these fields; the OpenAPI document's `Error` schema is derived from it.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(
    as = Error,
    description = "Every error: the Mistral API's shape, and the same four fields again under `error` (the OpenAI API's shape). `type` says the cause (`invalid_request_error`, `authentication_error`, `permission_error`, `not_found`, `conflict`, `payload_too_large`, `request_timeout`, `service_unavailable`, ...), `message` says what to do."
)]
pub struct ErrorBody<'a> {
    #[schema(schema_with = super::openapi::error_object)]
    object: &'static str,
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    /// `null` on the routes of this document. (On the proxied routes, a `400` for a field of the
    /// request's body names it here, as the OpenAI API does: `messages`, `max_tokens`, ...)
    #[schema(schema_with = super::openapi::null, required = true)]
    param: Option<&'a str>,
    /// A finer cause, where there is one (e.g. `invalid_api_key`, `database_unreachable`).
    #[schema(required = true)]
    code: Option<&'a str>,
    /// The same, in the OpenAI API's shape.
    error: OpenAiError<'a>,
}

/// The error's fields as the OpenAI API nests them.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiError)]
pub struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    /// As `param` above.
    #[schema(schema_with = super::openapi::null, required = true)]
    param: Option<&'a str>,
    #[schema(required = true)]
    code: Option<&'a str>,
}

impl<'a> ErrorBody<'a> {
    fn new(kind: &'a str, code: Option<&'a str>, message: &'a str) -> Self {
        ErrorBody {
            object: "error",
            message,
            kind,
            param: None,
            code,
            error: OpenAiError {
                message,
                kind,
                param: None,
                code,
            },
        }
    }

    /// Naming the request's field at fault.
    fn with_param(mut self, param: Option<&'a str>) -> Self {
        self.param = param;
        self.error.param = param;
        self
    }

    /// The JSON serde makes of it, written here so that the four fields the two shapes share
    /// are escaped once, not twice: every denial is answered with one, and the message is the
    /// longest field. (A test compares the two.)
    fn to_json(&self) -> Vec<u8> {
        fn text(out: &mut Vec<u8>, s: &str) {
            serde_json::to_writer(out, s).expect("a string serialises");
        }
        let e = &self.error;
        let mut shared = Vec::with_capacity(e.message.len() + 96);
        shared.extend_from_slice(b"\"message\":");
        text(&mut shared, e.message);
        shared.extend_from_slice(b",\"type\":");
        text(&mut shared, e.kind);
        shared.extend_from_slice(b",\"param\":");
        match e.param {
            Some(param) => text(&mut shared, param),
            None => shared.extend_from_slice(b"null"),
        }
        shared.extend_from_slice(b",\"code\":");
        match e.code {
            Some(code) => text(&mut shared, code),
            None => shared.extend_from_slice(b"null"),
        }
        let mut out = Vec::with_capacity(2 * shared.len() + 32);
        out.extend_from_slice(b"{\"object\":");
        text(&mut out, self.object);
        out.push(b',');
        out.extend_from_slice(&shared);
        out.extend_from_slice(b",\"error\":{");
        out.extend_from_slice(&shared);
        out.extend_from_slice(b"}}");
        out
    }
}

fn body(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    answer(status, ErrorBody::new(kind, code, message))
}

fn answer(status: StatusCode, body: ErrorBody) -> Response {
    let json = body.to_json();
    let mut response = Response::new(axum::body::Body::from(json));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// Appends "1 request per second", "500000 tokens per minute", ... to `out`: written piece by
/// piece, without `fmt`, since every denial says it.
fn describe(denial: &Denial, out: &mut String) {
    let v = denial.limit_value;
    let one = v == 1.0;
    let (unit, of_model) = match denial.limit {
        LimitName::RequestsPerSecond if one => ("request per second", false),
        LimitName::RequestsPerSecond => ("requests per second", false),
        LimitName::TokensPerMinute | LimitName::ModelTokensPerMinute => ("tokens per minute", true),
        LimitName::TokensPerMonth | LimitName::ModelTokensPerMonth => ("tokens per month", true),
        LimitName::ConcurrentRequests if one => ("concurrent request", false),
        LimitName::ConcurrentRequests => ("concurrent requests", false),
        LimitName::KeyRequestsPerSecond if one => ("request per second for this API key", false),
        LimitName::KeyRequestsPerSecond => ("requests per second for this API key", false),
        LimitName::KeyTokensPerMinute => ("tokens per minute for this API key", false),
        LimitName::KeyTokensPerMonth => ("tokens per month for this API key", false),
    };
    headers::push_number(out, v);
    out.push(' ');
    out.push_str(unit);
    if let Some(model) = denial.model.as_deref().filter(|_| of_model) {
        out.push_str(" for model '");
        out.push_str(model);
        out.push('\'');
    }
}

/// Names every denial sets, as constants: a name given as text is parsed and checked on each use.
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

fn denial_response(denial: &Denial, budget: bool, short: Option<Shortfall>) -> Response {
    let (limit, kind, mut message) = denial_message(denial, budget);
    if let (DenialKind::QuotaExceeded, Some(s)) = (denial.kind, short) {
        s.explain(&mut message);
    }
    let mut response = body(StatusCode::TOO_MANY_REQUESTS, kind, Some(limit), &message);
    let h = response.headers_mut();
    if denial.kind != DenialKind::RequestTooLarge {
        let secs = denial.retry_after.div_ceil(NANOS_PER_SEC).max(1);
        let ms = denial.retry_after.div_ceil(1_000_000).max(1);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
    }
    if matches!(
        denial.kind,
        DenialKind::QuotaExceeded | DenialKind::RequestTooLarge
    ) {
        h.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    response
}

/// A month's quota that denied a request though some of it is left: the request's estimate is
/// more than what is left (a client told only "quota exceeded" with 61 tokens left could not
/// tell why, nor that a smaller request would fit: an outside audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// The tokens the request would reserve.
    pub needed: u64,
    /// What is left of the quota that denied it.
    pub left: u64,
}

impl Shortfall {
    /// Says so in a quota's message, before when it renews.
    fn explain(self, message: &mut String) {
        if let Some(at) = message.find(" It renews in") {
            let Shortfall { needed, left } = self;
            let why = format!(
                " This request's estimate, {needed} tokens, is more than the {left} left: a smaller request (a shorter prompt or a lower max_tokens) may still fit."
            );
            message.insert_str(at, &why);
        }
    }
}

/// A denial's code: the limit that denied it, or the workspace's own budget (`budget`) for it
/// or for its model. The answer, the access log and the metrics all name it so.
pub fn denial_code(denial: &Denial, budget: bool) -> &'static str {
    match (budget, denial.model.is_some()) {
        (true, false) => "workspace_budget",
        (true, true) => "model_budget",
        (false, _) => denial.limit.as_str(),
    }
}

/// A denial's code (the limit), type and message.
fn denial_message(denial: &Denial, budget: bool) -> (&'static str, &'static str, String) {
    let limit = denial_code(denial, budget);
    let wait = || headers::duration(denial.retry_after);
    let what = || {
        let mut what = String::with_capacity(48);
        describe(denial, &mut what);
        what
    };
    let (kind, message) = match denial.kind {
        DenialKind::QuotaExceeded if budget => (
            "quota_exceeded",
            format!(
                "Monthly budget reached: {} ({limit}), the cap this workspace set for itself. It renews in {wait}, at the start of next month (UTC); raise or clear it with PUT /v1/budget to continue sooner.",
                what(),
                wait = wait()
            ),
        ),
        DenialKind::RateLimited => {
            // The denial that comes in floods: written without `fmt`.
            let mut message = String::with_capacity(96);
            message.push_str("Rate limit exceeded: ");
            describe(denial, &mut message);
            message.push_str(" (");
            message.push_str(limit);
            message.push_str("). Retry in ");
            headers::push_duration(denial.retry_after, &mut message);
            message.push('.');
            ("rate_limited", message)
        }
        DenialKind::QuotaExceeded if denial.limit == LimitName::KeyTokensPerMonth => (
            "quota_exceeded",
            format!(
                "Monthly quota of this API key exceeded: {} ({limit}). It renews in {wait}, at the start of next month (UTC); the workspace's other keys are not affected, and the operator can raise this key's limit.",
                what(),
                wait = wait()
            ),
        ),
        // A model's own quota is the operator's to raise: an increase request asks for the
        // workspace's limits only.
        DenialKind::QuotaExceeded if denial.limit == LimitName::ModelTokensPerMonth => (
            "quota_exceeded",
            format!(
                "Monthly quota exceeded: {} ({limit}). It renews in {wait}, at the start of next month (UTC); the workspace's other models are not affected, and the operator can raise this model's limit.",
                what(),
                wait = wait()
            ),
        ),
        DenialKind::QuotaExceeded => (
            "quota_exceeded",
            format!(
                "Monthly quota exceeded: {} ({limit}). It renews in {wait}, at the start of next month (UTC); ask for an increase to continue sooner.",
                what(),
                wait = wait()
            ),
        ),
        // The workspace's own cap: its to raise, not the operator's (an outside audit).
        DenialKind::RequestTooLarge if budget => (
            "request_too_large",
            format!(
                "This request can never fit: its prompt alone exceeds {} ({limit}), the cap this workspace set for itself. Send a smaller request, or raise or clear the cap with PUT /v1/budget; retrying will not help.",
                what()
            ),
        ),
        // A key's own limits are the operator's to set: an increase request does not reach them
        // (an outside audit).
        DenialKind::RequestTooLarge
            if matches!(
                denial.limit,
                LimitName::KeyTokensPerMinute | LimitName::KeyTokensPerMonth
            ) =>
        {
            (
                "request_too_large",
                format!(
                    "This request can never fit: its prompt alone exceeds the limit of {} ({limit}). Send a smaller request, or ask the operator to raise this key's limit; retrying will not help.",
                    what()
                ),
            )
        }
        DenialKind::RequestTooLarge => (
            "request_too_large",
            format!(
                "This request can never fit: its prompt alone exceeds the limit of {} ({limit}). Send a smaller request or ask for an increase; retrying will not help.",
                what()
            ),
        ),
        // Not the workspace's limit: the part of it this instance enforces on its own while
        // the shared limiter does not answer (an outside audit: a month share used up was
        // answered "quota exceeded, renews next month", and a prompt above a share's capacity
        // "can never fit", both with x-should-retry: false, at 10% of the month's quota).
        DenialKind::ShareUsedUp => (
            "rate_limited",
            format!(
                "The shared limiter is unavailable, and this gateway instance's share of the workspace's limit, {} ({limit}), cannot take this request; the workspace's limit itself may have room. Retry in {wait}.",
                what(),
                wait = wait()
            ),
        ),
    };
    (limit, kind, message)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The message of `Display`, made only for the answers that show it.
        let msg = || self.to_string();
        match &self {
            ApiError::Unauthorized(_) => {
                let mut r = body(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    Some("invalid_api_key"),
                    &msg(),
                );
                r.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::Forbidden(_) | ApiError::AdminDisabled => {
                body(StatusCode::FORBIDDEN, "permission_error", None, &msg())
            }
            ApiError::BadRequest(_) => {
                body(StatusCode::BAD_REQUEST, "invalid_request_error", None, &msg())
            }
            ApiError::Refused(r) => answer(
                StatusCode::BAD_REQUEST,
                ErrorBody::new("invalid_request_error", None, &r.message).with_param(r.param),
            ),
            ApiError::NotFound(_) => body(StatusCode::NOT_FOUND, "not_found", None, &msg()),
            ApiError::MethodNotAllowed(_) => body(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
                &msg(),
            ),
            ApiError::Conflict(_) => body(StatusCode::CONFLICT, "conflict", None, &msg()),
            ApiError::TooManyChanges {
                retry_after_secs, ..
            } => {
                let mut r = body(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    Some("workspace_changes"),
                    &msg(),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                r
            }
            ApiError::PayloadTooLarge(_) => body(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                None,
                &msg(),
            ),
            ApiError::RequestTimeout(_) => {
                let mut r = body(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    None,
                    &msg(),
                );
                // The rest of the body may still come: the connection cannot be reused.
                r.headers_mut()
                    .insert("connection", HeaderValue::from_static("close"));
                r
            }
            ApiError::Denied(d, budget, short) => denial_response(d, *budget, *short),
            ApiError::UpstreamUnreachable => body(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "The upstream API could not be reached or refused the gateway. Nothing was charged; retry later.",
            ),
            ApiError::UpstreamTimeout => body(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                None,
                "The upstream API did not answer in time. Nothing was charged; retry later.",
            ),
            ApiError::UpstreamIncomplete { timed_out, charged } => {
                let (status, kind, what) = if *timed_out {
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "did not finish its answer in time",
                    )
                } else {
                    (
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        "broke off its answer",
                    )
                };
                body(
                    status,
                    kind,
                    Some("upstream_incomplete"),
                    &format!(
                        "The upstream API {what}. It may have done the work, so this request was charged its estimate: {charged} tokens. Retry later."
                    ),
                )
            }
            ApiError::Unavailable => body(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                "The gateway cannot serve this request right now; retry later.",
            ),
            ApiError::LimiterUnavailable => {
                let mut r = body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    Some("limiter_unavailable"),
                    "The rate limiter cannot be reached, so the request was not sent; nothing was charged. Retry shortly.",
                );
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
                r
            }
            ApiError::StoreUnreachable => body(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("database_unreachable"),
                "The gateway's database cannot be reached, so nothing was changed. Retry later.",
            ),
            ApiError::StoreUncertain => {
                let mut r = body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    Some("database_unreachable"),
                    "The gateway lost its database while saving this change, so it may or may not have been saved. Check before trying again.",
                );
                // Sent again as it is, a creation could be made twice.
                r.headers_mut()
                    .insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
                r
            }
            ApiError::Internal => body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                None,
                "Internal error.",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorBody;
    use crate::limiter::{Denial, DenialKind, LimitName};

    /// The denials' messages, written piece by piece, read as the `format!`s before them wrote
    /// them: every limit's wording, one and many, fractions, models only on token limits.
    #[test]
    fn denial_messages_read_as_they_did() {
        let ms = 1_000_000;
        let denial = |kind, limit, model: Option<&str>, limit_value, retry_after| Denial {
            kind,
            limit,
            model: model.map(str::to_string),
            limit_value,
            retry_after,
        };
        use DenialKind::{QuotaExceeded, RateLimited, RequestTooLarge};
        use LimitName::*;
        let cases = [
            (denial(RateLimited, RequestsPerSecond, None, 1.0, 1000 * ms), false,
             "Rate limit exceeded: 1 request per second (requests_per_second). Retry in 1s."),
            (denial(RateLimited, RequestsPerSecond, None, 0.5, 250 * ms), false,
             "Rate limit exceeded: 0.5 requests per second (requests_per_second). Retry in 250ms."),
            (denial(RateLimited, ModelTokensPerMinute, Some("m-1"), 500_000.0, 360_000 * ms), false,
             "Rate limit exceeded: 500000 tokens per minute for model 'm-1' (model_tokens_per_minute). Retry in 6m0s."),
            (denial(RateLimited, TokensPerMinute, None, 1.0, 1500 * ms), false,
             "Rate limit exceeded: 1 tokens per minute (tokens_per_minute). Retry in 1.5s."),
            (denial(RateLimited, ConcurrentRequests, None, 1.0, ms), false,
             "Rate limit exceeded: 1 concurrent request (concurrent_requests). Retry in 1ms."),
            (denial(RateLimited, ConcurrentRequests, None, 4.0, ms), false,
             "Rate limit exceeded: 4 concurrent requests (concurrent_requests). Retry in 1ms."),
            (denial(RateLimited, KeyRequestsPerSecond, None, 1.0, ms), false,
             "Rate limit exceeded: 1 request per second for this API key (key_requests_per_second). Retry in 1ms."),
            (denial(RateLimited, KeyRequestsPerSecond, None, 2.5, ms), false,
             "Rate limit exceeded: 2.5 requests per second for this API key (key_requests_per_second). Retry in 1ms."),
            (denial(RateLimited, KeyTokensPerMinute, None, 100.0, ms), false,
             "Rate limit exceeded: 100 tokens per minute for this API key (key_tokens_per_minute). Retry in 1ms."),
            (denial(QuotaExceeded, TokensPerMonth, None, 100.0, 3_600_000 * ms), false,
             "Monthly quota exceeded: 100 tokens per month (tokens_per_month). It renews in 1h0m0s, at the start of next month (UTC); ask for an increase to continue sooner."),
            (denial(QuotaExceeded, ModelTokensPerMonth, Some("m"), 7.0, 1000 * ms), true,
             "Monthly budget reached: 7 tokens per month for model 'm' (model_budget), the cap this workspace set for itself. It renews in 1s, at the start of next month (UTC); raise or clear it with PUT /v1/budget to continue sooner."),
            (denial(QuotaExceeded, ModelTokensPerMonth, Some("m"), 7.0, 1000 * ms), false,
             "Monthly quota exceeded: 7 tokens per month for model 'm' (model_tokens_per_month). It renews in 1s, at the start of next month (UTC); the workspace's other models are not affected, and the operator can raise this model's limit."),
            (denial(QuotaExceeded, KeyTokensPerMonth, None, 9.0, 1000 * ms), false,
             "Monthly quota of this API key exceeded: 9 tokens per month for this API key (key_tokens_per_month). It renews in 1s, at the start of next month (UTC); the workspace's other keys are not affected, and the operator can raise this key's limit."),
            (denial(RequestTooLarge, TokensPerMinute, Some("m"), 10.0, 0), false,
             "This request can never fit: its prompt alone exceeds the limit of 10 tokens per minute for model 'm' (tokens_per_minute). Send a smaller request or ask for an increase; retrying will not help."),
            (denial(RequestTooLarge, TokensPerMonth, None, 50.0, 0), true,
             "This request can never fit: its prompt alone exceeds 50 tokens per month (workspace_budget), the cap this workspace set for itself. Send a smaller request, or raise or clear the cap with PUT /v1/budget; retrying will not help."),
        ];
        for (denial, budget, expected) in cases {
            assert_eq!(super::denial_message(&denial, budget).2, expected);
        }
    }

    /// A quota denial with some of the quota left says what the request needed and what is
    /// left; a rate limit's message is left as it is.
    #[tokio::test]
    async fn a_quota_with_something_left_says_what_the_request_needed() {
        let short = Some(super::Shortfall {
            needed: 268,
            left: 61,
        });
        let quota = Denial {
            kind: DenialKind::QuotaExceeded,
            limit: LimitName::TokensPerMonth,
            model: None,
            limit_value: 100.0,
            retry_after: 1_000_000_000,
        };
        let answer = super::denial_response(&quota, false, short);
        let body = axum::body::to_bytes(answer.into_body(), 4096)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["message"],
            "Monthly quota exceeded: 100 tokens per month (tokens_per_month). This request's estimate, 268 tokens, is more than the 61 left: a smaller request (a shorter prompt or a lower max_tokens) may still fit. It renews in 1s, at the start of next month (UTC); ask for an increase to continue sooner."
        );
        let rate = Denial {
            kind: DenialKind::RateLimited,
            limit: LimitName::TokensPerMinute,
            ..quota
        };
        let answer = super::denial_response(&rate, false, short);
        let body = axum::body::to_bytes(answer.into_body(), 4096)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("estimate"));
    }

    /// The body written by hand is the one serde makes of `ErrorBody` (the OpenAPI document's
    /// `Error` schema), byte for byte: with and without a code, with text that must be escaped.
    #[test]
    fn the_error_body_is_what_its_schema_serialises() {
        for (kind, code, message, param) in [
            (
                "rate_limited",
                Some("requests_per_second"),
                "Rate limit exceeded: 1 request per second (requests_per_second). Retry in 1s.",
                None,
            ),
            (
                "not_found",
                None,
                "No route for GET /v1/\"odd\"\\path\u{7}\n….",
                None,
            ),
            ("", Some(""), "", None),
            (
                "invalid_request_error",
                None,
                "'messages' must be an array",
                Some("messages"),
            ),
        ] {
            let body = ErrorBody::new(kind, code, message).with_param(param);
            let by_hand = String::from_utf8(body.to_json()).unwrap();
            assert_eq!(by_hand, serde_json::to_string(&body).unwrap());
            let v: serde_json::Value = serde_json::from_str(&by_hand).unwrap();
            assert_eq!(v["error"]["message"], message);
            assert_eq!(v["message"], message);
            assert_eq!(v["param"].as_str(), param);
            assert_eq!(v["error"]["param"].as_str(), param);
        }
    }
}
