//! The Redis backend against a real, private redis-server: the same
//! behaviours as the in-memory backend's unit tests, plus lock contention
//! and surviving a Redis restart.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::redis::RedisServer;
use wasmq::backend::redis::{ChildEnqueuer, RedisBackend};
use wasmq::backend::{
    Backend, BackendError, BackendResult, ChildJob, Claimant, FlowRequest, StartedFlow, StepState,
};

const LONG: Duration = Duration::from_secs(30);

async fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::new(server.connect().await)
}

#[tokio::test]
async fn kv_set_get_delete_and_ttl() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    assert_eq!(b.kv_get("t", "k").await.unwrap(), None);
    b.kv_set("t", "k", b"v1", None).await.unwrap();
    assert_eq!(b.kv_get("t", "k").await.unwrap(), Some(b"v1".to_vec()));
    assert!(!b.kv_set_if_absent("t", "k", b"v2", None).await.unwrap());
    assert_eq!(b.kv_get("t", "k").await.unwrap(), Some(b"v1".to_vec()));
    assert!(b.kv_delete("t", "k").await.unwrap());
    assert!(!b.kv_delete("t", "k").await.unwrap());
    assert!(b.kv_set_if_absent("t", "k", b"v2", None).await.unwrap());
    assert_eq!(b.kv_get("t", "k").await.unwrap(), Some(b"v2".to_vec()));

    // Binary values round-trip.
    let bytes: Vec<u8> = (0..=255).collect();
    b.kv_set("t", "bin", &bytes, None).await.unwrap();
    assert_eq!(b.kv_get("t", "bin").await.unwrap(), Some(bytes));

    // TTLs expire, for SET and SET NX alike; an expired key is absent.
    let short = Some(Duration::from_millis(50));
    b.kv_set("t", "e", b"x", short).await.unwrap();
    assert!(b.kv_set_if_absent("t", "e2", b"x", short).await.unwrap());
    assert_eq!(b.kv_get("t", "e").await.unwrap(), Some(b"x".to_vec()));
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(b.kv_get("t", "e").await.unwrap(), None);
    assert!(!b.kv_delete("t", "e").await.unwrap());
    assert!(b.kv_set_if_absent("t", "e2", b"y", None).await.unwrap());
    // A plain SET without TTL clears an earlier TTL.
    b.kv_set("t", "p", b"1", short).await.unwrap();
    b.kv_set("t", "p", b"2", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(b.kv_get("t", "p").await.unwrap(), Some(b"2".to_vec()));
}

#[tokio::test]
async fn counters_add_and_default_to_zero() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    assert_eq!(b.counter_get("t", "c").await.unwrap(), 0);
    assert_eq!(b.counter_incr("t", "c", 5).await.unwrap(), 5);
    assert_eq!(b.counter_incr("t", "c", -7).await.unwrap(), -2);
    assert_eq!(b.counter_get("t", "c").await.unwrap(), -2);
}

