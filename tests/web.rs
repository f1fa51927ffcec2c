//! The web dashboard (`wasmq web`) against a real redis-server and real
//! workers: over HTTP (who may see what, on loopback too; the throttle
//! of wrong tokens; CSRF, read-only, escaping, and that its actions
//! change Redis) and in a real headless Chromium
//! (WebDriver): the live chart, pause from the queues page, search a job
//! by id, cancel and retry from the job page. Screenshots go to
//! `target/screenshots/`.

mod common;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{json, Value};
use wasmq::broker::{Broker, EnqueueRequest};
use wasmq::keys::Keys;
use wasmq::launcher::LaunchConfig;
use wasmq::policy::TaskPolicy;

use common::browser::Browser;
use common::redis::RedisServer;
use common::web::Dashboard;
use common::workers::start_configured;
use common::{guest_bytes, text, wasmq};

const TENANT: &str = "ops";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn policy_on(queue: &str) -> TaskPolicy {
    TaskPolicy {
        queue: queue.into(),
        ..TaskPolicy::default()
    }
}

/// A redis-server and broker with the hostile guest deployed as `work`
/// (queue `default`) and `idle` (queue `idle`, which no worker serves)
/// for `tenant`.
async fn setup(tenant: &str) -> (RedisServer, Broker) {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    deploy(&broker, tenant).await;
    (redis, broker)
}

async fn deploy(broker: &Broker, tenant: &str) {
    let hostile = guest_bytes("hostile");
    for (name, queue) in [("work", "default"), ("idle", "idle")] {
        broker
            .deploy(tenant, name, &hostile, &policy_on(queue))
            .await
            .unwrap();
    }
}

async fn enqueue(broker: &Broker, tenant: &str, task: &str, payload: Value) -> String {
    let request = EnqueueRequest {
        tenant: tenant.into(),
        task: task.into(),
        payload,
        store_result: Some(true),
        ..EnqueueRequest::default()
    };
    broker.enqueue(request).await.unwrap().id
}

/// A worker in this process on `tenant`'s `default` queue; stop it by
/// sending on the channel.
fn worker(
    redis: &RedisServer,
    tenant: &str,
    id: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<wasmq::worker::WorkerStats>,
) {
    let mut config = LaunchConfig::new(&redis.url, tenant, &["default"], 4);
    config.cache_dir = None;
    config.id = id.into();
    config.drain_timeout = Duration::from_secs(2);
    let (stop, handle, _) = start_configured(config);
    (stop, handle)
}

/// A job's state, or '' while it cannot be read (a status read that
/// timed out on a loaded machine is polled again, not a failure).
async fn state(broker: &Broker, tenant: &str, id: &str) -> String {
    match broker.status(tenant, id).await {
        Ok(status) => status.map(|s| s.state).unwrap_or_default(),
        Err(e) => {
            eprintln!("reading {id}'s status failed ({e:#}); polling again");
            String::new()
        }
    }
}

/// Poll `check` every 20 ms until it holds; panics with `what` after
/// `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn paused(broker: &Broker, tenant: &str, queue: &str) -> bool {
    broker
        .connection()
        .hexists(Keys::new(tenant).paused(), queue)
        .await
        .unwrap()
}

/// Off loopback, nothing is served without a token (401 and the login
/// form); the bearer token or a login's session cookie opens it; every
/// response carries the security headers; and the server refuses to
/// start there without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_every_request_needs_a_token() {
    let (redis, broker) = setup(TENANT).await;
    let web = Dashboard::start(&broker, TENANT, "0.0.0.0", Some(ADMIN), false).await;

    let mut anonymous = web.client();
    for path in [
        "/",
        "/t/ops/",
        "/t/ops/queues",
        "/t/ops/api/overview",
        "/tenants",
    ] {
        let r = anonymous.get(path).await;
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        assert!(r.body.contains("name=\"token\""), "{path}: the login form");
        assert!(!r.body.contains("idle"), "{path}: no data without a token");
    }
    let r = anonymous.post("/t/ops/queues/idle/pause", &[]).await;
    assert_eq!(r.status, 401);
    assert!(!paused(&broker, TENANT, "idle").await);

    let mut wrong = web.client();
    wrong.bearer = Some("admin-token-0123456789abcdeX".into());
    assert_eq!(wrong.get("/t/ops/queues").await.status, 401);

    let mut admin = web.client();
    admin.bearer = Some(ADMIN.into());
    let r = admin.get("/t/ops/queues").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("idle"));
    let csp = r.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(!r.body.contains("<script>"), "no inline script");

    // A login sets an HttpOnly, SameSite=Strict session cookie.
    let mut browser = web.client();
    let bad = browser.post("/login", &[("token", "nope")]).await;
    assert_eq!(bad.status, 401);
    assert!(bad.body.contains("not valid"));
    let ok = browser.post("/login", &[("token", ADMIN)]).await;
    assert_eq!(ok.status, 303, "{}", ok.body);
    let cookie = ok.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert_eq!(browser.get("/t/ops/queues").await.status, 200);
    let logged_out = browser.act("/t/ops/queues", "/logout").await;
    assert_eq!(logged_out.status, 303);
    assert_eq!(browser.get("/t/ops/queues").await.status, 401);

    // No token, no dashboard off loopback; a short token is refused too.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let config = wasmq::web::WebConfig::new(broker.clone(), TENANT);
    let refused = wasmq::web::serve(listener, config, async {})
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("without a token"), "{refused}");
    let out = std::process::Command::new(common::wasmq_bin())
        .args(["--redis", &redis.url, "web", "--listen", "0.0.0.0:0"])
        .env_remove("WASMQ_WEB_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("without a token"),
        "{}",
        text(&out.stderr)
    );
    let out = std::process::Command::new(common::wasmq_bin())
        .args(["--redis", &redis.url, "web", "--listen", "0.0.0.0:0"])
        .env("WASMQ_WEB_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("at least 16"),
        "{}",
        text(&out.stderr)
    );
}

