//! Starting and stopping a worker process's pools: [`run`] builds the
//! engine, the sandbox, the Redis connection and one [`Worker`] per pool
//! (io pools on the caller's runtime, each cpu pool on a runtime of its own
//! at a low OS priority), the process's [`Presence`] (heartbeat and
//! control list), its [`Scheduler`] (due schedules) and, when asked, its
//! metrics endpoint; runs them until
//! `shutdown` resolves, then drains them and returns what they did.
//!
//! The CLI parses flags into a [`LaunchConfig`] and passes
//! [`shutdown_signal`]; tests and embedding programs pass any future, as
//! mini-redis passes its shutdown future to its server. Those that want to
//! watch the process's sandbox (its compile counts) build it with
//! [`sandbox`] and hand it to [`run_on`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::broker::Broker;
use crate::component::CompiledCache;
use crate::engine::{build_engine, CompileSettings, ComponentLimits, EngineLimits};
use crate::keys::valid_tenant;
use crate::metrics::Metrics;
use crate::pools::{CpuPriority, PoolKind, PoolSpec};
use crate::sandbox::{ComputeThreads, Sandbox};
use crate::secrets::SecretsKey;
use crate::worker::{
    exporter, HostRetries, Identity, Presence, Scheduler, Worker, WorkerConfig, WorkerStats,
    DEFAULT_LEASE,
};

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Redis URL of the broker.
    pub redis_url: String,
    /// Tenants whose queues every pool serves, in rotation.
    pub tenants: Vec<String>,
    /// The pools (at least one).
    pub pools: Vec<PoolSpec>,
    /// Lease length; renewed every third of it while a job runs.
    pub lease: Duration,
    /// How long shutdown waits for running jobs before handing them back.
    pub drain_timeout: Duration,
    /// OS priority of cpu-pool threads and of the compute threads that
    /// compute-bound io jobs move to.
    pub cpu_priority: CpuPriority,
    /// On-disk cache of compiled components (`None`: no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// CPU time one compile may take before its component is refused
    /// (`invalid-component`, remembered for the life of the process).
    pub compile_budget: Duration,
    /// Largest component of a tenant without a cap of its own.
    pub default_max_component_bytes: u64,
    /// What one component may contain (core instances, memories, tables,
    /// table elements); a component over them is refused
    /// (`invalid-component`, naming the limit).
    pub component_limits: ComponentLimits,
    /// This process's id in leases and history; each pool appends its
    /// kind and index.
    pub id: String,
    /// How jobs are retried for the host's own faults.
    pub host_retries: HostRetries,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The key that opens the tenants' secrets (`wasmq worker` reads it
    /// from `WASMQ_SECRETS_KEY_FILE` or `WASMQ_SECRETS_KEY`); `None`: jobs
    /// that read a secret that is set fail as the host's fault.
    pub secrets_key: Option<Arc<SecretsKey>>,
    /// Connections the process keeps per tenant and database (`wasmq
    /// worker --db-pool-size`), shared by all its pools.
    pub db_pool_size: usize,
}

impl LaunchConfig {
    /// One io pool of `concurrency` serving `queues` of `tenant`, with the
    /// defaults of `wasmq worker`.
    pub fn new(redis_url: &str, tenant: &str, queues: &[&str], concurrency: usize) -> Self {
        LaunchConfig {
            redis_url: redis_url.to_string(),
            tenants: vec![tenant.to_string()],
            pools: vec![PoolSpec {
                kind: PoolKind::Io,
                queues: queues.iter().map(|q| q.to_string()).collect(),
                width: concurrency.max(1),
            }],
            lease: DEFAULT_LEASE,
            drain_timeout: Duration::from_secs(30),
            cpu_priority: CpuPriority::default(),
            cache_dir: CompiledCache::default_dir(),
            compile_budget: crate::engine::DEFAULT_COMPILE_BUDGET,
            default_max_component_bytes: crate::engine::DEFAULT_MAX_COMPONENT_BYTES,
            component_limits: ComponentLimits::default(),
            id: format!("{}-{}", hostname(), std::process::id()),
            host_retries: HostRetries::default(),
            metrics: None,
            secrets_key: None,
            db_pool_size: crate::limits::DB_POOL_SIZE,
        }
    }
}

