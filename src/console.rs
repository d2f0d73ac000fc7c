//! The console's sessions, without HTTP: how a signed-in browser is remembered, how its forms
//! are protected, and how sign-in attempts are limited. The pages are in `http::console`.
//!
//! # Sessions
//! Signing in exchanges a workspace key for a cookie; the key itself is never kept, in the
//! cookie or anywhere else. The cookie is `WORKSPACE.KEY.EXPIRES.NONCE.SIGNATURE`: the
//! workspace's id, the key's id, when the session ends (unix seconds, `SESSION_LIFETIME` after
//! sign-in), 16 random bytes that make every session's id unique, and the HMAC-SHA256 of the
//! rest under the console's secret. There is no session table: a cookie is valid if its
//! signature is, it has not expired, and — checked on every page, against the catalogue — its
//! key is neither revoked nor expired and its workspace is not suspended. So revoking the key or
//! suspending the workspace ends every session signed in with it, on every instance, within the
//! catalogue's refresh (at once on the instance that made the change).
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
    pub workspace: WorkspaceId,
    pub key: KeyId,
    /// Unix seconds.
    pub expires_at: i64,
    nonce: [u8; 16],
}

impl Session {
    /// The signed part of the cookie.
    fn payload(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.workspace,
            self.key,
            self.expires_at,
            hex(&self.nonce)
        )
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
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        let session = Session {
            workspace,
            key,
            expires_at: now + SESSION_LIFETIME,
            nonce,
        };
        let payload = session.payload();
        let signature = self.mac("session", &payload).finalize().into_bytes();
        let value = format!("{payload}.{}", hex(&signature));
        (session, value)
    }

    /// The session a cookie's value stands for, if its signature is good and it has not
    /// expired. (Whether its key and workspace still hold is the catalogue's to say.)
    pub fn verify(&self, value: &str, now: i64) -> Option<Session> {
        let (payload, signature) = value.rsplit_once('.')?;
        let signature = unhex(signature)?;
        self.mac("session", payload).verify_slice(&signature).ok()?;
        let mut parts = payload.split('.');
        let workspace = parts.next()?.parse().ok()?;
        let key = parts.next()?.parse().ok()?;
        let expires_at: i64 = parts.next()?.parse().ok()?;
        let nonce: [u8; 16] = unhex(parts.next()?)?.try_into().ok()?;
        if parts.next().is_some() || expires_at <= now {
            return None;
        }
        Some(Session {
            workspace,
            key,
            expires_at,
            nonce,
        })
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

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
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
    fn csrf_tokens_belong_to_their_session() {
        let c = console();
        let (a, _) = c.sign_in(1, 1, 0);
        let (b, _) = c.sign_in(1, 1, 0);
        let token = c.csrf_token(&a);
        assert!(c.csrf_holds(&a, &token));
        assert!(!c.csrf_holds(&b, &token));
        assert!(!c.csrf_holds(&a, ""));
        assert!(!c.csrf_holds(&a, "zz"));
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
