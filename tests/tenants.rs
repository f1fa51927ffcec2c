//! Tenants against a real redis-server: caps refuse a deploy that asks for
//! more and clamp jobs when caps are lowered later; one tenant's guest can
//! neither see nor change another tenant's state, whatever key it names.

mod common;

use std::time::Duration;

use common::jobs::{latencies, p99, paced};
use common::redis::RedisServer;
use common::workers::KillOnDrop;
use common::{create_tenant, guest, guest_bytes, wasmq, TempDir};
use serde_json::json;
use wasmq::broker::{Broker, EnqueueRequest, ResultState};
use wasmq::failure::Category;
use wasmq::policy::TaskPolicy;

/// Deploy guest `guest` as `tenant`'s task `name` with the default policy.
async fn deploy_default(broker: &Broker, tenant: &str, name: &str, guest: &str) {
    broker
        .deploy(tenant, name, &guest_bytes(guest), &TaskPolicy::default())
        .await
        .unwrap();
}

async fn run_one(
    broker: &Broker,
    tenant: &str,
    task: &str,
    payload: serde_json::Value,
) -> ResultState {
    let id = format!("t-{tenant}");
    let (stop, worker) =
        common::workers::start_in_process(broker, tenant, 2, Duration::from_secs(10), &id);
    let req = EnqueueRequest {
        tenant: tenant.into(),
        task: task.into(),
        payload,
        store_result: Some(true),
        ..EnqueueRequest::default()
    };
    let id = broker.enqueue(req).await.unwrap().id;
    let result = broker
        .result(tenant, &id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    stop.send(()).unwrap();
    worker.await.unwrap();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_refuse_greedy_deploys_and_clamp_running_jobs() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    create_tenant(
        &url,
        "acme",
        &[
            "--max-fuel",
            "100000000",
            "--max-timeout",
            "5s",
            "--allow-http",
            "api.example:443",
        ],
    );

    let dir = TempDir::new("manifest");
    let greedy = dir.path().join("greedy.toml");
    std::fs::write(
        &greedy,
        "[sandbox]\nfuel = 5000000000\ntimeout = \"1m\"\nallow_http = [\"evil.example\"]\n",
    )
    .unwrap();
    let hostile = guest("hostile");
    let out = wasmq(
        &url,
        "acme",
        &[
            "deploy",
            hostile.to_str().unwrap(),
            "--name",
            "spin",
            "--manifest",
            greedy.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for needle in [
        "fuel 5000000000 exceeds tenant \"acme\"'s cap of 100000000",
        "timeout 1m exceeds",
        "\"evil.example\" is not in tenant \"acme\"'s allowed hosts",
    ] {
        assert!(stderr.contains(needle), "{stderr} should mention {needle}");
    }
    let modest = dir.path().join("modest.toml");
    std::fs::write(&modest, "[sandbox]\nfuel = 50000000\ntimeout = \"2s\"\n").unwrap();
    let out = wasmq(
        &url,
        "acme",
        &[
            "deploy",
            hostile.to_str().unwrap(),
            "--name",
            "spin",
            "--manifest",
            modest.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Lowering a cap later clamps jobs without a redeploy.
    let lowered = wasmq(
        &url,
        "default",
        &["tenant", "set-limits", "acme", "--max-fuel", "1000000"],
    );
    assert!(lowered.status.success());
    let show = wasmq(&url, "default", &["tenant", "show", "acme"]);
    let record: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(record["limits"]["max_fuel"], 1_000_000);
    assert_eq!(
        record["limits"]["max_timeout"], "5s",
        "set-limits keeps the other caps"
    );
    assert!(
        String::from_utf8_lossy(&wasmq(&url, "default", &["tenant", "list"]).stdout)
            .lines()
            .any(|l| l == "acme")
    );

    let broker = Broker::connect(&url).await.unwrap();
    match run_one(&broker, "acme", "spin", json!({"mode": "spin"})).await {
        ResultState::Failed(f) => {
            assert_eq!(f.category, Category::FuelExhausted);
            assert!(
                f.message.contains("used all 1000000 units"),
                "{}",
                f.message
            );
        }
        other => panic!("expected fuel-exhausted, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_reach_another_tenants_state() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    for tenant in ["alpha", "beta"] {
        deploy_default(&broker, tenant, "kv", "hostile").await;
    }
    let set = run_one(
        &broker,
        "alpha",
        "kv",
        json!({"mode": "kv-set", "key": "secret", "value": "alpha-only"}),
    )
    .await;
    assert!(matches!(set, ResultState::Ready(_)), "{set:?}");
    // Beta asks for the same key, and for alpha's key spelled out in full.
    for key in [
        "secret",
        "wasmq:{alpha}:kv:secret",
        "../secret",
        "{alpha}:kv:secret",
    ] {
        match run_one(&broker, "beta", "kv", json!({"mode": "kv-get", "key": key})).await {
            ResultState::Ready(v) => assert_eq!(
                v["value"],
                serde_json::Value::Null,
                "beta read alpha's {key:?}: {v}"
            ),
            other => panic!("{other:?}"),
        }
    }
    // Beta writing the spelled-out key does not touch alpha's entry.
    run_one(
        &broker,
        "beta",
        "kv",
        json!({"mode": "kv-set", "key": "wasmq:{alpha}:kv:secret", "value": "beta"}),
    )
    .await;
    match run_one(
        &broker,
        "alpha",
        "kv",
        json!({"mode": "kv-get", "key": "secret"}),
    )
    .await
    {
        ResultState::Ready(v) => assert_eq!(v["value"], "alpha-only"),
        other => panic!("{other:?}"),
    }
}

/// Where the noisy tenant's hostile task runs.
#[derive(Debug, Clone, Copy)]
enum NoisyPlacement {
    /// In the io pool, on the queue the quiet tenant uses too: a tenant that
    /// declares spinning work as I/O. Its concurrency cap (2 of the worker's
    /// 32 slots) and the compute threads its jobs move to after 1 ms of
    /// computing protect the quiet tenant.
    SharedIoQueue,
    /// On a cpu pool of 2 threads, as a platform routes CPU-heavy tenants:
    /// the OS scheduler (CPU-pool threads run under SCHED_IDLE) protects the quiet
    /// tenant's io pool.
    CpuPool,
    /// The same cpu pool in a worker process of its own (the noisy tenant
    /// only), beside the quiet tenant's worker: no memory-management lock
    /// or TLB shootdown of the noisy jobs reaches the quiet worker.
    CpuWorker,
}

/// Tenant A floods a worker shared with tenant B with 200 spinning jobs
/// and 200 memory bombs while B runs 2,000 normal jobs at 1,000/s: every B
/// job succeeds, every A job ends in its category. Returns B's p99 alone
/// and beside A, in ms, and the worker's peak RSS in KiB.
async fn noisy_beside_quiet(placement: NoisyPlacement) -> (f64, f64, u64) {
    const QUIET_JOBS: usize = 2000;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    // The noisy tenant runs at most 2 jobs at once on a worker; the quiet
    // one is uncapped.
    create_tenant(
        &redis.url,
        "noisy",
        &["--max-concurrency", "2", "--max-memory", "32MiB"],
    );
    let mut hostile = TaskPolicy::default();
    hostile.sandbox.memory_bytes = 32 << 20;
    // Each spinner burns ~15 ms of CPU before its fuel runs out.
    hostile.sandbox.fuel = 200_000_000;
    let io = ["--pool", "io=default:32"];
    let cpu = ["--pool", "cpu=heavy:2"];
    let both = ["--tenants", "noisy,quiet"];
    // One argument list per worker process.
    let workers: Vec<Vec<&str>> = match placement {
        NoisyPlacement::SharedIoQueue => vec![[&both[..], &io].concat()],
        NoisyPlacement::CpuPool => vec![[&both[..], &io, &cpu].concat()],
        NoisyPlacement::CpuWorker => vec![
            [&["--tenants", "quiet"][..], &io].concat(),
            [&["--tenants", "noisy"][..], &cpu].concat(),
        ],
    };
    if !matches!(placement, NoisyPlacement::SharedIoQueue) {
        hostile.queue = "heavy".into();
        hostile.pool = wasmq::pools::PoolKind::Cpu;
    }
    broker
        .deploy("noisy", "hostile", &guest_bytes("hostile"), &hostile)
        .await
        .unwrap();
    deploy_default(&broker, "quiet", "noop", "noop").await;

    // `--tenants` overrides the `--tenant` spawn_process passes.
    let workers: Vec<KillOnDrop> = workers
        .iter()
        .map(|args| common::workers::spawn_process(&redis.url, "quiet", args))
        .collect();

    // Warm up: the workers start, compile both tasks and connect before
    // anything is measured (a cold start once made "alone" slower than
    // "beside").
    latencies(
        &broker,
        "quiet",
        &paced(&broker, "quiet", "noop", 50, 1000).await,
    )
    .await;
    let warm_up = EnqueueRequest {
        tenant: "noisy".into(),
        task: "hostile".into(),
        payload: json!({"mode": "echo"}),
        ..EnqueueRequest::default()
    };
    let warm_up = broker.enqueue(warm_up).await.unwrap().id;
    let warmed = broker
        .result("noisy", &warm_up, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        matches!(warmed, ResultState::Ready(_) | ResultState::Ignored),
        "{warmed:?}"
    );

    let alone = latencies(
        &broker,
        "quiet",
        &paced(&broker, "quiet", "noop", QUIET_JOBS, 1000).await,
    )
    .await;
    let mut noisy = Vec::new();
    for mode in ["spin", "memory-bomb"] {
        for _ in 0..200 {
            let req = EnqueueRequest {
                tenant: "noisy".into(),
                task: "hostile".into(),
                payload: json!({"mode": mode}),
                ..EnqueueRequest::default()
            };
            noisy.push(broker.enqueue(req).await.unwrap().id);
        }
    }
    let beside = latencies(
        &broker,
        "quiet",
        &paced(&broker, "quiet", "noop", QUIET_JOBS, 1000).await,
    )
    .await;
    // The noisy jobs end in their categories (they keep running after the
    // quiet jobs are done; wait for them).
    for id in &noisy {
        match broker
            .result("noisy", id, Some(Duration::from_secs(120)))
            .await
            .unwrap()
        {
            ResultState::Failed(f) => assert!(
                matches!(f.category, Category::FuelExhausted | Category::MemoryLimit),
                "{f}"
            ),
            other => panic!("noisy job ended {other:?}"),
        }
    }
    let rss_kib = workers
        .iter()
        .map(|w| common::workers::peak_rss_kib(w.id()))
        .max()
        .unwrap_or(0);
    println!(
        "{placement:?}: quiet tenant p50/p99 {:.2}/{:.2} ms alone, {:.2}/{:.2} ms beside the noisy tenant ({:.1}x); worker peak RSS {} MiB",
        alone[alone.len() / 2],
        p99(&alone),
        beside[beside.len() / 2],
        p99(&beside),
        p99(&beside) / p99(&alone),
        rss_kib / 1024
    );
    drop(workers);
    (p99(&alone), p99(&beside), rss_kib)
}

/// The noisy tenant in each placement, one after the other (run at once,
/// they would measure each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_does_not_starve_a_quiet_one() {
    for (placement, floor_ms) in [
        // A starved queue (a spinning guest hogging a runtime thread
        // measured ~150 ms here) fails; the floor keeps a loaded CI machine
        // from turning scheduling noise into a failure.
        (NoisyPlacement::SharedIoQueue, 50.0),
        (NoisyPlacement::CpuPool, 20.0),
        (NoisyPlacement::CpuWorker, 20.0),
    ] {
        let (alone, beside, rss_kib) = noisy_beside_quiet(placement).await;
        assert!(rss_kib < 1 << 20, "worker RSS stays bounded: {rss_kib} KiB");
        // The target is 3x.
        let bound = (3.0 * alone).max(floor_ms);
        assert!(
            beside <= bound,
            "{placement:?}: quiet p99 {beside:.2} ms beside the noisy tenant, over {bound:.2} ms"
        );
    }
}

/// A platform confines a tenant to cpu pools: a deploy on the io pool is
/// refused by name, and a pool taken away after a deploy stops the task's
/// jobs with `denied` instead of running them where they may not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_confined_to_a_pool_stays_there() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    create_tenant(&redis.url, "crunch", &["--allow-pool", "cpu"]);
    let bytes = guest_bytes("hostile");
    let refused = broker
        .deploy("crunch", "echo", &bytes, &TaskPolicy::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("pool io is not allowed for tenant \"crunch\" (allowed: cpu)"),
        "{refused}"
    );
    let on_cpu = TaskPolicy {
        pool: wasmq::pools::PoolKind::Cpu,
        ..TaskPolicy::default()
    };
    broker
        .deploy("crunch", "echo", &bytes, &on_cpu)
        .await
        .unwrap();
    match run_one(&broker, "crunch", "echo", json!({"mode": "echo"})).await {
        ResultState::Ready(v) => assert_eq!(v, json!({"mode": "echo"})),
        other => panic!("expected the echo, got {other:?}"),
    }

    let moved = wasmq(
        &redis.url,
        "default",
        &["tenant", "set-limits", "crunch", "--allow-pool", "io"],
    );
    assert!(moved.status.success());
    match run_one(&broker, "crunch", "echo", json!({"mode": "echo"})).await {
        ResultState::Failed(f) => {
            assert_eq!(f.category, Category::Denied, "{f}");
            assert!(f.message.contains("pool cpu is not allowed"), "{f}");
        }
        other => panic!("expected denied, got {other:?}"),
    }
}

/// A tenant capped at 3 jobs at once across the cluster, served by two
/// workers of 8 slots each: at no instant do more than 3 of its jobs run,
/// both workers take part, and the cap is reached (it binds, not the slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_cap_holds_across_workers() {
    const CAP: usize = 3;
    const JOBS: usize = 30;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    create_tenant(
        &redis.url,
        "capped",
        &["--max-cluster-concurrency", &CAP.to_string()],
    );
    deploy_default(&broker, "capped", "hostile", "hostile").await;
    let lease = Duration::from_secs(10);
    let (stop_a, worker_a) =
        common::workers::start_in_process(&broker, "capped", 8, lease, "cap-a");
    let (stop_b, worker_b) =
        common::workers::start_in_process(&broker, "capped", 8, lease, "cap-b");
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let req = EnqueueRequest {
            tenant: "capped".into(),
            task: "hostile".into(),
            payload: json!({"mode": "sleep", "ms": 150}),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(req).await.unwrap().id);
    }
    latencies(&broker, "capped", &ids).await;

    // Both ends of a run are stamped by Redis's clock inside the scripts
    // that add it to and remove it from the tenant's in-flight set, so the
    // overlap of these intervals is exactly what the cap constrains.
    let keys = wasmq::keys::Keys::new("capped");
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HMGET")
            .arg(keys.job(id))
            .arg("started_at_us")
            .arg("finished_at_us");
    }
    let spans: Vec<(u64, u64)> = pipe.query_async(&mut broker.connection()).await.unwrap();
    let mut edges: Vec<(u64, i32)> = spans
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // At equal times, an end comes before a start.
    edges.sort();
    let (mut running, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        running += step;
        most = most.max(running);
    }
    stop_a.send(()).unwrap();
    stop_b.send(()).unwrap();
    let (a, b) = (worker_a.await.unwrap(), worker_b.await.unwrap());
    println!(
        "cluster cap {CAP}: at most {most} of {JOBS} jobs ran at once; workers ran {} and {}",
        a.completed, b.completed
    );
    assert_eq!(most as usize, CAP, "the cap binds and is never exceeded");
    assert!(
        a.completed > 0 && b.completed > 0,
        "both workers took part ({} and {}); the test proves nothing otherwise",
        a.completed,
        b.completed
    );
}
