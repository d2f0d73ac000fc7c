//! Assembles the gateway from a `Config`: store, catalogue, limiter, ledger writer, upstream
//! client, the admin operations, background tasks. `main` and the tests build the same `App`.
//! It knows no HTTP: `http::serve` serves an `App` (`App::serve`), and handlers share its
//! `AppState`.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::config::Config;
use crate::console::Console;
use crate::estimate::Estimator;
use crate::http::upstream::{Upstream, UPSTREAM_POOL_IDLE};
use crate::limiter::failover::Failover;
use crate::limiter::local::LocalLimiter;
use crate::limiter::redis::{RedisLimiter, RedisOptions, StartRefusal};
use crate::limiter::{Limiter, LimiterError, MonthKey, MonthSource, MonthTotals};
use crate::metrics::{Metrics, Scrape};
use crate::model::WorkspaceId;
use crate::shadow::{Shadow, ShadowMonths};
use crate::store::{Store, StoreError};
use crate::usage::{CatchUp, Recorder, CATCH_UP_PATIENCE};
use crate::webhooks::Dispatcher;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("store: {0}")]
    Store(StoreError),
    #[error("webhook client: {0}")]
    WebhookClient(reqwest::Error),
    #[error("upstream.url cannot be made into a request URI")]
    UpstreamUrl,
    #[error("upstream TLS: {0}")]
    UpstreamTls(String),
    #[error("{0}")]
    Io(std::io::Error),
    #[error("limiter: {0}")]
    Limiter(LimiterError),
    #[error(
        "redis: Redis refuses the credentials in the URL ({0}); check the user name and password"
    )]
    RedisRefused(String),
    #[error("redis: {0}")]
    RedisTopology(&'static str),
    #[error("{0}")]
    Admin(crate::admin::AdminError),
    #[error("stopped with usage the ledger could not take: {requests} requests, {tokens} tokens lost (the store did not answer)")]
    UsageLost { requests: u64, tokens: u64 },
}

// By hand rather than `#[from]`, which would also make the wrapped error the source: each
// message already shows it, and the chain printed at exit (`{:#}`) would show it twice.
macro_rules! app_error_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for AppError {
            fn from(e: $ty) -> Self {
                AppError::$variant(e)
            }
        })*
    };
}
app_error_from!(
    Store(StoreError),
    WebhookClient(reqwest::Error),
    Io(std::io::Error),
    Limiter(LimiterError),
    Admin(crate::admin::AdminError),
);

/// What every request handler shares.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub catalog: Arc<Catalog>,
    pub limiter: Arc<dyn Limiter>,
    /// The in-memory limiter: the limiter itself, or the shared one's fallback. Its idle
    /// workspaces are evicted here.
    pub local: Arc<LocalLimiter>,
    /// The limiter of the limits in shadow, whose state is kept apart (see `shadow`).
    pub shadow: Shadow,
    pub estimator: Estimator,
    pub recorder: Recorder,
    pub upstream: Upstream,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// The admin operations (the admin API's, the workspace's limit requests).
    pub admin: Admin,
    /// Work a request leaves behind when its client goes away or its body is dropped (a
    /// settlement, the drain of a stream's usage): a stop waits for it before the last ledger
    /// flush.
    pub tasks: TaskTracker,
    /// The console's sessions (their secret, from the store) and sign-in limiter.
    pub console: Console,
}

impl AppState {
    /// `/metrics`: the exposition, with the gauges read at scrape time.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(Scrape {
            tracked_workspaces: self.local.tracked_workspaces(),
            ledger_queue: self.recorder.queued(),
            catalog_staleness: self.catalog.staleness(),
            catalog_version: self.catalog.version(),
            upstream_idle_connections: self.upstream.client.idle_connections(),
        })
    }
}

/// A built gateway: its state and the background tasks that serve it.
pub struct App {
    pub state: Arc<AppState>,
    tasks: Vec<JoinHandle<()>>,
    ledger: JoinHandle<()>,
    dispatcher: Arc<Dispatcher>,
}

/// The ledger as the limiter's month source.
pub struct LedgerMonths(pub Arc<dyn Store>);

#[async_trait::async_trait]
impl MonthSource for LedgerMonths {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding: Option<&str>,
    ) -> Result<MonthTotals, LimiterError> {
        self.0
            .month_totals(workspace, month, excluding)
            .await
            .map_err(|e| LimiterError::Ledger(e.to_string()))
    }
}

