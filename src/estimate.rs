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

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

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
    pub const ALL: [Endpoint; 5] = [
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

fn text_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Characters of one text.
fn text_chars(text: &str) -> usize {
    text.chars().count()
}

/// A field that may be left out (or null), else of one JSON kind: `Err` names the field.
fn optional<'a, T>(
    field: &Scalar<'a>,
    name: &str,
    kind: &str,
    read: impl Fn(&Scalar<'a>) -> Option<T>,
) -> Result<Option<T>, String> {
    match field {
        Scalar::Absent | Scalar::Null => Ok(None),
        v => read(v)
            .map(Some)
            .ok_or_else(|| format!("'{name}' must be {kind}")),
    }
}

/// Reads a metered request body. `Err` carries a message for a `400`: what the upstream APIs
/// would refuse is refused here, before anything is reserved or forwarded. `max_tokens_limit`
/// bounds `max_tokens` (and `max_completion_tokens`, `max_output_tokens`).
///
/// The body is read in one pass, borrowing from it, without building a tree: only the fields
/// below are looked at (see `Fields`), the rest is skipped. A field given twice counts as its
/// last value, as a tree would have it (and as the upstream APIs read it).
pub fn inspect(
    endpoint: Endpoint,
    body: &[u8],
    max_tokens_limit: u64,
) -> Result<RequestInfo, String> {
    let fields = Fields::read(endpoint, body)
        .map_err(|e| format!("The request body is not valid JSON: {e}"))?
        .ok_or("the request body must be a JSON object")?;
    // Both upstream APIs require it.
    let model = match fields.model {
        Scalar::Absent | Scalar::Null => return Err("'model' is required".into()),
        Scalar::Str(m) if m.is_empty() => return Err("'model' must not be empty".into()),
        Scalar::Str(m) if m.len() > MAX_MODEL_NAME_BYTES => {
            return Err(format!(
                "'model' must be at most {MAX_MODEL_NAME_BYTES} bytes long"
            ))
        }
        Scalar::Str(m) => Some(m.into_owned()),
        _ => return Err("'model' must be a string".into()),
    };
    let prompt_tokens = match endpoint {
        Endpoint::ChatCompletions => {
            let (chars, messages) = match fields.messages {
                Some(Messages::Objects { chars, count }) => (chars, count),
                Some(Messages::NotAllObjects) => {
                    return Err("'messages' must be an array of objects".into())
                }
                Some(Messages::NotArray) | None => return Err("'messages' must be an array".into()),
            };
            text_tokens(chars) + 4 * messages as u64 + 3
        }
        Endpoint::Completions | Endpoint::FimCompletions => {
            let prompt = fields.prompt.ok_or("'prompt' is required")?;
            text_tokens(prompt + fields.suffix) + 3
        }
        Endpoint::Embeddings => match fields.input.ok_or("'input' is required")? {
            Input::Text(chars) | Input::Items { chars, .. } => text_tokens(chars),
            Input::Other => 0,
        },
        Endpoint::Responses => {
            let input = fields.input.ok_or("'input' is required")?;
            let (chars, items) = match input {
                Input::Text(chars) => (chars, 1),
                Input::Items { chars, count } => (chars, count),
                Input::Other => return Err("'input' must be a string or an array of items".into()),
            };
            text_tokens(chars + fields.instructions) + 4 * items as u64 + 3
        }
    };
    let limits: &[(&str, &Scalar)] = match endpoint {
        Endpoint::Responses => &[("max_output_tokens", &fields.max_output_tokens)],
        _ => &[
            ("max_tokens", &fields.max_tokens),
            ("max_completion_tokens", &fields.max_completion_tokens),
        ],
    };
    let mut max_tokens = None;
    for (field, value) in limits {
        let kind = "a whole number of tokens, 0 or more";
        if let Some(n) = optional(value, field, kind, Scalar::as_u64)? {
            if n > max_tokens_limit {
                return Err(format!("'{field}' must be at most {max_tokens_limit}"));
            }
            max_tokens.get_or_insert(n);
        }
    }
    let stream =
        optional(&fields.stream, "stream", "true or false", Scalar::as_bool)?.unwrap_or(false);
    let n = optional(
        &fields.n,
        "n",
        "a whole number from 1 to 128",
        Scalar::as_u64,
    )?;
    if n.is_some_and(|n| !(1..=128).contains(&n)) {
        return Err("'n' must be a whole number from 1 to 128".into());
    }
    let choices = n.unwrap_or(1);
    Ok(RequestInfo {
        model,
        stream,
        client_wants_usage: fields.include_usage,
        prompt_tokens,
        max_tokens,
        choices,
        completes: endpoint != Endpoint::Embeddings,
    })
}

// How the body is read: serde visitors over the borrowed bytes. Each field is recorded as what
// it was (`Scalar::Other` for a wrong kind) and judged only once the whole body has been read, so
// that a body broken anywhere is refused as invalid JSON, and the checks run in their order
// above whatever order the fields come in. Strings are borrowed unless they hold escapes.

/// The fields of a metered body that the estimate and the checks read; the last of a repeated
/// field counts.
#[derive(Default)]
struct Fields<'a> {
    model: Scalar<'a>,
    /// Chat.
    messages: Option<Messages>,
    /// Completions and FIM: `Some` when present, even as `null` (characters of its text).
    prompt: Option<usize>,
    suffix: usize,
    /// Embeddings and responses: `Some` when present, even as `null`.
    input: Option<Input>,
    instructions: usize,
    max_tokens: Scalar<'a>,
    max_completion_tokens: Scalar<'a>,
    max_output_tokens: Scalar<'a>,
    stream: Scalar<'a>,
    n: Scalar<'a>,
    /// `stream_options.include_usage` is `true`.
    include_usage: bool,
}

