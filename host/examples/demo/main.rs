//! `make demo`: the example tasks end to end: deployed to Redis (a private
//! redis-server unless `WASMQ_REDIS_URL` answers), run by a worker in fresh
//! sandboxes, against real local HTTP servers (a mail API and a small site).
//!
//! What it shows: `noop`; `thumbnail` burning deterministic fuel; `scrape`
//! counting pages with a host counter, duplicates counted once; `onboard`
//! enqueued three times for user 7 plus a mail-API outage, sending exactly one
//! email; the same task as the seed's article writes it, against a `users`
//! table in PostgreSQL (a private server unless `WASMQ_DATABASE_URL`
//! answers): three concurrent jobs for one user, one email, the row's
//! `onboarded` flag turned on once, by the Rust task and by its Python twin
//! `onboard-py` (built by `wasmq build`) for another user; and a hostile
//! guest stopped by its fuel budget.

mod database;
mod fixture;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use serde_json::json;
use wasmq::broker::{Broker, EnqueueRequest, FlowState, ResultState};
use wasmq::launcher::{self, LaunchConfig};
use wasmq::policy::TaskPolicy;
use wasmq::pools::{PoolKind, PoolSpec};
use wasmq::secrets::SecretsKey;

use fixture::redis::RedisServer;

const GUESTS: &str = "target/guests/wasm32-wasip2/release";
/// Where `make py-guests` puts the Python tasks.
const PY_GUESTS: &str = "target/guests/py";