#[tokio::test]
async fn tenants_do_not_share_state() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    b.kv_set("a", "k", b"1", None).await.unwrap();
    assert_eq!(b.kv_get("b", "k").await.unwrap(), None);
    assert!(!b.kv_delete("b", "k").await.unwrap());
    assert!(b.kv_set_if_absent("b", "k", b"2", None).await.unwrap());
    assert_eq!(b.kv_get("a", "k").await.unwrap(), Some(b"1".to_vec()));

    b.counter_incr("a", "c", 5).await.unwrap();
    assert_eq!(b.counter_get("b", "c").await.unwrap(), 0);

    // Same lock name in two tenants: two independent locks and fences.
    assert_eq!(b.lock_acquire("a", "l", "o", LONG).await.unwrap(), Some(1));
    assert_eq!(b.lock_acquire("b", "l", "o", LONG).await.unwrap(), Some(1));
    assert!(!b.lock_release("b", "l", "other").await.unwrap());
    assert!(b.lock_release("a", "l", "o").await.unwrap());
    assert!(b.lock_release("b", "l", "o").await.unwrap());

    b.step_complete("a", "s", &Claimant::unfenced("run1"), b"out", None)
        .await
        .unwrap();
    assert_eq!(
        b.step_begin("b", "s", &Claimant::unfenced("run1"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );

    // A guest key spelling out another tenant's prefix stays in its own
    // tenant: tenant b cannot see it, and it is not b's raw key.
    b.kv_set("a", "wasmq:{b}:kv:secret", b"forged", None)
        .await
        .unwrap();
    assert_eq!(b.kv_get("b", "secret").await.unwrap(), None);
    b.counter_incr("a", "wasmq:{b}:counter:c", 1).await.unwrap();
    assert_eq!(b.counter_get("b", "c").await.unwrap(), 0);
    let mut raw = server.connect().await;
    let forged: Option<Vec<u8>> = redis::cmd("GET")
        .arg("wasmq:{b}:kv:secret")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(forged, None);
    let real: Option<Vec<u8>> = redis::cmd("GET")
        .arg("wasmq:{a}:kv:wasmq:{b}:kv:secret")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(real, Some(b"forged".to_vec()));
}

#[tokio::test]
async fn lock_owner_and_fencing() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    let t1 = b
        .lock_acquire("t", "l", "o1", Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.lock_acquire("t", "l", "o2", LONG).await.unwrap(), None);
    assert!(!b.lock_release("t", "l", "o2").await.unwrap());
    assert!(!b.lock_renew("t", "l", "o2", LONG).await.unwrap());
    tokio::time::sleep(Duration::from_millis(120)).await;
    let t2 = b.lock_acquire("t", "l", "o2", LONG).await.unwrap().unwrap();
    assert!(t2 > t1, "fencing tokens strictly increase");
    // The expired holder can neither renew nor release the new lease.
    assert!(!b.lock_renew("t", "l", "o1", LONG).await.unwrap());
    assert!(!b.lock_release("t", "l", "o1").await.unwrap());
    assert!(b.lock_release("t", "l", "o2").await.unwrap());
    // Released: free again, with a still greater token.
    let t3 = b.lock_acquire("t", "l", "o1", LONG).await.unwrap().unwrap();
    assert!(t3 > t2, "fencing tokens strictly increase after release");
}

#[tokio::test]
async fn lock_renew_extends_the_lease() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    b.lock_acquire("t", "l", "o1", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert!(b.lock_renew("t", "l", "o1", LONG).await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.lock_acquire("t", "l", "o2", LONG).await.unwrap(), None);
    assert!(b.lock_release("t", "l", "o1").await.unwrap());
}

#[tokio::test]
async fn steps_run_busy_done() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run1"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Busy
    );
    // The claimant itself may begin again (e.g. after a host retry).
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run1"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );
    b.step_complete("t", "s", &Claimant::unfenced("run1"), b"out", None)
        .await
        .unwrap();
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Done(b"out".to_vec())
    );
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run1"), LONG)
            .await
            .unwrap(),
        StepState::Done(b"out".to_vec())
    );
}

