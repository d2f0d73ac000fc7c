//! `TestGateway`: a real tiergate on port 0 over a real SQLite file, in front of the real mock
//! upstream, with a manual clock so that limits are tested without sleeping.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use tiergate::clock::{Clock, ManualClock, SystemClock};
use tiergate::config::{RawSettings, RawUpstream};
use tiergate::limiter::redis::TimeSource;

use crate::support::postgres::PgDatabase;
use tiergate::mock_upstream::{self, MockConfig, TagStats};
use tiergate::{App, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "test-admin-token-0123456789";

fn fleet_number() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub struct Mock {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Mock {
    pub async fn start() -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(mock_upstream::serve(
            listener,
            MockConfig::default(),
            async {
                let _ = stopped.await;
            },
        ));
        Mock {
            url,
            stop: Some(stop),
        }
    }
}

impl Mock {
    /// What the mock saw of the requests sent with `x-mock-tag: tag`.
    pub async fn stats(&self, tag: &str) -> TagStats {
        let response = Client::new()
            .get(format!("{}/mock/stats", self.url))
            .query(&[("tag", tag)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub struct TestGateway {
    pub url: String,
    /// The admin listener, when the gateway has one (`Options::admin_listener`).
    pub admin_url: Option<String>,
    pub clock: Arc<ManualClock>,
    pub client: Client,
    pub db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<Arc<PgDatabase>>,
    pub mock: Option<Arc<Mock>>,
}

pub struct Options {
    pub upstream: Option<String>,
    pub raw: RawSettings,
    pub admin_token: Option<String>,
    /// The system clock instead of the manual one (for tests under real load).
    pub real_clock: bool,
    /// Whose clock the Redis script uses (with `raw.redis`).
    pub redis_time: TimeSource,
    /// Serve the admin API and `/metrics` on a listener of their own (port 0).
    pub admin_listener: bool,
    /// How often the ledger writer writes, if not the default.
    pub ledger_flush: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upstream: None,
            raw: RawSettings::default(),
            admin_token: Some(ADMIN.to_string()),
            real_clock: false,
            redis_time: TimeSource::Server,
            admin_listener: false,
            ledger_flush: None,
        }
    }
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(Options::default()).await
    }

    /// A gateway before `upstream` (not the mock) with `raw`'s settings, a workspace on a tier
    /// with `limits`, and its key.
    pub async fn before(upstream: &str, raw: RawSettings, limits: Value) -> (TestGateway, String) {
        let gw = Self::start_with(Options {
            upstream: Some(upstream.to_string()),
            raw,
            ..Options::default()
        })
        .await;
        gw.put_tier("test-tier", limits).await;
        let (_, key) = gw.workspace("test-tier").await;
        (gw, key)
    }

    /// A gateway, a workspace on a tier with `limits`, and its key.
    pub async fn on_tier(limits: Value) -> (TestGateway, String) {
        let gw = Self::start().await;
        gw.put_tier("test-tier", limits).await;
        let (_, key) = gw.workspace("test-tier").await;
        (gw, key)
    }

    pub async fn start_with(options: Options) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tiergate.db");
        let mock = Mock::start().await;
        let upstream = options.upstream.clone().unwrap_or(mock.url.clone());
        let clock = Arc::new(ManualClock::starting_now());
        let mut gw = Self::boot(&db, upstream, options, clock).await;
        gw._dir = Some(dir);
        gw.mock = Some(Arc::new(mock));
        gw
    }

    /// `n` gateways on one database (a fresh Postgres database, as in service; a SQLite file
    /// when Postgres cannot be reached outside CI), in front of one mock upstream, sharing their
    /// limits through `redis` (a URL, or cluster seeds) under a key prefix of their own, with
    /// the system clock. `tweak` adjusts the settings of each.
    pub async fn fleet(
        n: usize,
        redis: &str,
        tweak: impl Fn(&mut RawSettings),
    ) -> Vec<TestGateway> {
        Self::fleet_with(n, redis, |options| tweak(&mut options.raw)).await
    }

    /// As `fleet`, with each gateway's `Options` tweaked.
    pub async fn fleet_with(
        n: usize,
        redis: &str,
        tweak: impl Fn(&mut Options),
    ) -> Vec<TestGateway> {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tiergate.db");
        let mock = Arc::new(Mock::start().await);
        let prefix = format!(
            "fleet{}",
            std::process::id() as u64 * 1_000_000 + fleet_number()
        );
        let clock = Arc::new(ManualClock::starting_now());
        let postgres = PgDatabase::create().await.map(Arc::new);
        let mut gateways = Vec::new();
        for _ in 0..n {
            let raw = RawSettings {
                redis: Some(redis.to_string()),
                redis_prefix: Some(prefix.clone()),
                database: postgres.as_ref().map(|p| p.url.clone()),
                ..RawSettings::default()
            };
            let mut options = Options {
                raw,
                real_clock: true,
                ..Options::default()
            };
            tweak(&mut options);
            let mut gw = Self::boot(&db, mock.url.clone(), options, clock.clone()).await;
            gw.mock = Some(mock.clone());
            gw._postgres = postgres.clone();
            gateways.push(gw);
        }
        gateways[0]._dir = Some(dir);
        gateways
    }

    async fn boot(
        db: &std::path::Path,
        upstream: String,
        options: Options,
        clock: Arc<ManualClock>,
    ) -> TestGateway {
        let mut raw = options.raw;
        raw.listen = Some("127.0.0.1:0".into());
        if raw.database.is_none() {
            raw.database = Some(format!("sqlite://{}", db.display()));
        }
        raw.admin_token = options.admin_token;
        raw.upstream = RawUpstream {
            url: Some(upstream),
            ..raw.upstream
        };
        let mut config = Config::try_from(raw).unwrap();
        if let Some(redis) = config.redis.as_mut() {
            redis.time = options.redis_time;
        }
        if let Some(every) = options.ledger_flush {
            config.ledger_flush = every;
        }
        let app_clock: Arc<dyn Clock> = if options.real_clock {
            Arc::new(SystemClock)
        } else {
            clock.clone()
        };
        let app: App = tiergate::app(config, app_clock).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let admin = match options.admin_listener {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let admin_url = admin
            .as_ref()
            .map(|a| format!("http://{}", a.local_addr().unwrap()));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.serve_with_admin(listener, admin, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestGateway {
            url,
            admin_url,
            clock,
            client: Client::new(),
            db: db.to_path_buf(),
            stop: Some(stop),
            server: Some(server),
            _dir: None,
            _postgres: None,
            mock: None,
        }
    }

    /// Stops this gateway as a `SIGTERM` would (`App::shutdown`), and waits until it has.
    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.server.take().unwrap().await.unwrap();
    }

    /// Stops this gateway (flushing its ledger) and starts a new one on the same database.
    pub async fn restart(self) -> TestGateway {
        self.restart_with(Options::default()).await
    }

    /// As `restart`, the new gateway with `options` (another configuration).
    pub async fn restart_with(mut self, options: Options) -> TestGateway {
        self.stop.take().unwrap().send(()).unwrap();
        self.server.take().unwrap().await.unwrap();
        let upstream = self.mock.as_ref().unwrap().url.clone();
        let mut gw = Self::boot(&self.db, upstream, options, self.clock.clone()).await;
        gw._dir = self._dir.take();
        gw.mock = self.mock.take();
        gw
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Where the admin API and `/metrics` are served: the admin listener if any, else the main
    /// one.
    pub fn operator_url(&self) -> &str {
        self.admin_url.as_deref().unwrap_or(&self.url)
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.admin_as(ADMIN, method, path, body).await
    }

    /// An admin API call with `token`.
    pub async fn admin_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}/admin/v1{path}", self.operator_url()))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn put_tier(&self, name: &str, limits: Value) {
        let (s, v) = self
            .admin(
                reqwest::Method::PUT,
                &format!("/tiers/{name}"),
                Some(limits),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    /// A workspace on `tier` and a key for it.
    pub async fn workspace(&self, tier: &str) -> (i64, String) {
        let (s, ws) = self
            .admin(
                reqwest::Method::POST,
                "/workspaces",
                Some(json!({"name": "ws", "tier": tier})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{ws}");
        let id = ws["id"].as_i64().unwrap();
        (id, self.key(id).await)
    }

    pub async fn key(&self, workspace: i64) -> String {
        let (s, key) = self
            .admin(
                reqwest::Method::POST,
                &format!("/workspaces/{workspace}/keys"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{key}");
        key["key"].as_str().unwrap().to_string()
    }

    pub async fn post(
        &self,
        key: &str,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut req = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    pub async fn chat(&self, key: &str, body: Value, headers: &[(&str, &str)]) -> Response {
        self.post(key, "/v1/chat/completions", body, headers).await
    }

    pub async fn limits(&self, key: &str) -> Value {
        let r = self
            .client
            .get(format!("{}/v1/limits", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    /// The workspace's usage as the admin API shows it, with the ledger's figures exact
    /// (`/v1/limits` may show them up to about a second behind).
    pub async fn exact_usage(&self, key: &str) -> Value {
        let id = self.limits(key).await["workspace"]["id"].as_i64().unwrap();
        let (s, v) = self
            .admin(
                reqwest::Method::GET,
                &format!("/workspaces/{id}/usage"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// This month's settled tokens, once a settlement that happens after the answer (a stream
    /// whose client left) has landed; waits at most 3 s.
    pub async fn settled_month_tokens(&self, key: &str) -> u64 {
        let started = std::time::Instant::now();
        loop {
            let used = self.limits(key).await["usage"]["tokens_this_month"]
                .as_u64()
                .unwrap();
            if used > 0 || started.elapsed() > Duration::from_secs(3) {
                return used;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Requests the mock upstream has received so far.
    pub async fn upstream_count(&self) -> u64 {
        let url = format!("{}/mock/requests", self.mock.as_ref().unwrap().url);
        let v: Value = self
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["count"].as_u64().unwrap()
    }

    /// What this gateway's mock upstream saw of the requests sent with `x-mock-tag: tag`.
    pub async fn upstream_stats(&self, tag: &str) -> TagStats {
        self.mock.as_ref().unwrap().stats(tag).await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.operator_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The console's own script (`http::console::SCRIPT`), in every page's head.
pub const CONSOLE_SCRIPT: &str =
    "<script>addEventListener('pageshow',function(e){if(e.persisted){location.reload();}});\
addEventListener('submit',function(e){var f=e.target;if(f.dataset.sent){e.preventDefault();}else{f.dataset.sent='1';}});</script>";

/// A console page without its own script: what is left must hold no other.
pub fn without_own_script(page: &str) -> String {
    assert_eq!(
        page.matches(CONSOLE_SCRIPT).count(),
        1,
        "the console's script once: {page}"
    );
    page.replace(CONSOLE_SCRIPT, "")
}

/// A chat request with a fixed, short prompt.
pub fn hello() -> Value {
    json!({"model": "mistral-small-latest", "messages": [{"role": "user", "content": "Hello"}]})
}

pub fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

pub fn header_u64(r: &Response, name: &str) -> u64 {
    header(r, name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .parse()
        .unwrap()
}

/// Whether `body` has the gateway's error shape: the Mistral API's fields (a `type` and a
/// `message` that are not empty, `param` and `code`), and the same four again under `error`,
/// the OpenAI API's shape, which the openai SDKs read (README, "Errors").
pub fn is_error_shaped(body: &Value) -> bool {
    body["object"] == "error"
        && body["type"].as_str().is_some_and(|t| !t.is_empty())
        && body["message"].as_str().is_some_and(|m| !m.is_empty())
        && body.get("param").is_some()
        && body.get("code").is_some()
        && body["error"]
            == json!({
                "message": body["message"],
                "type": body["type"],
                "param": body["param"],
                "code": body["code"],
            })
}

/// Asserts a 429 of `kind` for `code`, and returns its body.
pub async fn expect_429(r: Response, kind: &str, code: &str) -> Value {
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = r.json().await.unwrap();
    assert!(is_error_shaped(&body), "{body}");
    assert_eq!(body["type"], kind, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["param"].is_null());
    body
}

/// Sends one request exactly as written (the path is not normalised, as an HTTP client library
/// would) on a connection of its own, and returns the answer's status and body. The request asks
/// for the connection to close, so the answer is read to its end (at most 10 s).
pub async fn raw_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    raw_exchange(base, request.as_bytes()).await
}

/// Sends `request`'s bytes as they are on a connection of its own (they should ask for the
/// connection to close), and returns the answer's status and body, read to its end (at most
/// 10 s).
pub async fn raw_exchange(base: &str, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut raw))
        .await
        .expect("the answer ends within 10 s")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (mut head, mut payload) = raw.split_once("\r\n\r\n").expect("a whole head");
    // Interim answers (`100 Continue`) come before the answer.
    while head.starts_with("HTTP/1.1 1") {
        (head, payload) = payload.split_once("\r\n\r\n").expect("a whole head");
    }
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut body = String::new();
        let mut rest = payload;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            body.push_str(&tail[..size]);
            rest = &tail[size + 2..];
        }
        body
    } else {
        payload.to_string()
    };
    (status, body)
}

/// Polls `check` every 20 ms until it holds; fails after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
