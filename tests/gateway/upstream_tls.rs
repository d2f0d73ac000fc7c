//! An HTTPS upstream: the gateway verifies its certificate (trusted here through
//! `upstream.ca_file`, a private CA), speaks HTTP/2 when the upstream offers it by ALPN and
//! HTTP/1.1 otherwise, and keeps one connection for requests sent one after another.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tiergate::config::RawSettings;
use tiergate::mock_upstream::{router, MockConfig};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

use crate::harness::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// The protocol each connection's TLS handshake settled on.
    alpn: Mutex<Vec<Option<Vec<u8>>>>,
}

/// The mock upstream over TLS on a free port, offering `alpn`.
async fn https_upstream(alpn: &[&[u8]]) -> (String, Arc<Seen>) {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(format!("{FIXTURES}/server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(format!("{FIXTURES}/server.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    let service = hyper_util::service::TowerToHyperService::new(router(MockConfig::default()));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let (acceptor, seen, service) = (acceptor.clone(), shared.clone(), service.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the handshake here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let h2 = protocol.as_deref() == Some(b"h2");
                seen.alpn.lock().unwrap().push(protocol);
                let io = hyper_util::rt::TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    (url, seen)
}

/// A gateway before `upstream`, trusting the test CA if `trust`.
async fn gateway_before(upstream: &str, trust: bool) -> (TestGateway, String) {
    let mut raw = RawSettings::default();
    if trust {
        raw.upstream.ca_file = Some(format!("{FIXTURES}/ca.pem"));
    }
    let limits = json!({"tokens_per_minute": 1_000_000, "tokens_per_month": 10_000_000});
    TestGateway::before(upstream, raw, limits).await
}

/// Plain and streamed chats one after another, each settled to the mock's usage.
async fn chats_settle(gw: &TestGateway, key: &str) {
    let h = [("x-mock-usage", "3,4")];
    for i in 0..6 {
        let stream = i % 2 == 1;
        let body = json!({"model": "m", "stream": stream,
                          "messages": [{"role": "user", "content": "Hi"}]});
        let r = gw.chat(key, body, &h).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        let text = r.text().await.unwrap();
        let whole = if stream { "data: [DONE]" } else { "\"usage\"" };
        assert!(text.contains(whole), "request {i}: {text}");
    }
    eventually(Duration::from_secs(10), "every answer settled", || async {
        gw.limits(key).await["usage"]["tokens_this_month"].as_u64() == Some(6 * 7)
    })
    .await;
}

#[tokio::test]
async fn an_https_upstream_that_offers_http2_gets_one_http2_connection() {
    let (url, seen) = https_upstream(&[b"h2", b"http/1.1"]).await;
    let (gw, key) = gateway_before(&url, true).await;
    chats_settle(&gw, &key).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    assert_eq!(*seen.alpn.lock().unwrap(), vec![Some(b"h2".to_vec())]);
}

#[tokio::test]
async fn an_https_upstream_without_http2_gets_one_http1_connection() {
    let (url, seen) = https_upstream(&[b"http/1.1"]).await;
    let (gw, key) = gateway_before(&url, true).await;
    chats_settle(&gw, &key).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    assert_eq!(*seen.alpn.lock().unwrap(), vec![Some(b"http/1.1".to_vec())]);
}

#[tokio::test]
async fn an_upstream_certificate_no_trusted_root_signed_is_refused() {
    let (url, seen) = https_upstream(&[b"h2", b"http/1.1"]).await;
    let (gw, key) = gateway_before(&url, false).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(
        seen.alpn.lock().unwrap().is_empty(),
        "no TLS session was made"
    );
    assert_eq!(
        gw.limits(&key).await["usage"]["tokens_reserved"],
        0,
        "refunded"
    );
}
