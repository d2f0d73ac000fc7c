//! Usage alerts by webhook: what an endpoint may subscribe to, how a delivery is signed, and
//! the two background jobs that feed and empty the outbox.
//!
//! The outbox is the store's (`webhook_events`, `webhook_deliveries`): an event caused by a
//! change the store makes (a limit request created or decided, a workspace's tier changed or
//! its suspension) is written in that change's transaction, so no change is without its event
//! and a restart loses none. `quota.threshold` has no such change: the usage that crosses a
//! threshold is settled request by request and reaches the ledger in batches. So
//! `check_quotas` reads the month's totals of every workspace with a month quota (its tier's,
//! or its own budget where lower) every `webhook_quota_check`, and writes one event per
//! threshold crossed under a unique key (workspace, month, threshold): it fires once a month
//! per workspace and threshold whichever instance sees it first.
//!
//! `Dispatcher` sends what is due: it claims rows in the store (one instance a row at a time;
//! a claim lasts `CLAIM`, longer than an attempt can take, and a claim whose instance died
//! expires), posts each body signed as the Standard Webhooks specification says (`webhook-id`
//! the event's stable id, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">` keyed by the secret's bytes after `whsec_`), and records the
//! outcome: delivered on a 2xx; otherwise tried again after `retry_base` × 2^attempts (at most
//! `MAX_BACKOFF`), and `failed` after `MAX_ATTEMPTS`. Redirects are not followed. Delivery is at
//! least once: a receiver that answered but whose answer was lost gets the event again, with the
//! same id.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::limiter::MonthKey;
use crate::metrics::Metrics;
use crate::model::WorkspaceId;
use crate::store::{DeliveryOutcome, DueDelivery, Store, StoreError, WebhookEvent};

/// The events an endpoint may subscribe to.
pub const EVENT_TYPES: [&str; 6] = [
    "limit_request.created",
    "limit_request.decided",
    "limit_request.withdrawn",
    "workspace.tier_changed",
    "workspace.suspended",
    "quota.threshold",
];

/// Attempts per delivery before it is `failed`.
pub const MAX_ATTEMPTS: u32 = 12;
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The longest an attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a claimed delivery is an instance's own: well past an attempt's timeout.
const CLAIM: Duration = Duration::from_secs(30);
/// Deliveries claimed at once, at most.
const CLAIM_BATCH: u32 = 32;
/// Attempts in flight at once, at most (each holds a connection to its receiver for up to
/// `ATTEMPT_TIMEOUT`).
const MOST_IN_FLIGHT: usize = 256;
/// How long deliveries that are over stay listed.
pub const DELIVERY_RETENTION_SECS: i64 = 7 * 86_400;
/// How long a quota event's key is kept: past the end of any month it could be checked in.
pub const QUOTA_KEY_RETENTION_SECS: i64 = 62 * 86_400;
/// How often the outbox is pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The longest URL an endpoint may have.
pub const MAX_URL: usize = 2048;

/// An endpoint's URL, checked: `http` or `https`, with a host. The message names the field.
pub fn validate_url(url: &str) -> Result<String, String> {
    if url.len() > MAX_URL {
        return Err(format!("'url' must be at most {MAX_URL} bytes"));
    }
    let parsed = url::Url::parse(url.trim())
        .map_err(|e| format!("'url' must be an http or https URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("'url' must be an http or https URL".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("'url' must name a host".into());
    }
    Ok(parsed.to_string())
}

/// The events an endpoint subscribes to: a non-empty set of `EVENT_TYPES`, in their order.
pub fn validate_events(events: &[String]) -> Result<Vec<String>, String> {
    if events.is_empty() {
        return Err(format!(
            "'events' must name at least one of {}",
            EVENT_TYPES.join(", ")
        ));
    }
    if let Some(unknown) = events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
        return Err(format!(
            "'events': unknown event '{unknown}'; one of {}",
            EVENT_TYPES.join(", ")
        ));
    }
    Ok(EVENT_TYPES
        .iter()
        .filter(|t| events.iter().any(|e| e == *t))
        .map(|t| t.to_string())
        .collect())
}

