//! `tiergate demo` as a user runs it: the binary starts, prints a curl line that works, the free
//! tier answers a fast repeat with 429, and Ctrl-C stops it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a demo run printed: its curl line, console URL and admin token.
struct Printed {
    curl: String,
    console: String,
    admin_token: String,
}

/// Starts `tiergate demo` on `dir` and reads its instructions.
fn launch(dir: &std::path::Path) -> (std::process::Child, Printed) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut curl = None;
    let mut console = None;
    let mut admin_token = None;
    while curl.is_none() || console.is_none() || admin_token.is_none() {
        let line = rx
            .recv_timeout(deadline - Instant::now())
            .expect("demo printed its instructions");
        if line.trim_start().starts_with("curl -i ") {
            curl = Some(line.trim().to_string());
        }
        if let Some(url) = line.strip_prefix("Console:     ") {
            console = Some(url.split_whitespace().next().unwrap().to_string());
        }
        if line.starts_with("Admin API:") {
            let token = line
                .split("Bearer ")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            admin_token = Some(token.to_string());
        }
    }
    let printed = Printed {
        curl: curl.unwrap(),
        console: console.unwrap(),
        admin_token: admin_token.unwrap(),
    };
    (child, printed)
}

/// Stops a demo with SIGINT, as Ctrl-C does, and checks that it exits cleanly within 10 s.
fn interrupt(child: &mut std::process::Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "demo exited with {exit}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "demo did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn the_demo_serves_the_printed_curl_line_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, printed) = launch(dir.path());
    let Printed {
        curl,
        console,
        admin_token,
    } = printed;

    // Take the URL, key and body out of the printed command.
    let url = curl.split_whitespace().nth(2).unwrap().to_string();
    let key = curl
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let body = curl
        .split("-d '")
        .nth(1)
        .unwrap()
        .trim_end_matches('\'')
        .to_string();

    let client = reqwest::Client::new();
    let send = || {
        client
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    let ok = send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-limit-requests"], "1");
    assert!(ok.headers().contains_key("x-ratelimit-remaining-tokens"));
    let v: serde_json::Value = ok.json().await.unwrap();
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let denied = send().await.unwrap();
    assert_eq!(denied.status(), 429);
    assert!(denied.headers().contains_key("retry-after"));

    // The printed admin token opens the admin API (the console's operator pages take it too).
    let workspaces = client
        .get(url.replace("/v1/chat/completions", "/admin/v1/workspaces"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(workspaces.status(), 200);

    // The console signs in with the printed key and shows the demo workspace's tier.

    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = browser
        .post(format!("{console}/sign-in"))
        .form(&[("key", key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = browser
        .get(format!("{console}/workspace"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<strong id=\"tier\">free</strong>"));

    // The printed admin token signs in to the operator's pages, which list the demo workspace.
    let signed = browser
        .post(format!("{console}/sign-in"))
        .form(&[("key", admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    assert_eq!(signed.headers()["location"], "/console/operator/workspaces");
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = browser
        .get(format!("{console}/operator/workspaces"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(page.contains("data-workspace-id="), "{page}");
    assert!(page.contains(">demo</a>"), "{page}");

    interrupt(&mut child);
}

/// A second run prints a new key and revokes the first run's, whose secret was shown once: a
/// demo leaves one live key (an outside audit found every run's key still working).
#[tokio::test]
async fn a_second_demo_run_revokes_the_first_run_s_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_of = |curl: &str| {
        curl.split("Bearer ")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string()
    };
    let limits_of = |curl: &str| {
        let url = curl.split_whitespace().nth(2).unwrap().to_string();
        url.replace("/chat/completions", "/limits")
    };
    let client = reqwest::Client::new();
    let (mut first, printed) = launch(dir.path());
    let old_key = key_of(&printed.curl);
    // Served (and its Ctrl-C handler in place) before it is stopped.
    let r = client
        .get(limits_of(&printed.curl))
        .bearer_auth(&old_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    interrupt(&mut first);
    let (mut second, printed) = launch(dir.path());
    let new_key = key_of(&printed.curl);
    assert_ne!(new_key, old_key);
    let limits = limits_of(&printed.curl);
    for (key, want) in [(new_key, 200), (old_key, 401)] {
        let r = client.get(&limits).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), want);
    }
    interrupt(&mut second);
}
