//! `wasmq worker`: run worker pools until SIGTERM/SIGINT (drain), or a
//! second signal (stop now: leases make that safe, the jobs are redelivered).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use super::CliError;
use crate::broker::Broker;
use crate::component::CompiledCache;
use crate::engine::{build_engine, EngineLimits};
use crate::keys::valid_tenant;
use crate::pools::{CpuPriority, PoolKind, PoolSpec};
use crate::sandbox::{ComputeThreads, Sandbox};
use crate::worker::{Worker, WorkerConfig, WorkerStats, DEFAULT_LEASE};

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
    /// How long SIGTERM waits for running jobs before handing them back.
    #[arg(long = "drain-timeout", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
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

/// Run the pools.
pub async fn worker(redis: &str, tenant: &str, args: WorkerArgs) -> Result<(), CliError> {
    let tenants = if args.tenants.is_empty() {
        vec![tenant.to_string()]
    } else {
        args.tenants.clone()
    };
    for t in &tenants {
        valid_tenant(t).map_err(anyhow::Error::msg)?;
    }
    let pools = args.pools();
    // One engine for all pools: its instance slots cover every pool's
    // width, so no job ever waits for (or fails for want of) a slot.
    let slots: usize = pools.iter().map(|p| p.width).sum();
    let limits = EngineLimits {
        instance_slots: slots as u32,
        ..EngineLimits::default()
    };
    let engine = build_engine(&limits).map_err(anyhow::Error::from)?;
    let sandbox = Arc::new(Sandbox::new(
        engine,
        CompiledCache::new(CompiledCache::default_dir()),
    )?);
    let broker = Broker::connect(redis).await?;
    let lease = if args.lease.is_zero() {
        DEFAULT_LEASE
    } else {
        args.lease
    };
    let (stop, stopping) = watch::channel(false);
    let base_id = format!("{}-{}", hostname(), std::process::id());

    let priority = args.cpu_priority;
    // Where io jobs that compute go: shared by every io pool.
    let compute = ComputeThreads::for_machine(priority).map_err(anyhow::Error::from)?;
    let mut running = Vec::new();
    let mut cpu_runtimes = Vec::new();
    for (i, pool) in pools.iter().enumerate() {
        let config = WorkerConfig {
            tenants: tenants.clone(),
            queues: pool.queues.clone(),
            concurrency: pool.width,
            lease,
            drain_timeout: args.drain_timeout,
            id: format!("{base_id}-{}{i}", pool.kind.as_str()),
            compute: match pool.kind {
                PoolKind::Io => Some(compute.clone()),
                PoolKind::Cpu => None,
            },
        };
        eprintln!(
            "wasmq worker {}: {} pool of {} serving {:?} of tenants {tenants:?}",
            config.id,
            pool.kind.as_str(),
            pool.width,
            pool.queues
        );
        let worker = Worker::new(broker.clone(), sandbox.clone(), config);
        let shutdown = stopped(stopping.clone());
        let handle = match pool.kind {
            PoolKind::Io => tokio::spawn(worker.run(shutdown)),
            PoolKind::Cpu => {
                // Its own threads, one per unit of width: CPU-bound guests
                // never occupy the runtime the io pools and timers run on.
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(pool.width)
                    .thread_name("wasmq-cpu")
                    .on_thread_start(move || priority.apply_to_current_thread())
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)?;
                let handle = runtime.spawn(worker.run(shutdown));
                cpu_runtimes.push(runtime);
                handle
            }
        };
        running.push(handle);
    }

    first_signal().await;
    let _ = stop.send(true);
    let mut total = WorkerStats::default();
    for handle in running {
        let stats = handle.await.map_err(anyhow::Error::from)?;
        total.completed += stats.completed;
        total.released += stats.released;
    }
    for runtime in cpu_runtimes {
        runtime.shutdown_background();
    }
    eprintln!(
        "wasmq worker stopped: {} job(s) completed, {} handed back",
        total.completed, total.released
    );
    Ok(())
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn first_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    eprintln!("wasmq worker draining (send the signal again to stop now)");
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("wasmq worker stopping now; unfinished jobs return after their lease");
        std::process::exit(130);
    });
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".into(), |h| h.trim().to_string())
}
