//! One job's life: read its envelope, find its task and tenant in the
//! catalog, check the job came through its task's queue, run it in a fresh
//! sandbox under the tenant's current caps, decide retry or dead-letter
//! ([`crate::retry`]), and hand back the outcome to record.
//!
//! Whose fault a failure is decides what it costs:
//! - the task's (it failed, trapped, timed out, or asked for a retry): one
//!   of its attempts;
//! - the host's (Redis unreachable or refusing writes, a component not
//!   fetchable): a host retry, which uses no attempt but is itself
//!   bounded ([`MAX_HOST_RETRIES`], then `host-error`), so a fault that
//!   never ends cannot retry a job forever. A host fault never hides the
//!   task's own verdict: a guest that returned `fail` fails;
//! - nobody's (a step it needs is held by another job, or the delivery lost
//!   its lease): it waits, or goes back, using neither.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tracing::Instrument;

use crate::backend::redis::{ChildEnqueuer, RedisBackend};
use crate::broker::envelope::{Envelope, FlowRef};
use crate::broker::{Broker, Completion, DeployedTask, Fetched, Outcome};
use crate::failure::{Category, Failure};
use crate::fence::LeaseWatch;
use crate::gates::{DEFAULT_RATE_LIMITED_HOLD, RATE_LIMITED_KIND};
use crate::limits::{MAX_DELAY, MAX_STORED_LOG_BYTES};
use crate::retry::{decide, Decision};
use crate::sandbox::{ComputeThreads, DependencyInput, FlowInput, JobInput, JobOutcome, Verdict};
use crate::tenants::Tenant;
use crate::trace_context::TraceParent;
use crate::usage::Usage;

use super::catalog::Catalog;
use super::fetch::FetchWindow;

/// How the host retries a job for its own faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRetries {
    /// Host retries a job gets before it is dead-lettered as `host-error`.
    pub max: u32,
    /// The first host retry waits this long; each next one twice as long,
    /// up to `max_delay`.
    pub delay: Duration,
    /// Longest wait before a host retry.
    pub max_delay: Duration,
}

/// Default host retries: 10, from 1 s doubling to a minute, about five
/// minutes in all, which a Redis restart or failover fits in with room; a
/// fault that lasts longer needs an operator, not more retries (`wasmq dead
/// retry` runs the job again).
pub const MAX_HOST_RETRIES: u32 = 10;

