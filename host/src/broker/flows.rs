//! Workflows in Redis: submitting a planned flow (all its jobs in one
//! script), reading how its steps ended, and what one job of it waits on.
//!
//! A flow's steps are ordinary jobs of its tenant (same keys, same
//! retries, leases and idempotency); a step that waits for others is
//! `waiting`, outside every queue, until the scripts that end jobs
//! (`flow_settle` in [`scripts`]) move it on. Every key of a flow carries
//! its tenant's hash tag, so a flow lives in one slot.
//!
//! What waits for what is stored as the plan's barriers
//! ([`crate::flow::Barrier`]) in one hash per flow (`flow:FID:barriers`):
//! a step's `flow` field names the barrier its end counts toward
//! (`feeds`), its envelope the one it waits for (`after`). Submitting and
//! settling a flow therefore write O(steps), whatever its shape: the largest
//! allowed flow is one short script, not a stall of the tenant's Redis.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::envelope::{Envelope, FlowRef, ENVELOPE_VERSION};
use super::producer::max_deliveries;
use super::registry::DeployedTask;
use super::{now_ms, scripts, Broker};
use crate::backend::{FlowRequest, StartedFlow};
use crate::failure::{Category, Failure};
use crate::flow::{OnFailure, Plan};
use crate::keys::{valid_tenant, Keys};
use crate::limits;

/// How a flow stands, for `wasmq flow --wait` and the Rust API.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowState {
    /// Some step has not ended yet.
    Running,
    /// Every step ended; the flow's result (its last node's, a group's as
    /// a list), or the first of those steps that failed.
    Finished(Result<Value, Failure>),
    /// No such flow (never started, or expired).
    Unknown,
}

/// A job's place in its flow, for `wasmq status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowMembership {
    /// The flow's id.
    pub flow_id: String,
    /// The steps it waits for, in order.
    pub waits_on: Vec<String>,
    /// Those it still waits for (while `waiting`).
    pub still_waiting_on: Vec<String>,
    /// The steps that wait for it.
    pub dependents: Vec<String>,
    /// The job that started the flow, if a job did.
    pub started_by: Option<String>,
    /// Steps in the flow, and how many have ended.
    pub steps: u64,
    /// See `steps`.
    pub settled: u64,
}

fn failure(category: Category, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure::new(category, message))
}

/// The reason of FLOW_SUBMIT's `{'refused', reason}`, if that is what it
/// returned ('new' and 'existing' are plain strings).
fn refusal(outcome: &redis::Value) -> Option<String> {
    let redis::Value::Array(parts) = outcome else {
        return None;
    };
    match parts.as_slice() {
        [redis::Value::BulkString(word), redis::Value::BulkString(reason)]
            if word.as_slice() == b"refused" =>
        {
            Some(String::from_utf8_lossy(reason).into_owned())
        }
        _ => None,
    }
}

/// The flow a job's n-th start makes: the same on every delivery.
fn flow_id_for_job(tenant: &str, job: &str, ordinal: u32) -> String {
    let digest = Sha256::digest(format!("{tenant}\0{job}\0{ordinal}").as_bytes());
    hex::encode(&digest[..16])
}

impl Broker {
    /// Start the workflow `definition` (the JSON of a `wasmq flow` file)
    /// in `tenant`; its steps join `traceparent`'s trace when given.
    pub async fn start_flow(
        &self,
        tenant: &str,
        definition: &str,
        traceparent: Option<String>,
    ) -> anyhow::Result<StartedFlow> {
        let plan = crate::flow::plan(definition).map_err(|e| failure(Category::BadPayload, e))?;
        self.submit_new(tenant, &plan, traceparent).await
    }

    /// [`Broker::start_flow`] for a definition built in Rust
    /// ([`crate::flow::Node`]'s builders).
    pub async fn start_flow_node(
        &self,
        tenant: &str,
        node: &crate::flow::Node,
        traceparent: Option<String>,
    ) -> anyhow::Result<StartedFlow> {
        let plan = crate::flow::plan_node(node).map_err(|e| failure(Category::BadPayload, e))?;
        self.submit_new(tenant, &plan, traceparent).await
    }

