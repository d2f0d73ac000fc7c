//! The proxy: authenticate, normalise the path, read and inspect the body, reserve, forward,
//! settle.
//!
//! Metered routes (`POST` on `/v1/chat/completions`, `/v1/completions`, `/v1/fim/completions`,
//! `/v1/embeddings`, `/v1/responses`) reserve an estimate of their tokens; every other `/v1/*`
//! route is passed through as a request that reserves no tokens but is still settled from the
//! usage in its answer when there is one, so no route escapes the token limits. Usage is read by
//! `crate::upstream_usage`, wherever the known APIs put it.
//!
//! What reaches the upstream is what was metered: the path is normalised before it is matched
//! (percent-decoding, empty and dot segments; see `normalise_path`) and the normalised path is
//! forwarded, never the raw one; redirects are not followed (the client gets the 3xx); the
//! client's key and the headers of the deny-list (`upstream.drop_request_headers`, e.g.
//! `OpenAI-Organization`) are not forwarded.
//!
//! Settlement happens exactly once per admitted request, through `Settlement`:
//! - a JSON answer is read whole and settled to its `usage` (the estimate when it has none);
//! - a stream is passed on event by event and settled when it ends, from the usage chunk; the
//!   usage-only chunk the gateway asked for on the client's behalf is removed;
//! - an upstream that fails before producing anything (unreachable, timeout, its own 429/4xx/5xx)
//!   is refunded;
//! - a stream that breaks, or whose client goes away, is never refunded once it has delivered
//!   something: the gateway keeps reading for up to `upstream.usage_drain_ms` to learn the real
//!   usage, else settles the estimate. Dropping a `Settlement` without finishing it settles the
//!   estimate.
//!
//! No upstream body may stall the gateway: a body silent for `upstream.idle_read_timeout_ms`
//! is given up (as is a JSON or error body not whole by `upstream.timeout_secs`). A stream then
//! ends broken for the client and is settled as one that broke (refunded only if it had
//! delivered nothing); an error body is answered `504` and refunded; a JSON body is answered
//! `504` (or `502` when it broke) and charged its estimate, and the message says so.
//!
//! Every settlement, and every drain after a client left, runs as a task of the gateway's
//! `TaskTracker` (`AppState::tasks`): a stop waits for them before the last ledger flush.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use super::upstream::UpstreamBody;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Future, FutureExt, Stream, StreamExt};

use super::error::{ApiError, Shortfall};
use super::{authenticate, headers};
use crate::app::AppState;
use crate::catalog::Authenticated;
use crate::config::Unmetered;
use crate::estimate::{inspect, Endpoint, Observed, RequestInfo};
use crate::limiter::{Decision, DenialKind, LimitName, LimiterError, Reservation, TokenCost};
use crate::metrics::{Metrics, ProxiedRequest, Route};
use crate::model::{KeyId, Limits};
use crate::upstream_usage::{usage_of_json, JsonTail, SseScanner, UsageJson};
use crate::usage::{settled_record, Deferred, ShadowMark, Tokens, UsageRecord};

pub async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    #[cfg(feature = "otel")]
    {
        use tracing::Instrument;
        let span = super::otel::request_span(request.headers(), request.uri().path());
        let response = handle(state, request).instrument(span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        response
    }
    #[cfg(not(feature = "otel"))]
    handle(state, request).await
}

async fn handle(state: Arc<AppState>, request: Request) -> Response {
    let mut seen = state.metrics.proxied();
    let (parts, body) = request.into_parts();
    let request_id = RequestId::new();
    // The id the answer and the log show: the client's own when it sent a valid one. Nothing is
    // keyed on it (the ledger's idempotency key is the reservation's), so a client that reuses
    // an id loses nothing.
    let shown_id = client_request_id(&parts.headers);
    // The metered route of the path as sent; `forward` names it again from the normalised path.
    let endpoint = Endpoint::of_path(parts.uri.path());
    // Only a `POST` is metered: another method on a metered path is `other`, as in the metrics.
    let metered = parts.method == Method::POST;
    let mut access = state.config.access_log.then(|| {
        Box::new(AccessLine {
            start: seen.started(),
            route: match metered {
                true => endpoint.map_or("other", Endpoint::path),
                false => "other",
            },
            workspace: None,
            key: None,
            client_id: shown_id.clone(),
            gateway_id: request_id,
            decision: "unauthenticated",
            limit: None,
            tokens: 0,
            left_at: None,
            written: false,
        })
    });
    let mut response = match authenticate(&state, &parts.headers).await {
        Err(e) => {
            if metered {
                seen.set_route(Route::of(endpoint));
            }
            // An expired key or a suspended workspace: the workspace is known, and so its tier.
            if matches!(e, ApiError::Forbidden(_)) {
                let secret = super::bearer(&parts.headers).unwrap_or_default();
                if let Some((key, workspace, tier)) = state.catalog.owner_of_key(secret) {
                    seen.set_tier(&tier);
                    if let Some(a) = access.as_mut() {
                        a.workspace = Some(workspace);
                        a.key = Some(key);
                        a.decision = "rejected";
                    }
                }
            }
            refused_unread(e.into_response(), body).await
        }
        Ok(caller) => {
            if let Some(a) = access.as_mut() {
                a.workspace = Some(caller.workspace.workspace.id);
                a.key = Some(caller.key);
                a.decision = "rejected";
            }
            seen.set_tier(&caller.workspace.workspace.tier);
            if !forwarded_method(&parts.method) {
                refused_unread(refused_method(&parts.method), body).await
            } else {
                match forward(
                    &state,
                    parts,
                    body,
                    caller,
                    request_id,
                    &mut access,
                    &mut seen,
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => e.into_response(),
                }
            }
        }
    };
    // The upstream's own id, which its support asks for, is passed on under a name of its own.
    if let Some(upstream_id) = response.headers_mut().insert(
        X_REQUEST_ID,
        shown_id.unwrap_or_else(|| request_id.header_value()),
    ) {
        response
            .headers_mut()
            .insert(X_UPSTREAM_REQUEST_ID, upstream_id);
    }
    seen.answered(response.status().as_u16());
    // A stream's line is written when it is settled (it took `access`); any other now.
    if let Some(mut a) = access {
        a.write(response.status().as_u16());
    }
    response
}

/// The methods passed on: those of HTTP's semantics (RFC 9110) that an API uses. `TRACE` (and
/// `TRACK`) would have whatever echoes requests upstream send back the request as the gateway
/// sent it, with the upstream's key in it; `CONNECT` and made-up methods have no meaning for an
/// API.
fn forwarded_method(method: &Method) -> bool {
    FORWARDED.contains(method)
}

const FORWARDED: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The `405` for a method not passed on (to an authenticated caller; nothing is charged).
/// The most of a refused request's body read and dropped before its answer (`drain`).
const DRAIN_MAX: usize = 16 * 1024 * 1024;

/// Reads and drops what is left of the body of a request refused before its body was read, up
/// to `DRAIN_MAX` bytes and within the body's deadline (`TimedBody`): a proxy in front still
/// sending it (nginx, which sends the whole body first) otherwise had its write fail as the
/// connection closed with unread data, and answered its client `502` in place of the `401`,
/// `403` or `413` (an outside audit: 6 of 6 for a body over the limit). Whether it was read to
/// its end.
async fn drain(mut body: Body) -> bool {
    use http_body_util::BodyExt;
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        read += frame.data_ref().map_or(0, Bytes::len);
        if read > DRAIN_MAX {
            return false;
        }
    }
    true
}

