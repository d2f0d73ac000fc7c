//! The in-memory copy of what the hot path reads: keys by hash, workspaces with their effective
//! limits. Authentication and limit lookup never touch the store on the hot path.
//!
//! Freshness: a change made through this instance's admin API reloads the copy before the
//! answer is sent, so it holds from the next request. A change made elsewhere (the admin CLI,
//! another instance) bumps the store's `catalog_version`; every instance polls it each
//! `catalog_refresh` (1 s by default) and reloads when it moved. An unknown key also triggers a
//! version check (at most every 100 ms), so a key created elsewhere works at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::model::{KeyId, Limits, Workspace, WorkspaceId, WorkspaceStatus};
use crate::store::{Store, StoreError};

/// A workspace as the hot path needs it.
#[derive(Debug, Clone)]
pub struct WorkspaceEntry {
    pub workspace: Workspace,
    /// Tier limits with the workspace's overrides applied.
    pub limits: Arc<Limits>,
}

#[derive(Debug)]
struct KeyEntry {
    id: KeyId,
    workspace: WorkspaceId,
    expires_at: Option<i64>,
    /// The last second this key's use was handed to the ledger writer: a key is written at
    /// most once a second, and the hot path takes no lock for it otherwise.
    noted_at: AtomicI64,
}

#[derive(Debug, Default)]
struct View {
    version: i64,
    keys: HashMap<[u8; 32], Arc<KeyEntry>>,
    workspaces: HashMap<WorkspaceId, Arc<WorkspaceEntry>>,
}

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown or revoked: 401.
    UnknownKey,
    /// 403.
    Expired,
    /// 403.
    Suspended,
}

pub struct Catalog {
    store: Arc<dyn Store>,
    view: RwLock<Arc<View>>,
    reload: tokio::sync::Mutex<()>,
    last_miss_check: Mutex<Option<Instant>>,
    miss_check: tokio::sync::Mutex<()>,
    touched: Mutex<HashMap<KeyId, i64>>,
}

/// The shortest time between two checks of the store for an unknown key.
const MISS_CHECK_EVERY: Duration = Duration::from_millis(100);

pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Catalog {
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let catalog = Catalog {
            store,
            view: RwLock::new(Arc::new(View::default())),
            reload: tokio::sync::Mutex::new(()),
            last_miss_check: Mutex::new(None),
            miss_check: tokio::sync::Mutex::new(()),
            touched: Mutex::new(HashMap::new()),
        };
        catalog.reload().await?;
        Ok(catalog)
    }

    fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads everything from the store now.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.reload.lock().await;
        let data = self.store.load_catalog().await?;
        let tiers: HashMap<&str, &Limits> = data
            .tiers
            .iter()
            .map(|t| (t.name.as_str(), &t.limits))
            .collect();
        let workspaces = data
            .workspaces
            .iter()
            .map(|w| {
                let tier = tiers
                    .get(w.tier.as_str())
                    .copied()
                    .cloned()
                    .unwrap_or_default();
                let entry = WorkspaceEntry {
                    workspace: w.clone(),
                    limits: Arc::new(w.overrides.apply(&tier)),
                };
                (w.id, Arc::new(entry))
            })
            .collect();
        let keys = data
            .keys
            .iter()
            .map(|k| {
                let entry = KeyEntry {
                    id: k.id,
                    workspace: k.workspace_id,
                    expires_at: k.expires_at,
                    noted_at: AtomicI64::new(0),
                };
                (k.hash, Arc::new(entry))
            })
            .collect();
        let view = View {
            version: data.version,
            keys,
            workspaces,
        };
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        Ok(())
    }

    /// Reloads if the store's catalogue version moved.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        let version = self.store.catalog_version().await?;
        if version != self.view().version {
            self.reload().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Finds the workspace of a key. `now` is unix seconds.
    pub async fn authenticate(
        &self,
        secret: &str,
        now: i64,
    ) -> Result<(KeyId, Arc<WorkspaceEntry>), AuthFailure> {
        let hash = hash_key(secret);
        let mut found = self.lookup(&hash);
        if found.is_none() {
            self.check_on_miss(Instant::now()).await;
            found = self.lookup(&hash);
        }
        let (key, entry) = found.ok_or(AuthFailure::UnknownKey)?;
        if key.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthFailure::Expired);
        }
        if entry.workspace.status == WorkspaceStatus::Suspended {
            return Err(AuthFailure::Suspended);
        }
        if key.noted_at.swap(now, Ordering::Relaxed) != now {
            self.touched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.id, now);
        }
        Ok((key.id, entry))
    }

    fn lookup(&self, hash: &[u8; 32]) -> Option<(Arc<KeyEntry>, Arc<WorkspaceEntry>)> {
        let view = self.view();
        let key = view.keys.get(hash)?.clone();
        let entry = view.workspaces.get(&key.workspace)?.clone();
        Some((key, entry))
    }

    /// Makes sure the catalogue was checked against the store after `arrived`: a key created
    /// elsewhere a moment ago then works at once, on every instance. Checks start at most every
    /// `MISS_CHECK_EVERY`, so unknown keys cost the store at most that many checks; a request
    /// with an unknown key waits for the next check (at most that long), and every request
    /// waiting shares it.
    async fn check_on_miss(&self, arrived: Instant) {
        loop {
            let _one_at_a_time = self.miss_check.lock().await;
            let last = *self
                .last_miss_check
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match last {
                Some(started) if started >= arrived => return,
                Some(started) if started.elapsed() < MISS_CHECK_EVERY => {
                    let wait = MISS_CHECK_EVERY - started.elapsed();
                    drop(_one_at_a_time);
                    tokio::time::sleep(wait).await;
                    continue;
                }
                _ => {}
            }
            *self
                .last_miss_check
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "catalog refresh on unknown key failed");
            }
            return;
        }
    }

    pub fn workspace(&self, id: WorkspaceId) -> Option<Arc<WorkspaceEntry>> {
        self.view().workspaces.get(&id).cloned()
    }

    pub fn limits_of(&self, id: WorkspaceId) -> Option<Arc<Limits>> {
        self.view().workspaces.get(&id).map(|e| e.limits.clone())
    }

    /// Keys used since the last call, with when; for `last_used_at`.
    pub fn take_touched(&self) -> Vec<(KeyId, i64)> {
        std::mem::take(&mut *self.touched.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }
}

/// A new API key: the secret (shown once), its displayable prefix and its hash (stored).
pub struct NewSecret {
    pub secret: String,
    pub prefix: String,
    pub hash: [u8; 32],
}

/// `tg_` and 48 hex digits (192 random bits). Keys are random and long, so a plain SHA-256 is
/// the right hash: a slow password hash would only slow every request down.
pub fn generate_key() -> NewSecret {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    let mut secret = String::from("tg_");
    for b in bytes {
        secret.push_str(&format!("{b:02x}"));
    }
    NewSecret {
        prefix: secret[..11].to_string(),
        hash: hash_key(&secret),
        secret,
    }
}
