//! Who a request is, and whether it may change anything.
//!
//! Owns the dashboard's security rules (docs/operations.md, "Web
//! dashboard"):
//! - **Who**: a `Authorization: Bearer TOKEN` header, or the session
//!   cookie a login (posting a token to `/login`) set. The admin token
//!   sees every tenant; a tenant token (`wasmq web token create`) only its
//!   own. Only on an *open* dashboard (loopback, and no admin token
//!   configured: see [`super::Access`]) is a request with neither the
//!   admin; once a token is configured, every listener needs one,
//!   loopback included (a proxy on the same host forwards from loopback).
//!   Failed checks are throttled per client by the caller
//!   ([`super::throttle`]), before this module is asked.
//! - **Sessions** live in this process only (a restart logs everyone
//!   out); the cookie is `HttpOnly; SameSite=Strict`, and the session
//!   remembers its tenant token's digest so a revoked token ends it.
//! - **CSRF**: every action is a POST carrying a token derived (HMAC with
//!   a per-process random key) from the session or bearer token, checked
//!   in constant time; a cross-site `Origin` or `Sec-Fetch-Site` is
//!   refused before that.
//!
//! Tokens are compared as SHA-256 digests in constant time; only digests
//! are kept in memory and in Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::broker::{token_digest, Broker};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "wasmq_session";

/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Sessions kept at most: logins past it are refused until some expire,
/// so a flood of logins cannot grow memory without bound.
const MAX_SESSIONS: usize = 10_000;

/// The shortest admin token accepted: a token short enough to guess is
/// no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The admin token, or anyone on an open (loopback, no token)
    /// dashboard.
    Admin,
    /// A tenant token: this tenant only.
    Tenant {
        /// The tenant.
        tenant: String,
        /// The token's id (the start of its digest), for the records of
        /// what it did.
        token_id: String,
    },
}

impl Principal {
    /// Whether it may see and act on `tenant`.
    pub fn may_see(&self, tenant: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Tenant { tenant: own, .. } => own == tenant,
        }
    }

    /// The one tenant it is confined to, if any.
    pub fn own_tenant(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Tenant { tenant, .. } => Some(tenant),
        }
    }

    /// Who it is in the records of its actions (a job's history, a
    /// queue's pause): `web/admin@HOST` or `web/token-ID@HOST`.
    pub fn who(&self) -> String {
        let host = crate::launcher::hostname();
        match self {
            Principal::Admin => format!("web/admin@{host}"),
            Principal::Tenant { token_id, .. } => format!("web/token-{token_id}@{host}"),
        }
    }
}

/// One login.
struct Session {
    principal: Principal,
    /// For a tenant token: its digest, re-checked on every request so a
    /// revoked token ends its sessions.
    token_digest: Option<String>,
    expires: Instant,
}

/// What a request resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Who.
    pub principal: Principal,
    /// What its CSRF token is derived from (a session id, an anonymous
    /// cookie, or a bearer token's digest).
    pub csrf_key: String,
    /// Whether it logged in (and may log out).
    pub logged_in: bool,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, or wrong ones.
    Unauthorized(&'static str),
}

/// The dashboard's credentials and sessions.
pub struct Auth {
    /// SHA-256 of the admin token, if one is configured.
    admin_digest: Option<[u8; 32]>,
    /// Open (loopback, no admin token): a request without credentials is
    /// the admin.
    pub open: bool,
    /// Per-process random key of the CSRF HMAC.
    secret: [u8; 32],
    /// Session id → session.
    sessions: Mutex<HashMap<String, Session>>,
}

impl Auth {
    /// Credentials for a dashboard: `admin_token` if configured; `open`
    /// when it needs no token (loopback, no admin token).
    pub fn new(admin_token: Option<&str>, open: bool) -> Self {
        Auth {
            admin_digest: admin_token.map(|t| Sha256::digest(t.as_bytes()).into()),
            open,
            secret: rand::random(),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Who presents `token`: the admin, a tenant, or nobody.
    pub async fn check_token(
        &self,
        broker: &Broker,
        token: &str,
    ) -> anyhow::Result<Option<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(admin) = &self.admin_digest {
            if constant_time_eq(admin, &digest) {
                return Ok(Some(Principal::Admin));
            }
        }
        Ok(broker
            .web_token_tenant(token)
            .await?
            .map(|tenant| Principal::Tenant {
                tenant,
                token_id: hex::encode(digest)[..12].to_string(),
            }))
    }

    /// Resolve a request from its `Authorization` header and session
    /// cookie.
    pub async fn resolve(
        &self,
        broker: &Broker,
        authorization: Option<&str>,
        cookie: Option<&str>,
    ) -> anyhow::Result<Result<Resolved, Refusal>> {
        if let Some(header) = authorization {
            let Some(token) = header.strip_prefix("Bearer ").map(str::trim) else {
                return Ok(Err(Refusal::Unauthorized(
                    "the Authorization header must be `Bearer TOKEN`",
                )));
            };
            return Ok(match self.check_token(broker, token).await? {
                Some(principal) => Ok(Resolved {
                    principal,
                    csrf_key: format!("bearer:{}", token_digest(token)),
                    logged_in: false,
                }),
                None => Err(Refusal::Unauthorized("the token is not valid")),
            });
        }
        if let Some(id) = cookie {
            if let Some((principal, digest)) = self.session(id) {
                let live = match &digest {
                    Some(d) => match principal.own_tenant() {
                        Some(tenant) => broker.web_token_digest_live(tenant, d).await?,
                        None => true,
                    },
                    None => true,
                };
                if live {
                    return Ok(Ok(Resolved {
                        principal,
                        csrf_key: format!("session:{id}"),
                        logged_in: true,
                    }));
                }
                self.logout(id);
            }
        }
        if self.open {
            // Open (loopback, no token configured): the admin. The CSRF
            // key is the browser's own anonymous cookie (set by the caller
            // when missing), which a cross-site page can neither read nor
            // send (SameSite=Strict).
            return Ok(Ok(Resolved {
                principal: Principal::Admin,
                csrf_key: cookie.map(|c| format!("anon:{c}")).unwrap_or_default(),
                logged_in: false,
            }));
        }
        Ok(Err(Refusal::Unauthorized(
            "this dashboard needs a token: log in, or send `Authorization: Bearer TOKEN`",
        )))
    }

    /// A live session's principal and token digest.
    fn session(&self, id: &str) -> Option<(Principal, Option<String>)> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(id)?;
        (session.expires > Instant::now())
            .then(|| (session.principal.clone(), session.token_digest.clone()))
    }

