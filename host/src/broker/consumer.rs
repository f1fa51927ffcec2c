//! The worker side of the broker: fetch with leases, renew leases, record
//! outcomes. Each call is one script, so one round trip.

use std::sync::Arc;
use std::time::Duration;

use super::{scripts, Broker};
use crate::failure::{Category, Failure};
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
    /// 1-based attempt number: runs of this job that ended in a verdict,
    /// plus one. A delivery whose worker died does not count.
    pub attempt: u32,
    /// This delivery's lease token.
    pub token: String,
    /// Times the host has already retried this job for its own faults.
    pub host_retries: u32,
    /// The record's `gate` field as the fetch read it ('' for none): the
    /// worker checks it against the task's deployed policy (see
    /// [`crate::gates::required_gate`]).
    pub gate: String,
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
        /// How long the job's idempotency key (if any) keeps deduplicating
        /// from now.
        idempotency_ttl: Duration,
    },
    /// Run again after `delay` (counted against the task's attempts).
    Retry {
        /// Wait from the moment the outcome is recorded (Redis time).
        delay: Duration,
        /// What this attempt ended with.
        error: Failure,
    },
    /// [`Outcome::Retry`] of a rate-limited task whose guest reported
    /// `rate-limited` (an upstream said "slow down"): the task's whole
    /// rate lane also waits `delay` before its next job starts.
    RateLimited {
        /// Wait from the moment the outcome is recorded (Redis time).
        delay: Duration,
        /// What this attempt ended with.
        error: Failure,
    },
    /// Run again after `delay` without counting this attempt against the
    /// task: the host failed (Redis unavailable mid-run, component not
    /// fetchable), not the task. Counted in the job's host retries.
    HostRetry {
        /// Wait from the moment the outcome is recorded (Redis time).
        delay: Duration,
        /// What went wrong.
        error: Failure,
    },
    /// Run again after `delay`, using neither an attempt nor a host retry:
    /// the run waited for another job's step (which ends when that job
    /// completes or its claim lapses).
    Wait {
        /// Wait from the moment the outcome is recorded (Redis time).
        delay: Duration,
        /// Why it waits.
        error: Failure,
    },
    /// Dead-letter with this failure.
    Dead(Failure),
    /// Not run to the end (shutdown): back on the queue, attempt not counted.
    Release,
    /// Not run: the job's record carries a gate that would not enforce its
    /// task's policy (a hand-written enqueue left it out). Back on the
    /// queue with this gate ('' for none), neither an attempt nor a
    /// delivery counted, so the next fetch passes it through the right
    /// lanes.
    Regate {
        /// The gate field the policy requires.
        gate: String,
    },
}

/// Whether an outcome was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now.
    Now,
    /// This delivery's outcome had been recorded already (a retried batch
    /// whose first reply was lost): nothing was written twice.
    Before,
    /// The caller no longer holds the job's lease; the outcome was dropped
    /// (the job belongs to the delivery that holds it now).
    Stale,
}

impl Recorded {
    /// True when the job's outcome is in Redis (now or before).
    pub fn is_recorded(self) -> bool {
        matches!(self, Recorded::Now | Recorded::Before)
    }
}

/// Who fetches, and on what terms.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTerms<'a> {
    /// The worker's id (in lease tokens and history).
    pub worker: &'a str,
    /// How long a lease lasts unless renewed.
    pub lease: Duration,
    /// Lost deliveries after which a job is dead-lettered as poison, for
    /// jobs that do not carry their task's own limit.
    pub max_deliveries: u32,
    /// The tenant's cap on its jobs leased across all workers, if any.
    pub cluster_cap: Option<u32>,
    /// The tenant's rate limit (all its tasks together), if any.
    pub rate_limit: Option<crate::gates::RateLimit>,
}

/// Refusals a job's record keeps (the first ones; the count is in its
/// usage).
const MAX_DENIALS_KEPT: usize = 10;

/// The first [`MAX_DENIALS_KEPT`] refusals as a JSON list, or '' for none.
fn denials_json(denials: &[String]) -> String {
    if denials.is_empty() {
        return String::new();
    }
    let kept = &denials[..denials.len().min(MAX_DENIALS_KEPT)];
    serde_json::to_string(kept).unwrap_or_default()
}

/// Memory held over time, the way a platform bills it: peak bytes times
/// seconds of wall time.
fn byte_seconds(u: &Usage) -> u64 {
    (u.peak_memory_bytes as u128 * u.wall_time_us as u128 / 1_000_000) as u64
}

