//! The `tiergate` binary: parses the command line, builds a `Config`, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use tiergate::catalog::generate_key;
use tiergate::clock::{Clock, SystemClock};
use tiergate::config::{validate_tier_name, RawUpstream};
use tiergate::mock_upstream::{self, MockConfig};
use tiergate::model::{FieldPatch, Limits, ModelLimits, OverridesPatch, Tier, WorkspaceStatus};
use tiergate::store::migrate::MigrationSummary;
use tiergate::store::{redact, NewKey, Store, WorkspaceChange};
use tiergate::{Config, RawSettings};

#[derive(Parser)]
#[command(
    name = "tiergate",
    version,
    about = "Rate-limit and usage-tier gateway for OpenAI/Mistral-compatible LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct StoreArgs {
    /// Database URL (default sqlite://tiergate.db).
    #[arg(long, env = "TIERGATE_DATABASE")]
    database: Option<String>,
    /// TOML config file.
    #[arg(long, env = "TIERGATE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args, Clone, Default)]
struct RedisArgs {
    /// Share limits through Redis: redis://[user:password@]host:port[/db] (or rediss://), or a
    /// comma-separated list of Redis Cluster seed nodes.
    #[arg(long, env = "TIERGATE_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// Treat a single --redis URL as a Redis Cluster seed.
    #[arg(long, env = "TIERGATE_REDIS_CLUSTER")]
    redis_cluster: bool,
    /// The longest a Redis call may take, in ms (default 50).
    #[arg(long, env = "TIERGATE_REDIS_TIMEOUT_MS")]
    redis_timeout_ms: Option<u64>,
    /// While Redis is unreachable: closed (503), open (admit), or local (each instance its
    /// share of every limit; the default).
    #[arg(long, env = "TIERGATE_REDIS_FAILURE_POLICY")]
    redis_failure_policy: Option<String>,
    /// How long a request's reservation lives in Redis without renewal, in ms (default 30000).
    #[arg(long, env = "TIERGATE_REDIS_LEASE_MS")]
    redis_lease_ms: Option<u64>,
    /// The prefix of every Redis key (default tg).
    #[arg(long, env = "TIERGATE_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// How many instances share the limits, for the local failure policy (default: the count
    /// seen in Redis).
    #[arg(long, env = "TIERGATE_INSTANCES")]
    instances: Option<u32>,
}

