//! `wasmq worker --metrics`: the endpoint's text passes `promtool check
//! metrics` (Debian's `prometheus` package, installed by the Makefile) and
//! its counters match the jobs the test ran; queue and pool gauges are
//! read at scrape time; labels never carry a job id.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmq::broker::{Broker, EnqueueRequest, LeaseTerms};
use wasmq::policy::TaskPolicy;

use common::jobs::redis_with_task;
use common::redis::free_port;
use common::workers::{in_process_config, start_configured};

const TENANT: &str = "metered";

/// `GET path` on `addr`: (status line, body).
async fn get(addr: &str, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Samples of the text format: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `family` whose labels include all of
/// `labels` (`k="v"` pairs); 0 when none.
fn value(samples: &HashMap<String, f64>, family: &str, labels: &[&str]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(name, _)| {
            name.split('{').next() == Some(family) && labels.iter().all(|l| name.contains(l))
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(found.len() <= 1, "{family} {labels:?} matches {found:?}");
    found.first().copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_the_jobs_run() {
    let mut policy = TaskPolicy::default();
    policy.retry.max_attempts = 2;
    policy.retry.backoff_base = Duration::from_millis(10);
    // One lapsed lease makes a job poison.
    policy.retry.max_deliveries = 1;
    let (redis, broker) = redis_with_task(TENANT, "hostile", "hostile", &policy).await;
    // A job whose (made-up) worker died holding it: the worker's first
    // fetch round dead-letters it as poison, and counts it.
    let poison = broker
        .enqueue(EnqueueRequest {
            tenant: TENANT.into(),
            task: "hostile".into(),
            payload: json!({"mode": "echo"}),
            ..EnqueueRequest::default()
        })
        .await
        .unwrap()
        .id;
    let doomed = LeaseTerms {
        worker: "doomed",
        lease: Duration::from_millis(1),
        max_deliveries: 1,
        cluster_cap: None,
        rate_limit: None,
    };
    assert_eq!(
        broker
            .fetch(TENANT, "default", 1, doomed)
            .await
            .unwrap()
            .len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = in_process_config(&broker, TENANT, 4, Duration::from_secs(10), "metered");
    config.metrics = Some(addr.parse().unwrap());
    let (stop, handle, _) = start_configured(config);

    let mut ids = Vec::new();
    let enqueue = |payload: serde_json::Value| {
        let broker: Broker = broker.clone();
        async move {
            let request = EnqueueRequest {
                tenant: TENANT.into(),
                task: "hostile".into(),
                payload,
                ..EnqueueRequest::default()
            };
            broker.enqueue(request).await.unwrap().id
        }
    };
    for i in 0..5 {
        ids.push(enqueue(json!({"mode": "echo", "i": i})).await);
    }
    for _ in 0..2 {
        ids.push(enqueue(json!({"mode": "fail", "message": "no"})).await);
    }
    ids.push(enqueue(json!({"mode": "retry", "ms": 10})).await);
    ids.push(poison);
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        loop {
            let state = broker.status(TENANT, id).await.unwrap().unwrap().state;
            if state == "succeeded" || state == "dead" {
                break;
            }
            assert!(Instant::now() < deadline, "{id} is still {state}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A job left ready in a queue the worker serves shows in the gauges.
    let mut conn = redis.connect().await;
    let _: () = redis::cmd("HSET")
        .arg(wasmq::keys::Keys::new(TENANT).paused())
        .arg("default")
        .arg(r#"{"by":"test","at_ms":0}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    enqueue(json!({"mode": "echo"})).await;

    let (status, text) = get(&addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: `make test` installs Debian's prometheus package");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let s = samples(&text);
    let job = r#"tenant="metered""#;
    let finished = "wasmq_jobs_finished_total";
    assert_eq!(
        value(&s, finished, &[job, r#"outcome="succeeded""#]),
        5.0,
        "{text}"
    );
    assert_eq!(value(&s, finished, &[job, r#"outcome="task-error""#]), 2.0);
    assert_eq!(
        value(&s, finished, &[job, r#"outcome="retry-exhausted""#]),
        1.0
    );
    assert_eq!(value(&s, finished, &[job, r#"outcome="trap""#]), 1.0);
    assert_eq!(
        value(
            &s,
            "wasmq_dead_letters_total",
            &[job, r#"category="trap""#, r#"task="hostile""#]
        ),
        1.0
    );
    assert_eq!(value(&s, "wasmq_job_retries_total", &[job]), 1.0);
    assert_eq!(
        value(
            &s,
            "wasmq_dead_letters_total",
            &[job, r#"category="task-error""#]
        ),
        2.0
    );
    // 5 + 2 + 2 runs; the e2e histogram counts the 8 jobs that ended
    // after a run (not the poison job, which never ran to an outcome).
    assert_eq!(value(&s, "wasmq_job_run_seconds_count", &[job]), 9.0);
    assert_eq!(value(&s, "wasmq_job_e2e_seconds_count", &[job]), 8.0);
    assert_eq!(value(&s, "wasmq_job_fuel_count", &[job]), 9.0);
    assert_eq!(
        value(&s, "wasmq_queue_jobs", &[job, r#"state="dead""#]),
        4.0
    );
    assert_eq!(
        value(&s, "wasmq_queue_jobs", &[job, r#"state="ready""#]),
        1.0
    );
    assert_eq!(
        value(&s, "wasmq_pool_slots", &[r#"pool="metered-io0""#]),
        4.0
    );
    assert!(
        value(
            &s,
            "wasmq_redis_roundtrip_seconds_count",
            &[r#"op="fetch""#]
        ) > 0.0
    );
    assert!(
        value(
            &s,
            "wasmq_redis_roundtrip_seconds_count",
            &[r#"op="record""#]
        ) > 0.0
    );
    for id in &ids {
        assert!(!text.contains(id.as_str()), "a job id in the metrics");
    }
    let (missing, _) = get(&addr, "/other").await;
    assert!(missing.contains("404"), "{missing}");

    stop.send(()).unwrap();
    handle.await.unwrap();
}
