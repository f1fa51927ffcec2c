//! Schedules against a real redis-server and real workers: an `--every
//! 1s` schedule fired by three workers (each tick once, none early, by the
//! Redis clock), each catch-up policy after an outage with no worker, a
//! tick the task refuses, the `wasmq schedule` commands, and the
//! dashboard's schedules page. The DST cases are unit tests of the
//! computed instants (`host/src/schedule.rs`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use wasmq::broker::{Broker, DueSchedule, TickClaim};
use wasmq::keys::Keys;
use wasmq::policy::TaskPolicy;
use wasmq::schedule::{CatchUp, Schedule, Timing};

use common::jobs::redis_with_task;
use common::redis::RedisServer;
use common::workers::{spawn_process, start_in_process};
use common::{text, wasmq};

const TENANT: &str = "sched";

/// A schedule job as its record stands: tick (from its idempotency key),
/// enqueue time and state.
#[derive(Debug, Clone)]
struct TickJob {
    tick_ms: u64,
    enqueued_at_ms: u64,
    state: String,
}

/// Every job the tenant's schedules enqueued, by schedule name, ordered by
/// tick.
async fn tick_jobs(redis: &RedisServer) -> BTreeMap<String, Vec<TickJob>> {
    let mut conn = redis.connect().await;
    let pattern = format!("{}job:*", Keys::new(TENANT).prefix());
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut by_schedule: BTreeMap<String, Vec<TickJob>> = BTreeMap::new();
    for key in keys {
        let (envelope, enqueued, state): (String, u64, String) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["envelope", "enqueued_at_ms", "state"])
            .query_async(&mut conn)
            .await
            .unwrap();
        let envelope: Value = serde_json::from_str(&envelope).unwrap();
        let Some(idem) = envelope["idempotency_key"].as_str() else {
            continue;
        };
        let (name, tick) = idem
            .strip_prefix("schedule:")
            .and_then(|rest| rest.rsplit_once(':'))
            .unwrap_or_else(|| panic!("not a tick's key: {idem}"));
        by_schedule
            .entry(name.to_string())
            .or_default()
            .push(TickJob {
                tick_ms: tick.parse().unwrap(),
                enqueued_at_ms: enqueued,
                state,
            });
    }
    for jobs in by_schedule.values_mut() {
        jobs.sort_by_key(|j| j.tick_ms);
    }
    by_schedule
}

/// Sleep until the Redis clock reads at least `t_ms`.
async fn until_redis(broker: &Broker, t_ms: u64) {
    loop {
        let now = broker.redis_now_ms().await.unwrap();
        if now >= t_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis((t_ms - now).min(200))).await;
    }
}

fn every(secs: u64, catch_up: CatchUp) -> Schedule {
    Schedule {
        task: "noop".into(),
        payload: json!({}),
        timing: Timing::every(Duration::from_secs(secs), 0).unwrap(),
        catch_up,
        paused: false,
    }
}

/// The anchor the broker gave an `--every` schedule.
async fn anchor(broker: &Broker, name: &str) -> u64 {
    match broker
        .schedule_get(TENANT, name)
        .await
        .unwrap()
        .unwrap()
        .timing
    {
        Timing::Every { anchor_ms, .. } => anchor_ms,
        other => panic!("{other:?}"),
    }
}

