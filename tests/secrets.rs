//! Secrets never show: a full run of the binary, with every log level on, is searched for the
//! workspace key, the admin token and the upstream key, in its logs, its answers and its metrics;
//! and the database holds only the key's hash and prefix.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ADMIN: &str = "admin-token-that-must-not-leak-0001";
const UPSTREAM_KEY: &str = "sk-upstream-key-that-must-not-leak-0002";

async fn answer_text(r: reqwest::Response) -> String {
    let mut text = format!("{:?}", r.headers());
    text.push_str(&r.text().await.unwrap_or_default());
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_never_appear_in_logs_answers_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_url = format!("http://{}", mock.local_addr().unwrap());
    tokio::spawn(tiergate::mock_upstream::serve(
        mock,
        tiergate::mock_upstream::MockConfig::default(),
        std::future::pending(),
    ));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &mock_url, "--upstream-api-key", UPSTREAM_KEY])
        .args(["--admin-token", ADMIN])
        .arg("--database")
        .arg(format!("sqlite://{}", dir.path().join("t.db").display()))
        .env("TIERGATE_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut seen = String::new();
    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{url}/admin/v1{path}"))
            .bearer_auth(ADMIN)
    };
    let r = admin(reqwest::Method::PUT, "/tiers/tight")
        .json(&json!({"requests_per_second": 1, "tokens_per_month": 1000000}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let ws: Value = admin(reqwest::Method::POST, "/workspaces")
        .json(&json!({"name": "w", "tier": "tight"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created: Value = admin(
        reqwest::Method::POST,
        &format!("/workspaces/{}/keys", ws["id"]),
    )
    .json(&json!({}))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let chat = |key: &str, stream: bool| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "m", "stream": stream,
                "messages": [{"role": "user", "content": "Hello"}]}))
    };
    // Admitted, streamed, denied, and a well-formed key that does not exist.
    seen.push_str(&answer_text(chat(&key, false).send().await.unwrap()).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    seen.push_str(&answer_text(chat(&key, true).send().await.unwrap()).await);
    seen.push_str(&answer_text(chat(&key, false).send().await.unwrap()).await);
    let stranger = tiergate::catalog::generate_key().secret;
    seen.push_str(&answer_text(chat(&stranger, false).send().await.unwrap()).await);
    // The workspace's own views, the admin views, a wrong admin token, the metrics.
    for path in ["/v1/limits", "/v1/limit-requests"] {
        let r = client
            .get(format!("{url}{path}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        seen.push_str(&answer_text(r).await);
    }
    for path in [
        format!("/workspaces/{}/keys", ws["id"]),
        format!("/workspaces/{}/usage", ws["id"]),
        "/workspaces".to_string(),
    ] {
        seen.push_str(&answer_text(admin(reqwest::Method::GET, &path).send().await.unwrap()).await);
    }
    let wrong = client
        .get(format!("{url}/admin/v1/workspaces"))
        .bearer_auth(format!("{ADMIN}x"))
        .send()
        .await
        .unwrap();
    seen.push_str(&answer_text(wrong).await);
    let metrics = client.get(format!("{url}/metrics")).send().await.unwrap();
    seen.push_str(&answer_text(metrics).await);

    // SIGTERM: a clean stop, its last lines in the log too.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut logs = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.lines().count() > 20,
        "the run logged at trace level: {logs}"
    );
    assert!(seen.contains("x-ratelimit"), "the answers were captured");
    for (what, secret) in [
        ("workspace key", key.as_str()),
        ("unknown key", stranger.as_str()),
        ("admin token", ADMIN),
        ("upstream key", UPSTREAM_KEY),
    ] {
        assert!(!logs.contains(secret), "the {what} appears in the logs");
        assert!(!seen.contains(secret), "the {what} appears in an answer");
        // Not even its body without the prefix.
        let body = &secret[secret.len() - 20..];
        assert!(
            !logs.contains(body),
            "part of the {what} appears in the logs"
        );
    }

    // Only the key's hash (and its first 11 characters, to tell keys apart) is stored.
    let mut stored = Vec::new();
    for file in ["t.db", "t.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
            stored.extend_from_slice(&bytes);
        }
    }
    assert!(stored.len() > 4096, "the database was read");
    let tail = &key.as_bytes()[11..];
    assert!(
        !stored.windows(tail.len()).any(|w| w == tail),
        "the key's secret part is in the database"
    );
    let prefix = &key.as_bytes()[..11];
    assert!(
        stored.windows(prefix.len()).any(|w| w == prefix),
        "the key's prefix is stored, so the search above looked in the right place"
    );
}
