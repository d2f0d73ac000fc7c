//! The `tiergate` binary: parses the command line, builds a `Config`, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use tiergate::admin::{Admin, AuditQuery, NewKeyInput, WorkspaceUpdate};
use tiergate::catalog::Catalog;
use tiergate::clock::SystemClock;
use tiergate::config::{Kind, LogFormat, Setting, SETTINGS};
use tiergate::http::views::{
    workspace_view, AuditEntryView, KeyView, LimitRequestView, NewKeyView, TierView, WorkspaceView,
};
use tiergate::mock_upstream::{self, MockConfig};
use tiergate::model::{
    Actor, AttributeValue, Attributes, Enforcement, KeyLimits, Limits, ModelLimits, Overrides,
    Promotion, ShadowLimit, TierSpec, Workspace,
};
use tiergate::store::migrate::MigrationSummary;
use tiergate::store::redact;
use tiergate::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Database URL (default sqlite://tiergate.db) [env: TIERGATE_DATABASE].
    #[arg(long)]
    database: Option<String>,
    /// TOML config file [env: TIERGATE_CONFIG].
    #[arg(long)]
    config: Option<PathBuf>,
}

/// `serve`'s settings: one flag per entry of `tiergate::config::SETTINGS`, made from that table
/// (its naming rule gives the flag; the file key and the variable are in each flag's help), kept
/// as text and read by `Config::load` with the file and the environment.
struct SettingFlags(Vec<(&'static Setting, String)>);

impl clap::FromArgMatches for SettingFlags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Vec::new();
        for s in SETTINGS {
            if let Some(v) = matches.get_one::<String>(s.flag) {
                flags.push((s, v.clone()));
            }
        }
        Ok(SettingFlags(flags))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for SettingFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for s in SETTINGS {
            let value_name = match s.kind {
                Kind::Number => "N",
                Kind::Switch => "BOOL",
                Kind::List => "LIST",
                Kind::Text => "VALUE",
            };
            let mut arg = clap::Arg::new(s.flag)
                .long(s.flag)
                .value_name(value_name)
                .help(format!("{} [env: {}] [file: {}]", s.help, s.env, s.key));
            if s.kind == Kind::Switch {
                // `--redis-cluster` alone means true; `--access-log false` turns one off.
                arg = arg.num_args(0..=1).default_missing_value("true");
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file [env: TIERGATE_CONFIG].
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: SettingFlags,
}

#[derive(Args)]
struct AuditArgs {
    /// Only entries about this workspace.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    workspace: Option<i64>,
    /// Only entries by this actor: an admin token's name, cli:USER, workspace:ID.
    #[arg(long)]
    actor: Option<String>,
    /// Only this action, e.g. workspace.update, key.revoke, limit_request.approve.
    #[arg(long)]
    action: Option<String>,
    /// From this RFC 3339 instant (inclusive).
    #[arg(long)]
    from: Option<String>,
    /// Until this RFC 3339 instant (exclusive).
    #[arg(long)]
    to: Option<String>,
    /// Continue after the entry with this id (older entries).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    after: Option<i64>,
    /// At most this many entries (1 to 1000, default 100).
    #[arg(long)]
    limit: Option<i64>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
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
    /// Answer workspaces' requests for higher limits.
    #[command(subcommand)]
    LimitRequests(LimitRequestCommand),
    /// Read the audit log of admin changes, newest first.
    Audit(AuditArgs),
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
    /// Check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE with the TIERGATE_* environment, as `serve` would read them (without its
    /// flags), and print the effective settings, every default filled in and every secret
    /// masked. Exits 1, naming the field, when a setting is invalid.
    Check { file: PathBuf },
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
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
        #[arg(long)]
        tier: Option<String>,
        /// active or suspended.
        #[arg(long)]
        status: Option<String>,
        /// Override a limit: NAME=VALUE, or NAME=none to clear it. NAME is one of
        /// requests_per_second, burst, tokens_per_minute, tokens_per_month, concurrent_requests.
        #[arg(long = "limit", value_name = "NAME=VALUE")]
        limits: Vec<String>,
        /// true holds the workspace on its tier (no automatic promotion); false releases it.
        #[arg(long)]
        pinned: Option<bool>,
        /// enforce or shadow for this workspace's limits, or tier for the tier's.
        #[arg(long, value_name = "enforce|shadow|tier")]
        enforcement: Option<String>,
        /// A limit in shadow for this workspace (repeat for several), or none for none of its
        /// own: requests_per_second, tokens_per_minute, tokens_per_month, concurrent_requests,
        /// model_tokens_per_minute, model_tokens_per_month.
        #[arg(long = "shadow", value_name = "LIMIT")]
        shadow: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Replace a workspace's attributes (for promotion conditions): NAME=NUMBER or
    /// NAME=true|false, none for no attributes.
    Attributes {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
        /// At least one: the command given none wiped them, easily done by mistake (an
        /// outside audit); `none` says it.
        #[arg(value_name = "NAME=VALUE", required = true)]
        attributes: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key for a workspace; the secret is printed once.
    Create {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
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
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        workspace: i64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key at once.
    Revoke {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Set a key's own limits, replacing those it has (each at most its workspace's), or clear
    /// them with --clear. A limit left out is no limit of the key's own.
    Limits {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
        #[arg(long, conflicts_with = "clear")]
        requests_per_second: Option<f64>,
        /// Requests at once; goes with --requests-per-second.
        #[arg(long, conflicts_with = "clear", requires = "requests_per_second")]
        burst: Option<u32>,
        #[arg(long, conflicts_with = "clear")]
        tokens_per_minute: Option<u64>,
        #[arg(long, conflicts_with = "clear")]
        tokens_per_month: Option<u64>,
        /// No limits of the key's own.
        #[arg(long, required_unless_present_any = ["requests_per_second", "tokens_per_minute", "tokens_per_month"])]
        clear: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum TierCommand {
    /// List tiers.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create or replace a tier; a limit left out means no such limit, a rank left out puts the
    /// tier off the ladder.
    Set {
        name: String,
        /// The tier's place on the ladder: the next tier is the one of the lowest rank above.
        #[arg(long)]
        rank: Option<u32>,
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
        /// The tier workspaces move up to by themselves once every --min-* condition holds.
        #[arg(long, value_name = "TIER")]
        promote_to: Option<String>,
        /// Promotion condition: days since the workspace was created.
        #[arg(long, requires = "promote_to")]
        min_days: Option<u32>,
        /// Promotion condition: tokens settled over the last 30 days.
        #[arg(long = "min-tokens-30d", requires = "promote_to")]
        min_tokens_30d: Option<u64>,
        /// Promotion condition: an attribute at least NUMBER, or true.
        #[arg(
            long = "min-attribute",
            value_name = "NAME=VALUE",
            requires = "promote_to"
        )]
        min_attributes: Vec<String>,
        /// enforce (the default) or shadow: the tier's limits deny, or only say what they would
        /// have denied.
        #[arg(long, value_name = "enforce|shadow")]
        enforcement: Option<String>,
        /// A limit in shadow whatever the enforcement (repeat for several): as for workspaces
        /// set.
        #[arg(long = "shadow", value_name = "LIMIT")]
        shadow: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum LimitRequestCommand {
    /// List requests, all or by status (pending, approved, denied, withdrawn) or workspace.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        workspace: Option<i64>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Approve a pending request: grant what was asked, or the --limit values given.
    Approve {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
        /// Grant NAME=VALUE instead of what was asked (NAME as for workspaces set).
        #[arg(long = "limit", value_name = "NAME=VALUE")]
        limits: Vec<String>,
        /// Words to the workspace, which it reads as the request's reason.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Deny a pending request with a reason the workspace reads.
    Deny {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Logs to stderr, filtered by `TIERGATE_LOG` (default `info`; the access log is the target
/// `tiergate::access`), as text or one JSON object per line. Built with the `otel` feature and
/// given an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
/// it also exports spans; the returned guard flushes them when dropped. An invalid `TIERGATE_LOG`
/// is refused, as any invalid setting is.
fn init_tracing(format: LogFormat) -> anyhow::Result<Telemetry> {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(std::env::var_os("TIERGATE_LOG"))?;
    // Colours only for a terminal: a file, a pipe or journald gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    // The log filter is the log's alone: spans are exported whatever `TIERGATE_LOG` says.
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otel")]
    {
        let (layer, provider) = match otel::layer() {
            Ok(Some((layer, provider))) => {
                let spans = tracing_subscriber::filter::LevelFilter::INFO;
                (Some(layer.with_filter(spans)), Some(provider))
            }
            Ok(None) => (None, None),
            Err(e) => {
                eprintln!("OpenTelemetry export is off: {e}");
                (None, None)
            }
        };
        registry.with(layer).init();
        Ok(Telemetry(provider))
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.init();
        Ok(Telemetry)
    }
}

/// The log filter when `TIERGATE_LOG` is unset.
const DEFAULT_LOG: &str = "info";

/// sqlx's parser of connection options warns of an option it does not know with its value:
/// `sslpassword` (or `PASSWORD` in capitals) in a database URL was written whole to the log at
/// start (an outside audit), at the default filter and then at any filter an operator set. It
/// is held at `error` whatever `TIERGATE_LOG` says.
const QUIET_OPTIONS: &str = "sqlx_postgres::options=error";

/// The log filter `TIERGATE_LOG` gives (`DEFAULT_LOG` when unset), with `QUIET_OPTIONS`.
fn log_filter(value: Option<std::ffi::OsString>) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    let quiet = QUIET_OPTIONS.parse().expect("a valid directive");
    let Some(value) = value else {
        return Ok(tracing_subscriber::EnvFilter::new(DEFAULT_LOG).add_directive(quiet));
    };
    let text = value
        .to_str()
        .ok_or_else(|| anyhow!("TIERGATE_LOG: '{}' is not UTF-8", value.to_string_lossy()))?;
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| anyhow!("TIERGATE_LOG: '{text}' is not a log filter ({e}); e.g. info, tiergate=debug or info,tiergate::access=off"))?;
    Ok(filter.add_directive(quiet))
}

#[cfg(not(feature = "otel"))]
struct Telemetry;

#[cfg(feature = "otel")]
struct Telemetry(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

#[cfg(feature = "otel")]
impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;

    /// The span layer and its provider, when an OTLP endpoint is configured (the standard
    /// `OTEL_*` variables: endpoint, headers, `OTEL_SERVICE_NAME`, `OTEL_BSP_*`).
    pub fn layer<S>() -> anyhow::Result<
        Option<(
            tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
            SdkTracerProvider,
        )>,
    >
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
        if !configured {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("tiergate");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("tiergate");
        Ok(Some((
            tracing_opentelemetry::layer().with_tracer(tracer),
            provider,
        )))
    }
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
    let database = SETTINGS
        .iter()
        .find(|s| s.key == "database")
        .expect("a setting");
    let flags: Vec<_> = args
        .database
        .iter()
        .map(|d| (database, d.clone()))
        .collect();
    Ok(Config::load(&flags, args.config.as_deref(), env_var)?)
}

/// The admin operations on the store the arguments name, and who the audit says made them:
/// `cli:$USER`.
async fn admin(args: &StoreArgs) -> anyhow::Result<(Admin, Actor)> {
    let config = store_config(args)?;
    let store = tiergate::app::open_store(&config)
        .await
        .with_context(|| format!("opening {}", redact(&config.database)))?;
    store.seed_tiers(&config.tiers).await?;
    let user = env_var("USER").or_else(|| env_var("LOGNAME"));
    Ok((
        Admin::new(store, Arc::new(SystemClock)),
        Actor::cli(user.as_deref()),
    ))
}

/// Prints `v` as the admin API answers: the same objects (`http::views`), keys in alphabetical
/// order (through a `Value`, as `SortedJson`); a list as a JSON array of them.
fn print(v: &impl serde::Serialize) {
    let v = serde_json::to_value(v).expect("plain data prints");
    println!(
        "{}",
        serde_json::to_string_pretty(&v).expect("plain data prints")
    );
}

/// Workspaces as the admin API shows them, their effective limits from the store's catalogue
/// as it is now (after the change just made).
async fn workspace_views(admin: &Admin, list: &[Workspace]) -> anyhow::Result<Vec<WorkspaceView>> {
    let catalog = Catalog::load(admin.store()).await?;
    Ok(list.iter().map(|w| workspace_view(&catalog, w)).collect())
}

async fn print_workspace(admin: &Admin, w: &Workspace) -> anyhow::Result<()> {
    print(&workspace_views(admin, std::slice::from_ref(w)).await?[0]);
    Ok(())
}

/// `--limit NAME=VALUE` as the admin API's `"NAME": VALUE` (`none` is `null`).
fn limit_fields(args: &[String]) -> anyhow::Result<Vec<(String, Value)>> {
    args.iter()
        .map(|arg| {
            let (name, value) = arg
                .split_once('=')
                .ok_or_else(|| anyhow!("--limit: '{arg}' is not NAME=VALUE"))?;
            let value = match value {
                "none" => Value::Null,
                v => serde_json::from_str::<serde_json::Number>(v)
                    .map(Value::Number)
                    .unwrap_or_else(|_| Value::String(v.to_string())),
            };
            Ok((name.to_string(), value))
        })
        .collect()
}

/// `NAME=NUMBER` or `NAME=true|false`.
fn attribute(arg: &str) -> anyhow::Result<(String, AttributeValue)> {
    AttributeValue::assignment(arg).map_err(|m| anyhow!(m))
}

/// `--model-limit MODEL:NAME=N` into `limits.models`.
fn model_limit(limits: &mut Limits, arg: &str) -> anyhow::Result<()> {
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
        other => bail!("--model-limit: '{other}' is not tokens_per_minute or tokens_per_month"),
    }
    Ok(())
}

/// How `serve`'s runtime schedules its tasks.
#[derive(Debug, PartialEq)]
enum Scheduler {
    /// tokio's single-threaded scheduler, on the main thread.
    Single,
    /// The multi-threaded one with this many workers (`None`: tokio's default, one per core or
    /// `TOKIO_WORKER_THREADS`).
    Multi(Option<usize>),
}

/// `workers` threads, or one per core of the `cores` this process may use. One thread is tokio's
/// single-threaded scheduler, not a multi-threaded one with one worker: it does the same work on
/// one core with less bookkeeping per wake-up (about 6% less CPU per request, BENCHMARKS.md).
fn scheduler(workers: Option<std::num::NonZeroUsize>, cores: usize) -> Scheduler {
    match workers.map(|n| n.get()) {
        Some(1) => Scheduler::Single,
        Some(n) => Scheduler::Multi(Some(n)),
        None if cores <= 1 => Scheduler::Single,
        None => Scheduler::Multi(None),
    }
}

fn serve_runtime(
    workers: Option<std::num::NonZeroUsize>,
) -> std::io::Result<tokio::runtime::Runtime> {
    // What this process may use: its CPU affinity and its cgroup's CPU quota.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = match scheduler(workers, cores) {
        Scheduler::Single => tokio::runtime::Builder::new_current_thread(),
        Scheduler::Multi(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = n {
                b.worker_threads(n);
            }
            b
        }
    };
    builder.enable_all().build()
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = init_tracing(config.log_format)?;
    for name in tiergate::config::unknown_variables(std::env::vars_os().map(|(k, _)| k)) {
        tracing::warn!(
            variable = %name,
            "{name} is not a setting of tiergate (misspelt?): ignored"
        );
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    config.upstream_url()?;
    let (listen, admin_listen) = (config.listen, config.admin_listen);
    // Held until the process ends.
    let _alone = match config.redis {
        None => tiergate::store::sqlite::serve_alone(&config.database)?,
        Some(_) => None,
    };
    let app = tiergate::app(config, Arc::new(SystemClock)).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let admin = match admin_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin_listen: listening on {addr}"))?,
        ),
    };
    match &admin {
        None => tracing::info!(listen = %listener.local_addr()?, "tiergate serving"),
        Some(a) => tracing::info!(
            listen = %listener.local_addr()?,
            admin_listen = %a.local_addr()?,
            "tiergate serving; the admin API, /metrics and the console's operator pages on admin_listen only"
        ),
    }
    app.serve_with_admin(listener, admin, shutdown_signal())
        .await?;
    Ok(())
}

async fn workspaces(command: WorkspaceCommand) -> anyhow::Result<()> {
    match command {
        WorkspaceCommand::List { store } => {
            let (admin, _) = admin(&store).await?;
            let all = admin.list_workspaces().await?;
            print(&workspace_views(&admin, &all).await?);
        }
        WorkspaceCommand::Create { name, tier, store } => {
            let (admin, by) = admin(&store).await?;
            let made = admin.create_workspace(&by, &name, Some(&tier)).await?;
            print_workspace(&admin, &made).await?;
        }
        WorkspaceCommand::Set {
            id,
            tier,
            status,
            limits,
            pinned,
            enforcement,
            shadow,
            store,
        } => {
            let fields = limit_fields(&limits)?;
            let update = WorkspaceUpdate {
                tier,
                overrides: tiergate::admin::overrides_patch(
                    fields.iter().map(|(k, v)| (k.as_str(), v)),
                )?,
                status: status
                    .as_deref()
                    .map(tiergate::admin::workspace_status)
                    .transpose()?,
                pinned,
                enforcement: enforcement
                    .as_deref()
                    .map(|e| match e {
                        "tier" => Ok(None),
                        e => Enforcement::parse(e).map(Some),
                    })
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                shadow: shadow_arg(&shadow)?,
            };
            let (admin, by) = admin(&store).await?;
            let changed = admin.update_workspace(&by, id, update).await?;
            print_workspace(&admin, &changed).await?;
        }
        WorkspaceCommand::Attributes {
            id,
            attributes,
            store,
        } => {
            if attributes.len() > 1 && attributes.iter().any(|a| a == "none") {
                anyhow::bail!("'none' (no attributes) stands alone, not beside NAME=VALUE pairs");
            }
            let mut set = Attributes::new();
            for arg in attributes.iter().filter(|a| a.as_str() != "none") {
                let (name, value) = attribute(arg)?;
                set.insert(name, value);
            }
            let (admin, by) = admin(&store).await?;
            let changed = admin.set_attributes(&by, id, set).await?;
            print_workspace(&admin, &changed).await?;
        }
    }
    Ok(())
}

async fn keys(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            workspace,
            name,
            expires_at,
            store,
        } => {
            let (admin, by) = admin(&store).await?;
            let (key, secret) = admin
                .create_key(&by, workspace, NewKeyInput { name, expires_at })
                .await?;
            print(&NewKeyView {
                info: KeyView::from(&key),
                key: secret,
            });
        }
        KeyCommand::List { workspace, store } => {
            let (admin, _) = admin(&store).await?;
            let keys = admin.list_keys(workspace).await?;
            print(&keys.iter().map(KeyView::from).collect::<Vec<_>>());
        }
        KeyCommand::Revoke { id, store } => {
            let (admin, by) = admin(&store).await?;
            print(&KeyView::from(&admin.revoke_key(&by, id).await?));
        }
        KeyCommand::Limits {
            id,
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            clear: _,
            store,
        } => {
            // --clear conflicts with every limit: without any, the key has none of its own.
            let limits = KeyLimits {
                requests_per_second,
                burst,
                tokens_per_minute,
                tokens_per_month,
            };
            let (admin, by) = admin(&store).await?;
            let key = admin.set_key_limits(&by, id, limits).await?;
            print(&KeyView::from(&key));
        }
    }
    Ok(())
}

/// `--shadow` given as limit names: none given, `None`; `none` alone, `Some(None)`; else the
/// names, each checked.
fn shadow_arg(names: &[String]) -> anyhow::Result<Option<Option<Vec<ShadowLimit>>>> {
    match names {
        [] => Ok(None),
        [none] if none == "none" => Ok(Some(None)),
        names => {
            let list = names.iter().map(|n| Value::String(n.clone())).collect();
            Ok(Some(Some(
                tiergate::model::shadow_list(Value::Array(list)).map_err(anyhow::Error::msg)?,
            )))
        }
    }
}

async fn tiers(command: TierCommand) -> anyhow::Result<()> {
    match command {
        TierCommand::List { store } => {
            let (admin, _) = admin(&store).await?;
            let tiers = admin.list_tiers().await?;
            print(&tiers.iter().map(TierView::from).collect::<Vec<_>>());
        }
        TierCommand::Set {
            name,
            rank,
            requests_per_second,
            burst,
            tokens_per_minute,
            tokens_per_month,
            concurrent_requests,
            model_limits,
            promote_to,
            min_days,
            min_tokens_30d,
            min_attributes,
            enforcement,
            shadow,
            store,
        } => {
            let promotion = match promote_to {
                Some(to) => {
                    let mut min = Attributes::new();
                    for arg in &min_attributes {
                        let (name, value) = attribute(arg)?;
                        min.insert(name, value);
                    }
                    Some(Promotion {
                        to,
                        min_days,
                        min_tokens_30d,
                        min_attributes: min,
                    })
                }
                None => None,
            };
            let mut limits = Limits {
                requests_per_second,
                burst,
                tokens_per_minute,
                tokens_per_month,
                concurrent_requests,
                models: Default::default(),
                key: None,
            };
            for arg in &model_limits {
                model_limit(&mut limits, arg)?;
            }
            let (admin, by) = admin(&store).await?;
            print(&TierView::from(
                &admin
                    .put_tier(
                        &by,
                        &name,
                        TierSpec {
                            rank,
                            limits,
                            promotion,
                            enforcement: enforcement
                                .as_deref()
                                .map(Enforcement::parse)
                                .transpose()
                                .map_err(anyhow::Error::msg)?
                                .unwrap_or_default(),
                            shadow: shadow_arg(&shadow)?.flatten().unwrap_or_default(),
                        },
                    )
                    .await?,
            ));
        }
    }
    Ok(())
}

async fn limit_requests(command: LimitRequestCommand) -> anyhow::Result<()> {
    match command {
        LimitRequestCommand::List {
            status,
            workspace,
            store,
        } => {
            let status = status
                .as_deref()
                .map(tiergate::admin::limit_request_status)
                .transpose()?;
            let (admin, _) = admin(&store).await?;
            let requests = admin.list_limit_requests(workspace, status).await?;
            print(
                &requests
                    .iter()
                    .map(LimitRequestView::from)
                    .collect::<Vec<_>>(),
            );
        }
        LimitRequestCommand::Approve {
            id,
            limits,
            reason,
            store,
        } => {
            let granted = if limits.is_empty() {
                None
            } else {
                let fields: serde_json::Map<String, Value> =
                    limit_fields(&limits)?.into_iter().collect();
                Some(
                    Overrides::granted(fields, "workspaces set ID --limit NAME=none")
                        .map_err(|e| anyhow!("--limit: {e}"))?,
                )
            };
            let (admin, by) = admin(&store).await?;
            print(&LimitRequestView::from(
                &admin
                    .approve_limit_request(&by, id, granted.as_ref(), reason.as_deref())
                    .await?,
            ));
        }
        LimitRequestCommand::Deny { id, reason, store } => {
            let (admin, by) = admin(&store).await?;
            print(&LimitRequestView::from(
                &admin.deny_limit_request(&by, id, &reason).await?,
            ));
        }
    }
    Ok(())
}

async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let AuditArgs {
        workspace,
        actor,
        action,
        from,
        to,
        after,
        limit,
        store,
    } = args;
    let instant =
        |field: &str, v: Option<String>| v.map(|s| tiergate::admin::instant(field, &s)).transpose();
    let query = AuditQuery {
        workspace,
        actor,
        action: action
            .as_deref()
            .map(tiergate::admin::audit_action)
            .transpose()?,
        from: instant("from", from)?,
        to: instant("to", to)?,
        after,
        limit,
    };
    let (admin, _) = admin(&store).await?;
    let page = admin.audit(query).await?;
    print(
        &page
            .entries
            .iter()
            .map(AuditEntryView::from)
            .collect::<Vec<_>>(),
    );
    if let (true, Some(last)) = (page.has_more, page.entries.last()) {
        eprintln!("more entries: --after {}", last.id);
    }
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("serve runs on a runtime of its own"),
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
        Command::Workspaces(c) => workspaces(c).await?,
        Command::Keys(c) => keys(c).await?,
        Command::Tiers(c) => tiers(c).await?,
        Command::LimitRequests(c) => limit_requests(c).await?,
        Command::Audit(args) => audit(args).await?,
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(&[], Some(&file), env_var).with_context(|| {
                format!(
                    "{} with the TIERGATE_ variables of the environment is not a valid configuration",
                    file.display()
                )
            })?;
            for name in tiergate::config::unknown_variables(std::env::vars_os().map(|(k, _)| k)) {
                eprintln!("warning: {name} is not a setting of tiergate (misspelt?): ignored");
            }
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            // Not an error here: `serve` may be given it by a flag, which this does not read,
            // and the admin commands read the same file without one.
            if config.upstream.url.is_none() {
                eprintln!(
                    "warning: upstream is not set: serve refuses to start without it unless given --upstream"
                );
            }
            print!("{}", config.effective_toml());
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
                counted_rows,
                hourly_rows,
                key_rows,
                counted_key_rows,
                batch_ids,
                audit_entries,
                webhook_endpoints,
                webhook_events,
                webhook_deliveries,
                console_secret,
                catalog_version,
            } = copied;
            println!("Copied {} into {}:", redact(&from), redact(&to));
            println!("  tiers: {tiers}, workspaces: {workspaces}, keys: {keys} (revoked: {revoked_keys}), limit requests: {limit_requests}");
            println!("  ledger: daily rows: {daily_rows}, rows by counter: {counted_rows}, hourly rows: {hourly_rows}, rows by key: {key_rows} (by counter: {counted_key_rows}), batch ids: {batch_ids}, events: {ledger_events}");
            println!("  webhooks: endpoints: {webhook_endpoints}, events: {webhook_events}, deliveries: {webhook_deliveries}");
            let console_secret = if console_secret { "copied" } else { "none" };
            println!("  audit entries: {audit_entries}; console secret: {console_secret}; catalogue version: {catalog_version}");
        }
    }
    Ok(())
}

