//! Helpers for the tests that run against the real Postgres on this machine: a database of its
//! own per test, a TCP proxy that can cut the line to it, and a gateway served in-process on
//! any database URL.
//!
//! Postgres is found at `TIERGATE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it cannot be reached, a test fails if `CI` is
//! set, and otherwise is skipped with a loud message.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use sqlx::Connection;
use tiergate::clock::ManualClock;
use tiergate::config::{RawSettings, RawUpstream};
use tiergate::mock_upstream::{self, MockConfig};
use tiergate::store::redact;
use tiergate::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const ADMIN: &str = "test-admin-token-0123456789";

pub fn postgres_url() -> String {
    std::env::var("TIERGATE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.to_string())
}

/// A fresh database for one test, dropped when this is dropped (also when the test fails).
pub struct PgDatabase {
    pub url: String,
    name: String,
    server: String,
}

impl PgDatabase {
    /// `None` when Postgres is unreachable and `CI` is not set (after saying so loudly).
    /// Panics when it is unreachable and `CI` is set: there, a skipped test would hide a gap.
    pub async fn create() -> Option<PgDatabase> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let server = postgres_url();
        let name = format!(
            "tiergate_test_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect(&server),
        )
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!(
                    "CI is set and Postgres at {} cannot be reached: {e}",
                    redact(&server)
                )
            }
            Err(e) => {
                eprintln!(
                    "\n!!!! SKIPPED: Postgres at {} cannot be reached ({e}).\n!!!! Start it or set TIERGATE_TEST_POSTGRES; with CI set this test fails.\n",
                    redact(&server)
                );
                return None;
            }
        };
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let mut url = Url::parse(&server).unwrap();
        url.set_path(&name);
        Some(PgDatabase {
            url: url.to_string(),
            name,
            server,
        })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        let url = Url::parse(&self.url).unwrap();
        let host = url.host_str().unwrap();
        let port = url.port().unwrap_or(5432);
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .unwrap()
            .next()
            .unwrap()
    }

    /// This database's URL through `proxy`.
    pub fn url_via(&self, proxy: &Proxy) -> String {
        let mut url = Url::parse(&self.url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.addr.port())).unwrap();
        url.to_string()
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside a runtime: use a thread with its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut conn = sqlx::PgConnection::connect(&server).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await?;
                    conn.close().await
                })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// What the proxy does with the line to Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// Passes bytes both ways.
    Up,
    /// As if Postgres were stopped: open connections are closed, new ones closed at once.
    Down,
    /// As if the network dropped every packet: connections stay open, nothing passes.
    Silent,
    /// Passes both ways until a connection sends a statement whose SQL holds this text and then
    /// executes it: from then on what it sends still reaches Postgres but nothing comes back, so
    /// the statement runs (and commits) while its client times out not knowing it did.
    DeafAfter(&'static str),
    /// Passes both ways until a connection sends a statement whose SQL holds this text and then
    /// its `COMMIT`: from then on nothing comes back, so the change is committed while its client
    /// never hears that it was.
    DeafAtCommitAfter(&'static str),
}

/// A TCP proxy in front of Postgres whose line can be cut.
pub struct Proxy {
    pub addr: SocketAddr,
    line: watch::Sender<Line>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (line, watching) = watch::channel(Line::Up);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(carry(client, target, watching.clone()));
            }
        });
        Proxy { addr, line, task }
    }

    pub fn set(&self, line: Line) {
        self.line.send_replace(line);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Line::Down);
    }
}