/// The user the database part onboards with the Rust task (user 7 is the
/// HTTP-only part's), and the one the Python task onboards.
const DB_USER: i64 = 42;
const DB_USER_PY: i64 = 43;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let emails = Arc::new(AtomicU64::new(0));
    let mail_calls = Arc::new(AtomicU64::new(0));
    let mail = {
        let (emails, calls) = (emails.clone(), mail_calls.clone());
        // Like a real mail API, it honours `Idempotency-Key`: a request with
        // a key it has already sent for is answered, not sent again (the
        // onboard task's requests carry its step's key).
        let sent: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        serve(move |_path, key| {
            // The mail provider is down for the first request.
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return (503, "try later".to_string());
            }
            let new = key.is_none_or(|k| sent.lock().unwrap().insert(k.to_string()));
            if new {
                emails.fetch_add(1, Ordering::SeqCst);
            }
            (200, "{\"queued\":true}".to_string())
        })
        .await?
    };
    let site = serve(|path, _| {
        (
            200,
            format!("<h1>{path}</h1><a href='/a'>a</a> <a href='/b'>b</a>"),
        )
    })
    .await?;

    let (redis_url, _redis) = redis_for_demo().await?;
    let broker = Broker::connect(&redis_url).await?;
    let tenant = "demo";
    // The worker's secrets key, made up for this run: it seals the
    // database's URL into the tenant's secrets and opens it in the worker.
    let secrets_key =
        Arc::new(SecretsKey::from_hex(&SecretsKey::generate_hex()).map_err(anyhow::Error::msg)?);
    let db = database::for_demo().await?;
    database::prepare(
        &broker,
        tenant,
        &secrets_key,
        &db.url,
        &[DB_USER, DB_USER_PY],
    )
    .await?;
    let deploy = |name: &'static str, policy: TaskPolicy| {
        let broker = broker.clone();
        async move {
            let bytes = std::fs::read(format!("{GUESTS}/{name}.wasm"))
                .map_err(|e| anyhow::anyhow!("{GUESTS}/{name}.wasm: {e} (run `make guests`)"))?;
            broker.deploy(tenant, name, &bytes, &policy).await
        }
    };
    let with_http = |addr: &str| {
        let mut p = TaskPolicy::default();
        p.sandbox.allow_http = vec![addr.to_string()];
        p.retry.backoff_base = Duration::from_millis(200);
        p.retry.auto_retry_kinds = vec!["network".into(), "mail-api".into()];
        p
    };
    deploy("noop", TaskPolicy::default()).await?;
    // The CPU-bound example goes to its own queue, served by a CPU pool.
    deploy(
        "thumbnail",
        TaskPolicy {
            queue: "images".into(),
            pool: PoolKind::Cpu,
            ..TaskPolicy::default()
        },
    )
    .await?;
    deploy("scrape", with_http(&site)).await?;
    let onboard_policy = {
        let mut p = with_http(&mail);
        p.sandbox.databases = vec!["app".into()];
        p
    };
    deploy("onboard", onboard_policy.clone()).await?;
    // The same task in Python, where `make py-guests` could build it.
    let python = format!("{PY_GUESTS}/onboard-py.wasm");
    let python = match std::fs::read(&python) {
        Ok(bytes) => {
            broker
                .deploy(tenant, "onboard-py", &bytes, &onboard_policy)
                .await?;
            true
        }
        Err(e) => {
            println!("skip   onboard-py: {python}: {e} (`make py-guests` builds it; it needs PyPI for componentize-py)");
            false
        }
    };
    let mut spin = TaskPolicy::default();
    spin.sandbox.fuel = 100_000_000;
    deploy("hostile", spin).await?;

    // Worker pools in this process, through the same launcher as `wasmq
    // worker --pool io=default:16 --pool cpu=images:1`: the io pool on this
    // runtime, the cpu pool on a runtime of its own.
    let mut config = LaunchConfig::new(&redis_url, tenant, &["default"], 16);
    config.pools.push(PoolSpec {
        kind: PoolKind::Cpu,
        queues: vec!["images".into()],
        width: 1,
    });
    config.drain_timeout = Duration::from_secs(10);
    config.id = "demo".into();
    config.secrets_key = Some(secrets_key);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let workers = tokio::spawn(launcher::run(config, async move {
        let _ = stopped.await;
    }));

    let mut jobs: Vec<(&str, serde_json::Value, Option<&str>)> = vec![
        ("noop", json!({}), None),
        (
            "thumbnail",
            json!({"width": 512, "height": 512, "seed": 42, "thumb": 64}),
            None,
        ),
    ];
    for page in ["/home", "/about", "/home"] {
        jobs.push((
            "scrape",
            json!({"url": format!("http://{site}{page}")}),
            None,
        ));
    }
    // The seed case: user 7 onboarded three times with one idempotency key,
    // once without, while the mail API fails its first request.
    for key in [
        Some("onboard-user-7"),
        Some("onboard-user-7"),
        Some("onboard-user-7"),
        None,
    ] {
        jobs.push((
            "onboard",
            json!({"user_id": 7, "mail_api": format!("http://{mail}/send")}),
            key,
        ));
    }
    jobs.push(("hostile", json!({"mode": "spin"}), None));

    let started = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for (task, payload, key) in &jobs {
        let request = EnqueueRequest {
            tenant: tenant.into(),
            task: task.to_string(),
            payload: payload.clone(),
            idempotency_key: key.map(String::from),
            store_result: Some(true),
            ..EnqueueRequest::default()
        };
        let enqueued = broker.enqueue(request).await?;
        let dup = if enqueued.duplicate {
            " (duplicate: same job)"
        } else {
            ""
        };
        match broker
            .result(tenant, &enqueued.id, Some(Duration::from_secs(30)))
            .await?
        {
            ResultState::Ready(result) => {
                ok += 1;
                println!("ok     {task:<10} {result}{dup}");
            }
            ResultState::Failed(failure) => {
                failed += 1;
                println!("failed {task:<10} {failure}");
            }
            other => {
                failed += 1;
                println!("??     {task:<10} {other:?}");
            }
        }
    }
    // The seed's scrape, fanned out from inside the task: one job per page
    // and a summary step that receives every page's result (a chord).
    let pages: Vec<String> = ["/home", "/about", "/blog"]
        .iter()
        .map(|p| format!("http://{site}{p}"))
        .collect();
    let request = EnqueueRequest {
        tenant: tenant.into(),
        task: "scrape".into(),
        payload: json!({ "pages": pages }),
        store_result: Some(true),
        ..EnqueueRequest::default()
    };
    let fan_out = broker.enqueue(request).await?;
    let wait = Some(Duration::from_secs(30));
    if let ResultState::Ready(started) = broker.result(tenant, &fan_out.id, wait).await? {
        let flow = started["flow_id"].as_str().unwrap_or_default();
        match broker.flow_state(tenant, flow, wait).await? {
            FlowState::Finished(Ok(summary)) => println!("ok     flow       {summary}"),
            other => {
                failed += 1;
                println!("failed flow       {other:?}");
            }
        }
    }
    let emails_before = emails.load(Ordering::SeqCst);
    failed += onboard_in_the_database(&broker, tenant, "onboard", DB_USER, &mail, &db.url).await?;
    let db_emails = emails.load(Ordering::SeqCst) - emails_before;
    let py_emails = if python {
        let before = emails.load(Ordering::SeqCst);
        failed +=
            onboard_in_the_database(&broker, tenant, "onboard-py", DB_USER_PY, &mail, &db.url)
                .await?;
        Some(emails.load(Ordering::SeqCst) - before)
    } else {
        None
    };
    let _ = stop.send(());
    workers.await??;
    println!(
        "summary: {} jobs through Redis at {redis_url}, {ok} succeeded, {failed} failed, {emails_before} welcome email(s) sent for user 7 and {db_emails} for user {DB_USER} ({} mail API calls), {:.0} ms",
        jobs.len(),
        mail_calls.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64() * 1e3
    );
    anyhow::ensure!(
        emails_before == 1,
        "expected exactly one welcome email for user 7"
    );
    anyhow::ensure!(
        db_emails == 1,
        "expected exactly one welcome email for user {DB_USER}, got {db_emails}"
    );
    if let Some(py_emails) = py_emails {
        println!("python: onboard-py sent {py_emails} welcome email(s) for user {DB_USER_PY}");
        anyhow::ensure!(
            py_emails == 1,
            "expected exactly one welcome email for user {DB_USER_PY} from onboard-py, got {py_emails}"
        );
    }
    chaos(&broker, &redis_url, tenant).await
}

