//! Counters for operators, rendered as Prometheus text on `/metrics`.
//!
//! A handful of atomics written by hand: the `metrics` facade plus an exporter would add an HTTP
//! server and a registry for a dozen counters that the gateway's own router already serves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::limiter::{DenialKind, LimitName};

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub admitted: AtomicU64,
    pub unauthenticated: AtomicU64,
    denied: [AtomicU64; 6],
    pub denied_too_large: AtomicU64,
    pub upstream_rate_limited: AtomicU64,
    pub upstream_server_errors: AtomicU64,
    pub upstream_unreachable: AtomicU64,
    pub upstream_auth_failures: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    /// Streams and downloads given up because the upstream went silent mid-body.
    pub upstream_idle_timeouts: AtomicU64,
    pub refunds: AtomicU64,
    pub tokens_estimated: AtomicU64,
    pub tokens_settled: AtomicU64,
    pub settled_without_usage: AtomicU64,
    pub ledger_write_errors: AtomicU64,
    pub limiter_errors: AtomicU64,
    /// The shared limiter's backend (Redis): calls that failed or timed out.
    pub limiter_backend_errors: AtomicU64,
    /// Times the circuit breaker opened (Redis judged down).
    pub limiter_breaker_opened: AtomicU64,
    /// Gauge: 1 while the shared limiter's backend answers (or none is configured).
    pub limiter_backend_down: AtomicU64,
    /// Decisions made without the shared limiter, by failure policy.
    pub fallback_closed: AtomicU64,
    pub fallback_open: AtomicU64,
    pub fallback_local: AtomicU64,
    /// Gauge: instances sharing the limits, as last seen in Redis (0 unknown).
    pub instances: AtomicU64,
    /// Gauge: settlements waiting for the shared limiter to answer again.
    pub settlements_deferred: AtomicU64,
    /// Settlements written to the ledger without the shared limiter's confirmation.
    pub settlements_unconfirmed: AtomicU64,
    /// Settlements the ledger did not take (its buffer full), and their tokens.
    pub ledger_dropped: AtomicU64,
    pub ledger_dropped_tokens: AtomicU64,
    /// Gauge: ledger rows (usage added up per workspace, day, model and counter) waiting to be
    /// written.
    pub ledger_pending: AtomicU64,
}

