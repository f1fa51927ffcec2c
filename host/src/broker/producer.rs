//! The producer side of the broker (the Rust client API): enqueue, and a
//! job's result. Workers never use this file.

use std::time::Duration;

use redis::AsyncCommands;

use super::envelope::{Envelope, ENVELOPE_VERSION, MAX_PRIORITY};
use super::schedules::TickClaim;
use super::{now_ms, scripts, Broker};
use crate::failure::{Category, Failure};
use crate::keys::{valid_tenant, Keys};
use crate::limits;
use crate::schedule::TICK_KEY_PREFIX;
use crate::trace_context::TraceParent;

/// What to enqueue.
#[derive(Debug, Clone, Default)]
pub struct EnqueueRequest {
    /// Tenant.
    pub tenant: String,
    /// Deployed task name.
    pub task: String,
    /// JSON payload.
    pub payload: serde_json::Value,
    /// Do not start before this long after the enqueue (`--countdown`),
    /// measured on the Redis server's clock, the same reading as the
    /// enqueue time.
    pub countdown: Option<Duration>,
    /// Do not start before this time (unix ms, `--eta`); wins over
    /// `countdown`.
    pub not_before_ms: Option<u64>,
    /// Deduplicate on this key.
    pub idempotency_key: Option<String>,
    /// Override the task's result policy.
    pub store_result: Option<bool>,
    /// 0-9, higher first.
    pub priority: u8,
    /// Override the task's max attempts.
    pub max_attempts: Option<u32>,
    /// The producer's W3C trace context: the job's run joins its trace.
    pub traceparent: Option<String>,
    /// Concurrency key (`--key`): with the task's `max_per_key = N`, at
    /// most N jobs with the same key run at once across all workers, the
    /// others waiting in order. Refused for a task without `max_per_key`.
    pub key: Option<String>,
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
    /// The job failed (dead-lettered) or was cancelled.
    Failed(Failure),
    /// No such job (never existed, or its record expired).
    Unknown,
}

/// The job record's `max_deliveries`: '' for the default (the fetch
/// script's), so the common case writes no field for it.
pub(super) fn max_deliveries(policy: &crate::policy::TaskPolicy) -> String {
    match policy.retry.max_deliveries {
        crate::policy::DEFAULT_MAX_DELIVERIES => String::new(),
        n => n.to_string(),
    }
}

/// Who asks for a job: a producer, a guest enqueueing a child job (whose
/// enqueues the tenant's `max_children_per_minute` limits), or a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// An application, the CLI, the Rust client API.
    Producer,
    /// A running job's `enqueue` host call.
    Child,
    /// A schedule's tick (or `schedule run`): the one origin whose
    /// idempotency keys may start with [`TICK_KEY_PREFIX`].
    Schedule,
}

fn failure(category: Category, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure::new(category, message))
}

impl Broker {
    /// Enqueue a job. Fails with `unknown-task`, `bad-payload` or (over a
    /// tenant quota) `denied` failures, downcastable to [`Failure`], before
    /// anything is written.
    pub async fn enqueue(&self, req: EnqueueRequest) -> anyhow::Result<Enqueued> {
        self.enqueue_as(req, Origin::Producer).await
    }

    /// [`Broker::enqueue`] for a producer or for a guest's child job.
    pub(super) async fn enqueue_as(
        &self,
        req: EnqueueRequest,
        origin: Origin,
    ) -> anyhow::Result<Enqueued> {
        self.enqueue_claiming(req, origin, None)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the enqueue script answered 'stale' without a tick"))
    }

