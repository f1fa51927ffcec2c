//! The worker side of the broker: fetch with leases, renew leases, record
//! outcomes. Each call is one script, so one round trip.

use std::sync::Arc;
use std::time::Duration;

use super::{now_ms, scripts, Broker};
use crate::failure::Failure;
use crate::keys::Keys;
use crate::usage::Usage;

/// How long a finished job's record and history are kept.
pub const FINISHED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A job handed to this worker.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Tenant.
    pub tenant: String,
    /// Queue it came from.
    pub queue: String,
    /// Job id.
    pub id: String,
    /// The raw envelope (parsed by the worker, which dead-letters bad ones).
    pub envelope: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// This delivery's lease token.
    pub token: String,
}

/// What to record for a job.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Finished; store the result for `store` if given.
    Succeeded {
        /// Result JSON.
        result: String,
        /// Keep the result this long; `None` ignores it.
        store: Option<Duration>,
    },
    /// Run again at `at_ms`.
    Retry {
        /// Unix ms when the job is due again.
        at_ms: u64,
        /// What this attempt ended with.
        error: Failure,
    },
    /// Run again at `at_ms` without counting this attempt against the task:
    /// the host failed (Redis unavailable mid-run, component not fetchable),
    /// not the task.
    HostRetry {
        /// Unix ms when the job is due again.
        at_ms: u64,
        /// What went wrong.
        error: Failure,
    },
    /// Dead-letter with this failure.
    Dead(Failure),
    /// Not run to the end (shutdown): back on the queue, attempt not counted.
    Release,
}

/// Who fetches, and on what terms.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTerms<'a> {
    /// The worker's id (in lease tokens and history).
    pub worker: &'a str,
    /// How long a lease lasts unless renewed.
    pub lease: Duration,
    /// Deliveries after which a job that never finishes is dead-lettered.
    pub max_deliveries: u32,
    /// The tenant's cap on its jobs leased across all workers, if any.
    pub cluster_cap: Option<u32>,
}

