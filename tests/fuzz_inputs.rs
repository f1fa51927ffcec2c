//! Property tests for the parsers of untrusted input: job envelopes (anyone
//! who can write to a tenant's queue writes them), task manifests, sizes and
//! directory grants. None may panic; each accepts exactly what its rules
//! allow and names the problem otherwise. Case counts are modest so the
//! file runs in seconds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::guest_bytes;
use common::redis::RedisServer;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use wasmq::broker::envelope::{Envelope, ENVELOPE_VERSION, MAX_PRIORITY};
use wasmq::broker::{Broker, EnqueueRequest, ResultState};
use wasmq::keys::Keys;
use wasmq::policy::{parse_size, DirGrant, TaskPolicy};
use wasmq::pools::CpuPriority;
use wasmq::sandbox::ComputeThreads;
use wasmq::worker::{Worker, WorkerConfig};

const CASES: u32 = 512;

fn config() -> ProptestConfig {
    ProptestConfig {
        // `PROPTEST_CASES=100000 cargo test --test fuzz_inputs` for a deeper run.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(CASES),
        // Failures are reported with their minimal input; no regression
        // files written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- strategies ----------------------------------------------------------

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        (0u64..12).prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Envelope field names, often the real ones.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
        1 => "[a-z_]{1,10}",
    ]
}

const FIELDS: &[&str] = &[
    "v",
    "id",
    "tenant",
    "task",
    "queue",
    "payload",
    "priority",
    "enqueued_at_ms",
    "idempotency_key",
    "store_result",
    "max_attempts",
];

/// A valid envelope as JSON, with varied field values.
fn valid_envelope() -> impl Strategy<Value = Value> {
    (
        "[a-z0-9-]{1,36}",
        "[a-z0-9_-]{0,16}",
        "[a-z0-9_.-]{1,16}",
        "[a-z0-9_-]{1,16}",
        any_json(),
        0u8..=MAX_PRIORITY,
        any::<u64>(),
        prop::option::of(".{0,20}"),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(id, tenant, task, queue, payload, p, at, idem, store, max)| {
                json!({"v": ENVELOPE_VERSION, "id": id, "tenant": tenant, "task": task,
                   "queue": queue, "payload": payload, "priority": p,
                   "enqueued_at_ms": at, "idempotency_key": idem,
                   "store_result": store, "max_attempts": max})
            },
        )
}

/// A valid envelope with one field removed, replaced, or added.
fn mutated_envelope() -> impl Strategy<Value = Value> {
    (
        valid_envelope(),
        0..3u8,
        field_name(),
        any_json(),
        prop::sample::select(FIELDS.to_vec()),
    )
        .prop_map(|(mut env, op, name, value, existing)| {
            let obj = env.as_object_mut().unwrap();
            match op {
                0 => {
                    obj.remove(existing);
                }
                1 => {
                    obj.insert(existing.to_string(), value);
                }
                _ => {
                    obj.insert(name, value);
                }
            }
            env
        })
}

/// Text edits: truncate, delete a char, insert a char.
fn mutate_text(text: &str, op: u8, at: usize, c: char) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = at % (chars.len() + 1);
    let mut out: Vec<char> = chars.clone();
    match op % 3 {
        0 => out.truncate(at),
        1 if at < out.len() => {
            out.remove(at);
        }
        _ => out.insert(at, c),
    }
    out.into_iter().collect()
}

// ---- the envelope's rules, written out independently ----------------------

/// What `Envelope::parse` must accept: an object whose `v` is the version,
/// whose `id`, `task`, `queue` are non-empty strings and `tenant` a string,
/// with a `payload`, and whose optional fields have their types and ranges.
/// Unknown fields are ignored.
fn meets_rules(v: &Value) -> bool {
    let Some(o) = v.as_object() else {
        return false;
    };
    let uint = |k: &str, max: u64, required: bool| match o.get(k) {
        None => !required,
        Some(n) => n.as_u64().is_some_and(|n| n <= max),
    };
    let string = |k: &str, non_empty: bool| {
        o.get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !non_empty || !s.is_empty())
    };
    let nullable = |k: &str, ok: fn(&Value) -> bool| o.get(k).is_none_or(|x| x.is_null() || ok(x));
    o.get("v").and_then(Value::as_u64) == Some(ENVELOPE_VERSION as u64)
        && string("id", true)
        && string("task", true)
        && string("queue", true)
        && string("tenant", false)
        && o.contains_key("payload")
        && uint("priority", MAX_PRIORITY as u64, false)
        && uint("enqueued_at_ms", u64::MAX, false)
        && nullable("idempotency_key", Value::is_string)
        && nullable("store_result", Value::is_boolean)
        && nullable("max_attempts", |x| {
            x.as_u64().is_some_and(|n| n <= u32::MAX as u64)
        })
}

