//! Worker pools against a real redis-server and a real `wasmq worker`
//! process: a CPU pool of 2 threads keeps both cores busy with
//! fuel-metered work while the I/O pool of the same worker still completes
//! its jobs; a queue serves one pool kind.

mod common;

use std::time::{Duration, Instant};

use common::components::{example_task_bytes, Lang};
use common::guest_bytes;
use common::redis::RedisServer;
use common::workers::KillOnDrop;
use serde_json::json;
use wasmq::broker::{Broker, EnqueueRequest};
use wasmq::keys::Keys;
use wasmq::policy::TaskPolicy;
use wasmq::pools::PoolKind;

const TENANT: &str = "pools";

fn policy(queue: &str, pool: PoolKind) -> TaskPolicy {
    let mut p = TaskPolicy {
        queue: queue.into(),
        pool,
        ..TaskPolicy::default()
    };
    p.sandbox.fuel = u64::MAX / 4;
    p
}

async fn enqueue(broker: &Broker, task: &str, payload: serde_json::Value, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let req = EnqueueRequest {
            tenant: TENANT.into(),
            task: task.into(),
            payload: payload.clone(),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(req).await.unwrap().id);
    }
    ids
}

/// Per job: (started ms, finished ms, e2e ms from the server clock); waits
/// until all have succeeded.
async fn finish_all(broker: &Broker, ids: &[String]) -> Vec<(u64, u64, f64)> {
    let keys = Keys::new(TENANT);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(keys.job(id))
                .arg("state")
                .arg("started_at_ms")
                .arg("finished_at_ms")
                .arg("enqueued_at_us")
                .arg("finished_at_us");
        }
        type Row = (
            Option<String>,
            Option<u64>,
            Option<u64>,
            Option<u64>,
            Option<u64>,
        );
        let rows: Vec<Row> = pipe.query_async(&mut broker.connection()).await.unwrap();
        if rows.iter().all(|r| r.0.as_deref() == Some("succeeded")) {
            return rows
                .into_iter()
                .map(|r| {
                    (
                        r.1.unwrap(),
                        r.2.unwrap(),
                        (r.4.unwrap() - r.3.unwrap()) as f64 / 1000.0,
                    )
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not finish: {:?}",
            rows.iter()
                .filter(|r| r.0.as_deref() != Some("succeeded"))
                .take(3)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn p50(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Most jobs running at the same moment.
fn max_overlap(spans: &[(u64, u64)]) -> usize {
    let mut edges: Vec<(u64, i32)> = spans.iter().flat_map(|&(s, f)| [(s, 1), (f, -1)]).collect();
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_pool_saturates_its_threads_while_io_jobs_keep_flowing() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let hostile = guest_bytes("hostile");
    broker
        .deploy(TENANT, "burn", &hostile, &policy("crunch", PoolKind::Cpu))
        .await
        .unwrap();
    broker
        .deploy(TENANT, "wait", &hostile, &policy("net", PoolKind::Io))
        .await
        .unwrap();

    // A queue serves one kind: a cpu task on the io queue is refused.
    let err = broker
        .deploy(TENANT, "misrouted", &hostile, &policy("net", PoolKind::Cpu))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("queue \"net\" serves io tasks"),
        "{err}"
    );

    let mut worker = common::workers::spawn_process(
        &redis.url,
        TENANT,
        &["--pool", "io=net:100", "--pool", "cpu=crunch:2"],
    );

    // Warm up (compile once), then I/O jobs alone.
    finish_all(
        &broker,
        &enqueue(&broker, "wait", json!({"mode": "echo"}), 1).await,
    )
    .await;
    let alone = finish_all(
        &broker,
        &enqueue(&broker, "wait", json!({"mode": "sleep", "ms": 100}), 40).await,
    )
    .await;

    // Now with the CPU pool busy: 12 jobs of 300 ms of spinning each.
    let burns = enqueue(&broker, "burn", json!({"mode": "busy-ms", "ms": 300}), 12).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let loaded = finish_all(
        &broker,
        &enqueue(&broker, "wait", json!({"mode": "sleep", "ms": 100}), 40).await,
    )
    .await;
    let burned = finish_all(&broker, &burns).await;
    worker.kill().unwrap();
    worker.wait().unwrap();

    let spans: Vec<(u64, u64)> = burned.iter().map(|&(s, f, _)| (s, f)).collect();
    let overlap = max_overlap(&spans);
    let p50_alone = p50(alone.iter().map(|r| r.2).collect());
    let p50_loaded = p50(loaded.iter().map(|r| r.2).collect());
    println!(
        "io job e2e p50: {p50_alone:.1} ms alone, {p50_loaded:.1} ms beside a saturated cpu pool; cpu jobs ran {overlap} at a time"
    );
    // Both threads busy at once...
    assert!(
        overlap >= 2,
        "the cpu pool should run 2 jobs at once, ran {overlap}"
    );
    // ...and never more than two: 12 jobs of 300 ms on 2 threads need at
    // least 1.8 s. (Timestamps come from fetch and from recording the
    // outcome, which can overlap the next job's start by a moment, so the
    // bound is on the total, not on instantaneous overlap.)
    let first_start = spans.iter().map(|s| s.0).min().unwrap();
    let last_finish = spans.iter().map(|s| s.1).max().unwrap();
    let wall = last_finish - first_start;
    assert!(
        wall >= 1700,
        "12 x 300 ms on 2 threads took only {wall} ms: more than 2 ran at once"
    );
    // Every I/O job finished while the CPU pool was saturated (finish_all
    // waited for them); the figures above are the report, not a threshold.
    assert_eq!(loaded.len(), 40);
}

fn spawn_worker(redis_url: &str, args: &[&str]) -> KillOnDrop {
    let mut all = vec!["--lease", "3s"];
    all.extend_from_slice(args);
    common::workers::spawn_process(redis_url, TENANT, &all)
}

/// 4 worker processes x 1,000 read-modify-write increments of one
/// key-value entry under the distributed lock: the total is exact, every
/// value is written once, and fencing tokens increase with the values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_increments_from_four_workers_are_exact() {
    const JOBS: usize = 4000;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut p = policy("default", PoolKind::Io);
    p.store_result = true;
    broker
        .deploy(TENANT, "incr", &guest_bytes("hostile"), &p)
        .await
        .unwrap();
    let ids = enqueue(
        &broker,
        "incr",
        json!({"mode": "locked-incr", "key": "shared"}),
        JOBS,
    )
    .await;
    let mut workers: Vec<_> = (0..4)
        .map(|_| spawn_worker(&redis.url, &["--concurrency", "8"]))
        .collect();
    finish_all(&broker, &ids).await;
    for w in &mut workers {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    let keys = Keys::new(TENANT);
    let mut conn = redis.connect().await;
    let total: String = redis::AsyncCommands::get(&mut conn, keys.kv("shared"))
        .await
        .unwrap();
    assert_eq!(
        total,
        JOBS.to_string(),
        "every increment applied exactly once"
    );
    let mut written = Vec::new();
    for id in &ids {
        let result: String = redis::AsyncCommands::get(&mut conn, keys.result(id))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&result).unwrap();
        written.push((v["value"].as_u64().unwrap(), v["token"].as_u64().unwrap()));
    }
    written.sort();
    let values: Vec<u64> = written.iter().map(|w| w.0).collect();
    assert_eq!(
        values,
        (1..=JOBS as u64).collect::<Vec<_>>(),
        "each value written by exactly one job"
    );
    assert!(
        written.windows(2).all(|w| w[0].1 < w[1].1),
        "fencing tokens strictly increase with the writes"
    );
}

/// The seed's PAGES_SCRAPED global done right: 500 pages, each enqueued
/// twice, and a worker killed mid-run (so some jobs are delivered again):
/// the host counter says exactly 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_500_pages_once_despite_duplicates() {
    scrape_counts_500_pages_once_in(Lang::Rust).await;
}

/// [`scrape_counts_500_pages_once_despite_duplicates`] with the Python
/// twin of `scrape` (tasks/scrape-py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_500_pages_once_despite_duplicates_py() {
    scrape_counts_500_pages_once_in(Lang::Python).await;
}

