//! `wasmq deploy` and `wasmq tasks`: put a validated component and its
//! policy in Redis; list what is deployed.
//!
//! Deploy refuses a component over its tenant's size cap before compiling
//! it, then compiles it as a worker would (one thread, the same engine
//! settings, so the disk cache it fills serves workers on this machine),
//! giving up past the compile budget: a component deploy accepts compiles
//! within the budget on workers as fast as this machine. It checks the
//! component against the engine limits its flags give (the workers'
//! defaults unless told otherwise), the same check a worker makes: a
//! component no worker with those limits could run is refused here,
//! naming the limit; a worker started with lower limits refuses it the
//! same way at run time.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::engine_limits::ComponentLimitArgs;
use super::enqueue::into_cli;
use super::CliError;
use crate::broker::Broker;
use crate::component::{check_header, content_hash, CompiledCache};
use crate::engine::{build_engine, CompileSettings, EngineLimits, DEFAULT_COMPILE_BUDGET};
use crate::policy::TaskPolicy;
use crate::sandbox::Sandbox;

/// Flags of `wasmq deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The task component (`.wasm`).
    pub task: PathBuf,
    /// Name producers enqueue it by.
    #[arg(long)]
    pub name: String,
    /// Queue (overrides the manifest's).
    #[arg(long)]
    pub queue: Option<String>,
    /// `task.toml` with the task's policy (see GUIDE.md).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// CPU time compiling the component may take before it is refused
    /// (`invalid-component`), e.g. `60s`. Keep it the same as the workers'
    /// `--compile-budget`, so what deploys compiles on them.
    #[arg(long = "compile-budget", default_value_t = DEFAULT_COMPILE_BUDGET.into())]
    pub compile_budget: humantime::Duration,
    /// The engine limits to check the component against: keep them the
    /// same as the workers' (`wasmq worker` takes the same flags).
    #[command(flatten)]
    pub component_limits: ComponentLimitArgs,
}

/// Validate against the WIT world, then store content-addressed with its policy.
pub async fn deploy(redis: &str, tenant: &str, args: DeployArgs) -> Result<(), CliError> {
    let bytes =
        std::fs::read(&args.task).with_context(|| format!("reading {}", args.task.display()))?;
    let mut policy = match &args.manifest {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            TaskPolicy::from_toml(&text).map_err(anyhow::Error::msg)?
        }
        None => TaskPolicy::default(),
    };
    if let Some(q) = args.queue {
        policy.queue = q;
    }
    check_header(&bytes)?;
    let broker = Broker::connect(redis).await?;
    broker
        .check_component_size(tenant, bytes.len() as u64)
        .await
        .map_err(into_cli)?;
    let limits = args.component_limits.limits();
    let engine = build_engine(&EngineLimits {
        instance_slots: 1,
        component: limits,
        ..EngineLimits::default()
    })
    .map_err(anyhow::Error::from)?;
    let compile = CompileSettings {
        budget: args.compile_budget.into(),
        ..CompileSettings::default()
    };
    let sandbox = Arc::new(
        Sandbox::new(
            engine,
            CompiledCache::new(CompiledCache::default_dir()).with_limits(limits),
        )?
        .with_compile_settings(compile),
    );
    let hash = content_hash(&bytes);
    let prepared = sandbox
        .prepare_once(&hash, std::future::ready(Ok(bytes.clone())))
        .await?;
    let queues_before: Vec<String> = broker
        .tasks(tenant)
        .await?
        .into_iter()
        .map(|t| t.policy.queue)
        .collect();
    let task = broker
        .deploy(tenant, &args.name, &bytes, &policy)
        .await
        .map_err(into_cli)?;
    println!(
        "{}",
        serde_json::json!({"name": task.name, "version": task.hash, "queue": task.policy.queue,
            "world": format!("wasmq:task@{}", prepared.world_version())})
    );
    if !queues_before.contains(&task.policy.queue) && producer_acl_exists(&broker, tenant).await {
        super::format::notice(&format!(
            "note: queue {:?} is new to tenant {tenant:?}: its producers may enqueue on it once \
             `wasmq tenant acl {tenant} --apply` has run again",
            task.policy.queue
        ));
    }
    Ok(())
}

/// Whether tenant `tenant` has a producer ACL user (false when this
/// connection may not ask).
async fn producer_acl_exists(broker: &Broker, tenant: &str) -> bool {
    let user: redis::RedisResult<redis::Value> = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(crate::broker::acl::producer_user(tenant))
        .query_async(&mut broker.connection())
        .await;
    matches!(user, Ok(v) if v != redis::Value::Nil)
}

/// List deployed tasks, one JSON line each.
pub async fn tasks(redis: &str, tenant: &str) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    for t in broker.tasks(tenant).await? {
        let p = &t.policy;
        println!(
            "{}",
            serde_json::json!({
                "name": t.name, "version": t.hash, "queue": p.queue,
                "fuel": p.sandbox.fuel, "memory_bytes": p.sandbox.memory_bytes,
                "timeout": humantime::format_duration(p.sandbox.timeout).to_string(),
                "max_attempts": p.retry.max_attempts, "store_result": p.store_result,
                "rate_limit": p.rate_limit.map(|r| r.to_string()), "max_per_key": p.max_per_key,
            })
        );
    }
    Ok(())
}
