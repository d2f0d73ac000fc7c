//! The rate-limit header families (`rate_limit_headers`), the request id, the access log, and
//! CORS (`cors_origins`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::*;

const TIER: &str = r#"{"requests_per_second": 2, "burst": 2, "tokens_per_minute": 100000,
    "tokens_per_month": 5000000}"#;

async fn gateway_with(families: Option<&[&str]>) -> (TestGateway, String) {
    let mut options = Options::default();
    options.raw.rate_limit_headers = families.map(|f| f.iter().map(|s| s.to_string()).collect());
    let gw = TestGateway::start_with(options).await;
    gw.put_tier("t", serde_json::from_str(TIER).unwrap()).await;
    let (_, key) = gw.workspace("t").await;
    (gw, key)
}

/// The parameters of one item of a structured-field list, by policy name.
fn sf_items(field: &str) -> Vec<(String, Vec<(String, String)>)> {
    field
        .split(", ")
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap();
            assert!(
                name.starts_with('"') && name.ends_with('"'),
                "a quoted policy name: {item}"
            );
            let params = parts
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            (name.trim_matches('"').to_string(), params)
        })
        .collect()
}

fn param<'a>(items: &'a [(String, Vec<(String, String)>)], policy: &str, key: &str) -> &'a str {
    let (_, params) = items
        .iter()
        .find(|(n, _)| n == policy)
        .unwrap_or_else(|| panic!("no policy {policy}"));
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {policy}"))
}

#[tokio::test]
async fn by_default_the_openai_and_ietf_families_are_sent_and_agree() {
    let (gw, key) = gateway_with(None).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));
    // Not the Mistral family, which is off by default.
    assert_eq!(header(&r, "x-ratelimit-limit-tokens-minute"), None);
    assert_eq!(header(&r, "x-ratelimit-tokens-query-cost"), None);

    let policy = sf_items(header(&r, "ratelimit-policy").unwrap());
    let names: Vec<&str> = policy.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["requests-second", "tokens-minute", "tokens-month"]);
    assert_eq!(param(&policy, "requests-second", "q"), "2");
    assert_eq!(param(&policy, "requests-second", "w"), "1");
    assert_eq!(param(&policy, "tokens-minute", "q"), "100000");
    assert_eq!(param(&policy, "tokens-minute", "qu"), "\"tokens\"");
    assert_eq!(param(&policy, "tokens-minute", "w"), "60");
    assert_eq!(param(&policy, "tokens-month", "q"), "5000000");
    let month_secs: u64 = param(&policy, "tokens-month", "w").parse().unwrap();
    assert!(
        [28, 29, 30, 31].map(|d| d * 86_400).contains(&month_secs),
        "a calendar month: {month_secs}"
    );

    let now = sf_items(header(&r, "ratelimit").unwrap());
    assert_eq!(param(&now, "requests-second", "r"), "1");
    assert_eq!(
        param(&now, "tokens-minute", "r"),
        header(&r, "x-ratelimit-remaining-tokens").unwrap()
    );
    assert_eq!(
        param(&now, "tokens-month", "r"),
        header(&r, "x-ratelimit-remaining-tokens-month").unwrap()
    );
    let month_t: u64 = param(&now, "tokens-month", "t").parse().unwrap();
    assert!(month_t > 0 && month_t <= month_secs, "{month_t}");

    // A denial carries them too, with nothing left of the requests.
    gw.chat(&key, hello(), &[]).await;
    let denied = gw.chat(&key, hello(), &[]).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    let now = sf_items(header(&denied, "ratelimit").unwrap());
    assert_eq!(param(&now, "requests-second", "r"), "0");
    assert_eq!(param(&now, "requests-second", "t"), "1");
    assert!(header(&denied, "ratelimit-policy").is_some());
}

#[tokio::test]
async fn a_fractional_rate_is_a_whole_quota_over_a_longer_window() {
    let gw = TestGateway::start().await;
    gw.put_tier("slow", json!({"requests_per_second": 0.5}))
        .await;
    let (_, key) = gw.workspace("slow").await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(
        header(&r, "ratelimit-policy"),
        Some("\"requests-second\";q=1;w=2")
    );
    assert_eq!(header(&r, "ratelimit"), Some("\"requests-second\";r=0;t=2"));
}

