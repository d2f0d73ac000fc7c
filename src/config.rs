//! Configuration, read in two phases: raw settings from the file, the environment and the flags
//! (each a `RawSettings` of options) are layered, flags over environment over file over
//! defaults, then validated into a `Config`. Invalid input is refused with the field's name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::limiter::redis::{validate_prefix, TimeSource, Topology};
use crate::model::{default_tiers, AttributeValue, Tier, TierSpec};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// A TOML file's mistake as told: its line and column and what is wrong, without the line
/// itself, which the TOML library quotes (an outside audit: a duplicated `admin_token`, a
/// misspelt `api_kee` or an unterminated string printed the token whole, on stderr and in the
/// journal through `config check`), and without a quoted value.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = without_values(e.message());
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
            match key_at(text, line) {
                // The setting named as `serve`'s other messages name it (an outside audit:
                // `max_body_bytes = -1` was told by its line and column alone).
                Some(key) => format!("{key} (line {line}, column {column}): {message}"),
                None => format!("line {line}, column {column}: {message}"),
            }
        }
        None => message,
    }
}

/// The setting that line `line` (from 1) of a TOML file sets, with the table it is in:
/// `upstream.timeout_secs` for `timeout_secs = …` under `[upstream]`. `None` for a line that
/// is not a plain `key = value` (a table's header, a value spread over lines), or a key that is
/// not plain: the line itself is never quoted, as it may hold a secret.
fn key_at(text: &str, line: usize) -> Option<String> {
    let plain = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if i + 1 == line {
            let (key, _) = l.split_once('=')?;
            let key = key.trim();
            return plain(key).then(|| match table.is_empty() {
                true => key.to_string(),
                false => format!("{table}.{key}"),
            });
        }
        if let Some(header) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            let header = header.trim_matches(|c| c == '[' || c == ' ');
            table = if plain(header) {
                header.to_string()
            } else {
                String::new()
            };
        }
    }
    None
}

/// `message` with each double-quoted part (a value serde quotes: `invalid type: string "…"`) as
/// `"***"`; names stay (serde and TOML quote them with backquotes), and so does a quote character
/// quoted so (TOML's ``expected `"` ``, which was masked into ``expected `"***"` ``: an outside
/// audit).
fn without_values(message: &str) -> String {
    const QUOTE: &str = "`\"`";
    const HELD: &str = "`\u{0}`";
    let message = message.replace(QUOTE, HELD);
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    for part in parts {
        if inside {
            out.push_str("\"***\"");
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out.trim_end().replace(HELD, QUOTE)
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Settings as given, before validation. Every field is optional; later layers win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    pub listen: Option<String>,
    /// Where the admin API, `/metrics` and the console's operator pages are served, alone;
    /// without it, on `listen`.
    pub admin_listen: Option<String>,
    pub database: Option<String>,
    /// The single admin token, named `admin`.
    pub admin_token: Option<String>,
    /// Named admin tokens (the file's `[[admin_tokens]]`): the audit records the name.
    pub admin_tokens: Option<Vec<RawAdminToken>>,
    pub max_body_bytes: Option<usize>,
    /// A request's head (line and headers) must arrive whole within this; it also closes a
    /// kept-alive connection that stays idle this long.
    pub header_read_timeout_ms: Option<u64>,
    /// A request's body must arrive whole within this, counted from its head.
    pub body_read_timeout_ms: Option<u64>,
    /// On stop, how long requests in flight (streams included) may take to finish.
    pub shutdown_grace_ms: Option<u64>,
    pub catalog_refresh_ms: Option<u64>,
    /// How often workspaces are checked for automatic promotion, in seconds (default 60).
    pub promotion_interval_secs: Option<u64>,
    /// The wait before a failed webhook delivery's first retry, doubled at each (default 1000).
    pub webhook_retry_base_ms: Option<u64>,
    /// How often month usage is checked against the quota thresholds, in ms (default 30000).
    pub webhook_quota_check_ms: Option<u64>,
    /// The shares of the month quota, in percent, at which `quota.threshold` fires
    /// (default 50, 80, 100): numbers in a file, a comma-separated list in a flag or variable.
    pub webhook_quota_thresholds: Option<Vec<RawNumber>>,
    /// One `redis://` URL (a single server), or a comma-separated list of seed nodes (a Redis
    /// Cluster). Without it, limiter state stays in memory.
    pub redis: Option<String>,
    /// Makes a single URL a cluster seed.
    pub redis_cluster: Option<bool>,
    pub redis_timeout_ms: Option<u64>,
    /// `closed`, `open` or `local`.
    pub redis_failure_policy: Option<String>,
    pub redis_lease_ms: Option<u64>,
    pub redis_prefix: Option<String>,
    /// How many instances share the limits, for the `local` failure policy (else the count seen
    /// in Redis).
    pub instances: Option<u32>,
    /// The families of rate-limit headers sent: `openai`, `ietf`, `mistral`.
    pub rate_limit_headers: Option<Vec<String>>,
    /// `text` (the default) or `json`.
    pub log_format: Option<String>,
    /// Web origins whose pages may call the `/v1/` routes from a browser (CORS).
    pub cors_origins: Option<Vec<String>>,
    /// One log line per proxied request (default true).
    pub access_log: Option<bool>,
    /// Threads that serve requests (default: one per core this process may use).
    pub workers: Option<u64>,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub estimate: RawEstimate,
    /// Tiers that seed the catalogue when absent from the database: each its rank and limits.
    #[serde(default)]
    pub tiers: BTreeMap<String, TierSpec>,
}

/// A number a file gives as a number and a flag or variable as text.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RawNumber {
    Number(i64),
    Text(String),
}

/// One `[[admin_tokens]]` entry.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminToken {
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for RawAdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawAdminToken")
            .field("name", &self.name)
            .field("token", &"***")
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub api_key: Option<String>,
    /// Ask streams for usage with `stream_options.include_usage` (default true). Turn off for
    /// upstreams that send usage anyway and refuse the option, such as the Mistral API.
    pub request_stream_usage: Option<bool>,
    /// What is forwarded off the metered routes: `all`, `reads` or `none` (`Unmetered`).
    pub unmetered: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    /// Time allowed until the upstream's response headers arrive.
    pub timeout_secs: Option<u64>,
    /// After a client leaves, how long the gateway keeps waiting for and reading the answer for its usage.
    pub usage_drain_ms: Option<u64>,
    /// The longest an upstream's body (stream, JSON, error) may stay silent.
    pub idle_read_timeout_ms: Option<u64>,
    /// The largest JSON or error answer read whole; a larger one is passed on as it comes.
    pub max_buffered_bytes: Option<u64>,
    /// Request headers never forwarded upstream, added to the built-in list.
    pub drop_request_headers: Option<Vec<String>>,
    /// A PEM file of root certificates trusted for the upstream besides the Mozilla roots.
    pub ca_file: Option<String>,
    /// The most HTTP/1.1 connections kept open for reuse while idle (default 1024).
    pub max_idle_connections: Option<u64>,
    /// The most requests at once on one HTTP/2 connection (default 100).
    pub max_streams_per_connection: Option<u64>,
    /// How long an HTTP/2 connection with requests on it may stay silent before a PING checks it
    /// (default 20000; 0: never).
    pub http2_keepalive_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEstimate {
    pub default_completion_tokens: Option<u64>,
    pub history: Option<usize>,
    /// The largest `max_tokens` (or `max_completion_tokens`, `max_output_tokens`) a metered
    /// request may ask for; above it, `400`.
    pub max_tokens_limit: Option<u64>,
}

impl RawSettings {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = Self::read_file(path)?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: toml_error(&text, &e),
        })
    }

    fn read_file(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// What is forwarded off the metered routes, where nothing is reserved and a request's tokens
/// are counted only once its answer reports them: so their token limits hold only after the
/// fact (requests at once may each get in while some of the limit is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmetered {
    /// Every method the gateway passes on.
    All,
    /// The routes that keep nothing at the upstream (the default, `STATELESS_ROUTES`): every
    /// workspace reaches the upstream through the gateway's one account, and what one stored
    /// there (files, batches, fine-tunes, assistants, stored completions and responses) every
    /// other could list, read and delete (an outside audit).
    Stateless,
    /// `GET`, `HEAD` and `OPTIONS` without a body only, which the known APIs never charge tokens
    /// for.
    Reads,
    /// Nothing: only the metered routes reach the upstream.
    None,
}

