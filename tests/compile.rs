//! Compiling components, against a real redis-server with real and
//! generated components: a size cap per tenant refused at deploy and at run
//! time, a compile budget past which a version is refused (and remembered)
//! while the worker keeps serving, other tasks' jobs running while a slow
//! compile runs, one compile for many jobs of a new version, the disk
//! cache across a worker restart, and the engine's component limits
//! (refused at deploy and at run time naming the limit, part of the cache
//! key).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::components::{slow_to_compile, unique_version};
use common::jobs::{latencies, p50, p99, paced};
use common::redis::RedisServer;
use common::workers::{in_process_config, start_configured};
use common::{create_tenant, guest, guest_bytes, wasmq, wasmq_cached, TempDir};
use serde_json::json;
use wasmq::broker::{Broker, EnqueueRequest, ResultState};
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, ComponentLimits, EngineLimits};
use wasmq::failure::{Category, Failure};
use wasmq::launcher::LaunchConfig;
use wasmq::policy::TaskPolicy;
use wasmq::sandbox::{CompileStats, Sandbox};

const LEASE: Duration = Duration::from_secs(10);

/// How long a worker trusts a tenant record it read (the catalog's
/// `RECORD_TTL`), with room to spare.
const RECORD_TTL: Duration = Duration::from_millis(1500);

/// Functions of the slow component: about 1.8 s of one core each to
/// compile (2-core VM), so several seconds in all.
const SLOW_FUNCTIONS: usize = 2;

/// Enqueue `n` jobs of `task` with `payload`, results stored; their ids.
async fn enqueue(
    broker: &Broker,
    tenant: &str,
    task: &str,
    payload: serde_json::Value,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let req = EnqueueRequest {
            tenant: tenant.into(),
            task: task.into(),
            payload: payload.clone(),
            store_result: Some(true),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(req).await.unwrap().id);
    }
    ids
}

/// How job `id` ended (within a minute).
async fn ended(broker: &Broker, tenant: &str, id: &str) -> ResultState {
    broker
        .result(tenant, id, Some(Duration::from_secs(60)))
        .await
        .unwrap()
}

