//! The in-memory copy of what the hot path reads: keys by hash, workspaces with their effective
//! limits. Authentication and limit lookup never touch the store on the hot path.
//!
//! Freshness: a change made through this instance's admin API refreshes the copy before the
//! answer is sent, so it holds from the next request. A change made elsewhere (the admin CLI,
//! another instance) bumps the store's `catalog_version` and is logged under it; every instance
//! polls the log each `catalog_refresh` (1 s by default) and applies only what changed: a tier
//! (its workspaces' limits are recomputed), a workspace, a key (dropped when revoked; its own
//! limits replaced when they changed). The whole
//! catalogue is loaded at start, and again when the log no longer reaches back to this copy's
//! version. An unknown key waits for the next check of the store (they start at most every
//! 100 ms, and are shared by all waiting requests), so a key created elsewhere works at once;
//! that check waits at most `MISS_CHECK_TIMEOUT`, and after it failed none is made for
//! `MISS_CHECK_PAUSE`, so a store that is down never holds requests up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::model::{
    ApiKey, BudgetBinds, KeyId, KeyLimits, Limits, Shadowing, Tier, Workspace, WorkspaceId,
    WorkspaceStatus,
};
use crate::store::{CatalogChanges, CatalogDelta, Store, StoreError};

/// At most one unknown-key check per this interval.
const MISS_CHECK_EVERY: Duration = Duration::from_millis(100);
/// How long a request with an unknown key waits for a check of the store, at most.
pub const MISS_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// After a check failed (store down or slow), none is made for this long.
pub const MISS_CHECK_PAUSE: Duration = Duration::from_secs(1);

/// A workspace as the hot path needs it.
#[derive(Debug, Clone)]
pub struct WorkspaceEntry {
    pub workspace: Workspace,
    /// Tier limits with the workspace's overrides applied, less those in shadow, then its own
    /// budget (which always enforces).
    pub limits: Arc<Limits>,
    /// Where the month caps in `limits` are the workspace's budget.
    pub budget: BudgetBinds,
    /// The tier's and overrides' limits in shadow, if any: decided by the shadow limiter.
    pub shadow: Option<Arc<Limits>>,
    /// The effective enforcement and the limits in shadow.
    pub shadowing: Shadowing,
}

#[derive(Debug)]
struct KeyEntry {
    id: KeyId,
    workspace: WorkspaceId,
    expires_at: Option<i64>,
    /// The key's own limits as set (empty: none).
    limits: KeyLimits,
    /// The last second this key's use was handed to the ledger writer: a key is written at
    /// most once a second, and the hot path takes no lock for it otherwise.
    noted_at: AtomicI64,
}

/// The catalogue's maps hash with foldhash, not SipHash: their keys are the operator's (tier
/// names, ids) or SHA-256 digests of keys, which a client cannot choose to collide, and a lookup
/// of an unknown key only probes what the stored keys occupy.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default, Clone)]
struct View {
    version: i64,
    tiers: Map<String, Arc<Tier>>,
    keys: Map<[u8; 32], Arc<KeyEntry>>,
    workspaces: Map<WorkspaceId, Arc<WorkspaceEntry>>,
}

impl View {
    fn workspace_entry(&self, w: &Workspace) -> Arc<WorkspaceEntry> {
        let tier = self.tiers.get(&w.tier);
        let tier_limits = tier.map(|t| t.limits.clone()).unwrap_or_default();
        let shadowing = Shadowing::of(tier.map(|t| &**t), w);
        let (enforced, shadow) = shadowing.split(&w.overrides.apply(&tier_limits).within_bounds());
        let (limits, budget) = w.budget.apply(&enforced);
        Arc::new(WorkspaceEntry {
            workspace: w.clone(),
            limits: Arc::new(limits),
            budget,
            shadow: shadow.map(Arc::new),
            shadowing,
        })
    }

    fn key_entry(k: &ApiKey) -> Arc<KeyEntry> {
        Arc::new(KeyEntry {
            id: k.id,
            workspace: k.workspace_id,
            expires_at: k.expires_at,
            limits: k.limits,
            noted_at: AtomicI64::new(0),
        })
    }