async fn scrape_counts_500_pages_once_in(lang: Lang) {
    const PAGES: usize = 500;
    let Some(scrape) = example_task_bytes("scrape", lang) else {
        return;
    };
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let site = common::http::TestServer::start(|req, _| {
        common::http::Reply::ok(format!("<a href='{}/next'>next</a>", req.path))
    })
    .await;
    let mut p = policy("default", PoolKind::Io);
    p.sandbox.allow_http = vec![site.authority()];
    broker.deploy(TENANT, "scrape", &scrape, &p).await.unwrap();
    let mut ids = Vec::new();
    for round in 0..2 {
        for page in 0..PAGES {
            let payload = json!({"url": site.url(&format!("/page/{page}"))});
            ids.extend(enqueue(&broker, "scrape", payload, 1).await);
        }
        if round == 0 {
            // Let a first worker take some, then kill it mid-run: once it
            // has fetched a few pages (a Python worker first loads its
            // 18 MB component, so a fixed delay could kill it before any).
            let mut first = spawn_worker(&redis.url, &["--concurrency", "50"]);
            let started = Instant::now();
            while site.requests().len() < 20 {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the first worker fetched nothing in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            first.kill().unwrap();
            first.wait().unwrap();
        }
    }
    let mut second = spawn_worker(&redis.url, &["--concurrency", "50"]);
    finish_all(&broker, &ids).await;
    second.kill().unwrap();
    second.wait().unwrap();
    let mut conn = redis.connect().await;
    let scraped: String =
        redis::AsyncCommands::get(&mut conn, Keys::new(TENANT).counter("pages-scraped"))
            .await
            .unwrap();
    assert_eq!(scraped, PAGES.to_string(), "each page counted once");
    assert!(site.requests().len() >= PAGES, "every page was fetched");
    println!(
        "{} fetches for {PAGES} pages ({} jobs)",
        site.requests().len(),
        ids.len()
    );
}
