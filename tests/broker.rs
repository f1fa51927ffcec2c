//! The broker and worker against a real redis-server (one per test, on a
//! free port) and real compiled components: the seed scenario, retries and
//! the dead-letter queue, poison messages, delayed jobs, crash recovery.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::time::{Duration, Instant};

use common::guest_bytes;
use common::http::{Reply, TestServer};
use common::redis::RedisServer;
use common::workers::KillOnDrop;
use serde_json::json;
use wasmq::broker::{Broker, EnqueueRequest, ResultState};
use wasmq::failure::Category;
use wasmq::keys::Keys;
use wasmq::policy::{RetryPolicy, TaskPolicy};

const TENANT: &str = "acme";

/// Start an in-process worker; stop it by sending on the returned channel.
fn start_worker(
    broker: &Broker,
    concurrency: usize,
    lease: Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
) {
    let id = format!("test-{}", uuid::Uuid::new_v4().simple());
    common::workers::start_in_process(broker, TENANT, concurrency, lease, &id)
}

fn request(task: &str, payload: serde_json::Value) -> EnqueueRequest {
    EnqueueRequest {
        tenant: TENANT.into(),
        task: task.into(),
        payload,
        store_result: Some(true),
        ..EnqueueRequest::default()
    }
}

/// A private redis-server and a broker on it with `task` (a guest of the
/// same name) deployed under the default policy.
async fn broker_with(task: &str) -> (RedisServer, Broker) {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    broker
        .deploy(TENANT, task, &guest_bytes(task), &TaskPolicy::default())
        .await
        .unwrap();
    (redis, broker)
}

/// The names of a job's history events, oldest first.
fn event_names(status: &wasmq::broker::JobStatus) -> Vec<&str> {
    status
        .history
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?"))
        .collect()
}

