//! Serving an `App` over HTTP: the main listener, and the admin listener when there is one,
//! until shutdown; then the app's own shutdown (settlements waited for, background tasks
//! stopped, ledger flushed). This is `App`'s HTTP side, kept here so that `app` knows no axum.
//!
//! Each listener accepts connections and serves its router on each with hyper's HTTP/1 server.
//! The main listener hands the metered routes' requests to the proxy itself, past the router
//! (`super::proxied_directly`).
//!
//! `axum::serve` applies no timeout to a client that sends its request slowly, so a client that
//! trickles its headers (slowloris) holds a connection for ever. Here each connection gets:
//! - `header_read_timeout`: the request's head must arrive whole within it (hyper closes the
//!   connection otherwise). hyper starts that clock whenever it waits for a head, so it also
//!   closes a kept-alive connection left idle that long;
//! - `TCP_NODELAY`: without it a response written as headers then body waits for the client's
//!   delayed ACK (about 40 ms) on every kept-alive request, and stream chunks are held back.
//!
//! The body's deadline (`body_read_timeout`) is applied by the router (`TimedBody`, in `mod.rs`),
//! so the handler that reads a body answers `408` itself.
//!
//! Shutdown: once `shutdown` completes, the listener closes, idle connections close, and every
//! connection finishes the request it is serving (streams included) and then closes. Those
//! still open after `grace` are dropped: their requests' futures and bodies are dropped too,
//! which settles them (see `proxy.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse as _;
use axum::Router;
use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::console::ClientAddr;
use super::cors;
use crate::app::{App, AppError, AppState};

impl App {
    /// The main listener's routes (see `http::router`).
    pub fn router(&self) -> axum::Router {
        super::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then drains (for at most
    /// `shutdown_grace`), waits for the settlements, and flushes the ledger. With
    /// `admin_listen` set, also binds it and serves the admin API, `/metrics` and the console's
    /// operator pages there only.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        self.serve_with_admin(listener, None, shutdown).await
    }

    /// As `serve`, with the admin listener bound by the caller (the tests use port 0). The
    /// operator's routes are served on `admin` alone when it is given or `admin_listen` is set
    /// (then bound here), else on `listener`.
    pub async fn serve_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let admin = match (admin, self.state.config.admin_listen) {
            (Some(a), _) => Some(a),
            (None, Some(addr)) => Some(TcpListener::bind(addr).await?),
            (None, None) => None,
        };
        let config = &self.state.config;
        let options = ListenerOptions {
            header_read_timeout: config.header_read_timeout,
            shutdown_grace: config.shutdown_grace,
        };
        let shutdown = shutdown.shared();
        let main = super::main_router(self.state.clone(), admin.is_none());
        let proxy = Some(self.state.clone());
        match admin {
            None => serve(listener, main, proxy, options, shutdown).await,
            Some(admin) => {
                let operator = super::admin_router(self.state.clone());
                tokio::join!(
                    serve(listener, main, proxy, options, shutdown.clone()),
                    serve(admin, operator, None, options, shutdown),
                );
            }
        }
        let lost = self.shutdown().await;
        if lost != crate::usage::Unwritten::default() {
            // A failed exit, so that whatever restarts the gateway sees it.
            return Err(AppError::UsageLost {
                requests: lost.requests,
                tokens: lost.tokens,
            });
        }
        Ok(())
    }
}

/// What the listener applies to every connection.
#[derive(Debug, Clone, Copy)]
pub struct ListenerOptions {
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains the connections for
/// at most `options.shutdown_grace`. With `proxy`, the requests for the metered routes go to
/// the proxy past the router (`super::proxied_directly`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    proxy: Option<Arc<AppState>>,
    options: ListenerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                let inner = TowerToHyperService::new(router.clone());
                let proxy = proxy.clone();
                // The console's sign-in limiter needs the client's address; only its requests
                // are given it, so the proxy path pays one prefix comparison and no allocation.
                let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    if !one_host(&request) {
                        let refused = super::error::ApiError::BadRequest(
                            "an HTTP/1.1 request names its host in one Host header".into(),
                        );
                        return Either::Left(std::future::ready(Ok(refused.into_response())));
                    }
                    if let Some(normal) = super::normalised_v1(request.uri()) {
                        *request.uri_mut() = normal;
                    }
                    // CORS on the main listener (`cors_origins`; by default nothing to do).
                    let cors = proxy
                        .as_ref()
                        .and_then(|state| cors::allowed(&state.config.cors_origins, &request));
                    if let Some(preflight) = cors.as_ref().and_then(|c| cors::preflight(c, &request)) {
                        return Either::Left(std::future::ready(Ok(preflight)));
                    }
                    let path = request.uri().path();
                    let answer = match proxy.as_ref().filter(|_| super::proxied_directly(path)) {
                        Some(state) => Either::Left(super::proxy_directly(state.clone(), request)),
                        None => {
                            if path.starts_with(super::console::PREFIX) {
                                request.extensions_mut().insert(ClientAddr(peer));
                            }
                            Either::Right(inner.call(request))
                        }
                    };
                    Either::Right(answer.map(move |answered| {
                        answered.map(|mut response| {
                            if let Some(allowed) = cors {
                                allowed.apply(response.headers_mut());
                            }
                            response
                        })
                    }))
                });
                let mut stopping = stopping.clone();
                connections.spawn(async move {
                    let mut builder = http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(options.header_read_timeout);
                    let connection = builder.serve_connection(TokioIo::new(tcp), service);
                    let mut connection = std::pin::pin!(connection);
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                            return;
                        }
                        _ = stopping.wait_for(|stop| *stop) => {
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            // Reaps finished connections, so that the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let open = connections.len();
    if open > 0 {
        tracing::info!(open, "stopping: waiting for requests in flight");
    }
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace_ms = options.shutdown_grace.as_millis() as u64,
            "closing connections still open after the shutdown grace"
        );
        connections.shutdown().await;
    }
}

/// An accept error: a connection that failed before it was accepted is skipped; anything else
/// (out of file descriptors) is logged and retried after a pause, as `axum::serve` does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Whether a request names its host as HTTP asks: an HTTP/1.1 request in exactly one `Host`
/// header (RFC 9112, 3.2: a server must refuse one with none or more than one, `400`). Accepted,
/// two disagreed on which host the request was for: the console's origin check read the first
/// (an outside audit). HTTP/1.0 needs none.
fn one_host<B>(request: &Request<B>) -> bool {
    if request.version() != axum::http::Version::HTTP_11 {
        return true;
    }
    let mut hosts = request.headers().get_all(axum::http::header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_none()
}
