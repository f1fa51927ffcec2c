//! `wasmq dead list|retry|purge`: the dead-letter queue.

use clap::Subcommand;

use super::CliError;
use crate::broker::Broker;

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead jobs, newest first, with their last error.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: isize,
    },
    /// Run a dead job again with fresh attempts.
    Retry {
        /// Job id.
        id: String,
    },
    /// Delete every dead job.
    Purge,
}

/// Run a dead-letter command.
pub async fn dead(redis: &str, tenant: &str, command: DeadCommand) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    match command {
        DeadCommand::List { limit } => {
            for (id, at_ms) in broker.dead_list(tenant, limit).await? {
                let status = broker.status(tenant, &id).await?;
                let (task, error, attempts) =
                    status.map_or((None, None, 0), |s| (s.task, s.last_error, s.attempts));
                println!(
                    "{}",
                    serde_json::json!({"id": id, "dead_at_ms": at_ms, "task": task, "attempts": attempts, "error": error})
                );
            }
        }
        DeadCommand::Retry { id } => {
            if !broker.dead_retry(tenant, &id).await? {
                return Err(anyhow::anyhow!(
                    "job {id} is not in the dead-letter queue of tenant {tenant:?}"
                )
                .into());
            }
            println!("{id}");
        }
        DeadCommand::Purge => println!("purged {} dead job(s)", broker.dead_purge(tenant).await?),
    }
    Ok(())
}
