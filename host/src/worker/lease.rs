//! The jobs a pool holds, and their leases.
//!
//! Every fetched job is leased to this worker until a time in Redis (the
//! server's clock decides). The worker renews the leases of every job it
//! holds every third of the lease, so a long job is never redelivered,
//! while the jobs of a worker that died (or froze, or lost Redis) come back
//! to their queue once their leases lapse (see the fetch script).
//!
//! Each held job has a [`LeaseWatch`]: a renewal that succeeds moves its
//! end, one that finds the job owned by another delivery marks it lost, and
//! a worker that cannot renew sees it lapse on its own clock (no effect
//! goes out from then on) and stops it at its next tick. The running job
//! stops as soon as its watch says the lease is lost, and drain uses the
//! same switch to stop runs that outlast it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::broker::{Broker, Fetched};
use crate::fence::LeaseWatch;
use crate::metrics::Metrics;

/// How long a worker's claim on a job lasts without renewal. Renewed every
/// third of it, so two missed renewals in a row are survived.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// A held job and its lease.
struct Held {
    job: Arc<Fetched>,
    watch: Arc<LeaseWatch>,
}

/// How long a stop for a delivery not held (yet) is remembered: a cancel
/// that reaches the worker between a fetch's reply and the job being held
/// still stops it, well before the next renewal would.
const EARLY_STOP_MEMORY: Duration = Duration::from_secs(60);

