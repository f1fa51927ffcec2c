//! A worker: pulls jobs from Redis and runs each in a fresh sandbox.
//!
//! Responsibilities, in order of a job's life:
//! - fetch in batches, never more than there are free slots (no prefetch
//!   starvation), rotating over the queues so none starves;
//! - keep a lease on every job it holds and renew it while the job runs, so
//!   a long job is not redelivered, and a dead worker's jobs are;
//! - run the job, decide retry or dead-letter ([`crate::retry`]), and record
//!   the outcome, which acknowledges the job;
//! - on shutdown, stop fetching, let running jobs finish within the drain
//!   timeout, then hand the rest back to their queues.
//!
//! Redis outages are survived: every Redis error backs off and tries again
//! (the connection manager reconnects); a job whose outcome cannot be
//! recorded is redelivered when its lease lapses (at-least-once).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::backend::redis::{ChildEnqueuer, RedisBackend};
use crate::backend::{BackendError, BackendResult, ChildJob};
use crate::broker::envelope::Envelope;
use crate::broker::{
    now_ms, Broker, Completion, DeployedTask, EnqueueRequest, Fetched, LeaseTerms, Outcome,
};
use crate::failure::{Category, Failure};
use crate::keys::Keys;
use crate::retry::{decide, Decision};
use crate::sandbox::{ComputeThreads, JobInput, PreparedTask, Sandbox, Verdict};
use crate::tenants::Tenant;
use crate::ttl_cache::TtlCache;
use crate::usage::Usage;

/// How long a worker's claim on a job lasts without renewal. Renewed every
/// third of it, so two missed renewals in a row are survived.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Deliveries after which a job that never finishes is dead-lettered.
pub const MAX_DELIVERIES: u32 = 10;
/// Wait before re-running a job that failed because of the host.
const HOST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Most outcomes recorded in one round trip.
const COMPLETE_BATCH: usize = 256;
/// Longest a busy worker waits for more free slots before fetching.
const FETCH_GATHER: Duration = Duration::from_millis(1);
/// Most jobs fetched in one round trip.
const FETCH_BATCH: usize = 256;
/// How long an idle worker blocks waiting for a wake-up before it looks
/// again (delayed jobs coming due and expired leases are found by looking).
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// How long a deployed task's record is trusted before it is read again (a
/// redeploy reaches workers within this).
const TASK_CACHE_TTL: Duration = Duration::from_secs(1);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Tenants whose queues it serves (their queues of these names), in
    /// rotation.
    pub tenants: Vec<String>,
    /// Queues, in rotation.
    pub queues: Vec<String>,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// How long shutdown waits for running jobs.
    pub drain_timeout: Duration,
    /// This worker's id (appears in leases and history).
    pub id: String,
    /// For an io pool: the threads its jobs move to once they compute past
    /// their burst (shared by every io pool of the process). `None` for a
    /// cpu pool, whose threads are there to compute.
    pub compute: Option<Arc<ComputeThreads>>,
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Jobs whose outcome was recorded.
    pub completed: u64,
    /// Jobs handed back at shutdown.
    pub released: u64,
}

/// See the module docs.
pub struct Worker {
    broker: Broker,
    sandbox: Arc<Sandbox>,
    config: WorkerConfig,
    /// Deployed tasks by (tenant, name).
    tasks: TtlCache<(String, String), Arc<DeployedTask>>,
    /// Tenant records (caps) by name; `None` for a tenant without one.
    tenant_records: TtlCache<String, Option<Arc<Tenant>>>,
    in_flight: Mutex<HashMap<String, Arc<Fetched>>>,
    completed: std::sync::atomic::AtomicU64,
    /// Outcomes waiting for [`Worker::record_batches`].
    completions: mpsc::UnboundedSender<PendingCompletion>,
    /// Its receiving end, taken by `run`.
    completion_queue: Mutex<Option<mpsc::UnboundedReceiver<PendingCompletion>>>,
}