    /// This view with `delta` applied.
    fn apply(&self, delta: &CatalogDelta) -> View {
        let CatalogDelta {
            version,
            tiers,
            workspaces,
            keys,
        } = delta;
        let mut view = self.clone();
        view.version = *version;
        for tier in tiers {
            view.tiers.insert(tier.name.clone(), Arc::new(tier.clone()));
        }
        if !tiers.is_empty() {
            // Every workspace on a changed tier gets its limits recomputed.
            let on_changed: Vec<Workspace> = view
                .workspaces
                .values()
                .filter(|e| tiers.iter().any(|t| t.name == e.workspace.tier))
                .map(|e| e.workspace.clone())
                .collect();
            for w in &on_changed {
                let entry = view.workspace_entry(w);
                view.workspaces.insert(w.id, entry);
            }
        }
        for w in workspaces {
            let entry = view.workspace_entry(w);
            view.workspaces.insert(w.id, entry);
        }
        for k in keys {
            if k.revoked_at.is_some() {
                view.keys.remove(&k.hash);
            } else {
                // A key that is already known keeps its entry (and its last-use note).
                let same = view.keys.get(&k.hash).is_some_and(|e| {
                    e.id == k.id && e.expires_at == k.expires_at && e.limits == k.limits
                });
                if !same {
                    view.keys.insert(k.hash, Self::key_entry(k));
                }
            }
        }
        view
    }
}

/// The state of the checks of the store made for unknown keys.
#[derive(Debug, Default)]
struct MissCheck {
    /// When the latest check began, and whether it is still running.
    started: Option<Instant>,
    running: bool,
    /// Checks begun so far.
    seq: u64,
    paused_until: Option<Instant>,
}

/// A key that holds: its id, its own limits as set (empty: none; what the limiter enforces is
/// `workspace.limits.with_key(key, &key_limits)`), and its workspace.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub key: KeyId,
    pub key_limits: KeyLimits,
    pub workspace: Arc<WorkspaceEntry>,
}

impl Authenticated {
    /// The limits to reserve, settle and ask about for a request made with this key: the
    /// workspace's own (shared, no allocation) for a key without limits, else the workspace's
    /// with the key's within them.
    pub fn limits(&self) -> Arc<Limits> {
        if self.key_limits.is_empty() {
            self.workspace.limits.clone()
        } else {
            Arc::new(self.workspace.limits.with_key(self.key, &self.key_limits))
        }
    }
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

/// The copy itself, shared with the background checks made for unknown keys.
struct Mirror {
    store: Arc<dyn Store>,
    /// Read on every request without a lock or a shared counter written; swapped whole by a
    /// refresh.
    view: ArcSwap<View>,
    reload: tokio::sync::Mutex<()>,
    /// Milliseconds after `born` of the last time the copy was brought up to date with the
    /// store (a full load, or a check of the change log, whether or not anything changed).
    synced_at: AtomicU64,
    born: Instant,
}

pub struct Catalog {
    mirror: Arc<Mirror>,
    miss: Arc<Mutex<MissCheck>>,
    /// The number of the latest check of the store that has finished.
    checked: Arc<tokio::sync::watch::Sender<u64>>,
    touched: Mutex<HashMap<KeyId, i64>>,
}

pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Mirror {
    fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    async fn reload_all(&self) -> Result<(), StoreError> {
        let data = self.store.load_catalog().await?;
        let mut view = View {
            version: data.version,
            tiers: data
                .tiers
                .iter()
                .map(|t| (t.name.clone(), Arc::new(t.clone())))
                .collect(),
            ..View::default()
        };
        view.workspaces = data
            .workspaces
            .iter()
            .map(|w| (w.id, view.workspace_entry(w)))
            .collect();
        view.keys = data
            .keys
            .iter()
            .map(|k| (k.hash, View::key_entry(k)))
            .collect();
        self.view.store(Arc::new(view));
        self.synced();
        Ok(())
    }

    fn synced(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.synced_at.store(ms, Ordering::Relaxed);
    }

    async fn refresh(&self) -> Result<bool, StoreError> {
        let _one_at_a_time = self.reload.lock().await;
        let current = self.view();
        match self.store.catalog_changes(current.version).await? {
            CatalogChanges::TooOld => {
                self.reload_all().await?;
                Ok(true)
            }
            CatalogChanges::Since(delta) if delta.version == current.version => {
                self.synced();
                Ok(false)
            }
            CatalogChanges::Since(delta) => {
                let view = current.apply(&delta);
                self.view.store(Arc::new(view));
                self.synced();
                Ok(true)
            }
        }
    }
}

impl Catalog {
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let catalog = Catalog {
            mirror: Arc::new(Mirror {
                store,
                view: ArcSwap::from_pointee(View::default()),
                reload: tokio::sync::Mutex::new(()),
                synced_at: AtomicU64::new(0),
                born: Instant::now(),
            }),
            miss: Arc::new(Mutex::new(MissCheck::default())),
            checked: Arc::new(tokio::sync::watch::channel(0).0),
            touched: Mutex::new(HashMap::new()),
        };
        catalog.reload().await?;
        Ok(catalog)
    }

