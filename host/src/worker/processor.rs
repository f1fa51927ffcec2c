//! One job's life: read its envelope, find its task and tenant in the
//! catalog, run it in a fresh sandbox under the tenant's current caps,
//! decide retry or dead-letter ([`crate::retry`]), and hand back the
//! outcome to record.
//!
//! A failure of the host (Redis unreachable, a component not fetchable,
//! a step held by another job) is retried without using one of the task's
//! attempts; a failure of the job is the task's.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::redis::{ChildEnqueuer, RedisBackend};
use crate::broker::envelope::Envelope;
use crate::broker::{now_ms, Broker, Completion, Fetched, Outcome};
use crate::failure::{Category, Failure};
use crate::retry::{decide, Decision};
use crate::sandbox::{ComputeThreads, JobInput, Verdict};
use crate::usage::Usage;

use super::catalog::Catalog;

/// Wait before re-running a job that failed because of the host.
const HOST_RETRY_DELAY: Duration = Duration::from_secs(1);

/// See the module docs.
pub struct Processor {
    broker: Broker,
    catalog: Arc<Catalog>,
    /// For an io pool: where its compute-bound jobs finish (see
    /// [`ComputeThreads`]).
    compute: Option<Arc<ComputeThreads>>,
}

impl Processor {
    /// A processor running jobs of `broker` with what `catalog` finds.
    pub fn new(
        broker: Broker,
        catalog: Arc<Catalog>,
        compute: Option<Arc<ComputeThreads>>,
    ) -> Self {
        Processor {
            broker,
            catalog,
            compute,
        }
    }

    /// Run `job` to an outcome.
    pub async fn process(&self, job: Arc<Fetched>) -> Completion {
        let (outcome, usage, idempotency_key, task) = match Envelope::parse(&job.envelope) {
            Err(reason) => {
                tracing::warn!(job = %job.id, %reason, "dead-lettering a malformed job");
                (
                    Outcome::Dead(Failure::new(Category::BadPayload, reason)),
                    Usage::default(),
                    None,
                    String::new(),
                )
            }
            Ok(envelope) => {
                let (outcome, usage) = self.run(&job, &envelope).await;
                (outcome, usage, envelope.idempotency_key, envelope.task)
            }
        };
        Completion {
            job,
            outcome,
            usage,
            idempotency_key,
            task,
        }
    }

    async fn run(&self, job: &Fetched, envelope: &Envelope) -> (Outcome, Usage) {
        let dead = |f: Failure| (Outcome::Dead(f), Usage::default());
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
                return (
                    retry_later(format!("looking up the task failed: {e:#}")),
                    Usage::default(),
                )
            }
        };
        let prepared = match self.catalog.prepared(&job.tenant, &task).await {
            Ok(p) => p,
            Err(f) if f.category == Category::InvalidComponent => return dead(f),
            Err(f) => return (retry_later(f.message), Usage::default()),
        };
        let payload = envelope.payload.to_string();
        if payload.len() > task.policy.max_payload_bytes {
            return dead(Failure::new(
                Category::BadPayload,
                format!(
                    "payload is {} bytes, over the task's cap of {}",
                    payload.len(),
                    task.policy.max_payload_bytes
                ),
            ));
        }
        // The tenant's current caps bound the deployed policy (lowering a
        // cap takes effect without a redeploy); the sandbox checks the
        // directory grants against them and refuses what does not fit.
        let (sandbox_policy, tenant) = match self.catalog.tenant(&job.tenant).await {
            Ok(Some(record)) => {
                // A pool taken away after the deploy stops the task's jobs.
                if let Some(refusal) = record.limits.pool_refusal(&job.tenant, task.policy.pool) {
                    return dead(Failure::new(Category::Denied, refusal));
                }
                let policy = Cow::Owned(record.limits.clamp(task.policy.sandbox.clone()));
                (policy, Some(record))
            }
            Ok(None) => (Cow::Borrowed(&task.policy.sandbox), None),
            Err(e) => {
                return (
                    retry_later(format!("reading the tenant's caps failed: {e:#}")),
                    Usage::default(),
                )
            }
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
        };
        let enqueuer: Arc<dyn ChildEnqueuer> = Arc::new(self.broker.clone());
        let backend = Arc::new(RedisBackend::new(self.broker.connection()).with_enqueuer(enqueuer));
        let outcome = self
            .catalog
            .sandbox()
            .run_capped(
                &prepared,
                &input,
                &sandbox_policy,
                tenant.as_ref().map(|t| &t.limits),
                backend,
                self.compute.as_deref(),
            )
            .await;
        if !outcome.log.is_empty() {
            tracing::debug!(job = %job.id, log = %outcome.log, "job log");
        }
        let store = envelope
            .store_result
            .unwrap_or(task.policy.store_result)
            .then_some(task.policy.result_ttl);
        // A run that failed while Redis was unavailable to its host calls,
        // or while a step it needs was held by another job, failed because
        // of the host: try again without using an attempt (otherwise a Redis
        // restart, or a duplicate job, dead-letters jobs as retry-exhausted).
        if let (Some(fault), false) = (
            &outcome.host_fault,
            matches!(outcome.verdict, Verdict::Succeeded { .. }),
        ) {
            return (
                retry_later(format!("the run met a host-side obstacle: {fault}")),
                outcome.usage,
            );
        }
        let recorded = match decide(&retry, job.attempt, outcome.verdict) {
            Decision::Succeed(result) => Outcome::Succeeded { result, store },
            Decision::Retry { delay, error } => Outcome::Retry {
                at_ms: now_ms() + delay.as_millis() as u64,
                error,
            },
            Decision::Dead(failure) => Outcome::Dead(failure),
        };
        (recorded, outcome.usage)
    }
}

/// A host-side problem (Redis, cache): try the job again shortly without
/// counting against the task.
fn retry_later(message: String) -> Outcome {
    tracing::warn!(%message, "host-side problem; job will be retried");
    Outcome::HostRetry {
        at_ms: now_ms() + HOST_RETRY_DELAY.as_millis() as u64,
        error: Failure::new(Category::TaskError, message),
    }
}
