//! What compiling costs a worker, and what it costs the jobs beside it:
//!
//! 1. wall time of compiling the `thumbnail` component with Cranelift on
//!    every core (`parallel_compilation`, wasmtime's default) and on one
//!    thread (wasmq's setting), alternating, medians;
//! 2. the latency of no-op io jobs (1,000/s on a runtime of one thread per
//!    core, as an io pool runs; from spawn to finish, so a runtime whose
//!    threads are taken shows) for a fixed window: alone, while a big
//!    generated component compiles the way workers compile now (one
//!    `SCHED_IDLE` thread, `Sandbox::prepare_once`), and while it compiles
//!    the way they did before (`spawn_blocking`, every core, normal
//!    priority); and how long that compile took each way.
//!
//! `cargo bench -p wasmq --bench compile` (after `make guests`); prints one
//! JSON line of medians and ratios (latency: the median over rounds of each
//! round's p50 and p99). A benchmark, not a test: nothing asserts.

#[path = "../../tests/common/components.rs"]
#[allow(dead_code)]
mod components;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wasmq::backend::memory::MemoryBackend;
use wasmq::component::{content_hash, CompiledCache};
use wasmq::engine::{build_engine, CompileSettings, EngineLimits};
use wasmq::policy::SandboxPolicy;
use wasmq::pools::CpuPriority;
use wasmq::sandbox::{JobInput, Sandbox};

const COMPILE_RUNS: usize = 7;
/// Rounds of the latency measurement, each way once per round in turn;
/// the figures are medians over rounds (one window is noisy on a shared
/// machine).
const ROUNDS: usize = 5;
/// Functions of the big component (see `components::slow_to_compile`).
const BIG_FUNCTIONS: usize = 4;
const JOBS_PER_SEC: u64 = 1000;
/// Jobs run on a fresh sandbox before measuring (warm slots).
const WARM_UP: usize = 300;
/// How long the jobs are measured, each way: shorter than the big compile
/// takes either way, so it overlaps the whole window (checked).
const WINDOW: Duration = Duration::from_millis(2500);

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../target/guests/wasm32-wasip2/release/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("build the guests first: make guests")
}

fn sandbox(parallel_compilation: bool, priority: CpuPriority) -> Arc<Sandbox> {
    let limits = EngineLimits {
        instance_slots: 256,
        parallel_compilation,
        ..EngineLimits::default()
    };
    let compile = CompileSettings {
        priority,
        budget: Duration::from_secs(3600),
        ..CompileSettings::default()
    };
    Arc::new(
        Sandbox::new(build_engine(&limits).unwrap(), CompiledCache::new(None))
            .unwrap()
            .with_compile_settings(compile),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn p99(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * 0.99).round() as usize]
}

/// Wall time of compiling `bytes`, in ms, each way, alternating.
fn compile_times(bytes: &[u8]) -> (Vec<f64>, Vec<f64>) {
    let engines = [true, false].map(|parallel| {
        build_engine(&EngineLimits {
            instance_slots: 1,
            parallel_compilation: parallel,
            ..EngineLimits::default()
        })
        .unwrap()
    });
    let (mut parallel, mut single) = (Vec::new(), Vec::new());
    for _ in 0..COMPILE_RUNS {
        for (engine, samples) in engines.iter().zip([&mut parallel, &mut single]) {
            let t = Instant::now();
            engine.precompile_component(bytes).unwrap();
            samples.push(ms(t.elapsed()));
        }
    }
    (parallel, single)
}

/// How the big component is compiled beside the jobs.
#[derive(Debug, Clone, Copy)]
enum Beside {
    Nothing,
    /// wasmq now: one thread at SCHED_IDLE, through `prepare_once`.
    IdleThread,
    /// Before: `spawn_blocking(prepare)` with parallel compilation.
    EveryCore,
}