    fn view(&self) -> Arc<View> {
        self.mirror.view()
    }

    /// Reloads everything from the store now.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.mirror.reload.lock().await;
        self.mirror.reload_all().await
    }

    /// Applies what changed in the store since this copy's version (everything, when the change
    /// log no longer reaches back that far). Returns whether anything changed.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        self.mirror.refresh().await
    }

    /// How long since this copy was last brought up to date with the store.
    pub fn staleness(&self) -> Duration {
        let now = self.mirror.born.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.mirror.synced_at.load(Ordering::Relaxed)))
    }

    /// The catalogue version this copy is at.
    pub fn version(&self) -> i64 {
        self.view().version
    }

    /// Finds the workspace of a key, and the key's own limits, and notes the key as used at
    /// `now` (unix seconds): its `last_used_at`.
    pub async fn authenticate(&self, secret: &str, now: i64) -> Result<Authenticated, AuthFailure> {
        self.find(secret, now, true).await
    }

    /// As `authenticate`, without noting the key as used: signing in to the console with a key
    /// is not a use of the API, and would make a key nobody calls look alive.
    pub async fn identify(&self, secret: &str, now: i64) -> Result<Authenticated, AuthFailure> {
        self.find(secret, now, false).await
    }

    async fn find(&self, secret: &str, now: i64, note: bool) -> Result<Authenticated, AuthFailure> {
        if !key_is_well_formed(secret) {
            return Err(AuthFailure::UnknownKey);
        }
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
        // Read first: a write on every request would make the key's cache line bounce
        // between cores; it is written once a second.
        if note
            && key.noted_at.load(Ordering::Relaxed) != now
            && key.noted_at.swap(now, Ordering::Relaxed) != now
        {
            self.touched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.id, now);
        }
        Ok(Authenticated {
            key: key.id,
            key_limits: key.limits,
            workspace: entry,
        })
    }

    /// Whether key `key` of workspace `workspace` still holds (not revoked, not expired, its
    /// workspace active), for a console session signed in with it: the same answers as
    /// `authenticate`, by the key's id rather than its secret, which a session does not keep.
    /// Scans the keys (the view has no index by id): a console page costs a pass over them,
    /// the proxy path nothing.
    ///
    /// A key this instance does not know yet (made on another instance a moment ago, the
    /// session signed in there) waits for a check of the store, as `authenticate` does: it sent
    /// the user back to sign in, the cookie cleared (an outside audit).
    pub async fn session_key(
        &self,
        key: KeyId,
        workspace: WorkspaceId,
        now: i64,
    ) -> Result<Arc<WorkspaceEntry>, AuthFailure> {
        match self.session_key_now(key, workspace, now) {
            Err(AuthFailure::UnknownKey) => {
                self.check_on_miss(Instant::now()).await;
                self.session_key_now(key, workspace, now)
            }
            found => found,
        }
    }

    fn session_key_now(
        &self,
        key: KeyId,
        workspace: WorkspaceId,
        now: i64,
    ) -> Result<Arc<WorkspaceEntry>, AuthFailure> {
        let view = self.mirror.view.load();
        let found = view
            .keys
            .values()
            .find(|k| k.id == key && k.workspace == workspace)
            .ok_or(AuthFailure::UnknownKey)?;
        if found.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthFailure::Expired);
        }
        let entry = view
            .workspaces
            .get(&workspace)
            .ok_or(AuthFailure::UnknownKey)?;
        if entry.workspace.status == WorkspaceStatus::Suspended {
            return Err(AuthFailure::Suspended);
        }
        Ok(entry.clone())
    }

    /// The key `secret`, its workspace and the workspace's tier, when the catalogue holds it,
    /// whatever the key's or the workspace's state: for the metrics and the log of a refusal (an
    /// expired key, a suspended workspace), whose workspace is known.
    pub fn owner_of_key(&self, secret: &str) -> Option<(KeyId, WorkspaceId, String)> {
        let (key, entry) = self.lookup(&hash_key(secret))?;
        Some((key.id, key.workspace, entry.workspace.tier.clone()))
    }

    fn lookup(&self, hash: &[u8; 32]) -> Option<(Arc<KeyEntry>, Arc<WorkspaceEntry>)> {
        let view = self.mirror.view.load();
        let key = view.keys.get(hash)?.clone();
        let entry = view.workspaces.get(&key.workspace)?.clone();
        Some((key, entry))
    }

    /// Waits (at most `MISS_CHECK_TIMEOUT` from `arrived`) for a check of the store begun after
    /// `arrived`, so that a key created elsewhere a moment ago works at once, on every instance.
    /// Checks begin at most every `MISS_CHECK_EVERY` and run in the background, shared by all
    /// the requests waiting; so unknown keys cost the store at most that many checks, and a slow
    /// store delays the answer to an unknown key by at most the timeout while the check goes on
    /// for the next requests. A check still running after the timeout means the store is slow:
    /// requests do not wait on it; one that failed means it is down: none is made for
    /// `MISS_CHECK_PAUSE`.
    async fn check_on_miss(&self, arrived: Instant) {
        enum Next {
            Done,
            Wait(u64),
            Sleep(Duration),
        }
        let deadline = arrived + MISS_CHECK_TIMEOUT;
        loop {
            let next = {
                let mut check = self.miss.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                if check.paused_until.is_some_and(|until| now < until) {
                    Next::Done
                } else {
                    match check.started {
                        Some(s) if check.running && s >= arrived => Next::Wait(check.seq),
                        Some(s) if check.running => {
                            if now.duration_since(s) >= MISS_CHECK_TIMEOUT {
                                Next::Done
                            } else {
                                Next::Wait(check.seq)
                            }
                        }
                        Some(s) if s >= arrived => Next::Done,
                        Some(s) if now.duration_since(s) < MISS_CHECK_EVERY => {
                            Next::Sleep(MISS_CHECK_EVERY - now.duration_since(s))
                        }
                        _ => {
                            check.started = Some(now);
                            check.running = true;
                            check.seq += 1;
                            let seq = check.seq;
                            let (mirror, miss, checked) =
                                (self.mirror.clone(), self.miss.clone(), self.checked.clone());
                            tokio::spawn(async move {
                                let result = mirror.refresh().await;
                                let mut check = miss.lock().unwrap_or_else(|e| e.into_inner());
                                check.running = false;
                                if let Err(e) = result {
                                    tracing::warn!(error = %e, "catalog check for an unknown key failed");
                                    check.paused_until = Some(Instant::now() + MISS_CHECK_PAUSE);
                                }
                                checked.send_replace(seq);
                            });
                            Next::Wait(seq)
                        }
                    }
                }
            };
            match next {
                Next::Done => return,
                Next::Wait(seq) => {
                    let mut finished = self.checked.subscribe();
                    let wait = finished.wait_for(|done| *done >= seq);
                    if tokio::time::timeout_at(deadline.into(), wait)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Next::Sleep(d) => {
                    if Instant::now() + d >= deadline {
                        return;
                    }
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    pub fn workspace(&self, id: WorkspaceId) -> Option<Arc<WorkspaceEntry>> {
        self.view().workspaces.get(&id).cloned()
    }

    pub fn limits_of(&self, id: WorkspaceId) -> Option<Arc<Limits>> {
        self.view().workspaces.get(&id).map(|e| e.limits.clone())
    }

    /// Every workspace with a month quota: its id, the quota (the tier's with its overrides, or
    /// its own budget where that is lower), and whether that quota is the budget.
    pub fn month_quotas(&self) -> Vec<(WorkspaceId, u64, bool)> {
        self.view()
            .workspaces
            .iter()
            .filter_map(|(id, e)| Some((*id, e.limits.tokens_per_month?, e.budget.workspace)))
            .collect()
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

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random base62 characters in a new key (about 238 bits).
const KEY_RANDOM_CHARS: usize = 40;
/// Base62 characters of the CRC-32 that ends a key (62^6 > 2^32).
const KEY_CHECK_CHARS: usize = 6;
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// The CRC-32 of a key's random part, as 6 base62 characters.
fn key_check(random: &str) -> [u8; KEY_CHECK_CHARS] {
    let mut n = CRC32.checksum(random.as_bytes()) as u64;
    let mut out = [b'0'; KEY_CHECK_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `secret` has the form of a workspace key, checked before any lookup, so that a
/// malformed or mistyped key costs nothing and never makes the catalogue ask the store:
/// - `tg_`, 40 base62 characters of randomness, and 6 base62 characters of their CRC-32 (keys
///   made now; a secret scanner can recognise a leaked one offline, without a database);
/// - `tg_` and 48 lowercase hex digits (keys made before, which keep working).
pub fn key_is_well_formed(secret: &str) -> bool {
    let Some(body) = secret.strip_prefix("tg_") else {
        return false;
    };
    if body.len() == 48 && body.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return true;
    }
    if body.len() < 32 + KEY_CHECK_CHARS || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (random, check) = body.split_at(body.len() - KEY_CHECK_CHARS);
    key_check(random) == check.as_bytes()
}

/// `tg_` and 40 base62 characters of randomness (about 238 bits), then 6 base62 characters of
/// their CRC-32. Keys are random and long, so a plain SHA-256 is the right hash: a slow password
/// hash would only slow every request down. Only the hash and a prefix are stored.
pub fn generate_key() -> NewSecret {
    let mut secret = String::with_capacity(3 + KEY_RANDOM_CHARS + KEY_CHECK_CHARS);
    secret.push_str("tg_");
    while secret.len() < 3 + KEY_RANDOM_CHARS {
        let mut bytes = [0u8; 64];
        getrandom::fill(&mut bytes).expect("the OS has randomness");
        // 248 = 4 × 62: bytes above it are dropped, so every character is equally likely.
        for b in bytes.into_iter().filter(|b| *b < 248) {
            if secret.len() < 3 + KEY_RANDOM_CHARS {
                secret.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    let check = key_check(&secret[3..]);
    secret.push_str(std::str::from_utf8(&check).expect("base62 is ASCII"));
    NewSecret {
        prefix: secret[..11].to_string(),
        hash: hash_key(&secret),
        secret,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_carry_their_checksum_and_old_keys_still_pass() {
        for _ in 0..100 {
            let key = generate_key();
            assert_eq!(key.secret.len(), 3 + 40 + 6);
            assert!(key_is_well_formed(&key.secret), "{}", key.secret);
            assert_eq!(key.prefix, key.secret[..11]);
            // Any one character changed, or one dropped, is caught.
            let mut bytes = key.secret.clone().into_bytes();
            let i = 3 + (bytes[5] as usize % 46);
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            assert!(!key_is_well_formed(&String::from_utf8(bytes).unwrap()));
            assert!(!key_is_well_formed(&key.secret[..key.secret.len() - 1]));
        }
        // The form made before: tg_ and 48 hex digits.
        assert!(key_is_well_formed(&format!("tg_{}", "0f".repeat(24))));
        for bad in [
            "",
            "tg_",
            "sk-0123456789abcdef",
            "tg_short",
            &format!("tg_{}", "0F".repeat(24)),
            &format!("tg_{}", "g".repeat(48)),
            &format!("tg_{}!", "a".repeat(45)),
            &format!("TG_{}", "0f".repeat(24)),
        ] {
            assert!(!key_is_well_formed(bad), "{bad}");
        }
    }
}