impl<'a> Fields<'a> {
    /// `Ok(None)`: valid JSON, but not an object.
    fn read(endpoint: Endpoint, body: &'a [u8]) -> Result<Option<Fields<'a>>, String> {
        // Checked whole first: the parser does not look into the strings it skips.
        let text = std::str::from_utf8(body)
            .map_err(|e| format!("it is not UTF-8 (at byte {})", e.valid_up_to()))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = de
            .deserialize_any(BodyVisitor(endpoint))
            .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(fields)
    }
}

/// A field read as one of the scalar kinds that are checked.
#[derive(Debug, Default)]
enum Scalar<'a> {
    #[default]
    Absent,
    Null,
    Bool(bool),
    Whole(u64),
    Str(Cow<'a, str>),
    /// A negative or fractional number, an array, an object.
    Other,
}

impl Scalar<'_> {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Whole(n) => Some(*n),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Chat `messages`.
enum Messages {
    NotArray,
    NotAllObjects,
    /// Characters in the messages' `content`, and how many messages.
    Objects {
        chars: usize,
        count: usize,
    },
}

/// `input`: of embeddings, a text or a list of texts (or of token arrays); of responses, a text
/// or a list of items with `content`.
enum Input {
    Text(usize),
    Items { chars: usize, count: usize },
    Other,
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implements the visits of every JSON kind that a visitor maps to one value (`$v`), skipping
/// arrays and objects.
macro_rules! other_kinds {
    ($v:expr; $($kind:ident),*) => {
        $(other_kinds!(@one $v; $kind);)*
    };
    (@one $v:expr; bool) => { fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($v) } };
    (@one $v:expr; i64) => { fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($v) } };
    (@one $v:expr; u64) => { fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($v) } };
    (@one $v:expr; f64) => { fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($v) } };
    (@one $v:expr; str) => { fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($v) } };
    (@one $v:expr; unit) => { fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($v) } };
    (@one $v:expr; seq) => {
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            skip_seq(seq)?;
            Ok($v)
        }
    };
    (@one $v:expr; map) => {
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            skip_map(map)?;
            Ok($v)
        }
    };
}

/// The top-level fields the estimate reads, by name (escapes in names are undone by the
/// parser, so `"mo\u0064el"` is `model`).
enum Key {
    Model,
    Messages,
    Prompt,
    Suffix,
    Input,
    Instructions,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    Stream,
    N,
    StreamOptions,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "model" => Key::Model,
                    "messages" => Key::Messages,
                    "prompt" => Key::Prompt,
                    "suffix" => Key::Suffix,
                    "input" => Key::Input,
                    "instructions" => Key::Instructions,
                    "max_tokens" => Key::MaxTokens,
                    "max_completion_tokens" => Key::MaxCompletionTokens,
                    "max_output_tokens" => Key::MaxOutputTokens,
                    "stream" => Key::Stream,
                    "n" => Key::N,
                    "stream_options" => Key::StreamOptions,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Whether an object's key is `.0`.
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        struct V(&'static str);
        impl Visitor<'_> for V {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
                Ok(v == self.0)
            }
        }
        d.deserialize_identifier(V(self.0))
    }
}

