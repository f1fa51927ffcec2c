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

use std::future::Future;
use std::sync::Arc;

use crate::broker::Broker;

/// What a dashboard serves, and how.
pub struct WebConfig {
    /// The broker it reads and acts through.
    pub broker: Broker,
    /// The tenant `/` opens for the admin.
    pub tenant: String,
    /// The admin token (from `--token-file` or `WASMQ_WEB_TOKEN`); needed
    /// unless the dashboard listens on loopback only.
    pub admin_token: Option<String>,
    /// Show no action, refuse every one.
    pub read_only: bool,
}

/// The state handlers share.
pub(crate) struct App {
    pub broker: Broker,
    pub auth: auth::Auth,
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
    }
    None
}

/// Serve the dashboard on `listener` until `shutdown` completes. Refuses
/// to start (see [`refusal`]) off loopback without a token.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: WebConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if let Some(why) = refusal(addr, &config) {
        anyhow::bail!(why);
    }
    crate::keys::valid_tenant(&config.tenant).map_err(anyhow::Error::msg)?;
    let app = Arc::new(App {
        auth: auth::Auth::new(config.admin_token.as_deref(), addr.ip().is_loopback()),
        broker: config.broker,
        default_tenant: config.tenant,
        read_only: config.read_only,
    });
    axum::serve(listener, routes::router(app))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
