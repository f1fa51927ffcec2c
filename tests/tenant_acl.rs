//! `wasmq tenant acl`: the generated Redis ACL user lets a producer enqueue,
//! read results and read status in its own tenant, through the real Broker
//! API, and refuses everything else, against a real redis-server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use common::{guest_bytes, wasmq_bin};
use serde_json::json;
use wasmq::broker::acl::ProducerAcl;
use wasmq::broker::{Broker, EnqueueRequest, ResultState};
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, EngineLimits};
use wasmq::keys::Keys;
use wasmq::policy::TaskPolicy;
use wasmq::pools::CpuPriority;
use wasmq::sandbox::{ComputeThreads, Sandbox};
use wasmq::worker::{Worker, WorkerConfig};

fn request(tenant: &str) -> EnqueueRequest {
    EnqueueRequest {
        tenant: tenant.into(),
        task: "noop".into(),
        payload: json!({"n": 1}),
        store_result: Some(true),
        ..EnqueueRequest::default()
    }
}

/// The admin deploys `noop` in tenants `a` and `b` and installs both
/// producer users; returns the admin broker.
async fn setup(redis: &RedisServer) -> Broker {
    let admin = Broker::connect(&redis.url).await.unwrap();
    for tenant in ["a", "b"] {
        admin
            .deploy(tenant, "noop", &guest_bytes("noop"), &TaskPolicy::default())
            .await
            .unwrap();
        ProducerAcl::new(tenant, &["default".to_string()])
            .unwrap()
            .apply(&mut admin.connection(), &format!("pw-{tenant}"))
            .await
            .unwrap();
    }
    admin
}

fn producer_url(redis: &RedisServer, tenant: &str) -> String {
    format!(
        "redis://wasmq-producer-{tenant}:pw-{tenant}@127.0.0.1:{}",
        redis.port
    )
}

/// A raw connection as tenant `tenant`'s producer.
async fn producer_conn(redis: &RedisServer, tenant: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(producer_url(redis, tenant))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(what: &str, r: Result<T, impl std::fmt::Display>) {
    match r {
        Ok(v) => panic!("{what}: allowed (got {v:?}), expected a permission error"),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("NOPERM")
                    || e.contains("no permissions")
                    || e.contains("can't access")
                    || e.contains("can't run"),
                "{what}: failed, but not with a permission error: {e}"
            );
        }
    }
}

