//! One pool's loop: wait for free slots, fetch that many jobs, hand each to
//! a processor, record its outcome; on shutdown, stop fetching, let
//! running jobs finish within the drain timeout, then hand the rest back to
//! their queues.
//!
//! Redis outages are survived: a failed fetch backs off and tries again
//! (the connection manager reconnects).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::{Broker, Fetched, Outcome, Recorded};
use crate::fence::LeaseWatch;
use crate::metrics::Metrics;
use crate::sandbox::{ComputeThreads, Sandbox};
use crate::usage::Usage;

use super::catalog::Catalog;
use super::fetch::{FetchWindow, Fetcher, FETCH_BATCH};
use super::lease::Leases;
use super::processor::{HostRetries, Processor};
use super::recorder::Recorder;

/// How long runs stopped at the end of a drain get to end by themselves
/// (a guest yields at every 1 ms epoch tick, so this is generous) before
/// their tasks are aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest a busy worker waits for more free slots before fetching.
const FETCH_GATHER: Duration = Duration::from_millis(1);

/// How a pool runs.
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
    /// How jobs are retried for the host's own faults.
    pub host_retries: HostRetries,
    /// Where outcomes and Redis round trips are counted, when the process
    /// exports metrics.
    pub metrics: Option<Arc<Metrics>>,
}

/// What a worker did, returned when it stops. Each outcome is counted
/// once, however often its batch was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Jobs that reached their outcome here: succeeded or dead-lettered (a
    /// job retried twice, then succeeded, counts once).
    pub completed: u64,
    /// Of those, the ones that succeeded.
    pub succeeded: u64,
    /// Of those, the ones dead-lettered.
    pub dead: u64,
    /// Runs that ended in a retry (the task's, the host's, or a wait).
    pub retried: u64,
    /// Jobs handed back at shutdown.
    pub released: u64,
}

impl WorkerStats {
    /// Both pools' stats together.
    pub fn add(&mut self, other: WorkerStats) {
        self.completed += other.completed;
        self.succeeded += other.succeeded;
        self.dead += other.dead;
        self.retried += other.retried;
        self.released += other.released;
    }
}

/// One pool: see the module docs.
pub struct Worker {
    broker: Broker,
    config: WorkerConfig,
    catalog: Arc<Catalog>,
    leases: Arc<Leases>,
    processor: Processor,
    recorder: Arc<Recorder>,
    /// The recorder's batching task, stopped with the pool.
    recording: tokio::task::JoinHandle<()>,
    /// Jobs handed back by the drain itself (those whose runs would not
    /// stop).
    released: AtomicU64,
}

impl Worker {
    /// A pool on `broker` running jobs in `sandbox`.
    pub fn new(broker: Broker, sandbox: Arc<Sandbox>, config: WorkerConfig) -> Arc<Self> {
        let catalog = Arc::new(Catalog::new(broker.clone(), sandbox));
        let processor = Processor::new(
            broker.clone(),
            catalog.clone(),
            config.compute.clone(),
            config.host_retries,
        );
        let (recorder, recording) = Recorder::start(broker.clone(), config.metrics.clone());
        Arc::new(Worker {
            broker,
            config,
            catalog,
            leases: Arc::new(Leases::default()),
            processor,
            recorder,
            recording,
            released: AtomicU64::new(0),
        })
    }

    /// Jobs that reached their outcome here so far (succeeded or
    /// dead-lettered).
    pub fn completed(&self) -> u64 {
        let counts = self.recorder.counts();
        counts.succeeded + counts.dead
    }

    /// Jobs it runs now.
    pub fn busy(&self) -> usize {
        self.leases.len()
    }

    /// Its id (what job records and control lists name).
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Its configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Stop the run of one delivery now (the job was cancelled); true if
    /// this pool was running it.
    pub fn stop_run(&self, tenant: &str, id: &str, token: &str) -> bool {
        self.leases.stop(tenant, id, token)
    }