/// With a token configured, a loopback dashboard needs it too: a TLS
/// proxy on the same host forwards from loopback, so an open loopback
/// would make the token protect nothing. Anonymous pages, API and
/// actions answer 401 (the login form), whatever `Host` or proxy headers
/// they carry; the admin token, a login and a tenant token open it. The
/// startup line says which mode the dashboard is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_on_loopback_is_required_for_everything() {
    let (redis, broker) = setup(TENANT).await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", Some(ADMIN), false).await;

    let mut anonymous = web.client();
    for path in [
        "/",
        "/t/ops/",
        "/t/ops/queues",
        "/t/ops/jobs",
        "/t/ops/dead",
        "/t/ops/api/overview",
        "/tenants",
    ] {
        let r = anonymous.get(path).await;
        assert_eq!(
            r.status, 401,
            "{path} on loopback without a token: {}",
            r.body
        );
        assert!(r.body.contains("name=\"token\""), "{path}: the login form");
        assert!(!r.body.contains("idle"), "{path}: no data without a token");
        assert!(r.csrf().is_none(), "{path}: no CSRF token handed out");
    }
    // What a proxy on this host forwards looks the same, and is refused
    // the same (not 421: behind a proxy, Host is the public name).
    let proxied = anonymous
        .request(
            "GET",
            "/t/ops/queues",
            &[
                ("host", "dash.example.com"),
                ("x-forwarded-for", "203.0.113.7"),
            ],
            "",
        )
        .await;
    assert_eq!(proxied.status, 401, "{}", proxied.body);
    for action in ["/t/ops/queues/idle/pause", "/t/ops/dead/purge", "/logout"] {
        let r = anonymous.post(action, &[]).await;
        assert_eq!(r.status, 401, "{action}: {}", r.body);
    }
    assert!(!paused(&broker, TENANT, "idle").await, "nothing changed");

    // The admin token: pages, API and actions work, through the proxy too.
    let mut admin = web.client();
    admin.bearer = Some(ADMIN.into());
    assert_eq!(admin.get("/t/ops/api/overview").await.status, 200);
    let r = admin
        .request(
            "GET",
            "/t/ops/queues",
            &[
                ("host", "dash.example.com"),
                ("x-forwarded-for", "203.0.113.7"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin.act("/t/ops/queues", "/t/ops/queues/idle/pause").await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(paused(&broker, TENANT, "idle").await);

    // A login's session.
    let mut browser = web.client();
    assert_eq!(
        browser.post("/login", &[("token", ADMIN)]).await.status,
        303
    );
    let r = browser
        .act("/t/ops/queues", "/t/ops/queues/idle/resume")
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(!paused(&broker, TENANT, "idle").await);

    // A tenant token: its own tenant.
    let (token, _) = broker
        .web_token_create(TENANT, "loopback", "test")
        .await
        .unwrap();
    let mut tenant = web.client();
    tenant.bearer = Some(token);
    assert_eq!(tenant.get("/t/ops/queues").await.status, 200);
    assert_eq!(tenant.get("/t/other/queues").await.status, 403);

    // The startup line names the mode.
    let token_line = first_stderr_line(&redis.url, Some(ADMIN));
    assert!(
        token_line.contains("token required") && token_line.contains("http://127.0.0.1:"),
        "{token_line}"
    );
    let fresh = RedisServer::start();
    let open_line = first_stderr_line(&fresh.url, None);
    assert!(
        open_line.contains("open to anyone who can reach loopback")
            && open_line.contains("no token configured"),
        "{open_line}"
    );
}

/// The first line `wasmq web --listen 127.0.0.1:0` writes to stderr (the
/// startup line, or why it refused), with `token` as its admin token;
/// the process is stopped after.
fn first_stderr_line(redis: &str, token: Option<&str>) -> String {
    use std::io::BufRead;
    let mut command = std::process::Command::new(common::wasmq_bin());
    command
        .args(["--redis", redis, "web", "--listen", "127.0.0.1:0"])
        .env_remove("WASMQ_WEB_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(t) = token {
        command.env("WASMQ_WEB_TOKEN", t);
    }
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    line
}

/// An open dashboard (loopback, no admin token) is for this machine's
/// users only: it refuses a request a proxy forwarded, refuses to start
/// while tenants it knows of hold dashboard tokens (they mean others are
/// meant to reach it), and refuses `--trust-forwarded-for`. An admin
/// token lifts all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_dashboard_is_for_this_machine_only() {
    let (redis, broker) = setup(TENANT).await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let mut c = web.client();
    assert_eq!(c.get("/t/ops/queues").await.status, 200);
    for forwarded in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let r = c
            .request("GET", "/t/ops/queues", &[(forwarded, "203.0.113.7")], "")
            .await;
        assert_eq!(r.status, 403, "{forwarded}: {}", r.body);
        assert!(r.body.contains("through a proxy"), "{}", r.body);
        assert!(!r.body.contains("idle"), "no data");
    }
    drop(web);

    // A tenant with a record holds a dashboard token: no open dashboard.
    common::create_tenant(&redis.url, "acme", &[]);
    broker
        .web_token_create("acme", "on-call", "test")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = wasmq::web::serve(
        listener,
        wasmq::web::WebConfig::new(broker.clone(), TENANT),
        async {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("acme") && refused.contains("--token-file"),
        "{refused}"
    );
    let out = std::process::Command::new(common::wasmq_bin())
        .args(["--redis", &redis.url, "web", "--listen", "127.0.0.1:0"])
        .env_remove("WASMQ_WEB_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("have dashboard tokens"),
        "{}",
        text(&out.stderr)
    );
    // With an admin token it starts, and the tenant token works.
    let mut config = wasmq::web::WebConfig::new(broker.clone(), TENANT);
    config.admin_token = Some(ADMIN.into());
    let web = Dashboard::start_with("127.0.0.1", config).await;
    let mut admin = web.client();
    admin.bearer = Some(ADMIN.into());
    assert_eq!(admin.get("/t/acme/").await.status, 200);

    let mut config = wasmq::web::WebConfig::new(broker.clone(), TENANT);
    config.trust_forwarded_for = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = wasmq::web::serve(listener, config, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("--trust-forwarded-for"), "{refused}");
}

/// Wrong bearer tokens sent in parallel are counted *before* they are
/// checked: of 50 sent at once, at most the budget (plus what refilled
/// while they ran) is checked (401); the rest get 429 with `Retry-After`,
/// and so does the right token from that client, unchecked, while the
/// budget is spent. Another client is not held back. After the wait, the
/// right token works, and valid requests spend nothing. Logins are
/// counted the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_tokens_are_throttled_before_they_are_checked() {
    const BUDGET: u32 = 5;
    const WINDOW: Duration = Duration::from_secs(10);
    let refill = WINDOW / BUDGET;
    let (_redis, broker) = setup(TENANT).await;
    let mut config = wasmq::web::WebConfig::new(broker.clone(), TENANT);
    config.admin_token = Some(ADMIN.into());
    config.throttle = wasmq::web::ThrottleConfig {
        failures: BUDGET,
        window: WINDOW,
    };
    let web = Dashboard::start_with("127.0.0.1", config).await;

    /// Count of each status among `answers`.
    fn count(answers: &[common::web::Resp], status: u16) -> usize {
        answers.iter().filter(|r| r.status == status).count()
    }
    // Tenant-shaped guesses: each check is a Redis round trip, so checks
    // overlap, as a real attacker's would.
    let started = Instant::now();
    let guesses = (0..50).map(|_| {
        let mut c = web.client();
        c.bearer = Some(format!("wqt-ops.{}", "0".repeat(64)));
        tokio::spawn(async move { c.get("/t/ops/queues").await })
    });
    let mut answers = Vec::new();
    for guess in guesses.collect::<Vec<_>>() {
        answers.push(guess.await.unwrap());
    }
    let elapsed = started.elapsed();
    let refilled = (elapsed.as_secs_f64() / refill.as_secs_f64()).floor() as usize;
    let (checked, throttled) = (count(&answers, 401), count(&answers, 429));
    eprintln!(
        "50 wrong tokens in parallel in {elapsed:?}: {checked} checked (401), {throttled} throttled (429)"
    );
    assert_eq!(checked + throttled, 50, "only 401 or 429");
    assert!(
        (BUDGET as usize..=BUDGET as usize + refilled).contains(&checked),
        "{checked} checked: the budget is {BUDGET}, {refilled} refilled in {elapsed:?}"
    );
    for r in answers.iter().filter(|r| r.status == 429) {
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=refill.as_secs()).contains(&wait), "Retry-After {wait}");
        assert!(r.body.contains("Too many wrong tokens"), "{}", r.body);
    }

    // The right token from the same client is not even checked now...
    let mut same = web.client();
    same.bearer = Some(ADMIN.into());
    let r = same.get("/t/ops/queues").await;
    assert_eq!(r.status, 429, "{}", r.body);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let mut login = web.client();
    assert_eq!(login.post("/login", &[("token", ADMIN)]).await.status, 429);
    // ...while another client is not held back.
    let mut other = web.client();
    other.source = Some("127.0.0.2".parse().unwrap());
    other.bearer = Some(ADMIN.into());
    assert_eq!(other.get("/t/ops/queues").await.status, 200);

    // After the wait, it works; valid requests spend nothing.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    for _ in 0..3 * BUDGET {
        let r = same.get("/t/ops/queues").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Logins sent in parallel are counted before they are checked too.
    let started = Instant::now();
    let logins = (0..20).map(|_| {
        let mut c = web.client();
        c.source = Some("127.0.0.3".parse().unwrap());
        tokio::spawn(async move { c.post("/login", &[("token", "not-the-token-at-all")]).await })
    });
    let mut answers = Vec::new();
    for login in logins.collect::<Vec<_>>() {
        answers.push(login.await.unwrap());
    }
    let refilled = (started.elapsed().as_secs_f64() / refill.as_secs_f64()).floor() as usize;
    let checked = count(&answers, 401);
    assert_eq!(checked + count(&answers, 429), 20);
    assert!(
        (BUDGET as usize..=BUDGET as usize + refilled).contains(&checked),
        "{checked} logins checked: the budget is {BUDGET}"
    );
}

