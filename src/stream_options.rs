//! Asking a stream for its usage on the client's behalf: `"stream_options":
//! {"include_usage":true}` spliced into the request body's bytes, everything else forwarded as
//! the client wrote it (no tree built, nothing re-serialised).
//!
//! The rule, the same as when the body was rewritten as a tree:
//! - no `stream_options`: `"stream_options":{"include_usage":true}` is added (first, right after
//!   the opening brace);
//! - `stream_options` that is not an object (`null`, a string…): replaced by
//!   `{"include_usage":true}`;
//! - an object: `include_usage` is set to `true` (first), its other members kept as they were.
//!
//! A name given twice is read differently by different parsers (the last wins in most, the first
//! in some, Go merges objects): every top-level `stream_options` is rewritten, and every
//! `include_usage` inside one is replaced by the one `true`, so that whichever the upstream
//! reads asks for usage. Names are compared once unescaped (`"stream\u005foptions"` is
//! `stream_options`).
//!
//! The body must be a JSON object that `estimate::inspect` has taken (valid JSON, UTF-8). The
//! scan below relies on that: it only finds where members begin and end, and it falls back to
//! a rewrite through a tree should the body be anything else.

use std::ops::Range;

const OPTIONS: &[u8] = br#"{"include_usage":true"#;

/// `body` with `stream_options.include_usage` set to `true`.
pub fn with_include_usage(body: &[u8]) -> Vec<u8> {
    splice(body).unwrap_or_else(|| through_a_tree(body))
}

fn splice(body: &[u8]) -> Option<Vec<u8>> {
    let open = skip_ws(body, 0);
    let (members, _) = object_members(body, open)?;
    let mut out = Vec::with_capacity(body.len() + 48);
    let mut at = 0;
    let mut found = false;
    for m in &members {
        if !key_is(body, &m.key, "stream_options") {
            continue;
        }
        found = true;
        out.extend_from_slice(&body[at..m.value.start]);
        rewrite_options(body, &m.value, &mut out)?;
        at = m.value.end;
    }
    if !found {
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(br#""stream_options":"#);
        out.extend_from_slice(OPTIONS);
        out.push(b'}');
        if !members.is_empty() {
            out.push(b',');
        }
        at = open + 1;
    }
    out.extend_from_slice(&body[at..]);
    Some(out)
}

/// Writes the value of one `stream_options`: `include_usage` first and `true`, then the other
/// members of the client's object, if it was one.
fn rewrite_options(body: &[u8], value: &Range<usize>, out: &mut Vec<u8>) -> Option<()> {
    out.extend_from_slice(OPTIONS);
    if body[value.start] == b'{' {
        let (members, _) = object_members(body, value.start)?;
        for m in members
            .iter()
            .filter(|m| !key_is(body, &m.key, "include_usage"))
        {
            out.push(b',');
            out.extend_from_slice(&body[m.key.clone()]);
            out.push(b':');
            out.extend_from_slice(&body[m.value.clone()]);
        }
    }
    out.push(b'}');
    Some(())
}

/// The rewrite as a tree, for a body the scan does not take (never one `inspect` took).
fn through_a_tree(body: &[u8]) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice(body) else {
        return body.to_vec();
    };
    let options = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !options.is_object() {
        *options = serde_json::Value::Object(Default::default());
    }
    options["include_usage"] = serde_json::Value::Bool(true);
    serde_json::to_vec(&obj).unwrap_or_else(|_| body.to_vec())
}

/// One member of an object: its name (with its quotes, as written) and its value, as spans.
struct Member {
    key: Range<usize>,
    value: Range<usize>,
}

