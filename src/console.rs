//! The console's sessions, without HTTP: how a signed-in browser is remembered, how its forms
//! are protected, and how sign-in attempts are limited. The pages are in `http::console`.
//!
//! # Sessions
//! Signing in exchanges a workspace key or an admin token for a cookie; the secret itself is
//! never kept, in the cookie or anywhere else. A session is of one of two kinds
//! (`SessionKind`), and its cookie says which in its form and in its signature:
//! - **A workspace's**: `WORKSPACE.KEY.EXPIRES.NONCE.SIGNATURE`: the workspace's id, the key's
//!   id, when the session ends (unix seconds, `SESSION_LIFETIME` after sign-in), 16 random
//!   bytes that make every session's id unique, and the HMAC-SHA256 of the rest under the
//!   console's secret, labelled `session`.
//! - **An operator's** (signed in with an admin token): `op.NAME.FINGERPRINT.EXPIRES.NONCE.
//!   SIGNATURE`: `op`, the token's name (hex, since a name may hold `.`), the token's
//!   fingerprint (`operator_fingerprint`: 16 bytes of the HMAC of the token's SHA-256 under the
//!   console's secret, so a cookie that leaks gives nothing to test guesses of the token
//!   against), then as above, signed under another label, `operator-session`.
//!
//! The labels keep the kinds apart whatever the fields hold: a workspace's signature never
//! verifies an operator's payload, nor the other way round (and `op` is not a workspace id).
//! There is no session table: a cookie is valid if its signature is and it has not expired,
//! and every page checks again what it stands for. A workspace's session holds while its key is
//! neither revoked nor expired and its workspace not suspended (against the catalogue), so
//! revoking the key ends every session signed in with it, and suspending the workspace refuses
//! them while it lasts, on every instance, within the catalogue's refresh (at once on the
//! instance that made the change). A session outlives a suspension (nothing records when it
//! began): one not yet expired holds again after a reactivation. An
//! operator's holds while a configured admin token has its name and fingerprint
//! (`http::console_operator`), so removing or changing the token (a restart with another
//! configuration) ends its sessions.
//!
//! The secret is 32 random bytes made once and kept in the store (`Store::console_secret`,
//! insert-if-absent, so instances starting together agree): sessions survive restarts and are
//! valid on every instance. Changing it (deleting the row) ends every session.
//!
//! # Forms
//! Every form that changes something carries a token derived from the session (the HMAC of the
//! session's signed part under the same secret, with another label), checked on POST: a page
//! of another site cannot read it, so it cannot forge the form. The sign-in form has no session
//! yet; it is protected by the cookie's `SameSite=Lax` and by a check of `Origin` when the
//! browser sends one (`http::console`).
//!
//! # Sign-in attempts
//! `SignInLimiter`: a token bucket per client address (`SIGN_INS_PER_MINUTE`, refilled
//! continuously), in memory and per instance, holding at most `MAX_TRACKED_CLIENTS` addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::hex;
use crate::limiter::{Nanos, NANOS_PER_SEC};
use crate::model::{KeyId, WorkspaceId};

/// The session cookie's name.
pub const COOKIE: &str = "tiergate_console";
/// How long a session lasts, in seconds.
pub const SESSION_LIFETIME: i64 = 12 * 3600;
/// Sign-in attempts per client address per minute (also the burst).
pub const SIGN_INS_PER_MINUTE: u32 = 10;
/// Client addresses the sign-in limiter remembers at most; past that, the addresses whose
/// bucket is full again are forgotten, and if none is, sign-ins from new addresses are refused
/// until some are.
pub const MAX_TRACKED_CLIENTS: usize = 10_000;

type HmacSha256 = Hmac<Sha256>;

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub kind: SessionKind,
    /// Unix seconds.
    pub expires_at: i64,
    nonce: [u8; 16],
}

/// Who a session is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKind {
    /// Signed in with the workspace's key `key`.
    Workspace { workspace: WorkspaceId, key: KeyId },
    /// Signed in with the admin token named `name`, whose fingerprint is `fingerprint`.
    Operator {
        name: String,
        fingerprint: Fingerprint,
    },
}

/// An admin token's fingerprint (see `Console::operator_fingerprint`).
pub type Fingerprint = [u8; 16];

/// The first field of an operator's cookie.
const OPERATOR_TAG: &str = "op";

