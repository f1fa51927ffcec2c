//! 10,000 I/O jobs in one worker: each waits on a local HTTP endpoint that
//! answers after 1 s. Checks that every job completes with 10,000 sandboxes
//! in flight at once; prints the wall time and the worker's peak RSS (the
//! figures the pools issue asks for; a report, not a timed assertion).

mod common;

use std::time::{Duration, Instant};

use common::guest_bytes;
use common::http::{Reply, TestServer};
use common::redis::RedisServer;
use serde_json::json;
use wasmq::broker::Broker;
use wasmq::keys::Keys;
use wasmq::policy::TaskPolicy;

const TENANT: &str = "scale";
const JOBS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_io_jobs_in_flight_in_one_worker() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let slow = TestServer::start(|_, _| Reply {
        delay: Duration::from_secs(1),
        ..Reply::ok("ok")
    })
    .await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![slow.authority()];
    policy.sandbox.timeout = Duration::from_secs(60);
    broker
        .deploy(TENANT, "wait", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    let payloads = vec![json!({"mode": "http", "url": slow.url("/slow")}); JOBS];
    let ids = broker
        .enqueue_many(TENANT, "wait", &payloads)
        .await
        .unwrap();

    let pool = format!("io=default:{JOBS}");
    let mut worker = common::workers::spawn_process(&redis.url, TENANT, &["--pool", &pool]);
    let started = Instant::now();
    let keys = Keys::new(TENANT);
    let deadline = started + Duration::from_secs(120);
    let mut peak_rss_kib = 0;
    loop {
        peak_rss_kib = peak_rss_kib.max(common::workers::peak_rss_kib(worker.id()));
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(keys.job(id), "state");
        }
        let states: Vec<Option<String>> = pipe.query_async(&mut broker.connection()).await.unwrap();
        let done = states
            .iter()
            .filter(|s| s.as_deref() == Some("succeeded"))
            .count();
        let dead = states
            .iter()
            .filter(|s| s.as_deref() == Some("dead"))
            .count();
        assert_eq!(dead, 0, "no job may fail");
        if done == JOBS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {JOBS} finished in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = started.elapsed();
    peak_rss_kib = peak_rss_kib.max(common::workers::peak_rss_kib(worker.id()));
    worker.kill().unwrap();
    worker.wait().unwrap();
    println!(
        "{JOBS} jobs waiting 1 s each: {:.2} s wall in one worker (including start-up and compile); peak RSS {} MiB, {:.0} KiB per in-flight job",
        wall.as_secs_f64(),
        peak_rss_kib / 1024,
        peak_rss_kib as f64 / JOBS as f64
    );
    assert_eq!(slow.count("/slow"), JOBS, "each job made its request once");
}
