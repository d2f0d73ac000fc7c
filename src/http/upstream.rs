//! The upstream: what every forwarded request shares (`Upstream`: the client, the
//! `Authorization` sent, each metered route's URI), and the client itself.
//!
//! The client keeps connections to the one upstream origin for reuse. It is written here, not
//! taken from hyper-util's pooled client (`client::legacy::Client`, which the gateway used until
//! 2026-12), because that client serves any number of origins and pays for it on every request:
//! it hashes a pool key, makes a connector future, spawns a task that returns the connection to
//! the pool once the answer's body is read, and drives each HTTP/1 connection as a task of its
//! own, woken twice per request. Replacing it saved about 9k instructions per request, 7% of what
//! the gateway adds, and 5% of its CPU per request (BENCHMARKS.md). The gateway has one origin. Here an HTTP/1 connection is driven by the
//! task of the request that holds it, and that task puts it back on the idle list when the
//! answer's body ends. An HTTP/2 connection (when TLS negotiates it) is shared by the requests
//! and runs as a task of its own, as HTTP/2 needs. What hyper-util's pool does that the gateway
//! needs is kept, and what it lacks for one LLM upstream is added:
//! - an HTTP/2 connection carries at most `upstream.max_streams_per_connection` requests at
//!   once; past it another connection is made (as Go's client does). hyper-util's pool keeps
//!   one, on which hyper queues the requests over the upstream's own limit behind the ones in
//!   flight (for LLM streams lasting minutes, minutes of waiting), or, sent before the upstream's
//!   settings arrived, the upstream refuses them (`502` to the client; seen in the tests);
//! - while an upstream that may speak HTTP/2 is being connected to, the other requests that
//!   find no connection wait for that one (`Pool::connecting`) instead of each making its own: a
//!   burst at start makes one TLS handshake, not one per request;
//! - a request whose HTTP/2 stream the upstream did not process (RFC 9113, 8.7: refused with
//!   `REFUSED_STREAM`, or above the last stream id of its `GOAWAY`) is sent once more;
//! - an HTTP/2 connection's flow-control window holds all its streams' windows, so that clients
//!   reading slowly never stall the others on the connection (hyper's default windows did).
//!
//! Also kept from hyper-util's pool: TLS and HTTP/2 by ALPN (hyper-rustls), the egress proxy
//! (`UpstreamConnector`), idle connections closed after `UPSTREAM_POOL_IDLE`, and a request
//! retried on a new connection when a reused one turned out closed before the request was sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::http::header::HOST;
use axum::http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use tokio::time::Instant;

use crate::app::AppError;
use crate::config::Config;
use crate::estimate::Endpoint;

/// How long an idle upstream connection is kept for reuse. Below the idle timeouts of what
/// usually stands in front of an upstream API (AWS ALB 60 s, nginx `keepalive_timeout` 75 s,
/// Google Cloud's load balancers 600 s), so that the gateway, not the other side, closes an idle
/// connection: one closed by the other side just as a request is sent on it fails that request.
pub const UPSTREAM_POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(50);

/// How much of an answer the upstream may send on one HTTP/2 stream before the gateway has read
/// it (the stream's flow-control window): what waits at the gateway for a client that reads
/// slowly. At 100 ms from the upstream, 1 MiB lets one stream carry 10 MB/s.
const HTTP2_STREAM_WINDOW: u32 = 1 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the gateway reaches the upstream: directly, or through the HTTP proxy that the usual
/// variables name for it (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, less the hosts of
/// `NO_PROXY`, read once at start): a `CONNECT` tunnel for an `https` upstream, requests in
/// absolute form for an `http` one. hyper-util has the matcher and the tunnel but no connector
/// that chooses between them, hence this one.
#[derive(Clone)]
pub struct UpstreamConnector {
    http: hyper_util::client::legacy::connect::HttpConnector,
    proxies: Arc<hyper_util::client::proxy::matcher::Matcher>,
}

