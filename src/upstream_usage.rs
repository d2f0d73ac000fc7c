//! Reading the usage the upstream reports: from a whole JSON answer, or from a stream of
//! server-sent events passed on as they come. No I/O and no HTTP types: the proxy feeds bytes in,
//! and these parsers are fuzzed (`fuzz/fuzz_targets/sse.rs`).
//!
//! Usage is read wherever the known APIs put it: a top-level `usage` with
//! `prompt_tokens`/`completion_tokens` or `input_tokens`/`output_tokens` (and `total_tokens`), or
//! `response.usage` (the Responses API's stream events, such as `response.completed`).

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use crate::limiter::core::MAX_REQUEST_TOKENS;

/// Token counts as the known APIs report them: `prompt_tokens`/`completion_tokens` (chat,
/// completions, embeddings) or `input_tokens`/`output_tokens` (responses), with `total_tokens`.
/// Each read by `figure`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct UsageJson {
    #[serde(default, deserialize_with = "figure")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "figure")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "figure")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "figure")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "figure")]
    total_tokens: Option<u64>,
}

/// A visitor's methods for the JSON values that are no figure or object it reads: each is
/// `Ok(None)`. (`unit` covers `null`, which `serde_json` visits as `none` too.)
macro_rules! none_for {
    ($($kind:ident),*) => { $(none_for!(@ $kind);)* };
    (@ u64) => { fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> { Ok(None) } };
    (@ i64) => { fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> { Ok(None) } };
    (@ f64) => { fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> { Ok(None) } };
    (@ bool) => { fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> { Ok(None) } };
    (@ str) => { fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> { Ok(None) } };
    (@ unit) => {
        fn visit_unit<E>(self) -> Result<Self::Value, E> { Ok(None) }
        fn visit_none<E>(self) -> Result<Self::Value, E> { Ok(None) }
    };
}

/// A token count as an upstream may write it: a whole number, also as a float (`12.0`, `1.5e1`:
/// what a Python upstream's arithmetic gives), and one too large for 64 bits (`1e21`) taken as
/// `MAX_REQUEST_TOKENS`, as every figure above it is. Anything else (a negative number, a string,
/// `null`) is no figure: it no longer fails the whole `usage` object, which then settled to the
/// estimate (an outside audit). A fraction is dropped.
fn figure<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Figure;
    impl<'de> Visitor<'de> for Figure {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.min(MAX_REQUEST_TOKENS)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok().map(|v| v.min(MAX_REQUEST_TOKENS)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok((v >= 0.0).then(|| (v.min(MAX_REQUEST_TOKENS as f64)) as u64))
        }
        none_for!(bool, str, unit);
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(Figure)
}

/// Every figure read is at most what one request may settle (`MAX_REQUEST_TOKENS`): a larger one
/// (a faulty or hostile upstream's) would be capped by the limiter but not by the ledger, and one
/// of 2^63 or more would be negative in the ledger's signed columns; the limiter, the ledger, the
/// headers and the log all see the same capped figure.
impl UsageJson {
    /// Whether it gives any count: `"usage": {}`, or one with other fields only, is no usage
    /// (it was settled as 0 tokens: an outside audit).
    fn counts(&self) -> bool {
        self.total_tokens.is_some()
            || self.prompt_tokens.is_some()
            || self.completion_tokens.is_some()
            || self.input_tokens.is_some()
            || self.output_tokens.is_some()
    }

    pub fn total(&self) -> u64 {
        self.total_tokens
            .unwrap_or_else(|| {
                let prompt = self.prompt_tokens.or(self.input_tokens).unwrap_or(0);
                prompt.saturating_add(self.completion_tokens.or(self.output_tokens).unwrap_or(0))
            })
            .min(MAX_REQUEST_TOKENS)
    }

    /// The prompt's tokens: `prompt_tokens`, else `input_tokens` (Responses API).
    pub fn prompt(&self) -> Option<u64> {
        self.prompt_tokens
            .or(self.input_tokens)
            .map(|n| n.min(MAX_REQUEST_TOKENS))
    }

    pub fn completion(&self) -> Option<u64> {
        self.completion_tokens
            .or(self.output_tokens)
            .map(|n| n.min(MAX_REQUEST_TOKENS))
    }
}

#[derive(Deserialize)]
struct NestedUsage {
    #[serde(default, deserialize_with = "object")]
    usage: Option<UsageJson>,
}

/// An answer or a stream event, with its usage at the top level or under `response`. Each field
/// is read only if it has the type the known APIs give it, and is none otherwise: a sibling of
/// an unexpected type (`"response": "text"`, `"choices": {}`) failed the whole parse, and the
/// upstream's usage beside it was replaced by the estimate, too low or too high (an outside
/// audit).
#[derive(Deserialize)]
struct WithUsage {
    #[serde(default, deserialize_with = "object")]
    usage: Option<UsageJson>,
    #[serde(default, deserialize_with = "object")]
    response: Option<NestedUsage>,
    /// Whether `choices` is an empty array (`Some(true)`), another array (`Some(false)`), or
    /// no array.
    #[serde(default, deserialize_with = "empty_array")]
    choices: Option<bool>,
}

/// A JSON object read as `T`; any other value is none.
fn object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Object<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Object<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        none_for!(u64, i64, f64, bool, str, unit);
    }
    d.deserialize_any(Object(std::marker::PhantomData))
}

/// Whether a JSON array is empty; any other value is none.
fn empty_array<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Empty;
    impl<'de> Visitor<'de> for Empty {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut empty = true;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                empty = false;
            }
            Ok(Some(empty))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        none_for!(u64, i64, f64, bool, str, unit);
    }
    d.deserialize_any(Empty)
}

impl WithUsage {
    fn usage(&self) -> Option<UsageJson> {
        self.usage
            .or_else(|| self.response.as_ref().and_then(|r| r.usage))
            .filter(UsageJson::counts)
    }
}

/// The usage in a whole JSON answer, if it has one the known APIs would put there.
pub fn usage_of_json(body: &[u8]) -> Option<UsageJson> {
    serde_json::from_slice::<WithUsage>(body)
        .ok()
        .and_then(|w| w.usage())
}

