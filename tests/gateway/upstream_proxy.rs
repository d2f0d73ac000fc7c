//! The upstream reached through the proxy the usual variables name (`HTTP_PROXY`,
//! `HTTPS_PROXY`, `NO_PROXY`), set for a `tiergate serve` child process only: an `http`
//! upstream through absolute-form requests with the proxy's credentials, an `https` one through
//! a `CONNECT` tunnel, and a host in `NO_PROXY` reached directly.

use std::sync::{Arc, Mutex};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::Mock;
use crate::process::{workspace, Process};

/// What the proxy saw of each connection: its request line, and its `Proxy-Authorization`.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A forward proxy: each connection's request head is recorded (its first line, and the
/// `Proxy-Authorization` it carried), then a `CONNECT` is answered 200 and tunnelled, and any
/// other request is relayed as it came to the host its absolute URI names.
struct ForwardProxy {
    url: String,
    seen: Seen,
}

impl ForwardProxy {
    async fn start() -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, log.clone()));
            }
        });
        ForwardProxy { url, seen }
    }

    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn relay(mut client: TcpStream, seen: Seen) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await.unwrap_or(0) == 0 || head.len() > 16 * 1024 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let first = text.lines().next().unwrap_or("").to_string();
    let auth = text
        .lines()
        .find_map(|l| l.strip_prefix("proxy-authorization: "))
        .or_else(|| {
            text.lines()
                .find_map(|l| l.strip_prefix("Proxy-Authorization: "))
        })
        .map(str::to_string);
    seen.lock().unwrap().push((first.clone(), auth));
    let mut parts = first.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authority = if method == "CONNECT" {
        target.to_string()
    } else {
        let rest = target.strip_prefix("http://").unwrap_or("");
        rest.split('/').next().unwrap_or("").to_string()
    };
    let Ok(mut upstream) = TcpStream::connect(&authority).await else {
        return;
    };
    if method == "CONNECT" {
        let _ = client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await;
    } else if upstream.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn chat(url: &str, key: &str) -> reqwest::Response {
    Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_http_upstream_is_reached_through_http_proxy_with_its_credentials() {
    let mock = Mock::start().await;
    let proxy = ForwardProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let with_auth = proxy.url.replace("http://", "http://ann:secret@");
    let gw = Process::start_with_env(&db, &mock.url, &[], &[("HTTP_PROXY", &with_auth)]).await;
    let (_, key) = workspace(&gw.url, "proxied").await;
    let r = chat(&gw.url, &key).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0, "{v}");
    let seen = proxy.seen();
    let want = format!("POST {}/v1/chat/completions HTTP/1.1", mock.url);
    assert!(seen.iter().any(|(line, _)| *line == want), "{seen:?}");
    // Basic base64("ann:secret").
    assert!(
        seen.iter()
            .all(|(_, auth)| auth.as_deref() == Some("Basic YW5uOnNlY3JldA==")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn an_https_upstream_is_reached_through_a_connect_tunnel_and_no_proxy_is_honoured() {
    let proxy = ForwardProxy::start().await;
    // Something to tunnel to: a listener that closes what it accepts (no TLS here, so the
    // handshake fails after the tunnel is made, and the client gets 502).
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            drop(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let upstream = format!("https://localhost:{}", target_addr.port());
    let gw = Process::start_with_env(&db, &upstream, &[], &[("HTTPS_PROXY", &proxy.url)]).await;
    let (_, key) = workspace(&gw.url, "proxied").await;
    let r = chat(&gw.url, &key).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let want = format!("CONNECT localhost:{} HTTP/1.1", target_addr.port());
    let seen = proxy.seen();
    assert!(seen.iter().any(|(line, _)| *line == want), "{seen:?}");

    // The same upstream's host in NO_PROXY: the proxy sees nothing more.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let before = proxy.seen().len();
    let gw = Process::start_with_env(
        &db,
        &upstream,
        &[],
        &[("HTTPS_PROXY", &proxy.url), ("NO_PROXY", "localhost")],
    )
    .await;
    let (_, key) = workspace(&gw.url, "proxied").await;
    let r = chat(&gw.url, &key).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.seen().len(), before, "{:?}", proxy.seen());
}
