//! `wasmq worker`: flags into a [`LaunchConfig`], then
//! [`launcher::run`] until SIGTERM/SIGINT (drain), or a second signal (stop
//! now: leases make that safe, the jobs are redelivered).

use std::time::Duration;

use clap::Args;

use super::engine_limits::ComponentLimitArgs;
use super::CliError;
use crate::engine::DEFAULT_COMPILE_BUDGET;
use crate::launcher::{self, LaunchConfig};
use crate::pools::{CpuPriority, PoolKind, PoolSpec};
use crate::worker::HostRetries;

/// Flags of `wasmq worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Pools to run: `io=QUEUE[,QUEUE...][:CONCURRENCY]` (default 1000) or
    /// `cpu=QUEUE[,QUEUE...][:THREADS]` (default: one per core). Repeatable.
    #[arg(long = "pool", value_parser = PoolSpec::parse)]
    pub pools: Vec<PoolSpec>,
    /// Without --pool: the queues of a single io pool, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default",
        conflicts_with = "pools"
    )]
    pub queues: Vec<String>,
    /// Without --pool: that pool's concurrency.
    #[arg(long, default_value_t = 64, conflicts_with = "pools")]
    pub concurrency: usize,
    /// Serve these tenants' queues (comma-separated), in rotation, instead
    /// of only `--tenant`: one worker shared by tenants, fairly.
    #[arg(long, value_delimiter = ',')]
    pub tenants: Vec<String>,
    /// Lease length; renewed every third of it while a job runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub lease: Duration,
    /// How cpu-pool threads (and the compute threads io jobs that compute
    /// move to) yield to the rest of the machine (Linux): `idle`
    /// (SCHED_IDLE: only cycles nothing else wants), `low` (nice 10) or
    /// `normal`.
    #[arg(long = "cpu-priority", value_enum, default_value_t = CpuPriority::Idle)]
    pub cpu_priority: CpuPriority,
    /// Host retries a job gets for the host's own faults (Redis unreachable
    /// or refusing writes) before it is dead-lettered as `host-error`; they
    /// never use the task's attempts.
    #[arg(long = "max-host-retries", default_value_t = crate::worker::MAX_HOST_RETRIES)]
    pub max_host_retries: u32,
    /// The first host retry's delay; each next one doubles, up to a minute.
    #[arg(long = "host-retry-delay", value_parser = humantime::parse_duration, default_value = "1s")]
    pub host_retry_delay: Duration,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g.
    /// `127.0.0.1:9464`; port 0 picks a free one, named in the log).
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// How long SIGTERM waits for running jobs before handing them back.
    #[arg(long = "drain-timeout", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// CPU time compiling one component may take, e.g. `60s`; past it the
    /// component is refused (its jobs dead-lettered `invalid-component`)
    /// and remembered until the worker restarts. Each compile runs once per
    /// version, on a thread of its own at --cpu-priority.
    #[arg(long = "compile-budget", default_value_t = DEFAULT_COMPILE_BUDGET.into())]
    pub compile_budget: humantime::Duration,
    /// Largest component, e.g. `32MiB`, this worker runs for tenants
    /// without their own `--max-component` cap (default 64MiB, the cap
    /// `wasmq deploy` applies to them).
    #[arg(long = "default-max-component", value_parser = crate::policy::parse_size)]
    pub default_max_component: Option<u64>,
    /// Connections this worker keeps per tenant and database (all its
    /// pools together); jobs wait for one when all are in use. Size it
    /// against the server's `max_connections` over all workers.
    #[arg(long = "db-pool-size", default_value_t = crate::limits::DB_POOL_SIZE,
          value_parser = parse_pool_size)]
    pub db_pool_size: usize,
    /// What one component may contain: a component over these limits is
    /// refused (its jobs dead-lettered `invalid-component`, naming the
    /// limit). Give `wasmq deploy` the same, so what deploys runs here.
    #[command(flatten)]
    pub component_limits: ComponentLimitArgs,
}

/// `--db-pool-size`: 1 to 10,000 connections.
fn parse_pool_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a pool size from 1 to 10000")),
    }
}

impl WorkerArgs {
    fn pools(&self) -> Vec<PoolSpec> {
        if self.pools.is_empty() {
            vec![PoolSpec {
                kind: PoolKind::Io,
                queues: self.queues.clone(),
                width: self.concurrency.max(1),
            }]
        } else {
            self.pools.clone()
        }
    }
}

/// Run the pools until the first signal, then drain.
pub async fn worker(redis: &str, tenant: &str, args: WorkerArgs) -> Result<(), CliError> {
    let tenants = if args.tenants.is_empty() {
        vec![tenant.to_string()]
    } else {
        args.tenants.clone()
    };
    let mut config = LaunchConfig::new(redis, tenant, &[], 1);
    config.tenants = tenants;
    config.pools = args.pools();
    config.lease = args.lease;
    config.drain_timeout = args.drain_timeout;
    config.cpu_priority = args.cpu_priority;
    config.host_retries = HostRetries {
        max: args.max_host_retries,
        delay: args.host_retry_delay,
        ..HostRetries::default()
    };
    config.compile_budget = args.compile_budget.into();
    config.metrics = args.metrics;
    config.db_pool_size = args.db_pool_size;
    config.component_limits = args.component_limits.limits();
    if let Some(cap) = args.default_max_component {
        config.default_max_component_bytes = cap;
    }
    // The secrets key comes from the environment only (a flag would put
    // it in `ps` and shell history): see `crate::secrets`.
    config.secrets_key = crate::secrets::SecretsKey::from_env()
        .map_err(anyhow::Error::msg)?
        .map(std::sync::Arc::new);
    let total = launcher::run(config, launcher::shutdown_signal()).await?;
    super::format::notice(&format!(
        "wasmq worker stopped: {} job(s) completed, {} handed back ({} succeeded, {} dead-lettered; {} run(s) ended in a retry)",
        total.completed, total.released, total.succeeded, total.dead, total.retried
    ));
    Ok(())
}
