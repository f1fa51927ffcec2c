//! The producer and admin side of the broker (the Rust client API): deploy,
//! enqueue, results, status, and the dead-letter queue. Workers never need
//! this file, except to look up a deployed task.

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::envelope::{Envelope, ENVELOPE_VERSION, MAX_PRIORITY};
use super::{now_ms, scripts, Broker};
use crate::failure::{Category, Failure};
use crate::keys::{valid_tenant, Keys};
use crate::policy::TaskPolicy;

/// A deployed task version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployedTask {
    /// Task name.
    pub name: String,
    /// sha256 of the component (its version).
    pub hash: String,
    /// Its policy.
    pub policy: TaskPolicy,
    /// When it was deployed (unix ms).
    pub deployed_at_ms: u64,
}

/// What to enqueue.
#[derive(Debug, Clone, Default)]
pub struct EnqueueRequest {
    /// Tenant.
    pub tenant: String,
    /// Deployed task name.
    pub task: String,
    /// JSON payload.
    pub payload: serde_json::Value,
    /// Do not start before this time (unix ms); `--countdown` and `--eta`.
    pub not_before_ms: Option<u64>,
    /// Deduplicate on this key.
    pub idempotency_key: Option<String>,
    /// Override the task's result policy.
    pub store_result: Option<bool>,
    /// 0-9, higher first.
    pub priority: u8,
    /// Override the task's max attempts.
    pub max_attempts: Option<u32>,
}

/// The answer to an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The job id (an existing job's id for a duplicate).
    pub id: String,
    /// True when the idempotency key matched an existing job.
    pub duplicate: bool,
}

/// Where a job's result stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultState {
    /// The stored result.
    Ready(serde_json::Value),
    /// Not finished yet.
    Pending,
    /// Finished, but its result was not stored.
    Ignored,
    /// Stored, but its TTL has passed.
    Expired,
    /// The job failed (dead-lettered).
    Failed(Failure),
    /// No such job (never existed, or its record expired).
    Unknown,
}

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

fn failure(category: Category, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure::new(category, message))
}

impl Broker {
    /// Record a task version (the component must already be validated).
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

    /// A tenant's record, if one was created.
    pub async fn tenant(&self, tenant: &str) -> anyhow::Result<Option<crate::tenants::Tenant>> {
        let spec: Option<String> = self
            .connection()
            .hget(Keys::new(tenant).tenant(), "spec")
            .await?;
        spec.map(|s| serde_json::from_str(&s).map_err(anyhow::Error::from))
            .transpose()
    }