/// Behind a proxy every client has its address, and they share one
/// budget; `--trust-forwarded-for` counts each by the last
/// `X-Forwarded-For` entry instead. Without it, the header is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_picks_the_budget_only_when_trusted() {
    let (_redis, broker) = setup(TENANT).await;
    for trust in [false, true] {
        let mut config = wasmq::web::WebConfig::new(broker.clone(), TENANT);
        config.admin_token = Some(ADMIN.into());
        config.trust_forwarded_for = trust;
        config.throttle = wasmq::web::ThrottleConfig {
            failures: 2,
            window: Duration::from_secs(3600),
        };
        let web = Dashboard::start_with("127.0.0.1", config).await;
        let mut c = web.client();
        c.bearer = Some("admin-token-0123456789abcdeX".into());
        let mut from = async |xff: &str| {
            c.request("GET", "/t/ops/", &[("x-forwarded-for", xff)], "")
                .await
                .status
        };
        // A client's own entry comes first; the proxy's last one counts.
        assert_eq!(from("6.6.6.6, 198.51.100.1").await, 401);
        assert_eq!(from("198.51.100.1").await, 401);
        assert_eq!(from("198.51.100.1").await, 429, "trust {trust}");
        let fresh = from("198.51.100.2").await;
        assert_eq!(fresh, if trust { 401 } else { 429 }, "trust {trust}");
    }
}