/// `answer` to a request whose `body` was not read: after `drain`, and saying `Connection:
/// close` when the body was not read to its end (the connection then closes).
async fn refused_unread(mut answer: Response, body: Body) -> Response {
    if !drain(body).await {
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    answer
}

fn refused_method(method: &Method) -> Response {
    let mut response = ApiError::MethodNotAllowed(format!(
        "{method} is not passed on to the upstream; the methods are {FORWARDED_METHODS}."
    ))
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
    response
}

/// `FORWARDED`, as the `Allow` header lists them.
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Header names as constants: a name given as text is parsed and checked on each use (the first
/// is read and set on every request).
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
const X_RATELIMIT_SHADOW_DENIED: HeaderName = HeaderName::from_static("x-ratelimit-shadow-denied");

/// The client's `x-request-id` when it is one the gateway may echo and log: 1 to 128 characters
/// of `A-Z a-z 0-9 - _ . : / + = @`. Anything else is ignored and the gateway's own id is used.
fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let b = v.as_bytes();
    let valid = (1..=128).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@".contains(c));
    valid.then(|| v.clone())
}

/// One access-log line (`tiergate::access`, level info): who, what, how it ended, what it cost,
/// how long it took. No key, prompt or header value other than the request id is written.
struct AccessLine {
    start: Instant,
    /// The metered route's path, or `other`.
    route: &'static str,
    workspace: Option<i64>,
    key: Option<i64>,
    client_id: Option<HeaderValue>,
    gateway_id: RequestId,
    /// `unauthenticated`, `rejected` (known workspace, refused before a decision: bad input,
    /// suspended, limiter unavailable), `denied`, `admitted`.
    decision: &'static str,
    /// The limit that denied it.
    limit: Option<&'static str>,
    /// Tokens settled (the estimate where no usage came; 0 when refunded or denied).
    tokens: u64,
    /// When the client left before its answer was whole: the line's duration ends there, not
    /// when the gateway, reading on for the usage, settles (an outside audit: a client that left
    /// after 0.2 s logged the upstream's 1.8 s).
    left_at: Option<Instant>,
    written: bool,
}

/// The status an access line shows for a request whose client left before its answer (nginx's).
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A line not written by the time the request's future is dropped is a request whose client
/// left before its answer: it is written then, with `499`.
impl Drop for AccessLine {
    fn drop(&mut self) {
        if !self.written {
            self.write(CLIENT_CLOSED_REQUEST);
        }
    }
}

impl AccessLine {
    fn write(&mut self, status: u16) {
        self.written = true;
        let end = self.left_at.unwrap_or_else(Instant::now);
        let duration_ms = end.saturating_duration_since(self.start).as_secs_f64() * 1000.0;
        let client_id = self.client_id.as_ref().and_then(|v| v.to_str().ok());
        tracing::info!(
            target: "tiergate::access",
            request_id = client_id.unwrap_or(self.gateway_id.as_str()),
            gateway_request_id = client_id.map(|_| self.gateway_id.as_str()),
            workspace = self.workspace,
            key = self.key,
            route = self.route,
            status,
            decision = self.decision,
            limit = self.limit,
            tokens = self.tokens,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            "request"
        );
    }
}

/// A request's id: `req_` and 32 hex digits. The first 16 are drawn at random once per thread;
/// the last 16 are the thread's count of requests put through a bijection keyed by another
/// random draw, so ids are unique (two threads or two instances share a prefix with
/// probability 2^-64) and neither the count nor the next id can be read from them. An id is only
/// shown (`x-request-id`) and logged; nothing is keyed on it.
#[derive(Clone, Copy)]
struct RequestId([u8; 36]);

impl RequestId {
    fn new() -> RequestId {
        thread_local! {
            /// (prefix, key, count)
            static IDS: std::cell::Cell<(u64, u64, u64)> = std::cell::Cell::new({
                let mut seed = [0u8; 16];
                getrandom::fill(&mut seed).expect("the OS has randomness");
                let (prefix, key) = seed.split_at(8);
                (
                    u64::from_le_bytes(prefix.try_into().expect("8 bytes")),
                    u64::from_le_bytes(key.try_into().expect("8 bytes")),
                    0,
                )
            });
        }
        let (prefix, key, count) = IDS.with(|ids| {
            let (prefix, key, count) = ids.get();
            ids.set((prefix, key, count.wrapping_add(1)));
            (prefix, key, count)
        });
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = *b"req_00000000000000000000000000000000";
        for (i, n) in [prefix, scramble(count ^ key)].into_iter().enumerate() {
            for j in 0..16 {
                id[4 + 16 * i + j] = HEX[((n >> (60 - 4 * j)) & 0xf) as usize];
            }
        }
        RequestId(id)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII")
    }

    fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.0).expect("ASCII is a valid header value")
    }
}

/// SplitMix64's finaliser: a bijection of `u64` that scatters consecutive inputs.
fn scramble(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        drain(body).await;
        return Err(ApiError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if let Some(timeout) = super::BodyReadTimeout::find(&e) {
            return ApiError::RequestTimeout(timeout.as_millis() as u64);
        }
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(cause) = next {
            if cause.is::<http_body_util::LengthLimitError>() {
                return ApiError::PayloadTooLarge(limit);
            }
            next = cause.source();
        }
        // A body hyper could not read: a malformed chunk, or the client went away (and sees
        // no answer).
        ApiError::BadRequest("the request body could not be read".into())
    })
}

/// The path to match and to forward: each segment percent-decoded, empty (`//`, a trailing
/// `/`) and `.` segments dropped, `..` applied, then each segment percent-encoded again in one
/// canonical way. `Err` says what cannot be normalised: an invalid escape, a segment that is not
/// UTF-8, or that holds `/`, `\`, `;` or a control character once decoded (servers disagree on
/// what those mean), a `..` above the root, or a path that leaves `/v1/`.
/// A path already normal (nearly every request's) is borrowed, not copied.
pub fn normalise_path(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    normalise_segments(raw).map(Cow::Owned)
}

/// `normalise_path`'s work, segment by segment.
fn normalise_segments(raw: &str) -> Result<String, &'static str> {
    let mut segments: Vec<String> = Vec::new();
    for segment in raw.split('/') {
        let decoded = percent_decode(segment)?;
        if decoded.contains(['/', '\\', ';']) || decoded.chars().any(char::is_control) {
            return Err("a segment holds '/', '\\', ';' or a control character");
        }
        match decoded.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or("'..' climbs above the root")?;
            }
            _ => segments.push(decoded),
        }
    }
    if segments.len() < 2 || segments[0] != "v1" {
        return Err("it is not a route under /v1/");
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &segments {
        path.push('/');
        percent_encode(segment, &mut path);
    }
    Ok(path)
}

/// Whether `raw` is already what `normalise_path` makes of it (nearly every request): under
/// `/v1/`, every segment non-empty, neither `.` nor `..`, and made only of bytes that
/// `percent_encode` leaves as they are (so no `%`, `\\`, `;` or control character either).
fn is_normal(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix("/v1/") else {
        return false;
    };
    rest.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b))
    })
}

fn percent_decode(segment: &str) -> Result<String, &'static str> {
    if !segment.contains('%') {
        return Ok(segment.to_string());
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("an incomplete '%' escape")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "an invalid '%' escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "an invalid '%' escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a segment that is not UTF-8 once decoded")
}

/// Appends `segment` with every byte but the unreserved ones and `!$&'()*+,=:@` escaped.
fn percent_encode(segment: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in segment.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
}

/// The request as it will be sent, with what the gateway learnt from it.
struct Prepared {
    /// The metered route, if it is one.
    endpoint: Option<Endpoint>,
    /// The normalised path to forward, when it is not a metered route (whose own spelling is
    /// forwarded, and which leaves this empty).
    path: String,
    body: Bytes,
    info: Option<RequestInfo>,
    /// The gateway asks for stream usage on the client's behalf (the body is changed only once
    /// the request is admitted), and removes the usage-only chunk.
    strip_usage_chunk: bool,
}

/// The routes off the metered ones forwarded by default (`Unmetered::Stateless`): their answer
/// comes from the request alone, and nothing a client sends is kept at the upstream for later.
/// Elsewhere an upstream keeps what is sent (files, batches, fine-tunes, assistants, threads,
/// vector stores, stored completions and responses, agents, libraries) under the gateway's one
/// account, where any workspace could list, read or delete another's.
pub const STATELESS_ROUTES: [&str; 13] = [
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/classifications",
    "/v1/chat/classifications",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/rerank",
    "/v1/ocr",
    "/v1/agents/completions",
];

/// Whether `method path` is one of the routes that keep nothing at the upstream: a `POST` of
/// `STATELESS_ROUTES`, or a read of the model catalogue (`/v1/models`, `/v1/models/ID`) without
/// a body.
fn keeps_nothing(method: &Method, path: &str, body: &[u8]) -> bool {
    if method == Method::POST {
        return STATELESS_ROUTES.contains(&path);
    }
    let read = [Method::GET, Method::HEAD].contains(method) && body.is_empty();
    let model = path.strip_prefix("/v1/models").is_some_and(|rest| {
        rest.is_empty() || rest.strip_prefix('/').is_some_and(|id| !id.is_empty())
    });
    read && model
}