/// How much of the end of a JSON answer too large to read whole is kept to find its usage. The
/// known APIs put `usage` after `choices` or `data`, last or nearly so, and it is a few hundred
/// bytes.
pub const JSON_TAIL_BYTES: usize = 64 * 1024;

/// The usage of a JSON answer passed on as it comes, being larger than the gateway reads whole
/// (`upstream.max_buffered_bytes`): its last `JSON_TAIL_BYTES` are kept, and when it ends the
/// last `"usage": {...}` in them is read. Memory stays bounded however large the answer.
#[derive(Default)]
pub struct JsonTail {
    tail: Vec<u8>,
    usage: Option<UsageJson>,
}

impl JsonTail {
    /// Takes the next chunk of the answer.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.len() >= JSON_TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - JSON_TAIL_BYTES..]);
            return;
        }
        // Trimmed only when twice the tail is held, so each byte is moved at most once more.
        if self.tail.len() + chunk.len() > 2 * JSON_TAIL_BYTES {
            let drop = self.tail.len() + chunk.len() - JSON_TAIL_BYTES;
            self.tail.drain(..drop);
        }
        self.tail.extend_from_slice(chunk);
    }

    /// The answer has ended: reads its usage from what was kept.
    pub fn finish(&mut self) -> Option<UsageJson> {
        self.usage = usage_in_tail(&std::mem::take(&mut self.tail));
        self.usage
    }

    /// The usage read by `finish`.
    pub fn usage(&self) -> Option<UsageJson> {
        self.usage
    }
}

/// The last `"usage": {...}` object in the end of a JSON answer. Inside a JSON string a quote is
/// escaped, so a `"usage"` whose first quote follows no backslash is a key (or a whole string
/// value, which no `:` follows).
fn usage_in_tail(tail: &[u8]) -> Option<UsageJson> {
    const KEY: &[u8] = b"\"usage\"";
    let finder = memchr::memmem::FinderRev::new(KEY);
    let mut end = tail.len();
    while let Some(at) = finder.rfind(&tail[..end]) {
        end = at;
        if at > 0 && tail[at - 1] == b'\\' {
            continue;
        }
        let rest = tail[at + KEY.len()..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        if rest.first() != Some(&b'{') {
            continue;
        }
        if let Some(Ok(usage)) = serde_json::Deserializer::from_slice(rest)
            .into_iter::<UsageJson>()
            .next()
        {
            if usage.counts() {
                return Some(usage);
            }
        }
    }
    None
}

/// The longest event the scanner holds back while it waits for the event's end. An upstream
/// that sends more without a blank line has its bytes passed on as they are, unread, so a
/// broken or hostile upstream cannot grow the gateway's memory. Usage chunks are a few hundred
/// bytes; 1 MiB is far above any event a known API sends.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Splits a server-sent-event stream into whole events, reads the usage from them, and drops
/// the usage-only chunk when the gateway asked for it on the client's behalf.
///
/// Events pass on as slices of the chunks they came in (`feed_bytes`), not copies: an event cut
/// across chunks is held, copied once, until its end arrives. An event that holds no `"usage"`,
/// or only `"usage":null` (every chunk of a chat stream but the last), is not parsed.
pub struct SseScanner {
    /// The start of an event whose end has not arrived.
    buf: BytesMut,
    /// How much of `buf` is known to hold no event's end, so that no byte is searched twice
    /// (an event that arrives a byte at a time costs linear time, not quadratic).
    searched: usize,
    usage: Option<UsageJson>,
    strip_usage_chunk: bool,
    /// The last event scanned was removed and ended with the last byte seen, a `\r`: a `\n`
    /// next was its second half, and goes with it.
    removed_cr: bool,
    /// The same for the last event passed on: a `\n` next is passed on first.
    kept_cr: bool,
    /// Events passed on that carry generated text (see `carries_text`).
    text_events: u64,
    /// Whether the `data: [DONE]` event, and whatever follows it, is held back until the stream
    /// ends (`holding_done`).
    hold_done: bool,
    /// What is held back: the `[DONE]` event and what came after it.
    held: BytesMut,
    /// Whether an event with data has been passed on (comments, such as keep-alives, have
    /// none): a stream that breaks before is refunded.
    passed_data: bool,
}

/// Where the line break at `i` (a `\r` or a `\n`) ends: lines end in `\r\n`, `\n` or `\r`, as the
/// event-stream format has it. `None` for a `\r` that ends `buf`: it may be the first half of a
/// `\r\n` whose second half has not arrived.
fn line_break_end(buf: &[u8], i: usize) -> Option<usize> {
    match (buf[i], buf.get(i + 1)) {
        (b'\r', None) => None,
        (b'\r', Some(b'\n')) => Some(i + 2),
        _ => Some(i + 1),
    }
}

/// Length of the first complete event in `buf` (through the empty line that ends it), if any,
/// searching from `from`. A `\r` that ends the empty line ends the event at once: were it half
/// of a `\r\n`, the `\n` would begin the next event as an empty line, which changes nothing
/// (no byte is lost or added: events pass on as they came), where holding the event back
/// would delay it until the upstream's next write.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        i += memchr::memchr2(b'\n', b'\r', &buf[i..])?;
        let next = line_break_end(buf, i)?;
        match buf.get(next) {
            Some(b'\n') => return Some(next + 1),
            Some(b'\r') => return Some(line_break_end(buf, next).unwrap_or(next + 1)),
            Some(_) => i = next,
            None => return None,
        }
    }
    None
}

/// What a scan passes on, as ranges of the bytes scanned: one range while the events kept are
/// contiguous (a slice, no copy), else a copy.
enum Passed {
    Nothing,
    Run(std::ops::Range<usize>),
    Copied(Vec<u8>),
}

impl Passed {
    fn push(&mut self, data: &[u8], range: std::ops::Range<usize>) {
        match self {
            Passed::Nothing => *self = Passed::Run(range),
            Passed::Run(run) if run.end == range.start => run.end = range.end,
            Passed::Run(run) => {
                let mut copy = Vec::with_capacity(data.len());
                copy.extend_from_slice(&data[run.clone()]);
                copy.extend_from_slice(&data[range]);
                *self = Passed::Copied(copy);
            }
            Passed::Copied(copy) => copy.extend_from_slice(&data[range]),
        }
    }

