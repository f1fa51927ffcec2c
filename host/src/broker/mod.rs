//! The broker: jobs in Redis (see docs/redis-layout.md for every key;
//! their names come from [`crate::keys`]).
//!
//! Owns the job life cycle in Redis and nothing else: enqueue (with
//! idempotency and delays), fetch with leases, lease renewal, recording an
//! outcome, deploys, results, status and the dead-letter queue; the
//! operator's views ([`inspect`]: queues, jobs by state, per-minute
//! counts) and controls ([`control`]: cancel, pause, heartbeats), the
//! tenants' schedules ([`schedules`]: definitions, due times, firing a
//! tick), dashboard tokens ([`web_tokens`]) and sealed secrets
//! ([`secrets`]). Every state
//! change is one Lua script ([`scripts`]); running jobs is the worker's job.

pub mod acl;
mod admin;
mod children;
mod consumer;
mod control;
pub mod envelope;
mod flows;
mod inspect;
mod producer;
mod registry;
mod schedules;
mod scripts;
mod secrets;
mod web_tokens;

use std::time::{SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

pub use admin::{JobStatus, TenantUsage};
pub use consumer::{Completion, FetchReply, Fetched, LeaseTerms, Outcome, Recorded};
pub use control::{Cancelled, ControlMessage, PoolBeat, WorkerBeat};
pub use flows::{FlowMembership, FlowState};
pub use inspect::{JobQuery, JobState, JobSummary, Paused, QueueView, RunTimes};
pub use producer::{EnqueueRequest, Enqueued, ResultState};
pub use registry::DeployedTask;
pub use schedules::{
    read_definition, DueSchedule, DueSchedules, LastFire, ScheduleView, TickClaim, DUE_PER_ROUND,
};
pub use secrets::SecretEntry;
pub use web_tokens::{token_digest, token_tenant, WebToken};

/// Redis-backed broker handle; cheap to clone (one multiplexed connection
/// that reconnects by itself).
#[derive(Clone)]
pub struct Broker {
    conn: ConnectionManager,
    client: redis::Client,
    /// The URL it was connected with.
    url: std::sync::Arc<str>,
}

impl Broker {
    /// Connect to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let client =
            redis::Client::open(url).with_context(|| format!("Redis URL {url:?} is not valid"))?;
        let conn = ConnectionManager::new_with_config(client.clone(), connection_config())
            .await
            .with_context(|| format!("connecting to Redis at {url}"))?;
        Ok(Broker {
            conn,
            client,
            url: url.into(),
        })
    }

    /// The URL it was connected with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The shared connection (also serves the host interfaces).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A connection of its own (reconnecting by itself, like the shared
    /// one), for traffic that must not queue behind the shared one's: a
    /// tenant's guest host calls.
    pub async fn new_connection(&self) -> redis::RedisResult<ConnectionManager> {
        ConnectionManager::new_with_config(self.client.clone(), connection_config()).await
    }

    /// This broker, making its calls on `conn` instead of the shared
    /// connection (a tenant's child enqueues go on that tenant's guest
    /// connection).
    pub fn on_connection(&self, conn: ConnectionManager) -> Broker {
        Broker {
            conn,
            ..self.clone()
        }
    }

    /// A dedicated connection for blocking commands (BLPOP, BLMOVE), which
    /// must not stall the shared multiplexed one. `block` is the longest the
    /// caller's command blocks; the response timeout allows for it.
    pub async fn blocking_connection(
        &self,
        block: std::time::Duration,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let timeout = block + std::time::Duration::from_secs(5);
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

/// How a reconnecting connection retries: a couple of quick attempts per
/// call, so calls during an outage fail fast and the caller's own backoff
/// decides when to try again.
fn connection_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_max_delay(std::time::Duration::from_millis(500))
}

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
