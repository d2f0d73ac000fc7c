//! Shadow mode: a limit in shadow never denies, and marks (`x-ratelimit-shadow-denied`), counts
//! (`tiergate_shadow_denied_total`) and records per day exactly the requests enforcement would
//! have denied. Each test sends one sequence, under the manual clock, to workspaces that enforce
//! and to workspaces whose same limits are in shadow, and compares them request by request.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tiergate::config::RawSettings;
use tiergate::limiter::redis::TimeSource;

use crate::harness::*;

/// How the clock moves between the requests of the sequence (ms), cycled: bursts that run
/// into the limits, and pauses that let them refill in part or whole.
const STEPS_MS: [u64; 12] = [0, 0, 40, 0, 300, 0, 0, 1500, 0, 0, 0, 20_000];
const REQUESTS: usize = 48;

/// An answer as the comparison needs it: its status, the `code` of a 429, the shadow header.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: StatusCode,
    code: Option<String>,
    shadow: Option<String>,
}

async fn send(gw: &TestGateway, key: &str) -> Seen {
    let r = gw.chat(key, hello(), &[]).await;
    let status = r.status();
    let shadow = header(&r, "x-ratelimit-shadow-denied").map(str::to_string);
    let body: Value = r.json().await.unwrap();
    let code = (status == StatusCode::TOO_MANY_REQUESTS)
        .then(|| body["code"].as_str().unwrap().to_string());
    Seen {
        status,
        code,
        shadow,
    }
}

/// `send`, with the answer's `x-request-id` (the gateway's id, which its log lines carry).
async fn send_with_id(gw: &TestGateway, key: &str) -> (Seen, String) {
    let r = gw.chat(key, hello(), &[]).await;
    let id = header(&r, "x-request-id").unwrap().to_string();
    let status = r.status();
    let shadow = header(&r, "x-ratelimit-shadow-denied").map(str::to_string);
    let body: Value = r.json().await.unwrap();
    let code = (status == StatusCode::TOO_MANY_REQUESTS)
        .then(|| body["code"].as_str().unwrap().to_string());
    let seen = Seen {
        status,
        code,
        shadow,
    };
    (seen, id)
}

/// The gateway's shadow-denial log lines (JSON), as every gateway of this test binary writes
/// them: a global subscriber, installed once, that keeps only those events (target
/// `tiergate::http::proxy`, with `limit` and `key` fields), so nothing else is slowed or kept.
fn shadow_log() -> &'static std::sync::Mutex<Vec<u8>> {
    use tracing_subscriber::prelude::*;
    static LOG: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        static BUFFER: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
        struct Sink;
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                BUFFER.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let only_shadow = tracing_subscriber::filter::filter_fn(|m| {
            m.target() == "tiergate::http::proxy"
                && m.fields().field("limit").is_some()
                && m.fields().field("key").is_some()
        });
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_writer(|| Sink)
            .with_filter(only_shadow);
        tracing_subscriber::registry()
            .with(layer)
            .try_init()
            .expect("no other global subscriber in the gateway tests");
        &BUFFER
    })
}