impl Unmetered {
    pub fn as_str(self) -> &'static str {
        match self {
            Unmetered::All => "all",
            Unmetered::Stateless => "stateless",
            Unmetered::Reads => "reads",
            Unmetered::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL without `/v1`; `None` where no upstream is needed (admin commands).
    pub url: Option<url::Url>,
    pub api_key: Option<String>,
    pub request_stream_usage: bool,
    pub unmetered: Unmetered,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub usage_drain: Duration,
    /// The longest an upstream's body may stay silent before the gateway gives up on it.
    pub idle_read_timeout: Duration,
    /// The largest JSON or error answer read whole (for its usage, before the answer leaves); a
    /// larger one is passed on as it comes, its usage read from its end.
    pub max_buffered_bytes: usize,
    /// Request headers never forwarded (lowercase): [`DROPPED_REQUEST_HEADERS`] and the
    /// configuration's own.
    pub drop_request_headers: Vec<String>,
    /// The PEM file `extra_roots` were read from, as given (for `config check`).
    pub ca_file: Option<String>,
    /// Root certificates (DER) from `upstream.ca_file`, trusted besides the Mozilla roots.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The most idle HTTP/1.1 connections kept for reuse; past it the least recently used is
    /// closed.
    pub max_idle_connections: usize,
    /// The most requests in flight at once on one HTTP/2 connection; past it, another
    /// connection is made.
    pub max_streams_per_connection: usize,
    /// How long an HTTP/2 connection with requests on it may stay silent before a PING checks
    /// it; unanswered as long again, the connection is closed. `None`: never.
    pub http2_keepalive: Option<Duration>,
}

/// Request headers by which a client could choose whose account, organisation or project the
/// upstream bills, or present credentials of its own: never forwarded. The configuration's
/// `upstream.drop_request_headers` adds to them. Besides OpenAI's and Azure OpenAI's, the
/// credential and billing headers of the gateways an upstream may sit behind (Azure API
/// Management's subscription key, Google's API key and billed project), and the method
/// overrides, by which a `GET` (forwarded unmetered) could be run as a `POST` by an upstream that
/// honours them: an outside audit saw each forwarded; and the path overrides, by which an
/// upstream behind IIS, Symfony or a proxy that honours them would serve another path than the
/// one metered (another audit).
pub const DROPPED_REQUEST_HEADERS: [&str; 14] = [
    "openai-organization",
    "openai-project",
    "api-key",
    "x-api-key",
    "cookie",
    "ocp-apim-subscription-key",
    "x-goog-api-key",
    "x-goog-user-project",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-prefix",
];

#[derive(Debug, Clone)]
pub struct EstimateConfig {
    pub default_completion_tokens: u64,
    pub history: usize,
    pub max_tokens_limit: u64,
}

/// How a setting's text, from a flag or the environment, is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// A whole number.
    Number,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`); a flag alone means `true`.
    Switch,
    /// Comma-separated.
    List,
}

/// One setting, declared once: its key in the file (`[upstream] api_key` is
/// `upstream.api_key`), its flag and its environment variable. The naming rule: the flag is
/// `--` and the key with `.` and `_` as `-`; the variable is `TIERGATE_` and the key in capitals
/// with `.` as `_`. One exception, kept from the first release: the upstream's URL is
/// `--upstream` and `TIERGATE_UPSTREAM`. (`admin_tokens` and `tiers`, lists of tables, are set in
/// the file only.)
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    pub flag: &'static str,
    pub env: &'static str,
    pub kind: Kind,
    /// What it does, and its default: the flag's help.
    pub help: &'static str,
}

const fn setting(
    key: &'static str,
    flag: &'static str,
    env: &'static str,
    kind: Kind,
    help: &'static str,
) -> Setting {
    Setting {
        key,
        flag,
        env,
        kind,
        help,
    }
}

use Kind::{List, Number, Switch, Text};

/// Every setting a flag, a variable or a file key can give.
pub const SETTINGS: &[Setting] = &[
    setting("listen", "listen", "TIERGATE_LISTEN", Text, "Address to listen on (default 127.0.0.1:8080)."),
    setting("admin_listen", "admin-listen", "TIERGATE_ADMIN_LISTEN", Text, "Serve the admin API, /metrics and the console's operator pages on this address only (e.g. 127.0.0.1:8081); the main listener then answers them 404. Default: on the main listener."),
    setting("database", "database", "TIERGATE_DATABASE", Text, "Database URL: sqlite://PATH (default sqlite://tiergate.db) or postgres://USER@HOST:PORT/DATABASE."),
    setting("admin_token", "admin-token", "TIERGATE_ADMIN_TOKEN", Text, "Bearer token of the admin API, named `admin` in the audit (more, each with a name: [[admin_tokens]] in the config file); without any, the admin API answers 403."),
    setting("max_body_bytes", "max-body-bytes", "TIERGATE_MAX_BODY_BYTES", Number, "Larger request bodies get 413 (default 4194304)."),
    setting("header_read_timeout_ms", "header-read-timeout-ms", "TIERGATE_HEADER_READ_TIMEOUT_MS", Number, "A request's head must arrive whole within this, in ms; it also closes a kept-alive connection idle this long (default 30000)."),
    setting("body_read_timeout_ms", "body-read-timeout-ms", "TIERGATE_BODY_READ_TIMEOUT_MS", Number, "A request's body must arrive whole within this, in ms, from its head (default 60000)."),
    setting("shutdown_grace_ms", "shutdown-grace-ms", "TIERGATE_SHUTDOWN_GRACE_MS", Number, "On stop, how long requests in flight may take to finish, in ms (default 20000)."),
    setting("catalog_refresh_ms", "catalog-refresh-ms", "TIERGATE_CATALOG_REFRESH_MS", Number, "How often changes made by other processes are picked up, in ms (default 1000)."),
    setting("promotion_interval_secs", "promotion-interval-secs", "TIERGATE_PROMOTION_INTERVAL_SECS", Number, "How often workspaces are checked for automatic promotion, in s (default 60; 1 to 86400)."),
    setting("webhook_retry_base_ms", "webhook-retry-base-ms", "TIERGATE_WEBHOOK_RETRY_BASE_MS", Number, "The wait before a failed webhook delivery is tried again, in ms, doubled at each retry up to 10 minutes (default 1000; 10 to 600000)."),
    setting("webhook_quota_check_ms", "webhook-quota-check-ms", "TIERGATE_WEBHOOK_QUOTA_CHECK_MS", Number, "How often month usage is checked for quota.threshold webhook events, in ms (default 30000; 100 to 3600000)."),
    setting("webhook_quota_thresholds", "webhook-quota-thresholds", "TIERGATE_WEBHOOK_QUOTA_THRESHOLDS", List, "The shares of the month quota (or budget), in percent, at which quota.threshold webhook events fire (default 50,80,100; 1 to 10 of them, each 1 to 100)."),
    setting("redis", "redis", "TIERGATE_REDIS", Text, "Share limits through Redis: redis://[user:password@]host:port[/db] (or rediss://), or a comma-separated list of Redis Cluster seed nodes."),
    setting("redis_cluster", "redis-cluster", "TIERGATE_REDIS_CLUSTER", Switch, "Treat a single --redis URL as a Redis Cluster seed."),
    setting("redis_timeout_ms", "redis-timeout-ms", "TIERGATE_REDIS_TIMEOUT_MS", Number, "The longest a Redis call may take, in ms (default 50)."),
    setting("redis_failure_policy", "redis-failure-policy", "TIERGATE_REDIS_FAILURE_POLICY", Text, "While Redis is unreachable: closed (503), open (admit), or local (each instance its share of every limit; the default)."),
    setting("redis_lease_ms", "redis-lease-ms", "TIERGATE_REDIS_LEASE_MS", Number, "How long a request's reservation lives in Redis without renewal, in ms (default 30000)."),
    setting("redis_prefix", "redis-prefix", "TIERGATE_REDIS_PREFIX", Text, "The prefix of every Redis key (default tg)."),
    setting("instances", "instances", "TIERGATE_INSTANCES", Number, "How many instances share the limits, for the local failure policy (default: the count seen in Redis)."),
    setting("cors_origins", "cors-origins", "TIERGATE_CORS_ORIGINS", List, "Web origins (scheme://host[:port]) whose pages may call the /v1/ routes from a browser, or * for any (default: none)."),
    setting("rate_limit_headers", "rate-limit-headers", "TIERGATE_RATE_LIMIT_HEADERS", List, "The rate-limit header families sent: openai, ietf, mistral, or none (default openai,ietf)."),
    setting("log_format", "log-format", "TIERGATE_LOG_FORMAT", Text, "Log lines as text (the default) or json."),
    setting("access_log", "access-log", "TIERGATE_ACCESS_LOG", Switch, "One access-log line per proxied request (default true)."),
    setting("workers", "workers", "TIERGATE_WORKERS", Number, "Threads that serve requests, 1 to 1024 (default: one per core this process may use); with 1 (or one core), a single-threaded scheduler, the cheapest per request."),
    setting("upstream.url", "upstream", "TIERGATE_UPSTREAM", Text, "Base URL of the upstream API, e.g. https://api.mistral.ai (required by serve)."),
    setting("upstream.api_key", "upstream-api-key", "TIERGATE_UPSTREAM_API_KEY", Text, "The gateway's own key for the upstream; the client's key is never forwarded."),
    setting("upstream.request_stream_usage", "upstream-request-stream-usage", "TIERGATE_UPSTREAM_REQUEST_STREAM_USAGE", Switch, "Ask streams for usage with stream_options.include_usage (default true; false for upstreams that refuse it, such as Mistral's)."),
    setting("upstream.unmetered", "upstream-unmetered", "TIERGATE_UPSTREAM_UNMETERED", Text, "What is forwarded off the metered routes, whose token limits hold only after the fact: stateless (the default: the routes that keep nothing at the upstream, which every workspace shares), all, reads (GET, HEAD, OPTIONS without a body) or none."),
    setting("upstream.max_idle_connections", "upstream-max-idle-connections", "TIERGATE_UPSTREAM_MAX_IDLE_CONNECTIONS", Number, "The most idle HTTP/1.1 connections to the upstream kept for reuse; past it, the least recently used is closed (default 1024; 0 to 100000, 0: none kept)."),
    setting("upstream.http2_keepalive_ms", "upstream-http2-keepalive-ms", "TIERGATE_UPSTREAM_HTTP2_KEEPALIVE_MS", Number, "An HTTP/2 connection to the upstream with requests on it, silent this long, is checked with a PING, and closed if none comes back as long again (default 20000; 0: never; else 100 to 3600000)."),
    setting("upstream.max_streams_per_connection", "upstream-max-streams-per-connection", "TIERGATE_UPSTREAM_MAX_STREAMS_PER_CONNECTION", Number, "The most requests at once on one HTTP/2 connection to the upstream; more open another connection (default 100; 1 to 10000)."),
    setting("upstream.connect_timeout_ms", "upstream-connect-timeout-ms", "TIERGATE_UPSTREAM_CONNECT_TIMEOUT_MS", Number, "Connecting to the upstream may take this long, in ms (default 3000)."),
    setting("upstream.timeout_secs", "upstream-timeout-secs", "TIERGATE_UPSTREAM_TIMEOUT_SECS", Number, "Until the upstream's response headers arrive, in seconds; then 504 (default 300)."),
    setting("upstream.usage_drain_ms", "upstream-usage-drain-ms", "TIERGATE_UPSTREAM_USAGE_DRAIN_MS", Number, "After a client leaves, how long to keep waiting for and reading the upstream's answer for its usage, in ms (default 2000)."),
    setting("upstream.idle_read_timeout_ms", "upstream-idle-read-timeout-ms", "TIERGATE_UPSTREAM_IDLE_READ_TIMEOUT_MS", Number, "The longest an upstream's body may stay silent, in ms (default 60000)."),
    setting("upstream.max_buffered_bytes", "upstream-max-buffered-bytes", "TIERGATE_UPSTREAM_MAX_BUFFERED_BYTES", Number, "The largest JSON or error answer read whole before it is passed on; a larger one is passed on as it comes, its usage read from its last 64 KiB (default 16777216; 65536 to 1073741824)."),
    setting("upstream.drop_request_headers", "upstream-drop-request-headers", "TIERGATE_UPSTREAM_DROP_REQUEST_HEADERS", List, "More request headers never forwarded, added to the built-in deny-list."),
    setting("upstream.ca_file", "upstream-ca-file", "TIERGATE_UPSTREAM_CA_FILE", Text, "A PEM file of root certificates the upstream's may chain to (a private CA), trusted besides the Mozilla roots."),
    setting("estimate.default_completion_tokens", "estimate-default-completion-tokens", "TIERGATE_ESTIMATE_DEFAULT_COMPLETION_TOKENS", Number, "The completion expected before a workspace has any history (default 256)."),
    setting("estimate.history", "estimate-history", "TIERGATE_ESTIMATE_HISTORY", Number, "Completions remembered per workspace and model (default 16)."),
    setting("estimate.max_tokens_limit", "estimate-max-tokens-limit", "TIERGATE_ESTIMATE_MAX_TOKENS_LIMIT", Number, "The largest max_tokens a request may ask for; above it, 400 (default 1000000)."),
];

/// A layer of settings from text (`source` names the flag or variable in errors): each value
/// read as its kind, placed at its key.
fn layer<'a>(
    values: impl Iterator<Item = (&'a Setting, String, String)>,
) -> Result<toml::Table, ConfigError> {
    let mut table = toml::Table::new();
    for (s, text, source) in values {
        let value = match s.kind {
            Kind::Text => toml::Value::String(text),
            Kind::Number => match text.trim().parse::<i64>() {
                Ok(n) if n >= 0 => toml::Value::Integer(n),
                _ => {
                    return Err(invalid(
                        s.key,
                        format!("'{text}' (from {source}) is not a whole number"),
                    ))
                }
            },
            Kind::Switch => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                _ => {
                    return Err(invalid(
                        s.key,
                        format!("'{text}' (from {source}) is not true or false"),
                    ))
                }
            },
            Kind::List => {
                toml::Value::Array(list(&text).into_iter().map(toml::Value::String).collect())
            }
        };
        let mut at = &mut table;
        let mut parts = s.key.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                at.insert(part.to_string(), value);
                break;
            }
            at = at
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("settings nest only in tables");
        }
    }
    Ok(table)
}

/// `over`'s values replace `base`'s; tables are merged key by key.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A comma-separated list, trimmed, empty items left out.
pub fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect()
}

/// Which web origins' pages may call the gateway's `/v1/` routes from a browser
/// (`cors_origins`): a preflight is answered for them, and their answers say so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// None (the default): no CORS headers, and a preflight is refused as any request without
    /// a key is.
    #[default]
    None,
    /// Any origin: `*`.
    Any,
    /// These origins, as browsers send them (`https://app.example`, `http://localhost:3000`).
    Listed(Vec<String>),
}

impl CorsOrigins {
    fn of(raw: Vec<String>) -> Result<CorsOrigins, ConfigError> {
        let field = "cors_origins";
        let raw: Vec<&str> = raw.iter().map(|o| o.trim()).collect();
        if raw.contains(&"*") {
            return match raw.len() {
                1 => Ok(CorsOrigins::Any),
                _ => Err(invalid(field, "'*' is every origin: give it alone")),
            };
        }
        if raw.is_empty() {
            return Ok(CorsOrigins::None);
        }
        let mut listed = Vec::with_capacity(raw.len());
        for origin in raw {
            let url = url::Url::parse(origin).ok().filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && u.path() == "/"
                    && !origin.trim_end_matches('/').ends_with('/')
            });
            let Some(url) = url else {
                return Err(invalid(
                    field,
                    format!("'{origin}' is not an origin: scheme://host[:port], http or https, without a path"),
                ));
            };
            listed.push(url.origin().ascii_serialization());
        }
        Ok(CorsOrigins::Listed(listed))
    }

    /// The `Access-Control-Allow-Origin` for a request from `origin`, if it is allowed.
    pub fn allow(&self, origin: &str) -> Option<&str> {
        match self {
            CorsOrigins::None => None,
            CorsOrigins::Any => Some("*"),
            CorsOrigins::Listed(listed) => listed
                .iter()
                .find(|o| o.eq_ignore_ascii_case(origin))
                .map(String::as_str),
        }
    }
}