/// The failure of a job that must have been dead-lettered.
async fn dead(broker: &Broker, tenant: &str, id: &str) -> Failure {
    match ended(broker, tenant, id).await {
        ResultState::Failed(f) => {
            let dead: Vec<String> = broker
                .dead_list(tenant, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert!(dead.iter().any(|d| d == id), "{id} is dead-lettered");
            f
        }
        other => panic!("expected job {id} to fail, got {other:?}"),
    }
}

/// A worker of `config`, changed by `tune`: its stop channel, handle and
/// sandbox.
fn worker(
    broker: &Broker,
    tenant: &str,
    concurrency: usize,
    tune: impl FnOnce(&mut LaunchConfig),
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
    Arc<Sandbox>,
) {
    let mut config = in_process_config(broker, tenant, concurrency, LEASE, "compile");
    tune(&mut config);
    start_configured(config)
}

/// Wait until `sandbox`'s compile counts satisfy `done` (within a minute).
async fn wait_for_stats(sandbox: &Sandbox, done: impl Fn(&CompileStats) -> bool) -> CompileStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = sandbox.compile_stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "compile counts stuck at {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_over_its_tenants_cap_is_refused_at_deploy() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    // noop (~140 KiB) fits, hostile (~340 KiB) does not.
    create_tenant(&url, "acme", &["--max-component", "200KiB"]);
    let show = wasmq(&url, "default", &["tenant", "show", "acme"]);
    let record: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(record["limits"]["max_component_bytes"], 200 << 10);

    let cache = TempDir::new("deploy-cache");
    let hostile = guest("hostile");
    let size = std::fs::metadata(&hostile).unwrap().len();
    let out = wasmq_cached(
        &url,
        "acme",
        &["deploy", hostile.to_str().unwrap(), "--name", "big"],
        cache.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: invalid-component: component is "),
        "{stderr}"
    );
    for needle in [
        format!("({size} bytes)"),
        "over tenant \"acme\"'s cap of 0.2 MiB (204800 bytes)".to_string(),
        "--max-component".to_string(),
    ] {
        assert!(stderr.contains(&needle), "{stderr} should name {needle}");
    }
    // Refused before compiling: nothing of it reached the compiled cache,
    // while a component that fits was compiled into it.
    let noop = guest("noop");
    let out = wasmq_cached(
        &url,
        "acme",
        &["deploy", noop.to_str().unwrap(), "--name", "small"],
        cache.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compiled: Vec<String> = std::fs::read_dir(cache.path().join("compiled"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let hash = |bytes: &[u8]| wasmq::component::content_hash(bytes);
    assert!(compiled
        .iter()
        .any(|f| f.starts_with(&hash(&guest_bytes("noop")))));
    assert!(!compiled
        .iter()
        .any(|f| f.starts_with(&hash(&guest_bytes("hostile")))));

    // The library refuses the same way, with a failure to branch on.
    let broker = Broker::connect(&url).await.unwrap();
    let err = broker
        .deploy(
            "acme",
            "big",
            &guest_bytes("hostile"),
            &TaskPolicy::default(),
        )
        .await
        .unwrap_err();
    let failure = err.downcast_ref::<Failure>().expect("a Failure");
    assert_eq!(failure.category, Category::InvalidComponent);
    assert!(
        failure.message.contains(&format!("({size} bytes)")),
        "{failure}"
    );
    assert!(failure.message.contains("(204800 bytes)"), "{failure}");
    assert!(broker.task("acme", "big").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_lowered_after_deploy_dead_letters_the_jobs() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    let broker = Broker::connect(&url).await.unwrap();
    create_tenant(&url, "acme", &[]);
    let bytes = guest_bytes("hostile");
    broker
        .deploy("acme", "echo", &bytes, &TaskPolicy::default())
        .await
        .unwrap();
    let (stop, running, sandbox) = worker(&broker, "acme", 4, |_| {});
    let id = enqueue(&broker, "acme", "echo", json!({"mode": "echo"}), 1).await;
    assert!(matches!(
        ended(&broker, "acme", &id[0]).await,
        ResultState::Ready(_)
    ));
    assert_eq!(sandbox.compile_stats().compiled, 1);

    let lowered = wasmq(
        &url,
        "default",
        &["tenant", "set-limits", "acme", "--max-component", "100KiB"],
    );
    assert!(lowered.status.success());
    tokio::time::sleep(RECORD_TTL).await;
    // The version is compiled in this worker, and still refused.
    let id = enqueue(&broker, "acme", "echo", json!({"mode": "echo"}), 1).await;
    let failure = dead(&broker, "acme", &id[0]).await;
    assert_eq!(failure.category, Category::InvalidComponent, "{failure}");
    assert!(
        failure.message.contains(&format!(
            "component is {:.1} MiB ({} bytes), over tenant \"acme\"'s cap of 0.1 MiB (102400 bytes)",
            bytes.len() as f64 / f64::from(1 << 20),
            bytes.len()
        )),
        "{failure}"
    );
    stop.send(()).unwrap();
    running.await.unwrap();

    // A worker that never saw it refuses it without fetching or compiling.
    let (stop, running, fresh) = worker(&broker, "acme", 4, |_| {});
    let id = enqueue(&broker, "acme", "echo", json!({"mode": "echo"}), 1).await;
    assert_eq!(
        dead(&broker, "acme", &id[0]).await.category,
        Category::InvalidComponent
    );
    assert_eq!(fresh.compile_stats(), CompileStats::default());
    stop.send(()).unwrap();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_default_cap_applies_to_tenants_without_one() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    // No tenant record: the engine's default cap (64 MiB) lets it deploy.
    broker
        .deploy(
            "plain",
            "noop",
            &guest_bytes("noop"),
            &TaskPolicy::default(),
        )
        .await
        .unwrap();
    let (stop, running, sandbox) = worker(&broker, "plain", 4, |c| {
        c.default_max_component_bytes = 64 << 10;
    });
    let id = enqueue(&broker, "plain", "noop", json!({}), 1).await;
    let failure = dead(&broker, "plain", &id[0]).await;
    assert_eq!(failure.category, Category::InvalidComponent);
    assert!(
        failure.message.contains("over the engine's default cap of 0.1 MiB (65536 bytes) for tenants without a cap of their own"),
        "{failure}"
    );
    assert!(
        failure
            .message
            .contains("wasmq tenant create plain --max-component"),
        "{failure}"
    );
    assert_eq!(sandbox.compile_stats(), CompileStats::default());
    stop.send(()).unwrap();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_gives_up_past_the_compile_budget() {
    let redis = RedisServer::start();
    let dir = TempDir::new("slow");
    let slow = dir.path().join("slow.wasm");
    std::fs::write(&slow, slow_to_compile(SLOW_FUNCTIONS, "deploy")).unwrap();
    let started = Instant::now();
    let out = wasmq_cached(
        &redis.url,
        "default",
        &[
            "deploy",
            slow.to_str().unwrap(),
            "--name",
            "slow",
            "--compile-budget",
            "200ms",
        ],
        dir.path(),
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("deploy refused the slow component after {took:?}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: invalid-component: compiling took longer than 200ms"),
        "{stderr}"
    );
    let broker = Broker::connect(&redis.url).await.unwrap();
    assert!(broker.task("default", "slow").await.unwrap().is_none());
    assert!(
        !dir.path().join("compiled").exists()
            || std::fs::read_dir(dir.path().join("compiled"))
                .unwrap()
                .count()
                == 0,
        "nothing of the abandoned compile is cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_past_its_budget_is_refused_remembered_and_survived() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let policy = TaskPolicy::default();
    broker
        .deploy("default", "noop", &guest_bytes("noop"), &policy)
        .await
        .unwrap();
    let slow = slow_to_compile(SLOW_FUNCTIONS, "budget");
    broker
        .deploy("default", "slow", &slow, &policy)
        .await
        .unwrap();
    let cache = TempDir::new("budget-cache");
    let (stop, running, sandbox) = worker(&broker, "default", 8, |c| {
        // Enough for noop, a small part of the slow component.
        c.compile_budget = Duration::from_millis(700);
        c.cache_dir = Some(cache.path().to_path_buf());
    });
    let id = enqueue(&broker, "default", "noop", json!({}), 1).await;
    assert!(matches!(
        ended(&broker, "default", &id[0]).await,
        ResultState::Ready(_)
    ));

    // Three jobs of the slow version at once: one compile, three refusals.
    let slow_ids = enqueue(&broker, "default", "slow", json!({}), 3).await;
    for id in &slow_ids {
        let failure = dead(&broker, "default", id).await;
        assert_eq!(failure.category, Category::InvalidComponent, "{failure}");
        assert!(
            failure
                .message
                .starts_with("compiling took longer than 700ms"),
            "{failure}"
        );
    }
    let stats = sandbox.compile_stats();
    assert_eq!((stats.compiled, stats.refused), (2, 1), "{stats:?}");

    // Remembered: a later job fails without compiling again.
    let later = Instant::now();
    let id = enqueue(&broker, "default", "slow", json!({}), 1).await;
    let failure = dead(&broker, "default", &id[0]).await;
    assert!(
        failure.message.starts_with("compiling took longer than"),
        "{failure}"
    );
    println!(
        "a later job of the refused version was dead-lettered in {:?}; compiles still running: {}",
        later.elapsed(),
        sandbox.compile_stats().running
    );
    assert_eq!(sandbox.compile_stats().compiled, 2);

    // The worker keeps serving other tasks, abandoned compile or not.
    let ids = enqueue(&broker, "default", "noop", json!({}), 20).await;
    for id in &ids {
        assert!(matches!(
            ended(&broker, "default", id).await,
            ResultState::Ready(_)
        ));
    }
    // The abandoned compile runs to its end and leaves nothing on disk.
    wait_for_stats(&sandbox, |s| s.running == 0).await;
    let cached: Vec<String> = std::fs::read_dir(cache.path().join("compiled"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "only noop is cached: {cached:?}");
    assert!(!cached[0].starts_with(&wasmq::component::content_hash(&slow)));
    stop.send(()).unwrap();
    let stats = running.await.unwrap();
    assert_eq!(stats.completed, 25, "{stats:?}");
}

/// `JOBS` noop jobs at `PER_SEC`, enqueued from a runtime of their own (so
/// a worker that starves this test's runtime cannot slow the producer
/// down instead of its jobs); their e2e latencies.
async fn noop_latencies(broker: &Broker, url: &str) -> Vec<f64> {
    const JOBS: usize = 300;
    const PER_SEC: u64 = 300;
    let url = url.to_string();
    let ids = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let producer = Broker::connect(&url).await.unwrap();
            paced(&producer, "default", "noop", JOBS, PER_SEC).await
        })
    })
    .await
    .unwrap();
    latencies(broker, "default", &ids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tasks_keep_running_while_slow_compiles_run() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let policy = TaskPolicy::default();
    broker
        .deploy("default", "noop", &guest_bytes("noop"), &policy)
        .await
        .unwrap();
    // Two slow versions at once: were compiles on the runtime's threads,
    // they would take both of them.
    for name in ["slow-a", "slow-b"] {
        let slow = slow_to_compile(SLOW_FUNCTIONS, name);
        broker
            .deploy("default", name, &slow, &policy)
            .await
            .unwrap();
    }
    let (stop, running, sandbox) = worker(&broker, "default", 32, |_| {});

    // Warm up: noop compiled, connections made.
    latencies(
        &broker,
        "default",
        &paced(&broker, "default", "noop", 50, 500).await,
    )
    .await;
    let alone = noop_latencies(&broker, &redis.url).await;

    let mut slow_jobs = Vec::new();
    for name in ["slow-a", "slow-b"] {
        slow_jobs.extend(enqueue(&broker, "default", name, json!({}), 1).await);
    }
    wait_for_stats(&sandbox, |s| s.running == 2).await;
    let compiling = Instant::now();
    let beside = noop_latencies(&broker, &redis.url).await;
    let overlapped = sandbox.compile_stats().running == 2;
    let window = compiling.elapsed();

    // The slow components compile within the default budget and are then
    // refused for what they are: not tasks.
    for id in &slow_jobs {
        let failure = dead(&broker, "default", id).await;
        assert!(
            failure
                .message
                .contains("does not implement the wasmq:task world"),
            "{failure}"
        );
    }
    let compile_took = compiling.elapsed();
    println!(
        "noop p50/p99 alone {:.2}/{:.2} ms, beside two compiles ({:.1}s) {:.2}/{:.2} ms ({:.1}x p99); \
         measured for {window:?} of them",
        p50(&alone),
        p99(&alone),
        compile_took.as_secs_f64(),
        p50(&beside),
        p99(&beside),
        p99(&beside) / p99(&alone),
    );
    assert!(
        overlapped,
        "the compiles ended before the jobs did: the test proved nothing"
    );
    // Starved (compiles holding the runtime's threads), jobs wait seconds;
    // the floor keeps a loaded machine's noise from failing the test.
    let bound = (5.0 * p99(&alone)).max(150.0);
    assert!(
        p99(&beside) <= bound,
        "noop p99 {:.2} ms beside two compiles, over {bound:.2} ms",
        p99(&beside)
    );
    stop.send(()).unwrap();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_of_a_new_version_compile_once() {
    const JOBS: usize = 16;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let fresh = unique_version(&guest_bytes("noop"), "once");
    broker
        .deploy("default", "fresh", &fresh, &TaskPolicy::default())
        .await
        .unwrap();
    // Queued before the worker starts, so it fetches them together.
    let ids = enqueue(&broker, "default", "fresh", json!({}), JOBS).await;
    let (stop, running, sandbox) = worker(&broker, "default", JOBS, |_| {});
    for id in &ids {
        assert!(matches!(
            ended(&broker, "default", id).await,
            ResultState::Ready(_)
        ));
    }
    let stats = sandbox.compile_stats();
    assert_eq!((stats.compiled, stats.loaded), (1, 0), "{stats:?}");
    stop.send(()).unwrap();
    assert_eq!(running.await.unwrap().completed, JOBS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_loads_compiled_code_from_disk() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let fresh = unique_version(&guest_bytes("noop"), "restart");
    broker
        .deploy("default", "fresh", &fresh, &TaskPolicy::default())
        .await
        .unwrap();
    let cache = TempDir::new("restart-cache");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (stop, running, sandbox) = worker(&broker, "default", 4, |c| {
            c.cache_dir = Some(cache.path().to_path_buf());
        });
        let id = enqueue(&broker, "default", "fresh", json!({}), 1).await;
        assert!(matches!(
            ended(&broker, "default", &id[0]).await,
            ResultState::Ready(_)
        ));
        stop.send(()).unwrap();
        running.await.unwrap();
        let stats = sandbox.compile_stats();
        seen.push((stats.compiled, stats.loaded));
    }
    assert_eq!(seen, [(1, 0), (0, 1)], "compiled once, then loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_over_the_engine_limits_is_refused_at_deploy_and_runs_under_raised_ones() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    let broker = Broker::connect(&url).await.unwrap();
    let cache = TempDir::new("limits-cache");
    // The Rust noop has 3 core instances: over a limit of 2, under the
    // default (200).
    let dir = TempDir::new("limits");
    let file = dir.path().join("noop.wasm");
    std::fs::write(&file, unique_version(&guest_bytes("noop"), "limits")).unwrap();
    let deploy = |flags: &[&str]| {
        let args = [
            &["deploy", file.to_str().unwrap(), "--name", "n"][..],
            flags,
        ]
        .concat();
        wasmq_cached(&url, "default", &args, cache.path())
    };

    let out = deploy(&["--max-core-instances", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: invalid-component: component is over the engine's limits"),
        "{stderr}"
    );
    for needle in [
        "3 core module instances",
        "maximum of 2",
        "this engine allows 2 core instances",
        "wasmq worker --max-core-instances N",
    ] {
        assert!(stderr.contains(needle), "{stderr} should name {needle}");
    }
    assert!(broker.task("default", "n").await.unwrap().is_none());
    assert!(
        !cache.path().join("compiled").exists(),
        "nothing a refused compile made is cached"
    );

    // Under the defaults it deploys, and a worker with them runs it.
    let out = deploy(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (stop, running, _) = worker(&broker, "default", 2, |_| {});
    let id = enqueue(&broker, "default", "n", json!({}), 1).await;
    assert!(matches!(
        ended(&broker, "default", &id[0]).await,
        ResultState::Ready(_)
    ));
    stop.send(()).unwrap();
    running.await.unwrap();

    // A worker started with lower limits than deploy checked refuses its
    // jobs the same way, naming the limit.
    let (stop, running, _) = worker(&broker, "default", 2, |c| {
        c.component_limits.core_instances = 2;
    });
    let id = enqueue(&broker, "default", "n", json!({}), 1).await;
    let failure = dead(&broker, "default", &id[0]).await;
    assert_eq!(failure.category, Category::InvalidComponent, "{failure}");
    assert!(
        failure.message.contains("3 core module instances")
            && failure.message.contains("--max-core-instances"),
        "{failure}"
    );
    stop.send(()).unwrap();
    running.await.unwrap();
}

/// Each limit a component can exceed, with wasmtime's words for it: they
/// are what `component::LIMIT_REFUSALS` matches to name the flag, so a
/// wasmtime that rewords one fails here.
#[test]
fn each_engine_limit_is_named_with_its_flag() {
    let two_memories = wat::parse_str(
        "(component (core module $m (memory 1))
           (core instance (instantiate $m)) (core instance (instantiate $m)))",
    )
    .unwrap();
    let noop = guest_bytes("noop");
    let defaults = ComponentLimits::default();
    let cases = [
        (
            &noop,
            ComponentLimits {
                core_instances: 1,
                ..defaults
            },
            "--max-core-instances",
        ),
        (
            &two_memories,
            ComponentLimits {
                memories: 1,
                ..defaults
            },
            "--max-memories",
        ),
        (
            &noop,
            ComponentLimits {
                tables: 1,
                ..defaults
            },
            "--max-tables",
        ),
        (
            &noop,
            ComponentLimits {
                table_elements: 10,
                ..defaults
            },
            "--max-table-elements",
        ),
    ];
    for (bytes, limits, flag) in cases {
        let engine = build_engine(&EngineLimits {
            instance_slots: 1,
            component: limits,
            ..EngineLimits::default()
        })
        .unwrap();
        let sandbox = Sandbox::new(engine, CompiledCache::new(None).with_limits(limits)).unwrap();
        let failure = sandbox.prepare(bytes).err().expect("over a limit");
        assert_eq!(failure.category, Category::InvalidComponent);
        assert!(
            failure.message.contains("over the engine's limits")
                && failure.message.contains(&format!("wasmq worker {flag} N")),
            "{flag}: {failure}"
        );
    }
}

#[test]
fn the_compiled_cache_is_keyed_by_the_engine_limits() {
    let cache = TempDir::new("limits-key");
    let bytes = guest_bytes("noop");
    let prepare = |limits: ComponentLimits| {
        let engine = build_engine(&EngineLimits {
            instance_slots: 1,
            component: limits,
            ..EngineLimits::default()
        })
        .unwrap();
        let sandbox = Sandbox::new(
            engine,
            CompiledCache::new(Some(cache.path().to_path_buf())).with_limits(limits),
        )
        .unwrap();
        sandbox.prepare(&bytes).unwrap();
        sandbox.compile_stats()
    };
    let defaults = ComponentLimits::default();
    let raised = ComponentLimits {
        core_instances: defaults.core_instances * 2,
        ..defaults
    };
    assert_eq!(prepare(defaults).compiled, 1);
    assert_eq!(prepare(defaults).loaded, 1, "same limits: loaded");
    assert_eq!(prepare(raised).compiled, 1, "other limits: compiled anew");
    let artifacts = std::fs::read_dir(cache.path().join("compiled"))
        .unwrap()
        .count();
    assert_eq!(artifacts, 2, "one artifact per set of limits");
}