/// The jobs a pool holds, by id.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<String, Held>>,
    /// Deliveries (lease tokens) told to stop before they were held, and
    /// when; usually empty.
    early_stops: Mutex<HashMap<String, Instant>>,
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start holding `job` under `watch` (its lease is renewed from now on).
    /// Held already under an older delivery (this worker froze past its
    /// lease, and fetched the job again): that delivery's run is stopped.
    pub fn hold(&self, job: Arc<Fetched>, watch: Arc<LeaseWatch>) {
        if self.stopped_early(&job.token) {
            watch.lose();
        }
        if let Some(older) = self.lock().insert(job.id.clone(), Held { job, watch }) {
            older.watch.lose();
        }
    }

    /// Whether delivery `token` was told to stop before it was held (and
    /// forget it).
    fn stopped_early(&self, token: &str) -> bool {
        let mut early = self.early_stops.lock().unwrap_or_else(|p| p.into_inner());
        !early.is_empty() && early.remove(token).is_some()
    }

    /// Stop holding delivery `job` (its outcome is recorded, or it was
    /// handed back), unless a newer delivery of the job is held by now.
    pub fn drop_job(&self, job: &Fetched) {
        let mut held = self.lock();
        if held.get(&job.id).is_some_and(|h| h.job.token == job.token) {
            held.remove(&job.id);
        }
    }

    /// Jobs of `tenant` held now.
    pub fn busy(&self, tenant: &str) -> usize {
        self.lock()
            .values()
            .filter(|h| h.job.tenant == tenant)
            .count()
    }

    /// Jobs held now (the pool's busy slots).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Stop the run of delivery `token` of `tenant`'s job `id`, if held
    /// here (an operator cancelled it: its lease is gone in Redis already).
    /// True if a run was stopped.
    pub fn stop(&self, tenant: &str, id: &str, token: &str) -> bool {
        match self.lock().get(id) {
            Some(h) if h.job.tenant == tenant && h.job.token == token => {
                h.watch.lose();
                true
            }
            _ => {
                // Perhaps fetched here and not held yet: remember it for
                // `hold` (lease tokens name the worker, so a token of
                // another worker's is never held here and ages out).
                let mut early = self.early_stops.lock().unwrap_or_else(|p| p.into_inner());
                early.retain(|_, at| at.elapsed() < EARLY_STOP_MEMORY);
                early.insert(token.to_string(), Instant::now());
                false
            }
        }
    }

    /// Stop every held job's run: each ends as if its lease were lost and
    /// hands its job back.
    pub fn stop_all(&self) {
        for held in self.lock().values() {
            held.watch.lose();
        }
    }

    /// Every job held, no longer held.
    pub fn take_all(&self) -> Vec<Arc<Fetched>> {
        self.lock().drain().map(|(_, h)| h.job).collect()
    }

    /// Renew every held lease every third of `lease`, forever.
    pub async fn renew_forever(
        self: Arc<Self>,
        broker: Broker,
        lease: Duration,
        metrics: Option<Arc<Metrics>>,
    ) {
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut by_queue: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
            for held in self.lock().values() {
                by_queue
                    .entry((held.job.tenant.clone(), held.job.queue.clone()))
                    .or_default()
                    .push((held.job.id.clone(), held.job.token.clone()));
            }
            for ((tenant, queue), jobs) in by_queue {
                let sent = Instant::now();
                let renewed = broker.renew(&tenant, &queue, lease, &jobs).await;
                if let Some(metrics) = &metrics {
                    metrics.redis("renew", sent.elapsed());
                }
                match renewed {
                    Ok(lost) => self.renewed(&jobs, &lost, sent, lease),
                    Err(e) => {
                        tracing::warn!(error = %e, %tenant, %queue, "renewing leases failed; will retry")
                    }
                }
            }
            self.stop_lapsed();
        }
    }

    /// Stop the runs whose leases lapsed without a renewal (Redis was out
    /// of reach for a whole lease, or this process was frozen): another
    /// worker may run their jobs now.
    fn stop_lapsed(&self) {
        for held in self.lock().values() {
            if !held.watch.held() {
                held.watch.lose();
            }
        }
    }

    /// A renewal of `jobs` (id, delivery token) sent at `sent` came back:
    /// `lost` are owned by another delivery now, or their leases lapsed in
    /// Redis. The answer is about the deliveries the renewal named: a job
    /// fetched again while it was on the wire (its older run stopped, this
    /// worker reclaimed it) is another delivery, which it neither stops nor
    /// renews.
    fn renewed(&self, jobs: &[(String, String)], lost: &[String], sent: Instant, lease: Duration) {
        let held = self.lock();
        for (id, token) in jobs {
            let Some(h) = held.get(id).filter(|h| h.job.token == *token) else {
                continue;
            };
            if lost.contains(id) {
                tracing::warn!(job = %id, "the job's lease was lost (it lapsed, or another delivery owns it); stopping its run");
                h.watch.lose();
            } else {
                h.watch.renewed(sent, lease);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(token: &str) -> Arc<Fetched> {
        Arc::new(Fetched {
            tenant: "t".into(),
            queue: "q".into(),
            id: "j".into(),
            envelope: String::new(),
            attempt: 1,
            token: token.into(),
            host_retries: 0,
            gate: String::new(),
        })
    }

    #[test]
    fn a_stop_that_comes_before_the_hold_stops_the_run() {
        let leases = Leases::default();
        assert!(!leases.stop("t", "j", "w:1"), "not held yet");
        let watch = Arc::new(LeaseWatch::unbounded());
        leases.hold(delivery("w:1"), watch.clone());
        assert!(!watch.held(), "the early stop reached the run");
        let next = Arc::new(LeaseWatch::unbounded());
        leases.hold(delivery("w:2"), next.clone());
        assert!(next.held(), "another delivery of the job runs");
    }

    /// The race seen once in the frozen-worker test: a renewal names the
    /// delivery held when it was sent; before its answer ("lost") comes
    /// back, that run stopped and the job was fetched again. The answer
    /// must not stop the new delivery (nor renew it).
    #[test]
    fn a_renewal_answer_about_an_older_delivery_leaves_the_new_one_alone() {
        let leases = Leases::default();
        let old_watch = Arc::new(LeaseWatch::unbounded());
        leases.hold(delivery("w:1"), old_watch.clone());
        let sent = vec![("j".to_string(), "w:1".to_string())];
        let new_watch = Arc::new(LeaseWatch::new(Instant::now(), Duration::from_secs(2)));
        leases.hold(delivery("w:2"), new_watch.clone());
        leases.renewed(
            &sent,
            &["j".to_string()],
            Instant::now(),
            Duration::from_secs(2),
        );
        assert!(new_watch.held(), "the newer delivery runs on");
        assert!(!old_watch.held());
        // Nor is a success for the old delivery applied to the new one
        // (applied, this one, sent past the new lease's end, would mark the
        // new delivery lapsed).
        let later = Instant::now() + Duration::from_secs(60);
        leases.renewed(&sent, &[], later, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
        assert!(new_watch.held());
    }

    #[test]
    fn a_refetched_job_stops_its_older_run_and_keeps_its_lease() {
        let leases = Leases::default();
        let (old, new) = (delivery("w:1"), delivery("w:2"));
        let old_watch = Arc::new(LeaseWatch::unbounded());
        leases.hold(old.clone(), old_watch.clone());
        leases.hold(new.clone(), Arc::new(LeaseWatch::unbounded()));
        assert!(!old_watch.held(), "the older delivery's run is stopped");
        leases.drop_job(&old);
        assert_eq!(
            leases.busy("t"),
            1,
            "the older run's end leaves the newer lease held"
        );
        leases.drop_job(&new);
        assert_eq!(leases.busy("t"), 0);
    }
}