#[tokio::test]
async fn the_mistral_family_alone_names_minutes_and_the_query_cost() {
    let (gw, key) = gateway_with(Some(&["mistral"])).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "x-ratelimit-limit-tokens-minute"),
        Some("100000")
    );
    let remaining_minute = header_u64(&r, "x-ratelimit-remaining-tokens-minute");
    assert!(remaining_minute < 100_000, "{remaining_minute}");
    assert_eq!(
        header(&r, "x-ratelimit-limit-tokens-month"),
        Some("5000000")
    );
    assert!(header(&r, "x-ratelimit-remaining-tokens-month").is_some());
    assert!(header(&r, "x-ratelimit-reset-tokens-month").is_some_and(|v| v.ends_with('s')));
    // No per-minute request limit exists, so no per-minute request header; and the other
    // families are off.
    assert_eq!(header(&r, "x-ratelimit-limit-req-minute"), None);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), None);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), None);
    assert_eq!(header(&r, "ratelimit"), None);
    // The query cost is what the request was charged: the upstream's usage.
    let cost = header_u64(&r, "x-ratelimit-tokens-query-cost");
    let body: Value = r.json().await.unwrap();
    assert_eq!(cost, body["usage"]["total_tokens"].as_u64().unwrap());
    // An upstream's error, read whole and refunded, cost nothing, and says so (an outside
    // audit: it carried no query cost). On a tier that admits them all.
    gw.put_tier("roomy", json!({"requests_per_second": 100}))
        .await;
    let (_, key) = gw.workspace("roomy").await;
    for status in ["500", "429", "400"] {
        let r = gw.chat(&key, hello(), &[("x-mock-status", status)]).await;
        assert_eq!(r.status().as_str(), status);
        assert_eq!(
            header(&r, "x-ratelimit-tokens-query-cost"),
            Some("0"),
            "{status}"
        );
    }
}

/// A JSON answer, settled before it leaves, shows what is left after its own cost, the cost
/// its `x-ratelimit-tokens-query-cost` gives (an outside audit: it showed what the estimate of
/// `max_tokens` left, 1,000 tokens less than its cost of 7 said).
#[tokio::test]
async fn a_json_answer_shows_what_is_left_after_its_own_cost() {
    let (gw, key) = gateway_with(Some(&["openai", "ietf", "mistral"])).await;
    let mut body = hello();
    body["max_tokens"] = json!(1000);
    let r = gw
        .chat(&key, body.clone(), &[("x-mock-usage", "3,4")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-tokens-query-cost"), Some("7"));
    for (name, left) in [
        ("x-ratelimit-remaining-tokens", "99993"),
        ("x-ratelimit-remaining-tokens-minute", "99993"),
        ("x-ratelimit-remaining-tokens-month", "4999993"),
    ] {
        assert_eq!(header(&r, name), Some(left), "{name}");
    }
    let now = sf_items(header(&r, "ratelimit").unwrap());
    assert_eq!(param(&now, "tokens-minute", "r"), "99993");
    assert_eq!(param(&now, "tokens-month", "r"), "4999993");
    // 7 tokens of a bucket that refills 100,000 a minute: full again in about 4 ms, where the
    // estimate's 1,000 and more took 600 ms.
    let reset = header(&r, "x-ratelimit-reset-tokens").unwrap();
    let ms: u64 = reset.strip_suffix("ms").unwrap_or("999").parse().unwrap();
    assert!(ms <= 10, "{reset}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));

    // Charged five minutes' worth: the bucket's debt stops at one minute's, so it is full again
    // in two minutes, as the next denial says, not five.
    gw.put_tier("small", json!({"tokens_per_minute": 1000}))
        .await;
    let (_, small) = gw.workspace("small").await;
    let r = gw
        .chat(&small, hello(), &[("x-mock-usage", "4000,1000")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-tokens-query-cost"), Some("5000"));
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), Some("2m0s"));
    let r = gw.chat(&small, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let reset = header(&r, "x-ratelimit-reset-tokens").unwrap();
    assert!(reset == "2m0s" || reset.starts_with("1m59."), "{reset}");

    // An upstream's error, refunded, leaves everything as it was.
    let (_, fresh) = gw.workspace("t").await;
    let r = gw.chat(&fresh, body, &[("x-mock-status", "500")]).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(header(&r, "x-ratelimit-tokens-query-cost"), Some("0"));
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("100000"));
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens-month"),
        Some("5000000")
    );
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), Some("0s"));
    // So does the gateway's own 502 when the upstream refuses its key, refunded too (an outside
    // audit saw the estimate shown as taken).
    let (_, fresh) = gw.workspace("t").await;
    let mut body = hello();
    body["max_tokens"] = json!(1000);
    let r = gw.chat(&fresh, body, &[("x-mock-status", "401")]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("100000"));
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens-month"),
        Some("5000000")
    );
}

