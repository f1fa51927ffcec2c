//! The `postgres` host interface against a real PostgreSQL and a real
//! redis-server (both private, on free ports): a task reaches only the
//! databases its policy grants, in its own tenant; parameters cannot
//! become SQL; a transaction left open is rolled back when the job
//! returns, traps, times out (in wasm or in a statement) or is cancelled; pooled connections are reused;
//! TLS follows libpq's sslmode against a TLS-only server; a session
//! belongs to one job (what a job changed in it is gone for the next);
//! transaction control in SQL cannot leave or end the host's transaction;
//! the statement timeout cannot be lifted; a huge value never reaches the
//! worker's memory.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::components::{example_task_bytes, Lang};
use common::jobs::enqueue_and_wait;
use common::postgres::PostgresServer;
use common::redis::RedisServer;
use common::{guest_bytes, text, wasmq_with};
use serde_json::{json, Value};
use wasmq::broker::{Broker, ResultState};
use wasmq::failure::Category;
use wasmq::policy::TaskPolicy;
use wasmq::secrets::SecretsKey;

const KEY: &str = "0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed";

struct World {
    _redis: RedisServer,
    redis_url: String,
    pg: PostgresServer,
    broker: Broker,
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
}

/// PostgreSQL with a `users` table (user 7 not onboarded), Redis, the
/// `db` guest deployed as acme's `db` (granted `app`, 2 s timeout, one
/// attempt), acme's `database:app` secret, and a worker holding the key.
async fn world() -> World {
    world_of(8).await
}

/// [`world`] with a worker of `concurrency` slots.
async fn world_of(concurrency: usize) -> World {
    world_configured(concurrency, |_| {}).await
}