    /// Appends `range` of `data` less its part `cut`: a copy from then on, made once.
    fn push_cut(
        &mut self,
        data: &[u8],
        range: std::ops::Range<usize>,
        cut: std::ops::Range<usize>,
    ) {
        if let Passed::Copied(copy) = self {
            copy.extend_from_slice(&data[range.start..cut.start]);
            copy.extend_from_slice(&data[cut.end..range.end]);
            return;
        }
        let mut copy = Vec::with_capacity(data.len());
        if let Passed::Run(run) = self {
            copy.extend_from_slice(&data[run.clone()]);
        }
        copy.extend_from_slice(&data[range.start..cut.start]);
        copy.extend_from_slice(&data[cut.end..range.end]);
        *self = Passed::Copied(copy);
    }

    /// Appends `bytes`, an event rewritten whole: a copy from then on.
    fn push_bytes(&mut self, data: &[u8], bytes: &[u8]) {
        match self {
            Passed::Nothing => *self = Passed::Copied(bytes.to_vec()),
            Passed::Run(run) => {
                let mut copy = Vec::with_capacity(data.len());
                copy.extend_from_slice(&data[run.clone()]);
                copy.extend_from_slice(bytes);
                *self = Passed::Copied(copy);
            }
            Passed::Copied(copy) => copy.extend_from_slice(bytes),
        }
    }

    fn of(self, data: &Bytes) -> Bytes {
        match self {
            Passed::Nothing => Bytes::new(),
            Passed::Run(run) => data.slice(run),
            Passed::Copied(copy) => Bytes::from(copy),
        }
    }
}

impl SseScanner {
    pub fn new(strip_usage_chunk: bool) -> Self {
        SseScanner {
            buf: BytesMut::new(),
            searched: 0,
            usage: None,
            strip_usage_chunk,
            removed_cr: false,
            kept_cr: false,
            text_events: 0,
            hold_done: false,
            held: BytesMut::new(),
            passed_data: false,
        }
    }

    /// Whether an event with a `data` field has been passed on: what the upstream produced,
    /// where a comment line (`: keep-alive`) is only a sign of life.
    pub fn passed_data(&self) -> bool {
        self.passed_data
    }

    /// Holds back the `data: [DONE]` event (and anything after it) until `finish`: a client
    /// that stops reading at `[DONE]` (as OpenAI's SDK does) then sends its next request only
    /// once the stream's end, which may wait for the settlement, has been passed on.
    pub fn holding_done(mut self, hold: bool) -> Self {
        self.hold_done = hold;
        self
    }

    /// How many of the events passed on so far carry generated text: each is at least one
    /// token the upstream produced, what a stream that ends without its usage is charged at
    /// least (with its prompt).
    pub fn text_events(&self) -> u64 {
        self.text_events
    }

    /// The last usage read from the stream so far.
    pub fn usage(&self) -> Option<UsageJson> {
        self.usage
    }

    /// Takes a chunk; returns the whole events to pass on.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.feed_bytes(Bytes::copy_from_slice(chunk))
    }

    /// Takes a chunk; returns the whole events to pass on, as a slice of it when they can be.
    pub fn feed_bytes(&mut self, mut chunk: Bytes) -> Bytes {
        if self.removed_cr && !chunk.is_empty() {
            self.removed_cr = false;
            if chunk[0] == b'\n' {
                chunk = chunk.slice(1..);
            }
        }
        if self.kept_cr && !chunk.is_empty() {
            self.kept_cr = false;
            if chunk[0] == b'\n' {
                // The `\n` of the `\r\n` that ended the event passed on last: passed on with
                // it, before what this chunk holds, never taken as the start of the next event
                // (removed with it, were it the usage-only chunk: an outside audit).
                let lead = chunk.split_to(1);
                let rest = self.feed_bytes(chunk);
                let mut out = BytesMut::with_capacity(1 + rest.len());
                out.extend_from_slice(&lead);
                out.extend_from_slice(&rest);
                return out.freeze();
            }
        }
        if self.buf.is_empty() {
            // No event is waiting for its end: events are scanned where they lie.
            let (passed, end) = self.scan(&chunk, 0);
            let mut passed = passed;
            let rest = chunk.len() - end;
            if rest > MAX_EVENT_BYTES {
                passed.push(&chunk, end..chunk.len());
            } else if rest > 0 {
                self.buf.extend_from_slice(&chunk[end..]);
                self.searched = rest;
            }
            return passed.of(&chunk);
        }
        self.buf.extend_from_slice(&chunk);
        // An event's end is two line breaks, at most 4 bytes (`\r\n\r\n`), and one undecided
        // (a `\r` last) started at most 3 bytes before the end: a search resumes 3 bytes
        // before where the last one stopped.
        let from = self.searched.saturating_sub(3);
        let buf = std::mem::take(&mut self.buf);
        let (mut passed, mut end) = self.scan(&buf, from);
        if buf.len() - end > MAX_EVENT_BYTES {
            passed.push(&buf, end..buf.len());
            end = buf.len();
        }
        let mut buf = buf;
        let done = buf.split_to(end).freeze();
        self.buf = buf;
        self.searched = self.buf.len();
        passed.of(&done)
    }

    /// The events that end in `data`, searching from `from`: what to pass on, and where the
    /// last one ended.
    fn scan(&mut self, data: &[u8], from: usize) -> (Passed, usize) {
        let mut passed = Passed::Nothing;
        let mut start = 0;
        let mut from = from;
        while let Some(end) = event_end(data, from.max(start)) {
            let ends_in_cr = end == data.len() && data[end - 1] == b'\r';
            let event = &data[start..end];
            if keep_event(&mut self.usage, self.strip_usage_chunk, event) {
                let rewrite = self
                    .strip_usage_chunk
                    .then(|| null_usage_rewrite(event))
                    .flatten();
                if self.hold_done && (!self.held.is_empty() || is_done(event)) {
                    match &rewrite {
                        Some(r) => self.held.extend_from_slice(&r.apply(event)),
                        None => self.held.extend_from_slice(event),
                    }
                    self.removed_cr = false;
                    self.kept_cr = false;
                    start = end;
                    from = end;
                    continue;
                }
                match rewrite {
                    Some(Rewrite::Cut(cut)) => {
                        passed.push_cut(data, start..end, start + cut.start..start + cut.end)
                    }
                    Some(Rewrite::Whole(bytes)) => passed.push_bytes(data, &bytes),
                    None => passed.push(data, start..end),
                }
                self.removed_cr = false;
                self.kept_cr = ends_in_cr;
                self.text_events += u64::from(carries_text(&data[start..end]));
                self.passed_data = self.passed_data || has_data(&data[start..end]);
            } else {
                self.removed_cr = ends_in_cr;
                self.kept_cr = false;
            }
            start = end;
            from = end;
        }
        (passed, start)
    }

    /// What is left when the stream ends without a final blank line.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.buf).freeze();
        self.searched = 0;
        let rest = if !rest.is_empty() && keep_event(&mut self.usage, self.strip_usage_chunk, &rest)
        {
            self.passed_data = self.passed_data || has_data(&rest);
            match self.strip_usage_chunk.then(|| without_null_usage(&rest)) {
                Some(Some(bytes)) => Bytes::from(bytes),
                _ => rest,
            }
        } else {
            Bytes::new()
        };
        if self.held.is_empty() {
            return rest;
        }
        let mut held = std::mem::take(&mut self.held);
        held.extend_from_slice(&rest);
        held.freeze()
    }
}

