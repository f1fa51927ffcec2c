//! `wasmq dead list|retry|purge`: the dead-letter queue.

use clap::Subcommand;

use super::{format, CliError};
use crate::broker::Broker;
use crate::failure::Failure;

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead jobs, newest first, with their last error ("none" when
    /// the dead-letter queue is empty).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: isize,
        /// One JSON object per line (times in ms and as RFC 3339).
        #[arg(long)]
        json: bool,
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
        DeadCommand::List { limit, json } => {
            let dead = broker.dead_list(tenant, limit).await?;
            if dead.is_empty() && !json {
                println!("none");
            }
            for (id, at_ms) in dead {
                let status = broker.status(tenant, &id).await?;
                let (task, error, attempts) =
                    status.map_or((None, None, 0), |s| (s.task, s.last_error, s.attempts));
                if json {
                    let line = serde_json::json!({"id": id, "dead_at_ms": at_ms, "task": task, "attempts": attempts, "error": error});
                    println!("{}", format::with_rfc3339(line));
                    continue;
                }
                let error = error
                    .and_then(|e| serde_json::from_value::<Failure>(e).ok())
                    .map_or_else(|| "(no error recorded)".to_string(), |f| f.to_string());
                println!(
                    "{id}  dead {}  task {}  attempts {attempts}  {error}",
                    format::rfc3339(at_ms),
                    task.as_deref().unwrap_or("?")
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
