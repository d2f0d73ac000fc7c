//! The admin CLI over the same store a gateway uses: each command as an operator types it.

use std::process::Command;

use serde_json::Value;

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
        let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(args)
            .env("TIERGATE_DATABASE", &self.database)
            .env_remove("TIERGATE_CONFIG")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
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
    assert_eq!(tier["limits"]["models"]["big"]["tokens_per_month"], 5);
    let err = cli
        .run(&["tiers", "set", "bad", "--tokens-per-minute", "0"])
        .unwrap_err();
    assert!(err.contains("tokens_per_minute"), "{err}");

    let ws = cli.ok(&["workspaces", "create", "acme", "--tier", "gold"]);
    let id = ws["id"].as_i64().unwrap().to_string();
    assert_eq!(ws["tier"], "gold");
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
    assert!(revoked["revoked_at"].is_number());

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
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream: required"), "{err}");

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