/// [`world_of`], its worker's configuration changed by `configure`.
async fn world_configured(
    concurrency: usize,
    configure: impl FnOnce(&mut wasmq::launcher::LaunchConfig),
) -> World {
    let pg = PostgresServer::start();
    let client = pg.client().await;
    client
        .batch_execute(
            "CREATE TABLE users (id int8 PRIMARY KEY, name text, onboarded bool NOT NULL DEFAULT false, \
             score float8, data bytea, meta jsonb); INSERT INTO users (id, name) VALUES (7, 'seven');",
        )
        .await
        .unwrap();
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let out = wasmq_with(
        &redis.url,
        "acme",
        &["secret", "set", "database:app"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        &pg.url,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut policy = TaskPolicy::default();
    policy.sandbox.databases = vec!["app".into()];
    policy.sandbox.timeout = Duration::from_secs(2);
    policy.sandbox.fuel = 1_000_000_000_000; // `spin` meets the deadline first
    policy.retry.max_attempts = 1;
    for tenant in ["acme", "other"] {
        broker
            .deploy(tenant, "db", &guest_bytes("db"), &policy)
            .await
            .unwrap();
    }
    // The same, with time to be cancelled mid-statement.
    policy.sandbox.timeout = Duration::from_secs(60);
    broker
        .deploy("acme", "db-slow", &guest_bytes("db"), &policy)
        .await
        .unwrap();
    let mut config = common::workers::in_process_config(
        &broker,
        "acme",
        concurrency,
        Duration::from_secs(10),
        "pg-worker",
    );
    config.tenants = vec!["acme".into(), "other".into()];
    config.secrets_key = Some(Arc::new(SecretsKey::from_hex(KEY).unwrap()));
    configure(&mut config);
    let (stop, worker, _) = common::workers::start_configured(config);
    World {
        redis_url: redis.url.clone(),
        _redis: redis,
        pg,
        broker,
        stop,
        worker,
    }
}

impl World {
    async fn run(&self, tenant: &str, payload: Value) -> ResultState {
        enqueue_and_wait(&self.broker, tenant, "db", payload, Duration::from_secs(60))
            .await
            .1
    }

    async fn run_task(&self, task: &str, payload: Value) -> ResultState {
        enqueue_and_wait(&self.broker, "acme", task, payload, Duration::from_secs(60))
            .await
            .1
    }

    /// Run `steps` (see the db guest's `script`) as one job of acme's
    /// `task`; one result per step.
    async fn script(&self, task: &str, steps: Value) -> Vec<Value> {
        match self
            .run_task(task, json!({"op": "script", "steps": steps}))
            .await
        {
            ResultState::Ready(Value::Array(results)) => results,
            other => panic!("{steps}: {other:?}"),
        }
    }

    async fn query(&self, sql: &str, params: Value) -> Value {
        match self
            .run("acme", json!({"op": "query", "sql": sql, "params": params}))
            .await
        {
            ResultState::Ready(v) => v,
            other => panic!("{sql}: {other:?}"),
        }
    }

    /// Enqueue a `db-slow` job that locks row 7 in a transaction and
    /// waits in `pg_sleep` (to be cancelled there); its id.
    async fn enqueue_sleeper(&self) -> String {
        let req = wasmq::broker::EnqueueRequest {
            tenant: "acme".into(),
            task: "db-slow".into(),
            payload: json!({"op": "onboard", "user_id": 7, "then": "sleep"}),
            ..Default::default()
        };
        self.broker.enqueue(req).await.unwrap().id
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.worker.await.unwrap();
    }

    /// Backends of wasmq's pools, and those idle in a transaction.
    async fn wasmq_backends(&self) -> (i64, i64) {
        let row = self
            .pg
            .client()
            .await
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE state LIKE 'idle in transaction%') \
                 FROM pg_stat_activity WHERE application_name = 'wasmq'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

/// Whether a job's `SELECT pg_sleep(30)` shows as running within `within`.
async fn statement_running(client: &tokio_postgres::Client, within: Duration) -> bool {
    poll(within, || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 1
    })
    .await
}

/// Whether user 7's row is free (NOWAIT fails at once on a held lock) and
/// still not onboarded (the job's update rolled back) within `within`.
async fn row_7_free_and_unchanged(client: &tokio_postgres::Client, within: Duration) -> bool {
    poll(within, || async {
        client
            .query_one(
                "SELECT onboarded FROM users WHERE id = 7 FOR UPDATE NOWAIT",
                &[],
            )
            .await
            .map(|r| !r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await
}

/// Ask `check` every 20 ms until it says yes or `within` has passed.
async fn poll<F, Fut>(within: Duration, check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failure(state: ResultState) -> wasmq::failure::Failure {
    match state {
        ResultState::Failed(f) => f,
        other => panic!("expected a failure: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_parameters_never_become_sql_and_only_granted_databases_open() {
    let w = world().await;
    let hostile = [
        "Robert'); DROP TABLE users;--",
        "' OR '1'='1",
        "$1; DELETE FROM users",
        "\\'; SELECT pg_sleep(10); --",
        "\u{0}",
    ];
    for (i, name) in hostile.iter().enumerate() {
        let name = name.replace('\u{0}', "nul?");
        let got = w
            .query(
                "INSERT INTO users (id, name, score, meta) VALUES ($1, $2, $3, $4) RETURNING name, score, meta, onboarded",
                json!([100 + i as i64, name, 1.5, {"k": [1, 2]}]),
            )
            .await;
        assert_eq!(got["rows"], json!([[name, 1.5, {"k": [1, 2]}, false]]));
        // Read back by the hostile string itself: exactly that row.
        let got = w
            .query("SELECT id FROM users WHERE name = $1", json!([name]))
            .await;
        assert_eq!(got["rows"], json!([[100 + i as i64]]));
    }
    let got = w.query("SELECT count(*) FROM users", json!([])).await;
    assert_eq!(got["rows"], json!([[1 + hostile.len() as i64]]));
    // A string where an integer goes is refused, not parsed.
    let f = failure(
        w.run(
            "acme",
            json!({"op": "query", "sql": "SELECT * FROM users WHERE id = $1", "params": ["7 OR 1=1"]}),
        )
        .await,
    );
    assert!(f.message.contains("cannot be passed as int8"), "{f:?}");
    // Transactions only through the interface.
    let f = failure(
        w.run(
            "acme",
            json!({"op": "query", "sql": " begin", "params": []}),
        )
        .await,
    );
    assert!(f.message.contains("use the connection's begin"), "{f:?}");

    // Databases not granted, spelled any way: denied.
    for db in ["other", "database:app", "wasmq:{other}:secrets", "app/db"] {
        let f = failure(
            w.run("acme", json!({"op": "query", "db": db, "sql": "SELECT 1"}))
                .await,
        );
        assert_eq!(f.category, Category::Denied, "{db}: {f:?}");
    }
    // Another tenant granted the same name has no URL of its own, and
    // never gets acme's.
    let f = failure(
        w.run("other", json!({"op": "query", "sql": "SELECT 1"}))
            .await,
    );
    assert!(f.message.contains("has no URL"), "{f:?}");

    // The rows the queries returned (two per hostile string, and the
    // count) and the time spent in the database are summed into the
    // tenant's usage for billing; the other tenant opened nothing.
    let usage = |tenant: &str| -> Value {
        let out = common::wasmq(&w.redis_url, tenant, &["tenant", "usage", tenant]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str(&text(&out.stdout)).unwrap()
    };
    let acme = usage("acme");
    assert_eq!(acme["db_rows"], json!(2 * hostile.len() + 1), "{acme}");
    assert!(acme["db_time_us"].as_u64().unwrap() > 0, "{acme}");
    assert_eq!(usage("other")["db_rows"], json!(0));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_is_rolled_back_when_the_job_returns_traps_times_out_or_is_cancelled() {
    let w = world().await;
    for (then, category) in [
        ("return", None),
        ("trap", Some("trap:")),
        ("spin", Some("timeout:")),
        // The deadline passes while a statement runs: cancelled, rolled back.
        ("sleep", Some("timeout:")),
    ] {
        let state = w
            .run("acme", json!({"op": "onboard", "user_id": 7, "then": then}))
            .await;
        match (category, state) {
            (None, ResultState::Ready(_)) => {}
            // One attempt: "gave up after 1 attempt(s); last error: CATEGORY: ..."
            (Some(c), ResultState::Failed(f)) => assert!(f.message.contains(c), "{then}: {f:?}"),
            (_, other) => panic!("{then}: {other:?}"),
        }
        // The update was rolled back and the row lock released (NOWAIT
        // fails at once on a held lock).
        let client = w.pg.client().await;
        let released = row_7_free_and_unchanged(&client, Duration::from_millis(2000)).await;
        assert!(released, "{then}: row 7 still locked or changed");
        let (_, idle_in_tx) = w.wasmq_backends().await;
        assert_eq!(
            idle_in_tx, 0,
            "{then}: a connection is left in a transaction"
        );
    }

    // Cancelled by an operator while its statement runs: the same.
    let id = w.enqueue_sleeper().await;
    let client = w.pg.client().await;
    assert!(
        statement_running(&client, Duration::from_millis(10000)).await,
        "the job never reached its statement"
    );
    w.broker.cancel("acme", &id, "test").await.unwrap();
    let released = row_7_free_and_unchanged(&client, Duration::from_millis(5000)).await;
    assert!(released, "cancelled: row 7 still locked or changed");
    let status = w.broker.status("acme", &id).await.unwrap().unwrap();
    assert_eq!(status.state, "cancelled");
    let state = w
        .run(
            "acme",
            json!({"op": "onboard", "user_id": 7, "then": "commit"}),
        )
        .await;
    assert!(matches!(state, ResultState::Ready(_)), "{state:?}");
    let client = w.pg.client().await;
    let row = client
        .query_one("SELECT onboarded FROM users WHERE id = 7", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));

    // Pooled: many jobs, few connections, none left in a transaction.
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..100 {
            let req = wasmq::broker::EnqueueRequest {
                tenant: "acme".into(),
                task: "db".into(),
                payload: json!({"op": "query", "sql": "SELECT id FROM users WHERE id = $1", "params": [7]}),
                store_result: Some(true),
                ..Default::default()
            };
            ids.push(w.broker.enqueue(req).await.unwrap().id);
        }
        ids
    };
    for id in &ids {
        let state = w
            .broker
            .result("acme", id, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(matches!(state, ResultState::Ready(_)), "{state:?}");
    }
    // Billing: database time and rows per job.
    let status = w.broker.status("acme", &ids[0]).await.unwrap().unwrap();
    let usage = status.usage.unwrap();
    assert_eq!(usage["db_rows"], json!(1), "{usage}");
    assert!(usage["db_time_us"].as_u64().unwrap() > 0, "{usage}");
    let (backends, idle_in_tx) = w.wasmq_backends().await;
    println!("pg backends of the worker after 104 jobs: {backends}");
    assert!(
        (1..=wasmq::limits::DB_POOL_SIZE as i64).contains(&backends),
        "{backends}"
    );
    assert_eq!(idle_in_tx, 0);
    w.stop().await;
}

/// Through a real worker running the `db` guest, against a server that
/// accepts only TLS and holds a certificate for `localhost` signed by its
/// own CA: libpq's sslmodes do what Django/psycopg users expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_used_where_the_database_asks_for_it_and_certificates_are_checked_when_told() {
    // A connection failure is a host fault, retried without using an
    // attempt: none here, so each failing case ends at once.
    let w = world_configured(2, |config| {
        config.host_retries = wasmq::worker::HostRetries {
            max: 0,
            ..Default::default()
        };
    })
    .await;
    let tls_pg = PostgresServer::start_with_tls();
    let files = tls_pg.tls.as_ref().unwrap();
    let (ca, other_ca) = (files.ca.display(), files.other_ca.display());
    let port = tls_pg.port;
    const SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // Point acme's `database:app` at `url` (the worker builds a new pool
    // when the URL changes) and run SSL on it.
    let run_on = |url: String| {
        let w = &w;
        async move {
            let out = wasmq_with(
                &w.redis_url,
                "acme",
                &["secret", "set", "database:app"],
                &[("WASMQ_SECRETS_KEY", KEY)],
                &url,
            );
            assert!(out.status.success(), "{}", text(&out.stderr));
            w.run("acme", json!({"op": "query", "sql": SSL})).await
        }
    };
    let encrypted = json!([[true]]);

    // (f) The plain server of the other tests, default sslmode (prefer):
    // it offers no TLS, so plaintext, as before.
    match run_on(w.pg.url.clone()).await {
        ResultState::Ready(v) => assert_eq!(v["rows"], json!([[false]]), "{v}"),
        other => panic!("prefer, plain server: {other:?}"),
    }
    // require against that server: refused, saying why.
    let f = failure(run_on(format!("{}?sslmode=require", w.pg.url)).await);
    assert!(
        f.message.contains(
            "connecting to database app: Error occurred while creating a new object: \
                 error performing TLS handshake: server does not support TLS"
        ),
        "{f:?}"
    );
    // (a) require: TLS, the certificate not checked (as libpq).
    let ip = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let host = format!("postgres://postgres@localhost:{port}/postgres");
    for url in [format!("{ip}?sslmode=require"), ip.clone()] {
        match run_on(url.clone()).await {
            ResultState::Ready(v) => assert_eq!(v["rows"], encrypted, "{url}: {v}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    // (b) disable against a hostssl-only server: refused, and the
    // server's reason reaches the job.
    let f = failure(run_on(format!("{ip}?sslmode=disable")).await);
    println!("sslmode=disable: {}", f.message);
    assert!(f.message.contains("connecting to database app"), "{f:?}");
    assert!(f.message.contains("no pg_hba.conf entry"), "{f:?}");
    assert!(f.message.contains("no encryption"), "{f:?}");
    // (c) verify-full by name, against the CA that signed it: connects.
    match run_on(format!("{host}?sslmode=verify-full&sslrootcert={ca}")).await {
        ResultState::Ready(v) => assert_eq!(v["rows"], encrypted, "{v}"),
        other => panic!("verify-full, localhost: {other:?}"),
    }
    // The key=value form too.
    let conninfo =
        format!("host=localhost port={port} user=postgres sslmode=verify-full sslrootcert='{ca}'");
    match run_on(conninfo).await {
        ResultState::Ready(v) => assert_eq!(v["rows"], encrypted, "{v}"),
        other => panic!("verify-full, key=value: {other:?}"),
    }
    // (d) verify-full against another CA: a certificate problem, named.
    let f = failure(run_on(format!("{host}?sslmode=verify-full&sslrootcert={other_ca}")).await);
    println!("verify-full, wrong CA: {}", f.message);
    assert!(f.message.contains("connecting to database app"), "{f:?}");
    assert!(
        f.message
            .contains("invalid peer certificate: UnknownIssuer"),
        "{f:?}"
    );
    // So does require once a root certificate is given (libpq: verify-ca).
    let f = failure(run_on(format!("{ip}?sslmode=require&sslrootcert={other_ca}")).await);
    assert!(f.message.contains("UnknownIssuer"), "{f:?}");
    // Nor do the public roots vouch for a private CA.
    let f = failure(run_on(format!("{host}?sslmode=verify-full")).await);
    assert!(f.message.contains("UnknownIssuer"), "{f:?}");
    // (e) By IP, the certificate (for `localhost` only) fails verify-full's
    // name check, but passes verify-ca, which checks only the chain.
    let f = failure(run_on(format!("{ip}?sslmode=verify-full&sslrootcert={ca}")).await);
    println!("verify-full, by IP: {}", f.message);
    assert!(
        f.message
            .contains("certificate not valid for name \"127.0.0.1\""),
        "{f:?}"
    );
    match run_on(format!("{ip}?sslmode=verify-ca&sslrootcert={ca}")).await {
        ResultState::Ready(v) => assert_eq!(v["rows"], encrypted, "{v}"),
        other => panic!("verify-ca, by IP: {other:?}"),
    }
    // A root file the worker does not have, or one that is no PEM file
    // (a device, a directory, a readable system file): the URL's fault,
    // all said in the same words, so a tenant learns nothing of the
    // worker's files; nothing endless is read.
    for path in ["/nonexistent/ca.pem", "/dev/zero", "/etc/passwd", "/tmp"] {
        let f = failure(run_on(format!("{ip}?sslmode=verify-ca&sslrootcert={path}")).await);
        assert!(
            f.message.contains(&format!(
                "sslrootcert {path:?} is not a readable PEM file of CA certificates"
            )),
            "{path}: {f:?}"
        );
    }
    // verify-ca without a root file would trust any public certificate.
    let f = failure(run_on(format!("{ip}?sslmode=verify-ca")).await);
    assert!(f.message.contains("verify-ca needs sslrootcert"), "{f:?}");
    // A leading space does not turn the URL into conninfo and its
    // `require` into `prefer`: against the plain server it still fails.
    let f = failure(run_on(format!(" {}?sslmode=require", w.pg.url)).await);
    assert!(f.message.contains("does not support TLS"), "{f:?}");
    // An sslmode libpq does not have: the URL's fault, said so.
    let f = failure(run_on(format!("{ip}?sslmode=verify_full")).await);
    assert!(
        f.message.contains("sslmode \"verify_full\" is not one of"),
        "{f:?}"
    );

    // A statement running when its job is cancelled is cancelled over
    // TLS too (the cancel request is a new connection, which this server
    // refuses in plaintext): the row lock goes long before the 10 s
    // statement_timeout would free it.
    let client = tls_pg.client().await;
    client
        .batch_execute("CREATE TABLE users (id int8 PRIMARY KEY, onboarded bool NOT NULL DEFAULT false); INSERT INTO users (id) VALUES (7);")
        .await
        .unwrap();
    let out = wasmq_with(
        &w.redis_url,
        "acme",
        &["secret", "set", "database:app"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        &format!("{host}?sslmode=verify-full&sslrootcert={ca}"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = w.enqueue_sleeper().await;
    assert!(
        statement_running(&client, Duration::from_millis(10000)).await,
        "the job never reached its statement"
    );
    w.broker.cancel("acme", &id, "test").await.unwrap();
    let released = row_7_free_and_unchanged(&client, Duration::from_millis(5000)).await;
    assert!(
        released,
        "cancelled over TLS: row 7 still locked or changed"
    );
    drop(tls_pg);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_transaction_leaves_no_lock_or_connection_behind() {
    let w = world().await;
    // Tenant `solo`, served only by a `wasmq worker` process.
    let redis_url = w.redis_url.clone();
    let out = wasmq_with(
        &redis_url,
        "solo",
        &["secret", "set", "database:app"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        &w.pg.url,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut policy = TaskPolicy::default();
    policy.sandbox.databases = vec!["app".into()];
    w.broker
        .deploy("solo", "db", &guest_bytes("db"), &policy)
        .await
        .unwrap();
    let mut worker = common::workers::spawn_process_with(
        &redis_url,
        "solo",
        &["--concurrency", "2"],
        &[("WASMQ_SECRETS_KEY", KEY)],
    );
    let req = wasmq::broker::EnqueueRequest {
        tenant: "solo".into(),
        task: "db".into(),
        payload: json!({"op": "onboard", "user_id": 7, "then": "sleep"}),
        ..Default::default()
    };
    w.broker.enqueue(req).await.unwrap();
    let client = w.pg.client().await;
    assert!(
        statement_running(&client, Duration::from_millis(30000)).await,
        "the job never reached its statement"
    );
    // kill -9: no drop runs, the socket just closes.
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    let started = std::time::Instant::now();
    let released = row_7_free_and_unchanged(&client, Duration::from_secs(5)).await;
    assert!(released, "row 7 still locked 5 s after its worker died");
    println!("lock released {:?} after the kill", started.elapsed());
    let (_, idle_in_tx) = w.wasmq_backends().await;
    assert_eq!(idle_in_tx, 0);
    w.stop().await;
}

/// The seed scenario on the database: user 7 enqueued three times at
/// once, the mail API failing the first send, the worker killed (-9)
/// while the second send is in flight. One email (one idempotency key
/// among the sends the API accepted), `onboarded` true, every job done,
/// no connection left in a transaction or open once the workers are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_one_email_onboarded_no_leak_after_a_kill() {
    seed_scenario_in(Lang::Rust).await;
}

/// [`seed_scenario_one_email_onboarded_no_leak_after_a_kill`] with the
/// Python twin of `onboard` (tasks/onboard-py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_one_email_onboarded_no_leak_after_a_kill_py() {
    seed_scenario_in(Lang::Python).await;
}

async fn seed_scenario_in(lang: Lang) {
    use common::http::{Reply, TestServer};
    let Some(onboard) = example_task_bytes("onboard", lang) else {
        return;
    };
    let w = world().await;
    let emails: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mail = {
        let emails = emails.clone();
        TestServer::start(move |req, n| match n {
            1 => Reply::status(500),
            _ => {
                if let Some(key) = req.header("idempotency-key") {
                    emails.lock().unwrap().insert(key.to_string());
                }
                Reply {
                    // The second send is slow: the worker dies meanwhile.
                    delay: Duration::from_millis(if n == 2 { 3000 } else { 50 }),
                    ..Reply::ok(r#"{"queued":true}"#)
                }
            }
        })
        .await
    };
    let out = wasmq_with(
        &w.redis_url,
        "seed",
        &["secret", "set", "database:app"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        &w.pg.url,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut policy = TaskPolicy::default();
    policy.sandbox.databases = vec!["app".into()];
    policy.sandbox.allow_http = vec![mail.authority()];
    policy.retry.max_attempts = 5;
    policy.retry.backoff_base = Duration::from_millis(100);
    policy.retry.backoff_max = Duration::from_millis(500);
    policy.retry.auto_retry_kinds = vec!["network".into(), "mail-api".into()];
    w.broker
        .deploy("seed", "onboard", &onboard, &policy)
        .await
        .unwrap();
    let worker = |_: ()| {
        common::workers::spawn_process_with(
            &w.redis_url,
            "seed",
            &["--concurrency", "3", "--lease", "2s"],
            &[("WASMQ_SECRETS_KEY", KEY)],
        )
    };
    let mut first = worker(());
    let payload = json!({"user_id": 7, "mail_api": mail.url("/send"), "db": "app"});
    let enqueue = |_| {
        let req = wasmq::broker::EnqueueRequest {
            tenant: "seed".into(),
            task: "onboard".into(),
            payload: payload.clone(),
            store_result: Some(true),
            ..Default::default()
        };
        w.broker.enqueue(req)
    };
    let (a, b, c) = tokio::join!(enqueue(0), enqueue(1), enqueue(2));
    let ids = [a.unwrap().id, b.unwrap().id, c.unwrap().id];
    let started = std::time::Instant::now();
    while mail.count("/send") < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no second send"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let second = worker(());
    for id in &ids {
        let state = w
            .broker
            .result("seed", id, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(matches!(state, ResultState::Ready(_)), "{id}: {state:?}");
    }
    assert_eq!(emails.lock().unwrap().len(), 1, "{:?}", mail.requests());
    let client = w.pg.client().await;
    let row = client
        .query_one("SELECT onboarded FROM users WHERE id = 7", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let (_, idle_in_tx) = w.wasmq_backends().await;
    assert_eq!(idle_in_tx, 0);
    println!("mail API requests: {}", mail.count("/send"));
    // The workers gone (the in-process one too), no connection of wasmq's
    // is left open.
    drop(second);
    let World {
        stop,
        worker,
        pg,
        _redis,
        ..
    } = w;
    stop.send(()).unwrap();
    worker.await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let row = pg
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wasmq'",
                &[],
            )
            .await
            .unwrap();
        let left: i64 = row.get(0);
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{left} connection(s) leaked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(_redis);
}

/// Jobs of one indexed SELECT and one UPDATE each, through Redis, a
/// worker and the pooled `postgres` interface, against the floor: the
/// same two statements in a plain tokio-postgres loop (8 connections).
/// Prints both rates; a measurement, not a timed assertion. Debug builds
/// understate the host: `cargo test --release --test postgres -- --nocapture db_jobs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_jobs_per_second_against_a_plain_tokio_postgres_loop() {
    const N: usize = 5_000;
    const USERS: i64 = 10_000;
    let w = world_of(64).await;
    let client = w.pg.client().await;
    client
        .batch_execute(&format!(
            "UPDATE users SET score = 0; INSERT INTO users (id, score) \
             SELECT g, 0 FROM generate_series(1000, {}) g",
            1000 + USERS
        ))
        .await
        .unwrap();

    // The floor: 8 connections, prepared statements, nothing else.
    let started = std::time::Instant::now();
    let mut loops = Vec::new();
    for t in 0..8usize {
        let c = w.pg.client().await;
        loops.push(tokio::spawn(async move {
            let select = c
                .prepare("SELECT onboarded FROM users WHERE id = $1")
                .await
                .unwrap();
            let update = c
                .prepare("UPDATE users SET score = score + 1 WHERE id = $1")
                .await
                .unwrap();
            for i in (t..N).step_by(8) {
                let id = 1000 + (i as i64 * 7919) % USERS;
                c.query(&select, &[&id]).await.unwrap();
                c.execute(&update, &[&id]).await.unwrap();
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let floor = N as f64 / started.elapsed().as_secs_f64();

    // What a job's check-in adds on the server: the same loop, each
    // iteration followed by the check-in's reset (DISCARD ALL but
    // DEALLOCATE ALL, and the count of prepared statements: checkin.rs).
    let started = std::time::Instant::now();
    let mut loops = Vec::new();
    for t in 0..8usize {
        let c = w.pg.client().await;
        loops.push(tokio::spawn(async move {
            let select = c
                .prepare("SELECT onboarded FROM users WHERE id = $1")
                .await
                .unwrap();
            let update = c
                .prepare("UPDATE users SET score = score + 1 WHERE id = $1")
                .await
                .unwrap();
            for i in (t..N).step_by(8) {
                let id = 1000 + (i as i64 * 7919) % USERS;
                c.query(&select, &[&id]).await.unwrap();
                c.execute(&update, &[&id]).await.unwrap();
                c.simple_query(
                    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
                     SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; \
                     DISCARD SEQUENCES; SELECT pg_catalog.count(*) FILTER (WHERE from_sql), \
                     pg_catalog.count(*) FILTER (WHERE NOT from_sql) \
                     FROM pg_catalog.pg_prepared_statements",
                )
                .await
                .unwrap();
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let reset_floor = N as f64 / started.elapsed().as_secs_f64();

    // Warm up (the first job compiles the component), then measure.
    let warm = w.run("acme", json!({"op": "bench", "user_id": 1000})).await;
    assert!(matches!(warm, ResultState::Ready(_)), "{warm:?}");
    let mut conn = w._redis.connect().await;
    let runs = |conn: &mut redis::aio::ConnectionManager| {
        let mut conn = conn.clone();
        async move {
            let runs: Option<u64> = redis::cmd("HGET")
                .arg("wasmq:{acme}:usage")
                .arg("runs")
                .query_async(&mut conn)
                .await
                .unwrap();
            runs.unwrap_or(0)
        }
    };
    let before = runs(&mut conn).await;
    let payloads: Vec<Value> = (0..N)
        .map(|i| json!({"op": "bench", "user_id": 1000 + (i as i64 * 7919) % USERS}))
        .collect();
    let started = std::time::Instant::now();
    for chunk in payloads.chunks(1000) {
        w.broker.enqueue_many("acme", "db", chunk).await.unwrap();
    }
    while runs(&mut conn).await < before + N as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = N as f64 / started.elapsed().as_secs_f64();
    let (backends, _) = w.wasmq_backends().await;

    // The same jobs without the database (the `noop` guest): what the
    // queue, the worker and a fresh instance per job cost by themselves.
    w.broker
        .deploy("acme", "noop", &guest_bytes("noop"), &TaskPolicy::default())
        .await
        .unwrap();
    let warm = enqueue_and_wait(
        &w.broker,
        "acme",
        "noop",
        json!({}),
        Duration::from_secs(60),
    )
    .await;
    assert!(matches!(warm.1, ResultState::Ready(_)), "{warm:?}");
    let before = runs(&mut conn).await;
    let started = std::time::Instant::now();
    for _ in 0..N / 1000 {
        w.broker
            .enqueue_many("acme", "noop", &vec![json!({}); 1000])
            .await
            .unwrap();
    }
    while runs(&mut conn).await < before + N as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noop_rate = N as f64 / started.elapsed().as_secs_f64();
    let total: f64 = client
        .query_one("SELECT sum(score) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    // Both loops, the jobs and the warm-up job.
    assert_eq!(total as usize, 3 * N + 1, "every UPDATE ran once");
    println!(
        "db jobs (SELECT + UPDATE, through Redis, a worker of 64 slots and a pool of {backends} connections): \
         {rate:.0} jobs/s; the same path with the noop guest: {noop_rate:.0} jobs/s; \
         plain tokio-postgres loop, 8 connections: {floor:.0} iterations/s; \
         the same loop, each iteration followed by a check-in's reset: \
         {reset_floor:.0} iterations/s"
    );
    w.stop().await;
}

/// `wasmq run --secrets FILE`, no Redis: the job reads the file's secrets
/// and opens the file's databases, and nothing else; the values are not
/// printed, not in the saved state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasmq_run_takes_secrets_and_databases_from_a_file() {
    let pg = PostgresServer::start();
    let dir = common::TempDir::new("run-secrets");
    let file = dir.path().join("secrets.env");
    std::fs::write(
        &file,
        format!(
            "# for this run only\nmail_api_key=run-key-123\ndatabase:app={}\n",
            pg.url
        ),
    )
    .unwrap();
    let state = dir.path().join("state.json");
    let run = |guest: &str, payload: Value| {
        let path = common::guest(guest);
        let out = common::wasmq(
            "redis://127.0.0.1:1", // never reached: embedded mode
            "acme",
            &[
                "run",
                path.to_str().unwrap(),
                &payload.to_string(),
                "--secrets",
                file.to_str().unwrap(),
                "--state",
                state.to_str().unwrap(),
            ],
        );
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, stdout, stderr) = run("secrets", json!({"names": ["mail_api_key", "not_in_file"]}));
    assert!(ok, "{stderr}");
    let got: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got["mail_api_key"], json!({"reversed": "321-yek-nur"}));
    assert!(
        got["not_in_file"]["error"]
            .as_str()
            .unwrap()
            .contains("denied"),
        "{got}"
    );
    let (ok, stdout, stderr) = run(
        "db",
        json!({"op": "query", "sql": "SELECT $1::int8 + 1 AS n", "params": [41]}),
    );
    assert!(ok, "{stderr}");
    let got: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got["rows"], json!([[42]]), "{got}");
    // A database not in the file is denied.
    let (ok, _, stderr) = run(
        "db",
        json!({"op": "query", "db": "other", "sql": "SELECT 1"}),
    );
    assert!(!ok && stderr.contains("denied"), "{stderr}");
    let saved = std::fs::read_to_string(&state).unwrap();
    for value in ["run-key-123", pg.url.as_str()] {
        assert!(!saved.contains(value), "the state file holds {value}");
        assert!(!stderr.contains(value));
    }
    // A bad line is named, its value is not echoed.
    std::fs::write(&file, "mail_api_key=ok\nhunter2\n").unwrap();
    let (ok, _, stderr) = run("secrets", json!({"names": []}));
    assert!(
        !ok && stderr.contains("line 2: expected NAME=VALUE"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// `wasmq worker --db-pool-size N` (`LaunchConfig::db_pool_size`): however
/// many jobs run at once, the worker holds at most N connections to one
/// tenant's database; the other jobs wait for one and all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_size_bounds_a_workers_connections_and_jobs_wait_for_one() {
    const POOL: i64 = 3;
    let w = world_configured(12, |c| c.db_pool_size = POOL as usize).await;
    let mut ids = Vec::new();
    for _ in 0..9 {
        let req = wasmq::broker::EnqueueRequest {
            tenant: "acme".into(),
            task: "db".into(),
            payload: json!({"op": "query", "sql": "SELECT 1 FROM pg_sleep(0.2)", "params": []}),
            store_result: Some(true),
            ..Default::default()
        };
        ids.push(w.broker.enqueue(req).await.unwrap().id);
    }
    let mut most = 0;
    let started = std::time::Instant::now();
    loop {
        let (backends, _) = w.wasmq_backends().await;
        most = most.max(backends);
        let mut done = 0;
        for id in &ids {
            match w.broker.result("acme", id, None).await.unwrap() {
                ResultState::Ready(_) => done += 1,
                ResultState::Pending => {}
                other => panic!("{other:?}"),
            }
        }
        if done == ids.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most, POOL, "connections seen at most");
    w.stop().await;
}

/// The text of a step's error, or a panic naming what it returned.
fn step_error(result: &Value) -> &str {
    result["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error: {result}"))
}

/// One connection in the pool, two tasks of one tenant (`db-slow`, then
/// `db`): everything the first job changed in its session is gone when
/// the second gets the same connection; its advisory lock is freed as
/// soon as it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_belongs_to_one_job_whatever_the_job_changed_in_it() {
    let w = world_configured(2, |c| c.db_pool_size = 1).await;
    let client = w.pg.client().await;
    client
        .batch_execute("CREATE ROLE reader; CREATE SCHEMA elsewhere;")
        .await
        .unwrap();
    const SHOW: &str = "SELECT current_user::text, current_setting('search_path'), \
         current_setting('statement_timeout'), current_setting('lock_timeout'), \
         current_setting('default_transaction_read_only'), current_setting('myapp.tenant', true), \
         (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
         (SELECT count(*) FROM pg_listening_channels()), \
         (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), pg_backend_pid()";
    let first = w
        .script(
            "db-slow",
            json!([
                {"sql": "CREATE TEMP TABLE scratch (x int)"},
                {"sql": "SELECT 1 FROM pg_advisory_lock(42)"},
                {"sql": "LISTEN wasmq_test"},
                {"sql": "DO $$BEGIN EXECUTE 'PREPARE leftover AS SELECT 1'; END$$"},
                {"sql": "SET search_path = elsewhere"},
                {"sql": "SET lock_timeout = '1ms'"},
                {"sql": "SET myapp.tenant = 'first'"},
                {"sql": "SET default_transaction_read_only = on"},
                {"sql": "SET statement_timeout = 0"},
                {"sql": "SET ROLE reader"},
                {"sql": SHOW},
            ]),
        )
        .await;
    for (i, r) in first.iter().enumerate() {
        assert!(r.get("rows").is_some(), "step {i}: {r}");
    }
    let changed = &first[10]["rows"][0];
    println!("inside the first job: {changed}");
    assert_eq!(changed[0], json!("reader"));
    assert_eq!(changed[1], json!("elsewhere"));
    // Lifted by the job, set again by the host after the statement.
    assert_eq!(changed[2], json!("10s"));
    assert_eq!(changed[5], json!("first"));
    assert_eq!(
        changed.as_array().unwrap()[6..9],
        [json!(1), json!(1), json!(1)]
    );
    // Freed when the job ended, not when the connection is next used.
    let freed = poll(Duration::from_secs(5), || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 0
    })
    .await;
    assert!(freed, "the advisory lock outlived its job");
    let second = w.script("db", json!([{"sql": SHOW}])).await;
    let seen = &second[0]["rows"][0];
    println!("in the next job: {seen}");
    assert_eq!(seen[9], changed[9], "not the same connection: {seen}");
    assert_eq!(seen[0], json!("postgres"));
    assert_eq!(seen[1], json!("\"$user\", public"));
    assert_eq!(seen[2], json!("10s"));
    assert_eq!(seen[3], json!("0"));
    assert_eq!(seen[4], json!("off"));
    assert!(seen[5].is_null() || seen[5] == json!(""), "{seen}");
    assert_eq!(
        seen.as_array().unwrap()[6..9],
        [json!(0), json!(0), json!(0)]
    );
    let (backends, idle_in_tx) = w.wasmq_backends().await;
    assert_eq!((backends, idle_in_tx), (1, 0));
    w.stop().await;
}

/// The driver's prepared statements outlive the job (the next job runs
/// them under the same names, not preparing again), and a job that
/// swaps one of them for its own (`DEALLOCATE` of the driver's name,
/// then `PREPARE` under it, in a `DO` block since both are refused as
/// SQL) changes only its own results: the next job on the same session
/// runs the query it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_swap_the_drivers_prepared_statement_for_the_next_job() {
    let w = world_configured(2, |c| c.db_pool_size = 1).await;
    const MINE: &str = "SELECT 'mine'::text, pg_backend_pid()";
    let name_of_mine = json!({
        "sql": "SELECT name FROM pg_prepared_statements WHERE NOT from_sql AND statement = $1",
        "params": [MINE],
    });
    let first = w
        .script("db", json!([{"sql": MINE}, name_of_mine.clone()]))
        .await;
    let pid = &first[0]["rows"][0][1];
    let name = &first[1]["rows"][0][0];
    assert!(name.is_string(), "{first:?}");
    let quoted_mine = format!("'{}'", MINE.replace('\'', "''"));
    let swap = format!(
        "DO $$DECLARE n text; BEGIN \
         SELECT name INTO n FROM pg_prepared_statements WHERE statement = {quoted_mine}; \
         EXECUTE format('DEALLOCATE %I', n); \
         EXECUTE format('PREPARE %I AS SELECT ''stolen''::text, 0', n); END$$"
    );
    let second = w
        .script(
            "db",
            json!([
                {"sql": MINE},
                name_of_mine,
                {"sql": format!("PREPARE {} AS SELECT 'stolen'::text, 0", name.as_str().unwrap())},
                {"sql": format!("/* x */ deallocate {}", name.as_str().unwrap())},
                {"sql": format!("EXECUTE {}", name.as_str().unwrap())},
                {"sql": swap},
                {"sql": MINE},
            ]),
        )
        .await;
    println!("{}", serde_json::to_string_pretty(&second).unwrap());
    assert_eq!(second[0]["rows"][0][1], *pid, "not the same session");
    assert_eq!(
        second[1]["rows"][0][0], *name,
        "the driver prepared the statement again"
    );
    for (i, refused) in second.iter().enumerate().take(5).skip(2) {
        assert!(
            step_error(refused).contains("the host prepares each statement itself"),
            "step {i}: {refused}"
        );
    }
    assert!(second[5].get("rows").is_some(), "{}", second[5]);
    // The swap is real: the job itself now runs the guest's statement.
    assert_eq!(second[6]["rows"], json!([["stolen", 0]]));
    let third = w
        .script(
            "db",
            json!([
                {"sql": MINE},
                {"sql": "SELECT count(*) FILTER (WHERE from_sql) FROM pg_prepared_statements"},
            ]),
        )
        .await;
    println!("{third:?}");
    assert_eq!(third[0]["rows"], json!([["mine", pid]]));
    assert_eq!(third[1]["rows"], json!([[0]]));
    w.stop().await;
}

/// Transaction control the host did not issue: hidden behind comments or
/// empty statements it is refused; in a `DO` block or a procedure inside
/// the host's transaction the server refuses it and the host's rollback
/// still undoes everything; a COMMIT of a failed transaction says it
/// rolled back. No job leaves a transaction open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_in_sql_cannot_leave_open_or_end_the_hosts_transaction() {
    let w = world_configured(2, |c| c.db_pool_size = 1).await;
    let client = w.pg.client().await;
    client
        .batch_execute(
            "CREATE PROCEDURE commit_inside() LANGUAGE plpgsql AS \
             $$BEGIN UPDATE users SET onboarded = true WHERE id = 7; COMMIT; END$$; \
             CREATE PROCEDURE chain_at_end() LANGUAGE plpgsql AS \
             $$BEGIN COMMIT AND CHAIN; END$$;",
        )
        .await
        .unwrap();
    let update = json!({"sql": "UPDATE users SET name = 'changed' WHERE id = 7 RETURNING id"});
    let name = json!({"sql": "SELECT name, onboarded FROM users WHERE id = 7"});
    let got = w
        .script(
            "db",
            json!([
                {"sql": "/* x */ BEGIN"},
                {"sql": "-- x\nCOMMIT"},
                {"sql": "/* a /* nested */ comment */ start transaction"},
                {"sql": " ;; COMMIT AND CHAIN"},
                {"call": "begin"},
                update,
                {"sql": "-- hidden\ncommit"},
                {"sql": "DO $$BEGIN COMMIT; END$$"},
                {"call": "rollback"},
                name,
                {"call": "begin"},
                update,
                {"sql": "CALL commit_inside()"},
                {"call": "rollback"},
                name,
                {"call": "begin"},
                update,
                {"sql": "SELECT 1/0"},
                {"call": "commit"},
                name,
                // Outside a transaction a procedure may commit its own.
                {"sql": "CALL chain_at_end()"},
                {"sql": "DO $$BEGIN PERFORM 1; COMMIT; END$$"},
            ]),
        )
        .await;
    println!("{}", serde_json::to_string_pretty(&got).unwrap());
    for i in [0, 1, 2, 3, 6] {
        assert!(
            step_error(&got[i]).contains("use the connection's begin, commit and rollback"),
            "step {i}: {}",
            got[i]
        );
    }
    assert!(step_error(&got[7]).contains("2D000"), "{}", got[7]); // invalid transaction termination
    assert!(step_error(&got[12]).contains("2D000"), "{}", got[12]);
    for i in [9, 14, 19] {
        assert_eq!(got[i]["rows"], json!([["seven", false]]), "step {i}");
    }
    assert!(step_error(&got[17]).contains("22012"), "{}", got[17]); // division by zero
    assert!(
        step_error(&got[18]).contains("COMMIT rolled it back"),
        "{}",
        got[18]
    );
    assert!(got[20].get("rows").is_some(), "{}", got[20]);
    assert!(got[21].get("rows").is_some(), "{}", got[21]);
    let (_, idle_in_tx) = w.wasmq_backends().await;
    assert_eq!(idle_in_tx, 0);
    let row = client
        .query_one("SELECT name FROM users WHERE id = 7", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "seven");
    w.stop().await;
}

/// `SET statement_timeout = 0` (or `set_config`) lasts only until its own
/// statement ends: the next one still runs under the host's 10 s, and a
/// 30 s `pg_sleep` is cancelled there (the job's own deadline is 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_lift_the_statement_timeout() {
    let w = world_configured(2, |c| c.db_pool_size = 1).await;
    let started = std::time::Instant::now();
    let got = w
        .script(
            "db-slow",
            json!([
                {"sql": "SET statement_timeout = 0"},
                {"sql": "SELECT current_setting('statement_timeout')"},
                {"call": "begin"},
                {"sql": "SELECT set_config('statement_timeout', '0', false)"},
                {"sql": "SELECT 1 FROM pg_sleep(30)"},
            ]),
        )
        .await;
    let took = started.elapsed();
    println!("{got:?} in {took:?}");
    assert_eq!(got[1]["rows"], json!([["10s"]]));
    assert!(step_error(&got[4]).contains("57014"), "{}", got[4]); // query_canceled
    assert!(took < Duration::from_secs(25), "{took:?}");
    w.stop().await;
}

/// Peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

/// A worker process whose guest selects one 200 MB value: refused, naming
/// the cap, and the worker's peak memory rises by less than the cap (the
/// value is refused from its message header, before tokio-postgres would
/// buffer it). Many rows that pass the cap together: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_value_is_refused_before_it_is_in_the_workers_memory() {
    let w = world().await;
    let out = wasmq_with(
        &w.redis_url,
        "solo",
        &["secret", "set", "database:app"],
        &[("WASMQ_SECRETS_KEY", KEY)],
        &w.pg.url,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut policy = TaskPolicy::default();
    policy.sandbox.databases = vec!["app".into()];
    policy.retry.max_attempts = 1;
    w.broker
        .deploy("solo", "db", &guest_bytes("db"), &policy)
        .await
        .unwrap();
    let worker = common::workers::spawn_process_with(
        &w.redis_url,
        "solo",
        &["--concurrency", "1", "--db-pool-size", "1"],
        &[("WASMQ_SECRETS_KEY", KEY)],
    );
    let pid = worker.0.id();
    let run = |sql: &str| {
        let payload = json!({"op": "query", "sql": sql});
        let broker = &w.broker;
        async move {
            enqueue_and_wait(broker, "solo", "db", payload, Duration::from_secs(60))
                .await
                .1
        }
    };
    // Warm up: the component compiled, the pool and a connection made.
    let warm = run("SELECT repeat('x', 1000)").await;
    assert!(matches!(warm, ResultState::Ready(_)), "{warm:?}");
    let before = peak_rss(pid);
    let f = failure(run("SELECT repeat('x', 200000000)").await);
    let after = peak_rss(pid);
    let cap = wasmq::limits::MAX_DB_RESULT_BYTES as u64;
    println!(
        "worker peak RSS {} MiB before, {} MiB after a 200 MB value (cap {} MiB): {}",
        before >> 20,
        after >> 20,
        cap >> 20,
        f.message
    );
    assert!(
        f.message
            .contains(&format!("the query's result passed {cap} bytes")),
        "{f:?}"
    );
    assert!(
        after - before < cap,
        "peak RSS rose by {} bytes",
        after - before
    );
    // Many small rows past the cap together: refused the same way, and
    // the next job has a working connection.
    let f = failure(run("SELECT repeat('x', 1000) FROM generate_series(1, 9000)").await);
    assert!(f.message.contains("the query's result passed"), "{f:?}");
    let ok = run("SELECT 1::int8").await;
    assert!(matches!(ok, ResultState::Ready(_)), "{ok:?}");
    drop(worker);
    w.stop().await;
}
