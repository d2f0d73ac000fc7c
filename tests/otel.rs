//! OpenTelemetry (built only with `--features otel`): `tiergate serve` exports a span per proxied
//! request over OTLP/HTTP, continues the client's trace, and passes it on to the upstream.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

const ADMIN: &str = "otel-test-admin-token-0123456789";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[derive(Default)]
struct Seen {
    /// `traceparent` of each request the upstream got.
    traceparents: Vec<String>,
    /// The bodies posted to the collector's `/v1/traces`.
    exports: Vec<Bytes>,
}

/// One server playing both the upstream (a fixed chat completion) and the OTLP collector.
async fn upstream_and_collector(seen: Arc<Mutex<Seen>>) -> String {
    let upstream_seen = seen.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |headers: HeaderMap| {
                let seen = upstream_seen.clone();
                async move {
                    if let Some(tp) = headers.get("traceparent") {
                        let tp = tp.to_str().unwrap().to_string();
                        seen.lock().unwrap().traceparents.push(tp);
                    }
                    axum::Json(json!({
                        "id": "c", "object": "chat.completion", "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "hi"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                    }))
                }
            }),
        )
        .route(
            "/v1/traces",
            post(move |body: Bytes| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().exports.push(body);
                    ""
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn within<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_request_is_exported_as_a_span_of_the_clients_trace_and_passed_upstream() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let other = upstream_and_collector(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--database",
            &format!("sqlite://{}", dir.path().join("t.db").display()),
        ])
        .args(["--upstream", &other, "--admin-token", ADMIN])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &other)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("TIERGATE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends, a failed assertion included.
    let child = KillOnDrop(child);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    within("serve answers", || async {
        client
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let ws: Value = client
        .post(format!("{url}/admin/v1/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "w", "tier": "free"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: Value = client
        .post(format!("{url}/admin/v1/workspaces/{}/keys", ws["id"]))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key["key"].as_str().unwrap())
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The upstream saw the same trace, under the gateway's own span.
    let traceparents = seen.lock().unwrap().traceparents.clone();
    assert_eq!(traceparents.len(), 1, "{traceparents:?}");
    let parts: Vec<&str> = traceparents[0].split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "{traceparents:?}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "the gateway's span is the upstream's parent"
    );

    // The collector got a span of that trace: the trace id's 16 bytes are in the protobuf.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let span_bytes: Vec<u8> = (0..8)
        .map(|i| u8::from_str_radix(&parts[2][2 * i..2 * i + 2], 16).unwrap())
        .collect();
    within("the span is exported", || {
        let seen = seen.clone();
        let (trace_bytes, span_bytes) = (trace_bytes.clone(), span_bytes.clone());
        async move {
            seen.lock().unwrap().exports.iter().any(|body| {
                body.windows(16).any(|w| w == trace_bytes.as_slice())
                    && body.windows(8).any(|w| w == span_bytes.as_slice())
            })
        }
    })
    .await;
    drop(child);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
