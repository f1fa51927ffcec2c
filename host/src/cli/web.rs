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
    /// Address to serve on. On a loopback address (127.0.0.1, ::1) no
    /// token is needed; on any other the dashboard refuses to start
    /// without an admin token.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the admin token (whitespace around it is ignored);
    /// or set WASMQ_WEB_TOKEN. The admin sees every tenant.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Show no action buttons and refuse every action (403).
    #[arg(long = "read-only")]
    read_only: bool,
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
    let config = WebConfig {
        broker,
        tenant: tenant.to_string(),
        admin_token: admin_token(args.token_file.as_ref())?,
        read_only: args.read_only,
    };
    if let Some(why) = web::refusal(args.listen, &config) {
        return Err(anyhow::anyhow!(why).into());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    let access = if args.listen.ip().is_loopback() {
        "loopback only: no token needed"
    } else {
        "a token is needed"
    };
    // The bound address, so `--listen 127.0.0.1:0` says which port it got.
    let bound = listener.local_addr().unwrap_or(args.listen);
    format::notice(&format!(
        "wasmq web: serving http://{bound} ({access}{})",
        if args.read_only { "; read-only" } else { "" }
    ));
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
                "dashboard token {} for tenant {tenant:?} (shown once; revoke with `wasmq web token revoke {} --tenant {tenant}`)",
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
