//! What a request will cost, before it is sent.
//!
//! # The rule
//! - **Prompt**: the texts the request sends (message contents, `prompt`, `suffix`, embedding
//!   `input`; for `/v1/responses`, `instructions` and `input`, a string or a list of items with
//!   text content; and what the model reads besides: on chat and responses, every key, string
//!   and number of every other field of the body, and of every field of a message or item but
//!   its role, type and media; a number in a prompt or input is a token id, one token) are
//!   counted by [`PromptCounter`], plus 4 per chat message or input item and 3 for the reply's
//!   framing; then scaled by what this workspace's model taught (below).
//! - **Counting a text** costs, in sixteenths of a token (rounded up once, over all the texts):
//!   ASCII letter 3; ASCII digit 16; each run of punctuation or symbols (ASCII, or U+2000–U+206F)
//!   16, whatever its length; each run of whitespace 3, plus 11 per line feed; accented Latin
//!   (U+0080–U+024F) 16; CJK ideograph 14; kana 11; CJK punctuation and full-width forms 8; any
//!   other character 16. So `"Hello, world!"` costs 5·3 + 16 + 3 + 5·3 + 16 = 65, 5 tokens.
//!   BPE tokenizers merge common words into one token and split punctuation, digits and rare
//!   scripts, which is what the weights follow; characters / 4 held for English only (a Chinese
//!   prompt reserved a quarter of its tokens). The weights were fitted (least squares of the
//!   relative error, `bench/estimate/fit.py`) to a corpus of English, Rust, Python, JSON,
//!   French, German, Chinese and Japanese against Mistral's Tekken, the primary target, and
//!   kept where they also hold for OpenAI's `o200k_base` (CJK ideographs and punctuation sit
//!   between the two). `bench/estimate/RESULTS.md` has the ratios per language. One pass over
//!   the bytes, two table look-ups and no branch per ASCII byte; no tokenizer.
//! - **Learned prompt factor**: each settlement that reports the prompt's tokens (`prompt_tokens`
//!   or `input_tokens`) moves its (workspace, model)'s factor 1/8 of the way toward
//!   reported ÷ rule (the ratio clamped to 0.5–2, prompts the rule puts under 32 tokens
//!   ignored); the prompt estimate is `ceil(rule × factor)`, the factor starting at 1. It
//!   absorbs a tokenizer unlike Tekken (an older OpenAI encoding counts Chinese as 1.3 tokens
//!   per character) and what the rule does not see (images). `request_too_large`
//!   is decided on the smaller of the rule and the learned figure: a guess never refuses for
//!   good.
//! - **Completion**, per choice (`n`, default 1; on completions, the larger of `n` and
//!   `best_of`, times the prompts of a list of prompts):
//!   `min(max_tokens, recent)`, where `recent` is the largest completion among the last
//!   `history` (16) that this workspace got for this model (one cut at its request's
//!   `max_tokens` counted as at least the default), or `default_completion_tokens` (256) before
//!   there is any. Without `max_tokens` it is `recent`. Embeddings have no completion.
//!   (`max_completion_tokens` stands for `max_tokens` in chat, `max_output_tokens` in responses.)
//! - **Reserved** = prompt + completion, capped by the smallest token limit of the workspace
//!   (so a request whose prompt fits always can get in). Never all of `max_tokens` by default:
//!   reserving the worst case is what makes other platforms answer 429 at a fraction of the limit.
//!
//! # Bounds
//! A model name is the client's to choose: one longer than [`MAX_MODEL_NAME_BYTES`] is refused
//! (`400`), and the estimator remembers (recent completions and prompt factor) at most
//! [`MAX_MODELS_PER_WORKSPACE`] models per workspace (a new one replaces the one seen least
//! recently), so a client cycling through made-up names cannot grow its memory.
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

/// How long a (workspace, model)'s completions and learned factor are remembered after its last
/// settlement: a day, so that a workspace that pauses for minutes or hours is estimated from its
/// history, not from the default again (the limiter's states, which lose nothing when they go,
/// are evicted after two minutes). Memory follows the pairs seen in the last day, at most
/// `MAX_MODELS_PER_WORKSPACE` per workspace.
pub const HISTORY_IDLE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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

/// Sixteenths of a token that each kind of character (or run of characters) costs; see the
/// module docs for how they were chosen. The README states the same figures.
mod weight {
    /// An ASCII letter.
    pub const LETTER: u64 = 3;
    /// An ASCII digit (Tekken encodes each digit alone).
    pub const DIGIT: u64 = 16;
    /// A run of punctuation or symbols (ASCII, or U+2000–U+206F such as `“ ” — …`), whatever
    /// its length: BPE tokenizers split punctuation from words and merge a run into few tokens.
    pub const PUNCT_RUN: u64 = 16;
    /// A run of whitespace (space, tab, CR, LF).
    pub const SPACE_RUN: u64 = 3;
    /// A line feed, in addition to its run.
    pub const NEWLINE: u64 = 11;
    /// A letter or sign from U+0080 to U+024F (accented Latin: `é`, `ß`, `ø`, `«`).
    pub const LATIN: u64 = 16;
    /// A CJK ideograph (U+3400–U+9FFF, U+F900–U+FAFF, U+20000–U+3FFFF).
    pub const CJK: u64 = 14;
    /// A kana (U+3040–U+30FF).
    pub const KANA: u64 = 11;
    /// CJK punctuation and full-width forms (U+3000–U+303F, U+FF00–U+FFEF).
    pub const CJK_PUNCT: u64 = 8;
    /// Any other character (Cyrillic, Greek, Arabic, Hangul, Devanagari, emoji, …): not in the
    /// corpus, so one token each, the cautious side.
    pub const OTHER: u64 = 16;
}

/// The groups runs are counted in: a run is a maximal sequence of characters of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Group {
    Word,
    Digit,
    Space,
    Punct,
    Wide,
}

impl Group {
    /// What starting a run of this group costs.
    const fn run_cost(self) -> u64 {
        match self {
            Group::Punct => weight::PUNCT_RUN,
            Group::Space => weight::SPACE_RUN,
            _ => 0,
        }
    }
}

