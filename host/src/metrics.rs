//! A worker process's Prometheus metrics (`wasmq worker --metrics ADDR`),
//! in the classic text format (0.0.4) that every scraper and `promtool`
//! read. See docs/operations.md for the list and example alerts.
//!
//! Labels are bounded: tenant, queue, task, outcome category, pool, and the
//! Redis operation; never a job id. Outcomes are counted when their record
//! in Redis is written (once per job outcome, however often a batch was
//! sent), so the counters agree with `wasmq status`. The queue gauges are
//! read from Redis when scraped (one cheap script per served queue), not
//! kept up by every worker.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::usage::Usage;

/// Every family a worker process exports.
pub struct Metrics {
    registry: Registry,
    finished: IntCounterVec,
    retries: IntCounterVec,
    host_faults: IntCounterVec,
    dead_letters: IntCounterVec,
    run_seconds: HistogramVec,
    e2e_seconds: HistogramVec,
    fuel: HistogramVec,
    peak_memory: HistogramVec,
    redis_seconds: HistogramVec,
    /// Set at scrape time.
    pub queue_jobs: IntGaugeVec,
    /// Set at scrape time.
    pub queue_oldest_seconds: prometheus::GaugeVec,
    /// Set at scrape time.
    pub pool_slots: IntGaugeVec,
    /// Set at scrape time.
    pub pool_busy: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// How a recorded outcome ended, for [`Metrics::outcome`].
#[derive(Debug, Clone, Copy)]
pub enum Ended<'a> {
    /// Succeeded.
    Succeeded,
    /// Dead-lettered with this failure category.
    Dead(&'a str),
    /// The task's retry (this failure category).
    Retried(&'a str),
    /// The host's fault, retried.
    HostFault,
    /// Anything else (a wait for a step, a hand-back): not counted.
    Other,
}

const JOB_LABELS: [&str; 3] = ["tenant", "queue", "task"];

/// `family`, registered in `registry` (the names here are constants, so
/// a failure is a bug).
fn register<M: Collector + Clone + 'static>(registry: &Registry, family: M) -> M {
    registry
        .register(Box::new(family.clone()))
        .expect("each family registered once");
    family
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    register(
        registry,
        HistogramVec::new(opts, labels).expect("valid metric"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// `count` buckets growing by `factor` from `start`.
fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    exponential_buckets(start, factor, count).expect("valid buckets")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered and empty.
    pub fn new() -> Self {
        let r = Registry::new();
        // 100 µs to ~100 s.
        let seconds = buckets(0.0001, 4.0, 11);
        let queue_oldest_seconds = register(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "wasmq_queue_oldest_ready_seconds",
                    "How long the oldest ready job of a queue has waited since its enqueue.",
                ),
                &["tenant", "queue"],
            )
            .expect("valid metric"),
        );
        Metrics {
            finished: counter(
                &r,
                "wasmq_jobs_finished_total",
                "Jobs that reached their outcome on this worker, by outcome (succeeded, or the failure category they were dead-lettered with).",
                &["tenant", "queue", "task", "outcome"],
            ),
            retries: counter(
                &r,
                "wasmq_job_retries_total",
                "Runs that ended in a retry of the task's, by failure category.",
                &["tenant", "queue", "task", "category"],
            ),
            host_faults: counter(
                &r,
                "wasmq_host_faults_total",
                "Runs the host retried for its own faults (Redis refused or unreachable, component not fetchable).",
                &JOB_LABELS,
            ),
            dead_letters: counter(
                &r,
                "wasmq_dead_letters_total",
                "Jobs dead-lettered, by failure category.",
                &["tenant", "queue", "task", "category"],
            ),
            run_seconds: histogram(
                &r,
                "wasmq_job_run_seconds",
                "Wall time of one run in the sandbox.",
                &JOB_LABELS,
                seconds.clone(),
            ),
            e2e_seconds: histogram(
                &r,
                "wasmq_job_e2e_seconds",
                "From the producer's enqueue (its clock) to the outcome recorded (this worker's clock).",
                &JOB_LABELS,
                seconds.clone(),
            ),
            fuel: histogram(
                &r,
                "wasmq_job_fuel",
                "Fuel one run used.",
                &["tenant", "task"],
                buckets(1000.0, 10.0, 10),
            ),
            peak_memory: histogram(
                &r,
                "wasmq_job_peak_memory_bytes",
                "Peak linear memory of one run.",
                &["tenant", "task"],
                buckets(65536.0, 4.0, 10),
            ),
            redis_seconds: histogram(
                &r,
                "wasmq_redis_roundtrip_seconds",
                "Round trips to Redis by operation (fetch, record, renew).",
                &["op"],
                seconds,
            ),
            queue_jobs: gauge(
                &r,
                "wasmq_queue_jobs",
                "Jobs in a queue served by this worker, by state (ready, delayed, running, dead), read from Redis at scrape time.",
                &["tenant", "queue", "state"],
            ),
            queue_oldest_seconds,
            pool_slots: gauge(
                &r,
                "wasmq_pool_slots",
                "Jobs a pool can run at once.",
                &["pool", "kind"],
            ),
            pool_busy: gauge(
                &r,
                "wasmq_pool_busy_slots",
                "Jobs a pool runs now.",
                &["pool", "kind"],
            ),
            registry: r,
        }
    }

    /// Count one recorded outcome and observe its run.
    pub fn outcome(
        &self,
        (tenant, queue, task): (&str, &str, &str),
        ended: Ended<'_>,
        usage: &Usage,
        e2e: Option<Duration>,
    ) {
        let job = [tenant, queue, task];
        match ended {
            Ended::Succeeded => self
                .finished
                .with_label_values(&[tenant, queue, task, "succeeded"])
                .inc(),
            Ended::Dead(category) => {
                self.finished
                    .with_label_values(&[tenant, queue, task, category])
                    .inc();
                self.dead_letters
                    .with_label_values(&[tenant, queue, task, category])
                    .inc();
            }
            Ended::Retried(category) => self
                .retries
                .with_label_values(&[tenant, queue, task, category])
                .inc(),
            Ended::HostFault => self.host_faults.with_label_values(&job).inc(),
            Ended::Other => {}
        }
        if usage.wall_time_us > 0 {
            self.run_seconds
                .with_label_values(&job)
                .observe(usage.wall_time_us as f64 / 1e6);
            self.fuel
                .with_label_values(&[tenant, task])
                .observe(usage.fuel as f64);
            self.peak_memory
                .with_label_values(&[tenant, task])
                .observe(usage.peak_memory_bytes as f64);
        }
        if let (Some(e2e), Ended::Succeeded | Ended::Dead(_)) = (e2e, ended) {
            self.e2e_seconds
                .with_label_values(&job)
                .observe(e2e.as_secs_f64());
        }
    }

    /// Observe one round trip to Redis.
    pub fn redis(&self, op: &str, took: Duration) {
        self.redis_seconds
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
    }

    /// Everything, in the text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;
