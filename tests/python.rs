//! The Python SDK (guest-sdk/python/) and `wasmq build`, with real
//! components: the test guest tests/guests/py-sdk/app.py is built once per
//! run of this binary by `wasmq build` (with a hand-made pure-Python wheel
//! as its requirement) and run by in-process workers against a private
//! redis-server (and PostgreSQL, and a local HTTP server), or by the
//! sandbox directly where a test needs a payload the broker would refuse.
//!
//! Everything that needs componentize-py is skipped, saying to run
//! `make py-tools`, only when componentize-py cannot be found.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::http::{Reply, TestServer};
use common::jobs::enqueue_and_wait;
use common::postgres::PostgresServer;
use common::redis::RedisServer;
use common::{text, wasmq_bin, wasmq_with, TempDir};
use serde_json::{json, Value};
use wasmq::backend::memory::MemoryBackend;
use wasmq::broker::{Broker, ResultState};
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, EngineLimits};
use wasmq::failure::Category;
use wasmq::policy::{SandboxPolicy, TaskPolicy};
use wasmq::sandbox::{JobInput, JobOutcome, PreparedTask, Sandbox, Verdict};
use wasmq::secrets::SecretsKey;

const KEY: &str = "9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a9e7a";
const SKIP: &str =
    "skipped: componentize-py not found; install it with `make py-tools` (or set WASMQ_COMPONENTIZE_PY)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// componentize-py as `wasmq build` finds it from the repository root:
/// `$WASMQ_COMPONENTIZE_PY`, `.venv/bin/` of the root or a parent, `PATH`.
fn componentize_py() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMQ_COMPONENTIZE_PY").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let root = std::fs::canonicalize(repo()).unwrap();
    let in_venv = root
        .ancestors()
        .map(|d| d.join(".venv/bin/componentize-py"))
        .find(|p| p.is_file());
    in_venv.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("componentize-py"))
            .find(|p| p.is_file())
    })
}

/// The Python of componentize-py's virtualenv.
fn venv_python(componentize_py: &Path) -> PathBuf {
    let beside = componentize_py.with_file_name("python");
    if beside.is_file() {
        beside
    } else {
        PathBuf::from("python3")
    }
}

/// Writes a wheel `NAME-VERSION-py3-none-any.whl` into `dir` holding
/// `files` (path, bytes as text), with the dist-info pip needs; its path.
fn make_wheel(python: &Path, dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    const SCRIPT: &str = r#"
import base64, hashlib, json, sys, zipfile
out, name, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
info = f"{name}-1.0.dist-info"
files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: wasmq-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
record = []
with zipfile.ZipFile(out, "w") as z:
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
        z.writestr(path, data)
    record.append(f"{info}/RECORD,,")
    z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
"#;
    let wheel = dir.join(format!("{name}-1.0-py3-none-any.whl"));
    let files: serde_json::Map<String, Value> = files
        .iter()
        .map(|(p, t)| (p.to_string(), json!(t)))
        .collect();
    let out = Command::new(python)
        .args(["-c", SCRIPT])
        .arg(&wheel)
        .arg(name)
        .arg(Value::Object(files).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "making {name}'s wheel: {}",
        text(&out.stderr)
    );
    wheel
}

/// `wasmq build ARGS...` with componentize-py named by the environment.
fn wasmq_build(componentize_py: Option<&Path>, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut cmd = Command::new(wasmq_bin());
    cmd.arg("build").args(args);
    match componentize_py {
        Some(p) => cmd.env("WASMQ_COMPONENTIZE_PY", p),
        None => cmd.env_remove("WASMQ_COMPONENTIZE_PY"),
    };
    cmd.output().unwrap()
}

/// What the fixture built: the component and how the build went.
struct Built {
    wasm: PathBuf,
    seconds: f64,
    /// What `wasmq build` said (size and time).
    report: String,
}

