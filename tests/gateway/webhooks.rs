//! Usage alerts by webhook: a receiver in the test records what the gateway posts and checks
//! each signature itself, as a client would (HMAC-SHA256 over "{id}.{timestamp}.{body}" keyed
//! by the secret's bytes after `whsec_`, Standard Webhooks). Each event reaches each endpoint
//! once; a workspace's endpoint gets only its own; a receiver that fails at first gets the
//! event after retries; a restart between an event and its delivery loses nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;
use tiergate::config::RawSettings;

use crate::harness::*;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_string()
    }

    /// Checks the signature as a receiver would.
    fn verify(&self, secret: &str) {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
            .unwrap();
        assert!(key.len() >= 24);
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{}.{}", self.id, self.timestamp, self.body).as_bytes());
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert!(
            self.signature.split(' ').any(|s| s == expected),
            "bad signature {} for {}",
            self.signature,
            self.body
        );
        let ts: i64 = self.timestamp.parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((now - ts).abs() < 300, "timestamp {ts}");
    }
}

/// A receiver on 127.0.0.1 that records every request and answers 500 to the first `fail`.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, fail)
    }

    fn on(listener: tokio::net::TcpListener, fail: usize) -> Receiver {
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let seen = seen.clone();
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let mut seen = seen.lock().unwrap();
                    seen.push(Received {
                        at: Instant::now(),
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body,
                    });
                    if seen.len() <= fail {
                        AxumStatus::INTERNAL_SERVER_ERROR
                    } else {
                        AxumStatus::OK
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, got }
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually(Duration::from_secs(10), "webhook deliveries", || async {
            self.got.lock().unwrap().len() >= n
        })
        .await;
        self.got()
    }
}

fn fast_retries() -> Options {
    Options {
        raw: RawSettings {
            webhook_retry_base_ms: Some(100),
            webhook_quota_check_ms: Some(100),
            ..RawSettings::default()
        },
        ..Options::default()
    }
}

const ALL: [&str; 6] = [
    "limit_request.created",
    "limit_request.decided",
    "limit_request.withdrawn",
    "workspace.tier_changed",
    "workspace.suspended",
    "quota.threshold",
];

