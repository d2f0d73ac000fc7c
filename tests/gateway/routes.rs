//! No route escapes metering: path variants are metered as the route they name and forwarded in
//! their normalised form, what cannot be normalised is refused, `/v1/responses` is metered like
//! chat, and pass-through routes are settled from the usage in their answers.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::*;
use tiergate::config::{RawSettings, RawUpstream};

const MONTH: u64 = 1_000_000;

async fn setup() -> (TestGateway, String) {
    TestGateway::on_tier(json!({"tokens_per_minute": 100_000, "tokens_per_month": MONTH})).await
}

#[tokio::test]
async fn path_variants_are_metered_as_their_route_and_forwarded_normalised() {
    let (gw, key) = setup().await;
    let auth = format!("Bearer {key}");
    let invalid = r#"{"model":"m","messages":"nope"}"#;
    let valid = serde_json::to_string(&hello()).unwrap();
    let variants = [
        "/v1/chat/completions/",
        "/v1//chat/completions",
        "/v1/chat//completions//",
        "/v1/%63hat/completions",
        "/v1/./chat/completions",
        "/v1/chat/completions/.",
        "/v1/x/../chat/completions",
        "/v1/%2e%2E/v1/chat/completions",
        "/v1/Chat/COMPLETIONS",
        // Empty segments before `v1` too: this was a 404 (an outside audit).
        "//v1//chat/completions",
    ];
    for path in variants {
        // Metered: a body the estimate cannot read is the gateway's own 400, never forwarded.
        let before = gw.upstream_count().await;
        let headers = [("authorization", auth.as_str())];
        let (status, body) = raw_request(&gw.url, "POST", path, &headers, invalid).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.contains("'messages' must be an array"),
            "{path}: {body}"
        );
        // The field at fault, as the OpenAI API names it.
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (&v["param"], &v["error"]["param"]),
            (&json!("messages"), &json!("messages"))
        );
        assert_eq!(gw.upstream_count().await, before, "{path} was forwarded");
        // Forwarded as the route itself: the upstream answers a chat completion.
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("x-mock-usage", "3,4"),
        ];
        let (status, body) = raw_request(&gw.url, "POST", path, &headers, &valid).await;
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "chat.completion", "{path}: {v}");
    }
    let limits = gw.limits(&key).await;
    assert_eq!(
        limits["usage"]["tokens_this_month"],
        7 * variants.len() as u64,
        "each settled from its usage"
    );
    assert_eq!(
        gw.exact_usage(&key).await["requests_this_month"],
        variants.len() as u64
    );
}

/// The workspace API's own routes in another spelling are served by the gateway, never
/// forwarded: `/v1/webhooks/` with a body reached the upstream, the endpoint's URL with it, and
/// `/v1/limits/` cost a request (an outside audit); `/v1/Limits` was forwarded (another).
#[tokio::test]
async fn the_gateway_s_own_routes_in_another_spelling_are_its_own() {
    let (gw, key) = setup().await;
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    let before = gw.upstream_count().await;
    for path in [
        "/v1/limits/",
        "/v1//limits",
        "/v1/./usage/",
        "//v1/limit-requests/",
        "/v1/Limits",
        "/v1/LIMITS/",
        "/v1/Usage",
        "/v1/Limit-Requests",
        "/v1/BUDGET",
        "/v1/Webhooks",
    ] {
        let (status, body) = raw_request(&gw.url, "GET", path, &headers, "").await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(gw.upstream_count().await, before, "{path} was forwarded");
    }
    let hook = r#"{"url":"https://hooks.example/secret-path","events":["quota.threshold"]}"#;
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let mut made = 0;
    for path in ["/v1/webhooks/", "/v1/WebHooks"] {
        let (status, body) = raw_request(&gw.url, "POST", path, &headers, hook).await;
        assert_eq!(status, 201, "{path}: {body}");
        assert!(body.contains("whsec_"), "{body}");
        made = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
            .as_i64()
            .unwrap();
    }
    // Every segment, not the first alone (an outside audit: `…/Deliveries` was a `404`).
    let headers = [("authorization", auth.as_str())];
    for path in [
        format!("/v1/webhooks/{made}/Deliveries"),
        format!("/v1/WEBHOOKS/{made}/DELIVERIES/"),
    ] {
        let (status, body) = raw_request(&gw.url, "GET", &path, &headers, "").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(gw.upstream_count().await, before, "forwarded upstream");
    assert_eq!(gw.exact_usage(&key).await["requests_this_month"], 0);
}

#[tokio::test]
async fn paths_that_cannot_be_normalised_are_refused_in_the_gateway_error_shape() {
    let (gw, key) = setup().await;
    let auth = format!("Bearer {key}");
    let body = serde_json::to_string(&hello()).unwrap();
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat%5ccompletions",
        "/v1/chat/completions;v=1",
        "/v1/%zz/completions",
        "/v1/chat/completions%",
        "/v1/%e2%28%a1",
        "/v1/%00/completions",
        "/v1/../../etc/passwd",
        "/v1/../admin/v1/workspaces",
        "/v1/..",
        "/v1/./",
    ] {
        let headers = [("authorization", auth.as_str())];
        let (status, answer) = raw_request(&gw.url, "POST", path, &headers, &body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["object"], "error", "{path}: {v}");
        assert_eq!(v["type"], "invalid_request_error", "{path}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("cannot be normalised"),
            "{path}: {v}"
        );
    }
    assert_eq!(gw.upstream_count().await, 0);
}