impl Session {
    /// The signed part of the cookie.
    fn payload(&self) -> String {
        let (expires, nonce) = (self.expires_at, hex(&self.nonce));
        match &self.kind {
            SessionKind::Workspace { workspace, key } => {
                format!("{workspace}.{key}.{expires}.{nonce}")
            }
            SessionKind::Operator { name, fingerprint } => format!(
                "{OPERATOR_TAG}.{}.{}.{expires}.{nonce}",
                hex(name.as_bytes()),
                hex(fingerprint)
            ),
        }
    }

    /// The label its signature is made under.
    fn label(&self) -> &'static str {
        match self.kind {
            SessionKind::Workspace { .. } => "session",
            SessionKind::Operator { .. } => "operator-session",
        }
    }

    /// The workspace and key of a workspace's session.
    pub fn workspace(&self) -> Option<(WorkspaceId, KeyId)> {
        match self.kind {
            SessionKind::Workspace { workspace, key } => Some((workspace, key)),
            SessionKind::Operator { .. } => None,
        }
    }
}

/// The console's sessions and sign-in limiter, shared by every console request.
pub struct Console {
    secret: Vec<u8>,
    sign_ins: Mutex<SignInLimiter>,
}

impl Console {
    pub fn new(secret: Vec<u8>) -> Console {
        Console {
            secret,
            sign_ins: Mutex::new(SignInLimiter::default()),
        }
    }

    fn mac(&self, label: &str, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(label.as_bytes());
        mac.update(b"|");
        mac.update(payload.as_bytes());
        mac
    }

    /// A new session for `key` of `workspace`, and its cookie's value.
    pub fn sign_in(&self, workspace: WorkspaceId, key: KeyId, now: i64) -> (Session, String) {
        self.start(SessionKind::Workspace { workspace, key }, now)
    }

    /// A new operator's session for the admin token named `name` whose SHA-256 is `digest`,
    /// and its cookie's value.
    pub fn sign_in_operator(&self, name: &str, digest: &[u8], now: i64) -> (Session, String) {
        let kind = SessionKind::Operator {
            name: name.to_string(),
            fingerprint: self.operator_fingerprint(digest),
        };
        self.start(kind, now)
    }

    fn start(&self, kind: SessionKind, now: i64) -> (Session, String) {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        let session = Session {
            kind,
            expires_at: now + SESSION_LIFETIME,
            nonce,
        };
        let payload = session.payload();
        let signature = self.mac(session.label(), &payload).finalize().into_bytes();
        let value = format!("{payload}.{}", hex(&signature));
        (session, value)
    }

    /// The fingerprint an operator's session keeps of its admin token, from the token's
    /// SHA-256: keyed with the console's secret, so that it tells nothing about the token to
    /// whoever holds the cookie without the secret.
    pub fn operator_fingerprint(&self, digest: &[u8]) -> Fingerprint {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(b"operator-token|");
        mac.update(digest);
        let full = mac.finalize().into_bytes();
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&full[..16]);
        fingerprint
    }

    /// The session a cookie's value stands for, if its signature is good and it has not
    /// expired. (Whether what it stands for still holds, its key and workspace or its admin
    /// token, the pages check.)
    pub fn verify(&self, value: &str, now: i64) -> Option<Session> {
        let (payload, signature) = value.rsplit_once('.')?;
        let signature = unhex(signature)?;
        let mut parts = payload.split('.');
        let first = parts.next()?;
        let kind = if first == OPERATOR_TAG {
            self.mac("operator-session", payload)
                .verify_slice(&signature)
                .ok()?;
            let name = String::from_utf8(unhex(parts.next()?)?).ok()?;
            let fingerprint = unhex(parts.next()?)?.try_into().ok()?;
            SessionKind::Operator { name, fingerprint }
        } else {
            self.mac("session", payload).verify_slice(&signature).ok()?;
            let workspace = first.parse().ok()?;
            let key = parts.next()?.parse().ok()?;
            SessionKind::Workspace { workspace, key }
        };
        let expires_at: i64 = parts.next()?.parse().ok()?;
        let nonce: [u8; 16] = unhex(parts.next()?)?.try_into().ok()?;
        if parts.next().is_some() || expires_at <= now {
            return None;
        }
        Some(Session {
            kind,
            expires_at,
            nonce,
        })
    }

    /// `value` sealed for `session` and one purpose (`label`): `value.signature`. A page that
    /// shows what a cookie carries (a new secret, once) then shows only what this gateway put
    /// there for that very session and purpose.
    pub fn seal(&self, session: &Session, label: &str, value: &str) -> String {
        let signature = self
            .mac(label, &format!("{}|{value}", session.payload()))
            .finalize()
            .into_bytes();
        format!("{value}.{}", hex(&signature))
    }

    /// What `sealed` holds, if `seal` made it for `session` and `label`.
    pub fn unseal<'a>(&self, session: &Session, label: &str, sealed: &'a str) -> Option<&'a str> {
        let (value, signature) = sealed.rsplit_once('.')?;
        self.mac(label, &format!("{}|{value}", session.payload()))
            .verify_slice(&unhex(signature)?)
            .ok()?;
        Some(value)
    }

    /// The token the forms of `session` carry.
    pub fn csrf_token(&self, session: &Session) -> String {
        hex(&self.mac("csrf", &session.payload()).finalize().into_bytes())
    }

    /// Whether `token` is `session`'s form token (compared in constant time).
    pub fn csrf_holds(&self, session: &Session, token: &str) -> bool {
        unhex(token).is_some_and(|t| {
            self.mac("csrf", &session.payload())
                .verify_slice(&t)
                .is_ok()
        })
    }

    /// Takes one sign-in attempt from `client`'s bucket; false when it is empty.
    pub fn allow_sign_in(&self, client: IpAddr, now: Nanos) -> bool {
        self.sign_ins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(client, now)
    }
}

