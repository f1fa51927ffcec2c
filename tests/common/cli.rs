//! The `wasmq` CLI and the library as a test's producer and operator:
//! running commands, creating tenants, running one job to its result.

use std::process::{Command, Output};
use std::time::Duration;

use wasmq::broker::{Broker, EnqueueRequest, ResultState};

/// Run `wasmq --redis URL --tenant TENANT ARGS...` to completion.
pub fn wasmq(redis: &str, tenant: &str, args: &[&str]) -> Output {
    Command::new(super::wasmq_bin())
        .args(["--redis", redis, "--tenant", tenant])
        .args(args)
        .env(
            "WASMQ_CACHE_DIR",
            std::env::temp_dir().join("wasmq-test-cache"),
        )
        .output()
        .unwrap()
}

/// Its stdout or stderr, trimmed.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// `wasmq tenant create NAME FLAGS...`, which must succeed.
pub fn create_tenant(redis: &str, name: &str, flags: &[&str]) {
    let args = [&["tenant", "create", name][..], flags].concat();
    let created = wasmq(redis, "default", &args);
    assert!(
        created.status.success(),
        "tenant create {name}: {}",
        text(&created.stderr)
    );
}

/// Enqueue one job of `tenant`'s `task` (result stored) and wait up to
/// `wait` for where it ends.
pub async fn enqueue_and_wait(
    broker: &Broker,
    tenant: &str,
    task: &str,
    payload: serde_json::Value,
    wait: Duration,
) -> (String, ResultState) {
    let req = EnqueueRequest {
        tenant: tenant.into(),
        task: task.into(),
        payload,
        store_result: Some(true),
        ..EnqueueRequest::default()
    };
    let id = broker.enqueue(req).await.unwrap().id;
    let state = broker.result(tenant, &id, Some(wait)).await.unwrap();
    (id, state)
}

/// How long each of `n` jobs of `tenant`'s `task` took from enqueue to
/// result, one after another, in ms (each must succeed).
pub async fn latencies_ms(broker: &Broker, tenant: &str, task: &str, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = std::time::Instant::now();
        let (id, state) = enqueue_and_wait(
            broker,
            tenant,
            task,
            serde_json::json!({"mode": "echo", "i": i}),
            Duration::from_secs(30),
        )
        .await;
        assert!(
            matches!(state, ResultState::Ready(_)),
            "job {id}: {state:?}"
        );
        out.push(started.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// The `p`th percentile (0-1) of `xs`.
pub fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}