/// Whether the name at `key` (with its quotes) is `name`, once unescaped.
fn key_is(body: &[u8], key: &Range<usize>, name: &str) -> bool {
    let raw = &body[key.start + 1..key.end - 1];
    if !raw.contains(&b'\\') {
        return raw == name.as_bytes();
    }
    serde_json::from_slice::<String>(&body[key.clone()]).is_ok_and(|k| k == name)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The end (past its closing quote) of the string whose opening quote is at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[j] == b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// The end of the value that starts at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A number, `true`, `false` or `null`.
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// The members of the object whose `{` is at `open`, and where its `}` is.
fn object_members(b: &[u8], open: usize) -> Option<(Vec<Member>, usize)> {
    if b.get(open) != Some(&b'{') {
        return None;
    }
    let mut members = Vec::new();
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some((members, i));
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key = i..string_end(b, i)?;
        i = skip_ws(b, key.end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let value = start..value_end(b, start)?;
        i = skip_ws(b, value.end);
        members.push(Member { key, value });
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some((members, i)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spliced(body: &str) -> String {
        let out = String::from_utf8(with_include_usage(body.as_bytes())).unwrap();
        let _: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
        out
    }

    /// The body as a last-wins parser reads it.
    fn read(body: &str) -> Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn stream_options_are_added_set_or_replaced_and_the_rest_is_kept_as_sent() {
        for (body, want) in [
            (
                r#"{"model":"m","stream":true}"#,
                r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#,
            ),
            ("{}", r#"{"stream_options":{"include_usage":true}}"#),
            (" \n{ }\n", " \n{\"stream_options\":{\"include_usage\":true} }\n"),
            (
                r#"{"stream_options":null,"stream":true}"#,
                r#"{"stream_options":{"include_usage":true},"stream":true}"#,
            ),
            (
                r#"{"stream_options":"yes"}"#,
                r#"{"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream_options":[1,{"a":2}]}"#,
                r#"{"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#,
                r#"{"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#,
            ),
            (
                r#"{"stream_options":{"include_usage":"no"}}"#,
                r#"{"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream_options":{}}"#,
                r#"{"stream_options":{"include_usage":true}}"#,
            ),
            // Whitespace anywhere, kept where it does not touch the option.
            (
                "{ \"stream\" : true ,\n \"stream_options\" :\t{ \"x\" : [ 1 , \"}\" ] } , \"n\":1 }",
                "{ \"stream\" : true ,\n \"stream_options\" :\t{\"include_usage\":true,\"x\":[ 1 , \"}\" ]} , \"n\":1 }",
            ),
            // An escaped name is the same name.
            (
                r#"{"stream\u005foptions":{"include\u005fusage":false,"a":1}}"#,
                r#"{"stream\u005foptions":{"include_usage":true,"a":1}}"#,
            ),
            // Strings that look like the option, or hold quotes and braces, are not it.
            (
                r#"{"messages":[{"content":"\"stream_options\":{}}\\"}],"stream_options2":1}"#,
                r#"{"stream_options":{"include_usage":true},"messages":[{"content":"\"stream_options\":{}}\\"}],"stream_options2":1}"#,
            ),
            // Nested `stream_options` are not the request's.
            (
                r#"{"metadata":{"stream_options":null}}"#,
                r#"{"stream_options":{"include_usage":true},"metadata":{"stream_options":null}}"#,
            ),
        ] {
            assert_eq!(spliced(body), want, "{body}");
        }
    }

    #[test]
    fn a_name_given_twice_asks_for_usage_whichever_one_is_read() {
        let out = spliced(
            r#"{"stream_options":{"include_usage":false,"a":1},"stream":true,"stream_options":{"include_usage":false,"include_usage":false,"b":2}}"#,
        );
        assert_eq!(
            out,
            r#"{"stream_options":{"include_usage":true,"a":1},"stream":true,"stream_options":{"include_usage":true,"b":2}}"#
        );
        // The last one, as most parsers read it, holds the option and its other members.
        assert_eq!(
            read(&out)["stream_options"],
            json!({"include_usage": true, "b": 2})
        );
    }

    #[test]
    fn whatever_the_body_a_last_wins_reader_sees_it_as_before_plus_the_option() {
        let bodies = [
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "héllo \"x\" \\ \u{1F600}"}]}),
            json!({"model": "m", "stream_options": {"include_usage": false, "k": [1, 2, {"z": null}]}}),
            json!({"model": "m", "stream_options": 3.5e10, "n": -1}),
            json!({"a": {"b": {"c": [[[]], {}]}}, "s": "\u{0}\t"}),
        ];
        for body in bodies {
            for text in [
                body.to_string(),
                serde_json::to_string_pretty(&body).unwrap(),
            ] {
                let mut want = body.clone();
                let options = want
                    .as_object_mut()
                    .unwrap()
                    .entry("stream_options")
                    .or_insert(json!({}));
                if !options.is_object() {
                    *options = json!({});
                }
                options["include_usage"] = json!(true);
                assert_eq!(read(&spliced(&text)), want, "{text}");
            }
        }
    }

    #[test]
    fn a_body_the_scan_does_not_take_is_never_a_panic() {
        // Not what `inspect` lets through: passed on as it is.
        for body in [
            &b"{\"a\" : 1"[..],
            b"[1]",
            b"",
            b"{\"a\":\"\\",
            b"{\"a\"",
            b"{,}",
        ] {
            assert_eq!(with_include_usage(body), body);
        }
    }
}