/// Errors are printed as their chain of causes (`{:#}`), one line, never with a backtrace:
/// they are a user's mistakes or the environment's, named, not the program's.
fn main() -> std::process::ExitCode {
    match main_result() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main_result() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    if !matches!(
        command,
        Command::Serve(_) | Command::Demo { .. } | Command::MockUpstream { .. }
    ) {
        // The admin CLI and `config check` print, and a reader that goes away (`| head`) ends
        // them as it ends other command-line tools, by SIGPIPE, rather than a panic of
        // `println!` (an outside audit). The servers keep Rust's default: a peer that leaves
        // is an error to handle there, not a signal.
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match command {
        // The configuration is read before the runtime is built, since it says how many
        // threads serve; `serve` sets up logging once it has read log_format.
        Command::Serve(args) => {
            let ServeArgs { config, settings } = *args;
            let config = Config::load(&settings.0, config.as_deref(), env_var)?;
            serve_runtime(config.workers)
                .context("starting the runtime")?
                .block_on(serve(config))
        }
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(async {
                let _telemetry = init_tracing(LogFormat::Text)?;
                run(command).await
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    #[test]
    fn one_thread_or_one_core_runs_the_single_threaded_scheduler() {
        let n = NonZeroUsize::new;
        assert_eq!(scheduler(n(1), 8), Scheduler::Single);
        assert_eq!(scheduler(None, 1), Scheduler::Single);
        assert_eq!(scheduler(None, 4), Scheduler::Multi(None));
        assert_eq!(scheduler(n(3), 1), Scheduler::Multi(Some(3)));
        assert_eq!(scheduler(n(2), 16), Scheduler::Multi(Some(2)));
    }
}
