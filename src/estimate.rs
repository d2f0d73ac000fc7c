//! What a request will cost, before it is sent.
//!
//! # The rule
//! - **Prompt**: `ceil(characters / 4)` of every text the request sends (message contents,
//!   `prompt`, `suffix`, embedding `input`; for `/v1/responses`, `instructions` and `input`, a
//!   string or a list of items with text content), plus 4 per chat message or input item and 3
//!   for the reply's framing. Four characters per token is the usual average for English text
//!   with BPE tokenizers.
//! - **Completion**, per choice (`n`, default 1):
//!   `min(max_tokens, recent)`, where `recent` is the largest completion among the last
//!   `history` (16) that this workspace got for this model, or `default_completion_tokens` (256)
//!   before there is any. Without `max_tokens` it is `recent`. Embeddings have no completion.
//!   (`max_completion_tokens` stands for `max_tokens` in chat, `max_output_tokens` in responses.)
//! - **Reserved** = prompt + completion, capped by the smallest token limit of the workspace
//!   (so a request whose prompt fits always can get in). Never all of `max_tokens` by default:
//!   reserving the worst case is what makes other platforms answer 429 at a fraction of the limit.
//!
//! # Bounds
//! A model name is the client's to choose: one longer than [`MAX_MODEL_NAME_BYTES`] is refused
//! (`400`), and the estimator remembers at most [`MAX_MODELS_PER_WORKSPACE`] models per
//! workspace (a new one replaces the one seen least recently), so a client cycling through
//! made-up names cannot grow its memory.
//!
//! The estimate only decides admission. Every request is settled to the usage the upstream
//! reports, so an under-estimate is corrected at once (the bucket may go into debt) and an
//! over-estimate is refunded.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use crate::limiter::{Nanos, TokenCost};
use crate::model::WorkspaceId;

/// The longest model name a metered request may give, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 256;
/// The most models whose completion sizes are remembered per workspace.
pub const MAX_MODELS_PER_WORKSPACE: usize = 64;

/// The metered routes, by what their body looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    FimCompletions,
    Embeddings,
    Responses,
}

impl Endpoint {
    const ALL: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::FimCompletions,
        Endpoint::Embeddings,
        Endpoint::Responses,
    ];

    /// The route's path, as forwarded.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::FimCompletions => "/v1/fim/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
        }
    }

    /// The metered route of a normalised path, in any letter case (an upstream that ignores
    /// case must not be reached unmetered by `/v1/Chat/Completions`).
    pub fn of_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .find(|e| e.path().eq_ignore_ascii_case(path))
    }

    /// Whether the route takes `stream_options.include_usage` (the Responses API has no such
    /// option: its final event always carries the usage).
    pub fn takes_stream_options(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::FimCompletions
        )
    }
}

/// What the gateway reads from a metered request body.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub choices: u64,
    pub completes: bool,
}

/// Counts the prompt tokens of the texts a request sends: feed it every text with
/// [`PromptCounter::add_text`], then read [`PromptCounter::tokens`]. A pure function of the
/// texts, the same on every instance; no tokenizer.
#[derive(Debug, Clone, Default)]
pub struct PromptCounter {
    chars: u64,
}

impl PromptCounter {
    pub fn add_text(&mut self, text: &str) {
        self.chars += text.chars().count() as u64;
    }

    /// The estimated tokens of all the texts added so far.
    pub fn tokens(&self) -> u64 {
        self.chars.div_ceil(4)
    }
}

/// The estimated tokens of one text, as the prompt estimate counts it.
pub fn prompt_tokens_of_text(text: &str) -> u64 {
    let mut counter = PromptCounter::default();
    counter.add_text(text);
    counter.tokens()
}

/// Adds the text of a content value: a string, or an array of parts with `text`.
fn add_content(counter: &mut PromptCounter, v: &Value) {
    match v {
        Value::String(s) => counter.add_text(s),
        Value::Array(parts) => parts.iter().for_each(|p| add_content(counter, p)),
        Value::Object(o) => {
            if let Some(t) = o.get("text") {
                add_content(counter, t)
            }
        }
        _ => {}
    }
}

/// The tokens of the texts in some content values.
fn content_tokens<'a>(values: impl IntoIterator<Item = &'a Value>) -> u64 {
    let mut counter = PromptCounter::default();
    values
        .into_iter()
        .for_each(|v| add_content(&mut counter, v));
    counter.tokens()
}