/// A month source whose `catch_up` has this process's ledger writer settle and write what it
/// holds (`usage::CatchUp`): the source of the shared counters, whose new generations are based
/// on the ledger. The writer starts after the limiter (it settles through it), so it is given
/// once started.
pub struct CaughtUpMonths {
    ledger: Arc<dyn MonthSource>,
    writer: std::sync::OnceLock<CatchUp>,
}

impl CaughtUpMonths {
    pub fn new(ledger: Arc<dyn MonthSource>) -> Arc<Self> {
        Arc::new(CaughtUpMonths {
            ledger,
            writer: std::sync::OnceLock::new(),
        })
    }

    fn started(&self, writer: CatchUp) {
        let _ = self.writer.set(writer);
    }
}

#[async_trait::async_trait]
impl MonthSource for CaughtUpMonths {
    async fn month_totals(
        &self,
        workspace: WorkspaceId,
        month: MonthKey,
        excluding: Option<&str>,
    ) -> Result<MonthTotals, LimiterError> {
        self.ledger.month_totals(workspace, month, excluding).await
    }

    async fn catch_up(&self) {
        if let Some(writer) = self.writer.get() {
            writer.run().await;
        }
    }
}

/// The Redis key prefix of the shadow limiter's state: the primary's and `-s`, so the two never
/// share a key (shortened to stay within the 32 characters a prefix may have).
pub fn shadow_prefix(prefix: &str) -> String {
    let mut p: String = prefix.chars().take(30).collect();
    p.push_str("-s");
    p
}

/// Opens the store named by the config, SQLite or Postgres by the URL's scheme (creating and
/// migrating it).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    crate::store::open(&config.database).await
}