/// Milliseconds of `d`, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
        Ok(self.fetch_round(tenant, queue, n, terms).await?.jobs)
    }

    /// [`Broker::fetch`], also telling which tasks' jobs the round
    /// dead-lettered as poison (for the worker's metrics).
    pub async fn fetch_round(
        &self,
        tenant: &str,
        queue: &str,
        n: usize,
        terms: LeaseTerms<'_>,
    ) -> redis::RedisResult<FetchReply> {
        let keys = Keys::new(tenant);
        let flat: Vec<redis::Value> = scripts::FETCH
            .key(keys.ready(queue))
            .key(keys.delayed(queue))
            .key(keys.leased(queue))
            .key(keys.dead())
            .key(keys.inflight())
            .key(keys.idempotency_index())
            .key(keys.paused())
            .key(keys.dead_by_queue())
            .key(keys.gates())
            .key(keys.lanes(queue))
            .arg(keys.prefix())
            .arg(n)
            .arg(ms(terms.lease))
            .arg(terms.worker)
            .arg(terms.max_deliveries)
            .arg(terms.cluster_cap.unwrap_or(0))
            .arg(ms(FINISHED_RETENTION))
            .arg(queue)
            .arg(terms.rate_limit.map(|r| r.to_redis()).unwrap_or_default())
            .invoke_async(&mut self.connection())
            .await?;
        // Job records are written by producers too: a field that does not
        // read as what it should is its default, never the batch's end (the
        // jobs of the batch are leased already).
        let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).unwrap_or_default();
        let number = |v: &redis::Value, default: u32| {
            redis::from_redis_value_ref::<u32>(v).unwrap_or(default)
        };
        // Last the wait until a lane opens (-1: none), before it the
        // poisoned count, before that the poisoned tasks.
        let (wake_in, flat) = match flat.split_last() {
            Some((last, rest)) => (redis::from_redis_value_ref::<i64>(last).unwrap_or(-1), rest),
            None => (-1, &flat[..]),
        };
        let poisoned = flat.last().map_or(0, |v| number(v, 0) as usize);
        let (leased, poisoned) =
            flat[..flat.len().saturating_sub(1)].split_at(flat.len().saturating_sub(1 + poisoned));
        let mut out = Vec::with_capacity(leased.len() / 6);
        for chunk in leased.chunks_exact(6) {
            out.push(Fetched {
                tenant: tenant.to_string(),
                queue: queue.to_string(),
                id: text(&chunk[0]),
                envelope: text(&chunk[1]),
                attempt: number(&chunk[2], 1),
                token: text(&chunk[3]),
                host_retries: number(&chunk[4], 0),
                gate: text(&chunk[5]),
            });
        }
        Ok(FetchReply {
            jobs: out,
            poisoned: poisoned.iter().map(text).collect(),
            wake_in: u64::try_from(wake_in).ok().map(Duration::from_millis),
        })
    }

    /// Extend the leases of `jobs` (id, token) on `queue` to `lease` from
    /// now (Redis time); the ids whose lease the caller no longer holds.
    pub async fn renew(
        &self,
        tenant: &str,
        queue: &str,
        lease: Duration,
        jobs: &[(String, String)],
    ) -> redis::RedisResult<Vec<String>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Keys::new(tenant);
        let mut call = scripts::RENEW.key(keys.leased(queue));
        call.key(keys.inflight());
        call.arg(keys.prefix()).arg(ms(lease));
        for (id, token) in jobs {
            call.arg(id).arg(token);
        }
        call.invoke_async(&mut self.connection()).await
    }

    /// Record the outcome of one delivery.
    pub async fn complete(
        &self,
        job: &Arc<Fetched>,
        outcome: &Outcome,
        usage: &Usage,
    ) -> redis::RedisResult<Recorded> {
        let record = Completion {
            job: job.clone(),
            outcome: outcome.clone(),
            usage: *usage,
            denials: Vec::new(),
            idempotency_key: None,
            task: String::new(),
            enqueued_at_ms: 0,
            log: String::new(),
        };
        Ok(self.complete_many(&[&record]).await?[0])
    }

    /// Record many outcomes of one tenant in one round trip; one answer per
    /// completion. Safe to call again with the same completions (a reply
    /// lost on the way back): each is recorded, and its usage counted,
    /// once.
    pub async fn complete_many(
        &self,
        completions: &[&Completion],
    ) -> redis::RedisResult<Vec<Recorded>> {
        let Some(first) = completions.first() else {
            return Ok(Vec::new());
        };
        let keys = Keys::new(&first.job.tenant);
        let mut call = scripts::COMPLETE.prepare_invoke();
        call.key(keys.usage())
            .key(keys.dead())
            .key(keys.idempotency_index())
            .key(keys.succeeded())
            .key(keys.dead_by_queue())
            .key(keys.gates())
            .arg(keys.prefix())
            .arg(ms(FINISHED_RETENTION));
        // The batch's usage, summed here so the script adds it once; it
        // takes back the runs of jobs it does not record now.
        let ran: Vec<&Usage> = completions
            .iter()
            .map(|c| &c.usage)
            .filter(|u| u.wall_time_us > 0)
            .collect();
        let sum = |f: fn(&Usage) -> u64| -> u64 { ran.iter().map(|u| f(u)).sum() };
        call.arg(ran.len())
            .arg(sum(|u| u.fuel))
            .arg(sum(|u| u.wall_time_us))
            .arg(sum(|u| u.run_time_us))
            .arg(sum(byte_seconds))
            .arg(sum(|u| u.net_out_bytes))
            .arg(sum(|u| u.net_in_bytes))
            .arg(sum(|u| u.denied))
            .arg(sum(|u| u.db_time_us))
            .arg(sum(|u| u.db_rows));
        // Each (queue, task) once; jobs name theirs by number.
        let mut groups: Vec<(&str, &str)> = Vec::new();
        let group_of: Vec<usize> = completions
            .iter()
            .map(|c| {
                let key = (c.job.queue.as_str(), c.known_task().unwrap_or(""));
                match groups.iter().position(|g| *g == key) {
                    Some(i) => i + 1,
                    None => {
                        groups.push(key);
                        groups.len()
                    }
                }
            })
            .collect();
        call.arg(groups.len());
        for (queue, task) in &groups {
            call.arg(*queue).arg(*task);
        }
        for (c, group) in completions.iter().zip(group_of) {
            debug_assert_eq!(c.job.tenant, first.job.tenant, "one tenant per batch");
            let error_json = |e: &Failure| serde_json::to_string(e).unwrap_or_default();
            let (name, result, store, idem_ttl, delay, error) = match &c.outcome {
                Outcome::Succeeded {
                    result,
                    store,
                    idempotency_ttl,
                } => (
                    "succeeded",
                    result.as_str(),
                    store.map_or(0, ms),
                    ms(*idempotency_ttl).max(1),
                    0,
                    String::new(),
                ),
                Outcome::Retry { delay, error } => {
                    ("retry", "", 0, 0, ms(*delay), error_json(error))
                }
                Outcome::RateLimited { delay, error } => {
                    ("rate-limited", "", 0, 0, ms(*delay), error_json(error))
                }
                Outcome::HostRetry { delay, error } => {
                    ("host-retry", "", 0, 0, ms(*delay), error_json(error))
                }
                Outcome::Wait { delay, error } => ("wait", "", 0, 0, ms(*delay), error_json(error)),
                Outcome::Dead(error) => ("dead", "", 0, 0, 0, error_json(error)),
                Outcome::Release => ("release", "", 0, 0, 0, String::new()),
                Outcome::Regate { gate } => ("regate", gate.as_str(), 0, 0, 0, String::new()),
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
                .arg(store)
                .arg(idem)
                .arg(idem_ttl)
                .arg(delay)
                .arg(error)
                .arg(serde_json::to_string(&c.usage).unwrap_or_default())
                .arg(denials_json(&c.denials))
                .arg(group)
                .arg(&c.log);
        }
        let answers: Vec<String> = call.invoke_async(&mut self.connection()).await?;
        Ok(answers
            .iter()
            .map(|a| match a.as_str() {
                "ok" => Recorded::Now,
                "recorded" => Recorded::Before,
                _ => Recorded::Stale,
            })
            .collect())
    }
}

