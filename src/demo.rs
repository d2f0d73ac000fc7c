//! `tiergate demo`: the embedded default on a fresh machine. Starts the mock upstream and the
//! gateway on a data dir of its own, makes sure a demo workspace on the free tier exists, gives
//! it a fresh key, and prints how to call it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::admin::{Admin, NewKeyInput, WorkspaceUpdate};
use crate::app::{app, AppError};
use crate::catalog::generate_key;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, RawSettings, RawUpstream};
use crate::mock_upstream::{self, MockConfig};
use crate::model::{Actor, Overrides, OverridesPatch, Workspace, WorkspaceStatus};

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
}

const DEMO_WORKSPACE: &str = "demo";

pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    std::fs::create_dir_all(&options.data_dir)?;
    let database = format!(
        "sqlite://{}",
        options.data_dir.join("tiergate.db").display()
    );
    // One demo a directory: a second revoked the first one's key (`serve_alone`).
    let _alone = crate::store::sqlite::serve_alone(&database)?;
    let (stop_mock, mock_stopped) = tokio::sync::oneshot::channel::<()>();
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock_addr = mock_listener.local_addr()?;
    let mock = tokio::spawn(mock_upstream::serve(
        mock_listener,
        MockConfig::default(),
        async {
            let _ = mock_stopped.await;
        },
    ));

    let listener = match tokio::net::TcpListener::bind(options.listen).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(listen = %options.listen, "address in use; using a free port");
            tokio::net::TcpListener::bind((options.listen.ip(), 0)).await?
        }
        Err(e) => return Err(e.into()),
    };
    let addr = listener.local_addr()?;
    let admin_token = generate_key().secret.replacen("tg_", "adm_", 1);
    let raw = RawSettings {
        listen: Some(addr.to_string()),
        database: Some(database),
        admin_token: Some(admin_token.clone()),
        upstream: RawUpstream {
            url: Some(format!("http://{mock_addr}")),
            ..RawUpstream::default()
        },
        ..RawSettings::default()
    };
    let config = Config::try_from(raw).expect("the demo's own settings are valid");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let gateway = app(config, clock).await?;
    let (workspace, secret) = demo_workspace(&gateway.state.admin).await?;

    let key = &secret;
    println!(
        r#"
tiergate demo: gateway on http://{addr}, mock upstream on http://{mock_addr}
data: {data}
workspace '{name}' (id {id}) on tier '{tier}'

Call it (repeat fast to see a 429 with Retry-After on the free tier: 1 request/s):

  curl -i http://{addr}/v1/chat/completions -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -d '{{"model":"mistral-small-latest","messages":[{{"role":"user","content":"Hello"}}]}}'

Console:     http://{addr}/console
             sign in with the key above for the workspace's limits, usage and increase requests,
             or with the admin token {admin_token} for the operator's pages
Limits API:  curl -s http://{addr}/v1/limits -H "Authorization: Bearer {key}"
Admin API:   curl -s http://{addr}/admin/v1/workspaces -H "Authorization: Bearer {admin_token}"

Ctrl-C stops.
"#,
        data = options.data_dir.display(),
        name = workspace.name,
        id = workspace.id,
        tier = workspace.tier,
    );

    let result = gateway.serve(listener, shutdown).await;
    let _ = stop_mock.send(());
    let _ = mock.await;
    result
}

/// The demo workspace, on the free tier with no overrides on every run (its month's usage
/// carries over in the data dir), and a fresh key for it; recorded in the audit as `demo`.
async fn demo_workspace(admin: &Admin) -> Result<(Workspace, String), AppError> {
    let by = Actor::plain("demo");
    let existing = admin
        .list_workspaces()
        .await?
        .into_iter()
        .find(|w| w.name == DEMO_WORKSPACE);
    let workspace = match existing {
        Some(w) => {
            let reset = WorkspaceUpdate {
                tier: Some("free".into()),
                overrides: OverridesPatch::replacing(&Overrides::default()),
                status: Some(WorkspaceStatus::Active),
                pinned: Some(false),
                enforcement: Some(None),
                shadow: Some(None),
            };
            admin.update_workspace(&by, w.id, reset).await
        }
        None => {
            admin
                .create_workspace(&by, DEMO_WORKSPACE, Some("free"))
                .await
        }
    }?;
    // The keys of earlier runs, whose secrets were shown once and are gone, are revoked: a
    // demo leaves one live key, the one it prints.
    for old in admin.list_keys(workspace.id).await? {
        if old.revoked_at.is_none() {
            admin.revoke_key(&by, old.id).await?;
        }
    }
    let input = NewKeyInput {
        name: Some("demo".into()),
        expires_at: None,
    };
    let (_, secret) = admin.create_key(&by, workspace.id, input).await?;
    Ok((workspace, secret))
}