/// The test guest, built once per run of this binary into
/// target/guests/py/py-sdk.wasm, with a pure-Python wheel
/// (`wasmq_test_helper`) as its requirement; `None` without componentize-py.
fn py_guest() -> Option<&'static Built> {
    // A failed build is kept too, so the other tests report it rather
    // than build again.
    static BUILT: OnceLock<Option<Result<Built, String>>> = OnceLock::new();
    let built = BUILT
        .get_or_init(|| {
            let componentize_py = componentize_py()?;
            let out_dir = repo().join("target/guests/py");
            let wheels = out_dir.join("py-sdk-wheels");
            std::fs::create_dir_all(&wheels).unwrap();
            let wheel = make_wheel(
                &venv_python(&componentize_py),
                &wheels,
                "wasmq_test_helper",
                &[(
                    "wasmq_test_helper/__init__.py",
                    "def shout(s):\n    return s.upper() + '!'\n",
                )],
            );
            let requirements = wheels.join("requirements.txt");
            std::fs::write(&requirements, format!("{}\n", wheel.display())).unwrap();
            let wasm = out_dir.join("py-sdk.wasm");
            let started = Instant::now();
            let out = wasmq_build(
                Some(&componentize_py),
                &[
                    repo().join("tests/guests/py-sdk/app.py").as_os_str(),
                    "-o".as_ref(),
                    wasm.as_os_str(),
                    "-r".as_ref(),
                    requirements.as_os_str(),
                ],
            );
            if !out.status.success() {
                return Some(Err(text(&out.stderr)));
            }
            Some(Ok(Built {
                wasm,
                seconds: started.elapsed().as_secs_f64(),
                report: text(&out.stderr),
            }))
        })
        .as_ref()?;
    match built {
        Ok(built) => Some(built),
        Err(stderr) => panic!("wasmq build of the test guest failed:\n{stderr}"),
    }
}

macro_rules! guest_or_skip {
    () => {
        match py_guest() {
            Some(built) => built,
            None => {
                println!("{SKIP}");
                return;
            }
        }
    };
}

// ---- through the broker -------------------------------------------------

/// Redis, a broker, the test guest deployed as acme's task `py` under a
/// policy `configure` adjusts (one attempt, results stored), and an
/// in-process worker holding the secrets key and the shared compile cache.
struct World {
    redis: RedisServer,
    broker: Broker,
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
}