/// A tenant token (`wasmq web token create`) sees and acts on its own
/// tenant only: another tenant's pages, data and actions answer 403 and
/// change nothing; the tenants page lists only its own; a revoked token
/// opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_sees_only_its_own_tenant() {
    let (redis, broker) = setup("acme").await;
    deploy(&broker, "other").await;
    // Tenants with a record are listed on the admin's tenants page.
    common::create_tenant(&redis.url, "acme", &[]);
    common::create_tenant(&redis.url, "other", &[]);
    let secret = enqueue(
        &broker,
        "other",
        "idle",
        json!({"secret": "other-tenant-data"}),
    )
    .await;
    let mine = enqueue(&broker, "acme", "idle", json!({"mine": 1})).await;

    let out = wasmq(
        &redis.url,
        "acme",
        &["web", "token", "create", "--note", "ci"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout);
    assert!(token.starts_with("wqt-acme."), "{token}");
    let listed = wasmq(&redis.url, "acme", &["web", "token", "list"]);
    assert!(
        text(&listed.stdout).contains("ci"),
        "{}",
        text(&listed.stdout)
    );
    let stored: Vec<String> = broker
        .connection()
        .hkeys(Keys::new("acme").web_tokens())
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![wasmq::broker::token_digest(&token)],
        "only the digest is stored"
    );

    let web = Dashboard::start(&broker, "default", "0.0.0.0", Some(ADMIN), false).await;
    let mut tenant = web.client();
    tenant.bearer = Some(token.clone());
    let home = tenant.get("/").await;
    assert_eq!(
        home.header("location"),
        Some("/t/acme/"),
        "/ opens the token's tenant"
    );
    for path in [
        "/t/acme/",
        "/t/acme/queues",
        "/t/acme/jobs",
        &format!("/t/acme/jobs/{mine}"),
        "/t/acme/dead",
        "/t/acme/workers",
        "/t/acme/api/overview",
    ] {
        let r = tenant.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    for path in [
        "/t/other/",
        "/t/other/queues",
        "/t/other/jobs",
        &format!("/t/other/jobs/{secret}"),
        "/t/other/dead",
        "/t/other/workers",
        "/t/other/api/overview",
        "/switch?tenant=other",
    ] {
        let r = tenant.get(path).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert!(!r.body.contains("other-tenant-data"), "{path}");
    }
    let csrf = tenant.get("/t/acme/queues").await.csrf().unwrap();
    for action in [
        "/t/other/queues/idle/pause",
        &format!("/t/other/jobs/{secret}/cancel"),
        "/t/other/dead/purge",
    ] {
        let r = tenant.post(action, &[("csrf", &csrf)]).await;
        assert_eq!(r.status, 403, "{action}: {}", r.body);
    }
    assert!(!paused(&broker, "other", "idle").await);
    assert_eq!(state(&broker, "other", &secret).await, "queued");
    let tenants = tenant.get("/tenants").await;
    assert!(tenants.body.contains("data-tenant=\"acme\""));
    assert!(
        !tenants.body.contains("data-tenant=\"other\""),
        "{}",
        tenants.body
    );
    // Its own actions work, and are recorded as the token's.
    let r = tenant
        .post("/t/acme/queues/idle/pause", &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let by: String = broker
        .connection()
        .hget(Keys::new("acme").paused(), "idle")
        .await
        .unwrap();
    assert!(by.contains("web/token-"), "{by}");

    // The admin sees both.
    let mut admin = web.client();
    admin.bearer = Some(ADMIN.into());
    let r = admin.get(&format!("/t/other/jobs/{secret}")).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("other-tenant-data"));
    let tenants = admin.get("/tenants").await;
    assert!(
        tenants.body.contains("data-tenant=\"other\"")
            && tenants.body.contains("data-tenant=\"acme\"")
    );

    // Revoked: nothing, including the session it logged in with.
    let mut session = web.client();
    assert_eq!(
        session.post("/login", &[("token", &token)]).await.status,
        303
    );
    assert_eq!(session.get("/t/acme/queues").await.status, 200);
    let id = &wasmq::broker::token_digest(&token)[..12];
    let out = wasmq(&redis.url, "acme", &["web", "token", "revoke", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(tenant.get("/t/acme/queues").await.status, 401);
    assert_eq!(session.get("/t/acme/queues").await.status, 401);
}

/// Every action is a POST that needs this session's CSRF token and a
/// same-origin request: without it, with a wrong one, with another
/// session's, or from another origin, it is refused (403) and Redis is
/// unchanged. A GET never acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_this_sessions_csrf_token_and_origin() {
    let (_redis, broker) = setup(TENANT).await;
    let job = enqueue(&broker, TENANT, "idle", json!({})).await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let mut client = web.client();
    let page = client.get("/t/ops/queues").await;
    assert_eq!(page.status, 200, "loopback: no token needed");
    let csrf = page.csrf().unwrap();
    assert!(
        client.cookie.is_some(),
        "an anonymous session cookie keys the CSRF token"
    );

    let pause = "/t/ops/queues/idle/pause";
    assert_eq!(client.post(pause, &[]).await.status, 403, "no token");
    assert_eq!(
        client.post(pause, &[("csrf", "00")]).await.status,
        403,
        "wrong token"
    );
    let mut other = web.client();
    other.get("/t/ops/queues").await;
    let r = other.post(pause, &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 403, "another session's token");
    let r = client
        .request(
            "POST",
            pause,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", "http://evil.example"),
            ],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 403, "cross-origin: {}", r.body);
    let r = client
        .request(
            "POST",
            pause,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("sec-fetch-site", "cross-site"),
            ],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 403, "cross-site fetch");
    let r = client
        .post(&format!("/t/ops/jobs/{job}/cancel"), &[("csrf", "")])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(client.get(pause).await.status, 405, "GET does not act");
    // A DNS-rebinding page reaches the loopback port under its own name.
    let rebound = client
        .request("GET", "/t/ops/queues", &[("host", "evil.example:7070")], "")
        .await;
    assert_eq!(rebound.status, 421, "{}", rebound.body);
    assert!(!rebound.body.contains("name=\"csrf\""));
    let r = client
        .request(
            "POST",
            pause,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("host", "evil.example:7070"),
                ("origin", "http://evil.example:7070"),
            ],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 421);
    assert!(!paused(&broker, TENANT, "idle").await, "nothing changed");
    assert_eq!(state(&broker, TENANT, &job).await, "queued");

    let r = client
        .request(
            "POST",
            pause,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &web.url("")),
            ],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 303, "same origin, right token: {}", r.body);
    assert!(paused(&broker, TENANT, "idle").await);
}