/// Which families of rate-limit headers proxied answers carry (`rate_limit_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFamilies {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens,tokens-month}`.
    pub openai: bool,
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
    pub ietf: bool,
    /// `x-ratelimit-{limit,remaining}-tokens-{minute,month}`, `x-ratelimit-tokens-query-cost`.
    pub mistral: bool,
}

impl Default for HeaderFamilies {
    fn default() -> Self {
        HeaderFamilies {
            openai: true,
            ietf: true,
            mistral: false,
        }
    }
}

/// The `TIERGATE_` variables among `names` that tiergate does not read: a misspelt setting is
/// otherwise ignored without a word. `TIERGATE_LOG` and `TIERGATE_CONFIG` are read besides the
/// settings; the test suites' own (`TIERGATE_TEST_*`, `TIERGATE_SDK_*`) are left alone.
pub fn unknown_variables(names: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<String> {
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .filter(|n| {
            n.starts_with("TIERGATE_")
                && !["TIERGATE_LOG", "TIERGATE_CONFIG"].contains(&n.as_str())
                && !n.starts_with("TIERGATE_TEST_")
                && !n.starts_with("TIERGATE_SDK_")
                && !SETTINGS.iter().any(|s| s.env == n)
        })
        .collect();
    unknown.sort();
    unknown
}

impl HeaderFamilies {
    pub const NAMES: [&str; 3] = ["openai", "ietf", "mistral"];

    fn of(names: &[String]) -> Result<HeaderFamilies, ConfigError> {
        let mut families = HeaderFamilies {
            openai: false,
            ietf: false,
            mistral: false,
        };
        // Turning every header off is said with `none`, never by an empty value by mistake.
        if names.is_empty() || names.iter().all(|n| n.trim().is_empty()) {
            return Err(invalid(
                "rate_limit_headers",
                "is empty: name one or more of openai, ietf, mistral, or none alone",
            ));
        }
        for name in names {
            match name.trim() {
                "openai" => families.openai = true,
                "ietf" => families.ietf = true,
                "mistral" => families.mistral = true,
                // An explicit empty list: no rate-limit headers at all.
                "none" if names.len() == 1 => {}
                other => {
                    return Err(invalid(
                        "rate_limit_headers",
                        format!("'{other}' is not one of openai, ietf, mistral (or none alone)"),
                    ))
                }
            }
        }
        Ok(families)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn parse(v: &str) -> Result<LogFormat, ConfigError> {
        match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(invalid(
                "log_format",
                format!("'{other}' is not text or json"),
            )),
        }
    }
}

/// What the shared limiter does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Deny with `503 limiter_unavailable`.
    Closed,
    /// Admit without limits, and count it.
    Open,
    /// Each instance enforces its share (1/N) of every limit in memory.
    Local,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Closed => "closed",
            FailurePolicy::Open => "open",
            FailurePolicy::Local => "local",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub topology: Topology,
    pub prefix: String,
    pub timeout: Duration,
    pub lease: Duration,
    pub failure_policy: FailurePolicy,
    /// Configured instance count for the `local` policy.
    pub instances: Option<u32>,
    /// Whose clock the script uses: the server's in service; tests may set `Caller`.
    pub time: TimeSource,
}

/// An admin token and the name the audit records for whoever holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("name", &self.name)
            .field("token", &"***")
            .finish()
    }
}

/// The name of the single `admin_token`.
pub const SINGLE_ADMIN_TOKEN_NAME: &str = "admin";
/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// When set, the admin API, `/metrics` and the console's operator pages are served there
    /// only, and the main listener answers them `404`.
    pub admin_listen: Option<SocketAddr>,
    pub database: String,
    /// Every admin token, each with its name; empty: the admin API is off (`403`).
    pub admin_tokens: Vec<AdminToken>,
    pub max_body_bytes: usize,
    /// A request's head must arrive whole within this (and a kept-alive connection idle this
    /// long is closed).
    pub header_read_timeout: Duration,
    /// A request's body must arrive whole within this, from its head.
    pub body_read_timeout: Duration,
    /// On stop, how long requests in flight may take before their connections are closed.
    pub shutdown_grace: Duration,
    pub catalog_refresh: Duration,
    /// How often workspaces are checked for automatic promotion.
    pub promotion_interval: Duration,
    /// The wait before a failed webhook delivery's first retry.
    pub webhook_retry_base: Duration,
    /// How often month usage is checked for `quota.threshold`.
    pub webhook_quota_check: Duration,
    /// The shares of the month quota, in percent, at which `quota.threshold` fires: ascending,
    /// each once.
    pub webhook_quota_thresholds: Vec<u64>,
    /// The shared limiter; `None` keeps limiter state in memory.
    pub redis: Option<RedisConfig>,
    pub upstream: UpstreamConfig,
    pub estimate: EstimateConfig,
    /// The catalogue to seed: the defaults, with the file's tiers added or replacing them.
    pub tiers: Vec<Tier>,
    /// How often settled usage is written to the ledger.
    pub ledger_flush: Duration,
    /// How long a workspace's limiter state stays in memory after it is back to full.
    pub idle_eviction: Duration,
    /// The longest wait between two reads of an idle webhook outbox (its own changes wake the
    /// sender at once).
    pub webhook_idle_poll: Duration,
    pub rate_limit_headers: HeaderFamilies,
    /// Which web origins' pages may call the `/v1/` routes (CORS).
    pub cors_origins: CorsOrigins,
    pub log_format: LogFormat,
    /// One `tiergate::access` log line per proxied request.
    pub access_log: bool,
    /// Threads that serve requests; `None`, one per core this process may use. One thread (or
    /// `None` on one core) runs tokio's single-threaded scheduler: on one core it does the same
    /// work as one worker of the multi-threaded one for about 6% less CPU per request
    /// (BENCHMARKS.md).
    pub workers: Option<NonZeroUsize>,
    /// `instances` as set without `redis`, where it applies to nothing: kept to be warned about
    /// (`warnings`) rather than dropped silently.
    pub instances_without_redis: Option<u32>,
}

/// The largest `max_tokens` a request may ask for by default: far above any model's output.
pub const DEFAULT_MAX_TOKENS_LIMIT: u64 = 1_000_000;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE: &str = "sqlite://tiergate.db";

