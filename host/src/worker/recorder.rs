//! Outcomes recorded in batches: whatever has finished since the last
//! round trip goes in the next one. Nothing waits for a batch to fill, so a
//! lone job is recorded at once; under load, many jobs share one script
//! call (one per tenant, since each call's keys share the tenant's slot).
//!
//! Recording an outcome acknowledges the job. Through a Redis outage a
//! processor keeps trying for a while; if it gives up, the job is
//! redelivered when its lease lapses (at-least-once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{Broker, Completion, Outcome, Recorded as Answer};
use crate::metrics::{Ended, Metrics};

/// Most outcomes recorded in one round trip.
const COMPLETE_BATCH: usize = 256;
/// Tries to record one outcome before leaving the job to its lease.
const RECORD_TRIES: usize = 20;

/// An outcome to record and where to send whether it was recorded.
type Pending = (Arc<Completion>, oneshot::Sender<Result<Answer, String>>);

/// See the module docs.
pub struct Recorder {
    queue: mpsc::UnboundedSender<Pending>,
    /// What has been recorded so far, by kind.
    counts: Counts,
    /// Where recorded outcomes are also counted, when exported.
    metrics: Option<Arc<Metrics>>,
}

/// Outcomes recorded, by kind: each once, however often its batch was
/// sent.
#[derive(Default)]
struct Counts {
    succeeded: AtomicU64,
    dead: AtomicU64,
    /// Runs that ended in a retry (of any kind: the task's, the host's, a
    /// wait for a step).
    retried: AtomicU64,
    released: AtomicU64,
}

/// What a recorder has recorded, as numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs dead-lettered.
    pub dead: u64,
    /// Runs that ended in a retry.
    pub retried: u64,
    /// Jobs handed back.
    pub released: u64,
}

impl Recorder {
    /// A recorder writing through `broker`, and its batching task (abort it
    /// once nothing is left to record).
    pub fn start(broker: Broker, metrics: Option<Arc<Metrics>>) -> (Arc<Self>, JoinHandle<()>) {
        let (queue, pending) = mpsc::unbounded_channel();
        let task = tokio::spawn(record_batches(broker, pending, metrics.clone()));
        let recorder = Arc::new(Recorder {
            queue,
            counts: Counts::default(),
            metrics,
        });
        (recorder, task)
    }

    /// What has been recorded so far.
    pub fn counts(&self) -> Recorded {
        let c = &self.counts;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Recorded {
            succeeded: n(&c.succeeded),
            dead: n(&c.dead),
            retried: n(&c.retried),
            released: n(&c.released),
        }
    }

    /// Count an outcome recorded now in the exported metrics.
    fn export(&self, completion: &Completion) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let ended = match &completion.outcome {
            Outcome::Succeeded { .. } => Ended::Succeeded,
            Outcome::Dead(f) => Ended::Dead(f.category.as_str()),
            Outcome::Retry { error, .. } | Outcome::RateLimited { error, .. } => {
                Ended::Retried(error.category.as_str())
            }
            Outcome::HostRetry { .. } => Ended::HostFault,
            Outcome::Wait { .. } | Outcome::Release | Outcome::Regate { .. } => Ended::Other,
        };
        let e2e = (completion.enqueued_at_ms > 0).then(|| {
            Duration::from_millis(crate::broker::now_ms().saturating_sub(completion.enqueued_at_ms))
        });
        let job = &completion.job;
        metrics.outcome(
            (
                &job.tenant,
                &job.queue,
                completion.known_task().unwrap_or("unknown"),
            ),
            ended,
            &completion.usage,
            e2e,
        );
    }

    /// Count a recorded outcome under its kind.
    fn count(&self, outcome: &Outcome) {
        let c = &self.counts;
        let kind = match outcome {
            Outcome::Succeeded { .. } => &c.succeeded,
            Outcome::Dead(_) => &c.dead,
            Outcome::Retry { .. }
            | Outcome::RateLimited { .. }
            | Outcome::HostRetry { .. }
            | Outcome::Wait { .. } => &c.retried,
            Outcome::Release | Outcome::Regate { .. } => &c.released,
        };
        kind.fetch_add(1, Ordering::Relaxed);
    }

    /// Record an outcome, retrying through Redis outages for a while.
    pub async fn record(&self, completion: Completion) {
        let completion = Arc::new(completion);
        let id = completion.job.id.clone();
        let mut backoff = Duration::from_millis(50);
        for _ in 0..RECORD_TRIES {
            let (reply, answer) = oneshot::channel();
            if self.queue.send((completion.clone(), reply)).is_err() {
                break;
            }
            match answer.await {
                Ok(Ok(Answer::Now)) => {
                    self.count(&completion.outcome);
                    self.export(&completion);
                    return;
                }
                // Recorded by an earlier send whose reply was lost (a
                // hand-back counts only when it put the job back now).
                Ok(Ok(Answer::Before)) => {
                    if !matches!(
                        completion.outcome,
                        Outcome::Release | Outcome::Regate { .. }
                    ) {
                        self.count(&completion.outcome);
                        self.export(&completion);
                    }
                    return;
                }
                Ok(Ok(Answer::Stale)) => {
                    // A run stopped because its lease went (a cancel, a
                    // redelivery) hands back a job it no longer owns: expected.
                    if matches!(
                        completion.outcome,
                        Outcome::Release | Outcome::Regate { .. }
                    ) {
                        tracing::debug!(job = %id, "stopped run's job is owned elsewhere now (cancelled or redelivered)");
                    } else {
                        tracing::warn!(job = %id, "lease lost before the outcome was recorded; another delivery owns the job, or it was cancelled");
                    }
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(job = %id, error = %e, "recording the outcome failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(_) => break,
            }
        }
        tracing::error!(job = %id, "could not record the outcome; the job will be redelivered when its lease expires");
    }
}

/// The batching loop: see the module docs.
async fn record_batches(
    broker: Broker,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    metrics: Option<Arc<Metrics>>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < COMPLETE_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut by_tenant: HashMap<String, Vec<Pending>> = HashMap::new();
        for pending in batch {
            by_tenant
                .entry(pending.0.job.tenant.clone())
                .or_default()
                .push(pending);
        }
        for (_, group) in by_tenant {
            let (completions, replies): (Vec<Arc<Completion>>, Vec<_>) = group.into_iter().unzip();
            let completions: Vec<&Completion> = completions.iter().map(|c| &**c).collect();
            let sent = std::time::Instant::now();
            let answer = broker.complete_many(&completions).await;
            if let Some(metrics) = &metrics {
                metrics.redis("record", sent.elapsed());
            }
            match answer {
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