/// `--read-only`: no action button on any page, and every action is
/// refused (403) even with a valid CSRF token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_shows_no_actions_and_refuses_them() {
    let (_redis, broker) = setup(TENANT).await;
    let job = enqueue(&broker, TENANT, "idle", json!({})).await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, true).await;
    let mut client = web.client();
    let queues = client.get("/t/ops/queues").await;
    assert_eq!(queues.status, 200);
    assert!(queues.body.contains("read-only"));
    let job_page = client.get(&format!("/t/ops/jobs/{job}")).await;
    for page in [&queues, &job_page] {
        assert!(
            !page.body.contains("method=\"post\""),
            "no action forms: {}",
            page.body
        );
    }
    let csrf = client.get("/t/ops/").await.csrf().unwrap_or_default();
    for action in [
        "/t/ops/queues/idle/pause",
        &format!("/t/ops/jobs/{job}/cancel"),
        "/t/ops/dead/purge",
    ] {
        let r = client.post(action, &[("csrf", &csrf)]).await;
        assert_eq!(r.status, 403, "{action}");
        assert!(r.body.contains("read-only"), "{}", r.body);
    }
    assert!(!paused(&broker, TENANT, "idle").await);
    assert_eq!(state(&broker, TENANT, &job).await, "queued");
}

