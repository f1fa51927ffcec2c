//! Delivery when workers die, freeze, drain or lose Redis: kill -9 loops,
//! SIGSTOP past the lease, drains of an embedded worker, replayed outcome
//! batches, idle and failing waits. Real redis-server per test, real
//! components, real worker processes where a process must die.

#![allow(clippy::field_reassign_with_default)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::components::{example_task_bytes, Lang};
use common::guest_bytes;
use common::http::{Reply, TestServer};
use common::jobs::redis_with_task;
use common::redis::RedisServer;
use common::workers::{spawn_process, start_configured, start_in_process, KillOnDrop};
use redis::aio::ConnectionManager;
use serde_json::json;
use wasmq::broker::{
    Broker, Completion, EnqueueRequest, LeaseTerms, Outcome, Recorded, ResultState,
};
use wasmq::failure::Category;
use wasmq::keys::Keys;
use wasmq::launcher::LaunchConfig;
use wasmq::policy::TaskPolicy;
use wasmq::usage::Usage;

const TENANT: &str = "acme";

fn request(task: &str, payload: serde_json::Value) -> EnqueueRequest {
    EnqueueRequest {
        tenant: TENANT.into(),
        task: task.into(),
        payload,
        ..EnqueueRequest::default()
    }
}

async fn enqueue_all(broker: &Broker, task: &str, payloads: &[serde_json::Value]) -> Vec<String> {
    let mut ids = Vec::with_capacity(payloads.len());
    for payload in payloads {
        ids.push(
            broker
                .enqueue(request(task, payload.clone()))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

/// One field of every job record, in one round trip.
async fn fields(conn: &mut ConnectionManager, ids: &[String], field: &str) -> Vec<Option<String>> {
    let keys = Keys::new(TENANT);
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.hget(keys.job(id), field);
    }
    pipe.query_async(conn).await.unwrap()
}

/// Poll until every job of `ids` has succeeded; panics after `limit`
/// naming how many are in each state.
async fn wait_all_succeeded(conn: &mut ConnectionManager, ids: &[String], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let states = fields(conn, ids, "state").await;
        let done = states
            .iter()
            .filter(|s| s.as_deref() == Some("succeeded"))
            .count();
        if done == ids.len() {
            return;
        }
        if Instant::now() > deadline {
            let mut by_state: HashMap<String, usize> = HashMap::new();
            for s in states {
                *by_state.entry(s.unwrap_or_default()).or_default() += 1;
            }
            panic!(
                "{done} of {} jobs succeeded within {limit:?}: {by_state:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Send `signal` (e.g. "-STOP") to process `pid` (kill(1): no libc here).
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Two worker processes on `redis`, one of them killed with SIGKILL (and
/// started again) every `every`, alternately, for `for_how_long`.
async fn kill_loop(
    redis: &str,
    args: &[&str],
    every: Duration,
    for_how_long: Duration,
) -> Vec<KillOnDrop> {
    let mut workers = vec![
        spawn_process(redis, TENANT, args),
        spawn_process(redis, TENANT, args),
    ];
    let until = Instant::now() + for_how_long;
    let mut kills = 0;
    while Instant::now() < until {
        tokio::time::sleep(every).await;
        let victim = kills % 2;
        workers[victim].kill().unwrap();
        workers[victim].wait().unwrap();
        workers[victim] = spawn_process(redis, TENANT, args);
        kills += 1;
    }
    println!("killed a worker with SIGKILL {kills} times");
    workers
}

// ------------------------------------------------------------------- tests

/// The chaos run of issue 10: two workers, a 3 s lease, one worker killed
/// with SIGKILL every 2 s for 30 s, 2,000 jobs of 0.3-2.7 s each bumping
/// their own counter once. Every job succeeds, none is lost or
/// dead-lettered, every counter is exactly 1, and no job used more than
/// one attempt: its workers' deaths are deliveries, not attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_loop_loses_no_job_and_uses_no_attempt() {
    const JOBS: usize = 2000;
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
    let payloads: Vec<_> = (0..JOBS)
        .map(|i| {
            let ms = 300 + (i * 7919) % 2400;
            json!({"mode": "counted-sleep", "counter": format!("job-{i}"), "ms": ms})
        })
        .collect();
    let ids = enqueue_all(&broker, "hostile", &payloads).await;
    let args = ["--concurrency", "150", "--lease", "3s"];
    let started = Instant::now();
    let _workers = kill_loop(
        &redis.url,
        &args,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await;
    let mut conn = redis.connect().await;
    wait_all_succeeded(&mut conn, &ids, Duration::from_secs(180)).await;
    println!(
        "{JOBS} jobs done in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    assert!(
        broker.dead_list(TENANT, 10).await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    let keys = Keys::new(TENANT);
    let mut pipe = redis::pipe();
    for i in 0..JOBS {
        pipe.get(keys.counter(&format!("job-{i}")));
    }
    let counters: Vec<Option<i64>> = pipe.query_async(&mut conn).await.unwrap();
    let wrong: Vec<_> = counters
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != Some(1))
        .collect();
    assert!(
        wrong.is_empty(),
        "side effects not exactly once: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    let attempts = fields(&mut conn, &ids, "attempts").await;
    let more = attempts
        .iter()
        .filter(|a| a.as_deref() != Some("1"))
        .count();
    assert_eq!(more, 0, "{more} jobs used more than one attempt");
    let lost: Vec<u64> = fields(&mut conn, &ids, "lost")
        .await
        .iter()
        .map(|l| l.as_deref().and_then(|l| l.parse().ok()).unwrap_or(0))
        .collect();
    let redelivered = lost.iter().filter(|l| **l > 0).count();
    println!(
        "{redelivered} jobs lost a delivery to a killed worker (most: {}); all succeeded on their first attempt",
        lost.iter().max().unwrap()
    );
    assert!(
        redelivered > 0,
        "the kill loop killed no running job: it proves nothing"
    );
}

/// A job whose workers died twice still gets every attempt its policy
/// allows for a real error, then dies as retry-exhausted: 3 attempts, 2
/// lost deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_died_twice_still_gets_all_its_retries() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut policy = TaskPolicy::default();
    policy.retry.max_attempts = 3;
    policy.retry.backoff_base = Duration::from_millis(50);
    policy.retry.jitter = false;
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    let payload = json!({"mode": "fail", "kind": "network", "message": "the API is down"});
    let id = broker
        .enqueue(request("hostile", payload))
        .await
        .unwrap()
        .id;
    let doomed = LeaseTerms {
        worker: "doomed",
        lease: Duration::from_millis(1),
        max_deliveries: 20,
        cluster_cap: None,
        rate_limit: None,
    };
    for _ in 0..2 {
        let got = broker.fetch(TENANT, "default", 1, doomed).await.unwrap();
        assert_eq!(got.len(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stop, worker) = start_in_process(&broker, TENANT, 2, Duration::from_secs(10), "w");
    match broker
        .result(TENANT, &id, Some(Duration::from_secs(30)))
        .await
        .unwrap()
    {
        ResultState::Failed(f) => {
            assert_eq!(f.category, Category::RetryExhausted, "{f}");
            assert!(f.message.contains("gave up after 3 attempt"), "{f}");
            assert!(f.message.contains("the API is down"), "{f}");
        }
        other => panic!("expected retry-exhausted, got {other:?}"),
    }
    let status = broker.status(TENANT, &id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempts, status.lost_deliveries, status.deliveries),
        (3, 2, 5),
        "{status:?}"
    );
    assert_eq!(status.lost_workers, vec!["doomed", "doomed"]);
    stop.send(()).unwrap();
    let stats = worker.await.unwrap();
    assert_eq!(
        (stats.completed, stats.dead, stats.retried),
        (1, 1, 2),
        "the worker counts one job completed (its outcome), not its three attempts: {stats:?}"
    );
}

/// A mail API that answers in 200 ms, onboarding 300 users while workers
/// are killed every second: every request a step makes carries the step's
/// Idempotency-Key, the same one on every delivery of a user's job, so an
/// API that honours the key sends exactly one email per user. The requests
/// an API that ignores the key would have turned into duplicates are
/// counted and printed (GUIDE.md: exactly once against APIs that honour
/// the key, at least once otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_under_a_kill_loop_sends_one_email_per_user_with_idempotency_keys() {
    onboard_under_a_kill_loop_in(Lang::Rust).await;
}

/// [`onboard_under_a_kill_loop_sends_one_email_per_user_with_idempotency_keys`]
/// with the Python twin of `onboard` (tasks/onboard-py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_under_a_kill_loop_sends_one_email_per_user_with_idempotency_keys_py() {
    onboard_under_a_kill_loop_in(Lang::Python).await;
}

async fn onboard_under_a_kill_loop_in(lang: Lang) {
    const USERS: usize = 300;
    let Some(onboard) = example_task_bytes("onboard", lang) else {
        return;
    };
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    // The mail API: sends an email for a key it has not seen, and answers
    // a repeat with the first answer.
    let emails: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mail = {
        let emails = emails.clone();
        TestServer::start(move |req, _| {
            if let Some(key) = req.header("idempotency-key") {
                emails.lock().unwrap().insert(key.to_string());
            }
            Reply {
                delay: Duration::from_millis(200),
                ..Reply::ok(r#"{"queued":true}"#)
            }
        })
        .await
    };
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![mail.authority()];
    policy.retry.auto_retry_kinds = vec!["network".into(), "mail-api".into()];
    broker
        .deploy(TENANT, "onboard", &onboard, &policy)
        .await
        .unwrap();
    let payloads: Vec<_> = (0..USERS)
        .map(|u| json!({"user_id": u, "mail_api": mail.url("/send")}))
        .collect();
    let ids = enqueue_all(&broker, "onboard", &payloads).await;
    // Few slots, so the 300 users take longer than the kill loop's first
    // kills: each kill lands on requests in flight.
    let args = ["--concurrency", "4", "--lease", "2s"];
    let _workers = kill_loop(
        &redis.url,
        &args,
        Duration::from_secs(1),
        Duration::from_secs(15),
    )
    .await;
    let mut conn = redis.connect().await;
    wait_all_succeeded(&mut conn, &ids, Duration::from_secs(120)).await;

    let mut keys_by_user: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut posts_by_user: HashMap<u64, usize> = HashMap::new();
    for req in mail.requests() {
        let user = req.json()["to_user"]
            .as_u64()
            .expect("the body names the user");
        let key = req
            .header("idempotency-key")
            .expect("a request made inside a step carries the step's key");
        keys_by_user
            .entry(user)
            .or_default()
            .insert(key.to_string());
        *posts_by_user.entry(user).or_default() += 1;
    }
    assert_eq!(
        posts_by_user.len(),
        USERS,
        "every user got an email at least once"
    );
    for (user, keys) in &keys_by_user {
        assert_eq!(
            keys.len(),
            1,
            "user {user}: one key on every delivery, got {keys:?}"
        );
    }
    let honoured = emails.lock().unwrap().len();
    assert_eq!(
        honoured, USERS,
        "an API honouring the key sends one email per user"
    );
    let posts: usize = posts_by_user.values().sum();
    println!(
        "{USERS} users: {posts} POSTs; an API ignoring Idempotency-Key would have sent {} duplicate email(s), one honouring it sent {honoured} emails",
        posts - USERS
    );
    assert!(
        posts > USERS,
        "no kill landed between a POST and its step's record: the test proves nothing"
    );
}

/// A worker frozen (SIGSTOP) past its lease while its jobs sit inside a
/// step, then resumed after another worker finished them: none of its step
/// bodies does its effect after the lease was lost, no outcome is recorded
/// twice, and usage counts each job once (the frozen worker's runs are
/// wasted work, reported apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_does_no_step_after_its_lease_and_is_billed_once() {
    const JOBS: usize = 10;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let effects = TestServer::start(|_, _| Reply::ok("ok")).await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![effects.authority()];
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    let mut frozen = spawn_process(
        &redis.url,
        TENANT,
        &["--concurrency", "16", "--lease", "2s"],
    );
    let payloads: Vec<_> = (0..JOBS)
        .map(|i| {
            json!({"mode": "step-post", "step": format!("effect-{i}"), "url": effects.url("/effect"), "sleep_ms": 2500})
        })
        .collect();
    let ids = enqueue_all(&broker, "hostile", &payloads).await;
    let mut conn = redis.connect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let states = fields(&mut conn, &ids, "state").await;
        if states.iter().all(|s| s.as_deref() == Some("active")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the jobs never all started: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Inside their steps (claimed, sleeping before the effect): freeze.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(frozen.id(), "-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (stop, other) = start_in_process(&broker, TENANT, 16, Duration::from_secs(10), "other");
    wait_all_succeeded(&mut conn, &ids, Duration::from_secs(30)).await;
    assert_eq!(
        effects.count("/effect"),
        JOBS,
        "the other worker did each effect"
    );
    signal(frozen.id(), "-CONT");
    // The frozen guests wake up past their lease: wait until all of their
    // runs have ended (each is refused as wasted work once it does).
    let deadline = Instant::now() + Duration::from_secs(30);
    let usage = loop {
        let usage = broker.usage(TENANT).await.unwrap();
        if usage.get("wasted_runs").copied().unwrap_or(0) >= JOBS as u64 {
            break usage;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen worker's runs were not all refused as wasted: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for req in effects.requests() {
        *per_job
            .entry(req.json()["job"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_job.len(), JOBS);
    assert!(
        per_job.values().all(|n| *n == 1),
        "a step body did its effect after its lease was lost: {per_job:?}"
    );
    println!("usage after the freeze: {usage:?}");
    assert_eq!(
        usage.get("runs"),
        Some(&(JOBS as u64)),
        "billed once per job: {usage:?}"
    );
    assert_eq!(usage.get("wasted_runs"), Some(&(JOBS as u64)), "{usage:?}");
    for id in &ids {
        let status = broker.status(TENANT, id).await.unwrap().unwrap();
        assert_eq!(status.attempts, 1, "{status:?}");
        let successes = status
            .history
            .iter()
            .filter(|e| e["event"] == "succeeded")
            .count();
        assert_eq!(successes, 1, "{status:?}");
    }
    stop.send(()).unwrap();
    other.await.unwrap();
    frozen.kill().unwrap();
}

/// A worker frozen (SIGSTOP) past its lease with no other worker running:
/// nobody reclaimed its job while it was stopped, yet on waking it sends
/// no more requests for that run and records nothing for it (a renewal
/// finds the lease lapsed, by Redis time and by its own clock); the job
/// is delivered again and runs once more from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_stops_its_run_even_if_no_one_reclaimed_it() {
    const TICKS: u64 = 30;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let ticks = TestServer::start(|_, _| Reply::ok("ok")).await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![ticks.authority()];
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    // One slot: a busy worker does not fetch, so on waking nothing of its
    // own reclaims the job first; its renewal is what must say "lapsed".
    let mut worker = spawn_process(&redis.url, TENANT, &["--lease", "2s", "--concurrency", "1"]);
    let payload = json!({"mode": "tick", "url": ticks.url("/tick"), "n": TICKS, "ms": 100});
    let ids = enqueue_all(&broker, "hostile", &[payload]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ticks.count("/tick") < 5 {
        assert!(Instant::now() < deadline, "the job never started ticking");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(worker.id(), "-STOP");
    // A request on the wire when the signal landed still arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ticks.count("/tick") as u64;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    signal(worker.id(), "-CONT");
    let mut conn = redis.connect().await;
    wait_all_succeeded(&mut conn, &ids, Duration::from_secs(30)).await;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for req in ticks.requests() {
        *seen.entry(req.json()["i"].as_u64().unwrap()).or_default() += 1;
    }
    for i in 0..TICKS {
        let expected = if i < before { 2 } else { 1 };
        assert_eq!(
            seen.get(&i).copied().unwrap_or(0),
            expected,
            "tick {i}: the run frozen after tick {before} went on after waking past its lease \
             (ticks seen: {seen:?})"
        );
    }
    let status = broker.status(TENANT, &ids[0]).await.unwrap().unwrap();
    assert_eq!((status.attempts, status.deliveries), (1, 2), "{status:?}");
    let successes = status
        .history
        .iter()
        .filter(|e| e["event"] == "succeeded")
        .count();
    assert_eq!(successes, 1, "{status:?}");
    worker.kill().unwrap();
}

/// An embedded worker (the library launcher) drained while its guests run
/// past the drain timeout: the runs are stopped before their jobs go back,
/// so once `run` returns nothing of them runs any more, and a later worker
/// runs each job once more, to the end, on the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_library_worker_stops_its_guests_before_handing_jobs_back() {
    const JOBS: usize = 4;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let ticks = TestServer::start(|_, _| Reply::ok("ok")).await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![ticks.authority()];
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &policy)
        .await
        .unwrap();
    let payload = json!({"mode": "tick", "url": ticks.url("/tick"), "n": 20, "ms": 100});
    let ids = enqueue_all(&broker, "hostile", &vec![payload; JOBS]).await;
    let mut config = LaunchConfig::new(&redis.url, TENANT, &["default"], 8);
    config.drain_timeout = Duration::from_millis(300);
    config.id = "drained".into();
    config.cache_dir = None;
    let (stop, drained, _) = start_configured(config);
    while ticks.count("/tick") < JOBS * 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    let stats = drained.await.unwrap();
    assert_eq!(stats.released, JOBS as u64, "{stats:?}");
    let at_return = ticks.count("/tick");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ticks.count("/tick"),
        at_return,
        "a guest of the drained worker still ran after `run` returned"
    );
    let mut conn = redis.connect().await;
    for state in fields(&mut conn, &ids, "state").await {
        assert_eq!(state.as_deref(), Some("queued"));
    }
    let (stop, later) = start_in_process(&broker, TENANT, 8, Duration::from_secs(10), "later");
    wait_all_succeeded(&mut conn, &ids, Duration::from_secs(30)).await;
    assert_eq!(ticks.count("/tick"), at_return + JOBS * 20);
    for id in &ids {
        let status = broker.status(TENANT, id).await.unwrap().unwrap();
        assert_eq!((status.attempts, status.deliveries), (1, 2), "{status:?}");
    }
    stop.send(()).unwrap();
    later.await.unwrap();
}

/// Recording the same outcome batch twice (its first reply lost) records
/// and bills it once; an outcome from a delivery that lost its lease is
/// refused and billed as wasted work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_recorded_and_billed_once() {
    let (_redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let id = broker.enqueue(request("noop", json!({}))).await.unwrap().id;
    let terms = LeaseTerms {
        worker: "w",
        lease: Duration::from_secs(30),
        max_deliveries: 20,
        cluster_cap: None,
        rate_limit: None,
    };
    let job = Arc::new(
        broker
            .fetch(TENANT, "default", 1, terms)
            .await
            .unwrap()
            .remove(0),
    );
    assert_eq!(job.id, id);
    let usage = Usage {
        fuel: 5,
        wall_time_us: 1000,
        ..Usage::default()
    };
    let done = Completion {
        job: job.clone(),
        outcome: Outcome::Succeeded {
            result: "{}".into(),
            store: None,
            idempotency_ttl: Duration::from_secs(60),
        },
        usage,
        denials: Vec::new(),
        idempotency_key: None,
        task: "noop".into(),
        enqueued_at_ms: 0,
        log: String::new(),
    };
    assert_eq!(
        broker.complete_many(&[&done]).await.unwrap(),
        [Recorded::Now]
    );
    assert_eq!(
        broker.complete_many(&[&done]).await.unwrap(),
        [Recorded::Before]
    );
    let mut stale = done.clone();
    stale.job = Arc::new(wasmq::broker::Fetched {
        token: "w:0".into(),
        ..(*job).clone()
    });
    assert_eq!(
        broker.complete_many(&[&stale]).await.unwrap(),
        [Recorded::Stale]
    );
    let usage = broker.usage(TENANT).await.unwrap();
    assert_eq!((usage["runs"], usage["fuel"]), (1, 5), "{usage:?}");
    assert_eq!(
        (usage["wasted_runs"], usage["wasted_fuel"]),
        (1, 5),
        "{usage:?}"
    );
}

/// A countdown is measured on the Redis server's clock, from the same
/// reading as the enqueue time: the due time is the enqueue time plus the
/// countdown, exactly, and `status` says when it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_countdown_is_due_exactly_its_length_after_the_enqueue() {
    let (_redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let mut delayed = request("noop", json!({}));
    delayed.countdown = Some(Duration::from_millis(4321));
    let id = broker.enqueue(delayed).await.unwrap().id;
    let status = broker.status(TENANT, &id).await.unwrap().unwrap();
    assert_eq!(status.state, "scheduled");
    assert_eq!(
        status.due_at_ms.unwrap() - status.enqueued_at_ms.unwrap(),
        4321,
        "{status:?}"
    );
    let mut too_far = request("noop", json!({}));
    too_far.countdown = Some(Duration::from_millis(u64::MAX));
    let err = broker.enqueue(too_far).await.unwrap_err();
    assert!(err.to_string().contains("over the limit"), "{err}");
}

/// Idempotency keys follow their job: a pending job holds its key past the
/// result TTL (a countdown longer than the TTL still dedups), a poison job
/// frees it, a job that dies never frees a newer job's key, and `dead
/// retry` resets the job's deliveries in one step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_follow_their_job() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut policy = TaskPolicy::default();
    policy.result_ttl = Duration::from_millis(500);
    policy.retry.max_deliveries = 1;
    broker
        .deploy(TENANT, "noop", &guest_bytes("noop"), &policy)
        .await
        .unwrap();
    let keyed = |key: &str, countdown: Option<Duration>| EnqueueRequest {
        idempotency_key: Some(key.into()),
        countdown,
        ..request("noop", json!({}))
    };
    // Pending past the TTL: still the same job.
    let first = broker
        .enqueue(keyed("later", Some(Duration::from_secs(3))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let again = broker.enqueue(keyed("later", None)).await.unwrap();
    assert!(again.duplicate && again.id == first.id, "{again:?}");

    // A poison job frees its key; the next job takes it; the dead one,
    // retried and dying again, leaves the new job's key alone.
    let poison = broker.enqueue(keyed("k", None)).await.unwrap();
    let doomed = LeaseTerms {
        worker: "doomed",
        lease: Duration::from_millis(1),
        max_deliveries: 20,
        cluster_cap: None,
        rate_limit: None,
    };
    let first = broker.fetch(TENANT, "default", 1, doomed).await.unwrap();
    assert_eq!(first.len(), 1);
    let first_token = first[0].token.clone();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(broker
        .fetch(TENANT, "default", 1, doomed)
        .await
        .unwrap()
        .is_empty());
    let dead = broker.status(TENANT, &poison.id).await.unwrap().unwrap();
    assert_eq!(dead.state, "dead", "{dead:?}");
    let newer = broker.enqueue(keyed("k", None)).await.unwrap();
    assert!(!newer.duplicate, "a poison job frees its key");
    assert!(broker.dead_retry(TENANT, &poison.id).await.unwrap());
    let retried = broker.status(TENANT, &poison.id).await.unwrap().unwrap();
    assert_eq!(
        (
            retried.state.as_str(),
            retried.deliveries,
            retried.lost_deliveries
        ),
        ("queued", 0, 0)
    );
    assert!(
        retried.history.iter().any(|e| e["event"] == "note"),
        "the retried job says it runs without its key: {:?}",
        retried.history
    );
    // Kill the retried job again (it is first in the queue, the newer job
    // second): it dies without touching the newer job's key. Its lease
    // token is new although its deliveries started again from 0: a
    // delivery from before the retry cannot pass for this one.
    let got = broker.fetch(TENANT, "default", 1, doomed).await.unwrap();
    assert_eq!(got[0].id, poison.id);
    assert!(
        got[0].token.starts_with("doomed:1@") && got[0].token != first_token,
        "tokens never repeat: {} after {first_token}",
        got[0].token
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let _ = broker.fetch(TENANT, "default", 0, doomed).await.unwrap();
    let dup = broker.enqueue(keyed("k", None)).await.unwrap();
    assert!(
        dup.duplicate && dup.id == newer.id,
        "the newer job still holds its key: {dup:?}"
    );
}

/// An idle worker keeps the same Redis connections for a minute (it used
/// to open one per idle wait, four a second), and a worker whose blocking
/// waits fail backs off instead of spinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_keeps_its_connections_and_backs_off_when_waits_fail() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let mut admin = redis.connect().await;
    let connections = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let idle = spawn_process(&redis.url, TENANT, &["--concurrency", "4"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = connections(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut admin)
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = connections(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut admin)
            .await
            .unwrap(),
    );
    println!("idle worker: {} new connection(s) in 60 s", after - before);
    assert_eq!(after, before, "an idle worker opened new connections");
    drop(idle);

    // A user that may do everything but wait (BLPOP): every idle wait fails.
    redis::cmd("ACL")
        .arg(&[
            "SETUSER", "noblpop", "on", "nopass", "~*", "&*", "+@all", "-blpop",
        ])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let url = redis.url.replace("redis://", "redis://noblpop:x@");
    let failing = spawn_process(&url, TENANT, &["--concurrency", "4"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = after_name
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f[11] + f[12] // utime + stime, in clock ticks
    };
    let ticks_per_s = 100.0;
    let start = cpu(failing.id());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used = (cpu(failing.id()) - start) as f64 / ticks_per_s / 5.0;
    println!("worker whose waits fail: {:.1}% of a core", used * 100.0);
    assert!(
        used < 0.10,
        "a failing wait spins: {:.0}% of a core",
        used * 100.0
    );
    // It still serves jobs (fetching works; only waiting fails).
    let id = broker.enqueue(request("noop", json!({}))).await.unwrap().id;
    assert!(matches!(
        broker
            .result(TENANT, &id, Some(Duration::from_secs(15)))
            .await
            .unwrap(),
        ResultState::Ignored
    ));
}

/// A fetch round that fails on one queue keeps the jobs it already leased
/// from another: they run now, not after their lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_error_on_one_queue_keeps_the_jobs_leased_from_another() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    for (name, queue) in [("on-a", "a"), ("on-b", "b")] {
        let policy = TaskPolicy {
            queue: queue.into(),
            ..TaskPolicy::default()
        };
        broker
            .deploy(TENANT, name, &guest_bytes("noop"), &policy)
            .await
            .unwrap();
    }
    // A worker user that may touch every key of the tenant except queue b's.
    let keys = Keys::new(TENANT);
    let mut admin = redis.connect().await;
    let mut rules = vec![
        "SETUSER".to_string(),
        "no-b".into(),
        "on".into(),
        "nopass".into(),
        "+@all".into(),
        "&*".into(),
    ];
    for kind in [
        "job:*",
        "history:*",
        "done:*",
        "result:*",
        "task:*",
        "tasks",
        "tenant",
        "component:*",
        "usage",
        "inflight",
        "dead",
        "idem*",
        "store:*",
        "kv:*",
        "counter*",
        "lock:*",
        "fence:*",
        "step:*",
        "children-rate",
        "paused",
        "dead-by-queue",
        "gates",
        "holders:*",
        "schedules*",
        "schedule-runs",
        "flow:*",
        "flows-waiting",
        "stats:*",
        "recent:*",
        "queues",
        "queue:a:*",
    ] {
        rules.push(format!("~{}{kind}", keys.prefix()));
    }
    // Heartbeats and control lists live outside any tenant.
    rules.push("~wasmq:{workers}:*".into());
    redis::cmd("ACL")
        .arg(&rules)
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let id = broker.enqueue(request("on-a", json!({}))).await.unwrap().id;
    let url = redis.url.replace("redis://", "redis://no-b:x@");
    let _worker = spawn_process(&url, TENANT, &["--queues", "a,b", "--lease", "60s"]);
    let started = Instant::now();
    match broker
        .result(TENANT, &id, Some(Duration::from_secs(20)))
        .await
        .unwrap()
    {
        ResultState::Ignored => {}
        other => panic!("the job of queue a did not run: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "it waited {:?}: for its 60 s lease?",
        started.elapsed()
    );
}

/// A task moved to another queue takes its dead jobs with it: `dead retry`
/// puts a job on its task's current queue, where a worker runs it (the job
/// itself, left on the old queue, was refused as not its task's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_follows_a_task_to_its_new_queue() {
    let (redis, broker) = redis_with_task(TENANT, "t", "hostile", &TaskPolicy::default()).await;
    let id = broker
        .enqueue(request("t", json!({"mode": "echo"})))
        .await
        .unwrap()
        .id;
    let moved = TaskPolicy {
        queue: "elsewhere".into(),
        ..TaskPolicy::default()
    };
    broker
        .deploy(TENANT, "t", &guest_bytes("hostile"), &moved)
        .await
        .unwrap();
    let mut on_default = LaunchConfig::new(&redis.url, TENANT, &["default"], 2);
    on_default.pools[0].queues = vec!["default".into(), "elsewhere".into()];
    let (stop, worker, _) = start_configured(on_default);
    match broker
        .result(TENANT, &id, Some(Duration::from_secs(30)))
        .await
        .unwrap()
    {
        ResultState::Failed(f) => assert_eq!(f.category, Category::Denied, "{f}"),
        other => panic!("a job on its task's old queue is refused: {other:?}"),
    }
    assert!(broker.dead_retry(TENANT, &id).await.unwrap());
    let state = loop {
        let status = broker.status(TENANT, &id).await.unwrap().unwrap();
        if status.state == "succeeded" || status.state == "dead" {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state.state, "succeeded", "{state:?}");
    stop.send(()).unwrap();
    worker.await.unwrap();
}