fn prepare(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    path: Cow<'_, str>,
    body: Bytes,
) -> Result<Prepared, ApiError> {
    let endpoint = match Endpoint::of_path(&path) {
        Some(e) if method == Method::POST => e,
        _ => {
            // Off the metered routes nothing is reserved: an operator may keep them from the
            // upstream (an outside audit took 200 times a month quota through one such route,
            // with requests sent at once while 1 token of it was left).
            const METERED: &str = "POST /v1/chat/completions, /v1/completions, \
                                   /v1/fim/completions, /v1/embeddings, /v1/responses";
            let (allowed, forwards) = match state.config.upstream.unmetered {
                Unmetered::All => (true, ""),
                Unmetered::Stateless => (
                    keeps_nothing(method, &path, &body),
                    "and, elsewhere under /v1/, only the routes that keep nothing at the \
                     upstream, whose account every workspace shares (GET /v1/models; POST \
                     moderations, classifications, audio, images, rerank, ocr and \
                     agents/completions)",
                ),
                // A read with a body is not one: an upstream may run it as what the body asks.
                Unmetered::Reads => (
                    [Method::GET, Method::HEAD, Method::OPTIONS].contains(method)
                        && body.is_empty(),
                    "and GET, HEAD and OPTIONS without a body elsewhere under /v1/",
                ),
                Unmetered::None => (false, "only"),
            };
            if !allowed {
                return Err(ApiError::Forbidden(format!(
                    "{method} {path} is not passed on by this gateway: it forwards the metered \
                     routes ({METERED}) {forwards}."
                )));
            }
            return Ok(Prepared {
                endpoint: None,
                path: path.into_owned(),
                body,
                info: None,
                strip_usage_chunk: false,
            });
        }
    };
    // A metered body is read as it came: one the upstream would read otherwise (a
    // `Content-Encoding` it would undo first) could ask for what its estimate did not see (an
    // outside audit: `br` on plain JSON passed the checks and was forwarded so).
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(ApiError::Refused(crate::estimate::Refused {
            param: None,
            message: "a compressed request body (Content-Encoding) is not taken on this route: \
                      send it uncompressed"
                .into(),
        }));
    }
    let info = inspect(endpoint, &body, state.config.estimate.max_tokens_limit)
        .map_err(ApiError::Refused)?;
    let ask_usage = info.stream
        && !info.client_wants_usage
        && endpoint.takes_stream_options()
        && state.config.upstream.request_stream_usage;
    Ok(Prepared {
        endpoint: Some(endpoint),
        path: String::new(),
        body,
        info: Some(info),
        strip_usage_chunk: ask_usage,
    })
}

async fn forward(
    state: &Arc<AppState>,
    parts: axum::http::request::Parts,
    body: Body,
    caller: Authenticated,
    request_id: RequestId,
    access: &mut Option<Box<AccessLine>>,
    seen: &mut ProxiedRequest<'_>,
) -> Result<Response, ApiError> {
    let path = normalise_path(parts.uri.path()).map_err(|m| {
        ApiError::BadRequest(format!("The request path cannot be normalised: {m}."))
    })?;
    if parts.method == Method::POST {
        let endpoint = Endpoint::of_path(&path);
        seen.set_route(Route::of(endpoint));
        if let Some(a) = access.as_mut() {
            a.route = endpoint.map_or("other", Endpoint::path);
        }
    }
    let body = seen.waiting(read_body(state, &parts.headers, body)).await?;
    let mut prepared = prepare(state, &parts.method, &parts.headers, path, body)?;
    // The workspace's limits, with the key's own when it has some (an allocation only then).
    let limits = caller.limits();
    let Authenticated { key, workspace, .. } = caller;
    let ws_id = workspace.workspace.id;
    let cost = match &prepared.info {
        Some(info) => state.estimator.estimate(ws_id, info),
        None => TokenCost::default(),
    };
    let model = prepared.info.as_mut().and_then(|i| i.model.take());
    let now = state.clock.now();
    let decision = state
        .limiter
        .reserve(ws_id, &limits, model.as_deref(), cost, now)
        .await
        .map_err(|e| {
            Metrics::inc(&state.metrics.limiter_errors);
            Metrics::inc(&state.metrics.undecided);
            tracing::debug!(error = %e, "no decision");
            match e {
                LimiterError::Unavailable(_) => ApiError::LimiterUnavailable,
                LimiterError::Ledger(_) => ApiError::Unavailable,
            }
        })?;
    let (reservation, snapshot) = match decision {
        Decision::Admit {
            reservation,
            snapshot,
        } => (reservation, snapshot),
        Decision::Deny { denial, snapshot } => {
            state
                .recorder
                .record_denied(ws_id, key, now, model.unwrap_or_default());
            let budget = match denial.limit {
                LimitName::TokensPerMonth => workspace.budget.workspace,
                LimitName::ModelTokensPerMonth => denial
                    .model
                    .as_deref()
                    .is_some_and(|m| workspace.budget.models.iter().any(|b| b == m)),
                _ => false,
            };
            // Counted and logged under the code the answer gives: a budget's is not the quota's.
            if let Some(a) = access.as_mut() {
                a.decision = "denied";
                a.limit = Some(super::error::denial_code(&denial, budget));
            }
            if budget {
                state
                    .metrics
                    .denied_by_budget(denial.model.is_some(), denial.kind);
            } else {
                state.metrics.denied(denial.limit, denial.kind);
            }
            // A month's quota with something left: the request asked more than that.
            let short = snapshot
                .month
                .filter(|w| {
                    denial.kind == DenialKind::QuotaExceeded
                        && w.limit == denial.limit_value
                        && w.remaining > 0
                })
                .map(|w| Shortfall {
                    needed: cost.estimate,
                    left: w.remaining,
                });
            let denied = ApiError::Denied(Box::new(denial), budget, short);
            let mut response = denied.into_response();
            let families = state.config.rate_limit_headers;
            headers::apply(families, &snapshot, now, response.headers_mut());
            return Ok(response);
        }
    };
    if let Some(a) = access.as_mut() {
        a.decision = "admitted";
    }
    Metrics::inc(&state.metrics.admitted);
    let route = seen.route();
    state
        .metrics
        .tokens_estimated(route, reservation.held.tokens);
    if prepared.strip_usage_chunk {
        prepared.body = Bytes::from(crate::stream_options::with_include_usage(&prepared.body));
    }
    // Made at once, so that a client that leaves from here on leaves nothing held: until the
    // request is sent, dropping the settlement refunds it.
    let shadow_model = workspace.shadow.as_ref().and(model.clone());
    let mut settlement = Settlement {
        state: state.clone(),
        reservation: Some(reservation),
        limits,
        key,
        request_id,
        route,
        model: model.unwrap_or_default(),
        choices: prepared.info.as_ref().map_or(1, |i| i.choices),
        prompt_estimate: prepared.info.as_ref().map_or(0, |i| i.prompt_tokens),
        max_tokens: prepared.info.as_ref().and_then(|i| i.max_tokens),
        access: None,
        shadow: None,
        sent: false,
    };
    // The limits in shadow decide only once the enforced ones admitted (see `shadow`).
    if let Some(limits) = &workspace.shadow {
        settlement.shadow = shadow_decision(
            state,
            ws_id,
            key,
            limits,
            shadow_model.as_deref(),
            cost,
            now,
            request_id,
        )
        .await
        .map(|(reservation, denied)| ShadowHold {
            reservation,
            limits: limits.clone(),
            denied,
        });
    }
    let shadow_denied = settlement.shadow.as_ref().and_then(|s| s.denied);
    let held = settlement.estimate();
    let mut response = match send(state, parts, prepared, settlement, access, seen).await {
        Ok(response) => response,
        // The upstream unreachable, silent, or refusing the gateway's key: refunded (an
        // outside audit saw its headers show the estimate as taken).
        Err(e @ (ApiError::UpstreamUnreachable | ApiError::UpstreamTimeout)) => {
            let mut response = e.into_response();
            response
                .extensions_mut()
                .insert(Settled { held, charged: 0 });
            response
        }
        Err(e) => e.into_response(),
    };
    // An answer settled before it leaves shows what is left after its own cost, as its
    // `x-ratelimit-tokens-query-cost` says it (it showed what its estimate left).
    let snapshot = match response.extensions_mut().remove::<Settled>() {
        Some(Settled { held, charged }) => snapshot.settled(held, charged),
        None => snapshot,
    };
    let families = state.config.rate_limit_headers;
    headers::apply(families, &snapshot, now, response.headers_mut());
    if let Some(limit) = shadow_denied {
        response.headers_mut().insert(
            X_RATELIMIT_SHADOW_DENIED,
            HeaderValue::from_static(limit.as_str()),
        );
    }
    Ok(response)
}

/// What an answer's settlement, done before it leaves, held and charged: its rate-limit
/// headers are of the limits after it (`Snapshot::settled`).
#[derive(Clone, Copy)]
struct Settled {
    held: u64,
    charged: u64,
}