/// No-op job latencies (ms from spawn to finish) for [`WINDOW`] beside
/// `beside`; whether that compile was still running at the end of the
/// window, and how long it took.
async fn latencies(beside: Beside, noop: &[u8], big: &[u8]) -> (Vec<f64>, bool, Option<Duration>) {
    let (parallel, priority) = match beside {
        Beside::EveryCore => (true, CpuPriority::Normal),
        _ => (false, CpuPriority::Idle),
    };
    let sb = sandbox(parallel, priority);
    let task = sb.prepare(noop).unwrap();
    let policy = SandboxPolicy::default();
    let run = |i: usize| {
        let (sb, task, policy) = (sb.clone(), task.clone(), policy.clone());
        let spawned = Instant::now();
        tokio::spawn(async move {
            let job = JobInput::new(&format!("j{i}"), "noop", "bench", "{}");
            sb.run(&task, &job, &policy, Arc::new(MemoryBackend::new()))
                .await;
            ms(spawned.elapsed())
        })
    };
    for i in 0..WARM_UP {
        run(i).await.unwrap();
    }
    let compile = {
        let (sb, big) = (sb.clone(), big.to_vec());
        tokio::spawn(async move {
            let t = Instant::now();
            match beside {
                Beside::Nothing => return None,
                Beside::IdleThread => {
                    let hash = content_hash(&big);
                    let _ = sb.prepare_once(&hash, std::future::ready(Ok(big))).await;
                }
                Beside::EveryCore => {
                    let _ = tokio::task::spawn_blocking(move || sb.prepare(&big)).await;
                }
            }
            Some(t.elapsed())
        })
    };
    // Let the compile start.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / JOBS_PER_SEC as f64);
    let mut jobs = Vec::new();
    for i in 0.. {
        let due = start + interval * i;
        if due - start >= WINDOW {
            break;
        }
        tokio::time::sleep_until(due).await;
        jobs.push(run(i as usize));
    }
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        out.push(job.await.unwrap());
    }
    let overlapped = !compile.is_finished();
    (out, overlapped, compile.await.unwrap())
}

/// One way's figures, a value per round.
#[derive(Default)]
struct Rounds {
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    /// Seconds the big compile took.
    compiles: Vec<f64>,
    /// Rounds whose compile outlasted the window.
    overlapped: usize,
}

fn main() {
    let thumbnail = guest("thumbnail");
    let noop = guest("noop");
    let (parallel, single) = compile_times(&thumbnail);
    let big = components::slow_to_compile(BIG_FUNCTIONS, "bench");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ways = [Beside::Nothing, Beside::IdleThread, Beside::EveryCore];
    let mut rounds: Vec<Rounds> = ways.iter().map(|_| Rounds::default()).collect();
    for _ in 0..ROUNDS {
        for (way, figures) in ways.iter().zip(rounds.iter_mut()) {
            let (lat, overlapped, compiled_in) = runtime.block_on(latencies(*way, &noop, &big));
            figures.p50s.push(median(lat.clone()));
            figures.p99s.push(p99(lat));
            figures
                .compiles
                .extend(compiled_in.map(|d| d.as_secs_f64()));
            figures.overlapped += usize::from(overlapped);
        }
    }
    let (alone_p50, alone_p99) = (
        median(rounds[0].p50s.clone()),
        median(rounds[0].p99s.clone()),
    );
    let mut figures = serde_json::Map::new();
    for (way, round) in ways.iter().zip(rounds) {
        let (p50, p99) = (median(round.p50s), median(round.p99s));
        let (compiles, overlapped) = (round.compiles, round.overlapped);
        figures.insert(
            format!("{way:?}"),
            json!({
                "p50_ms": p50, "p99_ms": p99,
                "p50_ratio": p50 / alone_p50, "p99_ratio": p99 / alone_p99,
                "big_compile_s": (!compiles.is_empty()).then(|| median(compiles)),
                "rounds_overlapped": overlapped,
            }),
        );
    }
    let (parallel_ms, single_ms) = (median(parallel), median(single));
    println!(
        "{}",
        json!({
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "thumbnail_bytes": thumbnail.len(),
            "thumbnail_compile_ms": {"parallel": parallel_ms, "one_thread": single_ms,
                                     "one_thread_over_parallel": single_ms / parallel_ms},
            "big_component_bytes": big.len(),
            "rounds": ROUNDS,
            "jobs_per_sec": JOBS_PER_SEC,
            "io_job_latency_beside_a_big_compile": figures,
        })
    );
}
