//! The operator's side of the broker: deploys, tenant records, a job's
//! status and history, a tenant's usage, and the dead-letter queue. The
//! worker never uses this file (it reads records through
//! [`super::registry`]).

use redis::AsyncCommands;
use serde::Serialize;

use super::envelope::Envelope;
use super::registry::DeployedTask;
use super::{now_ms, scripts, Broker};
use crate::engine::DEFAULT_MAX_COMPONENT_BYTES;
use crate::failure::{Category, Failure};
use crate::keys::{valid_tenant, Keys};
use crate::policy::TaskPolicy;
use crate::tenants::component_refusal;

/// What `wasmq status` shows. Times are unix milliseconds on the Redis
/// server's clock (the CLI also prints them as RFC 3339).
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// queued, scheduled, active, succeeded, dead, cancelled.
    pub state: String,
    /// Attempts that ended in a verdict (success, a retry, death): what
    /// the task's `max_attempts` counts.
    pub attempts: u64,
    /// The attempt running now, or the last one to run.
    pub attempt: Option<u64>,
    /// Deliveries to workers: attempts, plus deliveries whose worker died
    /// or froze, plus host retries and hand-backs.
    pub deliveries: u64,
    /// Deliveries that ended with the worker's lease lapsing (what
    /// `max_deliveries` counts), and the workers that lost them.
    pub lost_deliveries: u64,
    /// The workers that lost this job's lease, most recent last.
    pub lost_workers: Vec<String>,
    /// Times the host retried the job for its own faults.
    pub host_retries: u64,
    /// Task name.
    pub task: Option<String>,
    /// The last error, if any.
    pub last_error: Option<serde_json::Value>,
    /// Fuel, peak memory, wall time of the last run.
    pub usage: Option<serde_json::Value>,
    /// Capabilities the last recorded run was refused (the first few), even
    /// if the guest swallowed the refusal.
    pub denials: Vec<String>,
    /// When the job was enqueued.
    pub enqueued_at_ms: Option<u64>,
    /// When a scheduled job is due (countdown, ETA or retry backoff).
    pub due_at_ms: Option<u64>,
    /// When the last attempt started.
    pub started_at_ms: Option<u64>,
    /// When the job finished.
    pub finished_at_ms: Option<u64>,
    /// The tail of the last recorded run's log (stdout, stderr and log
    /// lines; at most [`crate::limits::MAX_STORED_LOG_BYTES`]).
    pub log: Option<String>,
    /// Every event, oldest first: enqueued, started, retry, host-retry,
    /// wait, lease-expired, released, dead-retry, succeeded, dead (the last
    /// 100 recorded ones).
    pub history: Vec<serde_json::Value>,
    /// Its place in a workflow, if it is a step of one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<super::FlowMembership>,
    /// The workflows it started (from inside the task), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flows_started: Vec<String>,
}

/// What `wasmq tenant usage` shows: the tenant's summed usage (`runs`,
/// `fuel`, ..., and the `wasted_*` runs whose outcomes were refused),
/// plus what its guests store now.
pub type TenantUsage = std::collections::BTreeMap<String, u64>;

/// A numeric field of a job hash read with HGETALL.
fn field_u64(fields: &std::collections::HashMap<String, String>, key: &str) -> Option<u64> {
    fields.get(key).and_then(|v| v.parse().ok())
}

/// A job's whole history: the events the scripts recorded (what went wrong,
/// each after the start of the attempt it ended) between the ones the happy
/// path leaves only as timestamps in the job hash: the enqueue, the start of
/// the current attempt and the success.
fn full_history(
    state: &str,
    fields: &std::collections::HashMap<String, String>,
    recorded: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    use serde_json::json;
    let num = |k: &str| field_u64(fields, k);
    let mut out = Vec::with_capacity(recorded.len() + 3);
    if let Some(at) = num("enqueued_at_ms") {
        out.push(json!({"at_ms": at, "event": "enqueued"}));
    }
    out.extend(recorded);
    if matches!(state, "active" | "succeeded") {
        if let Some(at) = num("started_at_ms") {
            let detail = format!(
                "attempt {} on {}",
                num("attempt").unwrap_or(0),
                fields.get("worker").map_or("?", String::as_str)
            );
            out.push(json!({"at_ms": at, "event": "started", "detail": detail}));
        }
    }
    if state == "succeeded" {
        if let Some(at) = num("finished_at_ms") {
            out.push(json!({"at_ms": at, "event": "succeeded"}));
        }
    }
    out
}

impl Broker {
    /// Refuse a component of `size` bytes over `tenant`'s cap (or, for a
    /// tenant without one, [`DEFAULT_MAX_COMPONENT_BYTES`]): the error is a
    /// [`Failure`] (`invalid-component`) naming the size and the cap. Run
    /// before compiling, so a too-big file costs no compile.
    pub async fn check_component_size(&self, tenant: &str, size: u64) -> anyhow::Result<()> {
        let record = self.tenant(tenant).await?;
        let limits = record.as_ref().map(|r| &r.limits);
        match component_refusal(tenant, limits, size, DEFAULT_MAX_COMPONENT_BYTES) {
            Some(refusal) => Err(Failure::new(Category::InvalidComponent, refusal).into()),
            None => Ok(()),
        }
    }