/// What the limits in shadow hold for an admitted request.
struct ShadowHold {
    /// The shadow's reservation, when it admitted the request.
    reservation: Option<Reservation>,
    limits: Arc<Limits>,
    /// The limit in shadow that would have denied it.
    denied: Option<LimitName>,
}

/// The shadow limiter's decision for a request the enforced limits admitted: its reservation,
/// or the limit that would have denied it (counted and logged here); `None` when the shadow
/// limiter could not decide.
#[allow(clippy::too_many_arguments)]
async fn shadow_decision(
    state: &AppState,
    ws_id: crate::model::WorkspaceId,
    key: KeyId,
    limits: &Limits,
    model: Option<&str>,
    cost: TokenCost,
    now: crate::limiter::Nanos,
    request_id: RequestId,
) -> Option<(Option<Reservation>, Option<LimitName>)> {
    match state
        .shadow
        .reserve(ws_id, limits, model, cost, now)
        .await?
    {
        Decision::Admit { reservation, .. } => Some((Some(reservation), None)),
        Decision::Deny { denial, .. } => {
            state.metrics.shadow_denied(denial.limit);
            tracing::info!(
                workspace = ws_id,
                key,
                limit = denial.limit.as_str(),
                model = model.unwrap_or(""),
                request_id = request_id.as_str(),
                "shadow denial: a limit in shadow would have denied this request (admitted)"
            );
            Some((None, Some(denial.limit)))
        }
    }
}

/// Headers that belong to one hop, or that the gateway sets itself.
fn is_hop_or_gateway_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "authorization"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "accept-encoding"
            // The gateway answers `100 Continue` itself and sends the body whole.
            | "expect"
    )
}

fn is_hop_or_gateway_response_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "connection" | "keep-alive" | "transfer-encoding" | "trailer" | "upgrade"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("ratelimit")
}

/// Removes every header whose name `drop` picks. The names are gathered on the stack, a few at
/// a time (`HeaderMap` has no `retain`, and a `Vec` of them cost two allocations on every
/// request, for the hop headers alone).
/// Removes the headers that `Connection` names (RFC 9110, 7.6.1): they belong to the hop, like
/// `Connection` itself (removed with the other hop-by-hop headers). Nearly every `Connection`
/// says `keep-alive` or `close`, which name no other header: then nothing is allocated.
fn remove_connection_options(headers: &mut HeaderMap) {
    let mut named = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for option in value.split(',').map(str::trim) {
            if option.is_empty()
                || option.eq_ignore_ascii_case("close")
                || option.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(option.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
}

fn remove_where(headers: &mut HeaderMap, drop: impl Fn(&HeaderName) -> bool) {
    const AT_ONCE: usize = 8;
    loop {
        let mut names: [Option<HeaderName>; AT_ONCE] = Default::default();
        let mut found = 0;
        for name in headers.keys().filter(|name| drop(name)) {
            if found == AT_ONCE {
                break;
            }
            names[found] = Some(name.clone());
            found += 1;
        }
        for name in names.iter().flatten() {
            headers.remove(name);
        }
        if found < AT_ONCE {
            return;
        }
    }
}

/// Why an upstream body was not read whole.
enum ReadFailure {
    /// Silent for the idle-read timeout, or not whole by the deadline.
    TimedOut,
    Broke(hyper::Error),
}

/// The upstream's body as a stream of its data (trailers are not passed on).
fn data_stream(body: UpstreamBody) -> BoxStream<'static, Result<Bytes, hyper::Error>> {
    http_body_util::BodyDataStream::new(body).boxed()
}

/// Whether a failed upstream request ran out of time (connecting), rather than being refused.
fn timed_out(e: &super::upstream::ClientError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A (JSON or error) body read for its usage.
enum Read {
    Whole(Bytes),
    /// Larger than `upstream.max_buffered_bytes`: what was read and the rest, to be passed on as
    /// they come.
    TooLarge(BoxStream<'static, Result<Bytes, hyper::Error>>),
}

/// Reads a whole (JSON or error) body, by `deadline`, never waiting more than `idle` for the
/// next chunk; past `cap` bytes, stops and hands back what it read with the rest.
async fn read_whole(
    upstream: UpstreamBody,
    deadline: tokio::time::Instant,
    idle: Duration,
    cap: usize,
) -> Result<Read, ReadFailure> {
    let mut body = http_body_util::BodyDataStream::new(upstream);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut read = 0usize;
    loop {
        let by = deadline.min(tokio::time::Instant::now() + idle);
        match tokio::time::timeout_at(by, body.next()).await {
            Err(_) => return Err(ReadFailure::TimedOut),
            Ok(None) => break,
            Ok(Some(Ok(chunk))) => {
                read += chunk.len();
                chunks.push(chunk);
                if read > cap {
                    let head = futures_util::stream::iter(chunks.into_iter().map(Ok));
                    return Ok(Read::TooLarge(head.chain(body).boxed()));
                }
            }
            Ok(Some(Err(e))) => return Err(ReadFailure::Broke(e)),
        }
    }
    Ok(Read::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().expect("one chunk"),
        _ => Bytes::from(chunks.concat()),
    }))
}

/// A wait on the upstream that a client leaving does not cut short: polled, it is `work`; dropped
/// before `work` ends (the client went away), it frees the request's concurrency slot at once
/// and lets `work` go on in a tracked task for up to `usage_drain_ms`, then `left` settles with
/// what it gave. So an answer the upstream finishes soon after is settled from the usage it
/// reports, not the estimate (an outside audit: a client that gave up after 0.5 s on an answer of
/// 5,010 tokens that came at 1.5 s was charged the estimate, 268). Out of time, the settlement is
/// dropped: the estimate.
struct Outlive<T: Send + 'static> {
    state: Arc<AppState>,
    work: Option<BoxFuture<'static, T>>,
    settlement: Option<Settlement>,
    left: Option<Left<T>>,
}

type Left<T> = Box<dyn FnOnce(T, Settlement) -> BoxFuture<'static, ()> + Send>;

impl<T: Send + 'static> Outlive<T> {
    fn new(
        state: &Arc<AppState>,
        work: impl Future<Output = T> + Send + 'static,
        settlement: Settlement,
        left: impl FnOnce(T, Settlement) -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        Outlive {
            state: state.clone(),
            work: Some(work.boxed()),
            settlement: Some(settlement),
            left: Some(Box::new(left)),
        }
    }
}

impl<T: Send + 'static> Future for Outlive<T> {
    type Output = (T, Settlement);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let work = this.work.as_mut().expect("polled after it ended");
        let done = ready!(work.poll_unpin(cx));
        this.work = None;
        let settlement = this.settlement.take().expect("held until the work ends");
        Poll::Ready((done, settlement))
    }
}

impl<T: Send + 'static> Drop for Outlive<T> {
    fn drop(&mut self) {
        let (Some(work), Some(mut settlement), Some(left)) =
            (self.work.take(), self.settlement.take(), self.left.take())
        else {
            return;
        };
        settlement.client_left();
        let drain = self.state.config.upstream.usage_drain;
        spawn_tracked(&self.state, async move {
            settlement.release_slot().await;
            if let Ok(done) = tokio::time::timeout(drain, work).await {
                left(done, settlement).await;
            }
        });
    }
}

/// The client left before the upstream's head came (`Outlive`): an answer that succeeded is read
/// for its usage, as for a client that leaves a stream (`MeteredStream`'s drop: within
/// `usage_drain_ms`); one that failed is refunded, as it would have been.
async fn left_before_the_head(
    answered: Result<
        Result<axum::http::Response<UpstreamBody>, super::upstream::ClientError>,
        tokio::time::error::Elapsed,
    >,
    settlement: Settlement,
    strip_usage_chunk: bool,
    deadline: tokio::time::Instant,
    idle: Duration,
    cap: usize,
) {
    let upstream = match answered {
        Ok(Ok(r)) if r.status().is_success() => r,
        _ => return settlement.refund(),
    };
    let kind = AnswerKind::of(upstream.headers());
    let state = settlement.state.clone();
    let body = upstream.into_body();
    let scanner = match kind {
        AnswerKind::Events => Scanner::Events(SseScanner::new(strip_usage_chunk)),
        AnswerKind::JsonLines => Scanner::JsonTail(JsonTail::default()),
        AnswerKind::Json => {
            let read = read_whole(body, deadline, idle, cap).await;
            return left_before_the_body(read, settlement).await;
        }
        AnswerKind::Other => return drop(settlement.finish(None)),
    };
    drop(MeteredStream::new(
        state,
        data_stream(body),
        Some(scanner),
        Some(settlement),
    ));
}