const LIMITS: [LimitName; 6] = [
    LimitName::RequestsPerSecond,
    LimitName::TokensPerMinute,
    LimitName::TokensPerMonth,
    LimitName::ConcurrentRequests,
    LimitName::ModelTokensPerMinute,
    LimitName::ModelTokensPerMonth,
];

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn denied(&self, limit: LimitName, kind: DenialKind) {
        if kind == DenialKind::RequestTooLarge {
            Self::inc(&self.denied_too_large);
        } else {
            let i = LIMITS.iter().position(|l| *l == limit).unwrap_or(0);
            Self::inc(&self.denied[i]);
        }
    }

    pub fn render(&self, tracked_workspaces: usize) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "tiergate_requests_total",
            "Requests received on /v1 routes.",
            get(&self.requests),
        );
        counter(
            "tiergate_admitted_total",
            "Requests admitted by the limiter.",
            get(&self.admitted),
        );
        counter(
            "tiergate_unauthenticated_total",
            "Requests refused for a missing or unknown key.",
            get(&self.unauthenticated),
        );
        counter(
            "tiergate_denied_too_large_total",
            "Requests that can never fit a limit.",
            get(&self.denied_too_large),
        );
        counter(
            "tiergate_upstream_rate_limited_total",
            "Upstream 429 answers passed through (not the workspace's own denials).",
            get(&self.upstream_rate_limited),
        );
        counter(
            "tiergate_upstream_server_errors_total",
            "Upstream 5xx answers passed through.",
            get(&self.upstream_server_errors),
        );
        counter(
            "tiergate_upstream_unreachable_total",
            "Upstream connection failures (502).",
            get(&self.upstream_unreachable),
        );
        counter(
            "tiergate_upstream_auth_failures_total",
            "Upstream 401/403: the gateway's own upstream key was refused (answered 502).",
            get(&self.upstream_auth_failures),
        );
        counter(
            "tiergate_upstream_timeouts_total",
            "Upstream timeouts answered 504: no headers in time, or a JSON or error body not whole in time.",
            get(&self.upstream_timeouts),
        );
        counter(
            "tiergate_upstream_idle_timeouts_total",
            "Streams and downloads ended because the upstream sent nothing for upstream.idle_read_timeout_ms.",
            get(&self.upstream_idle_timeouts),
        );
        counter(
            "tiergate_refunds_total",
            "Reservations refunded because the upstream produced nothing.",
            get(&self.refunds),
        );
        counter(
            "tiergate_tokens_estimated_total",
            "Tokens reserved as estimates.",
            get(&self.tokens_estimated),
        );
        counter(
            "tiergate_tokens_settled_total",
            "Tokens settled from upstream usage.",
            get(&self.tokens_settled),
        );
        counter(
            "tiergate_settled_without_usage_total",
            "Requests settled to the estimate because no usage could be read.",
            get(&self.settled_without_usage),
        );
        counter(
            "tiergate_ledger_write_errors_total",
            "Failed ledger batch writes (retried).",
            get(&self.ledger_write_errors),
        );
        counter(
            "tiergate_limiter_errors_total",
            "Limiter backend errors.",
            get(&self.limiter_errors),
        );
        counter(
            "tiergate_limiter_backend_errors_total",
            "Calls to the shared limiter's Redis that failed or timed out.",
            get(&self.limiter_backend_errors),
        );
        counter(
            "tiergate_limiter_breaker_opened_total",
            "Times the circuit breaker judged Redis down and stopped calling it.",
            get(&self.limiter_breaker_opened),
        );
        counter(
            "tiergate_ledger_dropped_total",
            "Settlements not written to the ledger because its buffer of rows was full (the store unreachable for long).",
            get(&self.ledger_dropped),
        );
        counter(
            "tiergate_ledger_dropped_tokens_total",
            "Tokens of the settlements in tiergate_ledger_dropped_total.",
            get(&self.ledger_dropped_tokens),
        );
        counter(
            "tiergate_settlements_unconfirmed_total",
            "Settlements written to the ledger that Redis never confirmed (it stayed down until shutdown).",
            get(&self.settlements_unconfirmed),
        );
        let _ = writeln!(out, "# HELP tiergate_limiter_fallback_total Decisions made without the shared limiter while Redis was unreachable, by failure policy.\n# TYPE tiergate_limiter_fallback_total counter");
        for (policy, c) in [
            ("closed", &self.fallback_closed),
            ("open", &self.fallback_open),
            ("local", &self.fallback_local),
        ] {
            let _ = writeln!(
                out,
                "tiergate_limiter_fallback_total{{policy=\"{policy}\"}} {}",
                get(c)
            );
        }
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "tiergate_limiter_backend_up",
            "1 while the shared limiter's Redis answers (always 1 without Redis).",
            1 - get(&self.limiter_backend_down).min(1),
        );
        gauge(
            "tiergate_instances",
            "Instances sharing the limits, as last seen in Redis (0 when unknown).",
            get(&self.instances),
        );
        gauge(
            "tiergate_ledger_pending",
            "Ledger rows (usage added up per workspace, day, model and counter) waiting to be written.",
            get(&self.ledger_pending),
        );
        gauge(
            "tiergate_settlements_deferred",
            "Settlements waiting for Redis to answer again.",
            get(&self.settlements_deferred),
        );
        let _ = writeln!(out, "# HELP tiergate_denied_total Requests denied by the workspace's own limits.\n# TYPE tiergate_denied_total counter");
        for (limit, c) in LIMITS.iter().zip(&self.denied) {
            let _ = writeln!(
                out,
                "tiergate_denied_total{{limit=\"{}\"}} {}",
                limit.as_str(),
                get(c)
            );
        }
        let _ = writeln!(out, "# HELP tiergate_tracked_workspaces Workspaces whose limiter state is in memory.\n# TYPE tiergate_tracked_workspaces gauge\ntiergate_tracked_workspaces {tracked_workspaces}");
        out
    }
}
