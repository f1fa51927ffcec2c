//! The operator's side of the broker: deploys, tenant records, a job's
//! status and history, a tenant's usage, and the dead-letter queue. The
//! worker never uses this file (it reads records through
//! [`super::registry`]).

use redis::AsyncCommands;
use serde::Serialize;

use super::envelope::Envelope;
use super::registry::DeployedTask;
use super::{now_ms, Broker};
use crate::engine::DEFAULT_MAX_COMPONENT_BYTES;
use crate::failure::{Category, Failure};
use crate::keys::{valid_tenant, Keys};
use crate::policy::TaskPolicy;
use crate::tenants::component_refusal;

/// What `wasmq status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// queued, scheduled, active, succeeded, dead.
    pub state: String,
    /// Attempts started.
    pub attempts: u64,
    /// Deliveries to workers (attempts plus crash redeliveries).
    pub deliveries: u64,
    /// Task name.
    pub task: Option<String>,
    /// The last error, if any.
    pub last_error: Option<serde_json::Value>,
    /// Fuel, peak memory, wall time of the last run.
    pub usage: Option<serde_json::Value>,
    /// Enqueue, start and finish times (unix ms).
    pub enqueued_at_ms: Option<u64>,
    /// When the last attempt started.
    pub started_at_ms: Option<u64>,
    /// When the job finished.
    pub finished_at_ms: Option<u64>,
    /// Every event, oldest first: enqueued, started, retry, host-retry,
    /// lease-expired, released, dead-retry, succeeded, dead.
    pub history: Vec<serde_json::Value>,
}

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
        redis::pipe()
            .atomic()
            .set_nx(keys.component(&hash), component)
            .hset(keys.task(name), "spec", serde_json::to_string(&task)?)
            .sadd(keys.tasks(), name)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(task)
    }

    /// Create or replace a tenant's record (its caps).
    pub async fn put_tenant(&self, record: &crate::tenants::Tenant) -> anyhow::Result<()> {
        valid_tenant(&record.name).map_err(anyhow::Error::msg)?;
        redis::pipe()
            .atomic()
            .hset(
                Keys::new(&record.name).tenant(),
                "spec",
                serde_json::to_string(record)?,
            )
            .sadd(crate::keys::TENANTS, &record.name)
            .query_async::<()>(&mut self.connection())
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
        let recorded = history
            .iter()
            .filter_map(|h| serde_json::from_str(h).ok())
            .collect();
        let history = full_history(&state, &fields, recorded);
        Ok(Some(JobStatus {
            id: id.to_string(),
            state,
            attempts: num("attempt").unwrap_or(0),
            deliveries: num("deliveries").unwrap_or(0),
            task,
            last_error: json("last_error"),
            usage: json("usage"),
            enqueued_at_ms: num("enqueued_at_ms"),
            started_at_ms: num("started_at_ms"),
            finished_at_ms: num("finished_at_ms"),
            history,
        }))
    }

    /// A tenant's summed usage: runs, fuel, wall time (us), memory
    /// byte-seconds, network bytes out and in.
    pub async fn usage(
        &self,
        tenant: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        Ok(self.connection().hgetall(Keys::new(tenant).usage()).await?)
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

    /// Put a dead job back on its queue with fresh attempts. False if it is
    /// not in the dead-letter queue.
    pub async fn dead_retry(&self, tenant: &str, id: &str) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let envelope: Option<String> = conn.hget(keys.job(id), "envelope").await?;
        let Some(envelope) = envelope.and_then(|e| Envelope::parse(&e).ok()) else {
            return Ok(false);
        };
        let removed: i64 = conn.zrem(keys.dead(), id).await?;
        if removed == 0 {
            return Ok(false);
        }
        let score: f64 = conn
            .hget(keys.job(id), "score")
            .await
            .unwrap_or(envelope.priority_base());
        redis::pipe()
            .atomic()
            .hset_multiple(
                keys.job(id),
                &[
                    ("state", "queued"),
                    ("attempt", "0"),
                    ("lease", ""),
                    ("has_history", "1"),
                ],
            )
            .hdel(keys.job(id), "finished_at_ms")
            .del(keys.done(id))
            .rpush(
                keys.history(id),
                serde_json::json!({"at_ms": now_ms(), "event": "dead-retry"}).to_string(),
            )
            .zadd(keys.ready(&envelope.queue), id, score)
            .lpush(keys.signal(&envelope.queue), "1")
            .query_async::<()>(&mut conn)
            .await?;
        Ok(true)
    }

    /// Delete every dead-lettered job; how many.
    pub async fn dead_purge(&self, tenant: &str) -> anyhow::Result<usize> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let ids: Vec<String> = conn.zrange(keys.dead(), 0, -1).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.del(keys.job(id))
                .del(keys.history(id))
                .del(keys.done(id))
                .zrem(keys.dead(), id);
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(ids.len())
    }
}