/// Whether an event has a `data` field: a line that starts with `data` followed by `:` or the
/// line's end (the event-stream format's field name).
fn has_data(event: &[u8]) -> bool {
    event
        .split(|&b| b == b'\n' || b == b'\r')
        .any(|line| line == b"data" || line.starts_with(b"data:"))
}

/// Whether an event is the stream's `data: [DONE]`.
fn is_done(event: &[u8]) -> bool {
    event
        .split(|&b| b == b'\n' || b == b'\r')
        .any(|line| line.strip_prefix(b"data:").map(<[u8]>::trim_ascii) == Some(b"[DONE]"))
}

/// Whether an event carries generated text: a non-empty string as a chat chunk's `content`, a
/// completion chunk's `text`, or a Responses text event's `delta`. Tool-call arguments and
/// the like are left out: this counts what was surely produced, not all of it.
fn carries_text(event: &[u8]) -> bool {
    [&b"\"content\""[..], b"\"text\"", b"\"delta\""]
        .iter()
        .any(|needle| {
            memchr::memmem::find_iter(event, needle).any(|at| {
                // JSON allows whitespace around the colon (`"content": "t"`, as Python's
                // `json.dumps` writes it): only compact JSON counted (an outside audit).
                let rest = event[at + needle.len()..].trim_ascii_start();
                rest.strip_prefix(b":")
                    .map(<[u8]>::trim_ascii_start)
                    .and_then(|r| r.strip_prefix(b"\""))
                    .and_then(|r| r.first())
                    .is_some_and(|&b| b != b'"')
            })
        })
}

/// Whether every `"usage"` in an event is followed by `null` (so it carries none).
fn only_null_usage(event: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"\"usage\"";
    memchr::memmem::find_iter(event, NEEDLE).all(|at| {
        let rest = &event[at + NEEDLE.len()..];
        let rest = rest.trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|r| r.trim_ascii_start().starts_with(b"null"))
    })
}

/// The event without the `"usage": null` member of its top-level object, if it has one. OpenAI
/// sends one in every chunk of a stream whose usage was asked for, and none when it was not:
/// where the gateway asked on the client's behalf, the client gets the chunks it asked for,
/// without the field (an outside audit: Mistral's TypeScript SDK refuses a `null` usage, and
/// failed on the first chunk). The member is removed with one comma beside it; one nested
/// deeper (in a `delta`, say) is the upstream's own, and stays. An event whose JSON spans
/// several `data:` lines is passed on as one line when a member is removed (its lines joined by
/// spaces: a line break in JSON is only whitespace between tokens).
fn without_null_usage(event: &[u8]) -> Option<Vec<u8>> {
    null_usage_rewrite(event).map(|r| r.apply(event))
}

/// How an event is rewritten by `without_null_usage`.
enum Rewrite {
    /// Less this range of it (a one-line event: most of them).
    Cut(std::ops::Range<usize>),
    /// As these bytes (a multi-line event, made one line).
    Whole(Vec<u8>),
}

impl Rewrite {
    fn apply(&self, event: &[u8]) -> Vec<u8> {
        match self {
            Rewrite::Cut(cut) => {
                let mut out = Vec::with_capacity(event.len());
                out.extend_from_slice(&event[..cut.start]);
                out.extend_from_slice(&event[cut.end..]);
                out
            }
            Rewrite::Whole(bytes) => bytes.clone(),
        }
    }
}