/// A new signing secret: `whsec_` and the base64 of 24 random bytes.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `v1,<signature>` of a delivery, as a receiver computes it to check one.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap_or_else(|_| key.as_bytes().to_vec());
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The wait before the attempt after `attempts` failed ones.
pub fn backoff(base: Duration, attempts: u32) -> Duration {
    base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(MAX_BACKOFF)
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sends due deliveries.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    retry_base: Duration,
    metrics: Arc<Metrics>,
    /// The room for attempts in flight (`MOST_IN_FLIGHT`).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The attempts in flight, stopped with the gateway (`stop`).
    attempts: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        retry_base: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .build()?;
        Ok(Dispatcher {
            store,
            client,
            retry_base,
            metrics,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MOST_IN_FLIGHT)),
            attempts: std::sync::Mutex::new(tokio::task::JoinSet::new()),
        })
    }

    /// At a stop (no more claims are made): lets the attempts in flight end, within an
    /// attempt's time, so that their outcomes are recorded (an outside audit: an attempt cut by
    /// a stop left its delivery unrecorded until its claim expired, 30 s later); then stops
    /// what is left and waits until it has, so that nothing writes to the store after the
    /// stop. A delivery stopped so is sent again once its claim expires.
    pub async fn stop(&self) {
        let mut attempts =
            std::mem::take(&mut *self.attempts.lock().unwrap_or_else(|e| e.into_inner()));
        let ended = async { while attempts.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(ATTEMPT_TIMEOUT + Duration::from_secs(1), ended).await;
        attempts.abort_all();
        while attempts.join_next().await.is_some() {}
    }

    /// Claims what is due, as much as there is room for in flight, and starts sending it;
    /// returns how many were claimed. Each attempt runs on its own: a receiver slow or silent
    /// (up to `ATTEMPT_TIMEOUT`) holds back neither the other deliveries nor the next claim (an
    /// outside audit: when the batch was waited for whole, one silent endpoint delayed another's
    /// events by 4 s, and a workspace's ten silent endpoints the operator's by 33 s). Called by
    /// one loop at a time.
    pub async fn run_once(self: &Arc<Self>) -> Result<usize, StoreError> {
        let room = self.in_flight.available_permits().min(CLAIM_BATCH as usize);
        if room == 0 {
            return Ok(0);
        }
        let now = wall_ms();
        let due = self
            .store
            .claim_deliveries(now, now + CLAIM.as_millis() as i64, room as u32)
            .await?;
        let n = due.len();
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        // Those finished, so that the set holds only attempts in flight.
        while attempts.try_join_next().is_some() {}
        for d in due {
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                // Not while this loop alone takes room; the claim expires and it is sent again.
                break;
            };
            let dispatcher = self.clone();
            attempts.spawn(async move {
                dispatcher.attempt(d).await;
                drop(permit);
            });
        }
        Ok(n)
    }

    async fn attempt(&self, d: DueDelivery) {
        let timestamp = wall_ms() / 1000;
        let signature = sign(&d.secret, &d.event_id, timestamp, &d.payload);
        let sent = self
            .client
            .post(&d.url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(d.payload.clone())
            .send()
            .await;
        // The answer's body is not read: only its status counts. An error is told without the
        // URL (it may hold a token in its query).
        let (status, error) = match sent {
            Ok(r) => (Some(r.status().as_u16()), None),
            Err(e) => (None, Some(attempt_error(&e))),
        };
        let outcome = match (status, &error) {
            (Some(s), None) if (200..300).contains(&s) => DeliveryOutcome::Delivered { status: s },
            _ if d.attempts + 1 >= MAX_ATTEMPTS => DeliveryOutcome::Failed { status, error },
            _ => DeliveryOutcome::Retry {
                status,
                error,
                next_at_ms: wall_ms() + backoff(self.retry_base, d.attempts + 1).as_millis() as i64,
            },
        };
        match &outcome {
            DeliveryOutcome::Delivered { .. } => Metrics::inc(&self.metrics.webhooks_delivered),
            // The status or the error as the deliveries' `last_status_code` and `last_error` show
            // them, not the outcome's `Debug` (an outside audit: `Failed { status: Some(500), .. }`).
            DeliveryOutcome::Retry { status, error, .. } => {
                Metrics::inc(&self.metrics.webhooks_retried);
                let error = error.as_deref();
                tracing::debug!(event = %d.event_id, status, error, "webhook attempt failed");
            }
            DeliveryOutcome::Failed { status, error } => {
                Metrics::inc(&self.metrics.webhooks_failed);
                tracing::warn!(
                    event = %d.event_id,
                    delivery = d.id,
                    status,
                    error = error.as_deref(),
                    attempts = d.attempts + 1,
                    "webhook delivery given up"
                );
            }
        }
        if let Err(e) = self.store.finish_delivery(d.id, &outcome).await {
            // The claim expires and the row is sent again: at least once.
            tracing::warn!(error = %e, "could not record a webhook delivery's outcome");
        }
    }
}