    /// Run until `shutdown` resolves, then drain.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> WorkerStats {
        let concurrency = self.config.concurrency.max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        let records = Arc::new(Semaphore::new(concurrency));
        let renewer = tokio::spawn(self.leases.clone().renew_forever(
            self.broker.clone(),
            self.config.lease,
            self.config.metrics.clone(),
        ));
        let mut fetcher = Fetcher::new(self.broker.clone(), &self.config);
        let mut running = JoinSet::new();
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(50);
        loop {
            while running.try_join_next().is_some() {}
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
            let watermark = (concurrency / 4).clamp(1, FETCH_BATCH);
            let free = if free < watermark && free < concurrency {
                let gathered =
                    tokio::time::timeout(FETCH_GATHER, slots.acquire_many(watermark as u32)).await;
                drop(gathered);
                slots.available_permits()
            } else {
                free
            };
            let round = fetcher.fetch(free, &self.leases, &self.catalog).await;
            let fetched_any = !round.jobs.is_empty();
            // The round's wall-clock window, for each job's `fetch` span
            // (read only when spans are exported).
            let window = crate::telemetry::exporting().then(|| FetchWindow::since(round.sent));
            for job in round.jobs {
                let job = Arc::new(job);
                let permit = slots
                    .clone()
                    .try_acquire_owned()
                    .expect("fetched no more jobs than free slots");
                let watch = Arc::new(LeaseWatch::new(round.sent, self.config.lease));
                self.leases.hold(job.clone(), watch.clone());
                let (worker, records) = (self.clone(), records.clone());
                running.spawn(
                    async move { worker.process(job, watch, window, permit, records).await },
                );
            }
            if let Some(e) = round.error {
                tracing::warn!(error = %e, retry_in = ?backoff, "fetching jobs failed; retrying");
                tokio::select! { _ = &mut shutdown => break, _ = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            backoff = Duration::from_millis(50);
            if !fetched_any {
                tokio::select! { _ = &mut shutdown => break, _ = fetcher.wait_for_work() => {} }
            }
        }
        self.drain(&mut running).await;
        renewer.abort();
        self.recording.abort();
        let counts = self.recorder.counts();
        WorkerStats {
            completed: counts.succeeded + counts.dead,
            succeeded: counts.succeeded,
            dead: counts.dead,
            retried: counts.retried,
            released: counts.released + self.released.load(Ordering::Relaxed),
        }
    }

    /// One job: run it, then record its outcome.
    async fn process(
        &self,
        job: Arc<Fetched>,
        watch: Arc<LeaseWatch>,
        fetched: Option<FetchWindow>,
        slot: OwnedSemaphorePermit,
        records: Arc<Semaphore>,
    ) {
        // The job's consumer span: a child of the producer's (the
        // processor joins it to the envelope's trace context), with the
        // run's host calls and HTTP requests, then the recording, under it.
        let span = tracing::debug_span!(
            "run",
            otel.kind = "consumer",
            messaging.system = "wasmq",
            messaging.operation.type = "process",
            messaging.destination.name = %job.queue,
            messaging.message.id = %job.id,
            wasmq.tenant = %job.tenant,
            wasmq.task = tracing::field::Empty,
            wasmq.attempt = job.attempt,
            wasmq.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let completion = self
            .processor
            .process(job.clone(), watch, &span, fetched)
            .await;
        span.record("wasmq.outcome", completion.outcome.label());
        if matches!(completion.outcome, Outcome::Dead(_)) {
            span.record("otel.status_code", "ERROR");
        }
        // The sandbox is done: free its slot for the next job while the
        // outcome is recorded, holding a recording permit instead (which
        // bounds outcomes waiting for Redis).
        let recording = records
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        drop(slot);
        self.recorder
            .record(completion)
            .instrument(tracing::debug_span!(parent: &span, "record"))
            .await;
        self.leases.drop_job(&job);
        drop(recording);
    }

    /// Wait for running jobs up to the drain timeout. Then stop the runs
    /// still going (each ends as if its lease were lost, and its processor
    /// hands the job back once its guest has stopped, so no job runs here
    /// and elsewhere at once); only runs that do not stop within
    /// [`STOP_GRACE`] are aborted and their jobs handed back from here.
    async fn drain(&self, running: &mut JoinSet<()>) {
        if tokio::time::timeout(self.config.drain_timeout, join_all(running))
            .await
            .is_ok()
        {
            return;
        }
        self.leases.stop_all();
        if tokio::time::timeout(STOP_GRACE, join_all(running))
            .await
            .is_ok()
        {
            return;
        }
        running.abort_all();
        while running.join_next().await.is_some() {}
        for job in self.leases.take_all() {
            match self
                .broker
                .complete(&job, &Outcome::Release, &Usage::default())
                .await
            {
                Ok(Recorded::Now) => {
                    self.released.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                // Its lease will lapse and it will be redelivered.
                Err(e) => {
                    tracing::warn!(error = %e, job = %job.id, "could not release job; its lease will expire")
                }
            }
        }
    }
}

/// Resolves once every task of `running` has ended.
async fn join_all(running: &mut JoinSet<()>) {
    while running.join_next().await.is_some() {}
}