    /// Record a task version (the component must already be validated).
    /// A component over its tenant's size cap is refused with a
    /// [`Failure`] (see [`Broker::check_component_size`]).
    pub async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        component: &[u8],
        policy: &TaskPolicy,
    ) -> anyhow::Result<DeployedTask> {
        valid_tenant(tenant).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            !name.is_empty() && name.len() <= 128 && !name.contains(char::is_whitespace),
            "task name {name:?} is invalid: use 1-128 characters without spaces"
        );
        // Every tenant, capped or not: grants are absolute and never climb.
        policy
            .check_grants()
            .map_err(|e| anyhow::anyhow!("task {name:?}: {e}"))?;
        anyhow::ensure!(
            policy.max_per_key != Some(0),
            "task {name:?}: max_per_key = 0 would never run a keyed job: use at least 1"
        );
        self.check_component_size(tenant, component.len() as u64)
            .await?;
        if let Some(record) = self.tenant(tenant).await? {
            let excesses = record.limits.excesses(tenant, policy);
            anyhow::ensure!(
                excesses.is_empty(),
                "task {name:?} asks for more than its tenant allows: {}",
                excesses.join("; ")
            );
        }
        let keys = Keys::new(tenant);
        let hash = crate::component::content_hash(component);
        let task = DeployedTask {
            name: name.to_string(),
            hash: hash.clone(),
            policy: policy.clone(),
            deployed_at_ms: now_ms(),
        };
        let mut conn = self.connection();
        // A queue serves one pool kind: the first deploy to it decides.
        let pool = policy.pool.as_str();
        let _: bool = conn.set_nx(keys.queue_pool(&policy.queue), pool).await?;
        let serving: String = conn.get(keys.queue_pool(&policy.queue)).await?;
        anyhow::ensure!(
            serving == pool,
            "queue {:?} serves {serving} tasks, and task {name:?} is a {pool} task: deploy it to another queue \
             (cpu and io jobs need separate pools)",
            policy.queue
        );
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set_nx(keys.component(&hash), component)
            .hset(keys.task(name), "spec", serde_json::to_string(&task)?)
            .sadd(keys.tasks(), name)
            .sadd(keys.queues(), &policy.queue);
        // The gates' config, where the fetch script reads it (see `gates`):
        // a redeploy changes the limits of jobs already queued too.
        let (rate, per_key) = (format!("rate:{name}"), format!("per-key:{name}"));
        match policy.rate_limit {
            Some(r) => pipe.hset(keys.gates(), &rate, r.to_redis()),
            None => pipe.hdel(keys.gates(), &rate),
        };
        match policy.max_per_key {
            Some(n) => pipe.hset(keys.gates(), &per_key, n),
            None => pipe.hdel(keys.gates(), &per_key),
        };
        pipe.query_async::<()>(&mut conn).await?;
        Ok(task)
    }

    /// Create or replace a tenant's record (its caps). The record and the
    /// global list of tenant names are two writes, not one transaction: a
    /// tenant's keys and the global key live in different slots of a
    /// cluster. The name is listed first, so a record never exists unlisted.
    pub async fn put_tenant(&self, record: &crate::tenants::Tenant) -> anyhow::Result<()> {
        valid_tenant(&record.name).map_err(anyhow::Error::msg)?;
        let mut conn = self.connection();
        let _: i64 = conn.sadd(crate::keys::TENANTS, &record.name).await?;
        let _: i64 = conn
            .hset(
                Keys::new(&record.name).tenant(),
                "spec",
                serde_json::to_string(record)?,
            )
            .await?;
        Ok(())
    }

    /// Names of tenants with a record.
    pub async fn tenant_names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = self.connection().smembers(crate::keys::TENANTS).await?;
        names.sort();
        Ok(names)
    }

    /// All deployed tasks of a tenant.
    pub async fn tasks(&self, tenant: &str) -> anyhow::Result<Vec<DeployedTask>> {
        let names: Vec<String> = self
            .connection()
            .smembers(Keys::new(tenant).tasks())
            .await?;
        let mut out = Vec::new();
        for name in names {
            out.extend(self.task(tenant, &name).await?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// A job's state, attempts, last error, timings, usage and history.
    pub async fn status(&self, tenant: &str, id: &str) -> anyhow::Result<Option<JobStatus>> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let fields: std::collections::HashMap<String, String> = conn.hgetall(keys.job(id)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let history: Vec<String> = conn.lrange(keys.history(id), 0, -1).await?;
        let num = |k: &str| field_u64(&fields, k);
        let json = |k: &str| {
            fields
                .get(k)
                .filter(|v| !v.is_empty())
                .and_then(|v| serde_json::from_str(v).ok())
        };
        let task = fields
            .get("envelope")
            .and_then(|e| Envelope::parse(e).ok())
            .map(|e| e.task);
        let state = fields.get("state").cloned().unwrap_or_default();
        let list = |k: &str| -> Vec<String> {
            fields
                .get(k)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default()
        };
        let lost_workers = fields
            .get("lost_workers")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let recorded = history
            .iter()
            .filter_map(|h| serde_json::from_str(h).ok())
            .collect();
        let history = full_history(&state, &fields, recorded);
        let due_at_ms = num("due_at_ms").filter(|_| state == "scheduled");
        let flow = match fields.contains_key("flow") {
            true => self.flow_membership(tenant, id).await?,
            false => None,
        };
        Ok(Some(JobStatus {
            id: id.to_string(),
            state,
            attempts: num("attempts").unwrap_or(0),
            attempt: num("attempt"),
            deliveries: num("deliveries").unwrap_or(0),
            lost_deliveries: num("lost").unwrap_or(0),
            lost_workers,
            host_retries: num("host_retries").unwrap_or(0),
            task,
            last_error: json("last_error"),
            usage: json("usage"),
            denials: list("denials"),
            enqueued_at_ms: num("enqueued_at_ms"),
            due_at_ms,
            started_at_ms: num("started_at_ms"),
            finished_at_ms: num("finished_at_ms"),
            log: fields.get("log").cloned(),
            history,
            flow,
            flows_started: Broker::flows_started_by(tenant, id, num("flows").unwrap_or(0) as u32),
        }))
    }

    /// A job's envelope (task, queue, payload, priority, ...) as its
    /// producer wrote it; `None` when there is no such job or its envelope
    /// cannot be read.
    pub async fn envelope(&self, tenant: &str, id: &str) -> anyhow::Result<Option<Envelope>> {
        let text: Option<String> = self
            .connection()
            .hget(Keys::new(tenant).job(id), "envelope")
            .await?;
        Ok(text.and_then(|t| Envelope::parse(&t).ok()))
    }

    /// A tenant's summed usage (runs, fuel, wall time, memory
    /// byte-seconds, network bytes out and in, refusals, and wasted runs),
    /// and what it holds now: `store_bytes`, `store_keys`,
    /// `idempotency_keys`, `children_this_minute`.
    pub async fn usage(&self, tenant: &str) -> anyhow::Result<TenantUsage> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let mut usage: TenantUsage = conn.hgetall(keys.usage()).await?;
        let (bytes, entries) = crate::backend::redis::store_totals(&mut conn, tenant).await?;
        usage.insert("store_bytes".into(), bytes);
        usage.insert("store_keys".into(), entries);
        let idempotency: u64 = conn
            .zcount(keys.idempotency_index(), now_ms(), "+inf")
            .await?;
        usage.insert("idempotency_keys".into(), idempotency);
        let window: (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(keys.children_rate())
            .arg("minute")
            .arg("count")
            .query_async(&mut conn)
            .await?;
        let this_minute = now_ms() / 60_000;
        let children = match window {
            (Some(minute), Some(count)) if minute == this_minute => count,
            _ => 0,
        };
        usage.insert("children_this_minute".into(), children);
        Ok(usage)
    }

    /// Dead-lettered jobs, newest first: (id, dead at ms).
    pub async fn dead_list(
        &self,
        tenant: &str,
        limit: isize,
    ) -> anyhow::Result<Vec<(String, u64)>> {
        Ok(self
            .connection()
            .zrevrange_withscores(Keys::new(tenant).dead(), 0, limit - 1)
            .await?)
    }

    /// Put a dead job back on its queue with fresh attempts and
    /// deliveries, in one step (see [`scripts::DEAD_RETRY`]). False if it
    /// is not in the dead-letter queue.
    pub async fn dead_retry(&self, tenant: &str, id: &str) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        let retried: i64 = scripts::DEAD_RETRY
            .key(keys.job(id))
            .key(keys.dead())
            .key(keys.history(id))
            .key(keys.done(id))
            .key(keys.idempotency_index())
            .key(keys.dead_by_queue())
            .arg(keys.prefix())
            .arg(id)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(retried == 1)
    }

    /// Delete every dead-lettered job, a thousand per script call; how
    /// many.
    pub async fn dead_purge(&self, tenant: &str) -> anyhow::Result<usize> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let mut total = 0;
        loop {
            let purged: usize = scripts::PURGE_DEAD
                .key(keys.dead())
                .key(keys.dead_by_queue())
                .arg(keys.prefix())
                .arg(1000)
                .invoke_async(&mut conn)
                .await?;
            total += purged;
            if purged == 0 {
                return Ok(total);
            }
        }
    }
}