impl tower_service::Service<axum::http::Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<UpstreamIo, BoxError>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        // `HttpConnector` is always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: axum::http::Uri) -> Self::Future {
        let mut http = self.http.clone();
        let proxy = self.proxies.intercept(&dst);
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let inner = http.call(dst).await?;
                return Ok(UpstreamIo {
                    inner,
                    proxied: false,
                });
            };
            if proxy.uri().scheme_str() != Some("http") {
                return Err(format!(
                    "the proxy for the upstream must be an http:// proxy, not {}",
                    proxy.uri().scheme_str().unwrap_or("?")
                )
                .into());
            }
            if dst.scheme_str() == Some("https") {
                let mut tunnel = hyper_util::client::legacy::connect::proxy::Tunnel::new(
                    proxy.uri().clone(),
                    http,
                );
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                let inner = tunnel.call(dst).await?;
                Ok(UpstreamIo {
                    inner,
                    proxied: false,
                })
            } else {
                let inner = http.call(proxy.uri().clone()).await?;
                Ok(UpstreamIo {
                    inner,
                    proxied: true,
                })
            }
        })
    }
}

/// A connection to the upstream, or to the proxy that forwards to it (`proxied`: the client
/// then sends each request's URI in absolute form).
pub struct UpstreamIo {
    inner: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    proxied: bool,
}

impl hyper_util::client::legacy::connect::Connection for UpstreamIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

/// A connection to the upstream: plain, or TLS (hyper-rustls), possibly through the egress proxy.
type Io = hyper_rustls::MaybeHttpsStream<UpstreamIo>;
type Connector = hyper_rustls::HttpsConnector<UpstreamConnector>;
type H1Connection = http1::Connection<Io, Full<Bytes>>;