#[tokio::test]
async fn responses_are_metered_like_chat_json_and_streamed() {
    let (gw, key) = setup().await;
    // 25 characters: 7 tokens, one item: 4, framing: 3; completion min(50, 256).
    let body =
        json!({"model": "gpt-mock", "input": "Hello there, how are you?", "max_output_tokens": 50});
    let r = gw
        .post(&key, "/v1/responses", body, &[("x-mock-usage", "11,6")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Its headers show what is left after its cost, the upstream's usage (it reserved 14 + 50
    // from input and max_output_tokens; the broken stream below shows a reservation).
    assert_eq!(
        MONTH - header_u64(&r, "x-ratelimit-remaining-tokens-month"),
        17,
        "what is left after its cost"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 17);

    // A stream: usage under `response.usage` in `response.completed`. The gateway does not add
    // `stream_options.include_usage`, which the Responses API does not take.
    let body = json!({"model": "gpt-mock", "stream": true,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]});
    let r = gw
        .post(&key, "/v1/responses", body, &[("x-mock-usage", "9,4")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("event: response.completed"), "{text}");
    assert!(
        text.contains("\"total_tokens\":13"),
        "passed on untouched: {text}"
    );
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 17 + 13);

    // A stream that breaks before `response.completed`: charged its estimate.
    let body = json!({"model": "gpt-mock", "stream": true, "input": "Hi", "max_output_tokens": 5});
    let r = gw
        .post(
            &key,
            "/v1/responses",
            body,
            &[("x-mock-fail-after-chunks", "2")],
        )
        .await;
    let estimate = (MONTH - 30) - header_u64(&r, "x-ratelimit-remaining-tokens-month");
    assert!(r.text().await.is_err(), "the client sees the break");
    assert_eq!(estimate, 1 + 4 + 3 + 5);
    assert_eq!(
        gw.settled_month_tokens(&key).await,
        30 + estimate,
        "a stream that delivered something is never refunded"
    );
}

#[tokio::test]
async fn pass_through_routes_reserve_nothing_but_settle_from_the_usage_in_their_answer() {
    let (gw, key) = setup().await;
    let agents = json!({"agent_id": "ag_1", "messages": [{"role": "user", "content": "Hi"}]});
    let r = gw
        .post(
            &key,
            "/v1/agents/completions",
            agents.clone(),
            &[("x-mock-usage", "5,3")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header_u64(&r, "x-ratelimit-remaining-tokens-month"),
        MONTH - 8,
        "what is left after its cost, from the usage in its answer"
    );
    r.bytes().await.unwrap();
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 8);

    // Streamed, with the usage on the last chunk (Mistral's way).
    let mut body = agents;
    body["stream"] = json!(true);
    let h = [
        ("x-mock-usage", "6,2"),
        ("x-mock-stream-usage", "last-chunk"),
    ];
    let r = gw.post(&key, "/v1/agents/completions", body, &h).await;
    assert_eq!(r.status(), StatusCode::OK);
    // A stream's headers leave before its cost is known: they show that nothing was reserved.
    assert_eq!(
        header_u64(&r, "x-ratelimit-remaining-tokens-month"),
        MONTH - 8,
        "nothing reserved"
    );
    r.text().await.unwrap();
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 16);
}