/// Run the pools of `config` until `shutdown` resolves, then drain them;
/// their summed stats.
pub async fn run(
    config: LaunchConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<WorkerStats> {
    let sandbox = sandbox(&config)?;
    run_on(config, sandbox, shutdown).await
}

/// The sandbox a worker process of `config` runs every pool's jobs in: one
/// engine for all pools, whose instance slots cover every pool's width (so
/// no job ever waits for, or fails for want of, a slot), compiling at the
/// cpu pools' priority within the compile budget.
pub fn sandbox(config: &LaunchConfig) -> anyhow::Result<Arc<Sandbox>> {
    let slots: usize = config.pools.iter().map(|p| p.width).sum();
    let limits = EngineLimits {
        instance_slots: slots as u32,
        component: config.component_limits,
        ..EngineLimits::default()
    };
    let engine = build_engine(&limits)?;
    let compile = CompileSettings {
        default_max_component_bytes: config.default_max_component_bytes,
        budget: config.compile_budget,
        priority: config.cpu_priority,
        ..CompileSettings::default()
    };
    Ok(Arc::new(
        Sandbox::new(
            engine,
            CompiledCache::new(config.cache_dir.clone()).with_limits(config.component_limits),
        )?
        .with_compile_settings(compile)
        .with_secrets_key(config.secrets_key.clone())
        .with_db_pool_size(config.db_pool_size),
    ))
}

/// [`run`], on a sandbox made by [`sandbox`] from the same `config`.
pub async fn run_on(
    config: LaunchConfig,
    sandbox: Arc<Sandbox>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<WorkerStats> {
    anyhow::ensure!(!config.pools.is_empty(), "a worker needs at least one pool");
    anyhow::ensure!(
        !config.tenants.is_empty(),
        "a worker serves at least one tenant"
    );
    for t in &config.tenants {
        valid_tenant(t).map_err(anyhow::Error::msg)?;
    }
    let broker = Broker::connect(&config.redis_url).await?;
    let exported = match config.metrics {
        Some(addr) => Some((exporter::bind(addr).await?, Arc::new(Metrics::new()))),
        None => None,
    };
    let lease = if config.lease.is_zero() {
        DEFAULT_LEASE
    } else {
        config.lease
    };
    let (stop, stopping) = watch::channel(false);
    let priority = config.cpu_priority;
    // Where io jobs that compute go: shared by every io pool.
    let compute = ComputeThreads::for_machine(priority)?;
    let mut running = Vec::new();
    let mut cpu_runtimes = Vec::new();
    let mut pools = Vec::new();
    for (i, pool) in config.pools.iter().enumerate() {
        let pool_config = WorkerConfig {
            tenants: config.tenants.clone(),
            queues: pool.queues.clone(),
            concurrency: pool.width,
            lease,
            drain_timeout: config.drain_timeout,
            id: format!("{}-{}{i}", config.id, pool.kind.as_str()),
            compute: match pool.kind {
                PoolKind::Io => Some(compute.clone()),
                PoolKind::Cpu => None,
            },
            host_retries: config.host_retries,
            metrics: exported.as_ref().map(|(_, m)| m.clone()),
        };
        tracing::info!(
            "wasmq worker {}: {} pool of {} serving {:?} of tenants {:?}",
            pool_config.id,
            pool.kind.as_str(),
            pool.width,
            pool.queues,
            config.tenants
        );
        let worker = Worker::new(broker.clone(), sandbox.clone(), pool_config);
        pools.push((worker.clone(), pool.kind));
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
                    .build()?;
                let handle = runtime.spawn(worker.run(shutdown));
                cpu_runtimes.push(runtime);
                handle
            }
        };
        running.push(handle);
    }

    let identity = Identity {
        id: config.id.clone(),
        host: hostname(),
        tenants: config.tenants.clone(),
        started_at_ms: crate::broker::now_ms(),
    };
    if let Some((listener, metrics)) = exported {
        let serving = exporter::serve(listener, broker.clone(), metrics, pools.clone());
        let stop = stopped(stopping.clone());
        tokio::spawn(async move {
            tokio::select! { _ = stop => {}, _ = serving => {} }
        });
    }
    // Schedules are fired by every worker process; a draining one stops
    // firing at once (the others go on).
    let scheduler = Scheduler::new(broker.clone(), config.tenants.clone());
    let scheduler_stop = stopping.clone();
    tokio::spawn(scheduler.run_supervised(move || stopped(scheduler_stop.clone())));
    // The heartbeat and the control list last until the pools have
    // drained: a draining worker is still listed, and a cancel still
    // reaches its running jobs.
    let (retire, retired) = tokio::sync::oneshot::channel::<()>();
    let presence = tokio::spawn(Presence::new(broker.clone(), identity, pools).run(async {
        let _ = retired.await;
    }));

    shutdown.await;
    let _ = stop.send(true);
    let mut total = WorkerStats::default();
    for handle in running {
        let stats = handle.await?;
        total.add(stats);
    }
    for runtime in cpu_runtimes {
        runtime.shutdown_background();
    }
    let _ = retire.send(());
    let _ = presence.await;
    Ok(total)
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (drain); a second one exits the
/// process at once (leases make that safe: its jobs are redelivered).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("wasmq worker draining (send the signal again to stop now)");
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("wasmq worker stopping now; unfinished jobs return after their lease");
        std::process::exit(130);
    });
}

/// This machine's name, for worker ids and operators' records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".into(), |h| h.trim().to_string())
}
