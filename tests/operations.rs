//! What an operator sees and controls, through the `wasmq` CLI against a
//! real redis-server and real workers: live workers from heartbeats (a
//! killed one drops out), queue figures per state, jobs by state, cancel
//! of queued, delayed and running jobs (sleeping and spinning), and
//! pause/resume with nothing lost.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wasmq::broker::{Broker, EnqueueRequest};
use wasmq::keys::Keys;
use wasmq::launcher::LaunchConfig;
use wasmq::policy::TaskPolicy;
use wasmq::pools::{PoolKind, PoolSpec};

use common::http::{Reply, TestServer};
use common::jobs::redis_with_task;
use common::redis::RedisServer;
use common::workers::{spawn_process, start_configured, start_in_process};
use common::{guest_bytes, text, wasmq};

const TENANT: &str = "ops";

async fn enqueue(broker: &Broker, task: &str, payload: Value) -> String {
    enqueue_with(broker, task, payload, |_| {}).await
}

async fn enqueue_with(
    broker: &Broker,
    task: &str,
    payload: Value,
    change: impl FnOnce(&mut EnqueueRequest),
) -> String {
    let mut request = EnqueueRequest {
        tenant: TENANT.into(),
        task: task.into(),
        payload,
        ..EnqueueRequest::default()
    };
    change(&mut request);
    broker.enqueue(request).await.unwrap().id
}

/// `wasmq ARGS... --json` of the test tenant, parsed.
fn cli_json(redis: &RedisServer, args: &[&str]) -> Value {
    let args = [args, &["--json"]].concat();
    let out = wasmq(&redis.url, TENANT, &args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    serde_json::from_str(&text(&out.stdout)).unwrap()
}

/// `out` is a command that exited `code` with `needle` in its one stderr
/// line.
fn fails_with(out: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
}

/// A job's `state` field.
async fn state(broker: &Broker, id: &str) -> String {
    broker
        .status(TENANT, id)
        .await
        .unwrap()
        .map(|s| s.state)
        .unwrap_or_default()
}

/// Poll `check` every 20 ms until it holds; panics with `what` after
/// `limit`. Returns how long it took.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn policy_on(queue: &str) -> TaskPolicy {
    TaskPolicy {
        queue: queue.into(),
        ..TaskPolicy::default()
    }
}