/// The answer's and the request's framing are each side's own (from an outside audit): a `HEAD`
/// keeps the upstream's length (it was `0`), `Expect` is answered by the gateway and not
/// forwarded, and two `Authorization` headers are refused rather than one picked.
#[tokio::test]
async fn framing_headers_are_each_hops_own() {
    let (gw, key) = setup().await;
    let get = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    let length = get.bytes().await.unwrap().len();
    assert!(length > 0);
    let head = gw
        .client
        .head(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header(&head, "content-length"),
        Some(length.to_string().as_str())
    );

    let auth = format!("Bearer {key}");
    let body = serde_json::to_string(&hello()).unwrap();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("expect", "100-continue"),
        ("x-mock-echo-headers", "1"),
    ];
    let (status, answer) =
        raw_request(&gw.url, "POST", "/v1/chat/completions", &headers, &body).await;
    assert_eq!(status, 200, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert!(v["received_headers"]["content-type"].is_string(), "{v}");
    assert!(v["received_headers"].get("expect").is_none(), "{v}");

    let before = gw.upstream_count().await;
    for pair in [
        [auth.as_str(), "Bearer tg_wrong"],
        ["Bearer tg_wrong", auth.as_str()],
    ] {
        let headers = [
            ("authorization", pair[0]),
            ("authorization", pair[1]),
            ("content-type", "application/json"),
        ];
        let (status, answer) =
            raw_request(&gw.url, "POST", "/v1/chat/completions", &headers, &body).await;
        assert_eq!(status, 401, "{answer}");
        // Told what is wrong: not that the key is missing (an outside audit).
        assert!(answer.contains("Two 'Authorization' headers"), "{answer}");
    }
    assert_eq!(gw.upstream_count().await, before);
}