/// How an upstream's answer is read for its usage, by its media type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AnswerKind {
    /// `text/event-stream`: passed on event by event.
    Events,
    /// JSON lines (`application/x-ndjson`, `application/jsonl`, `application/json-seq`): a
    /// stream of their own, passed on as they come, their usage read from their end.
    JsonLines,
    /// JSON, or an answer that does not say: read whole for its usage.
    Json,
    /// Anything else (files, audio): passed through as it comes, never buffered.
    Other,
}

impl AnswerKind {
    fn of(headers: &HeaderMap) -> AnswerKind {
        // A media type is case-insensitive (`TEXT/EVENT-STREAM` was read as an opaque answer: an
        // outside audit); lower-cased only when it is not already.
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                if v.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(v.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(v)
                }
            })
            .unwrap_or_default();
        if content_type.starts_with("text/event-stream") {
            AnswerKind::Events
        } else if ["ndjson", "jsonl", "json-seq"]
            .iter()
            .any(|t| content_type.contains(t))
        {
            AnswerKind::JsonLines
        } else if content_type.is_empty() || content_type.contains("json") {
            AnswerKind::Json
        } else {
            AnswerKind::Other
        }
    }
}

/// The client left while a JSON answer was read (`Outlive`): settled from its usage once read.
async fn left_before_the_body(read: Result<Read, ReadFailure>, settlement: Settlement) {
    match read {
        Ok(Read::Whole(body)) => drop(settlement.finish(usage_of_json(&body))),
        Ok(Read::TooLarge(body)) => {
            let state = settlement.state.clone();
            let scanner = Scanner::JsonTail(JsonTail::default());
            drop(MeteredStream::new(
                state,
                body,
                Some(scanner),
                Some(settlement),
            ));
        }
        Err(_) => drop(settlement.finish(None)),
    }
}

async fn send(
    state: &Arc<AppState>,
    parts: axum::http::request::Parts,
    prepared: Prepared,
    mut settlement: Settlement,
    access: &mut Option<Box<AccessLine>>,
    seen: &mut ProxiedRequest<'_>,
) -> Result<Response, ApiError> {
    let upstream_config = &state.config.upstream;
    let url = state
        .upstream
        .url(prepared.endpoint, &prepared.path, parts.uri.query())
        .ok_or(ApiError::Unavailable)?;

    // The client's headers, less those the gateway does not forward: removed in place, the
    // rest passed on as they came.
    let mut headers = parts.headers;
    // A client's `x-request-id` that the answer and the log do not show (not of the form they
    // take) is not sent on either (an outside audit: it reached the upstream, whose logs then
    // named the request otherwise than the gateway's).
    // Nor are the values after the first, which nothing checked (an outside audit: `one` was
    // shown and logged, `one` and `bad id! <script>` forwarded).
    if headers.contains_key(X_REQUEST_ID) {
        match client_request_id(&headers) {
            Some(id) => {
                headers.insert(X_REQUEST_ID, id);
            }
            None => {
                headers.remove(X_REQUEST_ID);
            }
        }
    }
    remove_connection_options(&mut headers);
    remove_where(&mut headers, |name| {
        is_hop_or_gateway_request_header(name)
            || upstream_config
                .drop_request_headers
                .iter()
                .any(|d| d == name.as_str())
    });
    if let Some(authorization) = &state.upstream.authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    if let Some(authorization) = &state.upstream.proxy_authorization {
        headers.insert(header::PROXY_AUTHORIZATION, authorization.clone());
    }
    #[cfg(feature = "otel")]
    super::otel::inject(&mut headers);
    // Ask for an uncompressed answer whatever the client accepts, so usage can always be read.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );

    let deadline = tokio::time::Instant::now() + upstream_config.timeout;
    let idle = upstream_config.idle_read_timeout;
    let cap = upstream_config.max_buffered_bytes;
    let mut request = axum::http::Request::new(http_body_util::Full::new(prepared.body));
    *request.method_mut() = parts.method;
    *request.uri_mut() = url;
    *request.headers_mut() = headers;
    let sent = std::time::Instant::now();
    // From here the upstream may do the work: a client that leaves meanwhile is settled from the
    // usage the upstream still reports (`Outlive`), else charged the estimate, and its access
    // line, held by the settlement meanwhile, is written with it.
    settlement.sent = true;
    settlement.hold_line(access);
    let strip_usage_chunk = prepared.strip_usage_chunk;
    let head = {
        let state = state.clone();
        async move { tokio::time::timeout_at(deadline, state.upstream.client.request(request)).await }
    };
    let (answered, mut settlement) = Outlive::new(state, head, settlement, move |answered, s| {
        left_before_the_head(answered, s, strip_usage_chunk, deadline, idle, cap).boxed()
    })
    .await;
    settlement.give_line(access);
    let took = sent.elapsed();
    seen.waited(took);
    let upstream = match answered {
        Err(_) => {
            Metrics::inc(&state.metrics.upstream_timeouts);
            settlement.refund();
            return Err(ApiError::UpstreamTimeout);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = ?e, "upstream request failed");
            settlement.refund();
            if timed_out(&e) {
                Metrics::inc(&state.metrics.upstream_timeouts);
                return Err(ApiError::UpstreamTimeout);
            }
            Metrics::inc(&state.metrics.upstream_unreachable);
            return Err(ApiError::UpstreamUnreachable);
        }
        Ok(Ok(r)) => {
            seen.upstream_answered(took);
            r
        }
    };

    let (upstream_parts, upstream) = upstream.into_parts();
    let status = upstream_parts.status;
    // The upstream's headers, less those of its hop and its own rate-limit headers: taken, not
    // copied.
    let mut response_headers = upstream_parts.headers;
    remove_connection_options(&mut response_headers);
    remove_where(&mut response_headers, is_hop_or_gateway_response_header);
    let kind = AnswerKind::of(&response_headers);
    let is_stream = kind == AnswerKind::Events;
    let is_json_lines = kind == AnswerKind::JsonLines;
    let is_json = kind == AnswerKind::Json;
    if is_stream {
        // Its events may be changed (the usage chunk the gateway asked for is removed): the
        // upstream's length would not hold. Every other body is passed on as it came, and so
        // keeps the upstream's length (a `HEAD`'s too).
        response_headers.remove(header::CONTENT_LENGTH);
    }
    // The upstream's id, also for an answer that says its body broke off (its support asks
    // for it).
    let upstream_id = response_headers.get(X_REQUEST_ID).cloned();
    let answer = move |body: Body| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = response_headers;
        response
    };

    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        // The upstream refused the gateway's own key: passing that on would tell the client its
        // key is wrong. It is the operator's to fix.
        tracing::error!(%status, "the upstream refused the gateway's credentials (upstream.api_key)");
        Metrics::inc(&state.metrics.upstream_auth_failures);
        settlement.refund();
        return Err(ApiError::UpstreamUnreachable);
    }
    if !status.is_success() {
        // The upstream's own refusal or failure (or a redirect, which is not followed): passed
        // on as it came, and nothing is charged.
        if status == StatusCode::TOO_MANY_REQUESTS {
            Metrics::inc(&state.metrics.upstream_rate_limited);
        } else if status.is_server_error() {
            Metrics::inc(&state.metrics.upstream_server_errors);
        }
        // Refunded first: nothing is charged for it, even if the client leaves meanwhile.
        let held = settlement.estimate();
        settlement.refund();
        let body = seen
            .waiting(read_whole(upstream, deadline, idle, cap))
            .await;
        return match body {
            // Refunded: it cost nothing, and the Mistral family says so.
            Ok(Read::Whole(body)) => {
                let mut response = answer(Body::from(body));
                headers::query_cost(state.config.rate_limit_headers, 0, response.headers_mut());
                response
                    .extensions_mut()
                    .insert(Settled { held, charged: 0 });
                Ok(response)
            }
            Ok(Read::TooLarge(body)) => {
                let stream = MeteredStream::new(state.clone(), body, None, None);
                Ok(answer(Body::from_stream(stream)))
            }
            Err(ReadFailure::TimedOut) => {
                Metrics::inc(&state.metrics.upstream_timeouts);
                tracing::warn!(%status, "the upstream's error body did not arrive in time");
                Err(ApiError::UpstreamTimeout)
            }
            Err(ReadFailure::Broke(e)) => {
                tracing::warn!(%status, error = %e, "the upstream's error body broke");
                Err(ApiError::UpstreamUnreachable)
            }
        };
    }

    if is_stream || !is_json {
        // The stream's access line is written when it is settled, with what it cost.
        settlement.access = access.take().map(|a| (a, status.as_u16()));
        let scanner = if is_stream {
            // A stream whose end waits for its settlement holds its `[DONE]` back until then.
            Some(Scanner::Events(
                SseScanner::new(prepared.strip_usage_chunk).holding_done(settlement.answer_waits()),
            ))
        } else if is_json_lines {
            Some(Scanner::JsonTail(JsonTail::default()))
        } else {
            None
        };
        let stream = MeteredStream::new(
            state.clone(),
            data_stream(upstream),
            scanner,
            Some(settlement),
        );
        return Ok(answer(Body::from_stream(stream)));
    }

    // A JSON answer must arrive whole within the same deadline as its headers, unless it is
    // larger than the gateway holds: then it is passed on as it comes, as a stream is, and its
    // usage read from its end.
    settlement.hold_line(access);
    let whole = read_whole(upstream, deadline, idle, cap);
    let (read, mut settlement) = seen
        .waiting(Outlive::new(state, whole, settlement, |read, s| {
            left_before_the_body(read, s).boxed()
        }))
        .await;
    settlement.give_line(access);
    match read {
        Ok(Read::TooLarge(body)) => {
            settlement.access = access.take().map(|a| (a, status.as_u16()));
            let scanner = Scanner::JsonTail(JsonTail::default());
            let stream = MeteredStream::new(state.clone(), body, Some(scanner), Some(settlement));
            Ok(answer(Body::from_stream(stream)))
        }
        Ok(Read::Whole(body)) => {
            let usage = usage_of_json(&body);
            let charged = usage
                .as_ref()
                .map_or(settlement.estimate(), UsageJson::total);
            if let Some(a) = access.as_mut() {
                a.tokens = charged;
            }
            let held = settlement.estimate();
            if let Some(waits) = settlement.finish(usage) {
                waits.await.ok();
            }
            let mut response = answer(Body::from(body));
            headers::query_cost(
                state.config.rate_limit_headers,
                charged,
                response.headers_mut(),
            );
            response.extensions_mut().insert(Settled { held, charged });
            Ok(response)
        }
        Err(failure) => {
            // The upstream started answering and may have done the work: settle the estimate,
            // and say so.
            let timed_out = matches!(failure, ReadFailure::TimedOut);
            match failure {
                ReadFailure::TimedOut => {
                    Metrics::inc(&state.metrics.upstream_timeouts);
                    tracing::warn!("the upstream's answer did not arrive whole in time");
                }
                ReadFailure::Broke(e) => tracing::warn!(error = %e, "upstream body failed"),
            }
            let charged = settlement.estimate();
            if let Some(a) = access.as_mut() {
                a.tokens = charged;
            }
            if let Some(waits) = settlement.finish(None) {
                waits.await.ok();
            }
            // Charged: it says so in its message and, for the Mistral family, in its header.
            let mut response = ApiError::UpstreamIncomplete { timed_out, charged }.into_response();
            // Passed on as `x-upstream-request-id` (see `handle`).
            if let Some(id) = upstream_id {
                response.headers_mut().insert(X_REQUEST_ID, id);
            }
            headers::query_cost(
                state.config.rate_limit_headers,
                charged,
                response.headers_mut(),
            );
            Ok(response)
        }
    }
}