/// An ASCII byte's own cost and group.
const fn ascii_class(b: u8) -> (u64, Group) {
    if b.is_ascii_alphabetic() {
        (weight::LETTER, Group::Word)
    } else if b.is_ascii_digit() {
        (weight::DIGIT, Group::Digit)
    } else if b == b'\n' {
        (weight::NEWLINE, Group::Space)
    } else if b == b' ' || b == b'\t' || b == b'\r' {
        (0, Group::Space)
    } else {
        (0, Group::Punct)
    }
}

/// The fast path's tables: `ASCII_GROUP[b]`, and `ASCII_COST[prev][b]`, what byte `b` costs
/// after a character of group `prev` (its own cost, plus a run's when it starts one). One
/// look-up per byte and no branch on the text: runs change every few bytes in prose, and a
/// mispredicted branch there cost ten times the rest.
const ASCII_GROUP: [u8; 128] = {
    let mut table = [0; 128];
    let mut b = 0;
    while b < 128 {
        table[b] = ascii_class(b as u8).1 as u8;
        b += 1;
    }
    table
};
const ASCII_COST: [[u8; 128]; 8] = {
    let groups = [
        Group::Word,
        Group::Digit,
        Group::Space,
        Group::Punct,
        Group::Wide,
    ];
    let mut table = [[0; 128]; 8];
    let mut prev = 0;
    while prev < groups.len() {
        let mut b = 0;
        while b < 128 {
            let (cost, group) = ascii_class(b as u8);
            let run = if group as u8 != groups[prev] as u8 {
                group.run_cost()
            } else {
                0
            };
            table[groups[prev] as usize][b] = (cost + run) as u8;
            b += 1;
        }
        prev += 1;
    }
    table
};

/// The cost and group of a character outside ASCII.
fn wide_class(cp: u32) -> (u64, Group) {
    match cp {
        0x80..=0x24F => (weight::LATIN, Group::Word),
        0x2000..=0x206F => (0, Group::Punct),
        0x3040..=0x30FF => (weight::KANA, Group::Wide),
        0x3000..=0x303F | 0xFF00..=0xFFEF => (weight::CJK_PUNCT, Group::Wide),
        0x3400..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x3FFFF => (weight::CJK, Group::Wide),
        _ => (weight::OTHER, Group::Wide),
    }
}

/// The estimated cost of one text in sixteenths of a token: one pass over its bytes, two table
/// look-ups per ASCII byte, a range test per other character. No tokenizer, no allocation.
fn text_sixteenths(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut total = 0u64;
    // A text starts a new run: texts are encoded apart.
    let mut prev = Group::Wide as u8;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x80 {
            total += u64::from(ASCII_COST[usize::from(prev & 7)][usize::from(b)]);
            prev = ASCII_GROUP[usize::from(b)];
            i += 1;
            continue;
        }
        // `text` is UTF-8: the leading byte says the length of the sequence.
        let (len, lead) = match b {
            0xC0..=0xDF => (2, u32::from(b & 0x1F)),
            0xE0..=0xEF => (3, u32::from(b & 0x0F)),
            _ => (4, u32::from(b & 0x07)),
        };
        let cp = bytes[i + 1..i + len]
            .iter()
            .fold(lead, |cp, &c| (cp << 6) | u32::from(c & 0x3F));
        i += len;
        let (cost, group) = wide_class(cp);
        if group as u8 != prev {
            total += group.run_cost();
            prev = group as u8;
        }
        total += cost;
    }
    total
}

/// Counts the prompt tokens of the texts a request sends: feed it every text with
/// [`PromptCounter::add_text`], then read [`PromptCounter::tokens`]. A pure function of the
/// texts, the same on every instance; no tokenizer.
#[derive(Debug, Clone, Default)]
pub struct PromptCounter {
    /// Sixteenths of a token.
    sixteenths: u64,
}

impl PromptCounter {
    pub fn add_text(&mut self, text: &str) {
        self.sixteenths += text_sixteenths(text);
    }

    /// The estimated tokens of all the texts added so far, rounded up.
    pub fn tokens(&self) -> u64 {
        self.sixteenths.div_ceil(16)
    }
}

/// The estimated tokens of one text, as the prompt estimate counts it.
pub fn prompt_tokens_of_text(text: &str) -> u64 {
    let mut counter = PromptCounter::default();
    counter.add_text(text);
    counter.tokens()
}

/// `tokens` times a learned factor (in 1024ths), rounded up.
fn scale(tokens: u64, factor: u64) -> u64 {
    let scaled = (u128::from(tokens) * u128::from(factor)).div_ceil(u128::from(FACTOR_ONE));
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// Tokens of a request's texts from their summed cost in sixteenths of a token, rounded up
/// once over all of them (as [`PromptCounter::tokens`]).
fn text_tokens(sixteenths: usize) -> u64 {
    (sixteenths as u64).div_ceil(16)
}

/// The cost of one text, in sixteenths of a token (as [`PromptCounter::add_text`]).
fn text_cost(text: &str) -> usize {
    usize::try_from(text_sixteenths(text)).unwrap_or(usize::MAX)
}

/// Why a metered request's body is refused (`400`): what to say, and the field at fault when
/// there is one (the error's `param`, as the OpenAI API names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub param: Option<&'static str>,
    pub message: String,
}

impl Refused {
    fn field(param: &'static str, message: impl Into<String>) -> Refused {
        Refused {
            param: Some(param),
            message: message.into(),
        }
    }

    fn body(message: impl Into<String>) -> Refused {
        Refused {
            param: None,
            message: message.into(),
        }
    }
}

