//! Serving an `App` over HTTP: the main listener, and the admin listener when there is one,
//! until shutdown; then the app's own shutdown (background tasks stopped, ledger flushed). This
//! is `App`'s HTTP side, kept here so that `app` knows no axum.

use std::future::Future;

use futures_util::FutureExt;
use tokio::net::TcpListener;

use crate::app::{App, AppError};

impl App {
    /// The main listener's routes (see `http::router`).
    pub fn router(&self) -> axum::Router {
        super::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then drains and flushes the ledger.
    /// With `admin_listen` set, also binds it and serves the admin API and `/metrics` there
    /// only.
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
        let shutdown = shutdown.shared();
        let main = super::main_router(self.state.clone(), admin.is_none());
        match admin {
            None => serve_listener(listener, main, shutdown).await?,
            Some(admin) => {
                let operator = super::admin_router(self.state.clone());
                tokio::try_join!(
                    serve_listener(listener, main, shutdown.clone()),
                    serve_listener(admin, operator, shutdown),
                )?;
            }
        }
        self.shutdown().await;
        Ok(())
    }
}

/// Serves `router` on `listener` until `shutdown` completes, letting requests in flight finish.
async fn serve_listener(
    listener: TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY, a response written as headers then body waits for the client's
    // delayed ACK (about 40 ms) on every kept-alive request, and stream chunks are held back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