impl Default for HostRetries {
    fn default() -> Self {
        HostRetries {
            max: MAX_HOST_RETRIES,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl HostRetries {
    /// The wait before host retry number `n + 1`.
    fn delay(&self, n: u32) -> Duration {
        self.delay
            .saturating_mul(1 << n.min(16))
            .min(self.max_delay)
    }

    /// A host-side problem: try the job again later without counting
    /// against the task, unless the job has had all its host retries (then
    /// it is dead-lettered as `host-error`, naming the fault).
    fn outcome(&self, job: &Fetched, message: String) -> Outcome {
        if job.host_retries >= self.max {
            tracing::warn!(job = %job.id, %message, "host-side problem; the job has used its host retries");
            return Outcome::Dead(Failure::new(
                Category::HostError,
                format!(
                    "the host could not run the job through {} host retries; last: {message}",
                    job.host_retries
                ),
            ));
        }
        tracing::warn!(job = %job.id, %message, "host-side problem; job will be retried");
        Outcome::HostRetry {
            delay: self.delay(job.host_retries),
            error: Failure::new(Category::HostError, message),
        }
    }
}
/// How long a job waiting for another job's step waits, unless it asked.
const STEP_WAIT: Duration = Duration::from_secs(1);

/// See the module docs.
pub struct Processor {
    broker: Broker,
    catalog: Arc<Catalog>,
    /// For an io pool: where its compute-bound jobs finish (see
    /// [`ComputeThreads`]).
    compute: Option<Arc<ComputeThreads>>,
    /// How host faults are retried.
    host_retries: HostRetries,
    /// One Redis connection per tenant for its guests' host calls, apart
    /// from the pool's own (fetch, leases, outcomes) and from other
    /// tenants': one tenant's slow or large calls queue behind each other,
    /// not in front of anyone else's.
    guest_connections: Mutex<HashMap<String, ConnectionManager>>,
}

impl Processor {
    /// A processor running jobs of `broker` with what `catalog` finds.
    pub fn new(
        broker: Broker,
        catalog: Arc<Catalog>,
        compute: Option<Arc<ComputeThreads>>,
        host_retries: HostRetries,
    ) -> Self {
        Processor {
            broker,
            catalog,
            compute,
            host_retries,
            guest_connections: Mutex::new(HashMap::new()),
        }
    }

    /// Run `job`, delivered under `lease` by a fetch round that ran in
    /// `fetched`, to an outcome, under `span` (not yet entered: it is
    /// joined here to the producer's trace).
    pub async fn process(
        &self,
        job: Arc<Fetched>,
        lease: Arc<LeaseWatch>,
        span: &tracing::Span,
        fetched: Option<FetchWindow>,
    ) -> Completion {
        let envelope = Envelope::parse(&job.envelope);
        let producer = envelope
            .as_ref()
            .ok()
            .and_then(|e| e.traceparent.as_deref())
            .and_then(TraceParent::parse);
        // The run is a span of the producer's trace: the exported span's
        // id when spans are exported, else one minted here.
        let traceparent = crate::trace_context::join(span, producer.as_ref())
            .or_else(|| producer.map(|p| p.child()));
        if let Some(window) = fetched {
            crate::trace_context::past_child(span, "fetch", window.start, window.end);
        }
        match envelope {
            Err(reason) => {
                tracing::warn!(job = %job.id, %reason, "dead-lettering a malformed job");
                Completion {
                    job,
                    outcome: Outcome::Dead(Failure::new(Category::BadPayload, reason)),
                    usage: Usage::default(),
                    denials: Vec::new(),
                    idempotency_key: None,
                    task: String::new(),
                    enqueued_at_ms: 0,
                    log: String::new(),
                }
            }
            Ok(envelope) => {
                span.record("wasmq.task", envelope.task.as_str());
                let (outcome, usage, denials, log) = self
                    .run(&job, &envelope, lease, traceparent)
                    .instrument(span.clone())
                    .await;
                Completion {
                    job,
                    outcome,
                    usage,
                    denials,
                    idempotency_key: envelope.idempotency_key,
                    task: envelope.task,
                    enqueued_at_ms: envelope.enqueued_at_ms,
                    log,
                }
            }
        }
    }

    async fn run(
        &self,
        job: &Fetched,
        envelope: &Envelope,
        lease: Arc<LeaseWatch>,
        traceparent: Option<TraceParent>,
    ) -> (Outcome, Usage, Vec<String>, String) {
        let not_run = |outcome: Outcome| (outcome, Usage::default(), Vec::new(), String::new());
        let dead = |f: Failure| not_run(Outcome::Dead(f));
        let task = match self.catalog.task(&job.tenant, &envelope.task).await {
            Ok(Some(task)) => task,
            Ok(None) => {
                return dead(Failure::new(
                    Category::UnknownTask,
                    format!(
                        "no task {:?} is deployed in tenant {:?}",
                        envelope.task, job.tenant
                    ),
                ))
            }
            Err(e) => {
                return not_run(
                    self.host_retries
                        .outcome(job, format!("looking up the task failed: {e:#}")),
                )
            }
        };
        // Confinement is checked where the job runs: a producer that writes
        // a job straight into another queue must not get a task onto a pool
        // (or a tenant's share) it was not deployed for.
        if task.policy.queue != job.queue {
            return dead(Failure::new(
                Category::Denied,
                format!(
                    "job {} of task {:?} came from queue {:?}, but the task is deployed to queue {:?}; \
                     a job runs only from its task's queue",
                    job.id, task.name, job.queue, task.policy.queue
                ),
            ));
        }
        // Rate limits are the deployed policy's, whatever the producer
        // wrote: a job whose gate would skip them goes back to pass the
        // fetch's lanes with the right one (hand-written enqueues only).
        if let Some(gate) =
            crate::gates::required_gate(&task.name, task.policy.rate_limit.is_some(), &job.gate)
        {
            tracing::debug!(job = %job.id, task = %task.name, "job's gate does not match its task's policy; queued again with it");
            return not_run(Outcome::Regate { gate });
        }
        let record = match self.catalog.tenant(&job.tenant).await {
            Ok(record) => record,
            Err(e) => {
                return not_run(
                    self.host_retries
                        .outcome(job, format!("reading the tenant's caps failed: {e:#}")),
                )
            }
        };
        let prepared = match self.catalog.prepared(&job.tenant, &task).await {
            Ok(p) => p,
            Err(f) if f.category == Category::InvalidComponent => return dead(f),
            Err(f) => return not_run(self.host_retries.outcome(job, f.message)),
        };
        let flow = match &envelope.flow {
            Some(flow) => match self.flow_input(job, flow).await {
                Ok(input) => Some(input),
                Err(e) => return not_run(self.host_retries.outcome(job, e)),
            },
            None => None,
        };
        let payload = envelope.payload.to_string();
        // The tenant's current cap bounds a task deployed before it.
        let max_payload = record
            .as_ref()
            .and_then(|r| r.limits.max_payload_bytes)
            .map_or(task.policy.max_payload_bytes, |cap| {
                cap.min(task.policy.max_payload_bytes)
            });
        if payload.len() > max_payload {
            return dead(Failure::new(
                Category::BadPayload,
                format!(
                    "payload is {} bytes, over the task's cap of {max_payload}",
                    payload.len(),
                ),
            ));
        }
        // The tenant's current caps bound the deployed policy (lowering a
        // cap takes effect without a redeploy); the sandbox checks the
        // directory grants against them and refuses what does not fit.
        let sandbox_policy = match &record {
            Some(record) => {
                // A pool taken away after the deploy stops the task's jobs.
                if let Some(refusal) = record.limits.pool_refusal(&job.tenant, task.policy.pool) {
                    return dead(Failure::new(Category::Denied, refusal));
                }
                Cow::Owned(record.limits.clamp(task.policy.sandbox.clone()))
            }
            None => Cow::Borrowed(&task.policy.sandbox),
        };
        let mut retry = task.policy.retry.clone();
        if let Some(max) = envelope.max_attempts {
            retry.max_attempts = max;
        }
        let input = JobInput {
            id: job.id.clone(),
            task: envelope.task.clone(),
            tenant: job.tenant.clone(),
            attempt: job.attempt,
            max_attempts: retry.max_attempts,
            idempotency_key: envelope.idempotency_key.clone(),
            payload,
            lease_token: Some(job.token.clone()),
            lease: lease.clone(),
            max_value_ttl: record.as_ref().and_then(|r| r.limits.max_value_ttl),
            traceparent: traceparent.map(|t| t.to_string()),
            flow,
        };
        let backend = match self.backend(&job.tenant, record.as_deref()).await {
            Ok(backend) => backend,
            Err(e) => return not_run(self.host_retries.outcome(job, e)),
        };
        let outcome = self
            .catalog
            .sandbox()
            .run_capped(
                &prepared,
                &input,
                &sandbox_policy,
                record.as_ref().map(|t| &t.limits),
                Arc::new(backend),
                self.compute.as_deref(),
            )
            .await;
        if !outcome.log.is_empty() {
            tracing::debug!(job = %job.id, log = %outcome.log, "job log");
        }
        // A run that outlived its lease (this process froze past it, say)
        // records no verdict, even one it reached before it noticed: the
        // job was anyone's to run from the lapse on, so it goes back.
        let mut outcome = outcome;
        outcome.lease_lost |= !lease.held();
        let recorded = self.verdict(job, &task, envelope, &retry, &outcome);
        let log = log_tail(&outcome.log).to_string();
        (recorded, outcome.usage, outcome.denials, log)
    }

    /// What to record for a run that ended with `outcome`.
    fn verdict(
        &self,
        job: &Fetched,
        task: &DeployedTask,
        envelope: &Envelope,
        retry: &crate::policy::RetryPolicy,
        outcome: &JobOutcome,
    ) -> Outcome {
        // The delivery lost its lease (or the worker is stopping and took
        // it back): the job goes back to its queue without using anything,
        // unless another delivery already owns it (then this is refused).
        if outcome.lease_lost {
            return Outcome::Release;
        }
        // A rate-limited task told "slow down" by its upstream retries the
        // job (an attempt, at the policy's backoff without jitter) and holds
        // its whole lane back for that long (see `gates`).
        let rate_limited = task.policy.rate_limit.is_some()
            && matches!(&outcome.verdict, Verdict::Failed { failure, kind: Some(k) }
                if k == RATE_LIMITED_KIND && failure.category == Category::TaskError);
        let slowed;
        let retry = if rate_limited {
            let mut kinds = retry.auto_retry_kinds.clone();
            kinds.push(RATE_LIMITED_KIND.to_string());
            slowed = crate::policy::RetryPolicy {
                jitter: false,
                auto_retry_kinds: kinds,
                ..retry.clone()
            };
            &slowed
        } else {
            retry
        };
        let decision = decide(retry, job.attempt, outcome.verdict.clone());
        // A verdict a retry might fix: a retry, or the last attempt of one.
        let retryable = match &decision {
            Decision::Retry { .. } => true,
            Decision::Dead(f) => f.category == Category::RetryExhausted,
            Decision::Succeed(_) => false,
        };
        // Waiting for another job's step is not this task failing.
        if retryable && outcome.waiting_on_step {
            if let Verdict::Retry { message, delay } = &outcome.verdict {
                return Outcome::Wait {
                    // Never sooner than STEP_WAIT: a guest asking to be run
                    // again at once would spin on the step.
                    delay: delay.unwrap_or(STEP_WAIT).clamp(STEP_WAIT, MAX_DELAY),
                    error: Failure::new(Category::TaskError, message.clone()),
                };
            }
        }
        // A run that failed in a way a retry might fix, while the host was
        // failing it, failed because of the host: try again without using
        // an attempt (otherwise a Redis restart dead-letters jobs as
        // retry-exhausted). A verdict no retry can fix stands.
        if let (true, Some(fault)) = (retryable, &outcome.host_fault) {
            return self
                .host_retries
                .outcome(job, format!("the run met a host-side fault: {fault}"));
        }
        match decision {
            Decision::Succeed(result) => Outcome::Succeeded {
                result,
                store: envelope
                    .store_result
                    .unwrap_or(task.policy.store_result)
                    .then_some(task.policy.result_ttl),
                idempotency_ttl: task.policy.result_ttl,
            },
            Decision::Retry { delay, error } if rate_limited => Outcome::RateLimited {
                delay: if delay.is_zero() {
                    DEFAULT_RATE_LIMITED_HOLD
                } else {
                    delay.min(MAX_DELAY)
                },
                error,
            },
            Decision::Retry { delay, error } => Outcome::Retry {
                delay: delay.min(MAX_DELAY),
                error,
            },
            Decision::Dead(failure) => Outcome::Dead(failure),
        }
    }

    /// A workflow step's place in its flow, with the results of the steps
    /// it waited for (read when it starts: they were all written before
    /// it was released).
    async fn flow_input(&self, job: &Fetched, flow: &FlowRef) -> Result<FlowInput, String> {
        let dependencies = self
            .broker
            .flow_step_inputs(&job.tenant, flow)
            .await
            .map_err(|e| format!("reading the results its flow step waited for failed: {e:#}"))?;
        Ok(FlowInput {
            flow_id: flow.id.clone(),
            dependencies: dependencies
                .into_iter()
                .map(|(job_id, task, outcome)| DependencyInput {
                    job_id,
                    task,
                    outcome,
                })
                .collect(),
        })
    }

    /// The backend a job of `tenant` makes its host calls through.
    async fn backend(&self, tenant: &str, record: Option<&Tenant>) -> Result<RedisBackend, String> {
        let known = self
            .guest_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned();
        let conn = match known {
            Some(conn) => conn,
            None => {
                let conn = self.broker.new_connection().await.map_err(|e| {
                    format!("connecting to Redis for the guest's host calls: {e:#}")
                })?;
                self.guest_connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(tenant.to_string())
                    .or_insert(conn)
                    .clone()
            }
        };
        // Child enqueues go on the tenant's own connection too.
        let enqueuer: Arc<dyn ChildEnqueuer> = Arc::new(self.broker.on_connection(conn.clone()));
        let quota = record.map(|r| r.limits.store_quota()).unwrap_or_default();
        Ok(RedisBackend::new(conn)
            .with_enqueuer(enqueuer)
            .with_quota(quota))
    }
}

/// The last [`MAX_STORED_LOG_BYTES`] of `log` (cut at a character
/// boundary): what the job record keeps.
fn log_tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(MAX_STORED_LOG_BYTES);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_log_is_the_tail_cut_at_a_character() {
        assert_eq!(log_tail("short"), "short");
        let long = format!("{}é{}", "a".repeat(MAX_STORED_LOG_BYTES), "end");
        let tail = log_tail(&long);
        assert!(tail.len() <= MAX_STORED_LOG_BYTES && tail.ends_with("end"));
        let cut = "é".repeat(MAX_STORED_LOG_BYTES);
        assert!(log_tail(&cut).len() <= MAX_STORED_LOG_BYTES);
    }

    #[test]
    fn host_retries_back_off_to_a_cap_and_end() {
        let retries = HostRetries::default();
        let delays: Vec<u64> = (0..retries.max)
            .map(|n| retries.delay(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        let total: u64 = delays.iter().sum();
        assert!(
            (240..=400).contains(&total),
            "about five minutes: {total} s"
        );
        let job = |host_retries| Fetched {
            tenant: "t".into(),
            queue: "q".into(),
            id: "j".into(),
            envelope: String::new(),
            attempt: 1,
            token: "w:1".into(),
            host_retries,
            gate: String::new(),
        };
        assert!(matches!(
            retries.outcome(&job(0), "x".into()),
            Outcome::HostRetry { .. }
        ));
        match retries.outcome(&job(retries.max), "redis said OOM".into()) {
            Outcome::Dead(f) => {
                assert_eq!(f.category, Category::HostError);
                assert!(f.message.contains("redis said OOM"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
    }
}