/// Why an attempt got no answer, as the deliveries' `last_error` shows it: a timeout, a
/// connection that could not be made, or one that failed, with its innermost cause (`Connection
/// refused (os error 111)`). Every one read "error sending request" (an outside audit). Never the
/// URL, which may hold a token in its query.
fn attempt_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs());
    }
    let mut text = String::from(match e.is_connect() {
        true => "could not connect",
        false => "the connection failed",
    });
    let mut cause = std::error::Error::source(e);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c);
        cause = c.source();
    }
    if let Some(c) = innermost {
        text.push_str(": ");
        text.push_str(&c.to_string());
    }
    text
}

/// Writes a `quota.threshold` event for every threshold a workspace's month usage has crossed
/// and that is not in `fired` yet (this process's memory of what the store already holds).
/// Each is written once per workspace, month, quota and threshold: a quota raised within the
/// month (an approved increase, a larger budget) fires its thresholds again, as the new quota's
/// (once per month only, the workspace that got more and used it up was never told: an outside
/// audit).
/// Only workspaces some endpoint would hear about are read (none when no endpoint subscribes),
/// their month's tokens in one query per 1000. Returns how many events were new in the store.
pub async fn check_quotas(
    store: &dyn Store,
    catalog: &Catalog,
    clock: &dyn Clock,
    thresholds: &[u64],
    fired: &mut HashSet<(WorkspaceId, i32, u64, u64)>,
) -> Result<usize, StoreError> {
    let listening = store.list_webhooks(None).await?;
    let listening: Vec<_> = listening
        .iter()
        .filter(|e| e.events.iter().any(|t| t == "quota.threshold"))
        .collect();
    if listening.is_empty() {
        return Ok(0);
    }
    let everyone = listening.iter().any(|e| e.workspace_id.is_none());
    let now = clock.now();
    let month = MonthKey::of(now);
    fired.retain(|(_, m, _, _)| *m == month.0);
    let quotas: HashMap<WorkspaceId, (u64, bool)> = catalog
        .month_quotas()
        .into_iter()
        .filter(|(w, quota, _)| {
            *quota > 0
                && (everyone || listening.iter().any(|e| e.workspace_id == Some(*w)))
                && thresholds
                    .iter()
                    .any(|t| !fired.contains(&(*w, month.0, *quota, *t)))
        })
        .map(|(w, quota, budget)| (w, (quota, budget)))
        .collect();
    let ids: Vec<WorkspaceId> = quotas.keys().copied().collect();
    let month_name = format!("{:04}-{:02}", month.year(), month.month());
    let mut written = 0;
    for chunk in ids.chunks(1000) {
        let used = store.tokens_since(chunk, &month.first_day()).await?;
        for (workspace, tokens) in used {
            let Some(&(quota, budget)) = quotas.get(&workspace) else {
                continue;
            };
            for &threshold in thresholds {
                if tokens.saturating_mul(100) < quota.saturating_mul(threshold)
                    || fired.contains(&(workspace, month.0, quota, threshold))
                {
                    continue;
                }
                let event = WebhookEvent::new(
                    "quota.threshold",
                    workspace,
                    clock.now_secs(),
                    serde_json::json!({
                        "workspace_id": workspace,
                        "month": month_name,
                        "threshold_percent": threshold,
                        "tokens": tokens,
                        "quota": quota,
                        "quota_is_budget": budget,
                    }),
                    Some(format!(
                        "quota:{workspace}:{month_name}:{quota}:{threshold}"
                    )),
                );
                if store.enqueue_event(&event, clock.now_secs()).await? {
                    written += 1;
                }
                fired.insert((workspace, month.0, quota, threshold));
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_events_are_checked() {
        assert!(validate_url("https://example.com/hook").is_ok());
        assert!(validate_url("http://127.0.0.1:9/x").is_ok());
        for bad in [
            "ftp://example.com",
            "example.com",
            "file:///etc/passwd",
            "https://",
        ] {
            assert!(validate_url(bad).unwrap_err().contains("url"), "{bad}");
        }
        assert!(validate_events(&[]).is_err());
        assert!(validate_events(&["nope".into()])
            .unwrap_err()
            .contains("events"));
        assert_eq!(
            validate_events(&["quota.threshold".into(), "workspace.suspended".into()]).unwrap(),
            vec!["workspace.suspended", "quota.threshold"]
        );
    }

    #[test]
    fn secrets_and_signatures_follow_standard_webhooks() {
        let s = new_secret();
        assert!(s.starts_with("whsec_"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&s[6..])
            .unwrap();
        assert_eq!(bytes.len(), 24);
        // The Standard Webhooks specification's example.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 1), Duration::from_secs(1));
        assert_eq!(backoff(base, 2), Duration::from_secs(2));
        assert_eq!(backoff(base, 3), Duration::from_secs(4));
        assert_eq!(backoff(base, 11), MAX_BACKOFF);
    }
}