impl TryFrom<RawSettings> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawSettings) -> Result<Self, ConfigError> {
        let RawSettings {
            listen,
            admin_listen,
            database,
            admin_token,
            admin_tokens,
            max_body_bytes,
            header_read_timeout_ms,
            body_read_timeout_ms,
            shutdown_grace_ms,
            catalog_refresh_ms,
            promotion_interval_secs,
            webhook_retry_base_ms,
            webhook_quota_check_ms,
            webhook_quota_thresholds,
            redis,
            redis_cluster,
            redis_timeout_ms,
            redis_failure_policy,
            redis_lease_ms,
            redis_prefix,
            instances,
            rate_limit_headers,
            log_format,
            cors_origins,
            access_log,
            workers,
            upstream,
            estimate,
            tiers,
        } = raw;
        let listen = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!("'{listen}' is not an address like 127.0.0.1:8080"),
            )
        })?;
        let admin_listen = match admin_listen.filter(|a| !a.trim().is_empty()) {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    invalid(
                        "admin_listen",
                        format!("'{a}' is not an address like 127.0.0.1:8081"),
                    )
                })?;
                if addr == listen && addr.port() != 0 {
                    return Err(invalid("admin_listen", "must differ from listen"));
                }
                Some(addr)
            }
        };
        let database = database.unwrap_or_else(|| DEFAULT_DATABASE.to_string());
        crate::store::Backend::of(&database).map_err(|m| invalid("database", m))?;
        let admin_tokens = admin_tokens_config(admin_token, admin_tokens.unwrap_or_default())?;
        let max_body_bytes = max_body_bytes.unwrap_or(4 * 1024 * 1024);
        if max_body_bytes < 1024 {
            return Err(invalid("max_body_bytes", "must be at least 1024"));
        }
        let header_read_timeout =
            bounded_ms(header_read_timeout_ms, 30_000, "header_read_timeout_ms")?;
        let body_read_timeout = bounded_ms(body_read_timeout_ms, 60_000, "body_read_timeout_ms")?;
        let shutdown_grace = bounded_ms(shutdown_grace_ms, 20_000, "shutdown_grace_ms")?;
        let catalog_refresh = Duration::from_millis(catalog_refresh_ms.unwrap_or(1000));
        if catalog_refresh.is_zero() {
            return Err(invalid("catalog_refresh_ms", "must be above 0"));
        }
        let promotion_interval = match promotion_interval_secs.unwrap_or(60) {
            n @ 1..=86_400 => Duration::from_secs(n),
            _ => {
                return Err(invalid(
                    "promotion_interval_secs",
                    "must be from 1 to 86400",
                ))
            }
        };
        let webhook_retry_base = match webhook_retry_base_ms.unwrap_or(1000) {
            n @ 10..=600_000 => Duration::from_millis(n),
            _ => {
                return Err(invalid(
                    "webhook_retry_base_ms",
                    "must be from 10 to 600000",
                ))
            }
        };
        let webhook_quota_check = match webhook_quota_check_ms.unwrap_or(30_000) {
            n @ 100..=3_600_000 => Duration::from_millis(n),
            _ => {
                return Err(invalid(
                    "webhook_quota_check_ms",
                    "must be from 100 to 3600000",
                ))
            }
        };
        let workers = match workers {
            None => None,
            Some(n @ 1..=1024) => NonZeroUsize::new(n as usize),
            Some(_) => return Err(invalid("workers", "must be from 1 to 1024")),
        };
        let webhook_quota_thresholds = match webhook_quota_thresholds {
            None => vec![50, 80, 100],
            Some(list) => {
                let bad = || {
                    invalid(
                        "webhook_quota_thresholds",
                        "must be 1 to 10 whole numbers, each from 1 to 100 (percent)",
                    )
                };
                let mut out = Vec::with_capacity(list.len());
                for n in &list {
                    let n = match n {
                        RawNumber::Number(n) => *n,
                        RawNumber::Text(t) => t.trim().parse().map_err(|_| bad())?,
                    };
                    match u64::try_from(n) {
                        Ok(n @ 1..=100) => out.push(n),
                        _ => return Err(bad()),
                    }
                }
                out.sort_unstable();
                out.dedup();
                if out.is_empty() || out.len() > 10 {
                    return Err(bad());
                }
                out
            }
        };

        let redis = redis.filter(|r| !r.trim().is_empty());
        let instances_without_redis = instances.filter(|_| redis.is_none());
        let redis = redis_config(
            redis,
            redis_cluster.unwrap_or(false),
            redis_timeout_ms,
            redis_failure_policy,
            redis_lease_ms,
            redis_prefix,
            instances,
        )?;

        let url = match upstream.url.filter(|u| !u.is_empty()) {
            None => None,
            Some(u) => {
                let shown = redact(&u);
                let mut url = url::Url::parse(&u)
                    .map_err(|e| invalid("upstream", format!("'{shown}' is not a URL: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(invalid(
                        "upstream",
                        format!("'{shown}' must be an http(s) URL"),
                    ));
                }
                // Accept both `https://host` and `https://host/v1`: routes are forwarded as
                // `/v1/...` onto the base.
                let path = url
                    .path()
                    .trim_end_matches('/')
                    .trim_end_matches("/v1")
                    .to_string();
                url.set_path(&path);
                Some(url)
            }
        };
        let positive =
            |v: Option<u64>, default: u64, field: &str| -> Result<Duration, ConfigError> {
                match v.unwrap_or(default) {
                    0 => Err(invalid(field, "must be above 0")),
                    n => Ok(Duration::from_millis(n)),
                }
            };
        let ca_file = upstream.ca_file.filter(|f| !f.is_empty());
        let upstream = UpstreamConfig {
            url,
            api_key: upstream.api_key.filter(|k| !k.is_empty()),
            request_stream_usage: upstream.request_stream_usage.unwrap_or(true),
            unmetered: match upstream.unmetered.as_deref().map(str::trim) {
                Some("all") => Unmetered::All,
                None | Some("stateless") => Unmetered::Stateless,
                Some("reads") => Unmetered::Reads,
                Some("none") => Unmetered::None,
                Some(other) => {
                    return Err(invalid(
                        "upstream.unmetered",
                        format!("'{other}' is not stateless, all, reads or none"),
                    ))
                }
            },
            connect_timeout: positive(
                upstream.connect_timeout_ms,
                3_000,
                "upstream.connect_timeout_ms",
            )?,
            timeout: positive(
                upstream.timeout_secs.map(|s| s.saturating_mul(1000)),
                300_000,
                "upstream.timeout_secs",
            )?,
            usage_drain: positive(upstream.usage_drain_ms, 2_000, "upstream.usage_drain_ms")?,
            idle_read_timeout: bounded_ms(
                upstream.idle_read_timeout_ms,
                60_000,
                "upstream.idle_read_timeout_ms",
            )?,
            max_buffered_bytes: match upstream.max_buffered_bytes.unwrap_or(16 * 1024 * 1024) {
                n @ 65_536..=1_073_741_824 => n as usize,
                _ => {
                    return Err(invalid(
                        "upstream.max_buffered_bytes",
                        "must be from 65536 to 1073741824",
                    ))
                }
            },
            drop_request_headers: drop_request_headers(upstream.drop_request_headers)?,
            extra_roots: match &ca_file {
                None => Vec::new(),
                Some(file) => root_certificates(Path::new(file))?,
            },
            ca_file,
            max_idle_connections: match upstream.max_idle_connections.unwrap_or(1024) {
                n @ 0..=100_000 => n as usize,
                _ => {
                    return Err(invalid(
                        "upstream.max_idle_connections",
                        "must be from 0 to 100000",
                    ))
                }
            },
            max_streams_per_connection: match upstream.max_streams_per_connection.unwrap_or(100) {
                n @ 1..=10_000 => n as usize,
                _ => {
                    return Err(invalid(
                        "upstream.max_streams_per_connection",
                        "must be from 1 to 10000",
                    ))
                }
            },
            http2_keepalive: match upstream.http2_keepalive_ms.unwrap_or(20_000) {
                0 => None,
                n @ 100..=3_600_000 => Some(Duration::from_millis(n)),
                _ => {
                    return Err(invalid(
                        "upstream.http2_keepalive_ms",
                        "must be 0 (never) or from 100 to 3600000",
                    ))
                }
            },
        };
        let estimate = EstimateConfig {
            default_completion_tokens: estimate.default_completion_tokens.unwrap_or(256),
            history: match estimate.history.unwrap_or(16) {
                0 => return Err(invalid("estimate.history", "must be at least 1")),
                n => n,
            },
            max_tokens_limit: match estimate
                .max_tokens_limit
                .unwrap_or(DEFAULT_MAX_TOKENS_LIMIT)
            {
                0 => return Err(invalid("estimate.max_tokens_limit", "must be at least 1")),
                n if n > crate::limiter::core::MAX_REQUEST_TOKENS => {
                    return Err(invalid(
                        "estimate.max_tokens_limit",
                        "must be at most 100000000000",
                    ))
                }
                n => n,
            },
        };

        let rate_limit_headers = match rate_limit_headers {
            None => HeaderFamilies::default(),
            Some(names) => HeaderFamilies::of(&names)?,
        };
        let cors_origins = CorsOrigins::of(cors_origins.unwrap_or_default())?;
        let log_format = match log_format.as_deref() {
            None => LogFormat::Text,
            Some(v) => LogFormat::parse(v.trim())?,
        };

        let mut catalogue = default_tiers();
        for (
            name,
            TierSpec {
                rank,
                limits,
                promotion,
                enforcement,
                shadow,
            },
        ) in tiers
        {
            limits
                .validate_for_tier()
                .map_err(|m| invalid(&format!("tiers.{name}"), m))?;
            validate_tier_name(&name).map_err(|m| invalid(&format!("tiers.{name}"), m))?;
            // A shipped tier given again keeps its place on the ladder unless a rank is given.
            let shipped = catalogue.iter().position(|t| t.name == name);
            let rank = rank.or_else(|| shipped.and_then(|i| catalogue[i].rank));
            if let Some(i) = shipped {
                catalogue.remove(i);
            }
            if let Some(p) = &promotion {
                p.validate()
                    .map_err(|m| invalid(&format!("tiers.{name}"), m))?;
                validate_tier_name(&p.to)
                    .map_err(|m| invalid(&format!("tiers.{name}.promotion.to"), m))?;
            }
            catalogue.push(Tier {
                name,
                rank,
                limits,
                promotion,
                enforcement,
                shadow,
            });
        }
        // A promotion leads up: to a tier of this catalogue ranked above its own.
        for tier in &catalogue {
            let Some(p) = &tier.promotion else { continue };
            let target = catalogue.iter().find(|t| t.name == p.to);
            match (tier.rank, target.and_then(|t| t.rank)) {
                (Some(from), Some(to)) if to > from => {}
                _ => {
                    return Err(invalid(
                        &format!("tiers.{}.promotion.to", tier.name),
                        format!(
                            "'{}' must be a tier of the file or the defaults, ranked above this one (give both a rank)",
                            p.to
                        ),
                    ))
                }
            }
        }
        Ok(Config {
            listen,
            admin_listen,
            database,
            admin_tokens,
            max_body_bytes,
            header_read_timeout,
            body_read_timeout,
            shutdown_grace,
            catalog_refresh,
            promotion_interval,
            webhook_retry_base,
            webhook_quota_check,
            webhook_quota_thresholds,
            redis,
            upstream,
            estimate,
            tiers: catalogue,
            ledger_flush: Duration::from_millis(250),
            idle_eviction: Duration::from_secs(120),
            webhook_idle_poll: Duration::from_secs(1),
            rate_limit_headers,
            cors_origins,
            log_format,
            access_log: access_log.unwrap_or(true),
            workers,
            instances_without_redis,
        })
    }
}

/// Checks one admin token's value; `field` names it in the message, never the value.
fn check_admin_token(field: &str, token: &str) -> Result<(), ConfigError> {
    if token.len() < MIN_ADMIN_TOKEN {
        return Err(invalid(
            field,
            format!("must be at least {MIN_ADMIN_TOKEN} characters"),
        ));
    }
    // What a client can send in `Authorization: Bearer …` and the gateway can match.
    let sendable = token.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !token.starts_with(' ')
        && !token.ends_with(' ');
    if !sendable {
        return Err(invalid(
            field,
            "must be printable ASCII without leading or trailing spaces",
        ));
    }
    Ok(())
}

/// The single `admin_token` (named `admin`) and the named `[[admin_tokens]]`: every token long
/// enough and sendable, names plain and unique, no token given twice.
fn admin_tokens_config(
    single: Option<String>,
    named: Vec<RawAdminToken>,
) -> Result<Vec<AdminToken>, ConfigError> {
    let mut tokens = Vec::new();
    if let Some(token) = single.filter(|t| !t.is_empty()) {
        check_admin_token("admin_token", &token)?;
        tokens.push(AdminToken {
            name: SINGLE_ADMIN_TOKEN_NAME.to_string(),
            token,
        });
    }
    for (i, RawAdminToken { name, token }) in named.into_iter().enumerate() {
        let field = format!("admin_tokens[{i}]");
        validate_token_name(&name).map_err(|m| invalid(&format!("{field}.name"), m))?;
        check_admin_token(&format!("{field}.token"), &token)?;
        if tokens.iter().any(|t| t.name == name) {
            let also = if name == SINGLE_ADMIN_TOKEN_NAME {
                " (the name of admin_token)"
            } else {
                ""
            };
            return Err(invalid(
                &format!("{field}.name"),
                format!("'{name}' is given twice{also}; names must be unique"),
            ));
        }
        if tokens.iter().any(|t| t.token == token) {
            return Err(invalid(
                &format!("{field}.token"),
                "the same token is given twice; each name needs a token of its own",
            ));
        }
        tokens.push(AdminToken { name, token });
    }
    Ok(tokens)
}

/// 1 to 64 of `a-z A-Z 0-9 - _ .`.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Admin token names are what the audit records as the actor: plain, so they cannot be taken
/// for `cli:…` or `workspace:…`.
pub fn validate_token_name(name: &str) -> Result<(), String> {
    if plain_name(name) {
        Ok(())
    } else {
        Err("a name is 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.'".into())
    }
}

/// A duration in milliseconds: above 0 and at most a day.
fn bounded_ms(v: Option<u64>, default: u64, field: &str) -> Result<Duration, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(invalid(field, "must be above 0")),
        n if n > 86_400_000 => Err(invalid(field, "must be at most 86400000 (a day)")),
        n => Ok(Duration::from_millis(n)),
    }
}

