//! An HTTPS upstream: the gateway verifies its certificate (trusted here through
//! `upstream.ca_file`, a private CA), speaks HTTP/2 when the upstream offers it by ALPN and
//! HTTP/1.1 otherwise, and keeps one connection for requests sent one after another. On HTTP/2,
//! a burst of requests at start shares the first connection, and a connection carries at most
//! `upstream.max_streams_per_connection` requests at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
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

/// The server side of TLS with the test CA's certificate, offering `alpn`.
fn tls_acceptor(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
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
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The mock upstream over TLS on a free port, offering `alpn`.
async fn https_upstream(alpn: &[&[u8]]) -> (String, Arc<Seen>) {
    https_upstream_with(alpn, None, None).await
}

/// As `https_upstream`, its HTTP/2 connections taking at most `streams` requests at once, and
/// each sending `GOAWAY` (a graceful close: the requests on it finish, no new ones are taken)
/// `goaway_after` its start.
async fn https_upstream_with(
    alpn: &[&[u8]],
    streams: Option<u32>,
    goaway_after: Option<Duration>,
) -> (String, Arc<Seen>) {
    let acceptor = tls_acceptor(alpn);
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
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(streams)
                    .serve_connection(io, service);
                    let mut conn = std::pin::pin!(conn);
                    if let Some(after) = goaway_after {
                        tokio::select! {
                            _ = conn.as_mut() => return,
                            _ = tokio::time::sleep(after) => conn.as_mut().graceful_shutdown(),
                        }
                    }
                    let _ = conn.await;
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
    gateway_with(upstream, trust, RawSettings::default()).await
}

async fn gateway_with(upstream: &str, trust: bool, mut raw: RawSettings) -> (TestGateway, String) {
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

/// `n` chats at once, each answered after `latency_ms`; every one must succeed, and all must be
/// settled (nothing left reserved) once they have.
async fn chats_at_once(gw: &TestGateway, key: &str, n: usize, latency_ms: &str) {
    let h = [("x-mock-latency-ms", latency_ms), ("x-mock-usage", "3,4")];
    let before = gw.limits(key).await["usage"]["tokens_this_month"]
        .as_u64()
        .unwrap();
    let answers = join_all((0..n).map(|_| gw.chat(key, hello(), &h))).await;
    for (i, r) in answers.into_iter().enumerate() {
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        assert!(r.text().await.unwrap().contains("\"usage\""), "request {i}");
    }
    eventually(Duration::from_secs(10), "every answer settled", || async {
        let usage = &gw.limits(key).await["usage"];
        usage["tokens_this_month"].as_u64() == Some(before + 7 * n as u64)
            && usage["tokens_reserved"].as_u64() == Some(0)
    })
    .await;
}

#[tokio::test]
async fn a_burst_at_start_shares_the_first_http2_connection() {
    // Without the wait for the connection being made, each of the twelve makes its own.
    let (url, seen) = https_upstream(&[b"h2", b"http/1.1"]).await;
    let (gw, key) = gateway_before(&url, true).await;
    chats_at_once(&gw, &key, 12, "300").await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    assert_eq!(*seen.alpn.lock().unwrap(), vec![Some(b"h2".to_vec())]);
}

#[tokio::test]
async fn an_http2_connection_takes_its_most_streams_and_another_takes_the_rest() {
    // The upstream takes 2 streams at once per connection, and the gateway is told so: five
    // requests at once need three connections. With one connection, three of them would wait
    // in hyper's queue for the first two to end.
    let (url, seen) = https_upstream_with(&[b"h2"], Some(2), None).await;
    let mut raw = RawSettings::default();
    raw.upstream.max_streams_per_connection = Some(2);
    let (gw, key) = gateway_with(&url, true, raw).await;
    chats_at_once(&gw, &key, 5, "500").await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
    // Their places are given back: two more at once go on the first connection.
    chats_at_once(&gw, &key, 2, "0").await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_burst_at_start_to_an_http1_upstream_gets_a_connection_each() {
    // The burst waits for the first connection to learn the protocol, then connects side by
    // side: HTTP/1.1 carries one request at a time.
    let (url, seen) = https_upstream(&[b"http/1.1"]).await;
    let (gw, key) = gateway_before(&url, true).await;
    chats_at_once(&gw, &key, 4, "300").await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 4);
    // Kept for reuse: four more at once go on them.
    chats_at_once(&gw, &key, 4, "300").await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_http2_connection_the_upstream_sends_away_finishes_its_requests_and_is_replaced() {
    // Upstreams close HTTP/2 connections with GOAWAY (a deploy, a load balancer's connection
    // age): the request in flight on it still gets its answer, and the next goes on a new one.
    let (url, seen) = https_upstream_with(&[b"h2"], None, Some(Duration::from_millis(300))).await;
    let (gw, key) = gateway_before(&url, true).await;
    let slow = [("x-mock-latency-ms", "800"), ("x-mock-usage", "3,4")];
    let (first, second) = tokio::join!(gw.chat(&key, hello(), &slow), async {
        // After the GOAWAY, while the first is still on that connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        gw.chat(&key, hello(), &[("x-mock-usage", "3,4")]).await
    });
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.text().await.unwrap().contains("\"usage\""));
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    eventually(Duration::from_secs(10), "both settled", || async {
        gw.limits(&key).await["usage"]["tokens_this_month"].as_u64() == Some(14)
    })
    .await;
}

/// An HTTP/2 upstream over TLS (the h2 crate's server, to reset streams at will) that refuses
/// its first `refuse` streams with `REFUSED_STREAM` and answers the others with a completion
/// of 3 + 4 tokens. With `goaway_first`, its first connection says `GOAWAY` with a last stream
/// id of 0 right after the handshake (it will process none). Counts connections, and streams in
/// `alpn`'s place (one `None` each).
async fn refusing_upstream(refuse: usize, goaway_first: bool) -> (String, Arc<Seen>) {
    let acceptor = tls_acceptor(&[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = shared.connections.fetch_add(1, Ordering::SeqCst) == 0;
            let (acceptor, seen) = (acceptor.clone(), shared.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                if goaway_first && first {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    while let Some(Ok(_)) = conn.accept().await {}
                    return;
                }
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    let n = {
                        let mut streams = seen.alpn.lock().unwrap();
                        streams.push(None);
                        streams.len()
                    };
                    if n <= refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    if request.uri().path().starts_with("/v1/files/") {
                        // A large download: 32 MiB, sent as the client's windows allow.
                        let head = axum::http::Response::builder()
                            .header("content-type", "application/octet-stream")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(head, false).unwrap();
                        let _ = send.send_data(vec![b'x'; 32 << 20].into(), true);
                        tokio::spawn(async move {
                            // Kept until the stream ends, so the data is not dropped.
                            std::future::poll_fn(|cx| send.poll_reset(cx)).await.ok();
                        });
                        continue;
                    }
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let head = axum::http::Response::builder()
                            .header("content-type", "application/json")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(head, false).unwrap();
                        let answer = json!({"id": "r", "object": "chat.completion",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}});
                        let _ = send.send_data(answer.to_string().into(), true);
                    });
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_stream_the_upstream_refuses_unprocessed_is_sent_once_more() {
    // REFUSED_STREAM says the upstream did nothing with the request (RFC 9113, 8.7), as when a
    // burst outruns its stream limit before its settings arrive: sent again, it is answered.
    let (url, seen) = refusing_upstream(1, false).await;
    let (gw, key) = gateway_before(&url, true).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("\"usage\""));
    assert_eq!(
        seen.alpn.lock().unwrap().len(),
        2,
        "the upstream saw it twice"
    );
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "on the same connection"
    );
    eventually(Duration::from_secs(10), "settled once", || async {
        let usage = &gw.limits(&key).await["usage"];
        usage["tokens_this_month"].as_u64() == Some(7) && usage["tokens_reserved"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_stream_refused_twice_is_a_502_and_charges_nothing() {
    let (url, seen) = refusing_upstream(2, false).await;
    let (gw, key) = gateway_before(&url, true).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        seen.alpn.lock().unwrap().len(),
        2,
        "sent once more, not again"
    );
    let usage = &gw.limits(&key).await["usage"];
    assert_eq!(usage["tokens_reserved"], 0, "refunded");
    assert_eq!(usage["tokens_this_month"], 0);
}

#[tokio::test]
async fn clients_that_read_slowly_do_not_hold_back_others_on_a_shared_http2_connection() {
    // Three clients download a large file and read none of it; the upstream's data waits in
    // each stream's window. Those windows must not use up the connection's, or every other
    // request on the connection (here, a chat) waits for the slow readers.
    let (url, _seen) = refusing_upstream(0, false).await;
    // Files are not among the routes forwarded by default.
    let mut raw = RawSettings::default();
    raw.upstream.unmetered = Some("all".into());
    let (gw, key) = gateway_with(&url, true, raw).await;
    let mut slow = Vec::new();
    for i in 0..3 {
        let r = gw
            .client
            .get(format!("{}/v1/files/f{i}/content", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        slow.push(r);
    }
    // Time for the socket buffers and the streams' windows to fill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let chat = tokio::time::timeout(Duration::from_secs(10), gw.chat(&key, hello(), &[]))
        .await
        .expect("the chat was answered while the downloads wait");
    assert_eq!(chat.status(), StatusCode::OK);
    assert!(chat.text().await.unwrap().contains("\"usage\""));
    drop(slow);
}

#[tokio::test]
async fn a_burst_against_an_upstream_that_cannot_be_reached_fails_in_one_connect_timeout() {
    // A listener whose queue is full drops new connections' SYNs, so connecting times out (the
    // host of an upstream that is down). The burst waits for the first connection, since the
    // upstream may speak HTTP/2; once that fails, the others must try side by side, not one
    // connect timeout after another.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        let connect = tokio::net::TcpStream::connect(addr);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            fill.push(s);
        }
    }
    let mut raw = RawSettings::default();
    raw.upstream.connect_timeout_ms = Some(300);
    let (gw, key) = gateway_with(&format!("https://{addr}"), true, raw).await;
    let started = std::time::Instant::now();
    let answers = join_all((0..20).map(|_| gw.chat(&key, hello(), &[]))).await;
    let took = started.elapsed();
    for (i, r) in answers.into_iter().enumerate() {
        // A connection not made within `connect_timeout_ms` is a timeout (as nginx answers).
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT, "request {i}");
    }
    // Side by side: about two timeouts (0.6 s); one after another: twenty (6 s).
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop((fill, listener));
}

/// A TCP relay to `upstream` on a free port. Once `cut` is called, the connections open then
/// carry nothing more either way, and stay open: a connection that died without a word. Returns
/// its address, the connections it accepted, and `cut`.
async fn relay(upstream: &str) -> (String, Arc<AtomicUsize>, impl Fn()) {
    let to = upstream.trim_start_matches("https://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    // Connections numbered below this carry nothing.
    let dead_below = Arc::new(AtomicUsize::new(0));
    let (count, dead) = (accepted.clone(), dead_below.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let server = tokio::net::TcpStream::connect(&to).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)] {
                let dead = dead.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let Ok(read) = from.read(&mut buf).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        if n >= dead.load(Ordering::SeqCst)
                            && to.write_all(&buf[..read]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
    });
    let counted = accepted.clone();
    let cut = move || dead_below.store(counted.load(Ordering::SeqCst), Ordering::SeqCst);
    (format!("https://{addr}"), accepted, cut)
}

#[tokio::test]
async fn an_http2_connection_that_died_silently_is_found_out_by_ping_and_replaced() {
    let (upstream, _seen) = https_upstream(&[b"h2"]).await;
    let (url, accepted, cut) = relay(&upstream).await;
    let mut raw = RawSettings::default();
    raw.upstream.http2_keepalive_ms = Some(300);
    raw.upstream.timeout_secs = Some(60);
    let (gw, key) = gateway_with(&url, true, raw).await;
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    cut();
    // Sent on the dead connection: without the PING it would wait for `timeout_secs`.
    let lost = tokio::time::timeout(Duration::from_secs(10), gw.chat(&key, hello(), &[]))
        .await
        .expect("the dead connection was found out");
    assert_eq!(lost.status(), StatusCode::BAD_GATEWAY);
    // The next goes on a new connection.
    assert_eq!(gw.chat(&key, hello(), &[]).await.status(), StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(
        gw.limits(&key).await["usage"]["tokens_reserved"],
        0,
        "refunded"
    );
}

#[tokio::test]
async fn a_request_above_the_last_stream_of_a_goaway_is_sent_on_a_new_connection() {
    // The upstream's first connection goes away at once, having processed no stream (last
    // stream id 0): a request sent on it, or opened after the GOAWAY came, was not processed,
    // and goes once more on a new connection.
    let (url, seen) = refusing_upstream(0, true).await;
    let (gw, key) = gateway_before(&url, true).await;
    let r = gw.chat(&key, hello(), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        seen.alpn.lock().unwrap().len(),
        1,
        "processed once, on the second"
    );
    eventually(Duration::from_secs(10), "settled once", || async {
        gw.limits(&key).await["usage"]["tokens_this_month"].as_u64() == Some(7)
    })
    .await;
}