/// A field that may be left out (or null), else of one JSON kind: `Err` names the field.
fn optional<'a, T>(
    obj: &'a serde_json::Map<String, Value>,
    field: &str,
    kind: &str,
    read: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v)
            .map(Some)
            .ok_or_else(|| format!("'{field}' must be {kind}")),
    }
}

/// Reads a metered request. `Err` carries a message for a `400`: what the upstream APIs would
/// refuse is refused here, before anything is reserved or forwarded. `max_tokens_limit` bounds
/// `max_tokens` (and `max_completion_tokens`, `max_output_tokens`).
pub fn inspect(
    endpoint: Endpoint,
    body: &Value,
    max_tokens_limit: u64,
) -> Result<RequestInfo, String> {
    let obj = body
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    // Both upstream APIs require it.
    let model = match obj.get("model") {
        None | Some(Value::Null) => return Err("'model' is required".into()),
        Some(Value::String(m)) if m.is_empty() => return Err("'model' must not be empty".into()),
        Some(Value::String(m)) if m.len() > MAX_MODEL_NAME_BYTES => {
            return Err(format!(
                "'model' must be at most {MAX_MODEL_NAME_BYTES} bytes long"
            ))
        }
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err("'model' must be a string".into()),
    };
    let prompt_tokens = match endpoint {
        Endpoint::ChatCompletions => {
            let messages = obj
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("'messages' must be an array")?;
            if !messages.iter().all(Value::is_object) {
                return Err("'messages' must be an array of objects".into());
            }
            content_tokens(messages.iter().filter_map(|m| m.get("content")))
                + 4 * messages.len() as u64
                + 3
        }
        Endpoint::Completions | Endpoint::FimCompletions => {
            let prompt = obj.get("prompt").ok_or("'prompt' is required")?;
            content_tokens([Some(prompt), obj.get("suffix")].into_iter().flatten()) + 3
        }
        Endpoint::Embeddings => {
            let input = obj.get("input").ok_or("'input' is required")?;
            match input {
                Value::Array(items) => content_tokens(items),
                other => content_tokens([other]),
            }
        }
        Endpoint::Responses => {
            let input = obj.get("input").ok_or("'input' is required")?;
            let instructions = obj.get("instructions");
            let (tokens, items) = match input {
                Value::String(_) => (
                    content_tokens([Some(input), instructions].into_iter().flatten()),
                    1,
                ),
                Value::Array(items) => (
                    content_tokens(
                        items
                            .iter()
                            .filter_map(|i| i.get("content"))
                            .chain(instructions),
                    ),
                    items.len(),
                ),
                _ => return Err("'input' must be a string or an array of items".into()),
            };
            tokens + 4 * items as u64 + 3
        }
    };
    let fields: &[&str] = match endpoint {
        Endpoint::Responses => &["max_output_tokens"],
        _ => &["max_tokens", "max_completion_tokens"],
    };
    let mut max_tokens = None;
    for field in fields {
        let kind = "a whole number of tokens, 0 or more";
        if let Some(n) = optional(obj, field, kind, Value::as_u64)? {
            if n > max_tokens_limit {
                return Err(format!("'{field}' must be at most {max_tokens_limit}"));
            }
            max_tokens.get_or_insert(n);
        }
    }
    let stream = optional(obj, "stream", "true or false", Value::as_bool)?.unwrap_or(false);
    let n = optional(obj, "n", "a whole number from 1 to 128", Value::as_u64)?;
    if n.is_some_and(|n| !(1..=128).contains(&n)) {
        return Err("'n' must be a whole number from 1 to 128".into());
    }
    let client_wants_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let choices = n.unwrap_or(1);
    Ok(RequestInfo {
        model,
        stream,
        client_wants_usage,
        prompt_tokens,
        max_tokens,
        choices,
        completes: endpoint != Endpoint::Embeddings,
    })
}

#[derive(Debug, Default)]
struct History {
    recent: VecDeque<u64>,
    last_seen: Nanos,
}

type Histories = HashMap<WorkspaceId, HashMap<String, History>>;

const SHARDS: usize = 16;

/// Remembers recent completion sizes per workspace and model, to estimate the next one.
/// Sharded by workspace, so that workspaces do not wait on one another.
pub struct Estimator {
    default_completion: u64,
    history_len: usize,
    shards: Vec<Mutex<Histories>>,
}

