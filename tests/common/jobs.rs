//! Jobs through a real broker, measured: paced enqueues, and end-to-end
//! latencies read from the job hashes (Redis server clock).

use std::time::Duration;

use serde_json::json;
use wasmq::broker::{Broker, EnqueueRequest, ResultState};
use wasmq::policy::TaskPolicy;

use super::redis::RedisServer;

/// A private redis-server, a broker on it, and guest `guest` deployed as
/// `tenant`'s task `name` under `policy`.
pub async fn redis_with_task(
    tenant: &str,
    name: &str,
    guest: &str,
    policy: &TaskPolicy,
) -> (RedisServer, Broker) {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    broker
        .deploy(tenant, name, &super::guest_bytes(guest), policy)
        .await
        .unwrap();
    (redis, broker)
}

/// e2e latencies (ms, Redis server clock) of `ids`, sorted, once all
/// succeeded; panics if one is dead or they take over 90 s.
pub async fn latencies(broker: &Broker, tenant: &str, ids: &[String]) -> Vec<f64> {
    let keys = wasmq::keys::Keys::new(tenant);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(keys.job(id))
                .arg("state")
                .arg("enqueued_at_us")
                .arg("finished_at_us");
        }
        let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> =
            pipe.query_async(&mut broker.connection()).await.unwrap();
        if rows.iter().all(|r| r.0.as_deref() == Some("succeeded")) {
            let mut out: Vec<f64> = rows
                .iter()
                .map(|r| (r.2.unwrap() - r.1.unwrap()) as f64 / 1000.0)
                .collect();
            out.sort_by(f64::total_cmp);
            return out;
        }
        let bad: Vec<_> = rows
            .iter()
            .filter(|r| r.0.as_deref() == Some("dead"))
            .collect();
        assert!(bad.is_empty(), "a {tenant} job failed");
        assert!(
            std::time::Instant::now() < deadline,
            "{tenant} jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Enqueue `n` jobs of `task` (payload `{}`) at `per_sec`; their ids.
pub async fn paced(
    broker: &Broker,
    tenant: &str,
    task: &str,
    n: usize,
    per_sec: u64,
) -> Vec<String> {
    let interval = Duration::from_secs_f64(1.0 / per_sec as f64);
    let start = tokio::time::Instant::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let req = EnqueueRequest {
            tenant: tenant.into(),
            task: task.into(),
            payload: json!({}),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(req).await.unwrap().id);
    }
    ids
}

/// The median of sorted `xs`.
pub fn p50(xs: &[f64]) -> f64 {
    xs[xs.len() / 2]
}

/// The 99th percentile of sorted `xs`.
pub fn p99(xs: &[f64]) -> f64 {
    xs[((xs.len() as f64 - 1.0) * 0.99).round() as usize]
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
/// result, one after another, in ms, sorted (each must succeed).
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
    out.sort_by(f64::total_cmp);
    out
}
