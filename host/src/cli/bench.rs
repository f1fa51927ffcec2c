//! `wasmq bench`: measure what a job costs. Without `--local`, the whole
//! path through Redis ([`super::bench_redis`]).
//!
//! `--local` measures the sandbox alone: for each job a fresh `Store`,
//! instantiation from the cached `InstancePre`, the call through the task
//! entry point, and the drop, one after another on one thread, and prints one
//! JSON line with percentiles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::engine_limits::ComponentLimitArgs;
use super::CliError;
use crate::backend::memory::MemoryBackend;
use crate::component::CompiledCache;
use crate::engine::{build_engine, EngineLimits};
use crate::policy::SandboxPolicy;
use crate::sandbox::{JobInput, Sandbox, Verdict};

/// Flags of `wasmq bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measure the sandbox alone, in process, without Redis.
    #[arg(long)]
    pub local: bool,
    /// Task component to run: in process with `--local`, else deployed
    /// (as `bench-noop`) and drained through Redis.
    #[arg(long, default_value = "target/guests/wasm32-wasip2/release/noop.wasm")]
    pub task: PathBuf,
    /// Payload for each job.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Jobs to run (drained from a full queue against Redis).
    #[arg(long, default_value_t = 100_000)]
    pub jobs: u64,
    /// Worker concurrency (against Redis).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Enqueue rate for the latency phase, jobs/s (against Redis).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Jobs in the latency phase (against Redis).
    #[arg(long = "latency-jobs", default_value_t = 3000)]
    pub latency_jobs: u64,
    /// Also count Prometheus metrics and publish heartbeats, as `wasmq
    /// worker --metrics` does (against Redis; to measure what they cost).
    #[arg(long)]
    pub metrics: bool,
    /// What the component may contain, as on `wasmq worker`.
    #[command(flatten)]
    pub component_limits: ComponentLimitArgs,
}

/// Run the benchmark and print one JSON line.
pub async fn bench(redis: &str, args: BenchArgs) -> Result<(), CliError> {
    if !args.local {
        return super::bench_redis::bench(redis, args).await;
    }
    let bytes =
        std::fs::read(&args.task).with_context(|| format!("reading {}", args.task.display()))?;
    let component = args.component_limits.limits();
    let engine = build_engine(&EngineLimits {
        component,
        ..EngineLimits::default()
    })
    .map_err(anyhow::Error::from)?;
    let cache = CompiledCache::new(CompiledCache::default_dir()).with_limits(component);
    let sandbox = Sandbox::new(engine, cache)?;
    let task = sandbox.prepare(&bytes)?;
    let policy = SandboxPolicy::default();
    let backend = Arc::new(MemoryBackend::new());
    let mut job = JobInput::new("", "bench", "bench", &args.payload);
    // Warm up: page in the code and the pool's slots.
    for _ in 0..1000.min(args.jobs) {
        sandbox.run(&task, &job, &policy, backend.clone()).await;
    }
    let mut samples = Vec::with_capacity(args.jobs as usize);
    let mut fuel = 0;
    let started = Instant::now();
    for i in 0..args.jobs {
        job.id = i.to_string();
        let t = Instant::now();
        let outcome = sandbox.run(&task, &job, &policy, backend.clone()).await;
        samples.push(t.elapsed());
        if let Verdict::Failed { failure, .. } = outcome.verdict {
            return Err(failure.into());
        }
        fuel = outcome.usage.fuel;
    }
    let seconds = started.elapsed().as_secs_f64();
    samples.sort();
    let pct = |p: f64| -> f64 {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples
            .get(i)
            .copied()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1e6
    };
    let line = json!({
        "mode": "local",
        "task": args.task.display().to_string(),
        "jobs": args.jobs,
        "seconds": seconds,
        "jobs_per_sec": (args.jobs as f64 / seconds).round(),
        "job_p50_us": pct(0.50),
        "job_p90_us": pct(0.90),
        "job_p99_us": pct(0.99),
        "fuel_per_job": fuel,
    });
    println!("{line}");
    Ok(())
}