#[derive(Args, Clone, Default)]
struct TimeoutArgs {
    /// A request's head must arrive whole within this, in ms; it also closes a kept-alive
    /// connection idle this long (default 30000).
    #[arg(long, env = "TIERGATE_HEADER_READ_TIMEOUT_MS")]
    header_read_timeout_ms: Option<u64>,
    /// A request's body must arrive whole within this, in ms, from its head (default 60000).
    #[arg(long, env = "TIERGATE_BODY_READ_TIMEOUT_MS")]
    body_read_timeout_ms: Option<u64>,
    /// On stop, how long requests in flight may take to finish, in ms (default 20000).
    #[arg(long, env = "TIERGATE_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// The longest an upstream's body may stay silent, in ms (default 60000).
    #[arg(long, env = "TIERGATE_UPSTREAM_IDLE_READ_TIMEOUT_MS")]
    upstream_idle_read_timeout_ms: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long, env = "TIERGATE_LISTEN")]
        listen: Option<String>,
        /// Base URL of the upstream API, e.g. https://api.mistral.ai.
        #[arg(long, env = "TIERGATE_UPSTREAM")]
        upstream: Option<String>,
        /// The gateway's own key for the upstream; the client's key is never forwarded.
        #[arg(long, env = "TIERGATE_UPSTREAM_API_KEY", hide_env_values = true)]
        upstream_api_key: Option<String>,
        /// Bearer token of the admin API; without it the admin API answers 403.
        #[arg(long, env = "TIERGATE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        #[command(flatten)]
        redis: RedisArgs,
        #[command(flatten)]
        timeouts: TimeoutArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run the gateway with the mock upstream, a demo workspace and a fresh key.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo keeps its database.
        #[arg(long, default_value = "tiergate-demo")]
        data_dir: PathBuf,
    },
    /// Run the fake OpenAI/Mistral-compatible upstream.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// Added latency before every answer.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Manage workspaces.
    #[command(subcommand)]
    Workspaces(WorkspaceCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeyCommand),
    /// Manage the tier catalogue.
    #[command(subcommand)]
    Tiers(TierCommand),
    /// Copy an embedded (SQLite) installation into an empty Postgres database.
    Migrate {
        /// The SQLite database to copy, e.g. sqlite://tiergate.db.
        #[arg(long, value_name = "sqlite://PATH")]
        from: String,
        /// The Postgres database to copy into; it must hold no workspace, key, limit request
        /// or ledger row.
        #[arg(long, value_name = "postgres://USER@HOST:PORT/DATABASE")]
        to: String,
    },
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// List workspaces.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create a workspace.
    Create {
        name: String,
        #[arg(long, default_value = "free")]
        tier: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change a workspace's tier, status or overrides.
    Set {
        id: i64,
        #[arg(long)]
        tier: Option<String>,
        /// active or suspended.
        #[arg(long)]
        status: Option<String>,
        /// Override a limit: NAME=VALUE, or NAME=none to clear it. NAME is one of
        /// requests_per_second, tokens_per_minute, tokens_per_month, concurrent_requests.
        #[arg(long = "limit", value_name = "NAME=VALUE")]
        limits: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key for a workspace; the secret is printed once.
    Create {
        workspace: i64,
        #[arg(long)]
        name: Option<String>,
        /// Expiry as an RFC 3339 instant.
        #[arg(long)]
        expires_at: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List a workspace's keys (never the secrets).
    List {
        workspace: i64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key at once.
    Revoke {
        id: i64,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum TierCommand {
    /// List tiers.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create or replace a tier; a limit left out means no such limit.
    Set {
        name: String,
        #[arg(long)]
        requests_per_second: Option<f64>,
        #[arg(long)]
        burst: Option<u32>,
        #[arg(long)]
        tokens_per_minute: Option<u64>,
        #[arg(long)]
        tokens_per_month: Option<u64>,
        #[arg(long)]
        concurrent_requests: Option<u32>,
        /// Per-model limit: MODEL:tokens_per_minute=N or MODEL:tokens_per_month=N.
        #[arg(long = "model-limit", value_name = "MODEL:NAME=N")]
        model_limits: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIERGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Ctrl-C or SIGTERM (what service managers send): stop accepting, drain, flush the ledger.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Config for commands that only need the store.
fn store_config(args: &StoreArgs) -> anyhow::Result<Config> {
    let flags = RawSettings {
        database: args.database.clone(),
        ..RawSettings::default()
    };
    Ok(Config::load(flags, args.config.as_deref(), env_var)?)
}

async fn open(args: &StoreArgs) -> anyhow::Result<Arc<dyn Store>> {
    let config = store_config(args)?;
    let store = tiergate::app::open_store(&config)
        .await
        .with_context(|| format!("opening {}", redact(&config.database)))?;
    store.seed_tiers(&config.tiers).await?;
    Ok(store)
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
}

fn parse_rfc3339(s: &str) -> anyhow::Result<i64> {
    Ok(
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|_| anyhow!("--expires-at: '{s}' is not an RFC 3339 instant"))?
            .unix_timestamp(),
    )
}

fn apply_limit_arg(patch: &mut OverridesPatch, arg: &str) -> anyhow::Result<()> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| anyhow!("--limit: '{arg}' is not NAME=VALUE"))?;
    fn field<T: std::str::FromStr>(name: &str, value: &str) -> anyhow::Result<FieldPatch<T>> {
        if value == "none" {
            return Ok(FieldPatch::Clear);
        }
        value
            .parse()
            .map(FieldPatch::Set)
            .map_err(|_| anyhow!("--limit {name}: '{value}' is not a number or 'none'"))
    }
    match name {
        "requests_per_second" => patch.requests_per_second = field(name, value)?,
        "tokens_per_minute" => patch.tokens_per_minute = field(name, value)?,
        "tokens_per_month" => patch.tokens_per_month = field(name, value)?,
        "concurrent_requests" => patch.concurrent_requests = field(name, value)?,
        other => bail!("--limit: '{other}' is not a limit"),
    }
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    let clock = SystemClock;
    match command {
        Command::Serve {
            listen,
            upstream,
            upstream_api_key,
            admin_token,
            redis,
            timeouts,
            store,
        } => {
            let RedisArgs {
                redis,
                redis_cluster,
                redis_timeout_ms,
                redis_failure_policy,
                redis_lease_ms,
                redis_prefix,
                instances,
            } = redis;
            let TimeoutArgs {
                header_read_timeout_ms,
                body_read_timeout_ms,
                shutdown_grace_ms,
                upstream_idle_read_timeout_ms,
            } = timeouts;
            let flags = RawSettings {
                listen,
                database: store.database,
                admin_token,
                header_read_timeout_ms,
                body_read_timeout_ms,
                shutdown_grace_ms,
                redis,
                redis_cluster: redis_cluster.then_some(true),
                redis_timeout_ms,
                redis_failure_policy,
                redis_lease_ms,
                redis_prefix,
                instances,
                upstream: RawUpstream {
                    url: upstream,
                    api_key: upstream_api_key,
                    idle_read_timeout_ms: upstream_idle_read_timeout_ms,
                    ..RawUpstream::default()
                },
                ..RawSettings::default()
            };
            let config = Config::load(flags, store.config.as_deref(), env_var)?;
            config.upstream_url()?;
            let listen = config.listen;
            let app = tiergate::app(config, Arc::new(SystemClock)).await?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            tracing::info!(listen = %listener.local_addr()?, "tiergate serving");
            app.serve(listener, shutdown_signal()).await?;
        }
        Command::Demo { listen, data_dir } => {
            tiergate::demo::run(
                tiergate::demo::DemoOptions { listen, data_dir },
                shutdown_signal(),
            )
            .await?;
        }
        Command::MockUpstream { listen, latency_ms } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            tracing::info!(listen = %listener.local_addr()?, "mock upstream serving");
            let config = MockConfig {
                latency: std::time::Duration::from_millis(latency_ms),
            };
            mock_upstream::serve(listener, config, shutdown_signal()).await?;
        }
        Command::Workspaces(WorkspaceCommand::List { store }) => {
            let list = open(&store).await?.list_workspaces().await?;
            print(&serde_json::to_value(list)?);
        }
        Command::Workspaces(WorkspaceCommand::Create { name, tier, store }) => {
            let ws = open(&store)
                .await?
                .create_workspace(&name, &tier, clock.now_secs())
                .await?;
            print(&serde_json::to_value(ws)?);
        }
        Command::Workspaces(WorkspaceCommand::Set {
            id,
            tier,
            status,
            limits,
            store,
        }) => {
            let mut overrides = OverridesPatch::default();
            for l in &limits {
                apply_limit_arg(&mut overrides, l)?;
            }
            overrides.validate().map_err(|m| anyhow!("--limit: {m}"))?;
            let status = status
                .map(|s| {
                    WorkspaceStatus::parse(&s)
                        .ok_or_else(|| anyhow!("--status: '{s}' is not active or suspended"))
                })
                .transpose()?;
            let ws = open(&store)
                .await?
                .update_workspace(
                    id,
                    &WorkspaceChange {
                        tier,
                        overrides,
                        status,
                    },
                )
                .await?;
            print(&serde_json::to_value(ws)?);
        }
        Command::Keys(KeyCommand::Create {
            workspace,
            name,
            expires_at,
            store,
        }) => {
            let expires_at = expires_at.as_deref().map(parse_rfc3339).transpose()?;
            let store = open(&store).await?;
            store.get_workspace(workspace).await?;
            let secret = generate_key();
            let key = store
                .create_key(
                    &NewKey {
                        workspace,
                        name,
                        prefix: secret.prefix.clone(),
                        hash: secret.hash,
                        expires_at,
                    },
                    clock.now_secs(),
                )
                .await?;
            let mut v = serde_json::to_value(key)?;
            v["key"] = json!(secret.secret);
            print(&v);
        }
        Command::Keys(KeyCommand::List { workspace, store }) => {
            let keys = open(&store).await?.list_keys(workspace).await?;
            print(&serde_json::to_value(keys)?);
        }
        Command::Keys(KeyCommand::Revoke { id, store }) => {
            let key = open(&store).await?.revoke_key(id, clock.now_secs()).await?;
            print(&serde_json::to_value(key)?);
        }
        Command::Tiers(TierCommand::List { store }) => {
            let tiers = open(&store).await?.list_tiers().await?;
            print(&serde_json::to_value(tiers)?);
        }
        Command::Tiers(TierCommand::Set {
            name,
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
            model_limits,
            store,
        }) => {
            validate_tier_name(&name).map_err(|m| anyhow!("name: {m}"))?;
            let mut limits = Limits {
                requests_per_second,
                burst,
                tokens_per_minute,
                tokens_per_month,
                concurrent_requests,
                models: Default::default(),
            };
            for arg in &model_limits {
                let (model, rest) = arg
                    .rsplit_once(':')
                    .ok_or_else(|| anyhow!("--model-limit: '{arg}' is not MODEL:NAME=N"))?;
                let (limit, n) = rest
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--model-limit: '{arg}' is not MODEL:NAME=N"))?;
                let n: u64 = n
                    .parse()
                    .map_err(|_| anyhow!("--model-limit: '{n}' is not a number"))?;
                let entry: &mut ModelLimits = limits.models.entry(model.to_string()).or_default();
                match limit {
                    "tokens_per_minute" => entry.tokens_per_minute = Some(n),
                    "tokens_per_month" => entry.tokens_per_month = Some(n),
                    other => bail!(
                        "--model-limit: '{other}' is not tokens_per_minute or tokens_per_month"
                    ),
                }
            }
            limits.validate().map_err(|m| anyhow!("{m}"))?;
            let tier = Tier { name, limits };
            open(&store).await?.put_tier(&tier).await?;
            print(&serde_json::to_value(tier)?);
        }
        Command::Migrate { from, to } => {
            let copied = tiergate::store::migrate::sqlite_to_postgres(&from, &to).await?;
            let MigrationSummary {
                tiers,
                workspaces,
                keys,
                revoked_keys,
                limit_requests,
                ledger_events,
                daily_rows,
                catalog_version,
            } = copied;
            println!("Copied {} into {}:", redact(&from), redact(&to));
            println!("  tiers: {tiers}, workspaces: {workspaces}, keys: {keys} (revoked: {revoked_keys}), limit requests: {limit_requests}");
            println!("  ledger events: {ledger_events}, daily rows: {daily_rows}; catalogue version: {catalog_version}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    run(Cli::parse().command).await
}
