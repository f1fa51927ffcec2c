//! The operator's commands: `wasmq queues`, `wasmq workers`, `wasmq
//! jobs`, `wasmq cancel` and `wasmq queue pause|resume` (SPEC.md,
//! "Operating it"). Each view has `--json` (one JSON array, times in ms
//! and as RFC 3339).

use clap::{Args, Subcommand};

use super::{format, CliError};
use crate::broker::{Broker, Cancelled, JobQuery, JobState, QueueView, WorkerBeat};
use crate::failure::Failure;

/// `wasmq jobs` flags.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only this state: waiting (workflow steps), queued, scheduled,
    /// running, succeeded, dead,
    /// cancelled.
    #[arg(long)]
    state: Option<JobState>,
    /// Only this task.
    #[arg(long)]
    task: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `wasmq queue ...`.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Stop workers fetching from a queue (its jobs stay queued; running
    /// jobs finish).
    Pause {
        /// Queue name.
        queue: String,
    },
    /// Let workers fetch from a paused queue again.
    Resume {
        /// Queue name.
        queue: String,
    },
}

/// Who is acting, for the records of cancels and pauses: `user@host`.
pub(super) fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", crate::launcher::hostname())
}

/// Milliseconds as a short human duration (`850ms`, `12.3s`, `4m05s`,
/// `2h10m`).
fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// Print `rows` as one JSON array with RFC 3339 twins of every time.
fn print_json<T: serde::Serialize>(rows: &[T]) -> Result<(), CliError> {
    let value = serde_json::to_value(rows).map_err(anyhow::Error::from)?;
    println!("{}", format::with_rfc3339(value));
    Ok(())
}

/// `wasmq queues`.
pub async fn queues(redis: &str, tenant: &str, json: bool) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    let queues = broker.queues(tenant).await?;
    if json {
        return print_json(&queues);
    }
    if queues.is_empty() {
        println!("no queues (tenant {tenant:?} has deployed no task)");
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>8}  {:<8} {:>9} {:>10} {:>7} {:>8}",
        "QUEUE",
        "READY",
        "DELAYED",
        "RUNNING",
        "DEAD",
        "STATE",
        "OLDEST",
        "SUCCEEDED",
        "FAILED",
        "WAITING"
    );
    for q in &queues {
        print_queue(q);
    }
    println!(
        "(succeeded and failed: runs in this minute and the one before; waiting: workflow steps waiting for others)"
    );
    Ok(())
}

fn print_queue(q: &QueueView) {
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>8}  {:<8} {:>9} {:>10} {:>7} {:>8}",
        q.name,
        q.ready,
        q.delayed,
        q.running,
        q.dead,
        if q.paused.is_some() {
            "paused"
        } else {
            "active"
        },
        q.oldest_ready_age_ms.map_or("-".into(), age),
        q.succeeded_last_minute,
        q.failed_last_minute,
        q.waiting
    );
    if let Some(p) = &q.paused {
        println!("  paused by {} at {}", p.by, format::rfc3339(p.at_ms));
    }
}

/// `wasmq workers`: live workers serving the tenant (every live worker
/// with `all`).
pub async fn workers(redis: &str, tenant: &str, all: bool, json: bool) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    let workers: Vec<WorkerBeat> = broker
        .workers()
        .await?
        .into_iter()
        .filter(|w| all || w.tenants.iter().any(|t| t == tenant))
        .collect();
    if json {
        return print_json(&workers);
    }
    if workers.is_empty() {
        if all {
            println!("no live workers");
        } else {
            println!("no live workers serving tenant {tenant:?} (--all lists every worker)");
        }
        return Ok(());
    }
    for w in &workers {
        println!(
            "{}  host {} pid {}  v{}  tenants {}  started {}  last beat {}  jobs done {}",
            w.id,
            w.host,
            w.pid,
            w.version,
            w.tenants.join(","),
            format::rfc3339(w.started_at_ms),
            format::rfc3339(w.last_beat_at_ms),
            w.jobs_done
        );
        for p in &w.pools {
            println!(
                "  {} {} pool  busy {}/{}  queues {}",
                p.id,
                p.kind,
                p.busy,
                p.slots,
                p.queues.join(",")
            );
        }
    }
    Ok(())
}

/// `wasmq jobs`.
pub async fn jobs(redis: &str, tenant: &str, args: JobsArgs) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    let query = JobQuery {
        queue: args.queue,
        state: args.state,
        task: args.task,
        limit: args.limit.max(1),
    };
    let jobs = broker.jobs(tenant, &query).await?;
    if args.json {
        return print_json(&jobs);
    }
    if jobs.is_empty() {
        println!("none");
        return Ok(());
    }
    for j in &jobs {
        let when = match j.state {
            JobState::Queued => j
                .enqueued_at_ms
                .map(|t| format!("enqueued {}", format::rfc3339(t))),
            JobState::Scheduled => j.due_at_ms.map(|t| format!("due {}", format::rfc3339(t))),
            JobState::Running => j.started_at_ms.map(|t| {
                format!(
                    "started {} on {}",
                    format::rfc3339(t),
                    j.worker.as_deref().unwrap_or("?")
                )
            }),
            _ => j
                .finished_at_ms
                .map(|t| format!("ended {}", format::rfc3339(t))),
        }
        .unwrap_or_default();
        let error = j
            .last_error
            .clone()
            .and_then(|e| serde_json::from_value::<Failure>(e).ok())
            .filter(|_| {
                matches!(
                    j.state,
                    JobState::Dead | JobState::Cancelled | JobState::Scheduled
                )
            })
            .map(|f| format!("  {f}"))
            .unwrap_or_default();
        println!(
            "{}  {:<9}  task {}  queue {}  attempts {}  {when}{error}",
            j.id,
            j.state.as_str(),
            j.task,
            j.queue,
            j.attempts
        );
    }
    Ok(())
}

/// `wasmq cancel`.
pub async fn cancel(redis: &str, tenant: &str, id: &str) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    match broker.cancel(tenant, id, &who()).await? {
        Cancelled::Now { was, worker } => {
            match worker {
                Some(w) => println!("cancelled {id} (it was running on {w}, which stops it now)"),
                None => println!("cancelled {id} (it was {was}; it will not run)"),
            }
            Ok(())
        }
        Cancelled::AlreadyEnded(state) => {
            Err(anyhow::anyhow!("job {id} has already ended ({state}); nothing to cancel").into())
        }
        Cancelled::Unknown => Err(anyhow::anyhow!(
            "no job {id} in tenant {tenant:?} (never enqueued, or its record expired)"
        )
        .into()),
    }
}

/// `wasmq queue pause|resume`.
pub async fn queue(redis: &str, tenant: &str, command: QueueCommand) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    match command {
        QueueCommand::Pause { queue } => {
            if broker.pause(tenant, &queue, &who()).await? {
                println!("paused {queue}: workers fetch nothing from it until `wasmq queue resume {queue}`");
            } else {
                println!("{queue} was paused already");
            }
        }
        QueueCommand::Resume { queue } => {
            if broker.resume(tenant, &queue).await? {
                println!("resumed {queue}");
            } else {
                println!("{queue} was not paused");
            }
        }
    }
    Ok(())
}