#[tokio::test]
async fn step_abandon_and_lapsed_claims_let_another_run() {
    let server = RedisServer::start();
    let b = backend(&server).await;

    // Abandon by someone else does nothing; by the claimant frees the step.
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run1"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );
    b.step_abandon("t", "s", &Claimant::unfenced("run2"))
        .await
        .unwrap();
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Busy
    );
    b.step_abandon("t", "s", &Claimant::unfenced("run1"))
        .await
        .unwrap();
    assert_eq!(
        b.step_begin("t", "s", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );

    // A claim whose lease lapsed no longer blocks.
    assert_eq!(
        b.step_begin(
            "t",
            "lapse",
            &Claimant::unfenced("run1"),
            Duration::from_millis(50)
        )
        .await
        .unwrap(),
        StepState::Run
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        b.step_begin("t", "lapse", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );

    // A done marker with a TTL expires, and the step may run again.
    b.step_complete(
        "t",
        "ttl",
        &Claimant::unfenced("run1"),
        b"o",
        Some(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    assert_eq!(
        b.step_begin("t", "ttl", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Done(b"o".to_vec())
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        b.step_begin("t", "ttl", &Claimant::unfenced("run2"), LONG)
            .await
            .unwrap(),
        StepState::Run
    );
}

struct RecordingEnqueuer(Mutex<Vec<(String, ChildJob)>>);

#[async_trait]
impl ChildEnqueuer for RecordingEnqueuer {
    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String> {
        let mut jobs = self.0.lock().unwrap();
        jobs.push((tenant.to_string(), child));
        Ok(format!("child-{}", jobs.len()))
    }

    async fn start_flow(&self, _: &str, request: FlowRequest) -> BackendResult<StartedFlow> {
        Ok(StartedFlow {
            flow_id: format!("flow-of-{}", request.started_by),
            job_ids: Vec::new(),
        })
    }
}

#[tokio::test]
async fn child_jobs_need_an_enqueuer() {
    let server = RedisServer::start();
    let child = ChildJob {
        task: "send".into(),
        payload: "{}".into(),
        countdown: None,
        idempotency_key: None,
        traceparent: None,
    };

    let b = backend(&server).await;
    assert!(matches!(
        b.enqueue_child("t", child.clone()).await,
        Err(BackendError::Unavailable(m)) if m.contains("broker")
    ));

    let e = Arc::new(RecordingEnqueuer(Mutex::new(Vec::new())));
    let b = backend(&server).await.with_enqueuer(e.clone());
    assert_eq!(
        b.enqueue_child("t", child.clone()).await.unwrap(),
        "child-1"
    );
    assert_eq!(*e.0.lock().unwrap(), vec![("t".to_string(), child)]);

    // Flows go the same way: nowhere without an enqueuer.
    let request = FlowRequest {
        definition: "{}".into(),
        started_by: "j1".into(),
        ordinal: 1,
        traceparent: None,
    };
    let bare = backend(&server).await;
    assert!(matches!(
        bare.start_flow("t", request.clone()).await,
        Err(BackendError::Unavailable(m)) if m.contains("broker")
    ));
    assert_eq!(
        b.start_flow("t", request).await.unwrap().flow_id,
        "flow-of-j1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_serialises_read_modify_write() {
    const TASKS: usize = 4;
    const ROUNDS: usize = 250;
    let server = RedisServer::start();
    let b = Arc::new(backend(&server).await);
    // Tokens in acquisition order: pushed while the lock is held.
    let tokens = Arc::new(Mutex::new(Vec::new()));

    let mut handles = Vec::new();
    for task in 0..TASKS {
        let b = b.clone();
        let tokens = tokens.clone();
        handles.push(tokio::spawn(async move {
            let owner = format!("task-{task}");
            for _ in 0..ROUNDS {
                let token = loop {
                    if let Some(t) = b.lock_acquire("t", "l", &owner, LONG).await.unwrap() {
                        break t;
                    }
                    tokio::task::yield_now().await;
                };
                tokens.lock().unwrap().push(token);
                let n: u64 = match b.kv_get("t", "n").await.unwrap() {
                    Some(v) => String::from_utf8(v).unwrap().parse().unwrap(),
                    None => 0,
                };
                b.kv_set("t", "n", (n + 1).to_string().as_bytes(), None)
                    .await
                    .unwrap();
                assert!(b.lock_release("t", "l", &owner).await.unwrap());
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }

    let total = b.kv_get("t", "n").await.unwrap().unwrap();
    assert_eq!(total, b"1000");
    let tokens = tokens.lock().unwrap();
    assert_eq!(tokens.len(), TASKS * ROUNDS);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens strictly increase in acquisition order"
    );
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let mut server = RedisServer::start_persistent();
    let b = backend(&server).await;

    b.kv_set("t", "k", b"kept", None).await.unwrap();
    b.counter_incr("t", "c", 3).await.unwrap();
    server.restart();
    assert_eq!(
        eventually(|| b.kv_get("t", "k")).await,
        Some(b"kept".to_vec())
    );
    assert_eq!(b.counter_get("t", "c").await.unwrap(), 3);

    // During an outage calls fail as Unavailable (they do not hang)...
    server.kill();
    for _ in 0..3 {
        match b.kv_get("t", "k").await {
            Err(BackendError::Unavailable(m)) => assert!(m.contains("kv get"), "{m}"),
            other => panic!("expected Unavailable during the outage, got {other:?}"),
        }
    }
    assert!(matches!(
        b.lock_acquire("t", "l", "o", LONG).await,
        Err(BackendError::Unavailable(_))
    ));

    // ...and work again once Redis is back, on the same backend.
    server.restart();
    assert_eq!(
        eventually(|| b.kv_get("t", "k")).await,
        Some(b"kept".to_vec())
    );
    assert_eq!(b.counter_incr("t", "c", 1).await.unwrap(), 4);
    assert!(b.lock_acquire("t", "l", "o", LONG).await.unwrap().is_some());
}

/// Retry `f` until it succeeds (the connection manager reconnects in the
/// background), for at most 10 s.
async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = BackendResult<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("backend did not recover within 10 s: {e}"),
        }
    }
}

/// Make `token` the lease holder of job `job` of `tenant`, as a fetch does.
async fn hold_lease(server: &RedisServer, tenant: &str, job: &str, token: &str) {
    let _: () = ::redis::cmd("HSET")
        .arg(wasmq::keys::Keys::new(tenant).job(job))
        .arg("lease")
        .arg(token)
        .query_async(&mut server.connect().await)
        .await
        .unwrap();
}

/// A delivery whose lease was lost (its job was redelivered, and the new
/// delivery took the step over) can neither abandon nor complete the step:
/// another job naming the step still finds it busy.
#[tokio::test]
async fn a_stale_delivery_cannot_give_up_the_live_deliverys_step() {
    let server = RedisServer::start();
    let b = backend(&server).await;
    let delivery = |job: &str, token: &str| Claimant {
        job: job.into(),
        token: Some(token.into()),
    };
    let (stale, live, other) = (
        delivery("J", "w:1"),
        delivery("J", "w:2"),
        delivery("K", "x:1"),
    );
    hold_lease(&server, "t", "J", "w:1").await;
    hold_lease(&server, "t", "K", "x:1").await;
    assert_eq!(
        b.step_begin("t", "email:42", &stale, LONG).await.unwrap(),
        StepState::Run
    );
    hold_lease(&server, "t", "J", "w:2").await;
    assert_eq!(
        b.step_begin("t", "email:42", &live, LONG).await.unwrap(),
        StepState::Run
    );
    b.step_abandon("t", "email:42", &stale).await.unwrap();
    assert_eq!(
        b.step_begin("t", "email:42", &other, LONG).await.unwrap(),
        StepState::Busy,
        "the stale delivery gave up the live one's claim"
    );
    assert!(matches!(
        b.step_complete("t", "email:42", &stale, b"x", None).await,
        Err(BackendError::LeaseLost(_))
    ));
}

/// Step outputs count against the store quota: a step reserves room for its
/// output when it begins, so a guest cannot open many small claims under the
/// quota and fill each with a large output.
#[tokio::test]
async fn step_outputs_stay_within_the_store_quota() {
    use wasmq::backend::redis::{store_totals, StoreQuota};
    const QUOTA: u64 = 20_000;
    let server = RedisServer::start();
    let b = RedisBackend::new(server.connect().await).with_quota(StoreQuota {
        max_bytes: QUOTA,
        max_keys: 0,
    });
    let d = Claimant {
        job: "J".into(),
        token: Some("w:1".into()),
    };
    hold_lease(&server, "t", "J", "w:1").await;
    let mut begun = 0;
    for i in 0..1000 {
        match b.step_begin("t", &format!("s{i}"), &d, LONG).await {
            Ok(StepState::Run) => begun += 1,
            Ok(state) => panic!("{state:?}"),
            Err(BackendError::Denied(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let output = vec![b'x'; 100_000];
    for i in 0..begun {
        b.step_complete("t", &format!("s{i}"), &d, &output, None)
            .await
            .unwrap();
    }
    let (bytes, _) = store_totals(&mut server.connect().await, "t")
        .await
        .unwrap();
    println!(
        "{begun} claims under a {QUOTA}-byte quota; {bytes} bytes stored after completing them"
    );
    assert!(
        begun <= 8,
        "{begun} claims open at once under a small quota"
    );
    // Each completion passes its reservation (an eighth of the quota) by at
    // most one output: bounded, where it used to be a thousand outputs.
    assert!(bytes <= QUOTA + begun as u64 * 100_000, "{bytes} bytes");
}
