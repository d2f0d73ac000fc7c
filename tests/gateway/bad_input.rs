//! Bad input on the metered routes: keys that are missing, garbled or unknown, and bodies the
//! upstream APIs would refuse. One table of cases; each gets its 4xx with a JSON body in the
//! gateway's error shape, is never forwarded, and consumes no quota.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tiergate::catalog::generate_key;

use crate::harness::*;

enum Key {
    None,
    /// The workspace's own key.
    Own,
    /// `Authorization` exactly as given.
    Header(String),
}

struct Case {
    what: &'static str,
    path: &'static str,
    key: Key,
    body: Vec<u8>,
    status: u16,
}

fn own(what: &'static str, path: &'static str, body: impl Into<Vec<u8>>) -> Case {
    Case {
        what,
        path,
        key: Key::Own,
        body: body.into(),
        status: 400,
    }
}

fn chat(what: &'static str, body: Value) -> Case {
    own(what, "/v1/chat/completions", body.to_string())
}

fn with_header(what: &'static str, header: String) -> Case {
    Case {
        what,
        path: "/v1/chat/completions",
        key: Key::Header(header),
        body: hello().to_string().into_bytes(),
        status: 401,
    }
}

const LIMIT: u64 = 1_000_000;

fn table(own_key: &str) -> Vec<Case> {
    // The real key with one character of its randomness changed: its check no longer holds.
    let mut garbled: Vec<u8> = own_key.as_bytes().to_vec();
    garbled[5] = if garbled[5] == b'a' { b'b' } else { b'a' };
    let garbled = String::from_utf8(garbled).unwrap();
    let chars_of_key = own_key.len();
    let mut cases = vec![
        Case {
            what: "no key",
            path: "/v1/chat/completions",
            key: Key::None,
            body: hello().to_string().into_bytes(),
            status: 401,
        },
        with_header("an empty bearer", "Bearer ".into()),
        with_header("a bearer of spaces", "Bearer     ".into()),
        with_header("the key without a scheme", own_key.to_string()),
        with_header("another scheme", format!("Basic {own_key}")),
        with_header("a key in the wrong form", "Bearer sk-1234567890".into()),
        with_header("only the prefix", "Bearer tg_".into()),
        with_header("a garbled key", format!("Bearer {garbled}")),
        with_header(
            "the key cut short",
            format!("Bearer {}", &own_key[..chars_of_key - 1]),
        ),
        with_header("the key and more", format!("Bearer {own_key}x")),
        with_header(
            "a well-formed key no one was given",
            format!("Bearer {}", generate_key().secret),
        ),
        with_header("a very long key", format!("Bearer tg_{}", "a".repeat(6000))),
        with_header("an SQL fragment", "Bearer tg_' OR '1'='1".into()),
        // Bodies that are not a JSON object.
        own("an empty body", "/v1/chat/completions", ""),
        own("not JSON", "/v1/chat/completions", "hello"),
        own(
            "truncated JSON",
            "/v1/chat/completions",
            r#"{"model": "m", "messages": ["#,
        ),
        own(
            "invalid UTF-8",
            "/v1/chat/completions",
            b"{\"model\": \"\xff\xfe\", \"messages\": []}".to_vec(),
        ),
        own("a JSON array", "/v1/chat/completions", "[]"),
        own("a JSON string", "/v1/chat/completions", "\"hi\""),
        own("JSON null", "/v1/chat/completions", "null"),
        own("a number", "/v1/chat/completions", "42"),
        own(
            "nested past any sense",
            "/v1/chat/completions",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        own("two objects", "/v1/chat/completions", "{} {}"),
        // The model.
        chat("no model", json!({"messages": []})),
        chat("a null model", json!({"model": null, "messages": []})),
        chat("an empty model", json!({"model": "", "messages": []})),
        chat(
            "a model that is a number",
            json!({"model": 3, "messages": []}),
        ),
        chat(
            "a model that is an object",
            json!({"model": {"id": "m"}, "messages": []}),
        ),
        chat(
            "a model name of 257 bytes",
            json!({"model": "m".repeat(257), "messages": []}),
        ),
        // Messages.
        chat("no messages", json!({"model": "m"})),
        chat(
            "messages that are a string",
            json!({"model": "m", "messages": "hi"}),
        ),
        chat(
            "messages of strings",
            json!({"model": "m", "messages": ["hi"]}),
        ),
        chat("null messages", json!({"model": "m", "messages": null})),
        // max_tokens and its kin.
        chat(
            "a negative max_tokens",
            json!({"model": "m", "messages": [], "max_tokens": -1}),
        ),
        chat(
            "a fractional max_tokens",
            json!({"model": "m", "messages": [], "max_tokens": 1.5}),
        ),
        chat(
            "max_tokens as a string",
            json!({"model": "m", "messages": [], "max_tokens": "10"}),
        ),
        chat(
            "max_tokens as a boolean",
            json!({"model": "m", "messages": [], "max_tokens": true}),
        ),
        chat(
            "max_tokens above the limit",
            json!({"model": "m", "messages": [], "max_tokens": LIMIT + 1}),
        ),
        chat(
            "max_tokens of u64::MAX",
            json!({"model": "m", "messages": [], "max_tokens": u64::MAX}),
        ),
        own(
            "max_tokens past u64",
            "/v1/chat/completions",
            r#"{"model": "m", "messages": [], "max_tokens": 18446744073709551616}"#,
        ),
        own(
            "max_tokens of 1e30",
            "/v1/chat/completions",
            r#"{"model": "m", "messages": [], "max_tokens": 1e30}"#,
        ),
        chat(
            "a negative max_completion_tokens",
            json!({"model": "m", "messages": [], "max_completion_tokens": -5}),
        ),
        // stream and n.
        chat(
            "stream as a string",
            json!({"model": "m", "messages": [], "stream": "true"}),
        ),
        chat(
            "stream as a number",
            json!({"model": "m", "messages": [], "stream": 1}),
        ),
        chat("no choices", json!({"model": "m", "messages": [], "n": 0})),
        chat(
            "too many choices",
            json!({"model": "m", "messages": [], "n": 129}),
        ),
        chat(
            "negative choices",
            json!({"model": "m", "messages": [], "n": -1}),
        ),
        chat(
            "choices as a string",
            json!({"model": "m", "messages": [], "n": "2"}),
        ),
        // The other metered routes.
        own(
            "a completion without a prompt",
            "/v1/completions",
            json!({"model": "m"}).to_string(),
        ),
        own(
            "a completion with a negative max_tokens",
            "/v1/completions",
            json!({"model": "m", "prompt": "hi", "max_tokens": -1}).to_string(),
        ),
        own(
            "a fill-in-the-middle without a prompt",
            "/v1/fim/completions",
            json!({"model": "m", "suffix": "x"}).to_string(),
        ),
        own(
            "embeddings without input",
            "/v1/embeddings",
            json!({"model": "e"}).to_string(),
        ),
        own(
            "embeddings without a model",
            "/v1/embeddings",
            json!({"input": "hi"}).to_string(),
        ),
        own(
            "a response with input of a number",
            "/v1/responses",
            json!({"model": "m", "input": 5}).to_string(),
        ),
        own(
            "a response with a negative max_output_tokens",
            "/v1/responses",
            json!({"model": "m", "input": "hi", "max_output_tokens": -1}).to_string(),
        ),
        own(
            "a metered path spelt otherwise",
            "/v1//Chat/Completions/",
            json!({"model": "m"}).to_string(),
        ),
    ];
    // Over `max_body_bytes` (4 MiB by default).
    let mut big = own(
        "a body over the size limit",
        "/v1/chat/completions",
        format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
            "a".repeat(4 * 1024 * 1024 + 1)
        ),
    );
    big.status = 413;
    cases.push(big);
    cases
}