    /// [`Broker::enqueue_as`], and when `tick` is given, only if the
    /// schedule's tick is still unclaimed (claiming it in the same step):
    /// `None` when another worker fired it first.
    pub(super) async fn enqueue_claiming(
        &self,
        req: EnqueueRequest,
        origin: Origin,
        tick: Option<&TickClaim>,
    ) -> anyhow::Result<Option<Enqueued>> {
        valid_tenant(&req.tenant).map_err(anyhow::Error::msg)?;
        let (task, tenant) = self.task_and_tenant(&req.tenant, &req.task).await?;
        let task = task.ok_or_else(|| {
            failure(
                Category::UnknownTask,
                format!(
                    "no task {:?} is deployed in tenant {:?}",
                    req.task, req.tenant
                ),
            )
        })?;
        let caps = tenant.map(|t| t.limits).unwrap_or_default();
        anyhow::ensure!(
            req.priority <= MAX_PRIORITY,
            "priority {} is out of range 0-{MAX_PRIORITY}",
            req.priority
        );
        let bad = |m: String| failure(Category::BadPayload, m);
        if let Some(key) = &req.idempotency_key {
            limits::check_name("idempotency key", key, limits::MAX_IDEMPOTENCY_KEY_BYTES)
                .map_err(bad)?;
            if origin != Origin::Schedule && key.starts_with(TICK_KEY_PREFIX) {
                return Err(bad(format!(
                    "idempotency key {key:?}: keys starting with {TICK_KEY_PREFIX:?} are reserved for schedule ticks"
                )));
            }
        }
        if let Some(key) = &req.key {
            limits::check_name("concurrency key", key, crate::gates::MAX_KEY_BYTES).map_err(bad)?;
            if task.policy.max_per_key.is_none() {
                return Err(bad(format!(
                    "task {:?} has no max_per_key in its policy, so a concurrency key would \
                     not limit anything: set max_per_key in its task.toml, or enqueue without --key",
                    req.task
                )));
            }
        }
        let gate = crate::gates::gate_field(
            &req.task,
            task.policy.rate_limit.is_some(),
            req.key.as_deref(),
        )
        .unwrap_or_default();
        let delay = req.countdown.unwrap_or_default();
        limits::check_delay("countdown", delay).map_err(bad)?;
        if let Some(eta) = req.not_before_ms {
            let ahead = Duration::from_millis(eta.saturating_sub(now_ms()));
            limits::check_delay("an ETA from now", ahead).map_err(bad)?;
        }
        if let Some(t) = &req.traceparent {
            anyhow::ensure!(
                TraceParent::parse(t).is_some(),
                "traceparent {t:?} is not a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>, lowercase)"
            );
        }
        let id = uuid::Uuid::new_v4().to_string();
        // The producer's span: what the run's span is a child of when spans
        // are exported (the envelope then names it); otherwise the
        // producer's own `traceparent` travels as given.
        let span = tracing::debug_span!(
            "enqueue",
            otel.kind = "producer",
            messaging.system = "wasmq",
            messaging.operation.type = "send",
            messaging.destination.name = %task.policy.queue,
            messaging.message.id = %id,
            wasmq.tenant = %req.tenant,
            wasmq.task = %req.task,
        );
        let parent = req.traceparent.as_deref().and_then(TraceParent::parse);
        let traceparent = crate::trace_context::join(&span, parent.as_ref())
            .map(|t| t.to_string())
            .or_else(|| req.traceparent.clone());
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            id,
            tenant: req.tenant.clone(),
            task: req.task.clone(),
            queue: task.policy.queue.clone(),
            payload: req.payload,
            priority: req.priority,
            enqueued_at_ms: now_ms(),
            idempotency_key: req.idempotency_key.clone(),
            store_result: req.store_result,
            max_attempts: req.max_attempts,
            traceparent,
            flow: None,
        };
        let text = serde_json::to_string(&envelope)?;
        let payload = serde_json::to_string(&envelope.payload)?;
        // The tenant's current cap bounds a task deployed before it.
        let max_payload = caps
            .max_payload_bytes
            .map_or(task.policy.max_payload_bytes, |cap| {
                cap.min(task.policy.max_payload_bytes)
            });
        if payload.len() > max_payload {
            return Err(bad(format!(
                "payload is {} bytes, over the task's cap of {max_payload} bytes",
                payload.len(),
            )));
        }
        limits::check_json_depth("payload", &payload, limits::MAX_PAYLOAD_DEPTH).map_err(bad)?;
        let keys = Keys::new(&req.tenant);
        let queue = &envelope.queue;
        let idem = req
            .idempotency_key
            .as_deref()
            .map(|k| keys.idempotency(&req.task, k))
            .unwrap_or_default();
        let (children, children_per_minute) = match origin {
            Origin::Producer | Origin::Schedule => (String::new(), 0),
            Origin::Child => (
                keys.children_rate(),
                caps.max_children_per_minute.unwrap_or(0),
            ),
        };
        let mut invocation = scripts::ENQUEUE.key(keys.job(&envelope.id));
        invocation
            .key(keys.ready(queue))
            .key(keys.delayed(queue))
            .key(keys.signal(queue))
            .key(idem)
            .key(keys.seq(queue))
            .key(keys.idempotency_index())
            .key(children)
            .arg(&envelope.id)
            .arg(text)
            .arg(envelope.priority)
            .arg(delay.as_millis() as u64)
            .arg(req.not_before_ms.unwrap_or(0))
            .arg(max_deliveries(&task.policy))
            .arg(caps.max_idempotency_keys.unwrap_or(0))
            .arg(children_per_minute)
            .arg(gate);
        if let Some(tick) = tick {
            invocation
                .key(keys.schedules_due())
                .key(keys.schedule_runs())
                .key(keys.schedules())
                .arg(&tick.schedule)
                .arg(tick.due_ms)
                .arg(tick.next_ms.map(|t| t.to_string()).unwrap_or_default())
                .arg(tick.tick_ms)
                .arg(&tick.definition);
        }
        let reply: Vec<String> = invocation.invoke_async(&mut self.connection()).await?;
        match reply.as_slice() {
            [_, kind] if kind == "stale" => Ok(None),
            [id, kind] => Ok(Some(Enqueued {
                id: id.clone(),
                duplicate: kind == "duplicate",
            })),
            [_, _, reason] => Err(failure(Category::Denied, reason.clone())),
            other => anyhow::bail!("the enqueue script answered {other:?}"),
        }
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
        let gate = crate::gates::gate_field(task, deployed.policy.rate_limit.is_some(), None)
            .unwrap_or_default();
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
                    traceparent: None,
                    flow: None,
                };
                pipe.cmd("EVALSHA")
                    .arg(scripts::ENQUEUE.get_hash())
                    .arg(8)
                    .arg(keys.job(&envelope.id))
                    .arg(keys.ready(queue))
                    .arg(keys.delayed(queue))
                    .arg(keys.signal(queue))
                    .arg("")
                    .arg(keys.seq(queue))
                    .arg(keys.idempotency_index())
                    .arg("")
                    .arg(&envelope.id)
                    .arg(serde_json::to_string(&envelope)?)
                    .arg(0)
                    .arg(0)
                    .arg(0)
                    .arg(max_deliveries(&deployed.policy))
                    .arg(0)
                    .arg(0)
                    .arg(&gate)
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
            (Some("dead" | "cancelled"), _) => ResultState::Failed(
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
}