/// Settles one reservation exactly once; dropping it unfinished settles the estimate.
struct Settlement {
    state: Arc<AppState>,
    reservation: Option<Reservation>,
    limits: Arc<Limits>,
    /// The key the request came with, for the ledger.
    key: KeyId,
    request_id: RequestId,
    route: Route,
    model: String,
    choices: u64,
    /// The prompt as the rule estimated it, before any learned factor (0 when unmetered).
    prompt_estimate: u64,
    /// The request's `max_tokens` (or its stand-in), if it gave one.
    max_tokens: Option<u64>,
    /// A stream's access line and its status, written when it is settled; any request's while
    /// it waits for the upstream, with `499` (written if the client leaves meanwhile).
    access: Option<(Box<AccessLine>, u16)>,
    /// What the limits in shadow hold, settled with the same usage.
    shadow: Option<ShadowHold>,
    /// Whether the request went to the upstream: dropped before, the settlement refunds it;
    /// after, it charges the estimate.
    sent: bool,
}

enum Outcome {
    Usage(UsageJson),
    Refund,
    /// No usage: the estimate, or, when a stream delivered more, the prompt's estimate and one
    /// token for each event of generated text passed on (`SseScanner::text_events`): a client
    /// that leaves a long stream, or a stream that breaks, is charged at least what it got.
    Estimate {
        text_events: u64,
    },
}

/// What settling without usage charges (`Outcome::Estimate`).
fn without_usage(held: u64, prompt_estimate: u64, text_events: u64) -> u64 {
    if text_events == 0 {
        held
    } else {
        held.max(prompt_estimate.saturating_add(text_events))
    }
}

impl Settlement {
    /// The client has left: its access line's duration ends now.
    fn client_left(&mut self) {
        if let Some((line, _)) = self.access.as_mut() {
            line.left_at.get_or_insert_with(Instant::now);
        }
    }

    fn take(&mut self, outcome: Outcome) -> Option<BoxFuture<'static, ()>> {
        let reservation = self.reservation.take()?;
        // Off the metered routes nothing was reserved and only usage the answer reports is
        // settled: events of text are not counted as tokens there (an outside audit saw a
        // stream of 5 events without usage on `/v1/other` charged 5).
        let outcome = match outcome {
            Outcome::Estimate { .. } if self.route == Route::Other => {
                Outcome::Estimate { text_events: 0 }
            }
            outcome => outcome,
        };
        if let Some((mut line, status)) = self.access.take() {
            line.tokens = match &outcome {
                Outcome::Usage(u) => u.total(),
                Outcome::Estimate { text_events } => {
                    without_usage(reservation.held.tokens, self.prompt_estimate, *text_events)
                }
                Outcome::Refund => 0,
            };
            line.write(status);
        }
        let state = self.state.clone();
        let limits = self.limits.clone();
        let request_id = self.request_id;
        let route = self.route;
        let model = std::mem::take(&mut self.model);
        let choices = self.choices;
        let prompt_estimate = self.prompt_estimate;
        let max_tokens = self.max_tokens;
        let key = self.key;
        let shadow = self.shadow.take();
        Some(
            async move {
                settle(
                    &state,
                    &reservation,
                    &limits,
                    request_id,
                    model,
                    Counts {
                        route,
                        key,
                        choices,
                        prompt_estimate,
                        max_tokens,
                    },
                    outcome,
                    shadow,
                )
                .await
            }
            .boxed(),
        )
    }

    /// Holds the request's access line while the upstream is awaited (see `access`).
    fn hold_line(&mut self, line: &mut Option<Box<AccessLine>>) {
        self.access = line.take().map(|a| (a, CLIENT_CLOSED_REQUEST));
    }

    /// Gives the access line back once the await is over.
    fn give_line(&mut self, line: &mut Option<Box<AccessLine>>) {
        *line = self.access.take().map(|(a, _)| a);
    }

    /// The tokens reserved: what settling the estimate charges.
    fn estimate(&self) -> u64 {
        self.reservation.as_ref().map_or(0, |r| r.held.tokens)
    }

    /// Frees the concurrency slot at once (the client went away); tokens settle later.
    async fn release_slot(&mut self) {
        if let Some(r) = self.reservation.as_mut() {
            if let Err(e) = self.state.limiter.release_slot(r).await {
                tracing::error!(error = %e, "releasing a slot failed");
            }
        }
        if let Some(r) = self.shadow.as_mut().and_then(|s| s.reservation.as_mut()) {
            self.state.shadow.release_slot(r).await;
        }
    }

    fn refund(mut self) {
        Metrics::inc(&self.state.metrics.refunds);
        if let Some(f) = self.take(Outcome::Refund) {
            run_to_completion(&self.state, f, false);
        }
    }

    /// Settles the answer; what it returns, the answer waits for before it ends.
    #[must_use]
    fn finish(self, usage: Option<UsageJson>) -> Option<AnswerWaits> {
        self.finish_stream(usage, 0)
    }

    /// `finish` for a stream that passed on `text_events` events of generated text.
    #[must_use]
    fn finish_stream(mut self, usage: Option<UsageJson>, text_events: u64) -> Option<AnswerWaits> {
        let outcome = usage.map_or(Outcome::Estimate { text_events }, Outcome::Usage);
        self.settle_now(outcome)
    }

    /// Whether the answer's end waits for the settlement (`Reservation::settle_before_answer`).
    fn answer_waits(&self) -> bool {
        self.reservation
            .as_ref()
            .is_some_and(|r| r.settle_before_answer)
    }

    /// Starts settling with `outcome` (see `run_to_completion`); what it returns, the answer
    /// waits for before it ends (`Reservation::settle_before_answer`).
    fn settle_now(&mut self, outcome: Outcome) -> Option<AnswerWaits> {
        let waits = self.answer_waits();
        let f = self.take(outcome)?;
        run_to_completion(&self.state, f, waits)
    }
}