/// Text a guest or producer controls (payloads, results, errors, queue
/// and task names) is escaped on every page: no markup gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_controlled_text_is_escaped() {
    let redis = RedisServer::start();
    let broker = Broker::connect(&redis.url).await.unwrap();
    let evil_queue = "q<img src=x onerror=alert(1)>";
    broker
        .deploy(
            TENANT,
            "evil<b>task",
            &guest_bytes("hostile"),
            &policy_on(evil_queue),
        )
        .await
        .unwrap();
    let job = enqueue(
        &broker,
        TENANT,
        "evil<b>task",
        json!({"x": "<script>alert('payload')</script>", "y": "\"'><svg onload=alert(2)>"}),
    )
    .await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let mut client = web.client();
    let pages = [
        client.get("/t/ops/queues").await,
        client.get("/t/ops/jobs").await,
        client.get(&format!("/t/ops/jobs/{job}")).await,
        client
            .get("/t/ops/jobs?queue=q%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
            .await,
    ];
    for page in &pages {
        assert_eq!(page.status, 200, "{}", page.body);
        for raw in ["<img src=x", "<script>alert", "<svg onload", "<b>task"] {
            assert!(
                !page.body.contains(raw),
                "{raw:?} unescaped in {}",
                page.body
            );
        }
    }
    assert!(pages[0]
        .body
        .contains("q&lt;img src=x onerror=alert(1)&gt;"));
    assert!(pages[2]
        .body
        .contains("&lt;script&gt;alert('payload')&lt;/script&gt;"));
    // Pause works on that queue name all the same (percent-encoded URL).
    let r = client
        .act(
            "/t/ops/queues",
            "/t/ops/queues/q%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E/pause",
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(paused(&broker, TENANT, evil_queue).await);
}

/// A run's log (stdout, stderr and log lines) is kept in its job record:
/// `wasmq status` prints it and the job page shows it, escaped; a later
/// run that logs nothing removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_log_shows_in_status_and_on_the_job_page_escaped() {
    let (redis, broker) = setup(TENANT).await;
    let (stop, handle) = worker(&redis, TENANT, "logger");
    let text = "<script>alert('log')</script> done";
    let job = enqueue(
        &broker,
        TENANT,
        "work",
        json!({"mode": "log", "text": text}),
    )
    .await;
    until(Duration::from_secs(30), "the job succeeds", || async {
        state(&broker, TENANT, &job).await == "succeeded"
    })
    .await;
    let log = broker.status(TENANT, &job).await.unwrap().unwrap().log;
    let log = log.expect("the run's log is kept");
    for line in [
        format!("stdout: {text}"),
        format!("stderr: {text}"),
        format!("log: {text}"),
    ] {
        assert!(log.contains(&line), "{line:?} in {log:?}");
    }
    let printed = common::wasmq(&redis.url, TENANT, &["status", &job]);
    let printed = common::text(&printed.stdout);
    assert!(
        printed.contains("log (last run)") && printed.contains(&format!("  stdout: {text}")),
        "{printed}"
    );

    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let mut client = web.client();
    let page = client.get(&format!("/t/ops/jobs/{job}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("<script>alert('log')"), "{}", page.body);
    assert!(
        page.body
            .contains("stdout: &lt;script&gt;alert('log')&lt;/script&gt; done"),
        "{}",
        page.body
    );

    // A job that logs nothing keeps no log.
    let quiet = enqueue(&broker, TENANT, "work", json!({"mode": "echo"})).await;
    until(
        Duration::from_secs(30),
        "the quiet job succeeds",
        || async { state(&broker, TENANT, &quiet).await == "succeeded" },
    )
    .await;
    assert_eq!(
        broker.status(TENANT, &quiet).await.unwrap().unwrap().log,
        None
    );
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// Pause, resume, cancel, retry and purge from the dashboard change
/// Redis as their CLI twins do; bad input gets a clear 4xx page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_change_redis_and_bad_input_is_a_clear_4xx() {
    let (redis, broker) = setup(TENANT).await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let mut c = web.client();

    assert_eq!(
        c.act("/t/ops/queues", "/t/ops/queues/idle/pause")
            .await
            .status,
        303
    );
    assert!(paused(&broker, TENANT, "idle").await);
    let page = c.get("/t/ops/queues").await;
    assert!(page.body.contains("web/admin@"), "who paused it is shown");
    assert_eq!(
        c.act("/t/ops/queues", "/t/ops/queues/idle/resume")
            .await
            .status,
        303
    );
    assert!(!paused(&broker, TENANT, "idle").await);

    let queued = enqueue(&broker, TENANT, "idle", json!({})).await;
    let page = format!("/t/ops/jobs/{queued}");
    let r = c.act(&page, &format!("{page}/cancel")).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(state(&broker, TENANT, &queued).await, "cancelled");
    let again = c.act("/t/ops/queues", &format!("{page}/cancel")).await;
    assert_eq!(again.status, 409);
    assert!(again.body.contains("already ended"), "{}", again.body);

    // Two dead jobs; retry one, purge the other.
    let (stop, handle) = worker(&redis, TENANT, "web-actions");
    let dead1 = enqueue(
        &broker,
        TENANT,
        "work",
        json!({"mode": "fail", "message": "boom"}),
    )
    .await;
    let dead2 = enqueue(
        &broker,
        TENANT,
        "work",
        json!({"mode": "fail", "message": "boom"}),
    )
    .await;
    for id in [&dead1, &dead2] {
        until(Duration::from_secs(30), "the job dies", || async {
            state(&broker, TENANT, id).await == "dead"
        })
        .await;
    }
    stop.send(()).unwrap();
    handle.await.unwrap();
    let dead_page = c.get("/t/ops/dead").await;
    assert!(dead_page.body.contains(&dead1) && dead_page.body.contains(&dead2));
    assert!(dead_page.body.contains("boom"));
    let r = c
        .act("/t/ops/dead", &format!("/t/ops/jobs/{dead1}/retry"))
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(state(&broker, TENANT, &dead1).await, "queued");
    let r = c.act("/t/ops/dead", "/t/ops/dead/purge").await;
    assert_eq!(r.status, 303);
    let dead_left: u64 = broker
        .connection()
        .zcard(Keys::new(TENANT).dead())
        .await
        .unwrap();
    assert_eq!(dead_left, 0);
    assert_eq!(
        state(&broker, TENANT, &dead2).await,
        "",
        "purged: its record is gone"
    );
    let r = c
        .act("/t/ops/queues", &format!("/t/ops/jobs/{dead1}/retry"))
        .await;
    assert_eq!(r.status, 409, "only dead jobs are retried");

    // Bad input: a clear 4xx page, never a 500.
    for (path, status, says) in [
        (
            "/t/ops/jobs/00000000-0000-0000-0000-000000000000",
            404,
            "No job",
        ),
        (
            "/t/ops/jobs?id=00000000-0000-0000-0000-000000000000",
            404,
            "No job",
        ),
        ("/t/ops/jobs/%3Cx%3E", 400, "is not a job id"),
        ("/t/ops/jobs?state=bogus", 400, "unknown job state"),
        ("/t/ops/jobs?limit=0", 400, "limit"),
        ("/t/ops/jobs?queue=nope", 404, "no queue"),
        ("/t/Bad%7Bname%7D/queues", 404, "no tenant"),
        ("/nowhere", 404, "No such page"),
    ] {
        let r = c.get(path).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.contains(says), "{path}: {}", r.body);
    }
    let r = c.act("/t/ops/queues", "/t/ops/queues/nope/pause").await;
    assert_eq!(r.status, 404);
    let r = c.get(&format!("/t/ops/jobs?id={queued}")).await;
    assert_eq!(r.status, 303, "search by id opens the job");
    assert_eq!(
        r.header("location"),
        Some(format!("/t/ops/jobs/{queued}").as_str())
    );
}

/// In Chromium: the overview's chart fills from the JSON endpoint with
/// the runs a worker did, and the queues page's Pause button pauses the
/// queue in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_overview_chart_fills_and_pause_pauses() {
    let (redis, broker) = setup(TENANT).await;
    let (stop, handle) = worker(&redis, TENANT, "web-browser-1");
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(enqueue(&broker, TENANT, "work", json!({"mode": "echo", "i": i})).await);
    }
    ids.push(
        enqueue(
            &broker,
            TENANT,
            "work",
            json!({"mode": "fail", "message": "one failure"}),
        )
        .await,
    );
    for id in &ids {
        until(Duration::from_secs(30), "jobs finish", || async {
            matches!(
                state(&broker, TENANT, id).await.as_str(),
                "succeeded" | "dead"
            )
        })
        .await;
    }
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let browser = Browser::start().await;
    let started = Instant::now();
    browser.goto(&web.url("/t/ops/")).await;
    browser.find("#charts[data-loaded='1']").await;
    let points = browser
        .execute("return document.getElementById('chart-throughput').getAttribute('data-points');")
        .await;
    assert!(
        points.as_str().unwrap_or("0").parse::<u32>().unwrap() >= 1,
        "{points}"
    );
    assert_eq!(browser.text("#total-succeeded").await, "6");
    assert_eq!(browser.text("#total-failed").await, "1");
    let bars = browser
        .execute("return document.querySelectorAll('#chart-throughput rect').length;")
        .await;
    assert!(bars.as_u64().unwrap() >= 2, "{bars}");
    browser.screenshot("dashboard-overview").await;
    eprintln!("overview with its chart loaded in {:?}", started.elapsed());

    browser.goto(&web.url("/t/ops/queues")).await;
    browser.click("tr[data-queue='default'] button.pause").await;
    until(Duration::from_secs(5), "the queue is paused", || async {
        paused(&broker, TENANT, "default").await
    })
    .await;
    browser.find("tr[data-queue='default'] button.resume").await;
    browser.screenshot("dashboard-queues").await;
    browser.goto(&web.url("/t/ops/workers")).await;
    browser.find(".card").await;
    browser.screenshot("dashboard-workers").await;
    let nightly = wasmq::schedule::Schedule {
        task: "idle".into(),
        payload: serde_json::json!({"report": "daily"}),
        timing: wasmq::schedule::Timing::cron("0 2 * * *", Some("Europe/Paris")).unwrap(),
        catch_up: wasmq::schedule::CatchUp::One,
        paused: false,
    };
    broker
        .schedule_put(TENANT, "nightly-report", nightly)
        .await
        .unwrap();
    browser.goto(&web.url("/t/ops/schedules")).await;
    browser.find("tr[data-schedule='nightly-report']").await;
    browser.screenshot("dashboard-schedules").await;
    browser.goto(&web.url("/tenants")).await;
    browser.find("tr[data-tenant='ops']").await;
    browser.screenshot("dashboard-tenants").await;
    browser.close().await;
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// In Chromium, on a loopback dashboard with a token: a page shows the
/// login form, not the data; logging in with the token opens it, and its
/// Pause button works (the session cookie and CSRF token in a real
/// browser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_logs_in_to_a_loopback_dashboard_with_a_token() {
    let (_redis, broker) = setup(TENANT).await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", Some(ADMIN), false).await;
    let browser = Browser::start().await;
    browser.goto(&web.url("/t/ops/queues")).await;
    browser.find("input[name='token']").await;
    let shown = browser
        .execute("return document.body.innerText.includes('idle');")
        .await;
    assert_eq!(shown, json!(false), "no data before logging in");
    browser.type_into("input[name='token']", ADMIN).await;
    browser.click("button[type='submit']").await;
    browser.find("#charts").await;
    browser.goto(&web.url("/t/ops/queues")).await;
    browser.click("tr[data-queue='idle'] button.pause").await;
    until(Duration::from_secs(5), "the queue is paused", || async {
        paused(&broker, TENANT, "idle").await
    })
    .await;
    browser.find("tr[data-queue='idle'] button.resume").await;
    browser.close().await;
}