/// Wait (up to 60 s) until every job of the tenant's schedules succeeded.
async fn all_succeed(redis: &RedisServer) -> BTreeMap<String, Vec<TickJob>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = tick_jobs(redis).await;
        if jobs.values().flatten().all(|j| j.state == "succeeded") {
            return jobs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "schedule jobs did not all succeed: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_second_with_three_workers_fires_each_tick_once_and_never_early() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    // Three workers race for every tick: two in this process, one a
    // `wasmq worker` process. Catch-up `all`, so a round delayed past a
    // tick on this shared machine fires it late rather than dropping it,
    // and every tick must show up exactly once.
    let a = start_in_process(&broker, TENANT, 4, Duration::from_secs(5), "a");
    let b = start_in_process(&broker, TENANT, 4, Duration::from_secs(5), "b");
    let _c = spawn_process(&redis.url, TENANT, &["--concurrency", "4"]);
    broker
        .schedule_put(TENANT, "tick", every(1, CatchUp::All))
        .await
        .unwrap();
    let start = anchor(&broker, "tick").await;
    until_redis(&broker, start + 20_000).await;
    // Removing it stops the firing; a tick in flight may still land.
    assert!(broker.schedule_remove(TENANT, "tick").await.unwrap());
    let end = broker.redis_now_ms().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs = all_succeed(&redis).await.remove("tick").unwrap_or_default();
    for stop in [a, b] {
        let _ = stop.0.send(());
        stop.1.await.unwrap();
    }

    let ticks: Vec<u64> = jobs.iter().map(|j| j.tick_ms).collect();
    assert!(
        (19..=21).contains(&ticks.len()),
        "{} jobs in 20 s of an every-1s schedule: {ticks:?}",
        ticks.len()
    );
    // Each tick once, in phase with the anchor, with no gap, none after
    // the removal.
    let expected: Vec<u64> = (1..=ticks.len() as u64).map(|k| start + k * 1000).collect();
    assert_eq!(ticks, expected, "ticks (anchor {start})");
    assert!(*ticks.last().unwrap() <= end);
    for job in &jobs {
        assert!(
            job.enqueued_at_ms >= job.tick_ms,
            "tick {} fired early, at {}",
            job.tick_ms,
            job.enqueued_at_ms
        );
    }
    // Late by the polling only (generous: the machine is shared).
    let lateness: Vec<u64> = jobs.iter().map(|j| j.enqueued_at_ms - j.tick_ms).collect();
    let mut sorted = lateness.clone();
    sorted.sort();
    assert!(
        sorted[sorted.len() / 2] < 500,
        "median lateness: {lateness:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_outage_each_catch_up_policy_fires_what_it_promises() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let worker = start_in_process(&broker, TENANT, 4, Duration::from_secs(5), "w1");
    for (name, policy) in [
        ("skip", CatchUp::Skip),
        ("one", CatchUp::One),
        ("all", CatchUp::All),
    ] {
        broker
            .schedule_put(TENANT, name, every(6, policy))
            .await
            .unwrap();
    }
    let anchors = [
        anchor(&broker, "skip").await,
        anchor(&broker, "one").await,
        anchor(&broker, "all").await,
    ];
    let t0 = anchors[0];
    // The 6 s tick fires on time; then every worker stops.
    until_redis(&broker, t0 + 7_500).await;
    let _ = worker.0.send(());
    worker.1.await.unwrap();
    // Ticks 12 s and 18 s fall due with no worker; at 20 s the 18 s
    // tick is 2 s late, past the on-time grace, so it counts as missed.
    until_redis(&broker, t0 + 20_000).await;
    let worker = start_in_process(&broker, TENANT, 4, Duration::from_secs(5), "w2");
    // The 24 s tick fires on time again.
    until_redis(&broker, anchors.iter().max().unwrap() + 25_000).await;
    for name in ["skip", "one", "all"] {
        broker.schedule_remove(TENANT, name).await.unwrap();
    }
    let jobs = all_succeed(&redis).await;
    let _ = worker.0.send(());
    worker.1.await.unwrap();

    let fired = |name: &str, anchor: u64| -> Vec<u64> {
        jobs.get(name)
            .map(|js| js.iter().map(|j| (j.tick_ms - anchor) / 1000).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        fired("skip", anchors[0]),
        [6, 24],
        "skip drops the missed ticks"
    );
    assert_eq!(
        fired("one", anchors[1]),
        [6, 18, 24],
        "one fires the latest missed tick once"
    );
    assert_eq!(
        fired("all", anchors[2]),
        [6, 12, 18, 24],
        "all fires every missed tick"
    );
    for job in jobs.values().flatten() {
        assert!(job.enqueued_at_ms >= job.tick_ms, "{job:?} fired early");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_the_task_refuses_is_recorded_and_the_schedule_goes_on() {
    let policy = TaskPolicy {
        max_payload_bytes: 16,
        ..TaskPolicy::default()
    };
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &policy).await;
    let worker = start_in_process(&broker, TENANT, 2, Duration::from_secs(5), "w");
    let mut schedule = every(1, CatchUp::One);
    schedule.payload = json!({"text": "a payload longer than the task allows"});
    broker.schedule_put(TENANT, "big", schedule).await.unwrap();
    let start = anchor(&broker, "big").await;
    until_redis(&broker, start + 3_500).await;
    let views = broker.schedule_list(TENANT).await.unwrap();
    let _ = worker.0.send(());
    worker.1.await.unwrap();
    let view = &views[0];
    let last = view.last.as_ref().expect("the refused tick is recorded");
    assert!(last.job.is_none());
    let error = last.error.as_deref().unwrap();
    assert!(error.contains("bad-payload"), "{error}");
    // It moved on past each refused tick rather than refiring one.
    assert!(last.tick_ms >= start + 2_000, "{last:?} (anchor {start})");
    assert!(view.next_ms.unwrap() > last.tick_ms);
    assert!(tick_jobs(&redis).await.is_empty());
    let out = wasmq(&redis.url, TENANT, &["schedule", "list"]);
    assert!(
        text(&out.stdout).contains("not enqueued: bad-payload"),
        "{}",
        text(&out.stdout)
    );

    // A definition that cannot be read (edited by hand, say) is set aside
    // for a minute and shown, not fired and not dropped.
    let keys = Keys::new(TENANT);
    let mut conn = redis.connect().await;
    let now = broker.redis_now_ms().await.unwrap();
    let _: () = redis::pipe()
        .hset(
            keys.schedules(),
            "garbled",
            r#"{"task": "noop", "timing": {"kind": "every", "every_ms": 0, "anchor_ms": 0}}"#,
        )
        .zadd(keys.schedules_due(), "garbled", now)
        .query_async(&mut conn)
        .await
        .unwrap();
    let worker = start_in_process(&broker, TENANT, 2, Duration::from_secs(5), "w2");
    until_redis(&broker, now + 1_500).await;
    let _ = worker.0.send(());
    worker.1.await.unwrap();
    let parked: u64 = redis::cmd("ZSCORE")
        .arg(keys.schedules_due())
        .arg("garbled")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        parked >= now + 50_000,
        "set aside until {parked} (now {now})"
    );
    let out = wasmq(&redis.url, TENANT, &["schedule", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("garbled  cannot be read, not fired:"),
        "{}",
        text(&out.stdout)
    );
    assert!(tick_jobs(&redis).await.is_empty());
}

/// The claim a worker makes on a due every-1s schedule's tick.
fn claim_of(due: &DueSchedule) -> TickClaim {
    TickClaim {
        schedule: due.name.clone(),
        due_ms: due.due_ms,
        next_ms: Some(due.due_ms + 1_000),
        tick_ms: due.due_ms,
        definition: due.definition.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_claimed_twice_at_once_is_one_job_and_a_replaced_definition_never_fires() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    broker
        .schedule_put(TENANT, "race", every(1, CatchUp::One))
        .await
        .unwrap();
    let start = anchor(&broker, "race").await;
    until_redis(&broker, start + 1_000).await;
    let due = broker.schedules_due(TENANT).await.unwrap().due.remove(0);
    let schedule = due.schedule.clone().unwrap();
    let claim = claim_of(&due);
    // Two workers that read the same due tick race to fire it.
    let (a, b) = tokio::join!(
        broker.schedule_fire(TENANT, &schedule, &claim),
        broker.schedule_fire(TENANT, &schedule, &claim)
    );
    let fired: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(!fired[0].duplicate);
    assert_eq!(tick_jobs(&redis).await["race"].len(), 1);

    // A worker that read the definition before it was replaced (same
    // timing, new payload, so possibly the same next tick) fires nothing.
    until_redis(&broker, due.due_ms + 1_000).await;
    let due = broker.schedules_due(TENANT).await.unwrap().due.remove(0);
    let mut replaced = every(1, CatchUp::One);
    replaced.payload = json!({"version": 2});
    broker.schedule_put(TENANT, "race", replaced).await.unwrap();
    let stale = claim_of(&due);
    let old = due.schedule.unwrap();
    assert!(broker
        .schedule_fire(TENANT, &old, &stale)
        .await
        .unwrap()
        .is_none());
    assert!(!broker.schedule_advance(TENANT, &stale, None).await.unwrap());
    assert_eq!(tick_jobs(&redis).await["race"].len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_cannot_take_a_ticks_idempotency_key() {
    let (_redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let err = broker
        .enqueue(wasmq::broker::EnqueueRequest {
            tenant: TENANT.into(),
            task: "noop".into(),
            payload: json!({}),
            idempotency_key: Some("schedule:nightly:1796331373737".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("reserved for schedule ticks"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schedule_commands_add_list_pause_resume_run_and_remove() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let cli = |args: &[&str]| {
        let out = wasmq(&redis.url, TENANT, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let fails = |args: &[&str], code: i32, needle: &str| {
        let out = wasmq(&redis.url, TENANT, args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };

    // A nightly report at 02:00 Paris time.
    let added = cli(&[
        "schedule",
        "add",
        "nightly",
        "noop",
        r#"{"report":"daily"}"#,
        "--cron",
        "0 2 * * *",
        "--tz",
        "Europe/Paris",
    ]);
    assert!(added.contains("next tick"), "{added}");
    // Bad input is refused, naming the problem, and nothing is stored.
    fails(
        &["schedule", "add", "x", "noop", "--cron", "0 25 * * *"],
        2,
        "0 25 * * *",
    );
    fails(
        &[
            "schedule",
            "add",
            "x",
            "noop",
            "--cron",
            "* * * * *",
            "--tz",
            "Moon/Base",
        ],
        2,
        "Moon/Base",
    );
    fails(
        &["schedule", "add", "x", "noop", "--every", "300ms"],
        2,
        "out of range",
    );
    fails(
        &["schedule", "add", "x", "noop", "not json", "--every", "1m"],
        1,
        "bad-payload",
    );
    fails(
        &["schedule", "add", "x", "missing", "--every", "1m"],
        1,
        "unknown-task",
    );
    fails(&["schedule", "add", "x", "noop"], 2, "--cron");
    fails(&["schedule", "pause", "nope"], 2, "no schedule \"nope\"");

    let listed = cli(&["schedule", "list", "--json"]);
    let lines: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{listed}");
    let nightly = &lines[0];
    assert_eq!(nightly["name"], "nightly");
    assert_eq!(nightly["timing"]["cron"], "0 2 * * *");
    assert_eq!(nightly["timing"]["tz"], "Europe/Paris");
    assert_eq!(nightly["catch_up"], "one");
    let next = nightly["next_at_ms"].as_u64().unwrap();
    let now = broker.redis_now_ms().await.unwrap();
    assert!(next > now && next <= now + 25 * 3600 * 1000, "{nightly}");
    // 02:00 in Paris is 00:00 or 01:00 UTC.
    let utc_hour = (next / 3_600_000) % 24;
    assert!(utc_hour == 0 || utc_hour == 1, "{nightly}");

    // `run` fires once now, outside the timing.
    let job = cli(&["schedule", "run", "nightly"]).trim().to_string();
    let status = cli(&["status", &job, "--json"]);
    assert!(status.contains("\"queued\""), "{status}");
    let listed = cli(&["schedule", "list"]);
    assert!(listed.contains(&format!("job {job} (queued)")), "{listed}");
    let after_run: Value =
        serde_json::from_str(cli(&["schedule", "list", "--json"]).trim()).unwrap();
    assert_eq!(
        after_run["next_at_ms"].as_u64(),
        Some(next),
        "run moved the timing"
    );

    // Paused: no due time, and a worker fires nothing.
    cli(&["schedule", "add", "often", "noop", "--every", "1s"]);
    cli(&["schedule", "pause", "often"]);
    let worker = start_in_process(&broker, TENANT, 2, Duration::from_secs(5), "w");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!tick_jobs(&redis).await.contains_key("often"));
    let listed = cli(&["schedule", "list"]);
    assert!(
        listed.contains("often  task noop  every 1s  catch-up one  paused"),
        "{listed}"
    );
    // Resumed: it ticks from now on, without catching up the pause.
    let resumed_at = broker.redis_now_ms().await.unwrap();
    cli(&["schedule", "resume", "often"]);
    until_redis(&broker, resumed_at + 2_600).await;
    cli(&["schedule", "remove", "often"]);
    let jobs = all_succeed(&redis).await;
    let often = &jobs["often"];
    assert!(
        (1..=3).contains(&often.len()) && often.iter().all(|j| j.tick_ms > resumed_at),
        "{often:?} (resumed at {resumed_at})"
    );
    let _ = worker.0.send(());
    worker.1.await.unwrap();

    cli(&["schedule", "remove", "nightly"]);
    assert_eq!(cli(&["schedule", "list"]).trim(), "none");
    fails(&["schedule", "remove", "nightly"], 2, "no schedule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_lists_schedules_with_names_escaped() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    let name = "<b>nightly</b>";
    let mut nightly = every(3600, CatchUp::One);
    nightly.timing = Timing::cron("0 2 * * *", Some("Europe/Paris")).unwrap();
    broker.schedule_put(TENANT, name, nightly).await.unwrap();
    let mut paused = every(60, CatchUp::Skip);
    paused.paused = true;
    broker
        .schedule_put(TENANT, "cleanup", paused)
        .await
        .unwrap();
    let job = broker.schedule_run_now(TENANT, name).await.unwrap().id;

    let dashboard = common::web::Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let page = dashboard
        .client()
        .get(&format!("/t/{TENANT}/schedules"))
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("&lt;b&gt;nightly&lt;/b&gt;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains(name));
    assert!(
        page.body
            .contains("cron &quot;0 2 * * *&quot; Europe/Paris")
            || page.body.contains("cron \"0 2 * * *\" Europe/Paris"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(&format!("/t/{TENANT}/jobs/{job}")),
        "{}",
        page.body
    );
    assert!(page.body.contains("paused"), "{}", page.body);
    drop(redis);
}

/// A worker started after ticks were missed says how many it dropped, at
/// the default log level (no `WASMQ_LOG`), as docs/operations.md promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_ticks_are_logged_at_the_default_level() {
    let (redis, broker) = redis_with_task(TENANT, "noop", "noop", &TaskPolicy::default()).await;
    broker
        .schedule_put(TENANT, "skip", every(1, CatchUp::Skip))
        .await
        .unwrap();
    let t0 = anchor(&broker, "skip").await;
    // Ticks fall due with no worker running, past the on-time grace.
    until_redis(&broker, t0 + 5_500).await;
    let dir = common::TempDir::new("dropped-ticks");
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut worker = common::workers::KillOnDrop(
        std::process::Command::new(common::wasmq_bin())
            .args(["--redis", &redis.url, "--tenant", TENANT, "worker"])
            .env_remove("WASMQ_LOG")
            .env(
                "WASMQ_CACHE_DIR",
                std::env::temp_dir().join("wasmq-test-cache"),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let said = loop {
        let said = std::fs::read_to_string(&log_path).unwrap_or_default();
        if said.contains("missed tick(s) not fired") {
            break said;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line about the dropped ticks at the default log level: {said}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(said.contains("schedule \"skip\""), "{said}");
    worker.0.kill().unwrap();
}