#[tokio::test]
async fn bad_keys_and_bodies_get_a_json_4xx_are_not_forwarded_and_cost_nothing() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let before = gw.limits(&key).await;
    let forwarded = gw.upstream_count().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let cases = table(&key);
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let mut request = client
            .post(format!("{}{}", gw.url, c.path))
            .header("content-type", "application/json")
            .body(c.body.clone());
        request = match &c.key {
            Key::None => request,
            Key::Own => request.bearer_auth(&key),
            Key::Header(h) => request.header("authorization", h.as_str()),
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: no answer: {e}", c.what));
                continue;
            }
        };
        let status = response.status();
        let json_type = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"));
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let shaped = is_error_shaped(&body);
        let leaks = text.contains(&key);
        if status.as_u16() != c.status || !json_type || !shaped || leaks {
            failures.push(format!(
                "{}: {} -> {status} (want {}), body: {}",
                c.what,
                c.path,
                c.status,
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // None reached the upstream, and none took a request or a token from the workspace.
    assert_eq!(
        gw.upstream_count().await,
        forwarded,
        "nothing was forwarded"
    );
    let after = gw.limits(&key).await;
    assert_eq!(after["usage"], before["usage"]);
    let usage = gw.exact_usage(&key).await;
    assert_eq!(usage["requests_this_month"], 0, "{usage}");
    assert_eq!(usage["tokens_this_month"], 0, "{usage}");

    // The same key, with a body that is right, still gets through at once.
    let r = gw
        .chat(
            &key,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LIMIT}),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(gw.upstream_count().await, forwarded + 1);
}

/// A metered body is read as it came: one with a `Content-Encoding` (which the upstream would
/// undo first, and read otherwise than the estimate did) is refused, not forwarded, nothing
/// charged (an outside audit: `br` on plain JSON was forwarded with its header). `identity` is
/// no encoding.
#[tokio::test]
async fn a_compressed_metered_body_is_refused() {
    let (gw, key) = TestGateway::on_tier(json!({"tokens_per_minute": 100_000})).await;
    let before = gw.upstream_count().await;
    for encoding in ["br", "gzip", "deflate, br"] {
        let r = gw
            .chat(&key, hello(), &[("content-encoding", encoding)])
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{encoding}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "invalid_request_error", "{v}");
        assert!(
            v["message"].as_str().unwrap().contains("Content-Encoding"),
            "{v}"
        );
    }
    assert_eq!(gw.upstream_count().await, before, "forwarded");
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 0);
    let r = gw
        .chat(&key, hello(), &[("content-encoding", "identity")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}