impl Estimator {
    pub fn new(default_completion: u64, history_len: usize) -> Self {
        Estimator {
            default_completion,
            history_len: history_len.max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, workspace: WorkspaceId) -> std::sync::MutexGuard<'_, Histories> {
        self.shards[(workspace as u64 as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn estimate(&self, workspace: WorkspaceId, info: &RequestInfo) -> TokenCost {
        if !info.completes {
            return TokenCost {
                prompt: info.prompt_tokens,
                estimate: info.prompt_tokens,
            };
        }
        let recent = self
            .shard(workspace)
            .get(&workspace)
            .and_then(|models| models.get(info.model.as_deref().unwrap_or("")))
            .and_then(|h| h.recent.iter().max().copied())
            .unwrap_or(self.default_completion);
        let per_choice = match info.max_tokens {
            Some(max) => max.min(recent),
            None => recent,
        };
        TokenCost {
            prompt: info.prompt_tokens,
            estimate: info.prompt_tokens + per_choice * info.choices,
        }
    }

    /// Records a completion's size as reported by the upstream (per choice). A workspace's
    /// models beyond `MAX_MODELS_PER_WORKSPACE` replace the one seen least recently.
    pub fn observe(&self, workspace: WorkspaceId, model: &str, completion_tokens: u64, now: Nanos) {
        let mut shard = self.shard(workspace);
        let models = shard.entry(workspace).or_default();
        if !models.contains_key(model) && models.len() >= MAX_MODELS_PER_WORKSPACE {
            let oldest = models
                .iter()
                .min_by_key(|(_, h)| h.last_seen)
                .map(|(m, _)| m.clone());
            if let Some(oldest) = oldest {
                models.remove(&oldest);
            }
        }
        let h = match models.get_mut(model) {
            Some(h) => h,
            None => models.entry(model.to_string()).or_default(),
        };
        if h.recent.len() == self.history_len {
            h.recent.pop_front();
        }
        h.recent.push_back(completion_tokens);
        h.last_seen = now;
    }

    /// Forgets workspaces and models not seen for `idle_for`: memory follows the active ones.
    pub fn evict_idle(&self, now: Nanos, idle_for: Nanos) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, models| {
                models.retain(|_, h| now.saturating_sub(h.last_seen) < idle_for);
                !models.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMIT: u64 = 1_000_000;

    fn chat(body: Value) -> RequestInfo {
        inspect(Endpoint::ChatCompletions, &body, LIMIT).unwrap()
    }

    #[test]
    fn prompt_counts_characters_and_messages() {
        let info = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "12345678"},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}]}
        ]}));
        // 12 chars -> 3 tokens, 2 messages -> 8, framing 3.
        assert_eq!(info.prompt_tokens, 3 + 8 + 3);
        assert_eq!(info.model.as_deref(), Some("m"));
    }

    #[test]
    fn completion_is_not_all_of_max_tokens() {
        let est = Estimator::new(256, 16);
        let info = chat(json!({"model": "m", "max_tokens": 8000, "messages": []}));
        assert_eq!(est.estimate(1, &info).estimate, 3 + 256);
        est.observe(1, "m", 40, 0);
        est.observe(1, "m", 90, 0);
        assert_eq!(est.estimate(1, &info).estimate, 3 + 90);
        // Another workspace has its own history.
        assert_eq!(est.estimate(2, &info).estimate, 3 + 256);
        // A small max_tokens caps the expectation.
        let small = chat(json!({"model": "m", "max_tokens": 10, "n": 2, "messages": []}));
        assert_eq!(est.estimate(1, &small).estimate, 3 + 20);
    }

    #[test]
    fn history_is_bounded_and_evicted() {
        let est = Estimator::new(256, 2);
        let info = chat(json!({"model": "m", "messages": []}));
        est.observe(1, "m", 500, 0);
        est.observe(1, "m", 10, 0);
        est.observe(1, "m", 20, 0);
        assert_eq!(est.estimate(1, &info).estimate, 3 + 20);
        est.evict_idle(100, 50);
        assert_eq!(est.estimate(1, &info).estimate, 3 + 256);
    }

    #[test]
    fn responses_are_estimated_from_input_instructions_and_max_output_tokens() {
        let e = inspect(
            Endpoint::Responses,
            &json!({"model": "m", "input": "12345678", "instructions": "abcd",
                    "max_output_tokens": 7, "max_tokens": 900, "stream": true}),
            LIMIT,
        )
        .unwrap();
        // 12 chars -> 3, one item -> 4, framing 3.
        assert_eq!(e.prompt_tokens, 3 + 4 + 3);
        assert_eq!((e.max_tokens, e.stream, e.completes), (Some(7), true, true));
        let e = inspect(
            Endpoint::Responses,
            &json!({"model": "m", "input": [
                {"role": "user", "content": "abcd"},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "efgh"}, {"type": "input_image"}]},
                {"type": "function_call_output", "call_id": "c", "output": "{}"}
            ]}),
            LIMIT,
        )
        .unwrap();
        assert_eq!(e.prompt_tokens, 2 + 3 * 4 + 3);
        assert_eq!(e.max_tokens, None);
        assert!(inspect(Endpoint::Responses, &json!({"model": "m"}), LIMIT).is_err());
        assert!(inspect(
            Endpoint::Responses,
            &json!({"model": "m", "input": 5}),
            LIMIT
        )
        .is_err());
    }

    #[test]
    fn metered_paths_match_in_any_case_and_only_metered_routes() {
        assert_eq!(
            Endpoint::of_path("/v1/Chat/COMPLETIONS"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::of_path("/v1/responses"),
            Some(Endpoint::Responses)
        );
        assert_eq!(Endpoint::of_path("/v1/responses/resp_1"), None);
        assert_eq!(Endpoint::of_path("/v1/models"), None);
        assert!(!Endpoint::Responses.takes_stream_options());
    }

    #[test]
    fn model_names_are_bounded_in_length_and_in_number() {
        let long = "m".repeat(MAX_MODEL_NAME_BYTES + 1);
        let e = inspect(
            Endpoint::ChatCompletions,
            &json!({"model": long, "messages": []}),
            LIMIT,
        )
        .unwrap_err();
        assert!(e.contains("256"), "{e}");
        let fits = "m".repeat(MAX_MODEL_NAME_BYTES);
        assert!(inspect(
            Endpoint::ChatCompletions,
            &json!({"model": fits, "messages": []}),
            LIMIT
        )
        .is_ok());

        let est = Estimator::new(256, 16);
        est.observe(1, "kept", 10, 0);
        for i in 0..1000u64 {
            est.observe(1, &format!("made-up-{i}"), 5, 1 + i);
        }
        est.observe(1, "kept", 10, 5000);
        let tracked = est.shard(1).get(&1).map_or(0, HashMap::len);
        assert_eq!(tracked, MAX_MODELS_PER_WORKSPACE);
        // The least recently seen went first; the one seen last is still there.
        let info = chat(json!({"model": "kept", "messages": []}));
        assert_eq!(est.estimate(1, &info).estimate, 3 + 10);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let chat = Endpoint::ChatCompletions;
        let refused = [
            json!([]),
            json!("text"),
            json!({"messages": []}),
            json!({"model": null, "messages": []}),
            json!({"model": "", "messages": []}),
            json!({"model": 7, "messages": []}),
            json!({"model": "m", "messages": "x"}),
            json!({"model": "m", "messages": ["x"]}),
            json!({"model": "m", "messages": [], "max_tokens": -1}),
            json!({"model": "m", "messages": [], "max_tokens": 1.5}),
            json!({"model": "m", "messages": [], "max_tokens": "10"}),
            json!({"model": "m", "messages": [], "max_tokens": LIMIT + 1}),
            json!({"model": "m", "messages": [], "max_completion_tokens": u64::MAX}),
            json!({"model": "m", "messages": [], "stream": "yes"}),
            json!({"model": "m", "messages": [], "n": 0}),
            json!({"model": "m", "messages": [], "n": 129}),
        ];
        for body in refused {
            assert!(inspect(chat, &body, LIMIT).is_err(), "{body}");
        }
        let e = inspect(
            chat,
            &json!({"model": "m", "messages": [], "max_tokens": 9}),
            8,
        );
        assert_eq!(e.unwrap_err(), "'max_tokens' must be at most 8");
        assert!(inspect(Endpoint::Embeddings, &json!({"model": "e"}), LIMIT).is_err());

        let taken = [
            json!({"model": "m", "messages": [], "max_tokens": LIMIT}),
            json!({"model": "m", "messages": [], "max_tokens": null, "stream": null}),
            json!({"model": "m", "messages": [], "n": 128, "stream": true}),
        ];
        for body in taken {
            assert!(inspect(chat, &body, LIMIT).is_ok(), "{body}");
        }
        let body = json!({"model": "e", "input": ["abcd", "efgh"]});
        let e = inspect(Endpoint::Embeddings, &body, LIMIT).unwrap();
        assert_eq!((e.prompt_tokens, e.completes), (2, false));
    }
}