    /// Submit `plan` as a new flow with an id of its own.
    async fn submit_new(
        &self,
        tenant: &str,
        plan: &Plan,
        traceparent: Option<String>,
    ) -> anyhow::Result<StartedFlow> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.submit(tenant, plan, &id, "", traceparent).await
    }

    /// Start the flow a running job asked for, or find the one an earlier
    /// delivery of that job started with the same ordinal.
    pub async fn start_flow_for_job(
        &self,
        tenant: &str,
        request: &FlowRequest,
    ) -> anyhow::Result<StartedFlow> {
        let plan =
            crate::flow::plan(&request.definition).map_err(|e| failure(Category::BadPayload, e))?;
        let id = flow_id_for_job(tenant, &request.started_by, request.ordinal);
        self.submit(
            tenant,
            &plan,
            &id,
            &request.started_by,
            request.traceparent.clone(),
        )
        .await
    }

    async fn submit(
        &self,
        tenant: &str,
        plan: &Plan,
        flow_id: &str,
        started_by: &str,
        traceparent: Option<String>,
    ) -> anyhow::Result<StartedFlow> {
        valid_tenant(tenant).map_err(anyhow::Error::msg)?;
        let record = self.tenant(tenant).await?;
        let caps = record.map(|t| t.limits).unwrap_or_default();
        let mut deployed: HashMap<&str, DeployedTask> = HashMap::new();
        for step in &plan.steps {
            if deployed.contains_key(step.task.as_str()) {
                continue;
            }
            let task = self.task(tenant, &step.task).await?.ok_or_else(|| {
                failure(
                    Category::UnknownTask,
                    format!(
                        "{}: no task {:?} is deployed in tenant {tenant:?}",
                        step.path, step.task
                    ),
                )
            })?;
            deployed.insert(step.task.as_str(), task);
        }
        let ids: Vec<String> = (0..plan.steps.len())
            .map(|i| format!("{flow_id}-{i}"))
            .collect();
        let id_list = |steps: &[usize]| {
            let listed: Vec<&str> = steps.iter().map(|&i| ids[i].as_str()).collect();
            listed.join(" ")
        };
        let keys = Keys::new(tenant);
        let starter = match started_by {
            "" => String::new(),
            job => keys.job(job),
        };
        // A guest's steps are its child jobs: they count against the
        // tenant's children rate (an operator's or producer's do not).
        let (children, children_per_minute) = match started_by {
            "" => (String::new(), 0),
            _ => (
                keys.children_rate(),
                caps.max_children_per_minute.unwrap_or(0),
            ),
        };
        let mut call = scripts::FLOW_SUBMIT.key(keys.flow(flow_id));
        call.key(starter)
            .key(children)
            .key(keys.flow_barriers(flow_id));
        call.arg(keys.prefix())
            .arg(flow_id)
            .arg(plan.result.to_json(&ids).to_string())
            .arg(started_by)
            .arg(children_per_minute)
            .arg(plan.barriers.len());
        for barrier in &plan.barriers {
            call.arg(barrier.members.len())
                .arg(id_list(&barrier.members))
                .arg(id_list(&barrier.successors));
        }
        for (i, step) in plan.steps.iter().enumerate() {
            let task = &deployed[step.task.as_str()];
            let queue = &task.policy.queue;
            let payload = serde_json::to_string(&step.payload)?;
            let max_payload = caps
                .max_payload_bytes
                .map_or(task.policy.max_payload_bytes, |c| {
                    c.min(task.policy.max_payload_bytes)
                });
            if payload.len() > max_payload {
                return Err(failure(
                    Category::BadPayload,
                    format!(
                        "{}: payload is {} bytes, over the task's cap of {max_payload} bytes",
                        step.path,
                        payload.len()
                    ),
                ));
            }
            limits::check_json_depth("payload", &payload, limits::MAX_PAYLOAD_DEPTH)
                .map_err(|e| failure(Category::BadPayload, format!("{}: {e}", step.path)))?;
            let envelope = Envelope {
                v: ENVELOPE_VERSION,
                id: ids[i].clone(),
                tenant: tenant.to_string(),
                task: step.task.clone(),
                queue: queue.clone(),
                payload: step.payload.clone(),
                priority: 0,
                enqueued_at_ms: now_ms(),
                idempotency_key: None,
                store_result: None,
                max_attempts: None,
                traceparent: traceparent.clone(),
                flow: Some(FlowRef {
                    id: flow_id.to_string(),
                    waits_on: Vec::new(),
                    after: step.after,
                }),
            };
            let mut flow_field = serde_json::json!({
                "id": flow_id,
                "queue": queue,
                "priority": 0,
                "continue": step.on_failure == OnFailure::Continue,
            });
            if let Some(feeds) = step.feeds {
                flow_field["feeds"] = feeds.into();
            }
            let gate = crate::gates::gate_field(&step.task, task.policy.rate_limit.is_some(), None)
                .unwrap_or_default();
            call.arg(&ids[i])
                .arg(queue)
                .arg(serde_json::to_string(&envelope)?)
                .arg(0)
                .arg(max_deliveries(&task.policy))
                .arg(gate)
                .arg(flow_field.to_string())
                .arg(step.after.map_or(String::new(), |b| b.to_string()));
        }
        let outcome: redis::Value = call.invoke_async(&mut self.connection()).await?;
        if let Some(reason) = refusal(&outcome) {
            return Err(failure(Category::Denied, reason));
        }
        Ok(StartedFlow {
            flow_id: flow_id.to_string(),
            job_ids: ids,
        })
    }

    /// How flow `id` stands; with `wait`, first wait up to that long for
    /// its last step to end.
    pub async fn flow_state(
        &self,
        tenant: &str,
        id: &str,
        wait: Option<Duration>,
    ) -> anyhow::Result<FlowState> {
        let state = self.flow_state_now(tenant, id).await?;
        let Some(wait) = wait.filter(|_| state == FlowState::Running) else {
            return Ok(state);
        };
        let keys = Keys::new(tenant);
        let mut blocking = self.blocking_connection(wait).await?;
        let _: Option<String> = redis::cmd("BLMOVE")
            .arg(keys.flow_done(id))
            .arg(keys.flow_done(id))
            .arg("RIGHT")
            .arg("LEFT")
            .arg(wait.as_secs_f64())
            .query_async(&mut blocking)
            .await?;
        self.flow_state_now(tenant, id).await
    }

    async fn flow_state_now(&self, tenant: &str, id: &str) -> anyhow::Result<FlowState> {
        let keys = Keys::new(tenant);
        let (shape, steps, settled): (Option<String>, Option<u64>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(keys.flow(id))
                .arg("result")
                .arg("steps")
                .arg("settled")
                .query_async(&mut self.connection())
                .await?;
        let (Some(shape), Some(steps)) = (shape, steps) else {
            return Ok(FlowState::Unknown);
        };
        if settled.unwrap_or(0) < steps {
            return Ok(FlowState::Running);
        }
        let shape: Value = serde_json::from_str(&shape)?;
        let results: HashMap<String, String> =
            self.connection().hgetall(keys.flow_results(id)).await?;
        let mut first_failure = None;
        let value = crate::flow::ResultShape::fill(&shape, &mut |job| match results
            .get(job)
            .map(|e| step_outcome(e))
        {
            Some((_, Ok(v))) => v,
            Some((task, Err(message))) => {
                first_failure.get_or_insert_with(|| failed_step(job, &task, &message));
                Value::Null
            }
            None => Value::Null,
        });
        Ok(FlowState::Finished(match first_failure {
            Some(f) => Err(f),
            None => Ok(value),
        }))
    }

    /// The results of the steps `waits_on` of flow `flow_id`, in order:
    /// (job id, task, JSON result or "CATEGORY: message"). A step with no
    /// entry (only if its flow expired) reads as failed.
    pub async fn flow_dependencies(
        &self,
        tenant: &str,
        flow_id: &str,
        waits_on: &[String],
    ) -> anyhow::Result<Vec<(String, String, Result<String, String>)>> {
        if waits_on.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Keys::new(tenant);
        let entries: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.flow_results(flow_id))
            .arg(waits_on)
            .query_async(&mut self.connection())
            .await?;
        Ok(waits_on
            .iter()
            .zip(entries)
            .map(|(job, entry)| match entry {
                Some(entry) => {
                    let (task, outcome) = step_outcome(&entry);
                    (job.clone(), task, outcome.map(|v| v.to_string()))
                }
                None => (
                    job.clone(),
                    String::new(),
                    Err("unknown: the flow's record of this step is gone (expired)".to_string()),
                ),
            })
            .collect())
    }

    /// The steps a step of flow `flow.id` waits for, in order: its
    /// barrier's members (or, in a flow submitted before barriers, the
    /// list its envelope carries).
    pub async fn flow_waits_on(&self, tenant: &str, flow: &FlowRef) -> anyhow::Result<Vec<String>> {
        match flow.after {
            Some(barrier) => self
                .barrier_ids(tenant, &flow.id, barrier, "members")
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "flow {}'s record of the steps this one waits for is gone (the flow expired); start the flow again",
                        flow.id
                    )
                }),
            None => Ok(flow.waits_on.clone()),
        }
    }

    /// What a step of a flow receives when it runs: the results of the
    /// steps it waits for ([`Broker::flow_dependencies`] of
    /// [`Broker::flow_waits_on`]).
    pub async fn flow_step_inputs(
        &self,
        tenant: &str,
        flow: &FlowRef,
    ) -> anyhow::Result<Vec<(String, String, Result<String, String>)>> {
        let waits_on = self.flow_waits_on(tenant, flow).await?;
        self.flow_dependencies(tenant, &flow.id, &waits_on).await
    }

    /// The job ids in field `N:{field}` of flow `flow_id`'s barriers;
    /// `None` when the flow's record is gone.
    async fn barrier_ids(
        &self,
        tenant: &str,
        flow_id: &str,
        barrier: usize,
        field: &str,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let listed: Option<String> = self
            .connection()
            .hget(
                Keys::new(tenant).flow_barriers(flow_id),
                format!("{barrier}:{field}"),
            )
            .await?;
        Ok(listed.map(|l| l.split_whitespace().map(String::from).collect()))
    }

    /// The flows job `id` started (`flows` of its record: their ids follow
    /// from the job and the order it started them in).
    pub fn flows_started_by(tenant: &str, id: &str, count: u32) -> Vec<String> {
        (1..=count)
            .map(|n| flow_id_for_job(tenant, id, n))
            .collect()
    }

    /// Job `id`'s place in its flow, if it is a step of one.
    pub async fn flow_membership(
        &self,
        tenant: &str,
        id: &str,
    ) -> anyhow::Result<Option<FlowMembership>> {
        let keys = Keys::new(tenant);
        let (flow, envelope): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(keys.job(id))
            .arg("flow")
            .arg("envelope")
            .query_async(&mut self.connection())
            .await?;
        let Some(flow) = flow else { return Ok(None) };
        let field: Value = serde_json::from_str(&flow)?;
        let Some(flow_id) = field["id"].as_str() else {
            return Ok(None);
        };
        let flow_ref = envelope
            .and_then(|e| serde_json::from_str::<Envelope>(&e).ok())
            .and_then(|e| e.flow);
        let waits_on = match &flow_ref {
            Some(f) => self.flow_waits_on(tenant, f).await.unwrap_or_default(),
            None => Vec::new(),
        };
        let dependents = match field["feeds"].as_u64() {
            Some(barrier) => self
                .barrier_ids(tenant, flow_id, barrier as usize, "successors")
                .await?
                .unwrap_or_default(),
            // A flow submitted before barriers lists them in the field.
            None => field["dependents"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let (started_by, steps, settled): (Option<String>, Option<u64>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(keys.flow(flow_id))
                .arg("started_by")
                .arg("steps")
                .arg("settled")
                .query_async(&mut self.connection())
                .await?;
        let still_waiting_on = self
            .not_ended(tenant, flow_id, id, flow_ref.as_ref(), &waits_on)
            .await?;
        Ok(Some(FlowMembership {
            flow_id: flow_id.to_string(),
            waits_on,
            still_waiting_on,
            dependents,
            started_by: started_by.filter(|s| !s.is_empty()),
            steps: steps.unwrap_or(0),
            settled: settled.unwrap_or(0),
        }))
    }

    /// Which of `waits_on` (what step `id` waits for) have not ended yet,
    /// in that order: those with no entry in the flow's results (or, in a
    /// flow submitted before barriers, those left in its waits set).
    async fn not_ended(
        &self,
        tenant: &str,
        flow_id: &str,
        id: &str,
        flow_ref: Option<&FlowRef>,
        waits_on: &[String],
    ) -> anyhow::Result<Vec<String>> {
        if waits_on.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Keys::new(tenant);
        if flow_ref.is_some_and(|f| f.after.is_none()) {
            let still: Vec<String> = self
                .connection()
                .smembers(keys.flow_waits(flow_id, id))
                .await?;
            return Ok(waits_on
                .iter()
                .filter(|w| still.contains(w))
                .cloned()
                .collect());
        }
        let ended: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.flow_results(flow_id))
            .arg(waits_on)
            .query_async(&mut self.connection())
            .await?;
        Ok(waits_on
            .iter()
            .zip(ended)
            .filter(|(_, entry)| entry.is_none())
            .map(|(w, _)| w.clone())
            .collect())
    }
}

/// A results-hash entry: its task, and its result or failure.
fn step_outcome(entry: &str) -> (String, Result<Value, String>) {
    let Ok(Value::Object(mut e)) = serde_json::from_str::<Value>(entry) else {
        return (
            String::new(),
            Err(format!("unreadable step record {entry:?}")),
        );
    };
    let task = e
        .get("task")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match (e.remove("ok"), e.remove("err")) {
        (Some(v), _) => (task, Ok(v)),
        (None, Some(Value::String(err))) => (task, Err(err)),
        _ => (task, Err("the step ended without a result".to_string())),
    }
}

/// The failure a flow's result reports for step `job` that ended with
/// `message` ("CATEGORY: text").
fn failed_step(job: &str, task: &str, message: &str) -> Failure {
    let category = message
        .split_once(':')
        .and_then(|(c, _)| serde_json::from_value::<Category>(Value::String(c.trim().into())).ok())
        .unwrap_or(Category::TaskError);
    Failure::new(category, format!("step {job} ({task}) ended {message}"))
}
