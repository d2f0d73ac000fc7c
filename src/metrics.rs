//! What operators see of the gateway: Prometheus text (format 0.0.4) on `/metrics`.
//!
//! # Design
//! Built on `prometheus-client`, the Prometheus project's own Rust client: a registry, typed
//! counters, gauges and histograms with label sets, and the text encoder; no HTTP server of its
//! own (the gateway's router serves `/metrics`), no default features, and its dependencies are
//! few (`dtoa`, `itoa`, `parking_lot`, a derive macro). The `metrics` facade with its Prometheus
//! exporter would bring a global recorder, an HTTP listener and more dependencies to do the same.
//!
//! **The hot path hashes no label set.** Every series whose labels are known in advance (the
//! decisions by outcome and limit, the histograms and token counters by route, the upstream's
//! failures) is created at start and kept as a handle: counting is one atomic add, observing a
//! histogram one uncontended lock. Those series are exported from the start, at zero. The one
//! label that is not known in advance is the tier (tiers are made by operators at run time): a
//! request finds its tier's handles in a map swapped whole when a tier is first seen
//! (`ArcSwap`, foldhash on the tier's name), and within them the counter of its route and status
//! in an array, created on first use. Only a status outside `STATUS_SLOTS` goes through the
//! family's own map.
//!
//! **Cardinality is bounded.** Labels take values from fixed sets (`route`, `outcome`, `limit`,
//! `policy`), from HTTP status codes, or from the tier catalogue, which operators make and keep
//! small; nothing that a client chooses (keys, workspaces, models, paths, request ids) is ever
//! a label. A request refused before its workspace is known counts under the tier `(none)`,
//! which no tier can be named (tier names are `a-z A-Z 0-9 - _ .`).
//!
//! **Latencies** (histograms in seconds, buckets from 25 µs to 60 s):
//! - `tiergate_upstream_latency_seconds`: from the moment the request is handed to the upstream
//!   client to the upstream's response headers (a stream's first byte; a JSON answer's whole
//!   generation, since its headers come with it). Only answers that came are observed; failures
//!   are counted apart.
//! - `tiergate_gateway_latency_seconds`: the time the gateway itself adds to a request: from the
//!   moment the proxy handler is called (the request's head read) to the moment its answer's
//!   head is handed to the server, *minus* the time spent waiting on others within it: for the
//!   client's body to arrive, for the upstream's headers, and for the upstream's body when it is
//!   read whole (JSON and error answers). What is left is the gateway's own work: the key, the
//!   body's inspection and estimate, the limiter's decision (a Redis round trip with Redis),
//!   forwarding, and, for an answer read whole, its settlement. A stream's body is passed on
//!   after the head and is not part of it. Every answered request is observed, denied ones too
//!   (their whole answer is the gateway's).
//!
//! **The reservation error** (`tiergate_reservation_error_tokens`) is one histogram of a signed
//! value, tokens reserved minus tokens settled, with buckets on both sides of zero: positive is
//! an estimate that held back too much, negative one that held back too little. Its `_sum` over
//! `_count` is the mean bias, which two histograms (over, under) would not give in one query.
//! Observed for settlements to the upstream's reported usage on metered routes only (a refund or
//! a settlement to the estimate itself says nothing of the estimate).
//!
//! **Gauges computed when scraped** (`Scrape`): the ledger's queue, the age of its last
//! successful write, the catalogue's staleness and version, the workspaces held in memory.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::estimate::Endpoint;
use crate::limiter::{DenialKind, LimitName};

/// The `Content-Type` of what `/metrics` answers.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Latency buckets, in seconds: 25 µs (a denial in memory) to 60 s (a long generation).
const LATENCY_BUCKETS: [f64; 20] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
];

/// Reservation error buckets, in tokens, on both sides of zero (powers of 4 up to about 1M).
fn error_buckets() -> Vec<f64> {
    let positive: Vec<f64> = (1..=10).map(|i| 4f64.powi(i)).collect();
    let mut buckets: Vec<f64> = positive.iter().rev().map(|b| -b).collect();
    buckets.push(0.0);
    buckets.extend(positive);
    buckets
}