#[tokio::test]
async fn none_sends_no_rate_limit_header_and_a_bad_family_is_refused() {
    let (gw, key) = gateway_with(Some(&["none"])).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    for name in r.headers().keys() {
        assert!(
            !name.as_str().contains("ratelimit"),
            "{name} sent with rate_limit_headers = none"
        );
    }

    let mut raw = tiergate::RawSettings {
        rate_limit_headers: Some(vec!["openai".into(), "draft".into()]),
        ..Default::default()
    };
    raw.upstream.url = Some("http://127.0.0.1:9".into());
    let e = tiergate::Config::try_from(raw).unwrap_err().to_string();
    assert!(
        e.contains("rate_limit_headers") && e.contains("'draft'"),
        "{e}"
    );
    // An empty list is refused: `none` says "no headers".
    for empty in [vec![], vec![String::new()]] {
        let mut raw = tiergate::RawSettings {
            rate_limit_headers: Some(empty),
            ..Default::default()
        };
        raw.upstream.url = Some("http://127.0.0.1:9".into());
        let e = tiergate::Config::try_from(raw).unwrap_err().to_string();
        assert!(
            e.contains("rate_limit_headers") && e.contains("empty"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn a_client_request_id_is_echoed_and_a_reused_one_loses_no_usage() {
    let (gw, key) = gateway_with(None).await;
    let first = gw
        .chat(&key, hello(), &[("x-request-id", "trace-42.a")])
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-request-id"), Some("trace-42.a"));
    // The upstream's own id is passed on under a name of its own.
    let upstream_id = header(&first, "x-upstream-request-id").unwrap();
    assert!(upstream_id.starts_with("mock-req-"), "{upstream_id}");
    let one: Value = first.json().await.unwrap();
    let one = one["usage"]["total_tokens"].as_u64().unwrap();

    // The same id again: both requests are counted in full.
    gw.advance(Duration::from_secs(1));
    let second = gw
        .chat(&key, hello(), &[("x-request-id", "trace-42.a")])
        .await;
    assert_eq!(header(&second, "x-request-id"), Some("trace-42.a"));
    eventually(Duration::from_secs(5), "both settled", || async {
        gw.limits(&key).await["usage"]["tokens_this_month"].as_u64() == Some(2 * one)
    })
    .await;

    // An id that is too long or has characters outside the set is replaced by the gateway's.
    gw.advance(Duration::from_secs(1));
    let long = "x".repeat(129);
    // Nor is it sent on to the upstream, where a valid one is.
    for bad in [long.as_str(), "has space", "quote\"d"] {
        gw.advance(Duration::from_secs(1));
        let echo = ("x-mock-echo-headers", "1");
        let r = gw.chat(&key, hello(), &[("x-request-id", bad), echo]).await;
        let id = header(&r, "x-request-id").unwrap();
        assert!(id.starts_with("req_") && id.len() == 36, "{bad:?} -> {id}");
        let v: Value = r.json().await.unwrap();
        assert!(v["received_headers"].get("x-request-id").is_none(), "{v}");
    }
    gw.advance(Duration::from_secs(1));
    let echo = ("x-mock-echo-headers", "1");
    let r = gw
        .chat(&key, hello(), &[("x-request-id", "trace-43"), echo])
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["received_headers"]["x-request-id"], "trace-43", "{v}");
    // Of two values, the first, checked, alone (an outside audit: the second went unchecked).
    gw.advance(Duration::from_secs(1));
    let r = gw
        .chat(
            &key,
            hello(),
            &[
                ("x-request-id", "trace-44"),
                ("x-request-id", "bad id!"),
                echo,
            ],
        )
        .await;
    assert_eq!(header(&r, "x-request-id"), Some("trace-44"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["received_headers"]["x-request-id"], "trace-44", "{v}");
    // Without one, the gateway's own; on a 401 too, with no upstream id.
    let r = gw.chat("sk-nobody", hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&r, "x-request-id").unwrap().starts_with("req_"));
    assert_eq!(header(&r, "x-upstream-request-id"), None);
}

/// `tiergate serve` with `--log-format json`: one access line per request, in JSON, with the
/// fields the README names and no key; a request whose client left before its answer has its
/// line too (`499`, with the estimate it was charged).
#[tokio::test]
async fn the_access_log_has_one_json_line_per_request_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Mock::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log = dir.path().join("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--database",
            &format!("sqlite://{}", dir.path().join("t.db").display()),
        ])
        .args(["--upstream", &mock.url, "--admin-token", ADMIN])
        .args(["--log-format", "json"])
        .env("TIERGATE_LOG", "warn,tiergate::access=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed however the test ends, a failed assertion included.
    let child = KillOnDrop(child);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(20), "serve answers", || async {
        client
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        client
            .request(method, format!("{url}/admin/v1{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let r = admin(
        reqwest::Method::PUT,
        "/tiers/one",
        json!({"requests_per_second": 0.001, "burst": 3}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A workspace on the tier, and a key: their ids and the key's secret.
    let workspace = |name: &'static str| async move {
        let body = json!({"name": name, "tier": "one"});
        let r = admin(reqwest::Method::POST, "/workspaces", body).await;
        let ws: Value = r.unwrap().json().await.unwrap();
        let id = ws["id"].as_i64().unwrap();
        let path = format!("/workspaces/{id}/keys");
        let r = admin(reqwest::Method::POST, &path, json!({})).await;
        let key: Value = r.unwrap().json().await.unwrap();
        (
            id,
            key["id"].as_i64().unwrap(),
            key["key"].as_str().unwrap().to_string(),
        )
    };
    let (ws_id, _, key) = workspace("w").await;
    let chat = |k: &str, id: &str| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(k)
            .header("x-request-id", id)
            .json(&hello())
            .send()
    };
    let ok = chat(&key, "line-ok").await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let body: Value = ok.json().await.unwrap();
    let tokens = body["usage"]["total_tokens"].as_u64().unwrap();
    // A stream's line is written once it is settled, with its usage.
    let stream = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", "line-stream")
        .json(
            &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let events = stream.text().await.unwrap();
    let usage: Value = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .expect("the stream has usage");
    // A client that leaves while the upstream works: admitted, charged the estimate.
    let left = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", "line-left")
        .header("x-mock-latency-ms", "3000")
        .timeout(Duration::from_millis(300))
        .json(&hello())
        .send()
        .await;
    assert!(left.is_err_and(|e| e.is_timeout()));
    let denied = chat(&key, "line-denied").await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    let unknown = chat("sk-not-a-key-at-all", "line-401").await.unwrap();
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    // Another method on a metered path is not metered: `other`, as in the metrics.
    let get = client
        .get(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", "line-get")
        .send()
        .await
        .unwrap();
    assert_ne!(get.status(), StatusCode::UNAUTHORIZED);
    // A suspended workspace's key: refused, but the workspace and the key are known.
    let (other_id, other_key_id, other_key) = workspace("suspended").await;
    let r = admin(
        reqwest::Method::PATCH,
        &format!("/workspaces/{other_id}"),
        json!({"status": "suspended"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let suspended = chat(&other_key, "line-403").await.unwrap();
    assert_eq!(suspended.status(), StatusCode::FORBIDDEN);

    let lines = || -> Vec<Value> {
        let f = std::fs::File::open(&log).unwrap();
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .filter(|v| v["target"] == "tiergate::access")
            .collect()
    };
    eventually(Duration::from_secs(5), "seven access lines", || async {
        lines().len() >= 7
    })
    .await;
    drop(child);
    let lines = lines();
    assert_eq!(lines.len(), 7, "{lines:?}");
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
    };
    let ok = by_id("line-ok");
    assert_eq!(ok["workspace"], ws_id);
    assert_eq!(ok["route"], "/v1/chat/completions");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["decision"], "admitted");
    assert_eq!(ok["tokens"], tokens);
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["gateway_request_id"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
    let stream = by_id("line-stream");
    assert_eq!(stream["status"], 200);
    assert_eq!(stream["decision"], "admitted");
    assert_eq!(stream["tokens"], usage["total_tokens"]);
    let left = by_id("line-left");
    assert_eq!(left["status"], 499);
    assert_eq!(left["decision"], "admitted");
    assert!(left["tokens"].as_u64().unwrap() > 0, "{left}");
    // To its leaving (about 0.3 s), not to the end of the wait for the upstream's answer after
    // it left (`usage_drain_ms`, 2 s, later).
    assert!(left["duration_ms"].as_f64().unwrap() < 1_500.0, "{left}");
    let denied = by_id("line-denied");
    assert_eq!(denied["status"], 429);
    assert_eq!(denied["decision"], "denied");
    assert_eq!(denied["limit"], "requests_per_second");
    assert_eq!(denied["tokens"], 0);
    let unknown = by_id("line-401");
    assert_eq!(unknown["status"], 401);
    assert_eq!(unknown["decision"], "unauthenticated");
    assert!(unknown.get("workspace").is_none());
    let get = by_id("line-get");
    assert_eq!(get["route"], "other", "{get}");
    assert_eq!(get["workspace"], ws_id);
    let suspended = by_id("line-403");
    assert_eq!(suspended["status"], 403);
    assert_eq!(suspended["decision"], "rejected", "{suspended}");
    assert_eq!(suspended["workspace"], other_id);
    assert_eq!(suspended["key"], other_key_id);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(&key), "the key is in the log");
    assert!(
        !text.contains("sk-not-a-key-at-all"),
        "a presented key is in the log"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A page of an origin in `cors_origins` may call the `/v1/` routes from a browser: its
/// preflight is answered (not forwarded, counted against nothing), and every answer, a `401` or
/// `429` too, lets it read the answer and its headers. Any other origin gets none of it, and
/// without `cors_origins` nothing changes.
#[tokio::test]
async fn cors_is_answered_for_the_origins_allowed_and_no_other() {
    const PAGE: &str = "https://app.example";
    let raw = tiergate::config::RawSettings {
        cors_origins: Some(vec![format!("{PAGE}/"), "http://localhost:3000".into()]),
        ..Default::default()
    };
    let gw = TestGateway::start_with(Options {
        raw,
        ..Options::default()
    })
    .await;
    gw.put_tier("one", json!({"requests_per_second": 0.001, "burst": 1}))
        .await;
    let (_, key) = gw.workspace("one").await;
    let preflight = |origin: &'static str, path: &'static str| {
        gw.client
            .request(reqwest::Method::OPTIONS, format!("{}{path}", gw.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let before = gw.upstream_count().await;
    for path in ["/v1/chat/completions", "/v1/limits", "/v1/models"] {
        let r = preflight(PAGE, path).await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{path}");
        assert_eq!(header(&r, "access-control-allow-origin"), Some(PAGE));
        assert!(header(&r, "access-control-allow-methods")
            .unwrap()
            .contains("POST"));
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("authorization, content-type")
        );
        assert!(header(&r, "vary").unwrap().contains("origin"));
    }
    assert_eq!(
        gw.upstream_count().await,
        before,
        "a preflight was forwarded"
    );
    assert_eq!(gw.exact_usage(&key).await["requests_this_month"], 0);

    let chat = |origin: &'static str, key: String| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("origin", origin)
            .bearer_auth(key)
            .json(&hello())
            .send()
    };
    for (expected, r) in [
        (StatusCode::OK, chat(PAGE, key.clone()).await.unwrap()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            chat(PAGE, key.clone()).await.unwrap(),
        ),
        (
            StatusCode::UNAUTHORIZED,
            chat(PAGE, "tg_wrong".into()).await.unwrap(),
        ),
    ] {
        assert_eq!(r.status(), expected);
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some(PAGE),
            "{expected}"
        );
        assert_eq!(header(&r, "access-control-expose-headers"), Some("*"));
        assert!(r.headers().get_all("vary").iter().any(|v| v == "origin"));
    }
    let limits = gw
        .client
        .get(format!("{}/v1/limits", gw.url))
        .header("origin", "http://localhost:3000")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(limits.status(), StatusCode::OK);
    assert_eq!(
        header(&limits, "access-control-allow-origin"),
        Some("http://localhost:3000")
    );

    // Another origin: refused as before, and nothing says it may read anything.
    let r = preflight("https://elsewhere.example", "/v1/chat/completions")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&r, "access-control-allow-origin").is_none());
    let r = chat("https://elsewhere.example", key.clone())
        .await
        .unwrap();
    assert!(header(&r, "access-control-allow-origin").is_none());
    // But it says that the answer depends on the origin, for shared caches.
    assert!(r.headers().get_all("vary").iter().any(|v| v == "origin"));

    // Without `cors_origins`: no CORS at all.
    let plain = TestGateway::start().await;
    let r = plain
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", plain.url),
        )
        .header("origin", PAGE)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&r, "access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_gateways_own_answers_say_nosniff_and_no_store_and_proxied_ones_are_the_upstreams() {
    let (gw, key) = gateway_with(None).await;
    let nosniff = |r: &reqwest::Response| header(r, "x-content-type-options") == Some("nosniff");

    // A proxied answer carries what the upstream sent, and the mock sends no such header.
    let ok = gw.chat(&key, hello(), &[]).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(!nosniff(&ok), "{:?}", ok.headers());
    // A denial, the workspace's own API, a 404, the health check, the admin API and a console
    // page are the gateway's own.
    let mut denied = None;
    for _ in 0..5 {
        let r = gw.chat(&key, hello(), &[]).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            denied = Some(r);
            break;
        }
    }
    let denied = denied.expect("a 429 within 5 requests at 2 requests/s");
    assert!(nosniff(&denied), "{:?}", denied.headers());
    assert_eq!(header(&denied, "cache-control"), Some("no-store"));
    let get = |url: String| {
        let client = gw.client.clone();
        let key = key.clone();
        async move { client.get(url).bearer_auth(key).send().await.unwrap() }
    };
    for path in ["/v1/limits", "/healthz", "/readyz", "/nowhere", "/console"] {
        let r = get(format!("{}{path}", gw.url)).await;
        assert!(nosniff(&r), "{path}: {} {:?}", r.status(), r.headers());
    }
    let admin = gw
        .client
        .get(format!("{}/admin/v1/tiers", gw.operator_url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);
    assert!(nosniff(&admin), "{:?}", admin.headers());
    // And no cache keeps them: a new key's secret least of all.
    let (ws, _) = gw.workspace("t").await;
    let made = gw
        .client
        .post(format!(
            "{}/admin/v1/workspaces/{ws}/keys",
            gw.operator_url()
        ))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::CREATED);
    assert_eq!(header(&made, "cache-control"), Some("no-store"));
    let limits = get(format!("{}/v1/limits", gw.url)).await;
    assert_eq!(header(&limits, "cache-control"), Some("no-store"));
}