/// Sign-in attempts per client address, by GCRA (the token bucket as one instant per
/// client: when its bucket will be full again).
#[derive(Debug, Default)]
struct SignInLimiter {
    full_at: HashMap<IpAddr, Nanos>,
}

/// One attempt comes back every this many nanoseconds.
const INTERVAL: Nanos = 60 * NANOS_PER_SEC / SIGN_INS_PER_MINUTE as u64;
/// An attempt is allowed while the bucket is at most this far from full.
const TOLERANCE: Nanos = (SIGN_INS_PER_MINUTE as u64 - 1) * INTERVAL;

impl SignInLimiter {
    fn allow(&mut self, client: IpAddr, now: Nanos) -> bool {
        if !self.full_at.contains_key(&client) && self.full_at.len() >= MAX_TRACKED_CLIENTS {
            self.full_at.retain(|_, full_at| *full_at > now);
            if self.full_at.len() >= MAX_TRACKED_CLIENTS {
                return false;
            }
        }
        let full_at = self.full_at.entry(client).or_insert(now);
        let from = (*full_at).max(now);
        if from - now > TOLERANCE {
            return false;
        }
        *full_at = from + INTERVAL;
        true
    }
}

/// Lower-case hex digits only, as `hex` writes them: a signature or token is taken as the exact
/// text this gateway made, not another spelling of its bytes (an outside audit: a cookie's MAC
/// and a form token in upper case were accepted).
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Console {
        Console::new(vec![7; 32])
    }

    #[test]
    fn a_session_verifies_until_it_expires_and_not_when_touched() {
        let c = console();
        let (session, value) = c.sign_in(3, 9, 1000);
        assert_eq!(c.verify(&value, 1000), Some(session.clone()));
        assert_eq!(c.verify(&value, 1000 + SESSION_LIFETIME), None);
        // Another workspace id with the same signature.
        let forged = value.replacen("3.", "4.", 1);
        assert_eq!(c.verify(&forged, 1000), None);
        // Another secret.
        assert_eq!(Console::new(vec![8; 32]).verify(&value, 1000), None);
        for bad in ["", ".", "a.b.c.d.e", &value[..value.len() - 1]] {
            assert_eq!(c.verify(bad, 1000), None, "{bad}");
        }
    }

    #[test]
    fn an_operator_session_names_its_token_and_never_passes_for_a_workspace_one() {
        let c = console();
        let digest = [5u8; 32];
        let (session, value) = c.sign_in_operator("ops.team-1", &digest, 1000);
        assert_eq!(c.verify(&value, 1000), Some(session.clone()));
        assert_eq!(session.workspace(), None);
        let SessionKind::Operator { name, fingerprint } = &session.kind else {
            panic!("{session:?}");
        };
        assert_eq!(name, "ops.team-1");
        assert_eq!(*fingerprint, c.operator_fingerprint(&digest));
        assert_ne!(*fingerprint, c.operator_fingerprint(&[6u8; 32]));
        // Another secret, another fingerprint of the same token.
        assert_ne!(
            Console::new(vec![8; 32]).operator_fingerprint(&digest),
            *fingerprint
        );
        assert!(value.starts_with("op."));
        assert!(!value.contains("ops.team-1"), "the name is hex: {value}");
        assert_eq!(c.verify(&value, 1000 + SESSION_LIFETIME), None);

        // A workspace's payload under an operator's signature, and the other way round.
        let (_, ws_value) = c.sign_in(3, 9, 1000);
        let (ws_payload, ws_sig) = ws_value.rsplit_once('.').unwrap();
        let (op_payload, op_sig) = value.rsplit_once('.').unwrap();
        assert_eq!(c.verify(&format!("{ws_payload}.{op_sig}"), 1000), None);
        assert_eq!(c.verify(&format!("{op_payload}.{ws_sig}"), 1000), None);
        // The workspace's payload signed as an operator's, and an operator's as a workspace's:
        // each label verifies only its own kind.
        let as_operator = hex(&c
            .mac("operator-session", ws_payload)
            .finalize()
            .into_bytes());
        assert_eq!(c.verify(&format!("{ws_payload}.{as_operator}"), 1000), None);
        let as_workspace = hex(&c.mac("session", op_payload).finalize().into_bytes());
        assert_eq!(
            c.verify(&format!("{op_payload}.{as_workspace}"), 1000),
            None
        );
        // Another name with the same signature.
        let renamed = value.replacen(&hex(b"ops.team-1"), &hex(b"ops.team-2"), 1);
        assert_eq!(c.verify(&renamed, 1000), None);
    }

    #[test]
    fn a_signature_or_token_in_another_spelling_is_refused() {
        let c = console();
        let (session, cookie) = c.sign_in(7, 3, 1_000);
        assert!(c.verify(&cookie, 1_001).is_some());
        let (payload, mac) = cookie.rsplit_once('.').unwrap();
        assert_ne!(mac, mac.to_uppercase(), "a MAC with letters");
        assert!(c
            .verify(&format!("{payload}.{}", mac.to_uppercase()), 1_001)
            .is_none());
        let token = c.csrf_token(&session);
        assert!(c.csrf_holds(&session, &token));
        assert!(!c.csrf_holds(&session, &token.to_uppercase()));
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let c = console();
        let (a, _) = c.sign_in(1, 1, 0);
        let (b, _) = c.sign_in(1, 1, 0);
        let (op, _) = c.sign_in_operator("admin", &[1; 32], 0);
        let token = c.csrf_token(&a);
        assert!(c.csrf_holds(&a, &token));
        assert!(!c.csrf_holds(&b, &token));
        assert!(!c.csrf_holds(&op, &token));
        assert!(c.csrf_holds(&op, &c.csrf_token(&op)));
        assert!(!c.csrf_holds(&a, ""));
        assert!(!c.csrf_holds(&a, "zz"));
    }

    #[test]
    fn a_sealed_value_opens_only_for_its_session_and_purpose() {
        let c = console();
        let (a, _) = c.sign_in(1, 1, 0);
        let (b, _) = c.sign_in(1, 1, 0);
        let sealed = c.seal(&a, "webhook:5", "whsec_abc+/=");
        assert_eq!(c.unseal(&a, "webhook:5", &sealed), Some("whsec_abc+/="));
        assert_eq!(c.unseal(&b, "webhook:5", &sealed), None);
        assert_eq!(c.unseal(&a, "webhook:6", &sealed), None);
        let (_, signature) = sealed.rsplit_once('.').unwrap();
        assert_eq!(
            c.unseal(&a, "webhook:5", &format!("whsec_abd+/=.{signature}")),
            None
        );
        assert_eq!(
            Console::new(vec![8; 32]).unseal(&a, "webhook:5", &sealed),
            None
        );
        for bad in ["", ".", "whsec_abc+/=", "whsec_abc+/=.zz"] {
            assert_eq!(c.unseal(&a, "webhook:5", bad), None, "{bad}");
        }
    }

    #[test]
    fn sign_ins_are_limited_per_client_and_refill() {
        let c = console();
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..SIGN_INS_PER_MINUTE {
            assert!(c.allow_sign_in(one, 0));
        }
        assert!(!c.allow_sign_in(one, 0));
        assert!(c.allow_sign_in(two, 0));
        // One attempt comes back every 60 / SIGN_INS_PER_MINUTE seconds.
        let every = 60 * NANOS_PER_SEC / SIGN_INS_PER_MINUTE as u64;
        assert!(!c.allow_sign_in(one, every - 1));
        assert!(c.allow_sign_in(one, every));
        assert!(!c.allow_sign_in(one, every));
    }
}