async fn carry(client: TcpStream, target: SocketAddr, mut line: watch::Receiver<Line>) {
    let now = *line.borrow_and_update();
    match now {
        Line::Down => return,
        Line::Silent => {
            let _ = line.wait_for(|l| *l != Line::Silent).await;
            return;
        }
        Line::Up | Line::DeafAfter(_) | Line::DeafAtCommitAfter(_) => {}
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let deaf = std::sync::atomic::AtomicBool::new(false);
    // Towards Postgres: passes while the line is up.
    let mut towards = line.clone();
    let to_server = async {
        let mut seen = false;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = *towards.borrow_and_update();
            match now {
                Line::Up => {}
                Line::DeafAfter(text) => {
                    let chunk = &buf[..n];
                    if chunk.windows(text.len()).any(|w| w == text.as_bytes()) {
                        seen = true;
                    }
                    // An Execute message of the unnamed portal: 'E', length 9, "", 0 rows.
                    const EXECUTE: &[u8] = &[b'E', 0, 0, 0, 9, 0];
                    if seen && chunk.windows(EXECUTE.len()).any(|w| w == EXECUTE) {
                        deaf.store(true, Ordering::SeqCst);
                    }
                }
                Line::DeafAtCommitAfter(text) => {
                    let chunk = &buf[..n];
                    if chunk.windows(text.len()).any(|w| w == text.as_bytes()) {
                        seen = true;
                    } else if seen && chunk.windows(6).any(|w| w == b"COMMIT") {
                        deaf.store(true, Ordering::SeqCst);
                    }
                }
                Line::Silent | Line::Down => return,
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Back to the client: passes while the line is up, and is dropped once deaf.
    let mut back = line.clone();
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = *back.borrow_and_update();
            let passes = match now {
                Line::Up => true,
                Line::DeafAfter(_) | Line::DeafAtCommitAfter(_) => !deaf.load(Ordering::SeqCst),
                Line::Silent | Line::Down => return,
            };
            if passes && client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let cut = tokio::select! {
        _ = async { tokio::join!(to_server, to_client) } => None,
        changed = line.wait_for(|l| matches!(l, Line::Down | Line::Silent)) => {
            Some(changed.map_or(Line::Down, |l| *l))
        }
    };
    if cut == Some(Line::Silent) {
        // Hold both ends open, passing nothing, until the line changes again.
        let _ = line.wait_for(|l| *l != Line::Silent).await;
    }
}

/// A gateway served in-process on port 0 over `database`, in front of the mock upstream.
pub struct Gateway {
    pub url: String,
    pub clock: Arc<ManualClock>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tiergate::AppError>>>,
    mock_stop: Option<oneshot::Sender<()>>,
}

impl Gateway {
    pub async fn start(database: &str, clock: Arc<ManualClock>) -> Gateway {
        let mock = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock_url = format!("http://{}", mock.local_addr().unwrap());
        let (mock_stop, mock_stopped) = oneshot::channel::<()>();
        tokio::spawn(mock_upstream::serve(mock, MockConfig::default(), async {
            let _ = mock_stopped.await;
        }));
        let raw = RawSettings {
            listen: Some("127.0.0.1:0".into()),
            database: Some(database.to_string()),
            admin_token: Some(ADMIN.to_string()),
            upstream: RawUpstream {
                url: Some(mock_url),
                ..RawUpstream::default()
            },
            ..RawSettings::default()
        };
        let app = tiergate::app(Config::try_from(raw).unwrap(), clock.clone())
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.serve(listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Gateway {
            url,
            clock,
            client: reqwest::Client::new(),
            stop: Some(stop),
            server: Some(server),
            mock_stop: Some(mock_stop),
        }
    }

    /// Stops serving and flushes the ledger.
    pub async fn stop(self) {
        self.stopped().await.unwrap();
    }

    /// Stops serving and flushes the ledger; answers how the gateway stopped (an error is what
    /// makes the binary exit 1).
    pub async fn stopped(mut self) -> Result<(), tiergate::AppError> {
        self.stop.take().unwrap().send(()).unwrap();
        self.server.take().unwrap().await.unwrap()
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut req = self
            .client
            .request(method, format!("{}/admin/v1{path}", self.url))
            .bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn chat(&self, key: &str) -> reqwest::StatusCode {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(&serde_json::json!({
                "model": "mistral-small-latest",
                "messages": [{"role": "user", "content": "Hello there"}],
            }))
            .send()
            .await
            .unwrap()
            .status()
    }

    /// `GET /v1/limits` with `key`: the status and the body.
    pub async fn limits(&self, key: &str) -> (reqwest::StatusCode, serde_json::Value) {
        let r = self
            .client
            .get(format!("{}/v1/limits", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or_default())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.mock_stop.take() {
            let _ = s.send(());
        }
    }
}