/// In Chromium: a job found by id opens its page, whose Cancel button
/// stops the running job; a dead job's Retry button puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_finds_a_job_cancels_it_and_retries_a_dead_one() {
    let (redis, broker) = setup(TENANT).await;
    let (stop, handle) = worker(&redis, TENANT, "web-browser-2");
    let running = enqueue(
        &broker,
        TENANT,
        "work",
        json!({"mode": "sleep", "ms": 60_000}),
    )
    .await;
    let dead = enqueue(
        &broker,
        TENANT,
        "work",
        json!({"mode": "fail", "message": "retry me"}),
    )
    .await;
    until(
        Duration::from_secs(30),
        "one job runs, one is dead",
        || async {
            state(&broker, TENANT, &running).await == "active"
                && state(&broker, TENANT, &dead).await == "dead"
        },
    )
    .await;
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let browser = Browser::start().await;

    browser.goto(&web.url("/t/ops/jobs")).await;
    browser.find("#job-id").await;
    browser.screenshot("dashboard-jobs").await;
    browser.type_into("#job-id", &running).await;
    browser.click("#find-job").await;
    browser.find("#job-id-shown").await;
    assert!(browser
        .url()
        .await
        .ends_with(&format!("/t/ops/jobs/{running}")));
    assert_eq!(browser.text("#job-state").await, "active");
    browser.screenshot("dashboard-job").await;
    let clicked = Instant::now();
    browser.click("button.cancel").await;
    browser.accept_alert().await;
    until(Duration::from_secs(5), "the job is cancelled", || async {
        state(&broker, TENANT, &running).await == "cancelled"
    })
    .await;
    eprintln!(
        "cancelled from the job page {:?} after the click",
        clicked.elapsed()
    );
    browser.find("#job-state.cancelled").await;

    browser.goto(&web.url("/t/ops/dead")).await;
    browser.screenshot("dashboard-dead").await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    browser
        .click(&format!("tr[data-job='{dead}'] button.retry"))
        .await;
    until(
        Duration::from_secs(5),
        "the dead job is queued again",
        || async { state(&broker, TENANT, &dead).await == "queued" },
    )
    .await;
    browser.find("#job-state.queued").await;
    browser.close().await;
}

