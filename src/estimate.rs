//! What a request will cost, before it is sent.
//!
//! # The rule
//! - **Prompt**: `ceil(characters / 4)` of every text the request sends (message contents,
//!   `prompt`, `suffix`, embedding `input`), plus 4 per chat message and 3 for the reply's framing.
//!   Four characters per token is the usual average for English text with BPE tokenizers.
//! - **Completion**, per choice (`n`, default 1):
//!   `min(max_tokens, recent)`, where `recent` is the largest completion among the last
//!   `history` (16) that this workspace got for this model, or `default_completion_tokens` (256)
//!   before there is any. Without `max_tokens` it is `recent`. Embeddings have no completion.
//! - **Reserved** = prompt + completion, capped by the smallest token limit of the workspace
//!   (so a request whose prompt fits always can get in). Never all of `max_tokens` by default:
//!   reserving the worst case is what makes other platforms answer 429 at a fraction of the limit.
//!
//! The estimate only decides admission. Every request is settled to the usage the upstream
//! reports, so an under-estimate is corrected at once (the bucket may go into debt) and an
//! over-estimate is refunded.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use crate::limiter::{Nanos, TokenCost};
use crate::model::WorkspaceId;

/// The metered routes, by what their body looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    FimCompletions,
    Embeddings,
}

impl Endpoint {
    pub fn of_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/fim/completions" => Some(Endpoint::FimCompletions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
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

fn text_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Characters of text in a content value: a string, or an array of parts with `text`.
fn content_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts.iter().map(content_chars).sum(),
        Value::Object(o) => o.get("text").map(content_chars).unwrap_or(0),
        _ => 0,
    }
}

/// Reads a metered request. `Err` carries a message for a `400`.
pub fn inspect(endpoint: Endpoint, body: &Value) -> Result<RequestInfo, String> {
    let obj = body
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err("'model' must be a string".into()),
    };
    let prompt_tokens = match endpoint {
        Endpoint::ChatCompletions => {
            let messages = obj
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("'messages' must be an array")?;
            let chars: usize = messages
                .iter()
                .map(|m| m.get("content").map(content_chars).unwrap_or(0))
                .sum();
            text_tokens(chars) + 4 * messages.len() as u64 + 3
        }
        Endpoint::Completions | Endpoint::FimCompletions => {
            let prompt = obj.get("prompt").ok_or("'prompt' is required")?;
            let suffix = obj.get("suffix").map(content_chars).unwrap_or(0);
            text_tokens(content_chars(prompt) + suffix) + 3
        }
        Endpoint::Embeddings => {
            let input = obj.get("input").ok_or("'input' is required")?;
            let chars = match input {
                Value::Array(items) => items.iter().map(content_chars).sum(),
                other => content_chars(other),
            };
            text_tokens(chars)
        }
    };
    let max_tokens = obj
        .get("max_tokens")
        .or_else(|| obj.get("max_completion_tokens"))
        .and_then(Value::as_u64);
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let choices = obj
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128);
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

    /// Records a completion's size as reported by the upstream (per choice).
    pub fn observe(&self, workspace: WorkspaceId, model: &str, completion_tokens: u64, now: Nanos) {
        let mut shard = self.shard(workspace);
        let models = shard.entry(workspace).or_default();
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

    fn chat(body: Value) -> RequestInfo {
        inspect(Endpoint::ChatCompletions, &body).unwrap()
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
    fn malformed_bodies_are_refused() {
        assert!(inspect(Endpoint::ChatCompletions, &json!([])).is_err());
        assert!(inspect(Endpoint::ChatCompletions, &json!({"messages": "x"})).is_err());
        assert!(inspect(Endpoint::Embeddings, &json!({"model": "e"})).is_err());
        let e = inspect(Endpoint::Embeddings, &json!({"input": ["abcd", "efgh"]})).unwrap();
        assert_eq!((e.prompt_tokens, e.completes), (2, false));
    }
}
