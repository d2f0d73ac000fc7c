//! Fake OpenAI/Mistral-compatible LLM upstream for the demo, the tests and the benchmarks.
//!
//! Start it with [`serve`], or mount [`router`] yourself. Answers are deterministic, so tests can
//! compute the expected usage figures with [`prompt_tokens_of`] and the rule below.
//!
//! # Routes
//!
//! | Route | Answer |
//! |---|---|
//! | `POST /v1/chat/completions` | `chat.completion`; `messages[].content` is a string or an array of `{"type":"text","text":...}` parts |
//! | `POST /v1/completions` | `text_completion` with `choices[].text`; `prompt` is a string or an array of strings |
//! | `POST /v1/fim/completions` | `chat.completion` (what Mistral answers); `prompt` plus optional `suffix` |
//! | `POST /v1/embeddings` | one embedding of 8 floats per `input` (a string or an array of strings); usage has `completion_tokens: 0` |
//! | `POST /v1/agents/completions` | as `/v1/chat/completions` (Mistral's Agents API, which names an `agent_id` instead of a `model`): a route a gateway passes through unmetered, whose answer still reports usage |
//! | `POST /v1/responses` | OpenAI Responses API: a `response` object with one `message` output item of `output_text`, and `usage` `{input_tokens, input_tokens_details, output_tokens, output_tokens_details, total_tokens}`; `input` is a string or an array of items whose `content` is a string or `{"type":"input_text","text":...}` parts; `instructions` optional; `max_output_tokens` instead of `max_tokens` (see Streaming); `stream_options.include_usage`, which that API does not have, answers 400 |
//! | `GET /v1/models` | OpenAI list of `mistral-small-latest`, `mistral-large-latest`, `codestral-latest`, each with Mistral's `type` (`base`) and `capabilities` |
//! | `GET /v1/models/{id}` | one of those, or `404` with code `model_not_found` |
//! | `GET /v1/files/{id}/content` | `application/octet-stream`, 4 chunks of 16 KiB (`a…`, `b…`, `c…`, `d…`), `x-mock-latency-ms` apart |
//! | `GET /mock/requests` | `{"count": N}`: requests received so far, the `/mock/*` routes excluded |
//! | `GET /mock/stats?tag=NAME` | [`TagStats`] of the requests tagged `NAME`: `{"count": N, "in_flight": N, "max_in_flight": N}` (zeros for a tag never seen; 400 without `tag`) |
//! | `POST /mock/stats/reset` | forgets the statistics of every tag; 204 |
//!
//! Any other path answers 404, a wrong method 405, both with a JSON error. A body that is not JSON,
//! or not of the expected shape, answers 400 with
//! `{"object":"error","message":...,"type":"invalid_request_error","param":null,"code":null}`.
//! A missing `model` defaults to `mock-model`.
//!
//! # Usage rule
//!
//! Deliberately unlike the `chars / 4` estimate, so tests can tell upstream figures from estimates.
//!
//! - A text costs its whitespace-separated words plus its ASCII punctuation characters
//!   ([`prompt_tokens_of`]): `"Hello, world!"` costs 2 + 2 = 4.
//! - `prompt_tokens` is the sum of that over every message content (each text part of an array
//!   content), **plus 3 per chat message**; over every prompt string and the FIM `suffix`; over
//!   every embeddings input. `/v1/responses` reports it as `input_tokens`: `instructions`, plus
//!   the `input` string, or 3 per input item plus its content's texts.
//! - Each choice replies `min(max_tokens, 16)` words (`max_completion_tokens` when `max_tokens` is
//!   absent, 16 without either; `max_output_tokens` on `/v1/responses`), cycling
//!   `mock token stream lorem ipsum dolor sit amet`, each word followed by one space.
//!   `finish_reason` is `"length"` when the limit is below 16, else `"stop"` (a response's
//!   `status` is then `"incomplete"`, with `incomplete_details.reason: "max_output_tokens"`,
//!   else `"completed"`).
//! - `completion_tokens` is the reply length times `n` when `n > 1` (`n` choices);
//!   `total_tokens = prompt_tokens + completion_tokens`.
//!
//! Example: messages `"You are terse."` and `"Hello, world! How are you?"` with `max_tokens: 5`
//! give `prompt_tokens` (3 + 1) + (5 + 3) + 2 × 3 = 18, `completion_tokens` 5, `total_tokens` 23.
//!
//! # Streaming
//!
//! With `"stream": true` (chat, completions, FIM) the answer is `text/event-stream`: one
//! `data: {...}\n\n` event per reply word (`chat.completion.chunk` with `delta.content`, or
//! `text_completion` with `text` on `/v1/completions`), then one event per choice with its
//! `finish_reason`, then `data: [DONE]\n\n`. Chunks have no `usage` field, except that:
//!
//! - with `"stream_options": {"include_usage": true}` every chunk carries `"usage": null` and an
//!   extra event with `"choices": []` and the usage comes just before `[DONE]` (OpenAI
//!   behaviour);
//! - with the header `x-mock-stream-usage: last-chunk` the last `finish_reason` chunk carries the
//!   usage, no other chunk has the field and no extra event is sent, whatever `stream_options`
//!   says (Mistral behaviour).
//!
//! `/v1/responses` with `"stream": true` streams OpenAI's typed events, each
//! `event: TYPE\ndata: {"type": TYPE, "sequence_number": N, ...}\n\n`: `response.created`
//! (the response `in_progress`, `usage: null`), `response.output_item.added` and
//! `response.content_part.added`, one `response.output_text.delta` per word,
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then `response.completed` (or `response.incomplete`) whose
//! `response` carries the usage; there is no `[DONE]`.
//!
//! Each event is a separate body chunk. Streams wait the latency before the first event, then
//! latency / 16 between events (no wait at all without latency).
//!
//! # Statistics per tag
//!
//! A request with the header `x-mock-tag: NAME` is counted under `NAME`, whatever its route and
//! answer (errors included), so a test can tell what reached the upstream per workspace through a
//! gateway, which forwards the header like any other. `count` is the requests received,
//! `in_flight` those not finished now, `max_in_flight` the most at once. A request is in flight
//! from its arrival (its head has been read) until the last chunk of its answer's body has been
//! handed to the connection (streams and downloads included), or until the client goes away,
//! whichever comes first. `POST /mock/stats/reset` starts every tag from zero; requests in flight
//! at that moment are not counted afterwards. The `/mock/*` routes are neither counted nor tagged.
//!
//! # Controls
//!
//! Request headers (a gateway forwards them), all optional:
//!
//! | Header | Effect |
//! |---|---|
//! | `x-mock-usage: P,C` | report `prompt_tokens` P and `completion_tokens` C exactly; each choice is C words long, at most 100,000 (embeddings use P only) |
//! | `x-mock-latency-ms: N` | wait N ms, on top of [`MockConfig::latency`], before answering (streams: before the first event) |
//! | `x-mock-no-usage: 1` | no usage: `usage` omitted from JSON answers, always `null` in streams |
//! | `x-mock-fail-after-chunks: N` | a stream aborts with an I/O error after N content events (after the last one if fewer): the client sees a broken transfer, with no `finish_reason`, usage or `[DONE]` (responses: after N `response.output_text.delta` events, before `response.completed`). A JSON answer (errors included) sends its headers and the first half of its body, then aborts |
//! | `x-mock-stall-after-chunks: N` | any route but `/mock/*`: the answer's headers and its first N body chunks are sent (a stream's events, a download's chunks; a JSON answer, errors included, is one chunk), then nothing more, the connection held open until the client leaves: a stalled upstream |
//! | `x-mock-redirect: LOCATION` | any route but `/mock/*`: answer `307 Temporary Redirect` with `Location: LOCATION` and a JSON error body, whatever the request |
//! | `x-mock-status: CODE` | on the `/v1` routes above, answer CODE (400–599) with a JSON error: 429 is Mistral's `{"object":"error","message":"Upstream rate limit","type":"rate_limited","param":null,"code":"1300"}`, 5xx has `"type":"server_error"`, others `"type":"invalid_request_error"` |
//! | `x-mock-echo-headers: 1` | every JSON object answered (errors and stream chunks included) gets a top-level `"received_headers"`: request header name (lowercase) → value, repeated headers joined with `", "` |
//! | `x-mock-stream-usage: last-chunk` | usage in the last `finish_reason` chunk (see Streaming) |
//! | `x-mock-reject-stream-options: 1` | a chat, completions or FIM body containing `stream_options` answers 422, as the Mistral API does |
//! | `x-mock-tag: NAME` | count the request under `NAME` (see Statistics per tag); any route |
//!
//! Flags take `1`/`true` or `0`/`false`; an unparsable control answers 400 naming the header.
//! Checks run in this order: `x-mock-redirect`, controls, `x-mock-status`, body (400),
//! `stream_options` (422).
//!
//! Every answer carries `x-mock-request-count` (requests received by this router so far, this
//! one included; the `/mock/*` routes are not counted), `x-request-id: mock-req-N` (that count,
//! as OpenAI's API names each answer) and `x-ratelimit-limit-requests: 999`, a
//! stand-in for the rate-limit headers of a real upstream, which a gateway must strip.