impl Broker {
    /// Lease up to `n` jobs of `tenant`'s `queue`; with a cluster cap, never
    /// so many that more than that many of the tenant's jobs are leased
    /// across all workers.
    pub async fn fetch(
        &self,
        tenant: &str,
        queue: &str,
        n: usize,
        terms: LeaseTerms<'_>,
    ) -> redis::RedisResult<Vec<Fetched>> {
        let keys = Keys::new(tenant);
        let flat: Vec<redis::Value> = scripts::FETCH
            .key(keys.ready(queue))
            .key(keys.delayed(queue))
            .key(keys.leased(queue))
            .key(keys.dead())
            .key(keys.inflight())
            .arg(keys.prefix())
            .arg(now_ms())
            .arg(n)
            .arg(terms.lease.as_millis() as u64)
            .arg(terms.worker)
            .arg(terms.max_deliveries)
            .arg(terms.cluster_cap.unwrap_or(0))
            .arg(FINISHED_RETENTION.as_millis() as u64)
            .invoke_async(&mut self.connection())
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 4);
        for chunk in flat.chunks_exact(4) {
            out.push(Fetched {
                tenant: tenant.to_string(),
                queue: queue.to_string(),
                id: redis::from_redis_value_ref(&chunk[0])?,
                envelope: redis::from_redis_value_ref(&chunk[1])?,
                attempt: redis::from_redis_value_ref(&chunk[2])?,
                token: redis::from_redis_value_ref(&chunk[3])?,
            });
        }
        Ok(out)
    }

    /// Extend the leases of `jobs` (id, token) on `queue`; how many still
    /// belonged to us.
    pub async fn renew(
        &self,
        tenant: &str,
        queue: &str,
        lease: Duration,
        jobs: &[(String, String)],
    ) -> redis::RedisResult<usize> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let keys = Keys::new(tenant);
        let mut call = scripts::RENEW.key(keys.leased(queue));
        call.key(keys.inflight());
        call.arg(keys.prefix())
            .arg(now_ms() + lease.as_millis() as u64);
        for (id, token) in jobs {
            call.arg(id).arg(token);
        }
        call.invoke_async(&mut self.connection()).await
    }

    /// Record the outcome of a delivery. False when the lease was lost (the
    /// job was redelivered to someone else, whose outcome counts).
    pub async fn complete(
        &self,
        job: &Arc<Fetched>,
        outcome: &Outcome,
        usage: &Usage,
        idempotency_key: Option<&str>,
        task: &str,
    ) -> redis::RedisResult<bool> {
        let record = Completion {
            job: job.clone(),
            outcome: outcome.clone(),
            usage: *usage,
            idempotency_key: idempotency_key.map(String::from),
            task: task.to_string(),
        };
        Ok(self.complete_many(&[&record]).await?[0])
    }

    /// Record many outcomes of one tenant in one round trip; one flag per
    /// completion, false where the lease was lost.
    pub async fn complete_many(
        &self,
        completions: &[&Completion],
    ) -> redis::RedisResult<Vec<bool>> {
        let Some(first) = completions.first() else {
            return Ok(Vec::new());
        };
        let keys = Keys::new(&first.job.tenant);
        let mut call = scripts::COMPLETE.prepare_invoke();
        // Usage of runs that ran a sandbox (a release or a host retry before
        // the guest started has none); summed here so Redis writes once.
        let ran: Vec<&Usage> = completions
            .iter()
            .map(|c| &c.usage)
            .filter(|u| u.wall_time_us > 0)
            .collect();
        let fuel: u64 = ran.iter().map(|u| u.fuel).sum();
        let wall: u64 = ran.iter().map(|u| u.wall_time_us).sum();
        let run_time: u64 = ran.iter().map(|u| u.run_time_us).sum();
        // Memory held over time, the way a platform bills it.
        let byte_seconds: u64 = ran
            .iter()
            .map(|u| (u.peak_memory_bytes as u128 * u.wall_time_us as u128 / 1_000_000) as u64)
            .sum();
        let net_out: u64 = ran.iter().map(|u| u.net_out_bytes).sum();
        let net_in: u64 = ran.iter().map(|u| u.net_in_bytes).sum();
        call.arg(keys.prefix())
            .arg(now_ms())
            .arg(FINISHED_RETENTION.as_millis() as u64)
            .arg(ran.len())
            .arg(fuel)
            .arg(wall)
            .arg(byte_seconds)
            .arg(net_out)
            .arg(net_in)
            .arg(run_time);
        for c in completions {
            debug_assert_eq!(c.job.tenant, first.job.tenant, "one tenant per batch");
            let (name, result, ttl, retry_at, error) = match &c.outcome {
                Outcome::Succeeded { result, store } => (
                    "succeeded",
                    result.as_str(),
                    store.map_or(0, |d| d.as_millis() as u64),
                    0,
                    String::new(),
                ),
                Outcome::Retry { at_ms, error } => (
                    "retry",
                    "",
                    0,
                    *at_ms,
                    serde_json::to_string(error).unwrap_or_default(),
                ),
                Outcome::HostRetry { at_ms, error } => (
                    "host-retry",
                    "",
                    0,
                    *at_ms,
                    serde_json::to_string(error).unwrap_or_default(),
                ),
                Outcome::Dead(error) => (
                    "dead",
                    "",
                    0,
                    0,
                    serde_json::to_string(error).unwrap_or_default(),
                ),
                Outcome::Release => ("release", "", 0, 0, String::new()),
            };
            let idem = c
                .idempotency_key
                .as_deref()
                .map(|k| keys.idempotency(&c.task, k))
                .unwrap_or_default();
            call.arg(&c.job.id)
                .arg(&c.job.queue)
                .arg(&c.job.token)
                .arg(name)
                .arg(result)
                .arg(ttl)
                .arg(retry_at)
                .arg(error)
                .arg(serde_json::to_string(&c.usage).unwrap_or_default())
                .arg(idem);
        }
        let answers: Vec<String> = call.invoke_async(&mut self.connection()).await?;
        Ok(answers.iter().map(|a| a == "ok").collect())
    }
}

/// One outcome to record, for [`Broker::complete_many`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// The delivery (shared with the worker's in-flight table: the envelope
    /// is not copied per job).
    pub job: Arc<Fetched>,
    /// What happened.
    pub outcome: Outcome,
    /// What it cost.
    pub usage: Usage,
    /// The job's idempotency key (released if the job is dead-lettered).
    pub idempotency_key: Option<String>,
    /// The job's task name (scopes the idempotency key).
    pub task: String,
}