/// The `route` label: the metered routes, and `other` for every other `/v1/*` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ChatCompletions,
    Completions,
    FimCompletions,
    Embeddings,
    Responses,
    Other,
}

const ROUTES: usize = 6;

impl Route {
    pub const ALL: [Route; ROUTES] = [
        Route::ChatCompletions,
        Route::Completions,
        Route::FimCompletions,
        Route::Embeddings,
        Route::Responses,
        Route::Other,
    ];

    pub fn of(endpoint: Option<Endpoint>) -> Route {
        match endpoint {
            Some(Endpoint::ChatCompletions) => Route::ChatCompletions,
            Some(Endpoint::Completions) => Route::Completions,
            Some(Endpoint::FimCompletions) => Route::FimCompletions,
            Some(Endpoint::Embeddings) => Route::Embeddings,
            Some(Endpoint::Responses) => Route::Responses,
            None => Route::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::FimCompletions => "fim_completions",
            Route::Embeddings => "embeddings",
            Route::Responses => "responses",
            Route::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The tier label of a request refused before its workspace was known.
pub const NO_TIER: &str = "(none)";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    status: u16,
    tier: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabel {
    route: Route,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyLabel {
    policy: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The status codes whose request counters a tier keeps at hand (the gateway's own answers and
/// the upstream's usual ones); others go through the family's map. `499` is a request whose
/// client left before its answer (nginx's code for it).
const STATUS_SLOTS: [u16; 15] = [
    200, 400, 401, 403, 404, 405, 408, 413, 422, 429, 499, 500, 502, 503, 504,
];

fn status_slot(status: u16) -> Option<usize> {
    STATUS_SLOTS.iter().position(|s| *s == status)
}

/// A tier's request counters, by route and status slot, each made on first use (so that only
/// what happened is exported).
#[derive(Debug)]
struct TierRequests {
    name: Arc<str>,
    counters: [[OnceLock<Counter>; STATUS_SLOTS.len()]; ROUTES],
}

impl TierRequests {
    fn new(name: &str) -> TierRequests {
        TierRequests {
            name: Arc::from(name),
            counters: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
        }
    }
}

type TierMap = std::collections::HashMap<Arc<str>, Arc<TierRequests>, foldhash::fast::RandomState>;

const LIMITS: [LimitName; 9] = [
    LimitName::RequestsPerSecond,
    LimitName::TokensPerMinute,
    LimitName::TokensPerMonth,
    LimitName::ConcurrentRequests,
    LimitName::ModelTokensPerMinute,
    LimitName::ModelTokensPerMonth,
    LimitName::KeyRequestsPerSecond,
    LimitName::KeyTokensPerMinute,
    LimitName::KeyTokensPerMonth,
];

/// Denials by kind (`DenialKind` order) and limit (`LIMITS` order), each made on its first
/// denial (not every pair can happen: a request is too large only for a token limit).
type DenialCounters = [[OnceLock<Counter>; LIMITS.len()]; 3];

/// Values read when `/metrics` is scraped, not kept up to date on the way.
pub struct Scrape {
    pub tracked_workspaces: usize,
    /// Settlements sent to the ledger writer and not yet taken by it.
    pub ledger_queue: usize,
    /// Since the catalogue was last brought up to date with the store.
    pub catalog_staleness: Duration,
    pub catalog_version: i64,
    /// HTTP/1 connections to the upstream waiting for a request.
    pub upstream_idle_connections: usize,
}

/// Every metric, as handles the code counts with; `render` writes them all.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// When this process's metrics began: the origin of the stored instants below.
    born: Instant,

    requests: Family<RequestLabels, Counter>,
    tiers: ArcSwap<TierMap>,
    /// The requests refused before their workspace was known.
    no_tier: TierRequests,
    /// Held while a tier is added to `tiers`.
    adding_tier: Mutex<()>,

    decisions: Family<DecisionLabels, Counter>,
    pub admitted: Counter,
    /// Reserve calls the limiter could not decide (Redis unavailable under `closed`, the month
    /// not seeded from an unreachable ledger).
    pub undecided: Counter,
    denials: DenialCounters,
    /// `quota_exceeded` by the workspace's own budget: `workspace_budget`, `model_budget`.
    /// By outcome (the quota reached, or a request too large for it), then workspace or model.
    budget_denials: [[OnceLock<Counter>; 2]; 2],

    pub unauthenticated: Counter,
    pub upstream_rate_limited: Counter,
    pub upstream_server_errors: Counter,
    pub upstream_unreachable: Counter,
    /// Connections the gateway opened to the upstream (HTTP/1 or HTTP/2).
    pub upstream_connections_opened: Counter,
    pub upstream_auth_failures: Counter,
    pub upstream_timeouts: Counter,
    /// Streams and downloads given up because the upstream went silent mid-body.
    pub upstream_idle_timeouts: Counter,
    pub refunds: Counter,
    tokens_estimated: [Counter; ROUTES],
    tokens_settled: [Counter; ROUTES],
    pub settled_without_usage: Counter,
    reservation_error: [Option<Histogram>; ROUTES],
    upstream_latency: [Histogram; ROUTES],
    gateway_latency: [Histogram; ROUTES],

    pub ledger_write_errors: Counter,
    pub limiter_errors: Counter,
    /// The shared limiter's backend (Redis): calls that failed or timed out.
    pub limiter_backend_errors: Counter,
    /// Times the circuit breaker opened (Redis judged down).
    pub limiter_breaker_opened: Counter,
    /// 1 while the shared limiter's backend answers (or none is configured), else 0.
    pub limiter_backend_up: Gauge,
    /// Decisions made without the shared limiter, by failure policy.
    /// Console sign-in attempts: a session made, refused (wrong, revoked or expired key,
    /// suspended workspace, another site's `Origin`, an unreadable form), or over the limit.
    pub console_signed_in: Counter,
    pub console_sign_in_refused: Counter,
    pub console_sign_in_rate_limited: Counter,
    pub fallback_closed: Counter,
    pub fallback_open: Counter,
    pub fallback_local: Counter,
    /// Instances sharing the limits, as last seen in Redis (0 unknown).
    pub instances: Gauge,
    /// Settlements waiting for the shared limiter to answer again.
    pub settlements_deferred: Gauge,
    /// Settlements written to the ledger without the shared limiter's confirmation.
    pub settlements_unconfirmed: Counter,
    /// Settlements the ledger did not take (its buffer full), and their tokens.
    pub ledger_dropped: Counter,
    pub ledger_dropped_tokens: Counter,
    /// Ledger rows (usage added up per workspace, day, model and counter) waiting to be written.
    pub ledger_pending: Gauge,
    /// Milliseconds after `born` of the ledger writer's last success (`ledger_written`).
    ledger_written_at: AtomicU64,
    pub catalog_refresh_errors: Counter,
    /// Webhook attempts answered 2xx; attempts that failed and will be made again; deliveries
    /// given up after the last attempt.
    pub webhooks_delivered: Counter,
    pub webhooks_retried: Counter,
    pub webhooks_failed: Counter,
    /// Requests a limit in shadow would have denied (admitted all the same), by limit.
    shadow_denied: Family<LimitLabel, Counter>,
    /// Calls to the shadow limiter that failed or timed out (skipped; the request went on).
    pub shadow_unavailable: Counter,

    // Set when scraped.
    tracked_workspaces: Gauge,
    upstream_idle_connections: Gauge,
    ledger_queue: Gauge,
    ledger_age: Gauge<f64, AtomicU64>,
    catalog_staleness: Gauge<f64, AtomicU64>,
    catalog_version: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Registers `metric` under `name` and hands it back, to be kept as a handle.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

fn latency_histograms(registry: &mut Registry, name: &str, help: &str) -> [Histogram; ROUTES] {
    let family = Family::<RouteLabel, Histogram, _>::new_with_constructor(|| {
        Histogram::new(LATENCY_BUCKETS)
    });
    registry.register(name, help, family.clone());
    Route::ALL.map(|route| family.get_or_create_owned(&RouteLabel { route }))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let reg = &mut r;
        let counter = |reg: &mut Registry, name: &str, help: &str| {
            registered(reg, name, help, Counter::default())
        };
        let gauge = |reg: &mut Registry, name: &str, help: &str| {
            registered(reg, name, help, Gauge::<i64>::default())
        };

        // Counter names are registered without `_total`, which the encoder adds; help texts
        // without their final period, which it adds too.
        let requests = Family::<RequestLabels, Counter>::default();
        reg.register(
            "tiergate_requests",
            "Requests on proxied /v1 routes, by route, answer status and the workspace's tier \
             (status 499: the client left before its answer; tier (none): refused before the \
             workspace was known)",
            requests.clone(),
        );

        let decisions = Family::<DecisionLabels, Counter>::default();
        reg.register(
            "tiergate_decisions",
            "The limiter's decisions, by outcome (admitted, rate_limited, quota_exceeded, \
             too_large, unavailable) and, for denials, the limit that decided",
            decisions.clone(),
        );
        let decision = |outcome: &'static str, limit: &'static str| {
            decisions.get_or_create_owned(&DecisionLabels { outcome, limit })
        };
        let admitted = decision("admitted", "");
        let undecided = decision("unavailable", "");
        let denials = std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new()));

        let unauthenticated = counter(
            reg,
            "tiergate_unauthenticated",
            "Requests refused for a missing or unknown key",
        );
        let upstream_rate_limited = counter(
            reg,
            "tiergate_upstream_rate_limited",
            "Upstream 429 answers passed through (not the workspace's own denials)",
        );
        let upstream_server_errors = counter(
            reg,
            "tiergate_upstream_server_errors",
            "Upstream 5xx answers passed through",
        );
        let upstream_unreachable = counter(
            reg,
            "tiergate_upstream_unreachable",
            "Upstream connection failures (502)",
        );
        let upstream_connections_opened = counter(
            reg,
            "tiergate_upstream_connections_opened",
            "Connections opened to the upstream",
        );
        let upstream_auth_failures = counter(
            reg,
            "tiergate_upstream_auth_failures",
            "Upstream 401/403: the gateway's own upstream key was refused (answered 502)",
        );
        let upstream_timeouts = counter(
            reg,
            "tiergate_upstream_timeouts",
            "Upstream timeouts answered 504: no headers in time, or a JSON or error body not \
             whole in time",
        );
        let upstream_idle_timeouts = counter(
            reg,
            "tiergate_upstream_idle_timeouts",
            "Streams and downloads ended because the upstream sent nothing for \
             upstream.idle_read_timeout_ms",
        );
        let refunds = counter(
            reg,
            "tiergate_refunds",
            "Reservations refunded because the upstream produced nothing",
        );
        let by_route = |reg: &mut Registry, name: &str, help: &str| {
            let family = Family::<RouteLabel, Counter>::default();
            reg.register(name, help, family.clone());
            Route::ALL.map(|route| family.get_or_create_owned(&RouteLabel { route }))
        };
        let tokens_estimated = by_route(
            reg,
            "tiergate_tokens_estimated",
            "Tokens reserved as estimates, by route",
        );
        let tokens_settled = by_route(
            reg,
            "tiergate_tokens_settled",
            "Tokens settled (the upstream's usage; the estimate when none could be read; 0 \
             when refunded), by route",
        );
        let settled_without_usage = counter(
            reg,
            "tiergate_settled_without_usage",
            "Requests settled to the estimate because no usage could be read",
        );
        let errors = Family::<RouteLabel, Histogram, _>::new_with_constructor(|| {
            Histogram::new(error_buckets())
        });
        reg.register(
            "tiergate_reservation_error_tokens",
            "Tokens reserved minus tokens settled, per request settled to the upstream's usage \
             on a metered route: positive when the estimate held back too much, negative too \
             little",
            errors.clone(),
        );
        let reservation_error = Route::ALL.map(|route| {
            (route != Route::Other).then(|| errors.get_or_create_owned(&RouteLabel { route }))
        });
        let upstream_latency = latency_histograms(
            reg,
            "tiergate_upstream_latency_seconds",
            "Time from sending a request upstream to the upstream's response headers, by route",
        );
        let gateway_latency = latency_histograms(
            reg,
            "tiergate_gateway_latency_seconds",
            "Time the gateway adds to a request, by route: from the handler's start to the \
             answer's head, less the waits for the client's body and for the upstream",
        );

        let ledger_write_errors = counter(
            reg,
            "tiergate_ledger_write_errors",
            "Failed ledger batch writes (retried)",
        );
        let limiter_errors = counter(reg, "tiergate_limiter_errors", "Limiter backend errors.");
        let limiter_backend_errors = counter(
            reg,
            "tiergate_limiter_backend_errors",
            "Calls to the shared limiter's Redis that failed or timed out",
        );
        let limiter_breaker_opened = counter(
            reg,
            "tiergate_limiter_breaker_opened",
            "Times the circuit breaker judged Redis down and stopped calling it",
        );
        let limiter_backend_up = gauge(
            reg,
            "tiergate_limiter_backend_up",
            "1 while the shared limiter's Redis answers (always 1 without Redis)",
        );
        limiter_backend_up.set(1);
        let fallback = Family::<PolicyLabel, Counter>::default();
        reg.register(
            "tiergate_limiter_fallback",
            "Decisions made without the shared limiter while Redis was unreachable, by failure \
             policy",
            fallback.clone(),
        );
        let [fallback_closed, fallback_open, fallback_local] = ["closed", "open", "local"]
            .map(|policy| fallback.get_or_create_owned(&PolicyLabel { policy }));
        let sign_ins = Family::<OutcomeLabel, Counter>::default();
        reg.register(
            "tiergate_console_sign_ins",
            "Console sign-in attempts, by outcome",
            sign_ins.clone(),
        );
        let [console_signed_in, console_sign_in_refused, console_sign_in_rate_limited] =
            ["signed_in", "refused", "too_many_attempts"]
                .map(|outcome| sign_ins.get_or_create_owned(&OutcomeLabel { outcome }));
        let instances = gauge(
            reg,
            "tiergate_instances",
            "Instances sharing the limits, as last seen in Redis (0 when unknown)",
        );
        let settlements_deferred = gauge(
            reg,
            "tiergate_settlements_deferred",
            "Settlements waiting for Redis to answer again",
        );
        let settlements_unconfirmed = counter(
            reg,
            "tiergate_settlements_unconfirmed",
            "Settlements written to the ledger that Redis never confirmed (it stayed down until \
             shutdown)",
        );
        let ledger_dropped = counter(
            reg,
            "tiergate_ledger_dropped",
            "Settlements not written to the ledger because its buffer of rows was full (the \
             store unreachable for long)",
        );
        let ledger_dropped_tokens = counter(
            reg,
            "tiergate_ledger_dropped_tokens",
            "Tokens of the settlements in tiergate_ledger_dropped_total",
        );
        let ledger_pending = gauge(
            reg,
            "tiergate_ledger_pending",
            "Ledger rows (usage added up per workspace, day, model and counter) waiting to be \
             written",
        );
        let ledger_queue = gauge(
            reg,
            "tiergate_ledger_queue",
            "Settlements sent to the ledger writer and not yet added to its rows",
        );
        let ledger_age = registered(
            reg,
            "tiergate_ledger_last_write_age_seconds",
            "Seconds since the ledger writer last succeeded: wrote every row it held (a flush \
             with nothing to write counts). Grows while the store does not take writes",
            Gauge::<f64, AtomicU64>::default(),
        );
        let catalog_refresh_errors = counter(
            reg,
            "tiergate_catalog_refresh_errors",
            "Periodic catalogue refreshes that failed (the last copy kept serving)",
        );
        let webhooks_delivered = counter(
            reg,
            "tiergate_webhook_deliveries_delivered",
            "Webhook deliveries a receiver took (answered 2xx)",
        );
        let webhooks_retried = counter(
            reg,
            "tiergate_webhook_attempts_failed",
            "Webhook attempts that failed (no answer, or not 2xx) and will be made again",
        );
        let shadow_denied = Family::<LimitLabel, Counter>::default();
        reg.register(
            "tiergate_shadow_denied",
            "Requests a limit in shadow would have denied (they were admitted), by the limit",
            shadow_denied.clone(),
        );
        // At 0 from the start, for every limit that can be in shadow, so that the metric is
        // there before the first shadow denial (a family without a series is not written).
        for limit in crate::model::ShadowLimit::ALL {
            let _ = shadow_denied.get_or_create_owned(&LimitLabel {
                limit: limit.as_str(),
            });
        }
        let shadow_unavailable = counter(
            reg,
            "tiergate_shadow_unavailable",
            "Calls to the shadow limiter that failed or timed out (the request went on without it)",
        );
        let webhooks_failed = counter(
            reg,
            "tiergate_webhook_deliveries_failed",
            "Webhook deliveries given up after their last attempt",
        );
        let catalog_staleness = registered(
            reg,
            "tiergate_catalog_staleness_seconds",
            "Seconds since the catalogue (keys, tiers, workspaces) was last brought up to date \
             with the store",
            Gauge::<f64, AtomicU64>::default(),
        );
        let catalog_version = gauge(
            reg,
            "tiergate_catalog_version",
            "The catalogue version this instance serves",
        );
        let tracked_workspaces = gauge(
            reg,
            "tiergate_tracked_workspaces",
            "Workspaces whose limiter state is in memory",
        );
        let upstream_idle_connections = gauge(
            reg,
            "tiergate_upstream_idle_connections",
            "HTTP/1 connections to the upstream waiting for a request",
        );

        Metrics {
            registry: r,
            born: Instant::now(),
            requests,
            tiers: ArcSwap::from_pointee(TierMap::default()),
            no_tier: TierRequests::new(NO_TIER),
            adding_tier: Mutex::new(()),
            decisions,
            admitted,
            undecided,
            denials,
            budget_denials: Default::default(),
            unauthenticated,
            upstream_rate_limited,
            upstream_server_errors,
            upstream_unreachable,
            upstream_connections_opened,
            upstream_auth_failures,
            upstream_timeouts,
            upstream_idle_timeouts,
            refunds,
            tokens_estimated,
            tokens_settled,
            settled_without_usage,
            reservation_error,
            upstream_latency,
            gateway_latency,
            ledger_write_errors,
            limiter_errors,
            limiter_backend_errors,
            limiter_breaker_opened,
            limiter_backend_up,
            console_signed_in,
            console_sign_in_refused,
            console_sign_in_rate_limited,
            fallback_closed,
            fallback_open,
            fallback_local,
            instances,
            settlements_deferred,
            settlements_unconfirmed,
            ledger_dropped,
            ledger_dropped_tokens,
            ledger_pending,
            ledger_written_at: AtomicU64::new(0),
            catalog_refresh_errors,
            webhooks_delivered,
            webhooks_retried,
            webhooks_failed,
            shadow_denied,
            shadow_unavailable,
            tracked_workspaces,
            upstream_idle_connections,
            ledger_queue,
            ledger_age,
            catalog_staleness,
            catalog_version,
        }
    }

    pub fn inc(counter: &Counter) {
        counter.inc();
    }

    pub fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// A denial by the workspace's own limits.
    /// A month denial by the cap the workspace set for itself (`/v1/budget`), labelled as its
    /// answer's code: `workspace_budget`, or `model_budget` for a model's.
    /// A denial by the workspace's own budget (`model`: a model's), counted under the code the
    /// answer gives, with the outcome of its kind: the budget reached, or a request that can
    /// never fit in it (`too_large`).
    pub fn denied_by_budget(&self, model: bool, kind: DenialKind) {
        let (i, limit) = if model {
            (1, "model_budget")
        } else {
            (0, "workspace_budget")
        };
        let k = usize::from(kind == DenialKind::RequestTooLarge);
        self.budget_denials[k][i]
            .get_or_init(|| {
                self.decisions.get_or_create_owned(&DecisionLabels {
                    outcome: denial_outcome(kind),
                    limit,
                })
            })
            .inc();
    }

    pub fn denied(&self, limit: LimitName, kind: DenialKind) {
        let k = match kind {
            DenialKind::RateLimited | DenialKind::ShareUsedUp => 0,
            DenialKind::QuotaExceeded => 1,
            DenialKind::RequestTooLarge => 2,
        };
        let l = LIMITS.iter().position(|x| *x == limit).unwrap_or(0);
        self.denials[k][l]
            .get_or_init(|| {
                self.decisions.get_or_create_owned(&DecisionLabels {
                    outcome: denial_outcome(kind),
                    limit: limit.as_str(),
                })
            })
            .inc();
    }

    /// A request a limit in shadow would have denied.
    pub fn shadow_denied(&self, limit: LimitName) {
        self.shadow_denied
            .get_or_create(&LimitLabel {
                limit: limit.as_str(),
            })
            .inc();
    }

    pub fn tokens_estimated(&self, route: Route, tokens: u64) {
        self.tokens_estimated[route.index()].inc_by(tokens);
    }

    /// A settlement of `settled` tokens; `reserved` is what the estimate held when the
    /// settlement is to the upstream's reported usage on a metered route.
    pub fn settled(&self, route: Route, settled: u64, reserved: Option<u64>) {
        self.tokens_settled[route.index()].inc_by(settled);
        if let (Some(reserved), Some(h)) = (reserved, &self.reservation_error[route.index()]) {
            h.observe(reserved as f64 - settled as f64);
        }
    }

    /// The ledger writer wrote everything it held (or had nothing to write).
    pub fn ledger_written(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.ledger_written_at.store(ms, Ordering::Relaxed);
    }

    /// A proxied request, from its handler's start.
    pub fn proxied(&self) -> ProxiedRequest<'_> {
        ProxiedRequest {
            metrics: self,
            started: Instant::now(),
            route: Route::Other,
            tier: None,
            waited: Duration::ZERO,
            answered: false,
        }
    }

    /// The request counters of `tier`, added on its first request.
    fn tier(&self, tier: &str) -> Arc<TierRequests> {
        if let Some(t) = self.tiers.load().get(tier) {
            return t.clone();
        }
        let _one_at_a_time = self.adding_tier.lock().unwrap_or_else(|e| e.into_inner());
        let tiers = self.tiers.load_full();
        if let Some(t) = tiers.get(tier) {
            return t.clone();
        }
        let entry = Arc::new(TierRequests::new(tier));
        let mut next = (*tiers).clone();
        next.insert(entry.name.clone(), entry.clone());
        self.tiers.store(Arc::new(next));
        entry
    }

    fn count_request(&self, route: Route, status: u16, tier: Option<&TierRequests>) {
        let tier = tier.unwrap_or(&self.no_tier);
        match status_slot(status) {
            Some(i) => tier.counters[route.index()][i]
                .get_or_init(|| {
                    self.requests.get_or_create_owned(&RequestLabels {
                        route,
                        status,
                        tier: tier.name.clone(),
                    })
                })
                .inc(),
            None => self
                .requests
                .get_or_create(&RequestLabels {
                    route,
                    status,
                    tier: tier.name.clone(),
                })
                .inc(),
        };
    }

    /// The whole exposition, with the gauges of `scrape` set first.
    pub fn render(&self, scrape: Scrape) -> String {
        let Scrape {
            tracked_workspaces,
            ledger_queue,
            catalog_staleness,
            catalog_version,
            upstream_idle_connections,
        } = scrape;
        self.tracked_workspaces.set(tracked_workspaces as i64);
        self.upstream_idle_connections
            .set(upstream_idle_connections as i64);
        self.ledger_queue.set(ledger_queue as i64);
        self.catalog_staleness.set(catalog_staleness.as_secs_f64());
        self.catalog_version.set(catalog_version);
        let now = self.born.elapsed().as_millis() as u64;
        let written = self.ledger_written_at.load(Ordering::Relaxed);
        self.ledger_age
            .set(now.saturating_sub(written) as f64 / 1000.0);
        let mut out = String::with_capacity(32 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

fn denial_outcome(kind: DenialKind) -> &'static str {
    match kind {
        DenialKind::RateLimited | DenialKind::ShareUsedUp => "rate_limited",
        DenialKind::QuotaExceeded => "quota_exceeded",
        DenialKind::RequestTooLarge => "too_large",
    }
}

/// One proxied request as the metrics count it: its route and tier once known, and the time
/// it spent waiting on others, so that what is left of its time is the gateway's own. It is
/// counted once, by `answered`; dropped unanswered (its client left), it counts as status 499.
pub struct ProxiedRequest<'a> {
    metrics: &'a Metrics,
    started: Instant,
    route: Route,
    tier: Option<Arc<TierRequests>>,
    waited: Duration,
    answered: bool,
}

impl ProxiedRequest<'_> {
    pub fn set_route(&mut self, route: Route) {
        self.route = route;
    }

    pub fn route(&self) -> Route {
        self.route
    }

    /// When the request arrived (the access log's clock too).
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn set_tier(&mut self, tier: &str) {
        self.tier = Some(self.metrics.tier(tier));
    }

    /// Awaits `work`, which waits on someone else (the client's body, the upstream): its time
    /// is not the gateway's.
    pub async fn waiting<F: Future>(&mut self, work: F) -> F::Output {
        let from = Instant::now();
        let out = work.await;
        self.waited += from.elapsed();
        out
    }

    /// The upstream answered with its headers after `took`.
    pub fn upstream_answered(&self, took: Duration) {
        self.metrics.upstream_latency[self.route.index()].observe(took.as_secs_f64());
    }

    /// Adds a wait measured by the caller.
    pub fn waited(&mut self, took: Duration) {
        self.waited += took;
    }

    /// The answer's head is ready: counts the request and the gateway's time.
    pub fn answered(mut self, status: u16) {
        self.answered = true;
        let own = self.started.elapsed().saturating_sub(self.waited);
        self.metrics.gateway_latency[self.route.index()].observe(own.as_secs_f64());
        self.metrics
            .count_request(self.route, status, self.tier.as_deref());
    }
}

impl Drop for ProxiedRequest<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics
                .count_request(self.route, 499, self.tier.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_route_status_and_tier_and_every_family_renders() {
        let m = Metrics::new();
        let mut r = m.proxied();
        r.set_tier("free");
        r.set_route(Route::ChatCompletions);
        r.answered(200);
        let mut r = m.proxied();
        r.set_tier("free");
        r.set_route(Route::ChatCompletions);
        r.answered(200);
        let mut r = m.proxied();
        r.set_tier("free");
        r.answered(418);
        drop(m.proxied());
        m.denied(LimitName::TokensPerMinute, DenialKind::RateLimited);
        m.settled(Route::Embeddings, 10, Some(7));
        let text = m.render(Scrape {
            tracked_workspaces: 3,
            ledger_queue: 0,
            catalog_staleness: Duration::from_millis(1500),
            catalog_version: 9,
            upstream_idle_connections: 2,
        });
        for line in [
            "tiergate_requests_total{route=\"chat_completions\",status=\"200\",tier=\"free\"} 2",
            "tiergate_requests_total{route=\"other\",status=\"418\",tier=\"free\"} 1",
            "tiergate_requests_total{route=\"other\",status=\"499\",tier=\"(none)\"} 1",
            "tiergate_decisions_total{outcome=\"rate_limited\",limit=\"tokens_per_minute\"} 1",
            "tiergate_decisions_total{outcome=\"admitted\",limit=\"\"} 0",
            "tiergate_tokens_settled_total{route=\"embeddings\"} 10",
            "tiergate_reservation_error_tokens_bucket{route=\"embeddings\",le=\"-4\"} 0",
            "tiergate_reservation_error_tokens_bucket{route=\"embeddings\",le=\"0\"} 1",
            "tiergate_reservation_error_tokens_sum{route=\"embeddings\"} -3.0",
            "tiergate_gateway_latency_seconds_count{route=\"chat_completions\"} 2",
            "tiergate_tracked_workspaces 3",
            "tiergate_upstream_idle_connections 2",
            "tiergate_catalog_staleness_seconds 1.5",
            "tiergate_catalog_version 9",
            "tiergate_limiter_backend_up 1",
            "tiergate_limiter_fallback_total{policy=\"local\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }
}