use std::{
    collections::HashMap,
    future::Future,
    io, iter,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{ready, Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, HttpBody},
    extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State},
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode, Uri},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http_body::{Frame, SizeHint};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Map, Value};

const DEFAULT_REPLY_WORDS: u64 = 16;
/// The most words a choice is made of, whatever usage `x-mock-usage` asks to report: a client's
/// `x-mock-usage: 1,200000000000` grew the mock to the machine's whole memory (an outside audit).
const MAX_REPLY_WORDS: u64 = 100_000;
/// The largest request body read: well above the gateway's default bound (`max_body_bytes`,
/// 4 MiB), so that the mock carries what the gateway lets through (axum's default stopped at
/// 2 MiB: an outside audit).
const MAX_BODY_BYTES: usize = 64 << 20;
const TOKENS_PER_MESSAGE: u64 = 3;
const VOCABULARY: [&str; 8] = [
    "mock", "token", "stream", "lorem", "ipsum", "dolor", "sit", "amet",
];
const MODELS: [&str; 3] = [
    "mistral-small-latest",
    "mistral-large-latest",
    "codestral-latest",
];
const EMBEDDING_DIMENSIONS: u32 = 8;
const STREAM_GAP_DIVISOR: u32 = 16;
/// The mock's own routes: not counted, not tagged.
const CONTROL_PREFIX: &str = "/mock/";
const REQUESTS_PATH: &str = "/mock/requests";
const STATS_PATH: &str = "/mock/stats";
const STATS_RESET_PATH: &str = "/mock/stats/reset";
const TAG_HEADER: &str = "x-mock-tag";
const STALL_HEADER: &str = "x-mock-stall-after-chunks";
const REDIRECT_HEADER: &str = "x-mock-redirect";

/// Settings of a mock upstream.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// Delay before every answer (before the first event of a stream).
    pub latency: Duration,
}

