//! `wasmq web`: the dashboard, served by the binary itself (SPEC.md,
//! "Operating it"; docs/operations.md, "Web dashboard").
//!
//! Server-rendered pages over the same broker calls the CLI uses, a JSON
//! endpoint for the overview's live charts, and a little JavaScript; every
//! asset is compiled in. One file per concern:
//! - [`routes`]: the URL map and the page handlers;
//! - [`guard`]: what every request passes first (host, origin, who is
//!   asking, read-only, CSRF) and the security headers of every response;
//! - [`actions`]: the POST handlers, the only ones that change anything;
//! - [`auth`]: tokens, sessions, CSRF tokens, constant-time comparison;
//! - [`throttle`]: each client's budget of failed token checks;
//! - [`pages`]: the HTML (escaped by construction);
//! - [`charts`]: the overview's per-minute series;
//! - [`assets`]: the embedded stylesheet and script.
//!
//! [`serve`] takes a bound listener and a shutdown future, so tests run
//! the real server in-process on a free port.

mod actions;
pub mod assets;
pub mod auth;
pub mod charts;
mod guard;
pub mod pages;
mod routes;
pub mod throttle;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::broker::Broker;
pub use throttle::ThrottleConfig;

/// What a dashboard serves, and how.
pub struct WebConfig {
    /// The broker it reads and acts through.
    pub broker: Broker,
    /// The tenant `/` opens for the admin.
    pub tenant: String,
    /// The admin token (from `--token-file` or `WASMQ_WEB_TOKEN`). When
    /// set, every request on every listener, loopback included, needs a
    /// token; without it the dashboard may only listen on loopback, and
    /// is open there.
    pub admin_token: Option<String>,
    /// Show no action, refuse every one.
    pub read_only: bool,
    /// How many failed token checks a client may make, and how fast its
    /// budget comes back.
    pub throttle: ThrottleConfig,
    /// Take the client's address (for the throttle) from the last entry
    /// of `X-Forwarded-For` rather than from the TCP peer. Only for a
    /// dashboard that nothing but its proxy can reach: anyone else could
    /// write the header and pick a fresh budget per request.
    pub trust_forwarded_for: bool,
}

impl WebConfig {
    /// A loopback dashboard of `tenant` with the defaults: no admin
    /// token, actions shown, the default throttle, peers' own addresses.
    pub fn new(broker: Broker, tenant: &str) -> Self {
        WebConfig {
            broker,
            tenant: tenant.to_string(),
            admin_token: None,
            read_only: false,
            throttle: ThrottleConfig::default(),
            trust_forwarded_for: false,
        }
    }
}

/// Who a dashboard lets in: decided by its configuration alone (never by
/// what is in Redis), so what the startup line says is what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No admin token, on loopback: whoever can connect is the admin.
    Open,
    /// An admin token is configured: every request needs a token (the
    /// admin's or a tenant's), on loopback too.
    TokenRequired,
}

impl Access {
    /// The startup line's words for `url` in this mode.
    pub fn describe(self, url: &str) -> String {
        match self {
            Access::Open => format!(
                "dashboard on {url}: open to anyone who can reach loopback, as the admin \
                 (no token configured)"
            ),
            Access::TokenRequired => format!(
                "dashboard on {url}: token required (the admin token, or a tenant's), \
                 loopback included"
            ),
        }
    }
}

/// The state handlers share.
pub(crate) struct App {
    pub broker: Broker,
    pub auth: auth::Auth,
    pub throttle: throttle::Throttle,
    pub trust_forwarded_for: bool,
    pub default_tenant: String,
    pub read_only: bool,
}

/// Why `config` may not serve on `addr`, if it may not: off loopback it
/// needs an admin token, and a token must be long enough not to guess.
pub fn refusal(addr: std::net::SocketAddr, config: &WebConfig) -> Option<String> {
    if let Some(token) = &config.admin_token {
        if token.chars().count() < auth::MIN_TOKEN_LEN {
            return Some(format!(
                "the admin token is {} characters long: use at least {} (e.g. `openssl rand -hex 32`)",
                token.chars().count(),
                auth::MIN_TOKEN_LEN
            ));
        }
    } else if !addr.ip().is_loopback() {
        return Some(format!(
            "refusing to serve the dashboard on {addr} without a token: anyone who can reach it could \
             act on every tenant. Set one with --token-file FILE or WASMQ_WEB_TOKEN, or listen on \
             127.0.0.1 only"
        ));
    } else if config.trust_forwarded_for {
        return Some(
            "refusing --trust-forwarded-for without a token: a dashboard behind a proxy is reached \
             by more than this machine, and without a token (--token-file FILE or WASMQ_WEB_TOKEN) \
             everyone it forwards would be the admin"
                .into(),
        );
    }
    None
}

/// Who `config` lets in on `addr`, or why it may not serve there at all:
/// [`refusal`]'s reasons, and one more: on loopback without an admin
/// token, the tenants it knows of (those with a record, and its
/// `--tenant`) must have no dashboard token. A tenant token means someone
/// other than this machine's users is meant to reach the dashboard,
/// typically through a proxy on this host; open, it would make every one
/// of them the admin and the tokens would protect nothing.
pub async fn access(addr: std::net::SocketAddr, config: &WebConfig) -> anyhow::Result<Access> {
    if let Some(why) = refusal(addr, config) {
        anyhow::bail!(why);
    }
    if config.admin_token.is_some() {
        return Ok(Access::TokenRequired);
    }
    let with_tokens = tenants_with_tokens(config).await?;
    if !with_tokens.is_empty() {
        anyhow::bail!(
            "refusing to serve the dashboard open on loopback: tenant(s) {} have dashboard tokens, \
             so people other than this machine's users are meant to use it (through a proxy on this \
             host, say), and without an admin token every one of them would be the admin. Set one \
             with --token-file FILE or WASMQ_WEB_TOKEN (then every request needs a token), or \
             revoke those tokens (`wasmq web token list --tenant T`)",
            with_tokens.join(", ")
        );
    }
    Ok(Access::Open)
}

/// The tenants among those with a record and the dashboard's own that
/// hold at least one dashboard token (one pipelined HLEN each).
async fn tenants_with_tokens(config: &WebConfig) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let mut tenants = config.broker.tenant_names().await?;
    if !tenants.contains(&config.tenant) {
        tenants.push(config.tenant.clone());
    }
    let mut pipe = redis::pipe();
    for t in &tenants {
        pipe.hlen(crate::keys::Keys::new(t).web_tokens());
    }
    let counts: Vec<u64> = pipe
        .query_async(&mut config.broker.connection())
        .await
        .context("counting the tenants' dashboard tokens")?;
    Ok(tenants
        .into_iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(t, _)| t)
        .collect())
}

/// Serve the dashboard on `listener` until `shutdown` completes. Refuses
/// to start where [`access`] says it may not.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: WebConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    crate::keys::valid_tenant(&config.tenant).map_err(anyhow::Error::msg)?;
    let access = access(addr, &config).await?;
    let app = Arc::new(App {
        auth: auth::Auth::new(config.admin_token.as_deref(), access == Access::Open),
        throttle: throttle::Throttle::new(config.throttle),
        trust_forwarded_for: config.trust_forwarded_for,
        broker: config.broker,
        default_tenant: config.tenant,
        read_only: config.read_only,
    });
    // With the peer's address: the throttle counts failures per client.
    let service = routes::router(app).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