/// Why the upstream could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the upstream: {0}")]
    Connect(#[source] BoxError),
    #[error("the upstream connection: {0}")]
    Http(#[from] hyper::Error),
}

/// The upstream's client. See the module's doc.
pub struct Client {
    inner: Arc<Pool>,
}

struct Pool {
    connector: Connector,
    /// `scheme://authority` of the upstream, what the connector is asked for.
    origin: Option<Uri>,
    /// The `Host` an HTTP/1 request carries (HTTP/2 says it in `:authority`).
    host: Option<HeaderValue>,
    /// HTTP/1 connections ready for a request, the most recently used last. Boxed, so that
    /// taking one out and putting it back moves a pointer, not the connection (see `H1`).
    idle: Mutex<std::collections::VecDeque<Box<H1>>>,
    /// The most connections `idle` holds: past it, the least recently used is closed, so that a
    /// burst of concurrent requests does not leave as many sockets open once it has passed.
    max_idle: usize,
    /// The HTTP/2 connections, the oldest first; a request goes on the first with room.
    h2: Mutex<Vec<H2>>,
    /// The most requests in flight at once on one HTTP/2 connection.
    max_streams: usize,
    /// How long an HTTP/2 connection with requests on it may stay silent before a PING checks
    /// it (and as long for the answer, else it is closed).
    keepalive: Option<std::time::Duration>,
    /// What the upstream's last new connection spoke (`Protocol`): until one is made, an
    /// `https` upstream may speak HTTP/2 (ALPN); an `http` one never does.
    protocol: AtomicU8,
    /// Held by the request making a connection to an upstream that may speak HTTP/2, until the
    /// connection is in `h2`: the others that need a connection meanwhile wait for it, and
    /// then share it if it is HTTP/2 and has room.
    connecting: tokio::sync::Mutex<()>,
    /// Connections that could not be made, counted so that the requests waiting on
    /// `connecting` learn that the one they waited for failed.
    failed_connects: std::sync::atomic::AtomicU64,
    opened: prometheus_client::metrics::counter::Counter,
}

/// `Pool::protocol`'s values.
struct Protocol;

impl Protocol {
    const UNKNOWN: u8 = 0;
    const HTTP1: u8 = 1;
    const HTTP2: u8 = 2;
}

/// An HTTP/2 connection: the handle that sends on it (the connection runs as a task of its
/// own), the requests in flight on it, and when a request was last given to it.
struct H2 {
    tx: http2::SendRequest<Full<Bytes>>,
    streams: Arc<AtomicUsize>,
    used: Instant,
}

/// A request's place among its HTTP/2 connection's streams, given back when the answer's body
/// ends or is dropped (or the request fails).
struct Stream(Arc<AtomicUsize>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP/1 connection: the handle that sends on it, and the connection itself, which whoever
/// holds it polls. Kept boxed: with its TLS state it is kilobytes, which would otherwise be
/// copied with every future that holds it (each request's).
struct H1 {
    tx: http1::SendRequest<Full<Bytes>>,
    conn: H1Connection,
    /// Reached through an `http` proxy: requests go in absolute form.
    proxied: bool,
    since: Instant,
}

impl H1 {
    /// Polls the connection; false once it has ended (closed by either side, or broken).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(&mut self.conn).poll(cx).is_pending()
    }
}

enum Checkout {
    H1(Box<H1>),
    H2(http2::SendRequest<Full<Bytes>>, Stream),
}

impl Client {
    fn new(
        connector: Connector,
        origin: Option<Uri>,
        host: Option<HeaderValue>,
        max_idle: usize,
        max_streams: usize,
        keepalive: Option<std::time::Duration>,
        opened: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let protocol = match origin.as_ref().and_then(Uri::scheme_str) {
            Some("https") => Protocol::UNKNOWN,
            _ => Protocol::HTTP1,
        };
        Client {
            inner: Arc::new(Pool {
                connector,
                opened,
                origin,
                host,
                max_idle,
                idle: Mutex::new(std::collections::VecDeque::new()),
                h2: Mutex::new(Vec::new()),
                max_streams,
                keepalive,
                protocol: AtomicU8::new(protocol),
                connecting: tokio::sync::Mutex::new(()),
                failed_connects: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Sends `request` (its URI absolute, on the upstream's origin) on an idle connection, or on
    /// a new one, and returns the answer as soon as its head has come. The answer's body drives
    /// its HTTP/1 connection, and returns it to the idle list when it ends.
    pub async fn request(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        let uri = request.uri().clone();
        let mut refusals_left = 1;
        loop {
            let reused = std::future::poll_fn(|cx| Poll::Ready(self.inner.checkout(cx))).await;
            let (conn, was_reused) = match reused {
                Some(conn) => (conn, true),
                // Boxed: it holds a connection's TLS state, kilobytes this future would
                // otherwise carry for every request, and copy with it.
                None => Box::pin(self.inner.connect_or_share()).await?,
            };
            let mut failed = match conn {
                Checkout::H2(mut tx, stream) => {
                    // Kept to send again should the upstream refuse the stream unprocessed.
                    let copy = (refusals_left > 0).then(|| same_request(&request));
                    match tx.try_send_request(request).await {
                        Ok(answer) => {
                            return Ok(answer.map(|body| UpstreamBody {
                                body,
                                lease: None,
                                stream: Some(stream),
                            }))
                        }
                        Err(failed) => {
                            let unprocessed = unprocessed(failed.error());
                            if unprocessed != Some(Unprocessed::Refused) {
                                // Not taking new streams (closing, or told to go away): the
                                // next try makes a new connection rather than ask this one
                                // again. A refused stream leaves its connection as it was.
                                let mut h2 = self.inner.h2.lock().expect("h2 list");
                                h2.retain(|c| !Arc::ptr_eq(&c.streams, &stream.0));
                            }
                            match (copy, unprocessed) {
                                // Not processed: again, on this connection (whose limit hyper
                                // now knows, from the settings that came before a refusal) or
                                // another.
                                (Some(copy), Some(_)) => {
                                    refusals_left -= 1;
                                    request = copy;
                                    continue;
                                }
                                _ => failed,
                            }
                        }
                    }
                }
                Checkout::H1(mut h1) => {
                    self.inner.prepare_h1(&mut request, h1.proxied);
                    let mut sent = std::pin::pin!(h1.tx.try_send_request(request));
                    let mut alive = true;
                    let answered = std::future::poll_fn(|cx| {
                        // The connection writes the request and reads the answer only when
                        // polled: here, by this task.
                        if alive {
                            alive = h1.drive(cx);
                        }
                        sent.as_mut().poll(cx)
                    })
                    .await;
                    match answered {
                        Ok(answer) => {
                            let lease = alive.then(|| Lease {
                                h1,
                                pool: self.inner.clone(),
                            });
                            return Ok(answer.map(|body| UpstreamBody {
                                body,
                                lease,
                                stream: None,
                            }));
                        }
                        Err(failed) => failed,
                    }
                }
            };
            match failed.take_message() {
                // Not sent: the reused connection had closed. Once more, on another.
                Some(unsent) if was_reused => {
                    request = unsent;
                    *request.uri_mut() = uri.clone();
                    // Set for HTTP/1 by `prepare_h1` (the client's own is never forwarded).
                    request.headers_mut().remove(HOST);
                }
                _ => return Err(failed.into_error().into()),
            }
        }
    }

    /// Closes the connections idle for longer than `UPSTREAM_POOL_IDLE`, and those the upstream
    /// has closed. Called periodically; a checkout also skips them.
    pub fn close_idle(&self) {
        let now = Instant::now();
        let timeout = UPSTREAM_POOL_IDLE;
        // Polled with no one to wake: one the upstream closed sees the end of its stream and
        // ends. Whoever takes a connection from the list polls it again, with its own waker.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.inner
            .idle
            .lock()
            .expect("idle list")
            .retain_mut(|c| now.duration_since(c.since) < timeout && c.drive(&mut cx));
        // An HTTP/2 connection with a request still on it (a long stream) stays.
        self.inner.h2.lock().expect("h2 list").retain(|c| {
            !c.tx.is_closed()
                && (c.streams.load(Ordering::Relaxed) > 0 || now.duration_since(c.used) < timeout)
        });
    }

    /// HTTP/1 connections idle now.
    pub fn idle_connections(&self) -> usize {
        self.inner.idle.lock().expect("idle list").len()
    }
}

impl Pool {
    /// An open connection ready for a request, if there is one; skips (and closes) those that
    /// have ended or stayed idle too long.
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Checkout> {
        let now = Instant::now();
        {
            let mut h2 = self.h2.lock().expect("h2 list");
            if !h2.is_empty() {
                h2.retain(|c| !c.tx.is_closed());
                let max = self.max_streams;
                if let Some(c) = h2
                    .iter_mut()
                    .find(|c| c.streams.load(Ordering::Relaxed) < max)
                {
                    c.streams.fetch_add(1, Ordering::Relaxed);
                    c.used = now;
                    return Some(Checkout::H2(c.tx.clone(), Stream(c.streams.clone())));
                }
            }
        }
        loop {
            let mut h1 = self.idle.lock().expect("idle list").pop_back()?;
            if now.duration_since(h1.since) >= UPSTREAM_POOL_IDLE {
                // The most recently used is stale: so are all the others.
                let stale = std::mem::take(&mut *self.idle.lock().expect("idle list"));
                drop((h1, stale));
                return None;
            }
            // Polled by this task from now on; one the upstream closed ends here.
            if h1.drive(cx) && h1.tx.is_ready() {
                return Some(Checkout::H1(h1));
            }
        }
    }

    /// A connection for a request that found none ready: a new one, or, for an upstream that
    /// may speak HTTP/2, the one another request was making meanwhile if it has room; and
    /// whether it was already open (then a request it could not send may go again on another).
    async fn connect_or_share(&self) -> Result<(Checkout, bool), ClientError> {
        if self.protocol.load(Ordering::Relaxed) == Protocol::HTTP1 {
            return Ok((self.connect().await?, false));
        }
        let failures = self.failed_connects.load(Ordering::Relaxed);
        let making = self.connecting.lock().await;
        if let Some(conn) = std::future::poll_fn(|cx| Poll::Ready(self.checkout(cx))).await {
            return Ok((conn, true));
        }
        if self.protocol.load(Ordering::Relaxed) == Protocol::HTTP1
            || self.failed_connects.load(Ordering::Relaxed) != failures
        {
            // Learnt while waiting: HTTP/1 connections are one per request, made side by side.
            // Or the connection waited for failed: the others try side by side too, so that a
            // burst against an upstream that cannot be reached fails in one connect timeout,
            // not in one per request.
            drop(making);
        }
        let made = self.connect().await;
        if made.is_err() {
            self.failed_connects.fetch_add(1, Ordering::Relaxed);
        }
        Ok((made?, false))
    }

    /// A new connection: HTTP/2 if TLS negotiated it (then shared from now on, up to
    /// `max_streams` requests at once), else HTTP/1.
    async fn connect(&self) -> Result<Checkout, ClientError> {
        use tower_service::Service as _;
        let origin = self
            .origin
            .clone()
            .ok_or_else(|| ClientError::Connect("no upstream is configured".into()))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ClientError::Connect)?;
        let io = connector.call(origin).await.map_err(ClientError::Connect)?;
        self.opened.inc();
        let connected = io.connected();
        // (An `http` upstream never negotiates HTTP/2: it stays `HTTP1`, as it began.)
        let spoke = match connected.is_negotiated_h2() {
            true => Protocol::HTTP2,
            false => Protocol::HTTP1,
        };
        self.protocol.store(spoke, Ordering::Relaxed);
        if connected.is_negotiated_h2() {
            // The connection's window holds every stream's, so that the data waiting for clients
            // that read slowly (each stream's window, at most) never uses it up: with hyper's
            // default (5 MiB for the connection, 2 MiB a stream) three slow downloads stalled
            // every other request on the connection. What waits is bounded by the streams'
            // windows: `max_streams` MiB.
            let connection_window = (self.max_streams as u64 * u64::from(HTTP2_STREAM_WINDOW))
                .min(i32::MAX as u64) as u32;
            let mut builder = http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .initial_stream_window_size(HTTP2_STREAM_WINDOW)
                .initial_connection_window_size(connection_window);
            if let Some(every) = self.keepalive {
                // A connection that died without a word (a load balancer gone, a network cut)
                // would otherwise hold its requests until their timeouts: pinged once it has
                // been silent this long with requests on it, and closed if no answer comes as
                // long again. Not while idle: it is closed after `UPSTREAM_POOL_IDLE` anyway.
                builder
                    .keep_alive_interval(every)
                    .keep_alive_timeout(every)
                    .keep_alive_while_idle(false);
            }
            let (tx, conn) = builder.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            let streams = Arc::new(AtomicUsize::new(1));
            self.h2.lock().expect("h2 list").push(H2 {
                tx: tx.clone(),
                streams: streams.clone(),
                used: Instant::now(),
            });
            return Ok(Checkout::H2(tx, Stream(streams)));
        }
        let (tx, conn) = http1::handshake(io).await?;
        Ok(Checkout::H1(Box::new(H1 {
            tx,
            conn,
            proxied: connected.is_proxied(),
            since: Instant::now(),
        })))
    }

    /// An HTTP/1 request names its host in `Host`, and its target by path (absolute to a proxy).
    fn prepare_h1(&self, request: &mut Request<Full<Bytes>>, proxied: bool) {
        if let Some(host) = &self.host {
            request.headers_mut().insert(HOST, host.clone());
        }
        if !proxied {
            let origin_form = match request.uri().path_and_query() {
                Some(p) if p.as_str() != "/" => {
                    let mut parts = axum::http::uri::Parts::default();
                    parts.path_and_query = Some(p.clone());
                    Uri::from_parts(parts).unwrap_or_default()
                }
                _ => Uri::default(),
            };
            *request.uri_mut() = origin_form;
        }
    }

    fn put_back(&self, mut h1: Box<H1>) {
        if self.max_idle == 0 {
            return;
        }
        h1.since = Instant::now();
        let mut idle = self.idle.lock().expect("idle list");
        let closed = (idle.len() >= self.max_idle)
            .then(|| idle.pop_front())
            .flatten();
        idle.push_back(h1);
        drop(idle);
        // Closed (dropped) outside the lock.
        drop(closed);
    }
}

/// A copy of `request` to send again: its body is shared, not copied.
fn same_request(request: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Why the upstream did not process a request's HTTP/2 stream, which may then be sent again
/// (RFC 9113, 8.7).
#[derive(Debug, PartialEq, Eq)]
enum Unprocessed {
    /// Reset with `REFUSED_STREAM`.
    Refused,
    /// Above the last stream id of the upstream's `GOAWAY`, or opened after it came: h2 fails
    /// those with the `GOAWAY`'s error, and only those (one at or below that id, cut when the
    /// connection then closes, fails with an I/O error: it may have been processed).
    GoneAway,
}

/// Whether, and why, the error of a request says the upstream did not process it.
fn unprocessed(error: &hyper::Error) -> Option<Unprocessed> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if !h2.is_remote() {
                return None;
            }
            if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Some(Unprocessed::Refused);
            }
            return h2.is_go_away().then_some(Unprocessed::GoneAway);
        }
        source = e.source();
    }
    None
}

/// An HTTP/1 connection held by the answer whose body comes on it.
struct Lease {
    h1: Box<H1>,
    pool: Arc<Pool>,
}

/// The upstream's answer body. On HTTP/1, reading it drives its connection, and its end returns
/// the connection to the idle list; dropped before its end, it closes the connection (which
/// cannot carry another request with an answer half read).
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
    /// On HTTP/2, the request's place on its connection, given back when this is dropped.
    stream: Option<Stream>,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(lease) = &mut this.lease {
            if !lease.h1.drive(cx) {
                // Ended: what it read is in the body; it cannot be reused.
                this.lease = None;
            }
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // The stream has ended: its place is free for another request.
            this.stream = None;
            if let Some(mut lease) = this.lease.take() {
                // Polled once more so that it takes in the end of this exchange; kept if it
                // is then ready for the next request.
                if lease.h1.drive(cx) && lease.h1.tx.is_ready() {
                    lease.pool.put_back(lease.h1);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `upstream.url` in parts: `scheme://authority`, the path without its trailing `/`, the query.
struct Base {
    origin: String,
    path: String,
    query: Option<String>,
}

/// What every forwarded request shares, built once: the client (its connection pool), the
/// `Authorization` the gateway sends, and the URI of each metered route.
pub struct Upstream {
    pub client: Client,
    /// `Bearer <upstream.api_key>`, marked sensitive (never logged by the client).
    pub authorization: Option<axum::http::HeaderValue>,
    /// `Proxy-Authorization` for an `http` upstream reached through a proxy with credentials.
    pub proxy_authorization: Option<axum::http::HeaderValue>,
    base: Option<Base>,
    metered: Vec<(Endpoint, axum::http::Uri)>,
}

impl Upstream {
    /// `opened` counts the connections the client opens (`tiergate_upstream_connections_opened`).
    pub fn new(
        config: &Config,
        opened: prometheus_client::metrics::counter::Counter,
    ) -> Result<Self, AppError> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_connect_timeout(Some(config.upstream.connect_timeout));
        http.set_nodelay(true);
        // The TLS layer wraps it, so it must pass `https` on.
        http.enforce_http(false);
        let proxies = hyper_util::client::proxy::matcher::Matcher::from_env();
        // A plain-HTTP upstream reached through a proxy: the proxy's credentials go with each
        // request (a tunnel sends them once, in its `CONNECT`).
        let proxy_authorization = config.upstream.url.as_ref().and_then(|u| {
            let uri: axum::http::Uri = u.as_str().parse().ok()?;
            let proxy = proxies.intercept(&uri)?;
            (uri.scheme_str() == Some("http"))
                .then(|| proxy.basic_auth().cloned())
                .flatten()
        });
        // Mozilla's roots, and those of `upstream.ca_file` (a private CA's), on ring.
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        // Each was checked when the configuration was read.
        roots.add_parsable_certificates(config.upstream.extra_roots.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| AppError::UpstreamTls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(UpstreamConnector {
                http,
                proxies: Arc::new(proxies),
            });
        let authorization = config.upstream.api_key.as_ref().and_then(|key| {
            let mut v = axum::http::HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        let base = config.upstream.url.as_ref().map(|u| Base {
            origin: u.origin().ascii_serialization(),
            path: u.path().trim_end_matches('/').to_string(),
            query: u.query().map(str::to_string),
        });
        // A redirect is never followed (this client has no such layer): it is passed to the
        // client, so what reaches the upstream is only ever the metered request.
        let origin = base.as_ref().and_then(|b| b.origin.parse::<Uri>().ok());
        let host = config.upstream.url.as_ref().and_then(|u| {
            let host = u.host_str()?;
            HeaderValue::from_str(&match u.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            })
            .ok()
        });
        let client = Client::new(
            https,
            origin,
            host,
            config.upstream.max_idle_connections,
            config.upstream.max_streams_per_connection,
            config.upstream.http2_keepalive,
            opened,
        );
        let mut metered = Vec::new();
        if let Some(base) = &base {
            for e in Endpoint::ALL {
                let uri = Self::join(base, e.path(), None).ok_or(AppError::UpstreamUrl)?;
                metered.push((e, uri));
            }
        }
        Ok(Upstream {
            client,
            authorization,
            proxy_authorization,
            base,
            metered,
        })
    }

    /// The base's path and `path`, with the request's query, else the base's own.
    fn join(base: &Base, path: &str, query: Option<&str>) -> Option<axum::http::Uri> {
        let mut s = String::with_capacity(base.origin.len() + base.path.len() + path.len() + 64);
        s.push_str(&base.origin);
        s.push_str(&base.path);
        s.push_str(path);
        if let Some(q) = query.or(base.query.as_deref()) {
            s.push('?');
            s.push_str(q);
        }
        axum::http::Uri::try_from(s).ok()
    }

    /// The upstream URI of a (normalised) path and query; `None` without an upstream (or, which
    /// the normalised path and a query that came in a valid URI rule out, an invalid one).
    pub fn url(
        &self,
        endpoint: Option<Endpoint>,
        path: &str,
        query: Option<&str>,
    ) -> Option<axum::http::Uri> {
        let base = self.base.as_ref()?;
        match (
            self.metered.iter().find(|(e, _)| Some(*e) == endpoint),
            query,
        ) {
            // A metered route without a query, the usual request: the URI built at start.
            (Some((_, uri)), None) => Some(uri.clone()),
            (Some((e, _)), Some(q)) => Self::join(base, e.path(), Some(q)),
            (None, q) => Self::join(base, path, q),
        }
    }
}