/// Builds the gateway: the one entry point for `main` and the tests.
pub async fn app(config: Config, clock: Arc<dyn Clock>) -> Result<App, AppError> {
    let store = open_store(&config).await?;
    let seeded = store.seed_tiers(&config.tiers).await?;
    if seeded > 0 {
        tracing::info!(seeded, "seeded tiers into the catalogue");
    }
    let catalog = Arc::new(Catalog::load(store.clone()).await?);
    let metrics = Arc::new(Metrics::default());
    let months: Arc<dyn MonthSource> = Arc::new(LedgerMonths(store.clone()));
    let local = Arc::new(LocalLimiter::new(months.clone()));
    let shadow_months: Arc<dyn MonthSource> = Arc::new(ShadowMonths(store.clone()));
    // The shared counters' sources: their new generations read the ledger once this process's
    // writer has caught up.
    let (shared_months, shadow_shared_months) = (
        CaughtUpMonths::new(months.clone()),
        CaughtUpMonths::new(shadow_months.clone()),
    );
    let shadow = match &config.redis {
        None => Shadow::local(Arc::new(LocalLimiter::new(shadow_months)), metrics.clone()),
        Some(redis) => {
            let options = RedisOptions {
                topology: redis.topology.clone(),
                prefix: shadow_prefix(&redis.prefix),
                timeout: redis.timeout,
                lease: redis.lease,
                time: redis.time,
            };
            let shared: Arc<dyn Limiter> =
                Arc::new(RedisLimiter::new(options, shadow_shared_months.clone())?);
            Shadow::shared(shared, redis.timeout, metrics.clone())
        }
    };
    let limiter: Arc<dyn Limiter> = match &config.redis {
        None => {
            if !config.database.starts_with("sqlite:") {
                tracing::warn!(
                    "a shared database without --redis: each instance enforces the limits on its own, so N instances admit up to N times each limit"
                );
            }
            local.clone()
        }
        Some(redis) => {
            let options = RedisOptions {
                topology: redis.topology.clone(),
                prefix: redis.prefix.clone(),
                timeout: redis.timeout,
                lease: redis.lease,
                time: redis.time,
            };
            let shared = Arc::new(RedisLimiter::new(options, shared_months.clone())?);
            match shared.refused_at_start().await {
                Some(StartRefusal::Credentials(why)) => return Err(AppError::RedisRefused(why)),
                Some(StartRefusal::ClusterNode) => {
                    return Err(AppError::RedisTopology(
                        "the server is a node of a Redis Cluster: set redis_cluster (--redis-cluster), or give two or more of its nodes as seeds",
                    ))
                }
                Some(StartRefusal::NotCluster) => {
                    return Err(AppError::RedisTopology(
                        "the server has no cluster support, and two or more URLs (or redis_cluster) make a Redis Cluster's seeds: give one URL, without redis_cluster, to use one server",
                    ))
                }
                None => {}
            }
            Failover::new(
                shared,
                local.clone(),
                redis.failure_policy,
                redis.instances,
                metrics.clone(),
                clock.clone(),
            )
        }
    };
    let (recorder, ledger) = Recorder::start(
        store.clone(),
        catalog.clone(),
        limiter.clone(),
        clock.clone(),
        metrics.clone(),
        config.ledger_flush,
    );
    let catch_up = recorder.catch_up(CATCH_UP_PATIENCE);
    shared_months.started(catch_up.clone());
    shadow_shared_months.started(catch_up);
    let upstream = Upstream::new(&config, metrics.upstream_connections_opened.clone())?;
    let estimator = Estimator::new(
        config.estimate.default_completion_tokens,
        config.estimate.history,
    );
    let webhook_wake = Arc::new(tokio::sync::Notify::new());
    let admin = Admin::new(store.clone(), clock.clone())
        .serving(catalog.clone(), recorder.clone())
        .waking(webhook_wake.clone());
    let mut candidate = [0u8; 32];
    getrandom::fill(&mut candidate).expect("the OS has randomness");
    let console = Console::new(store.console_secret(&candidate).await?);
    let dispatcher = Arc::new(Dispatcher::new(
        store.clone(),
        config.webhook_retry_base,
        metrics.clone(),
    )?);
    let state = Arc::new(AppState {
        config,
        store,
        catalog,
        limiter,
        local,
        shadow,
        estimator,
        recorder,
        upstream,
        clock,
        metrics,
        admin,
        tasks: TaskTracker::new(),
        console,
    });
    let tasks = vec![
        tokio::spawn(refresh_catalog(state.clone())),
        tokio::spawn(evict_idle(state.clone())),
        tokio::spawn(promote(state.clone())),
        tokio::spawn(deliver_webhooks(
            dispatcher.clone(),
            webhook_wake.clone(),
            state.config.webhook_idle_poll,
        )),
        tokio::spawn(check_quotas(state.clone(), webhook_wake)),
        tokio::spawn(close_idle_upstream(state.clone())),
    ];
    Ok(App {
        state,
        tasks,
        ledger,
        dispatcher,
    })
}

async fn refresh_catalog(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.catalog_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = state.catalog.refresh().await {
            Metrics::inc(&state.metrics.catalog_refresh_errors);
            tracing::warn!(error = %e, "catalog refresh failed; serving the last copy");
        }
    }
}

/// Every `promotion_interval`, promotes the workspaces whose tier's conditions now hold (an
/// attribute change also promotes at once, in `Admin::set_attributes`). Every instance runs it;
/// the store promotes a workspace once.
async fn promote(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.promotion_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: skip it, so that a start is not also a sweep.
    tick.tick().await;
    loop {
        tick.tick().await;
        match state.admin.promote(None).await {
            Ok(promoted) if !promoted.is_empty() => {
                tracing::info!(promoted = promoted.len(), "automatic promotion");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "automatic promotion could not run"),
        }
    }
}

