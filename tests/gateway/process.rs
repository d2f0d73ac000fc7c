//! `tiergate serve` as a child process of its own, so that a test can kill it (SIGKILL) or stop
//! it (SIGTERM) as an operator or the OS would; and a way to read its SQLite ledger afterwards.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::harness::ADMIN;

pub struct Process {
    child: Child,
    pub url: String,
}

impl Process {
    /// `tiergate serve` on a free loopback port over `database`, in front of `upstream`, with
    /// the harness's admin token and `args` (more flags); returns once `/healthz` answers.
    pub async fn start(database: &str, upstream: &str, args: &[&str]) -> Process {
        Process::start_with_env(database, upstream, args, &[]).await
    }

    /// `start`, with `env` (name, value) set for the child only.
    pub async fn start_with_env(
        database: &str,
        upstream: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", database, "--upstream", upstream])
            .args(["--admin-token", ADMIN])
            .args(args)
            .env("TIERGATE_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let client = Client::new();
        let started = Instant::now();
        loop {
            let up = client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if up {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "tiergate serve did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Process { child, url }
    }

    /// SIGKILL, as a crash would: nothing is flushed.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, as an operator's stop would.
    pub fn terminate(&self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// Waits for the process to exit, for at most `within`.
    pub async fn exited(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "the gateway did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ledger's totals for `workspace` in the SQLite file at `path`, all days and models:
/// (requests, tokens).
pub async fn ledger_totals(path: &std::path::Path, workspace: i64) -> (u64, u64) {
    let url = format!("sqlite://{}?mode=ro", path.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let (requests, tokens): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0) FROM usage_daily WHERE workspace_id = ?",
    )
    .bind(workspace)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    (requests as u64, tokens as u64)
}

/// An admin API call on a `Process`, which must succeed; its JSON answer.
pub async fn admin(url: &str, method: reqwest::Method, path: &str, body: Value) -> Value {
    let r = Client::new()
        .request(method, format!("{url}/admin/v1{path}"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// A workspace on a roomy tier, and a key: (id, key).
pub async fn workspace(url: &str, name: &str) -> (i64, String) {
    admin(
        url,
        reqwest::Method::PUT,
        "/tiers/roomy",
        json!({"requests_per_second": 10_000, "tokens_per_minute": 100_000_000,
               "tokens_per_month": 1_000_000_000}),
    )
    .await;
    let ws = admin(
        url,
        reqwest::Method::POST,
        "/workspaces",
        json!({"name": name, "tier": "roomy"}),
    )
    .await;
    let id = ws["id"].as_i64().unwrap();
    let key = admin(
        url,
        reqwest::Method::POST,
        &format!("/workspaces/{id}/keys"),
        json!({}),
    )
    .await;
    (id, key["key"].as_str().unwrap().to_string())
}