/// The request ids and limits of the shadow-denial lines logged so far.
fn logged_shadow_denials() -> Vec<(String, String)> {
    let log = shadow_log().lock().unwrap().clone();
    String::from_utf8(log)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let f = &v["fields"];
            (
                f["request_id"].as_str().unwrap().to_string(),
                f["limit"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The counter `tiergate_shadow_denied_total{limit=...}` (0 when absent).
fn shadow_count(metrics: &str, limit: &str) -> u64 {
    let line = format!("tiergate_shadow_denied_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn patch(gw: &TestGateway, ws: i64, body: Value) -> (StatusCode, Value) {
    gw.admin(Method::PATCH, &format!("/workspaces/{ws}"), Some(body))
        .await
}

/// The sequence on enforcing and shadow workspaces, compared request by request; then the
/// metrics and the per-day usage. The workspaces:
/// - `enforced` (tokens/minute and a loose request rate) and `tpm_shadow`, whose tier names
///   `tokens_per_minute` in its `shadow` list;
/// - `strict` (tokens/minute and a tight request rate, both enforced), `tier_shadow` on a tier
///   with `enforcement: shadow`, `ws_shadow` on the strict tier with its own
///   `enforcement: shadow`, and `ws_enforce` on the shadow tier with its own `enforce` (most
///   specific wins: it enforces).
async fn same_sequence_enforced_and_in_shadow(gw: &TestGateway) {
    let loose = json!({"requests_per_second": 1000, "tokens_per_minute": 300});
    let strict = json!({"requests_per_second": 2, "tokens_per_minute": 80});
    gw.put_tier("enforced", loose.clone()).await;
    let mut tpm_shadow = loose.clone();
    tpm_shadow["shadow"] = json!(["tokens_per_minute"]);
    gw.put_tier("tpm-shadow", tpm_shadow).await;
    gw.put_tier("strict", strict.clone()).await;
    let mut all_shadow = strict.clone();
    all_shadow["enforcement"] = json!("shadow");
    gw.put_tier("all-shadow", all_shadow).await;

    let (_, enforced) = gw.workspace("enforced").await;
    let (tpm_ws, tpm_shadow) = gw.workspace("tpm-shadow").await;
    let (_, strict) = gw.workspace("strict").await;
    let (tier_ws, tier_shadow) = gw.workspace("all-shadow").await;
    let (ws_id, ws_shadow) = gw.workspace("strict").await;
    let (s, v) = patch(gw, ws_id, json!({"enforcement": "shadow"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["shadowing"]["enforcement"], "shadow", "{v}");
    let (we_id, ws_enforce) = gw.workspace("all-shadow").await;
    let (s, v) = patch(gw, we_id, json!({"enforcement": "enforce"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["shadowing"],
        json!({"enforcement": "enforce", "shadow": []})
    );
    assert_eq!(v["shadow_limits"], Value::Null, "{v}");

    // What each says of itself.
    let l = gw.limits(&tpm_shadow).await;
    assert_eq!(
        l["shadowing"]["shadow"],
        json!(["tokens_per_minute"]),
        "{l}"
    );
    assert_eq!(l["shadow_limits"], json!({"tokens_per_minute": 300}), "{l}");
    assert!(l["limits"].get("tokens_per_minute").is_none(), "{l}");
    let l = gw.limits(&tier_shadow).await;
    assert_eq!(l["shadowing"]["enforcement"], "shadow", "{l}");
    assert_eq!(l["limits"], json!({}), "{l}");

    shadow_log();
    let before = gw.metrics().await;
    let (mut tpm_denials, mut strict_denials) = (0u64, Vec::new());
    let (mut sent_ids, mut marked_ids) = (Vec::new(), Vec::new());
    for i in 0..REQUESTS {
        let a = send(gw, &enforced).await;
        let (b, b_id) = send_with_id(gw, &tpm_shadow).await;
        if b.shadow.is_some() {
            marked_ids.push(b_id.clone());
        }
        sent_ids.push(b_id);
        let d = send(gw, &strict).await;
        let c = send(gw, &tier_shadow).await;
        let e = send(gw, &ws_shadow).await;
        let f = send(gw, &ws_enforce).await;
        // A limit in shadow never denies, and marks exactly what enforcement denied.
        assert_eq!(a.shadow, None, "request {i}");
        assert_eq!(b.status, StatusCode::OK, "request {i}: {b:?}");
        assert_eq!(
            b.shadow, a.code,
            "request {i}: enforced {a:?}, shadow {b:?}"
        );
        if a.code.is_some() {
            assert_eq!(a.code.as_deref(), Some("tokens_per_minute"), "request {i}");
            tpm_denials += 1;
        } else {
            assert_eq!(a.status, StatusCode::OK, "request {i}");
        }
        for (name, s) in [("tier_shadow", &c), ("ws_shadow", &e)] {
            assert_eq!(s.status, StatusCode::OK, "request {i} {name}: {s:?}");
            assert_eq!(s.shadow, d.code, "request {i} {name}: strict {d:?}, {s:?}");
        }
        // The workspace's own `enforce` wins over its tier's `shadow`.
        assert_eq!(f, d, "request {i}");
        if let Some(code) = &d.code {
            strict_denials.push(code.clone());
        }
        let step = STEPS_MS[i % STEPS_MS.len()];
        gw.advance(Duration::from_millis(step));
    }
    // The sequence reached the limits, and not only them.
    assert!(
        tpm_denials > 0 && tpm_denials < REQUESTS as u64 / 2,
        "{tpm_denials}"
    );
    let strict_tpm = strict_denials
        .iter()
        .filter(|c| *c == "tokens_per_minute")
        .count() as u64;
    let strict_rps = strict_denials
        .iter()
        .filter(|c| *c == "requests_per_second")
        .count() as u64;
    assert!(strict_tpm > 0 && strict_rps > 0, "{strict_denials:?}");

    // Logged: one line for each request that was marked, and for no other request sent.
    let logged: Vec<(String, String)> = logged_shadow_denials()
        .into_iter()
        .filter(|(id, _)| sent_ids.contains(id))
        .collect();
    let logged_ids: Vec<&String> = logged.iter().map(|(id, _)| id).collect();
    assert_eq!(logged_ids, marked_ids.iter().collect::<Vec<_>>());
    assert!(logged.iter().all(|(_, limit)| limit == "tokens_per_minute"));
    assert_eq!(marked_ids.len() as u64, tpm_denials);

    // Counted per limit: once per would-be denial (two shadow workspaces on the strict limits).
    let after = gw.metrics().await;
    let counted = |limit| shadow_count(&after, limit) - shadow_count(&before, limit);
    assert_eq!(counted("tokens_per_minute"), tpm_denials + 2 * strict_tpm);
    assert_eq!(counted("requests_per_second"), 2 * strict_rps);

    // Recorded per day in the workspace's usage, and in the admin's view of it.
    let usage_of = |key: String| async move {
        let r = gw
            .client
            .get(format!("{}/v1/usage", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["shadow_denied"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually(
        Duration::from_secs(5),
        "shadow denials in /v1/usage",
        || async {
            usage_of(tpm_shadow.clone()).await == tpm_denials
                && usage_of(tier_shadow.clone()).await == strict_tpm + strict_rps
        },
    )
    .await;
    assert_eq!(usage_of(enforced.clone()).await, 0);
    let (s, v) = gw
        .admin(Method::GET, &format!("/workspaces/{tpm_ws}/usage"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let daily: u64 = v["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["shadow_denied"].as_u64().unwrap())
        .sum();
    assert_eq!(daily, tpm_denials, "{v}");
    let _ = tier_ws;
}

#[tokio::test]
async fn a_shadow_limit_never_denies_and_marks_counts_and_records_exactly_what_enforcement_denies()
{
    let gw = TestGateway::start().await;
    same_sequence_enforced_and_in_shadow(&gw).await;
}

/// The same on the Redis backend: the shadow state lives in Redis under a prefix of its own.
#[tokio::test]
async fn the_same_holds_with_the_limits_in_redis() {
    let Some(redis) = crate::support::redis::shared_redis() else {
        return;
    };
    let prefix = format!("shadow{}", std::process::id());
    let gw = TestGateway::start_with(Options {
        raw: RawSettings {
            redis: Some(redis),
            redis_prefix: Some(prefix),
            ..RawSettings::default()
        },
        redis_time: TimeSource::Caller,
        ..Options::default()
    })
    .await;
    same_sequence_enforced_and_in_shadow(&gw).await;
}

/// The settings: validated (a `400` naming what is wrong), and round-tripped through the admin
/// API; `null` gives a workspace the tier's again.
#[tokio::test]
async fn shadow_settings_are_validated_and_round_trip_through_the_admin_api() {
    let gw = TestGateway::start().await;
    for (body, names) in [
        (
            json!({"tokens_per_minute": 10, "shadow": ["tokens_per_hour"]}),
            "tokens_per_hour",
        ),
        (
            json!({"tokens_per_minute": 10, "enforcement": "warn"}),
            "enforcement",
        ),
        (json!({"shadow": "tokens_per_minute"}), "shadow"),
    ] {
        let (s, v) = gw.admin(Method::PUT, "/tiers/bad", Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["message"].as_str().unwrap().contains(names), "{v}");
    }
    let (s, v) = gw
        .admin(
            Method::PUT,
            "/tiers/s",
            Some(json!({"tokens_per_minute": 10, "tokens_per_month": 1000,
                         "enforcement": "enforce",
                         "shadow": ["tokens_per_month", "model_tokens_per_minute"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, tiers) = gw.admin(Method::GET, "/tiers", None).await;
    let tier = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "s")
        .unwrap()
        .clone();
    // `enforce` is the default, left out.
    assert_eq!(tier.get("enforcement"), None, "{tier}");
    assert_eq!(
        tier["shadow"],
        json!(["tokens_per_month", "model_tokens_per_minute"]),
        "{tier}"
    );

    let (ws, _) = gw.workspace("s").await;
    for (body, names) in [
        (
            json!({"shadow": ["requests_per_minute"]}),
            "requests_per_minute",
        ),
        (json!({"enforcement": "off"}), "enforcement"),
        (json!({"shadow": [1]}), "shadow"),
    ] {
        let (s, v) = patch(&gw, ws, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["message"].as_str().unwrap().contains(names), "{v}");
    }
    let (s, v) = patch(
        &gw,
        ws,
        json!({"shadow": ["tokens_per_minute"], "enforcement": "enforce"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["shadow"], json!(["tokens_per_minute"]), "{v}");
    assert_eq!(v["enforcement"], "enforce", "{v}");
    // Both lists count: the tier's and the workspace's.
    assert_eq!(
        v["shadowing"]["shadow"],
        json!([
            "tokens_per_minute",
            "tokens_per_month",
            "model_tokens_per_minute"
        ]),
        "{v}"
    );
    assert_eq!(
        v["shadow_limits"],
        json!({"tokens_per_minute": 10, "tokens_per_month": 1000}),
        "{v}"
    );
    let (_, read) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    assert_eq!(read["shadow"], v["shadow"]);
    // null: the tier's again.
    let (s, v) = patch(&gw, ws, json!({"shadow": null, "enforcement": null})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["shadow"], Value::Null, "{v}");
    assert_eq!(v["enforcement"], Value::Null, "{v}");
    assert_eq!(
        v["shadowing"]["shadow"],
        json!(["tokens_per_month", "model_tokens_per_minute"]),
        "{v}"
    );
    // A PUT replaces the whole tier, its shadow settings included.
    let (s, _) = gw
        .admin(
            Method::PUT,
            "/tiers/s",
            Some(json!({"tokens_per_minute": 10})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = gw
        .admin(Method::GET, &format!("/workspaces/{ws}"), None)
        .await;
    assert_eq!(
        v["shadowing"],
        json!({"enforcement": "enforce", "shadow": []})
    );
}

/// A budget always enforces: with the month quota in shadow, the workspace's own budget still
/// denies.
#[tokio::test]
async fn a_budget_enforces_whatever_is_in_shadow() {
    let gw = TestGateway::start().await;
    gw.put_tier(
        "m",
        json!({"tokens_per_month": 100000, "enforcement": "shadow"}),
    )
    .await;
    let (_, key) = gw.workspace("m").await;
    let r = gw
        .client
        .put(format!("{}/v1/budget", gw.url))
        .bearer_auth(&key)
        .json(&json!({"tokens_per_month": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "workspace_budget", "{body}");
    // Without the budget, the month quota in shadow lets it through.
    let (_, other) = gw.workspace("m").await;
    let r = gw.chat(&other, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
}
