//! CPU-bound work in the sandbox against the same Rust compiled natively:
//! the `thumbnail` task (generate a 1024x1024 image, box-filter it to 64x64)
//! natively, as a component with fuel metering, and as a component without.
//!
//! `cargo bench -p wasmq --bench cpu` (after `make guests`); prints one JSON
//! line of medians and ratios. A benchmark, not a test: nothing asserts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wasmq::backend::memory::MemoryBackend;
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, EngineLimits};
use wasmq::policy::SandboxPolicy;
use wasmq::sandbox::{JobInput, Sandbox, Verdict};

const RUNS: usize = 15;
const SIDE: u32 = 1024;
const THUMB: u32 = 64;

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

fn native() -> f64 {
    let args = thumbnail::Args {
        width: SIDE,
        height: SIDE,
        seed: 7,
        thumb: THUMB,
    };
    let samples = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(thumbnail::make_thumbnail(std::hint::black_box(&args)).unwrap());
            t.elapsed()
        })
        .collect();
    median(samples)
}

async fn in_sandbox(consume_fuel: bool) -> (f64, u64) {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/guests/wasm32-wasip2/release/thumbnail.wasm"
    ))
    .expect("build the guests first: make guests");
    let limits = EngineLimits {
        instance_slots: 2,
        consume_fuel,
        ..EngineLimits::default()
    };
    let sandbox = Sandbox::new(build_engine(&limits).unwrap(), CompiledCache::new(None)).unwrap();
    let task = sandbox.prepare(&bytes).unwrap();
    let policy = SandboxPolicy {
        fuel: u64::MAX / 4,
        timeout: Duration::from_secs(120),
        ..SandboxPolicy::default()
    };
    let payload = json!({"width": SIDE, "height": SIDE, "seed": 7, "thumb": THUMB}).to_string();
    let job = JobInput::new("bench", "thumbnail", "bench", &payload);
    let backend = Arc::new(MemoryBackend::new());
    let mut samples = Vec::new();
    let mut fuel = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let outcome = sandbox.run(&task, &job, &policy, backend.clone()).await;
        samples.push(t.elapsed());
        assert!(
            matches!(outcome.verdict, Verdict::Succeeded { .. }),
            "{:?}",
            outcome.verdict
        );
        fuel = outcome.usage.fuel;
    }
    (median(samples), fuel)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let native_ms = native();
    let (fuel_ms, fuel) = in_sandbox(true).await;
    let (nofuel_ms, _) = in_sandbox(false).await;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "bench": "cpu-thumbnail",
            "image": format!("{SIDE}x{SIDE} -> {THUMB}x{THUMB}"),
            "runs": RUNS,
            "native_ms_p50": round(native_ms),
            "wasm_fuel_ms_p50": round(fuel_ms),
            "wasm_nofuel_ms_p50": round(nofuel_ms),
            "fuel_vs_native": round(fuel_ms / native_ms),
            "fuel_vs_nofuel": round(fuel_ms / nofuel_ms),
            "nofuel_vs_native": round(nofuel_ms / native_ms),
            "fuel_per_job": fuel,
        })
    );
}
