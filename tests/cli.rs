//! The admin CLI over the same store a gateway uses: each command as an operator types it.

use std::process::Command;

use serde_json::{json, Value};
use tiergate::model::{Actor, Overrides};

struct Cli {
    database: String,
    _dir: tempfile::TempDir,
}

impl Cli {
    fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let database = format!("sqlite://{}", dir.path().join("cli.db").display());
        Cli {
            database,
            _dir: dir,
        }
    }

    fn run(&self, args: &[&str]) -> Result<Value, String> {
        self.run_as(Some("carol"), args).map(|(v, _)| v)
    }

    /// Runs as the OS user `user` (none: `USER` and `LOGNAME` unset); the answer and stderr.
    fn run_as(&self, user: Option<&str>, args: &[&str]) -> Result<(Value, String), String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command
            .args(args)
            .env("TIERGATE_DATABASE", &self.database)
            .env_remove("TIERGATE_CONFIG")
            .env_remove("LOGNAME");
        match user {
            Some(u) => command.env("USER", u),
            None => command.env_remove("USER"),
        };
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok((serde_json::from_slice(&out.stdout).unwrap(), stderr))
        } else {
            Err(stderr)
        }
    }

    fn ok(&self, args: &[&str]) -> Value {
        self.run(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }
}

#[test]
fn workspaces_keys_and_tiers_from_the_command_line() {
    let cli = Cli::new();
    let tiers = cli.ok(&["tiers", "list"]);
    assert_eq!(
        tiers.as_array().unwrap().len(),
        6,
        "the default catalogue is seeded"
    );

    let tier = cli.ok(&[
        "tiers",
        "set",
        "gold",
        "--requests-per-second",
        "20",
        "--tokens-per-minute",
        "900",
        "--model-limit",
        "big:tokens_per_month=5",
    ]);
    // The admin API's object: the limits beside the name.
    assert_eq!(tier["models"]["big"]["tokens_per_month"], 5);
    assert_eq!(tier["name"], "gold");
    let err = cli
        .run(&["tiers", "set", "bad", "--tokens-per-minute", "0"])
        .unwrap_err();
    assert!(err.contains("tokens_per_minute"), "{err}");

    let ws = cli.ok(&["workspaces", "create", "acme", "--tier", "gold"]);
    let id = ws["id"].as_i64().unwrap().to_string();
    assert_eq!(ws["tier"], "gold");
    // The admin API's object, effective limits and RFC 3339 times included.
    assert_eq!(ws["limits"]["requests_per_second"], 20.0, "{ws}");
    assert_eq!(ws["limits"]["tokens_per_minute"], 900, "{ws}");
    assert!(ws["created_at"].as_str().unwrap().ends_with('Z'), "{ws}");
    for field in [
        "budget",
        "enforcement",
        "shadow",
        "shadowing",
        "shadow_limits",
    ] {
        assert!(ws.get(field).is_some(), "{field} missing: {ws}");
    }
    assert!(cli
        .run(&["workspaces", "create", "x", "--tier", "nope"])
        .is_err());

    let ws = cli.ok(&[
        "workspaces",
        "set",
        &id,
        "--limit",
        "tokens_per_minute=1234",
        "--status",
        "suspended",
    ]);
    assert_eq!(ws["overrides"]["tokens_per_minute"], 1234);
    assert_eq!(ws["status"], "suspended");
    let ws = cli.ok(&[
        "workspaces",
        "set",
        &id,
        "--limit",
        "tokens_per_minute=none",
        "--tier",
        "free",
    ]);
    assert_eq!(ws["overrides"], serde_json::json!({}));
    assert_eq!(ws["tier"], "free");
    let err = cli
        .run(&["workspaces", "set", &id, "--limit", "speed=3"])
        .unwrap_err();
    assert!(err.contains("speed"), "{err}");

    let key = cli.ok(&[
        "keys",
        "create",
        &id,
        "--name",
        "ci",
        "--expires-at",
        "2030-01-01T00:00:00Z",
    ]);
    assert!(key["key"].as_str().unwrap().starts_with("tg_"));
    let listed = cli.ok(&["keys", "list", &id]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        !listed.to_string().contains(key["key"].as_str().unwrap()),
        "secrets are never listed"
    );
    let revoked = cli.ok(&["keys", "revoke", &key["id"].to_string()]);
    assert!(
        revoked["revoked_at"].as_str().unwrap().ends_with('Z'),
        "{revoked}"
    );
    assert_eq!(revoked["limits"], serde_json::json!({}));

    assert_eq!(cli.ok(&["workspaces", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn serve_refuses_bad_settings_naming_the_field() {
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "sqlite::memory:",
        ])
        .env_remove("TIERGATE_UPSTREAM")
        .env_remove("TIERGATE_CONFIG")
        // A backtrace says nothing to whoever mistyped a setting: the message alone, one line.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream: required"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args([
            "serve",
            "--listen",
            "nowhere",
            "--upstream",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen:"));
}

/// A database that cannot be used at start is named by its own error, once: not the pool's
/// "timed out", and not the same words twice.
#[test]
fn serve_names_why_the_database_cannot_be_used() {
    let refused = format!("postgres://postgres@127.0.0.1:{}/test", free_port());
    let sqlite_dir = tempfile::tempdir().unwrap();
    let missing = format!("{}/no/such/dir/t.db", sqlite_dir.path().display());
    let missing_dir = format!("sqlite://{missing}");
    // SQLite says only "unable to open database file": the file is named, and why.
    let cannot_open =
        format!("the SQLite file {missing} cannot be opened: its directory must exist");
    for (database, want, cause) in [
        (refused.as_str(), "store: database unreachable: ", "refused"),
        (missing_dir.as_str(), "store: ", cannot_open.as_str()),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--upstream", "http://127.0.0.1:1", "--database", database])
            .env_remove("TIERGATE_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{database}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{err}");
        let message = line
            .strip_prefix("Error: ")
            .unwrap_or_else(|| panic!("{err}"));
        assert!(message.starts_with(want), "{err}");
        assert!(message.contains(cause), "{err}");
        assert!(!message.contains("pool timed out"), "{err}");
        // The cause is not repeated: "A: B: A: B" was printed before.
        let half = message.len() / 2;
        assert!(!message[half..].contains(&message[..half.min(40)]), "{err}");
    }
}

/// A URL that does not parse is shown with its password masked, as every other one is: the
/// message went to the service's journal with it (an outside audit).
#[test]
fn a_url_that_does_not_parse_is_shown_without_its_password() {
    for (flag, url) in [
        ("--upstream", "http://user:UPPASS-1@bad host"),
        ("--redis", "redis://u:REDISPASS-2@host:notaport"),
        ("--redis", "redis://a:1,redis://u:REDISPASS-3@h2:bad"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "sqlite::memory:",
        ]);
        if flag != "--upstream" {
            command.args(["--upstream", "http://127.0.0.1:1"]);
        }
        let out = command
            .args([flag, url])
            .env_remove("TIERGATE_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(":***@"), "{err}");
        assert!(!err.contains("PASS-"), "{err}");
    }
}

fn actions(log: &Value) -> Vec<(String, String)> {
    log.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn changes_through_the_cli_are_audited_under_the_os_user() {
    let cli = Cli::new();
    cli.ok(&["tiers", "set", "gold", "--requests-per-second", "20"]);
    let ws = cli.ok(&["workspaces", "create", "acme", "--tier", "gold"]);
    let id = ws["id"].as_i64().unwrap().to_string();
    cli.ok(&["workspaces", "set", &id, "--limit", "burst=4"]);
    let key = cli.ok(&["keys", "create", &id]);
    let secret = key["key"].as_str().unwrap().to_string();
    cli.ok(&["keys", "revoke", &key["id"].to_string()]);
    let (_, _) = cli
        .run_as(None, &["workspaces", "set", &id, "--status", "suspended"])
        .unwrap();

    // Two increase requests, made by the workspace (through the store, as the API would).
    let store = tiergate::store::open(&cli.database).await.unwrap();
    let asked = Overrides {
        requests_per_second: Some(30.0),
        burst: Some(40),
        ..Overrides::default()
    };
    let by = Actor::workspace(ws["id"].as_i64().unwrap());
    let mut requests = Vec::new();
    for use_case in ["launch", "more"] {
        let r = store
            .create_limit_request(
                ws["id"].as_i64().unwrap(),
                use_case,
                None,
                &asked,
                10,
                &by,
                0,
            )
            .await
            .unwrap();
        requests.push(r.id.to_string());
    }
    let pending = cli.ok(&["limit-requests", "list", "--status", "pending"]);
    assert_eq!(pending.as_array().unwrap().len(), 2);
    // An approval grants figures: `none` is refused, beside a figure too (it was dropped and
    // the rest approved: an outside audit), and a figure that does not read is named.
    for (limit, named) in [("burst=none", "'burst' is null"), ("burst=abc", "'burst'")] {
        let err = cli
            .run(&[
                "limit-requests",
                "approve",
                &requests[0],
                "--limit",
                limit,
                "--limit",
                "tokens_per_minute=3000",
            ])
            .unwrap_err();
        assert!(err.contains(named), "{limit}: {err}");
    }
    let pending = cli.ok(&["limit-requests", "list", "--status", "pending"]);
    assert_eq!(
        pending.as_array().unwrap().len(),
        2,
        "approved all the same"
    );
    let approved = cli.ok(&[
        "limit-requests",
        "approve",
        &requests[0],
        "--limit",
        "requests_per_second=25",
    ]);
    assert_eq!(
        approved["granted_limits"],
        serde_json::json!({"requests_per_second": 25.0})
    );
    let err = cli
        .run(&["limit-requests", "deny", &requests[1], "--reason", " "])
        .unwrap_err();
    assert!(err.contains("reason"), "{err}");
    let denied = cli.ok(&["limit-requests", "deny", &requests[1], "--reason", "later"]);
    assert_eq!(denied["status"], "denied");
    let err = cli
        .run(&["limit-requests", "approve", &requests[1]])
        .unwrap_err();
    assert!(err.contains("already denied"), "{err}");

    let log = cli.ok(&["audit"]);
    let ws_actor = format!("workspace:{id}");
    let expected: Vec<(String, String)> = [
        ("cli:carol", "limit_request.deny"),
        ("cli:carol", "limit_request.approve"),
        (ws_actor.as_str(), "limit_request.create"),
        (ws_actor.as_str(), "limit_request.create"),
        ("cli", "workspace.update"),
        ("cli:carol", "key.revoke"),
        ("cli:carol", "key.create"),
        ("cli:carol", "workspace.update"),
        ("cli:carol", "workspace.create"),
        ("cli:carol", "tier.put"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(actions(&log), expected);
    assert!(!log.to_string().contains(&secret), "never a key's secret");
    assert_eq!(log[7]["after"]["overrides"]["burst"], 4);

    // Filters and pages.
    assert_eq!(
        cli.ok(&["audit", "--actor", "cli"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let revokes = cli.ok(&["audit", "--action", "key.revoke"]);
    assert_eq!(revokes[0]["target"], format!("key:{}", key["id"]));
    let on_ws = cli.ok(&["audit", "--workspace", &id]);
    assert_eq!(on_ws.as_array().unwrap().len(), 9, "all but the tier");
    let (page, more) = cli
        .run_as(Some("carol"), &["audit", "--limit", "3"])
        .unwrap();
    assert_eq!(page.as_array().unwrap().len(), 3);
    let after = page[2]["id"].to_string();
    assert!(more.contains(&format!("--after {after}")), "{more}");
    let next = cli.ok(&["audit", "--limit", "3", "--after", &after]);
    assert_eq!(
        next[0]["id"].as_i64().unwrap(),
        page[2]["id"].as_i64().unwrap() - 1
    );
    for bad in [
        vec!["audit", "--limit", "0"],
        vec!["audit", "--action", "drop"],
        vec!["audit", "--from", "yesterday"],
    ] {
        assert!(cli.run(&bad).is_err(), "{bad:?}");
    }
}

/// A child process that is killed when this is dropped, also when the test fails.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn serve_with_an_admin_listener_keeps_the_admin_api_off_the_main_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (main, admin) = (free_port(), free_port());
    let token = "cli-admin-token-0123456789";
    let _server = Running(
        Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{main}"),
                "--upstream",
                "http://127.0.0.1:1",
                "--database",
                &format!("sqlite://{}", dir.path().join("t.db").display()),
            ])
            .env("TIERGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("TIERGATE_ADMIN_TOKEN", token)
            .env_remove("TIERGATE_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    while client
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "not up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let get = |port: u16, path: &str| {
        client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .bearer_auth(token)
            .send()
    };
    let on_main = get(main, "/admin/v1/workspaces").await.unwrap();
    assert_eq!(on_main.status(), reqwest::StatusCode::NOT_FOUND);
    let body: Value = on_main.json().await.unwrap();
    assert_eq!(body["type"], "not_found");
    assert_eq!(
        get(main, "/metrics").await.unwrap().status(),
        reqwest::StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(admin, "/admin/v1/workspaces").await.unwrap().status(),
        reqwest::StatusCode::OK
    );
    assert_eq!(
        get(admin, "/metrics").await.unwrap().status(),
        reqwest::StatusCode::OK
    );
    assert_eq!(
        get(main, "/healthz").await.unwrap().status(),
        reqwest::StatusCode::OK
    );
}

/// `tiergate config check FILE`: the effective settings, defaults filled in, secrets masked;
/// a bad field is refused by name.
/// `tiergate config check FILE` with `env` set, and without the variables of the machine that
/// would change what it reads (`TIERGATE_CONFIG`, `TIERGATE_REDIS`).
fn config_check(file: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["config", "check"])
        .arg(file)
        .env_remove("TIERGATE_CONFIG")
        .env_remove("TIERGATE_REDIS")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn config_check_prints_the_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiergate.toml");
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/ca.pem");
    std::fs::write(
        &file,
        format!(
            r#"
listen = "0.0.0.0:9000"
database = "postgres://tg:hunter2-db-password@db:5432/tiergate"
admin_token = "admin-secret-token-0123456789"
redis = "redis://:hunter3-redis-password@10.0.0.5:6379/0"
instances = 3
rate_limit_headers = ["openai", "mistral"]
log_format = "json"

[upstream]
url = "https://api.mistral.ai"
api_key = "sk-upstream-secret-key"
ca_file = "{ca}"

[tiers.pro]
requests_per_second = 20
tokens_per_minute = 2000000
[tiers.pro.models."mistral-large-latest"]
tokens_per_minute = 100000
"#
        ),
    )
    .unwrap();
    let out = config_check(
        &file,
        &[
            ("TIERGATE_SHUTDOWN_GRACE_MS", "15000"),
            // A misspelt setting is named, not silently ignored.
            ("TIERGATE_REDIS_TIMEOUT", "100"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("TIERGATE_REDIS_TIMEOUT is not a setting"),
        "{stderr}"
    );
    assert!(!stderr.contains("TIERGATE_SHUTDOWN_GRACE_MS"), "{stderr}");
    assert!(!stderr.contains("upstream is not set"), "{stderr}");
    for secret in [
        "hunter2-db-password",
        "hunter3-redis-password",
        "admin-secret-token-0123456789",
        "sk-upstream-secret-key",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    for expected in [
        "listen = \"0.0.0.0:9000\"",
        "database = \"postgres://tg:***@db:5432/tiergate\"",
        "redis = \"redis://:***@10.0.0.5:6379/0\"",
        "redis_failure_policy = \"local\"",
        // The environment counts, as for serve.
        "shutdown_grace_ms = 15000",
        // Defaults are filled in.
        "body_read_timeout_ms = 60000",
        "rate_limit_headers = [\"openai\", \"mistral\"]",
        "log_format = \"json\"",
        "api_key = \"***\"",
        "url = \"https://api.mistral.ai/\"",
        // Every setting given is printed, with what it applies to.
        "instances = 3\n",
        &format!("ca_file = \"{ca}\"\n"),
        "[tiers.pro]",
        "requests_per_second = 20.0",
        "[tiers.pro.models.mistral-large-latest]",
        // The built-in free tier is part of the effective catalogue.
        "[tiers.free]",
    ] {
        assert!(stdout.contains(expected), "{expected} missing:\n{stdout}");
    }
    // What it prints is itself a configuration file tiergate reads.
    let reread: tiergate::RawSettings = toml::from_str(&stdout).unwrap();
    assert_eq!(reread.listen.as_deref(), Some("0.0.0.0:9000"));
    assert_eq!(
        reread.tiers["pro"].limits.models["mistral-large-latest"].tokens_per_minute,
        Some(100000)
    );
    assert_eq!(reread.upstream.ca_file.as_deref(), Some(ca));
    assert_eq!(reread.instances, Some(3));

    std::fs::write(&file, "log_format = \"yaml\"\n").unwrap();
    let out = config_check(&file, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("log_format") && stderr.contains("'yaml'"),
        "{stderr}"
    );

    // `instances` without `redis` applies to nothing: said on stderr and in the file, not
    // dropped silently.
    std::fs::write(&file, "instances = 3\n").unwrap();
    let out = config_check(&file, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: instances = 3 is ignored: it applies only with redis"),
        "{stderr}"
    );
    assert!(
        stdout.contains("# instances = 3: ignored, it applies only with redis\n"),
        "{stdout}"
    );
    // No upstream here: serve would refuse to start, unless given it by a flag.
    assert!(
        stderr.contains("warning: upstream is not set: serve refuses to start without it"),
        "{stderr}"
    );
    let reread: tiergate::RawSettings = toml::from_str(&stdout).unwrap();
    assert_eq!(reread.instances, None);
}

/// A SQLite URL that names no file is refused by name: it used to pass, and `serve` then failed
/// on "no such table: tiers" (each connection its own empty temporary database).
#[test]
fn a_sqlite_url_without_a_path_is_refused_naming_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiergate.toml");
    std::fs::write(&file, "").unwrap();
    for url in ["sqlite://", "sqlite:", "sqlite://   ", "sqlite://?mode=rwc"] {
        let out = config_check(&file, &[("TIERGATE_DATABASE", url)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(
            stderr.contains(&format!("database: '{url}' names no file")),
            "{url}: {stderr}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--upstream", "http://127.0.0.1:1", "--database", url])
            .env_remove("TIERGATE_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(stderr.contains("database: "), "{url}: {stderr}");
        assert!(!stderr.contains("no such table"), "{url}: {stderr}");
    }
}

/// An invalid `TIERGATE_LOG` is refused at start by name, as any invalid setting is; it used to
/// be ignored for the default level.
#[test]
fn an_invalid_log_filter_is_refused_naming_tiergate_log() {
    // A `serve` that starts in spite of it runs until stopped: it is given 30 s.
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args([
            "--upstream",
            "http://127.0.0.1:1",
            "--database",
            "sqlite::memory:",
        ])
        .env_remove("TIERGATE_CONFIG")
        .env("TIERGATE_LOG", "bogus=[[[")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while serve.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            serve.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = serve.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("Error: TIERGATE_LOG: 'bogus=[[[' is not a log filter"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // The admin commands read it too.
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("t.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["workspaces", "list", "--database", &database])
        .env_remove("TIERGATE_CONFIG")
        .env("TIERGATE_LOG", "bogus=[[[")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TIERGATE_LOG: "), "{stderr}");
    // A valid one starts as before.
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["workspaces", "list", "--database", &database])
        .env_remove("TIERGATE_CONFIG")
        .env("TIERGATE_LOG", "info,tiergate::access=off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sqlx's parser warns of a connection option it does not know with its value; a database URL's
/// `sslpassword` reached the log whole whenever `TIERGATE_LOG` was set (an outside audit).
#[test]
fn a_database_url_s_sslpassword_reaches_no_log_at_any_filter() {
    // The URL is parsed before the connection is tried: a closed port is enough.
    let url = "postgres://u@127.0.0.1:1/x?sslpassword=SSLPW-SECRET-7&connect_timeout=1";
    for filter in [
        None,
        Some("info"),
        Some("trace"),
        Some("sqlx_postgres=trace"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command
            .args(["workspaces", "list", "--database", url])
            .env_remove("TIERGATE_CONFIG")
            .env_remove("TIERGATE_LOG");
        if let Some(f) = filter {
            command.env("TIERGATE_LOG", f);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{filter:?}: {stderr}");
        assert!(stderr.contains("database"), "{filter:?}: {stderr}");
        assert!(!stderr.contains("SSLPW-SECRET-7"), "{filter:?}: {stderr}");
    }
}

/// A ladder set from the command line: a tier's promotion, a workspace's attributes (which
/// promote it at once when they make it qualify), and the pin that holds one.
#[test]
fn promotion_from_the_command_line() {
    let cli = Cli::new();
    let tier = cli.ok(&[
        "tiers",
        "set",
        "starter",
        "--rank",
        "0",
        "--tokens-per-minute",
        "1000",
        "--promote-to",
        "tier-2",
        "--min-attribute",
        "paid_usd=50",
        "--min-attribute",
        "verified=true",
    ]);
    assert_eq!(tier["rank"], 0);
    assert_eq!(tier["promotion"]["to"], "tier-2");
    assert_eq!(
        tier["promotion"]["min_attributes"],
        json!({"paid_usd": 50.0, "verified": true})
    );
    // Down the ladder: refused.
    let e = cli
        .run(&["tiers", "set", "top", "--rank", "9", "--promote-to", "free"])
        .unwrap_err();
    assert!(e.contains("promotion.to"), "{e}");

    let held = cli.ok(&["workspaces", "create", "held", "--tier", "starter"]);
    let held = held["id"].to_string();
    let pinned = cli.ok(&["workspaces", "set", &held, "--pinned", "true"]);
    assert_eq!(pinned["pinned"], true);
    let ws = cli.ok(&["workspaces", "create", "acme", "--tier", "starter"]);
    let id = ws["id"].to_string();
    let short = cli.ok(&[
        "workspaces",
        "attributes",
        &id,
        "paid_usd=10",
        "verified=true",
    ]);
    assert_eq!(short["tier"], "starter");
    let promoted = cli.ok(&[
        "workspaces",
        "attributes",
        &id,
        "paid_usd=50",
        "verified=true",
    ]);
    assert_eq!(promoted["tier"], "tier-2", "{promoted}");
    assert_eq!(promoted["promoted"]["from"], "starter");
    let still = cli.ok(&[
        "workspaces",
        "attributes",
        &held,
        "paid_usd=500",
        "verified=true",
    ]);
    assert_eq!(still["tier"], "starter");
    let cleared = cli.ok(&["workspaces", "attributes", &held, "none"]);
    assert_eq!(cleared["attributes"], json!({}));
    assert!(cli
        .run(&["workspaces", "attributes", &id, "plan=gold"])
        .unwrap_err()
        .contains("plan=gold"));
    // Nothing given is a mistake, not "no attributes" (that is `none`): refused, and the
    // attributes kept.
    cli.ok(&["workspaces", "attributes", &held, "paid_usd=7"]);
    assert!(cli
        .run(&["workspaces", "attributes", &held])
        .unwrap_err()
        .contains("NAME=VALUE"));
    assert!(cli
        .run(&["workspaces", "attributes", &held, "none", "paid_usd=1"])
        .unwrap_err()
        .contains("stands alone"));
    let kept = cli.ok(&["workspaces", "list"]);
    let kept = kept
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == held.parse::<i64>().unwrap())
        .unwrap();
    assert_eq!(kept["attributes"]["paid_usd"].as_f64(), Some(7.0), "{kept}");
}

#[test]
fn a_key_s_limits_are_set_and_cleared_from_the_command_line() {
    let cli = Cli::new();
    cli.ok(&[
        "tiers",
        "set",
        "gold",
        "--requests-per-second",
        "20",
        "--tokens-per-minute",
        "900",
    ]);
    let ws = cli.ok(&["workspaces", "create", "acme", "--tier", "gold"]);
    let ws = ws["id"].as_i64().unwrap().to_string();
    let key = cli.ok(&["keys", "create", &ws]);
    let id = key["id"].as_i64().unwrap().to_string();

    let set = cli.ok(&[
        "keys",
        "limits",
        &id,
        "--requests-per-second",
        "2.5",
        "--burst",
        "3",
        "--tokens-per-minute",
        "500",
        "--tokens-per-month",
        "100000",
    ]);
    let limits = json!({"requests_per_second": 2.5, "burst": 3, "tokens_per_minute": 500, "tokens_per_month": 100000});
    assert_eq!(set["limits"], limits);
    assert_eq!(cli.ok(&["keys", "list", &ws])[0]["limits"], limits);
    // Replaced whole: a limit left out is none.
    let set = cli.ok(&["keys", "limits", &id, "--tokens-per-minute", "400"]);
    assert_eq!(set["limits"], json!({"tokens_per_minute": 400}));

    // Above the workspace's, invalid, or contradictory: refused, naming the field; nothing
    // changed.
    for (args, field) in [
        (&["--tokens-per-minute", "901"][..], "tokens_per_minute"),
        (&["--requests-per-second", "21"][..], "requests_per_second"),
        (&["--tokens-per-month", "0"][..], "tokens_per_month"),
        (&["--burst", "2"][..], "requests-per-second"),
        (&["--clear", "--tokens-per-minute", "5"][..], "--clear"),
        (&[][..], "--clear"),
    ] {
        let mut command = vec!["keys", "limits", id.as_str()];
        command.extend_from_slice(args);
        let err = cli.run(&command).unwrap_err();
        assert!(err.contains(field), "{args:?}: {err}");
    }
    assert_eq!(
        cli.ok(&["keys", "list", &ws])[0]["limits"],
        json!({"tokens_per_minute": 400})
    );
    assert!(cli
        .run(&["keys", "limits", "999", "--clear"])
        .unwrap_err()
        .contains("no key 999"));

    let cleared = cli.ok(&["keys", "limits", &id, "--clear"]);
    assert_eq!(cleared["limits"], json!({}));
    // As the admin API lists it: `{}`, no limits of its own.
    assert_eq!(cli.ok(&["keys", "list", &ws])[0]["limits"], json!({}));
    let log = cli.ok(&["audit", "--action", "key.limits"]);
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|e| e["actor"] == "cli:carol"), "{log:?}");
}

/// A reader that goes away (`tiergate tiers list | head -0`) ends the CLI as it ends other
/// command-line tools, by SIGPIPE, not with a panic (an outside audit saw `failed printing to
/// stdout: Broken pipe` and status 101).
#[test]
fn a_reader_that_leaves_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let cli = Cli::new();
    cli.ok(&["tiers", "list"]);
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["tiers", "list"])
            .env("TIERGATE_DATABASE", &cli.database)
            .env_remove("TIERGATE_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the command, which first opens its database, prints.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{:?}: {stderr}",
            out.status
        );
    }
}

/// The container image's settings file (the Dockerfile's `TIERGATE_CONFIG`) is valid and says
/// what the README says the image does; the image sets no variable that would override a file
/// mounted in its place (an outside audit: `TIERGATE_LISTEN` and `TIERGATE_DATABASE` did).
#[test]
fn the_container_s_settings_are_a_file_a_mounted_one_can_replace() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = config_check(&root.join("deploy/container.toml"), &[]);
    assert!(out.status.success(), "{out:?}");
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(
        effective.contains("listen = \"0.0.0.0:8080\""),
        "{effective}"
    );
    assert!(
        effective.contains("database = \"sqlite:///var/lib/tiergate/tiergate.db\""),
        "{effective}"
    );
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("COPY deploy/container.toml /etc/tiergate/tiergate.toml"));
    assert!(dockerfile.contains("ENV TIERGATE_CONFIG=/etc/tiergate/tiergate.toml"));
    let settings: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("TIERGATE_") && !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with("TIERGATE_") && w.contains('='))
        .collect();
    assert_eq!(settings, ["TIERGATE_CONFIG=/etc/tiergate/tiergate.toml"]);
}

/// Without Redis, one gateway process serves a SQLite file: a second `serve` on it is refused
/// at start, naming the claim (an outside audit: two ran on one file, each enforcing the whole
/// limits, and admitted 6 of 8 requests where 3 were allowed). The admin commands still run
/// beside it, and once the first has stopped, another starts.
#[tokio::test]
async fn a_second_gateway_on_one_sqlite_file_without_redis_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("t.db").display());
    let serve = |port: u16| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        c.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", "http://127.0.0.1:1", "--database", &database])
            .env_remove("TIERGATE_CONFIG")
            .env_remove("TIERGATE_REDIS");
        c
    };
    let up = |port: u16| async move {
        let started = std::time::Instant::now();
        while reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "not up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let first_port = free_port();
    let first = Running(
        serve(first_port)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    up(first_port).await;

    let second = serve(free_port()).output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another tiergate process serves"), "{err}");
    assert!(err.contains("t.db.serving"), "{err}");

    let listed = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["workspaces", "list", "--database", &database])
        .env_remove("TIERGATE_CONFIG")
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");

    drop(first);
    let third_port = free_port();
    let _third = Running(
        serve(third_port)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    up(third_port).await;
}

/// Ids are whole numbers above 0 on the command line as in the admin API (an outside audit:
/// `audit --workspace 0` printed `[]`, `workspaces set 0` said there was no workspace 0).
#[test]
fn ids_below_one_are_refused_as_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("t.db").display());
    for args in [
        vec!["audit", "--workspace", "0"],
        vec!["audit", "--after", "0"],
        vec!["workspaces", "set", "0", "--tier", "free"],
        vec!["keys", "revoke", "0"],
        vec!["limit-requests", "approve", "0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(&args)
            .args(["--database", &database])
            .env_remove("TIERGATE_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value"), "{args:?}: {err}");
    }
}