/// The seed's task as the article writes it: three `task` jobs for one
/// user at once, each locking the user's row in one transaction; one sends
/// the email and sets `onboarded`, the others wait for the lock and find it
/// set. Prints the row before and after; returns the jobs that failed.
async fn onboard_in_the_database(
    broker: &Broker,
    tenant: &str,
    task: &str,
    user: i64,
    mail: &str,
    db_url: &str,
) -> anyhow::Result<u32> {
    println!(
        "db     users row {user} before: onboarded = {}",
        database::onboarded(db_url, user).await?
    );
    if task.ends_with("-py") {
        println!("db     {task}: the first job compiles the Python component (a few seconds to minutes; once per machine)");
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let request = EnqueueRequest {
            tenant: tenant.into(),
            task: task.into(),
            payload: json!({"user_id": user, "mail_api": format!("http://{mail}/send"), "db": "app"}),
            store_result: Some(true),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(request).await?.id);
    }
    let mut failed = 0;
    for id in ids {
        // The first job of a Python task compiles its 19 MB component
        // (about 20 s of CPU, on a low-priority thread: minutes on a busy
        // machine).
        match broker
            .result(tenant, &id, Some(Duration::from_secs(600)))
            .await?
        {
            ResultState::Ready(result) => println!("ok     {task:<10} {result} (database)"),
            other => {
                failed += 1;
                println!("failed {task:<10} {other:?} (database)");
            }
        }
    }
    let after = database::onboarded(db_url, user).await?;
    println!("db     users row {user} after: onboarded = {after}");
    anyhow::ensure!(after, "user {user}'s row is not onboarded");
    Ok(failed)
}