    /// Start a session for whoever presented `token`; its id (the
    /// cookie value). `None` when the session table is full.
    pub fn login(&self, principal: Principal, token: &str) -> Option<String> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.expires > now);
            if sessions.len() >= MAX_SESSIONS {
                return None;
            }
        }
        let id = hex::encode(rand::random::<[u8; 32]>());
        let token_digest = match principal {
            Principal::Admin => None,
            Principal::Tenant { .. } => Some(token_digest(token)),
        };
        sessions.insert(
            id.clone(),
            Session {
                principal,
                token_digest,
                expires: now + SESSION_TTL,
            },
        );
        Some(id)
    }

    /// End a session.
    pub fn logout(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.remove(id);
    }

    /// The CSRF token of a request resolved to `key` (empty key: none).
    pub fn csrf_token(&self, key: &str) -> String {
        if key.is_empty() {
            return String::new();
        }
        hex::encode(hmac_sha256(&self.secret, key.as_bytes()))
    }

    /// Whether `given` is the CSRF token of `key`, in constant time.
    pub fn csrf_ok(&self, key: &str, given: &str) -> bool {
        let expected = self.csrf_token(key);
        !expected.is_empty() && constant_time_eq(expected.as_bytes(), given.as_bytes())
    }
}

/// Whether an action request comes from a page of this dashboard, judged
/// by the headers browsers set and pages cannot forge: `Sec-Fetch-Site`
/// (same-origin or none) and `Origin` (this host). A request with
/// neither (curl, a script) passes on to the CSRF token check.
pub fn same_origin(host: Option<&str>, origin: Option<&str>, fetch_site: Option<&str>) -> bool {
    if let Some(site) = fetch_site {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    match origin {
        None => true,
        Some(origin) => {
            let Some(host) = host else { return false };
            origin == format!("http://{host}") || origin == format!("https://{host}")
        }
    }
}

/// Whether a `Host` header names this machine's loopback (`localhost`,
/// `127.x.x.x`, `[::1]`, with or without a port). An open dashboard
/// needs no token, so it answers only requests for those names: a page
/// on another site whose DNS name was rebound to 127.0.0.1 sends its own
/// name as `Host` and is refused (DNS rebinding).
pub fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `a` and `b` are equal, taking the same time whatever their
/// contents (not their lengths, which are public here: digests and hex
/// tokens of fixed length).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key` (at most one block).
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name && !v.is_empty()).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_shape_and_differs_by_key() {
        let a = hmac_sha256(&[1; 32], b"session:x");
        let b = hmac_sha256(&[2; 32], b"session:x");
        assert_ne!(a, b);
        assert_eq!(a, hmac_sha256(&[1; 32], b"session:x"));
    }

    #[test]
    fn cross_site_requests_are_told_apart() {
        let host = Some("127.0.0.1:7070");
        assert!(same_origin(host, None, None));
        assert!(same_origin(
            host,
            Some("http://127.0.0.1:7070"),
            Some("same-origin")
        ));
        assert!(!same_origin(host, Some("http://evil.example"), None));
        assert!(!same_origin(host, Some("null"), None));
        assert!(!same_origin(host, None, Some("cross-site")));
        assert!(!same_origin(None, Some("http://127.0.0.1:7070"), None));
    }

    #[test]
    fn a_loopback_dashboard_answers_only_loopback_names() {
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST",
            "[::1]:7070",
            "127.0.0.2",
        ] {
            assert!(loopback_host(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example:7070",
            "10.0.0.5:7070",
            "127.0.0.1.evil.example",
            "[::2]:1",
        ] {
            assert!(!loopback_host(Some(bad)), "{bad}");
        }
        assert!(!loopback_host(None));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = "a=1; wasmq_session=abc; b=2";
        assert_eq!(cookie(h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie("wasmq_session=", SESSION_COOKIE), None);
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
