//! `wasmq secret set|list|remove|keygen`: a tenant's secrets (API keys,
//! database URLs), sealed with the secrets key before they leave this
//! process (see [`crate::secrets`]).
//!
//! A value is read from stdin or a file, never from the command line
//! (where `ps` and shell history would keep it), and nothing here prints
//! one back: `list` shows names, scopes and key ids.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::CliError;
use crate::broker::Broker;
use crate::limits::MAX_SECRET_BYTES;
use crate::secrets::{self, SecretsKey};

/// Secret commands.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store (or replace) secret NAME for the tenant, or for one task with
    /// `--task`; the value is read from stdin (one trailing newline is
    /// dropped) or `--from-file`. Needs the secrets key
    /// (`WASMQ_SECRETS_KEY_FILE` or `WASMQ_SECRETS_KEY`). The next job that
    /// reads it gets the new value.
    Set {
        /// Secret name: `[A-Za-z0-9_.:-]`; `database:NAME` is the URL of
        /// database NAME.
        name: String,
        /// Only for this task (its value wins over the tenant's).
        #[arg(long)]
        task: Option<String>,
        /// Read the value from this file instead of stdin.
        #[arg(long = "from-file")]
        from_file: Option<PathBuf>,
    },
    /// The tenant's secrets: names, the task each is for, the key id it
    /// was sealed with. Never values.
    List,
    /// Remove secret NAME (the tenant's, or one task's with `--task`).
    Remove {
        /// Secret name.
        name: String,
        /// The task's value, not the tenant's.
        #[arg(long)]
        task: Option<String>,
    },
    /// Print a new random secrets key (64 hex digits) to put in the file
    /// `WASMQ_SECRETS_KEY_FILE` names, on the workers and where `secret
    /// set` runs.
    Keygen,
}

/// Run a secret command.
pub async fn secret(redis: &str, tenant: &str, command: SecretCommand) -> Result<(), CliError> {
    match command {
        SecretCommand::Keygen => {
            println!("{}", SecretsKey::generate_hex());
            return Ok(());
        }
        SecretCommand::Set {
            name,
            task,
            from_file,
        } => {
            secrets::check_name(&name).map_err(anyhow::Error::msg)?;
            let key = SecretsKey::from_env()
                .map_err(anyhow::Error::msg)?
                .with_context(|| {
                    format!(
                        "no secrets key: set {} (a file holding the workers' key) or {}",
                        secrets::KEY_FILE_ENV,
                        secrets::KEY_ENV
                    )
                })?;
            let value = read_value(from_file.as_deref())?;
            let field = secrets::field(&name, task.as_deref());
            let sealed = key
                .seal(tenant, &field, value.as_bytes())
                .map_err(anyhow::Error::msg)?;
            let broker = Broker::connect(redis).await?;
            broker
                .secret_put(tenant, &name, task.as_deref(), &sealed)
                .await?;
            println!(
                "set secret {name}{} (key {})",
                scope(task.as_deref()),
                key.id()
            );
        }
        SecretCommand::List => {
            let broker = Broker::connect(redis).await?;
            let entries = broker.secret_list(tenant).await?;
            if entries.is_empty() {
                println!("none");
            }
            for e in entries {
                println!(
                    "{}{}  key {}",
                    e.name,
                    scope(e.task.as_deref()),
                    e.key_id.as_deref().unwrap_or("?")
                );
            }
        }
        SecretCommand::Remove { name, task } => {
            secrets::check_name(&name).map_err(anyhow::Error::msg)?;
            let broker = Broker::connect(redis).await?;
            if !broker.secret_remove(tenant, &name, task.as_deref()).await? {
                return Err(anyhow::anyhow!(
                    "no secret {name}{} in tenant {tenant}",
                    scope(task.as_deref())
                )
                .into());
            }
            println!("removed secret {name}{}", scope(task.as_deref()));
        }
    }
    Ok(())
}

/// ` (task T)` for a task's secret, nothing for the tenant's.
fn scope(task: Option<&str>) -> String {
    task.map(|t| format!(" (task {t})")).unwrap_or_default()
}

/// The value from `file` or stdin: UTF-8 text up to [`MAX_SECRET_BYTES`],
/// one trailing newline dropped (what `echo` and editors add).
fn read_value(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    match file {
        Some(path) => {
            bytes = std::fs::read(path)
                .with_context(|| format!("reading the secret from {}", path.display()))?
        }
        None => {
            std::io::stdin()
                .take(MAX_SECRET_BYTES as u64 + 3)
                .read_to_end(&mut bytes)
                .context("reading the secret from stdin")?;
        }
    }
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        anyhow::bail!("the secret is empty (pipe it on stdin or name a file with --from-file)");
    }
    crate::limits::check_len("secret value", bytes.len(), MAX_SECRET_BYTES)
        .map_err(anyhow::Error::msg)?;
    String::from_utf8(bytes).context("the secret is not UTF-8 text")
}
