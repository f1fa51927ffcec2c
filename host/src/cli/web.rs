//! `wasmq web`: serve the dashboard (see `crate::web`), and `wasmq web
//! token create|list|revoke`: the tenant-scoped tokens it accepts.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{format, CliError};
use crate::broker::Broker;
use crate::web::{self, WebConfig};

/// The environment variable that may hold the admin token (never a flag
/// value: flags show in `ps` and shell history).
const TOKEN_ENV: &str = "WASMQ_WEB_TOKEN";

/// `wasmq web` flags.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WebArgs {
    /// Tenant tokens.
    #[command(subcommand)]
    command: Option<WebCommand>,
    /// Address to serve on. On a loopback address (127.0.0.1, ::1)
    /// without an admin token, the dashboard is open: whoever can connect
    /// is the admin. With an admin token, every request needs a token,
    /// loopback included. On any other address it refuses to start
    /// without an admin token.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the admin token (whitespace around it is ignored);
    /// or set WASMQ_WEB_TOKEN. The admin sees every tenant. Once set,
    /// every request on every address needs a token.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Show no action buttons and refuse every action (403).
    #[arg(long = "read-only")]
    read_only: bool,
    /// Throttle failed token checks per client by the last address in
    /// X-Forwarded-For (the one your proxy appends) instead of the TCP
    /// peer. Only when nothing but that proxy can reach the dashboard
    /// (anyone else could write the header); needs an admin token.
    /// Without it, every client behind a proxy shares the proxy's budget.
    #[arg(long = "trust-forwarded-for")]
    trust_forwarded_for: bool,
}

/// `wasmq web ...` subcommands.
#[derive(Debug, Subcommand)]
enum WebCommand {
    /// Tokens that let their holder see and act on one tenant (the
    /// global `--tenant`) in the dashboard.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `wasmq web token ...`.
#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token for the tenant and print it (once: only its SHA-256
    /// is stored).
    Create {
        /// What it is for (shown by `list`).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// The tenant's tokens: id, note, who created them and when (never
    /// the tokens).
    List,
    /// Revoke the tenant's token with this id (from `list`); its sessions
    /// end with their next request.
    Revoke {
        /// Token id.
        id: String,
    },
}

/// Run `wasmq web ...`.
pub async fn web(redis: &str, tenant: &str, args: WebArgs) -> Result<(), CliError> {
    match args.command {
        Some(WebCommand::Token(command)) => token(redis, tenant, command).await,
        None => serve(redis, tenant, args).await,
    }
}

/// The admin token, from `--token-file` or the environment.
fn admin_token(file: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    let from_env = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty());
    match (file, from_env) {
        (Some(_), Some(_)) => {
            anyhow::bail!("both --token-file and {TOKEN_ENV} are set: give the admin token one way")
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token from {}", path.display()))?;
            let token = text.trim().to_string();
            anyhow::ensure!(
                !token.is_empty(),
                "{} is empty: put the admin token in it",
                path.display()
            );
            Ok(Some(token))
        }
        (None, env) => Ok(env.map(|t| t.trim().to_string())),
    }
}

async fn serve(redis: &str, tenant: &str, args: WebArgs) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    let mut config = WebConfig::new(broker, tenant);
    config.admin_token = admin_token(args.token_file.as_ref())?;
    config.read_only = args.read_only;
    config.trust_forwarded_for = args.trust_forwarded_for;
    // Checked before binding, so a refusal leaves the port alone; `serve`
    // checks again.
    let access = web::access(args.listen, &config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    // The bound address, so `--listen 127.0.0.1:0` says which port it got.
    let bound = listener.local_addr().unwrap_or(args.listen);
    let mut line = format!("wasmq web: {}", access.describe(&format!("http://{bound}")));
    if args.trust_forwarded_for {
        line.push_str("; clients by X-Forwarded-For");
    }
    if args.read_only {
        line.push_str("; read-only");
    }
    format::notice(&line);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    web::serve(listener, config, shutdown).await?;
    Ok(())
}

async fn token(redis: &str, tenant: &str, command: TokenCommand) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    match command {
        TokenCommand::Create { note } => {
            let (token, record) = broker
                .web_token_create(tenant, &note, &super::operate::who())
                .await?;
            println!("{token}");
            format::notice(&format!(
                "dashboard token {} for tenant {tenant:?} (shown once; revoke with `wasmq web token revoke {} --tenant {tenant}`). \
                 It protects something only on a dashboard with an admin token (--token-file): \
                 one already running open on loopback lets anyone in as the admin until it is restarted, and then refuses to start open",
                record.id, record.id
            ));
        }
        TokenCommand::List => {
            let tokens = broker.web_token_list(tenant).await?;
            if tokens.is_empty() {
                println!("no dashboard tokens for tenant {tenant:?}");
            }
            for t in tokens {
                println!(
                    "{}  created {} by {}  {}",
                    t.id,
                    format::rfc3339(t.created_at_ms),
                    t.created_by,
                    t.note
                );
            }
        }
        TokenCommand::Revoke { id } => {
            if !broker.web_token_revoke(tenant, &id).await? {
                return Err(anyhow::anyhow!(
                    "tenant {tenant:?} has no dashboard token {id:?} (see `wasmq web token list`)"
                )
                .into());
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
