//! Workers for tests: in this process (stoppable, returning their stats,
//! with their sandbox to watch) or as `wasmq worker` processes, and the
//! peak RSS of a process.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wasmq::broker::Broker;
use wasmq::launcher::{self, LaunchConfig};
use wasmq::sandbox::Sandbox;
use wasmq::worker::WorkerStats;

/// Start a worker process's pools in this process through the library
/// launcher, as `wasmq worker --concurrency N` would: one io pool serving
/// `tenant`'s `default` queue, with id `{id}-io0`. Send on the returned
/// channel to stop it (it drains); await the handle for its stats.
pub fn start_in_process(
    broker: &Broker,
    tenant: &str,
    concurrency: usize,
    lease: Duration,
    id: &str,
) -> (oneshot::Sender<()>, JoinHandle<WorkerStats>) {
    let (stop, handle, _) =
        start_configured(in_process_config(broker, tenant, concurrency, lease, id));
    (stop, handle)
}

/// The config `start_in_process` runs (no disk cache), to change before
/// `start_configured`.
pub fn in_process_config(
    broker: &Broker,
    tenant: &str,
    concurrency: usize,
    lease: Duration,
    id: &str,
) -> LaunchConfig {
    let mut config = LaunchConfig::new(broker.url(), tenant, &["default"], concurrency);
    config.lease = lease;
    config.drain_timeout = Duration::from_secs(10);
    config.cache_dir = None;
    config.id = id.into();
    config
}

/// [`start_in_process`] serving the `default` queues of several tenants in
/// rotation, as `wasmq worker --tenants a,b` does.
pub fn start_in_process_for(
    broker: &Broker,
    tenants: &[&str],
    concurrency: usize,
    lease: Duration,
    id: &str,
) -> (oneshot::Sender<()>, JoinHandle<WorkerStats>) {
    let mut config = in_process_config(broker, tenants[0], concurrency, lease, id);
    config.tenants = tenants.iter().map(|t| t.to_string()).collect();
    let (stop, handle, _) = start_configured(config);
    (stop, handle)
}

/// Start a worker process's pools of `config` in this process; stop and
/// await it as with `start_in_process`. Also returns its sandbox (compile
/// counts).
pub fn start_configured(
    config: LaunchConfig,
) -> (oneshot::Sender<()>, JoinHandle<WorkerStats>, Arc<Sandbox>) {
    let sandbox = launcher::sandbox(&config).expect("the worker's sandbox builds");
    let (stop, stopped) = oneshot::channel::<()>();
    let worker_sandbox = sandbox.clone();
    let handle = tokio::spawn(async move {
        launcher::run_on(config, worker_sandbox, async move {
            let _ = stopped.await;
        })
        .await
        .expect("the worker starts")
    });
    (stop, handle, sandbox)
}

/// Spawn `wasmq --redis URL --tenant TENANT worker ARGS...` (output
/// discarded), killed when dropped.
pub fn spawn_process(redis_url: &str, tenant: &str, args: &[&str]) -> KillOnDrop {
    spawn_process_with(redis_url, tenant, args, &[])
}

/// [`spawn_process`] with extra environment variables.
pub fn spawn_process_with(
    redis_url: &str,
    tenant: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> KillOnDrop {
    let child = Command::new(super::wasmq_bin())
        .args(["--redis", redis_url, "--tenant", tenant, "worker"])
        .args(args)
        .env(
            "WASMQ_CACHE_DIR",
            std::env::temp_dir().join("wasmq-test-cache"),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("WASMQ_TEST_WORKER_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// A worker process that is killed and reaped when dropped, so a failing
/// test does not leave it retrying a Redis that is gone.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Peak resident set of a process (VmHWM), in KiB; 0 if unreadable.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