/// `without_null_usage`'s rewrite of `event`, if it has a member to remove.
fn null_usage_rewrite(event: &[u8]) -> Option<Rewrite> {
    memchr::memmem::find(event, b"\"usage\"")?;
    let data_value = |at: usize, end: usize| {
        event[at..end].strip_prefix(b"data:").map(|value| {
            let skip = usize::from(value.first() == Some(&b' '));
            at + 5 + skip..end
        })
    };
    let line_end =
        |at: usize| memchr::memchr2(b'\n', b'\r', &event[at..]).map_or(event.len(), |i| at + i);
    // The first `data:` line's value, and whether there are more.
    let mut first = None;
    let mut more = false;
    let mut at = 0;
    while at < event.len() {
        let end = line_end(at);
        if let Some(value) = data_value(at, end) {
            if first.is_some() {
                more = true;
                break;
            }
            first = Some(value);
        }
        at = after_line(event, end);
    }
    let first = first?;
    if !more {
        let cut = top_null_usage_cut(&event[first.clone()])?;
        return Some(Rewrite::Cut(first.start + cut.start..first.start + cut.end));
    }
    let mut joined = Vec::with_capacity(event.len());
    let mut at = 0;
    while at < event.len() {
        let end = line_end(at);
        if let Some(value) = data_value(at, end) {
            if !joined.is_empty() {
                joined.push(b' ');
            }
            joined.extend_from_slice(event[value].trim_ascii());
        }
        at = after_line(event, end);
    }
    let cut = top_null_usage_cut(&joined)?;
    joined.drain(cut);
    // The other lines (`event:`, `id:`, comments) as they were, the data where its first line
    // was, each line ended as the event's first is (`\r\n`, `\r` or `\n`), then the blank line.
    let first_break = line_end(0);
    let nl: &[u8] = match after_line(event, first_break) - first_break {
        2 => b"\r\n",
        _ if event.get(first_break) == Some(&b'\r') => b"\r",
        _ => b"\n",
    };
    let mut out = Vec::with_capacity(event.len());
    let mut data_written = false;
    let mut at = 0;
    while at < event.len() {
        let end = line_end(at);
        let line = &event[at..end];
        if line.starts_with(b"data:") {
            if !data_written {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&joined);
                out.extend_from_slice(nl);
                data_written = true;
            }
        } else if !line.is_empty() {
            out.extend_from_slice(line);
            out.extend_from_slice(nl);
        }
        at = after_line(event, end);
    }
    out.extend_from_slice(nl);
    Some(Rewrite::Whole(out))
}

/// A top-level object's last member, `"usage": null` with the comma before it (from the comma
/// to the end of `null`), when `json` ends with it and its closing `}`.
fn last_null_usage(json: &[u8]) -> Option<std::ops::Range<usize>> {
    let rest = json.trim_ascii_end().strip_suffix(b"}")?.trim_ascii_end();
    let end = rest.len();
    let rest = rest.strip_suffix(b"null")?.trim_ascii_end();
    let rest = rest.strip_suffix(b":")?.trim_ascii_end();
    let rest = rest.strip_suffix(b"\"usage\"")?.trim_ascii_end();
    rest.strip_suffix(b",").map(|r| r.len()..end)
}

/// Where the line that ends at `end` (a line break, or the end of `event`) is followed by the
/// next: past its `\r\n`, `\n` or `\r`.
fn after_line(event: &[u8], end: usize) -> usize {
    if end >= event.len() {
        return event.len();
    }
    line_break_end(event, end).unwrap_or(end + 1)
}

/// What of `json` to cut for it to lose the `"usage": null` member of its top-level object, if
/// it has one (see `without_null_usage`): the member, and one comma beside it.
fn top_null_usage_cut(json: &[u8]) -> Option<std::ops::Range<usize>> {
    // Where OpenAI puts it, last: `,"usage":null}` closing the object is top-level whatever
    // comes before (a string ends in `"`, a nested object's `}` is followed by another), so
    // no pass over the rest is needed.
    if let Some(cut) = last_null_usage(json) {
        return Some(cut);
    }
    // Else one pass over the bytes, strings skipped whole.
    let skip_ws = |from: usize| {
        from + (json[from.min(json.len())..].len()
            - json[from.min(json.len())..].trim_ascii_start().len())
    };
    let mut depth = 0u32;
    // Where the current member of the top-level object began: its `{` or `,`.
    let mut opened = 0;
    let mut cut: Option<std::ops::Range<usize>> = None;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                if depth == 1 && json.get(start..i) == Some(&b"\"usage\""[..]) {
                    let colon = skip_ws(i);
                    if json.get(colon) != Some(&b':') {
                        continue;
                    }
                    let value = skip_ws(colon + 1);
                    if !json[value.min(json.len())..].starts_with(b"null") {
                        continue;
                    }
                    let after = skip_ws(value + 4);
                    cut = match (json[opened], json.get(after)) {
                        // `,"usage":null`: with the comma before it.
                        (b',', Some(b',' | b'}')) => Some(opened..value + 4),
                        // `{"usage":null,`: with the comma after it.
                        (b'{', Some(b',')) => Some(start..skip_ws(after + 1)),
                        (b'{', Some(b'}')) => Some(start..value + 4),
                        _ => None,
                    };
                    break;
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == 1 {
                    opened = i;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => opened = i,
            _ => {}
        }
        i += 1;
    }
    cut
}

/// The JSON of an event: its `data:` lines, each trimmed, joined by line breaks.
fn event_data(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mut lines = event
        .split(|b| matches!(b, b'\n' | b'\r'))
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(<[u8]>::trim_ascii);
    let first = lines.next().unwrap_or_default();
    match lines.next() {
        None => std::borrow::Cow::Borrowed(first),
        Some(second) => {
            let mut joined = first.to_vec();
            for line in std::iter::once(second).chain(lines) {
                joined.push(b'\n');
                joined.extend_from_slice(line);
            }
            std::borrow::Cow::Owned(joined)
        }
    }
}