/// The value of the field `name` in an object (the last one when repeated), skipping the rest.
fn field_of<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    mut map: A,
    name: &'static str,
) -> Result<Option<T>, A::Error> {
    let mut found = None;
    while let Some(is) = map.next_key_seed(KeyIs(name))? {
        if is {
            found = Some(map.next_value::<T>()?);
        } else {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(found)
}

struct BodyVisitor(Endpoint);

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Option<Fields<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_kinds!(None; bool, i64, u64, f64, str, unit, seq);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let endpoint = self.0;
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Model => f.model = map.next_value()?,
                Key::Messages if endpoint == Endpoint::ChatCompletions => {
                    f.messages = Some(map.next_value()?)
                }
                Key::Prompt
                    if matches!(endpoint, Endpoint::Completions | Endpoint::FimCompletions) =>
                {
                    f.prompt = Some(map.next_value::<ContentChars>()?.0)
                }
                Key::Suffix => f.suffix = map.next_value::<ContentChars>()?.0,
                Key::Input if endpoint == Endpoint::Embeddings => {
                    let ContentChars(chars) = map.next_value()?;
                    f.input = Some(Input::Text(chars));
                }
                Key::Input if endpoint == Endpoint::Responses => {
                    f.input = Some(map.next_value::<ResponsesInput>()?.0)
                }
                Key::Instructions => f.instructions = map.next_value::<ContentChars>()?.0,
                Key::MaxTokens => f.max_tokens = map.next_value()?,
                Key::MaxCompletionTokens => f.max_completion_tokens = map.next_value()?,
                Key::MaxOutputTokens => f.max_output_tokens = map.next_value()?,
                Key::Stream => f.stream = map.next_value()?,
                Key::N => f.n = map.next_value()?,
                Key::StreamOptions => f.include_usage = map.next_value::<IncludeUsage>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(f))
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(Scalar::Other; f64, seq, map);
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Whole(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).map_or(Scalar::Other, Scalar::Whole))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

/// Characters of text in a content value: a string, or an array of parts with `text` (parts
/// may nest); anything else has none.
struct ContentChars(usize);

impl<'de> Deserialize<'de> for ContentChars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentChars;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(ContentChars(0); bool, i64, u64, f64, unit);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ContentChars(text_chars(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut chars = 0usize;
                while let Some(ContentChars(c)) = seq.next_element()? {
                    chars = chars.saturating_add(c);
                }
                Ok(ContentChars(chars))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(ContentChars(
                    field_of::<A, ContentChars>(map, "text")?.map_or(0, |c| c.0),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// Characters of an object's `content` (`None` when it is not an object): a chat message, a
/// responses input item.
struct ContentOf(Option<usize>);

impl<'de> Deserialize<'de> for ContentOf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentOf;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(ContentOf(None); bool, i64, u64, f64, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let content = field_of::<A, ContentChars>(map, "content")?;
                Ok(ContentOf(Some(content.map_or(0, |c| c.0))))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(Messages::NotArray; bool, i64, u64, f64, str, unit, map);
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let (mut chars, mut count, mut objects) = (0usize, 0usize, true);
                while let Some(ContentOf(content)) = seq.next_element()? {
                    count += 1;
                    match content {
                        Some(c) => chars = chars.saturating_add(c),
                        None => objects = false,
                    }
                }
                Ok(if objects {
                    Messages::Objects { chars, count }
                } else {
                    Messages::NotAllObjects
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// The Responses API's `input`: a text (one item), or a list of items whose `content` counts.
struct ResponsesInput(Input);

impl<'de> Deserialize<'de> for ResponsesInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResponsesInput;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(ResponsesInput(Input::Other); bool, i64, u64, f64, unit, map);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ResponsesInput(Input::Text(text_chars(v))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let (mut chars, mut count) = (0usize, 0usize);
                while let Some(ContentOf(content)) = seq.next_element()? {
                    count += 1;
                    chars = chars.saturating_add(content.unwrap_or(0));
                }
                Ok(ResponsesInput(Input::Items { chars, count }))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `stream_options` is an object whose `include_usage` is `true`.
struct IncludeUsage(bool);

impl<'de> Deserialize<'de> for IncludeUsage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IncludeUsage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(IncludeUsage(false); bool, i64, u64, f64, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let include = field_of::<A, Scalar<'de>>(map, "include_usage")?;
                Ok(IncludeUsage(
                    include.and_then(|s| s.as_bool()).unwrap_or(false),
                ))
            }
        }
        d.deserialize_any(V)
    }
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
    use serde_json::{json, Value};

    /// `inspect` of a body written as a JSON value.
    fn inspect(
        endpoint: Endpoint,
        body: &Value,
        max_tokens_limit: u64,
    ) -> Result<RequestInfo, String> {
        super::inspect(endpoint, body.to_string().as_bytes(), max_tokens_limit)
    }

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