    /// Names of tenants with a record.
    pub async fn tenant_names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = self.connection().smembers(crate::keys::TENANTS).await?;
        names.sort();
        Ok(names)
    }

    /// A deployed task, if any.
    pub async fn task(&self, tenant: &str, name: &str) -> anyhow::Result<Option<DeployedTask>> {
        let spec: Option<String> = self
            .connection()
            .hget(Keys::new(tenant).task(name), "spec")
            .await?;
        spec.map(|s| serde_json::from_str(&s).map_err(anyhow::Error::from))
            .transpose()
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

    /// A component's bytes by hash.
    pub async fn component(&self, tenant: &str, hash: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .connection()
            .get(Keys::new(tenant).component(hash))
            .await?)
    }

    /// Enqueue a job. Fails with `unknown-task` or `bad-payload` failures
    /// (downcastable to [`Failure`]) before anything is written.
    pub async fn enqueue(&self, req: EnqueueRequest) -> anyhow::Result<Enqueued> {
        valid_tenant(&req.tenant).map_err(anyhow::Error::msg)?;
        let task = self.task(&req.tenant, &req.task).await?.ok_or_else(|| {
            failure(
                Category::UnknownTask,
                format!(
                    "no task {:?} is deployed in tenant {:?}",
                    req.task, req.tenant
                ),
            )
        })?;
        anyhow::ensure!(
            req.priority <= MAX_PRIORITY,
            "priority {} is out of range 0-{MAX_PRIORITY}",
            req.priority
        );
        let now = now_ms();
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            tenant: req.tenant.clone(),
            task: req.task.clone(),
            queue: task.policy.queue.clone(),
            payload: req.payload,
            priority: req.priority,
            enqueued_at_ms: now,
            idempotency_key: req.idempotency_key.clone(),
            store_result: req.store_result,
            max_attempts: req.max_attempts,
        };
        let text = serde_json::to_string(&envelope)?;
        let payload_len = serde_json::to_string(&envelope.payload)?.len();
        if payload_len > task.policy.max_payload_bytes {
            return Err(failure(
                Category::BadPayload,
                format!(
                    "payload is {payload_len} bytes, over the task's cap of {} bytes",
                    task.policy.max_payload_bytes
                ),
            ));
        }
        let keys = Keys::new(&req.tenant);
        let queue = &envelope.queue;
        let idem = req
            .idempotency_key
            .as_deref()
            .map(|k| keys.idempotency(&req.task, k))
            .unwrap_or_default();
        let (id, kind): (String, String) = scripts::ENQUEUE
            .key(keys.job(&envelope.id))
            .key(keys.ready(queue))
            .key(keys.delayed(queue))
            .key(keys.signal(queue))
            .key(idem)
            .key(keys.seq(queue))
            .arg(&envelope.id)
            .arg(text)
            .arg(envelope.priority)
            .arg(req.not_before_ms.unwrap_or(0))
            .arg(now)
            .arg(task.policy.result_ttl.as_millis() as u64)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(Enqueued {
            id,
            duplicate: kind == "duplicate",
        })
    }

    /// Enqueue many jobs of one task in pipelined round trips (no
    /// idempotency keys, no delays): what a bulk producer or the benchmark
    /// does. Returns the job ids.
    pub async fn enqueue_many(
        &self,
        tenant: &str,
        task: &str,
        payloads: &[serde_json::Value],
    ) -> anyhow::Result<Vec<String>> {
        valid_tenant(tenant).map_err(anyhow::Error::msg)?;
        let deployed = self.task(tenant, task).await?.ok_or_else(|| {
            failure(
                Category::UnknownTask,
                format!("no task {task:?} is deployed in tenant {tenant:?}"),
            )
        })?;
        let keys = Keys::new(tenant);
        let queue = &deployed.policy.queue;
        let now = now_ms();
        let mut ids = Vec::with_capacity(payloads.len());
        let mut conn = self.connection();
        // Load the script once so the pipeline can use EVALSHA.
        let _: String = scripts::ENQUEUE.load_async(&mut conn).await?;
        for chunk in payloads.chunks(1000) {
            let mut pipe = redis::pipe();
            for payload in chunk {
                let envelope = Envelope {
                    v: ENVELOPE_VERSION,
                    id: uuid::Uuid::new_v4().to_string(),
                    tenant: tenant.to_string(),
                    task: task.to_string(),
                    queue: queue.clone(),
                    payload: payload.clone(),
                    priority: 0,
                    enqueued_at_ms: now,
                    idempotency_key: None,
                    store_result: None,
                    max_attempts: None,
                };
                pipe.cmd("EVALSHA")
                    .arg(scripts::ENQUEUE.get_hash())
                    .arg(6)
                    .arg(keys.job(&envelope.id))
                    .arg(keys.ready(queue))
                    .arg(keys.delayed(queue))
                    .arg(keys.signal(queue))
                    .arg("")
                    .arg(keys.seq(queue))
                    .arg(&envelope.id)
                    .arg(serde_json::to_string(&envelope)?)
                    .arg(0)
                    .arg(0)
                    .arg(now)
                    .arg(0)
                    .ignore();
                ids.push(envelope.id);
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(ids)
    }

    /// Where a job's result stands; with `wait`, block until it finishes or
    /// the wait runs out (woken by the worker, not by polling).
    pub async fn result(
        &self,
        tenant: &str,
        id: &str,
        wait: Option<Duration>,
    ) -> anyhow::Result<ResultState> {
        let keys = Keys::new(tenant);
        if wait.is_some() {
            // Register first, then look: the completion pushes `done:ID`
            // only for jobs someone registered on (see WATCH_RESULT).
            let _: Option<String> = scripts::WATCH_RESULT
                .key(keys.job(id))
                .invoke_async(&mut self.connection())
                .await?;
        }
        let state = self.result_now(&keys, id).await?;
        let Some(wait) = wait.filter(|_| state == ResultState::Pending) else {
            return Ok(state);
        };
        // BLMOVE from a list to itself waits for the completion token
        // without consuming it, so any number of waiters wake.
        let mut blocking = self.blocking_connection(wait).await?;
        let _: Option<String> = redis::cmd("BLMOVE")
            .arg(keys.done(id))
            .arg(keys.done(id))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(wait.as_secs_f64())
            .query_async(&mut blocking)
            .await?;
        self.result_now(&keys, id).await
    }

    async fn result_now(&self, keys: &Keys, id: &str) -> anyhow::Result<ResultState> {
        let mut conn = self.connection();
        let (state, stored, last_error): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(keys.job(id))
                .arg("state")
                .arg("result_stored")
                .arg("last_error")
                .query_async(&mut conn)
                .await?;
        let result: Option<String> = conn.get(keys.result(id)).await?;
        Ok(match (state.as_deref(), result) {
            (_, Some(r)) => ResultState::Ready(serde_json::from_str(&r)?),
            (Some("succeeded"), None) if stored.is_some() => ResultState::Expired,
            (Some("succeeded"), None) => ResultState::Ignored,
            (Some("dead"), _) => ResultState::Failed(
                last_error
                    .and_then(|e| serde_json::from_str(&e).ok())
                    .unwrap_or_else(|| {
                        Failure::new(Category::TaskError, "failed (no error recorded)")
                    }),
            ),
            (Some(_), None) => ResultState::Pending,
            (None, None) => ResultState::Unknown,
        })
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
