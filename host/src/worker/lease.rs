//! The jobs a pool holds, and their leases.
//!
//! Every fetched job is leased to this worker until a time in Redis; the
//! worker renews the leases of every job it holds every third of the lease,
//! so a long job is never redelivered, while the jobs of a worker that died
//! (or froze, or lost Redis) come back to their queue once their leases
//! lapse (see the fetch script).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::broker::{Broker, Fetched};

/// How long a worker's claim on a job lasts without renewal. Renewed every
/// third of it, so two missed renewals in a row are survived.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Deliveries after which a job that never finishes is dead-lettered.
pub const MAX_DELIVERIES: u32 = 10;

/// The jobs a pool holds, by id.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<String, Arc<Fetched>>>,
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Fetched>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start holding `job` (its lease is renewed from now on).
    pub fn hold(&self, job: Arc<Fetched>) {
        self.lock().insert(job.id.clone(), job);
    }

    /// Stop holding job `id` (its outcome is recorded, or it was handed
    /// back).
    pub fn drop_job(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Jobs of `tenant` held now.
    pub fn busy(&self, tenant: &str) -> usize {
        self.lock().values().filter(|j| j.tenant == tenant).count()
    }

    /// Every job held, no longer held.
    pub fn take_all(&self) -> Vec<Arc<Fetched>> {
        self.lock().drain().map(|(_, j)| j).collect()
    }

    /// Renew every held lease every third of `lease`, forever.
    pub async fn renew_forever(self: Arc<Self>, broker: Broker, lease: Duration) {
        let mut tick = tokio::time::interval(lease / 3);
        loop {
            tick.tick().await;
            let mut by_queue: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
            for job in self.lock().values() {
                by_queue
                    .entry((job.tenant.clone(), job.queue.clone()))
                    .or_default()
                    .push((job.id.clone(), job.token.clone()));
            }
            for ((tenant, queue), jobs) in by_queue {
                if let Err(e) = broker.renew(&tenant, &queue, lease, &jobs).await {
                    tracing::warn!(error = %e, %tenant, %queue, "renewing leases failed; will retry");
                }
            }
        }
    }
}