/// An accepted envelope keeps the rules it was checked against, and survives
/// a round trip unchanged.
fn check_accepted(env: &Envelope) -> Result<(), TestCaseError> {
    prop_assert_eq!(env.v, ENVELOPE_VERSION);
    prop_assert!(env.priority <= MAX_PRIORITY);
    prop_assert!(!env.id.is_empty() && !env.task.is_empty() && !env.queue.is_empty());
    let again = Envelope::parse(&serde_json::to_string(env).unwrap());
    prop_assert!(again.is_ok(), "{again:?}");
    // The payload is compared without its numbers' last bits: serde_json's
    // default float parser (no `float_roundtrip` feature) is not correctly
    // rounded, so a float with many digits may move by one ulp per trip.
    let strip = |e: &Envelope| Envelope {
        payload: Value::Null,
        ..e.clone()
    };
    prop_assert_eq!(strip(&again.unwrap()), strip(env));
    Ok(())
}

fn check_json(v: &Value) -> Result<(), TestCaseError> {
    let text = serde_json::to_string(v).unwrap();
    match Envelope::parse(&text) {
        Ok(env) => {
            prop_assert!(meets_rules(v), "accepted {text}");
            check_accepted(&env)?;
        }
        Err(e) => {
            prop_assert!(!meets_rules(v), "refused {text}: {e}");
            prop_assert!(!e.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn envelope_parse_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        match Envelope::parse(&text) {
            Ok(env) => check_accepted(&env)?,
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    #[test]
    fn envelope_parse_never_panics_on_arbitrary_bytes_as_text(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(env) = Envelope::parse(&text) {
            check_accepted(&env)?;
        }
    }

    #[test]
    fn envelope_parse_accepts_exactly_its_rules_on_arbitrary_json(v in any_json()) {
        check_json(&v)?;
    }

    #[test]
    fn envelope_parse_accepts_valid_envelopes(v in valid_envelope()) {
        prop_assert!(meets_rules(&v));
        check_json(&v)?;
    }

    #[test]
    fn envelope_parse_accepts_exactly_its_rules_on_mutated_envelopes(v in mutated_envelope()) {
        check_json(&v)?;
    }

    #[test]
    fn envelope_parse_never_panics_on_mutated_envelope_text(
        v in valid_envelope(), op in any::<u8>(), at in any::<usize>(), c in any::<char>(),
    ) {
        let text = mutate_text(&serde_json::to_string(&v).unwrap(), op, at, c);
        match Envelope::parse(&text) {
            Ok(env) => check_accepted(&env)?,
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }
}

// ---- task manifests --------------------------------------------------------

const MANIFEST: &str = r#"queue = "emails"
store_result = true
result_ttl = "1h"
max_payload_bytes = 65536

[sandbox]
fuel = 1000000
memory_bytes = 67108864
timeout = "10s"
max_result_bytes = 4096
allow_http = ["api.example.com:443", "127.0.0.1:8080"]
dirs = [{ host_path = "/srv/in", guest_path = "/in", read_only = true }]

[retry]
max_attempts = 5
backoff_base = "2s"
backoff_max = "1m"
jitter = false
auto_retry_kinds = ["network", "mail-api"]
"#;

/// Every manifest error starts with this and goes on to say what is wrong.
const MANIFEST_ERROR_PREFIX: &str = "task manifest: ";

fn check_manifest(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = TaskPolicy::from_toml(text) {
        prop_assert!(
            e.starts_with(MANIFEST_ERROR_PREFIX) && e.len() > MANIFEST_ERROR_PREFIX.len() + 5,
            "error does not name the problem: {e:?}"
        );
    }
    Ok(())
}

/// Values a manifest line might be set to: right and wrong types.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9 ]{0,8}".prop_map(|s| format!("{s:?}")),
        Just("\"30s\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        "\\PC{0,10}",
    ]
}

#[test]
fn the_sample_manifest_and_the_default_policy_parse() {
    let policy = TaskPolicy::from_toml(MANIFEST).unwrap();
    assert_eq!(policy.queue, "emails");
    assert_eq!(policy.retry.max_attempts, 5);
    let default = toml::to_string(&TaskPolicy::default()).unwrap();
    assert_eq!(
        TaskPolicy::from_toml(&default).unwrap(),
        TaskPolicy::default()
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn manifest_parse_never_panics_on_arbitrary_text(text in "\\PC{0,300}") {
        check_manifest(&text)?;
    }

    #[test]
    fn manifest_parse_never_panics_on_mutated_text(
        op in any::<u8>(), at in any::<usize>(), c in any::<char>(),
    ) {
        check_manifest(&mutate_text(MANIFEST, op, at, c))?;
    }

    #[test]
    fn manifest_parse_never_panics_when_a_line_changes(
        line in any::<prop::sample::Index>(), value in toml_value(), drop_line in any::<bool>(),
    ) {
        let lines: Vec<&str> = MANIFEST.lines().collect();
        let i = line.index(lines.len());
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        if drop_line {
            out.remove(i);
        } else if let Some((key, _)) = lines[i].split_once(" = ") {
            out[i] = format!("{key} = {value}");
        }
        check_manifest(&out.join("\n"))?;
    }

    #[test]
    fn manifest_errors_name_an_unknown_field(
        name in "zz[a-z_]{3,12}", section in 0..3usize, value in toml_value(),
    ) {
        // An unknown key in any table is refused, naming the key.
        let header = ["", "[sandbox]\n", "[retry]\n"][section];
        let text = format!("{header}{name} = {value}\n");
        let e = TaskPolicy::from_toml(&text).unwrap_err();
        prop_assert!(e.starts_with(MANIFEST_ERROR_PREFIX), "{e}");
        // A value that is not TOML fails before the key is looked at.
        if toml::from_str::<toml::Table>(&text).is_ok() {
            prop_assert!(e.contains(&name), "{e:?} does not name {name}");
        }
    }
}

// ---- sizes and directory grants -------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_size_never_panics(text in "\\PC{0,40}") {
        if let Err(e) = parse_size(&text) {
            prop_assert!(e.contains("size"), "{e}");
        }
    }

    #[test]
    fn parse_size_reads_numbers_with_units(
        n in any::<u64>(),
        unit in prop::sample::select(vec![
            ("", 0u32), ("b", 0), ("k", 10), ("KiB", 10), ("kb", 10), ("M", 20),
            ("MiB", 20), ("mb", 20), ("g", 30), ("GiB", 30), ("GB", 30),
        ]),
        space in any::<bool>(),
    ) {
        let (suffix, shift) = unit;
        let text = format!("{n}{}{suffix}", if space { " " } else { "" });
        match n.checked_mul(1u64 << shift) {
            Some(bytes) => prop_assert_eq!(parse_size(&text), Ok(bytes)),
            None => prop_assert!(parse_size(&text).unwrap_err().contains("too large")),
        }
    }

    #[test]
    fn dir_grant_parse_never_panics(spec in "\\PC{0,60}") {
        match DirGrant::parse(&spec) {
            Ok(g) => {
                prop_assert!(!g.guest_path.is_empty());
                prop_assert!(!g.host_path.as_os_str().is_empty());
                let rebuilt = format!(
                    "{}::{}{}",
                    g.host_path.display(), g.guest_path, if g.read_only { ":ro" } else { "" }
                );
                prop_assert_eq!(DirGrant::parse(&rebuilt), Ok(g));
            }
            Err(e) => prop_assert!(e.contains("--dir"), "{e}"),
        }
    }

    #[test]
    fn dir_grant_parse_reads_what_it_is_given(
        host in "/[a-z0-9/._-]{0,20}", guest in "/[a-z0-9/._-]{0,20}", ro in any::<bool>(),
    ) {
        let spec = format!("{host}::{guest}{}", if ro { ":ro" } else { "" });
        // A host path that names a parent directory is refused, naming it.
        if std::path::Path::new(&host).components().any(|c| c == std::path::Component::ParentDir) {
            let err = DirGrant::parse(&spec).unwrap_err();
            prop_assert!(err.contains("contains `..`") && err.contains(&host), "{err}");
            return Ok(());
        }
        let g = DirGrant::parse(&spec).unwrap();
        prop_assert_eq!(g.host_path, std::path::PathBuf::from(&host));
        prop_assert_eq!(g.guest_path, guest);
        prop_assert_eq!(g.read_only, ro);
    }
}

// ---- a worker fed generated poison ---------------------------------------

const TENANT: &str = "fuzz";

/// Envelopes a hostile or buggy producer might write: generated garbage,
/// arbitrary JSON, mutated envelopes (some of them valid `noop` jobs).
fn poison() -> impl Strategy<Value = String> {
    let noop = || {
        valid_envelope().prop_map(|mut v| {
            v["task"] = json!("noop");
            v["queue"] = json!("default");
            v["tenant"] = json!(TENANT);
            v
        })
    };
    prop_oneof![
        "\\PC{0,80}",
        any_json().prop_map(|v| v.to_string()),
        mutated_envelope().prop_map(|v| v.to_string()),
        noop().prop_map(|v| v.to_string()),
        (noop(), any::<u8>(), any::<usize>(), any::<char>())
            .prop_map(|(v, op, at, c)| mutate_text(&v.to_string(), op, at, c)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_generated_poison_envelopes() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    broker
        .deploy(TENANT, "noop", &guest_bytes("noop"), &TaskPolicy::default())
        .await
        .unwrap();
    let keys = Keys::new(TENANT);
    let mut conn = redis.connect().await;
    // Fixed seed: a failure reproduces.
    let mut runner = TestRunner::deterministic();
    let strategy = poison();
    let mut ids = Vec::new();
    for i in 0..60 {
        let envelope = strategy.new_tree(&mut runner).unwrap().current();
        let id = format!("poison-{i}");
        redis::pipe()
            .hset_multiple(
                keys.job(&id),
                &[
                    ("envelope", envelope.as_str()),
                    ("state", "queued"),
                    ("score", "1"),
                ],
            )
            .zadd(keys.ready("default"), &id, 1)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        ids.push(id);
    }

    let sandbox = Arc::new(common::sandbox::sandbox_with_slots(4));
    let config = WorkerConfig {
        tenants: vec![TENANT.into()],
        queues: vec!["default".into()],
        concurrency: 4,
        lease: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        id: "fuzz-worker".into(),
        compute: Some(ComputeThreads::for_machine(CpuPriority::default()).unwrap()),
        host_retries: Default::default(),
        metrics: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(broker.clone(), sandbox, config).run(async move {
            let _ = stopped.await;
        }),
    );

    // A good job enqueued behind the poison still runs.
    let good = broker
        .enqueue(EnqueueRequest {
            tenant: TENANT.into(),
            task: "noop".into(),
            payload: json!({}),
            store_result: Some(true),
            ..EnqueueRequest::default()
        })
        .await
        .unwrap();
    let state = broker
        .result(TENANT, &good.id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(matches!(state, ResultState::Ready(_)), "{state:?}");
    // Every poison job has finished: dead-lettered with a reason, or (a
    // valid `noop` envelope) succeeded.
    let mut dead = 0;
    for id in &ids {
        // Jobs popped just before the good one may still be finishing.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            let status = broker.status(TENANT, id).await.unwrap().unwrap();
            if status.state == "dead"
                || status.state == "succeeded"
                || std::time::Instant::now() > deadline
            {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.state == "dead" || status.state == "succeeded",
            "{id}: {status:?}"
        );
        if status.state == "dead" {
            assert!(status.last_error.is_some(), "{id}: dead without a reason");
            dead += 1;
        }
    }
    // The generator made both kinds.
    assert!(dead > 0 && dead < ids.len(), "{dead} of {} dead", ids.len());
    stop.send(()).unwrap();
    worker.await.unwrap();
}
