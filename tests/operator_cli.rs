//! What an operator sees from the CLI: times as RFC 3339 (ms in `--json`),
//! when a delayed job is due, "none" for empty lists, the `default` tenant
//! listed, an error's cause named once, and no colour codes in a log that
//! is not a terminal.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::redis::RedisServer;
use common::{guest, text, wasmq, wasmq_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_when_a_delayed_job_is_due_in_rfc3339_and_ms() {
    let redis = RedisServer::start();
    let deploy = wasmq(
        &redis.url,
        "acme",
        &["deploy", guest("noop").to_str().unwrap(), "--name", "noop"],
    );
    assert!(deploy.status.success(), "{}", text(&deploy.stderr));
    let enqueued = wasmq(
        &redis.url,
        "acme",
        &["enqueue", "noop", "{}", "--countdown", "90s"],
    );
    assert!(enqueued.status.success(), "{}", text(&enqueued.stderr));
    let id = text(&enqueued.stdout);

    let human = text(&wasmq(&redis.url, "acme", &["status", &id]).stdout);
    let due_line = human.lines().find(|l| l.starts_with("state")).unwrap();
    assert!(due_line.contains("scheduled, due 20"), "{human}");
    assert!(due_line.ends_with('Z'), "RFC 3339, UTC: {due_line}");
    assert!(
        human.lines().any(|l| l.starts_with("enqueued   20")),
        "{human}"
    );

    let json: serde_json::Value = serde_json::from_str(&text(
        &wasmq(&redis.url, "acme", &["status", &id, "--json"]).stdout,
    ))
    .unwrap();
    let (due, enqueued_at) = (
        json["due_at_ms"].as_u64().unwrap(),
        json["enqueued_at_ms"].as_u64().unwrap(),
    );
    assert_eq!(due - enqueued_at, 90_000, "the same clock reading: {json}");
    assert!(json["due_at"].as_str().unwrap().ends_with('Z'), "{json}");
    assert!(json["history"][0]["at"].is_string(), "{json}");
}

#[test]
fn empty_lists_say_none_and_the_default_tenant_is_listed() {
    let redis = RedisServer::start();
    let dead = wasmq(&redis.url, "acme", &["dead", "list"]);
    assert!(dead.status.success());
    assert_eq!(text(&dead.stdout), "none");
    let dead_json = wasmq(&redis.url, "acme", &["dead", "list", "--json"]);
    assert_eq!(text(&dead_json.stdout), "", "no lines for machines");
    let tenants = wasmq(&redis.url, "default", &["tenant", "list"]);
    assert_eq!(text(&tenants.stdout), "default (no record: uncapped)");
}

#[test]
fn an_error_names_its_cause_once() {
    // Nothing listens on port 1.
    let out = wasmq("redis://127.0.0.1:1", "acme", &["tasks"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
}

#[test]
fn a_worker_log_that_is_not_a_terminal_has_no_colour_codes() {
    let redis = RedisServer::start();
    let mut worker = Command::new(wasmq_bin())
        .args(["--redis", &redis.url, "worker", "--concurrency", "1"])
        .env("WASMQ_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    worker.kill().unwrap();
    let out = worker.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}

/// `--log-format json` on any command: a failure's one stderr line and a
/// worker's log lines are JSON objects.
#[test]
fn log_format_json_writes_json_lines() {
    let redis = RedisServer::start();
    let failed = wasmq(
        &redis.url,
        "acme",
        &["--log-format", "json", "enqueue", "missing", "{}"],
    );
    assert_eq!(failed.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_str(&text(&failed.stderr)).unwrap();
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["category"], "unknown-task", "{line}");
    let usage = wasmq(
        &redis.url,
        "acme",
        &["--log-format", "json", "cancel", "nope"],
    );
    assert_eq!(usage.status.code(), Some(2));
    let line: serde_json::Value = serde_json::from_str(&text(&usage.stderr)).unwrap();
    assert!(
        line["message"].as_str().unwrap().contains("no job nope"),
        "{line}"
    );

    let worker = Command::new(wasmq_bin())
        .args([
            "--redis",
            &redis.url,
            "--tenant",
            "acme",
            "--log-format",
            "json",
        ])
        .args(["worker", "--concurrency", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let out = worker.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(parsed["level"].is_string(), "{line}");
    }
}