fn start_worker(
    broker: &Broker,
    tenant: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
) {
    let limits = EngineLimits {
        instance_slots: 2,
        ..EngineLimits::default()
    };
    let sandbox =
        Arc::new(Sandbox::new(build_engine(&limits).unwrap(), CompiledCache::new(None)).unwrap());
    let config = WorkerConfig {
        tenants: vec![tenant.into()],
        queues: vec!["default".into()],
        concurrency: 2,
        lease: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        id: format!("test-{}", uuid::Uuid::new_v4().simple()),
        compute: Some(ComputeThreads::for_machine(CpuPriority::default()).unwrap()),
        host_retries: Default::default(),
        metrics: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(broker.clone(), sandbox, config);
    let handle = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_enqueues_and_reads_results_in_its_own_tenant() {
    let redis = RedisServer::start();
    let admin = setup(&redis).await;
    let producer = Broker::connect(&producer_url(&redis, "a")).await.unwrap();

    // Enqueue without an idempotency key (the script's empty fifth key),
    // with one (and its duplicate), and delayed.
    let plain = producer.enqueue(request("a")).await.unwrap();
    assert!(!plain.duplicate);
    let keyed = EnqueueRequest {
        idempotency_key: Some("k1".into()),
        ..request("a")
    };
    let first = producer.enqueue(keyed.clone()).await.unwrap();
    let again = producer.enqueue(keyed).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    let delayed = producer
        .enqueue(EnqueueRequest {
            not_before_ms: Some(wasmq::broker::now_ms() + 3_600_000),
            ..request("a")
        })
        .await
        .unwrap();

    // Status and result before any worker runs, with and without waiting.
    let status = producer.status("a", &plain.id).await.unwrap().unwrap();
    assert_eq!(status.state, "queued");
    assert_eq!(status.task.as_deref(), Some("noop"));
    let scheduled = producer.status("a", &delayed.id).await.unwrap().unwrap();
    assert_eq!(scheduled.state, "scheduled");
    assert_eq!(
        producer.result("a", &plain.id, None).await.unwrap(),
        ResultState::Pending
    );
    assert_eq!(
        producer
            .result("a", &plain.id, Some(Duration::from_millis(100)))
            .await
            .unwrap(),
        ResultState::Pending
    );
    assert_eq!(
        producer.result("a", "no-such-job", None).await.unwrap(),
        ResultState::Unknown
    );

    // After the script cache is flushed, redis-rs reloads the script with
    // SCRIPT LOAD: the producer may do that.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut admin.connection())
        .await
        .unwrap();
    let reloaded = producer.enqueue(request("a")).await.unwrap();
    // A workflow: submitted as the producer, its waiting step visible.
    let chain = json!({"chain": [{"task": "noop", "payload": {"n": 1}},
        {"task": "noop", "payload": {"n": 2}}]});
    let flow = producer
        .start_flow("a", &chain.to_string(), None)
        .await
        .unwrap();
    let waiting = producer
        .status("a", &flow.job_ids[1])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(waiting.state, "waiting");
    assert_eq!(
        waiting.flow.unwrap().still_waiting_on,
        vec![flow.job_ids[0].clone()]
    );

    // A worker (admin credentials) runs the jobs; the producer waits for
    // the results (BLMOVE on done:ID) and reads them.
    let (stop, worker) = start_worker(&admin, "a");
    for id in [&plain.id, &first.id, &reloaded.id] {
        let state = producer
            .result("a", id, Some(Duration::from_secs(30)))
            .await
            .unwrap();
        assert!(matches!(state, ResultState::Ready(_)), "{id}: {state:?}");
        let status = producer.status("a", id).await.unwrap().unwrap();
        assert_eq!(status.state, "succeeded");
    }
    let done = producer
        .flow_state("a", &flow.flow_id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(
        matches!(done, wasmq::broker::FlowState::Finished(Ok(_))),
        "{done:?}"
    );
    stop.send(()).unwrap();
    worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_reach_another_tenant_or_run_admin_commands() {
    let redis = RedisServer::start();
    let admin = setup(&redis).await;
    let b_job = admin.enqueue(request("b")).await.unwrap();
    let producer = Broker::connect(&producer_url(&redis, "a")).await.unwrap();

    // The Broker API, pointed at tenant b.
    assert_refused("enqueue in b", producer.enqueue(request("b")).await);
    assert_refused("result in b", producer.result("b", &b_job.id, None).await);
    assert_refused("status in b", producer.status("b", &b_job.id).await);
    assert_refused("task lookup in b", producer.task("b", "noop").await);

    let mut conn = producer_conn(&redis, "a").await;
    let b = Keys::new("b");
    let a = Keys::new("a");
    macro_rules! refused {
        ($what:expr, $cmd:expr) => {
            assert_refused($what, $cmd.query_async::<redis::Value>(&mut conn).await)
        };
    }
    // Tenant b's keys, by raw commands.
    refused!("GET b job", redis::cmd("HGETALL").arg(b.job(&b_job.id)));
    refused!("GET b result", redis::cmd("GET").arg(b.result(&b_job.id)));
    refused!("SET b kv", redis::cmd("SET").arg(b.kv("x")).arg("1"));
    refused!("DEL b job", redis::cmd("DEL").arg(b.job(&b_job.id)));
    refused!(
        "ZADD b ready",
        redis::cmd("ZADD").arg(b.ready("default")).arg(1).arg("x")
    );
    // Its own tenant's secrets (sealed anyway), read or written.
    refused!("HGETALL a secrets", redis::cmd("HGETALL").arg(a.secrets()));
    refused!(
        "HGET a secret",
        redis::cmd("HGET").arg(a.secrets()).arg("mail_api_key")
    );
    refused!(
        "HSET a secret",
        redis::cmd("HSET")
            .arg(a.secrets())
            .arg("mail_api_key")
            .arg("x")
    );
    // Its own tenant's queues that no deployed task uses.
    refused!(
        "ZADD a's undeployed queue",
        redis::cmd("ZADD").arg(a.ready("cpu-only")).arg(1).arg("x")
    );
    // Commands no producer needs, on any key.
    refused!("KEYS", redis::cmd("KEYS").arg("*"));
    refused!("SCAN", redis::cmd("SCAN").arg(0));
    refused!("FLUSHALL", redis::cmd("FLUSHALL"));
    refused!("FLUSHDB", redis::cmd("FLUSHDB"));
    refused!("CONFIG GET", redis::cmd("CONFIG").arg("GET").arg("*"));
    refused!("ACL LIST", redis::cmd("ACL").arg("LIST"));
    refused!("SCRIPT FLUSH", redis::cmd("SCRIPT").arg("FLUSH"));
    refused!("DEL a job", redis::cmd("DEL").arg(a.job(&b_job.id)));
    refused!("PUBLISH", redis::cmd("PUBLISH").arg("x").arg("y"));
    // Own-tenant keys a producer has no business with: deploying, guest
    // state, the dead-letter set, leases.
    refused!(
        "write a task spec",
        redis::cmd("HSET").arg(a.task("noop")).arg("spec").arg("{}")
    );
    refused!(
        "write a component",
        redis::cmd("SET").arg(a.component("x")).arg("x")
    );
    refused!("SADD a tasks", redis::cmd("SADD").arg(a.tasks()).arg("x"));
    refused!("SET a kv", redis::cmd("SET").arg(a.kv("x")).arg("1"));
    refused!("GET a counter", redis::cmd("GET").arg(a.counter("x")));
    refused!("SET a lock", redis::cmd("SET").arg(a.lock("x")).arg("1"));
    refused!(
        "ZADD a dead",
        redis::cmd("ZADD").arg(a.dead()).arg(1).arg("x")
    );
    refused!(
        "ZADD a leased",
        redis::cmd("ZADD").arg(a.leased("default")).arg(1).arg("x")
    );
    refused!(
        "SET a result",
        redis::cmd("SET").arg(a.result("x")).arg("1")
    );
    // The empty key may be declared to a script, but never used.
    refused!("SET empty key", redis::cmd("SET").arg("").arg("1"));
    refused!("GET empty key", redis::cmd("GET").arg(""));
    refused!(
        "EVAL writing the empty key",
        redis::cmd("EVAL")
            .arg("return redis.call('SET', KEYS[1], 'x')")
            .arg(1)
            .arg("")
    );
    // Scripts: declared keys and keys built inside Lua are both checked.
    refused!(
        "EVAL declaring a b key",
        redis::cmd("EVAL")
            .arg("return redis.call('GET', KEYS[1])")
            .arg(1)
            .arg(b.result(&b_job.id))
    );
    refused!(
        "EVAL declaring a b key among a keys",
        redis::cmd("EVAL")
            .arg("return 1")
            .arg(2)
            .arg(a.job("x"))
            .arg(b.job("x"))
    );
    refused!(
        "EVAL building a b key inside Lua",
        redis::cmd("EVAL")
            .arg("return redis.call('HGETALL', ARGV[1])")
            .arg(0)
            .arg(b.job(&b_job.id))
    );
    refused!(
        "EVAL running a denied command",
        redis::cmd("EVAL")
            .arg("return redis.call('FLUSHALL')")
            .arg(0)
    );

    // Tenant b's data is untouched, and b's own producer reaches it.
    let b_producer = Broker::connect(&producer_url(&redis, "b")).await.unwrap();
    let status = b_producer.status("b", &b_job.id).await.unwrap().unwrap();
    assert_eq!(status.state, "queued");
    // And a wrong password is refused outright.
    let wrong = format!("redis://wasmq-producer-a:pw-b@127.0.0.1:{}", redis.port);
    assert!(Broker::connect(&wrong).await.is_err());
}

#[test]
fn the_cli_prints_and_applies_the_acl() {
    let redis = RedisServer::start();
    let out = std::process::Command::new(wasmq_bin())
        .args(["--redis", &redis.url, "tenant", "acl", "a", "--apply"])
        .args(["--password", "s3cret-pw"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ACL SETUSER wasmq-producer-a reset on #"));
    assert!(stdout.contains("~wasmq:{a}:job:*"));
    assert!(
        !stdout.contains("s3cret-pw"),
        "the password is printed as its hash only"
    );
    // The printed rules are what was applied: the user exists with them.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = redis.connect().await;
        let users: Vec<String> = redis::cmd("ACL")
            .arg("USERS")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(users.contains(&"wasmq-producer-a".to_string()), "{users:?}");
        let ok: String = redis::cmd("AUTH")
            .arg("wasmq-producer-a")
            .arg("s3cret-pw")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ok, "OK");
    });
    // Without a password, one is generated and shown once; a bad tenant
    // name is refused.
    let out = std::process::Command::new(wasmq_bin())
        .args(["tenant", "acl", "b"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("# password of wasmq-producer-b"));
    let out = std::process::Command::new(wasmq_bin())
        .args(["tenant", "acl", "a*"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Rate limits are the deployed policy's, whatever a producer writes: jobs
/// enqueued by hand as the producer ACL user, following the recipe in
/// docs/redis-layout.md (with no `gate` field, or one naming another task),
/// start no faster than the task's `rate_limit`, each delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_jobs_of_a_rate_limited_task_are_rate_limited() {
    const JOBS: usize = 60;
    let redis = RedisServer::start();
    let admin = setup(&redis).await;
    let policy = TaskPolicy {
        rate_limit: Some(wasmq::gates::RateLimit::parse("20/s").unwrap()),
        ..TaskPolicy::default()
    };
    admin
        .deploy("a", "limited", &guest_bytes("noop"), &policy)
        .await
        .unwrap();
    let keys = Keys::new("a");
    let mut producer = producer_conn(&redis, "a").await;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let id = uuid::Uuid::new_v4().to_string();
        let envelope = json!({"v": 1, "id": id, "tenant": "a", "task": "limited",
            "queue": "default", "payload": {"n": i}, "priority": 0,
            "enqueued_at_ms": wasmq::broker::now_ms()});
        let seq: u64 = redis::cmd("INCR")
            .arg(keys.seq("default"))
            .query_async(&mut producer)
            .await
            .unwrap();
        let score = (9u64 << 44) + seq;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HSET")
            .arg(keys.job(&id))
            .arg("envelope")
            .arg(envelope.to_string())
            .arg("state")
            .arg("queued")
            .arg("attempts")
            .arg(0)
            .arg("deliveries")
            .arg(0)
            .arg("score")
            .arg(score);
        // Half of them carry a gate that names another task's key lane:
        // no rate flag, and not this task's lanes.
        if i % 2 == 1 {
            pipe.cmd("HSET")
                .arg(keys.job(&id))
                .arg("gate")
                .arg("k:4:free:x");
        }
        pipe.cmd("ZADD")
            .arg(keys.ready("default"))
            .arg(score)
            .arg(&id);
        pipe.cmd("LPUSH").arg(keys.signal("default")).arg(1);
        let () = pipe.query_async(&mut producer).await.unwrap();
        ids.push(id);
    }
    let (stop, worker) = start_worker(&admin, "a");
    let mut conn = admin.connection();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> = loop {
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(keys.job(id))
                .arg(&["state", "started_at_ms", "deliveries"]);
        }
        let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> =
            pipe.query_async(&mut conn).await.unwrap();
        if rows.iter().all(|r| r.0.as_deref() == Some("succeeded")) {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hand-written jobs did not all succeed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = stop.send(());
    worker.await.unwrap();
    let mut starts: Vec<u64> = rows.iter().map(|r| r.1.unwrap()).collect();
    starts.sort_unstable();
    let span_ms = starts[JOBS - 1] - starts[0];
    let most_in_a_second = starts
        .iter()
        .map(|&s| starts.iter().filter(|&&t| t >= s && t < s + 1000).count())
        .max()
        .unwrap();
    println!("{JOBS} hand-written jobs started over {span_ms} ms; at most {most_in_a_second} in a second");
    // 20/s with a burst of 2: 60 jobs need about 2.9 s; unlimited, a
    // worker runs them in a few milliseconds.
    assert!(span_ms >= 2_500, "started over only {span_ms} ms");
    assert!(
        most_in_a_second <= 20 + 2 + 1,
        "{most_in_a_second} jobs started within one second"
    );
    assert!(
        rows.iter().all(|r| r.2 == Some(1)),
        "a job was counted as delivered more than once: {:?}",
        rows.iter().map(|r| r.2).collect::<Vec<_>>()
    );
}