/// How soon the webhook outbox is read again after a read that found work.
const WEBHOOK_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// Sends due webhook deliveries: again at once while a claim comes back full; at once when this
/// instance made a change (`wake`: events it wrote); else after a wait that doubles from 250 ms
/// to `idle` (`webhook_idle_poll`, 1 s: events made on other instances, and retries that fall
/// due, are found within it) while nothing is found. Every instance runs it; the store gives a
/// row to one at a time.
async fn deliver_webhooks(
    dispatcher: Arc<Dispatcher>,
    wake: Arc<tokio::sync::Notify>,
    idle: std::time::Duration,
) {
    let mut wait = WEBHOOK_POLL;
    loop {
        match dispatcher.run_once().await {
            Ok(n) if n > 0 => {
                wait = WEBHOOK_POLL;
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "webhook outbox could not be read"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => wait = (wait * 2).min(idle.max(WEBHOOK_POLL)),
            _ = wake.notified() => wait = WEBHOOK_POLL,
        }
    }
}

/// Every `webhook_quota_check`, writes the `quota.threshold` events of the thresholds crossed
/// this month (once per workspace, month and threshold, whoever writes it); hourly, prunes the
/// outbox.
async fn check_quotas(state: Arc<AppState>, wake: Arc<tokio::sync::Notify>) {
    let mut fired = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(state.config.webhook_quota_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned_at = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if pruned_at.elapsed() >= crate::webhooks::PRUNE_EVERY {
            pruned_at = tokio::time::Instant::now();
            let now = state.clock.now_secs();
            let pruned = state
                .store
                .prune_webhooks(
                    now - crate::webhooks::DELIVERY_RETENTION_SECS,
                    now - crate::webhooks::QUOTA_KEY_RETENTION_SECS,
                )
                .await;
            if let Err(e) = pruned {
                tracing::warn!(error = %e, "could not prune the webhook outbox");
            }
        }
        // What settled since the last flush counts too.
        state.recorder.flush().await;
        let checked = crate::webhooks::check_quotas(
            state.store.as_ref(),
            &state.catalog,
            state.clock.as_ref(),
            &state.config.webhook_quota_thresholds,
            &mut fired,
        )
        .await;
        match checked {
            Ok(n) if n > 0 => {
                tracing::info!(events = n, "quota thresholds crossed");
                wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "quota thresholds could not be checked"),
        }
    }
}

/// Closes the upstream connections idle for longer than `UPSTREAM_POOL_IDLE`, and those the
/// upstream closed, a fifth of that period apart.
async fn close_idle_upstream(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(UPSTREAM_POOL_IDLE / 5);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.upstream.client.close_idle();
    }
}

async fn evict_idle(state: Arc<AppState>) {
    let every = state.config.idle_eviction / 4;
    let idle_for = state.config.idle_eviction.as_nanos() as u64;
    loop {
        tokio::time::sleep(every).await;
        let now = state.clock.now();
        let catalog = state.catalog.clone();
        let evicted = state
            .local
            .evict_idle(now, idle_for, &|ws| catalog.limits_of(ws));
        if let Some(shadow) = state.shadow.local_limiter() {
            shadow.evict_idle(now, idle_for, &|ws| {
                catalog.workspace(ws).and_then(|e| e.shadow.clone())
            });
        }
        state
            .estimator
            .evict_idle(now, crate::estimate::HISTORY_IDLE.as_nanos() as u64);
        if evicted > 0 {
            tracing::debug!(evicted, "evicted idle workspaces");
        }
    }
}

// `App::router`, `App::serve` and `App::serve_with_admin` are in `http::serve`.
impl App {
    /// Stops the background tasks, waits for the settlements still running (for a client that
    /// left, the answer is awaited for at most `usage_drain`, then a stream read for at most as
    /// long again; a settlement's limiter calls are bounded by their own timeouts), then writes
    /// what the ledger still holds; answers the usage that could not be written (the store
    /// unreachable to the end).
    pub async fn shutdown(self) -> crate::usage::Unwritten {
        for t in &self.tasks {
            t.abort();
        }
        // Waited for, so that none of them runs on, and writes to the store, after the stop.
        for t in self.tasks {
            let _ = t.await;
        }
        // No request is decided any more: the shared limiter leaves the live instances.
        self.state.limiter.leave().await;
        self.dispatcher.stop().await;
        let tasks = &self.state.tasks;
        tasks.close();
        let wait = 2 * self.state.config.upstream.usage_drain + SETTLE_GRACE;
        if tokio::time::timeout(wait, tasks.wait()).await.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "settlements still running at the last ledger flush are lost"
            );
        }
        let unwritten = self.state.recorder.shutdown().await;
        drop(self.ledger);
        // Its connections closed now, not when the last reference goes: a gateway started next
        // on the same SQLite file finds no connection of this one's (a test restarting on one
        // file met "database is locked" at its start).
        self.state.store.close().await;
        if unwritten != crate::usage::Unwritten::default() {
            tracing::error!(
                requests = unwritten.requests,
                tokens = unwritten.tokens,
                "the store did not answer before the stop: this usage was settled but is not in the ledger, and is lost"
            );
        }
        unwritten
    }
}

/// At a stop, how long settlements may take beyond the usage drain.
const SETTLE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
