//! A step for workflow tests: adds numbers it is given to the results of
//! what it waited for, fails on demand, sleeps on demand (so a worker can
//! be killed under it), and as a chord's callback counts its runs through
//! a step marker (a run that completes counts once, however often the job
//! is delivered).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use wasmq_guest::{counter, once, Job, TaskError};

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Op {
    /// `n` plus every dependency's (numeric) result.
    Add {
        #[serde(default)]
        n: i64,
        #[serde(default)]
        sleep_ms: u64,
    },
    /// The callback: sums what succeeded, counts what failed, and bumps
    /// counter `callbacks` once per job.
    Sum,
    /// Fails for good.
    Fail,
    /// Every dependency as it was handed over.
    Deps,
}

#[wasmq_guest::task]
fn run(job: &Job, op: Op) -> Result<Value, TaskError> {
    match op {
        Op::Add { n, sleep_ms } => {
            if sleep_ms > 0 {
                std::thread::sleep(Duration::from_millis(sleep_ms));
            }
            let before: Vec<i64> = job.results()?;
            Ok(json!(n + before.iter().sum::<i64>()))
        }
        Op::Sum => {
            let mut sum = 0;
            let mut failed = Vec::new();
            let dependencies = job.dependencies();
            for d in &dependencies {
                match &d.outcome {
                    Ok(r) => sum += serde_json::from_str::<i64>(r).unwrap_or(0),
                    Err(e) => failed.push(json!({"job": d.job_id, "error": e})),
                }
            }
            let runs = once(&format!("callback:{}", job.id), || {
                Ok(counter::incr("callbacks", 1)?)
            })?;
            Ok(
                json!({"sum": sum, "members": job.dependencies().len(), "failed": failed, "callbacks": runs}),
            )
        }
        Op::Fail => Err(TaskError::fail("asked to fail")),
        Op::Deps => Ok(json!({
            "flow": job.flow_id,
            "deps": job.dependencies().iter().map(|d| json!({
                "job": d.job_id, "task": d.task,
                "ok": d.outcome.as_ref().ok(), "err": d.outcome.as_ref().err(),
            })).collect::<Vec<_>>(),
        })),
    }
}