/// Starts a settlement that runs to its end even if the request's future is dropped meanwhile
/// (its client went away), without holding up the answer. It is polled once here first: one
/// that finishes at once (the in-memory limiter's, nearly always) needs no task. One that has to
/// wait (Redis) goes on as a tracked task of its own, which a stop waits for; the answer leaves
/// meanwhile. By then its call has normally been queued on the limiter's connection (see
/// ARCHITECTURE.md, "Settlement after the answer"), so this instance's later calls for the
/// workspace reach Redis after it. Nothing is awaited between the first poll and the spawn, so
/// a dropped request cannot leave a settlement half done.
///
/// With `answer_waits` (`Reservation::settle_before_answer`), a settlement that does not finish
/// at its first poll also says when it ends: the answer waits for that. The limiter's calls are
/// bounded by its own timeouts, and one that fails defers the settlement, so the wait is bounded
/// too.
fn run_to_completion(
    state: &AppState,
    mut settling: BoxFuture<'static, ()>,
    answer_waits: bool,
) -> Option<AnswerWaits> {
    let waker = std::task::Waker::noop();
    if settling
        .as_mut()
        .poll(&mut Context::from_waker(waker))
        .is_ready()
    {
        return None;
    }
    if !answer_waits {
        spawn_tracked(state, settling);
        return None;
    }
    let (done, waits) = tokio::sync::oneshot::channel();
    spawn_tracked(state, async move {
        settling.await;
        let _ = done.send(());
    });
    Some(waits)
}

/// The end of a settlement that an answer waits for before it ends.
type AnswerWaits = tokio::sync::oneshot::Receiver<()>;

/// Spawns `work` as a task the gateway waits for when it stops; outside a runtime (the process
/// is ending) there is nothing to run it on.
fn spawn_tracked(state: &AppState, work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        state.tasks.spawn_on(work, &handle);
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let outcome = if self.sent {
            Outcome::Estimate { text_events: 0 }
        } else {
            Outcome::Refund
        };
        if matches!(outcome, Outcome::Refund) && self.reservation.is_some() {
            Metrics::inc(&self.state.metrics.refunds);
        }
        if let Some(f) = self.take(outcome) {
            spawn_tracked(&self.state, f);
        }
    }
}

/// What the estimator learns from besides the usage: the request's choices and the rule's
/// prompt estimate; the route, for the metrics; and the key, for the ledger.
struct Counts {
    route: Route,
    key: KeyId,
    choices: u64,
    prompt_estimate: u64,
    max_tokens: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
async fn settle(
    state: &AppState,
    reservation: &Reservation,
    limits: &Limits,
    request_id: RequestId,
    model: String,
    counts: Counts,
    outcome: Outcome,
    shadow: Option<ShadowHold>,
) {
    let now = state.clock.now();
    let ws = reservation.workspace;
    let route = counts.route;
    let key = counts.key;
    // The estimate is measured against the usage the upstream reported, on a metered route.
    let reserved = (matches!(outcome, Outcome::Usage(_)) && route != Route::Other)
        .then_some(reservation.held.tokens);
    // The prompt's part of what is charged: as reported, else as the rule estimated it.
    let estimated_prompt = counts.prompt_estimate;
    let (actual, prompt) = match outcome {
        Outcome::Usage(u) => {
            let Counts {
                choices,
                prompt_estimate,
                max_tokens,
                ..
            } = counts;
            let completion = u.completion().map(|c| c / choices.max(1));
            let observed = Observed {
                completion_tokens: completion,
                completion_cut: completion.zip(max_tokens).is_some_and(|(c, m)| c >= m),
                prompt: u
                    .prompt()
                    .filter(|_| prompt_estimate > 0)
                    .map(|reported| (prompt_estimate, reported)),
            };
            state.estimator.observe_usage(ws, &model, observed, now);
            (u.total(), u.prompt().unwrap_or(0))
        }
        Outcome::Refund => (0, 0),
        Outcome::Estimate { text_events } => {
            // A pass-through answer without usage reserved nothing: there was no estimate to fall
            // back on, so it is not counted as one.
            if reservation.held.tokens > 0 {
                Metrics::inc(&state.metrics.settled_without_usage);
            }
            let charged = without_usage(reservation.held.tokens, estimated_prompt, text_events);
            (charged, estimated_prompt)
        }
    };
    let tokens = Tokens {
        total: actual,
        prompt: prompt.min(actual),
    };
    state.metrics.settled(route, actual, reserved);
    // The shadow's reservation is settled to the same usage; one that fails is dropped. Both
    // calls start on the first poll (see `run_to_completion`).
    let shadow_settled = async {
        let mut mark = ShadowMark::default();
        if let Some(hold) = shadow {
            mark.denied = hold.denied.is_some();
            if let Some(r) = &hold.reservation {
                if let Some(settled) = state.shadow.settle(r, &hold.limits, actual, now).await {
                    mark.counter = settled.counter;
                }
            }
        }
        mark
    };
    let (mark, settled) = futures_util::future::join(
        shadow_settled,
        state.limiter.settle(reservation, limits, actual, now),
    )
    .await;
    match settled {
        Ok(settled) => state.recorder.record(UsageRecord {
            shadow: mark,
            ..settled_record(ws, key, model, tokens, &settled)
        }),
        Err(e) => {
            // Retried by the ledger writer until the limiter takes it.
            Metrics::inc(&state.metrics.limiter_errors);
            tracing::debug!(error = %e, request_id = request_id.as_str(), "settlement deferred");
            state.recorder.defer(Deferred {
                reservation: reservation.clone(),
                limits: Arc::new(limits.clone()),
                key,
                actual: tokens,
                model,
                shadow: mark,
            });
        }
    }
}

/// What a body passed on as it comes is read for.
enum Scanner {
    /// A stream's events: its usage, and the events of generated text.
    Events(SseScanner),
    /// The end of a JSON answer too large to read whole: its usage.
    JsonTail(JsonTail),
}

impl Scanner {
    /// Takes a chunk; returns what to pass on.
    fn feed_bytes(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Scanner::Events(s) => s.feed_bytes(chunk),
            Scanner::JsonTail(t) => {
                t.feed(&chunk);
                chunk
            }
        }
    }

    /// The body has ended: what is left to pass on.
    fn finish(&mut self) -> Bytes {
        match self {
            Scanner::Events(s) => s.finish(),
            Scanner::JsonTail(t) => {
                t.finish();
                Bytes::new()
            }
        }
    }

    fn usage(&self) -> Option<UsageJson> {
        match self {
            Scanner::Events(s) => s.usage(),
            Scanner::JsonTail(t) => t.usage(),
        }
    }

    fn text_events(&self) -> u64 {
        match self {
            Scanner::Events(s) => s.text_events(),
            Scanner::JsonTail(_) => 0,
        }
    }
}

/// The body of an answer passed on as it comes: a stream's events, a JSON answer too large to
/// read whole, an answer that is neither (bytes untouched, no scanner), or an error answer too
/// large to read whole (nothing to settle: its settlement was refunded). Settles when it ends.
/// An upstream silent for `idle_for` ends it as broken.
struct MeteredStream {
    state: Arc<AppState>,
    upstream: BoxStream<'static, Result<Bytes, hyper::Error>>,
    scanner: Option<Scanner>,
    settlement: Option<Settlement>,
    tail: Option<Bytes>,
    done: bool,
    /// Why the upstream was given up on, passed on to the client at the next poll.
    broken: Option<&'static str>,
    /// Bytes were passed on to the client: the stream is never refunded.
    delivered: bool,
    idle_for: Duration,
    /// Armed when the upstream has nothing to give, from that moment; disarmed by a chunk.
    /// (A client slow to read is not the upstream's silence: the clock only runs while the
    /// gateway waits for the upstream.)
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_armed: bool,
    /// The settlement the end of the body waits for (`Settlement::settle_now`).
    waits: Option<AnswerWaits>,
}

impl MeteredStream {
    fn new(
        state: Arc<AppState>,
        upstream: BoxStream<'static, Result<Bytes, hyper::Error>>,
        scanner: Option<Scanner>,
        settlement: Option<Settlement>,
    ) -> Self {
        let idle_for = state.config.upstream.idle_read_timeout;
        MeteredStream {
            state,
            upstream,
            scanner,
            settlement,
            tail: None,
            done: false,
            broken: None,
            delivered: false,
            idle_for,
            idle: Box::pin(tokio::time::sleep(idle_for)),
            idle_armed: false,
            waits: None,
        }
    }

