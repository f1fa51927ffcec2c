//! Workflows (issue 12, part 2) on a real redis-server with real workers:
//! a chain passes results on, a group and a chord of 100 finish with the
//! callback released and run once while a worker is killed with SIGKILL,
//! a failed member cancels what waits on it (naming it) or lets it run
//! when told to continue, the continuation is released once when its last
//! dependency is delivered twice, a guest fans out with `scrape`, a
//! 0.1.0 component runs beside a 0.2.0 one, and (issue 21) a group of 500
//! after a group of 500 is one barrier of 1,000 links whose successors
//! each run once, in order.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::components::{example_task_bytes, Lang};
use common::http::{Reply, TestServer};
use common::jobs::redis_with_task;
use common::redis::RedisServer;
use common::web::Dashboard;
use common::workers::{in_process_config, spawn_process, start_configured, start_in_process};
use common::{guest_bytes, text, wasmq, TempDir};
use serde_json::{json, Value};
use wasmq::broker::{Broker, FlowState, LeaseTerms, Outcome, ResultState};
use wasmq::flow::Node;
use wasmq::keys::Keys;
use wasmq::policy::TaskPolicy;
use wasmq::usage::Usage;

const TENANT: &str = "acme";
const WAIT: Duration = Duration::from_secs(60);

fn add(n: i64) -> Value {
    json!({"task": "step", "payload": {"op": "add", "n": n}})
}

async fn finished(broker: &Broker, flow: &str) -> Result<Value, wasmq::failure::Failure> {
    match broker.flow_state(TENANT, flow, Some(WAIT)).await.unwrap() {
        FlowState::Finished(result) => result,
        other => panic!("flow {flow} did not finish in {WAIT:?}: {other:?}"),
    }
}

async fn job_fields(broker: &Broker, id: &str, fields: &[&str]) -> Vec<Option<String>> {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(Keys::new(TENANT).job(id));
    for f in fields {
        cmd.arg(*f);
    }
    cmd.query_async(&mut broker.connection()).await.unwrap()
}

