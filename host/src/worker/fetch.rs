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
//! - A round that fails part way keeps the jobs it already leased: they
//!   run, and the error is reported for the caller to back off.
//! - An idle pool blocks on its queues' wake-up lists until a producer
//!   signals one, or a short timeout (delayed jobs coming due and expired
//!   leases are found by looking), on one connection kept for that; a wait
//!   that fails backs off before the next, so a Redis that is down costs
//!   neither connections nor CPU. When a rate limit or concurrency key
//!   holds jobs back, the fetch says when the first may go, and the wait
//!   is no longer than that.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redis::aio::MultiplexedConnection;

use crate::broker::{Broker, Fetched, LeaseTerms};
use crate::failure::Category;
use crate::keys::Keys;
use crate::metrics::{Ended, Metrics};
use crate::policy::DEFAULT_MAX_DELIVERIES;
use crate::usage::Usage;

use super::catalog::Catalog;
use super::lease::Leases;
use super::manager::WorkerConfig;

/// Most jobs fetched in one round trip.
pub const FETCH_BATCH: usize = 256;
/// How long an idle worker blocks waiting for a wake-up before it looks
/// again.
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// Waits shorter than this (a rate-limited lane opening in a few ms)
/// sleep rather than block on the wake-up lists: Redis times blocked
/// commands out on its `hz` tick (100 ms by default), so a shorter BLPOP
/// timeout would wake late and a rate would fall short of its limit.
const MIN_BLOCKING_WAIT: Duration = Duration::from_millis(100);
/// The first wait after a failed blocking wait; doubles up to
/// [`MAX_WAIT_BACKOFF`].
const WAIT_BACKOFF: Duration = Duration::from_millis(100);
const MAX_WAIT_BACKOFF: Duration = Duration::from_secs(5);

/// What one fetch round got.
pub struct Round {
    /// The jobs leased to this pool.
    pub jobs: Vec<Fetched>,
    /// When the round was sent: their leases last from no earlier than this.
    pub sent: Instant,
    /// The error that ended the round early, if any.
    pub error: Option<redis::RedisError>,
}

/// When a fetch round ran, on the wall clock: the `fetch` span of each job
/// it leased.
#[derive(Debug, Clone, Copy)]
pub struct FetchWindow {
    /// When the round was sent.
    pub start: SystemTime,
    /// When its jobs were in hand.
    pub end: SystemTime,
}

impl FetchWindow {
    /// A round sent at `sent` that is over now.
    pub fn since(sent: Instant) -> Self {
        let end = SystemTime::now();
        FetchWindow {
            start: end.checked_sub(sent.elapsed()).unwrap_or(end),
            end,
        }
    }
}

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
    lease: Duration,
    /// The connection blocking waits use, kept between waits.
    blocking: Option<MultiplexedConnection>,
    /// The pause after the next failed wait.
    wait_backoff: Duration,
    metrics: Option<Arc<Metrics>>,
    /// The soonest a lane holding jobs back (a rate limit, a concurrency
    /// key) may open, as the last round's fetches said.
    wake_in: Option<Duration>,
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
            blocking: None,
            wait_backoff: WAIT_BACKOFF,
            metrics: config.metrics.clone(),
            wake_in: None,
        }
    }

    /// Lease up to `free` jobs, starting at the next pair in rotation.
    pub async fn fetch(&mut self, free: usize, leases: &Leases, catalog: &Catalog) -> Round {
        let sent = Instant::now();
        let mut jobs: Vec<Fetched> = Vec::new();
        let mut error = None;
        self.wake_in = None;
        for i in 0..self.pairs.len() {
            let (tenant, queue) = &self.pairs[(self.next + i) % self.pairs.len()];
            let mut want = free.saturating_sub(jobs.len()).min(FETCH_BATCH);
            if want == 0 {
                break;
            }
            // A tenant's caps must hold: while its record cannot be read,
            // its queues wait for the next round rather than run uncapped.
            let record = match catalog.tenant(tenant).await {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "reading the tenant's caps failed; not fetching its jobs this round");
                    continue;
                }
            };
            let caps = record.as_ref().map(|t| &t.limits);
            if let Some(cap) = caps.and_then(|c| c.max_concurrency) {
                let busy =
                    leases.busy(tenant) + jobs.iter().filter(|j| &j.tenant == tenant).count();
                want = want.min((cap as usize).saturating_sub(busy));
                if want == 0 {
                    continue;
                }
            }
            let terms = LeaseTerms {
                worker: &self.worker,
                lease: self.lease,
                max_deliveries: DEFAULT_MAX_DELIVERIES,
                cluster_cap: caps.and_then(|c| c.max_cluster_concurrency),
                rate_limit: caps.and_then(|c| c.rate_limit),
            };
            let sent = Instant::now();
            let fetched = self.broker.fetch_round(tenant, queue, want, terms).await;
            if let Some(metrics) = &self.metrics {
                metrics.redis("fetch", sent.elapsed());
            }
            match fetched {
                Ok(reply) => {
                    if let Some(wake) = reply.wake_in {
                        self.wake_in = Some(self.wake_in.map_or(wake, |w| w.min(wake)));
                    }
                    jobs.extend(reply.jobs);
                    self.count_poisoned(tenant, queue, &reply.poisoned, catalog)
                        .await;
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        self.next = (self.next + 1) % self.pairs.len().max(1);
        Round { jobs, sent, error }
    }

    /// Count jobs the round dead-lettered as poison in the worker's
    /// metrics, as `trap` deaths (their category in the job record). A
    /// task label is only ever a deployed task's name, so a producer
    /// cannot mint one per made-up name.
    async fn count_poisoned(&self, tenant: &str, queue: &str, tasks: &[String], catalog: &Catalog) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        for task in tasks {
            let known = matches!(catalog.task(tenant, task).await, Ok(Some(_)));
            metrics.outcome(
                (tenant, queue, if known { task } else { "unknown" }),
                Ended::Dead(Category::Trap.as_str()),
                &Usage::default(),
                None,
            );
        }
    }

    /// Block until a producer signals one of our queues, or a short timeout
    /// (sooner when a rate limit or concurrency key lets jobs through
    /// sooner).
    pub async fn wait_for_work(&mut self) {
        let wait = self.wake_in.map_or(IDLE_WAIT, |w| w.min(IDLE_WAIT));
        // BLPOP's timeout 0 blocks for ever, and its clock is coarse
        // (MIN_BLOCKING_WAIT): short waits sleep instead.
        if wait < MIN_BLOCKING_WAIT {
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
            return;
        }
        let conn = match self.blocking.as_mut() {
            Some(conn) => conn,
            None => match self.broker.blocking_connection(IDLE_WAIT).await {
                Ok(conn) => self.blocking.insert(conn),
                Err(e) => return self.wait_failed(&e).await,
            },
        };
        let woken: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
            .arg(&self.signals)
            .arg(wait.as_secs_f64())
            .query_async(conn)
            .await;
        match woken {
            Ok(_) => self.wait_backoff = WAIT_BACKOFF,
            Err(e) => {
                self.blocking = None;
                self.wait_failed(&e).await;
            }
        }
    }

    /// Pause after a failed wait, longer each time in a row.
    async fn wait_failed(&mut self, e: &redis::RedisError) {
        tracing::warn!(error = %e, retry_in = ?self.wait_backoff, "waiting for work failed; backing off");
        tokio::time::sleep(self.wait_backoff).await;
        self.wait_backoff = (self.wait_backoff * 2).min(MAX_WAIT_BACKOFF);
    }
}