async fn keyed(
    gw: &TestGateway,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = gw
        .client
        .request(method, format!("{}{path}", gw.url))
        .bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn ask_more(gw: &TestGateway, key: &str) -> i64 {
    // Each above the last, which may have been granted: an increase asks for more.
    static MORE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(9_000_000);
    let more = MORE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = json!({"use_case": "more", "requested_limits": {"tokens_per_minute": more}});
    let (s, v) = keyed(gw, key, Method::POST, "/v1/limit-requests", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_i64().unwrap()
}

async fn operator_endpoint(gw: &TestGateway, url: &str, events: &[&str]) -> (i64, String) {
    let (s, v) = gw
        .admin(
            Method::POST,
            "/webhooks",
            Some(json!({"url": url, "events": events})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    (v["id"].as_i64().unwrap(), secret)
}

async fn deliveries(gw: &TestGateway, endpoint: i64) -> Vec<Value> {
    let (s, v) = gw
        .admin(
            Method::GET,
            &format!("/webhooks/{endpoint}/deliveries"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn each_event_reaches_each_endpoint_once_signed_and_a_workspace_gets_only_its_own() {
    let gw = TestGateway::start_with(fast_retries()).await;
    gw.put_tier("wh", json!({"tokens_per_minute": 100000}))
        .await;
    gw.put_tier("wh-up", json!({"tokens_per_minute": 200000}))
        .await;
    let (ws1, key1) = gw.workspace("wh").await;
    let (ws2, key2) = gw.workspace("wh").await;

    // Refused: a URL that is not http(s) with a host; no events, or an unknown one.
    for (body, field) in [
        (json!({"url": "ftp://example.com/x", "events": ALL}), "url"),
        (json!({"url": "http://", "events": ALL}), "url"),
        (json!({"url": "not a url", "events": ALL}), "url"),
        (
            json!({"url": "https://example.com", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://example.com", "events": ["nope"]}),
            "events",
        ),
    ] {
        let (s, v) = gw
            .admin(Method::POST, "/webhooks", Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
        let (s, _) = keyed(&gw, &key1, Method::POST, "/v1/webhooks", Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }

    let operator = Receiver::start(0).await;
    let own = Receiver::start(0).await;
    let (op_id, op_secret) = operator_endpoint(&gw, &operator.url, &ALL).await;
    let body = json!({"url": own.url, "events": ["limit_request.created", "limit_request.decided", "workspace.tier_changed"]});
    let (s, v) = keyed(&gw, &key1, Method::POST, "/v1/webhooks", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["workspace_id"], ws1);
    let own_id = v["id"].as_i64().unwrap();
    let own_secret = v["secret"].as_str().unwrap().to_string();
    assert_ne!(own_secret, op_secret);

    // Listings never show a secret; a workspace sees only its own, and cannot remove another's.
    let (_, listed) = gw.admin(Method::GET, "/webhooks", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);
    assert!(!listed.to_string().contains("whsec_"));
    let (_, mine) = keyed(&gw, &key1, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1);
    let (_, theirs) = keyed(&gw, &key2, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(theirs["data"], json!([]));
    let (s, _) = keyed(
        &gw,
        &key2,
        Method::DELETE,
        &format!("/v1/webhooks/{own_id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The events: two requests (one each), one approved, one denied; ws2 moved up, then
    // suspended.
    let r1 = ask_more(&gw, &key1).await;
    let r2 = ask_more(&gw, &key2).await;
    let (s, _) = gw
        .admin(Method::POST, &format!("/limit-requests/{r1}/approve"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let deny = json!({"reason": "not now"});
    let (s, _) = gw
        .admin(
            Method::POST,
            &format!("/limit-requests/{r2}/deny"),
            Some(deny),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let ws2_path = format!("/workspaces/{ws2}");
    let (s, _) = gw
        .admin(Method::PATCH, &ws2_path, Some(json!({"tier": "wh-up"})))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = gw
        .admin(
            Method::PATCH,
            &ws2_path,
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let got = operator.wait_for(6).await;
    let own_got = own.wait_for(2).await;
    // Nothing more comes: each once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(operator.got().len(), 6, "{:?}", operator.got());
    assert_eq!(own.got().len(), 2, "{:?}", own.got());

    let mut kinds: Vec<(String, i64)> = got
        .iter()
        .map(|r| {
            r.verify(&op_secret);
            (r.kind(), r.json()["data"]["workspace_id"].as_i64().unwrap())
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            ("limit_request.created".to_string(), ws1),
            ("limit_request.created".to_string(), ws2),
            ("limit_request.decided".to_string(), ws1),
            ("limit_request.decided".to_string(), ws2),
            ("workspace.suspended".to_string(), ws2),
            ("workspace.tier_changed".to_string(), ws2),
        ]
    );
    let mut ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "one id per event");
    let tier = got
        .iter()
        .find(|r| r.kind() == "workspace.tier_changed")
        .unwrap()
        .json();
    assert_eq!(tier["data"]["from"], "wh");
    assert_eq!(tier["data"]["to"], "wh-up");
    assert!(tier["timestamp"].is_string());
    let decided = got
        .iter()
        .find(|r| r.kind() == "limit_request.decided" && r.json()["data"]["workspace_id"] == ws2)
        .unwrap()
        .json();
    assert_eq!(decided["data"]["limit_request"]["status"], "denied");
    // The request as the admin API shows it, field for field (times in RFC 3339, nulls kept).
    let (_, listed) = gw
        .admin(Method::GET, "/limit-requests?status=denied", None)
        .await;
    let shown = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == decided["data"]["limit_request"]["id"])
        .unwrap();
    assert_eq!(&decided["data"]["limit_request"], shown);

    // The workspace's endpoint: its own two, signed with its own secret, the same event ids
    // the operator's got.
    for r in &own_got {
        r.verify(&own_secret);
        assert_eq!(r.json()["data"]["workspace_id"], ws1);
        assert!(ids.contains(&r.id.as_str()));
    }

    // The admin API lists the deliveries, each delivered at the first attempt.
    let listed = deliveries(&gw, op_id).await;
    assert_eq!(listed.len(), 6);
    for d in &listed {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
        assert_eq!(d["last_status_code"], 200, "{d}");
        assert!(d["next_attempt_at"].is_null(), "{d}");
    }
    let (s, _) = gw
        .admin(Method::GET, "/webhooks/999999/deliveries", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The workspace lists its own endpoint's, as the admin API would; not the operator's (the
    // console's test below: not another workspace's).
    let own_path = format!("/v1/webhooks/{own_id}/deliveries");
    let (s, own_listed) = keyed(&gw, &key1, Method::GET, &own_path, None).await;
    assert_eq!(s, StatusCode::OK, "{own_listed}");
    let own_listed = own_listed["data"].as_array().unwrap().clone();
    // As the admin API lists them, but for what the endpoint answered (its status code, the
    // error): the workspace names the host, and could probe a network the gateway reaches.
    let without_answers: Vec<Value> = deliveries(&gw, own_id)
        .await
        .into_iter()
        .map(|mut d| {
            let fields = d.as_object_mut().unwrap();
            assert_eq!(fields.remove("last_status_code"), Some(json!(200)));
            assert!(fields.remove("last_error").is_some());
            d
        })
        .collect();
    assert_eq!(own_listed, without_answers);
    assert_eq!(own_listed.len(), 2);
    assert!(own_listed.iter().all(|d| d["status"] == "delivered"));
    let op_path = format!("/v1/webhooks/{op_id}/deliveries");
    let (s, _) = keyed(&gw, &key1, Method::GET, &op_path, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "the operator's");

    // Removed by the workspace, it gets nothing more.
    let (s, _) = keyed(
        &gw,
        &key1,
        Method::DELETE,
        &format!("/v1/webhooks/{own_id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    ask_more(&gw, &key1).await;
    operator.wait_for(7).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(own.got().len(), 2);
}

#[tokio::test]
async fn a_receiver_that_fails_at_first_gets_the_event_after_retries() {
    let gw = TestGateway::start_with(fast_retries()).await;
    gw.put_tier("wh", json!({"tokens_per_minute": 100000}))
        .await;
    let (_, key) = gw.workspace("wh").await;
    let receiver = Receiver::start(2).await;
    let (endpoint, secret) =
        operator_endpoint(&gw, &receiver.url, &["limit_request.created"]).await;
    ask_more(&gw, &key).await;

    let got = receiver.wait_for(3).await;
    // Backoff 100 ms, then 200 ms: the third attempt comes at least 300 ms after the first,
    // and well within the bound on a loaded machine.
    let waited = got[2].at - got[0].at;
    assert!(waited >= Duration::from_millis(280), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(
        got.iter().all(|r| r.id == got[0].id),
        "the same event id each time"
    );
    for r in &got {
        r.verify(&secret);
    }
    eventually(Duration::from_secs(5), "recorded as delivered", || async {
        deliveries(&gw, endpoint).await[0]["status"] == "delivered"
    })
    .await;
    let d = &deliveries(&gw, endpoint).await[0];
    assert_eq!(d["attempts"], 3, "{d}");
    assert_eq!(d["last_status_code"], 200, "{d}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 3);
    let metrics = gw.metrics().await;
    for line in [
        "tiergate_webhook_attempts_failed_total 2",
        "tiergate_webhook_deliveries_delivered_total 1",
        "tiergate_webhook_deliveries_failed_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn a_gateway_restarted_between_an_event_and_its_delivery_still_delivers_it() {
    let gw = TestGateway::start_with(fast_retries()).await;
    gw.put_tier("wh", json!({"tokens_per_minute": 100000}))
        .await;
    let (ws, key) = gw.workspace("wh").await;
    // An address nobody listens on yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{addr}/hook");
    let (endpoint, secret) = operator_endpoint(&gw, &url, &["limit_request.created"]).await;
    ask_more(&gw, &key).await;
    eventually(Duration::from_secs(5), "a failed first attempt", || async {
        let d = deliveries(&gw, endpoint).await;
        d.len() == 1 && d[0]["attempts"].as_u64() >= Some(1)
    })
    .await;
    let d = &deliveries(&gw, endpoint).await[0];
    assert_eq!(d["status"], "pending", "{d}");
    assert!(d["last_error"].is_string(), "{d}");

    let gw = gw.restart_with(fast_retries()).await;
    let receiver = Receiver::on(tokio::net::TcpListener::bind(addr).await.unwrap(), 0);
    let got = receiver.wait_for(1).await;
    got[0].verify(&secret);
    assert_eq!(got[0].kind(), "limit_request.created");
    assert_eq!(got[0].json()["data"]["workspace_id"], ws);
    eventually(Duration::from_secs(5), "recorded as delivered", || async {
        deliveries(&gw, endpoint).await[0]["status"] == "delivered"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 1);
}

#[tokio::test]
async fn each_quota_threshold_fires_once_a_month_for_each_quota() {
    let gw = TestGateway::start_with(fast_retries()).await;
    gw.put_tier(
        "wh",
        json!({"tokens_per_minute": 100000, "tokens_per_month": 100000000}),
    )
    .await;
    let (ws, key) = gw.workspace("wh").await;
    let receiver = Receiver::start(0).await;
    operator_endpoint(&gw, &receiver.url, &["quota.threshold"]).await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    let used = gw.settled_month_tokens(&key).await;
    assert!(used > 0);
    // Far below 50%: nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.got().is_empty());

    // A budget of 1.5× what was used: 50% crossed (the budget is lower than the quota).
    let budget = json!({"tokens_per_month": used * 3 / 2});
    let (s, v) = keyed(&gw, &key, Method::PUT, "/v1/budget", Some(budget)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = receiver.wait_for(1).await;
    let event = got[0].json();
    assert_eq!(event["type"], "quota.threshold");
    assert_eq!(event["data"]["workspace_id"], ws);
    assert_eq!(event["data"]["threshold_percent"], 50);
    assert_eq!(event["data"]["quota_is_budget"], true);

    // Down to exactly what was used: the new quota's thresholds it is past, each once.
    let budget = json!({"tokens_per_month": used});
    let (s, _) = keyed(&gw, &key, Method::PUT, "/v1/budget", Some(budget)).await;
    assert_eq!(s, StatusCode::OK);
    receiver.wait_for(4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let fired = |receiver: &Receiver| {
        let mut fired: Vec<(u64, u64)> = receiver
            .got()
            .iter()
            .map(|r| {
                let data = &r.json()["data"];
                (
                    data["quota"].as_u64().unwrap(),
                    data["threshold_percent"].as_u64().unwrap(),
                )
            })
            .collect();
        fired.sort();
        fired
    };
    let mut want = vec![(used, 50), (used, 80), (used, 100), (used * 3 / 2, 50)];
    want.sort();
    assert_eq!(fired(&receiver), want);

    // Raised within the month, the quota's thresholds fire again as the new quota's: the
    // workspace that was given more and uses it up is told (an outside audit: it never was).
    let budget = json!({"tokens_per_month": used * 2});
    let (s, _) = keyed(&gw, &key, Method::PUT, "/v1/budget", Some(budget)).await;
    assert_eq!(s, StatusCode::OK);
    receiver.wait_for(5).await;
    want.push((used * 2, 50));
    want.sort();
    assert_eq!(fired(&receiver), want);

    // A restart forgets what it fired; the store does not.
    let gw = gw.restart_with(fast_retries()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.got().len(), 5);
    drop(gw);
}

#[tokio::test]
async fn the_quota_thresholds_are_the_operators_to_choose() {
    let mut options = fast_retries();
    options.raw.webhook_quota_thresholds = Some(vec![
        tiergate::config::RawNumber::Number(60),
        tiergate::config::RawNumber::Number(100),
    ]);
    let gw = TestGateway::start_with(options).await;
    gw.put_tier(
        "wh",
        json!({"tokens_per_minute": 100000, "tokens_per_month": 100000000}),
    )
    .await;
    let (_, key) = gw.workspace("wh").await;
    let receiver = Receiver::start(0).await;
    operator_endpoint(&gw, &receiver.url, &["quota.threshold"]).await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    let used = gw.settled_month_tokens(&key).await;
    // Two thirds of a budget: past 60%, not 100%, and no 50% or 80% event exists.
    let budget = json!({"tokens_per_month": used * 3 / 2});
    let (s, _) = keyed(&gw, &key, Method::PUT, "/v1/budget", Some(budget)).await;
    assert_eq!(s, StatusCode::OK);
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].json()["data"]["threshold_percent"], 60);
    let budget = json!({"tokens_per_month": used});
    let (s, _) = keyed(&gw, &key, Method::PUT, "/v1/budget", Some(budget)).await;
    assert_eq!(s, StatusCode::OK);
    // The new quota's: both its thresholds are past.
    receiver.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut thresholds: Vec<u64> = receiver
        .got()
        .iter()
        .map(|r| r.json()["data"]["threshold_percent"].as_u64().unwrap())
        .collect();
    thresholds.sort();
    assert_eq!(thresholds, [60, 60, 100]);
}

/// A workspace's bounds hold for requests sent at once: 10 increase requests waiting, 10
/// endpoints. Each was counted before the insert, outside its transaction, so twenty sent
/// together all got in (an outside audit saw 20 of 20).
#[tokio::test]
async fn a_workspace_s_bounds_hold_for_requests_sent_at_once() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.workspace("free").await;
    let statuses = |path: &'static str, body: fn(usize) -> Value| {
        let gw = &gw;
        let key = key.clone();
        async move {
            let sent = (0..20).map(|i| {
                let key = key.clone();
                async move { keyed(gw, &key, Method::POST, path, Some(body(i))).await.0 }
            });
            let answers = futures_util::future::join_all(sent).await;
            let created = answers
                .iter()
                .filter(|s| **s == StatusCode::CREATED)
                .count();
            let refused = answers
                .iter()
                .filter(|s| **s == StatusCode::CONFLICT)
                .count();
            (created, refused)
        }
    };
    let asked = statuses(
        "/v1/limit-requests",
        |i| json!({"use_case": format!("launch {i}"), "requested_limits": {"burst": 2}}),
    )
    .await;
    assert_eq!(asked, (10, 10));
    let (_, listed) = keyed(&gw, &key, Method::GET, "/v1/limit-requests", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 10, "{listed}");
    let hooks = statuses(
        "/v1/webhooks",
        |i| json!({"url": format!("http://127.0.0.1:9/hook{i}"), "events": ["quota.threshold"]}),
    )
    .await;
    assert_eq!(hooks, (10, 10));
    let (_, listed) = keyed(&gw, &key, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 10, "{listed}");
}

/// Follows an endpoint's creation in the console as a browser does (`303` to the page that
/// shows its secret, the secret sealed in a cookie for that path alone) and returns the
/// endpoint's id and the secret that page shows once.
async fn console_secret(
    base: &str,
    session: &str,
    made: &crate::console::Page,
    under: &str,
) -> (i64, String, String) {
    assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.body);
    let to = made.location.clone().expect("a redirect");
    let id: i64 = to
        .strip_prefix(&format!("{under}/"))
        .and_then(|rest| rest.strip_suffix("/created"))
        .unwrap_or_else(|| panic!("{to}"))
        .parse()
        .unwrap();
    let set = made
        .set_cookie
        .iter()
        .find(|c| c.starts_with("tiergate_new_webhook="))
        .expect("the secret's cookie");
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=300",
        &format!("Path={to};"),
    ] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    let carried = set.split(';').next().unwrap();
    let get = |cookies: String, path: String| async move {
        let r = crate::console::browser()
            .get(format!("{base}{path}"))
            .header("cookie", cookies)
            .send()
            .await
            .unwrap();
        crate::console::Page::of(r).await
    };
    // Another endpoint's page with this cookie shows nothing: the seal names the endpoint.
    let stray = get(
        format!("{session}; {carried}"),
        format!("{under}/{}/created", id + 1),
    )
    .await;
    assert_eq!(stray.status, StatusCode::GONE, "{}", stray.body);
    assert!(!stray.body.contains("whsec_"), "{}", stray.body);
    let page = get(format!("{session}; {carried}"), to.clone()).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let at = page.body.find("id=\"new-secret\">").expect("the secret") + 16;
    let secret = page.body[at..].split('<').next().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(
        page.set_cookie
            .iter()
            .any(|c| c.starts_with("tiergate_new_webhook=;") && c.contains("Max-Age=0")),
        "the cookie is cleared: {:?}",
        page.set_cookie
    );
    assert!(
        page.set_cookie
            .iter()
            .any(|c| c.starts_with(&format!("tiergate_key_shown=webhook-{id};"))),
        "{:?}",
        page.set_cookie
    );
    // Once: a reload shows no secret.
    let again = get(session.to_string(), to.clone()).await;
    assert_eq!(again.status, StatusCode::GONE, "{}", again.body);
    assert!(!again.body.contains(&secret));
    (id, secret, carried.to_string())
}

#[tokio::test]
async fn endpoints_made_in_the_console_get_their_events_signed_with_the_secret_shown_once() {
    let gw = TestGateway::start_with(fast_retries()).await;
    let (ws, key) = gw.workspace("free").await;
    let (other_ws, other_key) = gw.workspace("free").await;
    let (for_operator, for_workspace) = (Receiver::start(0).await, Receiver::start(0).await);
    let op = crate::console_operator::Operator::sign_in(&gw.url, ADMIN).await;

    // The operator's endpoint, for two events.
    let made = op
        .post(
            "/console/operator/webhooks",
            &[
                ("url", for_operator.url.as_str()),
                ("events", "limit_request.created"),
                ("events", "workspace.suspended"),
            ],
        )
        .await;
    let (op_id, op_secret, _) =
        console_secret(&gw.url, op.cookie(), &made, "/console/operator/webhooks").await;

    // The workspace's own, from its console page.
    let session = crate::console::signed_in(&gw, &key).await;
    let page = crate::console::get(&gw, "/console/workspace", Some(&session)).await;
    assert!(
        page.body.contains(r#"<section id="webhooks">"#),
        "{}",
        page.body
    );
    assert!(page.body.contains(r#"id="no-webhooks""#));
    let csrf = page.csrf();
    let post = |path: String, fields: Vec<(&'static str, String)>| {
        let (url, session, csrf) = (gw.url.clone(), session.clone(), csrf.clone());
        async move {
            let mut all = vec![("csrf", csrf)];
            all.extend(fields);
            let r = crate::console::browser()
                .post(format!("{url}{path}"))
                .header("cookie", session)
                .form(&all)
                .send()
                .await
                .unwrap();
            crate::console::Page::of(r).await
        }
    };
    // Without the session's form token, or from another site: refused.
    for (token, origin) in [("", None), (csrf.as_str(), Some("https://evil.example"))] {
        let mut r = crate::console::browser()
            .post(format!("{}/console/webhooks", gw.url))
            .header("cookie", &session)
            .form(&[
                ("csrf", token),
                ("url", for_workspace.url.as_str()),
                ("events", "quota.threshold"),
            ]);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        assert_eq!(r.send().await.unwrap().status(), StatusCode::FORBIDDEN);
    }
    // Refused as the API refuses, naming the field; nothing is made.
    for (fields, says) in [
        (
            vec![
                ("url", "ftp://x".to_string()),
                ("events", "quota.threshold".to_string()),
            ],
            "url",
        ),
        (vec![("url", for_workspace.url.clone())], "events"),
        (
            vec![
                ("url", for_workspace.url.clone()),
                ("events", "nope".to_string()),
            ],
            "events",
        ),
    ] {
        let page = post("/console/webhooks".into(), fields).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
        assert!(page.body.contains(says), "{says}: {}", page.body);
        if says == "url" {
            // The form comes back as it was sent, to be mended.
            assert!(page.body.contains(r#"value="ftp://x""#), "{}", page.body);
            assert!(page.body.contains(r#"value="quota.threshold" checked"#));
            assert!(!page.body.contains(r#"value="workspace.suspended" checked"#));
        }
    }
    let made = post(
        "/console/webhooks".into(),
        vec![
            ("url", for_workspace.url.clone()),
            ("events", "limit_request.created".to_string()),
        ],
    )
    .await;
    let (ws_id, ws_secret, ws_cookie) =
        console_secret(&gw.url, &session, &made, "/console/webhooks").await;
    assert_ne!(ws_secret, op_secret);
    // The workspace's page lists it, and the API agrees.
    let page = crate::console::get(&gw, "/console/workspace", Some(&session)).await;
    assert!(
        page.body.contains(&format!("data-webhook-id=\"{ws_id}\"")),
        "{}",
        page.body
    );
    let (s, own) = keyed(&gw, &key, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(own["data"][0]["id"], ws_id, "{own}");
    assert_eq!(own["data"][0]["events"], json!(["limit_request.created"]));
    // Another workspace's session cannot see the secret's page, nor remove the endpoint.
    let other_session = crate::console::signed_in(&gw, &other_key).await;
    let other_page = crate::console::get(&gw, "/console/workspace", Some(&other_session)).await;
    assert!(!other_page.body.contains(&for_workspace.url));
    let page = crate::console::get(
        &gw,
        &format!("/console/webhooks/{ws_id}/created"),
        Some(&other_session),
    )
    .await;
    assert_eq!(page.status, StatusCode::GONE);
    let removed = crate::console::browser()
        .post(format!("{}/console/webhooks/{ws_id}/delete", gw.url))
        .header("cookie", &other_session)
        .form(&[("csrf", other_page.csrf())])
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), StatusCode::NOT_FOUND);
    let _ = other_ws;

    // An event reaches both, each signed with the secret its page showed.
    ask_more(&gw, &key).await;
    let got = for_operator.wait_for(1).await;
    assert_eq!(got[0].kind(), "limit_request.created");
    got[0].verify(&op_secret);
    let got = for_workspace.wait_for(1).await;
    assert_eq!(got[0].kind(), "limit_request.created");
    got[0].verify(&ws_secret);

    // The operator sees both endpoints, and the first's delivery.
    let list = op.get("/console/operator/webhooks").await;
    assert_eq!(list.status, StatusCode::OK);
    for id in [op_id, ws_id] {
        assert!(
            list.body.contains(&format!("data-webhook-id=\"{id}\"")),
            "{}",
            list.body
        );
    }
    assert!(list.body.contains("every workspace"));
    assert!(list
        .body
        .contains(&format!("/console/operator/workspaces/{ws}")));
    assert!(!list.body.contains("whsec_"), "never a secret");
    eventually(Duration::from_secs(10), "the delivery marked", || async {
        let page = op.get(&format!("/console/operator/webhooks/{op_id}")).await;
        page.body.contains("data-status=\"delivered\"")
    })
    .await;
    let page = op.get(&format!("/console/operator/webhooks/{op_id}")).await;
    assert!(page.body.contains("limit_request.created"), "{}", page.body);
    assert!(
        page.body.contains("<td class=\"status\">delivered</td>"),
        "{}",
        page.body
    );
    // The operator sees what the endpoint answered.
    assert!(
        page.body.contains("<td class=\"answer\">200</td>"),
        "{}",
        page.body
    );
    assert_eq!(
        op.get("/console/operator/webhooks/999").await.status,
        StatusCode::NOT_FOUND
    );
    // The workspace sees its own endpoint's delivery, linked from its page; not another's.
    let own_page = format!("/console/webhooks/{ws_id}");
    let page = crate::console::get(&gw, "/console/workspace", Some(&session)).await;
    assert!(
        page.body.contains(&format!("href=\"{own_page}\"")),
        "{}",
        page.body
    );
    eventually(Duration::from_secs(10), "the delivery marked", || async {
        let page = crate::console::get(&gw, &own_page, Some(&session)).await;
        page.body.contains("data-status=\"delivered\"")
    })
    .await;
    let page = crate::console::get(&gw, &own_page, Some(&session)).await;
    assert!(page.body.contains("limit_request.created"), "{}", page.body);
    // Signing out from it too, as from the workspace page (an outside audit: no form).
    assert!(
        page.body.contains(r#"action="/console/sign-out""#),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("table id=\"deliveries\""),
        "{}",
        page.body
    );
    // Never what the endpoint answered: the workspace names the host, and could probe a network
    // the gateway reaches.
    assert!(!page.body.contains("Last answer"), "{}", page.body);
    assert!(!page.body.contains("class=\"answer\""), "{}", page.body);
    for (path, who) in [
        (own_page.clone(), &other_session),
        (format!("/console/webhooks/{op_id}"), &session),
    ] {
        let page = crate::console::get(&gw, &path, Some(who)).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
    }
    let path = format!("/v1/webhooks/{ws_id}/deliveries");
    let (s, _) = keyed(&gw, &other_key, Method::GET, &path, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another workspace's");
    // The operator's refusals name the field too.
    let page = op
        .post(
            "/console/operator/webhooks",
            &[("url", "http://"), ("events", "quota.threshold")],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert!(page.body.contains("url"), "{}", page.body);

    // Removed: the workspace its own, the operator theirs.
    let page = post(format!("/console/webhooks/{ws_id}/delete"), vec![]).await;
    assert!(
        page.redirects_to("/console/workspace?done=webhook-removed"),
        "{}",
        page.body
    );
    let (_, own) = keyed(&gw, &key, Method::GET, "/v1/webhooks", None).await;
    assert_eq!(own["data"], json!([]));
    // Its secret's cookie, kept past its life and sent again (as curl's cookie jar does): the
    // endpoint is gone, and so is its secret's page.
    let replayed = crate::console::browser()
        .get(format!("{}/console/webhooks/{ws_id}/created", gw.url))
        .header("cookie", format!("{session}; {ws_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::GONE);
    assert!(!replayed.text().await.unwrap().contains(&ws_secret));
    let page = op
        .post(&format!("/console/operator/webhooks/{op_id}/delete"), &[])
        .await;
    assert!(
        page.redirects_to("/console/operator/webhooks?done=webhook-removed"),
        "{}",
        page.body
    );
    let (_, all) = gw.admin(Method::GET, "/webhooks", None).await;
    assert_eq!(all["data"], json!([]), "{all}");

    // Audited as whoever made each change.
    let (_, entries) = gw
        .admin(Method::GET, "/audit?action=webhook.create", None)
        .await;
    let actors: Vec<&str> = entries["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors, vec![format!("workspace:{ws}").as_str(), "admin"]);
}

/// A receiver that never answers holds back no other endpoint's deliveries: each attempt runs
/// on its own (an outside audit: the batch was waited for whole, up to the 5 s an attempt may
/// take, so one silent endpoint delayed another's next events by 4 s). Its attempt ends in a
/// timeout, said as such in its delivery's `last_error`.
#[tokio::test]
async fn a_silent_receiver_holds_back_no_other_endpoint() {
    let gw = TestGateway::start_with(fast_retries()).await;
    let (_, key) = gw.workspace("free").await;
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let ok = Receiver::start(0).await;
    let events = ["limit_request.created"];
    let (silent_id, _) = operator_endpoint(&gw, &silent_url, &events).await;
    operator_endpoint(&gw, &ok.url, &events).await;

    ask_more(&gw, &key).await;
    ok.wait_for(1).await;
    // The silent endpoint's attempt is under way now; the next event still goes at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    ask_more(&gw, &key).await;
    let got = ok.wait_for(2).await;
    let took = got[1].at.saturating_duration_since(asked);
    assert!(
        took < Duration::from_millis(2500),
        "the second event took {took:?}"
    );

    // Its first attempt timed out (5 s), and says so.
    eventually(
        Duration::from_secs(15),
        "the silent attempt's outcome",
        || async {
            deliveries(&gw, silent_id).await.iter().any(|d| {
                d["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no answer within 5 s"))
            })
        },
    )
    .await;
    held.abort();
}

/// A password in an endpoint's URL is the receiver's to check, not the listings' to show: the
/// API, the console and the audit log show it as `***`, and the deliveries still carry it. So is
/// a query parameter named as a secret is (`?token=`: an outside audit saw it whole).
#[tokio::test]
async fn a_password_in_an_endpoint_url_is_shown_as_stars() {
    let gw = TestGateway::start_with(fast_retries()).await;
    let (_, key) = gw.workspace("free").await;
    let ok = Receiver::start(0).await;
    let with_password = format!(
        "{}?token=t0p-s3cret&x=1",
        ok.url.replace("http://", "http://hook-user:s3cret-pass@")
    );
    let (id, _) = operator_endpoint(&gw, &with_password, &["limit_request.created"]).await;
    ask_more(&gw, &key).await;
    ok.wait_for(1).await;
    let (_, listed) = gw.admin(Method::GET, "/webhooks", None).await;
    let (_, audit) = gw
        .admin(Method::GET, "/audit?action=webhook.create", None)
        .await;
    let page = gw
        .client
        .get(format!("{}/admin/v1/webhooks/{id}/deliveries", gw.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for shown in [listed.to_string(), audit.to_string(), page] {
        assert!(!shown.contains("s3cret-pass"), "{shown}");
        assert!(!shown.contains("t0p-s3cret"), "{shown}");
    }
    let url = listed["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with("http://hook-user:***@127.0.0.1:"), "{url}");
    assert!(url.ends_with("?token=***&x=1"), "{url}");
    assert_eq!(audit["data"][0]["after"]["url"], url);
    // A user name alone is the credential (`https://TOKEN@host`): shown as `***` too.
    let token_only = ok.url.replace("http://", "http://tok3n-alone@");
    operator_endpoint(&gw, &token_only, &["limit_request.created"]).await;
    let (_, listed) = gw.admin(Method::GET, "/webhooks", None).await;
    let shown = listed.to_string();
    assert!(!shown.contains("tok3n-alone"), "{shown}");
    assert!(shown.contains("http://***@127.0.0.1:"), "{shown}");
}

/// A stop (`SIGTERM`) while an attempt is under way lets it end and records its outcome before
/// the process exits (an outside audit: the attempt was cut, its delivery left unrecorded, and
/// sent again only once its claim expired, 30 s later).
#[tokio::test]
async fn a_stop_lets_the_attempts_under_way_end_and_records_them() {
    use crate::process::{admin, workspace, Process};
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("tg.db").display());
    // A receiver that answers 200 a second and a half after each event arrives.
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = arrived.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                AxumStatus::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut first = Process::start(&db, &mock.url, &[]).await;
    let endpoint = admin(
        &first.url,
        Method::POST,
        "/webhooks",
        json!({"url": url, "events": ["limit_request.created"]}),
    )
    .await["id"]
        .as_i64()
        .unwrap();
    let (_, key) = workspace(&first.url, "slow-hook").await;
    let asked = reqwest::Client::new()
        .post(format!("{}/v1/limit-requests", first.url))
        .bearer_auth(&key)
        .json(&json!({"use_case": "more", "requested_limits": {"tokens_per_minute": 900_000_000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), StatusCode::CREATED);
    eventually(Duration::from_secs(10), "the attempt under way", || async {
        arrived.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    first.terminate();
    assert!(first.exited(Duration::from_secs(20)).await.success());

    let second = Process::start(&db, &mock.url, &[]).await;
    let listed = admin(
        &second.url,
        Method::GET,
        &format!("/webhooks/{endpoint}/deliveries"),
        Value::Null,
    )
    .await;
    let d = &listed["data"][0];
    assert_eq!(d["status"], "delivered", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(arrived.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A failed delivery is sent again on asking, from the console's form beside it and through the
/// admin API, with the same `webhook-id`, and is then delivered; a pending or delivered one is a
/// conflict, and a workspace cannot send the operator's again (an outside audit: a receiver down
/// longer than the retries lost the event for good, with no way to ask for it).
#[tokio::test]
async fn a_failed_delivery_is_sent_again_on_asking() {
    // Retries ten minutes apart: the test gives the delivery up itself, through the store.
    let gw = TestGateway::start_with(Options {
        raw: RawSettings {
            webhook_retry_base_ms: Some(600_000),
            ..RawSettings::default()
        },
        ..Options::default()
    })
    .await;
    let (ws, _) = gw.workspace("free").await;
    let (_, other_key) = gw.workspace("free").await;
    // Answers 500 twice, then 200.
    let receiver = Receiver::start(2).await;
    let (endpoint, _) = operator_endpoint(&gw, &receiver.url, &["workspace.suspended"]).await;
    let (s, _) = gw
        .admin(
            Method::PATCH,
            &format!("/workspaces/{ws}"),
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let store = tiergate::store::open(&format!("sqlite://{}", gw.db.display()))
        .await
        .unwrap();
    // The attempt number `n` answered; then its retries given up, as after the 12th attempt.
    let fail_after = |n: usize| {
        let (gw, store, receiver) = (&gw, &store, &receiver);
        async move {
            receiver.wait_for(n).await;
            eventually(Duration::from_secs(10), "the 500 recorded", || async {
                deliveries(gw, endpoint).await[0]["attempts"] == 1
            })
            .await;
            let due = store
                .claim_deliveries(10_000_000_000_000, 10_000_000_000_001, 10)
                .await
                .unwrap();
            assert_eq!(due.len(), 1);
            let failed = tiergate::store::DeliveryOutcome::Failed {
                status: Some(500),
                error: None,
            };
            store.finish_delivery(due[0].id, &failed).await.unwrap();
            let listed = deliveries(gw, endpoint).await;
            assert_eq!(listed[0]["status"], "failed");
            listed[0].clone()
        }
    };
    let listed = fail_after(1).await;
    let event = listed["event_id"].as_str().unwrap().to_string();
    assert_eq!(event, receiver.got()[0].id);

    // From the console: its form beside the failed delivery, then its page with a notice.
    let op = crate::console_operator::Operator::sign_in(&gw.url, ADMIN).await;
    let page_path = format!("/console/operator/webhooks/{endpoint}");
    let page = op.get(&page_path).await;
    let action = format!("{page_path}/deliveries/{event}/redeliver");
    assert!(
        page.body.contains(&format!(
            r#"<form class="redeliver" method="post" action="{action}">"#
        )),
        "{}",
        page.body
    );
    let sent = op.post(&action, &[]).await;
    assert_eq!(sent.status, StatusCode::SEE_OTHER, "{}", sent.body);
    let back = sent.location.clone().unwrap();
    assert_eq!(back, format!("{page_path}?done=redelivered"));
    let page = op.get(&back).await;
    assert!(page.body.contains("Delivery sent again"), "{}", page.body);

    // Failed again; through the admin API this time.
    let listed = fail_after(2).await;
    assert_eq!(listed["event_id"], event);
    // A workspace cannot send the operator's endpoint's delivery again.
    let r = gw
        .client
        .post(format!(
            "{}/v1/webhooks/{endpoint}/deliveries/{event}/redeliver",
            gw.url
        ))
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let path = format!("/webhooks/{endpoint}/deliveries/{event}/redeliver");
    let (s, again) = gw.admin(Method::POST, &path, None).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(
        (again["status"].as_str(), again["attempts"].as_u64()),
        (Some("pending"), Some(0))
    );
    // Due at once, shown as due from the asking: not the epoch, nor when it was made (outside
    // audits). The clock stands still here.
    let now = tiergate::http::views::Timestamp(tiergate::clock::Clock::now_secs(&*gw.clock));
    assert_eq!(again["next_attempt_at"], now.rfc3339(), "{again}");
    let got = receiver.wait_for(3).await;
    assert!(got.iter().all(|r| r.id == event), "the same webhook-id");
    eventually(Duration::from_secs(10), "delivered", || async {
        deliveries(&gw, endpoint).await[0]["status"] == "delivered"
    })
    .await;
    let (s, v) = gw.admin(Method::POST, &path, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // The console's stale "Send again": the endpoint's page again, with the refusal and the
    // admin API's status (an outside audit: a bare "Conflict" page, far from the endpoint).
    let stale = op.post(&action, &[]).await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(
        stale.body.contains("only a failed one is sent again"),
        "{}",
        stale.body
    );
    assert!(
        stale.body.contains(r#"<table id="deliveries">"#),
        "{}",
        stale.body
    );
    let (s, v) = gw
        .admin(
            Method::POST,
            &format!("/webhooks/{endpoint}/deliveries/evt_none/redeliver"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (_, log) = gw
        .admin(Method::GET, "/audit?action=webhook.redeliver", None)
        .await;
    assert_eq!(log["data"].as_array().unwrap().len(), 2, "{log}");
}
