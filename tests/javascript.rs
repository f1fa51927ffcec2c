//! A task in JavaScript: tasks/hello-js, built by componentize-js into
//! target/guests/js/hello-js.wasm (`make js-guests`), in the sandbox with
//! the default engine limits and through Redis with a worker. Each test
//! prints a skip naming `make js-guests` when the component is not built.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use common::sandbox::{failure, job, success};
use common::workers::{in_process_config, start_configured};
use serde_json::json;
use wasmq::backend::memory::MemoryBackend;
use wasmq::broker::{Broker, ResultState};
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, EngineLimits, DEFAULT_MAX_COMPONENT_BYTES};
use wasmq::failure::Category;
use wasmq::policy::TaskPolicy;
use wasmq::sandbox::{JobOutcome, PreparedTask, Sandbox};

const TENANT: &str = "acme";

/// The built component's bytes, or `None` (having said why) when it is not
/// built.
fn hello_js() -> Option<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guests/js/hello-js.wasm");
    if !path.exists() {
        println!(
            "skipped: {} is not built; build it with `make js-guests` \
             (node and npm; installs the pinned componentize-js into .node/)",
            path.display()
        );
        return None;
    }
    Some(std::fs::read(&path).unwrap())
}

/// The task's own manifest, as `wasmq deploy --manifest` reads it.
fn manifest() -> TaskPolicy {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tasks/hello-js/task.toml");
    TaskPolicy::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A sandbox with every engine limit at its default (the worker's and
/// `wasmq deploy`'s), compiling into the tests' shared disk cache:
/// compiling the 12 MB component costs seconds of CPU, loading it far less.
fn default_sandbox() -> Sandbox {
    Sandbox::new(
        build_engine(&EngineLimits::default()).unwrap(),
        CompiledCache::new(Some(common::shared_cache_dir())),
    )
    .unwrap()
}

async fn greet(
    sb: &Sandbox,
    task: &PreparedTask,
    backend: &Arc<MemoryBackend>,
    payload: &str,
) -> JobOutcome {
    sb.run(task, &job(payload), &manifest().sandbox, backend.clone())
        .await
}

/// The component fits the default size cap and engine limits, greets,
/// counts each name once across jobs sharing one store, and logs the line
/// through the log interface; within the fuel its manifest grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_js_greets_and_counts_each_name_once() {
    let Some(bytes) = hello_js() else { return };
    assert!(
        (bytes.len() as u64) < DEFAULT_MAX_COMPONENT_BYTES,
        "hello-js is {} bytes, over the default component cap of {}",
        bytes.len(),
        DEFAULT_MAX_COMPONENT_BYTES
    );
    let sb = default_sandbox();
    let task = sb.prepare(&bytes).unwrap();
    let backend = Arc::new(MemoryBackend::new());

    let ada = greet(&sb, &task, &backend, r#"{"name": "Ada"}"#).await;
    assert_eq!(
        success(&ada),
        json!({"greeting": "hello Ada", "greeted": 1})
    );
    assert!(
        ada.log
            .contains("greeted Ada; 1 distinct names so far (attempt 1)"),
        "the log line is missing: {}",
        ada.log
    );
    println!(
        "hello-js: {} bytes, fuel {}, peak memory {} bytes, {} us",
        bytes.len(),
        ada.usage.fuel,
        ada.usage.peak_memory_bytes,
        ada.usage.wall_time_us
    );

    let again = greet(&sb, &task, &backend, r#"{"name": "Ada"}"#).await;
    assert_eq!(
        success(&again),
        json!({"greeting": "hello Ada", "greeted": 1}),
        "a second job for the same name counts it once"
    );
    let grace = greet(&sb, &task, &backend, r#"{"name": "Grace"}"#).await;
    assert_eq!(
        success(&grace),
        json!({"greeting": "hello Grace", "greeted": 2})
    );
    assert_eq!(
        ada.usage.fuel, again.usage.fuel,
        "same code, same input: same fuel"
    );
}

/// JSON payloads without a usable name end `bad-payload` with the task's
/// own message (the host refuses non-JSON before the task runs); a name the host refuses fails the job with the host's error,
/// read in JavaScript from the thrown error's payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_js_refuses_bad_payloads_and_fails_on_a_refused_name() {
    let Some(bytes) = hello_js() else { return };
    let sb = default_sandbox();
    let task = sb.prepare(&bytes).unwrap();
    let backend = Arc::new(MemoryBackend::new());

    for payload in [
        r#"{"name": 7}"#,
        r#"{"name": ["Ada"]}"#,
        r#"{"name": ""}"#,
        r#"{"nom": "Ada"}"#,
        "[]",
        "null",
        "\"Ada\"",
    ] {
        let outcome = greet(&sb, &task, &backend, payload).await;
        let (category, message) = failure(&outcome);
        assert_eq!(category, Category::BadPayload, "{payload}: {message}");
        assert_eq!(
            message, r#"expected {"name": "..."} with a non-empty string name"#,
            "the task's own message, for {payload}"
        );
    }

    let long = json!({"name": "x".repeat(600)}).to_string();
    let (category, message) = failure(&greet(&sb, &task, &backend, &long).await);
    assert_eq!(category, Category::TaskError, "{message}");
    assert!(
        message.starts_with("counter.incr-once invalid: "),
        "the host's `invalid` reaches the task: {message}"
    );

    let (category, _) = failure(&greet(&sb, &task, &backend, "{}").await);
    assert_eq!(category, Category::BadPayload);
    let after = greet(&sb, &task, &backend, r#"{"name": "Ada"}"#).await;
    assert_eq!(success(&after)["greeted"], 1, "failed jobs counted nothing");
}

/// Deployed with its manifest to a real Redis and run by a worker: two jobs
/// for one name count it once (the counter lives in Redis), the log line is
/// in the job's status, a bad payload is dead-lettered as `bad-payload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_js_runs_through_redis_with_a_worker() {
    let Some(bytes) = hello_js() else { return };
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    broker
        .deploy(TENANT, "hello-js", &bytes, &manifest())
        .await
        .unwrap();
    let mut config = in_process_config(&broker, TENANT, 2, Duration::from_secs(30), "w");
    config.cache_dir = Some(common::shared_cache_dir());
    let (stop, worker, _) = start_configured(config);

    let wait = Duration::from_secs(120);
    let mut results = Vec::new();
    let mut first = None;
    for name in ["Ada", "Ada", "Grace"] {
        let (id, state) = common::jobs::enqueue_and_wait(
            &broker,
            TENANT,
            "hello-js",
            json!({"name": name}),
            wait,
        )
        .await;
        match state {
            ResultState::Ready(result) => results.push(result),
            other => panic!("{name}: {other:?}"),
        }
        first.get_or_insert(id);
    }
    assert_eq!(
        results,
        vec![
            json!({"greeting": "hello Ada", "greeted": 1}),
            json!({"greeting": "hello Ada", "greeted": 1}),
            json!({"greeting": "hello Grace", "greeted": 2}),
        ]
    );
    let status = broker
        .status(TENANT, &first.unwrap())
        .await
        .unwrap()
        .unwrap();
    let log = status.log.unwrap_or_default();
    assert!(
        log.contains("greeted Ada; 1 distinct names so far (attempt 1)"),
        "the log line is missing from the job's status: {log}"
    );

    let (_, state) =
        common::jobs::enqueue_and_wait(&broker, TENANT, "hello-js", json!({"nom": "Ada"}), wait)
            .await;
    match state {
        ResultState::Failed(f) => {
            assert_eq!(f.category, Category::BadPayload, "{f}");
            assert!(f.message.contains("non-empty string name"), "{f}");
        }
        other => panic!("expected bad-payload, got {other:?}"),
    }

    stop.send(()).unwrap();
    let stats = worker.await.unwrap();
    assert_eq!(
        (stats.succeeded, stats.dead, stats.retried),
        (3, 1, 0),
        "{stats:?}"
    );
}