/// Onboard users through two `wasmq worker` processes while one of them is
/// killed with SIGKILL every second: no job is lost, and the mail API, which
/// honours `Idempotency-Key`, sends one email per user, though some POSTs
/// were sent twice (their worker died before the step was recorded).
async fn chaos(broker: &Broker, redis_url: &str, tenant: &str) -> anyhow::Result<()> {
    const USERS: u64 = 100;
    let wasmq = std::path::Path::new("target/debug/wasmq");
    anyhow::ensure!(
        wasmq.exists(),
        "{} is missing (run `make build`)",
        wasmq.display()
    );
    let spawn = || {
        std::process::Command::new(wasmq)
            .args(["--redis", redis_url, "--tenant", tenant, "worker"])
            .args(["--concurrency", "4", "--lease", "2s"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(KillOnDrop)
    };
    // A mail API that takes 200 ms per email, so kills land mid-request,
    // and honours `Idempotency-Key`.
    let (emails, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mail = {
        let (emails, calls) = (emails.clone(), calls.clone());
        let sent: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        serve_slowly(Duration::from_millis(200), move |_path, key| {
            calls.fetch_add(1, Ordering::SeqCst);
            if key.is_none_or(|k| sent.lock().unwrap().insert(k.to_string())) {
                emails.fetch_add(1, Ordering::SeqCst);
            }
            (200, "{\"queued\":true}".to_string())
        })
        .await?
    };
    broker
        .deploy(
            tenant,
            "onboard-chaos",
            &std::fs::read(format!("{GUESTS}/onboard.wasm"))?,
            &{
                let mut p = TaskPolicy::default();
                p.sandbox.allow_http = vec![mail.clone()];
                p.retry.auto_retry_kinds = vec!["network".into(), "mail-api".into()];
                p
            },
        )
        .await?;
    let mut ids = Vec::new();
    for user in 1000..1000 + USERS {
        let request = EnqueueRequest {
            tenant: tenant.into(),
            task: "onboard-chaos".into(),
            payload: json!({"user_id": user, "mail_api": format!("http://{mail}/send")}),
            ..EnqueueRequest::default()
        };
        ids.push(broker.enqueue(request).await?.id);
    }
    let started = Instant::now();
    let mut workers = [spawn()?, spawn()?];
    let mut kills = 0;
    loop {
        let mut done = 0;
        for id in &ids {
            if matches!(broker.result(tenant, id, None).await?, ResultState::Ignored) {
                done += 1;
            }
        }
        if done == ids.len() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "only {done} of {USERS} onboarded in 120 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let victim = kills % 2;
        workers[victim] = spawn()?;
        kills += 1;
    }
    let (sent, posts) = (emails.load(Ordering::SeqCst), calls.load(Ordering::SeqCst));
    println!(
        "chaos: {USERS} users onboarded by two workers, one killed with SIGKILL every second ({kills} kills), {:.1} s: {posts} POSTs, {sent} welcome emails (the mail API honours Idempotency-Key)",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        sent == USERS,
        "expected one welcome email per user, got {sent}"
    );
    Ok(())
}

/// `WASMQ_REDIS_URL` if it answers, else a private redis-server on a free
/// port (killed when the returned server drops).
async fn redis_for_demo() -> anyhow::Result<(String, Option<RedisServer>)> {
    if let Ok(url) = std::env::var("WASMQ_REDIS_URL") {
        if Broker::connect(&url).await.is_ok() {
            return Ok((url, None));
        }
    }
    let server = RedisServer::start();
    println!("started a private redis-server on port {}", server.port);
    Ok((server.url.clone(), Some(server)))
}

/// Kills a worker process when the demo ends with it still running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serve HTTP on a free loopback port; the handler maps a path and the
/// request's `Idempotency-Key` (if any) to (status, body).
async fn serve(
    handler: impl Fn(&str, Option<&str>) -> (u16, String) + Send + Sync + 'static,
) -> anyhow::Result<String> {
    serve_slowly(Duration::ZERO, handler).await
}

/// [`serve`], answering each request `delay` after reading it.
async fn serve_slowly(
    delay: Duration,
    handler: impl Fn(&str, Option<&str>) -> (u16, String) + Send + Sync + 'static,
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        // Read the whole request before acting on it, as a
                        // real API does: answering (and closing) while the
                        // client still sends its body makes the client see
                        // a broken request for an email that was sent.
                        let path = req.uri().path().to_string();
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from);
                        let _ = req.into_body().collect().await;
                        let (status, body) = handler(&path, key.as_deref());
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(addr)
}