impl Outcome {
    /// A short name for logs and spans: the failure category of a dead
    /// job, else what happens next.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Dead(f) => f.category.as_str(),
            Outcome::Retry { .. } => "retry",
            Outcome::RateLimited { .. } => "rate-limited",
            Outcome::HostRetry { .. } => "host-retry",
            Outcome::Wait { .. } => "waiting",
            Outcome::Release => "released",
            Outcome::Regate { .. } => "regated",
        }
    }
}

impl Completion {
    /// The task, if the job named one that was found: counts by task (the
    /// per-minute stats, metric labels) never take a name from a job whose
    /// task is unknown or whose envelope is bad, so a producer cannot
    /// create a count per made-up name.
    pub fn known_task(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Dead(f)
                if matches!(f.category, Category::UnknownTask | Category::BadPayload) =>
            {
                None
            }
            _ => Some(self.task.as_str()).filter(|t| !t.is_empty()),
        }
    }
}

/// What one fetch script call did.
#[derive(Debug, Default)]
pub struct FetchReply {
    /// The jobs leased.
    pub jobs: Vec<Fetched>,
    /// The task of each job it dead-lettered as poison (its lease lapsed
    /// on `max_deliveries` deliveries), as its envelope names it (`""`
    /// when unreadable).
    pub poisoned: Vec<String>,
    /// When nothing was leased: how soon a rate limit or concurrency key
    /// holding jobs back may let one through (`None`: nothing waits), so
    /// an idle worker looks again then rather than at its idle timeout.
    pub wake_in: Option<Duration>,
}

/// One outcome to record, for [`Broker::complete_many`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// The delivery (shared with the worker's held jobs: the envelope is
    /// not copied per job).
    pub job: Arc<Fetched>,
    /// What happened.
    pub outcome: Outcome,
    /// What it cost.
    pub usage: Usage,
    /// Capabilities the run was refused (kept in the job's record, so a
    /// guest that swallowed a refusal still shows it).
    pub denials: Vec<String>,
    /// The job's idempotency key, if any (its TTL restarts at a success).
    pub idempotency_key: Option<String>,
    /// The job's task name (scopes the idempotency key).
    pub task: String,
    /// When the producer enqueued it (its clock, unix ms; 0 unknown), for
    /// the end-to-end latency metric.
    pub enqueued_at_ms: u64,
    /// The tail of the run's log to keep in the job record (at most
    /// [`crate::limits::MAX_STORED_LOG_BYTES`]; empty: none, and a
    /// previous run's is removed).
    pub log: String,
}
