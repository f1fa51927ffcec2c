//! Secrets against a real redis-server: `wasmq secret set|list|remove`
//! seal values before they reach Redis; a task reads only the names its
//! policy grants, in its own tenant only, however a name is spelled; a
//! value set again is what the next job reads; and no value shows up in
//! Redis, a job's log, result or `status`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::jobs::enqueue_and_wait;
use common::redis::RedisServer;
use common::{guest_bytes, text, wasmq, wasmq_with};
use serde_json::{json, Value};
use wasmq::broker::{Broker, ResultState};
use wasmq::policy::TaskPolicy;
use wasmq::secrets::SecretsKey;

/// The key the CLI and the workers of these tests hold.
const KEY: &str = "5e5c7e75e5c7e75e5c7e75e5c7e75e5c7e75e5c7e75e5c7e75e5c7e75e5c7e75";

/// `wasmq secret set NAME [--task TASK]` with `value` on stdin.
fn secret_set(url: &str, tenant: &str, name: &str, task: Option<&str>, value: &str) {
    let mut args = vec!["secret", "set", name];
    if let Some(task) = task {
        args.extend(["--task", task]);
    }
    let out = wasmq_with(url, tenant, &args, &[("WASMQ_SECRETS_KEY", KEY)], value);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(value));
}

/// A worker of `tenant` in this process holding [`KEY`].
fn worker(
    broker: &Broker,
    tenant: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
) {
    let mut config = common::workers::in_process_config(
        broker,
        tenant,
        2,
        Duration::from_secs(10),
        &format!("secrets-{tenant}"),
    );
    config.secrets_key = Some(Arc::new(SecretsKey::from_hex(KEY).unwrap()));
    let (stop, handle, _) = common::workers::start_configured(config);
    (stop, handle)
}

/// Deploy the `secrets` guest as `tenant`'s `task`, granted `names`.
async fn deploy_reader(broker: &Broker, tenant: &str, task: &str, names: &[&str]) {
    let mut policy = TaskPolicy::default();
    policy.sandbox.secrets = names.iter().map(|n| n.to_string()).collect();
    broker
        .deploy(tenant, task, &guest_bytes("secrets"), &policy)
        .await
        .unwrap();
}

/// Run one job of `task` reading `names`; its stored result.
async fn read(broker: &Broker, tenant: &str, task: &str, names: &[&str]) -> (String, ResultState) {
    enqueue_and_wait(
        broker,
        tenant,
        task,
        json!({ "names": names }),
        Duration::from_secs(60),
    )
    .await
}

fn reversed(s: &str) -> Value {
    json!({ "reversed": s.chars().rev().collect::<String>() })
}