/// An outcome to record and where to send whether it was recorded.
type PendingCompletion = (Arc<Completion>, oneshot::Sender<Result<bool, String>>);

impl Worker {
    /// A worker on `broker` running jobs in `sandbox`.
    pub fn new(broker: Broker, sandbox: Arc<Sandbox>, config: WorkerConfig) -> Arc<Self> {
        let (completions, completion_queue) = mpsc::unbounded_channel();
        Arc::new(Worker {
            broker,
            sandbox,
            config,
            tasks: TtlCache::new(TASK_CACHE_TTL),
            tenant_records: TtlCache::new(TASK_CACHE_TTL),
            in_flight: Mutex::new(HashMap::new()),
            completions,
            completion_queue: Mutex::new(Some(completion_queue)),
            completed: Default::default(),
        })
    }

    /// Jobs whose outcome this worker has recorded so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run until `shutdown` resolves, then drain.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> WorkerStats {
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let records = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let renewer = tokio::spawn(self.clone().renew_leases());
        let queue = self
            .completion_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let recorder = queue.map(|q| tokio::spawn(Self::record_batches(self.broker.clone(), q)));
        tokio::pin!(shutdown);
        let mut next_queue = 0;
        let mut backoff = Duration::from_millis(50);
        loop {
            // Wait for a free slot (or shutdown). `biased`: shutdown is
            // checked first; unbiased, select! picks a ready branch at
            // random, so a worker with free slots fetched another batch
            // after SIGTERM about half the time.
            let free = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => {
                    drop(permit.expect("semaphore is never closed"));
                    slots.available_permits()
                }
            };
            // Under load, a slot frees every few microseconds; fetching one
            // job per round trip would spend Redis on script overhead. When
            // jobs are running, give more slots up to FETCH_GATHER to free
            // so the next fetch is a batch. An idle worker fetches at once.
            let watermark = (self.config.concurrency / 4).clamp(1, FETCH_BATCH);
            let free = if free < watermark && free < self.config.concurrency {
                let gathered =
                    tokio::time::timeout(FETCH_GATHER, slots.acquire_many(watermark as u32)).await;
                drop(gathered);
                slots.available_permits()
            } else {
                free
            };
            let fetched = match self.fetch_round(&mut next_queue, free).await {
                Ok(jobs) => {
                    backoff = Duration::from_millis(50);
                    jobs
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "fetching jobs failed; retrying");
                    tokio::select! { _ = &mut shutdown => break, _ = tokio::time::sleep(backoff) => {} }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if fetched.is_empty() {
                tokio::select! { _ = &mut shutdown => break, _ = self.wait_for_work() => {} }
                continue;
            }
            for job in fetched {
                let job = Arc::new(job);
                let permit = slots
                    .clone()
                    .try_acquire_owned()
                    .expect("fetched no more jobs than free slots");
                self.lock_in_flight().insert(job.id.clone(), job.clone());
                let (worker, records) = (self.clone(), records.clone());
                tokio::spawn(async move { worker.process(job, permit, records).await });
            }
        }
        let released = self.drain(&slots, &records).await;
        renewer.abort();
        if let Some(recorder) = recorder {
            recorder.abort();
        }
        WorkerStats {
            completed: self.completed.load(std::sync::atomic::Ordering::Relaxed),
            released,
        }
    }

    /// Fetch up to `free` jobs, starting at the next queue in rotation.
    async fn fetch_round(
        &self,
        next_queue: &mut usize,
        free: usize,
    ) -> redis::RedisResult<Vec<Fetched>> {
        // Every (tenant, queue) pair in turn, starting one further each
        // round: no queue and no tenant starves, and a tenant flooding a
        // queue gets its turn like any other, not the whole worker.
        let pairs: Vec<(&String, &String)> = self
            .config
            .tenants
            .iter()
            .flat_map(|t| self.config.queues.iter().map(move |q| (t, q)))
            .collect();
        let mut out: Vec<Fetched> = Vec::new();
        for i in 0..pairs.len() {
            let (tenant, queue) = pairs[(*next_queue + i) % pairs.len()];
            let mut want = free.saturating_sub(out.len()).min(FETCH_BATCH);
            if want == 0 {
                break;
            }
            // Without a record (or while it cannot be read) a tenant is
            // uncapped: a fetch must not wait for that.
            let record = self.tenant_record(tenant).await.ok().flatten();
            let caps = record.as_ref().map(|t| &t.limits);
            if let Some(cap) = caps.and_then(|c| c.max_concurrency) {
                let cap = cap as usize;
                let busy = self
                    .lock_in_flight()
                    .values()
                    .filter(|j| &j.tenant == tenant)
                    .count()
                    + out.iter().filter(|j| &j.tenant == tenant).count();
                want = want.min(cap.saturating_sub(busy));
                if want == 0 {
                    continue;
                }
            }
            out.extend(
                self.broker
                    .fetch(
                        tenant,
                        queue,
                        want,
                        LeaseTerms {
                            worker: &self.config.id,
                            lease: self.config.lease,
                            max_deliveries: MAX_DELIVERIES,
                            cluster_cap: caps.and_then(|c| c.max_cluster_concurrency),
                        },
                    )
                    .await?,
            );
        }
        *next_queue = (*next_queue + 1) % pairs.len().max(1);
        Ok(out)
    }

    /// Block until a producer signals one of our queues, or a short timeout.
    async fn wait_for_work(&self) {
        let signals: Vec<String> = self
            .config
            .tenants
            .iter()
            .flat_map(|t| {
                let keys = Keys::new(t);
                self.config.queues.iter().map(move |q| keys.signal(q))
            })
            .collect();
        match self.broker.blocking_connection(IDLE_WAIT).await {
            Ok(mut conn) => {
                let _: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
                    .arg(&signals)
                    .arg(IDLE_WAIT.as_secs_f64())
                    .query_async(&mut conn)
                    .await;
            }
            Err(_) => tokio::time::sleep(IDLE_WAIT).await,
        }
    }

    /// Renew every held lease every third of the lease.
    async fn renew_leases(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.lease / 3);
        loop {
            tick.tick().await;
            let mut by_queue: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
            for job in self.lock_in_flight().values() {
                by_queue
                    .entry((job.tenant.clone(), job.queue.clone()))
                    .or_default()
                    .push((job.id.clone(), job.token.clone()));
            }
            for ((tenant, queue), jobs) in by_queue {
                if let Err(e) = self
                    .broker
                    .renew(&tenant, &queue, self.config.lease, &jobs)
                    .await
                {
                    tracing::warn!(error = %e, %tenant, %queue, "renewing leases failed; will retry");
                }
            }
        }
    }

    /// Wait for running jobs up to the drain timeout; release the rest.
    async fn drain(&self, slots: &Arc<Semaphore>, records: &Arc<Semaphore>) -> u64 {
        let all = self.config.concurrency.max(1) as u32;
        let finished = tokio::time::timeout(self.config.drain_timeout, async {
            let running = slots.acquire_many(all).await;
            let recording = records.acquire_many(all).await;
            (running, recording)
        })
        .await;
        if finished.is_ok() {
            return 0;
        }
        let left: Vec<Arc<Fetched>> = self.lock_in_flight().drain().map(|(_, j)| j).collect();
        let mut released = 0;
        for job in &left {
            match self
                .broker
                .complete(job, &Outcome::Release, &Usage::default(), None, "")
                .await
            {
                Ok(true) => released += 1,
                Ok(false) => {}
                // Its lease will lapse and it will be redelivered.
                Err(e) => {
                    tracing::warn!(error = %e, job = %job.id, "could not release job; its lease will expire")
                }
            }
        }
        released
    }

    /// One job's life: parse, look up, run, decide, record.
    async fn process(
        self: &Arc<Self>,
        job: Arc<Fetched>,
        slot: OwnedSemaphorePermit,
        records: Arc<Semaphore>,
    ) {
        let (outcome, usage, idem, task_name) = match Envelope::parse(&job.envelope) {
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
                let (outcome, usage) = self.run_job(&job, &envelope).await;
                (outcome, usage, envelope.idempotency_key, envelope.task)
            }
        };
        // The sandbox is done: free its slot for the next job while the
        // outcome is recorded, holding a recording permit instead (which
        // bounds outcomes waiting for Redis, and which drain waits for).
        let recording = records
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        drop(slot);
        self.record(&job, outcome, usage, idem, task_name).await;
        self.lock_in_flight().remove(&job.id);
        drop(recording);
    }

    async fn run_job(self: &Arc<Self>, job: &Fetched, envelope: &Envelope) -> (Outcome, Usage) {
        let dead = |f: Failure| (Outcome::Dead(f), Usage::default());
        let task = match self.deployed(&job.tenant, &envelope.task).await {
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
                    self.retry_later(format!("looking up the task failed: {e:#}")),
                    Usage::default(),
                )
            }
        };
        let prepared = match self.prepared(&job.tenant, &task).await {
            Ok(p) => p,
            Err(f) if f.category == Category::InvalidComponent => return dead(f),
            Err(f) => return (self.retry_later(f.message), Usage::default()),
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
        // cap takes effect without a redeploy).
        let sandbox_policy = match self.tenant_record(&job.tenant).await {
            Ok(Some(record)) => {
                // A pool taken away after the deploy stops the task's jobs.
                if let Some(refusal) = record.limits.pool_refusal(&job.tenant, task.policy.pool) {
                    return dead(Failure::new(Category::Denied, refusal));
                }
                std::borrow::Cow::Owned(record.limits.clamp(task.policy.sandbox.clone()))
            }
            Ok(None) => std::borrow::Cow::Borrowed(&task.policy.sandbox),
            Err(e) => {
                return (
                    self.retry_later(format!("reading the tenant's caps failed: {e:#}")),
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
            .sandbox
            .run_paced(
                &prepared,
                &input,
                &sandbox_policy,
                backend,
                self.config.compute.as_deref(),
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
                self.retry_later(format!("the run met a host-side obstacle: {fault}")),
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

    /// A host-side problem (Redis, cache): try the job again shortly
    /// without counting against the task.
    fn retry_later(&self, message: String) -> Outcome {
        tracing::warn!(%message, "host-side problem; job will be retried");
        Outcome::HostRetry {
            at_ms: now_ms() + HOST_RETRY_DELAY.as_millis() as u64,
            error: Failure::new(Category::TaskError, message),
        }
    }

    /// Record an outcome, retrying through Redis outages for a while.
    async fn record(
        &self,
        job: &Arc<Fetched>,
        outcome: Outcome,
        usage: Usage,
        idempotency_key: Option<String>,
        task: String,
    ) {
        let completion = Arc::new(Completion {
            job: job.clone(),
            outcome,
            usage,
            idempotency_key,
            task,
        });
        let mut backoff = Duration::from_millis(50);
        for _ in 0..20 {
            let (reply, answer) = oneshot::channel();
            if self.completions.send((completion.clone(), reply)).is_err() {
                break;
            }
            match answer.await {
                Ok(Ok(true)) => {
                    self.completed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                Ok(Ok(false)) => {
                    tracing::warn!(job = %job.id, "lease lost before the outcome was recorded; another delivery owns the job");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(job = %job.id, error = %e, "recording the outcome failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(_) => break,
            }
        }
        tracing::error!(job = %job.id, "could not record the outcome; the job will be redelivered when its lease expires");
    }

    /// Record outcomes in batches: whatever has finished since the last
    /// round trip goes in the next one. Nothing waits for a batch to fill,
    /// so a lone job is recorded at once; under load, many jobs share one
    /// script call.
    async fn record_batches(broker: Broker, mut queue: mpsc::UnboundedReceiver<PendingCompletion>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < COMPLETE_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            // One script call per tenant (each call's keys share a slot).
            let mut by_tenant: HashMap<String, Vec<PendingCompletion>> = HashMap::new();
            for pending in batch {
                by_tenant
                    .entry(pending.0.job.tenant.clone())
                    .or_default()
                    .push(pending);
            }
            for (_, group) in by_tenant {
                let (completions, replies): (Vec<Arc<Completion>>, Vec<_>) =
                    group.into_iter().unzip();
                let completions: Vec<&Completion> = completions.iter().map(|c| &**c).collect();
                match broker.complete_many(&completions).await {
                    Ok(flags) => {
                        for (reply, flag) in replies.into_iter().zip(flags) {
                            let _ = reply.send(Ok(flag));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        }
    }

    /// A tenant's record, from a short-lived cache.
    async fn tenant_record(&self, tenant: &str) -> anyhow::Result<Option<Arc<Tenant>>> {
        if let Some(record) = self.tenant_records.get(tenant) {
            return Ok(record);
        }
        let record = self.broker.tenant(tenant).await?.map(Arc::new);
        self.tenant_records.put(tenant.to_string(), record.clone());
        Ok(record)
    }

    /// A deployed task of `tenant`, from a short-lived cache.
    async fn deployed(
        &self,
        tenant: &str,
        name: &str,
    ) -> anyhow::Result<Option<Arc<DeployedTask>>> {
        let key = (tenant.to_string(), name.to_string());
        if let Some(task) = self.tasks.get(&key) {
            return Ok(Some(task));
        }
        let task = self.broker.task(tenant, name).await?.map(Arc::new);
        if let Some(t) = &task {
            self.tasks.put(key, t.clone());
        }
        Ok(task)
    }

    /// The compiled task version: fetched by hash, verified, compiled once.
    async fn prepared(&self, tenant: &str, task: &DeployedTask) -> Result<PreparedTask, Failure> {
        let unavailable = |m: String| Failure::new(Category::TaskError, m);
        if let Some(p) = self.sandbox.cached(&task.hash) {
            return Ok(p);
        }
        let bytes = self
            .broker
            .component(tenant, &task.hash)
            .await
            .map_err(|e| unavailable(format!("fetching component {}: {e:#}", task.hash)))?
            .ok_or_else(|| {
                Failure::new(
                    Category::InvalidComponent,
                    format!(
                        "component {} of task {:?} is missing from Redis",
                        task.hash, task.name
                    ),
                )
            })?;
        let actual = crate::component::content_hash(&bytes);
        if actual != task.hash {
            return Err(Failure::new(
                Category::InvalidComponent,
                format!("component of task {:?} does not match its hash (expected {}, got {actual}); redeploy it", task.name, task.hash),
            ));
        }
        let sandbox = self.sandbox.clone();
        tokio::task::spawn_blocking(move || sandbox.prepare(&bytes))
            .await
            .map_err(|e| unavailable(format!("compiling the component panicked: {e}")))?
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Fetched>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl ChildEnqueuer for Broker {
    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String> {
        let payload = serde_json::from_str(&child.payload)
            .map_err(|e| BackendError::Invalid(format!("child payload: {e}")))?;
        let request = EnqueueRequest {
            tenant: tenant.to_string(),
            task: child.task,
            payload,
            not_before_ms: child.countdown.map(|d| now_ms() + d.as_millis() as u64),
            idempotency_key: child.idempotency_key,
            ..EnqueueRequest::default()
        };
        match self.enqueue(request).await {
            Ok(e) => Ok(e.id),
            Err(e) => match e.downcast_ref::<Failure>() {
                Some(f) => Err(BackendError::Invalid(f.to_string())),
                None => Err(BackendError::Unavailable(format!("{e:#}"))),
            },
        }
    }
}