/// The mock's routes, with a fresh request counter.
pub fn router(config: MockConfig) -> Router {
    let state = Arc::new(MockState {
        config,
        requests: AtomicU64::new(0),
        completions: AtomicU64::new(0),
        tags: Mutex::default(),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/fim/completions", post(fim_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route("/v1/agents/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/files/{id}/content", get(file_content))
        .route(REQUESTS_PATH, get(request_count))
        .route(STATS_PATH, get(tag_stats))
        .route(STATS_RESET_PATH, post(reset_tag_stats))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Documented usage rule, public so tests can compute expected figures: whitespace-separated
/// words plus ASCII punctuation characters.
pub fn prompt_tokens_of(text: &str) -> u64 {
    let words = text.split_whitespace().count();
    let punctuation = text.bytes().filter(u8::is_ascii_punctuation).count();
    (words + punctuation) as u64
}

/// What the mock saw of the requests tagged `x-mock-tag: NAME`: the answer of
/// `GET /mock/stats?tag=NAME` (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagStats {
    /// Requests received.
    pub count: u64,
    /// Requests whose answer has not been sent whole yet (and whose client is still there).
    pub in_flight: u64,
    /// The most requests in flight at once.
    pub max_in_flight: u64,
}

struct MockState {
    config: MockConfig,
    requests: AtomicU64,
    completions: AtomicU64,
    tags: Mutex<HashMap<String, Arc<TagCounters>>>,
}

type SharedState = Arc<MockState>;

impl MockState {
    fn next_id(&self) -> u64 {
        self.completions.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TagCounters>>> {
        self.tags.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct TagCounters {
    count: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl TagCounters {
    fn arrive(self: Arc<Self>) -> InFlight {
        self.count.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    fn snapshot(&self) -> TagStats {
        TagStats {
            count: self.count.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
        }
    }
}

/// One tagged request in flight; dropping it ends it.
struct InFlight(Arc<TagCounters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body that keeps its request in flight until the body has ended, failed, or been
/// dropped (hyper drops it when the client goes away). Size hints pass through, so an answer
/// keeps its `content-length` when tagged.
struct TrackedBody {
    body: Body,
    in_flight: Option<InFlight>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            self.in_flight = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body that passes on its first `left` frames, then never another: a stalled
/// upstream. The connection stays open until the client goes away.
struct StalledBody {
    body: Body,
    left: usize,
}

impl HttpBody for StalledBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.left == 0 {
            return Poll::Pending;
        }
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if matches!(frame, Some(Ok(_))) {
            self.left -= 1;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.left > 0 && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

async fn count_requests(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let control_route = request.uri().path().starts_with(CONTROL_PREFIX);
    let count = if control_route {
        state.requests.load(Ordering::Relaxed)
    } else {
        state.requests.fetch_add(1, Ordering::Relaxed) + 1
    };
    let shaping = if control_route {
        Ok((None, None))
    } else {
        let stall = control(request.headers(), STALL_HEADER, |v| v.parse::<usize>().ok());
        let redirect = control(request.headers(), REDIRECT_HEADER, |v| {
            HeaderValue::from_str(v).ok()
        });
        stall.and_then(|stall| redirect.map(|redirect| (stall, redirect)))
    };
    let (stall, redirect) = match shaping {
        Ok(shaping) => shaping,
        Err(error) => return error.into_response(),
    };
    let answer = |request: Request| async move {
        match redirect {
            Some(location) => {
                let error = ApiError::new(
                    StatusCode::TEMPORARY_REDIRECT,
                    "invalid_request_error",
                    "Moved",
                );
                let mut response = error.into_response();
                response.headers_mut().insert(header::LOCATION, location);
                response
            }
            None => next.run(request).await,
        }
    };
    let mut response = if control_route {
        answer(request).await
    } else {
        let tag = control(request.headers(), TAG_HEADER, |tag| {
            (!tag.is_empty()).then(|| tag.to_owned())
        });
        match tag {
            Err(error) => error.into_response(),
            Ok(None) => answer(request).await,
            Ok(Some(tag)) => {
                let counters = state.tags().entry(tag).or_default().clone();
                let in_flight = counters.arrive();
                answer(request).await.map(|body| {
                    Body::new(TrackedBody {
                        body,
                        in_flight: Some(in_flight),
                    })
                })
            }
        }
    };
    if let Some(chunks) = stall {
        response = response.map(|body| Body::new(StalledBody { body, left: chunks }));
    }
    let headers = response.headers_mut();
    headers.insert("x-mock-request-count", HeaderValue::from(count));
    if let Ok(id) = HeaderValue::from_str(&format!("mock-req-{count}")) {
        headers.insert("x-request-id", id);
    }
    headers.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from_static("999"),
    );
    response
}

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            code: None,
        }
    }

    fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn forced(status: StatusCode) -> Self {
        if status == StatusCode::TOO_MANY_REQUESTS {
            Self {
                code: Some("1300"),
                ..Self::new(status, "rate_limited", "Upstream rate limit")
            }
        } else if status.is_server_error() {
            Self::new(status, "server_error", format!("Upstream error: {status}"))
        } else {
            Self::new(
                status,
                "invalid_request_error",
                format!("Upstream error: {status}"),
            )
        }
    }

    fn body(&self) -> Value {
        json!({
            "object": "error",
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[derive(Debug, Default)]
struct Controls {
    latency: Duration,
    usage: Option<(u64, u64)>,
    no_usage: bool,
    fail_after_chunks: Option<u64>,
    status: Option<StatusCode>,
    echo: Option<Value>,
    usage_in_last_chunk: bool,
    reject_stream_options: bool,
}

impl Controls {
    fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let echo = control(headers, "x-mock-echo-headers", parse_flag)?.unwrap_or(false);
        Ok(Self {
            latency: Duration::from_millis(
                control(headers, "x-mock-latency-ms", |v| v.parse().ok())?.unwrap_or(0),
            ),
            usage: control(headers, "x-mock-usage", parse_usage)?,
            no_usage: control(headers, "x-mock-no-usage", parse_flag)?.unwrap_or(false),
            fail_after_chunks: control(headers, "x-mock-fail-after-chunks", |v| v.parse().ok())?,
            status: control(headers, "x-mock-status", parse_error_status)?,
            echo: echo.then(|| headers_json(headers)),
            usage_in_last_chunk: control(headers, "x-mock-stream-usage", |v| {
                (v == "last-chunk").then_some(true)
            })?
            .unwrap_or(false),
            reject_stream_options: control(headers, "x-mock-reject-stream-options", parse_flag)?
                .unwrap_or(false),
        })
    }

    fn delay(&self, config: &MockConfig) -> Duration {
        config.latency + self.latency
    }

    fn check_status(&self) -> Result<(), ApiError> {
        self.status
            .map_or(Ok(()), |status| Err(ApiError::forced(status)))
    }

    fn usage_or(&self, computed: Usage) -> Option<Usage> {
        match self.usage {
            _ if self.no_usage => None,
            Some((prompt, completion)) => Some(Usage::new(prompt, completion)),
            None => Some(computed),
        }
    }

    fn decorate(&self, body: &mut Value) {
        if let (Some(headers), Some(object)) = (&self.echo, body.as_object_mut()) {
            object.insert("received_headers".to_owned(), headers.clone());
        }
    }

    fn reply(&self, status: StatusCode, mut body: Value) -> Response {
        self.decorate(&mut body);
        if self.fail_after_chunks.is_none() {
            return (status, Json(body)).into_response();
        }
        // A JSON answer that breaks: its headers and the first half of its body, then an error.
        let bytes = serde_json::to_vec(&body).expect("JSON values serialize");
        let half = Bytes::copy_from_slice(&bytes[..bytes.len() / 2]);
        let chunks: Vec<io::Result<Bytes>> = vec![
            Ok(half),
            Err(io::Error::other("mock upstream aborted the answer")),
        ];
        let body = stream::iter(chunks).then(|chunk| async move {
            if chunk.is_err() {
                // Lets hyper flush the first half before the error tears the connection down.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            chunk
        });
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(body),
        )
            .into_response()
    }

    fn fail(&self, error: ApiError) -> Response {
        self.reply(error.status, error.body())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Controls {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers)
    }
}

fn control<T>(
    headers: &HeaderMap,
    name: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|value| parse(value.trim()))
        .map(Some)
        .ok_or_else(|| ApiError::invalid_request(format!("Invalid {name} header: {value:?}")))
}

fn parse_flag(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn parse_usage(value: &str) -> Option<(u64, u64)> {
    let (prompt, completion) = value.split_once(',')?;
    Some((prompt.trim().parse().ok()?, completion.trim().parse().ok()?))
}

fn parse_error_status(value: &str) -> Option<StatusCode> {
    let code = value
        .parse()
        .ok()
        .filter(|code| (400..=599).contains(code))?;
    StatusCode::from_u16(code).ok()
}

fn headers_json(headers: &HeaderMap) -> Value {
    let received: Map<String, Value> = headers
        .keys()
        .map(|name| {
            let values: Vec<_> = headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect();
            (name.as_str().to_owned(), Value::from(values.join(", ")))
        })
        .collect();
    Value::Object(received)
}

async fn pause(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

async fn json_answer(
    state: &MockState,
    controls: &Controls,
    result: Result<Value, ApiError>,
) -> Response {
    pause(controls.delay(&state.config)).await;
    match result {
        Ok(body) => controls.reply(StatusCode::OK, body),
        Err(error) => controls.fail(error),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::invalid_request(format!("Invalid JSON body: {error}")))
}

fn decode<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    T::deserialize(body)
        .map_err(|error| ApiError::invalid_request(format!("Invalid request body: {error}")))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn default_model() -> String {
    "mock-model".to_owned()
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Usage {
    fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextInput {
    One(String),
    Many(Vec<String>),
}

impl TextInput {
    fn pieces(&self) -> &[String] {
        match self {
            Self::One(text) => std::slice::from_ref(text),
            Self::Many(texts) => texts,
        }
    }

    fn tokens(&self) -> u64 {
        self.pieces()
            .iter()
            .map(|text| prompt_tokens_of(text))
            .sum()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    text: Option<String>,
}

impl MessageContent {
    fn tokens(&self) -> u64 {
        match self {
            Self::Text(text) => prompt_tokens_of(text),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .map(prompt_tokens_of)
                .sum(),
        }
    }
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct GenerationOptions {
    #[serde(default = "default_model")]
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    options: GenerationOptions,
}

#[derive(Deserialize)]
struct TextRequest {
    prompt: Option<TextInput>,
    #[serde(flatten)]
    options: GenerationOptions,
}

#[derive(Deserialize)]
struct FimRequest {
    prompt: Option<String>,
    suffix: Option<String>,
    #[serde(flatten)]
    options: GenerationOptions,
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(default = "default_model")]
    model: String,
    input: Option<TextInput>,
}

trait CompletionRequest: DeserializeOwned {
    const KIND: Kind;
    fn prompt_tokens(&self) -> u64;
    fn into_options(self) -> GenerationOptions;
}

impl CompletionRequest for ChatRequest {
    const KIND: Kind = Kind::Chat;

    fn prompt_tokens(&self) -> u64 {
        self.messages
            .iter()
            .map(|message| {
                TOKENS_PER_MESSAGE + message.content.as_ref().map_or(0, MessageContent::tokens)
            })
            .sum()
    }

    fn into_options(self) -> GenerationOptions {
        self.options
    }
}

impl CompletionRequest for TextRequest {
    const KIND: Kind = Kind::Text;

    fn prompt_tokens(&self) -> u64 {
        self.prompt.as_ref().map_or(0, TextInput::tokens)
    }

    fn into_options(self) -> GenerationOptions {
        self.options
    }
}

impl CompletionRequest for FimRequest {
    const KIND: Kind = Kind::Chat;

    fn prompt_tokens(&self) -> u64 {
        [&self.prompt, &self.suffix]
            .into_iter()
            .flatten()
            .map(|text| prompt_tokens_of(text))
            .sum()
    }

    fn into_options(self) -> GenerationOptions {
        self.options
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn object(self) -> &'static str {
        match self {
            Self::Chat => "chat.completion",
            Self::Text => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Self::Chat => "chat.completion.chunk",
            Self::Text => "text_completion",
        }
    }

    fn choice(self, index: u64, content: &str, finish_reason: &str) -> Value {
        match self {
            Self::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }),
            Self::Text => json!({
                "index": index,
                "text": content,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        }
    }

    fn delta(self, index: u64, content: Option<&str>, finish_reason: Option<&str>) -> Value {
        match self {
            Self::Chat => json!({
                "index": index,
                "delta": content.map_or_else(|| json!({}), |content| json!({"content": content})),
                "finish_reason": finish_reason,
            }),
            Self::Text => json!({
                "index": index,
                "text": content.unwrap_or_default(),
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        }
    }
}

fn reply_words(count: u64) -> impl Iterator<Item = String> {
    VOCABULARY
        .iter()
        .cycle()
        .take(usize::try_from(count).unwrap_or(usize::MAX))
        .map(|word| format!("{word} "))
}

struct Completion {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    choices: u64,
    words: u64,
    finish_reason: &'static str,
    usage: Option<Usage>,
    stream: bool,
    include_usage: bool,
}

impl Completion {
    fn new(
        state: &MockState,
        controls: &Controls,
        kind: Kind,
        prompt_tokens: u64,
        options: GenerationOptions,
    ) -> Self {
        let choices = options.n.unwrap_or(1).max(1);
        let limit = options.max_tokens.or(options.max_completion_tokens);
        let (words, finish_reason) = match (controls.usage, limit) {
            (Some((_, completion)), _) => (completion.min(MAX_REPLY_WORDS), "stop"),
            (None, Some(limit)) if limit < DEFAULT_REPLY_WORDS => (limit, "length"),
            (None, _) => (DEFAULT_REPLY_WORDS, "stop"),
        };
        Self {
            kind,
            id: format!("cmpl-mock-{}", state.next_id()),
            created: unix_now(),
            model: options.model,
            choices,
            words,
            finish_reason,
            usage: controls.usage_or(Usage::new(prompt_tokens, words * choices)),
            stream: options.stream.unwrap_or(false),
            include_usage: options
                .stream_options
                .is_some_and(|stream_options| stream_options.include_usage),
        }
    }

    fn body(&self) -> Value {
        let content: String = reply_words(self.words).collect();
        let choices: Vec<Value> = (0..self.choices)
            .map(|index| self.kind.choice(index, &content, self.finish_reason))
            .collect();
        let mut body = json!({
            "id": self.id,
            "object": self.kind.object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = self.usage {
            body["usage"] = json!(usage);
        }
        body
    }

    /// A stream's chunk: with `usage` when given; else with `"usage": null` where OpenAI sends
    /// it (`null_usage`: the client asked for the usage chunk), and without the field where
    /// it does not and where Mistral never does (an outside audit: a Mistral SDK refuses
    /// `null`).
    fn chunk(&self, choices: Vec<Value>, usage: Option<Usage>, null_usage: bool) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.kind.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if usage.is_some() || null_usage {
            chunk["usage"] = json!(usage);
        }
        chunk
    }

    fn events(&self, controls: &Controls) -> Vec<io::Result<Bytes>> {
        let sse = |mut chunk: Value| {
            controls.decorate(&mut chunk);
            Ok(Bytes::from(format!("data: {chunk}\n\n")))
        };
        let null_usage = self.include_usage && !controls.usage_in_last_chunk;
        let content = (0..self.choices)
            .flat_map(|index| reply_words(self.words).map(move |word| (index, word)))
            .map(|(index, word)| {
                let delta = self.kind.delta(index, Some(&word), None);
                self.chunk(vec![delta], None, null_usage)
            });
        if let Some(limit) = controls.fail_after_chunks {
            return content
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .map(sse)
                .chain(iter::once(Err(io::Error::other(
                    "mock upstream aborted the stream",
                ))))
                .collect();
        }
        let last_choice = self.choices - 1;
        let finishes = (0..self.choices).map(|index| {
            let usage = self
                .usage
                .filter(|_| controls.usage_in_last_chunk && index == last_choice);
            let delta = self.kind.delta(index, None, Some(self.finish_reason));
            self.chunk(vec![delta], usage, null_usage)
        });
        let usage_chunk = self
            .usage
            .filter(|_| null_usage)
            .map(|usage| self.chunk(Vec::new(), Some(usage), true));
        content
            .chain(finishes)
            .chain(usage_chunk)
            .map(sse)
            .chain(iter::once(Ok(Bytes::from_static(b"data: [DONE]\n\n"))))
            .collect()
    }
}

fn event_stream(events: Vec<io::Result<Bytes>>, delay: Duration) -> Response {
    let gap = delay / STREAM_GAP_DIVISOR;
    let events = stream::iter(events.into_iter().enumerate()).then(move |(position, event)| {
        let wait = if position == 0 { delay } else { gap };
        async move {
            pause(wait).await;
            if event.is_err() {
                // Hands control back to hyper so it flushes the chunks already queued before the
                // error tears the connection down.
                tokio::task::yield_now().await;
            }
            event
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

fn completion_from<R: CompletionRequest>(
    state: &MockState,
    controls: &Controls,
    body: &[u8],
) -> Result<Completion, ApiError> {
    controls.check_status()?;
    let json = parse_json(body)?;
    if controls.reject_stream_options && json.get("stream_options").is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "Extra inputs are not permitted: body.stream_options",
        ));
    }
    let request: R = decode(&json)?;
    let prompt_tokens = request.prompt_tokens();
    Ok(Completion::new(
        state,
        controls,
        R::KIND,
        prompt_tokens,
        request.into_options(),
    ))
}

async fn complete<R: CompletionRequest>(
    state: &MockState,
    controls: Controls,
    body: &[u8],
) -> Response {
    match completion_from::<R>(state, &controls, body) {
        Ok(completion) if completion.stream => {
            event_stream(completion.events(&controls), controls.delay(&state.config))
        }
        result => json_answer(state, &controls, result.map(|completion| completion.body())).await,
    }
}

async fn chat_completions(
    State(state): State<SharedState>,
    controls: Controls,
    body: Bytes,
) -> Response {
    complete::<ChatRequest>(&state, controls, &body).await
}

async fn text_completions(
    State(state): State<SharedState>,
    controls: Controls,
    body: Bytes,
) -> Response {
    complete::<TextRequest>(&state, controls, &body).await
}

async fn fim_completions(
    State(state): State<SharedState>,
    controls: Controls,
    body: Bytes,
) -> Response {
    complete::<FimRequest>(&state, controls, &body).await
}

fn embedding_of(text: &str) -> Vec<f32> {
    let seed = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..EMBEDDING_DIMENSIONS)
        .map(|dimension| {
            let bits = seed.rotate_left(dimension * 8).to_le_bytes();
            f32::from(u16::from_le_bytes([bits[0], bits[1]])) / f32::from(u16::MAX) * 2.0 - 1.0
        })
        .collect()
}

fn embeddings_body(state: &MockState, controls: &Controls, body: &[u8]) -> Result<Value, ApiError> {
    controls.check_status()?;
    let request: EmbeddingRequest = decode(&parse_json(body)?)?;
    let inputs = request.input.as_ref().map_or(&[][..], TextInput::pieces);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({"object": "embedding", "index": index, "embedding": embedding_of(text)})
        })
        .collect();
    let prompt_tokens = inputs.iter().map(|text| prompt_tokens_of(text)).sum();
    let mut answer = json!({
        "id": format!("embd-mock-{}", state.next_id()),
        "object": "list",
        "data": data,
        "model": request.model,
    });
    if let Some(usage) = controls.usage_or(Usage::new(prompt_tokens, 0)) {
        answer["usage"] = json!(Usage::new(usage.prompt_tokens, 0));
    }
    Ok(answer)
}

async fn embeddings(State(state): State<SharedState>, controls: Controls, body: Bytes) -> Response {
    let result = embeddings_body(&state, &controls, &body);
    json_answer(&state, &controls, result).await
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ResponsesInput {
    Text(String),
    Items(Vec<ResponsesItem>),
}

#[derive(Deserialize)]
struct ResponsesItem {
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
struct ResponsesRequest {
    #[serde(default = "default_model")]
    model: String,
    input: Option<ResponsesInput>,
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    stream: Option<bool>,
}

impl ResponsesRequest {
    /// `instructions`, plus `input`: a string, or 3 per item plus its content's texts.
    fn input_tokens(&self) -> u64 {
        let input = match &self.input {
            None => 0,
            Some(ResponsesInput::Text(text)) => prompt_tokens_of(text),
            Some(ResponsesInput::Items(items)) => items
                .iter()
                .map(|item| {
                    TOKENS_PER_MESSAGE + item.content.as_ref().map_or(0, MessageContent::tokens)
                })
                .sum(),
        };
        input + self.instructions.as_deref().map_or(0, prompt_tokens_of)
    }
}

/// An answer of the OpenAI Responses API.
struct ModelResponse {
    id: String,
    message_id: String,
    created: u64,
    model: String,
    words: u64,
    incomplete: bool,
    usage: Option<Usage>,
}

impl ModelResponse {
    fn new(state: &MockState, controls: &Controls, request: &ResponsesRequest) -> Self {
        let (words, incomplete) = match (controls.usage, request.max_output_tokens) {
            (Some((_, completion)), _) => (completion, false),
            (None, Some(limit)) if limit < DEFAULT_REPLY_WORDS => (limit, true),
            (None, _) => (DEFAULT_REPLY_WORDS, false),
        };
        let n = state.next_id();
        Self {
            id: format!("resp_mock_{n}"),
            message_id: format!("msg_mock_{n}"),
            created: unix_now(),
            model: request.model.clone(),
            words,
            incomplete,
            usage: controls.usage_or(Usage::new(request.input_tokens(), words)),
        }
    }

    fn status(&self) -> &'static str {
        if self.incomplete {
            "incomplete"
        } else {
            "completed"
        }
    }

    /// The response object; `done: false` is the one of `response.created` (no output yet).
    fn body(&self, done: bool) -> Value {
        let text: String = reply_words(self.words).collect();
        let output = if done {
            json!([{
                "type": "message",
                "id": self.message_id,
                "status": self.status(),
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }])
        } else {
            json!([])
        };
        let usage = self.usage.filter(|_| done).map(|u| {
            json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            })
        });
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": if done { self.status() } else { "in_progress" },
            "incomplete_details": if done && self.incomplete {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "model": self.model,
            "output": output,
            "usage": usage,
        })
    }

    /// `response.created`, one `response.output_text.delta` per word, `response.output_text.done`,
    /// then `response.completed` (or `response.incomplete`) with the usage; no `[DONE]`.
    fn events(&self, controls: &Controls) -> Vec<io::Result<Bytes>> {
        let mut sequence = 0u64;
        let mut event = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(sequence);
            sequence += 1;
            controls.decorate(&mut data);
            Ok(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
        };
        // The item and its text part are announced before their deltas, as the OpenAI API does:
        // the SDKs' stream helpers (`responses.stream`) refuse a delta for an item they were not
        // told of (an outside audit).
        let item = |status: &str, text: Option<&str>| {
            json!({"id": self.message_id, "type": "message", "status": status,
                   "role": "assistant",
                   "content": text.map_or_else(|| json!([]), |t| json!([
                       {"type": "output_text", "text": t, "annotations": []}]))})
        };
        let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
        let mut events = vec![
            event("response.created", json!({"response": self.body(false)})),
            event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item("in_progress", None)}),
            ),
            event(
                "response.content_part.added",
                json!({"item_id": self.message_id, "output_index": 0, "content_index": 0,
                       "part": part("")}),
            ),
        ];
        let words: Vec<String> = reply_words(self.words).collect();
        for (i, word) in words.iter().enumerate() {
            if controls.fail_after_chunks == Some(i as u64) {
                events.push(Err(io::Error::other("mock upstream aborted the stream")));
                return events;
            }
            events.push(event(
                "response.output_text.delta",
                json!({"item_id": self.message_id, "output_index": 0, "content_index": 0, "delta": word}),
            ));
        }
        if controls.fail_after_chunks.is_some() {
            events.push(Err(io::Error::other("mock upstream aborted the stream")));
            return events;
        }
        let text = words.concat();
        events.push(event(
            "response.output_text.done",
            json!({"item_id": self.message_id, "output_index": 0, "content_index": 0,
                   "text": text}),
        ));
        events.push(event(
            "response.content_part.done",
            json!({"item_id": self.message_id, "output_index": 0, "content_index": 0,
                   "part": part(&text)}),
        ));
        events.push(event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item(self.status(), Some(&text))}),
        ));
        let last = if self.incomplete {
            "response.incomplete"
        } else {
            "response.completed"
        };
        events.push(event(last, json!({"response": self.body(true)})));
        events
    }
}

async fn responses(State(state): State<SharedState>, controls: Controls, body: Bytes) -> Response {
    let request = controls
        .check_status()
        .and_then(|()| parse_json(&body))
        .and_then(|json| {
            if json.pointer("/stream_options/include_usage").is_some() {
                return Err(ApiError::invalid_request(
                    "Unknown parameter: 'stream_options.include_usage'.",
                ));
            }
            decode::<ResponsesRequest>(&json)
        });
    match request {
        Ok(request) => {
            let answer = ModelResponse::new(&state, &controls, &request);
            if request.stream.unwrap_or(false) {
                event_stream(answer.events(&controls), controls.delay(&state.config))
            } else {
                json_answer(&state, &controls, Ok(answer.body(true))).await
            }
        }
        Err(error) => json_answer(&state, &controls, Err(error)).await,
    }
}

/// A model as both APIs list it: OpenAI's fields, and Mistral's `type` and `capabilities`, which
/// the mistralai SDK requires (an outside audit: its `models.list()` failed on the mock).
fn model_card(id: &str, created: u64) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "mistralai",
        "type": "base",
        "capabilities": {
            "completion_chat": true,
            "completion_fim": id.starts_with("codestral"),
            "function_calling": true,
            "fine_tuning": false,
            "vision": false,
        },
    })
}

async fn models(State(state): State<SharedState>, controls: Controls) -> Response {
    let created = unix_now();
    let result = controls.check_status().map(|()| {
        let data: Vec<Value> = MODELS.iter().map(|id| model_card(id, created)).collect();
        json!({"object": "list", "data": data})
    });
    json_answer(&state, &controls, result).await
}

/// `GET /v1/models/{id}`: one of `MODELS`, or `404` (`model_not_found`).
async fn model(
    State(state): State<SharedState>,
    controls: Controls,
    Path(id): Path<String>,
) -> Response {
    let result = controls.check_status().and_then(|()| {
        MODELS
            .iter()
            .find(|m| **m == id)
            .map(|m| model_card(m, unix_now()))
            .ok_or_else(|| {
                let error = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("The model '{id}' does not exist"),
                );
                ApiError {
                    code: Some("model_not_found"),
                    ..error
                }
            })
    });
    json_answer(&state, &controls, result).await
}

/// A binary download: `FILE_CHUNKS` chunks of `FILE_CHUNK` bytes, with `x-mock-latency-ms`
/// between chunks, so a test can tell a body passed on as it comes from one buffered whole.
async fn file_content(headers: HeaderMap) -> Response {
    let gap = headers
        .get("x-mock-latency-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let chunks = stream::iter(0..FILE_CHUNKS).then(move |i| async move {
        if i > 0 && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Ok::<_, io::Error>(Bytes::from(vec![b'a' + i as u8; FILE_CHUNK]))
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// Size of `GET /v1/files/{id}/content`: 4 chunks of 16 KiB.
pub const FILE_CHUNKS: usize = 4;
pub const FILE_CHUNK: usize = 16 * 1024;

async fn request_count(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({"count": state.requests.load(Ordering::Relaxed)}))
}

#[derive(Deserialize)]
struct StatsQuery {
    tag: Option<String>,
}

async fn tag_stats(
    State(state): State<SharedState>,
    Query(query): Query<StatsQuery>,
) -> Result<Json<TagStats>, ApiError> {
    let tag = query
        .tag
        .ok_or_else(|| ApiError::invalid_request("Missing query parameter: tag"))?;
    let counters = state.tags().get(&tag).cloned();
    Ok(Json(
        counters.map_or_else(TagStats::default, |c| c.snapshot()),
    ))
}

async fn reset_tag_stats(State(state): State<SharedState>) -> StatusCode {
    state.tags().clear();
    StatusCode::NO_CONTENT
}

async fn not_found(State(state): State<SharedState>, controls: Controls, uri: Uri) -> Response {
    let error = ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("No route for {}", uri.path()),
    );
    json_answer(&state, &controls, Err(error)).await
}

async fn method_not_allowed(
    State(state): State<SharedState>,
    controls: Controls,
    uri: Uri,
) -> Response {
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("Method not allowed on {}", uri.path()),
    );
    json_answer(&state, &controls, Err(error)).await
}

#[cfg(test)]
mod tests {
    use std::{io::ErrorKind, net::SocketAddr};

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    struct RawResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
        complete: bool,
    }

    impl RawResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body).expect("JSON body")
        }

        fn events(&self) -> Vec<&str> {
            self.body
                .split("\n\n")
                .filter_map(|event| event.strip_prefix("data: "))
                .collect()
        }

        fn chunks(&self) -> Vec<Value> {
            self.events()
                .into_iter()
                .filter(|event| *event != "[DONE]")
                .map(|event| serde_json::from_str(event).expect("JSON chunk"))
                .collect()
        }
    }

    async fn start() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            MockConfig::default(),
            std::future::pending(),
        ));
        addr
    }

    async fn send(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> RawResponse {
        let socket = open(addr, method, path, headers, body).await;
        let mut raw = Vec::new();
        while read_some(&socket, &mut raw).await {}
        parse_response(&String::from_utf8(raw).unwrap())
    }

    /// Connects and sends a whole request; the answer is left to read.
    async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> TcpStream {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);

        let socket = TcpStream::connect(addr).await.unwrap();
        let mut unsent = request.as_bytes();
        while !unsent.is_empty() {
            socket.writable().await.unwrap();
            match socket.try_write(unsent) {
                Ok(written) => unsent = &unsent[written..],
                Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                Err(error) => panic!("write failed: {error}"),
            }
        }
        socket
    }

    /// Reads what has arrived into `raw`; false at the end of the answer.
    async fn read_some(socket: &TcpStream, raw: &mut Vec<u8>) -> bool {
        let mut buffer = [0; 4096];
        loop {
            socket.readable().await.unwrap();
            match socket.try_read(&mut buffer) {
                Ok(0) => return false,
                Ok(read) => {
                    raw.extend_from_slice(&buffer[..read]);
                    return true;
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
    }

    fn parse_response(raw: &str) -> RawResponse {
        let (head, payload) = raw.split_once("\r\n\r\n").expect("complete head");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value == "chunked");
        let (body, complete) = if chunked {
            dechunk(payload)
        } else {
            (payload.to_owned(), true)
        };
        RawResponse {
            status: status.parse().unwrap(),
            headers,
            body,
            complete,
        }
    }

    fn dechunk(mut payload: &str) -> (String, bool) {
        let mut body = String::new();
        while let Some((size, rest)) = payload.split_once("\r\n") {
            let Ok(size) = usize::from_str_radix(size, 16) else {
                break;
            };
            if size == 0 {
                return (body, true);
            }
            let Some(data) = rest.get(..size) else {
                break;
            };
            body.push_str(data);
            payload = rest.get(size + 2..).unwrap_or_default();
        }
        (body, false)
    }

    const CHAT: &str = r#"{"model":"mistral-small-latest","max_tokens":5,"messages":[
        {"role":"system","content":"You are terse."},
        {"role":"user","content":[{"type":"text","text":"Hello, world! How are you?"}]}]}"#;

    fn stream_body(include_usage: bool) -> String {
        format!(
            r#"{{"model":"m","stream":true,"stream_options":{{"include_usage":{include_usage}}},
                "messages":[{{"role":"user","content":"Hi!"}}]}}"#
        )
    }

    #[test]
    fn usage_rule_counts_words_and_punctuation() {
        assert_eq!(prompt_tokens_of(""), 0);
        assert_eq!(prompt_tokens_of("Hello, world!"), 4);
        assert_eq!(prompt_tokens_of("  fn main() {}\n"), 7);
        assert_eq!(prompt_tokens_of("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), 1);
    }

    #[tokio::test]
    async fn chat_completion_reports_documented_usage() {
        let addr = start().await;
        let response = send(addr, "POST", "/v1/chat/completions", &[], CHAT).await;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-mock-request-count"), Some("1"));
        assert_eq!(response.header("x-ratelimit-limit-requests"), Some("999"));
        let body = response.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "mistral-small-latest");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 18, "completion_tokens": 5, "total_tokens": 23})
        );
        let choice = &body["choices"][0];
        assert_eq!(
            choice["message"]["content"],
            "mock token stream lorem ipsum "
        );
        assert_eq!(choice["finish_reason"], "length");
    }

    #[tokio::test]
    async fn completion_count_scales_with_n_and_defaults_to_sixteen() {
        let addr = start().await;
        let body = r#"{"model":"m","n":2,"prompt":["a b","c."]}"#;
        let response = send(addr, "POST", "/v1/completions", &[], body).await;
        let body = response.json();
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"].as_array().unwrap().len(), 2);
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 32, "total_tokens": 36})
        );
    }

    #[tokio::test]
    async fn stream_without_include_usage_has_no_usage_chunk() {
        let addr = start().await;
        let response = send(
            addr,
            "POST",
            "/v1/chat/completions",
            &[],
            &stream_body(false),
        )
        .await;
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        assert!(response.complete);
        assert_eq!(response.events().last(), Some(&"[DONE]"));
        let chunks = response.chunks();
        assert_eq!(chunks.len(), 17);
        // No `usage` field where the client did not ask for the usage (OpenAI's way).
        assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
        assert!(chunks
            .iter()
            .all(|chunk| chunk["choices"].as_array().unwrap().len() == 1));
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "mock ");
        assert_eq!(chunks[16]["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn stream_with_include_usage_ends_with_usage_chunk() {
        let addr = start().await;
        let response = send(
            addr,
            "POST",
            "/v1/chat/completions",
            &[],
            &stream_body(true),
        )
        .await;
        let chunks = response.chunks();
        assert_eq!(chunks.len(), 18);
        let (last, others) = chunks.split_last().unwrap();
        assert!(others
            .iter()
            .all(|chunk| chunk.get("usage") == Some(&Value::Null)));
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21})
        );
    }

    #[tokio::test]
    async fn mistral_style_stream_usage_rides_on_the_final_chunk() {
        let addr = start().await;
        let headers = [
            ("x-mock-stream-usage", "last-chunk"),
            ("x-mock-usage", "7,2"),
        ];
        let body = r#"{"stream":true,"prompt":"def f(","suffix":"return 1"}"#;
        let response = send(addr, "POST", "/v1/fim/completions", &headers, body).await;
        let chunks = response.chunks();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            chunks[2]["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
        );
        // Mistral's earlier chunks have no `usage` field, not even null.
        assert!(chunks[..2].iter().all(|chunk| chunk.get("usage").is_none()));

        let headers = [("x-mock-reject-stream-options", "1")];
        let response = send(
            addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            &stream_body(true),
        )
        .await;
        assert_eq!(response.status, 422);
        assert_eq!(response.json()["object"], "error");
    }

    #[tokio::test]
    async fn failing_stream_is_a_broken_transfer() {
        let addr = start().await;
        let headers = [("x-mock-fail-after-chunks", "3")];
        let response = send(
            addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            &stream_body(true),
        )
        .await;
        assert_eq!(response.status, 200);
        assert!(!response.complete);
        assert!(!response.body.contains("[DONE]"));
        assert_eq!(response.chunks().len(), 3);
    }

    #[tokio::test]
    async fn errors_are_json_and_requests_are_counted() {
        let addr = start().await;
        let response = send(addr, "POST", "/v1/chat/completions", &[], "{nope").await;
        assert_eq!(response.status, 400);
        assert_eq!(response.json()["type"], "invalid_request_error");
        assert_eq!(response.json()["param"], Value::Null);

        let headers = [("x-mock-status", "429")];
        let response = send(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        assert_eq!(response.status, 429);
        assert_eq!(response.json()["code"], "1300");

        let response = send(addr, "GET", "/v2/nothing", &[], "").await;
        assert_eq!(response.status, 404);
        assert_eq!(response.json()["object"], "error");

        let response = send(addr, "GET", REQUESTS_PATH, &[], "").await;
        assert_eq!(response.json(), json!({"count": 3}));
    }

    #[tokio::test]
    async fn echoes_headers_and_serves_models_and_embeddings() {
        let addr = start().await;
        let headers = [
            ("x-mock-echo-headers", "1"),
            ("authorization", "Bearer upstream"),
        ];
        let response = send(addr, "GET", "/v1/models", &headers, "").await;
        let body = response.json();
        assert_eq!(body["data"].as_array().unwrap().len(), 3);
        assert_eq!(body["data"][0]["type"], "base");
        assert_eq!(body["data"][2]["capabilities"]["completion_fim"], true);
        let one = send(addr, "GET", "/v1/models/codestral-latest", &[], "").await;
        assert_eq!(one.status, 200);
        assert_eq!(one.json()["id"], "codestral-latest");
        let none = send(addr, "GET", "/v1/models/gpt-none", &[], "").await;
        assert_eq!(none.status, 404);
        assert_eq!(none.json()["code"], "model_not_found");
        assert_eq!(body["received_headers"]["authorization"], "Bearer upstream");

        let body = r#"{"model":"mistral-embed","input":["one two","three!"]}"#;
        let response = send(addr, "POST", "/v1/embeddings", &[], body).await;
        let body = response.json();
        assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(body["usage"]["prompt_tokens"], 4);
        assert_eq!(body["usage"]["total_tokens"], 4);
    }

    #[tokio::test]
    async fn responses_answer_in_openai_shapes_with_usage_in_the_final_event() {
        let addr = start().await;
        let body = r#"{"model":"gpt-mock","instructions":"Be terse.","max_output_tokens":3,
            "input":[{"role":"user","content":"Hello, world!"},
                     {"type":"message","role":"user","content":[{"type":"input_text","text":"Hi"}]}]}"#;
        let response = send(addr, "POST", "/v1/responses", &[], body).await;
        assert_eq!(response.status, 200);
        let v = response.json();
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["output"][0]["content"][0]["text"], "mock token stream ");
        // instructions 3, items (3 + 4) + (3 + 1).
        assert_eq!(v["usage"]["input_tokens"], 3 + 7 + 4);
        assert_eq!(v["usage"]["output_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 17);

        let body = r#"{"model":"gpt-mock","input":"Hi there","stream":true}"#;
        let headers = [("x-mock-usage", "5,2")];
        let response = send(addr, "POST", "/v1/responses", &headers, body).await;
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        assert!(response.complete);
        let events: Vec<&str> = response
            .body
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .collect();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e.lines().next().unwrap().trim_start_matches("event: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let last: Value = serde_json::from_str(
            events[8]
                .lines()
                .nth(1)
                .unwrap()
                .trim_start_matches("data: "),
        )
        .unwrap();
        assert_eq!(last["sequence_number"], 8);
        assert_eq!(last["response"]["usage"]["total_tokens"], 7);
        assert!(!response.body.contains("[DONE]"));
    }

    #[tokio::test]
    async fn stalled_answers_send_their_headers_and_then_nothing() {
        let addr = start().await;
        let headers = [("x-mock-stall-after-chunks", "2")];
        let socket = open(
            addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            &stream_body(false),
        )
        .await;
        let mut raw = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while tokio::time::timeout_at(deadline, read_some(&socket, &mut raw))
            .await
            .unwrap_or(false)
        {}
        let text = String::from_utf8(raw).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(text.matches("data: ").count(), 2, "{text}");

        // A JSON error whose body never comes.
        let headers = [("x-mock-stall-after-chunks", "0"), ("x-mock-status", "500")];
        let socket = open(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        let mut raw = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while tokio::time::timeout_at(deadline, read_some(&socket, &mut raw))
            .await
            .unwrap_or(false)
        {}
        let text = String::from_utf8(raw).unwrap();
        assert!(text.starts_with("HTTP/1.1 500"), "{text}");
        assert!(!text.contains("server_error"), "{text}");
    }

    #[tokio::test]
    async fn redirects_and_broken_json_answers_on_request() {
        let addr = start().await;
        let headers = [("x-mock-redirect", "/v1/models")];
        let response = send(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        assert_eq!(response.status, 307);
        assert_eq!(response.header("location"), Some("/v1/models"));

        let headers = [("x-mock-fail-after-chunks", "0")];
        let response = send(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        assert_eq!(response.status, 200);
        assert!(!response.complete);
        assert!(response.body.starts_with("{\""), "{}", response.body);
    }

    async fn stats(addr: SocketAddr, tag: &str) -> TagStats {
        let response = send(addr, "GET", &format!("{STATS_PATH}?tag={tag}"), &[], "").await;
        assert_eq!(response.status, 200, "{}", response.body);
        serde_json::from_value(response.json()).unwrap()
    }

    /// Polls the stats of `tag` until `done` holds; fails after 5 s.
    async fn stats_until(
        addr: SocketAddr,
        tag: &str,
        done: impl Fn(&TagStats) -> bool,
    ) -> TagStats {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stats = stats(addr, tag).await;
            if done(&stats) {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stats of {tag}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stats_of(count: u64, in_flight: u64, max_in_flight: u64) -> TagStats {
        TagStats {
            count,
            in_flight,
            max_in_flight,
        }
    }

    #[tokio::test]
    async fn tagged_requests_are_in_flight_until_answered() {
        let addr = start().await;
        const SLOW: &[(&str, &str)] = &[("x-mock-tag", "ws-a"), ("x-mock-latency-ms", "400")];
        let requests: Vec<_> = (0..3)
            .map(|_| tokio::spawn(send(addr, "POST", "/v1/chat/completions", SLOW, CHAT)))
            .collect();
        stats_until(addr, "ws-a", |stats| stats.in_flight == 3).await;
        let other = send(addr, "GET", "/v1/models", &[("x-mock-tag", "ws-b")], "").await;
        assert_eq!(other.status, 200);
        assert_eq!(stats(addr, "ws-b").await, stats_of(1, 0, 1));
        for request in requests {
            assert_eq!(request.await.unwrap().status, 200);
        }
        assert_eq!(stats(addr, "ws-a").await, stats_of(3, 0, 3));
        assert_eq!(stats(addr, "nobody").await, TagStats::default());

        // Errors reach the upstream too; an untagged request counts under no tag.
        let failing = [("x-mock-tag", "ws-b"), ("x-mock-status", "500")];
        let response = send(addr, "POST", "/v1/chat/completions", &failing, CHAT).await;
        assert_eq!(response.status, 500);
        send(addr, "GET", "/v1/models", &[], "").await;
        assert_eq!(stats(addr, "ws-b").await, stats_of(2, 0, 1));
    }

    #[tokio::test]
    async fn a_stream_is_in_flight_until_its_last_event() {
        let addr = start().await;
        // 320 ms before the first event, then 20 ms between events.
        let headers = [("x-mock-tag", "s"), ("x-mock-latency-ms", "320")];
        let socket = open(
            addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            &stream_body(true),
        )
        .await;
        let mut raw = Vec::new();
        while !String::from_utf8_lossy(&raw).contains("data: ") {
            assert!(read_some(&socket, &mut raw).await, "stream ended early");
        }
        assert_eq!(stats(addr, "s").await, stats_of(1, 1, 1));
        while read_some(&socket, &mut raw).await {}
        let response = parse_response(&String::from_utf8(raw).unwrap());
        assert!(response.complete);
        assert_eq!(stats(addr, "s").await, stats_of(1, 0, 1));

        // A download streams too.
        let headers = [("x-mock-tag", "file"), ("x-mock-latency-ms", "100")];
        let socket = open(addr, "GET", "/v1/files/f/content", &headers, "").await;
        let mut raw = Vec::new();
        assert!(read_some(&socket, &mut raw).await);
        assert_eq!(stats(addr, "file").await.in_flight, 1);
        while read_some(&socket, &mut raw).await {}
        assert_eq!(stats(addr, "file").await, stats_of(1, 0, 1));
    }

    #[tokio::test]
    async fn a_request_whose_client_leaves_is_no_longer_in_flight() {
        let addr = start().await;
        // Gone while the answer is being prepared.
        let headers = [("x-mock-tag", "json"), ("x-mock-latency-ms", "30000")];
        let socket = open(addr, "POST", "/v1/chat/completions", &headers, CHAT).await;
        stats_until(addr, "json", |stats| stats.in_flight == 1).await;
        drop(socket);
        stats_until(addr, "json", |stats| stats.in_flight == 0).await;

        // Gone in the middle of a stream.
        let headers = [("x-mock-tag", "stream"), ("x-mock-latency-ms", "30000")];
        let body = stream_body(false);
        let socket = open(addr, "POST", "/v1/chat/completions", &headers, &body).await;
        let mut raw = Vec::new();
        assert!(read_some(&socket, &mut raw).await, "the head arrives");
        assert_eq!(stats(addr, "stream").await, stats_of(1, 1, 1));
        drop(socket);
        let stats = stats_until(addr, "stream", |stats| stats.in_flight == 0).await;
        assert_eq!(stats, stats_of(1, 0, 1));
    }

    #[tokio::test]
    async fn stats_reset_and_control_routes_are_not_counted() {
        let addr = start().await;
        send(addr, "GET", "/v1/models", &[("x-mock-tag", "t")], "").await;
        assert_eq!(stats(addr, "t").await, stats_of(1, 0, 1));
        let response = send(addr, "POST", STATS_RESET_PATH, &[], "").await;
        assert_eq!(response.status, 204);
        assert_eq!(stats(addr, "t").await, TagStats::default());

        let response = send(addr, "GET", STATS_PATH, &[], "").await;
        assert_eq!(response.status, 400);
        assert_eq!(response.json()["type"], "invalid_request_error");
        let response = send(addr, "GET", "/v1/models", &[("x-mock-tag", " ")], "").await;
        assert_eq!(response.status, 400);
        assert!(response.json()["message"]
            .as_str()
            .unwrap()
            .contains("x-mock-tag"));

        // The stats routes, like /mock/requests, are not requests to the upstream.
        let response = send(addr, "GET", REQUESTS_PATH, &[], "").await;
        assert_eq!(response.json(), json!({"count": 2}));
        assert_eq!(response.header("x-mock-request-count"), Some("2"));
    }

    /// A usage of any size is reported as asked, but the reply is at most `MAX_REPLY_WORDS`
    /// words long; and a body of 3 MiB (under the gateway's default bound) is read.
    #[tokio::test]
    async fn huge_usages_and_bodies_are_answered_without_exhausting_memory() {
        let addr = start().await;
        let body = r#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#;
        let headers = [("x-mock-usage", "1,200000000000")];
        let response = send(addr, "POST", "/v1/chat/completions", &headers, body).await;
        assert_eq!(response.status, 200);
        let v = response.json();
        assert_eq!(v["usage"]["completion_tokens"], 200_000_000_000u64);
        let words = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count();
        assert_eq!(words as u64, MAX_REPLY_WORDS);

        let big = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "a".repeat(3 << 20)
        );
        let response = send(addr, "POST", "/v1/chat/completions", &[], &big).await;
        assert_eq!(response.status, 200, "{}", response.body);
    }
}