impl World {
    async fn start(
        guest: &Built,
        secrets: &[(&str, &str)],
        configure: impl FnOnce(&mut TaskPolicy),
    ) -> World {
        let redis = RedisServer::start();
        let broker = Broker::connect(&redis.url).await.unwrap();
        // Loopback servers (HTTP, PostgreSQL) stand in for real ones. (A
        // Python component, about 20 MB, fits the default component cap.)
        common::create_tenant(&redis.url, "acme", &["--allow-private-networks"]);
        for (name, value) in secrets {
            let out = wasmq_with(
                &redis.url,
                "acme",
                &["secret", "set", name],
                &[("WASMQ_SECRETS_KEY", KEY)],
                value,
            );
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let mut policy = TaskPolicy::default();
        policy.retry.max_attempts = 1;
        policy.store_result = true;
        configure(&mut policy);
        broker
            .deploy("acme", "py", &std::fs::read(&guest.wasm).unwrap(), &policy)
            .await
            .unwrap();
        let mut config = common::workers::in_process_config(
            &broker,
            "acme",
            4,
            Duration::from_secs(30),
            "py-worker",
        );
        // Compiling the 20 MB component takes 10-20 s of CPU; the shared
        // disk cache makes that once per build, not once per test.
        config.cache_dir = Some(common::shared_cache_dir());
        config.secrets_key = Some(Arc::new(SecretsKey::from_hex(KEY).unwrap()));
        let (stop, worker, _) = common::workers::start_configured(config);
        World {
            redis,
            broker,
            stop,
            worker,
        }
    }

    /// One job of `py` with `payload`: its id and where it ended.
    async fn job(&self, payload: Value) -> (String, ResultState) {
        enqueue_and_wait(
            &self.broker,
            "acme",
            "py",
            payload,
            Duration::from_secs(120),
        )
        .await
    }

    /// The result of a job that must succeed.
    async fn ok(&self, payload: Value) -> Value {
        match self.job(payload.clone()).await {
            (_, ResultState::Ready(v)) => v,
            (id, other) => panic!("{payload}: {other:?}\n{}", self.log(&id).await),
        }
    }

    /// How a job that must fail failed.
    async fn failed(&self, payload: Value) -> (wasmq::failure::Failure, String) {
        match self.job(payload.clone()).await {
            (id, ResultState::Failed(f)) => (f, self.log(&id).await),
            (_, other) => panic!("{payload}: expected a failure, got {other:?}"),
        }
    }

    async fn log(&self, id: &str) -> String {
        let status = self.broker.status("acme", id).await.unwrap();
        status.and_then(|s| s.log).unwrap_or_default()
    }

    async fn result_of(&self, id: &str) -> ResultState {
        self.broker
            .result("acme", id, Some(Duration::from_secs(120)))
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.worker.await.unwrap();
        drop(self.redis);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_counters_locks_and_steps_keep_their_promises_through_redis() {
    let guest = guest_or_skip!();
    let w = World::start(guest, &[], |_| {}).await;

    // kv: bytes and JSON round trips, set_if_absent once, delete once.
    assert_eq!(
        w.ok(json!({"op": "kv", "key": "k"})).await,
        json!({
            "get": [0, 98, 121, 116, 101, 115],
            "get_json": {"a": [1, 2]},
            "absent_first": true, "absent_second": false, "absent_value": "one",
            "delete_first": true, "delete_second": false, "after_delete": null,
            "missing_json": null,
        })
    );

    // incr_once counts once per once-key, whichever job asks.
    let c = |delta: i64, key: &str| json!({"op": "counters", "name": "c", "delta": delta, "once_key": key});
    assert_eq!(
        w.ok(c(5, "k1")).await,
        json!({"incr_once": 5, "incr0": 5, "get": 5})
    );
    assert_eq!(
        w.ok(c(5, "k1")).await,
        json!({"incr_once": 5, "incr0": 5, "get": 5})
    );
    assert_eq!(
        w.ok(c(2, "k2")).await,
        json!({"incr_once": 7, "incr0": 7, "get": 7})
    );

    // Lock: a second holder is refused while it is held; the next
    // holder's fencing token is higher.
    let lock = w.ok(json!({"op": "lock", "name": "invoice:1"})).await;
    assert_eq!(lock["inner"], "busy", "{lock}");
    assert_eq!(lock["renewed"], true, "{lock}");
    assert!(lock["token2"].as_u64() > lock["token1"].as_u64(), "{lock}");
    // LockBusy left uncaught is a retry (here with no attempts left).
    let (busy, _) = w
        .failed(json!({"op": "lock_uncaught", "name": "invoice:2"}))
        .await;
    assert_eq!(busy.category, Category::RetryExhausted, "{busy:?}");
    assert!(busy.message.contains("lock invoice:2 is held"), "{busy:?}");

    // once: a second job skips the completed step and gets its output.
    let first = w
        .ok(json!({"op": "once", "key": "s1", "counter": "n1"}))
        .await;
    let second = w
        .ok(json!({"op": "once", "key": "s1", "counter": "n1"}))
        .await;
    assert_eq!(first["count"], 1);
    assert_eq!(second["count"], 1, "the step ran again: {second}");
    assert_eq!(first["out"], second["out"]);
    assert_eq!(first["token"], second["token"]);
    // An exception inside abandons the claim: the next job runs the step
    // (not "busy" for the 60 s lease).
    let (raised, log) = w
        .failed(json!({"op": "once", "key": "s2", "counter": "n2", "fail": true}))
        .await;
    assert_eq!(raised.category, Category::TaskError, "{raised:?}");
    assert!(
        raised
            .message
            .contains("ValueError: failed inside the step"),
        "{raised:?}"
    );
    assert!(log.contains("Traceback"), "{log}");
    let (id, state) = w
        .job(json!({"op": "once", "key": "s2", "counter": "n2"}))
        .await;
    let ResultState::Ready(after) = state else {
        panic!("{state:?}")
    };
    assert_eq!(after["count"], 2, "{after}");
    assert_eq!(after["out"]["ran_in"], json!(id));

    // The decorator form: the key is formatted from the arguments.
    let g1 = w
        .ok(json!({"op": "once_decorated", "user_id": 7, "counter": "g"}))
        .await;
    let g2 = w
        .ok(json!({"op": "once_decorated", "user_id": 7, "counter": "g"}))
        .await;
    let g3 = w
        .ok(json!({"op": "once_decorated", "user_id": 8, "counter": "g"}))
        .await;
    assert_eq!(
        (
            g1["count"].clone(),
            g2["count"].clone(),
            g3["count"].clone()
        ),
        (json!(1), json!(1), json!(2))
    );
    assert_eq!(g1["out"], g2["out"]);
    assert_eq!(g3["out"]["greeted"], 8);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_and_flows_start_jobs_whose_steps_read_what_they_waited_for() {
    let guest = guest_or_skip!();
    let w = World::start(guest, &[], |_| {}).await;

    let enqueued = w
        .ok(json!({"op": "enqueue", "task": "py", "payload": {"op": "echo", "value": 42}, "key": "child-1"}))
        .await;
    let child = enqueued["id"].as_str().unwrap().to_string();
    let status = w
        .broker
        .status("acme", &child)
        .await
        .unwrap()
        .expect("the child job exists");
    assert_eq!(status.task.as_deref(), Some("py"));
    assert_eq!(w.result_of(&child).await, ResultState::Ready(json!(42)));
    // The same idempotency key enqueues nothing new.
    let again = w
        .ok(json!({"op": "enqueue", "task": "py", "payload": {"op": "echo", "value": 42}, "key": "child-1"}))
        .await;
    assert_eq!(again["id"], json!(child));

    let started = w.ok(json!({"op": "flow", "task": "py"})).await;
    let ids: Vec<String> = serde_json::from_value(started["job_ids"].clone()).unwrap();
    assert_eq!(ids.len(), 3, "{started}");
    assert!(started["flow_id"].as_str().is_some_and(|f| !f.is_empty()));
    match w.result_of(&ids[2]).await {
        ResultState::Ready(v) => {
            assert_eq!(v["flow_id"], started["flow_id"], "{v}");
            assert_eq!(v["results"], json!([2]), "{v}");
            assert_eq!(v["deps"][0]["ok"], true, "{v}");
            assert_eq!(v["deps"][0]["job_id"], json!(ids[1]), "{v}");
        }
        other => panic!("{other:?}"),
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reads_granted_secrets_and_a_name_not_granted_is_denied() {
    let guest = guest_or_skip!();
    let w = World::start(
        guest,
        &[("mail_api_key", "k-123"), ("not_granted", "hidden")],
        |p| p.sandbox.secrets = vec!["mail_api_key".into(), "unset_one".into()],
    )
    .await;
    assert_eq!(
        w.ok(json!({"op": "config", "names": ["mail_api_key", "unset_one", "not_granted"]}))
            .await,
        json!({"mail_api_key": "321-k", "unset_one": null, "not_granted": "denied"})
    );
    // Left uncaught, Denied is kind "denied".
    let (failure, _) = w
        .failed(json!({"op": "config_uncaught", "names": ["not_granted"]}))
        .await;
    assert_eq!(failure.category, Category::Denied, "{failure:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cursors_take_both_placeholder_styles_and_roll_back_on_exception() {
    let guest = guest_or_skip!();
    let pg = PostgresServer::start();
    pg.client()
        .await
        .batch_execute("CREATE TABLE items (id int8 PRIMARY KEY, name text, score float8, data bytea, meta jsonb)")
        .await
        .unwrap();
    let w = World::start(guest, &[("database:app", &pg.url)], |p| {
        p.sandbox.databases = vec!["app".into()]
    })
    .await;
    let out = w.ok(json!({"op": "pg"})).await;
    assert_eq!(
        out,
        json!({
            "inserted": 1,
            "rows": [[1, "one", 1.5, [1, 2], {"k": "v"}]],
            "like": "100%",
            "named": {"description": ["total", "a"], "row": [5, 2]},
            "after_rollback": "one",
            "updated": 1,
            "first": [[1]],
            "rest": [[2]],
            "none_left": null,
        })
    );
    let rows = pg
        .client()
        .await
        .query("SELECT name FROM items ORDER BY id", &[])
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        names,
        ["one", "committed"],
        "the rolled-back update stayed undone"
    );
    // A database the policy does not grant: Denied.
    let (failure, _) = w.failed(json!({"op": "pg", "db": "other"})).await;
    assert_eq!(failure.category, Category::Denied, "{failure:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_and_post_json_carry_the_step_token_and_other_destinations_are_denied() {
    let guest = guest_or_skip!();
    let server = TestServer::start(|req, _| {
        if req.path.starts_with("/missing") {
            return Reply::status(404);
        }
        Reply::ok(
            json!({"path": req.path, "method": req.method, "len": req.body.len(), "x_test": req.header("x-test")})
                .to_string(),
        )
    })
    .await;
    // A port nothing listens on, allowed: a refused connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let w = World::start(guest, &[], |p| {
        p.sandbox.allow_http = vec![server.authority(), closed.to_string()]
    })
    .await;

    let got = w
        .ok(json!({"op": "http_get", "url": server.url("/get")}))
        .await;
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["ok"], true);
    assert_eq!(got["json"]["path"], "/get?q=a+b", "{got}");
    assert_eq!(got["json"]["x_test"], "yes", "{got}");
    assert_eq!(
        got["ctype"], "text/html",
        "headers are case-insensitive: {got}"
    );

    // A 10 kB JSON body (written in 4 kB chunks), outside and inside a step.
    let plain = w
        .ok(json!({"op": "http_post", "url": server.url("/post")}))
        .await;
    let inner: Value = serde_json::from_str(plain["out"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(inner["method"], "POST");
    let sent = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/post")
        .unwrap();
    assert_eq!(sent.json()["big"].as_str().map(str::len), Some(10_000));
    assert_eq!(sent.json()["n"], 1);
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(sent.header("idempotency-key"), None, "no step, no key");
    let stepped = w
        .ok(json!({"op": "http_post", "url": server.url("/post-step"), "key": "charge:1"}))
        .await;
    let sent = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/post-step")
        .unwrap();
    assert_eq!(
        sent.header("idempotency-key"),
        stepped["token"].as_str(),
        "inside a step the request carries the step's token"
    );

    let status = w
        .ok(json!({"op": "http_status", "url": server.url("/missing")}))
        .await;
    assert_eq!(status, json!({"raised": true, "status": 404, "ok": false}));

    // Not on the allow-list: Denied (also an http.RequestException);
    // uncaught, kind "denied". A refused connection: kind "network".
    let elsewhere = "http://127.0.0.2:9/x";
    assert_eq!(
        w.ok(json!({"op": "http_denied_caught", "url": elsewhere}))
            .await,
        json!({"denied": true, "is_http": true})
    );
    let (denied, _) = w
        .failed(json!({"op": "http_uncaught", "url": elsewhere}))
        .await;
    assert_eq!(denied.category, Category::Denied, "{denied:?}");
    let (network, _) = w
        .failed(json!({"op": "http_uncaught", "url": format!("http://{closed}/")}))
        .await;
    assert!(network.message.contains("network"), "{network:?}");
    w.stop().await;
}

// ---- in the sandbox directly -------------------------------------------

/// The sandbox (shared compile cache) and the test guest prepared in it.
fn sandbox_and_task(guest: &Built) -> (Sandbox, PreparedTask) {
    let sb = Sandbox::new(
        build_engine(&EngineLimits::default()).unwrap(),
        CompiledCache::new(Some(common::shared_cache_dir())),
    )
    .unwrap();
    let task = sb.prepare(&std::fs::read(&guest.wasm).unwrap()).unwrap();
    (sb, task)
}

async fn run_raw(sb: &Sandbox, task: &PreparedTask, payload: &str) -> JobOutcome {
    let job = JobInput::new("job-1", "py", "t1", payload);
    sb.run(
        task,
        &job,
        &SandboxPolicy::default(),
        Arc::new(MemoryBackend::new()),
    )
    .await
}

/// (category, kind, message) of a failed run.
fn failed(outcome: &JobOutcome) -> (Category, Option<String>, String) {
    match &outcome.verdict {
        Verdict::Failed { failure, kind } => {
            (failure.category, kind.clone(), failure.message.clone())
        }
        other => panic!("expected a failure, got {other:?}\nlog:\n{}", outcome.log),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_map_to_task_errors_and_logging_reaches_the_job_log() {
    let guest = guest_or_skip!();
    let (sb, task) = sandbox_and_task(guest);
    let run = |payload: Value| {
        let (sb, task) = (&sb, &task);
        async move { run_raw(sb, task, &payload.to_string()).await }
    };

    let logged = run(json!({"op": "log"})).await;
    assert_eq!(common::sandbox::success(&logged), json!("logged"));
    for line in ["debug line 1", "info line two", "warn line", "error line"] {
        assert!(
            logged.log.contains(line),
            "{line:?} not in the log:\n{}",
            logged.log
        );
    }

    match run(json!({"op": "retry"})).await.verdict {
        Verdict::Retry { message, delay } => {
            assert_eq!(message, "busy");
            assert_eq!(delay, Some(Duration::from_secs(5)));
        }
        other => panic!("{other:?}"),
    }
    let fail = failed(&run(json!({"op": "fail"})).await);
    assert_eq!(
        (fail.0, fail.1.as_deref()),
        (Category::TaskError, None),
        "{fail:?}"
    );
    assert!(fail.2.contains("nope"), "{fail:?}");
    let kind = failed(&run(json!({"op": "kind"})).await);
    assert_eq!(kind.1.as_deref(), Some("mail-api"), "{kind:?}");
    assert!(kind.2.contains("mail API down"), "{kind:?}");
    let kind_kw = failed(&run(json!({"op": "kind_kw"})).await);
    assert_eq!(kind_kw.1.as_deref(), Some("rate-limited"), "{kind_kw:?}");

    let raised = run(json!({"op": "raise"})).await;
    let (category, kind, message) = failed(&raised);
    assert_eq!(
        (category, kind.as_deref()),
        (Category::TaskError, Some("exception"))
    );
    assert!(message.contains("ValueError: boom"), "{message}");
    assert!(
        raised.log.contains("Traceback") && raised.log.contains("op_raise"),
        "the traceback is logged:\n{}",
        raised.log
    );

    // The host refuses a payload that is not JSON before the guest runs
    // (the SDK maps one that reaches it to kind "bad-payload" the same way).
    let bad = failed(&run_raw(&sb, &task, "not json").await);
    assert_eq!(bad.0, Category::BadPayload, "{bad:?}");
    assert_eq!(
        common::sandbox::success(&run_raw(&sb, &task, "null").await),
        json!({"payload": null})
    );

    let invalid = failed(&run(json!({"op": "host_invalid"})).await);
    assert_eq!(invalid.0, Category::TaskError, "{invalid:?}");
    assert!(invalid.2.contains("invalid host call"), "{invalid:?}");

    let job = common::sandbox::success(&run(json!({"op": "job"})).await);
    assert_eq!(
        (
            job["id"].clone(),
            job["task"].clone(),
            job["tenant"].clone(),
            job["attempt"].clone()
        ),
        (json!("job-1"), json!("py"), json!("t1"), json!(1))
    );
    assert_eq!(job["flow_id"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pure_python_requirement_is_bundled_and_importable() {
    let guest = guest_or_skip!();
    println!(
        "wasmq build: {} (measured {:.1} s)",
        guest.report, guest.seconds
    );
    let (sb, task) = sandbox_and_task(guest);
    let out = run_raw(
        &sb,
        &task,
        &json!({"op": "wheel", "text": "hi"}).to_string(),
    )
    .await;
    assert_eq!(common::sandbox::success(&out), json!("HI!"));
}

// ---- the SDK covers the world --------------------------------------------

/// Interfaces the world `task` of wit/task.wit imports (`import X;` lines),
/// by the last segment of their name.
fn imported_interfaces() -> Vec<String> {
    let wit = std::fs::read_to_string(repo().join("wit/task.wit")).unwrap();
    let world = wit
        .split("world task {")
        .nth(1)
        .expect("wit/task.wit has world task");
    world
        .lines()
        .filter_map(|l| l.trim().strip_prefix("import "))
        .map(|l| {
            let name = l.trim_end_matches(';').split('@').next().unwrap();
            name.rsplit('/').next().unwrap().to_string()
        })
        .collect()
}

/// Top-level `def`s (free functions) and `(class, def)`s of a generated
/// bindings module, dunders left out. A wrapper "calls" one when an SDK
/// module that imports the interface names it followed by `(`, `,` or `)`
/// (called, or handed to `host_call`).
fn generated_functions(source: &str) -> (Vec<String>, Vec<(String, String)>) {
    let mut free = Vec::new();
    let mut methods = Vec::new();
    let mut class = None::<String>;
    for line in source.lines() {
        if let Some(rest) = line.strip_prefix("class ") {
            class = Some(rest.split(['(', ':']).next().unwrap().trim().to_string());
        } else if let Some(rest) = line.strip_prefix("def ") {
            class = None;
            free.push(rest.split('(').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("    def ") {
            let name = rest.split('(').next().unwrap().to_string();
            if !name.starts_with("__") {
                methods.push((class.clone().unwrap(), name));
            }
        } else if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('@') {
            class = None;
        }
    }
    (free, methods)
}

#[test]
fn every_wasmq_function_the_python_world_imports_has_a_python_wrapper() {
    let Some(componentize_py) = componentize_py() else {
        println!("{SKIP}");
        return;
    };
    let out_dir = TempDir::new("py-bindings");
    let out = Command::new(&componentize_py)
        .arg("-d")
        .arg(repo().join("guest-sdk/python/wit"))
        .args(["-w", "task", "bindings"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let sdk_dir = repo().join("guest-sdk/python/wasmq");
    let sdk: Vec<(String, String)> = std::fs::read_dir(&sdk_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "py"))
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();

    let interfaces = imported_interfaces();
    assert!(interfaces.len() >= 9, "{interfaces:?}");
    let mut missing = Vec::new();
    let mut checked = 0;
    for iface in &interfaces {
        let generated = out_dir.path().join(format!("wit_world/imports/{iface}.py"));
        let source = std::fs::read_to_string(&generated)
            .unwrap_or_else(|e| panic!("{}: {e}", generated.display()));
        // The SDK modules that bind this interface, and under which alias.
        let users: Vec<(&str, String)> = sdk
            .iter()
            .filter_map(|(_path, text)| {
                let line = text
                    .lines()
                    .find(|l| l.starts_with(&format!("from wit_world.imports import {iface}")))?;
                let alias = match line.split(" as ").nth(1) {
                    Some(a) => a.trim().to_string(),
                    None => iface.clone(),
                };
                Some((text.as_str(), alias))
            })
            .collect();
        let (free, methods) = generated_functions(&source);
        for f in &free {
            checked += 1;
            let called = users.iter().any(|(t, alias)| {
                [",", "(", ")"]
                    .iter()
                    .any(|end| t.contains(&format!("{alias}.{f}{end}")))
            });
            if !called {
                missing.push(format!("{iface}.{f}"));
            }
        }
        for (class, m) in &methods {
            checked += 1;
            let called = users.iter().any(|(t, alias)| {
                t.contains(&format!("{alias}.{class}"))
                    && [",", "(", ")"]
                        .iter()
                        .any(|end| t.contains(&format!(".{m}{end}")))
            });
            if !called {
                missing.push(format!("{iface}.{class}.{m}"));
            }
        }
    }
    assert!(
        checked >= 25,
        "only {checked} functions found: is the parser right?"
    );
    assert!(
        missing.is_empty(),
        "no wrapper in guest-sdk/python/wasmq calls: {missing:?}"
    );
}

// ---- wasmq build's errors ------------------------------------------------

#[test]
fn build_names_the_file_and_line_of_a_syntax_error() {
    let Some(componentize_py) = componentize_py() else {
        println!("{SKIP}");
        return;
    };
    let dir = TempDir::new("py-syntax");
    let task = dir.path().join("broken.py");
    std::fs::write(
        &task,
        "from wasmq import task\n\n@task\ndef run(job, payload)\n    return 1\n",
    )
    .unwrap();
    let out = wasmq_build(
        Some(&componentize_py),
        &[
            task.as_os_str(),
            "-o".as_ref(),
            dir.path().join("broken.wasm").as_os_str(),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let canonical = std::fs::canonicalize(&task).unwrap();
    assert!(
        stderr.contains(&format!("File \"{}\", line 4", canonical.display())),
        "the error names the file and line:\n{stderr}"
    );
    assert!(stderr.contains("SyntaxError"), "{stderr}");
    assert!(!stderr.contains("Stack backtrace"), "{stderr}");
    assert!(!dir.path().join("broken.wasm").exists());
}

#[test]
fn build_without_componentize_py_says_how_to_install_it() {
    let dir = TempDir::new("py-no-tools");
    let task = dir.path().join("app.py");
    std::fs::write(&task, "from wasmq import task\n").unwrap();
    let empty = dir.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(wasmq_bin())
        .arg("build")
        .arg(&task)
        .current_dir(dir.path())
        .env_remove("WASMQ_COMPONENTIZE_PY")
        .env("PATH", &empty)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("componentize-py not found"), "{stderr}");
    assert!(stderr.contains("make py-tools"), "{stderr}");
    assert!(
        stderr.contains("python3 -m venv .venv && .venv/bin/pip install componentize-py==0.25.1"),
        "{stderr}"
    );
}

#[test]
fn build_refuses_a_requirement_with_a_native_extension_naming_it() {
    let Some(componentize_py) = componentize_py() else {
        println!("{SKIP}");
        return;
    };
    let dir = TempDir::new("py-native");
    let wheel = make_wheel(
        &venv_python(&componentize_py),
        dir.path(),
        "fastthing",
        &[
            ("fastthing/__init__.py", "from ._speed import go\n"),
            (
                "fastthing/_speed.cpython-311-x86_64-linux-gnu.so",
                "\u{7f}ELF not really",
            ),
        ],
    );
    let task = dir.path().join("app.py");
    std::fs::write(
        &task,
        "import fastthing\nfrom wasmq import task\n\n@task\ndef run(job, p):\n    return 1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("requirements.txt"),
        format!("{}\n", wheel.display()),
    )
    .unwrap();
    let started = Instant::now();
    // No -r: the requirements.txt beside the task is used.
    let out = wasmq_build(Some(&componentize_py), &[task.as_os_str()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("fastthing 1.0"),
        "names the distribution: {stderr}"
    );
    assert!(
        stderr.contains("fastthing/_speed.cpython-311-x86_64-linux-gnu.so"),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains("only pure-Python packages can be bundled"),
        "{stderr}"
    );
    assert!(!dir.path().join("app.wasm").exists());
    // Refused before componentize-py runs.
    assert!(started.elapsed() < Duration::from_secs(60));
}

// ---- the README's task ------------------------------------------------------

/// The first ```python block of README.md: the task a new user copies.
fn readme_python_task() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("```python\n")
        .expect("README.md has a Python task")
        + 10;
    let len = readme[start..].find("```").expect("the block ends");
    readme[start..start + len].to_string()
}

/// The Python task README.md shows builds as it is written, and does what
/// it says: one email per user across runs, even when the mail API failed
/// the first request (`mail-api`, a kind the policy may retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_python_task_builds_and_sends_one_email() {
    let Some(componentize_py) = componentize_py() else {
        println!("{SKIP}");
        return;
    };
    let dir = TempDir::new("readme-py");
    let source = dir.path().join("welcome.py");
    std::fs::write(&source, readme_python_task()).unwrap();
    let wasm = dir.path().join("welcome.wasm");
    let out = wasmq_build(
        Some(&componentize_py),
        &[source.as_os_str(), "-o".as_ref(), wasm.as_os_str()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mail = TestServer::start(|_, n| {
        if n == 1 {
            Reply::status(503)
        } else {
            Reply::ok("{}")
        }
    })
    .await;
    let sb = Sandbox::new(
        build_engine(&EngineLimits::default()).unwrap(),
        CompiledCache::new(Some(common::shared_cache_dir())),
    )
    .unwrap();
    let task = sb.prepare(&std::fs::read(&wasm).unwrap()).unwrap();
    let policy = SandboxPolicy {
        allow_http: vec![mail.authority()],
        ..SandboxPolicy::default()
    };
    let backend = Arc::new(MemoryBackend::new());
    let payload = json!({"user_id": 7, "mail_api": mail.url("/send")}).to_string();
    let job = JobInput::new("job-1", "welcome", "t1", &payload);
    let first = sb.run(&task, &job, &policy, backend.clone()).await;
    let (_, kind, message) = failed(&first);
    assert_eq!(kind.as_deref(), Some("mail-api"), "{message}");
    for _ in 0..2 {
        let out = sb.run(&task, &job, &policy, backend.clone()).await;
        assert_eq!(common::sandbox::success(&out), json!({"email": "sent"}));
    }
    assert_eq!(mail.count("/send"), 2, "one failed request, then one email");
    let keys: Vec<_> = mail
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").map(String::from))
        .collect();
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
}