/// Not a timed test: with 1,000,000 jobs queued (enqueued through
/// `enqueue_many`, in batches), how long the overview, its JSON and the
/// queues page take to answer; prints the medians of 11 requests each.
/// Slow to set up (about a minute), so run by hand:
/// `cargo test --release --test web -- --ignored --nocapture million`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale run: enqueues a million jobs; run by hand"]
async fn pages_with_a_million_jobs_queued() {
    let (_redis, broker) = setup(TENANT).await;
    let started = Instant::now();
    let payloads = vec![json!({"mode": "echo"}); 10_000];
    for _ in 0..100 {
        broker
            .enqueue_many(TENANT, "idle", &payloads)
            .await
            .unwrap();
    }
    eprintln!("enqueued 1,000,000 jobs in {:?}", started.elapsed());
    let web = Dashboard::start(&broker, TENANT, "127.0.0.1", None, false).await;
    let mut c = web.client();
    for path in [
        "/t/ops/",
        "/t/ops/api/overview",
        "/t/ops/queues",
        "/t/ops/jobs?state=queued",
    ] {
        let mut ms = Vec::new();
        for _ in 0..11 {
            let t = Instant::now();
            let r = c.get(path).await;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(r.status, 200, "{path}");
        }
        ms.sort_by(f64::total_cmp);
        eprintln!(
            "{path}: median {:.1} ms, max {:.1} ms (1,000,000 jobs queued)",
            ms[5], ms[10]
        );
    }
}