/// The built-in deny-list and the configured names, lowercase, each a valid header name.
/// The certificates of a PEM file (`upstream.ca_file`): at least one, each one a valid
/// root for rustls.
fn root_certificates(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    let field = "upstream.ca_file";
    let pem = std::fs::read(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, format!("{} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            field,
            format!("{} holds no certificate", path.display()),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots.add(cert.clone()).map_err(|e| {
            invalid(
                field,
                format!("{}: a certificate is not usable: {e}", path.display()),
            )
        })?;
    }
    Ok(certs)
}

fn drop_request_headers(extra: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let field = "upstream.drop_request_headers";
    let mut names: Vec<String> = DROPPED_REQUEST_HEADERS.map(String::from).to_vec();
    for name in extra.unwrap_or_default() {
        let name = name.trim().to_ascii_lowercase();
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || name.len() > 128 || !name.chars().all(token) {
            return Err(invalid(
                field,
                format!("'{name}' is not a header name (1 to 128 of a-z, 0-9 and !#$%&'*+-.^_`|~)"),
            ));
        }
        if matches!(name.as_str(), "content-type" | "content-length" | "host") {
            return Err(invalid(
                field,
                format!("'{name}' is needed to forward a request"),
            ));
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// A URL with its password, if any, replaced by `***`, for messages: read as text, so that a URL
/// that does not parse (the very one a message is about) is masked too.
pub use crate::store::redact;

fn redis_url(url: &str, cluster: bool) -> Result<String, ConfigError> {
    let shown = redact(url);
    let parsed = url::Url::parse(url).map_err(|_| {
        invalid(
            "redis",
            format!("'{shown}' is not a URL like redis://host:6379 or rediss://host:6380/0"),
        )
    })?;
    if !matches!(parsed.scheme(), "redis" | "rediss") || parsed.host_str().is_none_or(str::is_empty)
    {
        return Err(invalid(
            "redis",
            format!("'{shown}' must be a redis:// or rediss:// URL with a host"),
        ));
    }
    let db = parsed.path().trim_start_matches('/');
    if !db.is_empty() {
        let n: u32 = db
            .parse()
            .map_err(|_| invalid("redis", format!("'{shown}': the database must be a number")))?;
        if cluster && n != 0 {
            return Err(invalid(
                "redis",
                format!("'{shown}': a Redis Cluster has only database 0"),
            ));
        }
    }
    Ok(url.to_string())
}

fn redis_config(
    redis: Option<String>,
    cluster: bool,
    timeout_ms: Option<u64>,
    policy: Option<String>,
    lease_ms: Option<u64>,
    prefix: Option<String>,
    instances: Option<u32>,
) -> Result<Option<RedisConfig>, ConfigError> {
    // The Redis settings are checked whether or not `redis` is set: a mistake in one is found
    // now, not when Redis is added.
    let timeout = match timeout_ms.unwrap_or(50) {
        0 => return Err(invalid("redis_timeout_ms", "must be above 0")),
        n if n > 60_000 => return Err(invalid("redis_timeout_ms", "must be at most 60000")),
        n => Duration::from_millis(n),
    };
    let failure_policy = match policy.as_deref().unwrap_or("local") {
        "closed" => FailurePolicy::Closed,
        "open" => FailurePolicy::Open,
        "local" => FailurePolicy::Local,
        other => {
            return Err(invalid(
                "redis_failure_policy",
                format!("'{other}' is not closed, open or local"),
            ))
        }
    };
    let lease = match lease_ms.unwrap_or(30_000) {
        n if n < 300 => return Err(invalid("redis_lease_ms", "must be at least 300")),
        n => Duration::from_millis(n),
    };
    if lease <= timeout * 3 {
        return Err(invalid(
            "redis_lease_ms",
            "must be more than three times redis_timeout_ms (a lease is renewed every third of it)",
        ));
    }
    let prefix = prefix.unwrap_or_else(|| "tg".to_string());
    validate_prefix(&prefix).map_err(|m| invalid("redis_prefix", m))?;
    if instances == Some(0) {
        return Err(invalid("instances", "must be at least 1"));
    }
    let Some(redis) = redis else {
        return Ok(None);
    };
    let urls: Vec<&str> = redis
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(invalid(
            "redis",
            "no URL: give redis://host:port, or seed nodes separated by commas",
        ));
    }
    let cluster = cluster || urls.len() > 1;
    let urls = urls
        .iter()
        .map(|u| redis_url(u, cluster))
        .collect::<Result<Vec<_>, _>>()?;
    let topology = if cluster {
        Topology::Cluster(urls)
    } else {
        Topology::Single(urls.into_iter().next().expect("one URL"))
    };
    Ok(Some(RedisConfig {
        topology,
        prefix,
        timeout,
        lease,
        failure_policy,
        instances,
        time: TimeSource::Server,
    }))
}

/// Tier names appear in URLs and the console: keep them plain.
pub fn validate_tier_name(name: &str) -> Result<(), String> {
    if plain_name(name) {
        Ok(())
    } else {
        Err("a tier name is 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.'".into())
    }
}

impl Config {
    /// Loads the layers: defaults < file < environment < flags. The file is the flags' or the
    /// environment's `TIERGATE_CONFIG` path, if any. `flags` are the settings given on the
    /// command line, as text; the environment is read through `env` for every setting of
    /// [`SETTINGS`].
    pub fn load(
        flags: &[(&'static Setting, String)],
        config_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let env_file = env("TIERGATE_CONFIG").map(PathBuf::from);
        let mut merged = match config_file.map(Path::to_path_buf).or(env_file) {
            Some(path) => {
                // Read once as settings, so that its mistakes are reported with their place
                // and key, then as a table to be layered.
                let text = RawSettings::read_file(&path)?;
                toml::from_str::<RawSettings>(&text).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    message: toml_error(&text, &e),
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::File {
                    path,
                    message: toml_error(&text, &e),
                })?
            }
            None => toml::Table::new(),
        };
        let from_env = SETTINGS
            .iter()
            .filter_map(|s| env(s.env).map(|v| (s, v, s.env.to_string())));
        merge(&mut merged, layer(from_env)?);
        merge(
            &mut merged,
            layer(
                flags
                    .iter()
                    .map(|(s, v)| (*s, v.clone(), format!("--{}", s.flag))),
            )?,
        );
        let raw: RawSettings = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| invalid("settings", without_values(e.message())))?;
        Config::try_from(raw)
    }

    /// For commands that forward traffic: the upstream must be set.
    pub fn upstream_url(&self) -> Result<&url::Url, ConfigError> {
        self.upstream.url.as_ref().ok_or_else(|| {
            invalid(
                "upstream",
                "required: give --upstream URL, TIERGATE_UPSTREAM, or [upstream] url in the config file",
            )
        })
    }
}

/// A TOML string: TOML's basic strings take JSON's escapes.
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A TOML key: bare when it can be, else quoted.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        k.to_string()
    } else {
        toml_str(k)
    }
}

impl Config {
    /// Settings that were given but apply to nothing as the others are: said at start (and by
    /// `config check`), not refused, so that Redis can be set or unset alone.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(n) = self.instances_without_redis {
            warnings.push(format!(
                "instances = {n} is ignored: it applies only with redis (to the local failure policy)"
            ));
        }
        warnings
    }

    /// The effective settings as a TOML document, every default filled in and every secret
    /// masked (`***`): the admin tokens, the upstream's key, and passwords in the database and
    /// Redis URLs. What `tiergate config check` prints.
    pub fn effective_toml(&self) -> String {
        use crate::store::redact;
        let ms = |d: Duration| d.as_millis().to_string();
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            out.push_str(k);
            out.push_str(" = ");
            out.push_str(&v);
            out.push('\n');
        };
        line("listen", toml_str(&self.listen.to_string()));
        if let Some(a) = self.admin_listen {
            line("admin_listen", toml_str(&a.to_string()));
        }
        line("database", toml_str(&redact(&self.database)));
        line("max_body_bytes", self.max_body_bytes.to_string());
        line("header_read_timeout_ms", ms(self.header_read_timeout));
        line("body_read_timeout_ms", ms(self.body_read_timeout));
        line("shutdown_grace_ms", ms(self.shutdown_grace));
        line("catalog_refresh_ms", ms(self.catalog_refresh));
        line(
            "promotion_interval_secs",
            self.promotion_interval.as_secs().to_string(),
        );
        line("webhook_retry_base_ms", ms(self.webhook_retry_base));
        line("webhook_quota_check_ms", ms(self.webhook_quota_check));
        let thresholds: Vec<String> = self
            .webhook_quota_thresholds
            .iter()
            .map(u64::to_string)
            .collect();
        line(
            "webhook_quota_thresholds",
            format!("[{}]", thresholds.join(", ")),
        );
        let families = self.rate_limit_headers;
        let on: Vec<String> = HeaderFamilies::NAMES
            .iter()
            .zip([families.openai, families.ietf, families.mistral])
            .filter(|(_, on)| *on)
            .map(|(n, _)| toml_str(n))
            .collect();
        // None on is written `["none"]`, as it is set: an empty list is refused.
        let on = if on.is_empty() {
            vec![toml_str("none")]
        } else {
            on
        };
        line("rate_limit_headers", format!("[{}]", on.join(", ")));
        let origins: Vec<String> = match &self.cors_origins {
            CorsOrigins::None => Vec::new(),
            CorsOrigins::Any => vec![toml_str("*")],
            CorsOrigins::Listed(o) => o.iter().map(|o| toml_str(o)).collect(),
        };
        line("cors_origins", format!("[{}]", origins.join(", ")));
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        line("log_format", toml_str(format));
        line("access_log", self.access_log.to_string());
        match &self.redis {
            None => {
                out.push_str("# redis: none (limits held in this process's memory)\n");
                if let Some(n) = self.instances_without_redis {
                    out.push_str(&format!(
                        "# instances = {n}: ignored, it applies only with redis\n"
                    ));
                }
            }
            Some(r) => {
                let urls = match &r.topology {
                    Topology::Single(u) => redact(u),
                    Topology::Cluster(seeds) => seeds
                        .iter()
                        .map(|u| redact(u))
                        .collect::<Vec<_>>()
                        .join(","),
                };
                line("redis", toml_str(&urls));
                line(
                    "redis_cluster",
                    matches!(r.topology, Topology::Cluster(_)).to_string(),
                );
                line("redis_timeout_ms", ms(r.timeout));
                line("redis_failure_policy", toml_str(r.failure_policy.as_str()));
                line("redis_lease_ms", ms(r.lease));
                line("redis_prefix", toml_str(&r.prefix));
                if let Some(n) = r.instances {
                    line("instances", n.to_string());
                }
            }
        }
        match self.workers {
            Some(n) => out.push_str(&format!("workers = {n}\n")),
            None => out.push_str("# workers: one per core this process may use\n"),
        }
        let names: Vec<String> = self
            .admin_tokens
            .iter()
            .map(|t| toml_str(&t.name))
            .collect();
        out.push_str(&format!(
            "# admin tokens: {} ({}), values masked\n",
            self.admin_tokens.len(),
            names.join(", ")
        ));

        let u = &self.upstream;
        out.push_str("\n[upstream]\n");
        match &u.url {
            Some(url) => out.push_str(&format!("url = {}\n", toml_str(&redact(url.as_str())))),
            None => out.push_str("# url: not set (required by serve)\n"),
        }
        if u.api_key.is_some() {
            out.push_str("api_key = \"***\"\n");
        }
        if let Some(file) = &u.ca_file {
            out.push_str(&format!("ca_file = {}\n", toml_str(file)));
        }
        out.push_str(&format!(
            "request_stream_usage = {}\nunmetered = {}\nconnect_timeout_ms = {}\ntimeout_secs = {}\nusage_drain_ms = {}\nidle_read_timeout_ms = {}\nmax_buffered_bytes = {}\nmax_idle_connections = {}\nmax_streams_per_connection = {}\nhttp2_keepalive_ms = {}\n",
            u.request_stream_usage,
            toml_str(u.unmetered.as_str()),
            ms(u.connect_timeout),
            u.timeout.as_secs(),
            ms(u.usage_drain),
            ms(u.idle_read_timeout),
            u.max_buffered_bytes,
            u.max_idle_connections,
            u.max_streams_per_connection,
            u.http2_keepalive.map_or_else(|| "0".to_string(), ms),
        ));
        let dropped: Vec<String> = u.drop_request_headers.iter().map(|h| toml_str(h)).collect();
        out.push_str(&format!(
            "drop_request_headers = [{}]\n",
            dropped.join(", ")
        ));

        let e = &self.estimate;
        out.push_str(&format!(
            "\n[estimate]\ndefault_completion_tokens = {}\nhistory = {}\nmax_tokens_limit = {}\n",
            e.default_completion_tokens, e.history, e.max_tokens_limit
        ));

        for tier in &self.tiers {
            let l = &tier.limits;
            out.push_str(&format!("\n[tiers.{}]\n", toml_key(&tier.name)));
            if let Some(rank) = tier.rank {
                out.push_str(&format!("rank = {rank}\n"));
            }
            if !tier.enforcement.is_enforce() {
                out.push_str(&format!(
                    "enforcement = \"{}\"\n",
                    tier.enforcement.as_str()
                ));
            }
            if !tier.shadow.is_empty() {
                let names: Vec<String> = tier
                    .shadow
                    .iter()
                    .map(|l| format!("\"{}\"", l.as_str()))
                    .collect();
                out.push_str(&format!("shadow = [{}]\n", names.join(", ")));
            }
            if let Some(v) = l.requests_per_second {
                out.push_str(&format!("requests_per_second = {v:?}\n"));
            }
            for (k, v) in [
                ("burst", l.burst.map(u64::from)),
                ("tokens_per_minute", l.tokens_per_minute),
                ("tokens_per_month", l.tokens_per_month),
                ("concurrent_requests", l.concurrent_requests.map(u64::from)),
            ] {
                if let Some(v) = v {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
            for (model, m) in &l.models {
                out.push_str(&format!(
                    "[tiers.{}.models.{}]\n",
                    toml_key(&tier.name),
                    toml_key(model)
                ));
                if let Some(v) = m.tokens_per_minute {
                    out.push_str(&format!("tokens_per_minute = {v}\n"));
                }
                if let Some(v) = m.tokens_per_month {
                    out.push_str(&format!("tokens_per_month = {v}\n"));
                }
            }
            if let Some(p) = &tier.promotion {
                let at = format!("tiers.{}.promotion", toml_key(&tier.name));
                out.push_str(&format!("[{at}]\nto = {}\n", toml_str(&p.to)));
                if let Some(v) = p.min_days {
                    out.push_str(&format!("min_days = {v}\n"));
                }
                if let Some(v) = p.min_tokens_30d {
                    out.push_str(&format!("min_tokens_30d = {v}\n"));
                }
                if !p.min_attributes.is_empty() {
                    out.push_str(&format!("[{at}.min_attributes]\n"));
                    for (name, value) in &p.min_attributes {
                        let value = match value {
                            AttributeValue::Bool(b) => b.to_string(),
                            AttributeValue::Number(n) => format!("{n:?}"),
                        };
                        out.push_str(&format!("{} = {value}\n", toml_key(name)));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    /// The setting whose flag is `--flag`.
    fn flag(flag: &str, value: &str) -> (&'static Setting, String) {
        let s = SETTINGS.iter().find(|s| s.flag == flag).unwrap();
        (s, value.to_string())
    }

    /// `Config::load` over a file holding `text`.
    fn load_file(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        flags: &[(&'static Setting, String)],
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(flags, Some(&path), env)
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\ndatabase = \"sqlite://file.db\"\n[upstream]\nurl = \"http://file:1/v1\"\nrequest_stream_usage = false\n",
        )
        .unwrap();
        let c = Config::load(&[], Some(&path), env_of(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.upstream.url.unwrap().as_str(), "http://file:1/");
        assert!(!c.upstream.request_stream_usage);

        let env = env_of(&[
            ("TIERGATE_LISTEN", "127.0.0.1:7001"),
            ("TIERGATE_UPSTREAM", "http://env:2"),
        ]);
        let c = Config::load(&[], Some(&path), &env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(c.database, "sqlite://file.db");

        let flags = [flag("listen", "127.0.0.1:7002")];
        let c = Config::load(&flags, Some(&path), &env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7002");
        assert_eq!(c.upstream.url.as_ref().unwrap().host_str(), Some("env"));
        // A nested key from the file survives a layer that sets another key of its table.
        assert!(!c.upstream.request_stream_usage);

        let c = Config::load(&[], None, env_of(&[])).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.database, DEFAULT_DATABASE);
        assert!(c.upstream_url().is_err());
    }

    #[test]
    fn redis_settings_give_a_single_server_or_a_cluster() {
        let redis = |raw: RawSettings| Config::try_from(raw).unwrap().redis;
        assert!(redis(RawSettings::default()).is_none());
        let r = redis(RawSettings {
            redis: Some("redis://user:secret@10.0.0.5:6380/2".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.topology,
            Topology::Single("redis://user:secret@10.0.0.5:6380/2".into())
        );
        assert_eq!(
            (r.timeout, r.lease, r.failure_policy, r.prefix.as_str()),
            (
                Duration::from_millis(50),
                Duration::from_secs(30),
                FailurePolicy::Local,
                "tg"
            )
        );
        let r = redis(RawSettings {
            redis: Some("redis://a:7000, redis://b:7000,redis://c:7000".into()),
            redis_failure_policy: Some("closed".into()),
            redis_timeout_ms: Some(20),
            redis_lease_ms: Some(5_000),
            instances: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.topology,
            Topology::Cluster(vec![
                "redis://a:7000".into(),
                "redis://b:7000".into(),
                "redis://c:7000".into()
            ])
        );
        assert_eq!(
            (r.failure_policy, r.timeout, r.instances),
            (FailurePolicy::Closed, Duration::from_millis(20), Some(3))
        );
        let r = redis(RawSettings {
            redis: Some("rediss://seed:7000".into()),
            redis_cluster: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.topology,
            Topology::Cluster(vec!["rediss://seed:7000".into()])
        );
    }

    #[test]
    fn invalid_redis_settings_name_the_field_and_hide_the_password() {
        let bad = |raw: RawSettings| Config::try_from(raw).unwrap_err().to_string();
        let with = |url: &str| RawSettings {
            redis: Some(url.into()),
            ..Default::default()
        };
        let e = bad(with("http://u:hunter2@host:6379"));
        assert!(e.starts_with("redis:"), "{e}");
        assert!(!e.contains("hunter2") && e.contains("***"), "{e}");
        let e = bad(with("redis://host:6379/x"));
        assert!(e.starts_with("redis:"), "{e}");
        // Found by fuzzing the config parser (fuzz/corpus/config/no-url.toml): commas alone
        // once panicked.
        let e = bad(with(",,,,   "));
        assert!(e.starts_with("redis:"), "{e}");
        let e = bad(with("redis://a:7000/1,redis://b:7000"));
        assert!(e.contains("database 0"), "{e}");
        let e = bad(RawSettings {
            redis_failure_policy: Some("maybe".into()),
            ..with("redis://h:6379")
        });
        assert!(e.starts_with("redis_failure_policy:"), "{e}");
        // Without `redis` too: the mistake is found before Redis is added.
        let e = bad(RawSettings {
            redis_failure_policy: Some("maybe".into()),
            ..Default::default()
        });
        assert!(e.starts_with("redis_failure_policy:"), "{e}");
        let e = bad(RawSettings {
            redis_lease_ms: Some(100),
            ..Default::default()
        });
        assert!(e.starts_with("redis_lease_ms:"), "{e}");
        let e = bad(RawSettings {
            redis_timeout_ms: Some(0),
            ..with("redis://h:6379")
        });
        assert!(e.starts_with("redis_timeout_ms:"), "{e}");
        let e = bad(RawSettings {
            redis_timeout_ms: Some(200),
            redis_lease_ms: Some(500),
            ..with("redis://h:6379")
        });
        assert!(e.starts_with("redis_lease_ms:"), "{e}");
        let e = bad(RawSettings {
            redis_prefix: Some("a}b".into()),
            ..with("redis://h:6379")
        });
        assert!(e.starts_with("redis_prefix:"), "{e}");
        let e = bad(RawSettings {
            instances: Some(0),
            ..with("redis://h:6379")
        });
        assert!(e.starts_with("instances:"), "{e}");
    }

    #[test]
    fn redis_settings_come_from_the_environment_and_the_file() {
        let env = env_of(&[
            ("TIERGATE_REDIS", "redis://env:6379"),
            ("TIERGATE_REDIS_FAILURE_POLICY", "open"),
            ("TIERGATE_INSTANCES", "4"),
        ]);
        let c = load_file(
            "redis = \"redis://file:6379\"\nredis_timeout_ms = 75\nredis_lease_ms = 9000\nredis_prefix = \"prod\"\n",
            env,
            &[],
        )
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.topology, Topology::Single("redis://env:6379".into()));
        assert_eq!(
            (r.failure_policy, r.instances, r.timeout, r.prefix.as_str()),
            (
                FailurePolicy::Open,
                Some(4),
                Duration::from_millis(75),
                "prod"
            )
        );
        assert_eq!(r.lease, Duration::from_millis(9000));
    }

    #[test]
    fn invalid_input_names_the_field() {
        let bad = |raw: RawSettings| Config::try_from(raw).unwrap_err().to_string();
        let e = bad(RawSettings {
            listen: Some("nope".into()),
            ..Default::default()
        });
        assert!(e.starts_with("listen:"), "{e}");
        let e = bad(RawSettings {
            upstream: RawUpstream {
                url: Some("ftp://x".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(e.starts_with("upstream:"), "{e}");
        let mut tiers = BTreeMap::new();
        tiers.insert(
            "gold".to_string(),
            TierSpec {
                limits: crate::model::Limits {
                    tokens_per_minute: Some(0),
                    ..Default::default()
                },
                ..TierSpec::default()
            },
        );
        let e = bad(RawSettings {
            tiers,
            ..Default::default()
        });
        assert!(e.starts_with("tiers.gold:"), "{e}");
        // A burst without its rate, as the admin API refuses it (an outside audit: the file
        // seeded a tier the API would not take back).
        let mut tiers = BTreeMap::new();
        tiers.insert(
            "gold".to_string(),
            TierSpec {
                limits: crate::model::Limits {
                    burst: Some(3),
                    ..Default::default()
                },
                ..TierSpec::default()
            },
        );
        let e = bad(RawSettings {
            tiers,
            ..Default::default()
        });
        assert_eq!(
            e,
            "tiers.gold: burst: a tier's burst needs its requests_per_second"
        );
        let e = bad(RawSettings {
            admin_token: Some("short".into()),
            ..Default::default()
        });
        assert!(e.starts_with("admin_token:"), "{e}");
        for url in [
            "mysql://u@h/db",
            "postgres://u:pw@h:notaport/db",
            "tiergate.db",
        ] {
            let e = bad(RawSettings {
                database: Some(url.into()),
                ..Default::default()
            });
            assert!(e.starts_with("database:") && !e.contains("pw@"), "{e}");
        }
        for url in [
            "sqlite://x.db",
            "postgres://u@127.0.0.1:5432/db",
            "postgresql://u:pw@db.example/tiergate",
        ] {
            let c = Config::try_from(RawSettings {
                database: Some(url.into()),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(c.database, url);
        }
    }

    #[test]
    fn max_tokens_limit_has_a_default_and_bounds() {
        let limit = |text: &str| {
            let raw: RawSettings = toml::from_str(text).unwrap();
            Config::try_from(raw).map(|c| c.estimate.max_tokens_limit)
        };
        assert_eq!(limit("").unwrap(), DEFAULT_MAX_TOKENS_LIMIT);
        assert_eq!(
            limit("[estimate]\nmax_tokens_limit = 32768\n").unwrap(),
            32_768
        );
        for bad in ["0", "100000000001"] {
            let e = limit(&format!("[estimate]\nmax_tokens_limit = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("estimate.max_tokens_limit:"), "{e}");
        }
    }

    /// The upstream's configuration with `key = value` in its table (none: the defaults), or
    /// the message refusing it, from the file's reader or from the checks.
    fn upstream_with(setting: Option<(&str, &str)>) -> Result<UpstreamConfig, String> {
        let text = setting.map_or(String::new(), |(k, v)| format!("[upstream]\n{k} = {v}\n"));
        let raw: RawSettings = toml::from_str(&text).map_err(|e| e.to_string())?;
        Config::try_from(raw)
            .map(|c| c.upstream)
            .map_err(|e| e.to_string())
    }

    /// Refused, naming the setting, for each of `bad`: in full by the checks, or quoting the
    /// line by the file's reader (a negative number is not a whole number of the field's type).
    fn refused(key: &str, bad: &[&str]) {
        for value in bad {
            let e = upstream_with(Some((key, value))).unwrap_err();
            let named = if value.starts_with('-') {
                e.contains(key)
            } else {
                e.starts_with(&format!("upstream.{key}:"))
            };
            assert!(named, "{key} = {value}: {e}");
        }
    }

    #[test]
    fn idle_upstream_connections_have_a_default_and_bounds() {
        let key = "max_idle_connections";
        assert_eq!(upstream_with(None).unwrap().max_idle_connections, 1024);
        for n in ["0", "2", "100000"] {
            let got = upstream_with(Some((key, n))).unwrap().max_idle_connections;
            assert_eq!(got.to_string(), n);
        }
        refused(key, &["100001", "-1"]);
    }

    #[test]
    fn http2_streams_per_connection_have_a_default_and_bounds() {
        let key = "max_streams_per_connection";
        assert_eq!(upstream_with(None).unwrap().max_streams_per_connection, 100);
        for n in ["1", "2", "10000"] {
            let got = upstream_with(Some((key, n)))
                .unwrap()
                .max_streams_per_connection;
            assert_eq!(got.to_string(), n);
        }
        refused(key, &["0", "10001", "-1"]);
    }

    #[test]
    fn http2_keepalive_has_a_default_an_off_and_bounds() {
        let key = "http2_keepalive_ms";
        let keepalive = |v| upstream_with(Some((key, v))).unwrap().http2_keepalive;
        assert_eq!(
            upstream_with(None).unwrap().http2_keepalive,
            Some(Duration::from_secs(20))
        );
        assert_eq!(keepalive("0"), None);
        assert_eq!(keepalive("100"), Some(Duration::from_millis(100)));
        assert_eq!(keepalive("3600000"), Some(Duration::from_secs(3600)));
        refused(key, &["99", "3600001", "-1"]);
    }

    #[test]
    fn workers_default_to_the_cores_and_have_bounds() {
        let load = |text: &str| {
            let raw: RawSettings = toml::from_str(text).unwrap();
            Config::try_from(raw)
        };
        let c = load("").unwrap();
        assert_eq!(c.workers, None);
        assert!(
            c.effective_toml()
                .contains("# workers: one per core this process may use\n"),
            "{}",
            c.effective_toml()
        );
        for n in [1, 4, 1024] {
            let c = load(&format!("workers = {n}\n")).unwrap();
            assert_eq!(c.workers.map(NonZeroUsize::get), Some(n));
            assert!(c.effective_toml().contains(&format!("\nworkers = {n}\n")));
        }
        for bad in ["0", "1025"] {
            let e = load(&format!("workers = {bad}\n")).unwrap_err().to_string();
            assert!(e.starts_with("workers:"), "{e}");
        }
        // From a flag, as text, like every number.
        let c = Config::load(&[flag("workers", "1")], None, |_| None).unwrap();
        assert_eq!(c.workers.map(NonZeroUsize::get), Some(1));
    }

    #[test]
    fn admin_tokens_have_names_and_the_single_one_is_admin() {
        let raw: RawSettings = toml::from_str(
            "admin_token = \"single-token-0123456789\"\n[[admin_tokens]]\nname = \"alice\"\ntoken = \"alice-token-0123456789\"\n[[admin_tokens]]\nname = \"ci.bot\"\ntoken = \"ci-bot-token-0123456789\"\n",
        )
        .unwrap();
        let c = Config::try_from(raw).unwrap();
        let names: Vec<&str> = c.admin_tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["admin", "alice", "ci.bot"]);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("alice-token") && !shown.contains("single-token"),
            "tokens never show in Debug: {shown}"
        );
        assert!(Config::try_from(RawSettings::default())
            .unwrap()
            .admin_tokens
            .is_empty());

        let bad = |toml_text: &str| {
            let raw: RawSettings = toml::from_str(toml_text).unwrap();
            Config::try_from(raw).unwrap_err().to_string()
        };
        let entry = |name: &str, token: &str| {
            format!("[[admin_tokens]]\nname = \"{name}\"\ntoken = \"{token}\"\n")
        };
        let e = bad(&entry("alice", "short"));
        assert!(e.starts_with("admin_tokens[0].token:"), "{e}");
        assert!(!e.contains("short"), "the value is never shown: {e}");
        let e = bad(&entry("al ice", "alice-token-0123456789"));
        assert!(e.starts_with("admin_tokens[0].name:"), "{e}");
        let e = bad(&entry("cli:bob", "alice-token-0123456789"));
        assert!(e.starts_with("admin_tokens[0].name:"), "{e}");
        let e = bad(&entry("", "alice-token-0123456789"));
        assert!(e.starts_with("admin_tokens[0].name:"), "{e}");
        let e = bad(&format!(
            "{}{}",
            entry("alice", "alice-token-0123456789"),
            entry("alice", "other-token-0123456789")
        ));
        assert!(
            e.starts_with("admin_tokens[1].name:") && e.contains("twice"),
            "{e}"
        );
        let e = bad(&format!(
            "{}{}",
            entry("alice", "alice-token-0123456789"),
            entry("bob", "alice-token-0123456789")
        ));
        assert!(e.starts_with("admin_tokens[1].token:"), "{e}");
        assert!(!e.contains("alice-token"), "{e}");
        let e = bad(&format!(
            "admin_token = \"single-token-0123456789\"\n{}",
            entry("admin", "other-token-0123456789")
        ));
        assert!(e.starts_with("admin_tokens[0].name:"), "{e}");
        let e = bad(&entry("alice", " padded-token-0123456789"));
        assert!(e.starts_with("admin_tokens[0].token:"), "{e}");
        let e = bad(&entry("alice", "tökén-tökén-tökén-0123"));
        assert!(e.starts_with("admin_tokens[0].token:"), "{e}");
        let unknown = toml::from_str::<RawSettings>(
            "[[admin_tokens]]\nname = \"alice\"\ntoken = \"alice-token-0123456789\"\nrole = \"x\"\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("role"));
    }

    #[test]
    fn admin_listen_is_an_address_apart_from_listen() {
        let env = env_of(&[("TIERGATE_ADMIN_LISTEN", "127.0.0.1:9001")]);
        let c = Config::load(&[], None, &env).unwrap();
        assert_eq!(c.admin_listen.unwrap().to_string(), "127.0.0.1:9001");
        let c = Config::load(&[], None, env_of(&[])).unwrap();
        assert_eq!(c.admin_listen, None);
        let bad = |raw: RawSettings| Config::try_from(raw).unwrap_err().to_string();
        let e = bad(RawSettings {
            admin_listen: Some("loopback".into()),
            ..Default::default()
        });
        assert!(e.starts_with("admin_listen:"), "{e}");
        let e = bad(RawSettings {
            listen: Some("127.0.0.1:9000".into()),
            admin_listen: Some("127.0.0.1:9000".into()),
            ..Default::default()
        });
        assert!(e.starts_with("admin_listen:"), "{e}");
    }

    #[test]
    fn timeouts_and_dropped_headers_have_defaults_and_layers() {
        let c = Config::try_from(RawSettings::default()).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.body_read_timeout, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.upstream.idle_read_timeout, Duration::from_secs(60));
        assert_eq!(c.upstream.max_buffered_bytes, 16 * 1024 * 1024);
        assert_eq!(
            c.upstream.drop_request_headers,
            DROPPED_REQUEST_HEADERS.to_vec()
        );

        let file = "header_read_timeout_ms = 5000\nbody_read_timeout_ms = 7000\nshutdown_grace_ms = 100\n\
             [upstream]\nidle_read_timeout_ms = 9000\ndrop_request_headers = [\"X-Tenant\", \"cookie\"]\n";
        let raw: RawSettings = toml::from_str(file).unwrap();
        let env = env_of(&[
            ("TIERGATE_HEADER_READ_TIMEOUT_MS", "6000"),
            ("TIERGATE_UPSTREAM_DROP_REQUEST_HEADERS", "x-a, X-B"),
        ]);
        let c = Config::try_from(raw.clone()).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.body_read_timeout, Duration::from_secs(7));
        assert_eq!(c.shutdown_grace, Duration::from_millis(100));
        assert_eq!(c.upstream.idle_read_timeout, Duration::from_secs(9));
        // Added to the built-in list, lowercase, once each.
        assert!(c
            .upstream
            .drop_request_headers
            .ends_with(&["x-tenant".to_string()]));
        assert_eq!(
            c.upstream.drop_request_headers.len(),
            DROPPED_REQUEST_HEADERS.len() + 1
        );
        let c = load_file(file, env, &[]).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(6));
        assert!(c
            .upstream
            .drop_request_headers
            .ends_with(&["x-a".into(), "x-b".into()]));
        assert!(c
            .upstream
            .drop_request_headers
            .contains(&"openai-organization".into()));
    }

    #[test]
    fn cors_origins_are_origins_or_every_one() {
        let of = |o: &[&str]| CorsOrigins::of(o.iter().map(|s| s.to_string()).collect());
        assert_eq!(of(&[]).unwrap(), CorsOrigins::None);
        assert_eq!(of(&[" * "]).unwrap(), CorsOrigins::Any);
        assert_eq!(
            of(&["https://App.Example:443/", "http://localhost:3000"]).unwrap(),
            CorsOrigins::Listed(vec![
                "https://app.example".into(),
                "http://localhost:3000".into()
            ])
        );
        for bad in [
            &["*", "https://a.example"][..],
            &["https://a.example/path"],
            &["https://a.example//"],
            &["ftp://a.example"],
            &["https://u:p@a.example"],
            &["https://a.example?x=1"],
            &["a.example"],
        ] {
            let e = of(bad).unwrap_err().to_string();
            assert!(e.starts_with("cors_origins:"), "{bad:?}: {e}");
        }
        let listed = of(&["https://a.example"]).unwrap();
        assert_eq!(listed.allow("https://a.example"), Some("https://a.example"));
        assert_eq!(listed.allow("https://b.example"), None);
        assert_eq!(CorsOrigins::Any.allow("https://b.example"), Some("*"));
        assert_eq!(CorsOrigins::None.allow("https://a.example"), None);
    }

    #[test]
    fn invalid_timeouts_and_header_names_name_the_field() {
        let bad = |raw: RawSettings| Config::try_from(raw).unwrap_err().to_string();
        let e = bad(RawSettings {
            header_read_timeout_ms: Some(0),
            ..Default::default()
        });
        assert!(e.starts_with("header_read_timeout_ms:"), "{e}");
        let e = bad(RawSettings {
            body_read_timeout_ms: Some(86_400_001),
            ..Default::default()
        });
        assert!(e.starts_with("body_read_timeout_ms:"), "{e}");
        let e = bad(RawSettings {
            shutdown_grace_ms: Some(0),
            ..Default::default()
        });
        assert!(e.starts_with("shutdown_grace_ms:"), "{e}");
        let upstream = |u: RawUpstream| RawSettings {
            upstream: u,
            ..Default::default()
        };
        let e = bad(upstream(RawUpstream {
            idle_read_timeout_ms: Some(0),
            ..Default::default()
        }));
        assert!(e.starts_with("upstream.idle_read_timeout_ms:"), "{e}");
        for n in [0, 65_535, 1_073_741_825] {
            let e = bad(upstream(RawUpstream {
                max_buffered_bytes: Some(n),
                ..Default::default()
            }));
            assert!(e.starts_with("upstream.max_buffered_bytes:"), "{n}: {e}");
        }
        for name in ["", "bad header", "x:y", "content-length", "Host"] {
            let e = bad(upstream(RawUpstream {
                drop_request_headers: Some(vec![name.into()]),
                ..Default::default()
            }));
            assert!(
                e.starts_with("upstream.drop_request_headers:"),
                "{name:?}: {e}"
            );
        }
        // `upstream.ca_file`: missing, not PEM, or without a certificate.
        let dir = tempfile::tempdir().unwrap();
        let no_cert = dir.path().join("empty.pem");
        std::fs::write(&no_cert, "not a certificate\n").unwrap();
        let not_pem = dir.path().join("broken.pem");
        std::fs::write(
            &not_pem,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for file in [dir.path().join("missing.pem"), no_cert, not_pem] {
            let e = bad(upstream(RawUpstream {
                ca_file: Some(file.display().to_string()),
                ..Default::default()
            }));
            assert!(e.starts_with("upstream.ca_file:"), "{file:?}: {e}");
        }
    }

    #[test]
    fn the_upstream_ca_file_adds_its_certificates() {
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/ca.pem");
        let c = Config::try_from(RawSettings {
            upstream: RawUpstream {
                ca_file: Some(ca.to_string()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.upstream.extra_roots.len(), 1);
        let c = Config::try_from(RawSettings::default()).unwrap();
        assert!(c.upstream.extra_roots.is_empty());
    }

    #[test]
    fn file_tiers_join_the_default_catalogue() {
        let raw: RawSettings = toml::from_str(
            "[tiers.free]\nrequests_per_second = 2\n[tiers.gold]\ntokens_per_minute = 10\n[tiers.gold.models.big]\ntokens_per_minute = 5\n",
        )
        .unwrap();
        let c = Config::try_from(raw).unwrap();
        let free = c.tiers.iter().find(|t| t.name == "free").unwrap();
        assert_eq!(free.limits.requests_per_second, Some(2.0));
        assert_eq!(free.limits.tokens_per_minute, None);
        let gold = c.tiers.iter().find(|t| t.name == "gold").unwrap();
        assert_eq!(gold.limits.models["big"].tokens_per_minute, Some(5));
        assert!(c.tiers.iter().any(|t| t.name == "scale"));
        // A shipped tier given again keeps its rank; a new tier without one is off the ladder.
        assert_eq!(free.rank, Some(0));
        assert_eq!(gold.rank, None);
    }

    #[test]
    fn quota_thresholds_are_percentages_from_a_file_a_variable_or_a_flag() {
        let c = |raw: RawSettings| Config::try_from(raw).map(|c| c.webhook_quota_thresholds);
        assert_eq!(c(RawSettings::default()).unwrap(), vec![50, 80, 100]);
        let file: RawSettings =
            toml::from_str("webhook_quota_thresholds = [90, 25, 90]\n").unwrap();
        assert_eq!(c(file).unwrap(), vec![25, 90]);
        let env = env_of(&[("TIERGATE_WEBHOOK_QUOTA_THRESHOLDS", "75, 100")]);
        let loaded = Config::load(&[], None, env).unwrap();
        assert_eq!(loaded.webhook_quota_thresholds, vec![75, 100]);
        for bad in [
            "[0]",
            "[101]",
            "[\"half\"]",
            "[]",
            "[1,2,3,4,5,6,7,8,9,10,11]",
        ] {
            let file: RawSettings =
                toml::from_str(&format!("webhook_quota_thresholds = {bad}\n")).unwrap();
            let e = c(file).unwrap_err().to_string();
            assert!(e.starts_with("webhook_quota_thresholds:"), "{bad}: {e}");
        }
        // `config check` prints them so that they read back.
        let file: RawSettings = toml::from_str("webhook_quota_thresholds = [60, 100]\n").unwrap();
        let printed = Config::try_from(file).unwrap().effective_toml();
        let again: RawSettings = toml::from_str(&printed).unwrap();
        assert_eq!(c(again).unwrap(), vec![60, 100]);
    }

    #[test]
    fn config_check_prints_the_header_families_so_that_they_read_back() {
        // `none` printed `[]`, which is refused (an outside audit).
        for set in [
            "[\"none\"]",
            "[\"mistral\"]",
            "[\"openai\", \"ietf\", \"mistral\"]",
        ] {
            let file: RawSettings =
                toml::from_str(&format!("rate_limit_headers = {set}\n")).unwrap();
            let c = Config::try_from(file).unwrap();
            let again: RawSettings = toml::from_str(&c.effective_toml()).unwrap();
            let again = Config::try_from(again).expect(set);
            assert_eq!(again.rate_limit_headers, c.rate_limit_headers, "{set}");
        }
    }

    #[test]
    fn file_tiers_take_shadow_settings_and_config_check_prints_them() {
        let raw: RawSettings = toml::from_str(
            "[tiers.trial]\ntokens_per_minute = 10\nenforcement = \"shadow\"\n[tiers.t2]\ntokens_per_month = 5\nshadow = [\"tokens_per_month\", \"requests_per_second\"]\n",
        )
        .unwrap();
        let c = Config::try_from(raw).unwrap();
        let trial = c.tiers.iter().find(|t| t.name == "trial").unwrap();
        assert_eq!(trial.enforcement, crate::model::Enforcement::Shadow);
        let t2 = c.tiers.iter().find(|t| t.name == "t2").unwrap();
        use crate::model::ShadowLimit;
        assert_eq!(
            t2.shadow,
            vec![ShadowLimit::RequestsPerSecond, ShadowLimit::TokensPerMonth]
        );
        let again: RawSettings = toml::from_str(&c.effective_toml()).unwrap();
        let again = Config::try_from(again).unwrap();
        for name in ["trial", "t2"] {
            let find = |c: &Config| c.tiers.iter().find(|t| t.name == name).unwrap().clone();
            assert_eq!(find(&again), find(&c), "{name}");
        }
        for bad in [
            "[tiers.x]\nshadow = [\"tokens_per_week\"]\n",
            "[tiers.x]\nenforcement = \"maybe\"\n",
        ] {
            let e = toml::from_str::<RawSettings>(bad).unwrap_err().to_string();
            assert!(
                e.contains("tokens_per_week") || e.contains("enforcement"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn file_tiers_take_a_promotion_up_the_ladder() {
        let raw: RawSettings = toml::from_str(
            "[tiers.free.promotion]\nto = \"tier-1\"\nmin_days = 7\nmin_tokens_30d = 1000\n[tiers.free.promotion.min_attributes]\npaid_usd = 5\nverified = true\n",
        )
        .unwrap();
        let c = Config::try_from(raw).unwrap();
        let free = c.tiers.iter().find(|t| t.name == "free").unwrap();
        let p = free.promotion.as_ref().unwrap();
        assert_eq!(
            (p.to.as_str(), p.min_days, p.min_tokens_30d),
            ("tier-1", Some(7), Some(1000))
        );
        assert_eq!(p.min_attributes.len(), 2);
        // `config check` prints it so that it reads back the same.
        let again: RawSettings = toml::from_str(&c.effective_toml()).unwrap();
        let again = Config::try_from(again).unwrap();
        let reread = again.tiers.iter().find(|t| t.name == "free").unwrap();
        assert_eq!(reread.promotion, free.promotion);
        // A file's tier is the whole tier, as a PUT is: given only a promotion, it has no limits.
        assert_eq!(free.limits.tokens_per_minute, None);
        // Down the ladder, to an unknown tier, or a misspelt condition: refused, naming it.
        for (bad, field) in [
            (
                "[tiers.tier-2.promotion]\nto = \"free\"\n",
                "tiers.tier-2.promotion.to",
            ),
            (
                "[tiers.tier-2.promotion]\nto = \"nowhere\"\n",
                "tiers.tier-2.promotion.to",
            ),
        ] {
            let raw: RawSettings = toml::from_str(bad).unwrap();
            let Err(e) = Config::try_from(raw) else {
                panic!("{bad} was accepted");
            };
            assert!(e.to_string().starts_with(field), "{bad}: {e}");
        }
        let Err(e) =
            toml::from_str::<RawSettings>("[tiers.x.promotion]\nto = \"free\"\nmin_dayz = 1\n")
        else {
            panic!("a misspelt condition was accepted");
        };
        assert!(e.to_string().contains("min_dayz"), "{e}");
    }

    #[test]
    fn file_tiers_take_a_rank_beside_their_limits() {
        let raw: RawSettings = toml::from_str(
            "[tiers.free]\nrank = 3\nrequests_per_second = 2\n[tiers.gold]\nrank = 9\ntokens_per_minute = 10\n",
        )
        .unwrap();
        let c = Config::try_from(raw).unwrap();
        let rank = |name: &str| c.tiers.iter().find(|t| t.name == name).unwrap().rank;
        assert_eq!(
            (rank("free"), rank("gold"), rank("scale")),
            (Some(3), Some(9), Some(5))
        );
        let gold = c.tiers.iter().find(|t| t.name == "gold").unwrap();
        assert_eq!(gold.limits.tokens_per_minute, Some(10));
        // A rank that is not a whole number from 0, or a limit misspelt beside it, is refused.
        for bad in [
            "[tiers.gold]\nrank = -1\n",
            "[tiers.gold]\nrank = \"top\"\n",
            "[tiers.gold]\nrank = 1\ntokens_per_minutes = 5\n",
        ] {
            let Err(e) = toml::from_str::<RawSettings>(bad) else {
                panic!("{bad} was accepted");
            };
            let e = e.to_string();
            assert!(
                e.contains("rank") || e.contains("tokens_per_minutes"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn every_setting_follows_the_naming_rule_and_reaches_its_field() {
        for s in SETTINGS {
            if s.key == "upstream.url" {
                assert_eq!((s.flag, s.env), ("upstream", "TIERGATE_UPSTREAM"));
                continue;
            }
            assert_eq!(s.flag, s.key.replace(['.', '_'], "-"), "{}", s.key);
            assert_eq!(
                s.env,
                format!("TIERGATE_{}", s.key.to_uppercase().replace('.', "_")),
                "{}",
                s.key
            );
        }
        // Each one, given by a flag, lands in the settings: none is declared and then dropped.
        for s in SETTINGS {
            let value = match s.kind {
                Kind::Number => "7",
                Kind::Switch => "true",
                Kind::List => "a,b",
                Kind::Text => "x",
            };
            let t = layer(std::iter::once((s, value.to_string(), s.flag.to_string()))).unwrap();
            let raw: RawSettings = toml::Value::Table(t).try_into().unwrap();
            let shown = format!("{raw:?}");
            let name = s.key.rsplit('.').next().unwrap();
            assert!(
                shown.contains(&format!("{name}: Some(")),
                "{} is not read into RawSettings: {shown}",
                s.key
            );
        }
    }

    #[test]
    fn every_field_of_the_settings_is_declared_once() {
        // The fields, as `Debug` names them, of the settings and their nested tables.
        let fields = |debug: String| -> Vec<String> {
            debug
                .split(['{', ','])
                .filter_map(|part| {
                    part.trim()
                        .split_once(':')
                        .map(|(k, _)| k.trim().to_string())
                })
                .filter(|k| {
                    k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
                .collect()
        };
        let nested: Vec<String> = [
            format!("{:?}", RawUpstream::default()),
            format!("{:?}", RawEstimate::default()),
        ]
        .into_iter()
        .flat_map(fields)
        .collect();
        let mut keys: Vec<String> = fields(format!("{:?}", RawSettings::default()))
            .into_iter()
            .filter(|k| !["upstream", "estimate", "admin_tokens", "tiers"].contains(&k.as_str()))
            .filter(|k| !nested.contains(k))
            .collect();
        for (table, debug) in [
            ("upstream", format!("{:?}", RawUpstream::default())),
            ("estimate", format!("{:?}", RawEstimate::default())),
        ] {
            keys.extend(fields(debug).into_iter().map(|k| format!("{table}.{k}")));
        }
        assert!(keys.len() >= 25, "{keys:?}");
        for key in &keys {
            let declared = SETTINGS.iter().filter(|s| s.key == key).count();
            assert_eq!(
                declared, 1,
                "{key} is declared {declared} times in SETTINGS"
            );
        }
        assert_eq!(keys.len(), SETTINGS.len(), "{keys:?}");
    }

    #[test]
    fn text_that_is_not_of_its_kind_is_refused_naming_the_setting_and_its_source() {
        let env = env_of(&[("TIERGATE_REDIS_TIMEOUT_MS", "fast")]);
        let e = Config::load(&[], None, env).unwrap_err().to_string();
        assert!(
            e.contains("redis_timeout_ms") && e.contains("TIERGATE_REDIS_TIMEOUT_MS"),
            "{e}"
        );
        let e = Config::load(&[flag("access-log", "maybe")], None, env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("access_log") && e.contains("--access-log"),
            "{e}"
        );
        // Every setting now has a variable: the estimate's too.
        let env = env_of(&[
            ("TIERGATE_ESTIMATE_HISTORY", "4"),
            ("TIERGATE_UPSTREAM_REQUEST_STREAM_USAGE", "no"),
        ]);
        let c = Config::load(&[], None, env).unwrap();
        assert_eq!(c.estimate.history, 4);
        assert!(!c.upstream.request_stream_usage);
    }

    /// A file's mistake is told by its line, column and kind, never with the line itself or a
    /// value (an outside audit: the TOML library's message quoted the line, a token with it).
    #[test]
    fn a_file_s_mistakes_never_show_its_secrets() {
        let secret = "SECRETXSECRETXSECRETY";
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                format!("admin_token = \"{secret}0\"\nadmin_token = \"{secret}\"\n"),
                "line 2",
            ),
            (
                format!("[upstream]\nurl = \"http://h\"\napi_kee = \"{secret}\"\n"),
                "api_kee",
            ),
            (format!("[upstream]\napi_key = [\"{secret}\"]\n"), "line 2"),
            (format!("token = \"{secret}\n"), "line 1"),
            (format!("instances = \"{secret}\"\n"), "instances (line 1"),
            // A setting of the wrong type is named, with its table (an outside audit: by its
            // line and column alone).
            (
                "max_body_bytes = -1\n".to_string(),
                "max_body_bytes (line 1, column 18)",
            ),
            (
                "listen = \"127.0.0.1:1\"\n[upstream]\ntimeout_secs = \"long\"\n".to_string(),
                "upstream.timeout_secs (line 3",
            ),
            ("access_log = \"maybe\"\n".to_string(), "access_log (line 1"),
            // A quote character TOML names as expected is not taken for a value (it was shown
            // as `"***"`).
            (
                "listen = \n".to_string(),
                "listen (line 1, column 10): invalid string\nexpected `\"`, `'`",
            ),
        ];
        for (i, (text, told)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("{i}.toml"));
            std::fs::write(&path, text).unwrap();
            for e in [
                Config::load(&[], Some(&path), env_of(&[]))
                    .unwrap_err()
                    .to_string(),
                RawSettings::from_file(&path).unwrap_err().to_string(),
            ] {
                assert!(!e.contains("SECRETX"), "{text}: {e}");
                assert!(e.contains(told), "{text}: {e}");
            }
        }
    }
}