/// A field that may be left out (or null), else of one JSON kind: `Err` names the field.
fn optional<'a, T>(
    field: &Scalar<'a>,
    name: &'static str,
    kind: &str,
    read: impl Fn(&Scalar<'a>) -> Option<T>,
) -> Result<Option<T>, Refused> {
    match field {
        Scalar::Absent | Scalar::Null => Ok(None),
        v => read(v)
            .map(Some)
            .ok_or_else(|| Refused::field(name, format!("'{name}' must be {kind}"))),
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
) -> Result<RequestInfo, Refused> {
    let fields = Fields::read(endpoint, body)
        .map_err(|e| Refused::body(format!("The request body is not valid JSON: {e}")))?
        .ok_or_else(|| Refused::body("the request body must be a JSON object"))?;
    let model_is = |m: String| Refused::field("model", m);
    // Both upstream APIs require it.
    let model = match fields.model {
        Scalar::Absent | Scalar::Null => return Err(model_is("'model' is required".into())),
        Scalar::Str(m) if m.is_empty() => return Err(model_is("'model' must not be empty".into())),
        Scalar::Str(m) if m.len() > MAX_MODEL_NAME_BYTES => {
            return Err(model_is(format!(
                "'model' must be at most {MAX_MODEL_NAME_BYTES} bytes long"
            )))
        }
        Scalar::Str(m) => Some(m.into_owned()),
        _ => return Err(model_is("'model' must be a string".into())),
    };
    let prompt_tokens = match endpoint {
        Endpoint::ChatCompletions => {
            let (cost, messages) = match fields.messages {
                Some(Messages::Objects { cost, count }) => (cost, count),
                Some(Messages::NotAllObjects) => {
                    return Err(Refused::field(
                        "messages",
                        "'messages' must be an array of objects",
                    ))
                }
                Some(Messages::NotArray) | None => {
                    return Err(Refused::field("messages", "'messages' must be an array"))
                }
            };
            text_tokens(cost.saturating_add(fields.beside)) + 4 * messages as u64 + 3
        }
        Endpoint::Completions | Endpoint::FimCompletions => {
            let prompt = fields
                .prompt
                .ok_or_else(|| Refused::field("prompt", "'prompt' is required"))?;
            text_tokens(prompt + fields.suffix) + 3
        }
        Endpoint::Embeddings => match fields
            .input
            .ok_or_else(|| Refused::field("input", "'input' is required"))?
        {
            Input::Text(cost) | Input::Items { cost, .. } => text_tokens(cost),
            Input::Other => 0,
        },
        Endpoint::Responses => {
            let input = fields
                .input
                .ok_or_else(|| Refused::field("input", "'input' is required"))?;
            let (cost, items) = match input {
                Input::Text(cost) => (cost, 1),
                Input::Items { cost, count } => (cost, count),
                Input::Other => {
                    return Err(Refused::field(
                        "input",
                        "'input' must be a string or an array of items",
                    ))
                }
            };
            text_tokens(
                cost.saturating_add(fields.instructions)
                    .saturating_add(fields.beside),
            ) + 4 * items as u64
                + 3
        }
    };
    let limits: &[(&'static str, &Scalar)] = match endpoint {
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
                return Err(Refused::field(
                    field,
                    format!("'{field}' must be at most {max_tokens_limit}"),
                ));
            }
            // Both given: the smaller, which bounds the completion whichever the upstream
            // reads (the first taken, `max_tokens: 1000` with `max_completion_tokens: 1` made
            // completions of 1 look natural, and lowered the estimate: an outside audit).
            max_tokens = Some(max_tokens.map_or(n, |m: u64| m.min(n)));
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
        return Err(Refused::field(
            "n",
            "'n' must be a whole number from 1 to 128",
        ));
    }
    // A completions request makes `best_of` completions (at least `n`) for each of its prompts.
    let best_of = fields.best_of.as_u64().filter(|b| (1..=128).contains(b));
    let prompts = match endpoint {
        Endpoint::Completions => fields.prompts.max(1) as u64,
        _ => 1,
    };
    let choices = n.unwrap_or(1).max(best_of.unwrap_or(1)) * prompts;
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
    /// Completions and FIM: `Some` when present and not `null` (the cost of its text).
    prompt: Option<usize>,
    /// Completions: how many prompts `prompt` holds (a list of texts, or of token-id lists, is
    /// one completion each).
    prompts: usize,
    /// Completions: `best_of`, the completions made to return the best `n` of.
    best_of: Scalar<'a>,
    suffix: usize,
    /// Embeddings: `Some` when present and not `null`; responses: when present (`null` is
    /// `Input::Other`, refused).
    input: Option<Input>,
    instructions: usize,
    /// Chat and responses: the text of every other field of the body, which the model may read
    /// (tool definitions, `response_format`, `tool_choice`, responses' `text`, a `prediction`).
    beside: usize,
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
    /// The cost of the texts in the messages' `content`, and how many messages.
    Objects {
        cost: usize,
        count: usize,
    },
}

/// `input`: of embeddings, a text or a list of texts (or of token arrays); of responses, a text
/// or a list of items with `content`.
enum Input {
    Text(usize),
    Items { cost: usize, count: usize },
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
    BestOf,
    /// Fields a model does not read (`NOT_TEXT`).
    NotText,
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
                    "best_of" => Key::BestOf,
                    "suffix" => Key::Suffix,
                    "input" => Key::Input,
                    "instructions" => Key::Instructions,
                    "logit_bias" | "metadata" => Key::NotText,
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

/// The fields of a chat message or a responses input item that the estimate reads.
enum ItemKey {
    Content,
    /// A responses item's `output`, read as a content is.
    Output,
    /// Any other text the model reads of it (`tool_calls`, `arguments`, `name`, ...).
    Call,
    /// Its role and kind, and media.
    Other,
}

impl<'de> Deserialize<'de> for ItemKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ItemKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ItemKey, E> {
                Ok(match v {
                    "content" => ItemKey::Content,
                    "output" => ItemKey::Output,
                    // What says what the item is, and media (their data is not text).
                    "role" | "type" => ItemKey::Other,
                    _ if NOT_TEXT.contains(&v) => ItemKey::Other,
                    // Everything else a model may read: a name, a tool call and its id, its
                    // arguments and result, a refusal, reasoning (an outside audit sent 100,000
                    // characters each in `name`, `tool_call_id`, `reasoning_content`,
                    // `refusal`, unreserved).
                    _ => ItemKey::Call,
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
                    // `null` counts as left out (refused, as the upstream APIs do).
                    let prompt = map.next_value::<Option<Prompts>>()?;
                    f.prompt = prompt.as_ref().map(|p| p.cost);
                    f.prompts = prompt.map_or(1, |p| p.count.max(1));
                }
                Key::BestOf if endpoint == Endpoint::Completions => f.best_of = map.next_value()?,
                Key::Suffix => f.suffix = map.next_value::<ContentCost>()?.0,
                Key::Input if endpoint == Endpoint::Embeddings => {
                    f.input = map
                        .next_value::<Option<ContentCost>>()?
                        .map(|c| Input::Text(c.0));
                }
                Key::Input if endpoint == Endpoint::Responses => {
                    f.input = Some(map.next_value::<ResponsesInput>()?.0)
                }
                Key::Instructions => f.instructions = map.next_value::<ContentCost>()?.0,
                Key::MaxTokens => f.max_tokens = map.next_value()?,
                Key::MaxCompletionTokens => f.max_completion_tokens = map.next_value()?,
                Key::MaxOutputTokens => f.max_output_tokens = map.next_value()?,
                Key::Stream => f.stream = map.next_value()?,
                Key::N => f.n = map.next_value()?,
                Key::StreamOptions => f.include_usage = map.next_value::<IncludeUsage>()?.0,
                Key::NotText => {
                    map.next_value::<IgnoredAny>()?;
                }
                // Any other field of a chat or responses body may be read by the model (tool
                // definitions, a response format, a prediction, documents, a stop sequence): its
                // text counts (an outside audit sent 100,000 characters in a tool's description,
                // and in each of `prediction`, `documents` and `stop`, unreserved).
                _ if matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Responses) => {
                    f.beside = f.beside.saturating_add(map.next_value::<JsonText>()?.0)
                }
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

/// The cost of the text in a content value: a string, or an array of parts with `text` (parts
/// may nest); anything else has none.
struct ContentCost(usize);

impl<'de> Deserialize<'de> for ContentCost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentCost;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            // A number in a prompt or an input is a token id: one token (an outside audit sent
            // 400,000 of them as an embeddings input, estimated at none).
            other_kinds!(ContentCost(16); i64, u64);
            other_kinds!(ContentCost(0); bool, f64, unit);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ContentCost(text_cost(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut cost = 0usize;
                while let Some(ContentCost(c)) = seq.next_element()? {
                    cost = cost.saturating_add(c);
                }
                Ok(ContentCost(cost))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(ContentCost(
                    field_of::<A, ContentCost>(map, "text")?.map_or(0, |c| c.0),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// The cost of all the text in a JSON value, keys included: what a model reads of a tool's
/// definition (its name, description and parameters' schema) or of a call's arguments, which
/// the upstream renders as text. Without it, 100,000 characters of a tool's description
/// reserved nothing, and a workspace went 130 times past its tokens per minute (an outside
/// audit).
struct JsonText(usize);

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            // A number is read as its digits, and `true`, `false` and `null` as words: an
            // enum of 150,000 numbers in a tool's schema was 112,556 tokens, estimated at none
            // (an outside audit).
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(JsonText(number_cost(v, false)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(JsonText(number_cost(v.unsigned_abs(), v < 0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(JsonText(text_cost(&v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(JsonText(text_cost(if v { "true" } else { "false" })))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(JsonText(text_cost("null")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                // A data URL is media, not text.
                Ok(JsonText(match v.starts_with("data:") {
                    true => 0,
                    false => text_cost(v),
                }))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut cost = 0usize;
                while let Some(JsonText(c)) = seq.next_element()? {
                    cost = cost.saturating_add(c);
                }
                Ok(JsonText(cost))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut cost = 0usize;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    cost = cost.saturating_add(text_cost(&key));
                    // Media, and what the model does not read as text.
                    if NOT_TEXT.contains(&key.as_ref()) {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        cost = cost.saturating_add(map.next_value::<JsonText>()?.0);
                    }
                }
                Ok(JsonText(cost))
            }
        }
        d.deserialize_any(V)
    }
}

/// Fields whose values are not read as text: media and files (their data is not text), the
/// bias of token ids, metadata kept for the caller. An audit saw 300 entries of `logit_bias`
/// reserve 2,708 tokens.
const NOT_TEXT: [&str; 9] = [
    "image_url",
    "input_audio",
    "audio",
    "file",
    "file_data",
    "file_url",
    "document_url",
    "logit_bias",
    "metadata",
];

/// What a whole number costs as text: 16 sixteenths a digit (the rule's), and a run of
/// punctuation for a minus sign.
fn number_cost(v: u64, negative: bool) -> usize {
    let digits = v.checked_ilog10().map_or(1, |d| d as usize + 1);
    16 * digits + if negative { 16 } else { 0 }
}

/// A completions `prompt`: a text, a list of texts, a list of token ids (one prompt) or a list
/// of such lists; what its texts cost (a token id 16 sixteenths: one token), and how many
/// prompts it holds, each completed on its own (an outside audit: 20 prompts in one request
/// were reserved one completion).
struct Prompts {
    cost: usize,
    count: usize,
}

impl<'de> Deserialize<'de> for Prompts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(Prompts { cost: 0, count: 1 }; bool, i64, u64, f64, unit, map);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Prompts {
                    cost: text_cost(v),
                    count: 1,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // Texts and lists are prompts each; numbers are the token ids of one prompt.
                let (mut cost, mut count, mut ids) = (0usize, 0usize, false);
                while let Some(item) = seq.next_element::<PromptItem>()? {
                    match item {
                        PromptItem::Prompt(c) => {
                            cost = cost.saturating_add(c);
                            count += 1;
                        }
                        PromptItem::TokenId => {
                            cost = cost.saturating_add(16);
                            ids = true;
                        }
                    }
                }
                Ok(Prompts {
                    cost,
                    count: count + usize::from(ids),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// One element of a completions `prompt` list.
enum PromptItem {
    /// A text, or a list of token ids: what it costs.
    Prompt(usize),
    /// A number: a token id of the one prompt the list is.
    TokenId,
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_kinds!(PromptItem::TokenId; bool, i64, u64, f64);
            other_kinds!(PromptItem::Prompt(0); unit, map);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptItem::Prompt(text_cost(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut cost = 0usize;
                while let Some(ContentCost(c)) = seq.next_element()? {
                    cost = cost.saturating_add(c);
                }
                Ok(PromptItem::Prompt(cost))
            }
        }
        d.deserialize_any(V)
    }
}

/// The cost of an object's `content` (`None` when it is not an object): a chat message, a
/// responses input item. Its text parts only (an image's data is not text); and, whole, what it
/// carries of tool calls and their results (`tool_calls`, `function_call`; a responses item's
/// `arguments` and `output`).
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
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // The last `content` counts, as a repeated field's last value is what a
                // parser keeps; the calls' texts add up.
                let (mut content, mut calls) = (0usize, 0usize);
                while let Some(key) = map.next_key::<ItemKey>()? {
                    match key {
                        ItemKey::Content => content = map.next_value::<ContentCost>()?.0,
                        // A tool's result: a text, or parts of which only text counts (a
                        // screenshot in a computer call's output, an image or a file in a
                        // function's, were counted as 136,000 tokens of text: an outside
                        // audit).
                        ItemKey::Output => {
                            calls = calls.saturating_add(map.next_value::<ContentCost>()?.0)
                        }
                        ItemKey::Call => {
                            calls = calls.saturating_add(map.next_value::<JsonText>()?.0)
                        }
                        ItemKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ContentOf(Some(content.saturating_add(calls))))
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
                let (mut cost, mut count, mut objects) = (0usize, 0usize, true);
                while let Some(ContentOf(content)) = seq.next_element()? {
                    count += 1;
                    match content {
                        Some(c) => cost = cost.saturating_add(c),
                        None => objects = false,
                    }
                }
                Ok(if objects {
                    Messages::Objects { cost, count }
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
                Ok(ResponsesInput(Input::Text(text_cost(v))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let (mut cost, mut count) = (0usize, 0usize);
                while let Some(ContentOf(content)) = seq.next_element()? {
                    count += 1;
                    cost = cost.saturating_add(content.unwrap_or(0));
                }
                Ok(ResponsesInput(Input::Items { cost, count }))
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

/// Prompt factors are kept in 1024ths, so that scaling is exact integer arithmetic and a factor
/// reaches its target instead of creeping toward it.
const FACTOR_ONE: u64 = 1024;
/// The learned prompt factor's bounds: whatever the upstream reports, the rule's estimate is
/// never scaled by less than half or more than twice.
pub const PROMPT_FACTOR_MIN: f32 = 0.5;
pub const PROMPT_FACTOR_MAX: f32 = 2.0;
const FACTOR_MIN: u64 = FACTOR_ONE / 2;
const FACTOR_MAX: u64 = FACTOR_ONE * 2;
/// One settlement moves the factor 1/8 of the way toward its ratio (an exponential moving
/// average over about the last 8 settlements), and by at least one step.
const FACTOR_STEPS: i64 = 8;
/// Prompts estimated below this are not learned from: the per-message framing dominates them,
/// and a template's few tokens more or less would swing the ratio.
pub const PROMPT_LEARN_MIN_TOKENS: u64 = 32;

#[derive(Debug)]
struct History {
    recent: VecDeque<u64>,
    /// Reported prompt tokens ÷ the rule's estimate, averaged over recent settlements, in
    /// 1024ths.
    prompt_factor: u16,
    last_seen: Nanos,
}

impl Default for History {
    fn default() -> Self {
        History {
            recent: VecDeque::new(),
            prompt_factor: FACTOR_ONE as u16,
            last_seen: 0,
        }
    }
}

/// What one settlement tells the estimator about a (workspace, model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Completion tokens per choice, as reported.
    pub completion_tokens: Option<u64>,
    /// The completion reached its request's `max_tokens`: cut there, it says only that the
    /// answer would have been at least that long. It is remembered as at least
    /// `default_completion_tokens`: as it was, a few requests with `max_tokens: 1` made the
    /// estimate of requests without it 1 token, and 50 of those at once took 40 times a
    /// minute's tokens (an outside audit); left out, a workload whose answers always reach
    /// their `max_tokens` was estimated at the default, below what each took.
    pub completion_cut: bool,
    /// The prompt as the rule estimated it (`RequestInfo::prompt_tokens`, before any learned
    /// factor) and as the upstream reported it (`prompt_tokens` or `input_tokens`).
    pub prompt: Option<(u64, u64)>,
}

type Histories = HashMap<WorkspaceId, HashMap<String, History>>;

const SHARDS: usize = 16;

/// Remembers, per workspace and model, recent completion sizes and how the upstream's prompt
/// counts compare with the rule's, to estimate the next request. Sharded by workspace, so that
/// workspaces do not wait on one another.
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

    /// The tokens to reserve. `prompt` is the rule's count scaled by the learned factor when
    /// that makes it smaller, else the rule's count: it decides `request_too_large`, which must
    /// not be refused on a learned guess. `estimate` uses the learned factor either way.
    pub fn estimate(&self, workspace: WorkspaceId, info: &RequestInfo) -> TokenCost {
        let (factor, recent) = {
            let shard = self.shard(workspace);
            let history = shard
                .get(&workspace)
                .and_then(|models| models.get(info.model.as_deref().unwrap_or("")));
            (
                history.map_or(FACTOR_ONE, |h| u64::from(h.prompt_factor)),
                history.and_then(|h| h.recent.iter().max().copied()),
            )
        };
        let learned = scale(info.prompt_tokens, factor);
        let prompt = learned.min(info.prompt_tokens);
        if !info.completes {
            return TokenCost {
                prompt,
                estimate: learned,
            };
        }
        let recent = recent.unwrap_or(self.default_completion);
        let per_choice = match info.max_tokens {
            Some(max) => max.min(recent),
            None => recent,
        };
        TokenCost {
            prompt,
            estimate: learned + per_choice * info.choices,
        }
    }

    /// The learned factor of a (workspace, model): 1 before any settlement taught it.
    pub fn prompt_factor(&self, workspace: WorkspaceId, model: &str) -> f32 {
        self.shard(workspace)
            .get(&workspace)
            .and_then(|models| models.get(model))
            .map_or(1.0, |h| f32::from(h.prompt_factor) / FACTOR_ONE as f32)
    }

    /// Records a completion's size as reported by the upstream (per choice). A workspace's
    /// models beyond `MAX_MODELS_PER_WORKSPACE` replace the one seen least recently.
    pub fn observe(&self, workspace: WorkspaceId, model: &str, completion_tokens: u64, now: Nanos) {
        let observed = Observed {
            completion_tokens: Some(completion_tokens),
            ..Observed::default()
        };
        self.observe_usage(workspace, model, observed, now)
    }

    /// Records what a settlement reported: the completion's size, and the prompt's real count
    /// against the rule's, which moves the (workspace, model)'s prompt factor 1/8 of the way
    /// toward their ratio (the ratio clamped to `PROMPT_FACTOR_MIN..=PROMPT_FACTOR_MAX`, so one
    /// odd answer cannot make the factor absurd). Prompts the rule put under
    /// `PROMPT_LEARN_MIN_TOKENS` teach nothing. A workspace's models beyond
    /// `MAX_MODELS_PER_WORKSPACE` replace the one seen least recently.
    pub fn observe_usage(
        &self,
        workspace: WorkspaceId,
        model: &str,
        observed: Observed,
        now: Nanos,
    ) {
        let learns = observed
            .prompt
            .filter(|&(estimated, _)| estimated >= PROMPT_LEARN_MIN_TOKENS);
        if observed.completion_tokens.is_none() && learns.is_none() {
            return;
        }
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
        if let Some(completion) = observed.completion_tokens {
            let completion = match observed.completion_cut {
                true => completion.max(self.default_completion),
                false => completion,
            };
            if h.recent.len() == self.history_len {
                h.recent.pop_front();
            }
            h.recent.push_back(completion);
        }
        if let Some((estimated, reported)) = learns {
            let ratio = (reported.saturating_mul(FACTOR_ONE) / estimated)
                .clamp(FACTOR_MIN, FACTOR_MAX) as i64;
            let factor = i64::from(h.prompt_factor);
            let delta = ratio - factor;
            let step = match delta / FACTOR_STEPS {
                0 => delta.signum(),
                step => step,
            };
            // Within FACTOR_MIN..=FACTOR_MAX, so within u16.
            h.prompt_factor = (factor + step).clamp(FACTOR_MIN as i64, FACTOR_MAX as i64) as u16;
        }
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
            .map_err(|e| e.message)
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
        // 8 digits (8 × 16) + 4 letters (4 × 3) = 140 sixteenths -> 9 tokens, 2 messages -> 8,
        // framing 3.
        assert_eq!(info.prompt_tokens, 9 + 8 + 3);
        assert_eq!(info.model.as_deref(), Some("m"));
    }

    /// What the model reads besides the messages is counted: tool definitions (keys too: a
    /// schema's names are read), a call's arguments, a tool's result, a response format. A
    /// tool's description of 100,000 characters reserved nothing (an outside audit).
    #[test]
    fn tools_and_tool_calls_are_counted() {
        let bare = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        // "abcd" costs 12 sixteenths: each text below adds a known amount.
        let with = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            chat(body).prompt_tokens
        };
        let description = "word ".repeat(20_000);
        let tools = with(json!({"tools": [{"type": "function", "function": {
            "name": "f", "description": description}}]}));
        // 100,000 characters of prose: about 100,000 × 3 / 16 sixteenths of a token.
        assert!(tools > bare.prompt_tokens + 18_000, "{tools}");
        // Keys and values of a schema, and a response format.
        let schema = with(
            json!({"response_format": {"type": "json_schema", "json_schema":
            {"name": "abcd", "schema": {"abcd": "abcd"}}}}),
        );
        assert!(schema > bare.prompt_tokens + 3, "{schema}");
        // A call's arguments in an assistant message, and a tool's result.
        let calls = chat(json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "a".repeat(1_600)}}]},
            {"role": "tool", "tool_call_id": "c", "content": "b".repeat(1_600)}
        ]}));
        // 1,600 letters: 300 tokens each, and two messages more.
        assert!(
            calls.prompt_tokens >= bare.prompt_tokens + 600 + 8,
            "{}",
            calls.prompt_tokens
        );
        // Responses: its tools, and a function call's arguments and output items.
        let responses = inspect(
            Endpoint::Responses,
            &json!({"model": "m", "input": [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "a".repeat(1_600)},
                {"type": "function_call_output", "call_id": "c", "output": "b".repeat(1_600)}
            ], "tools": [{"type": "function", "name": "f", "description": "c".repeat(1_600)}]}),
            LIMIT,
        )
        .unwrap();
        assert!(
            responses.prompt_tokens >= 900,
            "{}",
            responses.prompt_tokens
        );
        // Numbers in a schema are read as their digits: an enum of 1,000 ones is 1,000 tokens.
        let numbers = with(
            json!({"tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"properties": {"x": {"type": "integer", "enum": vec![1; 1_000]}}}}}]}),
        );
        assert!(numbers >= bare.prompt_tokens + 1_000, "{numbers}");
        // Any other field a model may read: a message's name, a tool call's id, reasoning, a
        // refusal; a top-level prediction or stop sequence.
        for field in ["name", "tool_call_id", "reasoning_content", "refusal"] {
            let mut message = json!({"role": "assistant", "content": "x"});
            message[field] = json!("a".repeat(1_600));
            let info = chat(json!({"model": "m", "messages": [message]}));
            assert!(info.prompt_tokens >= 300, "{field}: {}", info.prompt_tokens);
        }
        for field in ["prediction", "stop", "documents"] {
            let counted = with(json!({ field: {"content": "a".repeat(1_600)} }));
            assert!(counted >= bare.prompt_tokens + 300, "{field}: {counted}");
        }
        // Media in a tool's result is not text: a screenshot in a computer call's output, an
        // image in a function's (an audit: 136,000 tokens reserved for a 400 KB image).
        let data = format!("data:image/png;base64,{}", "A".repeat(100_000));
        let outputs = inspect(
            Endpoint::Responses,
            &json!({"model": "m", "input": [
                {"type": "function_call_output", "call_id": "c",
                 "output": [{"type": "input_image", "image_url": data}]},
                {"type": "computer_call_output", "call_id": "d",
                 "output": {"type": "computer_screenshot", "image_url": data}}
            ]}),
            LIMIT,
        )
        .unwrap();
        assert!(outputs.prompt_tokens < 50, "{}", outputs.prompt_tokens);
        // Nor a data URL or a file anywhere else, nor the bias of token ids.
        let elsewhere = with(
            json!({"tools": [{"type": "function", "function": {"name": "f",
            "example": {"image_url": "x".repeat(10_000), "url": data}}}],
            "logit_bias": (0..300).map(|i| (i.to_string(), json!(-100))).collect::<serde_json::Map<_, _>>()}),
        );
        assert!(elsewhere < bare.prompt_tokens + 50, "{elsewhere}");
        // An image's data is still not text.
        let image = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(10_000))}}
            ]}]}),
        );
        assert!(image.prompt_tokens < 20, "{}", image.prompt_tokens);
    }

    /// A completions request is one completion per prompt of a list, and `best_of` of them
    /// each; token ids are a token each (an outside audit: 20 prompts were reserved one
    /// completion, 400,000 token ids none).
    #[test]
    fn prompt_lists_best_of_and_token_ids() {
        let completions = |body: Value| inspect(Endpoint::Completions, &body, LIMIT).unwrap();
        let one = completions(json!({"model": "m", "prompt": "hi", "max_tokens": 100}));
        assert_eq!(one.choices, 1);
        let list = completions(json!({"model": "m", "prompt": vec!["hi"; 20], "max_tokens": 100}));
        assert_eq!(list.choices, 20);
        let best = completions(json!({"model": "m", "prompt": "hi", "best_of": 20, "n": 2}));
        assert_eq!(best.choices, 20);
        let both = completions(json!({"model": "m", "prompt": ["a", "b"], "n": 3}));
        assert_eq!(both.choices, 6);
        // Token ids: one prompt of 1,000 tokens; a list of two such lists, two prompts.
        let ids = completions(json!({"model": "m", "prompt": vec![7; 1_000]}));
        assert_eq!((ids.choices, ids.prompt_tokens), (1, 1_000 + 3));
        let lists = completions(json!({"model": "m", "prompt": [vec![7; 10], vec![7; 10]]}));
        assert_eq!((lists.choices, lists.prompt_tokens), (2, 20 + 3));
        // Both bounds of a chat completion: the smaller.
        let both = chat(
            json!({"model": "m", "messages": [], "max_tokens": 1_000, "max_completion_tokens": 1}),
        );
        assert_eq!(both.max_tokens, Some(1));
        let embed = inspect(
            Endpoint::Embeddings,
            &json!({"model": "e", "input": vec![1; 4_000]}),
            LIMIT,
        )
        .unwrap();
        assert_eq!(embed.prompt_tokens, 4_000);
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

    /// The gateway forgets a (workspace, model)'s history after `HISTORY_IDLE`: a pause of hours
    /// keeps it (it used to go with the limiter's states, after two minutes).
    #[test]
    fn history_outlives_a_pause_of_hours() {
        const HOUR: Nanos = 3600 * 1_000_000_000;
        let idle = HISTORY_IDLE.as_nanos() as u64;
        let est = Estimator::new(256, 16);
        let info = chat(json!({"model": "m", "messages": []}));
        est.observe(1, "m", 2000, 0);
        est.evict_idle(3 * HOUR, idle);
        assert_eq!(est.estimate(1, &info).estimate, 3 + 2000);
        est.evict_idle(25 * HOUR, idle);
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
        // 8 digits and 4 letters -> 9, one item -> 4, framing 3.
        assert_eq!(e.prompt_tokens, 9 + 4 + 3);
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
        // "abcd", "efgh" (24 sixteenths) and the output "{}" (16): 3 tokens.
        assert_eq!(e.prompt_tokens, 3 + 3 * 4 + 3);
        assert_eq!(e.max_tokens, None);
        assert!(inspect(Endpoint::Responses, &json!({"model": "m"}), LIMIT).is_err());
        assert!(inspect(
            Endpoint::Responses,
            &json!({"model": "m", "input": 5}),
            LIMIT
        )
        .is_err());
    }

    /// A reference for `text_sixteenths`: the documented weights, char by char, no fast path.
    fn reference_sixteenths(text: &str) -> u64 {
        let mut total = 0;
        let mut prev = "wide";
        for c in text.chars() {
            let (cost, group) = match c {
                'a'..='z' | 'A'..='Z' => (3, "word"),
                '0'..='9' => (16, "digit"),
                '\n' => (11, "space"),
                ' ' | '\t' | '\r' => (0, "space"),
                '\0'..='\x7f' => (0, "punct"),
                '\u{80}'..='\u{24f}' => (16, "word"),
                '\u{2000}'..='\u{206f}' => (0, "punct"),
                '\u{3040}'..='\u{30ff}' => (11, "wide"),
                '\u{3000}'..='\u{303f}' | '\u{ff00}'..='\u{ffef}' => (8, "wide"),
                '\u{3400}'..='\u{9fff}' | '\u{f900}'..='\u{faff}' | '\u{20000}'..='\u{3ffff}' => {
                    (14, "wide")
                }
                _ => (16, "wide"),
            };
            if group != prev {
                total += match group {
                    "punct" => 16,
                    "space" => 3,
                    _ => 0,
                };
                prev = group;
            }
            total += cost;
        }
        total
    }

    #[test]
    fn text_is_counted_by_the_kind_of_each_character() {
        let cases: &[(&str, u64)] = &[
            ("", 0),
            ("Hello", 1),
            // 5 + 5 letters, 2 punctuation runs, 1 space run: 65 sixteenths.
            ("Hello, world!", 5),
            // A punctuation run costs one token whatever its length.
            ("!!!!!!!!", 1),
            ("12345", 5),
            ("    \n\n", 2),
            ("café", 2),
            ("你好世界", 4),
            ("こんにちは", 4),
            ("。", 1),
            ("Привет", 6),
            ("🙂🙂", 2),
        ];
        for &(text, tokens) in cases {
            assert_eq!(prompt_tokens_of_text(text), tokens, "{text:?}");
        }
        // Every boundary of the classes, in every UTF-8 length, agrees with the reference.
        let boundaries = [
            0x00, 0x09, 0x0a, 0x0d, 0x20, 0x21, 0x2f, 0x30, 0x39, 0x3a, 0x40, 0x41, 0x5a, 0x5b,
            0x60, 0x61, 0x7a, 0x7b, 0x7f, 0x80, 0xe9, 0x24f, 0x250, 0x7ff, 0x800, 0x1fff, 0x2000,
            0x206f, 0x2070, 0x2fff, 0x3000, 0x303f, 0x3040, 0x30ff, 0x3100, 0x33ff, 0x3400, 0x9fff,
            0xa000, 0xac00, 0xf8ff, 0xf900, 0xfaff, 0xfb00, 0xfeff, 0xff00, 0xffef, 0xfff0, 0xffff,
            0x10000, 0x1f642, 0x1ffff, 0x20000, 0x3ffff, 0x40000, 0x10ffff,
        ];
        let chars: Vec<char> = boundaries
            .iter()
            .filter_map(|&c| char::from_u32(c))
            .collect();
        let all: String = chars.iter().collect();
        assert_eq!(text_sixteenths(&all), reference_sixteenths(&all));
        for a in &chars {
            for b in &chars {
                let pair: String = [*a, *b, *a].iter().collect();
                assert_eq!(
                    text_sixteenths(&pair),
                    reference_sixteenths(&pair),
                    "{pair:?}"
                );
            }
        }
    }

    #[test]
    fn a_chinese_prompt_is_estimated_within_bounds_of_its_real_count() {
        // From bench/estimate/corpus/zh.txt. Real counts without special tokens: Mistral's
        // Tekken (tekken_240911) 104, OpenAI's o200k_base 94 (characters / 4 said 31).
        let text = "大语言模型是按词元而不是按词收费的，而词元是一个难以把握的单位。在英语里，\
                    一个词元大约相当于四分之三个单词，但在其他语言中，同样一句话可能要花两倍甚至\
                    更多的词元。任何设定用量上限的人都必须决定，是去数模型所数的东西，还是数一个\
                    更简单但足够接近的量。";
        assert_eq!(text.chars().count(), 124);
        let estimate = prompt_tokens_of_text(text) as f64;
        assert!(
            (0.9..=1.1).contains(&(estimate / 104.0)),
            "{estimate} for Tekken's 104"
        );
        assert!(
            (0.75..=1.33).contains(&(estimate / 94.0)),
            "{estimate} for o200k's 94"
        );
    }

    fn learn(est: &Estimator, model: &str, estimated: u64, reported: u64) {
        let observed = Observed {
            prompt: Some((estimated, reported)),
            ..Observed::default()
        };
        est.observe_usage(1, model, observed, 0);
    }

    #[test]
    fn the_prompt_factor_moves_toward_the_reported_ratio_and_is_clamped() {
        let est = Estimator::new(256, 16);
        let body = json!({"model": "m", "max_tokens": 0, "messages": [
            {"role": "user", "content": "word ".repeat(80)}
        ]});
        let info = chat(body);
        // 80 × (4 letters + a space run) = 1200 sixteenths = 75, + 4 + 3.
        assert_eq!(info.prompt_tokens, 82);
        assert_eq!(est.estimate(1, &info).estimate, 82);

        // The upstream counts 1.5 times the rule: the factor goes 1/8 of the way each time.
        learn(&est, "m", 100, 150);
        assert_eq!(est.prompt_factor(1, "m"), 1.0625);
        for _ in 0..60 {
            learn(&est, "m", 100, 150);
        }
        assert_eq!(est.prompt_factor(1, "m"), 1.5, "reached, not crept toward");
        let cost = est.estimate(1, &info);
        assert_eq!(cost.estimate, 123);
        // Only the estimate grows: a request is not refused as too large on a learned factor.
        assert_eq!(cost.prompt, 82);
        // Other workspaces and models keep their own.
        assert_eq!(est.estimate(2, &info).estimate, 82);
        assert_eq!(est.prompt_factor(1, "other"), 1.0);

        // One absurd answer moves it by at most 1/8 of the way to the clamp, and no number of
        // them takes it past 2 (or under 0.5).
        learn(&est, "m", 100, 1_000_000);
        assert_eq!(est.prompt_factor(1, "m"), 1.5 + (2.0 - 1.5) / 8.0);
        for _ in 0..200 {
            learn(&est, "m", 100, u64::MAX);
        }
        assert_eq!(est.prompt_factor(1, "m"), PROMPT_FACTOR_MAX);
        assert_eq!(est.estimate(1, &info).estimate, 164);
        for _ in 0..200 {
            learn(&est, "m", 100, 0);
        }
        assert_eq!(est.prompt_factor(1, "m"), PROMPT_FACTOR_MIN);
        let cost = est.estimate(1, &info);
        assert_eq!((cost.prompt, cost.estimate), (41, 41));

        // Small prompts, dominated by framing, teach nothing.
        learn(&est, "small", PROMPT_LEARN_MIN_TOKENS - 1, 1_000);
        assert_eq!(est.prompt_factor(1, "small"), 1.0);
        assert!(est.shard(1).get(&1).unwrap().get("small").is_none());
    }

    #[test]
    fn learned_factors_are_bounded_per_workspace_and_evicted() {
        let est = Estimator::new(256, 16);
        for i in 0..1000u64 {
            let observed = Observed {
                prompt: Some((100, 200)),
                ..Observed::default()
            };
            est.observe_usage(1, &format!("made-up-{i}"), observed, i);
        }
        let tracked = est.shard(1).get(&1).map_or(0, HashMap::len);
        assert_eq!(tracked, MAX_MODELS_PER_WORKSPACE);
        assert!(est.prompt_factor(1, "made-up-999") > 1.0);
        assert_eq!(est.prompt_factor(1, "made-up-0"), 1.0, "replaced");
        est.evict_idle(10_000, 50);
        assert_eq!(est.prompt_factor(1, "made-up-999"), 1.0);
        assert!(est.shard(1).is_empty());
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
        // A required text set to `null` counts as left out.
        let nulls = [
            (Endpoint::Embeddings, json!({"model": "e", "input": null})),
            (Endpoint::Completions, json!({"model": "c", "prompt": null})),
            (
                Endpoint::FimCompletions,
                json!({"model": "c", "prompt": null, "suffix": "x"}),
            ),
            (Endpoint::Responses, json!({"model": "r", "input": null})),
        ];
        for (endpoint, body) in nulls {
            let e = inspect(endpoint, &body, LIMIT).unwrap_err();
            assert!(
                e.contains("required") || e.contains("must be"),
                "{body}: {e}"
            );
        }

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