fn ready(state: ResultState) -> Value {
    match state {
        ResultState::Ready(v) => v,
        other => panic!("job did not succeed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_reads_only_granted_secrets_of_its_own_tenant() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    let broker = Broker::connect(&url).await.unwrap();
    secret_set(&url, "acme", "mail_api_key", None, "acme-mail-key-1");
    secret_set(&url, "acme", "note", None, "tenant-wide-note");
    secret_set(&url, "acme", "note", Some("reader"), "reader-only-note");
    secret_set(&url, "other", "mail_api_key", None, "other-mail-key");
    secret_set(&url, "other", "only_other", None, "other-private-value");
    secret_set(&url, "acme", "database:app", None, "postgres://u:pw@db/app");
    deploy_reader(
        &broker,
        "acme",
        "reader",
        &["mail_api_key", "note", "only_other", "unset_one"],
    )
    .await;
    let (stop, handle) = worker(&broker, "acme");

    // Granted names: the tenant's value, the task's own over the
    // tenant's, nothing of another tenant's, `null` when unset.
    let (_, state) = read(
        &broker,
        "acme",
        "reader",
        &["mail_api_key", "note", "only_other", "unset_one"],
    )
    .await;
    assert_eq!(
        ready(state),
        json!({
            "mail_api_key": reversed("acme-mail-key-1"),
            "note": reversed("reader-only-note"),
            "only_other": null,
            "unset_one": null,
        })
    );

    deploy_reader(&broker, "acme", "narrow", &["note"]).await;
    // Names not granted, raw or spelling out another tenant's key, a
    // field, a path or a database URL: denied (recorded among the job's
    // denials; a task that lets `?` pass it on ends `denied`).
    for name in [
        "only_other",
        "wasmq:{other}:secrets",
        "wasmq:{other}:secrets:mail_api_key",
        "mail_api_key/reader",
        "other/mail_api_key",
        "../other/mail_api_key",
        "database:app",
        "",
    ] {
        let (_, state) = read(&broker, "acme", "narrow", &[name]).await;
        let error = ready(state)[name]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.starts_with("denied: secret") && error.contains("sandbox.secrets"),
            "{name:?} was not denied: {error}"
        );
    }

    // A ciphertext copied from another tenant's hash into this one's does
    // not open: it is bound to the tenant and name it was sealed for.
    let mut conn = redis.connect().await;
    let stolen: Vec<u8> = redis::cmd("HGET")
        .arg("wasmq:{other}:secrets")
        .arg("mail_api_key")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("wasmq:{acme}:secrets")
        .arg("mail_api_key")
        .arg(stolen)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (_, state) = read(&broker, "acme", "reader", &["mail_api_key"]).await;
    let result = ready(state).to_string();
    assert!(result.contains("does not authenticate"), "{result}");
    assert!(!result.contains("yek-liam-rehto"), "{result}");

    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_in_redis_kept_out_of_logs_and_status_and_rotate() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    let broker = Broker::connect(&url).await.unwrap();
    let first = "first-value-of-the-mail-key";
    let second = "second-value-of-the-mail-key";
    secret_set(&url, "acme", "mail_api_key", None, first);
    deploy_reader(&broker, "acme", "reader", &["mail_api_key"]).await;
    let (stop, handle) = worker(&broker, "acme");

    // A task that prints, logs and returns the value: blotted out of all
    // three, and of `status`.
    let (id, state) = enqueue_and_wait(
        &broker,
        "acme",
        "reader",
        json!({"names": ["mail_api_key"], "leak": true}),
        Duration::from_secs(60),
    )
    .await;
    let result = ready(state);
    assert_eq!(result["mail_api_key"], reversed(first));
    assert_eq!(result["mail_api_key.plain"], json!("[secret mail_api_key]"));
    for args in [vec!["status", &id], vec!["status", &id, "--json"]] {
        let out = wasmq(&url, "acme", &args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let shown = text(&out.stdout);
        assert!(!shown.contains(first), "{shown}");
    }

    // Set again: the next job reads the new value.
    secret_set(&url, "acme", "mail_api_key", None, second);
    let (_, state) = read(&broker, "acme", "reader", &["mail_api_key"]).await;
    assert_eq!(ready(state)["mail_api_key"], reversed(second));

    // No value anywhere in Redis in plain text: every key, read whole.
    let mut conn = redis.connect().await;
    let mut scanned = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        scanned.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert!(scanned.contains(&"wasmq:{acme}:secrets".to_string()));
    let mut seen = 0;
    for key in scanned {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let dump: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap()],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            _ => Vec::new(),
        };
        for value in dump {
            let value = String::from_utf8_lossy(&value);
            for secret in [first, second] {
                assert!(!value.contains(secret), "{key} holds a secret: {value}");
            }
        }
        seen += 1;
    }
    assert!(seen > 5, "scanned {seen} keys");

    // `list` shows names and key ids, never values; `remove` removes.
    let out = wasmq(&url, "acme", &["secret", "list"]);
    let listed = text(&out.stdout);
    let key_id = SecretsKey::from_hex(KEY).unwrap().id().to_string();
    assert_eq!(listed, format!("mail_api_key  key {key_id}"));
    let out = wasmq(&url, "acme", &["secret", "remove", "mail_api_key"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, state) = read(&broker, "acme", "reader", &["mail_api_key"]).await;
    assert_eq!(ready(state)["mail_api_key"], Value::Null);

    stop.send(()).unwrap();
    handle.await.unwrap();
}

#[test]
fn secret_set_refuses_without_a_key_or_a_value_and_takes_no_value_as_an_argument() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    let out = wasmq_with(&url, "acme", &["secret", "set", "k"], &[], "v");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("WASMQ_SECRETS_KEY_FILE"));
    let out = wasmq_with(
        &url,
        "acme",
        &["secret", "set", "k"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        "",
    );
    assert!(text(&out.stderr).contains("the secret is empty"));
    let out = wasmq_with(
        &url,
        "acme",
        &["secret", "set", "k", "the-value"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        "",
    );
    assert!(!out.status.success());
    let out = wasmq_with(
        &url,
        "acme",
        &["secret", "set", "wasmq:{other}:x"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        "v",
    );
    assert!(
        text(&out.stderr).contains("is invalid"),
        "{}",
        text(&out.stderr)
    );
}

/// A value with `"` and `\` (which JSON escapes) is blotted out of the
/// result, log, error and kind however it is encoded; passed as a secret
/// or database name it does not show among the denials; a child job or a
/// flow carrying it is refused (its record would show it), naming the
/// secret. `status` (text and JSON) and every key in Redis show no value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_values_and_values_used_as_names_are_blotted_out_and_not_passed_on() {
    let redis = RedisServer::start();
    let url = redis.url.clone();
    let broker = Broker::connect(&url).await.unwrap();
    let value = r#"se"cr\et/val\u0075e"#;
    secret_set(&url, "acme", "api_key", None, value);
    deploy_reader(&broker, "acme", "reader", &["api_key"]).await;
    let (stop, handle) = worker(&broker, "acme");

    let (ok_id, state) = enqueue_and_wait(
        &broker,
        "acme",
        "reader",
        json!({"names": ["api_key"], "leak": true, "as_names": true, "child": true}),
        Duration::from_secs(60),
    )
    .await;
    let result = ready(state);
    assert_eq!(result["api_key"], reversed(value));
    assert_eq!(result["api_key.plain"], json!("[secret api_key]"));
    for what in ["api_key.child", "api_key.flow"] {
        let refused = result[what]["error"].as_str().unwrap_or_default();
        assert!(
            refused.contains("secret \"api_key\"") && refused.contains("denied"),
            "{what}: {}",
            result[what]
        );
    }
    let (fail_id, state) = enqueue_and_wait(
        &broker,
        "acme",
        "reader",
        json!({"names": ["api_key"], "fail": true}),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        !matches!(state, ResultState::Ready(_)),
        "the failing run succeeded: {state:?}"
    );
    let escaped = serde_json::to_string(value).unwrap();
    let escaped = &escaped[1..escaped.len() - 1];
    for id in [&ok_id, &fail_id] {
        let status = broker.status("acme", id).await.unwrap().unwrap();
        let shown = serde_json::to_string(&status).unwrap_or_else(|_| format!("{status:?}"));
        for args in [vec!["status", id.as_str()], vec!["status", id, "--json"]] {
            let out = wasmq(&url, "acme", &args);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let printed = text(&out.stdout);
            for form in [value, escaped, "cr\\et", "cr\\\\et"] {
                assert!(
                    !printed.contains(form),
                    "{id}: status shows {form:?}: {printed}"
                );
                assert!(
                    !shown.contains(form),
                    "{id}: status shows {form:?}: {shown}"
                );
            }
        }
    }
    let denials = broker.status("acme", &ok_id).await.unwrap().unwrap();
    let denials = format!("{denials:?}");
    assert!(denials.contains("[secret api_key]"), "{denials}");
    // Nothing the runs wrote holds the value in any form (the child and
    // the flow were refused, so no record of theirs holds it either).
    let mut conn = redis.connect().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let dump = String::from_utf8_lossy(&dump);
        for form in [value, escaped] {
            assert!(!dump.contains(form), "{key} holds {form:?}: {dump}");
        }
    }
    stop.send(()).unwrap();
    handle.await.unwrap();
}
