//! The sandbox against real compiled components: example tasks, hostile
//! guests, invalid components, deterministic fuel, the compiled-code cache,
//! and `wasmq run` as a user calls it.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::components::{example_task, example_task_bytes, python_guest, Lang};
use common::http::{Reply, TestServer};
use common::sandbox::{failure, job, run, sandbox, sandbox_for, sandbox_with_slots, success};
use common::{guest, guest_bytes, wasmq_bin, TempDir};
use serde_json::{json, Value};
use wasmq::backend::memory::MemoryBackend;
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, EngineLimits};
use wasmq::failure::Category;
use wasmq::policy::{DirGrant, SandboxPolicy};
use wasmq::pools::CpuPriority;
use wasmq::sandbox::{ComputeThreads, PreparedTask, Sandbox, Verdict, COMPUTE_BURST};
use wasmq::tenants::TenantLimits;

/// `wasmq run` with these arguments.
fn wasmq_run(args: &[&str]) -> Output {
    let out = Command::new(wasmq_bin())
        .arg("run")
        .args(args)
        .env(
            "WASMQ_CACHE_DIR",
            std::env::temp_dir().join("wasmq-test-cache"),
        )
        .output()
        .unwrap();
    out
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "wasmq run failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn noop_and_thumbnail_run_from_the_cli() {
    let noop = guest("noop");
    assert_eq!(stdout_json(&wasmq_run(&[path(&noop)])), json!({"ok": true}));

    let thumb = guest("thumbnail");
    let payload = r#"{"width":96,"height":64,"seed":7,"thumb":16}"#;
    let a = stdout_json(&wasmq_run(&[path(&thumb), payload, "--meta"]));
    let b = stdout_json(&wasmq_run(&[path(&thumb), payload, "--meta"]));
    assert_eq!(a["result"]["width"], 96);
    assert_eq!(a["result"]["height"], 64);
    assert_eq!(a["result"]["thumb"], 16);
    assert!(a["result"]["checksum"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert_eq!(a["result"], b["result"], "same input, same output");
    // Deterministic metering: same job, same fuel, reported in the metadata.
    let fuel = a["usage"]["fuel"].as_u64().unwrap();
    assert!(fuel > 100_000, "a real image costs real fuel, got {fuel}");
    assert_eq!(
        a["usage"]["fuel"], b["usage"]["fuel"],
        "fuel must be deterministic"
    );
    assert!(a["usage"]["peak_memory_bytes"].as_u64().unwrap() > 0);
}

/// tasks/onboard-py and tasks/scrape-py deploy with their Rust twins'
/// policies: the same `task.toml`, comments aside.
#[test]
fn python_twins_have_their_rust_twins_policies() {
    let tasks = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tasks");
    for task in ["onboard", "scrape"] {
        let policy = |dir: &str| {
            let text = std::fs::read_to_string(tasks.join(dir).join("task.toml")).unwrap();
            wasmq::policy::TaskPolicy::from_toml(&text).unwrap()
        };
        assert_eq!(policy(task), policy(&format!("{task}-py")), "{task}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_sends_one_email_across_runs_of_one_store() {
    onboard_sends_one_email_across_runs_of_one_store_in(Lang::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_sends_one_email_across_runs_of_one_store_py() {
    onboard_sends_one_email_across_runs_of_one_store_in(Lang::Python).await;
}

async fn onboard_sends_one_email_across_runs_of_one_store_in(lang: Lang) {
    let Some(onboard) = example_task("onboard", lang) else {
        return;
    };
    let mail = TestServer::start(|_, _| Reply::ok("{\"queued\":true}")).await;
    let state = TempDir::new("onboard");
    let state_file = state.path().join("state.json");
    let payload = json!({"user_id": 7, "mail_api": mail.url("/send")}).to_string();
    let mut results = Vec::new();
    for _ in 0..2 {
        let args = [
            path(&onboard),
            &payload,
            "--allow-http",
            &mail.authority(),
            "--state",
            path(&state_file),
        ];
        let out = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            move || wasmq_run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        let result = stdout_json(&out);
        assert_eq!(result["user_id"], 7);
        results.push(result);
    }
    assert_eq!(
        mail.count("/send"),
        1,
        "the welcome email is sent exactly once"
    );
    let body: Value = serde_json::from_slice(&mail.requests()[0].body).unwrap();
    assert_eq!(body["to_user"], 7);
    assert_eq!(body["template"], "welcome");
    // The step's token, in the body and (added by the host) as the header.
    let key = mail.requests()[0]
        .header("idempotency-key")
        .expect("the host adds the step's Idempotency-Key")
        .to_string();
    assert_eq!(body["idempotency_key"], key.as_str());
    assert_eq!(results[0]["already_sent"], false);
    assert_eq!(results[0]["mail_api_status"], 200);
    assert_eq!(results[1]["already_sent"], true, "{}", results[1]);
    assert_eq!(results[1]["sent_by_job"], results[0]["sent_by_job"]);
    assert_eq!(results[1]["mail_api_status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_retries_after_a_mail_api_failure_and_sends_once() {
    onboard_retries_after_a_mail_api_failure_and_sends_once_in(Lang::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_retries_after_a_mail_api_failure_and_sends_once_py() {
    onboard_retries_after_a_mail_api_failure_and_sends_once_in(Lang::Python).await;
}

async fn onboard_retries_after_a_mail_api_failure_and_sends_once_in(lang: Lang) {
    let Some(component) = example_task_bytes("onboard", lang) else {
        return;
    };
    // The mail API fails the first request: the step is abandoned, the retry
    // sends, a third run finds the step done.
    let mail = TestServer::start(|_, n| {
        if n == 1 {
            Reply::status(503)
        } else {
            Reply::ok("{}")
        }
    })
    .await;
    let sb = sandbox_for(lang);
    let task = sb.prepare(&component).unwrap();
    let policy = SandboxPolicy {
        allow_http: vec![mail.authority()],
        ..SandboxPolicy::default()
    };
    let backend = Arc::new(MemoryBackend::new());
    let payload = json!({"user_id": 7, "mail_api": mail.url("/send")}).to_string();
    let first = sb
        .run(&task, &job(&payload), &policy, backend.clone())
        .await;
    // Kind "mail-api", which the policy's auto-retry kinds retry.
    match &first.verdict {
        Verdict::Failed { failure, kind } => {
            assert_eq!(kind.as_deref(), Some("mail-api"), "{failure:?}");
            assert!(
                failure.message.contains("mail API answered 503"),
                "the 503 is named: {failure:?}"
            );
        }
        other => panic!("503 must fail the attempt: {other:?}\nlog:\n{}", first.log),
    }
    for _ in 0..2 {
        success(
            &sb.run(&task, &job(&payload), &policy, backend.clone())
                .await,
        );
    }
    assert_eq!(
        mail.count("/send"),
        2,
        "one failed request, then exactly one email"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_names_network_and_denied_failures_by_kind() {
    onboard_names_network_and_denied_failures_by_kind_in(Lang::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboard_names_network_and_denied_failures_by_kind_py() {
    onboard_names_network_and_denied_failures_by_kind_in(Lang::Python).await;
}

/// A mail API nobody listens on fails with kind "network" (which the
/// policy retries); one off the allow-list is refused by the host, the
/// failure in category `denied`.
async fn onboard_names_network_and_denied_failures_by_kind_in(lang: Lang) {
    let Some(component) = example_task_bytes("onboard", lang) else {
        return;
    };
    // A port just freed: connecting to it is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let authority = closed.local_addr().unwrap().to_string();
    drop(closed);
    let sb = sandbox_for(lang);
    let task = sb.prepare(&component).unwrap();
    let policy = SandboxPolicy {
        allow_http: vec![authority.clone()],
        ..SandboxPolicy::default()
    };
    let payload = json!({"user_id": 7, "mail_api": format!("http://{authority}/send")});
    let outcome = run(&sb, &task, &payload.to_string(), &policy).await;
    match &outcome.verdict {
        Verdict::Failed { kind, failure } => {
            assert_eq!(kind.as_deref(), Some("network"), "{failure:?}")
        }
        other => panic!("connection refused: {other:?}\nlog:\n{}", outcome.log),
    }
    let payload = json!({"user_id": 7, "mail_api": "http://127.0.0.2:9/send"});
    let outcome = run(&sb, &task, &payload.to_string(), &policy).await;
    let (category, message) = failure(&outcome);
    assert_eq!(category, Category::Denied, "{message}");
    assert!(
        message.contains("not in the task's allow-list"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_each_page_once() {
    scrape_counts_each_page_once_in(Lang::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_each_page_once_py() {
    scrape_counts_each_page_once_in(Lang::Python).await;
}

async fn scrape_counts_each_page_once_in(lang: Lang) {
    let Some(component) = example_task_bytes("scrape", lang) else {
        return;
    };
    let site = TestServer::start(|req, _| {
        Reply::ok(format!(
            "<html><a href='/a'>a</a><A\nhref='/b'>b</a><abbr>no</abbr><a href='{}'>self</a></html>",
            req.path
        ))
    })
    .await;
    let sb = sandbox_for(lang);
    let task = sb.prepare(&component).unwrap();
    let policy = SandboxPolicy {
        allow_http: vec![site.authority()],
        ..SandboxPolicy::default()
    };
    let backend = Arc::new(MemoryBackend::new());
    let mut last = Value::Null;
    for page in ["/p1", "/p2", "/p1", "/p3", "/p2"] {
        let payload = json!({"url": site.url(page)}).to_string();
        last = success(
            &sb.run(&task, &job(&payload), &policy, backend.clone())
                .await,
        );
        assert_eq!(last["links"], 3);
        assert_eq!(last["url"], site.url(page));
    }
    assert_eq!(last["pages_scraped"], 3, "duplicates count once: {last}");
    // 429 and 5xx ask for a retry; other non-2xx answers fail.
    let status = TestServer::start(|req, _| {
        Reply::status(req.path.trim_start_matches('/').parse().unwrap())
    })
    .await;
    let policy = SandboxPolicy {
        allow_http: vec![status.authority()],
        ..SandboxPolicy::default()
    };
    for (code, retried) in [(429, true), (503, true), (404, false)] {
        let payload = json!({"url": status.url(&format!("/{code}"))}).to_string();
        let outcome = sb
            .run(&task, &job(&payload), &policy, backend.clone())
            .await;
        match (&outcome.verdict, retried) {
            (Verdict::Retry { .. }, true) => {}
            (Verdict::Failed { failure, .. }, false) => {
                assert!(failure.message.contains("answered 404"), "{failure:?}")
            }
            (other, _) => panic!("{code}: {other:?}\nlog:\n{}", outcome.log),
        }
    }
}

/// Each hostile guest ends in its category with a clear message, and the
/// same sandbox then runs a normal job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_end_in_their_category() {
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let typed = sb.prepare(&guest_bytes("typed")).unwrap();
    let noop = sb.prepare(&guest_bytes("noop")).unwrap();
    let base = SandboxPolicy {
        timeout: Duration::from_secs(20),
        ..SandboxPolicy::default()
    };
    let closed = TestServer::start(|_, _| Reply::ok("secret")).await;

    let cases: Vec<(&PreparedTask, String, SandboxPolicy, Category, &str)> = vec![
        (
            &hostile,
            json!({"mode": "spin"}).to_string(),
            SandboxPolicy {
                fuel: 50_000_000,
                ..base.clone()
            },
            Category::FuelExhausted,
            "fuel",
        ),
        (
            &hostile,
            json!({"mode": "spin"}).to_string(),
            SandboxPolicy {
                fuel: u64::MAX / 2,
                timeout: Duration::from_millis(300),
                ..base.clone()
            },
            Category::Timeout,
            "timeout",
        ),
        (
            &hostile,
            json!({"mode": "sleep", "ms": 10_000}).to_string(),
            SandboxPolicy {
                timeout: Duration::from_millis(300),
                ..base.clone()
            },
            Category::Timeout,
            "timeout",
        ),
        (
            &hostile,
            json!({"mode": "memory-bomb"}).to_string(),
            SandboxPolicy {
                memory_bytes: 32 << 20,
                ..base.clone()
            },
            Category::MemoryLimit,
            "over the cap",
        ),
        (
            &hostile,
            json!({"mode": "recurse"}).to_string(),
            base.clone(),
            Category::Trap,
            "recursion",
        ),
        (
            &hostile,
            json!({"mode": "panic"}).to_string(),
            base.clone(),
            Category::Trap,
            "panicked",
        ),
        (
            &hostile,
            json!({"mode": "huge-result"}).to_string(),
            base.clone(),
            Category::OutputTooLarge,
            "over the cap",
        ),
        (
            &hostile,
            json!({"mode": "read-file", "path": "/etc/passwd"}).to_string(),
            base.clone(),
            Category::Denied,
            "",
        ),
        (
            &hostile,
            json!({"mode": "http", "url": closed.url("/")}).to_string(),
            base.clone(),
            Category::Denied,
            "not in the task's allow-list",
        ),
        (
            &hostile,
            json!({"mode": "enqueue-flood"}).to_string(),
            base.clone(),
            Category::Denied,
            "child jobs",
        ),
        (
            &hostile,
            json!({"mode": "print"}).to_string(),
            SandboxPolicy {
                fuel: 200_000_000,
                ..base.clone()
            },
            Category::FuelExhausted,
            "fuel",
        ),
        (
            &typed,
            json!({"m": 1}).to_string(),
            base.clone(),
            Category::BadPayload,
            "n",
        ),
        (
            &typed,
            "{not json".to_string(),
            base.clone(),
            Category::BadPayload,
            "not valid JSON",
        ),
    ];
    for (task, payload, policy, category, needle) in cases {
        let outcome = run(&sb, task, &payload, &policy).await;
        let (got, message) = failure(&outcome);
        assert_eq!(got, category, "{payload}: {message}");
        assert!(
            message.contains(needle),
            "{payload}: message {message:?} should mention {needle:?}"
        );
        assert!(
            outcome.log.len() <= policy.max_log_bytes + 200,
            "log stays bounded"
        );
        // The sandbox survives: a normal job right after succeeds.
        assert_eq!(
            success(&run(&sb, &noop, "{}", &base).await),
            json!({"ok": true})
        );
    }
    assert!(
        closed.requests().is_empty(),
        "a denied request never reaches the network"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_directories_and_nothing_else() {
    let dir = TempDir::new("grant");
    std::fs::write(dir.path().join("hello.txt"), "hi from the host").unwrap();
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let policy = SandboxPolicy {
        dirs: vec![DirGrant {
            host_path: dir.path().to_path_buf(),
            guest_path: "/data".into(),
            read_only: true,
        }],
        ..SandboxPolicy::default()
    };
    let read = |p: &str| json!({"mode": "read-file", "path": p}).to_string();
    let ok = success(&run(&sb, &hostile, &read("/data/hello.txt"), &policy).await);
    assert_eq!(ok, json!("hi from the host"));
    for escape in [
        "/data/../../../../etc/passwd",
        "/etc/passwd",
        "../etc/passwd",
        "/data/../data/../etc/passwd",
    ] {
        let (category, message) = failure(&run(&sb, &hostile, &read(escape), &policy).await);
        assert_eq!(category, Category::Denied, "{escape}: {message}");
        assert!(
            message.contains("outside the directories granted"),
            "{message}"
        );
    }
    // With plain std::fs the host's capability handles still hold: the
    // guest never gets the file, whatever it reports.
    let raw = |p: &str| json!({"mode": "read-file-raw", "path": p}).to_string();
    let symlink = dir.path().join("escape");
    std::os::unix::fs::symlink("/etc/passwd", &symlink).unwrap();
    for escape in ["/data/../etc/passwd", "/etc/passwd", "/data/escape"] {
        let outcome = run(&sb, &hostile, &raw(escape), &policy).await;
        assert!(
            !matches!(outcome.verdict, Verdict::Succeeded { .. }),
            "{escape} must not be readable"
        );
        assert!(
            !outcome.log.contains("root:"),
            "no passwd content leaks into the log"
        );
    }
    let (category, _) = failure(&run(&sb, &hostile, &raw("/data/escape"), &policy).await);
    assert_eq!(
        category,
        Category::Denied,
        "a symlink out of the grant is refused by the host"
    );
}

/// A tenant's writable grant under a disk quota: whichever call the guest
/// writes through (descriptor.write, write-via-stream, append-via-stream,
/// set-size, std::fs, or creating empty files), it is stopped at the quota,
/// the job ends `denied` naming the quota although the guest swallowed the
/// error and returned a result, and what is on disk stays within the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_writing_stops_at_the_disk_quota() {
    const QUOTA: u64 = 256 << 10;
    let sb = sandbox();
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    for via in [
        "write",
        "stream",
        "append",
        "set-size",
        "std",
        "create-files",
    ] {
        let cap = TempDir::new("quota");
        let (limits, policy, out) = quota_grant(&cap, QUOTA);
        let path = if via == "create-files" {
            "/out"
        } else {
            "/out/big"
        };
        let payload = json!({"mode": "write-loop", "via": via, "path": path, "chunk": 16384});
        // One tenant per way, so each starts from an empty account.
        let tenant = format!("quota-{via}");
        let outcome = run_as(&sb, &hostile, &tenant, payload, &policy, &limits).await;
        let (category, message) = failure(&outcome);
        assert_eq!(category, Category::Denied, "{via}: {message}");
        let quota = format!("disk quota of {QUOTA} bytes for tenant \"quota-{via}\"");
        assert!(message.contains(&quota), "{via}: {message}");
        let used = common::disk_use(&out);
        println!("{via}: {used} bytes on disk under a quota of {QUOTA}");
        assert!(used <= QUOTA, "{via}: {used} bytes on disk, over the quota");
        assert!(
            used >= QUOTA / 2,
            "{via}: only {used} bytes written: the quota stopped it, not something else"
        );
    }
}

/// A capped tenant with one writable grant `/out` under a quota.
fn quota_grant(cap: &TempDir, quota: u64) -> (TenantLimits, SandboxPolicy, std::path::PathBuf) {
    let out = cap.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let limits = TenantLimits {
        allow_dirs: Some(vec![cap.path().to_path_buf()]),
        max_disk_bytes: Some(quota),
        ..TenantLimits::default()
    };
    let policy = SandboxPolicy {
        dirs: vec![DirGrant::parse(&format!("{}::/out", out.display())).unwrap()],
        ..SandboxPolicy::default()
    };
    (limits, policy, out)
}

/// Run `payload` as a job of `tenant` under `limits`.
async fn run_as(
    sb: &Sandbox,
    task: &PreparedTask,
    tenant: &str,
    payload: Value,
    policy: &SandboxPolicy,
    limits: &TenantLimits,
) -> wasmq::sandbox::JobOutcome {
    let mut input = job(&payload.to_string());
    input.tenant = tenant.into();
    let backend = Arc::new(MemoryBackend::new());
    sb.run_capped(task, &input, policy, Some(limits), backend, None)
        .await
}

/// What is on disk when a job starts counts: with 200 KiB of a 256 KiB
/// quota used, a job gets the rest and no more; a write that would leave a
/// hole past the quota is refused outright; once the files are gone (and
/// the figure has aged), the whole quota is free again. Jobs of one tenant
/// running at once share the quota rather than each getting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_quota_counts_what_is_there_and_is_shared_by_a_tenants_jobs() {
    const QUOTA: u64 = 256 << 10;
    let sb = Arc::new(sandbox());
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let cap = TempDir::new("quota-used");
    let (limits, policy, out) = quota_grant(&cap, QUOTA);
    std::fs::write(out.join("old"), vec![0u8; 200 << 10]).unwrap();
    let loop_ =
        |file: &str| json!({"mode": "write-loop", "via": "write", "path": file, "chunk": 4096});
    let outcome = run_as(&sb, &hostile, "used", loop_("/out/new"), &policy, &limits).await;
    assert_eq!(failure(&outcome).0, Category::Denied);
    let new = std::fs::metadata(out.join("new")).unwrap().len();
    println!("with 200 KiB used, a job wrote {new} bytes under a {QUOTA}-byte quota");
    assert!(common::disk_use(&out) <= QUOTA);
    assert!(new >= 40 << 10, "it got the free space: {new}");

    let hole =
        json!({"mode": "write-loop", "via": "hole", "path": "/out/sparse", "limit": 1 << 30});
    let outcome = run_as(&sb, &hostile, "used", hole, &policy, &limits).await;
    assert_eq!(failure(&outcome).0, Category::Denied);
    assert_eq!(
        std::fs::metadata(out.join("sparse")).map_or(0, |m| m.len()),
        0
    );

    for file in ["old", "new", "sparse"] {
        let _ = std::fs::remove_file(out.join(file));
    }
    tokio::time::sleep(wasmq::sandbox::DISK_MEASURE_EVERY).await;
    let fill = json!({"mode": "write-file", "path": "/out/again", "bytes": 200 << 10});
    success(&run_as(&sb, &hostile, "used", fill, &policy, &limits).await);

    // Four writers of one tenant at once, on a fresh grant.
    let cap = TempDir::new("quota-shared");
    let (limits, policy, out) = quota_grant(&cap, QUOTA);
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let (sb, task, policy, limits) =
                (sb.clone(), hostile.clone(), policy.clone(), limits.clone());
            let payload = loop_(&format!("/out/w{i}"));
            tokio::spawn(
                async move { run_as(&sb, &task, "shared", payload, &policy, &limits).await },
            )
        })
        .collect();
    for writer in writers {
        assert_eq!(failure(&writer.await.unwrap()).0, Category::Denied);
    }
    let used = common::disk_use(&out);
    println!("four writers at once: {used} bytes on disk under a {QUOTA}-byte quota");
    assert!(used <= QUOTA, "{used} bytes: the writers shared one quota");
}

/// `wasmq run --dir` refuses a host path with `..` on one stderr line
/// before running anything, and takes a relative one from the current
/// directory.
#[test]
fn wasmq_run_refuses_a_dir_that_climbs_in_one_line() {
    let hostile = guest("hostile");
    let echo = r#"{"mode":"echo"}"#;
    let out = wasmq_run(&[path(&hostile), echo, "--dir", "/tmp/../etc::/etc:ro"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(
            "error: --dir \"/tmp/../etc::/etc:ro\": directory grant /tmp/../etc contains `..`"
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing ran");

    let dir = TempDir::new("relative");
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/hello.txt"), "relative grant").unwrap();
    let out = Command::new(wasmq_bin())
        .current_dir(dir.path())
        .args([
            "run",
            path(&hostile),
            r#"{"mode":"read-file","path":"/data/hello.txt"}"#,
        ])
        .args(["--dir", "data::/data:ro"])
        .env(
            "WASMQ_CACHE_DIR",
            std::env::temp_dir().join("wasmq-test-cache"),
        )
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out), json!("relative grant"));
}

#[test]
fn invalid_components_are_named() {
    let sb = sandbox();
    let cases: [(&[u8], &str); 3] = [
        (b"#!/bin/sh\necho not wasm\n", "not a WebAssembly file"),
        (b"\0asm\x01\0\0\0", "core WebAssembly module"),
        (
            &guest_bytes("other-world"),
            "does not implement the wasmq:task world",
        ),
    ];
    for (bytes, needle) in cases {
        let err = sb.prepare(bytes).err().expect("must be rejected");
        assert_eq!(err.category, Category::InvalidComponent);
        assert!(
            err.message.contains(needle),
            "{:?} should mention {needle:?}",
            err.message
        );
    }
    // The CLI says the same on one stderr line with a non-zero exit.
    let dir = TempDir::new("invalid");
    let file = dir.path().join("notes.wasm");
    std::fs::write(&file, "hello").unwrap();
    let out = wasmq_run(&[path(&file)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("error: invalid-component: not a WebAssembly file"),
        "{stderr}"
    );
}

#[test]
fn cli_failures_print_one_line_naming_the_category() {
    let hostile = guest("hostile");
    let out = wasmq_run(&[path(&hostile), r#"{"mode":"spin"}"#, "--fuel", "1000000"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: fuel-exhausted: used all 1000000 units of fuel"),
        "{stderr}"
    );

    let out = wasmq_run(&[
        path(&hostile),
        r#"{"mode":"spin"}"#,
        "--timeout",
        "200ms",
        "--fuel",
        "100000000000000",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: timeout:"));
}

#[test]
fn compiled_components_are_cached_on_disk() {
    let cache = TempDir::new("cache");
    let bytes = guest_bytes("noop");
    let limits = EngineLimits {
        instance_slots: 2,
        ..EngineLimits::default()
    };
    let first = Sandbox::new(
        build_engine(&limits).unwrap(),
        CompiledCache::new(Some(cache.0.clone())),
    )
    .unwrap();
    first.prepare(&bytes).unwrap();
    let artifacts: Vec<_> = std::fs::read_dir(cache.path().join("compiled"))
        .unwrap()
        .collect();
    assert_eq!(artifacts.len(), 1, "one compiled artifact per component");
    let artifact = artifacts[0].as_ref().unwrap().path();
    let written = std::fs::metadata(&artifact).unwrap().modified().unwrap();
    // A "restarted" process (new engine) loads it instead of recompiling.
    let second = Sandbox::new(
        build_engine(&limits).unwrap(),
        CompiledCache::new(Some(cache.0.clone())),
    )
    .unwrap();
    second.prepare(&bytes).unwrap();
    assert_eq!(
        std::fs::metadata(&artifact).unwrap().modified().unwrap(),
        written
    );
    // A corrupt entry is recompiled, not trusted. Written beside and
    // renamed over it, as the cache replaces artifacts: `first` and
    // `second` still map the old file, and rewriting a mapped file in
    // place kills the process with SIGBUS when they next touch it.
    let corrupt = artifact.with_extension("corrupt");
    std::fs::write(&corrupt, b"garbage").unwrap();
    std::fs::rename(&corrupt, &artifact).unwrap();
    let third = Sandbox::new(
        build_engine(&limits).unwrap(),
        CompiledCache::new(Some(cache.0.clone())),
    )
    .unwrap();
    third.prepare(&bytes).unwrap();
}

/// More jobs at once than the pool has slots: the extra ones come back as a
/// retry that names the host as the cause (a worker retries those without
/// using an attempt), and the others run normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_the_hosts_fault_not_the_tasks() {
    let sb = Arc::new(sandbox_with_slots(1));
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    let slots = wasmq::engine::pool_slots(1) as usize;
    let policy = SandboxPolicy::default();
    let runs: Vec<_> = (0..slots + 4)
        .map(|_| {
            let (sb, hostile, policy) = (sb.clone(), hostile.clone(), policy.clone());
            tokio::spawn(async move {
                let payload = json!({"mode": "sleep", "ms": 1500}).to_string();
                sb.run(
                    &hostile,
                    &job(&payload),
                    &policy,
                    Arc::new(MemoryBackend::new()),
                )
                .await
            })
        })
        .collect();
    let (mut ran, mut full) = (0, 0);
    for run in runs {
        let outcome = run.await.unwrap();
        match &outcome.verdict {
            Verdict::Succeeded { .. } => ran += 1,
            Verdict::Retry { message, .. } => {
                assert!(message.contains("no free instance slot"), "{message}");
                assert!(
                    outcome.host_fault.is_some(),
                    "a full pool is the host's fault"
                );
                full += 1;
            }
            other => panic!("unexpected outcome {other:?}\nlog:\n{}", outcome.log),
        }
    }
    assert!(full >= 1, "{} jobs fit in {slots} slots", slots + 4);
    assert!(ran >= 1 && ran <= slots, "{ran} jobs ran in {slots} slots");
}

/// An io pool's compute threads, in a real sandbox: two spinning guests on
/// a 3-thread runtime move to one compute thread after their bursts, where
/// they take turns, so together they take at least the sum of their running
/// times (side by side on the 3 threads they would take about half of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn spinning_guests_finish_on_the_compute_threads() {
    let sb = Arc::new(sandbox());
    let hostile = sb.prepare(&guest_bytes("hostile")).unwrap();
    // About 150 ms of spinning each.
    let policy = SandboxPolicy {
        fuel: 2_000_000_000,
        timeout: Duration::from_secs(60),
        ..SandboxPolicy::default()
    };
    let compute = ComputeThreads::start(1, CpuPriority::Normal, COMPUTE_BURST).unwrap();
    let started = std::time::Instant::now();
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let (sb, task, policy, compute) =
                (sb.clone(), hostile.clone(), policy.clone(), compute.clone());
            tokio::spawn(async move {
                let payload = json!({"mode": "spin"}).to_string();
                let backend = Arc::new(MemoryBackend::new());
                sb.run_paced(&task, &job(&payload), &policy, backend, Some(&compute))
                    .await
            })
        })
        .collect();
    let mut ran = Duration::ZERO;
    for spinner in spinners {
        let outcome = spinner.await.unwrap();
        assert_eq!(failure(&outcome).0, Category::FuelExhausted);
        assert!(outcome.usage.run_time_us <= outcome.usage.wall_time_us);
        ran += Duration::from_micros(outcome.usage.run_time_us);
    }
    let wall = started.elapsed();
    // Only the bursts (and the tick each was in when it spent it) ran
    // elsewhere.
    let elsewhere = COMPUTE_BURST * 2 + Duration::from_millis(10);
    assert!(
        wall + elsewhere >= ran,
        "the spinners ran {ran:?} in {wall:?}: side by side, not in turns"
    );
    assert!(ran >= Duration::from_millis(100), "they spun: {ran:?}");
}

/// A Python task built with componentize-py (`make py-guests`): 14 core
/// instances and an 18 MB component, which the engine's default limits
/// hold. Skipped, saying how to build it, where it is not built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_componentize_py_task_runs() {
    let Some(path) = python_guest("noop-py") else {
        return;
    };
    let sb = sandbox_for(Lang::Python);
    let task = sb.prepare(&std::fs::read(&path).unwrap()).unwrap();
    for _ in 0..2 {
        let outcome = run(&sb, &task, "{}", &SandboxPolicy::default()).await;
        assert_eq!(success(&outcome), json!({"ok": true}));
    }
}