async fn wait_result(broker: &Broker, id: &str) -> ResultState {
    broker
        .result(TENANT, id, Some(Duration::from_secs(30)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_sends_exactly_one_welcome_email() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    // The mail API is down for its first request.
    let mail = TestServer::start(|_, n| {
        if n == 1 {
            Reply::status(503)
        } else {
            Reply::ok("{}")
        }
    })
    .await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![mail.authority()];
    policy.retry = RetryPolicy {
        backoff_base: Duration::from_millis(50),
        auto_retry_kinds: vec!["mail-api".into(), "network".into()],
        ..RetryPolicy::default()
    };
    broker
        .deploy(TENANT, "onboard", &guest_bytes("onboard"), &policy)
        .await
        .unwrap();
    let (stop, worker) = start_worker(&broker, 4, Duration::from_secs(10));

    let payload = json!({"user_id": 7, "mail_api": mail.url("/send")});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut req = request("onboard", payload.clone());
        req.idempotency_key = Some("onboard-user-7".into());
        ids.push(broker.enqueue(req).await.unwrap());
    }
    assert!(!ids[0].duplicate && ids[1].duplicate && ids[2].duplicate);
    assert!(
        ids.iter().all(|e| e.id == ids[0].id),
        "duplicates map to the first job"
    );
    match wait_result(&broker, &ids[0].id).await {
        ResultState::Ready(v) => assert_eq!(v["user_id"], 7),
        other => panic!("expected a result, got {other:?}"),
    }
    // Once it has succeeded, a new enqueue with the key returns the stored
    // result without running the guest.
    let mut again = request("onboard", payload.clone());
    again.idempotency_key = Some("onboard-user-7".into());
    assert!(broker.enqueue(again).await.unwrap().duplicate);
    // A job without the key still finds the step done: no second email.
    let fresh = broker.enqueue(request("onboard", payload)).await.unwrap();
    assert!(matches!(
        wait_result(&broker, &fresh.id).await,
        ResultState::Ready(_)
    ));

    assert_eq!(
        mail.count("/send"),
        2,
        "one failed request, then exactly one email"
    );
    let status = broker.status(TENANT, &ids[0].id).await.unwrap().unwrap();
    assert_eq!(status.attempts, 2, "the 503 cost one retry: {status:?}");
    let events = event_names(&status);
    assert_eq!(
        events,
        ["enqueued", "started", "retry", "started", "succeeded"],
        "{:?}",
        status.history
    );
    let times: Vec<u64> = status
        .history
        .iter()
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in order: {times:?}"
    );
    // Usage is metered per tenant: three guest runs (two attempts of the
    // first job, one of the keyless one).
    let usage = broker.usage(TENANT).await.unwrap();
    assert_eq!(usage.get("runs"), Some(&3), "{usage:?}");
    assert!(
        usage["fuel"] > 0
            && usage["wall_time_us"] >= usage["run_time_us"]
            && usage["run_time_us"] > 0
            && usage["memory_byte_seconds"] > 0,
        "{usage:?}"
    );
    // Outbound bytes are metered per job and summed per tenant (the exact
    // counts are checked in tests/http_policy.rs).
    let job_usage = status.usage.clone().expect("a finished job has usage");
    let (out, inn) = (
        job_usage["net_out_bytes"].as_u64().unwrap(),
        job_usage["net_in_bytes"].as_u64().unwrap(),
    );
    assert!(out > 0 && inn > 0, "{job_usage}");
    assert!(
        usage["net_out_bytes"] > out && usage["net_in_bytes"] > inn,
        "the tenant's totals include both runs that sent mail: {usage:?}"
    );
    stop.send(()).unwrap();
    worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_backoff_then_dead_letter_and_dead_retry_runs_again() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut policy = TaskPolicy::default();
    policy.retry = RetryPolicy {
        max_attempts: 3,
        backoff_base: Duration::from_millis(300),
        backoff_max: Duration::from_secs(5),
        jitter: false,
        auto_retry_kinds: vec![],
        ..RetryPolicy::default()
    };
    policy.sandbox.timeout = Duration::from_millis(200);
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    let (stop, worker) = start_worker(&broker, 2, Duration::from_secs(10));

    // Compile the component first, so attempt 1 is not slowed by it.
    let warm = broker
        .enqueue(request("hostile", json!({"mode": "echo"})))
        .await
        .unwrap();
    assert!(matches!(
        wait_result(&broker, &warm.id).await,
        ResultState::Ready(_)
    ));
    // Times out every attempt (a transient category): 3 attempts, backoff
    // 300 ms then 600 ms, then the dead-letter queue.
    let job = broker
        .enqueue(request("hostile", json!({"mode": "sleep", "ms": 5000})))
        .await
        .unwrap();
    match wait_result(&broker, &job.id).await {
        ResultState::Failed(f) => {
            assert_eq!(f.category, Category::RetryExhausted);
            assert!(f.message.contains("timeout"), "{}", f.message);
        }
        other => panic!("expected failure, got {other:?}"),
    }
    let status = broker.status(TENANT, &job.id).await.unwrap().unwrap();
    assert_eq!(status.attempts, 3);
    let starts: Vec<u64> = status
        .history
        .iter()
        .filter(|e| e["event"] == "started")
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(starts.len(), 3, "{:?}", status.history);
    // Each gap = the 200 ms timeout + the backoff; tolerance for scheduling.
    for (gap, backoff) in starts.windows(2).map(|w| w[1] - w[0]).zip([300u64, 600]) {
        assert!(
            gap >= 200 + backoff - 20 && gap <= 200 + backoff + 700,
            "gap {gap} ms for backoff {backoff} ms"
        );
    }
    let dead = broker.dead_list(TENANT, 10).await.unwrap();
    assert_eq!(dead.len(), 1);

    // Permanent categories go to the dead-letter queue directly (a task of
    // its own: under the 200 ms timeout above, a loaded machine can time
    // the memory bomb out before it reaches the cap).
    broker
        .deploy(
            TENANT,
            "bomb",
            &guest_bytes("hostile"),
            &TaskPolicy::default(),
        )
        .await
        .unwrap();
    let spin = broker
        .enqueue(request("bomb", json!({"mode": "memory-bomb"})))
        .await
        .unwrap();
    match wait_result(&broker, &spin.id).await {
        ResultState::Failed(f) => assert_eq!(f.category, Category::MemoryLimit),
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(
        broker
            .status(TENANT, &spin.id)
            .await
            .unwrap()
            .unwrap()
            .attempts,
        1
    );

    // `dead retry` runs it again with fresh attempts.
    assert!(broker.dead_retry(TENANT, &job.id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = broker.status(TENANT, &job.id).await.unwrap().unwrap();
    assert!(status.history.iter().any(|e| e["event"] == "dead-retry"));
    assert!(
        status.state == "active"
            || status.state == "scheduled"
            || status.state == "queued"
            || status.state == "dead"
    );
    stop.send(()).unwrap();
    worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_worker_goes_on() {
    let (redis, broker) = broker_with("noop").await;
    let keys = Keys::new(TENANT);
    let mut conn = redis.connect().await;
    // Pushed straight into Redis: garbage, a future version, an unknown task.
    let poison = [
        ("garbage", "this is not json".to_string()),
        ("v9", json!({"v": 9, "id": "v9", "tenant": TENANT, "task": "noop", "queue": "default", "payload": {}}).to_string()),
        ("ghost", json!({"v": 1, "id": "ghost", "tenant": TENANT, "task": "ghost", "queue": "default", "payload": {}}).to_string()),
    ];
    for (id, envelope) in &poison {
        redis::pipe()
            .hset_multiple(
                keys.job(id),
                &[
                    ("envelope", envelope.as_str()),
                    ("state", "queued"),
                    ("score", "1"),
                ],
            )
            .zadd(keys.ready("default"), *id, 1)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    // An id in the queue with no job record at all.
    redis::cmd("ZADD")
        .arg(keys.ready("default"))
        .arg(1)
        .arg("no-record")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (stop, worker) = start_worker(&broker, 4, Duration::from_secs(10));
    let good = broker.enqueue(request("noop", json!({}))).await.unwrap();
    assert_eq!(
        wait_result(&broker, &good.id).await,
        ResultState::Ready(json!({"ok": true}))
    );
    for (id, expected) in [
        ("garbage", Category::BadPayload),
        ("v9", Category::BadPayload),
        ("ghost", Category::UnknownTask),
    ] {
        match wait_result(&broker, id).await {
            ResultState::Failed(f) => assert_eq!(f.category, expected, "{id}: {}", f.message),
            other => panic!("{id}: expected dead-lettered, got {other:?}"),
        }
    }
    assert_eq!(broker.dead_list(TENANT, 10).await.unwrap().len(), 3);
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// A job whose worker dies on every delivery (here: a "worker" that fetches
/// and never renews) is dead-lettered once its lease has lapsed its task's
/// `max_deliveries` times, with a reason naming the workers that lost it;
/// its history shows every lapsed delivery, no attempt was used, and a
/// `result --wait` caller is woken by it rather than by its own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_every_worker_is_dead_lettered_as_poison() {
    use wasmq::broker::LeaseTerms;
    const LIMIT: u32 = 3;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut policy = TaskPolicy::default();
    policy.retry.max_deliveries = LIMIT;
    broker
        .deploy(TENANT, "noop", &guest_bytes("noop"), &policy)
        .await
        .unwrap();
    let id = broker.enqueue(request("noop", json!({}))).await.unwrap().id;
    let terms = LeaseTerms {
        worker: "doomed",
        lease: Duration::from_millis(1),
        // The job carries its task's limit; this default is for jobs that
        // do not.
        max_deliveries: 1000,
        cluster_cap: None,
        rate_limit: None,
    };
    for delivery in 1..=LIMIT {
        let got = broker.fetch(TENANT, "default", 10, terms).await.unwrap();
        assert_eq!(got.len(), 1, "delivery {delivery}");
        assert_eq!(got[0].attempt, 1, "a lost delivery is not an attempt");
        // The worker "dies": its 1 ms lease lapses unrenewed.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiter = tokio::spawn({
        let (broker, id) = (broker.clone(), id.clone());
        async move {
            let started = Instant::now();
            let state = broker
                .result(TENANT, &id, Some(Duration::from_secs(20)))
                .await
                .unwrap();
            (state, started.elapsed())
        }
    });
    // Let the waiter register before the fetch that gives up on the job.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = broker.fetch(TENANT, "default", 10, terms).await.unwrap();
    assert!(got.is_empty(), "the poison job is not delivered again");
    let (state, waited) = waiter.await.unwrap();
    match state {
        ResultState::Failed(f) => {
            assert!(
                f.message
                    .contains(&format!("its lease lapsed on {LIMIT} deliveries")),
                "{f}"
            );
            assert!(f.message.contains("workers doomed"), "{f}");
        }
        other => panic!("expected the poison verdict, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(5), "woken after {waited:?}");
    let dead = broker.dead_list(TENANT, 10).await.unwrap();
    assert_eq!(dead.iter().map(|(d, _)| d).collect::<Vec<_>>(), [&id]);
    let status = broker.status(TENANT, &id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempts, status.deliveries, status.lost_deliveries),
        (0, LIMIT as u64, LIMIT as u64)
    );
    assert_eq!(status.lost_workers, vec!["doomed"; LIMIT as usize]);
    let events = event_names(&status);
    let lapsed = events.iter().filter(|e| **e == "lease-expired").count();
    assert_eq!(
        (events.first(), events.last(), lapsed),
        (Some(&"enqueued"), Some(&"dead"), LIMIT as usize - 1),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_jobs_wait_even_past_the_lease_and_long_jobs_run_once() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut policy = TaskPolicy::default();
    policy.sandbox.timeout = Duration::from_secs(10);
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    // A 600 ms lease: the countdown and the job are both longer than it.
    let (stop, worker) = start_worker(&broker, 2, Duration::from_millis(600));
    let mut delayed = request("hostile", json!({"mode": "echo"}));
    let enqueued_at = wasmq::broker::now_ms();
    delayed.not_before_ms = Some(enqueued_at + 1500);
    let delayed = broker.enqueue(delayed).await.unwrap();
    let long = broker
        .enqueue(request("hostile", json!({"mode": "sleep", "ms": 2000})))
        .await
        .unwrap();
    assert!(matches!(
        wait_result(&broker, &delayed.id).await,
        ResultState::Ready(_)
    ));
    let status = broker.status(TENANT, &delayed.id).await.unwrap().unwrap();
    assert!(
        status.started_at_ms.unwrap() >= enqueued_at + 1500,
        "started {} ms early",
        enqueued_at + 1500 - status.started_at_ms.unwrap()
    );
    assert!(matches!(
        wait_result(&broker, &long.id).await,
        ResultState::Ready(_)
    ));
    let status = broker.status(TENANT, &long.id).await.unwrap().unwrap();
    assert_eq!(
        status.deliveries, 1,
        "a job longer than its lease keeps it: {:?}",
        status.history
    );
    stop.send(()).unwrap();
    worker.await.unwrap();
}

fn spawn_worker_process(redis_url: &str, concurrency: usize) -> KillOnDrop {
    common::workers::spawn_process(
        redis_url,
        TENANT,
        &["--concurrency", &concurrency.to_string(), "--lease", "2s"],
    )
}

/// kill -9 a worker in the middle of 1,000 slow jobs; a second worker
/// finishes them all, each side effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_jobs_are_finished_by_another_exactly_once() {
    const JOBS: usize = 1000;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    broker
        .deploy(
            TENANT,
            "hostile",
            &guest_bytes("hostile"),
            &TaskPolicy::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..JOBS {
        // Each job bumps its own counter inside a step marker, then sleeps.
        let payload = json!({"mode": "counted-sleep", "counter": format!("job-{i}"), "ms": 100});
        ids.push(
            broker
                .enqueue(request("hostile", payload))
                .await
                .unwrap()
                .id,
        );
    }
    let mut first = spawn_worker_process(&redis.url, 50);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Let it get partway, then kill -9.
    loop {
        let done = count_finished(&broker, &ids).await;
        if done >= JOBS / 5 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let finished_before = count_finished(&broker, &ids).await;
    assert!(finished_before < JOBS, "the kill must land mid-run");
    let mut second = spawn_worker_process(&redis.url, 50);
    while count_finished(&broker, &ids).await < JOBS
        && Instant::now() < deadline + Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(
        count_finished(&broker, &ids).await,
        JOBS,
        "every job completes, none lost"
    );
    let mut conn = redis.connect().await;
    let keys = Keys::new(TENANT);
    for i in 0..JOBS {
        let v: Option<i64> =
            redis::AsyncCommands::get(&mut conn, keys.counter(&format!("job-{i}")))
                .await
                .unwrap();
        assert_eq!(v, Some(1), "job {i}'s side effect applied exactly once");
    }
    println!(
        "killed worker after {finished_before} of {JOBS} jobs; the second worker finished the rest"
    );
}

/// How many of `ids` have succeeded, in one pipelined round trip (a slow
/// count would let the first worker finish everything before the kill).
async fn count_finished(broker: &Broker, ids: &[String]) -> usize {
    let keys = Keys::new(TENANT);
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.hget(keys.job(id), "state");
    }
    let states: Vec<Option<String>> = pipe.query_async(&mut broker.connection()).await.unwrap();
    states
        .iter()
        .filter(|s| s.as_deref() == Some("succeeded"))
        .count()
}
