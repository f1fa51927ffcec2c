//! How jobs come out of Redis.
//!
//! - In batches, never more than the pool has free slots (no prefetch that
//!   starves other workers).
//! - Every (tenant, queue) pair in turn, starting one further each round:
//!   no queue and no tenant starves, and a tenant flooding a queue gets its
//!   turn like any other, not the whole worker.
//! - A tenant's `max_concurrency` caps its jobs held by this pool; its
//!   `max_cluster_concurrency` is enforced by the fetch script across all
//!   workers.
//! - An idle pool blocks on its queues' wake-up lists until a producer
//!   signals one, or a short timeout (delayed jobs coming due and expired
//!   leases are found by looking).

use crate::broker::{Broker, Fetched, LeaseTerms};
use crate::keys::Keys;

use super::catalog::Catalog;
use super::lease::{Leases, MAX_DELIVERIES};
use super::manager::WorkerConfig;

/// Most jobs fetched in one round trip.
pub const FETCH_BATCH: usize = 256;
/// How long an idle worker blocks waiting for a wake-up before it looks
/// again.
const IDLE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// See the module docs.
pub struct Fetcher {
    broker: Broker,
    /// (tenant, queue) pairs, in rotation.
    pairs: Vec<(String, String)>,
    /// Where the next round starts.
    next: usize,
    /// The wake-up lists of every pair.
    signals: Vec<String>,
    worker: String,
    lease: std::time::Duration,
}

impl Fetcher {
    /// A fetcher for `config`'s tenants and queues.
    pub fn new(broker: Broker, config: &WorkerConfig) -> Self {
        let pairs: Vec<(String, String)> = config
            .tenants
            .iter()
            .flat_map(|t| config.queues.iter().map(move |q| (t.clone(), q.clone())))
            .collect();
        let signals = pairs.iter().map(|(t, q)| Keys::new(t).signal(q)).collect();
        Fetcher {
            broker,
            pairs,
            next: 0,
            signals,
            worker: config.id.clone(),
            lease: config.lease,
        }
    }

    /// Lease up to `free` jobs, starting at the next pair in rotation.
    pub async fn fetch(
        &mut self,
        free: usize,
        leases: &Leases,
        catalog: &Catalog,
    ) -> redis::RedisResult<Vec<Fetched>> {
        let mut out: Vec<Fetched> = Vec::new();
        for i in 0..self.pairs.len() {
            let (tenant, queue) = &self.pairs[(self.next + i) % self.pairs.len()];
            let mut want = free.saturating_sub(out.len()).min(FETCH_BATCH);
            if want == 0 {
                break;
            }
            // Without a record (or while it cannot be read) a tenant is
            // uncapped: a fetch must not wait for that.
            let record = catalog.tenant(tenant).await.ok().flatten();
            let caps = record.as_ref().map(|t| &t.limits);
            if let Some(cap) = caps.and_then(|c| c.max_concurrency) {
                let busy = leases.busy(tenant) + out.iter().filter(|j| &j.tenant == tenant).count();
                want = want.min((cap as usize).saturating_sub(busy));
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
                            worker: &self.worker,
                            lease: self.lease,
                            max_deliveries: MAX_DELIVERIES,
                            cluster_cap: caps.and_then(|c| c.max_cluster_concurrency),
                        },
                    )
                    .await?,
            );
        }
        self.next = (self.next + 1) % self.pairs.len().max(1);
        Ok(out)
    }

    /// Block until a producer signals one of our queues, or a short timeout.
    pub async fn wait_for_work(&self) {
        match self.broker.blocking_connection(IDLE_WAIT).await {
            Ok(mut conn) => {
                let _: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
                    .arg(&self.signals)
                    .arg(IDLE_WAIT.as_secs_f64())
                    .query_async(&mut conn)
                    .await;
            }
            Err(_) => tokio::time::sleep(IDLE_WAIT).await,
        }
    }
}
