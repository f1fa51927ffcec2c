//! `wasmq bench` against Redis: the throughput and latency of the whole
//! path (enqueue, fetch, fresh sandbox per job, record the outcome).
//!
//! Two phases, in a throwaway tenant that is deleted afterwards:
//! 1. drain: enqueue `--jobs` no-op jobs (pipelined), then start a worker and
//!    time how long it takes to finish them all (results ignored);
//! 2. latency: a producer enqueues one job at a time at `--rate` jobs/s while
//!    the worker runs; end-to-end latency is each job's finish time minus its
//!    enqueue time, both read from the Redis server's clock (microseconds).
//!
//! Prints one JSON line with `jobs`, `seconds`, `jobs_per_sec`,
//! `e2e_p50_ms`, `e2e_p99_ms` (SPEC.md) and the settings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::bench::BenchArgs;
use super::CliError;
use crate::broker::{Broker, EnqueueRequest};
use crate::component::CompiledCache;
use crate::engine::{build_engine, EngineLimits};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::policy::TaskPolicy;
use crate::pools::{CpuPriority, PoolKind};
use crate::sandbox::ComputeThreads;
use crate::sandbox::Sandbox;
use crate::worker::{Identity, Presence, Worker, WorkerConfig};

const TASK: &str = "bench-noop";

/// Run both phases and print the JSON line.
pub async fn bench(redis: &str, args: BenchArgs) -> Result<(), CliError> {
    let bytes =
        std::fs::read(&args.task).with_context(|| format!("reading {}", args.task.display()))?;
    let broker = Broker::connect(redis).await?;
    let tenant = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    broker
        .deploy(&tenant, TASK, &bytes, &TaskPolicy::default())
        .await?;
    let payload: serde_json::Value =
        serde_json::from_str(&args.payload).context("--payload is not JSON")?;

    let limits = EngineLimits {
        instance_slots: args.concurrency as u32,
        component: args.component_limits.limits(),
        ..EngineLimits::default()
    };
    let sandbox = Arc::new(Sandbox::new(
        build_engine(&limits).map_err(anyhow::Error::from)?,
        CompiledCache::new(CompiledCache::default_dir()).with_limits(limits.component),
    )?);
    sandbox.prepare(&bytes)?;
    let config = WorkerConfig {
        tenants: vec![tenant.clone()],
        queues: vec!["default".into()],
        concurrency: args.concurrency,
        lease: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(30),
        id: format!("bench-{}", std::process::id()),
        compute: Some(
            ComputeThreads::for_machine(CpuPriority::default()).map_err(anyhow::Error::from)?,
        ),
        host_retries: Default::default(),
        metrics: args.metrics.then(|| Arc::new(Metrics::new())),
    };

    // Phase 1: drain a full queue.
    let payloads = vec![payload.clone(); args.jobs as usize];
    let enqueue_started = Instant::now();
    broker.enqueue_many(&tenant, TASK, &payloads).await?;
    let enqueue_seconds = enqueue_started.elapsed().as_secs_f64();
    let worker = Worker::new(broker.clone(), sandbox, config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_beating, beating) = tokio::sync::oneshot::channel::<()>();
    if args.metrics {
        let identity = Identity {
            id: format!("bench-{}", std::process::id()),
            host: "bench".into(),
            tenants: vec![tenant.clone()],
            started_at_ms: crate::broker::now_ms(),
        };
        let presence = Presence::new(
            broker.clone(),
            identity,
            vec![(worker.clone(), PoolKind::Io)],
        );
        tokio::spawn(presence.run(async {
            let _ = beating.await;
        }));
    }
    let running = tokio::spawn(worker.clone().run(async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    while worker.completed() < args.jobs {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();

    // Phase 2: paced enqueues, measure end to end.
    let mut ids = Vec::with_capacity(args.latency_jobs as usize);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let paced_started = Instant::now();
    for i in 0..args.latency_jobs {
        let due = paced_started + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let request = EnqueueRequest {
            tenant: tenant.clone(),
            task: TASK.into(),
            payload: payload.clone(),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(request).await?.id);
    }
    let target = args.jobs + args.latency_jobs;
    while worker.completed() < target {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stop.send(());
    let _ = stop_beating.send(());
    running.await.map_err(anyhow::Error::from)?;
    let mut latencies = latencies_ms(&broker, &tenant, &ids).await?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    delete_tenant(&broker, &tenant).await?;
    println!(
        "{}",
        json!({
            "mode": "redis",
            "jobs": args.jobs,
            "seconds": round(seconds),
            "jobs_per_sec": (args.jobs as f64 / seconds).round(),
            "enqueue_per_sec": (args.jobs as f64 / enqueue_seconds).round(),
            "concurrency": args.concurrency,
            "metrics": args.metrics,
            "e2e_rate_jobs_per_sec": args.rate,
            "e2e_jobs": latencies.len(),
            "e2e_p50_ms": round(pct(0.50)),
            "e2e_p99_ms": round(pct(0.99)),
            "e2e_max_ms": round(latencies.last().copied().unwrap_or(f64::NAN)),
        })
    );
    Ok(())
}

/// finished_at_us - enqueued_at_us of each job, in ms (one pipeline).
async fn latencies_ms(broker: &Broker, tenant: &str, ids: &[String]) -> anyhow::Result<Vec<f64>> {
    let keys = Keys::new(tenant);
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET")
            .arg(keys.job(id))
            .arg("enqueued_at_us")
            .arg("finished_at_us");
    }
    let rows: Vec<(Option<u64>, Option<u64>)> = pipe.query_async(&mut broker.connection()).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(start, end)| Some(end?.saturating_sub(start?) as f64 / 1000.0))
        .collect())
}

/// Remove every key of the throwaway tenant.
async fn delete_tenant(broker: &Broker, tenant: &str) -> anyhow::Result<()> {
    let pattern = format!(
        "{}*",
        Keys::new(tenant)
            .prefix()
            .replace('{', "\\{")
            .replace('}', "\\}")
    );
    let mut conn = broker.connection();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