fn num(v: &Option<String>) -> u64 {
    v.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_passes_each_result_on() {
    let (_redis, broker) =
        redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let (stop, worker) = start_in_process(&broker, TENANT, 4, Duration::from_secs(30), "w1");
    let definition = json!({"chain": [add(1), add(10), add(100),
        {"task": "step", "payload": {"op": "deps"}}]});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    assert_eq!(started.job_ids.len(), 4);
    let result = finished(&broker, &started.flow_id).await.unwrap();
    // Every step was released from waiting onto its queue.
    assert_eq!(broker.queue(TENANT, "default").await.unwrap().waiting, 0);
    // The last step saw the third's result (1 + 10 + 100) in its context.
    assert_eq!(result["flow"], json!(started.flow_id));
    assert_eq!(
        result["deps"],
        json!([{"job": started.job_ids[2], "task": "step", "ok": "111", "err": null}])
    );
    // Each step started after the one before it finished (Redis clock).
    let mut last_finish = 0;
    for id in &started.job_ids {
        let f = job_fields(&broker, id, &["state", "started_at_us", "finished_at_us"]).await;
        assert_eq!(f[0].as_deref(), Some("succeeded"), "{id}");
        assert!(
            num(&f[1]) >= last_finish,
            "{id} started before its dependency ended"
        );
        last_finish = num(&f[2]);
    }
    // A flow's result is its last node's: here, one chain of plain adds,
    // built with the Rust API.
    let step = |n: i64| Node::step("step", json!({"op": "add", "n": n}));
    let chain = Node::chain([step(1), step(2), step(3)]);
    let started = broker.start_flow_node(TENANT, &chain, None).await.unwrap();
    assert_eq!(finished(&broker, &started.flow_id).await.unwrap(), json!(6));
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// The callback of a chord of 100, and a group of 100 beside it, finish
/// while one of two worker processes is killed mid-flow; the callback is
/// released once and its step-marked counter counts one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_and_a_chord_of_100_finish_with_one_callback_through_a_kill() {
    let (redis, broker) = redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let args = ["--concurrency", "8", "--lease", "2s"];
    let mut victim = spawn_process(&redis.url, TENANT, &args);
    let _other = spawn_process(&redis.url, TENANT, &args);
    let members = |sleep: u64| -> Vec<Value> {
        (0..100)
            .map(|i| json!({"task": "step", "payload": {"op": "add", "n": i, "sleep_ms": sleep}}))
            .collect()
    };
    let chord = json!({"chord": {"group": members(40),
        "then": {"task": "step", "payload": {"op": "sum"}}}});
    let group = json!({"group": members(40)});
    let chord = broker
        .start_flow(TENANT, &chord.to_string(), None)
        .await
        .unwrap();
    let group = broker
        .start_flow(TENANT, &group.to_string(), None)
        .await
        .unwrap();
    // Kill one worker once the members are under way.
    let keys = Keys::new(TENANT);
    let deadline = Instant::now() + WAIT;
    loop {
        let settled: Option<u64> = redis::cmd("HGET")
            .arg(keys.flow(&chord.flow_id))
            .arg("settled")
            .query_async(&mut broker.connection())
            .await
            .unwrap();
        if settled.unwrap_or(0) >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the chord's members never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill().unwrap();
    let _ = victim.wait();

    let result = finished(&broker, &chord.flow_id).await.unwrap();
    assert_eq!(result["sum"], json!(4950), "{result}");
    assert_eq!(result["members"], json!(100));
    assert_eq!(result["failed"], json!([]));
    let group_result = finished(&broker, &group.flow_id).await.unwrap();
    let expected: Vec<i64> = (0..100).collect();
    assert_eq!(group_result, json!(expected));
    // One callback: its counter, behind a step marker, counted one run, and
    // the callback job was released (enqueued) once.
    let callbacks: Option<i64> = redis::cmd("GET")
        .arg(format!("{}counter:callbacks", keys.prefix()))
        .query_async(&mut broker.connection())
        .await
        .unwrap();
    assert_eq!(callbacks, Some(1));
    let callback = chord.job_ids.last().unwrap();
    let history: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.history(callback))
        .arg(0)
        .arg(-1)
        .query_async(&mut broker.connection())
        .await
        .unwrap();
    let f = job_fields(&broker, callback, &["state", "attempts"]).await;
    assert_eq!(f[0].as_deref(), Some("succeeded"), "{history:?}");
    assert_eq!(f[1].as_deref(), Some("1"), "{history:?}");
    // How many deliveries the kill cost (for the log: the victim usually
    // held some members when it died, and they were delivered again).
    let mut lost = 0;
    for id in chord.job_ids.iter().chain(&group.job_ids) {
        lost += num(&job_fields(&broker, id, &["lost"]).await[0]);
    }
    println!("deliveries lost to the kill: {lost}");
}

/// The continuation goes on its queue once, even when its last
/// dependency is delivered twice (the first delivery's lease lapsed): the
/// stale delivery's outcome is refused and moves nothing on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_continuation_is_released_once_when_its_last_dependency_is_delivered_twice() {
    let (_redis, broker) =
        redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let definition = json!({"chord": {"group": [add(1), add(2)],
        "then": {"task": "step", "payload": {"op": "sum"}}}});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let terms = |lease: u64| LeaseTerms {
        worker: "w",
        lease: Duration::from_millis(lease),
        max_deliveries: 20,
        cluster_cap: None,
        rate_limit: None,
    };
    let first = broker
        .fetch(TENANT, "default", 10, terms(50))
        .await
        .unwrap();
    assert_eq!(
        first.len(),
        2,
        "the members, and not the callback, are queued"
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    let second = broker
        .fetch(TENANT, "default", 10, terms(30_000))
        .await
        .unwrap();
    assert_eq!(second.len(), 2, "both members are delivered again");
    let done = |result: &str| Outcome::Succeeded {
        result: result.to_string(),
        store: None,
        idempotency_ttl: Duration::from_secs(60),
    };
    let usage = Usage::default();
    for job in &second {
        let n = if job.id.ends_with("-0") { "1" } else { "2" };
        broker
            .complete(&Arc::new(job.clone()), &done(n), &usage)
            .await
            .unwrap();
    }
    // The stale deliveries finish too, with other results: refused.
    for job in &first {
        let recorded = broker
            .complete(&Arc::new(job.clone()), &done("1000"), &usage)
            .await
            .unwrap();
        assert_eq!(format!("{recorded:?}"), "Stale");
    }
    let callback = broker
        .fetch(TENANT, "default", 10, terms(30_000))
        .await
        .unwrap();
    assert_eq!(callback.len(), 1, "the callback is queued once");
    assert_eq!(&callback[0].id, started.job_ids.last().unwrap());
    let dependencies = broker
        .flow_dependencies(TENANT, &started.flow_id, &started.job_ids[..2])
        .await
        .unwrap();
    let results: Vec<_> = dependencies.iter().map(|d| d.2.clone()).collect();
    assert_eq!(results, vec![Ok("1".to_string()), Ok("2".to_string())]);
    assert!(broker
        .fetch(TENANT, "default", 10, terms(30_000))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_member_cancels_what_waits_naming_it_unless_told_to_continue() {
    let (_redis, broker) =
        redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let (stop, worker) = start_in_process(&broker, TENANT, 4, Duration::from_secs(30), "w1");
    let fail = json!({"task": "step", "payload": {"op": "fail"}});
    let sum = json!({"task": "step", "payload": {"op": "sum"}});

    // Cancel (the default): the callback and the step after it end
    // `cancelled`, naming the failed step.
    let definition = json!({"chain": [
        {"chord": {"group": [add(1), fail, add(3)], "then": sum}},
        add(5)]});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let failure = finished(&broker, &started.flow_id).await.unwrap_err();
    assert_eq!(failure.category.as_str(), "cancelled", "{failure}");
    let failed_step = &started.job_ids[1];
    assert!(failure.message.contains(failed_step.as_str()), "{failure}");
    for id in &started.job_ids[3..] {
        let status = broker.status(TENANT, id).await.unwrap().unwrap();
        assert_eq!(status.state, "cancelled", "{id}");
        let error = status.last_error.unwrap().to_string();
        assert!(error.contains("waited for step"), "{error}");
    }
    let callback = broker
        .status(TENANT, &started.job_ids[3])
        .await
        .unwrap()
        .unwrap();
    assert!(callback
        .last_error
        .unwrap()
        .to_string()
        .contains(failed_step.as_str()));
    // The failed step is dead-lettered as any job would be; the others ran.
    let f = job_fields(&broker, failed_step, &["state"]).await;
    assert_eq!(f[0].as_deref(), Some("dead"));

    // Continue: the callback runs and sees the failure among its inputs.
    let definition = json!({"chord": {"group": [add(1), fail, add(3)], "then": sum},
        "on_failure": "continue"});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let result = finished(&broker, &started.flow_id).await.unwrap();
    assert_eq!(result["sum"], json!(4));
    assert_eq!(result["failed"][0]["job"], json!(started.job_ids[1]));
    let error = result["failed"][0]["error"].as_str().unwrap();
    assert!(error.starts_with("task-error: "), "{error}");
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// An operator's cancel of a waiting step: it ends `cancelled` at once
/// and never runs, what waits on it is cancelled, and the flow still
/// finishes once its members end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_waiting_step_cancels_what_waits_on_it() {
    let (redis, broker) = redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let definition = json!({"chain": [add(1), add(2), add(3)]});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let middle = &started.job_ids[1];
    let status = text(&wasmq(&redis.url, TENANT, &["status", middle]).stdout);
    assert!(status.contains("state      waiting"), "{status}");
    assert!(
        status.contains(&format!("still for  {}", started.job_ids[0])),
        "{status}"
    );
    // The dashboard's job page links the step to its flow's neighbours.
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let page = web
        .client()
        .get(&format!("/t/{TENANT}/jobs/{middle}"))
        .await;
    assert_eq!(page.status, 200);
    for id in [&started.job_ids[0], &started.job_ids[2], &started.flow_id] {
        assert!(page.body.contains(id.as_str()), "{id} not on the page");
    }
    assert!(
        page.body.contains("Cancel job"),
        "a waiting step can be cancelled"
    );
    let listed = text(&wasmq(&redis.url, TENANT, &["jobs", "--state", "waiting"]).stdout);
    assert!(
        listed.contains(middle.as_str()) && listed.contains(started.job_ids[2].as_str()),
        "{listed}"
    );
    assert!(!listed.contains(started.job_ids[0].as_str()), "{listed}");
    // `wasmq queues` counts them, on the queue they will go to.
    let queue = broker.queue(TENANT, "default").await.unwrap();
    assert_eq!((queue.ready, queue.waiting), (1, 2), "{queue:?}");
    let printed = text(&wasmq(&redis.url, TENANT, &["queues"]).stdout);
    let row = printed.lines().find(|l| l.starts_with("default")).unwrap();
    assert_eq!(row.split_whitespace().last(), Some("2"), "{printed}");
    let out = wasmq(&redis.url, TENANT, &["cancel", middle]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (stop, worker) = start_in_process(&broker, TENANT, 2, Duration::from_secs(30), "w1");
    let failure = finished(&broker, &started.flow_id).await.unwrap_err();
    assert_eq!(failure.category.as_str(), "cancelled");
    let last = job_fields(&broker, &started.job_ids[2], &["state", "started_at_ms"]).await;
    assert_eq!(last[0].as_deref(), Some("cancelled"));
    assert_eq!(last[1], None, "the last step never ran");
    let listed = text(&wasmq(&redis.url, TENANT, &["jobs", "--state", "waiting"]).stdout);
    assert!(
        !listed.contains(started.flow_id.as_str()),
        "nothing waits now: {listed}"
    );
    assert_eq!(broker.queue(TENANT, "default").await.unwrap().waiting, 0);
    let first = job_fields(&broker, &started.job_ids[0], &["state"]).await;
    assert_eq!(first[0].as_deref(), Some("succeeded"));
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// `scrape` given a list of pages fans out as a chord from inside the
/// guest and returns at once; the summary step gets every page's result.
/// The fan-out job run a second time (a duplicate delivery) starts no
/// second flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_fans_out_over_pages_with_scrape() {
    a_guest_fans_out_over_pages_with_scrape_in(Lang::Rust).await;
}

/// [`a_guest_fans_out_over_pages_with_scrape`] with the Python twin of
/// `scrape` (tasks/scrape-py): `flows.chord` and `job.results()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_fans_out_over_pages_with_scrape_py() {
    a_guest_fans_out_over_pages_with_scrape_in(Lang::Python).await;
}

async fn a_guest_fans_out_over_pages_with_scrape_in(lang: Lang) {
    let Some(scrape) = example_task_bytes("scrape", lang) else {
        return;
    };
    let site = TestServer::start(|req, _| {
        let links = req
            .path
            .trim_start_matches("/p")
            .parse::<usize>()
            .unwrap_or(0);
        Reply::ok("<a href=x>".repeat(links))
    })
    .await;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![site.authority()];
    policy.store_result = true;
    broker
        .deploy(TENANT, "scrape", &scrape, &policy)
        .await
        .unwrap();
    let mut config = in_process_config(&broker, TENANT, 4, Duration::from_secs(30), "w1");
    if lang == Lang::Python {
        // The disk cache the tests share: the 18 MB component compiles
        // once (10-20 s of CPU), not once per test.
        config.cache_dir = Some(common::shared_cache_dir());
    }
    let (stop, worker, _) = start_configured(config);
    let pages: Vec<String> = (1..=5).map(|i| site.url(&format!("/p{i}"))).collect();
    let request = wasmq::broker::EnqueueRequest {
        tenant: TENANT.into(),
        task: "scrape".into(),
        payload: json!({"pages": pages}),
        ..Default::default()
    };
    let id = broker.enqueue(request).await.unwrap().id;
    let ResultState::Ready(started) = broker.result(TENANT, &id, Some(WAIT)).await.unwrap() else {
        panic!("the fan-out job did not succeed");
    };
    let flow = started["flow_id"].as_str().unwrap().to_string();
    assert_eq!(started["job_ids"].as_array().unwrap().len(), 6);
    let summary = finished(&broker, &flow).await.unwrap();
    assert_eq!(summary["pages"], json!(5));
    assert_eq!(summary["links"], json!(1 + 2 + 3 + 4 + 5));
    assert_eq!(summary["urls"], json!(pages));
    let status = broker
        .status(TENANT, started["job_ids"][5].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    let membership = status.flow.unwrap();
    assert_eq!(membership.started_by.as_deref(), Some(id.as_str()));
    assert_eq!(membership.waits_on.len(), 5);
    // And the job that fanned out names the flow it started.
    let parent = broker.status(TENANT, &id).await.unwrap().unwrap();
    assert_eq!(parent.flows_started, vec![flow.clone()]);
    let printed = text(&wasmq(&redis.url, TENANT, &["status", &id]).stdout);
    assert!(
        printed.contains(&format!("started    flow {flow}")),
        "{printed}"
    );
    stop.send(()).unwrap();
    worker.await.unwrap();

    // The same job delivered again finds the flow it started.
    let again = wasmq::backend::FlowRequest {
        definition: "{}".into(),
        started_by: id.clone(),
        ordinal: 1,
        traceparent: None,
    };
    let err = broker.start_flow_for_job(TENANT, &again).await.unwrap_err();
    assert!(err.to_string().contains("a node needs one of"), "{err}");
    let again = wasmq::backend::FlowRequest {
        definition: json!({"task": "scrape", "payload": {"url": "x"}}).to_string(),
        ..again
    };
    let found = broker.start_flow_for_job(TENANT, &again).await.unwrap();
    assert_eq!(
        found.flow_id, flow,
        "an earlier delivery's flow is found again"
    );
    assert_eq!(site.requests().len(), 5, "no page was fetched twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_1_0_and_a_0_2_0_component_run_side_by_side_on_one_worker() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let policy = TaskPolicy {
        store_result: true,
        ..TaskPolicy::default()
    };
    let old = guest_bytes("task_v010");
    broker.deploy(TENANT, "old", &old, &policy).await.unwrap();
    broker
        .deploy(TENANT, "new", &guest_bytes("flowstep"), &policy)
        .await
        .unwrap();
    let (stop, worker) = start_in_process(&broker, TENANT, 2, Duration::from_secs(30), "w1");
    let mut ids = Vec::new();
    for (task, payload) in [
        ("old", json!({"x": 1})),
        ("new", json!({"op": "add", "n": 7})),
    ] {
        for _ in 0..3 {
            let request = wasmq::broker::EnqueueRequest {
                tenant: TENANT.into(),
                task: task.into(),
                payload: payload.clone(),
                ..Default::default()
            };
            ids.push((task, broker.enqueue(request).await.unwrap().id));
        }
    }
    for (task, id) in &ids {
        let ResultState::Ready(value) = broker.result(TENANT, id, Some(WAIT)).await.unwrap() else {
            panic!("{task} job {id} did not succeed");
        };
        match *task {
            "old" => {
                assert_eq!(value["world"], json!("0.1.0"));
                assert_eq!(value["payload"], json!({"x": 1}));
            }
            _ => assert_eq!(value, json!(7)),
        }
    }
    stop.send(()).unwrap();
    worker.await.unwrap();

    // The CLI names the world a component was built against.
    let dir = TempDir::new("v010");
    let path = dir.path().join("old.wasm");
    std::fs::write(&path, &old).unwrap();
    let out = wasmq(
        &redis.url,
        TENANT,
        &["deploy", path.to_str().unwrap(), "--name", "old2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(said.contains("wasmq:task@0.1.0"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_command_starts_waits_and_names_bad_definitions() {
    let (redis, broker) = redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let (stop, worker) = start_in_process(&broker, TENANT, 4, Duration::from_secs(30), "w1");
    let dir = TempDir::new("flows");
    let file = dir.path().join("flow.json");
    std::fs::write(
        &file,
        json!({"chain": [add(2), {"group": [add(1), add(10)]}]}).to_string(),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = wasmq(&redis.url, TENANT, &["flow", path, "--wait", "60s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[3,12]");

    // Without --wait: the flow id, then its jobs; `--id` looks it up.
    let out = wasmq(&redis.url, TENANT, &["flow", path]);
    let printed = text(&out.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 4, "{printed}");
    let out = wasmq(
        &redis.url,
        TENANT,
        &["flow", "--id", lines[0], "--wait", "60s"],
    );
    assert_eq!(text(&out.stdout).trim(), "[3,12]");
    let status = text(&wasmq(&redis.url, TENANT, &["status", lines[2]]).stdout);
    assert!(
        status.contains(&format!("flow       {}", lines[0])),
        "{status}"
    );
    assert!(
        status.contains(&format!("waits for  {}", lines[1])),
        "{status}"
    );

    // A failed flow exits non-zero with the category of what failed.
    std::fs::write(
        &file,
        json!({"chain": [{"task": "step", "payload": {"op": "fail"}}, add(1)]}).to_string(),
    )
    .unwrap();
    let out = wasmq(&redis.url, TENANT, &["flow", path, "--wait", "60s"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cancelled"),
        "{}",
        text(&out.stderr)
    );

    // Bad definitions and unknown tasks are refused before anything runs.
    for (definition, expect) in [
        (
            json!({"chain": [add(1), {"tsk": "x"}]}),
            "flow.chain[1]: a node needs one of",
        ),
        (
            json!({"group": [{"task": "nope"}]}),
            "flow.group[0]: no task \"nope\"",
        ),
    ] {
        std::fs::write(&file, definition.to_string()).unwrap();
        let out = wasmq(&redis.url, TENANT, &["flow", path]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(expect), "{}", text(&out.stderr));
    }
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// A guest's flow steps are its child jobs: they count against the
/// tenant's `max_children_per_minute` as child enqueues do, all of a
/// flow's steps or none (a refused flow writes nothing), while an
/// operator's flows do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_flow_steps_count_against_the_tenants_children_per_minute() {
    let site = TestServer::start(|_, _| Reply::ok("<a href=x>")).await;
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let out = wasmq(
        &redis.url,
        TENANT,
        &[
            "tenant",
            "create",
            TENANT,
            "--max-children-per-minute",
            "8",
            "--allow-private-networks",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut policy = TaskPolicy::default();
    policy.sandbox.allow_http = vec![site.authority()];
    policy.store_result = true;
    policy.retry.max_attempts = 1;
    broker
        .deploy(TENANT, "scrape", &guest_bytes("scrape"), &policy)
        .await
        .unwrap();
    let (stop, worker) = start_in_process(&broker, TENANT, 4, Duration::from_secs(30), "w1");
    let fan_out = |pages: usize| {
        let broker = broker.clone();
        let pages: Vec<String> = (0..pages).map(|i| site.url(&format!("/p{i}"))).collect();
        async move {
            let request = wasmq::broker::EnqueueRequest {
                tenant: TENANT.into(),
                task: "scrape".into(),
                payload: json!({ "pages": pages }),
                ..Default::default()
            };
            let id = broker.enqueue(request).await.unwrap().id;
            let state = broker.result(TENANT, &id, Some(WAIT)).await.unwrap();
            (id, state)
        }
    };
    let refused = |state: ResultState| match state {
        ResultState::Failed(f) => {
            assert_eq!(f.category, wasmq::failure::Category::Denied, "{f}");
            assert!(f.message.contains("max_children_per_minute"), "{f}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    };

    // Nine steps never fit in eight a minute.
    let (id, state) = fan_out(8).await;
    refused(state);
    let status = broker.status(TENANT, &id).await.unwrap().unwrap();
    assert!(
        status.flows_started.is_empty(),
        "a refused flow wrote nothing"
    );

    // Within one minute (by Redis's clock, with room to spare): four steps
    // fit, six more do not.
    let mut conn = redis.connect().await;
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    if secs % 60 > 40 {
        tokio::time::sleep(Duration::from_secs(61 - secs % 60)).await;
    }
    let (_, state) = fan_out(3).await;
    let ResultState::Ready(started) = state else {
        panic!("four steps fit in eight: {state:?}");
    };
    let summary = finished(&broker, started["flow_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(summary["pages"], json!(3));
    let (_, state) = fan_out(5).await;
    refused(state);
    assert_eq!(
        broker.usage(TENANT).await.unwrap()["children_this_minute"],
        4
    );

    // An operator's flow is not a child job: it is not counted.
    let operator = Node::group(vec![
        Node::step("scrape", json!({"url": site.url("/x")}));
        9
    ]);
    let started = broker
        .start_flow_node(TENANT, &operator, None)
        .await
        .unwrap();
    assert_eq!(started.job_ids.len(), 9);
    assert_eq!(
        broker.usage(TENANT).await.unwrap()["children_this_minute"],
        4
    );
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// The largest allowed flow, a chain of two groups of 500, is linear in
/// Redis: one barrier of 500 members and 500 successors (1,000 links, not
/// the 250,000 pairs of every step before with every step after); its
/// submit is one short script; and every step after the barrier runs once,
/// after every step before it ended, receiving all 500 results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_after_a_group_of_500_is_linear_and_runs_each_successor_once_in_order() {
    let (_redis, broker) =
        redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let keys = Keys::new(TENANT);
    let mut conn = broker.connection();
    let config = |name: &'static str, value: &'static str| {
        let mut conn = broker.connection();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    // Every command goes to the slow log, so its longest is the longest
    // any client waited behind.
    config("slowlog-log-slower-than", "0").await;
    config("slowlog-max-len", "100000").await;
    let used_memory = |conn: &mut redis::aio::ConnectionManager| {
        let mut conn = conn.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<i64>().ok())
                .unwrap()
        }
    };
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();
    let before = used_memory(&mut conn).await;

    let adds: Vec<Value> = (0..500).map(add).collect();
    let sums = vec![json!({"task": "step", "payload": {"op": "sum"}}); 500];
    let definition = json!({"chain": [{"group": adds}, {"group": sums}]});
    let submit_began = Instant::now();
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let submit_wall = submit_began.elapsed();
    let written = used_memory(&mut conn).await - before;
    let submit_longest = longest_command(&mut conn).await;
    assert_eq!(started.job_ids.len(), wasmq::limits::MAX_FLOW_STEPS);

    // The links written: the ids the barriers hash lists, and any list a
    // step's own `flow` field or envelope carries.
    let barriers: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.flow_barriers(&started.flow_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut links: usize = barriers
        .iter()
        .filter(|(field, _)| field.ends_with(":members") || field.ends_with(":successors"))
        .map(|(_, ids)| ids.split_whitespace().count())
        .sum();
    let mut pipe = redis::pipe();
    for id in &started.job_ids {
        pipe.cmd("HMGET")
            .arg(keys.job(id))
            .arg("flow")
            .arg("envelope");
    }
    let fields: Vec<(String, String)> = pipe.query_async(&mut conn).await.unwrap();
    for (flow, envelope) in &fields {
        let flow: Value = serde_json::from_str(flow).unwrap();
        let envelope: Value = serde_json::from_str(envelope).unwrap();
        links += flow["dependents"].as_array().map_or(0, Vec::len);
        links += envelope["flow"]["waits_on"].as_array().map_or(0, Vec::len);
    }
    let waits_sets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}flow:{}:waits:*", keys.prefix(), started.flow_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    println!(
        "submit of 500 + 500 steps: {links} links, {} KiB of Redis memory, longest command {:?} ({}), {submit_wall:?} wall",
        written / 1024,
        submit_longest.0,
        submit_longest.1,
    );
    assert_eq!(links, 1_000, "one barrier: 500 members, 500 successors");
    assert!(waits_sets.is_empty(), "{waits_sets:?}");
    // Generous: the quadratic layout took ~300 ms; the bound only catches
    // a return to it on a shared machine, the figure is printed above.
    assert!(
        submit_longest.0 < Duration::from_millis(100),
        "{submit_longest:?}"
    );
    let queue = broker.queue(TENANT, "default").await.unwrap();
    assert_eq!((queue.ready, queue.waiting), (500, 500), "{queue:?}");

    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (stop, worker) = start_in_process(&broker, TENANT, 8, Duration::from_secs(30), "w1");
    let result = finished(&broker, &started.flow_id).await.unwrap();
    let run_longest = longest_command(&mut conn).await;
    stop.send(()).unwrap();
    worker.await.unwrap();
    println!(
        "running it: longest command {:?} ({})",
        run_longest.0, run_longest.1
    );

    // Each successor received all 500 results, in order of the group.
    let sums = result.as_array().unwrap();
    assert_eq!(sums.len(), 500);
    for sum in sums {
        assert_eq!(sum["sum"], json!((0..500).sum::<i64>()), "{sum}");
        assert_eq!(sum["members"], json!(500));
        assert_eq!(sum["failed"], json!([]));
    }
    // Each ran once: the step-marked counter counts 500 runs, one attempt
    // each, and none started before the last step before it ended.
    let callbacks: Option<i64> = redis::cmd("GET")
        .arg(format!("{}counter:callbacks", keys.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(callbacks, Some(500));
    let mut last_before = 0;
    for id in &started.job_ids[..500] {
        let f = job_fields(&broker, id, &["state", "finished_at_us"]).await;
        assert_eq!(f[0].as_deref(), Some("succeeded"), "{id}");
        last_before = last_before.max(num(&f[1]));
    }
    for id in &started.job_ids[500..] {
        let f = job_fields(&broker, id, &["state", "attempts", "started_at_us"]).await;
        assert_eq!(f[0].as_deref(), Some("succeeded"), "{id}");
        assert_eq!(f[1].as_deref(), Some("1"), "{id}");
        assert!(
            num(&f[2]) >= last_before,
            "{id} started before the barrier opened"
        );
    }
    let dependencies = broker
        .flow_dependencies(TENANT, &started.flow_id, &started.job_ids[..2])
        .await
        .unwrap();
    assert_eq!(dependencies[1].2, Ok("1".to_string()));
    let status = broker
        .status(TENANT, &started.job_ids[999])
        .await
        .unwrap()
        .unwrap();
    let membership = status.flow.unwrap();
    assert_eq!(membership.waits_on, started.job_ids[..500]);
    assert!(membership.still_waiting_on.is_empty());
    let status = broker
        .status(TENANT, &started.job_ids[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.flow.unwrap().dependents, started.job_ids[500..]);
}

/// A failed member of a group cancels every step of the group after it,
/// each once and naming it, and what follows them in turn; the barrier
/// records which member cancelled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_member_cancels_the_whole_group_after_it_once() {
    let (_redis, broker) =
        redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let (stop, worker) = start_in_process(&broker, TENANT, 4, Duration::from_secs(30), "w1");
    let fail = json!({"task": "step", "payload": {"op": "fail"}});
    let definition = json!({"chain": [
        {"group": [add(1), fail, add(3)]},
        {"group": [add(1), add(2), add(3)]},
        add(5)]});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let failure = finished(&broker, &started.flow_id).await.unwrap_err();
    stop.send(()).unwrap();
    worker.await.unwrap();
    assert_eq!(failure.category.as_str(), "cancelled", "{failure}");
    let ids = &started.job_ids;
    let states: Vec<Option<String>> = {
        let mut out = Vec::new();
        for id in ids {
            out.push(job_fields(&broker, id, &["state"]).await.remove(0));
        }
        out
    };
    let expected = [
        "succeeded",
        "dead",
        "succeeded",
        "cancelled",
        "cancelled",
        "cancelled",
        "cancelled",
    ];
    assert_eq!(states, expected.map(|s| Some(s.to_string())));
    let keys = Keys::new(TENANT);
    for (i, id) in ids.iter().enumerate().skip(3) {
        let history: Vec<String> = redis::cmd("LRANGE")
            .arg(keys.history(id))
            .arg(0)
            .arg(-1)
            .query_async(&mut broker.connection())
            .await
            .unwrap();
        let cancels = history
            .iter()
            .filter(|e| e.contains(r#""event":"cancelled""#))
            .count();
        assert_eq!(cancels, 1, "{id}: {history:?}");
        let error = broker
            .status(TENANT, id)
            .await
            .unwrap()
            .unwrap()
            .last_error
            .unwrap()
            .to_string();
        let names = if i < 6 { &ids[1] } else { &ids[3] };
        assert!(error.contains(names.as_str()), "{id}: {error}");
    }
    let cancelled_by: Option<String> = redis::cmd("HGET")
        .arg(keys.flow_barriers(&started.flow_id))
        .arg("0:cancelled_by")
        .query_async(&mut broker.connection())
        .await
        .unwrap();
    assert_eq!(cancelled_by.as_ref(), Some(&ids[1]));
    assert_eq!(broker.queue(TENANT, "default").await.unwrap().waiting, 0);
}

/// A flow submitted before barriers (a `dependents` list in each step's
/// `flow` field, the steps waited for in the envelope and a waits set)
/// still settles under the barrier scripts: what was in flight when the
/// workers were upgraded finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_submitted_before_barriers_still_settles() {
    let (_redis, broker) =
        redis_with_task(TENANT, "step", "flowstep", &TaskPolicy::default()).await;
    let definition = json!({"chain": [add(1), {"task": "step", "payload": {"op": "deps"}}]});
    let started = broker
        .start_flow(TENANT, &definition.to_string(), None)
        .await
        .unwrap();
    let (first, second) = (&started.job_ids[0], &started.job_ids[1]);
    // Rewrite it as the quadratic layout stored it.
    let keys = Keys::new(TENANT);
    let fields = job_fields(&broker, first, &["flow"]).await;
    let mut flow: Value = serde_json::from_str(fields[0].as_deref().unwrap()).unwrap();
    flow.as_object_mut().unwrap().remove("feeds");
    flow["dependents"] = json!([second]);
    let fields = job_fields(&broker, second, &["envelope"]).await;
    let mut envelope: Value = serde_json::from_str(fields[0].as_deref().unwrap()).unwrap();
    envelope["flow"] = json!({"id": started.flow_id, "waits_on": [first]});
    let _: () = redis::pipe()
        .hset(keys.job(first), "flow", flow.to_string())
        .hset(keys.job(second), "envelope", envelope.to_string())
        .sadd(keys.flow_waits(&started.flow_id, second), first)
        .del(keys.flow_barriers(&started.flow_id))
        .query_async(&mut broker.connection())
        .await
        .unwrap();
    let membership = broker
        .flow_membership(TENANT, second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(membership.still_waiting_on, vec![first.clone()]);
    let membership = broker
        .flow_membership(TENANT, first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(membership.dependents, vec![second.clone()]);

    let (stop, worker) = start_in_process(&broker, TENANT, 2, Duration::from_secs(30), "w1");
    let result = finished(&broker, &started.flow_id).await.unwrap();
    stop.send(()).unwrap();
    worker.await.unwrap();
    assert_eq!(
        result["deps"],
        json!([{"job": first, "task": "step", "ok": "1", "err": null}])
    );
    let waits: bool = redis::cmd("EXISTS")
        .arg(keys.flow_waits(&started.flow_id, second))
        .query_async(&mut broker.connection())
        .await
        .unwrap();
    assert!(!waits, "the waits set emptied");
}

/// The longest command in the slow log (with its name), and empty it.
async fn longest_command(conn: &mut redis::aio::ConnectionManager) -> (Duration, String) {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    let mut longest = (Duration::ZERO, String::new());
    for entry in entries {
        let redis::Value::Array(parts) = entry else {
            continue;
        };
        let (Some(redis::Value::Int(micros)), Some(redis::Value::Array(args))) =
            (parts.get(2), parts.get(3))
        else {
            continue;
        };
        let micros = Duration::from_micros(*micros as u64);
        if micros > longest.0 {
            let name = match args.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            longest = (micros, name);
        }
    }
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(conn)
        .await
        .unwrap();
    longest
}