    fn text_events(&self) -> u64 {
        self.scanner.as_ref().map_or(0, Scanner::text_events)
    }

    fn start_settling(&mut self, without_usage: Outcome) {
        if let Some(mut s) = self.settlement.take() {
            let usage = self.scanner.as_ref().and_then(Scanner::usage);
            let outcome = usage.map_or(without_usage, Outcome::Usage);
            if matches!(outcome, Outcome::Refund) {
                Metrics::inc(&self.state.metrics.refunds);
            }
            // As with a JSON answer, the end of the body does not wait for the limiter, unless
            // the reservation says it must.
            self.waits = s.settle_now(outcome);
        }
    }

    /// The upstream broke or went silent: settle (a stream that delivered nothing is refunded,
    /// one that did is not), let go of the upstream, and end the client's answer as broken.
    ///
    /// The break is passed on at the next poll, not at once: an error from a body makes the
    /// server drop what it has not yet written, and the events that came just before the break
    /// (often in the same read from the upstream) must reach the client first.
    fn give_up(
        &mut self,
        why: &'static str,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Bytes>>> {
        self.done = true;
        self.tail = None;
        self.upstream = futures_util::stream::empty().boxed();
        let without_usage = if self.delivered {
            Outcome::Estimate {
                text_events: self.text_events(),
            }
        } else {
            Outcome::Refund
        };
        self.start_settling(without_usage);
        self.broken = Some(why);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Stream for MeteredStream {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                if let Some(waits) = this.waits.as_mut() {
                    // Ended by the settlement or dropped with its task: either way, go on.
                    ready!(waits.poll_unpin(cx)).ok();
                    this.waits = None;
                }
                if let Some(why) = this.broken.take() {
                    return Poll::Ready(Some(Err(io::Error::other(why))));
                }
                return Poll::Ready(this.tail.take().filter(|b| !b.is_empty()).map(Ok));
            }
            match this.upstream.poll_next_unpin(cx) {
                Poll::Pending => {
                    if !this.idle_armed {
                        this.idle_armed = true;
                        let until = tokio::time::Instant::now() + this.idle_for;
                        this.idle.as_mut().reset(until);
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        Metrics::inc(&this.state.metrics.upstream_idle_timeouts);
                        tracing::warn!(
                            idle_ms = this.idle_for.as_millis() as u64,
                            "upstream stream went silent; giving up on it"
                        );
                        return this.give_up("upstream stream went silent", cx);
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    this.idle_armed = false;
                    let out = match this.scanner.as_mut() {
                        Some(scanner) => scanner.feed_bytes(chunk),
                        None => chunk,
                    };
                    if !out.is_empty() {
                        // An event stream has delivered once it passed on an event with data:
                        // comments (keep-alives) before a break are refunded (an outside audit).
                        this.delivered = this.delivered
                            || match &this.scanner {
                                Some(Scanner::Events(s)) => s.passed_data(),
                                _ => true,
                            };
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream broke");
                    return this.give_up("upstream stream broke", cx);
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.tail = this.scanner.as_mut().map(Scanner::finish);
                    let text_events = this.text_events();
                    this.start_settling(Outcome::Estimate { text_events });
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        let Some(mut settlement) = self.settlement.take() else {
            return;
        };
        // The client went away mid-stream. Keep reading, briefly, for the real usage.
        settlement.client_left();
        let mut upstream =
            std::mem::replace(&mut self.upstream, futures_util::stream::empty().boxed());
        let scanner = self.scanner.take();
        // What reached the client; what is read while draining did not.
        let text_events = scanner.as_ref().map_or(0, Scanner::text_events);
        let delivered = self.delivered;
        let drain = self.state.config.upstream.usage_drain;
        spawn_tracked(&self.state, async move {
            settlement.release_slot().await;
            let Some(mut scanner) = scanner else {
                // Nothing to read usage from: settle the estimate.
                // The client is gone: nothing waits for the settlement.
                drop(settlement.finish(None));
                return;
            };
            let (mut broke, mut read_any) = (false, false);
            let read = async {
                while scanner.usage().is_none() {
                    match upstream.next().await {
                        Some(Ok(chunk)) => {
                            read_any = true;
                            scanner.feed_bytes(chunk);
                        }
                        Some(Err(_)) => {
                            broke = true;
                            break;
                        }
                        None => break,
                    }
                }
                scanner.finish();
            };
            let _ = tokio::time::timeout(drain, read).await;
            // A stream that broke before it produced anything is refunded, as it is for a client
            // that stays (`give_up`): it was charged its estimate once the client had left (an
            // outside audit).
            let produced = delivered
                || match &scanner {
                    Scanner::Events(s) => s.passed_data(),
                    Scanner::JsonTail(_) => read_any,
                };
            if broke && !produced && scanner.usage().is_none() {
                return settlement.refund();
            }
            drop(settlement.finish_stream(scanner.usage(), text_events));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_header_lists_the_methods_passed_on() {
        let listed: Vec<&str> = FORWARDED_METHODS.split(", ").collect();
        let passed: Vec<&str> = FORWARDED.iter().map(Method::as_str).collect();
        assert_eq!(listed, passed);
    }

    #[test]
    fn headers_are_removed_however_many_match() {
        // More than `remove_where` gathers at once, repeated names among them, and some kept.
        let mut h = HeaderMap::new();
        for i in 0..20 {
            h.append(
                format!("x-drop-{}", i % 13)
                    .as_str()
                    .parse::<HeaderName>()
                    .unwrap(),
                HeaderValue::from(i),
            );
            h.insert(
                format!("x-keep-{i}")
                    .as_str()
                    .parse::<HeaderName>()
                    .unwrap(),
                HeaderValue::from(i),
            );
        }
        remove_where(&mut h, |n| n.as_str().starts_with("x-drop-"));
        assert_eq!(h.len(), 20);
        assert!(h.keys().all(|n| n.as_str().starts_with("x-keep-")));
        remove_where(&mut h, |_| false);
        assert_eq!(h.len(), 20);
    }

    #[test]
    fn paths_are_normalised_one_way() {
        for (raw, normal) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat/completions/", "/v1/chat/completions"),
            ("//v1//chat///completions//", "/v1/chat/completions"),
            ("/v1/%63hat/%63ompletions", "/v1/chat/completions"),
            ("/v1/./chat/x/../completions/.", "/v1/chat/completions"),
            ("/v1/%2E%2e/v1/models", "/v1/models"),
            (
                "/v1/files/file%20one/content",
                "/v1/files/file%20one/content",
            ),
            ("/v1/files/caf%C3%A9", "/v1/files/caf%C3%A9"),
            ("/v1/files/café", "/v1/files/caf%C3%A9"),
            ("/v1/a:b@c!$&'()*+,=", "/v1/a:b@c!$&'()*+,="),
            ("/v1/x%3fy%23z", "/v1/x%3Fy%23z"),
        ] {
            assert_eq!(normalise_path(raw).as_deref(), Ok(normal), "{raw}");
        }
        for raw in [
            "/v1/chat%2fcompletions",
            "/v1/a%5Cb",
            "/v1/a;b",
            "/v1/%",
            "/v1/%4",
            "/v1/%g0",
            "/v1/%ff",
            "/v1/%0a",
            "/v1/..",
            "/v1/../..",
            "/v1/../admin/v1/keys",
            "/v2/chat/completions",
            "/v1",
        ] {
            assert!(normalise_path(raw).is_err(), "{raw}");
        }
    }

    /// The shortcut for paths already normal agrees with the segment-by-segment work, on every
    /// path of up to 5 characters after `/v1/` drawn from characters that matter to it.
    #[test]
    fn the_shortcut_for_normal_paths_agrees_with_the_full_normalisation() {
        let alphabet: Vec<char> = "a/.%;\\~:2é ".chars().collect();
        let mut shortcuts = 0;
        let mut stack = vec![String::from("/v1/")];
        while let Some(path) = stack.pop() {
            if is_normal(&path) {
                shortcuts += 1;
                assert_eq!(
                    normalise_segments(&path).as_deref(),
                    Ok(path.as_str()),
                    "{path}"
                );
            }
            assert_eq!(
                normalise_path(&path).as_deref(),
                normalise_segments(&path).as_deref(),
                "{path}"
            );
            if path.chars().count() < 9 {
                stack.extend(alphabet.iter().map(|c| format!("{path}{c}")));
            }
        }
        assert!(shortcuts > 1000, "{shortcuts}");
    }
}