/// Only the methods an API uses are passed on: `TRACE` would have whatever echoes requests
/// upstream send back the request as the gateway sent it, the upstream's key in it (an outside
/// audit), and `CONNECT` or made-up methods mean nothing to an API. Refused once the key is
/// known (`401` before), never forwarded, nothing charged.
#[tokio::test]
async fn methods_an_api_does_not_use_are_refused_and_not_forwarded() {
    let (gw, key) = setup().await;
    let before = gw.upstream_count().await;
    for method in ["TRACE", "TRACK", "FOO"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = gw
            .client
            .request(m.clone(), format!("{}/v1/models", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(
            r.headers()["allow"],
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            "{method}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "method_not_allowed", "{method}: {body}");
        let r = gw
            .client
            .request(m, format!("{}/v1/chat/completions", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{method} without a key"
        );
    }
    assert_eq!(gw.upstream_count().await, before, "forwarded");
    // The methods an API uses still are.
    let r = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(gw.upstream_count().await, before + 1);
    assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 0);
}

/// A chunked body whose framing is broken is a `400`, not the `413` of a body over the limit
/// (an outside audit: a few bytes were answered "larger than 4194304 bytes"). Not forwarded.
#[tokio::test]
async fn a_body_whose_chunks_are_malformed_is_a_400() {
    let (gw, key) = setup().await;
    let addr = gw.url.trim_start_matches("http://");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
         authorization: Bearer {key}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    );
    let (status, body) = raw_exchange(&gw.url, request.as_bytes()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("could not be read"), "{body}");
    assert_eq!(gw.upstream_count().await, 0);
}

/// By default (`upstream.unmetered = stateless`) only the routes that keep nothing at the
/// upstream are passed on off the metered ones: every workspace reaches the upstream through the
/// gateway's one account, and what one stored there another could list, read and delete (an
/// outside audit: tenant B listed, downloaded and deleted tenant A's file, and listed A's stored
/// chat completions). The model catalogue and the stateless routes pass; the others are refused
/// with `403`, not forwarded.
#[tokio::test]
async fn by_default_only_the_routes_that_keep_nothing_upstream_are_passed_on() {
    let gw = TestGateway::start().await;
    gw.put_tier("t", json!({"tokens_per_month": MONTH})).await;
    let (_, key) = gw.workspace("t").await;
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut r = gw
            .client
            .request(method, format!("{}{path}", gw.url))
            .bearer_auth(&key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    use reqwest::Method as M;
    let moderation = json!({"input": "hello"});
    let agents = json!({"agent_id": "ag_1", "messages": [{"role": "user", "content": "Hi"}]});
    for (method, path, body) in [
        (M::GET, "/v1/models", None),
        (M::GET, "/v1/models/mistral-small-latest", None),
        (M::POST, "/v1/moderations", Some(moderation)),
        (M::POST, "/v1/agents/completions", Some(agents)),
    ] {
        let before = gw.upstream_count().await;
        let r = call(method.clone(), path, body).await.unwrap();
        assert_ne!(r.status(), StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(gw.upstream_count().await, before + 1, "{method} {path}");
    }
    let before = gw.upstream_count().await;
    for (method, path) in [
        (M::GET, "/v1/files"),
        (M::POST, "/v1/files"),
        (M::GET, "/v1/files/file-1/content"),
        (M::DELETE, "/v1/files/file-1"),
        (M::GET, "/v1/batches"),
        (M::POST, "/v1/fine_tuning/jobs"),
        (M::GET, "/v1/assistants"),
        (M::GET, "/v1/vector_stores"),
        (M::GET, "/v1/chat/completions"),
        (M::GET, "/v1/chat/completions/chatcmpl-1"),
        (M::GET, "/v1/responses/resp_1"),
        (M::DELETE, "/v1/responses/resp_1"),
        (M::DELETE, "/v1/models/ft:mine"),
        (M::GET, "/v1/agents"),
        (M::GET, "/v1/things"),
    ] {
        let r = call(method.clone(), path, None).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["type"], "permission_error", "{method} {path}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("keep nothing at the upstream"),
            "{message}"
        );
    }
    assert_eq!(gw.upstream_count().await, before, "forwarded");
}

/// Off the metered routes nothing is reserved, so their token limits hold only after the fact
/// (an outside audit took 200 times a month quota through one, with requests sent at once while
/// 1 token was left): `upstream.unmetered` keeps them from the upstream, all but the reads
/// (`reads`) or all (`none`). Refused with `403`, not forwarded, nothing charged; the metered
/// routes pass as ever.
#[tokio::test]
async fn an_operator_may_keep_the_unmetered_routes_from_the_upstream() {
    for (setting, reads_pass) in [("reads", true), ("none", false)] {
        let gw = TestGateway::start_with(Options {
            raw: RawSettings {
                upstream: RawUpstream {
                    unmetered: Some(setting.into()),
                    ..Default::default()
                },
                ..RawSettings::default()
            },
            ..Options::default()
        })
        .await;
        gw.put_tier("t", json!({"tokens_per_month": MONTH})).await;
        let (_, key) = gw.workspace("t").await;
        let before = gw.upstream_count().await;
        let agents = json!({"agent_id": "ag_1", "messages": [{"role": "user", "content": "Hi"}]});
        let r = gw
            .post(
                &key,
                "/v1/agents/completions",
                agents,
                &[("x-mock-usage", "5,3")],
            )
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{setting}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["type"], "permission_error", "{setting}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("POST /v1/agents/completions is not passed on"),
            "{body}"
        );
        // Another method on a metered path is not metered either.
        let r = gw
            .client
            .delete(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{setting}");
        assert_eq!(gw.upstream_count().await, before, "{setting}: forwarded");
        let r = gw
            .client
            .get(format!("{}/v1/models", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        let expected = if reads_pass {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(r.status(), expected, "{setting}: GET /v1/models");
        // A read with a body is not one.
        let r = gw
            .client
            .get(format!("{}/v1/agents/completions", gw.url))
            .bearer_auth(&key)
            .json(&json!({"agent_id": "ag_1", "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::FORBIDDEN,
            "{setting}: GET with a body"
        );
        let r = gw.chat(&key, hello(), &[("x-mock-usage", "5,3")]).await;
        assert_eq!(r.status(), StatusCode::OK, "{setting}: a metered route");
        assert_eq!(gw.limits(&key).await["usage"]["tokens_this_month"], 8);
    }
}

/// An HTTP/1.1 request without a `Host`, or with two, is refused `400`, as RFC 9112 asks (an
/// outside audit: both were served, and the console's origin check read the first of two).
/// HTTP/1.0 needs none.
#[tokio::test]
async fn an_http_1_1_request_names_one_host() {
    let (gw, key) = setup().await;
    for (request, want) in [
        ("GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(), 400),
        (
            "GET /healthz HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n"
                .to_string(),
            400,
        ),
        (
            format!("GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"),
            400,
        ),
        ("GET /healthz HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n".to_string(), 200),
        ("GET /healthz HTTP/1.0\r\n\r\n".to_string(), 200),
    ] {
        let (status, body) = raw_exchange(&gw.url, request.as_bytes()).await;
        assert_eq!(status, want, "{request:?}: {body}");
        if want == 400 {
            assert!(body.contains("one Host header"), "{body}");
        }
    }
    assert_eq!(gw.upstream_count().await, 0, "nothing forwarded");
}

/// A request refused before its body was read (a wrong key, a body over the limit) has its body
/// read and dropped before the answer, and the connection serves the next request: the
/// connection closed with the body unread, and nginx in front, still sending it, answered its
/// client `502` in place of the `401` or `413` (an outside audit).
#[tokio::test]
async fn a_refused_request_s_body_is_read_and_the_connection_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, key) = setup().await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    for (auth, len, want) in [
        ("Bearer tg_wrong".to_string(), 2_000_000usize, "401"),
        (format!("Bearer {key}"), 5 * 1024 * 1024, "413"),
    ] {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            socket
                .write_all(&chunk[..n])
                .await
                .unwrap_or_else(|e| panic!("{want}: the body's write failed after {sent}: {e}"));
            sent += n;
        }
        // The answer, then a second request on the same connection.
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if text.matches("HTTP/1.1 ").count() >= 2 && text.ends_with("ok") {
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{want}: no answers within 10 s");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {want} ")), "{text}");
        assert!(
            text.contains("HTTP/1.1 200 OK") && text.ends_with("ok"),
            "{want}: the connection did not serve the next request: {text}"
        );
    }
}