/// Two worker processes publish heartbeats with their pools; a killed one
/// drops out within the heartbeat TTL, a stopped one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_lists_live_workers_and_drops_a_killed_one() {
    let (redis, broker) =
        redis_with_task(TENANT, "hostile", "hostile", &TaskPolicy::default()).await;
    let mut first = spawn_process(&redis.url, TENANT, &["--concurrency", "3"]);
    let _second = spawn_process(&redis.url, TENANT, &["--concurrency", "5"]);
    until(Duration::from_secs(20), "two live workers", || async {
        cli_json(&redis, &["workers"]).as_array().unwrap().len() == 2
    })
    .await;
    let workers = cli_json(&redis, &["workers"]);
    let mut slots: Vec<u64> = workers
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pools"][0]["slots"].as_u64().unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, [3, 5], "{workers}");
    for w in workers.as_array().unwrap() {
        assert_eq!(w["tenants"], json!([TENANT]), "{w}");
        assert_eq!(w["pools"][0]["kind"], "io", "{w}");
        assert!(w["pid"].as_u64().unwrap() > 0, "{w}");
        assert!(w["last_beat_at"].as_str().unwrap().ends_with('Z'), "{w}");
        assert!(!w["version"].as_str().unwrap().is_empty(), "{w}");
        assert!(!w["host"].as_str().unwrap().is_empty(), "{w}");
    }
    // Busy slots show up with the next heartbeat.
    let id = enqueue(&broker, "hostile", json!({"mode": "sleep", "ms": 6000})).await;
    until(
        Duration::from_secs(10),
        "one busy slot in a heartbeat",
        || async {
            let workers = cli_json(&redis, &["workers"]);
            let busy: u64 = workers
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["pools"][0]["busy"].as_u64().unwrap())
                .sum();
            busy == 1
        },
    )
    .await;
    // Another tenant's view does not list them; --all does.
    let other = wasmq(&redis.url, "elsewhere", &["workers", "--json"]);
    assert_eq!(text(&other.stdout), "[]");
    let all = wasmq(&redis.url, "elsewhere", &["workers", "--all", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&text(&all.stdout))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let killed_pid = first.id();
    first.kill().unwrap();
    let _ = first.wait();
    let gone = until(
        Duration::from_secs(15),
        "the killed worker drops out",
        || async {
            let workers = cli_json(&redis, &["workers"]);
            workers.as_array().unwrap().len() == 1
                && workers[0]["pid"].as_u64() != Some(killed_pid as u64)
        },
    )
    .await;
    eprintln!("a killed worker left `wasmq workers` after {gone:?} (heartbeat TTL 10 s)");
    drop(_second);
    let _ = broker.cancel(TENANT, &id, "test").await;

    // An embedded worker that stops leaves at once.
    let (stop, handle) = start_in_process(&broker, TENANT, 2, Duration::from_secs(10), "embedded");
    until(
        Duration::from_secs(10),
        "the embedded worker is listed",
        || async {
            broker
                .workers()
                .await
                .unwrap()
                .iter()
                .any(|w| w.id == "embedded")
        },
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    assert!(
        !broker
            .workers()
            .await
            .unwrap()
            .iter()
            .any(|w| w.id == "embedded"),
        "a worker that stopped is gone from the list at once"
    );
}

/// `wasmq queues` counts jobs in every state, and `wasmq jobs` lists them
/// by state, queue and task, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_jobs_show_every_state() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let hostile = guest_bytes("hostile");
    for (name, queue) in [("work", "default"), ("slow", "slow"), ("later", "idle")] {
        broker
            .deploy(TENANT, name, &hostile, &policy_on(queue))
            .await
            .unwrap();
    }
    // Nobody serves "idle": 3 ready, 2 delayed there.
    let mut ready = Vec::new();
    // The newest has the highest priority (the lowest ready-set score):
    // listed first all the same.
    for i in 0..3u8 {
        let id = enqueue_with(&broker, "later", json!({"mode": "echo", "i": i}), |r| {
            r.priority = if i == 2 { 9 } else { i }
        })
        .await;
        ready.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..2 {
        enqueue_with(&broker, "later", json!({"mode": "echo"}), |r| {
            r.countdown = Some(Duration::from_secs(3600))
        })
        .await;
    }
    // A worker on default and slow: 2 succeed, 1 dies, 1 keeps running.
    let mut config = LaunchConfig::new(&redis.url, TENANT, &["default", "slow"], 4);
    config.cache_dir = None;
    config.id = "lister".into();
    let (stop, handle, _) = start_configured(config);
    let ok1 = enqueue(&broker, "work", json!({"mode": "echo"})).await;
    let ok2 = enqueue(&broker, "work", json!({"mode": "echo"})).await;
    let dead = enqueue(&broker, "work", json!({"mode": "fail", "message": "no"})).await;
    let running = enqueue(&broker, "slow", json!({"mode": "sleep", "ms": 60_000})).await;
    for (id, want) in [
        (&ok1, "succeeded"),
        (&ok2, "succeeded"),
        (&dead, "dead"),
        (&running, "active"),
    ] {
        until(Duration::from_secs(30), &format!("{id} {want}"), || async {
            state(&broker, id).await == want
        })
        .await;
    }

    let queues = cli_json(&redis, &["queues"]);
    let by_name = |name: &str| {
        queues
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no queue {name}: {queues}"))
    };
    let idle = by_name("idle");
    assert_eq!(
        (idle["ready"].as_u64(), idle["delayed"].as_u64()),
        (Some(3), Some(2)),
        "{idle}"
    );
    assert!(idle["oldest_ready_age_ms"].as_u64().is_some(), "{idle}");
    assert_eq!(idle["paused"], Value::Null);
    let default = by_name("default");
    assert_eq!(default["dead"], 1, "{default}");
    assert_eq!(default["succeeded_last_minute"], 2, "{default}");
    assert_eq!(default["failed_last_minute"], 1, "{default}");
    assert_eq!(
        (default["ready"].as_u64(), default["running"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(by_name("slow")["running"], 1, "{queues}");
    let human = text(&wasmq(&redis.url, TENANT, &["queues"]).stdout);
    assert!(human.starts_with("QUEUE"), "{human}");
    assert!(human.lines().any(|l| l.starts_with("idle ")), "{human}");

    let ids = |rows: &Value| -> Vec<String> {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let queued = cli_json(&redis, &["jobs", "--state", "queued"]);
    let mut newest_first = ready.clone();
    newest_first.reverse();
    assert_eq!(ids(&queued), newest_first, "{queued}");
    assert_eq!(
        ids(&cli_json(
            &redis,
            &["jobs", "--state", "queued", "--limit", "2"]
        )),
        newest_first[..2]
    );
    assert_eq!(
        cli_json(&redis, &["jobs", "--state", "scheduled"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let run = cli_json(&redis, &["jobs", "--state", "running"]);
    assert_eq!(ids(&run), vec![running.clone()]);
    assert_eq!(run[0]["worker"], "lister-io0", "{run}");
    assert_eq!(
        ids(&cli_json(&redis, &["jobs", "--state", "dead"])),
        vec![dead.clone()]
    );
    let succeeded = ids(&cli_json(&redis, &["jobs", "--state", "succeeded"]));
    assert_eq!(succeeded.len(), 2);
    assert!(succeeded.contains(&ok1) && succeeded.contains(&ok2));
    assert_eq!(
        cli_json(&redis, &["jobs", "--queue", "default"])
            .as_array()
            .unwrap()
            .len(),
        3,
        "two succeeded and one dead on default"
    );
    assert_eq!(
        cli_json(&redis, &["jobs", "--task", "later"])
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(cli_json(&redis, &["jobs"]).as_array().unwrap().len(), 9);
    let bad = wasmq(&redis.url, TENANT, &["jobs", "--state", "sleeping"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("queued, scheduled, running"),
        "{}",
        text(&bad.stderr)
    );

    // The per-minute counts behind "last minute" are kept a day and more.
    let minutes = broker.outcomes_by_minute(TENANT, 5).await.unwrap();
    let counts: u64 = minutes
        .iter()
        .map(|(_, c)| c.get("task:work:succeeded").copied().unwrap_or(0))
        .sum();
    assert_eq!(counts, 2, "{minutes:?}");
    let mut conn = redis.connect().await;
    let key = Keys::new(TENANT).stats(minutes.last().unwrap().0);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 24 * 3600 * 1000, "{key} expires in {ttl} ms");

    broker.cancel(TENANT, &running, "test").await.unwrap();
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// A queued and a delayed job, cancelled, never run; a running job, one
/// sleeping between HTTP calls and one spinning on a cpu pool, is stopped
/// within a second and does nothing more. Each ends `cancelled`, its
/// result waiters wake, and its idempotency key is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_delayed_and_running_jobs() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let ticks = TestServer::start(|_, _| Reply::ok("ok")).await;
    let mut io = policy_on("default");
    io.sandbox.allow_http = vec![ticks.authority()];
    broker
        .deploy(TENANT, "hostile", &guest_bytes("hostile"), &io)
        .await
        .unwrap();
    let mut cpu = policy_on("crunch");
    cpu.pool = PoolKind::Cpu;
    cpu.sandbox.fuel = 1_000_000_000_000_000;
    cpu.sandbox.timeout = Duration::from_secs(600);
    broker
        .deploy(TENANT, "spinner", &guest_bytes("hostile"), &cpu)
        .await
        .unwrap();

    // Queued and delayed, before any worker runs.
    let queued = enqueue_with(
        &broker,
        "hostile",
        json!({"mode": "tick", "url": ticks.url("/queued"), "n": 1, "ms": 1}),
        |r| r.idempotency_key = Some("welcome-7".into()),
    )
    .await;
    let delayed = enqueue_with(
        &broker,
        "hostile",
        json!({"mode": "tick", "url": ticks.url("/delayed"), "n": 1, "ms": 1}),
        |r| r.countdown = Some(Duration::from_millis(300)),
    )
    .await;
    for id in [&queued, &delayed] {
        let out = wasmq(&redis.url, TENANT, &["cancel", id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let again = enqueue_with(&broker, "hostile", json!({"mode": "echo"}), |r| {
        r.idempotency_key = Some("welcome-7".into())
    })
    .await;
    assert_ne!(
        again, queued,
        "a cancelled job's idempotency key is free for a new job"
    );
    // Were a cancelled job's id still in a queue (its record naming
    // another), the fetch drops it: put both back to prove it.
    let keys = Keys::new(TENANT);
    let mut conn = redis.connect().await;
    let _: () = redis::pipe()
        .zadd(keys.ready("default"), &queued, 1)
        .zadd(keys.delayed("default"), &delayed, 1)
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut config = LaunchConfig::new(&redis.url, TENANT, &["default"], 4);
    config.pools.push(PoolSpec {
        kind: PoolKind::Cpu,
        queues: vec!["crunch".into()],
        width: 1,
    });
    config.cache_dir = None;
    config.id = "canceller".into();
    let (stop, handle, _) = start_configured(config);

    // Running, sleeping between calls.
    let ticking = enqueue(
        &broker,
        "hostile",
        json!({"mode": "tick", "url": ticks.url("/tick"), "n": 1000, "ms": 50}),
    )
    .await;
    until(Duration::from_secs(30), "the ticking job runs", || async {
        ticks.count("/tick") >= 3
    })
    .await;
    let waiter = tokio::spawn({
        let url = redis.url.clone();
        let id = ticking.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                (
                    wasmq(&url, TENANT, &["result", &id, "--wait", "30s"]),
                    started.elapsed(),
                )
            })
            .await
            .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the waiter is blocked
    let cancel = wasmq(&redis.url, TENANT, &["cancel", &ticking]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    assert!(
        text(&cancel.stdout).contains("canceller-io0"),
        "{}",
        text(&cancel.stdout)
    );
    let at_cancel = ticks.count("/tick");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ticks.count("/tick");
    assert!(
        after <= at_cancel + 1,
        "the cancelled job ran on: {at_cancel} ticks at cancel, {after} a second later"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ticks.count("/tick"), after, "the cancelled job still ticks");
    let (result, waited) = waiter.await.unwrap();
    assert_eq!(result.status.code(), Some(1));
    assert!(
        text(&result.stderr).starts_with("error: cancelled: cancelled by "),
        "{}",
        text(&result.stderr)
    );
    assert!(
        waited < Duration::from_secs(10),
        "the waiter woke after {waited:?}"
    );
    assert_eq!(state(&broker, &ticking).await, "cancelled");

    // Running, spinning on the one cpu slot: the next cpu job can only
    // run once the spinner has stopped.
    let spinning = enqueue(&broker, "spinner", json!({"mode": "spin"})).await;
    until(Duration::from_secs(30), "the spinner runs", || async {
        state(&broker, &spinning).await == "active"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = enqueue(&broker, "spinner", json!({"mode": "echo"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state(&broker, &next).await,
        "queued",
        "one cpu slot, held by the spinner"
    );
    let cancelled_at = Instant::now();
    let cancel = wasmq(&redis.url, TENANT, &["cancel", &spinning]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let freed = until(
        Duration::from_secs(5),
        "the spinner's slot runs the next job",
        || async { state(&broker, &next).await == "succeeded" },
    )
    .await;
    eprintln!(
        "spinning job stopped and its slot reused {freed:?} after the cancel command returned ({:?} from its start)",
        cancelled_at.elapsed()
    );
    assert_eq!(state(&broker, &spinning).await, "cancelled");

    // The queued and delayed ones never ran, even now a worker serves
    // their queue and the delay has passed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((ticks.count("/queued"), ticks.count("/delayed")), (0, 0));
    for id in [&queued, &delayed] {
        let status = broker.status(TENANT, id).await.unwrap().unwrap();
        assert_eq!(status.state, "cancelled");
        assert_eq!(status.deliveries, 0, "{status:?}");
        assert_eq!(status.last_error.as_ref().unwrap()["category"], "cancelled");
        assert!(
            status.history.iter().any(|e| e["event"] == "cancelled"),
            "{status:?}"
        );
    }
    let listed = cli_json(&redis, &["jobs", "--state", "cancelled"]);
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");

    // Cancelling again, or a job that does not exist, says so.
    let twice = wasmq(&redis.url, TENANT, &["cancel", &queued]);
    fails_with(&twice, 2, "already ended (cancelled)");
    let unknown = wasmq(&redis.url, TENANT, &["cancel", "no-such-job"]);
    assert!(
        text(&unknown.stderr).contains("no job no-such-job"),
        "{}",
        text(&unknown.stderr)
    );
    stop.send(()).unwrap();
    let stats = handle.await.unwrap();
    assert_eq!(stats.released, 0, "{stats:?}");
}

/// A paused queue hands out nothing, whatever is enqueued; resumed, every
/// job runs once. Jobs running at the pause finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_fetching_and_resume_loses_nothing() {
    let (redis, broker) =
        redis_with_task(TENANT, "hostile", "hostile", &TaskPolicy::default()).await;
    let (stop, handle) = start_in_process(&broker, TENANT, 8, Duration::from_secs(10), "pausable");
    // A first job compiles the component, so the next one is running when
    // it is active.
    let warm = enqueue(&broker, "hostile", json!({"mode": "echo"})).await;
    until(Duration::from_secs(60), "a first job", || async {
        state(&broker, &warm).await == "succeeded"
    })
    .await;
    let running = enqueue(&broker, "hostile", json!({"mode": "sleep", "ms": 800})).await;
    until(Duration::from_secs(30), "a job runs", || async {
        state(&broker, &running).await == "active"
    })
    .await;

    let paused = wasmq(&redis.url, TENANT, &["queue", "pause", "default"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(enqueue(&broker, "hostile", json!({"mode": "echo", "i": i})).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        state(&broker, &running).await,
        "succeeded",
        "a job running at the pause finishes"
    );
    for id in &ids {
        assert_eq!(
            state(&broker, id).await,
            "queued",
            "nothing is fetched from a paused queue"
        );
    }
    let queues = cli_json(&redis, &["queues"]);
    assert_eq!(queues[0]["ready"], 40, "{queues}");
    assert!(queues[0]["paused"]["by"].is_string(), "{queues}");
    assert!(
        queues[0]["paused"]["at"].as_str().unwrap().ends_with('Z'),
        "{queues}"
    );
    let human = text(&wasmq(&redis.url, TENANT, &["queues"]).stdout);
    assert!(human.contains("paused by "), "{human}");

    let resumed_at = Instant::now();
    let resumed = wasmq(&redis.url, TENANT, &["queue", "resume", "default"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let first = until(
        Duration::from_secs(30),
        "a job runs after the resume",
        || async {
            let mut any = false;
            for id in &ids {
                any |= state(&broker, id).await != "queued";
            }
            any
        },
    )
    .await;
    eprintln!("first job left the resumed queue {first:?} after the resume ({:?} since the command began)", resumed_at.elapsed());
    for id in &ids {
        until(Duration::from_secs(30), "every job succeeds", || async {
            state(&broker, id).await == "succeeded"
        })
        .await;
        assert_eq!(
            broker.status(TENANT, id).await.unwrap().unwrap().deliveries,
            1
        );
    }

    let missing = wasmq(&redis.url, TENANT, &["queue", "pause", "nosuch"]);
    fails_with(&missing, 2, "no queue \"nosuch\" (its queues: default)");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// `wasmq queues` and `wasmq jobs` read indexes, not the keyspace: with
/// many finished jobs, the succeeded index stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_succeeded_index_is_bounded() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut conn = redis.connect().await;
    let keys = Keys::new(TENANT);
    // Fill the index past its bound directly (as many batches would).
    let kept = wasmq::keys::FINISHED_INDEX_KEPT;
    let mut pipe = redis::pipe();
    for i in 0..kept + 500 {
        pipe.lpush(keys.succeeded(), format!("old-{i}")).ignore();
    }
    pipe.query_async::<()>(&mut conn).await.unwrap();
    broker
        .deploy(TENANT, "noop", &guest_bytes("noop"), &TaskPolicy::default())
        .await
        .unwrap();
    let (stop, handle) = start_in_process(&broker, TENANT, 2, Duration::from_secs(10), "bounded");
    let id = enqueue(&broker, "noop", json!({})).await;
    until(Duration::from_secs(30), "the job succeeds", || async {
        state(&broker, &id).await == "succeeded"
    })
    .await;
    let size: usize = redis::cmd("LLEN")
        .arg(keys.succeeded())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(size, kept);
    let newest = cli_json(&redis, &["jobs", "--state", "succeeded", "--limit", "1"]);
    assert_eq!(newest[0]["id"], id.as_str(), "{newest}");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// A producer's W3C `traceparent` travels in the envelope to the run, and
/// the run's HTTP requests carry the same trace with the run's own span id;
/// a job without one sends none; a malformed one is refused at enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producers_trace_context_reaches_the_guests_requests() {
    let server = TestServer::start(|_, _| Reply::ok("ok")).await;
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![server.authority()];
    let (redis, broker) = redis_with_task(TENANT, "hostile", "hostile", &policy).await;
    let (stop, handle) = start_in_process(&broker, TENANT, 2, Duration::from_secs(10), "traced");
    let producer = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = enqueue_with(
        &broker,
        "hostile",
        json!({"mode": "http", "url": server.url("/traced")}),
        |r| r.traceparent = Some(producer.into()),
    )
    .await;
    let plain = enqueue(
        &broker,
        "hostile",
        json!({"mode": "http", "url": server.url("/plain")}),
    )
    .await;
    for id in [&traced, &plain] {
        until(Duration::from_secs(30), "the job succeeds", || async {
            state(&broker, id).await == "succeeded"
        })
        .await;
    }
    let requests = server.requests();
    let sent = requests.iter().find(|r| r.path == "/traced").unwrap();
    let header = sent.header("traceparent").expect("a traceparent header");
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01"),
        "{header}"
    );
    assert_eq!(parts[2].len(), 16, "{header}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "the run is a span of its own");
    let plain_request = requests.iter().find(|r| r.path == "/plain").unwrap();
    assert!(plain_request.header("traceparent").is_none());

    let bad = wasmq(
        &redis.url,
        TENANT,
        &["enqueue", "hostile", "{}", "--traceparent", "00-xyz"],
    );
    fails_with(&bad, 2, "traceparent \"00-xyz\" is not a W3C trace context");
    stop.send(()).unwrap();
    handle.await.unwrap();
}