/// Reads the usage from an event, if it has one; false for the usage-only chunk when it is to
/// be removed.
fn keep_event(usage: &mut Option<UsageJson>, strip_usage_chunk: bool, event: &[u8]) -> bool {
    if memchr::memmem::find(event, b"\"usage\"").is_none() || only_null_usage(event) {
        return true;
    }
    let parsed = match serde_json::from_slice::<WithUsage>(&event_data(event)) {
        Ok(chunk) => Ok(chunk),
        // Not UTF-8: read as text with the invalid bytes replaced, as before.
        Err(e) if e.is_syntax() || e.is_data() => {
            let text = String::from_utf8_lossy(event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect();
            serde_json::from_str::<WithUsage>(&data.join("\n"))
        }
        Err(e) => Err(e),
    };
    let Ok(chunk) = parsed else {
        return true;
    };
    if let Some(found) = chunk.usage() {
        *usage = Some(found);
    }
    // Removed whatever its figures: the client did not ask for it, valid or not (an outside
    // audit: `{"total_tokens":-1}` reached a client that never asked for usage).
    let usage_only = chunk.usage.is_some() && chunk.choices == Some(true);
    !(strip_usage_chunk && usage_only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn comments_are_not_data_passed_on() {
        let mut s = SseScanner::new(false);
        assert_eq!(
            &s.feed(b": keep-alive\n\n:\r\n\r\n")[..],
            b": keep-alive\n\n:\r\n\r\n"
        );
        assert!(!s.passed_data(), "comments only");
        // A field named like data is not data; a `data` line with no colon is.
        s.feed(b"database: x\n\n");
        assert!(!s.passed_data());
        s.feed(b": ping\ndata\n\n");
        assert!(s.passed_data());
        let mut s = SseScanner::new(false);
        s.feed(b"event: e\r\ndata: {\"choices\":[]}\r\n\r\n");
        assert!(s.passed_data());
        // An event cut short by the stream's end still counts once passed on.
        let mut s = SseScanner::new(false);
        s.feed(b"data: {}");
        assert!(!s.passed_data());
        assert_eq!(&s.finish()[..], b"data: {}");
        assert!(s.passed_data());
    }

    #[test]
    fn the_done_event_is_held_until_the_end_when_asked() {
        let stream = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        let mut s = SseScanner::new(false).holding_done(true);
        assert_eq!(&s.feed(stream)[..], b"data: {\"choices\":[]}\n\n");
        assert_eq!(&s.finish()[..], b"data: [DONE]\n\n");
        // Across chunks, with what follows it held too, in order; `data:[DONE]` without a space.
        let mut s = SseScanner::new(false).holding_done(true);
        assert_eq!(&s.feed(b"data: 1\r\n\r\ndata:[DO")[..], b"data: 1\r\n\r\n");
        assert!(s.feed(b"NE]\r\n\r\n: bye\r\n\r\n").is_empty());
        assert_eq!(&s.finish()[..], b"data:[DONE]\r\n\r\n: bye\r\n\r\n");
        // Not asked: passed on as it comes.
        let mut s = SseScanner::new(false);
        assert_eq!(&s.feed(stream)[..], &stream[..]);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn the_usage_of_a_large_json_answer_is_read_from_its_end() {
        let usage = |chunks: &[&[u8]]| {
            let mut tail = JsonTail::default();
            for c in chunks {
                tail.feed(c);
            }
            tail.finish()
                .map(|u| (u.prompt(), u.completion(), u.total()))
        };
        // An embeddings answer: a large `data`, then the usage, cut across chunks.
        let data = format!(
            "{{\"object\":\"list\",\"data\":[{}0.5]",
            "0.125,".repeat(100_000)
        );
        let end = b",\"model\":\"m\",\"usage\" : {\"prompt_tokens\":7,\"total_tokens\":7}}";
        let (a, b) = end.split_at(20);
        assert_eq!(usage(&[data.as_bytes(), a, b]), Some((Some(7), None, 7)));
        // In many small chunks, and in one chunk larger than the tail.
        let whole = [data.as_bytes(), end.as_slice()].concat();
        let small: Vec<&[u8]> = whole.chunks(1000).collect();
        assert_eq!(usage(&small), Some((Some(7), None, 7)));
        assert_eq!(usage(&[&whole]), Some((Some(7), None, 7)));
        // The last usage counts; one inside a string (escaped) does not; none, or one that
        // fell out of the tail, is none.
        let text = br#"{"choices":[{"message":{"content":"say \"usage\": {\"total_tokens\": 1}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(usage(&[text]), Some((Some(3), Some(4), 7)));
        let inside = br#"{"choices":[{"message":{"content":"\"usage\": {\"total_tokens\": 1}"}}]}"#;
        assert_eq!(usage(&[inside]), None);
        let key_with_a_quote = br#"{"\"usage":{"total_tokens":1}}"#;
        assert_eq!(usage(&[key_with_a_quote]), None);
        assert_eq!(usage(&[data.as_bytes()]), None);
        let early = format!(
            "{{\"usage\":{{\"total_tokens\":5}},\"data\":[{}0]}}",
            "1,".repeat(JSON_TAIL_BYTES)
        );
        assert_eq!(usage(&[early.as_bytes()]), None);
        // A usage that does not parse is skipped for an earlier one.
        let broken = br#"{"usage":{"total_tokens":9},"x":{"usage":{"total_tokens":"many"}}}"#;
        assert_eq!(usage(&[broken]), Some((None, None, 9)));
        // Memory: never more than twice the tail.
        let mut tail = JsonTail::default();
        for c in whole.chunks(333) {
            tail.feed(c);
            assert!(tail.tail.len() <= 2 * JSON_TAIL_BYTES);
        }
    }

    /// From an outside audit of upstreams other than the mock: a usage object without a count
    /// is no usage (it was settled as 0 tokens); figures written as floats, or too large for 64
    /// bits, are read (the whole usage was dropped for them); text events are counted whatever
    /// the whitespace around the colon (only compact JSON was).
    #[test]
    fn usage_and_text_are_read_as_any_upstream_writes_them() {
        let total = |body: &str| usage_of_json(body.as_bytes()).map(|u| u.total());
        assert_eq!(total(r#"{"usage":{}}"#), None);
        assert_eq!(
            total(r#"{"usage":{"prompt_tokens_details":{"cached_tokens":5}}}"#),
            None
        );
        assert_eq!(
            total(
                r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":3.0,"total_tokens":15.0}}"#
            ),
            Some(15)
        );
        assert_eq!(total(r#"{"usage":{"total_tokens":1.5e1}}"#), Some(15));
        assert_eq!(
            total(r#"{"usage":{"total_tokens":1000000000000000000000}}"#),
            Some(MAX_REQUEST_TOKENS)
        );
        assert_eq!(
            total(r#"{"usage":{"total_tokens":1e300}}"#),
            Some(MAX_REQUEST_TOKENS)
        );
        // Not a count: as if left out, the others read.
        assert_eq!(
            total(r#"{"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":-5}}"#),
            Some(10)
        );
        assert_eq!(
            total(r#"{"usage":{"prompt_tokens":"7","completion_tokens":3,"total_tokens":null}}"#),
            Some(3)
        );
        assert_eq!(total(r#"{"usage":{"total_tokens":[1],"x":{"y":2}}}"#), None);
        // In the end of a large answer too: the last usage with a count.
        let mut tail = JsonTail::default();
        tail.feed(br#"{"usage":{"total_tokens":9},"x":{"usage":{"cached":1}}}"#);
        assert_eq!(tail.finish().map(|u| u.total()), Some(9));

        for (event, text) in [
            (r#"{"choices":[{"delta":{"content":"t0 "}}]}"#, true),
            (r#"{"choices": [{"delta": {"content": "t0 "}}]}"#, true),
            (r#"{"choices":[{"delta":{"content" :	"t"}}]}"#, true),
            (r#"{"choices": [{"delta": {"content": ""}}]}"#, false),
            (r#"{"choices": [{"text": "x"}]}"#, true),
            (r#"{"choices": [{"delta": {"role": "assistant"}}]}"#, false),
            (r#"{"content": 5}"#, false),
        ] {
            assert_eq!(carries_text(event.as_bytes()), text, "{event}");
        }
    }

    #[test]
    fn usage_is_read_wherever_the_known_apis_put_it() {
        let total = |body: &str| usage_of_json(body.as_bytes()).map(|u| u.total());
        assert_eq!(
            total(r#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#),
            Some(7)
        );
        assert_eq!(
            total(r#"{"usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}"#),
            Some(11)
        );
        assert_eq!(
            total(r#"{"usage":{"input_tokens":5,"output_tokens":6}}"#),
            Some(11)
        );
        assert_eq!(
            total(
                r#"{"object":"response","response":{"usage":{"input_tokens":1,"output_tokens":2}}}"#
            ),
            Some(3)
        );
        assert_eq!(total(r#"{"usage":null}"#), None);
        assert_eq!(total(r#"{"choices":[]}"#), None);
        // A sibling of an unexpected type does not hide the usage beside it (an outside audit:
        // the estimate was charged instead).
        let u = r#""usage":{"prompt_tokens":10,"completion_tokens":990,"total_tokens":1000}"#;
        for sibling in [
            r#""response":"some text""#,
            r#""response":null"#,
            r#""response":{"usage":"n/a"}"#,
            r#""response":[1,{"usage":2}]"#,
            r#""choices":{}"#,
            r#""choices":"none""#,
            r#""choices":7"#,
            r#""usage_note":1"#,
        ] {
            assert_eq!(
                total(&format!("{{{sibling},{u}}}")),
                Some(1000),
                "{sibling}"
            );
            assert_eq!(
                total(&format!("{{{u},{sibling}}}")),
                Some(1000),
                "{sibling}"
            );
        }
        // A usage that is no object is none, and the one under `response` is still read.
        assert_eq!(
            total(r#"{"usage":"n/a","response":{"usage":{"total_tokens":4}}}"#),
            Some(4)
        );
        assert_eq!(total(r#"{"usage":[1,2],"choices":[]}"#), None);
        // The usage-only chunk of a stream, with such a sibling: read, and removed.
        let mut s = SseScanner::new(true);
        let event = format!("data: {{\"choices\":[],\"response\":\"text\",{u}}}\n\n");
        assert!(s.feed(event.as_bytes()).is_empty());
        assert_eq!(s.usage().map(|u| u.total()), Some(1000));
        // Choices that are no array make no usage-only chunk: kept, the usage read.
        let mut s = SseScanner::new(true);
        let event = format!("data: {{\"choices\":{{}},{u}}}\n\n");
        assert_eq!(&s.feed(event.as_bytes())[..], event.as_bytes());
        assert_eq!(s.usage().map(|u| u.total()), Some(1000));
        let observed = usage_of_json(br#"{"usage":{"input_tokens":5,"output_tokens":6}}"#).unwrap();
        assert_eq!(observed.completion(), Some(6));
        // Both namings at once (some compatible servers send both) read as one.
        assert_eq!(
            total(
                r#"{"usage":{"prompt_tokens":2,"input_tokens":2,"completion_tokens":3,"output_tokens":3}}"#
            ),
            Some(5)
        );

        // The Responses API's stream: usage under `response` in `response.completed`, after a
        // `response.created` whose usage is null; nothing is removed.
        let mut s = SseScanner::new(true);
        let created = s.feed(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n");
        assert!(!created.is_empty());
        assert!(s.usage().is_none());
        let done = s.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"total_tokens\":13}}}\n\n");
        assert!(!done.is_empty());
        assert_eq!(s.usage().unwrap().total(), 13);
    }

    #[test]
    fn scanner_reads_usage_and_strips_only_the_usage_only_chunk() {
        let mut s = SseScanner::new(true);
        let a =
            s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\nda");
        // The `"usage":null` the gateway's own asking brought is not passed on either.
        assert_eq!(
            &a[..],
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"
        );
        let b = s.feed(b"ta: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!(&b[..], b"data: [DONE]\n\n");
        assert_eq!(s.usage().unwrap().total(), 7);

        // Usage on a chunk that also has choices (the Mistral API's way) is read and kept.
        let mut s = SseScanner::new(true);
        let c = s.feed(b"data: {\"choices\":[{\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n");
        assert!(!c.is_empty());
        assert_eq!(s.usage().unwrap().total(), 3);

        // Not stripping: the usage-only chunk passes, and the null usage of the others.
        let mut s = SseScanner::new(false);
        let d = s.feed(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":5}}\n\n");
        assert!(!d.is_empty());
        let e = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n";
        assert_eq!(&s.feed(e)[..], e);
    }

    #[test]
    fn a_null_usage_member_is_removed_with_one_comma() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"data: {"a":1,"usage":null}"#, Some(r#"data: {"a":1}"#)),
            (
                r#"data: {"a":1,"usage":null,"b":2}"#,
                Some(r#"data: {"a":1,"b":2}"#),
            ),
            (r#"data: {"usage":null,"b":2}"#, Some(r#"data: {"b":2}"#)),
            (r#"data: {"usage":null}"#, Some(r#"data: {}"#)),
            // Python's `json.dumps`: spaces after separators.
            (
                r#"data: {"a": 1, "usage": null, "b": 2}"#,
                Some(r#"data: {"a": 1, "b": 2}"#),
            ),
            (
                r#"data: {"usage" : null , "b": 2}"#,
                Some(r#"data: {"b": 2}"#),
            ),
            // Nested: the upstream's own, kept (an outside audit: a `delta`'s was removed).
            (
                r#"data: {"x":{"usage":null},"usage":null}"#,
                Some(r#"data: {"x":{"usage":null}}"#),
            ),
            (r#"data: {"choices":[{"delta":{"usage":null}}]}"#, None),
            (
                r#"data: {"x":"}","usage":null}"#,
                Some(r#"data: {"x":"}"}"#),
            ),
            // Inside a string, a value that is not null, or `null` that only starts a word.
            (r#"data: {"content":"say "usage":null,"}"#, None),
            (r#"data: {"usage":{"total_tokens":3}}"#, None),
            (r#"data: {"usage":nullx}"#, None),
            (r#"data: ["usage",null]"#, None),
            (r#"data: {"a":1}"#, None),
        ];
        // JSON over several `data:` lines (an outside audit: kept whole), passed on as one.
        let event =
            "event: chunk\ndata: {\ndata:   \"choices\": [],\ndata:   \"usage\": null\ndata: }\n\n";
        let got = without_null_usage(event.as_bytes()).unwrap();
        assert_eq!(
            std::str::from_utf8(&got).unwrap(),
            "event: chunk\ndata: { \"choices\": [] }\n\n"
        );
        let mut s = SseScanner::new(true);
        let passed = s.feed(event.as_bytes());
        assert_eq!(&passed[..], &got[..]);
        // Its lines ended as they came (an outside audit: `\r\n` became `\n`).
        let crlf = event.replace('\n', "\r\n");
        let got = without_null_usage(crlf.as_bytes()).unwrap();
        assert_eq!(
            std::str::from_utf8(&got).unwrap(),
            "event: chunk\r\ndata: { \"choices\": [] }\r\n\r\n"
        );
        for (event, want) in cases {
            let got = without_null_usage(event.as_bytes());
            assert_eq!(
                got.as_deref().map(|b| std::str::from_utf8(b).unwrap()),
                *want,
                "{event}"
            );
            if let Some(w) = want {
                // What is left is still JSON, without the top-level member.
                let left: Value = serde_json::from_str(&w["data: ".len()..]).unwrap();
                assert!(left.get("usage").is_none(), "{w}");
            }
        }
    }

    #[test]
    fn scanner_passes_every_byte_once_however_the_stream_is_cut() {
        // Lines end in `\n`, `\r\n` or `\r` alone, mixed, as the event-stream format allows.
        // The event before the usage-only one ends in `\r\n\r\n`: cut between its last `\r` and
        // `\n`, the `\n` was dropped with the usage-only event (an outside audit).
        let stream: &[u8] = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: {\"choices\":[{\"delta\":{}}]}\r\rdata: {\"choices\":[{\"delta\":{}}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":9}}\r\n\r\n: comment\r\n\ndata: {\"choices\":[]}\n\r\ndata: [DONE]\r\r";
        let stripped: Vec<u8> = {
            let mut s = SseScanner::new(true);
            let mut out = s.feed(stream).to_vec();
            out.extend_from_slice(&s.finish());
            out
        };
        assert!(!stripped.windows(7).any(|w| w == b"\"usage\""));
        for cut in 1..stream.len() {
            for strip in [false, true] {
                let mut s = SseScanner::new(strip);
                let mut out = Vec::new();
                // Cut in two at `cut`, then the rest a byte at a time.
                out.extend_from_slice(&s.feed(&stream[..cut]));
                for b in &stream[cut..] {
                    out.extend_from_slice(&s.feed(std::slice::from_ref(b)));
                }
                out.extend_from_slice(&s.finish());
                let want = if strip { &stripped[..] } else { stream };
                assert_eq!(out, want, "cut at {cut}, strip {strip}");
                assert_eq!(s.usage().map(|u| u.total()), Some(9));
            }
        }
    }

    #[test]
    fn an_event_without_an_end_is_passed_on_once_it_outgrows_the_bound() {
        let mut s = SseScanner::new(true);
        let chunk = vec![b'x'; 64 * 1024];
        let mut passed = 0;
        for _ in 0..32 {
            passed += s.feed(&chunk).len();
        }
        // Held back until past the bound, then passed on as it was; nothing kept beyond it.
        assert!(passed >= 32 * chunk.len() - MAX_EVENT_BYTES, "{passed}");
        assert!(s.buf.len() <= MAX_EVENT_BYTES);
        passed += s.finish().len();
        assert_eq!(passed, 32 * chunk.len());
        // Events after it are read as before.
        let e = s.feed(b"\n\ndata: {\"usage\":{\"total_tokens\":4}}\n\n");
        assert!(!e.is_empty());
        assert_eq!(s.usage().map(|u| u.total()), Some(4));
    }

    #[test]
    fn the_usage_only_chunk_is_removed_even_when_its_figures_do_not_count() {
        for usage in [
            r#"{"total_tokens":-1}"#,
            "{}",
            r#"{"total_tokens":"15"}"#,
            r#"{"total_tokens":true}"#,
        ] {
            let event = format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\n");
            let mut s = SseScanner::new(true);
            assert!(s.feed(event.as_bytes()).is_empty(), "{usage}");
            assert!(s.usage().is_none(), "{usage} is not a usage");
            // Kept when the client asked for it.
            let mut s = SseScanner::new(false);
            assert_eq!(&s.feed(event.as_bytes())[..], event.as_bytes());
        }
    }

    #[test]
    fn events_with_lines_ended_by_a_carriage_return_alone_are_read() {
        // One event a chunk, and a `data:` field over two lines.
        let mut s = SseScanner::new(true);
        let a = s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\r\r");
        assert_eq!(
            &a[..],
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\r\r"
        );
        let b = s.feed(b"data: {\"choices\":[],\"usage\":\rdata: {\"total_tokens\":5}}\r\r");
        assert!(b.is_empty(), "the usage-only chunk is removed");
        assert_eq!(s.usage().map(|u| u.total()), Some(5));
        // A line's `\r` last is held until the next byte says whether the event ends there.
        let c = s.feed(b"data: [DONE]\r");
        assert!(c.is_empty());
        assert_eq!(&s.feed(b"\n\r\n")[..], b"data: [DONE]\r\n\r\n");
    }
}
